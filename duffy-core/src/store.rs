//! The durable state behind the engine, as a trait.
//!
//! Correctness never rests on a lock inside one process: the [`Store`]
//! gives an atomic all-or-nothing claim of N Ready nodes and
//! compare-and-set batches, so two engines on one database (or two
//! threads) can never hand a node to two sessions. The core computes every
//! new row with the pure state machine; the store's job is to write it only
//! if nobody changed the row since it was read.
//!
//! Every backend runs the test kit's conformance suite
//! (`duffy_core::testkit::conformance`).

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::model::{
    Actor, ApiKeyHash, ApiKeyRecord, Hardware, KeyId, NewNode, Node, NodeId, PoolKey, PoolTarget, Project, Session,
    SessionId, SessionState,
};
use crate::policy::RateLimit;
use crate::session::{SessionCause, SessionTransitionError};
use crate::state::{Cause, Event, NodeState, TransitionError};
use crate::time::Timestamp;

/// A store failed to do what was asked, for a reason other than a lost race.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The underlying database or file failed.
    #[error("{context}: {source}")]
    Backend {
        /// What the store was doing.
        context: String,
        /// The backend's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The storage refused the write for a reason an operator fixes and a
    /// caller can be told about (its disk is full, its file system turned
    /// read-only); nothing was written. Retry once it is fixed.
    #[error("{context}: {fault}: {source}")]
    Unavailable {
        /// What the store was doing.
        context: String,
        /// What is wrong with the storage.
        fault: StorageFault,
        /// The backend's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A unique name (hostname, project) already exists.
    #[error("{0} already exists")]
    Duplicate(String),
    /// Something referred to does not exist.
    #[error("{0} does not exist")]
    NotFound(String),
    /// The stored data breaks an invariant or could not be decoded.
    #[error("stored data is inconsistent: {0}")]
    Corrupt(String),
    /// A value was refused before anything was written.
    #[error("invalid input: {0}")]
    Invalid(String),
    /// The store is shut down.
    #[error("the store is closed")]
    Closed,
    /// A fenced write ([`Store::commit_fenced`]) carried a leadership
    /// epoch that is not the newest one the store handed out: its writer
    /// lost leadership (a newer term began), so nothing was written.
    #[error(
        "fenced: the write carries leadership epoch {epoch}, but the store's current epoch is {current}; \
         this process is no longer the leader"
    )]
    Fenced {
        /// The epoch the write carried.
        epoch: u64,
        /// The newest epoch the store handed out.
        current: u64,
    },
}

/// What is wrong with the storage behind [`StoreError::Unavailable`]. Its
/// `Display` is safe to show to any caller: it names the condition, never
/// a path or the database's own words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageFault {
    /// No space left for the database or its journal.
    DiskFull,
    /// The database's file system is mounted read-only.
    ReadOnly,
}

impl std::fmt::Display for StorageFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StorageFault::DiskFull => "database or disk is full",
            StorageFault::ReadOnly => "the database's file system is read-only",
        })
    }
}

impl StoreError {
    /// Wraps a backend error with what the store was doing.
    pub fn backend(context: impl Into<String>, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        StoreError::Backend { context: context.into(), source: Box::new(source) }
    }
}

/// One node row to write, only if the stored row still has
/// `expected_version`; its event goes into the same transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeWrite {
    /// The version the caller read.
    pub expected_version: u64,
    /// The row to write (its `version` is `expected_version + 1`).
    pub node: Node,
    /// The history line for this change.
    pub event: Event,
}

impl NodeWrite {
    /// Applies `cause` to `node` through the state machine and wraps the
    /// result as a write.
    pub fn transition(node: &Node, cause: Cause, actor: Actor, now: Timestamp) -> Result<NodeWrite, TransitionError> {
        let (after, event) = node.apply(cause, actor, now)?;
        Ok(NodeWrite { expected_version: node.version, node: after, event })
    }
}

/// One session row to write: inserted when `expected_version` is `None`,
/// otherwise written only if the stored row still has that version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionWrite {
    /// The version the caller read, or `None` to insert.
    pub expected_version: Option<u64>,
    /// The row to write.
    pub session: Session,
}

