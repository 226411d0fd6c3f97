//! Admin endpoints (an admin key): projects, keys, overtime, pause and
//! resume. Projects and keys are the operator commands' own operations
//! (`operator::{set_project, create_key, list_keys, revoke_key}`), run
//! against the service's engine so its key cache sees every change.

use std::net::SocketAddr;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::{delete, get, post};
use duffy_client::wire::{CreateKey, CreatedKey, KeyView, OvertimeView, ProjectView, ServiceState, SetProject};
use duffy_core::{ApiKeyRecord, Project, validate_token};

use super::*;
use crate::api::wire::param;
use crate::operator::{CommandError, Target, create_key, list_keys, revoke_key, set_project};

pub(in crate::api) static PROJECTS: Route =
    Route::v1("/api/v1/projects", &["GET"], &[], || methods(get(list_projects)));
pub(in crate::api) static PROJECT: Route =
    Route::v1("/api/v1/projects/{name}", &["GET", "PUT"], &[], || methods(get(show_project).put(put_project)));
pub(in crate::api) static KEYS: Route =
    Route::v1("/api/v1/keys", &["GET", "POST"], &[param("project")], || methods(get(keys).post(new_key)));
pub(in crate::api) static KEY: Route = Route::v1("/api/v1/keys/{id}", &["DELETE"], &[], || methods(delete(revoke)));
pub(in crate::api) static OVERTIME: Route =
    Route::v1("/api/v1/admin/overtime", &["GET"], &[], || methods(get(overtime)));
pub(in crate::api) static PAUSE: Route = Route::v1("/api/v1/admin/pause", &["POST"], &[], || methods(post(pause)));
pub(in crate::api) static RESUME: Route = Route::v1("/api/v1/admin/resume", &["POST"], &[], || methods(post(resume)));

fn command_failed(what: &str, e: CommandError) -> ApiError {
    match e {
        CommandError::Invalid(m) => ApiError::bad_request(m),
        CommandError::NotFound(m) => ApiError::not_found(m),
        CommandError::Store(s) => store_failed(what, s),
        CommandError::Engine(e) => refusal(what, e),
    }
}

fn project_view(p: Project) -> ProjectView {
    ProjectView { name: p.name, quota: p.quota, ssh_keys: p.ssh_keys }
}

fn key_view(k: &ApiKeyRecord) -> KeyView {
    KeyView {
        id: k.id.0,
        project: k.project.clone(),
        admin: k.admin,
        created_at: time(k.created_at),
        expires_at: time_opt(k.expires_at),
        last_used: time_opt(k.last_used),
        revoked_at: time_opt(k.revoked_at),
    }
}

/// `GET /api/v1/projects` (admin): every project, by name.
#[utoipa::path(get, path = "/api/v1/projects", tag = "admin",
    responses((status = 200, description = "Every project, by name", body = [ProjectView])))]
async fn list_projects(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    admin_caller(&st, peer, &headers, raw.as_deref(), &PROJECTS).await?;
    let projects = st.engine.store().projects().await.map_err(|e| store_failed("reading the projects", e))?;
    ok(&projects.into_iter().map(project_view).collect::<Vec<_>>())
}

/// `GET /api/v1/projects/{name}` (admin).
#[utoipa::path(get, path = "/api/v1/projects/{name}", tag = "admin",
    params(("name" = String, Path, description = "The project's name")),
    responses((status = 200, description = "The project", body = ProjectView)))]
async fn show_project(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(name): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    admin_caller(&st, peer, &headers, raw.as_deref(), &PROJECT).await?;
    validate_token("project name", &name, 64).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let p = st.engine.store().project(&name).await.map_err(|e| store_failed("reading the project", e))?;
    ok(&project_view(p.ok_or_else(|| ApiError::not_found(format!("no project {name:?}")))?))
}

/// `PUT /api/v1/projects/{name}` (admin).
#[utoipa::path(put, path = "/api/v1/projects/{name}", tag = "admin",
    params(("name" = String, Path, description = "The project's name")),
    request_body = SetProject,
    responses((status = 200, description = "The project as it now is", body = ProjectView)))]
async fn put_project(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(name): Path<String>,
    RawQuery(raw): RawQuery,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    admin_caller(&st, peer, &headers, raw.as_deref(), &PROJECT).await?;
    let set: SetProject = body(&bytes)?;
    let p = set_project(&**st.engine.store(), &name, set.quota, set.ssh_keys)
        .await
        .map_err(|e| command_failed("setting the project", e))?;
    ok(&project_view(p))
}

