//! Model-based property test: random steps of concurrent API calls (get,
//! done, fail, foreign-key access, admin calls, pause/resume), clock jumps
//! and injected hardware failures against the engine and its reconciler.
//!
//! The store is the in-memory one seen through a yielding store, which
//! hands control back to the executor a seeded number of times around
//! every call, so the calls of a step (and the reconciler) interleave at
//! every `await` and the engine's read → compare-and-set windows race for
//! real. After every step the test checks the farm-wide invariants, the
//! event log's replay, that the farm still has exactly the machines it was
//! given, the rate limit against a model of it, every handed-out session
//! against what its owner did with it, and that no key touched another
//! key's session. At the end the farm is healed and every pool must reach
//! its target.
//!
//! 256 cases by default (`PROPTEST_CASES=n` for more); a failure is saved
//! to `proptest-regressions/model_proptest.txt` (commit it) and replayed
//! before new cases. The last tests run the same property over
//! deliberately broken stores and check that it fails.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod common;

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use common::{ClaimOutcome, ClaimRecord, Fault, Tap};
use duffy_core::sim::{SimConfig, SimFarm};
use duffy_core::testkit::conformance::{check_history, check_invariants};
use duffy_core::testkit::{Harness, InterceptStore, Yields};
use duffy_core::{
    Actor, Arch, EngineError, EventQuery, KeyId, NewNode, NodeRequest, NodeState, PoolKey, PoolTarget, Principal,
    RateLimit, SessionId, SessionState,
};
use proptest::prelude::*;
use proptest::test_runner::{FileFailurePersistence, TestError, TestRng, TestRunner};

/// Where failing cases are saved and replayed from.
const REGRESSIONS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/proptest-regressions/model_proptest.txt");

/// Small enough that the random steps run into it: three keys make about
/// one `get` per step between them, and a step moves the clock about two
/// and a half minutes on average.
const RATE_LIMIT: RateLimit = RateLimit { max: 2, window: Duration::from_secs(900) };

/// One API call.
#[derive(Debug, Clone)]
enum Op {
    Get {
        key: usize,
        pool: usize,
        count: u32,
    },
    Done {
        pick: usize,
    },
    Fail {
        pick: usize,
    },
    /// Another key than the owner tries to release the session.
    ForeignDone {
        pick: usize,
    },
    SetAdmin {
        node: usize,
    },
    Recover {
        node: usize,
    },
    Pause,
    Resume,
}

#[derive(Debug, Clone)]
enum Step {
    /// API calls started together, running concurrently.
    Calls(Vec<Op>),
    Advance {
        secs: u64,
    },
    InstallFailureRate {
        percent: u8,
    },
    BreakPrepare {
        node: usize,
        broken: bool,
    },
    HangInstall {
        node: usize,
        hung: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        10 => (0..3usize, 0..3usize, 1..4u32).prop_map(|(key, pool, count)| Op::Get { key, pool, count }),
        4 => (0..8usize).prop_map(|pick| Op::Done { pick }),
        2 => (0..8usize).prop_map(|pick| Op::Fail { pick }),
        1 => (0..8usize).prop_map(|pick| Op::ForeignDone { pick }),
        1 => (0..16usize).prop_map(|node| Op::SetAdmin { node }),
        1 => (0..16usize).prop_map(|node| Op::Recover { node }),
        1 => Just(Op::Pause),
        1 => Just(Op::Resume),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        14 => proptest::collection::vec(op(), 1..=4).prop_map(Step::Calls),
        6 => (1..1200u64).prop_map(|secs| Step::Advance { secs }),
        1 => prop_oneof![Just(0u8), Just(30), Just(100)].prop_map(|percent| Step::InstallFailureRate { percent }),
        1 => (0..16usize, any::<bool>()).prop_map(|(node, broken)| Step::BreakPrepare { node, broken }),
        1 => (0..16usize, any::<bool>()).prop_map(|(node, hung)| Step::HangInstall { node, hung }),
    ]
}

/// A seed (for the simulated farm, the session ids and the yields) and the
/// steps.
fn case() -> impl Strategy<Value = (u64, Vec<Step>)> {
    (any::<u64>(), proptest::collection::vec(step(), 1..60))
}

