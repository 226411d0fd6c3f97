//! A real `duffy` service for tests: SQLite file in a temp dir, simulated
//! farm, real HTTP on a loopback socket.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use duffy_core::clock::SystemClock;
use duffy_core::sim::SimFarm;
use duffy_core::{Clock, Policy, PoolTarget, Store};
use duffy_http::config::{Config, HardwareConfig, PoolConfig, SimulatedConfig};
use duffy_http::{Running, build_engine, start_with};

pub struct TestServer {
    pub running: Option<Running>,
    pub base: String,
    pub client: reqwest::Client,
    pub sim: Arc<SimFarm>,
    pub store: Arc<dyn Store>,
    pub dir: tempfile::TempDir,
}

pub struct Reply {
    pub status: u16,
    pub content_type: String,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
}

pub fn open_store(path: &std::path::Path) -> Arc<dyn Store> {
    Arc::new(
        duffy_backend_sqlite::SqliteStore::open(path, duffy_backend_sqlite::SqliteOptions::default())
            .expect("open sqlite store"),
    )
}

pub struct Setup {
    pub policy: Policy,
    pub machines: usize,
    pub pools: Vec<(String, duffy_core::Arch, u32)>,
    pub install_ms: (u64, u64),
    pub reconcile: bool,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            policy: Policy {
                rate_limit: None,
                max_concurrent_installs: 32,
                tick: Duration::from_millis(200),
                ..Policy::default()
            },
            machines: 12,
            pools: vec![("7".into(), duffy_core::Arch::X86_64, 6), ("6".into(), duffy_core::Arch::I386, 2)],
            install_ms: (5, 20),
            reconcile: true,
        }
    }
}

impl TestServer {
    pub async fn start(setup: Setup) -> TestServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open_store(&dir.path().join("duffy.db"));
        let cfg = Config {
            database: dir.path().join("duffy.db"),
            policy: setup.policy,
            pools: setup
                .pools
                .iter()
                .map(|(r, a, n)| PoolConfig {
                    release: r.clone(),
                    arch: *a,
                    flavor: None,
                    standby: *n,
                    installer: None,
                })
                .collect(),
            hardware: HardwareConfig::Simulated(SimulatedConfig {
                machines: setup.machines,
                install_min_ms: setup.install_ms.0,
                install_max_ms: setup.install_ms.1,
                prepare_ms: 1,
                ..SimulatedConfig::default()
            }),
            ..Config::default()
        };
        let built = build_engine(&cfg, store.clone()).await.expect("build engine");
        let sim = built.sim.clone().expect("simulated");
        let running = start_with("127.0.0.1:0".parse().expect("addr"), built, setup.reconcile).await.expect("start");
        let base = format!("http://{}", running.addr);
        TestServer { running: Some(running), base, client: reqwest::Client::new(), sim, store, dir }
    }

    pub async fn key(&self, project: &str, admin: bool, quota: Option<u32>) -> String {
        duffy_http::keys::create_key(&*self.store, project, admin, quota, SystemClock.now()).await.expect("key").0
    }

    pub async fn get(&self, path_and_query: &str) -> Reply {
        let r = self.client.get(format!("{}{}", self.base, path_and_query)).send().await.expect("request");
        let status = r.status().as_u16();
        let content_type =
            r.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
        let body = r.text().await.expect("body");
        Reply { status, content_type, body }
    }

    /// Waits until every pool has at least its target of Ready nodes.
    pub async fn wait_pools_full(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let targets = self.store.pool_targets().await.expect("targets");
            let ready = self.store.ready_counts().await.expect("counts");
            let provisioning = self
                .store
                .nodes()
                .await
                .expect("nodes")
                .iter()
                .filter(|n| n.state == duffy_core::NodeState::Provisioning)
                .count();
            let full = targets.iter().all(|t: &PoolTarget| {
                ready.iter().find(|(p, _)| *p == t.pool).map(|(_, c)| *c).unwrap_or(0) >= t.standby
            });
            if full && provisioning == 0 {
                return;
            }
            assert!(Instant::now() < deadline, "pools did not fill: {ready:?} of {targets:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.stop().await.expect("clean stop");
        }
    }
}
