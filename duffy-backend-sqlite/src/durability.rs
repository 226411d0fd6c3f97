//! Durability off the writer's path: the syncer thread.
//!
//! With [`Synchronous::Full`](crate::Synchronous::Full) the store promises
//! what SQLite's `synchronous=FULL` promises in WAL mode: a caller is told
//! an operation succeeded only once the WAL frames holding it are fsynced,
//! and a reader never sees a change that is not yet on disk. SQLite keeps
//! that promise by fsyncing inside `COMMIT`, with the write lock held:
//! the writer thread then sits idle for the whole fsync, and every
//! operation that arrives meanwhile waits for it. On these machines an
//! fsync costs from 0.1 to several milliseconds, so it set the pace.
//!
//! Here the write connection runs with SQLite's `synchronous=NORMAL`
//! (commits are written to the WAL but not fsynced; checkpoints still sync
//! the WAL before copying it and the database after) and the writer hands
//! each committed batch to the syncer thread, which fsyncs the WAL file
//! (`fdatasync` on its own handle: it flushes the file, whoever wrote it)
//! for every batch that arrived since its last fsync, and only then
//! answers their callers. Meanwhile the writer is already running the next
//! batch, so CPU work and fsyncs overlap and batches grow while a slow
//! fsync is in flight. When there is nothing to overlap (no operation is
//! queued and every earlier batch is durable) the writer makes its batch
//! durable itself, through the same [`Syncing::settle`]: one job at a
//! time, handing the batch to the syncer only added a thread wake-up to
//! every request.
//!
//! Readers: the writer counts a batch as possibly visible *before* its
//! `COMMIT`, and the syncer counts batches durable after their fsync. A
//! read notes the visible count after its query ran; if that is ahead of
//! the durable count, its answer is held until the fsync in flight
//! completes (it never waits for the writer's queue or locks). So readers
//! see only durable data, as with SQLite's own FULL.
//!
//! If an fsync fails, the covered operations get an error, and the store
//! refuses every later write and every read it cannot vouch for: after a
//! failed fsync the file's state is unknown (Linux may have dropped the
//! dirty pages). Reopen the store to recover from the WAL.

use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex, MutexGuard};

use duffy_core::StoreError;
use tracing::{debug, error};

use crate::WalSync;
use crate::writer::{Counters, Finish};

/// A read's answer, released once what it saw is durable (or with the
/// error that stopped that).
pub(crate) type Release = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

/// The fsync that failed, kept to explain every later refusal.
type Failure = Arc<std::io::Error>;

#[derive(Default)]
struct State {
    durable: u64,
    waiting: Vec<(u64, Release)>,
    failed: Option<Failure>,
}

/// Visible and durable batch counts, and the reads waiting between them.
#[derive(Default)]
pub(crate) struct Durability {
    visible: AtomicU64,
    durable: AtomicU64,
    state: Mutex<State>,
}

