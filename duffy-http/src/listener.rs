//! The HTTP serving loop with limits on connections and time.
//!
//! `axum::serve` runs hyper without a timer, so hyper's header-read timeout
//! is silently dropped, and it has no idle timeout, no request timeout and
//! no cap on connections: a few thousand idle or slowloris clients exhaust
//! the file descriptors and `accept` fails with EMFILE for everyone. This
//! loop serves any [`Router`] on any [`TcpListener`] with:
//!
//! - a cap on open connections (a semaphore shared by every listener of
//!   one [`Limits`]): one more connection gets a fixed `503` written
//!   straight into the socket and is closed, without reading its request
//!   and without a connection task;
//! - a header-read timeout, counted from the accept for the first request
//!   and from the first byte for a later one on a kept-alive connection;
//! - an idle timeout for a kept-alive connection with no request in
//!   progress, which also closes a connection whose client stopped reading
//!   its response;
//! - a per-request timeout answered with a `503` and a JSON string, the
//!   legacy API's shape for a human-readable error;
//! - accept errors (EMFILE, ENFILE, ECONNABORTED, ...) logged and survived;
//! - graceful shutdown: the listener is closed, idle connections are closed,
//!   requests in progress finish.
//!
//! The two connection timeouts are enforced by a per-connection supervisor
//! that watches the connection's I/O rather than by hyper: hyper 1.x starts
//! its header timer when it starts waiting for a request, so on a kept-alive
//! connection that timer would also be the idle timeout (the two could not
//! differ), and it has no idle timeout at all.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{HeaderValue, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Instant;
use tower::ServiceExt;
use tracing::{debug, error, info, warn};

use crate::config::LimitsConfig;

/// Descriptors kept out of the connection cap's default for everything
/// else the service opens: the database and its journal, installer and
/// `ssh` children's pipes, BMC sockets, logs.
const RESERVED_FDS: u64 = 256;
/// The default cap never exceeds this, however high the open-file limit.
const DEFAULT_MAX_CONNECTIONS: u64 = 10_000;
/// How often repeated warnings (refused connections, accept errors) are
/// logged at most, so that a flood does not also flood the log.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// The limits one or more listeners serve with. Clones share one pool of
/// connection slots, so a second listener (e.g. for `/Install/*`) counts
/// against the same cap as the first.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Time a client has to send a request's complete header.
    pub header_read: Duration,
    /// A kept-alive connection with nothing in progress is closed after this.
    pub idle: Duration,
    /// A request not answered within this time gets a 503.
    pub request: Duration,
    max_connections: usize,
    slots: Arc<Semaphore>,
    over_cap: Arc<[u8]>,
}

impl Limits {
    /// Limits with their own pool of `max_connections` slots (at least one).
    pub fn new(header_read: Duration, idle: Duration, request: Duration, max_connections: usize) -> Limits {
        let max_connections = max_connections.clamp(1, Semaphore::MAX_PERMITS);
        let body = format!(
            "\"too many connections: the service is at its limit of {max_connections} open connections; try again \
             shortly\"\n"
        );
        let over_cap = format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: \
             1\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        Limits {
            header_read,
            idle,
            request,
            max_connections,
            slots: Arc::new(Semaphore::new(max_connections)),
            over_cap: over_cap.into_bytes().into(),
        }
    }

    /// The limits of a `[limits]` section: raises the soft open-file limit
    /// to the hard one, then fills in what the section leaves to defaults
    /// (the request timeout from `prepare_timeout`, the connection cap from
    /// the open-file limit), and logs the result.
    pub fn from_config(cfg: &LimitsConfig, policy: &duffy_core::Policy) -> Limits {
        let nofile = match raise_nofile_limit() {
            Ok(NofileLimit { before, after }) => {
                if before != after {
                    info!(before = ?before, after = ?after, "raised the open-file limit to its hard limit");
                }
                after
            }
            Err(e) => {
                warn!(error = %e, "cannot raise the open-file limit");
                rustix::process::getrlimit(rustix::process::Resource::Nofile).current
            }
        };
        let max_connections = match (cfg.max_connections, nofile) {
            (Some(m), Some(n)) if m as u64 + 64 > n => {
                warn!(
                    max_connections = m,
                    open_file_limit = n,
                    "max_connections is close to or above the open-file limit: accept may fail with EMFILE before \
                     the cap answers 503"
                );
                m
            }
            (Some(m), _) => m,
            (None, Some(n)) => default_max_connections(n),
            (None, None) => DEFAULT_MAX_CONNECTIONS as usize,
        };
        let request = cfg.request_timeout(policy);
        info!(
            header_read_s = cfg.header_read.as_secs_f64(),
            idle_s = cfg.idle.as_secs_f64(),
            request_s = request.as_secs_f64(),
            max_connections,
            open_file_limit = ?nofile,
            "connection limits"
        );
        Limits::new(cfg.header_read, cfg.idle, request, max_connections)
    }

