//! The `Store` conformance suite: what every backend must do, checked the
//! same way for all of them.
//!
//! Each check is a public async function taking a fresh, empty store.
//! A backend's tests call them all with [`store_conformance_tests!`]
//! (which needs `tokio` with the `macros` and `rt-multi-thread` features
//! among the backend's dev-dependencies):
//!
//! ```ignore
//! duffy_core::store_conformance_tests!(|| async { std::sync::Arc::new(MyStore::open_temp().await) });
//! ```
//!
//! The factory returns a [`Fixture`]: the store itself, or the store with
//! whatever must outlive it (a temporary directory, a scratch database),
//! so a backend needs no wrapper around its store to tie the two together.
//!
//! [`check_invariants`] and [`check_history`] verify the farm-wide
//! invariants on any store, for property, stress and crash tests.
//!
//! [`store_conformance_tests!`]: crate::store_conformance_tests

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use crate::model::{
    Actor, ApiKeyRecord, Arch, Hardware, KeyId, NewNode, Node, NodeId, PoolKey, PoolTarget, Project, Session,
    SessionId, SessionState,
};
use crate::policy::RateLimit;
use crate::session::SessionCause;
use crate::state::{Cause, CauseKind, NodeState};
use crate::store::{
    Batch, ClaimRefusal, ClaimRequest, Claimed, CommitError, EventQuery, Guard, HandBack, HandBackKind,
    HandBackRefusal, NodeCount, NodeGroup, NodeWrite, SessionWrite, Store, StoreError,
};
use crate::tickets::{
    InstallTicket, InstallTickets, MAX_TICKET_TOKENS, Settle, TicketAccess, TicketId, TicketOutcome, TicketState,
    TokenHash,
};
use crate::time::Timestamp;

pub use crate::audit::{check_history, check_invariants};

/// Generates one `#[tokio::test]` per conformance check, each on a fresh
/// store from `$factory`: a closure returning a future of a [`Fixture`]
/// (`Arc<S>` for any store `S`, `Arc<dyn Store>`, `(store, guard)`, or a
/// backend's own type). The fixture is dropped after the check.
///
/// [`Fixture`]: crate::testkit::conformance::Fixture
#[macro_export]
macro_rules! store_conformance_tests {
    ($factory:expr) => {
        $crate::store_conformance_tests!(@tests $factory;
            nodes_are_added_all_or_nothing,
            compare_and_set_is_all_or_nothing,
            event_log_is_ordered_and_filtered,
            claim_takes_least_used_first,
            claim_refusals_write_nothing,
            concurrent_claims_never_share_a_node,
            quota_counts_live_sessions,
            rate_limit_counts_recent_sessions,
            sessions_are_compare_and_set,
            guards_undo_the_whole_batch,
            projects_and_keys,
            pool_targets_and_pause_flag,
            nodes_in_states_filters_and_orders_by_id,
            stale_ready_is_oldest_first_and_bounded,
            nodes_after_pages_through_the_farm,
            idle_nodes_are_least_used_first,
            ready_counts_count_ready_nodes_per_pool,
            api_keys_are_listed_and_revoked,
            key_use_is_recorded_forward_only,
            claim_checks_the_pool_target,
            claim_applies_the_projects_own_quota,
            hand_back_done_and_fail,
            hand_back_refusals_write_nothing,
            commit_each_commits_each_batch_on_its_own,
            sessions_expire_and_are_listed_by_expiry,
            latest_events_are_newest_first_and_bounded,
            node_counts_group_the_farm,
            fenced_writes_need_the_newest_epoch,
            install_tickets_are_single_use_and_bound_to_the_address,
            install_tickets_are_replaced_by_the_hosts_next_registration,
            expired_install_tickets_become_tombstones,
            concurrent_uses_of_one_install_token_grant_exactly_one,
            install_ticket_tokens_are_bounded,
            commit_each_fenced_writes_each_on_its_own_within_the_term,
        );
    };
    (@tests $factory:expr; $($name:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                let fixture = ($factory)().await;
                $crate::testkit::conformance::$name($crate::testkit::conformance::Fixture::store(&fixture)).await;
                drop(fixture);
            }
        )*
    };
}

/// What a [`store_conformance_tests!`](crate::store_conformance_tests)
/// factory returns: a fresh, empty store, and anything that must live as
/// long as the check runs.
pub trait Fixture {
    /// The store under test.
    fn store(&self) -> Arc<dyn Store>;
}

impl<S: Store + 'static> Fixture for Arc<S> {
    fn store(&self) -> Arc<dyn Store> {
        self.clone()
    }
}

impl Fixture for Arc<dyn Store> {
    fn store(&self) -> Arc<dyn Store> {
        self.clone()
    }
}

/// A store and a guard that outlives it: the tuple's fields drop in order,
/// so the store closes before, say, its temporary directory goes.
impl<F: Fixture, G> Fixture for (F, G) {
    fn store(&self) -> Arc<dyn Store> {
        self.0.store()
    }
}

const T0: Timestamp = Timestamp(1_700_000_000_000);

/// The default test pool, 7/x86_64.
pub fn pool7() -> PoolKey {
    PoolKey::new("7", Arch::X86_64, None)
}

/// Adds `count` machines named `{prefix}{i}` and installs them into
/// `pool`, returning them Ready.
pub async fn add_ready(store: &dyn Store, prefix: &str, count: usize, pool: &PoolKey) -> Vec<Node> {
    let news = (0..count).map(|i| NewNode::new(format!("{prefix}{i}"), Arch::X86_64)).collect();
    let nodes = store.add_nodes(news, Actor::Operator, T0).await.expect("add nodes");
    let mut out = Vec::new();
    for n in nodes {
        let w = NodeWrite::transition(
            &n,
            Cause::InstallStarted { image: pool.clone(), why: "test".into() },
            Actor::Reconciler,
            T0,
        )
        .expect("legal");
        let n = w.node.clone();
        store.commit(Batch { nodes: vec![w], ..Batch::default() }).await.expect("install started");
        let host_key = Some(format!("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI{prefix}{}", n.id));
        let w = NodeWrite::transition(&n, Cause::InstallSucceeded { host_key }, Actor::Reconciler, T0).expect("legal");
        let n = w.node.clone();
        store.commit(Batch { nodes: vec![w], ..Batch::default() }).await.expect("install succeeded");
        out.push(n);
    }
    out
}

/// A claim request with no quota and no rate limit.
pub fn claim_req(session: &str, key: u64, project: &str, count: u32, now: Timestamp) -> ClaimRequest {
    ClaimRequest {
        session: SessionId(session.to_string()),
        project: project.to_string(),
        key_id: KeyId(key),
        pool: pool7(),
        count,
        check_target: false,
        default_quota: None,
        rate_limit: None,
        actor: Actor::Key(KeyId(key)),
        now,
        deliver: None,
    }
}

/// Claims and expects success.
pub async fn claim_ok(store: &dyn Store, req: ClaimRequest) -> Claimed {
    match store.claim(req).await {
        Ok(Ok(c)) => c,
        other => panic!("claim should succeed: {other:?}"),
    }
}

/// Ends a session the way the engine does: a Prod (or Fail) session is
/// released (Done), an Allocating one aborted; its nodes go back to
/// Active.
pub async fn release(store: &dyn Store, sid: &SessionId, now: Timestamp) -> Result<(), CommitError> {
    let s = store.session(sid).await?.ok_or_else(|| StoreError::NotFound(format!("session {sid}")))?;
    let mut batch = Batch::default();
    for id in &s.nodes {
        let n = store.node(*id).await?.ok_or_else(|| StoreError::NotFound(format!("node {id}")))?;
        let cause = if n.state == NodeState::Contextualizing {
            Cause::AllocationAborted { reason: "test".into() }
        } else {
            Cause::Released
        };
        batch.nodes.push(
            NodeWrite::transition(&n, cause, Actor::Key(s.key_id), now)
                .map_err(|e| StoreError::Invalid(e.to_string()))?,
        );
    }
    let cause = if s.state == SessionState::Allocating {
        SessionCause::Aborted { reason: "test".into() }
    } else {
        SessionCause::Released
    };
    batch.sessions.push(SessionWrite::transition(&s, cause, now).map_err(|e| StoreError::Invalid(e.to_string()))?);
    store.commit(batch).await
}

/// Adding nodes: ids assigned, `Added` events written, lookups work, and a
/// duplicate hostname (in the store or in the same call) adds nothing.
pub async fn nodes_are_added_all_or_nothing(store: Arc<dyn Store>) {
    let added = store
        .add_nodes(
            vec![NewNode::new("a.example", Arch::X86_64), NewNode::new("b.example", Arch::Aarch64)],
            Actor::Operator,
            T0,
        )
        .await
        .expect("add");
    assert_eq!(added.len(), 2);
    assert_ne!(added[0].id, added[1].id);
    assert!(added.iter().all(|n| n.state == NodeState::Active && n.version == 1 && n.used_count == 0));
    let dup = store
        .add_nodes(
            vec![NewNode::new("c.example", Arch::X86_64), NewNode::new("a.example", Arch::X86_64)],
            Actor::Operator,
            T0,
        )
        .await;
    assert!(matches!(dup, Err(StoreError::Duplicate(_))), "{dup:?}");
    let twice = store
        .add_nodes(
            vec![NewNode::new("d.example", Arch::X86_64), NewNode::new("d.example", Arch::X86_64)],
            Actor::Operator,
            T0,
        )
        .await;
    assert!(matches!(twice, Err(StoreError::Duplicate(_))), "{twice:?}");
    let all = store.nodes().await.expect("nodes");
    assert_eq!(all.iter().map(|n| n.hostname.as_str()).collect::<Vec<_>>(), vec!["a.example", "b.example"]);
    assert_eq!(store.node_by_hostname("b.example").await.expect("read"), Some(added[1].clone()));
    assert_eq!(store.node(added[0].id).await.expect("read"), Some(added[0].clone()));
    assert_eq!(store.node_by_hostname("c.example").await.expect("read"), None);
    assert_eq!(store.node(NodeId(9_999_999)).await.expect("read"), None);
    let mut reserved = NewNode::new("r.example", Arch::X86_64);
    reserved.reserved = true;
    let r = store.add_nodes(vec![reserved], Actor::Operator, T0).await.expect("add reserved");
    assert_eq!(r[0].state, NodeState::Reserved);
    let ev = store.events(EventQuery::default()).await.expect("events");
    assert_eq!(ev.len(), 3);
    assert!(ev.iter().all(|e| e.cause == CauseKind::Added));
    let bad = store.add_nodes(vec![NewNode::new("bad host", Arch::X86_64)], Actor::Operator, T0).await;
    assert!(matches!(bad, Err(StoreError::Invalid(_))), "{bad:?}");
}

