//! `duffy client …`: the job side of `/api/v1`, through `duffy_client`.
//!
//! The key is never an argument (it would show in `ps` and in job logs):
//! it comes from `DUFFY_KEY`, or from a configuration file that only its
//! owner can read. Tables for people by default; `--json` for scripts.

use std::fmt::Write as _;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Subcommand};
use duffy_client::wire::{CreateSession, PoolView, QueuedRequest, SessionView};
use duffy_client::{Client, ClientError, Interrupted};
use serde::{Deserialize, Serialize};

/// `duffy client`'s options.
#[derive(Debug, Args)]
pub struct ClientArgs {
    /// The service's URL (default: `DUFFY_URL`, else the config file's
    /// `url`, else http://127.0.0.1:8080).
    #[arg(long, value_name = "URL")]
    url: Option<String>,
    /// The client configuration file (default: `DUFFY_CONFIG`, else
    /// ~/.config/duffy/client.toml). TOML with `url` and `key`; it must be
    /// readable only by its owner (chmod 600).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Print JSON (for scripts) instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: ClientCommand,
}

/// The client commands.
#[derive(Debug, Subcommand)]
enum ClientCommand {
    /// Requests nodes and waits for them (printing progress on stderr);
    /// prints the session.
    RequestSession {
        /// The pool, release/arch[/flavor] (e.g. 9/x86_64); or use --release, --arch, --flavor.
        #[arg(long, conflicts_with_all = ["release", "arch", "flavor"])]
        pool: Option<String>,
        /// OS release.
        #[arg(long)]
        release: Option<String>,
        /// Architecture.
        #[arg(long)]
        arch: Option<String>,
        /// Hardware flavor.
        #[arg(long)]
        flavor: Option<String>,
        /// How many nodes.
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// The session's lifetime (e.g. 2h, 90m; default: the service's lease).
        #[arg(long, value_name = "DURATION", value_parser = parse_secs)]
        lifetime: Option<u64>,
        /// Fail at once when the pool is short instead of waiting in the queue.
        #[arg(long)]
        no_wait: bool,
    },
    /// Lists your live sessions.
    List,
    /// Shows one session.
    Show {
        /// The session id.
        id: String,
    },
    /// Extends a session's expiry.
    Extend {
        /// The session id.
        id: String,
        /// By how much (e.g. 1h; default: the service's lease).
        #[arg(long, value_name = "DURATION", value_parser = parse_secs)]
        by: Option<u64>,
    },
    /// Releases a session: its nodes are reinstalled.
    Release {
        /// The session id.
        id: String,
    },
    /// Fails a session: its nodes are held for debugging.
    Fail {
        /// The session id.
        id: String,
    },
    /// Lists the pools: target, nodes per state, expected Ready.
    Pools,
}

fn parse_secs(s: &str) -> Result<u64, String> {
    let d = duffy_core::time::parse_duration(s)?;
    if d < Duration::from_secs(1) {
        return Err(format!("{s:?} is too short: at least 1s"));
    }
    Ok(d.as_secs())
}

/// Why `duffy client` failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientCliError {
    /// The configuration (key, URL, file) is unusable.
    #[error("{0}")]
    Config(String),
    /// The call failed.
    #[error(transparent)]
    Client(#[from] ClientError),
}

/// The configuration file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    url: Option<String>,
    key: Option<String>,
}

fn default_config_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("DUFFY_CONFIG") {
        return Some(PathBuf::from(p));
    }
    let base = match std::env::var_os("XDG_CONFIG_HOME") {
        Some(x) if !x.is_empty() => PathBuf::from(x),
        _ => PathBuf::from(std::env::var_os("HOME")?).join(".config"),
    };
    Some(base.join("duffy/client.toml"))
}

/// Reads the configuration file, refusing one that anybody but its owner
/// can read, or that another user owns: it holds a key.
fn read_config(path: &Path, explicit: bool) -> Result<FileConfig, ClientCliError> {
    use std::os::unix::fs::MetadataExt;
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => return Ok(FileConfig::default()),
        Err(e) => return Err(ClientCliError::Config(format!("cannot read {}: {e}", path.display()))),
    };
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(ClientCliError::Config(format!(
            "{} is readable by others (mode {mode:03o}) and holds an API key; make it private: chmod 600 {}",
            path.display(),
            path.display()
        )));
    }
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me {
        return Err(ClientCliError::Config(format!(
            "{} belongs to user id {}, not to you (user id {me}); use your own configuration file",
            path.display(),
            meta.uid()
        )));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| ClientCliError::Config(format!("cannot read {}: {e}", path.display())))?;
    toml::from_str(&text)
        .map_err(|e| ClientCliError::Config(format!("{}: {e}; allowed settings: url, key", path.display())))
}

