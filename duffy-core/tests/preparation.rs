//! What a failed preparation does to the nodes of an allocation, by whose
//! fault it was: only a node at fault is Failed; a project at fault is
//! refused before anything is claimed when that can be known, and
//! otherwise its nodes all go back to be reinstalled, with no cool-down.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use duffy_core::mem::MemStore;
use duffy_core::sim::{SimConfig, SimFarm};
use duffy_core::testkit::ManualClock;
use duffy_core::testkit::conformance::{add_ready, check_history, check_invariants, pool7};
use duffy_core::{
    Blame, Contextualizer, Engine, EngineError, KeyId, Node, NodeRequest, NodeState, Policy, PrepareError, Principal,
    Project, SessionId, Store, Timestamp,
};
use futures::executor::block_on;

/// Fails the nodes named in `fail` with the given blame; hangs on those in
/// `hang`; refuses projects named "refused" before the claim.
#[derive(Default)]
struct Scripted {
    fail: Mutex<HashMap<String, Blame>>,
    hang: Mutex<Vec<String>>,
}

#[async_trait]
impl Contextualizer for Scripted {
    fn check_project(&self, project: &Project) -> Result<(), PrepareError> {
        if project.name == "refused" {
            return Err(PrepareError::new(Blame::Project, "project \"refused\" has no SSH keys; add them"));
        }
        Ok(())
    }

    async fn prepare(&self, node: &Node, _project: &Project, _session: &SessionId) -> Result<(), PrepareError> {
        if self.hang.lock().unwrap().contains(&node.hostname) {
            futures::future::pending::<()>().await;
        }
        match self.fail.lock().unwrap().get(&node.hostname) {
            Some(blame) => Err(PrepareError::new(*blame, format!("scripted failure on {}", node.hostname))),
            None => Ok(()),
        }
    }
}

struct Setup {
    store: Arc<MemStore>,
    engine: Engine,
    ctx: Arc<Scripted>,
    clock: ManualClock,
    nodes: Vec<Node>,
}

fn setup() -> Setup {
    let clock = ManualClock::new(Timestamp::from_millis(1_767_225_600_000));
    let store = Arc::new(MemStore::new());
    let farm = Arc::new(SimFarm::new(Arc::new(clock.clone()), SimConfig::default()));
    let ctx = Arc::new(Scripted::default());
    let engine = Engine::builder(store.clone(), farm.clone(), farm, Arc::new(clock.clone()))
        .contextualizer(ctx.clone())
        .policy(Policy { rate_limit: None, prepare_timeout: Duration::from_secs(30), ..Policy::default() })
        .build()
        .unwrap();
    let nodes = block_on(async {
        store.set_pool_target(duffy_core::PoolTarget { pool: pool7(), standby: 4 }).await.unwrap();
        add_ready(&*store, "n", 4, &pool7()).await
    });
    Setup { store, engine, ctx, clock, nodes }
}

fn who(project: &str) -> Principal {
    Principal { key_id: Some(KeyId(1)), project: project.to_string(), admin: false }
}

fn ask(count: u32) -> NodeRequest {
    NodeRequest { count: Some(count), ..NodeRequest::default() }
}

fn states(store: &MemStore) -> Vec<NodeState> {
    block_on(store.nodes()).unwrap().into_iter().map(|n| n.state).collect()
}

fn checked(store: &MemStore) {
    block_on(check_invariants(store)).unwrap();
    block_on(check_history(store)).unwrap();
}

