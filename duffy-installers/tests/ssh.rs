#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The SSH contextualizer against a real OpenSSH server started by the test
//! (Debian `openssh-server`), as the current user, on 127.0.0.1. Each test
//! has its own sshd, keys and `authorized_keys` in a temporary directory;
//! the real `~/.ssh` is never touched. The servers are killed on drop.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use duffy_core::model::NewNode;
use duffy_core::{Arch, Installer, Node, NodeId, Project, SessionId, Timestamp};
use duffy_installers::{
    CommandConfig, CommandInstaller, Contextualized, Contextualizer, SshConfig, SshContextualizer, SshError,
};
use tempfile::TempDir;

const SSHD: &str = "/usr/sbin/sshd";
const INSTALL_HINT: &str = "the SSH tests need OpenSSH: apt-get install openssh-server openssh-client \
                            (or run scripts/install-test-deps.sh)";
const HOSTNAME: &str = "node1.example.org";
/// A line that was in authorized_keys before Duffy: it must survive.
const OPERATOR_LINE: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIByrgFoRodMpGoIGtVxnK/CTnXeEUb1KLNez/P0VJgK+ operator@bastion";

fn require_openssh() {
    assert!(Path::new(SSHD).exists(), "{SSHD} is missing; {INSTALL_HINT}");
    for tool in ["ssh", "ssh-keygen"] {
        let found = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool}"))
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(found, "{tool} is missing; {INSTALL_HINT}");
    }
}

