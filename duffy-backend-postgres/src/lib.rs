//! # duffy-backend-postgres
//!
//! Duffy's [`Store`] on PostgreSQL (14 or newer), for running several
//! `duffy serve` replicas on one database, any of them answering any
//! request, with the guarantees of the embedded store: no node in two
//! sessions, quotas exact, nothing acknowledged lost, one reconciler.
//!
//! - **Claims are one pass over an index.** `SELECT … ORDER BY used_count,
//!   id LIMIT n FOR NO KEY UPDATE SKIP LOCKED` on a partial index of Ready
//!   nodes, in READ COMMITTED: concurrent claims (on any replica) skip each
//!   other's rows instead of waiting or failing. The rows written are
//!   computed by [`duffy_core::store::claim_writes`], never by SQL.
//! - **Checks hold across replicas.** The pause flag, the key's rate limit
//!   and the project's quota are read inside the claim's transaction after
//!   advisory transaction locks that order exactly the writes that could
//!   disagree (a pause and the claims; two claims of one key; two claims,
//!   or a claim and a fail, of one project), in one fixed order, so they
//!   cannot deadlock; the locks and the checks are one statement (a
//!   function whose reads take their snapshot after its locks). See the
//!   `sql` module for the lock keys.
//! - **Every write is one transaction, pipelined**: `BEGIN`, the
//!   transaction's id and every statement go out together, then `COMMIT`
//!   (two round trips; a claim and a hand-back lock what they read, and
//!   send their writes and `COMMIT` together: also two). The id is read
//!   by the operation's own statement where one locks or writes anyway
//!   (a claim's pick, a hand-back's session, a node write), not by a
//!   statement of its own; a claim that locks nothing gets none. A wave of the
//!   reconciler's single-node writes ([`Store::commit_each`],
//!   [`Store::commit_each_fenced`]) is one transaction, each write
//!   applied or not on its own. Statements run on their generic plans,
//!   planned once per connection. Serialization failures, deadlocks and connections
//!   lost before `COMMIT` are retried with jitter; a connection lost
//!   during `COMMIT` is resolved by asking the database what became of the
//!   transaction, so an operation is never applied twice (the `tx` module).
//!   Write operations run in a task of their own: a caller that stops
//!   waiting cannot leave half a transaction behind.
//! - **Fencing.** [`Store::new_leader_epoch`] starts a term under an
//!   exclusive advisory lock; [`Store::commit_fenced`] checks the epoch
//!   under the shared one, in the write's statement (the `duffy_fence`
//!   function, which reads the epoch in a snapshot taken after the lock):
//!   once a term has begun, no write of an older one commits.
//! - **Several processes.** Each open store registers its process and
//!   keeps a control connection (the `control` module): liveness (so the
//!   leader aborts at once the allocations of a process that died, and
//!   leaves alone those of live ones: [`Store::abandoned_allocations`]),
//!   leader election ([`PgStore::run_reconciler_while_leader`]: exactly one
//!   fenced reconciler), key changes heard by every process before the
//!   change is acknowledged ([`Store::key_generation`]), and kicks to the
//!   leader's reconciler.
//! - **Versioned schema**: forward-only migrations recorded in
//!   `duffy_migrations`; a database with a newer schema, or another
//!   application's tables, is refused untouched.
//! - **Event retention**: [`PgOptions::event_retention`] prunes events
//!   older than that, in batches, from the leader.
//!
//! Timestamps are the engine's clock (milliseconds), never the database's.
//! The store needs a tokio runtime (tokio-postgres). Connections are made
//! without TLS: use a local or trusted network (or a TLS tunnel).
//!
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! use duffy_backend_postgres::{PgOptions, PgStore};
//! let store = PgStore::connect("postgres://duffy@db.example/duffy", PgOptions::default()).await?;
//! # drop(store); Ok(()) }
//! ```

mod control;
mod copy;
mod leader;
mod retention;
mod schema;
mod sql;
#[cfg(feature = "test-cluster")]
pub mod test_cluster;
mod tickets;
mod tx;

use std::collections::HashSet;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod};
use duffy_core::store::{claim_writes, hand_back_writes};
use duffy_core::{
    Actor, ApiKeyHash, ApiKeyRecord, Batch, ClaimRefusal, ClaimRequest, Claimed, CommitError, Event, EventQuery, Guard,
    HandBack, HandBackRefusal, Hardware, KeyId, NewNode, Node, NodeId, NodeState, PoolKey, PoolTarget, Project,
    Session, SessionId, Store, StoreError, Timestamp, model::validate_token,
};
use futures::FutureExt;
use tokio_postgres::types::ToSql;
use tracing::{info, warn};

pub use control::ControlOptions;
pub use copy::{PgExport, PgImport};
pub use schema::SCHEMA_VERSION;
pub use tokio_postgres;

use crate::sql::*;
use crate::tx::{Decision, TxCounters};

/// How to open a [`PgStore`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgOptions {
    /// Most connections in this process's pool (default 16). The control
    /// connection comes on top.
    pub pool_size: usize,
    /// What this process is, as recorded in `instances` ("service" for
    /// `duffy serve`, "command" for the CLI).
    pub role: String,
    /// Events older than this are deleted by the leader, in batches
    /// (`None`, the default: kept forever).
    pub event_retention: Option<Duration>,
    /// How long to wait for a connection (default 10 s).
    pub connect_timeout: Duration,
    /// The control connection's timing (liveness, leadership).
    pub control: ControlOptions,
    /// How long a key change waits for every live process to confirm it
    /// has forgotten the keys it remembered (default 10 s; a process that
    /// does not answer loses its liveness before that, see
    /// [`ControlOptions::idle_timeout`]).
    pub key_change_wait: Duration,
    /// Deliberately broken variants, for the store's own tests only (not a
    /// stable API; see [`PgTestHooks`]). Leave it at its default.
    #[doc(hidden)]
    pub test_hooks: PgTestHooks,
}

/// Deliberately broken behaviours, for the tests only: each exists so that
/// a test can show its check catches exactly that defect. The default sets
/// none; no configuration file or command line reaches them.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PgTestHooks {
    /// BROKEN ON PURPOSE: a claim takes none of its advisory locks (pause,
    /// key, project), so checks of concurrent claims can disagree.
    pub skip_claim_locks: bool,
    /// BROKEN ON PURPOSE: a connection lost during COMMIT is taken to mean
    /// nothing was written, and the operation is run again.
    pub unknown_outcome_is_abort: bool,
    /// BROKEN ON PURPOSE: key changes do not wait for every process to
    /// confirm them.
    pub skip_key_confirmations: bool,
    /// BROKEN ON PURPOSE: fenced writes are written whatever their epoch.
    pub skip_fence_check: bool,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            pool_size: 16,
            role: "service".into(),
            event_retention: None,
            connect_timeout: Duration::from_secs(10),
            control: ControlOptions::default(),
            key_change_wait: Duration::from_secs(10),
            test_hooks: PgTestHooks::default(),
        }
    }
}

/// Why a store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The URL is not a PostgreSQL connection string.
    #[error("invalid database URL: {0}")]
    InvalidUrl(String),
    /// PostgreSQL failed.
    #[error("{context}: {source}")]
    Postgres {
        /// What the store was doing.
        context: String,
        /// PostgreSQL's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The database was written by a newer version of Duffy. Nothing was
    /// changed.
    #[error(
        "database {database} has schema version {found}, newer than the version {supported} this build of Duffy \
         knows; upgrade Duffy (schemas only move forward)"
    )]
    SchemaTooNew {
        /// The database.
        database: String,
        /// Its schema version.
        found: i32,
        /// The newest this build knows.
        supported: i32,
    },
    /// The database holds tables of something else.
    #[error("database {database} is not a Duffy store ({tables} tables, no duffy_migrations); refusing to touch it")]
    ForeignDatabase {
        /// The database.
        database: String,
        /// How many tables it has.
        tables: i64,
    },
    /// An option is out of range.
    #[error("invalid option: {0}")]
    InvalidOptions(String),
    /// The connection pool could not be built.
    #[error("building the connection pool: {0}")]
    Pool(String),
}

impl From<OpenError> for StoreError {
    fn from(e: OpenError) -> Self {
        StoreError::backend("opening the PostgreSQL store", e)
    }
}

/// What the store's transactions had to do since it was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PgStats {
    /// Attempts retried (serialization failures, deadlocks, lost
    /// connections).
    pub retries: u64,
    /// Connections lost during COMMIT whose transaction turned out to have
    /// committed (answered as such, not run again).
    pub unknown_committed: u64,
    /// Connections lost during COMMIT whose transaction had not committed
    /// (run again).
    pub unknown_aborted: u64,
    /// Fenced writes refused.
    pub fenced: u64,
    /// Events deleted by retention.
    pub events_pruned: u64,
}

struct Shared {
    pool: Pool,
    database: String,
    options: PgOptions,
    control: Arc<control::Control>,
    tx: tx::TxConfig,
    fenced: std::sync::atomic::AtomicU64,
    pruned: std::sync::atomic::AtomicU64,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.control.stop();
        self.pool.close();
    }
}

/// The PostgreSQL [`Store`]. See the [crate documentation](crate). Cheap to
/// clone; clones share the pool and the control connection, which close
/// when the last clone is dropped.
#[derive(Clone)]
pub struct PgStore {
    inner: Arc<Shared>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("database", &self.inner.database)
            .field("instance", &self.inner.control.instance)
            .finish()
    }
}

