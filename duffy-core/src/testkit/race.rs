//! The 64-task race every `Store` backend runs: owners claiming,
//! delivering, failing, releasing and reinstalling against 200 nodes,
//! with reapers racing them to end sessions, through one store or several
//! sharing one database (as replicas do); then the log is replayed to show
//! no node was ever held by two sessions at once, and the farm, the log
//! and what the tasks were told are checked against each other.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::conformance::{add_ready, claim_req, pool7};
use crate::Actor;
use crate::audit::{check_history, check_invariants};
use crate::model::{KeyId, Node, NodeId, Session, SessionId, SessionState};
use crate::session::SessionCause;
use crate::state::{Cause, CauseKind, Event, NodeState};
use crate::store::{Batch, ClaimRefusal, CommitError, EventQuery, NodeWrite, SessionWrite, Store};
use crate::time::Timestamp;

const T0: Timestamp = Timestamp(1_700_000_000_000);
/// Nodes in the race's farm.
pub const NODES: usize = 200;
const TASKS: u64 = 64;
const REAPERS: u64 = 4;

/// What the race did, for the caller's own checks and its log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RaceReport {
    /// Claims that succeeded.
    pub claims: u64,
    /// Claims refused for want of Ready nodes.
    pub refusals: u64,
    /// Sessions an owner could not finish because a reaper got there first.
    pub lost_races: u64,
    /// Sessions a reaper ended.
    pub reaped: u64,
    /// How long the tasks ran.
    pub elapsed: Duration,
}

