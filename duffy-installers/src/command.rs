//! Installing by running an operator's command, e.g. a wrapper around an
//! Ansible playbook (as CentOS CI and Duffy v3 do).
//!
//! The command gets the node and the image
//!
//! - as JSON on stdin:
//!   `{"hostname", "ip", "arch", "flavor", "bmc", "image": {"release", "arch", "flavor"}}`
//!   (`arch` and `flavor` at the top are the hardware's; `ip`, `flavor` and
//!   `bmc` are `null` when unknown), and
//! - as environment variables: `DUFFY_HOSTNAME`, `DUFFY_IP`, `DUFFY_ARCH`
//!   (hardware), `DUFFY_FLAVOR` (hardware), `DUFFY_BMC`, `DUFFY_RELEASE`,
//!   `DUFFY_IMAGE_ARCH`, `DUFFY_IMAGE_FLAVOR` (empty strings when unknown),
//!   on top of Duffy's own environment and the configured `env`.
//!
//! Its exit status decides success. On success its stdout must be empty or
//! a JSON object, optionally with `"host_key": "ssh-ed25519 AAAA…"` (the
//! installed OS's SSH host key, recorded on the node). On failure the error
//! carries the exit status and the last 2 KiB of stderr, which end up in the
//! node's history.
//!
//! The command runs in its own process group. At the timeout, and when the
//! install is cancelled (its future dropped), the whole group is killed,
//! not just the command, so a playbook's children do not linger. Leftover
//! background processes are killed after the command exits as well.
//!
//! Timeouts are measured on the tokio timer (a real process runs in real
//! time), not on an injected clock.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use duffy_core::{InstallError, Installed, Installer, Node, PoolKey};
use serde::Deserialize;
use tokio::process::Command;

use crate::keys::{KeyError, PublicKey};
use crate::process::{self, RunError, describe_status};
use crate::util::one_line;

/// The most stdout a command may print (its result is a small JSON object).
pub const MAX_STDOUT: usize = 1024 * 1024;

/// How to run the install command. Its `Debug` output shows the names of
/// the `env` variables, never their values.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandConfig {
    /// The program (a path, or a name looked up in `PATH`).
    pub program: PathBuf,
    /// Its arguments, each passed as one word (no shell sees them).
    #[serde(default)]
    pub args: Vec<String>,
    /// How long one install may run before its process group is killed.
    /// Default 1 h. Seconds, or a string like `"45m"`.
    #[serde(default = "default_timeout", deserialize_with = "duffy_core::time::serde_duration::deserialize")]
    pub timeout: Duration,
    /// Extra environment variables. Their values are never logged.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

impl std::fmt::Debug for CommandConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommandConfig")
            .field("program", &self.program)
            .field("args", &self.args)
            .field("timeout", &self.timeout)
            .field("env", &self.env.keys().map(|k| format!("{k}=<redacted>")).collect::<Vec<_>>())
            .finish()
    }
}

fn default_timeout() -> Duration {
    Duration::from_secs(3600)
}

impl CommandConfig {
    /// A configuration running `program` without arguments, with the
    /// default timeout and no extra environment.
    pub fn new(program: impl Into<PathBuf>) -> Self {
        CommandConfig { program: program.into(), args: Vec::new(), timeout: default_timeout(), env: BTreeMap::new() }
    }
}

/// Why an install command failed. Every message names the node and the
/// program.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The program could not be started.
    #[error("install of {hostname}: cannot start {program:?}: {source}")]
    Spawn {
        /// The node's host name.
        hostname: String,
        /// The configured program, as it was run.
        program: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Waiting for the program failed.
    #[error("install of {hostname}: waiting for {program:?} failed: {source}")]
    Wait {
        /// The node's host name.
        hostname: String,
        /// The configured program, as it was run.
        program: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// It ran past the timeout; its process group was killed.
    #[error("install of {hostname}: {program:?} timed out after {after:?} and was killed; stderr: {stderr_tail}")]
    Timeout {
        /// The node's host name.
        hostname: String,
        /// The configured program, as it was run.
        program: String,
        /// The configured `timeout` it ran past.
        after: Duration,
        /// The last 2 KiB of stderr.
        stderr_tail: String,
    },
    /// It exited unsuccessfully.
    #[error("install of {hostname}: {program:?} failed with {status}; stderr: {stderr_tail}")]
    Failed {
        /// The node's host name.
        hostname: String,
        /// The configured program, as it was run.
        program: String,
        /// `exit status N` or `killed by signal N`.
        status: String,
        /// The last 2 KiB of stderr.
        stderr_tail: String,
    },
    /// It exited 0 but its stdout was not an acceptable result.
    #[error(
        "install of {hostname}: {program:?} exited 0 but its output was not {detail}; stdout began {stdout_head:?}; stderr: {stderr_tail}"
    )]
    BadOutput {
        /// The node's host name.
        hostname: String,
        /// The configured program, as it was run.
        program: String,
        /// What was wrong (`JSON (…)`, `a JSON object`, …).
        detail: String,
        /// The first 200 characters of stdout, on one line.
        stdout_head: String,
        /// The last 2 KiB of stderr.
        stderr_tail: String,
    },
    /// It reported a `host_key` that is not an OpenSSH host key.
    #[error("install of {hostname}: {program:?} reported an invalid SSH host key: {source}")]
    BadHostKey {
        /// The node's host name.
        hostname: String,
        /// The configured program, as it was run.
        program: String,
        /// Why the key was refused.
        #[source]
        source: KeyError,
    },
}

