//! The HTTP API: the legacy endpoints `cico` and job scripts call, the
//! admin endpoints, `/metrics` and `/healthz`.
//!
//! This is the only module that knows the legacy wire shapes (see
//! `shared/spec/legacy-api.md`): clients ignore status codes and judge a
//! reply by the shape of its body, so every reply here is built to that
//! contract. Every parameter is validated before anything is read or
//! written; a rejected request changes nothing.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Path, RawQuery, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use duffy_core::{Arch, Engine, EngineError, Node, NodeRequest, Principal, validate_token};
use duffy_installers::pxe::LOCAL_BOOT_SCRIPT;
use duffy_installers::{PxeError, PxeRegistry};
use serde_json::{Value, json};
use tracing::{error, warn};

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

/// The query string, parsed and checked against the endpoint's allowed
/// parameters: no unknown names, no repeats, no absurd lengths.
struct Query(HashMap<String, String>);

impl Query {
    fn parse(raw: Option<&str>, allowed: &[&str]) -> Result<Query, Reply> {
        let mut out = HashMap::new();
        let raw = raw.unwrap_or("");
        if raw.len() > 4096 {
            return Err(Reply::message(StatusCode::BAD_REQUEST, "query string too long (at most 4096 bytes)"));
        }
        for (k, v) in form_urlencoded::parse(raw.as_bytes()) {
            if k.is_empty() && v.is_empty() {
                continue;
            }
            if !allowed.contains(&k.as_ref()) {
                let shown: String = k.chars().take(40).collect();
                let allowed = if allowed.is_empty() { "none".to_string() } else { allowed.join(", ") };
                return Err(Reply::message(
                    StatusCode::BAD_REQUEST,
                    format!("unknown parameter {shown:?}; allowed parameters: {allowed}"),
                ));
            }
            if v.len() > 256 {
                return Err(Reply::message(
                    StatusCode::BAD_REQUEST,
                    format!("parameter {k} is too long (at most 256 characters)"),
                ));
            }
            if out.insert(k.to_string(), v.to_string()).is_some() {
                return Err(Reply::message(StatusCode::BAD_REQUEST, format!("parameter {k} given more than once")));
            }
        }
        Ok(Query(out))
    }

    fn get(&self, k: &str) -> Option<&str> {
        self.0.get(k).map(String::as_str)
    }

    /// The key, or the legacy 403 object when it is missing or empty.
    fn key(&self) -> Result<&str, Reply> {
        match self.get("key") {
            Some(k) if !k.is_empty() => Ok(k),
            _ => Err(Reply::msg(StatusCode::FORBIDDEN, INVALID_KEY)),
        }
    }
}

