//! The reconciler: executes the planner's decisions through the traits.
//!
//! It is one future. It re-plans on every tick, whenever an operation
//! finishes and whenever the engine kicks it; it runs the planned installs
//! and power-downs concurrently inside itself (no task spawning, so it runs
//! on any executor and, on the test kit's manual clock, deterministically),
//! at most `max_concurrent_installs` installs and one operation per BMC at
//! a time, each install attempt with a deadline, retried with doubling
//! backoff, then Failed with the reason recorded.
//!
//! Every pass finds work a crash left half-done, until none is left (a
//! failed pass does not lose it): interrupted allocations are aborted
//! (their nodes go back to be reinstalled), and Provisioning nodes that
//! none of its operations drives are re-driven (there is one reconciler per
//! store, so such an install has nobody else). An allocation is
//! interrupted when the store knows its process stopped
//! ([`Store::abandoned_allocations`](crate::Store::abandoned_allocations),
//! for replicas sharing a database); on a store only one process uses,
//! when it is older than the engine. Any other allocation is aborted only
//! once it is past the prepare deadline (its request may still be
//! preparing it). It also reclaims failed sessions whose hold ran out.
//!
//! With replicas, only the leader runs a reconciler, one per leadership
//! term, built from [`Engine::fenced`]: every write carries the term's
//! epoch, and recovery counts from the start of the term.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::Poll;

use futures::FutureExt;
use futures::StreamExt;
use futures::future::{join_all, poll_fn};
use futures::stream::FuturesUnordered;
use tracing::{debug, info, warn};

use crate::engine::{Engine, EngineError, Inner};
use crate::model::{Actor, Hardware, Node, NodeId, PoolKey, PowerState, SessionState};
use crate::planner::{Plan, PlanInput, plan};
use crate::power::PowerAction;
use crate::session::SessionCause;
use crate::state::{Cause, NodeState};
use crate::store::{Batch, CommitError, NodeWrite, SessionWrite};
use crate::time::{sleep, timeout};

type OpFuture = Pin<Box<dyn Future<Output = OpDone> + Send>>;

/// How an operation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpOutcome {
    /// The node is Ready.
    Installed,
    /// Every attempt failed; the node is Failed.
    InstallFailed(String),
    /// Powered down.
    PoweredDown,
    /// The power state was checked (and a mismatch, if any, recorded).
    PowerChecked {
        /// Whether the BMC disagreed with the store.
        mismatch: bool,
    },
    /// The BMC could not be asked.
    PowerCheckFailed(String),
    /// The node changed under the operation (an operator took it, say);
    /// the operation stopped without writing.
    Superseded,
    /// The store failed; the node is left for the next sweep.
    StoreFailed(String),
}

/// A finished operation.
#[derive(Debug, Clone)]
pub struct OpDone {
    /// The node.
    pub node: NodeId,
    /// Its BMC key.
    pub bmc: String,
    /// Whether it was an install (counts toward the concurrency limit).
    pub install: bool,
    /// How it ended.
    pub outcome: OpOutcome,
}

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PassReport {
    /// Installs started.
    pub installs_started: usize,
    /// Of `installs_started`, those that reinstall a Ready node past its
    /// reinstall age; the others fill a pool's deficit.
    pub stale_installs_started: usize,
    /// Power-downs started.
    pub power_downs_started: usize,
    /// Failed sessions reclaimed after their hold.
    pub sessions_reclaimed: usize,
    /// Sessions whose lifetime ran out, ended and their nodes sent to be
    /// reinstalled.
    pub sessions_expired: usize,
    /// Queued session requests served.
    pub requests_served: usize,
    /// Half-done allocations aborted.
    pub allocations_aborted: usize,
    /// Abandoned installs taken over.
    pub installs_restarted: usize,
    /// Failed nodes released after their cool-down.
    pub failures_expired: usize,
    /// Power-state checks started.
    pub power_checks_started: usize,
}

/// Why an install attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptFailure {
    /// The installer returned an error.
    Installer,
    /// The attempt ran past the policy's `install_timeout`.
    TimedOut,
}

