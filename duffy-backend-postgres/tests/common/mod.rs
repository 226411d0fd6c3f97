//! Helpers shared by the integration tests: a fresh database per test on
//! the test process's throwaway PostgreSQL (see `test_cluster`).
#![allow(dead_code)]

pub mod proxy;

use std::sync::Arc;

use duffy_backend_postgres::test_cluster::{self, TestDatabase};
use duffy_backend_postgres::{PgOptions, PgStore};
use duffy_core::{
    Actor, ApiKeyHash, ApiKeyRecord, Batch, ClaimRefusal, ClaimRequest, Claimed, CommitError, Event, EventQuery,
    Hardware, KeyId, NewNode, Node, NodeId, NodeState, PoolKey, PoolTarget, Project, Session, SessionId, Store,
    StoreError, Timestamp,
};

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

/// A store that keeps its database for as long as it lives.
pub struct Owned {
    pub store: PgStore,
    _db: TestDatabase,
}

/// A fresh store, as `Arc<dyn Store>`.
pub async fn fresh_dyn() -> Arc<dyn Store> {
    let (store, db) = fresh().await;
    Arc::new(Owned { store, _db: db })
}

#[async_trait::async_trait]
impl Store for Owned {
    async fn add_nodes(&self, nodes: Vec<NewNode>, actor: Actor, now: Timestamp) -> Result<Vec<Node>, StoreError> {
        self.store.add_nodes(nodes, actor, now).await
    }
    async fn node(&self, id: NodeId) -> Result<Option<Node>, StoreError> {
        self.store.node(id).await
    }
    async fn node_by_hostname(&self, hostname: &str) -> Result<Option<Node>, StoreError> {
        self.store.node_by_hostname(hostname).await
    }
    async fn nodes(&self) -> Result<Vec<Node>, StoreError> {
        self.store.nodes().await
    }
    async fn ready_counts(&self) -> Result<Vec<(PoolKey, u32)>, StoreError> {
        self.store.ready_counts().await
    }
    async fn nodes_in_states(&self, states: &[NodeState]) -> Result<Vec<Node>, StoreError> {
        self.store.nodes_in_states(states).await
    }
    async fn stale_ready(&self, installed_before: Timestamp, limit: usize) -> Result<Vec<Node>, StoreError> {
        self.store.stale_ready(installed_before, limit).await
    }
    async fn idle_nodes(&self, hardware: &Hardware, limit: usize) -> Result<Vec<Node>, StoreError> {
        self.store.idle_nodes(hardware, limit).await
    }
    async fn nodes_after(&self, after: NodeId, limit: usize) -> Result<Vec<Node>, StoreError> {
        self.store.nodes_after(after, limit).await
    }
    async fn session(&self, id: &SessionId) -> Result<Option<Session>, StoreError> {
        self.store.session(id).await
    }
    async fn live_sessions(&self) -> Result<Vec<Session>, StoreError> {
        self.store.live_sessions().await
    }
    async fn claim(&self, req: ClaimRequest) -> Result<Result<Claimed, ClaimRefusal>, StoreError> {
        self.store.claim(req).await
    }
    async fn commit(&self, batch: Batch) -> Result<(), CommitError> {
        self.store.commit(batch).await
    }
    async fn events(&self, query: EventQuery) -> Result<Vec<Event>, StoreError> {
        self.store.events(query).await
    }
    async fn upsert_project(&self, project: Project) -> Result<(), StoreError> {
        self.store.upsert_project(project).await
    }
    async fn project(&self, name: &str) -> Result<Option<Project>, StoreError> {
        self.store.project(name).await
    }
    async fn add_api_key(
        &self,
        project: &str,
        hash: ApiKeyHash,
        admin: bool,
        now: Timestamp,
        expires_at: Option<Timestamp>,
    ) -> Result<ApiKeyRecord, StoreError> {
        self.store.add_api_key(project, hash, admin, now, expires_at).await
    }
    async fn api_key_by_hash(&self, hash: &ApiKeyHash) -> Result<Option<ApiKeyRecord>, StoreError> {
        self.store.api_key_by_hash(hash).await
    }
    async fn api_keys(&self, project: Option<&str>) -> Result<Vec<ApiKeyRecord>, StoreError> {
        self.store.api_keys(project).await
    }
    async fn revoke_api_key(&self, id: KeyId, now: Timestamp) -> Result<ApiKeyRecord, StoreError> {
        self.store.revoke_api_key(id, now).await
    }
    async fn record_key_use(&self, used: Vec<(KeyId, Timestamp)>) -> Result<(), StoreError> {
        self.store.record_key_use(used).await
    }
    async fn set_pool_target(&self, target: PoolTarget) -> Result<(), StoreError> {
        self.store.set_pool_target(target).await
    }
    async fn pool_targets(&self) -> Result<Vec<PoolTarget>, StoreError> {
        self.store.pool_targets().await
    }
    async fn paused(&self) -> Result<bool, StoreError> {
        self.store.paused().await
    }
    async fn set_paused(&self, paused: bool) -> Result<bool, StoreError> {
        self.store.set_paused(paused).await
    }
    async fn new_leader_epoch(&self) -> Result<u64, StoreError> {
        self.store.new_leader_epoch().await
    }
    async fn commit_fenced(&self, batch: Batch, epoch: u64) -> Result<(), CommitError> {
        self.store.commit_fenced(batch, epoch).await
    }
    async fn abandoned_allocations(&self) -> Result<Option<Vec<SessionId>>, StoreError> {
        self.store.abandoned_allocations().await
    }
    fn key_generation(&self) -> u64 {
        self.store.key_generation()
    }
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
