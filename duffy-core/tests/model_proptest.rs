//! Model-based property test: random interleavings of get/done/fail, admin
//! calls, reconciler steps, clock jumps and injected failures against the
//! engine, with the farm's invariants checked after every step.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use duffy_core::testkit::conformance::{check_history, check_invariants};
use duffy_core::testkit::{Harness, SimConfig, SimFarm};
use duffy_core::{Arch, EngineError, NewNode, NodeRequest, NodeState, PoolKey, PoolTarget, Principal, SessionState};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Action {
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

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        10 => (0..3usize, 0..3usize, 1..4u32).prop_map(|(key, pool, count)| Action::Get { key, pool, count }),
        4 => (0..8usize).prop_map(|pick| Action::Done { pick }),
        2 => (0..8usize).prop_map(|pick| Action::Fail { pick }),
        1 => (0..8usize).prop_map(|pick| Action::ForeignDone { pick }),
        1 => (0..16usize).prop_map(|node| Action::SetAdmin { node }),
        1 => (0..16usize).prop_map(|node| Action::Recover { node }),
        1 => Just(Action::Pause),
        1 => Just(Action::Resume),
        6 => (1..1200u64).prop_map(|secs| Action::Advance { secs }),
        1 => prop_oneof![Just(0u8), Just(30), Just(100)].prop_map(|percent| Action::InstallFailureRate { percent }),
        1 => (0..16usize, any::<bool>()).prop_map(|(node, broken)| Action::BreakPrepare { node, broken }),
        1 => (0..16usize, any::<bool>()).prop_map(|(node, hung)| Action::HangInstall { node, hung }),
    ]
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
        rate_limit: None,
        tick: Duration::from_secs(300),
        ..duffy_core::Policy::default()
    }
}

type Sessions = Rc<RefCell<Vec<(usize, String)>>>;

struct World {
    h: Harness,
    keys: Vec<String>,
    admin: Principal,
    sessions: Sessions,
    node_count: usize,
}

impl World {
    fn new(seed: u64) -> World {
        let sim = SimConfig { seed, ..SimConfig::default() };
        let mut h = Harness::new(policy(), sim, machines(), &targets());
        // Project "small" has a quota of 3 nodes; two keys share project "big".
        let keys = vec![h.key("small", Some(3), false), h.key("big", None, false), h.key("big", None, false)];
        let admin_key = h.key("ops", None, true);
        let engine = h.engine.clone();
        let admin = h.block_on(async move { engine.authenticate(&admin_key).await.expect("admin key") });
        // Start with warm pools, as a running farm has.
        h.advance(Duration::from_secs(900));
        let node_count = machines().len();
        World { h, keys, admin, sessions: Rc::new(RefCell::new(Vec::new())), node_count }
    }

    fn hostname(i: usize) -> String {
        let m = machines();
        m[i % m.len()].hostname.clone()
    }

    fn principal(&mut self, key: usize) -> Principal {
        let engine = self.h.engine.clone();
        let k = self.keys[key].clone();
        self.h.block_on(async move { engine.authenticate(&k).await.expect("known key") })
    }

