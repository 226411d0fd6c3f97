//! `/api/v1`: the JSON API. Sessions (with lifetimes and a wait queue),
//! nodes and their history, pools, and for admin keys projects, keys and
//! the admin operations.
//!
//! The shapes are `duffy_client::wire`'s, defined once for the service and
//! the client; the OpenAPI document (`openapi`, served at
//! `/api/v1/openapi.json`) is generated from them and from the handlers'
//! annotations. Rules every endpoint here follows:
//!
//! - The key comes only in `Authorization: Bearer KEY`, checked by the
//!   same machinery as the legacy endpoints (hashed, compared in constant
//!   time, cached, failed lookups limited per address). `?key=` is
//!   refused with a message saying where the key goes, so a key never
//!   lands in a proxy's access log by way of this API.
//! - Authentication comes before anything else is looked at; a stranger
//!   learns nothing about the request's validity.
//! - Every error is RFC 9457 problem+json with a stable `type`
//!   ([`ProblemType`]); bad input says what was wrong and what is allowed,
//!   and changes nothing. Query parameters an endpoint does not know are
//!   refused; a JSON body with unknown fields is refused.
//! - A key never sees another key's sessions: a foreign session id gets
//!   exactly the answer an unknown one gets, and node views show a
//!   session id only to the key holding it (and to admin keys).
//! - Every operation is the engine's or the operator commands' own (one
//!   definition of each thing); this module only translates.

mod admin;
mod farm;
pub mod openapi;
mod sessions;

use std::net::SocketAddr;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::MethodRouter;
use duffy_client::wire::{PROBLEM_JSON, Problem, ProblemType};
use duffy_core::{EngineError, Principal, SessionTransitionError, Timestamp};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::error;

use super::wire::{Param, Query, STORE_UNAVAILABLE, public_reason, query};
use super::{AppState, Group, Reply, Route};
use crate::auth_guard::{AuthRefusal, authenticate};

pub(super) use admin::{KEY, KEYS, OVERTIME, PAUSE, PROJECT, PROJECTS, RESUME};
pub(super) use farm::{NODE, NODE_RECOVER, NODE_SET_ADMIN, NODES, POOLS};
pub(super) use openapi::OPENAPI;
pub(super) use sessions::{REQUEST, SESSION, SESSION_EXTEND, SESSION_FAIL, SESSION_RELEASE, SESSIONS};

/// Where the API lives.
pub const PREFIX: &str = "/api/v1/";

/// How many routes `/api/v1` has (in `api::ROUTES`).
pub const ROUTE_COUNT: usize = 19;

/// The longest JSON body accepted: the largest legitimate one is a
/// project's SSH keys.
const MAX_BODY: usize = 64 * 1024;

impl Route {
    /// An `/api/v1` endpoint answering `methods`.
    pub(super) const fn v1(
        path: &'static str,
        methods: &'static [&'static str],
        params: &'static [Param],
        handler: fn() -> MethodRouter<AppState>,
    ) -> Route {
        Route { path, group: Group::V1, methods, params, handler }
    }
}

/// A method router for `/api/v1`: the handlers, and a problem+json 405
/// for any other method (axum's own is an empty body).
pub(super) fn methods(router: MethodRouter<AppState>) -> MethodRouter<AppState> {
    router.fallback(|m: Method| async move {
        ApiError::new(
            ProblemType::MethodNotAllowed,
            StatusCode::METHOD_NOT_ALLOWED,
            format!("method {m} is not allowed here; see /api/v1/openapi.json"),
        )
    })
}

/// An `/api/v1` error: a problem, sent as `application/problem+json`
/// (boxed: handlers return it in every `Result`, and it is large).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError(pub Box<Problem>);

impl ApiError {
    /// A problem of `kind` with `status` and `detail`.
    pub fn new(kind: ProblemType, status: StatusCode, detail: impl Into<String>) -> ApiError {
        ApiError(Box::new(Problem::new(kind, status.as_u16(), detail)))
    }

    /// `400 bad_request`.
    pub fn bad_request(detail: impl Into<String>) -> ApiError {
        ApiError::new(ProblemType::BadRequest, StatusCode::BAD_REQUEST, detail)
    }

    /// `404 not_found`.
    pub fn not_found(detail: impl Into<String>) -> ApiError {
        ApiError::new(ProblemType::NotFound, StatusCode::NOT_FOUND, detail)
    }

    /// The same with the allowed values listed.
    fn allowing(mut self, allowed: impl IntoIterator<Item = impl Into<String>>) -> ApiError {
        self.0.allowed = Some(allowed.into_iter().map(Into::into).collect());
        self
    }

    fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.0.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let kind = self.0.kind();
        let body = serde_json::to_vec(&self.0).unwrap_or_else(|_| b"{}".to_vec());
        let mut r = Response::new(Body::from(body));
        *r.status_mut() = status;
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if kind == Some(ProblemType::Unauthorized) {
            r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"duffy\""));
        }
        r
    }
}

