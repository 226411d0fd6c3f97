//! The wait queue: session requests that asked to wait when their pool was
//! short, served as nodes become Ready.
//!
//! Fair share across projects: projects take turns (round robin, a project
//! that was just served goes to the back of the turn order), and within
//! one project requests are served first come, first served (only a
//! project's oldest request is ever considered). A project whose oldest
//! request would exceed its quota is passed over without holding anyone
//! up. A project whose turn it is but whose pool has too few Ready nodes
//! holds that pool: nobody behind it in the turn order takes the pool's
//! nodes, so a request for many nodes is not starved by a stream of small
//! ones. Between them these rules give the guarantee the property test
//! checks: while a request is its project's oldest and within quota,
//! every other project is served at most once from the same pool before
//! it.
//!
//! The queue is a plain data structure: [`WaitQueue::select`] only
//! decides. The engine ([`Engine::create_session`](crate::Engine::create_session))
//! claims the nodes through the store, which stays the authority on
//! quotas and on which nodes are Ready; a request whose claim then loses
//! a race goes back to the head of its project's line.
//!
//! The queue lives in memory and does not survive a restart (see
//! ARCHITECTURE.md, "The wait queue"): a waiting request is only worth
//! serving while its client is still polling for it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::time::Duration;

use crate::model::{KeyId, PoolKey};
use crate::time::Timestamp;

/// The id of a waiting request (a UUID, like session ids).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct RequestId(pub String);

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A session request waiting for nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedRequest {
    /// Its id, for status and cancellation.
    pub id: RequestId,
    /// The project it is for (the unit of fair share and quotas).
    pub project: String,
    /// The key that made it: only this key may see or cancel it, and the
    /// session it becomes belongs to it.
    pub key_id: KeyId,
    /// The pool asked for.
    pub pool: PoolKey,
    /// How many nodes.
    pub count: u32,
    /// The session's lifetime once served (`None`: the policy's lease).
    pub lifetime: Option<Duration>,
    /// When it was queued.
    pub enqueued_at: Timestamp,
    /// When its owner last asked about it (a request nobody asks about
    /// any more is dropped: its client is gone).
    pub last_seen: Timestamp,
    /// Arrival order over the whole queue.
    pub seq: u64,
}

/// Why a request could not be queued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueueFull {
    /// The whole queue is at its capacity.
    #[error("the wait queue is full ({capacity} requests); try again later")]
    Service {
        /// The policy's `queue_capacity`.
        capacity: usize,
    },
    /// The project already has its most requests waiting.
    #[error("project {project:?} already has {max} requests waiting; cancel one or wait for them to be served")]
    Project {
        /// The project.
        project: String,
        /// The policy's `queue_per_project`.
        max: usize,
    },
}

/// The waiting requests, per project, and the projects' turn order.
#[derive(Debug, Default, Clone)]
pub struct WaitQueue {
    /// Each project's waiting requests, oldest first.
    lines: HashMap<String, VecDeque<QueuedRequest>>,
    /// Projects with waiting requests, whose turn comes first first.
    turns: VecDeque<String>,
    /// Where each waiting request is: its project.
    index: HashMap<RequestId, String>,
    next_seq: u64,
}

impl WaitQueue {
    /// An empty queue.
    pub fn new() -> Self {
        WaitQueue::default()
    }

    /// How many requests are waiting.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether no request is waiting.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Queues `req` at the end of its project's line (a project with no
    /// request waiting takes its turn after every waiting project). Its
    /// `seq` is assigned here. Refused, changing nothing, when the queue
    /// or the project's line is full.
    pub fn push(&mut self, mut req: QueuedRequest, capacity: usize, per_project: usize) -> Result<(), QueueFull> {
        if self.len() >= capacity {
            return Err(QueueFull::Service { capacity });
        }
        let line_len = self.lines.get(&req.project).map_or(0, VecDeque::len);
        if line_len >= per_project {
            return Err(QueueFull::Project { project: req.project.clone(), max: per_project });
        }
        req.seq = self.next_seq;
        self.next_seq += 1;
        if line_len == 0 {
            self.turns.push_back(req.project.clone());
        }
        self.index.insert(req.id.clone(), req.project.clone());
        self.lines.entry(req.project.clone()).or_default().push_back(req);
        Ok(())
    }

    /// Puts a request taken by [`WaitQueue::select`] back at the head of
    /// its project's line (its claim lost a race). Its project keeps its
    /// place in the turn order if it still has one, else takes the first
    /// turn: it was its turn a moment ago.
    pub fn put_back(&mut self, req: QueuedRequest) {
        let project = req.project.clone();
        self.index.insert(req.id.clone(), project.clone());
        let line = self.lines.entry(project.clone()).or_default();
        line.push_front(req);
        if line.len() == 1 {
            self.turns.push_front(project);
        }
    }

