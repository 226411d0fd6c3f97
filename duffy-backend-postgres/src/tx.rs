//! Running a write transaction: pipelined, retried, and never applied
//! twice.
//!
//! An attempt sends `BEGIN`, a statement that fetches the transaction's id
//! (`pg_current_xact_id()`), and the operation's statements without
//! waiting between them (tokio-postgres pipelines requests made
//! concurrently on one connection, in the order they are first polled),
//! then looks at the answers and sends `COMMIT` (or `ROLLBACK`): two round
//! trips for most writes. `BEGIN` is enqueued first; if it failed the
//! connection failed, and nothing behind it ran. An operation whose own
//! first statements return the id ([`write_reporting_xid`]: a claim's
//! pick and a hand-back's read of its session, which lock the rows they
//! write, and a batch's node write) saves that statement, and a refusal
//! that locked nothing assigns no transaction id at all.
//!
//! - A serialization failure or a deadlock (SQLSTATE 40001, 40P01), or a
//!   connection lost before `COMMIT` was sent, means nothing was written:
//!   the attempt is retried (on another connection) after a jittered
//!   backoff, at most [`MAX_ATTEMPTS`] times.
//! - A connection lost after `COMMIT` was sent leaves the outcome unknown.
//!   The transaction's id is known by then (it was fetched before
//!   `COMMIT` was sent), so the store asks the database on a fresh
//!   connection what became of it (`pg_xact_status`): committed, the
//!   operation's answer stands; aborted, it is retried; never both, so an
//!   operation is never applied twice. (PostgreSQL keeps the status of
//!   every transaction; this costs no extra write per operation, unlike a
//!   table of request ids.)

use std::future::Future;
use std::time::Duration;

use deadpool_postgres::{Object, Pool, PoolError};
use duffy_core::StoreError;
use futures::FutureExt;
use futures::future::{BoxFuture, join3};
use rand::Rng;
use tokio_postgres::error::SqlState;
use tracing::{debug, warn};

/// Attempts per write before giving up.
pub(crate) const MAX_ATTEMPTS: u32 = 8;

/// How long an unknown outcome is looked into before giving up.
const RESOLVE_FOR: Duration = Duration::from_secs(30);

/// What an operation's statements decided.
pub(crate) enum Decision<T> {
    /// Commit, then answer `T`.
    Commit(T),
    /// Write nothing (a refusal), and answer `T`.
    Rollback(T),
    /// The statements sent `COMMIT` themselves, pipelined behind their
    /// last writes (see [`commit_pipelined`]), and it succeeded: answer
    /// `T`.
    Committed(T),
    /// The statements sent `COMMIT` themselves and the connection was lost
    /// before its answer: the outcome is unknown, and is resolved as for a
    /// `COMMIT` sent by the runner. `T` is the answer if it committed.
    CommitUnknown(T, tokio_postgres::Error),
}

/// Runs `writes` and `COMMIT` in one round trip: `COMMIT` goes out right
/// behind the writes' statements, without waiting for their answers. For
/// operations whose writes cannot be refused once their reads are done
/// (the rows are locked, and a write that does not apply fails its
/// statement, e.g. with `duffy_assert`): a failed statement aborts the
/// transaction, and the `COMMIT` behind it then commits nothing.
///
/// `writes` must send all of its statements when first polled (a join of
/// queries does). Called from an operation's statements after its reads,
/// so the transaction's id is known to the runner by then: a connection
/// lost now is an unknown outcome it can resolve.
pub(crate) async fn commit_pipelined<T, W>(
    conn: &Object,
    value: T,
    writes: W,
) -> Result<Decision<T>, tokio_postgres::Error>
where
    W: Future<Output = Result<(), tokio_postgres::Error>>,
{
    let (written, committed) = futures::future::join(writes, conn.batch_execute("COMMIT")).await;
    match (written, committed) {
        (Ok(()), Ok(())) => Ok(Decision::Committed(value)),
        // Lost before an answer to COMMIT: it may have committed.
        (_, Err(e)) if connection_lost(&e) => Ok(Decision::CommitUnknown(value, e)),
        // The server refused a statement (the COMMIT behind it rolled
        // back), or refused the COMMIT itself: nothing was written.
        (Err(e), _) | (Ok(()), Err(e)) => Err(e),
    }
}