/// A batch is written only if every expected version matches; a stale
/// write anywhere in it writes nothing, not even its events.
pub async fn compare_and_set_is_all_or_nothing(store: Arc<dyn Store>) {
    let nodes = store
        .add_nodes(vec![NewNode::new("a", Arch::X86_64), NewNode::new("b", Arch::X86_64)], Actor::Operator, T0)
        .await
        .expect("add");
    let (a, b) = (&nodes[0], &nodes[1]);
    let wa = NodeWrite::transition(a, Cause::SetAdmin, Actor::Operator, T0).expect("legal");
    store.commit(Batch { nodes: vec![wa.clone()], ..Batch::default() }).await.expect("first write");
    // Same write again: its expected version is stale now.
    let again = store.commit(Batch { nodes: vec![wa], ..Batch::default() }).await;
    assert!(matches!(again, Err(CommitError::Conflict(_))), "{again:?}");
    // A batch with one fresh and one stale write writes neither.
    let wb = NodeWrite::transition(b, Cause::SetAdmin, Actor::Operator, T0).expect("legal");
    let stale_a = NodeWrite::transition(a, Cause::SetAdmin, Actor::Operator, T0).expect("legal");
    let mixed = store.commit(Batch { nodes: vec![wb, stale_a], ..Batch::default() }).await;
    assert!(matches!(mixed, Err(CommitError::Conflict(_))), "{mixed:?}");
    let b_now = store.node(b.id).await.expect("read").expect("exists");
    assert_eq!((b_now.state, b_now.version), (NodeState::Active, 1));
    let ev = store.events(EventQuery::default()).await.expect("events");
    assert_eq!(ev.len(), 3, "two Added and one SetAdmin, nothing from the refused batches");
    let a_now = store.node(a.id).await.expect("read").expect("exists");
    assert_eq!((a_now.state, a_now.version), (NodeState::Reserved, 2));
    // Writing a node that does not exist is a conflict too.
    let mut ghost = a_now.clone();
    ghost.id = NodeId(424_242);
    let w = NodeWrite::transition(&ghost, Cause::Recovered, Actor::Operator, T0).expect("legal");
    assert!(matches!(store.commit(Batch { nodes: vec![w], ..Batch::default() }).await, Err(CommitError::Conflict(_))));
}

/// Events come back in commit order with increasing `seq`, carry what the
/// core gave them, and filter by node, position and count.
pub async fn event_log_is_ordered_and_filtered(store: Arc<dyn Store>) {
    let ready = add_ready(&*store, "n", 3, &pool7()).await;
    let all = store.events(EventQuery::default()).await.expect("events");
    assert_eq!(all.len(), 3 + 3 * 2);
    assert!(all.windows(2).all(|w| w[0].seq < w[1].seq), "seq increases");
    let n1 = store.events(EventQuery { node: Some(ready[1].id), ..EventQuery::default() }).await.expect("events");
    let causes: Vec<_> = n1.iter().map(|e| (e.cause, e.from, e.to)).collect();
    assert_eq!(
        causes,
        vec![
            (CauseKind::Added, NodeState::Active, NodeState::Active),
            (CauseKind::InstallStarted, NodeState::Active, NodeState::Provisioning),
            (CauseKind::InstallSucceeded, NodeState::Provisioning, NodeState::Ready),
        ]
    );
    assert_eq!(n1[1].detail.as_deref(), Some("7/x86_64 (test)"));
    // Every field of the row is stored, the host key included.
    let stored = store.node(ready[1].id).await.expect("read").expect("exists");
    assert_eq!(stored, ready[1]);
    assert_eq!(stored.host_key, Some(format!("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIn{}", ready[1].id)));
    assert_eq!(n1[1].actor, Actor::Reconciler);
    let after =
        store.events(EventQuery { after_seq: all[4].seq, limit: 2, ..EventQuery::default() }).await.expect("events");
    assert_eq!(after, all[5..7].to_vec());
    check_history(&*store).await.expect("history replays");
}

/// A claim takes Ready nodes of the pool, least `used_count` first, then
/// lowest id; moves them to Contextualizing; bumps `used_count`; inserts
/// the session; and writes an `Allocated` event per node.
pub async fn claim_takes_least_used_first(store: Arc<dyn Store>) {
    let ready = add_ready(&*store, "n", 4, &pool7()).await;
    // Another pool's nodes are never taken.
    let other = PoolKey::new("6", Arch::X86_64, None);
    add_ready(&*store, "six", 2, &other).await;
    let first = claim_ok(&*store, claim_req("s1", 1, "p", 2, T0)).await;
    assert_eq!(first.nodes.iter().map(|n| n.id).collect::<Vec<_>>(), vec![ready[0].id, ready[1].id]);
    release(&*store, &first.session.id, T0).await.expect("release");
    // Nodes 0 and 1 were used once; put them back in the pool.
    for n in &ready[..2] {
        let cur = store.node(n.id).await.expect("read").expect("exists");
        add_back(&*store, &cur).await;
    }
    let second = claim_ok(&*store, claim_req("s2", 1, "p", 3, T0)).await;
    let ids: Vec<_> = second.nodes.iter().map(|n| n.id).collect();
    assert_eq!(ids, vec![ready[2].id, ready[3].id, ready[0].id], "unused first, then by id");
    let s = store.session(&SessionId("s2".into())).await.expect("read").expect("exists");
    assert_eq!(
        (s.state, s.nodes.clone(), s.project.as_str(), s.key_id),
        (SessionState::Allocating, ids.clone(), "p", KeyId(1))
    );
    for id in &ids {
        let n = store.node(*id).await.expect("read").expect("exists");
        assert_eq!(n.state, NodeState::Contextualizing);
        assert_eq!(n.session, Some(SessionId("s2".into())));
        assert!(n.used_count >= 1);
    }
    assert_eq!(second.nodes[2].used_count, 2);
    // A claim that delivers at once: nodes Deployed, session Prod, one event each.
    add_back(&*store, &store.node(ready[1].id).await.expect("read").expect("exists")).await;
    let mut direct = claim_req("s3", 1, "p", 1, T0);
    direct.deliver = Some(T0.plus(Duration::from_secs(3600)));
    let d = claim_ok(&*store, direct).await;
    assert_eq!((d.nodes[0].id, d.nodes[0].state), (ready[1].id, NodeState::Deployed));
    let s3 = store.session(&SessionId("s3".into())).await.expect("read").expect("exists");
    assert_eq!(
        (s3.state, s3.delivered_at, s3.lease_until),
        (SessionState::Prod, Some(T0), Some(T0.plus(Duration::from_secs(3600))))
    );
    let last = store.events(EventQuery { node: Some(ready[1].id), ..EventQuery::default() }).await.expect("events");
    assert_eq!(
        last.last().map(|e| (e.cause, e.from, e.to)),
        Some((CauseKind::Delivered, NodeState::Ready, NodeState::Deployed))
    );
    let ev = store.events(EventQuery { node: Some(ready[0].id), ..EventQuery::default() }).await.expect("events");
    assert_eq!(ev.iter().filter(|e| e.cause == CauseKind::Allocated).count(), 2);
    let counts = store.ready_counts().await.expect("counts");
    assert_eq!(counts, vec![(other, 2)], "the last Ready 7/x86_64 node was delivered");
    check_invariants(&*store).await.expect("invariants");
}

async fn add_back(store: &dyn Store, n: &Node) {
    let w =
        NodeWrite::transition(n, Cause::InstallStarted { image: pool7(), why: "test".into() }, Actor::Reconciler, T0)
            .expect("legal");
    let n = w.node.clone();
    store.commit(Batch { nodes: vec![w], ..Batch::default() }).await.expect("commit");
    let w =
        NodeWrite::transition(&n, Cause::InstallSucceeded { host_key: None }, Actor::Reconciler, T0).expect("legal");
    store.commit(Batch { nodes: vec![w], ..Batch::default() }).await.expect("commit");
}

/// Refused claims (too few nodes, quota, rate limit, duplicate session id)
/// write nothing at all.
pub async fn claim_refusals_write_nothing(store: Arc<dyn Store>) {
    add_ready(&*store, "n", 2, &pool7()).await;
    let before_nodes = store.nodes().await.expect("nodes");
    let before_events = store.events(EventQuery::default()).await.expect("events").len();
    let r = store.claim(claim_req("s1", 1, "p", 3, T0)).await.expect("store ok");
    assert_eq!(r, Err(ClaimRefusal::InsufficientNodes { requested: 3, available: 2 }));
    let mut other_pool = claim_req("s1", 1, "p", 1, T0);
    other_pool.pool = PoolKey::new("5", Arch::I386, None);
    assert_eq!(
        store.claim(other_pool).await.expect("store ok"),
        Err(ClaimRefusal::InsufficientNodes { requested: 1, available: 0 })
    );
    let mut q = claim_req("s1", 1, "p", 2, T0);
    q.default_quota = Some(1);
    assert_eq!(
        store.claim(q).await.expect("store ok"),
        Err(ClaimRefusal::QuotaExceeded { held: 0, requested: 2, quota: 1 })
    );
    assert_eq!(store.nodes().await.expect("nodes"), before_nodes);
    assert_eq!(store.events(EventQuery::default()).await.expect("events").len(), before_events);
    assert_eq!(store.session(&SessionId("s1".into())).await.expect("read"), None);
    assert!(store.live_sessions().await.expect("live").is_empty());
    claim_ok(&*store, claim_req("s1", 1, "p", 1, T0)).await;
    let dup = store.claim(claim_req("s1", 1, "p", 1, T0)).await;
    assert!(matches!(dup, Err(StoreError::Duplicate(_))), "{dup:?}");
    assert_eq!(store.live_sessions().await.expect("live").len(), 1);
    check_invariants(&*store).await.expect("invariants");
}

/// Many tasks claiming at once: every node goes to at most one session,
/// every successful claim got exactly its count, and the numbers add up.
pub async fn concurrent_claims_never_share_a_node(store: Arc<dyn Store>) {
    const NODES: usize = 40;
    add_ready(&*store, "n", NODES, &pool7()).await;
    let mut tasks = Vec::new();
    for t in 0..32u64 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            for i in 0..4u64 {
                let req = claim_req(&format!("s-{t}-{i}"), t, "p", 1 + (t % 3) as u32, T0);
                match store.claim(req).await {
                    Ok(Ok(c)) => got.push(c),
                    Ok(Err(ClaimRefusal::InsufficientNodes { .. })) => {}
                    other => panic!("unexpected claim result {other:?}"),
                }
            }
            got
        }));
    }
    let mut owner: HashMap<NodeId, SessionId> = HashMap::new();
    let mut claimed = 0;
    for t in tasks {
        for c in t.await.expect("task") {
            assert_eq!(c.nodes.len(), c.session.nodes.len());
            for n in &c.nodes {
                if let Some(prev) = owner.insert(n.id, c.session.id.clone()) {
                    panic!("node {} given to {prev} and {}", n.id, c.session.id);
                }
            }
            claimed += c.nodes.len();
        }
    }
    assert!((NODES - 2..=NODES).contains(&claimed), "claimed {claimed} of {NODES}");
    let nodes = store.nodes().await.expect("nodes");
    assert_eq!(nodes.iter().filter(|n| n.state == NodeState::Contextualizing).count(), claimed);
    check_invariants(&*store).await.expect("invariants");
    check_history(&*store).await.expect("history");
}

/// The quota counts nodes held by the project's live sessions, across its
/// keys, and frees up when a session ends.
pub async fn quota_counts_live_sessions(store: Arc<dyn Store>) {
    add_ready(&*store, "n", 6, &pool7()).await;
    let mut r = claim_req("a", 1, "proj", 2, T0);
    r.default_quota = Some(3);
    let a = claim_ok(&*store, r).await;
    let mut r = claim_req("b", 2, "proj", 2, T0);
    r.default_quota = Some(3);
    assert_eq!(store.claim(r).await.expect("ok"), Err(ClaimRefusal::QuotaExceeded { held: 2, requested: 2, quota: 3 }));
    let mut r = claim_req("c", 3, "other", 2, T0);
    r.default_quota = Some(3);
    claim_ok(&*store, r).await;
    release(&*store, &a.session.id, T0).await.expect("release");
    let mut r = claim_req("d", 2, "proj", 2, T0);
    r.default_quota = Some(3);
    claim_ok(&*store, r).await;
    check_invariants(&*store).await.expect("invariants");
    check_history(&*store).await.expect("history");
}

