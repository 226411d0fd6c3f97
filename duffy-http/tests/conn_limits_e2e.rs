//! 3,000 idle and slowloris connections against a real `duffy serve`
//! started with the soft open-file limit of a default login (1024): the
//! service raises it, `cico node get` and `cico node done` still succeed,
//! one connection more than the cap is answered with a 503 at once, and
//! once the header-read and idle timeouts have passed the service's open
//! descriptors are back near where they started. Everything is on
//! loopback, bounded in count and time, and closed by the test.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use duffy_testsupport::duffy;
use duffy_testsupport::service::{Service, cico};
use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

const IDLE: usize = 1000;
const SLOWLORIS: usize = 1000;
const KEPT_ALIVE: usize = 1000;
const CAP: usize = 3100;
/// The limits the service runs with: short, so that the test sees them act.
const HEADER_READ_S: u64 = 10;
const IDLE_S: u64 = 12;

fn set_nofile_soft(soft: u64) {
    let l = getrlimit(Resource::Nofile);
    setrlimit(Resource::Nofile, Rlimit { current: Some(soft), maximum: l.maximum }).expect("setrlimit");
}

fn start(dir: &Path) -> Service {
    let db = dir.join("duffy.db");
    let cfg = dir.join("duffy.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[policy]
rate_limit = "off"
tick = 1

[[pools]]
release = "7"
arch = "x86_64"
standby = 2

[hardware]
kind = "simulated"
machines = 4
install_min_ms = 50
install_max_ms = 100
prepare_ms = 10

[limits]
header_read = {HEADER_READ_S}
idle = {IDLE_S}
max_connections = {CAP}
"#
        ),
    )
    .unwrap();
    // The child starts with the soft limit of a default login; the service
    // must raise it itself. (Only this test runs in this binary, so no
    // other child inherits the lowered limit.)
    let serve = duffy!().serve(&db).config(&cfg);
    let hard = getrlimit(Resource::Nofile).maximum;
    set_nofile_soft(1024);
    let mut server = serve.spawn();
    set_nofile_soft(hard.expect("a finite hard limit"));
    server.wait_listening();
    server.wait_ready("7", 2, Duration::from_secs(60));
    server
}

fn ok(o: &Output, server: &Service) -> String {
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        o.status.success(),
        "cico failed: {out}\n{}\nservice log:\n{}",
        String::from_utf8_lossy(&o.stderr),
        server.log_tail(30)
    );
    out
}

/// Connects, or fails the test if the service no longer accepts (the
/// kernel would otherwise retry for minutes).
fn connect(port: u16) -> TcpStream {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("the service no longer accepts connections: {e}"))
}

/// True if the server has closed `s` (EOF or reset); `s` must be
/// non-blocking. Anything the server sent is discarded.
fn closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 1024];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return true,
        }
    }
}

