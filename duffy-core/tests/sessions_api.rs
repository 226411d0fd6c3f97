//! The engine API behind `/api/v1`, on the deterministic harness (manual
//! clock, simulated farm, in-memory store) with short policies: session
//! expiry and its reclamation by the reconciler, extensions up to the
//! maximum lifetime, `/Overtime` still by the lease, fail holds past the
//! expiry, the wait queue (served as nodes turn Ready, position and
//! estimate, cancel, quotas, gone clients, restarts), pools and node
//! histories.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use duffy_core::mem::MemStore;
use duffy_core::sim::{SimConfig, SimFarm};
use duffy_core::testkit::conformance::{add_ready, check_history, check_invariants, pool7};
use duffy_core::testkit::{Harness, ManualClock};
use duffy_core::{
    Arch, CauseKind, Clock, Created, Engine, EngineError, EventQuery, KeyId, NodeRequest, NodeState, Policy, PoolKey,
    PoolTarget, Principal, QueueState, ReconcilerObserver, RequestId, Session, SessionId, SessionRequest, SessionScope,
    SessionState, SessionTransitionError, Store, Timestamp,
};

fn pool() -> PoolKey {
    PoolKey::new("7", Arch::X86_64, None)
}

/// Ten-minute leases, half an hour at most, a 5 s tick.
fn policy() -> Policy {
    Policy {
        rate_limit: None,
        lease: Duration::from_secs(600),
        max_lifetime: Some(Duration::from_secs(1800)),
        fail_hold: Duration::from_secs(3600),
        install_timeout: Duration::from_secs(120),
        tick: Duration::from_secs(5),
        ..Policy::default()
    }
}

/// `machines` machines, a pool of `standby`, installs of 20 s; run until
/// the pool is Ready.
fn harness(machines: usize, standby: u32, policy: Policy) -> Harness {
    let sim = SimConfig {
        install_min: Duration::from_secs(20),
        install_max: Duration::from_secs(20),
        // Nothing to prepare: no contextualizer, a claim hands the nodes
        // over at once (the harness's block_on must not wait on the clock).
        prepare_time: Duration::ZERO,
        ..SimConfig::default()
    };
    let mut h = Harness::new(policy, sim, SimFarm::machines(machines), &[PoolTarget { pool: pool(), standby }]);
    h.advance(Duration::from_secs(60));
    h
}

/// Runs `f` with the engine and the principal of `key`.
fn call<T: 'static, F: Future<Output = T> + 'static>(
    h: &mut Harness,
    key: &str,
    f: impl FnOnce(Engine, Principal) -> F + 'static,
) -> T {
    let engine = h.engine.clone();
    let key = key.to_string();
    h.block_on(async move {
        let who = engine.authenticate(&key).await.expect("a valid key");
        f(engine, who).await
    })
}

fn request(count: u32, lifetime: Option<u64>, wait: bool) -> SessionRequest {
    SessionRequest { pool: pool(), count, lifetime: lifetime.map(Duration::from_secs), wait }
}

fn create(h: &mut Harness, key: &str, req: SessionRequest) -> Result<Created, EngineError> {
    call(h, key, move |e, who| async move { e.create_session(&who, &req).await })
}

fn created_session(c: Created) -> Session {
    match c {
        Created::Session(v) => v.session,
        Created::Queued(q) => panic!("queued, not served: {q:?}"),
    }
}

fn session(h: &mut Harness, id: &SessionId) -> Session {
    let store = h.dyn_store();
    let id = id.clone();
    h.block_on(async move { store.session(&id).await.unwrap().unwrap() })
}

fn history(h: &mut Harness, hostname: &str) -> Vec<CauseKind> {
    let engine = h.engine.clone();
    let hostname = hostname.to_string();
    let (_, events) = h.block_on(async move { engine.node_history(&hostname, 0, 0).await.unwrap() });
    events.into_iter().map(|e| e.cause).collect()
}

fn checks(h: &mut Harness) {
    let store = h.dyn_store();
    h.block_on(async move {
        check_invariants(&*store).await.unwrap();
        check_history(&*store).await.unwrap();
    });
}

