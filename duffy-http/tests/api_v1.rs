//! `/api/v1` over a real socket, against a service on a real SQLite file:
//! every endpoint, every kind of error (RFC 9457 problem+json with its
//! stable type), bearer-only authentication, keys kept apart, and bad
//! input that changes nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod common;

use std::time::Duration;

use common::{Reply, Setup, TestServer};
use duffy_core::{EventQuery, Policy, RateLimit, Store};
use duffy_http::api::{Group, ROUTES};
use serde_json::{Value, json};

const PROBLEM: &str = "application/problem+json";

async fn call(s: &TestServer, method: &str, path: &str, key: Option<&str>, body: Option<Value>) -> Reply {
    let mut r = s.client.request(method.parse().unwrap(), format!("{}{}", s.base, path));
    if let Some(k) = key {
        r = r.bearer_auth(k);
    }
    if let Some(b) = body {
        r = r.json(&b);
    }
    let r = r.send().await.expect("request");
    let status = r.status().as_u16();
    let content_type = r.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    let body = r.text().await.expect("body");
    Reply { status, content_type, body }
}

/// Asserts `r` is a problem of `kind` with `status`, and returns it.
#[track_caller]
fn problem(r: &Reply, status: u16, kind: &str) -> Value {
    assert_eq!(r.content_type, PROBLEM, "{}", r.body);
    let v = r.json();
    assert_eq!((r.status, v["type"].as_str().unwrap()), (status, &*format!("urn:duffy:problem:{kind}")), "{v}");
    assert_eq!(v["status"], status, "{v}");
    assert!(!v["title"].as_str().unwrap().is_empty() && !v["detail"].as_str().unwrap().is_empty(), "{v}");
    v
}