/// The rate limit counts the key's sessions created inside the window,
/// whatever became of them, and no other key's.
pub async fn rate_limit_counts_recent_sessions(store: Arc<dyn Store>) {
    add_ready(&*store, "n", 10, &pool7()).await;
    let limit = RateLimit { max: 2, window: Duration::from_secs(300) };
    let req = |sid: &str, key: u64, now: Timestamp| {
        let mut r = claim_req(sid, key, "p", 1, now);
        r.rate_limit = Some(limit);
        r
    };
    let first = claim_ok(&*store, req("s1", 1, T0)).await;
    release(&*store, &first.session.id, T0).await.expect("release");
    claim_ok(&*store, req("s2", 1, T0.plus(Duration::from_secs(10)))).await;
    assert_eq!(
        store.claim(req("s3", 1, T0.plus(Duration::from_secs(20)))).await.expect("ok"),
        Err(ClaimRefusal::RateLimited { recent: 2, limit })
    );
    claim_ok(&*store, req("s4", 2, T0.plus(Duration::from_secs(20)))).await;
    // Once the first session is out of the window, one more is allowed.
    claim_ok(&*store, req("s5", 1, T0.plus(Duration::from_secs(301)))).await;
    check_invariants(&*store).await.expect("invariants");
    check_history(&*store).await.expect("history");
}

/// Sessions are inserted once and updated only from the version read;
/// live sessions are listed by creation time and leave the list when done.
pub async fn sessions_are_compare_and_set(store: Arc<dyn Store>) {
    add_ready(&*store, "n", 3, &pool7()).await;
    let a = claim_ok(&*store, claim_req("sa", 1, "p", 1, T0.plus(Duration::from_secs(2)))).await;
    let b = claim_ok(&*store, claim_req("sb", 1, "p", 1, T0.plus(Duration::from_secs(1)))).await;
    let live: Vec<_> = store.live_sessions().await.expect("live").into_iter().map(|s| s.id.0).collect();
    assert_eq!(live, vec!["sb", "sa"], "ordered by creation time");
    let lease_until = T0.plus(Duration::from_secs(3600));
    let w = SessionWrite::transition(&a.session, SessionCause::Delivered { lease_until }, T0).expect("legal");
    let prod: Session = w.session.clone();
    store.commit(Batch { sessions: vec![w.clone()], ..Batch::default() }).await.expect("update");
    assert!(matches!(
        store.commit(Batch { sessions: vec![w], ..Batch::default() }).await,
        Err(CommitError::Conflict(_))
    ));
    let insert_again = SessionWrite { expected_version: None, session: b.session.clone() };
    assert!(matches!(
        store.commit(Batch { sessions: vec![insert_again], ..Batch::default() }).await,
        Err(CommitError::Conflict(_))
    ));
    assert_eq!(store.session(&a.session.id).await.expect("read"), Some(prod));
    release(&*store, &b.session.id, T0).await.expect("release");
    let live: Vec<_> = store.live_sessions().await.expect("live").into_iter().map(|s| s.id.0).collect();
    assert_eq!(live, vec!["sa"]);
    let ended = store.session(&b.session.id).await.expect("read").expect("kept");
    assert_eq!(ended.state, SessionState::Aborted, "an allocation that never delivered ends Aborted");
}

/// A session's expiry round-trips (set at delivery, moved by an
/// extension that leaves the lease alone), and `expired_sessions` lists
/// exactly the Prod sessions whose expiry has come, earliest first, then
/// by id, bounded by its limit: never an Allocating, Fail or ended one.
pub async fn sessions_expire_and_are_listed_by_expiry(store: Arc<dyn Store>) {
    add_ready(&*store, "n", 6, &pool7()).await;
    let at = |secs: u64| T0.plus(Duration::from_secs(secs));
    let deliver = |sid: &str, until: u64| {
        let mut r = claim_req(sid, 1, "p", 1, T0);
        r.deliver = Some(at(until));
        r
    };
    let s1 = claim_ok(&*store, deliver("s1", 100)).await.session;
    let s3 = claim_ok(&*store, deliver("s3", 50)).await.session;
    let s2 = claim_ok(&*store, deliver("s2", 50)).await.session;
    let f = claim_ok(&*store, deliver("f", 10)).await;
    claim_ok(&*store, claim_req("allocating", 1, "p", 1, T0)).await;
    let read = store.session(&s1.id).await.expect("read").expect("exists");
    assert_eq!((read.lease_until, read.expires_at), (Some(at(100)), Some(at(100))), "delivery sets the expiry");
    assert_eq!(read, s1, "the row round-trips");
    // The failed one keeps its hold, however far past its expiry.
    let hold_until = at(10_000);
    let mut batch = Batch::default();
    for n in &f.nodes {
        batch.nodes.push(
            NodeWrite::transition(n, Cause::FailedByUser { hold_until }, Actor::Key(KeyId(1)), at(5)).expect("legal"),
        );
    }
    batch
        .sessions
        .push(SessionWrite::transition(&f.session, SessionCause::FailedByUser { hold_until }, at(5)).expect("legal"));
    store.commit(batch).await.expect("fail");

    let ids = |v: Vec<Session>| v.into_iter().map(|s| s.id.0).collect::<Vec<_>>();
    assert_eq!(
        ids(store.expired_sessions(at(49), 10).await.expect("read")),
        Vec::<String>::new(),
        "only the Fail session is past its expiry, and a Fail session is never listed"
    );
    assert_eq!(ids(store.expired_sessions(at(50), 10).await.expect("read")), ["s2", "s3"], "by expiry, then id");
    assert_eq!(ids(store.expired_sessions(at(50), 1).await.expect("read")), ["s2"], "bounded");
    assert_eq!(ids(store.expired_sessions(at(100), 10).await.expect("read")), ["s2", "s3", "s1"]);

    // An extension moves the expiry and leaves the lease.
    let w = SessionWrite::transition(&s2, SessionCause::Extended { until: at(200), max_until: Some(at(300)) }, at(20))
        .expect("legal");
    store.commit(Batch { sessions: vec![w.clone()], ..Batch::default() }).await.expect("extend");
    let read = store.session(&s2.id).await.expect("read").expect("exists");
    assert_eq!(read, w.session);
    assert_eq!((read.lease_until, read.expires_at), (Some(at(50)), Some(at(200))));
    assert_eq!(ids(store.expired_sessions(at(100), 10).await.expect("read")), ["s3", "s1"]);

    // Released and expired sessions leave the list.
    release(&*store, &s3.id, at(60)).await.expect("release");
    let s1 = store.session(&s1.id).await.expect("read").expect("exists");
    let mut batch = Batch::default();
    for id in &s1.nodes {
        let n = store.node(*id).await.expect("read").expect("exists");
        batch.nodes.push(NodeWrite::transition(&n, Cause::SessionExpired, Actor::Reconciler, at(150)).expect("legal"));
    }
    batch.sessions.push(SessionWrite::transition(&s1, SessionCause::Expired, at(150)).expect("legal"));
    store.commit(batch).await.expect("expire");
    let ended = store.session(&s1.id).await.expect("read").expect("kept");
    assert_eq!((ended.state, ended.ended_at), (SessionState::Done, Some(at(150))));
    assert_eq!(ids(store.expired_sessions(at(150), 10).await.expect("read")), Vec::<String>::new());
    assert_eq!(
        ids(store.expired_sessions(at(1_000_000), 10).await.expect("read")),
        ["s2"],
        "a Fail session is never listed"
    );
    check_invariants(&*store).await.expect("invariants");
    check_history(&*store).await.expect("history");
}

/// A batch whose guard fails on the state it would leave writes nothing.
pub async fn guards_undo_the_whole_batch(store: Arc<dyn Store>) {
    add_ready(&*store, "n", 4, &pool7()).await;
    let mut held = Vec::new();
    for sid in ["f1", "f2"] {
        let c = claim_ok(&*store, claim_req(sid, 1, "proj", 2, T0)).await;
        // Deliver, then fail, the way the engine does.
        let mut batch = Batch::default();
        let mut nodes = Vec::new();
        for n in &c.nodes {
            let w = NodeWrite::transition(n, Cause::Prepared, Actor::Key(KeyId(1)), T0).expect("legal");
            nodes.push(w.node.clone());
            batch.nodes.push(w);
        }
        let w = SessionWrite::transition(&c.session, SessionCause::Delivered { lease_until: T0 }, T0).expect("legal");
        let s = w.session.clone();
        batch.sessions.push(w);
        store.commit(batch).await.expect("deliver");
        held.push((s, nodes));
    }
    let fail = |s: &Session, nodes: &[Node], max: u32| {
        let hold = T0.plus(Duration::from_secs(60));
        let mut batch = Batch::default();
        for n in nodes {
            batch.nodes.push(
                NodeWrite::transition(n, Cause::FailedByUser { hold_until: hold }, Actor::Key(KeyId(1)), T0)
                    .expect("legal"),
            );
        }
        batch
            .sessions
            .push(SessionWrite::transition(s, SessionCause::FailedByUser { hold_until: hold }, T0).expect("legal"));
        batch.guards.push(Guard::ProjectFailedNodesAtMost { project: "proj".into(), max });
        batch
    };
    store.commit(fail(&held[0].0, &held[0].1, 3)).await.expect("first fail fits");
    let before = store.events(EventQuery::default()).await.expect("events").len();
    let r = store.commit(fail(&held[1].0, &held[1].1, 3)).await;
    match r {
        Err(CommitError::GuardFailed { actual, .. }) => assert_eq!(actual, 4),
        other => panic!("expected the guard to fail: {other:?}"),
    }
    let s = store.session(&held[1].0.id).await.expect("read").expect("exists");
    assert_eq!(s.state, SessionState::Prod, "nothing written");
    for n in &held[1].1 {
        let cur = store.node(n.id).await.expect("read").expect("exists");
        assert_eq!((cur.state, cur.version), (NodeState::Deployed, n.version));
    }
    assert_eq!(store.events(EventQuery::default()).await.expect("events").len(), before);
    // Another project is not counted.
    let mut other = fail(&held[1].0, &held[1].1, 2);
    other.guards = vec![Guard::ProjectFailedNodesAtMost { project: "someone-else".into(), max: 0 }];
    store.commit(other).await.expect("other project's cap is not ours");
    check_invariants(&*store).await.expect("invariants");
}

