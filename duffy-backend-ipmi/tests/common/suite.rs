//! The power test suite, written once and run for each driver against
//! simulated BMCs (see [`super::rig`]).

use std::future::Future;
use std::time::{Duration, Instant};

use duffy_backend_ipmi::{BmcConfig, Driver, IpmiPowerController, Session};
use duffy_core::model::{Arch, NewNode, Node, NodeId, PowerState};
use duffy_core::power::{BootDevice, PowerAction, PowerController, PowerError, PowerErrorKind};
use duffy_core::time::Timestamp;

use duffy_testsupport::eventually;

use super::rig::{PASSWORD_PREFIX, Rig, require_ipmitool};

/// The node of rig BMC `i`.
pub fn node(i: usize) -> Node {
    NewNode::new(Rig::hostname(i), Arch::X86_64).into_node(NodeId(i as u64), Timestamp(0))
}

/// A rig of `n` BMCs and a controller for them with `driver`, timings
/// adjusted by `tune`.
fn setup(driver: Driver, n: usize, tune: impl Fn(&mut BmcConfig)) -> (Rig, IpmiPowerController) {
    let rig = start_rig(driver, n);
    let ctl = IpmiPowerController::new(rig.inventory(driver, tune));
    (rig, ctl)
}

/// A rig of `n` BMCs, after checking that the tools `driver` needs are
/// installed (a missing tool fails the test, saying what to install).
fn start_rig(driver: Driver, n: usize) -> Rig {
    if driver == Driver::Ipmitool {
        require_ipmitool();
    }
    Rig::start(n)
}

fn ok<T>(r: Result<T, PowerError>, what: &str) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// Runs `op`, expects it to fail with `kind` within `within`, and returns
/// the error.
async fn expect_error<T: std::fmt::Debug>(
    kind: PowerErrorKind,
    within: Duration,
    op: impl Future<Output = Result<T, PowerError>>,
) -> PowerError {
    let started = Instant::now();
    let r = op.await;
    let took = started.elapsed();
    let e = match r {
        Ok(v) => panic!("expected {kind:?}, got Ok({v:?})"),
        Err(e) => e,
    };
    assert_eq!(e.kind, kind, "wrong class after {took:?}: {e}");
    assert!(!format!("{e} {e:?}").contains(PASSWORD_PREFIX), "a password leaked into the error: {e}");
    assert!(took <= within, "{kind:?} came after {took:?}, more than {within:?}: {e}");
    e
}

