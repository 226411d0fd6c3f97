//! Property test of the wait queue's fair share: random arrivals of
//! requests from four projects for two pools, nodes turning Ready,
//! sessions released, requests cancelled, and the queue served between
//! them. After every serve the test checks:
//! - no quota exceeded: a project never holds more than its quota;
//! - order within a project kept: a project's requests are served in the
//!   order they arrived;
//! - no project starves: while a project's oldest request is within its
//!   quota and waiting, every other project is served at most once from
//!   the same pool before it (round robin, and a short pool held for the
//!   project whose turn it is);
//! - nothing served that is not Ready;
//!
//! and at the end, with every session released and the pools full, the
//! queue drains. The last tests run the same property over deliberately
//! broken schedulers (first come first served across projects, which lets
//! a busy project starve the others; quotas ignored; newest first within
//! a project) and check that it fails for each.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::collections::{BTreeMap, HashMap};

use duffy_core::{Arch, KeyId, PoolKey, QueuedRequest, RequestId, Timestamp, WaitQueue};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};

const PROJECTS: [&str; 4] = ["a", "b", "c", "d"];
/// Every count asked for fits every quota and every pool: a request that
/// waits forever is the scheduler's fault.
const QUOTAS: [Option<u32>; 4] = [None, Some(3), Some(4), None];
const CAPACITY: u32 = 6;

fn pools() -> [PoolKey; 2] {
    [PoolKey::new("9", Arch::X86_64, None), PoolKey::new("8", Arch::X86_64, None)]
}

#[derive(Debug, Clone)]
enum Op {
    Enqueue { project: usize, pool: usize, count: u32 },
    Ready { pool: usize, n: u32 },
    Release { pick: usize },
    Cancel { pick: usize },
    Serve,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..4usize, 0..2usize, 1..=3u32).prop_map(|(project, pool, count)| Op::Enqueue { project, pool, count }),
        3 => (0..2usize, 0..=3u32).prop_map(|(pool, n)| Op::Ready { pool, n }),
        2 => any::<usize>().prop_map(|pick| Op::Release { pick }),
        1 => any::<usize>().prop_map(|pick| Op::Cancel { pick }),
        4 => Just(Op::Serve),
    ]
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(op(), 1..120)
}

/// A scheduler: takes out of the queue what to serve now, given the Ready
/// nodes per pool and each project's room under its quota.
type Select = fn(&mut WaitQueue, &BTreeMap<PoolKey, u32>, &dyn Fn(&str) -> Option<u32>) -> Vec<QueuedRequest>;

fn real(q: &mut WaitQueue, ready: &BTreeMap<PoolKey, u32>, room: &dyn Fn(&str) -> Option<u32>) -> Vec<QueuedRequest> {
    q.select(ready, room)
}

/// Broken: first come, first served over the whole queue (each
/// project's requests still in order: a project whose oldest request
/// does not fit waits). A project with many requests starves the others.
fn global_fifo(
    q: &mut WaitQueue,
    ready: &BTreeMap<PoolKey, u32>,
    room: &dyn Fn(&str) -> Option<u32>,
) -> Vec<QueuedRequest> {
    let mut ready = ready.clone();
    let mut rooms: HashMap<String, Option<u32>> = HashMap::new();
    let mut waiting: Vec<String> = Vec::new();
    let mut out = Vec::new();
    let all: Vec<QueuedRequest> = q.arrivals().into_iter().cloned().collect();
    for r in all {
        if waiting.contains(&r.project) {
            continue;
        }
        let left = *rooms.entry(r.project.clone()).or_insert_with(|| room(&r.project));
        let have = ready.get(&r.pool).copied().unwrap_or(0);
        if left.is_some_and(|l| l < r.count) || have < r.count {
            waiting.push(r.project.clone());
            continue;
        }
        ready.insert(r.pool.clone(), have - r.count);
        rooms.insert(r.project.clone(), left.map(|l| l - r.count));
        out.push(q.remove(&r.id).unwrap());
    }
    out
}

/// Broken: quotas ignored.
fn no_quota(
    q: &mut WaitQueue,
    ready: &BTreeMap<PoolKey, u32>,
    _room: &dyn Fn(&str) -> Option<u32>,
) -> Vec<QueuedRequest> {
    q.select(ready, |_| None)
}