/// The client for these options: key from `DUFFY_KEY` or the file, URL
/// from `--url`, `DUFFY_URL` or the file.
fn client(args: &ClientArgs) -> Result<Client, ClientCliError> {
    let env_key = std::env::var("DUFFY_KEY").ok().filter(|k| !k.trim().is_empty());
    let env_url = std::env::var("DUFFY_URL").ok().filter(|u| !u.is_empty());
    let url_given = args.url.is_some() || env_url.is_some();
    // The file is read when it is named, or when it is needed.
    let file = match (&args.config, env_key.is_some() && url_given) {
        (Some(p), _) => read_config(p, true)?,
        (None, false) => match default_config_path() {
            Some(p) => read_config(&p, false)?,
            None => FileConfig::default(),
        },
        (None, true) => FileConfig::default(),
    };
    let key = env_key.or(file.key).ok_or_else(|| {
        ClientCliError::Config(
            "no API key: set DUFFY_KEY, or put key = \"…\" in ~/.config/duffy/client.toml (chmod 600)".into(),
        )
    })?;
    let url = args.url.clone().or(env_url).or(file.url).unwrap_or_else(|| "http://127.0.0.1:8080".into());
    Ok(Client::new(&url, &key)?)
}

/// Runs `duffy client …`, printing on stdout (and progress on stderr).
pub async fn run(args: ClientArgs) -> Result<(), ClientCliError> {
    let c = client(&args)?;
    let json = args.json;
    let out = match args.command {
        ClientCommand::RequestSession { pool, release, arch, flavor, count, lifetime, no_wait } => {
            let req = CreateSession {
                pool,
                release,
                arch,
                flavor,
                count: Some(count),
                lifetime_secs: lifetime,
                wait: Some(!no_wait),
            };
            let mut progress = Progress::new();
            let s = until_interrupted(&c, &req, &mut progress).await;
            progress.done();
            let s = s?;
            if json { to_json(&s) } else { session_details(&s) }
        }
        ClientCommand::List => {
            let list = c.sessions().await?;
            if json { to_json(&list) } else { session_table(&list) }
        }
        ClientCommand::Show { id } => {
            let s = c.session(&id).await?;
            if json { to_json(&s) } else { session_details(&s) }
        }
        ClientCommand::Extend { id, by } => {
            let s = c.extend(&id, by.map(Duration::from_secs)).await?;
            if json { to_json(&s) } else { session_details(&s) }
        }
        ClientCommand::Release { id } => {
            let s = c.release(&id).await?;
            if json { to_json(&s) } else { format!("released {} ({} nodes to be reinstalled)\n", s.id, s.pool) }
        }
        ClientCommand::Fail { id } => {
            let s = c.fail(&id).await?;
            if json {
                to_json(&s)
            } else {
                format!("failed {}: nodes held until {}\n", s.id, s.hold_until.as_deref().unwrap_or("-"))
            }
        }
        ClientCommand::Pools => {
            let pools = c.pools().await?;
            if json { to_json(&pools) } else { pool_table(&pools) }
        }
    };
    print!("{out}");
    Ok(())
}

