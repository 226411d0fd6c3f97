//! `duffy-pg-bench`: claim+release cycles on PostgreSQL, Duffy against a
//! raw SQL loop, in one run on one throwaway cluster with PostgreSQL's
//! durable defaults (fsync and synchronous commit on).
//!
//! For each farm size (Ready nodes of one pool), each mode runs on a fresh
//! database holding the same farm:
//!
//! - `raw`: the reference. Each client, on its own connection, claims one
//!   node in one statement (`… ORDER BY used_count, id LIMIT 1 FOR NO KEY
//!   UPDATE SKIP LOCKED`, with the session and event inserts in the same
//!   statement) and releases it straight back to Ready in a second one:
//!   two commits per cycle.
//! - `raw-duffy-writes`: the same, but writing what a Duffy cycle writes:
//!   the release leaves the node Active, and two more statements reinstall
//!   it (Provisioning, then Ready): four commits per cycle.
//! - `store`: the `PgStore` API in process, as the service calls it (a
//!   claim that delivers, a hand-back, then install started and install
//!   succeeded as fenced commits of a leader): four transactions per
//!   cycle.
//!
//! Each mode has as many database connections as the raw loop has clients
//! (the store's pool; the replicas' pools together).
//! - `1 replica`, `3 replicas`: `duffy serve` processes on the database
//!   and `duffy-load` (get + done over HTTP, keys in turn, jobs spread over
//!   the replicas); the leader reinstalls released nodes (simulated
//!   installs of zero time, as many at once as the farm has machines, as
//!   in the SQLite benches), the same four commits per cycle. Beside the
//!   costs it reports how the leader refilled the pool ([`Refill`]).
//!
//! Every mode runs the given number of clients for the given time after a
//! warm-up and reports cycles per second and latency percentiles (per
//! cycle for the in-process modes, per request for HTTP), and what its
//! measured window cost per cycle: commits, WAL flushes, the CPU time of
//! PostgreSQL, the replicas, the load generator and this process, and
//! (HTTP) the gets refused because the pool ran dry ([`Costs`]). It also measures
//! what a key change costs with three live replicas (the revocation waits
//! until every process confirmed it), against the alternative of one
//! version-check round trip per request.

use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use duffy_backend_postgres::test_cluster::{TestCluster, durable};
use duffy_backend_postgres::tokio_postgres::{self, NoTls};
use duffy_backend_postgres::{PgOptions, PgStore};
use duffy_core::{
    Actor, Arch, Batch, Cause, ClaimRequest, HandBack, HandBackKind, KeyId, NodeWrite, PoolKey, Project, SessionId,
    Store, Timestamp, hash_api_key,
};
use serde::Serialize;

/// Benchmark Duffy on PostgreSQL against a raw SKIP LOCKED loop.
#[derive(Debug, Parser)]
#[command(name = "duffy-pg-bench", version, about)]
struct Args {
    /// The `duffy` binary (a release build).
    #[arg(long)]
    duffy: PathBuf,
    /// The `duffy-load` binary.
    #[arg(long)]
    load: PathBuf,
    /// Farm sizes (Ready nodes).
    #[arg(long, value_delimiter = ',', default_value = "1000,100000")]
    nodes: Vec<usize>,
    /// Modes to run.
    #[arg(long, value_delimiter = ',', default_value = "raw,raw-duffy-writes,store,1,3")]
    modes: Vec<String>,
    /// Concurrent clients.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Measured seconds per mode.
    #[arg(long, default_value_t = 15.0)]
    seconds: f64,
    /// Warm-up seconds per mode (not measured).
    #[arg(long, default_value_t = 3.0)]
    warmup: f64,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// The replicas' `max_concurrent_installs` (default: the farm's size,
    /// as the SQLite benches configure it, so that a pass may start an
    /// install for every node released since the last one).
    #[arg(long)]
    max_concurrent_installs: Option<usize>,
    /// Load pg_stat_statements and print, for each mode, the statements
    /// run per cycle (for profiling: it slows every mode a little).
    #[arg(long)]
    statements: bool,
}

#[derive(Debug, Clone, Serialize)]
struct Result1 {
    nodes: usize,
    mode: String,
    cycles_per_second: f64,
    /// Latency of a whole cycle (in process) or of a request (HTTP), ms.
    p50_ms: f64,
    p99_ms: f64,
    /// HTTP only: p99 of `/Node/get` and of `/Node/done`, ms.
    get_p99_ms: Option<f64>,
    done_p99_ms: Option<f64>,
    errors: u64,
    /// HTTP only: gets answered "no Ready node" (the pool ran dry) per
    /// cycle.
    waits_per_cycle: Option<f64>,
    /// What the measured window cost (see [`Costs`]).
    costs: Costs,
    /// HTTP only: how the leader refilled the pool (see [`Refill`]).
    refill: Option<Refill>,
}

