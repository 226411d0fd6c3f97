//! A `Store` wrapper for the tests of the checks themselves: it forwards
//! every call to the store underneath, except where a deliberately
//! injected [`Fault`] changes what it does, and it logs every claim with
//! its outcome so that a test can hold the store's answers to a model.
//!
//! A check is only worth something if it can fail; each fault here is a
//! way a store (or the engine over it) could break a farm-wide invariant,
//! and the tests show that the checks report it.

// Each test crate that includes this module uses some of it.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use duffy_core::store::{
    Batch, ClaimRefusal, ClaimRequest, Claimed, CommitError, EventQuery, SessionWrite, Store, StoreError, claim_writes,
};
use duffy_core::{
    Actor, ApiKeyHash, ApiKeyRecord, Event, Hardware, KeyId, NewNode, Node, NodeId, NodeState, PoolKey, PoolTarget,
    Project, Session, SessionId, Timestamp,
};

/// A deliberately broken behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// None: the wrapper only forwards and logs.
    None,
    /// Claims are passed on without their rate limit.
    IgnoreRateLimit,
    /// Claims are passed on without the project's quota.
    IgnoreQuota,
    /// `add_nodes` with more than one node acknowledges them all but never
    /// stores the last one (nor its `Added` event).
    LoseLastAddedNode,
    /// `nodes()` leaves out the node with the highest id (its row and
    /// history are still there).
    HideLastNode,
    /// `nodes()` lists the first node twice.
    DuplicateFirstNode,
    /// A successful claim also inserts a second session (`<id>-shadow`, in
    /// the same state) listing the same nodes, which keep naming the first.
    SecondSessionOverClaim,
    /// A claim of N nodes takes N-1 Ready nodes plus one node already held
    /// by another live session: the new session lists it, the node row is
    /// left naming its first holder.
    ClaimTakesHeldNode,
    /// A claim writes the session (listing every chosen node) but drops
    /// the write of the last chosen node, which stays Ready with no holder.
    ClaimDropsNodeWrite,
    /// Claims go through while the service is paused (the pause flag is
    /// not part of the claim).
    ClaimWhilePaused,
    /// Fenced batches are written whatever their epoch (no fencing).
    IgnoreFence,
}

/// How a logged claim ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// A session was created.
    Claimed,
    /// Refused by the key's rate limit.
    RateLimited,
    /// Refused because the service is paused.
    Paused,
    /// Refused as a bad request (no such pool, more nodes than the pool
    /// has): checked before the pause flag and the rate limit.
    Invalid,
    /// Refused for another reason (too few nodes, quota).
    Refused,
    /// The store failed.
    Failed,
}

/// One logged claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimRecord {
    /// The claiming key.
    pub key: KeyId,
    /// The claim's time.
    pub now: Timestamp,
    /// How it ended.
    pub outcome: ClaimOutcome,
    /// Whether the service was paused right after the claim.
    pub paused_after: bool,
}

/// Forwards to `inner`, with a [`Fault`], logging claims. Put it directly
/// on a store that never yields (`MemStore`) and the log's order is the
/// order in which the claims took effect: nothing else runs between the
/// inner claim and its log line.
pub struct Tap {
    inner: Arc<dyn Store>,
    fault: Fault,
    claims: Mutex<Vec<ClaimRecord>>,
    /// What `abandoned_allocations` answers, when set: the store plays one
    /// that several processes share and that knows which of them stopped.
    abandoned: Mutex<Option<Vec<SessionId>>>,
}

impl Tap {
    /// Wraps `inner` with `fault`.
    pub fn new(inner: Arc<dyn Store>, fault: Fault) -> Self {
        Tap { inner, fault, claims: Mutex::new(Vec::new()), abandoned: Mutex::new(None) }
    }

    /// From now on `abandoned_allocations` answers `ids` (`None`: forwards
    /// to the store underneath).
    pub fn set_abandoned(&self, ids: Option<Vec<SessionId>>) {
        *self.abandoned.lock().expect("abandoned") = ids;
    }

