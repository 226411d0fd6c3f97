//! Export and import of a whole farm, for `duffy store copy`.
//!
//! An export reads one snapshot (a `REPEATABLE READ READ ONLY`
//! transaction): the [`FarmDump`], then the event log in pages. An import
//! writes into an empty database in one transaction, rows as they are (ids,
//! versions, `seq` and all), then moves the id sequences past them and
//! commits: either the whole farm is there or nothing is.

use deadpool_postgres::Object;
use duffy_core::dump::FarmDump;
use duffy_core::{Event, StoreError};
use tokio_postgres::types::ToSql;

use crate::PgStore;
use crate::sql::*;

fn pg(what: &'static str) -> impl Fn(tokio_postgres::Error) -> StoreError {
    move |e| StoreError::backend(what, e)
}

/// A snapshot of the database being read (see the module documentation).
pub struct PgExport {
    conn: Object,
}

impl std::fmt::Debug for PgExport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgExport").finish_non_exhaustive()
    }
}

/// An import in progress (see the module documentation). Dropped without
/// [`PgImport::finish`], it writes nothing.
pub struct PgImport {
    conn: Option<Object>,
}

impl std::fmt::Debug for PgImport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgImport").finish_non_exhaustive()
    }
}

impl Drop for PgImport {
    fn drop(&mut self) {
        // Unfinished: closing the connection rolls the transaction back.
        if let Some(c) = self.conn.take() {
            drop(Object::take(c));
        }
    }
}

impl PgStore {
    /// Starts reading one snapshot of the whole farm.
    pub async fn export(&self) -> Result<PgExport, StoreError> {
        let conn = self.conn("exporting the farm").await?;
        conn.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await
            .map_err(pg("starting the export's snapshot"))?;
        Ok(PgExport { conn })
    }

    /// Starts an import into this database, which must hold no farm (no
    /// node, session, event, project, key or pool target).
    pub async fn import(&self) -> Result<PgImport, StoreError> {
        let conn = self.conn("importing a farm").await?;
        conn.batch_execute("BEGIN").await.map_err(pg("starting the import"))?;
        let row = conn
            .query_one(
                "SELECT (SELECT count(*) FROM nodes) + (SELECT count(*) FROM sessions) + (SELECT count(*) FROM events) \
                 + (SELECT count(*) FROM projects) + (SELECT count(*) FROM api_keys) \
                 + (SELECT count(*) FROM pool_targets)",
                &[],
            )
            .await
            .map_err(pg("checking that the database is empty"))?;
        let rows: i64 = row.get(0);
        let import = PgImport { conn: Some(conn) };
        if rows > 0 {
            return Err(StoreError::Invalid(format!(
                "database {} already holds a farm ({rows} rows); copy into an empty database",
                self.database()
            )));
        }
        Ok(import)
    }
}

impl PgExport {
    /// Everything but the event log.
    pub async fn dump(&self) -> Result<FarmDump, StoreError> {
        let c = &self.conn;
        // Sorted here, not by the database, whose collation may order
        // text differently from another store's.
        let mut projects: Vec<duffy_core::Project> = c
            .query("SELECT name, quota, ssh_keys FROM projects", &[])
            .await
            .map_err(pg("reading projects"))?
            .iter()
            .map(project)
            .collect::<Result<_, _>>()?;
        let keys = c
            .query(concat!("SELECT ", key_cols!(), " FROM api_keys ORDER BY id"), &[])
            .await
            .map_err(pg("reading keys"))?
            .iter()
            .map(api_key)
            .collect::<Result<_, _>>()?;
        let mut targets: Vec<_> = c
            .query("SELECT release, arch, flavor, standby FROM pool_targets", &[])
            .await
            .map_err(pg("reading pool targets"))?
            .iter()
            .map(pool_target)
            .collect::<Result<_, _>>()?;
        targets.sort_by(|a: &duffy_core::PoolTarget, b| a.pool.cmp(&b.pool));
        let nodes = c
            .query(concat!("SELECT ", node_cols!(), " FROM nodes ORDER BY id"), &[])
            .await
            .map_err(pg("reading nodes"))?
            .iter()
            .map(node)
            .collect::<Result<_, _>>()?;
        let mut sessions: Vec<duffy_core::Session> = c
            .query(concat!("SELECT ", session_cols!(), " FROM sessions"), &[])
            .await
            .map_err(pg("reading sessions"))?
            .iter()
            .map(session)
            .collect::<Result<_, _>>()?;
        projects.sort_by(|a, b| a.name.cmp(&b.name));
        sessions.sort_by(|a, b| a.id.cmp(&b.id));
        let paused: bool =
            c.query_one("SELECT paused FROM settings WHERE id = 1", &[]).await.map_err(pg("reading settings"))?.get(0);
        Ok(FarmDump { projects, keys, targets, nodes, sessions, paused })
    }

    /// Events after `after` in `seq` order, at most `limit`.
    pub async fn events(&self, after: u64, limit: usize) -> Result<Vec<Event>, StoreError> {
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.conn
            .query(
                concat!("SELECT ", event_cols!(), " FROM events WHERE seq > $1 ORDER BY seq LIMIT $2"),
                &[&after, &limit],
            )
            .await
            .map_err(pg("reading events"))?
            .iter()
            .map(event)
            .collect()
    }

