//! The operations of the API: get nodes, done, fail, inventory, overtime,
//! set-admin, recover, pause, resume.
//!
//! The engine holds no state of its own beyond its configuration: every
//! decision is re-read from the [`Store`] and written back with
//! compare-and-set, so any number of engines (threads, processes) may share
//! one store. A lost race is retried from a fresh read.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures::channel::oneshot;
use futures::future::join_all;
use futures::task::AtomicWaker;
use tracing::{debug, error, info, warn};

use crate::installer::{Blame, Contextualizer, Installer, PrepareError, SessionContext};
use crate::model::{Actor, Arch, KeyId, Node, NodeId, PoolKey, PoolTarget, Project, Session, SessionId, SessionState};
use crate::policy::Policy;
use crate::power::PowerController;
use crate::session::{SessionCause, SessionTransitionError};
use crate::state::{Cause, NodeState, TransitionError};
use crate::store::{
    Batch, ClaimRefusal, ClaimRequest, CommitError, Guard, HandBack, HandBackKind, HandBackRefusal, NodeWrite,
    SessionWrite, Store, StoreError,
};
use crate::time::{Clock, Timestamp, timeout};

/// Where new session ids come from. Production uses time-ordered random
/// UUIDs; tests inject a seeded source so that runs are reproducible.
pub trait SessionIds: Send + Sync {
    /// A new, unique session id for a session created at `now`.
    fn next_id(&self, now: Timestamp) -> SessionId;
}

/// Version-7 UUIDs, in the legacy ssid format: the creation time in
/// milliseconds (from the engine's clock), then 74 random bits. Ids made
/// later sort later, so a store that keeps sessions in id order appends a
/// new one where the last went instead of on a random page (with random
/// version-4 ids every claim dirtied its own page of the session table and
/// of its index, and the WAL grew with them). The random part still makes
/// an id unguessable, and a key only ever sees its own sessions anyway.
#[derive(Debug, Default, Clone, Copy)]
pub struct UuidSessionIds;

impl SessionIds for UuidSessionIds {
    fn next_id(&self, now: Timestamp) -> SessionId {
        // A version-4 UUID's last ten bytes carry 74 random bits, in the
        // very positions a version-7 UUID keeps random (the version and
        // variant bits they also hold are replaced).
        let random = uuid::Uuid::new_v4().into_bytes();
        let mut tail = [0u8; 10];
        tail.copy_from_slice(&random[6..]);
        let millis = u64::try_from(now.0).unwrap_or(0);
        SessionId(uuid::Builder::from_unix_timestamp_millis(millis, &tail).into_uuid().hyphenated().to_string())
    }
}

/// Who is calling: the result of [`Engine::authenticate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The key used (`None` for an operator at the command line).
    pub key_id: Option<KeyId>,
    /// The key's project.
    pub project: String,
    /// May call the admin operations.
    pub admin: bool,
}

impl Principal {
    /// An operator acting locally (command line): admin, no key.
    pub fn operator() -> Self {
        Principal { key_id: None, project: String::new(), admin: true }
    }

    /// The actor recorded in events.
    pub fn actor(&self) -> Actor {
        self.key_id.map(Actor::Key).unwrap_or(Actor::Operator)
    }
}

/// What `/Node/get` asks for. Missing fields take the legacy defaults:
/// release 7, x86_64, one node, the architecture's default flavor.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeRequest {
    /// OS release (legacy `ver`).
    pub release: Option<String>,
    /// Image architecture.
    pub arch: Option<Arch>,
    /// How many nodes.
    pub count: Option<u32>,
    /// Hardware flavor.
    pub flavor: Option<String>,
}

impl NodeRequest {
    /// The pool this request is for.
    pub fn pool(&self) -> PoolKey {
        PoolKey::new(
            self.release.clone().unwrap_or_else(|| "7".into()),
            self.arch.unwrap_or(Arch::X86_64),
            self.flavor.clone(),
        )
    }
}

/// A successful `/Node/get`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    /// The id of the session created for the request; the caller's
    /// handle for `/Node/done` and `/Node/fail`.
    pub session: SessionId,
    /// Its nodes' hostnames.
    pub hosts: Vec<String>,
}

/// A session past its lease, for `/Overtime`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overtime {
    /// The overdue session as stored (project, lease, state).
    pub session: Session,
    /// Its nodes' hostnames.
    pub hosts: Vec<String>,
    /// How long past the lease.
    pub overdue: std::time::Duration,
}

