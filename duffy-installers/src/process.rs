//! Running a child process in its own process group, with input on stdin,
//! a capped stdout, the tail of stderr and a deadline after which the whole
//! group is killed.

use std::io;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tokio::time::{Instant, sleep_until};

use crate::util::tail_utf8;

/// How much of stderr is kept (the end of it).
pub(crate) const STDERR_TAIL: usize = 2048;

/// How long pipes may stay open after the child exited (a leftover
/// background process holding them) before the group is killed.
const EXIT_GRACE: Duration = Duration::from_secs(2);

/// What a finished child left.
#[derive(Debug)]
pub(crate) struct Output {
    /// How it exited.
    pub status: ExitStatus,
    /// Its stdout, up to the cap.
    pub stdout: Vec<u8>,
    /// Whether stdout went past the cap (the rest was discarded).
    pub stdout_truncated: bool,
    /// The last [`STDERR_TAIL`] bytes of stderr, as UTF-8.
    pub stderr_tail: String,
}

/// Why a child did not finish.
#[derive(Debug)]
pub(crate) enum RunError {
    /// It could not be started.
    Spawn(io::Error),
    /// It ran past the deadline; its group was killed.
    TimedOut {
        /// The tail of what it wrote to stderr so far.
        stderr_tail: String,
    },
    /// Waiting for it failed.
    Wait(io::Error),
}

/// Kills a process group when dropped, unless disarmed: the install future
/// may be dropped at any await (the reconciler's own deadline), and
/// `kill_on_drop` alone would only kill the direct child.
struct GroupGuard(Option<u32>);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pgid) = self.0.take() {
            kill_group_blocking(pgid);
        }
    }
}

/// `kill -KILL -PGID` through `sh` (the crate forbids `unsafe`, so no
/// `libc::killpg`). Errors (the group is already gone) are ignored.
fn kill_group_command(pgid: u32) -> std::process::Command {
    let mut c = std::process::Command::new("sh");
    c.args(["-c", "kill -s KILL -- \"-$1\" 2>/dev/null; exit 0", "duffy-kill-group", &pgid.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    c
}

fn kill_group_blocking(pgid: u32) {
    tracing::debug!(pgid, "killing process group");
    if let Err(e) = kill_group_command(pgid).status() {
        tracing::warn!(pgid, error = %e, "could not run kill for a process group");
    }
}

async fn kill_group(pgid: u32) {
    tracing::debug!(pgid, "killing process group");
    let mut cmd = Command::from(kill_group_command(pgid));
    cmd.kill_on_drop(true);
    if let Err(e) = cmd.status().await {
        tracing::warn!(pgid, error = %e, "could not run kill for a process group");
    }
}

/// Runs `cmd` in a new process group: writes `input` to its stdin and
/// closes it, keeps at most `stdout_cap` bytes of stdout and the tail of
/// stderr, and kills the group at `timeout`. After the child exits, the
/// group is killed too (leftover background processes), once its pipes
/// have closed or after a short grace.
pub(crate) async fn run(
    mut cmd: Command,
    input: &[u8],
    timeout: Duration,
    stdout_cap: usize,
) -> Result<Output, RunError> {
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true).process_group(0);
    let deadline = Instant::now() + timeout;
    let mut child = cmd.spawn().map_err(RunError::Spawn)?;
    let mut guard = GroupGuard(child.id());
    let stdin = child.stdin.take();
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();

    let mut out = Vec::new();
    let mut out_truncated = false;
    let mut err = Vec::new();

    enum End {
        Finished(io::Result<ExitStatus>),
        TimedOut,
    }
    let end = {
        let io = async {
            let write = async {
                if let Some(mut stdin) = stdin {
                    // A child that does not read its input (or exits early)
                    // closes the pipe: not an error of ours.
                    if let Err(e) = stdin.write_all(input).await {
                        tracing::debug!(error = %e, "child did not take all of its stdin");
                    }
                    drop(stdin);
                }
            };
            tokio::join!(
                write,
                read_capped(stdout, &mut out, &mut out_truncated, stdout_cap),
                read_tail(stderr, &mut err)
            )
        };
        tokio::pin!(io);
        let mut status: Option<io::Result<ExitStatus>> = None;
        let mut io_done = false;
        let mut grace: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = &mut io, if !io_done => io_done = true,
                s = child.wait(), if status.is_none() => {
                    status = Some(s);
                    grace = Some(Instant::now() + EXIT_GRACE);
                }
                () = sleep_until(deadline) => break End::TimedOut,
                () = sleep_until(grace.unwrap_or(deadline)), if grace.is_some() && !io_done => {
                    tracing::debug!("child exited but its pipes stay open; killing its process group");
                    break End::Finished(status.take().unwrap_or_else(|| Err(io::Error::other("no exit status"))));
                }
            }
            match (io_done, status.take()) {
                (true, Some(s)) => break End::Finished(s),
                (_, s) => status = s,
            }
        }
    };

    // Whatever ended it, nothing of the group may outlive the run.
    if let Some(pgid) = guard.0.take() {
        kill_group(pgid).await;
    }
    let stderr_tail = tail_utf8(&err, STDERR_TAIL);
    match end {
        End::TimedOut => {
            // Reap the child (killed with its group above).
            let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
            Err(RunError::TimedOut { stderr_tail })
        }
        End::Finished(Ok(status)) => Ok(Output { status, stdout: out, stdout_truncated: out_truncated, stderr_tail }),
        End::Finished(Err(e)) => Err(RunError::Wait(e)),
    }
}

async fn read_capped(pipe: Option<impl AsyncRead + Unpin>, out: &mut Vec<u8>, truncated: &mut bool, cap: usize) {
    let Some(mut pipe) = pipe else { return };
    let mut buf = [0u8; 8192];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) => return,
            Ok(n) => {
                let room = cap.saturating_sub(out.len());
                if n > room {
                    *truncated = true;
                }
                out.extend_from_slice(&buf[..n.min(room)]);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::debug!(error = %e, "reading a child's stdout failed");
                return;
            }
        }
    }
}

/// Reads a pipe to its end, keeping only the last [`STDERR_TAIL`] bytes
/// (plus a few, so the cut can land on a character boundary).
async fn read_tail(pipe: Option<impl AsyncRead + Unpin>, tail: &mut Vec<u8>) {
    let Some(mut pipe) = pipe else { return };
    let keep = STDERR_TAIL + 4;
    let mut buf = [0u8; 8192];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) => return,
            Ok(n) => {
                tail.extend_from_slice(&buf[..n]);
                if tail.len() > 4 * keep {
                    let cut = tail.len() - keep;
                    tail.drain(..cut);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::debug!(error = %e, "reading a child's stderr failed");
                return;
            }
        }
    }
}

/// Describes an exit status for a message: `exit status 3`, or `killed by
/// signal 9`.
pub(crate) fn describe_status(status: &ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        (None, None) => status.to_string(),
    }
}