    /// How many events the snapshot holds.
    pub async fn event_count(&self) -> Result<u64, StoreError> {
        let n: i64 =
            self.conn.query_one("SELECT count(*) FROM events", &[]).await.map_err(pg("counting events"))?.get(0);
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Ends the snapshot.
    pub async fn finish(self) -> Result<(), StoreError> {
        self.conn.batch_execute("COMMIT").await.map_err(pg("ending the export's snapshot"))
    }
}

/// Rows per statement of an import.
const CHUNK: usize = 5000;

impl PgImport {
    fn conn(&self) -> Result<&Object, StoreError> {
        self.conn.as_ref().ok_or(StoreError::Closed)
    }

    /// Writes everything but the event log.
    pub async fn write_dump(&mut self, dump: &FarmDump) -> Result<(), StoreError> {
        let c = self.conn()?;
        for p in &dump.projects {
            c.execute(
                "INSERT INTO projects (name, quota, ssh_keys) VALUES ($1, $2, $3)",
                &[&p.name, &p.quota.map(i64::from), &p.ssh_keys],
            )
            .await
            .map_err(pg("writing a project"))?;
        }
        for k in &dump.keys {
            c.execute(
                "INSERT INTO api_keys (id, project, hash, admin, created_at, expires_at, revoked_at, last_used) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                &[
                    &sql_u64(k.id.0, "key id")?,
                    &k.project,
                    &&k.hash.0[..],
                    &k.admin,
                    &k.created_at.0,
                    &k.expires_at.map(|t| t.0),
                    &k.revoked_at.map(|t| t.0),
                    &k.last_used.map(|t| t.0),
                ],
            )
            .await
            .map_err(pg("writing a key"))?;
        }
        for t in &dump.targets {
            c.execute(
                "INSERT INTO pool_targets (release, arch, flavor, standby) VALUES ($1, $2, $3, $4)",
                &[
                    &t.pool.release,
                    &t.pool.arch.as_str(),
                    &t.pool.flavor.clone().unwrap_or_default(),
                    &i64::from(t.standby),
                ],
            )
            .await
            .map_err(pg("writing a pool target"))?;
        }
        for chunk in dump.nodes.chunks(CHUNK) {
            let mut rows = NodeRows::default();
            for n in chunk {
                rows.push(n, 0)?;
            }
            let params: Vec<&(dyn ToSql + Sync)> = rows.params().to_vec();
            c.execute(
                "INSERT INTO nodes (id, hostname, ip, chassis, hardware_arch, flavor, bmc, console_port, state, \
                 image_release, image_arch, image_flavor, used_count, session, state_since, installed_at, hold_until, \
                 fail_reason, power, version, host_key) \
                 SELECT id, hostname, ip, chassis, hardware_arch, flavor, bmc, console_port, state, image_release, \
                 image_arch, image_flavor, used_count, session, state_since, installed_at, hold_until, fail_reason, \
                 power, version, host_key FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[], \
                 $5::text[], $6::text[], $7::text[], $8::text[], $9::integer[], $10::text[], $11::text[], \
                 $12::text[], $13::text[], $14::bigint[], $15::text[], $16::bigint[], $17::bigint[], $18::bigint[], \
                 $19::text[], $20::text[], $21::bigint[], $22::text[]) AS v(id, expected, hostname, ip, chassis, \
                 hardware_arch, flavor, bmc, console_port, state, image_release, image_arch, image_flavor, \
                 used_count, session, state_since, installed_at, hold_until, fail_reason, power, version, host_key)",
                &params,
            )
            .await
            .map_err(pg("writing nodes"))?;
        }
        for s in &dump.sessions {
            // The process that made a session is not known here: recovery
            // treats a copied allocation in progress as abandoned.
            let row = SessionRow::of(s)?;
            let mut params: Vec<&(dyn ToSql + Sync)> = row.params().to_vec();
            params.push(&None::<i32>);
            c.execute(IMPORT_SESSION, &params).await.map_err(pg("writing a session"))?;
        }
        c.execute("UPDATE settings SET paused = $1 WHERE id = 1", &[&dump.paused])
            .await
            .map_err(pg("writing the pause flag"))?;
        Ok(())
    }

    /// Writes a page of events, `seq` and all.
    pub async fn write_events(&mut self, events: &[Event]) -> Result<(), StoreError> {
        let c = self.conn()?;
        for chunk in events.chunks(CHUNK) {
            let seqs: Vec<i64> = chunk.iter().map(|e| sql_u64(e.seq, "event seq")).collect::<Result<_, _>>()?;
            let mut rows = EventRows::default();
            for e in chunk {
                rows.push(e)?;
            }
            let mut params: Vec<&(dyn ToSql + Sync)> = vec![&seqs];
            params.extend(rows.params());
            c.execute(
                "INSERT INTO events (seq, node, from_state, to_state, cause, detail, actor, session, at) \
                 SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[], \
                 $7::text[], $8::text[], $9::bigint[])",
                &params,
            )
            .await
            .map_err(pg("writing events"))?;
        }
        Ok(())
    }

    /// Moves the id sequences past the imported rows and commits.
    pub async fn finish(mut self) -> Result<(), StoreError> {
        let c = self.conn.take().ok_or(StoreError::Closed)?;
        c.batch_execute(
            "SELECT setval('nodes_id_seq', coalesce((SELECT max(id) FROM nodes), 0) + 1, false); \
             SELECT setval('events_seq_seq', coalesce((SELECT max(seq) FROM events), 0) + 1, false); \
             SELECT setval('api_keys_id_seq', coalesce((SELECT max(id) FROM api_keys), 0) + 1, false); \
             COMMIT",
        )
        .await
        .map_err(pg("committing the import"))
    }
}
