//! The crash tests' workload and verifier, shared by the SIGKILL test
//! (`crash.rs`) and the power-cut test (`power.rs`).
//!
//! The child is the test binary itself, run again with `--exact <name>`
//! and [`CHILD_DB`] set: [`child_main`] opens the store and runs a write
//! load from [`TASKS`] tasks (claims, deliveries, fails under the fail-cap
//! guard, releases, reinstalls, new nodes, pool targets, API keys). Before
//! sending a commit it prints a `TRY` line naming the batch (every event of
//! the batch carries that name as its detail); after an operation's await
//! returned `Ok` it prints `ACK` lines. Any panic, in any task, prints
//! `CHILD-PANIC` and ends the process at once, so a failing task cannot
//! go unnoticed behind the others.
//!
//! The parent kills the child ([`Child`]), reopens the file and runs
//! [`verify`]: every acknowledged operation present, every batch applied
//! whole or not at all, the farm's invariants, the event history, one
//! event per node version, and SQLite's own integrity check.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use duffy_backend_sqlite::{SqliteOptions, SqliteStore, TestHooks};
use duffy_core::testkit::conformance::{add_ready, check_history, check_invariants, pool7};
use duffy_core::{
    Actor, Arch, Batch, Cause, CauseKind, ClaimRefusal, ClaimRequest, CommitError, EventQuery, Guard, KeyId, NewNode,
    Node, NodeId, NodeState, NodeWrite, PoolKey, PoolTarget, Project, RateLimit, Session, SessionCause, SessionId,
    SessionState, SessionWrite, Store, Timestamp,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The database the child opens (its presence makes the child test run).
pub const CHILD_DB: &str = "DUFFY_WORKLOAD_DB";
/// The round number (seeds the child's choices and names).
pub const CHILD_ROUND: &str = "DUFFY_WORKLOAD_ROUND";
/// `store-error`: one task (not the first) provokes a store error after a
/// few operations, to show the parent notices.
pub const CHILD_SABOTAGE: &str = "DUFFY_WORKLOAD_SABOTAGE";
/// `1`: the child opens the store with the deliberately broken
/// `answer_before_sync` hook, to show the power-cut test notices.
pub const CHILD_ANSWER_EARLY: &str = "DUFFY_WORKLOAD_ANSWER_BEFORE_SYNC";

const T0: Timestamp = Timestamp(1_700_000_000_000);
const PROJECT: &str = "crash";
const QUOTA: u32 = 30;
const FAIL_CAP: u32 = 6;
/// Concurrent tasks in the child.
pub const TASKS: u64 = 8;

// ----- the child -----

/// Prints one line; exits if the parent is gone.
fn say(line: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
        std::process::exit(2);
    }
}

fn ack(line: std::fmt::Arguments<'_>) {
    say(format_args!("ACK {line}"));
}

fn ack_batch(batch: &Batch) {
    for w in &batch.nodes {
        ack(format_args!("node {} {}", w.node.id, w.node.version));
    }
    for w in &batch.sessions {
        ack(format_args!("session {} {}", w.session.id, w.session.version));
    }
}

/// Names a batch: every event carries the name, and a `TRY` line tells
/// the parent how many events the batch has and which session version it
/// writes.
fn name_batch(batch: &mut Batch, name: &str) {
    for w in &mut batch.nodes {
        w.event.detail = Some(name.to_string());
    }
    let session = match batch.sessions.first() {
        Some(w) => format!(" {} {}", w.session.id, w.session.version),
        None => String::new(),
    };
    say(format_args!("TRY {name} {}{session}", batch.nodes.len()));
}

/// Commits and acknowledges; `false` if refused (conflict or guard).
async fn commit_ack(store: &dyn Store, mut batch: Batch, name: &str) -> bool {
    name_batch(&mut batch, name);
    match store.commit(batch.clone()).await {
        Ok(()) => {
            ack_batch(&batch);
            true
        }
        Err(CommitError::Conflict(_) | CommitError::GuardFailed { .. }) => false,
        Err(e) => panic!("commit failed: {e}"),
    }
}