/// Why an operation was refused or failed. Every refusal changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The API key is missing or unknown.
    #[error("invalid API key")]
    InvalidKey,
    /// The caller is not an admin.
    #[error("this call needs an admin key")]
    NotAdmin,
    /// No such session for this key (also for another key's session: a
    /// stranger learns nothing).
    #[error("invalid session id")]
    InvalidSession,
    /// The session is not in the state the call needs.
    #[error("session {id} is {state}, not Prod")]
    SessionNotInProd {
        /// The session the call named.
        id: SessionId,
        /// The state it is in instead of Prod.
        state: &'static str,
    },
    /// A parameter is out of range.
    #[error("{0}")]
    InvalidRequest(String),
    /// No pool matches the request.
    #[error("no pool {requested}; available pools: {}", list_pools(available))]
    NoSuchPool {
        /// What was asked for.
        requested: PoolKey,
        /// What exists.
        available: Vec<PoolKey>,
    },
    /// Not enough Ready nodes right now; try again later.
    #[error("insufficient nodes in READY state: requested {requested}, {available} ready")]
    InsufficientNodes {
        /// Nodes the request asked for.
        requested: u32,
        /// Ready now.
        available: u32,
    },
    /// The project's quota would be exceeded.
    #[error("quota exceeded: project holds {held} nodes, asked for {requested}, quota {quota}")]
    QuotaExceeded {
        /// Held now.
        held: u32,
        /// Nodes the request asked for.
        requested: u32,
        /// The project's quota.
        quota: u32,
    },
    /// The key made too many sessions recently.
    #[error("Rate limit exceeded: {recent} sessions in the last {} minutes", .window_secs / 60)]
    RateLimited {
        /// Sessions in the window.
        recent: u32,
        /// The window, in seconds.
        window_secs: u64,
    },
    /// The project cannot be given nodes as it is (for SSH
    /// contextualization: it has no usable SSH keys). Nothing was claimed
    /// or blamed; an operator must fix the project.
    #[error("project {project:?} cannot be given nodes: {reason}")]
    ProjectUnusable {
        /// The project that cannot be served.
        project: String,
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// Preparing a node for the project failed; nothing was handed out.
    #[error("failed to allocate nodes: preparing {hostname} failed: {reason}")]
    PreparationFailed {
        /// The node whose preparation failed (it is blamed and cools down).
        hostname: String,
        /// The preparation error, as the contextualizer reported it.
        reason: String,
    },
    /// The project's cap on failed nodes would be exceeded.
    #[error("exceeded maximum allowed fail nodes limit ({cap}), please release other machines to continue")]
    FailCapExceeded {
        /// The most Failed-held nodes a project may keep at once.
        cap: u32,
    },
    /// New allocations are paused.
    #[error("the service is paused: no new allocations")]
    Paused,
    /// Resume was called while not paused.
    #[error("the service is not paused")]
    NotPaused,
    /// No node has that hostname.
    #[error("no node named {0:?}")]
    UnknownNode(String),
    /// The node's state does not allow the operation.
    #[error(transparent)]
    Transition(#[from] TransitionError),
    /// The session's state does not allow the operation.
    #[error(transparent)]
    SessionTransition(#[from] SessionTransitionError),
    /// The operation kept losing compare-and-set races.
    #[error("too much contention on {0}; try again")]
    Contention(String),
    /// The wait queue cannot take the request (the whole queue, or the
    /// project's share of it, is full).
    #[error("{0}")]
    QueueFull(String),
    /// No waiting or recently finished request of this key has that id.
    /// The queue does not survive a restart of the service: a request
    /// made before one must be submitted again.
    #[error(
        "no queued request {0} for this key; queued requests do not survive a restart of the service, submit it again"
    )]
    UnknownRequest(crate::queue::RequestId),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn list_pools(p: &[PoolKey]) -> String {
    if p.is_empty() {
        return "none".into();
    }
    p.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}

impl From<CommitError> for EngineError {
    fn from(e: CommitError) -> Self {
        match e {
            CommitError::Store(s) => EngineError::Store(s),
            other => EngineError::Contention(other.to_string()),
        }
    }
}

/// One attempt of a compare-and-set operation (see
/// [`Engine::with_retries`]).
enum Attempt<T> {
    /// Nothing (more) to write: the answer.
    Done(T),
    /// Write this batch; if it commits, the answer is the value.
    Commit(Batch, T),
}

/// Wakes the reconciler early when something it cares about changed
/// (nodes released, service resumed) instead of waiting for its tick.
#[derive(Debug, Default)]
pub(crate) struct Kick {
    pending: AtomicBool,
    waker: AtomicWaker,
}

impl Kick {
    pub(crate) fn notify(&self) {
        self.pending.store(true, Ordering::Release);
        self.waker.wake();
    }

    pub(crate) fn poll_kicked(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.pending.swap(false, Ordering::AcqRel) {
            return Poll::Ready(());
        }
        self.waker.register(cx.waker());
        if self.pending.swap(false, Ordering::AcqRel) { Poll::Ready(()) } else { Poll::Pending }
    }
}

pub(crate) struct Inner {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) power: Arc<dyn PowerController>,
    pub(crate) installer: Arc<dyn Installer>,
    pub(crate) contextualizer: Option<Arc<dyn Contextualizer>>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) ids: Arc<dyn SessionIds>,
    pub(crate) policy: Policy,
    /// Shared by an engine and its fenced siblings ([`Engine::fenced`]), so
    /// a request served by the one wakes the reconciler of the other.
    pub(crate) kick: Arc<Kick>,
    /// When this engine was built (for a fenced engine: when its
    /// leadership term began). Work older than this (nodes still
    /// Provisioning; on a store used by one process, sessions still
    /// Allocating) cannot be driven by this reconciler: recovery takes it
    /// over.
    pub(crate) started_at: Timestamp,
    /// The leadership epoch every write of this engine carries
    /// ([`Store::commit_fenced`]); `None`: unfenced.
    pub(crate) fence: Option<u64>,
    /// API keys remembered, and their unrecorded uses (`keys` module).
    pub(crate) keys: crate::keys::KeyCache,
    /// Single-node writes on their way to the store together.
    pub(crate) gather: Gather,
    /// Session requests waiting for nodes (in memory: see `queue`).
    pub(crate) queue: Arc<std::sync::Mutex<crate::queue::WaitQueue>>,
    /// Queue requests taken off the queue and being allocated now (a claim
    /// and the nodes' preparation), until they are finished or put back:
    /// still shown to their owners, and cancellable.
    pub(crate) serving: Arc<std::sync::Mutex<HashMap<crate::queue::RequestId, crate::sessions::Serving>>>,
    /// Queue requests that ended recently, for their owners to read.
    pub(crate) finished: Arc<std::sync::Mutex<HashMap<crate::queue::RequestId, crate::sessions::Finished>>>,
    /// The average duration of the installs seen to succeed, in
    /// milliseconds (0: none yet), for the estimates of time to Ready.
    pub(crate) install_millis: Arc<std::sync::atomic::AtomicU64>,
}