#[test]
fn an_expired_session_is_ended_and_its_nodes_reinstalled() {
    let mut h = harness(3, 2, policy());
    let key = h.key("proj", None, false);
    let start = h.clock.now();
    let s = created_session(create(&mut h, &key, request(2, None, false)).unwrap());
    assert_eq!(s.lease_until, Some(start.plus(Duration::from_secs(600))));
    assert_eq!(s.expires_at, s.lease_until, "no extension: expires at the lease");
    // A legacy session gets the same expiry (once the pool is refilled).
    h.advance(Duration::from_secs(25));
    let key2 = h.key("legacy", None, false);
    let cell = h.get_nodes_later(&key2, NodeRequest::default());
    h.advance(Duration::from_secs(1));
    let legacy = cell.borrow_mut().take().unwrap().unwrap();
    assert_eq!(session(&mut h, &legacy.session).expires_at, Some(start.plus(Duration::from_secs(625))));

    h.advance(Duration::from_secs(600 - 26 - 1));
    assert_eq!(session(&mut h, &s.id).state, SessionState::Prod, "a second before its expiry");
    // Reclaimed at the reconciler's next tick after the expiry.
    h.advance(Duration::from_secs(6));
    let ended = session(&mut h, &s.id);
    assert_eq!(ended.state, SessionState::Done);
    assert_eq!(ended.end_reason.as_deref(), Some("lifetime expired; nodes reclaimed"));
    let host = {
        let store = h.dyn_store();
        let id = ended.nodes[0];
        h.block_on(async move { store.node(id).await.unwrap().unwrap().hostname })
    };
    let kinds = history(&mut h, &host);
    let at = kinds.iter().position(|k| *k == CauseKind::SessionExpired).expect("an expiry event in the history");
    assert_eq!(kinds[at - 1], CauseKind::Delivered);
    assert_eq!(kinds.get(at + 1), Some(&CauseKind::InstallStarted), "reinstalled: {kinds:?}");
    h.advance(Duration::from_secs(30));
    assert_eq!(session(&mut h, &legacy.session).state, SessionState::Done, "the legacy session expired too");
    checks(&mut h);
}

#[test]
fn extensions_move_the_expiry_up_to_the_maximum_and_overtime_still_follows_the_lease() {
    let mut h = harness(2, 1, policy());
    let key = h.key("proj", None, false);
    let admin = h.key("ops", None, true);
    let start = h.clock.now();
    let s = created_session(create(&mut h, &key, request(1, Some(300), false)).unwrap());
    assert_eq!(s.lease_until, Some(start.plus(Duration::from_secs(300))), "the lifetime asked for");
    let sid = s.id.0.clone();
    let id = sid.clone();
    let v = call(&mut h, &key, move |e, who| async move {
        e.extend_session(&who, &id, Duration::from_secs(600)).await.unwrap()
    });
    assert_eq!(v.session.expires_at, Some(start.plus(Duration::from_secs(900))));
    assert_eq!(v.session.lease_until, Some(start.plus(Duration::from_secs(300))), "the lease does not move");
    assert_eq!(v.hosts.len(), 1);
    // Past the maximum lifetime (1800 s from creation): refused, unchanged.
    let id = sid.clone();
    let err = call(&mut h, &key, move |e, who| async move {
        e.extend_session(&who, &id, Duration::from_secs(901)).await.unwrap_err()
    });
    assert!(
        matches!(err, EngineError::SessionTransition(SessionTransitionError::BeyondMaxLifetime { max_until, .. })
            if max_until == start.plus(Duration::from_secs(1800))),
        "{err:?}"
    );
    assert_eq!(session(&mut h, &s.id).expires_at, Some(start.plus(Duration::from_secs(900))));
    // A lifetime past the maximum is refused at creation.
    let err = create(&mut h, &key, request(1, Some(1801), false)).unwrap_err();
    assert!(err.to_string().contains("exceeds the maximum lifetime of 1800 s"), "{err}");
    // Another key cannot extend it.
    let other = h.key("other", None, false);
    let id = sid.clone();
    let err = call(&mut h, &other, move |e, who| async move {
        e.extend_session(&who, &id, Duration::from_secs(1)).await.unwrap_err()
    });
    assert!(matches!(err, EngineError::InvalidSession), "{err:?}");

    // Past its lease but before its expiry: /Overtime lists it, it runs on.
    h.advance(Duration::from_secs(400));
    let listed = call(&mut h, &admin, |e, who| async move { e.overtime(&who).await.unwrap() });
    assert_eq!(listed.iter().map(|o| o.session.id.0.as_str()).collect::<Vec<_>>(), [sid.as_str()]);
    assert_eq!(session(&mut h, &s.id).state, SessionState::Prod);
    // Extended again to exactly the maximum, then it runs out there.
    let id = sid.clone();
    call(
        &mut h,
        &key,
        move |e, who| async move { e.extend_session(&who, &id, Duration::from_secs(900)).await.unwrap() },
    );
    h.advance(Duration::from_secs(1800 - 400 - 1));
    assert_eq!(session(&mut h, &s.id).state, SessionState::Prod);
    h.advance(Duration::from_secs(6));
    assert_eq!(session(&mut h, &s.id).state, SessionState::Done);
    let id = sid.clone();
    let err = call(&mut h, &key, move |e, who| async move {
        e.extend_session(&who, &id, Duration::from_secs(60)).await.unwrap_err()
    });
    assert!(matches!(err, EngineError::SessionNotInProd { .. }), "{err:?}");
    checks(&mut h);
}