/// Moves a session to `state` through the session state machine (an
/// Allocating session that ends is aborted, a delivered one released) and
/// its nodes with `cause`, as one compare-and-set batch.
fn session_batch(s: &Session, nodes: &[Node], state: SessionState, cause: &dyn Fn(&Node) -> Cause) -> Batch {
    let mut batch = Batch::default();
    for n in nodes {
        if let Ok(w) = NodeWrite::transition(n, cause(n), Actor::Operator, T0) {
            batch.nodes.push(w);
        }
    }
    let session_cause = match (s.state, state) {
        (_, SessionState::Prod) => SessionCause::Delivered { lease_until: T0 },
        (_, SessionState::Fail) => SessionCause::FailedByUser { hold_until: T0 },
        (SessionState::Allocating, _) => SessionCause::Aborted { reason: "crash test".into() },
        _ => SessionCause::Released,
    };
    batch.sessions.push(SessionWrite::transition(s, session_cause, T0).expect("a legal session transition"));
    batch
}

/// Reinstalls nodes that are Active (InstallStarted) or Provisioning
/// (InstallSucceeded); conflicts with other tasks doing the same are fine.
async fn reinstall(store: &dyn Store, nodes: Vec<Node>, name: String) {
    let mut batch = Batch::default();
    for n in &nodes {
        let cause = match n.state {
            NodeState::Active => Cause::InstallStarted { image: pool7(), why: "crash test".into() },
            NodeState::Provisioning => Cause::InstallSucceeded { host_key: None },
            _ => continue,
        };
        if let Ok(w) = NodeWrite::transition(n, cause, Actor::Reconciler, T0) {
            batch.nodes.push(w);
        }
    }
    if batch.nodes.is_empty() {
        return;
    }
    let next: Vec<Node> = batch.nodes.iter().map(|w| w.node.clone()).collect();
    if commit_ack(store, batch, &name).await {
        let provisioning: Vec<Node> = next.into_iter().filter(|n| n.state == NodeState::Provisioning).collect();
        if !provisioning.is_empty() {
            Box::pin(reinstall(store, provisioning, format!("{name}+"))).await;
        }
    }
}

async fn held_nodes(store: &dyn Store, s: &Session) -> Vec<Node> {
    let mut out = Vec::new();
    for id in &s.nodes {
        if let Some(n) = store.node(*id).await.expect("read") {
            if n.session.as_ref() == Some(&s.id) {
                out.push(n);
            }
        }
    }
    out
}