/// A JSON answer of `/api/v1`.
pub(super) fn json<T: Serialize>(status: StatusCode, v: &T) -> Result<Response, ApiError> {
    let body = serde_json::to_vec(v).map_err(|e| {
        error!(error = %e, "encoding an answer failed");
        ApiError::new(ProblemType::Internal, StatusCode::INTERNAL_SERVER_ERROR, "encoding the answer failed")
    })?;
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(r)
}

/// `200` with `v`.
pub(super) fn ok<T: Serialize>(v: &T) -> Result<Response, ApiError> {
    json(StatusCode::OK, v)
}

/// The 404 of a path under `/api/v1/` that no route matches.
pub(super) fn no_such_path(path: &str) -> Response {
    ApiError::not_found(format!("no such endpoint {path:?}; see /api/v1/openapi.json")).into_response()
}

/// The caller of an `/api/v1` request and its query string: refuses
/// `?key=`, reads the bearer key and authenticates it, then checks the
/// query string against `route` ([`params`]): a stranger learns nothing
/// about the parameters.
pub(super) async fn caller(
    st: &AppState,
    peer: SocketAddr,
    headers: &HeaderMap,
    raw_query: Option<&str>,
    route: &Route,
) -> Result<(Principal, Query), ApiError> {
    let who = authenticated(st, peer, headers, raw_query).await?;
    Ok((who, params(st, route, raw_query)?))
}

/// [`caller`], who must hold an admin key (checked before the query
/// string).
pub(super) async fn admin_caller(
    st: &AppState,
    peer: SocketAddr,
    headers: &HeaderMap,
    raw_query: Option<&str>,
    route: &Route,
) -> Result<(Principal, Query), ApiError> {
    let who = authenticated(st, peer, headers, raw_query).await?;
    if !who.admin {
        return Err(forbidden());
    }
    Ok((who, params(st, route, raw_query)?))
}

/// Refuses `?key=`, then reads the bearer key and authenticates it.
async fn authenticated(
    st: &AppState,
    peer: SocketAddr,
    headers: &HeaderMap,
    raw_query: Option<&str>,
) -> Result<Principal, ApiError> {
    if let Some(q) = raw_query {
        if form_urlencoded::parse(q.as_bytes()).any(|(k, _)| k.eq_ignore_ascii_case("key")) {
            return Err(ApiError::bad_request(
                "the key goes in the Authorization header (Authorization: Bearer KEY), never in the URL on /api/v1",
            ));
        }
    }
    let unauthorized = |m: &str| ApiError::new(ProblemType::Unauthorized, StatusCode::UNAUTHORIZED, m);
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Err(unauthorized("send your API key as: Authorization: Bearer KEY"));
    };
    let value = value.to_str().map_err(|_| unauthorized("the Authorization header is not text"))?;
    let key = match value.split_once(' ') {
        Some((scheme, key)) if scheme.eq_ignore_ascii_case("bearer") && !key.trim().is_empty() => key.trim(),
        _ => return Err(unauthorized("the Authorization header must be: Bearer KEY")),
    };
    authenticate(st, peer, key).await.map_err(|refusal| match refusal {
        AuthRefusal::Invalid => unauthorized("invalid API key (unknown, revoked or expired)"),
        AuthRefusal::Limited => ApiError::new(
            ProblemType::TooManyInvalidKeys,
            StatusCode::TOO_MANY_REQUESTS,
            "too many invalid API keys from your address; try again in a minute",
        ),
        AuthRefusal::Failed(e) => unexpected("authentication", &e),
    })
}

fn forbidden() -> ApiError {
    ApiError::new(ProblemType::Forbidden, StatusCode::FORBIDDEN, "this call needs an admin key")
}

/// The query string checked against the route: unknown parameters and
/// repeated ones refused.
fn params(st: &AppState, route: &Route, raw: Option<&str>) -> Result<Query, ApiError> {
    query(st, route, raw).map_err(from_reply)
}

/// A legacy-shaped refusal (the shared query-string rules answer in that
/// shape) as a problem.
fn from_reply(r: Reply) -> ApiError {
    let status = r.status_code();
    let detail = match r {
        Reply::Json(_, serde_json::Value::String(s)) | Reply::Text(_, s) => s,
        Reply::Json(_, v) => v.to_string(),
        Reply::JsonBytes(_, b) => String::from_utf8_lossy(&b).into_owned(),
    };
    ApiError::new(ProblemType::BadRequest, status, detail)
}

/// A JSON body of type `T`: an empty body reads as `{}` (every field of
/// the action bodies is optional), anything else must be a JSON object
/// with only the fields `T` knows.
pub(super) fn body<T: DeserializeOwned>(bytes: &Bytes) -> Result<T, ApiError> {
    if bytes.len() > MAX_BODY {
        return Err(ApiError::bad_request(format!("the body is too long (at most {MAX_BODY} bytes)")));
    }
    let text: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) { b"{}" } else { bytes };
    // serde_path_to_error names the field at fault ("count: invalid
    // type…"), which serde_json's own message does not.
    let de = &mut serde_json::Deserializer::from_slice(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let mut msg = e.into_inner().to_string();
        msg.truncate(300);
        let at = if path == "." { String::new() } else { format!(" at {path}") };
        ApiError::bad_request(format!("invalid JSON body{at}: {msg}; see /api/v1/openapi.json for the fields allowed"))
    })
}