/// How the leader's reconciler refilled the pool in the measured window:
/// its passes (the replicas' `/metrics`) and, from the event log, how long
/// a released node waited for its install to start and how long the
/// install took (each the time between a node's two events).
#[derive(Debug, Clone, Copy, Default, Serialize)]
struct Refill {
    passes_per_second: f64,
    mean_pass_ms: f64,
    installs_started_per_pass: f64,
    /// Of those, reinstalls of Ready nodes older than `reinstall_age`.
    stale_installs_started_per_pass: f64,
    released_to_install_p50_ms: f64,
    released_to_install_p99_ms: f64,
    install_p50_ms: f64,
    install_p99_ms: f64,
    /// Mean Provisioning nodes (installs in flight) over the window.
    installs_in_flight: f64,
}

/// What a mode's measured window cost, per cycle: transactions and WAL
/// flushes on the server (`pg_stat_database`, `pg_stat_wal`, which the
/// server updates at most once a second per backend: a window of
/// several seconds is shifted, not shortened, by that), and the CPU time
/// of each process involved (`/proc`, user + system).
#[derive(Debug, Clone, Copy, Default, Serialize)]
struct Costs {
    commits_per_cycle: f64,
    rollbacks_per_cycle: f64,
    wal_syncs_per_cycle: f64,
    /// Statements per cycle (with `--statements` only; BEGIN and COMMIT
    /// count as statements).
    statements_per_cycle: Option<f64>,
    /// PostgreSQL's processes (every backend and background process).
    postgres_cpu_us_per_cycle: f64,
    /// The `duffy serve` processes.
    duffy_cpu_us_per_cycle: f64,
    /// `duffy-load`.
    load_cpu_us_per_cycle: f64,
    /// This process (the client of the in-process modes).
    bench_cpu_us_per_cycle: f64,
    /// CPU seconds used by all of them per second of the window (this
    /// machine has 2 cores; what is left went to other developers' work).
    cpu_busy: f64,
}

/// CPU time (seconds, user + system) of `pid` from `/proc`, with its
/// reaped children's if `children`.
fn proc_cpu(pid: u32, children: bool) -> Option<(f64, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: the fields start after its ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let ppid = n(1) as u32;
    let mut ticks = n(11) + n(12);
    if children {
        ticks += n(13) + n(14);
    }
    Some((ticks as f64 / rustix::param::clock_ticks_per_second() as f64, ppid))
}

/// The CPU time of PostgreSQL's processes: the postmaster's own and its
/// reaped children's (backends that ended), and each live child's.
fn postgres_cpu(postmaster: u32) -> f64 {
    let mut total = proc_cpu(postmaster, true).map(|c| c.0).unwrap_or(0.0);
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else { continue };
            if let Some((cpu, ppid)) = proc_cpu(pid, false) {
                if ppid == postmaster {
                    total += cpu;
                }
            }
        }
    }
    total
}

/// The processes a mode runs, and the database it uses, for [`Snap`]s.
struct Probe<'a> {
    db: &'a tokio_postgres::Client,
    postmaster: u32,
    duffy: Vec<u32>,
    load: Option<u32>,
    statements: bool,
}

/// Counters at one moment.
#[derive(Debug, Clone, Copy)]
struct Snap {
    at: Instant,
    commits: i64,
    rollbacks: i64,
    wal_syncs: i64,
    postgres: f64,
    duffy: f64,
    load: f64,
    bench: f64,
}

