#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The command installer with real shell scripts.
//!
//! Scripts are run as `sh SCRIPT` rather than executed directly: a script
//! written and executed at once from a multi-threaded test process can hit
//! ETXTBSY when another thread forks while the file is open for writing.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use duffy_core::model::NewNode;
use duffy_core::{Arch, Installer, Node, NodeId, PoolKey, Timestamp};
use duffy_installers::{CommandConfig, CommandError, CommandInstaller};

const HOST_KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIByrgFoRodMpGoIGtVxnK/CTnXeEUb1KLNez/P0VJgK+";

fn node() -> Node {
    let mut n = NewNode::new("n1.example.org", Arch::X86_64);
    n.ip = Some("10.0.0.11".into());
    n.bmc = Some("10.1.0.11".into());
    n.flavor = Some("medium".into());
    n.into_node(NodeId(1), Timestamp(0))
}

fn image() -> PoolKey {
    PoolKey::new("9", Arch::X86_64, Some("medium".into()))
}

/// Writes `body` as a script in `dir` and returns an installer running it
/// with `sh`, with `timeout`.
fn installer(dir: &Path, body: &str, timeout: Duration) -> CommandInstaller {
    let script = dir.join("install.sh");
    std::fs::write(&script, body).unwrap();
    let mut config = CommandConfig::new("sh");
    config.args = vec![script.display().to_string(), dir.display().to_string()];
    config.timeout = timeout;
    CommandInstaller::new(config)
}

/// Whether a process is still running (a zombie counts as gone: in a
/// container PID 1 may not reap re-parented processes).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat.rsplit_once(") ").and_then(|(_, rest)| rest.chars().next());
            state != Some('Z')
        }
        Err(_) => false,
    }
}