/// Projects are created and updated; keys are stored by hash for existing
/// projects only, found by hash, and unique.
pub async fn projects_and_keys(store: Arc<dyn Store>) {
    let h = crate::hash_api_key("k1");
    let missing = store.add_api_key("nope", h, false, T0, None).await;
    assert!(matches!(missing, Err(StoreError::NotFound(_))), "{missing:?}");
    let p = Project { name: "proj".into(), quota: Some(5), ssh_keys: vec!["ssh-ed25519 AAAA test".into()] };
    store.upsert_project(p.clone()).await.expect("create");
    assert_eq!(store.project("proj").await.expect("read"), Some(p.clone()));
    let p2 = Project { quota: None, ..p };
    store.upsert_project(p2.clone()).await.expect("update");
    assert_eq!(store.project("proj").await.expect("read"), Some(p2));
    let k = store.add_api_key("proj", h, true, T0, None).await.expect("key");
    assert_eq!((k.project.as_str(), k.admin, k.hash), ("proj", true, h));
    let k2 = store.add_api_key("proj", crate::hash_api_key("k2"), false, T0, None).await.expect("second key");
    assert_ne!(k.id, k2.id);
    assert_eq!(store.api_key_by_hash(&h).await.expect("read"), Some(k));
    assert_eq!(store.api_key_by_hash(&crate::hash_api_key("k3")).await.expect("read"), None);
    assert!(matches!(store.add_api_key("proj", h, false, T0, None).await, Err(StoreError::Duplicate(_))));
    assert!(matches!(
        store.upsert_project(Project { name: "bad name".into(), quota: None, ssh_keys: vec![] }).await,
        Err(StoreError::Invalid(_))
    ));

    // Listed by name in byte order (capitals first), whatever the
    // database's collation would say, each as stored.
    let more = ["zeta", "alpha", "Beta", "beta-2", "beta"];
    for name in more {
        store.upsert_project(Project { name: name.into(), quota: Some(1), ssh_keys: vec![] }).await.expect("create");
    }
    let names: Vec<String> = store.projects().await.expect("list").into_iter().map(|p| p.name).collect();
    assert_eq!(names, ["Beta", "alpha", "beta", "beta-2", "proj", "zeta"]);
    let listed = store.projects().await.expect("list");
    assert_eq!(listed.iter().find(|p| p.name == "proj"), store.project("proj").await.expect("read").as_ref());
}

/// Keys are listed by id (all, or one project's) with their expiry;
/// revocation keeps the row, is idempotent (the first time stays), and is
/// seen by lookups by hash; an unknown id is `NotFound`.
pub async fn api_keys_are_listed_and_revoked(store: Arc<dyn Store>) {
    for name in ["alpha", "beta"] {
        store.upsert_project(Project { name: name.into(), quota: None, ssh_keys: vec![] }).await.expect("project");
    }
    assert!(store.api_keys(None).await.expect("list").is_empty());
    let later = T0.plus(Duration::from_secs(3600));
    let a1 = store.add_api_key("alpha", crate::hash_api_key("a1"), true, T0, None).await.expect("a1");
    let b1 = store.add_api_key("beta", crate::hash_api_key("b1"), false, T0, Some(later)).await.expect("b1");
    let a2 = store.add_api_key("alpha", crate::hash_api_key("a2"), false, T0, None).await.expect("a2");
    assert_eq!((b1.expires_at, b1.revoked_at, b1.last_used), (Some(later), None, None));
    assert_eq!(store.api_keys(None).await.expect("list"), vec![a1.clone(), b1.clone(), a2.clone()]);
    assert_eq!(store.api_keys(Some("alpha")).await.expect("list"), vec![a1.clone(), a2.clone()]);
    assert!(store.api_keys(Some("nobody")).await.expect("list").is_empty());
    assert_eq!(store.api_key_by_hash(&b1.hash).await.expect("read"), Some(b1.clone()), "expiry is stored");

    let t1 = T0.plus(Duration::from_secs(60));
    let revoked = store.revoke_api_key(a2.id, t1).await.expect("revoke");
    assert_eq!(revoked, ApiKeyRecord { revoked_at: Some(t1), ..a2.clone() });
    let again = store.revoke_api_key(a2.id, t1.plus(Duration::from_secs(60))).await.expect("revoke again");
    assert_eq!(again.revoked_at, Some(t1), "the first revocation time stays");
    assert_eq!(store.api_key_by_hash(&a2.hash).await.expect("read"), Some(revoked.clone()));
    assert_eq!(store.api_keys(Some("alpha")).await.expect("list"), vec![a1.clone(), revoked]);
    assert_eq!(store.api_key_by_hash(&a1.hash).await.expect("read"), Some(a1), "other keys untouched");
    let missing = store.revoke_api_key(KeyId(9999), t1).await;
    assert!(matches!(missing, Err(StoreError::NotFound(_))), "{missing:?}");
}

/// Key use is recorded for many keys in one call; `last_used` only ever
/// moves forward, and unknown ids are skipped.
pub async fn key_use_is_recorded_forward_only(store: Arc<dyn Store>) {
    store.upsert_project(Project { name: "p".into(), quota: None, ssh_keys: vec![] }).await.expect("project");
    let k1 = store.add_api_key("p", crate::hash_api_key("u1"), false, T0, None).await.expect("k1");
    let k2 = store.add_api_key("p", crate::hash_api_key("u2"), false, T0, None).await.expect("k2");
    let (t1, t2) = (T0.plus(Duration::from_secs(10)), T0.plus(Duration::from_secs(20)));
    store.record_key_use(vec![(k1.id, t2), (k2.id, t1), (KeyId(9999), t2)]).await.expect("record");
    store.record_key_use(vec![(k1.id, t1)]).await.expect("an older use");
    store.record_key_use(Vec::new()).await.expect("nothing to record");
    let keys = store.api_keys(None).await.expect("list");
    assert_eq!(keys.iter().map(|k| k.last_used).collect::<Vec<_>>(), vec![Some(t2), Some(t1)]);
    let k2_read = store.api_key_by_hash(&k2.hash).await.expect("read").expect("k2");
    assert_eq!(k2_read, ApiKeyRecord { last_used: Some(t1), ..k2 });
    assert_eq!(keys.len(), 2, "no key was made for an unknown id");
}

/// Pool targets are set and listed by pool; the pause flag swaps
/// atomically.
pub async fn pool_targets_and_pause_flag(store: Arc<dyn Store>) {
    assert!(store.pool_targets().await.expect("read").is_empty());
    for t in PoolTarget::seed_defaults() {
        store.set_pool_target(t).await.expect("set");
    }
    store.set_pool_target(PoolTarget { pool: pool7(), standby: 3 }).await.expect("update");
    let t = store.pool_targets().await.expect("read");
    assert_eq!(t.len(), 5);
    assert!(t.windows(2).all(|w| w[0].pool < w[1].pool), "ordered by pool");
    assert_eq!(t.iter().find(|x| x.pool == pool7()).map(|x| x.standby), Some(3));
    let arm = PoolKey::new("9", Arch::Aarch64, None);
    store.set_pool_target(PoolTarget { pool: arm.clone(), standby: 1 }).await.expect("set");
    assert!(
        store
            .pool_targets()
            .await
            .expect("read")
            .iter()
            .any(|x| x.pool == arm && x.pool.flavor.as_deref() == Some("tiny"))
    );
    assert!(!store.paused().await.expect("read"));
    assert!(!store.set_paused(true).await.expect("pause"));
    assert!(store.paused().await.expect("read"));
    assert!(store.set_paused(true).await.expect("pause again"));
    assert!(store.set_paused(false).await.expect("resume"));
    assert!(!store.paused().await.expect("read"));

    // The claim reads the flag in its own transaction: paused, it refuses
    // and writes nothing; resumed, the same claim goes through.
    add_ready(&*store, "p", 2, &pool7()).await;
    store.set_paused(true).await.expect("pause");
    let before = store.nodes().await.expect("read");
    let r = store.claim(claim_req("paused", 1, "proj", 1, Timestamp(50_000))).await.expect("claim");
    assert_eq!(r.err(), Some(ClaimRefusal::Paused), "a claim while paused is refused");
    assert_eq!(store.nodes().await.expect("read"), before, "a refused claim writes nothing");
    assert!(store.session(&SessionId("paused".into())).await.expect("read").is_none());
    store.set_paused(false).await.expect("resume");
    claim_ok(&*store, claim_req("paused", 1, "proj", 1, Timestamp(50_000))).await;
}

/// Fencing: every new leadership term gets a larger epoch; a fenced batch
/// is written only with the newest epoch handed out. A batch of an older
/// term (or of an epoch never handed out) is refused with
/// `StoreError::Fenced` and writes nothing, even when every version it
/// expects is current; the fence is checked before the versions. Unfenced
/// writes (API requests) are never refused by a term.
pub async fn fenced_writes_need_the_newest_epoch(store: Arc<dyn Store>) {
    let nodes = store
        .add_nodes(vec![NewNode::new("a", Arch::X86_64), NewNode::new("b", Arch::X86_64)], Actor::Operator, T0)
        .await
        .expect("add");
    let (a, b) = (&nodes[0], &nodes[1]);
    let e1 = store.new_leader_epoch().await.expect("term 1");
    let e2 = store.new_leader_epoch().await.expect("term 2");
    assert!(e1 >= 1 && e2 > e1, "epochs move forward: {e1}, {e2}");
    let set_admin = |n: &Node| {
        let w = NodeWrite::transition(n, Cause::SetAdmin, Actor::Reconciler, T0).expect("legal");
        Batch { nodes: vec![w], ..Batch::default() }
    };
    let fenced = |r: Result<(), CommitError>, epoch: u64, current: u64| match r {
        Err(CommitError::Store(StoreError::Fenced { epoch: e, current: c })) => {
            assert_eq!((e, c), (epoch, current), "the error names both epochs");
        }
        other => panic!("expected a fenced refusal of epoch {epoch} (current {current}): {other:?}"),
    };
    store.commit_fenced(set_admin(a), e2).await.expect("the current term writes");
    let before = store.events(EventQuery::default()).await.expect("events").len();
    fenced(store.commit_fenced(set_admin(b), e1).await, e1, e2);
    fenced(store.commit_fenced(set_admin(b), e2 + 1).await, e2 + 1, e2);
    // Stale versions too: the fence is what answers.
    fenced(store.commit_fenced(set_admin(a), e1).await, e1, e2);
    let b_now = store.node(b.id).await.expect("read").expect("exists");
    assert_eq!((b_now.state, b_now.version), (NodeState::Active, 1), "a refused batch writes nothing");
    assert_eq!(store.events(EventQuery::default()).await.expect("events").len(), before);
    // A new term fences the one before it.
    let e3 = store.new_leader_epoch().await.expect("term 3");
    assert!(e3 > e2);
    fenced(store.commit_fenced(set_admin(b), e2).await, e2, e3);
    store.commit_fenced(set_admin(b), e3).await.expect("the new term writes");
    // Unfenced writes do not care about terms.
    let a_now = store.node(a.id).await.expect("read").expect("exists");
    let w = NodeWrite::transition(&a_now, Cause::Recovered, Actor::Operator, T0).expect("legal");
    store.commit(Batch { nodes: vec![w], ..Batch::default() }).await.expect("an unfenced write");
    check_history(&*store).await.expect("history");
}

/// Writes a transition of a node as it is stored now, and returns the row.
async fn step(store: &dyn Store, id: NodeId, cause: Cause, now: Timestamp) -> Node {
    let n = store.node(id).await.expect("read").expect("exists");
    let w = NodeWrite::transition(&n, cause, Actor::Reconciler, now).expect("legal");
    let after = w.node.clone();
    store.commit(Batch { nodes: vec![w], ..Batch::default() }).await.expect("write");
    after
}

