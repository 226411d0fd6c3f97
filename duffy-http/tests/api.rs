//! Every endpoint over a real socket, every documented answer of the wire
//! contract, and the admin calls refused without an admin key.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod common;

use std::time::Duration;

use common::{Setup, TestServer};
use duffy_core::{NodeState, Policy, RateLimit, SessionId};
use serde_json::json;

async fn server() -> TestServer {
    let s = TestServer::start(Setup::default()).await;
    s.wait_pools_full().await;
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_inventory_done_round_trip() {
    let s = server().await;
    let key = s.key("proj", false, None).await;

    let r = s.get(&format!("/Node/get?key={key}&ver=7&arch=x86_64&count=2")).await;
    assert_eq!((r.status, r.content_type.as_str()), (200, "application/json"));
    assert!(r.body.ends_with("}\n"), "JSON followed by a newline: {:?}", r.body);
    let v = r.json();
    let hosts: Vec<String> = serde_json::from_value(v["hosts"].clone()).unwrap();
    let ssid = v["ssid"].as_str().unwrap().to_string();
    assert_eq!(hosts.len(), 2);
    assert_eq!(ssid.len(), 36, "a UUID: {ssid}");

    // The full inventory shows the ssid in the comment column, 14 columns a row.
    let inv = s.get("/Inventory").await.json();
    let rows = inv.as_array().unwrap();
    assert_eq!(rows.len(), 12);
    for row in rows {
        assert_eq!(row.as_array().unwrap().len(), 14);
    }
    for h in &hosts {
        let row = rows.iter().find(|r| r[1] == json!(h)).expect("host listed in the inventory");
        assert_eq!(row[5], json!("Deployed"));
        assert_eq!(row[6], json!(ssid));
        assert_eq!(row[9], json!("7"), "ver is a string");
        assert_eq!(row[10], json!("x86_64"));
        assert_eq!(row[11], json!(1));
        assert!(row[4].as_u64().unwrap() >= 1, "used_count counted");
    }
    let free = rows.iter().find(|r| r[5] == json!("Active") || r[5] == json!("Ready")).unwrap();
    assert_eq!(free[6], json!(null));

    // With the key: [hostname, ssid] pairs.
    let mine = s.get(&format!("/Inventory?key={key}")).await.json();
    let mut pairs: Vec<(String, String)> = serde_json::from_value(mine).unwrap();
    pairs.sort();
    let mut want: Vec<_> = hosts.iter().map(|h| (h.clone(), ssid.clone())).collect();
    want.sort();
    assert_eq!(pairs, want);
    assert_eq!(s.get("/Inventory?key=not-a-key").await.json(), json!([]));

    let r = s.get(&format!("/Node/done?key={key}&ssid={ssid}")).await;
    assert_eq!((r.status, r.body.as_str()), (200, "\"Done\"\n"));
    let r = s.get(&format!("/Node/done?key={key}&ssid={ssid}")).await;
    assert_eq!((r.status, r.json()), (200, json!({"msg": "Session not in Prod"})));
    assert_eq!(s.get(&format!("/Inventory?key={key}")).await.json(), json!([]));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_get_errors_follow_the_contract() {
    let s = server().await;
    let key = s.key("proj", false, None).await;
    let live_before = s.store.live_sessions().await.unwrap().len();

    for q in ["/Node/get", "/Node/get?key=", "/Node/get?ver=7&count=1"] {
        let r = s.get(q).await;
        assert_eq!((r.status, r.json()), (403, json!({"msg": "Invalid duffy key"})), "{q}");
    }
    let r = s.get("/Node/get?key=0000-not-a-key").await;
    assert_eq!((r.status, r.body.as_str()), (200, "Invalid duffy key"));
    assert!(r.content_type.starts_with("text/plain"));

    let bad: &[(&str, u16, &str)] = &[
        ("count=abc", 400, "invalid count \"abc\""),
        ("count=0", 400, "at least 1"),
        ("count=-1", 400, "invalid count"),
        ("arch=sparc", 400, "allowed: x86_64, i386"),
        ("ver=7;rm", 400, "invalid ver"),
        ("flavor=a%20b", 400, "invalid flavor"),
        ("count=1&count=2", 400, "given more than once"),
        // Unknown parameters are ignored; the known ones still checked.
        ("colour=blue&count=abc", 400, "invalid count \"abc\""),
        ("_=1&count=1&_=2&count=2", 400, "count given more than once"),
        ("ver=99", 400, "no pool 99/x86_64; available pools: 6/i386, 7/x86_64"),
        ("count=7", 400, "exceeds the capacity of pool 7/x86_64 (6 nodes)"),
        ("count=101", 400, "count must be between 1 and 100"),
    ];
    for (q, status, needle) in bad {
        let r = s.get(&format!("/Node/get?key={key}&{q}")).await;
        assert_eq!(r.status, *status, "{q}: {}", r.body);
        let msg = r.json();
        let msg = msg.as_str().unwrap_or_else(|| panic!("{q}: a JSON string for cico to print, got {}", r.body));
        assert!(msg.contains(needle), "{q}: {msg:?} should contain {needle:?}");
    }

    // Take the whole i386 pool, then ask again: not enough Ready nodes.
    let r = s.get(&format!("/Node/get?key={key}&ver=6&arch=i386&count=2")).await;
    assert!(r.json()["hosts"].is_array(), "{}", r.body);
    let before = s.store.live_sessions().await.unwrap().len();
    let r = s.get(&format!("/Node/get?key={key}&ver=6&arch=i386")).await;
    assert_eq!((r.status, r.body.as_str()), (200, "Insufficient Nodes in READY State"));
    assert_eq!(s.store.live_sessions().await.unwrap().len(), before, "no session created");
    assert_eq!(before, live_before + 1);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn done_and_fail_errors_follow_the_contract() {
    let s = server().await;
    let key = s.key("proj", false, None).await;
    let other = s.key("proj", false, None).await; // same project, another key
    let v = s.get(&format!("/Node/get?key={key}")).await.json();
    let ssid = v["ssid"].as_str().unwrap().to_string();

    for ep in ["done", "fail"] {
        let r = s.get(&format!("/Node/{ep}?ssid={ssid}")).await;
        assert_eq!((r.status, r.json()), (403, json!({"msg": "Invalid duffy key"})));
        let r = s.get(&format!("/Node/{ep}?key=unknown&ssid={ssid}")).await;
        assert_eq!((r.status, r.json()), (403, json!({"msg": "Invalid duffy key"})));
        let r = s.get(&format!("/Node/{ep}?key={key}")).await;
        assert_eq!((r.status, r.json()), (403, json!({"msg": "Invalid session ID"})));
        let unknown = s.get(&format!("/Node/{ep}?key={key}&ssid=00000000-0000-4000-8000-000000000000")).await;
        assert_eq!((unknown.status, unknown.json()), (403, json!({"msg": "Invalid session ID"})));
        // Another key's session is answered exactly like an unknown one.
        let foreign = s.get(&format!("/Node/{ep}?key={other}&ssid={ssid}")).await;
        assert_eq!(
            (foreign.status, &foreign.body, &foreign.content_type),
            (unknown.status, &unknown.body, &unknown.content_type)
        );
        // An unknown parameter is ignored: the ssid is still checked.
        let r = s.get(&format!("/Node/{ep}?key={key}&ssid=00000000-0000-4000-8000-000000000000&x=1")).await;
        assert_eq!((r.status, &r.body), (unknown.status, &unknown.body));
    }
    let session = s.store.session(&SessionId(ssid.clone())).await.unwrap().unwrap();
    assert_eq!(session.state.as_str(), "Prod", "nothing touched the session");

    // fail, fail again, then done on the failed session.
    let r = s.get(&format!("/Node/fail?key={key}&ssid={ssid}")).await;
    assert_eq!((r.status, r.body.as_str()), (200, "\"Done\"\n"));
    let node = s.store.node(session.nodes[0]).await.unwrap().unwrap();
    assert_eq!(node.state, NodeState::Failed);
    assert!(node.hold_until.is_some());
    let r = s.get(&format!("/Node/fail?key={key}&ssid={ssid}")).await;
    assert_eq!((r.status, r.json()), (200, json!({"msg": "Session not in Prod"})));
    assert_eq!(
        s.get(&format!("/Inventory?key={key}")).await.json(),
        json!([[node.hostname, ssid]]),
        "held nodes listed"
    );
    let r = s.get(&format!("/Node/done?key={key}&ssid={ssid}")).await;
    assert_eq!((r.status, r.body.as_str()), (200, "\"Done\"\n"));
    assert_eq!(s.store.node(session.nodes[0]).await.unwrap().unwrap().session, None);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_cap_and_rate_limit_and_quota() {
    let policy = Policy {
        fail_cap: Some(1),
        rate_limit: Some(RateLimit { max: 3, window: Duration::from_secs(300) }),
        max_concurrent_installs: 32,
        tick: Duration::from_millis(200),
        ..Policy::default()
    };
    let s = TestServer::start(Setup { policy, ..Setup::default() }).await;
    s.wait_pools_full().await;
    let key = s.key("proj", false, None).await;
    let a = s.get(&format!("/Node/get?key={key}")).await.json()["ssid"].as_str().unwrap().to_string();
    let b = s.get(&format!("/Node/get?key={key}")).await.json()["ssid"].as_str().unwrap().to_string();
    assert_eq!(s.get(&format!("/Node/fail?key={key}&ssid={a}")).await.body, "\"Done\"\n");
    let r = s.get(&format!("/Node/fail?key={key}&ssid={b}")).await;
    assert_eq!(
        (r.status, r.json()),
        (403, json!({"msg": "Exceeded maximum allowed fail nodes limit, please release other machines to continue"}))
    );
    assert_eq!(s.store.session(&SessionId(b.clone())).await.unwrap().unwrap().state.as_str(), "Prod");

    let _third = s.get(&format!("/Node/get?key={key}")).await.json();
    let r = s.get(&format!("/Node/get?key={key}")).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.json(), json!("Failed to allocate nodes: Rate limit exceeded: 3 sessions in the last 5 minutes"));

    let small = s.key("small", false, Some(1)).await;
    assert!(s.get(&format!("/Node/get?key={small}")).await.json()["ssid"].is_string());
    let r = s.get(&format!("/Node/get?key={small}")).await;
    assert_eq!(r.status, 403);
    assert!(r.json().as_str().unwrap().starts_with("Failed to allocate nodes: quota exceeded"), "{}", r.body);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preparation_failure_leaves_no_session_behind() {
    let s = server().await;
    let key = s.key("proj", false, None).await;
    // Break SSH on one Ready machine of the pool: whichever two nodes are
    // picked, make sure the broken one is among them by asking for all six.
    let ready: Vec<_> = s
        .store
        .nodes()
        .await
        .unwrap()
        .into_iter()
        .filter(|n| n.state == NodeState::Ready && n.image.as_ref().is_some_and(|i| i.release == "7"))
        .collect();
    assert_eq!(ready.len(), 6);
    s.sim.break_prepare(&ready[3].hostname, true);
    let r = s.get(&format!("/Node/get?key={key}&count=6")).await;
    assert_eq!((r.status, r.json()), (200, json!("Failed to allocate nodes")));
    assert!(s.store.live_sessions().await.unwrap().is_empty(), "no half-made session");
    let bad = s.store.node(ready[3].id).await.unwrap().unwrap();
    assert_eq!(bad.state, NodeState::Failed);
    assert!(bad.fail_reason.as_deref().unwrap().contains("connection refused"), "{:?}", bad.fail_reason);
    for n in &ready {
        let n = s.store.node(n.id).await.unwrap().unwrap();
        assert!(n.session.is_none(), "{} still attached", n.hostname);
        assert_ne!(n.state, NodeState::Deployed);
    }
    duffy_core::testkit::conformance::check_invariants(&*s.store).await.unwrap();
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_calls_need_an_admin_key() {
    let s = server().await;
    let admin = s.key("ops", true, None).await;
    let user = s.key("proj", false, None).await;
    let ready = s.store.nodes().await.unwrap().into_iter().find(|n| n.state == NodeState::Ready).unwrap();
    let host = ready.hostname.clone();
    let endpoints = [
        "/Overtime".to_string(),
        format!("/NodeSetAdmin/{host}"),
        format!("/NodeRecover/{host}"),
        "/PauseService".to_string(),
        "/ResumeService".to_string(),
    ];
    for ep in &endpoints {
        let r = s.get(ep).await;
        assert_eq!((r.status, r.json()), (403, json!({"msg": "Invalid duffy key"})), "{ep}");
        let r = s.get(&format!("{ep}?key=bogus")).await;
        assert_eq!((r.status, r.json()), (403, json!({"msg": "Invalid duffy key"})), "{ep}");
        let r = s.get(&format!("{ep}?key={user}")).await;
        assert_eq!((r.status, r.json()), (403, json!({"msg": "This call needs an admin key"})), "{ep}");
    }
    assert_eq!(s.store.node(ready.id).await.unwrap().unwrap().state, NodeState::Ready, "nothing changed");
    assert!(!s.store.paused().await.unwrap());

    assert_eq!(s.get(&format!("/Overtime?key={admin}")).await.json(), json!([]));
    let r = s.get(&format!("/NodeSetAdmin/{host}?key={admin}")).await;
    assert_eq!((r.status, r.json()), (200, json!({"hostname": host, "state": "Reserved"})));
    let inv = s.get("/Inventory").await.json();
    let row = inv.as_array().unwrap().iter().find(|r| r[1] == json!(host)).unwrap().clone();
    assert_eq!((row[5].clone(), row[11].clone()), (json!("Reserved"), json!(0)), "out of rotation");
    let r = s.get(&format!("/NodeRecover/{host}?key={admin}")).await;
    assert_eq!((r.status, r.json()), (200, json!({"hostname": host, "state": "Active"})));
    let r = s.get(&format!("/NodeSetAdmin/no-such-node?key={admin}")).await;
    assert_eq!((r.status, r.json()), (404, json!("No node named \"no-such-node\"")));
    let r = s.get(&format!("/NodeSetAdmin/bad%20name?key={admin}")).await;
    assert_eq!(r.status, 400);

    // A node held by a session cannot be taken away.
    let v = s.get(&format!("/Node/get?key={user}")).await.json();
    let held = v["hosts"][0].as_str().unwrap().to_string();
    let r = s.get(&format!("/NodeSetAdmin/{held}?key={admin}")).await;
    assert_eq!(r.status, 409);
    assert!(r.json().as_str().unwrap().contains("is Deployed"), "{}", r.body);

    let r = s.get(&format!("/ResumeService?key={admin}")).await;
    assert_eq!((r.status, r.json()), (409, json!("the service is not paused")));
    assert_eq!(s.get(&format!("/PauseService?key={admin}")).await.json(), json!("Done"));
    let r = s.get(&format!("/Node/get?key={user}")).await;
    assert_eq!(r.status, 409);
    assert!(r.json().as_str().unwrap().contains("paused"));
    // Running sessions finish normally while paused.
    let ssid = v["ssid"].as_str().unwrap();
    assert_eq!(s.get(&format!("/Node/done?key={user}&ssid={ssid}")).await.json(), json!("Done"));
    assert_eq!(s.get(&format!("/ResumeService?key={admin}")).await.json(), json!("Done"));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overtime_lists_sessions_past_their_lease() {
    let policy = Policy {
        lease: Duration::from_secs(3),
        rate_limit: None,
        tick: Duration::from_millis(200),
        ..Policy::default()
    };
    let s = TestServer::start(Setup { policy, ..Setup::default() }).await;
    s.wait_pools_full().await;
    let admin = s.key("ops", true, None).await;
    let user = s.key("proj", false, None).await;
    let v = s.get(&format!("/Node/get?key={user}&count=2")).await.json();
    let short = s.get(&format!("/Node/get?key={user}&count=1")).await.json();
    // A session expires at its lease unless extended, and the reconciler
    // reclaims it: only an extended one runs past its lease. Extend the
    // first (as the v1 API does) before its lease ends.
    let sid = SessionId(v["ssid"].as_str().unwrap().to_string());
    let session = s.store.session(&sid).await.unwrap().unwrap();
    let lease_until = session.lease_until.unwrap();
    let extend =
        duffy_core::SessionCause::Extended { until: lease_until.plus(Duration::from_secs(60)), max_until: None };
    let w = duffy_core::SessionWrite::transition(&session, extend, session.delivered_at.unwrap()).unwrap();
    s.store.commit(duffy_core::Batch { sessions: vec![w], ..Default::default() }).await.unwrap();
    // The one not extended expires at its lease and is reclaimed at the
    // reconciler's next pass (every 200 ms; 10 s to hang loudly).
    let short = SessionId(short["ssid"].as_str().unwrap().to_string());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let st = s.store.session(&short).await.unwrap().unwrap();
        if st.state == duffy_core::SessionState::Done {
            assert_eq!(st.end_reason.as_deref(), Some("lifetime expired; nodes reclaimed"));
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the unextended session was not reclaimed: {st:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let o = s.get(&format!("/Overtime?key={admin}")).await.json();
    let list = o.as_array().unwrap();
    assert_eq!(list.len(), 1, "the extended session, not the expired one: {o}");
    assert_eq!(list[0]["ssid"], v["ssid"]);
    assert_eq!(list[0]["project"], json!("proj"));
    assert_eq!(list[0]["hosts"].as_array().unwrap().len(), 2);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn help_metrics_health_and_http_rules() {
    let s = server().await;
    let r = s.get("/Help").await;
    assert_eq!(r.status, 200);
    assert!(r.body.contains("/Node/get?key=KEY") && r.body.contains("/NodeSetAdmin/HOST"));
    let r = s.get("/healthz").await;
    assert_eq!((r.status, r.json()), (200, json!({"status": "ok", "paused": false})));
    let _ = s.get("/Inventory").await;
    let r = s.get("/metrics").await;
    assert_eq!(r.status, 200);
    assert!(r.content_type.starts_with("text/plain; version=0.0.4"));
    assert!(r.body.contains("duffy_nodes{state=\"Ready\",pool=\"7/x86_64\"} 6"), "{}", r.body);
    assert!(r.body.contains("duffy_http_request_duration_seconds_bucket{endpoint=\"/Inventory\",le=\"+Inf\"} 1"));
    assert!(r.body.contains("duffy_allocations_total{outcome=\"allocated\"} 0"));

    for p in ["/nope", "/Node/get/", "/node/get", "/Inventory/"] {
        let r = s.get(p).await;
        assert_eq!(r.status, 404, "{p}");
        assert!(r.json().as_str().unwrap().contains("see /Help"));
    }
    let r = s.client.post(format!("{}/Inventory", s.base)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 405);
    let r = s.client.head(format!("{}/Inventory", s.base)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    // cico's headers on a GET change nothing.
    let r = s
        .client
        .get(format!("{}/Inventory", s.base))
        .header("Accept", "application/json")
        .header("Content-Type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    s.stop().await;
}

/// The legacy server ignored parameters it did not know, and job scripts in
/// the wild add cache-busters and extra fields: every legacy endpoint
/// accepts them (and counts them), while still checking the known ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_parameters_are_ignored_and_counted() {
    let s = server().await;
    let key = s.key("proj", false, None).await;
    let admin = s.key("ops", true, None).await;

    let r = s.get(&format!("/Node/get?_=1700000000&key={key}&ver=7&count=2&job=nightly&colour=blue")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let ssid = r.json()["ssid"].as_str().unwrap_or_else(|| panic!("allocated: {}", r.body)).to_string();
    let mine = s.get(&format!("/Inventory?key={key}&nocache=1")).await.json();
    assert_eq!(mine.as_array().unwrap().len(), 2, "{mine}");
    assert_eq!(s.get("/Inventory?_=1").await.json().as_array().unwrap().len(), 12);
    assert!(s.get("/Help?lang=en").await.body.contains("/Node/get?key=KEY"));
    assert_eq!(s.get(&format!("/Overtime?key={admin}&_=1")).await.json(), json!([]));
    // Known parameters are still validated, and still only once.
    let r = s.get(&format!("/Node/get?key={key}&count=zero&_=1")).await;
    assert_eq!(r.status, 400);
    let r = s.get(&format!("/Node/done?key={key}&ssid={ssid}&ssid={ssid}&_=1")).await;
    assert_eq!((r.status, r.json()), (400, json!("parameter ssid given more than once")));
    // An unknown parameter named like a known one in another case is just unknown.
    let r = s.get(&format!("/Node/done?KEY=x&key={key}&SSID=y&ssid={ssid}&_=1")).await;
    assert_eq!((r.status, r.body.as_str()), (200, "\"Done\"\n"));

    let m = s.get("/metrics").await.body;
    for (endpoint, n) in [("/Node/get", 4), ("/Node/done", 3), ("/Inventory", 2), ("/Help", 1), ("/Overtime", 1)] {
        let line = format!("duffy_ignored_parameters_total{{endpoint=\"{endpoint}\"}} {n}\n");
        assert!(m.contains(&line), "{line:?} in\n{m}");
    }
    assert!(m.contains("duffy_ignored_parameters_total{endpoint=\"/PauseService\"} 0\n"), "{m}");
    s.stop().await;
}
