#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The PXE installer with a fake power controller and the system clock; the
//! test plays the machine through the registry, as duffy-http's handlers
//! would.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use duffy_core::clock::SystemClock;
use duffy_core::mem::MemStore;
use duffy_core::model::NewNode;
use duffy_core::tickets::InstallTickets;
use duffy_core::time::BoxFuture;
use duffy_core::{
    Arch, BootDevice, Clock, InstallError, Installed, Installer, Node, NodeId, PoolKey, PowerAction, PowerController,
    PowerError, PowerErrorKind, PowerState, Timestamp,
};
use duffy_installers::pxe::InstallEndpoints;
use duffy_installers::pxe::LOCAL_BOOT_SCRIPT;
use duffy_installers::{PxeConfig, PxeError, PxeImage, PxeInstaller, PxeRegistry, TemplateError};
use duffy_testsupport::eventually_async;
use tokio::task::JoinHandle;

const PUBLIC_URL: &str = "http://10.0.0.1:8080";

/// The install endpoints as duffy-http serves them (it gives them to the
/// registry; the rendered URLs below spell them out).
fn endpoints() -> InstallEndpoints {
    InstallEndpoints {
        kickstart: "/Install/kickstart?token=".into(),
        done: "/Install/done?token=".into(),
        failed: "/Install/failed?token=".into(),
    }
}
/// The address of the nodes `node()` makes: where their requests come from.
const NODE_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 11));
/// Another machine on the same network.
const OTHER_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 12));
const PROVISIONING_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIByrgFoRodMpGoIGtVxnK/CTnXeEUb1KLNez/P0VJgK+ duffy@farm";
const HOST_KEY: &str = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBEcbTzXQ2o4dsaenJU4FAX6E36s81FO7Dgmyh87F2vtByzhlkoZW1TXMxVo0KA2d5aCzif5RzNwrsrWxAYDD9n8=";

/// Records every call; answers `status` with `state`; fails `set_next_boot`
/// when `broken`.
struct FakePower {
    calls: Mutex<Vec<String>>,
    state: PowerState,
    broken: bool,
}

impl FakePower {
    fn new(state: PowerState) -> Arc<Self> {
        Arc::new(FakePower { calls: Mutex::new(Vec::new()), state, broken: false })
    }

    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}

#[async_trait]
impl PowerController for FakePower {
    async fn status(&self, node: &Node) -> Result<PowerState, PowerError> {
        self.calls.lock().unwrap().push(format!("status {}", node.hostname));
        Ok(self.state)
    }

    async fn power(&self, node: &Node, action: PowerAction) -> Result<(), PowerError> {
        self.calls.lock().unwrap().push(format!("power {action} {}", node.hostname));
        Ok(())
    }

    async fn set_next_boot(&self, node: &Node, device: BootDevice) -> Result<(), PowerError> {
        self.calls.lock().unwrap().push(format!("boot {device} {}", node.hostname));
        if self.broken {
            return Err(PowerError::new(PowerErrorKind::Unreachable, "no answer from 10.1.0.11:623"));
        }
        Ok(())
    }
}

/// Where the registry keeps its pending installs: a store of its own
/// (the tests of the HTTP service run it over SQLite and PostgreSQL).
fn tickets() -> Arc<dyn InstallTickets> {
    Arc::new(MemStore::new())
}

struct Rig {
    installer: Arc<PxeInstaller>,
    registry: Arc<PxeRegistry>,
    power: Arc<FakePower>,
}

fn rig_with(config: PxeConfig, power: Arc<FakePower>) -> Rig {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let registry = Arc::new(PxeRegistry::new(&config, endpoints(), tickets(), clock.clone()).unwrap());
    let installer = Arc::new(PxeInstaller::new(&config, power.clone(), registry.clone(), clock));
    Rig { installer, registry, power }
}

fn rig() -> Rig {
    rig_with(PxeConfig::new(PUBLIC_URL, PROVISIONING_KEY), FakePower::new(PowerState::On))
}

fn node(hostname: &str) -> Node {
    let mut n = NewNode::new(hostname, Arch::X86_64);
    n.ip = Some("10.0.0.11".into());
    n.into_node(NodeId(1), Timestamp(0))
}

fn image(release: &str) -> PoolKey {
    PoolKey::new(release, Arch::X86_64, None)
}