impl SessionWrite {
    /// Applies `cause` to `session` through the session state machine and
    /// wraps the result as a compare-and-set write.
    pub fn transition(
        session: &Session,
        cause: SessionCause,
        now: Timestamp,
    ) -> Result<SessionWrite, SessionTransitionError> {
        let (after, event) = session.apply(cause, now)?;
        tracing::debug!(session = %event.session, from = event.from.as_str(), to = event.to.as_str(),
            cause = %event.cause, "session transition");
        Ok(SessionWrite { expected_version: Some(session.version), session: after })
    }
}

/// A condition checked inside the batch's transaction, on the state the
/// batch would leave behind; if it does not hold, nothing is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Guard {
    /// The project's nodes held in Fail (Failed nodes of its sessions in
    /// state Fail) number at most `max`.
    ProjectFailedNodesAtMost {
        /// The project whose Failed-held nodes are counted.
        project: String,
        /// The most it may hold after the batch.
        max: u32,
    },
}

/// An all-or-nothing set of compare-and-set writes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    /// Node rows.
    pub nodes: Vec<NodeWrite>,
    /// Session rows.
    pub sessions: Vec<SessionWrite>,
    /// Conditions on the result.
    pub guards: Vec<Guard>,
}

/// Why a batch was not written.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// A row changed since it was read (or an insert found it existing).
    /// Re-read and decide again.
    #[error("conflict: {0} changed since it was read")]
    Conflict(String),
    /// A guard did not hold on the result.
    #[error("guard failed: {guard:?} (would be {actual})")]
    GuardFailed {
        /// The guard that would not hold.
        guard: Guard,
        /// The value the batch would have produced.
        actual: u64,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A request to claim `count` Ready nodes of `pool` for a new session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimRequest {
    /// The new session's id.
    pub session: SessionId,
    /// The requesting key's project.
    pub project: String,
    /// The requesting key.
    pub key_id: KeyId,
    /// Which pool.
    pub pool: PoolKey,
    /// How many nodes (at least 1).
    pub count: u32,
    /// Whether the pool must have a standby target above zero of at least
    /// `count` nodes (the engine asks: a pool nobody configured does not
    /// exist for a job, and a request larger than its pool can never be
    /// served). Checked first, in the claim's own transaction; refused
    /// with [`ClaimRefusal::NoSuchPool`] or [`ClaimRefusal::OverCapacity`].
    pub check_target: bool,
    /// The quota for a project that has none of its own (the policy's
    /// default). The store reads the project's own quota in the claim's
    /// transaction: most nodes the project's live sessions may hold, this
    /// claim included, is the project's quota if it has one, else this.
    pub default_quota: Option<u32>,
    /// Most sessions the key may have created in the window, this one
    /// included.
    pub rate_limit: Option<RateLimit>,
    /// Recorded in the events.
    pub actor: Actor,
    /// The time of the claim.
    pub now: Timestamp,
    /// `Some(lease end)`: hand the nodes over in the claim itself (nodes
    /// Ready → Deployed, session Prod, its lease and expiry at this
    /// instant), for installers with nothing to prepare; `None`: nodes to
    /// Contextualizing, session Allocating.
    pub deliver: Option<Timestamp>,
}

/// A successful claim: the new session (state Allocating) and its nodes
/// (state Contextualizing, `used_count` bumped).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimed {
    /// The session as stored.
    pub session: Session,
    /// Its nodes as stored, in claim order.
    pub nodes: Vec<Node>,
}

/// Why a claim was refused. Nothing was written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClaimRefusal {
    /// No pool with a standby target above zero matches (only with
    /// [`ClaimRequest::check_target`]).
    NoSuchPool {
        /// The pools that have one, ordered by pool.
        available: Vec<PoolKey>,
    },
    /// More nodes than the pool's standby target (only with
    /// [`ClaimRequest::check_target`]).
    OverCapacity {
        /// Asked for.
        requested: u32,
        /// The pool's standby target.
        standby: u32,
    },
    /// The pool has fewer Ready nodes than asked for.
    InsufficientNodes {
        /// Nodes the request asked for.
        requested: u32,
        /// Ready now.
        available: u32,
    },
    /// The claim would take the project over its quota.
    QuotaExceeded {
        /// Nodes its live sessions hold now.
        held: u32,
        /// Nodes the request asked for.
        requested: u32,
        /// The project's quota.
        quota: u32,
    },
    /// The service is paused: no new allocations. Checked in the claim's
    /// own transaction, so no claim is made after a pause was
    /// acknowledged.
    Paused,
    /// The key created too many sessions recently.
    RateLimited {
        /// Sessions it created in the window.
        recent: u32,
        /// The key's limit: sessions per window.
        limit: RateLimit,
    },
}