async fn child_task(store: Arc<SqliteStore>, round: u64, task: u64, seq: Arc<AtomicU64>, sabotage: bool) {
    let store: &dyn Store = &*store;
    let mut rng = StdRng::seed_from_u64(round * 1000 + task);
    let mut mine = 0u64;
    loop {
        let i = seq.fetch_add(1, Ordering::Relaxed);
        mine += 1;
        let name = format!("op-{round}-{task}-{i}");
        if sabotage && mine == 20 {
            // A request the store refuses as invalid: the task's
            // `expect` panics like it would on any unexpected store error.
            let mut req = duffy_core::testkit::conformance::claim_req(&name, task, PROJECT, 1, T0);
            req.count = 0;
            let _refused = store.claim(req).await.expect("store ok");
        }
        match rng.gen_range(0..100) {
            0..35 => {
                let req = ClaimRequest {
                    session: SessionId(format!("c-{round}-{task}-{i}")),
                    project: PROJECT.into(),
                    key_id: KeyId(task),
                    pool: pool7(),
                    count: rng.gen_range(1..=3),
                    check_target: false,
                    default_quota: Some(QUOTA),
                    rate_limit: Some(RateLimit { max: 1_000_000, window: Duration::from_secs(3600) }),
                    actor: Actor::Key(KeyId(task)),
                    now: T0,
                    deliver: None,
                };
                match store.claim(req).await.expect("store ok") {
                    Ok(c) => {
                        for n in &c.nodes {
                            ack(format_args!("node {} {}", n.id, n.version));
                        }
                        ack(format_args!("session {} {}", c.session.id, c.session.version));
                    }
                    Err(ClaimRefusal::InsufficientNodes { .. } | ClaimRefusal::QuotaExceeded { .. }) => {}
                    Err(other) => panic!("unexpected refusal {other:?}"),
                }
            }
            35..75 => {
                let live = store.live_sessions().await.expect("live");
                if live.is_empty() {
                    continue;
                }
                let s = &live[rng.gen_range(0..live.len())];
                let nodes = held_nodes(store, s).await;
                let done = |n: &Node| match n.state {
                    NodeState::Contextualizing => Cause::AllocationAborted { reason: "crash test".into() },
                    _ => Cause::Released,
                };
                let batch = match s.state {
                    SessionState::Allocating if rng.gen_bool(0.7) => {
                        session_batch(s, &nodes, SessionState::Prod, &|_| Cause::Prepared)
                    }
                    SessionState::Prod if rng.gen_bool(0.4) => {
                        let mut b =
                            session_batch(s, &nodes, SessionState::Fail, &|_| Cause::FailedByUser { hold_until: T0 });
                        b.guards.push(Guard::ProjectFailedNodesAtMost { project: PROJECT.into(), max: FAIL_CAP });
                        b
                    }
                    _ => session_batch(s, &nodes, SessionState::Done, &done),
                };
                let ending = !batch.sessions[0].session.state.is_live();
                let released: Vec<Node> = batch.nodes.iter().map(|w| w.node.clone()).collect();
                if commit_ack(store, batch, &name).await && ending {
                    reinstall(store, released, format!("{name}r")).await;
                }
            }
            75..88 => {
                // Whatever a crash left half-way: Active or Provisioning.
                let stranded: Vec<Node> = store
                    .nodes_in_states(&[NodeState::Active, NodeState::Provisioning])
                    .await
                    .expect("nodes")
                    .into_iter()
                    .take(4)
                    .collect();
                reinstall(store, stranded, name).await;
            }
            88..94 => {
                let host = format!("new-{round}-{task}-{i}");
                let added = store.add_nodes(vec![NewNode::new(host.clone(), Arch::X86_64)], Actor::Operator, T0).await;
                let added = added.expect("add");
                ack(format_args!("add {host} {}", added[0].id));
            }
            94..97 => {
                let release = format!("r{round}-{task}-{i}");
                let t = PoolTarget { pool: PoolKey::new(release.clone(), Arch::X86_64, None), standby: 1 };
                store.set_pool_target(t).await.expect("target");
                ack(format_args!("target {release}"));
            }
            _ => {
                let key = format!("key-{round}-{task}-{i}");
                store.add_api_key(PROJECT, duffy_core::hash_api_key(&key), false, T0, None).await.expect("key");
                ack(format_args!("key {key}"));
            }
        }
    }
}

/// The child's body, called by the child test function: does nothing
/// unless [`CHILD_DB`] is set; else runs until killed (or 60 s, should the
/// parent vanish). Any panic ends the process with `CHILD-PANIC` on stdout.
pub fn child_main() {
    let Ok(path) = std::env::var(CHILD_DB) else { return };
    let round: u64 = std::env::var(CHILD_ROUND).ok().and_then(|r| r.parse().ok()).unwrap_or(0);
    let sabotage = std::env::var(CHILD_SABOTAGE).is_ok_and(|s| s == "store-error");
    let answer_early = std::env::var(CHILD_ANSWER_EARLY).is_ok_and(|s| s == "1");
    // A panic in a task is caught by tokio and would only show when that
    // task is awaited; the hook makes any panic end the child, loudly.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        say(format_args!("CHILD-PANIC {}", info.to_string().replace('\n', " | ")));
        default_hook(info);
        std::process::exit(101);
    }));
    std::thread::spawn(|| {
        std::thread::sleep(Duration::from_secs(60));
        say(format_args!("CHILD-PANIC still running after 60 s"));
        std::process::exit(3);
    });
    let options = SqliteOptions {
        test_hooks: TestHooks { answer_before_sync: answer_early, ..TestHooks::default() },
        ..SqliteOptions::default()
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async {
        let store = Arc::new(SqliteStore::open(&path, options).expect("child opens the store"));
        say(format_args!("READY"));
        let seq = Arc::new(AtomicU64::new(0));
        let tasks: Vec<_> = (1..=TASKS)
            .map(|task| tokio::spawn(child_task(store.clone(), round, task, seq.clone(), sabotage && task == 5)))
            .collect();
        // The tasks never end; whichever ends first (by a panic the hook
        // did not catch, or by returning) is a failure.
        let (r, i, _) = futures::future::select_all(tasks).await;
        say(format_args!("CHILD-PANIC task {} ended: {r:?}", i + 1));
        std::process::exit(101);
    });
}

