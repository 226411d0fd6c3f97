//! Three `duffy serve` replicas on one PostgreSQL database, as real
//! processes under real HTTP load:
//!
//! - 64 clients spread over three replicas while one replica is SIGKILLed
//!   and restarted: no node is ever held by two sessions at overlapping
//!   times (checked by SQL over the event log), every acknowledged
//!   allocation and release is in the database, and a project racing for
//!   nodes across replicas never holds more than its quota;
//! - the leader SIGKILLed: another replica leads within 5 s and refills the
//!   pool;
//! - the leader SIGSTOPped: another replica leads within 15 s; thawed, the
//!   old leader writes nothing more, and a key revoked while it was frozen
//!   is refused by it too;
//! - a request queued (API v1, `wait`) on a replica that does not lead is
//!   served by that replica once the leader has reinstalled the nodes.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod replica_common;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use duffy_backend_postgres::{PgOptions, PgStore};
use duffy_core::testkit::conformance::{check_history, check_invariants};
use duffy_core::{Project, Store, Timestamp, hash_api_key};
use replica_common::{Replica, Sql, config, database, duffy, get, ok, request, serial, wait_until, write};

/// Node holds that overlap in `table` (an event log): a node allocated
/// while a session held it, or released by a session that did not hold
/// it. One line per offending event.
fn overlapping_holds(sql: &Sql, table: &str) -> Vec<String> {
    let q = format!(
        "WITH h AS (
            SELECT node, seq, session,
                   CASE WHEN cause IN ('allocated', 'delivered') THEN 1
                        WHEN cause IN ('released', 'allocation_aborted', 'prepare_failed', 'hold_expired')
                             AND session IS NOT NULL THEN -1
                        ELSE 0 END AS d
            FROM {table}),
         r AS (
            SELECT node, seq, session, d, lag(d) OVER w AS prev_d, lag(session) OVER w AS prev_session
            FROM h WHERE d <> 0 WINDOW w AS (PARTITION BY node ORDER BY seq))
         SELECT 'node ' || node || ' event ' || seq || ': ' ||
                CASE WHEN d = 1 THEN 'allocated to ' || session || ' while held by ' || prev_session
                     ELSE 'released by ' || coalesce(session, '?') || ' while held by ' || coalesce(prev_session, 'nobody')
                END
         FROM r
         WHERE (d = 1 AND prev_d = 1)
            OR (d = -1 AND (prev_d IS DISTINCT FROM 1 OR prev_session IS DISTINCT FROM session))
         ORDER BY seq"
    );
    sql.query(&q, &[]).iter().map(|r| r.get(0)).collect()
}

/// The most nodes `project`'s sessions held at once, replaying `table` in
/// `seq` order (a release that committed after a claim but was numbered
/// before it can only make this smaller, never larger, than what the claim
/// counted).
fn most_held(sql: &Sql, table: &str, sessions: &str, project: &str) -> i64 {
    let q = format!(
        "WITH h AS (
            SELECT e.seq,
                   CASE WHEN e.cause IN ('allocated', 'delivered') THEN 1
                        WHEN e.cause IN ('released', 'allocation_aborted', 'prepare_failed', 'hold_expired') THEN -1
                        ELSE 0 END AS d
            FROM {table} e JOIN {sessions} s ON s.id = e.session WHERE s.project = $1)
         SELECT coalesce(max(held), 0)::bigint FROM (SELECT sum(d) OVER (ORDER BY seq) AS held FROM h) x"
    );
    sql.query(&q, &[&project])[0].get(0)
}

#[derive(Default)]
struct Ledger {
    /// Acknowledged allocations: ssid → (key, hosts).
    got: Mutex<BTreeMap<String, (String, Vec<String>)>>,
    /// Acknowledged releases.
    done: Mutex<Vec<String>>,
    quota_refusals: AtomicU64,
    per_replica: Mutex<HashMap<usize, u64>>,
    errors: Mutex<Vec<String>>,
}