fn start(rig: &Rig, node: &Node, image: &PoolKey) -> JoinHandle<Result<Installed, InstallError>> {
    let (inst, node, image) = (rig.installer.clone(), node.clone(), image.clone());
    tokio::spawn(async move { inst.install(&node, &image).await })
}

/// Plays the machine's first steps: waits for the install to be pending and
/// the power cycle to be sent, fetches the iPXE script and returns it and
/// the token in its kickstart URL.
async fn machine_boots(rig: &Rig, hostname: &str) -> (String, String) {
    eventually_async(Duration::from_secs(10), "the install is pending and the machine power-cycled", || async {
        rig.registry.is_pending(hostname).await.unwrap() && rig.power.calls().iter().any(|c| c.starts_with("power "))
    })
    .await;
    let script = rig.registry.ipxe_script(hostname, NODE_IP).await.unwrap();
    let prefix = format!("{PUBLIC_URL}/Install/kickstart?token=");
    let at = script.find(&prefix).unwrap_or_else(|| panic!("no kickstart URL in:\n{script}")) + prefix.len();
    let token: String = script[at..].chars().take_while(|c| !c.is_whitespace()).collect();
    assert_eq!(token.len(), 64, "token {token:?} is not 256 bits of hex");
    assert!(token.bytes().all(|b| b.is_ascii_hexdigit()));
    (script, token)
}

/// An install that must be refused before anything happens: bounded, so
/// that one that waits for a machine instead fails the test.
async fn refused(rig: &Rig, node: &Node, image: &PoolKey) -> InstallError {
    tokio::time::timeout(Duration::from_secs(10), rig.installer.install(node, image))
        .await
        .expect("the install was refused at once, not left waiting for a machine")
        .unwrap_err()
}

async fn result(h: JoinHandle<Result<Installed, InstallError>>) -> Result<Installed, InstallError> {
    tokio::time::timeout(Duration::from_secs(10), h).await.expect("install did not finish").unwrap()
}

/// The text between a line starting with `start` and the next line equal
/// to `end`.
fn section<'a>(text: &'a str, start: &str, end: &str) -> &'a str {
    let from = text.find(&format!("\n{start}")).unwrap_or_else(|| panic!("no {start} in:\n{text}")) + 1;
    let body = &text[from..];
    let body = &body[body.find('\n').unwrap() + 1..];
    &body[..body.find(&format!("\n{end}\n")).unwrap_or_else(|| panic!("no {end} after {start}")) + 1]
}

