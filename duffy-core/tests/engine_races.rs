//! Races in the engine's read → compare-and-set windows that the model
//! test (over the yielding store) ran into, each pinned down here as one
//! deterministic interleaving: a store wrapper runs another operation to
//! completion at the exact `await` where the race happens.
//!
//! Both are engine bugs, not yet fixed (engine.rs is being changed on
//! another branch); the tests are ignored until the fix lands and must
//! pass then: `cargo test -p duffy-core --test engine_races -- --ignored`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use duffy_core::store::{Batch, ClaimRefusal, ClaimRequest, Claimed, CommitError, EventQuery, Store, StoreError};
use duffy_core::testkit::{Harness, SimConfig, SimFarm};
use duffy_core::{
    Actor, ApiKeyHash, ApiKeyRecord, Arch, EngineError, Event, NewNode, Node, NodeId, NodeRequest, NodeState, PoolKey,
    PoolTarget, Project, Session, SessionId, SessionState, Timestamp,
};
use futures::future::BoxFuture;

type Hook = Mutex<Option<BoxFuture<'static, ()>>>;

/// Forwards to the store underneath; the first `claim` (and the first
/// `node` read) after a hook is set runs the hook to completion first.
struct HookStore {
    inner: Arc<dyn Store>,
    before_claim: Hook,
    before_node: Hook,
}

impl HookStore {
    async fn fire(hook: &Hook) {
        let f = hook.lock().expect("hook").take();
        if let Some(f) = f {
            f.await;
        }
    }
}

#[async_trait]
impl Store for HookStore {
    async fn add_nodes(&self, nodes: Vec<NewNode>, actor: Actor, now: Timestamp) -> Result<Vec<Node>, StoreError> {
        self.inner.add_nodes(nodes, actor, now).await
    }
    async fn node(&self, id: NodeId) -> Result<Option<Node>, StoreError> {
        Self::fire(&self.before_node).await;
        self.inner.node(id).await
    }
    async fn node_by_hostname(&self, hostname: &str) -> Result<Option<Node>, StoreError> {
        self.inner.node_by_hostname(hostname).await
    }
    async fn nodes(&self) -> Result<Vec<Node>, StoreError> {
        self.inner.nodes().await
    }
    async fn ready_counts(&self) -> Result<Vec<(PoolKey, u32)>, StoreError> {
        self.inner.ready_counts().await
    }
    async fn nodes_in_states(&self, states: &[NodeState]) -> Result<Vec<Node>, StoreError> {
        self.inner.nodes_in_states(states).await
    }
    async fn stale_ready(&self, installed_before: Timestamp, limit: usize) -> Result<Vec<Node>, StoreError> {
        self.inner.stale_ready(installed_before, limit).await
    }
    async fn idle_nodes(&self, limit: usize) -> Result<Vec<Node>, StoreError> {
        self.inner.idle_nodes(limit).await
    }
    async fn nodes_after(&self, after: NodeId, limit: usize) -> Result<Vec<Node>, StoreError> {
        self.inner.nodes_after(after, limit).await
    }
    async fn session(&self, id: &SessionId) -> Result<Option<Session>, StoreError> {
        self.inner.session(id).await
    }
    async fn live_sessions(&self) -> Result<Vec<Session>, StoreError> {
        self.inner.live_sessions().await
    }
    async fn claim(&self, req: ClaimRequest) -> Result<Result<Claimed, ClaimRefusal>, StoreError> {
        Self::fire(&self.before_claim).await;
        self.inner.claim(req).await
    }
    async fn commit(&self, batch: Batch) -> Result<(), CommitError> {
        self.inner.commit(batch).await
    }
    async fn events(&self, query: EventQuery) -> Result<Vec<Event>, StoreError> {
        self.inner.events(query).await
    }
    async fn upsert_project(&self, project: Project) -> Result<(), StoreError> {
        self.inner.upsert_project(project).await
    }
    async fn project(&self, name: &str) -> Result<Option<Project>, StoreError> {
        self.inner.project(name).await
    }
    async fn add_api_key(
        &self,
        project: &str,
        hash: ApiKeyHash,
        admin: bool,
        now: Timestamp,
    ) -> Result<ApiKeyRecord, StoreError> {
        self.inner.add_api_key(project, hash, admin, now).await
    }
    async fn api_key_by_hash(&self, hash: &ApiKeyHash) -> Result<Option<ApiKeyRecord>, StoreError> {
        self.inner.api_key_by_hash(hash).await
    }
    async fn set_pool_target(&self, target: PoolTarget) -> Result<(), StoreError> {
        self.inner.set_pool_target(target).await
    }
    async fn pool_targets(&self) -> Result<Vec<PoolTarget>, StoreError> {
        self.inner.pool_targets().await
    }
    async fn paused(&self) -> Result<bool, StoreError> {
        self.inner.paused().await
    }
    async fn set_paused(&self, paused: bool) -> Result<bool, StoreError> {
        self.inner.set_paused(paused).await
    }
}