/// Which events to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EventQuery {
    /// Only this node's history.
    pub node: Option<NodeId>,
    /// Only events with `seq` greater than this.
    pub after_seq: u64,
    /// At most this many (0: no limit).
    pub limit: usize,
}

/// The session and node writes of a claim, computed from the chosen nodes.
///
/// Backends call this so that every store writes exactly the same rows:
/// the core decides what a claim means, the store only picks the nodes
/// (Ready, in the pool, least `used_count` first, then lowest id) and
/// makes the whole thing atomic.
pub fn claim_writes(req: &ClaimRequest, chosen: &[Node]) -> Result<(Session, Vec<NodeWrite>), TransitionError> {
    let cause = || match req.deliver {
        Some(_) => Cause::Delivered { session: req.session.clone() },
        None => Cause::Allocated { session: req.session.clone() },
    };
    let writes = chosen
        .iter()
        .map(|n| NodeWrite::transition(n, cause(), req.actor.clone(), req.now))
        .collect::<Result<Vec<_>, _>>()?;
    let session = Session {
        id: req.session.clone(),
        project: req.project.clone(),
        key_id: req.key_id,
        state: if req.deliver.is_some() { SessionState::Prod } else { SessionState::Allocating },
        pool: req.pool.clone(),
        nodes: chosen.iter().map(|n| n.id).collect(),
        created_at: req.now,
        delivered_at: req.deliver.map(|_| req.now),
        lease_until: req.deliver,
        expires_at: req.deliver,
        hold_until: None,
        ended_at: None,
        end_reason: None,
        version: 1,
    };
    Ok((session, writes))
}

/// How a job hands a delivered session back (see [`Store::hand_back`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandBackKind {
    /// `/Node/done`: a session in Prod or Fail ends (Done) and its nodes
    /// go back to be reinstalled.
    Done,
    /// `/Node/fail`: a session in Prod goes to Fail and its nodes are
    /// Failed and held until `hold_until`, if the project's Failed nodes
    /// held in Fail then number at most `fail_cap`.
    Fail {
        /// End of the hold.
        hold_until: Timestamp,
        /// The project's cap on failed nodes (`None`: no cap).
        fail_cap: Option<u32>,
    },
}

/// A job's `/Node/done` or `/Node/fail` of one session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandBack {
    /// The session.
    pub session: SessionId,
    /// The calling key: another key's session is answered as unknown.
    pub key_id: KeyId,
    /// Done or fail.
    pub kind: HandBackKind,
    /// Recorded in the events.
    pub actor: Actor,
    /// The time of the call.
    pub now: Timestamp,
}

/// Why a hand-back was refused. Nothing was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandBackRefusal {
    /// No such session, or another key's (a stranger learns nothing).
    UnknownSession,
    /// The session is not in a state the call accepts (Prod, or Prod or
    /// Fail for done).
    NotInProd {
        /// Its state.
        state: SessionState,
    },
}

/// Whether `session` refuses the hand-back before its nodes matter: it is
/// another key's (or not the one asked for), or in a state the call does
/// not accept.
fn hand_back_refusal(req: &HandBack, session: &Session) -> Option<HandBackRefusal> {
    if session.id != req.session || session.key_id != req.key_id {
        return Some(HandBackRefusal::UnknownSession);
    }
    let accepted = match req.kind {
        HandBackKind::Done => matches!(session.state, SessionState::Prod | SessionState::Fail),
        HandBackKind::Fail { .. } => session.state == SessionState::Prod,
    };
    (!accepted).then_some(HandBackRefusal::NotInProd { state: session.state })
}

