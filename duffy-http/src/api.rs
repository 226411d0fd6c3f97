//! The HTTP API: the legacy endpoints `cico` and job scripts call, the
//! admin endpoints, `/metrics`, `/healthz`, and the `/Install/*` endpoints
//! machines being installed by PXE call.
//!
//! This is the only module that knows the legacy wire shapes (see
//! `shared/spec/legacy-api.md`): clients ignore status codes and judge a
//! reply by the shape of its body, so every reply here is built to that
//! contract. Every known parameter is validated before anything is read or
//! written; a rejected request changes nothing. The legacy endpoints ignore
//! parameters they do not know, as the legacy server did (counted in
//! `duffy_ignored_parameters_total`); `/Install/*` refuses them.
//!
//! Replies never carry a store's own error text (SQL, paths): callers are
//! told "store unavailable", the log gets the details. The install
//! endpoints pass the caller's address to the [`PxeRegistry`], which serves
//! only the node's own address (see `duffy_installers::pxe`).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Path, RawQuery, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use duffy_core::{Arch, Engine, EngineError, Node, NodeRequest, Principal, StoreError, StoreHealth, validate_token};
use duffy_installers::pxe::LOCAL_BOOT_SCRIPT;
use duffy_installers::{PxeError, PxeRegistry};
use serde_json::{Value, json};
use tracing::{debug, error, warn};

use crate::auth_guard::{AuthGuard, AuthRefusal, authenticate};
use crate::metrics::Metrics;

/// Shared state of the handlers.
#[derive(Clone)]
pub struct AppState {
    /// The engine.
    pub engine: Engine,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// The PXE installer's pending installs, when it is the configured
    /// installer: machines fetch their boot script and kickstart here.
    pub pxe: Option<Arc<PxeRegistry>>,
    /// Per-address budgets of failed API key lookups.
    pub auth_guard: Arc<AuthGuard>,
}

/// A reply: a status and a body in one of the contract's shapes.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// A JSON value, sent as `application/json` followed by a newline.
    Json(StatusCode, Value),
    /// Plain text, sent as is.
    Text(StatusCode, String),
    /// JSON already serialized (large replies, streamed from the rows
    /// without building a value tree), sent with a trailing newline.
    JsonBytes(StatusCode, Vec<u8>),
}

impl Reply {
    /// A JSON string: how a human-readable error reaches `cico`'s output.
    pub fn message(status: StatusCode, msg: impl Into<String>) -> Reply {
        Reply::Json(status, Value::String(msg.into()))
    }

    /// `{"msg": ...}`, the legacy error object.
    pub fn msg(status: StatusCode, msg: &str) -> Reply {
        Reply::Json(status, json!({ "msg": msg }))
    }

    fn status(&self) -> StatusCode {
        match self {
            Reply::Json(s, _) | Reply::Text(s, _) | Reply::JsonBytes(s, _) => *s,
        }
    }
}

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        let (status, ctype, body) = match self {
            Reply::Json(s, v) => {
                let mut b = serde_json::to_vec(&v).unwrap_or_else(|_| b"null".to_vec());
                b.push(b'\n');
                (s, "application/json", b)
            }
            Reply::Text(s, t) => (s, "text/plain; charset=utf-8", t.into_bytes()),
            Reply::JsonBytes(s, mut b) => {
                b.push(b'\n');
                (s, "application/json", b)
            }
        };
        let mut r = Response::new(Body::from(body));
        *r.status_mut() = status;
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
        r
    }
}

const INVALID_KEY: &str = "Invalid duffy key";
/// The answer, with 429, when a client's address is over its budget of
/// failed key lookups (see `auth_guard`): in the shape of the endpoint's
/// invalid-key answer, except on `/Inventory`, where that shape (`[]`)
/// would tell a job it holds nothing, so it is a JSON string.
const LOOKUPS_LIMITED: &str = "Too many invalid duffy keys from your address; try again in a minute";
const INVALID_SESSION: &str = "Invalid session ID";

/// A query parameter an endpoint knows, with the longest value (decoded,
/// in bytes) it accepts.
#[derive(Debug, Clone, Copy)]
struct Param {
    name: &'static str,
    max: usize,
}

/// The usual limit on a parameter's value.
const MAX_VALUE: usize = 256;

const fn param(name: &'static str) -> Param {
    Param { name, max: MAX_VALUE }
}

/// The whole raw query string of a legacy endpoint is at most this long:
/// enough for every known parameter and a few cache-busters.
const MAX_LEGACY_QUERY: usize = 4096;

/// What an endpoint does with a parameter it does not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unknown {
    /// Ignore it, counted in `duffy_ignored_parameters_total`: the legacy
    /// server did, and job scripts in the wild add cache-busters and extra
    /// fields.
    Ignore,
    /// Refuse the request (400): the install endpoints have no legacy
    /// callers, and a machine's first-boot script sends exactly what its
    /// kickstart says.
    Refuse,
}

/// An endpoint's query: the label its metrics carry, the parameters it
/// knows, and what it does with others.
#[derive(Debug)]
struct Spec {
    endpoint: &'static str,
    params: &'static [Param],
    unknown: Unknown,
}

