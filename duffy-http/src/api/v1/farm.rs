//! The farm as callers see it: nodes (with filters), one node with its
//! history, pools; and the admin operations on one node.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::{get, post};
use duffy_client::wire::{EventView, NodeDetail, NodeView, PoolView};
use duffy_core::{Actor, Event, Node, NodeState, Principal, SessionId};

use super::*;
use crate::api::wire::{check_hostname, param};

pub(in crate::api) static NODES: Route =
    Route::v1("/api/v1/nodes", &["GET"], &[param("state"), param("pool")], || methods(get(list_nodes)));
pub(in crate::api) static NODE: Route =
    Route::v1("/api/v1/nodes/{hostname}", &["GET"], &[], || methods(get(show_node)));
pub(in crate::api) static NODE_SET_ADMIN: Route =
    Route::v1("/api/v1/nodes/{hostname}/set-admin", &["POST"], &[], || methods(post(set_admin)));
pub(in crate::api) static NODE_RECOVER: Route =
    Route::v1("/api/v1/nodes/{hostname}/recover", &["POST"], &[], || methods(post(recover)));
pub(in crate::api) static POOLS: Route = Route::v1("/api/v1/pools", &["GET"], &[], || methods(get(pools)));

/// How many events `GET /api/v1/nodes/{hostname}` shows at most: by
/// default, and the most `limit` may ask for (the engine's page).
pub const NODE_EVENTS: usize = 100;
/// The most `limit` may ask for.
pub const NODE_EVENTS_MAX: usize = 1000;

/// Which sessions a caller may see named: an admin key all of them, any
/// other key its own live ones.
enum Visible {
    All,
    Own(HashSet<SessionId>),
}

impl Visible {
    async fn of(st: &AppState, who: &Principal) -> Result<Visible, ApiError> {
        if who.admin {
            return Ok(Visible::All);
        }
        let live = st.engine.store().live_sessions().await.map_err(|e| store_failed("reading sessions", e))?;
        Ok(Visible::Own(live.into_iter().filter(|s| Some(s.key_id) == who.key_id).map(|s| s.id).collect()))
    }

    fn show(&self, s: Option<&SessionId>) -> Option<String> {
        let s = s?;
        match self {
            Visible::All => Some(s.0.clone()),
            Visible::Own(own) => own.contains(s).then(|| s.0.clone()),
        }
    }
}

fn node_view(n: &Node, visible: &Visible) -> NodeView {
    NodeView {
        id: n.id.0,
        hostname: n.hostname.clone(),
        ip: n.ip.clone(),
        chassis: n.chassis.clone(),
        arch: n.hardware_arch.as_str().to_string(),
        flavor: n.flavor.clone(),
        state: n.state.as_str().to_string(),
        state_since: time(n.state_since),
        pool: n.image.as_ref().map(ToString::to_string),
        used_count: n.used_count,
        session: visible.show(n.session.as_ref()),
        installed_at: time_opt(n.installed_at),
        hold_until: time_opt(n.hold_until),
        fail_reason: n.fail_reason.clone(),
        power: n.power.as_str().to_string(),
    }
}

fn event_view(e: &Event, visible: &Visible) -> EventView {
    let actor = match (&e.actor, visible) {
        (Actor::Key(id), Visible::All) => format!("key:{id}"),
        (Actor::Key(_), Visible::Own(_)) => "key".to_string(),
        (a, _) => a.to_string(),
    };
    EventView {
        seq: e.seq,
        at: time(e.at),
        from: e.from.as_str().to_string(),
        to: e.to.as_str().to_string(),
        cause: e.cause.as_str().to_string(),
        detail: e.detail.clone(),
        actor,
        session: visible.show(e.session.as_ref()),
    }
}

/// `GET /api/v1/nodes[?state=S][&pool=P]`.
#[utoipa::path(get, path = "/api/v1/nodes", tag = "farm",
    params(
        ("state" = Option<String>, Query, description = "Only nodes in this state (Active, Provisioning, Ready, Contextualizing, Deployed, Failed, Reserved)"),
        ("pool" = Option<String>, Query, description = "Only nodes carrying this pool's image, release/arch[/flavor]"),
    ),
    responses((status = 200, description = "The nodes, by id", body = [NodeView])))]
async fn list_nodes(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let (who, q) = caller(&st, peer, &headers, raw.as_deref(), &NODES).await?;
    let state = match q.get("state") {
        None => None,
        Some(s) => Some(s.parse::<NodeState>().map_err(|_| {
            let shown: String = s.chars().take(40).collect();
            ApiError::bad_request(format!("unknown state {shown:?}"))
                .allowing(NodeState::ALL.iter().map(|s| s.as_str()))
        })?),
    };
    let pool = q.get("pool");
    let visible = Visible::of(&st, &who).await?;
    let nodes = st.engine.inventory().await.map_err(|e| unexpected("reading the nodes", &e))?;
    let out: Vec<NodeView> = nodes
        .iter()
        .filter(|n| state.is_none_or(|s| n.state == s))
        .filter(|n| pool.is_none_or(|p| n.image.as_ref().is_some_and(|i| i.to_string() == p)))
        .map(|n| node_view(n, &visible))
        .collect();
    ok(&out)
}