    /// The cap on open connections.
    pub fn max_connections(&self) -> usize {
        self.max_connections
    }
}

/// The default cap for an open-file limit of `nofile`: the limit less a
/// reserve (half of it when the limit is small), at most 10,000.
fn default_max_connections(nofile: u64) -> usize {
    let usable = nofile.saturating_sub(RESERVED_FDS).max(nofile / 2).max(1);
    usable.min(DEFAULT_MAX_CONNECTIONS) as usize
}

/// The soft open-file limit before and after [`raise_nofile_limit`]
/// (`None`: unlimited).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NofileLimit {
    /// The soft limit the process started with.
    pub before: Option<u64>,
    /// The soft limit after raising it to the hard one: what the
    /// connection cap is derived from.
    pub after: Option<u64>,
}

/// Pending connections the kernel queues for `accept` (capped by
/// `net.core.somaxconn`, 4096 by default on Linux).
const BACKLOG: u32 = 1024;

/// Binds a listening socket with a backlog for bursts of clients (a farm's
/// machines booting at once, a wave of CI jobs): with the 128 that
/// `TcpListener::bind` asks for, a burst overflows the queue and each
/// overflowing client waits a second or more for its SYN to be resent.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    // As `TcpListener::bind`: a restarted service can bind at once even
    // with connections of the previous one in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// Raises the process's soft `RLIMIT_NOFILE` to its hard limit: the soft
/// default (often 1024) is far below what a service holding thousands of
/// connections needs, and the hard limit is what the administrator allows.
pub fn raise_nofile_limit() -> io::Result<NofileLimit> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let current = getrlimit(Resource::Nofile);
    let before = current.current;
    if current.current == current.maximum {
        return Ok(NofileLimit { before, after: before });
    }
    setrlimit(Resource::Nofile, Rlimit { current: current.maximum, maximum: current.maximum })?;
    Ok(NofileLimit { before, after: getrlimit(Resource::Nofile).current })
}

/// Serves `router` on `listener` with `limits` until `shutdown` completes,
/// then stops accepting, closes idle connections, lets requests in progress
/// finish and returns when every connection of this listener is closed.
/// Handlers see the peer as [`ConnectInfo<SocketAddr>`], as with axum's
/// `into_make_service_with_connect_info`.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: &Limits,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let local = listener.local_addr()?;
    // Every connection task holds a receiver: `send(true)` asks them to
    // finish, `closed()` says the last one has.
    let (stop, stop_rx) = watch::channel(false);
    let mut shutdown = pin!(shutdown);
    let mut refused = Throttled::default();
    let mut failed = Throttled::default();
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                if let Some(n) = failed.tick() {
                    error!(%local, error = %e, errors = n, "accept failed; the service goes on");
                }
                // Out of descriptors or memory: the pending connection stays
                // in the backlog and accept would fail again at once, so
                // wait for connections to close. A connection-level error
                // (aborted, reset, protocol) only loses that connection.
                if is_resource_error(&e) {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                continue;
            }
        };
        let Ok(permit) = limits.slots.clone().try_acquire_owned() else {
            if let Some(n) = refused.tick() {
                warn!(%local, max_connections = limits.max_connections, refused = n, "connection cap reached: refusing with 503");
            }
            refuse(stream, &limits.over_cap);
            continue;
        };
        tokio::spawn(connection(stream, peer, router.clone(), limits.clone(), stop_rx.clone(), permit));
    }
    drop(listener);
    drop(stop_rx);
    debug!(%local, "listener closed; finishing open connections");
    let _ = stop.send(true);
    stop.closed().await;
    Ok(())
}

