//! Every SQL statement the store runs, the advisory lock keys, and rows to
//! model values and back.
//!
//! Decoding never panics: a value the model cannot hold is
//! [`StoreError::Corrupt`], naming the column.

use std::str::FromStr;

use duffy_core::{
    Actor, ApiKeyHash, ApiKeyRecord, Arch, Event, KeyId, Node, NodeId, PoolKey, PoolTarget, Project, Session,
    SessionId, StoreError, Timestamp,
};
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

// ----- advisory locks -----
//
// Two-key advisory locks, the first key a namespace. Transaction-level
// ones order the writes that must not interleave across processes; the
// session-level ones are held by a process's control connection for as
// long as it lives (liveness, leadership).

/// Session lock held while migrating.
pub(crate) const LOCK_MIGRATE: i32 = 0x4455_4d00; // "DUM\0"
/// `(LOCK_INSTANCE, id)`: held by process `id` for as long as it is alive.
pub(crate) const LOCK_INSTANCE: i32 = 0x4455_4900; // "DUI\0"
/// `(LOCK_LEADER, 0)`: held by the leader (the one process that runs the
/// reconciler).
pub(crate) const LOCK_LEADER: i32 = 0x4455_4c00; // "DUL\0"
/// `(LOCK_PAUSE, 0)`: shared by every claim, exclusive for a pause or
/// resume, so that no claim commits after a pause was acknowledged.
pub(crate) const LOCK_PAUSE: i32 = 0x4455_5000; // "DUP\0"
/// `(LOCK_FENCE, 0)`: shared by every fenced write, exclusive for a new
/// leadership term, so that no write of an older term commits after the
/// new term began.
pub(crate) const LOCK_FENCE: i32 = 0x4455_4600; // "DUF\0"
/// `(LOCK_KEY, key id)`: a claim with a rate limit, so two claims of one
/// key (on two replicas) count each other's sessions.
pub(crate) const LOCK_KEY: i32 = 0x4455_4b00; // "DUK\0"
/// `(LOCK_PROJECT, hashtext(project))`: a claim with a quota and a write
/// with a fail-cap guard, so that two of one project count each other's
/// nodes. A hash collision only serializes two projects more than needed.
pub(crate) const LOCK_PROJECT: i32 = 0x4455_5200; // "DUR\0"

// ----- notification channels -----

/// A key was created or revoked; the payload is the new key version.
pub(crate) const CHANNEL_KEYS: &str = "duffy_keys";
/// Something the reconciler cares about changed (nodes released, pause,
/// pool targets): the leader re-plans. The payload is the sender's id.
pub(crate) const CHANNEL_KICK: &str = "duffy_kick";

// ----- columns -----

/// The `nodes` columns in the order [`node`] reads them.
macro_rules! node_cols {
    () => {
        "id, hostname, ip, chassis, hardware_arch, flavor, bmc, console_port, state, \
         image_release, image_arch, image_flavor, used_count, session, state_since, installed_at, hold_until, \
         fail_reason, power, version, host_key"
    };
}
pub(crate) use node_cols;

/// The `sessions` columns in the order [`session`] reads them.
macro_rules! session_cols {
    () => {
        "id, project, key_id, state, pool_release, pool_arch, pool_flavor, nodes, \
         created_at, delivered_at, lease_until, hold_until, ended_at, end_reason, version, expires_at"
    };
}
pub(crate) use session_cols;

/// The `events` columns in the order [`event`] reads them.
macro_rules! event_cols {
    () => {
        "seq, node, from_state, to_state, cause, detail, actor, session, at"
    };
}
pub(crate) use event_cols;

/// The `api_keys` columns in the order [`api_key`] reads them.
macro_rules! key_cols {
    () => {
        "id, project, hash, admin, created_at, expires_at, revoked_at, last_used"
    };
}
pub(crate) use key_cols;

// ----- statements -----

