//! The writer thread and group commit.
//!
//! One thread owns the write connection. Write operations arrive over a
//! channel, each with a oneshot for its answer. The thread takes the first
//! waiting operation, drains whatever else is queued (up to the maximum
//! batch), and runs them all in one `BEGIN IMMEDIATE` transaction, each
//! inside its own `SAVEPOINT`: an operation that is refused (a claim that
//! finds too few nodes, a compare-and-set conflict, a failed guard, bad
//! input) or fails is rolled back to its savepoint, and its batch-mates
//! keep their writes. Then one `COMMIT` (one fsync in `synchronous=FULL`)
//! makes the whole batch durable, and only then does every caller get its
//! answer. If the transaction as a whole fails (`BEGIN`, a savepoint, or
//! `COMMIT`), nothing of the batch was written and every caller gets an
//! error.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SendError, Sender, TryRecvError};
use std::time::Instant;

use duffy_core::store::{claim_writes, hand_back_writes};
use duffy_core::{
    Actor, ApiKeyHash, ApiKeyRecord, Batch, ClaimRefusal, ClaimRequest, Claimed, CommitError, Event, Guard, HandBack,
    HandBackKind, HandBackRefusal, KeyId, NewNode, Node, NodeId, PoolTarget, Project, Session, StorageFault,
    StoreError, Timestamp, model::validate_token,
};
use futures::channel::oneshot;
use rusqlite::Connection;
use tracing::{debug, error, info, trace};

use crate::durability::{Durability, Synced, Syncing};
use crate::queries as q;

/// Counters of the writer's work, for tests, benchmarks and metrics.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) transactions: AtomicU64,
    pub(crate) operations: AtomicU64,
    pub(crate) failed_transactions: AtomicU64,
    pub(crate) syncs: AtomicU64,
    /// Set by the checkpointer when the WAL has grown past
    /// [`RESTART_FRAMES`](crate::checkpointer::RESTART_FRAMES): the writer
    /// finishes the checkpoint between two batches so the WAL can restart.
    pub(crate) restart_wanted: AtomicBool,
    pub(crate) wal_restarts: AtomicU64,
    /// Batch sizes and fsync latencies.
    pub(crate) distributions: crate::stats::WriteDistributions,
    /// Why the last write transaction failed, while no later one has
    /// committed: the store's health (`Store::health`) reads it.
    pub(crate) last_failure: std::sync::Mutex<Option<String>>,
}

impl Counters {
    fn set_failure(&self, why: Option<String>) {
        *self.last_failure.lock().unwrap_or_else(|p| p.into_inner()) = why;
    }
}

/// The answer channel of one operation.
pub(crate) type Reply<T> = oneshot::Sender<T>;

/// A write operation queued for the writer thread.
pub(crate) enum Op {
    AddNodes {
        nodes: Vec<NewNode>,
        actor: Actor,
        now: Timestamp,
        reply: Reply<Result<Vec<Node>, StoreError>>,
    },
    Claim {
        req: ClaimRequest,
        reply: Reply<Result<Result<Claimed, ClaimRefusal>, StoreError>>,
    },
    Commit {
        batch: Batch,
        reply: Reply<Result<(), CommitError>>,
    },
    CommitFenced {
        batch: Batch,
        epoch: u64,
        reply: Reply<Result<(), CommitError>>,
    },
    NewLeaderEpoch {
        reply: Reply<Result<u64, StoreError>>,
    },
    HandBack {
        req: HandBack,
        reply: Reply<Result<Result<Session, HandBackRefusal>, CommitError>>,
    },
    CommitEach {
        batches: Vec<Batch>,
        reply: Reply<Vec<Result<(), CommitError>>>,
    },
    UpsertProject {
        project: Project,
        reply: Reply<Result<(), StoreError>>,
    },
    AddApiKey {
        project: String,
        hash: ApiKeyHash,
        admin: bool,
        now: Timestamp,
        expires_at: Option<Timestamp>,
        reply: Reply<Result<ApiKeyRecord, StoreError>>,
    },
    RevokeApiKey {
        id: KeyId,
        now: Timestamp,
        reply: Reply<Result<ApiKeyRecord, StoreError>>,
    },
    RecordKeyUse {
        used: Vec<(KeyId, Timestamp)>,
        reply: Reply<Result<(), StoreError>>,
    },
    SetPoolTarget {
        target: PoolTarget,
        reply: Reply<Result<(), StoreError>>,
    },
    SetPaused {
        paused: bool,
        reply: Reply<Result<bool, StoreError>>,
    },
    /// An install ticket write (see the `tickets` module).
    Tickets(crate::tickets::TicketOp),
}

