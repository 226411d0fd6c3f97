//! The core's side of replicas sharing one store: a reconciler of a former
//! leadership term writes nothing once a newer term began (fencing), and
//! the leader's recovery leaves alone allocations that a live process is
//! still preparing, however old the leader is, while aborting at once those
//! of a process the store knows has stopped.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod common;

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use common::{Fault, Tap};
use duffy_core::mem::MemStore;
use duffy_core::sim::{SimConfig, SimFarm};
use duffy_core::testkit::conformance::{check_history, check_invariants};
use duffy_core::testkit::{Harness, ManualClock};
use duffy_core::{
    Actor, Arch, CauseKind, Clock, Engine, EngineError, EventQuery, NodeRequest, NodeState, Policy, PoolKey,
    PoolTarget, SessionState, Store, StoreError, Timestamp,
};

fn pool() -> PoolKey {
    PoolKey::new("7", Arch::X86_64, None)
}

fn policy() -> Policy {
    Policy {
        rate_limit: None,
        prepare_timeout: Duration::from_secs(30),
        tick: Duration::from_secs(5),
        power_check_interval: None,
        ..Policy::default()
    }
}

fn sim(install_secs: u64) -> SimConfig {
    SimConfig {
        install_min: Duration::from_secs(install_secs),
        install_max: Duration::from_secs(install_secs),
        ..SimConfig::default()
    }
}

/// A farm of four idle machines and a pool that wants two of them, over
/// `store`; then the leader of term 1 freezes, term 2 begins, and term 1's
/// reconciler wakes up and runs a pass. Returns what the pass answered and
/// how many events it wrote.
fn former_leader_pass(store: Arc<dyn Store>) -> (Result<(), EngineError>, usize) {
    futures::executor::block_on(async move {
        let clock = ManualClock::new(Timestamp::from_millis(1_767_225_600_000));
        let farm = Arc::new(SimFarm::new(Arc::new(clock.clone()), sim(20)));
        store.add_nodes(SimFarm::machines(4), Actor::Operator, clock.now()).await.unwrap();
        store.set_pool_target(PoolTarget { pool: pool(), standby: 2 }).await.unwrap();
        let engine =
            Engine::builder(store.clone(), farm.clone(), farm, Arc::new(clock)).policy(policy()).build().unwrap();
        let term1 = store.new_leader_epoch().await.unwrap();
        let mut frozen = engine.fenced(term1).reconciler();
        let term2 = store.new_leader_epoch().await.unwrap();
        assert!(term2 > term1);
        let before = store.events(EventQuery::default()).await.unwrap().len();
        // Its reads are fresh, so compare-and-set alone would let it write:
        // only the fence stops it.
        let r = frozen.pass().await.map(|_| ());
        let after = store.events(EventQuery::default()).await.unwrap().len();
        (r, after - before)
    })
}

#[test]
fn a_reconciler_of_a_former_term_writes_nothing() {
    let (r, written) = former_leader_pass(Arc::new(MemStore::new()));
    assert_eq!(written, 0, "a former leader wrote {written} events");
    match r {
        Err(EngineError::Store(StoreError::Fenced { epoch: 1, current: 2 })) => {}
        other => panic!("the pass must fail, fenced: {other:?}"),
    }
}

#[test]
fn without_fencing_a_former_leader_would_write() {
    // The check above can fail: a store that ignores the fence lets the
    // frozen leader start installs the new leader knows nothing of.
    let broken: Arc<dyn Store> = Arc::new(Tap::new(Arc::new(MemStore::new()), Fault::IgnoreFence));
    let (r, written) = former_leader_pass(broken);
    assert!(r.is_ok(), "{r:?}");
    assert!(written > 0, "the broken store let the former leader write nothing?");
}

#[test]
fn the_current_term_reconciles() {
    let store = Arc::new(MemStore::new());
    futures::executor::block_on(async move {
        let clock = ManualClock::new(Timestamp::from_millis(1_767_225_600_000));
        let farm = Arc::new(SimFarm::new(Arc::new(clock.clone()), sim(20)));
        store.add_nodes(SimFarm::machines(4), Actor::Operator, clock.now()).await.unwrap();
        store.set_pool_target(PoolTarget { pool: pool(), standby: 2 }).await.unwrap();
        let engine =
            Engine::builder(store.clone(), farm.clone(), farm, Arc::new(clock)).policy(policy()).build().unwrap();
        let term = store.new_leader_epoch().await.unwrap();
        let leader = engine.fenced(term);
        assert_eq!((leader.fence(), engine.fence()), (Some(term), None));
        let r = leader.reconciler().pass().await.unwrap();
        assert_eq!(r.installs_started, 2);
        let events = store.events(EventQuery::default()).await.unwrap();
        assert_eq!(events.iter().filter(|e| e.cause == CauseKind::InstallStarted).count(), 2);
    });
}

/// The harness's farm (two Ready nodes in the pool) seen through a [`Tap`]
/// that plays a store several processes share; a second engine started
/// later is the new leader. Allocations are prepared for 10 s.
struct TwoProcesses {
    h: Harness,
    tap: Arc<Tap>,
}