fn pool() -> PoolKey {
    PoolKey::new("7", Arch::X86_64, None)
}

/// A farm of four machines, two kept Ready, over a [`HookStore`]; the
/// preparation step takes simulated time (SSH keys), as in production.
fn farm() -> (Harness, Arc<HookStore>) {
    let mut hooks = None;
    let mut h = Harness::with_store(
        duffy_core::Policy::default(),
        SimConfig::default(),
        SimFarm::machines(4),
        &[PoolTarget { pool: pool(), standby: 2 }],
        |inner| {
            let s = Arc::new(HookStore { inner, before_claim: Mutex::new(None), before_node: Mutex::new(None) });
            hooks = Some(s.clone());
            s
        },
    );
    h.advance(Duration::from_secs(60));
    (h, hooks.expect("made by with_store"))
}

fn get(h: &mut Harness, key: &str) -> Rc<RefCell<Option<Result<duffy_core::Allocation, EngineError>>>> {
    let r = h.get_nodes_later(key, NodeRequest { count: Some(1), ..NodeRequest::default() });
    h.advance(Duration::from_secs(5));
    r
}

/// Bug: `get_nodes` reads the pause flag, then claims. A pause that takes
/// effect in between (an admin's `/PauseService` on another thread) does
/// not stop the claim: the service hands out nodes after the pause was
/// acknowledged. The check must be part of the atomic claim.
#[test]
#[ignore = "engine bug: get_nodes checks the pause flag before the claim, not in it"]
fn a_pause_acknowledged_before_the_claim_stops_it() {
    let (mut h, hooks) = farm();
    let user = h.key("p", None, false);
    let admin_key = h.key("ops", None, true);
    let engine = h.engine.clone();
    let admin = h.block_on(async move { engine.authenticate(&admin_key).await.expect("admin") });
    let engine = h.engine.clone();
    *hooks.before_claim.lock().expect("hook") =
        Some(Box::pin(async move { engine.pause(&admin).await.expect("pause") }));

    let r = get(&mut h, &user);
    let store = h.dyn_store();
    assert!(h.block_on(async move { store.paused().await.expect("read") }), "the pause took effect");
    let r = r.borrow_mut().take().expect("get_nodes finished");
    assert!(matches!(r, Err(EngineError::Paused)), "a claim after the pause was acknowledged: {r:?}");
}

/// Bug: `fail` reads the session, then its nodes, and builds the
/// FailedByUser transitions with `?`. When another `fail` of the same
/// session commits in between, the nodes it reads are already Failed, the
/// transition is refused, and the caller gets "node … is Failed;
/// failed_by_user is not allowed from Failed" instead of what a second
/// `fail` gets (the session is not in Prod). A lost race must be retried
/// from a fresh read of the session.
#[test]
#[ignore = "engine bug: fail reports a refused transition when it loses a race to another fail"]
fn a_fail_that_loses_the_race_to_another_fail_reports_the_session_state() {
    let (mut h, hooks) = farm();
    let user = h.key("p", None, false);
    let r = get(&mut h, &user);
    let sid = r.borrow_mut().take().expect("finished").expect("allocated").session.0;
    let engine = h.engine.clone();
    let who = h.block_on(async move { engine.authenticate(&user).await.expect("user") });

    // The other fail runs at the moment the first reads the session's nodes.
    let (engine, w, s) = (h.engine.clone(), who.clone(), sid.clone());
    *hooks.before_node.lock().expect("hook") =
        Some(Box::pin(async move { engine.fail(&w, &s).await.expect("the other fail wins") }));
    let engine = h.engine.clone();
    let (w, s) = (who.clone(), sid.clone());
    let r = h.block_on(async move { engine.fail(&w, &s).await });

    let store = h.dyn_store();
    let s = sid.clone();
    let session = h.block_on(async move { store.session(&SessionId(s)).await.expect("read").expect("exists") });
    assert_eq!(session.state, SessionState::Fail, "the other fail took effect");
    assert!(
        matches!(&r, Err(EngineError::SessionNotInProd { state: "Fail", .. })),
        "the losing fail should see the session Failed: {r:?}"
    );
}