/// `nodes_in_states` returns exactly the nodes in the given states (a
/// state named twice counts once), ordered by id.
pub async fn nodes_in_states_filters_and_orders_by_id(store: Arc<dyn Store>) {
    let news = (0..3).map(|i| NewNode::new(format!("a{i}"), Arch::X86_64)).collect();
    store.add_nodes(news, Actor::Operator, T0).await.expect("add");
    add_ready(&*store, "r", 3, &pool7()).await;
    let mut reserved = NewNode::new("res", Arch::X86_64);
    reserved.reserved = true;
    store.add_nodes(vec![reserved], Actor::Operator, T0).await.expect("add reserved");
    store.add_nodes(vec![NewNode::new("a9", Arch::Aarch64)], Actor::Operator, T0).await.expect("add");
    let all = store.nodes().await.expect("nodes");
    let want =
        |states: &[NodeState]| -> Vec<Node> { all.iter().filter(|n| states.contains(&n.state)).cloned().collect() };
    for states in [
        vec![NodeState::Active],
        vec![NodeState::Ready],
        vec![NodeState::Ready, NodeState::Active],
        vec![NodeState::Active, NodeState::Reserved, NodeState::Active],
        vec![NodeState::Failed],
        vec![],
    ] {
        let got = store.nodes_in_states(&states).await.expect("read");
        assert_eq!(got, want(&states), "{states:?}");
        assert!(got.windows(2).all(|w| w[0].id < w[1].id), "ordered by id: {states:?}");
    }
    assert_eq!(store.nodes_in_states(&[NodeState::Active]).await.expect("read").len(), 4);
    // A node that moves leaves one list and joins the other.
    let moved = step(&*store, all[0].id, Cause::SetAdmin, T0).await;
    assert_eq!(moved.state, NodeState::Reserved);
    let active = store.nodes_in_states(&[NodeState::Active]).await.expect("read");
    assert!(!active.iter().any(|n| n.id == moved.id));
    let res = store.nodes_in_states(&[NodeState::Reserved]).await.expect("read");
    assert_eq!(res.first(), Some(&moved));
}

/// `stale_ready` returns Ready nodes installed at or before the time,
/// oldest install first, then lowest id, at most `limit` of them.
pub async fn stale_ready_is_oldest_first_and_bounded(store: Arc<dyn Store>) {
    let s = |secs: u64| T0.plus(Duration::from_secs(secs));
    let news = (0..6).map(|i| NewNode::new(format!("n{i}"), Arch::X86_64)).collect();
    let added = store.add_nodes(news, Actor::Operator, T0).await.expect("add");
    // Install times 30, 10, 20, 10, 40 s; the sixth stays Active.
    for (n, at) in added.iter().zip([30, 10, 20, 10, 40]) {
        step(&*store, n.id, Cause::InstallStarted { image: pool7(), why: "test".into() }, s(at)).await;
        step(&*store, n.id, Cause::InstallSucceeded { host_key: None }, s(at)).await;
    }
    let ids = |v: Vec<Node>| v.into_iter().map(|n| n.id).collect::<Vec<_>>();
    let (a, b, c, d) = (added[0].id, added[1].id, added[2].id, added[3].id);
    assert_eq!(ids(store.stale_ready(s(20), 10).await.expect("read")), vec![b, d, c]);
    assert_eq!(ids(store.stale_ready(s(20), 2).await.expect("read")), vec![b, d]);
    assert_eq!(ids(store.stale_ready(s(30), 10).await.expect("read")), vec![b, d, c, a]);
    assert!(store.stale_ready(s(9), 10).await.expect("read").is_empty());
    assert!(store.stale_ready(s(100), 0).await.expect("read").is_empty());
    let everything = store.stale_ready(s(100), 100).await.expect("read");
    assert_eq!(everything.len(), 5, "never the node without an install");
    for n in &everything {
        assert_eq!(Some(n), store.node(n.id).await.expect("read").as_ref(), "rows as stored");
    }
    // A node that leaves Ready is no longer stale.
    step(&*store, b, Cause::InstallStarted { image: pool7(), why: "stale".into() }, s(50)).await;
    assert_eq!(ids(store.stale_ready(s(20), 10).await.expect("read")), vec![d, c]);
}

/// `idle_nodes` lists the Active nodes of one kind of machine, least used
/// first, then by id, bounded.
pub async fn idle_nodes_are_least_used_first(store: Arc<dyn Store>) {
    let x86 = Hardware { arch: Arch::X86_64, flavor: None };
    assert!(store.idle_nodes(&x86, 10).await.expect("read").is_empty());
    let news = (0..4).map(|i| NewNode::new(format!("n{i}"), Arch::X86_64)).collect();
    let added = store.add_nodes(news, Actor::Operator, T0).await.expect("add");
    // Other kinds of machine, interleaved by id: never listed for x86_64
    // without a flavor, each listed for its own kind.
    let mut others = vec![NewNode::new("arm-tiny", Arch::Aarch64), NewNode::new("x86-big", Arch::X86_64)];
    others[0].flavor = Some("tiny".into());
    others[1].flavor = Some("big".into());
    let others = store.add_nodes(others, Actor::Operator, T0).await.expect("add");
    // Use n0 and n2 once: install, claim, release.
    let used = [added[0].clone(), added[2].clone()];
    for (i, n) in used.iter().enumerate() {
        add_back(&*store, n).await;
        let c = claim_ok(&*store, claim_req(&format!("u{i}"), 1, "p", 1, T0)).await;
        assert_eq!(c.nodes[0].id, n.id);
        release(&*store, &c.session.id, T0).await.expect("release");
    }
    let ids = |v: Vec<Node>| v.into_iter().map(|n| n.id).collect::<Vec<_>>();
    let all = ids(store.idle_nodes(&x86, 10).await.expect("read"));
    assert_eq!(all, vec![added[1].id, added[3].id, added[0].id, added[2].id], "unused first, then by id");
    assert_eq!(ids(store.idle_nodes(&x86, 3).await.expect("read")), all[..3].to_vec());
    assert!(store.idle_nodes(&x86, 0).await.expect("read").is_empty());
    for n in &others {
        let kind = Hardware::of(n);
        assert_eq!(ids(store.idle_nodes(&kind, 10).await.expect("read")), vec![n.id], "{kind}");
    }
    let arm_big = Hardware { arch: Arch::Aarch64, flavor: Some("big".into()) };
    assert!(store.idle_nodes(&arm_big, 10).await.expect("read").is_empty(), "arch and flavor must both match");
    // Leaving Active leaves the list; the rows are the stored ones.
    let n1 = store.node(added[1].id).await.expect("read").expect("exists");
    let w = NodeWrite::transition(&n1, Cause::SetAdmin, Actor::Operator, T0).expect("legal");
    store.commit(Batch { nodes: vec![w], ..Batch::default() }).await.expect("commit");
    let idle = store.idle_nodes(&x86, 10).await.expect("read");
    assert_eq!(ids(idle.clone()), vec![added[3].id, added[0].id, added[2].id]);
    for n in &idle {
        assert_eq!(Some(n), store.node(n.id).await.expect("read").as_ref());
    }
}

/// `ready_counts` counts Ready nodes per pool (every pool with one, in
/// pool order) and nothing else: not a node of another state carrying
/// the same image.
pub async fn ready_counts_count_ready_nodes_per_pool(store: Arc<dyn Store>) {
    assert!(store.ready_counts().await.expect("read").is_empty());
    let p6 = PoolKey::new("6", Arch::X86_64, None);
    add_ready(&*store, "a", 3, &pool7()).await;
    add_ready(&*store, "b", 1, &p6).await;
    store.add_nodes(vec![NewNode::new("idle", Arch::X86_64)], Actor::Operator, T0).await.expect("add");
    assert_eq!(store.ready_counts().await.expect("read"), vec![(p6.clone(), 1), (pool7(), 3)]);
    // A claimed node carries its image but is no longer Ready.
    claim_ok(&*store, claim_req("c", 1, "p", 2, T0)).await;
    assert_eq!(store.ready_counts().await.expect("read"), vec![(p6, 1), (pool7(), 1)]);
}

/// `nodes_after` pages through every node by id.
pub async fn nodes_after_pages_through_the_farm(store: Arc<dyn Store>) {
    assert!(store.nodes_after(NodeId(0), 10).await.expect("read").is_empty());
    let news = (0..5).map(|i| NewNode::new(format!("n{i}"), Arch::X86_64)).collect();
    store.add_nodes(news, Actor::Operator, T0).await.expect("add");
    add_ready(&*store, "r", 2, &pool7()).await;
    let all = store.nodes().await.expect("nodes");
    let mut seen = Vec::new();
    let mut cursor = NodeId(0);
    loop {
        let page = store.nodes_after(cursor, 3).await.expect("read");
        assert!(page.len() <= 3);
        assert!(page.iter().all(|n| n.id > cursor));
        let Some(last) = page.last() else { break };
        cursor = last.id;
        seen.extend(page);
    }
    assert_eq!(seen, all, "every node once, in id order");
    assert!(store.nodes_after(NodeId(0), 0).await.expect("read").is_empty());
    assert_eq!(store.nodes_after(all[1].id, 100).await.expect("read"), all[2..].to_vec());
    assert!(store.nodes_after(NodeId(u64::MAX), 10).await.expect("read").is_empty());
}

/// `latest_events` is the recent end of the log, newest first: the whole
/// log's or one node's, at most `limit` events.
pub async fn latest_events_are_newest_first_and_bounded(store: Arc<dyn Store>) {
    assert!(store.latest_events(None, 10).await.expect("read").is_empty());
    let ready = add_ready(&*store, "n", 3, &pool7()).await;
    let mut all = store.events(EventQuery::default()).await.expect("events");
    all.reverse();
    assert_eq!(store.latest_events(None, 4).await.expect("read"), all[..4].to_vec());
    assert_eq!(store.latest_events(None, 1000).await.expect("read"), all);
    assert!(store.latest_events(None, 0).await.expect("read").is_empty());
    let mut n1 = store.events(EventQuery { node: Some(ready[1].id), ..EventQuery::default() }).await.expect("events");
    n1.reverse();
    assert_eq!(store.latest_events(Some(ready[1].id), 100).await.expect("read"), n1);
    assert_eq!(store.latest_events(Some(ready[1].id), 2).await.expect("read"), n1[..2].to_vec());
    assert!(store.latest_events(Some(NodeId(424_242)), 5).await.expect("read").is_empty());
    assert!(store.latest_events(Some(NodeId(u64::MAX)), 5).await.expect("read").is_empty());
}

/// `node_counts` counts every node once, in its (image, kind of machine,
/// chassis, state) group, in that order, and lists no empty group.
pub async fn node_counts_group_the_farm(store: Arc<dyn Store>) {
    assert!(store.node_counts().await.expect("read").is_empty());
    let p6 = PoolKey::new("6", Arch::X86_64, None);
    add_ready(&*store, "a", 3, &pool7()).await;
    add_ready(&*store, "b", 1, &p6).await;
    let mut idle = NewNode::new("idle", Arch::Aarch64);
    idle.chassis = Some("c2".into());
    let mut reserved = NewNode::new("reserved", Arch::X86_64);
    reserved.chassis = Some("c1".into());
    reserved.reserved = true;
    let mut tiny = NewNode::new("tiny", Arch::X86_64);
    tiny.chassis = Some("c1".into());
    tiny.flavor = Some("tiny".into());
    store.add_nodes(vec![idle, reserved, tiny], Actor::Operator, T0).await.expect("add");
    claim_ok(&*store, claim_req("c", 1, "p", 2, T0)).await;
    let x86 = Hardware { arch: Arch::X86_64, flavor: None };
    let group = |image: Option<PoolKey>, hardware: &Hardware, chassis: Option<&str>, state| NodeGroup {
        image,
        hardware: hardware.clone(),
        chassis: chassis.map(String::from),
        state,
    };
    let expected = vec![
        NodeCount { group: group(None, &x86, Some("c1"), NodeState::Reserved), count: 1 },
        NodeCount {
            group: group(
                None,
                &Hardware { arch: Arch::X86_64, flavor: Some("tiny".into()) },
                Some("c1"),
                NodeState::Active,
            ),
            count: 1,
        },
        NodeCount {
            group: group(None, &Hardware { arch: Arch::Aarch64, flavor: None }, Some("c2"), NodeState::Active),
            count: 1,
        },
        NodeCount { group: group(Some(p6), &x86, None, NodeState::Ready), count: 1 },
        NodeCount { group: group(Some(pool7()), &x86, None, NodeState::Ready), count: 1 },
        NodeCount { group: group(Some(pool7()), &x86, None, NodeState::Contextualizing), count: 2 },
    ];
    let mut got = store.node_counts().await.expect("read");
    assert_eq!(got, expected);
    // The same, counted from every row.
    let mut counted: std::collections::BTreeMap<NodeGroup, u32> = std::collections::BTreeMap::new();
    for n in store.nodes().await.expect("nodes") {
        *counted.entry(NodeGroup::of(&n)).or_default() += 1;
    }
    got.sort_by(|a, b| a.group.cmp(&b.group));
    assert_eq!(got, counted.into_iter().map(|(group, count)| NodeCount { group, count }).collect::<Vec<_>>());
}