#[test]
fn without_a_maximum_lifetime_a_session_is_extended_as_far_as_asked() {
    let mut h = harness(2, 1, Policy { max_lifetime: None, ..policy() });
    let key = h.key("proj", None, false);
    let start = h.clock.now();
    let s = created_session(create(&mut h, &key, request(1, Some(86_400 * 7), false)).unwrap());
    let id = s.id.0.clone();
    let v = call(&mut h, &key, move |e, who| async move {
        e.extend_session(&who, &id, Duration::from_secs(86_400 * 30)).await.unwrap()
    });
    assert_eq!(v.session.expires_at, Some(start.plus(Duration::from_secs(86_400 * 37))));
}

#[test]
fn a_failed_session_keeps_its_hold_past_its_expiry() {
    let mut h = harness(2, 1, policy());
    let key = h.key("proj", None, false);
    let s = created_session(create(&mut h, &key, request(1, None, false)).unwrap());
    let id = s.id.0.clone();
    call(&mut h, &key, move |e, who| async move { e.fail(&who, &id).await.unwrap() });
    h.advance(Duration::from_secs(1800));
    let held = session(&mut h, &s.id);
    assert_eq!(held.state, SessionState::Fail, "held for debugging, not expired");
    h.advance(Duration::from_secs(1800 + 5));
    let ended = session(&mut h, &s.id);
    assert_eq!(
        (ended.state, ended.end_reason.as_deref()),
        (SessionState::Done, Some("fail hold expired; nodes reclaimed"))
    );
    checks(&mut h);
}

/// Records the sessions it is told expired.
#[derive(Default)]
struct Expiries(Mutex<Vec<SessionId>>);

impl ReconcilerObserver for Expiries {
    fn session_expired(&self, session: &Session) {
        self.0.lock().unwrap().push(session.id.clone());
    }
}

#[test]
fn the_reconciler_observer_hears_of_every_expiry() {
    let clock = ManualClock::new(Timestamp::from_millis(1_767_225_600_000));
    let store = Arc::new(MemStore::new());
    let farm = Arc::new(SimFarm::new(Arc::new(clock.clone()), SimConfig::default()));
    let engine =
        Engine::builder(store.clone(), farm.clone(), farm, Arc::new(clock.clone())).policy(policy()).build().unwrap();
    let observer = Arc::new(Expiries::default());
    let mut reconciler = engine.reconciler().observed_by(observer.clone());
    futures::executor::block_on(async {
        add_ready(&*store, "n", 3, &pool7()).await;
        store.set_pool_target(PoolTarget { pool: pool7(), standby: 3 }).await.unwrap();
        let who = Principal { key_id: Some(KeyId(1)), project: "p".into(), admin: false };
        let req = SessionRequest { pool: pool7(), count: 1, lifetime: Some(Duration::from_secs(60)), wait: false };
        let a = created_session(engine.create_session(&who, &req).await.unwrap());
        let req = SessionRequest { pool: pool7(), count: 2, lifetime: None, wait: false };
        let b = created_session(engine.create_session(&who, &req).await.unwrap());
        clock.set(clock.now().plus(Duration::from_secs(60)));
        let r = reconciler.pass().await.unwrap();
        assert_eq!(r.sessions_expired, 1);
        assert_eq!(*observer.0.lock().unwrap(), std::slice::from_ref(&a.id));
        clock.set(clock.now().plus(Duration::from_secs(540)));
        let r = reconciler.pass().await.unwrap();
        assert_eq!(r.sessions_expired, 1);
        assert_eq!(*observer.0.lock().unwrap(), [a.id, b.id.clone()]);
        let r = reconciler.pass().await.unwrap();
        assert_eq!(r.sessions_expired, 0, "each expiry is reported once");
        let n = store.node(b.nodes[0]).await.unwrap().unwrap();
        // Back to be reinstalled (these test nodes have no BMC, so the
        // install itself does not start).
        assert_eq!((n.state, n.session), (NodeState::Active, None));
        let ev = store.events(EventQuery { node: Some(n.id), ..EventQuery::default() }).await.unwrap();
        assert!(ev.iter().any(|e| e.cause == CauseKind::SessionExpired && e.session == Some(b.id.clone())), "{ev:?}");
    });
}