/// `GET /api/v1/keys[?project=P]` (admin).
#[utoipa::path(get, path = "/api/v1/keys", tag = "admin",
    params(("project" = Option<String>, Query, description = "Only this project's keys")),
    responses((status = 200, description = "The keys' records (never a key or its hash)", body = [KeyView])))]
async fn keys(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let (_, q) = admin_caller(&st, peer, &headers, raw.as_deref(), &KEYS).await?;
    let target = Target::Service(st.engine.clone());
    let keys = list_keys(&target, q.get("project")).await.map_err(|e| command_failed("listing keys", e))?;
    ok(&keys.iter().map(key_view).collect::<Vec<_>>())
}

/// `POST /api/v1/keys` (admin).
#[utoipa::path(post, path = "/api/v1/keys", tag = "admin", request_body = CreateKey,
    responses((status = 201, description = "The new key, shown this once", body = CreatedKey)))]
async fn new_key(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    admin_caller(&st, peer, &headers, raw.as_deref(), &KEYS).await?;
    let req: CreateKey = body(&bytes)?;
    let target = Target::Service(st.engine.clone());
    let (key, rec) = create_key(&target, &req.project, req.admin, req.quota, req.expires_after_secs)
        .await
        .map_err(|e| command_failed("creating the key", e))?;
    json(StatusCode::CREATED, &CreatedKey { key, record: key_view(&rec) })
}

/// `DELETE /api/v1/keys/{id}` (admin).
#[utoipa::path(delete, path = "/api/v1/keys/{id}", tag = "admin",
    params(("id" = u64, Path, description = "The key's id")),
    responses((status = 200, description = "The key's record, revoked", body = KeyView)))]
async fn revoke(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    admin_caller(&st, peer, &headers, raw.as_deref(), &KEY).await?;
    let id: u64 = id.parse().map_err(|_| {
        let shown: String = id.chars().take(40).collect();
        ApiError::bad_request(format!("invalid key id {shown:?}: a whole number, as GET /api/v1/keys shows"))
    })?;
    let target = Target::Service(st.engine.clone());
    let rec = revoke_key(&target, id).await.map_err(|e| command_failed("revoking the key", e))?;
    ok(&key_view(&rec))
}

/// `GET /api/v1/admin/overtime` (admin).
#[utoipa::path(get, path = "/api/v1/admin/overtime", tag = "admin",
    responses((status = 200, description = "Sessions holding nodes past their lease", body = [OvertimeView])))]
async fn overtime(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let (who, _) = admin_caller(&st, peer, &headers, raw.as_deref(), &OVERTIME).await?;
    let list = st.engine.overtime(&who).await.map_err(|e| refusal("listing overtime", e))?;
    let out: Vec<OvertimeView> = list
        .into_iter()
        .map(|o| OvertimeView {
            id: o.session.id.0,
            project: o.session.project,
            hosts: o.hosts,
            delivered_at: time_opt(o.session.delivered_at),
            lease_until: time_opt(o.session.lease_until),
            overdue_secs: o.overdue.as_secs(),
        })
        .collect();
    ok(&out)
}

/// `POST /api/v1/admin/pause` (admin). Pausing twice is harmless.
#[utoipa::path(post, path = "/api/v1/admin/pause", tag = "admin",
    responses((status = 200, description = "Paused", body = ServiceState)))]
async fn pause(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    let (who, _) = admin_caller(&st, peer, &headers, raw.as_deref(), &PAUSE).await?;
    no_fields(&bytes)?;
    st.engine.pause(&who).await.map_err(|e| refusal("pausing", e))?;
    ok(&ServiceState { paused: true })
}

/// `POST /api/v1/admin/resume` (admin). Refused (`conflict`) when not
/// paused.
#[utoipa::path(post, path = "/api/v1/admin/resume", tag = "admin",
    responses((status = 200, description = "Resumed", body = ServiceState)))]
async fn resume(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    let (who, _) = admin_caller(&st, peer, &headers, raw.as_deref(), &RESUME).await?;
    no_fields(&bytes)?;
    st.engine.resume(&who).await.map_err(|e| refusal("resuming", e))?;
    ok(&ServiceState { paused: false })
}