/// The batch a hand-back writes, computed from the session and its nodes
/// as stored, and the session as it will be stored.
///
/// Backends call this so that every store writes exactly the same rows
/// (as with [`claim_writes`]): every node the session lists and that is
/// still held by it takes the transition (`Released`, or `FailedByUser`
/// with the hold), the session takes its own, and a fail carries the
/// project's fail cap as a [`Guard`]. `nodes` are the session's nodes as
/// read (in any order). A node held by the session that refuses its
/// transition moved since the session was read (another call on the
/// same session won a race): that is [`CommitError::Conflict`], read
/// both again.
pub fn hand_back_writes(
    req: &HandBack,
    session: &Session,
    nodes: &[Node],
) -> Result<Result<(Batch, Session), HandBackRefusal>, CommitError> {
    if let Some(refusal) = hand_back_refusal(req, session) {
        return Ok(Err(refusal));
    }
    let (cause, session_cause) = match req.kind {
        HandBackKind::Done => (Cause::Released, SessionCause::Released),
        HandBackKind::Fail { hold_until, .. } => {
            (Cause::FailedByUser { hold_until }, SessionCause::FailedByUser { hold_until })
        }
    };
    let mut batch = Batch::default();
    for id in &session.nodes {
        let Some(n) = nodes.iter().find(|n| n.id == *id) else {
            return Err(CommitError::Store(StoreError::Corrupt(format!(
                "session {} names node {id}, which was not read",
                session.id
            ))));
        };
        if n.session.as_ref() != Some(&session.id) {
            continue;
        }
        match NodeWrite::transition(n, cause.clone(), req.actor.clone(), req.now) {
            Ok(w) => batch.nodes.push(w),
            Err(e) => {
                return Err(CommitError::Conflict(format!("node {} moved under session {} ({e})", n.id, session.id)));
            }
        }
    }
    let w = SessionWrite::transition(session, session_cause, req.now)
        .map_err(|e| CommitError::Store(StoreError::Invalid(e.to_string())))?;
    let after = w.session.clone();
    batch.sessions.push(w);
    if let HandBackKind::Fail { fail_cap: Some(max), .. } = req.kind {
        batch.guards.push(Guard::ProjectFailedNodesAtMost { project: session.project.clone(), max });
    }
    Ok(Ok((batch, after)))
}

/// What [`Store::node_counts`] groups nodes by. Ordered by image (nodes
/// without one first), kind of machine, chassis, then state.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeGroup {
    /// The image installed or being installed (`None` for idle, failed or
    /// reserved machines that carry none).
    pub image: Option<PoolKey>,
    /// The kind of machine.
    pub hardware: Hardware,
    /// The chassis the machines sit in, if recorded.
    pub chassis: Option<String>,
    /// Their state.
    pub state: NodeState,
}

impl NodeGroup {
    /// The group `node` counts in.
    pub fn of(node: &Node) -> NodeGroup {
        NodeGroup {
            image: node.image.clone(),
            hardware: Hardware::of(node),
            chassis: node.chassis.clone(),
            state: node.state,
        }
    }
}

/// One row of [`Store::node_counts`]: a group and how many nodes are in it
/// (never zero).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeCount {
    /// Which nodes.
    pub group: NodeGroup,
    /// How many.
    pub count: u32,
}

/// How a store is doing, as far as it knows without any I/O: for health
/// checks and for a service deciding whether to stop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreHealth {
    /// Reads and writes work as far as the store knows.
    Ok,
    /// Reads work but the last write failed (a full disk, a read-only file
    /// system); writes resume once the cause is fixed. The text is shown to
    /// anyone who asks (`/healthz`): it names the condition, never a path
    /// or the database's own words.
    Degraded(String),
    /// The store refuses everything until it is reopened (after a failed
    /// fsync nothing unsynced can be trusted); a service should stop, and
    /// its supervisor restart it.
    Failed(String),
}

