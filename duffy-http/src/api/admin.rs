//! The admin endpoints (an admin key): `/Overtime`, `/NodeSetAdmin`,
//! `/NodeRecover`, `/PauseService`, `/ResumeService`.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Path, RawQuery, State};
use axum::http::StatusCode;
use axum::routing::get;
use duffy_core::{EngineError, Node, Principal};
use serde_json::{Value, json};

use super::wire::*;
use super::{AppState, Route};
use crate::auth_guard::{AuthRefusal, authenticate};

pub(super) static OVERTIME: Route = Route::admin("/Overtime", || get(overtime));
pub(super) static NODE_SET_ADMIN: Route = Route::admin("/NodeSetAdmin/{node}", || get(node_set_admin));
pub(super) static NODE_RECOVER: Route = Route::admin("/NodeRecover/{node}", || get(node_recover));
pub(super) static PAUSE: Route = Route::admin("/PauseService", || get(pause));
pub(super) static RESUME: Route = Route::admin("/ResumeService", || get(resume));

/// Authenticates an admin call.
async fn admin(st: &AppState, route: &Route, peer: SocketAddr, raw: Option<&str>) -> Result<Principal, Reply> {
    let q = query(st, route, raw)?;
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
) -> Result<Reply, Reply> {
    let who = admin(&st, &OVERTIME, peer, raw.as_deref()).await?;
    let list = st.engine.overtime(&who).await.map_err(|e| admin_error("listing overtime", e))?;
    Ok(Reply::Json(
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
    ))
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
) -> Result<Reply, Reply> {
    let who = admin(&st, &NODE_SET_ADMIN, peer, raw.as_deref()).await?;
    check_hostname(&node)?;
    let n = st.engine.set_admin(&who, &node).await.map_err(|e| admin_error("setting admin downtime", e))?;
    Ok(node_reply(&n))
}

/// `/NodeRecover/<node>?key=ADMIN`
async fn node_recover(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(node): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Reply, Reply> {
    let who = admin(&st, &NODE_RECOVER, peer, raw.as_deref()).await?;
    check_hostname(&node)?;
    let n = st.engine.recover(&who, &node).await.map_err(|e| admin_error("recovering the node", e))?;
    Ok(node_reply(&n))
}

/// `/PauseService?key=ADMIN`
async fn pause(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    RawQuery(raw): RawQuery,
) -> Result<Reply, Reply> {
    let who = admin(&st, &PAUSE, peer, raw.as_deref()).await?;
    st.engine.pause(&who).await.map_err(|e| admin_error("pausing", e))?;
    Ok(Reply::message(StatusCode::OK, "Done"))
}

/// `/ResumeService?key=ADMIN`
async fn resume(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    RawQuery(raw): RawQuery,
) -> Result<Reply, Reply> {
    let who = admin(&st, &RESUME, peer, raw.as_deref()).await?;
    st.engine.resume(&who).await.map_err(|e| admin_error("resuming", e))?;
    Ok(Reply::message(StatusCode::OK, "Done"))
}
