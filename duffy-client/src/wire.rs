//! The shapes of `/api/v1`: what the service sends and accepts, defined
//! once for both sides. The service builds its replies from these types
//! and generates its OpenAPI document from them (feature `openapi`); the
//! client reads the same types back.
//!
//! Instants are RFC 3339 text in UTC with milliseconds
//! (`2026-11-29T23:20:00.000Z`), durations are whole seconds, pools are
//! written `release/arch[/flavor]` (`9/x86_64`, `8/aarch64/tiny`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The media type of every error of `/api/v1` (RFC 9457).
pub const PROBLEM_JSON: &str = "application/problem+json";

/// The prefix of every problem `type` (a URN, so that it names the
/// problem without pointing at a server).
pub const PROBLEM_TYPE_PREFIX: &str = "urn:duffy:problem:";

/// What went wrong, as the stable `type` of a problem: clients branch on
/// this, never on the human-readable `title` or `detail`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProblemType {
    /// The request is malformed or out of range; `detail` says what was
    /// wrong and what is allowed. Nothing was changed.
    BadRequest,
    /// No key, or a key that is unknown, revoked or expired.
    Unauthorized,
    /// The key may not do this (an admin call with a user key).
    Forbidden,
    /// No such resource for this key (another key's session looks exactly
    /// like one that does not exist).
    NotFound,
    /// The path exists, the method does not.
    MethodNotAllowed,
    /// Too few Ready nodes now; the problem carries the pool's Ready count
    /// and an estimate of when enough will be Ready. Ask with `wait` to
    /// queue instead.
    Insufficient,
    /// The project's node quota would be exceeded.
    Quota,
    /// The key made too many sessions recently.
    RateLimited,
    /// The wait queue (or the project's share of it) is full; try later.
    QueueFull,
    /// This address sent too many unknown keys; try again later.
    TooManyInvalidKeys,
    /// New allocations are paused by an operator.
    Paused,
    /// No pool matches the request; `detail` lists the pools there are.
    NoSuchPool,
    /// The resource is not in a state that allows the call (releasing a
    /// released session, resuming a running service).
    Conflict,
    /// The project cannot be given nodes as it is (no usable SSH keys);
    /// an operator must fix the project.
    ProjectUnusable,
    /// Preparing the nodes failed; nothing was handed out. Try again.
    PreparationFailed,
    /// The project's cap on failed (held) nodes would be exceeded.
    FailCap,
    /// The service cannot answer now (store unavailable, contention).
    Unavailable,
    /// A failure inside the service; the log has the details.
    Internal,
}

impl ProblemType {
    /// Every problem type, for documentation and tests.
    pub const ALL: [ProblemType; 18] = [
        ProblemType::BadRequest,
        ProblemType::Unauthorized,
        ProblemType::Forbidden,
        ProblemType::NotFound,
        ProblemType::MethodNotAllowed,
        ProblemType::Insufficient,
        ProblemType::Quota,
        ProblemType::RateLimited,
        ProblemType::QueueFull,
        ProblemType::TooManyInvalidKeys,
        ProblemType::Paused,
        ProblemType::NoSuchPool,
        ProblemType::Conflict,
        ProblemType::ProjectUnusable,
        ProblemType::PreparationFailed,
        ProblemType::FailCap,
        ProblemType::Unavailable,
        ProblemType::Internal,
    ];