// ----- the parent -----

/// Creates the store the rounds work on: 40 Ready nodes and the project.
pub fn seed(path: &Path) {
    let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    rt.block_on(async {
        let store = SqliteStore::open(path, SqliteOptions::default()).expect("open");
        add_ready(&store, "n", 40, &pool7()).await;
        store
            .upsert_project(Project { name: PROJECT.into(), quota: Some(QUOTA), ssh_keys: vec![] })
            .await
            .expect("project");
    });
}

/// A batch the child was about to commit.
#[derive(Debug, Clone)]
struct Try {
    events: usize,
    session: Option<(SessionId, u64)>,
}

/// What the children acknowledged (and tried), over all rounds.
#[derive(Default)]
pub struct Acks {
    nodes: HashMap<NodeId, u64>,
    sessions: HashMap<SessionId, u64>,
    added: HashMap<String, NodeId>,
    targets: Vec<String>,
    keys: Vec<String>,
    tries: HashMap<String, Try>,
    /// Acknowledgement lines read.
    pub total: u64,
}

impl Acks {
    /// Records one `ACK` or `TRY` line (other lines are ignored).
    pub fn record(&mut self, line: &str) -> Result<(), String> {
        let parts: Vec<&str> = line.split(' ').collect();
        let bad = || format!("bad line {line:?}");
        let num = |s: &str| s.parse::<u64>().map_err(|_| bad());
        match parts.as_slice() {
            ["ACK", "node", id, v] => {
                let e = self.nodes.entry(NodeId(num(id)?)).or_default();
                *e = (*e).max(num(v)?);
            }
            ["ACK", "session", sid, v] => {
                let e = self.sessions.entry(SessionId((*sid).to_string())).or_default();
                *e = (*e).max(num(v)?);
            }
            ["ACK", "add", host, id] => {
                self.added.insert((*host).to_string(), NodeId(num(id)?));
            }
            ["ACK", "target", release] => self.targets.push((*release).to_string()),
            ["ACK", "key", key] => self.keys.push((*key).to_string()),
            ["TRY", name, n] => {
                self.tries.insert((*name).to_string(), Try { events: num(n)? as usize, session: None });
                return Ok(());
            }
            ["TRY", name, n, sid, v] => {
                let session = Some((SessionId((*sid).to_string()), num(v)?));
                self.tries.insert((*name).to_string(), Try { events: num(n)? as usize, session });
                return Ok(());
            }
            [first, ..] if first.starts_with("ACK") || first.starts_with("TRY") => return Err(bad()),
            _ => return Ok(()),
        }
        self.total += 1;
        Ok(())
    }

    /// Every acknowledged write is in the store (or a later write of the
    /// same row is: versions only grow).
    async fn present(&self, store: &dyn Store) -> Result<(), String> {
        let nodes: HashMap<NodeId, Node> =
            store.nodes().await.map_err(|e| e.to_string())?.into_iter().map(|n| (n.id, n)).collect();
        for (id, v) in &self.nodes {
            let n = nodes.get(id).ok_or_else(|| format!("acknowledged node {id} is missing"))?;
            if n.version < *v {
                return Err(format!("node {id} acknowledged at version {v}, found {}", n.version));
            }
        }
        for (sid, v) in &self.sessions {
            let s = store.session(sid).await.map_err(|e| e.to_string())?;
            let s = s.ok_or_else(|| format!("acknowledged session {sid} is missing"))?;
            if s.version < *v {
                return Err(format!("session {sid} acknowledged at version {v}, found {}", s.version));
            }
        }
        for (host, id) in &self.added {
            let n = store.node_by_hostname(host).await.map_err(|e| e.to_string())?;
            if n.map(|n| n.id) != Some(*id) {
                return Err(format!("acknowledged node {host} (id {id}) is missing"));
            }
        }
        let targets: Vec<String> =
            store.pool_targets().await.map_err(|e| e.to_string())?.into_iter().map(|t| t.pool.release).collect();
        for r in &self.targets {
            if !targets.contains(r) {
                return Err(format!("acknowledged pool target {r} is missing"));
            }
        }
        for k in &self.keys {
            if store.api_key_by_hash(&duffy_core::hash_api_key(k)).await.map_err(|e| e.to_string())?.is_none() {
                return Err(format!("acknowledged API key {k} is missing"));
            }
        }
        Ok(())
    }

