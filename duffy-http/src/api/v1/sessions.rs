//! Sessions: create (now, or queued with `wait`), list mine, get, extend,
//! release, fail; and the queued requests. Every operation is the
//! engine's (`Engine::create_session`, `get_session`, `list_sessions`,
//! `extend_session`, `done`, `fail`, `queue_status`, `cancel_request`).

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use axum::routing::{get, post};
use duffy_client::wire::{CreateSession, ExtendSession, QueuedRequest, SessionView};
use duffy_core::{
    Created, EngineError, PoolKey, Principal, QueueState, QueueStatus, RequestId, SessionRequest, SessionScope,
};

use super::*;
use crate::api::legacy::refusal_outcome;
use crate::api::wire::{node_request, param};
use crate::metrics::Allocation;

pub(in crate::api) static SESSIONS: Route =
    Route::v1("/api/v1/sessions", &["GET", "POST"], &[param("project"), param("all")], || {
        methods(get(list).post(create))
    });
pub(in crate::api) static SESSION: Route = Route::v1("/api/v1/sessions/{id}", &["GET"], &[], || methods(get(show)));
pub(in crate::api) static SESSION_EXTEND: Route =
    Route::v1("/api/v1/sessions/{id}/extend", &["POST"], &[], || methods(post(extend)));
pub(in crate::api) static SESSION_RELEASE: Route =
    Route::v1("/api/v1/sessions/{id}/release", &["POST"], &[], || methods(post(release)));
pub(in crate::api) static SESSION_FAIL: Route =
    Route::v1("/api/v1/sessions/{id}/fail", &["POST"], &[], || methods(post(fail)));
pub(in crate::api) static REQUEST: Route =
    Route::v1("/api/v1/requests/{id}", &["GET", "DELETE"], &[], || methods(get(show_request).delete(cancel_request)));

/// The engine's request for a body: a pool written whole (the core's
/// `PoolKey::from_str`), or its parts checked by the rules the legacy
/// endpoint uses.
fn session_request(req: &CreateSession) -> Result<SessionRequest, ApiError> {
    let pool = match &req.pool {
        Some(pool) => {
            if req.release.is_some() || req.arch.is_some() || req.flavor.is_some() {
                return Err(ApiError::bad_request(
                    "give either \"pool\" (release/arch[/flavor]) or \"release\", \"arch\" and \"flavor\", not both",
                ));
            }
            pool.parse::<PoolKey>().map_err(|e| ApiError::bad_request(e.to_string()))?
        }
        None => node_request(req.release.as_deref(), req.arch.as_deref(), req.flavor.as_deref(), None)
            .map_err(ApiError::bad_request)?
            .pool(),
    };
    if req.lifetime_secs == Some(0) {
        return Err(ApiError::bad_request("lifetime_secs must be at least 1"));
    }
    Ok(SessionRequest {
        pool,
        count: req.count.unwrap_or(1),
        lifetime: req.lifetime_secs.map(Duration::from_secs),
        wait: req.wait.unwrap_or(false),
    })
}

/// A session as the API shows it.
pub(super) fn session_view(st: &AppState, v: duffy_core::SessionView) -> SessionView {
    let s = v.session;
    let max_until = s.max_until(st.engine.policy().max_lifetime);
    SessionView {
        id: s.id.0,
        project: s.project,
        state: s.state.as_str().to_string(),
        pool: s.pool.to_string(),
        hosts: v.hosts,
        created_at: time(s.created_at),
        delivered_at: time_opt(s.delivered_at),
        lease_until: time_opt(s.lease_until),
        expires_at: time_opt(s.expires_at),
        max_until: time_opt(max_until),
        hold_until: time_opt(s.hold_until),
        ended_at: time_opt(s.ended_at),
        end_reason: s.end_reason,
    }
}

