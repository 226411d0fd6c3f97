//! 64 concurrent clients over HTTP compete for 10 Ready nodes: no node is
//! ever in two sessions, and every request that got nothing got a clear
//! answer.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Setup, TestServer};
use duffy_core::testkit::conformance::{check_history, check_invariants};
use duffy_core::{Arch, CauseKind, EventQuery, Policy};

fn setup() -> Setup {
    Setup {
        policy: Policy {
            rate_limit: None,
            max_concurrent_installs: 10,
            tick: Duration::from_millis(100),
            ..Policy::default()
        },
        machines: 10,
        pools: vec![("7".into(), Arch::X86_64, 10)],
        install_ms: (5, 20),
        reconcile: true,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_clients_race_for_ten_nodes() {
    let s = TestServer::start(setup()).await;
    s.wait_pools_full().await;
    let s = Arc::new(s);
    let mut keys = Vec::new();
    for i in 0..64 {
        keys.push(s.key(&format!("p{}", i % 8), false, None).await);
    }
    let start = Arc::new(tokio::sync::Barrier::new(64));
    let mut tasks = Vec::new();
    for key in keys {
        let (s, start) = (s.clone(), start.clone());
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            let r = s.get(&format!("/Node/get?key={key}")).await;
            (key, r.status, r.body)
        }));
    }
    let mut owners: HashMap<String, String> = HashMap::new();
    let mut won = 0;
    for t in tasks {
        let (_key, status, body) = t.await.unwrap();
        assert_eq!(status, 200, "{body}");
        if body == "Insufficient Nodes in READY State" {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|_| panic!("unclear answer {body:?}"));
        let ssid = v["ssid"].as_str().unwrap().to_string();
        for h in v["hosts"].as_array().unwrap() {
            let h = h.as_str().unwrap().to_string();
            if let Some(prev) = owners.insert(h.clone(), ssid.clone()) {
                panic!("{h} given to {prev} and {ssid}");
            }
        }
        won += 1;
    }
    assert_eq!(won, 10, "exactly the ten Ready nodes were handed out");
    let s = Arc::try_unwrap(s).ok().expect("the clients are done");
    let store = s.store.clone();
    s.stop().await;
    check_invariants(&*store).await.unwrap();
    check_history(&*store).await.unwrap();
}

/// Clients loop get → done for a while against a pool that refills: every
/// answer is clear, and replaying the event log shows no node ever held by
/// two sessions at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_done_churn_keeps_nodes_exclusive() {
    let s = TestServer::start(setup()).await;
    s.wait_pools_full().await;
    let s = Arc::new(s);
    let mut tasks = Vec::new();
    for i in 0..64 {
        let s = s.clone();
        let key = s.key(&format!("p{}", i % 8), false, None).await;
        tasks.push(tokio::spawn(async move {
            let until = Instant::now() + Duration::from_secs(3);
            let mut got = 0;
            while Instant::now() < until {
                let r = s.get(&format!("/Node/get?key={key}")).await;
                assert_eq!(r.status, 200, "{}", r.body);
                if r.body == "Insufficient Nodes in READY State" {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
                let v = r.json();
                let ssid = v["ssid"].as_str().expect("a clear answer").to_string();
                got += 1;
                let r = s.get(&format!("/Node/done?key={key}&ssid={ssid}")).await;
                assert_eq!((r.status, r.body.as_str()), (200, "\"Done\"\n"));
            }
            got
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    assert!(total > 10, "the pool was reused: {total} sessions");
    // Stop the service (and its reconciler) so that the checks read one state.
    let s = Arc::try_unwrap(s).ok().expect("the clients are done");
    let store = s.store.clone();
    s.stop().await;
    // Replay: a node is allocated only when nobody holds it.
    let events = store.events(EventQuery::default()).await.unwrap();
    let mut holder: HashMap<duffy_core::NodeId, String> = HashMap::new();
    for e in events {
        match e.cause {
            CauseKind::Allocated => {
                let sid = e.session.clone().unwrap().0;
                if let Some(prev) = holder.insert(e.node, sid.clone()) {
                    panic!("node {} allocated to {sid} while held by {prev}", e.node);
                }
            }
            CauseKind::Released | CauseKind::AllocationAborted | CauseKind::PrepareFailed | CauseKind::HoldExpired => {
                holder.remove(&e.node);
            }
            _ => {}
        }
    }
    check_invariants(&*store).await.unwrap();
    check_history(&*store).await.unwrap();
}