    /// The waiting request `id`.
    pub fn get(&self, id: &RequestId) -> Option<&QueuedRequest> {
        let project = self.index.get(id)?;
        self.lines.get(project)?.iter().find(|r| &r.id == id)
    }

    /// Records that the request's owner asked about it at `now`.
    pub fn touch(&mut self, id: &RequestId, now: Timestamp) {
        if let Some(project) = self.index.get(id) {
            if let Some(r) = self.lines.get_mut(project).and_then(|l| l.iter_mut().find(|r| &r.id == id)) {
                r.last_seen = now;
            }
        }
    }

    /// Removes the waiting request `id` (cancelled, or dropped).
    pub fn remove(&mut self, id: &RequestId) -> Option<QueuedRequest> {
        let project = self.index.remove(id)?;
        let line = self.lines.get_mut(&project)?;
        let pos = line.iter().position(|r| &r.id == id)?;
        let req = line.remove(pos);
        if line.is_empty() {
            self.lines.remove(&project);
            self.turns.retain(|p| p != &project);
        }
        req
    }

    /// Removes and returns every request for which `drop` is true (gone
    /// clients, requests past their longest wait).
    pub fn remove_where(&mut self, mut drop: impl FnMut(&QueuedRequest) -> bool) -> Vec<QueuedRequest> {
        let ids: Vec<RequestId> = self.lines.values().flatten().filter(|r| drop(r)).map(|r| r.id.clone()).collect();
        ids.iter().filter_map(|id| self.remove(id)).collect()
    }

    /// Every waiting request in the order they would be served if every
    /// pool had nodes enough: round robin over the projects in turn
    /// order, each project's requests oldest first.
    pub fn serve_order(&self) -> Vec<&QueuedRequest> {
        let mut out = Vec::with_capacity(self.len());
        let lines: Vec<&VecDeque<QueuedRequest>> = self.turns.iter().filter_map(|p| self.lines.get(p)).collect();
        let longest = lines.iter().map(|l| l.len()).max().unwrap_or(0);
        for i in 0..longest {
            out.extend(lines.iter().filter_map(|l| l.get(i)));
        }
        out
    }

    /// Every waiting request, in arrival order.
    pub fn arrivals(&self) -> Vec<&QueuedRequest> {
        let mut all: Vec<&QueuedRequest> = self.lines.values().flatten().collect();
        all.sort_by_key(|r| r.seq);
        all
    }

    /// The request's place among the requests for its pool, in serve
    /// order (1: next), and the nodes the requests before it ask for.
    pub fn position(&self, id: &RequestId) -> Option<(usize, u32)> {
        let me = self.get(id)?;
        let mut ahead = 0u32;
        for (i, r) in self.serve_order().into_iter().filter(|r| r.pool == me.pool).enumerate() {
            if &r.id == id {
                return Some((i + 1, ahead));
            }
            ahead = ahead.saturating_add(r.count);
        }
        None
    }