/// An operation's answer, held until its transaction commits (and, with
/// `Synchronous::Full`, until the syncer has fsynced it).
pub(crate) trait Finish: Send {
    /// The transaction committed: send the answer.
    fn send(self: Box<Self>);
    /// The transaction failed: send errors made by `err` instead (one per
    /// answer the operation owes).
    fn fail(self: Box<Self>, err: &dyn Fn() -> StoreError);
}

struct Outcome<T> {
    reply: Reply<T>,
    value: T,
    on_fail: fn(StoreError) -> T,
}

impl<T: Send> Finish for Outcome<T> {
    fn send(self: Box<Self>) {
        // A caller that stopped waiting (its future was dropped) is not an
        // error: the operation happened all the same.
        let _ = self.reply.send(self.value);
    }
    fn fail(self: Box<Self>, err: &dyn Fn() -> StoreError) {
        let _ = self.reply.send((self.on_fail)(err()));
    }
}

/// The answers of a [`Op::CommitEach`]: one per batch.
struct EachOutcome {
    reply: Reply<Vec<Result<(), CommitError>>>,
    value: Vec<Result<(), CommitError>>,
    batches: usize,
}

impl Finish for EachOutcome {
    fn send(self: Box<Self>) {
        let _ = self.reply.send(self.value);
    }
    fn fail(self: Box<Self>, err: &dyn Fn() -> StoreError) {
        let _ = self.reply.send((0..self.batches).map(|_| Err(CommitError::Store(err()))).collect());
    }
}

fn store_err<T>(e: StoreError) -> Result<T, StoreError> {
    Err(e)
}

fn commit_err(e: StoreError) -> Result<(), CommitError> {
    Err(CommitError::Store(e))
}

pub(crate) fn outcome<T: Send + 'static>(reply: Reply<T>, value: T, on_fail: fn(StoreError) -> T) -> Box<dyn Finish> {
    Box::new(Outcome { reply, value, on_fail })
}