    /// The short stable name (`insufficient`), the last part of the URN.
    pub fn name(self) -> &'static str {
        match self {
            ProblemType::BadRequest => "bad_request",
            ProblemType::Unauthorized => "unauthorized",
            ProblemType::Forbidden => "forbidden",
            ProblemType::NotFound => "not_found",
            ProblemType::MethodNotAllowed => "method_not_allowed",
            ProblemType::Insufficient => "insufficient",
            ProblemType::Quota => "quota",
            ProblemType::RateLimited => "rate_limited",
            ProblemType::QueueFull => "queue_full",
            ProblemType::TooManyInvalidKeys => "too_many_invalid_keys",
            ProblemType::Paused => "paused",
            ProblemType::NoSuchPool => "no_such_pool",
            ProblemType::Conflict => "conflict",
            ProblemType::ProjectUnusable => "project_unusable",
            ProblemType::PreparationFailed => "preparation_failed",
            ProblemType::FailCap => "fail_cap",
            ProblemType::Unavailable => "unavailable",
            ProblemType::Internal => "internal",
        }
    }

    /// The problem's `type` member: `urn:duffy:problem:NAME`.
    pub fn uri(self) -> String {
        format!("{PROBLEM_TYPE_PREFIX}{}", self.name())
    }

    /// The type a problem's `type` member names, if it is one of ours.
    pub fn from_uri(uri: &str) -> Option<ProblemType> {
        let name = uri.strip_prefix(PROBLEM_TYPE_PREFIX)?;
        ProblemType::ALL.into_iter().find(|t| t.name() == name)
    }

    /// A short human-readable summary, the problem's `title`.
    pub fn title(self) -> &'static str {
        match self {
            ProblemType::BadRequest => "Bad request",
            ProblemType::Unauthorized => "Missing or invalid API key",
            ProblemType::Forbidden => "This call needs an admin key",
            ProblemType::NotFound => "Not found",
            ProblemType::MethodNotAllowed => "Method not allowed",
            ProblemType::Insufficient => "Insufficient nodes in Ready state",
            ProblemType::Quota => "Quota exceeded",
            ProblemType::RateLimited => "Rate limit exceeded",
            ProblemType::QueueFull => "The wait queue is full",
            ProblemType::TooManyInvalidKeys => "Too many invalid keys from this address",
            ProblemType::Paused => "The service is paused",
            ProblemType::NoSuchPool => "No such pool",
            ProblemType::Conflict => "Conflict",
            ProblemType::ProjectUnusable => "The project cannot be given nodes",
            ProblemType::PreparationFailed => "Preparing the nodes failed",
            ProblemType::FailCap => "Too many failed nodes held",
            ProblemType::Unavailable => "Service unavailable",
            ProblemType::Internal => "Internal error",
        }
    }
}

/// An error, as RFC 9457 problem details (`application/problem+json`),
/// with Duffy's extension members where they apply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Problem {
    /// `urn:duffy:problem:NAME`, stable (see [`ProblemType`]).
    #[serde(rename = "type")]
    pub type_uri: String,
    /// A short summary of the problem type.
    pub title: String,
    /// The HTTP status code.
    pub status: u16,
    /// What was wrong with this request, and what is allowed.
    pub detail: String,
    /// `insufficient`: how many nodes were asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested: Option<u32>,
    /// `insufficient`: the pool's Ready nodes now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<u32>,
    /// `insufficient`: roughly how many seconds until enough nodes should
    /// be Ready (from the pool's nodes being installed and how long
    /// installs have taken), when it can be estimated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimated_ready_in_secs: Option<u64>,
    /// `bad_request`: the values allowed, when there is a short list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed: Option<Vec<String>>,
}

impl Problem {
    /// A problem of `kind` with its title and `detail`.
    pub fn new(kind: ProblemType, status: u16, detail: impl Into<String>) -> Problem {
        Problem {
            type_uri: kind.uri(),
            title: kind.title().to_string(),
            status,
            detail: detail.into(),
            requested: None,
            ready: None,
            estimated_ready_in_secs: None,
            allowed: None,
        }
    }

    /// The problem's type, if the server sent one of ours.
    pub fn kind(&self) -> Option<ProblemType> {
        ProblemType::from_uri(&self.type_uri)
    }
}

/// `POST /api/v1/sessions`: which nodes, how many, for how long, and
/// whether to wait for them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateSession {
    /// The pool, `release/arch[/flavor]` (`9/x86_64`); or give `release`,
    /// `arch` and `flavor` separately (not both ways).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// OS release (default `7`, as the legacy API).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<String>,
    /// Architecture (default `x86_64`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
    /// Hardware flavor (default: the architecture's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flavor: Option<String>,
    /// How many nodes (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u32>,
    /// The session's lifetime in seconds (default: the service's lease);
    /// at most the service's maximum lifetime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifetime_secs: Option<u64>,
    /// Queue the request when the pool is short instead of failing with
    /// `insufficient` (default false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait: Option<bool>,
}

