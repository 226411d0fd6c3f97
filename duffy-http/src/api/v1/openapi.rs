//! The OpenAPI 3.1 document of `/api/v1`, generated from the handlers'
//! `#[utoipa::path]` annotations and the wire types' schemas, served at
//! `/api/v1/openapi.json` (no key needed). A test checks that it
//! describes every method of every `/api/v1` route in `api::ROUTES`.

use std::sync::OnceLock;

use axum::response::Response;
use axum::routing::get;
use duffy_client::wire::{
    CreateKey, CreateSession, CreatedKey, EventView, ExtendSession, KeyView, NodeDetail, NodeView, OvertimeView,
    PROBLEM_JSON, PoolView, Problem, ProjectView, QueuedRequest, ServiceState, SessionView, SetProject,
};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ComponentsBuilder, ContentBuilder, Ref, RefOr, ResponseBuilder};
use utoipa::{Modify, OpenApi};

use super::*;

pub(in crate::api) static OPENAPI: Route =
    Route::v1("/api/v1/openapi.json", &["GET"], &[], || methods(get(openapi_json)));

/// The name of the bearer security scheme.
const BEARER: &str = "bearer";

/// The error statuses every operation may answer, each with a problem.
const PROBLEM_STATUSES: [(&str, &str); 8] = [
    ("400", "Bad request: what was wrong and what is allowed (bad_request)"),
    ("401", "Missing or invalid key (unauthorized)"),
    ("403", "Not allowed for this key (forbidden, quota)"),
    ("404", "No such resource for this key (not_found, no_such_pool)"),
    ("409", "Not possible now (insufficient, paused, conflict, fail_cap, project_unusable)"),
    ("429", "Slow down (rate_limited, queue_full, too_many_invalid_keys)"),
    ("500", "Internal error (internal)"),
    ("503", "Try again (unavailable, preparation_failed)"),
];

/// `/api/v1` as OpenAPI.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Duffy API",
        version = "1",
        description = "Freshly installed test machines for CI jobs. Authenticate with `Authorization: Bearer KEY`. \
            Every error is RFC 9457 problem+json whose `type` (`urn:duffy:problem:NAME`) is stable."
    ),
    paths(
        super::sessions::list,
        super::sessions::create,
        super::sessions::show,
        super::sessions::extend,
        super::sessions::release,
        super::sessions::fail,
        super::sessions::show_request,
        super::sessions::cancel_request,
        super::farm::list_nodes,
        super::farm::show_node,
        super::farm::set_admin,
        super::farm::recover,
        super::farm::pools,
        super::admin::list_projects,
        super::admin::show_project,
        super::admin::put_project,
        super::admin::keys,
        super::admin::new_key,
        super::admin::revoke,
        super::admin::overtime,
        super::admin::pause,
        super::admin::resume,
        openapi_json,
    ),
    components(schemas(
        Problem, CreateSession, SessionView, QueuedRequest, ExtendSession, NodeView, EventView, NodeDetail,
        PoolView, ProjectView, SetProject, KeyView, CreateKey, CreatedKey, OvertimeView, ServiceState
    )),
    modifiers(&Bearer, &Problems),
    security(("bearer" = [])),
    tags(
        (name = "sessions", description = "Nodes for a job: request, extend, release, fail"),
        (name = "farm", description = "Nodes and pools"),
        (name = "admin", description = "Projects, keys and operations (admin keys)"),
    )
)]
pub struct ApiDoc;

/// Declares the bearer scheme.
struct Bearer;

impl Modify for Bearer {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(|| ComponentsBuilder::new().build());
        components.add_security_scheme(
            BEARER,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("An API key from `duffy key create` or POST /api/v1/keys"))
                    .build(),
            ),
        );
    }
}

/// Adds the problem responses to every operation: declared once here
/// rather than on each handler, so no operation can forget one.
struct Problems;

impl Modify for Problems {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let problem = ResponseBuilder::new()
            .description("A problem (RFC 9457)")
            .content(PROBLEM_JSON, ContentBuilder::new().schema(Some(Ref::from_schema_name("Problem"))).build())
            .build();
        let components = openapi.components.get_or_insert_with(|| ComponentsBuilder::new().build());
        components.responses.insert("Problem".to_string(), RefOr::T(problem));
        for item in openapi.paths.paths.values_mut() {
            for op in [&mut item.get, &mut item.post, &mut item.put, &mut item.delete].into_iter().flatten() {
                for (status, description) in PROBLEM_STATUSES {
                    let r = ResponseBuilder::new()
                        .description(description)
                        .content(
                            PROBLEM_JSON,
                            ContentBuilder::new().schema(Some(Ref::from_schema_name("Problem"))).build(),
                        )
                        .build();
                    op.responses.responses.entry(status.to_string()).or_insert(RefOr::T(r));
                }
            }
        }
    }
}

/// The document as JSON, generated once.
pub fn document() -> &'static str {
    static DOC: OnceLock<String> = OnceLock::new();
    DOC.get_or_init(|| ApiDoc::openapi().to_pretty_json().unwrap_or_else(|_| "{}".to_string()))
}

/// `GET /api/v1/openapi.json`: this document.
#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "farm", security(()),
    responses((status = 200, description = "The OpenAPI 3.1 document of /api/v1", content_type = "application/json", body = Object)))]
async fn openapi_json() -> Response {
    let mut r = Response::new(axum::body::Body::from(document()));
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}