impl Spec {
    /// The longest raw query accepted: for the legacy endpoints
    /// [`MAX_LEGACY_QUERY`]; for the others, every known parameter at its
    /// longest, fully percent-encoded (3 bytes per byte), whichever is
    /// more.
    fn max_query(&self) -> usize {
        let known: usize = self.params.iter().map(|p| p.name.len() + 2 + 3 * p.max).sum();
        match self.unknown {
            Unknown::Ignore => MAX_LEGACY_QUERY,
            Unknown::Refuse => known.max(MAX_LEGACY_QUERY),
        }
    }

    fn param(&self, name: &str) -> Option<&Param> {
        self.params.iter().find(|p| p.name == name)
    }
}

const fn legacy(endpoint: &'static str, params: &'static [Param]) -> Spec {
    Spec { endpoint, params, unknown: Unknown::Ignore }
}

const KEY_ONLY: &[Param] = &[param("key")];
const NODE_GET: Spec =
    legacy("/Node/get", &[param("key"), param("ver"), param("arch"), param("count"), param("flavor")]);
const NODE_DONE: Spec = legacy("/Node/done", &[param("key"), param("ssid")]);
const NODE_FAIL: Spec = legacy("/Node/fail", &[param("key"), param("ssid")]);
const INVENTORY: Spec = legacy("/Inventory", KEY_ONLY);
const HELP_SPEC: Spec = legacy("/Help", KEY_ONLY);
const OVERTIME: Spec = legacy("/Overtime", KEY_ONLY);
const NODE_SET_ADMIN: Spec = legacy("/NodeSetAdmin", KEY_ONLY);
const NODE_RECOVER: Spec = legacy("/NodeRecover", KEY_ONLY);
const PAUSE: Spec = legacy("/PauseService", KEY_ONLY);
const RESUME: Spec = legacy("/ResumeService", KEY_ONLY);

/// The longest host key a machine may report: an RSA-16384 key is about
/// 2.8 KB, an RSA-4096 one about 750 bytes (see `keys::MAX_KEY_LINE`).
const MAX_HOST_KEY: usize = duffy_installers::keys::MAX_KEY_LINE;
/// The longest failure reason a machine may report (the node's history
/// keeps the first 1000 characters).
const MAX_REASON: usize = 4096;

const INSTALL_IPXE: Spec = Spec { endpoint: "/Install/ipxe", params: &[param("host")], unknown: Unknown::Refuse };
const INSTALL_KICKSTART: Spec =
    Spec { endpoint: "/Install/kickstart", params: &[param("token")], unknown: Unknown::Refuse };
const INSTALL_DONE: Spec = Spec {
    endpoint: "/Install/done",
    params: &[param("token"), Param { name: "host_key", max: MAX_HOST_KEY }],
    unknown: Unknown::Refuse,
};
const INSTALL_FAILED: Spec = Spec {
    endpoint: "/Install/failed",
    params: &[param("token"), Param { name: "reason", max: MAX_REASON }],
    unknown: Unknown::Refuse,
};

/// The query string, parsed and checked against the endpoint's [`Spec`]:
/// each known parameter at most once and within its length; unknown ones
/// ignored or refused as the endpoint says; no absurd total length.
struct Query {
    values: HashMap<String, String>,
    /// Names of the parameters that were ignored (legacy endpoints only).
    ignored: Vec<String>,
}

impl Query {
    fn parse(raw: Option<&str>, spec: &Spec) -> Result<Query, Reply> {
        let mut values = HashMap::new();
        let mut ignored = Vec::new();
        let raw = raw.unwrap_or("");
        let max_query = spec.max_query();
        if raw.len() > max_query {
            return Err(Reply::message(
                StatusCode::BAD_REQUEST,
                format!("query string too long (at most {max_query} bytes)"),
            ));
        }
        for (k, v) in form_urlencoded::parse(raw.as_bytes()) {
            if k.is_empty() && v.is_empty() {
                continue;
            }
            let Some(param) = spec.param(&k) else {
                let shown: String = k.chars().take(40).collect();
                if spec.unknown == Unknown::Ignore {
                    ignored.push(shown);
                    continue;
                }
                let allowed = spec.params.iter().map(|p| p.name).collect::<Vec<_>>().join(", ");
                return Err(Reply::message(
                    StatusCode::BAD_REQUEST,
                    format!("unknown parameter {shown:?}; allowed parameters: {allowed}"),
                ));
            };
            if v.len() > param.max {
                return Err(Reply::message(
                    StatusCode::BAD_REQUEST,
                    format!("parameter {k} is too long (at most {} bytes)", param.max),
                ));
            }
            if values.insert(k.to_string(), v.to_string()).is_some() {
                return Err(Reply::message(StatusCode::BAD_REQUEST, format!("parameter {k} given more than once")));
            }
        }
        Ok(Query { values, ignored })
    }

    fn get(&self, k: &str) -> Option<&str> {
        self.values.get(k).map(String::as_str)
    }

    /// The key, or the legacy 403 object when it is missing or empty.
    fn key(&self) -> Result<&str, Reply> {
        match self.get("key") {
            Some(k) if !k.is_empty() => Ok(k),
            _ => Err(Reply::msg(StatusCode::FORBIDDEN, INVALID_KEY)),
        }
    }
}