fn wait_dead(pid: u32, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(pid) {
        assert!(Instant::now() < deadline, "{what} (pid {pid}) still alive");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn read_pid(path: PathBuf) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(pid) = std::fs::read_to_string(&path).ok().and_then(|s| s.trim().parse().ok()) {
            return pid;
        }
        assert!(Instant::now() < deadline, "{} never written", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn success_with_host_key() {
    let dir = tempfile::tempdir().unwrap();
    let body = format!(
        "cat >/dev/null\necho 'PLAY RECAP' >&2\nprintf '%s\\n' '{{\"host_key\": \"{HOST_KEY} root@n1\", \"extra\": 1}}'\n"
    );
    let inst = installer(dir.path(), &body, Duration::from_secs(30));
    let out = inst.install(&node(), &image()).await.unwrap();
    // Recorded without the machine's comment.
    assert_eq!(out.host_key.as_deref(), Some(HOST_KEY));
}

#[tokio::test]
async fn success_with_empty_output() {
    let dir = tempfile::tempdir().unwrap();
    let inst = installer(dir.path(), "exit 0\n", Duration::from_secs(30));
    let out = inst.install(&node(), &image()).await.unwrap();
    assert_eq!(out.host_key, None);
    // Whitespace only, and an object without host_key, are the same.
    let inst = installer(dir.path(), "echo; echo '  '\n", Duration::from_secs(30));
    assert_eq!(inst.install(&node(), &image()).await.unwrap().host_key, None);
    let inst = installer(dir.path(), "echo '{\"host_key\": null}'\n", Duration::from_secs(30));
    assert_eq!(inst.install(&node(), &image()).await.unwrap().host_key, None);
}

#[tokio::test]
async fn failure_keeps_exit_status_and_stderr_tail() {
    let dir = tempfile::tempdir().unwrap();
    // 6 KiB of noise first, then the interesting part, with a multi-byte
    // character near the cut.
    let body = "i=0\nwhile [ $i -lt 96 ]; do echo 'noise noise noise noise noise noise noise noise noise noise é' >&2; i=$((i+1)); done\n\
                echo 'fatal: disk /dev/sda on fire' >&2\nexit 3\n";
    let inst = installer(dir.path(), body, Duration::from_secs(30));
    let err = inst.run(&node(), &image()).await.unwrap_err();
    let CommandError::Failed { hostname, status, stderr_tail, .. } = &err else { panic!("{err:?}") };
    assert_eq!(hostname, "n1.example.org");
    assert_eq!(status, "exit status 3");
    assert!(stderr_tail.ends_with("fatal: disk /dev/sda on fire"), "{stderr_tail}");
    assert!(stderr_tail.len() <= 2048 + 8, "tail is {} bytes", stderr_tail.len());
    assert!(stderr_tail.len() > 1500, "tail is {} bytes", stderr_tail.len());
    // Through the trait: the message for the node's history.
    let msg = inst.install(&node(), &image()).await.unwrap_err().message;
    assert!(msg.contains("n1.example.org") && msg.contains("exit status 3") && msg.contains("on fire"), "{msg}");
}

#[tokio::test]
async fn garbage_output_is_a_failure() {
    let dir = tempfile::tempdir().unwrap();
    let inst = installer(dir.path(), "echo 'ok: [n1] => changed=1'\n", Duration::from_secs(30));
    let msg = inst.install(&node(), &image()).await.unwrap_err().message;
    assert!(msg.contains("exited 0 but its output was not JSON"), "{msg}");
    assert!(msg.contains("changed=1"), "{msg}");

    let inst = installer(dir.path(), "echo '[1, 2]'\n", Duration::from_secs(30));
    let msg = inst.install(&node(), &image()).await.unwrap_err().message;
    assert!(msg.contains("not a JSON object"), "{msg}");

    let inst = installer(dir.path(), "echo '{\"host_key\": \"ssh-ed25519 bm90IGEga2V5\"}'\n", Duration::from_secs(30));
    let err = inst.run(&node(), &image()).await.unwrap_err();
    assert!(matches!(err, CommandError::BadHostKey { .. }), "{err:?}");
    assert!(err.to_string().contains("invalid SSH host key"), "{err}");
}

#[tokio::test]
async fn receives_node_as_json_on_stdin_and_in_env() {
    let dir = tempfile::tempdir().unwrap();
    let body = "out=$1\ncat > \"$out/stdin.json\"\nenv | grep -E '^(DUFFY_|EXTRA_)' | sort > \"$out/env.txt\"\n";
    let mut inst = installer(dir.path(), body, Duration::from_secs(30));
    let mut config = inst.config().clone();
    config.env.insert("EXTRA_SETTING".into(), "from-config".into());
    inst = CommandInstaller::new(config);
    inst.install(&node(), &image()).await.unwrap();

    let stdin: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("stdin.json")).unwrap()).unwrap();
    assert_eq!(
        stdin,
        serde_json::json!({
            "hostname": "n1.example.org",
            "ip": "10.0.0.11",
            "arch": "x86_64",
            "flavor": "medium",
            "bmc": "10.1.0.11",
            "image": {"release": "9", "arch": "x86_64", "flavor": "medium"},
        })
    );
    let env = std::fs::read_to_string(dir.path().join("env.txt")).unwrap();
    for line in [
        "DUFFY_HOSTNAME=n1.example.org",
        "DUFFY_IP=10.0.0.11",
        "DUFFY_RELEASE=9",
        "DUFFY_ARCH=x86_64",
        "DUFFY_FLAVOR=medium",
        "DUFFY_IMAGE_ARCH=x86_64",
        "DUFFY_IMAGE_FLAVOR=medium",
        "DUFFY_BMC=10.1.0.11",
        "EXTRA_SETTING=from-config",
    ] {
        assert!(env.lines().any(|l| l == line), "{line} missing from:\n{env}");
    }

    // An i386 image on x86_64 hardware, no address known.
    let mut n = node();
    n.ip = None;
    let img = PoolKey::new("6", Arch::I386, Some("medium".into()));
    inst.install(&n, &img).await.unwrap();
    let env = std::fs::read_to_string(dir.path().join("env.txt")).unwrap();
    assert!(env.lines().any(|l| l == "DUFFY_IP="), "{env}");
    assert!(env.lines().any(|l| l == "DUFFY_ARCH=x86_64"), "{env}");
    assert!(env.lines().any(|l| l == "DUFFY_IMAGE_ARCH=i386"), "{env}");
    let stdin: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("stdin.json")).unwrap()).unwrap();
    assert_eq!(stdin["ip"], serde_json::Value::Null);
    assert_eq!(stdin["image"]["arch"], "i386");
}

