//! Several processes on one database, at the store level (each `PgStore`
//! is what one replica opens: its own pool and control connection):
//! quotas and rate limits exact across them, allocations of dead processes
//! found and those of live ones left alone, key changes seen by every
//! process before they are acknowledged, one leader at a time whose former
//! terms are fenced, and event retention.

mod common;

use std::sync::Arc;
use std::time::Duration;

use duffy_backend_postgres::test_cluster::TestDatabase;
use duffy_backend_postgres::{PgOptions, PgStore, PgTestHooks};
use duffy_core::testkit::ManualClock;
use duffy_core::testkit::conformance::{add_ready, check_history, check_invariants, claim_req, pool7};
use duffy_core::{
    Actor, Arch, Batch, Cause, ClaimRefusal, CommitError, EngineError, EventQuery, NewNode, NodeWrite, PoolTarget,
    Project, RateLimit, Store, StoreError, Timestamp, hash_api_key,
};

const T0: Timestamp = Timestamp(1_700_000_000_000);

/// Two stores (two processes) on one fresh database, with `hooks`.
async fn pair(hooks: PgTestHooks) -> (PgStore, PgStore, TestDatabase) {
    let db = duffy_backend_postgres::test_cluster::shared().database().await;
    let options = PgOptions { test_hooks: hooks, ..common::options() };
    let a = PgStore::connect(&db.url, options.clone()).await.expect("a");
    let b = PgStore::connect(&db.url, options).await.expect("b");
    (a, b, db)
}

/// Where the racing project's quota of 5 comes from.
#[derive(Clone, Copy)]
enum QuotaFrom {
    /// The claims' default (the project has none of its own).
    Default,
    /// The project's own row (the claims carry no default).
    Project,
}

