//! Preparing an installed node for a project: its SSH public keys in the
//! node's `authorized_keys`, pushed over the system OpenSSH client.
//!
//! [`SshContextualizer`] logs in with Duffy's provisioning key (installed
//! for root by the kickstart), checking the node's SSH host key against the
//! one its install recorded (`Node::host_key`), and runs a POSIX `sh`
//! script fed on stdin. The script removes any previous Duffy block from
//! `authorized_keys` and appends the project's keys between marker lines:
//!
//! ```text
//! # BEGIN duffy session <ssid> project <name>
//! ssh-ed25519 AAAA… alice@laptop
//! # END duffy session <ssid>
//! ```
//!
//! Lines outside Duffy blocks (the provisioning key among them) are kept.
//! The new file is written next to the old one and renamed over it, mode
//! 0600; the directory is created with mode 0700 if missing.
//!
//! Keys never reach a shell as code: every key is validated as a single
//! OpenSSH public key line before anything connects, and the block is
//! passed as the body of a here-document with a quoted, random delimiter.
//!
//! Failures are classified for the engine ([`SshError::blame`]): only
//! those about the node (unreachable, wrong host key, timed out, refused
//! the provisioning key, the remote script failed) fail the node; a
//! project without usable keys is refused before any node is claimed
//! ([`Contextualizer::check_project`]).

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use duffy_core::model::validate_token;
use duffy_core::{Blame, Contextualizer, Node, PrepareError, Project, SessionContext, SessionId};
use rand::RngCore;
use serde::Deserialize;
use tokio::process::Command;

use crate::keys::{KeyError, PublicKey};
use crate::process::{self, RunError, describe_status};
use crate::util::one_line;

/// How Duffy logs in to its nodes.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SshConfig {
    /// Duffy's provisioning private key (the public half is in the PXE
    /// configuration's `provisioning_public_key`). Only its path is ever
    /// logged.
    pub private_key: PathBuf,
    /// The user to log in as. Default `root`.
    #[serde(default = "default_user")]
    pub user: String,
    /// The SSH port. Default 22.
    #[serde(default = "default_port")]
    pub port: u16,
    /// Per-node port overrides, by host name (for tests and odd nodes).
    #[serde(default)]
    pub ports: BTreeMap<String, u16>,
    /// The `authorized_keys` file on the node: absolute, or relative to the
    /// user's home. Default `.ssh/authorized_keys`. Letters, digits and
    /// `._-/` only.
    #[serde(default = "default_authorized_keys")]
    pub authorized_keys: String,
    /// Where the session's description is written on every node it is
    /// prepared for (session id, project, hosts, expiry; the user document
    /// tells jobs to find their session id there): absolute, or relative
    /// to the user's home. Default `/root/session-info`. Letters, digits
    /// and `._-/` only.
    #[serde(default = "default_session_info")]
    pub session_info: String,
    /// How long connecting may take (`ssh -o ConnectTimeout`, whole
    /// seconds, at least 1). Default 10 s.
    #[serde(default = "default_connect_timeout", deserialize_with = "duffy_core::time::serde_duration::deserialize")]
    pub connect_timeout: Duration,
    /// How long the remote script may run once connected. Default 60 s.
    /// The whole `ssh` run is killed after `connect_timeout +
    /// command_timeout`.
    #[serde(default = "default_command_timeout", deserialize_with = "duffy_core::time::serde_duration::deserialize")]
    pub command_timeout: Duration,
    /// The OpenSSH client. Default `ssh`.
    #[serde(default = "default_ssh_program")]
    pub ssh_program: PathBuf,
    /// Refuse to connect to a node whose install recorded no host key.
    /// Default `true`. With `false`, such a node's host key is not checked
    /// at all (a recorded key always is).
    #[serde(default = "default_true")]
    pub require_host_key: bool,
}