/// One answer of a gathered commit.
type GatheredReply = oneshot::Sender<Result<(), CommitError>>;

/// Single-node writes of concurrent operations (a reconciler pass starting
/// a wave of installs, a wave of installs finishing), gathered into one
/// [`Store::commit_each`] call ([`Store::commit_each_fenced`] for a
/// leader's): one message to the store and one durable write for the wave
/// instead of one each. Each write is still its own
/// compare-and-set, answered on its own. A queue, not a lock: nothing is
/// held across an await, and correctness rests on the store as always.
#[derive(Default)]
pub(crate) struct Gather {
    queue: Mutex<Vec<(Batch, GatheredReply)>>,
}

impl Gather {
    fn take(&self) -> Vec<(Batch, GatheredReply)> {
        std::mem::take(&mut *self.queue.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Commits `batch` together with whatever else is queued: the caller
    /// queues its write, lets the operations ready at the same moment
    /// queue theirs (one yield to the executor), and then whoever finds
    /// the queue non-empty sends all of it in one call and hands out the
    /// answers. A caller whose write someone else took waits for that
    /// answer.
    ///
    /// `fence`: the epoch of the engine whose writes these are (one
    /// engine, one `Gather`, one epoch), which each batch carries
    /// ([`Store::commit_each_fenced`]).
    async fn commit(&self, store: &dyn Store, fence: Option<u64>, batch: Batch) -> Result<(), CommitError> {
        let (reply, answer) = oneshot::channel();
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).push((batch, reply));
        yield_now().await;
        let work = self.take();
        if !work.is_empty() {
            let (batches, replies): (Vec<Batch>, Vec<GatheredReply>) = work.into_iter().unzip();
            let results = match fence {
                None => store.commit_each(batches).await,
                Some(epoch) => store.commit_each_fenced(batches, epoch).await,
            };
            let mut results = results.into_iter();
            for reply in replies {
                let r = results.next().unwrap_or_else(|| {
                    Err(CommitError::Store(StoreError::Corrupt("commit_each answered too few batches".into())))
                });
                let _ = reply.send(r);
            }
        }
        // Dropped unanswered only if the caller that took it was itself
        // dropped (the service is stopping).
        answer.await.unwrap_or(Err(CommitError::Store(StoreError::Closed)))
    }
}

/// Returns `Pending` once (waking itself at once), so that other futures
/// ready at the same moment run before the caller goes on.
async fn yield_now() {
    let mut yielded = false;
    futures::future::poll_fn(|cx| {
        if yielded {
            Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    })
    .await
}

impl Inner {
    /// Folds a successful install's duration into the running average
    /// (an exponentially weighted one: recent installs count most).
    pub(crate) fn record_install(&self, took: std::time::Duration) {
        let ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX).max(1);
        let _ = self.install_millis.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
            Some(if old == 0 { ms } else { (old.saturating_mul(3) / 4).saturating_add(ms / 4).max(1) })
        });
    }
}

impl Inner {
    /// Commits a batch, fenced with this engine's leadership epoch if it
    /// has one: the one path by which the engine and its reconciler write
    /// batches.
    pub(crate) async fn commit(&self, batch: Batch) -> Result<(), CommitError> {
        match self.fence {
            None => self.store.commit(batch).await,
            Some(epoch) => self.store.commit_fenced(batch, epoch).await,
        }
    }

    /// Writes one node's transition on its own: `Ok(None)` if the node
    /// changed since it was read (someone else got there first) or the
    /// transition no longer applies. The one path by which a single node
    /// is committed (reconciler operations and sweeps); concurrent calls
    /// reach the store together (see [`Gather`]).
    pub(crate) async fn commit_node(
        &self,
        node: &Node,
        cause: Cause,
        actor: Actor,
    ) -> Result<Option<Node>, EngineError> {
        let w = match NodeWrite::transition(node, cause, actor, self.clock.now()) {
            Ok(w) => w,
            Err(e) => {
                debug!(node = %node.hostname, error = %e, "transition no longer applies");
                return Ok(None);
            }
        };
        let after = w.node.clone();
        // Gathered, fenced or not: a fenced engine's go out with its epoch
        // (`Store::commit_each_fenced`).
        let committed =
            self.gather.commit(&*self.store, self.fence, Batch { nodes: vec![w], ..Batch::default() }).await;
        match committed {
            Ok(()) => Ok(Some(after)),
            Err(CommitError::Store(e)) => Err(e.into()),
            Err(e) => {
                debug!(node = %node.hostname, error = %e, "the node changed since it was read");
                Ok(None)
            }
        }
    }
}

