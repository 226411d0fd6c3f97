//! Operations: `/metrics` and `/healthz`.

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use axum::routing::get;
use duffy_core::{StoreError, StoreHealth};
use serde_json::json;
use tracing::{error, warn};

use super::wire::*;
use super::{AppState, Group, Route};
use crate::metrics::{CONTENT_TYPE, FarmReading, NOT_READY};

pub(super) static METRICS: Route = Route::new("/metrics", Group::Ops, &[], || get(metrics));
pub(super) static HEALTHZ: Route = Route::new("/healthz", Group::Ops, &[], || get(healthz));

/// `/metrics`: what was counted, and the farm as the store has it now.
/// Ready nodes are counted by [`Store::ready_counts`] (the claim's index)
/// and only the other nodes are read, in one read each: a node that
/// changes state between the two reads may be counted twice, or not at
/// all, in this one scrape (the next one is right).
///
/// [`Store::ready_counts`]: duffy_core::Store::ready_counts
async fn metrics(State(st): State<AppState>) -> Result<Response, Reply> {
    let store = st.engine.store();
    let read = async {
        Ok::<_, StoreError>(FarmReading {
            ready: store.ready_counts().await?,
            others: store.nodes_in_states(&NOT_READY).await?,
            targets: store.pool_targets().await?,
            sessions: store.live_sessions().await?,
            paused: store.paused().await?,
            now: st.engine.clock().now(),
        })
    };
    let farm = read.await.map_err(|e| unexpected("reading metrics", &e.into()))?;
    let body = st.metrics.render(&farm);
    let mut r = Response::new(Body::from(body));
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    Ok(r)
}

/// `/healthz`: the store answers.
async fn healthz(State(st): State<AppState>) -> Reply {
    let store = st.engine.store();
    health_reply(store.health(), store.paused().await)
}

/// Healthy means the store reads and writes: a store whose writes fail (a
/// full disk) cannot allocate, so it is unhealthy too, with the condition
/// named (never the store's own words, which go to the log).
fn health_reply(health: StoreHealth, paused: Result<bool, StoreError>) -> Reply {
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

#[cfg(test)]
mod tests {
    use duffy_core::EngineError;

    use super::*;

    /// What SQLite says when its file is damaged: never for a caller's eyes.
    fn sql_error() -> StoreError {
        StoreError::backend(
            "reading the pause flag from /var/lib/duffy/duffy.db",
            std::io::Error::other("database disk image is malformed: SELECT paused FROM service"),
        )
    }

    #[test]
    fn store_errors_never_reach_a_reply() {
        let r = health_reply(StoreHealth::Ok, Err(sql_error()));
        assert_eq!(r.status_code(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body(r), r#"{"error":"store unavailable","status":"error"}"#);

        for e in [
            EngineError::Store(sql_error()),
            EngineError::Store(StoreError::Corrupt("node 3 has state 'Bogus' in table nodes".into())),
        ] {
            let r = unexpected("allocation", &e);
            assert_eq!(r.status_code(), StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(body(r), r#""allocation failed: store unavailable; try again""#);
        }
        // An engine refusal worded for callers is kept.
        let r = unexpected("releasing the session", &EngineError::Contention("session 42".into()));
        assert!(!body(r).contains("42"));
        // A storage condition is named (the operator's to fix), its
        // details (the path, SQLite's words) are not.
        let full = StoreError::Unavailable {
            context: "committing a batch of 3 operations".into(),
            fault: duffy_core::StorageFault::DiskFull,
            source: Box::new(std::io::Error::other("/var/lib/duffy/duffy.db-wal: SQLITE_FULL")),
        };
        let r = unexpected("allocation", &EngineError::Store(full));
        assert_eq!(body(r), r#""allocation failed: store unavailable: database or disk is full; try again""#);
    }
}
