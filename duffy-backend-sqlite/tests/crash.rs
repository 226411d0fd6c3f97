//! Crash test with a real process.
//!
//! The parent test re-runs this test binary as a child (test `crash_child`,
//! with `DUFFY_CRASH_CHILD_DB` set). The child runs a write load on the
//! store (claims, deliveries, fails with the fail-cap guard, releases,
//! reinstalls, new nodes, pool targets, API keys) from 8 tasks and prints
//! one `ACK` line per operation after its await returned `Ok`. The parent
//! SIGKILLs it at a random moment, reopens the file, and checks that every
//! acknowledged operation is there and the farm invariants and node
//! histories hold; then the next round runs on the same file.
//!
//! `DUFFY_CRASH_ROUNDS` sets the number of rounds (default 8; the full run
//! uses 50). `DUFFY_CRASH_SEED` replays a run.
//!
//! A SIGKILL tests that nothing is acknowledged before its COMMIT; it
//! cannot test the fsync itself (the OS keeps the killed process's
//! writes), which `synchronous=FULL` provides for power cuts.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use duffy_backend_sqlite::{SqliteOptions, SqliteStore};
use duffy_core::testkit::conformance::{add_ready, check_history, check_invariants, pool7};
use duffy_core::{
    Actor, Arch, Batch, Cause, ClaimRefusal, ClaimRequest, CommitError, EventQuery, Guard, KeyId, NewNode, Node,
    NodeId, NodeState, NodeWrite, PoolKey, PoolTarget, Project, RateLimit, Session, SessionId, SessionState,
    SessionWrite, Store, Timestamp,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const CHILD_DB: &str = "DUFFY_CRASH_CHILD_DB";
const CHILD_ROUND: &str = "DUFFY_CRASH_CHILD_ROUND";
const T0: Timestamp = Timestamp(1_700_000_000_000);
const PROJECT: &str = "crash";
const QUOTA: u32 = 30;
const FAIL_CAP: u32 = 6;
const TASKS: u64 = 8;

// ----- the child -----

/// Prints one acknowledgement line; exits if the parent is gone.
fn ack(line: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    if writeln!(out, "ACK {line}").and_then(|()| out.flush()).is_err() {
        std::process::exit(2);
    }
}

fn ack_batch(batch: &Batch) {
    for w in &batch.nodes {
        ack(format_args!("node {} {}", w.node.id, w.node.version));
    }
    for w in &batch.sessions {
        ack(format_args!("session {} {}", w.session.id, w.session.version));
    }
}

/// Commits and acknowledges; `false` if refused (conflict or guard).
async fn commit_ack(store: &dyn Store, batch: Batch) -> bool {
    match store.commit(batch.clone()).await {
        Ok(()) => {
            ack_batch(&batch);
            true
        }
        Err(CommitError::Conflict(_) | CommitError::GuardFailed { .. }) => false,
        Err(e) => panic!("commit failed: {e}"),
    }
}

fn session_batch(s: &Session, nodes: &[Node], state: SessionState, cause: &dyn Fn(&Node) -> Cause) -> Batch {
    let mut batch = Batch::default();
    for n in nodes {
        if let Ok(w) = NodeWrite::transition(n, cause(n), Actor::Operator, T0) {
            batch.nodes.push(w);
        }
    }
    let mut next = s.clone();
    next.state = state;
    next.version += 1;
    if state == SessionState::Done {
        next.ended_at = Some(T0);
    }
    batch.sessions.push(SessionWrite { expected_version: Some(s.version), session: next });
    batch
}

/// Reinstalls nodes that are Active (InstallStarted) or Provisioning
/// (InstallSucceeded); conflicts with other tasks doing the same are fine.
async fn reinstall(store: &dyn Store, nodes: Vec<Node>) {
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
    if commit_ack(store, batch).await {
        let provisioning: Vec<Node> = next.into_iter().filter(|n| n.state == NodeState::Provisioning).collect();
        if !provisioning.is_empty() {
            Box::pin(reinstall(store, provisioning)).await;
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

async fn child_task(store: Arc<SqliteStore>, round: u64, task: u64, seq: Arc<AtomicU64>) {
    let store: &dyn Store = &*store;
    let mut rng = StdRng::seed_from_u64(round * 1000 + task);
    loop {
        let i = seq.fetch_add(1, Ordering::Relaxed);
        match rng.gen_range(0..100) {
            0..35 => {
                let req = ClaimRequest {
                    session: SessionId(format!("c-{round}-{task}-{i}")),
                    project: PROJECT.into(),
                    key_id: KeyId(task),
                    pool: pool7(),
                    count: rng.gen_range(1..=3),
                    quota: Some(QUOTA),
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
                let ending = batch.sessions[0].session.state == SessionState::Done;
                let released: Vec<Node> = batch.nodes.iter().map(|w| w.node.clone()).collect();
                if commit_ack(store, batch).await && ending {
                    reinstall(store, released).await;
                }
            }
            75..88 => {
                // Whatever a crash left half-way: Active or Provisioning.
                let stranded: Vec<Node> = store
                    .nodes()
                    .await
                    .expect("nodes")
                    .into_iter()
                    .filter(|n| matches!(n.state, NodeState::Active | NodeState::Provisioning))
                    .take(4)
                    .collect();
                reinstall(store, stranded).await;
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

/// The child's body: runs until killed (or 60 s, should the parent vanish).
#[test]
fn crash_child() {
    let Ok(path) = std::env::var(CHILD_DB) else { return };
    let round: u64 = std::env::var(CHILD_ROUND).ok().and_then(|r| r.parse().ok()).unwrap_or(0);
    std::thread::spawn(|| {
        std::thread::sleep(Duration::from_secs(60));
        std::process::exit(3);
    });
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async {
        let store = Arc::new(SqliteStore::open(&path, SqliteOptions::default()).expect("child opens the store"));
        println!("READY");
        let seq = Arc::new(AtomicU64::new(0));
        let tasks: Vec<_> =
            (1..=TASKS).map(|task| tokio::spawn(child_task(store.clone(), round, task, seq.clone()))).collect();
        for t in tasks {
            t.await.expect("child task");
        }
    });
}

// ----- the parent -----

#[derive(Default)]
struct Acks {
    nodes: HashMap<NodeId, u64>,
    sessions: HashMap<SessionId, u64>,
    added: HashMap<String, NodeId>,
    targets: Vec<String>,
    keys: Vec<String>,
    total: u64,
}

impl Acks {
    fn record(&mut self, line: &str) {
        let parts: Vec<&str> = line.split(' ').collect();
        let num = |s: &str| s.parse::<u64>().unwrap_or_else(|_| panic!("bad ack line {line:?}"));
        match parts.as_slice() {
            ["ACK", "node", id, v] => {
                let e = self.nodes.entry(NodeId(num(id))).or_default();
                *e = (*e).max(num(v));
            }
            ["ACK", "session", sid, v] => {
                let e = self.sessions.entry(SessionId((*sid).to_string())).or_default();
                *e = (*e).max(num(v));
            }
            ["ACK", "add", host, id] => {
                self.added.insert((*host).to_string(), NodeId(num(id)));
            }
            ["ACK", "target", release] => self.targets.push((*release).to_string()),
            ["ACK", "key", key] => self.keys.push((*key).to_string()),
            _ => panic!("bad ack line {line:?}"),
        }
        self.total += 1;
    }

    /// Every acknowledged write is in the store (or a later write of the
    /// same row is: versions only grow).
    async fn verify(&self, store: &dyn Store) {
        let nodes: HashMap<NodeId, Node> = store.nodes().await.expect("nodes").into_iter().map(|n| (n.id, n)).collect();
        for (id, v) in &self.nodes {
            let n = nodes.get(id).unwrap_or_else(|| panic!("acknowledged node {id} is missing"));
            assert!(n.version >= *v, "node {id} acknowledged at version {v}, found {}", n.version);
        }
        for (sid, v) in &self.sessions {
            let s = store.session(sid).await.expect("read").unwrap_or_else(|| panic!("acknowledged {sid} is missing"));
            assert!(s.version >= *v, "session {sid} acknowledged at version {v}, found {}", s.version);
        }
        for (host, id) in &self.added {
            let n = store.node_by_hostname(host).await.expect("read");
            assert_eq!(n.map(|n| n.id), Some(*id), "acknowledged node {host} is missing");
        }
        let targets: Vec<String> =
            store.pool_targets().await.expect("read").into_iter().map(|t| t.pool.release).collect();
        for r in &self.targets {
            assert!(targets.contains(r), "acknowledged pool target {r} is missing");
        }
        for k in &self.keys {
            let found = store.api_key_by_hash(&duffy_core::hash_api_key(k)).await.expect("read");
            assert!(found.is_some(), "acknowledged API key {k} is missing");
        }
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
                    // libtest prints "test crash_child ... " with no newline
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

fn check_round(path: &Path, acks: &Acks) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async {
        let store = SqliteStore::open(path, SqliteOptions::default()).expect("reopen after the crash");
        acks.verify(&store).await;
        check_invariants(&store).await.expect("invariants after the crash");
        check_history(&store).await.expect("history after the crash");
        let mut per_node: HashMap<NodeId, u64> = HashMap::new();
        for e in store.events(EventQuery::default()).await.expect("events") {
            *per_node.entry(e.node).or_default() += 1;
        }
        for n in store.nodes().await.expect("nodes") {
            assert_eq!(per_node.get(&n.id).copied(), Some(n.version), "node {}: one event per version", n.id);
        }
    });
}

#[test]
fn acknowledged_operations_survive_sigkill() {
    let rounds: u64 = std::env::var("DUFFY_CRASH_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(8);
    let seed: u64 = std::env::var("DUFFY_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
    });
    eprintln!("crash test: {rounds} rounds, DUFFY_CRASH_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("duffy.db");
    {
        let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        rt.block_on(async {
            let store = SqliteStore::open(&path, SqliteOptions::default()).expect("open");
            add_ready(&store, "n", 40, &pool7()).await;
            store
                .upsert_project(Project { name: PROJECT.into(), quota: Some(QUOTA), ssh_keys: vec![] })
                .await
                .expect("project");
        });
    }
    let exe = std::env::current_exe().expect("test binary");
    let mut acks = Acks::default();
    let started = Instant::now();
    for round in 0..rounds {
        let mut child = Command::new(&exe)
            .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
            .env(CHILD_DB, &path)
            .env(CHILD_ROUND, round.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the child");
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let out = read_lines(child.stdout.take().expect("stdout"), ready_tx);
        let mut stderr = child.stderr.take().expect("stderr");
        let err = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        // Mostly mid-load; one round in eight as early as the open itself.
        if rng.gen_ratio(1, 8) {
            std::thread::sleep(Duration::from_millis(rng.gen_range(0..30)));
        } else {
            let ready = ready_rx.recv_timeout(Duration::from_secs(30));
            if ready.is_ok() {
                std::thread::sleep(Duration::from_millis(rng.gen_range(5..400)));
            }
        }
        let exited = child.try_wait().expect("try_wait");
        child.kill().expect("SIGKILL the child");
        let status = child.wait().expect("wait");
        let lines = out.join().expect("stdout reader");
        let stderr = err.join().expect("stderr reader");
        if let Some(status) = exited {
            panic!("round {round}: the child exited by itself ({status}):\n{stderr}");
        }
        assert!(!status.success(), "round {round}: killed, yet {status}");
        let before = acks.total;
        for l in lines.iter().filter(|l| l.starts_with("ACK ")) {
            acks.record(l);
        }
        eprintln!("round {round}: {} operations acknowledged before SIGKILL", acks.total - before);
        check_round(&path, &acks);
    }
    eprintln!("crash test: {} acknowledged operations checked in {:.1?}", acks.total, started.elapsed());
    assert!(acks.total >= rounds * 5, "the child did too little work to mean anything: {}", acks.total);
}