/// Parses `raw` for the endpoint of `spec`, counting and logging the
/// parameters it ignores.
fn query(st: &AppState, spec: &Spec, raw: Option<&str>) -> Result<Query, Reply> {
    let q = Query::parse(raw, spec)?;
    if !q.ignored.is_empty() {
        st.metrics.ignored_parameters(Metrics::endpoint_index(spec.endpoint), q.ignored.len());
        debug!(endpoint = spec.endpoint, ignored = ?q.ignored, "ignoring unknown query parameters");
    }
    Ok(q)
}

/// The legacy, admin and operations endpoints.
fn api_routes() -> Router<AppState> {
    Router::new()
        .route("/Node/get", get(node_get))
        .route("/Node/done", get(node_done))
        .route("/Node/fail", get(node_fail))
        .route("/Inventory", get(inventory))
        .route("/Help", get(help))
        .route("/Overtime", get(overtime))
        .route("/NodeSetAdmin/{node}", get(node_set_admin))
        .route("/NodeRecover/{node}", get(node_recover))
        .route("/PauseService", get(pause))
        .route("/ResumeService", get(resume))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
}

/// The endpoints machines being installed call.
fn install_routes() -> Router<AppState> {
    Router::new()
        .route("/Install/ipxe", get(install_ipxe))
        .route("/Install/kickstart", get(install_kickstart))
        .route("/Install/done", get(install_done))
        .route("/Install/failed", get(install_failed))
}

fn finish(routes: Router<AppState>, state: AppState) -> Router {
    routes.fallback(not_found).layer(middleware::from_fn_with_state(state.clone(), observe)).with_state(state)
}

/// Builds the router of every endpoint: the service on one listener.
pub fn router(state: AppState) -> Router {
    finish(api_routes().merge(install_routes()), state)
}

/// The router of the main listener when the install endpoints have their
/// own ([`install_router`]): everything but `/Install/*`, which is then an
/// unknown path here.
pub fn public_router(state: AppState) -> Router {
    finish(api_routes(), state)
}

/// The router of the install listener (`[installer] listen`): only
/// `/Install/*`; every other path is unknown.
pub fn install_router(state: AppState) -> Router {
    finish(install_routes(), state)
}

async fn observe(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let endpoint = Metrics::endpoint_index(req.uri().path());
    let started = Instant::now();
    let resp = next.run(req).await;
    st.metrics.observe(endpoint, resp.status().as_u16(), started.elapsed());
    resp
}

/// An error no caller can do anything about but retry: the details go to
/// the log, the reply says what failed and never carries a store's own
/// words (SQL, file names, the database's messages).
fn unexpected(what: &str, e: &EngineError) -> Reply {
    error!(error = %e, "{what} failed");
    Reply::message(StatusCode::SERVICE_UNAVAILABLE, format!("{what} failed: {}; try again", public_reason(e)))
}

/// What a caller may be told about an unexpected error.
fn public_reason(e: &EngineError) -> String {
    match e {
        // The storage's condition (disk full, read-only) is the operator's
        // to fix and safe to name; anything else stays in the log.
        EngineError::Store(duffy_core::StoreError::Unavailable { fault, .. }) => {
            format!("{STORE_UNAVAILABLE}: {fault}")
        }
        EngineError::Store(_) => STORE_UNAVAILABLE.to_string(),
        EngineError::Contention(_) => "too much contention".to_string(),
        // The engine's own refusals are worded for callers; anything else
        // reaching here is an internal matter.
        EngineError::PreparationFailed { .. } => "preparing the nodes failed".to_string(),
        other => other.to_string(),
    }
}

/// What any caller is told when the store fails.
const STORE_UNAVAILABLE: &str = "store unavailable";

fn parse_request(q: &Query) -> Result<NodeRequest, Reply> {
    let bad = |m: String| Reply::message(StatusCode::BAD_REQUEST, m);
    let release = q
        .get("ver")
        .map(|v| validate_token("ver", v, 64).map(|()| v.to_string()))
        .transpose()
        .map_err(|e| bad(e.to_string()))?;
    let arch = q.get("arch").map(str::parse::<Arch>).transpose().map_err(|e| bad(format!("invalid arch: {e}")))?;
    let flavor = q
        .get("flavor")
        .map(|v| validate_token("flavor", v, 64).map(|()| v.to_string()))
        .transpose()
        .map_err(|e| bad(e.to_string()))?;
    let count = match q.get("count") {
        None => None,
        Some(c) => match c.parse::<u32>() {
            Ok(n) if n >= 1 => Some(n),
            _ => {
                let shown: String = c.chars().take(40).collect();
                return Err(bad(format!("invalid count {shown:?}: must be a whole number of at least 1")));
            }
        },
    };
    Ok(NodeRequest { release, arch, count, flavor })
}

