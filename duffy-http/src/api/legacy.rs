//! The legacy endpoints jobs call: `/Node/get`, `/Node/done`,
//! `/Node/fail`, `/Inventory`, `/Help`.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, RawQuery, State};
use axum::http::StatusCode;
use axum::routing::get;
use duffy_core::{EngineError, NodeRequest, Principal};
use serde_json::{Value, json};
use tracing::{error, warn};

use super::wire::*;
use super::{AppState, Route};
use crate::auth_guard::{AuthRefusal, authenticate};
use crate::metrics::Allocation;

pub(super) static NODE_GET: Route =
    Route::legacy("/Node/get", &[param("key"), param("ver"), param("arch"), param("count"), param("flavor")], || {
        get(node_get)
    });
pub(super) static NODE_DONE: Route = Route::legacy("/Node/done", &[param("key"), param("ssid")], || get(node_done));
pub(super) static NODE_FAIL: Route = Route::legacy("/Node/fail", &[param("key"), param("ssid")], || get(node_fail));
pub(super) static INVENTORY: Route = Route::legacy("/Inventory", KEY_ONLY, || get(inventory));
pub(super) static HELP_ROUTE: Route = Route::legacy("/Help", KEY_ONLY, || get(help));

fn parse_request(q: &Query) -> Result<NodeRequest, Reply> {
    let bad = |m: String| Reply::message(StatusCode::BAD_REQUEST, m);
    let mut req = node_request(q.get("ver"), q.get("arch"), q.get("flavor"), None).map_err(bad)?;
    req.count = match q.get("count") {
        None => None,
        Some(c) => match c.parse::<u32>() {
            Ok(n) if n >= 1 => Some(n),
            _ => {
                let shown: String = c.chars().take(40).collect();
                return Err(bad(format!("invalid count {shown:?}: must be a whole number of at least 1")));
            }
        },
    };
    Ok(req)
}

/// `/Node/get?key=K[&ver=7][&arch=x86_64][&count=1][&flavor=F]`
async fn node_get(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    RawQuery(raw): RawQuery,
) -> Result<Reply, Reply> {
    let q = query(&st, &NODE_GET, raw.as_deref())?;
    let key = q.key()?;
    let req = parse_request(&q).inspect_err(|_| st.metrics.allocation(Allocation::Invalid, 0))?;
    let who = authenticate(&st, peer, key).await.map_err(|refusal| match refusal {
        AuthRefusal::Invalid => Reply::Text(StatusCode::OK, INVALID_KEY.into()),
        AuthRefusal::Limited => Reply::Text(StatusCode::TOO_MANY_REQUESTS, LOOKUPS_LIMITED.into()),
        AuthRefusal::Failed(e) => unexpected("authentication", &e),
    })?;
    let count = req.count.unwrap_or(1) as usize;
    let a = st.engine.get_nodes(&who, &req).await.map_err(|e| allocation_error(&st, e))?;
    st.metrics.allocation(Allocation::Allocated, count);
    Ok(Reply::Json(StatusCode::OK, json!({ "hosts": a.hosts, "ssid": a.session.0 })))
}

/// The outcome under which a refused allocation is counted (the legacy
/// endpoint and `/api/v1` count the same way).
pub(super) fn refusal_outcome(e: &EngineError) -> Allocation {
    match e {
        EngineError::InsufficientNodes { .. } => Allocation::Insufficient,
        EngineError::RateLimited { .. } => Allocation::RateLimited,
        EngineError::QuotaExceeded { .. } => Allocation::Quota,
        EngineError::PreparationFailed { .. } => Allocation::PreparationFailed,
        EngineError::Paused => Allocation::Paused,
        EngineError::ProjectUnusable { .. } | EngineError::NoSuchPool { .. } | EngineError::InvalidRequest(_) => {
            Allocation::Invalid
        }
        _ => Allocation::Error,
    }
}

