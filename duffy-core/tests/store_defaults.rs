//! The `Store` trait's default reads (built on `nodes()`) answer what the
//! conformance suite asks, for a backend that does not override them
//! (`expired_sessions` is built on `live_sessions()`).

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
/// `MemStore`), so the trait's defaults answer the rest; or, with a
/// [`Broken`] mode, gets session expiry deliberately wrong.
struct Plain(MemStore, Broken);

/// Ways a backend could get session expiry wrong; the conformance check
/// must catch each.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Broken {
    No,
    /// Sessions are stored without their expiry (a forgotten column).
    DropsExpiry,
    /// `expired_sessions` also lists failed sessions past their expiry.
    ListsFailed,
    /// `expired_sessions` ignores its limit.
    NoLimit,
}

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
        let s = self.0.session(id).await?;
        Ok(if self.1 == Broken::DropsExpiry { s.map(|s| Session { expires_at: None, ..s }) } else { s })
    }
    async fn live_sessions(&self) -> Result<Vec<Session>, StoreError> {
        self.0.live_sessions().await
    }
    async fn expired_sessions(&self, now: Timestamp, limit: usize) -> Result<Vec<Session>, StoreError> {
        match self.1 {
            Broken::No | Broken::DropsExpiry => {
                // The trait's default, as a backend without an override has.
                let mut v: Vec<Session> = self.0.live_sessions().await?;
                v.retain(|s| s.is_expired_at(now));
                v.sort_by(|a, b| (a.expires_at, &a.id).cmp(&(b.expires_at, &b.id)));
                v.truncate(limit);
                Ok(v)
            }
            Broken::ListsFailed => {
                let mut v: Vec<Session> = self.0.live_sessions().await?;
                v.retain(|s| s.expires_at.is_some_and(|t| t <= now) && s.state != duffy_core::SessionState::Allocating);
                v.sort_by(|a, b| (a.expires_at, &a.id).cmp(&(b.expires_at, &b.id)));
                v.truncate(limit);
                Ok(v)
            }
            Broken::NoLimit => self.0.expired_sessions(now, usize::MAX).await,
        }
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
    async fn projects(&self) -> Result<Vec<Project>, StoreError> {
        self.0.projects().await
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
    Arc::new(Plain(MemStore::new(), Broken::No))
}

fn broken(how: Broken) -> Arc<dyn Store> {
    Arc::new(Plain(MemStore::new(), how))
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

#[tokio::test]
async fn default_expired_sessions() {
    conformance::sessions_expire_and_are_listed_by_expiry(plain()).await;
}

// The expiry check is only worth something if it fails on a store that
// gets expiry wrong.

#[tokio::test]
#[should_panic(expected = "delivery sets the expiry")]
async fn the_expiry_check_catches_a_store_that_forgets_the_expiry() {
    conformance::sessions_expire_and_are_listed_by_expiry(broken(Broken::DropsExpiry)).await;
}

#[tokio::test]
#[should_panic(expected = "a Fail session is never listed")]
async fn the_expiry_check_catches_a_store_that_lists_failed_sessions() {
    conformance::sessions_expire_and_are_listed_by_expiry(broken(Broken::ListsFailed)).await;
}

#[tokio::test]
#[should_panic(expected = "bounded")]
async fn the_expiry_check_catches_a_store_that_ignores_the_limit() {
    conformance::sessions_expire_and_are_listed_by_expiry(broken(Broken::NoLimit)).await;
}

#[tokio::test]
async fn default_latest_events() {
    conformance::latest_events_are_newest_first_and_bounded(plain()).await;
}

#[tokio::test]
async fn default_node_counts() {
    conformance::node_counts_group_the_farm(plain()).await;
}