/// `/Node/get?key=K[&ver=7][&arch=x86_64][&count=1][&flavor=F]`
async fn node_get(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    RawQuery(raw): RawQuery,
) -> Reply {
    let q = match query(&st, &NODE_GET, raw.as_deref()) {
        Ok(q) => q,
        Err(r) => return r,
    };
    let key = match q.key() {
        Ok(k) => k,
        Err(r) => return r,
    };
    let req = match parse_request(&q) {
        Ok(r) => r,
        Err(r) => {
            st.metrics.allocation("invalid", 0);
            return r;
        }
    };
    let who = match authenticate(&st, peer, key).await {
        Ok(w) => w,
        Err(AuthRefusal::Invalid) => return Reply::Text(StatusCode::OK, INVALID_KEY.into()),
        Err(AuthRefusal::Limited) => return Reply::Text(StatusCode::TOO_MANY_REQUESTS, LOOKUPS_LIMITED.into()),
        Err(AuthRefusal::Failed(e)) => return unexpected("authentication", &e),
    };
    let count = req.count.unwrap_or(1) as usize;
    let m = &st.metrics;
    match st.engine.get_nodes(&who, &req).await {
        Ok(a) => {
            m.allocation("allocated", count);
            Reply::Json(StatusCode::OK, json!({ "hosts": a.hosts, "ssid": a.session.0 }))
        }
        Err(EngineError::InsufficientNodes { .. }) => {
            m.allocation("insufficient", 0);
            Reply::Text(StatusCode::OK, "Insufficient Nodes in READY State".into())
        }
        Err(e @ EngineError::RateLimited { .. }) => {
            m.allocation("rate_limited", 0);
            Reply::message(StatusCode::TOO_MANY_REQUESTS, format!("Failed to allocate nodes: {e}"))
        }
        Err(e @ EngineError::QuotaExceeded { .. }) => {
            m.allocation("quota", 0);
            Reply::message(StatusCode::FORBIDDEN, format!("Failed to allocate nodes: {e}"))
        }
        Err(e @ EngineError::ProjectUnusable { .. }) => {
            m.allocation("invalid", 0);
            Reply::message(StatusCode::BAD_REQUEST, format!("Failed to allocate nodes: {e}"))
        }
        Err(EngineError::PreparationFailed { hostname, reason }) => {
            m.allocation("preparation_failed", 0);
            warn!(node = %hostname, %reason, "allocation failed while preparing nodes");
            Reply::message(StatusCode::OK, "Failed to allocate nodes")
        }
        Err(EngineError::Paused) => {
            m.allocation("paused", 0);
            // Not a server error: the service is deliberately refusing.
            Reply::message(StatusCode::CONFLICT, "Failed to allocate nodes: the service is paused; try again later")
        }
        Err(e @ (EngineError::NoSuchPool { .. } | EngineError::InvalidRequest(_))) => {
            m.allocation("invalid", 0);
            Reply::message(StatusCode::BAD_REQUEST, format!("Failed to allocate nodes: {e}"))
        }
        Err(e) => {
            m.allocation("error", 0);
            unexpected("allocation", &e)
        }
    }
}

/// Key and ssid of `/Node/done` and `/Node/fail`, key checked first.
async fn session_call(
    st: &AppState,
    spec: &Spec,
    peer: SocketAddr,
    raw: Option<&str>,
) -> Result<(Principal, String), Reply> {
    let q = query(st, spec, raw)?;
    let key = q.key()?;
    let ssid = q.get("ssid").unwrap_or("").to_string();
    let who = match authenticate(st, peer, key).await {
        Ok(w) => w,
        Err(AuthRefusal::Invalid) => return Err(Reply::msg(StatusCode::FORBIDDEN, INVALID_KEY)),
        Err(AuthRefusal::Limited) => return Err(Reply::msg(StatusCode::TOO_MANY_REQUESTS, LOOKUPS_LIMITED)),
        Err(AuthRefusal::Failed(e)) => return Err(unexpected("authentication", &e)),
    };
    if ssid.is_empty() {
        return Err(Reply::msg(StatusCode::FORBIDDEN, INVALID_SESSION));
    }
    Ok((who, ssid))
}

fn session_error(what: &str, e: EngineError) -> Reply {
    match e {
        EngineError::InvalidSession | EngineError::InvalidKey => Reply::msg(StatusCode::FORBIDDEN, INVALID_SESSION),
        EngineError::SessionNotInProd { .. } => Reply::msg(StatusCode::OK, "Session not in Prod"),
        EngineError::FailCapExceeded { .. } => Reply::msg(
            StatusCode::FORBIDDEN,
            "Exceeded maximum allowed fail nodes limit, please release other machines to continue",
        ),
        e => unexpected(what, &e),
    }
}

/// `/Node/done?key=K&ssid=S`
async fn node_done(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    RawQuery(raw): RawQuery,
) -> Reply {
    let (who, ssid) = match session_call(&st, &NODE_DONE, peer, raw.as_deref()).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    match st.engine.done(&who, &ssid).await {
        Ok(()) => Reply::message(StatusCode::OK, "Done"),
        Err(e) => session_error("releasing the session", e),
    }
}

/// `/Node/fail?key=K&ssid=S`
async fn node_fail(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    RawQuery(raw): RawQuery,
) -> Reply {
    let (who, ssid) = match session_call(&st, &NODE_FAIL, peer, raw.as_deref()).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    match st.engine.fail(&who, &ssid).await {
        Ok(()) => {
            st.metrics.session_failed();
            Reply::message(StatusCode::OK, "Done")
        }
        Err(e) => session_error("failing the session", e),
    }
}

