//! The `duffy` binary: the service, and the operator commands that manage
//! its database.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use duffy_core::{Actor, Arch, BootDevice, Clock, PoolKey, PoolTarget, PowerAction, PowerController, Store};
use duffy_http::config::{Config, NodeConfig, NodeFile};
use duffy_http::{SystemClock, build_engine, serve_until};
use tracing::{error, info};

/// Duffy: keeps a farm of test machines installed and hands them to CI jobs.
#[derive(Debug, Parser)]
#[command(name = "duffy", version, about)]
struct Cli {
    /// The SQLite database file (default: the config's `database`, else ./duffy.db).
    #[arg(long, global = true, value_name = "PATH")]
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
}

#[derive(Debug, Subcommand)]
enum ProjectCommand {
    /// Creates or updates a project: its node quota and the SSH public keys
    /// pushed to root on its nodes at allocation.
    Set {
        /// The project.
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
        /// The project.
        name: String,
    },
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
    },
}

#[derive(Debug, Subcommand)]
enum NodeCommand {
    /// Adds one machine.
    Add(NodeAdd),
    /// Adds the machines of a TOML file of `[[nodes]]` tables (existing ones are skipped).
    Import {
        /// The file.
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

#[derive(Debug, Args)]
struct NodeAdd {
    /// Fully qualified host name.
    hostname: String,
    /// Hardware architecture.
    #[arg(long, default_value = "x86_64")]
    arch: Arch,
    /// Hardware flavor.
    #[arg(long)]
    flavor: Option<String>,
    /// IP address.
    #[arg(long)]
    ip: Option<String>,
    /// Chassis.
    #[arg(long)]
    chassis: Option<String>,
    /// BMC address.
    #[arg(long)]
    bmc: Option<String>,
    /// Serial console port.
    #[arg(long)]
    console_port: Option<u16>,
    /// Add it as Reserved (not managed).
    #[arg(long)]
    reserved: bool,
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
    #[error("{0}")]
    Other(String),
}

async fn open_store(path: &Path) -> Result<Arc<dyn Store>, CliError> {
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
    let now = SystemClock.now();
    match cli.command {
        Command::Serve { config, listen } => {
            let mut cfg = match &config {
                Some(path) => Config::load(path)?,
                None => Config::default(),
            };
            if let Some(db) = cli.db {
                cfg.database = db;
            }
            if let Some(l) = listen {
                cfg.listen = l;
            }
            let store = open_store(&cfg.database).await?;
            info!(database = %cfg.database.display(), "store opened");
            let built = build_engine(&cfg, store).await?;
            serve_until(cfg.listen, built, shutdown_signal()).await?;
            info!("stopped");
        }
        Command::Key(KeyCommand::Create { project, admin, quota }) => {
            duffy_core::validate_token("project name", &project, 64).map_err(|e| CliError::Other(e.to_string()))?;
            let store = open_store(&db_path(cli.db)).await?;
            let (key, _) = duffy_http::keys::create_key(&*store, &project, admin, quota, now).await?;
            println!("{key}");
        }
        Command::Node(NodeCommand::Add(a)) => {
            let n = NodeConfig {
                hostname: a.hostname,
                arch: a.arch,
                flavor: a.flavor,
                ip: a.ip,
                chassis: a.chassis,
                console_port: a.console_port,
                bmc: a.bmc,
                reserved: a.reserved,
            }
            .new_node();
            n.validate().map_err(|e| CliError::Other(e.to_string()))?;
            let store = open_store(&db_path(cli.db)).await?;
            let added = store.add_nodes(vec![n], Actor::Operator, now).await?;
            for n in added {
                println!("added {} (id {}, {})", n.hostname, n.id, n.state);
            }
        }
        Command::Node(NodeCommand::Import { file }) => {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| CliError::Other(format!("reading {}: {e}", file.display())))?;
            let nodes: NodeFile =
                toml::from_str(&text).map_err(|e| CliError::Other(format!("{}: {e}", file.display())))?;
            let store = open_store(&db_path(cli.db)).await?;
            let existing = store.nodes().await?;
            let mut new = Vec::new();
            for n in &nodes.nodes {
                let nn = n.new_node();
                nn.validate().map_err(|e| CliError::Other(format!("{}: {e}", file.display())))?;
                if !existing.iter().any(|e| e.hostname == nn.hostname) {
                    new.push(nn);
                }
            }
            let skipped = nodes.nodes.len() - new.len();
            let added = store.add_nodes(new, Actor::Operator, now).await?;
            println!("added {} nodes, {} already present", added.len(), skipped);
        }
        Command::Node(NodeCommand::List) => {
            let store = open_store(&db_path(cli.db)).await?;
            println!(
                "{:>6}  {:<32} {:<16} {:<8} {:>5}  {:<12} session",
                "id", "hostname", "state", "arch", "used", "image"
            );
            for n in store.nodes().await? {
                println!(
                    "{:>6}  {:<32} {:<16} {:<8} {:>5}  {:<12} {}",
                    n.id.0,
                    n.hostname,
                    n.state.as_str(),
                    n.hardware_arch.as_str(),
                    n.used_count,
                    n.image.as_ref().map(ToString::to_string).unwrap_or_else(|| "-".into()),
                    n.session.as_ref().map(|s| s.0.as_str()).unwrap_or("-"),
                );
            }
        }
        Command::Node(NodeCommand::Power { hostname, action, config }) => {
            let cfg = Config::load(&config)?;
            let Some(inventory) = cfg.bmc_inventory()? else {
                return Err(CliError::Other(format!(
                    "{}: [hardware] is simulated; node power needs kind = \"ipmi\" with a [[hardware.bmc]] entry per node",
                    config.display()
                )));
            };
            if inventory.get(&hostname).is_none() {
                return Err(CliError::Other(format!(
                    "{}: no [[hardware.bmc]] entry for node {hostname:?}",
                    config.display()
                )));
            }
            let db = cli.db.unwrap_or(cfg.database.clone());
            let store = open_store(&db).await?;
            let node = store
                .node_by_hostname(&hostname)
                .await?
                .ok_or_else(|| CliError::Other(format!("no node named {hostname:?} in {}", db.display())))?;
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
        }
        Command::Project(ProjectCommand::Set { name, quota, ssh_keys }) => {
            duffy_core::validate_token("project name", &name, 64).map_err(|e| CliError::Other(e.to_string()))?;
            let keys = match &ssh_keys {
                None => None,
                Some(path) => {
                    let text = std::fs::read_to_string(path)
                        .map_err(|e| CliError::Other(format!("reading {}: {e}", path.display())))?;
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
                    Some(keys)
                }
            };
            let store = open_store(&db_path(cli.db)).await?;
            let current = store.project(&name).await?;
            let project = duffy_core::Project {
                name: name.clone(),
                quota: quota.or(current.as_ref().and_then(|p| p.quota)),
                ssh_keys: keys.unwrap_or_else(|| current.map(|p| p.ssh_keys).unwrap_or_default()),
            };
            store.upsert_project(project.clone()).await?;
            println!(
                "project {name}: quota {}, {} SSH keys",
                project.quota.map(|q| q.to_string()).unwrap_or_else(|| "none".into()),
                project.ssh_keys.len()
            );
        }
        Command::Project(ProjectCommand::Show { name }) => {
            let store = open_store(&db_path(cli.db)).await?;
            let p = store.project(&name).await?.ok_or_else(|| CliError::Other(format!("no project {name:?}")))?;
            println!("project {}: quota {}", p.name, p.quota.map(|q| q.to_string()).unwrap_or_else(|| "none".into()));
            for k in &p.ssh_keys {
                println!("  {k}");
            }
        }
        Command::Pool(PoolCommand::Set { release, arch, flavor, standby }) => {
            let pool = PoolKey::new(release, arch, flavor);
            pool.validate().map_err(|e| CliError::Other(e.to_string()))?;
            let store = open_store(&db_path(cli.db)).await?;
            store.set_pool_target(PoolTarget { pool: pool.clone(), standby }).await?;
            println!("pool {pool}: standby {standby}");
        }
    }
    Ok(())
}

fn db_path(db: Option<PathBuf>) -> PathBuf {
    db.unwrap_or_else(|| PathBuf::from("duffy.db"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The service logs what it does; an operator command only what went wrong.
    let default_level = if matches!(cli.command, Command::Serve { .. }) { "info" } else { "warn" };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
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
        Err(e) => {
            eprintln!("duffy: {e}");
            ExitCode::FAILURE
        }
    }
}
