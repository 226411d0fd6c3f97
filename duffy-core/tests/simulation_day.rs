//! A deterministic simulation: one day of Jenkins-like traffic against a
//! farm shaped like the original one (the seed's pool table plus spares),
//! with failing installs. Runs in about a second, prints what a farm
//! operator would want to know, and gives a byte-identical event log for
//! the same seed.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use duffy_core::sim::{SimConfig, SimFarm};
use duffy_core::testkit::Harness;
use duffy_core::testkit::conformance::{check_history, check_invariants};
use duffy_core::{Arch, Clock, EngineError, EventQuery, NodeRequest, Policy, PoolTarget, time::sleep};
use futures::task::LocalSpawnExt;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Debug, Default)]
struct Stats {
    jobs: u64,
    served: u64,
    gave_up: u64,
    warm_hits: u64,
    prep_failures: u64,
    failed_by_job: u64,
    waits_ms: Vec<i64>,
}

struct Outcome {
    stats: Stats,
    event_log: String,
    installs: u64,
    install_failures: u64,
}

const DAY: Duration = Duration::from_secs(24 * 3600);

fn simulate(seed: u64) -> Outcome {
    let policy = Policy {
        rate_limit: None,
        tick: Duration::from_secs(30),
        max_concurrent_installs: 20,
        install_timeout: Duration::from_secs(30 * 60),
        fail_cap: Some(10),
        ..Policy::default()
    };
    let sim = SimConfig {
        seed,
        install_min: Duration::from_secs(8 * 60),
        install_max: Duration::from_secs(15 * 60),
        install_failure_rate: 0.1,
        prepare_time: Duration::from_secs(2),
        prepare_failure_rate: 0.002,
        power_latency: Duration::from_millis(300),
    };
    // The seed's table (38 standby) plus spares for the nodes out on jobs.
    let mut h = Harness::new(policy, sim, SimFarm::machines(90), &PoolTarget::seed_defaults());
    let keys: Vec<String> = (0..10).map(|i| h.key(&format!("project{i}"), None, false)).collect();
    // An hour for the pools to fill before the day starts.
    h.advance(Duration::from_secs(3600));
    let start = h.clock.now();

    let stats = Rc::new(RefCell::new(Stats::default()));
    let spawner = h.spawner();
    let engine = h.engine.clone();
    let clock = h.clock.clone();
    let st = stats.clone();
    h.spawn(async move {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
        loop {
            // Busier by day than by night: 15 to 45 jobs an hour.
            let hour = clock.now().since(start).as_secs() / 3600;
            let per_hour = if (8..20).contains(&hour) { 45.0 } else { 15.0 };
            let gap = -(1.0 - rng.r#gen::<f64>()).ln() * 3600.0 / per_hour;
            sleep(&clock, Duration::from_secs_f64(gap)).await;
            if clock.now().since(start) >= DAY {
                return;
            }
            let (release, arch) = match rng.gen_range(0..100) {
                0..=59 => ("7", Arch::X86_64),
                60..=74 => ("6", Arch::X86_64),
                75..=84 => ("6", Arch::I386),
                85..=92 => ("5", Arch::X86_64),
                _ => ("5", Arch::I386),
            };
            let count = if rng.gen_bool(0.8) { 1 } else { rng.gen_range(2..=3) };
            let hold = Duration::from_secs(rng.gen_range(10 * 60..=70 * 60));
            let fails = rng.gen_bool(0.03);
            let key = keys[rng.gen_range(0..keys.len())].clone();
            let (engine, clock, st) = (engine.clone(), clock.clone(), st.clone());
            let job = async move {
                let who = engine.authenticate(&key).await.expect("key");
                let req =
                    NodeRequest { release: Some(release.into()), arch: Some(arch), count: Some(count), flavor: None };
                st.borrow_mut().jobs += 1;
                let asked = clock.now();
                let mut first = true;
                // Like cico: retry while the pool is empty, give up after an hour.
                let alloc = loop {
                    match engine.get_nodes(&who, &req).await {
                        Ok(a) => break Some(a),
                        Err(EngineError::InsufficientNodes { .. })
                            if clock.now().since(asked) < Duration::from_secs(3600) =>
                        {
                            first = false;
                            sleep(&clock, Duration::from_secs(60)).await;
                        }
                        Err(EngineError::PreparationFailed { .. }) => {
                            st.borrow_mut().prep_failures += 1;
                            first = false;
                        }
                        Err(EngineError::InsufficientNodes { .. }) => break None,
                        Err(e) => panic!("unexpected error: {e}"),
                    }
                };
                let Some(alloc) = alloc else {
                    st.borrow_mut().gave_up += 1;
                    return;
                };
                {
                    let mut s = st.borrow_mut();
                    s.served += 1;
                    s.warm_hits += u64::from(first);
                    s.waits_ms.push(clock.now().since(asked).as_millis() as i64);
                }
                // A job that needs longer than the lease extends its
                // session first, or it would expire under it.
                let lease = engine.policy().lease;
                if hold > lease {
                    let by = hold - lease + Duration::from_secs(120);
                    engine.extend_session(&who, &alloc.session.0, by).await.expect("extend");
                }
                sleep(&clock, hold).await;
                if fails {
                    st.borrow_mut().failed_by_job += 1;
                    engine.fail(&who, &alloc.session.0).await.expect("fail");
                    // Someone looks at it for a while, then releases it.
                    sleep(&clock, Duration::from_secs(2 * 3600)).await;
                }
                engine.done(&who, &alloc.session.0).await.expect("done");
            };
            spawner.spawn_local(job).expect("spawn");
        }
    });
    h.advance(DAY + Duration::from_secs(4 * 3600));

    let store = h.dyn_store();
    let log = h.block_on(async move {
        check_invariants(&*store).await.expect("invariants");
        check_history(&*store).await.expect("history");
        let events = store.events(EventQuery::default()).await.expect("events");
        let mut log = String::new();
        for e in events {
            log.push_str(&serde_json::to_string(&e).expect("serialize"));
            log.push('\n');
        }
        log
    });
    let stats = Rc::try_unwrap(stats).map(RefCell::into_inner).unwrap_or_default();
    Outcome { stats, event_log: log, installs: h.farm.installs(), install_failures: h.farm.install_failures() }
}

fn percentile(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

#[test]
fn one_simulated_day_is_served_and_reproducible() {
    let a = simulate(7);
    let mut waits = a.stats.waits_ms.clone();
    waits.sort_unstable();
    let s = &a.stats;
    let hit_rate = s.warm_hits as f64 / s.served.max(1) as f64;
    println!(
        "simulated day: {} jobs, {} served, {} gave up, {} hit a preparation failure, {} failed by the job; \
         wait p50 {:.1} s, p99 {:.1} s; warm-pool hit rate {:.1}%; {} installs, {} failed attempts; {} events",
        s.jobs,
        s.served,
        s.gave_up,
        s.prep_failures,
        s.failed_by_job,
        percentile(&waits, 0.5) as f64 / 1000.0,
        percentile(&waits, 0.99) as f64 / 1000.0,
        hit_rate * 100.0,
        a.installs,
        a.install_failures,
        a.event_log.lines().count(),
    );
    assert!(s.jobs > 500, "a day of traffic: {} jobs", s.jobs);
    assert!(a.install_failures > 0, "installs did fail");
    assert_eq!(s.served + s.gave_up, s.jobs, "every job finished one way or the other");
    assert!(hit_rate > 0.8, "the warm pool serves most jobs at once: {:.3}", hit_rate);

    let b = simulate(7);
    assert!(a.event_log == b.event_log, "same seed, same event log, byte for byte");
    let c = simulate(8);
    assert!(a.event_log != c.event_log, "another seed gives another day");
}
