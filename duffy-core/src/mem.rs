//! [`MemStore`]: the in-memory [`Store`], a backend in its own right (as
//! `object_store`'s `InMemory` is), not a test double.
//!
//! One mutex guards the whole state, with the same indexes the durable
//! stores keep (Ready nodes by pool and use, nodes by state, live sessions
//! by age), so every call is atomic and as cheap as a map lookup, and
//! everything is gone when the store is dropped. It suits an engine that
//! needs no durability: a simulation, a scheduler's own tests, a
//! benchmark of the engine alone. It is held to the same conformance suite
//! as the durable stores.
//!
//! It is always compiled: it needs nothing the core does not already need
//! (no I/O, no runtime, no other crate), so a feature would only hide it,
//! and code that does not use it costs nothing in a binary.

mod tickets;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;

use crate::model::{
    Actor, ApiKeyHash, ApiKeyRecord, Hardware, KeyId, NewNode, Node, NodeId, PoolKey, PoolTarget, Project, Session,
    SessionId, SessionState,
};
use crate::state::{Event, NodeState};
use crate::store::{
    Batch, ClaimRefusal, ClaimRequest, Claimed, CommitError, EventQuery, Guard, NodeCount, NodeGroup, Store,
    StoreError, claim_writes,
};
use crate::time::Timestamp;

#[derive(Debug, Default)]
struct State {
    nodes: BTreeMap<NodeId, Node>,
    by_hostname: HashMap<String, NodeId>,
    /// Ready nodes by (pool, used_count, id): the claim index.
    ready: BTreeSet<(PoolKey, u64, NodeId)>,
    /// Node ids by state.
    by_state: HashMap<NodeState, BTreeSet<NodeId>>,
    /// Ready nodes with an install time by (installed_at, id): the stale
    /// index.
    ready_by_install: BTreeSet<(Timestamp, NodeId)>,
    sessions: HashMap<SessionId, Session>,
    /// Live sessions by (created_at, id).
    live: BTreeSet<(Timestamp, SessionId)>,
    /// Prod sessions by (expires_at, id): the expiry index.
    expiring: BTreeSet<(Timestamp, SessionId)>,
    /// Session creation times per key, for the rate limit.
    key_sessions: HashMap<KeyId, Vec<Timestamp>>,
    events: Vec<Event>,
    projects: BTreeMap<String, Project>,
    keys: HashMap<ApiKeyHash, ApiKeyRecord>,
    /// Key hashes by id, in id order (listing, revocation).
    key_ids: BTreeMap<KeyId, ApiKeyHash>,
    targets: BTreeMap<PoolKey, u32>,
    paused: bool,
    /// The newest leadership epoch handed out (0: none yet).
    leader_epoch: u64,
    next_node: u64,
    next_key: u64,
}

impl State {
    fn put_node(&mut self, n: Node) -> Option<Node> {
        let old = self.nodes.insert(n.id, n.clone());
        if let Some(o) = &old {
            if let (NodeState::Ready, Some(p)) = (o.state, &o.image) {
                self.ready.remove(&(p.clone(), o.used_count, o.id));
            }
            if let (NodeState::Ready, Some(t)) = (o.state, o.installed_at) {
                self.ready_by_install.remove(&(t, o.id));
            }
            if let Some(ids) = self.by_state.get_mut(&o.state) {
                ids.remove(&o.id);
            }
        }
        if let (NodeState::Ready, Some(p)) = (n.state, &n.image) {
            self.ready.insert((p.clone(), n.used_count, n.id));
        }
        if let (NodeState::Ready, Some(t)) = (n.state, n.installed_at) {
            self.ready_by_install.insert((t, n.id));
        }
        self.by_state.entry(n.state).or_default().insert(n.id);
        old
    }

    fn put_session(&mut self, s: Session) -> Option<Session> {
        let old = self.sessions.insert(s.id.clone(), s.clone());
        if let Some(o) = &old {
            self.live.remove(&(o.created_at, o.id.clone()));
            if let Some(t) = o.expires_at {
                self.expiring.remove(&(t, o.id.clone()));
            }
        }
        if s.state.is_live() {
            self.live.insert((s.created_at, s.id.clone()));
        }
        if let (SessionState::Prod, Some(t)) = (s.state, s.expires_at) {
            self.expiring.insert((t, s.id.clone()));
        }
        if old.is_none() {
            self.key_sessions.entry(s.key_id).or_default().push(s.created_at);
        }
        old
    }