impl Op {
    fn name(&self) -> &'static str {
        match self {
            Op::AddNodes { .. } => "add_nodes",
            Op::Claim { .. } => "claim",
            Op::Commit { .. } => "commit",
            Op::CommitFenced { .. } => "commit_fenced",
            Op::NewLeaderEpoch { .. } => "new_leader_epoch",
            Op::HandBack { .. } => "hand_back",
            Op::CommitEach { .. } => "commit_each",
            Op::UpsertProject { .. } => "upsert_project",
            Op::AddApiKey { .. } => "add_api_key",
            Op::RevokeApiKey { .. } => "revoke_api_key",
            Op::RecordKeyUse { .. } => "record_key_use",
            Op::SetPoolTarget { .. } => "set_pool_target",
            Op::SetPaused { .. } => "set_paused",
            Op::Tickets(_) => "install_tickets",
        }
    }

    /// Whether the operation runs inside a savepoint of its own: only
    /// those that can be refused after they started writing need one (a
    /// guard is checked on the state the writes leave). The hot ones —
    /// claims, compare-and-set commits without guards, hand-backs without
    /// a fail cap — check everything before their first write, so a
    /// refusal has nothing to undo, and they skip the savepoint and its
    /// copy of every page they touch.
    fn needs_savepoint(&self) -> bool {
        match self {
            // Each batch with a guard gets a savepoint of its own inside.
            Op::Claim { .. } | Op::CommitEach { .. } => false,
            Op::Commit { batch, .. } => !batch.guards.is_empty(),
            Op::HandBack { req, .. } => matches!(req.kind, HandBackKind::Fail { fail_cap: Some(_), .. }),
            _ => true,
        }
    }

    /// Runs the operation on the open transaction (inside its savepoint,
    /// if it has one). Returns its answer and whether its writes are to be
    /// kept; sets `wrote` once it has started writing.
    fn run(self, conn: &Connection, wrote: &mut bool) -> (Box<dyn Finish>, bool) {
        match self {
            Op::AddNodes { nodes, actor, now, reply } => {
                *wrote = true;
                let v = add_nodes(conn, nodes, actor, now);
                let keep = v.is_ok();
                (outcome(reply, v, store_err), keep)
            }
            Op::Claim { req, reply } => {
                let v = claim(conn, req, wrote);
                let keep = matches!(v, Ok(Ok(_)));
                (outcome(reply, v, store_err), keep)
            }
            Op::Commit { batch, reply } => {
                let v = commit(conn, batch, wrote);
                let keep = v.is_ok();
                (outcome(reply, v, commit_err), keep)
            }
            Op::CommitFenced { batch, epoch, reply } => {
                let v = commit_fenced(conn, batch, epoch, wrote);
                let keep = v.is_ok();
                (outcome(reply, v, commit_err), keep)
            }
            Op::NewLeaderEpoch { reply } => {
                let v = q::bump_leader_epoch(conn).and_then(|()| q::leader_epoch(conn));
                let keep = v.is_ok();
                (outcome(reply, v, store_err), keep)
            }
            Op::HandBack { req, reply } => {
                let v = hand_back(conn, &req, wrote);
                let keep = matches!(v, Ok(Ok(_)));
                (outcome(reply, v, |e| Err(CommitError::Store(e))), keep)
            }
            Op::CommitEach { batches, reply } => {
                let n = batches.len();
                let (value, keep) = commit_each(conn, batches, wrote);
                (Box::new(EachOutcome { reply, value, batches: n }), keep)
            }
            Op::UpsertProject { project, reply } => {
                let v = upsert_project(conn, &project);
                let keep = v.is_ok();
                (outcome(reply, v, store_err), keep)
            }
            Op::AddApiKey { project, hash, admin, now, expires_at, reply } => {
                let v = add_api_key(conn, project, hash, admin, now, expires_at);
                let keep = v.is_ok();
                (outcome(reply, v, store_err), keep)
            }
            Op::RevokeApiKey { id, now, reply } => {
                let v = revoke_api_key(conn, id, now);
                let keep = v.is_ok();
                (outcome(reply, v, store_err), keep)
            }
            Op::RecordKeyUse { used, reply } => {
                let v = used.iter().try_for_each(|(id, at)| q::record_key_use(conn, *id, *at));
                let keep = v.is_ok();
                (outcome(reply, v, store_err), keep)
            }
            Op::SetPoolTarget { target, reply } => {
                let v = set_pool_target(conn, &target);
                let keep = v.is_ok();
                (outcome(reply, v, store_err), keep)
            }
            Op::SetPaused { paused, reply } => {
                let v = set_paused(conn, paused);
                let keep = v.is_ok();
                (outcome(reply, v, store_err), keep)
            }
            Op::Tickets(op) => op.run(conn, wrote),
        }
    }

    /// Answers without running: the batch's transaction failed.
    fn fail(self, err: &dyn Fn() -> StoreError) {
        if let Op::CommitEach { batches, reply } = self {
            let _ = reply.send(batches.iter().map(|_| Err(CommitError::Store(err()))).collect());
            return;
        }
        let err = err();
        match self {
            Op::AddNodes { reply, .. } => {
                let _ = reply.send(Err(err));
            }
            Op::Claim { reply, .. } => {
                let _ = reply.send(Err(err));
            }
            Op::Commit { reply, .. } | Op::CommitFenced { reply, .. } => {
                let _ = reply.send(Err(CommitError::Store(err)));
            }
            Op::NewLeaderEpoch { reply } => {
                let _ = reply.send(Err(err));
            }
            Op::HandBack { reply, .. } => {
                let _ = reply.send(Err(CommitError::Store(err)));
            }
            Op::CommitEach { .. } => {}
            Op::UpsertProject { reply, .. } => {
                let _ = reply.send(Err(err));
            }
            Op::AddApiKey { reply, .. } | Op::RevokeApiKey { reply, .. } => {
                let _ = reply.send(Err(err));
            }
            Op::RecordKeyUse { reply, .. } => {
                let _ = reply.send(Err(err));
            }
            Op::SetPoolTarget { reply, .. } => {
                let _ = reply.send(Err(err));
            }
            Op::SetPaused { reply, .. } => {
                let _ = reply.send(Err(err));
            }
            Op::Tickets(op) => op.fail(err),
        }
    }
}

/// Where committed batches go: straight to their callers
/// (`Synchronous::Normal`), or to the syncer thread first (`Full`).
pub(crate) struct Sink {
    /// The syncer thread's queue, and what it syncs with (the writer uses
    /// that itself for a batch nobody else is waiting behind).
    pub(crate) syncer: Option<(Sender<Synced>, Arc<Syncing>)>,
    pub(crate) durability: Arc<Durability>,
    /// Broken on purpose for a test: never finish a checkpoint (see
    /// [`TestHooks::skip_writer_checkpoint`](crate::TestHooks)).
    pub(crate) skip_checkpoints: bool,
    /// Whether the writer fsyncs a batch itself when the syncer is idle
    /// and nothing waits (off only for a test, see
    /// [`TestHooks::syncer_only`](crate::TestHooks)).
    pub(crate) inline_sync: bool,
}

