//! The core's 64-task race ([`duffy_core::testkit::race`]) on one
//! PostgreSQL database through two stores (two connection pools, as two
//! replicas have): half the tasks go through each.

mod common;

use std::sync::Arc;

use duffy_backend_postgres::PgStore;
use duffy_core::Store;
use duffy_core::testkit::race;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_tasks_never_share_a_node() {
    let (a, db) = common::fresh().await;
    let b = PgStore::connect(&db.url, common::options()).await.expect("second store");
    let stores: [Arc<dyn Store>; 2] = [Arc::new(a.clone()), Arc::new(b.clone())];
    let report = race::run(&stores, 30).await;
    eprintln!("{report:?}; store stats {:?} and {:?}", a.stats(), b.stats());
}