/// The Duffy engine. Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct Engine {
    pub(crate) inner: Arc<Inner>,
}

impl fmt::Debug for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine").field("policy", &self.inner.policy).finish_non_exhaustive()
    }
}

/// Builds an [`Engine`].
pub struct EngineBuilder {
    store: Arc<dyn Store>,
    power: Arc<dyn PowerController>,
    installer: Arc<dyn Installer>,
    contextualizer: Option<Arc<dyn Contextualizer>>,
    clock: Arc<dyn Clock>,
    ids: Arc<dyn SessionIds>,
    policy: Policy,
}

impl EngineBuilder {
    /// Sets the policy (default: [`Policy::default`]).
    pub fn policy(mut self, policy: Policy) -> Self {
        self.policy = policy;
        self
    }

    /// Prepares every node for its project before it is handed over
    /// (default: none, and a claim hands the nodes over in one write).
    pub fn contextualizer(mut self, contextualizer: Arc<dyn Contextualizer>) -> Self {
        self.contextualizer = Some(contextualizer);
        self
    }

    /// Sets the session id source (default: [`UuidSessionIds`]).
    pub fn session_ids(mut self, ids: Arc<dyn SessionIds>) -> Self {
        self.ids = ids;
        self
    }

    /// Builds the engine, checking the policy.
    pub fn build(self) -> Result<Engine, EngineError> {
        self.policy.validate().map_err(EngineError::InvalidRequest)?;
        Ok(Engine {
            inner: Arc::new(Inner {
                store: self.store,
                power: self.power,
                installer: self.installer,
                contextualizer: self.contextualizer,
                started_at: self.clock.now(),
                fence: None,
                clock: self.clock,
                ids: self.ids,
                policy: self.policy,
                kick: Arc::default(),
                keys: crate::keys::KeyCache::default(),
                gather: Gather::default(),
                queue: Arc::default(),
                serving: Arc::default(),
                finished: Arc::default(),
                install_millis: Arc::default(),
            }),
        })
    }
}

impl Engine {
    /// Starts building an engine over these backends.
    pub fn builder(
        store: Arc<dyn Store>,
        power: Arc<dyn PowerController>,
        installer: Arc<dyn Installer>,
        clock: Arc<dyn Clock>,
    ) -> EngineBuilder {
        EngineBuilder {
            store,
            power,
            installer,
            contextualizer: None,
            clock,
            ids: Arc::new(UuidSessionIds),
            policy: Policy::default(),
        }
    }

    /// The store every operation of this engine reads and writes; embedders
    /// use it for reads the engine does not wrap (inventory, events).
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    /// The power controller the reconciler and operator calls drive.
    pub fn power(&self) -> &Arc<dyn PowerController> {
        &self.inner.power
    }

