//! The admin endpoints (an admin key): `/Overtime`, `/NodeSetAdmin`,
//! `/NodeRecover`, `/PauseService`, `/ResumeService`.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Path, RawQuery, State};
use axum::http::StatusCode;
use duffy_core::{EngineError, Node, Principal};
use serde_json::{Value, json};

use super::AppState;
use super::wire::*;
use crate::auth_guard::{AuthRefusal, authenticate};

pub(super) const OVERTIME: Spec = legacy("/Overtime", KEY_ONLY);
pub(super) const NODE_SET_ADMIN: Spec = legacy("/NodeSetAdmin", KEY_ONLY);
pub(super) const NODE_RECOVER: Spec = legacy("/NodeRecover", KEY_ONLY);
pub(super) const PAUSE: Spec = legacy("/PauseService", KEY_ONLY);
pub(super) const RESUME: Spec = legacy("/ResumeService", KEY_ONLY);

/// Authenticates an admin call.
pub(super) async fn admin(st: &AppState, spec: &Spec, peer: SocketAddr, raw: Option<&str>) -> Result<Principal, Reply> {
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

pub(super) fn admin_error(what: &str, e: EngineError) -> Reply {
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
pub(super) async fn overtime(
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

pub(super) fn node_reply(n: &Node) -> Reply {
    Reply::Json(StatusCode::OK, json!({ "hostname": n.hostname, "state": n.state.as_str() }))
}

/// `/NodeSetAdmin/<node>?key=ADMIN`
pub(super) async fn node_set_admin(
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
pub(super) async fn node_recover(
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
pub(super) async fn pause(
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
pub(super) async fn resume(
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