/// The body every node-writing statement shares, as a string literal:
/// the node rows to write as arrays (`$1` ids, `$2` expected versions,
/// then the columns of [`NodeRows`]), updated only where still at their
/// expected version (`u`, the ids written), and the batch's events
/// (`$23`…`$30`, `$31` the term) inserted in order, filtered by
/// `$event_filter` (`u` in scope); then `$more` (further common table
/// expressions, each starting with a comma), then `$tail`, the
/// statement's answer.
macro_rules! write_nodes_sql {
    ($event_filter:literal, $tail:expr) => {
        write_nodes_sql!($event_filter, "", $tail)
    };
    ($event_filter:literal, $more:expr, $tail:expr) => {
        concat!(
            "\
WITH v AS (
    SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
        $8::text[], $9::integer[], $10::text[], $11::text[], $12::text[], $13::text[], $14::bigint[], $15::text[],
        $16::bigint[], $17::bigint[], $18::bigint[], $19::text[], $20::text[], $21::bigint[], $22::text[])
        AS v(id, expected, hostname, ip, chassis, hardware_arch, flavor, bmc, console_port, state, image_release,
             image_arch, image_flavor, used_count, session, state_since, installed_at, hold_until, fail_reason,
             power, version, host_key)
), u AS (
    UPDATE nodes n SET hostname = v.hostname, ip = v.ip, chassis = v.chassis, hardware_arch = v.hardware_arch,
        flavor = v.flavor, bmc = v.bmc, console_port = v.console_port, state = v.state,
        image_release = v.image_release, image_arch = v.image_arch, image_flavor = v.image_flavor,
        used_count = v.used_count, session = v.session, state_since = v.state_since,
        installed_at = v.installed_at, hold_until = v.hold_until, fail_reason = v.fail_reason, power = v.power,
        version = v.version, host_key = v.host_key
    FROM v WHERE n.id = v.id AND n.version = v.expected
    RETURNING n.id
), e AS (
    INSERT INTO events (node, from_state, to_state, cause, detail, actor, session, at, term)
    SELECT e.node, e.from_state, e.to_state, e.cause, e.detail, e.actor, e.session, e.at, $31
    FROM unnest($23::bigint[], $24::text[], $25::text[], $26::text[], $27::text[], $28::text[], $29::text[],
                $30::bigint[]) WITH ORDINALITY AS e(node, from_state, to_state, cause, detail, actor, session, at, ord)
",
            $event_filter,
            "    ORDER BY e.ord
    RETURNING 1
)",
            $more,
            "\n",
            $tail
        )
    };
}

/// [`write_nodes_sql`] for a batch of one node, with scalar parameters in
/// the same places (`$1` the id, `$2` the expected version, `$3`…`$22`
/// the columns, `$23`…`$30` the event, `$31` the term): a plain `UPDATE …
/// WHERE id = $1 AND version = $2`, and the event inserted only if the
/// node was written (from `u`), instead of the join of the node with 22
/// one-element arrays and the event from 8 more; then `$more`, then
/// `$tail`.
macro_rules! write_node_sql {
    ($more:expr, $tail:expr) => {
        concat!(
            "\
WITH u AS (
    UPDATE nodes SET hostname = $3::text, ip = $4::text, chassis = $5::text, hardware_arch = $6::text,
        flavor = $7::text, bmc = $8::text, console_port = $9::integer, state = $10::text,
        image_release = $11::text, image_arch = $12::text, image_flavor = $13::text, used_count = $14::bigint,
        session = $15::text, state_since = $16::bigint, installed_at = $17::bigint, hold_until = $18::bigint,
        fail_reason = $19::text, power = $20::text, version = $21::bigint, host_key = $22::text
    WHERE id = $1::bigint AND version = $2::bigint
    RETURNING id
), e AS (
    INSERT INTO events (node, from_state, to_state, cause, detail, actor, session, at, term)
    SELECT $23::bigint, $24::text, $25::text, $26::text, $27::text, $28::text, $29::text, $30::bigint, $31::bigint
    FROM u
    RETURNING 1
)",
            $more,
            "\n",
            $tail
        )
    };
}

/// Node rows to write (see [`write_nodes_sql`]). Updates only rows still at
/// their expected version and returns the ids it updated; the events of the
/// batch go in with the same statement. A fenced write checks its epoch in
/// it too (`duffy_fence($32, $33)`: the fence lock's class, the epoch, or
/// NULL for an unfenced write), and it answers the transaction's id, which
/// it has once it wrote (or checked) anything: the whole of a fenced
/// write's first round trip is this one statement.
pub(crate) const WRITE_NODES: &str = write_nodes_sql!(
    "",
    "SELECT coalesce((SELECT array_agg(id) FROM u), '{}'::bigint[]), (SELECT count(*) FROM e),
       duffy_fence($32, $33), pg_current_xact_id()::text"
);

/// Independent single-node writes in one statement (a wave of the
/// reconciler's): as [`WRITE_NODES`], but a node's event is written only
/// if its node was, so that each write applies or not on its own. Every
/// node at most once.
pub(crate) const WRITE_EACH_NODE: &str = write_nodes_sql!(
    "    WHERE e.node IN (SELECT id FROM u)\n",
    "SELECT coalesce((SELECT array_agg(id) FROM u), '{}'::bigint[]), (SELECT count(*) FROM e),
       duffy_fence($32, $33), pg_current_xact_id()::text"
);

