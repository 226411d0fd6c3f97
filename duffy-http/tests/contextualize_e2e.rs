//! SSH contextualization end to end: a real `duffy` service (SQLite store,
//! real socket, its reconciler) whose installs run an operator command and
//! whose allocations push the project's keys over SSH to a real OpenSSH
//! server (`duffy_testsupport::sshd`).
//!
//! The farm is three configured nodes at 127.0.0.1: two whose SSH port is
//! the running sshd (they share its `authorized_keys`) and one whose port
//! has nothing listening. The install command reports the sshd's real host
//! key, so every connection checks it. An allocation of the two good nodes
//! hands them over with the project's keys installed; an allocation that
//! includes the node whose SSH is down fails as a whole ("Failed to
//! allocate nodes"), that node ends Failed with the connection error, and
//! the others go back to be reinstalled without a session.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use duffy_core::NewNode;
use duffy_core::clock::SystemClock;
use duffy_core::testkit::conformance::{check_history, check_invariants};
use duffy_core::{CauseKind, Clock, EventQuery, NodeState, Policy, Principal, Project, SessionState, Store};
use duffy_http::config::{Config, ContextualizeConfig, HardwareConfig, InstallerConfig, PoolConfig, SimulatedConfig};
use duffy_http::{build_engine, start};
use duffy_installers::CommandConfig;
use duffy_testsupport::free_port;
use duffy_testsupport::sshd::{OPERATOR_LINE, Sshd};
use serde_json::{Value, json};

const GOOD: [&str; 2] = ["good1.e2e.test", "good2.e2e.test"];
const DOWN: &str = "down.e2e.test";
const PROJECT: &str = "e2e";

/// The install command: records that it ran, then reports the host key.
const INSTALL_SCRIPT: &str = r#"set -eu
cat > "$E2E_DIR/install-$DUFFY_HOSTNAME.json"
echo "$DUFFY_HOSTNAME" >> "$E2E_DIR/installs.log"
printf '{"host_key": "%s"}\n' "$E2E_HOST_KEY"
"#;

fn node(hostname: &str, reserved: bool) -> NewNode {
    NewNode {
        hostname: hostname.to_string(),
        hardware_arch: duffy_core::Arch::X86_64,
        flavor: None,
        ip: Some("127.0.0.1".into()),
        chassis: None,
        console_port: None,
        bmc: None,
        reserved,
    }
}

/// Waits until every node in `hostnames` is Ready; panics at once if one
/// ends Failed, or after 20 s.
async fn wait_ready(store: &dyn Store, hostnames: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let nodes = store.nodes().await.unwrap();
        let wanted: Vec<_> = nodes.iter().filter(|n| hostnames.contains(&n.hostname.as_str())).collect();
        assert_eq!(wanted.len(), hostnames.len(), "{hostnames:?}");
        if let Some(f) = wanted.iter().find(|n| n.state == NodeState::Failed) {
            panic!("{} failed: {:?}", f.hostname, f.fail_reason);
        }
        if wanted.iter().all(|n| n.state == NodeState::Ready) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not Ready within 20 s: {:?}",
            wanted.iter().map(|n| (&n.hostname, n.state)).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct Client {
    http: reqwest::Client,
    base: String,
}

impl Client {
    async fn get(&self, path_and_query: &str) -> (u16, Value) {
        let r = self.http.get(format!("{}{}", self.base, path_and_query)).send().await.unwrap();
        let status = r.status().as_u16();
        let body = r.text().await.unwrap();
        let value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("not JSON ({e}): {body:?}"));
        (status, value)
    }
}