fn is_resource_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error().map(rustix::io::Errno::from_raw_os_error),
        Some(
            rustix::io::Errno::MFILE | rustix::io::Errno::NFILE | rustix::io::Errno::NOBUFS | rustix::io::Errno::NOMEM
        )
    )
}

/// Counts repeated events and says when to log them: at the first, then
/// at most once per [`LOG_EVERY`], with how many happened since.
#[derive(Default)]
struct Throttled {
    last: Option<Instant>,
    count: u64,
}

impl Throttled {
    fn tick(&mut self) -> Option<u64> {
        self.count += 1;
        let now = Instant::now();
        if self.last.is_some_and(|l| now.duration_since(l) < LOG_EVERY) {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.count))
    }
}

/// The fast answer over the cap: one non-blocking write of a fixed reply
/// into the new socket's empty send buffer (it fits whole), then close.
/// The request is never read, and no task or timer is spent on it.
fn refuse(stream: TcpStream, reply: &[u8]) {
    use std::io::Write;
    // Through the std socket: tokio's `try_write` reports WouldBlock until
    // the reactor has seen the new socket writable, which it has not yet.
    match stream.into_std() {
        Ok(mut s) => {
            let _ = s.write(reply);
        }
        Err(e) => debug!(error = %e, "refusing a connection"),
    }
}

/// What the supervisor of one connection knows about it, updated by its
/// I/O and its requests. Times are milliseconds since the accept.
struct Activity {
    start: Instant,
    /// The last read or write that moved bytes, or the end of a handler.
    last_io: AtomicU64,
    /// When the request header now being read began ([`NONE`]: no header
    /// is being read).
    head_since: AtomicU64,
    /// Requests being handled (0 or 1: HTTP/1.1 handles them in turn).
    in_flight: AtomicUsize,
    /// Wakes the supervisor when a header starts, to arm its timeout.
    head_started: Notify,
}

const NONE: u64 = u64::MAX;