    /// Every batch is in the store whole or not at all: a named batch has
    /// all its events or none, a session written by some batch at a
    /// version it has reached was written by a batch that is there whole,
    /// and every claim's session has exactly one allocation event per node.
    async fn whole_batches(&self, store: &dyn Store) -> Result<(), String> {
        let events = store.events(EventQuery::default()).await.map_err(|e| e.to_string())?;
        let mut per_batch: HashMap<&str, usize> = HashMap::new();
        let mut allocated: HashMap<&SessionId, usize> = HashMap::new();
        for e in &events {
            if let Some(d) = e.detail.as_deref().filter(|d| d.starts_with("op-")) {
                *per_batch.entry(d).or_default() += 1;
            }
            if e.cause == CauseKind::Allocated {
                let sid = e.session.as_ref().ok_or_else(|| format!("allocation event {} has no session", e.seq))?;
                *allocated.entry(sid).or_default() += 1;
            }
        }
        for (name, n) in &per_batch {
            let t = self.tries.get(*name).ok_or_else(|| format!("events of batch {name}, which was never tried"))?;
            if *n != t.events {
                return Err(format!("batch {name} is half applied: {n} of its {} events", t.events));
            }
        }
        // Which batches wrote each (session, version) that was tried.
        let mut writers: HashMap<(&SessionId, u64), Vec<(&str, &Try)>> = HashMap::new();
        for (name, t) in &self.tries {
            if let Some((sid, v)) = &t.session {
                writers.entry((sid, *v)).or_default().push((name.as_str(), t));
            }
        }
        for ((sid, v), tries) in &writers {
            let Some(s) = store.session(sid).await.map_err(|e| e.to_string())? else { continue };
            let applied: Vec<&str> = tries
                .iter()
                .filter(|(name, t)| t.events > 0 && per_batch.contains_key(name))
                .map(|(n, _)| *n)
                .collect();
            if applied.len() > 1 {
                return Err(format!("session {sid} version {v} written by several batches: {applied:?}"));
            }
            let all_have_events = tries.iter().all(|(_, t)| t.events > 0);
            if s.version >= *v && applied.is_empty() && all_have_events {
                return Err(format!("session {sid} reached version {v}, but no batch that writes it is there"));
            }
            if s.version < *v && !applied.is_empty() {
                return Err(format!("batch {applied:?} is there, but session {sid} is at version {}", s.version));
            }
        }
        for (sid, n) in &allocated {
            match store.session(sid).await.map_err(|e| e.to_string())? {
                None => return Err(format!("nodes were allocated to session {sid}, which is not there")),
                Some(s) if s.nodes.len() != *n => {
                    return Err(format!("session {sid} lists {} nodes but has {n} allocation events", s.nodes.len()));
                }
                Some(_) => {}
            }
        }
        let live = store.live_sessions().await.map_err(|e| e.to_string())?;
        for s in &live {
            let n = allocated.get(&s.id).copied().unwrap_or(0);
            if n != s.nodes.len() {
                return Err(format!("session {} lists {} nodes but has {n} allocation events", s.id, s.nodes.len()));
            }
        }
        Ok(())
    }
}

/// SQLite's own check of the file (b-trees, indexes, free list).
fn integrity(path: &Path) -> Result<(), String> {
    let c = rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| format!("opening for the integrity check: {e}"))?;
    let rows: Vec<String> = c
        .prepare("PRAGMA integrity_check")
        .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
        .map_err(|e| format!("integrity check: {e}"))?;
    if rows != ["ok"] {
        return Err(format!("integrity check: {rows:?}"));
    }
    Ok(())
}