fn blocks(text: &str) -> usize {
    text.lines().filter(|l| l.starts_with("# BEGIN duffy session ")).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocations_push_the_project_keys_and_a_node_with_ssh_down_fails_the_request() {
    let started = Instant::now();
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    let host_key = sshd.host_public_key().trim().to_string();
    let script = dir.path().join("install.sh");
    std::fs::write(&script, INSTALL_SCRIPT).unwrap();

    let mut installer = CommandConfig::new("/bin/sh");
    installer.args = vec![script.display().to_string()];
    installer.timeout = Duration::from_secs(20);
    installer.env = BTreeMap::from([
        ("E2E_DIR".to_string(), dir.path().display().to_string()),
        ("E2E_HOST_KEY".to_string(), host_key.clone()),
    ]);
    let mut ssh = sshd.ssh_config();
    let closed_port = free_port();
    assert_ne!(closed_port, sshd.port());
    for h in GOOD {
        ssh.ports.insert(h.to_string(), sshd.port());
    }
    ssh.ports.insert(DOWN.to_string(), closed_port);
    let cfg = Config {
        database: dir.path().join("duffy.db"),
        policy: Policy {
            rate_limit: None,
            install_timeout: Duration::from_secs(20),
            install_attempts: 1,
            failed_retry_after: None,
            prepare_timeout: Duration::from_secs(30),
            tick: Duration::from_millis(200),
            power_check_interval: None,
            ..Policy::default()
        },
        pools: vec![PoolConfig {
            release: "7".into(),
            arch: duffy_core::Arch::X86_64,
            flavor: None,
            standby: 3,
            installer: None,
        }],
        hardware: HardwareConfig::Simulated(SimulatedConfig { machines: 0, ..SimulatedConfig::default() }),
        installer: InstallerConfig::Command(installer),
        contextualize: ContextualizeConfig::Ssh(ssh),
        // The node whose SSH is down starts out of the pool (Reserved), so
        // the first allocation can only pick the good ones.
        nodes: vec![node(GOOD[0], false), node(GOOD[1], false), node(DOWN, true)],
        ..Config::default()
    };
    cfg.validate().unwrap();
    let store: Arc<dyn Store> = Arc::new(
        duffy_backend_sqlite::SqliteStore::open(&cfg.database, duffy_backend_sqlite::SqliteOptions::default()).unwrap(),
    );
    store
        .upsert_project(Project {
            name: PROJECT.into(),
            quota: None,
            ssh_keys: vec![sshd.project_public_key(1), sshd.project_public_key(2)],
        })
        .await
        .unwrap();
    let key = duffy_http::keys::create_key(&*store, PROJECT, false, None, SystemClock.now()).await.unwrap().0;
    let built = build_engine(&cfg, store.clone()).await.unwrap();
    let running = start("127.0.0.1:0".parse().unwrap(), built).await.unwrap();
    let client = Client { http: reqwest::Client::new(), base: format!("http://{}", running.addr) };

    // The installs run the command, which records the sshd's host key.
    wait_ready(&*store, &GOOD).await;
    for h in GOOD {
        let n = store.node_by_hostname(h).await.unwrap().unwrap();
        // Recorded as `type blob`, without the comment.
        let recorded = n.host_key.clone().unwrap_or_default();
        assert_eq!(
            recorded.split_whitespace().collect::<Vec<_>>(),
            host_key.split_whitespace().take(2).collect::<Vec<_>>(),
            "{h}: the host key the install reported"
        );
        let input: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join(format!("install-{h}.json"))).unwrap())
                .unwrap();
        assert_eq!(input["hostname"], json!(h), "the command got the node on stdin");
        assert_eq!(input["image"]["release"], json!("7"));
    }
    assert_eq!(store.node_by_hostname(DOWN).await.unwrap().unwrap().state, NodeState::Reserved);

    // An allocation of the two good nodes: the project's keys are pushed.
    let key1 = sshd.project_private_key_path(1);
    let key2 = sshd.project_private_key_path(2);
    assert!(!sshd.login_works(&key1), "the project key must not log in before an allocation");
    let (status, v) = client.get(&format!("/Node/get?key={key}&ver=7&arch=x86_64&count=2")).await;
    assert_eq!(status, 200, "{v}");
    let mut hosts: Vec<String> = serde_json::from_value(v["hosts"].clone()).unwrap_or_else(|e| panic!("{e}: {v}"));
    hosts.sort();
    assert_eq!(hosts, GOOD);
    let ssid = v["ssid"].as_str().unwrap().to_string();
    assert!(!ssid.is_empty());
    assert!(sshd.login_works(&key1), "project key 1 logs in once the nodes are handed over");
    assert!(sshd.login_works(&key2), "project key 2 logs in once the nodes are handed over");
    let text = sshd.authorized_keys();
    assert_eq!(blocks(&text), 1, "one Duffy block, even with two nodes sharing the file:\n{text}");
    assert_eq!(
        text.lines().filter(|l| *l == format!("# BEGIN duffy session {ssid} project {PROJECT}")).count(),
        1,
        "{text}"
    );
    assert!(text.contains(&format!("{}\n{}\n", sshd.project_public_key(1), sshd.project_public_key(2))), "{text}");
    assert!(text.contains(OPERATOR_LINE), "{text}");
    for h in GOOD {
        let n = store.node_by_hostname(h).await.unwrap().unwrap();
        assert_eq!((n.state, n.session.as_ref().map(|s| s.0.as_str())), (NodeState::Deployed, Some(ssid.as_str())));
    }
    let (status, v) = client.get(&format!("/Node/done?key={key}&ssid={ssid}")).await;
    assert_eq!((status, v), (200, json!("Done")));

    // Put the node whose SSH is down back; with everything reinstalled, an
    // allocation of all three must pick it.
    running.engine.recover(&Principal::operator(), DOWN).await.unwrap();
    wait_ready(&*store, &[GOOD[0], GOOD[1], DOWN]).await;
    assert!(store.live_sessions().await.unwrap().is_empty());
    let (status, v) = client.get(&format!("/Node/get?key={key}&ver=7&arch=x86_64&count=3")).await;
    assert_eq!((status, v), (200, json!("Failed to allocate nodes")));
    assert!(store.live_sessions().await.unwrap().is_empty(), "no session is left behind");

    let down = store.node_by_hostname(DOWN).await.unwrap().unwrap();
    assert_eq!(down.state, NodeState::Failed);
    assert_eq!(down.session, None);
    let reason = down.fail_reason.clone().unwrap_or_default();
    assert!(
        reason.contains(DOWN) && reason.contains("cannot connect") && reason.contains("Connection refused"),
        "the reason names the node and the connection failure: {reason}"
    );
    let events = store.events(EventQuery { node: Some(down.id), ..EventQuery::default() }).await.unwrap();
    let last = events.last().unwrap();
    assert_eq!(last.cause, CauseKind::PrepareFailed);
    let failed_ssid = last.session.clone().expect("the failed preparation names its session");
    let session = store.session(&failed_ssid).await.unwrap().unwrap();
    assert_eq!(session.state, SessionState::Aborted);
    assert_eq!(session.nodes.len(), 3);

    // The other nodes of that request were not handed over; they go back
    // to be reinstalled, holding no session.
    for h in GOOD {
        let n = store.node_by_hostname(h).await.unwrap().unwrap();
        assert_ne!(n.state, NodeState::Deployed, "{h}");
        assert_eq!(n.session, None, "{h}");
        let history: Vec<_> = store
            .events(EventQuery { node: Some(n.id), ..EventQuery::default() })
            .await
            .unwrap()
            .into_iter()
            .filter(|e| e.session.as_ref() == Some(&failed_ssid))
            .map(|e| e.cause)
            .collect();
        assert_eq!(history, vec![CauseKind::Allocated, CauseKind::AllocationAborted], "{h}");
    }
    wait_ready(&*store, &GOOD).await;

    // Stop the service (and its reconciler) before the final checks.
    running.stop().await.unwrap();
    assert!(store.live_sessions().await.unwrap().is_empty());
    assert_eq!(store.node_by_hostname(DOWN).await.unwrap().unwrap().state, NodeState::Failed);
    for h in GOOD {
        let n = store.node_by_hostname(h).await.unwrap().unwrap();
        assert_eq!((n.state, n.session), (NodeState::Ready, None), "{h}");
    }
    check_invariants(&*store).await.unwrap();
    check_history(&*store).await.unwrap();
    eprintln!("contextualize_e2e took {:?}", started.elapsed());
}

