//! # duffy-backend-sqlite
//!
//! Duffy's durable embedded [`Store`]: one SQLite file in WAL mode, foreign
//! keys on.
//!
//! - **Durable when it says so.** With the default
//!   [`Synchronous::Full`], an operation whose future returned `Ok` is in
//!   the WAL and fsynced: it survives a crash of the process or a power
//!   cut, and a read never returns a change that is not yet on disk.
//!   [`Synchronous::Normal`] answers without waiting for the fsync
//!   (survives a crash of the process, not a power cut); it exists as the
//!   no-fsync reference for benchmarks and for throwaway stores.
//! - **Group commit.** One dedicated writer thread owns the write
//!   connection. Every write operation (`claim`, `commit`, `add_nodes`,
//!   `upsert_project`, `add_api_key`, `revoke_api_key`, `record_key_use`,
//!   `set_pool_target`, `set_paused`, `new_leader_epoch`, `commit_fenced`,
//!   and the install tickets' writes) is
//!   sent to it over a channel with a oneshot for the answer. The writer
//!   takes the first queued operation, drains whatever else is queued (up
//!   to [`SqliteOptions::max_batch`]) and runs them all in one
//!   `BEGIN IMMEDIATE` transaction, each inside its own `SAVEPOINT`, so an
//!   operation that is refused (too few nodes, a compare-and-set conflict,
//!   a failed guard, bad input) is rolled back alone and its batch-mates
//!   keep their writes. One `COMMIT` for the batch; if the transaction as a
//!   whole fails (`BEGIN`, a savepoint, `COMMIT`), every caller of the
//!   batch gets an error and nothing of it is written.
//! - **Durability does not set the pace.** With `Full`, the committed
//!   batch goes to a syncer thread that fsyncs the WAL once for every batch
//!   committed since its last fsync and only then answers their callers,
//!   while the writer already runs the next batch (SQLite itself would
//!   fsync inside `COMMIT`, holding the write lock, with the writer idle).
//!   A batch that nothing waits behind (the queue is empty and every
//!   earlier batch is durable: one job at a time) is fsynced by the writer
//!   itself, which spares its callers the syncer thread's wake-up.
//!   See the `durability` module for why this keeps exactly the guarantees
//!   of SQLite's `synchronous=FULL`. WAL checkpoints run on a checkpointer
//!   thread with its own connection, not inside the writer's `COMMIT`s.
//! - **Reads never wait behind writes.** A small pool of reader threads,
//!   each with its own connection, reads the last committed WAL snapshot;
//!   it never waits for the writer's queue or lock (with `Full`, a read
//!   that saw a batch whose fsync is in flight is answered when that fsync
//!   completes).
//! - **Runtime-agnostic.** The store spawns plain threads and answers on
//!   `futures` oneshot channels: it works under tokio, `futures::executor`
//!   or any other executor.
//! - **Claims scale.** A claim is one range scan of a partial index on
//!   Ready nodes by (pool release, arch, flavor, used_count, id); the quota
//!   and the rate limit are checked in the claim's own transaction, with
//!   indexes on the live sessions of a project and on the sessions of a key
//!   by creation time. The rows written are exactly those
//!   [`duffy_core::store::claim_writes`] computes; the event log is written
//!   in the same transactions as the changes it records, `seq` assigned by
//!   the store.
//! - **Versioned schema.** Forward-only migrations run on open
//!   (`PRAGMA user_version`); a file from a newer version is refused with
//!   [`OpenError::SchemaTooNew`], a file of another application with
//!   [`OpenError::ForeignDatabase`].
//!
//! The semantics are those of duffy-core's `MemStore`, checked by
//! duffy-core's conformance suite.
//!
//! Threads per store: 1 writer, 1 syncer (`Full` only), 1 checkpointer,
//! [`SqliteOptions::read_connections`] readers. Dropping the store stops
//! them all.
//!
//! ```no_run
//! use duffy_backend_sqlite::{SqliteOptions, SqliteStore};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Blocking: call it at start-up, or from a blocking task.
//! let store = SqliteStore::open("/var/lib/duffy/duffy.db", SqliteOptions::default())?;
//! # drop(store); Ok(()) }
//! ```

mod checkpointer;
mod codec;
mod dump;
mod durability;
mod queries;
mod readers;
mod schema;
mod stats;
mod tickets;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::Duration;