/// The durable state of a farm.
///
/// All methods are atomic. Reads return committed state. Implementations
/// must be `Send + Sync` and usable from many tasks at once.
#[cfg_attr(feature = "mock", mockall::automock)]
#[async_trait]
pub trait Store: Send + Sync {
    /// Adds nodes (state Active, or Reserved if asked), all or nothing,
    /// each with an `Added` event. A duplicate hostname is
    /// [`StoreError::Duplicate`] and adds none.
    async fn add_nodes(&self, nodes: Vec<NewNode>, actor: Actor, now: Timestamp) -> Result<Vec<Node>, StoreError>;

    /// One node by id.
    async fn node(&self, id: NodeId) -> Result<Option<Node>, StoreError>;

    /// One node by exact hostname.
    async fn node_by_hostname(&self, hostname: &str) -> Result<Option<Node>, StoreError>;

    /// Every node, ordered by id.
    async fn nodes(&self) -> Result<Vec<Node>, StoreError>;

    /// Ready nodes per pool (for sizing decisions without reading every
    /// row): `(pool, count)` ordered by pool.
    ///
    /// The default reads every node with [`Store::nodes`] and counts;
    /// backends should override it with an indexed count, since the
    /// reconciler calls it on every pass.
    async fn ready_counts(&self) -> Result<Vec<(PoolKey, u32)>, StoreError> {
        let mut counts: std::collections::BTreeMap<PoolKey, u32> = std::collections::BTreeMap::new();
        for n in self.nodes().await? {
            if let (NodeState::Ready, Some(image)) = (n.state, n.image) {
                *counts.entry(image).or_default() += 1;
            }
        }
        Ok(counts.into_iter().collect())
    }

    /// The nodes in any of `states`, ordered by id.
    ///
    /// The default reads every node with [`Store::nodes`] and filters;
    /// backends should override it with an indexed read, since the
    /// reconciler calls it on every pass.
    async fn nodes_in_states(&self, states: &[NodeState]) -> Result<Vec<Node>, StoreError> {
        let mut nodes = self.nodes().await?;
        nodes.retain(|n| states.contains(&n.state));
        Ok(nodes)
    }

    /// Ready nodes installed at or before `installed_before` (nodes with no
    /// install time are left out), oldest install first, then lowest id;
    /// at most `limit` of them.
    ///
    /// The default reads every node with [`Store::nodes`]; backends should
    /// override it with an indexed read.
    async fn stale_ready(&self, installed_before: Timestamp, limit: usize) -> Result<Vec<Node>, StoreError> {
        let mut nodes = self.nodes().await?;
        nodes.retain(|n| n.state == NodeState::Ready && n.installed_at.is_some_and(|t| t <= installed_before));
        nodes.sort_by_key(|n| (n.installed_at, n.id));
        nodes.truncate(limit);
        Ok(nodes)
    }

    /// Idle machines of one kind: Active nodes of `hardware`, least
    /// `used_count` first, then lowest id (the order the planner picks
    /// them in); at most `limit` of them. The reconciler reads them per
    /// kind of machine that a pool in deficit can use, so that every such
    /// pool sees its own candidates however many idle machines of other
    /// kinds there are.
    ///
    /// The default reads every node with [`Store::nodes`]; backends should
    /// override it with an indexed read.
    async fn idle_nodes(&self, hardware: &Hardware, limit: usize) -> Result<Vec<Node>, StoreError> {
        let mut nodes = self.nodes().await?;
        nodes.retain(|n| n.state == NodeState::Active && Hardware::of(n) == *hardware);
        nodes.sort_by_key(|n| (n.used_count, n.id));
        nodes.truncate(limit);
        Ok(nodes)
    }

    /// A page of nodes: those with an id greater than `after`, ordered by
    /// id, at most `limit` of them (`NodeId(0)` starts at the beginning).
    ///
    /// The default reads every node with [`Store::nodes`]; backends should
    /// override it with a range read.
    async fn nodes_after(&self, after: NodeId, limit: usize) -> Result<Vec<Node>, StoreError> {
        let mut nodes = self.nodes().await?;
        nodes.retain(|n| n.id > after);
        nodes.truncate(limit);
        Ok(nodes)
    }

