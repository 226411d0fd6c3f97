//! Error paths of the engine and the reconciler, with the `mock` feature's
//! mockall mocks: a BMC that fails on its third call, a store that refuses
//! a commit or loses every race, a contextualizer that refuses a project
//! or never answers, a claim refused for each reason, a failed reconciler
//! pass, a store error under authentication, an install that never ends
//! and a power-off that fails during a pause.
//!
//! Each test asserts what the engine did to its parts (which calls, how
//! many, in which order, with which deadlines) as well as what it
//! answered. Mocks are strict: a call nobody expected panics, so "nothing
//! else was attempted" is checked by every test. An `async` method of a
//! mock answers at once; the two parts that must hang are written by hand.
//! Where a test needs state (nodes, sessions, keys), it lives in the test
//! kit's `MemStore`, and the `MockStore` answers from it except where the
//! test makes it fail.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::FutureExt;
use futures::executor::LocalPool;
use futures::task::LocalSpawnExt;
use mockall::Sequence;
use mockall::predicate::eq;

use duffy_core::mem::MemStore;
use duffy_core::mock::{MockClock, MockContextualizer, MockInstaller, MockPowerController, MockStore, sleep_over};
use duffy_core::sim::SimFarm;
use duffy_core::testkit::ManualClock;
use duffy_core::{
    Actor, ApiKeyRecord, Arch, Blame, BootDevice, CauseKind, ClaimRefusal, Clock, CommitError, Contextualizer, Engine,
    EngineError, EventQuery, InstallError, Installed, Installer, Node, NodeRequest, NodeState, Policy, PoolKey,
    PoolTarget, PowerAction, PowerController, PowerError, PowerErrorKind, PowerState, PrepareError, Principal, Project,
    RateLimit, Reconciler, Session, SessionId, SessionState, Store, StoreError, Timestamp,
};

/// 2026-01-01T00:00:00Z.
const T0: Timestamp = Timestamp(1_767_225_600_000);

fn pool() -> PoolKey {
    PoolKey::new("7", Arch::X86_64, None)
}

/// Short, round numbers; no background power checks (they would call the
/// power controller on their own) and no cool-down after a failure.
fn policy() -> Policy {
    Policy {
        rate_limit: None,
        install_timeout: Duration::from_secs(60),
        install_attempts: 3,
        install_backoff: Duration::from_secs(10),
        failed_retry_after: None,
        prepare_timeout: Duration::from_secs(30),
        power_check_interval: None,
        cas_retries: 4,
        ..Policy::default()
    }
}

/// What a failing disk looks like to the engine.
fn disk_error(what: &str) -> StoreError {
    StoreError::backend(what.to_string(), std::io::Error::other("disk I/O error"))
}

fn bmc_unreachable() -> PowerError {
    PowerError::new(PowerErrorKind::Unreachable, "no route to host")
}

/// A `MemStore` answer, which is ready at once (nothing in it awaits).
fn now<T>(fut: impl Future<Output = T>) -> T {
    fut.now_or_never().expect("MemStore answers at once")
}

/// A farm in memory: `machines` nodes (state Active), a target of
/// `standby` for the pool, and the project `ci` with one key.
struct Farm {
    mem: Arc<MemStore>,
    key: ApiKeyRecord,
}

impl Farm {
    fn new(machines: usize, standby: u32) -> Farm {
        let mem = Arc::new(MemStore::new());
        now(mem.add_nodes(SimFarm::machines(machines), Actor::Operator, T0)).unwrap();
        now(mem.set_pool_target(PoolTarget { pool: pool(), standby })).unwrap();
        now(mem.upsert_project(Project { name: "ci".into(), quota: None, ssh_keys: vec![] })).unwrap();
        let key = now(mem.add_api_key("ci", duffy_core::hash_api_key("ci-key"), false, T0, None)).unwrap();
        Farm { mem, key }
    }

    fn who(&self) -> Principal {
        Principal { key_id: Some(self.key.id), project: "ci".into(), admin: false }
    }

    fn nodes(&self) -> Vec<Node> {
        now(self.mem.nodes()).unwrap()
    }

    /// Puts every node straight into Ready (as a finished install would).
    fn all_ready(&self) {
        for n in self.nodes() {
            let started = duffy_core::NodeWrite::transition(
                &n,
                duffy_core::Cause::InstallStarted { image: pool(), why: "test".into() },
                Actor::Reconciler,
                T0,
            )
            .unwrap();
            let after = started.node.clone();
            now(self.mem.commit(duffy_core::Batch { nodes: vec![started], ..Default::default() })).unwrap();
            let done = duffy_core::NodeWrite::transition(
                &after,
                duffy_core::Cause::InstallSucceeded { host_key: None },
                Actor::Reconciler,
                T0,
            )
            .unwrap();
            now(self.mem.commit(duffy_core::Batch { nodes: vec![done], ..Default::default() })).unwrap();
        }
    }