/// One legacy inventory row: `[id, hostname, ip, chassis, used_count,
/// state, comment, distro, rel, ver, arch, pool, console_port, flavor]`,
/// serialized straight from the node.
pub struct InventoryRow<'a>(pub &'a Node);

impl serde::Serialize for InventoryRow<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let n = self.0;
        let in_rotation = u8::from(n.state != duffy_core::NodeState::Reserved);
        let arch = n.image.as_ref().map(|i| i.arch).unwrap_or(n.hardware_arch);
        let mut seq = s.serialize_seq(Some(14))?;
        seq.serialize_element(&n.id.0)?;
        seq.serialize_element(&n.hostname)?;
        seq.serialize_element(&n.ip)?;
        seq.serialize_element(&n.chassis)?;
        seq.serialize_element(&n.used_count)?;
        seq.serialize_element(n.state.as_str())?;
        seq.serialize_element(&n.session.as_ref().map(|s| s.0.as_str()))?;
        seq.serialize_element(&None::<&str>)?; // distro
        seq.serialize_element(&None::<&str>)?; // rel
        seq.serialize_element(&n.image.as_ref().map(|i| i.release.as_str()))?;
        seq.serialize_element(arch.as_str())?;
        seq.serialize_element(&in_rotation)?;
        seq.serialize_element(&n.console_port)?;
        seq.serialize_element(&n.flavor)?;
        seq.end()
    }
}

/// `/Inventory[?key=K]`
async fn inventory(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    RawQuery(raw): RawQuery,
) -> Reply {
    let q = match query(&st, &INVENTORY, raw.as_deref()) {
        Ok(q) => q,
        Err(r) => return r,
    };
    match q.get("key") {
        None => match st.engine.inventory().await {
            Ok(nodes) => {
                let rows: Vec<InventoryRow<'_>> = nodes.iter().map(InventoryRow).collect();
                match serde_json::to_vec(&rows) {
                    Ok(body) => Reply::JsonBytes(StatusCode::OK, body),
                    Err(e) => {
                        error!(error = %e, "encoding the inventory failed");
                        Reply::message(StatusCode::INTERNAL_SERVER_ERROR, "encoding the inventory failed")
                    }
                }
            }
            Err(e) => unexpected("reading the inventory", &e),
        },
        Some(key) => {
            let who = match authenticate(&st, peer, key).await {
                Ok(w) => w,
                Err(AuthRefusal::Invalid) => return Reply::Json(StatusCode::OK, json!([])),
                // Not `[]`: that would tell a job it holds nothing.
                Err(AuthRefusal::Limited) => return Reply::message(StatusCode::TOO_MANY_REQUESTS, LOOKUPS_LIMITED),
                Err(AuthRefusal::Failed(e)) => return unexpected("authentication", &e),
            };
            match st.engine.inventory_of(&who).await {
                Ok(rows) => {
                    Reply::Json(StatusCode::OK, Value::Array(rows.into_iter().map(|(h, s)| json!([h, s.0])).collect()))
                }
                Err(e) => unexpected("reading the inventory", &e),
            }
        }
    }
}

/// The text of `/Help`.
pub const HELP: &str = "\
Duffy: freshly installed test machines for CI jobs.

All calls are GET requests; parameters go in the query string.

/Node/get?key=KEY[&ver=7][&arch=x86_64][&count=1][&flavor=FLAVOR]
    Allocates COUNT Ready nodes of that release and architecture to a new
    session. Returns {\"hosts\": [...], \"ssid\": \"SESSION\"}.
    aarch64 and ppc64le default to flavor 'tiny'. If the pool has too few
    Ready nodes the answer is 'Insufficient Nodes in READY State': retry later.
/Node/done?key=KEY&ssid=SESSION
    Releases every node of the session; they are reinstalled.
/Node/fail?key=KEY&ssid=SESSION
    Marks the session's nodes failed and keeps them for debugging (your SSH
    keys stay on root) for the fail-hold period, then reclaims them. Release
    them earlier with /Node/done.
/Inventory[?key=KEY]
    Without a key: every node, as [id, hostname, ip, chassis, used_count,
    state, session, distro, rel, ver, arch, pool, console_port, flavor].
    With a key: [hostname, session] for each node your key holds.
/Help
    This text.

Admin calls (need an admin key):
/Overtime?key=KEY            sessions holding nodes past their lease
/NodeSetAdmin/HOST?key=KEY   take a node out of the pool (administrative downtime)
/NodeRecover/HOST?key=KEY    put a node back into the pool
/PauseService?key=KEY        no new allocations; the warm pool is powered down
/ResumeService?key=KEY       resume allocations and provision the pool again

Operations: /metrics (Prometheus), /healthz.
";

/// `/Help`
async fn help(State(st): State<AppState>, RawQuery(raw): RawQuery) -> Reply {
    match query(&st, &HELP_SPEC, raw.as_deref()) {
        Ok(_) => Reply::Text(StatusCode::OK, HELP.into()),
        Err(r) => r,
    }
}

