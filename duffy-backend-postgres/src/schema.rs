//! The schema, as versioned forward-only migrations in a table of their
//! own (`duffy_migrations`: one row per migration applied).
//!
//! On open, one connection takes a session advisory lock (so replicas
//! starting together migrate once, one after the other) and, in one
//! transaction, applies every migration after the newest recorded one,
//! recording each. A database whose newest migration is newer than this
//! build knows is refused before anything is written; a database with
//! tables of its own but no `duffy_migrations` is refused as not Duffy's.

use tokio_postgres::Client;
use tracing::info;

use crate::OpenError;
use crate::sql::LOCK_MIGRATE;

/// Version 1: nodes, sessions, the event log, projects, keys, pool
/// targets, settings (pause flag, leadership epoch), the processes using
/// the database (instances) and the key-change counter.
///
/// Encodings: enums as their stable names, timestamps as milliseconds
/// (the engine's clock, not the database's), a pool key as three columns
/// (a missing flavor is NULL, except in `pool_targets` where it is `''`,
/// part of the primary key; flavors are validated non-empty), a session's
/// nodes as `bigint[]`, a project's SSH keys as `text[]`.
const V1: &str = r#"
CREATE TABLE nodes (
    id            bigserial PRIMARY KEY,
    hostname      text    NOT NULL UNIQUE,
    ip            text,
    chassis       text,
    hardware_arch text    NOT NULL,
    flavor        text,
    bmc           text,
    console_port  integer,
    state         text    NOT NULL,
    image_release text,
    image_arch    text,
    image_flavor  text,
    used_count    bigint  NOT NULL,
    session       text,
    state_since   bigint  NOT NULL,
    installed_at  bigint,
    hold_until    bigint,
    fail_reason   text,
    power         text    NOT NULL,
    host_key      text,
    version       bigint  NOT NULL
);
-- The claim: Ready nodes of a pool, least used first, then lowest id; one
-- range scan, locking as it goes and skipping rows other claims hold.
CREATE INDEX nodes_ready ON nodes (image_release, image_arch, (coalesce(image_flavor, '')), used_count, id)
    WHERE state = 'Ready';
-- The reconciler's reads: by state in id order, stale Ready nodes oldest
-- first, idle machines of one kind least used first.
CREATE INDEX nodes_state ON nodes (state, id);
CREATE INDEX nodes_stale ON nodes (installed_at, id) WHERE state = 'Ready';
CREATE INDEX nodes_idle ON nodes (hardware_arch, (coalesce(flavor, '')), used_count, id) WHERE state = 'Active';

CREATE TABLE sessions (
    id           text    PRIMARY KEY,
    project      text    NOT NULL,
    key_id       bigint  NOT NULL,
    state        text    NOT NULL,
    pool_release text    NOT NULL,
    pool_arch    text    NOT NULL,
    pool_flavor  text,
    nodes        bigint[] NOT NULL,
    created_at   bigint  NOT NULL,
    delivered_at bigint,
    lease_until  bigint,
    hold_until   bigint,
    ended_at     bigint,
    end_reason   text,
    version      bigint  NOT NULL,
    -- The key and creation time as first inserted, never updated: what the
    -- rate limit counts.
    origin_key   bigint  NOT NULL,
    origin_at    bigint  NOT NULL,
    -- The process (instances.id) whose claim made it; NULL when not known
    -- (copied from another store). Recovery asks whether it is alive.
    creator      integer,
    live         boolean GENERATED ALWAYS AS (state IN ('Allocating', 'Prod', 'Fail')) STORED
);
CREATE INDEX sessions_live ON sessions (created_at, id) WHERE live;
CREATE INDEX sessions_live_project ON sessions (project) WHERE live;
CREATE INDEX sessions_origin ON sessions (origin_key, origin_at);

