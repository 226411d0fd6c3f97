//! Embedding the Duffy engine the way a scheduler runs it in production:
//! the durable SQLite store, the system clock (duffy-core's `tokio`
//! feature), the reconciler as a tokio task, and a power controller and
//! installer. No test kit.
//!
//! With no arguments the machines are duffy-core's simulated farm
//! (feature `sim`, what `duffy serve` runs by default) with installs of
//! under a second, and the database lives in a temporary directory; the
//! scheduler runs a handful of jobs, stops the reconciler and closes the
//! store. For a real farm, give the BMCs (a TOML file shaped like
//! `duffy serve`'s `[hardware]` IPMI section: `[defaults]` and
//! `[[bmc]]` tables) and the program that reinstalls a machine (see
//! `duffy-installers`' command installer):
//!
//! ```text
//! cargo run --example production
//! cargo run --example production -- --db farm.db --ipmi bmcs.toml --install /usr/local/bin/reinstall-node
//! ```

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use duffy_backend_ipmi::{IpmiConfig, IpmiPowerController};
use duffy_backend_sqlite::{SqliteOptions, SqliteStore};
use duffy_core::clock::SystemClock;
use duffy_core::sim::{SimConfig, SimFarm};
use duffy_core::{
    Actor, Arch, Clock, Engine, EngineError, Installer, NewNode, NodeRequest, Policy, PoolKey, PoolTarget,
    PowerController, Project, Store, hash_api_key,
};
use duffy_installers::{CommandConfig, CommandInstaller};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// What to run on: the database, and real hardware or the simulated farm.
#[derive(Debug, Default)]
struct Args {
    /// The SQLite file; a temporary one when `None`.
    db: Option<PathBuf>,
    /// The BMCs of a real farm (IPMI configuration in TOML).
    ipmi: Option<PathBuf>,
    /// The program that reinstalls a machine of a real farm.
    install: Option<PathBuf>,
}

impl Args {
    fn parse() -> Result<Args, Error> {
        let mut args = Args::default();
        let mut it = std::env::args_os().skip(1);
        while let Some(flag) = it.next() {
            let value = it.next().map(PathBuf::from).ok_or_else(|| format!("{flag:?} needs a value"))?;
            match flag.to_str() {
                Some("--db") => args.db = Some(value),
                Some("--ipmi") => args.ipmi = Some(value),
                Some("--install") => args.install = Some(value),
                _ => {
                    return Err(
                        format!("unknown argument {flag:?}; known: --db FILE, --ipmi FILE, --install PROGRAM").into()
                    );
                }
            }
        }
        if args.ipmi.is_some() != args.install.is_some() {
            return Err("a real farm needs both --ipmi and --install".into());
        }
        Ok(args)
    }
}

/// The machines and the hardware behind them.
struct Hardware {
    machines: Vec<NewNode>,
    power: Arc<dyn PowerController>,
    installer: Arc<dyn Installer>,
}

/// A real farm: IPMI power control for every BMC in `ipmi`, and `install`
/// run for every reinstall.
fn real_farm(ipmi: &PathBuf, install: &PathBuf) -> Result<Hardware, Error> {
    let text = std::fs::read_to_string(ipmi).map_err(|e| format!("{}: {e}", ipmi.display()))?;
    let config: IpmiConfig = toml::from_str(&text).map_err(|e| format!("{}: {e}", ipmi.display()))?;
    let machines = config.bmcs.iter().map(|b| NewNode::new(b.node.clone(), Arch::X86_64)).collect();
    let power = Arc::new(IpmiPowerController::new(config.resolve()?));
    let installer = Arc::new(CommandInstaller::new(CommandConfig::new(install)));
    Ok(Hardware { machines, power, installer })
}

/// Eight simulated machines on `clock`, installed in well under a second.
fn simulated_farm(clock: Arc<dyn Clock>) -> Hardware {
    let sim = SimConfig {
        install_min: Duration::from_millis(100),
        install_max: Duration::from_millis(400),
        prepare_time: Duration::ZERO,
        power_latency: Duration::from_millis(5),
        ..SimConfig::default()
    };
    let farm = Arc::new(SimFarm::new(clock, sim));
    Hardware { machines: SimFarm::machines(8), power: farm.clone(), installer: farm }
}

