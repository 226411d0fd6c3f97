//! A node's history is a chain of events (each naming its node's previous
//! one), not an index: read back per node, it must be exactly that node's
//! events in the log, in order, with `after_seq` and `limit` applied as for
//! the whole log; and a broken chain must be caught, never read as a
//! shorter history or followed forever.

mod common;

use duffy_backend_sqlite::SqliteOptions;
use duffy_core::testkit::conformance::{add_ready, check_history, claim_ok, claim_req, pool7, release};
use duffy_core::{Actor, Batch, Cause, Event, EventQuery, NodeId, NodeWrite, Store, StoreError, Timestamp};
use rusqlite::Connection;

fn history(store: &dyn Store, node: NodeId, after_seq: u64, limit: usize) -> Result<Vec<Event>, StoreError> {
    futures::executor::block_on(store.events(EventQuery { node: Some(node), after_seq, limit }))
}

/// Takes a released node back to Ready, as the reconciler would.
async fn reinstall(store: &dyn Store, id: NodeId) {
    let causes =
        [Cause::InstallStarted { image: pool7(), why: "test".into() }, Cause::InstallSucceeded { host_key: None }];
    for cause in causes {
        let n = store.node(id).await.expect("read").expect("exists");
        let w = NodeWrite::transition(&n, cause, Actor::Reconciler, Timestamp(30)).expect("legal");
        store.commit(Batch { nodes: vec![w], ..Batch::default() }).await.expect("write");
    }
}

/// Ten nodes taken through interleaved claims and releases: every node's
/// history, from every starting point and with every limit, is the log
/// filtered.
#[test]
fn every_nodes_history_is_its_events_in_the_log() {
    let t = common::fresh(SqliteOptions::default());
    let store = &*t.store;
    futures::executor::block_on(async {
        add_ready(store, "n", 10, &pool7()).await;
        for round in 0..6u64 {
            let mut held = Vec::new();
            for k in 0..(round % 3 + 1) {
                held.push(claim_ok(store, claim_req(&format!("s{round}-{k}"), 1, "p", 2, Timestamp(10))).await);
            }
            for c in held {
                release(store, &c.session.id, Timestamp(20)).await.expect("release");
                for n in &c.nodes {
                    reinstall(store, n.id).await;
                }
            }
        }
        check_history(store).await.expect("histories");
    });
    let all = futures::executor::block_on(store.events(EventQuery::default())).expect("log");
    let nodes = futures::executor::block_on(store.nodes()).expect("nodes");
    for n in &nodes {
        let own: Vec<Event> = all.iter().filter(|e| e.node == n.id).cloned().collect();
        assert!(own.len() >= 3, "node {} has a history", n.id);
        for (i, e) in std::iter::once(0).chain(own.iter().map(|e| e.seq)).enumerate() {
            for limit in [0, 1, 2, 100] {
                let want: Vec<Event> = own
                    .iter()
                    .filter(|x| x.seq > e)
                    .take(if limit == 0 { usize::MAX } else { limit })
                    .cloned()
                    .collect();
                assert_eq!(
                    history(store, n.id, e, limit).expect("read"),
                    want,
                    "node {} after #{i} limit {limit}",
                    n.id
                );
            }
        }
    }
    assert_eq!(history(store, NodeId(9999), 0, 0).expect("read"), Vec::new(), "no such node: no history");
}

/// A chain cut short (an event that forgets its predecessor) is caught by
/// the history check; a chain that loops is an error, not a hang.
#[test]
fn a_broken_chain_is_caught() {
    let t = common::fresh(SqliteOptions::default());
    let ready = futures::executor::block_on(add_ready(&*t.store, "n", 2, &pool7()));
    let victim = ready[1].id;
    futures::executor::block_on(check_history(&*t.store)).expect("whole to start with");
    let own = history(&*t.store, victim, 0, 0).expect("read");
    assert_eq!(own.len(), 3);
    let raw = Connection::open(t.path()).expect("raw");
    // The last event forgets the one before it.
    raw.execute("UPDATE events SET prev = NULL WHERE seq = ?1", [own[2].seq as i64]).expect("cut");
    drop(raw);
    // A fresh store: nothing cached from before the cut.
    let path = t.path();
    let again = common::open(&path, SqliteOptions::default());
    let e = futures::executor::block_on(check_history(&again)).expect_err("a cut chain must be caught");
    assert!(e.contains("history"), "{e}");
    drop(again);
    let raw = Connection::open(&path).expect("raw");
    // Now it points at itself.
    raw.execute("UPDATE events SET prev = seq WHERE seq = ?1", [own[2].seq as i64]).expect("loop");
    drop(raw);
    let again = common::open(&path, SqliteOptions::default());
    let r = history(&again, victim, 0, 0);
    assert!(matches!(r, Err(StoreError::Corrupt(_))), "{r:?}");
}