fn default_user() -> String {
    "root".to_string()
}
fn default_port() -> u16 {
    22
}
fn default_authorized_keys() -> String {
    ".ssh/authorized_keys".to_string()
}
fn default_session_info() -> String {
    "/root/session-info".to_string()
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_command_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_ssh_program() -> PathBuf {
    PathBuf::from("ssh")
}
fn default_true() -> bool {
    true
}

impl SshConfig {
    /// A configuration with the defaults, logging in with `private_key`.
    pub fn new(private_key: impl Into<PathBuf>) -> Self {
        SshConfig {
            private_key: private_key.into(),
            user: default_user(),
            port: default_port(),
            ports: BTreeMap::new(),
            authorized_keys: default_authorized_keys(),
            session_info: default_session_info(),
            connect_timeout: default_connect_timeout(),
            command_timeout: default_command_timeout(),
            ssh_program: default_ssh_program(),
            require_host_key: true,
        }
    }
}

/// Why a node could not be prepared. Every message about a node names
/// it; those from `ssh` carry the tail of its stderr. Those about the
/// project say how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum SshError {
    /// The configuration is invalid.
    #[error("invalid SSH configuration: {0}")]
    Config(String),
    /// A project key is not a single-line OpenSSH public key; nothing was
    /// sent.
    #[error(
        "SSH key #{index} of project {project:?} is refused: {source}; \
         replace the project's keys with `duffy project set {project} --ssh-keys FILE`"
    )]
    InvalidProjectKey {
        /// The project whose key it is.
        project: String,
        /// 1-based position of the key in the project's list.
        index: usize,
        /// What is wrong with the key.
        #[source]
        source: KeyError,
    },
    /// The project has no SSH keys: nobody could use the node.
    #[error(
        "project {project:?} has no SSH keys, so nobody could log in to its nodes; \
         add them with `duffy project set {project} --ssh-keys FILE`"
    )]
    NoProjectKeys {
        /// The project without keys.
        project: String,
    },
    /// A project or session name that goes into the marker lines is
    /// invalid.
    #[error("{reason}")]
    InvalidName {
        /// Which name, and the rule it breaks.
        reason: String,
    },
    /// The node's address cannot be passed to ssh.
    #[error("preparing {hostname}: invalid address {address:?}")]
    InvalidAddress {
        /// The node's host name.
        hostname: String,
        /// The address (shortened to one line).
        address: String,
    },
    /// The node has no recorded host key and the configuration requires one.
    #[error(
        "preparing {hostname}: no SSH host key recorded for the node (its install reported none); refusing to connect"
    )]
    NoHostKey {
        /// The node's host name.
        hostname: String,
    },
    /// The node's recorded host key is not a valid host key.
    #[error("preparing {hostname}: the recorded SSH host key is invalid: {source}")]
    BadRecordedHostKey {
        /// The node's host name.
        hostname: String,
        /// What is wrong with the recorded key.
        #[source]
        source: KeyError,
    },
    /// A local I/O error (the temporary `known_hosts` file).
    #[error("preparing {hostname}: {what}: {source}")]
    Local {
        /// The node's host name.
        hostname: String,
        /// The step that failed (writing the temporary `known_hosts`, …).
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The host key the node presented is not the recorded one.
    #[error(
        "preparing {hostname}: host key verification failed for {target} (the node's SSH host key is not the one recorded at install): {stderr}"
    )]
    HostKeyMismatch {
        /// The node's host name.
        hostname: String,
        /// `user@addr:port`.
        target: String,
        /// The tail of ssh's stderr.
        stderr: String,
    },
    /// The node refused Duffy's provisioning key.
    #[error("preparing {hostname}: {target} refused Duffy's provisioning key: {stderr}")]
    AuthFailed {
        /// The node's host name.
        hostname: String,
        /// `user@addr:port`.
        target: String,
        /// The tail of ssh's stderr.
        stderr: String,
    },
    /// Could not connect (refused, unreachable, timed out, name not
    /// resolved, …), or ssh failed for another reason.
    #[error("preparing {hostname}: cannot connect to {target}: {stderr}")]
    Connect {
        /// The node's host name.
        hostname: String,
        /// `user@addr:port`.
        target: String,
        /// The tail of ssh's stderr.
        stderr: String,
    },
    /// The whole run took longer than `connect_timeout + command_timeout`.
    #[error("preparing {hostname}: ssh to {target} timed out after {after:?} and was killed: {stderr}")]
    Timeout {
        /// The node's host name.
        hostname: String,
        /// `user@addr:port`.
        target: String,
        /// `connect_timeout + command_timeout`, which it ran past.
        after: Duration,
        /// The tail of ssh's stderr.
        stderr: String,
    },
    /// The remote script failed.
    #[error("preparing {hostname}: updating {path} on {target} failed ({status}); stderr: {stderr}")]
    Remote {
        /// The node's host name.
        hostname: String,
        /// `user@addr:port`.
        target: String,
        /// The `authorized_keys` path.
        path: String,
        /// How the script ended.
        status: String,
        /// The tail of its stderr.
        stderr: String,
    },
    /// The ssh client could not be run.
    #[error("preparing {hostname}: cannot run {program:?}: {source}")]
    Spawn {
        /// The node's host name.
        hostname: String,
        /// The ssh client that could not be run (`ssh_program`).
        program: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl SshError {
    /// Whose fault the failure is: the node's (it is Failed), the
    /// project's (refused, the caller is told what to fix), or Duffy's own
    /// side (an operator must look). No node is blamed for a failure any
    /// node would have.
    pub fn blame(&self) -> Blame {
        match self {
            SshError::InvalidProjectKey { .. } | SshError::NoProjectKeys { .. } | SshError::InvalidName { .. } => {
                Blame::Project
            }
            SshError::Config(_) | SshError::Local { .. } | SshError::Spawn { .. } => Blame::Service,
            SshError::InvalidAddress { .. }
            | SshError::NoHostKey { .. }
            | SshError::BadRecordedHostKey { .. }
            | SshError::HostKeyMismatch { .. }
            | SshError::AuthFailed { .. }
            | SshError::Connect { .. }
            | SshError::Timeout { .. }
            | SshError::Remote { .. } => Blame::Node,
        }
    }
}

impl From<SshError> for PrepareError {
    fn from(e: SshError) -> Self {
        PrepareError::new(e.blame(), e.to_string())
    }
}

/// What the remote script prints last when it succeeded.
const OK_MARKER: &str = "duffy-authorized-keys-updated";

/// A [`Contextualizer`] that installs the project's SSH keys over SSH. See
/// the module docs.
#[derive(Debug, Clone)]
pub struct SshContextualizer {
    config: SshConfig,
}

impl SshContextualizer {
    /// Checks `config` (user name, `authorized_keys` path, timeouts).
    pub fn new(config: SshConfig) -> Result<Self, SshError> {
        let user_ok = !config.user.is_empty()
            && config.user.len() <= 32
            && !config.user.starts_with('-')
            && config.user.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !user_ok {
            return Err(SshError::Config(format!("user {:?} is not a valid user name", one_line(&config.user, 40))));
        }
        // Both paths go into the remote script between single quotes: no
        // character that could end the quote may appear.
        for (what, path) in [("authorized_keys", &config.authorized_keys), ("session_info", &config.session_info)] {
            let path_ok = !path.is_empty()
                && !path.ends_with('/')
                && path.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b))
                && !path.split('/').any(|c| c == "..");
            if !path_ok {
                return Err(SshError::Config(format!(
                    "{what} {:?} must be a path of letters, digits and '._-/', without '..'",
                    one_line(path, 200)
                )));
            }
        }
        if config.connect_timeout.is_zero() || config.command_timeout.is_zero() {
            return Err(SshError::Config("connect_timeout and command_timeout must be more than zero".to_string()));
        }
        Ok(SshContextualizer { config })
    }

    /// The user, keys, timeouts and ssh client it connects with.
    pub fn config(&self) -> &SshConfig {
        &self.config
    }

    /// Replaces any Duffy block in `node`'s `authorized_keys` with
    /// `project`'s keys for `session`. [`Contextualizer::prepare`] with a
    /// typed error.
    pub async fn push_keys(&self, node: &Node, project: &Project, session: &SessionId) -> Result<(), SshError> {
        self.push(node, project, session, None).await
    }

    /// [`SshContextualizer::push_keys`] for the session `session`
    /// describes, and writes its description to the node's
    /// `session_info` file, in the same login. [`Contextualizer::prepare_session`]
    /// with a typed error.
    pub async fn push_session(&self, node: &Node, project: &Project, session: &SessionContext) -> Result<(), SshError> {
        self.push(node, project, &session.id, Some(session)).await
    }

    async fn push(
        &self,
        node: &Node,
        project: &Project,
        session: &SessionId,
        context: Option<&SessionContext>,
    ) -> Result<(), SshError> {
        let hostname = &node.hostname;
        let keys = project_keys(project)?;
        validate_token("session id", session.as_str(), 64)
            .map_err(|e| SshError::InvalidName { reason: e.to_string() })?;
        let mut block = format!("# BEGIN duffy session {session} project {}\n", project.name);
        for k in &keys {
            block.push_str(&k.to_string());
            block.push('\n');
        }
        block.push_str(&format!("# END duffy session {session}\n"));
        let info = context.map(session_info).transpose()?;
        let what = format!("{} key(s) of project {}", keys.len(), project.name);
        self.run_script(node, Some(&block), info.as_deref(), &what).await?;
        tracing::info!(node = %hostname, project = %project.name, session = %session, keys = keys.len(),
            session_info = info.is_some(), "project SSH keys installed");
        Ok(())
    }

    /// Removes any Duffy block from `node`'s `authorized_keys`, keeping the
    /// rest of the file.
    pub async fn remove_keys(&self, node: &Node) -> Result<(), SshError> {
        self.run_script(node, None, None, "removal of the Duffy block").await?;
        tracing::info!(node = %node.hostname, "Duffy SSH key block removed");
        Ok(())
    }

    async fn run_script(
        &self,
        node: &Node,
        block: Option<&str>,
        info: Option<&str>,
        what: &str,
    ) -> Result<(), SshError> {
        let hostname = node.hostname.clone();
        let cfg = &self.config;
        let addr = node.ip.as_deref().filter(|ip| !ip.is_empty()).unwrap_or(&node.hostname);
        let addr_ok = !addr.is_empty()
            && !addr.starts_with('-')
            && addr.bytes().all(|b| b.is_ascii_alphanumeric() || b".:-%".contains(&b));
        if !addr_ok {
            return Err(SshError::InvalidAddress { hostname: hostname.clone(), address: one_line(addr, 80) });
        }
        let port = cfg.ports.get(&node.hostname).copied().unwrap_or(cfg.port);
        let target = format!("{}@{addr}:{port}", cfg.user);

        // Host key checking: a known_hosts file holding only the recorded key.
        let recorded = match node.host_key.as_deref().map(str::trim).filter(|k| !k.is_empty()) {
            Some(k) => Some(
                PublicKey::parse_host_key(k)
                    .map_err(|source| SshError::BadRecordedHostKey { hostname: hostname.clone(), source })?,
            ),
            None if cfg.require_host_key => return Err(SshError::NoHostKey { hostname }),
            None => None,
        };
        let known_hosts = match &recorded {
            Some(key) => {
                Some(TempFile::create("duffy-known-hosts", &known_hosts_line(addr, port, key)).map_err(|source| {
                    SshError::Local { hostname: hostname.clone(), what: "writing a known_hosts file".into(), source }
                })?)
            }
            None => {
                tracing::warn!(node = %hostname, "no recorded SSH host key; connecting without checking it");
                None
            }
        };

        let connect_secs = cfg.connect_timeout.as_secs_f64().ceil().max(1.0) as u64;
        let mut cmd = Command::new(&cfg.ssh_program);
        cmd.arg("-F").arg("/dev/null").arg("-i").arg(&cfg.private_key);
        let mut opts = vec![
            "IdentitiesOnly=yes".to_string(),
            "IdentityAgent=none".to_string(),
            "BatchMode=yes".to_string(),
            "PasswordAuthentication=no".to_string(),
            "KbdInteractiveAuthentication=no".to_string(),
            "GlobalKnownHostsFile=/dev/null".to_string(),
            "UpdateHostKeys=no".to_string(),
            "CheckHostIP=no".to_string(),
            "ControlMaster=no".to_string(),
            "ControlPath=none".to_string(),
            "RequestTTY=no".to_string(),
            "LogLevel=ERROR".to_string(),
            format!("ConnectTimeout={connect_secs}"),
            "ServerAliveInterval=15".to_string(),
            "ServerAliveCountMax=3".to_string(),
        ];
        match &known_hosts {
            Some(file) => {
                opts.push("StrictHostKeyChecking=yes".to_string());
                opts.push(format!("UserKnownHostsFile={}", file.0.display()));
            }
            None => {
                opts.push("StrictHostKeyChecking=no".to_string());
                opts.push("UserKnownHostsFile=/dev/null".to_string());
            }
        }
        for o in &opts {
            cmd.arg("-o").arg(o);
        }
        cmd.arg("-p").arg(port.to_string()).arg("-l").arg(&cfg.user).arg("--").arg(addr).arg("sh -s");

        let mut script = script(&cfg.authorized_keys, block, &random_delimiter());
        if let Some(info) = info {
            script = with_session_info(&script, &cfg.session_info, info, &random_delimiter());
        }
        let limit = cfg.connect_timeout + cfg.command_timeout;
        tracing::info!(node = %hostname, target = %target, key_file = %cfg.private_key.display(), "ssh: {what}");
        let out = match process::run(cmd, script.as_bytes(), limit, 64 * 1024).await {
            Ok(out) => out,
            Err(RunError::Spawn(source)) => {
                return Err(SshError::Spawn { hostname, program: cfg.ssh_program.display().to_string(), source });
            }
            Err(RunError::Wait(source)) => {
                return Err(SshError::Local { hostname, what: "waiting for ssh".into(), source });
            }
            Err(RunError::TimedOut { stderr_tail }) => {
                return Err(SshError::Timeout { hostname, target, after: limit, stderr: condense(&stderr_tail) });
            }
        };
        drop(known_hosts);
        let stderr = condense(&out.stderr_tail);
        let code = out.status.code();
        if code == Some(255) {
            let err = if stderr.contains("Host key verification failed")
                || stderr.contains("REMOTE HOST IDENTIFICATION HAS CHANGED")
            {
                SshError::HostKeyMismatch { hostname, target, stderr }
            } else if stderr.contains("Permission denied") {
                SshError::AuthFailed { hostname, target, stderr }
            } else {
                SshError::Connect { hostname, target, stderr }
            };
            tracing::warn!(error = %err, "ssh failed");
            return Err(err);
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() || !stdout.lines().any(|l| l.trim() == OK_MARKER) {
            let status = if out.status.success() {
                "the script did not finish".to_string()
            } else {
                describe_status(&out.status)
            };
            let err = SshError::Remote { hostname, target, path: cfg.authorized_keys.clone(), status, stderr };
            tracing::warn!(error = %err, "updating authorized_keys failed");
            return Err(err);
        }
        Ok(())
    }
}