/// Runs the scheduler: `jobs` jobs of one or two machines, each holding
/// them for `hold`, on the farm `args` names.
async fn run(args: Args, jobs: u32, hold: Duration) -> Result<(), Error> {
    // The store: one SQLite file, every acknowledged write on disk.
    let scratch = tempfile::tempdir()?;
    let db = args.db.clone().unwrap_or_else(|| scratch.path().join("duffy.db"));
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&db, SqliteOptions::default())?);
    println!("database {}", db.display());

    // Time: the OS clock and tokio's timers.
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);

    let hw = match (&args.ipmi, &args.install) {
        (Some(ipmi), Some(install)) => real_farm(ipmi, install)?,
        _ => simulated_farm(clock.clone()),
    };
    // Machines are added once; a restarted scheduler finds them in the file.
    if store.nodes().await?.is_empty() {
        store.add_nodes(hw.machines, Actor::Operator, clock.now()).await?;
    }

    let policy = Policy { tick: Duration::from_secs(1), rate_limit: None, ..Policy::default() };
    let engine = Engine::builder(store.clone(), hw.power, hw.installer, clock.clone()).policy(policy).build()?;
    let pool = PoolKey::new("9", Arch::X86_64, None);
    engine.set_pool_targets(&[PoolTarget { pool: pool.clone(), standby: 3 }]).await?;

    // The reconciler: one future, spawned on tokio, stopped through a
    // channel. Anything it leaves half-done is recovered at the next start.
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let reconciler = tokio::spawn(engine.reconciler().run(async move {
        let _ = stopped.await;
    }));

    // The scheduler's own project and key (it is the engine's only client).
    store.upsert_project(Project { name: "scheduler".into(), quota: None, ssh_keys: vec![] }).await?;
    let key = uuid::Uuid::new_v4().to_string();
    engine.add_api_key("scheduler", hash_api_key(&key), false, None).await?;
    let who = engine.authenticate(&key).await?;

    // Jobs in order; each waits until the warm pool can serve it.
    let mut running = tokio::task::JoinSet::new();
    for job in 0..jobs {
        let req = NodeRequest { release: Some("9".into()), count: Some(1 + job % 2), ..NodeRequest::default() };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let alloc = loop {
            match engine.get_nodes(&who, &req).await {
                Ok(alloc) => break alloc,
                Err(EngineError::InsufficientNodes { .. }) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(format!("job {job}: {e}").into()),
            }
        };
        println!("job {job}: {:?} (session {})", alloc.hosts, alloc.session.0);
        let (engine, who) = (engine.clone(), who.clone());
        running.spawn(async move {
            tokio::time::sleep(hold).await;
            engine.done(&who, &alloc.session.0).await.map(|()| job)
        });
    }
    while let Some(finished) = running.join_next().await {
        println!("job {} done: its machines go back to be reinstalled", finished??);
    }

    // A clean stop: the reconciler between two steps, key use written.
    let _ = stop.send(());
    reconciler.await?;
    engine.flush_key_usage().await?;
    let mut by_state = std::collections::BTreeMap::new();
    for n in store.nodes().await? {
        *by_state.entry(n.state.as_str()).or_insert(0) += 1;
    }
    println!("stopped; machines by state: {by_state:?}");
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    run(Args::parse()?, 6, Duration::from_millis(300)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example runs to the end on the simulated farm: a real SQLite
    /// file, the system clock, the reconciler on tokio.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn runs_the_jobs_on_the_simulated_farm_and_stops_cleanly() {
        let bounded =
            tokio::time::timeout(Duration::from_secs(120), run(Args::default(), 4, Duration::from_millis(50)));
        bounded.await.expect("the example finished within 120 s").expect("the example succeeded");
    }
}