    /// The newest events, newest first: `node`'s history, or the whole
    /// log's, at most `limit` of them. For a node's timeline and the
    /// dashboard's charts, which want the recent end of a log that only
    /// grows.
    ///
    /// The default reads the whole log (or the node's history) with
    /// [`Store::events`]; backends should override it with a descending
    /// indexed read.
    async fn latest_events(&self, node: Option<NodeId>, limit: usize) -> Result<Vec<Event>, StoreError> {
        let mut events = self.events(EventQuery { node, ..EventQuery::default() }).await?;
        events.reverse();
        events.truncate(limit);
        Ok(events)
    }

    /// How many nodes there are of each state, image, kind of machine and
    /// chassis, ordered by those fields: the whole farm in a few rows, for
    /// a map of 100,000 machines that must not read every row into memory.
    ///
    /// The default reads every node with [`Store::nodes`] and counts;
    /// backends should override it with a grouped count.
    async fn node_counts(&self) -> Result<Vec<NodeCount>, StoreError> {
        let mut counts: std::collections::BTreeMap<NodeGroup, u32> = std::collections::BTreeMap::new();
        for n in self.nodes().await? {
            *counts.entry(NodeGroup::of(&n)).or_default() += 1;
        }
        Ok(counts.into_iter().map(|(group, count)| NodeCount { group, count }).collect())
    }

    /// One session by id (any state).
    async fn session(&self, id: &SessionId) -> Result<Option<Session>, StoreError>;

    /// Sessions in Allocating, Prod or Fail, ordered by creation time then
    /// id.
    async fn live_sessions(&self) -> Result<Vec<Session>, StoreError>;

    /// Sessions in Prod whose expiry (`Session::expires_at`) is at or
    /// before `now`, earliest expiry first, then id; at most `limit` of
    /// them. The reconciler reclaims them. Sessions in Fail are never
    /// listed: they keep their hold.
    ///
    /// The default reads every live session with [`Store::live_sessions`];
    /// backends should override it with an indexed read, since the
    /// reconciler calls it on every pass. (Added with session expiry,
    /// schema version 6 of the SQLite store: a backend keeps sessions'
    /// `expires_at` and may index Prod sessions by it.)
    async fn expired_sessions(&self, now: Timestamp, limit: usize) -> Result<Vec<Session>, StoreError> {
        let mut sessions = self.live_sessions().await?;
        sessions.retain(|s| s.is_expired_at(now));
        sessions.sort_by(|a, b| (a.expires_at, &a.id).cmp(&(b.expires_at, &b.id)));
        sessions.truncate(limit);
        Ok(sessions)
    }

    /// Atomically: checks, in this order, the pool's standby target (if
    /// [`ClaimRequest::check_target`]), that the service is not paused,
    /// the key's rate limit and the project's quota (its own, else
    /// [`ClaimRequest::default_quota`]), then
    /// picks `count` Ready nodes of the pool (least `used_count` first,
    /// then lowest id), moves them to Contextualizing and inserts the
    /// session, with the writes [`claim_writes`] computes. Either all of it
    /// happens or nothing does. (Every admission check is made here, in
    /// the claim's own transaction, so that a `/Node/get` needs no read
    /// before its one durable write.)
    async fn claim(&self, req: ClaimRequest) -> Result<Result<Claimed, ClaimRefusal>, StoreError>;

    /// Writes a batch if every expected version still matches and every
    /// guard holds on the result; otherwise writes nothing.
    async fn commit(&self, batch: Batch) -> Result<(), CommitError>;

    /// Writes each batch on its own, exactly as [`Store::commit`] would
    /// (each all-or-nothing, independent of the others), and answers for
    /// each in order. For the reconciler, whose operations write many
    /// single-node batches at once: a backend that overrides it takes them
    /// in one call, one message to its writer and one durable write, not
    /// one each. The default commits them one by one (concurrently).
    async fn commit_each(&self, batches: Vec<Batch>) -> Vec<Result<(), CommitError>> {
        futures::future::join_all(batches.into_iter().map(|b| self.commit(b))).await
    }