impl Probe<'_> {
    async fn new(db: &tokio_postgres::Client, statements: bool) -> Probe<'_> {
        let backend: i32 = db.query_one("SELECT pg_backend_pid()", &[]).await.expect("backend pid").get(0);
        let postmaster = proc_cpu(backend as u32, false).map(|c| c.1).unwrap_or(0);
        if statements {
            db.batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements").await.expect("pg_stat_statements");
        }
        Probe { db, postmaster, duffy: Vec::new(), load: None, statements }
    }

    /// The counters now; `start` also starts pg_stat_statements' count.
    async fn snap(&self, start: bool) -> Snap {
        let row = self
            .db
            .query_one(
                "SELECT pg_stat_clear_snapshot()::text, \
                 (SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()), \
                 (SELECT xact_rollback FROM pg_stat_database WHERE datname = current_database()), \
                 (SELECT wal_sync FROM pg_stat_wal)",
                &[],
            )
            .await
            .expect("server statistics");
        if self.statements && start {
            self.db.batch_execute("SELECT pg_stat_statements_reset()").await.expect("reset pg_stat_statements");
        }
        Snap {
            at: Instant::now(),
            commits: row.get(1),
            rollbacks: row.get(2),
            wal_syncs: row.get(3),
            postgres: postgres_cpu(self.postmaster),
            duffy: self.duffy.iter().filter_map(|p| proc_cpu(*p, false)).map(|c| c.0).sum(),
            load: self.load.and_then(|p| proc_cpu(p, false)).map(|c| c.0).unwrap_or(0.0),
            bench: proc_cpu(std::process::id(), false).map(|c| c.0).unwrap_or(0.0),
        }
    }

    /// What happened between `a` and `b`, over `cycles` cycles; with
    /// `--statements`, prints the statements of the window.
    async fn costs(&self, a: &Snap, b: &Snap, cycles: f64) -> Costs {
        let per = |x: f64| if cycles > 0.0 { x / cycles } else { 0.0 };
        let us = |x: f64, y: f64| per((y - x) * 1e6);
        let mut statements = None;
        if self.statements {
            let rows = self
                .db
                .query(
                    "SELECT calls, total_exec_time, left(regexp_replace(query, '\\s+', ' ', 'g'), 90) \
                     FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = \
                     current_database()) ORDER BY calls DESC",
                    &[],
                )
                .await
                .expect("pg_stat_statements");
            let mut total = 0i64;
            for r in &rows {
                let (calls, ms, q): (i64, f64, String) = (r.get(0), r.get(1), r.get(2));
                total += calls;
                if per(calls as f64) >= 0.01 {
                    eprintln!("    {:6.2}/cycle {:8.1} us/cycle  {q}", per(calls as f64), per(ms * 1000.0));
                }
            }
            statements = Some(per(total as f64));
        }
        let secs = b.at.duration_since(a.at).as_secs_f64().max(1e-9);
        Costs {
            commits_per_cycle: per((b.commits - a.commits) as f64),
            rollbacks_per_cycle: per((b.rollbacks - a.rollbacks) as f64),
            wal_syncs_per_cycle: per((b.wal_syncs - a.wal_syncs) as f64),
            statements_per_cycle: statements,
            postgres_cpu_us_per_cycle: us(a.postgres, b.postgres),
            duffy_cpu_us_per_cycle: us(a.duffy, b.duffy),
            load_cpu_us_per_cycle: us(a.load, b.load),
            bench_cpu_us_per_cycle: us(a.bench, b.bench),
            cpu_busy: (b.postgres - a.postgres + b.duffy - a.duffy + b.load - a.load + b.bench - a.bench) / secs,
        }
    }
}

#[derive(Debug, Serialize)]
struct KeyChange {
    revoke_with_3_replicas_p50_ms: f64,
    revoke_with_3_replicas_p99_ms: f64,
    version_check_round_trip_p50_ms: f64,
    version_check_round_trip_p99_ms: f64,
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn key(i: usize) -> String {
    format!("bench-key-{i:03}-0123456789abcdef")
}

/// A fresh database holding `nodes` Ready nodes of pool 7/x86_64, its
/// target, and 64+ projects with a key each.
async fn farm(cluster: &TestCluster, nodes: usize, clients: usize) -> (String, tokio_postgres::Client) {
    // The database outlives this function (the cluster goes with the
    // process), unwatched: a benchmark runs as long as it takes.
    let url = cluster.database().await.keep();
    let store = PgStore::connect(&url, PgOptions { pool_size: 4, ..PgOptions::default() }).await.expect("schema");
    for i in 0..clients {
        let p = format!("p{i}");
        store.upsert_project(Project { name: p.clone(), quota: None, ssh_keys: vec![] }).await.expect("project");
        store.add_api_key(&p, hash_api_key(&key(i)), false, Timestamp(0), None).await.expect("key");
    }
    drop(store);
    let (c, conn) = tokio_postgres::connect(&url, NoTls).await.expect("connect");
    tokio::spawn(conn);
    // Installed now, as a farm the service installed itself (the SQLite
    // bench's): a Ready node installed longer than `reinstall_age` (24 h)
    // ago is stale, and the leader would spend its install slots
    // reinstalling the whole farm. With a history of ended sessions, as a
    // farm in service has: the statistics the statements are planned with
    // (once per connection, on their generic plans) are those of a
    // sessions table in use, not of an empty one (analyzed empty, it would
    // be read by sequential scans, growing all through the run, until
    // autovacuum analyzed it again).
    let now = wall_ms();
    c.batch_execute(&format!(
        "INSERT INTO nodes (hostname, hardware_arch, state, image_release, image_arch, used_count, state_since, \
         installed_at, power, version) \
         SELECT 'n' || i || '.bench', 'x86_64', 'Ready', '7', 'x86_64', 0, {now}, {now}, 'on', 2 \
         FROM generate_series(1, {nodes}) i; \
         INSERT INTO pool_targets (release, arch, flavor, standby) VALUES ('7', 'x86_64', '', {nodes}); \
         INSERT INTO sessions (id, project, key_id, state, pool_release, pool_arch, nodes, created_at, delivered_at, \
             lease_until, ended_at, end_reason, version, origin_key, origin_at, expires_at) \
         SELECT 'history-' || i, 'p' || (i % {clients}), i % {clients} + 1, 'Done', '7', 'x86_64', \
             ARRAY[i % {nodes} + 1]::bigint[], {day_ago} + i, {day_ago} + i, {day_ago} + i + 3600000, \
             {day_ago} + i + 60000, 'done', 3, i % {clients} + 1, {day_ago} + i, {day_ago} + i + 3600000 \
         FROM generate_series(1, {HISTORY}) i",
        day_ago = now - 86_400_000,
    ))
    .await
    .expect("farm");
    c.batch_execute("VACUUM ANALYZE").await.expect("vacuum");
    (url, c)
}

/// Ended sessions in every farm (see [`farm`]).
const HISTORY: usize = 10_000;

const RAW_CLAIM: &str = "\
WITH picked AS (
    SELECT id FROM nodes WHERE state = 'Ready' AND image_release = '7' AND image_arch = 'x86_64'
    AND coalesce(image_flavor, '') = '' ORDER BY used_count, id LIMIT 1 FOR NO KEY UPDATE SKIP LOCKED
), upd AS (
    UPDATE nodes n SET state = 'Deployed', session = $1, used_count = n.used_count + 1, version = n.version + 1,
        state_since = $2 FROM picked WHERE n.id = picked.id RETURNING n.id
), s AS (
    INSERT INTO sessions (id, project, key_id, state, pool_release, pool_arch, nodes, created_at, delivered_at,
        lease_until, version, origin_key, origin_at)
    SELECT $1, 'p', $3, 'Prod', '7', 'x86_64', array_agg(id), $2, $2, $2, 1, $3, $2 FROM upd HAVING count(*) > 0
    RETURNING 1
), e AS (
    INSERT INTO events (node, from_state, to_state, cause, actor, session, at)
    SELECT id, 'Ready', 'Deployed', 'delivered', 'key:1', $1, $2 FROM upd RETURNING 1
)
SELECT id FROM upd";