/// [`WRITE_NODES`] and [`WRITE_EACH_NODE`] for a batch of one node (see
/// [`write_node_sql`]), with the same answer.
pub(crate) const WRITE_NODE: &str = write_node_sql!(
    "",
    "SELECT coalesce((SELECT array_agg(id) FROM u), '{}'::bigint[]), (SELECT count(*) FROM e),
       duffy_fence($32, $33), pg_current_xact_id()::text"
);

/// The column of a [`WRITE_NODES`] or [`WRITE_EACH_NODE`] answer that holds
/// the transaction's id.
pub(crate) const WRITE_NODES_XID: usize = 3;

/// The fence check of a fenced batch that writes no node (`$1` the fence
/// lock's class, `$2` the epoch).
pub(crate) const FENCE: &str = "SELECT duffy_fence($1, $2)";

/// The SQLSTATE `duffy_fence` fails a statement with when the epoch is not
/// the newest; the newest is the error's detail.
pub(crate) const FENCED_SQLSTATE: &str = "DF002";

/// A claim's session insert (`$32`…`$47` the session's columns as
/// [`SessionRow`] gives them, `$48` its creator), as a common table
/// expression `s` of a node-writing statement.
macro_rules! claim_session_cte {
    () => {
        ", s AS (
    INSERT INTO sessions (id, project, key_id, state, pool_release, pool_arch, pool_flavor, nodes, created_at,
        delivered_at, lease_until, hold_until, ended_at, end_reason, version, expires_at, origin_key, origin_at,
        creator)
    VALUES ($32, $33, $34, $35, $36, $37, $38, $39, $40, $41, $42, $43, $44, $45, $46, $47, $34, $40, $48)
    RETURNING 1
)"
    };
}

/// A hand-back's session update over version `$48` (`$32`…`$47` its
/// columns as [`SessionRow`] gives them), as a common table expression `s`
/// of a node-writing statement.
macro_rules! hand_back_session_cte {
    () => {
        ", s AS (
    UPDATE sessions SET project = $33, key_id = $34, state = $35, pool_release = $36, pool_arch = $37,
        pool_flavor = $38, nodes = $39, created_at = $40, delivered_at = $41, lease_until = $42, hold_until = $43,
        ended_at = $44, end_reason = $45, version = $46, expires_at = $47
    WHERE id = $32 AND version = $48
    RETURNING 1
)"
    };
}

/// The last statement of a claim's or a hand-back's writes: fails unless
/// `$nodes` nodes were written (`u`) and the session too (`s`), so that a
/// COMMIT pipelined behind it writes nothing.
macro_rules! all_written {
    ($nodes:literal, $what:literal) => {
        concat!(
            "SELECT duffy_assert((SELECT count(*) FROM u) = ",
            $nodes,
            " AND (SELECT count(*) FROM s) = 1,\n                    'could not write ",
            $what,
            ", or its session')"
        )
    };
}

/// A claim's writes, all in one statement (an operation that locked its
/// nodes first): its nodes as [`WRITE_NODES`] writes them, every one of
/// which must be written, and its session inserted (see
/// [`claim_session_cte`]), which must happen too: the statement fails
/// otherwise, so that a COMMIT pipelined behind it writes nothing.
pub(crate) const CLAIM_WRITES: &str = write_nodes_sql!(
    "",
    claim_session_cte!(),
    all_written!("cardinality($1::bigint[])", "every node the claim had locked")
);

/// [`CLAIM_WRITES`] for a claim of one node (see [`write_node_sql`]).
pub(crate) const CLAIM_WRITES_ONE: &str =
    write_node_sql!(claim_session_cte!(), all_written!("1", "the node the claim had locked"));

/// A hand-back's writes, all in one statement: the session's nodes (which
/// it locked) as [`CLAIM_WRITES`] writes them, and the session (locked
/// too; see [`hand_back_session_cte`]), each of which must happen: the
/// statement fails otherwise.
pub(crate) const HAND_BACK_WRITES: &str = write_nodes_sql!(
    "",
    hand_back_session_cte!(),
    all_written!("cardinality($1::bigint[])", "every node the hand-back had locked")
);

/// [`HAND_BACK_WRITES`] for a session of one node (see
/// [`write_node_sql`]).
pub(crate) const HAND_BACK_WRITES_ONE: &str =
    write_node_sql!(hand_back_session_cte!(), all_written!("1", "the node the hand-back had locked"));

