//! The IPMI commands Duffy sends: their numbers, request data and the
//! parsing of their answers.

use duffy_core::model::PowerState;
use duffy_core::power::{BootDevice, PowerAction};

use super::DecodeError;

/// Network function Chassis.
pub const NETFN_CHASSIS: u8 = 0x00;
/// Network function Application.
pub const NETFN_APP: u8 = 0x06;

/// Get Channel Authentication Capabilities (App 0x38).
pub const CMD_GET_CHANNEL_AUTH_CAPABILITIES: u8 = 0x38;
/// Set Session Privilege Level (App 0x3B).
pub const CMD_SET_SESSION_PRIVILEGE: u8 = 0x3B;
/// Close Session (App 0x3C).
pub const CMD_CLOSE_SESSION: u8 = 0x3C;
/// Get Chassis Status (Chassis 0x01).
pub const CMD_GET_CHASSIS_STATUS: u8 = 0x01;
/// Chassis Control (Chassis 0x02).
pub const CMD_CHASSIS_CONTROL: u8 = 0x02;
/// Set System Boot Options (Chassis 0x08).
pub const CMD_SET_SYSTEM_BOOT_OPTIONS: u8 = 0x08;

/// Request data of Get Channel Authentication Capabilities: this channel
/// (0x0E) with the "IPMI v2.0 extended data" bit, for ADMINISTRATOR.
pub const CHANNEL_AUTH_CAPABILITIES_REQUEST: [u8; 2] = [0x8E, 0x04];

/// What Get Channel Authentication Capabilities says about RMCP+.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelAuthCapabilities {
    /// The channel number the BMC answered on.
    pub channel: u8,
    /// Whether the BMC accepts IPMI v2.0/RMCP+ sessions on this channel.
    pub ipmi_v2: bool,
}

impl ChannelAuthCapabilities {
    /// Parses the response data (after the completion code).
    pub fn decode(d: &[u8]) -> Result<Self, DecodeError> {
        if d.len() < 4 {
            return Err(DecodeError::Truncated { what: "Get Channel Authentication Capabilities", len: d.len() });
        }
        // Byte 2 bit 7: extended capabilities present; byte 4 bit 1: IPMI
        // v2.0 connections supported.
        let extended = d[1] & 0x80 != 0;
        Ok(ChannelAuthCapabilities { channel: d[0] & 0x0f, ipmi_v2: extended && d[3] & 0x02 != 0 })
    }
}

/// A Chassis Control request (IPMI 2.0 section 28.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChassisControl {
    /// Power down (hard off).
    PowerDown = 0,
    /// Power up.
    PowerUp = 1,
    /// Power cycle (off, a pause, on).
    PowerCycle = 2,
    /// Hard reset.
    HardReset = 3,
    /// Soft shutdown via ACPI.
    SoftShutdown = 5,
}

impl ChassisControl {
    /// The request data byte.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The word `ipmitool chassis power` uses for it.
    pub fn ipmitool_word(self) -> &'static str {
        match self {
            ChassisControl::PowerDown => "off",
            ChassisControl::PowerUp => "on",
            ChassisControl::PowerCycle => "cycle",
            ChassisControl::HardReset => "reset",
            ChassisControl::SoftShutdown => "soft",
        }
    }
}

/// What to send, if anything, to apply `action` to a machine whose power is
/// `current`, so that operations are idempotent: on when on and off (or
/// soft off) when off do nothing; cycle and reset of a machine that is off
/// power it on (the machine ends up running either way, and many BMCs refuse
/// to cycle or reset a machine that is off).
pub fn plan(action: PowerAction, current: PowerState) -> Option<ChassisControl> {
    let off = current == PowerState::Off;
    let on = current == PowerState::On;
    match action {
        PowerAction::On if on => None,
        PowerAction::On => Some(ChassisControl::PowerUp),
        PowerAction::Off | PowerAction::Soft if off => None,
        PowerAction::Off => Some(ChassisControl::PowerDown),
        PowerAction::Soft => Some(ChassisControl::SoftShutdown),
        PowerAction::Cycle | PowerAction::Reset if off => Some(ChassisControl::PowerUp),
        PowerAction::Cycle => Some(ChassisControl::PowerCycle),
        PowerAction::Reset => Some(ChassisControl::HardReset),
    }
}

