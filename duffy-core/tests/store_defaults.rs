//! The `Store` trait's default reads (built on `nodes()`) answer what the
//! conformance suite asks, for a backend that does not override them.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::sync::Arc;

use async_trait::async_trait;
use duffy_core::mem::MemStore;
use duffy_core::store::{Batch, ClaimRefusal, ClaimRequest, Claimed, CommitError, EventQuery};
use duffy_core::testkit::conformance;
use duffy_core::{
    Actor, ApiKeyHash, ApiKeyRecord, Event, KeyId, NewNode, Node, NodeId, PoolTarget, Project, Session, SessionId,
    Store, StoreError, Timestamp,
};

/// A store that implements only the required methods (by delegating to a
/// `MemStore`), so the trait's defaults answer the rest.
struct Plain(MemStore);

#[async_trait]
impl Store for Plain {
    async fn add_nodes(&self, nodes: Vec<NewNode>, actor: Actor, now: Timestamp) -> Result<Vec<Node>, StoreError> {
        self.0.add_nodes(nodes, actor, now).await
    }
    async fn node(&self, id: NodeId) -> Result<Option<Node>, StoreError> {
        self.0.node(id).await
    }
    async fn node_by_hostname(&self, hostname: &str) -> Result<Option<Node>, StoreError> {
        self.0.node_by_hostname(hostname).await
    }
    async fn nodes(&self) -> Result<Vec<Node>, StoreError> {
        self.0.nodes().await
    }
    async fn session(&self, id: &SessionId) -> Result<Option<Session>, StoreError> {
        self.0.session(id).await
    }
    async fn live_sessions(&self) -> Result<Vec<Session>, StoreError> {
        self.0.live_sessions().await
    }
    async fn claim(&self, req: ClaimRequest) -> Result<Result<Claimed, ClaimRefusal>, StoreError> {
        self.0.claim(req).await
    }
    async fn commit(&self, batch: Batch) -> Result<(), CommitError> {
        self.0.commit(batch).await
    }
    async fn events(&self, query: EventQuery) -> Result<Vec<Event>, StoreError> {
        self.0.events(query).await
    }
    async fn upsert_project(&self, project: Project) -> Result<(), StoreError> {
        self.0.upsert_project(project).await
    }
    async fn project(&self, name: &str) -> Result<Option<Project>, StoreError> {
        self.0.project(name).await
    }
    async fn add_api_key(
        &self,
        project: &str,
        hash: ApiKeyHash,
        admin: bool,
        now: Timestamp,
        expires_at: Option<Timestamp>,
    ) -> Result<ApiKeyRecord, StoreError> {
        self.0.add_api_key(project, hash, admin, now, expires_at).await
    }
    async fn api_key_by_hash(&self, hash: &ApiKeyHash) -> Result<Option<ApiKeyRecord>, StoreError> {
        self.0.api_key_by_hash(hash).await
    }
    async fn api_keys(&self, project: Option<&str>) -> Result<Vec<ApiKeyRecord>, StoreError> {
        self.0.api_keys(project).await
    }
    async fn revoke_api_key(&self, id: KeyId, now: Timestamp) -> Result<ApiKeyRecord, StoreError> {
        self.0.revoke_api_key(id, now).await
    }
    async fn record_key_use(&self, used: Vec<(KeyId, Timestamp)>) -> Result<(), StoreError> {
        self.0.record_key_use(used).await
    }
    async fn set_pool_target(&self, target: PoolTarget) -> Result<(), StoreError> {
        self.0.set_pool_target(target).await
    }
    async fn pool_targets(&self) -> Result<Vec<PoolTarget>, StoreError> {
        self.0.pool_targets().await
    }
    async fn paused(&self) -> Result<bool, StoreError> {
        self.0.paused().await
    }
    async fn set_paused(&self, paused: bool) -> Result<bool, StoreError> {
        self.0.set_paused(paused).await
    }
}

fn plain() -> Arc<dyn Store> {
    Arc::new(Plain(MemStore::new()))
}

#[tokio::test]
async fn default_nodes_in_states() {
    conformance::nodes_in_states_filters_and_orders_by_id(plain()).await;
}

#[tokio::test]
async fn default_stale_ready() {
    conformance::stale_ready_is_oldest_first_and_bounded(plain()).await;
}

#[tokio::test]
async fn default_nodes_after() {
    conformance::nodes_after_pages_through_the_farm(plain()).await;
}

#[tokio::test]
async fn default_idle_nodes() {
    conformance::idle_nodes_are_least_used_first(plain()).await;
}

#[tokio::test]
async fn default_hand_back() {
    conformance::hand_back_done_and_fail(plain()).await;
    conformance::hand_back_refusals_write_nothing(plain()).await;
}

#[tokio::test]
async fn default_commit_each() {
    conformance::commit_each_commits_each_batch_on_its_own(plain()).await;
}

#[tokio::test]
async fn default_ready_counts() {
    conformance::ready_counts_count_ready_nodes_per_pool(plain()).await;
}