use async_trait::async_trait;
use duffy_core::{
    Actor, ApiKeyHash, ApiKeyRecord, Batch, ClaimRefusal, ClaimRequest, Claimed, CommitError, Event, EventQuery,
    HandBack, HandBackRefusal, Hardware, KeyId, NewNode, Node, NodeId, NodeState, PoolKey, PoolTarget, Project,
    Session, SessionId, Store, StoreError, StoreHealth, Timestamp,
};
use futures::channel::oneshot;
use rusqlite::{Connection, OpenFlags};
use tracing::{info, warn};

pub use dump::{SqliteExport, SqliteImport};
pub use schema::{APPLICATION_ID, SCHEMA_VERSION};
pub use stats::{HistogramSnapshot, WriteHistograms};

use crate::durability::Durability;
use crate::readers::Readers;
use crate::writer::{Counters, Op};

/// When a write is acknowledged: after its fsync, or before.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Synchronous {
    /// Every commit is fsynced before its callers are answered and before a
    /// read can return it: an acknowledged operation survives a power cut.
    /// The guarantees of SQLite's `synchronous=FULL`, with the fsync done by
    /// the syncer thread (see the crate documentation). The default.
    #[default]
    Full,
    /// Commits are not fsynced (only checkpoints are): an acknowledged
    /// operation survives a crash of the process but may be lost on a
    /// power cut. For benchmarking and throwaway stores.
    Normal,
}

impl Synchronous {
    fn name(self) -> &'static str {
        match self {
            Synchronous::Full => "full",
            Synchronous::Normal => "normal",
        }
    }
}

/// How to open a [`SqliteStore`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqliteOptions {
    /// Durability of each commit (default [`Synchronous::Full`]).
    pub synchronous: Synchronous,
    /// Reader threads, each with its own connection (default 4, at
    /// least 1).
    pub read_connections: usize,
    /// Most write operations committed in one transaction (default 256,
    /// at least 1). 1 turns group commit off.
    pub max_batch: usize,
    /// How long a connection waits for a lock held by another process
    /// before failing (default 5 s).
    pub busy_timeout: Duration,
    /// Fault injection and observation points for the store's own tests
    /// (not a stable API; see [`TestHooks`]). Leave it at its default.
    #[doc(hidden)]
    pub test_hooks: TestHooks,
}

/// A hook that replaces the store's `fdatasync` of the WAL.
#[doc(hidden)]
pub type WalSync = Arc<dyn Fn(&std::fs::File) -> std::io::Result<()> + Send + Sync>;

/// Fault injection and observation points, for the store's own tests only.
///
/// Hidden from the documentation and not a stable API. The default sets
/// nothing and changes nothing; no configuration file or command line of
/// the service can reach it. Two switches deliberately break the store's
/// promise ("acknowledged means fsynced"): they exist so that the tests
/// can show their checks catch exactly that defect.
#[doc(hidden)]
#[derive(Clone, Default)]
pub struct TestHooks {
    /// Called on the reader thread between the statements of a read that
    /// answers from one snapshot (`nodes_in_states` with several states),
    /// so a test can commit a write exactly there.
    pub between_read_statements: Option<Arc<dyn Fn() + Send + Sync>>,
    /// Replaces the `fdatasync` of the WAL (a slow or a failing disk).
    /// Called once per group of committed batches, with the store's handle
    /// on the WAL file: on the syncer thread, or on the writer thread for
    /// a batch it makes durable itself (nothing else was waiting).
    pub wal_sync: Option<WalSync>,
    /// Every batch goes through the syncer thread, never fsynced by the
    /// writer itself: so that the durability checks cover both paths.
    pub syncer_only: bool,
    /// BROKEN ON PURPOSE: the syncer answers the callers of a group before
    /// it fsyncs the WAL (and fails nothing when the fsync fails).
    pub answer_before_sync: bool,
    /// BROKEN ON PURPOSE: the syncer releases the reads that saw a group
    /// before it fsyncs the WAL.
    pub release_reads_before_sync: bool,
    /// BROKEN ON PURPOSE: the writer never finishes a checkpoint between
    /// batches, so under continuous writes the WAL never restarts.
    pub skip_writer_checkpoint: bool,
}

