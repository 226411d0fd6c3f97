//! Crash test with a real process.
//!
//! The parent test re-runs this test binary as a child (test `crash_child`)
//! running the shared workload (`common/workload.rs`): 8 tasks writing to
//! the store and acknowledging what the store answered `Ok`. The parent
//! SIGKILLs it at a random moment, reopens the file, and checks that every
//! acknowledged operation is there, every batch is whole or absent, and the
//! farm invariants and node histories hold; then the next round runs on the
//! same file.
//!
//! `DUFFY_CRASH_ROUNDS` sets the number of rounds (default 8; the full run
//! uses 50). `DUFFY_CRASH_SEED` replays a run.
//!
//! A SIGKILL tests that nothing is acknowledged before its COMMIT; it
//! cannot test the fsync itself (the OS keeps the killed process's
//! writes): `power.rs` cuts the power.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::workload::{self, Acks, CHILD_SABOTAGE, Child};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The child's body: does nothing unless run by the parent.
#[test]
fn crash_child() {
    workload::child_main();
}

/// One round: a child, killed at a random moment, then the checks.
/// Returns the operations it acknowledged, or what was wrong.
fn crash_round(path: &Path, round: u64, rng: &mut StdRng, acks: &mut Acks) -> Result<u64, String> {
    let child = Child::spawn("crash_child", path, round, &[]);
    // Mostly mid-load; one round in eight as early as the open itself.
    if rng.gen_ratio(1, 8) {
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..30)));
    } else if child.wait_ready(Duration::from_secs(30)) {
        std::thread::sleep(Duration::from_millis(rng.gen_range(5..400)));
    }
    let ended = child.kill();
    ended.killed()?;
    let n = workload::record(acks, &ended.lines)?;
    workload::verify(path, acks)?;
    Ok(n)
}

#[test]
fn acknowledged_operations_survive_sigkill() {
    let rounds: u64 = std::env::var("DUFFY_CRASH_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(8);
    let seed: u64 = std::env::var("DUFFY_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
    });
    eprintln!("crash test: {rounds} rounds, DUFFY_CRASH_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("duffy.db");
    workload::seed(&path);
    let mut acks = Acks::default();
    let started = Instant::now();
    for round in 0..rounds {
        match crash_round(&path, round, &mut rng, &mut acks) {
            Ok(n) => eprintln!("round {round}: {n} operations acknowledged before SIGKILL"),
            Err(e) => panic!("round {round} (DUFFY_CRASH_SEED={seed}): {e}"),
        }
    }
    eprintln!("crash test: {} acknowledged operations checked in {:.1?}", acks.total, started.elapsed());
    assert!(acks.total >= rounds * 5, "the child did too little work to mean anything: {}", acks.total);
}

/// A task other than the first that hits a store error (and panics on it)
/// ends the child at once, and the round fails with the task's message.
#[test]
fn a_failing_task_in_the_child_fails_the_round() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("duffy.db");
    workload::seed(&path);
    let child = Child::spawn("crash_child", &path, 0, &[(CHILD_SABOTAGE, "store-error".into())]);
    assert!(child.wait_ready(Duration::from_secs(30)), "the child started");
    // Task 5 provokes its error at its 20th operation: well within this.
    let ended = child.wait_at_most(Duration::from_secs(20));
    let e = ended.killed().expect_err("the failing task must be noticed");
    assert!(e.contains("CHILD-PANIC") && e.contains("store ok"), "{e}");
    // Whatever it acknowledged before is still checked.
    let mut acks = Acks::default();
    workload::record(&mut acks, &ended.lines).expect("lines");
    workload::verify(&path, &acks).expect("verify");
}

/// The whole-batch check finds a batch of which only some writes are in
/// the store: here written on purpose as two separate commits, the node's
/// write alone and, in a second store, the session's alone.
#[test]
fn the_whole_batch_check_catches_half_applied_batches() {
    use duffy_backend_sqlite::{SqliteOptions, SqliteStore};
    use duffy_core::testkit::conformance::claim_req;
    use duffy_core::{Actor, Batch, Cause, KeyId, NodeWrite, SessionWrite, Store, Timestamp};

    const T0: Timestamp = Timestamp(1_700_000_000_000);
    for (half, expected) in
        [("node", "half applied: 1 of its 2 events"), ("session", "no batch that writes it is there")]
    {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("duffy.db");
        workload::seed(&path);
        futures::executor::block_on(async {
            let store = SqliteStore::open(&path, SqliteOptions::default()).expect("open");
            let c = store.claim(claim_req("s-half", 1, "crash", 2, T0)).await.expect("ok").expect("claimed");
            let mut batch = Batch::default();
            for n in &c.nodes {
                let mut w = NodeWrite::transition(n, Cause::Prepared, Actor::Key(KeyId(1)), T0).expect("legal");
                w.event.detail = Some("op-half".into());
                batch.nodes.push(w);
            }
            let delivered = duffy_core::SessionCause::Delivered { lease_until: T0 };
            batch.sessions.push(SessionWrite::transition(&c.session, delivered, T0).expect("legal"));
            match half {
                "node" => batch.nodes.truncate(1),
                _ => batch.nodes.clear(),
            }
            batch.sessions.retain(|_| half == "session");
            store.commit(batch).await.expect("the half batch");
        });
        let mut acks = Acks::default();
        acks.record("TRY op-half 2 s-half 2").expect("line");
        let e = workload::verify(&path, &acks).expect_err("must be caught");
        assert!(e.contains(expected), "{half}: {e}");
    }
}