/// Inserts a session (`$17` its creator), unless its id exists; returns
/// how many rows it inserted (0 or 1).
pub(crate) const INSERT_SESSION: &str = "\
WITH i AS (
    INSERT INTO sessions (id, project, key_id, state, pool_release, pool_arch, pool_flavor, nodes, created_at,
        delivered_at, lease_until, hold_until, ended_at, end_reason, version, expires_at, origin_key, origin_at,
        creator)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $3, $9, $17)
    ON CONFLICT (id) DO NOTHING
    RETURNING 1
)
SELECT count(*) FROM i";

/// Overwrites a session still at version `$17`; returns how many rows.
pub(crate) const UPDATE_SESSION: &str = "\
WITH u AS (
    UPDATE sessions SET project = $2, key_id = $3, state = $4, pool_release = $5, pool_arch = $6,
        pool_flavor = $7, nodes = $8, created_at = $9, delivered_at = $10, lease_until = $11, hold_until = $12,
        ended_at = $13, end_reason = $14, version = $15, expires_at = $16
    WHERE id = $1 AND version = $17
    RETURNING 1
)
SELECT count(*) FROM u";

/// A hand-back's read of the nodes of session `$1` if it is key `$2`'s,
/// locked in id order (the order every batch writes them in) before the
/// session is.
pub(crate) const HAND_BACK_NODES: &str = concat!(
    "SELECT ",
    node_cols!(),
    " FROM nodes WHERE id = ANY((SELECT nodes FROM sessions WHERE id = $1 AND key_id = $2)::bigint[]) \
     ORDER BY id FOR NO KEY UPDATE"
);

/// A hand-back's read of session `$1` if it is key `$2`'s, locked; with
/// the transaction's id after the session's columns (it has one once it
/// locked the row; see `tx::write_reporting_xid`).
pub(crate) const HAND_BACK_SESSION: &str = concat!(
    "WITH s AS MATERIALIZED (SELECT ",
    session_cols!(),
    " FROM sessions WHERE id = $1 AND key_id = $2 FOR NO KEY UPDATE) SELECT s.*, pg_current_xact_id()::text FROM s"
);

/// The column of a [`HAND_BACK_SESSION`] row that holds the transaction's
/// id.
pub(crate) const HAND_BACK_SESSION_XID: usize = 16;

/// A session inserted as it is (a copy's import); it must not exist.
pub(crate) const IMPORT_SESSION: &str = "\
INSERT INTO sessions (id, project, key_id, state, pool_release, pool_arch, pool_flavor, nodes, created_at,
    delivered_at, lease_until, hold_until, ended_at, end_reason, version, expires_at, origin_key, origin_at, creator)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $3, $9, $17)";

/// A claim's locks and checks, one statement (`duffy_claim_checks`,
/// schema version 6): the advisory locks in the one order every writer
/// takes them (the pause lock shared; the key's, with a rate limit; the
/// project's, when a quota applies), then, read in a snapshot taken after
/// them, the pause flag, the key's recent sessions, the nodes the
/// project's live sessions hold (the sum of their node counts), whether
/// the session id exists, the project's own quota and the pool's standby
/// target.
pub(crate) const CLAIM_CHECKS: &str =
    "SELECT * FROM duffy_claim_checks($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)";

/// The claim's choice: Ready nodes of the pool in claim order, locked,
/// skipping those another transaction holds (another claim took them).
/// Each row carries the transaction's id after the node columns (the
/// transaction has one once it locked a row; one that found no node gets
/// none: a refusal assigns no id), read here rather than in a statement
/// of its own (see `tx::write_reporting_xid`).
pub(crate) const CLAIM_PICK: &str = concat!(
    "WITH p AS MATERIALIZED (SELECT ",
    node_cols!(),
    " FROM nodes WHERE state = 'Ready' AND image_release = $1 AND image_arch = $2 \
     AND coalesce(image_flavor, '') = $3 ORDER BY used_count, id LIMIT $4 FOR NO KEY UPDATE SKIP LOCKED) \
     SELECT p.*, pg_current_xact_id()::text FROM p"
);

/// The column of a [`CLAIM_PICK`] row that holds the transaction's id.
pub(crate) const CLAIM_PICK_XID: usize = 21;

/// Failed nodes held by a project's sessions in Fail (the fail-cap
/// guard): every node a session in Fail lists is Failed and held by it
/// (schema version 4), so the sum of their node counts, from the index of
/// live sessions.
pub(crate) const FAILED_HELD_BY_PROJECT: &str =
    "SELECT coalesce(sum(node_count), 0) FROM sessions WHERE project = $1 AND live AND state = 'Fail'";