    fn apply(&mut self, a: &Action) {
        let engine = self.h.engine.clone();
        match a.clone() {
            Action::Get { key, pool, count } => {
                let who = self.principal(key);
                let sessions = self.sessions.clone();
                let p = pools()[pool].clone();
                let req =
                    NodeRequest { release: Some(p.release), arch: Some(p.arch), count: Some(count), flavor: None };
                self.h.spawn(async move {
                    match engine.get_nodes(&who, &req).await {
                        Ok(alloc) => {
                            assert_eq!(alloc.hosts.len(), count as usize);
                            sessions.borrow_mut().push((key, alloc.session.0));
                        }
                        Err(
                            EngineError::InsufficientNodes { .. }
                            | EngineError::QuotaExceeded { .. }
                            | EngineError::PreparationFailed { .. }
                            | EngineError::Paused
                            | EngineError::InvalidRequest(_),
                        ) => {}
                        Err(e) => panic!("unexpected get_nodes error: {e}"),
                    }
                });
            }
            Action::Done { pick } | Action::Fail { pick } => {
                let list = self.sessions.borrow().clone();
                let Some((owner, sid)) = list.get(pick % list.len().max(1)).cloned() else { return };
                let who = self.principal(owner);
                let is_done = matches!(a, Action::Done { .. });
                self.h.spawn(async move {
                    let r = if is_done { engine.done(&who, &sid).await } else { engine.fail(&who, &sid).await };
                    match r {
                        Ok(()) | Err(EngineError::SessionNotInProd { .. } | EngineError::FailCapExceeded { .. }) => {}
                        Err(e) => panic!("unexpected done/fail error: {e}"),
                    }
                });
            }
            Action::ForeignDone { pick } => {
                let list = self.sessions.borrow().clone();
                let Some((owner, sid)) = list.get(pick % list.len().max(1)).cloned() else { return };
                // Keys 1 and 2 share a project: even so, neither may touch the other's sessions.
                let stranger = match owner {
                    0 => 1,
                    1 => 2,
                    _ => 1,
                };
                let who = self.principal(stranger);
                let store = self.h.dyn_store();
                self.h.spawn(async move {
                    let before = store.session(&duffy_core::SessionId(sid.clone())).await.expect("read");
                    assert!(matches!(engine.done(&who, &sid).await, Err(EngineError::InvalidSession)));
                    assert!(matches!(engine.fail(&who, &sid).await, Err(EngineError::InvalidSession)));
                    let after = store.session(&duffy_core::SessionId(sid)).await.expect("read");
                    assert_eq!(before.map(|s| s.version), after.map(|s| s.version), "a stranger changed nothing");
                });
            }
            Action::SetAdmin { node } | Action::Recover { node } => {
                let admin = self.admin.clone();
                let host = Self::hostname(node);
                let set = matches!(a, Action::SetAdmin { .. });
                self.h.spawn(async move {
                    let r =
                        if set { engine.set_admin(&admin, &host).await } else { engine.recover(&admin, &host).await };
                    match r {
                        Ok(_) | Err(EngineError::Transition(_)) => {}
                        Err(e) => panic!("unexpected admin error: {e}"),
                    }
                });
            }
            Action::Pause => {
                let admin = self.admin.clone();
                self.h.spawn(async move { engine.pause(&admin).await.expect("pause") });
            }
            Action::Resume => {
                let admin = self.admin.clone();
                self.h.spawn(async move {
                    match engine.resume(&admin).await {
                        Ok(()) | Err(EngineError::NotPaused) => {}
                        Err(e) => panic!("unexpected resume error: {e}"),
                    }
                });
            }
            Action::Advance { secs } => self.h.advance(Duration::from_secs(secs)),
            Action::InstallFailureRate { percent } => {
                self.h.farm.configure(|c| c.install_failure_rate = f64::from(percent) / 100.0)
            }
            Action::BreakPrepare { node, broken } => self.h.farm.break_prepare(&Self::hostname(node), broken),
            Action::HangInstall { node, hung } => self.h.farm.hang_install(&Self::hostname(node), hung),
        }
        self.h.run();
    }

    fn check(&mut self) {
        let store = self.h.dyn_store();
        let n = self.node_count;
        self.h.block_on(async move {
            check_invariants(&*store).await.expect("invariants");
            check_history(&*store).await.expect("history");
            let nodes = store.nodes().await.expect("nodes");
            assert_eq!(nodes.len(), n, "no node lost or invented");
            // Every Deployed node belongs to exactly one live Prod session.
            let live = store.live_sessions().await.expect("live");
            for node in nodes.iter().filter(|x| x.state == NodeState::Deployed) {
                let holders: Vec<_> = live
                    .iter()
                    .filter(|s| s.nodes.contains(&node.id) && node.session.as_ref() == Some(&s.id))
                    .collect();
                assert_eq!(holders.len(), 1, "{} held by {} sessions", node.hostname, holders.len());
                assert_eq!(holders[0].state, SessionState::Prod);
            }
        });
    }

    /// Heals the farm and checks that, with enough healthy hardware, every
    /// pool reaches its target.
    fn heal_and_converge(&mut self) {
        self.h.farm.configure(|c| c.install_failure_rate = 0.0);
        for i in 0..self.node_count {
            let host = Self::hostname(i);
            self.h.farm.hang_install(&host, false);
            self.h.farm.break_prepare(&host, false);
        }
        let engine = self.h.engine.clone();
        let admin = self.admin.clone();
        let sessions = self.sessions.borrow().clone();
        let mut owners = Vec::new();
        for (key, sid) in sessions {
            owners.push((self.principal(key), sid));
        }
        let store = self.h.dyn_store();
        self.h.spawn(async move {
            let _ = engine.resume(&admin).await;
            for (who, sid) in owners {
                let _ = engine.done(&who, &sid).await;
            }
            for n in store.nodes().await.expect("nodes") {
                if matches!(n.state, NodeState::Reserved | NodeState::Failed) && n.session.is_none() {
                    engine.recover(&admin, &n.hostname).await.expect("recover");
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

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 64,
        max_shrink_iters: 2000,
        failure_persistence: Some(Box::new(proptest::test_runner::FileFailurePersistence::Off)),
        ..ProptestConfig::default()
    })]

    #[test]
    fn engine_keeps_invariants_under_random_interleavings(
        seed in any::<u64>(),
        actions in proptest::collection::vec(action(), 1..60),
    ) {
        let mut w = World::new(seed);
        w.check();
        for a in &actions {
            w.apply(a);
            w.check();
        }
        w.heal_and_converge();
        w.check();
    }
}