impl TestHooks {
    /// Whether any hook is set.
    fn any(&self) -> bool {
        self.between_read_statements.is_some()
            || self.wal_sync.is_some()
            || self.answer_before_sync
            || self.release_reads_before_sync
            || self.skip_writer_checkpoint
            || self.syncer_only
    }
}

impl std::fmt::Debug for TestHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestHooks")
            .field("between_read_statements", &self.between_read_statements.is_some())
            .field("wal_sync", &self.wal_sync.is_some())
            .field("syncer_only", &self.syncer_only)
            .field("answer_before_sync", &self.answer_before_sync)
            .field("release_reads_before_sync", &self.release_reads_before_sync)
            .field("skip_writer_checkpoint", &self.skip_writer_checkpoint)
            .finish()
    }
}

impl PartialEq for TestHooks {
    fn eq(&self, other: &Self) -> bool {
        fn same<T: ?Sized>(a: &Option<Arc<T>>, b: &Option<Arc<T>>) -> bool {
            match (a, b) {
                (None, None) => true,
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                _ => false,
            }
        }
        same(&self.between_read_statements, &other.between_read_statements)
            && same(&self.wal_sync, &other.wal_sync)
            && self.answer_before_sync == other.answer_before_sync
            && self.release_reads_before_sync == other.release_reads_before_sync
            && self.skip_writer_checkpoint == other.skip_writer_checkpoint
    }
}

impl Eq for TestHooks {}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            synchronous: Synchronous::Full,
            read_connections: 4,
            max_batch: 256,
            busy_timeout: Duration::from_secs(5),
            test_hooks: TestHooks::default(),
        }
    }
}

/// Why a store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// SQLite failed.
    #[error("{context}: {source}")]
    Sqlite {
        /// What the store was doing.
        context: String,
        /// SQLite's error.
        #[source]
        source: rusqlite::Error,
    },
    /// The file was written by a newer version of Duffy, with a schema this
    /// build does not know. Nothing was changed.
    #[error(
        "{path} has schema version {found}, newer than the version {supported} this build of Duffy knows; \
         upgrade Duffy (schemas only move forward)"
    )]
    SchemaTooNew {
        /// The database file refused untouched.
        path: PathBuf,
        /// Its schema version.
        found: i64,
        /// The newest this build knows.
        supported: i64,
    },
    /// The file is an SQLite database of some other application.
    #[error(
        "{path} is not a Duffy store (application id {application_id:#x}, user version {user_version}); \
         refusing to touch it"
    )]
    ForeignDatabase {
        /// The file that belongs to another application.
        path: PathBuf,
        /// Its `PRAGMA application_id`.
        application_id: i32,
        /// Its `PRAGMA user_version`.
        user_version: i64,
    },
    /// WAL mode could not be enabled (e.g. an in-memory database).
    #[error("{path}: journal mode is {mode:?}, not WAL; the store needs a file it can put in WAL mode")]
    NotWal {
        /// The database file.
        path: PathBuf,
        /// The journal mode SQLite reported.
        mode: String,
    },
    /// An option is out of range.
    #[error("invalid option: {0}")]
    InvalidOptions(String),
    /// A file operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What the store was doing.
        what: &'static str,
        /// The file the operation was on.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A thread could not be started.
    #[error("starting the {what} thread: {source}")]
    Spawn {
        /// Which thread.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl From<OpenError> for StoreError {
    fn from(e: OpenError) -> Self {
        StoreError::backend("opening the SQLite store", e)
    }
}

/// Counters of the writer thread's work since the store was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WriterStats {
    /// Transactions run (one per batch).
    pub transactions: u64,
    /// Write operations received (over all batches).
    pub operations: u64,
    /// Transactions that failed as a whole (every operation of the batch
    /// got an error).
    pub failed_transactions: u64,
    /// Fsyncs of the WAL by the syncer thread (with
    /// [`Synchronous::Full`]); each covers every batch committed since the
    /// one before.
    pub syncs: u64,
    /// Checkpoints the writer completed between batches so the WAL could
    /// restart from its beginning (the checkpointer thread does the bulk
    /// of the copying; see the crate documentation).
    pub wal_restarts: u64,
}