/// Watches a reconciler at work, for metrics. Every method has a default
/// that does nothing. They are called inline from the reconciler's future,
/// so an implementation must be quick and must not block; it is told
/// what happened, never asked anything, so it cannot change what the
/// reconciler does.
pub trait ReconcilerObserver: Send + Sync {
    /// A pass of [`Reconciler::run`] is starting (the observer times it:
    /// the core reads no OS clock).
    fn pass_started(&self) {}
    /// The pass that started last has ended: what it did, or why it
    /// failed.
    fn pass_finished(&self, _result: Result<&PassReport, &EngineError>) {}
    /// An install attempt of `node` failed; `last` when no attempt is left
    /// and the node goes to Failed.
    fn install_attempt_failed(&self, _node: &Node, _why: AttemptFailure, _last: bool) {}
    /// A session's lifetime ran out and the reconciler ended it; its nodes
    /// are going to be reinstalled. `session` is the session as it was
    /// before (Prod, its expiry passed).
    fn session_expired(&self, _session: &crate::Session) {}
    /// An operation (install, power-down, power check) has finished.
    fn operation_finished(&self, _done: &OpDone) {}
}

/// Drives the farm towards its targets. Create with [`Engine::reconciler`];
/// run exactly one per store.
pub struct Reconciler {
    engine: Engine,
    observer: Option<Arc<dyn ReconcilerObserver>>,
    in_flight: HashMap<NodeId, (String, bool)>,
    ops: FuturesUnordered<OpFuture>,
    /// When each node's power state was last checked (in memory: after a
    /// restart every node is due once, which is what one wants).
    power_checked: HashMap<NodeId, crate::Timestamp>,
    /// Where the rotating power checks resume: the last node looked at.
    power_cursor: NodeId,
}

impl Engine {
    /// The reconciler for this engine.
    pub fn reconciler(&self) -> Reconciler {
        Reconciler {
            engine: self.clone(),
            observer: None,
            in_flight: HashMap::new(),
            ops: FuturesUnordered::new(),
            power_checked: HashMap::new(),
            power_cursor: NodeId(0),
        }
    }
}

enum Wake {
    Stop,
    Work,
}