/// Where the writer's time went, per kind of operation and for the
/// transactions' `BEGIN` and `COMMIT`: logged when the writer stops, for
/// profiling (the clock is read twice per operation, a few tens of
/// nanoseconds).
#[derive(Default)]
struct Timings {
    /// Per operation name: how many ran, and their time in nanoseconds.
    ops: Vec<(&'static str, u64, u64)>,
    /// `BEGIN`/`COMMIT` (and the batch's checkpoint, if any): count and
    /// nanoseconds.
    transaction: (u64, u64),
}

impl Timings {
    fn op(&mut self, name: &'static str, nanos: u64) {
        match self.ops.iter_mut().find(|(n, _, _)| *n == name) {
            Some(e) => {
                e.1 += 1;
                e.2 += nanos;
            }
            None => self.ops.push((name, 1, nanos)),
        }
    }

    fn log(&self) {
        let per = |(count, nanos): (u64, u64)| nanos.checked_div(count).unwrap_or(0) / 1000;
        let ops: Vec<String> = self
            .ops
            .iter()
            .map(|(name, count, nanos)| format!("{name}: {count} x {} us", per((*count, *nanos))))
            .collect();
        info!(
            operations = %ops.join(", "),
            transactions = self.transaction.0,
            begin_commit_us = per(self.transaction),
            "SQLite writer time per operation"
        );
    }
}

fn nanos(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// The writer thread's body: batches until every sender is gone.
pub(crate) fn run(conn: Connection, rx: Receiver<Op>, max_batch: usize, counters: Arc<Counters>, sink: Sink) {
    debug!(max_batch, "SQLite writer thread started");
    let mut ops = Vec::with_capacity(max_batch);
    let mut timings = Timings::default();
    // An operation taken off the queue to see whether one was waiting
    // (see `run_batch`): the first of the next batch.
    let mut next: Option<Op> = None;
    loop {
        let first = match next.take() {
            Some(op) => op,
            None => match rx.recv() {
                Ok(op) => op,
                Err(_) => break,
            },
        };
        ops.push(first);
        while ops.len() < max_batch {
            match rx.try_recv() {
                Ok(op) => ops.push(op),
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            }
        }
        let mut queued = || {
            if next.is_none() {
                next = rx.try_recv().ok();
            }
            next.is_some()
        };
        run_batch(&conn, &mut ops, &counters, &sink, &mut timings, &mut queued);
    }
    timings.log();
    debug!("SQLite writer thread stopping: the store was dropped");
}

/// The error every operation of a batch gets when its transaction fails
/// as a whole.
type Shared = Arc<dyn std::error::Error + Send + Sync>;

/// SQLite itself rolled the transaction back after an operation's error
/// (it does so on some I/O and out-of-memory errors).
#[derive(Debug, thiserror::Error)]
#[error("SQLite rolled back the whole transaction after an error in one of its operations")]
struct RolledBack;

/// An operation without a savepoint of its own failed after it had
/// started writing (an I/O error, say).
#[derive(Debug, thiserror::Error)]
#[error("an operation failed after it had started writing; the whole transaction is rolled back")]
struct FailedMidWrite;

/// An I/O error of the transaction, with what the store found out about
/// its cause.
#[derive(Debug, thiserror::Error)]
#[error("{source} ({cause})")]
struct Diagnosed {
    source: rusqlite::Error,
    cause: String,
    fault: StorageFault,
}

/// SQLite reports a read-only file system as a plain "disk I/O error"
/// (it keeps the OS error to itself): when a write transaction fails with
/// an I/O error, look at the file system, so the error says what is wrong.
fn diagnose(conn: &Connection, e: rusqlite::Error) -> Shared {
    let io =
        matches!(e.sqlite_error_code(), Some(rusqlite::ErrorCode::SystemIoFailure | rusqlite::ErrorCode::ReadOnly));
    let Some(path) = conn.path().filter(|p| io && !p.is_empty()) else { return Arc::new(e) };
    let mut wal = std::ffi::OsString::from(path);
    wal.push("-wal");
    // Opening for writing (no create, no truncate) changes nothing.
    match std::fs::OpenOptions::new().write(true).open(&wal) {
        Err(probe) if probe.kind() == std::io::ErrorKind::ReadOnlyFilesystem => Arc::new(Diagnosed {
            source: e,
            cause: format!("the file system holding {path} is read-only"),
            fault: StorageFault::ReadOnly,
        }),
        _ => Arc::new(e),
    }
}

fn exec(conn: &Connection, sql: &str) -> Result<(), rusqlite::Error> {
    conn.prepare_cached(sql)?.execute([])?;
    Ok(())
}

/// Completes the checkpoint the checkpointer thread could not: it copies
/// most of the WAL in the background, but while the writer keeps appending
/// it never reaches the end, and SQLite restarts the WAL from its beginning
/// only once every frame is copied. Run between two batches, with nothing
/// appended meanwhile, this copies what was appended since the
/// checkpointer's last pass, and the next write transaction restarts the
/// WAL. Without it the WAL grows until the writer's own (much larger)
/// auto-checkpoint, and every page lookup gets slower with its size.
fn finish_checkpoint(conn: &Connection, counters: &Counters) {
    let r = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
        Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
    });
    match r {
        Ok((busy, log, done)) => {
            if busy == 0 && log == done {
                counters.wal_restarts.fetch_add(1, Ordering::Relaxed);
            }
            trace!(busy, log, done, "writer finished a checkpoint");
        }
        Err(e) => debug!(error = %e, "the writer's checkpoint failed; the checkpointer will ask again"),
    }
}