/// One client: get 1–2 nodes, hold them briefly, release them, over and
/// over, on the replicas in turn; a replica that does not answer is
/// skipped (the next one serves the same session).
fn client(i: usize, key: String, ports: Arc<Mutex<Vec<u16>>>, ledger: Arc<Ledger>, stop: Arc<AtomicBool>) {
    let mut turn = i;
    let count = 1 + i % 2;
    while !stop.load(Ordering::Relaxed) {
        turn += 1;
        let n = ports.lock().unwrap().len();
        let r = turn % n;
        let port = ports.lock().unwrap()[r];
        let (status, body) = get(port, &format!("/Node/get?key={key}&ver=7&arch=x86_64&count={count}"));
        match status {
            0 => continue,
            200 if body.starts_with('{') => {}
            200 if body.contains("Insufficient") || body.contains("Failed to allocate") => {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            403 if body.contains("quota") => {
                ledger.quota_refusals.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            503 => continue,
            _ => {
                ledger.errors.lock().unwrap().push(format!("get on replica {r}: {status} {body}"));
                continue;
            }
        }
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let ssid = v["ssid"].as_str().unwrap().to_string();
        let hosts: Vec<String> = v["hosts"].as_array().unwrap().iter().map(|h| h.as_str().unwrap().into()).collect();
        ledger.got.lock().unwrap().insert(ssid.clone(), (key.clone(), hosts));
        *ledger.per_replica.lock().unwrap().entry(r).or_default() += 1;
        std::thread::sleep(Duration::from_millis((i as u64 * 7) % 30));
        // Released on whichever replica answers.
        let deadline = Instant::now() + Duration::from_secs(20);
        // A done that got no answer (its replica was killed) may have
        // been committed: the retry then finds the session ended, which
        // is the legacy answer for a done repeated, not an error.
        let mut unanswered = false;
        loop {
            turn += 1;
            let port = {
                let p = ports.lock().unwrap();
                p[turn % p.len()]
            };
            let (status, body) = get(port, &format!("/Node/done?key={key}&ssid={ssid}"));
            if status == 200 && body == "\"Done\"" {
                ledger.done.lock().unwrap().push(ssid);
                break;
            }
            if unanswered && status == 200 && body.contains("Session not in Prod") {
                break;
            }
            unanswered |= status == 0;
            if status != 0 && status != 503 {
                ledger.errors.lock().unwrap().push(format!("done of {ssid}: {status} {body}"));
                break;
            }
            if Instant::now() > deadline {
                ledger.errors.lock().unwrap().push(format!("done of {ssid}: no replica answered"));
                break;
            }
        }
    }
}

/// Projects and keys made straight in the store: 48 keys of 6 projects
/// without a quota, 16 keys of project "tight" with a quota of 3.
fn keys(url: &str) -> Vec<String> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    rt.block_on(async {
        let store = PgStore::connect(url, PgOptions { pool_size: 2, ..PgOptions::default() }).await.unwrap();
        let mut keys = Vec::new();
        for p in 0..6 {
            store.upsert_project(Project { name: format!("p{p}"), quota: None, ssh_keys: vec![] }).await.unwrap();
        }
        store.upsert_project(Project { name: "tight".into(), quota: Some(3), ssh_keys: vec![] }).await.unwrap();
        for i in 0..64 {
            let project = if i % 4 == 0 { "tight".to_string() } else { format!("p{}", i % 6) };
            let key = format!("key-{i}-{}", uuid::Uuid::new_v4().simple());
            store.add_api_key(&project, hash_api_key(&key), false, Timestamp(0), None).await.unwrap();
            keys.push(key);
        }
        keys
    })
}

fn check_store(url: &str) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    rt.block_on(async {
        let store = PgStore::connect(url, PgOptions { pool_size: 2, ..PgOptions::default() }).await.unwrap();
        check_invariants(&store).await.expect("invariants");
        check_history(&store).await.expect("history");
    });
}

