//! `/metrics` over a real socket against a service on a real SQLite file:
//! every route is counted under its own label.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::sync::Arc;

use duffy_backend_sqlite::{SqliteOptions, SqliteStore};
use duffy_http::api::ROUTES;
use duffy_http::config::{Config, HardwareConfig, PoolConfig, SimulatedConfig};
use duffy_http::{Running, build_engine, start_with};

struct Service {
    running: Running,
    base: String,
    client: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Service {
    /// A simulated farm of 4 machines, one pool of 2, on a fresh file.
    async fn start() -> Service {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(SqliteStore::open(dir.path().join("duffy.db"), SqliteOptions::default()).expect("open"));
        let cfg = Config {
            database: dir.path().join("duffy.db"),
            pools: vec![PoolConfig {
                release: "9".into(),
                arch: duffy_core::Arch::X86_64,
                flavor: None,
                standby: 2,
                installer: None,
            }],
            hardware: HardwareConfig::Simulated(SimulatedConfig {
                machines: 4,
                install_min_ms: 5,
                install_max_ms: 10,
                prepare_ms: 1,
                ..SimulatedConfig::default()
            }),
            ..Config::default()
        };
        let built = build_engine(&cfg, store).await.expect("engine");
        let running = start_with("127.0.0.1:0".parse().unwrap(), built, true).await.expect("start");
        let base = format!("http://{}", running.addr);
        Service { running, base, client: reqwest::Client::new(), _dir: dir }
    }

    async fn get(&self, path: &str) -> (u16, String) {
        let r = self.client.get(format!("{}{path}", self.base)).send().await.expect("request");
        (r.status().as_u16(), r.text().await.expect("body"))
    }
}

/// The router, the metrics' labels and the fuzz test read one list of
/// routes: each is counted under its own label (the install endpoints
/// used to be counted as "other"), and only unknown paths are "other".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_is_counted_under_its_own_label() {
    let s = Service::start().await;
    for r in ROUTES {
        let (_, body) = s.get(&r.path.replace("{node}", "n1.sim.duffy")).await;
        assert!(!body.contains("no such endpoint"), "{} is routed: {body}", r.path);
    }
    assert_eq!(s.get("/no/such/path").await.0, 404);
    let (_, m) = s.get("/metrics").await;
    for r in ROUTES {
        let label = format!("duffy_http_requests_total{{endpoint=\"{}\",", r.label());
        assert!(m.contains(&label), "{label} in\n{m}");
    }
    assert!(m.contains("duffy_http_requests_total{endpoint=\"other\",status=\"4xx\"} 1\n"), "{m}");
    s.running.stop().await.expect("stop");
}