/// The database a configuration points at, for messages (never the
/// password).
fn describe(cfg: &tokio_postgres::Config) -> String {
    let host = cfg
        .get_hosts()
        .first()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .unwrap_or_else(|| "localhost".into());
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    format!("{}@{host}:{port}/{}", cfg.get_user().unwrap_or("?"), cfg.get_dbname().unwrap_or("?"))
}

/// Whether `s` is a PostgreSQL connection URL (`postgres://` or
/// `postgresql://`).
pub fn is_postgres_url(s: &str) -> bool {
    s.starts_with("postgres://") || s.starts_with("postgresql://")
}

/// The configuration of the pool's connections: `cfg`, with every
/// prepared statement run on its generic plan (`plan_cache_mode =
/// force_generic_plan`, after any options of the URL).
///
/// Why: the store prepares each statement once per connection and runs it
/// with parameters. Under PostgreSQL's default (`auto`) a statement is
/// planned again at every execution for as long as its plans with the
/// parameters' values look cheaper than the generic one — and for the
/// writes they always do, since the planner sizes `unnest($1)` from the
/// array's actual length (1) in a custom plan and guesses 10 rows in the
/// generic one; the claim's `CASE WHEN $1 THEN …` checks likewise. So
/// every node write, claim and check was planned anew: about three
/// quarters of the server's CPU per operation (measured: 0.6–1.1 ms a
/// write planned each time, 0.16 ms on its generic plan). Every statement
/// the store runs is a key lookup or a range scan of an index whose plan
/// does not depend on the values (the `tests` module checks the claim's
/// and the reconciler's plans as generic plans). It does depend on the
/// tables' statistics when the connection first prepares it: a generic
/// plan is kept until they change, so a table analyzed while nearly empty
/// (`sessions` in a fresh database after `VACUUM ANALYZE`) is read by
/// sequential scans until autovacuum analyzes it again, which it does as
/// the table grows (every 10% more rows, by default).
fn pool_config(cfg: &tokio_postgres::Config) -> tokio_postgres::Config {
    let mut cfg = cfg.clone();
    let options = match cfg.get_options() {
        Some(o) if !o.trim().is_empty() => format!("{o} -c plan_cache_mode=force_generic_plan"),
        _ => "-c plan_cache_mode=force_generic_plan".to_string(),
    };
    cfg.options(options);
    cfg
}

fn pg(context: &str) -> impl FnOnce(tokio_postgres::Error) -> OpenError + '_ {
    move |source| OpenError::Postgres { context: context.to_string(), source }
}

