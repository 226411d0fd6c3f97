//! The engine API behind `/api/v1`: sessions with lifetimes (create, get,
//! list, extend, release, fail), the wait queue (status, cancel), node
//! histories and pool counts with estimates.
//!
//! Release and fail are [`Engine::done`] and [`Engine::fail`], the same
//! operations as the legacy API's: one definition of what they do.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::time::Duration;

use tracing::{debug, info, warn};

use crate::engine::{Engine, EngineError, Principal};
use crate::model::{KeyId, Node, PoolKey, Session, SessionId, SessionState};
use crate::queue::{QueueFull, QueuedRequest, RequestId};
use crate::session::SessionCause;
use crate::state::{Event, NodeState};
use crate::store::{Batch, CommitError, EventQuery, SessionWrite};
use crate::time::Timestamp;

/// A request for a new session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRequest {
    /// The pool (a name such as `9/x86_64` parses with
    /// `PoolKey::from_str`; release, architecture and flavor make one
    /// with [`PoolKey::new`]).
    pub pool: PoolKey,
    /// How many nodes (1 to the policy's `max_count`).
    pub count: u32,
    /// How long the session lives before it expires (`None`: the
    /// policy's `lease`); at most the policy's `max_lifetime`.
    pub lifetime: Option<Duration>,
    /// Queue the request when the pool is short, instead of refusing it
    /// with [`EngineError::InsufficientNodes`].
    pub wait: bool,
}

/// A session with its nodes' host names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionView {
    /// The session as stored (state, lease, expiry, hold).
    pub session: Session,
    /// Its nodes' host names, in the session's node order.
    pub hosts: Vec<String>,
}

/// What [`Engine::create_session`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Created {
    /// The nodes were handed over at once.
    Session(SessionView),
    /// The pool was short and the request waits in the queue: poll it
    /// with [`Engine::queue_status`] (a request nobody polls for the
    /// policy's `queue_poll_timeout` is dropped).
    Queued(QueueStatus),
}

/// Where a queued request stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueState {
    /// Still waiting.
    Waiting {
        /// Its place among the requests for its pool (1: next).
        position: usize,
        /// A rough estimate of when enough nodes will be Ready for it
        /// and every request before it (`None`: the pool has no hardware
        /// coming).
        estimated_wait: Option<Duration>,
    },
    /// Served: the session it became.
    Served {
        /// The new session.
        session: SessionId,
    },
    /// Serving it failed for a reason that waiting will not cure (the
    /// rate limit, a preparation failure, the project became unusable).
    Failed {
        /// Why, as the error would have said.
        reason: String,
    },
    /// Cancelled by its owner.
    Cancelled,
    /// Dropped: it waited the policy's `max_wait`, or its owner stopped
    /// polling for it.
    Dropped {
        /// Which of the two.
        reason: String,
    },
}

/// A queued request and where it stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueStatus {
    /// The request's id.
    pub id: RequestId,
    /// Its project.
    pub project: String,
    /// The pool asked for.
    pub pool: PoolKey,
    /// How many nodes.
    pub count: u32,
    /// When it was queued.
    pub enqueued_at: Timestamp,
    /// Where it stands.
    pub state: QueueState,
}

/// Which sessions [`Engine::list_sessions`] lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionScope {
    /// The caller's key's live sessions.
    Mine,
    /// A project's live sessions (admin only).
    Project(String),
    /// Every live session (admin only).
    All,
}

/// A pool as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolStatus {
    /// The pool.
    pub pool: PoolKey,
    /// How many Ready nodes the reconciler keeps (its capacity for one
    /// request).
    pub standby: u32,
    /// Nodes carrying the pool's image, per state (states with none are
    /// left out).
    pub counts: BTreeMap<NodeState, u32>,
    /// Nodes asked for by requests waiting in the queue for this pool.
    pub waiting: u32,
    /// A rough estimate of when one more node will be Ready (zero: one
    /// is Ready now; `None`: none is being installed or could be).
    pub estimated_ready: Option<Duration>,
}

