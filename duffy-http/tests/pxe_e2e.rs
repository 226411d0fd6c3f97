//! The whole network-install path without hardware: nodes go Active →
//! Provisioning → Ready through real IPMI packets (to `ipmi_sim` BMCs) and
//! real HTTP, and are then handed over through real SSH. When a BMC powers
//! its machine on with next boot PXE, the rig's chassis hook starts a small
//! "simulated machine" that, as firmware and the installer would, fetches
//! its iPXE script and kickstart from the service's install listener (the
//! recommended deployment: `/Install/*` on a listener of its own), and
//! then runs the kickstart's own first-boot reporter (the shell script,
//! with `curl`), which reports the machine's SSH host key. The machines'
//! host keys are real ones that older releases have: RSA-4096 (EL5 and EL6
//! have no Ed25519 key) and ECDSA P-521, each the only host key of a real
//! sshd; an allocation then pushes the project's keys to both, checking
//! the host keys the installs recorded. A machine that never calls back
//! ends Failed on timeout. One pool is installed by a command instead (the
//! installer is chosen per pool): its machine is never network-booted.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::sync::Arc;
use std::time::{Duration, Instant};

use duffy_core::NewNode;
use duffy_core::clock::SystemClock;
use duffy_core::testkit::conformance::{check_history, check_invariants};
use duffy_core::{CauseKind, Clock, EventQuery, NodeState, Policy, Project, Store};
use duffy_http::config::{Config, ContextualizeConfig, HardwareConfig, InstallerConfig, PoolConfig};
use duffy_http::{build_engine, start};
use duffy_testsupport::rig::Rig;
use duffy_testsupport::sshd::{KeyKind, Sshd};