fn pools() -> Vec<PoolKey> {
    vec![
        PoolKey::new("7", Arch::X86_64, None),
        PoolKey::new("6", Arch::I386, None),
        PoolKey::new("8", Arch::Aarch64, None),
    ]
}

fn targets() -> Vec<PoolTarget> {
    let p = pools();
    vec![
        PoolTarget { pool: p[0].clone(), standby: 4 },
        PoolTarget { pool: p[1].clone(), standby: 2 },
        PoolTarget { pool: p[2].clone(), standby: 1 },
    ]
}

fn machines() -> Vec<NewNode> {
    let mut m = SimFarm::machines(13);
    for (i, arm) in [13usize, 14, 15].into_iter().enumerate() {
        let mut n = NewNode::new(format!("arm{arm}.sim.duffy"), Arch::Aarch64);
        // Two of the three ARM machines are of the pool's default flavor.
        n.flavor = if i < 2 { Some("tiny".into()) } else { Some("large".into()) };
        m.push(n);
    }
    m
}

fn policy() -> duffy_core::Policy {
    duffy_core::Policy {
        lease: Duration::from_secs(3600),
        fail_hold: Duration::from_secs(2 * 3600),
        max_concurrent_installs: 4,
        install_timeout: Duration::from_secs(600),
        install_attempts: 2,
        install_backoff: Duration::from_secs(30),
        failed_retry_after: Some(Duration::from_secs(3600)),
        prepare_timeout: Duration::from_secs(60),
        fail_cap: Some(3),
        rate_limit: Some(RATE_LIMIT),
        tick: Duration::from_secs(300),
        ..duffy_core::Policy::default()
    }
}

/// What a handed-out session must be, given what its owner did with it.
/// Only its owner ends a Prod session; the reconciler may end a Fail one
/// when its hold runs out.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Expect {
    /// Delivered with these hosts, not released or failed since.
    Prod(Vec<String>),
    /// Failed by its owner: Fail, or Done once the hold ran out.
    Fail,
    /// Released by its owner.
    Done,
}

impl Expect {
    fn rank(&self) -> u8 {
        match self {
            Expect::Prod(_) => 0,
            Expect::Fail => 1,
            Expect::Done => 2,
        }
    }
}

/// What the test knows from the answers it got.
#[derive(Debug, Default)]
struct Model {
    /// Sessions handed out, in order: (key index, ssid).
    handed_out: Vec<(usize, String)>,
    /// What each of them must be now.
    expect: HashMap<String, Expect>,
    /// `get_nodes` answers `RateLimited`, per key index.
    rate_limited: [u32; 3],
}

impl Model {
    /// Records what an owner did. Concurrent calls on one session may
    /// report back in another order than they took effect, so a session
    /// only ever moves forward (Prod, Fail, Done).
    fn owner_did(&mut self, sid: &str, to: Expect) {
        match self.expect.get(sid) {
            Some(cur) if cur.rank() >= to.rank() => {}
            _ => {
                self.expect.insert(sid.to_string(), to);
            }
        }
    }
}

/// The store stack under test and how it is broken, if at all.
#[derive(Debug, Clone, Copy)]
struct Variant {
    fault: Fault,
    /// Yields around each store call: 0 to this many.
    max_yields: u32,
}

/// The real stack: the in-memory store, yielding, no fault.
const REAL: Variant = Variant { fault: Fault::None, max_yields: 3 };

struct World {
    h: Harness,
    tap: Arc<Tap>,
    yielding: Arc<Yields>,
    /// The three user keys: key 0 of project "small" (quota 3); keys 1 and
    /// 2 of project "big".
    keys: Vec<Principal>,
    admin: Principal,
    model: Rc<RefCell<Model>>,
    /// The event log is checked up to here.
    events_checked: u64,
}

