//! Wiring: a store, the configured hardware and the engine into a running
//! service with its reconciler, and a clean stop.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use duffy_backend_ipmi::IpmiPowerController;
use duffy_core::clock::SystemClock;
use duffy_core::sim::SimFarm;
use duffy_core::{
    Actor, Clock, Contextualizer, Engine, EngineError, Installer, PowerController, Store, StoreError, StoreHealth,
};
use duffy_installers::{ByPool, CommandInstaller, PxeInstaller, PxeRegistry, SshContextualizer};
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::api::{AppState, install_endpoints, install_router, public_router, router};
use crate::config::{Config, ContextualizeConfig, HardwareConfig, InstallerConfig};
use crate::listener::{Limits, serve};
use crate::metrics::{Metrics, StoreStats};
use tokio::net::TcpListener;

/// Why the service could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The listen address could not be bound.
    #[error("listening on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The OS error (in use, not permitted, …).
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
    /// The store stopped for good while serving (see
    /// [`StoreHealth::Failed`]); restart the service to reopen it.
    #[error("the store has stopped: {0}; restart the service to reopen it")]
    StoreFailed(String),
    /// The configuration asks for something this build cannot do.
    #[error("{0}")]
    Unsupported(String),
}

/// An engine built from a configuration, with handles on the parts that
/// tests and the HTTP layer need.
pub struct Built {
    /// The engine over the store, with the configured power control,
    /// installer, contextualization, policy and pool targets.
    pub engine: Engine,
    /// The simulated hardware, if that is what drives the machines (tests
    /// break machines through it).
    pub sim: Option<Arc<SimFarm>>,
    /// The PXE installer's pending installs, served at `/Install/*`.
    pub pxe: Option<Arc<PxeRegistry>>,
    /// Limits on connections and time for every listener of the service.
    pub limits: Limits,
    /// The install endpoints' own listener (`[installer] listen`), if
    /// configured: `/Install/*` is then served there only.
    pub install_listen: Option<SocketAddr>,
    /// The store's write-path figures for `/metrics`, when whoever opened
    /// the store can give them ([`build_engine`] sees only `dyn Store`,
    /// so it leaves this `None`; `duffy serve` sets its SQLite store).
    pub store_stats: Option<Arc<dyn StoreStats>>,
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
    let mut install_listen = None;
    let mut make = |which: &InstallerConfig| -> Result<Arc<dyn Installer>, ServeError> {
        Ok(match (which, &farm) {
            (InstallerConfig::Simulated, Some(farm)) => farm.clone(),
            (InstallerConfig::Simulated, None) => {
                return Err(ServeError::Unsupported("the simulated installer needs simulated hardware".into()));
            }
            (InstallerConfig::Pxe(p), _) => {
                // The pending installs live in the store, so a machine's
                // callbacks may reach any replica sharing it.
                let tickets = store.clone().install_tickets().ok_or_else(|| {
                    ServeError::Unsupported(
                        "installer: the PXE installer needs a store that keeps install tickets; this one does not"
                            .into(),
                    )
                })?;
                let registry = PxeRegistry::new(p, install_endpoints(), tickets, clock.clone())
                    .map_err(|e| unsupported("installer")(e.to_string()))?;
                let registry = Arc::new(registry);
                info!(public_url = %p.public_url, "PXE installer");
                for n in existing.iter().filter(|n| duffy_installers::pxe::node_address(n.ip.as_deref()).is_err()) {
                    warn!(node = %n.hostname, ip = ?n.ip, "node has no usable IP address: PXE installs of it will fail");
                }
                pxe = Some(registry.clone());
                install_listen = p.listen;
                Arc::new(PxeInstaller::new(p, power.clone(), registry, clock.clone()))
            }
            (InstallerConfig::Command(c), _) => {
                info!(program = %c.program.display(), "command installer");
                Arc::new(CommandInstaller::new(c.clone()))
            }
        })
    };
    let default = make(&cfg.installer)?;
    let mut by_pool = ByPool::new(default.clone());
    for (t, p) in cfg.targets().into_iter().zip(&cfg.pools) {
        if let Some(which) = &p.installer {
            by_pool = by_pool.pool(t.pool, make(which)?);
        }
    }
    let installer: Arc<dyn Installer> = if by_pool.is_empty() { default } else { Arc::new(by_pool) };
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
        cfg.nodes.iter().filter(|n| !existing.iter().any(|e| e.hostname == n.hostname)).cloned().collect();
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
    Ok(Built { engine, sim: farm, pxe, limits, install_listen, store_stats: None, election: None })
}