    fn remove_session(&mut self, id: &SessionId) {
        if let Some(s) = self.sessions.remove(id) {
            self.live.remove(&(s.created_at, s.id.clone()));
            if let Some(t) = s.expires_at {
                self.expiring.remove(&(t, s.id.clone()));
            }
            if let Some(v) = self.key_sessions.get_mut(&s.key_id) {
                if let Some(pos) = v.iter().rposition(|t| *t == s.created_at) {
                    v.remove(pos);
                }
            }
        }
    }

    fn held_by_project(&self, project: &str) -> u32 {
        self.live
            .iter()
            .filter_map(|(_, id)| self.sessions.get(id))
            .filter(|s| s.project == project)
            .map(|s| {
                s.nodes.iter().filter(|n| self.nodes.get(n).and_then(|n| n.session.as_ref()) == Some(&s.id)).count()
                    as u32
            })
            .sum()
    }

    fn failed_held_by_project(&self, project: &str) -> u64 {
        self.live
            .iter()
            .filter_map(|(_, id)| self.sessions.get(id))
            .filter(|s| s.project == project && s.state == SessionState::Fail)
            .map(|s| {
                s.nodes
                    .iter()
                    .filter_map(|n| self.nodes.get(n))
                    .filter(|n| n.state == NodeState::Failed && n.session.as_ref() == Some(&s.id))
                    .count() as u64
            })
            .sum()
    }

    fn push_event(&mut self, mut e: Event) {
        e.seq = self.events.len() as u64 + 1;
        self.events.push(e);
    }

    fn commit(&mut self, batch: Batch) -> Result<(), CommitError> {
        // Check every expectation first: nothing is written unless all hold.
        for w in &batch.nodes {
            match self.nodes.get(&w.node.id) {
                Some(n) if n.version == w.expected_version && w.node.version == w.expected_version + 1 => {}
                _ => return Err(CommitError::Conflict(format!("node {}", w.node.id))),
            }
        }
        let mut seen = std::collections::HashSet::new();
        if !batch.nodes.iter().all(|w| seen.insert(w.node.id)) {
            return Err(CommitError::Store(StoreError::Invalid("a batch writes the same node twice".into())));
        }
        for w in &batch.sessions {
            let cur = self.sessions.get(&w.session.id).map(|s| s.version);
            if cur != w.expected_version {
                return Err(CommitError::Conflict(format!("session {}", w.session.id)));
            }
        }
        // Apply, remembering how to undo if a guard fails.
        let events_before = self.events.len();
        let mut old_nodes = Vec::new();
        let mut old_sessions = Vec::new();
        for w in batch.nodes {
            self.push_event(w.event);
            old_nodes.push(self.put_node(w.node));
        }
        for w in batch.sessions {
            let id = w.session.id.clone();
            old_sessions.push((id, self.put_session(w.session)));
        }
        for g in &batch.guards {
            let Guard::ProjectFailedNodesAtMost { project, max } = g;
            let actual = self.failed_held_by_project(project);
            if actual > u64::from(*max) {
                for n in old_nodes.into_iter().flatten() {
                    self.put_node(n);
                }
                for (id, s) in old_sessions {
                    match s {
                        Some(s) => {
                            self.put_session(s);
                        }
                        None => self.remove_session(&id),
                    }
                }
                self.events.truncate(events_before);
                return Err(CommitError::GuardFailed { guard: g.clone(), actual });
            }
        }
        Ok(())
    }
}

/// An in-memory [`Store`]: fast, exact, and gone when dropped. Used by the
/// simulation tests, the property tests and embedders' own tests; it is
/// held to the same conformance suite as the durable stores.
#[derive(Debug, Default)]
pub struct MemStore {
    state: Mutex<State>,
    /// Calls of `api_key_by_hash`: tests check that the engine's key
    /// caches spare the store.
    key_lookups: std::sync::atomic::AtomicU64,
    /// The PXE installer's tickets (`InstallTickets`), apart from the
    /// farm's state.
    tickets: Mutex<tickets::Tickets>,
}

