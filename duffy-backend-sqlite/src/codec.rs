//! Rows to model values and back.
//!
//! Decoding never panics: a value the model cannot hold is
//! [`StoreError::Corrupt`], with the column it came from.

use std::str::FromStr;

use duffy_core::{
    Actor, ApiKeyHash, ApiKeyRecord, Arch, CauseKind, Event, KeyId, Node, NodeId, NodeState, PoolKey, PoolTarget,
    PowerState, Project, Session, SessionId, SessionState, StoreError, Timestamp,
};
use rusqlite::Row;
use rusqlite::types::FromSql;

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

fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {e}"))
}

fn col<T: FromSql>(r: &Row<'_>, i: usize, what: &str) -> Result<T, StoreError> {
    r.get(i).map_err(|e| corrupt(what, e))
}

fn parse<T: FromStr>(r: &Row<'_>, i: usize, what: &str) -> Result<T, StoreError>
where
    T::Err: std::fmt::Display,
{
    let s: String = col(r, i, what)?;
    s.parse().map_err(|e| corrupt(what, e))
}

fn parse_opt<T: FromStr>(r: &Row<'_>, i: usize, what: &str) -> Result<Option<T>, StoreError>
where
    T::Err: std::fmt::Display,
{
    let s: Option<String> = col(r, i, what)?;
    s.map(|s| s.parse().map_err(|e| corrupt(what, e))).transpose()
}

fn unsigned(r: &Row<'_>, i: usize, what: &str) -> Result<u64, StoreError> {
    let v: i64 = col(r, i, what)?;
    u64::try_from(v).map_err(|e| corrupt(what, e))
}

fn ts(r: &Row<'_>, i: usize, what: &str) -> Result<Timestamp, StoreError> {
    Ok(Timestamp(col(r, i, what)?))
}

fn ts_opt(r: &Row<'_>, i: usize, what: &str) -> Result<Option<Timestamp>, StoreError> {
    Ok(col::<Option<i64>>(r, i, what)?.map(Timestamp))
}

/// A pool key from three columns; `None` when the release is NULL.
fn pool_opt(r: &Row<'_>, i: usize, what: &str) -> Result<Option<PoolKey>, StoreError> {
    let release: Option<String> = col(r, i, what)?;
    let Some(release) = release else { return Ok(None) };
    let arch: Arch = parse(r, i + 1, what)?;
    let flavor: Option<String> = col(r, i + 2, what)?;
    Ok(Some(PoolKey { release, arch, flavor }))
}

/// A `u64` as SQLite's signed integer; larger values are refused as
/// invalid input (no stored value can be that large).
pub(crate) fn to_sql_u64(v: u64, what: &str) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::Invalid(format!("{what} {v} is larger than the store can hold")))
}

/// A node row.
pub(crate) fn node(r: &Row<'_>) -> Result<Node, StoreError> {
    let port: Option<i64> = col(r, 7, "nodes.console_port")?;
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
        power: parse::<PowerState>(r, 18, "nodes.power")?,
        version: unsigned(r, 19, "nodes.version")?,
        host_key: col(r, 20, "nodes.host_key")?,
    })
}

