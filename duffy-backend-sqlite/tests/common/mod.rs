//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod workload;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use duffy_backend_sqlite::{SqliteOptions, SqliteStore};
use duffy_core::{
    Actor, ApiKeyHash, ApiKeyRecord, Batch, ClaimRefusal, ClaimRequest, Claimed, CommitError, Event, EventQuery,
    HandBack, HandBackRefusal, Hardware, KeyId, NewNode, Node, NodeId, NodeState, PoolKey, PoolTarget, Project,
    Session, SessionId, Store, StoreError, Timestamp,
};

/// A fresh store in its own temporary directory (removed on drop, after
/// the store).
pub struct TempStore {
    pub store: Arc<SqliteStore>,
    pub dir: tempfile::TempDir,
}

impl TempStore {
    pub fn path(&self) -> PathBuf {
        self.dir.path().join("duffy.db")
    }
}

/// Opens a fresh store with `options` in a new temporary directory.
pub fn fresh(options: SqliteOptions) -> TempStore {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(open(&dir.path().join("duffy.db"), options));
    TempStore { store, dir }
}

/// Opens the store at `path`.
pub fn open(path: &Path, options: SqliteOptions) -> SqliteStore {
    SqliteStore::open(path, options).expect("open store")
}

/// A store that owns its temporary directory: the store closes first,
/// then the directory is removed.
pub struct Owned {
    store: SqliteStore,
    _dir: tempfile::TempDir,
}

/// A fresh store with default options, as `Arc<dyn Store>`.
pub fn fresh_dyn() -> Arc<dyn Store> {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir.path().join("duffy.db"), SqliteOptions::default());
    Arc::new(Owned { store, _dir: dir })
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
    async fn nodes_after(&self, after: NodeId, limit: usize) -> Result<Vec<Node>, StoreError> {
        self.store.nodes_after(after, limit).await
    }
    async fn idle_nodes(&self, hardware: &Hardware, limit: usize) -> Result<Vec<Node>, StoreError> {
        self.store.idle_nodes(hardware, limit).await
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
    async fn commit_each(&self, batches: Vec<Batch>) -> Vec<Result<(), CommitError>> {
        self.store.commit_each(batches).await
    }
    async fn hand_back(&self, req: HandBack) -> Result<Result<Session, HandBackRefusal>, CommitError> {
        self.store.hand_back(req).await
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
}
