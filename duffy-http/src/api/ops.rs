//! Operations: `/metrics` and `/healthz`.

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use duffy_core::{StoreError, StoreHealth};
use serde_json::json;
use tracing::{error, warn};

use super::AppState;
use super::wire::*;

/// `/metrics`
pub(super) async fn metrics(State(st): State<AppState>) -> Response {
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
pub(super) async fn healthz(State(st): State<AppState>) -> Reply {
    let store = st.engine.store();
    health_reply(store.health(), store.paused().await)
}

/// Healthy means the store reads and writes: a store whose writes fail (a
/// full disk) cannot allocate, so it is unhealthy too, with the condition
/// named (never the store's own words, which go to the log).
pub(super) fn health_reply(health: StoreHealth, paused: Result<bool, StoreError>) -> Reply {
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
