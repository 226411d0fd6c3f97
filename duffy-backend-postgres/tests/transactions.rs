//! Write transactions under trouble: a connection lost during COMMIT (the
//! outcome unknown to the store) is resolved by asking the database, never
//! by running the operation again blindly; a deadlock is retried.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::proxy::{Cut, Proxy};
use duffy_backend_postgres::test_cluster::{TestDatabase, shared};
use duffy_backend_postgres::{PgOptions, PgStore, PgTestHooks};
use duffy_core::testkit::conformance::{add_ready, check_history, check_invariants, claim_req, pool7, release};
use duffy_core::{
    Actor, Arch, Batch, Cause, CauseKind, EventQuery, HandBack, HandBackKind, HandBackRefusal, KeyId, NewNode,
    NodeWrite, SessionId, SessionState, Store, StoreError, Timestamp,
};

const T0: Timestamp = Timestamp(1_700_000_000_000);

/// A store that reaches its database through a proxy that can cut
/// connections around a COMMIT.
async fn behind_proxy(hooks: PgTestHooks) -> (PgStore, Proxy, TestDatabase) {
    let db = shared().database().await;
    let proxy = Proxy::start(shared().address()).await;
    let url = db.url.replace(&shared().address(), &format!("127.0.0.1:{}", proxy.port));
    let store = PgStore::connect(&url, PgOptions { test_hooks: hooks, ..common::options() }).await.expect("connect");
    (store, proxy, db)
}