impl Reconciler {
    /// Tells `observer` what this reconciler does (for metrics).
    pub fn observed_by(mut self, observer: Arc<dyn ReconcilerObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Operations running now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Runs until `shutdown` completes. Stops between steps: in-flight
    /// operations are dropped, and the nodes they were driving are picked
    /// up again by start-up recovery.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        let mut shutdown = pin!(shutdown.fuse());
        let inner = self.engine.inner.clone();
        loop {
            let pass_started = inner.clock.now();
            if let Some(o) = &self.observer {
                o.pass_started();
            }
            let result = self.pass_while_running().await;
            if let Some(o) = &self.observer {
                o.pass_finished(result.as_ref());
            }
            match result {
                Ok(r) if r != PassReport::default() => debug!(?r, "reconciler pass"),
                Ok(_) => {}
                Err(e) => warn!(error = %e, "reconciler pass failed; retrying at the next tick"),
            }
            let mut tick = sleep(&*inner.clock, inner.policy.tick);
            let wake = poll_fn(|cx| {
                if shutdown.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Wake::Stop);
                }
                let mut woke = false;
                while let Poll::Ready(Some(done)) = self.ops.poll_next_unpin(cx) {
                    self.finish(done);
                    woke = true;
                }
                if inner.kick.poll_kicked(cx).is_ready() || tick.as_mut().poll(cx).is_ready() {
                    woke = true;
                }
                if woke { Poll::Ready(Wake::Work) } else { Poll::Pending }
            })
            .await;
            if let Wake::Stop = wake {
                info!(in_flight = self.in_flight.len(), "reconciler stopping");
                return;
            }
            // Under a stream of kicks (every /Node/done kicks), re-plan at
            // most once per `min_pass_interval`: one pass then starts the
            // installs of every node released meanwhile, instead of one
            // full read of the farm per release.
            let mut settle = inner.clock.sleep_until(pass_started.plus(inner.policy.min_pass_interval));
            let wake = poll_fn(|cx| {
                if shutdown.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Wake::Stop);
                }
                while let Poll::Ready(Some(done)) = self.ops.poll_next_unpin(cx) {
                    self.finish(done);
                }
                if settle.as_mut().poll(cx).is_ready() { Poll::Ready(Wake::Work) } else { Poll::Pending }
            })
            .await;
            if let Wake::Stop = wake {
                info!(in_flight = self.in_flight.len(), "reconciler stopping");
                return;
            }
        }
    }

    /// One pass, while the operations already running go on: a pass waits
    /// for several store reads, and installs that stood still meanwhile
    /// (their next write, the install itself) made the refill lag behind a
    /// busy pool until it ran dry. Operations that finish during the pass
    /// are recorded only after it, so the pass sees the in-flight set it
    /// would have seen without them (a node whose operation just finished
    /// counts as still driven: it is not started twice).
    async fn pass_while_running(&mut self) -> Result<PassReport, EngineError> {
        let mut running = std::mem::take(&mut self.ops);
        let mut finished = Vec::new();
        let result = {
            let mut pass = pin!(self.pass());
            poll_fn(|cx| {
                while let Poll::Ready(Some(done)) = running.poll_next_unpin(cx) {
                    finished.push(done);
                }
                pass.as_mut().poll(cx)
            })
            .await
        };
        self.ops.extend(running);
        for done in finished {
            self.finish(done);
        }
        result
    }

    /// Polls running operations once, without waiting, recording the
    /// finished ones. Useful when driving the reconciler step by step.
    pub fn poll_operations(&mut self) {
        let waker = futures::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        while let Poll::Ready(Some(done)) = self.ops.poll_next_unpin(&mut cx) {
            self.finish(done);
        }
    }

    /// Waits until every running operation has finished.
    pub async fn drain(&mut self) {
        while let Some(done) = self.ops.next().await {
            self.finish(done);
        }
    }

    fn finish(&mut self, done: OpDone) {
        self.in_flight.remove(&done.node);
        if let Some(o) = &self.observer {
            o.operation_finished(&done);
        }
        match &done.outcome {
            OpOutcome::InstallFailed(r) => warn!(node = %done.node, reason = %r, "install failed"),
            OpOutcome::StoreFailed(r) => warn!(node = %done.node, error = %r, "operation could not record its result"),
            OpOutcome::PowerCheckFailed(r) => warn!(node = %done.node, error = %r, "power state check failed"),
            _ => debug!(node = %done.node, outcome = ?done.outcome, "operation finished"),
        }
    }

    /// One step: sweeps (start-up recovery on the first call, expired holds,
    /// abandoned work), plans, and starts the planned operations. Does not
    /// wait for them; [`Reconciler::run`] does, as does
    /// [`Reconciler::drain`].
    pub async fn pass(&mut self) -> Result<PassReport, EngineError> {
        let inner = self.engine.inner.clone();
        let store = &inner.store;
        let policy = &inner.policy;
        let mut report = PassReport::default();
        let now = inner.clock.now();
        // Start-up recovery is not a one-off step that a failed pass could
        // lose: work older than this engine's start cannot be driven by
        // this process, so every pass takes it over until none is left.
        let started_at = inner.started_at;

        // Sessions: reclaim expired fail holds, abort interrupted and stale
        // allocations. Which allocations were interrupted: on a store that
        // knows who made each one (replicas sharing a database), those whose
        // process stopped; on a store one process uses, those older than
        // this engine. Any other allocation belongs to a request still
        // running somewhere: only the deadline ends it.
        let live = store.live_sessions().await?;
        let stale_after = policy.stale_allocation_after();
        let abandoned =
            if live.iter().any(|s| s.state == SessionState::Allocating && now.since(s.created_at) < stale_after) {
                store.abandoned_allocations().await?.map(|v| v.into_iter().collect::<HashSet<_>>())
            } else {
                None
            };
        let interrupted = |s: &crate::Session| match &abandoned {
            Some(ids) => ids.contains(&s.id),
            None => s.created_at < started_at,
        };
        for s in live {
            match s.state {
                SessionState::Fail if s.hold_until.is_some_and(|t| t <= now) => {
                    report.sessions_reclaimed += usize::from(reclaim(&self.engine, &s).await?);
                }
                SessionState::Allocating if interrupted(&s) || now.since(s.created_at) >= stale_after => {
                    let interrupted = interrupted(&s);
                    let actor = if interrupted { Actor::Recovery } else { Actor::Reconciler };
                    let why = if interrupted {
                        "allocation interrupted by a restart"
                    } else {
                        "allocation abandoned (no progress within the prepare deadline)"
                    };
                    self.engine.abort_allocation(&s.id, &HashMap::new(), why, actor).await?;
                    report.allocations_aborted += 1;
                }
                _ => {}
            }
        }

        // Sessions whose lifetime ran out: ended, their nodes reinstalled.
        // A bounded batch per pass (the index gives the earliest first);
        // a backlog is worked off over the next passes. A session in Fail
        // is never listed: it keeps its hold.
        const EXPIRED_PER_PASS: usize = 256;
        for s in store.expired_sessions(now, EXPIRED_PER_PASS).await? {
            if expire(&self.engine, &s).await? {
                report.sessions_expired += 1;
                if let Some(o) = &self.observer {
                    o.session_expired(&s);
                }
            }
        }

        // The wait queue, before the counts below are read: what it takes
        // is not Ready any more, and the plan refills the pools.
        report.requests_served = self.engine.serve_queue().await?;

        let targets = store.pool_targets().await?;
        let paused = store.paused().await?;
        // Only the rows a pass can act on, not the whole farm: idle
        // hardware, installs, failures and (paused) the warm pool; the
        // stale Ready ones are read below. The counts are read after the
        // rows, so a node that turns Ready in between is counted twice
        // (the pool fills a pass later), never missed (an extra install).
        // Idle hardware is read separately, least used first and bounded:
        // a big farm is mostly idle, and a pass only needs enough of it to
        // fill its free install slots.
        let mut states = vec![NodeState::Provisioning, NodeState::Failed];
        if paused {
            states.push(NodeState::Ready);
        }
        let others = store.nodes_in_states(&states).await?;
        let ready: BTreeMap<PoolKey, u32> = store.ready_counts().await?.into_iter().collect();
        let free_slots = policy.max_concurrent_installs.saturating_sub(self.installs_in_flight());
        let mut provisioning: BTreeMap<&PoolKey, u32> = BTreeMap::new();
        for n in others.iter().filter(|n| n.state == NodeState::Provisioning) {
            if let Some(img) = &n.image {
                *provisioning.entry(img).or_default() += 1;
            }
        }
        // Idle hardware is read per kind of machine that a pool in deficit
        // can use, least used first: every such pool sees its own
        // candidates, however many idle machines of other kinds come
        // before them in the farm-wide order, so "largest deficit first"
        // holds across pages. A kind's fills can use at most min(free
        // slots, what its pools miss) machines: read that many twice over
        // (for machines behind a busy BMC) plus a margin, more below only
        // if needed, and at most IDLE_PER_PASS: a farm that misses more
        // gets the rest over the next passes (every 50 ms).
        const IDLE_PER_PASS: usize = 4096;
        let mut idle_limits: BTreeMap<Hardware, usize> = BTreeMap::new();
        if !paused && free_slots > 0 {
            for t in &targets {
                let have = ready.get(&t.pool).copied().unwrap_or(0) + provisioning.get(&t.pool).copied().unwrap_or(0);
                let missing = t.standby.saturating_sub(have) as usize;
                if missing > 0 {
                    for hw in Hardware::able_to_carry(&t.pool) {
                        *idle_limits.entry(hw).or_default() += missing;
                    }
                }
            }
            for limit in idle_limits.values_mut() {
                *limit = free_slots.min(*limit).min(IDLE_PER_PASS).saturating_mul(2).saturating_add(64);
            }
        }
        let (mut nodes, mut full) = with_idle(others.clone(), store, &idle_limits).await?;

        // Installs nobody is driving: there is one reconciler per store,
        // so a Provisioning node that none of its operations drives was
        // left by a crash (or by an operation whose last write failed).
        // Re-drive them with the image they were getting, as slots and
        // BMCs allow; the rest wait for the next pass, not for a deadline.
        let installs_in_flight = self.installs_in_flight();
        let mut restart_budget = policy.max_concurrent_installs.saturating_sub(installs_in_flight);
        for n in nodes.iter().filter(|n| n.state == NodeState::Provisioning) {
            if self.in_flight.contains_key(&n.id) || restart_budget == 0 {
                continue;
            }
            if self.in_flight.values().any(|(b, _)| b == n.bmc_key()) {
                continue;
            }
            let Some(image) = n.image.clone() else { continue };
            let actor = if n.state_since < started_at { Actor::Recovery } else { Actor::Reconciler };
            match self.engine.commit_node(n, Cause::InstallRestarted, actor).await? {
                Some(after) => {
                    info!(node = %n.hostname, %image, "re-driving an interrupted install");
                    self.start_install(after, image);
                    restart_budget -= 1;
                    report.installs_restarted += 1;
                }
                None => continue,
            }
        }

        let busy_nodes: HashSet<NodeId> = self.in_flight.keys().copied().collect();
        let busy_bmcs: HashSet<String> = self.in_flight.values().map(|(b, _)| b.clone()).collect();
        let installs_in_flight = self.installs_in_flight();
        let plan_with = |nodes: &[Node]| {
            plan(PlanInput {
                ready: &ready,
                nodes,
                targets: &targets,
                policy,
                now,
                paused,
                busy_nodes: &busy_nodes,
                busy_bmcs: &busy_bmcs,
                installs_in_flight,
            })
        };
        let Plan { installs, power_downs, expired_failures, .. } = if paused {
            // Every Ready node is among the rows already.
            plan_with(&nodes)
        } else {
            // More idle hardware only if a pool still found none that fits
            // while slots were free and some kind's read was cut short (its
            // first machines all sit behind busy BMCs, say).
            loop {
                let p = plan_with(&nodes);
                let short = p.installs.is_empty() && free_slots > 0 && p.pools.iter().any(|s| s.unfilled > 0);
                if full.is_empty() || !short {
                    break;
                }
                for hw in &full {
                    if let Some(limit) = idle_limits.get_mut(hw) {
                        *limit = limit.saturating_mul(4);
                    }
                }
                (nodes, full) = with_idle(others.clone(), store, &idle_limits).await?;
            }
            // Stale Ready nodes, oldest first: as many as the plan can act
            // on (free slots, surplus to power down, busy ones it skips),
            // and more only if it used them all and still wanted more, so
            // the plan is the one the whole farm would give.
            let cutoff = if policy.reinstall_age.is_zero() {
                crate::Timestamp(i64::MAX)
            } else {
                now.minus(policy.reinstall_age)
            };
            let standby_of =
                |p: &PoolKey| targets.iter().find(|t| &t.pool == p).map(|t| t.standby).unwrap_or(0) as usize;
            let surplus: usize = ready.iter().map(|(p, r)| (*r as usize).saturating_sub(standby_of(p))).sum();
            let mut limit = policy.max_concurrent_installs + surplus + self.in_flight.len() + 64;
            let base = nodes.len();
            loop {
                nodes.truncate(base);
                let stale = store.stale_ready(cutoff, limit).await?;
                let full = stale.len() >= limit;
                // A node read twice (it changed between the reads) is
                // planned once.
                let fresh: Vec<Node> = stale
                    .into_iter()
                    .filter(|n| nodes[..base].binary_search_by_key(&n.id, |b| b.id).is_err())
                    .collect();
                nodes.extend(fresh);
                let p = plan_with(&nodes);
                if !full || !p.more_stale_wanted {
                    break p;
                }
                limit = limit.saturating_mul(4);
            }
        };
        let by_id: HashMap<NodeId, &Node> = nodes.iter().map(|n| (n.id, n)).collect();

        // Each group's writes go to the store concurrently, so that a store
        // with group commit makes one durable commit of them, not one each.
        let engine = &self.engine;
        let expired = join_all(
            expired_failures
                .iter()
                .filter_map(|id| by_id.get(id))
                .map(|n| async move { engine.commit_node(n, Cause::HoldExpired, Actor::Reconciler).await }),
        )
        .await;
        // A store error fails the pass, but only after every write that did
        // succeed has its operation started: nothing is left Provisioning
        // without an install driving it.
        let mut first_error = None;
        for r in expired {
            match r {
                Ok(x) => report.failures_expired += usize::from(x.is_some()),
                Err(e) => first_error = first_error.or(Some(e)),
            }
        }
        let started = join_all(installs.into_iter().filter_map(|p| by_id.get(&p.node).map(|n| (*n, p))).map(
            |(n, p)| async move {
                let why = match p.reason {
                    crate::planner::InstallReason::Fill => "fill",
                    crate::planner::InstallReason::Stale => "stale",
                };
                let stale = p.reason == crate::planner::InstallReason::Stale;
                let cause = Cause::InstallStarted { image: p.image.clone(), why: why.to_string() };
                engine.commit_node(n, cause, Actor::Reconciler).await.map(|r| r.map(|after| (after, p.image, stale)))
            },
        ))
        .await;
        let downs = join_all(
            power_downs
                .iter()
                .filter_map(|id| by_id.get(id))
                .map(|n| async move { engine.commit_node(n, Cause::PoweredDown, Actor::Reconciler).await }),
        )
        .await;
        for r in started {
            match r {
                Ok(Some((after, image, stale))) => {
                    self.start_install(after, image);
                    report.installs_started += 1;
                    report.stale_installs_started += usize::from(stale);
                }
                Ok(None) => {}
                Err(e) => first_error = first_error.or(Some(e)),
            }
        }
        for r in downs {
            match r {
                Ok(Some(after)) => {
                    self.start_power_off(after);
                    report.power_downs_started += 1;
                }
                Ok(None) => {}
                Err(e) => first_error = first_error.or(Some(e)),
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        report.power_checks_started = self.start_power_checks(now).await?;
        Ok(report)
    }
}

/// `others` plus up to `limits[kind]` idle nodes of each kind, in id
/// order, and the kinds whose read hit its limit (there may be more). (A
/// free function, as are the other helpers of a pass: the reconciler's
/// future must be `Send`, and holding `&Reconciler` across an await would
/// require it to be `Sync`.)
async fn with_idle(
    mut others: Vec<Node>,
    store: &Arc<dyn crate::Store>,
    limits: &BTreeMap<Hardware, usize>,
) -> Result<(Vec<Node>, Vec<Hardware>), EngineError> {
    let mut full = Vec::new();
    for (hw, limit) in limits {
        let idle = store.idle_nodes(hw, *limit).await?;
        if idle.len() >= *limit {
            full.push(hw.clone());
        }
        others.extend(idle);
    }
    others.sort_by_key(|n| n.id);
    // A node read twice (it became idle between two reads) counts once.
    others.dedup_by_key(|n| n.id);
    Ok((others, full))
}

/// Ends a Prod session whose expiry has passed: its nodes (those still
/// Deployed for it) go back to be reinstalled, in one compare-and-set
/// batch. `Ok(false)` if it changed since it was read (released,
/// failed or extended meanwhile: the next pass judges it afresh).
async fn expire(engine: &Engine, s: &crate::Session) -> Result<bool, EngineError> {
    let inner = &engine.inner;
    let now = inner.clock.now();
    let mut batch = Batch::default();
    for id in &s.nodes {
        let Some(n) = inner.store.node(*id).await? else { continue };
        if n.session.as_ref() == Some(&s.id) && n.state == NodeState::Deployed {
            match NodeWrite::transition(&n, Cause::SessionExpired, Actor::Reconciler, now) {
                Ok(w) => batch.nodes.push(w),
                Err(e) => {
                    debug!(session = %s.id, error = %e, "a node moved under an expiring session");
                    return Ok(false);
                }
            }
        }
    }
    let w = match SessionWrite::transition(s, SessionCause::Expired, now) {
        Ok(w) => w,
        Err(e) => {
            debug!(session = %s.id, error = %e, "the session no longer expires");
            return Ok(false);
        }
    };
    batch.sessions.push(w);
    match inner.commit(batch).await {
        Ok(()) => {
            info!(session = %s.id, project = %s.project, nodes = s.nodes.len(), expires_at = ?s.expires_at,
                "session lifetime ran out; session ended and its nodes reclaimed");
            engine.kick();
            Ok(true)
        }
        Err(CommitError::Store(e)) => Err(e.into()),
        Err(_) => Ok(false),
    }
}

/// Ends a failed session whose hold ran out; its nodes go back to be
/// reinstalled.
async fn reclaim(engine: &Engine, s: &crate::Session) -> Result<bool, EngineError> {
    let inner = &engine.inner;
    let now = inner.clock.now();
    let mut batch = Batch::default();
    for id in &s.nodes {
        let Some(n) = inner.store.node(*id).await? else { continue };
        if n.session.as_ref() == Some(&s.id) && n.state == NodeState::Failed {
            batch.nodes.push(NodeWrite::transition(&n, Cause::HoldExpired, Actor::Reconciler, now)?);
        }
    }
    batch.sessions.push(SessionWrite::transition(s, SessionCause::HoldExpired, now)?);
    match inner.commit(batch).await {
        Ok(()) => {
            info!(session = %s.id, project = %s.project, "fail hold expired; session reclaimed");
            Ok(true)
        }
        Err(CommitError::Store(e)) => Err(e.into()),
        Err(_) => Ok(false),
    }
}

impl Reconciler {
    fn installs_in_flight(&self) -> usize {
        self.in_flight.values().filter(|(_, install)| *install).count()
    }

    fn start_install(&mut self, node: Node, image: PoolKey) {
        let inner = self.engine.inner.clone();
        self.in_flight.insert(node.id, (node.bmc_key().to_string(), true));
        self.ops.push(Box::pin(install_op(inner, node, image, self.observer.clone())));
    }

    /// Starts power-state checks of nodes whose last check is older than
    /// the policy's interval: a few per pass, never on a busy node or BMC,
    /// never on a node mid-operation or out of Duffy's hands.
    ///
    /// Each pass reads one page of nodes after a cursor that goes round the
    /// farm (back to the start after the last node), not the whole farm.
    async fn start_power_checks(&mut self, now: crate::Timestamp) -> Result<usize, EngineError> {
        const PER_PASS: usize = 4;
        const PAGE: usize = 64;
        let Some(interval) = self.engine.inner.policy.power_check_interval else { return Ok(0) };
        let store = self.engine.inner.store.clone();
        let page = store.nodes_after(self.power_cursor, PAGE).await?;
        // Past the end: start again from the beginning next pass.
        let mut next = match page.last() {
            Some(last) if page.len() == PAGE => last.id,
            _ => NodeId(0),
        };
        let mut started = 0;
        let mut seen = self.power_cursor;
        for n in &page {
            if started == PER_PASS {
                // Resume right after the last node looked at.
                next = seen;
                break;
            }
            seen = n.id;
            if matches!(n.state, NodeState::Provisioning | NodeState::Contextualizing | NodeState::Reserved)
                || self.in_flight.contains_key(&n.id)
                || self.in_flight.values().any(|(b, _)| b == n.bmc_key())
                || self.power_checked.get(&n.id).is_some_and(|t| now.since(*t) < interval)
            {
                continue;
            }
            self.power_checked.insert(n.id, now);
            self.start_power_check(n.clone());
            started += 1;
        }
        self.power_cursor = next;
        Ok(started)
    }

    fn start_power_check(&mut self, node: Node) {
        let inner = self.engine.inner.clone();
        let bmc = node.bmc_key().to_string();
        self.in_flight.insert(node.id, (bmc.clone(), false));
        self.ops.push(Box::pin(async move {
            let id = node.id;
            let done = |outcome| OpDone { node: id, bmc: bmc.clone(), install: false, outcome };
            let observed = match timeout(&*inner.clock, inner.policy.prepare_timeout, inner.power.status(&node)).await {
                Ok(Ok(p)) => p,
                Ok(Err(e)) => return done(OpOutcome::PowerCheckFailed(e.to_string())),
                Err(e) => return done(OpOutcome::PowerCheckFailed(e.to_string())),
            };
            if observed == node.power || observed == PowerState::Unknown {
                return done(OpOutcome::PowerChecked { mismatch: false });
            }
            // Re-read: the node may have moved while the BMC answered.
            let current = match inner.store.node(id).await {
                Ok(Some(n)) => n,
                Ok(None) => return done(OpOutcome::Superseded),
                Err(e) => return done(OpOutcome::StoreFailed(e.to_string())),
            };
            if current.version != node.version {
                return done(OpOutcome::Superseded);
            }
            // Not knowing is not disagreeing: a new farm's first check of
            // every machine records what the BMC says, without a warning.
            let mismatch = node.power != PowerState::Unknown;
            let cause = if mismatch {
                warn!(node = %node.hostname, believed = node.power.as_str(), observed = observed.as_str(),
                    "power state mismatch");
                Cause::PowerMismatch { observed }
            } else {
                debug!(node = %node.hostname, observed = observed.as_str(), "power state observed");
                Cause::PowerObserved { observed }
            };
            done(match inner.commit_node(&current, cause, Actor::Reconciler).await {
                Ok(Some(_)) => OpOutcome::PowerChecked { mismatch },
                Ok(None) => OpOutcome::Superseded,
                Err(e) => OpOutcome::StoreFailed(e.to_string()),
            })
        }));
    }

    fn start_power_off(&mut self, node: Node) {
        let inner = self.engine.inner.clone();
        let bmc = node.bmc_key().to_string();
        self.in_flight.insert(node.id, (bmc.clone(), false));
        self.ops.push(Box::pin(async move {
            match still_ours(&inner, &node).await {
                Ok(true) => {}
                Ok(false) => return OpDone { node: node.id, bmc, install: false, outcome: OpOutcome::Superseded },
                Err(e) => {
                    return OpDone {
                        node: node.id,
                        bmc,
                        install: false,
                        outcome: OpOutcome::StoreFailed(e.to_string()),
                    };
                }
            }
            let r =
                timeout(&*inner.clock, inner.policy.prepare_timeout, inner.power.power(&node, PowerAction::Off)).await;
            match r {
                Ok(Ok(())) => {}
                Ok(Err(e)) => warn!(node = %node.hostname, error = %e, "powering down failed"),
                Err(e) => warn!(node = %node.hostname, error = %e, "powering down timed out"),
            }
            OpDone { node: node.id, bmc, install: false, outcome: OpOutcome::PoweredDown }
        }));
    }
}

/// One install with retries. `node` is the row as written by the
/// transition into Provisioning.
async fn install_op(
    inner: Arc<Inner>,
    mut node: Node,
    image: PoolKey,
    observer: Option<Arc<dyn ReconcilerObserver>>,
) -> OpDone {
    let id = node.id;
    let bmc = node.bmc_key().to_string();
    let done = |outcome| OpDone { node: id, bmc: bmc.clone(), install: true, outcome };
    let attempts = inner.policy.install_attempts.max(1);
    for attempt in 0..attempts {
        // A retry powers the machine again: make sure it is still ours
        // first. An operator may have reserved it, or set it aside, while
        // the attempt waited for its backoff. The first attempt does not
        // read: `node` is the row the pass wrote moments ago, and a change
        // racing the install is caught either way, by the compare-and-set
        // of the install's own outcome (one store read less per install,
        // on the reinstall path every job's done takes).
        if attempt > 0 {
            match still_ours(&inner, &node).await {
                Ok(true) => {}
                Ok(false) => return done(OpOutcome::Superseded),
                Err(e) => return done(OpOutcome::StoreFailed(e.to_string())),
            }
        }
        let attempt_started = inner.clock.now();
        let r = timeout(&*inner.clock, inner.policy.install_timeout, inner.installer.install(&node, &image)).await;
        let (why, reason) = match r {
            Ok(Ok(installed)) => {
                inner.record_install(inner.clock.now().since(attempt_started));
                let cause = Cause::InstallSucceeded { host_key: installed.host_key };
                return done(match inner.commit_node(&node, cause, Actor::Reconciler).await {
                    Ok(Some(_)) => OpOutcome::Installed,
                    Ok(None) => OpOutcome::Superseded,
                    Err(e) => OpOutcome::StoreFailed(e.to_string()),
                });
            }
            Ok(Err(e)) => (AttemptFailure::Installer, e.message),
            Err(el) => (AttemptFailure::TimedOut, format!("install {el}")),
        };
        if let Some(o) = &observer {
            o.install_attempt_failed(&node, why, attempt + 1 == attempts);
        }
        if attempt + 1 == attempts {
            let retry_at = inner.policy.failed_retry_after.map(|d| inner.clock.now().plus(d));
            let reason = format!("install of {image} failed after {attempts} attempts: {reason}");
            return done(
                match inner
                    .commit_node(&node, Cause::InstallFailed { reason: reason.clone(), retry_at }, Actor::Reconciler)
                    .await
                {
                    Ok(Some(_)) => OpOutcome::InstallFailed(reason),
                    Ok(None) => OpOutcome::Superseded,
                    Err(e) => OpOutcome::StoreFailed(e.to_string()),
                },
            );
        }
        debug!(node = %node.hostname, attempt = attempt + 1, %reason, "install attempt failed; retrying");
        match inner.commit_node(&node, Cause::InstallAttemptFailed { reason }, Actor::Reconciler).await {
            Ok(Some(after)) => node = after,
            Ok(None) => return done(OpOutcome::Superseded),
            Err(e) => return done(OpOutcome::StoreFailed(e.to_string())),
        }
        sleep(&*inner.clock, inner.policy.backoff(attempt)).await;
    }
    done(OpOutcome::Superseded)
}

/// Whether `node` is still stored exactly as this operation last wrote
/// it: nobody (operator, engine) has changed it since.
async fn still_ours(inner: &Inner, node: &Node) -> Result<bool, EngineError> {
    let current = inner.store.node(node.id).await?;
    let ours = current.as_ref().is_some_and(|c| c.version == node.version && c.state == node.state);
    if !ours {
        debug!(node = %node.hostname, "the node changed under the operation; leaving it alone");
    }
    Ok(ours)
}

#[cfg(test)]
mod tests {
    /// The reconciler must be spawnable on a multi-threaded runtime.
    #[allow(dead_code)]
    fn run_future_is_send(r: super::Reconciler) {
        fn is_send<T: Send>(_: T) {}
        is_send(r.run(std::future::pending::<()>()));
    }
}