impl Durability {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Called by the writer just before `COMMIT`: the batch's sequence
    /// number.
    pub(crate) fn next_visible(&self) -> u64 {
        self.visible.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Batches that may be visible to a reader now.
    pub(crate) fn visible(&self) -> u64 {
        self.visible.load(Ordering::SeqCst)
    }

    /// Batches known to be on disk.
    pub(crate) fn durable(&self) -> u64 {
        self.durable.load(Ordering::SeqCst)
    }

    /// The failure that stopped the store, if any.
    pub(crate) fn failure(&self) -> Option<StoreError> {
        self.lock().failed.as_ref().map(failed_error)
    }

    /// Runs `release` once every batch up to `seen` is durable.
    pub(crate) fn when_durable(&self, seen: u64, release: Release) {
        if self.durable.load(Ordering::SeqCst) >= seen {
            return release(Ok(()));
        }
        let mut s = self.lock();
        if s.durable >= seen {
            drop(s);
            release(Ok(()));
        } else if let Some(e) = &s.failed {
            let e = failed_error(e);
            drop(s);
            release(Err(e));
        } else {
            s.waiting.push((seen, release));
        }
    }

    fn advance(&self, to: u64) {
        let ready: Vec<Release> = {
            let mut s = self.lock();
            s.durable = s.durable.max(to);
            self.durable.store(s.durable, Ordering::SeqCst);
            let (ready, wait): (Vec<_>, Vec<_>) =
                std::mem::take(&mut s.waiting).into_iter().partition(|(n, _)| *n <= to);
            s.waiting = wait;
            ready.into_iter().map(|(_, r)| r).collect()
        };
        for r in ready {
            r(Ok(()));
        }
    }

    fn fail(&self, e: Failure) {
        let waiting = {
            let mut s = self.lock();
            s.failed = Some(Arc::clone(&e));
            std::mem::take(&mut s.waiting)
        };
        for (_, r) in waiting {
            r(Err(failed_error(&e)));
        }
    }
}

fn failed_error(e: &Failure) -> StoreError {
    StoreError::backend("an fsync of the WAL failed earlier; reopen the store", Arc::clone(e))
}

/// A committed (or failed) batch on its way to the syncer, in commit order.
pub(crate) struct Synced {
    /// Its sequence number from [`Durability::next_visible`].
    pub(crate) seq: u64,
    /// The callers to answer once it is durable (empty if its COMMIT
    /// failed: they were answered already).
    pub(crate) done: Vec<Box<dyn Finish>>,
}

/// How the syncer makes the WAL durable, and the deliberately broken
/// variants the tests use to show that their checks can fail (see
/// [`TestHooks`](crate::TestHooks)).
#[derive(Default)]
pub(crate) struct SyncPolicy {
    /// Replaces `fdatasync` (a slow or failing disk in tests).
    pub(crate) wal_sync: Option<WalSync>,
    /// Broken: callers are answered before the fsync.
    pub(crate) answer_before_sync: bool,
    /// Broken: reads are released before the fsync.
    pub(crate) release_reads_before_sync: bool,
}

impl SyncPolicy {
    fn sync(&self, wal: &File) -> std::io::Result<()> {
        match &self.wal_sync {
            Some(f) => f(wal),
            None => wal.sync_data(),
        }
    }
}

/// What makes committed batches durable, shared by the syncer thread and
/// the writer (which fsyncs a batch itself when nothing else is waiting:
/// see [`crate::writer`]).
pub(crate) struct Syncing {
    /// The store's own handle on the WAL file.
    pub(crate) wal: File,
    pub(crate) durability: Arc<Durability>,
    pub(crate) counters: Arc<Counters>,
    pub(crate) policy: SyncPolicy,
}

impl Syncing {
    /// Makes `items` durable with one fsync (none if no caller waits on
    /// them), then releases the reads that saw them and answers their
    /// callers; or, if the fsync fails, fails them and the store. Empties
    /// `items`.
    pub(crate) fn settle(&self, items: &mut Vec<Synced>) {
        let (durability, policy) = (&self.durability, &self.policy);
        let last = items.iter().map(|i| i.seq).max().unwrap_or(0);
        let needed = items.iter().any(|i| !i.done.is_empty());
        let failed = durability.lock().failed.clone();
        if failed.is_none() && policy.release_reads_before_sync {
            durability.advance(last);
        }
        if failed.is_none() && policy.answer_before_sync {
            for item in items.iter_mut() {
                for f in item.done.drain(..) {
                    f.send();
                }
            }
        }
        let synced = match failed {
            Some(e) => Err(e),
            None if needed => {
                self.counters.syncs.fetch_add(1, Ordering::Relaxed);
                let started = std::time::Instant::now();
                let synced = policy.sync(&self.wal).map_err(Arc::new);
                self.counters.distributions.fsync(started.elapsed());
                synced
            }
            None => Ok(()),
        };
        match synced {
            Ok(()) => {
                durability.advance(last);
                for item in items.drain(..) {
                    for f in item.done {
                        f.send();
                    }
                }
            }
            Err(e) => {
                error!(error = %e, "fsync of the WAL failed; the store refuses writes until reopened");
                durability.fail(Arc::clone(&e));
                for item in items.drain(..) {
                    for f in item.done {
                        f.fail(&|| StoreError::backend("syncing the WAL to disk", Arc::clone(&e)));
                    }
                }
            }
        }
    }
}

/// The syncer thread's body: until the writer is gone. Each round makes
/// every batch that arrived since the last one durable with one fsync.
pub(crate) fn run(syncing: Arc<Syncing>, rx: Receiver<Synced>) {
    let mut items: Vec<Synced> = Vec::new();
    while let Ok(first) = rx.recv() {
        items.push(first);
        while let Ok(more) = rx.try_recv() {
            items.push(more);
        }
        syncing.settle(&mut items);
    }
    debug!("SQLite syncer thread stopping");
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;

    fn probe(d: &Durability, seen: u64) -> mpsc::Receiver<Result<(), String>> {
        let (tx, rx) = mpsc::channel();
        d.when_durable(
            seen,
            Box::new(move |r| {
                let _ = tx.send(r.map_err(|e| e.to_string()));
            }),
        );
        rx
    }

    #[test]
    fn reads_wait_only_for_batches_they_may_have_seen() {
        let d = Durability::default();
        assert_eq!(probe(&d, 0).try_recv(), Ok(Ok(())), "nothing committed: answered at once");
        let s1 = d.next_visible();
        let s2 = d.next_visible();
        assert_eq!((s1, s2, d.visible()), (1, 2, 2));
        let saw_one = probe(&d, 1);
        let saw_two = probe(&d, 2);
        assert!(saw_one.try_recv().is_err(), "held while batch 1's fsync is in flight");
        d.advance(1);
        assert_eq!(saw_one.try_recv(), Ok(Ok(())));
        assert!(saw_two.try_recv().is_err(), "batch 2 is not durable yet");
        d.advance(2);
        assert_eq!(saw_two.try_recv(), Ok(Ok(())));
        assert_eq!(probe(&d, 2).try_recv(), Ok(Ok(())), "durable: answered at once");
    }

    #[test]
    fn a_failed_fsync_fails_waiting_and_later_reads() {
        let d = Durability::default();
        d.next_visible();
        let waiting = probe(&d, 1);
        d.fail(Arc::new(std::io::Error::other("EIO")));
        assert!(matches!(waiting.try_recv(), Ok(Err(e)) if e.contains("fsync")));
        assert!(matches!(probe(&d, 1).try_recv(), Ok(Err(_))));
        assert!(d.failure().is_some(), "the writer refuses from now on");
        assert_eq!(probe(&d, 0).try_recv(), Ok(Ok(())), "what was durable before still reads");
    }
}