/// What an operation that reports its own transaction id decided
/// ([`write_reporting_xid`]).
pub(crate) struct Reported<T> {
    /// The decision.
    pub(crate) decision: Decision<T>,
    /// The transaction's id (`pg_current_xact_id()` as text), read by the
    /// operation's statements before it sent or asked for `COMMIT`; `None`
    /// if they did not read it (then nothing may have been written: the
    /// runner asks for it before a `COMMIT` it sends, and an operation
    /// that sent its own `COMMIT` without it cannot resolve a lost
    /// answer).
    pub(crate) xid: Option<String>,
}

/// Counters of what the runner had to do, for tests and metrics.
#[derive(Debug, Default)]
pub(crate) struct TxCounters {
    pub(crate) retries: std::sync::atomic::AtomicU64,
    pub(crate) unknown_committed: std::sync::atomic::AtomicU64,
    pub(crate) unknown_aborted: std::sync::atomic::AtomicU64,
}

/// How the runner behaves, and what it counts.
#[derive(Debug, Default)]
pub(crate) struct TxConfig {
    pub(crate) counters: TxCounters,
    /// BROKEN ON PURPOSE (tests only): a lost COMMIT is retried blindly.
    pub(crate) unknown_outcome_is_abort: bool,
}

/// How a failed request is to be treated.
enum Failure {
    /// Nothing of the transaction can have been written; try again.
    Retry(tokio_postgres::Error),
    /// A real error: give up.
    Fatal(tokio_postgres::Error),
}

/// Whether `e` says the connection is gone (rather than that a statement
/// failed): closed, or the server ending the session.
pub(crate) fn connection_lost(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.code() {
        // Class 08: connection exception; 57P01–57P05: the server ended the
        // session (shutdown, termination, idle timeout).
        Some(c) => c.code().starts_with("08") || c.code().starts_with("57P"),
        None => e.to_string().contains("connection"),
    }
}

fn classify(e: tokio_postgres::Error) -> Failure {
    let retryable = matches!(e.code(), Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE
        || *c == SqlState::T_R_DEADLOCK_DETECTED);
    if retryable || connection_lost(&e) { Failure::Retry(e) } else { Failure::Fatal(e) }
}

/// A database error as the store's error, with what the store was doing.
pub(crate) fn store_error(what: &str, e: tokio_postgres::Error) -> StoreError {
    if e.code() == Some(&SqlState::UNIQUE_VIOLATION) {
        let detail = e.as_db_error().and_then(|d| d.detail()).unwrap_or("a unique value").to_string();
        return StoreError::Duplicate(detail);
    }
    StoreError::backend(what, e)
}

fn pool_error(what: &str, e: PoolError) -> Result<tokio_postgres::Error, StoreError> {
    match e {
        PoolError::Backend(e) => Ok(e),
        other => Err(StoreError::backend(format!("{what}: getting a connection"), other)),
    }
}

/// A jittered, doubling wait before attempt `attempt` (1-based).
pub(crate) async fn backoff(attempt: u32) {
    let base = 5u64 << attempt.min(6);
    let ms = rand::thread_rng().gen_range(base / 2..=base);
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

/// Runs the write `body` in a transaction on a connection of `pool` (see
/// the module documentation). `body` is called once per attempt.
pub(crate) async fn write<T, B>(pool: &Pool, config: &TxConfig, what: &str, body: B) -> Result<T, StoreError>
where
    T: Send + 'static,
    B: for<'c> Fn(&'c Object) -> BoxFuture<'c, Result<Decision<T>, tokio_postgres::Error>>,
{
    let reporting =
        reporting(move |c: &Object| body(c).map(|r| r.map(|decision| Reported { decision, xid: None })).boxed());
    run(pool, config, what, true, reporting).await
}

/// `f`, typed as a body for every connection lifetime (closures are not
/// inferred as such on their own).
fn reporting<T, F>(f: F) -> F
where
    F: for<'c> Fn(&'c Object) -> BoxFuture<'c, Result<Reported<T>, tokio_postgres::Error>>,
{
    f
}

