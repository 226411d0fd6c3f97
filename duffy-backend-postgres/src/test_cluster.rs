//! A throwaway PostgreSQL for tests (feature `test-cluster`).
//!
//! [`shared`] starts one cluster per test process from Debian's binaries
//! (`/usr/lib/postgresql/<version>/bin`, installed by
//! `scripts/install-test-deps.sh`): `initdb` into a temporary directory,
//! `postgres` on its own port (127.0.0.1) and socket directory, run as the
//! `postgres` user when the tests run as root. It is started by a shell
//! that the kernel signals when the test process exits, however it exits
//! (`setpriv --pdeathsig`), and that then stops PostgreSQL and removes the
//! directory. Each test gets a database of its own ([`TestCluster::database`]).
//!
//! With `DUFFY_TEST_POSTGRES_URL` set (a database on a server where the
//! user may create databases), no cluster is started: test databases are
//! created on that server and dropped afterwards.
//!
//! A missing PostgreSQL is an error that says how to install it: a test
//! never passes without the database it needs.
//!
//! Every test database is watched ([`TestDatabase`]): a test still holding
//! its database after [`TEST_TIME_LIMIT`] is hung, and the watchdog ends
//! the whole test process with a message naming the database (after
//! killing the processes registered with [`kill_on_timeout`]), so a hung
//! PostgreSQL test fails instead of stalling CI.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The settings tests run PostgreSQL with: durability off (the tests are
/// about Duffy's correctness, not the disk's) and room for many
/// connections.
const SETTINGS: &[&str] = &[
    "fsync=off",
    "synchronous_commit=off",
    "full_page_writes=off",
    "max_connections=400",
    "shared_buffers=32MB",
    "log_min_messages=warning",
];

/// How long a test may hold a database before the watchdog declares it
/// hung. Generous: the longest PostgreSQL test takes well under a minute
/// on 2 busy cores.
pub const TEST_TIME_LIMIT: Duration = Duration::from_secs(300);

/// Ends the test process if it is not dropped within its limit: prints
/// what ran over, kills the registered child processes, aborts.
#[derive(Debug)]
pub struct Watchdog {
    done: Option<std::sync::mpsc::Sender<()>>,
}

/// Child processes (pids) the watchdog kills before it aborts the test
/// process, which would otherwise leave them running.
static CHILDREN: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// Registers `pid` to be killed (SIGKILL) if a watchdog fires; pass it
/// to [`forget_child`] once it has been reaped.
pub fn kill_on_timeout(pid: u32) {
    CHILDREN.lock().unwrap_or_else(|p| p.into_inner()).push(pid);
}

/// Unregisters `pid` (see [`kill_on_timeout`]).
pub fn forget_child(pid: u32) {
    CHILDREN.lock().unwrap_or_else(|p| p.into_inner()).retain(|p| *p != pid);
}

impl Watchdog {
    /// Arms a watchdog for `what`: unless this is dropped within `limit`,
    /// the process aborts.
    pub fn new(what: impl Into<String>, limit: Duration) -> Watchdog {
        let what = what.into();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let spawned = std::thread::Builder::new().name("duffy-test-watchdog".into()).spawn(move || {
            // A message or a dropped sender: the test finished in time.
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
                static FIRED: AtomicBool = AtomicBool::new(false);
                if FIRED.swap(true, Ordering::SeqCst) {
                    return;
                }
                eprintln!(
                    "TEST TIMEOUT: {what} still in use after {limit:?}; the test is hung, aborting the test process"
                );
                for pid in CHILDREN.lock().unwrap_or_else(|p| p.into_inner()).iter() {
                    let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
                }
                std::process::abort();
            }
        });
        // Without a thread there is no watchdog, and a test must not run
        // unwatched.
        if let Err(e) = spawned {
            panic!("starting the test watchdog: {e}");
        }
        Watchdog { done: Some(tx) }
    }

    /// Stops watching: the holder is done (or, like a benchmark, is meant
    /// to run for as long as it likes).
    pub fn disarm(mut self) {
        if let Some(tx) = self.done.take() {
            let _ = tx.send(());
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        if let Some(tx) = self.done.take() {
            let _ = tx.send(());
        }
    }
}

/// A running PostgreSQL the tests can create databases on.
#[derive(Debug)]
pub struct TestCluster {
    host: String,
    port: u16,
    user: String,
    password: Option<String>,
    admin_db: String,
    external: bool,
}

/// A database of one test. With an external server it is dropped when this
/// is dropped; a throwaway cluster goes away whole with the test process.
/// A [`Watchdog`] of [`TEST_TIME_LIMIT`] watches it: a test that holds it
/// longer is hung and ends the test process.
#[derive(Debug)]
pub struct TestDatabase {
    /// Its URL (`postgres://…`).
    pub url: String,
    /// Its name.
    pub name: String,
    drop_with: Option<String>,
    watchdog: Option<Watchdog>,
}

