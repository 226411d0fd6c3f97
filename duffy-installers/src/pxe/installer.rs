//! [`PxeInstaller`]: the [`Installer`] that installs by PXE.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use duffy_core::tickets::{Settle, TicketId, TicketOutcome, TicketState};
use duffy_core::time::timeout;
use duffy_core::{
    BootDevice, Clock, InstallError, Installed, Installer, Node, PoolKey, PowerAction, PowerController, PowerState,
};

use super::PxeConfig;
use super::registry::*;

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
/// settled its ticket (took the outcome, or made it a tombstone).
struct PendingGuard {
    registry: Arc<PxeRegistry>,
    hostname: String,
    id: TicketId,
    settled: bool,
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        if self.settled {
            self.registry.forget(&self.id);
        } else {
            self.registry.cancel(&self.hostname, &self.id);
        }
    }
}

/// How a wait for a ticket ended.
enum Waited {
    /// The ticket settled as this (never `Pending`).
    Settled(TicketState),
    /// The ticket is gone: a newer install of the node replaced it.
    Replaced,
}

impl PxeInstaller {
    /// Reads the ticket until it is no longer pending: every
    /// `poll_interval`, and at once when a callback for it lands in this
    /// process. A store error is logged and the read tried again (the
    /// caller's deadline bounds the wait).
    async fn wait_for(&self, host: &str, id: &TicketId, wake: &tokio::sync::Notify) -> Waited {
        let poll = self.registry.poll_interval();
        loop {
            match self.registry.settle(host, id, Settle::Poll).await {
                Ok(Some(TicketState::Pending)) => {}
                Ok(Some(state)) => return Waited::Settled(state),
                Ok(None) => return Waited::Replaced,
                Err(e) => tracing::warn!(node = %host, error = %e, "cannot read the install's ticket; trying again"),
            }
            // A wake-up sent since the read above is kept by the `Notify`
            // (`notify_one`), so none is lost between the read and here.
            tokio::select! {
                () = wake.notified() => {}
                () = self.clock.sleep_until(self.clock.now().plus(poll)) => {}
            }
        }
    }
}

#[async_trait]
impl Installer for PxeInstaller {
    async fn install(&self, node: &Node, image: &PoolKey) -> Result<Installed, InstallError> {
        let host = &node.hostname;
        let ttl = self.token_ttl;
        let expires_at = self.clock.now().plus(ttl);
        let waiting =
            self.registry.register(node, image, expires_at).await.map_err(|e| InstallError::new(e.to_string()))?;
        let mut guard = PendingGuard {
            registry: self.registry.clone(),
            hostname: host.clone(),
            id: waiting.id.clone(),
            settled: false,
        };
        tracing::info!(node = %host, image = %image, ticket = %waiting.id, expires_at = %expires_at,
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
        let waited = match timeout(&*self.clock, remaining, self.wait_for(host, &waiting.id, &waiting.wake)).await {
            Ok(w) => w,
            // Time is up: the ticket becomes a tombstone, unless a callback
            // landed just as the deadline passed (then that is the outcome).
            Err(_) => match self.registry.settle(host, &waiting.id, Settle::Expire).await {
                Ok(Some(state)) => Waited::Settled(state),
                Ok(None) => Waited::Replaced,
                Err(e) => {
                    return Err(InstallError::new(format!(
                        "PXE install of {host} ({image}): no callback from the machine within {ttl:?}, and its \
                         ticket could not be expired: {e}"
                    )));
                }
            },
        };
        guard.settled = true;
        match waited {
            Waited::Settled(TicketState::Used(TicketOutcome::Done { host_key })) => {
                tracing::info!(node = %host, image = %image, "PXE install done");
                Ok(Installed { host_key })
            }
            Waited::Settled(TicketState::Used(TicketOutcome::Failed { reason })) => Err(InstallError::new(format!(
                "PXE install of {host} ({image}) failed; the machine reported: {reason}"
            ))),
            Waited::Settled(TicketState::Expired | TicketState::Pending) => {
                tracing::warn!(node = %host, image = %image, ?ttl, "PXE install token expired without a callback");
                Err(InstallError::new(format!(
                    "PXE install of {host} ({image}): no callback from the machine within {ttl:?}; its install token expired"
                )))
            }
            Waited::Replaced => Err(InstallError::new(format!(
                "PXE install of {host} ({image}): superseded by a newer install of the same node"
            ))),
        }
    }
}