impl MemStore {
    /// An empty store.
    pub fn new() -> Self {
        MemStore::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many times a key has been looked up by hash
    /// ([`Store::api_key_by_hash`]) since the store was made.
    pub fn key_lookups(&self) -> u64 {
        self.key_lookups.load(std::sync::atomic::Ordering::Relaxed)
    }
}

#[async_trait]
impl Store for MemStore {
    async fn add_nodes(&self, nodes: Vec<NewNode>, actor: Actor, now: Timestamp) -> Result<Vec<Node>, StoreError> {
        let mut s = self.lock();
        let mut names = std::collections::HashSet::new();
        for n in &nodes {
            n.validate().map_err(|e| StoreError::Invalid(e.to_string()))?;
            if s.by_hostname.contains_key(&n.hostname) || !names.insert(n.hostname.clone()) {
                return Err(StoreError::Duplicate(format!("node {}", n.hostname)));
            }
        }
        let mut out = Vec::with_capacity(nodes.len());
        for n in nodes {
            s.next_node += 1;
            let node = n.into_node(NodeId(s.next_node), now);
            s.by_hostname.insert(node.hostname.clone(), node.id);
            s.push_event(Event::added(&node, actor.clone()));
            s.put_node(node.clone());
            out.push(node);
        }
        Ok(out)
    }

    async fn node(&self, id: NodeId) -> Result<Option<Node>, StoreError> {
        Ok(self.lock().nodes.get(&id).cloned())
    }

    async fn node_by_hostname(&self, hostname: &str) -> Result<Option<Node>, StoreError> {
        let s = self.lock();
        Ok(s.by_hostname.get(hostname).and_then(|id| s.nodes.get(id)).cloned())
    }

    async fn nodes(&self) -> Result<Vec<Node>, StoreError> {
        Ok(self.lock().nodes.values().cloned().collect())
    }

    async fn ready_counts(&self) -> Result<Vec<(PoolKey, u32)>, StoreError> {
        let s = self.lock();
        let mut m: BTreeMap<PoolKey, u32> = BTreeMap::new();
        for (p, _, _) in &s.ready {
            *m.entry(p.clone()).or_default() += 1;
        }
        Ok(m.into_iter().collect())
    }

    async fn nodes_in_states(&self, states: &[NodeState]) -> Result<Vec<Node>, StoreError> {
        let s = self.lock();
        let mut out: Vec<Node> = Vec::new();
        for state in states.iter().collect::<BTreeSet<_>>() {
            if let Some(ids) = s.by_state.get(state) {
                out.extend(ids.iter().filter_map(|id| s.nodes.get(id).cloned()));
            }
        }
        out.sort_by_key(|n| n.id);
        Ok(out)
    }

    async fn stale_ready(&self, installed_before: Timestamp, limit: usize) -> Result<Vec<Node>, StoreError> {
        let s = self.lock();
        Ok(s.ready_by_install
            .range(..=(installed_before, NodeId(u64::MAX)))
            .take(limit)
            .filter_map(|(_, id)| s.nodes.get(id).cloned())
            .collect())
    }

    async fn idle_nodes(&self, hardware: &Hardware, limit: usize) -> Result<Vec<Node>, StoreError> {
        let s = self.lock();
        let mut idle: Vec<&Node> = s
            .by_state
            .get(&NodeState::Active)
            .map(|ids| ids.iter().filter_map(|id| s.nodes.get(id)).filter(|n| Hardware::of(n) == *hardware).collect())
            .unwrap_or_default();
        idle.sort_by_key(|n| (n.used_count, n.id));
        Ok(idle.into_iter().take(limit).cloned().collect())
    }

    async fn nodes_after(&self, after: NodeId, limit: usize) -> Result<Vec<Node>, StoreError> {
        let s = self.lock();
        Ok(s.nodes
            .range((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded))
            .take(limit)
            .map(|(_, n)| n.clone())
            .collect())
    }

    async fn session(&self, id: &SessionId) -> Result<Option<Session>, StoreError> {
        Ok(self.lock().sessions.get(id).cloned())
    }

    async fn live_sessions(&self) -> Result<Vec<Session>, StoreError> {
        let s = self.lock();
        Ok(s.live.iter().filter_map(|(_, id)| s.sessions.get(id).cloned()).collect())
    }

