//! A store that stops for good while the service runs (a failed fsync of
//! the WAL: nothing unsynced can be trusted until the file is reopened)
//! stops the service with an error, so that its supervisor restarts it
//! and the store is reopened, instead of answering 503 to everything
//! forever. Until it stops, `/healthz` says the store is unavailable.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use duffy_backend_sqlite::{SqliteOptions, SqliteStore, TestHooks};
use duffy_core::clock::SystemClock;
use duffy_core::{Clock, Policy, Store, StoreHealth};
use duffy_http::config::{Config, HardwareConfig, SimulatedConfig};
use duffy_http::{ServeError, build_engine, serve_until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fsync_stops_the_service_with_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("duffy.db");
    let broken = Arc::new(AtomicBool::new(false));
    let b = broken.clone();
    let hooks = TestHooks {
        wal_sync: Some(Arc::new(move |wal: &std::fs::File| {
            if b.load(Ordering::SeqCst) { Err(std::io::Error::other("EIO (simulated)")) } else { wal.sync_data() }
        })),
        ..TestHooks::default()
    };
    let store: Arc<dyn Store> =
        Arc::new(SqliteStore::open(&path, SqliteOptions { test_hooks: hooks, ..SqliteOptions::default() }).unwrap());
    let key = duffy_http::keys::create_key(&*store, "jobs", false, None, SystemClock.now()).await.unwrap().0;
    let cfg = Config {
        database: path.clone(),
        policy: Policy { rate_limit: None, tick: Duration::from_millis(200), ..Policy::default() },
        hardware: HardwareConfig::Simulated(SimulatedConfig {
            machines: 8,
            install_min_ms: 5,
            install_max_ms: 10,
            prepare_ms: 0,
            ..SimulatedConfig::default()
        }),
        ..Config::default()
    };
    let built = build_engine(&cfg, store.clone()).await.unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let served = tokio::spawn(serve_until(addr, built, std::future::pending()));
    let base = format!("http://{addr}");
    let client = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = client.get(format!("{base}/healthz")).send().await {
            if r.status() == 200 {
                break;
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "the service did not come up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The disk starts failing: the next write's fsync fails.
    broken.store(true, Ordering::SeqCst);
    let r = client.get(format!("{base}/Node/get?key={key}")).send().await.unwrap();
    assert_eq!(r.status(), 503, "{:?}", r.text().await);
    assert!(matches!(store.health(), StoreHealth::Failed(_)), "{:?}", store.health());

    // The service stops by itself, with an error naming the cause.
    let result = tokio::time::timeout(Duration::from_secs(20), served).await.expect("stopped within 20 s").unwrap();
    match result {
        Err(e @ ServeError::StoreFailed(_)) => {
            let msg = e.to_string();
            assert!(msg.contains("fsync") && msg.contains("restart"), "{msg}");
        }
        other => panic!("expected the service to stop because of the store: {other:?}"),
    }
    assert!(client.get(format!("{base}/healthz")).send().await.is_err(), "nothing listens any more");
}