/// `GET /api/v1/nodes/{hostname}[?after_seq=N][&limit=N]`.
#[utoipa::path(get, path = "/api/v1/nodes/{hostname}", tag = "farm",
    params(
        ("hostname" = String, Path, description = "The node's host name"),
        ("after_seq" = Option<u64>, Query, description = "Only events after this one (default 0: from the first)"),
        ("limit" = Option<u32>, Query, description = "At most this many events, 1 to 1000 (default 100)"),
    ),
    responses((status = 200, description = "The node and a page of its history, oldest first", body = NodeDetail)))]
async fn show_node(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(hostname): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let (who, q) = caller(&st, peer, &headers, raw.as_deref(), &NODE).await?;
    let number = |name: &str, default: u64, max: u64| -> Result<u64, ApiError> {
        match q.get(name) {
            None => Ok(default),
            Some(v) => v.parse::<u64>().ok().filter(|n| *n <= max && (name != "limit" || *n >= 1)).ok_or_else(|| {
                let shown: String = v.chars().take(40).collect();
                let range = if name == "limit" { format!("1 to {max}") } else { format!("0 to {max}") };
                ApiError::bad_request(format!("invalid {name} {shown:?}: a whole number, {range}"))
            }),
        }
    };
    let after_seq = number("after_seq", 0, i64::MAX as u64)?;
    let limit = number("limit", NODE_EVENTS as u64, NODE_EVENTS_MAX as u64)? as usize;
    check_node_name(&hostname)?;
    let (n, events) =
        st.engine.node_history(&hostname, after_seq, limit).await.map_err(|e| refusal("reading the node", e))?;
    let visible = Visible::of(&st, &who).await?;
    let events = events.iter().map(|e| event_view(e, &visible)).collect();
    ok(&NodeDetail { node: node_view(&n, &visible), events })
}

fn check_node_name(hostname: &str) -> Result<(), ApiError> {
    check_hostname(hostname).map_err(|r| match r {
        Reply::Json(_, serde_json::Value::String(m)) => ApiError::bad_request(m),
        _ => ApiError::bad_request("invalid node name"),
    })
}

/// `POST /api/v1/nodes/{hostname}/set-admin` (admin).
#[utoipa::path(post, path = "/api/v1/nodes/{hostname}/set-admin", tag = "admin",
    params(("hostname" = String, Path, description = "The node's host name")),
    responses((status = 200, description = "The node, Reserved (out of the pool)", body = NodeView)))]
async fn set_admin(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(hostname): Path<String>,
    RawQuery(raw): RawQuery,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    let (who, _) = admin_caller(&st, peer, &headers, raw.as_deref(), &NODE_SET_ADMIN).await?;
    no_fields(&bytes)?;
    check_node_name(&hostname)?;
    let n = st.engine.set_admin(&who, &hostname).await.map_err(|e| refusal("setting admin downtime", e))?;
    ok(&node_view(&n, &Visible::All))
}

/// `POST /api/v1/nodes/{hostname}/recover` (admin).
#[utoipa::path(post, path = "/api/v1/nodes/{hostname}/recover", tag = "admin",
    params(("hostname" = String, Path, description = "The node's host name")),
    responses((status = 200, description = "The node, Active (to be reinstalled)", body = NodeView)))]
async fn recover(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(hostname): Path<String>,
    RawQuery(raw): RawQuery,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    let (who, _) = admin_caller(&st, peer, &headers, raw.as_deref(), &NODE_RECOVER).await?;
    no_fields(&bytes)?;
    check_node_name(&hostname)?;
    let n = st.engine.recover(&who, &hostname).await.map_err(|e| refusal("recovering the node", e))?;
    ok(&node_view(&n, &Visible::All))
}

/// `GET /api/v1/pools`.
#[utoipa::path(get, path = "/api/v1/pools", tag = "farm",
    responses((status = 200, description = "Every pool with a standby target", body = [PoolView])))]
async fn pools(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    caller(&st, peer, &headers, raw.as_deref(), &POOLS).await?;
    let pools = st.engine.pools().await.map_err(|e| refusal("reading the pools", e))?;
    let out: Vec<PoolView> = pools
        .into_iter()
        .map(|p| {
            // Every state named, zeros included, so that a table's
            // columns do not come and go.
            let nodes: BTreeMap<String, u32> = NodeState::ALL
                .iter()
                .map(|s| (s.as_str().to_string(), p.counts.get(s).copied().unwrap_or(0)))
                .collect();
            PoolView {
                pool: p.pool.to_string(),
                release: p.pool.release.clone(),
                arch: p.pool.arch.as_str().to_string(),
                flavor: p.pool.flavor.clone(),
                standby: p.standby,
                ready: p.counts.get(&NodeState::Ready).copied().unwrap_or(0),
                nodes,
                estimated_next_ready_in_secs: p.estimated_ready.map(|d| d.as_secs()),
                waiting: p.waiting,
            }
        })
        .collect();
    ok(&out)
}
