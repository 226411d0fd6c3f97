//! Claim+release cycles against the SQLite store.
//!
//! One cycle: claim 1 Ready node (a new session), then release it (node
//! AllocationAborted → Active, session → Done): two write operations, two
//! durable commits as far as the caller knows. Released nodes are
//! reinstalled to Ready outside the timed part, in big batches.
//!
//! Configurations: farm of 1k and 100k Ready nodes (each file built once,
//! in three transactions, then copied per configuration), 1 task and 32
//! concurrent tasks, `synchronous=FULL` (the default) and `NORMAL` (no
//! fsync per commit: the reference for what durability costs).
//!
//! ```text
//! cargo bench -p duffy-backend-sqlite --bench claim_release
//! ```
//!
//! Besides criterion's own report it prints a summary with each
//! configuration's mean rate over everything it measured, its average
//! batch size, and the ratios the targets are stated in.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use duffy_backend_sqlite::{SqliteOptions, SqliteStore, Synchronous};
use duffy_core::{
    Actor, Arch, Batch, Cause, ClaimRequest, KeyId, NewNode, Node, NodeWrite, PoolKey, SessionId, SessionState,
    SessionWrite, Store, Timestamp,
};

const T0: Timestamp = Timestamp(1_700_000_000_000);

fn pool() -> PoolKey {
    PoolKey::new("7", Arch::X86_64, None)
}

/// Builds a farm of `n` Ready nodes: one `add_nodes` and two batches.
fn build_template(path: &Path, n: usize, rt: &tokio::runtime::Runtime) {
    let started = Instant::now();
    let options = SqliteOptions { synchronous: Synchronous::Normal, ..SqliteOptions::default() };
    let store = SqliteStore::open(path, options).expect("open template");
    rt.block_on(async {
        let news = (0..n).map(|i| NewNode::new(format!("node{i:06}.farm.example"), Arch::X86_64)).collect();
        let nodes = store.add_nodes(news, Actor::Operator, T0).await.expect("add nodes");
        let mut batch = Batch::default();
        for node in &nodes {
            let cause = Cause::InstallStarted { image: pool(), why: "bench".into() };
            batch.nodes.push(NodeWrite::transition(node, cause, Actor::Reconciler, T0).expect("legal"));
        }
        let provisioning: Vec<Node> = batch.nodes.iter().map(|w| w.node.clone()).collect();
        store.commit(batch).await.expect("install started");
        let mut batch = Batch::default();
        for node in &provisioning {
            batch.nodes.push(
                NodeWrite::transition(node, Cause::InstallSucceeded { host_key: None }, Actor::Reconciler, T0)
                    .expect("legal"),
            );
        }
        store.commit(batch).await.expect("install succeeded");
    });
    drop(store);
    eprintln!("built a {n}-node farm in {:.1?}", started.elapsed());
}

/// One claim+release cycle; returns the released (Active) node.
async fn cycle(store: &dyn Store, session: String, key: u64) -> Node {
    let req = ClaimRequest {
        session: SessionId(session),
        project: "bench".into(),
        key_id: KeyId(key),
        pool: pool(),
        count: 1,
        check_target: false,
        default_quota: None,
        rate_limit: None,
        actor: Actor::Key(KeyId(key)),
        now: T0,
        deliver: None,
    };
    let claimed = store.claim(req).await.expect("store ok").expect("claimed");
    let node = &claimed.nodes[0];
    let w =
        NodeWrite::transition(node, Cause::AllocationAborted { reason: "bench".into() }, Actor::Key(KeyId(key)), T0)
            .expect("legal");
    let released = w.node.clone();
    let mut done = claimed.session.clone();
    done.state = SessionState::Done;
    done.ended_at = Some(T0);
    done.version += 1;
    let batch = Batch {
        nodes: vec![w],
        sessions: vec![SessionWrite { expected_version: Some(claimed.session.version), session: done }],
        guards: Vec::new(),
    };
    store.commit(batch).await.expect("release");
    released
}

/// Active nodes back to Ready, in two batches (not timed).
async fn refill(store: &dyn Store, nodes: Vec<Node>) {
    let mut batch = Batch::default();
    for n in &nodes {
        let cause = Cause::InstallStarted { image: pool(), why: "bench".into() };
        batch.nodes.push(NodeWrite::transition(n, cause, Actor::Reconciler, T0).expect("legal"));
    }
    let provisioning: Vec<Node> = batch.nodes.iter().map(|w| w.node.clone()).collect();
    store.commit(batch).await.expect("refill started");
    let mut batch = Batch::default();
    for n in &provisioning {
        batch.nodes.push(
            NodeWrite::transition(n, Cause::InstallSucceeded { host_key: None }, Actor::Reconciler, T0).expect("legal"),
        );
    }
    store.commit(batch).await.expect("refill succeeded");
}

/// What one configuration measured, over warm-up and samples.
#[derive(Default, Clone, Copy)]
struct Tally {
    cycles: u64,
    time: Duration,
    ops: u64,
    transactions: u64,
    syncs: u64,
}

type Tallies = Arc<Mutex<BTreeMap<String, Tally>>>;

struct Bench {
    store: Arc<SqliteStore>,
    next_session: u64,
}

