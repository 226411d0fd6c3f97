//! The checkpointer thread: copies the WAL back into the database file off
//! the writer's path.
//!
//! Left to SQLite, the connection that commits past `wal_autocheckpoint`
//! pages runs the checkpoint inside its `COMMIT`: the writer thread, with
//! every caller of the batch waiting, and in `synchronous=FULL` with two
//! more fsyncs (the WAL, then the database). Here a separate connection
//! runs a `PASSIVE` checkpoint (it never blocks the writer or the readers)
//! every interval in which something was committed. The writer keeps a
//! much higher `wal_autocheckpoint` as a safety net only.
//!
//! A checkpoint from another connection never catches up with a writer
//! that keeps appending, and SQLite restarts the WAL from its beginning
//! only after a complete one; so when the WAL passes [`RESTART_FRAMES`]
//! the checkpointer asks the writer to finish the job between two batches
//! (a short, mostly-copied checkpoint).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Duration;

use rusqlite::Connection;
use tracing::{debug, trace, warn};

use crate::writer::Counters;

/// How often the checkpointer looks for work.
pub(crate) const INTERVAL: Duration = Duration::from_millis(50);

/// WAL size (in frames, i.e. pages) past which the checkpointer asks the
/// writer to finish the checkpoint so the WAL restarts: about 8 MiB, below
/// one 4096-frame segment of SQLite's WAL index.
pub(crate) const RESTART_FRAMES: i64 = 2_000;

/// The thread's body: until `stop` is dropped.
pub(crate) fn run(conn: Connection, stop: Receiver<()>, counters: Arc<Counters>) {
    let mut seen = 0;
    // Until the store drops `stop` (or sends on it).
    while let Err(RecvTimeoutError::Timeout) = stop.recv_timeout(INTERVAL) {
        let commits = counters.transactions.load(Ordering::Relaxed);
        if commits == seen {
            continue;
        }
        seen = commits;
        let r = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
        });
        match r {
            Ok((busy, log, done)) => {
                trace!(busy, log, done, "checkpoint");
                // `done == log` only means this pass reached where the WAL
                // ended when it began: the writer has appended since.
                if log >= RESTART_FRAMES {
                    counters.restart_wanted.store(true, Ordering::Relaxed);
                }
            }
            Err(e) => warn!(error = %e, "background checkpoint failed; the writer's auto-checkpoint remains"),
        }
    }
    debug!("SQLite checkpointer thread stopping");
}