#[test]
fn three_replicas_under_load_with_one_killed_and_restarted() {
    let _serial = serial();
    let db = database();
    let dir = tempfile::tempdir().unwrap();
    let keys = keys(&db.url);
    let cfg = write(dir.path(), "duffy.toml", &config(&db.url, 40, 40, ""));
    let mut replicas: Vec<Option<Replica>> = start(&cfg, dir.path(), 3).into_iter().map(Some).collect();
    let sql = Sql::connect(&db.url);
    wait_until(Duration::from_secs(60), "the pool filled", || {
        sql.one_i64("SELECT count(*) FROM nodes WHERE state = 'Ready'") >= 30
    });
    let ports = Arc::new(Mutex::new(replicas.iter().map(|r| r.as_ref().unwrap().port).collect::<Vec<_>>()));
    let ledger = Arc::new(Ledger::default());
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| {
            let (k, p, l, s) = (k.clone(), ports.clone(), ledger.clone(), stop.clone());
            std::thread::spawn(move || client(i, k, p, l, s))
        })
        .collect();
    let started = Instant::now();
    // A follower (replica 1 is not the first to start, so most likely not
    // the leader; either way the farm must go on) dies mid-load.
    std::thread::sleep(Duration::from_secs(4));
    let killed_pid = replicas[1].as_ref().unwrap().pid() as i32;
    replicas[1].take().unwrap().kill();
    let acked_at_kill = ledger.got.lock().unwrap().len();
    std::thread::sleep(Duration::from_secs(3));
    let again = Replica::start(&cfg, dir.path().join("r1-again.log"));
    ports.lock().unwrap()[1] = again.port;
    replicas[1] = Some(again);
    std::thread::sleep(Duration::from_secs(5));
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    let ran = started.elapsed();
    let got = ledger.got.lock().unwrap().clone();
    let done = ledger.done.lock().unwrap().clone();
    let errors = ledger.errors.lock().unwrap().clone();
    eprintln!(
        "{} allocations ({} before the kill), {} releases, {} quota refusals in {ran:.1?}; by replica {:?}; \
         killed pid {killed_pid}; errors: {errors:?}",
        got.len(),
        acked_at_kill,
        done.len(),
        ledger.quota_refusals.load(Ordering::Relaxed),
        ledger.per_replica.lock().unwrap()
    );
    assert!(errors.is_empty(), "{errors:?}");
    assert!(got.len() >= 100, "a real load: {} allocations", got.len());
    assert!(ledger.per_replica.lock().unwrap().len() == 3, "every replica served");

    // Allocations the killed replica was preparing are aborted, at once.
    wait_until(Duration::from_secs(15), "no allocation left half-done", || {
        sql.one_i64("SELECT count(*) FROM sessions WHERE state = 'Allocating'") == 0
    });
    eprintln!(
        "allocations aborted by recovery (a killed replica's): {}; by the deadline: {}",
        sql.one_i64(
            "SELECT count(DISTINCT session) FROM events WHERE cause = 'allocation_aborted' AND actor = 'recovery'"
        ),
        sql.one_i64(
            "SELECT count(DISTINCT session) FROM events WHERE cause = 'allocation_aborted' AND actor = 'reconciler'"
        )
    );

    // No node ever in two sessions at overlapping times.
    let overlaps = overlapping_holds(&sql, "events");
    assert!(overlaps.is_empty(), "{overlaps:?}");
    // Every acknowledged allocation is there, with its nodes, and every
    // acknowledged release.
    let nodes_of: HashMap<String, Vec<String>> = sql
        .query(
            "SELECT s.id, array_agg(n.hostname ORDER BY j.ord) FROM sessions s \
             CROSS JOIN LATERAL unnest(s.nodes) WITH ORDINALITY AS j(node, ord) JOIN nodes n ON n.id = j.node \
             GROUP BY s.id",
            &[],
        )
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for (ssid, (_, hosts)) in &got {
        assert_eq!(nodes_of.get(ssid), Some(hosts), "acknowledged allocation {ssid}");
    }
    let states: HashMap<String, String> =
        sql.query("SELECT id, state FROM sessions", &[]).iter().map(|r| (r.get(0), r.get(1))).collect();
    for ssid in &done {
        assert_eq!(states.get(ssid).map(String::as_str), Some("Done"), "acknowledged release {ssid}");
    }
    // The quota held across replicas.
    assert!(ledger.quota_refusals.load(Ordering::Relaxed) > 0, "the tight project hit its quota");
    let most = most_held(&sql, "events", "sessions", "tight");
    assert!((1..=3).contains(&most), "project tight held {most} nodes at once (quota 3)");
    // The whole store, once nothing writes to it any more.
    drop(replicas);
    check_store(&db.url);
}

