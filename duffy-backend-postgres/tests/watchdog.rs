//! The test watchdog every test database carries: a hung test ends the
//! test process loudly (and kills the children it registered); a test that
//! finishes in time is left alone.

use std::process::Command;
use std::time::{Duration, Instant};

use duffy_backend_postgres::test_cluster::{Watchdog, kill_on_timeout};

const CHILD: &str = "DUFFY_WATCHDOG_CHILD";

/// In the child process (run by the test below): a test that hangs while
/// watched, with a registered child process of its own.
fn hang(sleeper_pid_file: &str) {
    let mut sleeper = Command::new("sleep").arg("60").spawn().expect("start sleep");
    std::fs::write(sleeper_pid_file, sleeper.id().to_string()).expect("write pid");
    kill_on_timeout(sleeper.id());
    let _w = Watchdog::new("a deliberately hung test", Duration::from_millis(300));
    std::thread::sleep(Duration::from_secs(60));
    // Not reached when the watchdog works.
    let _ = sleeper.kill();
    let _ = sleeper.wait();
}

#[test]
fn a_hung_test_aborts_the_test_process_and_kills_its_children() {
    if let Some(pid_file) = std::env::var_os(CHILD) {
        hang(pid_file.to_str().expect("utf-8"));
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let pid_file = dir.path().join("sleeper.pid");
    let started = Instant::now();
    let out = Command::new(std::env::current_exe().expect("exe"))
        .args(["--exact", "a_hung_test_aborts_the_test_process_and_kills_its_children", "--nocapture"])
        .env(CHILD, &pid_file)
        .output()
        .expect("run the hung test");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a hung test passed: {stderr}");
    assert!(stderr.contains("TEST TIMEOUT: a deliberately hung test"), "no word of the timeout: {stderr}");
    assert!(started.elapsed() < Duration::from_secs(30), "the watchdog did not end the hung test");
    let pid = std::fs::read_to_string(&pid_file).expect("pid");
    let alive = Command::new("kill").args(["-0", pid.trim()]).status().expect("kill -0").success();
    // The sleeper is the aborted process's orphan; once killed it may linger
    // as a zombie only until init reaps it.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut alive = alive;
    while alive && Instant::now() < deadline {
        let state = std::fs::read_to_string(format!("/proc/{}/stat", pid.trim())).unwrap_or_default();
        alive = !state.is_empty() && !state.contains(") Z ");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!alive, "the hung test's registered child {pid} still runs");
}

#[test]
fn a_test_that_finishes_in_time_is_left_alone() {
    let w = Watchdog::new("a quick test", Duration::from_millis(200));
    drop(w);
    std::thread::sleep(Duration::from_millis(600));
    // Still here: the watchdog did not fire.
}