impl World {
    fn new(seed: u64, variant: Variant) -> World {
        let sim = SimConfig { seed, ..SimConfig::default() };
        let mut tap = None;
        let mut h = Harness::with_store(policy(), sim, machines(), &targets(), |mem| {
            let t = Arc::new(Tap::new(mem, variant.fault));
            let (y, yields) = InterceptStore::yielding(t.clone(), seed ^ 0x9e37_79b9_7f4a_7c15, variant.max_yields);
            tap = Some((t, yields));
            Arc::new(y)
        });
        let (tap, yielding) = tap.expect("with_store made the stack");
        let keys = [h.key("small", Some(3), false), h.key("big", None, false), h.key("big", None, false)];
        let admin_key = h.key("ops", None, true);
        let mut auth = |key: String| {
            let engine = h.engine.clone();
            h.block_on(async move { engine.authenticate(&key).await.expect("known key") })
        };
        let keys: Vec<Principal> = keys.into_iter().map(&mut auth).collect();
        let admin = auth(admin_key);
        // Start with warm pools, as a running farm has.
        h.advance(Duration::from_secs(900));
        World { h, tap, yielding, keys, admin, model: Rc::new(RefCell::new(Model::default())), events_checked: 0 }
    }

    fn hostname(i: usize) -> String {
        let m = machines();
        m[i % m.len()].hostname.clone()
    }

    fn pick(&self, pick: usize) -> Option<(usize, String)> {
        let m = self.model.borrow();
        m.handed_out.get(pick % m.handed_out.len().max(1)).cloned()
    }

    fn apply(&mut self, step: &Step) {
        match step.clone() {
            Step::Calls(ops) => {
                for op in ops {
                    self.start(op);
                }
            }
            Step::Advance { secs } => self.h.advance(Duration::from_secs(secs)),
            Step::InstallFailureRate { percent } => {
                self.h.farm.configure(|c| c.install_failure_rate = f64::from(percent) / 100.0)
            }
            Step::BreakPrepare { node, broken } => self.h.farm.break_prepare(&Self::hostname(node), broken),
            Step::HangInstall { node, hung } => self.h.farm.hang_install(&Self::hostname(node), hung),
        }
        self.h.run();
    }

    /// Spawns one call; it runs when the step's calls are run together.
    fn start(&mut self, op: Op) {
        let engine = self.h.engine.clone();
        let model = self.model.clone();
        match op {
            Op::Get { key, pool, count } => {
                let who = self.keys[key].clone();
                let p = pools()[pool].clone();
                let req =
                    NodeRequest { release: Some(p.release), arch: Some(p.arch), count: Some(count), flavor: None };
                self.h.spawn(async move {
                    match engine.get_nodes(&who, &req).await {
                        Ok(alloc) => {
                            assert_eq!(alloc.hosts.len(), count as usize);
                            let mut m = model.borrow_mut();
                            m.handed_out.push((key, alloc.session.0.clone()));
                            m.expect.insert(alloc.session.0, Expect::Prod(alloc.hosts));
                        }
                        Err(EngineError::RateLimited { .. }) => model.borrow_mut().rate_limited[key] += 1,
                        Err(
                            EngineError::InsufficientNodes { .. }
                            | EngineError::QuotaExceeded { .. }
                            | EngineError::PreparationFailed { .. }
                            | EngineError::ProjectUnusable { .. }
                            | EngineError::Paused
                            | EngineError::InvalidRequest(_),
                        ) => {}
                        Err(e) => panic!("unexpected get_nodes error: {e}"),
                    }
                });
            }
            Op::Done { pick } | Op::Fail { pick } => {
                let Some((owner, sid)) = self.pick(pick) else { return };
                let who = self.keys[owner].clone();
                let is_done = matches!(op, Op::Done { .. });
                self.h.spawn(async move {
                    let r = if is_done { engine.done(&who, &sid).await } else { engine.fail(&who, &sid).await };
                    match r {
                        Ok(()) => model.borrow_mut().owner_did(&sid, if is_done { Expect::Done } else { Expect::Fail }),
                        Err(EngineError::SessionNotInProd { .. } | EngineError::FailCapExceeded { .. }) => {}
                        Err(e) => panic!("unexpected done/fail error: {e}"),
                    }
                });
            }
            Op::ForeignDone { pick } => {
                let Some((owner, sid)) = self.pick(pick) else { return };
                // Keys 1 and 2 share a project: even so, neither may touch
                // the other's sessions. (That nothing was written is
                // checked from the event log after the step.)
                let stranger = match owner {
                    0 => 1,
                    1 => 2,
                    _ => 1,
                };
                let who = self.keys[stranger].clone();
                self.h.spawn(async move {
                    let done = engine.done(&who, &sid).await;
                    assert!(matches!(done, Err(EngineError::InvalidSession)), "a stranger's done: {done:?}");
                    let fail = engine.fail(&who, &sid).await;
                    assert!(matches!(fail, Err(EngineError::InvalidSession)), "a stranger's fail: {fail:?}");
                });
            }
            Op::SetAdmin { node } | Op::Recover { node } => {
                let admin = self.admin.clone();
                let host = Self::hostname(node);
                let set = matches!(op, Op::SetAdmin { .. });
                self.h.spawn(async move {
                    let r =
                        if set { engine.set_admin(&admin, &host).await } else { engine.recover(&admin, &host).await };
                    match r {
                        Ok(_) | Err(EngineError::Transition(_)) => {}
                        Err(e) => panic!("unexpected admin error: {e}"),
                    }
                });
            }
            Op::Pause => {
                let admin = self.admin.clone();
                self.h.spawn(async move { engine.pause(&admin).await.expect("pause") });
            }
            Op::Resume => {
                let admin = self.admin.clone();
                self.h.spawn(async move {
                    match engine.resume(&admin).await {
                        Ok(()) | Err(EngineError::NotPaused) => {}
                        Err(e) => panic!("unexpected resume error: {e}"),
                    }
                });
            }
        }
    }

