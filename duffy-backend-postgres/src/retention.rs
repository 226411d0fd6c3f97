//! Event retention: the leader deletes events older than
//! [`PgOptions::event_retention`](crate::PgOptions), in batches, when its
//! term begins and then every [`PRUNE_EVERY`].
//!
//! Batches walk the log by `seq` (its primary key) from the oldest event
//! and delete the ones older than the cutoff, [`PRUNE_BATCH`] at a time
//! with a pause between batches, so neither a long transaction nor a long
//! lock competes with the requests; no index on the event time is needed,
//! as the log is (nearly) in time order. Nodes, sessions and keys are never
//! pruned: a node's remaining history starts at its oldest kept event.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::time::Duration;

use duffy_core::{Engine, StoreError, Timestamp};
use tracing::{info, warn};

use crate::PgStore;

/// How often the leader prunes.
pub(crate) const PRUNE_EVERY: Duration = Duration::from_secs(600);

/// Events looked at per batch.
pub(crate) const PRUNE_BATCH: i64 = 5000;

/// Prunes while `stop` is pending (nothing without a retention setting).
pub(crate) async fn run(store: PgStore, engine: Engine, stop: impl Future<Output = ()>) {
    let Some(keep) = store.inner.options.event_retention else {
        stop.await;
        return;
    };
    let work = async {
        loop {
            let cutoff = engine.clock().now().minus(keep);
            match store.prune_events(cutoff).await {
                Ok(0) => {}
                Ok(n) => info!(deleted = n, %cutoff, "pruned old events"),
                Err(e) => warn!(error = %e, "pruning old events failed; trying again later"),
            }
            tokio::time::sleep(PRUNE_EVERY).await;
        }
    };
    tokio::select! {
        () = stop => {}
        () = work => {}
    }
}

impl PgStore {
    /// Deletes the events older than `before`, in batches; returns how
    /// many. Safe beside any other writer (a batch is one short
    /// transaction).
    pub async fn prune_events(&self, before: Timestamp) -> Result<u64, StoreError> {
        let mut cursor: i64 = 0;
        let mut total = 0u64;
        loop {
            let (last, deleted): (Option<i64>, i64) = self
                .read("pruning old events", move |c| async move {
                    let stmt = c
                        .prepare_cached(
                            "WITH batch AS (SELECT seq, at FROM events WHERE seq > $1 ORDER BY seq LIMIT $3), \
                             gone AS (DELETE FROM events e USING batch b WHERE e.seq = b.seq AND b.at < $2 \
                             RETURNING e.seq) \
                             SELECT (SELECT max(seq) FROM batch), (SELECT count(*) FROM gone)",
                        )
                        .await?;
                    let row = c.query_one(&stmt, &[&cursor, &before.0, &PRUNE_BATCH]).await?;
                    Ok((row.try_get(0)?, row.try_get(1)?))
                })
                .await?;
            total += u64::try_from(deleted).unwrap_or(0);
            self.inner.pruned.fetch_add(u64::try_from(deleted).unwrap_or(0), Ordering::Relaxed);
            match last {
                Some(l) if deleted > 0 => cursor = l,
                // The batch held nothing old enough: the rest is newer.
                _ => return Ok(total),
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}