-- No foreign key to nodes: nodes are never deleted, the store writes each
-- event with its node in one transaction, and a foreign-key check per
-- event costs a query per row on the hot path.
CREATE TABLE events (
    seq        bigserial PRIMARY KEY,
    node       bigint  NOT NULL,
    from_state text    NOT NULL,
    to_state   text    NOT NULL,
    cause      text    NOT NULL,
    detail     text,
    actor      text    NOT NULL,
    session    text,
    at         bigint  NOT NULL,
    -- The leadership epoch of a fenced write (the reconciler's); NULL for
    -- every other write.
    term       bigint
);
CREATE INDEX events_node ON events (node, seq);

CREATE TABLE projects (
    name     text   PRIMARY KEY,
    quota    bigint,
    ssh_keys text[] NOT NULL
);

CREATE TABLE api_keys (
    id         bigserial PRIMARY KEY,
    project    text    NOT NULL REFERENCES projects (name),
    hash       bytea   NOT NULL UNIQUE,
    admin      boolean NOT NULL,
    created_at bigint  NOT NULL,
    expires_at bigint,
    revoked_at bigint,
    last_used  bigint
);
CREATE INDEX api_keys_project ON api_keys (project);

CREATE TABLE pool_targets (
    release text   NOT NULL,
    arch    text   NOT NULL,
    flavor  text   NOT NULL,
    standby bigint NOT NULL,
    PRIMARY KEY (release, arch, flavor)
);

CREATE TABLE settings (
    id              integer PRIMARY KEY CHECK (id = 1),
    paused          boolean NOT NULL,
    -- The newest leadership term handed out; fenced writes must carry it.
    leader_epoch    bigint  NOT NULL,
    leader_instance integer,
    leader_since    timestamptz
);
INSERT INTO settings (id, paused, leader_epoch) VALUES (1, false, 0);

-- Every process that opened the store. Whether one is alive is not a
-- column: it is whether it holds its advisory lock (pg_locks), which
-- PostgreSQL drops with its connection.
CREATE TABLE instances (
    id               serial  PRIMARY KEY,
    host             text    NOT NULL,
    pid              integer NOT NULL,
    role             text    NOT NULL,
    started_at       timestamptz NOT NULL DEFAULT now(),
    -- The newest key change this process has applied to its key cache.
    key_version_seen bigint  NOT NULL DEFAULT 0
);

-- Bumped by every key change; processes confirm each in key_version_seen.
CREATE SEQUENCE key_changes;

-- Fails the statement (and so the transaction) with SQLSTATE DF001 and
-- the message given when a condition the store relies on does not hold:
-- statements pipelined after it, COMMIT included, then write nothing.
CREATE FUNCTION duffy_assert(ok boolean, what text) RETURNS boolean LANGUAGE plpgsql AS $f$
BEGIN
    IF ok IS NOT TRUE THEN
        RAISE EXCEPTION '%', what USING ERRCODE = 'DF001';
    END IF;
    RETURN true;
END
$f$;
"#;

/// Version 2: session expiry, as in the SQLite store's version 6. A
/// delivered session expires at `expires_at` (its lease's end, moved by
/// extensions) and the reconciler reclaims it; Prod sessions are indexed
/// by it. Sessions delivered before the upgrade expire at their lease.
const V2: &str = r#"
ALTER TABLE sessions ADD COLUMN expires_at bigint;
UPDATE sessions SET expires_at = lease_until;
CREATE INDEX sessions_expiry ON sessions (expires_at, id) WHERE state = 'Prod';
"#;

/// Version 3: the PXE installer's pending installs (`InstallTickets`), as
/// in the SQLite store's version 9, so that a machine's callback may reach
/// any replica: one ticket per host name (pending, used and waiting for
/// its installer to read the outcome, or expired: a tombstone), and the
/// SHA-256 hashes of the tokens issued for it (never a token), deleted
/// with it.
const V3: &str = r#"
CREATE TABLE install_tickets (
    hostname      text   NOT NULL PRIMARY KEY,
    ticket_id     text   NOT NULL,
    ip            text   NOT NULL,
    hardware_arch text   NOT NULL,
    image_release text   NOT NULL,
    image_arch    text   NOT NULL,
    image_flavor  text,
    expires_at    bigint NOT NULL,
    state         text   NOT NULL CHECK (state IN ('pending', 'done', 'failed', 'expired')),
    host_key      text,
    reason        text
);
CREATE TABLE install_ticket_tokens (
    seq      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    hash     bytea  NOT NULL UNIQUE,
    hostname text   NOT NULL REFERENCES install_tickets (hostname) ON DELETE CASCADE
);
CREATE INDEX install_ticket_tokens_host ON install_ticket_tokens (hostname, seq);
"#;

/// Version 4: the quota and the fail cap without reading every live
/// session's node list, as in the SQLite store's version 9. A live
/// session holds every node it lists (the invariant
/// `duffy_core::audit::check_invariants` checks: each listed node names
/// the session as its holder and is in the session's state), so the nodes
/// a project holds are the sum of its live sessions' list lengths, and the
/// Failed nodes its Fail sessions hold the same sum over those in Fail.
/// Each session's length is a column (`node_count`), kept in the index of
/// the live sessions beside the project and the state, so both sums read
/// one index entry per live session of the project, where the join of
/// `unnest(nodes)` with `nodes` looked up each node each time. The column
/// is generated from `nodes` (stored, so the index can hold it): no write
/// can set it wrong or forget it, and adding it computes it for every
/// existing row.
const V4: &str = r#"
ALTER TABLE sessions ADD COLUMN node_count integer GENERATED ALWAYS AS (cardinality(nodes)) STORED;
DROP INDEX sessions_live_project;
CREATE INDEX sessions_live_project ON sessions (project, state) INCLUDE (node_count) WHERE live;
"#;

/// Version 5: the fence check as a function, so that a fenced write
/// checks its epoch in its write statement instead of in two statements
/// of its own. `duffy_fence(lock_class, epoch)` takes the fence lock
/// `(lock_class, 0)` shared (a new term takes it exclusive: it waits for
/// every fenced write in flight, and no fenced write passes while it
/// runs), then reads the newest epoch and fails the statement (SQLSTATE
/// DF002, the newest epoch as the detail) unless it is `epoch`; a NULL
/// `epoch` (an unfenced write) checks nothing. The function is VOLATILE,
/// so its read takes a snapshot of its own, after the lock: a term that
/// began while the write waited for the lock is seen (the write's own
/// statement's snapshot was taken before it).
const V5: &str = r#"
CREATE FUNCTION duffy_fence(lock_class integer, epoch bigint) RETURNS boolean VOLATILE LANGUAGE plpgsql AS $f$
DECLARE
    newest bigint;
BEGIN
    IF epoch IS NULL THEN
        RETURN true;
    END IF;
    PERFORM pg_advisory_xact_lock_shared(lock_class, 0);
    SELECT leader_epoch INTO newest FROM settings WHERE id = 1;
    IF newest IS DISTINCT FROM epoch THEN
        RAISE EXCEPTION 'leadership epoch % is over: epoch % began', epoch, newest
            USING ERRCODE = 'DF002', DETAIL = newest::text;
    END IF;
    RETURN true;
END
$f$;
"#;

/// Version 6: a claim's locks and checks as one function, so that a
/// claim takes its locks and reads what it checks in one statement
/// instead of two. `duffy_claim_checks` takes the advisory locks in the
/// one order every writer takes them (the pause lock shared; the key's,
/// with a rate limit; the project's, when a quota applies: a default in
/// the request or the project's own), unless told not to (a test hook),
/// then reads, in a snapshot of its own taken after the locks (the
/// function is VOLATILE), the pause flag, the key's recent sessions (with
/// a rate limit), the nodes the project's live sessions hold (when a
/// quota applies), whether the session id exists, the project's own quota
/// and the pool's standby target.
const V6: &str = r#"
CREATE FUNCTION duffy_claim_checks(
    a_lock_pause integer, a_lock_key integer, a_key_lock integer, a_lock_project integer, a_take_locks boolean,
    a_with_rate boolean, a_key bigint, a_since bigint, a_with_quota boolean, a_project text, a_session text,
    a_release text, a_arch text, a_flavor text)
RETURNS TABLE (o_paused boolean, o_recent bigint, o_held bigint, o_exists boolean, o_quota bigint, o_standby bigint)
VOLATILE LANGUAGE plpgsql AS $f$
BEGIN
    IF a_take_locks THEN
        PERFORM pg_advisory_xact_lock_shared(a_lock_pause, 0);
        IF a_with_rate THEN
            PERFORM pg_advisory_xact_lock(a_lock_key, a_key_lock);
        END IF;
        IF a_with_quota OR EXISTS (SELECT 1 FROM projects p WHERE p.name = a_project AND p.quota IS NOT NULL) THEN
            PERFORM pg_advisory_xact_lock(a_lock_project, hashtext(a_project));
        END IF;
    END IF;
    RETURN QUERY SELECT
        (SELECT s.paused FROM settings s WHERE s.id = 1),
        CASE WHEN a_with_rate
             THEN (SELECT count(*) FROM sessions s WHERE s.origin_key = a_key AND s.origin_at > a_since) ELSE 0 END,
        CASE WHEN a_with_quota OR (SELECT p.quota FROM projects p WHERE p.name = a_project) IS NOT NULL
             THEN (SELECT coalesce(sum(s.node_count), 0) FROM sessions s WHERE s.project = a_project AND s.live)
             ELSE 0 END,
        EXISTS (SELECT 1 FROM sessions s WHERE s.id = a_session),
        (SELECT p.quota FROM projects p WHERE p.name = a_project),
        (SELECT t.standby FROM pool_targets t
         WHERE t.release = a_release AND t.arch = a_arch AND t.flavor = a_flavor);
END
$f$;
"#;

/// Every migration, in order, with what it does: migration `i` takes the
/// database from version `i` to `i + 1`. Append only; never edit a
/// released one.
pub(crate) const MIGRATIONS: &[(&str, &str)] = &[
    (V1, "nodes, sessions, events, projects, keys, pools, settings, instances"),
    (V2, "session expiry"),
    (V3, "install tickets"),
    (V4, "sessions' node counts for the quota"),
    (V5, "the fence check as a function"),
    (V6, "a claim's locks and checks as a function"),
];

/// The schema version this build writes (the number of migrations).
pub const SCHEMA_VERSION: i32 = MIGRATIONS.len() as i32;

fn pg(context: &str) -> impl FnOnce(tokio_postgres::Error) -> OpenError + '_ {
    move |source| OpenError::Postgres { context: context.to_string(), source }
}

