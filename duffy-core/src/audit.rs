//! Whole-farm audits of a store: the invariants that must hold between
//! node and session rows, and a replay of the event log. Used by the
//! conformance suite and the model tests (re-exported from
//! `testkit::conformance`), and by `duffy store copy` to check a copied
//! farm before it is used, so they are part of the library, not only of
//! its test kit.

use std::collections::{HashMap, HashSet};

use crate::model::{Node, NodeId, SessionId, SessionState};
use crate::state::{CauseKind, NodeState};
use crate::store::{EventQuery, Store};

/// Checks the farm-wide invariants on a store's current state.
///
/// Membership is read from both sides and must agree both ways, so a store
/// that writes a session over a node another session holds, or drops one
/// row of a batch, is caught whichever row it got wrong:
///
/// - `nodes()` lists each node once, in id order, hostnames unique;
///   `live_sessions()` lists each session once, and only live ones;
/// - from the session rows: no node is listed by two live sessions (nor
///   twice by one); every node a live session lists exists, names that
///   session as its holder, and is in the state matching the session's
///   (Allocating: Contextualizing, Prod: Deployed, Fail: Failed);
/// - from the node rows: a node names a session only in Contextualizing,
///   Deployed or Failed, and then that session is live and lists it;
///   Contextualizing and Deployed nodes always name one; so every
///   Contextualizing or Deployed node is listed by exactly one live
///   session; Ready nodes carry an image;
/// - no project's live sessions hold more nodes than its quota.
pub async fn check_invariants(store: &dyn Store) -> Result<(), String> {
    let nodes = store.nodes().await.map_err(|e| e.to_string())?;
    let live = store.live_sessions().await.map_err(|e| e.to_string())?;
    for w in nodes.windows(2) {
        if w[0].id >= w[1].id {
            return Err(format!("nodes() lists node {} after node {}: not once each in id order", w[1].id, w[0].id));
        }
    }
    let mut hostnames: HashSet<&str> = HashSet::new();
    if let Some(n) = nodes.iter().find(|n| !hostnames.insert(n.hostname.as_str())) {
        return Err(format!("hostname {} is on two nodes", n.hostname));
    }
    let by_id: HashMap<NodeId, &Node> = nodes.iter().map(|n| (n.id, n)).collect();

    // Membership as the session rows state it.
    let mut sessions: HashSet<&SessionId> = HashSet::new();
    let mut listed_by: HashMap<NodeId, &SessionId> = HashMap::new();
    let mut per_project: HashMap<&str, u32> = HashMap::new();
    for s in &live {
        if !sessions.insert(&s.id) {
            return Err(format!("live_sessions() lists session {} twice", s.id));
        }
        let want = match s.state {
            SessionState::Allocating => NodeState::Contextualizing,
            SessionState::Prod => NodeState::Deployed,
            SessionState::Fail => NodeState::Failed,
            other => return Err(format!("live_sessions() lists session {}, which is {}", s.id, other.as_str())),
        };
        if s.nodes.is_empty() {
            return Err(format!("live session {} lists no node", s.id));
        }
        for id in &s.nodes {
            if let Some(other) = listed_by.insert(*id, &s.id) {
                return Err(if *other == s.id {
                    format!("live session {} lists node {id} twice", s.id)
                } else {
                    format!("node {id} is listed by two live sessions, {other} and {}", s.id)
                });
            }
            let n = by_id
                .get(id)
                .ok_or_else(|| format!("live session {} lists node {id}, which is not in the store", s.id))?;
            if n.session.as_ref() != Some(&s.id) {
                let holder = n.session.as_ref().map_or_else(|| "no session".to_string(), |h| format!("session {h}"));
                return Err(format!(
                    "live session {} ({}) lists node {}, which names {holder} as its holder",
                    s.id,
                    s.state.as_str(),
                    n.hostname
                ));
            }
            if n.state != want {
                return Err(format!(
                    "node {} is {} but its session {} is {}",
                    n.hostname,
                    n.state,
                    s.id,
                    s.state.as_str()
                ));
            }
            *per_project.entry(s.project.as_str()).or_default() += 1;
        }
    }

    // And as the node rows state it: the same, the other way round.
    for n in &nodes {
        match (&n.session, n.state) {
            (Some(sid), NodeState::Contextualizing | NodeState::Deployed | NodeState::Failed)
                if listed_by.get(&n.id) != Some(&sid) =>
            {
                return Err(if sessions.contains(sid) {
                    format!("node {} names session {sid} as its holder, which does not list it", n.hostname)
                } else {
                    format!("node {} names session {sid} as its holder, which is not live", n.hostname)
                });
            }
            (Some(_), NodeState::Contextualizing | NodeState::Deployed | NodeState::Failed) => {}
            (Some(sid), st) => {
                return Err(format!("node {} is {st} yet names session {sid} as its holder", n.hostname));
            }
            (None, NodeState::Contextualizing | NodeState::Deployed) => {
                return Err(format!("node {} is {} without a session", n.hostname, n.state));
            }
            (None, NodeState::Ready) if n.image.is_none() => {
                return Err(format!("node {} is Ready without an image", n.hostname));
            }
            _ => {}
        }
    }
    for (project, held) in per_project {
        if let Some(q) = store.project(project).await.map_err(|e| e.to_string())?.and_then(|p| p.quota) {
            if held > q {
                return Err(format!("project {project} holds {held} nodes, over its quota of {q}"));
            }
        }
    }
    Ok(())
}