    /// Decides which requests to serve now and takes them out of the
    /// queue, in the order to serve them.
    ///
    /// `ready`: the Ready nodes per pool. `room`: how many more nodes a
    /// project may hold under its quota (`None`: no quota). Projects are
    /// visited in turn order and only a project's oldest request is
    /// considered: if its project has no room for it, it is passed over;
    /// if its pool has too few Ready nodes, the pool is held for it
    /// (nobody later in the turn order is served from that pool); else it
    /// is served, and its project goes to the back of the turn order.
    pub fn select(
        &mut self,
        ready: &BTreeMap<PoolKey, u32>,
        mut room: impl FnMut(&str) -> Option<u32>,
    ) -> Vec<QueuedRequest> {
        let mut ready = ready.clone();
        let mut rooms: HashMap<String, Option<u32>> = HashMap::new();
        let mut held: Vec<PoolKey> = Vec::new();
        let mut out = Vec::new();
        'turns: loop {
            for i in 0..self.turns.len() {
                let project = self.turns[i].clone();
                let Some(head) = self.lines.get(&project).and_then(|l| l.front()) else { continue };
                let left = *rooms.entry(project.clone()).or_insert_with(|| room(&project));
                if left.is_some_and(|l| l < head.count) {
                    continue;
                }
                if held.contains(&head.pool) {
                    continue;
                }
                let have = ready.get(&head.pool).copied().unwrap_or(0);
                if have < head.count {
                    held.push(head.pool.clone());
                    continue;
                }
                let (pool, count, id) = (head.pool.clone(), head.count, head.id.clone());
                ready.insert(pool, have - count);
                rooms.insert(project.clone(), left.map(|l| l - count));
                if let Some(req) = self.remove(&id) {
                    // Served: the project's next turn comes after everyone
                    // else's.
                    if self.lines.contains_key(&project) {
                        self.turns.retain(|p| p != &project);
                        self.turns.push_back(project);
                    }
                    out.push(req);
                }
                continue 'turns;
            }
            break;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Arch;

    fn req(id: &str, project: &str, pool: &PoolKey, count: u32) -> QueuedRequest {
        QueuedRequest {
            id: RequestId(id.into()),
            project: project.into(),
            key_id: KeyId(1),
            pool: pool.clone(),
            count,
            lifetime: None,
            enqueued_at: Timestamp(0),
            last_seen: Timestamp(0),
            seq: 0,
        }
    }

    fn ids(v: &[QueuedRequest]) -> Vec<&str> {
        v.iter().map(|r| r.id.0.as_str()).collect()
    }

    #[test]
    fn projects_take_turns_and_keep_their_order() {
        let p = PoolKey::new("9", Arch::X86_64, None);
        let mut q = WaitQueue::new();
        for (id, project) in [("a1", "a"), ("a2", "a"), ("a3", "a"), ("b1", "b"), ("c1", "c"), ("b2", "b")] {
            q.push(req(id, project, &p, 1), 100, 100).unwrap();
        }
        let order: Vec<&str> = q.serve_order().iter().map(|r| r.id.0.as_str()).collect();
        assert_eq!(order, ["a1", "b1", "c1", "a2", "b2", "a3"]);
        assert_eq!(q.position(&RequestId("b2".into())), Some((5, 4)));
        let ready = BTreeMap::from([(p.clone(), 4)]);
        assert_eq!(ids(&q.select(&ready, |_| None)), ["a1", "b1", "c1", "a2"]);
        assert_eq!(ids(&q.select(&ready, |_| None)), ["b2", "a3"]);
        assert!(q.is_empty());
    }

    #[test]
    fn a_short_pool_is_held_for_the_project_whose_turn_it_is() {
        let p = PoolKey::new("9", Arch::X86_64, None);
        let other = PoolKey::new("8", Arch::X86_64, None);
        let mut q = WaitQueue::new();
        q.push(req("big", "a", &p, 3), 100, 100).unwrap();
        q.push(req("small", "b", &p, 1), 100, 100).unwrap();
        q.push(req("elsewhere", "c", &other, 1), 100, 100).unwrap();
        let ready = BTreeMap::from([(p.clone(), 2), (other.clone(), 1)]);
        assert_eq!(ids(&q.select(&ready, |_| None)), ["elsewhere"], "the pool is held for 'big'");
        let ready = BTreeMap::from([(p.clone(), 4)]);
        assert_eq!(ids(&q.select(&ready, |_| None)), ["big", "small"]);
    }

    #[test]
    fn a_project_over_quota_is_passed_over_without_holding_anyone_up() {
        let p = PoolKey::new("9", Arch::X86_64, None);
        let mut q = WaitQueue::new();
        q.push(req("a1", "a", &p, 2), 100, 100).unwrap();
        q.push(req("a2", "a", &p, 1), 100, 100).unwrap();
        q.push(req("b1", "b", &p, 1), 100, 100).unwrap();
        let ready = BTreeMap::from([(p.clone(), 5)]);
        let room = |project: &str| if project == "a" { Some(1) } else { None };
        assert_eq!(ids(&q.select(&ready, room)), ["b1"], "a1 does not fit a's quota, and a2 may not jump it");
        assert_eq!(q.len(), 2);
    }

    #[test]
    fn capacity_cancel_and_put_back() {
        let p = PoolKey::new("9", Arch::X86_64, None);
        let mut q = WaitQueue::new();
        q.push(req("a1", "a", &p, 1), 3, 2).unwrap();
        q.push(req("a2", "a", &p, 1), 3, 2).unwrap();
        assert!(matches!(q.push(req("a3", "a", &p, 1), 3, 2), Err(QueueFull::Project { max: 2, .. })));
        q.push(req("b1", "b", &p, 1), 3, 2).unwrap();
        assert!(matches!(q.push(req("c1", "c", &p, 1), 3, 2), Err(QueueFull::Service { capacity: 3 })));
        assert_eq!(q.remove(&RequestId("a1".into())).map(|r| r.id.0), Some("a1".into()));
        assert_eq!(q.remove(&RequestId("a1".into())), None);
        let taken = q.select(&BTreeMap::from([(p.clone(), 1)]), |_| None);
        assert_eq!(ids(&taken), ["a2"]);
        for r in taken {
            q.put_back(r);
        }
        assert_eq!(q.serve_order().iter().map(|r| r.id.0.as_str()).collect::<Vec<_>>(), ["a2", "b1"]);
        let gone = q.remove_where(|r| r.project == "b");
        assert_eq!(ids(&gone), ["b1"]);
        assert_eq!(q.len(), 1);
    }
}
