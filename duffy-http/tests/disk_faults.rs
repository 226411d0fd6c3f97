//! The database's file system fills up, or turns read-only, under a
//! running `duffy serve` (a real child process, real HTTP, a real file
//! system mounted by the test; needs root, as CI has).
//!
//! - **Full**: a 8 MiB tmpfs holds the database; the test fills it with a
//!   filler file. Writes then fail (SQLite's "database or disk is full"):
//!   `/Node/get`, `/Node/done` and `/Node/fail` answer 503 with a JSON
//!   string that says so and to try again, and change nothing; `/Inventory`
//!   keeps answering; the reconciler's failed writes do not stop it. Then
//!   the filler is removed and everything works again without a restart.
//!   SQLite reuses WAL space it already has, so right after the disk fills
//!   some writes still succeed: the test uses up that slack with real
//!   writes of its own (`duffy key create`), and treats every answer as
//!   either a success (acknowledged, checked at the end) or a clean 503.
//! - **Read-only**: Linux refuses to remount a file system read-only while
//!   a file on it is open for writing (EBUSY), and the database always is;
//!   what a running service meets is the kernel turning the file system
//!   read-only after an error (ext4 `errors=remount-ro`). The test does
//!   exactly that to an ext4 image on a loop device (`trigger_fs_error`).
//!   Every write answers 503, reads work, the reconciler goes on. Such a
//!   file system cannot be remounted read-write (its journal is aborted):
//!   recovery is stop, unmount, fsck, mount, start, after which every
//!   acknowledged operation is there and everything works.
//!
//! In both, at the end, the database is opened in-process and every
//! acknowledged operation is checked, with the farm's invariants and the
//! event history. Mounts are undone by drop guards, also on panic.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use duffy_backend_sqlite::{SqliteOptions, SqliteStore};
use duffy_core::testkit::conformance::{check_history, check_invariants};
use duffy_core::{SessionId, SessionState, Store};
use duffy_testsupport::duffy;
use duffy_testsupport::service::Service;
use serde_json::Value;

const STANDBY: usize = 6;

// ----- mounts -----

/// A file system mounted by the test; unmounted on drop (after the server
/// using it is gone: declare it before the server).
struct Mount {
    dir: PathBuf,
}

fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!("{cmd:?}: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr)))
    }
}

impl Mount {
    fn tmpfs(dir: &Path, size: &str) -> Mount {
        std::fs::create_dir_all(dir).expect("mount point");
        run(Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(dir))
            .unwrap_or_else(|e| panic!("this test mounts a tmpfs and needs root: {e}"));
        Mount { dir: dir.to_path_buf() }
    }

    /// A fresh ext4 image, loop-mounted with `errors=remount-ro`.
    fn ext4(image: &Path, dir: &Path) -> Mount {
        std::fs::create_dir_all(dir).expect("mount point");
        let f = std::fs::File::create(image).expect("image");
        f.set_len(64 << 20).expect("image size");
        drop(f);
        run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(image))
            .unwrap_or_else(|e| panic!("mkfs.ext4 (e2fsprogs) is needed: {e}"));
        Mount::mount_ext4(image, dir)
    }

    fn mount_ext4(image: &Path, dir: &Path) -> Mount {
        run(Command::new("mount").args(["-o", "loop,errors=remount-ro"]).arg(image).arg(dir))
            .unwrap_or_else(|e| panic!("this test loop-mounts an ext4 image and needs root and /dev/loop*: {e}"));
        Mount { dir: dir.to_path_buf() }
    }

    fn unmount(&mut self) -> Result<(), String> {
        let r = run(Command::new("umount").arg(&self.dir));
        if r.is_ok() {
            self.dir = PathBuf::new();
        }
        r.map(|_| ())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.dir.as_os_str().is_empty() {
            return;
        }
        if let Err(e) = self.unmount() {
            // Busy (a process still has a file open): detach it now, it
            // goes away with the last user.
            eprintln!("unmounting {}: {e}; detaching lazily", self.dir.display());
            let _ = run(Command::new("umount").arg("-l").arg(&self.dir));
        }
    }
}

// ----- the server -----

fn config(dir: &Path) -> PathBuf {
    let cfg = dir.join("duffy.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[policy]
tick = 1
install_backoff = 1
rate_limit = "off"
default_quota = "off"
fail_cap = "off"

[[pools]]
release = "7"
arch = "x86_64"
standby = {STANDBY}

[hardware]
kind = "simulated"
machines = 20
install_min_ms = 800
install_max_ms = 1200
prepare_ms = 1
"#
        ),
    )
    .expect("config");
    cfg
}