/// Runs one batch in one transaction and answers every caller.
/// Runs `ops` in one transaction and hands the committed batch on.
/// `queued` says whether another operation is waiting for the writer.
fn run_batch(
    conn: &Connection,
    ops: &mut Vec<Op>,
    counters: &Counters,
    sink: &Sink,
    timings: &mut Timings,
    queued: &mut dyn FnMut() -> bool,
) {
    let n = ops.len();
    let mut in_ops = 0u64;
    if counters.restart_wanted.swap(false, Ordering::Relaxed) && !sink.skip_checkpoints {
        finish_checkpoint(conn, counters);
    }
    if let Some(e) = sink.durability.failure() {
        // An fsync failed: nothing more is written until the store is
        // reopened.
        let e: Shared = Arc::new(e);
        for op in ops.drain(..) {
            op.fail(&|| StoreError::backend("refusing writes", Arc::clone(&e)));
        }
        return;
    }
    let started = Instant::now();
    counters.transactions.fetch_add(1, Ordering::Relaxed);
    counters.operations.fetch_add(n as u64, Ordering::Relaxed);
    counters.distributions.batch(n);
    let mut done: Vec<Box<dyn Finish>> = Vec::with_capacity(n);
    let mut rest: Vec<Op> = Vec::new();
    let mut refused = 0usize;
    let mut lost: Option<(String, Shared)> = None;
    if let Err(e) = exec(conn, "BEGIN IMMEDIATE") {
        lost = Some(("starting a write transaction".to_string(), diagnose(conn, e)));
        rest.append(ops);
    }
    let mut pending = ops.drain(..);
    for op in pending.by_ref() {
        let name = op.name();
        let savepoint = op.needs_savepoint();
        if savepoint {
            if let Err(e) = exec(conn, "SAVEPOINT op") {
                lost = Some((format!("opening a savepoint for {name}"), Arc::new(e)));
                rest.push(op);
                break;
            }
        }
        let mut wrote = false;
        let op_started = Instant::now();
        let (finish, keep) = op.run(conn, &mut wrote);
        let took = nanos(op_started);
        timings.op(name, took);
        in_ops += took;
        done.push(finish);
        if conn.is_autocommit() {
            lost = Some((format!("running {name}"), Arc::new(RolledBack)));
            break;
        }
        if !keep {
            refused += 1;
        }
        if !savepoint {
            // Refused before its first write: nothing to undo. Failed
            // after it: its writes cannot be undone alone, so the batch
            // is not committed (every caller hears of it).
            if !keep && wrote {
                lost = Some((format!("running {name}"), Arc::new(FailedMidWrite)));
                break;
            }
            continue;
        }
        let closed = if keep {
            exec(conn, "RELEASE op")
        } else {
            exec(conn, "ROLLBACK TO op").and_then(|()| exec(conn, "RELEASE op"))
        };
        if let Err(e) = closed {
            lost = Some((format!("closing the savepoint of {name}"), Arc::new(e)));
            break;
        }
    }
    rest.extend(pending);
    if lost.is_none() {
        // Counted before COMMIT: a reader that sees this batch sees the
        // count too, and waits for its fsync.
        let seq = sink.syncer.as_ref().map(|_| sink.durability.next_visible());
        match exec(conn, "COMMIT") {
            Ok(()) => {
                timings.transaction.0 += 1;
                timings.transaction.1 += nanos(started).saturating_sub(in_ops);
                trace!(ops = n, refused, elapsed_us = started.elapsed().as_micros() as u64, "committed a batch");
                counters.set_failure(None);
                match (&sink.syncer, seq) {
                    // Every earlier batch is durable (the syncer is idle)
                    // and no operation waits: the writer fsyncs this one
                    // itself, as SQLite's FULL would, and its callers do
                    // not wait for the syncer thread to wake. One job at a
                    // time, that hand-off was a large part of a request's
                    // time. Otherwise the syncer takes it, and the writer
                    // goes on with the next batch meanwhile.
                    (Some((_, syncing)), Some(seq))
                        if sink.inline_sync && sink.durability.durable() + 1 == seq && !queued() =>
                    {
                        syncing.settle(&mut vec![Synced { seq, done }]);
                    }
                    (Some((syncer, _)), Some(seq)) => {
                        if let Err(SendError(item)) = syncer.send(Synced { seq, done }) {
                            for f in item.done {
                                f.fail(&|| StoreError::Closed);
                            }
                        }
                    }
                    _ => {
                        for f in done {
                            f.send();
                        }
                    }
                }
                return;
            }
            Err(e) => {
                if let (Some((syncer, _)), Some(seq)) = (&sink.syncer, seq) {
                    // Nothing of it became visible; the sequence moves on.
                    let _ = syncer.send(Synced { seq, done: Vec::new() });
                }
                lost = Some((format!("committing a batch of {n} operations"), diagnose(conn, e)));
            }
        }
    }
    // The transaction failed as a whole: nothing of the batch is written,
    // and every caller is told so.
    let (context, e) = lost.unwrap_or_else(|| ("committing".to_string(), Arc::new(RolledBack)));
    counters.failed_transactions.fetch_add(1, Ordering::Relaxed);
    error!(error = %e, context, ops = n, "a write transaction failed; failing its whole batch");
    if !conn.is_autocommit() {
        if let Err(e) = exec(conn, "ROLLBACK") {
            error!(error = %e, "could not roll back the failed transaction");
        }
    }
    let fault = storage_fault(&e);
    counters.set_failure(Some(match fault {
        Some(f) => format!("writes are failing: {f}"),
        None => "writes are failing".to_string(),
    }));
    let err = || match fault {
        Some(fault) => StoreError::Unavailable { context: context.clone(), fault, source: Box::new(Arc::clone(&e)) },
        None => StoreError::backend(context.clone(), Arc::clone(&e)),
    };
    for f in done {
        f.fail(&err);
    }
    for op in rest {
        op.fail(&err);
    }
}

