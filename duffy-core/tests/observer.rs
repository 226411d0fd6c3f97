//! The reconciler's observer, the seam the service's metrics hang on: it
//! hears every pass start and end, every failed install attempt with its
//! reason, and every finished operation, and changes nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::sync::{Arc, Mutex};
use std::time::Duration;

use duffy_core::mem::MemStore;
use duffy_core::sim::{SimConfig, SimFarm};
use duffy_core::testkit::ManualClock;
use duffy_core::{
    Actor, Arch, AttemptFailure, Clock, Engine, EngineError, Node, NodeState, OpDone, OpOutcome, PassReport, Policy,
    PoolKey, PoolTarget, ReconcilerObserver, Store, Timestamp,
};
use futures::executor::LocalPool;
use futures::task::LocalSpawnExt;

/// Writes down what it hears, one line each.
#[derive(Default)]
struct Recorder(Mutex<Vec<String>>);

impl Recorder {
    fn push(&self, line: String) {
        self.0.lock().unwrap().push(line);
    }

    fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

impl ReconcilerObserver for Recorder {
    fn pass_started(&self) {
        self.push("pass".into());
    }

    fn pass_finished(&self, result: Result<&PassReport, &EngineError>) {
        let r = result.expect("passes over a healthy store succeed");
        self.push(format!("passed: {} installs, {} stale", r.installs_started, r.stale_installs_started));
    }

    fn install_attempt_failed(&self, node: &Node, why: AttemptFailure, last: bool) {
        self.push(format!("attempt failed: {} {why:?} last={last}", node.hostname));
    }

    fn operation_finished(&self, done: &OpDone) {
        if done.install {
            let outcome = match &done.outcome {
                OpOutcome::Installed => "installed",
                OpOutcome::InstallFailed(_) => "failed",
                other => panic!("unexpected install outcome {other:?}"),
            };
            self.push(format!("install finished: {} {outcome}", done.node));
        }
    }
}

#[test]
fn the_observer_hears_passes_failed_attempts_and_finished_installs() {
    let clock = ManualClock::new(Timestamp::from_millis(1_767_225_600_000));
    let sim = SimConfig {
        install_min: Duration::from_secs(20),
        install_max: Duration::from_secs(20),
        ..SimConfig::default()
    };
    let farm = Arc::new(SimFarm::new(Arc::new(clock.clone()), sim));
    farm.break_install("n1.sim.duffy", true);
    farm.hang_install("n2.sim.duffy", true);
    let policy = Policy {
        rate_limit: None,
        install_timeout: Duration::from_secs(60),
        install_attempts: 2,
        install_backoff: Duration::from_secs(10),
        failed_retry_after: None,
        tick: Duration::from_secs(5),
        ..Policy::default()
    };
    let store = Arc::new(MemStore::new());
    let engine = Engine::builder(store.clone(), farm.clone(), farm.clone(), Arc::new(clock.clone()))
        .policy(policy)
        .build()
        .unwrap();
    let recorder = Arc::new(Recorder::default());
    let mut pool = LocalPool::new();
    let pool_key = PoolKey::new("7", Arch::X86_64, None);
    pool.run_until(async {
        store.add_nodes(SimFarm::machines(3), Actor::Operator, clock.now()).await.unwrap();
        engine.set_pool_targets(&[PoolTarget { pool: pool_key, standby: 3 }]).await.unwrap();
    });
    let reconciler = engine.reconciler().observed_by(recorder.clone());
    pool.spawner().spawn_local(reconciler.run(futures::future::pending())).unwrap();
    // Five minutes, deadline by deadline.
    let end = clock.now().plus(Duration::from_secs(300));
    loop {
        pool.run_until_stalled();
        match clock.next_deadline() {
            Some(t) if t <= end => clock.set(t),
            _ => break,
        }
    }

    let lines = recorder.lines();
    // Every pass is reported as it starts and as it ends, in turn.
    let passes: Vec<&String> = lines.iter().filter(|l| l.starts_with("pass")).collect();
    assert!(passes.len() >= 4, "{lines:#?}");
    for pair in passes.chunks(2) {
        assert_eq!(pair[0], "pass", "{lines:#?}");
        assert!(pair.get(1).is_none_or(|l| l.starts_with("passed: ")), "{lines:#?}");
    }
    assert_eq!(passes[1], "passed: 3 installs, 0 stale", "{lines:#?}");
    // Each failed attempt with its reason; the second is the last.
    let failed: Vec<&str> = lines.iter().filter(|l| l.starts_with("attempt")).map(String::as_str).collect();
    assert_eq!(
        failed,
        [
            "attempt failed: n1.sim.duffy Installer last=false",
            "attempt failed: n1.sim.duffy Installer last=true",
            "attempt failed: n2.sim.duffy TimedOut last=false",
            "attempt failed: n2.sim.duffy TimedOut last=true",
        ],
        "{lines:#?}"
    );
    let finished: Vec<&str> = lines.iter().filter(|l| l.starts_with("install finished")).map(String::as_str).collect();
    assert_eq!(finished.len(), 3, "{lines:#?}");
    assert_eq!(finished.iter().filter(|l| l.ends_with(" installed")).count(), 1, "{lines:#?}");
    assert_eq!(finished.iter().filter(|l| l.ends_with(" failed")).count(), 2, "{lines:#?}");
    // And it changed nothing: the farm is where the reconciler put it.
    let nodes = pool.run_until(async { store.nodes().await.unwrap() });
    let states: Vec<NodeState> = nodes.iter().map(|n| n.state).collect();
    assert_eq!(states, [NodeState::Failed, NodeState::Failed, NodeState::Ready]);
}