    /// A delivered session of `ci` over `count` Ready nodes, made by a
    /// real engine over the `MemStore` (no contextualizer: one write).
    fn delivered_session(&self, count: u32) -> Session {
        self.all_ready();
        let engine = engine(self.mem.clone(), MockPowerController::new(), MockInstaller::new(), clock_at(T0));
        let req = NodeRequest { count: Some(count), ..NodeRequest::default() };
        let a = futures::executor::block_on(engine.get_nodes(&self.who(), &req)).expect("claimed");
        now(self.mem.session(&a.session)).unwrap().expect("stored")
    }

    fn history(&self, node: &Node) -> Vec<CauseKind> {
        now(self.mem.events(EventQuery { node: Some(node.id), ..EventQuery::default() }))
            .unwrap()
            .into_iter()
            .map(|e| e.cause)
            .collect()
    }
}

fn clock_at(t: Timestamp) -> Arc<dyn Clock> {
    Arc::new(ManualClock::new(t))
}

fn engine(
    store: Arc<dyn Store>,
    power: impl PowerController + 'static,
    installer: impl Installer + 'static,
    clock: Arc<dyn Clock>,
) -> Engine {
    Engine::builder(store, Arc::new(power), Arc::new(installer), clock).policy(policy()).build().expect("valid policy")
}

/// Takes the mock back from the `Arc` it was shared through: fails if
/// anything (an engine, an operation) still holds it. Verifying it
/// (`checkpoint`) then checks every `times` of its expectations.
fn last<T>(shared: Arc<T>) -> T {
    Arc::try_unwrap(shared).ok().expect("nothing holds the mock any more")
}