async fn causes(store: &dyn Store, kind: CauseKind) -> usize {
    store.events(EventQuery::default()).await.expect("events").iter().filter(|e| e.cause == kind).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_answer_was_lost_is_answered_once_and_applied_once() {
    let (store, proxy, _db) = behind_proxy(PgTestHooks::default()).await;
    add_ready(&store, "n", 3, &pool7()).await;

    // A claim: the server commits, the answer never arrives.
    proxy.arm(Cut::AfterCommit);
    let c = store.claim(claim_req("s1", 1, "p", 2, T0)).await.expect("store ok").expect("claimed");
    assert_eq!(proxy.cuts(), 1, "the connection was cut at the COMMIT");
    assert_eq!(store.stats().unknown_committed, 1, "{:?}", store.stats());
    assert_eq!(causes(&store, CauseKind::Allocated).await, 2, "applied once");
    let s = store.session(&SessionId("s1".into())).await.expect("read").expect("exists");
    assert_eq!((s.state, s.nodes.len()), (SessionState::Allocating, 2));
    assert_eq!(c.session, s);

    // A batch.
    proxy.arm(Cut::AfterCommit);
    release(&store, &c.session.id, T0).await.expect("released");
    assert_eq!(store.stats().unknown_committed, 2);
    assert_eq!(causes(&store, CauseKind::AllocationAborted).await, 2, "applied once");

    // Nodes added.
    proxy.arm(Cut::AfterCommit);
    let added = store.add_nodes(vec![NewNode::new("late", Arch::X86_64)], Actor::Operator, T0).await.expect("added");
    assert_eq!(added.len(), 1);
    assert_eq!(store.stats().unknown_committed, 3);
    assert_eq!(store.nodes().await.expect("nodes").len(), 4);
    assert_eq!(causes(&store, CauseKind::Added).await, 4);
    check_invariants(&store).await.expect("invariants");
    check_history(&store).await.expect("history");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_that_never_reached_the_server_is_run_again() {
    let (store, proxy, _db) = behind_proxy(PgTestHooks::default()).await;
    add_ready(&store, "n", 2, &pool7()).await;
    proxy.arm(Cut::BeforeCommit);
    store.claim(claim_req("s1", 1, "p", 1, T0)).await.expect("store ok").expect("claimed");
    assert_eq!(proxy.cuts(), 1);
    assert_eq!(store.stats().unknown_aborted, 1, "{:?}", store.stats());
    assert_eq!(causes(&store, CauseKind::Allocated).await, 1);
    assert_eq!(store.live_sessions().await.expect("live").len(), 1);
    check_invariants(&store).await.expect("invariants");
    check_history(&store).await.expect("history");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_a_lost_commit_again_blindly_is_caught() {
    // The check above can fail: a store that takes a lost COMMIT for "not
    // applied" runs the claim again, which finds its own session and
    // fails the caller although the claim was made.
    let hooks = PgTestHooks { unknown_outcome_is_abort: true, ..PgTestHooks::default() };
    let (store, proxy, _db) = behind_proxy(hooks).await;
    add_ready(&store, "n", 2, &pool7()).await;
    proxy.arm(Cut::AfterCommit);
    let r = store.claim(claim_req("s1", 1, "p", 1, T0)).await;
    assert!(matches!(r, Err(StoreError::Duplicate(_))), "{r:?}");
    assert_eq!(causes(&store, CauseKind::Allocated).await, 1, "the claim was made, and its caller told it failed");
}

/// A delivered session of key 1, holding two nodes.
async fn delivered(store: &PgStore, sid: &str) -> SessionId {
    add_ready(store, "n", 2, &pool7()).await;
    let req =
        duffy_core::ClaimRequest { deliver: Some(T0.plus(Duration::from_secs(3600))), ..claim_req(sid, 1, "p", 2, T0) };
    store.claim(req).await.expect("store ok").expect("claimed").session.id
}

fn done(sid: &SessionId) -> HandBack {
    HandBack { session: sid.clone(), key_id: KeyId(1), kind: HandBackKind::Done, actor: Actor::Key(KeyId(1)), now: T0 }
}

/// A hand-back sends its writes and COMMIT together: a connection lost
/// there leaves the outcome unknown, resolved by asking the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_back_whose_answer_was_lost_is_answered_once_and_applied_once() {
    let (store, proxy, _db) = behind_proxy(PgTestHooks::default()).await;
    let sid = delivered(&store, "s1").await;
    proxy.arm(Cut::AfterCommit);
    let s = store.hand_back(done(&sid)).await.expect("no error").expect("accepted");
    assert_eq!(proxy.cuts(), 1, "the connection was cut at the COMMIT");
    assert_eq!(store.stats().unknown_committed, 1, "{:?}", store.stats());
    assert_eq!(s.state, SessionState::Done);
    assert_eq!(store.session(&sid).await.expect("read").expect("exists"), s);
    assert_eq!(causes(&store, CauseKind::Released).await, 2, "applied once");
    check_invariants(&store).await.expect("invariants");
    check_history(&store).await.expect("history");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_back_that_never_reached_the_server_is_run_again() {
    let (store, proxy, _db) = behind_proxy(PgTestHooks::default()).await;
    let sid = delivered(&store, "s1").await;
    proxy.arm(Cut::BeforeCommit);
    let s = store.hand_back(done(&sid)).await.expect("no error").expect("accepted");
    assert_eq!(proxy.cuts(), 1);
    assert_eq!(store.stats().unknown_aborted, 1, "{:?}", store.stats());
    assert_eq!(s.state, SessionState::Done);
    assert_eq!(causes(&store, CauseKind::Released).await, 2, "applied once");
    check_invariants(&store).await.expect("invariants");
    check_history(&store).await.expect("history");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_a_lost_hand_back_again_blindly_is_caught() {
    // The first check above can fail: run again, the hand-back finds its
    // own session Done and refuses, although the session was released.
    let hooks = PgTestHooks { unknown_outcome_is_abort: true, ..PgTestHooks::default() };
    let (store, proxy, _db) = behind_proxy(hooks).await;
    let sid = delivered(&store, "s1").await;
    proxy.arm(Cut::AfterCommit);
    let r = store.hand_back(done(&sid)).await.expect("no error");
    assert!(matches!(r, Err(HandBackRefusal::NotInProd { state: SessionState::Done })), "{r:?}");
    assert_eq!(causes(&store, CauseKind::Released).await, 2, "released, and its caller told it was refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadlock_is_retried() {
    let (store, db) = common::fresh().await;
    let nodes = store
        .add_nodes(vec![NewNode::new("a", Arch::X86_64), NewNode::new("b", Arch::X86_64)], Actor::Operator, T0)
        .await
        .expect("add");
    // Another client locks node b, the store's batch locks a and waits for
    // b, then the other client asks for a: a deadlock, which PostgreSQL
    // breaks by failing the store's transaction (whose wait began first).
    let other = common::raw(&db.url).await;
    other.batch_execute("SET deadlock_timeout = '10s'; BEGIN").await.expect("begin");
    other.query("SELECT 1 FROM nodes WHERE id = $1 FOR UPDATE", &[&(nodes[1].id.0 as i64)]).await.expect("lock b");
    let store2 = store.clone();
    let writes: Vec<NodeWrite> =
        nodes.iter().map(|n| NodeWrite::transition(n, Cause::SetAdmin, Actor::Operator, T0).expect("legal")).collect();
    let batch = tokio::spawn(async move { store2.commit(Batch { nodes: writes, ..Batch::default() }).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let other = Arc::new(other);
    let o = other.clone();
    let a = nodes[0].id.0 as i64;
    let lock_a = tokio::spawn(async move { o.query("SELECT 1 FROM nodes WHERE id = $1 FOR UPDATE", &[&a]).await });
    let got_a = tokio::time::timeout(Duration::from_secs(10), lock_a).await.expect("the deadlock is broken");
    got_a.expect("task").expect("the other client gets node a once the store's transaction is gone");
    other.batch_execute("COMMIT").await.expect("commit");
    tokio::time::timeout(Duration::from_secs(10), batch)
        .await
        .expect("the batch finishes")
        .expect("task")
        .expect("the retried batch is written");
    assert!(store.stats().retries >= 1, "{:?}", store.stats());
    let stored = store.nodes().await.expect("nodes");
    assert!(stored.iter().all(|n| n.version == 2), "written once: {stored:?}");
    check_history(&store).await.expect("history");
}

/// A claim refused because the pool is empty locked nothing and writes
/// nothing: it takes no transaction id (none to look up, no abort record
/// in the WAL), while a claim that takes a node does. On a cluster of its
/// own with autovacuum off, so that nothing else assigns ids meanwhile
/// (ids are counted cluster-wide).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_refused_for_want_of_nodes_takes_no_transaction_id() {
    let cluster = duffy_backend_postgres::test_cluster::durable(&["autovacuum=off", "fsync=off"]).expect("cluster");
    let db = cluster.database().await;
    let store = PgStore::connect(&db.url, common::options()).await.expect("connect");
    add_ready(&store, "n", 1, &pool7()).await;
    let c = common::raw(&db.url).await;
    let next_xid = || async {
        let r = c.query_one("SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint", &[]).await;
        r.expect("next transaction id").get::<_, i64>(0)
    };
    let empty = duffy_core::PoolKey::new("9", Arch::X86_64, None);
    let before = next_xid().await;
    for i in 0..20 {
        let req = duffy_core::ClaimRequest { pool: empty.clone(), ..claim_req(&format!("r{i}"), 1, "p", 1, T0) };
        let r = store.claim(req).await.expect("store ok");
        assert!(matches!(r, Err(duffy_core::ClaimRefusal::InsufficientNodes { available: 0, .. })), "{r:?}");
    }
    assert_eq!(next_xid().await - before, 0, "20 refused claims took transaction ids");
    // The count can move: a claim that takes a node has an id.
    store.claim(claim_req("s1", 1, "p", 1, T0)).await.expect("store ok").expect("claimed");
    assert_eq!(next_xid().await - before, 1, "a claim that took a node");
}