/// Broken: within a project, the newest request first.
fn newest_first(
    q: &mut WaitQueue,
    ready: &BTreeMap<PoolKey, u32>,
    room: &dyn Fn(&str) -> Option<u32>,
) -> Vec<QueuedRequest> {
    let mut ready = ready.clone();
    let mut out = Vec::new();
    let mut all: Vec<QueuedRequest> = q.arrivals().into_iter().cloned().collect();
    all.reverse();
    let mut rooms: HashMap<String, Option<u32>> = HashMap::new();
    for r in all {
        let left = *rooms.entry(r.project.clone()).or_insert_with(|| room(&r.project));
        let have = ready.get(&r.pool).copied().unwrap_or(0);
        if left.is_some_and(|l| l < r.count) || have < r.count {
            continue;
        }
        ready.insert(r.pool.clone(), have - r.count);
        rooms.insert(r.project.clone(), left.map(|l| l - r.count));
        out.push(q.remove(&r.id).unwrap());
    }
    out
}

/// The farm around the queue: Ready nodes per pool and the sessions held.
struct World {
    q: WaitQueue,
    ready: BTreeMap<PoolKey, u32>,
    /// (project, pool, count) of every session held.
    held: Vec<(usize, PoolKey, u32)>,
    next_id: u64,
    /// The last served `seq` per project.
    last_served: [Option<u64>; 4],
    /// For each project's oldest waiting request (while within quota):
    /// how often each other project was served from its pool since.
    overtaken: HashMap<RequestId, [u32; 4]>,
}

impl World {
    fn new() -> Self {
        let ready = pools().into_iter().map(|p| (p, 0)).collect();
        World {
            q: WaitQueue::new(),
            ready,
            held: Vec::new(),
            next_id: 0,
            last_served: [None; 4],
            overtaken: HashMap::new(),
        }
    }

    fn held_by(&self, project: usize) -> u32 {
        self.held.iter().filter(|(p, _, _)| *p == project).map(|(_, _, c)| c).sum()
    }

    fn in_use(&self, pool: &PoolKey) -> u32 {
        self.held.iter().filter(|(_, p, _)| p == pool).map(|(_, _, c)| c).sum()
    }

    fn room(&self, project: usize) -> Option<u32> {
        QUOTAS[project].map(|q| q.saturating_sub(self.held_by(project)))
    }

    fn index(project: &str) -> usize {
        PROJECTS.iter().position(|p| *p == project).unwrap()
    }

    /// Each project's oldest request waiting in `q`, if within its quota.
    fn eligible_heads(&self, q: &WaitQueue) -> Vec<QueuedRequest> {
        let mut heads: BTreeMap<usize, QueuedRequest> = BTreeMap::new();
        for r in q.arrivals() {
            heads.entry(Self::index(&r.project)).or_insert_with(|| r.clone());
        }
        heads.into_iter().filter(|(p, r)| self.room(*p).is_none_or(|room| room >= r.count)).map(|(_, r)| r).collect()
    }

    fn apply(&mut self, op: &Op, select: Select) -> Result<(), String> {
        match *op {
            Op::Enqueue { project, pool, count } => {
                self.next_id += 1;
                let r = QueuedRequest {
                    id: RequestId(format!("r{}", self.next_id)),
                    project: PROJECTS[project].into(),
                    key_id: KeyId(project as u64 + 1),
                    pool: pools()[pool].clone(),
                    count,
                    lifetime: None,
                    enqueued_at: Timestamp(0),
                    last_seen: Timestamp(0),
                    seq: 0,
                };
                self.q.push(r, 10_000, 10_000).map_err(|e| e.to_string())?;
            }
            Op::Ready { pool, n } => {
                let p = &pools()[pool];
                let free = CAPACITY.saturating_sub(self.in_use(p) + self.ready[p]);
                *self.ready.get_mut(p).unwrap() += n.min(free);
            }
            Op::Release { pick } => {
                if !self.held.is_empty() {
                    self.held.remove(pick % self.held.len());
                }
            }
            Op::Cancel { pick } => {
                let ids: Vec<RequestId> = self.q.arrivals().into_iter().map(|r| r.id.clone()).collect();
                if !ids.is_empty() {
                    self.q.remove(&ids[pick % ids.len()]);
                }
            }
            Op::Serve => self.serve(select)?,
        }
        Ok(())
    }

