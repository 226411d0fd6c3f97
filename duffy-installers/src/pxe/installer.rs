//! [`PxeInstaller`]: the [`Installer`] that installs by PXE.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use duffy_core::time::timeout;
use duffy_core::{
    BootDevice, Clock, InstallError, Installed, Installer, Node, PoolKey, PowerAction, PowerController, PowerState,
};

use super::PxeConfig;
use super::registry::*;
use crate::util::token_prefix;

/// An [`Installer`] that installs by PXE. See the module docs.
pub struct PxeInstaller {
    token_ttl: Duration,
    power: Arc<dyn PowerController>,
    registry: Arc<PxeRegistry>,
    clock: Arc<dyn Clock>,
}

impl fmt::Debug for PxeInstaller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PxeInstaller").field("token_ttl", &self.token_ttl).field("registry", &self.registry).finish()
    }
}

impl PxeInstaller {
    /// An installer using `power` to boot machines and `registry` to meet
    /// their callbacks. From `config` it takes only `token_ttl` (how long
    /// it waits for a machine); `registry` was built from the same
    /// configuration. Waits are measured on `clock`.
    pub fn new(
        config: &PxeConfig,
        power: Arc<dyn PowerController>,
        registry: Arc<PxeRegistry>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        PxeInstaller { token_ttl: config.token_ttl, power, registry, clock }
    }

    /// The registry the HTTP handlers serve from.
    pub fn registry(&self) -> &Arc<PxeRegistry> {
        &self.registry
    }
}

/// Removes a pending install when the install future is dropped before it
/// finished. After a callback or expiry it finds nothing to remove.
struct PendingGuard<'a> {
    registry: &'a PxeRegistry,
    token: String,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.registry.cancel(&self.token);
    }
}

#[async_trait]
impl Installer for PxeInstaller {
    async fn install(&self, node: &Node, image: &PoolKey) -> Result<Installed, InstallError> {
        let host = &node.hostname;
        let ttl = self.token_ttl;
        let expires_at = self.clock.now().plus(ttl);
        let (token, mut rx) =
            self.registry.register(node, image, expires_at).map_err(|e| InstallError::new(e.to_string()))?;
        let _guard = PendingGuard { registry: &self.registry, token: token.clone() };
        tracing::info!(node = %host, image = %image, token = %token_prefix(&token), expires_at = %expires_at,
            "PXE install registered");

        let power_err = |what: &str, e: duffy_core::PowerError| {
            InstallError::new(format!("PXE install of {host} ({image}): cannot {what}: {e}"))
        };
        self.power.set_next_boot(node, BootDevice::Pxe).await.map_err(|e| power_err("set next boot to PXE", e))?;
        let action = match self.power.status(node).await.map_err(|e| power_err("read the power state", e))? {
            PowerState::Off => PowerAction::On,
            PowerState::On | PowerState::Unknown => PowerAction::Cycle,
        };
        self.power.power(node, action).await.map_err(|e| power_err(&format!("power {action}"), e))?;
        tracing::info!(node = %host, %action, "machine booting into the installer; waiting for its callback");

        let remaining = expires_at.since(self.clock.now());
        let outcome = match timeout(&*self.clock, remaining, &mut rx).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) => {
                return Err(InstallError::new(format!(
                    "PXE install of {host} ({image}): superseded by a newer install of the same node"
                )));
            }
            // A callback may have landed just as the deadline passed.
            Err(_) => match rx.try_recv() {
                Ok(outcome) => outcome,
                Err(_) => {
                    self.registry.expire(&token);
                    Outcome::Expired
                }
            },
        };
        match outcome {
            Outcome::Done(host_key) => {
                tracing::info!(node = %host, image = %image, "PXE install done");
                Ok(Installed { host_key })
            }
            Outcome::Failed(reason) => Err(InstallError::new(format!(
                "PXE install of {host} ({image}) failed; the machine reported: {reason}"
            ))),
            Outcome::Expired => {
                tracing::warn!(node = %host, image = %image, ?ttl, "PXE install token expired without a callback");
                Err(InstallError::new(format!(
                    "PXE install of {host} ({image}): no callback from the machine within {ttl:?}; its install token expired"
                )))
            }
        }
    }
}