fn queued(c: Created) -> duffy_core::QueueStatus {
    match c {
        Created::Queued(q) => q,
        Created::Session(v) => panic!("served at once: {v:?}"),
    }
}

fn status(h: &mut Harness, key: &str, id: &RequestId) -> Result<duffy_core::QueueStatus, EngineError> {
    let id = id.clone();
    call(h, key, move |e, who| async move { e.queue_status(&who, &id).await })
}

#[test]
fn a_short_pool_queues_the_request_and_serves_it_as_nodes_turn_ready() {
    let mut h = harness(4, 2, policy());
    let a = h.key("a", None, false);
    let b = h.key("b", None, false);
    created_session(create(&mut h, &a, request(2, None, false)).unwrap());
    // Without `wait`: refused as before.
    let err = create(&mut h, &b, request(2, None, false)).unwrap_err();
    assert!(matches!(err, EngineError::InsufficientNodes { requested: 2, available: 0 }), "{err:?}");
    let q = queued(create(&mut h, &b, request(2, Some(900), true)).unwrap());
    match q.state {
        QueueState::Waiting { position: 1, estimated_wait: Some(w) } => {
            assert!(w > Duration::ZERO && w <= Duration::from_secs(120), "{w:?}")
        }
        other => panic!("{other:?}"),
    }
    // The pools say so.
    let pools = call(&mut h, &b, |e, _| async move { e.pools().await.unwrap() });
    assert_eq!(pools.len(), 1);
    assert_eq!(pools[0].waiting, 2);
    assert_eq!(pools[0].counts.get(&NodeState::Deployed), Some(&2));
    assert_eq!(pools[0].counts.get(&NodeState::Provisioning), Some(&2), "{pools:?}");
    // The two spare machines are installed (20 s) and the request is served.
    h.advance(Duration::from_secs(25));
    let st = status(&mut h, &b, &q.id).unwrap();
    let QueueState::Served { session: sid } = st.state else { panic!("{st:?}") };
    let view = {
        let sid = sid.0.clone();
        call(&mut h, &b, move |e, who| async move { e.get_session(&who, &sid).await.unwrap() })
    };
    assert_eq!((view.session.state, view.hosts.len()), (SessionState::Prod, 2));
    assert_eq!(
        view.session.expires_at,
        Some(view.session.created_at.plus(Duration::from_secs(900))),
        "the lifetime asked for"
    );
    let mine = call(&mut h, &b, |e, who| async move { e.list_sessions(&who, &SessionScope::Mine).await.unwrap() });
    assert_eq!(mine.iter().map(|v| v.session.id.clone()).collect::<Vec<_>>(), [sid]);
    let err = call(&mut h, &b, |e, who| async move { e.list_sessions(&who, &SessionScope::All).await.unwrap_err() });
    assert!(matches!(err, EngineError::NotAdmin));
    // Another key sees no such request.
    let err = status(&mut h, &a, &q.id).unwrap_err();
    assert!(matches!(err, EngineError::UnknownRequest(_)), "{err:?}");
    checks(&mut h);
}

#[test]
fn a_queued_request_is_cancelled_and_takes_nothing() {
    let mut h = harness(3, 2, policy());
    let a = h.key("a", None, false);
    created_session(create(&mut h, &a, request(2, None, false)).unwrap());
    let q = queued(create(&mut h, &a, request(1, None, true)).unwrap());
    let other = h.key("b", None, false);
    let id = q.id.clone();
    let err = call(&mut h, &other, move |e, who| async move { e.cancel_request(&who, &id).await.unwrap_err() });
    assert!(matches!(err, EngineError::UnknownRequest(_)), "another key cannot cancel it: {err:?}");
    let id = q.id.clone();
    let st = call(&mut h, &a, move |e, who| async move { e.cancel_request(&who, &id).await.unwrap() });
    assert_eq!(st.state, QueueState::Cancelled);
    h.advance(Duration::from_secs(60));
    assert_eq!(status(&mut h, &a, &q.id).unwrap().state, QueueState::Cancelled);
    let mine = call(&mut h, &a, |e, who| async move { e.list_sessions(&who, &SessionScope::Mine).await.unwrap() });
    assert_eq!(mine.len(), 1, "the cancelled request took no nodes");
}

