//! The schema, as versioned forward-only migrations.
//!
//! The file's `PRAGMA user_version` is the number of migrations applied;
//! `PRAGMA application_id` marks the file as Duffy's. On open every
//! migration after the file's version is applied, all in one transaction
//! together with the version bump, so a crash mid-upgrade leaves the old
//! version intact. A file whose version is newer than this build knows is
//! refused with [`OpenError::SchemaTooNew`](crate::OpenError::SchemaTooNew):
//! migrations never go backwards.

use std::path::Path;

use rusqlite::Connection;
use tracing::info;

use crate::OpenError;

/// `PRAGMA application_id` of a Duffy store: "DUFY".
pub const APPLICATION_ID: i32 = 0x4455_4659;

/// Version 1: nodes, sessions, the event log, projects, keys, pool targets
/// and the pause flag.
///
/// Encodings: enums as their stable names (`NodeState::as_str` and so on),
/// timestamps as milliseconds, a pool key as three columns (release, arch,
/// flavor; a missing flavor is NULL, except in `pool_targets` where it is
/// `''` so it can be part of the primary key: flavors are validated
/// non-empty), a session's node list and a project's SSH keys as JSON
/// arrays.
const V1: &str = r#"
CREATE TABLE nodes (
    id            INTEGER PRIMARY KEY,
    hostname      TEXT    NOT NULL UNIQUE,
    ip            TEXT,
    chassis       TEXT,
    hardware_arch TEXT    NOT NULL,
    flavor        TEXT,
    bmc           TEXT,
    console_port  INTEGER,
    state         TEXT    NOT NULL,
    image_release TEXT,
    image_arch    TEXT,
    image_flavor  TEXT,
    used_count    INTEGER NOT NULL,
    session       TEXT,
    state_since   INTEGER NOT NULL,
    installed_at  INTEGER,
    hold_until    INTEGER,
    fail_reason   TEXT,
    power         TEXT    NOT NULL,
    version       INTEGER NOT NULL
);
-- The claim index: Ready nodes by pool, least used first, then lowest id.
-- A claim is one range scan of it, whatever the size of the farm.
CREATE INDEX nodes_ready ON nodes (image_release, image_arch, image_flavor, used_count, id)
    WHERE state = 'Ready';

CREATE TABLE sessions (
    id           TEXT    NOT NULL PRIMARY KEY,
    project      TEXT    NOT NULL,
    key_id       INTEGER NOT NULL,
    state        TEXT    NOT NULL,
    pool_release TEXT    NOT NULL,
    pool_arch    TEXT    NOT NULL,
    pool_flavor  TEXT,
    nodes        TEXT    NOT NULL,
    created_at   INTEGER NOT NULL,
    delivered_at INTEGER,
    lease_until  INTEGER,
    hold_until   INTEGER,
    ended_at     INTEGER,
    end_reason   TEXT,
    version      INTEGER NOT NULL,
    -- The key and creation time as first inserted, never updated: what the
    -- rate limit counts.
    origin_key   INTEGER NOT NULL,
    origin_at    INTEGER NOT NULL,
    live         INTEGER NOT NULL GENERATED ALWAYS AS (state IN ('Allocating', 'Prod', 'Fail')) VIRTUAL
) WITHOUT ROWID;
-- live_sessions(), in order.
CREATE INDEX sessions_live ON sessions (created_at, id) WHERE live = 1;
-- The quota and the fail-cap guard: a project's live sessions.
CREATE INDEX sessions_live_project ON sessions (project) WHERE live = 1;
-- The rate limit: sessions a key created since a time.
CREATE INDEX sessions_origin ON sessions (origin_key, origin_at);

CREATE TABLE events (
    seq        INTEGER PRIMARY KEY,
    node       INTEGER NOT NULL REFERENCES nodes (id),
    from_state TEXT    NOT NULL,
    to_state   TEXT    NOT NULL,
    cause      TEXT    NOT NULL,
    detail     TEXT,
    actor      TEXT    NOT NULL,
    session    TEXT,
    at         INTEGER NOT NULL
);
CREATE INDEX events_node ON events (node, seq);

CREATE TABLE projects (
    name     TEXT NOT NULL PRIMARY KEY,
    quota    INTEGER,
    ssh_keys TEXT NOT NULL
) WITHOUT ROWID;