/// A session: nodes handed to one key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SessionView {
    /// The session id (the legacy ssid).
    pub id: String,
    /// The key's project.
    pub project: String,
    /// `Allocating`, `Prod` (nodes handed over), `Fail` (held for
    /// debugging), `Done` or `Aborted`.
    pub state: String,
    /// The pool, `release/arch[/flavor]`.
    pub pool: String,
    /// Its nodes' host names.
    pub hosts: Vec<String>,
    /// When it was created.
    pub created_at: String,
    /// When the nodes were handed over.
    pub delivered_at: Option<String>,
    /// The end of the lease asked for at creation (`/Overtime` lists
    /// sessions past it).
    pub lease_until: Option<String>,
    /// When the session expires and its nodes are reclaimed, unless
    /// extended.
    pub expires_at: Option<String>,
    /// The latest instant extensions may reach (none: no maximum).
    pub max_until: Option<String>,
    /// A failed session: when its hold ends.
    pub hold_until: Option<String>,
    /// When it ended.
    pub ended_at: Option<String>,
    /// Why it ended, when it did not end by release.
    pub end_reason: Option<String>,
}

/// `POST /api/v1/sessions` with `wait`, when the pool is short: the
/// request waits in the queue. Poll it with `GET /api/v1/requests/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct QueuedRequest {
    /// The request's id.
    pub id: String,
    /// `waiting`, `served` (see `session`), `failed` (see `reason`: a
    /// refusal waiting cannot cure), `cancelled`, or `dropped` (it waited
    /// the longest allowed, or its client stopped polling).
    pub state: String,
    /// The pool asked for.
    pub pool: String,
    /// Nodes asked for.
    pub count: u32,
    /// Its place among the requests for its pool (1: next).
    pub position: Option<u32>,
    /// Estimated seconds until it is served, when it can be estimated.
    pub estimated_wait_secs: Option<u64>,
    /// When it stops waiting and expires.
    pub wait_until: Option<String>,
    /// The session, once served.
    pub session: Option<SessionView>,
    /// Why it ended without a session.
    pub reason: Option<String>,
}

/// `POST /api/v1/sessions`: a session, or a request waiting in the queue
/// (`202 Accepted`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(untagged)]
pub enum Created {
    /// Nodes handed over (`201 Created`).
    Session(SessionView),
    /// Queued (`202 Accepted`).
    Queued(QueuedRequest),
}

/// `POST /api/v1/sessions/{id}/extend`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ExtendSession {
    /// Seconds to add to the session's expiry (default: the service's
    /// lease). The result is capped by the session's `max_until`; asking
    /// beyond it is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by_secs: Option<u64>,
}

/// A node, as `/api/v1/nodes` shows it. A session id is shown only to the
/// key holding it, and to admin keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NodeView {
    /// The node's id.
    pub id: u64,
    /// Its host name.
    pub hostname: String,
    /// Its IP address.
    pub ip: Option<String>,
    /// Its chassis.
    pub chassis: Option<String>,
    /// The hardware's architecture.
    pub arch: String,
    /// The hardware's flavor.
    pub flavor: Option<String>,
    /// `Active`, `Provisioning`, `Ready`, `Contextualizing`, `Deployed`,
    /// `Failed` or `Reserved`.
    pub state: String,
    /// Since when.
    pub state_since: String,
    /// The installed image's pool, `release/arch[/flavor]`.
    pub pool: Option<String>,
    /// Times it was handed out.
    pub used_count: u64,
    /// The session holding it (yours, or any for an admin key).
    pub session: Option<String>,
    /// When its image was installed.
    pub installed_at: Option<String>,
    /// A held node: when the hold ends.
    pub hold_until: Option<String>,
    /// A failed node: why.
    pub fail_reason: Option<String>,
    /// `unknown`, `on` or `off`.
    pub power: String,
}

