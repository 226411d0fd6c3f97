//! `duffy serve` and the `duffy` commands on a PostgreSQL URL, as real
//! processes: the CLI talks to the database directly beside a running
//! service, and a key it revokes is refused by the service's very next
//! request; `duffy store copy` moves a farm from SQLite to PostgreSQL and
//! back with nothing lost, and refuses what it must.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod replica_common;

use std::time::Duration;

use duffy_backend_sqlite::SqliteExport;
use replica_common::{Replica, config, database, duffy, get, ok, wait_until, write};

/// A `/Node/get` that waits (boundedly) for Ready nodes: (ssid, hosts).
fn get_nodes(port: u16, key: &str, count: u32) -> (String, Vec<String>) {
    let mut answer = None;
    wait_until(Duration::from_secs(30), "nodes to hand out", || {
        let (status, body) = get(port, &format!("/Node/get?key={key}&ver=7&arch=x86_64&count={count}"));
        assert_eq!(status, 200, "{body}");
        match serde_json::from_str::<serde_json::Value>(&body) {
            Ok(v) => {
                let hosts = v["hosts"].as_array().unwrap().iter().map(|h| h.as_str().unwrap().to_string()).collect();
                answer = Some((v["ssid"].as_str().unwrap().to_string(), hosts));
                true
            }
            Err(_) => {
                assert!(body.contains("Insufficient"), "unexpected answer {body:?}");
                false
            }
        }
    });
    answer.expect("answered")
}

#[test]
fn serve_and_the_cli_share_a_postgres_database() {
    let db = database();
    let dir = tempfile::tempdir().unwrap();
    // The CLI creates the schema and a key before any service runs.
    let key = ok(&duffy(&db.url, &["key", "create", "--project", "ci", "--quota", "4"])).trim().to_string();
    let cfg = write(dir.path(), "duffy.toml", &config(&db.url, 6, 3, ""));
    let service = Replica::start(&cfg, dir.path().join("serve.log"));
    let (ssid, hosts) = get_nodes(service.port, &key, 2);
    assert_eq!(hosts.len(), 2);
    // Beside the running service, straight to the database.
    let list = ok(&duffy(&db.url, &["node", "list"]));
    for h in &hosts {
        assert!(list.lines().any(|l| l.contains(h.as_str()) && l.contains("Deployed")), "{list}");
    }
    let keys = ok(&duffy(&db.url, &["key", "list"]));
    assert!(keys.contains("ci"), "{keys}");
    let (status, body) = get(service.port, &format!("/Node/done?key={key}&ssid={ssid}"));
    assert_eq!((status, body.as_str()), (200, "\"Done\""), "{body}");
    // Revoked through the CLI: refused by the service's next request.
    let id = keys.lines().nth(1).and_then(|l| l.split_whitespace().next()).unwrap().to_string();
    ok(&duffy(&db.url, &["key", "revoke", &id]));
    let (status, body) = get(service.port, &format!("/Node/get?key={key}"));
    assert_eq!((status, body.as_str()), (200, "Invalid duffy key"), "a revoked key is refused at once");
    // A new key works at once too.
    let key2 = ok(&duffy(&db.url, &["key", "create", "--project", "ci"])).trim().to_string();
    let (ssid2, _) = get_nodes(service.port, &key2, 1);
    assert_eq!(get(service.port, &format!("/Node/done?key={key2}&ssid={ssid2}")).1, "\"Done\"");
    let st = service.terminate();
    assert!(st.success(), "duffy serve stops cleanly on SIGTERM: {st}");
    // The URL's password never shows, even in errors.
    let o = duffy("postgres://duffy:hunter2@127.0.0.1:1/nowhere", &["node", "list"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("hunter2"), "{err}");
}

/// A SQLite farm with history: installs, sessions done, failed and live,
/// a revoked key, a paused flag; made by a real `duffy serve` on the file.
fn sqlite_farm(dir: &std::path::Path) -> (std::path::PathBuf, String) {
    let file = dir.join("farm.db");
    let text =
        config("x", 6, 3, "").replace("database = \"x\"", &format!("database = {:?}", file.display().to_string()));
    let cfg = write(dir, "sqlite.toml", &text);
    let f = file.display().to_string();
    let key = ok(&duffy(&f, &["key", "create", "--project", "ci", "--quota", "5"])).trim().to_string();
    let old = ok(&duffy(&f, &["key", "create", "--project", "old"])).trim().to_string();
    let service = Replica::start(&cfg, dir.join("sqlite.log"));
    let (a, _) = get_nodes(service.port, &key, 2);
    assert_eq!(get(service.port, &format!("/Node/done?key={key}&ssid={a}")).1, "\"Done\"");
    let (b, _) = get_nodes(service.port, &key, 1);
    assert_eq!(get(service.port, &format!("/Node/fail?key={key}&ssid={b}")).0, 200);
    let (_live, _) = get_nodes(service.port, &key, 1);
    let (c, _) = get_nodes(service.port, &old, 1);
    assert_eq!(get(service.port, &format!("/Node/done?key={old}&ssid={c}")).1, "\"Done\"");
    ok(&duffy(&f, &["key", "revoke", "2"]));
    assert!(service.terminate().success());
    (file, key)
}

#[test]
fn a_farm_goes_from_sqlite_to_postgres_and_back_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let (file, key) = sqlite_farm(dir.path());
    let db = database();
    let out = ok(&duffy("unused", &["store", "copy", "--from", file.to_str().unwrap(), "--to", &db.url]));
    assert!(out.contains("copied 6 nodes") && out.contains("invariants and history hold"), "{out}");
    // Back into a new file.
    let back = dir.path().join("back.db");
    let out = ok(&duffy("unused", &["store", "copy", "--from", &db.url, "--to", back.to_str().unwrap()]));
    assert!(out.contains("copied 6 nodes"), "{out}");
    // Independently of the copy's own check: both files hold the same farm.
    let a = SqliteExport::open(&file).unwrap();
    let b = SqliteExport::open(&back).unwrap();
    let (da, db_) = (a.dump().unwrap(), b.dump().unwrap());
    assert_eq!(da, db_);
    assert_eq!(da.sessions.len(), 4);
    assert!(da.keys.iter().any(|k| k.revoked_at.is_some()));
    assert_eq!(a.events(0, 0).unwrap(), b.events(0, 0).unwrap());
    assert!(a.event_count().unwrap() > 20);
    // The copy in PostgreSQL serves: the key works, a new allocation
    // never takes a node a copied session holds.
    let cfg = write(dir.path(), "pg.toml", &config(&db.url, 6, 3, ""));
    let service = Replica::start(&cfg, dir.path().join("pg.log"));
    let (ssid, hosts) = get_nodes(service.port, &key, 1);
    let held: Vec<String> = da
        .sessions
        .iter()
        .filter(|s| s.state.is_live())
        .flat_map(|s| s.nodes.iter())
        .map(|id| da.nodes.iter().find(|n| n.id == *id).unwrap().hostname.clone())
        .collect();
    assert!(!held.contains(&hosts[0]), "{hosts:?} were held by copied sessions {held:?}");
    assert_eq!(get(service.port, &format!("/Node/done?key={key}&ssid={ssid}")).1, "\"Done\"");
    assert!(service.terminate().success());
}