/// A session row.
pub(crate) fn session(r: &Row<'_>) -> Result<Session, StoreError> {
    let nodes: String = col(r, 7, "sessions.nodes")?;
    let nodes: Vec<NodeId> = serde_json::from_str(&nodes).map_err(|e| corrupt("sessions.nodes", e))?;
    let state: SessionState = parse(r, 3, "sessions.state")?;
    Ok(Session {
        id: SessionId(col(r, 0, "sessions.id")?),
        project: col(r, 1, "sessions.project")?,
        key_id: KeyId(unsigned(r, 2, "sessions.key_id")?),
        state,
        pool: pool_opt(r, 4, "sessions.pool")?.ok_or_else(|| corrupt("sessions.pool", "no release"))?,
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
pub(crate) fn event(r: &Row<'_>) -> Result<Event, StoreError> {
    Ok(Event {
        seq: unsigned(r, 0, "events.seq")?,
        node: NodeId(unsigned(r, 1, "events.node")?),
        from: parse::<NodeState>(r, 2, "events.from_state")?,
        to: parse::<NodeState>(r, 3, "events.to_state")?,
        cause: parse::<CauseKind>(r, 4, "events.cause")?,
        detail: col(r, 5, "events.detail")?,
        actor: parse::<Actor>(r, 6, "events.actor")?,
        session: parse_opt::<String>(r, 7, "events.session")?.map(SessionId),
        at: ts(r, 8, "events.at")?,
    })
}

/// A project row (`name, quota, ssh_keys`).
pub(crate) fn project(r: &Row<'_>) -> Result<Project, StoreError> {
    let quota: Option<i64> = col(r, 1, "projects.quota")?;
    let keys: String = col(r, 2, "projects.ssh_keys")?;
    Ok(Project {
        name: col(r, 0, "projects.name")?,
        quota: quota.map(|q| u32::try_from(q).map_err(|e| corrupt("projects.quota", e))).transpose()?,
        ssh_keys: serde_json::from_str(&keys).map_err(|e| corrupt("projects.ssh_keys", e))?,
    })
}

/// An API key row.
pub(crate) fn api_key(r: &Row<'_>) -> Result<ApiKeyRecord, StoreError> {
    let hash: Vec<u8> = col(r, 2, "api_keys.hash")?;
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

/// A pool target row (`release, arch, flavor, standby`; flavor `''` is none).
pub(crate) fn pool_target(r: &Row<'_>) -> Result<PoolTarget, StoreError> {
    let flavor: String = col(r, 2, "pool_targets.flavor")?;
    let standby: i64 = col(r, 3, "pool_targets.standby")?;
    Ok(PoolTarget {
        pool: PoolKey {
            release: col(r, 0, "pool_targets.release")?,
            arch: parse(r, 1, "pool_targets.arch")?,
            flavor: if flavor.is_empty() { None } else { Some(flavor) },
        },
        standby: u32::try_from(standby).map_err(|e| corrupt("pool_targets.standby", e))?,
    })
}

/// A ready-count row (`release, arch, flavor, count`).
pub(crate) fn ready_count(r: &Row<'_>) -> Result<(PoolKey, u32), StoreError> {
    let pool = pool_opt(r, 0, "nodes.image")?.ok_or_else(|| corrupt("nodes.image", "Ready without an image"))?;
    let n: i64 = col(r, 3, "count")?;
    Ok((pool, u32::try_from(n).unwrap_or(u32::MAX)))
}

/// A `node_counts` row (`image_release, image_arch, image_flavor,
/// hardware_arch, flavor, chassis, state, count`).
pub(crate) fn node_count(r: &Row<'_>) -> Result<duffy_core::NodeCount, StoreError> {
    let n: i64 = col(r, 7, "count")?;
    Ok(duffy_core::NodeCount {
        group: duffy_core::NodeGroup {
            image: pool_opt(r, 0, "nodes.image")?,
            hardware: duffy_core::Hardware {
                arch: parse(r, 3, "nodes.hardware_arch")?,
                flavor: col(r, 4, "nodes.flavor")?,
            },
            chassis: col(r, 5, "nodes.chassis")?,
            state: parse(r, 6, "nodes.state")?,
        },
        count: u32::try_from(n).unwrap_or(u32::MAX),
    })
}

/// A session's node list as stored (a JSON array of ids).
pub(crate) fn node_list(nodes: &[NodeId]) -> String {
    let mut s = String::with_capacity(2 + nodes.len() * 6);
    s.push('[');
    for (i, n) in nodes.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&n.0.to_string());
    }
    s.push(']');
    s
}

/// A project's SSH keys as stored (a JSON array of strings).
pub(crate) fn ssh_keys(keys: &[String]) -> Result<String, StoreError> {
    serde_json::to_string(keys).map_err(|e| StoreError::Invalid(format!("SSH keys: {e}")))
}