/// The SQLite [`Store`]. See the [crate documentation](crate).
///
/// Dropping it stops its threads: it waits for the writer to finish the
/// batch in hand (no caller can be waiting by then: every operation
/// borrows the store).
pub struct SqliteStore {
    path: PathBuf,
    // Declared before `writer_thread` so the channel closes first.
    writer: Option<std::sync::mpsc::Sender<Op>>,
    writer_thread: Option<JoinHandle<()>>,
    readers: Readers,
    syncer: Option<JoinHandle<()>>,
    checkpointer: Option<(std::sync::mpsc::Sender<()>, JoinHandle<()>)>,
    counters: Arc<Counters>,
    /// Batch visibility and fsync state: a failed fsync stops the store.
    durability: Arc<Durability>,
    /// [`TestHooks::between_read_statements`].
    between_read_statements: Option<Arc<dyn Fn() + Send + Sync>>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").field("path", &self.path).field("stats", &self.writer_stats()).finish()
    }
}

/// The WAL file is truncated back to this size after a checkpoint resets
/// it (64 MiB).
const JOURNAL_SIZE_LIMIT: i64 = 64 * 1024 * 1024;

/// The writer's own checkpoint threshold, in pages: a safety net should the
/// checkpointer thread fall behind (normally it keeps the WAL far smaller).
const WRITER_AUTOCHECKPOINT: i64 = 10_000;

/// SQLite's WAL file for the database at `path`.
fn wal_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push("-wal");
    PathBuf::from(p)
}

