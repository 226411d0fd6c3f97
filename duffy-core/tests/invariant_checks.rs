//! The farm-wide checks (`check_invariants`, `check_history`) can fail:
//! each test here builds a store that breaks one invariant the way a buggy
//! backend could, and asserts that a check reports it. Without these, a
//! check that can never fail would pass every test that relies on it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Fault, Tap};
use duffy_core::mem::MemStore;
use duffy_core::store::{Batch, NodeWrite, SessionWrite, Store};
use duffy_core::testkit::conformance::{add_ready, check_history, check_invariants, claim_ok, claim_req, pool7};
use duffy_core::{Actor, Cause, NodeId, NodeState, Session, SessionId, SessionState, Timestamp};

const T0: Timestamp = Timestamp(1_700_000_000_000);

fn store(fault: Fault) -> Arc<dyn Store> {
    Arc::new(Tap::new(Arc::new(MemStore::new()), fault))
}

/// The check must fail, saying `what`.
fn caught(r: Result<(), String>, what: &str) {
    match r {
        Err(e) => assert!(e.contains(what), "the check failed, but not with {what:?}: {e}"),
        Ok(()) => panic!("the check did not catch it (expected {what:?})"),
    }
}

/// Allocating → Prod: the nodes Contextualizing → Deployed, as the
/// engine's deliver does.
async fn deliver(store: &dyn Store, sid: &str) {
    let s = store.session(&SessionId(sid.into())).await.expect("read").expect("exists");
    let mut batch = Batch::default();
    for id in &s.nodes {
        let n = store.node(*id).await.expect("read").expect("exists");
        batch.nodes.push(NodeWrite::transition(&n, Cause::Prepared, Actor::Key(s.key_id), T0).expect("legal"));
    }
    let mut prod = s.clone();
    prod.state = SessionState::Prod;
    prod.delivered_at = Some(T0);
    prod.lease_until = Some(T0.plus(Duration::from_secs(3600)));
    prod.version += 1;
    batch.sessions.push(SessionWrite { expected_version: Some(s.version), session: prod });
    store.commit(batch).await.expect("deliver");
}

/// The same operations through the wrapper without a fault pass every
/// check: the failures below come from the faults, not from the setup.
#[tokio::test]
async fn a_correct_store_passes() {
    let s = store(Fault::None);
    add_ready(&*s, "n", 4, &pool7()).await;
    claim_ok(&*s, claim_req("a", 1, "p", 1, T0)).await;
    claim_ok(&*s, claim_req("b", 2, "p", 2, T0)).await;
    deliver(&*s, "b").await;
    let mut direct = claim_req("c", 1, "p", 1, T0);
    direct.deliver = Some(T0.plus(Duration::from_secs(3600)));
    claim_ok(&*s, direct).await;
    check_invariants(&*s).await.expect("invariants");
    check_history(&*s).await.expect("history");
}

/// A store that answers a claim while writing a second live session over
/// the same nodes. The nodes name the first session, so a map built from
/// the node rows never sees the second one; the session rows do.
#[tokio::test]
async fn a_second_session_written_over_claimed_nodes_is_caught() {
    let s = store(Fault::SecondSessionOverClaim);
    add_ready(&*s, "n", 3, &pool7()).await;
    let c = claim_ok(&*s, claim_req("a", 1, "p", 2, T0)).await;
    assert_eq!(s.session(&SessionId("a-shadow".into())).await.expect("read").map(|x| x.nodes), Some(c.session.nodes));
    caught(check_invariants(&*s).await, "listed by two live sessions");
    check_history(&*s).await.expect("the history alone cannot show it");

    // The same with a claim that delivers at once (both sessions Prod).
    let s = store(Fault::SecondSessionOverClaim);
    add_ready(&*s, "n", 3, &pool7()).await;
    let mut direct = claim_req("a", 1, "p", 1, T0);
    direct.deliver = Some(T0.plus(Duration::from_secs(3600)));
    claim_ok(&*s, direct).await;
    caught(check_invariants(&*s).await, "listed by two live sessions");
}

/// A claim that takes a node already held by another live session (being
/// prepared for it, or handed over to it): the new session lists it while
/// the node still names the first.
#[tokio::test]
async fn a_claim_that_takes_a_node_held_by_another_session_is_caught() {
    for deliver_first in [false, true] {
        let s = store(Fault::ClaimTakesHeldNode);
        add_ready(&*s, "n", 3, &pool7()).await;
        let first = claim_ok(&*s, claim_req("a", 1, "p", 1, T0)).await;
        if deliver_first {
            deliver(&*s, "a").await;
        }
        let second = claim_ok(&*s, claim_req("b", 2, "p", 2, T0)).await;
        assert!(second.session.nodes.contains(&first.nodes[0].id), "the fault took the held node");
        let held = s.node(first.nodes[0].id).await.expect("read").expect("exists");
        let want = if deliver_first { NodeState::Deployed } else { NodeState::Contextualizing };
        assert_eq!((held.state, held.session), (want, Some(SessionId("a".into()))));
        caught(check_invariants(&*s).await, "listed by two live sessions");
        check_history(&*s).await.expect("the history alone cannot show it");
    }
}

