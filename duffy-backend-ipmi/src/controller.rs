//! The [`PowerController`] Duffy uses: each node's BMC from the inventory,
//! through the driver its configuration names.

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use duffy_core::model::{Node, PowerState};
use duffy_core::power::{BootDevice, PowerAction, PowerController, PowerError, PowerErrorKind};

use crate::config::{BmcConfig, BmcInventory, Driver};
use crate::ipmitool::IpmitoolDriver;
use crate::locks::BmcLocks;
use crate::native::NativeDriver;

/// Operations on one BMC given its configuration, as both drivers offer
/// them. Each runs alone on its BMC (see [`BmcLocks`]), is bounded by
/// [`BmcConfig::deadline`] and is idempotent: power actions read the power
/// state first and send nothing when the machine is already where the
/// action leads (see [`crate::lanplus::commands::plan`]).
#[async_trait]
pub trait BmcDriver: Send + Sync {
    /// The machine's power state as the BMC reports it.
    async fn status(&self, bmc: &BmcConfig) -> Result<PowerState, PowerError>;

    /// Applies a power action.
    async fn power(&self, bmc: &BmcConfig, action: PowerAction) -> Result<(), PowerError>;

    /// Sets the device the machine boots from next (next boot only).
    async fn set_next_boot(&self, bmc: &BmcConfig, device: BootDevice) -> Result<(), PowerError>;
}

/// The BMC of `node` in `inventory`, or [`PowerErrorKind::NotConfigured`].
pub(crate) fn lookup<'a>(inventory: &'a BmcInventory, node: &Node) -> Result<&'a BmcConfig, PowerError> {
    inventory.get(&node.hostname).ok_or_else(|| {
        PowerError::new(PowerErrorKind::NotConfigured, format!("no IPMI configuration for node {}", node.hostname))
    })
}

/// Implements [`PowerController`](duffy_core::PowerController) for a
/// [`BmcDriver`] with an `inventory` field: look the node's BMC up, then run
/// the driver's operation (a node with no BMC is `NotConfigured`).
macro_rules! power_controller_by_inventory {
    ($driver:ty) => {
        #[async_trait::async_trait]
        impl duffy_core::PowerController for $driver {
            async fn status(&self, node: &duffy_core::Node) -> Result<duffy_core::PowerState, duffy_core::PowerError> {
                $crate::controller::BmcDriver::status(self, $crate::controller::lookup(&self.inventory, node)?).await
            }

            async fn power(
                &self,
                node: &duffy_core::Node,
                action: duffy_core::PowerAction,
            ) -> Result<(), duffy_core::PowerError> {
                $crate::controller::BmcDriver::power(self, $crate::controller::lookup(&self.inventory, node)?, action)
                    .await
            }

            async fn set_next_boot(
                &self,
                node: &duffy_core::Node,
                device: duffy_core::BootDevice,
            ) -> Result<(), duffy_core::PowerError> {
                $crate::controller::BmcDriver::set_next_boot(
                    self,
                    $crate::controller::lookup(&self.inventory, node)?,
                    device,
                )
                .await
            }
        }
    };
}
pub(crate) use power_controller_by_inventory;

/// Power control of the farm over IPMI: maps a node (by host name) to its
/// [`BmcConfig`] and runs the operation with the configured [`Driver`].
/// Both drivers share one set of [`BmcLocks`].
#[derive(Debug, Clone)]
pub struct IpmiPowerController {
    inventory: Arc<BmcInventory>,
    native: NativeDriver,
    ipmitool: IpmitoolDriver,
}

impl IpmiPowerController {
    /// A controller for the nodes of `inventory`.
    pub fn new(inventory: BmcInventory) -> Self {
        let inventory = Arc::new(inventory);
        let locks = BmcLocks::new();
        IpmiPowerController {
            native: NativeDriver::new(inventory.clone()).with_locks(locks.clone()),
            ipmitool: IpmitoolDriver::new(inventory.clone()).with_locks(locks),
            inventory,
        }
    }

    /// Runs this program instead of `ipmitool` from `PATH`.
    pub fn with_ipmitool_program(mut self, program: impl Into<PathBuf>) -> Self {
        self.ipmitool = self.ipmitool.with_program(program);
        self
    }

    /// The nodes and their BMCs.
    pub fn inventory(&self) -> &BmcInventory {
        &self.inventory
    }

    fn route(&self, node: &Node) -> Result<(&BmcConfig, &dyn BmcDriver), PowerError> {
        let bmc = lookup(&self.inventory, node)?;
        let driver: &dyn BmcDriver = match bmc.driver {
            Driver::Native => &self.native,
            Driver::Ipmitool => &self.ipmitool,
        };
        Ok((bmc, driver))
    }
}

#[async_trait]
impl PowerController for IpmiPowerController {
    async fn status(&self, node: &Node) -> Result<PowerState, PowerError> {
        let (bmc, driver) = self.route(node)?;
        driver.status(bmc).await
    }

    async fn power(&self, node: &Node, action: PowerAction) -> Result<(), PowerError> {
        let (bmc, driver) = self.route(node)?;
        driver.power(bmc, action).await
    }

    async fn set_next_boot(&self, node: &Node, device: BootDevice) -> Result<(), PowerError> {
        let (bmc, driver) = self.route(node)?;
        driver.set_next_boot(bmc, device).await
    }
}