/// Starts `duffy serve` on `db` with the configuration `cfg`, its log in
/// `log`.
fn start(db: &Path, cfg: &Path, log: &Path) -> Service {
    duffy!().serve(db).config(cfg).log_to(log).start()
}

/// Waits until the pool has its standby target of Ready nodes.
fn wait_pool_full(server: &Service) {
    server.wait_ready("7", STANDBY, Duration::from_secs(60));
}

/// The states of a session's nodes, as `/Inventory` shows them.
fn session_states(server: &Service, ssid: &str) -> Vec<String> {
    server.inventory().iter().filter(|r| r[6] == ssid).map(|r| r[5].as_str().unwrap_or("").to_string()).collect()
}

// ----- what the test was told -----

#[derive(Default)]
struct Acks {
    /// Sessions handed out, with their hosts.
    got: HashMap<String, Vec<String>>,
    /// Sessions released (`/Node/done` answered "Done").
    done: HashSet<String>,
    /// Sessions failed (`/Node/fail` answered "Done").
    failed: HashSet<String>,
    /// API keys created by the CLI.
    keys: Vec<String>,
}

impl Acks {
    /// A `/Node/get` of one node that succeeded.
    fn get(&mut self, server: &Service, key: &str) -> Result<String, (u16, String)> {
        let (status, body) = server.get(&format!("/Node/get?key={key}&ver=7&arch=x86_64&count=1"));
        match serde_json::from_str::<Value>(&body) {
            Ok(v) if status == 200 && v["ssid"].is_string() => {
                let ssid = v["ssid"].as_str().unwrap().to_string();
                let hosts = v["hosts"].as_array().unwrap().iter().map(|h| h.as_str().unwrap().to_string()).collect();
                self.got.insert(ssid.clone(), hosts);
                Ok(ssid)
            }
            _ => Err((status, body)),
        }
    }
}

/// A clean refusal: 503 and a JSON string that names the cause and says
/// to try again.
fn assert_refused(what: &str, status: u16, body: &str, cause: &str) {
    assert_eq!(status, 503, "{what}: {body}");
    match serde_json::from_str::<Value>(body) {
        Ok(Value::String(s)) => {
            assert!(s.contains(cause) && s.contains("try again"), "{what}: the message should say {cause:?}: {s:?}");
        }
        other => panic!("{what}: not a JSON string: {other:?} {body:?}"),
    }
}

/// `/Node/{done,fail}` on each session: refused, and nothing changed.
fn refused(server: &Service, key: &str, op: &str, sessions: &[String], cause: &str) {
    for ssid in sessions {
        let before = session_states(server, ssid);
        assert!(!before.is_empty() && before.iter().all(|s| s == "Deployed"), "{before:?}");
        let (status, body) = server.get(&format!("/Node/{op}?key={key}&ssid={ssid}"));
        assert_refused(&format!("/Node/{op}"), status, &body, cause);
        assert_eq!(session_states(server, ssid), before, "a refused /Node/{op} changed the session's nodes");
    }
}

/// `/Node/get` a few times: refused, and nothing changed.
fn get_refused(server: &Service, acks: &mut Acks, key: &str, cause: &str) {
    for _ in 0..3 {
        let deployed = server.count("Deployed");
        match acks.get(server, key) {
            Ok(ssid) => panic!("/Node/get succeeded ({ssid}) although no write can succeed"),
            Err((status, body)) => {
                assert_refused("/Node/get", status, &body, cause);
                assert_eq!(server.count("Deployed"), deployed, "a refused /Node/get changed the farm");
            }
        }
    }
}

/// Opens the database in-process and checks every acknowledged
/// operation, the invariants and the history.
fn verify(db: &Path, acks: &Acks) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let store = SqliteStore::open(db, SqliteOptions::default()).expect("reopen the database");
        for (ssid, hosts) in &acks.got {
            let s = store.session(&SessionId(ssid.clone())).await.expect("read");
            let s = s.unwrap_or_else(|| panic!("acknowledged session {ssid} is missing"));
            let mut names = Vec::new();
            for id in &s.nodes {
                names.push(store.node(*id).await.expect("read").expect("node").hostname);
            }
            assert_eq!(&names, hosts, "session {ssid}'s nodes");
            if acks.done.contains(ssid) {
                assert_eq!(s.state, SessionState::Done, "session {ssid} was released");
            } else if acks.failed.contains(ssid) {
                assert_eq!(s.state, SessionState::Fail, "session {ssid} was failed");
            } else {
                assert_eq!(s.state, SessionState::Prod, "session {ssid} was neither released nor failed");
            }
        }
        for k in &acks.keys {
            let found = store.api_key_by_hash(&duffy_core::hash_api_key(k)).await.expect("read");
            assert!(found.is_some(), "acknowledged API key {k} is missing");
        }
        check_invariants(&store).await.expect("invariants");
        check_history(&store).await.expect("history");
    });
}

