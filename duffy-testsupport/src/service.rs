//! The `duffy` binary as the tests run it: one-shot operator commands, and
//! `duffy serve` as a child process on a free loopback port, its log in a
//! file, killed and reaped when dropped.
//!
//! Cargo builds the binary only for duffy-http's own integration tests and
//! tells them where it is at compile time (`CARGO_BIN_EXE_duffy`), so
//! [`duffy!`](crate::duffy) expands in the test's crate, not here.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The [`Duffy`] binary of the calling test crate (duffy-http's
/// integration tests).
#[macro_export]
macro_rules! duffy {
    () => {
        $crate::service::Duffy::new(env!("CARGO_BIN_EXE_duffy"))
    };
}

/// The `duffy` binary.
#[derive(Debug, Clone)]
pub struct Duffy {
    bin: PathBuf,
}

impl Duffy {
    /// The binary at `bin`; see [`duffy!`](crate::duffy).
    pub fn new(bin: impl Into<PathBuf>) -> Duffy {
        Duffy { bin: bin.into() }
    }

    /// Where the binary is.
    pub fn path(&self) -> &Path {
        &self.bin
    }

    /// `duffy --db DB`, for the caller to add a command to.
    pub fn command(&self, db: &Path) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("--db").arg(db);
        c
    }

    /// `duffy --db DB ARGS…`, run to completion.
    pub fn run(&self, db: &Path, args: &[&str]) -> Output {
        self.command(db).args(args).output().expect("run duffy")
    }

    /// `duffy --db DB serve --listen 127.0.0.1:PORT` on a free port (the
    /// embedded default farm unless [`Serve::config`] names a file), to be
    /// started with [`Serve::start`].
    pub fn serve(&self, db: &Path) -> Serve {
        Serve { cmd: self.command(db), config: None, log: None }
    }
}

/// A `duffy serve` about to start.
#[derive(Debug)]
pub struct Serve {
    cmd: Command,
    config: Option<PathBuf>,
    log: Option<PathBuf>,
}

impl Serve {
    /// Serves with this configuration file (`--config`).
    pub fn config(mut self, path: &Path) -> Serve {
        self.config = Some(path.to_path_buf());
        self
    }

    /// Runs the service in `dir` (a relative `--db` is relative to it).
    pub fn current_dir(mut self, dir: &Path) -> Serve {
        self.cmd.current_dir(dir);
        self
    }

    /// Appends the service's log (its stderr) to `path` instead of a
    /// temporary file.
    pub fn log_to(mut self, path: &Path) -> Serve {
        self.log = Some(path.to_path_buf());
        self
    }

    /// Starts the child and returns at once, before it listens: for a test
    /// that must restore something it changed for the child only (an
    /// inherited resource limit). [`Service::wait_listening`] follows.
    pub fn spawn(mut self) -> Service {
        let port = crate::free_port();
        let (log, log_path) = match self.log {
            Some(path) => (None, path),
            None => {
                let file = tempfile::Builder::new().prefix("duffy-serve-").suffix(".log").tempfile().expect("log file");
                let path = file.path().to_path_buf();
                (Some(file), path)
            }
        };
        let err = std::fs::OpenOptions::new().create(true).append(true).open(&log_path).expect("open the log file");
        self.cmd.arg("serve");
        if let Some(cfg) = &self.config {
            self.cmd.arg("--config").arg(cfg);
        }
        let child = self
            .cmd
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("start duffy serve");
        Service { child, port, log_path, _log: log }
    }

    /// Starts the child and waits until it accepts connections.
    pub fn start(self) -> Service {
        let mut service = self.spawn();
        service.wait_listening();
        service
    }
}

/// A running `duffy serve` child; killed and reaped when dropped.
#[derive(Debug)]
pub struct Service {
    child: Child,
    port: u16,
    log_path: PathBuf,
    // Removes the temporary log file when the service goes.
    _log: Option<tempfile::NamedTempFile>,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Service {
    /// Its port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Everything it has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The last `n` lines of its log.
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// How many file descriptors it has open.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid())).map(|d| d.count()).unwrap_or(0)
    }

    /// Waits (at most 60 s) until it accepts TCP connections; fails the
    /// test, with its log, if it exits or does not listen in time.
    pub fn wait_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(st) = self.child.try_wait().expect("wait for duffy serve") {
                panic!("duffy serve exited with {st}:\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "duffy serve did not listen within 60 s:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// GET `path` over a fresh connection: the status and the body.
    pub fn get(&self, path: &str) -> (u16, String) {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).expect("connect to duffy serve");
        s.set_read_timeout(Some(Duration::from_secs(30))).expect("read timeout");
        write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").expect("send");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("read the reply");
        let (head, body) = out.split_once("\r\n\r\n").unwrap_or_else(|| panic!("not an HTTP reply: {out:?}"));
        let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).expect("a status code");
        (status, body.to_string())
    }

    /// The rows of `/Inventory`.
    pub fn inventory(&self) -> Vec<Value> {
        let (status, body) = self.get("/Inventory");
        assert_eq!(status, 200, "/Inventory: {body}");
        match serde_json::from_str(&body) {
            Ok(Value::Array(rows)) => rows,
            other => panic!("/Inventory is not a JSON array: {other:?} {body}"),
        }
    }

    /// How many nodes `/Inventory` shows in `state`.
    pub fn count(&self, state: &str) -> usize {
        self.inventory().iter().filter(|r| r[5] == state).count()
    }

    /// Waits until `/Inventory` shows at least `n` Ready nodes of
    /// `release`; fails the test, with the log's tail, if not `within`.
    pub fn wait_ready(&self, release: &str, n: usize, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let ready = self.inventory().iter().filter(|r| r[5] == "Ready" && r[9] == release).count();
            if ready >= n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "duffy serve did not have {n} Ready nodes of {release} within {within:?} (it has {ready}):\n{}",
                self.log_tail(30)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM, and its exit status once it has stopped (within 20 s).
    pub fn terminate(mut self) -> ExitStatus {
        self.sigterm_and_wait()
    }

    /// SIGTERM and a clean exit, or the test fails with the log.
    pub fn stop(mut self) {
        let st = self.sigterm_and_wait();
        assert!(st.success(), "duffy serve stopped with {st}:\n{}", self.log());
    }

    fn sigterm_and_wait(&mut self) -> ExitStatus {
        let pid = self.pid().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().expect("run kill");
        assert!(sent.success(), "kill -TERM {pid} failed");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = self.child.try_wait().expect("wait for duffy serve") {
                return st;
            }
            assert!(Instant::now() < deadline, "duffy serve did not stop on SIGTERM:\n{}", self.log_tail(30));
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: no clean-up at all.
    pub fn kill(mut self) {
        self.child.kill().expect("SIGKILL duffy serve");
        self.child.wait().expect("reap duffy serve");
    }
}

/// `cico --endpoint http://127.0.0.1:PORT/ --api-key KEY ARGS…`, with a
/// deadline: a client hung for 30 s is killed and fails the test.
pub fn cico(port: u16, key: &str, args: &[&str]) -> Output {
    let child = Command::new(crate::cico_path())
        .args(["--endpoint", &format!("http://127.0.0.1:{port}/"), "--api-key", key])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run cico");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(out) => out.expect("cico output"),
        Err(_) => {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
            panic!("cico {args:?} did not finish within 30 s");
        }
    }
}