    async fn expired_sessions(&self, now: Timestamp, limit: usize) -> Result<Vec<Session>, StoreError> {
        let s = self.lock();
        Ok(s.expiring
            .iter()
            .take_while(|(t, _)| *t <= now)
            .take(limit)
            .filter_map(|(_, id)| s.sessions.get(id).cloned())
            .collect())
    }

    async fn claim(&self, req: ClaimRequest) -> Result<Result<Claimed, ClaimRefusal>, StoreError> {
        if req.count == 0 {
            return Err(StoreError::Invalid("a claim needs a count of at least 1".into()));
        }
        let mut s = self.lock();
        if s.sessions.contains_key(&req.session) {
            return Err(StoreError::Duplicate(format!("session {}", req.session)));
        }
        if req.check_target {
            match s.targets.get(&req.pool) {
                Some(&standby) if standby > 0 => {
                    if req.count > standby {
                        return Ok(Err(ClaimRefusal::OverCapacity { requested: req.count, standby }));
                    }
                }
                _ => {
                    let available = s.targets.iter().filter(|(_, n)| **n > 0).map(|(p, _)| p.clone()).collect();
                    return Ok(Err(ClaimRefusal::NoSuchPool { available }));
                }
            }
        }
        if s.paused {
            return Ok(Err(ClaimRefusal::Paused));
        }
        if let Some(limit) = req.rate_limit {
            let since = req.now.minus(limit.window);
            let recent =
                s.key_sessions.get(&req.key_id).map(|v| v.iter().filter(|t| **t > since).count()).unwrap_or(0) as u32;
            if recent >= limit.max {
                return Ok(Err(ClaimRefusal::RateLimited { recent, limit }));
            }
        }
        if let Some(quota) = s.projects.get(&req.project).and_then(|p| p.quota).or(req.default_quota) {
            let held = s.held_by_project(&req.project);
            if held + req.count > quota {
                return Ok(Err(ClaimRefusal::QuotaExceeded { held, requested: req.count, quota }));
            }
        }
        let lo = (req.pool.clone(), 0, NodeId(0));
        let chosen: Vec<Node> = s
            .ready
            .range(lo..)
            .take_while(|(p, _, _)| *p == req.pool)
            .take(req.count as usize)
            .filter_map(|(_, _, id)| s.nodes.get(id).cloned())
            .collect();
        if chosen.len() < req.count as usize {
            let available =
                s.ready.range((req.pool.clone(), 0, NodeId(0))..).take_while(|(p, _, _)| *p == req.pool).count();
            return Ok(Err(ClaimRefusal::InsufficientNodes { requested: req.count, available: available as u32 }));
        }
        let (session, writes) = claim_writes(&req, &chosen).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let nodes = writes.iter().map(|w| w.node.clone()).collect();
        let batch = Batch {
            nodes: writes,
            sessions: vec![crate::store::SessionWrite { expected_version: None, session: session.clone() }],
            guards: Vec::new(),
        };
        s.commit(batch).map_err(|e| StoreError::Corrupt(format!("claim could not apply its own writes: {e}")))?;
        Ok(Ok(Claimed { session, nodes }))
    }

    async fn commit(&self, batch: Batch) -> Result<(), CommitError> {
        self.lock().commit(batch)
    }

    async fn events(&self, q: EventQuery) -> Result<Vec<Event>, StoreError> {
        let s = self.lock();
        let it = s.events.iter().skip(q.after_seq as usize).filter(|e| q.node.is_none_or(|n| e.node == n)).cloned();
        Ok(if q.limit == 0 { it.collect() } else { it.take(q.limit).collect() })
    }

    async fn latest_events(&self, node: Option<NodeId>, limit: usize) -> Result<Vec<Event>, StoreError> {
        let s = self.lock();
        Ok(s.events.iter().rev().filter(|e| node.is_none_or(|n| e.node == n)).take(limit).cloned().collect())
    }

    async fn node_counts(&self) -> Result<Vec<NodeCount>, StoreError> {
        let s = self.lock();
        let mut counts: BTreeMap<NodeGroup, u32> = BTreeMap::new();
        for n in s.nodes.values() {
            *counts.entry(NodeGroup::of(n)).or_default() += 1;
        }
        Ok(counts.into_iter().map(|(group, count)| NodeCount { group, count }).collect())
    }