impl TestDatabase {
    /// Keeps the database for the rest of the process, unwatched (a
    /// benchmark's farm), and returns its URL.
    pub fn keep(mut self) -> String {
        if let Some(w) = self.watchdog.take() {
            w.disarm();
        }
        self.drop_with = None;
        std::mem::take(&mut self.url)
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        drop(self.watchdog.take());
        let Some(admin) = self.drop_with.take() else { return };
        let name = self.name.clone();
        // Drop may run inside a runtime: use a thread with its own.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            rt.block_on(async move {
                if let Ok((c, conn)) = tokio_postgres::connect(&admin, tokio_postgres::NoTls).await {
                    tokio::spawn(conn);
                    let _ = c.batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")).await;
                }
            });
        })
        .join();
    }
}

static CLUSTER: OnceLock<Result<TestCluster, String>> = OnceLock::new();
static NEXT_DB: AtomicU32 = AtomicU32::new(1);

/// The test process's PostgreSQL, started on first use. Panics, saying
/// what is missing, if there is none to be had.
pub fn shared() -> &'static TestCluster {
    match CLUSTER.get_or_init(|| start(SETTINGS)) {
        Ok(c) => c,
        Err(e) => panic!("no PostgreSQL for the tests: {e}"),
    }
}

/// A cluster with PostgreSQL's durable defaults (fsync and synchronous
/// commit on), for benchmarks, started now; it goes away with the process
/// like the tests' one. Honours `DUFFY_TEST_POSTGRES_URL` the same way.
pub fn durable(extra: &[&str]) -> Result<TestCluster, String> {
    let mut settings = vec!["max_connections=400", "log_min_messages=warning"];
    settings.extend_from_slice(extra);
    start(&settings)
}

impl TestCluster {
    /// The URL of database `db` on this server.
    pub fn url(&self, db: &str) -> String {
        let auth = match &self.password {
            Some(p) => format!("{}:{}", self.user, p),
            None => self.user.clone(),
        };
        format!("postgres://{auth}@{}:{}/{db}", self.host, self.port)
    }

    /// The server's address, `host:port`.
    pub fn address(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// Creates a fresh, empty database.
    pub async fn database(&self) -> TestDatabase {
        let name = format!("duffy_t{}_{}", std::process::id(), NEXT_DB.fetch_add(1, Ordering::Relaxed));
        let admin = self.url(&self.admin_db);
        let (c, conn) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("connecting to the test PostgreSQL at {}: {e}", self.address()));
        let task = tokio::spawn(conn);
        c.batch_execute(&format!("CREATE DATABASE \"{name}\" TEMPLATE template0"))
            .await
            .unwrap_or_else(|e| panic!("creating test database {name}: {e}"));
        drop(c);
        let _ = task.await;
        let watchdog = Some(Watchdog::new(format!("test database {name}"), TEST_TIME_LIMIT));
        TestDatabase { url: self.url(&name), drop_with: self.external.then_some(admin), name, watchdog }
    }
}

fn start(settings: &[&str]) -> Result<TestCluster, String> {
    if let Ok(url) = std::env::var("DUFFY_TEST_POSTGRES_URL") {
        return external(&url);
    }
    let bin = find_bin()?;
    let root = std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false);
    let dir = tempfile::Builder::new()
        .prefix("duffy-pg-")
        .tempdir()
        .map_err(|e| format!("creating a directory for the cluster: {e}"))?
        .keep();
    // Until the server runs, a failure removes the directory here; after,
    // the shell that runs the server does.
    let fail = |e: String| {
        let _ = std::fs::remove_dir_all(&dir);
        Err(e)
    };
    let run_as: Vec<String> = if root {
        let (uid, gid) = match postgres_user() {
            Ok(ids) => ids,
            Err(e) => return fail(e),
        };
        if let Err(e) = std::os::unix::fs::chown(&dir, Some(uid), Some(gid)) {
            return fail(format!("giving {} to the postgres user: {e}", dir.display()));
        }
        vec!["setpriv".into(), format!("--reuid={uid}"), format!("--regid={gid}"), "--clear-groups".into(), "--".into()]
    } else {
        Vec::new()
    };
    let data = dir.join("data");
    let mut initdb = command(&run_as, &bin.join("initdb"));
    initdb.arg("-D").arg(&data).args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync"]);
    match initdb.output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            return fail(format!(
                "initdb failed ({}): {}",
                o.status,
                String::from_utf8_lossy(&o.stderr).chars().take(2000).collect::<String>()
            ));
        }
        Err(e) => return fail(format!("running {}: {e}", bin.join("initdb").display())),
    }
    let port = match free_port() {
        Ok(p) => p,
        Err(e) => return fail(e),
    };
    // The shell stops PostgreSQL and removes the directory when signalled,
    // which the kernel does when the thread that started it exits: a
    // thread that lives as long as the test process.
    let script = r#"dir="$1"; bin="$2"; port="$3"; settings="$4"; shift 4