fn new_key(db: &Path, project: &str) -> Result<String, String> {
    let out = duffy!().run(db, &["key", "create", "--project", project]);
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).expect("utf-8").trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Sessions to work with: `n` of one node each (waiting for the
/// reconciler to refill the pool when it runs dry).
fn sessions(server: &Service, acks: &mut Acks, key: &str, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut out = Vec::new();
    while out.len() < n {
        match acks.get(server, key) {
            Ok(ssid) => out.push(ssid),
            Err((200, body)) if body.contains("Insufficient") && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("/Node/get: {e:?}"),
        }
    }
    out
}

/// Takes one more node from the full pool and waits until the reconciler
/// is installing a replacement: an install in flight, whose result it will
/// have to write.
fn start_an_install(server: &Service, acks: &mut Acks, key: &str) {
    wait_pool_full(server);
    sessions(server, acks, key, 1);
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.count("Provisioning") == 0 {
        assert!(Instant::now() < deadline, "the reconciler did not start an install");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the server's log has a line naming `who` and `what`.
fn wait_log(server: &Service, who: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !server.log().lines().any(|l| l.contains(who) && l.contains(what)) {
        assert!(Instant::now() < deadline, "no {who} line with {what:?} in the log:\n{}", server.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_full_disk_refuses_writes_cleanly_and_recovers_without_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mnt = dir.path().join("mnt");
    let _mount = Mount::tmpfs(&mnt, "8m");
    let db = mnt.join("duffy.db");
    let key = new_key(&db, "jobs").expect("key");
    let mut server = start(&db, &config(dir.path()), &dir.path().join("serve.log"));
    wait_pool_full(&server);
    let mut acks = Acks::default();
    let to_done = sessions(&server, &mut acks, &key, 3);
    let to_fail = sessions(&server, &mut acks, &key, 3);
    start_an_install(&server, &mut acks, &key);

    // Fill the file system, then use up the WAL space SQLite already has.
    let filler = mnt.join("filler");
    {
        let mut f = std::fs::File::create(&filler).expect("filler");
        let chunk = vec![0u8; 64 << 10];
        loop {
            if let Err(e) = f.write_all(&chunk) {
                assert_eq!(e.raw_os_error(), Some(28), "filling: {e}");
                break;
            }
        }
    }
    // A reader holding a snapshot (as a long /Inventory, a backup or an
    // operator's sqlite3 might): SQLite cannot restart the WAL from its
    // beginning while it reads, so every write must grow the file. Without
    // it, whether a write finds room depends on when the last checkpoint
    // finished; with it, the test knows.
    let reader =
        rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).expect("open a reader");
    reader.execute_batch("BEGIN").expect("begin");
    let nodes: i64 = reader.query_row("SELECT COUNT(*) FROM nodes", [], |r| r.get(0)).expect("read");
    assert!(nodes > 0);
    let mut slack_used = false;
    for _ in 0..500 {
        match new_key(&db, "slack") {
            Ok(k) => acks.keys.push(k),
            Err(e) => {
                assert!(e.contains("full"), "duffy key create on a full disk: {e}");
                slack_used = true;
                break;
            }
        }
    }
    assert!(slack_used, "500 keys written to a full disk");

    const FULL: &str = "database or disk is full";
    get_refused(&server, &mut acks, &key, FULL);
    refused(&server, &key, "done", &to_done, FULL);
    refused(&server, &key, "fail", &to_fail, FULL);
    assert!(!server.inventory().is_empty(), "reads work on a full disk");
    wait_log(&server, "duffy_core::reconciler", FULL);
    assert!(server.alive(), "the server died:\n{}", server.log());
    // The health check says why it cannot allocate.
    let (status, body) = server.get("/healthz");
    assert_eq!(status, 503, "/healthz on a full disk: {body}");
    let health: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(health["status"], "degraded", "{body}");
    assert!(health["error"].as_str().is_some_and(|e| e.contains(FULL)), "{body}");

    // Space again: everything works, without a restart.
    reader.execute_batch("COMMIT").expect("end the read");
    drop(reader);
    std::fs::remove_file(&filler).expect("remove the filler");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match acks.get(&server, &key) {
            Ok(_) => break,
            Err(e) => assert!(Instant::now() < deadline, "/Node/get after the disk has space again: {e:?}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for ssid in &to_done {
        let (status, body) = server.get(&format!("/Node/done?key={key}&ssid={ssid}"));
        assert_eq!((status, body.contains("Done")), (200, true), "/Node/done after: {body}");
        acks.done.insert(ssid.clone());
    }
    for ssid in &to_fail {
        let (status, body) = server.get(&format!("/Node/fail?key={key}&ssid={ssid}"));
        assert_eq!((status, body.contains("Done")), (200, true), "/Node/fail after: {body}");
        acks.failed.insert(ssid.clone());
    }
    let (status, body) = server.get("/healthz");
    assert_eq!(status, 200, "/healthz once writes work again: {body}");
    // The reconciler goes on and refills the pool, re-driving the installs
    // whose result could not be recorded while the disk was full (nothing
    // else drives them): nothing is left Provisioning.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let inv = server.inventory();
        let ready = inv.iter().filter(|r| r[5] == "Ready").count();
        let provisioning = inv.iter().filter(|r| r[5] == "Provisioning").count();
        if provisioning == 0 && ready >= STANDBY {
            break;
        }
        assert!(Instant::now() < deadline, "the reconciler did not refill the pool: {inv:?}\n{}", server.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(server.alive(), "the server died:\n{}", server.log());
    server.stop();
    verify(&db, &acks);
}

#[test]
fn a_file_system_turned_read_only_refuses_writes_cleanly_and_recovers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mnt = dir.path().join("mnt");
    let image = dir.path().join("ext4.img");
    let mut mount = Mount::ext4(&image, &mnt);
    let db = mnt.join("duffy.db");
    let cfg = config(dir.path());
    let key = new_key(&db, "jobs").expect("key");
    let mut server = start(&db, &cfg, &dir.path().join("serve.log"));
    wait_pool_full(&server);
    let mut acks = Acks::default();
    let to_done = sessions(&server, &mut acks, &key, 1);
    let to_fail = sessions(&server, &mut acks, &key, 1);
    start_an_install(&server, &mut acks, &key);

    // The kernel turns the file system read-only, as after an I/O error.
    let source = run(Command::new("findmnt").args(["-n", "-o", "SOURCE"]).arg(&mnt)).expect("findmnt");
    let dev = Path::new(source.trim()).file_name().expect("a device").to_string_lossy().into_owned();
    std::fs::write(format!("/sys/fs/ext4/{dev}/trigger_fs_error"), "duffy read-only test")
        .expect("trigger an ext4 error");
    let options = run(Command::new("findmnt").args(["-n", "-o", "OPTIONS"]).arg(&mnt)).expect("findmnt");
    assert!(options.contains("emergency_ro") || options.starts_with("ro"), "not read-only: {options}");

    // SQLite itself says only "disk I/O error"; the store names the cause.
    const IO: &str = "is read-only";
    get_refused(&server, &mut acks, &key, IO);
    refused(&server, &key, "done", &to_done, IO);
    refused(&server, &key, "fail", &to_fail, IO);
    for _ in 0..3 {
        assert!(!server.inventory().is_empty(), "reads work on a read-only file system");
    }
    wait_log(&server, "duffy_core::reconciler", IO);
    assert!(server.alive(), "the server died:\n{}", server.log());

    // An aborted ext4 journal cannot be remounted read-write: stop,
    // unmount, fsck, mount, start.
    server.stop();
    mount.unmount().expect("unmount");
    let fsck = Command::new("e2fsck").args(["-f", "-y"]).arg(&image).output().expect("e2fsck");
    assert!(matches!(fsck.status.code(), Some(0 | 1)), "e2fsck: {fsck:?}");
    let _mount = Mount::mount_ext4(&image, &mnt);
    let server = start(&db, &cfg, &dir.path().join("serve2.log"));
    for (op, ssid) in [("done", &to_done[0]), ("fail", &to_fail[0])] {
        assert_eq!(session_states(&server, ssid), ["Deployed"], "the refused /Node/{op} changed nothing");
        let (status, body) = server.get(&format!("/Node/{op}?key={key}&ssid={ssid}"));
        assert_eq!((status, body.contains("Done")), (200, true), "/Node/{op} after: {body}");
    }
    acks.done.insert(to_done[0].clone());
    acks.failed.insert(to_fail[0].clone());
    wait_pool_full(&server);
    acks.get(&server, &key).expect("/Node/get after");
    server.stop();
    verify(&db, &acks);
}
