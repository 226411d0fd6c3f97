//! The operator commands (`duffy key …`, `node …`, `pool …`, `project …`):
//! one definition of each, executed by one function, whichever way it
//! arrives.
//!
//! The `duffy` binary builds an [`OperatorCommand`] from its arguments
//! (reading any files the operator named) and then either executes it
//! itself against the database file, when no service runs on it, or sends
//! it to the running service over its control socket (`control` module),
//! which executes it with its own store and engine. The text a command
//! prints is the same either way. With the engine at hand (the service), key
//! changes go through it, so its caches see them at once.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use duffy_core::clock::SystemClock;
use duffy_core::{
    Actor, ApiKeyRecord, Clock, Engine, EngineError, KeyId, NewNode, Node, PoolKey, PoolTarget, Project, Store,
    StoreError, Timestamp, hash_api_key, validate_token,
};
use serde::{Deserialize, Serialize};

use crate::keys::{ensure_project, generate_key};

/// One operator command, as the CLI parsed it. Files the operator named
/// (node lists, SSH keys) have been read and parsed by the CLI; everything
/// here is checked again by [`execute`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case", deny_unknown_fields)]
pub enum OperatorCommand {
    /// `key create`: a new key (and its project if needed); prints the key
    /// alone.
    KeyCreate {
        /// The project the key belongs to (created if missing).
        project: String,
        /// May call the admin endpoints.
        admin: bool,
        /// Sets the project's node quota.
        quota: Option<u32>,
        /// The key is refused this many seconds after it is created.
        expires_after_secs: Option<u64>,
    },
    /// `key list`: every key (or a project's), never the key or its hash.
    KeyList {
        /// Only this project's keys.
        project: Option<String>,
    },
    /// `key revoke`: refused from now on (the row stays).
    KeyRevoke {
        /// The key's id, as `key list` shows it.
        id: u64,
    },
    /// `node add` and `node import`: adds the machines not present yet
    /// (`skip_existing`), or all of them, failing on a duplicate.
    NodeAdd {
        /// The machines to add, checked as the store checks them.
        nodes: Vec<NewNode>,
        /// Skip machines already present (import) instead of refusing.
        skip_existing: bool,
    },
    /// `node list`.
    NodeList,
    /// One node's row, for `node power` (which talks to the BMC itself).
    NodeGet {
        /// The node's host name.
        hostname: String,
    },
    /// `pool set`.
    PoolSet {
        /// The pool (release, arch, flavor) whose target is set.
        pool: PoolKey,
        /// Ready nodes to keep.
        standby: u32,
    },
    /// `project set`: creates or updates a project.
    ProjectSet {
        /// The project's name (created if missing).
        name: String,
        /// New quota (unchanged when absent).
        quota: Option<u32>,
        /// New SSH public keys (unchanged when absent).
        ssh_keys: Option<Vec<String>>,
    },
    /// `project show`.
    ProjectShow {
        /// The project's name.
        name: String,
    },
    /// `project list`.
    ProjectList,
}

impl OperatorCommand {
    /// The command's name, for logs (its arguments may be a whole farm).
    pub fn name(&self) -> &'static str {
        match self {
            OperatorCommand::KeyCreate { .. } => "key create",
            OperatorCommand::KeyList { .. } => "key list",
            OperatorCommand::KeyRevoke { .. } => "key revoke",
            OperatorCommand::NodeAdd { .. } => "node add",
            OperatorCommand::NodeList => "node list",
            OperatorCommand::NodeGet { .. } => "node get",
            OperatorCommand::PoolSet { .. } => "pool set",
            OperatorCommand::ProjectSet { .. } => "project set",
            OperatorCommand::ProjectShow { .. } => "project show",
            OperatorCommand::ProjectList => "project list",
        }
    }

    /// Whether the command may create the database file when it does not
    /// exist. Commands that only read (or change what must already be
    /// there) refuse a missing file instead: a mistyped `--db` must not
    /// show an empty farm.
    pub fn creates_database(&self) -> bool {
        matches!(
            self,
            OperatorCommand::KeyCreate { .. }
                | OperatorCommand::NodeAdd { .. }
                | OperatorCommand::PoolSet { .. }
                | OperatorCommand::ProjectSet { .. }
        )
    }
}

/// What a command printed, and any value a caller needs back.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    /// What the command prints on standard output, as the CLI prints it.
    pub output: String,
    /// [`OperatorCommand::NodeGet`]'s node.
    #[serde(default)]
    pub node: Option<Node>,
}