/// A running service: its listeners, its reconciler and its key-use
/// recorder, until [`Running::stop`].
pub struct Running {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Where the install endpoints listen, when they have their own
    /// listener.
    pub install_addr: Option<SocketAddr>,
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

/// Serves the engine's wait queue every policy tick until `stop`
/// completes (for replicas, whose reconciler may run in another process).
async fn serve_queue_until(engine: duffy_core::Engine, stop: impl Future<Output = ()>) {
    tokio::pin!(stop);
    let tick = engine.policy().tick;
    loop {
        tokio::select! {
            () = &mut stop => return,
            () = tokio::time::sleep(tick) => {
                if let Err(e) = engine.serve_queue().await {
                    warn!(error = %e, "serving the wait queue failed; trying again next tick");
                }
            }
        }
    }
}

/// As [`start`]; with `reconcile` false no reconciler runs, so the farm
/// changes only through requests (for tests that compare states).
pub async fn start_with(addr: SocketAddr, built: Built, reconcile: bool) -> Result<Running, ServeError> {
    let Built { engine, pxe, limits, install_listen, store_stats, election, .. } = built;
    let listener = bind(addr)?;
    let addr = listener.local_addr().map_err(ServeError::Http)?;
    let install_listener = install_listen.map(bind).transpose()?;
    let (stop, rx) = watch::channel(false);
    let metrics = Arc::new(Metrics::new(store_stats));
    let state = AppState { engine: engine.clone(), metrics: metrics.clone(), pxe, auth_guard: Default::default() };
    // One reconciler per store: this process's own, or, with replicas
    // sharing a database, whichever process wins the election runs it.
    let reconciler = reconcile.then(|| match election {
        None => tokio::spawn(engine.reconciler().observed_by(metrics).run(stopped(rx.clone()))),
        Some(store) => {
            // Requests queued on this replica wait in its memory, and a
            // replica that does not lead runs no reconciler pass to serve
            // them: it serves its own queue every tick.
            tokio::spawn(serve_queue_until(engine.clone(), stopped(rx.clone())));
            let (engine, stop) = (engine.clone(), stopped(rx.clone()));
            let observer: Arc<dyn duffy_core::ReconcilerObserver> = metrics;
            tokio::spawn(async move { store.run_observed_reconciler_while_leader(engine, Some(observer), stop).await })
        }
    });
    let key_use = tokio::spawn(crate::keys::record_key_use_until(engine.clone(), stopped(rx.clone())));
    let (app, install) = match install_listener {
        None => (router(state.clone()).merge(crate::ui::router(state, rx.clone())), None),
        Some(l) => (
            public_router(state.clone()).merge(crate::ui::router(state.clone(), rx.clone())),
            Some(start_install_listener(l, state, &limits, rx.clone())?),
        ),
    };
    let install_addr = install.as_ref().map(|(a, _)| *a);
    let main = serve_on(listener, app, &limits, rx);
    let task = tokio::spawn(async move {
        let served = main.await.unwrap_or_else(|e| Err(std::io::Error::other(e)));
        let install_served = match install {
            Some((_, t)) => t.await.unwrap_or_else(|e| Err(std::io::Error::other(e))),
            None => Ok(()),
        };
        if let Some(r) = reconciler {
            if r.await.is_err() {
                warn!("the reconciler task panicked");
            }
        }
        if key_use.await.is_err() {
            warn!("the key-use recorder panicked");
        }
        served.and(install_served).map_err(ServeError::Http)
    });
    info!(%addr, "duffy listening");
    Ok(Running { addr, install_addr, engine, stop, task })
}

fn bind(addr: SocketAddr) -> Result<TcpListener, ServeError> {
    crate::listener::bind(addr).map_err(|source| ServeError::Bind { addr, source })
}

/// Serves `app` on `listener` with `limits` until `rx` says stop. Every
/// listener goes through here, so all share one connection cap. The
/// handlers get the peer's address (`ConnectInfo`): the install endpoints
/// check it.
fn serve_on(
    listener: TcpListener,
    app: axum::Router,
    limits: &Limits,
    rx: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<std::io::Result<()>> {
    let limits = limits.clone();
    tokio::spawn(async move { serve(listener, app, &limits, stopped(rx)).await })
}

/// The install endpoints' own listener (`[installer] listen`, on the
/// provisioning network): serves only `/Install/*`, which the main
/// listener then does not.
fn start_install_listener(
    listener: TcpListener,
    state: AppState,
    limits: &Limits,
    rx: watch::Receiver<bool>,
) -> Result<(SocketAddr, tokio::task::JoinHandle<std::io::Result<()>>), ServeError> {
    let addr = listener.local_addr().map_err(ServeError::Http)?;
    info!(%addr, "install endpoints (/Install/*) listening");
    Ok((addr, serve_on(listener, install_router(state), limits, rx)))
}

/// Serves until `shutdown` completes (e.g. SIGINT/SIGTERM), or until the
/// store stops for good ([`StoreHealth::Failed`], e.g. after a failed
/// fsync): then the service stops cleanly and returns
/// [`ServeError::StoreFailed`], so that its supervisor restarts it and the
/// store is reopened (recovering from its journal).
pub async fn serve_until(addr: SocketAddr, built: Built, shutdown: impl Future<Output = ()>) -> Result<(), ServeError> {
    let store = built.engine.store().clone();
    let running = start(addr, built).await?;
    let failed = async {
        loop {
            if let StoreHealth::Failed(why) = store.health() {
                return why;
            }
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
    };
    tokio::select! {
        () = shutdown => {
            info!("shutting down: finishing in-flight requests");
            running.stop().await
        }
        why = failed => {
            error!(reason = %why, "the store has stopped; shutting down so that it is reopened");
            running.stop().await?;
            Err(ServeError::StoreFailed(why))
        }
    }
}