impl TwoProcesses {
    fn new() -> Self {
        let slot: Rc<RefCell<Option<Arc<Tap>>>> = Rc::default();
        let s = slot.clone();
        let mut h = Harness::with_store(
            policy(),
            sim(20),
            SimFarm::machines(4),
            &[PoolTarget { pool: pool(), standby: 2 }],
            move |store| {
                let tap = Arc::new(Tap::new(store, Fault::None));
                *s.borrow_mut() = Some(tap.clone());
                tap
            },
        );
        h.advance(Duration::from_secs(30));
        h.farm.configure(|c| c.prepare_time = Duration::from_secs(10));
        let tap = slot.borrow_mut().take().expect("the harness wrapped its store");
        TwoProcesses { h, tap }
    }

    /// Starts the new leader: an engine built now (so everything already
    /// in the store is older than it) whose fenced reconciler runs beside
    /// the first engine's.
    fn start_new_leader(&mut self) {
        let store = self.h.dyn_store();
        let clock: Arc<dyn Clock> = Arc::new(self.h.clock.clone());
        let engine = Engine::builder(store.clone(), self.h.farm.clone(), self.h.farm.clone(), clock)
            .policy(policy())
            .contextualizer(self.h.farm.clone())
            .build()
            .unwrap();
        let term = self.h.block_on(async move { store.new_leader_epoch().await.unwrap() });
        let reconciler = engine.fenced(term).reconciler();
        self.h.spawn(reconciler.run(futures::future::pending()));
        self.h.run();
    }

    fn allocating(&mut self) -> Vec<duffy_core::Session> {
        let store = self.h.dyn_store();
        let live = self.h.block_on(async move { store.live_sessions().await.unwrap() });
        live.into_iter().filter(|s| s.state == SessionState::Allocating).collect()
    }
}

#[test]
fn a_new_leader_leaves_alone_allocations_a_live_process_is_preparing() {
    let mut t = TwoProcesses::new();
    let key = t.h.key("proj", None, false);
    // The store knows every process that made an allocation is alive.
    t.tap.set_abandoned(Some(Vec::new()));
    let cell = t.h.get_nodes_later(&key, NodeRequest { count: Some(2), ..NodeRequest::default() });
    t.h.advance(Duration::from_secs(2));
    assert_eq!(t.allocating().len(), 1, "being prepared");
    // A leader that started after the allocation was made: on a store used
    // by one process it would be an interrupted allocation, but here its
    // process is alive and still preparing it.
    t.start_new_leader();
    t.h.advance(Duration::from_secs(15));
    let r = cell.borrow_mut().take().expect("answered");
    let a = r.expect("the allocation of a live process is delivered");
    assert_eq!(a.hosts.len(), 2);
    let store = t.h.dyn_store();
    let events = t.h.block_on(async move { store.events(EventQuery::default()).await.unwrap() });
    assert!(!events.iter().any(|e| e.cause == CauseKind::AllocationAborted), "nothing was aborted");
    let store = t.h.dyn_store();
    t.h.block_on(async move {
        check_invariants(&*store).await.unwrap();
        check_history(&*store).await.unwrap();
    });
}

#[test]
fn a_new_leader_aborts_at_once_the_allocations_of_a_stopped_process() {
    let mut t = TwoProcesses::new();
    let key = t.h.key("proj", None, false);
    t.tap.set_abandoned(Some(Vec::new()));
    t.start_new_leader();
    let cell = t.h.get_nodes_later(&key, NodeRequest { count: Some(2), ..NodeRequest::default() });
    t.h.advance(Duration::from_secs(2));
    let allocating = t.allocating();
    assert_eq!(allocating.len(), 1);
    // The process preparing it stops (the store says so); the next pass
    // (a tick of 5 s) aborts it, long before the 120 s deadline.
    t.tap.set_abandoned(Some(vec![allocating[0].id.clone()]));
    t.h.advance(Duration::from_secs(6));
    assert!(t.allocating().is_empty(), "aborted at once");
    let store = t.h.dyn_store();
    let events = t.h.block_on(async move { store.events(EventQuery::default()).await.unwrap() });
    let aborted: Vec<_> = events.iter().filter(|e| e.cause == CauseKind::AllocationAborted).collect();
    assert_eq!(aborted.len(), 2);
    assert!(aborted.iter().all(|e| e.actor == Actor::Recovery), "{aborted:?}");
    // The request, still preparing in the "stopped" process here, finds
    // its session gone and says so.
    t.h.advance(Duration::from_secs(10));
    let r = cell.borrow_mut().take().expect("answered");
    assert!(r.is_err(), "{r:?}");
    let nodes = t.h.store.clone();
    let n = t.h.block_on(async move { nodes.nodes().await.unwrap() });
    assert!(!n.iter().any(|n| n.state == NodeState::Contextualizing));
    let store = t.h.dyn_store();
    t.h.block_on(async move {
        check_invariants(&*store).await.unwrap();
        check_history(&*store).await.unwrap();
    });
}