/// Allocating sessions whose creator does not hold its liveness lock (or
/// is not known).
pub(crate) const ABANDONED_ALLOCATIONS: &str = "\
SELECT s.id FROM sessions s
WHERE s.live AND s.state = 'Allocating'
  AND (s.creator IS NULL OR NOT EXISTS (
      SELECT 1 FROM pg_catalog.pg_locks l
      WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
        AND l.database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database())
        AND l.classid = $1::integer::oid AND l.objid = s.creator::oid))";

/// Live processes that have not confirmed key version `$2` yet.
pub(crate) const UNCONFIRMED_KEY_CHANGE: &str = "\
SELECT i.id, i.host, i.pid FROM instances i
WHERE i.key_version_seen < $2 AND EXISTS (
    SELECT 1 FROM pg_catalog.pg_locks l
    WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
      AND l.database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database())
      AND l.classid = $1::integer::oid AND l.objid = i.id::oid)";

// ----- decoding -----

fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {e}"))
}

fn col<'a, T: tokio_postgres::types::FromSql<'a>>(r: &'a Row, i: usize, what: &str) -> Result<T, StoreError> {
    r.try_get(i).map_err(|e| corrupt(what, e))
}

fn parse<T: FromStr>(r: &Row, i: usize, what: &str) -> Result<T, StoreError>
where
    T::Err: std::fmt::Display,
{
    let s: &str = col(r, i, what)?;
    s.parse().map_err(|e| corrupt(what, e))
}

fn unsigned(r: &Row, i: usize, what: &str) -> Result<u64, StoreError> {
    let v: i64 = col(r, i, what)?;
    u64::try_from(v).map_err(|e| corrupt(what, e))
}

fn ts(r: &Row, i: usize, what: &str) -> Result<Timestamp, StoreError> {
    Ok(Timestamp(col(r, i, what)?))
}

fn ts_opt(r: &Row, i: usize, what: &str) -> Result<Option<Timestamp>, StoreError> {
    Ok(col::<Option<i64>>(r, i, what)?.map(Timestamp))
}

/// A pool key from three columns; `None` when the release is NULL.
fn pool_opt(r: &Row, i: usize, what: &str) -> Result<Option<PoolKey>, StoreError> {
    let release: Option<String> = col(r, i, what)?;
    let Some(release) = release else { return Ok(None) };
    let arch: Arch = parse(r, i + 1, what)?;
    let flavor: Option<String> = col(r, i + 2, what)?;
    Ok(Some(PoolKey { release, arch, flavor }))
}

/// A `u64` as PostgreSQL's `bigint`; larger values are refused as invalid
/// input (no stored value can be that large).
pub(crate) fn sql_u64(v: u64, what: &str) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::Invalid(format!("{what} {v} is larger than the store can hold")))
}

/// A node row.
pub(crate) fn node(r: &Row) -> Result<Node, StoreError> {
    let port: Option<i32> = col(r, 7, "nodes.console_port")?;
    Ok(Node {
        id: NodeId(unsigned(r, 0, "nodes.id")?),
        hostname: col(r, 1, "nodes.hostname")?,
        ip: col(r, 2, "nodes.ip")?,
        chassis: col(r, 3, "nodes.chassis")?,
        hardware_arch: parse(r, 4, "nodes.hardware_arch")?,
        flavor: col(r, 5, "nodes.flavor")?,
        bmc: col(r, 6, "nodes.bmc")?,
        console_port: port.map(|p| u16::try_from(p).map_err(|e| corrupt("nodes.console_port", e))).transpose()?,
        state: parse(r, 8, "nodes.state")?,
        image: pool_opt(r, 9, "nodes.image")?,
        used_count: unsigned(r, 12, "nodes.used_count")?,
        session: col::<Option<String>>(r, 13, "nodes.session")?.map(SessionId),
        state_since: ts(r, 14, "nodes.state_since")?,
        installed_at: ts_opt(r, 15, "nodes.installed_at")?,
        hold_until: ts_opt(r, 16, "nodes.hold_until")?,
        fail_reason: col(r, 17, "nodes.fail_reason")?,
        power: parse(r, 18, "nodes.power")?,
        version: unsigned(r, 19, "nodes.version")?,
        host_key: col(r, 20, "nodes.host_key")?,
    })
}

