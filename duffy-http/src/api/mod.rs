//! The HTTP API: the legacy endpoints `cico` and job scripts call, the
//! admin endpoints, `/metrics`, `/healthz`, and the `/Install/*` endpoints
//! machines being installed by PXE call.
//!
//! This is the only module that knows the legacy wire shapes (see
//! `shared/spec/legacy-api.md`): clients ignore status codes and judge a
//! reply by the shape of its body, so every reply here is built to that
//! contract. Every known parameter is validated before anything is read or
//! written; a rejected request changes nothing. The legacy endpoints ignore
//! parameters they do not know, as the legacy server did (counted in
//! `duffy_ignored_parameters_total`); `/Install/*` refuses them.
//!
//! Replies never carry a store's own error text (SQL, paths): callers are
//! told "store unavailable", the log gets the details. The install
//! endpoints pass the caller's address to the [`PxeRegistry`], which serves
//! only the node's own address (see `duffy_installers::pxe`).

mod admin;
mod install;
mod legacy;
mod ops;
mod wire;

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::get;
use duffy_core::Engine;
use duffy_installers::PxeRegistry;

use crate::auth_guard::AuthGuard;
use crate::metrics::Metrics;
use admin::*;
use install::*;
pub use legacy::HELP;
use legacy::*;
use ops::*;
pub use wire::{InventoryRow, Reply};

/// Shared state of the handlers.
#[derive(Clone)]
pub struct AppState {
    /// The engine.
    pub engine: Engine,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// The PXE installer's pending installs, when it is the configured
    /// installer: machines fetch their boot script and kickstart here.
    pub pxe: Option<Arc<PxeRegistry>>,
    /// Per-address budgets of failed API key lookups.
    pub auth_guard: Arc<AuthGuard>,
}

/// The legacy, admin and operations endpoints.
fn api_routes() -> Router<AppState> {
    Router::new()
        .route("/Node/get", get(node_get))
        .route("/Node/done", get(node_done))
        .route("/Node/fail", get(node_fail))
        .route("/Inventory", get(inventory))
        .route("/Help", get(help))
        .route("/Overtime", get(overtime))
        .route("/NodeSetAdmin/{node}", get(node_set_admin))
        .route("/NodeRecover/{node}", get(node_recover))
        .route("/PauseService", get(pause))
        .route("/ResumeService", get(resume))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
}

/// The endpoints machines being installed call.
fn install_routes() -> Router<AppState> {
    Router::new()
        .route("/Install/ipxe", get(install_ipxe))
        .route("/Install/kickstart", get(install_kickstart))
        .route("/Install/done", get(install_done))
        .route("/Install/failed", get(install_failed))
}

fn finish(routes: Router<AppState>, state: AppState) -> Router {
    routes.fallback(not_found).layer(middleware::from_fn_with_state(state.clone(), observe)).with_state(state)
}

/// Builds the router of every endpoint: the service on one listener.
pub fn router(state: AppState) -> Router {
    finish(api_routes().merge(install_routes()), state)
}

/// The router of the main listener when the install endpoints have their
/// own ([`install_router`]): everything but `/Install/*`, which is then an
/// unknown path here.
pub fn public_router(state: AppState) -> Router {
    finish(api_routes(), state)
}

/// The router of the install listener (`[installer] listen`): only
/// `/Install/*`; every other path is unknown.
pub fn install_router(state: AppState) -> Router {
    finish(install_routes(), state)
}

async fn observe(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let endpoint = Metrics::endpoint_index(req.uri().path());
    let started = Instant::now();
    let resp = next.run(req).await;
    st.metrics.observe(endpoint, resp.status().as_u16(), started.elapsed());
    resp
}

async fn not_found(req: Request) -> Reply {
    let path: String = req.uri().path().chars().take(100).collect();
    Reply::message(StatusCode::NOT_FOUND, format!("no such endpoint {path:?}; see /Help"))
}

#[cfg(test)]
mod tests {
    use super::wire::*;
    use super::*;
    use axum::http::StatusCode;
    use duffy_core::{EngineError, StoreError, StoreHealth};
    use duffy_installers::PxeError;
    use std::net::IpAddr;

    fn body(r: Reply) -> String {
        match r {
            Reply::Json(_, v) => v.to_string(),
            Reply::Text(_, t) => t,
            Reply::JsonBytes(_, b) => String::from_utf8_lossy(&b).into_owned(),
        }
    }

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

    #[test]
    fn template_errors_are_not_shown_to_machines() {
        let e = PxeError::Io {
            path: "/etc/duffy/templates/ks.tmpl".into(),
            source: std::io::Error::other("permission denied"),
        };
        let r = pxe_error(&e, IpAddr::from([10, 0, 0, 11]));
        assert_eq!(r.status_code(), StatusCode::INTERNAL_SERVER_ERROR);
        let b = body(r);
        assert!(!b.contains("/etc/duffy") && !b.contains("permission"), "{b}");
    }

    #[test]
    fn parameter_limits_are_per_parameter() {
        let key = "A".repeat(MAX_HOST_KEY);
        let token = "0".repeat(64);
        let raw = format!("token={token}&host_key={}", "%2B".repeat(MAX_HOST_KEY));
        let q = Query::parse(Some(&raw), &INSTALL_DONE).unwrap_or_else(|r| panic!("{}", body(r)));
        assert_eq!(q.get("host_key").map(str::len), Some(MAX_HOST_KEY));
        let too_long = format!("token={token}&host_key={key}A");
        let r = Query::parse(Some(&too_long), &INSTALL_DONE).err().expect("refused");
        assert!(body(r).contains("host_key is too long (at most 8192 bytes)"));
        // The others as before: 256.
        let r = Query::parse(Some(&format!("token={}", "0".repeat(257))), &INSTALL_DONE).err().expect("refused");
        assert!(body(r).contains("token is too long (at most 256 bytes)"));
        let r = Query::parse(Some(&format!("key={}", "k".repeat(257))), &NODE_GET).err().expect("refused");
        assert!(body(r).contains("key is too long (at most 256 bytes)"));
        let reason = format!("token={token}&reason={}", "r".repeat(MAX_REASON));
        assert!(Query::parse(Some(&reason), &INSTALL_FAILED).is_ok());
        assert!(Query::parse(Some(&format!("{reason}r")), &INSTALL_FAILED).is_err());
        // Legacy endpoints keep their overall cap.
        let r = Query::parse(Some(&format!("key=k&_={}", "x".repeat(MAX_LEGACY_QUERY))), &NODE_GET).err();
        assert!(body(r.expect("refused")).contains("at most 4096 bytes"));
    }
}