/// Runs `iters` cycles with `tasks` concurrent tasks; only the cycles are
/// timed.
fn run(rt: &tokio::runtime::Runtime, bench: &mut Bench, iters: u64, tasks: u64, chunk: u64) -> (Duration, Tally) {
    let before = bench.store.writer_stats();
    let mut timed = Duration::ZERO;
    let mut left = iters;
    while left > 0 {
        let n = left.min(chunk);
        left -= n;
        let first = bench.next_session;
        bench.next_session += n;
        let store = bench.store.clone();
        let (elapsed, released) = rt.block_on(async move {
            let started = Instant::now();
            let handles: Vec<_> = (0..tasks)
                .map(|t| {
                    let store = store.clone();
                    let mine: Vec<u64> = (first..first + n).filter(|i| i % tasks == t).collect();
                    tokio::spawn(async move {
                        let mut out = Vec::with_capacity(mine.len());
                        for i in mine {
                            out.push(cycle(&*store, format!("s{i}"), t + 1).await);
                        }
                        out
                    })
                })
                .collect();
            let mut released = Vec::with_capacity(n as usize);
            for h in handles {
                released.extend(h.await.expect("task"));
            }
            let elapsed = started.elapsed();
            (elapsed, released)
        });
        timed += elapsed;
        let store = bench.store.clone();
        rt.block_on(async move { refill(&*store, released).await });
    }
    let after = bench.store.writer_stats();
    // Subtract the refill's two operations, transactions and fsyncs (each
    // runs alone) per chunk.
    let chunks = iters.div_ceil(chunk);
    let syncs = if after.syncs > before.syncs { after.syncs - before.syncs - 2 * chunks } else { 0 };
    let tally = Tally {
        cycles: iters,
        time: timed,
        ops: after.operations - before.operations - 2 * chunks,
        transactions: after.transactions - before.transactions - 2 * chunks,
        syncs,
    };
    (timed, tally)
}

fn main() {
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(800))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let base: PathBuf = std::env::var_os("DUFFY_BENCH_DIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::tempdir_in(base).expect("bench dir");
    eprintln!("bench files in {}", dir.path().display());
    let tallies: Tallies = Arc::default();
    for (label, n) in [("1k", 1_000usize), ("100k", 100_000)] {
        let template = dir.path().join(format!("template-{label}.db"));
        build_template(&template, n, &rt);
        // Timed cycles between two (untimed) refills: as many as the pool
        // holds, less room for the claims in flight, so that the ragged end
        // of each chunk (tasks finishing at different times) weighs little.
        let chunk = (n as u64 - 64).min(20_000);
        for (sync_label, sync) in [("full", Synchronous::Full), ("normal", Synchronous::Normal)] {
            let path = dir.path().join(format!("{label}-{sync_label}.db"));
            std::fs::copy(&template, &path).expect("copy template");
            let options = SqliteOptions { synchronous: sync, ..SqliteOptions::default() };
            let store = Arc::new(SqliteStore::open(&path, options).expect("open"));
            let mut bench = Bench { store, next_session: 0 };
            let mut group = c.benchmark_group(format!("claim_release/{sync_label}/{label}"));
            group.throughput(Throughput::Elements(1));
            for tasks in [1u64, 32] {
                let key = format!("{sync_label}/{label}/{tasks}");
                let tallies = tallies.clone();
                group.bench_function(format!("{tasks}task{}", if tasks == 1 { "" } else { "s" }), |b| {
                    b.iter_custom(|iters| {
                        let (time, x) = run(&rt, &mut bench, iters, tasks, chunk);
                        let mut t = tallies.lock().expect("lock");
                        let e = t.entry(key.clone()).or_default();
                        e.cycles += x.cycles;
                        e.time += x.time;
                        e.ops += x.ops;
                        e.transactions += x.transactions;
                        e.syncs += x.syncs;
                        time
                    })
                });
            }
            group.finish();
            eprintln!("{label} {sync_label}: {:?}", bench.store.writer_stats());
        }
        std::fs::remove_file(&template).ok();
    }
    c.final_summary();
    summary(&tallies.lock().expect("lock"));
}

fn summary(t: &BTreeMap<String, Tally>) {
    let rate = |k: &str| t.get(k).map(|x| x.cycles as f64 / x.time.as_secs_f64()).unwrap_or(f64::NAN);
    println!();
    println!("claim+release cycles per second (mean over all measured iterations; 2 write ops per cycle)");
    println!("{:<22} {:>10} {:>10} {:>12} {:>10}", "config", "cycles/s", "us/cycle", "ops/commit", "ops/fsync");
    for (k, x) in t {
        let per_sync = if x.syncs == 0 { "-".to_string() } else { format!("{:.1}", x.ops as f64 / x.syncs as f64) };
        println!(
            "{:<22} {:>10.0} {:>10.1} {:>12.1} {:>10}",
            k,
            rate(k),
            x.time.as_secs_f64() * 1e6 / x.cycles as f64,
            x.ops as f64 / x.transactions.max(1) as f64,
            per_sync
        );
    }
    println!();
    for n in ["1k", "100k"] {
        let full1 = rate(&format!("full/{n}/1"));
        let full32 = rate(&format!("full/{n}/32"));
        let normal32 = rate(&format!("normal/{n}/32"));
        println!(
            "{n}: FULL 32 tasks / FULL 1 task = {:.1}x (target >= 5x); FULL 32 / NORMAL 32 = {:.0}% (target >= 80%)",
            full32 / full1,
            100.0 * full32 / normal32
        );
    }
    for s in ["full", "normal"] {
        for tasks in [1, 32] {
            let small = rate(&format!("{s}/1k/{tasks}"));
            let big = rate(&format!("{s}/100k/{tasks}"));
            println!(
                "{s}, {tasks} task(s): 100k-node cycle cost / 1k-node cycle cost = {:.2}x (target <= 1.5x)",
                small / big
            );
        }
    }
}