/// A claim that writes its session but drops one of its node writes: the
/// session lists a node that is still Ready and names no holder (and that
/// the next claim would hand to someone else).
#[tokio::test]
async fn a_claim_that_drops_a_node_write_is_caught() {
    let s = store(Fault::ClaimDropsNodeWrite);
    add_ready(&*s, "n", 3, &pool7()).await;
    let c = claim_ok(&*s, claim_req("a", 1, "p", 2, T0)).await;
    let dropped = s.node(c.session.nodes[1]).await.expect("read").expect("exists");
    assert_eq!((dropped.state, dropped.session), (NodeState::Ready, None));
    caught(check_invariants(&*s).await, "which names no session as its holder");
    check_history(&*s).await.expect("the history alone cannot show it");
}

/// A store whose node listing loses a row that still has a history.
#[tokio::test]
async fn a_node_missing_from_the_store_is_caught_by_the_history() {
    let s = store(Fault::HideLastNode);
    let ready = add_ready(&*s, "n", 3, &pool7()).await;
    assert_eq!(s.nodes().await.expect("nodes").len(), 2);
    check_invariants(&*s).await.expect("the node rows alone cannot show it");
    caught(check_history(&*s).await, &format!("node {} has a history but is not in the store", ready[2].id));
}

/// A store whose node listing repeats a row.
#[tokio::test]
async fn a_node_listed_twice_is_caught() {
    let s = store(Fault::DuplicateFirstNode);
    add_ready(&*s, "n", 3, &pool7()).await;
    caught(check_invariants(&*s).await, "not once each in id order");
}

/// Broken rows written directly: a live session listing a node that does
/// not exist, a node listed twice by one session, a Prod session listing a
/// node still being prepared, and a node naming a session that has ended.
#[tokio::test]
async fn inconsistent_rows_are_caught() {
    let insert = |session: Session| Batch {
        sessions: vec![SessionWrite { expected_version: None, session }],
        ..Batch::default()
    };

    let s = store(Fault::None);
    add_ready(&*s, "n", 2, &pool7()).await;
    let c = claim_ok(&*s, claim_req("a", 1, "p", 1, T0)).await;
    let ghost = Session { id: SessionId("ghost".into()), nodes: vec![NodeId(4242)], ..c.session.clone() };
    s.commit(insert(ghost)).await.expect("write");
    caught(check_invariants(&*s).await, "lists node 4242, which is not in the store");

    let s = store(Fault::None);
    add_ready(&*s, "n", 2, &pool7()).await;
    let c = claim_ok(&*s, claim_req("a", 1, "p", 1, T0)).await;
    let mut twice = c.session.clone();
    twice.nodes.push(twice.nodes[0]);
    twice.version += 1;
    s.commit(Batch {
        sessions: vec![SessionWrite { expected_version: Some(c.session.version), session: twice }],
        ..Batch::default()
    })
    .await
    .expect("write");
    caught(check_invariants(&*s).await, &format!("live session a lists node {} twice", c.nodes[0].id));

    let s = store(Fault::None);
    add_ready(&*s, "n", 2, &pool7()).await;
    let c = claim_ok(&*s, claim_req("a", 1, "p", 1, T0)).await;
    let mut prod = c.session.clone();
    prod.state = SessionState::Prod;
    prod.version += 1;
    s.commit(Batch {
        sessions: vec![SessionWrite { expected_version: Some(c.session.version), session: prod }],
        ..Batch::default()
    })
    .await
    .expect("write");
    caught(check_invariants(&*s).await, "is Contextualizing but its session a is Prod");

    let s = store(Fault::None);
    add_ready(&*s, "n", 2, &pool7()).await;
    let c = claim_ok(&*s, claim_req("a", 1, "p", 1, T0)).await;
    let mut ended = c.session.clone();
    ended.state = SessionState::Aborted;
    ended.version += 1;
    s.commit(Batch {
        sessions: vec![SessionWrite { expected_version: Some(c.session.version), session: ended }],
        ..Batch::default()
    })
    .await
    .expect("write");
    caught(check_invariants(&*s).await, "which is not live");
}
