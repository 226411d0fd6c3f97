//! A [`Store`] wrapper that hands control back to the executor around
//! every call, so that concurrent engine operations interleave.
//!
//! The engine's correctness rests on its read → compare-and-set windows
//! being safe whatever runs in between. [`MemStore`](super::MemStore)
//! answers every call without ever returning `Pending`, so on a
//! single-threaded executor one operation runs from one clock wait to the
//! next without anyone else getting a turn: the windows never interleave
//! and no test can see what happens when they do. [`YieldingStore`] yields
//! a seeded-random number of times before and after each inner call, which
//! lets every other ready task run at every `await` on the store, in an
//! order that the seed fixes (on a deterministic executor such as the
//! [`Harness`](super::Harness)'s, the same seed gives the same
//! interleaving).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use async_trait::async_trait;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::model::{
    Actor, ApiKeyHash, ApiKeyRecord, NewNode, Node, NodeId, PoolKey, PoolTarget, Project, Session, SessionId,
};
use crate::state::{Event, NodeState};
use crate::store::{Batch, ClaimRefusal, ClaimRequest, Claimed, CommitError, EventQuery, Store, StoreError};
use crate::time::Timestamp;

/// Wraps any store; before and after every call it yields to the executor
/// between 0 and `max_yields` times (inclusive), drawn from a seeded
/// generator. Answers are the inner store's, unchanged.
pub struct YieldingStore {
    inner: Arc<dyn Store>,
    rng: Mutex<ChaCha8Rng>,
    max_yields: u32,
    yields: AtomicU64,
}

impl std::fmt::Debug for YieldingStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("YieldingStore")
            .field("max_yields", &self.max_yields)
            .field("yields", &self.yields())
            .finish_non_exhaustive()
    }
}

