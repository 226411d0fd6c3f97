//! A custom scheduler embedding the Duffy engine.
//!
//! Instead of letting every job hammer `/Node/get` until nodes appear (what
//! `cico` does), this scheduler keeps its own priority queue: it looks at
//! the warm pools, hands nodes to the most urgent waiting job first, and
//! releases them when the job ends. The farm is the simulated hardware
//! (`duffy_core::sim`) in the test kit's `Harness`, on a manual clock, so
//! the whole afternoon below runs in a blink and prints the same timeline
//! every time. `production.rs` wires the same engine as a real deployment
//! does (SQLite, system clock, tokio).
//!
//! Run with `cargo run --example embed`.

use std::cell::RefCell;
use std::collections::BinaryHeap;
use std::rc::Rc;
use std::time::Duration;

use duffy_core::sim::{SimConfig, SimFarm};
use duffy_core::testkit::Harness;
use duffy_core::{Arch, Clock, EngineError, NodeRequest, Policy, PoolKey, PoolTarget};

/// A job waiting for machines; higher priority first, then first come.
#[derive(Debug, PartialEq, Eq)]
struct Job {
    priority: u8,
    seq: u32,
    name: String,
    release: &'static str,
    nodes: u32,
    runs_for: Duration,
}

impl Ord for Job {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.priority.cmp(&other.priority).then(other.seq.cmp(&self.seq))
    }
}

impl PartialOrd for Job {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

fn main() {
    // A small farm: 12 machines, two warm pools.
    let targets = vec![
        PoolTarget { pool: PoolKey::new("9", Arch::X86_64, None), standby: 4 },
        PoolTarget { pool: PoolKey::new("10", Arch::X86_64, None), standby: 2 },
    ];
    let policy =
        Policy { rate_limit: None, max_concurrent_installs: 4, tick: Duration::from_secs(15), ..Policy::default() };
    let sim = SimConfig {
        seed: 42,
        install_min: Duration::from_secs(240),
        install_max: Duration::from_secs(420),
        install_failure_rate: 0.1,
        ..SimConfig::default()
    };
    let mut h = Harness::new(policy, sim, SimFarm::machines(12), &targets);
    let key = h.key("my-scheduler", Some(8), false);
    let engine = h.engine.clone();
    let who = h.block_on({
        let engine = engine.clone();
        async move { engine.authenticate(&key).await.expect("the key was just made") }
    });

    let queue = Rc::new(RefCell::new(BinaryHeap::new()));
    let jobs = [
        (1, "nightly-full", "9", 3, 50),
        (5, "pr-1234", "9", 1, 20),
        (5, "pr-1235", "10", 1, 15),
        (9, "release-blocker", "9", 2, 30),
        (1, "docs", "10", 1, 5),
        (5, "pr-1236", "9", 2, 25),
    ];
    for (seq, (priority, name, release, nodes, minutes)) in jobs.into_iter().enumerate() {
        queue.borrow_mut().push(Job {
            priority,
            seq: seq as u32,
            name: name.into(),
            release,
            nodes,
            runs_for: Duration::from_secs(minutes * 60),
        });
    }
    println!("queued {} jobs; farm warming up", queue.borrow().len());

    // The scheduler: every 30 s, dispatch the most urgent jobs that fit.
    let spawner = h.spawner();
    let clock = h.clock.clone();
    let start = clock.now();
    let q = queue.clone();
    h.spawn(async move {
        use futures::task::LocalSpawnExt;
        while !q.borrow().is_empty() {
            let ready = engine.store().ready_counts().await.expect("read");
            let mut deferred = Vec::new();
            loop {
                let Some(job) = q.borrow_mut().pop() else { break };
                let pool = PoolKey::new(job.release, Arch::X86_64, None);
                let have = ready.iter().find(|(p, _)| *p == pool).map(|(_, n)| *n).unwrap_or(0);
                if have < job.nodes {
                    deferred.push(job);
                    continue;
                }
                let req =
                    NodeRequest { release: Some(job.release.into()), count: Some(job.nodes), ..NodeRequest::default() };
                match engine.get_nodes(&who, &req).await {
                    Ok(alloc) => {
                        let t = clock.now().since(start).as_secs();
                        println!(
                            "[{:>3}m{:02}s] {:<16} prio {} got {:?} (session {})",
                            t / 60,
                            t % 60,
                            job.name,
                            job.priority,
                            alloc.hosts,
                            &alloc.session.0[..8]
                        );
                        let (engine, clock, who) = (engine.clone(), clock.clone(), who.clone());
                        spawner
                            .spawn_local(async move {
                                duffy_core::time::sleep(&clock, job.runs_for).await;
                                engine.done(&who, &alloc.session.0).await.expect("release");
                                let t = clock.now().since(start).as_secs();
                                println!(
                                    "[{:>3}m{:02}s] {:<16} done, nodes go back to be reinstalled",
                                    t / 60,
                                    t % 60,
                                    job.name
                                );
                            })
                            .expect("spawn");
                    }
                    Err(EngineError::InsufficientNodes { .. } | EngineError::QuotaExceeded { .. }) => {
                        deferred.push(job)
                    }
                    Err(e) => {
                        println!("{}: {e}; requeued", job.name);
                        deferred.push(job);
                    }
                }
            }
            q.borrow_mut().extend(deferred);
            duffy_core::time::sleep(&clock, Duration::from_secs(30)).await;
        }
    });
    h.advance(Duration::from_secs(3 * 3600));

    let store = h.dyn_store();
    let nodes = h.block_on(async move { store.nodes().await.expect("read") });
    let mut by_state = std::collections::BTreeMap::new();
    for n in &nodes {
        *by_state.entry(n.state.as_str()).or_insert(0) += 1;
    }
    println!(
        "after 3 simulated hours: {by_state:?}; {} installs ({} failed attempts)",
        h.farm.installs(),
        h.farm.install_failures()
    );
    assert!(queue.borrow().is_empty(), "every job ran");
}
