//! The reconciler's behaviour in scenarios: retries with backoff then
//! Failed with the reason, install deadlines, cool-downs, fail holds,
//! pause/resume, and recovery of work a crash left half-done.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::time::Duration;

use duffy_core::sim::{SimConfig, SimFarm};
use duffy_core::testkit::Harness;
use duffy_core::testkit::conformance::{check_history, check_invariants};
use duffy_core::{
    Arch, CauseKind, Clock, EventQuery, NodeRequest, NodeState, Policy, PoolKey, PoolTarget, PowerState, SessionState,
};

fn pool() -> PoolKey {
    PoolKey::new("7", Arch::X86_64, None)
}

fn policy() -> Policy {
    Policy {
        rate_limit: None,
        install_timeout: Duration::from_secs(60),
        install_attempts: 3,
        install_backoff: Duration::from_secs(10),
        failed_retry_after: None,
        tick: Duration::from_secs(5),
        ..Policy::default()
    }
}

fn harness(machines: usize, standby: u32, policy: Policy) -> Harness {
    let sim = SimConfig {
        install_min: Duration::from_secs(20),
        install_max: Duration::from_secs(20),
        ..SimConfig::default()
    };
    Harness::new(policy, sim, SimFarm::machines(machines), &[PoolTarget { pool: pool(), standby }])
}

fn nodes(h: &mut Harness) -> Vec<duffy_core::Node> {
    let store = h.dyn_store();
    h.block_on(async move { store.nodes().await.unwrap() })
}

fn history(h: &mut Harness, node: duffy_core::NodeId) -> Vec<duffy_core::Event> {
    let store = h.dyn_store();
    h.block_on(async move { store.events(EventQuery { node: Some(node), ..EventQuery::default() }).await.unwrap() })
}

fn checks(h: &mut Harness) {
    let store = h.dyn_store();
    h.block_on(async move {
        check_invariants(&*store).await.unwrap();
        check_history(&*store).await.unwrap();
    });
}

#[test]
fn a_broken_machine_is_retried_with_backoff_then_failed_with_the_reason() {
    let mut h = harness(2, 2, policy());
    h.farm.break_install("n1.sim.duffy", true);
    let started = h.clock.now();
    h.advance(Duration::from_secs(600));
    let n = nodes(&mut h);
    assert_eq!(n[0].state, NodeState::Failed);
    assert!(n[0].fail_reason.as_deref().unwrap().contains("failed after 3 attempts"), "{:?}", n[0].fail_reason);
    assert_eq!(n[0].hold_until, None, "no cool-down configured: waits for an operator");
    assert_eq!(n[1].state, NodeState::Ready);
    let ev = history(&mut h, n[0].id);
    let kinds: Vec<_> = ev.iter().map(|e| e.cause).collect();
    assert_eq!(
        kinds,
        vec![
            CauseKind::Added,
            CauseKind::InstallStarted,
            CauseKind::InstallAttemptFailed,
            CauseKind::InstallAttemptFailed,
            CauseKind::InstallFailed
        ]
    );
    // 20 s per attempt, then 10 s and 20 s of backoff.
    let t = |i: usize| ev[i].at.since(started).as_secs();
    assert_eq!((t(2), t(3), t(4)), (20, 50, 90), "attempts at 20 s, 10+20+20 = 50 s, 50+20+20 = 90 s");
    // The planner used another machine? There is none: the pool stays short.
    assert_eq!(h.farm.installs(), 4);
    checks(&mut h);
}