impl PgStore {
    /// Connects to the database at `url` (`postgres://user:password@host:port/db`),
    /// applies pending migrations, registers this process and starts its
    /// control connection.
    pub async fn connect(url: &str, options: PgOptions) -> Result<PgStore, OpenError> {
        if options.pool_size == 0 {
            return Err(OpenError::InvalidOptions("pool_size must be at least 1".into()));
        }
        let mut cfg = tokio_postgres::Config::from_str(url).map_err(|e| OpenError::InvalidUrl(e.to_string()))?;
        cfg.connect_timeout(options.connect_timeout);
        // A dead server or network is noticed by the client too, not only
        // by the server's timeouts.
        cfg.keepalives(true).keepalives_idle(Duration::from_secs(10));
        if cfg.get_application_name().is_none() {
            cfg.application_name("duffy");
        }
        let database = describe(&cfg);
        let (mut client, connection) = cfg
            .connect(tokio_postgres::NoTls)
            .await
            .map_err(|source| OpenError::Postgres { context: format!("connecting to {database}"), source })?;
        let conn_task = tokio::spawn(connection);
        let version: i32 = client
            .query_one("SELECT current_setting('server_version_num')::integer", &[])
            .await
            .map_err(pg("reading the server version"))?
            .get(0);
        if version < 140000 {
            return Err(OpenError::InvalidOptions(format!(
                "{database} runs PostgreSQL {}.{}, Duffy needs 14 or newer (idle_session_timeout)",
                version / 10000,
                version % 10000 / 100
            )));
        }
        let from = schema::migrate(&mut client, &database).await?;
        drop(client);
        let _ = conn_task.await;

        let manager = Manager::from_config(
            pool_config(&cfg),
            tokio_postgres::NoTls,
            ManagerConfig { recycling_method: RecyclingMethod::Fast },
        );
        let pool = Pool::builder(manager)
            .max_size(options.pool_size)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(options.connect_timeout * 3))
            .create_timeout(Some(options.connect_timeout))
            .build()
            .map_err(|e| OpenError::Pool(e.to_string()))?;
        let control = control::start(cfg, options.control, &options.role).await?;
        info!(
            database = %database,
            schema_version = SCHEMA_VERSION,
            migrated_from = from,
            pool_size = options.pool_size,
            instance = control.instance,
            "opened the PostgreSQL store"
        );
        let unknown_outcome_is_abort = options.test_hooks.unknown_outcome_is_abort;
        Ok(PgStore {
            inner: Arc::new(Shared {
                pool,
                database,
                options,
                control,
                tx: tx::TxConfig { counters: TxCounters::default(), unknown_outcome_is_abort },
                fenced: Default::default(),
                pruned: Default::default(),
            }),
        })
    }

    /// The database, as `user@host:port/name` (no password).
    pub fn database(&self) -> &str {
        &self.inner.database
    }

    /// This process's id among the processes using the database.
    pub fn instance(&self) -> i32 {
        self.inner.control.instance
    }

    /// What the store's transactions had to do so far.
    pub fn stats(&self) -> PgStats {
        let c = &self.inner.tx.counters;
        PgStats {
            retries: c.retries.load(Ordering::Relaxed),
            unknown_committed: c.unknown_committed.load(Ordering::Relaxed),
            unknown_aborted: c.unknown_aborted.load(Ordering::Relaxed),
            fenced: self.inner.fenced.load(Ordering::Relaxed),
            events_pruned: self.inner.pruned.load(Ordering::Relaxed),
        }
    }

    /// The leadership term this process holds now, if any.
    pub fn leader_epoch(&self) -> Option<u64> {
        *self.inner.control.leader().borrow()
    }

    /// A pooled connection, for this crate's own tools and tests.
    async fn conn(&self, what: &str) -> Result<Object, StoreError> {
        self.inner.pool.get().await.map_err(|e| StoreError::backend(format!("{what}: getting a connection"), e))
    }

    /// Runs a write in a task of its own (so that a caller who stops
    /// waiting cannot interrupt its transaction).
    async fn spawned<T, F>(&self, what: &'static str, f: impl FnOnce(PgStore) -> F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: std::future::Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        let fut = f(self.clone());
        tokio::spawn(fut).await.map_err(|e| StoreError::backend(format!("{what}: the task failed"), e))?
    }

    /// Runs a read (or an idempotent write) in a task of its own: the
    /// connection is taken and given back there, whether or not the caller
    /// keeps polling. (A caller such as the reconciler runs many
    /// operations inside one future and polls some of them only between
    /// its passes: a connection held by an operation it is not polling
    /// would otherwise be lost to the pass that waits for one.)
    async fn read<T, F, Fut>(&self, what: &'static str, op: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Fn(Object) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<T, tokio_postgres::Error>> + Send,
    {
        let pool = self.inner.pool.clone();
        tokio::spawn(async move { tx::idempotent(&pool, what, op).await })
            .await
            .map_err(|e| StoreError::backend(format!("{what}: the task failed"), e))?
    }

    /// The fence of a write of term `epoch` (`None`: unfenced).
    fn fence(&self, epoch: Option<u64>) -> Result<Fence, StoreError> {
        let term = epoch.map(|e| sql_u64(e, "leadership epoch")).transpose()?;
        let check = if self.inner.options.test_hooks.skip_fence_check { None } else { term };
        Ok(Fence { term, check })
    }

    /// Asks the leader to re-plan (after writes that free nodes).
    fn kick(&self) {
        self.inner.control.want_kick();
    }

    /// Waits until every live process has applied key change `version`
    /// (forgotten the keys it remembered), or the wait runs out.
    async fn await_key_change(&self, version: i64) {
        if self.inner.options.test_hooks.skip_key_confirmations {
            return;
        }
        let deadline = tokio::time::Instant::now() + self.inner.options.key_change_wait;
        loop {
            let left = self
                .read("waiting for processes to apply a key change", move |c| async move {
                    let stmt = c.prepare_cached(UNCONFIRMED_KEY_CHANGE).await?;
                    let rows = c.query(&stmt, &[&LOCK_INSTANCE, &version]).await?;
                    Ok(rows
                        .iter()
                        .map(|r| {
                            let (id, host, pid): (i32, String, i32) = (r.get(0), r.get(1), r.get(2));
                            format!("process {id} (pid {pid} on {host})")
                        })
                        .collect::<Vec<_>>())
                })
                .await;
            match left {
                Ok(l) if l.is_empty() => return,
                Ok(l) if tokio::time::Instant::now() >= deadline => {
                    warn!(version, waiting_for = ?l, "not every process confirmed a key change in time");
                    return;
                }
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    warn!(version, error = %e, "could not check that every process applied a key change");
                    return;
                }
                _ => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }
}

/// A batch's writes as statement parameters.
struct BatchRows {
    nodes: NodeRows,
    events: EventRows,
    sessions: Vec<(SessionRow, Option<i64>)>,
    guards: Vec<(String, u32)>,
    /// Node writes in batch order (for conflict messages).
    order: Vec<i64>,
}

impl BatchRows {
    fn of(batch: &Batch) -> Result<BatchRows, StoreError> {
        let mut nodes = NodeRows::default();
        let mut events = EventRows::default();
        // Rows are written in id order, so two batches lock the rows they
        // share in one order (no deadlock); events keep the batch's order.
        let mut by_id: Vec<&duffy_core::NodeWrite> = batch.nodes.iter().collect();
        by_id.sort_by_key(|w| w.node.id);
        for w in by_id {
            nodes.push(&w.node, w.expected_version)?;
        }
        for w in &batch.nodes {
            events.push(&w.event)?;
        }
        let sessions = batch
            .sessions
            .iter()
            .map(|w| {
                let expected = w.expected_version.map(|v| sql_u64(v, "expected session version")).transpose()?;
                Ok((SessionRow::of(&w.session)?, expected))
            })
            .collect::<Result<_, StoreError>>()?;
        let guards = batch
            .guards
            .iter()
            .map(|g| match g {
                Guard::ProjectFailedNodesAtMost { project, max } => (project.clone(), *max),
            })
            .collect();
        let order = batch.nodes.iter().map(|w| sql_u64(w.node.id.0, "node id")).collect::<Result<_, _>>()?;
        Ok(BatchRows { nodes, events, sessions, guards, order })
    }
}

/// What a commit's statements said, for the decision.
struct CommitAnswers {
    updated: Vec<i64>,
    sessions: Vec<i64>,
    guards: Vec<i64>,
    /// The transaction's id, if a node write answered it.
    xid: Option<String>,
}

/// How a batch is fenced: the epoch its events carry (`term`) and the one
/// its statements check (`check`; `None` with the test hook that skips
/// the check).
#[derive(Clone, Copy)]
struct Fence {
    term: Option<i64>,
    check: Option<i64>,
}

/// The newest epoch, if `e` is `duffy_fence` refusing a write.
fn fenced_by(e: &tokio_postgres::Error) -> Option<u64> {
    let db = e.as_db_error()?;
    if db.code().code() != FENCED_SQLSTATE {
        return None;
    }
    Some(db.detail().and_then(|d| d.parse::<u64>().ok()).unwrap_or(0))
}

/// Runs a batch's statements (after `BEGIN`): the project locks of its
/// guards, the node writes with their events (and the fence check, if
/// fenced), the session writes, the guards' counts. A fence that refuses
/// fails the node statement with [`FENCED_SQLSTATE`] (see [`fenced_by`]).
async fn commit_statements(c: &Object, rows: &BatchRows, fence: Fence) -> Result<CommitAnswers, tokio_postgres::Error> {
    commit_statements_with(c, rows, fence, WRITE_NODES).await
}

/// [`commit_statements`], writing the nodes with `write_nodes` (a
/// statement with [`WRITE_NODES`]' parameters and answer).
async fn commit_statements_with(
    c: &Object,
    rows: &BatchRows,
    fence: Fence,
    write_nodes: &str,
) -> Result<CommitAnswers, tokio_postgres::Error> {
    let mut node_params: Vec<&(dyn ToSql + Sync)> = Vec::with_capacity(33);
    let one = node_event_params(&rows.nodes, &rows.events, &mut node_params);
    let write_nodes = c.prepare_cached(if one { WRITE_NODE } else { write_nodes }).await?;
    let insert_session = c.prepare_cached(INSERT_SESSION).await?;
    let update_session = c.prepare_cached(UPDATE_SESSION).await?;
    let guard = c.prepare_cached(FAILED_HELD_BY_PROJECT).await?;
    let lock_project = c.prepare_cached("SELECT pg_advisory_xact_lock($1, hashtext($2))").await?;
    let fence_only = c.prepare_cached(FENCE).await?;

    // Everything is issued before anything is awaited: one round trip.
    let mut projects: Vec<&str> = rows.guards.iter().map(|(p, _)| p.as_str()).collect();
    projects.sort_unstable();
    projects.dedup();
    let lock_project = &lock_project;
    let locks = futures::future::try_join_all(
        projects.iter().map(|p| async move { c.query_one(lock_project, &[&LOCK_PROJECT, p]).await }),
    );
    let nodes_fut = async {
        if rows.order.is_empty() {
            // No node to write the check into.
            if fence.check.is_some() {
                c.query_one(&fence_only, &[&LOCK_FENCE, &fence.check]).await?;
            }
            return Ok((Vec::new(), None));
        }
        let mut params = node_params;
        params.push(&fence.term);
        params.push(&LOCK_FENCE);
        params.push(&fence.check);
        let row = c.query_one(&write_nodes, &params).await?;
        Ok((row.try_get::<_, Vec<i64>>(0)?, Some(row.try_get::<_, String>(WRITE_NODES_XID)?)))
    };
    let sessions_fut = futures::future::try_join_all(rows.sessions.iter().map(|(s, expected)| async {
        let mut params: Vec<&(dyn ToSql + Sync)> = s.params().to_vec();
        let row = match expected {
            None => {
                params.push(&None::<i32>);
                c.query_one(&insert_session, &params).await?
            }
            Some(v) => {
                params.push(v);
                c.query_one(&update_session, &params).await?
            }
        };
        row.try_get::<_, i64>(0)
    }));
    let guard = &guard;
    let guards_fut = futures::future::try_join_all(
        rows.guards.iter().map(|(p, _)| async move { c.query_one(guard, &[p]).await?.try_get::<_, i64>(0) }),
    );
    let (_, (updated, xid), sessions, guards) =
        futures::future::try_join4(locks, nodes_fut, sessions_fut, guards_fut).await?;
    Ok(CommitAnswers { updated, sessions, guards, xid })
}

/// A batch's statements, with a fence that refused turned into the
/// decision to write nothing (the transaction failed: the runner rolls it
/// back) and the answer [`StoreError::Fenced`].
async fn fenced_statements(
    c: &Object,
    rows: &BatchRows,
    fence: Fence,
    epoch: Option<u64>,
    write_nodes: &str,
) -> Result<Result<CommitAnswers, CommitError>, tokio_postgres::Error> {
    match commit_statements_with(c, rows, fence, write_nodes).await {
        Ok(a) => Ok(Ok(a)),
        Err(e) => match (fenced_by(&e), epoch) {
            (Some(current), Some(epoch)) => Ok(Err(CommitError::Store(StoreError::Fenced { epoch, current }))),
            _ => Err(e),
        },
    }
}

/// The decision of a commit, from its statements' answers.
fn decide_commit(batch_rows: &BatchRows, batch: &Batch, a: CommitAnswers) -> Decision<Result<(), CommitError>> {
    let updated: HashSet<i64> = a.updated.into_iter().collect();
    if let Some(id) = batch_rows.order.iter().find(|id| !updated.contains(id)) {
        return Decision::Rollback(Err(CommitError::Conflict(format!("node {id}"))));
    }
    for (w, n) in batch.sessions.iter().zip(&a.sessions) {
        if *n != 1 {
            return Decision::Rollback(Err(CommitError::Conflict(format!("session {}", w.session.id))));
        }
    }
    for (g, actual) in batch.guards.iter().zip(&a.guards) {
        let Guard::ProjectFailedNodesAtMost { max, .. } = g;
        let actual = u64::try_from(*actual).unwrap_or(0);
        if actual > u64::from(*max) {
            return Decision::Rollback(Err(CommitError::GuardFailed { guard: g.clone(), actual }));
        }
    }
    Decision::Commit(Ok(()))
}

impl PgStore {
    async fn commit_inner(&self, batch: Batch, fence: Option<u64>) -> Result<(), CommitError> {
        let mut seen = HashSet::with_capacity(batch.nodes.len());
        let duplicate = !batch.nodes.iter().all(|w| seen.insert(w.node.id));
        if duplicate {
            // As the other stores: a stale version is a conflict first.
            for w in &batch.nodes {
                let current = self.node(w.node.id).await?.map(|n| n.version);
                if current != Some(w.expected_version) || w.expected_version.checked_add(1) != Some(w.node.version) {
                    return Err(CommitError::Conflict(format!("node {}", w.node.id)));
                }
            }
            return Err(CommitError::Store(StoreError::Invalid("a batch writes the same node twice".into())));
        }
        for w in &batch.nodes {
            if w.expected_version.checked_add(1) != Some(w.node.version) {
                return Err(CommitError::Conflict(format!("node {}", w.node.id)));
            }
        }
        if batch.nodes.is_empty() && batch.sessions.is_empty() && batch.guards.is_empty() && fence.is_none() {
            return Ok(());
        }
        let frees_nodes = fence.is_none() && batch.nodes.iter().any(|w| w.node.state == NodeState::Active);
        let fences = self.fence(fence)?;
        let rows = Arc::new(BatchRows::of(&batch)?);
        let batch = Arc::new(batch);
        let r = self
            .spawned("committing a batch", move |store| async move {
                tx::write_reporting_xid(&store.inner.pool, &store.inner.tx, "committing a batch", |c| {
                    let rows = rows.clone();
                    let batch = batch.clone();
                    async move {
                        Ok(match fenced_statements(c, &rows, fences, fence, WRITE_NODES).await? {
                            Ok(a) => {
                                let xid = a.xid.clone();
                                tx::Reported { decision: decide_commit(&rows, &batch, a), xid }
                            }
                            Err(e) => tx::Reported { decision: Decision::Rollback(Err(e)), xid: None },
                        })
                    }
                    .boxed()
                })
                .await
            })
            .await;
        match r {
            Ok(Ok(())) => {
                if frees_nodes {
                    self.kick();
                }
                Ok(())
            }
            Ok(Err(e)) => {
                if let CommitError::Store(StoreError::Fenced { epoch, .. }) = &e {
                    self.inner.fenced.fetch_add(1, Ordering::Relaxed);
                    self.inner.control.fenced(*epoch);
                }
                Err(e)
            }
            Err(e) => Err(CommitError::Store(e)),
        }
    }

    /// [`Store::commit_each`] and [`Store::commit_each_fenced`]: the
    /// single-node batches (the reconciler's, which is what gathers them)
    /// go in one transaction, each node written only over its expected
    /// version and its event only with it, so each applies or not on its
    /// own; a fence refused refuses them all, as it would each. Any other
    /// batch, and a second write of a node already in the wave, is
    /// committed on its own, concurrently.
    async fn commit_each_inner(&self, batches: Vec<Batch>, fence: Option<u64>) -> Vec<Result<(), CommitError>> {
        let mut seen = HashSet::with_capacity(batches.len());
        let mut together: Vec<(usize, Batch)> = Vec::new();
        let mut alone: Vec<(usize, Batch)> = Vec::new();
        for (i, b) in batches.into_iter().enumerate() {
            let single = match b.nodes.as_slice() {
                [w] => b.sessions.is_empty() && b.guards.is_empty() && seen.insert(w.node.id),
                _ => false,
            };
            if single { together.push((i, b)) } else { alone.push((i, b)) }
        }
        if together.len() == 1 {
            alone.append(&mut together);
        }
        let n = together.len() + alone.len();
        let separately = futures::future::join_all(
            alone.into_iter().map(|(i, b)| async move { (i, self.commit_inner(b, fence).await) }),
        );
        let (separately, together) = futures::future::join(separately, self.commit_together(together, fence)).await;
        let mut out: Vec<Option<Result<(), CommitError>>> = (0..n).map(|_| None).collect();
        for (i, r) in separately.into_iter().chain(together) {
            out[i] = Some(r);
        }
        out.into_iter()
            .map(|r| {
                r.unwrap_or_else(|| Err(CommitError::Store(StoreError::Corrupt("a batch went unanswered".into()))))
            })
            .collect()
    }

    /// Single-node batches, each node once, in one transaction (see
    /// [`PgStore::commit_each_inner`]); answers with their indexes.
    async fn commit_together(
        &self,
        batches: Vec<(usize, Batch)>,
        fence: Option<u64>,
    ) -> Vec<(usize, Result<(), CommitError>)> {
        if batches.is_empty() {
            return Vec::new();
        }
        let mut out = Vec::with_capacity(batches.len());
        let mut wave = Batch::default();
        let mut index = Vec::with_capacity(batches.len());
        for (i, b) in batches {
            let w = b.nodes.into_iter().next();
            match w {
                // As commit: a write that is not the next version is a
                // conflict before anything is sent.
                Some(w) if w.expected_version.checked_add(1) == Some(w.node.version) => {
                    index.push((i, w.node.id));
                    wave.nodes.push(w);
                }
                Some(w) => out.push((i, Err(CommitError::Conflict(format!("node {}", w.node.id))))),
                None => out.push((i, Ok(()))),
            }
        }
        if wave.nodes.is_empty() {
            return out;
        }
        let answer = self.commit_wave(wave, fence).await;
        match answer {
            Ok(updated) => {
                for (i, id) in index {
                    let r =
                        if updated.contains(&id.0) { Ok(()) } else { Err(CommitError::Conflict(format!("node {id}"))) };
                    out.push((i, r));
                }
            }
            Err(e) => {
                // The one error, for every batch of the wave (errors do not
                // clone: the others carry what it said).
                let again = |e: &CommitError| match e {
                    CommitError::Store(StoreError::Fenced { epoch, current }) => {
                        CommitError::Store(StoreError::Fenced { epoch: *epoch, current: *current })
                    }
                    other => CommitError::Store(StoreError::backend(
                        "committing a wave of writes",
                        std::io::Error::other(other.to_string()),
                    )),
                };
                let others: Vec<CommitError> = index.iter().skip(1).map(|_| again(&e)).collect();
                for ((i, _), e) in index.into_iter().zip(std::iter::once(e).chain(others)) {
                    out.push((i, Err(e)));
                }
            }
        }
        out
    }

    /// Writes a wave of single-node writes (each node once) in one
    /// transaction, fenced if `fence`; answers the ids of the nodes
    /// written. Nothing is written if the fence refuses.
    async fn commit_wave(&self, wave: Batch, fence: Option<u64>) -> Result<HashSet<u64>, CommitError> {
        let frees_nodes = fence.is_none() && wave.nodes.iter().any(|w| w.node.state == NodeState::Active);
        let fences = self.fence(fence)?;
        let rows = Arc::new(BatchRows::of(&wave)?);
        let r = self
            .spawned("committing a wave of writes", move |store| async move {
                tx::write_reporting_xid(&store.inner.pool, &store.inner.tx, "committing a wave of writes", |c| {
                    let rows = rows.clone();
                    async move {
                        let a = match fenced_statements(c, &rows, fences, fence, WRITE_EACH_NODE).await? {
                            Ok(a) => a,
                            Err(e) => return Ok(tx::Reported { decision: Decision::Rollback(Err(e)), xid: None }),
                        };
                        let updated: HashSet<u64> = a.updated.iter().filter_map(|id| u64::try_from(*id).ok()).collect();
                        // Nothing written: no commit to wait for.
                        let decision = if updated.is_empty() {
                            Decision::Rollback(Ok(updated))
                        } else {
                            Decision::Commit(Ok(updated))
                        };
                        Ok(tx::Reported { decision, xid: a.xid })
                    }
                    .boxed()
                })
                .await
            })
            .await;
        match r {
            Ok(Ok(updated)) => {
                if frees_nodes && !updated.is_empty() {
                    self.kick();
                }
                Ok(updated)
            }
            Ok(Err(e)) => {
                if let CommitError::Store(StoreError::Fenced { epoch, .. }) = &e {
                    self.inner.fenced.fetch_add(1, Ordering::Relaxed);
                    self.inner.control.fenced(*epoch);
                }
                Err(e)
            }
            Err(e) => Err(CommitError::Store(e)),
        }
    }

    async fn claim_inner(&self, req: ClaimRequest) -> Result<Result<Claimed, ClaimRefusal>, StoreError> {
        if req.count == 0 {
            return Err(StoreError::Invalid("a claim needs a count of at least 1".into()));
        }
        let creator = self.inner.control.instance;
        let skip_locks = self.inner.options.test_hooks.skip_claim_locks;
        let req = Arc::new(req);
        let key = sql_u64(req.key_id.0, "key id")?;
        self.spawned("claiming nodes", move |store| async move {
            tx::write_reporting_xid(&store.inner.pool, &store.inner.tx, "claiming nodes", |c| {
                let req = req.clone();
                async move { claim_statements(c, &req, key, creator, skip_locks).await }.boxed()
            })
            .await?
        })
        .await
    }
}

/// Builds a `Result` for the claim: the store's own failure to write what
/// it locked (the claim's writes refused) is corruption, not a lost race.
type ClaimAnswer = Result<Result<Claimed, ClaimRefusal>, StoreError>;

/// A claim's transaction, which reads its own id in the pick (see
/// [`CLAIM_PICK`]): a claim refused before it locked a node writes nothing
/// and gets no transaction id.
async fn claim_statements(
    c: &Object,
    req: &ClaimRequest,
    key: i64,
    creator: i32,
    skip_locks: bool,
) -> Result<tx::Reported<ClaimAnswer>, tokio_postgres::Error> {
    let mut xid = None;
    let decision = claim_decision(c, req, key, creator, skip_locks, &mut xid).await?;
    Ok(tx::Reported { decision, xid })
}

async fn claim_decision(
    c: &Object,
    req: &ClaimRequest,
    key: i64,
    creator: i32,
    skip_locks: bool,
    xid: &mut Option<String>,
) -> Result<Decision<ClaimAnswer>, tokio_postgres::Error> {
    let checks = c.prepare_cached(CLAIM_CHECKS).await?;
    let pick = c.prepare_cached(CLAIM_PICK).await?;
    let with_rate = req.rate_limit.is_some();
    // With a default quota the project's lock is taken and its nodes
    // counted; without one, only if the project has a quota of its own
    // (read in the claim's statements): projects without a quota claim
    // without serialising on each other.
    let with_quota = req.default_quota.is_some();
    let since = req.rate_limit.map(|l| req.now.minus(l.window).0).unwrap_or(0);
    let flavor = req.pool.flavor.clone().unwrap_or_default();
    let count = i64::from(req.count);
    let session = req.session.0.clone();
    // The locks and checks, then the pick, in one round trip.
    let lock_key = (key & 0x7fff_ffff) as i32;
    let (checked, picked) = futures::future::try_join(
        c.query_one(
            &checks,
            &[
                &LOCK_PAUSE,
                &LOCK_KEY,
                &lock_key,
                &LOCK_PROJECT,
                &!skip_locks,
                &with_rate,
                &key,
                &since,
                &with_quota,
                &req.project,
                &session,
                &req.pool.release,
                &req.pool.arch.as_str(),
                &flavor,
            ],
        ),
        c.query(&pick, &[&req.pool.release, &req.pool.arch.as_str(), &flavor, &count]),
    )
    .await?;
    if let Some(r) = picked.first() {
        *xid = Some(r.try_get(CLAIM_PICK_XID)?);
    }
    let paused: bool = checked.try_get(0)?;
    let recent: i64 = checked.try_get(1)?;
    let held: i64 = checked.try_get(2)?;
    let exists: bool = checked.try_get(3)?;
    let own_quota: Option<i64> = checked.try_get(4)?;
    let standby: Option<i64> = checked.try_get(5)?;
    let sat = |n: i64| u32::try_from(n.max(0)).unwrap_or(u32::MAX);
    if exists {
        return Ok(Decision::Rollback(Err(StoreError::Duplicate(format!("session {}", req.session)))));
    }
    if req.check_target {
        match standby.map(sat) {
            Some(standby) if standby > 0 => {
                if req.count > standby {
                    return Ok(Decision::Rollback(Ok(Err(ClaimRefusal::OverCapacity {
                        requested: req.count,
                        standby,
                    }))));
                }
            }
            // Refused: the pools that exist, for the caller's message (a
            // read only on this path).
            _ => {
                let rows =
                    c.query("SELECT release, arch, flavor, standby FROM pool_targets WHERE standby > 0", &[]).await?;
                let mut available = Vec::with_capacity(rows.len());
                for r in &rows {
                    match pool_target(r) {
                        Ok(t) => available.push(t.pool),
                        Err(e) => return Ok(Decision::Rollback(Err(e))),
                    }
                }
                available.sort();
                return Ok(Decision::Rollback(Ok(Err(ClaimRefusal::NoSuchPool { available }))));
            }
        }
    }
    if paused {
        return Ok(Decision::Rollback(Ok(Err(ClaimRefusal::Paused))));
    }
    if let Some(limit) = req.rate_limit {
        if sat(recent) >= limit.max {
            return Ok(Decision::Rollback(Ok(Err(ClaimRefusal::RateLimited { recent: sat(recent), limit }))));
        }
    }
    if let Some(quota) = own_quota.map(sat).or(req.default_quota) {
        let held = sat(held);
        if held.saturating_add(req.count) > quota {
            return Ok(Decision::Rollback(Ok(Err(ClaimRefusal::QuotaExceeded { held, requested: req.count, quota }))));
        }
    }
    let chosen = match picked.iter().map(node).collect::<Result<Vec<_>, _>>() {
        Ok(v) => v,
        Err(e) => return Ok(Decision::Rollback(Err(e))),
    };
    if chosen.len() < req.count as usize {
        let available = chosen.len() as u32;
        return Ok(Decision::Rollback(Ok(Err(ClaimRefusal::InsufficientNodes { requested: req.count, available }))));
    }
    let (session, writes) = match claim_writes(req, &chosen) {
        Ok(w) => w,
        Err(e) => return Ok(Decision::Rollback(Err(StoreError::Corrupt(e.to_string())))),
    };
    let mut nodes = NodeRows::default();
    let mut events = EventRows::default();
    let encoded = (|| {
        for w in &writes {
            nodes.push(&w.node, w.expected_version)?;
            events.push(&w.event)?;
        }
        SessionRow::of(&session)
    })();
    let srow = match encoded {
        Ok(s) => s,
        Err(e) => return Ok(Decision::Rollback(Err(e))),
    };
    let mut params: Vec<&(dyn ToSql + Sync)> = Vec::with_capacity(48);
    let one = node_event_params(&nodes, &events, &mut params);
    let claim_writes = c.prepare_cached(if one { CLAIM_WRITES_ONE } else { CLAIM_WRITES }).await?;
    params.push(&None::<i64>);
    params.extend(srow.params());
    params.push(&creator);
    let nodes = writes.into_iter().map(|w| w.node).collect();
    // The rows are locked and the writes must happen (the statement fails
    // otherwise): COMMIT goes out with them, one round trip.
    let written = c.query_one(&claim_writes, &params);
    tx::commit_pipelined(c, Ok(Ok(Claimed { session, nodes })), async { written.await.map(|_| ()) }).await
}

/// What a hand-back answers.
type HandBackAnswer = Result<Result<Session, HandBackRefusal>, CommitError>;

/// A hand-back's transaction, which reads its own id with the session it
/// locks (see [`HAND_BACK_SESSION`]).
async fn hand_back_statements(
    c: &Object,
    req: &HandBack,
    key: i64,
) -> Result<tx::Reported<HandBackAnswer>, tokio_postgres::Error> {
    let mut xid = None;
    let decision = hand_back_decision(c, req, key, &mut xid).await?;
    Ok(tx::Reported { decision, xid })
}

async fn hand_back_decision(
    c: &Object,
    req: &HandBack,
    key: i64,
    xid: &mut Option<String>,
) -> Result<Decision<HandBackAnswer>, tokio_postgres::Error> {
    let read_nodes = c.prepare_cached(HAND_BACK_NODES).await?;
    let read_session = c.prepare_cached(HAND_BACK_SESSION).await?;
    let sid = &req.session.0;
    let (node_rows, session_rows) =
        futures::future::try_join(c.query(&read_nodes, &[sid, &key]), c.query(&read_session, &[sid, &key])).await?;
    let Some(row) = session_rows.first() else {
        return Ok(Decision::Rollback(Ok(Err(HandBackRefusal::UnknownSession))));
    };
    *xid = Some(row.try_get(HAND_BACK_SESSION_XID)?);
    let decoded = session(row).and_then(|s| Ok((s, node_rows.iter().map(node).collect::<Result<Vec<_>, _>>()?)));
    let (before, nodes) = match decoded {
        Ok(x) => x,
        Err(e) => return Ok(Decision::Rollback(Err(CommitError::Store(e)))),
    };
    let (batch, after) = match hand_back_writes(req, &before, &nodes) {
        Ok(Ok(x)) => x,
        Ok(Err(refusal)) => return Ok(Decision::Rollback(Ok(Err(refusal)))),
        Err(e) => return Ok(Decision::Rollback(Err(e))),
    };
    let rows = match BatchRows::of(&batch) {
        Ok(r) => r,
        Err(e) => return Ok(Decision::Rollback(Err(CommitError::Store(e)))),
    };
    if !batch.guards.is_empty() {
        // A fail cap: counted after the writes, decided here.
        let a = commit_statements(c, &rows, Fence { term: None, check: None }).await?;
        return Ok(match decide_commit(&rows, &batch, a) {
            Decision::Commit(Ok(())) => Decision::Commit(Ok(Ok(after))),
            Decision::Rollback(Err(e)) => Decision::Rollback(Err(e)),
            _ => Decision::Rollback(Err(CommitError::Store(StoreError::Invalid(
                "a hand-back's writes were decided in an unexpected way".into(),
            )))),
        });
    }
    // Everything it writes is locked: the writes cannot be refused, and
    // fail their statement if they somehow are (nothing is committed).
    let [(srow, expected)] = rows.sessions.as_slice() else {
        let e = StoreError::Invalid(format!("a hand-back writes {} sessions, not its one", rows.sessions.len()));
        return Ok(Decision::Rollback(Err(CommitError::Store(e))));
    };
    let mut params: Vec<&(dyn ToSql + Sync)> = Vec::with_capacity(48);
    let one = node_event_params(&rows.nodes, &rows.events, &mut params);
    let writes = c.prepare_cached(if one { HAND_BACK_WRITES_ONE } else { HAND_BACK_WRITES }).await?;
    params.push(&None::<i64>);
    params.extend(srow.params());
    params.push(expected);
    let written = c.query_one(&writes, &params);
    tx::commit_pipelined(c, Ok(Ok(after)), async { written.await.map(|_| ()) }).await
}

fn rows_to<T>(
    rows: Vec<tokio_postgres::Row>,
    f: fn(&tokio_postgres::Row) -> Result<T, StoreError>,
) -> Result<Vec<T>, StoreError> {
    rows.iter().map(f).collect()
}

/// A read's rows, decoded.
macro_rules! query_rows {
    ($self:ident, $what:literal, $sql:expr, [$($p:ident),* $(,)?], $decode:expr) => {{
        let rows = $self
            .read($what, move |c| {
                $(let $p = $p.clone();)*
                async move {
                    let stmt = c.prepare_cached($sql).await?;
                    c.query(&stmt, &[$(&$p),*]).await
                }
            })
            .await?;
        rows_to(rows, $decode)
    }};
}

#[async_trait]
impl Store for PgStore {
    async fn add_nodes(&self, nodes: Vec<NewNode>, actor: Actor, now: Timestamp) -> Result<Vec<Node>, StoreError> {
        let mut names = HashSet::with_capacity(nodes.len());
        for n in &nodes {
            n.validate().map_err(|e| StoreError::Invalid(e.to_string()))?;
            if !names.insert(n.hostname.as_str()) {
                return Err(StoreError::Duplicate(format!("node {}", n.hostname)));
            }
        }
        if nodes.is_empty() {
            return Ok(Vec::new());
        }
        let news = Arc::new(nodes);
        let actor = actor.to_string();
        let added = self
            .spawned("adding nodes", move |store| async move {
                tx::write(&store.inner.pool, &store.inner.tx, "adding nodes", |c| {
                    let news = news.clone();
                    let actor = actor.clone();
                    async move { add_nodes_statements(c, &news, &actor, now).await }.boxed()
                })
                .await?
            })
            .await?;
        self.kick();
        Ok(added)
    }

    async fn node(&self, id: NodeId) -> Result<Option<Node>, StoreError> {
        let Ok(id) = i64::try_from(id.0) else { return Ok(None) };
        let rows = query_rows!(
            self,
            "reading a node",
            concat!("SELECT ", node_cols!(), " FROM nodes WHERE id = $1"),
            [id],
            node
        )?;
        Ok(rows.into_iter().next())
    }

    async fn node_by_hostname(&self, hostname: &str) -> Result<Option<Node>, StoreError> {
        let hostname = hostname.to_string();
        let rows = query_rows!(
            self,
            "reading a node by hostname",
            concat!("SELECT ", node_cols!(), " FROM nodes WHERE hostname = $1"),
            [hostname],
            node
        )?;
        Ok(rows.into_iter().next())
    }

    async fn nodes(&self) -> Result<Vec<Node>, StoreError> {
        query_rows!(self, "reading nodes", concat!("SELECT ", node_cols!(), " FROM nodes ORDER BY id"), [], node)
    }

    async fn ready_counts(&self) -> Result<Vec<(PoolKey, u32)>, StoreError> {
        let mut out = query_rows!(
            self,
            "counting ready nodes",
            "SELECT image_release, image_arch, image_flavor, count(*) FROM nodes \
             WHERE state = 'Ready' AND image_release IS NOT NULL GROUP BY image_release, image_arch, image_flavor",
            [],
            ready_count
        )?;
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    async fn nodes_in_states(&self, states: &[NodeState]) -> Result<Vec<Node>, StoreError> {
        if states.is_empty() {
            return Ok(Vec::new());
        }
        let states: Vec<&'static str> = states.iter().map(|s| s.as_str()).collect();
        query_rows!(
            self,
            "reading nodes by state",
            concat!("SELECT ", node_cols!(), " FROM nodes WHERE state = ANY($1) ORDER BY id"),
            [states],
            node
        )
    }

    async fn stale_ready(&self, installed_before: Timestamp, limit: usize) -> Result<Vec<Node>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let before = installed_before.0;
        query_rows!(
            self,
            "reading stale ready nodes",
            concat!(
                "SELECT ",
                node_cols!(),
                " FROM nodes WHERE state = 'Ready' AND installed_at <= $1 ORDER BY installed_at, id LIMIT $2"
            ),
            [before, limit],
            node
        )
    }

    async fn idle_nodes(&self, hardware: &Hardware, limit: usize) -> Result<Vec<Node>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let arch = hardware.arch.as_str();
        let flavor = hardware.flavor.clone().unwrap_or_default();
        query_rows!(
            self,
            "reading idle nodes",
            concat!(
                "SELECT ",
                node_cols!(),
                " FROM nodes WHERE state = 'Active' AND hardware_arch = $1 AND coalesce(flavor, '') = $2 \
                 ORDER BY used_count, id LIMIT $3"
            ),
            [arch, flavor, limit],
            node
        )
    }

    async fn nodes_after(&self, after: NodeId, limit: usize) -> Result<Vec<Node>, StoreError> {
        let Ok(after) = i64::try_from(after.0) else { return Ok(Vec::new()) };
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        query_rows!(
            self,
            "reading a page of nodes",
            concat!("SELECT ", node_cols!(), " FROM nodes WHERE id > $1 ORDER BY id LIMIT $2"),
            [after, limit],
            node
        )
    }

    async fn session(&self, id: &SessionId) -> Result<Option<Session>, StoreError> {
        let id = id.0.clone();
        let rows = query_rows!(
            self,
            "reading a session",
            concat!("SELECT ", session_cols!(), " FROM sessions WHERE id = $1"),
            [id],
            session
        )?;
        Ok(rows.into_iter().next())
    }

    async fn live_sessions(&self) -> Result<Vec<Session>, StoreError> {
        query_rows!(
            self,
            "reading live sessions",
            concat!("SELECT ", session_cols!(), " FROM sessions WHERE live ORDER BY created_at, id"),
            [],
            session
        )
    }

    async fn claim(&self, req: ClaimRequest) -> Result<Result<Claimed, ClaimRefusal>, StoreError> {
        self.claim_inner(req).await
    }

    async fn commit(&self, batch: Batch) -> Result<(), CommitError> {
        self.commit_inner(batch, None).await
    }

    async fn commit_each(&self, batches: Vec<Batch>) -> Vec<Result<(), CommitError>> {
        self.commit_each_inner(batches, None).await
    }

    /// One transaction: the session's nodes and the session, locked (so
    /// nothing else can move them until it ends), [`hand_back_writes`]
    /// made of them, and the writes. A done has no guard: its writes go
    /// out with the COMMIT, two round trips in all; a fail with a cap
    /// counts the project's failed nodes after its writes, and commits
    /// only if the cap holds.
    async fn hand_back(&self, req: HandBack) -> Result<Result<Session, HandBackRefusal>, CommitError> {
        if req.session.0.is_empty() {
            return Ok(Err(HandBackRefusal::UnknownSession));
        }
        let key = match i64::try_from(req.key_id.0) {
            Ok(k) => k,
            Err(_) => return Ok(Err(HandBackRefusal::UnknownSession)),
        };
        let req = Arc::new(req);
        let r = self
            .spawned("handing back a session", move |store| async move {
                tx::write_reporting_xid(&store.inner.pool, &store.inner.tx, "handing back a session", |c| {
                    let req = req.clone();
                    async move { hand_back_statements(c, &req, key).await }.boxed()
                })
                .await
            })
            .await;
        match r {
            Ok(Ok(Ok(s))) => {
                // Released nodes wait for the leader to reinstall them.
                if s.state == duffy_core::SessionState::Done {
                    self.kick();
                }
                Ok(Ok(s))
            }
            Ok(other) => other,
            Err(e) => Err(CommitError::Store(e)),
        }
    }

    async fn events(&self, q: EventQuery) -> Result<Vec<Event>, StoreError> {
        let after = i64::try_from(q.after_seq).unwrap_or(i64::MAX);
        let limit: Option<i64> = (q.limit > 0).then(|| i64::try_from(q.limit).unwrap_or(i64::MAX));
        match q.node {
            None => query_rows!(
                self,
                "reading the event log",
                concat!("SELECT ", event_cols!(), " FROM events WHERE seq > $1 ORDER BY seq LIMIT $2"),
                [after, limit],
                event
            ),
            Some(n) => {
                let Ok(n) = i64::try_from(n.0) else { return Ok(Vec::new()) };
                query_rows!(
                    self,
                    "reading a node's history",
                    concat!(
                        "SELECT ",
                        event_cols!(),
                        " FROM events WHERE node = $1 AND seq > $2 ORDER BY seq LIMIT $3"
                    ),
                    [n, after, limit],
                    event
                )
            }
        }
    }

    async fn upsert_project(&self, project: Project) -> Result<(), StoreError> {
        validate_token("project name", &project.name, 64).map_err(|e| StoreError::Invalid(e.to_string()))?;
        let quota = project.quota.map(i64::from);
        let p = Arc::new(project);
        self.read("writing a project", move |c| {
            let p = p.clone();
            async move {
                let stmt = c
                    .prepare_cached(
                        "INSERT INTO projects (name, quota, ssh_keys) VALUES ($1, $2, $3) \
                         ON CONFLICT (name) DO UPDATE SET quota = excluded.quota, ssh_keys = excluded.ssh_keys",
                    )
                    .await?;
                c.execute(&stmt, &[&p.name, &quota, &p.ssh_keys]).await.map(|_| ())
            }
        })
        .await
    }

    async fn project(&self, name: &str) -> Result<Option<Project>, StoreError> {
        let name = name.to_string();
        let rows = query_rows!(
            self,
            "reading a project",
            "SELECT name, quota, ssh_keys FROM projects WHERE name = $1",
            [name],
            project
        )?;
        Ok(rows.into_iter().next())
    }

    async fn projects(&self) -> Result<Vec<Project>, StoreError> {
        query_rows!(
            self,
            "reading the projects",
            "SELECT name, quota, ssh_keys FROM projects ORDER BY name COLLATE \"C\"",
            [],
            project
        )
    }

    async fn add_api_key(
        &self,
        project: &str,
        hash: ApiKeyHash,
        admin: bool,
        now: Timestamp,
        expires_at: Option<Timestamp>,
    ) -> Result<ApiKeyRecord, StoreError> {
        let project = project.to_string();
        let (rec, version) = self
            .spawned("adding an API key", move |store| async move {
                tx::write(&store.inner.pool, &store.inner.tx, "adding an API key", |c| {
                    let project = project.clone();
                    async move {
                        let exists = c.prepare_cached("SELECT EXISTS (SELECT 1 FROM projects WHERE name = $1)").await?;
                        let dup = c.prepare_cached("SELECT EXISTS (SELECT 1 FROM api_keys WHERE hash = $1)").await?;
                        let (e, d) = futures::future::try_join(
                            c.query_one(&exists, &[&project]),
                            c.query_one(&dup, &[&&hash.0[..]]),
                        )
                        .await?;
                        if !e.try_get::<_, bool>(0)? {
                            return Ok(Decision::Rollback(Err(StoreError::NotFound(format!("project {project}")))));
                        }
                        if d.try_get::<_, bool>(0)? {
                            return Ok(Decision::Rollback(Err(StoreError::Duplicate("API key".into()))));
                        }
                        let insert = c
                            .prepare_cached(
                                "INSERT INTO api_keys (project, hash, admin, created_at, expires_at) \
                                 VALUES ($1, $2, $3, $4, $5) RETURNING id",
                            )
                            .await?;
                        let (row, version) = futures::future::try_join(
                            c.query_one(&insert, &[&project, &&hash.0[..], &admin, &now.0, &expires_at.map(|t| t.0)]),
                            key_change(c),
                        )
                        .await?;
                        let id: i64 = row.try_get(0)?;
                        let rec = ApiKeyRecord {
                            id: KeyId(u64::try_from(id).unwrap_or(0)),
                            project: project.clone(),
                            hash,
                            admin,
                            created_at: now,
                            expires_at,
                            revoked_at: None,
                            last_used: None,
                        };
                        Ok(Decision::Commit(Ok((rec, version))))
                    }
                    .boxed()
                })
                .await?
            })
            .await?;
        self.await_key_change(version).await;
        Ok(rec)
    }

    async fn api_key_by_hash(&self, hash: &ApiKeyHash) -> Result<Option<ApiKeyRecord>, StoreError> {
        let hash = hash.0.to_vec();
        let rows = query_rows!(
            self,
            "reading an API key",
            concat!("SELECT ", key_cols!(), " FROM api_keys WHERE hash = $1"),
            [hash],
            api_key
        )?;
        Ok(rows.into_iter().next())
    }

    async fn api_keys(&self, project: Option<&str>) -> Result<Vec<ApiKeyRecord>, StoreError> {
        match project {
            None => query_rows!(
                self,
                "listing API keys",
                concat!("SELECT ", key_cols!(), " FROM api_keys ORDER BY id"),
                [],
                api_key
            ),
            Some(p) => {
                let p = p.to_string();
                query_rows!(
                    self,
                    "listing API keys",
                    concat!("SELECT ", key_cols!(), " FROM api_keys WHERE project = $1 ORDER BY id"),
                    [p],
                    api_key
                )
            }
        }
    }

    async fn revoke_api_key(&self, id: KeyId, now: Timestamp) -> Result<ApiKeyRecord, StoreError> {
        let key = sql_u64(id.0, "key id")?;
        let (rec, version) = self
            .spawned("revoking an API key", move |store| async move {
                tx::write(&store.inner.pool, &store.inner.tx, "revoking an API key", |c| {
                    async move {
                        let revoke = c
                            .prepare_cached(concat!(
                                "UPDATE api_keys SET revoked_at = coalesce(revoked_at, $2) WHERE id = $1 RETURNING ",
                                key_cols!()
                            ))
                            .await?;
                        let (rows, version) =
                            futures::future::try_join(c.query(&revoke, &[&key, &now.0]), key_change(c)).await?;
                        match rows.first() {
                            None => Ok(Decision::Rollback(Err(StoreError::NotFound(format!("API key {id}"))))),
                            Some(r) => Ok(match api_key(r) {
                                Ok(rec) => Decision::Commit(Ok((rec, version))),
                                Err(e) => Decision::Rollback(Err(e)),
                            }),
                        }
                    }
                    .boxed()
                })
                .await?
            })
            .await?;
        self.await_key_change(version).await;
        Ok(rec)
    }

    async fn record_key_use(&self, used: Vec<(KeyId, Timestamp)>) -> Result<(), StoreError> {
        if used.is_empty() {
            return Ok(());
        }
        let ids: Vec<i64> = used.iter().map(|(k, _)| sql_u64(k.0, "key id")).collect::<Result<_, _>>()?;
        let ats: Vec<i64> = used.iter().map(|(_, t)| t.0).collect();
        // Idempotent (the later of two times wins): safe to run again.
        self.read("recording API key use", move |c| {
            let (ids, ats) = (ids.clone(), ats.clone());
            async move {
                let stmt = c
                    .prepare_cached(
                        "UPDATE api_keys k SET last_used = greatest(k.last_used, u.at) \
                         FROM unnest($1::bigint[], $2::bigint[]) AS u(id, at) WHERE k.id = u.id",
                    )
                    .await?;
                c.execute(&stmt, &[&ids, &ats]).await.map(|_| ())
            }
        })
        .await
    }

    async fn set_pool_target(&self, target: PoolTarget) -> Result<(), StoreError> {
        target.pool.validate().map_err(|e| StoreError::Invalid(e.to_string()))?;
        let standby = i64::from(target.standby);
        let t = Arc::new(target);
        self.read("writing a pool target", move |c| {
            let t = t.clone();
            async move {
                let stmt = c
                    .prepare_cached(
                        "INSERT INTO pool_targets (release, arch, flavor, standby) VALUES ($1, $2, $3, $4) \
                         ON CONFLICT (release, arch, flavor) DO UPDATE SET standby = excluded.standby",
                    )
                    .await?;
                let flavor = t.pool.flavor.clone().unwrap_or_default();
                c.execute(&stmt, &[&t.pool.release, &t.pool.arch.as_str(), &flavor, &standby]).await.map(|_| ())
            }
        })
        .await?;
        self.kick();
        Ok(())
    }

    async fn pool_targets(&self) -> Result<Vec<PoolTarget>, StoreError> {
        let mut out = query_rows!(
            self,
            "reading pool targets",
            "SELECT release, arch, flavor, standby FROM pool_targets",
            [],
            pool_target
        )?;
        out.sort_by(|a, b| a.pool.cmp(&b.pool));
        Ok(out)
    }

    async fn paused(&self) -> Result<bool, StoreError> {
        let rows = self
            .read("reading the pause flag", move |c| async move {
                let stmt = c.prepare_cached("SELECT paused FROM settings WHERE id = 1").await?;
                c.query(&stmt, &[]).await
            })
            .await?;
        rows.first()
            .map(|r| r.try_get::<_, bool>(0).map_err(|e| StoreError::Corrupt(format!("settings.paused: {e}"))))
            .unwrap_or_else(|| Err(StoreError::Corrupt("the settings row is missing".into())))
    }

    async fn set_paused(&self, paused: bool) -> Result<bool, StoreError> {
        let was = self
            .spawned("setting the pause flag", move |store| async move {
                tx::write(&store.inner.pool, &store.inner.tx, "setting the pause flag", |c| {
                    async move {
                        // Exclusive: waits for every claim in flight, and
                        // no claim after it can miss the new flag.
                        let lock = c.prepare_cached("SELECT pg_advisory_xact_lock($1, 0)").await?;
                        let set = c
                            .prepare_cached(
                                "UPDATE settings s SET paused = $1 FROM (SELECT paused FROM settings WHERE id = 1) old \
                                 WHERE s.id = 1 RETURNING old.paused",
                            )
                            .await?;
                        let (_, row) = futures::future::try_join(
                            c.query_one(&lock, &[&LOCK_PAUSE]),
                            c.query_one(&set, &[&paused]),
                        )
                        .await?;
                        Ok(Decision::Commit(row.try_get::<_, bool>(0)?))
                    }
                    .boxed()
                })
                .await
            })
            .await?;
        self.kick();
        Ok(was)
    }

    async fn new_leader_epoch(&self) -> Result<u64, StoreError> {
        let instance = self.inner.control.instance;
        self.spawned("starting a leadership term", move |store| async move {
            tx::write(&store.inner.pool, &store.inner.tx, "starting a leadership term", |c| {
                async move {
                    let lock = c.prepare_cached("SELECT pg_advisory_xact_lock($1, 0)").await?;
                    let bump = c
                        .prepare_cached(
                            "UPDATE settings SET leader_epoch = leader_epoch + 1, leader_instance = $1, \
                             leader_since = now() WHERE id = 1 RETURNING leader_epoch",
                        )
                        .await?;
                    let (_, row) =
                        futures::future::try_join(c.query_one(&lock, &[&LOCK_FENCE]), c.query_one(&bump, &[&instance]))
                            .await?;
                    let epoch: i64 = row.try_get(0)?;
                    Ok(Decision::Commit(u64::try_from(epoch).unwrap_or(0)))
                }
                .boxed()
            })
            .await
        })
        .await
    }

    async fn commit_fenced(&self, batch: Batch, epoch: u64) -> Result<(), CommitError> {
        self.commit_inner(batch, Some(epoch)).await
    }

    async fn commit_each_fenced(&self, batches: Vec<Batch>, epoch: u64) -> Vec<Result<(), CommitError>> {
        self.commit_each_inner(batches, Some(epoch)).await
    }

    async fn abandoned_allocations(&self) -> Result<Option<Vec<SessionId>>, StoreError> {
        let ids = self
            .read("finding abandoned allocations", move |c| async move {
                let stmt = c.prepare_cached(ABANDONED_ALLOCATIONS).await?;
                c.query(&stmt, &[&LOCK_INSTANCE]).await
            })
            .await?;
        let ids = ids
            .iter()
            .map(|r| {
                r.try_get::<_, String>(0).map(SessionId).map_err(|e| StoreError::Corrupt(format!("sessions.id: {e}")))
            })
            .collect::<Result<_, _>>()?;
        Ok(Some(ids))
    }

    fn key_generation(&self) -> u64 {
        self.inner.control.key_generation()
    }

    fn install_tickets(self: Arc<Self>) -> Option<Arc<dyn duffy_core::InstallTickets>> {
        // See the `tickets` module.
        Some(self)
    }
}

