//! `/metrics` over a real socket against a service on a real SQLite file:
//! every route is counted under its own label, and what operators look at
//! first is there (Ready per pool against its target, installs by reason,
//! allocations, sessions, reconciler passes, the store's batches and
//! fsyncs).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::sync::Arc;
use std::time::{Duration, Instant};

use duffy_backend_sqlite::{SqliteOptions, SqliteStore};
use duffy_core::clock::SystemClock;
use duffy_core::{Clock, Policy, Store};
use duffy_http::api::ROUTES;
use duffy_http::config::{Config, HardwareConfig, PoolConfig, SimulatedConfig};
use duffy_http::{Running, build_engine, start_with};

struct Service {
    running: Running,
    base: String,
    client: reqwest::Client,
    store: Arc<SqliteStore>,
    _dir: tempfile::TempDir,
}

impl Service {
    /// A simulated farm of 4 machines, one pool of `standby`, on a fresh
    /// file; `broken` machines fail every install.
    async fn start(standby: u32, broken: &[&str]) -> Service {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(SqliteStore::open(dir.path().join("duffy.db"), SqliteOptions::default()).expect("open"));
        let cfg = Config {
            database: dir.path().join("duffy.db"),
            policy: Policy {
                rate_limit: None,
                install_attempts: 2,
                install_backoff: Duration::from_millis(10),
                failed_retry_after: None,
                tick: Duration::from_millis(100),
                ..Config::default().policy
            },
            pools: vec![PoolConfig {
                release: "9".into(),
                arch: duffy_core::Arch::X86_64,
                flavor: None,
                standby,
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
        let mut built = build_engine(&cfg, store.clone()).await.expect("engine");
        for host in broken {
            built.sim.as_ref().expect("simulated").break_install(host, true);
        }
        built.store_stats = Some(store.clone());
        let running = start_with("127.0.0.1:0".parse().unwrap(), built, true).await.expect("start");
        let base = format!("http://{}", running.addr);
        Service { running, base, client: reqwest::Client::new(), store, _dir: dir }
    }

    async fn get(&self, path: &str) -> (u16, String) {
        let r = self.client.get(format!("{}{path}", self.base)).send().await.expect("request");
        (r.status().as_u16(), r.text().await.expect("body"))
    }

    /// `/metrics` once every line of `wanted` is in it (bounded wait).
    async fn metrics_with(&self, wanted: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (status, m) = self.get("/metrics").await;
            assert_eq!(status, 200, "{m}");
            if wanted.iter().all(|w| m.contains(&format!("{w}\n"))) {
                return m;
            }
            assert!(Instant::now() < deadline, "never saw all of {wanted:#?} in\n{m}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The value of the one sample named `series` (name and labels).
fn value(m: &str, series: &str) -> f64 {
    let line = m.lines().find(|l| l.starts_with(&format!("{series} "))).unwrap_or_else(|| panic!("{series} in\n{m}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

/// The router, the metrics' labels and the fuzz test read one list of
/// routes: each is counted under its own label (the install endpoints
/// used to be counted as "other"), and only unknown paths are "other".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_is_counted_under_its_own_label() {
    let s = Service::start(2, &[]).await;
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

/// What an operator looks at first, from a farm with one machine that
/// never installs: the pool short of its target, the failed installs by
/// reason, a handed-out session and its age, the reconciler's passes, and
/// the store's group commits and fsyncs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_see_pools_installs_sessions_and_the_store() {
    let s = Service::start(4, &["n1.sim.duffy"]).await;
    let m = s
        .metrics_with(&[
            "duffy_pool_target{pool=\"9/x86_64\"} 4",
            "duffy_pool_ready{pool=\"9/x86_64\"} 3",
            "duffy_install_attempts_failed_total{reason=\"installer\"} 2",
            "duffy_installs_failed_total{reason=\"installer\"} 1",
            "duffy_installs_finished_total{outcome=\"installed\"} 3",
            "duffy_installs_finished_total{outcome=\"failed\"} 1",
            "duffy_nodes{state=\"Failed\",pool=\"9/x86_64\"} 1",
        ])
        .await;
    assert_eq!(value(&m, "duffy_installs_started_total{reason=\"fill\"}"), 4.0, "{m}");
    assert_eq!(value(&m, "duffy_install_attempts_failed_total{reason=\"timeout\"}"), 0.0, "{m}");
    assert!(value(&m, "duffy_reconciler_pass_duration_seconds_count") >= 1.0, "{m}");
    assert_eq!(value(&m, "duffy_reconciler_pass_failures_total"), 0.0, "{m}");

    let store: Arc<dyn Store> = s.store.clone();
    let key = duffy_http::keys::create_key(&*store, "jobs", false, None, SystemClock.now()).await.unwrap().0;
    let (status, body) = s.get(&format!("/Node/get?key={key}&ver=9&count=2")).await;
    assert_eq!(status, 200, "{body}");
    let m =
        s.metrics_with(&["duffy_sessions{state=\"Prod\"} 1", "duffy_allocations_total{outcome=\"allocated\"} 1"]).await;
    assert_eq!(value(&m, "duffy_nodes_allocated_total"), 2.0, "{m}");
    assert!(value(&m, "duffy_oldest_session_age_seconds{state=\"Prod\"}") >= 0.0, "{m}");
    assert_eq!(value(&m, "duffy_sessions{state=\"Fail\"}"), 0.0, "{m}");
    assert_eq!(value(&m, "duffy_nodes{state=\"Deployed\",pool=\"9/x86_64\"}"), 2.0, "{m}");

    // The store's write path, as the SQLite store measures it.
    let h = s.store.write_histograms();
    assert!(h.batch_operations.count > 0 && h.fsync_seconds.count > 0, "{h:?}");
    let batches = value(&m, "duffy_store_batch_operations_count");
    assert!(batches > 0.0, "{m}");
    assert!(value(&m, "duffy_store_batch_operations_sum") >= batches, "{m}");
    assert_eq!(value(&m, "duffy_store_batch_operations_bucket{le=\"+Inf\"}"), batches, "{m}");
    assert!(value(&m, "duffy_store_fsync_duration_seconds_count") > 0.0, "{m}");
    assert!(m.contains("# TYPE duffy_store_fsync_duration_seconds histogram\n"), "{m}");
    s.running.stop().await.expect("stop");
}