const MACHINE: &str = r#"
import re, subprocess, sys, urllib.request
base, host, keydir, mode, provisioning = sys.argv[1:6]
def get(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()
# Firmware: chain-load the node's iPXE script.
script = get(base + "/Install/ipxe?host=" + host)
ks_url = re.search(r"inst\.ks=(\S+)", script).group(1)
# The installer: fetch the kickstart, install, reboot.
ks = get(ks_url)
assert provisioning in ks, "provisioning key in the kickstart"
print("kickstart fetched", flush=True)
if mode == "silent":
    sys.exit(0)
# First boot: the kickstart's own reporter, up to where it removes itself,
# with this machine's host keys in place of /etc/ssh.
start = ks.index("\n", ks.index("<<'DUFFY_REPORT_EOF'")) + 1
reporter = ks[start:ks.index("\nDUFFY_REPORT_EOF\n", start)]
reporter = reporter[:reporter.index("systemctl disable")]
reporter = reporter.replace("/etc/ssh/", keydir + "/").replace("sleep 10", "sleep 1")
reporter += 'echo "reported: HTTP $code"\n'
subprocess.run(["sh", "-c", reporter], check=True, timeout=60)
"#;

fn host_key(i: usize) -> String {
    // A well-formed ed25519 public key line (32 key bytes), different per machine.
    let mut blob = vec![0, 0, 0, 11];
    blob.extend_from_slice(b"ssh-ed25519");
    blob.extend_from_slice(&[0, 0, 0, 32]);
    blob.extend((0..32u8).map(|b| b.wrapping_mul(7).wrapping_add(i as u8)));
    format!("ssh-ed25519 {}", base64(&blob))
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
    /// Node 0 has only an RSA-4096 host key, node 1 only an ECDSA P-521 one.
    const KINDS: [KeyKind; 2] = [KeyKind::Rsa4096, KeyKind::EcdsaP521];
    const SILENT: usize = 2;
    /// Node 3 carries the pool installed by a command.
    const COMMANDED: usize = 3;
    // The machines' SSH servers: each offers only its one host key; they
    // share Duffy's key and one authorized_keys file.
    let rsa = Sshd::start_with_host_key(KINDS[0]);
    let ecdsa = Sshd::start_sharing(&rsa, KINDS[1]);
    let sshds = [&rsa, &ecdsa];
    let rig = Rig::start(N);
    let dir = tempfile::tempdir().unwrap();
    let free = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (port, install_port) = (free(), free());
    let base = format!("http://127.0.0.1:{install_port}");
    let script = dir.path().join("machine.py");
    std::fs::write(&script, MACHINE).unwrap();
    let provisioning = std::fs::read_to_string(rsa.duffy_public_key_path()).unwrap().trim().to_string();
    for i in 0..N {
        let mode = if i == SILENT { "silent" } else { "normal" };
        // The machine's /etc/ssh: its host public key, named as OpenSSH names it.
        let keydir = dir.path().join(format!("etc-ssh-{i}"));
        std::fs::create_dir_all(&keydir).unwrap();
        if let (Some(kind), Some(sshd)) = (KINDS.get(i), sshds.get(i)) {
            let file = keydir.join(format!("ssh_host_{}_key.pub", kind.host_key_file_name()));
            std::fs::write(file, sshd.host_public_key()).unwrap();
        }
        let cmd = format!(
            "exec python3 {} {base} {} {} {mode} '{}'\n",
            script.display(),
            Rig::hostname(i),
            keydir.display(),
            provisioning.split(' ').nth(1).unwrap()
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
        "public_url = \"{base}\"\nlisten = \"127.0.0.1:{install_port}\"\ntoken_ttl = \"6s\"\n\
         provisioning_public_key = \"{provisioning}\"\n"
    );
    let installer_script = dir.path().join("install.sh");
    std::fs::write(
        &installer_script,
        format!("#!/bin/sh\ncat >/dev/null\necho '{{\"host_key\": \"{}\"}}'\n", host_key(COMMANDED)),
    )
    .unwrap();
    std::fs::set_permissions(&installer_script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let command = format!("kind = \"command\"\nprogram = \"{}\"\ntimeout = \"10s\"\n", installer_script.display());
    let mut ssh = rsa.ssh_config();
    for i in 0..N {
        ssh.ports.insert(Rig::hostname(i), sshds.get(i).unwrap_or(&&rsa).port());
    }
    let cfg = Config {
        listen: format!("127.0.0.1:{port}").parse().unwrap(),
        database: dir.path().join("duffy.db"),
        policy: Policy {
            install_timeout: Duration::from_secs(8),
            install_attempts: 1,
            failed_retry_after: None,
            prepare_timeout: Duration::from_secs(30),
            rate_limit: None,
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
        contextualize: ContextualizeConfig::Ssh(ssh),
        nodes: (0..N)
            .map(|i| NewNode {
                hostname: Rig::hostname(i),
                hardware_arch: duffy_core::Arch::X86_64,
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
    let running = start(cfg.listen, built).await.unwrap();
    assert_eq!(running.install_addr.map(|a| a.port()), Some(install_port));

    let deadline = Instant::now() + Duration::from_secs(60);
    let nodes = loop {
        let nodes = store.nodes().await.unwrap();
        if nodes.iter().all(|n| matches!(n.state, NodeState::Ready | NodeState::Failed)) {
            break nodes;
        }
        assert!(Instant::now() < deadline, "not settled: {:?}", nodes.iter().map(|n| n.state).collect::<Vec<_>>());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

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
            // The sshd's own host key, as the reporter sent it, without its comment.
            let served = sshds[i].host_public_key();
            assert!(served.starts_with(KINDS[i].key_type()), "{served}");
            assert_eq!(n.host_key.as_deref(), Some(served.trim().rsplit_once(' ').unwrap().0), "{}", n.hostname);
            assert!(log.contains("reported: HTTP 200"), "{log}");
            assert_eq!(history, vec![CauseKind::Added, CauseKind::InstallStarted, CauseKind::InstallSucceeded]);
        }
        assert_eq!(rig.bmc(i).power(), "1");
        assert!(rig.bmc(i).log().iter().any(|l| l.contains("boot pxe")), "next boot PXE set through IPMI");
    }

    // Hand both over: SSH to each machine's sshd, checking the RSA and the
    // ECDSA host key the installs recorded, pushes the project's key.
    store
        .upsert_project(Project { name: "el6".into(), quota: None, ssh_keys: vec![rsa.project_public_key(1)] })
        .await
        .unwrap();
    let key = duffy_http::keys::create_key(&*store, "el6", false, None, SystemClock.now()).await.unwrap().0;
    for s in sshds {
        assert!(!s.login_works_checking_host_key(&s.project_private_key_path(1)));
    }
    let r =
        reqwest::get(format!("http://127.0.0.1:{port}/Node/get?key={key}&ver=7&arch=x86_64&count=2")).await.unwrap();
    let v: serde_json::Value = r.json().await.unwrap();
    let mut hosts: Vec<String> = serde_json::from_value(v["hosts"].clone()).unwrap_or_else(|e| panic!("{e}: {v}"));
    hosts.sort();
    assert_eq!(hosts, [Rig::hostname(0), Rig::hostname(1)]);
    for s in sshds {
        assert!(s.login_works_checking_host_key(&s.project_private_key_path(1)), "the project's key logs in");
    }
    // The main listener does not serve the install endpoints.
    let r = reqwest::get(format!("http://127.0.0.1:{port}/Install/ipxe?host={}", Rig::hostname(0))).await.unwrap();
    assert_eq!(r.status().as_u16(), 404);
    running.stop().await.unwrap();
    check_invariants(&*store).await.unwrap();
    check_history(&*store).await.unwrap();
}