/// A queued request as the API shows it; a served one with its session.
async fn queued_view(st: &AppState, who: &Principal, q: QueueStatus) -> Result<QueuedRequest, ApiError> {
    let wait_until = Some(time(q.enqueued_at.plus(st.engine.policy().max_wait)));
    let mut out = QueuedRequest {
        id: q.id.0.clone(),
        state: String::new(),
        pool: q.pool.to_string(),
        count: q.count,
        position: None,
        estimated_wait_secs: None,
        wait_until: None,
        session: None,
        reason: None,
    };
    match q.state {
        QueueState::Waiting { position, estimated_wait } => {
            out.state = "waiting".into();
            out.position = Some(u32::try_from(position).unwrap_or(u32::MAX));
            out.estimated_wait_secs = estimated_wait.map(|d| d.as_secs());
            out.wait_until = wait_until;
        }
        QueueState::Served { session } => {
            out.state = "served".into();
            let v = st.engine.get_session(who, &session.0).await.map_err(|e| refusal("reading the session", e))?;
            out.session = Some(session_view(st, v));
        }
        QueueState::Failed { reason } => {
            out.state = "failed".into();
            out.reason = Some(reason);
        }
        QueueState::Cancelled => out.state = "cancelled".into(),
        QueueState::Dropped { reason } => {
            out.state = "dropped".into();
            out.reason = Some(reason);
        }
    }
    Ok(out)
}

/// The problem for a refused allocation, with the pool's Ready count and,
/// when the pool is short, when enough nodes should be Ready.
async fn allocation_refused(st: &AppState, pool: &PoolKey, e: EngineError) -> ApiError {
    st.metrics.allocation(refusal_outcome(&e), 0);
    let requested = match &e {
        EngineError::InsufficientNodes { requested, .. } => Some(*requested),
        _ => None,
    };
    let mut p = refusal("allocation", e);
    if let Some(needed) = requested {
        // Best effort: the refusal stands without its estimate.
        if let Ok(Some(d)) = st.engine.estimate_ready(pool, needed).await {
            p.0.estimated_ready_in_secs = Some(d.as_secs());
        }
    }
    p
}

/// `GET /api/v1/sessions[?project=P|?all=true]`: the caller's live
/// sessions; an admin key may ask for a project's or everyone's.
#[utoipa::path(get, path = "/api/v1/sessions", tag = "sessions",
    params(
        ("project" = Option<String>, Query, description = "Admin keys: this project's live sessions instead"),
        ("all" = Option<bool>, Query, description = "Admin keys: every live session instead"),
    ),
    responses((status = 200, description = "Live sessions (Allocating, Prod, Fail), oldest first", body = [SessionView])))]
async fn list(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let (who, q) = caller(&st, peer, &headers, raw.as_deref(), &SESSIONS).await?;
    let all = match q.get("all") {
        None | Some("false") => false,
        Some("true") => true,
        Some(v) => {
            let shown: String = v.chars().take(40).collect();
            return Err(ApiError::bad_request(format!("invalid all {shown:?}: true or false")));
        }
    };
    let scope = match (q.get("project"), all) {
        (Some(_), true) => return Err(ApiError::bad_request("give project or all, not both")),
        (Some(p), false) => SessionScope::Project(p.to_string()),
        (None, true) => SessionScope::All,
        (None, false) => SessionScope::Mine,
    };
    let list = st.engine.list_sessions(&who, &scope).await.map_err(|e| refusal("listing sessions", e))?;
    ok(&list.into_iter().map(|v| session_view(&st, v)).collect::<Vec<_>>())
}

/// `POST /api/v1/sessions`: nodes of a pool for a new session.
#[utoipa::path(post, path = "/api/v1/sessions", tag = "sessions", request_body = CreateSession,
    responses(
        (status = 201, description = "Nodes handed over", body = SessionView),
        (status = 202, description = "Queued (with \"wait\"): poll the request", body = duffy_client::wire::QueuedRequest),
    ))]
async fn create(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    let (who, _) = caller(&st, peer, &headers, raw.as_deref(), &SESSIONS).await?;
    let req: CreateSession = body(&bytes)?;
    let req = session_request(&req).inspect_err(|_| st.metrics.allocation(Allocation::Invalid, 0))?;
    let created = match st.engine.create_session(&who, &req).await {
        Ok(c) => c,
        Err(e) => return Err(allocation_refused(&st, &req.pool, e).await),
    };
    let (mut r, location) = match created {
        Created::Session(v) => {
            st.metrics.allocation(Allocation::Allocated, v.hosts.len());
            let view = session_view(&st, v);
            let location = format!("/api/v1/sessions/{}", view.id);
            (json(StatusCode::CREATED, &view)?, location)
        }
        Created::Queued(q) => {
            let view = queued_view(&st, &who, q).await?;
            let location = format!("/api/v1/requests/{}", view.id);
            (json(StatusCode::ACCEPTED, &view)?, location)
        }
    };
    if let Ok(v) = HeaderValue::from_str(&location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    Ok(r)
}

/// `GET /api/v1/sessions/{id}`.
#[utoipa::path(get, path = "/api/v1/sessions/{id}", tag = "sessions",
    params(("id" = String, Path, description = "The session id")),
    responses((status = 200, description = "The session", body = SessionView)))]