    /// Everything the test can check once every task is waiting for the
    /// clock. Reads go through the same store stack as the engine's (a
    /// broken variant's reads are what is checked); nothing else runs
    /// meanwhile, so they see one state.
    fn check(&mut self) {
        let store = self.h.dyn_store();
        let tap = self.tap.clone();
        let model = self.model.clone();
        let keys: Vec<KeyId> = self.keys.iter().map(|p| p.key_id.expect("a key")).collect();
        let admin = self.admin.key_id.expect("a key");
        let after = self.events_checked;
        let now = duffy_core::Clock::now(&self.h.clock);
        let tick = policy().tick;
        self.events_checked = self.h.block_on(async move {
            if let Err(e) = check_invariants(&*store).await {
                panic!("invariants: {e}");
            }
            if let Err(e) = check_history(&*store).await {
                panic!("history: {e}");
            }

            // Exactly the machines added, each once: a store that loses or
            // invents a node is caught here.
            let mut hosts: Vec<String> = store.nodes().await.expect("nodes").into_iter().map(|n| n.hostname).collect();
            hosts.sort();
            let mut want: Vec<String> = machines().into_iter().map(|n| n.hostname).collect();
            want.sort();
            assert_eq!(hosts, want, "no node lost or invented");

            let claims = tap.claims();
            if let Err(e) = check_rate_limit(&claims, RATE_LIMIT) {
                panic!("rate limit: {e}");
            }
            if let Some(i) = claims.iter().position(|c| c.outcome == ClaimOutcome::Claimed && c.paused_after) {
                panic!("claim {i} took effect while the service was paused");
            }
            for (i, k) in keys.iter().enumerate() {
                let refused =
                    claims.iter().filter(|c| c.key == *k && c.outcome == ClaimOutcome::RateLimited).count() as u32;
                let answered = model.borrow().rate_limited[i];
                assert_eq!(
                    answered, refused,
                    "key {i} was told RateLimited {answered} times; the store refused {refused}"
                );
            }

            // Every handed-out session is what its owner's calls made it.
            let expect = model.borrow().expect.clone();
            for (sid, want) in expect {
                let s =
                    store.session(&SessionId(sid.clone())).await.expect("read").expect("a handed-out session exists");
                match want {
                    // Not released: Prod until its lifetime runs out, then
                    // ended by the reconciler (within two of its ticks).
                    Expect::Prod(_) if s.state == SessionState::Done => {
                        let expiry = s.expires_at.expect("a delivered session has an expiry");
                        assert!(expiry <= now, "session {sid} ended before its expiry {expiry}");
                        assert_eq!(s.end_reason.as_deref(), Some("lifetime expired; nodes reclaimed"), "session {sid}");
                    }
                    Expect::Prod(hosts) => {
                        assert_eq!(s.state, SessionState::Prod, "session {sid} was handed out and not released");
                        let expiry = s.expires_at.expect("a delivered session has an expiry");
                        assert!(now < expiry.plus(tick * 2), "session {sid} outlived its expiry {expiry} (now {now})");
                        let mut names = Vec::new();
                        for id in &s.nodes {
                            names.push(store.node(*id).await.expect("read").expect("exists").hostname);
                        }
                        assert_eq!(names, hosts, "session {sid} holds the hosts it was given");
                    }
                    Expect::Fail => assert!(
                        matches!(s.state, SessionState::Fail | SessionState::Done),
                        "session {sid} was failed by its owner but is {}",
                        s.state.as_str()
                    ),
                    Expect::Done => assert_eq!(s.state, SessionState::Done, "session {sid} was released"),
                }
            }

            // A key's writes only ever touch its own sessions.
            let events = store.events(EventQuery { after_seq: after, ..EventQuery::default() }).await.expect("events");
            let mut owners: HashMap<SessionId, KeyId> = HashMap::new();
            for e in &events {
                let (Actor::Key(k), Some(sid)) = (&e.actor, &e.session) else { continue };
                if *k == admin {
                    continue;
                }
                let owner = match owners.get(sid) {
                    Some(o) => *o,
                    None => {
                        let o = store.session(sid).await.expect("read").expect("an event's session exists").key_id;
                        owners.insert(sid.clone(), o);
                        o
                    }
                };
                assert_eq!(owner, *k, "event {} by key {k} touched session {sid} of key {owner}", e.seq);
            }
            events.last().map_or(after, |e| e.seq)
        });
    }

