//! The HTTP handlers in process (router called directly, no socket): what a
//! request costs in routing, parsing, authentication, the engine and
//! serialization, on the in-memory store.

#![allow(missing_docs)] // criterion_group! generates undocumented functions

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::Request;
use criterion::{Criterion, criterion_group, criterion_main};
use duffy_core::clock::SystemClock;
use duffy_core::mem::MemStore;
use duffy_core::sim::{SimConfig, SimFarm};
use duffy_core::{Engine, Policy, PoolTarget, Store};
use duffy_http::{AppState, router};
use futures::StreamExt;
use tower::ServiceExt;

async fn call(app: &axum::Router, uri: &str) -> String {
    let resp = app.clone().oneshot(Request::get(uri).body(Body::empty()).expect("request")).await.expect("infallible");
    let mut body = resp.into_body().into_data_stream();
    let mut out = Vec::new();
    while let Some(chunk) = body.next().await {
        out.extend_from_slice(&chunk.expect("body"));
    }
    String::from_utf8(out).expect("utf-8")
}

fn handlers(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
    let (app, key) = rt.block_on(async {
        let store: Arc<dyn Store> = Arc::new(MemStore::new());
        let clock = Arc::new(SystemClock);
        // Instant installs and a running reconciler: released nodes come
        // straight back, so the pool never drains during the bench.
        let sim = SimConfig {
            prepare_time: Duration::ZERO,
            install_min: Duration::ZERO,
            install_max: Duration::ZERO,
            power_latency: Duration::ZERO,
            ..SimConfig::default()
        };
        let farm = Arc::new(SimFarm::new(clock.clone(), sim));
        let policy = Policy {
            rate_limit: None,
            max_concurrent_installs: 256,
            min_pass_interval: Duration::ZERO,
            ..Policy::default()
        };
        let engine = Engine::builder(store.clone(), farm.clone(), farm, clock).policy(policy).build().expect("engine");
        tokio::spawn(engine.reconciler().run(std::future::pending()));
        let pool = duffy_core::PoolKey::new("7", duffy_core::Arch::X86_64, None);
        engine.set_pool_targets(&[PoolTarget { pool, standby: 200 }]).await.expect("targets");
        duffy_core::testkit::conformance::add_ready(
            &*store,
            "n",
            200,
            &duffy_core::PoolKey::new("7", duffy_core::Arch::X86_64, None),
        )
        .await;
        let key =
            duffy_http::keys::create_key(&*store, "bench", false, None, duffy_core::Timestamp(0)).await.expect("key").0;
        // In process there is no socket: every request comes from one made-up address.
        let peer = std::net::SocketAddr::from(([127, 0, 0, 1], 1));
        let state = AppState { engine, metrics: Default::default(), pxe: None, auth_guard: Default::default() };
        (router(state).layer(axum::extract::connect_info::MockConnectInfo(peer)), key)
    });
    let mut g = c.benchmark_group("http_handlers");
    g.bench_function("get+done", |b| {
        b.iter(|| {
            rt.block_on(async {
                // The reconciler refills in the background; wait for it if
                // the loop outran it.
                let body = loop {
                    let b = call(&app, &format!("/Node/get?key={key}")).await;
                    if b != "Insufficient Nodes in READY State" {
                        break b;
                    }
                    tokio::task::yield_now().await;
                };
                let v: serde_json::Value = serde_json::from_str(&body).expect("json");
                let ssid = v["ssid"].as_str().expect("allocated");
                let done = call(&app, &format!("/Node/done?key={key}&ssid={ssid}")).await;
                assert_eq!(done, "\"Done\"\n");
            })
        })
    });
    g.bench_function("inventory_200_nodes", |b| b.iter(|| rt.block_on(call(&app, "/Inventory"))));
    g.bench_function("help", |b| b.iter(|| rt.block_on(call(&app, "/Help"))));
    g.finish();
}

criterion_group!(benches, handlers);
criterion_main!(benches);
