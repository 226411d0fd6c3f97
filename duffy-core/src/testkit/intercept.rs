//! A [`Store`] wrapper that runs a hook before every call: to fail chosen
//! calls (a store error in the first reconciler pass, a commit refused
//! mid-operation) or to yield to the executor so that concurrent engine
//! operations interleave at every await.

use std::sync::Arc;

use async_trait::async_trait;

use crate::model::{
    Actor, ApiKeyHash, ApiKeyRecord, Hardware, NewNode, Node, NodeId, PoolKey, PoolTarget, Project, Session, SessionId,
};
use crate::state::{Event, NodeState};
use crate::store::{Batch, ClaimRefusal, ClaimRequest, Claimed, CommitError, EventQuery, Store, StoreError};
use crate::time::{BoxFuture, Timestamp};

/// The hook: given the name of the [`Store`] method about to be called
/// (`"claim"`, `"commit"`, `"live_sessions"`, …), a future that either lets
/// the call through (`Ok`) or fails it with the error it returns, without
/// calling the inner store.
pub type Hook = Arc<dyn Fn(&'static str) -> BoxFuture<Result<(), StoreError>> + Send + Sync>;

/// Wraps a store; every call first awaits the [`Hook`].
#[derive(Clone)]
pub struct InterceptStore {
    inner: Arc<dyn Store>,
    hook: Hook,
}

impl InterceptStore {
    /// Wraps `inner`, running `hook` before each call.
    pub fn new(inner: Arc<dyn Store>, hook: Hook) -> Self {
        InterceptStore { inner, hook }
    }

    /// A hook from a synchronous decision: `decide(method)` returns the
    /// error to fail the call with, or `None` to let it through.
    pub fn failing(
        inner: Arc<dyn Store>,
        decide: impl Fn(&'static str) -> Option<StoreError> + Send + Sync + 'static,
    ) -> Self {
        let decide = Arc::new(decide);
        InterceptStore::new(
            inner,
            Arc::new(move |method| {
                let r = decide(method).map_or(Ok(()), Err);
                Box::pin(async move { r })
            }),
        )
    }

    /// The wrapped store.
    pub fn inner(&self) -> &Arc<dyn Store> {
        &self.inner
    }

    async fn before(&self, method: &'static str) -> Result<(), StoreError> {
        (self.hook)(method).await
    }
}

impl std::fmt::Debug for InterceptStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InterceptStore").finish_non_exhaustive()
    }
}

#[async_trait]
impl Store for InterceptStore {
    async fn add_nodes(&self, nodes: Vec<NewNode>, actor: Actor, now: Timestamp) -> Result<Vec<Node>, StoreError> {
        self.before("add_nodes").await?;
        self.inner.add_nodes(nodes, actor, now).await
    }

    async fn node(&self, id: NodeId) -> Result<Option<Node>, StoreError> {
        self.before("node").await?;
        self.inner.node(id).await
    }

    async fn node_by_hostname(&self, hostname: &str) -> Result<Option<Node>, StoreError> {
        self.before("node_by_hostname").await?;
        self.inner.node_by_hostname(hostname).await
    }

    async fn nodes(&self) -> Result<Vec<Node>, StoreError> {
        self.before("nodes").await?;
        self.inner.nodes().await
    }

    async fn ready_counts(&self) -> Result<Vec<(PoolKey, u32)>, StoreError> {
        self.before("ready_counts").await?;
        self.inner.ready_counts().await
    }

    async fn nodes_in_states(&self, states: &[NodeState]) -> Result<Vec<Node>, StoreError> {
        self.before("nodes_in_states").await?;
        self.inner.nodes_in_states(states).await
    }

    async fn stale_ready(&self, installed_before: Timestamp, limit: usize) -> Result<Vec<Node>, StoreError> {
        self.before("stale_ready").await?;
        self.inner.stale_ready(installed_before, limit).await
    }

    async fn idle_nodes(&self, hardware: &Hardware, limit: usize) -> Result<Vec<Node>, StoreError> {
        self.before("idle_nodes").await?;
        self.inner.idle_nodes(hardware, limit).await
    }

    async fn nodes_after(&self, after: NodeId, limit: usize) -> Result<Vec<Node>, StoreError> {
        self.before("nodes_after").await?;
        self.inner.nodes_after(after, limit).await
    }

    async fn session(&self, id: &SessionId) -> Result<Option<Session>, StoreError> {
        self.before("session").await?;
        self.inner.session(id).await
    }

    async fn live_sessions(&self) -> Result<Vec<Session>, StoreError> {
        self.before("live_sessions").await?;
        self.inner.live_sessions().await
    }

    async fn claim(&self, req: ClaimRequest) -> Result<Result<Claimed, ClaimRefusal>, StoreError> {
        self.before("claim").await?;
        self.inner.claim(req).await
    }

    async fn commit(&self, batch: Batch) -> Result<(), CommitError> {
        self.before("commit").await?;
        self.inner.commit(batch).await
    }

    async fn events(&self, query: EventQuery) -> Result<Vec<Event>, StoreError> {
        self.before("events").await?;
        self.inner.events(query).await
    }

    async fn upsert_project(&self, project: Project) -> Result<(), StoreError> {
        self.before("upsert_project").await?;
        self.inner.upsert_project(project).await
    }

    async fn project(&self, name: &str) -> Result<Option<Project>, StoreError> {
        self.before("project").await?;
        self.inner.project(name).await
    }

    async fn add_api_key(
        &self,
        project: &str,
        hash: ApiKeyHash,
        admin: bool,
        now: Timestamp,
    ) -> Result<ApiKeyRecord, StoreError> {
        self.before("add_api_key").await?;
        self.inner.add_api_key(project, hash, admin, now).await
    }

    async fn api_key_by_hash(&self, hash: &ApiKeyHash) -> Result<Option<ApiKeyRecord>, StoreError> {
        self.before("api_key_by_hash").await?;
        self.inner.api_key_by_hash(hash).await
    }

    async fn set_pool_target(&self, target: PoolTarget) -> Result<(), StoreError> {
        self.before("set_pool_target").await?;
        self.inner.set_pool_target(target).await
    }

    async fn pool_targets(&self) -> Result<Vec<PoolTarget>, StoreError> {
        self.before("pool_targets").await?;
        self.inner.pool_targets().await
    }

    async fn paused(&self) -> Result<bool, StoreError> {
        self.before("paused").await?;
        self.inner.paused().await
    }

    async fn set_paused(&self, paused: bool) -> Result<bool, StoreError> {
        self.before("set_paused").await?;
        self.inner.set_paused(paused).await
    }
}