impl Activity {
    fn new() -> Activity {
        // The first request's header is timed from the accept: a client
        // that connects and sends nothing is as slow as a slowloris one.
        Activity {
            start: Instant::now(),
            last_io: AtomicU64::new(0),
            head_since: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            head_started: Notify::new(),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(NONE - 1)
    }

    fn at(&self, ms: u64) -> Instant {
        self.start + Duration::from_millis(ms)
    }

    fn read(&self, n: usize) {
        if n == 0 {
            return;
        }
        let now = self.now();
        self.last_io.store(now, Ordering::Relaxed);
        if self.in_flight.load(Ordering::Relaxed) == 0
            && self.head_since.compare_exchange(NONE, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
        {
            self.head_started.notify_one();
        }
    }

    fn wrote(&self, n: usize) {
        if n > 0 {
            self.last_io.store(self.now(), Ordering::Relaxed);
        }
    }

    fn request_started(&self) {
        self.head_since.store(NONE, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    fn request_ended(&self) {
        // The idle time starts when the answer is ready, not when the last
        // byte of the request came in (a long handler is not idleness).
        self.last_io.store(self.now(), Ordering::Relaxed);
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// When the connection must be closed unless something happens first,
    /// and why; `None` while a request is being handled (the request
    /// timeout bounds that).
    fn deadline(&self, limits: &Limits) -> Option<(Instant, &'static str)> {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return None;
        }
        match self.head_since.load(Ordering::Relaxed) {
            NONE => Some((self.at(self.last_io.load(Ordering::Relaxed)) + limits.idle, "idle timeout")),
            since => Some((self.at(since) + limits.header_read, "header read timeout")),
        }
    }
}

/// Ends a request's in-flight count when its handler finishes or is
/// dropped (client gone, request timeout).
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.request_ended();
    }
}

/// The socket, reporting every read and write that moved bytes.
struct Watched {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            self.activity.read(buf.filled().len() - before);
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.activity.wrote(n);
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            self.activity.wrote(n);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The answer to a request that outlived the request timeout.
fn timed_out(limit: Duration) -> Response<Body> {
    let msg = format!(
        "the request was not answered within the service's limit of {} s; it was abandoned, try again",
        limit.as_secs_f64()
    );
    let mut body = serde_json::to_vec(&msg).unwrap_or_default();
    body.push(b'\n');
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    // The abandoned handler may have left the request body half-read.
    r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

/// Serves one connection under its supervisor; the slot is freed when the
/// connection is closed.
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    router: Router,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
    _slot: OwnedSemaphorePermit,
) {
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Watched { inner: stream, activity: activity.clone() });
    let request_limit = limits.request;
    let on_request = activity.clone();
    let service = service_fn(move |mut req: Request<Incoming>| {
        on_request.request_started();
        let in_flight = InFlight(on_request.clone());
        req.extensions_mut().insert(ConnectInfo(peer));
        let router = router.clone();
        async move {
            let _in_flight = in_flight;
            let (method, path) = (req.method().clone(), req.uri().path().to_owned());
            match tokio::time::timeout(request_limit, router.oneshot(req.map(Body::new))).await {
                Ok(Ok(response)) => Ok::<_, Infallible>(response),
                Ok(Err(never)) => match never {},
                Err(_) => {
                    warn!(%peer, %method, %path, limit_s = request_limit.as_secs_f64(), "request timed out");
                    Ok(timed_out(request_limit))
                }
            }
        }
    });
    let mut builder = http1::Builder::new();
    // The supervisor below times headers; hyper's own timer is left off
    // (see the module's documentation).
    builder.header_read_timeout(None);
    let mut conn = pin!(builder.serve_connection(io, service));
    let mut stopping = false;
    loop {
        let deadline = activity.deadline(&limits);
        // While a request is handled there is no connection deadline; look
        // again after a while (its end also moves the idle clock).
        let wake = deadline.map_or_else(|| Instant::now() + limits.header_read.min(limits.idle), |(at, _)| at);
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    debug!(%peer, error = %e, "connection ended with an error");
                }
                return;
            }
            () = tokio::time::sleep_until(wake) => {
                if let Some((at, why)) = activity.deadline(&limits) {
                    if at <= Instant::now() {
                        debug!(%peer, why, "closing the connection");
                        return;
                    }
                }
            }
            () = activity.head_started.notified() => {}
            _ = stop.changed(), if !stopping => {
                // Closes the connection if it is idle, or after the
                // response in progress.
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_cap_leaves_room_for_the_rest_of_the_service() {
        assert_eq!(default_max_connections(1024), 768);
        assert_eq!(default_max_connections(300), 150);
        assert_eq!(default_max_connections(20_000), 10_000);
        assert_eq!(default_max_connections(u64::MAX), 10_000);
        assert_eq!(default_max_connections(0), 1);
    }

    #[test]
    fn the_over_cap_reply_is_a_complete_503_with_a_json_string() {
        let l = Limits::new(Duration::from_secs(1), Duration::from_secs(1), Duration::from_secs(1), 7);
        let text = String::from_utf8(l.over_cap.to_vec()).expect("utf-8");
        let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
        assert!(head.starts_with("HTTP/1.1 503 "), "{head}");
        assert!(head.contains(&format!("content-length: {}", body.len())), "{head}");
        assert!(head.contains("connection: close"), "{head}");
        let msg: String = serde_json::from_str(body).expect("a JSON string");
        assert!(msg.contains("limit of 7 open connections"), "{msg}");
    }

    #[tokio::test]
    async fn a_header_is_timed_from_its_first_byte_after_a_request() {
        let l = Limits::new(Duration::from_secs(2), Duration::from_secs(60), Duration::from_secs(1), 1);
        let a = Activity::new();
        assert_eq!(a.deadline(&l).map(|d| d.1), Some("header read timeout"), "the first header from the accept");
        a.request_started();
        assert!(a.deadline(&l).is_none(), "no connection deadline while a request is handled");
        a.read(10); // the rest of a request body: not a new header
        assert!(a.deadline(&l).is_none());
        a.request_ended();
        assert_eq!(a.deadline(&l).map(|d| d.1), Some("idle timeout"));
        a.read(0);
        assert_eq!(a.deadline(&l).map(|d| d.1), Some("idle timeout"), "EOF is not a header");
        a.read(1);
        assert_eq!(a.deadline(&l).map(|d| d.1), Some("header read timeout"));
    }
}
