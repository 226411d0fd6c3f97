//! Every SQL statement the store runs, as functions over a connection.
//!
//! Reads are used by the reader pool and, inside its transaction, by the
//! writer; writes only by the writer. Every statement goes through the
//! connection's prepared-statement cache.

use duffy_core::{
    ApiKeyHash, ApiKeyRecord, Event, EventQuery, Hardware, KeyId, Node, NodeId, NodeState, PoolKey, PoolTarget,
    Project, Session, SessionId, StoreError, Timestamp,
};
use rusqlite::{Connection, OptionalExtension, Row, params};

use crate::codec::{self, event_cols, key_cols, node_cols, session_cols, to_sql_u64};

/// Wraps a SQLite error with what the store was doing.
pub(crate) trait Context<T> {
    /// The error as [`StoreError::Backend`] with `what` as context.
    fn ctx(self, what: &str) -> Result<T, StoreError>;
}

impl<T> Context<T> for Result<T, rusqlite::Error> {
    fn ctx(self, what: &str) -> Result<T, StoreError> {
        self.map_err(|e| StoreError::backend(what, e))
    }
}

/// Runs a cached query and decodes every row.
fn rows<T, P: rusqlite::Params>(
    conn: &Connection,
    sql: &str,
    params: P,
    what: &str,
    decode: fn(&Row<'_>) -> Result<T, StoreError>,
) -> Result<Vec<T>, StoreError> {
    let mut stmt = conn.prepare_cached(sql).ctx(what)?;
    let mut out = Vec::new();
    let mut rows = stmt.query(params).ctx(what)?;
    while let Some(r) = rows.next().ctx(what)? {
        out.push(decode(r)?);
    }
    Ok(out)
}

/// Runs a cached query expecting at most one row.
fn one<T, P: rusqlite::Params>(
    conn: &Connection,
    sql: &str,
    params: P,
    what: &str,
    decode: fn(&Row<'_>) -> Result<T, StoreError>,
) -> Result<Option<T>, StoreError> {
    let mut stmt = conn.prepare_cached(sql).ctx(what)?;
    let mut rows = stmt.query(params).ctx(what)?;
    match rows.next().ctx(what)? {
        Some(r) => decode(r).map(Some),
        None => Ok(None),
    }
}

/// Runs a cached query returning one integer.
fn count<P: rusqlite::Params>(conn: &Connection, sql: &str, params: P, what: &str) -> Result<u64, StoreError> {
    let mut stmt = conn.prepare_cached(sql).ctx(what)?;
    let n: i64 = stmt.query_row(params, |r| r.get(0)).ctx(what)?;
    Ok(u64::try_from(n).unwrap_or(0))
}

fn sat_u32(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

// ----- nodes -----

/// One node by id.
pub(crate) fn node(conn: &Connection, id: NodeId) -> Result<Option<Node>, StoreError> {
    let Ok(id) = i64::try_from(id.0) else { return Ok(None) };
    one(conn, concat!("SELECT ", node_cols!(), " FROM nodes WHERE id = ?1"), [id], "reading a node", codec::node)
}

/// One node by hostname.
pub(crate) fn node_by_hostname(conn: &Connection, hostname: &str) -> Result<Option<Node>, StoreError> {
    one(
        conn,
        concat!("SELECT ", node_cols!(), " FROM nodes WHERE hostname = ?1"),
        [hostname],
        "reading a node by hostname",
        codec::node,
    )
}

/// Every node, by id.
pub(crate) fn nodes(conn: &Connection) -> Result<Vec<Node>, StoreError> {
    rows(conn, concat!("SELECT ", node_cols!(), " FROM nodes ORDER BY id"), [], "reading nodes", codec::node)
}

/// Reads rows of a cached query and decodes the first `limit` of them.
///
/// No `LIMIT ?` (see [`CLAIMABLE`]): the statement gives rows in order and
/// reading stops after `limit`.
fn first_rows<P: rusqlite::Params>(
    conn: &Connection,
    sql: &str,
    params: P,
    limit: usize,
    what: &str,
) -> Result<Vec<Node>, StoreError> {
    let mut stmt = conn.prepare_cached(sql).ctx(what)?;
    let mut rows = stmt.query(params).ctx(what)?;
    let mut out = Vec::with_capacity(limit.min(1024));
    while out.len() < limit {
        match rows.next().ctx(what)? {
            Some(r) => out.push(codec::node(r)?),
            None => break,
        }
    }
    Ok(out)
}

/// One state's nodes, by id. Provisioning and Failed nodes (read by every
/// reconciler pass) are a scan of their own partial index; any other state
/// is a scan of the table in id order (nodes are not indexed by every
/// state: every transition would rewrite that index).
///
/// The state is a literal, not a bound parameter: with a parameter compared
/// to `state`, SQLite re-prepares the statement on every execution (the
/// partial indexes on `state = 'Ready'` might apply), so there is one
/// cached statement per state instead.
pub(crate) fn nodes_in_state_sql(state: NodeState) -> String {
    let from = match state {
        NodeState::Provisioning => "nodes INDEXED BY nodes_provisioning",
        NodeState::Failed => "nodes INDEXED BY nodes_failed",
        _ => "nodes NOT INDEXED",
    };
    format!(concat!("SELECT ", node_cols!(), " FROM {} WHERE state = '{}' ORDER BY id"), from, state.as_str())
}

/// Runs several statements as one read of one snapshot: inside one read
/// transaction, which in WAL mode sees the database as of its first
/// statement, whatever commits meanwhile. Each statement alone would see
/// the last commit at its own start.
pub(crate) fn snapshot<T>(
    conn: &Connection,
    what: &str,
    read: impl FnOnce(&Connection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    // Dropped without commit on error: a read transaction has nothing to
    // undo, its rollback just ends it.
    let tx = conn.unchecked_transaction().ctx(what)?;
    let out = read(&tx)?;
    tx.commit().ctx(what)?;
    Ok(out)
}

/// The nodes in any of `states`, by id: one index range scan per state,
/// all of one snapshot (as `MemStore` answers). `between` runs between
/// two scans (a test hook).
pub(crate) fn nodes_in_states(
    conn: &Connection,
    states: &[NodeState],
    between: Option<&(dyn Fn() + Send + Sync)>,
) -> Result<Vec<Node>, StoreError> {
    let mut states = states.to_vec();
    states.sort();
    states.dedup();
    snapshot(conn, "reading nodes by state", |conn| {
        let mut out = Vec::new();
        for (i, st) in states.iter().enumerate() {
            if i > 0 {
                if let Some(hook) = between {
                    hook();
                }
            }
            out.extend(rows(conn, &nodes_in_state_sql(*st), [], "reading nodes by state", codec::node)?);
        }
        if states.len() > 1 {
            out.sort_by_key(|n| n.id);
        }
        Ok(out)
    })
}

/// Ready nodes installed at or before a time, oldest first, then by id: a
/// range scan of the `nodes_stale` index. Named, because without
/// statistics SQLite prefers `nodes_state` (an equality) and sorts every
/// Ready row.
pub(crate) const STALE_READY: &str = concat!(
    "SELECT ",
    node_cols!(),
    " FROM nodes INDEXED BY nodes_stale WHERE state = 'Ready' AND installed_at <= ?1 ORDER BY installed_at, id"
);

/// The first `limit` Ready nodes installed at or before `before`.
pub(crate) fn stale_ready(conn: &Connection, before: Timestamp, limit: usize) -> Result<Vec<Node>, StoreError> {
    first_rows(conn, STALE_READY, [before.0], limit, "reading stale ready nodes")
}

/// Idle nodes of one kind, least used first: a range scan of the
/// `nodes_idle` index (named, so that SQLite never sorts every Active row
/// instead). `IS` matches a missing flavor (NULL) too.
pub(crate) const IDLE_NODES: &str = concat!(
    "SELECT ",
    node_cols!(),
    " FROM nodes INDEXED BY nodes_idle WHERE state = 'Active' AND hardware_arch = ?1 AND flavor IS ?2 \
     ORDER BY used_count, id"
);

/// The first `limit` idle nodes of `hardware`.
pub(crate) fn idle_nodes(conn: &Connection, hardware: &Hardware, limit: usize) -> Result<Vec<Node>, StoreError> {
    first_rows(
        conn,
        IDLE_NODES,
        rusqlite::params![hardware.arch.as_str(), hardware.flavor.as_deref()],
        limit,
        "reading idle nodes",
    )
}

/// Nodes after an id, by id: a range scan of the primary key.
pub(crate) const NODES_AFTER: &str = concat!("SELECT ", node_cols!(), " FROM nodes WHERE id > ?1 ORDER BY id");

/// The first `limit` nodes with an id greater than `after`.
pub(crate) fn nodes_after(conn: &Connection, after: NodeId, limit: usize) -> Result<Vec<Node>, StoreError> {
    let Ok(after) = i64::try_from(after.0) else { return Ok(Vec::new()) };
    first_rows(conn, NODES_AFTER, [after], limit, "reading a page of nodes")
}

/// Ready nodes per pool, ordered by pool.
pub(crate) fn ready_counts(conn: &Connection) -> Result<Vec<(PoolKey, u32)>, StoreError> {
    let mut out = rows(
        conn,
        "SELECT image_release, image_arch, image_flavor, COUNT(*) FROM nodes \
         WHERE state = 'Ready' AND image_release IS NOT NULL \
         GROUP BY image_release, image_arch, image_flavor",
        [],
        "counting ready nodes",
        codec::ready_count,
    )?;
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Whether a node has this hostname.
pub(crate) fn hostname_exists(conn: &Connection, hostname: &str) -> Result<bool, StoreError> {
    let mut stmt = conn.prepare_cached("SELECT 1 FROM nodes WHERE hostname = ?1").ctx("checking a hostname")?;
    stmt.exists([hostname]).ctx("checking a hostname")
}

/// A node's stored version, if it exists.
pub(crate) fn node_version(conn: &Connection, id: NodeId) -> Result<Option<u64>, StoreError> {
    let Ok(id) = i64::try_from(id.0) else { return Ok(None) };
    let mut stmt = conn.prepare_cached("SELECT version FROM nodes WHERE id = ?1").ctx("reading a node's version")?;
    let v: Option<i64> = stmt.query_row([id], |r| r.get(0)).optional().ctx("reading a node's version")?;
    Ok(v.and_then(|v| u64::try_from(v).ok()))
}

/// The claim's choice of nodes: the pool's Ready nodes in claim order.
///
/// No `LIMIT ?`: SQLite's planner looks at a bound LIMIT's value, so such a
/// statement is re-prepared on every execution (13% of the writer's time
/// in a profile). The index yields rows in claim order, so reading stops
/// after `count` rows instead.
pub(crate) const CLAIMABLE: &str = concat!(
    "SELECT ",
    node_cols!(),
    " FROM nodes \
     WHERE state = 'Ready' AND image_release = ?1 AND image_arch = ?2 AND image_flavor IS ?3 \
     ORDER BY used_count, id"
);

/// The `count` Ready nodes of `pool` a claim takes: least `used_count`
/// first, then lowest id. One range scan of the `nodes_ready` index,
/// stopped after `count` rows.
pub(crate) fn claimable(conn: &Connection, pool: &PoolKey, count: u32) -> Result<Vec<Node>, StoreError> {
    const WHAT: &str = "choosing nodes";
    let mut stmt = conn.prepare_cached(CLAIMABLE).ctx(WHAT)?;
    let mut rows = stmt.query(params![pool.release, pool.arch.as_str(), pool.flavor]).ctx(WHAT)?;
    let mut out = Vec::with_capacity(count.min(1024) as usize);
    while out.len() < count as usize {
        match rows.next().ctx(WHAT)? {
            Some(r) => out.push(codec::node(r)?),
            None => break,
        }
    }
    Ok(out)
}

/// Counts a pool's Ready nodes.
pub(crate) const READY_IN_POOL: &str = "SELECT COUNT(*) FROM nodes \
     WHERE state = 'Ready' AND image_release = ?1 AND image_arch = ?2 AND image_flavor IS ?3";

/// Ready nodes of one pool.
pub(crate) fn ready_in_pool(conn: &Connection, pool: &PoolKey) -> Result<u32, StoreError> {
    count(conn, READY_IN_POOL, params![pool.release, pool.arch.as_str(), pool.flavor], "counting a pool's ready nodes")
        .map(sat_u32)
}

fn image_cols(n: &Node) -> (Option<&str>, Option<&'static str>, Option<&str>) {
    match &n.image {
        Some(p) => (Some(p.release.as_str()), Some(p.arch.as_str()), p.flavor.as_deref()),
        None => (None, None, None),
    }
}

/// Binds a node's row, in `node_cols!()` order without the id, to
/// parameters ?1..?20 of `stmt`: the one place that maps a node to its
/// columns for writing.
pub(crate) fn bind_node(stmt: &mut rusqlite::Statement<'_>, n: &Node, what: &str) -> Result<(), StoreError> {
    let (release, arch, flavor) = image_cols(n);
    stmt.raw_bind_parameter(1, &n.hostname).ctx(what)?;
    stmt.raw_bind_parameter(2, &n.ip).ctx(what)?;
    stmt.raw_bind_parameter(3, &n.chassis).ctx(what)?;
    stmt.raw_bind_parameter(4, n.hardware_arch.as_str()).ctx(what)?;
    stmt.raw_bind_parameter(5, &n.flavor).ctx(what)?;
    stmt.raw_bind_parameter(6, &n.bmc).ctx(what)?;
    stmt.raw_bind_parameter(7, n.console_port).ctx(what)?;
    stmt.raw_bind_parameter(8, n.state.as_str()).ctx(what)?;
    stmt.raw_bind_parameter(9, release).ctx(what)?;
    stmt.raw_bind_parameter(10, arch).ctx(what)?;
    stmt.raw_bind_parameter(11, flavor).ctx(what)?;
    stmt.raw_bind_parameter(12, to_sql_u64(n.used_count, "used_count")?).ctx(what)?;
    stmt.raw_bind_parameter(13, n.session.as_ref().map(SessionId::as_str)).ctx(what)?;
    stmt.raw_bind_parameter(14, n.state_since.0).ctx(what)?;
    stmt.raw_bind_parameter(15, n.installed_at.map(|t| t.0)).ctx(what)?;
    stmt.raw_bind_parameter(16, n.hold_until.map(|t| t.0)).ctx(what)?;
    stmt.raw_bind_parameter(17, &n.fail_reason).ctx(what)?;
    stmt.raw_bind_parameter(18, n.power.as_str()).ctx(what)?;
    stmt.raw_bind_parameter(19, to_sql_u64(n.version, "version")?).ctx(what)?;
    stmt.raw_bind_parameter(20, &n.host_key).ctx(what)
}

/// Inserts a new node; SQLite assigns the id (one more than the largest,
/// as nodes are never deleted). Returns the id.
pub(crate) fn insert_node(conn: &Connection, n: &Node) -> Result<NodeId, StoreError> {
    const WHAT: &str = "inserting a node";
    let mut stmt = conn
        .prepare_cached(concat!(
            "INSERT INTO nodes (",
            node_cols!(),
            ") \
             VALUES (NULL, ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20)"
        ))
        .ctx(WHAT)?;
    bind_node(&mut stmt, n, WHAT)?;
    stmt.raw_execute().ctx(WHAT)?;
    let id = conn.last_insert_rowid();
    u64::try_from(id).map(NodeId).map_err(|_| StoreError::Corrupt(format!("SQLite assigned node id {id}")))
}

/// A node's transition and its event: the event is appended (linked to
/// the node's previous one) and the node's row, pointing at it, written if
/// it still has the version the write expects. Returns whether it had.
pub(crate) fn write_node(conn: &Connection, w: &duffy_core::NodeWrite) -> Result<bool, StoreError> {
    let seq = insert_event(conn, &w.event)?;
    update_node(conn, &w.node, w.expected_version, seq)
}

/// Overwrites a node's row if it still has `expected`, with `last_event`
/// as its latest event; returns whether it did.
///
/// A transition never changes what a machine is (hostname, address,
/// hardware, BMC, console): the row is first updated in its other columns
/// only, on the condition that those are as stored, so SQLite leaves the
/// hostname's unique index (and the columns themselves) alone. Only a
/// write that does change them (or finds another version) takes the
/// second statement, which sets every column.
pub(crate) fn update_node(conn: &Connection, n: &Node, expected: u64, last_event: i64) -> Result<bool, StoreError> {
    const WHAT: &str = "writing a node";
    let constraint = |e: rusqlite::Error| match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::ConstraintViolation) => {
            StoreError::Duplicate(format!("node {} (hostname {})", n.id, n.hostname))
        }
        _ => StoreError::backend(WHAT, e),
    };
    let (release, arch, flavor) = image_cols(n);
    let id = to_sql_u64(n.id.0, "node id")?;
    let expected = to_sql_u64(expected, "expected version")?;
    let mut narrow = conn.prepare_cached(UPDATE_NODE_STATE).ctx(WHAT)?;
    let changed = narrow
        .execute(params![
            n.state.as_str(),
            release,
            arch,
            flavor,
            to_sql_u64(n.used_count, "used_count")?,
            n.session.as_ref().map(SessionId::as_str),
            n.state_since.0,
            n.installed_at.map(|t| t.0),
            n.hold_until.map(|t| t.0),
            n.fail_reason,
            n.power.as_str(),
            to_sql_u64(n.version, "version")?,
            n.host_key,
            id,
            expected,
            n.hostname,
            n.ip,
            n.chassis,
            n.hardware_arch.as_str(),
            n.flavor,
            n.bmc,
            n.console_port,
            last_event,
        ])
        .map_err(constraint)?;
    if changed == 1 {
        return Ok(true);
    }
    let mut stmt = conn
        .prepare_cached(
            "UPDATE nodes SET hostname = ?1, ip = ?2, chassis = ?3, hardware_arch = ?4, flavor = ?5, bmc = ?6, \
             console_port = ?7, state = ?8, image_release = ?9, image_arch = ?10, image_flavor = ?11, \
             used_count = ?12, session = ?13, state_since = ?14, installed_at = ?15, hold_until = ?16, \
             fail_reason = ?17, power = ?18, version = ?19, host_key = ?20, last_event = ?23 \
             WHERE id = ?21 AND version = ?22",
        )
        .ctx(WHAT)?;
    bind_node(&mut stmt, n, WHAT)?;
    stmt.raw_bind_parameter(21, id).ctx(WHAT)?;
    stmt.raw_bind_parameter(22, expected).ctx(WHAT)?;
    stmt.raw_bind_parameter(23, last_event).ctx(WHAT)?;
    let changed = stmt.raw_execute().map_err(constraint)?;
    Ok(changed == 1)
}

/// A node's transition: every column a transition may change, on the
/// condition that the ones it never changes are as stored (see
/// [`update_node`]).
pub(crate) const UPDATE_NODE_STATE: &str = "UPDATE nodes SET state = ?1, image_release = ?2, image_arch = ?3, \
     image_flavor = ?4, used_count = ?5, session = ?6, state_since = ?7, installed_at = ?8, hold_until = ?9, \
     fail_reason = ?10, power = ?11, version = ?12, host_key = ?13, last_event = ?23 \
     WHERE id = ?14 AND version = ?15 AND hostname = ?16 AND ip IS ?17 AND chassis IS ?18 \
     AND hardware_arch = ?19 AND flavor IS ?20 AND bmc IS ?21 AND console_port IS ?22";

// ----- events -----

/// An event, appended, linked to its node's previous event.
pub(crate) const INSERT_EVENT: &str = "INSERT INTO events (seq, node, from_state, to_state, cause, detail, actor, \
     session, at, prev) VALUES (NULL, ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, (SELECT last_event FROM nodes WHERE id = ?1))";

/// Appends an event; the store assigns its `seq` (one more than the
/// last), returned. Its `prev` is the node's `last_event` as stored now:
/// the caller must then make this event the node's last (every node write
/// does, in the same transaction).
///
/// A node's history is this chain, newest first, not an index on
/// `(node, seq)`: such an index put each new event on its node's page, a
/// different page for nearly every event, and was three quarters of the
/// pages every commit wrote to the WAL. The log itself only ever appends.
pub(crate) fn insert_event(conn: &Connection, e: &Event) -> Result<i64, StoreError> {
    const WHAT: &str = "appending to the event log";
    let mut stmt = conn.prepare_cached(INSERT_EVENT).ctx(WHAT)?;
    stmt.execute(params![
        to_sql_u64(e.node.0, "event node")?,
        e.from.as_str(),
        e.to.as_str(),
        e.cause.as_str(),
        e.detail,
        e.actor.to_string(),
        e.session.as_ref().map(SessionId::as_str),
        e.at.0,
    ])
    .ctx(WHAT)?;
    Ok(conn.last_insert_rowid())
}

/// Makes `seq` a new node's latest event (its `Added`).
pub(crate) fn set_last_event(conn: &Connection, node: NodeId, seq: i64) -> Result<(), StoreError> {
    const WHAT: &str = "linking a node to its history";
    let mut stmt = conn.prepare_cached("UPDATE nodes SET last_event = ?2 WHERE id = ?1").ctx(WHAT)?;
    stmt.execute(params![to_sql_u64(node.0, "node id")?, seq]).ctx(WHAT)?;
    Ok(())
}

/// Reads the event log (in `seq` order, stopping after `limit` rows; no
/// `LIMIT ?`, which would re-prepare the statement on every call).
pub(crate) fn events(conn: &Connection, q: EventQuery) -> Result<Vec<Event>, StoreError> {
    const WHAT: &str = "reading the event log";
    let after = i64::try_from(q.after_seq).unwrap_or(i64::MAX);
    let limit = if q.limit == 0 { usize::MAX } else { q.limit };
    let Some(node) = q.node else {
        let mut stmt = conn
            .prepare_cached(concat!("SELECT ", event_cols!(), " FROM events WHERE seq > ?1 ORDER BY seq"))
            .ctx(WHAT)?;
        let mut rows = stmt.query(params![after]).ctx(WHAT)?;
        let mut out = Vec::new();
        while out.len() < limit {
            match rows.next().ctx(WHAT)? {
                Some(r) => out.push(codec::event(r)?),
                None => break,
            }
        }
        return Ok(out);
    };
    let Ok(node) = i64::try_from(node.0) else { return Ok(Vec::new()) };
    snapshot(conn, WHAT, |conn| {
        // The node's chain, newest first, back to `after`.
        let mut last = conn.prepare_cached("SELECT last_event FROM nodes WHERE id = ?1").ctx(WHAT)?;
        let mut cursor: Option<i64> = last.query_row([node], |r| r.get(0)).optional().ctx(WHAT)?.flatten();
        let mut one =
            conn.prepare_cached(concat!("SELECT ", event_cols!(), ", prev FROM events WHERE seq = ?1")).ctx(WHAT)?;
        let mut newest_first = Vec::new();
        while let Some(seq) = cursor.filter(|s| *s > after) {
            let (event, prev) = one
                .query_row([seq], |r| Ok((codec::event(r), r.get::<_, Option<i64>>(9)?)))
                .optional()
                .ctx(WHAT)?
                .ok_or_else(|| StoreError::Corrupt(format!("node {node}'s history names missing event {seq}")))?;
            let event = event?;
            if i64::try_from(event.node.0).ok() != Some(node) || prev.is_some_and(|p| p >= seq) {
                return Err(StoreError::Corrupt(format!(
                    "event {seq} is not in node {node}'s history where it is linked"
                )));
            }
            newest_first.push(event);
            cursor = prev;
        }
        newest_first.reverse();
        newest_first.truncate(limit);
        Ok(newest_first)
    })
}

/// The newest events first, of one node (its history chain from the
/// node's `last_event`, `limit` links) or of the whole log (the primary
/// key read backwards), stopping after `limit` rows.
pub(crate) fn latest_events(conn: &Connection, node: Option<NodeId>, limit: usize) -> Result<Vec<Event>, StoreError> {
    const WHAT: &str = "reading the latest events";
    if limit == 0 {
        return Ok(Vec::new());
    }
    let Some(node) = node else {
        let mut stmt =
            conn.prepare_cached(concat!("SELECT ", event_cols!(), " FROM events ORDER BY seq DESC")).ctx(WHAT)?;
        let mut rows = stmt.query([]).ctx(WHAT)?;
        let mut out = Vec::new();
        while out.len() < limit {
            match rows.next().ctx(WHAT)? {
                Some(r) => out.push(codec::event(r)?),
                None => break,
            }
        }
        return Ok(out);
    };
    let Ok(node) = i64::try_from(node.0) else { return Ok(Vec::new()) };
    snapshot(conn, WHAT, |conn| {
        let mut last = conn.prepare_cached("SELECT last_event FROM nodes WHERE id = ?1").ctx(WHAT)?;
        let mut cursor: Option<i64> = last.query_row([node], |r| r.get(0)).optional().ctx(WHAT)?.flatten();
        let mut one =
            conn.prepare_cached(concat!("SELECT ", event_cols!(), ", prev FROM events WHERE seq = ?1")).ctx(WHAT)?;
        let mut out = Vec::new();
        while let Some(seq) = cursor.filter(|_| out.len() < limit) {
            let (event, prev) = one
                .query_row([seq], |r| Ok((codec::event(r), r.get::<_, Option<i64>>(9)?)))
                .optional()
                .ctx(WHAT)?
                .ok_or_else(|| StoreError::Corrupt(format!("node {node}'s history names missing event {seq}")))?;
            let event = event?;
            if i64::try_from(event.node.0).ok() != Some(node) || prev.is_some_and(|p| p >= seq) {
                return Err(StoreError::Corrupt(format!(
                    "event {seq} is not in node {node}'s history where it is linked"
                )));
            }
            out.push(event);
            cursor = prev;
        }
        Ok(out)
    })
}

/// Nodes counted per image, kind of machine, chassis and state (one
/// grouped scan of the table; the rows are few), in `NodeGroup` order.
pub(crate) fn node_counts(conn: &Connection) -> Result<Vec<duffy_core::NodeCount>, StoreError> {
    let mut out = rows(
        conn,
        "SELECT image_release, image_arch, image_flavor, hardware_arch, flavor, chassis, state, COUNT(*) FROM nodes \
         GROUP BY image_release, image_arch, image_flavor, hardware_arch, flavor, chassis, state",
        [],
        "counting nodes",
        codec::node_count,
    )?;
    // SQL orders by text; the core's order is the enums' own.
    out.sort_by(|a, b| a.group.cmp(&b.group));
    Ok(out)
}

// ----- sessions -----

/// One session by id.
pub(crate) fn session(conn: &Connection, id: &SessionId) -> Result<Option<Session>, StoreError> {
    one(
        conn,
        concat!("SELECT ", session_cols!(), " FROM sessions WHERE id = ?1"),
        [id.as_str()],
        "reading a session",
        codec::session,
    )
}

/// Live sessions in order.
pub(crate) const LIVE_SESSIONS: &str =
    concat!("SELECT ", session_cols!(), " FROM sessions WHERE live = 1 ORDER BY created_at, id");

/// Live sessions by creation time, then id.
pub(crate) fn live_sessions(conn: &Connection) -> Result<Vec<Session>, StoreError> {
    rows(conn, LIVE_SESSIONS, [], "reading live sessions", codec::session)
}

/// Prod sessions expired at a time, earliest expiry first: a range scan
/// of the `sessions_expiry` index.
pub(crate) const EXPIRED_SESSIONS: &str = concat!(
    "SELECT ",
    session_cols!(),
    " FROM sessions INDEXED BY sessions_expiry WHERE state = 'Prod' AND expires_at <= ?1 ORDER BY expires_at, id"
);

/// The first `limit` Prod sessions whose expiry is at or before `now`.
pub(crate) fn expired_sessions(conn: &Connection, now: Timestamp, limit: usize) -> Result<Vec<Session>, StoreError> {
    const WHAT: &str = "reading expired sessions";
    let mut stmt = conn.prepare_cached(EXPIRED_SESSIONS).ctx(WHAT)?;
    let mut rows = stmt.query([now.0]).ctx(WHAT)?;
    let mut out = Vec::new();
    while out.len() < limit {
        match rows.next().ctx(WHAT)? {
            Some(r) => out.push(codec::session(r)?),
            None => break,
        }
    }
    Ok(out)
}

/// A session's stored version, if it exists.
pub(crate) fn session_version(conn: &Connection, id: &SessionId) -> Result<Option<u64>, StoreError> {
    let mut stmt =
        conn.prepare_cached("SELECT version FROM sessions WHERE id = ?1").ctx("reading a session's version")?;
    let v: Option<i64> = stmt.query_row([id.as_str()], |r| r.get(0)).optional().ctx("reading a session's version")?;
    Ok(v.and_then(|v| u64::try_from(v).ok()))
}

/// A new session (its key and creation time also as `origin_*`).
pub(crate) const INSERT_SESSION: &str = "INSERT INTO sessions (id, project, key_id, state, pool_release, pool_arch, \
     pool_flavor, nodes, created_at, delivered_at, lease_until, hold_until, ended_at, end_reason, version, origin_key, \
     origin_at, expires_at, node_count) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?3, ?9, \
     ?16, ?17)";

/// A session's transition: the columns its state machine changes (an
/// extension moves `expires_at`), on the condition that the others are as
/// stored (see [`update_session`]).
pub(crate) const UPDATE_SESSION_STATE: &str = "UPDATE sessions SET state = ?1, delivered_at = ?2, lease_until = ?3, \
     hold_until = ?4, ended_at = ?5, end_reason = ?6, version = ?7, expires_at = ?8 \
     WHERE id = ?9 AND project = ?10 AND key_id = ?11 AND pool_release = ?12 AND pool_arch = ?13 \
     AND pool_flavor IS ?14 AND nodes = ?15 AND created_at = ?16";

/// Inserts a new session. Its key and creation time are also kept as
/// what the rate limit counts, never updated.
pub(crate) fn insert_session(conn: &Connection, s: &Session) -> Result<(), StoreError> {
    const WHAT: &str = "inserting a session";
    let mut stmt = conn.prepare_cached(INSERT_SESSION).ctx(WHAT)?;
    stmt.execute(params![
        s.id.as_str(),
        s.project,
        to_sql_u64(s.key_id.0, "key id")?,
        s.state.as_str(),
        s.pool.release,
        s.pool.arch.as_str(),
        s.pool.flavor,
        codec::node_list(&s.nodes),
        s.created_at.0,
        s.delivered_at.map(|t| t.0),
        s.lease_until.map(|t| t.0),
        s.hold_until.map(|t| t.0),
        s.ended_at.map(|t| t.0),
        s.end_reason,
        to_sql_u64(s.version, "session version")?,
        s.expires_at.map(|t| t.0),
        s.nodes.len(),
    ])
    .ctx(WHAT)?;
    Ok(())
}

/// Overwrites an existing session (the caller checked its version). A
/// session's state machine changes only its state, times, end reason and
/// version: those are written on the condition that the rest is as stored;
/// a write that changes the rest too takes a second statement that sets
/// every column (except the rate limit's `origin_*`, never updated).
pub(crate) fn update_session(conn: &Connection, s: &Session) -> Result<(), StoreError> {
    const WHAT: &str = "writing a session";
    let nodes = codec::node_list(&s.nodes);
    let key_id = to_sql_u64(s.key_id.0, "key id")?;
    let version = to_sql_u64(s.version, "session version")?;
    let mut narrow = conn.prepare_cached(UPDATE_SESSION_STATE).ctx(WHAT)?;
    let changed = narrow
        .execute(params![
            s.state.as_str(),
            s.delivered_at.map(|t| t.0),
            s.lease_until.map(|t| t.0),
            s.hold_until.map(|t| t.0),
            s.ended_at.map(|t| t.0),
            s.end_reason,
            version,
            s.expires_at.map(|t| t.0),
            s.id.as_str(),
            s.project,
            key_id,
            s.pool.release,
            s.pool.arch.as_str(),
            s.pool.flavor,
            nodes,
            s.created_at.0,
        ])
        .ctx(WHAT)?;
    if changed == 1 {
        return Ok(());
    }
    let mut stmt = conn
        .prepare_cached(
            "UPDATE sessions SET project = ?2, key_id = ?3, state = ?4, pool_release = ?5, pool_arch = ?6, \
             pool_flavor = ?7, nodes = ?8, created_at = ?9, delivered_at = ?10, lease_until = ?11, \
             hold_until = ?12, ended_at = ?13, end_reason = ?14, version = ?15, expires_at = ?16, \
             node_count = ?17 WHERE id = ?1",
        )
        .ctx(WHAT)?;
    let changed = stmt
        .execute(params![
            s.id.as_str(),
            s.project,
            key_id,
            s.state.as_str(),
            s.pool.release,
            s.pool.arch.as_str(),
            s.pool.flavor,
            nodes,
            s.created_at.0,
            s.delivered_at.map(|t| t.0),
            s.lease_until.map(|t| t.0),
            s.hold_until.map(|t| t.0),
            s.ended_at.map(|t| t.0),
            s.end_reason,
            version,
            s.expires_at.map(|t| t.0),
            s.nodes.len(),
        ])
        .ctx(WHAT)?;
    if changed == 1 {
        Ok(())
    } else {
        Err(StoreError::Corrupt(format!("session {} vanished inside its own transaction", s.id)))
    }
}

/// Counts the sessions a key created since a time.
pub(crate) const RECENT_SESSIONS: &str = "SELECT COUNT(*) FROM sessions WHERE origin_key = ?1 AND origin_at > ?2";

/// Sessions `key` created after `since` (whatever became of them).
pub(crate) fn recent_sessions(conn: &Connection, key: KeyId, since: Timestamp) -> Result<u32, StoreError> {
    let Ok(key) = i64::try_from(key.0) else { return Ok(0) };
    count(conn, RECENT_SESSIONS, params![key, since.0], "checking the rate limit").map(sat_u32)
}

/// Counts the nodes a project's live sessions hold: the sum of their list
/// lengths (a live session holds every node it lists; see schema v9), read
/// from the live sessions' index alone.
/// One covering seek of the index per live state: the live states are
/// spelled out as in the index's condition (`live = 1`, a generated
/// column, would make SQLite read the table row), and not as one `OR`,
/// which SQLite turns into an `IN` list built as a temporary table on
/// every execution.
pub(crate) const HELD_BY_PROJECT: &str = "SELECT \
     (SELECT COALESCE(SUM(node_count), 0) FROM sessions WHERE project = ?1 AND state = 'Allocating') + \
     (SELECT COALESCE(SUM(node_count), 0) FROM sessions WHERE project = ?1 AND state = 'Prod') + \
     (SELECT COALESCE(SUM(node_count), 0) FROM sessions WHERE project = ?1 AND state = 'Fail')";

/// Nodes held by the project's live sessions.
pub(crate) fn held_by_project(conn: &Connection, project: &str) -> Result<u32, StoreError> {
    count(conn, HELD_BY_PROJECT, [project], "checking the quota").map(sat_u32)
}

/// Counts the Failed nodes a project's sessions in Fail hold: every node a
/// session in Fail lists is Failed and held by it (the same invariant).
pub(crate) const FAILED_HELD_BY_PROJECT: &str =
    "SELECT COALESCE(SUM(node_count), 0) FROM sessions WHERE project = ?1 AND state = 'Fail'";

/// Failed nodes held by the project's sessions in Fail.
pub(crate) fn failed_held_by_project(conn: &Connection, project: &str) -> Result<u64, StoreError> {
    count(conn, FAILED_HELD_BY_PROJECT, [project], "evaluating a guard")
}

// ----- projects, keys, pools, settings -----

/// One project.
pub(crate) fn project(conn: &Connection, name: &str) -> Result<Option<Project>, StoreError> {
    one(conn, "SELECT name, quota, ssh_keys FROM projects WHERE name = ?1", [name], "reading a project", codec::project)
}

/// Every project, by name.
pub(crate) fn projects(conn: &Connection) -> Result<Vec<Project>, StoreError> {
    rows(conn, "SELECT name, quota, ssh_keys FROM projects ORDER BY name", [], "reading the projects", codec::project)
}

/// A project's own quota (`None`: no such project, or no quota).
pub(crate) fn project_quota(conn: &Connection, name: &str) -> Result<Option<u32>, StoreError> {
    const WHAT: &str = "reading a project's quota";
    let mut stmt = conn.prepare_cached("SELECT quota FROM projects WHERE name = ?1").ctx(WHAT)?;
    let q: Option<Option<i64>> = stmt.query_row([name], |r| r.get(0)).optional().ctx(WHAT)?;
    q.flatten().map(|q| u32::try_from(q).map_err(|e| StoreError::Corrupt(format!("projects.quota: {e}")))).transpose()
}

/// Creates a project or replaces its quota and keys.
pub(crate) fn put_project(conn: &Connection, p: &Project) -> Result<(), StoreError> {
    const WHAT: &str = "writing a project";
    let mut stmt = conn
        .prepare_cached(
            "INSERT INTO projects (name, quota, ssh_keys) VALUES (?1, ?2, ?3) \
             ON CONFLICT (name) DO UPDATE SET quota = excluded.quota, ssh_keys = excluded.ssh_keys",
        )
        .ctx(WHAT)?;
    stmt.execute(params![p.name, p.quota, codec::ssh_keys(&p.ssh_keys)?]).ctx(WHAT)?;
    Ok(())
}

/// Whether the project exists.
pub(crate) fn project_exists(conn: &Connection, name: &str) -> Result<bool, StoreError> {
    let mut stmt = conn.prepare_cached("SELECT 1 FROM projects WHERE name = ?1").ctx("checking a project")?;
    stmt.exists([name]).ctx("checking a project")
}

/// The key with this hash.
pub(crate) fn api_key_by_hash(conn: &Connection, hash: &ApiKeyHash) -> Result<Option<ApiKeyRecord>, StoreError> {
    one(
        conn,
        concat!("SELECT ", key_cols!(), " FROM api_keys WHERE hash = ?1"),
        [&hash.0[..]],
        "reading an API key",
        codec::api_key,
    )
}

/// The key with this id.
pub(crate) fn api_key(conn: &Connection, id: KeyId) -> Result<Option<ApiKeyRecord>, StoreError> {
    one(
        conn,
        concat!("SELECT ", key_cols!(), " FROM api_keys WHERE id = ?1"),
        [to_sql_u64(id.0, "api_keys.id")?],
        "reading an API key",
        codec::api_key,
    )
}

/// Every key, or one project's (by the `api_keys_project` index), by id.
pub(crate) fn api_keys(conn: &Connection, project: Option<&str>) -> Result<Vec<ApiKeyRecord>, StoreError> {
    match project {
        None => rows(
            conn,
            concat!("SELECT ", key_cols!(), " FROM api_keys ORDER BY id"),
            [],
            "listing API keys",
            codec::api_key,
        ),
        Some(p) => rows(
            conn,
            concat!("SELECT ", key_cols!(), " FROM api_keys WHERE project = ?1 ORDER BY id"),
            [p],
            "listing API keys",
            codec::api_key,
        ),
    }
}

/// Sets a key's revocation time unless it has one already.
pub(crate) fn revoke_api_key(conn: &Connection, id: KeyId, now: Timestamp) -> Result<(), StoreError> {
    const WHAT: &str = "revoking an API key";
    let mut stmt =
        conn.prepare_cached("UPDATE api_keys SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL").ctx(WHAT)?;
    stmt.execute(params![to_sql_u64(id.0, "api_keys.id")?, now.0]).ctx(WHAT)?;
    Ok(())
}

/// Moves a key's last use forward to `at` (never back).
pub(crate) fn record_key_use(conn: &Connection, id: KeyId, at: Timestamp) -> Result<(), StoreError> {
    const WHAT: &str = "recording an API key's use";
    let mut stmt = conn
        .prepare_cached("UPDATE api_keys SET last_used = ?2 WHERE id = ?1 AND (last_used IS NULL OR last_used < ?2)")
        .ctx(WHAT)?;
    stmt.execute(params![to_sql_u64(id.0, "api_keys.id")?, at.0]).ctx(WHAT)?;
    Ok(())
}

/// Inserts a key; returns its id.
pub(crate) fn insert_api_key(
    conn: &Connection,
    project: &str,
    hash: &ApiKeyHash,
    admin: bool,
    now: Timestamp,
    expires_at: Option<Timestamp>,
) -> Result<KeyId, StoreError> {
    const WHAT: &str = "inserting an API key";
    let mut stmt = conn
        .prepare_cached(
            "INSERT INTO api_keys (id, project, hash, admin, created_at, expires_at) VALUES (NULL, ?1, ?2, ?3, ?4, ?5)",
        )
        .ctx(WHAT)?;
    stmt.execute(params![project, &hash.0[..], admin, now.0, expires_at.map(|t| t.0)]).ctx(WHAT)?;
    let id = conn.last_insert_rowid();
    u64::try_from(id).map(KeyId).map_err(|_| StoreError::Corrupt(format!("SQLite assigned key id {id}")))
}

/// Every pool target, ordered by pool.
pub(crate) fn pool_targets(conn: &Connection) -> Result<Vec<PoolTarget>, StoreError> {
    let mut out = rows(
        conn,
        "SELECT release, arch, flavor, standby FROM pool_targets",
        [],
        "reading pool targets",
        codec::pool_target,
    )?;
    out.sort_by(|a, b| a.pool.cmp(&b.pool));
    Ok(out)
}

/// One pool's standby target, if it has one.
pub(crate) fn pool_standby(conn: &Connection, pool: &PoolKey) -> Result<Option<u32>, StoreError> {
    const WHAT: &str = "reading a pool target";
    let mut stmt = conn
        .prepare_cached("SELECT standby FROM pool_targets WHERE release = ?1 AND arch = ?2 AND flavor = ?3")
        .ctx(WHAT)?;
    let n: Option<i64> = stmt
        .query_row(params![pool.release, pool.arch.as_str(), pool.flavor.as_deref().unwrap_or("")], |r| r.get(0))
        .optional()
        .ctx(WHAT)?;
    n.map(|n| u32::try_from(n).map_err(|e| StoreError::Corrupt(format!("pool_targets.standby: {e}")))).transpose()
}

/// Sets a pool's target.
pub(crate) fn put_pool_target(conn: &Connection, t: &PoolTarget) -> Result<(), StoreError> {
    const WHAT: &str = "writing a pool target";
    let mut stmt = conn
        .prepare_cached(
            "INSERT INTO pool_targets (release, arch, flavor, standby) VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT (release, arch, flavor) DO UPDATE SET standby = excluded.standby",
        )
        .ctx(WHAT)?;
    stmt.execute(params![t.pool.release, t.pool.arch.as_str(), t.pool.flavor.as_deref().unwrap_or(""), t.standby])
        .ctx(WHAT)?;
    Ok(())
}

/// The pause flag.
pub(crate) fn paused(conn: &Connection) -> Result<bool, StoreError> {
    let mut stmt = conn.prepare_cached("SELECT paused FROM settings WHERE id = 1").ctx("reading the pause flag")?;
    let p: Option<bool> = stmt.query_row([], |r| r.get(0)).optional().ctx("reading the pause flag")?;
    p.ok_or_else(|| StoreError::Corrupt("the settings row is missing".into()))
}

/// Sets the pause flag.
pub(crate) fn set_paused(conn: &Connection, paused: bool) -> Result<(), StoreError> {
    let mut stmt = conn.prepare_cached("UPDATE settings SET paused = ?1 WHERE id = 1").ctx("writing the pause flag")?;
    stmt.execute([paused]).ctx("writing the pause flag")?;
    Ok(())
}

/// The newest leadership epoch handed out.
pub(crate) fn leader_epoch(conn: &Connection) -> Result<u64, StoreError> {
    const WHAT: &str = "reading the leadership epoch";
    let mut stmt = conn.prepare_cached("SELECT leader_epoch FROM settings WHERE id = 1").ctx(WHAT)?;
    let e: Option<i64> = stmt.query_row([], |r| r.get(0)).optional().ctx(WHAT)?;
    let e = e.ok_or_else(|| StoreError::Corrupt("the settings row is missing".into()))?;
    u64::try_from(e).map_err(|_| StoreError::Corrupt(format!("leadership epoch {e}")))
}

/// Moves the leadership epoch forward by one.
pub(crate) fn bump_leader_epoch(conn: &Connection) -> Result<(), StoreError> {
    const WHAT: &str = "starting a leadership term";
    let mut stmt = conn.prepare_cached("UPDATE settings SET leader_epoch = leader_epoch + 1 WHERE id = 1").ctx(WHAT)?;
    stmt.execute([]).ctx(WHAT)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The query plan of `sql`, one line per step.
    fn plan(conn: &Connection, sql: &str) -> String {
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).expect("prepare");
        let n = stmt.parameter_count();
        let params: Vec<rusqlite::types::Value> = (0..n).map(|_| rusqlite::types::Value::Integer(1)).collect();
        let lines: Vec<String> = stmt
            .query_map(rusqlite::params_from_iter(params), |r| r.get::<_, String>(3))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows");
        lines.join("\n")
    }

    fn schema() -> Connection {
        let conn = Connection::open_in_memory().expect("open");
        crate::schema::migrate(&conn, std::path::Path::new(":memory:")).expect("migrate");
        conn
    }

    #[test]
    fn claim_is_a_range_scan_of_the_ready_index() {
        let conn = schema();
        let p = plan(&conn, CLAIMABLE);
        assert!(p.contains("USING INDEX nodes_ready"), "{p}");
        assert!(!p.contains("TEMP B-TREE"), "the index gives the order: {p}");
        assert!(!p.contains("SCAN nodes"), "{p}");
        let p = plan(&conn, READY_IN_POOL);
        assert!(p.contains("nodes_ready"), "{p}");
    }

    #[test]
    fn reconciler_reads_are_index_range_scans() {
        let conn = schema();
        for (st, index) in [(NodeState::Provisioning, "nodes_provisioning"), (NodeState::Failed, "nodes_failed")] {
            let p = plan(&conn, &nodes_in_state_sql(st));
            assert!(p.contains(&format!("USING INDEX {index}")), "{p}");
            assert!(!p.contains("TEMP B-TREE"), "the index gives the order: {p}");
        }
        for st in [NodeState::Active, NodeState::Ready, NodeState::Deployed] {
            let p = plan(&conn, &nodes_in_state_sql(st));
            assert!(!p.contains("TEMP B-TREE"), "the table is read in id order: {p}");
        }
        let p = plan(&conn, STALE_READY);
        assert!(p.contains("USING INDEX nodes_stale"), "{p}");
        let p = plan(&conn, IDLE_NODES);
        // A search on (arch, flavor), not a scan of every idle machine.
        assert!(p.contains("SEARCH nodes USING INDEX nodes_idle (hardware_arch=? AND flavor=?)"), "{p}");
        assert!(!p.contains("TEMP B-TREE"), "the index gives the order: {p}");
        let p = plan(&conn, NODES_AFTER);
        assert!(p.contains("INTEGER PRIMARY KEY"), "{p}");
        assert!(!p.contains("TEMP B-TREE"), "{p}");
    }

    #[test]
    fn quota_and_fail_cap_read_only_the_live_sessions_index() {
        let conn = schema();
        for sql in [HELD_BY_PROJECT, FAILED_HELD_BY_PROJECT] {
            let p = plan(&conn, sql);
            assert!(p.contains("USING COVERING INDEX sessions_live_project (project=? AND state=?)"), "{sql}: {p}");
            assert!(!p.contains("SCAN sessions"), "{sql}: {p}");
            assert!(!p.contains("json_each") && !p.contains("nodes"), "{sql}: {p}");
        }
    }

    #[test]
    fn hot_statements_are_not_re_prepared() {
        use rusqlite::StatementStatus;
        let conn = schema();
        for sql in [
            CLAIMABLE,
            READY_IN_POOL,
            HELD_BY_PROJECT,
            FAILED_HELD_BY_PROJECT,
            RECENT_SESSIONS,
            LIVE_SESSIONS,
            EXPIRED_SESSIONS,
            STALE_READY,
            IDLE_NODES,
            NODES_AFTER,
            UPDATE_NODE_STATE,
        ] {
            let mut stmt = conn.prepare(sql).expect("prepare");
            let n = stmt.parameter_count();
            for i in 0..3 {
                let params: Vec<rusqlite::types::Value> =
                    (0..n).map(|_| rusqlite::types::Value::Text(format!("v{i}"))).collect();
                let mut rows = stmt.query(rusqlite::params_from_iter(params)).expect("query");
                while rows.next().expect("row").is_some() {}
            }
            assert_eq!(stmt.get_status(StatementStatus::RePrepare), 0, "{sql}");
        }
    }

    /// The statements every allocation cycle runs in the writer: none may
    /// build a temporary table per execution (an `IN` list in a column or
    /// index definition does, and cost a tenth of the writer's time).
    #[test]
    fn hot_writes_build_no_temporary_tables() {
        let conn = schema();
        let hot = [
            UPDATE_NODE_STATE,
            INSERT_SESSION,
            UPDATE_SESSION_STATE,
            INSERT_EVENT,
            CLAIMABLE,
            RECENT_SESSIONS,
            HELD_BY_PROJECT,
            FAILED_HELD_BY_PROJECT,
            "SELECT version FROM sessions WHERE id = ?1",
            concat!("SELECT ", session_cols!(), " FROM sessions WHERE id = ?1"),
            concat!("SELECT ", node_cols!(), " FROM nodes WHERE id = ?1"),
        ];
        for sql in hot {
            let mut stmt = conn.prepare(&format!("EXPLAIN {sql}")).expect("prepare");
            let n = stmt.parameter_count();
            let params: Vec<rusqlite::types::Value> = (0..n).map(|_| rusqlite::types::Value::Null).collect();
            let ops: Vec<String> = stmt
                .query_map(rusqlite::params_from_iter(params), |r| r.get::<_, String>(1))
                .expect("explain")
                .collect::<Result<_, _>>()
                .expect("rows");
            assert!(!ops.iter().any(|o| o == "OpenEphemeral"), "{sql} builds a temporary table");
        }
    }

    #[test]
    fn quota_rate_limit_and_guards_use_indexes() {
        let conn = schema();
        let p = plan(&conn, RECENT_SESSIONS);
        assert!(p.contains("sessions_origin"), "{p}");
        let p = plan(&conn, LIVE_SESSIONS);
        assert!(p.contains("sessions_live"), "{p}");
        assert!(!p.contains("TEMP B-TREE"), "{p}");
        let p = plan(&conn, EXPIRED_SESSIONS);
        assert!(p.contains("SEARCH sessions USING INDEX sessions_expiry (expires_at<?)"), "{p}");
        assert!(!p.contains("TEMP B-TREE"), "the index gives the order: {p}");
    }
}