/// With `check_target`, a claim is refused (writing nothing) for a pool
/// with no standby target or a target of zero (`NoSuchPool`, listing the
/// pools that have one), and for more nodes than the target
/// (`OverCapacity`); these come before the pause flag. Without it, any
/// pool is claimed from.
pub async fn claim_checks_the_pool_target(store: Arc<dyn Store>) {
    add_ready(&*store, "n", 3, &pool7()).await;
    let checked = |sid: &str, count: u32| ClaimRequest { check_target: true, ..claim_req(sid, 1, "p", count, T0) };
    let before = store.nodes().await.expect("nodes");
    assert_eq!(
        store.claim(checked("s1", 1)).await.expect("store ok"),
        Err(ClaimRefusal::NoSuchPool { available: vec![] })
    );
    let other = PoolKey::new("9", Arch::X86_64, None);
    store.set_pool_target(PoolTarget { pool: other.clone(), standby: 2 }).await.expect("target");
    store.set_pool_target(PoolTarget { pool: pool7(), standby: 0 }).await.expect("target");
    assert_eq!(
        store.claim(checked("s1", 1)).await.expect("store ok"),
        Err(ClaimRefusal::NoSuchPool { available: vec![other] }),
        "a target of zero is no pool"
    );
    store.set_pool_target(PoolTarget { pool: pool7(), standby: 2 }).await.expect("target");
    store.set_paused(true).await.expect("pause");
    assert_eq!(
        store.claim(checked("s1", 3)).await.expect("store ok"),
        Err(ClaimRefusal::OverCapacity { requested: 3, standby: 2 }),
        "capacity before the pause flag"
    );
    assert_eq!(store.claim(checked("s1", 2)).await.expect("store ok"), Err(ClaimRefusal::Paused));
    store.set_paused(false).await.expect("resume");
    assert_eq!(store.nodes().await.expect("nodes"), before, "refusals write nothing");
    assert!(store.live_sessions().await.expect("live").is_empty());
    let c = claim_ok(&*store, checked("s1", 2)).await;
    assert_eq!(c.nodes.len(), 2);
    // Unchecked, the target does not matter.
    store.set_pool_target(PoolTarget { pool: pool7(), standby: 0 }).await.expect("target");
    claim_ok(&*store, claim_req("s2", 1, "p", 1, T0)).await;
    check_invariants(&*store).await.expect("invariants");
}

/// The quota is the project's own when it has one, else the request's
/// default; a project without one, or unknown to the store, gets the
/// default.
pub async fn claim_applies_the_projects_own_quota(store: Arc<dyn Store>) {
    add_ready(&*store, "n", 8, &pool7()).await;
    store.upsert_project(Project { name: "tight".into(), quota: Some(1), ssh_keys: vec![] }).await.expect("project");
    store.upsert_project(Project { name: "loose".into(), quota: None, ssh_keys: vec![] }).await.expect("project");
    let req = |sid: &str, project: &str, count: u32| ClaimRequest {
        default_quota: Some(3),
        ..claim_req(sid, 1, project, count, T0)
    };
    assert_eq!(
        store.claim(req("t1", "tight", 2)).await.expect("store ok"),
        Err(ClaimRefusal::QuotaExceeded { held: 0, requested: 2, quota: 1 }),
        "the project's own quota, though the default is larger"
    );
    claim_ok(&*store, req("t2", "tight", 1)).await;
    assert_eq!(
        store.claim(req("l1", "loose", 4)).await.expect("store ok"),
        Err(ClaimRefusal::QuotaExceeded { held: 0, requested: 4, quota: 3 }),
        "no quota of its own: the default"
    );
    claim_ok(&*store, req("l2", "loose", 3)).await;
    assert_eq!(
        store.claim(req("u1", "unknown", 4)).await.expect("store ok"),
        Err(ClaimRefusal::QuotaExceeded { held: 0, requested: 4, quota: 3 }),
        "a project the store does not know: the default"
    );
    // Raising a quota takes effect with the next claim.
    store.upsert_project(Project { name: "tight".into(), quota: Some(4), ssh_keys: vec![] }).await.expect("project");
    claim_ok(&*store, req("t3", "tight", 3)).await;
    check_invariants(&*store).await.expect("invariants");
}

/// Claims `count` nodes for key 1 and delivers them (session Prod, nodes
/// Deployed), the way the engine does without preparation.
async fn delivered(store: &dyn Store, sid: &str, project: &str, count: u32) -> Claimed {
    let lease = T0.plus(Duration::from_secs(3600));
    claim_ok(store, ClaimRequest { deliver: Some(lease), ..claim_req(sid, 1, project, count, T0) }).await
}

fn hand_back_req(sid: &SessionId, key: u64, kind: HandBackKind) -> HandBack {
    HandBack { session: sid.clone(), key_id: KeyId(key), kind, actor: Actor::Key(KeyId(key)), now: T0 }
}

/// Done releases a delivered session's nodes (Active, to be reinstalled)
/// and ends it; fail holds them (Failed, with the hold) and puts the
/// session in Fail, and a failed session can then be done. Every node
/// change carries its event; a node the session no longer holds is left
/// alone.
pub async fn hand_back_done_and_fail(store: Arc<dyn Store>) {
    add_ready(&*store, "n", 6, &pool7()).await;
    let a = delivered(&*store, "a", "proj", 2).await;
    let events_before = store.events(EventQuery::default()).await.expect("events").len();
    let s = store
        .hand_back(hand_back_req(&a.session.id, 1, HandBackKind::Done))
        .await
        .expect("no error")
        .expect("accepted");
    assert_eq!((s.state, s.version), (SessionState::Done, a.session.version + 1));
    assert_eq!(store.session(&a.session.id).await.expect("read"), Some(s));
    for n in &a.nodes {
        let n = store.node(n.id).await.expect("read").expect("exists");
        assert_eq!((n.state, n.session.as_ref()), (NodeState::Active, None));
    }
    assert_eq!(store.events(EventQuery::default()).await.expect("events").len(), events_before + 2);

    let hold_until = T0.plus(Duration::from_secs(600));
    let b = delivered(&*store, "b", "proj", 2).await;
    let fail = HandBackKind::Fail { hold_until, fail_cap: Some(2) };
    let s = store.hand_back(hand_back_req(&b.session.id, 1, fail)).await.expect("no error").expect("accepted");
    assert_eq!((s.state, s.hold_until), (SessionState::Fail, Some(hold_until)));
    for n in &b.nodes {
        let n = store.node(n.id).await.expect("read").expect("exists");
        assert_eq!(
            (n.state, n.hold_until, n.session.as_ref()),
            (NodeState::Failed, Some(hold_until), Some(&b.session.id))
        );
    }
    let s = store.hand_back(hand_back_req(&b.session.id, 1, HandBackKind::Done)).await.expect("no error");
    assert_eq!(s.map(|s| s.state), Ok(SessionState::Done), "a failed session can be released");

    // A node taken out of the session (by an operator's hold expiry, say)
    // is not touched by the session's done.
    let c = delivered(&*store, "c", "proj", 2).await;
    let gone = c.nodes[1].clone();
    let mut taken = gone.clone();
    taken.session = None;
    taken.state = NodeState::Active;
    taken.version += 1;
    let ev = crate::state::Event {
        seq: 0,
        node: gone.id,
        from: NodeState::Deployed,
        to: NodeState::Active,
        cause: CauseKind::Released,
        detail: None,
        actor: Actor::Operator,
        session: Some(c.session.id.clone()),
        at: T0,
    };
    store
        .commit(Batch {
            nodes: vec![NodeWrite { expected_version: gone.version, node: taken.clone(), event: ev }],
            ..Batch::default()
        })
        .await
        .expect("taken out");
    store.hand_back(hand_back_req(&c.session.id, 1, HandBackKind::Done)).await.expect("no error").expect("accepted");
    assert_eq!(store.node(gone.id).await.expect("read"), Some(taken), "not the session's any more: untouched");
    assert_eq!(store.node(c.nodes[0].id).await.expect("read").map(|n| n.state), Some(NodeState::Active));
    check_invariants(&*store).await.expect("invariants");
    check_history(&*store).await.expect("history");
}

/// A hand-back of an unknown session, of another key's session, or of a
/// session in a state the call refuses, and a fail over the project's cap,
/// all write nothing.
pub async fn hand_back_refusals_write_nothing(store: Arc<dyn Store>) {
    add_ready(&*store, "n", 5, &pool7()).await;
    let a = delivered(&*store, "a", "proj", 2).await;
    let b = delivered(&*store, "b", "proj", 2).await;
    let nodes_before = store.nodes().await.expect("nodes");
    let events_before = store.events(EventQuery::default()).await.expect("events").len();
    let unknown = SessionId("nope".into());
    assert_eq!(
        store.hand_back(hand_back_req(&unknown, 1, HandBackKind::Done)).await.expect("no error"),
        Err(HandBackRefusal::UnknownSession)
    );
    assert_eq!(
        store.hand_back(hand_back_req(&a.session.id, 2, HandBackKind::Done)).await.expect("no error"),
        Err(HandBackRefusal::UnknownSession),
        "another key's session looks unknown"
    );
    let hold_until = T0.plus(Duration::from_secs(600));
    let over_cap = HandBackKind::Fail { hold_until, fail_cap: Some(1) };
    match store.hand_back(hand_back_req(&a.session.id, 1, over_cap)).await {
        Err(CommitError::GuardFailed { actual, .. }) => assert_eq!(actual, 2),
        other => panic!("expected the fail cap to refuse: {other:?}"),
    }
    assert_eq!(store.nodes().await.expect("nodes"), nodes_before);
    assert_eq!(store.events(EventQuery::default()).await.expect("events").len(), events_before);
    assert_eq!(store.session(&a.session.id).await.expect("read").map(|s| s.state), Some(SessionState::Prod));

    store.hand_back(hand_back_req(&b.session.id, 1, HandBackKind::Done)).await.expect("no error").expect("done");
    let fail = HandBackKind::Fail { hold_until, fail_cap: None };
    for kind in [HandBackKind::Done, fail] {
        assert_eq!(
            store.hand_back(hand_back_req(&b.session.id, 1, kind)).await.expect("no error"),
            Err(HandBackRefusal::NotInProd { state: SessionState::Done })
        );
    }
    store.hand_back(hand_back_req(&a.session.id, 1, fail)).await.expect("no error").expect("failed");
    assert_eq!(
        store.hand_back(hand_back_req(&a.session.id, 1, fail)).await.expect("no error"),
        Err(HandBackRefusal::NotInProd { state: SessionState::Fail }),
        "a failed session cannot fail again"
    );
    let undelivered = claim_ok(&*store, claim_req("u", 1, "proj", 1, T0)).await;
    assert_eq!(
        store.hand_back(hand_back_req(&undelivered.session.id, 1, HandBackKind::Done)).await.expect("no error"),
        Err(HandBackRefusal::NotInProd { state: SessionState::Allocating })
    );
    check_invariants(&*store).await.expect("invariants");
    check_history(&*store).await.expect("history");
}