#[test]
fn the_log_checks_catch_an_overlap_and_a_quota_breach() {
    let _serial = serial();
    // The two SQL checks above, on a small log that holds, then with one
    // forged event each.
    let db = database();
    let sql = Sql::connect(&db.url);
    sql.query("CREATE TABLE ev (seq bigint, node bigint, cause text, session text)", &[]);
    sql.query("CREATE TABLE ss (id text, project text)", &[]);
    sql.query("INSERT INTO ss VALUES ('s1', 'tight'), ('s2', 'tight'), ('s3', 'tight'), ('x', 'other')", &[]);
    sql.query(
        "INSERT INTO ev VALUES (10, 1, 'allocated', 's1'), (20, 2, 'allocated', 's1'), (30, 3, 'delivered', 's2'), \
         (40, 1, 'released', 's1'), (50, 2, 'released', 's1'), (60, 1, 'install_started', NULL), \
         (70, 4, 'hold_expired', NULL), (80, 2, 'allocated', 's3'), (90, 5, 'delivered', 'x')",
        &[],
    );
    assert!(overlapping_holds(&sql, "ev").is_empty());
    assert_eq!(most_held(&sql, "ev", "ss", "tight"), 3);
    // Node 3, held by s2, allocated to s3 as well: an overlap, and four
    // nodes for the project at once.
    sql.query("INSERT INTO ev VALUES (35, 3, 'allocated', 's3')", &[]);
    let found = overlapping_holds(&sql, "ev");
    assert_eq!(found, vec!["node 3 event 35: allocated to s3 while held by s2".to_string()]);
    assert_eq!(most_held(&sql, "ev", "ss", "tight"), 4);
    // A release by a session that does not hold the node.
    sql.query("INSERT INTO ev VALUES (95, 5, 'released', 's1')", &[]);
    assert_eq!(overlapping_holds(&sql, "ev").len(), 2);
}

/// `n` replicas of the service with the configuration `cfg`, each logging
/// to `r<i>.log` in `dir`.
fn start(cfg: &std::path::Path, dir: &std::path::Path, n: usize) -> Vec<Replica> {
    (0..n).map(|i| Replica::start(cfg, dir.join(format!("r{i}.log")))).collect()
}

/// A connection to the farm's database once `ready` nodes are Ready (the
/// pool filled; at most 30 s).
fn pool_filled(url: &str, ready: i64) -> Sql {
    let sql = Sql::connect(url);
    wait_until(Duration::from_secs(30), "the pool filled", || {
        sql.one_i64("SELECT count(*) FROM nodes WHERE state = 'Ready'") == ready
    });
    sql
}

/// A replica that leads, and the others.
fn leader_of(sql: &Sql, replicas: &[Replica]) -> usize {
    let pid = sql.leader_pid().expect("a leader") as u32;
    replicas.iter().position(|r| r.pid() == pid).expect("the leader is one of the replicas")
}

