#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The SSH contextualizer against a real OpenSSH server started by the test
//! (Debian `openssh-server`), as the current user, on 127.0.0.1. Each test
//! has its own sshd, keys and `authorized_keys` in a temporary directory;
//! the real `~/.ssh` is never touched. The servers are killed on drop. The
//! server is `duffy_testsupport::sshd`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use duffy_core::model::NewNode;
use duffy_core::{Arch, Blame, Contextualizer, Node, NodeId, Project, SessionContext, SessionId, Timestamp};
use duffy_installers::{SshConfig, SshContextualizer, SshError};
use duffy_testsupport::free_port;
use duffy_testsupport::sshd::{KeyKind, OPERATOR_LINE, Sshd, keygen, read};

const HOSTNAME: &str = "node1.example.org";

/// The contextualizer's configuration for the test node on `sshd`.
fn ssh_config(sshd: &Sshd) -> SshConfig {
    let mut c = sshd.ssh_config();
    c.ports.insert(HOSTNAME.to_string(), sshd.port());
    c
}

/// The test node: 127.0.0.1, with `sshd`'s host key recorded.
fn test_node(sshd: &Sshd) -> Node {
    let mut n = NewNode::new(HOSTNAME, Arch::X86_64);
    n.ip = Some("127.0.0.1".into());
    let mut n = n.into_node(NodeId(7), Timestamp(0));
    n.host_key = Some(sshd.host_public_key());
    n
}

/// Whether the private key `key` (a file in the sshd's directory) can log
/// in and run `true`, checking the server's host key.
fn can_login(sshd: &Sshd, key: &str) -> bool {
    sshd.login_works_checking_host_key(&sshd.path(key))
}

fn project(name: &str, keys: Vec<String>) -> Project {
    Project { name: name.to_string(), quota: None, ssh_keys: keys }
}

fn session(id: &str) -> SessionId {
    SessionId(id.to_string())
}