/// A finished queue request, kept for its owner to read for a while.
#[derive(Debug, Clone)]
pub(crate) struct Finished {
    pub(crate) key_id: KeyId,
    pub(crate) status: QueueStatus,
    pub(crate) at: Timestamp,
}

/// A queued request being allocated now (see `Inner::serving`).
#[derive(Debug, Clone)]
pub(crate) struct Serving {
    /// The request as it was queued.
    pub(crate) request: QueuedRequest,
    /// Its owner cancelled it meanwhile: what the allocation gets is
    /// released at once, and it ends Cancelled.
    pub(crate) cancelled: bool,
}

impl Engine {
    /// Creates a session: claims `count` Ready nodes of the pool, prepares
    /// them, and hands them over with the requested lifetime (all or
    /// nothing, as [`Engine::get_nodes`]). When the pool is short and the
    /// request says `wait`, it is queued instead ([`Created::Queued`]);
    /// it is also queued, behind them, while requests for the same pool
    /// are waiting, so that it does not overtake them.
    ///
    /// Refused with nothing changed: a lifetime of zero or past
    /// `max_lifetime`, a count out of range or past the project's quota
    /// (it could never be served), an unknown pool, a full queue.
    pub async fn create_session(&self, who: &Principal, req: &SessionRequest) -> Result<Created, EngineError> {
        let key_id = who.key_id.ok_or(EngineError::InvalidKey)?;
        let lease = self.lifetime(req.lifetime)?;
        req.pool.validate().map_err(|e| EngineError::InvalidRequest(e.to_string()))?;
        let policy = &self.inner.policy;
        if req.wait {
            // A request that could never be served is refused now, not
            // left to wait.
            let project = self.inner.store.project(&who.project).await?;
            if let Some(quota) = project.and_then(|p| p.quota).or(policy.default_quota) {
                if req.count > quota {
                    return Err(EngineError::QuotaExceeded { held: 0, requested: req.count, quota });
                }
            }
            let behind_others = self.queue().arrivals().iter().any(|r| r.pool == req.pool);
            if behind_others {
                self.check_pool(&req.pool, req.count).await?;
                return self.enqueue(who, key_id, req).await;
            }
        }
        match self.allocate(who, &req.pool, req.count, lease).await {
            Ok(a) => Ok(Created::Session(self.get_session(who, a.session.as_str()).await?)),
            // Short of nodes, or of quota until the project releases
            // some (the count fits the quota: checked above).
            Err(EngineError::InsufficientNodes { .. } | EngineError::QuotaExceeded { .. }) if req.wait => {
                self.enqueue(who, key_id, req).await
            }
            Err(e) => Err(e),
        }
    }

    /// The lease a request's lifetime gives, checked against the policy.
    fn lifetime(&self, asked: Option<Duration>) -> Result<Duration, EngineError> {
        let policy = &self.inner.policy;
        let Some(d) = asked else { return Ok(policy.lease) };
        if d.is_zero() {
            return Err(EngineError::InvalidRequest("lifetime must be longer than zero".into()));
        }
        if let Some(max) = policy.max_lifetime {
            if d > max {
                return Err(EngineError::InvalidRequest(format!(
                    "lifetime {} s exceeds the maximum lifetime of {} s",
                    d.as_secs(),
                    max.as_secs()
                )));
            }
        }
        Ok(d)
    }

