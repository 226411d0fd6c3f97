//! `duffy serve` replicas on one PostgreSQL database, as child processes:
//! started from a configuration file, their logs in files, stopped,
//! frozen, thawed and killed by signals; plain HTTP to them; the `duffy`
//! binary against the database URL.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use duffy_backend_postgres::tokio_postgres;

/// A running `duffy serve`.
pub struct Replica {
    child: Child,
    /// Its HTTP port on 127.0.0.1.
    pub port: u16,
    /// Its log (stderr).
    pub log: PathBuf,
    stopped: bool,
}

impl Drop for Replica {
    fn drop(&mut self) {
        if self.stopped {
            let _ = self.signal("CONT");
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        duffy_backend_postgres::test_cluster::forget_child(self.child.id());
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

impl Replica {
    /// Starts `duffy serve --config config` on a free port and waits until
    /// it answers `/healthz`.
    pub fn start(config: &Path, log: PathBuf) -> Replica {
        let port = free_port();
        let err = std::fs::File::create(&log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_duffy"))
            .args(["serve", "--config"])
            .arg(config)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("start duffy serve");
        // A hung test's watchdog kills it before it aborts the test.
        duffy_backend_postgres::test_cluster::kill_on_timeout(child.id());
        let mut r = Replica { child, port, log, stopped: false };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = r.child.try_wait().expect("wait") {
                panic!("duffy serve exited early ({st}): {}", r.log_text());
            }
            if get(port, "/healthz").0 == 200 {
                return r;
            }
            assert!(Instant::now() < deadline, "duffy serve did not come up: {}", r.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn signal(&self, sig: &str) -> bool {
        Command::new("kill").args([&format!("-{sig}"), &self.pid().to_string()]).status().is_ok_and(|s| s.success())
    }

    /// SIGKILL: gone at once, nothing cleaned up.
    pub fn kill(mut self) {
        self.child.kill().expect("kill");
        self.child.wait().expect("wait");
    }

    /// SIGSTOP: frozen, its sockets open.
    pub fn freeze(&mut self) {
        assert!(self.signal("STOP"));
        self.stopped = true;
    }

    /// SIGCONT.
    pub fn thaw(&mut self) {
        assert!(self.signal("CONT"));
        self.stopped = false;
    }

    /// SIGTERM, and its exit status once it stopped.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        assert!(self.signal("TERM"));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = self.child.try_wait().expect("wait") {
                return st;
            }
            assert!(Instant::now() < deadline, "duffy serve did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// An HTTP GET on 127.0.0.1: (status, body); (0, error) if it failed.
pub fn get(port: u16, path: &str) -> (u16, String) {
    request(port, "GET", path, None, None)
}

/// An HTTP request on 127.0.0.1, with `key` as its bearer key and `json`
/// as its body: (status, body); (0, error) if it failed.
pub fn request(port: u16, method: &str, path: &str, key: Option<&str>, json: Option<&str>) -> (u16, String) {
    let attempt = || -> std::io::Result<(u16, String)> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
        if let Some(k) = key {
            head.push_str(&format!("Authorization: Bearer {k}\r\n"));
        }
        let body = json.unwrap_or("");
        if json.is_some() {
            head.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()));
        }
        write!(s, "{head}\r\n{body}")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        let status = out.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        Ok((status, out.split_once("\r\n\r\n").map(|(_, b)| b.trim_end().to_string()).unwrap_or_default()))
    };
    attempt().unwrap_or_else(|e| (0, e.to_string()))
}

/// Runs the `duffy` binary with `--db db`.
pub fn duffy(db: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_duffy")).args(["--db", db]).args(args).output().expect("run duffy")
}

/// Its stdout; panics with everything it said if it failed.
pub fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "duffy failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout.clone()).expect("utf-8")
}

/// A configuration for replicas on `url`: a simulated farm of `machines`
/// with fast installs and preparation, pool 7/x86_64 with `standby`,
/// reconciler ticks of a second, `extra` appended to `[policy]`.
pub fn config(url: &str, machines: usize, standby: u32, policy_extra: &str) -> String {
    format!(
        r#"database = "{url}"

[policy]
rate_limit = "off"
power_check_interval = "off"
max_concurrent_installs = 64
tick = 1
min_pass_interval = 20
{policy_extra}

[[pools]]
release = "7"
arch = "x86_64"
standby = {standby}

[hardware]
kind = "simulated"
machines = {machines}
install_min_ms = 100
install_max_ms = 400
prepare_ms = 20

[postgres]
pool_size = 8
"#
    )
}

/// Writes `text` to `dir/name` and returns the path.
pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write file");
    p
}

/// Waits (at most `limit`) until `ready` says yes; how long it took.
pub fn wait_until(limit: Duration, what: &str, mut ready: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !ready() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    start.elapsed()
}

/// A blocking SQL client (its own small runtime), for checks over the
/// database the replicas share.
pub struct Sql {
    rt: tokio::runtime::Runtime,
    client: tokio_postgres::Client,
}

impl Sql {
    pub fn connect(url: &str) -> Sql {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let client = rt.block_on(async {
            let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.expect("connect");
            tokio::spawn(conn);
            c
        });
        Sql { rt, client }
    }

    pub fn query(&self, sql: &str, params: &[&(dyn tokio_postgres::types::ToSql + Sync)]) -> Vec<tokio_postgres::Row> {
        self.rt.block_on(self.client.query(sql, params)).unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    pub fn one_i64(&self, sql: &str) -> i64 {
        self.query(sql, &[])[0].get(0)
    }

    /// The pid of the process that started the newest leadership term.
    pub fn leader_pid(&self) -> Option<i32> {
        self.query("SELECT i.pid FROM settings s JOIN instances i ON i.id = s.leader_instance WHERE s.id = 1", &[])
            .first()
            .map(|r| r.get(0))
    }

    /// The newest leadership epoch.
    pub fn epoch(&self) -> i64 {
        self.one_i64("SELECT leader_epoch FROM settings WHERE id = 1")
    }
}

/// A fresh database on the test process's PostgreSQL (made in a runtime
/// of its own).
pub fn database() -> duffy_backend_postgres::test_cluster::TestDatabase {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(duffy_backend_postgres::test_cluster::shared().database())
}

/// Held for the whole of each replica test: the tests run one at a time,
/// because each starts several replicas whose leader election and
/// takeover deadlines (the issue's 5 s and 15 s) are what is tested, and
/// four such farms at once on two cores measure the machine instead.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
