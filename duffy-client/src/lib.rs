//! A typed async client of Duffy's `/api/v1`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), duffy_client::ClientError> {
//! use duffy_client::{Client, wire::CreateSession};
//! let duffy = Client::new("http://duffy.example.org:8080", "KEY")?;
//! let req = CreateSession { pool: Some("9/x86_64".into()), count: Some(2), ..Default::default() };
//! let session = duffy.request_session(&req, |_| {}).await?;
//! println!("{} holds {:?}", session.id, session.hosts);
//! duffy.release(&session.id).await?;
//! # Ok(()) }
//! ```
//!
//! Every error the service answers with is a [`Problem`] (RFC 9457); it
//! comes back as [`ClientError::Problem`], whose [`ProblemType`] says what
//! happened in a way a program can branch on. The key travels only in the
//! `Authorization: Bearer` header, never in a URL. TLS is rustls.

pub mod wire;

use std::future::Future;
use std::pin::{Pin, pin};
use std::task::Poll;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;

use wire::{
    CreateKey, CreateSession, Created, CreatedKey, ExtendSession, KeyView, NodeDetail, NodeView, OvertimeView,
    PoolView, ProjectView, QueuedRequest, ServiceState, SessionView, SetProject,
};
pub use wire::{Problem, ProblemType};

/// How long one HTTP request may take. A session request that has to
/// prepare its nodes takes as long as the service's preparation timeout,
/// so this is generous; waiting in the queue is many short requests.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

/// How often a waiting request is polled. The service drops a waiting
/// request whose client stops asking (its queue poll timeout, 2 min by
/// default), so this must stay well under that.
pub const POLL_INTERVAL: Duration = Duration::from_secs(2);

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The service answered with a problem (RFC 9457). Boxed: it is much
    /// larger than the other variants.
    #[error("{}: {} (HTTP {})", .0.title, .0.detail, .0.status)]
    Problem(Box<Problem>),
    /// The service could not be reached, or the connection failed.
    #[error("request to {url} failed: {source}")]
    Transport {
        /// The URL called.
        url: String,
        /// What failed.
        #[source]
        source: reqwest::Error,
    },
    /// The service answered with something that is not `/api/v1`'s
    /// (another server at that address, a proxy's error page).
    #[error("unexpected answer from {url}: HTTP {status}: {body}")]
    Unexpected {
        /// The URL called.
        url: String,
        /// The status.
        status: u16,
        /// The start of the body.
        body: String,
    },
    /// The base URL or the key cannot be used.
    #[error("{0}")]
    Config(String),
    /// A waiting request ended without a session (cancelled, expired).
    #[error("request {id} ended without nodes: {reason}")]
    NotServed {
        /// The request.
        id: String,
        /// Why.
        reason: String,
    },
    /// The caller stopped a request for nodes
    /// ([`Client::request_session_until`]); says what became of what it
    /// had created on the service.
    #[error("{0}")]
    Interrupted(Interrupted),
}

/// What a stopped request for nodes left on the service: nothing, as far
/// as the client could see to it, or what an operator must look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Interrupted {
    /// Stopped before the service had created anything.
    NothingCreated,
    /// The waiting request was cancelled: no session will come of it.
    RequestCancelled {
        /// The request.
        id: String,
    },
    /// The request had been served (or was served as it was stopped): its
    /// session was released, its nodes go back to be reinstalled.
    SessionReleased {
        /// The session.
        id: String,
    },
    /// The request had already ended without a session (failed, dropped,
    /// cancelled by another client of the key).
    RequestEnded {
        /// The request.
        id: String,
        /// Its state.
        state: String,
    },
    /// Cancelling or releasing failed: the request or session named may
    /// still be live (see `duffy client list`, or release it by hand).
    CleanupFailed {
        /// What may be left: `request R` or `session S`.
        left: String,
        /// Why the cleanup failed.
        error: String,
    },
}

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Interrupted::NothingCreated => write!(f, "interrupted before anything was requested"),
            Interrupted::RequestCancelled { id } => write!(f, "interrupted: request {id} cancelled"),
            Interrupted::SessionReleased { id } => {
                write!(f, "interrupted: session {id} had been created and was released")
            }
            Interrupted::RequestEnded { id, state } => {
                write!(f, "interrupted: request {id} had already ended ({state})")
            }
            Interrupted::CleanupFailed { left, error } => {
                write!(f, "interrupted, but {left} may still be live (cleaning up failed: {error})")
            }
        }
    }
}

