//! The ipmitool driver: runs `ipmitool -I lanplus -C 3`, for BMCs the
//! native driver does not handle.
//!
//! The password goes to the child in the `IPMI_PASSWORD` environment
//! variable (`-E`), never on its command line. The child runs with `-v` so
//! that its error messages tell a wrong password from an unknown user or a
//! silent BMC; it is killed when the operation's deadline passes or its
//! future is dropped.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

use async_trait::async_trait;
use duffy_core::model::PowerState;
use duffy_core::power::{BootDevice, PowerAction, PowerError, PowerErrorKind};
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::config::{BmcConfig, BmcInventory};
use crate::controller::BmcDriver;
use crate::lanplus::commands::{ipmitool_bootdev, plan};
use crate::locks::BmcLocks;

/// Power control by running `ipmitool`. As a [`PowerController`](duffy_core::PowerController) it uses
/// every node's BMC from its inventory with this driver, whatever their
/// [`crate::Driver`] says.
#[derive(Debug, Clone)]
pub struct IpmitoolDriver {
    inventory: Arc<BmcInventory>,
    locks: BmcLocks,
    program: PathBuf,
}

impl Default for IpmitoolDriver {
    fn default() -> Self {
        IpmitoolDriver::new(Arc::default())
    }
}

/// What one ipmitool run printed.
#[derive(Debug)]
struct ToolOutput {
    success: bool,
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl IpmitoolDriver {
    /// A driver for the nodes of `inventory`, running `ipmitool` from `PATH`.
    pub fn new(inventory: Arc<BmcInventory>) -> Self {
        IpmitoolDriver { inventory, locks: BmcLocks::new(), program: PathBuf::from("ipmitool") }
    }

    /// Runs this program instead of `ipmitool` from `PATH`.
    pub fn with_program(mut self, program: impl Into<PathBuf>) -> Self {
        self.program = program.into();
        self
    }

    /// Shares `locks` with other drivers, so that they never talk to one
    /// BMC at the same time.
    pub fn with_locks(mut self, locks: BmcLocks) -> Self {
        self.locks = locks;
        self
    }

    /// The program this driver runs.
    pub fn program(&self) -> &Path {
        &self.program
    }

    /// The arguments before the command: interface, cipher suite, timing,
    /// BMC and user (never the password).
    fn base_args(bmc: &BmcConfig) -> Vec<String> {
        // ipmitool takes whole seconds; round up so it never waits less.
        let secs = bmc.timeout.as_secs() + u64::from(bmc.timeout.subsec_nanos() > 0);
        let v = |s: &str| s.to_string();
        vec![
            v("-v"),
            v("-I"),
            v("lanplus"),
            v("-C"),
            v("3"),
            v("-L"),
            v("ADMINISTRATOR"),
            v("-N"),
            secs.max(1).to_string(),
            v("-R"),
            bmc.retries.to_string(),
            v("-H"),
            bmc.address.clone(),
            v("-p"),
            bmc.port.to_string(),
            v("-U"),
            bmc.username.clone(),
            v("-E"),
        ]
    }

    /// Runs one ipmitool command against `bmc`, killing it at `until`.
    async fn run_tool(&self, bmc: &BmcConfig, until: Instant, command: &[&str]) -> Result<ToolOutput, PowerError> {
        let key = bmc.key();
        let mut cmd = tokio::process::Command::new(&self.program);
        cmd.args(Self::base_args(bmc))
            .args(command)
            .env("IPMI_PASSWORD", bmc.password.expose())
            // ipmitool prefers this one to IPMI_PASSWORD: never let an
            // inherited value win.
            .env_remove("IPMITOOL_PASSWORD")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        debug!(bmc = %key, program = %self.program.display(), ?command, "running ipmitool");
        let child = cmd.spawn().map_err(|e| {
            PowerError::new(
                PowerErrorKind::NotConfigured,
                format!(
                    "cannot run {}: {e} (install the ipmitool package, or configure the native driver)",
                    self.program.display()
                ),
            )
        })?;
        // Dropping the wait future on timeout drops the child, which
        // kill_on_drop kills (SIGKILL); tokio reaps it.
        match tokio::time::timeout_at(until, child.wait_with_output()).await {
            Ok(Ok(out)) => Ok(ToolOutput {
                success: out.status.success(),
                code: out.status.code(),
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            }),
            Ok(Err(e)) => {
                Err(PowerError::new(PowerErrorKind::BmcError, format!("BMC {key}: waiting for ipmitool: {e}")))
            }
            Err(_) => Err(PowerError::new(
                PowerErrorKind::Timeout,
                format!("BMC {key}: ipmitool did not finish within the deadline of {:?}; killed", bmc.deadline),
            )),
        }
    }

    /// Runs `work` holding the BMC's lock, within its deadline, and logs
    /// the outcome.
    async fn run<T, Fut>(&self, bmc: &BmcConfig, op: &str, work: impl FnOnce(Instant) -> Fut) -> Result<T, PowerError>
    where
        Fut: std::future::Future<Output = Result<T, PowerError>>,
    {
        let key = bmc.key();
        bmc.validate().map_err(|e| PowerError::new(PowerErrorKind::NotConfigured, e.to_string()))?;
        let _guard = self.locks.acquire(&key, bmc.deadline).await?;
        let started = Instant::now();
        let outcome = work(started + bmc.deadline).await.map_err(|e| redact(e, bmc));
        match &outcome {
            Ok(_) => debug!(bmc = %key, op, elapsed = ?started.elapsed(), "ipmitool operation done"),
            Err(e) => {
                warn!(bmc = %key, op, elapsed = ?started.elapsed(), kind = ?e.kind, error = %e.message, "ipmitool operation failed")
            }
        }
        outcome
    }

    async fn status_until(&self, bmc: &BmcConfig, until: Instant) -> Result<PowerState, PowerError> {
        let out = self.run_tool(bmc, until, &["chassis", "power", "status"]).await?;
        let state = out.stdout.lines().find_map(|l| match l.trim() {
            "Chassis Power is on" => Some(PowerState::On),
            "Chassis Power is off" => Some(PowerState::Off),
            _ => None,
        });
        match state {
            Some(s) if out.success => Ok(s),
            _ => Err(classify_failure(&bmc.key(), &out)),
        }
    }
}

#[async_trait]
impl BmcDriver for IpmitoolDriver {
    async fn status(&self, bmc: &BmcConfig) -> Result<PowerState, PowerError> {
        self.run(bmc, "status", |until| self.status_until(bmc, until)).await
    }

