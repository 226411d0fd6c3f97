use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::executor::LocalPool;
use futures::task::LocalSpawnExt;

use crate::engine::{Engine, EngineError};
use crate::model::{Actor, NewNode, PoolTarget, Project};
use crate::policy::Policy;
use crate::store::Store;
use crate::time::{Clock, Timestamp};

use super::ManualClock;
use crate::mem::MemStore;
use crate::sim::{SeededSessionIds, SimConfig, SimFarm};

/// A whole farm in one thread on a manual clock: in-memory store,
/// simulated hardware, the engine and its reconciler, all driven by a
/// single-threaded executor. Time moves only through
/// [`Harness::advance`], from one pending deadline to the next, so a
/// simulated day runs in well under a second and the same seed always
/// gives the same history.
pub struct Harness {
    /// The in-memory store underneath. The engine may see it through a
    /// wrapper (see [`Harness::with_store`]); reading it here bypasses the
    /// wrapper.
    pub store: Arc<MemStore>,
    /// The store as the engine sees it.
    engine_store: Arc<dyn Store>,
    /// The manual clock the engine reads; tests advance it to make leases,
    /// cool-downs and installs come due.
    pub clock: ManualClock,
    /// The simulated machines and BMCs behind the engine's power
    /// controller and installer; tests break and mend them.
    pub farm: Arc<SimFarm>,
    /// The engine under test, wired to the store, clock and farm above.
    pub engine: Engine,
    pool: LocalPool,
    keys_made: u64,
}

impl Harness {
    /// Builds a harness: `machines` added to the store, `targets` set, the
    /// reconciler running.
    pub fn new(policy: Policy, sim: SimConfig, machines: Vec<NewNode>, targets: &[PoolTarget]) -> Self {
        Self::with_store(policy, sim, machines, targets, |store| store)
    }

    /// Like [`Harness::new`], but everything (the engine, the reconciler,
    /// adding the machines and keys, [`Harness::dyn_store`]) goes through
    /// the store `wrap` makes of the in-memory one: a
    /// [yielding store](super::InterceptStore::yielding) to interleave operations, or
    /// a deliberately broken variant to check that a test catches it.
    pub fn with_store(
        policy: Policy,
        sim: SimConfig,
        machines: Vec<NewNode>,
        targets: &[PoolTarget],
        wrap: impl FnOnce(Arc<dyn Store>) -> Arc<dyn Store>,
    ) -> Self {
        let clock = ManualClock::new(Timestamp::from_millis(1_767_225_600_000)); // 2026-01-01
        let store = Arc::new(MemStore::new());
        let engine_store = wrap(store.clone());
        let seed = sim.seed;
        let farm = Arc::new(SimFarm::new(Arc::new(clock.clone()), sim));
        let engine = Self::engine(engine_store.clone(), &farm, &clock, policy, seed);
        let mut h = Harness { store, engine_store, clock, farm, engine, pool: LocalPool::new(), keys_made: 0 };
        let (store, now) = (h.engine_store.clone(), h.clock.now());
        let targets = targets.to_vec();
        h.block_on(async move {
            store.add_nodes(machines, Actor::Operator, now).await.expect("machines are valid and unique");
            for t in targets {
                store.set_pool_target(t).await.expect("targets are valid");
            }
        });
        let reconciler = h.engine.reconciler();
        h.spawn(reconciler.run(futures::future::pending()));
        h.run();
        h
    }

    /// The engine over the harness's parts: the farm powers and installs
    /// the machines, and prepares them when its configuration has
    /// anything to prepare ([`SimConfig::prepares`]).
    fn engine(store: Arc<dyn Store>, farm: &Arc<SimFarm>, clock: &ManualClock, policy: Policy, seed: u64) -> Engine {
        let clock: Arc<dyn Clock> = Arc::new(clock.clone());
        let mut builder = Engine::builder(store, farm.clone(), farm.clone(), clock)
            .policy(policy)
            .session_ids(Arc::new(SeededSessionIds::new(seed)));
        if farm.config().prepares() {
            builder = builder.contextualizer(farm.clone());
        }
        builder.build().expect("the harness policy is valid")
    }

