//! Faults in the reconciler's own bookkeeping: start-up recovery that a
//! failed pass must not lose, pools starved by paged reads of idle
//! machines, installs that must leave alone a machine an operator took
//! away, and allocations made after a restart that recovery must not
//! abort.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use duffy_core::sim::{SimConfig, SimFarm};
use duffy_core::testkit::conformance::{check_history, check_invariants};
use duffy_core::testkit::{Harness, InterceptStore, ManualClock};
use duffy_core::{
    Actor, Arch, CauseKind, Clock, EventQuery, NewNode, Node, NodeRequest, NodeState, Policy, PoolKey, PoolTarget,
    Principal, SessionState, Store, StoreError,
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

fn nodes(h: &mut Harness) -> Vec<Node> {
    let store = h.dyn_store();
    h.block_on(async move { store.nodes().await.unwrap() })
}

fn count(h: &mut Harness, state: NodeState) -> usize {
    nodes(h).iter().filter(|n| n.state == state).count()
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

/// Fails the first `n` calls of `method` with a backend error, as a write
/// lock held past the busy timeout by a `duffy` command would.
fn fail_first(store: Arc<dyn Store>, method: &'static str, n: usize) -> Arc<dyn Store> {
    let left = Arc::new(AtomicUsize::new(n));
    Arc::new(InterceptStore::failing(store, move |m| {
        (m == method && left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |l| l.checked_sub(1)).is_ok())
            .then(|| StoreError::backend("reading", std::io::Error::other("database is locked")))
    }))
}

#[test]
fn start_up_recovery_survives_a_failed_first_pass() {
    let p = policy();
    let mut h = Harness::new(p.clone(), sim(20), SimFarm::machines(6), &[PoolTarget { pool: pool(), standby: 3 }]);
    h.advance(Duration::from_secs(30));
    assert_eq!(count(&mut h, NodeState::Ready), 3);
    // An allocation in the middle of preparing its nodes, and installs in
    // the middle of running behind it.
    h.farm.configure(|c| c.prepare_time = Duration::from_secs(10));
    let key = h.key("proj", None, false);
    let cell = h.get_nodes_later(&key, NodeRequest { count: Some(2), ..NodeRequest::default() });
    h.advance(Duration::from_secs(5));
    assert_eq!(count(&mut h, NodeState::Contextualizing), 2);
    let provisioning = count(&mut h, NodeState::Provisioning);
    assert!(provisioning >= 1, "installs in flight");

    // Crash; the restarted engine's first reads of the sessions fail.
    h.crash_and_restart_over(p, |store| fail_first(store, "live_sessions", 2));
    assert!(cell.borrow().is_none());
    // A few passes later (ticks of 5 s; installs of 20 s), recovery has
    // run: nothing waits for the 5-minute allocation deadline or the
    // install deadline.
    h.advance(Duration::from_secs(40));
    let after = nodes(&mut h);
    assert_eq!(after.iter().filter(|n| n.state == NodeState::Contextualizing).count(), 0, "allocation aborted");
    assert_eq!(after.iter().filter(|n| n.state == NodeState::Provisioning).count(), 0, "{after:?}");
    let store = h.dyn_store();
    assert!(h.block_on(async move { store.live_sessions().await.unwrap() }).is_empty());
    let recovered: Vec<CauseKind> = after
        .iter()
        .flat_map(|n| history(&mut h, n.id))
        .filter(|e| e.actor == Actor::Recovery)
        .map(|e| e.cause)
        .collect();
    assert_eq!(recovered.iter().filter(|c| **c == CauseKind::AllocationAborted).count(), 2, "{recovered:?}");
    assert_eq!(recovered.iter().filter(|c| **c == CauseKind::InstallRestarted).count(), provisioning, "{recovered:?}");
    checks(&mut h);
}

#[test]
fn interrupted_installs_beyond_the_restart_budget_are_re_driven_too() {
    let p = Policy { max_concurrent_installs: 6, ..policy() };
    let mut h = Harness::new(p.clone(), sim(20), SimFarm::machines(6), &[PoolTarget { pool: pool(), standby: 6 }]);
    h.advance(Duration::from_secs(5));
    assert_eq!(count(&mut h, NodeState::Provisioning), 6);
    // After the restart only two installs may run at once: the first pass
    // re-drives two, and the other four must follow as slots free up, not
    // after the install deadline.
    h.crash_and_restart(Policy { max_concurrent_installs: 2, ..p });
    h.advance(Duration::from_secs(90));
    assert_eq!(count(&mut h, NodeState::Ready), 6, "{:?}", nodes(&mut h));
    checks(&mut h);
}

#[test]
fn every_pool_in_deficit_gets_installs_however_the_idle_machines_are_paged() {
    // 1,000 idle machines: 900 x86_64 first, then 50 aarch64 and 50
    // ppc64le ("tiny", the default flavor of their pools). Equal deficits,
    // 8 install slots: the three pools share the first wave.
    let mut machines = SimFarm::machines(900);
    for (arch, name) in [(Arch::Aarch64, "arm"), (Arch::Ppc64le, "ppc")] {
        for i in 0..50 {
            let mut n = NewNode::new(format!("{name}{i}.sim.duffy"), arch);
            n.flavor = Some("tiny".into());
            machines.push(n);
        }
    }
    let pools = [pool(), PoolKey::new("8", Arch::Aarch64, None), PoolKey::new("8", Arch::Ppc64le, None)];
    let targets: Vec<PoolTarget> = pools.iter().map(|p| PoolTarget { pool: p.clone(), standby: 6 }).collect();
    let p = Policy { max_concurrent_installs: 8, ..policy() };
    let mut h = Harness::new(p, sim(600), machines, &targets);
    // The first pass ran in Harness::new.
    let provisioning: Vec<Node> = nodes(&mut h).into_iter().filter(|n| n.state == NodeState::Provisioning).collect();
    assert_eq!(provisioning.len(), 8);
    for pool in &pools {
        let n = provisioning.iter().filter(|n| n.image.as_ref() == Some(pool)).count();
        assert!(n >= 2, "pool {pool} got {n} of the first 8 installs");
    }
    checks(&mut h);
}

#[test]
fn an_install_leaves_alone_a_machine_an_operator_took_during_its_backoff() {
    let mut h = Harness::new(policy(), sim(20), SimFarm::machines(1), &[PoolTarget { pool: pool(), standby: 0 }]);
    let host = "n1.sim.duffy";
    h.farm.break_install(host, true);
    let engine = h.engine.clone();
    h.block_on(async move { engine.set_pool_targets(&[PoolTarget { pool: pool(), standby: 1 }]).await.unwrap() });
    // The first attempt fails at 20 s; the retry waits 10 s.
    h.advance(Duration::from_secs(25));
    assert_eq!(h.farm.installs(), 1);
    let n = nodes(&mut h).remove(0);
    assert_eq!(n.state, NodeState::Provisioning);
    // The operator takes the machine away (administrative downtime).
    let engine = h.engine.clone();
    h.block_on(async move { engine.set_admin(&Principal::operator(), host).await.unwrap() });
    h.farm.break_install(host, false);
    h.advance(Duration::from_secs(120));
    assert_eq!(h.farm.installs(), 1, "no further attempt powered the machine");
    let n = nodes(&mut h).remove(0);
    assert_eq!(n.state, NodeState::Reserved);
    let kinds: Vec<CauseKind> = history(&mut h, n.id).into_iter().map(|e| e.cause).collect();
    assert_eq!(
        kinds,
        vec![CauseKind::Added, CauseKind::InstallStarted, CauseKind::InstallAttemptFailed, CauseKind::SetAdmin]
    );
    checks(&mut h);
}

/// The first attempt of an install powers the machine without reading it
/// again: the pass wrote the row it holds moments before (the retry of
/// the test above does read, to leave an operator's machine alone).
#[test]
fn a_first_install_attempt_reads_no_node() {
    let p = policy();
    let mut h = Harness::new(p.clone(), sim(20), SimFarm::machines(3), &[PoolTarget { pool: pool(), standby: 0 }]);
    let reads = Arc::new(AtomicUsize::new(0));
    let counted = reads.clone();
    h.crash_and_restart_over(p, move |store| {
        Arc::new(InterceptStore::new(
            store,
            Arc::new(move |method| {
                if method == "node" {
                    counted.fetch_add(1, Ordering::SeqCst);
                }
                Box::pin(async { Ok(()) })
            }),
        ))
    });
    let engine = h.engine.clone();
    h.block_on(async move { engine.set_pool_targets(&[PoolTarget { pool: pool(), standby: 3 }]).await.unwrap() });
    h.advance(Duration::from_secs(30));
    assert_eq!(count(&mut h, NodeState::Ready), 3);
    assert_eq!(h.farm.installs(), 3);
    assert_eq!(reads.load(Ordering::SeqCst), 0, "an install read its node before its first attempt");
    checks(&mut h);
}

#[test]
fn an_allocation_made_after_a_restart_is_not_aborted_by_recovery() {
    let p = policy();
    let mut h = Harness::new(p.clone(), sim(20), SimFarm::machines(4), &[PoolTarget { pool: pool(), standby: 2 }]);
    h.advance(Duration::from_secs(30));
    assert_eq!(count(&mut h, NodeState::Ready), 2);
    h.farm.configure(|c| c.prepare_time = Duration::from_secs(10));
    let key = h.key("proj", None, false);
    // The restarted service's first pass is slow to read the sessions (a
    // busy disk): a request arrives meanwhile, as HTTP and the reconciler
    // start together.
    let clock: ManualClock = h.clock.clone();
    let first = Arc::new(AtomicUsize::new(0));
    h.crash_and_restart_over(p, move |store| {
        Arc::new(InterceptStore::new(
            store,
            Arc::new(move |method| {
                let slow = method == "live_sessions" && first.fetch_add(1, Ordering::SeqCst) == 0;
                let wake = clock.sleep_until(clock.now().plus(Duration::from_secs(2)));
                Box::pin(async move {
                    if slow {
                        wake.await;
                    }
                    Ok(())
                })
            }),
        ))
    });
    let cell = h.get_nodes_later(&key, NodeRequest { count: Some(2), ..NodeRequest::default() });
    h.advance(Duration::from_secs(30));
    let r = cell.borrow_mut().take().expect("answered");
    let a = r.expect("the allocation made after the restart succeeds");
    let store = h.dyn_store();
    let sid = a.session.clone();
    let s = h.block_on(async move { store.session(&sid).await.unwrap().unwrap() });
    assert_eq!(s.state, SessionState::Prod);
    checks(&mut h);
}

#[test]
fn a_pause_acknowledged_before_the_claim_stops_it() {
    let p = policy();
    let mut h = Harness::new(p.clone(), sim(20), SimFarm::machines(3), &[PoolTarget { pool: pool(), standby: 2 }]);
    h.advance(Duration::from_secs(30));
    assert_eq!(count(&mut h, NodeState::Ready), 2);
    let key = h.key("proj", None, false);
    let admin = h.key("ops", None, true);
    // The claim reaches the store 2 s after the request's other reads.
    let clock: ManualClock = h.clock.clone();
    h.crash_and_restart_over(p, move |store| {
        Arc::new(InterceptStore::new(
            store,
            Arc::new(move |method| {
                let wake = clock.sleep_until(clock.now().plus(Duration::from_secs(2)));
                Box::pin(async move {
                    if method == "claim" {
                        wake.await;
                    }
                    Ok(())
                })
            }),
        ))
    });
    let cell = h.get_nodes_later(&key, NodeRequest { count: Some(1), ..NodeRequest::default() });
    h.run();
    assert!(cell.borrow().is_none(), "the request waits in its claim");
    let engine = h.engine.clone();
    h.block_on(async move {
        let who = engine.authenticate(&admin).await.unwrap();
        engine.pause(&who).await.unwrap();
    });
    h.advance(Duration::from_secs(5));
    let r = cell.borrow_mut().take().expect("answered");
    assert!(matches!(r, Err(duffy_core::EngineError::Paused)), "{r:?}");
    let store = h.dyn_store();
    assert!(h.block_on(async move { store.live_sessions().await.unwrap() }).is_empty(), "nothing was claimed");
    checks(&mut h);
}

#[test]
fn a_new_farms_first_power_checks_are_observations_not_mismatches() {
    let p = Policy { power_check_interval: Some(Duration::from_secs(600)), ..policy() };
    // No pool to fill: the machines stay Active, power never set by Duffy.
    let mut h = Harness::new(p, sim(20), SimFarm::machines(3), &[PoolTarget { pool: pool(), standby: 0 }]);
    assert!(nodes(&mut h).iter().all(|n| n.power == duffy_core::PowerState::Unknown));
    h.advance(Duration::from_secs(60));
    for n in nodes(&mut h) {
        assert_ne!(n.power, duffy_core::PowerState::Unknown, "{}: the observed state is recorded", n.hostname);
        let kinds: Vec<CauseKind> = history(&mut h, n.id).into_iter().map(|e| e.cause).collect();
        assert_eq!(kinds, vec![CauseKind::Added, CauseKind::PowerObserved], "{}", n.hostname);
    }
    checks(&mut h);
}
