//! The install endpoints (`/Install/*`) over real sockets, as a hostile
//! network would call them: a real `duffy` service (SQLite file, `ipmi_sim`
//! BMCs, PXE installer), and clients bound to two loopback addresses,
//! 127.0.0.1 and 127.0.0.2 (Linux routes all of 127/8 to `lo`). Each node's
//! address is one of them; the test plays the machines (no simulated
//! machine runs: the BMCs power them on and nothing else happens).
//!
//! What is checked: only the node's own address gets its boot script (with
//! the token), its kickstart, and may report done or failed; anyone else
//! gets exactly what an unknown host or token gets and changes nothing,
//! and is logged with the address; a done without a host key fails the
//! install; with `[installer] listen`, the install endpoints are served on
//! their own listener only; a `[::]` listener serves IPv4 machines (their
//! address arrives IPv4-mapped).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use duffy_core::NewNode;
use duffy_core::testkit::conformance::check_invariants;
use duffy_core::{NodeState, Policy, Store};
use duffy_http::config::{Config, HardwareConfig, InstallerConfig, PoolConfig};
use duffy_http::{Running, build_engine, start};
use duffy_installers::PxeRegistry;
use duffy_installers::pxe::LOCAL_BOOT_SCRIPT;
use duffy_testsupport::rig::Rig;
use duffy_testsupport::sshd::{KeyKind, keygen_kind, read};

const A: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
const B: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

/// Every log line of this test binary, to check what refusals log.
fn logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let writer = buf.clone();
        tracing_subscriber::fmt()
            .with_env_filter("warn,duffy_installers=info")
            .with_ansi(false)
            .with_writer(move || LogWriter(writer.clone()))
            .init();
        buf
    })
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl Write for LogWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn log_text() -> String {
    String::from_utf8_lossy(&logs().lock().unwrap()).into_owned()
}

/// An HTTP client whose connections come from `from`.
fn client_from(from: IpAddr) -> reqwest::Client {
    reqwest::Client::builder().local_address(from).timeout(Duration::from_secs(10)).build().unwrap()
}

async fn get(client: &reqwest::Client, url: &str) -> (u16, String) {
    let r = client.get(url).send().await.unwrap_or_else(|e| panic!("{url}: {e}"));
    (r.status().as_u16(), r.text().await.unwrap())
}

/// A farm of `ips.len()` nodes with those addresses, installed by PXE
/// through `rig`'s BMCs, with tokens that outlive the test.
fn farm_config(rig: &Rig, dir: &std::path::Path, ips: &[&str], install_listen: Option<SocketAddr>) -> Config {
    let mut ipmi = String::from("[defaults]\ntimeout = \"1s\"\nretries = 1\n");
    for i in 0..ips.len() {
        let b = rig.bmc(i);
        ipmi.push_str(&format!(
            "[[bmc]]\nnode = \"{}\"\naddress = \"127.0.0.1\"\nport = {}\nusername = \"{}\"\npassword = \"{}\"\n",
            Rig::hostname(i),
            b.port,
            b.username,
            b.password
        ));
    }
    let listen = install_listen.map(|a| format!("listen = \"{a}\"\n")).unwrap_or_default();
    let pxe = format!(
        "public_url = \"http://127.0.0.1:1\"\ntoken_ttl = \"120s\"\n{listen}provisioning_public_key = \"{}\"\n",
        duffy_testsupport::sshd::OPERATOR_LINE
    );
    let cfg = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        database: dir.join("duffy.db"),
        policy: Policy {
            install_timeout: Duration::from_secs(120),
            install_attempts: 1,
            failed_retry_after: None,
            tick: Duration::from_millis(100),
            power_check_interval: None,
            ..Policy::default()
        },
        pools: vec![PoolConfig {
            release: "7".into(),
            arch: duffy_core::Arch::X86_64,
            flavor: None,
            standby: ips.len() as u32,
            installer: None,
        }],
        hardware: HardwareConfig::Ipmi(toml::from_str(&ipmi).unwrap()),
        installer: InstallerConfig::Pxe(toml::from_str(&pxe).unwrap()),
        nodes: ips
            .iter()
            .enumerate()
            .map(|(i, ip)| NewNode {
                hostname: Rig::hostname(i),
                hardware_arch: duffy_core::Arch::X86_64,
                flavor: None,
                ip: Some(ip.to_string()),
                chassis: None,
                console_port: None,
                bmc: None,
                reserved: false,
            })
            .collect(),
        ..Config::default()
    };
    cfg.validate().unwrap();
    cfg
}

struct Farm {
    running: Running,
    store: Arc<dyn Store>,
    registry: Arc<PxeRegistry>,
}