/// Records a key change in the transaction: the new key version, notified
/// to every process when the transaction commits.
async fn key_change(c: &Object) -> Result<i64, tokio_postgres::Error> {
    let stmt = c.prepare_cached("SELECT nextval('key_changes')").await?;
    let version: i64 = c.query_one(&stmt, &[]).await?.try_get(0)?;
    let notify = c.prepare_cached("SELECT pg_notify($1, $2)").await?;
    c.execute(&notify, &[&CHANNEL_KEYS, &version.to_string()]).await?;
    Ok(version)
}

async fn add_nodes_statements(
    c: &Object,
    news: &[NewNode],
    actor: &str,
    now: Timestamp,
) -> Result<Decision<Result<Vec<Node>, StoreError>>, tokio_postgres::Error> {
    let check = c.prepare_cached("SELECT hostname FROM nodes WHERE hostname = ANY($1) LIMIT 1").await?;
    let names: Vec<&str> = news.iter().map(|n| n.hostname.as_str()).collect();
    if let Some(r) = c.query_opt(&check, &[&names]).await? {
        let h: String = r.try_get(0)?;
        return Ok(Decision::Rollback(Err(StoreError::Duplicate(format!("node {h}")))));
    }
    let ids = c.prepare_cached("SELECT nextval('nodes_id_seq') FROM generate_series(1, $1)").await?;
    let rows = c.query(&ids, &[&(news.len() as i32)]).await?;
    let mut nodes = Vec::with_capacity(news.len());
    let mut node_rows = NodeRows::default();
    let mut events = EventRows::default();
    for (n, r) in news.iter().zip(&rows) {
        let id: i64 = r.try_get(0)?;
        let node = n.clone().into_node(NodeId(u64::try_from(id).unwrap_or(0)), now);
        let encoded = node_rows.push(&node, 0).and_then(|()| {
            let actor: Actor = actor.parse().map_err(StoreError::Invalid)?;
            events.push(&Event::added(&node, actor))
        });
        if let Err(e) = encoded {
            return Ok(Decision::Rollback(Err(e)));
        }
        nodes.push(node);
    }
    let insert = c
        .prepare_cached(
            "WITH v AS (
                SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[],
                    $7::text[], $8::text[], $9::integer[], $10::text[], $11::text[], $12::text[], $13::text[],
                    $14::bigint[], $15::text[], $16::bigint[], $17::bigint[], $18::bigint[], $19::text[],
                    $20::text[], $21::bigint[], $22::text[])
                    AS v(id, expected, hostname, ip, chassis, hardware_arch, flavor, bmc, console_port, state,
                         image_release, image_arch, image_flavor, used_count, session, state_since, installed_at,
                         hold_until, fail_reason, power, version, host_key)
            ), i AS (
                INSERT INTO nodes (id, hostname, ip, chassis, hardware_arch, flavor, bmc, console_port, state,
                    image_release, image_arch, image_flavor, used_count, session, state_since, installed_at,
                    hold_until, fail_reason, power, version, host_key)
                SELECT id, hostname, ip, chassis, hardware_arch, flavor, bmc, console_port, state, image_release,
                    image_arch, image_flavor, used_count, session, state_since, installed_at, hold_until,
                    fail_reason, power, version, host_key FROM v
                RETURNING 1
            ), e AS (
                INSERT INTO events (node, from_state, to_state, cause, detail, actor, session, at, term)
                SELECT e.node, e.from_state, e.to_state, e.cause, e.detail, e.actor, e.session, e.at, $31
                FROM unnest($23::bigint[], $24::text[], $25::text[], $26::text[], $27::text[], $28::text[],
                            $29::text[], $30::bigint[])
                     WITH ORDINALITY AS e(node, from_state, to_state, cause, detail, actor, session, at, ord)
                ORDER BY e.ord
                RETURNING 1
            )
            SELECT (SELECT count(*) FROM i), (SELECT count(*) FROM e)",
        )
        .await?;
    let mut params: Vec<&(dyn ToSql + Sync)> = Vec::with_capacity(31);
    params.extend(node_rows.params());
    params.extend(events.params());
    params.push(&None::<i64>);
    match c.query_one(&insert, &params).await {
        Ok(_) => Ok(Decision::Commit(Ok(nodes))),
        // Another process added one of these names meanwhile.
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {
            Ok(Decision::Rollback(Err(tx::store_error("adding nodes", e))))
        }
        Err(e) => Err(e),
    }
}

