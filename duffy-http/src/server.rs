//! Wiring: a store, the configured hardware and the engine into a running
//! service with its reconciler, and a clean stop.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use duffy_backend_ipmi::IpmiPowerController;
use duffy_core::testkit::SimFarm;
use duffy_core::{Actor, Clock, Contextualizer, Engine, EngineError, Installer, PowerController, Store, StoreError};
use duffy_installers::{CommandInstaller, PxeInstaller, PxeRegistry, SshContextualizer};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::api::{AppState, router};
use crate::clock::SystemClock;
use crate::config::{Config, ContextualizeConfig, HardwareConfig, InstallerConfig};
use crate::listener::{Limits, bind, serve};
use crate::metrics::Metrics;

/// Why the service could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The listen address could not be bound.
    #[error("listening on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Serving failed.
    #[error("serving HTTP: {0}")]
    Http(#[source] std::io::Error),
    /// Setting up the farm in the store failed.
    #[error("setting up the farm: {0}")]
    Setup(#[from] StoreError),
    /// The engine refused the configuration.
    #[error("configuring the engine: {0}")]
    Engine(#[from] EngineError),
    /// The configuration asks for something this build cannot do.
    #[error("{0}")]
    Unsupported(String),
}

/// An engine built from a configuration, with handles on the parts that
/// tests and the HTTP layer need.
pub struct Built {
    /// The engine.
    pub engine: Engine,
    /// The simulated hardware, if that is what drives the machines (tests
    /// break machines through it).
    pub sim: Option<Arc<SimFarm>>,
    /// The PXE installer's pending installs, served at `/Install/*`.
    pub pxe: Option<Arc<PxeRegistry>>,
    /// Limits on connections and time for every listener of the service.
    pub limits: Limits,
    /// On a database several replicas share: the store whose leader
    /// election decides whether this process runs the reconciler (set by
    /// the caller that opened it; `None`: this process is the only one and
    /// always reconciles).
    pub election: Option<duffy_backend_postgres::PgStore>,
}

fn unsupported(what: &str) -> impl Fn(String) -> ServeError + '_ {
    move |e| ServeError::Unsupported(format!("{what}: {e}"))
}

/// Builds the engine for `cfg` over `store`: power control, installer and
/// contextualization as configured, the configured (or simulated) machines
/// and pool targets the store does not have yet.
pub async fn build_engine(cfg: &Config, store: Arc<dyn Store>) -> Result<Built, ServeError> {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let now = clock.now();
    let existing = store.nodes().await?;
    let (power, farm): (Arc<dyn PowerController>, Option<Arc<SimFarm>>) = match &cfg.hardware {
        HardwareConfig::Simulated(sim) => {
            let farm = Arc::new(SimFarm::new(clock.clone(), sim.sim()));
            if existing.is_empty() && cfg.nodes.is_empty() && sim.machines > 0 {
                match store.add_nodes(SimFarm::machines(sim.machines), Actor::Operator, now).await {
                    Ok(_) => info!(machines = sim.machines, "created a simulated farm"),
                    // Another replica starting at the same time made it.
                    Err(StoreError::Duplicate(_)) => info!("another replica created the simulated farm"),
                    Err(e) => return Err(e.into()),
                }
            }
            (farm.clone(), Some(farm))
        }
        HardwareConfig::Ipmi(ipmi) => {
            let inventory = ipmi.resolve().map_err(|e| unsupported("hardware")(e.to_string()))?;
            info!(bmcs = inventory.len(), "IPMI power control");
            (Arc::new(IpmiPowerController::new(inventory)), None)
        }
    };
    let mut pxe: Option<Arc<PxeRegistry>> = None;
    let mut make = |which: &InstallerConfig| -> Result<Arc<dyn Installer>, ServeError> {
        Ok(match (which, &farm) {
            (InstallerConfig::Simulated, Some(farm)) => farm.clone(),
            (InstallerConfig::Simulated, None) => {
                return Err(ServeError::Unsupported("the simulated installer needs simulated hardware".into()));
            }
            (InstallerConfig::Pxe(p), _) => {
                let registry =
                    Arc::new(PxeRegistry::new(p, clock.clone()).map_err(|e| unsupported("installer")(e.to_string()))?);
                info!(public_url = %p.public_url, "PXE installer");
                pxe = Some(registry.clone());
                Arc::new(PxeInstaller::new(p, power.clone(), registry, clock.clone()))
            }
            (InstallerConfig::Command(c), _) => {
                info!(program = %c.program.display(), "command installer");
                Arc::new(CommandInstaller::new(c.clone()))
            }
        })
    };
    let default = make(&cfg.installer)?;
    let mut by_pool = Vec::new();
    for (t, p) in cfg.targets().into_iter().zip(&cfg.pools) {
        if let Some(which) = &p.installer {
            by_pool.push((t.pool, make(which)?));
        }
    }
    let installer: Arc<dyn Installer> =
        if by_pool.is_empty() { default } else { Arc::new(PerPoolInstaller { default, by_pool }) };
    // The simulated farm prepares nodes (a delay, seeded failures) when
    // no real contextualization is configured and it has anything to
    // prepare; with nothing to prepare, allocation is one write.
    let contextualizer: Option<Arc<dyn Contextualizer>> = match (&cfg.contextualize, &farm) {
        (ContextualizeConfig::Ssh(s), _) => {
            let ssh = SshContextualizer::new(s.clone()).map_err(|e| unsupported("contextualize")(e.to_string()))?;
            info!(user = %s.user, "SSH contextualization");
            Some(Arc::new(ssh))
        }
        (ContextualizeConfig::None, Some(farm)) if farm.config().prepares() => Some(farm.clone()),
        (ContextualizeConfig::None, _) => None,
    };
    let missing: Vec<_> =
        cfg.nodes.iter().filter(|n| !existing.iter().any(|e| e.hostname == n.hostname)).map(|n| n.new_node()).collect();
    if !missing.is_empty() {
        info!(count = missing.len(), "adding configured nodes");
        match store.add_nodes(missing, Actor::Operator, now).await {
            Ok(_) => {}
            // Another replica starting at the same time added them.
            Err(StoreError::Duplicate(d)) => info!(duplicate = %d, "configured nodes added by another replica"),
            Err(e) => return Err(e.into()),
        }
    }
    let mut builder = Engine::builder(store.clone(), power, installer, clock).policy(cfg.policy.clone());
    if let Some(c) = contextualizer {
        builder = builder.contextualizer(c);
    }
    let engine = builder.build()?;
    if !cfg.pools.is_empty() || store.pool_targets().await?.is_empty() {
        engine.set_pool_targets(&cfg.targets()).await?;
    }
    let limits = Limits::from_config(&cfg.limits, &cfg.policy);
    Ok(Built { engine, sim: farm, pxe, limits, election: None })
}

/// Installs each pool's image with that pool's installer (the service's
/// default for the others).
struct PerPoolInstaller {
    default: Arc<dyn Installer>,
    by_pool: Vec<(duffy_core::PoolKey, Arc<dyn Installer>)>,
}

#[async_trait::async_trait]
impl Installer for PerPoolInstaller {
    async fn install(
        &self,
        node: &duffy_core::Node,
        image: &duffy_core::PoolKey,
    ) -> Result<duffy_core::Installed, duffy_core::InstallError> {
        let chosen = self.by_pool.iter().find(|(p, _)| p == image).map(|(_, i)| i).unwrap_or(&self.default);
        chosen.install(node, image).await
    }
}

/// A running service.
pub struct Running {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The engine (for tests and embedding).
    pub engine: Engine,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), ServeError>>,
}