fn sh_syntax_ok(script: &str) {
    let out = std::process::Command::new("sh").arg("-n").arg("-c").arg(script).output().unwrap();
    assert!(out.status.success(), "sh -n: {}\n{script}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test]
async fn install_completes_with_the_machines_host_key() {
    let rig = rig();
    let n = node("n1.example.org");
    let h = start(&rig, &n, &image("9"));
    let (script, token) = machine_boots(&rig, "n1.example.org").await;
    assert_eq!(rig.power.calls(), ["boot pxe n1.example.org", "status n1.example.org", "power cycle n1.example.org"]);

    // The iPXE script chains the image's kernel and initrd.
    assert!(script.starts_with("#!ipxe\n"), "{script}");
    assert!(script.contains(&format!(" inst.ks={PUBLIC_URL}/Install/kickstart?token={token} ")), "{script}");
    assert!(script.contains("kernel http://mirror.centos.org/centos/9/os/x86_64/images/pxeboot/vmlinuz "), "{script}");
    assert!(
        script
            .contains("initrd --name initrd.img http://mirror.centos.org/centos/9/os/x86_64/images/pxeboot/initrd.img")
    );
    assert!(script.contains("inst.repo=http://mirror.centos.org/centos/9/os/x86_64/"), "{script}");
    // Fetching it again is fine while the install is pending.
    assert_eq!(rig.registry.ipxe_script("n1.example.org", NODE_IP).await.unwrap(), script);

    // The kickstart installs the provisioning key and calls back.
    let ks = rig.registry.kickstart(&token, NODE_IP).await.unwrap();
    assert!(ks.contains(&format!("\n{PROVISIONING_KEY}\n")), "{ks}");
    assert!(ks.contains(&format!("'{PUBLIC_URL}/Install/done?token={token}'")), "{ks}");
    assert!(ks.contains(&format!("'{PUBLIC_URL}/Install/failed?token={token}'")), "{ks}");
    assert!(ks.contains("--data-urlencode \"host_key@$key\""), "{ks}");
    assert!(ks.contains("/etc/ssh/ssh_host_${t}_key.pub"), "{ks}");
    assert!(ks.contains("network --bootproto=dhcp --hostname=n1.example.org"), "{ks}");
    assert!(ks.contains("url --url=http://mirror.centos.org/centos/9/os/x86_64/"), "{ks}");
    assert!(!ks.contains("{{"), "unrendered placeholder in:\n{ks}");
    let post = section(&ks, "%post", "%end");
    sh_syntax_ok(post);
    sh_syntax_ok(section(post, "cat > /usr/local/sbin/duffy-report-installed", "DUFFY_REPORT_EOF"));
    sh_syntax_ok(section(&ks, "%onerror", "%end"));

    // Still waiting: nothing returned yet.
    assert!(!h.is_finished());
    rig.registry.complete(&token, NODE_IP, Some(&format!("{HOST_KEY} root@n1.example.org\n"))).await.unwrap();
    let installed = result(h).await.unwrap();
    assert_eq!(installed.host_key.as_deref(), Some(HOST_KEY));

    // Single use: every later callback with the token is refused.
    assert!(!rig.registry.is_pending("n1.example.org").await.unwrap());
    assert_eq!(rig.registry.pending_count().await.unwrap(), 0);
    assert!(matches!(rig.registry.complete(&token, NODE_IP, Some(HOST_KEY)).await, Err(PxeError::UnknownToken)));
    assert!(matches!(rig.registry.fail(&token, NODE_IP, "late").await, Err(PxeError::UnknownToken)));
    assert!(matches!(rig.registry.kickstart(&token, NODE_IP).await, Err(PxeError::UnknownToken)));
    let e = rig.registry.ipxe_script("n1.example.org", NODE_IP).await.unwrap_err();
    assert!(matches!(e, PxeError::NoPendingInstall { .. }), "{e}");
    assert!(LOCAL_BOOT_SCRIPT.starts_with("#!ipxe\n"));
}

#[tokio::test]
async fn powered_off_machine_is_powered_on_and_a_done_without_host_key_fails_the_install() {
    let rig = rig_with(PxeConfig::new(PUBLIC_URL, PROVISIONING_KEY), FakePower::new(PowerState::Off));
    let n = node("n2.example.org");
    let h = start(&rig, &n, &image("8"));
    let (_, token) = machine_boots(&rig, "n2.example.org").await;
    assert_eq!(rig.power.calls(), ["boot pxe n2.example.org", "status n2.example.org", "power on n2.example.org"]);
    // `host_key=` empty (the machine had no key file), or none at all: by
    // default a host key is required, so the install fails at once, saying
    // why, instead of handing out a node nobody can check.
    let e = rig.registry.complete(&token, NODE_IP, Some("\n")).await.unwrap_err();
    assert!(matches!(&e, PxeError::MissingHostKey { hostname } if hostname == "n2.example.org"), "{e}");
    let err = result(h).await.unwrap_err();
    assert!(err.message.contains("n2.example.org") && err.message.contains("without an SSH host key"), "{err}");
    assert!(matches!(rig.registry.complete(&token, NODE_IP, Some(HOST_KEY)).await, Err(PxeError::UnknownToken)));

    let h = start(&rig, &n, &image("8"));
    let (_, token) = machine_boots(&rig, "n2.example.org").await;
    assert!(matches!(rig.registry.complete(&token, NODE_IP, None).await, Err(PxeError::MissingHostKey { .. })));
    assert!(result(h).await.is_err());
}

#[tokio::test]
async fn without_require_host_key_a_blank_host_key_is_none() {
    let config = PxeConfig { require_host_key: false, ..PxeConfig::new(PUBLIC_URL, PROVISIONING_KEY) };
    let rig = rig_with(config, FakePower::new(PowerState::On));
    let n = node("n2b.example.org");
    let h = start(&rig, &n, &image("8"));
    let (_, token) = machine_boots(&rig, "n2b.example.org").await;
    rig.registry.complete(&token, NODE_IP, Some("\n")).await.unwrap();
    assert_eq!(result(h).await.unwrap(), Installed { host_key: None });
    // A key that is given must still be valid.
    let h = start(&rig, &n, &image("8"));
    let (_, token) = machine_boots(&rig, "n2b.example.org").await;
    let e = rig.registry.complete(&token, NODE_IP, Some("ssh-ed25519 AAAA")).await.unwrap_err();
    assert!(matches!(e, PxeError::InvalidHostKey { .. }), "{e}");
    assert!(result(h).await.is_err());
}

#[tokio::test]
async fn failed_callback_fails_the_install_with_the_machines_reason() {
    let rig = rig();
    let n = node("n3.example.org");
    let h = start(&rig, &n, &image("9"));
    let (_, token) = machine_boots(&rig, "n3.example.org").await;
    rig.registry.fail(&token, NODE_IP, "cannot write /root/.ssh/authorized_keys\n\x1b[31m").await.unwrap();
    let err = result(h).await.unwrap_err();
    assert!(err.message.contains("n3.example.org"), "{err}");
    assert!(err.message.contains("cannot write /root/.ssh/authorized_keys"), "{err}");
    assert!(!err.message.contains('\x1b'), "control characters kept: {err:?}");
    assert!(matches!(rig.registry.fail(&token, NODE_IP, "again").await, Err(PxeError::UnknownToken)));
    assert!(matches!(rig.registry.complete(&token, NODE_IP, None).await, Err(PxeError::UnknownToken)));
}

#[tokio::test]
async fn expired_token_fails_the_install_naming_the_node() {
    let mut config = PxeConfig::new(PUBLIC_URL, PROVISIONING_KEY);
    config.token_ttl = Duration::from_millis(300);
    let rig = rig_with(config, FakePower::new(PowerState::On));
    let n = node("n4.example.org");
    let h = start(&rig, &n, &image("9"));
    let (_, token) = machine_boots(&rig, "n4.example.org").await;
    let err = result(h).await.unwrap_err();
    assert!(err.message.contains("n4.example.org"), "{err}");
    assert!(err.message.contains("expired"), "{err}");
    // A late machine is told its token expired; no install is pending.
    let e = rig.registry.complete(&token, NODE_IP, Some(HOST_KEY)).await.unwrap_err();
    assert!(matches!(&e, PxeError::Expired { hostname } if hostname == "n4.example.org"), "{e}");
    assert!(matches!(rig.registry.kickstart(&token, NODE_IP).await, Err(PxeError::Expired { .. })));
    assert!(!rig.registry.is_pending("n4.example.org").await.unwrap());
    assert!(matches!(
        rig.registry.ipxe_script("n4.example.org", NODE_IP).await,
        Err(PxeError::NoPendingInstall { .. })
    ));

    // The node's next install starts afresh: the old token is forgotten.
    let h = start(&rig, &n, &image("9"));
    let (_, token2) = machine_boots(&rig, "n4.example.org").await;
    assert_ne!(token, token2);
    assert!(matches!(rig.registry.complete(&token, NODE_IP, None).await, Err(PxeError::UnknownToken)));
    rig.registry.complete(&token2, NODE_IP, Some(HOST_KEY)).await.unwrap();
    result(h).await.unwrap();
}

#[tokio::test]
async fn wrong_tokens_are_refused() {
    let rig = rig();
    let n = node("n5.example.org");
    let h = start(&rig, &n, &image("9"));
    let (_, token) = machine_boots(&rig, "n5.example.org").await;
    let mut other = token.clone().into_bytes();
    other[63] = if other[63] == b'0' { b'1' } else { b'0' };
    let other = String::from_utf8(other).unwrap();
    for wrong in [other.as_str(), "", "deadbeef", &token.to_uppercase(), &format!("{token}0"), "../../etc/passwd"] {
        assert!(
            matches!(rig.registry.complete(wrong, NODE_IP, Some(HOST_KEY)).await, Err(PxeError::UnknownToken)),
            "{wrong}"
        );
        assert!(matches!(rig.registry.fail(wrong, NODE_IP, "x").await, Err(PxeError::UnknownToken)), "{wrong}");
        assert!(matches!(rig.registry.kickstart(wrong, NODE_IP).await, Err(PxeError::UnknownToken)), "{wrong}");
    }
    assert!(matches!(
        rig.registry.ipxe_script("other.example.org", NODE_IP).await,
        Err(PxeError::NoPendingInstall { .. })
    ));
    // The real token still works.
    assert!(!h.is_finished());
    rig.registry.complete(&token, NODE_IP, Some(HOST_KEY)).await.unwrap();
    assert_eq!(result(h).await.unwrap().host_key.as_deref(), Some(HOST_KEY));
}

#[tokio::test]
async fn invalid_host_key_is_refused_and_fails_the_install() {
    let rig = rig();
    let n = node("n6.example.org");
    let h = start(&rig, &n, &image("9"));
    let (_, token) = machine_boots(&rig, "n6.example.org").await;
    let e = rig.registry.complete(&token, NODE_IP, Some("ssh-ed25519 AAAA\nrm -rf /")).await.unwrap_err();
    assert!(matches!(e, PxeError::InvalidHostKey { .. }), "{e}");
    let err = result(h).await.unwrap_err();
    assert!(err.message.contains("n6.example.org") && err.message.contains("invalid SSH host key"), "{err}");
    assert!(matches!(rig.registry.complete(&token, NODE_IP, Some(HOST_KEY)).await, Err(PxeError::UnknownToken)));
}

#[tokio::test]
async fn dropping_the_install_removes_the_pending_entry() {
    let rig = rig();
    let n = node("n7.example.org");
    // Cancelled by an outer deadline, like the reconciler's.
    let h = start(&rig, &n, &image("9"));
    let (_, token) = machine_boots(&rig, "n7.example.org").await;
    h.abort();
    assert!(h.await.unwrap_err().is_cancelled());
    assert!(!rig.registry.is_pending("n7.example.org").await.unwrap());
    assert_eq!(rig.registry.pending_count().await.unwrap(), 0);
    assert!(matches!(rig.registry.complete(&token, NODE_IP, Some(HOST_KEY)).await, Err(PxeError::UnknownToken)));
    assert!(matches!(
        rig.registry.ipxe_script("n7.example.org", NODE_IP).await,
        Err(PxeError::NoPendingInstall { .. })
    ));

    // The same with the future dropped in place by a timeout.
    let inst = rig.installer.clone();
    let img = image("9");
    let fut = inst.install(&n, &img);
    assert!(tokio::time::timeout(Duration::from_millis(200), fut).await.is_err());
    assert_eq!(rig.registry.pending_count().await.unwrap(), 0);
}

#[tokio::test]
async fn a_new_install_of_the_node_supersedes_the_old_one() {
    let rig = rig();
    let n = node("n8.example.org");
    let first = start(&rig, &n, &image("9"));
    let (_, old) = machine_boots(&rig, "n8.example.org").await;
    let second = start(&rig, &n, &image("8"));
    let err = result(first).await.unwrap_err();
    assert!(err.message.contains("superseded") && err.message.contains("n8.example.org"), "{err}");
    assert_eq!(rig.registry.pending_count().await.unwrap(), 1);
    assert!(matches!(rig.registry.complete(&old, NODE_IP, None).await, Err(PxeError::UnknownToken)));
    let (script, new) = machine_boots(&rig, "n8.example.org").await;
    assert_ne!(old, new);
    assert!(script.contains("/centos/8/os/x86_64/"), "{script}");
    rig.registry.complete(&new, NODE_IP, Some(HOST_KEY)).await.unwrap();
    result(second).await.unwrap();
    assert_eq!(rig.registry.pending_count().await.unwrap(), 0);
}

#[tokio::test]
async fn power_failure_fails_the_install_and_removes_the_entry() {
    let power = Arc::new(FakePower { calls: Mutex::new(Vec::new()), state: PowerState::On, broken: true });
    let rig = rig_with(PxeConfig::new(PUBLIC_URL, PROVISIONING_KEY), power);
    let err = rig.installer.install(&node("n9.example.org"), &image("9")).await.unwrap_err();
    assert!(err.message.contains("n9.example.org") && err.message.contains("PXE"), "{err}");
    assert!(err.message.contains("no answer from 10.1.0.11:623"), "{err}");
    assert_eq!(rig.registry.pending_count().await.unwrap(), 0);
    assert_eq!(rig.power.calls(), ["boot pxe n9.example.org"]);
}

#[tokio::test]
async fn invalid_node_names_are_refused_before_anything_happens() {
    let rig = rig();
    let mut n = node("n10.example.org");
    n.hostname = "n10 --kickstart=evil".into();
    let err = refused(&rig, &n, &image("9")).await;
    assert!(err.message.contains("hostname"), "{err}");
    let mut n = node("n10.example.org");
    n.ip = Some("10.0.0.1' ; reboot".into());
    refused(&rig, &n, &image("9")).await;
    refused(&rig, &node("n10.example.org"), &image("9;reboot")).await;
    assert!(rig.power.calls().is_empty());
    assert_eq!(rig.registry.pending_count().await.unwrap(), 0);
}

#[tokio::test]
async fn a_node_without_an_ip_address_is_not_installed_by_pxe() {
    let rig = rig();
    for ip in [None, Some(""), Some("  "), Some("n13.example.org"), Some("10.0.0.300")] {
        let mut n = node("n13.example.org");
        n.ip = ip.map(str::to_string);
        let err = refused(&rig, &n, &image("9")).await;
        assert!(err.message.contains("n13.example.org") && err.message.contains("IP address"), "{ip:?}: {err}");
    }
    assert!(rig.power.calls().is_empty(), "nothing was powered");
    assert_eq!(rig.registry.pending_count().await.unwrap(), 0);
    assert!(duffy_installers::pxe::node_address(None).is_err());
    assert_eq!(duffy_installers::pxe::node_address(Some(" 10.0.0.11 ")), Ok(NODE_IP));
    // Recorded as an IPv4-mapped IPv6 address, it is the IPv4 address.
    assert_eq!(duffy_installers::pxe::node_address(Some("::ffff:10.0.0.11")), Ok(NODE_IP));
}

#[tokio::test]
async fn requests_from_another_address_change_nothing_and_look_like_unknown_tokens() {
    let rig = rig();
    let n = node("n14.example.org");
    let h = start(&rig, &n, &image("9"));
    let (script, token) = machine_boots(&rig, "n14.example.org").await;
    let unknown = "0".repeat(64);
    // The boot script (which carries the token) only for the node's own
    // address; anyone else is told what a host without an install is told.
    for peer in [OTHER_IP, IpAddr::V6(Ipv6Addr::LOCALHOST), IpAddr::V6(Ipv4Addr::new(10, 0, 0, 12).to_ipv6_mapped())] {
        let e = rig.registry.ipxe_script("n14.example.org", peer).await.unwrap_err();
        assert!(matches!(e, PxeError::NoPendingInstall { .. }), "{peer}: {e}");
        assert_eq!(
            e.to_string(),
            rig.registry.ipxe_script("n14.example.org", peer).await.unwrap_err().to_string(),
            "nothing changed"
        );
        // Every token endpoint: exactly what an unknown token gets.
        let e = rig.registry.kickstart(&token, peer).await.unwrap_err();
        assert!(matches!(e, PxeError::UnknownToken), "{peer}: {e}");
        assert_eq!(e.to_string(), rig.registry.kickstart(&unknown, NODE_IP).await.unwrap_err().to_string());
        assert!(matches!(rig.registry.complete(&token, peer, Some(HOST_KEY)).await, Err(PxeError::UnknownToken)));
        assert!(matches!(rig.registry.complete(&token, peer, None).await, Err(PxeError::UnknownToken)));
        assert!(matches!(rig.registry.complete(&token, peer, Some("junk")).await, Err(PxeError::UnknownToken)));
        assert!(matches!(rig.registry.fail(&token, peer, "forged").await, Err(PxeError::UnknownToken)));
    }
    // Nothing was used up or failed.
    assert!(rig.registry.is_pending("n14.example.org").await.unwrap());
    assert!(!h.is_finished());
    // The node itself, also seen as an IPv4-mapped IPv6 address (a `[::]`
    // listener), gets its script and completes.
    let mapped = IpAddr::V6(Ipv4Addr::new(10, 0, 0, 11).to_ipv6_mapped());
    assert_eq!(rig.registry.ipxe_script("n14.example.org", mapped).await.unwrap(), script);
    assert!(rig.registry.kickstart(&token, mapped).await.is_ok());
    rig.registry.complete(&token, mapped, Some(HOST_KEY)).await.unwrap();
    assert_eq!(result(h).await.unwrap().host_key.as_deref(), Some(HOST_KEY));
}

#[tokio::test]
async fn an_expired_token_from_another_address_is_unknown() {
    let mut config = PxeConfig::new(PUBLIC_URL, PROVISIONING_KEY);
    config.token_ttl = Duration::from_millis(300);
    let rig = rig_with(config, FakePower::new(PowerState::On));
    let n = node("n15.example.org");
    let h = start(&rig, &n, &image("9"));
    let (_, token) = machine_boots(&rig, "n15.example.org").await;
    assert!(result(h).await.is_err());
    // A stranger cannot tell the token ever existed, nor which node it was.
    let e = rig.registry.complete(&token, OTHER_IP, Some(HOST_KEY)).await.unwrap_err();
    assert!(matches!(e, PxeError::UnknownToken), "{e}");
    assert!(matches!(rig.registry.kickstart(&token, OTHER_IP).await, Err(PxeError::UnknownToken)));
    assert!(matches!(rig.registry.fail(&token, OTHER_IP, "x").await, Err(PxeError::UnknownToken)));
    // The node is told its token expired.
    assert!(matches!(rig.registry.complete(&token, NODE_IP, Some(HOST_KEY)).await, Err(PxeError::Expired { .. })));
}

#[tokio::test]
async fn custom_templates_and_image_urls() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("ipxe.tmpl"),
        "#!ipxe\necho custom {{hostname}} {{hardware_arch}}\nkernel {{kernel_url}} ks={{kickstart_url}}\ninitrd {{initrd_url}}\nboot\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("ks.tmpl"), "# generic {{release}}/{{arch}} for {{hostname}} ip {{ip}}\n").unwrap();
    std::fs::write(
        dir.path().join("ks-9-x86_64.tmpl"),
        "# specific {{ release }}/{{arch}}{{flavor}}\n{{provisioning_key}}\n{{callback_done}}\n{{callback_failed}}\n{{token}} {{public_url}} {{repo_url}}\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("README"), "not a template {{whatever}}").unwrap();
    let mut config: PxeConfig = toml::from_str(&format!(
        r#"
        public_url = "{PUBLIC_URL}/"
        provisioning_public_key = "{PROVISIONING_KEY}"
        templates_dir = "{}"
        kernel_url = "http://mirror.local/{{{{release}}}}/{{{{arch}}}}/vmlinuz"
        initrd_url = "http://mirror.local/{{{{release}}}}/{{{{arch}}}}/initrd.img"
        repo_url = "http://mirror.local/{{{{release}}}}/{{{{arch}}}}/os/"
        [[images]]
        release = "9"
        arch = "x86_64"
        kernel_url = "tftp://10.0.0.1/stream9/vmlinuz"
        "#,
        dir.path().display()
    ))
    .unwrap();
    config.token_ttl = Duration::from_secs(60);
    let rig = rig_with(config, FakePower::new(PowerState::On));

    // Release 9: the per-image kernel, the default-pattern initrd, the
    // release-specific kickstart.
    let n = node("n11.example.org");
    let h = start(&rig, &n, &image("9"));
    let (script, token) = machine_boots(&rig, "n11.example.org").await;
    assert_eq!(
        script,
        format!(
            "#!ipxe\necho custom n11.example.org x86_64\nkernel tftp://10.0.0.1/stream9/vmlinuz \
             ks={PUBLIC_URL}/Install/kickstart?token={token}\ninitrd http://mirror.local/9/x86_64/initrd.img\nboot\n"
        )
    );
    let ks = rig.registry.kickstart(&token, NODE_IP).await.unwrap();
    assert_eq!(
        ks,
        format!(
            "# specific 9/x86_64\n{PROVISIONING_KEY}\n{PUBLIC_URL}/Install/done?token={token}\n\
             {PUBLIC_URL}/Install/failed?token={token}\n{token} {PUBLIC_URL} http://mirror.local/9/x86_64/os/\n"
        )
    );
    rig.registry.complete(&token, NODE_IP, Some(HOST_KEY)).await.unwrap();
    result(h).await.unwrap();

    // Release 8: falls back to ks.tmpl.
    let n = node("n12.example.org");
    let h = start(&rig, &n, &image("8"));
    let (script, token) = machine_boots(&rig, "n12.example.org").await;
    assert!(script.contains("kernel http://mirror.local/8/x86_64/vmlinuz "), "{script}");
    assert_eq!(
        rig.registry.kickstart(&token, NODE_IP).await.unwrap(),
        "# generic 8/x86_64 for n12.example.org ip 10.0.0.11\n"
    );
    rig.registry.fail(&token, NODE_IP, "test").await.unwrap();
    assert!(result(h).await.is_err());
}

#[tokio::test]
async fn unknown_placeholder_in_a_template_is_an_error() {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ks.tmpl"), "text\nreboot\nnetwork --hostname={{hostnmae}}\n").unwrap();
    let mut config = PxeConfig::new(PUBLIC_URL, PROVISIONING_KEY);
    config.templates_dir = Some(dir.path().to_path_buf());
    let err = PxeRegistry::new(&config, endpoints(), tickets(), clock.clone()).unwrap_err();
    match &err {
        PxeError::Template { name, source: TemplateError::UnknownPlaceholder { name: ph, line, .. } } => {
            assert_eq!(name, "ks.tmpl");
            assert_eq!(ph, "hostnmae");
            assert_eq!(*line, 3);
        }
        other => panic!("{other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains("ks.tmpl") && msg.contains("{{hostnmae}}") && msg.contains("line 3"), "{msg}");

    std::fs::write(dir.path().join("ks.tmpl"), "ok {{hostname}}\n").unwrap();
    std::fs::write(dir.path().join("ipxe-9-x86_64.tmpl"), "#!ipxe\nkernel {{kernel_url\n").unwrap();
    let err = PxeRegistry::new(&config, endpoints(), tickets(), clock.clone()).unwrap_err();
    assert!(
        matches!(&err, PxeError::Template { name, source: TemplateError::Unclosed { line: 2 } } if name == "ipxe-9-x86_64.tmpl"),
        "{err}"
    );

    // URL patterns too.
    let mut config = PxeConfig::new(PUBLIC_URL, PROVISIONING_KEY);
    config.repo_url = "http://m/{{version}}/".into();
    assert!(matches!(PxeRegistry::new(&config, endpoints(), tickets(), clock.clone()), Err(PxeError::Template { .. })));
    let mut config = PxeConfig::new(PUBLIC_URL, PROVISIONING_KEY);
    config.images.push(PxeImage {
        release: "9".into(),
        arch: Arch::Aarch64,
        kernel_url: Some("http://m/{{hostname}}".into()),
        initrd_url: None,
        repo_url: None,
    });
    assert!(matches!(PxeRegistry::new(&config, endpoints(), tickets(), clock.clone()), Err(PxeError::Template { .. })));
    // A missing directory is an error too, naming it.
    let mut config = PxeConfig::new(PUBLIC_URL, PROVISIONING_KEY);
    config.templates_dir = Some(dir.path().join("missing"));
    let err = PxeRegistry::new(&config, endpoints(), tickets(), clock).unwrap_err();
    assert!(matches!(err, PxeError::Io { .. }) && err.to_string().contains("missing"), "{err}");
}

#[test]
fn config_validation() {
    let clock: Arc<dyn Clock> = Arc::new(FixedClock);
    let ok = PxeConfig::new(PUBLIC_URL, PROVISIONING_KEY);
    assert!(PxeRegistry::new(&ok, endpoints(), tickets(), clock.clone()).is_ok());
    let bad_key = PxeConfig { provisioning_public_key: "ssh-ed25519 AAAA\nevil".into(), ..ok.clone() };
    let e = PxeRegistry::new(&bad_key, endpoints(), tickets(), clock.clone()).unwrap_err();
    assert!(e.to_string().contains("provisioning_public_key"), "{e}");
    let bad_url = PxeConfig { public_url: "http://10.0.0.1:8080/'$(reboot)'".into(), ..ok.clone() };
    assert!(matches!(PxeRegistry::new(&bad_url, endpoints(), tickets(), clock.clone()), Err(PxeError::Config(_))));
    let zero = PxeConfig { token_ttl: Duration::ZERO, ..ok.clone() };
    assert!(matches!(PxeRegistry::new(&zero, endpoints(), tickets(), clock.clone()), Err(PxeError::Config(_))));

    let c: PxeConfig = toml::from_str(&format!(
        "public_url = \"{PUBLIC_URL}\"\nprovisioning_public_key = \"{PROVISIONING_KEY}\"\ntoken_ttl = \"90m\""
    ))
    .unwrap();
    assert_eq!(c.token_ttl, Duration::from_secs(5400));
    assert_eq!(c.templates_dir, None);
    assert!(c.kernel_url.contains("{{release}}"));
    let d: PxeConfig =
        toml::from_str(&format!("public_url = \"{PUBLIC_URL}\"\nprovisioning_public_key = \"{PROVISIONING_KEY}\""))
            .unwrap();
    assert_eq!(d.token_ttl, Duration::from_secs(3600));
    assert!(
        toml::from_str::<PxeConfig>(&format!(
            "public_url = \"{PUBLIC_URL}\"\nprovisioning_public_key = \"{PROVISIONING_KEY}\"\ntoken_tll = 5"
        ))
        .is_err()
    );
    assert!(toml::from_str::<PxeConfig>("provisioning_public_key = \"x\"").is_err());
}

struct FixedClock;

impl Clock for FixedClock {
    fn now(&self) -> Timestamp {
        Timestamp(0)
    }

    fn sleep_until(&self, _deadline: Timestamp) -> BoxFuture<()> {
        Box::pin(std::future::pending())
    }
}