/// The project's keys, each validated as one OpenSSH public key line, and
/// its name checked for the marker lines: everything about the project
/// that can be known before connecting to any node.
fn project_keys(project: &Project) -> Result<Vec<PublicKey>, SshError> {
    if project.ssh_keys.is_empty() {
        return Err(SshError::NoProjectKeys { project: project.name.clone() });
    }
    validate_token("project", &project.name, 64).map_err(|e| SshError::InvalidName { reason: e.to_string() })?;
    project
        .ssh_keys
        .iter()
        .enumerate()
        .map(|(i, k)| {
            PublicKey::parse(k).map_err(|source| SshError::InvalidProjectKey {
                project: project.name.clone(),
                index: i + 1,
                source,
            })
        })
        .collect()
}

#[async_trait]
impl Contextualizer for SshContextualizer {
    /// A project with no keys, or with a key that is not a valid OpenSSH
    /// public key line, is refused before any node is claimed.
    fn check_project(&self, project: &Project) -> Result<(), PrepareError> {
        project_keys(project).map(|_| ()).map_err(PrepareError::from)
    }

    async fn prepare(&self, node: &Node, project: &Project, session: &SessionId) -> Result<(), PrepareError> {
        Ok(self.push_keys(node, project, session).await?)
    }

    async fn prepare_session(
        &self,
        node: &Node,
        project: &Project,
        session: &SessionContext,
    ) -> Result<(), PrepareError> {
        Ok(self.push_session(node, project, session).await?)
    }
}