#[test]
fn the_leader_killed_another_leads_within_5_s_and_refills_the_pool() {
    let _serial = serial();
    let db = database();
    let dir = tempfile::tempdir().unwrap();
    let key = ok(&duffy(&db.url, &["key", "create", "--project", "ci"])).trim().to_string();
    let cfg = write(dir.path(), "duffy.toml", &config(&db.url, 8, 4, ""));
    let mut replicas = start(&cfg, dir.path(), 3);
    let sql = pool_filled(&db.url, 4);
    let l = leader_of(&sql, &replicas);
    let epoch = sql.epoch();
    let leader = replicas.remove(l);
    let killed = Instant::now();
    leader.kill();
    let took = wait_until(Duration::from_secs(5), "another leader", || sql.epoch() > epoch);
    eprintln!("takeover {took:?} after the leader's SIGKILL");
    assert!(leader_of(&sql, &replicas) < 2);
    // The pool drains through a follower and the new leader refills it.
    let port = replicas[0].port;
    let (status, body) = get(port, &format!("/Node/get?key={key}&count=4"));
    assert_eq!(status, 200, "{body}");
    let ssid = serde_json::from_str::<serde_json::Value>(&body).unwrap()["ssid"].as_str().unwrap().to_string();
    assert_eq!(get(port, &format!("/Node/done?key={key}&ssid={ssid}")).1, "\"Done\"");
    wait_until(Duration::from_secs(20), "the pool refilled", || {
        sql.one_i64("SELECT count(*) FROM nodes WHERE state = 'Ready'") == 4
    });
    let refilled_by: i64 = sql.query(
        "SELECT count(*) FROM events WHERE cause = 'install_succeeded' AND term = (SELECT leader_epoch FROM settings)",
        &[],
    )[0]
    .get(0);
    let terms: Vec<(String, Option<i64>)> = sql
        .query("SELECT cause, term FROM events WHERE cause LIKE 'install%' ORDER BY seq", &[])
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert!(
        refilled_by >= 4,
        "the new term's installs refilled the pool: {refilled_by}; epoch {}; {terms:?}",
        sql.epoch()
    );
    eprintln!("refilled {:?} after the kill", killed.elapsed());
    check_store(&db.url);
}

#[test]
fn the_leader_frozen_another_leads_within_15_s_and_the_old_one_writes_nothing() {
    let _serial = serial();
    let db = database();
    let dir = tempfile::tempdir().unwrap();
    let key = ok(&duffy(&db.url, &["key", "create", "--project", "ci"])).trim().to_string();
    let victim = ok(&duffy(&db.url, &["key", "create", "--project", "ci"])).trim().to_string();
    // Slow installs: the leader is frozen with installs in flight.
    let text = config(&db.url, 8, 4, "")
        .replace("install_min_ms = 100", "install_min_ms = 1500")
        .replace("install_max_ms = 400", "install_max_ms = 2500");
    let cfg = write(dir.path(), "duffy.toml", &text);
    let mut replicas = start(&cfg, dir.path(), 2);
    let sql = pool_filled(&db.url, 4);
    let l = leader_of(&sql, &replicas);
    let f = 1 - l;
    let (leader_port, follower_port) = (replicas[l].port, replicas[f].port);
    // The victim key is used on the leader, so the leader remembers it.
    let (status, body) = get(leader_port, &format!("/Node/get?key={victim}"));
    assert_eq!(status, 200, "{body}");
    let ssid = serde_json::from_str::<serde_json::Value>(&body).unwrap()["ssid"].as_str().unwrap().to_string();
    assert_eq!(get(leader_port, &format!("/Node/done?key={victim}&ssid={ssid}")).1, "\"Done\"");
    // Drain the pool so the leader starts installs, then freeze it.
    let (status, body) = get(follower_port, &format!("/Node/get?key={key}&count=3"));
    assert_eq!(status, 200, "{body}");
    let ssid = serde_json::from_str::<serde_json::Value>(&body).unwrap()["ssid"].as_str().unwrap().to_string();
    assert_eq!(get(follower_port, &format!("/Node/done?key={key}&ssid={ssid}")).1, "\"Done\"");
    wait_until(Duration::from_secs(5), "installs in flight", || {
        sql.one_i64("SELECT count(*) FROM nodes WHERE state = 'Provisioning'") > 0
    });
    let epoch = sql.epoch();
    replicas[l].freeze();
    let took = wait_until(Duration::from_secs(15), "another leader", || sql.epoch() > epoch);
    eprintln!("takeover {took:?} after the leader's SIGSTOP");
    let new_epoch = sql.epoch();
    assert_eq!(sql.leader_pid(), Some(replicas[f].pid() as i32));
    let old_writes = |sql: &Sql| sql.one_i64(&format!("SELECT count(*) FROM events WHERE term = {epoch}"));
    let before = old_writes(&sql);
    // Revoked while the old leader is frozen: the revocation waits for
    // live processes only, and the frozen one no longer counts.
    let list = ok(&duffy(&db.url, &["key", "list"]));
    let victim_id = list.lines().nth(2).and_then(|l| l.split_whitespace().next()).unwrap().to_string();
    ok(&duffy(&db.url, &["key", "revoke", &victim_id]));
    replicas[l].thaw();
    // Asked at once, before it may have noticed it lost its session, it
    // refuses the key revoked while it was frozen.
    let (status, body) = get(leader_port, &format!("/Node/get?key={victim}"));
    assert_eq!((status, body.as_str()), (200, "Invalid duffy key"), "the thawed replica forgot the revoked key");
    // The woken leader has in-flight installs and passes due: whatever it
    // tries under its old term is refused.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(old_writes(&sql), before, "the old leader wrote after the new term began");
    let last_old: i64 = sql.one_i64(&format!("SELECT coalesce(max(seq), 0) FROM events WHERE term = {epoch}"));
    let first_new: i64 =
        sql.one_i64(&format!("SELECT coalesce(min(seq), 9223372036854775807) FROM events WHERE term >= {new_epoch}"));
    assert!(last_old < first_new, "old term's writes all come before the new term's");
    // It serves requests again.
    let (status, body) = get(leader_port, &format!("/Node/get?key={key}"));
    assert_eq!(status, 200, "{body}");
    let log = replicas[l].log_text();
    eprintln!(
        "old leader's log: {} fenced refusals, {} 'lost leadership' lines",
        log.matches("fenced").count(),
        log.matches("lost leadership").count() + log.matches("no longer the leader").count()
    );
    wait_until(Duration::from_secs(20), "the pool refilled", || {
        sql.one_i64("SELECT count(*) FROM nodes WHERE state = 'Ready'") == 4
    });
    check_store(&db.url);
}