cleanup() { if [ -n "$pg" ]; then kill -INT "$pg" 2>/dev/null; wait "$pg" 2>/dev/null; fi; rm -rf "$dir"; exit 0; }
trap cleanup TERM INT HUP
"$@" "$bin/postgres" -D "$dir/data" -p "$port" -k "$dir" -h 127.0.0.1 $settings >"$dir/log" 2>&1 &
pg=$!
wait "$pg"
rm -rf "$dir"
"#;
    let settings: String = settings.iter().map(|s| format!("-c {s} ")).collect();
    let mut shell = Command::new("setpriv");
    shell
        .args(["--pdeathsig", "TERM", "--", "sh", "-c", script, "sh"])
        .arg(&dir)
        .arg(&bin)
        .arg(port.to_string())
        .arg(settings.trim())
        .args(&run_as);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("duffy-test-postgres".into())
        .spawn(move || {
            let child = shell.spawn();
            let started = child.as_ref().map(|_| ()).map_err(|e| e.to_string());
            let _ = tx.send(started);
            // Keep the thread (and with it the child's parent-death
            // signal) until the process exits.
            let _child = child;
            loop {
                std::thread::park();
            }
        })
        .map_err(|e| format!("starting the cluster's thread: {e}"))?;
    match rx.recv() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return fail(format!("starting PostgreSQL (setpriv, sh): {e}")),
        Err(e) => return fail(format!("starting PostgreSQL: {e}")),
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = Command::new(bin.join("pg_isready"))
            .args(["-q", "-h", "127.0.0.1", "-p", &port.to_string()])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ready {
            break;
        }
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(dir.join("log")).unwrap_or_default();
            return Err(format!("PostgreSQL did not start within 60 s on port {port}: {log}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(TestCluster {
        host: "127.0.0.1".into(),
        port,
        user: "postgres".into(),
        password: None,
        admin_db: "postgres".into(),
        external: false,
    })
}

fn command(run_as: &[String], program: &Path) -> Command {
    match run_as.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// The newest `/usr/lib/postgresql/<version>/bin` holding `postgres`,
/// `initdb` and `pg_isready`.
fn find_bin() -> Result<PathBuf, String> {
    let root = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(root)
        .map_err(|e| {
            format!(
                "{}: {e}; install PostgreSQL (Debian package postgresql, see scripts/install-test-deps.sh) or set \
                 DUFFY_TEST_POSTGRES_URL",
                root.display()
            )
        })?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            ["postgres", "initdb", "pg_isready"].iter().all(|b| bin.join(b).exists()).then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, b)| b).ok_or_else(|| {
        format!(
            "no PostgreSQL server under {}: install the Debian package postgresql (scripts/install-test-deps.sh) \
             or set DUFFY_TEST_POSTGRES_URL",
            root.display()
        )
    })
}

fn postgres_user() -> Result<(u32, u32), String> {
    let id = |flag: &str| -> Result<u32, String> {
        let o = Command::new("id").args([flag, "postgres"]).output().map_err(|e| format!("running id: {e}"))?;
        if !o.status.success() {
            return Err("there is no postgres user to run PostgreSQL as (the Debian package creates it)".into());
        }
        String::from_utf8_lossy(&o.stdout).trim().parse().map_err(|e| format!("id {flag} postgres: {e}"))
    };
    Ok((id("-u")?, id("-g")?))
}

fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("finding a free port: {e}"))?;
    l.local_addr().map(|a| a.port()).map_err(|e| format!("finding a free port: {e}"))
}

fn external(url: &str) -> Result<TestCluster, String> {
    use std::str::FromStr;
    let cfg = tokio_postgres::Config::from_str(url).map_err(|e| format!("DUFFY_TEST_POSTGRES_URL: {e}"))?;
    let host = match cfg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        _ => return Err("DUFFY_TEST_POSTGRES_URL must name a TCP host".into()),
    };
    Ok(TestCluster {
        host,
        port: cfg.get_ports().first().copied().unwrap_or(5432),
        user: cfg.get_user().unwrap_or("postgres").to_string(),
        password: cfg.get_password().map(|p| String::from_utf8_lossy(p).into_owned()),
        admin_db: cfg.get_dbname().unwrap_or("postgres").to_string(),
        external: true,
    })
}
