//! Exactly one reconciler among the processes sharing a database.
//!
//! Every `duffy serve` process calls
//! [`PgStore::run_reconciler_while_leader`]. Its control connection
//! competes for the leader lock; the process that holds it starts a new
//! term (a new epoch) and runs a reconciler built from
//! [`Engine::fenced`], so every write of that reconciler carries the
//! epoch and is refused once another term began. When the term ends (the
//! control connection failed, a ping went unanswered, a fenced write was
//! refused) the reconciler is dropped between steps, with its operations,
//! and the process competes again. While it leads it also prunes old
//! events ([`PgOptions::event_retention`](crate::PgOptions)).

use std::future::Future;
use std::sync::Arc;

use duffy_core::{Engine, ReconcilerObserver};
use futures::FutureExt;
use tracing::info;

use crate::PgStore;

impl PgStore {
    /// Runs the reconciler of `engine` whenever this process is the leader,
    /// until `shutdown` completes; then steps down (another process takes
    /// over at once). Kicks from other processes (nodes they released,
    /// pauses, targets) wake this process's reconciler.
    pub async fn run_reconciler_while_leader(&self, engine: Engine, shutdown: impl Future<Output = ()> + Send) {
        self.run_observed_reconciler_while_leader(engine, None, shutdown).await
    }

    /// [`PgStore::run_reconciler_while_leader`], with every term's
    /// reconciler reporting its passes to `observer` (the service's
    /// metrics), as a single process's reconciler does.
    pub async fn run_observed_reconciler_while_leader(
        &self,
        engine: Engine,
        observer: Option<Arc<dyn ReconcilerObserver>>,
        shutdown: impl Future<Output = ()> + Send,
    ) {
        let ctl = self.inner.control.clone();
        let kicked = engine.clone();
        ctl.set_kick_target(Some(Arc::new(move || kicked.kick())));
        ctl.want_leadership(true);
        let shutdown = shutdown.boxed().shared();
        let mut leader = ctl.leader();
        loop {
            let epoch = tokio::select! {
                _ = shutdown.clone() => break,
                term = leader.wait_for(Option::is_some) => match term {
                    Ok(t) => match *t {
                        Some(e) => e,
                        None => continue,
                    },
                    Err(_) => break,
                },
            };
            info!(epoch, instance = ctl.instance, "leader: running the reconciler");
            let mut watch = ctl.leader();
            let term_over = async move {
                let _ = watch.wait_for(|l| *l != Some(epoch)).await;
            };
            let stop = futures::future::select(term_over.boxed(), shutdown.clone()).map(|_| ()).boxed().shared();
            let mut reconciler = engine.fenced(epoch).reconciler();
            if let Some(o) = &observer {
                reconciler = reconciler.observed_by(o.clone());
            }
            let reconciler = reconciler.run(stop.clone());
            let pruning = crate::retention::run(self.clone(), engine.clone(), stop);
            futures::future::join(reconciler, pruning).await;
            if shutdown.peek().is_some() {
                break;
            }
            info!(epoch, instance = ctl.instance, "no longer the leader: reconciler stopped");
        }
        ctl.want_leadership(false);
        ctl.set_kick_target(None);
    }
}
