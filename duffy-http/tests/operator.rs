//! Operator commands beside a running service: a real `duffy serve` child
//! and the real `duffy` binary on the same database file. The commands go
//! through the service's control socket, never open the file themselves,
//! and take effect in the running service at once.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use duffy_testsupport::duffy;
use duffy_testsupport::service::Service;

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "duffy failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn sock(db: &Path) -> PathBuf {
    PathBuf::from(format!("{}.sock", db.display()))
}

/// An HTTP GET: (status, body without trailing white space).
fn get(server: &Service, path: &str) -> (u16, String) {
    let (status, body) = server.get(path);
    (status, body.trim_end().to_string())
}

/// Starts `duffy serve` on `db` (the embedded default farm) and waits until
/// it answers HTTP and its control socket exists.
fn start(db: &Path) -> Service {
    start_in(db, Path::new("."))
}

/// [`start`], with `cwd` as the service's current directory (`db` may be
/// relative to it).
fn start_in(db: &Path, cwd: &Path) -> Service {
    let mut server = duffy!().serve(db).current_dir(cwd).start();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(server.alive(), "duffy serve exited early:\n{}", server.log());
        if get(&server, "/healthz").0 == 200 && cwd.join(sock(db)).exists() {
            return server;
        }
        assert!(Instant::now() < deadline, "duffy serve did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Watches a file for being opened, by anyone.
struct OpenWatch(inotify::Inotify);

impl OpenWatch {
    fn new(file: &Path) -> OpenWatch {
        let ino = inotify::Inotify::init().expect("inotify");
        ino.watches().add(file, inotify::WatchMask::OPEN).expect("watch the database file");
        OpenWatch(ino)
    }

    fn opens(&mut self) -> usize {
        let mut buf = [0u8; 4096];
        let mut n = 0;
        loop {
            match self.0.read_events(&mut buf) {
                Ok(events) => n += events.count(),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return n,
                Err(e) => panic!("reading inotify events: {e}"),
            }
        }
    }
}

const NOT_ADMIN_OR_INVALID: &str = r#"{"msg":"Invalid duffy key"}"#;

#[test]
fn operator_commands_go_through_the_running_service() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("duffy.db");
    let server = start(&db);
    let mut watch = OpenWatch::new(&db);
    // The service itself does not reopen its database while it runs.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(watch.opens(), 0, "the running service opened its database file again");

    // key create: usable at once by the running service.
    let key = ok(&duffy!().run(&db, &["key", "create", "--project", "ci", "--admin"])).trim().to_string();
    assert_eq!(key.len(), 36, "{key}");
    assert_eq!(get(&server, &format!("/Overtime?key={key}")), (200, "[]".to_string()));
    let other = ok(&duffy!().run(&db, &["key", "create", "--project", "qa", "--expires", "1h"])).trim().to_string();
    assert_eq!(get(&server, &format!("/Node/done?key={other}&ssid=x")).1, r#"{"msg":"Invalid session ID"}"#);

    // key list: ids, projects, expiry and last use; never a key or a hash.
    let list = ok(&duffy!().run(&db, &["key", "list"]));
    let rows: Vec<Vec<&str>> = list.lines().skip(1).map(|l| l.split_whitespace().collect()).collect();
    assert!(list.lines().next().is_some_and(|h| h.contains("last used") && h.contains("revoked")), "{list}");
    assert_eq!(rows.len(), 2, "{list}");
    // id, project, admin, created, expires, last used, revoked
    assert_eq!((rows[0][0], rows[0][1], rows[0][2], rows[0][4], rows[0][6]), ("1", "ci", "yes", "-", "-"), "{list}");
    assert!(rows[0][5].ends_with('Z'), "used a moment ago, and listing through the service shows it: {list}");
    assert_eq!((rows[1][0], rows[1][1], rows[1][2], rows[1][6]), ("2", "qa", "no", "-"), "{list}");
    assert!(rows[1][3].ends_with('Z') && rows[1][4].ends_with('Z') && rows[1][4] > rows[1][3], "expires: {list}");
    let qa_used_then = rows[1][5].to_string();
    let hash: String = duffy_core::hash_api_key(&key).0.iter().map(|b| format!("{b:02x}")).collect();
    assert!(!list.contains(&key) && !list.contains(&other) && !list.contains(&hash[..16]), "{list}");
    let qa = ok(&duffy!().run(&db, &["key", "list", "--project", "qa"]));
    assert_eq!(qa.lines().count(), 2, "{qa}");
    let e = duffy!().run(&db, &["key", "list", "--project", "nobody"]);
    assert!(!e.status.success() && String::from_utf8_lossy(&e.stderr).contains("no project"), "{e:?}");

    // key revoke: refused by the running service at the very next request.
    assert_eq!(ok(&duffy!().run(&db, &["key", "revoke", "1"])).trim(), "revoked key 1 (project ci)");
    assert_eq!(get(&server, &format!("/Overtime?key={key}")), (403, NOT_ADMIN_OR_INVALID.to_string()));
    assert_eq!(get(&server, &format!("/Node/done?key={other}&ssid=x")).1, r#"{"msg":"Invalid session ID"}"#);
    let e = duffy!().run(&db, &["key", "revoke", "99"]);
    assert!(!e.status.success() && String::from_utf8_lossy(&e.stderr).contains("no API key with id 99"), "{e:?}");

    // node add, pool set, project set: visible to the service at once.
    assert_eq!(
        ok(&duffy!().run(&db, &["node", "add", "extra.example.org"])).trim(),
        "added extra.example.org (id 49, Active)"
    );
    let (_, inv) = get(&server, "/Inventory");
    assert!(inv.contains("extra.example.org"), "{inv}");
    assert!(ok(&duffy!().run(&db, &["node", "list"])).contains("extra.example.org"));
    let dup = duffy!().run(&db, &["node", "add", "extra.example.org"]);
    assert!(!dup.status.success() && String::from_utf8_lossy(&dup.stderr).contains("already exists"), "{dup:?}");
    assert_eq!(
        ok(&duffy!().run(&db, &["pool", "set", "9", "x86_64", "--standby", "1"])).trim(),
        "pool 9/x86_64: standby 1"
    );
    assert_eq!(
        ok(&duffy!().run(&db, &["project", "set", "qa", "--quota", "3"])).trim(),
        "project qa: quota 3, 0 SSH keys"
    );
    assert!(ok(&duffy!().run(&db, &["project", "show", "qa"])).contains("quota 3"));

    // Not one of those commands opened the database file: the service did
    // all the work with its own store.
    assert_eq!(watch.opens(), 0, "an operator command opened the database while the service held it");

    // A clean stop removes the socket; then commands open the file
    // themselves again, and see everything the service wrote.
    assert!(server.terminate().success());
    assert!(!sock(&db).exists(), "the control socket outlived the service");
    let list = ok(&duffy!().run(&db, &["key", "list"]));
    let rows: Vec<Vec<&str>> = list.lines().skip(1).map(|l| l.split_whitespace().collect()).collect();
    assert!(rows[0][6].ends_with('Z'), "key 1 is revoked: {list}");
    // The qa key was used after the listing above; the service wrote that
    // use when it stopped.
    assert!(rows[1][5] > qa_used_then.as_str(), "last use {} not after {qa_used_then}: {list}", rows[1][5]);
    assert!(watch.opens() > 0, "the watch sees a command that opens the file");
}

#[test]
fn a_killed_service_leaves_nothing_that_blocks_the_next_one() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("duffy.db");
    let server = start(&db);
    // A second service on the same file is refused, saying who has it.
    let second = duffy!().run(&db, &["serve", "--listen", &format!("127.0.0.1:{}", duffy_testsupport::free_port())]);
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success() && err.contains("already served by duffy serve (pid"), "{err}");

    server.kill();
    assert!(sock(&db).exists(), "SIGKILL leaves the socket behind");
    // The lock died with the service: commands run on the file directly.
    assert!(ok(&duffy!().run(&db, &["node", "list"])).contains("n48.sim.duffy"));
    // And the next service starts, replacing the stale socket.
    let server = start(&db);
    let key = ok(&duffy!().run(&db, &["key", "create", "--project", "ci"])).trim().to_string();
    assert_eq!(get(&server, &format!("/Node/done?key={key}&ssid=x")).1, r#"{"msg":"Invalid session ID"}"#);
    assert!(server.terminate().success());
    assert!(!sock(&db).exists());
}

#[test]
fn a_command_waits_for_the_lock_while_another_holds_it() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("duffy.db");
    ok(&duffy!().run(&db, &["node", "add", "n1.example.org"]));
    // Another command holds the lock (no service, so no socket).
    let paths = duffy_http::control::ControlPaths::for_db(&db).unwrap();
    let held = duffy_http::control::DbLock::try_acquire(&paths, "a test").unwrap().expect("free");
    let waiting = duffy!()
        .command(&db)
        .args(["node", "add", "n2.example.org"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let mut waiting = waiting;
    assert!(waiting.try_wait().unwrap().is_none(), "the command must wait while the lock is held");
    assert!(
        duffy_http::control::DbLock::try_acquire(&paths, "a test").unwrap().is_none(),
        "the lock is exclusive, within one process too"
    );
    drop(held);
    let out = waiting.wait_with_output().unwrap();
    assert_eq!(ok(&out).trim(), "added n2.example.org (id 2, Active)");
}

#[test]
fn a_client_that_is_neither_the_services_user_nor_root_is_refused() {
    assert!(running_as_root(), "this test runs a client as user nobody and needs root for that (CI runs as root)");
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("duffy.db");
    let server = start(&db);
    let mode = |p: &Path, m: u32| std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(m)).unwrap();
    mode(dir.path(), 0o755);
    let as_nobody = |args: &[&str]| {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(duffy!().path())
            .arg("--db")
            .arg(&db)
            .args(args)
            .output()
            .expect("run setpriv (util-linux)")
    };
    // The socket's mode keeps other users out…
    let o = as_nobody(&["node", "add", "intruder.example.org"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("ermission denied"), "{err}");
    // …and so does the peer credential check, should the mode be opened up.
    mode(&sock(&db), 0o666);
    let o = as_nobody(&["node", "add", "intruder.example.org"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("uid 65534 is neither the service's user"), "{err}");
    assert!(!get(&server, "/Inventory").1.contains("intruder"), "nothing was added");
    // Root is let in.
    assert!(ok(&duffy!().run(&db, &["node", "list"])).contains("n1.sim.duffy"));
    assert!(server.terminate().success());
}

fn running_as_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

#[test]
fn a_database_deep_in_a_long_path_still_gets_its_control_socket() {
    let dir = tempfile::tempdir().unwrap();
    let deep = dir.path().join("a-rather-long-directory-name-as-build-systems-make-them".repeat(2)).join("work");
    std::fs::create_dir_all(&deep).unwrap();
    assert!(deep.join("duffy.db.sock").as_os_str().len() > 108, "longer than a socket address holds");
    let db = Path::new("duffy.db");
    let server = start_in(db, &deep);
    let o = duffy!().command(db).current_dir(&deep).args(["node", "add", "deep.example.org"]).output().unwrap();
    assert_eq!(ok(&o).trim(), "added deep.example.org (id 49, Active)");
    assert!(get(&server, "/Inventory").1.contains("deep.example.org"));
    assert!(server.terminate().success());
    assert!(!deep.join("duffy.db.sock").exists());
}
