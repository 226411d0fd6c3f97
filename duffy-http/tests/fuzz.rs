//! Arbitrary paths and query strings at every endpoint: never a 5xx, never
//! a panic, and a rejected request changes nothing. The legacy endpoints
//! ignore parameters they do not know: a rejected request is rejected with
//! the same answer when unknown parameters are added, and no legacy
//! endpoint ever refuses a request for an unknown parameter.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod common;

use std::sync::Arc;

use common::{Setup, TestServer};
use duffy_core::{EventQuery, Store};
use duffy_http::api::ROUTES;
use proptest::prelude::*;

/// Every route the service has (its node parameter a real node), and two
/// unknown paths.
fn paths() -> Vec<String> {
    let mut paths: Vec<String> = ROUTES.iter().map(|r| r.path.replace("{node}", "n1.sim.duffy")).collect();
    paths.extend(["/Node".to_string(), "/".to_string()]);
    paths
}

fn piece() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("key".to_string()),
        Just("ssid".to_string()),
        Just("ver".to_string()),
        Just("arch".to_string()),
        Just("count".to_string()),
        Just("flavor".to_string()),
        Just("_".to_string()),
        Just("token".to_string()),
        Just("host_key".to_string()),
        Just("reason".to_string()),
        Just("host".to_string()),
        Just("KEY".to_string()),
        Just("x86_64".to_string()),
        Just("7".to_string()),
        Just("-1".to_string()),
        Just("99999999999999999999".to_string()),
        Just("%00".to_string()),
        Just("%ff%fe".to_string()),
        Just("é".to_string()),
        "[ -~]{0,12}",
        "\\PC{0,6}",
    ]
}

fn query() -> impl Strategy<Value = String> {
    proptest::collection::vec((piece(), prop_oneof![Just("=".to_string()), Just("".to_string())], piece()), 0..6)
        .prop_map(|parts| parts.into_iter().map(|(k, eq, v)| format!("{k}{eq}{v}")).collect::<Vec<_>>().join("&"))
}

async fn snapshot(store: &dyn Store) -> (Vec<duffy_core::Node>, Vec<duffy_core::Session>, usize, bool) {
    (
        store.nodes().await.unwrap(),
        store.live_sessions().await.unwrap(),
        store.events(EventQuery::default()).await.unwrap().len(),
        store.paused().await.unwrap(),
    )
}

/// The endpoints that ignore unknown parameters.
fn is_legacy(path: &str) -> bool {
    ROUTES
        .iter()
        .any(|r| r.ignores_unknown_parameters() && (path == r.path || path.starts_with(&format!("{}/", r.label()))))
}

/// Parameters no endpoint knows, as job scripts add them.
fn extras() -> impl Strategy<Value = String> {
    proptest::collection::vec(
        (
            prop_oneof![Just("_"), Just("cachebust"), Just("job"), Just("Key"), Just("ssid2"), Just("")],
            "[a-z0-9%]{0,8}",
        ),
        1..4,
    )
    .prop_map(|v| v.into_iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("&"))
}

fn is_success(path: &str, body: &str) -> bool {
    let v: serde_json::Value = match serde_json::from_str(body) {
        Ok(v) => v,
        Err(_) => return false,
    };
    match path {
        "/Node/get" => v.get("hosts").is_some(),
        "/Node/done" | "/Node/fail" | "/PauseService" | "/ResumeService" => v == serde_json::json!("Done"),
        p if p.starts_with("/NodeSetAdmin") || p.starts_with("/NodeRecover") => v.get("state").is_some(),
        _ => false,
    }
}

#[test]
fn arbitrary_requests_never_break_anything() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (server, user, admin) = rt.block_on(async {
        // No reconciler: the farm changes only through requests.
        let s = TestServer::start(Setup { reconcile: false, ..Setup::default() }).await;
        let user = s.key("proj", false, None).await;
        let admin = s.key("ops", true, None).await;
        (Arc::new(s), user, admin)
    });
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 300,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let strategy = (proptest::sample::select(paths()), query(), 0..3usize, extras());
    runner
        .run(&strategy, |(path, q, which_key, extra)| {
            let path = path.as_str();
            // Sometimes a real key in front, so that validation past the key is reached.
            let q = match which_key {
                1 => format!("key={user}&{q}"),
                2 => format!("key={admin}&{q}"),
                _ => q,
            };
            let s = server.clone();
            rt.block_on(async move {
                let before = snapshot(&*s.store).await;
                let url = format!("{}{}?{}", s.base, path, q);
                let r = match s.client.get(&url).send().await {
                    Ok(r) => r,
                    // reqwest refused to build the URL: nothing reached the server.
                    Err(e) if e.is_builder() => return Ok(()),
                    Err(e) => panic!("request failed: {e}"),
                };
                let status = r.status().as_u16();
                let body = r.text().await.unwrap();
                prop_assert!(status < 500, "{url} -> {status} {body}");
                prop_assert!(!body.is_empty(), "{url}: empty body");
                if is_legacy(path) {
                    prop_assert!(!body.contains("unknown parameter"), "{url}: a legacy endpoint refused a parameter");
                }
                if !is_success(path, &body) {
                    let after = snapshot(&*s.store).await;
                    prop_assert!(before == after, "{url} was rejected ({status} {body}) but changed the store");
                    if is_legacy(path) {
                        // Nothing changed, so the same request with unknown
                        // parameters added gets the same answer.
                        let url2 = format!("{url}&{extra}");
                        let r2 = s.client.get(&url2).send().await.unwrap();
                        let (status2, body2) = (r2.status().as_u16(), r2.text().await.unwrap());
                        prop_assert!(
                            (status2, &body2) == (status, &body),
                            "{url} -> {status} {body}\nbut {url2} -> {status2} {body2}"
                        );
                        prop_assert!(before == snapshot(&*s.store).await, "{url2} changed the store");
                    }
                }
                Ok(())
            })
        })
        .unwrap();
    let s = Arc::try_unwrap(server).ok().expect("single owner");
    rt.block_on(s.stop());
}
