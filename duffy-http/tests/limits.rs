//! The serving loop's limits over real loopback sockets: header-read,
//! idle and request timeouts, the connection cap, the peer address handed
//! to handlers, and graceful shutdown. A router of its own (fast, slow and
//! peer-echoing handlers) stands in for the API so that each limit can be
//! driven on its own; `conn_limits_e2e.rs` runs them all against `duffy
//! serve` and `cico`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::routing::get;
use duffy_http::listener::{Limits, serve};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::timeout;

/// Bounds every wait: a limit that does not act makes the test fail here
/// instead of hanging.
const BOUND: Duration = Duration::from_secs(15);

struct Server {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
    /// Says when `/slowish` has started.
    entered: mpsc::UnboundedReceiver<()>,
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

async fn start(limits: Limits) -> Server {
    let (tx, entered) = mpsc::unbounded_channel();
    let router = Router::new()
        .route("/fast", get(|| async { "ok" }))
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(60)).await;
                "late"
            }),
        )
        .route(
            "/slowish",
            get(move || {
                let tx = tx.clone();
                async move {
                    let _ = tx.send(());
                    tokio::time::sleep(Duration::from_millis(1500)).await;
                    "done"
                }
            }),
        )
        .route("/peer", get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move { peer.to_string() }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        serve(listener, router, &limits, async {
            let _ = stopped.await;
        })
        .await
    });
    Server { addr, stop: Some(stop), task, entered }
}

impl Server {
    async fn stop(mut self) {
        let _ = self.stop.take().expect("running").send(());
        timeout(BOUND, self.task).await.expect("serve returns after shutdown").unwrap().unwrap();
    }
}

struct Answer {
    status: u16,
    head: String,
    body: String,
}

/// Reads one response (Content-Length framed) from `s`.
async fn read_answer(s: &mut TcpStream) -> Answer {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let (head, rest) = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break (String::from_utf8_lossy(&buf[..i]).to_string(), buf[i + 4..].to_vec());
        }
        let n = timeout(BOUND, s.read(&mut chunk)).await.expect("an answer in time").expect("read");
        assert!(n > 0, "connection closed before a full answer: {:?}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&chunk[..n]);
    };
    let len: usize = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap()))
        .expect("content-length");
    let mut body = rest;
    while body.len() < len {
        let n = timeout(BOUND, s.read(&mut chunk)).await.expect("the body in time").expect("read");
        assert!(n > 0, "connection closed mid-body");
        body.extend_from_slice(&chunk[..n]);
    }
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).expect("status code");
    Answer { status, head, body: String::from_utf8(body).unwrap() }
}

async fn request(s: &mut TcpStream, path: &str) -> Answer {
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes()).await.unwrap();
    read_answer(s).await
}