/// While a queued request is being allocated (its nodes claimed, being
/// prepared), its owner still finds it (waiting, first in line) and can
/// cancel it: the nodes it got go back as soon as the allocation ends.
/// Before, it was in neither the queue nor the finished requests for the
/// whole preparation, and a poll was told it did not exist ("submit it
/// again"): a client that did would get two sessions.
#[test]
fn a_request_being_allocated_is_still_shown_and_can_be_cancelled() {
    for cancel in [false, true] {
        // Installs of 20 s, preparations of 10 s.
        let sim = SimConfig {
            install_min: Duration::from_secs(20),
            install_max: Duration::from_secs(20),
            prepare_time: Duration::from_secs(10),
            ..SimConfig::default()
        };
        let mut h = Harness::new(policy(), sim, SimFarm::machines(3), &[PoolTarget { pool: pool(), standby: 2 }]);
        h.advance(Duration::from_secs(60));
        let a = h.key("a", None, false);
        let holder = h.get_nodes_later(&a, NodeRequest { count: Some(2), ..NodeRequest::default() });
        h.advance(Duration::from_secs(15));
        holder.borrow_mut().take().expect("answered").expect("the first two machines");
        let q = queued(create(&mut h, &a, request(1, None, true)).unwrap());
        // The third machine is installed (20 s), then claimed for the
        // request and prepared (10 s).
        let store = h.dyn_store();
        let mut waited = 0;
        loop {
            h.advance(Duration::from_secs(1));
            let store = store.clone();
            let claimed = h.block_on(async move {
                store.nodes().await.unwrap().iter().any(|n| n.state == NodeState::Contextualizing)
            });
            if claimed {
                break;
            }
            waited += 1;
            assert!(waited < 60, "the request was never served");
        }
        let st = status(&mut h, &a, &q.id).expect("a request being allocated is still known");
        assert_eq!(st.state, QueueState::Waiting { position: 1, estimated_wait: Some(Duration::ZERO) });
        let b = h.key("b", None, false);
        let err = status(&mut h, &b, &q.id).unwrap_err();
        assert!(matches!(err, EngineError::UnknownRequest(_)), "another key does not see it: {err:?}");
        if cancel {
            let id = q.id.clone();
            let st = call(&mut h, &a, move |e, who| async move { e.cancel_request(&who, &id).await.unwrap() });
            assert_eq!(st.state, QueueState::Cancelled);
        }
        h.advance(Duration::from_secs(30));
        let st = status(&mut h, &a, &q.id).unwrap();
        let store = h.dyn_store();
        let live = h.block_on(async move { store.live_sessions().await.unwrap() });
        if cancel {
            assert_eq!(st.state, QueueState::Cancelled, "{st:?}");
            assert_eq!(live.len(), 1, "the cancelled request's session was released: {live:?}");
        } else {
            assert!(matches!(st.state, QueueState::Served { .. }), "{st:?}");
            assert_eq!(live.len(), 2);
        }
        checks(&mut h);
    }
}

#[test]
fn a_request_its_quota_can_never_fit_is_refused_and_quotas_hold_in_the_queue() {
    let mut h = harness(5, 3, policy());
    let a = h.key("a", Some(2), false);
    let err = create(&mut h, &a, request(3, None, true)).unwrap_err();
    assert!(matches!(err, EngineError::QuotaExceeded { quota: 2, requested: 3, .. }), "{err:?}");
    let b = h.key("b", None, false);
    created_session(create(&mut h, &a, request(2, None, false)).unwrap());
    created_session(create(&mut h, &b, request(1, None, false)).unwrap());
    // a waits on its quota, b on nodes: b is served, a is passed over.
    let qa = queued(create(&mut h, &a, request(1, None, true)).unwrap());
    let qb = queued(create(&mut h, &b, request(1, None, true)).unwrap());
    h.advance(Duration::from_secs(25));
    assert!(matches!(status(&mut h, &b, &qb.id).unwrap().state, QueueState::Served { .. }));
    assert!(matches!(status(&mut h, &a, &qa.id).unwrap().state, QueueState::Waiting { .. }), "over quota: waits");
    // a releases a session: now it fits.
    let mine = call(&mut h, &a, |e, who| async move { e.list_sessions(&who, &SessionScope::Mine).await.unwrap() });
    let sid = mine[0].session.id.0.clone();
    call(&mut h, &a, move |e, who| async move { e.done(&who, &sid).await.unwrap() });
    h.advance(Duration::from_secs(25));
    assert!(matches!(status(&mut h, &a, &qa.id).unwrap().state, QueueState::Served { .. }));
    checks(&mut h);
}