    /// Every claim so far, in the order they took effect.
    pub fn claims(&self) -> Vec<ClaimRecord> {
        self.claims.lock().expect("claim log").clone()
    }

    /// Ready nodes of `pool`, in the order a claim takes them.
    async fn ready_in(&self, pool: &PoolKey) -> Result<Vec<Node>, StoreError> {
        let mut ready = self.inner.nodes_in_states(&[NodeState::Ready]).await?;
        ready.retain(|n| n.image.as_ref() == Some(pool));
        ready.sort_by_key(|n| (n.used_count, n.id));
        Ok(ready)
    }

    /// Writes a claim's session and some of its node writes, as the broken
    /// claims do.
    async fn write_claim(
        &self,
        session: Session,
        writes: Vec<duffy_core::store::NodeWrite>,
        mut nodes: Vec<Node>,
    ) -> Result<Result<Claimed, ClaimRefusal>, StoreError> {
        let batch = Batch {
            nodes: writes,
            sessions: vec![SessionWrite { expected_version: None, session: session.clone() }],
            guards: Vec::new(),
        };
        self.inner.commit(batch).await.map_err(|e| StoreError::Corrupt(e.to_string()))?;
        nodes.sort_by_key(|n| session.nodes.iter().position(|id| *id == n.id));
        Ok(Ok(Claimed { session, nodes }))
    }

    async fn faulty_claim(&self, mut req: ClaimRequest) -> Result<Result<Claimed, ClaimRefusal>, StoreError> {
        match self.fault {
            Fault::IgnoreRateLimit => {
                req.rate_limit = None;
                self.inner.claim(req).await
            }
            Fault::IgnoreQuota => {
                // The claim reads the project's quota itself: the quota is
                // lifted around it (as the pause flag is for
                // `ClaimWhilePaused`; the inner store's calls do not yield).
                req.default_quota = None;
                let project = self.inner.project(&req.project).await?;
                if let Some(p) = project.clone().filter(|p| p.quota.is_some()) {
                    self.inner.upsert_project(Project { quota: None, ..p }).await?;
                }
                let r = self.inner.claim(req).await;
                if let Some(p) = project.filter(|p| p.quota.is_some()) {
                    self.inner.upsert_project(p).await?;
                }
                r
            }
            Fault::SecondSessionOverClaim => {
                let r = self.inner.claim(req).await;
                if let Ok(Ok(c)) = &r {
                    let shadow = Session { id: SessionId(format!("{}-shadow", c.session.id)), ..c.session.clone() };
                    let batch = Batch {
                        sessions: vec![SessionWrite { expected_version: None, session: shadow }],
                        ..Batch::default()
                    };
                    self.inner.commit(batch).await.map_err(|e| StoreError::Corrupt(e.to_string()))?;
                }
                r
            }
            Fault::ClaimTakesHeldNode => {
                let held = self.inner.nodes_in_states(&[NodeState::Contextualizing, NodeState::Deployed]).await?;
                let Some(taken) = held.into_iter().next() else { return self.inner.claim(req).await };
                let ready = self.ready_in(&req.pool).await?;
                let want = req.count as usize - 1;
                if ready.len() < want {
                    return Ok(Err(ClaimRefusal::InsufficientNodes {
                        requested: req.count,
                        available: ready.len() as u32,
                    }));
                }
                let chosen = &ready[..want];
                let (mut session, writes) =
                    claim_writes(&req, chosen).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                session.nodes.push(taken.id);
                let mut nodes: Vec<Node> = writes.iter().map(|w| w.node.clone()).collect();
                nodes.push(taken);
                self.write_claim(session, writes, nodes).await
            }
            Fault::ClaimDropsNodeWrite => {
                let ready = self.ready_in(&req.pool).await?;
                if ready.len() < req.count as usize {
                    return Ok(Err(ClaimRefusal::InsufficientNodes {
                        requested: req.count,
                        available: ready.len() as u32,
                    }));
                }
                let chosen = &ready[..req.count as usize];
                let (session, mut writes) =
                    claim_writes(&req, chosen).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                let mut nodes: Vec<Node> = writes.iter().map(|w| w.node.clone()).collect();
                writes.pop();
                // The caller is told every node was written.
                nodes.truncate(req.count as usize);
                self.write_claim(session, writes, nodes).await
            }
            Fault::ClaimWhilePaused if self.inner.paused().await? => {
                // The claim the store would make, without its pause check
                // (every other check as the real claim makes them): the
                // flag is lifted around it. Nothing else runs meanwhile,
                // since the calls to the inner store do not yield.
                self.inner.set_paused(false).await?;
                let r = self.inner.claim(req).await;
                self.inner.set_paused(true).await?;
                r
            }
            Fault::None
            | Fault::IgnoreFence
            | Fault::ClaimWhilePaused
            | Fault::LoseLastAddedNode
            | Fault::HideLastNode
            | Fault::DuplicateFirstNode => self.inner.claim(req).await,
        }
    }
}