/// Builds the router.
pub fn router(state: AppState) -> Router {
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
        .route("/Install/ipxe", get(install_ipxe))
        .route("/Install/kickstart", get(install_kickstart))
        .route("/Install/done", get(install_done))
        .route("/Install/failed", get(install_failed))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

async fn observe(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let endpoint = Metrics::endpoint_index(req.uri().path());
    let started = Instant::now();
    let resp = next.run(req).await;
    st.metrics.observe(endpoint, resp.status().as_u16(), started.elapsed());
    resp
}

fn unexpected(what: &str, e: &EngineError) -> Reply {
    error!(error = %e, "{what} failed");
    Reply::message(StatusCode::SERVICE_UNAVAILABLE, format!("{what} failed: {e}; try again"))
}

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
    let q = match Query::parse(raw.as_deref(), &["key", "ver", "arch", "count", "flavor"]) {
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
async fn session_call(st: &AppState, peer: SocketAddr, raw: Option<&str>) -> Result<(Principal, String), Reply> {
    let q = Query::parse(raw, &["key", "ssid"])?;
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
    let (who, ssid) = match session_call(&st, peer, raw.as_deref()).await {
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
    let (who, ssid) = match session_call(&st, peer, raw.as_deref()).await {
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
    let q = match Query::parse(raw.as_deref(), &["key"]) {
        Ok(q) => q,
        Err(r) => return r,
    };
    match q.get("key") {
        None => match st.engine.inventory().await {
            Ok(nodes) => {
                let rows: Vec<InventoryRow<'_>> = nodes.iter().map(InventoryRow).collect();
                match serde_json::to_vec(&rows) {
                    Ok(body) => Reply::JsonBytes(StatusCode::OK, body),
                    Err(e) => Reply::message(StatusCode::INTERNAL_SERVER_ERROR, format!("encoding the inventory: {e}")),
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
async fn help(RawQuery(raw): RawQuery) -> Reply {
    match Query::parse(raw.as_deref(), &["key"]) {
        Ok(_) => Reply::Text(StatusCode::OK, HELP.into()),
        Err(r) => r,
    }
}

/// Authenticates an admin call.
async fn admin(st: &AppState, peer: SocketAddr, raw: Option<&str>) -> Result<Principal, Reply> {
    let q = Query::parse(raw, &["key"])?;
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
    let who = match admin(&st, peer, raw.as_deref()).await {
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
    let who = match admin(&st, peer, raw.as_deref()).await {
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
    let who = match admin(&st, peer, raw.as_deref()).await {
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
    let who = match admin(&st, peer, raw.as_deref()).await {
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
    let who = match admin(&st, peer, raw.as_deref()).await {
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
    match st.engine.store().paused().await {
        Ok(paused) => Reply::Json(StatusCode::OK, json!({ "status": "ok", "paused": paused })),
        Err(e) => {
            error!(error = %e, "health check failed");
            Reply::Json(StatusCode::SERVICE_UNAVAILABLE, json!({ "status": "error", "error": e.to_string() }))
        }
    }
}

fn pxe_registry(st: &AppState) -> Result<&Arc<PxeRegistry>, Reply> {
    st.pxe.as_ref().ok_or_else(|| Reply::Text(StatusCode::NOT_FOUND, "no PXE installer is configured\n".into()))
}

fn pxe_error(e: &PxeError) -> Reply {
    let status = StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::BAD_REQUEST);
    if status.is_server_error() {
        error!(error = %e, "PXE installer");
    } else {
        warn!(error = %e, "PXE request refused");
    }
    Reply::Text(status, format!("{e}\n"))
}

/// `/Install/ipxe?host=HOSTNAME`: the boot script of a machine that is
/// being installed; any other machine is told to boot from its disk. Only
/// the node's own address may fetch it when the node's IP is known: the
/// script carries its one-time install token.
async fn install_ipxe(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    RawQuery(raw): RawQuery,
) -> Reply {
    let reg = match pxe_registry(&st) {
        Ok(r) => r,
        Err(r) => return r,
    };
    let q = match Query::parse(raw.as_deref(), &["host"]) {
        Ok(q) => q,
        Err(r) => return r,
    };
    let Some(host) = q.get("host").filter(|h| check_hostname(h).is_ok()) else {
        return Reply::Text(StatusCode::BAD_REQUEST, "host=HOSTNAME is required\n".into());
    };
    if let Some(ip) = reg.pending_ip(host) {
        if ip.parse::<std::net::IpAddr>().ok() != Some(peer.ip()) {
            warn!(node = %host, %peer, "boot script asked for from another address");
            return Reply::Text(StatusCode::FORBIDDEN, "this boot script is for the node's own address\n".into());
        }
    }
    match reg.ipxe_script(host) {
        Ok(script) => Reply::Text(StatusCode::OK, script),
        Err(PxeError::NoPendingInstall { .. }) => Reply::Text(StatusCode::OK, LOCAL_BOOT_SCRIPT.into()),
        Err(e) => pxe_error(&e),
    }
}

fn token_query(raw: Option<&str>, allowed: &[&str]) -> Result<Query, Reply> {
    let q = Query::parse(raw, allowed)?;
    if q.get("token").is_none_or(str::is_empty) {
        return Err(Reply::Text(StatusCode::BAD_REQUEST, "token=TOKEN is required\n".into()));
    }
    Ok(q)
}

/// `/Install/kickstart?token=T`: the kickstart of a pending install.
async fn install_kickstart(State(st): State<AppState>, RawQuery(raw): RawQuery) -> Reply {
    let (reg, q) = match (pxe_registry(&st), token_query(raw.as_deref(), &["token"])) {
        (Ok(r), Ok(q)) => (r, q),
        (Err(r), _) | (_, Err(r)) => return r,
    };
    match reg.kickstart(q.get("token").unwrap_or_default()) {
        Ok(ks) => Reply::Text(StatusCode::OK, ks),
        Err(e) => pxe_error(&e),
    }
}

/// `/Install/done?token=T[&host_key=K]`: the installed machine reports
/// success (once; the token is then spent).
async fn install_done(State(st): State<AppState>, RawQuery(raw): RawQuery) -> Reply {
    let (reg, q) = match (pxe_registry(&st), token_query(raw.as_deref(), &["token", "host_key"])) {
        (Ok(r), Ok(q)) => (r, q),
        (Err(r), _) | (_, Err(r)) => return r,
    };
    let host_key = q.get("host_key").map(|k| k.trim().to_string()).filter(|k| !k.is_empty());
    match reg.complete(q.get("token").unwrap_or_default(), host_key) {
        Ok(()) => Reply::Text(StatusCode::OK, "OK\n".into()),
        Err(e) => pxe_error(&e),
    }
}

/// `/Install/failed?token=T&reason=R`: the machine reports a failed
/// install; the reason goes into the node's history.
async fn install_failed(State(st): State<AppState>, RawQuery(raw): RawQuery) -> Reply {
    let (reg, q) = match (pxe_registry(&st), token_query(raw.as_deref(), &["token", "reason"])) {
        (Ok(r), Ok(q)) => (r, q),
        (Err(r), _) | (_, Err(r)) => return r,
    };
    match reg.fail(q.get("token").unwrap_or_default(), q.get("reason").unwrap_or("no reason given")) {
        Ok(()) => Reply::Text(StatusCode::OK, "OK\n".into()),
        Err(e) => pxe_error(&e),
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