#[test]
fn a_request_nobody_asks_about_is_dropped() {
    let mut h = harness(2, 1, Policy { queue_poll_timeout: Some(Duration::from_secs(30)), ..policy() });
    let a = h.key("a", None, false);
    created_session(create(&mut h, &a, request(1, None, false)).unwrap());
    let q = queued(create(&mut h, &a, request(1, None, true)).unwrap());
    h.advance(Duration::from_secs(20));
    assert!(matches!(status(&mut h, &a, &q.id).unwrap().state, QueueState::Waiting { .. }));
    let st = status(&mut h, &a, &q.id).unwrap();
    assert!(matches!(st.state, QueueState::Waiting { .. }), "polled: kept");
    // The node was installed at 20 s: served, since its client polled.
    h.advance(Duration::from_secs(5));
    assert!(matches!(status(&mut h, &a, &q.id).unwrap().state, QueueState::Served { .. }));
    // A second request nobody polls is dropped after 30 s.
    let q2 = queued(create(&mut h, &a, request(1, None, true)).unwrap());
    h.advance(Duration::from_secs(36));
    let st = status(&mut h, &a, &q2.id).unwrap();
    assert!(matches!(&st.state, QueueState::Dropped { reason } if reason.contains("client is gone")), "{st:?}");
}

#[test]
fn queued_requests_do_not_survive_a_restart_and_their_clients_are_told_to_resubmit() {
    let mut h = harness(2, 1, policy());
    let a = h.key("a", None, false);
    created_session(create(&mut h, &a, request(1, None, false)).unwrap());
    let q = queued(create(&mut h, &a, request(1, None, true)).unwrap());
    h.crash_and_restart(policy());
    let err = status(&mut h, &a, &q.id).unwrap_err();
    assert!(matches!(err, EngineError::UnknownRequest(_)), "{err:?}");
    assert!(err.to_string().contains("do not survive a restart of the service, submit it again"), "{err}");
    // Nothing of it is left behind: the next node installed is not taken.
    h.advance(Duration::from_secs(60));
    let store = h.dyn_store();
    let live = h.block_on(async move { store.live_sessions().await.unwrap() });
    assert_eq!(live.len(), 1);
}

#[test]
fn a_new_waiting_request_queues_behind_those_already_waiting_for_its_pool() {
    let mut h = harness(4, 2, policy());
    let a = h.key("a", None, false);
    let b = h.key("b", None, false);
    created_session(create(&mut h, &a, request(2, None, false)).unwrap());
    let qa = queued(create(&mut h, &a, request(2, None, true)).unwrap());
    // One node turns Ready before the other: b's request for one must not
    // jump a's request for two.
    let qb = queued(create(&mut h, &b, request(1, None, true)).unwrap());
    match status(&mut h, &b, &qb.id).unwrap().state {
        QueueState::Waiting { position: 2, .. } => {}
        other => panic!("{other:?}"),
    }
    h.advance(Duration::from_secs(25));
    assert!(matches!(status(&mut h, &a, &qa.id).unwrap().state, QueueState::Served { .. }));
    assert!(matches!(status(&mut h, &b, &qb.id).unwrap().state, QueueState::Waiting { position: 1, .. }));
}

#[test]
fn node_history_and_unknown_nodes() {
    let mut h = harness(1, 1, policy());
    let engine = h.engine.clone();
    let (node, events) = h.block_on(async move { engine.node_history("n1.sim.duffy", 0, 0).await.unwrap() });
    assert_eq!(node.state, NodeState::Ready);
    let kinds: Vec<_> = events.iter().map(|e| e.cause).collect();
    assert_eq!(kinds, [CauseKind::Added, CauseKind::InstallStarted, CauseKind::InstallSucceeded]);
    let engine = h.engine.clone();
    let after = events[0].seq;
    let (_, page) = h.block_on(async move { engine.node_history("n1.sim.duffy", after, 1).await.unwrap() });
    assert_eq!(page.iter().map(|e| e.cause).collect::<Vec<_>>(), [CauseKind::InstallStarted]);
    let engine = h.engine.clone();
    let err = h.block_on(async move { engine.node_history("nope", 0, 0).await.unwrap_err() });
    assert!(matches!(err, EngineError::UnknownNode(_)));
}
