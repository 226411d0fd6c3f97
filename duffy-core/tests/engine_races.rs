//! Races in the engine's read → compare-and-set windows that the model
//! test (over the yielding store) ran into, each pinned down here as one
//! deterministic interleaving: a store wrapper runs another operation to
//! completion at the exact `await` where the race happens.
//!
//! Both were engine bugs, found by the model test and fixed: the pause
//! flag is checked inside the claim, and a `done`/`fail` whose nodes moved
//! under it reads the session again.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use duffy_core::sim::{SimConfig, SimFarm};
use duffy_core::store::Store;
use duffy_core::testkit::{Harness, InterceptStore};
use duffy_core::{Arch, EngineError, NodeRequest, PoolKey, PoolTarget, SessionId, SessionState};
use futures::future::BoxFuture;

type Slot = Arc<Mutex<Option<BoxFuture<'static, ()>>>>;

/// The one-shot competing operations: the first `claim` (and the first
/// `node` read) after a slot is filled runs it to completion first.
#[derive(Default)]
struct Hooks {
    before_claim: Slot,
    before_node: Slot,
}

impl Hooks {
    /// The store the engine sees: `inner` behind these hooks.
    fn wrap(&self, inner: Arc<dyn Store>) -> Arc<dyn Store> {
        let (claim, node) = (self.before_claim.clone(), self.before_node.clone());
        Arc::new(InterceptStore::new(
            inner,
            Arc::new(move |method| {
                let slot = match method {
                    "claim" => Some(&claim),
                    "node" => Some(&node),
                    _ => None,
                };
                let f = slot.and_then(|s| s.lock().expect("hook").take());
                Box::pin(async move {
                    if let Some(f) = f {
                        f.await;
                    }
                    Ok(())
                })
            }),
        ))
    }
}

fn pool() -> PoolKey {
    PoolKey::new("7", Arch::X86_64, None)
}

/// A farm of four machines, two kept Ready, over the [`Hooks`]; the
/// preparation step takes simulated time (SSH keys), as in production.
fn farm() -> (Harness, Hooks) {
    let hooks = Hooks::default();
    let mut h = Harness::with_store(
        duffy_core::Policy::default(),
        SimConfig::default(),
        SimFarm::machines(4),
        &[PoolTarget { pool: pool(), standby: 2 }],
        |inner| hooks.wrap(inner),
    );
    h.advance(Duration::from_secs(60));
    (h, hooks)
}

fn get(h: &mut Harness, key: &str) -> Rc<RefCell<Option<Result<duffy_core::Allocation, EngineError>>>> {
    let r = h.get_nodes_later(key, NodeRequest { count: Some(1), ..NodeRequest::default() });
    h.advance(Duration::from_secs(5));
    r
}

/// Was a bug: `get_nodes` read the pause flag, then claims. A pause that takes
/// effect in between (an admin's `/PauseService` on another thread) does
/// not stop the claim: the service hands out nodes after the pause was
/// acknowledged. The check must be part of the atomic claim.
#[test]
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

/// Was a bug: `fail` read the session, then its nodes, and builds the
/// FailedByUser transitions with `?`. When another `fail` of the same
/// session commits in between, the nodes it reads are already Failed, the
/// transition is refused, and the caller gets "node … is Failed;
/// failed_by_user is not allowed from Failed" instead of what a second
/// `fail` gets (the session is not in Prod). A lost race must be retried
/// from a fresh read of the session.
#[test]
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