/// A session row.
pub(crate) fn session(r: &Row) -> Result<Session, StoreError> {
    let nodes: Vec<i64> = col(r, 7, "sessions.nodes")?;
    let nodes = nodes
        .into_iter()
        .map(|n| u64::try_from(n).map(NodeId).map_err(|e| corrupt("sessions.nodes", e)))
        .collect::<Result<_, _>>()?;
    Ok(Session {
        id: SessionId(col(r, 0, "sessions.id")?),
        project: col(r, 1, "sessions.project")?,
        key_id: KeyId(unsigned(r, 2, "sessions.key_id")?),
        state: parse(r, 3, "sessions.state")?,
        pool: PoolKey {
            release: col(r, 4, "sessions.pool_release")?,
            arch: parse(r, 5, "sessions.pool_arch")?,
            flavor: col(r, 6, "sessions.pool_flavor")?,
        },
        nodes,
        created_at: ts(r, 8, "sessions.created_at")?,
        delivered_at: ts_opt(r, 9, "sessions.delivered_at")?,
        lease_until: ts_opt(r, 10, "sessions.lease_until")?,
        hold_until: ts_opt(r, 11, "sessions.hold_until")?,
        ended_at: ts_opt(r, 12, "sessions.ended_at")?,
        end_reason: col(r, 13, "sessions.end_reason")?,
        version: unsigned(r, 14, "sessions.version")?,
        expires_at: ts_opt(r, 15, "sessions.expires_at")?,
    })
}

/// An event row.
pub(crate) fn event(r: &Row) -> Result<Event, StoreError> {
    Ok(Event {
        seq: unsigned(r, 0, "events.seq")?,
        node: NodeId(unsigned(r, 1, "events.node")?),
        from: parse(r, 2, "events.from_state")?,
        to: parse(r, 3, "events.to_state")?,
        cause: parse(r, 4, "events.cause")?,
        detail: col(r, 5, "events.detail")?,
        actor: parse::<Actor>(r, 6, "events.actor")?,
        session: col::<Option<String>>(r, 7, "events.session")?.map(SessionId),
        at: ts(r, 8, "events.at")?,
    })
}

/// A project row (`name, quota, ssh_keys`).
pub(crate) fn project(r: &Row) -> Result<Project, StoreError> {
    let quota: Option<i64> = col(r, 1, "projects.quota")?;
    Ok(Project {
        name: col(r, 0, "projects.name")?,
        quota: quota.map(|q| u32::try_from(q).map_err(|e| corrupt("projects.quota", e))).transpose()?,
        ssh_keys: col(r, 2, "projects.ssh_keys")?,
    })
}

/// An API key row.
pub(crate) fn api_key(r: &Row) -> Result<ApiKeyRecord, StoreError> {
    let hash: &[u8] = col(r, 2, "api_keys.hash")?;
    let hash: [u8; 32] = hash.try_into().map_err(|_| corrupt("api_keys.hash", "not 32 bytes"))?;
    Ok(ApiKeyRecord {
        id: KeyId(unsigned(r, 0, "api_keys.id")?),
        project: col(r, 1, "api_keys.project")?,
        hash: ApiKeyHash(hash),
        admin: col(r, 3, "api_keys.admin")?,
        created_at: ts(r, 4, "api_keys.created_at")?,
        expires_at: ts_opt(r, 5, "api_keys.expires_at")?,
        revoked_at: ts_opt(r, 6, "api_keys.revoked_at")?,
        last_used: ts_opt(r, 7, "api_keys.last_used")?,
    })
}

/// A pool target row (`release, arch, flavor, standby`; flavor `''` is
/// none).
pub(crate) fn pool_target(r: &Row) -> Result<PoolTarget, StoreError> {
    let flavor: String = col(r, 2, "pool_targets.flavor")?;
    let standby: i64 = col(r, 3, "pool_targets.standby")?;
    Ok(PoolTarget {
        pool: PoolKey {
            release: col(r, 0, "pool_targets.release")?,
            arch: parse(r, 1, "pool_targets.arch")?,
            flavor: (!flavor.is_empty()).then_some(flavor),
        },
        standby: u32::try_from(standby).map_err(|e| corrupt("pool_targets.standby", e))?,
    })
}

/// A `(pool, count)` row of the Ready counts.
pub(crate) fn ready_count(r: &Row) -> Result<(PoolKey, u32), StoreError> {
    let pool = pool_opt(r, 0, "nodes.image")?.ok_or_else(|| corrupt("nodes.image", "NULL release"))?;
    let n: i64 = col(r, 3, "count")?;
    Ok((pool, u32::try_from(n).unwrap_or(u32::MAX)))
}