/// Brings the database to [`SCHEMA_VERSION`]. Returns the version it had.
pub(crate) async fn migrate(client: &mut Client, database: &str) -> Result<i32, OpenError> {
    client
        .query_one("SELECT pg_advisory_lock($1, 0)", &[&LOCK_MIGRATE])
        .await
        .map_err(pg("waiting for the migration lock"))?;
    let result = migrate_locked(client, database).await;
    // Released whatever happened; a failure to release ends with the
    // connection, which the caller drops.
    let _ = client.query_one("SELECT pg_advisory_unlock($1, 0)", &[&LOCK_MIGRATE]).await;
    result
}

async fn migrate_locked(client: &mut Client, database: &str) -> Result<i32, OpenError> {
    let tx = client.transaction().await.map_err(pg("starting the migration transaction"))?;
    let has_table = |name: &'static str| {
        let tx = &tx;
        async move {
            tx.query_one("SELECT to_regclass($1) IS NOT NULL", &[&name])
                .await
                .map(|r| r.get::<_, bool>(0))
                .map_err(pg("looking at the database's tables"))
        }
    };
    let found: i32 = if has_table("duffy_migrations").await? {
        tx.query_one("SELECT coalesce(max(version), 0) FROM duffy_migrations", &[])
            .await
            .map_err(pg("reading the schema version"))?
            .get(0)
    } else {
        let tables: i64 = tx
            .query_one("SELECT count(*) FROM pg_catalog.pg_tables WHERE schemaname = current_schema()", &[])
            .await
            .map_err(pg("looking at the database's tables"))?
            .get(0);
        if tables > 0 {
            return Err(OpenError::ForeignDatabase { database: database.to_string(), tables });
        }
        tx.batch_execute(
            "CREATE TABLE duffy_migrations (version integer PRIMARY KEY, description text NOT NULL, \
             applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .await
        .map_err(pg("creating the migrations table"))?;
        0
    };
    if found > SCHEMA_VERSION {
        // Nothing was written: the transaction only read.
        return Err(OpenError::SchemaTooNew { database: database.to_string(), found, supported: SCHEMA_VERSION });
    }
    for (i, (sql, what)) in MIGRATIONS.iter().enumerate().skip(found.max(0) as usize) {
        let version = i as i32 + 1;
        tx.batch_execute(sql).await.map_err(|source| OpenError::Postgres {
            context: format!("applying schema migration {version} ({what})"),
            source,
        })?;
        tx.execute("INSERT INTO duffy_migrations (version, description) VALUES ($1, $2)", &[&version, what])
            .await
            .map_err(pg("recording a migration"))?;
    }
    tx.commit().await.map_err(pg("committing the migration"))?;
    if found < SCHEMA_VERSION {
        info!(database, from = found, to = SCHEMA_VERSION, "migrated the store's schema");
    }
    Ok(found)
}