async fn snapshot(store: &dyn Store) -> (Vec<duffy_core::Node>, Vec<duffy_core::Session>, usize, bool) {
    (
        store.nodes().await.unwrap(),
        store.live_sessions().await.unwrap(),
        store.events(EventQuery::default()).await.unwrap().len(),
        store.paused().await.unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_is_created_shown_listed_and_released_by_its_key_only() {
    let s = TestServer::start(Setup::default()).await;
    s.wait_pools_full().await;
    let alice = s.key("alice", false, None).await;
    let bob = s.key("bob", false, None).await;

    let r = call(&s, "POST", "/api/v1/sessions", Some(&alice), Some(json!({"pool": "7/x86_64", "count": 2}))).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let created = r.json();
    let id = created["id"].as_str().unwrap().to_string();
    assert_eq!(created["state"], "Prod");
    assert_eq!(created["pool"], "7/x86_64");
    assert_eq!(created["hosts"].as_array().unwrap().len(), 2);
    assert!(created["expires_at"].is_string(), "{created}");

    // The same session by its parts, and through the legacy API's view.
    let r = call(&s, "POST", "/api/v1/sessions", Some(&alice), Some(json!({"release": "7", "arch": "x86_64"}))).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let second = r.json()["id"].as_str().unwrap().to_string();

    let shown = call(&s, "GET", &format!("/api/v1/sessions/{id}"), Some(&alice), None).await;
    assert_eq!((shown.status, shown.json()), (200, created.clone()));
    let mine = call(&s, "GET", "/api/v1/sessions", Some(&alice), None).await.json();
    let mut ids: Vec<&str> = mine.as_array().unwrap().iter().map(|v| v["id"].as_str().unwrap()).collect();
    ids.sort_unstable();
    let mut want = vec![id.as_str(), second.as_str()];
    want.sort_unstable();
    assert_eq!(ids, want);

    // An admin key may list a project's sessions or everyone's; a user
    // key may not.
    let admin = s.key("ops", true, None).await;
    let of_alice = call(&s, "GET", "/api/v1/sessions?project=alice", Some(&admin), None).await.json();
    assert_eq!(of_alice.as_array().unwrap().len(), 2, "{of_alice}");
    let every = call(&s, "GET", "/api/v1/sessions?all=true", Some(&admin), None).await.json();
    assert_eq!(every.as_array().unwrap().len(), 2, "{every}");
    problem(&call(&s, "GET", "/api/v1/sessions?project=alice", Some(&bob), None).await, 403, "forbidden");
    problem(&call(&s, "GET", "/api/v1/sessions?all=true", Some(&bob), None).await, 403, "forbidden");
    problem(&call(&s, "GET", "/api/v1/sessions?all=yes", Some(&admin), None).await, 400, "bad_request");

    // Bob sees none of it: his list is empty, and Alice's session answers
    // him exactly as a session that does not exist.
    assert_eq!(call(&s, "GET", "/api/v1/sessions", Some(&bob), None).await.json(), json!([]));
    let foreign = call(&s, "GET", &format!("/api/v1/sessions/{id}"), Some(&bob), None).await;
    let unknown = call(&s, "GET", "/api/v1/sessions/00000000-0000-4000-8000-000000000000", Some(&bob), None).await;
    problem(&foreign, 404, "not_found");
    assert_eq!(foreign.body, unknown.body);
    // (The reconciler is running: only the sessions and their nodes are
    // compared.)
    let held = |s: &TestServer| {
        let store = s.store.clone();
        async move {
            let sessions = store.live_sessions().await.unwrap();
            let nodes: Vec<_> = store.nodes().await.unwrap().into_iter().filter(|n| n.session.is_some()).collect();
            (sessions, nodes)
        }
    };
    for action in ["release", "fail", "extend"] {
        let before = held(&s).await;
        let r = call(&s, "POST", &format!("/api/v1/sessions/{id}/{action}"), Some(&bob), None).await;
        problem(&r, 404, "not_found");
        assert_eq!(r.body, foreign.body, "{action}");
        assert_eq!(held(&s).await, before, "{action} by another key changed nothing");
    }
    // Nodes show a session only to its key.
    let host = created["hosts"][0].as_str().unwrap();
    let as_alice = call(&s, "GET", &format!("/api/v1/nodes/{host}"), Some(&alice), None).await.json();
    let as_bob = call(&s, "GET", &format!("/api/v1/nodes/{host}"), Some(&bob), None).await.json();
    assert_eq!(as_alice["node"]["session"], id.as_str());
    assert_eq!(as_bob["node"]["session"], Value::Null);
    assert!(as_bob["events"].as_array().unwrap().iter().all(|e| e["session"].is_null()), "{as_bob}");
    assert!(as_alice["events"].as_array().unwrap().iter().any(|e| e["session"] == id.as_str()), "{as_alice}");

    // Release: the nodes go back; a second release is a conflict.
    let r = call(&s, "POST", &format!("/api/v1/sessions/{id}/release"), Some(&alice), None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["state"], "Done");
    assert_eq!(r.json()["hosts"], created["hosts"], "the record keeps its hosts");
    assert!(call(&s, "GET", "/api/v1/sessions", Some(&alice), None).await.body.contains(&second));
    assert!(!call(&s, "GET", "/api/v1/sessions", Some(&alice), None).await.body.contains(&id), "no longer live");
    let again = call(&s, "POST", &format!("/api/v1/sessions/{id}/release"), Some(&alice), Some(json!({}))).await;
    problem(&again, 409, "conflict");

    // Fail: held, with the hold's end.
    let r = call(&s, "POST", &format!("/api/v1/sessions/{second}/fail"), Some(&alice), None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["state"], "Fail");
    assert!(r.json()["hold_until"].is_string());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_goes_only_in_the_authorization_header() {
    let s = TestServer::start(Setup { reconcile: false, ..Setup::default() }).await;
    let key = s.key("p", false, None).await;
    let r = call(&s, "GET", "/api/v1/sessions", None, None).await;
    let v = problem(&r, 401, "unauthorized");
    assert!(v["detail"].as_str().unwrap().contains("Authorization: Bearer"), "{v}");
    let r = s.client.get(format!("{}/api/v1/sessions", s.base)).send().await.unwrap();
    assert_eq!(r.headers()["www-authenticate"], "Bearer realm=\"duffy\"");
    let r = s.client.get(format!("{}/api/v1/sessions", s.base)).header("authorization", format!("Basic {key}"));
    let r = r.send().await.unwrap();
    assert_eq!(r.status(), 401);
    problem(&call(&s, "GET", "/api/v1/sessions", Some("not-a-key"), None).await, 401, "unauthorized");
    // A valid key in the URL is refused, and says where it goes.
    let r = call(&s, "GET", &format!("/api/v1/sessions?key={key}"), None, None).await;
    let v = problem(&r, 400, "bad_request");
    assert!(v["detail"].as_str().unwrap().contains("Authorization"), "{v}");
    let r = call(&s, "GET", &format!("/api/v1/sessions?key={key}"), Some(&key), None).await;
    problem(&r, 400, "bad_request");
    // The legacy endpoints still take ?key=.
    assert_eq!(s.get(&format!("/Inventory?key={key}")).await.body.trim(), "[]");
    // A user key on the admin endpoints.
    for (m, p) in [
        ("GET", "/api/v1/keys"),
        ("POST", "/api/v1/admin/pause"),
        ("GET", "/api/v1/admin/overtime"),
        ("GET", "/api/v1/projects/p"),
        ("GET", "/api/v1/projects"),
        ("POST", "/api/v1/nodes/n1.sim.duffy/set-admin"),
    ] {
        problem(&call(&s, m, p, Some(&key), None).await, 403, "forbidden");
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_problems_with_a_stable_type_and_change_nothing() {
    // No reconciler: nothing is Ready, so every allocation is short.
    let s = TestServer::start(Setup { reconcile: false, ..Setup::default() }).await;
    let key = s.key("p", false, Some(1)).await;
    let admin = s.key("ops", true, None).await;
    let before = snapshot(&*s.store).await;

    let v = problem(
        &call(&s, "POST", "/api/v1/sessions", Some(&key), Some(json!({"pool": "7/x86_64"}))).await,
        409,
        "insufficient",
    );
    assert_eq!((v["requested"].as_u64(), v["ready"].as_u64()), (Some(1), Some(0)), "{v}");
    // Nothing is being installed (no reconciler): the estimate is whole
    // installs (the policy's install timeout until one has been seen).
    assert!(v["estimated_ready_in_secs"].as_u64().is_some_and(|s| s > 0), "{v}");
    let v = problem(
        &call(&s, "POST", "/api/v1/sessions", Some(&key), Some(json!({"pool": "9/x86_64"}))).await,
        404,
        "no_such_pool",
    );
    let allowed: Vec<&str> = v["allowed"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    assert!(allowed.contains(&"7/x86_64") && allowed.contains(&"6/i386"), "{v}");
    problem(
        &call(&s, "POST", "/api/v1/sessions", Some(&key), Some(json!({"pool": "7/x86_64", "count": 2}))).await,
        403,
        "quota",
    );
    for (body, says) in [
        (json!({"pool": "7/x86_64", "count": 0}), "count"),
        (json!({"pool": "7/sparc"}), "arch"),
        (json!({"pool": "7"}), "release/arch"),
        (json!({"pool": "7/x86_64", "release": "7"}), "not both"),
        (json!({"pool": "7/x86_64", "colour": "red"}), "colour"),
        (json!({"release": "7;rm"}), "ver"),
        (json!({"count": "two"}), "count"),
        (json!([1]), "JSON"),
    ] {
        let r = call(&s, "POST", "/api/v1/sessions", Some(&key), Some(body.clone())).await;
        let v = problem(&r, 400, "bad_request");
        assert!(v["detail"].as_str().unwrap().contains(says), "{body}: {v}");
    }
    let r =
        s.client.post(format!("{}/api/v1/sessions", s.base)).bearer_auth(&key).body("{not json").send().await.unwrap();
    assert_eq!(r.status(), 400);
    let v = problem(&call(&s, "GET", "/api/v1/nodes?state=Sleeping", Some(&key), None).await, 400, "bad_request");
    assert!(v["allowed"].as_array().unwrap().contains(&json!("Ready")), "{v}");
    let v = problem(&call(&s, "GET", "/api/v1/nodes?colour=red", Some(&key), None).await, 400, "bad_request");
    assert!(v["detail"].as_str().unwrap().contains("allowed parameters: state, pool"), "{v}");
    problem(&call(&s, "GET", "/api/v1/nodes/no.such.node", Some(&key), None).await, 404, "not_found");
    problem(&call(&s, "GET", "/api/v1/nodes/-bad", Some(&key), None).await, 400, "bad_request");
    problem(&call(&s, "GET", "/api/v1/no/such/thing", Some(&key), None).await, 404, "not_found");
    problem(&call(&s, "DELETE", "/api/v1/sessions", Some(&key), None).await, 405, "method_not_allowed");
    problem(&call(&s, "GET", "/api/v1/requests/nope", Some(&key), None).await, 404, "not_found");
    problem(&call(&s, "DELETE", "/api/v1/keys/x", Some(&admin), None).await, 400, "bad_request");
    problem(&call(&s, "DELETE", "/api/v1/keys/999999", Some(&admin), None).await, 404, "not_found");
    // Beyond the store's integers (found by schemathesis: it was a 503).
    for id in ["9223372036854775808", "18446744073709551615"] {
        problem(&call(&s, "DELETE", &format!("/api/v1/keys/{id}"), Some(&admin), None).await, 404, "not_found");
    }
    problem(&call(&s, "GET", "/api/v1/projects/nope", Some(&admin), None).await, 404, "not_found");
    problem(&call(&s, "GET", "/api/v1/projects/no%20pe", Some(&admin), None).await, 400, "bad_request");
    problem(
        &call(&s, "PUT", "/api/v1/projects/p", Some(&admin), Some(json!({"ssh_keys": ["ssh-rsa nonsense"]}))).await,
        400,
        "bad_request",
    );
    problem(&call(&s, "POST", "/api/v1/admin/resume", Some(&admin), None).await, 409, "conflict");
    problem(
        &call(&s, "POST", "/api/v1/admin/pause", Some(&admin), Some(json!({"now": true}))).await,
        400,
        "bad_request",
    );
    assert_eq!(snapshot(&*s.store).await, before, "no refused request changed anything");

    // Paused: allocations refused as such.
    assert_eq!(call(&s, "POST", "/api/v1/admin/pause", Some(&admin), None).await.json(), json!({"paused": true}));
    problem(&call(&s, "POST", "/api/v1/sessions", Some(&key), Some(json!({"pool": "7/x86_64"}))).await, 409, "paused");
    assert_eq!(call(&s, "POST", "/api/v1/admin/resume", Some(&admin), None).await.json(), json!({"paused": false}));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limited_allocations_are_a_problem_of_their_own() {
    let policy = Policy {
        rate_limit: Some(RateLimit { max: 1, window: Duration::from_secs(300) }),
        tick: Duration::from_millis(200),
        ..Policy::default()
    };
    let s = TestServer::start(Setup { policy, ..Setup::default() }).await;
    s.wait_pools_full().await;
    let key = s.key("p", false, None).await;
    let r = call(&s, "POST", "/api/v1/sessions", Some(&key), Some(json!({"pool": "7/x86_64"}))).await;
    assert_eq!(r.status, 201, "{}", r.body);
    problem(
        &call(&s, "POST", "/api/v1/sessions", Some(&key), Some(json!({"pool": "7/x86_64"}))).await,
        429,
        "rate_limited",
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_pools_projects_keys_and_admin_operations() {
    let s = TestServer::start(Setup::default()).await;
    s.wait_pools_full().await;
    let admin = s.key("ops", true, None).await;
    let user = s.key("p", false, None).await;

    let nodes = call(&s, "GET", "/api/v1/nodes", Some(&user), None).await.json();
    assert_eq!(nodes.as_array().unwrap().len(), 12);
    let ready = call(&s, "GET", "/api/v1/nodes?state=Ready&pool=6/i386", Some(&user), None).await.json();
    assert_eq!(ready.as_array().unwrap().len(), 2, "{ready}");
    let one = call(&s, "GET", "/api/v1/nodes/n1.sim.duffy", Some(&user), None).await.json();
    assert_eq!(one["node"]["hostname"], "n1.sim.duffy");
    assert!(one["events"].as_array().unwrap().iter().any(|e| e["cause"] == "added"), "{one}");

    let pools = call(&s, "GET", "/api/v1/pools", Some(&user), None).await.json();
    let p7 = pools.as_array().unwrap().iter().find(|p| p["pool"] == "7/x86_64").unwrap();
    assert_eq!((p7["standby"].as_u64(), p7["ready"].as_u64()), (Some(6), Some(6)), "{p7}");
    assert_eq!(p7["nodes"]["Ready"], 6);
    assert_eq!(p7["nodes"].as_object().unwrap().len(), 7, "every state named: {p7}");

    // Projects.
    let key_line = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIByrgFoRodMpGoIGtVxnK/CTnXeEUb1KLNez/P0VJgK+ alice@laptop";
    let r =
        call(&s, "PUT", "/api/v1/projects/newproj", Some(&admin), Some(json!({"quota": 3, "ssh_keys": [key_line]})))
            .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json(), json!({"name": "newproj", "quota": 3, "ssh_keys": [key_line]}));
    let r = call(&s, "PUT", "/api/v1/projects/newproj", Some(&admin), Some(json!({"quota": 4}))).await;
    assert_eq!(r.json()["ssh_keys"], json!([key_line]), "absent fields unchanged");
    assert_eq!(call(&s, "GET", "/api/v1/projects/newproj", Some(&admin), None).await.json()["quota"], 4);
    // Every project, by name: the two the keys were created for and this one.
    let all = call(&s, "GET", "/api/v1/projects", Some(&admin), None).await.json();
    let names: Vec<&str> = all.as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["newproj", "ops", "p"], "{all}");
    assert_eq!(all[0], json!({"name": "newproj", "quota": 4, "ssh_keys": [key_line]}));
    problem(&call(&s, "GET", "/api/v1/projects?name=p", Some(&admin), None).await, 400, "bad_request");

    // Keys: create, use, list, revoke; the revoked key is refused at once.
    let r = call(&s, "POST", "/api/v1/keys", Some(&admin), Some(json!({"project": "newproj"}))).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let created = r.json();
    let new_key = created["key"].as_str().unwrap().to_string();
    let new_id = created["record"]["id"].as_u64().unwrap();
    assert_eq!(call(&s, "GET", "/api/v1/sessions", Some(&new_key), None).await.status, 200);
    let listed = call(&s, "GET", "/api/v1/keys?project=newproj", Some(&admin), None).await;
    assert_eq!(listed.json().as_array().unwrap().len(), 1);
    assert!(!listed.body.contains(&new_key), "never the key again");
    problem(&call(&s, "GET", "/api/v1/keys?project=nope", Some(&admin), None).await, 404, "not_found");
    let r = call(&s, "DELETE", &format!("/api/v1/keys/{new_id}"), Some(&admin), None).await;
    assert!(r.json()["revoked_at"].is_string(), "{}", r.body);
    problem(&call(&s, "GET", "/api/v1/sessions", Some(&new_key), None).await, 401, "unauthorized");

    // Node operations and overtime.
    let r = call(&s, "POST", "/api/v1/nodes/n12.sim.duffy/set-admin", Some(&admin), None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["state"], "Reserved");
    let r = call(&s, "POST", "/api/v1/nodes/n12.sim.duffy/recover", Some(&admin), None).await;
    assert_eq!(r.json()["state"], "Active");
    problem(&call(&s, "POST", "/api/v1/nodes/n99.sim.duffy/recover", Some(&admin), None).await, 404, "not_found");
    assert_eq!(call(&s, "GET", "/api/v1/admin/overtime", Some(&admin), None).await.json(), json!([]));
    s.stop().await;
}

/// The OpenAPI document describes every method of every `/api/v1`
/// route in the one route list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_covers_every_route() {
    let s = TestServer::start(Setup { reconcile: false, ..Setup::default() }).await;
    let r = s.get("/api/v1/openapi.json").await;
    assert_eq!((r.status, r.content_type.as_str()), (200, "application/json"));
    let doc = r.json();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"), "{}", doc["openapi"]);
    let v1: Vec<_> = ROUTES.iter().filter(|r| r.group == Group::V1).collect();
    assert_eq!(v1.len(), duffy_http::api::v1::ROUTE_COUNT);
    assert_eq!(missing_operations(&doc), Vec::<String>::new());
    // The check catches a document that forgets one.
    let mut broken = doc.clone();
    broken["paths"]["/api/v1/sessions/{id}/extend"].as_object_mut().unwrap().remove("post");
    assert_eq!(missing_operations(&broken), vec!["POST /api/v1/sessions/{id}/extend".to_string()]);
    // Every operation documents its problems.
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let p = &op["responses"]["400"]["content"]["application/problem+json"];
            assert!(p.is_object(), "{method} {path}: {op}");
        }
    }
    s.stop().await;
}

fn missing_operations(doc: &Value) -> Vec<String> {
    let mut missing = Vec::new();
    for r in ROUTES.iter().filter(|r| r.group == Group::V1) {
        for m in r.methods {
            if !doc["paths"][r.path][m.to_lowercase()].is_object() {
                missing.push(format!("{m} {}", r.path));
            }
        }
    }
    missing
}

/// Lifetimes with a short policy: a session expires at the end of the
/// lifetime it asked for (or the lease), extensions move the expiry up to
/// the maximum lifetime and no further, and the reconciler reclaims an
/// expired session's nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_expire_and_extend_up_to_the_maximum_lifetime() {
    let policy = Policy {
        // Long enough that a loaded machine does not expire the session
        // being extended; the expiry itself is watched on a 1 s session.
        lease: Duration::from_secs(20),
        max_lifetime: Some(Duration::from_secs(30)),
        rate_limit: None,
        tick: Duration::from_millis(100),
        ..Policy::default()
    };
    let s = TestServer::start(Setup { policy, ..Setup::default() }).await;
    s.wait_pools_full().await;
    let key = s.key("p", false, None).await;
    let ms = |v: &Value| v.as_str().unwrap().parse::<duffy_core::Timestamp>().unwrap().0;

    // The default lifetime is the lease; the maximum counts from creation.
    let r = call(&s, "POST", "/api/v1/sessions", Some(&key), Some(json!({"pool": "7/x86_64"}))).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let long = r.json();
    let id = long["id"].as_str().unwrap().to_string();
    assert_eq!(ms(&long["max_until"]) - ms(&long["created_at"]), 30_000, "{long}");
    let expires = ms(&long["expires_at"]);
    assert_eq!(expires, ms(&long["lease_until"]), "{long}");

    // Extended by a second: the expiry moves, the lease does not.
    let r = call(&s, "POST", &format!("/api/v1/sessions/{id}/extend"), Some(&key), Some(json!({"by_secs": 1}))).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(ms(&r.json()["expires_at"]), expires + 1000);
    assert_eq!(ms(&r.json()["lease_until"]), ms(&long["lease_until"]));
    // Past the maximum: refused, saying so, and nothing moves.
    let r = call(&s, "POST", &format!("/api/v1/sessions/{id}/extend"), Some(&key), Some(json!({"by_secs": 60}))).await;
    let v = problem(&r, 400, "bad_request");
    assert!(v["detail"].as_str().unwrap().contains("max"), "{v}");
    let now = call(&s, "GET", &format!("/api/v1/sessions/{id}"), Some(&key), None).await.json();
    assert_eq!(ms(&now["expires_at"]), expires + 1000);
    problem(
        &call(&s, "POST", &format!("/api/v1/sessions/{id}/extend"), Some(&key), Some(json!({"by_secs": 0}))).await,
        400,
        "bad_request",
    );
    // A lifetime past the maximum is refused at creation.
    let r =
        call(&s, "POST", "/api/v1/sessions", Some(&key), Some(json!({"pool": "7/x86_64", "lifetime_secs": 31}))).await;
    let v = problem(&r, 400, "bad_request");
    assert!(v["detail"].as_str().unwrap().contains("maximum lifetime of 30 s"), "{v}");

    // A one-second session expires, and its nodes are reclaimed.
    let r =
        call(&s, "POST", "/api/v1/sessions", Some(&key), Some(json!({"pool": "7/x86_64", "lifetime_secs": 1}))).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let short = r.json();
    let sid = short["id"].as_str().unwrap().to_string();
    let host = short["hosts"][0].as_str().unwrap().to_string();
    assert_eq!(ms(&short["expires_at"]) - ms(&short["created_at"]), 1000, "from the claim: {short}");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let ended = loop {
        let v = call(&s, "GET", &format!("/api/v1/sessions/{sid}"), Some(&key), None).await.json();
        if v["state"] != "Prod" {
            break v;
        }
        assert!(std::time::Instant::now() < deadline, "the session did not expire: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(ended["state"], "Done", "{ended}");
    assert!(ended["end_reason"].as_str().unwrap().contains("expired"), "{ended}");
    let node = call(&s, "GET", &format!("/api/v1/nodes/{host}"), Some(&key), None).await.json();
    assert!(node["events"].as_array().unwrap().iter().any(|e| e["cause"] == "session_expired"), "{node}");
    assert!(node["node"]["session"].is_null(), "{node}");
    // An expired session can no longer be extended.
    problem(&call(&s, "POST", &format!("/api/v1/sessions/{sid}/extend"), Some(&key), None).await, 409, "conflict");
    s.stop().await;
}

/// `wait`: a short pool queues the request (202, Location), its status
/// shows its place, it can be cancelled, and it is served as nodes become
/// Ready. A request the service does not know says to resubmit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_requests_are_queued_polled_cancelled_and_served() {
    let s = TestServer::start(Setup { machines: 8, ..Setup::default() }).await;
    // No spare machine (the pools' targets are 6 + 2): a pool taken
    // whole stays empty until its nodes are released.
    s.wait_pools_full().await;
    let key = s.key("p", false, None).await;
    // Take the whole i386 pool (2 nodes).
    let r = call(&s, "POST", "/api/v1/sessions", Some(&key), Some(json!({"pool": "6/i386", "count": 2}))).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let holder = r.json()["id"].as_str().unwrap().to_string();

    // Without wait: refused, with the Ready count.
    let v = problem(
        &call(&s, "POST", "/api/v1/sessions", Some(&key), Some(json!({"pool": "6/i386"}))).await,
        409,
        "insufficient",
    );
    assert_eq!((v["requested"].as_u64(), v["ready"].as_u64()), (Some(1), Some(0)), "{v}");

    // With wait: queued, then cancelled.
    let r = s
        .client
        .post(format!("{}/api/v1/sessions", s.base))
        .bearer_auth(&key)
        .json(&json!({"pool": "6/i386", "wait": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let location = r.headers()["location"].to_str().unwrap().to_string();
    let q: Value = r.json().await.unwrap();
    assert_eq!((q["state"].as_str(), q["position"].as_u64()), (Some("waiting"), Some(1)), "{q}");
    assert_eq!(location, format!("/api/v1/requests/{}", q["id"].as_str().unwrap()));
    let other = s.key("other", false, None).await;
    problem(&call(&s, "GET", &location, Some(&other), None).await, 404, "not_found");
    let r = call(&s, "DELETE", &location, Some(&key), None).await;
    assert_eq!(r.json()["state"], "cancelled", "{}", r.body);
    assert_eq!(call(&s, "GET", &location, Some(&key), None).await.json()["state"], "cancelled");

    // Queued again, then served once the pool's nodes come back.
    let r = call(&s, "POST", "/api/v1/sessions", Some(&key), Some(json!({"pool": "6/i386", "wait": true}))).await;
    assert_eq!(r.status, 202, "{}", r.body);
    let id = r.json()["id"].as_str().unwrap().to_string();
    let pools = call(&s, "GET", "/api/v1/pools", Some(&key), None).await.json();
    let i386 = pools.as_array().unwrap().iter().find(|p| p["pool"] == "6/i386").unwrap().clone();
    assert_eq!(i386["waiting"], 1, "{i386}");
    assert_eq!(call(&s, "POST", &format!("/api/v1/sessions/{holder}/release"), Some(&key), None).await.status, 200);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let served = loop {
        let v = call(&s, "GET", &format!("/api/v1/requests/{id}"), Some(&key), None).await.json();
        if v["state"] != "waiting" {
            break v;
        }
        assert!(std::time::Instant::now() < deadline, "not served: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(served["state"], "served", "{served}");
    assert_eq!(served["session"]["state"], "Prod", "{served}");
    assert_eq!(served["session"]["hosts"].as_array().unwrap().len(), 1, "{served}");

    let v = problem(&call(&s, "GET", "/api/v1/requests/no-such-request", Some(&key), None).await, 404, "not_found");
    assert!(v["detail"].as_str().unwrap().contains("submit it again"), "{v}");
    s.stop().await;
}