/// Authenticates an admin call.
async fn admin(st: &AppState, spec: &Spec, peer: SocketAddr, raw: Option<&str>) -> Result<Principal, Reply> {
    let q = query(st, spec, raw)?;
    let key = q.key()?;
    match authenticate(st, peer, key).await {
        Ok(w) if w.admin => Ok(w),
        Ok(_) => Err(Reply::msg(StatusCode::FORBIDDEN, "This call needs an admin key")),
        Err(AuthRefusal::Invalid) => Err(Reply::msg(StatusCode::FORBIDDEN, INVALID_KEY)),
        Err(AuthRefusal::Limited) => Err(Reply::msg(StatusCode::TOO_MANY_REQUESTS, LOOKUPS_LIMITED)),
        Err(AuthRefusal::Failed(e)) => Err(unexpected("authentication", &e)),
    }
}

fn admin_error(what: &str, e: EngineError) -> Reply {
    match e {
        EngineError::NotAdmin => Reply::msg(StatusCode::FORBIDDEN, "This call needs an admin key"),
        EngineError::UnknownNode(h) => Reply::message(StatusCode::NOT_FOUND, format!("No node named {h:?}")),
        e @ (EngineError::Transition(_) | EngineError::NotPaused) => {
            Reply::message(StatusCode::CONFLICT, e.to_string())
        }
        e => unexpected(what, &e),
    }
}

/// `/Overtime?key=ADMIN`
async fn overtime(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    RawQuery(raw): RawQuery,
) -> Reply {
    let who = match admin(&st, &OVERTIME, peer, raw.as_deref()).await {
        Ok(w) => w,
        Err(r) => return r,
    };
    match st.engine.overtime(&who).await {
        Ok(list) => Reply::Json(
            StatusCode::OK,
            Value::Array(
                list.into_iter()
                    .map(|o| {
                        json!({
                            "ssid": o.session.id.0,
                            "project": o.session.project,
                            "hosts": o.hosts,
                            "delivered_at": o.session.delivered_at.map(|t| t.to_string()),
                            "lease_until": o.session.lease_until.map(|t| t.to_string()),
                            "overdue_minutes": o.overdue.as_secs() / 60,
                        })
                    })
                    .collect(),
            ),
        ),
        Err(e) => admin_error("listing overtime", e),
    }
}

fn check_hostname(node: &str) -> Result<(), Reply> {
    let ok = !node.is_empty()
        && node.len() <= 253
        && node.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        let shown: String = node.chars().take(60).collect();
        Err(Reply::message(
            StatusCode::BAD_REQUEST,
            format!("invalid node name {shown:?}: a hostname of letters, digits, '.' and '-'"),
        ))
    }
}

fn node_reply(n: &Node) -> Reply {
    Reply::Json(StatusCode::OK, json!({ "hostname": n.hostname, "state": n.state.as_str() }))
}

/// `/NodeSetAdmin/<node>?key=ADMIN`
async fn node_set_admin(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(node): Path<String>,
    RawQuery(raw): RawQuery,
) -> Reply {
    let who = match admin(&st, &NODE_SET_ADMIN, peer, raw.as_deref()).await {
        Ok(w) => w,
        Err(r) => return r,
    };
    if let Err(r) = check_hostname(&node) {
        return r;
    }
    match st.engine.set_admin(&who, &node).await {
        Ok(n) => node_reply(&n),
        Err(e) => admin_error("setting admin downtime", e),
    }
}

/// `/NodeRecover/<node>?key=ADMIN`
async fn node_recover(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(node): Path<String>,
    RawQuery(raw): RawQuery,
) -> Reply {
    let who = match admin(&st, &NODE_RECOVER, peer, raw.as_deref()).await {
        Ok(w) => w,
        Err(r) => return r,
    };
    if let Err(r) = check_hostname(&node) {
        return r;
    }
    match st.engine.recover(&who, &node).await {
        Ok(n) => node_reply(&n),
        Err(e) => admin_error("recovering the node", e),
    }
}

/// `/PauseService?key=ADMIN`
async fn pause(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    RawQuery(raw): RawQuery,
) -> Reply {
    let who = match admin(&st, &PAUSE, peer, raw.as_deref()).await {
        Ok(w) => w,
        Err(r) => return r,
    };
    match st.engine.pause(&who).await {
        Ok(()) => Reply::message(StatusCode::OK, "Done"),
        Err(e) => admin_error("pausing", e),
    }
}

/// `/ResumeService?key=ADMIN`
async fn resume(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    RawQuery(raw): RawQuery,
) -> Reply {
    let who = match admin(&st, &RESUME, peer, raw.as_deref()).await {
        Ok(w) => w,
        Err(r) => return r,
    };
    match st.engine.resume(&who).await {
        Ok(()) => Reply::message(StatusCode::OK, "Done"),
        Err(e) => admin_error("resuming", e),
    }
}

/// `/metrics`
async fn metrics(State(st): State<AppState>) -> Response {
    let store = st.engine.store();
    let (nodes, paused) = match (store.nodes().await, store.paused().await) {
        (Ok(n), Ok(p)) => (n, p),
        (Err(e), _) | (_, Err(e)) => return unexpected("reading metrics", &e.into()).into_response(),
    };
    let body = st.metrics.render(&nodes, paused);
    let mut r = Response::new(Body::from(body));
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
    r
}

