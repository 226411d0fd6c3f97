//! Export and import of a whole farm, for `duffy store copy` (see
//! `duffy_core::dump`).
//!
//! Both work on a connection of their own, not through the writer thread:
//! the file must not be in use by a service (the CLI holds the database
//! lock, see duffy-http's `control` module). An export reads one snapshot
//! (one read transaction); an import writes everything in one transaction
//! into a store without a farm, so a failed import leaves no farm behind.

use std::path::{Path, PathBuf};

use duffy_core::dump::FarmDump;
use duffy_core::{Event, EventQuery, Project, StoreError};
use rusqlite::{Connection, OpenFlags, params};

use crate::codec::{self, to_sql_u64};
use crate::queries::{self as q, Context};
use crate::{OpenError, SqliteOptions, SqliteStore};

/// Brings the file to the current schema (creating it when `create`).
fn migrated(path: &Path, create: bool) -> Result<(), OpenError> {
    if !create && !path.exists() {
        return Err(OpenError::Io {
            what: "opening",
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such database file"),
        });
    }
    // Opening the store runs the migrations; it is closed again at once.
    drop(SqliteStore::open(path, SqliteOptions { read_connections: 1, ..SqliteOptions::default() })?);
    Ok(())
}

fn connect(path: &Path) -> Result<Connection, OpenError> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .map_err(|source| OpenError::Sqlite { context: "opening the database".into(), source })?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(|source| OpenError::Sqlite { context: "setting the busy timeout".into(), source })?;
    Ok(conn)
}

/// One snapshot of a store's file being read.
pub struct SqliteExport {
    conn: Connection,
    path: PathBuf,
}

impl std::fmt::Debug for SqliteExport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteExport").field("path", &self.path).finish()
    }
}

impl SqliteExport {
    /// Opens the existing store at `path` (migrating it first) and starts
    /// a read transaction: everything read is one snapshot.
    pub fn open(path: impl AsRef<Path>) -> Result<SqliteExport, OpenError> {
        let path = path.as_ref().to_path_buf();
        migrated(&path, false)?;
        let conn = connect(&path)?;
        conn.execute_batch("BEGIN DEFERRED; SELECT count(*) FROM settings;")
            .map_err(|source| OpenError::Sqlite { context: "starting the export's snapshot".into(), source })?;
        Ok(SqliteExport { conn, path })
    }

    /// Everything but the event log.
    pub fn dump(&self) -> Result<FarmDump, StoreError> {
        let c = &self.conn;
        let mut projects = Vec::new();
        let mut stmt = c.prepare("SELECT name, quota, ssh_keys FROM projects").ctx("reading projects")?;
        let mut rows = stmt.query([]).ctx("reading projects")?;
        while let Some(r) = rows.next().ctx("reading projects")? {
            projects.push(codec::project(r)?);
        }
        projects.sort_by(|a: &Project, b| a.name.cmp(&b.name));
        let mut sessions = Vec::new();
        let mut stmt =
            c.prepare(concat!("SELECT ", codec::session_cols!(), " FROM sessions")).ctx("reading sessions")?;
        let mut rows = stmt.query([]).ctx("reading sessions")?;
        while let Some(r) = rows.next().ctx("reading sessions")? {
            sessions.push(codec::session(r)?);
        }
        sessions.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(FarmDump {
            projects,
            keys: q::api_keys(c, None)?,
            targets: q::pool_targets(c)?,
            nodes: q::nodes(c)?,
            sessions,
            paused: q::paused(c)?,
        })
    }

    /// Events after `after`, in `seq` order, at most `limit`.
    pub fn events(&self, after: u64, limit: usize) -> Result<Vec<Event>, StoreError> {
        q::events(&self.conn, EventQuery { node: None, after_seq: after, limit })
    }

    /// How many events the snapshot holds.
    pub fn event_count(&self) -> Result<u64, StoreError> {
        let n: i64 = self.conn.query_row("SELECT count(*) FROM events", [], |r| r.get(0)).ctx("counting events")?;
        Ok(u64::try_from(n).unwrap_or(0))
    }
}

/// An import in progress: one write transaction. Dropped without
/// [`SqliteImport::finish`], it writes nothing.
pub struct SqliteImport {
    conn: Connection,
    path: PathBuf,
}

impl std::fmt::Debug for SqliteImport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteImport").field("path", &self.path).finish()
    }
}