    /// The injected clock every lease, expiry and event time comes from.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.inner.clock
    }

    /// The policy in force: leases, quotas, rate limit, pool targets.
    pub fn policy(&self) -> &Policy {
        &self.inner.policy
    }

    /// Asks the reconciler to re-plan now.
    pub fn kick(&self) {
        self.inner.kick.notify();
    }

    /// This engine as the leader of leadership term `epoch` (from
    /// [`Store::new_leader_epoch`]): every batch it and its reconciler
    /// write is fenced with the epoch ([`Store::commit_fenced`]), so once a
    /// newer term has begun they write nothing. For replicas sharing one
    /// store: only the leader runs a reconciler, built from this engine
    /// (`engine.fenced(epoch).reconciler()`), one per term. Its recovery
    /// counts from the start of the term: a Provisioning node that none of
    /// its operations drives is re-driven. Kicks are shared with `self`, so
    /// requests served by this process wake the leader's reconciler.
    pub fn fenced(&self, epoch: u64) -> Engine {
        let i = &self.inner;
        Engine {
            inner: Arc::new(Inner {
                store: i.store.clone(),
                power: i.power.clone(),
                installer: i.installer.clone(),
                contextualizer: i.contextualizer.clone(),
                clock: i.clock.clone(),
                ids: i.ids.clone(),
                policy: i.policy.clone(),
                kick: i.kick.clone(),
                started_at: i.clock.now(),
                fence: Some(epoch),
                keys: crate::keys::KeyCache::default(),
                gather: Gather::default(),
                // Shared with `self`: the requests this process queued are
                // served by the leader's passes when this process leads,
                // and the installs its reconciler sees feed the estimates
                // `self` answers with.
                queue: i.queue.clone(),
                serving: i.serving.clone(),
                finished: i.finished.clone(),
                install_millis: i.install_millis.clone(),
            }),
        }
    }

    /// The leadership epoch this engine's writes carry, if it is fenced
    /// ([`Engine::fenced`]).
    pub fn fence(&self) -> Option<u64> {
        self.inner.fence
    }

    fn now(&self) -> Timestamp {
        self.inner.clock.now()
    }

    fn require_admin(who: &Principal) -> Result<(), EngineError> {
        if who.admin { Ok(()) } else { Err(EngineError::NotAdmin) }
    }

    /// `/Node/get`: claims `count` Ready nodes of the pool for a new session
    /// of `who`, prepares every one for the project, and hands them over —
    /// all or nothing.
    ///
    /// What can be checked before the claim is: a project the
    /// contextualizer cannot serve (no SSH keys, say) is refused with
    /// nothing claimed. If preparing a node fails, the allocation is
    /// aborted and no session is left behind: a node at fault is Failed
    /// with the reason (and the policy's cool-down), every other node goes
    /// back to be reinstalled at once.
    pub async fn get_nodes(&self, who: &Principal, req: &NodeRequest) -> Result<Allocation, EngineError> {
        self.allocate(who, &req.pool(), req.count.unwrap_or(1), self.inner.policy.lease).await
    }

    /// Claims, prepares and hands over `count` nodes of `pool` for a new
    /// session of `who` that expires `lease` after its claim (see
    /// [`Engine::get_nodes`]).
    pub(crate) async fn allocate(
        &self,
        who: &Principal,
        pool: &PoolKey,
        count: u32,
        lease: std::time::Duration,
    ) -> Result<Allocation, EngineError> {
        let key_id = who.key_id.ok_or(EngineError::InvalidKey)?;
        let pool = pool.clone();
        pool.validate().map_err(|e| EngineError::InvalidRequest(e.to_string()))?;
        let max = self.inner.policy.max_count;
        if count == 0 || count > max {
            return Err(EngineError::InvalidRequest(format!("count must be between 1 and {max}, got {count}")));
        }
        let store = &self.inner.store;
        // No read before the claim: the pool's target, the pause flag, the
        // rate limit and the project's quota are all checked in the claim's
        // own transaction, so a get is one durable write. Only a
        // contextualizer needs the project first, to refuse one it cannot
        // serve (no SSH keys, say) before anything is claimed.
        let contextualizer = self.inner.contextualizer.clone();
        let project = match &contextualizer {
            Some(ctx) => {
                let project = store.project(&who.project).await?.unwrap_or(Project {
                    name: who.project.clone(),
                    quota: None,
                    ssh_keys: Vec::new(),
                });
                ctx.check_project(&project)
                    .map_err(|e| EngineError::ProjectUnusable { project: project.name.clone(), reason: e.message })?;
                Some(project)
            }
            None => None,
        };
        let now = self.now();
        // The lease runs from the claim, so that the expiry written on the
        // nodes while they are prepared is the one the session gets.
        let lease_until = now.plus(lease);
        // Nothing to prepare: hand the nodes over in the claim itself, one
        // durable write. Otherwise the claim must be durable before any
        // node is touched (a crash must never return a node that carries a
        // project's keys to the pool).
        let claim = ClaimRequest {
            session: self.inner.ids.next_id(now),
            project: who.project.clone(),
            key_id,
            pool: pool.clone(),
            count,
            check_target: true,
            default_quota: self.inner.policy.default_quota,
            rate_limit: self.inner.policy.rate_limit,
            actor: who.actor(),
            now,
            deliver: contextualizer.is_none().then_some(lease_until),
        };
        let claimed = match store.claim(claim).await? {
            Ok(c) => c,
            Err(ClaimRefusal::NoSuchPool { available }) => {
                return Err(EngineError::NoSuchPool { requested: pool, available });
            }
            Err(ClaimRefusal::OverCapacity { requested, standby }) => {
                return Err(EngineError::InvalidRequest(format!(
                    "count {requested} exceeds the capacity of pool {pool} ({standby} nodes)"
                )));
            }
            Err(ClaimRefusal::InsufficientNodes { requested, available }) => {
                return Err(EngineError::InsufficientNodes { requested, available });
            }
            Err(ClaimRefusal::QuotaExceeded { held, requested, quota }) => {
                return Err(EngineError::QuotaExceeded { held, requested, quota });
            }
            Err(ClaimRefusal::RateLimited { recent, limit }) => {
                return Err(EngineError::RateLimited { recent, window_secs: limit.window.as_secs() });
            }
            Err(ClaimRefusal::Paused) => return Err(EngineError::Paused),
        };
        let sid = claimed.session.id.clone();
        let (Some(ctx), Some(project)) = (contextualizer, project) else {
            info!(session = %sid, project = %who.project, count, pool = %pool, "nodes delivered");
            return Ok(Allocation { session: sid, hosts: claimed.nodes.into_iter().map(|n| n.hostname).collect() });
        };
        debug!(session = %sid, project = %who.project, count, pool = %pool, "claimed nodes");

        // Prepare every node concurrently, each with its own deadline. A
        // node that does not answer in time is the node's fault.
        let inner = &self.inner;
        let context = SessionContext {
            id: sid.clone(),
            project: project.name.clone(),
            hosts: claimed.nodes.iter().map(|n| n.hostname.clone()).collect(),
            expires_at: lease_until,
        };
        let context = &context;
        let results = join_all(claimed.nodes.iter().map(|n| async {
            match timeout(&*inner.clock, inner.policy.prepare_timeout, ctx.prepare_session(n, &project, context)).await
            {
                Ok(r) => r,
                Err(el) => Err(PrepareError::node(format!("preparing the node {el}"))),
            }
        }))
        .await;
        // Only a node at fault is Failed; when the project or Duffy's own
        // side is at fault, every node goes back to be reinstalled at once.
        let mut blamed: HashMap<NodeId, String> = HashMap::new();
        let mut refused: Option<(String, PrepareError)> = None;
        for (n, r) in claimed.nodes.iter().zip(results) {
            match r {
                Ok(()) => {}
                Err(e) if e.blame == Blame::Node => {
                    blamed.insert(n.id, e.message);
                }
                Err(e) => {
                    refused.get_or_insert((n.hostname.clone(), e));
                }
            }
        }

        if blamed.is_empty() && refused.is_none() {
            match self.deliver(&claimed.session, &claimed.nodes, who, lease_until).await {
                Ok(()) => {
                    info!(session = %sid, project = %who.project, count, pool = %pool, "nodes delivered");
                    return Ok(Allocation {
                        session: sid,
                        hosts: claimed.nodes.into_iter().map(|n| n.hostname).collect(),
                    });
                }
                Err(e) => {
                    warn!(session = %sid, error = %e, "could not hand over prepared nodes; aborting the allocation");
                    self.abort_allocation(
                        &sid,
                        &HashMap::new(),
                        "allocation lost a race with an operator",
                        who.actor(),
                    )
                    .await?;
                    return Err(EngineError::PreparationFailed {
                        hostname: claimed.nodes.first().map(|n| n.hostname.clone()).unwrap_or_default(),
                        reason: e.to_string(),
                    });
                }
            }
        }
        // A node at fault is named first: it is what an operator must look
        // at. Otherwise the request itself was at fault, and no node is.
        if let Some((bad_id, reason)) = blamed.iter().min_by_key(|(id, _)| **id).map(|(i, r)| (*i, r.clone())) {
            let hostname =
                claimed.nodes.iter().find(|n| n.id == bad_id).map(|n| n.hostname.clone()).unwrap_or_default();
            warn!(session = %sid, node = %hostname, %reason, "preparing a node failed; aborting the allocation");
            self.abort_allocation(&sid, &blamed, &format!("preparing {hostname} failed"), who.actor()).await?;
            return Err(EngineError::PreparationFailed { hostname, reason });
        }
        let Some((hostname, e)) = refused else {
            return Err(EngineError::Contention(format!("session {sid}: preparation failed without a reason")));
        };
        self.abort_allocation(&sid, &HashMap::new(), &format!("preparation refused: {}", e.message), who.actor())
            .await?;
        if e.blame == Blame::Project {
            warn!(session = %sid, project = %who.project, reason = %e.message,
                "the project cannot be prepared for; allocation aborted, no node blamed");
            Err(EngineError::ProjectUnusable { project: who.project.clone(), reason: e.message })
        } else {
            error!(session = %sid, node = %hostname, reason = %e.message,
                "preparation failed on Duffy's side; allocation aborted, no node blamed");
            Err(EngineError::PreparationFailed { hostname, reason: e.message })
        }
    }

    /// Session Allocating→Prod and its nodes Contextualizing→Deployed, in
    /// one compare-and-set batch.
    async fn deliver(
        &self,
        session: &Session,
        nodes: &[Node],
        who: &Principal,
        lease_until: Timestamp,
    ) -> Result<(), EngineError> {
        let now = self.now();
        let mut batch = Batch::default();
        for n in nodes {
            batch.nodes.push(NodeWrite::transition(n, Cause::Prepared, who.actor(), now)?);
        }
        batch.sessions.push(SessionWrite::transition(session, SessionCause::Delivered { lease_until }, now)?);
        self.inner.commit(batch).await?;
        Ok(())
    }

    /// Aborts a session still in Allocating: nodes in `failures` become
    /// Failed with their reason, the rest go back to be reinstalled, the
    /// session ends Aborted. Safe to call again and from recovery.
    pub(crate) async fn abort_allocation(
        &self,
        sid: &SessionId,
        failures: &HashMap<NodeId, String>,
        reason: &str,
        actor: Actor,
    ) -> Result<(), EngineError> {
        let store = &self.inner.store;
        self.with_retries(
            || format!("aborting session {sid}"),
            || async {
                let Some(session) = store.session(sid).await? else { return Ok(Attempt::Done(())) };
                if session.state != SessionState::Allocating {
                    return Ok(Attempt::Done(()));
                }
                let now = self.now();
                let retry_at = self.inner.policy.failed_retry_after.map(|d| now.plus(d));
                let mut batch = Batch::default();
                for n in self.session_nodes(&session).await? {
                    if n.state != NodeState::Contextualizing || n.session.as_ref() != Some(sid) {
                        continue;
                    }
                    let cause = match failures.get(&n.id) {
                        Some(r) => Cause::PrepareFailed { reason: r.clone(), retry_at },
                        None => Cause::AllocationAborted { reason: reason.to_string() },
                    };
                    batch.nodes.push(NodeWrite::transition(&n, cause, actor.clone(), now)?);
                }
                let cause = SessionCause::Aborted { reason: reason.to_string() };
                batch.sessions.push(SessionWrite::transition(&session, cause, now)?);
                Ok(Attempt::Commit(batch, ()))
            },
        )
        .await?;
        self.kick();
        Ok(())
    }

    /// Runs `attempt` until its batch commits: each attempt reads what it
    /// needs afresh and returns the batch to write (or a final answer), and
    /// a lost compare-and-set race starts a new attempt, at most the
    /// policy's `cas_retries` times. The one place a refused guard becomes
    /// an engine error.
    async fn with_retries<T, F, Fut>(&self, what: impl Fn() -> String, mut attempt: F) -> Result<T, EngineError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<Attempt<T>, EngineError>>,
    {
        for _ in 0..self.inner.policy.cas_retries {
            let (batch, value) = match attempt().await? {
                Attempt::Done(v) => return Ok(v),
                Attempt::Commit(batch, v) => (batch, v),
            };
            match self.inner.commit(batch).await {
                Ok(()) => return Ok(value),
                Err(CommitError::Conflict(c)) => debug!(what = %what(), conflict = %c, "lost a race; retrying"),
                Err(CommitError::GuardFailed { guard: Guard::ProjectFailedNodesAtMost { max, .. }, .. }) => {
                    return Err(EngineError::FailCapExceeded { cap: max });
                }
                Err(CommitError::Store(e)) => return Err(e.into()),
            }
        }
        Err(EngineError::Contention(what()))
    }

    /// Writes one node's transition on its own: `Ok(None)` if the node
    /// changed since it was read or the transition no longer applies (see
    /// `Inner::commit_node`, the one single-node path).
    pub(crate) async fn commit_node(
        &self,
        node: &Node,
        cause: Cause,
        actor: Actor,
    ) -> Result<Option<Node>, EngineError> {
        self.inner.commit_node(node, cause, actor).await
    }

    /// Reads a session that `who` may see: unknown, foreign and
    /// never-delivered sessions all look the same.
    pub(crate) async fn own_session(&self, who: &Principal, sid: &str) -> Result<Session, EngineError> {
        if sid.is_empty() || sid.len() > 128 {
            return Err(EngineError::InvalidSession);
        }
        let key = who.key_id.ok_or(EngineError::InvalidKey)?;
        match self.inner.store.session(&SessionId(sid.to_string())).await? {
            Some(s) if s.key_id == key => Ok(s),
            _ => Err(EngineError::InvalidSession),
        }
    }

    pub(crate) async fn session_nodes(&self, s: &Session) -> Result<Vec<Node>, EngineError> {
        let mut out = Vec::with_capacity(s.nodes.len());
        for id in &s.nodes {
            let n = self
                .inner
                .store
                .node(*id)
                .await?
                .ok_or_else(|| StoreError::Corrupt(format!("session {} names missing node {id}", s.id)))?;
            out.push(n);
        }
        Ok(out)
    }

    /// A job's done or fail, through [`Store::hand_back`]: one atomic step
    /// in a store that overrides it, retried from a fresh read when a
    /// store that reads and commits separately lost a race. Unknown,
    /// foreign and never-delivered sessions all look the same.
    async fn hand_back(&self, who: &Principal, sid: &str, kind: HandBackKind) -> Result<Session, EngineError> {
        if sid.is_empty() || sid.len() > 128 {
            return Err(EngineError::InvalidSession);
        }
        let key_id = who.key_id.ok_or(EngineError::InvalidKey)?;
        let req = HandBack { session: SessionId(sid.to_string()), key_id, kind, actor: who.actor(), now: self.now() };
        for _ in 0..self.inner.policy.cas_retries {
            match self.inner.store.hand_back(HandBack { now: self.now(), ..req.clone() }).await {
                Ok(Ok(s)) => return Ok(s),
                Ok(Err(HandBackRefusal::UnknownSession)) => return Err(EngineError::InvalidSession),
                Ok(Err(HandBackRefusal::NotInProd { state })) => {
                    return Err(EngineError::SessionNotInProd { id: req.session, state: state.as_str() });
                }
                Err(CommitError::Conflict(c)) => debug!(session = %sid, conflict = %c, "lost a race; retrying"),
                Err(CommitError::GuardFailed { guard: Guard::ProjectFailedNodesAtMost { max, .. }, .. }) => {
                    return Err(EngineError::FailCapExceeded { cap: max });
                }
                Err(CommitError::Store(e)) => return Err(e.into()),
            }
        }
        Err(EngineError::Contention(format!("session {sid}")))
    }

    /// `/Node/done`: releases every node of the session (Prod or Fail); they
    /// go back to be reinstalled.
    pub async fn done(&self, who: &Principal, sid: &str) -> Result<(), EngineError> {
        self.release(who, sid).await.map(drop)
    }

    /// [`Engine::done`], answering the session as it now is (ended).
    pub(crate) async fn release(&self, who: &Principal, sid: &str) -> Result<Session, EngineError> {
        let s = self.hand_back(who, sid, HandBackKind::Done).await?;
        info!(session = %s.id, project = %s.project, "session done");
        self.kick();
        Ok(s)
    }

    /// `/Node/fail`: marks every node of the session Failed and holds them
    /// (with the project's SSH keys still on root) for the fail-hold
    /// period, within the project's cap on failed nodes.
    pub async fn fail(&self, who: &Principal, sid: &str) -> Result<(), EngineError> {
        self.fail_and_hold(who, sid).await.map(drop)
    }

    /// [`Engine::fail`], answering the session as it now is (in Fail).
    pub(crate) async fn fail_and_hold(&self, who: &Principal, sid: &str) -> Result<Session, EngineError> {
        let hold_until = self.now().plus(self.inner.policy.fail_hold);
        let kind = HandBackKind::Fail { hold_until, fail_cap: self.inner.policy.fail_cap };
        let s = self.hand_back(who, sid, kind).await?;
        info!(session = %s.id, project = %s.project, %hold_until, "session failed; nodes held");
        Ok(s)
    }

    /// `/Inventory`: every node, by id.
    pub async fn inventory(&self) -> Result<Vec<Node>, EngineError> {
        Ok(self.inner.store.nodes().await?)
    }

    /// `/Inventory?key=`: `(hostname, ssid)` of every node held by a live
    /// delivered session (Prod or Fail) of `who`'s key.
    pub async fn inventory_of(&self, who: &Principal) -> Result<Vec<(String, SessionId)>, EngineError> {
        let Some(key) = who.key_id else { return Ok(Vec::new()) };
        let mut out = Vec::new();
        for s in self.inner.store.live_sessions().await? {
            if s.key_id != key || !matches!(s.state, SessionState::Prod | SessionState::Fail) {
                continue;
            }
            for n in self.session_nodes(&s).await? {
                if n.session.as_ref() == Some(&s.id) {
                    out.push((n.hostname, s.id.clone()));
                }
            }
        }
        Ok(out)
    }

    /// `/Overtime` (admin): delivered sessions past their lease.
    pub async fn overtime(&self, who: &Principal) -> Result<Vec<Overtime>, EngineError> {
        Self::require_admin(who)?;
        let now = self.now();
        let mut out = Vec::new();
        for s in self.inner.store.live_sessions().await? {
            let Some(lease) = s.lease_until else { continue };
            if s.state != SessionState::Prod || lease >= now {
                continue;
            }
            let hosts = self.session_nodes(&s).await?.into_iter().map(|n| n.hostname).collect();
            out.push(Overtime { overdue: now.since(lease), hosts, session: s });
        }
        Ok(out)
    }

    async fn admin_transition(&self, who: &Principal, hostname: &str, cause: Cause) -> Result<Node, EngineError> {
        Self::require_admin(who)?;
        let after = self
            .with_retries(
                || format!("node {hostname}"),
                || async {
                    let n = self
                        .inner
                        .store
                        .node_by_hostname(hostname)
                        .await?
                        .ok_or_else(|| EngineError::UnknownNode(hostname.chars().take(253).collect()))?;
                    let w = NodeWrite::transition(&n, cause.clone(), who.actor(), self.now())?;
                    let after = w.node.clone();
                    Ok(Attempt::Commit(Batch { nodes: vec![w], ..Batch::default() }, after))
                },
            )
            .await?;
        self.kick();
        Ok(after)
    }

    /// `/NodeSetAdmin/<node>` (admin): takes the node out of the pool
    /// (Reserved). Refused while a session holds it.
    pub async fn set_admin(&self, who: &Principal, hostname: &str) -> Result<Node, EngineError> {
        let n = self.admin_transition(who, hostname, Cause::SetAdmin).await?;
        info!(node = %hostname, actor = %who.actor(), "node set to administrative downtime");
        Ok(n)
    }

    /// `/NodeRecover/<node>` (admin): puts a Reserved or Failed node back
    /// (Active, to be reinstalled).
    pub async fn recover(&self, who: &Principal, hostname: &str) -> Result<Node, EngineError> {
        let n = self.admin_transition(who, hostname, Cause::Recovered).await?;
        info!(node = %hostname, actor = %who.actor(), "node recovered");
        Ok(n)
    }

    /// `/PauseService` (admin): no new allocations; the reconciler powers
    /// the warm pool down. Running sessions are untouched. Pausing twice is
    /// harmless.
    pub async fn pause(&self, who: &Principal) -> Result<(), EngineError> {
        Self::require_admin(who)?;
        self.inner.store.set_paused(true).await?;
        info!(actor = %who.actor(), "service paused");
        self.kick();
        Ok(())
    }

    /// `/ResumeService` (admin): allocations resume and the pool is
    /// provisioned again. Only valid while paused.
    pub async fn resume(&self, who: &Principal) -> Result<(), EngineError> {
        Self::require_admin(who)?;
        if !self.inner.store.set_paused(false).await? {
            return Err(EngineError::NotPaused);
        }
        info!(actor = %who.actor(), "service resumed");
        self.kick();
        Ok(())
    }

    /// Sets pools' standby targets (operator configuration).
    pub async fn set_pool_targets(&self, targets: &[PoolTarget]) -> Result<(), EngineError> {
        for t in targets {
            t.pool.validate().map_err(|e| EngineError::InvalidRequest(e.to_string()))?;
            self.inner.store.set_pool_target(t.clone()).await?;
        }
        self.kick();
        Ok(())
    }
}