fn blocks(text: &str) -> usize {
    text.lines().filter(|l| l.starts_with("# BEGIN duffy session ")).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepare_installs_the_project_keys() {
    let sshd = Sshd::start();
    assert!(!can_login(&sshd, "project_key1"), "the project key must not work before prepare");
    // Through the trait object the engine holds.
    let ctx: Arc<dyn Contextualizer> = Arc::new(SshContextualizer::new(ssh_config(&sshd)).unwrap());
    let p = project("infra", vec![sshd.project_public_key(1), format!("  {}\n", sshd.project_public_key(2))]);
    ctx.check_project(&p).unwrap();
    let ssid = session("4f6d2c1e-0000-4000-8000-000000000001");
    ctx.prepare(&test_node(&sshd), &p, &ssid).await.unwrap();

    let text = sshd.authorized_keys();
    assert_eq!(blocks(&text), 1, "{text}");
    let expected_block = format!(
        "# BEGIN duffy session {ssid} project infra\n{}\n{}\n# END duffy session {ssid}\n",
        sshd.project_public_key(1),
        sshd.project_public_key(2)
    );
    assert!(text.ends_with(&expected_block), "{text}");
    // Lines from before are kept, first.
    assert!(text.starts_with(&read(&sshd.path("duffy_key.pub"))), "{text}");
    assert!(text.contains(&format!("{OPERATOR_LINE}\n")), "{text}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(sshd.path("authorized_keys")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // No temporary file left behind.
    let leftovers: Vec<_> = std::fs::read_dir(sshd.dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("duffy-new"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    assert!(can_login(&sshd, "project_key1"));
    assert!(can_login(&sshd, "project_key2"));
    assert!(can_login(&sshd, "duffy_key"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_session_replaces_the_block_and_remove_keys_clears_it() {
    let sshd = Sshd::start();
    let ctx = SshContextualizer::new(ssh_config(&sshd)).unwrap();
    let node = test_node(&sshd);
    let first = session("s-1");
    ctx.prepare(&node, &project("infra", vec![sshd.project_public_key(1), sshd.project_public_key(2)]), &first)
        .await
        .unwrap();
    assert!(can_login(&sshd, "project_key1"));

    let second = session("s-2");
    ctx.prepare(&node, &project("other", vec![sshd.project_public_key(2)]), &second).await.unwrap();
    let text = sshd.authorized_keys();
    assert_eq!(blocks(&text), 1, "{text}");
    assert!(text.contains("# BEGIN duffy session s-2 project other\n"), "{text}");
    assert!(!text.contains("s-1"), "{text}");
    assert!(!text.contains(&sshd.project_public_key(1)), "{text}");
    assert!(text.contains(OPERATOR_LINE));
    assert!(!can_login(&sshd, "project_key1"), "the previous session's key must be gone");
    assert!(can_login(&sshd, "project_key2"));

    ctx.remove_keys(&node).await.unwrap();
    let text = sshd.authorized_keys();
    assert_eq!(blocks(&text), 0, "{text}");
    assert_eq!(text, format!("{}{OPERATOR_LINE}\n", read(&sshd.path("duffy_key.pub"))));
    assert!(!can_login(&sshd, "project_key2"));
    assert!(can_login(&sshd, "duffy_key"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_recorded_host_key_is_refused_and_nothing_is_written() {
    let sshd = Sshd::start();
    let ctx = SshContextualizer::new(ssh_config(&sshd)).unwrap();
    let mut node = test_node(&sshd);
    // Another machine's key: as after a reinstall nobody recorded, or a
    // machine in the middle.
    keygen(&sshd.path("impostor"), "impostor");
    node.host_key = Some(read(&sshd.path("impostor.pub")));
    let before = sshd.authorized_keys();
    let err =
        ctx.push_keys(&node, &project("infra", vec![sshd.project_public_key(1)]), &session("s-1")).await.unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, SshError::HostKeyMismatch { .. }), "{err:?}");
    assert_eq!(err.blame(), Blame::Node, "the node is at fault");
    let msg = err.to_string();
    assert!(msg.contains(HOSTNAME) && msg.contains("host key"), "{msg}");
    assert!(msg.contains("Host key verification failed"), "ssh's own words missing: {msg}");
    assert_eq!(sshd.authorized_keys(), before);
    assert!(!can_login(&sshd, "project_key1"));
}

/// EL5 and EL6 machines have no Ed25519 host key: an sshd that offers only
/// RSA (4096 bits), and one that offers only ECDSA on P-521, are handed
/// over checking the host key their install recorded, and one whose
/// recorded key is of the other type is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_with_only_rsa_or_only_ecdsa_host_keys() {
    let rsa = Sshd::start_with_host_key(KeyKind::Rsa4096);
    let ecdsa = Sshd::start_sharing(&rsa, KeyKind::EcdsaP521);
    assert!(rsa.host_public_key().starts_with("ssh-rsa "), "{}", rsa.host_public_key());
    assert!(rsa.host_public_key().len() > 700, "a 4096-bit key line: {}", rsa.host_public_key());
    assert!(ecdsa.host_public_key().starts_with("ecdsa-sha2-nistp521 "), "{}", ecdsa.host_public_key());
    let p = project("el6", vec![rsa.project_public_key(1)]);
    for (i, server) in [&rsa, &ecdsa].into_iter().enumerate() {
        let ctx = SshContextualizer::new(ssh_config(server)).unwrap();
        // Recorded as the install records it: without the comment.
        let mut node = test_node(server);
        let recorded = duffy_installers::PublicKey::parse_host_key(&server.host_public_key()).unwrap();
        node.host_key = Some(recorded.without_comment());
        assert!(!server.login_works_checking_host_key(&server.project_private_key_path(1)));
        ctx.prepare(&node, &p, &session(&format!("s-{i}"))).await.unwrap_or_else(|e| panic!("{e}"));
        assert!(server.login_works_checking_host_key(&server.project_private_key_path(1)));
        ctx.remove_keys(&node).await.unwrap();
    }
    assert_eq!(blocks(&rsa.authorized_keys()), 0);
    // The RSA machine's key recorded, but an ECDSA-only server answers.
    let ctx = SshContextualizer::new(ssh_config(&ecdsa)).unwrap();
    let mut node = test_node(&ecdsa);
    node.host_key = Some(rsa.host_public_key());
    let err = ctx.push_keys(&node, &p, &session("s-x")).await.unwrap_err();
    assert!(matches!(err, SshError::HostKeyMismatch { .. }), "{err:?}");
    assert_eq!(blocks(&rsa.authorized_keys()), 0, "nothing written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_ssh_down_fails_clearly_and_quickly() {
    let sshd = Sshd::start();
    let mut config = ssh_config(&sshd);
    // Nothing listens there.
    config.ports.insert(HOSTNAME.to_string(), free_port());
    let ctx = SshContextualizer::new(config).unwrap();
    let started = Instant::now();
    let err = ctx
        .push_keys(&test_node(&sshd), &project("infra", vec![sshd.project_public_key(1)]), &session("s-1"))
        .await
        .unwrap_err();
    eprintln!("{err}");
    assert!(started.elapsed() < Duration::from_secs(20), "took {:?}", started.elapsed());
    assert!(matches!(err, SshError::Connect { .. }), "{err:?}");
    assert_eq!(err.blame(), Blame::Node, "the node is at fault");
    let msg = err.to_string();
    assert!(msg.contains(HOSTNAME) && msg.contains("Connection refused"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_never_answers_is_given_up_within_the_deadline() {
    let sshd = Sshd::start();
    // Accepts TCP connections and never says a word.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            held.push(sock);
        }
    });
    let mut config = ssh_config(&sshd);
    config.ports.insert(HOSTNAME.to_string(), port);
    config.connect_timeout = Duration::from_secs(1);
    config.command_timeout = Duration::from_secs(2);
    let ctx = SshContextualizer::new(config).unwrap();
    let started = Instant::now();
    let err = ctx
        .push_keys(&test_node(&sshd), &project("infra", vec![sshd.project_public_key(1)]), &session("s-1"))
        .await
        .unwrap_err();
    eprintln!("{err}");
    assert!(started.elapsed() < Duration::from_secs(15), "took {:?}", started.elapsed());
    assert!(matches!(err, SshError::Connect { .. } | SshError::Timeout { .. }), "{err:?}");
    assert_eq!(err.blame(), Blame::Node, "the node is at fault");
    assert!(err.to_string().contains(HOSTNAME), "{err}");
    holder.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_project_keys_are_refused_before_connecting() {
    let sshd = Sshd::start();
    let mut config = ssh_config(&sshd);
    // Connecting would fail with Spawn: getting InvalidProjectKey proves
    // nothing was attempted.
    config.ssh_program = PathBuf::from("/nonexistent/ssh");
    let ctx = SshContextualizer::new(config).unwrap();
    let node = test_node(&sshd);
    let good = sshd.project_public_key(1);
    let attempts = [
        format!("{good}\n# END duffy session x\nssh-ed25519 AAAA evil"),
        format!("{good}\nDUFFY_KEYS_0\n$(touch /tmp/pwned)"),
        format!("command=\"/bin/sh\" {good}"),
        "ssh-ed25519 $(reboot)".to_string(),
        String::new(),
    ];
    for bad in attempts {
        let p = project("infra", vec![good.clone(), bad.clone()]);
        let err = ctx.push_keys(&node, &p, &session("s-1")).await.unwrap_err();
        eprintln!("{err}");
        match &err {
            SshError::InvalidProjectKey { index, project, .. } => {
                assert_eq!(*index, 2);
                assert_eq!(project, "infra");
            }
            other => panic!("{bad:?}: {other:?}"),
        }
        assert!(err.to_string().contains("refused"), "{err}");
        assert_eq!(err.blame(), Blame::Project, "no node is at fault");
        // The same refusal, before any node is claimed.
        let checked = ctx.check_project(&p).unwrap_err();
        assert_eq!((checked.blame, checked.message), (Blame::Project, err.to_string()));
    }
    // A project without keys, and names that would break the markers.
    let err = ctx.push_keys(&node, &project("infra", vec![]), &session("s-1")).await.unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, SshError::NoProjectKeys { .. }), "{err:?}");
    assert!(err.to_string().contains("duffy project set infra --ssh-keys FILE"), "names the fix: {err}");
    assert_eq!(err.blame(), Blame::Project, "no node is at fault");
    assert_eq!(ctx.check_project(&project("infra", vec![])).unwrap_err().blame, Blame::Project);
    let err = ctx.push_keys(&node, &project("in\nfra", vec![good.clone()]), &session("s-1")).await.unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, SshError::InvalidName { .. }), "{err:?}");
    let err = ctx.push_keys(&node, &project("infra", vec![good.clone()]), &session("s 1\n")).await.unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, SshError::InvalidName { .. }), "{err:?}");
    // With valid input the (missing) program is reached.
    let err = ctx.push_keys(&node, &project("infra", vec![good]), &session("s-1")).await.unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, SshError::Spawn { .. }), "{err:?}");
    assert_eq!(err.blame(), Blame::Service, "Duffy's side, not the node's");
    assert!(!Path::new("/tmp/pwned").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shell_characters_in_a_key_comment_are_written_as_data() {
    let sshd = Sshd::start();
    let ctx = SshContextualizer::new(ssh_config(&sshd)).unwrap();
    let dir = sshd.dir().display().to_string();
    // A legal key line whose comment is full of shell syntax.
    let tricky =
        format!("{}'; touch {dir}/pwned1; echo '$(touch {dir}/pwned2)`touch {dir}/pwned3`", sshd.project_public_key(2));
    let p = project("infra", vec![sshd.project_public_key(1), tricky.clone()]);
    ctx.push_keys(&test_node(&sshd), &p, &session("s-1")).await.unwrap();
    let text = sshd.authorized_keys();
    assert!(text.lines().any(|l| l == tricky), "{text}");
    for f in ["pwned1", "pwned2", "pwned3"] {
        assert!(!sshd.path(f).exists(), "{f} was created: the key was run as code");
    }
    assert!(can_login(&sshd, "project_key2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_a_recorded_host_key() {
    let sshd = Sshd::start();
    let mut node = test_node(&sshd);
    node.host_key = None;
    let p = project("infra", vec![sshd.project_public_key(1)]);

    // Required (the default): refused without connecting.
    let mut config = ssh_config(&sshd);
    config.ssh_program = PathBuf::from("/nonexistent/ssh");
    let err = SshContextualizer::new(config).unwrap().push_keys(&node, &p, &session("s-1")).await.unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, SshError::NoHostKey { .. }), "{err:?}");
    assert!(err.to_string().contains(HOSTNAME) && err.to_string().contains("no SSH host key"), "{err}");

    // Not required: connects without checking.
    let mut config = ssh_config(&sshd);
    config.require_host_key = false;
    SshContextualizer::new(config).unwrap().push_keys(&node, &p, &session("s-1")).await.unwrap();
    assert!(can_login(&sshd, "project_key1"));

    // A garbage recorded key is refused either way.
    node.host_key = Some("ssh-ed25519 garbage".into());
    let mut config = ssh_config(&sshd);
    config.require_host_key = false;
    let err = SshContextualizer::new(config).unwrap().push_keys(&node, &p, &session("s-2")).await.unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, SshError::BadRecordedHostKey { .. }), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_duffys_key_refuses_the_login() {
    let sshd = Sshd::start();
    let mut config = ssh_config(&sshd);
    keygen(&sshd.path("stranger"), "stranger");
    config.private_key = sshd.path("stranger");
    let ctx = SshContextualizer::new(config).unwrap();
    let before = sshd.authorized_keys();
    let err = ctx
        .push_keys(&test_node(&sshd), &project("infra", vec![sshd.project_public_key(1)]), &session("s-1"))
        .await
        .unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, SshError::AuthFailed { .. }), "{err:?}");
    assert!(err.to_string().contains("Permission denied"), "{err}");
    assert_eq!(sshd.authorized_keys(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_remote_script_reports_its_stderr() {
    let sshd = Sshd::start();
    let mut config = ssh_config(&sshd);
    // A directory where the file should be: the script cannot replace it.
    std::fs::create_dir(sshd.path("not_a_file")).unwrap();
    std::fs::write(sshd.path("not_a_file/keep"), "x").unwrap();
    config.authorized_keys = sshd.path("not_a_file").display().to_string();
    let ctx = SshContextualizer::new(config).unwrap();
    let err = ctx
        .push_keys(&test_node(&sshd), &project("infra", vec![sshd.project_public_key(1)]), &session("s-1"))
        .await
        .unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, SshError::Remote { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(HOSTNAME) && msg.contains("not_a_file"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepare_session_writes_the_session_info_with_the_keys() {
    let sshd = Sshd::start();
    let ctx: Arc<dyn Contextualizer> = Arc::new(SshContextualizer::new(ssh_config(&sshd)).unwrap());
    let p = project("infra", vec![sshd.project_public_key(1)]);
    let info = SessionContext {
        id: session("4f6d2c1e-0000-4000-8000-000000000009"),
        project: "infra".into(),
        hosts: vec![HOSTNAME.to_string(), "node2.example.org".to_string()],
        expires_at: Timestamp(1_767_229_200_000),
    };
    ctx.prepare_session(&test_node(&sshd), &p, &info).await.unwrap();
    let text = read(&sshd.path("session-info"));
    assert_eq!(
        text,
        "# Written by Duffy when this node was handed to its session.\n\
         DUFFY_SESSION_ID=4f6d2c1e-0000-4000-8000-000000000009\n\
         DUFFY_PROJECT=infra\n\
         DUFFY_HOSTS='node1.example.org node2.example.org'\n\
         DUFFY_EXPIRES_AT=2026-01-01T01:00:00.000Z\n"
    );
    // Written with the keys, in the same login.
    assert_eq!(blocks(&sshd.authorized_keys()), 1);
    assert!(can_login(&sshd, "project_key1"));
    // A job can source it.
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(". '{}' && echo \"$DUFFY_SESSION_ID $DUFFY_HOSTS\"", sshd.path("session-info").display()))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "4f6d2c1e-0000-4000-8000-000000000009 node1.example.org node2.example.org\n"
    );
    // The next session replaces it; no temporary file is left behind.
    let next =
        SessionContext { id: session("4f6d2c1e-0000-4000-8000-00000000000a"), hosts: vec![HOSTNAME.into()], ..info };
    ctx.prepare_session(&test_node(&sshd), &p, &next).await.unwrap();
    let text = read(&sshd.path("session-info"));
    assert!(text.contains("DUFFY_SESSION_ID=4f6d2c1e-0000-4000-8000-00000000000a\n"), "{text}");
    assert!(text.contains("DUFFY_HOSTS='node1.example.org'\n"), "{text}");
    let leftovers: Vec<_> = std::fs::read_dir(sshd.dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("duffy-new"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // The plain prepare (no session description) leaves it alone.
    let before = read(&sshd.path("session-info"));
    ctx.prepare(&test_node(&sshd), &p, &session("4f6d2c1e-0000-4000-8000-00000000000b")).await.unwrap();
    assert_eq!(read(&sshd.path("session-info")), before);
}
