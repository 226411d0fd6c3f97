//! API keys through the engine: revocation and expiry refused at once,
//! unknown keys answered from a bounded memory, key creation seen at once,
//! last use kept off the request path.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::sync::Arc;
use std::time::Duration;

use duffy_core::keys::{KEY_CACHE_TTL, UNKNOWN_KEYS_MAX};
use duffy_core::mem::MemStore;
use duffy_core::sim::{SimConfig, SimFarm};
use duffy_core::testkit::ManualClock;
use duffy_core::{Clock, Engine, EngineError, Project, Store, Timestamp, hash_api_key};

struct Farm {
    store: Arc<MemStore>,
    clock: ManualClock,
    engine: Engine,
}

async fn farm() -> Farm {
    let clock = ManualClock::new(Timestamp::from_millis(1_767_225_600_000));
    let store = Arc::new(MemStore::new());
    let sim = Arc::new(SimFarm::new(Arc::new(clock.clone()), SimConfig::default()));
    let engine = Engine::builder(store.clone(), sim.clone(), sim, Arc::new(clock.clone())).build().expect("engine");
    store.upsert_project(Project { name: "ci".into(), quota: None, ssh_keys: vec![] }).await.expect("project");
    Farm { store, clock, engine }
}

fn refused(r: Result<duffy_core::Principal, EngineError>) -> bool {
    matches!(r, Err(EngineError::InvalidKey))
}

#[tokio::test]
async fn a_revoked_key_is_refused_by_the_next_request() {
    let f = farm().await;
    let rec = f.engine.add_api_key("ci", hash_api_key("k1"), false, None).await.expect("key");
    let other = f.engine.add_api_key("ci", hash_api_key("k2"), false, None).await.expect("key");
    // Used, so remembered.
    for _ in 0..3 {
        assert_eq!(f.engine.authenticate("k1").await.expect("valid").key_id, Some(rec.id));
    }
    f.engine.authenticate("k2").await.expect("valid");
    let revoked = f.engine.revoke_api_key(rec.id).await.expect("revoke");
    assert_eq!(revoked.revoked_at, Some(f.clock.now()));
    assert!(refused(f.engine.authenticate("k1").await), "a revoked key must be refused at once");
    assert!(refused(f.engine.authenticate("k1").await), "and stay refused");
    assert_eq!(f.engine.authenticate("k2").await.expect("the other key still works").key_id, Some(other.id));
    // An unknown id is an error that says so, and changes nothing.
    let e = f.engine.revoke_api_key(duffy_core::KeyId(999)).await.expect_err("unknown");
    assert!(e.to_string().contains("does not exist"), "{e}");
}

#[tokio::test]
async fn a_revocation_by_another_engine_is_seen_within_the_cache_ttl() {
    let f = farm().await;
    let rec = f.engine.add_api_key("ci", hash_api_key("k1"), false, None).await.expect("key");
    f.engine.authenticate("k1").await.expect("valid");
    // Another process on the same store (its own engine) revokes it.
    f.store.revoke_api_key(rec.id, f.clock.now()).await.expect("revoke");
    f.clock.advance(KEY_CACHE_TTL);
    assert!(refused(f.engine.authenticate("k1").await), "the remembered row must not outlive the TTL");
}

#[tokio::test]
async fn an_expired_key_is_refused_the_moment_it_expires() {
    let f = farm().await;
    let expires = f.clock.now().plus(Duration::from_secs(30));
    f.engine.add_api_key("ci", hash_api_key("k1"), false, Some(expires)).await.expect("key");
    f.engine.authenticate("k1").await.expect("valid before it expires");
    f.clock.advance(Duration::from_secs(29));
    f.engine.authenticate("k1").await.expect("still valid");
    let reads = f.store.key_lookups();
    f.clock.advance(Duration::from_secs(1));
    assert!(refused(f.engine.authenticate("k1").await), "expired");
    assert_eq!(f.store.key_lookups(), reads, "refused from memory: the remembered row carries the expiry");
    // An expiry in the past is refused when the key is made.
    let past = f.engine.add_api_key("ci", hash_api_key("k2"), false, Some(f.clock.now())).await;
    assert!(matches!(past, Err(EngineError::InvalidRequest(_))), "{past:?}");
    assert!(refused(f.engine.authenticate("k2").await));
}

#[tokio::test]
async fn an_unknown_key_costs_one_store_read_until_memory_is_full() {
    let f = farm().await;
    assert!(refused(f.engine.authenticate("wrong").await));
    let reads = f.store.key_lookups();
    for _ in 0..100 {
        assert!(refused(f.engine.authenticate("wrong").await));
    }
    assert_eq!(f.store.key_lookups(), reads, "a repeated unknown key is answered from memory");
    assert!(refused(f.engine.authenticate_cached("wrong").expect("answered from memory")));
    // Memory of unknown keys is bounded: enough other keys push it out.
    for i in 0..UNKNOWN_KEYS_MAX {
        assert!(refused(f.engine.authenticate(&format!("random-{i}")).await));
    }
    let reads = f.store.key_lookups();
    assert!(f.engine.authenticate_cached("wrong").is_none(), "forgotten");
    assert!(refused(f.engine.authenticate("wrong").await));
    assert_eq!(f.store.key_lookups(), reads + 1);
    // And it is forgotten after the TTL.
    f.clock.advance(KEY_CACHE_TTL);
    assert!(f.engine.authenticate_cached("wrong").is_none());
}

#[tokio::test]
async fn a_key_created_through_the_engine_works_at_once_even_after_it_was_tried() {
    let f = farm().await;
    assert!(refused(f.engine.authenticate("k1").await));
    assert!(refused(f.engine.authenticate("k1").await), "remembered as unknown");
    f.engine.add_api_key("ci", hash_api_key("k1"), true, None).await.expect("key");
    let who = f.engine.authenticate("k1").await.expect("usable at once");
    assert!(who.admin);
}

#[tokio::test]
async fn last_use_is_noted_in_memory_and_written_by_a_flush() {
    let f = farm().await;
    let rec = f.engine.add_api_key("ci", hash_api_key("k1"), false, None).await.expect("key");
    for _ in 0..50 {
        f.engine.authenticate("k1").await.expect("valid");
        f.clock.advance(Duration::from_secs(1));
    }
    let last = f.clock.now().minus(Duration::from_secs(1));
    let stored = f.store.api_keys(None).await.expect("list");
    assert_eq!(stored[0].last_used, None, "requests wrote nothing to the store");
    assert_eq!(f.engine.flush_key_usage().await.expect("flush"), 1);
    assert_eq!(f.store.api_keys(None).await.expect("list")[0].last_used, Some(last));
    assert_eq!(f.engine.flush_key_usage().await.expect("flush"), 0, "nothing new to write");
    // Listing through the engine is current: it flushes first.
    f.clock.advance(Duration::from_secs(600));
    f.engine.authenticate("k1").await.expect("valid");
    let listed = f.engine.api_keys(Some("ci")).await.expect("list");
    assert_eq!((listed[0].id, listed[0].last_used), (rec.id, Some(f.clock.now())));
    // Refused requests are not uses.
    f.engine.revoke_api_key(rec.id).await.expect("revoke");
    f.clock.advance(Duration::from_secs(5));
    assert!(refused(f.engine.authenticate("k1").await));
    assert_eq!(f.engine.flush_key_usage().await.expect("flush"), 0);
}