    /// Locks the wait queue. A poisoned lock (a panic while it was held)
    /// is taken over: every queue operation leaves it consistent.
    pub(crate) fn queue(&self) -> std::sync::MutexGuard<'_, crate::queue::WaitQueue> {
        self.inner.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The requests being allocated now. Lock order: the queue (when
    /// both are held), then this.
    fn serving(&self) -> std::sync::MutexGuard<'_, HashMap<RequestId, Serving>> {
        self.inner.serving.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn enqueue(&self, who: &Principal, key_id: KeyId, req: &SessionRequest) -> Result<Created, EngineError> {
        let now = self.now_ts();
        let id = RequestId(uuid::Uuid::new_v4().hyphenated().to_string());
        let queued = QueuedRequest {
            id: id.clone(),
            project: who.project.clone(),
            key_id,
            pool: req.pool.clone(),
            count: req.count,
            lifetime: req.lifetime,
            enqueued_at: now,
            last_seen: now,
            seq: 0,
        };
        let policy = &self.inner.policy;
        self.queue().push(queued, policy.queue_capacity, policy.queue_per_project).map_err(|e| match e {
            QueueFull::Service { .. } | QueueFull::Project { .. } => EngineError::QueueFull(e.to_string()),
        })?;
        info!(request = %id, project = %who.project, pool = %req.pool, count = req.count, "request queued");
        // Nodes may have turned Ready since the claim was refused.
        self.kick();
        Ok(Created::Queued(self.queue_status(who, &id).await?))
    }

    /// The pool must exist and be able to hold `count` nodes at once.
    async fn check_pool(&self, pool: &PoolKey, count: u32) -> Result<(), EngineError> {
        let max = self.inner.policy.max_count;
        if count == 0 || count > max {
            return Err(EngineError::InvalidRequest(format!("count must be between 1 and {max}, got {count}")));
        }
        let targets = self.inner.store.pool_targets().await?;
        let Some(target) = targets.iter().find(|t| &t.pool == pool && t.standby > 0) else {
            return Err(EngineError::NoSuchPool {
                requested: pool.clone(),
                available: targets.into_iter().filter(|t| t.standby > 0).map(|t| t.pool).collect(),
            });
        };
        if count > target.standby {
            return Err(EngineError::InvalidRequest(format!(
                "count {count} exceeds the capacity of pool {pool} ({} nodes)",
                target.standby
            )));
        }
        Ok(())
    }

    fn now_ts(&self) -> Timestamp {
        self.inner.clock.now()
    }

    /// One of the caller's sessions, with its hosts. Another key's
    /// session looks like no session at all.
    pub async fn get_session(&self, who: &Principal, sid: &str) -> Result<SessionView, EngineError> {
        let s = self.own_session(who, sid).await?;
        self.view(s).await
    }

    /// [`Engine::done`] for API v1: the session as the release left it,
    /// with its hosts (no second read of the session).
    pub async fn release_session(&self, who: &Principal, sid: &str) -> Result<SessionView, EngineError> {
        let s = self.release(who, sid).await?;
        self.view(s).await
    }

    /// [`Engine::fail`] for API v1: the session as the fail left it (in
    /// Fail, its nodes held), with its hosts.
    pub async fn fail_session(&self, who: &Principal, sid: &str) -> Result<SessionView, EngineError> {
        let s = self.fail_and_hold(who, sid).await?;
        self.view(s).await
    }

    async fn view(&self, session: Session) -> Result<SessionView, EngineError> {
        let hosts = self.session_nodes(&session).await?.into_iter().map(|n| n.hostname).collect();
        Ok(SessionView { session, hosts })
    }

    /// Live sessions (Allocating, Prod, Fail), oldest first: the
    /// caller's key's, or (admin) a project's or everyone's.
    pub async fn list_sessions(&self, who: &Principal, scope: &SessionScope) -> Result<Vec<SessionView>, EngineError> {
        let key = match scope {
            SessionScope::Mine => Some(who.key_id.ok_or(EngineError::InvalidKey)?),
            SessionScope::Project(_) | SessionScope::All => {
                if !who.admin {
                    return Err(EngineError::NotAdmin);
                }
                None
            }
        };
        let mut out = Vec::new();
        for s in self.inner.store.live_sessions().await? {
            let keep = match scope {
                SessionScope::Mine => Some(s.key_id) == key,
                SessionScope::Project(p) => &s.project == p,
                SessionScope::All => true,
            };
            if keep {
                out.push(self.view(s).await?);
            }
        }
        Ok(out)
    }

    /// Moves a Prod session's expiry `by` later, up to its maximum
    /// lifetime (the policy's `max_lifetime` from its creation). The
    /// lease, which `/Overtime` compares against, does not move.
    pub async fn extend_session(&self, who: &Principal, sid: &str, by: Duration) -> Result<SessionView, EngineError> {
        if by.is_zero() {
            return Err(EngineError::InvalidRequest("an extension must be longer than zero".into()));
        }
        let max_lifetime = self.inner.policy.max_lifetime;
        for _ in 0..self.inner.policy.cas_retries {
            let s = self.own_session(who, sid).await?;
            if s.state != SessionState::Prod {
                return Err(EngineError::SessionNotInProd { id: s.id, state: s.state.as_str() });
            }
            let now = self.now_ts();
            let Some(current) = s.expires_at else {
                return Err(EngineError::SessionNotInProd { id: s.id, state: s.state.as_str() });
            };
            let cause = SessionCause::Extended { until: current.plus(by), max_until: s.max_until(max_lifetime) };
            let w = SessionWrite::transition(&s, cause, now)?;
            let after = w.session.clone();
            match self.inner.store.commit(Batch { sessions: vec![w], ..Batch::default() }).await {
                Ok(()) => {
                    info!(session = %s.id, expires_at = ?after.expires_at, "session extended");
                    return self.view(after).await;
                }
                Err(CommitError::Store(e)) => return Err(e.into()),
                Err(e) => debug!(session = %s.id, error = %e, "lost a race extending; retrying"),
            }
        }
        Err(EngineError::Contention(format!("session {sid}")))
    }

    /// Where the caller's queued request stands. Asking counts as the
    /// client still being there (see the policy's
    /// `queue_poll_timeout`). A request this process does not know (from
    /// before a restart, or long finished) is
    /// [`EngineError::UnknownRequest`]: the queue does not survive a
    /// restart, and its client must submit the request again.
    pub async fn queue_status(&self, who: &Principal, id: &RequestId) -> Result<QueueStatus, EngineError> {
        let key_id = who.key_id.ok_or(EngineError::InvalidKey)?;
        let now = self.now_ts();
        let waiting = {
            let mut q = self.queue();
            match q.get(id).cloned() {
                Some(r) if r.key_id == key_id => {
                    q.touch(id, now);
                    let (position, ahead) = q.position(id).unwrap_or((1, 0));
                    Some((r, position, ahead))
                }
                Some(_) => return Err(EngineError::UnknownRequest(id.clone())),
                // Taken off the queue and being allocated: still waiting,
                // first in its line, with its nodes Ready. (Looked up with
                // the queue held, so that a request put back or finished
                // meanwhile is seen in one place or the other, never in
                // neither.)
                None => match self.serving().get(id) {
                    Some(s) if s.request.key_id == key_id && !s.cancelled => {
                        let r = &s.request;
                        return Ok(QueueStatus {
                            id: r.id.clone(),
                            project: r.project.clone(),
                            pool: r.pool.clone(),
                            count: r.count,
                            enqueued_at: r.enqueued_at,
                            state: QueueState::Waiting { position: 1, estimated_wait: Some(Duration::ZERO) },
                        });
                    }
                    _ => None,
                },
            }
        };
        if let Some((r, position, ahead)) = waiting {
            let estimated_wait = self.estimate_ready(&r.pool, ahead.saturating_add(r.count)).await?;
            return Ok(QueueStatus {
                id: r.id,
                project: r.project,
                pool: r.pool,
                count: r.count,
                enqueued_at: r.enqueued_at,
                state: QueueState::Waiting { position, estimated_wait },
            });
        }
        let finished = self.inner.finished.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match finished.get(id) {
            Some(f) if f.key_id == key_id => Ok(f.status.clone()),
            _ => Err(EngineError::UnknownRequest(id.clone())),
        }
    }

    /// Cancels the caller's waiting request. A request already served or
    /// finished is left as it is (its status says so).
    pub async fn cancel_request(&self, who: &Principal, id: &RequestId) -> Result<QueueStatus, EngineError> {
        let key_id = who.key_id.ok_or(EngineError::InvalidKey)?;
        let removed = {
            let mut q = self.queue();
            match q.get(id) {
                Some(r) if r.key_id == key_id => q.remove(id),
                Some(_) => None,
                // Being allocated: the allocation's nodes are released as
                // soon as it ends (see `serve_queue`); the owner is told
                // now that the request is cancelled.
                None => match self.serving().get_mut(id) {
                    Some(s) if s.request.key_id == key_id && !s.cancelled => {
                        s.cancelled = true;
                        Some(s.request.clone())
                    }
                    _ => None,
                },
            }
        };
        match removed {
            Some(r) => {
                info!(request = %id, project = %r.project, "queued request cancelled");
                Ok(self.finish_request(r, QueueState::Cancelled))
            }
            None => self.queue_status(who, id).await,
        }
    }

    /// Records a request's end for its owner to read.
    pub(crate) fn finish_request(&self, r: QueuedRequest, state: QueueState) -> QueueStatus {
        let now = self.now_ts();
        let status = QueueStatus {
            id: r.id.clone(),
            project: r.project,
            pool: r.pool,
            count: r.count,
            enqueued_at: r.enqueued_at,
            state,
        };
        let mut finished = self.inner.finished.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // Kept as long as a client may take between two polls, and at
        // least ten minutes.
        let keep = self.inner.policy.queue_poll_timeout.unwrap_or(Duration::ZERO).max(Duration::from_secs(600));
        finished.retain(|_, f| now.since(f.at) < keep);
        finished.insert(r.id, Finished { key_id: r.key_id, status: status.clone(), at: now });
        status
    }

    /// Returns a request being served to the head of its line (in one
    /// step with the queue held, so that its owner always finds it).
    fn put_back(&self, r: QueuedRequest) {
        let mut q = self.queue();
        self.serving().remove(&r.id);
        q.put_back(r);
    }

    /// A node and its event history (oldest first, at most `limit`
    /// events after `after_seq`; `limit` 0 means the policy's page size
    /// of 1000).
    pub async fn node_history(
        &self,
        hostname: &str,
        after_seq: u64,
        limit: usize,
    ) -> Result<(Node, Vec<Event>), EngineError> {
        let node = self
            .inner
            .store
            .node_by_hostname(hostname)
            .await?
            .ok_or_else(|| EngineError::UnknownNode(hostname.chars().take(253).collect()))?;
        let limit = if limit == 0 { 1000 } else { limit.min(1000) };
        let events = self.inner.store.events(EventQuery { node: Some(node.id), after_seq, limit }).await?;
        Ok((node, events))
    }

    /// Every pool with a standby target: its nodes per state, the nodes
    /// waiting requests ask for, and an estimate of when one more node is
    /// Ready.
    pub async fn pools(&self) -> Result<Vec<PoolStatus>, EngineError> {
        let targets = self.inner.store.pool_targets().await?;
        let nodes = self.inner.store.nodes().await?;
        let mut counts: BTreeMap<&PoolKey, BTreeMap<NodeState, u32>> = BTreeMap::new();
        for n in &nodes {
            if let Some(img) = &n.image {
                *counts.entry(img).or_default().entry(n.state).or_default() += 1;
            }
        }
        let mut waiting: BTreeMap<PoolKey, u32> = BTreeMap::new();
        for r in self.queue().arrivals() {
            *waiting.entry(r.pool.clone()).or_default() += r.count;
        }
        let mut out = Vec::new();
        for t in targets.into_iter().filter(|t| t.standby > 0) {
            let c = counts.get(&t.pool).cloned().unwrap_or_default();
            let ready = c.get(&NodeState::Ready).copied().unwrap_or(0);
            let provisioning = c.get(&NodeState::Provisioning).copied().unwrap_or(0);
            let estimated_ready = self.estimate(ready, provisioning, 1);
            out.push(PoolStatus {
                waiting: waiting.get(&t.pool).copied().unwrap_or(0),
                pool: t.pool,
                standby: t.standby,
                counts: c,
                estimated_ready,
            });
        }
        Ok(out)
    }

    /// When `needed` nodes of `pool` will be Ready, roughly (see
    /// `estimate`; `None`: none is being installed or could be). Public
    /// for the answer to a refused request: `/api/v1` tells a caller
    /// turned away for want of Ready nodes when enough should be there.
    pub async fn estimate_ready(&self, pool: &PoolKey, needed: u32) -> Result<Option<Duration>, EngineError> {
        let nodes = self.inner.store.nodes_in_states(&[NodeState::Ready, NodeState::Provisioning]).await?;
        let of = |s: NodeState| nodes.iter().filter(|n| n.state == s && n.image.as_ref() == Some(pool)).count() as u32;
        Ok(self.estimate(of(NodeState::Ready), of(NodeState::Provisioning), needed))
    }

    /// The estimate: nothing if enough are Ready; one install's time if
    /// the installs under way cover the rest; one more install's time for
    /// each further round of `max_concurrent_installs`. An install's time
    /// is the average of the installs this process has seen finish
    /// (before any, the policy's `install_timeout`, an upper bound).
    /// Nodes still held by sessions are not foreseen: it is rough.
    fn estimate(&self, ready: u32, provisioning: u32, needed: u32) -> Option<Duration> {
        if ready >= needed {
            return Some(Duration::ZERO);
        }
        let install = match self.inner.install_millis.load(Ordering::Relaxed) {
            0 => self.inner.policy.install_timeout,
            ms => Duration::from_millis(ms),
        };
        let missing = needed - ready;
        if missing <= provisioning {
            return Some(install);
        }
        let per_round = u32::try_from(self.inner.policy.max_concurrent_installs.max(1)).unwrap_or(u32::MAX);
        let rounds = (missing - provisioning).div_ceil(per_round);
        Some(install.saturating_mul(rounds.saturating_add(u32::from(provisioning > 0))))
    }

    /// Serves the wait queue: drops requests whose client is gone or that
    /// waited too long, picks the requests the Ready nodes can serve now
    /// (fair share, see [`crate::queue`]) and allocates them
    /// concurrently. A request whose claim is refused for want of nodes
    /// or quota (a race with another allocation) goes back to the head of
    /// its project's line; any other refusal ends it (its status says
    /// why). Called by the reconciler on every pass. Returns how many
    /// were served.
    pub async fn serve_queue(&self) -> Result<usize, EngineError> {
        let now = self.now_ts();
        let policy = &self.inner.policy;
        let dropped = self.queue().remove_where(|r| {
            now.since(r.enqueued_at) >= policy.max_wait
                || policy.queue_poll_timeout.is_some_and(|t| now.since(r.last_seen) >= t)
        });
        for r in dropped {
            let reason = if now.since(r.enqueued_at) >= policy.max_wait {
                format!("waited the longest allowed ({} s)", policy.max_wait.as_secs())
            } else {
                "nobody asked about it any more: its client is gone".to_string()
            };
            info!(request = %r.id, project = %r.project, %reason, "queued request dropped");
            self.finish_request(r, QueueState::Dropped { reason });
        }
        if self.queue().is_empty() {
            return Ok(0);
        }
        if self.inner.store.paused().await? {
            return Ok(0);
        }
        let ready: BTreeMap<PoolKey, u32> = self.inner.store.ready_counts().await?.into_iter().collect();
        // Quotas: what each waiting project holds now.
        let projects: Vec<String> = {
            let q = self.queue();
            let mut p: Vec<String> = q.arrivals().into_iter().map(|r| r.project.clone()).collect();
            p.sort();
            p.dedup();
            p
        };
        let mut room: BTreeMap<String, Option<u32>> = BTreeMap::new();
        if !projects.is_empty() {
            let live = self.inner.store.live_sessions().await?;
            for p in projects {
                let quota = self.inner.store.project(&p).await?.and_then(|x| x.quota).or(policy.default_quota);
                let held: u32 = live
                    .iter()
                    .filter(|s| s.project == p && s.state.is_live())
                    .map(|s| u32::try_from(s.nodes.len()).unwrap_or(u32::MAX))
                    .sum();
                room.insert(p, quota.map(|q| q.saturating_sub(held)));
            }
        }
        let chosen = {
            let mut q = self.queue();
            let chosen = q.select(&ready, |p| room.get(p).copied().flatten());
            // Shown as being served from the moment they leave the queue
            // (the queue still held), until each is finished or put back.
            let mut serving = self.serving();
            for r in &chosen {
                serving.insert(r.id.clone(), Serving { request: r.clone(), cancelled: false });
            }
            chosen
        };
        if chosen.is_empty() {
            return Ok(0);
        }
        // Forgets the requests still marked as being served if this future
        // is dropped midway (the service stopping).
        let _forget = ForgetServing { engine: self, ids: chosen.iter().map(|r| r.id.clone()).collect() };
        let results = futures::future::join_all(chosen.into_iter().map(|r| async move {
            let who = Principal { key_id: Some(r.key_id), project: r.project.clone(), admin: false };
            let lease = r.lifetime.unwrap_or(self.inner.policy.lease);
            let res = self.allocate(&who, &r.pool, r.count, lease).await;
            (r, res)
        }))
        .await;
        let mut served = 0;
        let mut first_error = None;
        for (r, res) in results {
            // Cancelled while it was being allocated: whatever it got goes
            // back at once, and it stays Cancelled (as its owner was told).
            if self.serving().get(&r.id).is_some_and(|s| s.cancelled) {
                self.serving().remove(&r.id);
                if let Ok(a) = res {
                    let who = Principal { key_id: Some(r.key_id), project: r.project.clone(), admin: false };
                    info!(request = %r.id, session = %a.session, "queued request cancelled while served; releasing");
                    if let Err(e) = self.release(&who, &a.session.0).await {
                        warn!(request = %r.id, session = %a.session, error = %e,
                            "releasing the session of a cancelled request failed; its lease will end it");
                    }
                }
                continue;
            }
            match res {
                Ok(a) => {
                    info!(request = %r.id, session = %a.session, project = %r.project, "queued request served");
                    let id = r.id.clone();
                    self.finish_request(r, QueueState::Served { session: a.session });
                    self.serving().remove(&id);
                    served += 1;
                }
                Err(
                    EngineError::InsufficientNodes { .. }
                    | EngineError::QuotaExceeded { .. }
                    | EngineError::Paused
                    | EngineError::Contention(_),
                ) => {
                    debug!(request = %r.id, "queued request lost a race for nodes; back at the head of its line");
                    self.put_back(r);
                }
                Err(EngineError::Store(e)) => {
                    self.put_back(r);
                    first_error.get_or_insert(EngineError::Store(e));
                }
                Err(e) => {
                    warn!(request = %r.id, project = %r.project, error = %e, "serving a queued request failed");
                    let id = r.id.clone();
                    self.finish_request(r, QueueState::Failed { reason: e.to_string() });
                    self.serving().remove(&id);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(served),
        }
    }
}

/// Drops from [`Inner::serving`](crate::engine) the requests of a
/// `serve_queue` call that did not get to finish them (its future was
/// dropped): nothing would ever finish them, and they must not be shown
/// as being served forever.
struct ForgetServing<'a> {
    engine: &'a Engine,
    ids: Vec<RequestId>,
}

impl Drop for ForgetServing<'_> {
    fn drop(&mut self) {
        let mut serving = self.engine.serving();
        for id in &self.ids {
            serving.remove(id);
        }
    }
}