#[test]
fn a_hung_install_hits_its_deadline() {
    let p = Policy { install_attempts: 1, failed_retry_after: Some(Duration::from_secs(3600)), ..policy() };
    let mut h = harness(1, 1, p);
    h.farm.hang_install("n1.sim.duffy", true);
    h.advance(Duration::from_secs(59));
    assert_eq!(nodes(&mut h)[0].state, NodeState::Provisioning);
    h.advance(Duration::from_secs(2));
    let n = &nodes(&mut h)[0];
    assert_eq!(n.state, NodeState::Failed);
    assert!(n.fail_reason.as_deref().unwrap().contains("timed out after 60s"), "{:?}", n.fail_reason);
    // After the cool-down it is tried again, and now it works.
    h.farm.hang_install("n1.sim.duffy", false);
    h.advance(Duration::from_secs(3600 + 30));
    assert_eq!(nodes(&mut h)[0].state, NodeState::Ready);
    let kinds: Vec<_> = history(&mut h, n.id).iter().map(|e| e.cause).collect();
    assert!(kinds.contains(&CauseKind::HoldExpired));
    checks(&mut h);
}

#[test]
fn fail_holds_are_reclaimed_and_stale_nodes_reinstalled() {
    let p = Policy { fail_hold: Duration::from_secs(3600), reinstall_age: Duration::from_secs(7200), ..policy() };
    let mut h = harness(3, 2, p);
    h.advance(Duration::from_secs(60));
    let key = h.key("proj", None, false);
    let cell = h.get_nodes_later(&key, NodeRequest::default());
    h.advance(Duration::from_secs(1));
    let alloc = cell.borrow_mut().take().unwrap().unwrap();
    let engine = h.engine.clone();
    let sid = alloc.session.0.clone();
    h.block_on(async move {
        let who = engine.authenticate(&key).await.unwrap();
        engine.fail(&who, &sid).await.unwrap();
    });
    h.advance(Duration::from_secs(3599));
    let store = h.dyn_store();
    let s = alloc.session.clone();
    let st = h.block_on(async move { store.session(&s).await.unwrap().unwrap().state });
    assert_eq!(st, SessionState::Fail, "still held");
    // Reclaimed at the reconciler's next tick (5 s) after the hold ends.
    h.advance(Duration::from_secs(6));
    let store = h.dyn_store();
    let s = alloc.session.clone();
    let session = h.block_on(async move { store.session(&s).await.unwrap().unwrap() });
    assert_eq!(session.state, SessionState::Done);
    assert_eq!(session.end_reason.as_deref(), Some("fail hold expired; nodes reclaimed"));
    // Two hours after install every Ready node has been cycled.
    h.advance(Duration::from_secs(7200));
    for n in nodes(&mut h).iter().filter(|n| n.state == NodeState::Ready) {
        assert!(h.clock.now().since(n.installed_at.unwrap()) < Duration::from_secs(7200));
    }
    let reinstalls = nodes(&mut h)
        .iter()
        .map(|n| {
            history(&mut h, n.id).iter().filter(|e| e.detail.as_deref().is_some_and(|d| d.ends_with("(stale)"))).count()
        })
        .sum::<usize>();
    assert!(reinstalls >= 2, "stale nodes were reinstalled: {reinstalls}");
    checks(&mut h);
}

#[test]
fn pause_powers_the_pool_down_and_resume_refills_it() {
    let mut h = harness(4, 3, policy());
    h.advance(Duration::from_secs(60));
    let admin = h.key("ops", None, true);
    let engine = h.engine.clone();
    let a = admin.clone();
    h.block_on(async move {
        let who = engine.authenticate(&a).await.unwrap();
        engine.pause(&who).await.unwrap();
    });
    h.advance(Duration::from_secs(10));
    let n = nodes(&mut h);
    assert!(n.iter().all(|n| n.state == NodeState::Active), "{:?}", n.iter().map(|n| n.state).collect::<Vec<_>>());
    assert!(n.iter().all(|n| h.farm.power_of(&n.hostname) == PowerState::Off));
    h.advance(Duration::from_secs(600));
    assert!(nodes(&mut h).iter().all(|n| n.state == NodeState::Active), "nothing installed while paused");
    let engine = h.engine.clone();
    h.block_on(async move {
        let who = engine.authenticate(&admin).await.unwrap();
        engine.resume(&who).await.unwrap();
    });
    h.advance(Duration::from_secs(60));
    assert_eq!(nodes(&mut h).iter().filter(|n| n.state == NodeState::Ready).count(), 3);
    checks(&mut h);
}