/// Runs the race on `stores` (task `i` uses `stores[i % len]`; the first
/// one seeds the farm), each of 60 owners making `rounds` claims, then
/// checks: invariants and history hold; every node is Ready again and
/// free; each node's history has one event per version; every claim the
/// tasks were told of is in the log exactly; ended sessions are Done or
/// Aborted; at least 1,000 claims succeeded and some were refused. Needs
/// a multi-threaded tokio runtime. Panics on the first failed check.
pub async fn run(stores: &[Arc<dyn Store>], rounds: usize) -> RaceReport {
    assert!(!stores.is_empty(), "the race needs a store");
    let store = stores[0].clone();
    add_ready(&*store, "n", NODES, &pool7()).await;
    let start = Instant::now();
    let tally = Arc::new(Mutex::new(Tally::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let pick = |task: u64| stores[task as usize % stores.len()].clone();
    let owners: Vec<_> =
        (1..=TASKS - REAPERS).map(|task| tokio::spawn(owner(pick(task), task, rounds, tally.clone()))).collect();
    let reapers: Vec<_> = (TASKS - REAPERS + 1..=TASKS)
        .map(|task| tokio::spawn(reaper(pick(task), task, tally.clone(), stop.clone())))
        .collect();
    for o in owners {
        o.await.expect("owner task");
    }
    stop.store(true, Ordering::Relaxed);
    for r in reapers {
        r.await.expect("reaper task");
    }
    let elapsed = start.elapsed();
    let tally = Arc::try_unwrap(tally).ok().expect("sole owner").into_inner().expect("lock");
    assert!(tally.claims >= 1000, "{}", tally.claims);
    assert!(tally.refusals > 0, "60 owners asking for up to 6 nodes each must run short of 200 sometimes");

    check_invariants(&*store).await.expect("invariants");
    check_history(&*store).await.expect("history");
    let events = store.events(EventQuery::default()).await.expect("events");
    let holder = replay(&events);
    let nodes = store.nodes().await.expect("nodes");
    // Everything was released and reinstalled.
    assert!(holder.is_empty(), "{holder:?}");
    assert!(nodes.iter().all(|n| n.state == NodeState::Ready && n.session.is_none()));
    assert!(store.live_sessions().await.expect("live").is_empty());
    // Each node's history is complete: one event per version.
    let mut per_node: HashMap<NodeId, u64> = HashMap::new();
    for e in &events {
        *per_node.entry(e.node).or_default() += 1;
    }
    for n in &nodes {
        assert_eq!(per_node.get(&n.id).copied(), Some(n.version), "node {} history vs version", n.id);
    }
    // Every claim the tasks were told of is in the log, exactly.
    let mut allocated: BTreeMap<SessionId, Vec<NodeId>> = BTreeMap::new();
    for e in events.iter().filter(|e| e.cause == CauseKind::Allocated) {
        allocated.entry(e.session.clone().expect("session")).or_default().push(e.node);
    }
    assert_eq!(allocated, tally.claimed);
    for (sid, _) in tally.claimed.iter().take(50) {
        let s = store.session(sid).await.expect("read").expect("exists");
        assert!(matches!(s.state, SessionState::Done | SessionState::Aborted), "{sid}: {:?}", s.state);
    }
    RaceReport {
        claims: tally.claims,
        refusals: tally.refusals,
        lost_races: tally.lost_races,
        reaped: tally.reaped,
        elapsed,
    }
}

fn actor(task: u64) -> Actor {
    Actor::Key(KeyId(task))
}

/// Moves a session's nodes along with `cause` and its row to `state`
/// through the session state machine (an Allocating session that ends is
/// aborted, a delivered one released), as one compare-and-set batch built
/// from the rows given.
fn advance(s: &Session, nodes: &[Node], state: SessionState, task: u64, cause: &dyn Fn(&Node) -> Cause) -> Batch {
    let mut batch = Batch::default();
    for n in nodes {
        batch.nodes.push(NodeWrite::transition(n, cause(n), actor(task), T0).expect("legal"));
    }
    let session_cause = match (s.state, state) {
        (_, SessionState::Prod) => SessionCause::Delivered { lease_until: T0 },
        (_, SessionState::Fail) => SessionCause::FailedByUser { hold_until: T0 },
        (SessionState::Allocating, _) => SessionCause::Aborted { reason: "released".into() },
        _ => SessionCause::Released,
    };
    batch.sessions.push(SessionWrite::transition(s, session_cause, T0).expect("a legal session transition"));
    batch
}

/// Ends a session from fresh reads, whatever state it is in, then
/// reinstalls its nodes. `Ok(false)`: someone else got there first.
async fn end_and_reinstall(store: &dyn Store, sid: &SessionId, task: u64) -> bool {
    let Some(s) = store.session(sid).await.expect("read") else { return false };
    if !s.state.is_live() {
        return false;
    }
    let mut nodes = Vec::new();
    for id in &s.nodes {
        let n = store.node(*id).await.expect("read").expect("exists");
        if n.session.as_ref() == Some(sid) {
            nodes.push(n);
        }
    }
    let batch = advance(&s, &nodes, SessionState::Done, task, &|n| match n.state {
        NodeState::Contextualizing => Cause::AllocationAborted { reason: "released".into() },
        _ => Cause::Released,
    });
    let released: Vec<Node> = batch.nodes.iter().map(|w| w.node.clone()).collect();
    match store.commit(batch).await {
        Ok(()) => {}
        Err(CommitError::Conflict(_)) => return false,
        Err(e) => panic!("release failed: {e}"),
    }
    reinstall(store, &released, task).await;
    true
}

/// Active nodes back to Ready (only whoever released them does this).
async fn reinstall(store: &dyn Store, nodes: &[Node], task: u64) {
    if nodes.is_empty() {
        return;
    }
    let mut batch = Batch::default();
    for n in nodes {
        let cause = Cause::InstallStarted { image: pool7(), why: "refill".into() };
        batch.nodes.push(NodeWrite::transition(n, cause, actor(task), T0).expect("legal"));
    }
    let provisioning: Vec<Node> = batch.nodes.iter().map(|w| w.node.clone()).collect();
    store.commit(batch).await.expect("install started");
    let mut batch = Batch::default();
    for n in &provisioning {
        batch.nodes.push(
            NodeWrite::transition(n, Cause::InstallSucceeded { host_key: None }, actor(task), T0).expect("legal"),
        );
    }
    store.commit(batch).await.expect("install succeeded");
}

#[derive(Default)]
struct Tally {
    claims: u64,
    refusals: u64,
    lost_races: u64,
    reaped: u64,
    /// Every successful claim: session → nodes, as returned.
    claimed: BTreeMap<SessionId, Vec<NodeId>>,
}

async fn owner(store: Arc<dyn Store>, task: u64, rounds: usize, tally: Arc<Mutex<Tally>>) {
    let mut rng = ChaCha8Rng::seed_from_u64(task);
    for round in 0..rounds {
        let count = rng.gen_range(1..=6);
        let sid = format!("s-{task}-{round}");
        let c = match store.claim(claim_req(&sid, task, "p", count, T0)).await.expect("store ok") {
            Ok(c) => c,
            Err(ClaimRefusal::InsufficientNodes { .. }) => {
                tally.lock().expect("lock").refusals += 1;
                tokio::task::yield_now().await;
                continue;
            }
            Err(other) => panic!("unexpected refusal {other:?}"),
        };
        assert_eq!(c.nodes.len(), count as usize);
        {
            let mut t = tally.lock().expect("lock");
            t.claims += 1;
            t.claimed.insert(c.session.id.clone(), c.nodes.iter().map(|n| n.id).collect());
        }
        // Deliver, and sometimes fail, racing the reapers; a lost race
        // (the session changed under us) just ends our part.
        let mut session = c.session.clone();
        let mut nodes = c.nodes.clone();
        let mut steps = Vec::new();
        if rng.gen_bool(0.6) {
            steps.push((SessionState::Prod, Cause::Prepared));
            if rng.gen_bool(0.3) {
                steps.push((SessionState::Fail, Cause::FailedByUser { hold_until: T0 }));
            }
        }
        let mut lost = false;
        for (state, cause) in steps {
            let batch = advance(&session, &nodes, state, task, &|_| cause.clone());
            let next_nodes: Vec<Node> = batch.nodes.iter().map(|w| w.node.clone()).collect();
            let next_session = batch.sessions[0].session.clone();
            match store.commit(batch).await {
                Ok(()) => {
                    session = next_session;
                    nodes = next_nodes;
                }
                Err(CommitError::Conflict(_)) => {
                    lost = true;
                    break;
                }
                Err(e) => panic!("commit failed: {e}"),
            }
        }
        if lost || !end_and_reinstall(&*store, &session.id, task).await {
            tally.lock().expect("lock").lost_races += 1;
        }
    }
}

async fn reaper(store: Arc<dyn Store>, task: u64, tally: Arc<Mutex<Tally>>, stop: Arc<std::sync::atomic::AtomicBool>) {
    let mut rng = ChaCha8Rng::seed_from_u64(1000 + task);
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let live = store.live_sessions().await.expect("live");
        if live.is_empty() {
            tokio::task::yield_now().await;
            continue;
        }
        let victim = &live[rng.gen_range(0..live.len())];
        if end_and_reinstall(&*store, &victim.id, task).await {
            tally.lock().expect("lock").reaped += 1;
        }
        tokio::task::yield_now().await;
    }
}

/// Replays the log: who holds each node after each event. Panics on the
/// first event that would give a node to a second session.
pub fn replay(events: &[Event]) -> HashMap<NodeId, SessionId> {
    let mut holder: HashMap<NodeId, SessionId> = HashMap::new();
    for e in events {
        let held = holder.get(&e.node).cloned();
        match e.cause {
            CauseKind::Allocated => {
                let sid = e.session.clone().expect("Allocated names its session");
                assert!(held.is_none(), "event {}: node {} given to {sid} while held by {held:?}", e.seq, e.node);
                holder.insert(e.node, sid);
            }
            CauseKind::Released | CauseKind::AllocationAborted | CauseKind::PrepareFailed | CauseKind::HoldExpired => {
                assert_eq!(held, e.session, "event {}: node {} released by the wrong session", e.seq, e.node);
                assert!(held.is_some(), "event {}: node {} released while free", e.seq, e.node);
                holder.remove(&e.node);
            }
            CauseKind::Prepared | CauseKind::FailedByUser => {
                assert!(held.is_some() && held == e.session, "event {}: node {} moved by a non-holder", e.seq, e.node);
            }
            _ => assert!(held.is_none(), "event {}: {} on node {} held by {held:?}", e.seq, e.cause, e.node),
        }
    }
    holder
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[should_panic(expected = "given to s2 while held by")]
    fn the_replay_catches_a_node_given_twice() {
        let ev = |seq, cause, session: &str| Event {
            seq,
            node: NodeId(1),
            from: NodeState::Ready,
            to: NodeState::Contextualizing,
            cause,
            detail: None,
            actor: Actor::Operator,
            session: Some(SessionId(session.into())),
            at: T0,
        };
        replay(&[ev(1, CauseKind::Allocated, "s1"), ev(2, CauseKind::Allocated, "s2")]);
    }
}
