//! A real OpenSSH server for tests.
//!
//! Every failure is a test failure, so it panics instead of returning
//! errors. A missing OpenSSH fails loudly, saying what to install
//! (`apt-get install openssh-server openssh-client`), rather than skipping.
//!
//! [`Sshd::start`] runs `/usr/sbin/sshd` as the current user, listening on
//! 127.0.0.1 on a free port, with everything in its own temporary
//! directory:
//!
//! - its own host key (`host_key`, `host_key.pub`), Ed25519 by default, or
//!   of the [`KeyKind`] given to [`Sshd::start_with_host_key`]: it is the
//!   server's only host key, so the server offers only that algorithm;
//! - Duffy's provisioning key pair (`duffy_key`, `duffy_key.pub`);
//! - two project key pairs, not authorized yet (`project_key1`,
//!   `project_key2` and their `.pub`);
//! - an `authorized_keys` file (the server's only one) holding Duffy's
//!   public key and [`OPERATOR_LINE`], an operator's key that was there
//!   before Duffy.
//!
//! [`Sshd::start_sharing`] starts a second server with its own host key
//! that accepts the same keys and writes the same `authorized_keys` as a
//! first one: two "machines" of one farm, as Duffy sees them.
//!
//! The real `~/.ssh` is never touched. The server is killed, and its
//! directory removed, when the [`Sshd`] is dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use duffy_installers::SshConfig;

use crate::{free_port, require};

/// The OpenSSH server the tests run.
pub const SSHD: &str = "/usr/sbin/sshd";

/// What to do when OpenSSH is missing; part of every such panic message.
pub const INSTALL_HINT: &str = "apt-get install openssh-server openssh-client";

/// A line that was in `authorized_keys` before Duffy: Duffy must keep it.
pub const OPERATOR_LINE: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIByrgFoRodMpGoIGtVxnK/CTnXeEUb1KLNez/P0VJgK+ operator@bastion";

/// Panics, saying what to install, unless `sshd`, `ssh` and `ssh-keygen`
/// are available.
pub fn require_openssh() {
    require(SSHD, &["-V"], INSTALL_HINT);
    require("ssh", &["-V"], INSTALL_HINT);
    // Any option it does not know makes it print its usage and exit.
    require("ssh-keygen", &["--help"], INSTALL_HINT);
}

/// The name of the user the tests run as (`id -un`).
pub fn current_user() -> String {
    let out = Command::new("id").arg("-un").output().expect("id -un");
    assert!(out.status.success(), "id -un failed");
    String::from_utf8(out.stdout).expect("id -un printed UTF-8").trim().to_string()
}

/// A type of key `ssh-keygen` makes for the tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// `ssh-keygen -t ed25519`.
    Ed25519,
    /// `ssh-keygen -t rsa -b 4096`: a public key line of about 750 bytes
    /// (EL5 and EL6 machines have only RSA host keys).
    Rsa4096,
    /// `ssh-keygen -t ecdsa -b 521`: a public key line of about 270 bytes.
    EcdsaP521,
}

impl KeyKind {
    fn keygen_args(self) -> &'static [&'static str] {
        match self {
            KeyKind::Ed25519 => &["-t", "ed25519"],
            KeyKind::Rsa4096 => &["-t", "rsa", "-b", "4096"],
            KeyKind::EcdsaP521 => &["-t", "ecdsa", "-b", "521"],
        }
    }

    /// The OpenSSH key type name, e.g. `ssh-rsa`.
    pub fn key_type(self) -> &'static str {
        match self {
            KeyKind::Ed25519 => "ssh-ed25519",
            KeyKind::Rsa4096 => "ssh-rsa",
            KeyKind::EcdsaP521 => "ecdsa-sha2-nistp521",
        }
    }

    /// The name OpenSSH gives this type's host key files
    /// (`/etc/ssh/ssh_host_{name}_key.pub`).
    pub fn host_key_file_name(self) -> &'static str {
        match self {
            KeyKind::Ed25519 => "ed25519",
            KeyKind::Rsa4096 => "rsa",
            KeyKind::EcdsaP521 => "ecdsa",
        }
    }
}

/// Creates an ed25519 key pair without a passphrase: the private key at
/// `path`, the public one at `path` + `.pub`, with `comment`.
pub fn keygen(path: &Path, comment: &str) {
    keygen_kind(path, KeyKind::Ed25519, comment);
}