// ----- encoding -----

/// Node rows as column arrays, in [`WRITE_NODES`]'s parameter order (or,
/// for one node, as scalars in [`WRITE_NODE`]'s): the one place a node
/// becomes a row.
#[derive(Default)]
pub(crate) struct NodeRows {
    id: Vec<i64>,
    expected: Vec<i64>,
    hostname: Vec<String>,
    ip: Vec<Option<String>>,
    chassis: Vec<Option<String>>,
    hardware_arch: Vec<&'static str>,
    flavor: Vec<Option<String>>,
    bmc: Vec<Option<String>>,
    console_port: Vec<Option<i32>>,
    state: Vec<&'static str>,
    image_release: Vec<Option<String>>,
    image_arch: Vec<Option<&'static str>>,
    image_flavor: Vec<Option<String>>,
    used_count: Vec<i64>,
    session: Vec<Option<String>>,
    state_since: Vec<i64>,
    installed_at: Vec<Option<i64>>,
    hold_until: Vec<Option<i64>>,
    fail_reason: Vec<Option<String>>,
    power: Vec<&'static str>,
    version: Vec<i64>,
    host_key: Vec<Option<String>>,
}

impl NodeRows {
    /// Adds `n`, to be written only over version `expected`.
    pub(crate) fn push(&mut self, n: &Node, expected: u64) -> Result<(), StoreError> {
        self.id.push(sql_u64(n.id.0, "node id")?);
        self.expected.push(sql_u64(expected, "expected version")?);
        self.hostname.push(n.hostname.clone());
        self.ip.push(n.ip.clone());
        self.chassis.push(n.chassis.clone());
        self.hardware_arch.push(n.hardware_arch.as_str());
        self.flavor.push(n.flavor.clone());
        self.bmc.push(n.bmc.clone());
        self.console_port.push(n.console_port.map(i32::from));
        self.state.push(n.state.as_str());
        self.image_release.push(n.image.as_ref().map(|p| p.release.clone()));
        self.image_arch.push(n.image.as_ref().map(|p| p.arch.as_str()));
        self.image_flavor.push(n.image.as_ref().and_then(|p| p.flavor.clone()));
        self.used_count.push(sql_u64(n.used_count, "used_count")?);
        self.session.push(n.session.as_ref().map(|s| s.0.clone()));
        self.state_since.push(n.state_since.0);
        self.installed_at.push(n.installed_at.map(|t| t.0));
        self.hold_until.push(n.hold_until.map(|t| t.0));
        self.fail_reason.push(n.fail_reason.clone());
        self.power.push(n.power.as_str());
        self.version.push(sql_u64(n.version, "version")?);
        self.host_key.push(n.host_key.clone());
        Ok(())
    }

    /// Parameters `$1`…`$22` of a batch of one node, as scalars (for
    /// [`write_node_sql`]); `None` unless there is exactly one.
    pub(crate) fn one(&self) -> Option<[&(dyn ToSql + Sync); 22]> {
        if self.id.len() != 1 {
            return None;
        }
        Some([
            &self.id[0],
            &self.expected[0],
            &self.hostname[0],
            &self.ip[0],
            &self.chassis[0],
            &self.hardware_arch[0],
            &self.flavor[0],
            &self.bmc[0],
            &self.console_port[0],
            &self.state[0],
            &self.image_release[0],
            &self.image_arch[0],
            &self.image_flavor[0],
            &self.used_count[0],
            &self.session[0],
            &self.state_since[0],
            &self.installed_at[0],
            &self.hold_until[0],
            &self.fail_reason[0],
            &self.power[0],
            &self.version[0],
            &self.host_key[0],
        ])
    }

    /// Parameters `$1`…`$22`.
    pub(crate) fn params(&self) -> [&(dyn ToSql + Sync); 22] {
        [
            &self.id,
            &self.expected,
            &self.hostname,
            &self.ip,
            &self.chassis,
            &self.hardware_arch,
            &self.flavor,
            &self.bmc,
            &self.console_port,
            &self.state,
            &self.image_release,
            &self.image_arch,
            &self.image_flavor,
            &self.used_count,
            &self.session,
            &self.state_since,
            &self.installed_at,
            &self.hold_until,
            &self.fail_reason,
            &self.power,
            &self.version,
            &self.host_key,
        ]
    }
}

