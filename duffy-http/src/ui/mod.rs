//! The operators' dashboard at `/ui`: server-rendered HTML (maud), SVG
//! charts, and a few lines of plain JavaScript that refresh a page when
//! the server-sent event stream says the farm changed.
//!
//! Pages: the farm map (`/ui`), pools, sessions, a node's history
//! (`/ui/node/<host>`), charts. Everything is read through the core's
//! `Store`, and every read is bounded whatever the size of the farm (see
//! the constants in `pages`): the map counts with `Store::node_counts`
//! and draws at most [`pages::MAP_CELLS`] machines a page.
//!
//! **Read-only without an admin key.** Anyone who reaches the service may
//! look. Changing anything (pause, resume, set admin, recover) takes an
//! admin key, entered in the page and checked by the same key machinery
//! as the API (hashed, compared in constant time, failed lookups limited
//! per address); it is kept in an `HttpOnly`, `SameSite=Strict` cookie
//! scoped to `/ui` (and `Secure` when a TLS-terminating proxy says the
//! browser came over HTTPS) and checked again on every action, so a revoked key
//! stops working at once. Every POST carries a CSRF token: an HMAC, under
//! a secret made when the service starts, of the browser's own random
//! `duffy_ui` cookie (a signed double-submit token); a POST without both,
//! or with a token for another cookie, is refused and changes nothing.
//! The actions call the same `Engine` operations as the admin endpoints.

mod chart;
pub mod pages;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use duffy_core::{EngineError, NodeId, NodeState, Principal};
use hmac::{Hmac, Mac};
use maud::Markup;
use sha2::Sha256;
use subtle::ConstantTimeEq;
use tokio::sync::{Semaphore, watch};
use tracing::{info, warn};

use crate::api::AppState;
use crate::auth_guard::{AuthRefusal, authenticate};
use pages::MapFilter;

/// The browser's random id, which the CSRF token is bound to.
const UI_COOKIE: &str = "duffy_ui";
/// The admin key, once entered.
const ADMIN_COOKIE: &str = "duffy_admin";
/// How long an entered admin key is kept by the browser.
const ADMIN_COOKIE_AGE: Duration = Duration::from_secs(8 * 3600);
/// Most event streams open at once; one more is refused (503) and the
/// page still works, without live updates.
pub const MAX_STREAMS: usize = 64;
/// How often a stream looks for a change (two small reads).
const STREAM_POLL: Duration = Duration::from_secs(1);
/// A stream ends after this long and the browser reconnects, so that no
/// connection is held forever.
const STREAM_LIFETIME: Duration = Duration::from_secs(600);
/// Largest form body accepted.
const MAX_FORM: usize = 4096;

/// What the dashboard's handlers share.
#[derive(Clone)]
struct Ui {
    app: AppState,
    secret: Arc<[u8; 32]>,
    streams: Arc<Semaphore>,
    shutdown: watch::Receiver<bool>,
}

/// What every page knows about its request.
pub struct Ctx {
    /// The browser's `duffy_ui` id, and whether it is new (set it).
    ui_id: String,
    new_cookie: bool,
    /// Whether the browser reached the service over HTTPS (a proxy in
    /// front says so): its cookies are then `Secure`.
    https: bool,
    /// The CSRF token for this browser's forms.
    pub csrf: String,
    /// The admin, if the browser holds a valid admin key.
    pub admin: Option<Principal>,
    /// Whether the service is paused.
    pub paused: bool,
    /// The newest event's `seq` when the page was read (the event stream
    /// starts from it, so no change between render and connect is missed).
    pub seq: u64,
    /// The page's path and query, where a form returns to.
    pub path: String,
}

