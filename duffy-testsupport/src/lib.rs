//! # duffy-testsupport
//!
//! What the tests of several Duffy crates share, defined once: a
//! dev-dependency, never a dependency of a production crate.
//!
//! - [`rig`]: simulated BMCs, one `ipmi_sim` per BMC on loopback.
//! - [`sshd`]: a real OpenSSH server with its own keys.
//! - [`service`]: the `duffy` binary, for one-shot commands and as a
//!   `duffy serve` child process ([`duffy!`] names the binary).
//! - [`require`] and [`cico_path`]: a test whose real component is
//!   missing fails loudly, saying what to install; it never skips.
//! - [`eventually`]: polls a condition with a deadline.
//!
//! For the system clock, tests use duffy-core's own
//! (`duffy_core::clock::SystemClock`, feature `tokio`).
//!
//! Everything here panics on a problem: a panic in test support is a
//! failed test, which is what it should be.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

pub mod rig;
pub mod service;
pub mod sshd;

use std::ffi::OsStr;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// How to install every test dependency at once.
pub const INSTALL_ALL: &str = "scripts/install-test-deps.sh";

/// Panics, loudly, unless `program` can be started: the tests that need it
/// fail, saying `install`, rather than skip. `probe` are arguments that
/// make the program print something and exit (`--version`, `-V`); its
/// exit status does not matter, only that it runs.
pub fn require(program: impl AsRef<OsStr>, probe: &[&str], install: &str) {
    let program = program.as_ref();
    let started =
        Command::new(program).args(probe).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).status();
    if let Err(e) = started {
        panic!(
            "\n\n*** `{}` cannot be run ({e}): these tests need it. Install it with\n\
             ***   {install}\n\
             *** (or run {INSTALL_ALL}, which installs every test dependency)\n\n",
            program.to_string_lossy()
        );
    }
}

/// The workspace's root directory.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace root").to_path_buf()
}

/// The legacy `cico` client (python-cicoclient 0.4.7) in the workspace's
/// `.venv`; fails the test if it is missing.
pub fn cico_path() -> PathBuf {
    let p = workspace().join(".venv/bin/cico");
    require(&p, &["--version"], "python3 -m venv .venv && .venv/bin/pip install python-cicoclient==0.4.7");
    p
}

/// schemathesis (the OpenAPI property tester) in the workspace's
/// `.venv`; fails the test if it is missing.
pub fn schemathesis_path() -> PathBuf {
    let p = workspace().join(".venv/bin/schemathesis");
    require(&p, &["--version"], "python3 -m venv .venv && .venv/bin/pip install 'schemathesis>=4,<5'");
    p
}

/// A TCP port on 127.0.0.1 that was free a moment ago (and on which
/// nothing listens, unless someone took it since).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0").local_addr().expect("local address").port()
}

/// Polls `cond` every 10 ms until it holds; fails the test, naming
/// `what`, if it does not within `within`. Sleeps on tokio's timer.
pub async fn eventually(within: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let until = tokio::time::Instant::now() + within;
    while !cond() {
        assert!(tokio::time::Instant::now() < until, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// [`eventually`] for a condition that must be awaited (a store read).
pub async fn eventually_async<F, Fut>(within: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = tokio::time::Instant::now() + within;
    while !cond().await {
        assert!(tokio::time::Instant::now() < until, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[should_panic(expected = "cannot be run")]
    fn a_missing_tool_fails_the_test_loudly() {
        require("/nonexistent/duffy-no-such-tool", &["--version"], "apt-get install duffy-no-such-tool");
    }

    #[test]
    fn a_tool_that_runs_is_accepted_whatever_its_exit_status() {
        require("sh", &["-c", "exit 3"], "apt-get install dash");
    }
}