impl From<CommandError> for InstallError {
    fn from(e: CommandError) -> Self {
        InstallError::new(e.to_string())
    }
}

/// The result a command may print.
#[derive(Debug, Default, Deserialize)]
struct CommandResult {
    #[serde(default)]
    host_key: Option<String>,
}

/// An [`Installer`] that runs the operator's command. See the module docs.
#[derive(Debug, Clone)]
pub struct CommandInstaller {
    config: CommandConfig,
}

impl CommandInstaller {
    /// An installer running `config`'s command.
    pub fn new(config: CommandConfig) -> Self {
        CommandInstaller { config }
    }

    /// The program, arguments, timeout and environment it runs.
    pub fn config(&self) -> &CommandConfig {
        &self.config
    }

    /// Runs the command for `node` and `image`; [`Installer::install`] with
    /// a typed error.
    pub async fn run(&self, node: &Node, image: &PoolKey) -> Result<Installed, CommandError> {
        let program = self.config.program.display().to_string();
        let hostname = node.hostname.clone();
        let input = serde_json::json!({
            "hostname": node.hostname,
            "ip": node.ip,
            "arch": node.hardware_arch.as_str(),
            "flavor": node.flavor,
            "bmc": node.bmc,
            "image": {
                "release": image.release,
                "arch": image.arch.as_str(),
                "flavor": image.flavor,
            },
        });
        let mut input = input.to_string().into_bytes();
        input.push(b'\n');

        let mut cmd = Command::new(&self.config.program);
        cmd.args(&self.config.args)
            .envs(&self.config.env)
            .env("DUFFY_HOSTNAME", &node.hostname)
            .env("DUFFY_IP", node.ip.as_deref().unwrap_or(""))
            .env("DUFFY_ARCH", node.hardware_arch.as_str())
            .env("DUFFY_FLAVOR", node.flavor.as_deref().unwrap_or(""))
            .env("DUFFY_BMC", node.bmc.as_deref().unwrap_or(""))
            .env("DUFFY_RELEASE", &image.release)
            .env("DUFFY_IMAGE_ARCH", image.arch.as_str())
            .env("DUFFY_IMAGE_FLAVOR", image.flavor.as_deref().unwrap_or(""));

        tracing::info!(node = %hostname, image = %image, program = %program, timeout = ?self.config.timeout,
            "running install command");
        let out = match process::run(cmd, &input, self.config.timeout, MAX_STDOUT).await {
            Ok(out) => out,
            Err(RunError::Spawn(source)) => return Err(CommandError::Spawn { hostname, program, source }),
            Err(RunError::Wait(source)) => return Err(CommandError::Wait { hostname, program, source }),
            Err(RunError::TimedOut { stderr_tail }) => {
                tracing::warn!(node = %hostname, program = %program, "install command timed out; process group killed");
                return Err(CommandError::Timeout { hostname, program, after: self.config.timeout, stderr_tail });
            }
        };
        if !out.status.success() {
            let status = describe_status(&out.status);
            tracing::warn!(node = %hostname, program = %program, %status, "install command failed");
            return Err(CommandError::Failed { hostname, program, status, stderr_tail: out.stderr_tail });
        }
        let bad_output = |detail: String, out: &process::Output| CommandError::BadOutput {
            hostname: hostname.clone(),
            program: program.clone(),
            detail,
            stdout_head: one_line(&String::from_utf8_lossy(&out.stdout[..out.stdout.len().min(400)]), 200),
            stderr_tail: out.stderr_tail.clone(),
        };
        if out.stdout_truncated {
            return Err(bad_output(format!("a small JSON object (more than {MAX_STDOUT} bytes)"), &out));
        }
        let text = match std::str::from_utf8(&out.stdout) {
            Ok(t) => t.trim(),
            Err(_) => return Err(bad_output("JSON (not UTF-8)".to_string(), &out)),
        };
        let result = if text.is_empty() {
            CommandResult::default()
        } else {
            let value: serde_json::Value =
                serde_json::from_str(text).map_err(|e| bad_output(format!("JSON ({e})"), &out))?;
            if !value.is_object() {
                return Err(bad_output("a JSON object".to_string(), &out));
            }
            serde_json::from_value(value).map_err(|e| bad_output(format!("a valid result object ({e})"), &out))?
        };
        let host_key = match result.host_key.as_deref().map(str::trim).filter(|k| !k.is_empty()) {
            None => None,
            Some(k) => match PublicKey::parse_host_key(k) {
                Ok(k) => Some(k.without_comment()),
                Err(source) => return Err(CommandError::BadHostKey { hostname, program, source }),
            },
        };
        tracing::info!(node = %hostname, program = %program, host_key = host_key.is_some(), "install command succeeded");
        Ok(Installed { host_key })
    }
}

#[async_trait]
impl Installer for CommandInstaller {
    async fn install(&self, node: &Node, image: &PoolKey) -> Result<Installed, InstallError> {
        Ok(self.run(node, image).await?)
    }
}
