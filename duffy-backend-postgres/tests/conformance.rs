//! duffy-core's `Store` conformance suite, on a fresh PostgreSQL database
//! per check (the same macro as every backend).

mod common;

duffy_core::store_conformance_tests!(|| async {
    // The store first: it closes before its database is dropped.
    let (store, db) = common::fresh().await;
    (std::sync::Arc::new(store), db)
});

/// The wave check above can fail: a store whose fenced writes skip the
/// epoch check writes a former term's wave.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_the_fence_check_a_former_terms_wave_is_caught() {
    use futures::FutureExt;
    let db = duffy_backend_postgres::test_cluster::shared().database().await;
    let hooks = duffy_backend_postgres::PgTestHooks { skip_fence_check: true, ..Default::default() };
    let options = duffy_backend_postgres::PgOptions { test_hooks: hooks, ..common::options() };
    let store = duffy_backend_postgres::PgStore::connect(&db.url, options).await.expect("connect");
    let check = duffy_core::testkit::conformance::commit_each_fenced_writes_each_on_its_own_within_the_term;
    let caught = std::panic::AssertUnwindSafe(check(std::sync::Arc::new(store))).catch_unwind().await;
    assert!(caught.is_err(), "a former term's wave was written and the check did not notice");
}
