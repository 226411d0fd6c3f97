//! Engine benches: the planner over a large farm, and claim+release in the
//! in-memory store (the engine's own cost, without durability).

#![allow(missing_docs)] // criterion_group! generates undocumented functions

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use duffy_core::mem::MemStore;
use duffy_core::testkit::conformance::{add_ready, claim_req, release};
use duffy_core::{Arch, NewNode, NodeId, NodeState, PlanInput, Policy, PoolKey, PoolTarget, Store, Timestamp, plan};

fn farm(n: u64) -> Vec<duffy_core::Node> {
    let pools = PoolTarget::seed_defaults();
    (1..=n)
        .map(|i| {
            let mut node = NewNode::new(format!("n{i}.example"), Arch::X86_64).into_node(NodeId(i), Timestamp(0));
            node.used_count = i % 17;
            // A realistic mix: most idle or Ready, some deployed.
            match i % 10 {
                0..=3 => {
                    node.state = NodeState::Ready;
                    node.image = Some(pools[(i % 5) as usize].pool.clone());
                    node.installed_at = Some(Timestamp(i as i64));
                }
                4 | 5 => node.state = NodeState::Deployed,
                _ => {}
            }
            node
        })
        .collect()
}

fn planner(c: &mut Criterion) {
    let mut g = c.benchmark_group("planner");
    let policy = Policy { max_concurrent_installs: 64, ..Policy::default() };
    let targets: Vec<PoolTarget> =
        PoolTarget::seed_defaults().into_iter().map(|t| PoolTarget { standby: t.standby * 1000, ..t }).collect();
    for n in [1_000u64, 100_000] {
        let nodes = farm(n);
        // What the store's `ready_counts` would answer.
        let mut ready: BTreeMap<PoolKey, u32> = BTreeMap::new();
        for n in &nodes {
            if let (NodeState::Ready, Some(p)) = (n.state, &n.image) {
                *ready.entry(p.clone()).or_default() += 1;
            }
        }
        g.bench_with_input(BenchmarkId::from_parameter(n), &nodes, |b, nodes| {
            b.iter(|| {
                plan(PlanInput {
                    ready: &ready,
                    nodes,
                    targets: &targets,
                    policy: &policy,
                    now: Timestamp(86_400_000 / 2),
                    paused: false,
                    busy_nodes: &HashSet::new(),
                    busy_bmcs: &HashSet::new(),
                    installs_in_flight: 0,
                })
            })
        });
    }
    g.finish();
}

fn mem_claim_release(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    let mut g = c.benchmark_group("memstore_claim_release");
    g.measurement_time(Duration::from_secs(3));
    for n in [1_000usize, 100_000] {
        let store: Arc<dyn Store> = Arc::new(MemStore::new());
        rt.block_on(add_ready(&*store, "n", n, &PoolKey::new("7", Arch::X86_64, None)));
        let mut i = 0u64;
        g.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter(|| {
                i += 1;
                rt.block_on(async {
                    let c =
                        store.claim(claim_req(&format!("s{i}"), 1, "p", 1, Timestamp(i as i64))).await.expect("store");
                    let c = c.expect("a Ready node");
                    release(&*store, &c.session.id, Timestamp(i as i64)).await.expect("release");
                    // Put the node back so the pool never drains.
                    let n = store.node(c.nodes[0].id).await.expect("read").expect("exists");
                    for cause in [
                        duffy_core::Cause::InstallStarted {
                            image: PoolKey::new("7", Arch::X86_64, None),
                            why: "bench".into(),
                        },
                        duffy_core::Cause::InstallSucceeded { host_key: None },
                    ] {
                        let cur = store.node(n.id).await.expect("read").expect("exists");
                        let w =
                            duffy_core::NodeWrite::transition(&cur, cause, duffy_core::Actor::Reconciler, Timestamp(0))
                                .expect("legal");
                        store.commit(duffy_core::Batch { nodes: vec![w], ..Default::default() }).await.expect("commit");
                    }
                })
            })
        });
    }
    g.finish();
}

criterion_group!(benches, planner, mem_claim_release);
criterion_main!(benches);