/// Replays every node's history: it starts with `Added`, each event leaves
/// the state the next one starts from, every step is in the transition
/// table, and the last one ends in the node's current state; every node
/// with a history is still in the store; and each node's own history (the
/// log filtered by node) is exactly its events in the whole log (for at
/// most 256 nodes, spread over the farm). A node can
/// never have been in two places at once, nor quietly disappear.
pub async fn check_history(store: &dyn Store) -> Result<(), String> {
    let nodes = store.nodes().await.map_err(|e| e.to_string())?;
    let events = store.events(EventQuery::default()).await.map_err(|e| e.to_string())?;
    let mut last: HashMap<NodeId, NodeState> = HashMap::new();
    let mut prev_seq = 0;
    for e in &events {
        if e.seq <= prev_seq {
            return Err(format!("event seq {} after {prev_seq}", e.seq));
        }
        prev_seq = e.seq;
        match (last.get(&e.node), e.cause) {
            (None, CauseKind::Added) => {}
            (None, c) => return Err(format!("node {} history starts with {c}", e.node)),
            (Some(_), CauseKind::Added) => return Err(format!("node {} added twice", e.node)),
            (Some(&s), c) => {
                if s != e.from {
                    return Err(format!("node {} event {} starts from {} but the node was {s}", e.node, e.seq, e.from));
                }
                if crate::state::target(e.from, c) != Some(e.to) {
                    return Err(format!(
                        "node {} event {} is not in the table: {} --{c}--> {}",
                        e.node, e.seq, e.from, e.to
                    ));
                }
            }
        }
        last.insert(e.node, e.to);
    }
    // Every node with a history is still in the store: a store that lost
    // a row (or never wrote one it acknowledged) shows up here.
    let present: HashSet<NodeId> = nodes.iter().map(|n| n.id).collect();
    if let Some(id) = last.keys().filter(|id| !present.contains(id)).min() {
        return Err(format!("node {id} has a history but is not in the store"));
    }
    for n in &nodes {
        match last.get(&n.id) {
            Some(&s) if s == n.state => {}
            other => return Err(format!("node {} is {} but its history ends in {other:?}", n.hostname, n.state)),
        }
    }
    // Each node's own history is exactly its events in the log, in order
    // (a store may keep it apart from the log, as a chain or an index).
    // One read per node: every node of a farm of up to 256, else 256 spread
    // evenly over it, so that a test writing tens of thousands of nodes
    // stays fast.
    let step = nodes.len().div_ceil(256).max(1);
    for n in nodes.iter().step_by(step) {
        let mut own =
            store.events(EventQuery { node: Some(n.id), ..EventQuery::default() }).await.map_err(|e| e.to_string())?;
        // Events written after the log was read (a live farm) are not
        // part of this check.
        own.retain(|e| e.seq <= prev_seq);
        let want: Vec<_> = events.iter().filter(|e| e.node == n.id).cloned().collect();
        if own != want {
            return Err(format!(
                "node {}'s history has {} events ({:?}), the log {} ({:?})",
                n.hostname,
                own.len(),
                own.iter().map(|e| e.seq).collect::<Vec<_>>(),
                want.len(),
                want.iter().map(|e| e.seq).collect::<Vec<_>>()
            ));
        }
    }
    Ok(())
}
