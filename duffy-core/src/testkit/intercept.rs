//! A [`Store`] wrapper that runs hooks around every call: before it, to
//! fail chosen calls (a store error in the first reconciler pass, a
//! commit refused mid-operation) or to delay them; before and after it, to
//! yield to the executor so that concurrent engine operations interleave
//! at every await ([`InterceptStore::yielding`]). The test kit's one
//! forwarding implementation of the whole trait.

use std::sync::Arc;

use async_trait::async_trait;

use crate::model::{
    Actor, ApiKeyHash, ApiKeyRecord, Hardware, KeyId, NewNode, Node, NodeId, PoolKey, PoolTarget, Project, Session,
    SessionId,
};
use crate::state::{Event, NodeState};
use crate::store::{Batch, ClaimRefusal, ClaimRequest, Claimed, CommitError, EventQuery, NodeCount, Store, StoreError};
use crate::time::{BoxFuture, Timestamp};

/// The hook: given the name of the [`Store`] method about to be called
/// (`"claim"`, `"commit"`, `"live_sessions"`, …), a future that either lets
/// the call through (`Ok`) or fails it with the error it returns, without
/// calling the inner store.
pub type Hook = Arc<dyn Fn(&'static str) -> BoxFuture<Result<(), StoreError>> + Send + Sync>;

/// Awaited after every call (with the method's name), whatever its
/// outcome.
pub type AfterHook = Arc<dyn Fn(&'static str) -> BoxFuture<()> + Send + Sync>;

/// Wraps a store; every call first awaits the [`Hook`], and then, if one
/// is set, the [`AfterHook`].
#[derive(Clone)]
pub struct InterceptStore {
    inner: Arc<dyn Store>,
    hook: Hook,
    after: Option<AfterHook>,
}

impl InterceptStore {
    /// Wraps `inner`, running `hook` before each call.
    pub fn new(inner: Arc<dyn Store>, hook: Hook) -> Self {
        InterceptStore { inner, hook, after: None }
    }

    /// Also runs `after` after each call.
    pub fn with_after(mut self, after: AfterHook) -> Self {
        self.after = Some(after);
        self
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

    /// Runs `call` between the hooks.
    async fn around<T: Send, E: From<StoreError> + Send>(
        &self,
        method: &'static str,
        call: impl std::future::Future<Output = Result<T, E>> + Send,
    ) -> Result<T, E> {
        self.before(method).await?;
        let out = call.await;
        if let Some(after) = &self.after {
            after(method).await;
        }
        out
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
        self.around("add_nodes", self.inner.add_nodes(nodes, actor, now)).await
    }

    async fn node(&self, id: NodeId) -> Result<Option<Node>, StoreError> {
        self.around("node", self.inner.node(id)).await
    }

    async fn node_by_hostname(&self, hostname: &str) -> Result<Option<Node>, StoreError> {
        self.around("node_by_hostname", self.inner.node_by_hostname(hostname)).await
    }

    async fn nodes(&self) -> Result<Vec<Node>, StoreError> {
        self.around("nodes", self.inner.nodes()).await
    }

    async fn ready_counts(&self) -> Result<Vec<(PoolKey, u32)>, StoreError> {
        self.around("ready_counts", self.inner.ready_counts()).await
    }

    async fn nodes_in_states(&self, states: &[NodeState]) -> Result<Vec<Node>, StoreError> {
        self.around("nodes_in_states", self.inner.nodes_in_states(states)).await
    }

    async fn stale_ready(&self, installed_before: Timestamp, limit: usize) -> Result<Vec<Node>, StoreError> {
        self.around("stale_ready", self.inner.stale_ready(installed_before, limit)).await
    }

    async fn idle_nodes(&self, hardware: &Hardware, limit: usize) -> Result<Vec<Node>, StoreError> {
        self.around("idle_nodes", self.inner.idle_nodes(hardware, limit)).await
    }

    async fn nodes_after(&self, after: NodeId, limit: usize) -> Result<Vec<Node>, StoreError> {
        self.around("nodes_after", self.inner.nodes_after(after, limit)).await
    }

    async fn latest_events(&self, node: Option<NodeId>, limit: usize) -> Result<Vec<Event>, StoreError> {
        self.around("latest_events", self.inner.latest_events(node, limit)).await
    }

    async fn node_counts(&self) -> Result<Vec<NodeCount>, StoreError> {
        self.around("node_counts", self.inner.node_counts()).await
    }

    async fn session(&self, id: &SessionId) -> Result<Option<Session>, StoreError> {
        self.around("session", self.inner.session(id)).await
    }

    async fn live_sessions(&self) -> Result<Vec<Session>, StoreError> {
        self.around("live_sessions", self.inner.live_sessions()).await
    }

    async fn expired_sessions(&self, now: Timestamp, limit: usize) -> Result<Vec<Session>, StoreError> {
        self.around("expired_sessions", self.inner.expired_sessions(now, limit)).await
    }

    async fn claim(&self, req: ClaimRequest) -> Result<Result<Claimed, ClaimRefusal>, StoreError> {
        self.around("claim", self.inner.claim(req)).await
    }

    async fn commit(&self, batch: Batch) -> Result<(), CommitError> {
        self.around("commit", self.inner.commit(batch)).await
    }

    async fn events(&self, query: EventQuery) -> Result<Vec<Event>, StoreError> {
        self.around("events", self.inner.events(query)).await
    }

    async fn upsert_project(&self, project: Project) -> Result<(), StoreError> {
        self.around("upsert_project", self.inner.upsert_project(project)).await
    }

    async fn project(&self, name: &str) -> Result<Option<Project>, StoreError> {
        self.around("project", self.inner.project(name)).await
    }

    async fn projects(&self) -> Result<Vec<Project>, StoreError> {
        self.around("projects", self.inner.projects()).await
    }

    async fn add_api_key(
        &self,
        project: &str,
        hash: ApiKeyHash,
        admin: bool,
        now: Timestamp,
        expires_at: Option<Timestamp>,
    ) -> Result<ApiKeyRecord, StoreError> {
        self.around("add_api_key", self.inner.add_api_key(project, hash, admin, now, expires_at)).await
    }

    async fn api_key_by_hash(&self, hash: &ApiKeyHash) -> Result<Option<ApiKeyRecord>, StoreError> {
        self.around("api_key_by_hash", self.inner.api_key_by_hash(hash)).await
    }

    async fn api_keys(&self, project: Option<&str>) -> Result<Vec<ApiKeyRecord>, StoreError> {
        self.around("api_keys", self.inner.api_keys(project)).await
    }

    async fn revoke_api_key(&self, id: KeyId, now: Timestamp) -> Result<ApiKeyRecord, StoreError> {
        self.around("revoke_api_key", self.inner.revoke_api_key(id, now)).await
    }

    async fn record_key_use(&self, used: Vec<(KeyId, Timestamp)>) -> Result<(), StoreError> {
        self.around("record_key_use", self.inner.record_key_use(used)).await
    }

    async fn set_pool_target(&self, target: PoolTarget) -> Result<(), StoreError> {
        self.around("set_pool_target", self.inner.set_pool_target(target)).await
    }

    async fn pool_targets(&self) -> Result<Vec<PoolTarget>, StoreError> {
        self.around("pool_targets", self.inner.pool_targets()).await
    }

    async fn paused(&self) -> Result<bool, StoreError> {
        self.around("paused", self.inner.paused()).await
    }

    async fn set_paused(&self, paused: bool) -> Result<bool, StoreError> {
        self.around("set_paused", self.inner.set_paused(paused)).await
    }

    async fn new_leader_epoch(&self) -> Result<u64, StoreError> {
        self.around("new_leader_epoch", self.inner.new_leader_epoch()).await
    }

    async fn commit_fenced(&self, batch: Batch, epoch: u64) -> Result<(), CommitError> {
        self.around("commit_fenced", self.inner.commit_fenced(batch, epoch)).await
    }

    async fn abandoned_allocations(&self) -> Result<Option<Vec<SessionId>>, StoreError> {
        self.around("abandoned_allocations", self.inner.abandoned_allocations()).await
    }

    fn key_generation(&self) -> u64 {
        // Synchronous, so no hooks: it is a read of memory, never a call
        // that could fail or interleave.
        self.inner.key_generation()
    }

    fn install_tickets(self: Arc<Self>) -> Option<Arc<dyn crate::tickets::InstallTickets>> {
        // The inner store's, unhooked: the hooks are for the farm's
        // calls, which the engine and reconciler make; tickets are the
        // PXE installer's.
        self.inner.clone().install_tickets()
    }
}
