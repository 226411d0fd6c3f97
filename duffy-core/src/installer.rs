//! Putting an image on a machine ([`Installer`]), and preparing an
//! installed machine for the project it is given to ([`Contextualizer`]),
//! as traits.

use std::fmt;

use async_trait::async_trait;

use crate::model::{Node, PoolKey, Project, SessionId};

/// What a finished install reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Installed {
    /// The new OS's SSH host public key (`ssh-ed25519 AAAA…`), when the
    /// installer learned it; recorded on the node and checked whenever
    /// Duffy connects to it.
    pub host_key: Option<String>,
}

/// An install failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct InstallError {
    /// What went wrong, in the installer's words (kept in the node's
    /// history).
    pub message: String,
}

impl InstallError {
    /// Builds an error.
    pub fn new(message: impl Into<String>) -> Self {
        InstallError { message: message.into() }
    }
}

/// Installs machines.
///
/// The reconciler calls [`Installer::install`] with its own deadline and
/// retries.
#[cfg_attr(feature = "mock", mockall::automock)]
#[async_trait]
pub trait Installer: Send + Sync {
    /// Installs `image` on `node`; returns once the machine is installed
    /// and reachable.
    async fn install(&self, node: &Node, image: &PoolKey) -> Result<Installed, InstallError>;
}

/// Whose fault a failed preparation is, which decides what happens to the
/// node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Blame {
    /// The node: unreachable, wrong host key, timed out, its disk refused
    /// the write. The node is Failed (with the policy's cool-down) and
    /// its history says why.
    Node,
    /// The project: no usable SSH keys, a name that cannot be used. Any
    /// node would fail the same way, so no node is blamed: the allocation
    /// is aborted, its nodes go back to be reinstalled with no cool-down,
    /// and the caller is told what to fix.
    Project,
    /// Duffy's own side: the ssh program cannot be run, a temporary file
    /// cannot be written. No node is blamed either; an operator must look.
    Service,
}

impl fmt::Display for Blame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Blame::Node => "node",
            Blame::Project => "project",
            Blame::Service => "service",
        })
    }
}

/// Preparing a node for a project failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct PrepareError {
    /// Whose fault it is.
    pub blame: Blame,
    /// What went wrong (kept in the node's history when the node is
    /// blamed, shown to the caller when the project is).
    pub message: String,
}

impl PrepareError {
    /// Builds an error.
    pub fn new(blame: Blame, message: impl Into<String>) -> Self {
        PrepareError { blame, message: message.into() }
    }

    /// A failure of the node itself.
    pub fn node(message: impl Into<String>) -> Self {
        PrepareError::new(Blame::Node, message)
    }
}

/// Prepares installed nodes for the project they are handed to (e.g.
/// pushes the project's SSH public keys to root).
///
/// Set one on the engine with
/// [`EngineBuilder::contextualizer`](crate::EngineBuilder::contextualizer).
/// Without one, a claim hands the nodes over in the same durable write
/// (one write per allocation); with one, the claim is durable before any
/// node is touched, every node is prepared concurrently under the policy's
/// `prepare_timeout`, and only then are the nodes delivered (all or
/// nothing).
#[cfg_attr(feature = "mock", mockall::automock)]
#[async_trait]
pub trait Contextualizer: Send + Sync {
    /// Checks, before any node is claimed, that nodes can be prepared for
    /// `project` at all (for SSH: the project has keys and every one is
    /// valid). An error refuses the request with nothing claimed; its
    /// message is shown to the caller, so it must say what to fix. The
    /// default accepts every project.
    fn check_project(&self, project: &Project) -> Result<(), PrepareError> {
        let _ = project;
        Ok(())
    }

    /// Prepares `node` for `project` in `session`. Called on every node of
    /// a new session before it is handed over; an error aborts the
    /// allocation, and its [`Blame`] decides whether the node is Failed.
    async fn prepare(&self, node: &Node, project: &Project, session: &SessionId) -> Result<(), PrepareError>;

    /// Prepares `node` for `project` in the session `session` describes:
    /// what the engine calls. A contextualizer that leaves the session's
    /// description on the node (the SSH one writes `/root/session-info`)
    /// overrides this; the default is [`Contextualizer::prepare`].
    async fn prepare_session(
        &self,
        node: &Node,
        project: &Project,
        session: &SessionContext,
    ) -> Result<(), PrepareError> {
        self.prepare(node, project, &session.id).await
    }
}

/// The session a node is being prepared for, as its job may want to read
/// it on the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionContext {
    /// The session's id (the legacy `ssid`, what `/Node/done` takes).
    pub id: SessionId,
    /// The project.
    pub project: String,
    /// Every node of the session, by host name, in allocation order.
    pub hosts: Vec<String>,
    /// When the session expires unless extended.
    pub expires_at: crate::time::Timestamp,
}