/// Fsyncs the directory holding `path`, so newly created files in it
/// survive a power cut.
fn sync_dir(path: &Path) -> Result<(), OpenError> {
    #[cfg(unix)]
    {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::File::open(&dir).and_then(|d| d.sync_all()).map_err(|source| OpenError::Io {
            what: "syncing the directory",
            path: dir,
            source,
        })?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

fn sqlite(context: &str) -> impl FnOnce(rusqlite::Error) -> OpenError + '_ {
    move |source| OpenError::Sqlite { context: context.to_string(), source }
}

fn connect(path: &Path, flags: OpenFlags, busy: Duration, what: &str) -> Result<Connection, OpenError> {
    let conn = Connection::open_with_flags(path, flags).map_err(sqlite(what))?;
    conn.busy_timeout(busy).map_err(sqlite("setting the busy timeout"))?;
    conn.set_prepared_statement_cache_capacity(64);
    conn.execute_batch("PRAGMA foreign_keys = ON").map_err(sqlite("enabling foreign keys"))?;
    Ok(conn)
}

impl SqliteStore {
    /// Opens (creating if needed) the store at `path`, applies any pending
    /// schema migrations, and starts the writer and reader threads.
    ///
    /// This is a **blocking** call (file I/O, possibly a migration): call
    /// it at start-up or from a blocking task
    /// (`tokio::task::spawn_blocking`), not from inside an async task on a
    /// busy executor. The store's operations themselves are async and
    /// never block the caller's thread.
    pub fn open(path: impl AsRef<Path>, options: SqliteOptions) -> Result<SqliteStore, OpenError> {
        let path = path.as_ref().to_path_buf();
        if options.read_connections == 0 {
            return Err(OpenError::InvalidOptions("read_connections must be at least 1".into()));
        }
        if options.max_batch == 0 {
            return Err(OpenError::InvalidOptions("max_batch must be at least 1".into()));
        }
        let rw = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = connect(&path, rw, options.busy_timeout, "opening the database")?;
        let mode: String =
            conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0)).map_err(sqlite("switching to WAL mode"))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(OpenError::NotWal { path, mode });
        }
        // SQLite's own synchronous=NORMAL in both modes: with `Full`, the
        // syncer thread fsyncs each commit before anyone hears of it (see
        // the durability module).
        conn.execute_batch(&format!(
            "PRAGMA synchronous = NORMAL; PRAGMA temp_store = MEMORY; \
             PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}; PRAGMA wal_autocheckpoint = {WRITER_AUTOCHECKPOINT};"
        ))
        .map_err(sqlite("configuring the write connection"))?;
        let from = schema::migrate(&conn, &path)?;

        // Read-write without create: readers need to write the -shm index, the
        // checkpointer writes the database file.
        let existing = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let mut conns = Vec::with_capacity(options.read_connections);
        for _ in 0..options.read_connections {
            let c = connect(&path, existing, options.busy_timeout, "opening a read connection")?;
            c.execute_batch("PRAGMA query_only = ON").map_err(sqlite("making a read connection read-only"))?;
            conns.push(c);
        }
        let durability = Arc::new(Durability::default());
        let readers = Readers::start(conns, Arc::clone(&durability))
            .map_err(|source| OpenError::Spawn { what: "reader", source })?;

        let counters = Arc::new(Counters::default());
        // The WAL exists now (the migration ran a write transaction). Its
        // directory entry, and a new database file's, must be durable
        // before any fsync of the file's contents can count.
        sync_dir(&path)?;
        let (syncer_tx, syncer) = match options.synchronous {
            Synchronous::Normal => (None, None),
            Synchronous::Full => {
                let wal_path = wal_path(&path);
                let wal = std::fs::OpenOptions::new().read(true).write(true).open(&wal_path).map_err(|source| {
                    OpenError::Io { what: "opening the WAL file to fsync it", path: wal_path.clone(), source }
                })?;
                // A previous process may have died with commits written but
                // not yet fsynced: make them durable before anyone reads them.
                wal.sync_data().map_err(|source| OpenError::Io { what: "syncing the WAL", path: wal_path, source })?;
                let (tx, rx) = std::sync::mpsc::channel();
                let syncing = Arc::new(durability::Syncing {
                    wal,
                    durability: Arc::clone(&durability),
                    counters: Arc::clone(&counters),
                    policy: durability::SyncPolicy {
                        wal_sync: options.test_hooks.wal_sync.clone(),
                        answer_before_sync: options.test_hooks.answer_before_sync,
                        release_reads_before_sync: options.test_hooks.release_reads_before_sync,
                    },
                });
                let s = Arc::clone(&syncing);
                let t = std::thread::Builder::new()
                    .name("duffy-sqlite-syncer".into())
                    .spawn(move || durability::run(s, rx))
                    .map_err(|source| OpenError::Spawn { what: "syncer", source })?;
                (Some((tx, syncing)), Some(t))
            }
        };
        let ckpt = connect(&path, existing, options.busy_timeout, "opening the checkpoint connection")?;
        ckpt.execute_batch(&format!("PRAGMA synchronous = NORMAL; PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT};"))
            .map_err(sqlite("configuring the checkpoint connection"))?;
        let (stop, stopped) = std::sync::mpsc::channel();
        let c = Arc::clone(&counters);
        let checkpointer = std::thread::Builder::new()
            .name("duffy-sqlite-checkpoint".into())
            .spawn(move || checkpointer::run(ckpt, stopped, c))
            .map_err(|source| OpenError::Spawn { what: "checkpointer", source })?;
        let (tx, rx) = std::sync::mpsc::channel();
        let max_batch = options.max_batch;
        let skip_writer_checkpoint = options.test_hooks.skip_writer_checkpoint;
        let syncer_only = options.test_hooks.syncer_only;
        let c = Arc::clone(&counters);
        let d = Arc::clone(&durability);
        let writer_thread = std::thread::Builder::new()
            .name("duffy-sqlite-writer".into())
            .spawn(move || {
                let sink = writer::Sink {
                    syncer: syncer_tx,
                    durability: d,
                    skip_checkpoints: skip_writer_checkpoint,
                    inline_sync: !syncer_only,
                };
                writer::run(conn, rx, max_batch, c, sink)
            })
            .map_err(|source| OpenError::Spawn { what: "writer", source })?;
        info!(
            path = %path.display(),
            schema_version = SCHEMA_VERSION,
            migrated_from = from,
            synchronous = options.synchronous.name(),
            read_connections = options.read_connections,
            max_batch,
            "opened the SQLite store"
        );
        if options.test_hooks.any() {
            warn!(hooks = ?options.test_hooks, "the SQLite store runs with test hooks: for its own tests only");
        }
        Ok(SqliteStore {
            path,
            writer: Some(tx),
            writer_thread: Some(writer_thread),
            readers,
            syncer,
            checkpointer: Some((stop, checkpointer)),
            counters,
            durability,
            between_read_statements: options.test_hooks.between_read_statements,
        })
    }

    /// The database file this store was opened on (its `-wal` and `-shm`
    /// files sit beside it).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What the writer thread has done so far: with
    /// `operations / transactions`, how well group commit is batching.
    pub fn writer_stats(&self) -> WriterStats {
        WriterStats {
            transactions: self.counters.transactions.load(Ordering::Relaxed),
            operations: self.counters.operations.load(Ordering::Relaxed),
            failed_transactions: self.counters.failed_transactions.load(Ordering::Relaxed),
            syncs: self.counters.syncs.load(Ordering::Relaxed),
            wal_restarts: self.counters.wal_restarts.load(Ordering::Relaxed),
        }
    }

    /// The write path's distributions so far (operations per group
    /// commit, fsync latency): with [`SqliteStore::writer_stats`], what a
    /// service's metrics show of the store.
    pub fn write_histograms(&self) -> WriteHistograms {
        self.counters.distributions.snapshot()
    }

    /// Sends an operation to the writer and waits for its answer (sent
    /// only after its transaction committed).
    async fn write<T>(&self, op: impl FnOnce(oneshot::Sender<T>) -> Op, closed: fn(StoreError) -> T) -> T {
        let (reply, answer) = oneshot::channel();
        let Some(tx) = self.writer.as_ref() else { return closed(StoreError::Closed) };
        if tx.send(op(reply)).is_err() {
            return closed(StoreError::Closed);
        }
        answer.await.unwrap_or_else(|_| closed(StoreError::Closed))
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        self.writer = None;
        if let Some(t) = self.writer_thread.take() {
            let _ = t.join();
        }
        // The writer held the syncer's channel: it drains and stops.
        if let Some(t) = self.syncer.take() {
            let _ = t.join();
        }
        if let Some((stop, t)) = self.checkpointer.take() {
            drop(stop);
            let _ = t.join();
        }
    }
}

