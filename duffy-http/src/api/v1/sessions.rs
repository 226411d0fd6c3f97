//! Sessions: create (now, or queued with `wait`), list mine, get, extend,
//! release, fail; and the queued requests.

use std::net::SocketAddr;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use axum::routing::{get, post};
use duffy_client::wire::{CreateSession, ExtendSession, SessionView};
use duffy_core::{NodeRequest, Principal, Session, SessionId};

use super::*;
use crate::api::legacy::refusal_outcome;
use crate::api::wire::node_request;
use crate::metrics::Allocation;

pub(in crate::api) static SESSIONS: Route =
    Route::v1("/api/v1/sessions", &["GET", "POST"], &[], || methods(get(list).post(create)));
pub(in crate::api) static SESSION: Route = Route::v1("/api/v1/sessions/{id}", &["GET"], &[], || methods(get(show)));
pub(in crate::api) static SESSION_EXTEND: Route =
    Route::v1("/api/v1/sessions/{id}/extend", &["POST"], &[], || methods(post(extend)));
pub(in crate::api) static SESSION_RELEASE: Route =
    Route::v1("/api/v1/sessions/{id}/release", &["POST"], &[], || methods(post(release)));
pub(in crate::api) static SESSION_FAIL: Route =
    Route::v1("/api/v1/sessions/{id}/fail", &["POST"], &[], || methods(post(fail)));
pub(in crate::api) static REQUEST: Route =
    Route::v1("/api/v1/requests/{id}", &["GET", "DELETE"], &[], || methods(get(show_request).delete(cancel_request)));

/// The request for nodes a body asks for: a pool written whole, or its
/// parts, checked by the rules the legacy endpoint uses.
fn node_request_of(req: &CreateSession) -> Result<NodeRequest, ApiError> {
    let (release, arch, flavor) = match &req.pool {
        Some(pool) => {
            if req.release.is_some() || req.arch.is_some() || req.flavor.is_some() {
                return Err(ApiError::bad_request(
                    "give either \"pool\" (release/arch[/flavor]) or \"release\", \"arch\" and \"flavor\", not both",
                ));
            }
            let parts: Vec<&str> = pool.split('/').collect();
            match parts.as_slice() {
                [r, a] => (Some(*r), Some(*a), None),
                [r, a, f] => (Some(*r), Some(*a), Some(*f)),
                _ => {
                    let shown: String = pool.chars().take(80).collect();
                    return Err(ApiError::bad_request(format!(
                        "invalid pool {shown:?}: a pool is written release/arch or release/arch/flavor, e.g. 9/x86_64"
                    )));
                }
            }
        }
        None => (req.release.as_deref(), req.arch.as_deref(), req.flavor.as_deref()),
    };
    node_request(release, arch, flavor, req.count).map_err(ApiError::bad_request)
}

/// A session as the API shows it: the hosts are the nodes it still holds.
pub(super) async fn session_view(st: &AppState, s: &Session) -> Result<SessionView, ApiError> {
    let store = st.engine.store();
    let mut hosts = Vec::with_capacity(s.nodes.len());
    for id in &s.nodes {
        match store.node(*id).await.map_err(|e| store_failed("reading the session's nodes", e))? {
            Some(n) if n.session.as_ref() == Some(&s.id) => hosts.push(n.hostname),
            _ => {}
        }
    }
    Ok(SessionView {
        id: s.id.0.clone(),
        project: s.project.clone(),
        state: s.state.as_str().to_string(),
        pool: s.pool.to_string(),
        hosts,
        created_at: time(s.created_at),
        delivered_at: time_opt(s.delivered_at),
        lease_until: time_opt(s.lease_until),
        expires_at: time_opt(s.lease_until),
        max_until: None,
        hold_until: time_opt(s.hold_until),
        ended_at: time_opt(s.ended_at),
        end_reason: s.end_reason.clone(),
    })
}

/// The session `id` if it is `who`'s: another key's session is answered
/// exactly as an unknown one.
async fn own_session(st: &AppState, who: &Principal, id: &str) -> Result<Session, ApiError> {
    let missing = || ApiError::not_found("no such session for this key");
    if id.is_empty() || id.len() > 128 {
        return Err(missing());
    }
    let s = st
        .engine
        .store()
        .session(&SessionId(id.to_string()))
        .await
        .map_err(|e| store_failed("reading the session", e))?;
    match s {
        Some(s) if Some(s.key_id) == who.key_id => Ok(s),
        _ => Err(missing()),
    }
}