/// Creates a key pair of `kind` without a passphrase: the private key at
/// `path`, the public one at `path` + `.pub`, with `comment`.
pub fn keygen_kind(path: &Path, kind: KeyKind, comment: &str) {
    let status = Command::new("ssh-keygen")
        .arg("-q")
        .args(kind.keygen_args())
        .args(["-N", "", "-C", comment, "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("cannot run ssh-keygen: {e}; {INSTALL_HINT}"));
    assert!(status.success(), "ssh-keygen {kind:?} failed");
}

/// The contents of a text file, panicking with its path.
pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A running sshd on 127.0.0.1 with its own host key and an
/// `authorized_keys` holding Duffy's provisioning key and an operator's
/// key. See the module docs for the files in [`Sshd::dir`].
#[derive(Debug)]
pub struct Sshd {
    child: Child,
    port: u16,
    dir: TempDir,
    user: String,
    /// The server's `AuthorizedKeysFile`: in `dir`, or the first server's
    /// (see [`Sshd::start_sharing`]).
    authorized_keys: PathBuf,
}

impl Sshd {
    /// Generates the keys and starts the server, with an Ed25519 host key;
    /// returns once it accepts TCP connections. Panics (saying why, with
    /// the server's log) if it cannot.
    pub fn start() -> Sshd {
        Sshd::start_with_host_key(KeyKind::Ed25519)
    }

    /// As [`Sshd::start`], with a host key of `kind`, the server's only
    /// one: it offers only that host key algorithm.
    pub fn start_with_host_key(kind: KeyKind) -> Sshd {
        require_openssh();
        let dir = tempfile::tempdir().expect("temporary directory");
        let d = dir.path();
        keygen_kind(&d.join("host_key"), kind, "host");
        keygen(&d.join("duffy_key"), "duffy@farm");
        keygen(&d.join("project_key1"), "alice@laptop");
        keygen(&d.join("project_key2"), "bob@laptop");
        let authorized_keys = d.join("authorized_keys");
        std::fs::write(&authorized_keys, format!("{}{OPERATOR_LINE}\n", read(&d.join("duffy_key.pub"))))
            .expect("write authorized_keys");
        Sshd::spawn(dir, authorized_keys)
    }

    /// A second server, with its own host key of `kind`, that shares
    /// `first`'s keys (Duffy's and the projects', copied into its
    /// directory) and `first`'s `authorized_keys` file: what Duffy writes
    /// through either shows in [`Sshd::authorized_keys`] of both. Drop it
    /// before `first`.
    pub fn start_sharing(first: &Sshd, kind: KeyKind) -> Sshd {
        require_openssh();
        let dir = tempfile::tempdir().expect("temporary directory");
        let d = dir.path();
        keygen_kind(&d.join("host_key"), kind, "host");
        for name in ["duffy_key", "project_key1", "project_key2"] {
            for file in [name.to_string(), format!("{name}.pub")] {
                std::fs::copy(first.path(&file), d.join(&file)).expect("copy a key");
            }
        }
        Sshd::spawn(dir, first.authorized_keys_path())
    }

    fn spawn(dir: TempDir, authorized_keys: PathBuf) -> Sshd {
        let d = dir.path();
        let user = current_user();
        // Running as root, sshd wants its privilege separation directory.
        if user == "root" && !Path::new("/run/sshd").exists() {
            std::fs::create_dir_all("/run/sshd").expect("create /run/sshd");
        }
        for _attempt in 0..5 {
            let port = free_port();
            let config = d.join("sshd_config");
            std::fs::write(
                &config,
                format!(
                    "ListenAddress 127.0.0.1\nPort {port}\nHostKey {dir}/host_key\nAuthorizedKeysFile {authorized_keys}\n\
                     StrictModes no\nPidFile {dir}/sshd.pid\nUsePAM no\nPasswordAuthentication no\n\
                     KbdInteractiveAuthentication no\nPubkeyAuthentication yes\nPermitRootLogin prohibit-password\n\
                     LogLevel VERBOSE\n",
                    dir = d.display(),
                    authorized_keys = authorized_keys.display(),
                ),
            )
            .expect("write sshd_config");
            let log = std::fs::File::create(d.join("sshd.log")).expect("create sshd.log");
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
                    return Sshd { child, port, dir, user, authorized_keys };
                }
                if let Some(status) = child.try_wait().expect("wait for sshd") {
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

    /// The port it listens on (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its temporary directory: keys, configuration, `authorized_keys`,
    /// `sshd.log`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The user it runs as, and the only one who can log in.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// `name` in [`Sshd::dir`].
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The server's host public key file (`host_key.pub`).
    pub fn host_public_key_path(&self) -> PathBuf {
        self.path("host_key.pub")
    }

    /// The server's host public key line (`ssh-ed25519 AAAA… host`, or of
    /// the type it was started with), with its trailing newline.
    pub fn host_public_key(&self) -> String {
        read(&self.host_public_key_path())
    }

    /// Duffy's provisioning private key (its public half is authorized).
    pub fn duffy_private_key_path(&self) -> PathBuf {
        self.path("duffy_key")
    }

    /// Duffy's provisioning public key file.
    pub fn duffy_public_key_path(&self) -> PathBuf {
        self.path("duffy_key.pub")
    }

    /// Project key `n`'s private key (`n` is 1 or 2; not authorized until
    /// Duffy pushes it).
    pub fn project_private_key_path(&self, n: u8) -> PathBuf {
        assert!(matches!(n, 1 | 2), "there are project keys 1 and 2, not {n}");
        self.path(&format!("project_key{n}"))
    }

    /// Project key `n`'s public key file (`n` is 1 or 2).
    pub fn project_public_key_path(&self, n: u8) -> PathBuf {
        assert!(matches!(n, 1 | 2), "there are project keys 1 and 2, not {n}");
        self.path(&format!("project_key{n}.pub"))
    }

    /// Project key `n`'s public key line (`n` is 1 or 2), trimmed: as a
    /// project's `ssh_keys` entry.
    pub fn project_public_key(&self, n: u8) -> String {
        read(&self.project_public_key_path(n)).trim().to_string()
    }

    /// The server's `authorized_keys` file (`AuthorizedKeysFile`, an
    /// absolute path usable as [`SshConfig::authorized_keys`]).
    pub fn authorized_keys_path(&self) -> PathBuf {
        self.authorized_keys.clone()
    }

    /// The contents of the `authorized_keys` file.
    pub fn authorized_keys(&self) -> String {
        read(&self.authorized_keys_path())
    }

    /// An [`SshConfig`] that logs in to this server: Duffy's key, the
    /// current user, this `authorized_keys` (and `session-info` file, both
    /// in the server's directory), connect timeout 5 s, command
    /// timeout 20 s. No per-node `ports` yet: add one per node name, with
    /// [`Sshd::port`].
    pub fn ssh_config(&self) -> SshConfig {
        let mut c = SshConfig::new(self.duffy_private_key_path());
        c.user = self.user.clone();
        c.authorized_keys = self.authorized_keys_path().display().to_string();
        c.session_info = self.path("session-info").display().to_string();
        c.connect_timeout = Duration::from_secs(5);
        c.command_timeout = Duration::from_secs(20);
        c
    }

    /// Whether the private key at `key` can log in and run `true`, without
    /// checking the server's host key:
    /// `ssh -i KEY -o BatchMode=yes -o StrictHostKeyChecking=no
    /// -o UserKnownHostsFile=/dev/null -p PORT USER@127.0.0.1 true`, with
    /// no configuration file, agent or other identity that could log in
    /// instead of `key`.
    pub fn login_works(&self, key: &Path) -> bool {
        self.login(key, &["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"])
    }

    /// As [`Sshd::login_works`], also checking that the server presents
    /// its own host key (strict host key checking against a `known_hosts`
    /// holding only it).
    pub fn login_works_checking_host_key(&self, key: &Path) -> bool {
        let known = self.path("client_known_hosts");
        std::fs::write(&known, format!("[127.0.0.1]:{} {}", self.port, self.host_public_key()))
            .expect("write client_known_hosts");
        let known_opt = format!("UserKnownHostsFile={}", known.display());
        self.login(key, &["-o", "StrictHostKeyChecking=yes", "-o", &known_opt])
    }

    fn login(&self, key: &Path, host_key_options: &[&str]) -> bool {
        Command::new("ssh")
            .args(["-F", "/dev/null", "-i"])
            .arg(key)
            .args(["-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none", "-o", "BatchMode=yes"])
            .args(["-o", "GlobalKnownHostsFile=/dev/null"])
            .args(host_key_options)
            .args(["-o", "ConnectTimeout=5", "-o", "LogLevel=ERROR", "-p", &self.port.to_string()])
            .arg(format!("{}@127.0.0.1", self.user))
            .arg("true")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap_or_else(|e| panic!("cannot run ssh: {e}; {INSTALL_HINT}"))
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