fn closed<T>(e: StoreError) -> Result<T, StoreError> {
    Err(e)
}

#[async_trait]
impl Store for SqliteStore {
    async fn add_nodes(&self, nodes: Vec<NewNode>, actor: Actor, now: Timestamp) -> Result<Vec<Node>, StoreError> {
        self.write(|reply| Op::AddNodes { nodes, actor, now, reply }, closed).await
    }

    async fn node(&self, id: NodeId) -> Result<Option<Node>, StoreError> {
        self.readers.read(move |c| queries::node(c, id)).await
    }

    async fn node_by_hostname(&self, hostname: &str) -> Result<Option<Node>, StoreError> {
        let hostname = hostname.to_string();
        self.readers.read(move |c| queries::node_by_hostname(c, &hostname)).await
    }

    async fn nodes(&self) -> Result<Vec<Node>, StoreError> {
        self.readers.read(queries::nodes).await
    }

    async fn ready_counts(&self) -> Result<Vec<(PoolKey, u32)>, StoreError> {
        self.readers.read(queries::ready_counts).await
    }

    async fn nodes_in_states(&self, states: &[NodeState]) -> Result<Vec<Node>, StoreError> {
        let states = states.to_vec();
        let hook = self.between_read_statements.clone();
        self.readers.read(move |c| queries::nodes_in_states(c, &states, hook.as_deref())).await
    }

    async fn stale_ready(&self, installed_before: Timestamp, limit: usize) -> Result<Vec<Node>, StoreError> {
        self.readers.read(move |c| queries::stale_ready(c, installed_before, limit)).await
    }

    async fn idle_nodes(&self, hardware: &Hardware, limit: usize) -> Result<Vec<Node>, StoreError> {
        let hardware = hardware.clone();
        self.readers.read(move |c| queries::idle_nodes(c, &hardware, limit)).await
    }

    async fn nodes_after(&self, after: NodeId, limit: usize) -> Result<Vec<Node>, StoreError> {
        self.readers.read(move |c| queries::nodes_after(c, after, limit)).await
    }

    async fn session(&self, id: &SessionId) -> Result<Option<Session>, StoreError> {
        let id = id.clone();
        self.readers.read(move |c| queries::session(c, &id)).await
    }

    async fn live_sessions(&self) -> Result<Vec<Session>, StoreError> {
        self.readers.read(queries::live_sessions).await
    }

    async fn expired_sessions(&self, now: Timestamp, limit: usize) -> Result<Vec<Session>, StoreError> {
        self.readers.read(move |c| queries::expired_sessions(c, now, limit)).await
    }

    async fn claim(&self, req: ClaimRequest) -> Result<Result<Claimed, ClaimRefusal>, StoreError> {
        self.write(|reply| Op::Claim { req, reply }, closed).await
    }

    async fn commit(&self, batch: Batch) -> Result<(), CommitError> {
        self.write(|reply| Op::Commit { batch, reply }, |e| Err(CommitError::Store(e))).await
    }