#[test]
fn a_copy_refuses_a_store_that_holds_a_farm_or_a_file_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let (file, _) = sqlite_farm(dir.path());
    let db = database();
    ok(&duffy("unused", &["store", "copy", "--from", file.to_str().unwrap(), "--to", &db.url]));
    let before = ok(&duffy(&db.url, &["node", "list"]));
    // Into a database that has a farm.
    let o = duffy("unused", &["store", "copy", "--from", file.to_str().unwrap(), "--to", &db.url]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("already holds a farm"), "{err}");
    assert_eq!(ok(&duffy(&db.url, &["node", "list"])), before, "nothing changed");
    // Into an existing file that has a farm.
    let o = duffy("unused", &["store", "copy", "--from", &db.url, "--to", file.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("already holds a farm"), "{o:?}");
    // From a file a service has open.
    let text =
        config("x", 6, 3, "").replace("database = \"x\"", &format!("database = {:?}", file.display().to_string()));
    let cfg = write(dir.path(), "again.toml", &text);
    let service = Replica::start(&cfg, dir.path().join("again.log"));
    let other = database();
    let o = duffy("unused", &["store", "copy", "--from", file.to_str().unwrap(), "--to", &other.url]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("in use") && err.contains("stop it"), "{err}");
    drop(service);
}

#[test]
fn a_pause_on_one_replica_holds_on_every_replica_and_wakes_the_leader() {
    let db = database();
    let dir = tempfile::tempdir().unwrap();
    let key = ok(&duffy(&db.url, &["key", "create", "--project", "ci"])).trim().to_string();
    let admin = ok(&duffy(&db.url, &["key", "create", "--project", "ops", "--admin"])).trim().to_string();
    // A reconciler tick of a minute: the leader only reacts this fast if
    // the other replica's pause wakes it.
    let text = config(&db.url, 4, 2, "").replace("tick = 1\n", "tick = 60\n");
    let cfg = write(dir.path(), "duffy.toml", &text);
    let a = Replica::start(&cfg, dir.path().join("a.log"));
    let sql = replica_common::Sql::connect(&db.url);
    wait_until(Duration::from_secs(30), "the pool filled", || {
        sql.one_i64("SELECT count(*) FROM nodes WHERE state = 'Ready'") == 2
    });
    let b = Replica::start(&cfg, dir.path().join("b.log"));
    // a started first and leads; pause through b.
    assert_eq!(sql.leader_pid(), Some(a.pid() as i32));
    let (status, body) = get(b.port, &format!("/PauseService?key={admin}"));
    assert_eq!(status, 200, "{body}");
    let (status, body) = get(a.port, &format!("/Node/get?key={key}"));
    assert_eq!(status, 409, "paused on every replica at once: {body}");
    // The leader retires the warm pool now, not at its next tick.
    let took = wait_until(Duration::from_secs(10), "the warm pool retired", || {
        sql.one_i64("SELECT count(*) FROM nodes WHERE state = 'Ready'") == 0
    });
    eprintln!("the leader powered the pool down {took:?} after a pause on another replica");
    let (status, body) = get(a.port, &format!("/ResumeService?key={admin}"));
    assert_eq!(status, 200, "{body}");
    let (ssid, _) = get_nodes(b.port, &key, 1);
    assert_eq!(get(a.port, &format!("/Node/done?key={key}&ssid={ssid}")).1, "\"Done\"");
}