const RAW_RELEASE: &str = "\
WITH n AS (
    UPDATE nodes SET state = $4, session = NULL, version = version + 1, state_since = $3 WHERE id = $1 RETURNING id
), s AS (
    UPDATE sessions SET state = 'Done', ended_at = $3, version = version + 1 WHERE id = $2 RETURNING 1
), e AS (
    INSERT INTO events (node, from_state, to_state, cause, actor, session, at)
    SELECT id, 'Deployed', $4, 'released', 'key:1', $2, $3 FROM n RETURNING 1
)
SELECT count(*) FROM n";

const RAW_STEP: &str = "\
WITH n AS (
    UPDATE nodes SET state = $2, version = version + 1, state_since = $3 WHERE id = $1 RETURNING id
), e AS (
    INSERT INTO events (node, from_state, to_state, cause, actor, at)
    SELECT id, $4, $2, $5, 'reconciler', $3 FROM n RETURNING 1
)
SELECT count(*) FROM n";

/// Runs `clients` copies of `cycle` for warm-up + measured time; returns
/// cycles per second and each measured cycle's duration (ms).
async fn drive<F, Fut>(
    probe: &Probe<'_>,
    clients: usize,
    warmup: f64,
    seconds: f64,
    cycle: F,
) -> (f64, Vec<f64>, u64, Costs)
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<bool, String>> + Send,
{
    let cycle = Arc::new(cycle);
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (cycle, measuring, stop) = (cycle.clone(), measuring.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let (mut lat, mut errors, mut n) = (Vec::new(), 0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let t = Instant::now();
                match cycle(c, n).await {
                    Ok(true) => {
                        if measuring.load(Ordering::Relaxed) {
                            lat.push(t.elapsed().as_secs_f64() * 1000.0);
                        }
                    }
                    Ok(false) => tokio::time::sleep(Duration::from_millis(1)).await,
                    Err(e) => {
                        if errors == 0 {
                            eprintln!("client {c}: {e}");
                        }
                        errors += 1;
                    }
                }
            }
            (lat, errors)
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(warmup)).await;
    let before = probe.snap(true).await;
    measuring.store(true, Ordering::Relaxed);
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    measuring.store(false, Ordering::Relaxed);
    let took = t.elapsed().as_secs_f64();
    let after = probe.snap(false).await;
    stop.store(true, Ordering::Relaxed);
    let (mut all, mut errors) = (Vec::new(), 0);
    for task in tasks {
        let (l, e) = task.await.expect("client task");
        all.extend(l);
        errors += e;
    }
    let costs = probe.costs(&before, &after, all.len() as f64).await;
    (all.len() as f64 / took, all, errors, costs)
}