/// Whether a failed transaction's error is a storage condition a caller
/// may be told about (see [`duffy_core::StorageFault`]).
fn storage_fault(e: &Shared) -> Option<StorageFault> {
    if let Some(d) = e.downcast_ref::<Diagnosed>() {
        return Some(d.fault);
    }
    match e.downcast_ref::<rusqlite::Error>()?.sqlite_error_code()? {
        rusqlite::ErrorCode::DiskFull => Some(StorageFault::DiskFull),
        rusqlite::ErrorCode::ReadOnly => Some(StorageFault::ReadOnly),
        _ => None,
    }
}

// ----- the operations, each on an open transaction -----

fn add_nodes(conn: &Connection, nodes: Vec<NewNode>, actor: Actor, now: Timestamp) -> Result<Vec<Node>, StoreError> {
    let mut names = HashSet::with_capacity(nodes.len());
    for n in &nodes {
        n.validate().map_err(|e| StoreError::Invalid(e.to_string()))?;
        if q::hostname_exists(conn, &n.hostname)? || !names.insert(n.hostname.as_str()) {
            return Err(StoreError::Duplicate(format!("node {}", n.hostname)));
        }
    }
    let mut out = Vec::with_capacity(nodes.len());
    for n in nodes {
        let mut node = n.into_node(NodeId(0), now);
        node.id = q::insert_node(conn, &node)?;
        let seq = q::insert_event(conn, &Event::added(&node, actor.clone()))?;
        q::set_last_event(conn, node.id, seq)?;
        out.push(node);
    }
    Ok(out)
}