/// Event rows as column arrays (`$23`…`$30` of [`WRITE_NODES`]).
#[derive(Default)]
pub(crate) struct EventRows {
    node: Vec<i64>,
    from: Vec<&'static str>,
    to: Vec<&'static str>,
    cause: Vec<&'static str>,
    detail: Vec<Option<String>>,
    actor: Vec<String>,
    session: Vec<Option<String>>,
    at: Vec<i64>,
}

impl EventRows {
    /// Adds `e` (its `seq` is assigned by the database).
    pub(crate) fn push(&mut self, e: &Event) -> Result<(), StoreError> {
        self.node.push(sql_u64(e.node.0, "event node")?);
        self.from.push(e.from.as_str());
        self.to.push(e.to.as_str());
        self.cause.push(e.cause.as_str());
        self.detail.push(e.detail.clone());
        self.actor.push(e.actor.to_string());
        self.session.push(e.session.as_ref().map(|s| s.0.clone()));
        self.at.push(e.at.0);
        Ok(())
    }

    /// Parameters `$23`…`$30` of one event, as scalars (for
    /// [`write_node_sql`]); `None` unless there is exactly one.
    pub(crate) fn one(&self) -> Option<[&(dyn ToSql + Sync); 8]> {
        if self.node.len() != 1 {
            return None;
        }
        Some([
            &self.node[0],
            &self.from[0],
            &self.to[0],
            &self.cause[0],
            &self.detail[0],
            &self.actor[0],
            &self.session[0],
            &self.at[0],
        ])
    }

    /// Parameters `$23`…`$30`.
    pub(crate) fn params(&self) -> [&(dyn ToSql + Sync); 8] {
        [&self.node, &self.from, &self.to, &self.cause, &self.detail, &self.actor, &self.session, &self.at]
    }
}

/// A session's columns, `$1`…`$16` of [`INSERT_SESSION`] and
/// [`UPDATE_SESSION`].
pub(crate) struct SessionRow {
    id: String,
    project: String,
    key_id: i64,
    state: &'static str,
    pool_release: String,
    pool_arch: &'static str,
    pool_flavor: Option<String>,
    nodes: Vec<i64>,
    created_at: i64,
    delivered_at: Option<i64>,
    lease_until: Option<i64>,
    hold_until: Option<i64>,
    ended_at: Option<i64>,
    end_reason: Option<String>,
    version: i64,
    expires_at: Option<i64>,
}

impl SessionRow {
    /// The row of `s`.
    pub(crate) fn of(s: &Session) -> Result<SessionRow, StoreError> {
        Ok(SessionRow {
            id: s.id.0.clone(),
            project: s.project.clone(),
            key_id: sql_u64(s.key_id.0, "key id")?,
            state: s.state.as_str(),
            pool_release: s.pool.release.clone(),
            pool_arch: s.pool.arch.as_str(),
            pool_flavor: s.pool.flavor.clone(),
            nodes: s.nodes.iter().map(|n| sql_u64(n.0, "node id")).collect::<Result<_, _>>()?,
            created_at: s.created_at.0,
            delivered_at: s.delivered_at.map(|t| t.0),
            lease_until: s.lease_until.map(|t| t.0),
            hold_until: s.hold_until.map(|t| t.0),
            ended_at: s.ended_at.map(|t| t.0),
            end_reason: s.end_reason.clone(),
            version: sql_u64(s.version, "session version")?,
            expires_at: s.expires_at.map(|t| t.0),
        })
    }

    /// Parameters `$1`…`$16`.
    pub(crate) fn params(&self) -> [&(dyn ToSql + Sync); 16] {
        [
            &self.id,
            &self.project,
            &self.key_id,
            &self.state,
            &self.pool_release,
            &self.pool_arch,
            &self.pool_flavor,
            &self.nodes,
            &self.created_at,
            &self.delivered_at,
            &self.lease_until,
            &self.hold_until,
            &self.ended_at,
            &self.end_reason,
            &self.version,
            &self.expires_at,
        ]
    }
}

/// The node and event parameters of a write, in statement order: scalars
/// when it writes one node (the single-node statements: `WRITE_NODE`,
/// `CLAIM_WRITES_ONE`, `HAND_BACK_WRITES_ONE`), arrays otherwise.
/// Returns whether it is one node, which picks the statement.
pub(crate) fn node_event_params<'a>(
    nodes: &'a NodeRows,
    events: &'a EventRows,
    params: &mut Vec<&'a (dyn ToSql + Sync)>,
) -> bool {
    match nodes.one().zip(events.one()) {
        Some((node, event)) => {
            params.extend(node);
            params.extend(event);
            true
        }
        None => {
            params.extend(nodes.params());
            params.extend(events.params());
            false
        }
    }
}