    /// A job's done or fail: reads the session and its nodes and writes
    /// what [`hand_back_writes`] makes of them (a fail cap that would be
    /// exceeded is [`CommitError::GuardFailed`]); returns the session as
    /// written. Nothing is written on a refusal or an error.
    ///
    /// The default reads through [`Store::session`] and [`Store::node`] and
    /// writes with [`Store::commit`]: a row that changed in between is
    /// [`CommitError::Conflict`], and the caller calls again. Backends that
    /// can read and write in one transaction should override it, so that
    /// the call is one atomic step with no read before it (the SQLite store
    /// runs it on its writer thread).
    async fn hand_back(&self, req: HandBack) -> Result<Result<Session, HandBackRefusal>, CommitError> {
        let Some(session) = self.session(&req.session).await? else {
            return Ok(Err(HandBackRefusal::UnknownSession));
        };
        if let Some(refusal) = hand_back_refusal(&req, &session) {
            return Ok(Err(refusal));
        }
        let mut nodes = Vec::with_capacity(session.nodes.len());
        for id in &session.nodes {
            let n = self
                .node(*id)
                .await?
                .ok_or_else(|| StoreError::Corrupt(format!("session {} names missing node {id}", session.id)))?;
            nodes.push(n);
        }
        let (batch, after) = match hand_back_writes(&req, &session, &nodes)? {
            Ok(x) => x,
            Err(refusal) => return Ok(Err(refusal)),
        };
        self.commit(batch).await?;
        Ok(Ok(after))
    }

    /// Reads the event log, in `seq` order.
    async fn events(&self, query: EventQuery) -> Result<Vec<Event>, StoreError>;

    /// Creates a project or replaces its quota and SSH keys.
    async fn upsert_project(&self, project: Project) -> Result<(), StoreError>;

    /// One project by name.
    async fn project(&self, name: &str) -> Result<Option<Project>, StoreError>;

    /// Every project, by name. (A farm has tens or hundreds: not paged.)
    async fn projects(&self) -> Result<Vec<Project>, StoreError>;

    /// Stores a new API key (only its hash) for an existing project,
    /// created at `now`, refused from `expires_at` on (`None`: never
    /// expires).
    async fn add_api_key(
        &self,
        project: &str,
        hash: ApiKeyHash,
        admin: bool,
        now: Timestamp,
        expires_at: Option<Timestamp>,
    ) -> Result<ApiKeyRecord, StoreError>;

    /// The key with this hash, if any, revoked and expired ones included
    /// (the engine decides what a key may do).
    async fn api_key_by_hash(&self, hash: &ApiKeyHash) -> Result<Option<ApiKeyRecord>, StoreError>;

    /// Every key, or only `project`'s, ordered by id; revoked and expired
    /// ones included. (Both lifetimes are named, in this order, for
    /// mockall's `automock`, which cannot elide one inside an `Option`;
    /// `async_trait` expands this exactly as the elided form, so
    /// implementations write `async fn api_keys(&self, project:
    /// Option<&str>)`.)
    async fn api_keys<'s, 'p>(&'s self, project: Option<&'p str>) -> Result<Vec<ApiKeyRecord>, StoreError>;

    /// Revokes a key at `now` and returns it as stored. The row stays (its
    /// sessions still name it); revoking a revoked key changes nothing and
    /// returns it with its first revocation time. An unknown id is
    /// [`StoreError::NotFound`].
    async fn revoke_api_key(&self, id: KeyId, now: Timestamp) -> Result<ApiKeyRecord, StoreError>;

    /// Records when keys were last used, in one write: each key's
    /// `last_used` becomes the later of the stored time and the given one
    /// (never earlier). Unknown ids are skipped.
    async fn record_key_use(&self, used: Vec<(KeyId, Timestamp)>) -> Result<(), StoreError>;

    /// Sets a pool's standby target (creating the pool).
    async fn set_pool_target(&self, target: PoolTarget) -> Result<(), StoreError>;

    /// Every pool's target, ordered by pool.
    async fn pool_targets(&self) -> Result<Vec<PoolTarget>, StoreError>;

    /// Whether the service is paused.
    async fn paused(&self) -> Result<bool, StoreError>;

    /// Sets the paused flag and returns what it was, atomically.
    async fn set_paused(&self, paused: bool) -> Result<bool, StoreError>;

