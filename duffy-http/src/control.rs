//! One writer per database file: the lock, and the control socket through
//! which operator commands reach a running service.
//!
//! Beside the database `D` live two files:
//!
//! - `D.lock`: whoever opens `D` holds an exclusive advisory lock (`flock`)
//!   on it for as long as the file is open: `duffy serve` for its whole
//!   life, a `duffy` operator command for the length of the command. The
//!   kernel drops the lock when its holder exits, however it exits, so a
//!   held lock always means a live holder.
//! - `D.sock`: the running service's control socket (mode 0600; a client
//!   must be the service's user or root, checked by peer credentials).
//!   One JSON request line in, one JSON answer line out.
//!
//! An operator command first tries the lock. If it gets it, no service
//! runs, and it opens the database itself (and a service cannot start
//! under it). If not, it sends the command to the service, which runs it
//! with its own store and engine: the CLI never opens a database a service
//! has open, so there is only ever one writer and one syncer per file. A
//! socket left behind by a killed service is stale by definition when the
//! lock is free; the next service removes it.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::operator::{OperatorCommand, Outcome, Target, execute};

/// The protocol version spoken on the control socket; a service refuses
/// other versions (a CLI from another build) with a message saying so.
pub const PROTOCOL_VERSION: u32 = 1;

/// Longest request line accepted (a `node import` of a big farm fits).
const MAX_REQUEST_BYTES: u64 = 64 * 1024 * 1024;

/// How long a client has to send its request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Commands run at once by the service; more wait for a turn.
const CONCURRENT_COMMANDS: usize = 4;

/// How long a stopping service lets running commands finish.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Longest path a Unix socket address holds (`sun_path`, less its NUL).
const SOCKET_PATH_MAX: usize = 107;

/// Why the lock or the control socket failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// A file beside the database could not be used.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done with it.
        what: &'static str,
        /// The file it was done with (the lock file, the socket, the
        /// database whose directory was looked up).
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Another `duffy serve` runs on this database.
    #[error("{db} is already served by {holder}")]
    ServiceRunning {
        /// The database file the lock is beside.
        db: PathBuf,
        /// Who holds the lock, as it recorded itself.
        holder: String,
    },
    /// The lock stayed taken.
    #[error("{db} is in use by {holder} (lock {lock}); try again when it has finished")]
    Busy {
        /// The database file the lock is beside.
        db: PathBuf,
        /// The lock file (`D.lock` beside database `D`).
        lock: PathBuf,
        /// Who holds the lock, as it recorded itself.
        holder: String,
    },
    /// The socket's path is too long for a Unix socket address.
    #[error(
        "the control socket path {path} is {len} bytes, longer than a Unix socket allows ({SOCKET_PATH_MAX}); put the database in a directory with a shorter path"
    )]
    PathTooLong {
        /// The socket path that does not fit.
        path: PathBuf,
        /// Its length in bytes.
        len: usize,
    },
    /// The service answered something that is not the protocol.
    #[error("the service on {path} answered badly: {detail}")]
    Protocol {
        /// The control socket that answered.
        path: PathBuf,
        /// What in the answer was not the protocol.
        detail: String,
    },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ControlError + use<> {
    let path = path.to_path_buf();
    move |source| ControlError::Io { what, path, source }
}

/// The database file and the files beside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlPaths {
    /// The database, as given.
    pub db: PathBuf,
    /// `D.lock`.
    pub lock: PathBuf,
    /// `D.sock`.
    pub socket: PathBuf,
}

impl ControlPaths {
    /// The lock and socket of database `db`, beside the file it really is:
    /// symbolic links are followed (in the file name and its directory), so
    /// two spellings of one database share one lock.
    pub fn for_db(db: &Path) -> Result<ControlPaths, ControlError> {
        let real = match std::fs::canonicalize(db) {
            Ok(p) => p,
            Err(_) => {
                // Not there yet: resolve its directory instead.
                let name = db.file_name().ok_or_else(|| ControlError::Io {
                    what: "using database path",
                    path: db.to_path_buf(),
                    source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file name"),
                })?;
                let dir = match db.parent() {
                    Some(d) if !d.as_os_str().is_empty() => d,
                    _ => Path::new("."),
                };
                std::fs::canonicalize(dir).map_err(io("finding the directory of", db))?.join(name)
            }
        };
        let beside = |ext: &str| {
            let mut s = real.clone().into_os_string();
            s.push(ext);
            PathBuf::from(s)
        };
        Ok(ControlPaths { db: db.to_path_buf(), lock: beside(".lock"), socket: short_spelling(beside(".sock")) })
    }