/// The answer to a refused allocation, counted by outcome.
fn allocation_error(st: &AppState, e: EngineError) -> Reply {
    st.metrics.allocation(refusal_outcome(&e), 0);
    match e {
        EngineError::InsufficientNodes { .. } => {
            Reply::Text(StatusCode::OK, "Insufficient Nodes in READY State".into())
        }
        e @ EngineError::RateLimited { .. } => {
            Reply::message(StatusCode::TOO_MANY_REQUESTS, format!("Failed to allocate nodes: {e}"))
        }
        e @ EngineError::QuotaExceeded { .. } => {
            Reply::message(StatusCode::FORBIDDEN, format!("Failed to allocate nodes: {e}"))
        }
        e @ EngineError::ProjectUnusable { .. } => {
            Reply::message(StatusCode::BAD_REQUEST, format!("Failed to allocate nodes: {e}"))
        }
        EngineError::PreparationFailed { hostname, reason } => {
            warn!(node = %hostname, %reason, "allocation failed while preparing nodes");
            Reply::message(StatusCode::OK, "Failed to allocate nodes")
        }
        // Not a server error: the service is deliberately refusing.
        EngineError::Paused => {
            Reply::message(StatusCode::CONFLICT, "Failed to allocate nodes: the service is paused; try again later")
        }
        e @ (EngineError::NoSuchPool { .. } | EngineError::InvalidRequest(_)) => {
            Reply::message(StatusCode::BAD_REQUEST, format!("Failed to allocate nodes: {e}"))
        }
        e => unexpected("allocation", &e),
    }
}

/// Key and ssid of `/Node/done` and `/Node/fail`, key checked first.
async fn session_call(
    st: &AppState,
    route: &Route,
    peer: SocketAddr,
    raw: Option<&str>,
) -> Result<(Principal, String), Reply> {
    let q = query(st, route, raw)?;
    let key = q.key()?;
    let ssid = q.get("ssid").unwrap_or("").to_string();
    let who = authenticate(st, peer, key).await.map_err(|refusal| match refusal {
        AuthRefusal::Invalid => Reply::msg(StatusCode::FORBIDDEN, INVALID_KEY),
        AuthRefusal::Limited => Reply::msg(StatusCode::TOO_MANY_REQUESTS, LOOKUPS_LIMITED),
        AuthRefusal::Failed(e) => unexpected("authentication", &e),
    })?;
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
) -> Result<Reply, Reply> {
    let (who, ssid) = session_call(&st, &NODE_DONE, peer, raw.as_deref()).await?;
    st.engine.done(&who, &ssid).await.map_err(|e| session_error("releasing the session", e))?;
    Ok(Reply::message(StatusCode::OK, "Done"))
}

/// `/Node/fail?key=K&ssid=S`
async fn node_fail(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    RawQuery(raw): RawQuery,
) -> Result<Reply, Reply> {
    let (who, ssid) = session_call(&st, &NODE_FAIL, peer, raw.as_deref()).await?;
    st.engine.fail(&who, &ssid).await.map_err(|e| session_error("failing the session", e))?;
    st.metrics.session_failed();
    Ok(Reply::message(StatusCode::OK, "Done"))
}

/// `/Inventory[?key=K]`
async fn inventory(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    RawQuery(raw): RawQuery,
) -> Result<Reply, Reply> {
    let q = query(&st, &INVENTORY, raw.as_deref())?;
    let Some(key) = q.get("key") else {
        let nodes = st.engine.inventory().await.map_err(|e| unexpected("reading the inventory", &e))?;
        let rows: Vec<InventoryRow<'_>> = nodes.iter().map(InventoryRow).collect();
        let body = serde_json::to_vec(&rows).map_err(|e| {
            error!(error = %e, "encoding the inventory failed");
            Reply::message(StatusCode::INTERNAL_SERVER_ERROR, "encoding the inventory failed")
        })?;
        return Ok(Reply::JsonBytes(StatusCode::OK, body));
    };
    let who = authenticate(&st, peer, key).await.map_err(|refusal| match refusal {
        AuthRefusal::Invalid => Reply::Json(StatusCode::OK, json!([])),
        // Not `[]`: that would tell a job it holds nothing.
        AuthRefusal::Limited => Reply::message(StatusCode::TOO_MANY_REQUESTS, LOOKUPS_LIMITED),
        AuthRefusal::Failed(e) => unexpected("authentication", &e),
    })?;
    let rows = st.engine.inventory_of(&who).await.map_err(|e| unexpected("reading the inventory", &e))?;
    Ok(Reply::Json(StatusCode::OK, Value::Array(rows.into_iter().map(|(h, s)| json!([h, s.0])).collect())))
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
async fn help(State(st): State<AppState>, RawQuery(raw): RawQuery) -> Result<Reply, Reply> {
    query(&st, &HELP_ROUTE, raw.as_deref())?;
    Ok(Reply::Text(StatusCode::OK, HELP.into()))
}
