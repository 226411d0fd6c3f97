//! Putting an image on a machine, and preparing an installed machine for
//! the project it is given to, as a trait.

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

/// An install or preparation failed.
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

/// Installs machines and hands them over.
///
/// The reconciler calls [`Installer::install`] with its own deadline and
/// retries; the engine calls [`Installer::prepare`] on every node of a new
/// session, all or nothing.
#[async_trait]
pub trait Installer: Send + Sync {
    /// Installs `image` on `node`; returns once the machine is installed
    /// and reachable.
    async fn install(&self, node: &Node, image: &PoolKey) -> Result<Installed, InstallError>;

    /// Prepares an installed node for `project` (e.g. pushes its SSH public
    /// keys to root) before it is handed over in `session`.
    async fn prepare(&self, node: &Node, project: &Project, session: &SessionId) -> Result<(), InstallError>;

    /// Whether [`Installer::prepare`] does anything. When it does not, the
    /// engine hands nodes over in the claim itself: one durable write per
    /// allocation instead of two.
    fn prepares(&self) -> bool {
        true
    }
}