/// [`write`], for an operation whose statements read the transaction's
/// id themselves (in a statement that runs anyway, once the transaction
/// has written or locked a row and so has an id): one statement fewer,
/// and a transaction that locks nothing (a refused claim) never gets an
/// id. `body` reports the id with its decision.
pub(crate) async fn write_reporting_xid<T, B>(
    pool: &Pool,
    config: &TxConfig,
    what: &str,
    body: B,
) -> Result<T, StoreError>
where
    T: Send,
    B: for<'c> Fn(&'c Object) -> BoxFuture<'c, Result<Reported<T>, tokio_postgres::Error>>,
{
    run(pool, config, what, false, body).await
}

/// The runner of [`write`] and [`write_reporting_xid`]: `fetch_xid`, whether
/// it reads the transaction's id itself.
async fn run<T, B>(pool: &Pool, config: &TxConfig, what: &str, fetch_xid: bool, body: B) -> Result<T, StoreError>
where
    T: Send,
    B: for<'c> Fn(&'c Object) -> BoxFuture<'c, Result<Reported<T>, tokio_postgres::Error>>,
{
    let counters = &config.counters;
    let mut last: Option<tokio_postgres::Error> = None;
    for attempt in 1..=MAX_ATTEMPTS {
        if attempt > 1 {
            counters.retries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            backoff(attempt).await;
        }
        let conn = match pool.get().await {
            Ok(c) => c,
            Err(e) => {
                let e = pool_error(what, e)?;
                debug!(what, error = %e, attempt, "could not connect; retrying");
                last = Some(e);
                continue;
            }
        };
        match attempt_once(&conn, fetch_xid, &body).await {
            Outcome::Done(v) => return Ok(v),
            Outcome::Failed(Failure::Retry(e)) => {
                debug!(what, error = %e, attempt, "transaction not applied; retrying");
                discard_if_broken(conn);
                last = Some(e);
            }
            Outcome::Failed(Failure::Fatal(e)) => {
                discard_if_broken(conn);
                return Err(store_error(what, e));
            }
            Outcome::Unresolvable(e) => {
                drop(Object::take(conn));
                return Err(StoreError::backend(
                    format!("{what}: the connection was lost during COMMIT and the transaction's id is not known"),
                    e,
                ));
            }
            Outcome::Unknown { xid, value, error } => {
                warn!(what, %xid, error = %error, "connection lost during COMMIT; asking what became of it");
                drop(Object::take(conn));
                let resolved = if config.unknown_outcome_is_abort { Ok(false) } else { resolve(pool, &xid).await };
                match resolved {
                    Ok(true) => {
                        counters.unknown_committed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        warn!(what, %xid, "the transaction had committed");
                        return Ok(value);
                    }
                    Ok(false) => {
                        counters.unknown_aborted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        warn!(what, %xid, "the transaction had not committed; retrying");
                        last = Some(error);
                    }
                    Err(e) => return Err(e),
                }
            }
        }
    }
    Err(match last {
        Some(e) => StoreError::backend(format!("{what}: gave up after {MAX_ATTEMPTS} attempts"), e),
        None => StoreError::Invalid(format!("{what}: no attempt was made")),
    })
}

enum Outcome<T> {
    Done(T),
    Failed(Failure),
    /// COMMIT was sent and its answer lost.
    Unknown {
        xid: String,
        value: T,
        error: tokio_postgres::Error,
    },
    /// COMMIT was sent and its answer lost, and the transaction's id was
    /// never read: what became of it cannot be found out.
    Unresolvable(tokio_postgres::Error),
}

const XID: &str = "SELECT pg_current_xact_id()::text";