    /// Heals the farm and checks that, with enough healthy hardware, every
    /// pool reaches its target.
    fn heal_and_converge(&mut self) {
        self.h.farm.configure(|c| c.install_failure_rate = 0.0);
        for i in 0..machines().len() {
            let host = Self::hostname(i);
            self.h.farm.hang_install(&host, false);
            self.h.farm.break_prepare(&host, false);
        }
        let engine = self.h.engine.clone();
        let admin = self.admin.clone();
        let owners: Vec<(Principal, String)> =
            self.model.borrow().handed_out.iter().map(|(k, sid)| (self.keys[*k].clone(), sid.clone())).collect();
        let store = self.h.dyn_store();
        let model = self.model.clone();
        self.h.spawn(async move {
            let _ = engine.resume(&admin).await;
            for (who, sid) in owners {
                if engine.done(&who, &sid).await.is_ok() {
                    model.borrow_mut().owner_did(&sid, Expect::Done);
                }
            }
            for n in store.nodes().await.expect("nodes") {
                if matches!(n.state, NodeState::Reserved | NodeState::Failed) && n.session.is_none() {
                    // The reconciler runs meanwhile: a Failed node whose
                    // cool-down ran out may have gone back on its own.
                    match engine.recover(&admin, &n.hostname).await {
                        Ok(_) | Err(EngineError::Transition(_)) => {}
                        Err(e) => panic!("recover {}: {e}", n.hostname),
                    }
                }
            }
        });
        // Hung installs run into their deadline, then everything refills.
        self.h.advance(Duration::from_secs(4 * 3600));
        let store = self.h.dyn_store();
        let counts = self.h.block_on(async move { store.ready_counts().await.expect("counts") });
        for t in targets() {
            let ready = counts.iter().find(|(p, _)| *p == t.pool).map(|(_, c)| *c).unwrap_or(0);
            assert!(ready >= t.standby, "pool {} has {ready} Ready, target {}", t.pool, t.standby);
        }
    }
}

