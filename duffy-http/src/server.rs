//! Wiring: a store, the configured hardware and the engine into a running
//! service with its reconciler, and a clean stop.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use duffy_core::testkit::SimFarm;
use duffy_core::{Actor, Clock, Engine, EngineError, Store, StoreError};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::api::{AppState, router};
use crate::clock::SystemClock;
use crate::config::{Config, HardwareConfig};
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

/// An engine built from a configuration, with a handle on the simulated
/// farm when the hardware is simulated (tests break machines through it).
pub struct Built {
    /// The engine.
    pub engine: Engine,
    /// The simulated hardware, if that is what drives the machines.
    pub sim: Option<Arc<SimFarm>>,
}

/// Builds the engine for `cfg` over `store`, adding the configured (or
/// simulated) machines and pool targets the store does not have yet.
pub async fn build_engine(cfg: &Config, store: Arc<dyn Store>) -> Result<Built, ServeError> {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let now = clock.now();
    let sim = match &cfg.hardware {
        HardwareConfig::Simulated(sim) => sim,
        HardwareConfig::Ipmi(_) => {
            return Err(ServeError::Unsupported(
                "hardware kind \"ipmi\" needs an installer; this build serves simulated farms only".into(),
            ));
        }
    };
    let farm = Arc::new(SimFarm::new(clock.clone(), sim.sim()));
    let existing = store.nodes().await?;
    if existing.is_empty() && cfg.nodes.is_empty() && sim.machines > 0 {
        store.add_nodes(SimFarm::machines(sim.machines), Actor::Operator, now).await?;
        info!(machines = sim.machines, "created a simulated farm");
    }
    let missing: Vec<_> =
        cfg.nodes.iter().filter(|n| !existing.iter().any(|e| e.hostname == n.hostname)).map(|n| n.new_node()).collect();
    if !missing.is_empty() {
        info!(count = missing.len(), "adding configured nodes");
        store.add_nodes(missing, Actor::Operator, now).await?;
    }
    let engine =
        Engine::builder(store.clone(), farm.clone(), farm.clone(), clock).policy(cfg.policy.clone()).build()?;
    if !cfg.pools.is_empty() || store.pool_targets().await?.is_empty() {
        engine.set_pool_targets(&cfg.targets()).await?;
    }
    Ok(Built { engine, sim: Some(farm) })
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

/// Binds `addr` and serves the engine, with its reconciler, until
/// [`Running::stop`].
pub async fn start(addr: SocketAddr, engine: Engine) -> Result<Running, ServeError> {
    start_with(addr, engine, true).await
}

/// As [`start`]; with `reconcile` false no reconciler runs, so the farm
/// changes only through requests (for tests that compare states).
pub async fn start_with(addr: SocketAddr, engine: Engine, reconcile: bool) -> Result<Running, ServeError> {
    let listener = TcpListener::bind(addr).await.map_err(|source| ServeError::Bind { addr, source })?;
    let addr = listener.local_addr().map_err(ServeError::Http)?;
    let (stop, rx) = watch::channel(false);
    let state = AppState { engine: engine.clone(), metrics: Arc::new(Metrics::default()) };
    let reconciler = reconcile.then(|| tokio::spawn(engine.reconciler().run(stopped(rx.clone()))));
    let app = router(state);
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, app).with_graceful_shutdown(stopped(rx)).await;
        if let Some(r) = reconciler {
            if r.await.is_err() {
                warn!("the reconciler task panicked");
            }
        }
        served.map_err(ServeError::Http)
    });
    info!(%addr, "duffy listening");
    Ok(Running { addr, engine, stop, task })
}

/// Serves until `shutdown` completes (e.g. SIGINT/SIGTERM).
pub async fn serve_until(
    addr: SocketAddr,
    engine: Engine,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let running = start(addr, engine).await?;
    shutdown.await;
    info!("shutting down: finishing in-flight requests");
    running.stop().await
}