/// Runs `work` to its end while watching `stop` (polled until it has
/// completed once, which sets `stopped`). With `abandon`, `work` is
/// dropped as soon as `stop` has fired (`None`): only for work that
/// changes nothing on the service (a sleep, a status poll).
async fn beside<T, S: Future<Output = ()>>(
    work: impl Future<Output = T>,
    mut stop: Pin<&mut S>,
    stopped: &mut bool,
    abandon: bool,
) -> Option<T> {
    let mut work = pin!(work);
    std::future::poll_fn(|cx| {
        if !*stopped && stop.as_mut().poll(cx).is_ready() {
            *stopped = true;
        }
        if *stopped && abandon {
            return Poll::Ready(None);
        }
        work.as_mut().poll(cx).map(Some)
    })
    .await
}

impl ClientError {
    /// The problem's type, when the service answered with one of ours.
    pub fn problem_type(&self) -> Option<ProblemType> {
        match self {
            ClientError::Problem(p) => p.kind(),
            _ => None,
        }
    }
}

/// A connection to one Duffy service with one key. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    base: String,
    key: String,
    http: reqwest::Client,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Client").field("base", &self.base).finish_non_exhaustive()
    }
}

/// Percent-encodes one path segment (host names and ids are plain, but a
/// caller's typo must not turn into another path).
fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Client {
    /// A client of the service at `base` (`http://host:port`, no path)
    /// using `key`.
    pub fn new(base: &str, key: &str) -> Result<Client, ClientError> {
        let base = base.trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(ClientError::Config(format!("the service URL {base:?} must start with http:// or https://")));
        }
        let key = key.trim().to_string();
        if key.is_empty() || key.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(ClientError::Config("the API key is empty or contains spaces or control characters".into()));
        }
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .user_agent(concat!("duffy-client/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ClientError::Config(format!("building the HTTP client failed: {e}")))?;
        Ok(Client { base, key, http })
    }

    /// The service's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    async fn call<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        body: Option<&B>,
    ) -> Result<(StatusCode, T), ClientError> {
        let url = format!("{}/api/v1{path}", self.base);
        let mut req = self.http.request(method, &url).bearer_auth(&self.key);
        if !query.is_empty() {
            req = req.query(query);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let transport = |source| ClientError::Transport { url: url.clone(), source };
        let resp = req.send().await.map_err(transport)?;
        let status = resp.status();
        let problem = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with(wire::PROBLEM_JSON));
        let bytes = resp.bytes().await.map_err(transport)?;
        let unexpected = || ClientError::Unexpected {
            url: url.clone(),
            status: status.as_u16(),
            body: String::from_utf8_lossy(&bytes[..bytes.len().min(300)]).into_owned(),
        };
        if problem {
            let p: Problem = serde_json::from_slice(&bytes).map_err(|_| unexpected())?;
            return Err(ClientError::Problem(Box::new(p)));
        }
        if !status.is_success() {
            return Err(unexpected());
        }
        let v = serde_json::from_slice(&bytes).map_err(|_| unexpected())?;
        Ok((status, v))
    }

    async fn get<T: DeserializeOwned>(&self, path: &str, query: &[(&str, &str)]) -> Result<T, ClientError> {
        Ok(self.call::<(), T>(Method::GET, path, query, None).await?.1)
    }

    async fn post<B: Serialize + ?Sized, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T, ClientError> {
        Ok(self.call(Method::POST, path, &[], Some(body)).await?.1)
    }

    /// `POST /api/v1/sessions`: nodes now, or (with `wait`) a place in
    /// the queue.
    pub async fn create_session(&self, req: &CreateSession) -> Result<Created, ClientError> {
        self.post("/sessions", req).await
    }

    /// Creates a session and, if the request was queued, polls it until
    /// it is served, calling `progress` with each answer. Fails with
    /// [`ClientError::NotServed`] if the request is cancelled or expires.
    pub async fn request_session(
        &self,
        req: &CreateSession,
        progress: impl FnMut(&QueuedRequest),
    ) -> Result<SessionView, ClientError> {
        self.request_session_until(req, progress, std::future::pending()).await
    }

    /// [`Client::request_session`] that the caller can stop (`stop`
    /// completes: Ctrl-C, a deadline, a job being aborted) without leaving
    /// anything behind on the service: a request still waiting is
    /// cancelled, and a session it was served with (also one served while
    /// stopping) is released. Then fails with [`ClientError::Interrupted`],
    /// which says what was done. Simply dropping the future of
    /// `request_session` instead leaves the request in the queue: it would
    /// be served later, and its nodes held until the session expires.
    ///
    /// A call that may change something on the service (the creation, the
    /// cleanup) is never abandoned halfway: its answer is what says what
    /// there is to undo. Polls and the wait between them are cut short.
    pub async fn request_session_until(
        &self,
        req: &CreateSession,
        mut progress: impl FnMut(&QueuedRequest),
        stop: impl Future<Output = ()>,
    ) -> Result<SessionView, ClientError> {
        let mut stop = pin!(stop);
        let mut stopped = false;
        let created = beside(self.create_session(req), stop.as_mut(), &mut stopped, false).await;
        let mut queued = match created {
            Some(Ok(Created::Session(s))) if stopped => return Err(self.release_stopped(s.id).await),
            Some(Ok(Created::Session(s))) => return Ok(s),
            Some(Ok(Created::Queued(q))) => q,
            Some(Err(e)) => return Err(e),
            None => return Err(ClientError::Interrupted(Interrupted::NothingCreated)),
        };
        loop {
            if stopped {
                return Err(self.cancel_stopped(&queued.id).await);
            }
            progress(&queued);
            match queued.state.as_str() {
                "waiting" => {}
                "served" => {
                    if let Some(s) = queued.session {
                        return Ok(s);
                    }
                    return Err(ClientError::NotServed { id: queued.id, reason: "served without a session".into() });
                }
                _ => {
                    let reason = queued.reason.unwrap_or_else(|| queued.state.clone());
                    return Err(ClientError::NotServed { id: queued.id, reason });
                }
            }
            if beside(tokio::time::sleep(POLL_INTERVAL), stop.as_mut(), &mut stopped, true).await.is_none() {
                continue;
            }
            match beside(self.queued(&queued.id), stop.as_mut(), &mut stopped, true).await {
                Some(q) => queued = q?,
                None => continue,
            }
        }
    }

    /// Cancels a stopped request (releasing its session if it was served
    /// meanwhile) and says what became of it.
    async fn cancel_stopped(&self, id: &str) -> ClientError {
        let failed =
            |e: ClientError| Interrupted::CleanupFailed { left: format!("request {id}"), error: e.to_string() };
        let outcome = match self.cancel_request(id).await {
            Ok(q) if q.state == "cancelled" => Interrupted::RequestCancelled { id: q.id },
            Ok(q) => match q.session {
                Some(s) => return self.release_stopped(s.id).await,
                None => Interrupted::RequestEnded { id: q.id, state: q.state },
            },
            Err(e) => failed(e),
        };
        ClientError::Interrupted(outcome)
    }

    /// Releases the session of a stopped request.
    async fn release_stopped(&self, id: String) -> ClientError {
        ClientError::Interrupted(match self.release(&id).await {
            Ok(_) => Interrupted::SessionReleased { id },
            Err(e) => Interrupted::CleanupFailed { left: format!("session {id}"), error: e.to_string() },
        })
    }

    /// `GET /api/v1/requests/{id}`: a waiting request's position and
    /// estimate, or its session once served.
    pub async fn queued(&self, id: &str) -> Result<QueuedRequest, ClientError> {
        self.get(&format!("/requests/{}", segment(id)), &[]).await
    }

    /// `DELETE /api/v1/requests/{id}`: stops waiting.
    pub async fn cancel_request(&self, id: &str) -> Result<QueuedRequest, ClientError> {
        Ok(self.call::<(), _>(Method::DELETE, &format!("/requests/{}", segment(id)), &[], None).await?.1)
    }

    /// `GET /api/v1/sessions`: this key's live sessions.
    pub async fn sessions(&self) -> Result<Vec<SessionView>, ClientError> {
        self.get("/sessions", &[]).await
    }

    /// `GET /api/v1/sessions/{id}`.
    pub async fn session(&self, id: &str) -> Result<SessionView, ClientError> {
        self.get(&format!("/sessions/{}", segment(id)), &[]).await
    }

    /// `POST /api/v1/sessions/{id}/extend`: moves the expiry by `by`
    /// (default: the service's lease).
    pub async fn extend(&self, id: &str, by: Option<Duration>) -> Result<SessionView, ClientError> {
        let body = ExtendSession { by_secs: by.map(|d| d.as_secs()) };
        self.post(&format!("/sessions/{}/extend", segment(id)), &body).await
    }

    /// `POST /api/v1/sessions/{id}/release`: the nodes go back to be
    /// reinstalled.
    pub async fn release(&self, id: &str) -> Result<SessionView, ClientError> {
        self.post(&format!("/sessions/{}/release", segment(id)), &serde_json::json!({})).await
    }

    /// `POST /api/v1/sessions/{id}/fail`: the nodes are held for
    /// debugging.
    pub async fn fail(&self, id: &str) -> Result<SessionView, ClientError> {
        self.post(&format!("/sessions/{}/fail", segment(id)), &serde_json::json!({})).await
    }

    /// `GET /api/v1/pools`.
    pub async fn pools(&self) -> Result<Vec<PoolView>, ClientError> {
        self.get("/pools", &[]).await
    }

    /// `GET /api/v1/nodes`, filtered by state and pool when given.
    pub async fn nodes(&self, state: Option<&str>, pool: Option<&str>) -> Result<Vec<NodeView>, ClientError> {
        let mut q = Vec::new();
        if let Some(s) = state {
            q.push(("state", s));
        }
        if let Some(p) = pool {
            q.push(("pool", p));
        }
        self.get("/nodes", &q).await
    }

    /// `GET /api/v1/nodes/{hostname}`: the node and its history.
    pub async fn node(&self, hostname: &str) -> Result<NodeDetail, ClientError> {
        self.get(&format!("/nodes/{}", segment(hostname)), &[]).await
    }

    /// `GET /api/v1/projects` (admin): every project, by name.
    pub async fn projects(&self) -> Result<Vec<ProjectView>, ClientError> {
        self.get("/projects", &[]).await
    }

    /// `GET /api/v1/projects/{name}` (admin).
    pub async fn project(&self, name: &str) -> Result<ProjectView, ClientError> {
        self.get(&format!("/projects/{}", segment(name)), &[]).await
    }

    /// `PUT /api/v1/projects/{name}` (admin).
    pub async fn set_project(&self, name: &str, set: &SetProject) -> Result<ProjectView, ClientError> {
        Ok(self.call(Method::PUT, &format!("/projects/{}", segment(name)), &[], Some(set)).await?.1)
    }

    /// `GET /api/v1/keys` (admin).
    pub async fn keys(&self) -> Result<Vec<KeyView>, ClientError> {
        self.get("/keys", &[]).await
    }

    /// `POST /api/v1/keys` (admin).
    pub async fn create_key(&self, req: &CreateKey) -> Result<CreatedKey, ClientError> {
        self.post("/keys", req).await
    }

    /// `DELETE /api/v1/keys/{id}` (admin): revokes it.
    pub async fn revoke_key(&self, id: u64) -> Result<KeyView, ClientError> {
        Ok(self.call::<(), _>(Method::DELETE, &format!("/keys/{id}"), &[], None).await?.1)
    }

    /// `GET /api/v1/admin/overtime` (admin).
    pub async fn overtime(&self) -> Result<Vec<OvertimeView>, ClientError> {
        self.get("/admin/overtime", &[]).await
    }

    /// `POST /api/v1/admin/pause` (admin).
    pub async fn pause(&self) -> Result<ServiceState, ClientError> {
        self.post("/admin/pause", &serde_json::json!({})).await
    }

    /// `POST /api/v1/admin/resume` (admin).
    pub async fn resume(&self) -> Result<ServiceState, ClientError> {
        self.post("/admin/resume", &serde_json::json!({})).await
    }

    /// `POST /api/v1/nodes/{hostname}/set-admin` (admin): out of the pool.
    pub async fn set_admin(&self, hostname: &str) -> Result<NodeView, ClientError> {
        self.post(&format!("/nodes/{}/set-admin", segment(hostname)), &serde_json::json!({})).await
    }

    /// `POST /api/v1/nodes/{hostname}/recover` (admin): back to the pool.
    pub async fn recover(&self, hostname: &str) -> Result<NodeView, ClientError> {
        self.post(&format!("/nodes/{}/recover", segment(hostname)), &serde_json::json!({})).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problem_types_round_trip_through_their_uri() {
        for t in ProblemType::ALL {
            assert_eq!(ProblemType::from_uri(&t.uri()), Some(t));
        }
        assert_eq!(ProblemType::from_uri("about:blank"), None);
        assert_eq!(ProblemType::Insufficient.uri(), "urn:duffy:problem:insufficient");
    }

    #[test]
    fn path_segments_are_escaped() {
        assert_eq!(segment("n1.sim.duffy"), "n1.sim.duffy");
        assert_eq!(segment("../x y"), "..%2Fx%20y");
    }

    #[test]
    fn bad_configuration_is_refused_and_the_key_never_printed() {
        assert!(matches!(Client::new("duffy:8080", "k"), Err(ClientError::Config(_))));
        assert!(matches!(Client::new("http://duffy", " "), Err(ClientError::Config(_))));
        let c = Client::new("http://duffy:8080/", "sekrit").expect("client");
        assert_eq!(c.base(), "http://duffy:8080");
        assert!(!format!("{c:?}").contains("sekrit"));
    }
}
