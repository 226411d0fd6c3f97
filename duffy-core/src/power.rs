//! Switching machines on and off and choosing what they boot, as a trait.
//!
//! Implementations talk to BMCs (`duffy-backend-ipmi`) or simulate them
//! (`sim::SimFarm`). They must run one operation at a time per BMC and make
//! every operation idempotent: a retransmitted command may run twice.

use std::fmt;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::model::{Node, PowerState};

/// What to do with a machine's power.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PowerAction {
    /// Power on (no-op when on).
    On,
    /// Hard power off (no-op when off).
    Off,
    /// Off, then on.
    Cycle,
    /// Hard reset.
    Reset,
    /// Ask the OS to shut down (ACPI soft off).
    Soft,
}

impl PowerAction {
    /// Stable lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            PowerAction::On => "on",
            PowerAction::Off => "off",
            PowerAction::Cycle => "cycle",
            PowerAction::Reset => "reset",
            PowerAction::Soft => "soft",
        }
    }
}

impl fmt::Display for PowerAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a machine boots next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BootDevice {
    /// Network boot (PXE), to be installed.
    Pxe,
    /// The local disk.
    Disk,
}

impl fmt::Display for BootDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BootDevice::Pxe => "pxe",
            BootDevice::Disk => "disk",
        })
    }
}

/// The class of a power failure, so callers can decide what to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PowerErrorKind {
    /// The BMC refused the credentials (wrong password, unknown user).
    AuthFailed,
    /// Nothing answered (closed port, no route).
    Unreachable,
    /// The BMC answered at first, then stopped answering before the
    /// deadline.
    Timeout,
    /// The BMC said it is busy or out of sessions; try later.
    Busy,
    /// The BMC answered with an error for the command.
    BmcError,
    /// Duffy has no power configuration for this node.
    NotConfigured,
}

/// A power operation failed. `message` carries the BMC's own words and
/// never a password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind:?}: {message}")]
pub struct PowerError {
    /// The class.
    pub kind: PowerErrorKind,
    /// What happened, in the BMC's or tool's words.
    pub message: String,
}

impl PowerError {
    /// Builds an error.
    pub fn new(kind: PowerErrorKind, message: impl Into<String>) -> Self {
        PowerError { kind, message: message.into() }
    }
}

/// Power control of the farm's machines.
#[cfg_attr(feature = "mock", mockall::automock)]
#[async_trait]
pub trait PowerController: Send + Sync {
    /// The machine's power state as its BMC reports it.
    async fn status(&self, node: &Node) -> Result<PowerState, PowerError>;

    /// Applies a power action.
    async fn power(&self, node: &Node, action: PowerAction) -> Result<(), PowerError>;

    /// Sets the device the machine boots from next.
    async fn set_next_boot(&self, node: &Node, device: BootDevice) -> Result<(), PowerError>;
}
