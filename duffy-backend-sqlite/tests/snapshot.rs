//! A read that the `Store` trait answers as one snapshot is one snapshot
//! in SQLite too, however many statements it runs.
//!
//! `nodes_in_states` with several states runs one index scan per state.
//! The test hook `between_read_statements` runs between two scans; the
//! test commits a write exactly there, from another connection, that moves
//! one node from the state scanned second into the state scanned first and
//! another node the other way. Any single snapshot lists both nodes once;
//! statements that each see the latest commit list one twice and miss the
//! other. Deterministic: the write always lands between the scans.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use duffy_backend_sqlite::{SqliteOptions, SqliteStore, TestHooks};
use duffy_core::testkit::conformance::{add_ready, pool7};
use duffy_core::{Actor, Arch, NewNode, NodeId, NodeState, Store, Timestamp};
use rusqlite::Connection;

const T0: Timestamp = Timestamp(1_700_000_000_000);

/// Makes the Ready node `a` Active and the Active node `b` Ready, from a
/// connection of its own, in one transaction (committed and visible to
/// any statement that starts afterwards).
fn swap_states(path: &PathBuf, a: NodeId, b: NodeId) {
    let c = Connection::open(path).expect("raw open");
    c.busy_timeout(Duration::from_secs(5)).expect("busy timeout");
    c.execute_batch(&format!(
        "BEGIN IMMEDIATE;
         UPDATE nodes SET state = 'Active' WHERE id = {a} AND state = 'Ready';
         UPDATE nodes SET state = 'Ready' WHERE id = {b} AND state = 'Active';
         COMMIT;",
        a = a.0,
        b = b.0
    ))
    .expect("swap the two nodes' states");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_in_states_reads_one_snapshot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("duffy.db");
    // The hook is armed after the setup, and fires once.
    let armed = Arc::new(AtomicBool::new(false));
    let pair: Arc<Mutex<Option<(NodeId, NodeId)>>> = Arc::default();
    let fired = Arc::new(AtomicBool::new(false));
    let hook = {
        let (armed, pair, fired, path) = (armed.clone(), pair.clone(), fired.clone(), path.clone());
        Arc::new(move || {
            if armed.swap(false, Ordering::SeqCst) {
                let (a, b) = pair.lock().expect("lock").expect("set before arming");
                swap_states(&path, a, b);
                fired.store(true, Ordering::SeqCst);
            }
        })
    };
    let options = SqliteOptions {
        test_hooks: TestHooks { between_read_statements: Some(hook), ..TestHooks::default() },
        ..SqliteOptions::default()
    };
    let store = SqliteStore::open(&path, options).expect("open");
    // One Ready node (scanned second: Active < Ready) and one Active node
    // (scanned first).
    let ready = add_ready(&store, "r", 1, &pool7()).await[0].clone();
    let active =
        store.add_nodes(vec![NewNode::new("a0", Arch::X86_64)], Actor::Operator, T0).await.expect("add")[0].clone();
    assert!(NodeState::Active < NodeState::Ready, "the test relies on the scan order");
    *pair.lock().expect("lock") = Some((ready.id, active.id));

    // Without the hook, the read is what it should be.
    let before = store.nodes_in_states(&[NodeState::Ready, NodeState::Active]).await.expect("read");
    assert_eq!(
        before.iter().map(|n| (n.id, n.state)).collect::<Vec<_>>(),
        vec![(ready.id, NodeState::Ready), (active.id, NodeState::Active)]
    );

    armed.store(true, Ordering::SeqCst);
    let got = store.nodes_in_states(&[NodeState::Ready, NodeState::Active]).await.expect("read");
    assert!(fired.load(Ordering::SeqCst), "the write was committed between the two scans");
    let seen: Vec<(NodeId, NodeState)> = got.iter().map(|n| (n.id, n.state)).collect();
    // Either snapshot (before or after the swap) is a right answer; a mix
    // of the two is not.
    let old = vec![(ready.id, NodeState::Ready), (active.id, NodeState::Active)];
    let new = vec![(ready.id, NodeState::Active), (active.id, NodeState::Ready)];
    assert!(seen == old || seen == new, "not one snapshot: {seen:?} (before: {old:?}, after: {new:?})");

    // And the swap did happen: a later read sees it.
    let after = store.nodes_in_states(&[NodeState::Ready, NodeState::Active]).await.expect("read");
    assert_eq!(after.iter().map(|n| (n.id, n.state)).collect::<Vec<_>>(), new);
    drop(store);
}