    /// Simulates a crash and a restart: every running task (the
    /// reconciler, requests in flight, installs) is dropped mid-step, and a
    /// new engine and reconciler start over the same store, hardware and
    /// clock, with a new policy.
    pub fn crash_and_restart(&mut self, policy: Policy) {
        self.crash_and_restart_over(policy, |store| store);
    }

    /// As [`Harness::crash_and_restart`], with the new engine seeing the
    /// store through `wrap` (an
    /// [`InterceptStore`](super::InterceptStore) that fails some calls,
    /// say); the harness's own reads still go to the store directly.
    pub fn crash_and_restart_over(&mut self, policy: Policy, wrap: impl FnOnce(Arc<dyn Store>) -> Arc<dyn Store>) {
        self.pool = LocalPool::new();
        let store = wrap(self.engine_store.clone());
        self.engine = Self::engine(store, &self.farm, &self.clock, policy, self.clock.now().as_millis() as u64);
        let reconciler = self.engine.reconciler();
        self.spawn(reconciler.run(futures::future::pending()));
        self.run();
    }

    /// Creates a project (with an optional quota) and an API key for it,
    /// returning the key.
    pub fn key(&mut self, project: &str, quota: Option<u32>, admin: bool) -> String {
        let store = self.engine_store.clone();
        self.keys_made += 1;
        let key = format!("key-{project}-{}", self.keys_made);
        let k = key.clone();
        let name = project.to_string();
        let now = self.clock.now();
        self.block_on(async move {
            store.upsert_project(Project { name: name.clone(), quota, ssh_keys: vec![] }).await.expect("project");
            store.add_api_key(&name, crate::hash_api_key(&k), admin, now, None).await.expect("key");
        });
        key
    }

    /// Spawns a task on the harness's executor.
    pub fn spawn(&mut self, fut: impl Future<Output = ()> + 'static) {
        self.pool.spawner().spawn_local(fut).expect("the local pool is alive");
    }

    /// A handle to spawn tasks from inside other tasks.
    pub fn spawner(&self) -> futures::executor::LocalSpawner {
        self.pool.spawner()
    }

    /// Runs every task as far as it can go without time passing.
    pub fn run(&mut self) {
        self.pool.run_until_stalled();
    }

    /// Runs a future to completion, letting the farm run meanwhile. Time
    /// does not move: the future must not wait on the clock.
    pub fn block_on<T: 'static>(&mut self, fut: impl Future<Output = T> + 'static) -> T {
        let slot = std::rc::Rc::new(std::cell::RefCell::new(None));
        let s = slot.clone();
        self.spawn(async move {
            let v = fut.await;
            *s.borrow_mut() = Some(v);
        });
        self.run();
        slot.borrow_mut().take().expect("block_on: the future waited on the clock; use spawn and advance")
    }

    /// Moves time forward by `d`, stopping at every pending deadline on the
    /// way so that everything happens in order.
    pub fn advance(&mut self, d: Duration) {
        let end = self.clock.now().plus(d);
        loop {
            self.run();
            match self.clock.next_deadline() {
                Some(t) if t <= end => self.clock.set(t),
                _ => break,
            }
        }
        self.clock.set(end);
        self.run();
    }

    /// Authenticates `key` and asks for nodes, in a spawned task whose
    /// result lands in the returned cell once time has moved enough.
    pub fn get_nodes_later(
        &mut self,
        key: &str,
        req: crate::engine::NodeRequest,
    ) -> std::rc::Rc<std::cell::RefCell<Option<Result<crate::engine::Allocation, EngineError>>>> {
        let cell = std::rc::Rc::new(std::cell::RefCell::new(None));
        let c = cell.clone();
        let engine = self.engine.clone();
        let key = key.to_string();
        self.spawn(async move {
            let r = match engine.authenticate(&key).await {
                Ok(who) => engine.get_nodes(&who, &req).await,
                Err(e) => Err(e),
            };
            *c.borrow_mut() = Some(r);
        });
        self.run();
        cell
    }

    /// The store as the engine sees it (through the wrapper, if any).
    pub fn dyn_store(&self) -> Arc<dyn Store> {
        self.engine_store.clone()
    }
}