    async fn upsert_project(&self, project: Project) -> Result<(), StoreError> {
        crate::model::validate_token("project name", &project.name, 64)
            .map_err(|e| StoreError::Invalid(e.to_string()))?;
        self.lock().projects.insert(project.name.clone(), project);
        Ok(())
    }

    async fn project(&self, name: &str) -> Result<Option<Project>, StoreError> {
        Ok(self.lock().projects.get(name).cloned())
    }

    async fn projects(&self) -> Result<Vec<Project>, StoreError> {
        // A BTreeMap by name: in byte order already.
        Ok(self.lock().projects.values().cloned().collect())
    }

    async fn add_api_key(
        &self,
        project: &str,
        hash: ApiKeyHash,
        admin: bool,
        now: Timestamp,
        expires_at: Option<Timestamp>,
    ) -> Result<ApiKeyRecord, StoreError> {
        let mut s = self.lock();
        if !s.projects.contains_key(project) {
            return Err(StoreError::NotFound(format!("project {project}")));
        }
        if s.keys.contains_key(&hash) {
            return Err(StoreError::Duplicate("API key".into()));
        }
        s.next_key += 1;
        let rec = ApiKeyRecord {
            id: KeyId(s.next_key),
            project: project.to_string(),
            hash,
            admin,
            created_at: now,
            expires_at,
            revoked_at: None,
            last_used: None,
        };
        s.keys.insert(hash, rec.clone());
        s.key_ids.insert(rec.id, hash);
        Ok(rec)
    }

    async fn api_key_by_hash(&self, hash: &ApiKeyHash) -> Result<Option<ApiKeyRecord>, StoreError> {
        self.key_lookups.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(self.lock().keys.get(hash).cloned())
    }

    async fn api_keys(&self, project: Option<&str>) -> Result<Vec<ApiKeyRecord>, StoreError> {
        let s = self.lock();
        Ok(s.key_ids
            .values()
            .filter_map(|h| s.keys.get(h))
            .filter(|k| project.is_none_or(|p| k.project == p))
            .cloned()
            .collect())
    }

    async fn revoke_api_key(&self, id: KeyId, now: Timestamp) -> Result<ApiKeyRecord, StoreError> {
        let mut s = self.lock();
        let hash = *s.key_ids.get(&id).ok_or_else(|| StoreError::NotFound(format!("API key {id}")))?;
        let rec = s.keys.get_mut(&hash).ok_or_else(|| StoreError::Corrupt(format!("API key {id} has no row")))?;
        rec.revoked_at.get_or_insert(now);
        Ok(rec.clone())
    }

    async fn record_key_use(&self, used: Vec<(KeyId, Timestamp)>) -> Result<(), StoreError> {
        let mut s = self.lock();
        for (id, at) in used {
            let Some(hash) = s.key_ids.get(&id).copied() else { continue };
            if let Some(rec) = s.keys.get_mut(&hash) {
                rec.last_used = rec.last_used.max(Some(at));
            }
        }
        Ok(())
    }

    async fn set_pool_target(&self, target: PoolTarget) -> Result<(), StoreError> {
        target.pool.validate().map_err(|e| StoreError::Invalid(e.to_string()))?;
        self.lock().targets.insert(target.pool, target.standby);
        Ok(())
    }

    async fn pool_targets(&self) -> Result<Vec<PoolTarget>, StoreError> {
        Ok(self.lock().targets.iter().map(|(p, n)| PoolTarget { pool: p.clone(), standby: *n }).collect())
    }

    async fn paused(&self) -> Result<bool, StoreError> {
        Ok(self.lock().paused)
    }

    async fn set_paused(&self, paused: bool) -> Result<bool, StoreError> {
        Ok(std::mem::replace(&mut self.lock().paused, paused))
    }

    async fn new_leader_epoch(&self) -> Result<u64, StoreError> {
        let mut s = self.lock();
        s.leader_epoch += 1;
        Ok(s.leader_epoch)
    }

    async fn commit_fenced(&self, batch: Batch, epoch: u64) -> Result<(), CommitError> {
        let mut s = self.lock();
        if epoch != s.leader_epoch {
            return Err(CommitError::Store(StoreError::Fenced { epoch, current: s.leader_epoch }));
        }
        s.commit(batch)
    }

    fn install_tickets(self: std::sync::Arc<Self>) -> Option<std::sync::Arc<dyn crate::tickets::InstallTickets>> {
        Some(self)
    }
}