/// `GET /api/v1/sessions`: the caller's live sessions.
#[utoipa::path(get, path = "/api/v1/sessions", tag = "sessions",
    responses((status = 200, description = "This key's live sessions (Allocating, Prod, Fail)", body = [SessionView])))]
async fn list(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let who = caller(&st, peer, &headers, raw.as_deref()).await?;
    params(&st, &SESSIONS, raw.as_deref())?;
    let live = st.engine.store().live_sessions().await.map_err(|e| store_failed("listing sessions", e))?;
    let mut out = Vec::new();
    for s in live.iter().filter(|s| Some(s.key_id) == who.key_id) {
        out.push(session_view(&st, s).await?);
    }
    ok(&out)
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
    let who = caller(&st, peer, &headers, raw.as_deref()).await?;
    params(&st, &SESSIONS, raw.as_deref())?;
    let req: CreateSession = body(&bytes)?;
    let nreq = node_request_of(&req).inspect_err(|_| st.metrics.allocation(Allocation::Invalid, 0))?;
    let count = nreq.count.unwrap_or(1) as usize;
    let a = st.engine.get_nodes(&who, &nreq).await.map_err(|e| {
        st.metrics.allocation(refusal_outcome(&e), 0);
        refusal("allocation", e)
    })?;
    st.metrics.allocation(Allocation::Allocated, count);
    let s = own_session(&st, &who, &a.session.0).await?;
    let view = session_view(&st, &s).await?;
    let mut r = json(StatusCode::CREATED, &view)?;
    if let Ok(v) = HeaderValue::from_str(&format!("/api/v1/sessions/{}", view.id)) {
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
    let who = caller(&st, peer, &headers, raw.as_deref()).await?;
    params(&st, &SESSION, raw.as_deref())?;
    let s = own_session(&st, &who, &id).await?;
    ok(&session_view(&st, &s).await?)
}

/// `POST /api/v1/sessions/{id}/extend`.
#[utoipa::path(post, path = "/api/v1/sessions/{id}/extend", tag = "sessions",
    params(("id" = String, Path, description = "The session id")),
    request_body = ExtendSession,
    responses((status = 200, description = "The session with its new expiry", body = SessionView)))]
async fn extend(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    let who = caller(&st, peer, &headers, raw.as_deref()).await?;
    params(&st, &SESSION_EXTEND, raw.as_deref())?;
    let _req: ExtendSession = body(&bytes)?;
    let s = own_session(&st, &who, &id).await?;
    Err(ApiError::new(
        ProblemType::Conflict,
        StatusCode::CONFLICT,
        format!("session {} cannot be extended: this service has no session lifetimes", s.id),
    ))
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
    let who = caller(&st, peer, &headers, raw.as_deref()).await?;
    params(&st, &SESSION_RELEASE, raw.as_deref())?;
    no_fields(&bytes)?;
    st.engine.done(&who, &id).await.map_err(|e| refusal("releasing the session", e))?;
    let s = own_session(&st, &who, &id).await?;
    ok(&session_view(&st, &s).await?)
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
    let who = caller(&st, peer, &headers, raw.as_deref()).await?;
    params(&st, &SESSION_FAIL, raw.as_deref())?;
    no_fields(&bytes)?;
    st.engine.fail(&who, &id).await.map_err(|e| refusal("failing the session", e))?;
    st.metrics.session_failed();
    let s = own_session(&st, &who, &id).await?;
    ok(&session_view(&st, &s).await?)
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
    let _who = caller(&st, peer, &headers, raw.as_deref()).await?;
    params(&st, &REQUEST, raw.as_deref())?;
    let _ = id;
    Err(ApiError::not_found("no such request for this key"))
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
    let _who = caller(&st, peer, &headers, raw.as_deref()).await?;
    params(&st, &REQUEST, raw.as_deref())?;
    let _ = id;
    Err(ApiError::not_found("no such request for this key"))
}