    fn check_socket_len(&self) -> Result<(), ControlError> {
        let len = self.socket.as_os_str().len();
        if len > SOCKET_PATH_MAX {
            return Err(ControlError::PathTooLong { path: self.socket.clone(), len });
        }
        Ok(())
    }

    /// Who holds the lock, as it wrote itself into the lock file.
    pub fn holder(&self) -> String {
        let mut s = String::new();
        let _ = File::open(&self.lock).and_then(|f| f.take(200).read_to_string(&mut s));
        let s = s.trim();
        if s.is_empty() { "another process".into() } else { s.to_string() }
    }
}

/// `path` (absolute), or the same file spelled relative to the current
/// directory when that is short enough for a socket address and the
/// absolute path is not: a database deep in a build directory still gets
/// its control socket. Each process picks its own spelling; they name one
/// file.
fn short_spelling(path: PathBuf) -> PathBuf {
    if path.as_os_str().len() <= SOCKET_PATH_MAX {
        return path;
    }
    let Ok(cwd) = std::env::current_dir().and_then(std::fs::canonicalize) else { return path };
    let relative = relative_to(&path, &cwd);
    if relative.as_os_str().len() < path.as_os_str().len() { relative } else { path }
}

/// `target` spelled relative to `base` (both absolute, symbolic links
/// resolved).
fn relative_to(target: &Path, base: &Path) -> PathBuf {
    let (t, b): (Vec<_>, Vec<_>) = (target.components().collect(), base.components().collect());
    let common = t.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut out = PathBuf::new();
    for _ in common..b.len() {
        out.push("..");
    }
    for c in &t[common..] {
        out.push(c);
    }
    out
}

/// The exclusive lock on a database's lock file, held until dropped.
#[derive(Debug)]
pub struct DbLock {
    _file: File,
}

impl DbLock {
    /// Takes the lock if nobody holds it (`None` if somebody does) and
    /// records `who` in the lock file for the messages of others.
    pub fn try_acquire(paths: &ControlPaths, who: &str) -> Result<Option<DbLock>, ControlError> {
        let file = match OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&paths.lock) {
            Ok(f) => f,
            // A user who may read the database but not create files beside
            // it can still lock an existing lock file opened for reading.
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied && paths.lock.exists() => {
                File::open(&paths.lock).map_err(io("opening the lock file", &paths.lock))?
            }
            Err(e) => return Err(io("opening the lock file", &paths.lock)(e)),
        };
        match fs4::FileExt::try_lock(&file) {
            Ok(()) => {}
            Err(fs4::TryLockError::WouldBlock) => return Ok(None),
            Err(fs4::TryLockError::Error(e)) => return Err(io("locking", &paths.lock)(e)),
        }
        // Only informative (others print it), so a failure is not an error.
        let mut f = &file;
        if f.set_len(0).is_ok() {
            let _ = writeln!(f, "{who} (pid {})", std::process::id());
        }
        Ok(Some(DbLock { _file: file }))
    }

    /// Takes the lock for `duffy serve`: refused at once if another service
    /// answers on the control socket; if an operator command holds the
    /// lock, waits up to `wait` for it to finish.
    pub async fn acquire_for_service(paths: &ControlPaths, wait: Duration) -> Result<DbLock, ControlError> {
        paths.check_socket_len()?;
        let deadline = tokio::time::Instant::now() + wait;
        let mut logged = false;
        loop {
            if let Some(lock) = DbLock::try_acquire(paths, "duffy serve")? {
                return Ok(lock);
            }
            if ping(&paths.socket).await {
                return Err(ControlError::ServiceRunning { db: paths.db.clone(), holder: paths.holder() });
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ControlError::Busy {
                    db: paths.db.clone(),
                    lock: paths.lock.clone(),
                    holder: paths.holder(),
                });
            }
            if !logged {
                info!(holder = %paths.holder(), lock = %paths.lock.display(), "waiting for the database lock");
                logged = true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A request on the control socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// [`PROTOCOL_VERSION`] of the client.
    pub version: u32,
    /// The operation the service is asked to run.
    pub op: RequestOp,
}

/// What a request asks.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestOp {
    /// Is a service there? (Answered with an empty success.)
    Ping,
    /// Run an operator command.
    Run(OperatorCommand),
}