/// Waits until `ctl` can read the status of node `i` again (a BMC that was
/// frozen or slow may first work through the requests it queued).
async fn recovers(ctl: &IpmiPowerController, i: usize) {
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        match ctl.status(&node(i)).await {
            Ok(_) => return,
            Err(e) if Instant::now() < until => {
                tracing::debug!("not yet recovered: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("BMC {i} did not recover within 20 s: {e}"),
        }
    }
}

fn sets(log: &[String]) -> Vec<&String> {
    log.iter().filter(|l| l.starts_with("set ")).collect()
}

pub async fn status_reports_the_state_file(driver: Driver) {
    let (rig, ctl) = setup(driver, 1, |_| {});
    let b = rig.bmc(0);
    assert_eq!(ok(ctl.status(&node(0)).await, "status"), PowerState::Off);
    b.set_power(true);
    assert_eq!(ok(ctl.status(&node(0)).await, "status"), PowerState::On);
    b.set_power(false);
    assert_eq!(ok(ctl.status(&node(0)).await, "status"), PowerState::Off);
    // Reading the status changes nothing.
    assert!(sets(&b.log()).is_empty(), "{:?}", b.log());
}

pub async fn on_and_off_are_idempotent(driver: Driver) {
    let (rig, ctl) = setup(driver, 1, |_| {});
    let b = rig.bmc(0);
    ok(ctl.power(&node(0), PowerAction::On).await, "on");
    assert_eq!(b.power(), "1");
    assert_eq!(sets(&b.log()), ["set power 1"]);
    ok(ctl.power(&node(0), PowerAction::On).await, "on again");
    assert_eq!(sets(&b.log()), ["set power 1"], "on when on must send nothing");
    assert_eq!(ok(ctl.status(&node(0)).await, "status"), PowerState::On);
    ok(ctl.power(&node(0), PowerAction::Off).await, "off");
    assert_eq!(b.power(), "0");
    ok(ctl.power(&node(0), PowerAction::Off).await, "off again");
    assert_eq!(sets(&b.log()), ["set power 1", "set power 0"], "off when off must send nothing");
    assert_eq!(ok(ctl.status(&node(0)).await, "status"), PowerState::Off);
}

pub async fn cycle_turns_off_then_on(driver: Driver) {
    let (rig, ctl) = setup(driver, 1, |_| {});
    let b = rig.bmc(0);
    b.set_power(true);
    ok(ctl.power(&node(0), PowerAction::Cycle).await, "cycle");
    // ipmi_sim powers down at once and up again a second later.
    // (The script logs a call before it changes the state file.)
    eventually(Duration::from_secs(5), "power back on after cycle", || sets(&b.log()).len() >= 2 && b.power() == "1")
        .await;
    assert_eq!(sets(&b.log()), ["set power 0", "set power 1"]);
    assert_eq!(ok(ctl.status(&node(0)).await, "status"), PowerState::On);
    // Cycling a machine that is off powers it on.
    b.set_power(false);
    b.clear_log();
    ok(ctl.power(&node(0), PowerAction::Cycle).await, "cycle when off");
    assert_eq!(sets(&b.log()), ["set power 1"]);
    assert_eq!(b.power(), "1");
}

pub async fn reset_and_soft_off(driver: Driver) {
    let (rig, ctl) = setup(driver, 1, |_| {});
    let b = rig.bmc(0);
    b.set_power(true);
    ok(ctl.power(&node(0), PowerAction::Reset).await, "reset");
    assert_eq!(sets(&b.log()), ["set reset 1"]);
    assert_eq!(b.power(), "1");
    ok(ctl.power(&node(0), PowerAction::Soft).await, "soft");
    assert_eq!(sets(&b.log()), ["set reset 1", "set shutdown 1"]);
    assert_eq!(b.power(), "0");
    ok(ctl.power(&node(0), PowerAction::Soft).await, "soft when off");
    assert_eq!(sets(&b.log()).len(), 2, "soft off when off must send nothing");
}

pub async fn next_boot_pxe_and_disk(driver: Driver) {
    let (rig, ctl) = setup(driver, 1, |_| {});
    let b = rig.bmc(0);
    assert_eq!(b.boot(), "none");
    ok(ctl.set_next_boot(&node(0), BootDevice::Pxe).await, "pxe");
    assert_eq!(b.boot(), "pxe");
    ok(ctl.set_next_boot(&node(0), BootDevice::Disk).await, "disk");
    // ipmi_sim names "force boot from default hard drive" `default`.
    assert_eq!(b.boot(), "default");
    ok(ctl.set_next_boot(&node(0), BootDevice::Pxe).await, "pxe again");
    assert_eq!(b.boot(), "pxe");
    assert_eq!(b.power(), "0", "setting the boot device must not touch power");
}

pub async fn twenty_bmcs_concurrently(driver: Driver) {
    const N: usize = 20;
    let (rig, ctl) = setup(driver, N, |c| c.timeout = Duration::from_secs(2));
    let ctl = &ctl;
    let lifecycles = (0..N).map(|i| async move {
        let n = node(i);
        let r: Result<(), PowerError> = async {
            assert_eq!(ctl.status(&n).await?, PowerState::Off);
            ctl.set_next_boot(&n, BootDevice::Pxe).await?;
            ctl.power(&n, PowerAction::On).await?;
            assert_eq!(ctl.status(&n).await?, PowerState::On);
            if i % 2 == 0 {
                ctl.power(&n, PowerAction::Off).await?;
            }
            Ok(())
        }
        .await;
        (i, r)
    });
    for (i, r) in futures::future::join_all(lifecycles).await {
        ok(r, &format!("BMC {i}"));
    }
    for b in &rig.bmcs {
        let expected = if b.index % 2 == 0 { "0" } else { "1" };
        assert_eq!(b.power(), expected, "BMC {}", b.index);
        assert_eq!(b.boot(), "pxe", "BMC {}", b.index);
    }
    // Each BMC saw only its own node's operations.
    let b3 = rig.bmc(3);
    assert_eq!(sets(&b3.log()), ["set boot pxe", "set power 1"]);
}

pub async fn operations_on_one_bmc_are_serialised(driver: Driver) {
    let (rig, ctl) = setup(driver, 1, |c| {
        c.timeout = Duration::from_secs(3);
        c.deadline = Duration::from_secs(30);
    });
    let b = rig.bmc(0);
    // Each chassis call takes a while, so that operations would overlap if
    // they were not serialised.
    b.set_delay(Some(0.05));
    let ctl = &ctl;
    let ops = (0..8).map(|k| async move {
        let action = if k % 2 == 0 { PowerAction::On } else { PowerAction::Off };
        ctl.power(&node(0), action).await
    });
    for (k, r) in futures::future::join_all(ops).await.into_iter().enumerate() {
        ok(r, &format!("operation {k}"));
    }
    b.set_delay(None);
    // Each operation reads the power state, then changes it if needed; if
    // two ran at once, a `set` would follow another operation's `get` or
    // `set` instead of its own `get`.
    let log = b.log();
    assert!(!log.is_empty());
    for (k, line) in log.iter().enumerate() {
        if line.starts_with("set power") {
            assert!(k > 0 && log[k - 1] == "get power", "operations overlapped: {log:?}");
        }
    }
    // Each operation found the state its predecessor left, so every one
    // had something to do: alternating on/off, eight sets.
    assert_eq!(sets(&log).len(), 8, "{log:?}");
}

pub async fn unknown_node_is_not_configured(driver: Driver) {
    let (_rig, ctl) = setup(driver, 1, |_| {});
    let stranger = NewNode::new("stranger.rig.test", Arch::X86_64).into_node(NodeId(99), Timestamp(0));
    let e = expect_error(PowerErrorKind::NotConfigured, Duration::from_secs(1), ctl.status(&stranger)).await;
    assert!(e.message.contains("stranger.rig.test"), "{e}");
    expect_error(PowerErrorKind::NotConfigured, Duration::from_secs(1), ctl.power(&stranger, PowerAction::On)).await;
    expect_error(PowerErrorKind::NotConfigured, Duration::from_secs(1), ctl.set_next_boot(&stranger, BootDevice::Pxe))
        .await;
}

pub async fn wrong_password_is_auth_failed(driver: Driver) {
    let rig = start_rig(driver, 1);
    let mut inv = rig.inventory(driver, |_| {});
    let mut bad = rig.bmc(0).config(driver);
    bad.password = "not-the-password".into();
    inv.insert("bad.rig.test", bad);
    let ctl = IpmiPowerController::new(inv);
    let bad_node = NewNode::new("bad.rig.test", Arch::X86_64).into_node(NodeId(7), Timestamp(0));
    let e =
        expect_error(PowerErrorKind::AuthFailed, Duration::from_secs(5), ctl.power(&bad_node, PowerAction::On)).await;
    assert!(e.message.contains("RAKP 2"), "{e}");
    assert!(!e.message.contains("not-the-password"), "{e}");
    assert!(!format!("{e:?}").contains("not-the-password"));
    assert_eq!(rig.bmc(0).power(), "0");
    // The right password still works, at once.
    ok(ctl.power(&node(0), PowerAction::On).await, "on with the right password");
    assert_eq!(rig.bmc(0).power(), "1");
}

pub async fn unknown_user_is_auth_failed(driver: Driver) {
    let rig = start_rig(driver, 1);
    let mut inv = rig.inventory(driver, |_| {});
    let mut bad = rig.bmc(0).config(driver);
    bad.username = "nobody".into();
    inv.insert("bad.rig.test", bad);
    let ctl = IpmiPowerController::new(inv);
    let bad_node = NewNode::new("bad.rig.test", Arch::X86_64).into_node(NodeId(7), Timestamp(0));
    let e = expect_error(PowerErrorKind::AuthFailed, Duration::from_secs(5), ctl.status(&bad_node)).await;
    assert!(e.message.to_lowercase().contains("unauthorized name"), "{e}");
    ok(ctl.status(&node(0)).await, "the real user still works");
}

pub async fn closed_port_is_unreachable(driver: Driver) {
    let (rig, ctl) = setup(driver, 1, |_| {});
    let mut inv = rig.inventory(driver, |_| {});
    let mut gone = rig.bmc(0).config(driver);
    gone.port = super::rig::free_udp_ports(1)[0];
    inv.insert("gone.rig.test", gone);
    let ctl2 = IpmiPowerController::new(inv);
    let gone_node = NewNode::new("gone.rig.test", Arch::X86_64).into_node(NodeId(8), Timestamp(0));
    // Native: refused at once; ipmitool: after its retries (1 s + 2 s).
    expect_error(PowerErrorKind::Unreachable, Duration::from_secs(8), ctl2.power(&gone_node, PowerAction::On)).await;
    ok(ctl.status(&node(0)).await, "another BMC is unaffected");
}

pub async fn stopped_bmc_is_unreachable_then_recovers(driver: Driver) {
    let (rig, ctl) = setup(driver, 1, |_| {});
    let b = rig.bmc(0);
    b.stop();
    // Nothing ever answers: the first request's retries run out (2 × 1 s
    // native; ipmitool waits 1 s + 2 s).
    let e = expect_error(PowerErrorKind::Unreachable, Duration::from_secs(8), ctl.status(&node(0))).await;
    b.resume();
    assert!(!e.message.is_empty());
    recovers(&ctl, 0).await;
    ok(ctl.power(&node(0), PowerAction::On).await, "on after resume");
    assert_eq!(b.power(), "1");
}

pub async fn bmc_freezing_mid_operation_is_timeout(driver: Driver) {
    let (rig, ctl) = setup(driver, 1, |_| {});
    let b = rig.bmc(0);
    // The BMC answers the session setup, then freezes while reading the
    // chassis state.
    b.hang_on_next_call();
    let e = expect_error(PowerErrorKind::Timeout, Duration::from_secs(8), ctl.power(&node(0), PowerAction::On)).await;
    b.resume();
    assert!(!e.message.is_empty());
    recovers(&ctl, 0).await;
    ok(ctl.power(&node(0), PowerAction::On).await, "on after resume");
    assert_eq!(b.power(), "1");
}

pub async fn bmc_error_is_reported_in_its_words(driver: Driver) {
    let (rig, ctl) = setup(driver, 1, |_| {});
    let b = rig.bmc(0);
    b.set_failing(true);
    let e = expect_error(PowerErrorKind::BmcError, Duration::from_secs(5), ctl.status(&node(0))).await;
    assert!(e.message.to_lowercase().contains("unspecified error"), "{e}");
    let e = expect_error(PowerErrorKind::BmcError, Duration::from_secs(5), ctl.power(&node(0), PowerAction::On)).await;
    assert!(e.message.to_lowercase().contains("unspecified error"), "{e}");
    let e =
        expect_error(PowerErrorKind::BmcError, Duration::from_secs(5), ctl.set_next_boot(&node(0), BootDevice::Pxe))
            .await;
    assert!(e.message.to_lowercase().contains("unspecified error"), "{e}");
    b.set_failing(false);
    ok(ctl.power(&node(0), PowerAction::On).await, "on once the BMC works");
    ok(ctl.set_next_boot(&node(0), BootDevice::Pxe).await, "pxe once the BMC works");
    assert_eq!((b.power().as_str(), b.boot().as_str()), ("1", "pxe"));
}

pub async fn slow_bmc_within_the_timeout_succeeds(driver: Driver) {
    let (rig, ctl) = setup(driver, 1, |c| c.timeout = Duration::from_secs(3));
    let b = rig.bmc(0);
    b.set_delay(Some(0.7));
    ok(ctl.power(&node(0), PowerAction::On).await, "on, slowly");
    b.set_delay(None);
    assert_eq!(b.power(), "1");
    // Slow but within the timeout: nothing was retransmitted, so nothing ran twice.
    assert_eq!(b.log(), ["get power", "set power 1"]);
}

pub async fn slow_bmc_beyond_the_retries_is_timeout(driver: Driver) {
    let (rig, ctl) = setup(driver, 1, |_| {});
    let b = rig.bmc(0);
    b.set_delay(Some(4.0));
    let e = expect_error(PowerErrorKind::Timeout, Duration::from_secs(8), ctl.power(&node(0), PowerAction::On)).await;
    b.set_delay(None);
    assert!(!e.message.is_empty());
    recovers(&ctl, 0).await;
    ok(ctl.power(&node(0), PowerAction::On).await, "on once the BMC is fast again");
    assert_eq!(b.power(), "1");
}

pub async fn deadline_bounds_an_operation(driver: Driver) {
    // Retries that would take 10 s, a deadline of 1.5 s.
    let (rig, ctl) = setup(driver, 1, |c| {
        c.timeout = Duration::from_secs(1);
        c.retries = 9;
        c.deadline = Duration::from_millis(1500);
    });
    let b = rig.bmc(0);
    b.hang_on_next_call();
    let e = expect_error(PowerErrorKind::Timeout, Duration::from_secs(4), ctl.power(&node(0), PowerAction::On)).await;
    b.resume();
    assert!(e.message.contains("deadline"), "{e}");
    recovers(&ctl, 0).await;
}

pub async fn session_slots_exhausted_is_busy(driver: Driver) {
    let (rig, ctl) = setup(driver, 1, |_| {});
    let cfg = rig.bmc(0).config(Driver::Native);
    // Leak sessions until the BMC refuses more.
    let mut leaked = Vec::new();
    let refusal = loop {
        match Session::open(&cfg).await {
            Ok(s) => leaked.push(s),
            Err(e) => break e.classify(&cfg.key()),
        }
        assert!(leaked.len() <= 256, "the BMC never ran out of sessions");
    };
    assert_eq!(refusal.kind, PowerErrorKind::Busy, "{refusal}");
    assert!(!leaked.is_empty());
    eprintln!("the BMC refused a session after {} open ones: {refusal}", leaked.len());
    let e = expect_error(PowerErrorKind::Busy, Duration::from_secs(5), ctl.status(&node(0))).await;
    assert!(e.message.to_lowercase().contains("insufficient resources"), "{e}");
    // Closing the leaked sessions frees the slots at once.
    for s in leaked {
        s.close().await.unwrap_or_else(|e| panic!("close a leaked session: {e}"));
    }
    ok(ctl.power(&node(0), PowerAction::On).await, "on once sessions are free");
    assert_eq!(rig.bmc(0).power(), "1");
}
