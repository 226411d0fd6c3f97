//! `examples/jenkins_job.py`, the standard-library job script, against a
//! running service: passing tests release the nodes, failing tests keep
//! them for debugging.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod common;

use std::path::Path;
use std::process::Command;

use common::{Setup, TestServer};
use duffy_core::SessionState;

fn run_job(base: &str, key: &str, cmd: &str) -> (bool, String) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/jenkins_job.py");
    let out = Command::new("python3")
        .arg(script)
        .args(["--url", base, "--key", key, "--count", "2", "--interval", "1", "--run", cmd])
        .output()
        .expect("python3 is needed to run the job script");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_script_gets_runs_and_releases() {
    let s = TestServer::start(Setup::default()).await;
    s.wait_pools_full().await;
    let key = s.key("jenkins", false, None).await;
    let base = s.base.clone();

    let k = key.clone();
    let b = base.clone();
    let (ok, out) = tokio::task::spawn_blocking(move || run_job(&b, &k, "test -n {host}")).await.unwrap();
    assert!(ok, "{out}");
    assert!(out.contains("tests passed; nodes released: Done"), "{out}");

    let (ok, out) = tokio::task::spawn_blocking(move || run_job(&base, &key, "false")).await.unwrap();
    assert!(!ok, "{out}");
    assert!(out.contains("tests failed; nodes kept for debugging"), "{out}");
    let live = s.store.live_sessions().await.unwrap();
    assert_eq!(live.len(), 1);
    assert_eq!(live[0].state, SessionState::Fail);
    s.stop().await;
}