/// Requests a session until Ctrl-C (SIGINT): then the client cancels
/// the request, or releases the session it was served with, so that an
/// interrupted command leaves nothing held on the service. A second
/// Ctrl-C while that is being done quits at once, saying what may be left.
async fn until_interrupted(
    c: &Client,
    req: &CreateSession,
    progress: &mut Progress,
) -> Result<SessionView, ClientCliError> {
    let (fired, first) = tokio::sync::oneshot::channel::<()>();
    let stop = async move {
        // No handler (no signals here): never stops.
        if tokio::signal::ctrl_c().await.is_err() {
            return std::future::pending().await;
        }
        eprintln!("\ninterrupted: cancelling the request (Ctrl-C again to quit at once)");
        let _ = fired.send(());
    };
    let again = async move {
        if first.await.is_err() || tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let last_request = std::cell::RefCell::new(None::<String>);
    let show = |q: &QueuedRequest| {
        *last_request.borrow_mut() = Some(q.id.clone());
        progress.show(q);
    };
    tokio::select! {
        r = c.request_session_until(req, show, stop) => Ok(r?),
        () = again => {
            let left = match last_request.borrow().as_deref() {
                Some(id) => format!("request {id} (or the session it was served with)"),
                None => "a request or session (see `duffy client list`)".to_string(),
            };
            Err(ClientCliError::Client(ClientError::Interrupted(Interrupted::CleanupFailed {
                left,
                error: "interrupted again before the cleanup finished".into(),
            })))
        }
    }
}

impl ClientCliError {
    /// Whether the command was interrupted (Ctrl-C): its exit status is
    /// then 130, as a shell's for SIGINT.
    pub fn interrupted(&self) -> bool {
        matches!(self, ClientCliError::Client(ClientError::Interrupted(_)))
    }
}

fn to_json<T: Serialize>(v: &T) -> String {
    let mut s = serde_json::to_string_pretty(v).unwrap_or_else(|_| "null".into());
    s.push('\n');
    s
}

/// The progress line of a waiting request, on stderr: rewritten in place
/// on a terminal, one line per change otherwise (job logs).
struct Progress {
    tty: bool,
    last: String,
}

impl Progress {
    fn new() -> Progress {
        Progress { tty: std::io::stderr().is_terminal(), last: String::new() }
    }

    fn show(&mut self, q: &QueuedRequest) {
        if q.state != "waiting" {
            return;
        }
        let mut line = format!("waiting for {} node(s) of {} (request {})", q.count, q.pool, q.id);
        if let Some(p) = q.position {
            let _ = write!(line, ": {p} ahead");
        }
        if let Some(s) = q.estimated_wait_secs {
            let _ = write!(line, ", about {}", human_secs(s));
        }
        if line == self.last {
            return;
        }
        if self.tty {
            eprint!("\r\x1b[2K{line}");
        } else {
            eprintln!("{line}");
        }
        self.last = line;
    }

    fn done(&self) {
        if self.tty && !self.last.is_empty() {
            eprintln!();
        }
    }
}

fn human_secs(s: u64) -> String {
    match s {
        0..=89 => format!("{s}s"),
        90..=5399 => format!("{}m", (s + 30) / 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

fn session_details(s: &SessionView) -> String {
    let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let mut out = String::new();
    let _ = writeln!(out, "session   {}", s.id);
    let _ = writeln!(out, "state     {}", s.state);
    let _ = writeln!(out, "pool      {}", s.pool);
    let _ = writeln!(out, "hosts     {}", if s.hosts.is_empty() { "-".into() } else { s.hosts.join(" ") });
    let _ = writeln!(out, "created   {}", s.created_at);
    let _ = writeln!(out, "expires   {}", opt(&s.expires_at));
    let _ = writeln!(out, "max       {}", opt(&s.max_until));
    if s.hold_until.is_some() {
        let _ = writeln!(out, "held      {}", opt(&s.hold_until));
    }
    if let Some(r) = &s.end_reason {
        let _ = writeln!(out, "ended     {} ({r})", opt(&s.ended_at));
    }
    out
}

fn session_table(list: &[SessionView]) -> String {
    let mut out = format!("{:<36}  {:<6}  {:<16}  {:<24}  hosts\n", "session", "state", "pool", "expires");
    for s in list {
        let _ = writeln!(
            out,
            "{:<36}  {:<6}  {:<16}  {:<24}  {}",
            s.id,
            s.state,
            s.pool,
            s.expires_at.as_deref().unwrap_or("-"),
            s.hosts.join(" ")
        );
    }
    out
}

fn pool_table(pools: &[PoolView]) -> String {
    let mut out = format!(
        "{:<20}  {:>7}  {:>5}  {:>12}  {:>8}  {:>6}  {:>7}  {:>10}\n",
        "pool", "standby", "ready", "provisioning", "deployed", "failed", "waiting", "next ready"
    );
    for p in pools {
        let n = |s: &str| p.nodes.get(s).copied().unwrap_or(0);
        let _ = writeln!(
            out,
            "{:<20}  {:>7}  {:>5}  {:>12}  {:>8}  {:>6}  {:>7}  {:>10}",
            p.pool,
            p.standby,
            p.ready,
            n("Provisioning"),
            n("Deployed"),
            n("Failed"),
            p.waiting,
            p.estimated_next_ready_in_secs.map(human_secs).unwrap_or_else(|| "-".into())
        );
    }
    out
}