/// A claim: every check first, then the writes (`wrote` is set before
/// the first one).
fn claim(conn: &Connection, req: ClaimRequest, wrote: &mut bool) -> Result<Result<Claimed, ClaimRefusal>, StoreError> {
    if req.count == 0 {
        return Err(StoreError::Invalid("a claim needs a count of at least 1".into()));
    }
    if q::session_version(conn, &req.session)?.is_some() {
        return Err(StoreError::Duplicate(format!("session {}", req.session)));
    }
    if req.check_target {
        match q::pool_standby(conn, &req.pool)? {
            Some(standby) if standby > 0 => {
                if req.count > standby {
                    return Ok(Err(ClaimRefusal::OverCapacity { requested: req.count, standby }));
                }
            }
            _ => {
                let available = q::pool_targets(conn)?.into_iter().filter(|t| t.standby > 0).map(|t| t.pool).collect();
                return Ok(Err(ClaimRefusal::NoSuchPool { available }));
            }
        }
    }
    if q::paused(conn)? {
        return Ok(Err(ClaimRefusal::Paused));
    }
    if let Some(limit) = req.rate_limit {
        let recent = q::recent_sessions(conn, req.key_id, req.now.minus(limit.window))?;
        if recent >= limit.max {
            return Ok(Err(ClaimRefusal::RateLimited { recent, limit }));
        }
    }
    if let Some(quota) = q::project_quota(conn, &req.project)?.or(req.default_quota) {
        let held = q::held_by_project(conn, &req.project)?;
        if held.saturating_add(req.count) > quota {
            return Ok(Err(ClaimRefusal::QuotaExceeded { held, requested: req.count, quota }));
        }
    }
    let chosen = q::claimable(conn, &req.pool, req.count)?;
    if chosen.len() < req.count as usize {
        let available = q::ready_in_pool(conn, &req.pool)?;
        return Ok(Err(ClaimRefusal::InsufficientNodes { requested: req.count, available }));
    }
    let (session, writes) = claim_writes(&req, &chosen).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let mut nodes = Vec::with_capacity(writes.len());
    *wrote = true;
    for w in writes {
        if !q::write_node(conn, &w)? {
            return Err(StoreError::Corrupt(format!("claim could not apply its own write of node {}", w.node.id)));
        }
        nodes.push(w.node);
    }
    q::insert_session(conn, &session)?;
    Ok(Ok(Claimed { session, nodes }))
}

fn commit(conn: &Connection, batch: Batch, wrote: &mut bool) -> Result<(), CommitError> {
    // Every expectation first, in MemStore's order: node versions, then
    // a node written twice, then session versions.
    for w in &batch.nodes {
        let ok = q::node_version(conn, w.node.id)? == Some(w.expected_version)
            && w.expected_version.checked_add(1) == Some(w.node.version);
        if !ok {
            return Err(CommitError::Conflict(format!("node {}", w.node.id)));
        }
    }
    let mut seen = HashSet::with_capacity(batch.nodes.len());
    if !batch.nodes.iter().all(|w| seen.insert(w.node.id)) {
        return Err(CommitError::Store(StoreError::Invalid("a batch writes the same node twice".into())));
    }
    for w in &batch.sessions {
        if q::session_version(conn, &w.session.id)? != w.expected_version {
            return Err(CommitError::Conflict(format!("session {}", w.session.id)));
        }
    }
    write_batch(conn, batch, wrote)
}

/// Many independent commits in one operation: each batch as [`commit`]
/// would write it, a batch with a guard inside a savepoint of its own
/// (only a guard can refuse after the writes). Returns each batch's answer
/// and whether the operation's writes are to be kept: not if a batch
/// without a savepoint failed after it had started writing (an I/O error,
/// say), which loses the whole transaction.
fn commit_each(conn: &Connection, batches: Vec<Batch>, wrote: &mut bool) -> (Vec<Result<(), CommitError>>, bool) {
    let mut out = Vec::with_capacity(batches.len());
    for batch in batches {
        let mut w = false;
        if batch.guards.is_empty() {
            let r = commit(conn, batch, &mut w);
            *wrote |= w;
            if r.is_err() && w {
                out.push(r);
                return (out, false);
            }
            out.push(r);
            continue;
        }
        if let Err(e) = exec(conn, "SAVEPOINT each") {
            out.push(Err(CommitError::Store(StoreError::backend("opening a savepoint", e))));
            continue;
        }
        let r = commit(conn, batch, &mut w);
        let closed = match &r {
            Ok(()) => exec(conn, "RELEASE each"),
            Err(_) => exec(conn, "ROLLBACK TO each").and_then(|()| exec(conn, "RELEASE each")),
        };
        if let Err(e) = closed {
            // The savepoint could not be closed: its writes cannot be
            // vouched for, so neither can the transaction's.
            *wrote = true;
            out.push(Err(CommitError::Store(StoreError::backend("closing a savepoint", e))));
            return (out, false);
        }
        *wrote |= w && r.is_ok();
        out.push(r);
    }
    (out, true)
}