/// Why a command failed; nothing was changed unless the message says so.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The command itself is wrong (bad name, bad value, …).
    #[error("{0}")]
    Invalid(String),
    /// What the command names does not exist (a project, a key id).
    #[error("{0}")]
    NotFound(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The engine refused or failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// What a command runs against: the running service's engine (and through
/// it its store), or the store alone when no service runs.
#[derive(Clone)]
pub enum Target {
    /// Inside `duffy serve`.
    Service(Engine),
    /// The database file, opened by the CLI.
    Store(Arc<dyn Store>),
}

impl Target {
    fn store(&self) -> &Arc<dyn Store> {
        match self {
            Target::Service(e) => e.store(),
            Target::Store(s) => s,
        }
    }

    fn now(&self) -> Timestamp {
        match self {
            Target::Service(e) => e.clock().now(),
            Target::Store(_) => SystemClock.now(),
        }
    }

    /// Tells a running reconciler that there is work (new machines, new
    /// targets).
    fn kick(&self) {
        if let Target::Service(e) = self {
            e.kick();
        }
    }
}

fn invalid(e: impl std::fmt::Display) -> CommandError {
    CommandError::Invalid(e.to_string())
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

/// Runs `cmd` against `target` and returns what it prints.
pub async fn execute(cmd: OperatorCommand, target: &Target) -> Result<Outcome, CommandError> {
    let store = target.store();
    let now = target.now();
    let text = |output: String| Ok(Outcome { output, node: None });
    match cmd {
        OperatorCommand::KeyCreate { project, admin, quota, expires_after_secs } => {
            let (key, _) = create_key(target, &project, admin, quota, expires_after_secs).await?;
            text(format!("{key}\n"))
        }
        OperatorCommand::KeyList { project } => text(key_table(&list_keys(target, project.as_deref()).await?, now)),
        OperatorCommand::KeyRevoke { id } => {
            let rec = revoke_key(target, id).await?;
            match rec.revoked_at {
                Some(t) if t < now => text(format!("key {id} (project {}) was already revoked at {t}\n", rec.project)),
                _ => text(format!("revoked key {id} (project {})\n", rec.project)),
            }
        }
        OperatorCommand::NodeAdd { nodes, skip_existing } => {
            for n in &nodes {
                n.validate().map_err(invalid)?;
            }
            let total = nodes.len();
            let mut new = Vec::with_capacity(total);
            for n in nodes {
                if !skip_existing || store.node_by_hostname(&n.hostname).await?.is_none() {
                    new.push(n);
                }
            }
            let added = store.add_nodes(new, Actor::Operator, now).await?;
            target.kick();
            if skip_existing {
                text(format!("added {} nodes, {} already present\n", added.len(), total - added.len()))
            } else {
                let mut out = String::new();
                for n in added {
                    let _ = writeln!(out, "added {} (id {}, {})", n.hostname, n.id, n.state);
                }
                text(out)
            }
        }
        OperatorCommand::NodeList => {
            let mut out = format!(
                "{:>6}  {:<32} {:<16} {:<8} {:>5}  {:<12} session\n",
                "id", "hostname", "state", "arch", "used", "image"
            );
            for n in store.nodes().await? {
                let _ = writeln!(
                    out,
                    "{:>6}  {:<32} {:<16} {:<8} {:>5}  {:<12} {}",
                    n.id.0,
                    n.hostname,
                    n.state.as_str(),
                    n.hardware_arch.as_str(),
                    n.used_count,
                    opt(n.image.as_ref()),
                    n.session.as_ref().map(|s| s.0.as_str()).unwrap_or("-"),
                );
            }
            text(out)
        }
        OperatorCommand::NodeGet { hostname } => {
            let node = store
                .node_by_hostname(&hostname)
                .await?
                .ok_or_else(|| invalid(format!("no node named {hostname:?} in the database")))?;
            Ok(Outcome { output: String::new(), node: Some(node) })
        }
        OperatorCommand::PoolSet { pool, standby } => {
            pool.validate().map_err(invalid)?;
            let t = PoolTarget { pool: pool.clone(), standby };
            match target {
                Target::Service(e) => e.set_pool_targets(&[t]).await?,
                Target::Store(s) => s.set_pool_target(t).await?,
            }
            text(format!("pool {pool}: standby {standby}\n"))
        }
        OperatorCommand::ProjectSet { name, quota, ssh_keys } => {
            let project = set_project(&**store, &name, quota, ssh_keys).await?;
            text(format!("project {name}: quota {}, {} SSH keys\n", quota_text(project.quota), project.ssh_keys.len()))
        }
        OperatorCommand::ProjectShow { name } => {
            let p =
                store.project(&name).await?.ok_or_else(|| CommandError::NotFound(format!("no project {name:?}")))?;
            let mut out = format!("project {}: quota {}\n", p.name, quota_text(p.quota));
            for k in &p.ssh_keys {
                let _ = writeln!(out, "  {k}");
            }
            text(out)
        }
        OperatorCommand::ProjectList => {
            let mut out = String::new();
            for p in store.projects().await? {
                let _ = writeln!(out, "{}\tquota {}\t{} SSH keys", p.name, quota_text(p.quota), p.ssh_keys.len());
            }
            text(out)
        }
    }
}

/// A project's quota as the commands print it.
fn quota_text(quota: Option<u32>) -> String {
    quota.map_or_else(|| "none".into(), |q| q.to_string())
}

/// A new key for `project` (created if missing, its quota set when one
/// is given), valid for `expires_after_secs` when given: `key create`, and
/// `POST /api/v1/keys`. Returns the key, which is stored only as its hash
/// and cannot be shown again.
pub async fn create_key(
    target: &Target,
    project: &str,
    admin: bool,
    quota: Option<u32>,
    expires_after_secs: Option<u64>,
) -> Result<(String, ApiKeyRecord), CommandError> {
    let store = target.store();
    let now = target.now();
    validate_token("project name", project, 64).map_err(invalid)?;
    let expires_at = match expires_after_secs {
        Some(0) => return Err(invalid("--expires must be longer than zero")),
        Some(s) => Some(now.plus(Duration::from_secs(s))),
        None => None,
    };
    ensure_project(&**store, project, quota).await?;
    let key = generate_key();
    let hash = hash_api_key(&key);
    let rec = match target {
        Target::Service(e) => e.add_api_key(project, hash, admin, expires_at).await?,
        Target::Store(s) => s.add_api_key(project, hash, admin, now, expires_at).await?,
    };
    Ok((key, rec))
}

/// Every key, or a project's (which must exist): `key list`, and `GET
/// /api/v1/keys`.
pub async fn list_keys(target: &Target, project: Option<&str>) -> Result<Vec<ApiKeyRecord>, CommandError> {
    if let Some(p) = project {
        if target.store().project(p).await?.is_none() {
            return Err(CommandError::NotFound(format!("no project {p:?}")));
        }
    }
    Ok(match target {
        Target::Service(e) => e.api_keys(project).await?,
        Target::Store(s) => s.api_keys(project).await?,
    })
}

/// Revokes key `id` (revoking a revoked key changes nothing and returns
/// its record): `key revoke`, and `DELETE /api/v1/keys/{id}`.
pub async fn revoke_key(target: &Target, id: u64) -> Result<ApiKeyRecord, CommandError> {
    let now = target.now();
    let not_found = || CommandError::NotFound(format!("no API key with id {id} (see `duffy key list`)"));
    // Ids count up from 1 and the SQLite store keeps them as signed 64-bit
    // integers: a larger id names no key, and asking the store about it
    // would fail (a store error, "try again") instead of finding nothing.
    if i64::try_from(id).is_err() {
        return Err(not_found());
    }
    let revoked = match target {
        Target::Service(e) => e.revoke_api_key(KeyId(id)).await.map_err(|e| match e {
            EngineError::Store(s) => CommandError::Store(s),
            e => CommandError::Engine(e),
        }),
        Target::Store(s) => s.revoke_api_key(KeyId(id), now).await.map_err(CommandError::Store),
    };
    match revoked {
        Err(CommandError::Store(StoreError::NotFound(_))) => Err(not_found()),
        other => other,
    }
}

/// Creates or updates project `name`: a quota or SSH keys given replace
/// the old ones, what is absent stays. `project set`, and `PUT
/// /api/v1/projects/{name}`.
pub async fn set_project(
    store: &dyn Store,
    name: &str,
    quota: Option<u32>,
    ssh_keys: Option<Vec<String>>,
) -> Result<Project, CommandError> {
    validate_token("project name", name, 64).map_err(invalid)?;
    if let Some(keys) = &ssh_keys {
        for (i, k) in keys.iter().enumerate() {
            duffy_installers::PublicKey::parse(k).map_err(|e| invalid(format!("SSH key {}: {e}", i + 1)))?;
        }
    }
    let current = store.project(name).await?;
    let project = Project {
        name: name.to_string(),
        quota: quota.or(current.as_ref().and_then(|p| p.quota)),
        ssh_keys: ssh_keys.unwrap_or_else(|| current.map(|p| p.ssh_keys).unwrap_or_default()),
    };
    store.upsert_project(project.clone()).await?;
    Ok(project)
}

/// The `key list` table: id, project, admin, created, expires, last used,
/// revoked. Never the key (not stored) or its hash.
fn key_table(keys: &[ApiKeyRecord], now: Timestamp) -> String {
    let mut out = format!(
        "{:>6}  {:<24} {:<5}  {:<24} {:<24} {:<24} {}\n",
        "id", "project", "admin", "created", "expires", "last used", "revoked"
    );
    for k in keys {
        let expires = match k.expires_at {
            Some(t) if t <= now => format!("{t} (expired)"),
            other => opt(other),
        };
        let _ = writeln!(
            out,
            "{:>6}  {:<24} {:<5}  {:<24} {:<24} {:<24} {}",
            k.id.0,
            k.project,
            if k.admin { "yes" } else { "no" },
            k.created_at,
            expires,
            opt(k.last_used),
            opt(k.revoked_at),
        );
    }
    out
}