#[test]
fn a_project_refused_by_the_check_claims_nothing() {
    let s = setup();
    let before = block_on(s.store.nodes()).unwrap();
    let err = block_on(s.engine.get_nodes(&who("refused"), &ask(4))).unwrap_err();
    match &err {
        EngineError::ProjectUnusable { project, reason } => {
            assert_eq!(project, "refused");
            assert!(reason.contains("no SSH keys"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("\"refused\""), "names the project: {err}");
    assert_eq!(block_on(s.store.nodes()).unwrap(), before, "nothing claimed");
    assert!(block_on(s.store.live_sessions()).unwrap().is_empty());
    checked(&s.store);
}

#[test]
fn a_project_at_fault_during_preparation_blames_no_node() {
    let s = setup();
    s.ctx.fail.lock().unwrap().insert(s.nodes[1].hostname.clone(), Blame::Project);
    let err = block_on(s.engine.get_nodes(&who("p"), &ask(4))).unwrap_err();
    assert!(matches!(err, EngineError::ProjectUnusable { .. }), "{err:?}");
    assert_eq!(states(&s.store), vec![NodeState::Active; 4], "all back to be reinstalled, none Failed");
    assert!(block_on(s.store.nodes()).unwrap().iter().all(|n| n.hold_until.is_none() && n.session.is_none()));
    assert!(block_on(s.store.live_sessions()).unwrap().is_empty(), "no half-made session");
    checked(&s.store);
}

#[test]
fn duffys_own_failure_blames_no_node() {
    let s = setup();
    s.ctx.fail.lock().unwrap().insert(s.nodes[0].hostname.clone(), Blame::Service);
    let err = block_on(s.engine.get_nodes(&who("p"), &ask(2))).unwrap_err();
    assert!(matches!(err, EngineError::PreparationFailed { .. }), "{err:?}");
    let st = states(&s.store);
    assert_eq!(st.iter().filter(|s| **s == NodeState::Failed).count(), 0, "{st:?}");
    assert_eq!(st.iter().filter(|s| **s == NodeState::Active).count(), 2, "{st:?}");
    checked(&s.store);
}

#[test]
fn a_node_at_fault_is_failed_and_the_others_go_back() {
    let s = setup();
    s.ctx.fail.lock().unwrap().insert(s.nodes[2].hostname.clone(), Blame::Node);
    let err = block_on(s.engine.get_nodes(&who("p"), &ask(4))).unwrap_err();
    match &err {
        EngineError::PreparationFailed { hostname, reason } => {
            assert_eq!(hostname, &s.nodes[2].hostname);
            assert!(reason.contains("scripted failure"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    let nodes = block_on(s.store.nodes()).unwrap();
    for n in &nodes {
        if n.id == s.nodes[2].id {
            assert_eq!(n.state, NodeState::Failed);
            assert!(n.hold_until.is_some(), "the policy's cool-down");
            assert!(n.fail_reason.as_deref().unwrap().contains("scripted failure"));
        } else {
            assert_eq!(n.state, NodeState::Active, "{}", n.hostname);
        }
    }
    checked(&s.store);
}

#[test]
fn a_node_that_does_not_answer_in_time_is_at_fault() {
    let s = setup();
    s.ctx.hang.lock().unwrap().push(s.nodes[0].hostname.clone());
    let mut pool = futures::executor::LocalPool::new();
    let engine = s.engine.clone();
    let result = Arc::new(Mutex::new(None));
    let out = result.clone();
    use futures::task::LocalSpawnExt;
    pool.spawner()
        .spawn_local(async move {
            let r = engine.get_nodes(&who("p"), &ask(1)).await;
            *out.lock().unwrap() = Some(r);
        })
        .unwrap();
    pool.run_until_stalled();
    assert!(result.lock().unwrap().is_none(), "waiting for the node");
    s.clock.advance(Duration::from_secs(31));
    pool.run_until_stalled();
    let r = result.lock().unwrap().take().expect("answered after the deadline");
    assert!(matches!(r, Err(EngineError::PreparationFailed { .. })), "{r:?}");
    let n = block_on(s.store.node(s.nodes[0].id)).unwrap().unwrap();
    assert_eq!(n.state, NodeState::Failed);
    assert!(n.fail_reason.as_deref().unwrap().contains("timed out"), "{:?}", n.fail_reason);
    checked(&s.store);
}