CREATE TABLE api_keys (
    id         INTEGER PRIMARY KEY,
    project    TEXT    NOT NULL REFERENCES projects (name),
    hash       BLOB    NOT NULL UNIQUE,
    admin      INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX api_keys_project ON api_keys (project);

CREATE TABLE pool_targets (
    release TEXT    NOT NULL,
    arch    TEXT    NOT NULL,
    flavor  TEXT    NOT NULL,
    standby INTEGER NOT NULL,
    PRIMARY KEY (release, arch, flavor)
) WITHOUT ROWID;

CREATE TABLE settings (
    id     INTEGER PRIMARY KEY CHECK (id = 1),
    paused INTEGER NOT NULL
);
INSERT INTO settings (id, paused) VALUES (1, 0);
"#;

/// Version 2: the SSH host key an install reported, checked when Duffy
/// connects to the node.
const V2: &str = r#"
ALTER TABLE nodes ADD COLUMN host_key TEXT;
"#;

/// Version 3: the reconciler's reads, so a pass does not read the whole
/// farm: nodes by state (in id order), Ready nodes by install time (the
/// stale ones, oldest first), and idle (Active) nodes least used first.
const V3: &str = r#"
CREATE INDEX nodes_state ON nodes (state, id);
CREATE INDEX nodes_stale ON nodes (installed_at, id) WHERE state = 'Ready';
CREATE INDEX nodes_idle ON nodes (used_count, id) WHERE state = 'Active';
"#;

/// Version 4: idle machines by kind (architecture, flavor), least used
/// first, so the reconciler reads the candidates of each pool in deficit
/// without scanning idle machines of other kinds.
const V4: &str = r#"
DROP INDEX nodes_idle;
CREATE INDEX nodes_idle ON nodes (hardware_arch, flavor, used_count, id) WHERE state = 'Active';
"#;

/// Version 5: key management. A key may expire; a revoked key keeps its
/// row (its sessions name it) with the time it was revoked; the last time
/// it authenticated a request, as the engine records it (coarsely, not per
/// request).
const V5: &str = r#"
ALTER TABLE api_keys ADD COLUMN expires_at INTEGER;
ALTER TABLE api_keys ADD COLUMN revoked_at INTEGER;
ALTER TABLE api_keys ADD COLUMN last_used INTEGER;
"#;

/// Version 6: session expiry. A delivered session expires at
/// `expires_at` (its lease's end, moved by extensions) and the reconciler
/// reclaims it; Prod sessions are indexed by it. Sessions delivered before
/// the upgrade expire at their lease, as every session now does: one that
/// ran past its lease is reclaimed by the first reconciler pass after the
/// upgrade.
const V6: &str = r#"
ALTER TABLE sessions ADD COLUMN expires_at INTEGER;
UPDATE sessions SET expires_at = lease_until;
CREATE INDEX sessions_expiry ON sessions (expires_at, id) WHERE state = 'Prod';
"#;

/// Version 7: the leadership epoch that fenced writes must carry
/// (`Store::new_leader_epoch`, `Store::commit_fenced`); 0 until a term
/// starts.
const V7: &str = r#"
ALTER TABLE settings ADD COLUMN leader_epoch INTEGER NOT NULL DEFAULT 0;
"#;

/// Version 8: cheaper writes on the hot path.
///
/// - A session's `live` flag without an `IN` list: SQLite evaluates
///   `state IN (...)` through a temporary table built on every execution,
///   and every insert or update of a session evaluated it (for the column
///   and its two partial indexes) — about a tenth of the writer's time.
///   The same flag, spelled with `OR`.
/// - Nodes by state: the index on every node's state was rewritten by
///   every transition (four per allocation cycle) while only the
///   reconciler's reads of Provisioning and Failed nodes used it (Ready,
///   Active and idle nodes have their own partial indexes). Two partial
///   indexes for those two states take its place, touched only by the
///   transitions into and out of them; reads of other states scan the
///   table in id order (tools and tests, not the service's passes).
/// - A node's history as a chain: each event names its node's previous
///   event (`prev`) and each node its latest (`last_event`), in place of
///   the index on `(node, seq)`, which put nearly every new event on a
///   page of its own and was three quarters of the pages every commit
///   wrote. The chain is built from the index for the events already
///   stored, then the index goes.
const V8: &str = r#"
ALTER TABLE events ADD COLUMN prev INTEGER;
ALTER TABLE nodes ADD COLUMN last_event INTEGER;
UPDATE events SET prev = (SELECT max(p.seq) FROM events AS p WHERE p.node = events.node AND p.seq < events.seq);
UPDATE nodes SET last_event = (SELECT max(e.seq) FROM events AS e WHERE e.node = nodes.id);
DROP INDEX events_node;
DROP INDEX sessions_live;
DROP INDEX sessions_live_project;
ALTER TABLE sessions DROP COLUMN live;
ALTER TABLE sessions ADD COLUMN live INTEGER NOT NULL
    GENERATED ALWAYS AS (state = 'Allocating' OR state = 'Prod' OR state = 'Fail') VIRTUAL;
CREATE INDEX sessions_live ON sessions (created_at, id) WHERE live = 1;
CREATE INDEX sessions_live_project ON sessions (project) WHERE live = 1;
DROP INDEX nodes_state;
CREATE INDEX nodes_provisioning ON nodes (id) WHERE state = 'Provisioning';
CREATE INDEX nodes_failed ON nodes (id) WHERE state = 'Failed';
"#;

/// Version 9: the quota and the fail cap without reading every live
/// session's node list. A live session holds every node it lists (the
/// invariant `duffy_core::audit::check_invariants` checks: each listed
/// node names the session as its holder and is in the session's state),
/// so the nodes a project holds are the sum of its live sessions' list
/// lengths, and the Failed nodes its Fail sessions hold the same sum over
/// those in Fail. Each session's length is a column of its own
/// (`node_count`, written with `nodes`), kept in an index of the live
/// sessions beside the project and the state, so both sums read that
/// index alone: one entry per live session of the project, where the
/// join over `json_each` parsed every live session's list and looked up
/// each of its nodes (28% of the writer's time under load). The column is
/// stored, not generated: SQLite never reads a generated column's value
/// from an index, and a partial index on the generated `live` column is
/// not covering either, so the index's condition spells the live states
/// out as the queries do.
const V9: &str = r#"
ALTER TABLE sessions ADD COLUMN node_count INTEGER NOT NULL DEFAULT 0;
UPDATE sessions SET node_count = json_array_length(nodes);
DROP INDEX sessions_live_project;
CREATE INDEX sessions_live_project ON sessions (project, state, node_count)
    WHERE state = 'Allocating' OR state = 'Prod' OR state = 'Fail';
"#;

/// Version 10: the PXE installer's pending installs (`InstallTickets`),
/// kept in the store as on every backend (on PostgreSQL, that is what
/// lets a machine's callback reach any replica): one ticket per host
/// name (pending, used and waiting for its installer to read the
/// outcome, or expired: a tombstone), and the SHA-256 hashes of the
/// tokens issued for it (never a token), deleted with it.
const V10: &str = r#"
CREATE TABLE install_tickets (
    hostname      TEXT    NOT NULL PRIMARY KEY,
    ticket_id     TEXT    NOT NULL,
    ip            TEXT    NOT NULL,
    hardware_arch TEXT    NOT NULL,
    image_release TEXT    NOT NULL,
    image_arch    TEXT    NOT NULL,
    image_flavor  TEXT,
    expires_at    INTEGER NOT NULL,
    state         TEXT    NOT NULL CHECK (state IN ('pending', 'done', 'failed', 'expired')),
    host_key      TEXT,
    reason        TEXT
) WITHOUT ROWID;
CREATE TABLE install_ticket_tokens (
    seq      INTEGER PRIMARY KEY,
    hash     BLOB    NOT NULL UNIQUE,
    hostname TEXT    NOT NULL REFERENCES install_tickets (hostname) ON DELETE CASCADE
);
CREATE INDEX install_ticket_tokens_host ON install_ticket_tokens (hostname, seq);
"#;

/// Every migration, in order: migration `i` takes the file from version
/// `i` to `i + 1`. Append only; never edit a released one.
const MIGRATIONS: &[&str] = &[V1, V2, V3, V4, V5, V6, V7, V8, V9, V10];

/// The schema version this build writes (the number of migrations).
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Brings the file to [`SCHEMA_VERSION`], in one immediate transaction.
/// Returns the version the file had before.
pub(crate) fn migrate(conn: &Connection, path: &Path) -> Result<i64, OpenError> {
    let sql = |context: &str| {
        let context = context.to_string();
        move |source| OpenError::Sqlite { context, source }
    };
    conn.execute_batch("BEGIN IMMEDIATE").map_err(sql("starting the migration transaction"))?;
    let result = (|| {
        let found: i64 =
            conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(sql("reading the schema version"))?;
        let app: i32 =
            conn.query_row("PRAGMA application_id", [], |r| r.get(0)).map_err(sql("reading the application id"))?;
        let foreign = if app == 0 { found != 0 } else { app != APPLICATION_ID };
        if foreign {
            return Err(OpenError::ForeignDatabase {
                path: path.to_path_buf(),
                application_id: app,
                user_version: found,
            });
        }
        if found > SCHEMA_VERSION {
            return Err(OpenError::SchemaTooNew { path: path.to_path_buf(), found, supported: SCHEMA_VERSION });
        }
        if found < 0 {
            return Err(OpenError::ForeignDatabase {
                path: path.to_path_buf(),
                application_id: app,
                user_version: found,
            });
        }
        for (i, m) in MIGRATIONS.iter().enumerate().skip(found as usize) {
            conn.execute_batch(m).map_err(sql(&format!("applying schema migration {}", i + 1)))?;
        }
        if found < SCHEMA_VERSION {
            conn.execute_batch(&format!(
                "PRAGMA user_version = {SCHEMA_VERSION}; PRAGMA application_id = {APPLICATION_ID};"
            ))
            .map_err(sql("recording the schema version"))?;
        }
        Ok(found)
    })();
    match result {
        Ok(found) => {
            conn.execute_batch("COMMIT").map_err(sql("committing the migration"))?;
            if found < SCHEMA_VERSION {
                info!(path = %path.display(), from = found, to = SCHEMA_VERSION, "migrated the store's schema");
            }
            Ok(found)
        }
        Err(e) => {
            // The transaction is rolled back whole: nothing of a partial
            // upgrade remains.
            let _ = conn.execute_batch("ROLLBACK");
            Err(e)
        }
    }
}