/// One entry of a node's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EventView {
    /// Position in the service's event log.
    pub seq: u64,
    /// When.
    pub at: String,
    /// State before.
    pub from: String,
    /// State after.
    pub to: String,
    /// The event's name (`install_succeeded`, `delivered`, `session_expired`, …).
    pub cause: String,
    /// Reasons, images, hold times.
    pub detail: Option<String>,
    /// Who caused it: `reconciler`, `recovery`, `operator` or `key` (the
    /// key's id is shown to admin keys only, as `key:ID`).
    pub actor: String,
    /// The session involved (yours, or any for an admin key).
    pub session: Option<String>,
}

/// `GET /api/v1/nodes/{hostname}`: a node and a page of its history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NodeDetail {
    /// The node.
    pub node: NodeView,
    /// Its events after `after_seq`, oldest first, at most `limit` (ask
    /// again with the last one's `seq` for more).
    pub events: Vec<EventView>,
}

/// A pool: its standby target, its nodes per state, and when Ready nodes
/// are expected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PoolView {
    /// `release/arch[/flavor]`.
    pub pool: String,
    /// OS release.
    pub release: String,
    /// Architecture.
    pub arch: String,
    /// Hardware flavor.
    pub flavor: Option<String>,
    /// Ready nodes the service keeps.
    pub standby: u32,
    /// Nodes carrying or getting this pool's image, per state (every
    /// state named, zeros included).
    pub nodes: BTreeMap<String, u32>,
    /// Ready now.
    pub ready: u32,
    /// Roughly how many seconds until one more node is Ready (0: one is
    /// Ready now; none: none is being installed or could be).
    pub estimated_next_ready_in_secs: Option<u64>,
    /// Nodes asked for by the requests waiting in the queue for this
    /// pool.
    pub waiting: u32,
}

/// A project (admin).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ProjectView {
    /// Its name.
    pub name: String,
    /// Most nodes it may hold at once (none: the service's default).
    pub quota: Option<u32>,
    /// The SSH public keys put on its nodes.
    pub ssh_keys: Vec<String>,
}

/// `PUT /api/v1/projects/{name}` (admin): creates or updates a project;
/// what is absent is unchanged.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SetProject {
    /// New quota.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<u32>,
    /// New SSH public keys (OpenSSH format), replacing the old ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_keys: Option<Vec<String>>,
}

/// An API key's record (admin); never the key or its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct KeyView {
    /// The key's id.
    pub id: u64,
    /// Its project.
    pub project: String,
    /// May call the admin endpoints.
    pub admin: bool,
    /// When it was created.
    pub created_at: String,
    /// When it stops being accepted.
    pub expires_at: Option<String>,
    /// When it was last used (recorded once a minute).
    pub last_used: Option<String>,
    /// When it was revoked.
    pub revoked_at: Option<String>,
}

/// `POST /api/v1/keys` (admin): a new key for a project (created if
/// missing).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    /// The project.
    pub project: String,
    /// May call the admin endpoints (default false).
    #[serde(default)]
    pub admin: bool,
    /// Sets the project's quota.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<u32>,
    /// The key is refused this many seconds after its creation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_after_secs: Option<u64>,
}

/// A new key: shown once, stored only as its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CreatedKey {
    /// The key itself; it cannot be shown again.
    pub key: String,
    /// Its record.
    pub record: KeyView,
}

/// A session past its lease (admin).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct OvertimeView {
    /// The session.
    pub id: String,
    /// Its project.
    pub project: String,
    /// Its nodes.
    pub hosts: Vec<String>,
    /// When they were handed over.
    pub delivered_at: Option<String>,
    /// The end of its lease.
    pub lease_until: Option<String>,
    /// Seconds past the lease.
    pub overdue_secs: u64,
}

/// The service's allocation switch (admin).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ServiceState {
    /// New allocations are refused and the warm pool is powered down.
    pub paused: bool,
}