#[test]
fn thousands_of_idle_and_slowloris_connections_do_not_lock_out_cico() {
    // This process holds 3,000+ sockets: raise its own soft limit.
    let mut hard = getrlimit(Resource::Nofile).maximum.unwrap_or(u64::MAX);
    if hard < 8192 {
        // As root (CI), the hard limit can be raised too.
        let _ = setrlimit(Resource::Nofile, Rlimit { current: Some(8192), maximum: Some(8192) });
        hard = getrlimit(Resource::Nofile).maximum.unwrap_or(u64::MAX);
    }
    assert!(hard >= 8192, "this test needs a hard open-file limit of at least 8192, the machine allows {hard}");
    set_nofile_soft(hard);

    let dir = tempfile::tempdir().unwrap();
    let out = duffy!().run(&dir.path().join("duffy.db"), &["key", "create", "--project", "ci-project"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let key = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let server = start(dir.path());
    let port = server.port();

    // The service raised its soft open-file limit to the hard one.
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", server.pid())).unwrap();
    let row = limits.lines().find(|l| l.starts_with("Max open files")).expect("Max open files row");
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cols[3], cols[4], "soft open-file limit raised to the hard one: {row}");

    let baseline = server.open_fds();
    assert!(baseline > 0, "cannot read /proc/{}/fd", server.pid());

    // 1,000 that send nothing, 1,000 that never finish their header, and
    // 1,000 kept alive after a request.
    let t0 = Instant::now();
    let mut idle: Vec<TcpStream> = (0..IDLE).map(|_| connect(port)).collect();
    let mut slow: Vec<TcpStream> = (0..SLOWLORIS).map(|_| connect(port)).collect();
    for s in &mut slow {
        s.write_all(b"GET /Inventory HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ").unwrap();
    }
    let mut kept: Vec<TcpStream> = (0..KEPT_ALIVE).map(|_| connect(port)).collect();
    for s in &mut kept {
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    }
    for s in &mut kept {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut b = [0u8; 512];
        let n = s.read(&mut b).expect("a /healthz answer on every kept-alive connection");
        assert!(b[..n].starts_with(b"HTTP/1.1 200"), "{:?}", String::from_utf8_lossy(&b[..n]));
    }
    // A header byte a second on every slowloris connection, until told to stop.
    let dripping = Arc::new(AtomicBool::new(true));
    let drip = {
        let dripping = dripping.clone();
        let mut clones: Vec<TcpStream> = slow.iter().map(|s| s.try_clone().unwrap()).collect();
        for s in &clones {
            s.set_nonblocking(true).unwrap();
        }
        std::thread::spawn(move || {
            while dripping.load(Ordering::Relaxed) {
                for s in &mut clones {
                    let _ = s.write(b"a");
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        })
    };
    let opened = Instant::now();
    eprintln!("{} connections opened in {:.1} s", IDLE + SLOWLORIS + KEPT_ALIVE, t0.elapsed().as_secs_f64());
    let mut peak = server.open_fds();
    while peak < baseline + 2900 && opened.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(50));
        peak = peak.max(server.open_fds());
    }

    // With all of them open, the real client still gets and returns nodes.
    let got = ok(&cico(port, &key, &["node", "get", "-f", "json"]), &server);
    let rows: Vec<serde_json::Value> = serde_json::from_str(&got).unwrap_or_else(|e| panic!("{e}: {got}"));
    assert_eq!(rows.len(), 1, "{got}");
    let ssid = rows[0]["comment"].as_str().expect("ssid in the comment column").to_string();
    let done = ok(&cico(port, &key, &["node", "done", &ssid, "-f", "json"]), &server);
    assert_eq!(serde_json::from_str::<Vec<serde_json::Value>>(&done).unwrap().len(), 1, "{done}");
    eprintln!(
        "service descriptors: baseline {baseline}, peak {peak}, after cico {} ({:.1} s after opening)",
        server.open_fds(),
        opened.elapsed().as_secs_f64()
    );
    assert!(peak >= baseline + 2900, "the service held the connections: {peak} descriptors, baseline {baseline}");

    // Over the cap: an immediate 503 with a JSON string, without a request.
    let mut probes = Vec::new();
    let mut refusal = None;
    let deadline = Instant::now() + Duration::from_secs(15);
    while refusal.is_none() {
        assert!(Instant::now() < deadline, "no 503 from the cap after {} more connections", probes.len());
        if probes.len() < 400 {
            for _ in 0..50 {
                let s = connect(port);
                s.set_nonblocking(true).unwrap();
                probes.push(s);
            }
        }
        std::thread::sleep(Duration::from_millis(100));
        for s in &mut probes {
            let mut b = [0u8; 1024];
            if let Ok(n) = s.read(&mut b) {
                if n > 0 {
                    refusal = Some(String::from_utf8_lossy(&b[..n]).to_string());
                    break;
                }
            }
        }
    }
    let refusal = refusal.unwrap();
    assert!(refusal.starts_with("HTTP/1.1 503 "), "{refusal}");
    let body = refusal.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
    let msg: String = serde_json::from_str(body).unwrap_or_else(|e| panic!("not a JSON string ({e}): {body}"));
    assert!(msg.contains(&format!("limit of {CAP} open connections")), "{msg}");
    drop(probes);

    // The timeouts close all 3,000 although this side keeps them open; the
    // service's descriptors are back near their baseline.
    let deadline = Instant::now() + Duration::from_secs(HEADER_READ_S.max(IDLE_S) + 20);
    loop {
        let now = server.open_fds();
        if now <= baseline + 16 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the service still has {now} descriptors open (baseline {baseline}):\n{}",
            server.log_tail(30)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    dripping.store(false, Ordering::Relaxed);
    drip.join().unwrap();
    for (what, socks) in [("idle", &mut idle), ("slowloris", &mut slow), ("kept-alive", &mut kept)] {
        let open = socks
            .iter_mut()
            .filter_map(|s| {
                s.set_nonblocking(true).unwrap();
                (!closed(s)).then_some(())
            })
            .count();
        assert_eq!(open, 0, "{open} {what} connections not closed by the service");
    }
    // And it still serves.
    let ok_again = ok(&cico(port, &key, &["inventory", "--all", "-f", "json"]), &server);
    assert!(ok_again.contains("Ready"), "{ok_again}");
}