/// ssh's stderr on one line: banner lines of `@` dropped, lines joined
/// with ` | `.
fn condense(stderr: &str) -> String {
    let lines: Vec<&str> =
        stderr.lines().map(str::trim).filter(|l| !l.is_empty() && !l.chars().all(|c| c == '@')).collect();
    if lines.is_empty() { "(no output from ssh)".to_string() } else { one_line(&lines.join(" | "), 2048) }
}

/// The `known_hosts` line for `key` at `addr:port`, as OpenSSH looks it up:
/// the bare address on port 22, `[addr]:port` otherwise.
fn known_hosts_line(addr: &str, port: u16, key: &PublicKey) -> String {
    if port == 22 {
        format!("{addr} {}\n", key.without_comment())
    } else {
        format!("[{addr}]:{port} {}\n", key.without_comment())
    }
}

fn random_delimiter() -> String {
    let mut b = [0u8; 12];
    rand::rngs::OsRng.fill_bytes(&mut b);
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("DUFFY_KEYS_{hex}")
}

/// The remote script. `path` was validated (no quote can appear in it);
/// `block` (validated key lines between marker lines) is here-document
/// data under a quoted `delimiter`, so the shell never expands it.
fn script(path: &str, block: Option<&str>, delimiter: &str) -> String {
    let mut s = format!(
        r#"set -eu
umask 077
f='{path}'
case "$f" in /*) ;; *) f="$HOME/$f" ;; esac
if [ -e "$f" ] && [ ! -f "$f" ]; then echo "duffy: $f exists and is not a regular file" >&2; exit 1; fi
d=$(dirname -- "$f")
[ -d "$d" ] || mkdir -p -m 700 -- "$d"
tmp="$f.duffy-new.$$"
trap 'rm -f -- "$tmp"' EXIT
if [ -f "$f" ]; then
    sed '/^# BEGIN duffy session /,/^# END duffy session /d' -- "$f" > "$tmp"
else
    : > "$tmp"
fi
if [ -s "$tmp" ] && [ -n "$(tail -c 1 -- "$tmp")" ]; then echo >> "$tmp"; fi
"#
    );
    if let Some(block) = block {
        s.push_str(&format!("cat >> \"$tmp\" <<'{delimiter}'\n{block}{delimiter}\n"));
    }
    s.push_str(&format!(
        r#"chmod 600 -- "$tmp"
mv -f -- "$tmp" "$f"
trap - EXIT
if command -v restorecon >/dev/null 2>&1; then restorecon -F -- "$f" >/dev/null 2>&1 || true; fi
echo {OK_MARKER}
"#
    ));
    s
}

/// The text of the `session_info` file: shell variable assignments a job
/// can source (`. /root/session-info`) or read. Every value is checked
/// to be plain (a validated token, host name or timestamp), so none needs
/// quoting beyond the host list's.
fn session_info(s: &SessionContext) -> Result<String, SshError> {
    let bad = |e: duffy_core::InvalidName| SshError::InvalidName { reason: e.to_string() };
    validate_token("session id", s.id.as_str(), 64).map_err(bad)?;
    validate_token("project", &s.project, 64).map_err(bad)?;
    for h in &s.hosts {
        duffy_core::validate_hostname(h).map_err(bad)?;
    }
    Ok(format!(
        "# Written by Duffy when this node was handed to its session.\n\
         DUFFY_SESSION_ID={}\n\
         DUFFY_PROJECT={}\n\
         DUFFY_HOSTS='{}'\n\
         DUFFY_EXPIRES_AT={}\n",
        s.id,
        s.project,
        s.hosts.join(" "),
        s.expires_at
    ))
}

/// `script` with the writing of the session description to `path` added
/// before its success marker: the same temporary-file-and-rename as the
/// keys, so a job never reads half a file. `path` was validated; `info`
/// is here-document data under a quoted `delimiter`.
fn with_session_info(script: &str, path: &str, info: &str, delimiter: &str) -> String {
    let marker = format!("echo {OK_MARKER}\n");
    let head = script.strip_suffix(&marker).unwrap_or(script);
    format!(
        r#"{head}si='{path}'
case "$si" in /*) ;; *) si="$HOME/$si" ;; esac
sd=$(dirname -- "$si")
[ -d "$sd" ] || mkdir -p -m 700 -- "$sd"
stmp="$si.duffy-new.$$"
trap 'rm -f -- "$stmp"' EXIT
cat > "$stmp" <<'{delimiter}'
{info}{delimiter}
chmod 644 -- "$stmp"
mv -f -- "$stmp" "$si"
trap - EXIT
{marker}"#
    )
}

/// A file in the temporary directory, mode 0600, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn create(prefix: &str, contents: &str) -> std::io::Result<TempFile> {
        let mut b = [0u8; 8];
        rand::rngs::OsRng.fill_bytes(&mut b);
        let name: String = b.iter().map(|x| format!("{x:02x}")).collect();
        let path = std::env::temp_dir().join(format!("{prefix}-{name}"));
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path)?;
        let file = TempFile(path);
        f.write_all(contents.as_bytes())?;
        f.sync_all()?;
        Ok(file)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.0) {
            tracing::debug!(path = %self.0.display(), error = %e, "could not remove a temporary file");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ED: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIByrgFoRodMpGoIGtVxnK/CTnXeEUb1KLNez/P0VJgK+ root@n1";

    #[test]
    fn known_hosts_lines() {
        let k = PublicKey::parse_host_key(ED).unwrap();
        let bare = ED.rsplit_once(' ').unwrap().0;
        assert_eq!(known_hosts_line("10.0.0.5", 22, &k), format!("10.0.0.5 {bare}\n"));
        assert_eq!(known_hosts_line("127.0.0.1", 2222, &k), format!("[127.0.0.1]:2222 {bare}\n"));
    }

    #[test]
    fn ssh_stderr_is_condensed() {
        assert_eq!(condense(""), "(no output from ssh)");
        assert_eq!(
            condense("@@@@@@\n@ WARNING: CHANGED! @\n@@@@@@\nHost key verification failed.\n"),
            "@ WARNING: CHANGED! @ | Host key verification failed."
        );
    }

    #[test]
    fn config_is_checked() {
        let ok = SshConfig::new("/k");
        assert!(SshContextualizer::new(ok.clone()).is_ok());
        for bad in ["x'y", "../etc/passwd", "", "a/", "a b", "a/../b"] {
            let c = SshConfig { authorized_keys: bad.into(), ..ok.clone() };
            assert!(SshContextualizer::new(c).is_err(), "{bad}");
            let c = SshConfig { session_info: bad.into(), ..ok.clone() };
            let e = SshContextualizer::new(c).unwrap_err().to_string();
            assert!(e.contains("session_info"), "{bad}: {e}");
        }
        for bad in ["-oProxyCommand=x", "a b", ""] {
            let c = SshConfig { user: bad.into(), ..ok.clone() };
            assert!(SshContextualizer::new(c).is_err(), "{bad}");
        }
        let c: SshConfig =
            toml::from_str("private_key = \"/k\"\nconnect_timeout = \"2s\"\nports = { n1 = 2222 }").unwrap();
        assert_eq!(c.connect_timeout, Duration::from_secs(2));
        assert_eq!(c.user, "root");
        assert_eq!(c.session_info, "/root/session-info");
        assert_eq!(c.ports.get("n1"), Some(&2222));
        assert!(toml::from_str::<SshConfig>("private_key = \"/k\"\nbogus = 1").is_err());
    }

    #[test]
    fn script_passes_keys_as_data() {
        let s = script(".ssh/authorized_keys", Some("# BEGIN x\nkey $(reboot)\n# END x\n"), "DUFFY_KEYS_abc");
        assert!(s.contains("<<'DUFFY_KEYS_abc'\n# BEGIN x\nkey $(reboot)\n# END x\nDUFFY_KEYS_abc\n"));
        assert!(s.starts_with("set -eu\n"));
        assert!(s.trim_end().ends_with(OK_MARKER));
        // And the shell agrees it is well formed.
        let status = std::process::Command::new("sh").arg("-n").arg("-c").arg(&s).status().unwrap();
        assert!(status.success());
    }
}