/// The answer to a request: what the command printed and its exit status.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// 0 for success, 1 for a failed command.
    pub status: u8,
    /// What it printed on standard output.
    pub output: String,
    /// Why it failed (printed on standard error), when it did.
    pub error: Option<String>,
    /// The node of [`OperatorCommand::NodeGet`].
    pub node: Option<duffy_core::Node>,
}

impl Response {
    fn from_result(r: Result<Outcome, String>) -> Response {
        match r {
            Ok(o) => Response { status: 0, output: o.output, error: None, node: o.node },
            Err(e) => Response { status: 1, error: Some(e), ..Response::default() },
        }
    }

    /// The command's result, as if it had run here.
    pub fn into_result(self) -> Result<Outcome, String> {
        if self.status == 0 {
            Ok(Outcome { output: self.output, node: self.node })
        } else {
            Err(self.error.unwrap_or_else(|| "the service reported a failure without a reason".into()))
        }
    }
}

/// Whether a service answers on `socket`.
async fn ping(socket: &Path) -> bool {
    let req = Request { version: PROTOCOL_VERSION, op: RequestOp::Ping };
    matches!(tokio::time::timeout(Duration::from_secs(2), send(socket, &req)).await, Ok(Ok(r)) if r.status == 0)
}

/// Why a request could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// Nobody listens on the socket (no file, or nobody accepts).
    #[error("no service listens on {0}")]
    NoService(PathBuf),
    /// Anything else.
    #[error(transparent)]
    Control(#[from] ControlError),
}

/// Sends one request to the service on `socket` and reads its answer.
pub async fn send(socket: &Path, req: &Request) -> Result<Response, SendError> {
    let mut stream = match UnixStream::connect(socket).await {
        Ok(s) => s,
        Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) => {
            return Err(SendError::NoService(socket.to_path_buf()));
        }
        Err(e) => return Err(io("connecting to the service's control socket", socket)(e).into()),
    };
    let mut line = serde_json::to_vec(req).map_err(|e| ControlError::Protocol {
        path: socket.to_path_buf(),
        detail: format!("encoding the request: {e}"),
    })?;
    line.push(b'\n');
    // A service that refuses the client answers without reading the
    // request: the answer may be waiting even if sending failed.
    let sent = stream.write_all(&line).await;
    let mut answer = String::new();
    let read = BufReader::new(stream).take(MAX_REQUEST_BYTES).read_line(&mut answer).await;
    if answer.is_empty() {
        sent.map_err(io("sending to the control socket", socket))?;
    }
    read.map_err(io("reading from the control socket", socket))?;
    if answer.is_empty() {
        return Err(ControlError::Protocol {
            path: socket.to_path_buf(),
            detail: "it closed without answering".into(),
        }
        .into());
    }
    serde_json::from_str(&answer)
        .map_err(|e| ControlError::Protocol { path: socket.to_path_buf(), detail: e.to_string() }.into())
}

