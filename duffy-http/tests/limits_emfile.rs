//! The serving loop survives running out of file descriptors: `accept`
//! fails with EMFILE while the table is full, and once descriptors are
//! free again the service accepts and answers as before. Alone in its test
//! binary because it lowers the whole process's open-file limit.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::time::Duration;

use axum::Router;
use axum::routing::get;
use duffy_http::listener::{Limits, serve};
use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

fn set_nofile_soft(soft: Option<u64>) {
    let l = getrlimit(Resource::Nofile);
    setrlimit(Resource::Nofile, Rlimit { current: soft, maximum: l.maximum }).expect("setrlimit");
}

fn open_fds() -> u64 {
    std::fs::read_dir("/proc/self/fd").expect("/proc/self/fd").count() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_goes_on_after_accept_fails_for_want_of_descriptors() {
    let router = Router::new().route("/fast", get(|| async { "ok" }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // A cap far above the descriptors, so that the table fills before it.
    let limits = Limits::new(Duration::from_secs(1), Duration::from_secs(1), Duration::from_secs(10), 10_000);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        serve(listener, router, &limits, async {
            let _ = stopped.await;
        })
        .await
    });

    let original = getrlimit(Resource::Nofile).current;
    set_nofile_soft(Some(open_fds() + 40));
    // Connect until this process (client and server alike) is out of
    // descriptors; the server's accepts fail with EMFILE meanwhile.
    let mut clients = Vec::new();
    let mut exhausted = false;
    for _ in 0..200 {
        match TcpStream::connect(addr).await {
            Ok(s) => clients.push(s),
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(rustix::io::Errno::MFILE.raw_os_error()), "{e}");
                exhausted = true;
                break;
            }
        }
    }
    assert!(exhausted, "the descriptor table never filled");
    // One more pending connection in the backlog that the server cannot
    // take while the table is full.
    clients.pop();
    if let Ok(s) = TcpStream::connect(addr).await {
        clients.push(s);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(clients);
    set_nofile_soft(original);

    // The loop went on: new clients are served.
    let answer = timeout(Duration::from_secs(15), async {
        loop {
            if let Ok(mut s) = TcpStream::connect(addr).await {
                if s.write_all(b"GET /fast HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").await.is_ok() {
                    let mut out = String::new();
                    if s.read_to_string(&mut out).await.is_ok() && out.starts_with("HTTP/1.1 200") {
                        return out;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the service answers again once descriptors are free");
    assert!(answer.ends_with("ok"), "{answer}");
    let _ = stop.send(());
    timeout(Duration::from_secs(15), server).await.expect("serve returns").unwrap().unwrap();
}
