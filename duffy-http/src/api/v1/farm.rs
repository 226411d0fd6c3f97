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
use duffy_core::{Actor, Event, EventQuery, Node, NodeState, Principal, SessionId};

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

/// How many of a node's latest events `GET /api/v1/nodes/{hostname}`
/// shows.
pub const NODE_EVENTS: usize = 100;

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
        cause: format!("{:?}", e.cause),
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
    let who = caller(&st, peer, &headers, raw.as_deref()).await?;
    let q = params(&st, &NODES, raw.as_deref())?;
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

/// `GET /api/v1/nodes/{hostname}`.
#[utoipa::path(get, path = "/api/v1/nodes/{hostname}", tag = "farm",
    params(("hostname" = String, Path, description = "The node's host name")),
    responses((status = 200, description = "The node and its latest events", body = NodeDetail)))]
async fn show_node(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(hostname): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let who = caller(&st, peer, &headers, raw.as_deref()).await?;
    params(&st, &NODE, raw.as_deref())?;
    let n = find_node(&st, &hostname).await?;
    let visible = Visible::of(&st, &who).await?;
    let events = st
        .engine
        .store()
        .events(EventQuery { node: Some(n.id), after_seq: 0, limit: 0 })
        .await
        .map_err(|e| store_failed("reading the node's events", e))?;
    let skip = events.len().saturating_sub(NODE_EVENTS);
    let events = events[skip..].iter().map(|e| event_view(e, &visible)).collect();
    ok(&NodeDetail { node: node_view(&n, &visible), events })
}

async fn find_node(st: &AppState, hostname: &str) -> Result<Node, ApiError> {
    check_hostname(hostname).map_err(|r| match r {
        Reply::Json(_, serde_json::Value::String(m)) => ApiError::bad_request(m),
        _ => ApiError::bad_request("invalid node name"),
    })?;
    st.engine
        .store()
        .node_by_hostname(hostname)
        .await
        .map_err(|e| store_failed("reading the node", e))?
        .ok_or_else(|| ApiError::not_found(format!("no node named {hostname:?}")))
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
    let who = admin_caller(&st, peer, &headers, raw.as_deref()).await?;
    params(&st, &NODE_SET_ADMIN, raw.as_deref())?;
    no_fields(&bytes)?;
    find_node(&st, &hostname).await?;
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
    let who = admin_caller(&st, peer, &headers, raw.as_deref()).await?;
    params(&st, &NODE_RECOVER, raw.as_deref())?;
    no_fields(&bytes)?;
    find_node(&st, &hostname).await?;
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
    caller(&st, peer, &headers, raw.as_deref()).await?;
    params(&st, &POOLS, raw.as_deref())?;
    let store = st.engine.store();
    let targets = store.pool_targets().await.map_err(|e| store_failed("reading the pools", e))?;
    let nodes = st.engine.inventory().await.map_err(|e| unexpected("reading the nodes", &e))?;
    let out: Vec<PoolView> = targets
        .into_iter()
        .filter(|t| t.standby > 0)
        .map(|t| {
            let mut counts: BTreeMap<String, u32> =
                NodeState::ALL.iter().map(|s| (s.as_str().to_string(), 0)).collect();
            for n in nodes.iter().filter(|n| n.image.as_ref() == Some(&t.pool)) {
                *counts.entry(n.state.as_str().to_string()).or_default() += 1;
            }
            let ready = counts.get(NodeState::Ready.as_str()).copied().unwrap_or(0);
            PoolView {
                pool: t.pool.to_string(),
                release: t.pool.release.clone(),
                arch: t.pool.arch.as_str().to_string(),
                flavor: t.pool.flavor.clone(),
                standby: t.standby,
                nodes: counts,
                ready,
                estimated_next_ready_in_secs: None,
                waiting: 0,
            }
        })
        .collect();
    ok(&out)
}