    // ----- several processes on one store -----
    //
    // A store that several service processes share (replicas) needs three
    // more things, each with a default that is right for a store only one
    // process uses. Fencing: exactly one reconciler may write; a leader
    // starts a term with `new_leader_epoch` and writes with
    // `commit_fenced`, so a leader that lost its term (frozen, cut off)
    // writes nothing when it comes back. Allocations: only the store knows
    // which process made an allocation still in progress and whether that
    // process is alive (`abandoned_allocations`). Key changes made by
    // another process: `key_generation`.

    /// Starts a new leadership term: atomically moves the store's epoch
    /// forward and returns it. From then on every [`Store::commit_fenced`]
    /// with an older epoch is refused, in the same atomic step as the write
    /// it would have made, so a former leader writes nothing.
    ///
    /// The default refuses: a store that cannot fence cannot host an
    /// elected reconciler.
    async fn new_leader_epoch(&self) -> Result<u64, StoreError> {
        Err(StoreError::Invalid("this store does not support leader election: it cannot fence writes".into()))
    }

    /// [`Store::commit`], for a reconciler that runs as the leader of term
    /// `epoch`: written only if `epoch` is the newest epoch
    /// [`Store::new_leader_epoch`] handed out, checked atomically with the
    /// write; otherwise nothing is written and the answer is
    /// `CommitError::Store(StoreError::Fenced { .. })`. API writes are never
    /// fenced (any process may serve a request).
    ///
    /// The default refuses every fenced batch.
    async fn commit_fenced(&self, batch: Batch, epoch: u64) -> Result<(), CommitError> {
        let _ = (batch, epoch);
        Err(CommitError::Store(StoreError::Invalid("this store does not support fenced writes".into())))
    }

    /// [`Store::commit_each`] for a reconciler that runs as the leader of
    /// term `epoch`: each batch written on its own exactly as
    /// [`Store::commit_fenced`] would write it, answered in order. A
    /// backend that overrides it takes a wave of the leader's single-node
    /// writes in one transaction instead of one each.
    ///
    /// The default commits them one by one (concurrently) with
    /// [`Store::commit_fenced`].
    async fn commit_each_fenced(&self, batches: Vec<Batch>, epoch: u64) -> Vec<Result<(), CommitError>> {
        futures::future::join_all(batches.into_iter().map(|b| self.commit_fenced(b, epoch))).await
    }

    /// The live sessions still Allocating whose creating process is known
    /// to have stopped (crashed, killed, or cut off from the store): their
    /// preparation will never finish, so the reconciler aborts them at once.
    /// Sessions of a process that is alive are not listed, whenever they
    /// were made: they are left to their request (or to the staleness
    /// deadline).
    ///
    /// `Ok(None)`, the default: the store does not know who made a session.
    /// Such a store is used by one process at a time (SQLite, memory), and
    /// the reconciler treats every allocation older than its engine as
    /// interrupted by a restart.
    async fn abandoned_allocations(&self) -> Result<Option<Vec<SessionId>>, StoreError> {
        Ok(None)
    }

    /// A number that changes whenever API keys may have been changed by
    /// another process sharing this store (a key created or revoked through
    /// another replica, or the command line), or whenever the store cannot
    /// be sure it has heard of every such change. The engine forgets every
    /// key it remembers when it sees the number change, so such a change is
    /// honoured by the very next request. Cheap (no I/O): it is read on
    /// every authentication.
    ///
    /// The default never changes: key changes reach the engine through the
    /// engine itself (one process per store).
    fn key_generation(&self) -> u64 {
        0
    }

    /// Where the PXE installer keeps its pending installs, so that a
    /// machine's callbacks reach any process sharing this store (see
    /// [`crate::tickets`]). `None`, the default: this store cannot keep
    /// them, and a PXE installer cannot run on it. All three of the
    /// project's stores keep them.
    fn install_tickets(self: std::sync::Arc<Self>) -> Option<std::sync::Arc<dyn crate::tickets::InstallTickets>> {
        None
    }

    /// How the store is doing, without any I/O (cheap enough for every
    /// health check). The default, for stores that cannot tell, is
    /// [`StoreHealth::Ok`].
    fn health(&self) -> StoreHealth {
        StoreHealth::Ok
    }
}
