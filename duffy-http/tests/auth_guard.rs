//! Made-up API keys over real HTTP: each address gets a burst of lookups
//! that find nothing, then 429 in the endpoint's invalid-key shape without
//! the store being asked, while keys the service knows keep working.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::sync::Arc;

use duffy_core::clock::SystemClock;
use duffy_core::mem::MemStore;
use duffy_core::sim::{SimConfig, SimFarm};
use duffy_core::{Engine, Project, Store, hash_api_key};
use duffy_http::auth_guard::FAILED_LOOKUP_BURST;
use duffy_http::{Built, start_with};

async fn get(client: &reqwest::Client, base: &str, path: &str) -> (u16, String) {
    let r = client.get(format!("{base}{path}")).send().await.expect("request");
    (r.status().as_u16(), r.text().await.expect("body").trim_end().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_keys_are_limited_per_address_without_reaching_the_store() {
    let store = Arc::new(MemStore::new());
    let clock = Arc::new(SystemClock);
    let sim = Arc::new(SimFarm::new(clock.clone(), SimConfig::default()));
    let engine = Engine::builder(store.clone(), sim.clone(), sim, clock).build().expect("engine");
    store.upsert_project(Project { name: "ci".into(), quota: None, ssh_keys: vec![] }).await.expect("project");
    engine.add_api_key("ci", hash_api_key("good-admin-key"), true, None).await.expect("key");
    engine.add_api_key("ci", hash_api_key("good-but-unused"), false, None).await.expect("key");
    let limits = duffy_http::listener::Limits::from_config(&Default::default(), engine.policy());
    let built = Built { engine, sim: None, pxe: None, limits, install_listen: None, store_stats: None };
    let running = start_with("127.0.0.1:0".parse().unwrap(), built, false).await.expect("start");
    let base = format!("http://{}", running.addr);
    let client = reqwest::Client::new();

    // A known key is remembered after its first use.
    assert_eq!(get(&client, &base, "/Overtime?key=good-admin-key").await, (200, "[]".into()));
    let lookups = store.key_lookups();
    for i in 0..FAILED_LOOKUP_BURST {
        let (status, body) = get(&client, &base, &format!("/Node/done?key=made-up-{i}&ssid=x")).await;
        assert_eq!((status, body.as_str()), (403, r#"{"msg":"Invalid duffy key"}"#));
    }
    assert_eq!(store.key_lookups(), lookups + u64::from(FAILED_LOOKUP_BURST), "each new key was looked up once");

    // Over the budget: 429, the endpoint's invalid-key shape, no lookup.
    let limited = r#"Too many invalid duffy keys from your address; try again in a minute"#;
    let lookups = store.key_lookups();
    let (s, b) = get(&client, &base, "/Node/done?key=made-up-x&ssid=x").await;
    assert_eq!((s, b), (429, format!(r#"{{"msg":"{limited}"}}"#)));
    let (s, b) = get(&client, &base, "/Node/fail?key=made-up-y&ssid=x").await;
    assert_eq!((s, b), (429, format!(r#"{{"msg":"{limited}"}}"#)));
    let (s, b) = get(&client, &base, "/Node/get?key=made-up-z").await;
    assert_eq!((s, b.as_str()), (429, limited), "plain text, like an unknown key's answer");
    let (s, b) = get(&client, &base, "/Inventory?key=made-up-w").await;
    assert_eq!((s, b), (429, format!("\"{limited}\"")), "a JSON string, not [] (which would mean 'you hold nothing')");
    let (s, b) = get(&client, &base, "/PauseService?key=made-up-v").await;
    assert_eq!((s, b), (429, format!(r#"{{"msg":"{limited}"}}"#)));
    // A key the service has not seen yet cannot be told apart, so it waits too.
    let (s, _) = get(&client, &base, "/Node/done?key=good-but-unused&ssid=x").await;
    assert_eq!(s, 429);
    assert_eq!(store.key_lookups(), lookups, "nothing over the budget reached the store");

    // What the service remembers is still answered, without a lookup: a
    // made-up key it has already seen, and a valid key.
    let (s, b) = get(&client, &base, "/Node/done?key=made-up-0&ssid=x").await;
    assert_eq!((s, b.as_str()), (403, r#"{"msg":"Invalid duffy key"}"#));
    assert_eq!(get(&client, &base, "/Overtime?key=good-admin-key").await, (200, "[]".into()));
    assert_eq!(store.key_lookups(), lookups);
    // And nothing was paused by all that.
    assert!(!store.paused().await.expect("read"));
    running.stop().await.expect("stop");
}