    async fn power(&self, bmc: &BmcConfig, action: PowerAction) -> Result<(), PowerError> {
        self.run(bmc, action.as_str(), |until| async move {
            let current = self.status_until(bmc, until).await?;
            let Some(control) = plan(action, current) else {
                debug!(%action, ?current, "nothing to do");
                return Ok(());
            };
            let out = self.run_tool(bmc, until, &["chassis", "power", control.ipmitool_word()]).await?;
            if out.success && out.stdout.contains("Chassis Power Control:") {
                Ok(())
            } else {
                Err(classify_failure(&bmc.key(), &out))
            }
        })
        .await
    }

    async fn set_next_boot(&self, bmc: &BmcConfig, device: BootDevice) -> Result<(), PowerError> {
        self.run(bmc, "set next boot", |until| async move {
            let out = self.run_tool(bmc, until, &["chassis", "bootdev", ipmitool_bootdev(device)]).await?;
            // ipmitool exits 0 even when it could not set the boot flags;
            // only its "Set Boot Device to ..." line says it did.
            if out.success && out.stdout.contains("Set Boot Device to") {
                Ok(())
            } else {
                Err(classify_failure(&bmc.key(), &out))
            }
        })
        .await
    }
}

crate::controller::power_controller_by_inventory!(IpmitoolDriver);

/// Replaces the password, should ipmitool ever print it, by `***`.
fn redact(mut e: PowerError, bmc: &BmcConfig) -> PowerError {
    let pw = bmc.password.expose();
    if !pw.is_empty() && e.message.contains(pw) {
        e.message = e.message.replace(pw, "***");
    }
    e
}

/// Lines ipmitool `-v` prints on every run, which say nothing about the
/// failure (probes of OEM extensions that ipmi_sim and many BMCs lack).
const NOISE: [&str; 6] = [
    "Loading IANA PEN Registry",
    "Running Get VSO Capabilities",
    "Discovered IPMB address",
    "Invalid completion code received: Invalid command",
    "Error response 0xc1 from Get PICMG Properties",
    "Close Session command failed",
];

/// Classifies a failed ipmitool run by what it printed.
fn classify_failure(bmc: &str, out: &ToolOutput) -> PowerError {
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .chain(out.stdout.lines())
        .map(str::trim)
        .filter(|l| !l.is_empty() && !NOISE.iter().any(|n| l.starts_with(n)))
        .collect();
    let text = if lines.is_empty() { "no output".to_string() } else { lines.join("; ") };
    let text: String = text.chars().take(600).collect();
    let lower = text.to_ascii_lowercase();
    let has = |words: &[&str]| words.iter().any(|w| lower.contains(w));
    use PowerErrorKind::*;
    let kind = if has(&["insufficient resources", "node busy", "initialization in progress", "firmware update mode"]) {
        Busy
    } else if has(&[
        "unauthorized name",
        "hmac is invalid",
        "invalid role",
        "unauthorized role",
        "invalid name length",
        "unauthorized guid",
        "invalid integrity check",
        "insufficient privilege",
        "privilege level",
    ]) {
        AuthFailed
    } else if has(&["unable to establish", "get auth capabilities error", "no response from remote controller"]) {
        // The session never came up and no RAKP message said why: the BMC
        // did not answer.
        Unreachable
    } else if has(&[" failed: "]) {
        // "... failed: <completion code text>": the BMC answered an error.
        BmcError
    } else if has(&["unable to "]) {
        // "Unable to get Chassis Power Status" without a completion code: the
        // session was up, then the BMC stopped answering.
        Timeout
    } else {
        BmcError
    };
    let code = out.code.map_or_else(|| "killed by a signal".to_string(), |c| format!("exit {c}"));
    PowerError::new(kind, format!("BMC {bmc}: ipmitool ({code}): {text}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn out(code: i32, stdout: &str, stderr: &str) -> ToolOutput {
        ToolOutput { success: code == 0, code: Some(code), stdout: stdout.into(), stderr: stderr.into() }
    }

    const PREAMBLE: &str = "Loading IANA PEN Registry...\nRunning Get VSO Capabilities my_addr 0x20, transit 0, \
                            target 0x20\nInvalid completion code received: Invalid command\nDiscovered IPMB address 0x0\n";

    /// What ipmitool 1.8.19 `-v` printed against ipmi_sim in each case.
    #[test]
    fn classifies_what_ipmitool_prints() {
        use PowerErrorKind::*;
        let cases = [
            (
                "Loading IANA PEN Registry...\n> RAKP 2 HMAC is invalid\nError: Unable to establish IPMI v2 / RMCP+ session\n",
                AuthFailed,
            ),
            (
                "Loading IANA PEN Registry...\nRAKP 2 message indicates an error : unauthorized name\nError: Unable to establish IPMI v2 / RMCP+ session\n",
                AuthFailed,
            ),
            (
                "Loading IANA PEN Registry...\nGet Auth Capabilities error\nError issuing Get Channel Authentication Capabilities request\nError: Unable to establish IPMI v2 / RMCP+ session\n",
                Unreachable,
            ),
            (
                "Loading IANA PEN Registry...\nError in open session response message : insufficient resources for session\nError: Unable to establish IPMI v2 / RMCP+ session\n",
                Busy,
            ),
            (&format!("{PREAMBLE}Get Chassis Power Status failed: Unspecified error\n"), BmcError),
            (&format!("{PREAMBLE}Set Chassis Power Control to Up/On failed: Unspecified error\n"), BmcError),
            (&format!("{PREAMBLE}Unable to get Chassis Power Status\nClose Session command failed\n"), Timeout),
            (
                &format!("{PREAMBLE}Unable to set Chassis Power Control to Up/On\nClose Session command failed\n"),
                Timeout,
            ),
            (
                &format!("{PREAMBLE}Set Chassis Power Control to Up/On failed: Insufficient privilege level\n"),
                AuthFailed,
            ),
            ("", BmcError),
        ];
        for (stderr, kind) in cases {
            let e = classify_failure("h:623", &out(1, "", stderr));
            assert_eq!(e.kind, kind, "{stderr}");
            assert!(e.message.starts_with("BMC h:623: ipmitool (exit 1): "), "{}", e.message);
            assert!(!e.message.contains("IANA"), "{}", e.message);
        }
        let e = classify_failure(
            "h:623",
            &out(1, "", "> RAKP 2 HMAC is invalid\nError: Unable to establish IPMI v2 / RMCP+ session\n"),
        );
        assert_eq!(
            e.message,
            "BMC h:623: ipmitool (exit 1): > RAKP 2 HMAC is invalid; Error: Unable to establish IPMI v2 / RMCP+ session"
        );
        // ipmitool exits 0 when boot parameter 5 fails.
        let e = classify_failure(
            "h:623",
            &out(0, "", &format!("{PREAMBLE}Set Chassis Boot Parameter 5 failed: Unspecified error\n")),
        );
        assert_eq!(e.kind, BmcError);
        assert!(
            e.message.contains("(exit 0): Set Chassis Boot Parameter 5 failed: Unspecified error"),
            "{}",
            e.message
        );
    }

    #[test]
    fn arguments_never_carry_the_password() {
        let mut bmc = BmcConfig::new("127.0.0.1", "admin0", "pass0-secret".into());
        bmc.port = 16230;
        bmc.timeout = Duration::from_millis(1500);
        let args = IpmitoolDriver::base_args(&bmc).join(" ");
        assert_eq!(args, "-v -I lanplus -C 3 -L ADMINISTRATOR -N 2 -R 2 -H 127.0.0.1 -p 16230 -U admin0 -E");
        assert!(!args.contains("pass0"));
        bmc.timeout = Duration::from_millis(300);
        assert!(IpmitoolDriver::base_args(&bmc).join(" ").contains("-N 1 "));
    }

    #[test]
    fn redacts_a_printed_password() {
        let bmc = BmcConfig::new("h", "u", "pw123".into());
        let e = redact(PowerError::new(PowerErrorKind::BmcError, "key pw123 leaked"), &bmc);
        assert_eq!(e.message, "key *** leaked");
    }
}
