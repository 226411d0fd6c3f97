//! Group commit: many operations in one transaction, each in its own
//! savepoint; a refused operation does not disturb its batch-mates; a
//! transaction that fails as a whole fails every operation of its batch;
//! reads never wait for the writer.
//!
//! To put a known set of operations into one batch, the tests hold the
//! database's write lock from a second connection: the writer takes the
//! first operation and blocks on `BEGIN IMMEDIATE`, every operation sent
//! meanwhile queues up, in order, and they all go into the next batch.

mod common;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use duffy_backend_sqlite::{SqliteOptions, SqliteStore, Synchronous, TestHooks};
use duffy_core::testkit::conformance::{add_ready, check_history, check_invariants, claim_req, pool7};
use duffy_core::{
    Actor, Arch, Batch, Cause, ClaimRefusal, CommitError, EventQuery, Guard, KeyId, NewNode, NodeState, PoolKey,
    PoolTarget, Project, SessionCause, SessionState, SessionWrite, Store, StoreError, Timestamp,
};
use duffy_core::{NodeWrite, Session};
use futures::poll;
use rusqlite::Connection;

const T0: Timestamp = Timestamp(1_700_000_000_000);

type Fut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Polls a store future once, which sends its operation to the writer;
/// it must not be answered yet.
async fn send<'a, T>(mut f: Fut<'a, T>) -> Fut<'a, T> {
    assert!(poll!(&mut f).is_pending(), "the writer should be blocked");
    f
}

/// Holds the write lock from another connection.
fn lock(path: &std::path::Path) -> Connection {
    let c = Connection::open(path).expect("raw open");
    c.execute_batch("BEGIN IMMEDIATE").expect("take the write lock");
    c
}

fn unlock(c: Connection) {
    c.execute_batch("ROLLBACK").expect("release the write lock");
}

/// Delivers a claimed session (Prepared, session Prod) the way the engine
/// does, returning the session as stored.
async fn deliver(store: &dyn Store, c: &duffy_core::Claimed) -> Session {
    let mut batch = Batch::default();
    for n in &c.nodes {
        batch.nodes.push(NodeWrite::transition(n, Cause::Prepared, Actor::Key(KeyId(1)), T0).expect("legal"));
    }
    let w = SessionWrite::transition(&c.session, SessionCause::Delivered { lease_until: T0 }, T0).expect("legal");
    let s = w.session.clone();
    batch.sessions.push(w);
    store.commit(batch).await.expect("deliver");
    s
}