async fn raw(probe: &Probe<'_>, url: &str, args: &Args, reinstall: bool) -> (f64, Vec<f64>, u64, Costs) {
    let mut clients = Vec::new();
    for _ in 0..args.clients {
        let (c, conn) = tokio_postgres::connect(url, NoTls).await.expect("connect");
        tokio::spawn(conn);
        let claim = c.prepare(RAW_CLAIM).await.expect("prepare");
        let release = c.prepare(RAW_RELEASE).await.expect("prepare");
        let step = c.prepare(RAW_STEP).await.expect("prepare");
        clients.push(Arc::new((c, claim, release, step)));
    }
    let clients = Arc::new(clients);
    drive(probe, args.clients, args.warmup, args.seconds, move |i, n| {
        let cl = clients[i].clone();
        async move {
            let (c, claim, release, step) = &*cl;
            let sid = format!("raw-{i}-{n}");
            let rows = c.query(claim, &[&sid, &0_i64, &(i as i64)]).await.map_err(|e| e.to_string())?;
            let Some(row) = rows.first() else { return Ok(false) };
            let id: i64 = row.get(0);
            let back = if reinstall { "Active" } else { "Ready" };
            c.query_one(release, &[&id, &sid, &0_i64, &back]).await.map_err(|e| e.to_string())?;
            if reinstall {
                c.query_one(step, &[&id, &"Provisioning", &0_i64, &"Active", &"install_started"])
                    .await
                    .map_err(|e| e.to_string())?;
                c.query_one(step, &[&id, &"Ready", &0_i64, &"Provisioning", &"install_succeeded"])
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Ok(true)
        }
    })
    .await
}

async fn store_mode(probe: &Probe<'_>, url: &str, args: &Args) -> (f64, Vec<f64>, u64, Costs) {
    let store: Arc<dyn Store> = Arc::new(
        // As many connections as the raw loop's clients have.
        PgStore::connect(url, PgOptions { pool_size: args.clients, ..PgOptions::default() }).await.expect("store"),
    );
    let pool = PoolKey::new("7", Arch::X86_64, None);
    let epoch = store.new_leader_epoch().await.expect("leadership term");
    drive(probe, args.clients, args.warmup, args.seconds, move |i, n| {
        let (store, pool) = (store.clone(), pool.clone());
        async move {
            let now = Timestamp(1);
            let req = ClaimRequest {
                session: SessionId(format!("store-{i}-{n}")),
                project: format!("p{i}"),
                key_id: KeyId(i as u64 + 1),
                pool,
                count: 1,
                default_quota: None,
                check_target: false,
                rate_limit: None,
                actor: Actor::Key(KeyId(i as u64 + 1)),
                now,
                deliver: Some(now),
            };
            let c = match store.claim(req).await.map_err(|e| e.to_string())? {
                Ok(c) => c,
                Err(_) => return Ok(false),
            };
            let e = |e: duffy_core::TransitionError| e.to_string();
            // The job's done, as `/Node/done` makes it.
            let done = HandBack {
                session: c.session.id.clone(),
                key_id: c.session.key_id,
                kind: HandBackKind::Done,
                actor: Actor::Key(c.session.key_id),
                now,
            };
            store.hand_back(done).await.map_err(|e| e.to_string())?.map_err(|r| format!("{r:?}"))?;
            // The node as the hand-back wrote it.
            let after =
                NodeWrite::transition(&c.nodes[0], Cause::Released, Actor::Key(c.session.key_id), now).map_err(e)?.node;
            // The reinstall, as the leader's reconciler writes it (fenced).
            let start = Cause::InstallStarted { image: c.session.pool.clone(), why: "bench".into() };
            let w = NodeWrite::transition(&after, start, Actor::Reconciler, now).map_err(e)?;
            let prov = w.node.clone();
            store
                .commit_fenced(Batch { nodes: vec![w], ..Batch::default() }, epoch)
                .await
                .map_err(|e| e.to_string())?;
            let w = NodeWrite::transition(&prov, Cause::InstallSucceeded { host_key: None }, Actor::Reconciler, now)
                .map_err(e)?;
            store
                .commit_fenced(Batch { nodes: vec![w], ..Batch::default() }, epoch)
                .await
                .map_err(|e| e.to_string())?;
            Ok(true)
        }
    })
    .await
}

/// A `duffy serve` child, stopped on drop.
struct Serve(Child, u16);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.0.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(args: &Args, dir: &std::path::Path, url: &str, nodes: usize, i: usize, pool: usize) -> Serve {
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let cfg = dir.join(format!("duffy-{i}.toml"));
    let installs = args.max_concurrent_installs.unwrap_or(nodes);
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:{port}\"\ndatabase = \"{url}\"\n\
             [policy]\nrate_limit = \"off\"\npower_check_interval = \"off\"\nmax_concurrent_installs = {installs}\n\
             [[pools]]\nrelease = \"7\"\narch = \"x86_64\"\nstandby = {nodes}\n\
             [hardware]\nkind = \"simulated\"\nmachines = 0\ninstall_min_ms = 0\ninstall_max_ms = 0\nprepare_ms = 0\n\
             [postgres]\npool_size = {pool}\n"
        ),
    )
    .expect("config");
    let log = std::fs::File::create(dir.join(format!("duffy-{i}.log"))).expect("log");
    let child = Command::new(&args.duffy)
        .args(["serve", "--config"])
        .arg(&cfg)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start duffy serve");
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "duffy serve did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
    Serve(child, port)
}