impl YieldingStore {
    /// Wraps `inner`; `seed` fixes the sequence of yield counts, each drawn
    /// from `0..=max_yields` (0 never yields: the inner store as it is).
    pub fn new(inner: Arc<dyn Store>, seed: u64, max_yields: u32) -> Self {
        YieldingStore { inner, rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed)), max_yields, yields: AtomicU64::new(0) }
    }

    /// How many times it has yielded so far: a test can check that its
    /// operations really were interleaved.
    pub fn yields(&self) -> u64 {
        self.yields.load(Ordering::Relaxed)
    }

    async fn pause(&self) {
        let n = if self.max_yields == 0 {
            0
        } else {
            self.rng.lock().unwrap_or_else(|p| p.into_inner()).gen_range(0..=self.max_yields)
        };
        for _ in 0..n {
            YieldNow { yielded: false }.await;
            self.yields.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Runs `call` between two pauses.
    async fn around<T>(&self, call: impl Future<Output = T> + Send) -> T {
        self.pause().await;
        let out = call.await;
        self.pause().await;
        out
    }
}

/// Returns `Pending` once after waking its own task, so the executor runs
/// every other ready task before coming back. Written here rather than
/// taken from a runtime (`tokio::task::yield_now`) because the test kit's
/// harness runs on `futures`' `LocalPool`, and the wrapper must work on any
/// executor.
struct YieldNow {
    yielded: bool,
}

impl Future for YieldNow {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.yielded {
            return Poll::Ready(());
        }
        self.yielded = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

#[async_trait]
impl Store for YieldingStore {
    async fn add_nodes(&self, nodes: Vec<NewNode>, actor: Actor, now: Timestamp) -> Result<Vec<Node>, StoreError> {
        self.around(self.inner.add_nodes(nodes, actor, now)).await
    }

    async fn node(&self, id: NodeId) -> Result<Option<Node>, StoreError> {
        self.around(self.inner.node(id)).await
    }

    async fn node_by_hostname(&self, hostname: &str) -> Result<Option<Node>, StoreError> {
        self.around(self.inner.node_by_hostname(hostname)).await
    }

    async fn nodes(&self) -> Result<Vec<Node>, StoreError> {
        self.around(self.inner.nodes()).await
    }

    async fn ready_counts(&self) -> Result<Vec<(PoolKey, u32)>, StoreError> {
        self.around(self.inner.ready_counts()).await
    }

    async fn nodes_in_states(&self, states: &[NodeState]) -> Result<Vec<Node>, StoreError> {
        self.around(self.inner.nodes_in_states(states)).await
    }

    async fn stale_ready(&self, installed_before: Timestamp, limit: usize) -> Result<Vec<Node>, StoreError> {
        self.around(self.inner.stale_ready(installed_before, limit)).await
    }

    async fn idle_nodes(&self, limit: usize) -> Result<Vec<Node>, StoreError> {
        self.around(self.inner.idle_nodes(limit)).await
    }

    async fn nodes_after(&self, after: NodeId, limit: usize) -> Result<Vec<Node>, StoreError> {
        self.around(self.inner.nodes_after(after, limit)).await
    }

    async fn session(&self, id: &SessionId) -> Result<Option<Session>, StoreError> {
        self.around(self.inner.session(id)).await
    }

    async fn live_sessions(&self) -> Result<Vec<Session>, StoreError> {
        self.around(self.inner.live_sessions()).await
    }

    async fn claim(&self, req: ClaimRequest) -> Result<Result<Claimed, ClaimRefusal>, StoreError> {
        self.around(self.inner.claim(req)).await
    }

    async fn commit(&self, batch: Batch) -> Result<(), CommitError> {
        self.around(self.inner.commit(batch)).await
    }

    async fn events(&self, query: EventQuery) -> Result<Vec<Event>, StoreError> {
        self.around(self.inner.events(query)).await
    }

    async fn upsert_project(&self, project: Project) -> Result<(), StoreError> {
        self.around(self.inner.upsert_project(project)).await
    }

    async fn project(&self, name: &str) -> Result<Option<Project>, StoreError> {
        self.around(self.inner.project(name)).await
    }

    async fn add_api_key(
        &self,
        project: &str,
        hash: ApiKeyHash,
        admin: bool,
        now: Timestamp,
    ) -> Result<ApiKeyRecord, StoreError> {
        self.around(self.inner.add_api_key(project, hash, admin, now)).await
    }

    async fn api_key_by_hash(&self, hash: &ApiKeyHash) -> Result<Option<ApiKeyRecord>, StoreError> {
        self.around(self.inner.api_key_by_hash(hash)).await
    }

    async fn set_pool_target(&self, target: PoolTarget) -> Result<(), StoreError> {
        self.around(self.inner.set_pool_target(target)).await
    }

    async fn pool_targets(&self) -> Result<Vec<PoolTarget>, StoreError> {
        self.around(self.inner.pool_targets()).await
    }

    async fn paused(&self) -> Result<bool, StoreError> {
        self.around(self.inner.paused()).await
    }

    async fn set_paused(&self, paused: bool) -> Result<bool, StoreError> {
        self.around(self.inner.set_paused(paused)).await
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::rc::Rc;

    use futures::executor::LocalPool;
    use futures::task::LocalSpawnExt;

    use super::*;
    use crate::testkit::MemStore;

    /// Two tasks each make a few store calls; returns the order in which
    /// their calls finished.
    fn trace(seed: u64, max_yields: u32) -> (Vec<&'static str>, u64) {
        let store = Arc::new(YieldingStore::new(Arc::new(MemStore::new()), seed, max_yields));
        let order = Rc::new(RefCell::new(Vec::new()));
        let mut pool = LocalPool::new();
        for name in ["a", "b"] {
            let (store, order) = (store.clone(), order.clone());
            pool.spawner()
                .spawn_local(async move {
                    for _ in 0..4 {
                        store.paused().await.expect("read");
                        order.borrow_mut().push(name);
                    }
                })
                .expect("spawn");
        }
        pool.run();
        let order = order.borrow().clone();
        (order, store.yields())
    }

    #[test]
    fn without_yields_each_task_runs_to_the_end_alone() {
        let (order, yields) = trace(7, 0);
        assert_eq!(order, ["a", "a", "a", "a", "b", "b", "b", "b"]);
        assert_eq!(yields, 0);
    }

    #[test]
    fn yields_interleave_tasks_reproducibly_by_seed() {
        let (order, yields) = trace(7, 3);
        assert!(yields > 0);
        assert_eq!(order.len(), 8);
        // Interleaved: somewhere b ran before a had finished.
        let first_b = order.iter().position(|x| *x == "b").expect("b ran");
        let last_a = order.iter().rposition(|x| *x == "a").expect("a ran");
        assert!(first_b < last_a, "{order:?}");
        assert_eq!(trace(7, 3), (order, yields), "same seed, same interleaving");
    }
}