/// The service's control socket, accepting operator commands.
#[derive(Debug)]
pub struct ControlServer {
    path: PathBuf,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl ControlServer {
    /// Binds the control socket (removing a stale one: the caller holds
    /// the database lock, so nobody else can be listening there) and
    /// serves commands against `engine` until [`ControlServer::stop`].
    pub fn start(
        paths: &ControlPaths,
        _lock: &DbLock,
        engine: duffy_core::Engine,
    ) -> Result<ControlServer, ControlError> {
        paths.check_socket_len()?;
        let path = paths.socket.clone();
        match std::fs::remove_file(&path) {
            Ok(()) => info!(socket = %path.display(), "removed a stale control socket"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("removing the stale control socket", &path)(e)),
        }
        let listener = UnixListener::bind(&path).map_err(io("binding the control socket", &path))?;
        // The peer credential check below is what keeps others out; the
        // mode keeps them from connecting at all once it is set.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(io("setting the mode of the control socket", &path))?;
        let (stop, rx) = watch::channel(false);
        let target = Target::Service(engine);
        let task = tokio::spawn(serve(listener, target, rx));
        info!(socket = %path.display(), "control socket listening");
        Ok(ControlServer { path, stop, task })
    }

    /// Stops accepting commands, lets running ones finish (a few seconds at
    /// most) and removes the socket file.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        if (&mut self.task).await.is_err() {
            warn!("the control socket task panicked");
        }
        self.remove_socket();
    }

    fn remove_socket(&self) {
        match std::fs::remove_file(&self.path) {
            Ok(()) => debug!(socket = %self.path.display(), "control socket removed"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => warn!(socket = %self.path.display(), error = %e, "could not remove the control socket"),
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        // Stopped without `stop` (an error path): still leave no socket.
        self.task.abort();
        self.remove_socket();
    }
}

async fn serve(listener: UnixListener, target: Target, mut stop: watch::Receiver<bool>) {
    let own_uid = rustix::process::geteuid().as_raw();
    let turns = Arc::new(Semaphore::new(CONCURRENT_COMMANDS));
    let mut running = JoinSet::new();
    loop {
        tokio::select! {
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    break;
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let (target, turns) = (target.clone(), turns.clone());
                    running.spawn(async move { connection(stream, own_uid, target, turns).await });
                }
                Err(e) => {
                    warn!(error = %e, "accepting on the control socket failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = running.join_next(), if !running.is_empty() => {}
        }
    }
    drop(listener);
    if tokio::time::timeout(STOP_GRACE, async { while running.join_next().await.is_some() {} }).await.is_err() {
        warn!("operator commands still running at shutdown were abandoned");
    }
}

async fn connection(stream: UnixStream, own_uid: u32, target: Target, turns: Arc<Semaphore>) {
    let uid = match stream.peer_cred() {
        Ok(c) => c.uid(),
        Err(e) => {
            warn!(error = %e, "control socket: cannot read the client's credentials; refused");
            return;
        }
    };
    let (read, mut write) = stream.into_split();
    let answer = if uid != own_uid && uid != 0 {
        warn!(uid, "control socket: refused a client that is neither the service's user nor root");
        Response::from_result(Err(format!(
            "permission denied: uid {uid} is neither the service's user (uid {own_uid}) nor root"
        )))
    } else {
        let mut line = String::new();
        let mut reader = BufReader::new(read.take(MAX_REQUEST_BYTES));
        match tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line)).await {
            Err(_) => Response::from_result(Err("no request line within 30 s".into())),
            Ok(Err(e)) => Response::from_result(Err(format!("reading the request: {e}"))),
            Ok(Ok(_)) => match serde_json::from_str::<Request>(&line) {
                Err(e) => Response::from_result(Err(format!("not a control request: {e}"))),
                Ok(req) if req.version != PROTOCOL_VERSION => Response::from_result(Err(format!(
                    "this service speaks control protocol {PROTOCOL_VERSION}, the client {}: use the duffy binary of the running service",
                    req.version
                ))),
                Ok(Request { op: RequestOp::Ping, .. }) => Response::default(),
                Ok(Request { op: RequestOp::Run(cmd), .. }) => {
                    let _turn = turns.acquire_owned().await;
                    info!(uid, command = cmd.name(), "operator command");
                    Response::from_result(execute(cmd, &target).await.map_err(|e| e.to_string()))
                }
            },
        }
    };
    match serde_json::to_vec(&answer) {
        Ok(mut bytes) => {
            bytes.push(b'\n');
            if let Err(e) = write.write_all(&bytes).await {
                debug!(error = %e, "control socket: the client went away before the answer");
            }
        }
        Err(e) => warn!(error = %e, "control socket: encoding an answer failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_is_spelled_relative_to_a_directory() {
        let r = |t: &str, b: &str| relative_to(Path::new(t), Path::new(b));
        assert_eq!(r("/a/b/c/d.sock", "/a/b"), PathBuf::from("c/d.sock"));
        assert_eq!(r("/a/b/d.sock", "/a/b/c/e"), PathBuf::from("../../d.sock"));
        assert_eq!(r("/x/d.sock", "/a/b"), PathBuf::from("../../x/d.sock"));
    }

    #[test]
    fn a_long_socket_path_falls_back_to_a_relative_spelling() {
        let cwd = std::env::current_dir().and_then(std::fs::canonicalize).expect("cwd");
        let deep = cwd.join("d".repeat(SOCKET_PATH_MAX)).join("duffy.db.sock");
        assert_eq!(short_spelling(deep), PathBuf::from("d".repeat(SOCKET_PATH_MAX)).join("duffy.db.sock"));
        let short = PathBuf::from("/run/duffy.db.sock");
        assert_eq!(short_spelling(short.clone()), short);
    }
}