#[cfg(all(test, feature = "test-cluster"))]
mod tests {
    //! Databases written at an older schema version (with the DDL of the
    //! migration list, as that version of Duffy wrote them) migrate
    //! forward with their data intact and usable.

    use std::collections::BTreeMap;

    use duffy_core::testkit::conformance::{check_invariants, claim_req};
    use duffy_core::{ClaimRefusal, ClaimRequest, NodeId, NodeState, SessionId, SessionState, Store, Timestamp};

    use super::{MIGRATIONS, SCHEMA_VERSION};
    use crate::test_cluster::{TestDatabase, shared};
    use crate::{PgOptions, PgStore};

    const T0: i64 = 1_700_000_000_000;

    async fn raw(url: &str) -> tokio_postgres::Client {
        let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.expect("raw connection");
        tokio::spawn(conn);
        c
    }

    /// A fresh database at schema `version`: the first `version`
    /// migrations, recorded as Duffy records them.
    async fn at_version(version: usize) -> (TestDatabase, tokio_postgres::Client) {
        let db = shared().database().await;
        let c = raw(&db.url).await;
        c.batch_execute(
            "CREATE TABLE duffy_migrations (version integer PRIMARY KEY, description text NOT NULL, \
             applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .await
        .expect("migrations table");
        for (i, (sql, what)) in MIGRATIONS.iter().enumerate().take(version) {
            c.batch_execute(sql).await.unwrap_or_else(|e| panic!("migration {}: {e}", i + 1));
            c.execute("INSERT INTO duffy_migrations (version, description) VALUES ($1, $2)", &[&(i as i32 + 1), what])
                .await
                .expect("record");
        }
        (db, c)
    }

    /// A farm as Duffy writes it, in the columns every version has: project
    /// `p` (quota 6) with a key; nodes 1–3 Deployed in `p`'s Prod session
    /// `s1`, node 4 Failed in `p`'s Fail session `s2`, node 5 Deployed in
    /// project `q`'s session `s3`, node 6 Active after `p`'s ended session
    /// `s4`, nodes 7–9 Ready in pool 7/x86_64 (target 3); events; paused.
    const FARM: &str = "
        INSERT INTO projects (name, quota, ssh_keys) VALUES ('p', 6, ARRAY['ssh-ed25519 AAAA p']), ('q', NULL, '{}');
        INSERT INTO api_keys (project, hash, admin, created_at) VALUES ('p', decode(repeat('ab', 32), 'hex'), false, 1);
        INSERT INTO pool_targets (release, arch, flavor, standby) VALUES ('7', 'x86_64', '', 3);
        UPDATE settings SET paused = true WHERE id = 1;
        INSERT INTO nodes (id, hostname, hardware_arch, state, image_release, image_arch, used_count, session,
                           state_since, installed_at, hold_until, power, version)
        SELECT i, 'n' || i, 'x86_64',
               CASE WHEN i <= 3 OR i = 5 THEN 'Deployed' WHEN i = 4 THEN 'Failed' WHEN i = 6 THEN 'Active'
                    ELSE 'Ready' END,
               CASE WHEN i <> 6 THEN '7' END, CASE WHEN i <> 6 THEN 'x86_64' END, 1,
               CASE WHEN i <= 3 THEN 's1' WHEN i = 4 THEN 's2' WHEN i = 5 THEN 's3' END,
               1700000000000, CASE WHEN i <> 6 THEN 1700000000000 END,
               CASE WHEN i = 4 THEN 1700000900000 END, 'on', 3
        FROM generate_series(1, 9) i;
        SELECT setval('nodes_id_seq', 9);
        INSERT INTO sessions (id, project, key_id, state, pool_release, pool_arch, nodes, created_at, delivered_at,
                              lease_until, hold_until, ended_at, end_reason, version, origin_key, origin_at)
        VALUES ('s1', 'p', 1, 'Prod', '7', 'x86_64', ARRAY[1, 2, 3]::bigint[], 1700000000000, 1700000000000,
                1700003600000, NULL, NULL, NULL, 2, 1, 1700000000000),
               ('s2', 'p', 1, 'Fail', '7', 'x86_64', ARRAY[4]::bigint[], 1700000000000, 1700000000000,
                1700003600000, 1700000900000, NULL, NULL, 3, 1, 1700000000000),
               ('s3', 'q', 2, 'Prod', '7', 'x86_64', ARRAY[5]::bigint[], 1700000000000, 1700000000000,
                1700003600000, NULL, NULL, NULL, 2, 2, 1700000000000),
               ('s4', 'p', 1, 'Done', '7', 'x86_64', ARRAY[6]::bigint[], 1700000000000, 1700000000000,
                1700003600000, NULL, 1700000100000, 'done', 3, 1, 1700000000000);
        INSERT INTO events (node, from_state, to_state, cause, actor, session, at)
        SELECT i, 'Ready', 'Deployed', 'delivered', 'key:1', 's1', 1700000000000 FROM generate_series(1, 3) i;
    ";

    /// Every row of every table, in the columns it has now: what a
    /// migration must keep.
    async fn rows(c: &tokio_postgres::Client) -> BTreeMap<String, (Vec<String>, Vec<String>)> {
        let tables: Vec<String> = c
            .query(
                "SELECT table_name::text FROM information_schema.tables WHERE table_schema = current_schema() \
                 AND table_type = 'BASE TABLE' AND table_name NOT IN ('duffy_migrations', 'instances') ORDER BY 1",
                &[],
            )
            .await
            .expect("tables")
            .iter()
            .map(|r| r.get(0))
            .collect();
        let mut out = BTreeMap::new();
        for t in tables {
            let cols: Vec<String> = c
                .query(
                    "SELECT column_name::text FROM information_schema.columns \
                     WHERE table_schema = current_schema() AND table_name = $1 ORDER BY ordinal_position",
                    &[&t],
                )
                .await
                .expect("columns")
                .iter()
                .map(|r| r.get(0))
                .collect();
            out.insert(t.clone(), (cols.clone(), select(c, &t, &cols).await));
        }
        out
    }

    /// The rows of `table` in `cols`, as text, sorted.
    async fn select(c: &tokio_postgres::Client, table: &str, cols: &[String]) -> Vec<String> {
        let list = cols.iter().map(|c| format!("\"{c}\"")).collect::<Vec<_>>().join(", ");
        let mut v: Vec<String> = c
            .query(&format!("SELECT ROW({list})::text FROM {table}"), &[])
            .await
            .unwrap_or_else(|e| panic!("reading {table}: {e}"))
            .iter()
            .map(|r| r.get(0))
            .collect();
        v.sort();
        v
    }

    /// The schema versions recorded.
    async fn versions(c: &tokio_postgres::Client) -> Vec<i32> {
        c.query("SELECT version FROM duffy_migrations ORDER BY version", &[])
            .await
            .expect("versions")
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    fn quota_req(session: &str, count: u32) -> ClaimRequest {
        ClaimRequest { default_quota: Some(100), ..claim_req(session, 1, "p", count, Timestamp(T0)) }
    }

    /// A database written at version 3, with live sessions holding nodes,
    /// is migrated to version 4 and its sessions' nodes count toward the
    /// quota from the first claim: the node counts were computed for the
    /// rows already there.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sessions_written_at_version_3_count_toward_the_quota_after_the_migration() {
        let (db, c) = at_version(3).await;
        c.batch_execute(FARM).await.expect("a version 3 farm");
        c.execute("UPDATE settings SET paused = false WHERE id = 1", &[]).await.expect("resume");
        let store = PgStore::connect(&db.url, PgOptions { pool_size: 2, ..PgOptions::default() }).await.expect("open");
        assert_eq!(versions(&c).await, (1..=SCHEMA_VERSION).collect::<Vec<_>>());
        let counts: Vec<(String, i32)> = c
            .query("SELECT id, node_count FROM sessions ORDER BY id", &[])
            .await
            .expect("node counts")
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        assert_eq!(counts, [("s1".into(), 3), ("s2".into(), 1), ("s3".into(), 1), ("s4".into(), 1)]);
        check_invariants(&store).await.expect("the farm is consistent");
        // p holds 4 nodes (s1's 3, s2's 1; not q's, not the ended s4's) of
        // its quota of 6.
        assert_eq!(
            store.claim(quota_req("a", 3)).await.expect("store ok"),
            Err(ClaimRefusal::QuotaExceeded { held: 4, requested: 3, quota: 6 })
        );
        let c2 = store.claim(quota_req("b", 2)).await.expect("store ok").expect("within the quota");
        assert_eq!(c2.nodes.len(), 2);
        assert_eq!(
            store.claim(quota_req("c", 1)).await.expect("store ok"),
            Err(ClaimRefusal::QuotaExceeded { held: 6, requested: 1, quota: 6 })
        );
    }

    /// A database written at version 2 (before install tickets and node
    /// counts) migrates through every later version to the current one
    /// with every row of every table kept as it was, and the store reads
    /// and uses it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_database_written_at_version_2_migrates_to_the_current_schema_with_its_data_intact() {
        let (db, c) = at_version(2).await;
        c.batch_execute(FARM).await.expect("a version 2 farm");
        c.execute("UPDATE sessions SET expires_at = lease_until WHERE state = 'Prod'", &[]).await.expect("expiry");
        let before = rows(&c).await;
        assert!(before.contains_key("nodes") && !before.contains_key("install_tickets"), "{before:?}");
        let store = PgStore::connect(&db.url, PgOptions { pool_size: 2, ..PgOptions::default() }).await.expect("open");
        assert_eq!(versions(&c).await, (1..=SCHEMA_VERSION).collect::<Vec<_>>());
        for (table, (cols, old)) in &before {
            assert_eq!(&select(&c, table, cols).await, old, "{table}: the rows changed in the columns it had");
        }
        // And as the store reads them.
        check_invariants(&store).await.expect("the farm is consistent");
        let nodes = store.nodes().await.expect("nodes");
        assert_eq!(nodes.len(), 9);
        assert_eq!((nodes[3].id, nodes[3].state), (NodeId(4), NodeState::Failed));
        let s1 = store.session(&SessionId("s1".into())).await.expect("read").expect("s1");
        assert_eq!(
            (s1.state, s1.nodes.len(), s1.expires_at),
            (SessionState::Prod, 3, Some(Timestamp(1_700_003_600_000)))
        );
        assert!(store.paused().await.expect("paused"), "the pause flag kept");
        assert_eq!(store.pool_targets().await.expect("targets").len(), 1);
        assert_eq!(store.project("p").await.expect("project").and_then(|p| p.quota), Some(6));
        assert_eq!(store.api_keys(Some("p")).await.expect("keys").len(), 1);
        assert_eq!(store.events(Default::default()).await.expect("events").len(), 3);
        // The tables of later versions work: an install ticket, the quota.
        let tickets = std::sync::Arc::new(store.clone()).install_tickets().expect("install tickets");
        let ticket = duffy_core::tickets::InstallTicket {
            id: duffy_core::tickets::TicketId("t1".into()),
            hostname: "n6".into(),
            ip: "192.0.2.6".parse().expect("ip"),
            hardware_arch: duffy_core::Arch::X86_64,
            image: duffy_core::PoolKey::new("7", duffy_core::Arch::X86_64, None),
            expires_at: Timestamp(T0 + 60_000),
        };
        tickets.register_ticket(ticket).await.expect("a ticket registered");
        assert_eq!(tickets.pending_tickets().await.expect("pending"), 1);
        store.set_paused(false).await.expect("resume");
        assert_eq!(
            store.claim(quota_req("a", 3)).await.expect("store ok"),
            Err(ClaimRefusal::QuotaExceeded { held: 4, requested: 3, quota: 6 })
        );
        // The sequence goes on after the rows kept.
        let added = store
            .add_nodes(
                vec![duffy_core::NewNode::new("n10", duffy_core::Arch::X86_64)],
                duffy_core::Actor::Operator,
                Timestamp(T0),
            )
            .await
            .expect("add");
        assert_eq!(added[0].id, NodeId(10));
    }
}
