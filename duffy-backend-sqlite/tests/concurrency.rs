//! The core's 64-task race ([`duffy_core::testkit::race`]) on one SQLite
//! store, and what it shows of group commit: thousands of write
//! operations, batched, none failed.

mod common;

use std::sync::Arc;

use duffy_backend_sqlite::SqliteOptions;
use duffy_core::Store;
use duffy_core::testkit::race;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_tasks_never_share_a_node() {
    let t = common::fresh(SqliteOptions::default());
    let store: Arc<dyn Store> = t.store.clone();
    let before = t.store.writer_stats();
    let report = race::run(&[store], 40).await;
    let stats = t.store.writer_stats();
    let ops = stats.operations - before.operations;
    let txs = stats.transactions - before.transactions;
    eprintln!("{report:?}; {ops} write operations in {txs} transactions ({:.1} per commit)", ops as f64 / txs as f64);
    assert!(ops >= 3000, "thousands of operations: {ops}");
    assert!(txs < ops / 2, "group commit batched: {ops} operations in {txs} transactions");
    assert_eq!(stats.failed_transactions, 0);
}