/// The batch that fails a Prod session (`/Node/fail`), with the fail cap.
async fn fail_batch(store: &dyn Store, s: &Session, max: u32) -> Batch {
    let mut batch = Batch::default();
    for id in &s.nodes {
        let n = store.node(*id).await.expect("read").expect("exists");
        batch.nodes.push(
            NodeWrite::transition(&n, Cause::FailedByUser { hold_until: T0 }, Actor::Key(KeyId(1)), T0).expect("legal"),
        );
    }
    batch.sessions.push(SessionWrite::transition(s, SessionCause::FailedByUser { hold_until: T0 }, T0).expect("legal"));
    batch.guards.push(Guard::ProjectFailedNodesAtMost { project: "proj".into(), max });
    batch
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_operations_do_not_undo_their_batch_mates() {
    let t = common::fresh(SqliteOptions::default());
    let store: &dyn Store = &*t.store;
    add_ready(store, "n", 6, &pool7()).await;
    // A session to fail inside the batch: 2 nodes delivered.
    let held = store.claim(claim_req("held", 1, "proj", 2, T0)).await.expect("ok").expect("claimed");
    let held = deliver(store, &held).await;
    let stale = store.nodes().await.expect("nodes")[5].clone();
    let fresh_write = NodeWrite::transition(&stale, Cause::SetAdmin, Actor::Operator, T0).expect("legal");
    store.commit(Batch { nodes: vec![fresh_write.clone()], ..Batch::default() }).await.expect("set admin");
    let events_before = store.events(EventQuery::default()).await.expect("events").len();

    let raw = lock(&t.path());
    // Holds the writer in a batch of its own while the others queue (not a
    // pause: claims check the flag in their transaction).
    let blocker = send(store.set_paused(false)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = t.store.writer_stats();

    // Queued in this order, all into one batch. 3 Ready nodes are left.
    let claim_a = send(store.claim(claim_req("a", 1, "p", 2, T0))).await;
    let claim_too_many = send(store.claim(claim_req("b", 1, "p", 5, T0))).await;
    let conflict = send(store.commit(Batch { nodes: vec![fresh_write], ..Batch::default() })).await;
    let invalid = send(store.add_nodes(vec![NewNode::new("bad host", Arch::X86_64)], Actor::Operator, T0)).await;
    let added = send(store.add_nodes(vec![NewNode::new("new1", Arch::X86_64)], Actor::Operator, T0)).await;
    let duplicate = send(store.add_nodes(vec![NewNode::new("new1", Arch::X86_64)], Actor::Operator, T0)).await;
    let fail_over_cap = send(store.commit(fail_batch(store, &held, 1).await)).await;
    let fail_in_cap = send(store.commit(fail_batch(store, &held, 2).await)).await;
    let claim_c = send(store.claim(claim_req("c", 1, "p", 1, T0))).await;
    let bad_project =
        send(store.upsert_project(Project { name: "no way".into(), quota: None, ssh_keys: vec![] })).await;
    let project = send(store.upsert_project(Project { name: "proj".into(), quota: Some(9), ssh_keys: vec![] })).await;
    let target = send(store.set_pool_target(PoolTarget { pool: pool7(), standby: 4 })).await;
    let unpause = send(store.set_paused(false)).await;
    let claim_none_left = send(store.claim(claim_req("d", 1, "p", 1, T0))).await;
    unlock(raw);

    assert!(!blocker.await.expect("blocker"));
    let a = claim_a.await.expect("ok").expect("claimed");
    assert_eq!(claim_too_many.await.expect("ok"), Err(ClaimRefusal::InsufficientNodes { requested: 5, available: 1 }));
    assert!(matches!(conflict.await, Err(CommitError::Conflict(_))));
    assert!(matches!(invalid.await, Err(StoreError::Invalid(_))));
    let new1 = added.await.expect("added");
    assert!(matches!(duplicate.await, Err(StoreError::Duplicate(_))), "sees its batch-mate's node");
    match fail_over_cap.await {
        Err(CommitError::GuardFailed { actual: 2, .. }) => {}
        other => panic!("expected the guard to fail: {other:?}"),
    }
    // Built from the same versions as the refused one: it applies only if
    // the refused batch's writes were rolled back.
    fail_in_cap.await.expect("the refused fail left nothing behind");
    let c = claim_c.await.expect("ok").expect("claimed");
    assert!(matches!(bad_project.await, Err(StoreError::Invalid(_))));
    project.await.expect("project");
    target.await.expect("target");
    assert!(!unpause.await.expect("unpause"), "never paused");
    assert_eq!(claim_none_left.await.expect("ok"), Err(ClaimRefusal::InsufficientNodes { requested: 1, available: 0 }));

    let after = t.store.writer_stats();
    // `before` was read while the blocker's batch was running: the 14
    // operations queued behind it ran in exactly one transaction.
    assert_eq!(after.operations - before.operations, 14, "{before:?} -> {after:?}");
    assert_eq!(after.transactions - before.transactions, 1, "{before:?} -> {after:?}");
    assert_eq!(after.failed_transactions, 0);

    // What the batch left: exactly the accepted operations.
    let a_nodes: Vec<_> = a.nodes.iter().map(|n| n.id).collect();
    let c_nodes: Vec<_> = c.nodes.iter().map(|n| n.id).collect();
    assert_eq!(a_nodes.len() + c_nodes.len(), 3);
    assert!(a_nodes.iter().all(|id| !c_nodes.contains(id)));
    let s = store.session(&held.id).await.expect("read").expect("exists");
    assert_eq!((s.state, s.version), (SessionState::Fail, held.version + 1));
    for id in &held.nodes {
        assert_eq!(store.node(*id).await.expect("read").expect("exists").state, NodeState::Failed);
    }
    assert_eq!(store.node_by_hostname("new1").await.expect("read"), Some(new1[0].clone()));
    assert_eq!(store.project("proj").await.expect("read").and_then(|p| p.quota), Some(9));
    assert!(!store.paused().await.expect("read"));
    assert_eq!(store.pool_targets().await.expect("read"), vec![PoolTarget { pool: pool7(), standby: 4 }]);
    let events = store.events(EventQuery::default()).await.expect("events");
    // 3 Allocated, 1 Added, 2 FailedByUser.
    assert_eq!(events.len(), events_before + 6);
    assert!(events.windows(2).all(|w| w[1].seq == w[0].seq + 1), "seq is dense and increasing");
    check_invariants(store).await.expect("invariants");
    check_history(store).await.expect("history");

    // And all of it is on disk.
    let path = t.path();
    let TempStoreParts { dir, store: old } = split(t);
    drop(old);
    let reopened = SqliteStore::open(&path, SqliteOptions::default()).expect("reopen");
    assert_eq!(reopened.events(EventQuery::default()).await.expect("events"), events);
    assert!(reopened.session(&c.session.id).await.expect("read").is_some());
    drop(reopened);
    drop(dir);
}

struct TempStoreParts {
    dir: tempfile::TempDir,
    store: SqliteStore,
}

fn split(t: common::TempStore) -> TempStoreParts {
    let store = std::sync::Arc::try_unwrap(t.store).expect("sole owner");
    TempStoreParts { dir: t.dir, store }
}

/// A deferred foreign key that a trigger breaks when an event's detail is
/// "boom": SQLite refuses the COMMIT (not the statement, not the savepoint).
fn arm_commit_failure(path: &std::path::Path) {
    let c = Connection::open(path).expect("raw open");
    c.execute_batch(
        "CREATE TABLE boom_parent (id INTEGER PRIMARY KEY);
         CREATE TABLE boom (x INTEGER REFERENCES boom_parent (id) DEFERRABLE INITIALLY DEFERRED);
         CREATE TRIGGER boom_on_event AFTER INSERT ON events WHEN NEW.detail = 'boom'
         BEGIN INSERT INTO boom (x) VALUES (42); END;",
    )
    .expect("arm");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_commit_fails_every_operation_of_its_batch() {
    let t = common::fresh(SqliteOptions::default());
    let store: &dyn Store = &*t.store;
    let nodes = store.add_nodes(vec![NewNode::new("n0", Arch::X86_64)], Actor::Operator, T0).await.expect("add");
    arm_commit_failure(&t.path());
    let mut boom = NodeWrite::transition(&nodes[0], Cause::SetAdmin, Actor::Operator, T0).expect("legal");
    boom.event.detail = Some("boom".into());

    let raw = lock(&t.path());
    let blocker = send(store.set_paused(true)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = t.store.writer_stats();
    let added = send(store.add_nodes(vec![NewNode::new("x1", Arch::X86_64)], Actor::Operator, T0)).await;
    let exploding = send(store.commit(Batch { nodes: vec![boom], ..Batch::default() })).await;
    let target = send(store.set_pool_target(PoolTarget { pool: pool7(), standby: 2 })).await;
    let refused = send(store.claim(claim_req("s", 1, "p", 1, T0))).await;
    unlock(raw);

    assert!(!blocker.await.expect("the blocker's batch is fine"));
    let backend = |e: &StoreError| matches!(e, StoreError::Backend { context, .. } if context.contains("committing"));
    match added.await {
        Err(e) => assert!(backend(&e), "{e}"),
        Ok(v) => panic!("should have failed with its batch: {v:?}"),
    }
    match exploding.await {
        Err(CommitError::Store(e)) => assert!(backend(&e), "{e}"),
        other => panic!("{other:?}"),
    }
    match target.await {
        Err(e) => assert!(backend(&e), "{e}"),
        Ok(()) => panic!("should have failed with its batch"),
    }
    match refused.await {
        Err(e) => assert!(backend(&e), "{e}"),
        Ok(r) => panic!("even a refusal is not an answer when the batch failed: {r:?}"),
    }
    let after = t.store.writer_stats();
    assert_eq!(after.failed_transactions - before.failed_transactions, 1);
    assert_eq!((after.transactions - before.transactions, after.operations - before.operations), (1, 4));

    // The store says its writes are failing (reads work: not Failed)...
    assert!(matches!(store.health(), duffy_core::StoreHealth::Degraded(_)), "{:?}", store.health());
    // Nothing of the failed batch is there, and the store goes on working.
    assert_eq!(store.node_by_hostname("x1").await.expect("read"), None);
    assert!(store.pool_targets().await.expect("read").is_empty());
    assert_eq!(store.node(nodes[0].id).await.expect("read"), Some(nodes[0].clone()));
    assert!(store.paused().await.expect("read"));
    store.add_nodes(vec![NewNode::new("x1", Arch::X86_64)], Actor::Operator, T0).await.expect("works again");
    assert_eq!(store.health(), duffy_core::StoreHealth::Ok, "...until a write commits again");
    check_history(store).await.expect("history");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_database_fails_the_batch_and_the_store_recovers() {
    let options = SqliteOptions { busy_timeout: Duration::from_millis(100), ..SqliteOptions::default() };
    let t = common::fresh(options);
    let store: &dyn Store = &*t.store;
    let raw = lock(&t.path());
    let r = store.set_pool_target(PoolTarget { pool: pool7(), standby: 1 }).await;
    assert!(matches!(r, Err(StoreError::Backend { .. })), "{r:?}");
    unlock(raw);
    store.set_pool_target(PoolTarget { pool: pool7(), standby: 1 }).await.expect("works again");
    assert_eq!(t.store.writer_stats().failed_transactions, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_do_not_wait_for_the_writer() {
    let t = common::fresh(SqliteOptions::default());
    let store: &dyn Store = &*t.store;
    let ready = add_ready(store, "n", 3, &pool7()).await;
    let raw = lock(&t.path());
    // An uncommitted write from the other connection is invisible too.
    raw.execute("UPDATE settings SET paused = 1", []).expect("dirty write");
    let mut write = send(store.claim(claim_req("s", 1, "p", 1, T0))).await;
    let reads = async {
        assert_eq!(store.nodes().await.expect("nodes").len(), 3);
        assert_eq!(store.node(ready[0].id).await.expect("node"), Some(ready[0].clone()));
        assert!(store.live_sessions().await.expect("live").is_empty());
        assert_eq!(store.ready_counts().await.expect("counts"), vec![(pool7(), 3)]);
        assert!(!store.paused().await.expect("paused"));
        store.events(EventQuery::default()).await.expect("events").len()
    };
    let n = tokio::time::timeout(Duration::from_secs(2), reads).await.expect("reads finish while the writer waits");
    assert_eq!(n, 9);
    assert!(poll!(&mut write).is_pending(), "the write is still waiting for the lock");
    unlock(raw);
    write.await.expect("ok").expect("claimed");
    assert_eq!(store.live_sessions().await.expect("live").len(), 1, "a read after the answer sees the write");
}

#[test]
fn works_without_tokio() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SqliteStore::open(dir.path().join("duffy.db"), SqliteOptions::default()).expect("open");
    futures::executor::block_on(async {
        let ready = add_ready(&store, "n", 2, &pool7()).await;
        let c = store.claim(claim_req("s", 1, "p", 2, T0)).await.expect("ok").expect("claimed");
        assert_eq!(c.nodes.iter().map(|n| n.id).collect::<Vec<_>>(), vec![ready[0].id, ready[1].id]);
        // Many operations at once from one thread: still answered.
        let futs = (0..50).map(|i| {
            let mut p = PoolKey::new("7", Arch::X86_64, None);
            p.release = format!("r{i}");
            store.set_pool_target(PoolTarget { pool: p, standby: i })
        });
        for r in futures::future::join_all(futs).await {
            r.expect("set");
        }
        assert_eq!(store.pool_targets().await.expect("read").len(), 50);
        check_invariants(&store).await.expect("invariants");
    });
    let stats = store.writer_stats();
    assert!(stats.transactions < stats.operations, "concurrent operations were batched: {stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn normal_synchronous_and_a_batch_of_one_behave_the_same() {
    for options in [
        SqliteOptions { synchronous: duffy_backend_sqlite::Synchronous::Normal, ..SqliteOptions::default() },
        SqliteOptions { max_batch: 1, read_connections: 1, ..SqliteOptions::default() },
    ] {
        let t = common::fresh(options.clone());
        let store: &dyn Store = &*t.store;
        add_ready(store, "n", 8, &pool7()).await;
        let futs = (0..8).map(|i| store.claim(claim_req(&format!("s{i}"), 1, "p", 1, T0)));
        let got = futures::future::join_all(futs).await;
        assert!(got.iter().all(|r| matches!(r, Ok(Ok(_)))), "{got:?}");
        check_invariants(store).await.expect("invariants");
        let path = t.path();
        let TempStoreParts { dir, store } = split(t);
        drop(store);
        let reopened = SqliteStore::open(&path, options).expect("reopen");
        assert_eq!(reopened.live_sessions().await.expect("live").len(), 8);
        drop(reopened);
        drop(dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_fsyncs_before_answering_and_normal_never_does() {
    let t = common::fresh(SqliteOptions::default());
    let store: &dyn Store = &*t.store;
    for i in 0..20u32 {
        let before = t.store.writer_stats().syncs;
        store.set_pool_target(PoolTarget { pool: pool7(), standby: i }).await.expect("set");
        assert!(t.store.writer_stats().syncs > before, "answered only after an fsync of its own");
    }
    // Concurrent operations share fsyncs.
    let before = t.store.writer_stats();
    let futs = (0..200u32).map(|i| {
        let mut p = pool7();
        p.release = format!("r{i}");
        store.set_pool_target(PoolTarget { pool: p, standby: i })
    });
    for r in futures::future::join_all(futs).await {
        r.expect("set");
    }
    let after = t.store.writer_stats();
    assert_eq!(after.operations - before.operations, 200);
    assert!(after.syncs - before.syncs < 200, "{before:?} -> {after:?}");

    let t = common::fresh(SqliteOptions {
        synchronous: duffy_backend_sqlite::Synchronous::Normal,
        ..SqliteOptions::default()
    });
    t.store.set_paused(true).await.expect("set");
    assert_eq!(t.store.writer_stats().syncs, 0);
}

/// Writes continuously from 8 tasks until the writer has restarted the WAL
/// `restarts` times, or until `budget` nodes were written. Returns what
/// was wrong: no restart within the budget, or a WAL file that grew past
/// what restarting keeps it to.
async fn check_wal_restarts(options: SqliteOptions, restarts: u64, budget: u64) -> Result<(), String> {
    // A checkpoint from another connection never catches up with a writer
    // that never stops; the writer finishes it between batches when asked.
    let t = common::fresh(options);
    let written = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let store = t.store.clone();
            let (stop, written) = (stop.clone(), written.clone());
            tokio::spawn(async move {
                let mut i = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let nodes = (0..20).map(|k| NewNode::new(format!("w{w}-{i}-{k}"), Arch::X86_64)).collect();
                    store.add_nodes(nodes, Actor::Operator, T0).await.expect("add");
                    written.fetch_add(20, std::sync::atomic::Ordering::Relaxed);
                    i += 1;
                }
            })
        })
        .collect();
    let wal = {
        let mut p = t.path().into_os_string();
        p.push("-wal");
        std::path::PathBuf::from(p)
    };
    let mut largest_wal = 0;
    while t.store.writer_stats().wal_restarts < restarts
        && written.load(std::sync::atomic::Ordering::Relaxed) < budget
        && std::time::Instant::now() < deadline
    {
        largest_wal = largest_wal.max(std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        w.await.expect("writer");
    }
    largest_wal = largest_wal.max(std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0));
    let stats = t.store.writer_stats();
    let written = written.load(std::sync::atomic::Ordering::Relaxed);
    check_history(&*t.store).await?;
    eprintln!("{written} nodes written, WAL at most {largest_wal} bytes: {stats:?}");
    if stats.wal_restarts < restarts {
        return Err(format!("{} WAL restarts after {written} nodes written: {stats:?}", stats.wal_restarts));
    }
    // The checkpointer asks for a restart past 2000 frames (8 MiB); the WAL
    // may run ahead of it by what is written meanwhile, not by multiples.
    if largest_wal > 32 << 20 {
        return Err(format!("the WAL grew to {largest_wal} bytes although it restarted: {stats:?}"));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wal_restarts_under_continuous_writes() {
    for synchronous in [Synchronous::Normal, Synchronous::Full] {
        let options = SqliteOptions { synchronous, ..SqliteOptions::default() };
        check_wal_restarts(options, 2, 2_000_000).await.unwrap_or_else(|e| panic!("{synchronous:?}: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wal_restart_check_catches_a_writer_that_never_checkpoints() {
    let hooks = TestHooks { skip_writer_checkpoint: true, ..TestHooks::default() };
    let options = SqliteOptions { test_hooks: hooks, ..SqliteOptions::default() };
    let e = check_wal_restarts(options, 2, 40_000).await.expect_err("must be caught");
    assert!(e.contains("0 WAL restarts"), "{e}");
}