async fn start_farm(cfg: &Config, listen: SocketAddr, hosts: usize) -> Farm {
    let _ = logs();
    let store: Arc<dyn Store> = Arc::new(
        duffy_backend_sqlite::SqliteStore::open(&cfg.database, duffy_backend_sqlite::SqliteOptions::default()).unwrap(),
    );
    let built = build_engine(cfg, store.clone()).await.unwrap();
    let registry = built.pxe.clone().expect("a PXE registry");
    let running = start(listen, built).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let reg = &registry;
    while !futures::future::join_all(
        (0..hosts).map(|i| async move { reg.is_pending(&Rig::hostname(i)).await.unwrap() }),
    )
    .await
    .into_iter()
    .all(|pending| pending)
    {
        assert!(Instant::now() < deadline, "installs did not start: {:?}", store.nodes().await.unwrap());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Farm { running, store, registry }
}

async fn node_state(store: &dyn Store, i: usize) -> (NodeState, Option<String>, Option<String>) {
    let n = store.node_by_hostname(&Rig::hostname(i)).await.unwrap().unwrap();
    (n.state, n.host_key, n.fail_reason)
}

async fn wait_state(store: &dyn Store, i: usize, want: NodeState) -> (NodeState, Option<String>, Option<String>) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = node_state(store, i).await;
        if s.0 == want {
            return s;
        }
        assert!(Instant::now() < deadline, "node {i} not {want}: {s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The token in a boot script's kickstart URL.
fn token_of(script: &str) -> String {
    let at = script.find("/Install/kickstart?token=").unwrap_or_else(|| panic!("no kickstart URL in:\n{script}"));
    script[at + "/Install/kickstart?token=".len()..].chars().take_while(char::is_ascii_hexdigit).collect()
}

/// A real host public key of `kind`, as the machine's `.pub` file holds it.
fn host_key(dir: &std::path::Path, kind: KeyKind) -> String {
    let path = dir.join(format!("ssh_host_{}_key", kind.host_key_file_name()));
    keygen_kind(&path, kind, "root@machine");
    read(&path.with_extension("pub"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_nodes_own_address_may_use_the_install_endpoints() {
    let rig = Rig::start(2);
    let dir = tempfile::tempdir().unwrap();
    // Node 0 is at 127.0.0.1, node 1 at 127.0.0.2. The install endpoints
    // have their own listener, on [::]: IPv4 machines arrive IPv4-mapped.
    let install_port = std::net::TcpListener::bind("[::]:0").unwrap().local_addr().unwrap().port();
    let cfg = farm_config(&rig, dir.path(), &["127.0.0.1", "127.0.0.2"], Some(([0u16; 8], install_port).into()));
    let farm = start_farm(&cfg, cfg.listen, 2).await;
    let (store, registry) = (&*farm.store, &farm.registry);
    let install = format!("http://127.0.0.1:{}", farm.running.install_addr.expect("install listener").port());
    let public = format!("http://{}", farm.running.addr);
    let (a, b) = (client_from(A), client_from(B));
    let n0 = Rig::hostname(0);
    let n1 = Rig::hostname(1);

    // What a stranger gets: a host with no install, a token never issued.
    let (status, unknown_host) = get(&a, &format!("{install}/Install/ipxe?host=stranger.rig.test")).await;
    assert_eq!((status, unknown_host.as_str()), (200, LOCAL_BOOT_SCRIPT));
    let never = "ab".repeat(32);
    let mut unknown_token = Vec::new();
    for q in [
        format!("kickstart?token={never}"),
        format!("done?token={never}&host_key=x"),
        format!("failed?token={never}&reason=x"),
    ] {
        unknown_token.push(get(&a, &format!("{install}/Install/{q}")).await);
    }
    assert_eq!(unknown_token[0].0, 404, "{unknown_token:?}");

    // Node 0's boot script, from node 1's address: the boot-from-disk
    // script, exactly what a host without an install gets.
    assert_eq!(get(&b, &format!("{install}/Install/ipxe?host={n0}")).await, (200, unknown_host.clone()));
    assert_eq!(get(&a, &format!("{install}/Install/ipxe?host={n1}")).await, (200, unknown_host.clone()));
    // From its own address: the real script, with the token.
    let (status, script0) = get(&a, &format!("{install}/Install/ipxe?host={n0}")).await;
    assert_eq!(status, 200);
    let t0 = token_of(&script0);
    assert_eq!(t0.len(), 64, "{script0}");
    let (status, script1) = get(&b, &format!("{install}/Install/ipxe?host={n1}")).await;
    assert_eq!(status, 200);
    let t1 = token_of(&script1);

    // Node 0's token used from 127.0.0.2: answered like a token never
    // issued, whatever the call, and nothing changes.
    let rsa = host_key(dir.path(), KeyKind::Rsa4096);
    let forger = dir.path().join("forger");
    std::fs::create_dir_all(&forger).unwrap();
    let forged_key = host_key(&forger, KeyKind::EcdsaP521);
    for (i, q) in [
        format!("kickstart?token={t0}"),
        format!("done?token={t0}&host_key={}", urlencode(&forged_key)),
        format!("failed?token={t0}&reason=forged"),
    ]
    .iter()
    .enumerate()
    {
        assert_eq!(get(&b, &format!("{install}/Install/{q}")).await, unknown_token[i], "{q}");
    }
    // A done with no host key at all, from the wrong address: the same.
    assert_eq!(get(&b, &format!("{install}/Install/done?token={t0}")).await.0, 404);
    assert!(registry.is_pending(&n0).await.unwrap(), "the install is still pending");
    assert_eq!(node_state(store, 0).await.0, NodeState::Provisioning);
    let logged = log_text();
    for what in ["kickstart", "done callback", "failed callback"] {
        let line = logged
            .lines()
            .find(|l| l.contains(&format!("{what} requested from another address")) && l.contains(&n0))
            .unwrap_or_else(|| panic!("no {what} refusal logged:\n{logged}"));
        assert!(line.contains("peer=127.0.0.2") && line.contains("node_ip=127.0.0.1"), "{line}");
        assert!(!line.contains(&t0), "never the whole token: {line}");
    }

    // The install endpoints are not on the public listener, and the
    // install listener serves nothing else.
    let (status, body) = get(&a, &format!("{public}/Install/ipxe?host={n0}")).await;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("no such endpoint"), "{body}");
    assert_eq!(get(&a, &format!("{public}/Install/done?token={t0}")).await.0, 404);
    assert_eq!(get(&a, &format!("{install}/Inventory")).await.0, 404);
    assert_eq!(get(&a, &format!("{public}/Inventory")).await.0, 200);

    // The install endpoints keep refusing parameters they do not know.
    let (status, body) = get(&a, &format!("{install}/Install/kickstart?token={t0}&_=1")).await;
    assert_eq!(status, 400, "{body}");

    // Node 0, from its own address: kickstart, then done with its RSA-4096
    // host key (about 750 characters).
    let (status, ks) = get(&a, &format!("{install}/Install/kickstart?token={t0}")).await;
    assert_eq!(status, 200, "{ks}");
    assert!(rsa.len() > 700, "{rsa}");
    let (status, body) = get(&a, &format!("{install}/Install/done?token={t0}&host_key={}", urlencode(&rsa))).await;
    assert_eq!((status, body.as_str()), (200, "OK\n"));
    let (_, key, _) = wait_state(store, 0, NodeState::Ready).await;
    assert_eq!(key.as_deref(), Some(rsa.rsplit_once(' ').unwrap().0), "the reported key, without its comment");

    // Node 1 reports done without a host key: the install fails, saying
    // why, instead of handing out a node nobody can check.
    assert_eq!(get(&a, &format!("{install}/Install/done?token={t1}&host_key=x")).await, unknown_token[1]);
    let (status, body) = get(&b, &format!("{install}/Install/done?token={t1}")).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("without an SSH host key"), "{body}");
    let (_, key, reason) = wait_state(store, 1, NodeState::Failed).await;
    assert_eq!(key, None);
    assert!(reason.as_deref().unwrap_or_default().contains("without an SSH host key"), "{reason:?}");
    // The token is spent.
    assert_eq!(get(&b, &format!("{install}/Install/done?token={t1}&host_key=x")).await, unknown_token[1]);

    farm.running.stop().await.unwrap();
    check_invariants(store).await.unwrap();
}

/// A `[::]` main listener (no separate install listener): an IPv4 machine's
/// address arrives as `::ffff:127.0.0.1` and is its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dual_stack_listener_serves_ipv4_machines() {
    let rig = Rig::start(1);
    let dir = tempfile::tempdir().unwrap();
    let cfg = farm_config(&rig, dir.path(), &["127.0.0.1"], None);
    let farm = start_farm(&cfg, "[::]:0".parse().unwrap(), 1).await;
    let base = format!("http://127.0.0.1:{}", farm.running.addr.port());
    assert!(farm.running.install_addr.is_none());
    let n0 = Rig::hostname(0);

    // From another address: boot from disk.
    let (status, script) = get(&client_from(B), &format!("{base}/Install/ipxe?host={n0}")).await;
    assert_eq!((status, script.as_str()), (200, LOCAL_BOOT_SCRIPT));
    // From the node's: its script, kickstart and done.
    let a = client_from(A);
    let (status, script) = get(&a, &format!("{base}/Install/ipxe?host={n0}")).await;
    assert_eq!(status, 200, "{script}");
    let token = token_of(&script);
    assert_eq!(token.len(), 64, "the node's own script, with its token:\n{script}");
    assert_eq!(get(&a, &format!("{base}/Install/kickstart?token={token}")).await.0, 200);
    let ecdsa = host_key(dir.path(), KeyKind::EcdsaP521);
    let (status, body) = get(&a, &format!("{base}/Install/done?token={token}&host_key={}", urlencode(&ecdsa))).await;
    assert_eq!((status, body.as_str()), (200, "OK\n"));
    let (_, key, _) = wait_state(&*farm.store, 0, NodeState::Ready).await;
    assert_eq!(key.as_deref(), Some(ecdsa.rsplit_once(' ').unwrap().0));
    farm.running.stop().await.unwrap();
}

fn urlencode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}