/// `commit_each` answers each batch as `commit` would: the good ones are
/// written, a conflicting one and one whose guard fails are not, and none
/// depends on another.
pub async fn commit_each_commits_each_batch_on_its_own(store: Arc<dyn Store>) {
    let nodes = store
        .add_nodes((0..3).map(|i| NewNode::new(format!("e{i}"), Arch::X86_64)).collect(), Actor::Operator, T0)
        .await
        .expect("add");
    let start = |n: &Node| {
        let cause = Cause::InstallStarted { image: pool7(), why: "test".into() };
        NodeWrite::transition(n, cause, Actor::Reconciler, T0).expect("legal")
    };
    let good = start(&nodes[0]);
    let mut stale = start(&nodes[1]);
    stale.expected_version += 7;
    stale.node.version += 7;
    let mut guarded = Batch { nodes: vec![start(&nodes[2])], ..Batch::default() };
    guarded.guards.push(Guard::ProjectFailedNodesAtMost { project: "p".into(), max: 0 });
    let answers = store
        .commit_each(vec![
            Batch { nodes: vec![good.clone()], ..Batch::default() },
            Batch { nodes: vec![stale], ..Batch::default() },
            guarded,
        ])
        .await;
    assert_eq!(answers.len(), 3);
    assert!(answers[0].is_ok(), "{:?}", answers[0]);
    assert!(matches!(answers[1], Err(CommitError::Conflict(_))), "{:?}", answers[1]);
    assert!(answers[2].is_ok(), "a guard that holds: {:?}", answers[2]);
    assert_eq!(store.node(nodes[0].id).await.expect("read"), Some(good.node));
    assert_eq!(
        store.node(nodes[1].id).await.expect("read"),
        Some(nodes[1].clone()),
        "the conflicting batch wrote nothing"
    );
    assert!(store.commit_each(Vec::new()).await.is_empty());
    check_history(&*store).await.expect("history");
}

// ----- install tickets (the PXE installer's pending installs) -----

/// The store's install tickets: every backend of the project keeps them.
fn tickets_of(store: &Arc<dyn Store>) -> Arc<dyn InstallTickets> {
    store.clone().install_tickets().expect("the store keeps install tickets (Store::install_tickets)")
}

const NODE_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 11));
const OTHER_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 12));

fn ticket(id: &str, host: &str, expires_at: Timestamp) -> InstallTicket {
    InstallTicket {
        id: TicketId(id.into()),
        hostname: host.into(),
        ip: NODE_IP,
        hardware_arch: Arch::X86_64,
        image: pool7(),
        expires_at,
    }
}

fn granted(access: TicketAccess) -> InstallTicket {
    match access {
        TicketAccess::Granted(t) => t,
        other => panic!("expected the ticket to be granted: {other:?}"),
    }
}

fn done(key: &str) -> TicketOutcome {
    TicketOutcome::Done { host_key: Some(key.into()) }
}

/// A ticket is found by the hash of a token it was issued, only from its
/// node's address; it is used once; a request from another address
/// changes nothing; the waiting installer takes the outcome.
pub async fn install_tickets_are_single_use_and_bound_to_the_address(store: Arc<dyn Store>) {
    let t = tickets_of(&store);
    let later = T0.plus(Duration::from_secs(3600));
    let reg = ticket("a1", "n1.example.org", later);
    assert_eq!(t.register_ticket(reg.clone()).await.expect("register"), None);
    assert_eq!(t.pending_tickets().await.expect("count"), 1);
    let rec = t.ticket_of_host("n1.example.org").await.expect("read").expect("registered");
    assert_eq!((rec.ticket.clone(), rec.state), (reg.clone(), TicketState::Pending));
    assert_eq!(t.ticket_of_host("n2.example.org").await.expect("read"), None);
    let tok = TokenHash::of("token-1");
    // Not issued yet: unknown.
    assert_eq!(t.ticket_by_token(&tok, NODE_IP, T0).await.expect("read"), TicketAccess::Unknown);
    // Issued only to the node's address.
    let wrong = t.issue_ticket_token("n1.example.org", &reg.id, tok, OTHER_IP, T0).await.expect("issue");
    assert!(
        matches!(wrong, TicketAccess::WrongAddress { ref hostname, ip } if hostname == "n1.example.org" && ip == NODE_IP),
        "{wrong:?}"
    );
    assert_eq!(t.ticket_by_token(&tok, NODE_IP, T0).await.expect("read"), TicketAccess::Unknown, "nothing issued");
    assert_eq!(granted(t.issue_ticket_token("n1.example.org", &reg.id, tok, NODE_IP, T0).await.expect("issue")), reg);
    // Issuing for another registration of the host is refused.
    let zz = TicketId("zz".into());
    let stale = t.issue_ticket_token("n1.example.org", &zz, TokenHash::of("x"), NODE_IP, T0);
    assert_eq!(stale.await.expect("issue"), TicketAccess::Unknown);
    assert_eq!(granted(t.ticket_by_token(&tok, NODE_IP, T0).await.expect("read")), reg);
    // An IPv4-mapped IPv6 peer is the IPv4 address.
    let mapped = IpAddr::V6(Ipv4Addr::new(10, 0, 0, 11).to_ipv6_mapped());
    assert_eq!(granted(t.ticket_by_token(&tok, mapped, T0).await.expect("read")), reg);
    assert!(matches!(t.ticket_by_token(&tok, OTHER_IP, T0).await.expect("read"), TicketAccess::WrongAddress { .. }));
    // Another address cannot use it, and changes nothing.
    let w = t.use_ticket(&tok, OTHER_IP, T0, done("forged")).await.expect("use");
    assert!(matches!(w, TicketAccess::WrongAddress { .. }), "{w:?}");
    assert_eq!(t.ticket_of_host("n1.example.org").await.expect("read").expect("there").state, TicketState::Pending);
    assert_eq!(
        t.settle_ticket("n1.example.org", &reg.id, Settle::Poll).await.expect("poll"),
        Some(TicketState::Pending)
    );
    // The node uses it, once.
    assert_eq!(granted(t.use_ticket(&tok, NODE_IP, T0, done("key-1")).await.expect("use")), reg);
    assert_eq!(t.use_ticket(&tok, NODE_IP, T0, done("key-2")).await.expect("use"), TicketAccess::Unknown);
    let fail = TicketOutcome::Failed { reason: "late".into() };
    assert_eq!(t.use_ticket(&tok, NODE_IP, T0, fail).await.expect("use"), TicketAccess::Unknown);
    assert_eq!(t.ticket_by_token(&tok, NODE_IP, T0).await.expect("read"), TicketAccess::Unknown);
    assert_eq!(t.pending_tickets().await.expect("count"), 0);
    let again = t.issue_ticket_token("n1.example.org", &reg.id, TokenHash::of("t2"), NODE_IP, T0).await;
    assert_eq!(again.expect("issue"), TicketAccess::Unknown, "a used ticket issues no token");
    // The installer takes the first outcome; the ticket is then gone.
    let other_id = TicketId("other".into());
    assert_eq!(t.settle_ticket("n1.example.org", &other_id, Settle::Poll).await.expect("poll"), None);
    assert_eq!(
        t.settle_ticket("n1.example.org", &reg.id, Settle::Poll).await.expect("poll"),
        Some(TicketState::Used(done("key-1")))
    );
    assert_eq!(t.settle_ticket("n1.example.org", &reg.id, Settle::Poll).await.expect("poll"), None);
    assert_eq!(t.ticket_of_host("n1.example.org").await.expect("read"), None);
    assert_eq!(t.use_ticket(&tok, NODE_IP, T0, done("key-3")).await.expect("use"), TicketAccess::Unknown);
}

/// A host's new registration replaces its ticket (pending, used or a
/// tombstone) and every token of it; the replaced one's installer learns
/// it is gone. A cancelled ticket is gone; a tombstone outlives a cancel.
pub async fn install_tickets_are_replaced_by_the_hosts_next_registration(store: Arc<dyn Store>) {
    let t = tickets_of(&store);
    let later = T0.plus(Duration::from_secs(3600));
    let first = ticket("b1", "n3.example.org", later);
    let neighbour = ticket("b9", "n4.example.org", later);
    t.register_ticket(first.clone()).await.expect("register");
    t.register_ticket(neighbour.clone()).await.expect("register");
    let (old, other) = (TokenHash::of("old"), TokenHash::of("neighbour"));
    granted(t.issue_ticket_token("n3.example.org", &first.id, old, NODE_IP, T0).await.expect("issue"));
    granted(t.issue_ticket_token("n4.example.org", &neighbour.id, other, NODE_IP, T0).await.expect("issue"));
    let second =
        InstallTicket { image: PoolKey::new("8", Arch::X86_64, None), ..ticket("b2", "n3.example.org", later) };
    assert_eq!(t.register_ticket(second.clone()).await.expect("register"), Some(first.id.clone()));
    assert_eq!(t.pending_tickets().await.expect("count"), 2);
    assert_eq!(t.ticket_by_token(&old, NODE_IP, T0).await.expect("read"), TicketAccess::Unknown);
    assert_eq!(t.use_ticket(&old, NODE_IP, T0, done("k")).await.expect("use"), TicketAccess::Unknown);
    assert_eq!(t.settle_ticket("n3.example.org", &first.id, Settle::Poll).await.expect("poll"), None);
    assert_eq!(t.settle_ticket("n3.example.org", &first.id, Settle::Cancel).await.expect("cancel"), None);
    let rec = t.ticket_of_host("n3.example.org").await.expect("read").expect("there");
    assert_eq!((rec.ticket, rec.state), (second.clone(), TicketState::Pending), "the old cancel removed nothing");
    // The neighbour is untouched.
    assert_eq!(granted(t.ticket_by_token(&other, NODE_IP, T0).await.expect("read")), neighbour);
    // A used ticket is replaced too (its outcome was never taken).
    let new = TokenHash::of("new");
    granted(t.issue_ticket_token("n3.example.org", &second.id, new, NODE_IP, T0).await.expect("issue"));
    granted(t.use_ticket(&new, NODE_IP, T0, done("k")).await.expect("use"));
    let third = ticket("b3", "n3.example.org", T0.plus(Duration::from_secs(1)));
    assert_eq!(t.register_ticket(third.clone()).await.expect("register"), Some(second.id.clone()));
    // A tombstone: replaced silently (nobody waits for it), its tokens gone.
    let late = TokenHash::of("late");
    granted(t.issue_ticket_token("n3.example.org", &third.id, late, NODE_IP, T0).await.expect("issue"));
    assert_eq!(
        t.settle_ticket("n3.example.org", &third.id, Settle::Expire).await.expect("expire"),
        Some(TicketState::Expired)
    );
    assert_eq!(
        t.settle_ticket("n3.example.org", &third.id, Settle::Cancel).await.expect("cancel"),
        Some(TicketState::Expired),
        "a tombstone outlives a cancel"
    );
    assert!(matches!(t.ticket_by_token(&late, NODE_IP, T0).await.expect("read"), TicketAccess::Expired { .. }));
    let fourth = ticket("b4", "n3.example.org", later);
    assert_eq!(t.register_ticket(fourth.clone()).await.expect("register"), None);
    assert_eq!(t.ticket_by_token(&late, NODE_IP, T0).await.expect("read"), TicketAccess::Unknown);
    // Cancelled: gone, with its tokens.
    let c = TokenHash::of("cancelled");
    granted(t.issue_ticket_token("n3.example.org", &fourth.id, c, NODE_IP, T0).await.expect("issue"));
    assert_eq!(
        t.settle_ticket("n3.example.org", &fourth.id, Settle::Cancel).await.expect("cancel"),
        Some(TicketState::Pending)
    );
    assert_eq!(t.ticket_of_host("n3.example.org").await.expect("read"), None);
    assert_eq!(t.ticket_by_token(&c, NODE_IP, T0).await.expect("read"), TicketAccess::Unknown);
    assert_eq!(t.pending_tickets().await.expect("count"), 1);
}

