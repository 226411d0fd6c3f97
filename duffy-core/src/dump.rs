//! A farm's whole stored state as plain data, for copying it from one
//! store to another (`duffy store copy`: from the embedded SQLite file to
//! PostgreSQL and back).
//!
//! The event log is not part of [`FarmDump`]: it can be far larger than
//! everything else, so it is copied in pages (`Store::events` with
//! `after_seq` and `limit`). Backends export and import dumps with
//! inherent functions of their own (an import writes rows as they are,
//! ids, versions and `seq` included, into an empty store), not through the
//! `Store` trait, whose writes go through the state machine.

use serde::{Deserialize, Serialize};

use crate::model::{ApiKeyRecord, Node, PoolTarget, Project, Session};

/// Everything a store holds except the event log.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FarmDump {
    /// Every project, by name.
    pub projects: Vec<Project>,
    /// Every API key (hashes only), by id.
    pub keys: Vec<ApiKeyRecord>,
    /// Every pool's standby target, by pool.
    pub targets: Vec<PoolTarget>,
    /// Every node, by id.
    pub nodes: Vec<Node>,
    /// Every session, live or ended, by id.
    pub sessions: Vec<Session>,
    /// The pause flag.
    pub paused: bool,
}

/// How many rows of each kind a store holds (the events included).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DumpCounts {
    /// Projects.
    pub projects: u64,
    /// API keys.
    pub keys: u64,
    /// Pool targets.
    pub targets: u64,
    /// Nodes.
    pub nodes: u64,
    /// Sessions.
    pub sessions: u64,
    /// Events.
    pub events: u64,
}

impl FarmDump {
    /// The dump's counts, with `events` events.
    pub fn counts(&self, events: u64) -> DumpCounts {
        DumpCounts {
            projects: self.projects.len() as u64,
            keys: self.keys.len() as u64,
            targets: self.targets.len() as u64,
            nodes: self.nodes.len() as u64,
            sessions: self.sessions.len() as u64,
            events,
        }
    }
}

impl std::fmt::Display for DumpCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} nodes, {} sessions, {} events, {} projects, {} keys, {} pool targets",
            self.nodes, self.sessions, self.events, self.projects, self.keys, self.targets
        )
    }
}