/// `/healthz`: the store answers.
async fn healthz(State(st): State<AppState>) -> Reply {
    let store = st.engine.store();
    health_reply(store.health(), store.paused().await)
}

/// Healthy means the store reads and writes: a store whose writes fail (a
/// full disk) cannot allocate, so it is unhealthy too, with the condition
/// named (never the store's own words, which go to the log).
fn health_reply(health: StoreHealth, paused: Result<bool, StoreError>) -> Reply {
    let unhealthy = |status: &str, error: String| {
        Reply::Json(StatusCode::SERVICE_UNAVAILABLE, json!({ "status": status, "error": error }))
    };
    match (health, paused) {
        (StoreHealth::Failed(why), _) => {
            error!(reason = %why, "health check: the store has stopped");
            unhealthy("error", STORE_UNAVAILABLE.to_string())
        }
        (_, Err(e)) => {
            // Anyone may call this: the store's own words go to the log only.
            error!(error = %e, "health check failed");
            unhealthy("error", STORE_UNAVAILABLE.to_string())
        }
        (StoreHealth::Degraded(why), Ok(paused)) => {
            warn!(reason = %why, "health check: writes are failing");
            Reply::Json(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({ "status": "degraded", "error": why, "paused": paused }),
            )
        }
        (StoreHealth::Ok, Ok(paused)) => Reply::Json(StatusCode::OK, json!({ "status": "ok", "paused": paused })),
    }
}

fn pxe_registry(st: &AppState) -> Result<&Arc<PxeRegistry>, Reply> {
    st.pxe.as_ref().ok_or_else(|| Reply::Text(StatusCode::NOT_FOUND, "no PXE installer is configured\n".into()))
}

/// The reply to a refused install request. Refusals are logged with the
/// caller's address; server errors (templates) are logged in full and
/// answered without details (file names, template text).
fn pxe_error(e: &PxeError, peer: IpAddr) -> Reply {
    let status = StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::BAD_REQUEST);
    if status.is_server_error() {
        error!(error = %e, %peer, "PXE installer");
        return Reply::Text(status, "internal error; see the service's log\n".into());
    }
    warn!(error = %e, %peer, "PXE request refused");
    Reply::Text(status, format!("{e}\n"))
}

/// `/Install/ipxe?host=HOSTNAME`: the boot script of a machine that is
/// being installed, for that machine's own address only (the script
/// carries its one-time install token). Any other request, for a host
/// with no install pending, from another address, or after the install's
/// time ran out, gets the same boot-from-disk script: a stranger learns
/// nothing about which hosts are being installed.
async fn install_ipxe(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    RawQuery(raw): RawQuery,
) -> Reply {
    let reg = match pxe_registry(&st) {
        Ok(r) => r,
        Err(r) => return r,
    };
    let q = match query(&st, &INSTALL_IPXE, raw.as_deref()) {
        Ok(q) => q,
        Err(r) => return r,
    };
    let Some(host) = q.get("host").filter(|h| check_hostname(h).is_ok()) else {
        return Reply::Text(StatusCode::BAD_REQUEST, "host=HOSTNAME is required\n".into());
    };
    match reg.ipxe_script(host, peer.ip()) {
        Ok(script) => Reply::Text(StatusCode::OK, script),
        Err(PxeError::NoPendingInstall { .. } | PxeError::Expired { .. }) => {
            Reply::Text(StatusCode::OK, LOCAL_BOOT_SCRIPT.into())
        }
        Err(e) => pxe_error(&e, peer.ip()),
    }
}

fn token_query(st: &AppState, spec: &Spec, raw: Option<&str>) -> Result<Query, Reply> {
    let q = query(st, spec, raw)?;
    if q.get("token").is_none_or(str::is_empty) {
        return Err(Reply::Text(StatusCode::BAD_REQUEST, "token=TOKEN is required\n".into()));
    }
    Ok(q)
}

/// `/Install/kickstart?token=T`: the kickstart of a pending install, for
/// the node's own address.
async fn install_kickstart(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    RawQuery(raw): RawQuery,
) -> Reply {
    let (reg, q) = match (pxe_registry(&st), token_query(&st, &INSTALL_KICKSTART, raw.as_deref())) {
        (Ok(r), Ok(q)) => (r, q),
        (Err(r), _) | (_, Err(r)) => return r,
    };
    match reg.kickstart(q.get("token").unwrap_or_default(), peer.ip()) {
        Ok(ks) => Reply::Text(StatusCode::OK, ks),
        Err(e) => pxe_error(&e, peer.ip()),
    }
}

/// `/Install/done?token=T&host_key=K`: the installed machine, from its own
/// address, reports success with its SSH host key (once; the token is then
/// spent). A missing (unless not required) or invalid key fails the
/// install.
async fn install_done(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    RawQuery(raw): RawQuery,
) -> Reply {
    let (reg, q) = match (pxe_registry(&st), token_query(&st, &INSTALL_DONE, raw.as_deref())) {
        (Ok(r), Ok(q)) => (r, q),
        (Err(r), _) | (_, Err(r)) => return r,
    };
    match reg.complete(q.get("token").unwrap_or_default(), peer.ip(), q.get("host_key")) {
        Ok(()) => Reply::Text(StatusCode::OK, "OK\n".into()),
        Err(e) => pxe_error(&e, peer.ip()),
    }
}

