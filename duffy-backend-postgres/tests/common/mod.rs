//! Helpers shared by the integration tests: a fresh database per test on
//! the test process's throwaway PostgreSQL (see `test_cluster`).
#![allow(dead_code)]

pub mod proxy;

use std::sync::Arc;

use duffy_backend_postgres::test_cluster::{self, TestDatabase};
use duffy_backend_postgres::{PgOptions, PgStore};

/// Options for tests: a small pool.
pub fn options() -> PgOptions {
    PgOptions { pool_size: 8, ..PgOptions::default() }
}

/// A fresh database and a store on it.
pub async fn fresh() -> (PgStore, TestDatabase) {
    let db = test_cluster::shared().database().await;
    let store = PgStore::connect(&db.url, options()).await.expect("connect");
    (store, db)
}

/// A plain connection to `url` (its driver runs in a task).
pub async fn raw(url: &str) -> tokio_postgres::Client {
    let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.expect("raw connection");
    tokio::spawn(conn);
    c
}

/// An engine over `store` with simulated hardware on a manual clock (time
/// moves only when a test moves it), no rate limit, no power checks.
pub fn engine(store: PgStore, clock: &duffy_core::testkit::ManualClock) -> duffy_core::Engine {
    let farm = Arc::new(duffy_core::sim::SimFarm::new(Arc::new(clock.clone()), duffy_core::sim::SimConfig::default()));
    let policy = duffy_core::Policy { rate_limit: None, power_check_interval: None, ..duffy_core::Policy::default() };
    duffy_core::Engine::builder(Arc::new(store), farm.clone(), farm, Arc::new(clock.clone()))
        .policy(policy)
        .build()
        .expect("engine")
}

/// Waits (at most `limit`) until `ready` says yes, polling every 20 ms;
/// returns how long it took.
pub async fn wait_until(
    limit: std::time::Duration,
    what: &str,
    mut ready: impl FnMut() -> bool,
) -> std::time::Duration {
    let start = std::time::Instant::now();
    while !ready() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    start.elapsed()
}