/// The body of an action that takes no fields: nothing, or `{}`.
pub(super) fn no_fields(bytes: &Bytes) -> Result<(), ApiError> {
    let m: serde_json::Map<String, serde_json::Value> = body(bytes)?;
    if let Some(k) = m.keys().next() {
        let shown: String = k.chars().take(40).collect();
        return Err(ApiError::bad_request(format!("unknown field {shown:?}: this call takes no fields")));
    }
    Ok(())
}

/// An instant as the API writes it (RFC 3339, milliseconds, `Z`).
pub(super) fn time(t: Timestamp) -> String {
    t.to_string()
}

/// An optional instant.
pub(super) fn time_opt(t: Option<Timestamp>) -> Option<String> {
    t.map(time)
}

/// An error no caller can do anything about but retry: the log gets the
/// details, the answer never carries a store's own words.
pub(super) fn unexpected(what: &str, e: &EngineError) -> ApiError {
    error!(error = %e, "{what} failed");
    let kind = match e {
        EngineError::Store(_) | EngineError::Contention(_) => ProblemType::Unavailable,
        _ => ProblemType::Internal,
    };
    let status = if kind == ProblemType::Unavailable {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::INTERNAL_SERVER_ERROR
    };
    ApiError::new(kind, status, format!("{what} failed: {}; try again", public_reason(e)))
}

/// A store read that failed.
pub(super) fn store_failed(what: &str, e: duffy_core::StoreError) -> ApiError {
    error!(error = %e, "{what} failed");
    let reason = match &e {
        duffy_core::StoreError::Unavailable { fault, .. } => format!("{STORE_UNAVAILABLE}: {fault}"),
        _ => STORE_UNAVAILABLE.to_string(),
    };
    ApiError::new(
        ProblemType::Unavailable,
        StatusCode::SERVICE_UNAVAILABLE,
        format!("{what} failed: {reason}; try again"),
    )
}

/// The problem for an engine refusal: its stable type, a status, and the
/// engine's words (which are written for callers); anything unexpected
/// goes through [`unexpected`].
pub(super) fn refusal(what: &str, e: EngineError) -> ApiError {
    use ProblemType as P;
    let (kind, status) = match &e {
        EngineError::InvalidKey => (P::Unauthorized, StatusCode::UNAUTHORIZED),
        EngineError::NotAdmin => return forbidden(),
        EngineError::InvalidSession => return ApiError::not_found("no such session for this key"),
        EngineError::UnknownNode(h) => return ApiError::not_found(format!("no node named {h:?}")),
        EngineError::InsufficientNodes { requested, available } => {
            // 409, not 503: the service is working as it should, the
            // pool is short.
            let mut p = ApiError::new(
                P::Insufficient,
                StatusCode::CONFLICT,
                format!(
                    "insufficient nodes in Ready state: asked for {requested}, {available} ready; \
                     retry later, or ask with \"wait\": true to queue"
                ),
            );
            p.0.requested = Some(*requested);
            p.0.ready = Some(*available);
            return p;
        }
        EngineError::QuotaExceeded { .. } => (P::Quota, StatusCode::FORBIDDEN),
        EngineError::RateLimited { .. } => (P::RateLimited, StatusCode::TOO_MANY_REQUESTS),
        // Deliberate, not a failure (the legacy endpoint's 409 too).
        EngineError::Paused => (P::Paused, StatusCode::CONFLICT),
        EngineError::NoSuchPool { available, .. } => {
            let allowed: Vec<String> = available.iter().map(ToString::to_string).collect();
            return ApiError::new(P::NoSuchPool, StatusCode::NOT_FOUND, e.to_string()).allowing(allowed);
        }
        EngineError::InvalidRequest(_) => (P::BadRequest, StatusCode::BAD_REQUEST),
        EngineError::ProjectUnusable { .. } => (P::ProjectUnusable, StatusCode::CONFLICT),
        EngineError::PreparationFailed { .. } => (P::PreparationFailed, StatusCode::SERVICE_UNAVAILABLE),
        EngineError::FailCapExceeded { .. } => (P::FailCap, StatusCode::CONFLICT),
        EngineError::UnknownRequest(_) => return ApiError::not_found(e.to_string()),
        // Asking past the maximum is bad input (the detail says the most
        // allowed), not a state the session is in.
        EngineError::SessionTransition(SessionTransitionError::BeyondMaxLifetime { .. }) => {
            (P::BadRequest, StatusCode::BAD_REQUEST)
        }
        EngineError::QueueFull(_) => (P::QueueFull, StatusCode::TOO_MANY_REQUESTS),
        EngineError::SessionNotInProd { .. }
        | EngineError::NotPaused
        | EngineError::Transition(_)
        | EngineError::SessionTransition(_) => (P::Conflict, StatusCode::CONFLICT),
        _ => return unexpected(what, &e),
    };
    ApiError::new(kind, status, e.to_string())
}
