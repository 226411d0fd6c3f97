//! End to end with the real legacy client: `cico` (python-cicoclient 0.4.7,
//! installed in `.venv` by `scripts/install-test-deps.sh`) against
//! `duffy serve` on its embedded default.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

fn cico_path() -> PathBuf {
    let p = workspace().join(".venv/bin/cico");
    assert!(
        p.exists(),
        "the cico client is missing at {}: run scripts/install-test-deps.sh (it installs python-cicoclient 0.4.7)",
        p.display()
    );
    p
}

struct Server {
    child: Child,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn duffy(db: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_duffy")).arg("--db").arg(db).args(args).output().expect("run duffy")
}

fn get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()
}

fn start(db: &Path) -> Server {
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_duffy"))
        .arg("--db")
        .arg(db)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start duffy serve");
    // Drain its log so it never blocks on a full pipe.
    let stderr = child.stderr.take().expect("stderr");
    std::thread::spawn(move || for _ in BufReader::new(stderr).lines() {});
    let server = Server { child, port };
    // The embedded default fills its pools within a minute.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let inv = if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            get(port, "/Inventory")
        } else {
            String::new()
        };
        if let Ok(serde_json::Value::Array(rows)) = serde_json::from_str::<serde_json::Value>(&inv) {
            let ready7 = rows.iter().filter(|r| r[5] == "Ready" && r[9] == "7").count();
            if ready7 >= 4 {
                return server;
            }
        }
        assert!(Instant::now() < deadline, "duffy serve did not fill its pool in time");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn cico(port: u16, key: &str, args: &[&str]) -> Output {
    Command::new(cico_path())
        .args(["--endpoint", &format!("http://127.0.0.1:{port}/"), "--api-key", key])
        .args(args)
        .output()
        .expect("run cico")
}

fn ok(o: &Output) -> String {
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(o.status.success(), "cico failed: {}\n{}", out, String::from_utf8_lossy(&o.stderr));
    out
}

#[test]
fn cico_against_the_embedded_default() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("duffy.db");
    // A key before the server starts, as an operator would.
    let out = duffy(&db, &["key", "create", "--project", "ci-project"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let key = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_eq!(key.len(), 36, "the key alone on stdout: {key:?}");
    let server = start(&db);
    let port = server.port;

    let inv = ok(&cico(port, &key, &["inventory", "--all"]));
    assert!(inv.contains("n1.sim.duffy") && inv.contains("Ready"), "{inv}");

    // node get --count 2: the comment column shows the ssid.
    let got = ok(&cico(port, &key, &["node", "get", "--count", "2", "-f", "json"]));
    let rows: Vec<serde_json::Value> = serde_json::from_str(&got).unwrap_or_else(|e| panic!("{e}: {got}"));
    assert_eq!(rows.len(), 2, "{got}");
    let ssid = rows[0]["comment"].as_str().expect("ssid in the comment column").to_string();
    assert!(rows.iter().all(|r| r["comment"] == ssid.as_str() && r["current_state"] == "Deployed"), "{got}");
    let table = ok(&cico(port, &key, &["inventory"]));
    assert!(table.contains(&ssid), "the default table shows the ssid: {table}");

    let mine = ok(&cico(port, &key, &["inventory", "--ssid", &ssid, "-f", "json"]));
    let mine: Vec<serde_json::Value> = serde_json::from_str(&mine).unwrap();
    assert_eq!(mine.len(), 2);

    let done = ok(&cico(port, &key, &["node", "done", &ssid, "-f", "json"]));
    let done: Vec<serde_json::Value> = serde_json::from_str(&done).unwrap();
    assert_eq!(done.len(), 2, "cico lists the released hosts");
    let after = ok(&cico(port, &key, &["inventory", "--ssid", &ssid, "-f", "json"]));
    assert_eq!(serde_json::from_str::<Vec<serde_json::Value>>(&after).unwrap().len(), 0);

    // An unknown key: cico fails, and nothing is allocated.
    let bad = cico(port, "00000000-0000-4000-8000-000000000000", &["node", "get", "--retry-interval", "0"]);
    assert!(!bad.status.success(), "an unknown key must fail: {}", String::from_utf8_lossy(&bad.stdout));
    let full = get(port, "/Inventory");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&full).unwrap();
    assert!(rows.iter().all(|r| r[5] != "Deployed"), "nothing deployed after the bad key");

    // Stops cleanly on SIGTERM.
    let mut server = server;
    let pid = server.child.id();
    assert!(Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(st) = server.child.try_wait().unwrap() {
            assert!(st.success(), "exit status {st}");
            break;
        }
        assert!(Instant::now() < deadline, "did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}