/// From its deadline on, a ticket answers "expired" to its node's
/// address and "unknown" to any other; a callback after the deadline
/// turns it into a tombstone in the same step; the installer that gives
/// up on it makes it one too. Tombstones stay until the host registers
/// again.
pub async fn expired_install_tickets_become_tombstones(store: Arc<dyn Store>) {
    let t = tickets_of(&store);
    let deadline = T0.plus(Duration::from_secs(60));
    let a = ticket("c1", "n5.example.org", deadline);
    t.register_ticket(a.clone()).await.expect("register");
    let tok = TokenHash::of("c1-token");
    granted(t.issue_ticket_token("n5.example.org", &a.id, tok, NODE_IP, T0).await.expect("issue"));
    let just_before = deadline.minus(Duration::from_millis(1));
    granted(t.ticket_by_token(&tok, NODE_IP, just_before).await.expect("read"));
    // At the deadline: no new token, the kickstart is refused; nothing
    // changes until the ticket is used.
    let late = t.issue_ticket_token("n5.example.org", &a.id, TokenHash::of("c1-late"), NODE_IP, deadline).await;
    assert!(matches!(late.expect("issue"), TicketAccess::Expired { ref hostname } if hostname == "n5.example.org"));
    assert!(matches!(t.ticket_by_token(&tok, NODE_IP, deadline).await.expect("read"), TicketAccess::Expired { .. }));
    assert_eq!(t.ticket_of_host("n5.example.org").await.expect("read").expect("there").state, TicketState::Pending);
    // Another address: unknown, and nothing changes.
    let w = t.use_ticket(&tok, OTHER_IP, deadline, done("k")).await.expect("use");
    assert!(matches!(w, TicketAccess::WrongAddress { .. }), "{w:?}");
    assert_eq!(t.ticket_of_host("n5.example.org").await.expect("read").expect("there").state, TicketState::Pending);
    // The node, late: expired, and the ticket is a tombstone.
    let e = t.use_ticket(&tok, NODE_IP, deadline, done("k")).await.expect("use");
    assert!(matches!(e, TicketAccess::Expired { ref hostname } if hostname == "n5.example.org"), "{e:?}");
    assert_eq!(t.ticket_of_host("n5.example.org").await.expect("read").expect("there").state, TicketState::Expired);
    assert_eq!(t.pending_tickets().await.expect("count"), 0);
    // Still expired to the node (even "before" the deadline: a tombstone is
    // final), unknown to anyone else.
    assert!(matches!(t.use_ticket(&tok, NODE_IP, T0, done("k")).await.expect("use"), TicketAccess::Expired { .. }));
    assert!(matches!(t.ticket_by_token(&tok, OTHER_IP, T0).await.expect("read"), TicketAccess::WrongAddress { .. }));
    // Its installer is told, and the tombstone stays.
    assert_eq!(t.settle_ticket("n5.example.org", &a.id, Settle::Poll).await.expect("poll"), Some(TicketState::Expired));
    assert_eq!(
        t.settle_ticket("n5.example.org", &a.id, Settle::Expire).await.expect("expire"),
        Some(TicketState::Expired)
    );
    assert!(matches!(t.ticket_by_token(&tok, NODE_IP, T0).await.expect("read"), TicketAccess::Expired { .. }));

    // The installer gives up first: a pending ticket becomes a tombstone.
    let b = ticket("c2", "n6.example.org", deadline);
    t.register_ticket(b.clone()).await.expect("register");
    let tb = TokenHash::of("c2-token");
    granted(t.issue_ticket_token("n6.example.org", &b.id, tb, NODE_IP, T0).await.expect("issue"));
    assert_eq!(
        t.settle_ticket("n6.example.org", &b.id, Settle::Expire).await.expect("expire"),
        Some(TicketState::Expired)
    );
    assert!(matches!(t.use_ticket(&tb, NODE_IP, T0, done("k")).await.expect("use"), TicketAccess::Expired { .. }));
    // A callback that came just in time is taken by the expiring installer.
    let c = ticket("c3", "n7.example.org", deadline);
    t.register_ticket(c.clone()).await.expect("register");
    let tc = TokenHash::of("c3-token");
    granted(t.issue_ticket_token("n7.example.org", &c.id, tc, NODE_IP, T0).await.expect("issue"));
    granted(t.use_ticket(&tc, NODE_IP, just_before, done("in-time")).await.expect("use"));
    assert_eq!(
        t.settle_ticket("n7.example.org", &c.id, Settle::Expire).await.expect("expire"),
        Some(TicketState::Used(done("in-time")))
    );
    assert_eq!(t.ticket_of_host("n7.example.org").await.expect("read"), None);
}

/// Many callbacks with one token at once: exactly one uses the ticket,
/// and its outcome is the one recorded.
pub async fn concurrent_uses_of_one_install_token_grant_exactly_one(store: Arc<dyn Store>) {
    let t = tickets_of(&store);
    let a = ticket("d1", "n8.example.org", T0.plus(Duration::from_secs(3600)));
    t.register_ticket(a.clone()).await.expect("register");
    let tok = TokenHash::of("d1-token");
    granted(t.issue_ticket_token("n8.example.org", &a.id, tok, NODE_IP, T0).await.expect("issue"));
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let t = t.clone();
            tokio::spawn(async move { (i, t.use_ticket(&tok, NODE_IP, T0, done(&format!("key-{i}"))).await) })
        })
        .collect();
    let mut winners = Vec::new();
    for task in tasks {
        let (i, r) = task.await.expect("task");
        match r.expect("use") {
            TicketAccess::Granted(_) => winners.push(i),
            TicketAccess::Unknown => {}
            other => panic!("unexpected answer {other:?}"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one callback uses the ticket: {winners:?}");
    assert_eq!(
        t.settle_ticket("n8.example.org", &a.id, Settle::Poll).await.expect("poll"),
        Some(TicketState::Used(done(&format!("key-{}", winners[0]))))
    );
}

/// A ticket keeps the newest [`MAX_TICKET_TOKENS`] tokens it was issued;
/// issuing one it has changes nothing.
pub async fn install_ticket_tokens_are_bounded(store: Arc<dyn Store>) {
    let t = tickets_of(&store);
    let a = ticket("e1", "n9.example.org", T0.plus(Duration::from_secs(3600)));
    t.register_ticket(a.clone()).await.expect("register");
    let toks: Vec<_> = (0..MAX_TICKET_TOKENS + 2).map(|i| TokenHash::of(&format!("e1-{i}"))).collect();
    for (i, tok) in toks.iter().enumerate() {
        granted(t.issue_ticket_token("n9.example.org", &a.id, *tok, NODE_IP, T0).await.expect("issue"));
        // Issuing the first one again keeps it while there is room.
        if i < MAX_TICKET_TOKENS {
            granted(t.issue_ticket_token("n9.example.org", &a.id, toks[0], NODE_IP, T0).await.expect("issue"));
        }
    }
    for (i, tok) in toks.iter().enumerate() {
        let access = t.ticket_by_token(tok, NODE_IP, T0).await.expect("read");
        if i < 2 {
            assert_eq!(access, TicketAccess::Unknown, "token {i} was among the oldest");
        } else {
            granted(access);
        }
    }
    // Any of the kept ones uses the ticket; then none works.
    granted(t.use_ticket(&toks[5], NODE_IP, T0, done("k")).await.expect("use"));
    assert_eq!(t.use_ticket(&toks[9], NODE_IP, T0, done("k")).await.expect("use"), TicketAccess::Unknown);
}

/// A leader's wave of writes ([`Store::commit_each_fenced`]): with the
/// newest epoch each batch is written or refused on its own, as
/// [`Store::commit_fenced`] would (a stale version is a conflict that
/// writes nothing, its event included, and stops no other batch); with an
/// older epoch every batch is refused as fenced and nothing is written.
pub async fn commit_each_fenced_writes_each_on_its_own_within_the_term(store: Arc<dyn Store>) {
    let nodes = store
        .add_nodes((0..4).map(|i| NewNode::new(format!("w{i}"), Arch::X86_64)).collect(), Actor::Operator, T0)
        .await
        .expect("add");
    let e1 = store.new_leader_epoch().await.expect("term 1");
    let e2 = store.new_leader_epoch().await.expect("term 2");
    let start = |n: &Node| {
        let cause = Cause::InstallStarted { image: pool7(), why: "test".into() };
        Batch {
            nodes: vec![NodeWrite::transition(n, cause, Actor::Reconciler, T0).expect("legal")],
            ..Batch::default()
        }
    };
    let mut stale = start(&nodes[1]);
    stale.nodes[0].expected_version += 7;
    stale.nodes[0].node.version += 7;
    let events_before = store.events(EventQuery::default()).await.expect("events").len();
    let answers = store.commit_each_fenced(vec![start(&nodes[0]), stale, start(&nodes[2])], e2).await;
    assert_eq!(answers.len(), 3);
    assert!(answers[0].is_ok(), "{:?}", answers[0]);
    assert!(matches!(answers[1], Err(CommitError::Conflict(_))), "{:?}", answers[1]);
    assert!(answers[2].is_ok(), "{:?}", answers[2]);
    let now = |i: usize| {
        let store = store.clone();
        let id = nodes[i].id;
        async move { store.node(id).await.expect("read").expect("exists") }
    };
    assert_eq!(now(0).await.state, NodeState::Provisioning);
    assert_eq!(now(1).await, nodes[1], "the conflicting batch wrote nothing");
    assert_eq!(now(2).await.state, NodeState::Provisioning);
    assert_eq!(
        store.events(EventQuery::default()).await.expect("events").len(),
        events_before + 2,
        "an event with each write that applied, none with the conflict"
    );
    // A former term: every batch refused, nothing written.
    let answers = store.commit_each_fenced(vec![start(&nodes[1]), start(&nodes[3])], e1).await;
    assert_eq!(answers.len(), 2);
    for a in &answers {
        match a {
            Err(CommitError::Store(StoreError::Fenced { epoch, current })) => assert_eq!((*epoch, *current), (e1, e2)),
            other => panic!("expected a fenced refusal: {other:?}"),
        }
    }
    assert_eq!(now(1).await, nodes[1]);
    assert_eq!(now(3).await, nodes[3]);
    assert_eq!(store.events(EventQuery::default()).await.expect("events").len(), events_before + 2);
    assert!(store.commit_each_fenced(Vec::new(), e2).await.is_empty());
    check_history(&*store).await.expect("history");
}