/// The power state in Get Chassis Status response data (byte 1 bit 0:
/// system power is on).
pub fn decode_chassis_status(d: &[u8]) -> Result<PowerState, DecodeError> {
    let b = d.first().ok_or(DecodeError::Truncated { what: "Get Chassis Status", len: 0 })?;
    Ok(if b & 0x01 != 0 { PowerState::On } else { PowerState::Off })
}

/// Set System Boot Options, parameter 0 (set in progress): 1 to start a
/// change, 0 to complete it. BMCs that do not implement it answer an error,
/// which callers ignore.
pub fn boot_set_in_progress(in_progress: bool) -> Vec<u8> {
    vec![0x00, u8::from(in_progress)]
}

/// Set System Boot Options, parameter 4 (boot info acknowledge): clear the
/// BIOS/POST acknowledge bit so the BIOS reads the new flags.
pub fn boot_info_ack() -> Vec<u8> {
    vec![0x04, 0x01, 0x01]
}

/// Set System Boot Options, parameter 5 (boot flags): valid, for the next
/// boot only, legacy boot type, with the boot device selector (bits 5:2 of
/// the second byte) 1 = force PXE, 2 = force boot from default hard drive.
pub fn boot_flags(device: BootDevice) -> Vec<u8> {
    let selector: u8 = match device {
        BootDevice::Pxe => 0x1,
        BootDevice::Disk => 0x2,
    };
    vec![0x05, 0x80, selector << 2, 0x00, 0x00, 0x00]
}

/// The `ipmitool chassis bootdev` word for a boot device.
pub fn ipmitool_bootdev(device: BootDevice) -> &'static str {
    match device {
        BootDevice::Pxe => "pxe",
        BootDevice::Disk => "disk",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_flags_match_the_spec_and_ipmitool() {
        // ipmitool -vv `chassis bootdev pxe` sends 05 80 04 00 00 00.
        assert_eq!(boot_flags(BootDevice::Pxe), vec![0x05, 0x80, 0x04, 0, 0, 0]);
        assert_eq!(boot_flags(BootDevice::Disk), vec![0x05, 0x80, 0x08, 0, 0, 0]);
        assert_eq!(boot_info_ack(), vec![0x04, 0x01, 0x01]);
        assert_eq!(boot_set_in_progress(true), vec![0x00, 0x01]);
    }

    #[test]
    fn chassis_status_power_bit() {
        assert_eq!(decode_chassis_status(&[0x01, 0, 0]), Ok(PowerState::On));
        assert_eq!(decode_chassis_status(&[0x60, 0, 0]), Ok(PowerState::Off));
        assert_eq!(decode_chassis_status(&[0x21]), Ok(PowerState::On));
        assert!(decode_chassis_status(&[]).is_err());
    }

    #[test]
    fn channel_capabilities() {
        let caps = ChannelAuthCapabilities::decode(&[0x01, 0x96, 0x14, 0x02, 0, 0, 0, 0]);
        assert_eq!(caps, Ok(ChannelAuthCapabilities { channel: 1, ipmi_v2: true }));
        let v15 = ChannelAuthCapabilities::decode(&[0x01, 0x16, 0x14, 0x00, 0, 0, 0, 0]);
        assert_eq!(v15.map(|c| c.ipmi_v2), Ok(false));
        assert!(ChannelAuthCapabilities::decode(&[1, 2]).is_err());
    }

    #[test]
    fn plans_are_idempotent() {
        use ChassisControl::*;
        use PowerAction as A;
        use PowerState as S;
        assert_eq!(plan(A::On, S::On), None);
        assert_eq!(plan(A::On, S::Off), Some(PowerUp));
        assert_eq!(plan(A::On, S::Unknown), Some(PowerUp));
        assert_eq!(plan(A::Off, S::Off), None);
        assert_eq!(plan(A::Off, S::On), Some(PowerDown));
        assert_eq!(plan(A::Soft, S::Off), None);
        assert_eq!(plan(A::Soft, S::On), Some(SoftShutdown));
        assert_eq!(plan(A::Cycle, S::On), Some(PowerCycle));
        assert_eq!(plan(A::Cycle, S::Off), Some(PowerUp));
        assert_eq!(plan(A::Reset, S::On), Some(HardReset));
        assert_eq!(plan(A::Reset, S::Off), Some(PowerUp));
        assert_eq!(ChassisControl::SoftShutdown.code(), 5);
        assert_eq!(ChassisControl::PowerCycle.ipmitool_word(), "cycle");
    }
}