/// The dashboard's routes under `/ui`. `shutdown` ends open event streams
/// when the service stops, so that they do not hold its shutdown up.
pub fn router(app: AppState, shutdown: watch::Receiver<bool>) -> Router {
    let mut secret = [0u8; 32];
    secret[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    secret[16..].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    let ui = Ui { app, secret: Arc::new(secret), streams: Arc::new(Semaphore::new(MAX_STREAMS)), shutdown };
    Router::new()
        .route("/ui", get(map_page))
        .route("/ui/pools", get(pools_page))
        .route("/ui/sessions", get(sessions_page))
        .route("/ui/charts", get(charts_page))
        .route("/ui/node/{host}", get(node_page))
        .route("/ui/events", get(events))
        .route("/ui/style.css", get(style))
        .route("/ui/app.js", get(script))
        .route("/ui/login", post(login))
        .route("/ui/logout", post(logout))
        .route("/ui/action", post(action))
        .layer(DefaultBodyLimit::max(MAX_FORM))
        .with_state(ui)
}

fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// A `duffy_ui` id as issued: 32 lowercase hex digits.
fn valid_ui_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A key as the cookie may carry it (keys are UUIDs; anything else is
/// refused before it reaches a header).
fn valid_key_text(key: &str) -> bool {
    !key.is_empty() && key.len() <= 128 && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

impl Ui {
    fn csrf_for(&self, ui_id: &str) -> String {
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&self.secret[..]) else {
            unreachable!("HMAC takes a key of any length")
        };
        mac.update(b"duffy-ui-csrf:");
        mac.update(ui_id.as_bytes());
        mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Whether a POST's token was issued for this browser's cookie
    /// (compared in constant time).
    fn csrf_ok(&self, headers: &HeaderMap, form_token: Option<&str>) -> bool {
        match (cookie(headers, UI_COOKIE).filter(|id| valid_ui_id(id)), form_token) {
            (Some(id), Some(token)) => self.csrf_for(id).as_bytes().ct_eq(token.as_bytes()).into(),
            _ => false,
        }
    }

    /// The admin behind the browser's admin cookie, if it still holds an
    /// admin key.
    async fn admin(&self, headers: &HeaderMap, peer: SocketAddr) -> Result<Option<Principal>, AuthRefusal> {
        let Some(key) = cookie(headers, ADMIN_COOKIE).filter(|k| valid_key_text(k)) else { return Ok(None) };
        match authenticate(&self.app, peer, key).await {
            Ok(p) if p.admin => Ok(Some(p)),
            Ok(_) | Err(AuthRefusal::Invalid) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn ctx(&self, headers: &HeaderMap, peer: SocketAddr, path: String) -> Result<Ctx, Response> {
        let (ui_id, new_cookie) = match cookie(headers, UI_COOKIE).filter(|id| valid_ui_id(id)) {
            Some(id) => (id.to_string(), false),
            None => (uuid::Uuid::new_v4().simple().to_string(), true),
        };
        let store = self.app.engine.store();
        // A limited or failed lookup shows the page read-only.
        let admin = self.admin(headers, peer).await.unwrap_or(None);
        let paused = store.paused().await.map_err(|e| store_failed(&e))?;
        let seq = latest_seq(&**store).await.map_err(|e| store_failed(&e))?;
        let https = over_https(headers);
        Ok(Ctx { csrf: self.csrf_for(&ui_id), ui_id, new_cookie, https, admin, paused, seq, path })
    }
}

async fn latest_seq(store: &dyn duffy_core::Store) -> Result<u64, duffy_core::StoreError> {
    Ok(store.latest_events(None, 1).await?.first().map_or(0, |e| e.seq))
}

fn store_failed(e: &duffy_core::StoreError) -> Response {
    warn!(error = %e, "dashboard: reading the store failed");
    (StatusCode::SERVICE_UNAVAILABLE, [(header::CACHE_CONTROL, "no-store")], "store unavailable").into_response()
}

/// The page titled `title` (`nav`: its entry in the navigation) showing
/// what a read of the store found, through `view`; or the store's failure.
fn read_page<T>(
    ctx: &Ctx,
    title: &str,
    nav: &str,
    read: Result<T, duffy_core::StoreError>,
    view: impl FnOnce(&T) -> Markup,
) -> Response {
    match read {
        Ok(d) => page(ctx, StatusCode::OK, pages::layout(ctx, title, nav, maud::html! {}, view(&d))),
        Err(e) => store_failed(&e),
    }
}

/// Headers every page carries: no caching (it is live state), no framing,
/// no inline script or style.
fn page(ctx: &Ctx, status: StatusCode, body: Markup) -> Response {
    let mut resp = (status, body.into_string()).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'",
        ),
    );
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    if ctx.new_cookie {
        let c = set_cookie(UI_COOKIE, &ctx.ui_id, ctx.https, "");
        if let Ok(v) = HeaderValue::from_str(&c) {
            h.append(header::SET_COOKIE, v);
        }
    }
    resp
}

fn path_of(path: &str, raw: Option<&str>) -> String {
    match raw {
        Some(q) if !q.is_empty() => format!("{path}?{q}"),
        _ => path.to_string(),
    }
}

fn params(raw: Option<&str>) -> Vec<(String, String)> {
    form_urlencoded::parse(raw.unwrap_or("").as_bytes())
        .take(16)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn param<'p>(ps: &'p [(String, String)], name: &str) -> Option<&'p str> {
    ps.iter().find(|(k, v)| k == name && !v.is_empty()).map(|(_, v)| v.as_str())
}

async fn map_page(
    State(ui): State<Ui>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Response {
    let ctx = match ui.ctx(&headers, peer, path_of("/ui", raw.as_deref())).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let ps = params(raw.as_deref());
    let state = match param(&ps, "state").map(|s| s.parse::<NodeState>()) {
        None => None,
        Some(Ok(s)) => Some(s),
        Some(Err(_)) => {
            let allowed: Vec<&str> = pages::STATES.iter().map(|s| s.as_str()).collect();
            let text = format!("unknown state; allowed: {}", allowed.join(", "));
            return page(&ctx, StatusCode::BAD_REQUEST, pages::message(&ctx, "Bad filter", &text));
        }
    };
    let filter = MapFilter {
        state,
        pool: param(&ps, "pool").map(|s| s.chars().take(200).collect()),
        host: param(&ps, "host").map(|s| s.chars().take(253).collect()),
        after: NodeId(param(&ps, "after").and_then(|a| a.parse().ok()).unwrap_or(0)),
    };
    let data = match pages::read_map(&**ui.app.engine.store(), &filter).await {
        Ok(d) => d,
        Err(e) => return store_failed(&e),
    };
    let before = pages::map_filters(&filter, &pages::map_pools(&data));
    let body = pages::layout(&ctx, "Farm map", "/ui", before, pages::map(&filter, &data));
    page(&ctx, StatusCode::OK, body)
}

async fn pools_page(State(ui): State<Ui>, ConnectInfo(peer): ConnectInfo<SocketAddr>, headers: HeaderMap) -> Response {
    let ctx = match ui.ctx(&headers, peer, "/ui/pools".into()).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let now = ui.app.engine.clock().now();
    let rows = pages::read_pools(&**ui.app.engine.store(), now).await;
    read_page(&ctx, "Pools", "/ui/pools", rows, |rows| pages::pools(rows))
}

async fn sessions_page(
    State(ui): State<Ui>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Response {
    let ctx = match ui.ctx(&headers, peer, path_of("/ui/sessions", raw.as_deref())).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let ps = params(raw.as_deref());
    let page_no = param(&ps, "page").and_then(|p| p.parse::<usize>().ok()).unwrap_or(0).min(1_000_000);
    let now = ui.app.engine.clock().now();
    let d = pages::read_sessions(&**ui.app.engine.store(), page_no).await;
    read_page(&ctx, "Sessions", "/ui/sessions", d, |d| pages::sessions(d, now))
}

async fn charts_page(State(ui): State<Ui>, ConnectInfo(peer): ConnectInfo<SocketAddr>, headers: HeaderMap) -> Response {
    let ctx = match ui.ctx(&headers, peer, "/ui/charts".into()).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let now = ui.app.engine.clock().now();
    let d = pages::read_charts(&**ui.app.engine.store(), now).await;
    read_page(&ctx, "Charts", "/ui/charts", d, pages::charts)
}

async fn node_page(
    State(ui): State<Ui>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(host): Path<String>,
) -> Response {
    let valid = duffy_core::validate_hostname(&host).is_ok();
    let shown = if valid { host.clone() } else { String::new() };
    let ctx = match ui.ctx(&headers, peer, format!("/ui/node/{shown}")).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    if !valid {
        let body = pages::message(&ctx, "No such node", "That is not a valid node name.");
        return page(&ctx, StatusCode::BAD_REQUEST, body);
    }
    match pages::read_node(&**ui.app.engine.store(), &host).await {
        Ok(Some(d)) => {
            page(&ctx, StatusCode::OK, pages::layout(&ctx, &host, "", maud::html! {}, pages::node(&ctx, &d)))
        }
        Ok(None) => {
            let body = pages::message(&ctx, "No such node", &format!("No node is named {host}."));
            page(&ctx, StatusCode::NOT_FOUND, body)
        }
        Err(e) => store_failed(&e),
    }
}

async fn style() -> Response {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8"), (header::CACHE_CONTROL, "max-age=300")], pages::STYLE)
        .into_response()
}

async fn script() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8"), (header::CACHE_CONTROL, "max-age=300")],
        pages::APP_JS.0,
    )
        .into_response()
}

/// The event stream: a `change` event whenever the newest event's `seq`
/// or the pause flag differs from what the page was rendered with (or
/// what the stream last said). Polls the store every second (two small
/// reads) rather than hooking the write path, so the hot path never
/// waits for a browser.
async fn events(State(ui): State<Ui>, RawQuery(raw): RawQuery) -> Response {
    let Ok(permit) = ui.streams.clone().try_acquire_owned() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "too many open event streams").into_response();
    };
    let ps = params(raw.as_deref());
    let since: u64 = param(&ps, "since").and_then(|s| s.parse().ok()).unwrap_or(0);
    let paused = param(&ps, "paused") == Some("true");
    let store = ui.app.engine.store().clone();
    let deadline = tokio::time::Instant::now() + STREAM_LIFETIME;
    let start = (store, (since, paused), ui.shutdown.clone(), permit);
    let stream = futures::stream::unfold(start, move |(store, mut last, mut shutdown, permit)| async move {
        loop {
            if *shutdown.borrow() {
                return None;
            }
            let now = (latest_seq(&*store).await, store.paused().await);
            if let (Ok(seq), Ok(paused)) = now {
                if (seq, paused) != last {
                    last = (seq, paused);
                    let ev = SseEvent::default().event("change").data(seq.to_string());
                    return Some((Ok::<_, std::convert::Infallible>(ev), (store, last, shutdown, permit)));
                }
            }
            tokio::select! {
                () = tokio::time::sleep(STREAM_POLL) => {}
                _ = shutdown.changed() => return None,
                () = tokio::time::sleep_until(deadline) => return None,
            }
        }
    });
    let mut resp = Sse::new(stream).keep_alive(KeepAlive::default()).into_response();
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// A form body's fields (at most 16).
fn form(body: &Bytes) -> Vec<(String, String)> {
    form_urlencoded::parse(body).take(16).map(|(k, v)| (k.into_owned(), v.into_owned())).collect()
}

/// Where a form returns to: a dashboard path given by the form, else the
/// map (never another site: an open redirect would be a phishing aid).
fn back(fields: &[(String, String)]) -> String {
    match param(fields, "back") {
        Some(b) if b.starts_with("/ui") && !b.starts_with("//") && !b.contains(['\r', '\n', '\\']) => b.to_string(),
        _ => "/ui".into(),
    }
}

/// Whether the request came over HTTPS, as the TLS-terminating proxy in
/// front of the service says (`X-Forwarded-Proto: https`, or `proto=https`
/// in `Forwarded`). The service itself speaks plain HTTP. A client that
/// sends the header without a proxy only makes its own cookies `Secure`.
fn over_https(headers: &HeaderMap) -> bool {
    let forwarded_proto = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').next().is_some_and(|p| p.trim().eq_ignore_ascii_case("https")));
    let forwarded = headers.get(header::FORWARDED).and_then(|v| v.to_str().ok()).is_some_and(|v| {
        // The first (the client's) hop's parameters.
        v.split(',').next().is_some_and(|hop| {
            hop.split(';').any(|kv| {
                kv.split_once('=').is_some_and(|(k, v)| {
                    k.trim().eq_ignore_ascii_case("proto") && v.trim().trim_matches('"').eq_ignore_ascii_case("https")
                })
            })
        })
    });
    forwarded_proto || forwarded
}

/// A dashboard cookie: scoped to `/ui`, `HttpOnly`, `SameSite=Strict`, and
/// `Secure` when the browser came over HTTPS (it then never goes back
/// over plain HTTP, where anyone on the path could read an admin key).
fn set_cookie(name: &str, value: &str, https: bool, extra: &str) -> String {
    let secure = if https { "; Secure" } else { "" };
    format!("{name}={value}; Path=/ui; HttpOnly; SameSite=Strict{secure}{extra}")
}

fn see_other(to: &str, cookies: &[String]) -> Response {
    let mut resp = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(to) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    for c in cookies {
        if let Ok(v) = HeaderValue::from_str(c) {
            resp.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    resp
}

/// A refusal page; nothing was changed.
async fn refused(
    ui: &Ui,
    headers: &HeaderMap,
    peer: SocketAddr,
    status: StatusCode,
    title: &str,
    text: &str,
) -> Response {
    match ui.ctx(headers, peer, "/ui".into()).await {
        Ok(ctx) => page(&ctx, status, pages::message(&ctx, title, text)),
        Err(r) => r,
    }
}

const STALE_FORM: &str =
    "The form's security token is missing or does not belong to this browser; reload the page and try again.";

async fn login(
    State(ui): State<Ui>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let fields = form(&body);
    if !ui.csrf_ok(&headers, param(&fields, "csrf")) {
        return refused(&ui, &headers, peer, StatusCode::FORBIDDEN, "Refused", STALE_FORM).await;
    }
    let key = param(&fields, "key").unwrap_or("");
    if !valid_key_text(key) {
        return refused(&ui, &headers, peer, StatusCode::FORBIDDEN, "Refused", "Invalid duffy key").await;
    }
    match authenticate(&ui.app, peer, key).await {
        Ok(p) if p.admin => {
            info!(actor = %p.actor(), "dashboard: admin key entered");
            let age = format!("; Max-Age={}", ADMIN_COOKIE_AGE.as_secs());
            see_other(&back(&fields), &[set_cookie(ADMIN_COOKIE, key, over_https(&headers), &age)])
        }
        Ok(_) => refused(&ui, &headers, peer, StatusCode::FORBIDDEN, "Refused", "This key is not an admin key.").await,
        Err(AuthRefusal::Invalid) => {
            refused(&ui, &headers, peer, StatusCode::FORBIDDEN, "Refused", "Invalid duffy key").await
        }
        Err(AuthRefusal::Limited) => {
            let text = "Too many unknown keys from this address; try again later.";
            refused(&ui, &headers, peer, StatusCode::TOO_MANY_REQUESTS, "Refused", text).await
        }
        Err(AuthRefusal::Failed(e)) => {
            warn!(error = %e, "dashboard: authentication failed");
            (StatusCode::SERVICE_UNAVAILABLE, "store unavailable").into_response()
        }
    }
}

async fn logout(
    State(ui): State<Ui>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let fields = form(&body);
    if !ui.csrf_ok(&headers, param(&fields, "csrf")) {
        return refused(&ui, &headers, peer, StatusCode::FORBIDDEN, "Refused", STALE_FORM).await;
    }
    see_other("/ui", &[set_cookie(ADMIN_COOKIE, "", over_https(&headers), "; Max-Age=0")])
}

/// The node an action names, checked by the one hostname rule.
fn host_of(fields: &[(String, String)]) -> Result<&str, EngineError> {
    let h =
        param(fields, "host").ok_or_else(|| EngineError::InvalidRequest("the action needs a node (host)".into()))?;
    duffy_core::validate_hostname(h)
        .map_err(|e| EngineError::InvalidRequest(format!("invalid node name: {}", e.rule)))?;
    Ok(h)
}

/// An admin action: pause, resume, set-admin or recover, through the same
/// engine operations as the admin endpoints.
async fn action(
    State(ui): State<Ui>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let fields = form(&body);
    if !ui.csrf_ok(&headers, param(&fields, "csrf")) {
        return refused(&ui, &headers, peer, StatusCode::FORBIDDEN, "Refused", STALE_FORM).await;
    }
    let who = match ui.admin(&headers, peer).await {
        Ok(Some(p)) => p,
        Ok(None) => {
            let text = "This needs an admin key: enter one at the top of the page.";
            return refused(&ui, &headers, peer, StatusCode::FORBIDDEN, "Refused", text).await;
        }
        Err(AuthRefusal::Limited) => {
            let text = "Too many unknown keys from this address; try again later.";
            return refused(&ui, &headers, peer, StatusCode::TOO_MANY_REQUESTS, "Refused", text).await;
        }
        Err(AuthRefusal::Invalid) | Err(AuthRefusal::Failed(_)) => {
            return (StatusCode::SERVICE_UNAVAILABLE, "store unavailable").into_response();
        }
    };
    let engine = &ui.app.engine;
    let done = match param(&fields, "action") {
        Some("pause") => engine.pause(&who).await,
        Some("resume") => engine.resume(&who).await,
        Some("set-admin") => match host_of(&fields) {
            Ok(h) => engine.set_admin(&who, h).await.map(drop),
            Err(e) => Err(e),
        },
        Some("recover") => match host_of(&fields) {
            Ok(h) => engine.recover(&who, h).await.map(drop),
            Err(e) => Err(e),
        },
        _ => Err(EngineError::InvalidRequest("unknown action; allowed: pause, resume, set-admin, recover".into())),
    };
    match done {
        Ok(()) => see_other(&back(&fields), &[]),
        Err(e) => {
            let (status, text) = match &e {
                EngineError::NotAdmin => (StatusCode::FORBIDDEN, "This needs an admin key.".to_string()),
                EngineError::UnknownNode(h) => (StatusCode::NOT_FOUND, format!("No node named {h:?}.")),
                EngineError::InvalidRequest(_) => (StatusCode::BAD_REQUEST, e.to_string()),
                EngineError::Transition(_) | EngineError::NotPaused => (StatusCode::CONFLICT, e.to_string()),
                _ => {
                    warn!(error = %e, "dashboard: admin action failed");
                    (StatusCode::SERVICE_UNAVAILABLE, "The action failed: store unavailable.".to_string())
                }
            };
            refused(&ui, &headers, peer, status, "Not done", &text).await
        }
    }
}