#[test]
fn a_crash_mid_install_and_mid_allocation_is_recovered_on_restart() {
    let p = Policy { prepare_timeout: Duration::from_secs(30), ..policy() };
    let mut h = harness(6, 3, p.clone());
    h.advance(Duration::from_secs(30));
    assert_eq!(nodes(&mut h).iter().filter(|n| n.state == NodeState::Ready).count(), 3);
    // An allocation in the middle of preparing its nodes...
    h.farm.configure(|c| c.prepare_time = Duration::from_secs(10));
    let key = h.key("proj", None, false);
    let cell = h.get_nodes_later(&key, NodeRequest { count: Some(2), ..NodeRequest::default() });
    // ...and installs in the middle of running (refilling behind the claim).
    h.advance(Duration::from_secs(5));
    let before = nodes(&mut h);
    assert_eq!(before.iter().filter(|n| n.state == NodeState::Contextualizing).count(), 2);
    assert!(before.iter().any(|n| n.state == NodeState::Provisioning), "installs in flight");
    // Crash: every task dies mid-step. The client never got an answer.
    h.crash_and_restart(p);
    assert!(cell.borrow().is_none());
    h.advance(Duration::from_secs(60));
    let after = nodes(&mut h);
    assert!(
        after.iter().all(|n| matches!(n.state, NodeState::Ready | NodeState::Active)),
        "{:?}",
        after.iter().map(|n| n.state).collect::<Vec<_>>()
    );
    assert!(after.iter().filter(|n| n.state == NodeState::Ready).count() >= 3);
    let store = h.dyn_store();
    let live = h.block_on(async move { store.live_sessions().await.unwrap() });
    assert!(live.is_empty(), "the half-made session was aborted");
    let restarted = after
        .iter()
        .map(|n| history(&mut h, n.id))
        .filter(|ev| ev.iter().any(|e| e.cause == CauseKind::InstallRestarted))
        .count();
    assert!(restarted >= 1, "interrupted installs were re-driven");
    let aborted = after
        .iter()
        .map(|n| history(&mut h, n.id))
        .filter(|ev| {
            ev.iter().any(|e| e.cause == CauseKind::AllocationAborted && e.actor == duffy_core::Actor::Recovery)
        })
        .count();
    assert_eq!(aborted, 2);
    checks(&mut h);
}

#[test]
fn a_power_state_mismatch_is_recorded_as_an_event() {
    let p = Policy { power_check_interval: Some(Duration::from_secs(600)), ..policy() };
    let mut h = harness(3, 3, p);
    h.advance(Duration::from_secs(60));
    let n = nodes(&mut h);
    assert!(n.iter().all(|n| n.state == NodeState::Ready && n.power == PowerState::On));
    // Someone switches a Ready machine off at the BMC.
    h.farm.force_power(&n[1].hostname, PowerState::Off);
    h.advance(Duration::from_secs(700));
    let after = nodes(&mut h);
    assert_eq!(after[1].power, PowerState::Off, "the store now knows");
    assert_eq!(after[1].state, NodeState::Ready, "recorded, not acted on");
    let ev: Vec<_> = history(&mut h, n[1].id).into_iter().filter(|e| e.cause == CauseKind::PowerMismatch).collect();
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].detail.as_deref(), Some("BMC reports power off"));
    assert_eq!((ev[0].from, ev[0].to), (NodeState::Ready, NodeState::Ready));
    // The machines that matched have no such event.
    assert!(history(&mut h, n[0].id).iter().all(|e| e.cause != CauseKind::PowerMismatch));
    // A dead BMC is logged, not recorded, and nothing breaks.
    h.farm.kill_bmc(&n[2].hostname, true);
    h.advance(Duration::from_secs(700));
    checks(&mut h);
}