fn current_user() -> String {
    let out = Command::new("id").arg("-un").output().expect("id -un");
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn keygen(path: &Path, comment: &str) {
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .status()
        .expect("ssh-keygen");
    assert!(status.success(), "ssh-keygen failed");
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// An sshd on 127.0.0.1 with its own host key and an `authorized_keys`
/// holding Duffy's provisioning key and an operator's key.
struct Sshd {
    child: Child,
    port: u16,
    dir: TempDir,
    user: String,
}

impl Sshd {
    fn start() -> Sshd {
        require_openssh();
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        keygen(&d.join("host_key"), "host");
        keygen(&d.join("duffy_key"), "duffy@farm");
        keygen(&d.join("project_key1"), "alice@laptop");
        keygen(&d.join("project_key2"), "bob@laptop");
        std::fs::write(d.join("authorized_keys"), format!("{}{OPERATOR_LINE}\n", read(&d.join("duffy_key.pub"))))
            .unwrap();
        // Running as root, sshd wants its privilege separation directory.
        if current_user() == "root" && !Path::new("/run/sshd").exists() {
            std::fs::create_dir_all("/run/sshd").unwrap();
        }
        for _attempt in 0..5 {
            let port = free_port();
            let config = d.join("sshd_config");
            std::fs::write(
                &config,
                format!(
                    "ListenAddress 127.0.0.1\nPort {port}\nHostKey {dir}/host_key\nAuthorizedKeysFile {dir}/authorized_keys\n\
                     StrictModes no\nPidFile {dir}/sshd.pid\nUsePAM no\nPasswordAuthentication no\n\
                     KbdInteractiveAuthentication no\nPubkeyAuthentication yes\nPermitRootLogin prohibit-password\n\
                     LogLevel VERBOSE\n",
                    dir = d.display()
                ),
            )
            .unwrap();
            let log = std::fs::File::create(d.join("sshd.log")).unwrap();
            let mut child = Command::new(SSHD)
                .args(["-D", "-e", "-f"])
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {SSHD}: {e}; {INSTALL_HINT}"));
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Sshd { child, port, dir, user: current_user() };
                }
                if let Some(status) = child.try_wait().unwrap() {
                    let log = read(&d.join("sshd.log"));
                    if log.contains("Address already in use") {
                        break; // Lost the port to someone else: try another.
                    }
                    panic!("sshd exited with {status}:\n{log}");
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("sshd did not listen on {port} within 10 s:\n{}", read(&d.join("sshd.log")));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("could not start sshd on a free port");
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn authorized_keys(&self) -> String {
        read(&self.path("authorized_keys"))
    }

    fn host_key(&self) -> String {
        read(&self.path("host_key.pub"))
    }

    fn project_key(&self, n: u8) -> String {
        read(&self.path(&format!("project_key{n}.pub"))).trim().to_string()
    }

    fn config(&self) -> SshConfig {
        let mut c = SshConfig::new(self.path("duffy_key"));
        c.user = self.user.clone();
        c.ports.insert(HOSTNAME.to_string(), self.port);
        c.authorized_keys = self.path("authorized_keys").display().to_string();
        c.connect_timeout = Duration::from_secs(5);
        c.command_timeout = Duration::from_secs(20);
        c
    }

    fn node(&self) -> Node {
        let mut n = NewNode::new(HOSTNAME, Arch::X86_64);
        n.ip = Some("127.0.0.1".into());
        let mut n = n.into_node(NodeId(7), Timestamp(0));
        n.host_key = Some(self.host_key());
        n
    }

    /// Whether `key` (a private key file) can log in and run `true`,
    /// checking the server's host key.
    fn can_login(&self, key: &str) -> bool {
        let known = self.path("client_known_hosts");
        std::fs::write(&known, format!("[127.0.0.1]:{} {}", self.port, self.host_key())).unwrap();
        Command::new("ssh")
            .args(["-F", "/dev/null", "-i"])
            .arg(self.path(key))
            .args(["-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none", "-o", "BatchMode=yes"])
            .args(["-o", "StrictHostKeyChecking=yes", "-o", "GlobalKnownHostsFile=/dev/null"])
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", known.display()))
            .args(["-o", "ConnectTimeout=5", "-o", "LogLevel=ERROR", "-p", &self.port.to_string(), "-l", &self.user])
            .args(["127.0.0.1", "true"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success()
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        // Let connection processes finish and be reaped by sshd first: once
        // the listener is gone they would be orphans, and in a container
        // PID 1 may never reap them.
        let deadline = Instant::now() + Duration::from_secs(2);
        while children_of(self.child.id()) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How many processes have `pid` as their parent.
fn children_of(pid: u32) -> usize {
    let Ok(entries) = std::fs::read_dir("/proc") else { return 0 };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter(|stat| {
            // pid (comm) state ppid ...
            stat.rsplit_once(") ")
                .and_then(|(_, rest)| rest.split(' ').nth(1))
                .and_then(|ppid| ppid.parse::<u32>().ok())
                == Some(pid)
        })
        .count()
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
    assert!(!sshd.can_login("project_key1"), "the project key must not work before prepare");
    let ctx = Arc::new(SshContextualizer::new(sshd.config()).unwrap());
    // Through the Installer the engine sees: install elsewhere, prepare here.
    let installer = Contextualized::new(Arc::new(CommandInstaller::new(CommandConfig::new("true"))), ctx);
    let p = project("infra", vec![sshd.project_key(1), format!("  {}\n", sshd.project_key(2))]);
    let ssid = session("4f6d2c1e-0000-4000-8000-000000000001");
    installer.prepare(&sshd.node(), &p, &ssid).await.unwrap();

    let text = sshd.authorized_keys();
    assert_eq!(blocks(&text), 1, "{text}");
    let expected_block = format!(
        "# BEGIN duffy session {ssid} project infra\n{}\n{}\n# END duffy session {ssid}\n",
        sshd.project_key(1),
        sshd.project_key(2)
    );
    assert!(text.ends_with(&expected_block), "{text}");
    // Lines from before are kept, first.
    assert!(text.starts_with(&read(&sshd.path("duffy_key.pub"))), "{text}");
    assert!(text.contains(&format!("{OPERATOR_LINE}\n")), "{text}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(sshd.path("authorized_keys")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // No temporary file left behind.
    let leftovers: Vec<_> = std::fs::read_dir(sshd.dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("duffy-new"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    assert!(sshd.can_login("project_key1"));
    assert!(sshd.can_login("project_key2"));
    assert!(sshd.can_login("duffy_key"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_session_replaces_the_block_and_remove_keys_clears_it() {
    let sshd = Sshd::start();
    let ctx = SshContextualizer::new(sshd.config()).unwrap();
    let node = sshd.node();
    let first = session("s-1");
    ctx.prepare(&node, &project("infra", vec![sshd.project_key(1), sshd.project_key(2)]), &first).await.unwrap();
    assert!(sshd.can_login("project_key1"));

    let second = session("s-2");
    ctx.prepare(&node, &project("other", vec![sshd.project_key(2)]), &second).await.unwrap();
    let text = sshd.authorized_keys();
    assert_eq!(blocks(&text), 1, "{text}");
    assert!(text.contains("# BEGIN duffy session s-2 project other\n"), "{text}");
    assert!(!text.contains("s-1"), "{text}");
    assert!(!text.contains(&sshd.project_key(1)), "{text}");
    assert!(text.contains(OPERATOR_LINE));
    assert!(!sshd.can_login("project_key1"), "the previous session's key must be gone");
    assert!(sshd.can_login("project_key2"));

    ctx.remove_keys(&node).await.unwrap();
    let text = sshd.authorized_keys();
    assert_eq!(blocks(&text), 0, "{text}");
    assert_eq!(text, format!("{}{OPERATOR_LINE}\n", read(&sshd.path("duffy_key.pub"))));
    assert!(!sshd.can_login("project_key2"));
    assert!(sshd.can_login("duffy_key"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_recorded_host_key_is_refused_and_nothing_is_written() {
    let sshd = Sshd::start();
    let ctx = SshContextualizer::new(sshd.config()).unwrap();
    let mut node = sshd.node();
    // Another machine's key: as after a reinstall nobody recorded, or a
    // machine in the middle.
    keygen(&sshd.path("impostor"), "impostor");
    node.host_key = Some(read(&sshd.path("impostor.pub")));
    let before = sshd.authorized_keys();
    let err = ctx.push_keys(&node, &project("infra", vec![sshd.project_key(1)]), &session("s-1")).await.unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, SshError::HostKeyMismatch { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(HOSTNAME) && msg.contains("host key"), "{msg}");
    assert!(msg.contains("Host key verification failed"), "ssh's own words missing: {msg}");
    assert_eq!(sshd.authorized_keys(), before);
    assert!(!sshd.can_login("project_key1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_ssh_down_fails_clearly_and_quickly() {
    let sshd = Sshd::start();
    let mut config = sshd.config();
    // Nothing listens there.
    config.ports.insert(HOSTNAME.to_string(), free_port());
    let ctx = SshContextualizer::new(config).unwrap();
    let started = Instant::now();
    let err =
        ctx.push_keys(&sshd.node(), &project("infra", vec![sshd.project_key(1)]), &session("s-1")).await.unwrap_err();
    eprintln!("{err}");
    assert!(started.elapsed() < Duration::from_secs(20), "took {:?}", started.elapsed());
    assert!(matches!(err, SshError::Connect { .. }), "{err:?}");
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
    let mut config = sshd.config();
    config.ports.insert(HOSTNAME.to_string(), port);
    config.connect_timeout = Duration::from_secs(1);
    config.command_timeout = Duration::from_secs(2);
    let ctx = SshContextualizer::new(config).unwrap();
    let started = Instant::now();
    let err =
        ctx.push_keys(&sshd.node(), &project("infra", vec![sshd.project_key(1)]), &session("s-1")).await.unwrap_err();
    eprintln!("{err}");
    assert!(started.elapsed() < Duration::from_secs(15), "took {:?}", started.elapsed());
    assert!(matches!(err, SshError::Connect { .. } | SshError::Timeout { .. }), "{err:?}");
    assert!(err.to_string().contains(HOSTNAME), "{err}");
    holder.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_project_keys_are_refused_before_connecting() {
    let sshd = Sshd::start();
    let mut config = sshd.config();
    // Connecting would fail with Spawn: getting InvalidProjectKey proves
    // nothing was attempted.
    config.ssh_program = PathBuf::from("/nonexistent/ssh");
    let ctx = SshContextualizer::new(config).unwrap();
    let node = sshd.node();
    let good = sshd.project_key(1);
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
    }
    // A project without keys, and names that would break the markers.
    let err = ctx.push_keys(&node, &project("infra", vec![]), &session("s-1")).await.unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, SshError::NoProjectKeys { .. }), "{err:?}");
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
    assert!(!Path::new("/tmp/pwned").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shell_characters_in_a_key_comment_are_written_as_data() {
    let sshd = Sshd::start();
    let ctx = SshContextualizer::new(sshd.config()).unwrap();
    let dir = sshd.dir.path().display().to_string();
    // A legal key line whose comment is full of shell syntax.
    let tricky =
        format!("{}'; touch {dir}/pwned1; echo '$(touch {dir}/pwned2)`touch {dir}/pwned3`", sshd.project_key(2));
    let p = project("infra", vec![sshd.project_key(1), tricky.clone()]);
    ctx.push_keys(&sshd.node(), &p, &session("s-1")).await.unwrap();
    let text = sshd.authorized_keys();
    assert!(text.lines().any(|l| l == tricky), "{text}");
    for f in ["pwned1", "pwned2", "pwned3"] {
        assert!(!sshd.path(f).exists(), "{f} was created: the key was run as code");
    }
    assert!(sshd.can_login("project_key2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_a_recorded_host_key() {
    let sshd = Sshd::start();
    let mut node = sshd.node();
    node.host_key = None;
    let p = project("infra", vec![sshd.project_key(1)]);

    // Required (the default): refused without connecting.
    let mut config = sshd.config();
    config.ssh_program = PathBuf::from("/nonexistent/ssh");
    let err = SshContextualizer::new(config).unwrap().push_keys(&node, &p, &session("s-1")).await.unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, SshError::NoHostKey { .. }), "{err:?}");
    assert!(err.to_string().contains(HOSTNAME) && err.to_string().contains("no SSH host key"), "{err}");

    // Not required: connects without checking.
    let mut config = sshd.config();
    config.require_host_key = false;
    SshContextualizer::new(config).unwrap().push_keys(&node, &p, &session("s-1")).await.unwrap();
    assert!(sshd.can_login("project_key1"));

    // A garbage recorded key is refused either way.
    node.host_key = Some("ssh-ed25519 garbage".into());
    let mut config = sshd.config();
    config.require_host_key = false;
    let err = SshContextualizer::new(config).unwrap().push_keys(&node, &p, &session("s-2")).await.unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, SshError::BadRecordedHostKey { .. }), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_duffys_key_refuses_the_login() {
    let sshd = Sshd::start();
    let mut config = sshd.config();
    keygen(&sshd.path("stranger"), "stranger");
    config.private_key = sshd.path("stranger");
    let ctx = SshContextualizer::new(config).unwrap();
    let before = sshd.authorized_keys();
    let err =
        ctx.push_keys(&sshd.node(), &project("infra", vec![sshd.project_key(1)]), &session("s-1")).await.unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, SshError::AuthFailed { .. }), "{err:?}");
    assert!(err.to_string().contains("Permission denied"), "{err}");
    assert_eq!(sshd.authorized_keys(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_remote_script_reports_its_stderr() {
    let sshd = Sshd::start();
    let mut config = sshd.config();
    // A directory where the file should be: the script cannot replace it.
    std::fs::create_dir(sshd.path("not_a_file")).unwrap();
    std::fs::write(sshd.path("not_a_file/keep"), "x").unwrap();
    config.authorized_keys = sshd.path("not_a_file").display().to_string();
    let ctx = SshContextualizer::new(config).unwrap();
    let err =
        ctx.push_keys(&sshd.node(), &project("infra", vec![sshd.project_key(1)]), &session("s-1")).await.unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, SshError::Remote { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(HOSTNAME) && msg.contains("not_a_file"), "{msg}");
}