/// `/Install/failed?token=T&reason=R`: the machine, from its own address,
/// reports a failed install; the reason goes into the node's history.
async fn install_failed(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    RawQuery(raw): RawQuery,
) -> Reply {
    let (reg, q) = match (pxe_registry(&st), token_query(&st, &INSTALL_FAILED, raw.as_deref())) {
        (Ok(r), Ok(q)) => (r, q),
        (Err(r), _) | (_, Err(r)) => return r,
    };
    match reg.fail(q.get("token").unwrap_or_default(), peer.ip(), q.get("reason").unwrap_or("no reason given")) {
        Ok(()) => Reply::Text(StatusCode::OK, "OK\n".into()),
        Err(e) => pxe_error(&e, peer.ip()),
    }
}

async fn not_found(req: Request) -> Reply {
    let path: String = req.uri().path().chars().take(100).collect();
    Reply::message(StatusCode::NOT_FOUND, format!("no such endpoint {path:?}; see /Help"))
}

impl Reply {
    /// The status code (for tests).
    pub fn status_code(&self) -> StatusCode {
        self.status()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(r: Reply) -> String {
        match r {
            Reply::Json(_, v) => v.to_string(),
            Reply::Text(_, t) => t,
            Reply::JsonBytes(_, b) => String::from_utf8_lossy(&b).into_owned(),
        }
    }

    /// What SQLite says when its file is damaged: never for a caller's eyes.
    fn sql_error() -> StoreError {
        StoreError::backend(
            "reading the pause flag from /var/lib/duffy/duffy.db",
            std::io::Error::other("database disk image is malformed: SELECT paused FROM service"),
        )
    }

    #[test]
    fn store_errors_never_reach_a_reply() {
        let r = health_reply(StoreHealth::Ok, Err(sql_error()));
        assert_eq!(r.status_code(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body(r), r#"{"error":"store unavailable","status":"error"}"#);

        for e in [
            EngineError::Store(sql_error()),
            EngineError::Store(StoreError::Corrupt("node 3 has state 'Bogus' in table nodes".into())),
        ] {
            let r = unexpected("allocation", &e);
            assert_eq!(r.status_code(), StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(body(r), r#""allocation failed: store unavailable; try again""#);
        }
        // An engine refusal worded for callers is kept.
        let r = unexpected("releasing the session", &EngineError::Contention("session 42".into()));
        assert!(!body(r).contains("42"));
        // A storage condition is named (the operator's to fix), its
        // details (the path, SQLite's words) are not.
        let full = StoreError::Unavailable {
            context: "committing a batch of 3 operations".into(),
            fault: duffy_core::StorageFault::DiskFull,
            source: Box::new(std::io::Error::other("/var/lib/duffy/duffy.db-wal: SQLITE_FULL")),
        };
        let r = unexpected("allocation", &EngineError::Store(full));
        assert_eq!(body(r), r#""allocation failed: store unavailable: database or disk is full; try again""#);
    }

    #[test]
    fn template_errors_are_not_shown_to_machines() {
        let e = PxeError::Io {
            path: "/etc/duffy/templates/ks.tmpl".into(),
            source: std::io::Error::other("permission denied"),
        };
        let r = pxe_error(&e, IpAddr::from([10, 0, 0, 11]));
        assert_eq!(r.status_code(), StatusCode::INTERNAL_SERVER_ERROR);
        let b = body(r);
        assert!(!b.contains("/etc/duffy") && !b.contains("permission"), "{b}");
    }

    #[test]
    fn parameter_limits_are_per_parameter() {
        let key = "A".repeat(MAX_HOST_KEY);
        let token = "0".repeat(64);
        let raw = format!("token={token}&host_key={}", "%2B".repeat(MAX_HOST_KEY));
        let q = Query::parse(Some(&raw), &INSTALL_DONE).unwrap_or_else(|r| panic!("{}", body(r)));
        assert_eq!(q.get("host_key").map(str::len), Some(MAX_HOST_KEY));
        let too_long = format!("token={token}&host_key={key}A");
        let r = Query::parse(Some(&too_long), &INSTALL_DONE).err().expect("refused");
        assert!(body(r).contains("host_key is too long (at most 8192 bytes)"));
        // The others as before: 256.
        let r = Query::parse(Some(&format!("token={}", "0".repeat(257))), &INSTALL_DONE).err().expect("refused");
        assert!(body(r).contains("token is too long (at most 256 bytes)"));
        let r = Query::parse(Some(&format!("key={}", "k".repeat(257))), &NODE_GET).err().expect("refused");
        assert!(body(r).contains("key is too long (at most 256 bytes)"));
        let reason = format!("token={token}&reason={}", "r".repeat(MAX_REASON));
        assert!(Query::parse(Some(&reason), &INSTALL_FAILED).is_ok());
        assert!(Query::parse(Some(&format!("{reason}r")), &INSTALL_FAILED).is_err());
        // Legacy endpoints keep their overall cap.
        let r = Query::parse(Some(&format!("key=k&_={}", "x".repeat(MAX_LEGACY_QUERY))), &NODE_GET).err();
        assert!(body(r.expect("refused")).contains("at most 4096 bytes"));
    }
}