#[async_trait]
impl Store for Tap {
    async fn add_nodes(&self, mut nodes: Vec<NewNode>, actor: Actor, now: Timestamp) -> Result<Vec<Node>, StoreError> {
        if self.fault == Fault::LoseLastAddedNode && nodes.len() > 1 {
            let lost = nodes.pop().expect("more than one");
            let mut added = self.inner.add_nodes(nodes, actor, now).await?;
            let id = NodeId(added.last().map_or(0, |n| n.id.0) + 1_000_000);
            added.push(lost.into_node(id, now));
            return Ok(added);
        }
        self.inner.add_nodes(nodes, actor, now).await
    }

    async fn node(&self, id: NodeId) -> Result<Option<Node>, StoreError> {
        self.inner.node(id).await
    }

    async fn node_by_hostname(&self, hostname: &str) -> Result<Option<Node>, StoreError> {
        self.inner.node_by_hostname(hostname).await
    }

    async fn nodes(&self) -> Result<Vec<Node>, StoreError> {
        let mut nodes = self.inner.nodes().await?;
        match self.fault {
            Fault::HideLastNode => {
                nodes.pop();
            }
            Fault::DuplicateFirstNode if !nodes.is_empty() => nodes.insert(1, nodes[0].clone()),
            _ => {}
        }
        Ok(nodes)
    }

    async fn ready_counts(&self) -> Result<Vec<(PoolKey, u32)>, StoreError> {
        self.inner.ready_counts().await
    }

    async fn nodes_in_states(&self, states: &[NodeState]) -> Result<Vec<Node>, StoreError> {
        self.inner.nodes_in_states(states).await
    }

    async fn stale_ready(&self, installed_before: Timestamp, limit: usize) -> Result<Vec<Node>, StoreError> {
        self.inner.stale_ready(installed_before, limit).await
    }

    async fn idle_nodes(&self, hardware: &Hardware, limit: usize) -> Result<Vec<Node>, StoreError> {
        self.inner.idle_nodes(hardware, limit).await
    }

    async fn nodes_after(&self, after: NodeId, limit: usize) -> Result<Vec<Node>, StoreError> {
        self.inner.nodes_after(after, limit).await
    }

    async fn session(&self, id: &SessionId) -> Result<Option<Session>, StoreError> {
        self.inner.session(id).await
    }

    async fn live_sessions(&self) -> Result<Vec<Session>, StoreError> {
        self.inner.live_sessions().await
    }

    async fn expired_sessions(&self, now: Timestamp, limit: usize) -> Result<Vec<Session>, StoreError> {
        self.inner.expired_sessions(now, limit).await
    }