async fn show(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let (who, _) = caller(&st, peer, &headers, raw.as_deref(), &SESSION).await?;
    let v = st.engine.get_session(&who, &id).await.map_err(|e| refusal("reading the session", e))?;
    ok(&session_view(&st, v))
}

/// `POST /api/v1/sessions/{id}/extend`.
#[utoipa::path(post, path = "/api/v1/sessions/{id}/extend", tag = "sessions",
    params(("id" = String, Path, description = "The session id")),
    request_body = ExtendSession,
    responses((status = 200, description = "The session with its new expiry (at most max_until)", body = SessionView)))]
async fn extend(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    let (who, _) = caller(&st, peer, &headers, raw.as_deref(), &SESSION_EXTEND).await?;
    let req: ExtendSession = body(&bytes)?;
    let by = match req.by_secs {
        None => st.engine.policy().lease,
        Some(0) => return Err(ApiError::bad_request("by_secs must be at least 1")),
        Some(s) => Duration::from_secs(s),
    };
    let v = st.engine.extend_session(&who, &id, by).await.map_err(|e| refusal("extending the session", e))?;
    ok(&session_view(&st, v))
}

/// `POST /api/v1/sessions/{id}/release`.
#[utoipa::path(post, path = "/api/v1/sessions/{id}/release", tag = "sessions",
    params(("id" = String, Path, description = "The session id")),
    responses((status = 200, description = "Released: the nodes go back to be reinstalled", body = SessionView)))]
async fn release(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    let (who, _) = caller(&st, peer, &headers, raw.as_deref(), &SESSION_RELEASE).await?;
    no_fields(&bytes)?;
    let v = st.engine.release_session(&who, &id).await.map_err(|e| refusal("releasing the session", e))?;
    ok(&session_view(&st, v))
}

/// `POST /api/v1/sessions/{id}/fail`.
#[utoipa::path(post, path = "/api/v1/sessions/{id}/fail", tag = "sessions",
    params(("id" = String, Path, description = "The session id")),
    responses((status = 200, description = "Failed: the nodes are held for debugging until hold_until", body = SessionView)))]
async fn fail(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    let (who, _) = caller(&st, peer, &headers, raw.as_deref(), &SESSION_FAIL).await?;
    no_fields(&bytes)?;
    let v = st.engine.fail_session(&who, &id).await.map_err(|e| refusal("failing the session", e))?;
    st.metrics.session_failed();
    ok(&session_view(&st, v))
}

/// `GET /api/v1/requests/{id}`: a queued request.
#[utoipa::path(get, path = "/api/v1/requests/{id}", tag = "sessions",
    params(("id" = String, Path, description = "The request id")),
    responses((status = 200, description = "The request: waiting (position, estimate), or served (its session)", body = duffy_client::wire::QueuedRequest)))]
async fn show_request(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let (who, _) = caller(&st, peer, &headers, raw.as_deref(), &REQUEST).await?;
    let q = st.engine.queue_status(&who, &RequestId(id)).await.map_err(|e| refusal("reading the request", e))?;
    ok(&queued_view(&st, &who, q).await?)
}

/// `DELETE /api/v1/requests/{id}`: stops waiting.
#[utoipa::path(delete, path = "/api/v1/requests/{id}", tag = "sessions",
    params(("id" = String, Path, description = "The request id")),
    responses((status = 200, description = "Cancelled", body = duffy_client::wire::QueuedRequest)))]
async fn cancel_request(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let (who, _) = caller(&st, peer, &headers, raw.as_deref(), &REQUEST).await?;
    let q = st.engine.cancel_request(&who, &RequestId(id)).await.map_err(|e| refusal("cancelling the request", e))?;
    ok(&queued_view(&st, &who, q).await?)
}