async fn attempt_once<T, B>(conn: &Object, fetch_xid: bool, body: &B) -> Outcome<T>
where
    B: for<'c> Fn(&'c Object) -> BoxFuture<'c, Result<Reported<T>, tokio_postgres::Error>>,
{
    let xid_stmt = match conn.prepare_cached(XID).await {
        Ok(s) => s,
        Err(e) => return Outcome::Failed(classify(e)),
    };
    let fetched = async {
        if fetch_xid { conn.query_one(&xid_stmt, &[]).await.and_then(|r| r.try_get(0)).map(Some) } else { Ok(None) }
    };
    let (begun, fetched, decided) = join3(conn.batch_execute("BEGIN"), fetched, body(conn)).await;
    let Reported { decision, xid: reported } = match (begun, decided) {
        (Err(e), _) => return Outcome::Failed(classify(e)),
        (Ok(()), Err(e)) => {
            rollback(conn).await;
            return Outcome::Failed(classify(e));
        }
        (Ok(()), Ok(d)) => d,
    };
    let known: Option<String> = match fetched {
        Ok(x) => x.or(reported),
        Err(e) => {
            rollback(conn).await;
            return Outcome::Failed(classify(e));
        }
    };
    match decision {
        Decision::Rollback(v) => {
            rollback(conn).await;
            Outcome::Done(v)
        }
        Decision::Committed(v) => Outcome::Done(v),
        Decision::CommitUnknown(v, e) => match known {
            Some(xid) => Outcome::Unknown { xid, value: v, error: e },
            // Never so (the operations that send their own COMMIT read the
            // id first); if it were, the outcome could not be found out.
            None => Outcome::Unresolvable(e),
        },
        Decision::Commit(v) => {
            let xid = match known {
                Some(x) => x,
                // Asked for now, before COMMIT is sent.
                None => match conn.query_one(&xid_stmt, &[]).await.and_then(|r| r.try_get(0)) {
                    Ok(x) => x,
                    Err(e) => {
                        rollback(conn).await;
                        return Outcome::Failed(classify(e));
                    }
                },
            };
            match conn.batch_execute("COMMIT").await {
                Ok(()) => Outcome::Done(v),
                Err(e) if connection_lost(&e) => Outcome::Unknown { xid, value: v, error: e },
                // The server answered: the transaction did not commit.
                Err(e) => Outcome::Failed(classify(e)),
            }
        }
    }
}

async fn rollback(conn: &Object) {
    if let Err(e) = conn.batch_execute("ROLLBACK").await {
        debug!(error = %e, "rollback failed; the connection will be dropped");
    }
}

/// Takes a connection whose state is not known to be clean out of the
/// pool (closing it ends any transaction on the server).
fn discard_if_broken(conn: Object) {
    if conn.is_closed() {
        drop(Object::take(conn));
    }
}

/// What became of transaction `xid`: `Ok(true)` committed, `Ok(false)`
/// aborted. Waits while it is still in progress (its backend may still be
/// finishing the commit).
async fn resolve(pool: &Pool, xid: &str) -> Result<bool, StoreError> {
    let deadline = tokio::time::Instant::now() + RESOLVE_FOR;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let status: Result<Option<String>, String> = async {
            let conn = pool.get().await.map_err(|e| e.to_string())?;
            let row =
                conn.query_one("SELECT pg_xact_status($1::text::xid8)", &[&xid]).await.map_err(|e| e.to_string())?;
            row.try_get::<_, Option<String>>(0).map_err(|e| e.to_string())
        }
        .await;
        match status {
            Ok(Some(s)) if s == "committed" => return Ok(true),
            Ok(Some(s)) if s == "aborted" => return Ok(false),
            Ok(None) => {
                return Err(StoreError::Invalid(format!(
                    "the outcome of transaction {xid} is no longer known to the database"
                )));
            }
            Ok(Some(_in_progress)) => {}
            Err(e) => debug!(%xid, error = %e, "could not ask about the transaction yet"),
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(StoreError::Invalid(format!(
                "the outcome of transaction {xid} (connection lost during COMMIT) is still unknown after {} s",
                RESOLVE_FOR.as_secs()
            )));
        }
        backoff(attempt.min(5)).await;
    }
}

/// Runs an idempotent read or single-statement write with retries on a
/// lost connection (running it twice changes nothing).
pub(crate) async fn idempotent<T, F, Fut>(pool: &Pool, what: &str, op: F) -> Result<T, StoreError>
where
    F: Fn(Object) -> Fut,
    Fut: Future<Output = Result<T, tokio_postgres::Error>>,
{
    let mut last = None;
    for attempt in 1..=MAX_ATTEMPTS {
        if attempt > 1 {
            backoff(attempt).await;
        }
        let conn = match pool.get().await {
            Ok(c) => c,
            Err(e) => {
                last = Some(pool_error(what, e)?);
                continue;
            }
        };
        match op(conn).await {
            Ok(v) => return Ok(v),
            Err(e) => match classify(e) {
                Failure::Retry(e) => last = Some(e),
                Failure::Fatal(e) => return Err(store_error(what, e)),
            },
        }
    }
    Err(match last {
        Some(e) => StoreError::backend(format!("{what}: gave up after {MAX_ATTEMPTS} attempts"), e),
        None => StoreError::Invalid(format!("{what}: no attempt was made")),
    })
}