    async fn claim(&self, req: ClaimRequest) -> Result<Result<Claimed, ClaimRefusal>, StoreError> {
        let (key, now) = (req.key_id, req.now);
        let r = self.faulty_claim(req).await;
        let outcome = match &r {
            Ok(Ok(_)) => ClaimOutcome::Claimed,
            Ok(Err(ClaimRefusal::RateLimited { .. })) => ClaimOutcome::RateLimited,
            Ok(Err(ClaimRefusal::Paused)) => ClaimOutcome::Paused,
            Ok(Err(ClaimRefusal::NoSuchPool { .. } | ClaimRefusal::OverCapacity { .. })) => ClaimOutcome::Invalid,
            Ok(Err(_)) => ClaimOutcome::Refused,
            Err(_) => ClaimOutcome::Failed,
        };
        let paused_after = self.inner.paused().await.unwrap_or(false);
        self.claims.lock().expect("claim log").push(ClaimRecord { key, now, outcome, paused_after });
        r
    }

    async fn commit(&self, batch: Batch) -> Result<(), CommitError> {
        self.inner.commit(batch).await
    }

    async fn events(&self, query: EventQuery) -> Result<Vec<Event>, StoreError> {
        self.inner.events(query).await
    }

    async fn upsert_project(&self, project: Project) -> Result<(), StoreError> {
        self.inner.upsert_project(project).await
    }

    async fn project(&self, name: &str) -> Result<Option<Project>, StoreError> {
        self.inner.project(name).await
    }

    async fn projects(&self) -> Result<Vec<Project>, StoreError> {
        self.inner.projects().await
    }

    async fn add_api_key(
        &self,
        project: &str,
        hash: ApiKeyHash,
        admin: bool,
        now: Timestamp,
        expires_at: Option<Timestamp>,
    ) -> Result<ApiKeyRecord, StoreError> {
        self.inner.add_api_key(project, hash, admin, now, expires_at).await
    }

    async fn api_keys(&self, project: Option<&str>) -> Result<Vec<ApiKeyRecord>, StoreError> {
        self.inner.api_keys(project).await
    }

    async fn revoke_api_key(&self, id: KeyId, now: Timestamp) -> Result<ApiKeyRecord, StoreError> {
        self.inner.revoke_api_key(id, now).await
    }

    async fn record_key_use(&self, used: Vec<(KeyId, Timestamp)>) -> Result<(), StoreError> {
        self.inner.record_key_use(used).await
    }

    async fn api_key_by_hash(&self, hash: &ApiKeyHash) -> Result<Option<ApiKeyRecord>, StoreError> {
        self.inner.api_key_by_hash(hash).await
    }

    async fn set_pool_target(&self, target: PoolTarget) -> Result<(), StoreError> {
        self.inner.set_pool_target(target).await
    }

    async fn pool_targets(&self) -> Result<Vec<PoolTarget>, StoreError> {
        self.inner.pool_targets().await
    }

    async fn paused(&self) -> Result<bool, StoreError> {
        self.inner.paused().await
    }

    async fn set_paused(&self, paused: bool) -> Result<bool, StoreError> {
        self.inner.set_paused(paused).await
    }

    async fn new_leader_epoch(&self) -> Result<u64, StoreError> {
        self.inner.new_leader_epoch().await
    }

    async fn commit_fenced(&self, batch: Batch, epoch: u64) -> Result<(), CommitError> {
        if self.fault == Fault::IgnoreFence {
            return self.inner.commit(batch).await;
        }
        self.inner.commit_fenced(batch, epoch).await
    }

    async fn abandoned_allocations(&self) -> Result<Option<Vec<SessionId>>, StoreError> {
        let set = self.abandoned.lock().expect("abandoned").clone();
        match set {
            Some(ids) => Ok(Some(ids)),
            None => self.inner.abandoned_allocations().await,
        }
    }

    fn key_generation(&self) -> u64 {
        self.inner.key_generation()
    }
}