/// A script that records its own pid and a grandchild's, then sleeps.
const SLEEPER: &str = "out=$1\nsleep 300 &\necho $! > \"$out/grandchild.pid\"\necho $$ > \"$out/child.pid\"\n\
                       echo 'started, now hanging' >&2\nsleep 300\n";

#[tokio::test]
async fn timeout_kills_the_whole_process_group() {
    let dir = tempfile::tempdir().unwrap();
    let inst = installer(dir.path(), SLEEPER, Duration::from_secs(1));
    let started = Instant::now();
    let err = inst.run(&node(), &image()).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(20), "took {:?}", started.elapsed());
    let CommandError::Timeout { after, stderr_tail, .. } = &err else { panic!("{err:?}") };
    assert_eq!(*after, Duration::from_secs(1));
    assert!(stderr_tail.contains("started, now hanging"), "{stderr_tail}");
    assert!(err.to_string().contains("timed out"), "{err}");
    wait_dead(read_pid(dir.path().join("child.pid")), "the command");
    wait_dead(read_pid(dir.path().join("grandchild.pid")), "the command's child");
}

#[tokio::test]
async fn dropping_the_install_kills_the_whole_process_group() {
    let dir = tempfile::tempdir().unwrap();
    let inst = installer(dir.path(), SLEEPER, Duration::from_secs(600));
    let (node, image) = (node(), image());
    let fut = inst.install(&node, &image);
    // The reconciler's own deadline cancels the install.
    assert!(tokio::time::timeout(Duration::from_secs(1), fut).await.is_err());
    wait_dead(read_pid(dir.path().join("child.pid")), "the command");
    wait_dead(read_pid(dir.path().join("grandchild.pid")), "the command's child");
}

#[tokio::test]
async fn leftover_background_process_does_not_hold_the_install() {
    let dir = tempfile::tempdir().unwrap();
    // Exits at once, but a background child keeps stdout open.
    let body = "out=$1\nsleep 300 &\necho $! > \"$out/leftover.pid\"\necho '{}'\nexit 0\n";
    let inst = installer(dir.path(), body, Duration::from_secs(60));
    let started = Instant::now();
    let out = inst.install(&node(), &image()).await.unwrap();
    assert_eq!(out.host_key, None);
    assert!(started.elapsed() < Duration::from_secs(20), "took {:?}", started.elapsed());
    wait_dead(read_pid(dir.path().join("leftover.pid")), "the leftover process");
}

#[tokio::test]
async fn missing_program_is_a_clear_error() {
    let inst = CommandInstaller::new(CommandConfig::new("/nonexistent/duffy-install"));
    let err = inst.run(&node(), &image()).await.unwrap_err();
    assert!(matches!(err, CommandError::Spawn { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("/nonexistent/duffy-install") && msg.contains("n1.example.org"), "{msg}");
}

#[test]
fn config_deserializes_with_defaults() {
    let c: CommandConfig = toml::from_str("program = \"/usr/local/bin/install-node\"").unwrap();
    assert_eq!(c.timeout, Duration::from_secs(3600));
    assert!(c.args.is_empty() && c.env.is_empty());
    let c: CommandConfig = toml::from_str(
        "program = \"ansible-wrapper\"\nargs = [\"-v\"]\ntimeout = \"45m\"\n[env]\nANSIBLE_CONFIG = \"/etc/a.cfg\"",
    )
    .unwrap();
    assert_eq!(c.timeout, Duration::from_secs(45 * 60));
    assert_eq!(c.env.get("ANSIBLE_CONFIG").map(String::as_str), Some("/etc/a.cfg"));
    assert!(toml::from_str::<CommandConfig>("program = \"x\"\ntimeout_s = 3").is_err());
    // Environment values may be secrets: Debug does not show them.
    let debug = format!("{c:?}");
    assert!(debug.contains("ANSIBLE_CONFIG") && !debug.contains("/etc/a.cfg"), "{debug}");
}
