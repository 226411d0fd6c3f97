//! Power control of Duffy's machines over IPMI 2.0.
//!
//! Two drivers implement [`duffy_core::power::PowerController`]:
//!
//! - [`NativeDriver`], a built-in RMCP+ ("lanplus") client over UDP, cipher
//!   suite 3 (RAKP-HMAC-SHA1, HMAC-SHA1-96, AES-CBC-128), written from the
//!   IPMI 2.0 specification ([`lanplus`] has the wire format, [`native`] the
//!   sessions and retransmission);
//! - [`IpmitoolDriver`], which runs `ipmitool -I lanplus -C 3`, for BMCs the
//!   native driver does not handle.
//!
//! [`IpmiPowerController`] maps each node to its [`BmcConfig`] (read with
//! serde from an [`IpmiConfig`]) and runs the driver the configuration names.
//! Every driver runs one operation at a time per BMC ([`BmcLocks`]), bounds
//! each operation by a deadline, makes power actions idempotent, classifies
//! failures into [`duffy_core::power::PowerErrorKind`] with the BMC's own
//! words, and never logs or returns a password.

pub mod config;
pub mod controller;
pub mod ipmitool;
pub mod lanplus;
pub mod locks;
pub mod native;

pub use config::{BmcConfig, BmcDefaults, BmcEntry, BmcInventory, ConfigError, Driver, IpmiConfig, Secret};
pub use controller::{BmcDriver, IpmiPowerController};
pub use ipmitool::IpmitoolDriver;
pub use locks::BmcLocks;
pub use native::{NativeDriver, NativeError, Session};