/// Every `Store` call, by method name, in the order they were made.
#[derive(Clone, Default)]
struct Calls(Arc<Mutex<Vec<&'static str>>>);

impl Calls {
    fn push(&self, method: &'static str) {
        self.0.lock().unwrap().push(method);
    }

    fn take(&self) -> Vec<&'static str> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

/// Adds to `mock`, after whatever the test expects, an expectation per
/// `Store` method (but those named in `except`) that answers from `mem`
/// and records the call. mockall tries a method's expectations in the
/// order they were set, skipping those used up: the test's own
/// expectations come first, these answer the rest. (A `never()` is used up
/// from the start, so a method that must not be called past the test's
/// expectations goes in `except`: with nothing left to answer it, the call
/// panics.)
fn answer_from(mock: &mut MockStore, mem: &Arc<MemStore>, calls: &Calls, except: &[&str]) {
    macro_rules! forward {
        ($expect:ident, $method:ident ( $($arg:ident),* )) => {{
            if !except.contains(&stringify!($method)) {
                let (mem, calls) = (mem.clone(), calls.clone());
                mock.$expect().returning(move |$($arg),*| {
                    calls.push(stringify!($method));
                    now(mem.$method($($arg),*))
                });
            }
        }};
    }
    forward!(expect_add_nodes, add_nodes(nodes, actor, at));
    forward!(expect_node, node(id));
    forward!(expect_node_by_hostname, node_by_hostname(hostname));
    forward!(expect_nodes, nodes());
    forward!(expect_ready_counts, ready_counts());
    forward!(expect_nodes_in_states, nodes_in_states(states));
    forward!(expect_stale_ready, stale_ready(before, limit));
    forward!(expect_idle_nodes, idle_nodes(hardware, limit));
    forward!(expect_nodes_after, nodes_after(after, limit));
    forward!(expect_session, session(id));
    forward!(expect_live_sessions, live_sessions());
    forward!(expect_expired_sessions, expired_sessions(now, limit));
    forward!(expect_claim, claim(req));
    forward!(expect_commit, commit(batch));
    forward!(expect_commit_each, commit_each(batches));
    forward!(expect_hand_back, hand_back(req));
    forward!(expect_events, events(query));
    forward!(expect_upsert_project, upsert_project(project));
    forward!(expect_project, project(name));
    forward!(expect_add_api_key, add_api_key(project, hash, admin, at, expires));
    forward!(expect_api_key_by_hash, api_key_by_hash(hash));
    forward!(expect_api_keys, api_keys(project));
    forward!(expect_revoke_api_key, revoke_api_key(id, at));
    forward!(expect_record_key_use, record_key_use(used));
    forward!(expect_set_pool_target, set_pool_target(target));
    forward!(expect_pool_targets, pool_targets());
    forward!(expect_paused, paused());
    forward!(expect_set_paused, set_paused(paused));
}

/// A single-threaded executor over a manual clock, for operations that
/// wait on the clock (install backoff).
struct Rig {
    pool: LocalPool,
    clock: ManualClock,
}

impl Rig {
    fn new() -> Rig {
        Rig { pool: LocalPool::new(), clock: ManualClock::new(T0) }
    }

    fn spawn(&mut self, fut: impl Future<Output = ()> + 'static) {
        self.pool.spawner().spawn_local(fut).expect("the pool is alive");
        self.pool.run_until_stalled();
    }

    /// Moves time forward by `d`, running everything that became due.
    fn advance(&mut self, d: Duration) {
        self.clock.advance(d);
        self.pool.run_until_stalled();
    }
}

/// An installer that drives the BMC the way a network install does (boot
/// from the network, power cycle, check the machine came up): what a BMC
/// failure does to an install is then the engine's to handle.
struct NetbootInstaller {
    power: Arc<MockPowerController>,
}

#[async_trait]
impl Installer for NetbootInstaller {
    async fn install(&self, node: &Node, _image: &PoolKey) -> Result<Installed, InstallError> {
        let bmc = |e: PowerError| InstallError::new(format!("BMC of {}: {e}", node.hostname));
        self.power.set_next_boot(node, BootDevice::Pxe).await.map_err(bmc)?;
        self.power.power(node, PowerAction::Cycle).await.map_err(bmc)?;
        match self.power.status(node).await.map_err(bmc)? {
            PowerState::On => Ok(Installed::default()),
            other => Err(InstallError::new(format!("{} is {} after the power cycle", node.hostname, other.as_str()))),
        }
    }
}

/// The BMC answers its first two calls, then nothing more (it fell off the
/// network): the install attempt that made the third call fails, the next
/// ones fail at their first call, each after its backoff, and the node
/// ends Failed with the BMC's words.
#[test]
fn a_bmc_failing_on_its_third_call_fails_the_install_after_every_attempt() {
    let farm = Farm::new(1, 1);
    let calls = Arc::new(AtomicUsize::new(0));
    let mut power = MockPowerController::new();
    let mut seq = Sequence::new();
    let count = |calls: &Arc<AtomicUsize>| {
        let calls = calls.clone();
        move || calls.fetch_add(1, Ordering::SeqCst)
    };
    let c = count(&calls);
    power
        .expect_set_next_boot()
        .with(mockall::predicate::always(), eq(BootDevice::Pxe))
        .times(1)
        .in_sequence(&mut seq)
        .returning(move |_, _| {
            c();
            Ok(())
        });
    let c = count(&calls);
    power.expect_power().withf(|_, a| *a == PowerAction::Cycle).times(1).in_sequence(&mut seq).returning(
        move |_, _| {
            c();
            Ok(())
        },
    );
    let c = count(&calls);
    power.expect_status().times(1).in_sequence(&mut seq).returning(move |_| {
        c();
        Err(bmc_unreachable())
    });
    let c = count(&calls);
    power.expect_set_next_boot().times(2).in_sequence(&mut seq).returning(move |_, _| {
        c();
        Err(bmc_unreachable())
    });
    let power = Arc::new(power);

    let mut rig = Rig::new();
    let installer = NetbootInstaller { power: power.clone() };
    let engine = Engine::builder(farm.mem.clone(), power.clone(), Arc::new(installer), Arc::new(rig.clock.clone()))
        .policy(policy())
        .build()
        .unwrap();
    let mut reconciler = engine.reconciler();
    drop(engine);
    let outcome = Arc::new(Mutex::new(None));
    let o = outcome.clone();
    rig.spawn(async move {
        let report = reconciler.pass().await.expect("the pass itself succeeds");
        reconciler.drain().await;
        *o.lock().unwrap() = Some(report);
    });
    assert_eq!(calls.load(Ordering::SeqCst), 3, "the first attempt made three calls and failed on the third");
    rig.advance(Duration::from_millis(9_999));
    assert_eq!(calls.load(Ordering::SeqCst), 3, "no retry before the backoff (10 s)");
    rig.advance(Duration::from_millis(1));
    assert_eq!(calls.load(Ordering::SeqCst), 4, "the second attempt, after 10 s");
    rig.advance(Duration::from_millis(19_999));
    assert_eq!(calls.load(Ordering::SeqCst), 4, "the backoff doubled (20 s)");
    rig.advance(Duration::from_millis(1));
    assert_eq!(calls.load(Ordering::SeqCst), 5, "the third and last attempt");
    let report = outcome.lock().unwrap().take().expect("every operation finished");
    assert_eq!(report.installs_started, 1);

    let node = &farm.nodes()[0];
    assert_eq!(node.state, NodeState::Failed);
    let reason = node.fail_reason.as_deref().unwrap();
    assert!(reason.starts_with("install of 7/x86_64 failed after 3 attempts: BMC of n1.sim.duffy:"), "{reason}");
    assert!(reason.contains("no route to host"), "{reason}");
    assert_eq!(
        farm.history(node),
        [
            CauseKind::Added,
            CauseKind::InstallStarted,
            CauseKind::InstallAttemptFailed,
            CauseKind::InstallAttemptFailed,
            CauseKind::InstallFailed
        ]
    );
    drop(rig);
    last(power).checkpoint();
}

/// An installer that never answers, counting its calls (a mock's `async`
/// method answers at once, so a hang is written by hand).
#[derive(Default)]
struct NeverInstalls(AtomicUsize);

#[async_trait]
impl Installer for NeverInstalls {
    async fn install(&self, _node: &Node, _image: &PoolKey) -> Result<Installed, InstallError> {
        self.0.fetch_add(1, Ordering::SeqCst);
        std::future::pending().await
    }
}

/// An install that never returns is cut at the policy's install deadline,
/// measured on the injected clock: the clock is asked for exactly the
/// deadlines and backoffs the policy sets, in order, and nothing else.
#[test]
fn an_install_that_never_returns_times_out_on_the_clock() {
    let farm = Farm::new(1, 1);
    let p = Policy { install_attempts: 2, ..policy() };
    let mut clock = MockClock::new();
    clock.expect_now().return_const(T0);
    let mut seq = Sequence::new();
    for deadline in [p.install_timeout, p.backoff(0), p.install_timeout] {
        clock
            .expect_sleep_until()
            .with(eq(T0.plus(deadline)))
            .times(1)
            .in_sequence(&mut seq)
            .returning(|_| sleep_over());
    }
    let clock = Arc::new(clock);
    let installer = Arc::new(NeverInstalls::default());
    // No expectation: the core never touches the power during an install.
    let power = Arc::new(MockPowerController::new());
    let engine =
        Engine::builder(farm.mem.clone(), power.clone(), installer.clone(), clock.clone()).policy(p).build().unwrap();
    let mut reconciler = engine.reconciler();
    drop(engine);
    futures::executor::block_on(async {
        reconciler.pass().await.expect("pass");
        reconciler.drain().await;
    });
    drop(reconciler);

    assert_eq!(installer.0.load(Ordering::SeqCst), 2, "one call per attempt");
    let node = &farm.nodes()[0];
    assert_eq!(node.state, NodeState::Failed);
    assert_eq!(
        node.fail_reason.as_deref(),
        Some("install of 7/x86_64 failed after 2 attempts: install timed out after 60s")
    );
    last(clock).checkpoint();
    last(power).checkpoint();
}

/// `done` whose write the store refuses with a backend error: the error
/// reaches the caller as it is, the write is not retried, and nothing
/// else is asked of the store (the session and its nodes are read inside
/// the store's one hand-back step).
#[test]
fn done_reports_a_store_refusing_its_write_and_attempts_nothing_else() {
    let farm = Farm::new(2, 2);
    let session = farm.delivered_session(2);

    let mut store = MockStore::new();
    let (sid, key) = (session.id.clone(), farm.key.id);
    store
        .expect_hand_back()
        .withf(move |r| r.session == sid && r.key_id == key && r.kind == duffy_core::HandBackKind::Done)
        .times(1)
        .returning(|_| Err(CommitError::Store(disk_error("committing a batch"))));
    let store = Arc::new(store);
    let engine = engine(store.clone(), MockPowerController::new(), MockInstaller::new(), clock_at(T0));

    let err = futures::executor::block_on(engine.done(&farm.who(), &session.id.0)).expect_err("the write failed");
    assert!(matches!(err, EngineError::Store(StoreError::Backend { .. })), "{err:?}");
    assert_eq!(err.to_string(), "committing a batch: disk I/O error");
    drop(engine);
    last(store).checkpoint();
    assert_eq!(now(farm.mem.session(&session.id)).unwrap().unwrap().state, SessionState::Prod, "nothing written");
}

/// A hand-back that loses its compare-and-set race is retried, and one
/// that wins on the last attempt `cas_retries` allows succeeds.
#[test]
fn lost_races_are_retried_up_to_cas_retries_and_the_last_attempt_can_win() {
    let farm = Farm::new(1, 1);
    let session = farm.delivered_session(1);
    let retries = policy().cas_retries as usize;
    let calls = Calls::default();
    let mut store = MockStore::new();
    store
        .expect_hand_back()
        .times(retries - 1)
        .returning(|_| Err(CommitError::Conflict("session changed since it was read".into())));
    answer_from(&mut store, &farm.mem, &calls, &[]);
    let store = Arc::new(store);
    let engine = engine(store.clone(), MockPowerController::new(), MockInstaller::new(), clock_at(T0));

    futures::executor::block_on(engine.done(&farm.who(), &session.id.0)).expect("the last attempt wins");
    // The refused attempts are the test's own expectations; the one that
    // went through reached the store, and nothing else did.
    assert_eq!(calls.take(), ["hand_back"]);
    assert_eq!(now(farm.mem.session(&session.id)).unwrap().unwrap().state, SessionState::Done);
    drop(engine);
    last(store).checkpoint();
}

/// A hand-back that keeps losing its race gives up after exactly
/// `cas_retries` attempts with `Contention`, and writes nothing.
#[test]
fn a_hand_back_that_keeps_losing_gives_up_with_contention_after_cas_retries() {
    let farm = Farm::new(1, 1);
    let session = farm.delivered_session(1);
    let retries = policy().cas_retries as usize;
    let calls = Calls::default();
    let mut store = MockStore::new();
    store
        .expect_hand_back()
        .times(retries)
        .returning(|_| Err(CommitError::Conflict("session changed since it was read".into())));
    answer_from(&mut store, &farm.mem, &calls, &["hand_back"]);
    let store = Arc::new(store);
    let engine = engine(store.clone(), MockPowerController::new(), MockInstaller::new(), clock_at(T0));

    let err = futures::executor::block_on(engine.done(&farm.who(), &session.id.0)).expect_err("contention");
    assert!(matches!(&err, EngineError::Contention(what) if what == &format!("session {}", session.id)), "{err:?}");
    assert!(calls.take().is_empty(), "nothing but the hand-backs");
    assert_eq!(now(farm.mem.session(&session.id)).unwrap().unwrap().state, SessionState::Prod);
    drop(engine);
    last(store).checkpoint();
}

/// A refused fail-cap guard is an answer, not a lost race: `fail` reports
/// `FailCapExceeded` after one hand-back carrying the cap, with no retry.
#[test]
fn a_refused_fail_cap_guard_is_not_retried() {
    let farm = Farm::new(1, 1);
    let session = farm.delivered_session(1);
    let calls = Calls::default();
    let mut store = MockStore::new();
    let cap = policy().fail_cap.expect("the default policy has a fail cap");
    store
        .expect_hand_back()
        .withf(move |r| matches!(r.kind, duffy_core::HandBackKind::Fail { fail_cap: Some(c), .. } if c == cap))
        .times(1)
        .returning(move |_| {
            Err(CommitError::GuardFailed {
                guard: duffy_core::Guard::ProjectFailedNodesAtMost { project: "ci".into(), max: cap },
                actual: u64::from(cap) + 1,
            })
        });
    answer_from(&mut store, &farm.mem, &calls, &["hand_back"]);
    let store = Arc::new(store);
    let engine = engine(store.clone(), MockPowerController::new(), MockInstaller::new(), clock_at(T0));

    let err = futures::executor::block_on(engine.fail(&farm.who(), &session.id.0)).expect_err("over the cap");
    assert!(matches!(err, EngineError::FailCapExceeded { cap: c } if c == cap), "{err:?}");
    assert!(calls.take().is_empty(), "one attempt, nothing else");
    drop(engine);
    last(store).checkpoint();
}

/// A contextualizer that never finishes preparing one node, and prepares
/// the others at once (a mock cannot hang, so this one is hand-written).
struct HangsOn {
    hostname: &'static str,
    prepared: Mutex<Vec<String>>,
}

#[async_trait]
impl Contextualizer for HangsOn {
    async fn prepare(&self, node: &Node, _project: &Project, _session: &SessionId) -> Result<(), PrepareError> {
        self.prepared.lock().unwrap().push(node.hostname.clone());
        if node.hostname == self.hostname {
            std::future::pending::<()>().await;
        }
        Ok(())
    }
}

/// A node whose preparation outlives the prepare deadline is blamed and
/// Failed with the reason; the other nodes of the allocation are sent
/// back to be reinstalled, and nothing is handed out.
#[test]
fn a_contextualizer_timing_out_fails_that_node_and_aborts_the_others() {
    let farm = Farm::new(3, 3);
    farm.all_ready();
    let mut clock = MockClock::new();
    clock.expect_now().return_const(T0);
    let deadline = T0.plus(policy().prepare_timeout);
    // One deadline per node, all at once; only the hanging node's fires.
    clock.expect_sleep_until().with(eq(deadline)).times(3).returning(|_| sleep_over());
    let clock = Arc::new(clock);
    let ctx = Arc::new(HangsOn { hostname: "n2.sim.duffy", prepared: Mutex::new(vec![]) });
    let power = Arc::new(MockPowerController::new());
    let engine = Engine::builder(farm.mem.clone(), power.clone(), Arc::new(MockInstaller::new()), clock.clone())
        .policy(policy())
        .contextualizer(ctx.clone())
        .build()
        .unwrap();

    let req = NodeRequest { count: Some(3), ..NodeRequest::default() };
    let err = futures::executor::block_on(engine.get_nodes(&farm.who(), &req)).expect_err("n2 timed out");
    match &err {
        EngineError::PreparationFailed { hostname, reason } => {
            assert_eq!(hostname, "n2.sim.duffy");
            assert_eq!(reason, "preparing the node timed out after 30s");
        }
        other => panic!("{other:?}"),
    }
    let mut prepared = ctx.prepared.lock().unwrap().clone();
    prepared.sort();
    assert_eq!(prepared, ["n1.sim.duffy", "n2.sim.duffy", "n3.sim.duffy"], "every node prepared once");

    let nodes = farm.nodes();
    assert_eq!(nodes[1].state, NodeState::Failed);
    assert_eq!(nodes[1].fail_reason.as_deref(), Some("preparing the node timed out after 30s"));
    for n in [&nodes[0], &nodes[2]] {
        assert_eq!(n.state, NodeState::Active, "{} goes back to be reinstalled", n.hostname);
        assert_eq!(n.fail_reason, None);
    }
    let live = now(farm.mem.live_sessions()).unwrap();
    assert!(live.is_empty(), "no session left behind: {live:?}");
    drop(engine);
    last(clock).checkpoint();
    last(power).checkpoint();
}

/// A project the contextualizer refuses is refused before anything is
/// claimed: the claim and every preparation are never called.
#[test]
fn a_project_the_contextualizer_refuses_is_refused_before_the_claim() {
    let mut store = MockStore::new();
    store
        .expect_project()
        .with(eq("ci"))
        .times(1)
        .returning(|_| Ok(Some(Project { name: "ci".into(), quota: None, ssh_keys: vec![] })));
    store.expect_claim().never();
    let mut ctx = MockContextualizer::new();
    ctx.expect_check_project().withf(|p| p.name == "ci" && p.ssh_keys.is_empty()).times(1).returning(|_| {
        Err(PrepareError::new(Blame::Project, "the project has no SSH keys; add one with `duffy project`"))
    });
    ctx.expect_prepare().never();
    let (store, ctx) = (Arc::new(store), Arc::new(ctx));
    let engine = Engine::builder(
        store.clone(),
        Arc::new(MockPowerController::new()),
        Arc::new(MockInstaller::new()),
        clock_at(T0),
    )
    .policy(policy())
    .contextualizer(ctx.clone())
    .build()
    .unwrap();

    let who = Principal { key_id: Some(duffy_core::KeyId(1)), project: "ci".into(), admin: false };
    let err = futures::executor::block_on(engine.get_nodes(&who, &NodeRequest::default())).expect_err("refused");
    assert!(
        matches!(&err, EngineError::ProjectUnusable { project, reason }
            if project == "ci" && reason == "the project has no SSH keys; add one with `duffy project`"),
        "{err:?}"
    );
    drop(engine);
    last(store).checkpoint();
    last(ctx).checkpoint();
}

/// Whether an engine error is the one a case expects.
type Expected = fn(&EngineError) -> bool;

/// Every reason a store refuses a claim becomes its own engine error, with
/// the store's numbers, after exactly one claim and no other store call
/// (the pool's target and the project's quota are checked inside the
/// claim, not read before it).
#[test]
fn claim_refusals_map_to_their_engine_errors() {
    let limit = RateLimit { max: 5, window: Duration::from_secs(300) };
    let cases: Vec<(ClaimRefusal, Expected)> = vec![
        (
            ClaimRefusal::NoSuchPool { available: vec![] },
            |e| matches!(e, EngineError::NoSuchPool { available, .. } if available.is_empty()),
        ),
        (
            ClaimRefusal::OverCapacity { requested: 2, standby: 1 },
            |e| matches!(e, EngineError::InvalidRequest(m) if m == "count 2 exceeds the capacity of pool 7/x86_64 (1 nodes)"),
        ),
        (ClaimRefusal::Paused, |e| matches!(e, EngineError::Paused)),
        (ClaimRefusal::RateLimited { recent: 5, limit }, |e| {
            matches!(e, EngineError::RateLimited { recent: 5, window_secs: 300 })
        }),
        (ClaimRefusal::QuotaExceeded { held: 4, requested: 2, quota: 5 }, |e| {
            matches!(e, EngineError::QuotaExceeded { held: 4, requested: 2, quota: 5 })
        }),
        (ClaimRefusal::InsufficientNodes { requested: 2, available: 1 }, |e| {
            matches!(e, EngineError::InsufficientNodes { requested: 2, available: 1 })
        }),
    ];
    for (refusal, expected) in cases {
        let mut store = MockStore::new();
        let r = refusal.clone();
        store
            .expect_claim()
            .withf(move |req| {
                req.project == "ci"
                    && req.count == 2
                    && req.check_target
                    && req.default_quota == Some(3)
                    && req.rate_limit == Some(limit)
                    && req.deliver == Some(T0.plus(policy().lease))
            })
            .times(1)
            .returning(move |_| Ok(Err(r.clone())));
        let store = Arc::new(store);
        let engine = Engine::builder(
            store.clone(),
            Arc::new(MockPowerController::new()),
            Arc::new(MockInstaller::new()),
            clock_at(T0),
        )
        .policy(Policy { rate_limit: Some(limit), default_quota: Some(3), ..policy() })
        .build()
        .unwrap();
        let who = Principal { key_id: Some(duffy_core::KeyId(1)), project: "ci".into(), admin: false };
        let req = NodeRequest { count: Some(2), ..NodeRequest::default() };
        let err = futures::executor::block_on(engine.get_nodes(&who, &req)).expect_err("refused");
        assert!(expected(&err), "{refusal:?} became {err:?}");
        drop(engine);
        last(store).checkpoint();
    }
}

/// A store error at the start of a reconciler pass fails that pass at
/// once (nothing planned, nothing installed), and the next pass, with the
/// store back, does the work.
#[test]
fn a_store_error_fails_the_first_pass_and_the_next_pass_recovers() {
    let farm = Farm::new(1, 1);
    let calls = Calls::default();
    let mut store = MockStore::new();
    store.expect_live_sessions().times(1).returning(|| Err(disk_error("reading live sessions")));
    answer_from(&mut store, &farm.mem, &calls, &[]);
    let store = Arc::new(store);
    let mut installer = MockInstaller::new();
    installer
        .expect_install()
        .withf(|n, image| n.hostname == "n1.sim.duffy" && *image == pool())
        .times(1)
        .returning(|_, _| Ok(Installed { host_key: Some("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI".into()) }));
    let installer = Arc::new(installer);
    let engine = Engine::builder(store.clone(), Arc::new(MockPowerController::new()), installer.clone(), clock_at(T0))
        .policy(policy())
        .build()
        .unwrap();
    let mut reconciler: Reconciler = engine.reconciler();
    drop(engine);

    let err = futures::executor::block_on(reconciler.pass()).expect_err("the store failed");
    assert_eq!(err.to_string(), "reading live sessions: disk I/O error");
    let log = calls.take();
    assert!(!log.iter().any(|c| matches!(*c, "commit" | "commit_each" | "claim")), "nothing written: {log:?}");
    assert_eq!(reconciler.in_flight(), 0, "nothing started");

    let report = futures::executor::block_on(reconciler.pass()).expect("the store is back");
    assert_eq!(report.installs_started, 1);
    futures::executor::block_on(reconciler.drain());
    let log = calls.take();
    // The reconciler's single-node writes reach the store gathered.
    assert_eq!(log.iter().filter(|c| **c == "commit_each").count(), 2, "install started, then succeeded: {log:?}");
    let node = &farm.nodes()[0];
    assert_eq!(node.state, NodeState::Ready);
    assert_eq!(node.host_key.as_deref(), Some("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI"));
    drop(reconciler);
    last(store).checkpoint();
    last(installer).checkpoint();
}

/// A store error on one node's write in a pass fails the pass, but only
/// after the writes that did succeed have their installs started: no node
/// is left Provisioning with nobody driving it. The next pass picks up the
/// node whose write failed.
#[test]
fn a_failed_write_fails_the_pass_after_starting_what_was_written() {
    let farm = Farm::new(2, 2);
    let n1 = farm.nodes()[0].id;
    let calls = Calls::default();
    let mut store = MockStore::new();
    // The pass's install records reach the store gathered, in one
    // `commit_each`: n1's fails there, the others are written.
    let is_n1 = move |b: &duffy_core::Batch| {
        b.nodes.len() == 1 && b.nodes[0].node.id == n1 && b.nodes[0].event.cause == CauseKind::InstallStarted
    };
    let mem = farm.mem.clone();
    store.expect_commit_each().withf(move |bs| bs.iter().any(is_n1)).times(1).returning(move |bs| {
        bs.into_iter()
            .map(|b| if is_n1(&b) { Err(CommitError::Store(disk_error("writing n1"))) } else { now(mem.commit(b)) })
            .collect()
    });
    answer_from(&mut store, &farm.mem, &calls, &[]);
    let store = Arc::new(store);
    let mut installer = MockInstaller::new();
    let mut seq = Sequence::new();
    for host in ["n2.sim.duffy", "n1.sim.duffy"] {
        installer
            .expect_install()
            .withf(move |n, _| n.hostname == host)
            .times(1)
            .in_sequence(&mut seq)
            .returning(|_, _| Ok(Installed::default()));
    }
    let installer = Arc::new(installer);
    let engine = Engine::builder(store.clone(), Arc::new(MockPowerController::new()), installer.clone(), clock_at(T0))
        .policy(policy())
        .build()
        .unwrap();
    let mut reconciler = engine.reconciler();
    drop(engine);

    let err = futures::executor::block_on(reconciler.pass()).expect_err("n1's write failed");
    assert_eq!(err.to_string(), "writing n1: disk I/O error");
    assert_eq!(reconciler.in_flight(), 1, "n2's install runs all the same");
    futures::executor::block_on(reconciler.drain());
    let nodes = farm.nodes();
    assert_eq!((nodes[0].state, nodes[1].state), (NodeState::Active, NodeState::Ready));

    let report = futures::executor::block_on(reconciler.pass()).expect("the store is back");
    assert_eq!(report.installs_started, 1);
    futures::executor::block_on(reconciler.drain());
    assert!(farm.nodes().iter().all(|n| n.state == NodeState::Ready));
    drop(reconciler);
    calls.take();
    last(store).checkpoint();
    last(installer).checkpoint();
}

/// A store error while looking a key up reaches the caller, and is not
/// remembered as "unknown key": the next request asks the store again and
/// gets in, and the one after is answered from memory.
#[test]
fn authenticate_reports_a_store_error_and_does_not_remember_it() {
    let farm = Farm::new(1, 1);
    let record = farm.key.clone();
    let hash = duffy_core::hash_api_key("ci-key");
    let mut store = MockStore::new();
    let mut seq = Sequence::new();
    store
        .expect_api_key_by_hash()
        .with(eq(hash))
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_| Err(disk_error("reading API keys")));
    store
        .expect_api_key_by_hash()
        .with(eq(hash))
        .times(1)
        .in_sequence(&mut seq)
        .returning(move |_| Ok(Some(record.clone())));
    // A store one process uses: keys change only through this engine.
    store.expect_key_generation().return_const(0u64);
    let store = Arc::new(store);
    let engine = engine(store.clone(), MockPowerController::new(), MockInstaller::new(), clock_at(T0));

    let err = futures::executor::block_on(engine.authenticate("ci-key")).expect_err("the store failed");
    assert!(matches!(err, EngineError::Store(_)), "{err:?}");
    assert_eq!(err.to_string(), "reading API keys: disk I/O error");
    for _ in 0..2 {
        let who = futures::executor::block_on(engine.authenticate("ci-key")).expect("the store is back");
        assert_eq!(who, farm.who());
    }
    drop(engine);
    last(store).checkpoint();
}

/// While paused, the warm pool is powered down. A BMC that fails to power
/// one machine off does not stop the others, is not retried, and the
/// machine is recorded as retired all the same (the periodic power check
/// notices a machine left on).
#[test]
fn a_failed_power_off_during_a_pause_does_not_stop_the_others() {
    let farm = Farm::new(3, 3);
    farm.all_ready();
    now(farm.mem.set_paused(true)).unwrap();
    let mut power = MockPowerController::new();
    power
        .expect_power()
        .withf(|n, a| n.hostname == "n2.sim.duffy" && *a == PowerAction::Off)
        .times(1)
        .returning(|_, _| Err(bmc_unreachable()));
    power.expect_power().withf(|_, a| *a == PowerAction::Off).times(2).returning(|_, _| Ok(()));
    let power = Arc::new(power);
    let engine = Engine::builder(farm.mem.clone(), power.clone(), Arc::new(MockInstaller::new()), clock_at(T0))
        .policy(policy())
        .build()
        .unwrap();
    let mut reconciler = engine.reconciler();
    drop(engine);

    let report = futures::executor::block_on(reconciler.pass()).expect("pass");
    assert_eq!(report.power_downs_started, 3);
    assert_eq!(report.installs_started, 0, "nothing is installed while paused");
    futures::executor::block_on(reconciler.drain());
    for n in farm.nodes() {
        assert_eq!((n.state, n.power), (NodeState::Active, PowerState::Off), "{}", n.hostname);
        assert_eq!(farm.history(&n).last(), Some(&CauseKind::PoweredDown));
    }
    // A second pass has nothing left to power down, and calls nothing.
    let report = futures::executor::block_on(reconciler.pass()).expect("pass");
    assert_eq!(report.power_downs_started, 0);
    drop(reconciler);
    last(power).checkpoint();
}

/// An installer whose installs take `took` on the engine's clock.
struct Slow {
    clock: ManualClock,
    took: Duration,
}

#[async_trait]
impl Installer for Slow {
    async fn install(&self, _node: &Node, _image: &PoolKey) -> Result<Installed, InstallError> {
        let until = self.clock.now().plus(self.took);
        self.clock.sleep_until(until).await;
        Ok(Installed::default())
    }
}

/// While a pass waits for the store, the installs already running go on:
/// an install that finishes then records its result at once, not after
/// the pass (under load, a pass waits for several reads, and installs that
/// stood still meanwhile let a busy pool run dry). The pass itself still
/// counts the node as driven: nothing is started twice.
#[test]
fn installs_go_on_while_a_pass_waits_for_the_store() {
    let farm = Farm::new(1, 1);
    let (open, gate) = futures::channel::oneshot::channel::<()>();
    let gate = gate.shared();
    let targets_read = Arc::new(AtomicUsize::new(0));
    let reads = targets_read.clone();
    // The second pass's read of the pool targets waits until the test
    // opens the gate.
    let store = Arc::new(duffy_core::testkit::InterceptStore::new(
        farm.mem.clone(),
        Arc::new(move |method| {
            let wait = method == "pool_targets" && reads.fetch_add(1, Ordering::SeqCst) == 1;
            let gate = gate.clone();
            Box::pin(async move {
                if wait {
                    let _ = gate.await;
                }
                Ok(())
            })
        }),
    ));
    let mut rig = Rig::new();
    let installer = Slow { clock: rig.clock.clone(), took: Duration::from_secs(30) };
    let engine = Engine::builder(
        store.clone(),
        Arc::new(MockPowerController::new()),
        Arc::new(installer),
        Arc::new(rig.clock.clone()),
    )
    .policy(Policy { tick: Duration::from_secs(5), ..policy() })
    .build()
    .unwrap();
    let reconciler = engine.reconciler();
    let (stop, stopped) = futures::channel::oneshot::channel::<()>();
    rig.spawn(async move { reconciler.run(stopped.map(|_| ())).await });
    assert_eq!(farm.nodes()[0].state, NodeState::Provisioning, "the first pass started the install");
    rig.advance(Duration::from_secs(5));
    assert_eq!(targets_read.load(Ordering::SeqCst), 2, "the second pass waits for the store");
    rig.advance(Duration::from_secs(30));
    assert_eq!(farm.nodes()[0].state, NodeState::Ready, "the install finished during the pass");
    open.send(()).unwrap();
    rig.advance(Duration::from_secs(5));
    let store: Arc<dyn Store> = farm.mem.clone();
    let installs = now(store.events(EventQuery::default()))
        .unwrap()
        .into_iter()
        .filter(|e| e.cause == CauseKind::InstallStarted)
        .count();
    assert_eq!(installs, 1, "one install, not a second for the node the pass saw Provisioning");
    assert_eq!(farm.nodes()[0].state, NodeState::Ready);
    stop.send(()).unwrap();
    rig.advance(Duration::from_secs(1));
    drop(engine);
}