impl Running {
    /// Stops it: no new connections, in-flight requests finish, the
    /// reconciler stops between steps.
    pub async fn stop(self) -> Result<(), ServeError> {
        let _ = self.stop.send(true);
        self.task.await.unwrap_or_else(|e| Err(ServeError::Http(std::io::Error::other(e))))
    }
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    while !*rx.borrow() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Binds `addr` and serves what was built, with its reconciler, until
/// [`Running::stop`].
pub async fn start(addr: SocketAddr, built: Built) -> Result<Running, ServeError> {
    start_with(addr, built, true).await
}

/// As [`start`]; with `reconcile` false no reconciler runs, so the farm
/// changes only through requests (for tests that compare states).
pub async fn start_with(addr: SocketAddr, built: Built, reconcile: bool) -> Result<Running, ServeError> {
    let Built { engine, pxe, limits, election, .. } = built;
    let listener = bind(addr).map_err(|source| ServeError::Bind { addr, source })?;
    let addr = listener.local_addr().map_err(ServeError::Http)?;
    let (stop, rx) = watch::channel(false);
    let state =
        AppState { engine: engine.clone(), metrics: Arc::new(Metrics::default()), pxe, auth_guard: Default::default() };
    // One reconciler per store: this process's own, or, with replicas
    // sharing a database, whichever process wins the election runs it.
    let reconciler = reconcile.then(|| match election {
        None => tokio::spawn(engine.reconciler().run(stopped(rx.clone()))),
        Some(store) => {
            let (engine, stop) = (engine.clone(), stopped(rx.clone()));
            tokio::spawn(async move { store.run_reconciler_while_leader(engine, stop).await })
        }
    });
    let key_use = tokio::spawn(crate::keys::record_key_use_until(engine.clone(), stopped(rx.clone())));
    let app = router(state);
    let task = tokio::spawn(async move {
        let served = serve(listener, app, &limits, stopped(rx)).await;
        if let Some(r) = reconciler {
            if r.await.is_err() {
                warn!("the reconciler task panicked");
            }
        }
        if key_use.await.is_err() {
            warn!("the key-use recorder panicked");
        }
        served.map_err(ServeError::Http)
    });
    info!(%addr, "duffy listening");
    Ok(Running { addr, engine, stop, task })
}

/// Serves until `shutdown` completes (e.g. SIGINT/SIGTERM).
pub async fn serve_until(addr: SocketAddr, built: Built, shutdown: impl Future<Output = ()>) -> Result<(), ServeError> {
    let running = start(addr, built).await?;
    shutdown.await;
    info!("shutting down: finishing in-flight requests");
    running.stop().await
}