    fn serve(&mut self, select: Select) -> Result<(), String> {
        let rooms: [Option<u32>; 4] = std::array::from_fn(|p| self.room(p));
        // The queue as each request of this serve found it.
        let mut before = self.q.clone();
        let served = select(&mut self.q, &self.ready, &|project: &str| rooms[Self::index(project)]);
        for r in served {
            // The heads waiting within quota just before this one is served.
            let heads = self.eligible_heads(&before);
            let p = Self::index(&r.project);
            if let Some(room) = self.room(p) {
                if r.count > room {
                    return Err(format!(
                        "quota exceeded: project {} holds {}, served {r:?}",
                        r.project,
                        self.held_by(p)
                    ));
                }
            }
            if self.last_served[p].is_some_and(|s| s > r.seq) {
                return Err(format!(
                    "order within project {} broken: {r:?} after seq {:?}",
                    r.project, self.last_served[p]
                ));
            }
            if before.arrivals().iter().any(|w| w.project == r.project && w.seq < r.seq) {
                return Err(format!("order within project {}: {r:?} served before an older request", r.project));
            }
            let have = self.ready[&r.pool];
            if have < r.count {
                return Err(format!("served {r:?} with {have} Ready"));
            }
            for h in heads.iter().filter(|h| h.project != r.project && h.pool == r.pool) {
                let n = &mut self.overtaken.entry(h.id.clone()).or_insert([0; 4])[p];
                *n += 1;
                if *n > 1 {
                    return Err(format!(
                        "project {} starves: its oldest request {} (within quota) was overtaken {n} times by project {}",
                        h.project, h.id, r.project
                    ));
                }
            }
            *self.ready.get_mut(&r.pool).unwrap() -= r.count;
            self.held.push((p, r.pool.clone(), r.count));
            self.last_served[p] = Some(r.seq);
            self.overtaken.remove(&r.id);
            before.remove(&r.id);
        }
        // Heads no longer eligible (over quota) start counting afresh.
        let eligible: Vec<RequestId> = self.eligible_heads(&self.q).into_iter().map(|r| r.id).collect();
        self.overtaken.retain(|id, _| eligible.contains(id));
        Ok(())
    }

    /// Releases everything, fills the pools and serves until the queue is
    /// empty: every request must be served.
    fn drain(&mut self, select: Select) -> Result<(), String> {
        for _ in 0..1000 {
            if self.q.is_empty() {
                return Ok(());
            }
            self.held.clear();
            for p in pools() {
                self.ready.insert(p, CAPACITY);
            }
            self.serve(select)?;
        }
        Err(format!("{} requests never served", self.q.len()))
    }
}

fn check(ops: &[Op], select: Select) -> Result<(), String> {
    let mut w = World::new();
    for op in ops {
        w.apply(op, select)?;
    }
    w.drain(select)
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(512)
}

#[test]
fn the_queue_is_fair_keeps_order_and_honours_quotas() {
    let mut runner = TestRunner::new(Config { cases: cases(), failure_persistence: None, ..Config::default() });
    let r = runner.run(&ops(), |ops| check(&ops, real).map_err(TestCaseError::fail));
    if let Err(e) = r {
        panic!("{e}");
    }
}

/// Runs the property over a broken scheduler: it must fail, with a
/// message containing `expected`.
fn must_catch(select: Select, expected: &str) {
    // A fixed seed: the same cases every run.
    let config = Config { cases: 2048, failure_persistence: None, ..Config::default() };
    let mut runner = TestRunner::new_with_rng(config, TestRng::deterministic_rng(RngAlgorithm::ChaCha));
    match runner.run(&ops(), |ops| check(&ops, select).map_err(TestCaseError::fail)) {
        Ok(()) => panic!("the property did not catch the broken scheduler ({expected})"),
        Err(e) => assert!(e.to_string().contains(expected), "caught, but not for {expected:?}: {e}"),
    }
}

#[test]
fn the_property_catches_first_come_first_served_across_projects() {
    must_catch(global_fifo, "starves");
}

#[test]
fn the_property_catches_a_scheduler_that_ignores_quotas() {
    must_catch(no_quota, "quota exceeded");
}

#[test]
fn the_property_catches_newest_first_within_a_project() {
    must_catch(newest_first, "order within project");
}