/// A project that cannot be prepared for (no SSH keys, as a fresh `duffy
/// key create --project new` makes it, or an invalid key) is refused
/// before anything is claimed: one request with count=20 used to claim 20
/// nodes, fail to prepare them and put every one in the 6 h cool-down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_project_without_usable_keys_does_not_drain_the_pool() {
    const NODES: usize = 20;
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("install.sh");
    std::fs::write(&script, INSTALL_SCRIPT).unwrap();
    let mut installer = CommandConfig::new("/bin/sh");
    installer.args = vec![script.display().to_string()];
    installer.env = BTreeMap::from([
        ("E2E_DIR".to_string(), dir.path().display().to_string()),
        ("E2E_HOST_KEY".to_string(), sshd.host_public_key().trim().to_string()),
    ]);
    let hostnames: Vec<String> = (0..NODES).map(|i| format!("n{i}.e2e.test")).collect();
    let mut ssh = sshd.ssh_config();
    for h in &hostnames {
        ssh.ports.insert(h.clone(), sshd.port());
    }
    let cfg = Config {
        database: dir.path().join("duffy.db"),
        policy: Policy {
            rate_limit: None,
            install_attempts: 1,
            tick: Duration::from_millis(200),
            power_check_interval: None,
            max_concurrent_installs: NODES,
            ..Policy::default()
        },
        pools: vec![PoolConfig {
            release: "7".into(),
            arch: duffy_core::Arch::X86_64,
            flavor: None,
            standby: NODES as u32,
            installer: None,
        }],
        hardware: HardwareConfig::Simulated(SimulatedConfig { machines: 0, ..SimulatedConfig::default() }),
        installer: InstallerConfig::Command(installer),
        contextualize: ContextualizeConfig::Ssh(ssh),
        nodes: hostnames.iter().map(|h| node(h, false)).collect(),
        ..Config::default()
    };
    cfg.validate().unwrap();
    let store: Arc<dyn Store> = Arc::new(
        duffy_backend_sqlite::SqliteStore::open(&cfg.database, duffy_backend_sqlite::SqliteOptions::default()).unwrap(),
    );
    // A fresh project has no keys; another has one that is not a key.
    let keyless = duffy_http::keys::create_key(&*store, "new", false, None, SystemClock.now()).await.unwrap().0;
    store
        .upsert_project(Project { name: "typo".into(), quota: None, ssh_keys: vec!["ssh-ed25519 not-base64!".into()] })
        .await
        .unwrap();
    let typo = duffy_http::keys::create_key(&*store, "typo", false, None, SystemClock.now()).await.unwrap().0;
    let built = build_engine(&cfg, store.clone()).await.unwrap();
    let running = start("127.0.0.1:0".parse().unwrap(), built).await.unwrap();
    let client = Client { http: reqwest::Client::new(), base: format!("http://{}", running.addr) };
    let names: Vec<&str> = hostnames.iter().map(String::as_str).collect();
    wait_ready(&*store, &names).await;
    let before = store.nodes().await.unwrap();

    for (key, project, what) in [(&keyless, "new", "has no SSH keys"), (&typo, "typo", "is refused")] {
        let (status, v) = client.get(&format!("/Node/get?key={key}&count={NODES}")).await;
        let msg = v.as_str().unwrap_or_else(|| panic!("a JSON string for cico to print: {v}"));
        assert_eq!(status, 400, "{msg}");
        assert!(msg.contains(&format!("\"{project}\"")) && msg.contains(what), "names the project and why: {msg}");
        assert!(msg.contains(&format!("duffy project set {project} --ssh-keys FILE")), "names the fix: {msg}");
        // Nothing was claimed: the Ready count is unchanged, no node is
        // Failed, no session exists.
        let after = store.nodes().await.unwrap();
        assert_eq!(after.iter().filter(|n| n.state == NodeState::Ready).count(), NODES);
        assert!(after.iter().all(|n| n.state != NodeState::Failed));
        assert_eq!(after, before, "no row changed");
        assert!(store.live_sessions().await.unwrap().is_empty());
    }
    running.stop().await.unwrap();
    check_invariants(&*store).await.unwrap();
    check_history(&*store).await.unwrap();
}