/// A job's done or fail in one step: the session and its nodes are read
/// in the writer's own transaction, so nothing can change between the
/// read and the write, and no read has to wait for an fsync first.
fn hand_back(
    conn: &Connection,
    req: &HandBack,
    wrote: &mut bool,
) -> Result<Result<Session, HandBackRefusal>, CommitError> {
    let Some(session) = q::session(conn, &req.session)? else { return Ok(Err(HandBackRefusal::UnknownSession)) };
    if session.key_id != req.key_id {
        return Ok(Err(HandBackRefusal::UnknownSession));
    }
    let mut nodes = Vec::with_capacity(session.nodes.len());
    for id in &session.nodes {
        nodes.push(
            q::node(conn, *id)?
                .ok_or_else(|| StoreError::Corrupt(format!("session {} names missing node {id}", session.id)))?,
        );
    }
    let (batch, after) = match hand_back_writes(req, &session, &nodes)? {
        Ok(x) => x,
        Err(refusal) => return Ok(Err(refusal)),
    };
    write_batch(conn, batch, wrote)?;
    Ok(Ok(after))
}

/// Writes a batch whose expectations hold (checked by the caller, or read
/// in this transaction), then checks its guards on the result (the
/// caller's savepoint undoes the writes if one fails).
fn write_batch(conn: &Connection, batch: Batch, wrote: &mut bool) -> Result<(), CommitError> {
    *wrote = true;
    for w in &batch.nodes {
        if !q::write_node(conn, w)? {
            return Err(CommitError::Store(StoreError::Corrupt(format!(
                "node {} changed inside its own transaction",
                w.node.id
            ))));
        }
    }
    for w in &batch.sessions {
        match w.expected_version {
            None => q::insert_session(conn, &w.session)?,
            Some(_) => q::update_session(conn, &w.session)?,
        }
    }
    for g in &batch.guards {
        let Guard::ProjectFailedNodesAtMost { project, max } = g;
        let actual = q::failed_held_by_project(conn, project)?;
        if actual > u64::from(*max) {
            return Err(CommitError::GuardFailed { guard: g.clone(), actual });
        }
    }
    Ok(())
}

/// A batch of the leader of term `epoch`: written only if that is still
/// the newest term. The writer runs one operation at a time, so the check
/// and the write are one atomic step.
fn commit_fenced(conn: &Connection, batch: Batch, epoch: u64, wrote: &mut bool) -> Result<(), CommitError> {
    let current = q::leader_epoch(conn)?;
    if epoch != current {
        return Err(CommitError::Store(StoreError::Fenced { epoch, current }));
    }
    commit(conn, batch, wrote)
}

fn upsert_project(conn: &Connection, project: &Project) -> Result<(), StoreError> {
    validate_token("project name", &project.name, 64).map_err(|e| StoreError::Invalid(e.to_string()))?;
    q::put_project(conn, project)
}

fn add_api_key(
    conn: &Connection,
    project: String,
    hash: ApiKeyHash,
    admin: bool,
    now: Timestamp,
    expires_at: Option<Timestamp>,
) -> Result<ApiKeyRecord, StoreError> {
    if !q::project_exists(conn, &project)? {
        return Err(StoreError::NotFound(format!("project {project}")));
    }
    if q::api_key_by_hash(conn, &hash)?.is_some() {
        return Err(StoreError::Duplicate("API key".into()));
    }
    let id = q::insert_api_key(conn, &project, &hash, admin, now, expires_at)?;
    Ok(ApiKeyRecord { id, project, hash, admin, created_at: now, expires_at, revoked_at: None, last_used: None })
}

fn revoke_api_key(conn: &Connection, id: KeyId, now: Timestamp) -> Result<ApiKeyRecord, StoreError> {
    q::revoke_api_key(conn, id, now)?;
    q::api_key(conn, id)?.ok_or_else(|| StoreError::NotFound(format!("API key {id}")))
}

fn set_pool_target(conn: &Connection, target: &PoolTarget) -> Result<(), StoreError> {
    target.pool.validate().map_err(|e| StoreError::Invalid(e.to_string()))?;
    q::put_pool_target(conn, target)
}

fn set_paused(conn: &Connection, paused: bool) -> Result<bool, StoreError> {
    let was = q::paused(conn)?;
    q::set_paused(conn, paused)?;
    Ok(was)
}
