//! The whole network-install path without hardware: nodes go Active →
//! Provisioning → Ready through real IPMI packets (to `ipmi_sim` BMCs) and
//! real HTTP. When a BMC powers its machine on with next boot PXE, the rig's
//! chassis hook starts a small "simulated machine" that, as firmware and
//! the installer would, fetches its iPXE script and kickstart from the
//! service and calls back with its SSH host key. A machine that never calls
//! back ends Failed on timeout. One pool is installed by a command instead
//! (the installer is chosen per pool): its machine is never network-booted.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::sync::Arc;
use std::time::{Duration, Instant};

use duffy_core::testkit::conformance::{check_history, check_invariants};
use duffy_core::{CauseKind, EventQuery, NodeState, Policy, Store};
use duffy_http::config::{Config, HardwareConfig, InstallerConfig, NodeConfig, PoolConfig};
use duffy_http::{build_engine, start};
use duffy_testsupport::rig::Rig;

const MACHINE: &str = r#"
import re, sys, urllib.parse, urllib.request
base, host, host_key, mode, provisioning = sys.argv[1:6]
def get(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()
# Firmware: chain-load the node's iPXE script.
script = get(base + "/Install/ipxe?host=" + host)
ks_url = re.search(r"inst\.ks=(\S+)", script).group(1)
# The installer: fetch the kickstart, install, reboot.
ks = get(ks_url)
assert sys.argv[5] in ks, "provisioning key in the kickstart"
done = re.search(r"'(https?://[^']*/Install/done\?token=[0-9a-f]+)'", ks).group(1)
print("kickstart fetched; callback", done.split("token=")[0] + "token=...", flush=True)
if mode == "silent":
    sys.exit(0)
# First boot: report the new host key.
print(get(done + "&host_key=" + urllib.parse.quote(host_key)).strip(), flush=True)
"#;

fn host_key(i: usize) -> String {
    // A well-formed ed25519 public key line (32 key bytes), different per machine.
    let mut blob = vec![0, 0, 0, 11];
    blob.extend_from_slice(b"ssh-ed25519");
    blob.extend_from_slice(&[0, 0, 0, 32]);
    blob.extend((0..32u8).map(|b| b.wrapping_mul(7).wrapping_add(i as u8)));
    format!("ssh-ed25519 {}", base64(&blob))
}

/// Duffy's provisioning key for this test.
fn provisioning_key() -> String {
    host_key(99)
}

fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let n =
            (u32::from(c[0]) << 16) | (u32::from(*c.get(1).unwrap_or(&0)) << 8) | u32::from(*c.get(2).unwrap_or(&0));
        for k in 0..4 {
            if k <= c.len() {
                out.push(T[(n >> (18 - 6 * k) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pxe_installs_through_ipmi_and_http() {
    const N: usize = 4;
    const SILENT: usize = 2;
    /// Node 3 carries the pool installed by a command.
    const COMMANDED: usize = 3;
    let rig = Rig::start(N);
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let base = format!("http://127.0.0.1:{port}");
    let script = dir.path().join("machine.py");
    std::fs::write(&script, MACHINE).unwrap();
    for i in 0..N {
        let mode = if i == SILENT { "silent" } else { "normal" };
        let cmd = format!(
            "exec python3 {} {base} {} '{}' {mode} '{}'\n",
            script.display(),
            Rig::hostname(i),
            host_key(i),
            provisioning_key().split(' ').nth(1).unwrap()
        );
        std::fs::write(rig.bmc(i).state.with_extension("machine"), cmd).unwrap();
    }

    let mut ipmi = String::from("[defaults]\ntimeout = \"1s\"\nretries = 1\n");
    for i in 0..N {
        let b = rig.bmc(i);
        ipmi.push_str(&format!(
            "[[bmc]]\nnode = \"{}\"\naddress = \"127.0.0.1\"\nport = {}\nusername = \"{}\"\npassword = \"{}\"\n",
            Rig::hostname(i),
            b.port,
            b.username,
            b.password
        ));
    }
    let pxe = format!(
        "public_url = \"{base}\"\ntoken_ttl = \"6s\"\nprovisioning_public_key = \"{} duffy\"\n",
        provisioning_key()
    );
    let installer_script = dir.path().join("install.sh");
    std::fs::write(
        &installer_script,
        format!("#!/bin/sh\ncat >/dev/null\necho '{{\"host_key\": \"{}\"}}'\n", host_key(COMMANDED)),
    )
    .unwrap();
    std::fs::set_permissions(&installer_script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let command = format!("kind = \"command\"\nprogram = \"{}\"\ntimeout = \"10s\"\n", installer_script.display());
    let cfg = Config {
        database: dir.path().join("duffy.db"),
        policy: Policy {
            install_timeout: Duration::from_secs(8),
            install_attempts: 1,
            failed_retry_after: None,
            tick: Duration::from_millis(200),
            power_check_interval: None,
            ..Policy::default()
        },
        pools: vec![
            PoolConfig {
                release: "7".into(),
                arch: duffy_core::Arch::X86_64,
                flavor: None,
                standby: 3,
                installer: None,
            },
            PoolConfig {
                release: "8".into(),
                arch: duffy_core::Arch::X86_64,
                flavor: None,
                standby: 1,
                installer: Some(toml::from_str(&command).unwrap()),
            },
        ],
        hardware: HardwareConfig::Ipmi(toml::from_str(&ipmi).unwrap()),
        installer: InstallerConfig::Pxe(toml::from_str(&pxe).unwrap()),
        nodes: (0..N)
            .map(|i| NodeConfig {
                hostname: Rig::hostname(i),
                arch: duffy_core::Arch::X86_64,
                flavor: None,
                ip: Some("127.0.0.1".into()),
                chassis: None,
                console_port: None,
                bmc: Some(format!("127.0.0.1:{}", rig.bmc(i).port)),
                reserved: false,
            })
            .collect(),
        ..Config::default()
    };
    cfg.validate().unwrap();
    let store: Arc<dyn Store> = Arc::new(
        duffy_backend_sqlite::SqliteStore::open(&cfg.database, duffy_backend_sqlite::SqliteOptions::default()).unwrap(),
    );
    let built = build_engine(&cfg, store.clone()).await.unwrap();
    let running = start(format!("127.0.0.1:{port}").parse().unwrap(), built).await.unwrap();

    let deadline = Instant::now() + Duration::from_secs(60);
    let nodes = loop {
        let nodes = store.nodes().await.unwrap();
        if nodes.iter().all(|n| matches!(n.state, NodeState::Ready | NodeState::Failed)) {
            break nodes;
        }
        assert!(Instant::now() < deadline, "not settled: {:?}", nodes.iter().map(|n| n.state).collect::<Vec<_>>());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    running.stop().await.unwrap();

    for (i, n) in nodes.iter().enumerate() {
        let log = std::fs::read_to_string(rig.bmc(i).state.with_extension("machine.log")).unwrap_or_default();
        if i == COMMANDED {
            assert_eq!(n.state, NodeState::Ready, "{:?}", n.fail_reason);
            assert_eq!(n.image.as_ref().map(|p| p.release.as_str()), Some("8"));
            assert_eq!(n.host_key.as_deref(), Some(host_key(i).as_str()), "the command's reported host key");
            assert!(log.is_empty(), "never network-booted: {log}");
            assert!(!rig.bmc(i).log().iter().any(|l| l.contains("boot pxe")));
            continue;
        }
        assert!(log.contains("kickstart fetched"), "{} booted from the network: {log}", n.hostname);
        let history: Vec<_> = store
            .events(EventQuery { node: Some(n.id), ..EventQuery::default() })
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.cause)
            .collect();
        if i == SILENT {
            assert_eq!(n.state, NodeState::Failed, "{}", n.hostname);
            let reason = n.fail_reason.as_deref().unwrap();
            assert!(reason.contains("node2.rig.test") || reason.contains("timed out"), "{reason}");
            assert_eq!(history, vec![CauseKind::Added, CauseKind::InstallStarted, CauseKind::InstallFailed]);
        } else {
            assert_eq!(n.state, NodeState::Ready, "{}: {:?}\n{log}", n.hostname, n.fail_reason);
            assert_eq!(n.host_key.as_deref(), Some(host_key(i).as_str()), "the host key reported at the callback");
            assert!(log.contains("OK"), "{log}");
            assert_eq!(history, vec![CauseKind::Added, CauseKind::InstallStarted, CauseKind::InstallSucceeded]);
        }
        assert_eq!(rig.bmc(i).power(), "1");
        assert!(rig.bmc(i).log().iter().any(|l| l.contains("boot pxe")), "next boot PXE set through IPMI");
    }
    check_invariants(&*store).await.unwrap();
    check_history(&*store).await.unwrap();
}
