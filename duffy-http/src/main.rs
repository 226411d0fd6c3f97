//! The `duffy` binary: the service, and the operator commands that manage
//! its database.
//!
//! Operator commands are built here from the arguments and run by
//! `duffy_http::operator::execute`: in this process when no service runs
//! on the database, otherwise inside the service, through its control
//! socket (`duffy_http::control`). `duffy client …` is the job side of
//! `/api/v1` (`client_cli`).

mod client_cli;

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use duffy_backend_postgres::PgStore;
use duffy_core::{Arch, BootDevice, NewNode, PoolKey, PowerAction, PowerController, Store};
use duffy_http::config::{Config, NodeFile};
use duffy_http::control::{ControlPaths, ControlServer, DbLock, PROTOCOL_VERSION, Request, RequestOp, SendError};
use duffy_http::operator::{OperatorCommand, Outcome, Target, execute};
use duffy_http::{build_engine, start};
use tracing::{error, info};

/// How long `duffy serve` waits for an operator command that holds the
/// database lock to finish.
const SERVE_LOCK_WAIT: Duration = Duration::from_secs(10);

/// How long an operator command waits for the lock to come free or for a
/// starting service to open its control socket.
const COMMAND_LOCK_WAIT: Duration = Duration::from_secs(15);

/// Duffy: keeps a farm of test machines installed and hands them to CI jobs.
#[derive(Debug, Parser)]
#[command(name = "duffy", version, about)]
struct Cli {
    /// The database: a SQLite file, or a postgres:// URL (default: the config's `database`, else ./duffy.db).
    #[arg(long, global = true, value_name = "PATH|URL", env = "DUFFY_DB")]
    db: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs the service. Without --config: the embedded default (SQLite
    /// file, simulated farm shaped like the original pool table, 127.0.0.1:8080).
    Serve {
        /// A TOML configuration file (see the README).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Address to listen on (overrides the config).
        #[arg(long, value_name = "ADDR")]
        listen: Option<SocketAddr>,
    },
    /// API keys.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Machines.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Warm pools.
    #[command(subcommand)]
    Pool(PoolCommand),
    /// Projects.
    #[command(subcommand)]
    Project(ProjectCommand),
    /// The API v1 client for jobs: request, extend, release and fail
    /// sessions, list pools. The key comes from DUFFY_KEY or a private
    /// config file, never from the command line.
    Client(client_cli::ClientArgs),
    /// The store as a whole.
    #[command(subcommand)]
    Store(StoreCommand),
}

#[derive(Debug, Subcommand)]
enum StoreCommand {
    /// Copies a whole farm (nodes, sessions, keys, projects, pools, history)
    /// into an empty store, e.g. from the embedded SQLite file to
    /// PostgreSQL, then checks counts, invariants and history there. Stop
    /// the service first.
    Copy {
        /// The store to copy: a SQLite file or a postgres:// URL.
        #[arg(long, value_name = "PATH|URL")]
        from: PathBuf,
        /// The empty store to copy into: a new SQLite file or a postgres:// URL.
        #[arg(long, value_name = "PATH|URL")]
        to: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum ProjectCommand {
    /// Creates or updates a project: its node quota and the SSH public keys
    /// pushed to root on its nodes at allocation.
    Set {
        /// Project name: 1 to 64 letters, digits, '.', '_' or '-'.
        name: String,
        /// Nodes its sessions may hold at once.
        #[arg(long)]
        quota: Option<u32>,
        /// A file of OpenSSH public keys, one per line (`#` comments and
        /// blank lines ignored); replaces the project's keys.
        #[arg(long, value_name = "FILE")]
        ssh_keys: Option<PathBuf>,
    },
    /// Shows a project.
    Show {
        /// Project name.
        name: String,
    },
    /// Lists every project by name: its quota and how many SSH keys it has.
    List,
}

#[derive(Debug, Subcommand)]
enum KeyCommand {
    /// Creates a key (and its project if needed) and prints the key alone on stdout.
    Create {
        /// The project the key belongs to.
        #[arg(long)]
        project: String,
        /// The key may call the admin endpoints.
        #[arg(long)]
        admin: bool,
        /// The project's node quota (nodes its sessions may hold at once).
        #[arg(long)]
        quota: Option<u32>,
        /// The key is refused this long after it is created (e.g. 90d, 12h, 30m).
        #[arg(long, value_name = "DURATION", value_parser = parse_expiry)]
        expires: Option<u64>,
    },
    /// Lists keys: id, project, admin, created, expires, last used, revoked
    /// (never the key or its hash).
    List {
        /// Only this project's keys.
        #[arg(long)]
        project: Option<String>,
    },
    /// Revokes a key: a running service refuses it from the next request on.
    Revoke {
        /// The key's id, as `key list` shows it.
        id: u64,
    },
}

/// `--expires`: a duration of at least one second, in whole seconds.
fn parse_expiry(s: &str) -> Result<u64, String> {
    let d = duffy_core::time::parse_duration(s)?;
    if d < Duration::from_secs(1) {
        return Err(format!("{s:?} is too short: a key must live at least 1s"));
    }
    Ok(d.as_secs())
}

#[derive(Debug, Subcommand)]
enum NodeCommand {
    /// Adds one machine.
    Add(NewNode),
    /// Adds the machines of a TOML file of `[[nodes]]` tables (existing ones are skipped).
    Import {
        /// A TOML file of `[[nodes]]` tables, as in the service's configuration.
        file: PathBuf,
    },
    /// Lists every machine.
    List,
    /// Power control through the node's BMC, as configured in the
    /// `[hardware]` section of the config file.
    Power {
        /// The node's host name.
        hostname: String,
        /// What to do.
        action: PowerCommand,
        /// The configuration file naming the node's BMC.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
}

/// `duffy node power` actions.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum PowerCommand {
    /// Show the power state.
    Status,
    /// Power on.
    On,
    /// Power off (hard).
    Off,
    /// Power cycle.
    Cycle,
    /// Hard reset.
    Reset,
    /// Ask the OS to shut down.
    Soft,
    /// Boot from the network next time.
    Pxe,
    /// Boot from disk next time.
    Disk,
}

#[derive(Debug, Subcommand)]
enum PoolCommand {
    /// Sets a pool's standby target (creating the pool).
    Set {
        /// OS release, e.g. 7.
        release: String,
        /// Image architecture.
        arch: Arch,
        /// Hardware flavor.
        #[arg(long)]
        flavor: Option<String>,
        /// Ready nodes to keep.
        #[arg(long)]
        standby: u32,
    },
}

/// A failure of a command, printed on stderr.
#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error(transparent)]
    Config(#[from] duffy_http::config::ConfigError),
    #[error(transparent)]
    Store(#[from] duffy_core::StoreError),
    #[error(transparent)]
    Serve(#[from] duffy_http::ServeError),
    #[error(transparent)]
    Control(#[from] duffy_http::control::ControlError),
    #[error("{0}")]
    Other(String),
    /// A client command stopped by Ctrl-C (exit status 130).
    #[error("{0}")]
    Interrupted(String),
}

/// The PostgreSQL URL `db` is, if it is one.
fn postgres_url(db: &Path) -> Option<&str> {
    db.to_str().filter(|s| duffy_backend_postgres::is_postgres_url(s))
}

async fn open_postgres(url: &str, options: duffy_backend_postgres::PgOptions) -> Result<PgStore, CliError> {
    PgStore::connect(url, options).await.map_err(|e| CliError::Other(e.to_string()))
}

async fn open_store(path: &Path) -> Result<Arc<dyn Store>, CliError> {
    Ok(open_sqlite(path)?)
}

/// The SQLite store itself: `duffy serve` also hands it to `/metrics`
/// for its write-path figures.
fn open_sqlite(path: &Path) -> Result<Arc<duffy_backend_sqlite::SqliteStore>, CliError> {
    let store = duffy_backend_sqlite::SqliteStore::open(path, duffy_backend_sqlite::SqliteOptions::default())
        .map_err(|e| CliError::Other(format!("opening {}: {e}", path.display())))?;
    Ok(Arc::new(store))
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            error!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => info!("SIGINT received"),
        () = term => info!("SIGTERM received"),
    }
}

async fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Serve { config, listen } => serve(cli.db, config, listen).await,
        Command::Node(NodeCommand::Power { hostname, action, config }) => {
            node_power(cli.db, &hostname, action, &config).await
        }
        Command::Store(StoreCommand::Copy { from, to }) => {
            let report = duffy_http::store_copy::copy(&from, &to).await.map_err(|e| CliError::Other(e.to_string()))?;
            print!("{report}");
            Ok(())
        }
        Command::Client(args) => client_cli::run(args).await.map_err(|e| {
            if e.interrupted() { CliError::Interrupted(e.to_string()) } else { CliError::Other(e.to_string()) }
        }),
        other => {
            let cmd = operator_command(other)?;
            let outcome = run_operator(&db_path(cli.db), cmd).await?;
            print!("{}", outcome.output);
            Ok(())
        }
    }
}

/// `duffy serve`: takes the database lock for the service's whole life,
/// then serves HTTP and the control socket.
async fn serve(db: Option<PathBuf>, config: Option<PathBuf>, listen: Option<SocketAddr>) -> Result<(), CliError> {
    let mut cfg = match &config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if let Some(db) = db {
        cfg.database = db;
    }
    if let Some(l) = listen {
        cfg.listen = l;
    }
    if let Some(url) = cfg.database_url() {
        return serve_replica(&cfg, url).await;
    }
    let paths = ControlPaths::for_db(&cfg.database)?;
    let lock = DbLock::acquire_for_service(&paths, SERVE_LOCK_WAIT).await?;
    let store = open_sqlite(&cfg.database)?;
    info!(database = %cfg.database.display(), "store opened");
    let mut built = build_engine(&cfg, store.clone()).await?;
    built.store_stats = Some(store);
    let control = ControlServer::start(&paths, &lock, built.engine.clone())?;
    let running = match start(cfg.listen, built).await {
        Ok(r) => r,
        Err(e) => {
            control.stop().await;
            return Err(e.into());
        }
    };
    shutdown_signal().await;
    info!("shutting down: finishing in-flight requests and operator commands");
    control.stop().await;
    running.stop().await?;
    // The store is closed (the last engine went with the service); only
    // now may an operator command open the file.
    drop(lock);
    info!("stopped");
    Ok(())
}

/// `duffy serve` on PostgreSQL: one of any number of replicas on the
/// database. No lock and no control socket: operator commands talk to the
/// database directly, and every replica hears of key changes at once.
async fn serve_replica(cfg: &Config, url: &str) -> Result<(), CliError> {
    let store = open_postgres(url, cfg.postgres.options("service")).await?;
    info!(database = %store.database(), instance = store.instance(), "store opened");
    let mut built = build_engine(cfg, Arc::new(store.clone())).await?;
    built.election = Some(store);
    let running = start(cfg.listen, built).await?;
    shutdown_signal().await;
    info!("shutting down: finishing in-flight requests");
    running.stop().await?;
    info!("stopped");
    Ok(())
}

/// Runs an operator command: on PostgreSQL, against the database directly;
/// on a SQLite file, here when no service runs on it (holding its lock
/// meanwhile), or in the service through its control socket.
async fn run_operator(db: &Path, cmd: OperatorCommand) -> Result<Outcome, CliError> {
    if let Some(url) = postgres_url(db) {
        let options = duffy_backend_postgres::PgOptions {
            pool_size: 2,
            role: "command".into(),
            ..duffy_backend_postgres::PgOptions::default()
        };
        let store: Arc<dyn Store> = Arc::new(open_postgres(url, options).await?);
        return execute(cmd, &Target::Store(store)).await.map_err(|e| CliError::Other(e.to_string()));
    }
    if !cmd.creates_database() && !db.exists() {
        return Err(CliError::Other(format!(
            "no database at {}: this command only reads it and does not create one; check --db \
             (commands that add keys, nodes, pools or projects create it)",
            db.display()
        )));
    }
    let paths = ControlPaths::for_db(db)?;
    let deadline = tokio::time::Instant::now() + COMMAND_LOCK_WAIT;
    loop {
        if let Some(lock) = DbLock::try_acquire(&paths, "duffy operator command")? {
            let target = Target::Store(open_store(db).await?);
            let result = execute(cmd, &target).await;
            // Close the store before letting a service start on the file.
            drop(target);
            drop(lock);
            return result.map_err(|e| CliError::Other(e.to_string()));
        }
        let req = Request { version: PROTOCOL_VERSION, op: RequestOp::Run(cmd.clone()) };
        match duffy_http::control::send(&paths.socket, &req).await {
            Ok(answer) => return answer.into_result().map_err(CliError::Other),
            // The holder is another command, or a service not listening
            // yet (starting) or any more (stopping): wait for either.
            Err(SendError::NoService(_)) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(SendError::NoService(socket)) => {
                return Err(CliError::Other(format!(
                    "{} is locked by {} and no service answers on {}; try again when it has finished",
                    db.display(),
                    paths.holder(),
                    socket.display()
                )));
            }
            Err(SendError::Control(e)) => return Err(e.into()),
        }
    }
}

/// The operator command an invocation means, with the files it names read
/// and checked here (errors name the file and line).
fn operator_command(command: Command) -> Result<OperatorCommand, CliError> {
    let invalid = |e: &dyn std::fmt::Display| CliError::Other(e.to_string());
    Ok(match command {
        Command::Key(KeyCommand::Create { project, admin, quota, expires }) => {
            duffy_core::validate_token("project name", &project, 64).map_err(|e| invalid(&e))?;
            OperatorCommand::KeyCreate { project, admin, quota, expires_after_secs: expires }
        }
        Command::Key(KeyCommand::List { project }) => OperatorCommand::KeyList { project },
        Command::Key(KeyCommand::Revoke { id }) => OperatorCommand::KeyRevoke { id },
        Command::Node(NodeCommand::Add(n)) => {
            n.validate().map_err(|e| invalid(&e))?;
            OperatorCommand::NodeAdd { nodes: vec![n], skip_existing: false }
        }
        Command::Node(NodeCommand::Import { file }) => {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| CliError::Other(format!("reading {}: {e}", file.display())))?;
            let parsed: NodeFile =
                toml::from_str(&text).map_err(|e| CliError::Other(format!("{}: {e}", file.display())))?;
            for n in &parsed.nodes {
                n.validate().map_err(|e| CliError::Other(format!("{}: {e}", file.display())))?;
            }
            OperatorCommand::NodeAdd { nodes: parsed.nodes, skip_existing: true }
        }
        Command::Node(NodeCommand::List) => OperatorCommand::NodeList,
        Command::Pool(PoolCommand::Set { release, arch, flavor, standby }) => {
            let pool = PoolKey::new(release, arch, flavor);
            pool.validate().map_err(|e| invalid(&e))?;
            OperatorCommand::PoolSet { pool, standby }
        }
        Command::Project(ProjectCommand::Set { name, quota, ssh_keys }) => {
            duffy_core::validate_token("project name", &name, 64).map_err(|e| invalid(&e))?;
            let ssh_keys = match &ssh_keys {
                None => None,
                Some(path) => Some(read_ssh_keys(path)?),
            };
            OperatorCommand::ProjectSet { name, quota, ssh_keys }
        }
        Command::Project(ProjectCommand::Show { name }) => OperatorCommand::ProjectShow { name },
        Command::Project(ProjectCommand::List) => OperatorCommand::ProjectList,
        Command::Serve { .. } | Command::Node(NodeCommand::Power { .. }) | Command::Client(_) | Command::Store(_) => {
            return Err(CliError::Other("not an operator command".into()));
        }
    })
}

/// A file of OpenSSH public keys, one per line (`#` comments and blank
/// lines ignored), each validated; an error names the line.
fn read_ssh_keys(path: &Path) -> Result<Vec<String>, CliError> {
    let text =
        std::fs::read_to_string(path).map_err(|e| CliError::Other(format!("reading {}: {e}", path.display())))?;
    let mut keys = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let key = duffy_installers::PublicKey::parse(line)
            .map_err(|e| CliError::Other(format!("{}:{}: {e}", path.display(), i + 1)))?;
        keys.push(key.to_string());
    }
    Ok(keys)
}

/// `duffy node power`: the node is looked up like any operator command
/// (in the service when one runs); the BMC is driven from here, with the
/// credentials of the config file the operator names.
async fn node_power(db: Option<PathBuf>, hostname: &str, action: PowerCommand, config: &Path) -> Result<(), CliError> {
    let cfg = Config::load(config)?;
    let Some(inventory) = cfg.bmc_inventory()? else {
        return Err(CliError::Other(format!(
            "{}: [hardware] is simulated; node power needs kind = \"ipmi\" with a [[hardware.bmc]] entry per node",
            config.display()
        )));
    };
    if inventory.get(hostname).is_none() {
        return Err(CliError::Other(format!("{}: no [[hardware.bmc]] entry for node {hostname:?}", config.display())));
    }
    let db = db.unwrap_or(cfg.database.clone());
    let node = run_operator(&db, OperatorCommand::NodeGet { hostname: hostname.to_string() }).await?.node.ok_or_else(
        || CliError::Other(format!("no node named {hostname:?} in {}", duffy_http::store_copy::describe(&db))),
    )?;
    let power = duffy_backend_ipmi::IpmiPowerController::new(inventory);
    let done = match action {
        PowerCommand::Status => {
            let st = power.status(&node).await.map_err(|e| CliError::Other(format!("{hostname}: {e}")))?;
            println!("{hostname}: power {}", st.as_str());
            return Ok(());
        }
        PowerCommand::On => power.power(&node, PowerAction::On).await,
        PowerCommand::Off => power.power(&node, PowerAction::Off).await,
        PowerCommand::Cycle => power.power(&node, PowerAction::Cycle).await,
        PowerCommand::Reset => power.power(&node, PowerAction::Reset).await,
        PowerCommand::Soft => power.power(&node, PowerAction::Soft).await,
        PowerCommand::Pxe => power.set_next_boot(&node, BootDevice::Pxe).await,
        PowerCommand::Disk => power.set_next_boot(&node, BootDevice::Disk).await,
    };
    done.map_err(|e| CliError::Other(format!("{hostname}: {e}")))?;
    println!("{hostname}: {}", format!("{action:?}").to_lowercase());
    Ok(())
}

fn db_path(db: Option<PathBuf>) -> PathBuf {
    db.unwrap_or_else(|| PathBuf::from("duffy.db"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The service logs what it does; an operator command only what went wrong.
    let default_level = if matches!(cli.command, Command::Serve { .. }) { "info" } else { "warn" };
    // Lines are written by a thread of their own, in batches, so that a
    // request's worker thread formats its log line but never waits for the
    // write to stderr (a file or a pipe under a service manager) nor wakes
    // a thread (see `log_writer`). Not lossy: when the buffer is full,
    // loggers wait, and no line is dropped. Colours only on a terminal:
    // escape codes in a log file are noise, and cost formatting on every
    // line.
    let (writer, _flush_on_exit) = match duffy_http::log_writer::BatchedWriter::new(
        std::io::stderr(),
        "duffy-log",
        Some(duffy_http::log_writer::FLUSH_EVERY),
        duffy_http::log_writer::MAX_BUFFERED,
    ) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("duffy: cannot start the log writer thread: {e}");
            return ExitCode::FAILURE;
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(writer)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("duffy: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ CliError::Interrupted(_)) => {
            eprintln!("duffy: {e}");
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("duffy: {e}");
            ExitCode::FAILURE
        }
    }
}