/// Reopens the store at `path` and checks everything the children did:
/// see the module documentation.
pub fn verify(path: &Path, acks: &Acks) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async {
        let store = SqliteStore::open(path, SqliteOptions::default()).map_err(|e| format!("reopening: {e}"))?;
        acks.present(&store).await?;
        acks.whole_batches(&store).await?;
        check_invariants(&store).await.map_err(|e| format!("invariants: {e}"))?;
        check_history(&store).await.map_err(|e| format!("history: {e}"))?;
        let mut per_node: HashMap<NodeId, u64> = HashMap::new();
        for e in store.events(EventQuery::default()).await.map_err(|e| e.to_string())? {
            *per_node.entry(e.node).or_default() += 1;
        }
        for n in store.nodes().await.map_err(|e| e.to_string())? {
            if per_node.get(&n.id).copied() != Some(n.version) {
                return Err(format!("node {}: {:?} events for version {}", n.id, per_node.get(&n.id), n.version));
            }
        }
        Ok::<(), String>(())
    })?;
    integrity(path)
}

/// A running child and the threads reading its output.
pub struct Child {
    child: std::process::Child,
    out: std::thread::JoinHandle<Vec<String>>,
    err: std::thread::JoinHandle<String>,
    ready: std::sync::mpsc::Receiver<()>,
}

/// How a child ended, and what it printed.
pub struct Ended {
    /// Its exit status.
    pub status: ExitStatus,
    /// Complete stdout lines (a torn last line is dropped).
    pub lines: Vec<String>,
    /// Its stderr.
    pub stderr: String,
}

impl Ended {
    /// The child was killed by SIGKILL (ours, or its own at a chosen
    /// moment) and printed no `CHILD-PANIC`.
    pub fn killed(&self) -> Result<(), String> {
        use std::os::unix::process::ExitStatusExt;
        if let Some(p) = self.lines.iter().find(|l| l.contains("CHILD-PANIC")) {
            return Err(format!("the child failed: {p}\n{}", self.stderr));
        }
        if self.status.signal() != Some(9) {
            return Err(format!("the child was not killed but ended by itself ({}):\n{}", self.status, self.stderr));
        }
        Ok(())
    }
}

/// Reads complete lines from the child; a torn last line is dropped.
fn read_lines(
    mut from: impl Read + Send + 'static,
    ready: std::sync::mpsc::Sender<()>,
) -> std::thread::JoinHandle<Vec<String>> {
    std::thread::spawn(move || {
        let mut r = BufReader::new(&mut from);
        let mut lines = Vec::new();
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) if buf.last() == Some(&b'\n') => {
                    let line = String::from_utf8_lossy(&buf[..buf.len() - 1]).into_owned();
                    // libtest prints "test name ... " with no newline
                    // before the test body runs.
                    if line.ends_with("READY") {
                        let _ = ready.send(());
                    }
                    lines.push(line);
                }
                Ok(_) => break,
            }
        }
        lines
    })
}

impl Child {
    /// Runs test `name` of this test binary as the child, on `path`.
    pub fn spawn(name: &str, path: &Path, round: u64, env: &[(&str, String)]) -> Child {
        let exe = std::env::current_exe().expect("test binary");
        let mut cmd = Command::new(exe);
        cmd.args(["--exact", name, "--nocapture", "--test-threads=1"])
            .env(CHILD_DB, path)
            .env(CHILD_ROUND, round.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn the child");
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let out = read_lines(child.stdout.take().expect("stdout"), ready_tx);
        let mut stderr = child.stderr.take().expect("stderr");
        let err = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        Child { child, out, err, ready }
    }

    /// Waits until the child has opened the store; `false` if it did not
    /// within `timeout` (it may have died).
    pub fn wait_ready(&self, timeout: Duration) -> bool {
        self.ready.recv_timeout(timeout).is_ok()
    }

    /// Whether the child is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILLs the child (if it is still running) and collects it.
    pub fn kill(mut self) -> Ended {
        let _ = self.child.kill();
        self.wait()
    }

    /// Waits for the child to end by itself, at most `timeout`, then kills
    /// it.
    pub fn wait_at_most(mut self, timeout: Duration) -> Ended {
        let deadline = std::time::Instant::now() + timeout;
        while self.running() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.kill()
    }

    fn wait(mut self) -> Ended {
        let status = self.child.wait().expect("wait for the child");
        let lines = self.out.join().expect("stdout reader");
        let stderr = self.err.join().expect("stderr reader");
        Ended { status, lines, stderr }
    }
}

/// Records every line of a round; returns the acknowledgements it added.
pub fn record(acks: &mut Acks, lines: &[String]) -> Result<u64, String> {
    let before = acks.total;
    for l in lines {
        acks.record(l)?;
    }
    Ok(acks.total - before)
}