/// Waits until the server closes `s` (EOF or reset), reading and
/// discarding anything it sends.
async fn closed_by_server(s: &mut TcpStream) {
    let mut chunk = [0u8; 1024];
    timeout(BOUND, async {
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .expect("the server closes the connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_slowloris_clients_are_cut_off_at_the_header_read_timeout() {
    let server = start(Limits::new(secs(1.0), secs(60.0), secs(30.0), 100)).await;
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    let slowloris = TcpStream::connect(server.addr).await.unwrap();
    let (mut rd, mut wr) = slowloris.into_split();
    // One header byte every 200 ms: it never finishes its header.
    let dripping = tokio::spawn(async move {
        wr.write_all(b"GET /fast HTTP/1.1\r\nX-Slow: ").await.unwrap();
        for _ in 0..200 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if wr.write_all(b"a").await.is_err() {
                return true;
            }
        }
        false
    });
    // Meanwhile the service answers others.
    let mut other = TcpStream::connect(server.addr).await.unwrap();
    assert_eq!(request(&mut other, "/fast").await.body, "ok");
    closed_by_server(&mut silent).await;
    timeout(BOUND, async {
        let mut b = [0u8; 64];
        loop {
            match rd.read(&mut b).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .expect("the slowloris connection is closed");
    dripping.abort();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_alive_connection_waits_the_idle_timeout_not_the_header_timeout() {
    let server = start(Limits::new(secs(1.0), secs(6.0), secs(30.0), 100)).await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    assert_eq!(request(&mut s, "/fast").await.body, "ok");
    // Past the header-read timeout, within the idle one: still open.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let again = request(&mut s, "/fast").await;
    assert_eq!((again.status, again.body.as_str()), (200, "ok"), "{}", again.head);
    // Then idle for good: the server closes it.
    closed_by_server(&mut s).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_the_request_timeout_gets_a_503_with_a_json_string() {
    let server = start(Limits::new(secs(10.0), secs(60.0), secs(1.0), 100)).await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    let a = request(&mut s, "/slow").await;
    assert_eq!(a.status, 503, "{}", a.head);
    let head = a.head.to_ascii_lowercase();
    assert!(head.contains("content-type: application/json"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    let msg: String = serde_json::from_str(&a.body).unwrap_or_else(|e| panic!("not a JSON string ({e}): {}", a.body));
    assert!(msg.contains("limit of 1 s"), "{msg}");
    closed_by_server(&mut s).await;
    // The service goes on.
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    assert_eq!(request(&mut s, "/fast").await.body, "ok");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_cap_a_connection_gets_a_503_at_once_and_slots_come_back() {
    let server = start(Limits::new(secs(30.0), secs(30.0), secs(30.0), 3)).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(TcpStream::connect(server.addr).await.unwrap());
    }
    // The fourth is answered without sending anything.
    let mut extra = TcpStream::connect(server.addr).await.unwrap();
    let a = read_answer(&mut extra).await;
    assert_eq!(a.status, 503, "{}", a.head);
    assert!(a.head.to_ascii_lowercase().contains("connection: close"), "{}", a.head);
    let msg: String = serde_json::from_str(&a.body).unwrap_or_else(|e| panic!("not a JSON string ({e}): {}", a.body));
    assert!(msg.contains("limit of 3 open connections"), "{msg}");
    closed_by_server(&mut extra).await;
    // A client that sends its request at once gets the same answer.
    let mut eager = TcpStream::connect(server.addr).await.unwrap();
    eager.write_all(b"GET /fast HTTP/1.1\r\nHost: t\r\n\r\n").await.unwrap();
    assert_eq!(read_answer(&mut eager).await.status, 503);
    // The held ones are served, and closing one frees its slot.
    assert_eq!(request(&mut held[0], "/fast").await.body, "ok");
    drop(held.remove(1));
    timeout(BOUND, async {
        loop {
            let mut s = TcpStream::connect(server.addr).await.unwrap();
            if request(&mut s, "/fast").await.status == 200 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the freed slot serves a new connection");
    drop(held);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handlers_see_the_peer_address() {
    let server = start(Limits::new(secs(10.0), secs(60.0), secs(30.0), 100)).await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    let me = s.local_addr().unwrap();
    assert_eq!(request(&mut s, "/peer").await.body, me.to_string());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_requests_in_progress_and_closes_idle_connections() {
    let mut server = start(Limits::new(secs(30.0), secs(60.0), secs(30.0), 100)).await;
    let mut idle = TcpStream::connect(server.addr).await.unwrap();
    assert_eq!(request(&mut idle, "/fast").await.body, "ok");
    let mut busy = TcpStream::connect(server.addr).await.unwrap();
    busy.write_all(b"GET /slowish HTTP/1.1\r\nHost: t\r\n\r\n").await.unwrap();
    timeout(BOUND, server.entered.recv()).await.expect("the handler starts").expect("sender alive");
    let addr = server.addr;
    let _ = server.stop.take().unwrap().send(());
    // The idle connection is closed without waiting for its timeout, the
    // request in progress is answered in full, and then serve returns.
    closed_by_server(&mut idle).await;
    let a = read_answer(&mut busy).await;
    assert_eq!((a.status, a.body.as_str()), (200, "done"));
    timeout(BOUND, server.task).await.expect("serve returns once the connections are done").unwrap().unwrap();
    assert!(TcpStream::connect(addr).await.is_err(), "no new connections after shutdown");
}