/// The rate limit as a model: replaying the claims in the order they took
/// effect, a claim is refused for the rate limit exactly when its key
/// already created `max` sessions in the window before it (the store
/// checks the rate limit first, so any other answer means the check
/// passed). And, counted independently, no key ever has more than `max`
/// sessions in any window.
fn check_rate_limit(claims: &[ClaimRecord], limit: RateLimit) -> Result<(), String> {
    for (i, c) in claims.iter().enumerate() {
        let since = c.now.minus(limit.window);
        let recent = claims[..i]
            .iter()
            .filter(|p| p.key == c.key && p.outcome == ClaimOutcome::Claimed && p.now > since)
            .count() as u32;
        match (c.outcome, recent >= limit.max) {
            (ClaimOutcome::RateLimited, false) => {
                return Err(format!(
                    "claim {i} of key {} was refused for the rate limit with {recent} sessions in the window (limit {})",
                    c.key, limit.max
                ));
            }
            (ClaimOutcome::Claimed | ClaimOutcome::Refused, true) => {
                return Err(format!(
                    "claim {i} of key {} was not refused though the key created {recent} sessions in the window (limit {})",
                    c.key, limit.max
                ));
            }
            _ => {}
        }
    }
    let mut created: HashMap<KeyId, Vec<duffy_core::Timestamp>> = HashMap::new();
    for c in claims.iter().filter(|c| c.outcome == ClaimOutcome::Claimed) {
        let times = created.entry(c.key).or_default();
        times.push(c.now);
        let in_window = times.iter().filter(|t| **t > c.now.minus(limit.window)).count();
        if in_window > limit.max as usize {
            return Err(format!("key {} created {in_window} sessions within {:?}", c.key, limit.window));
        }
    }
    Ok(())
}

/// One case: the steps, a check after each, then healing.
fn run_case(seed: u64, steps: &[Step], variant: Variant) {
    let mut w = World::new(seed, variant);
    w.check();
    for s in steps {
        w.apply(s);
        w.check();
    }
    w.heal_and_converge();
    w.check();
    if variant.max_yields > 0 {
        // The operations really were interleaved (a stack without the
        // yielding store would pass without testing any race).
        assert!(w.yielding.made() > 0, "the store never yielded");
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        // `cases` is proptest's default, 256, unless PROPTEST_CASES says otherwise.
        max_shrink_iters: 1000,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(REGRESSIONS))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn engine_keeps_invariants_under_random_interleavings((seed, steps) in case()) {
        run_case(seed, &steps, REAL);
    }
}

/// Runs the property over `variant` with a fixed generator (the same
/// cases every run) and returns why it failed; panics if it did not.
fn property_fails_over(variant: Variant, cases: u32) -> String {
    let config = ProptestConfig {
        cases,
        max_shrink_iters: 0,
        // A broken variant's failures are expected, not regressions.
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let mut runner = TestRunner::new_with_rng(config.clone(), TestRng::deterministic_rng(config.rng_algorithm));
    let r = runner.run(&case(), |(seed, steps)| {
        run_case(seed, &steps, variant);
        Ok(())
    });
    match r {
        Err(TestError::Fail(why, _)) => why.to_string(),
        other => panic!("the model test did not catch {variant:?} in {cases} cases: {other:?}"),
    }
}

#[test]
fn catches_a_store_that_claims_while_paused() {
    let why = property_fails_over(Variant { fault: Fault::ClaimWhilePaused, ..REAL }, 64);
    assert!(why.contains("while the service was paused"), "{why}");
}

#[test]
fn catches_a_store_that_ignores_the_rate_limit() {
    let why = property_fails_over(Variant { fault: Fault::IgnoreRateLimit, ..REAL }, 64);
    assert!(why.contains("rate limit") && why.contains("was not refused"), "{why}");
}

#[test]
fn catches_a_store_that_loses_a_node() {
    let why = property_fails_over(Variant { fault: Fault::LoseLastAddedNode, ..REAL }, 4);
    assert!(why.contains("no node lost or invented"), "{why}");
}

#[test]
fn catches_a_second_session_written_over_a_claim() {
    let why = property_fails_over(Variant { fault: Fault::SecondSessionOverClaim, ..REAL }, 16);
    assert!(why.contains("listed by two live sessions"), "{why}");
}

#[test]
fn catches_a_claim_that_drops_a_node_write() {
    let why = property_fails_over(Variant { fault: Fault::ClaimDropsNodeWrite, ..REAL }, 16);
    assert!(why.contains("invariants:"), "{why}");
}