async fn http_mode(args: &Args, probe: &mut Probe<'_>, ports: &[u16]) -> Result1 {
    let mut cmd = Command::new(&args.load);
    for p in ports {
        cmd.args(["--url", &format!("http://127.0.0.1:{p}")]);
    }
    for i in 0..args.clients {
        cmd.args(["--key", &key(i)]);
    }
    let child = cmd
        .args(["-c", &args.clients.to_string(), "--duration", &args.seconds.to_string()])
        .args(["--warmup", &args.warmup.to_string(), "--json", "--quiet"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run duffy-load");
    probe.load = Some(child.id());
    // duffy-load's own window, give or take its start-up.
    tokio::time::sleep(Duration::from_secs_f64(args.warmup)).await;
    let passes_before = passes(ports).await;
    let before = probe.snap(true).await;
    let window_start = wall_ms();
    // Installs in flight, sampled through the window.
    let mut in_flight = Vec::new();
    let end = Instant::now() + Duration::from_secs_f64(args.seconds);
    while Instant::now() < end {
        let n: i64 = probe
            .db
            .query_one("SELECT count(*) FROM nodes WHERE state = 'Provisioning'", &[])
            .await
            .expect("provisioning count")
            .get(0);
        in_flight.push(n as f64);
        tokio::time::sleep(end.saturating_duration_since(Instant::now()).min(Duration::from_millis(250))).await;
    }
    let window_end = wall_ms();
    let after = probe.snap(false).await;
    let passes_after = passes(ports).await;
    let out = tokio::task::block_in_place(|| child.wait_with_output()).expect("run duffy-load");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("duffy-load: {e}: {}", String::from_utf8_lossy(&out.stderr)));
    let f = |path: &[&str]| path.iter().fold(&v, |v, k| &v[*k]).as_f64().unwrap_or(0.0);
    let errors: u64 = v["errors"].as_object().map(|m| m.values().filter_map(|x| x.as_u64()).sum()).unwrap_or(0);
    let cycles = f(&["cycles"]);
    let costs =
        probe.costs(&before, &after, cycles * after.at.duration_since(before.at).as_secs_f64() / args.seconds).await;
    Result1 {
        nodes: 0,
        mode: String::new(),
        cycles_per_second: f(&["cycles_per_second"]),
        p50_ms: f(&["all_requests", "p50_ms"]),
        p99_ms: f(&["all_requests", "p99_ms"]),
        get_p99_ms: Some(f(&["get", "p99_ms"])),
        done_p99_ms: Some(f(&["done", "p99_ms"])),
        errors,
        waits_per_cycle: Some(if cycles > 0.0 { f(&["waits_for_nodes"]) / cycles } else { 0.0 }),
        costs,
        refill: Some(
            refill(probe.db, (window_start, window_end), passes_before, passes_after, &in_flight, args.seconds).await,
        ),
    }
}

/// The wall clock in milliseconds (the engine's clock, which stamps the
/// events).
fn wall_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// The replicas' reconciler counters, summed (only the leader's move):
/// passes, seconds spent in them, installs started.
async fn passes(ports: &[u16]) -> (f64, f64, f64, f64) {
    let mut out = (0.0, 0.0, 0.0, 0.0);
    for p in ports {
        let text = scrape(*p).await.unwrap_or_default();
        let sum = |name: &str| -> f64 {
            text.lines()
                .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum()
        };
        out.0 += sum("duffy_reconciler_pass_duration_seconds_count");
        out.1 += sum("duffy_reconciler_pass_duration_seconds_sum");
        out.2 += sum("duffy_installs_started_total");
        out.3 += sum("duffy_installs_started_total{reason=\"stale\"}");
    }
    out
}

/// `GET /metrics` of the replica on `port` (plain HTTP/1.0, the body).
async fn scrape(port: u16) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    Ok(text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
}

/// How the pool was refilled in the window `(from, to)` (wall-clock ms):
/// each node's install start after its release, and its Ready after that
/// start, timed from the node's previous event.
async fn refill(
    db: &tokio_postgres::Client,
    (from, to): (i64, i64),
    before: (f64, f64, f64, f64),
    after: (f64, f64, f64, f64),
    in_flight: &[f64],
    seconds: f64,
) -> Refill {
    let rows = db
        .query(
            "WITH e AS (
                 SELECT to_state, at, lag(at) OVER w AS prev_at, lag(to_state) OVER w AS prev_state
                 FROM events WHERE at >= $1::bigint - 10000 AND at <= $2::bigint WINDOW w AS (PARTITION BY node ORDER BY seq)
             )
             SELECT to_state,
                    coalesce(percentile_cont(0.5) WITHIN GROUP (ORDER BY at - prev_at), 0)::float8,
                    coalesce(percentile_cont(0.99) WITHIN GROUP (ORDER BY at - prev_at), 0)::float8
             FROM e WHERE at >= $1::bigint AND prev_at IS NOT NULL
               AND ((prev_state = 'Active' AND to_state = 'Provisioning')
                 OR (prev_state = 'Provisioning' AND to_state = 'Ready'))
             GROUP BY to_state",
            &[&from, &to],
        )
        .await
        .expect("refill times");
    let mut r = Refill::default();
    for row in &rows {
        let (state, p50, p99): (String, f64, f64) = (row.get(0), row.get(1), row.get(2));
        if state == "Provisioning" {
            (r.released_to_install_p50_ms, r.released_to_install_p99_ms) = (p50, p99);
        } else {
            (r.install_p50_ms, r.install_p99_ms) = (p50, p99);
        }
    }
    let passes = after.0 - before.0;
    r.passes_per_second = passes / seconds;
    r.mean_pass_ms = if passes > 0.0 { 1000.0 * (after.1 - before.1) / passes } else { 0.0 };
    r.installs_started_per_pass = if passes > 0.0 { (after.2 - before.2) / passes } else { 0.0 };
    r.stale_installs_started_per_pass = if passes > 0.0 { (after.3 - before.3) / passes } else { 0.0 };
    r.installs_in_flight =
        if in_flight.is_empty() { 0.0 } else { in_flight.iter().sum::<f64>() / in_flight.len() as f64 };
    r
}