#[cfg(all(test, feature = "test-cluster"))]
mod tests {
    use super::*;

    /// The generic plan PostgreSQL makes for `sql` (the plan the pool's
    /// connections run, `plan_cache_mode = force_generic_plan`), executed
    /// with `args` (an SQL list of literals). A prepared `EXPLAIN` would
    /// plan with its parameters' values as constants: a custom plan.
    async fn plan(c: &tokio_postgres::Client, sql: &str, args: &str) -> String {
        c.batch_execute(&format!("SET plan_cache_mode = force_generic_plan; PREPARE planned AS {sql}"))
            .await
            .expect("prepare");
        let rows = c.simple_query(&format!("EXPLAIN EXECUTE planned{args}")).await.expect("explain");
        c.batch_execute("DEALLOCATE planned").await.expect("deallocate");
        let lines: Vec<&str> = rows
            .iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0),
                _ => None,
            })
            .collect();
        let plan = lines.join("\n");
        assert!(plan.contains("$1"), "a generic plan (its parameters not folded in): {plan}");
        plan
    }

    /// How often the pool's one connection planned the statements whose
    /// text starts with `prefix`: (generic plans, custom plans).
    async fn plans_made(store: &PgStore, prefix: &str) -> (i64, i64) {
        let c = store.conn("reading the plan counts").await.expect("connection");
        let r = c
            .query_one(
                "SELECT coalesce(sum(generic_plans), 0)::bigint, coalesce(sum(custom_plans), 0)::bigint \
                 FROM pg_prepared_statements WHERE starts_with(statement, $1)",
                &[&prefix],
            )
            .await
            .expect("pg_prepared_statements");
        (r.get(0), r.get(1))
    }

    /// The hot statements are planned once per connection, not at every
    /// execution: without `plan_cache_mode = force_generic_plan`, the
    /// node writes (`unnest` of arrays) and the claim's statements get a
    /// custom plan at most executions (the old code: 11 custom plans of the
    /// writes here).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_and_claims_run_on_generic_plans() {
        use duffy_core::testkit::conformance::{add_ready, claim_req, pool7, release};
        let db = test_cluster::shared().database().await;
        let store = PgStore::connect(&db.url, PgOptions { pool_size: 1, ..PgOptions::default() }).await.expect("open");
        add_ready(&store, "n", 8, &pool7()).await;
        for i in 0..6 {
            let c = store
                .claim(claim_req(&format!("s{i}"), 1, "p", 1, Timestamp(1_700_000_000_000 + i)))
                .await
                .expect("store")
                .expect("claimed");
            release(&store, &c.session.id, Timestamp(1_700_000_000_000 + i)).await.expect("released");
        }
        for prefix in ["WITH u AS", "SELECT * FROM duffy_claim_checks", "WITH p AS MATERIALIZED"] {
            let (generic, custom) = plans_made(&store, prefix).await;
            assert!(generic >= 6 && custom == 0, "{prefix}: {generic} generic plans, {custom} custom plans");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn claims_and_reconciler_reads_are_index_range_scans() {
        let db = test_cluster::shared().database().await;
        let store = PgStore::connect(&db.url, PgOptions { pool_size: 2, ..PgOptions::default() }).await.expect("open");
        let (c, conn) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls).await.expect("raw");
        tokio::spawn(conn);
        // A farm big enough that a sequential scan would be chosen if the
        // indexes did not fit: 20,000 nodes, a tenth of them Ready.
        c.batch_execute(
            "INSERT INTO nodes (hostname, hardware_arch, state, image_release, image_arch, used_count, state_since, \
             power, version) SELECT 'n' || i, 'x86_64', CASE WHEN i % 10 = 0 THEN 'Ready' ELSE 'Active' END, \
             CASE WHEN i % 10 = 0 THEN '7' END, CASE WHEN i % 10 = 0 THEN 'x86_64' END, i % 7, 0, 'on', 1 \
             FROM generate_series(1, 20000) i; ANALYZE nodes",
        )
        .await
        .expect("farm");
        let p = plan(&c, CLAIM_PICK, "('7', 'x86_64', '', 2)").await;
        assert!(p.contains("nodes_ready"), "{p}");
        assert!(!p.contains("Sort") && !p.contains("Seq Scan"), "the index gives the order: {p}");
        let idle = concat!(
            "SELECT id FROM nodes WHERE state = 'Active' AND hardware_arch = $1 AND coalesce(flavor, '') = $2 ",
            "ORDER BY used_count, id LIMIT $3"
        );
        let p = plan(&c, idle, "('x86_64', '', 10)").await;
        assert!(p.contains("nodes_idle") && !p.contains("Sort"), "{p}");
        // The fail cap (and the quota, as `duffy_claim_checks` counts it)
        // reads the live sessions' index (schema version 4), however many
        // ended sessions there are: 20,000, 50 of them live.
        c.batch_execute(
            "INSERT INTO sessions (id, project, key_id, state, pool_release, pool_arch, nodes, created_at, version, \
             origin_key, origin_at) SELECT 's' || i, 'p' || (i % 10), 1, CASE WHEN i % 400 = 0 THEN 'Prod' \
             WHEN i % 400 = 1 THEN 'Fail' ELSE 'Done' END, '7', 'x86_64', ARRAY[i, i + 1]::bigint[], i, 1, 1, i \
             FROM generate_series(1, 20000) i; ANALYZE sessions",
        )
        .await
        .expect("sessions");
        let p = plan(&c, FAILED_HELD_BY_PROJECT, "('p1')").await;
        assert!(p.contains("sessions_live_project") && !p.contains("Seq Scan"), "{p}");
        drop(store);
    }
}