/// A queued request lives in the memory of the replica that took it, and
/// a replica that does not lead runs no reconciler pass: it serves its own
/// queue every tick, once the leader has installed the nodes it waits for.
#[test]
fn a_request_queued_on_a_replica_that_does_not_lead_is_served_there() {
    let _serial = serial();
    let db = database();
    let dir = tempfile::tempdir().unwrap();
    let key = ok(&duffy(&db.url, &["key", "create", "--project", "ci"])).trim().to_string();
    let cfg = write(dir.path(), "duffy.toml", &config(&db.url, 2, 2, ""));
    let replicas = start(&cfg, dir.path(), 2);
    let sql = pool_filled(&db.url, 2);
    let port = replicas[1 - leader_of(&sql, &replicas)].port;
    let json = |body: &str| serde_json::from_str::<serde_json::Value>(body).unwrap();

    let (status, body) =
        request(port, "POST", "/api/v1/sessions", Some(&key), Some(r#"{"pool": "7/x86_64", "count": 2}"#));
    assert_eq!(status, 201, "{body}");
    let holder = json(&body)["id"].as_str().unwrap().to_string();
    let (status, body) =
        request(port, "POST", "/api/v1/sessions", Some(&key), Some(r#"{"pool": "7/x86_64", "wait": true}"#));
    assert_eq!(status, 202, "{body}");
    let id = json(&body)["id"].as_str().unwrap().to_string();
    let (status, body) = request(port, "POST", &format!("/api/v1/sessions/{holder}/release"), Some(&key), None);
    assert_eq!(status, 200, "{body}");

    let mut last = String::new();
    let waited = wait_until(Duration::from_secs(30), "the queued request served", || {
        let (status, body) = request(port, "GET", &format!("/api/v1/requests/{id}"), Some(&key), None);
        assert_eq!(status, 200, "{body}");
        last = body;
        json(&last)["state"] != "waiting"
    });
    let served = json(&last);
    assert_eq!(served["state"], "served", "{served}");
    assert_eq!(served["session"]["state"], "Prod", "{served}");
    assert_eq!(served["session"]["hosts"].as_array().unwrap().len(), 1, "{served}");
    eprintln!("served {waited:?} after the release");
    check_store(&db.url);
}