async fn key_change(url: &str) -> KeyChange {
    let store = PgStore::connect(url, PgOptions { pool_size: 2, ..PgOptions::default() }).await.expect("store");
    store.upsert_project(Project { name: "kc".into(), quota: None, ssh_keys: vec![] }).await.expect("project");
    let mut revoke = Vec::new();
    for i in 0..30 {
        let rec =
            store.add_api_key("kc", hash_api_key(&format!("kc-{i}")), false, Timestamp(0), None).await.expect("key");
        let t = Instant::now();
        store.revoke_api_key(rec.id, Timestamp(1)).await.expect("revoke");
        revoke.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let (c, conn) = tokio_postgres::connect(url, NoTls).await.expect("connect");
    tokio::spawn(conn);
    let stmt = c.prepare("SELECT last_value FROM key_changes").await.expect("prepare");
    let mut rt = Vec::new();
    for _ in 0..2000 {
        let t = Instant::now();
        c.query_one(&stmt, &[]).await.expect("version");
        rt.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    KeyChange {
        revoke_with_3_replicas_p50_ms: pct(&mut revoke, 0.5),
        revoke_with_3_replicas_p99_ms: pct(&mut revoke, 0.99),
        version_check_round_trip_p50_ms: pct(&mut rt, 0.5),
        version_check_round_trip_p99_ms: pct(&mut rt, 0.99),
    }
}

async fn run(args: Args) -> Result<(), String> {
    let mut settings = vec!["shared_buffers=256MB", "max_wal_size=2GB"];
    if args.statements {
        settings.push("shared_preload_libraries=pg_stat_statements");
    }
    let cluster = durable(&settings)?;
    eprintln!("PostgreSQL at {} (fsync and synchronous commit on)", cluster.address());
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut results = Vec::new();
    let mut key_changes = None;
    for &nodes in &args.nodes {
        for mode in &args.modes {
            let (url, c) = farm(&cluster, nodes, args.clients).await;
            let mut probe = Probe::new(&c, args.statements).await;
            eprintln!("{nodes} nodes, {mode}: ");
            let mut r = match mode.as_str() {
                "raw" | "raw-duffy-writes" | "store" => {
                    let (cps, mut lat, errors, costs) = match mode.as_str() {
                        "raw" => raw(&probe, &url, &args, false).await,
                        "raw-duffy-writes" => raw(&probe, &url, &args, true).await,
                        _ => store_mode(&probe, &url, &args).await,
                    };
                    Result1 {
                        nodes,
                        mode: mode.clone(),
                        cycles_per_second: cps,
                        p50_ms: pct(&mut lat, 0.5),
                        p99_ms: pct(&mut lat, 0.99),
                        get_p99_ms: None,
                        done_p99_ms: None,
                        errors,
                        waits_per_cycle: None,
                        costs,
                        refill: None,
                    }
                }
                n => {
                    let n: usize = n.parse().map_err(|_| format!("unknown mode {n:?}"))?;
                    // The raw loop's connections, shared out among the
                    // replicas.
                    let pool = args.clients.div_ceil(n);
                    let replicas: Vec<Serve> = (0..n).map(|i| serve(&args, dir.path(), &url, nodes, i, pool)).collect();
                    let ports: Vec<u16> = replicas.iter().map(|s| s.1).collect();
                    probe.duffy = replicas.iter().map(|s| s.0.id()).collect();
                    let r = http_mode(&args, &mut probe, &ports).await;
                    if n == 3 && key_changes.is_none() {
                        key_changes = Some(key_change(&url).await);
                    }
                    drop(replicas);
                    Result1 { nodes, mode: format!("{n} replica{}", if n == 1 { "" } else { "s" }), ..r }
                }
            };
            r.nodes = nodes;
            let k = &r.costs;
            eprintln!(
                "  {:.0} cycles/s, p99 {:.1} ms, {} errors, {:.2} waits/cycle; per cycle: {:.2} commits, {:.2} \
                 rollbacks, {:.2} WAL syncs, {} statements, CPU us postgres {:.0} duffy {:.0} load {:.0} bench {:.0} \
                 (CPU busy {:.2})",
                r.cycles_per_second,
                r.p99_ms,
                r.errors,
                r.waits_per_cycle.unwrap_or(0.0),
                k.commits_per_cycle,
                k.rollbacks_per_cycle,
                k.wal_syncs_per_cycle,
                k.statements_per_cycle.map(|s| format!("{s:.1}")).unwrap_or_else(|| "?".into()),
                k.postgres_cpu_us_per_cycle,
                k.duffy_cpu_us_per_cycle,
                k.load_cpu_us_per_cycle,
                k.bench_cpu_us_per_cycle,
                k.cpu_busy
            );
            if let Some(f) = &r.refill {
                eprintln!(
                    "  refill: {:.1} passes/s of {:.1} ms, {:.1} installs started per pass ({:.1} stale), {:.1} in flight; \
                     released to install started p50 {:.0} ms, p99 {:.0} ms; install p50 {:.0} ms, p99 {:.0} ms",
                    f.passes_per_second,
                    f.mean_pass_ms,
                    f.installs_started_per_pass,
                    f.stale_installs_started_per_pass,
                    f.installs_in_flight,
                    f.released_to_install_p50_ms,
                    f.released_to_install_p99_ms,
                    f.install_p50_ms,
                    f.install_p99_ms
                );
            }
            results.push(r);
        }
    }
    println!(
        "| nodes | mode | cycles/s | vs raw | vs raw (Duffy's writes) | p50 ms | p99 ms | errors | commits/cycle | \
         WAL syncs/cycle | CPU µs/cycle (postgres + duffy + load + bench) |"
    );
    println!("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |");
    for r in &results {
        let base = |m: &str| results.iter().find(|x| x.nodes == r.nodes && x.mode == m).map(|x| x.cycles_per_second);
        let ratio = |b: Option<f64>| b.map(|b| format!("{:.0}%", 100.0 * r.cycles_per_second / b)).unwrap_or_default();
        let p99 = match (r.get_p99_ms, r.done_p99_ms) {
            (Some(g), Some(d)) => format!("{:.1} (get {g:.1}, done {d:.1})", r.p99_ms),
            _ => format!("{:.1}", r.p99_ms),
        };
        let k = &r.costs;
        let errors = match r.waits_per_cycle {
            Some(w) if w > 0.0 => format!("{} ({w:.2} waits/cycle)", r.errors),
            _ => r.errors.to_string(),
        };
        println!(
            "| {} | {} | {:.0} | {} | {} | {:.2} | {p99} | {errors} | {:.2} | {:.2} | {:.0} ({:.0} + {:.0} + {:.0} + {:.0}) |",
            r.nodes,
            r.mode,
            r.cycles_per_second,
            ratio(base("raw")),
            ratio(base("raw-duffy-writes")),
            r.p50_ms,
            k.commits_per_cycle,
            k.wal_syncs_per_cycle,
            k.postgres_cpu_us_per_cycle + k.duffy_cpu_us_per_cycle + k.load_cpu_us_per_cycle + k.bench_cpu_us_per_cycle,
            k.postgres_cpu_us_per_cycle,
            k.duffy_cpu_us_per_cycle,
            k.load_cpu_us_per_cycle,
            k.bench_cpu_us_per_cycle,
        );
    }
    if let (Some(small), Some(big)) = (args.nodes.first(), args.nodes.last()) {
        for r in results.iter().filter(|r| r.nodes == *big) {
            if let Some(s) = results.iter().find(|x| x.nodes == *small && x.mode == r.mode) {
                println!(
                    "{} nodes / {} nodes, {}: {:.2}x the cycles/s",
                    big,
                    small,
                    r.mode,
                    r.cycles_per_second / s.cycles_per_second
                );
            }
        }
    }
    if let Some(k) = &key_changes {
        println!(
            "key change with 3 replicas: revoke p50 {:.2} ms, p99 {:.2} ms; a version check per request would add a \
             round trip of p50 {:.3} ms, p99 {:.3} ms to every request",
            k.revoke_with_3_replicas_p50_ms,
            k.revoke_with_3_replicas_p99_ms,
            k.version_check_round_trip_p50_ms,
            k.version_check_round_trip_p99_ms
        );
    }
    if let Some(path) = &args.json {
        let doc = serde_json::json!({ "results": results, "key_change": key_changes });
        std::fs::write(path, serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("duffy-pg-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("duffy-pg-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