impl SqliteImport {
    /// Creates (or opens) the store at `path`, which must hold no farm,
    /// and starts the import's transaction.
    pub fn create(path: impl AsRef<Path>) -> Result<SqliteImport, StoreError> {
        let path = path.as_ref().to_path_buf();
        migrated(&path, true)?;
        let conn = connect(&path)?;
        conn.execute_batch("PRAGMA foreign_keys = ON; BEGIN IMMEDIATE").ctx("starting the import")?;
        let rows: i64 = conn
            .query_row(
                "SELECT (SELECT count(*) FROM nodes) + (SELECT count(*) FROM sessions) + (SELECT count(*) FROM events) \
                 + (SELECT count(*) FROM projects) + (SELECT count(*) FROM api_keys) \
                 + (SELECT count(*) FROM pool_targets)",
                [],
                |r| r.get(0),
            )
            .ctx("checking that the store is empty")?;
        if rows > 0 {
            return Err(StoreError::Invalid(format!(
                "{} already holds a farm ({rows} rows); copy into a new file",
                path.display()
            )));
        }
        Ok(SqliteImport { conn, path })
    }

    /// Writes everything but the event log, rows as they are.
    pub fn write_dump(&mut self, dump: &FarmDump) -> Result<(), StoreError> {
        let c = &self.conn;
        for p in &dump.projects {
            q::put_project(c, p)?;
        }
        for k in &dump.keys {
            c.execute(
                "INSERT INTO api_keys (id, project, hash, admin, created_at, expires_at, revoked_at, last_used) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    to_sql_u64(k.id.0, "key id")?,
                    k.project,
                    &k.hash.0[..],
                    k.admin,
                    k.created_at.0,
                    k.expires_at.map(|t| t.0),
                    k.revoked_at.map(|t| t.0),
                    k.last_used.map(|t| t.0),
                ],
            )
            .ctx("writing a key")?;
        }
        for t in &dump.targets {
            q::put_pool_target(c, t)?;
        }
        const WHAT: &str = "writing a node";
        let mut stmt = c
            .prepare(
                "INSERT INTO nodes (hostname, ip, chassis, hardware_arch, flavor, bmc, console_port, state, \
                 image_release, image_arch, image_flavor, used_count, session, state_since, installed_at, hold_until, \
                 fail_reason, power, version, host_key, id) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21)",
            )
            .ctx(WHAT)?;
        for n in &dump.nodes {
            q::bind_node(&mut stmt, n, WHAT)?;
            stmt.raw_bind_parameter(21, to_sql_u64(n.id.0, "node id")?).ctx(WHAT)?;
            stmt.raw_execute().ctx(WHAT)?;
        }
        for s in &dump.sessions {
            q::insert_session(c, s)?;
        }
        q::set_paused(c, dump.paused)
    }

    /// Writes a page of events, `seq` and all, in `seq` order (pages
    /// too): each event is linked to its node's previous one and becomes
    /// the node's latest, so node histories are chains as the service
    /// writes them.
    pub fn write_events(&mut self, events: &[Event]) -> Result<(), StoreError> {
        const WHAT: &str = "writing an event";
        let mut stmt = self
            .conn
            .prepare_cached(
                "INSERT INTO events (seq, node, from_state, to_state, cause, detail, actor, session, at, prev) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, (SELECT last_event FROM nodes WHERE id = ?2))",
            )
            .ctx(WHAT)?;
        let mut link =
            self.conn.prepare_cached("UPDATE nodes SET last_event = ?1 WHERE id = ?2").ctx("linking an event")?;
        for e in events {
            stmt.execute(params![
                to_sql_u64(e.seq, "event seq")?,
                to_sql_u64(e.node.0, "event node")?,
                e.from.as_str(),
                e.to.as_str(),
                e.cause.as_str(),
                e.detail,
                e.actor.to_string(),
                e.session.as_ref().map(|s| s.as_str()),
                e.at.0,
            ])
            .ctx(WHAT)?;
            // After the insert, which read the node's previous latest.
            link.execute(params![to_sql_u64(e.seq, "event seq")?, to_sql_u64(e.node.0, "event node")?])
                .ctx("linking an event")?;
        }
        Ok(())
    }

    /// Commits the import.
    pub fn finish(self) -> Result<(), StoreError> {
        // A fresh connection runs synchronous=FULL: the commit is durable.
        self.conn.execute_batch("COMMIT").ctx("committing the import")
    }
}