    async fn commit_each(&self, batches: Vec<Batch>) -> Vec<Result<(), CommitError>> {
        if batches.is_empty() {
            return Vec::new();
        }
        let n = batches.len();
        let closed = || (0..n).map(|_| Err(CommitError::Store(StoreError::Closed))).collect();
        let (reply, answer) = oneshot::channel();
        let Some(tx) = self.writer.as_ref() else { return closed() };
        if tx.send(Op::CommitEach { batches, reply }).is_err() {
            return closed();
        }
        answer.await.unwrap_or_else(|_| closed())
    }

    async fn hand_back(&self, req: HandBack) -> Result<Result<Session, HandBackRefusal>, CommitError> {
        self.write(|reply| Op::HandBack { req, reply }, |e| Err(CommitError::Store(e))).await
    }

    async fn events(&self, query: EventQuery) -> Result<Vec<Event>, StoreError> {
        self.readers.read(move |c| queries::events(c, query)).await
    }

    async fn latest_events(&self, node: Option<NodeId>, limit: usize) -> Result<Vec<Event>, StoreError> {
        self.readers.read(move |c| queries::latest_events(c, node, limit)).await
    }

    async fn node_counts(&self) -> Result<Vec<duffy_core::NodeCount>, StoreError> {
        self.readers.read(queries::node_counts).await
    }

    async fn upsert_project(&self, project: Project) -> Result<(), StoreError> {
        self.write(|reply| Op::UpsertProject { project, reply }, closed).await
    }

    async fn project(&self, name: &str) -> Result<Option<Project>, StoreError> {
        let name = name.to_string();
        self.readers.read(move |c| queries::project(c, &name)).await
    }

    async fn projects(&self) -> Result<Vec<Project>, StoreError> {
        self.readers.read(queries::projects).await
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
        self.write(|reply| Op::AddApiKey { project, hash, admin, now, expires_at, reply }, closed).await
    }

    async fn api_key_by_hash(&self, hash: &ApiKeyHash) -> Result<Option<ApiKeyRecord>, StoreError> {
        let hash = *hash;
        self.readers.read(move |c| queries::api_key_by_hash(c, &hash)).await
    }

    async fn api_keys(&self, project: Option<&str>) -> Result<Vec<ApiKeyRecord>, StoreError> {
        let project = project.map(str::to_string);
        self.readers.read(move |c| queries::api_keys(c, project.as_deref())).await
    }

    async fn revoke_api_key(&self, id: KeyId, now: Timestamp) -> Result<ApiKeyRecord, StoreError> {
        self.write(|reply| Op::RevokeApiKey { id, now, reply }, closed).await
    }

    async fn record_key_use(&self, used: Vec<(KeyId, Timestamp)>) -> Result<(), StoreError> {
        if used.is_empty() {
            return Ok(());
        }
        self.write(|reply| Op::RecordKeyUse { used, reply }, closed).await
    }

    async fn set_pool_target(&self, target: PoolTarget) -> Result<(), StoreError> {
        self.write(|reply| Op::SetPoolTarget { target, reply }, closed).await
    }

    async fn pool_targets(&self) -> Result<Vec<PoolTarget>, StoreError> {
        self.readers.read(queries::pool_targets).await
    }

    async fn paused(&self) -> Result<bool, StoreError> {
        self.readers.read(queries::paused).await
    }

    async fn set_paused(&self, paused: bool) -> Result<bool, StoreError> {
        self.write(|reply| Op::SetPaused { paused, reply }, closed).await
    }

    async fn new_leader_epoch(&self) -> Result<u64, StoreError> {
        self.write(|reply| Op::NewLeaderEpoch { reply }, closed).await
    }

    async fn commit_fenced(&self, batch: Batch, epoch: u64) -> Result<(), CommitError> {
        self.write(|reply| Op::CommitFenced { batch, epoch, reply }, |e| Err(CommitError::Store(e))).await
    }

    fn install_tickets(self: Arc<Self>) -> Option<Arc<dyn duffy_core::InstallTickets>> {
        Some(self)
    }

    fn health(&self) -> StoreHealth {
        if let Some(e) = self.durability.failure() {
            return StoreHealth::Failed(e.to_string());
        }
        match self.counters.last_failure.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            Some(why) => StoreHealth::Degraded(why),
            None => StoreHealth::Ok,
        }
    }
}