/// 24 claims of one project with a quota of 5 (and of one key with a rate
/// limit of 3), half through each of two stores, all at once. Returns the
/// successful claims of each kind.
async fn racing_claims(hooks: PgTestHooks, from: QuotaFrom) -> (u32, u32) {
    let (a, b, _db) = pair(hooks).await;
    add_ready(&a, "n", 40, &pool7()).await;
    if let QuotaFrom::Project = from {
        let p = Project { name: "quota-proj".into(), quota: Some(5), ssh_keys: Vec::new() };
        a.upsert_project(p).await.expect("project");
    }
    let stores = [a.clone(), b.clone()];
    let mut quota_tasks = Vec::new();
    for i in 0..24u64 {
        let s = stores[i as usize % 2].clone();
        quota_tasks.push(tokio::spawn(async move {
            let mut r = claim_req(&format!("q{i}"), 100 + i, "quota-proj", 1, T0);
            if let QuotaFrom::Default = from {
                r.default_quota = Some(5);
            }
            s.claim(r).await.expect("store ok")
        }));
    }
    let mut rate_tasks = Vec::new();
    for i in 0..24u64 {
        let s = stores[i as usize % 2].clone();
        rate_tasks.push(tokio::spawn(async move {
            let mut r = claim_req(&format!("r{i}"), 7, "rate-proj", 1, T0);
            r.rate_limit = Some(RateLimit { max: 3, window: Duration::from_secs(300) });
            s.claim(r).await.expect("store ok")
        }));
    }
    let mut quota_ok = 0;
    for t in quota_tasks {
        match t.await.expect("task") {
            Ok(_) => quota_ok += 1,
            Err(ClaimRefusal::QuotaExceeded { .. }) => {}
            Err(other) => panic!("unexpected refusal {other:?}"),
        }
    }
    let mut rate_ok = 0;
    for t in rate_tasks {
        match t.await.expect("task") {
            Ok(_) => rate_ok += 1,
            Err(ClaimRefusal::RateLimited { .. }) => {}
            Err(other) => panic!("unexpected refusal {other:?}"),
        }
    }
    check_history(&a).await.expect("history");
    (quota_ok, rate_ok)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quota_and_rate_limit_are_exact_across_processes() {
    let (quota, rate) = racing_claims(PgTestHooks::default(), QuotaFrom::Default).await;
    assert_eq!(quota, 5, "exactly the quota's worth of claims succeeded");
    assert_eq!(rate, 3, "exactly the rate limit's worth of claims succeeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_projects_own_quota_is_exact_across_processes() {
    // No default quota: the claims find the project's quota in its row
    // and take its lock because of it.
    let (quota, _) = racing_claims(PgTestHooks::default(), QuotaFrom::Project).await;
    assert_eq!(quota, 5, "exactly the project quota's worth of claims succeeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_the_claim_locks_racing_claims_overshoot() {
    // The check above can fail: claims that count without the project's
    // and key's locks let concurrent claims of one project through.
    let mut over = 0;
    for _ in 0..3 {
        let (quota, rate) =
            racing_claims(PgTestHooks { skip_claim_locks: true, ..PgTestHooks::default() }, QuotaFrom::Default).await;
        if quota > 5 || rate > 3 {
            over += 1;
            break;
        }
    }
    assert!(over > 0, "unlocked claims never overshot the quota or the rate limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocations_of_a_stopped_process_are_abandoned_and_only_those() {
    let (a, b, _db) = pair(PgTestHooks::default()).await;
    add_ready(&a, "n", 4, &pool7()).await;
    let mine = b.claim(claim_req("by-b", 1, "p", 1, T0)).await.expect("ok").expect("claimed");
    let theirs = a.claim(claim_req("by-a", 1, "p", 1, T0)).await.expect("ok").expect("claimed");
    assert_eq!(b.abandoned_allocations().await.expect("read"), Some(Vec::new()), "both processes are alive");
    // A stops (its control connection closes with it).
    drop(a);
    let b2 = b.clone();
    let found = Arc::new(std::sync::Mutex::new(None));
    let f = found.clone();
    let poll = tokio::spawn(async move {
        loop {
            let v = b2.abandoned_allocations().await.expect("read").expect("known");
            if !v.is_empty() {
                *f.lock().expect("lock") = Some(v);
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    tokio::time::timeout(Duration::from_secs(5), poll).await.expect("seen within 5 s").expect("task");
    let abandoned = found.lock().expect("lock").clone().expect("set");
    assert_eq!(abandoned, vec![theirs.session.id.clone()], "only the stopped process's allocation");
    assert!(!abandoned.contains(&mine.session.id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_changes_reach_every_process_before_they_are_acknowledged() {
    let stale = key_changes(PgTestHooks::default()).await;
    assert_eq!(stale, 0, "another process answered from a stale memory {stale} times");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_waiting_for_confirmations_a_process_answers_from_a_stale_memory() {
    let stale = key_changes(PgTestHooks { skip_key_confirmations: true, ..PgTestHooks::default() }).await;
    assert!(stale > 0, "the check never saw a stale answer");
}

/// Keys created and revoked through store A while the engine over store B
/// (another process) authenticates them, as requests would. Returns how
/// many of B's answers right after an acknowledged change were stale.
async fn key_changes(hooks: PgTestHooks) -> usize {
    let (b, _a_default, db) = pair(PgTestHooks::default()).await;
    let a = PgStore::connect(&db.url, PgOptions { test_hooks: hooks, ..common::options() }).await.expect("a");
    a.upsert_project(Project { name: "p".into(), quota: None, ssh_keys: vec![] }).await.expect("project");
    let clock = ManualClock::new(T0);
    let engine_b = common::engine(b.clone(), &clock);
    let mut stale = 0;
    for i in 0..20 {
        let key = format!("key-{i}-{}", rand::random::<u64>());
        // B remembers it as unknown.
        assert!(matches!(engine_b.authenticate(&key).await, Err(EngineError::InvalidKey)));
        let rec = a.add_api_key("p", hash_api_key(&key), false, T0, None).await.expect("add");
        if engine_b.authenticate(&key).await.is_err() {
            stale += 1;
        }
        // B remembers it as known now.
        let _ = engine_b.authenticate(&key).await;
        a.revoke_api_key(rec.id, T0).await.expect("revoke");
        if engine_b.authenticate(&key).await.is_ok() {
            stale += 1;
        }
    }
    stale
}

/// A batch that moves `n` on (for fencing checks): out of the pool, or
/// back into it.
fn set_admin(n: &duffy_core::Node) -> Batch {
    let cause = if n.state == duffy_core::NodeState::Reserved { Cause::Recovered } else { Cause::SetAdmin };
    let w = NodeWrite::transition(n, cause, Actor::Reconciler, T0).expect("legal");
    Batch { nodes: vec![w], ..Batch::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_leader_at_a_time_and_a_former_term_writes_nothing() {
    let (a, b, db) = pair(PgTestHooks::default()).await;
    a.set_pool_target(PoolTarget { pool: pool7(), standby: 0 }).await.expect("target");
    let node = a.add_nodes(vec![NewNode::new("x", Arch::X86_64)], Actor::Operator, T0).await.expect("add").remove(0);
    let clock = ManualClock::new(T0);
    let (stop_a, stopped_a) = tokio::sync::oneshot::channel::<()>();
    let (stop_b, stopped_b) = tokio::sync::oneshot::channel::<()>();
    let run_a = tokio::spawn({
        let (s, e) = (a.clone(), common::engine(a.clone(), &clock));
        async move {
            s.run_reconciler_while_leader(e, async {
                let _ = stopped_a.await;
            })
            .await
        }
    });
    let run_b = tokio::spawn({
        let (s, e) = (b.clone(), common::engine(b.clone(), &clock));
        async move {
            s.run_reconciler_while_leader(e, async {
                let _ = stopped_b.await;
            })
            .await
        }
    });
    common::wait_until(Duration::from_secs(5), "a leader", || a.leader_epoch().is_some() || b.leader_epoch().is_some())
        .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(a.leader_epoch().is_none() || b.leader_epoch().is_none(), "two leaders");
    let (leader, follower, stop_leader, run_leader, stop_follower, run_follower) = if a.leader_epoch().is_some() {
        (a, b, stop_a, run_a, stop_b, run_b)
    } else {
        (b, a, stop_b, run_b, stop_a, run_a)
    };
    let first = leader.leader_epoch().expect("leads");
    leader.commit_fenced(set_admin(&node), first).await.expect("the leader's term writes");

    // The leader's control session is ended by the server (as after a
    // network cut, or a frozen process's idle timeout): a new term begins.
    let killer = common::raw(&db.url).await;
    killer
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'duffy control' \
             AND pid IN (SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND classid = $1::integer::oid)",
            &[&0x4455_4c00_i32],
        )
        .await
        .expect("terminate");
    let took = common::wait_until(Duration::from_secs(5), "a new term", || {
        [&leader, &follower].iter().any(|s| s.leader_epoch().is_some_and(|e| e > first))
    })
    .await;
    eprintln!("a new term began {took:?} after the leader's session was ended");
    let now_node = leader.node(node.id).await.expect("read").expect("exists");
    let r = leader.commit_fenced(set_admin(&now_node), first).await;
    assert!(
        matches!(r, Err(CommitError::Store(StoreError::Fenced { epoch, .. })) if epoch == first),
        "the former term is fenced: {r:?}"
    );

    // The leader stops for good (as a process that exits): the other one
    // leads.
    let _ = stop_leader.send(());
    run_leader.await.expect("stopped");
    drop(leader);
    let took =
        common::wait_until(Duration::from_secs(5), "the follower leads", || follower.leader_epoch().is_some()).await;
    eprintln!("the follower took over {took:?} after the leader stepped down");
    let _ = stop_follower.send(());
    run_follower.await.expect("stopped");
    check_invariants(&follower).await.expect("invariants");
}

/// A fenced write that waits for the fence lock while a new term begins
/// (another process holds the lock exclusive and moves the epoch on) reads
/// the epoch once it holds the lock, sees the new term and writes nothing:
/// its check does not answer from a snapshot taken before the wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_write_that_waited_while_a_term_began_writes_nothing() {
    let (store, db) = common::fresh().await;
    let node =
        store.add_nodes(vec![NewNode::new("x", Arch::X86_64)], Actor::Operator, T0).await.expect("add").remove(0);
    let epoch = store.new_leader_epoch().await.expect("a term");
    // A new term beginning, as the control connection begins one.
    let other = common::raw(&db.url).await;
    other
        .batch_execute(&format!(
            "BEGIN; SELECT pg_advisory_xact_lock({}, 0); \
             UPDATE settings SET leader_epoch = leader_epoch + 1 WHERE id = 1",
            0x4455_4600_i32
        ))
        .await
        .expect("a term begins");
    let write = tokio::spawn({
        let (store, batch) = (store.clone(), set_admin(&node));
        async move { store.commit_fenced(batch, epoch).await }
    });
    // The write waits for the fence lock.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let waiting: i64 = other
            .query_one(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND classid = $1::integer::oid",
                &[&0x4455_4600_i32],
            )
            .await
            .expect("pg_locks")
            .get(0);
        if waiting > 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the fenced write never waited for the fence lock");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    other.batch_execute("COMMIT").await.expect("the term begun");
    let r = tokio::time::timeout(Duration::from_secs(20), write).await.expect("the write ends").expect("task");
    assert!(
        matches!(r, Err(CommitError::Store(StoreError::Fenced { epoch: e, current })) if e == epoch && current == epoch + 1),
        "the write of the former term is fenced: {r:?}"
    );
    assert_eq!(store.node(node.id).await.expect("read").expect("exists"), node, "nothing written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_events_are_pruned_in_batches_and_nothing_else() {
    let (store, db) = common::fresh().await;
    let day = Duration::from_secs(86_400);
    let nodes = store
        .add_nodes(vec![NewNode::new("a", Arch::X86_64), NewNode::new("b", Arch::X86_64)], Actor::Operator, T0)
        .await
        .expect("add");
    // 12,000 old events (more than two batches), then recent history.
    let c = common::raw(&db.url).await;
    c.execute(
        "INSERT INTO events (node, from_state, to_state, cause, actor, at) \
         SELECT $1, 'Active', 'Active', 'power_observed', 'reconciler', $2 FROM generate_series(1, 12000)",
        &[&(nodes[0].id.0 as i64), &T0.0],
    )
    .await
    .expect("old events");
    let later = T0.plus(day * 10);
    let n = store.node(nodes[1].id).await.expect("read").expect("b");
    let w = NodeWrite::transition(&n, Cause::SetAdmin, Actor::Operator, later).expect("legal");
    store.commit(Batch { nodes: vec![w], ..Batch::default() }).await.expect("recent");
    let before_nodes = store.nodes().await.expect("nodes");
    let deleted = store.prune_events(later.minus(day)).await.expect("prune");
    assert_eq!(deleted, 12_002, "every event older than the cutoff");
    let left = store.events(EventQuery::default()).await.expect("events");
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].at, later);
    assert_eq!(store.nodes().await.expect("nodes"), before_nodes, "nodes untouched");
    assert_eq!(store.stats().events_pruned, 12_002);
    assert_eq!(store.prune_events(later.minus(day)).await.expect("again"), 0);

    // The leader prunes on its own when retention is set.
    let keeper = PgStore::connect(&db.url, PgOptions { event_retention: Some(day), ..common::options() })
        .await
        .expect("store with retention");
    c.execute(
        "INSERT INTO events (node, from_state, to_state, cause, actor, at) \
         SELECT $1, 'Active', 'Active', 'power_observed', 'reconciler', $2 FROM generate_series(1, 100)",
        &[&(nodes[0].id.0 as i64), &T0.0],
    )
    .await
    .expect("more old events");
    let clock = ManualClock::new(later);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn({
        let (s, e) = (keeper.clone(), common::engine(keeper.clone(), &clock));
        async move {
            s.run_reconciler_while_leader(e, async {
                let _ = stopped.await;
            })
            .await
        }
    });
    let k = keeper.clone();
    common::wait_until(Duration::from_secs(10), "the leader pruned", || k.stats().events_pruned == 100).await;
    let _ = stop.send(());
    run.await.expect("stopped");
    assert_eq!(store.events(EventQuery::default()).await.expect("events").len(), 1);
}
