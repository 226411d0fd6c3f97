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

//! Files: `wire` (reply shapes, the query-string rules, what callers
//! may be told), `legacy` (the job endpoints), `admin`, `ops` (`/metrics`,
//! `/healthz`) and `install` (`/Install/*`). Each endpoint is one
//! [`Route`], declared beside its handler; [`ROUTES`] lists them all, and
//! the router, the metrics' `endpoint` labels and the tests all read it.

mod admin;
mod install;
mod legacy;
mod ops;
pub mod v1;
mod wire;

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::MethodRouter;
use duffy_core::Engine;
use duffy_installers::PxeRegistry;

use crate::auth_guard::AuthGuard;
use crate::metrics::Metrics;
pub use install::install_endpoints;
pub use legacy::HELP;
use wire::Param;
pub use wire::{InventoryRow, Reply};

/// What the handlers share: the engine and the service's own state.
#[derive(Clone)]
pub struct AppState {
    /// Every operation goes through it; `/metrics` and `/healthz` read
    /// its store.
    pub engine: Engine,
    /// The service's counters and histograms, rendered by `/metrics`.
    pub metrics: Arc<Metrics>,
    /// The PXE installer's pending installs, when it is the configured
    /// installer: machines fetch their boot script and kickstart here.
    pub pxe: Option<Arc<PxeRegistry>>,
    /// Per-address budgets of failed API key lookups.
    pub auth_guard: Arc<AuthGuard>,
}

/// Who calls an endpoint: decides which listener serves it and what it
/// does with query parameters it does not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    /// The legacy job endpoints (`cico`, job scripts). Unknown parameters
    /// are ignored, as the legacy server did (job scripts add
    /// cache-busters), and counted in `duffy_ignored_parameters_total`.
    Legacy,
    /// The legacy admin endpoints (an admin key); unknown parameters as
    /// [`Group::Legacy`].
    Admin,
    /// Operations (`/metrics`, `/healthz`): they do not read the query.
    Ops,
    /// The endpoints machines being installed call (`/Install/*`), on the
    /// install listener when there is one. Unknown parameters are refused
    /// (400): they have no legacy callers, and a machine's first-boot
    /// script sends exactly what its kickstart says.
    Install,
    /// The JSON API, `/api/v1/*`: a bearer key (`Authorization: Bearer`,
    /// never `?key=`), problem+json errors, unknown parameters refused
    /// (400). Served on the main listener.
    V1,
}

/// One endpoint: where the router serves it, who calls it and the query
/// parameters it knows. Declared once, beside its handler.
#[derive(Debug, Clone, Copy)]
pub struct Route {
    /// The path the router matches; `{node}` stands for one path segment.
    pub path: &'static str,
    /// Who calls it.
    pub group: Group,
    /// The HTTP methods it answers (GET also answers HEAD); the OpenAPI
    /// document must describe each of `/api/v1`'s.
    pub methods: &'static [&'static str],
    /// The query parameters it knows, each with its longest value.
    params: &'static [Param],
    /// Its handler, as the router takes it.
    handler: fn() -> MethodRouter<AppState>,
}

impl Route {
    const fn new(
        path: &'static str,
        group: Group,
        params: &'static [Param],
        handler: fn() -> MethodRouter<AppState>,
    ) -> Route {
        Route { path, group, methods: &["GET"], params, handler }
    }

    /// The `endpoint` label of the route's metrics: for the legacy
    /// endpoints their path without the path parameters (`/NodeSetAdmin`,
    /// as it always was); for `/api/v1`, whose paths go on after a
    /// parameter (`/api/v1/sessions/{id}/extend`), the path template.
    pub fn label(&self) -> &'static str {
        if self.group == Group::V1 {
            return self.path;
        }
        match self.path.find("/{") {
            Some(i) => &self.path[..i],
            None => self.path,
        }
    }

    /// Whether it ignores query parameters it does not know (the legacy
    /// endpoints, as the legacy server did) rather than refusing them.
    pub fn ignores_unknown_parameters(&self) -> bool {
        matches!(self.group, Group::Legacy | Group::Admin)
    }
}

/// Every endpoint of the service: the legacy ones in the order `/Help`
/// lists them, then `/api/v1`.
pub static ROUTES: [&Route; 16 + v1::ROUTE_COUNT] = [
    &legacy::NODE_GET,
    &legacy::NODE_DONE,
    &legacy::NODE_FAIL,
    &legacy::INVENTORY,
    &legacy::HELP_ROUTE,
    &admin::OVERTIME,
    &admin::NODE_SET_ADMIN,
    &admin::NODE_RECOVER,
    &admin::PAUSE,
    &admin::RESUME,
    &ops::METRICS,
    &ops::HEALTHZ,
    &install::INSTALL_IPXE,
    &install::INSTALL_KICKSTART,
    &install::INSTALL_DONE,
    &install::INSTALL_FAILED,
    &v1::SESSIONS,
    &v1::SESSION,
    &v1::SESSION_EXTEND,
    &v1::SESSION_RELEASE,
    &v1::SESSION_FAIL,
    &v1::REQUEST,
    &v1::NODES,
    &v1::NODE,
    &v1::NODE_SET_ADMIN,
    &v1::NODE_RECOVER,
    &v1::POOLS,
    &v1::PROJECTS,
    &v1::PROJECT,
    &v1::KEYS,
    &v1::KEY,
    &v1::OVERTIME,
    &v1::PAUSE,
    &v1::RESUME,
    &v1::OPENAPI,
];

/// The router of the routes `which` selects, with the 404 for any other
/// path and the metrics of every request.
fn routes(state: AppState, which: impl Fn(&Route) -> bool) -> Router {
    let mut router = Router::new();
    for r in ROUTES.iter().filter(|r| which(r)) {
        router = router.route(r.path, (r.handler)());
    }
    router.fallback(not_found).layer(middleware::from_fn_with_state(state.clone(), observe)).with_state(state)
}

/// Builds the router of every endpoint: the service on one listener.
pub fn router(state: AppState) -> Router {
    routes(state, |_| true)
}

/// The router of the main listener when the install endpoints have their
/// own ([`install_router`]): everything but `/Install/*`, which is then an
/// unknown path here.
pub fn public_router(state: AppState) -> Router {
    routes(state, |r| r.group != Group::Install)
}

/// The router of the install listener (`[installer] listen`): only
/// `/Install/*`; every other path is unknown.
pub fn install_router(state: AppState) -> Router {
    routes(state, |r| r.group == Group::Install)
}

/// Counts every request under the route the router matched (`other` for
/// an unknown path) and times it.
async fn observe(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().and_then(|m| ROUTES.iter().find(|r| r.path == m.as_str()));
    let endpoint = route.map_or("other", |r| r.label());
    let started = Instant::now();
    let resp = next.run(req).await;
    st.metrics.observe(endpoint, resp.status().as_u16(), started.elapsed());
    resp
}

async fn not_found(req: Request) -> Response {
    let path: String = req.uri().path().chars().take(100).collect();
    if path.starts_with(v1::PREFIX) {
        return v1::no_such_path(&path);
    }
    Reply::message(StatusCode::NOT_FOUND, format!("no such endpoint {path:?}; see /Help")).into_response()
}
