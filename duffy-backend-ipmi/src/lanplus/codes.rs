//! The specification's words for IPMI completion codes and RMCP+ status
//! codes, so errors carry what the BMC said.

/// The text of an IPMI completion code (IPMI 2.0 table 5-2). Codes 0x80 to
/// 0x88 are command-specific; their text here is the meaning for the session
/// commands this crate sends (Set Session Privilege Level, Close Session).
pub fn completion_code_text(code: u8) -> &'static str {
    match code {
        0x00 => "command completed normally",
        0x80 => "requested privilege level not available for this user",
        0x81 => "requested privilege level exceeds the channel or user limit",
        0x82 => "cannot disable user level authentication",
        0x87 => "invalid session ID",
        0x88 => "invalid session handle",
        0xC0 => "node busy",
        0xC1 => "invalid command",
        0xC2 => "command invalid for given LUN",
        0xC3 => "timeout while processing command",
        0xC4 => "out of space",
        0xC5 => "reservation canceled or invalid reservation ID",
        0xC6 => "request data truncated",
        0xC7 => "request data length invalid",
        0xC8 => "request data field length limit exceeded",
        0xC9 => "parameter out of range",
        0xCA => "cannot return number of requested data bytes",
        0xCB => "requested sensor, data, or record not present",
        0xCC => "invalid data field in request",
        0xCD => "command illegal for specified sensor or record type",
        0xCE => "command response could not be provided",
        0xCF => "cannot execute duplicated request",
        0xD0 => "SDR repository in update mode",
        0xD1 => "device in firmware update mode",
        0xD2 => "BMC initialization or initialization agent in progress",
        0xD3 => "destination unavailable",
        0xD4 => "insufficient privilege level",
        0xD5 => "command not supported in present state",
        0xD6 => "command sub-function has been disabled or is unavailable",
        0xFF => "unspecified error",
        0x01..=0x7E => "OEM completion code",
        _ => "command-specific completion code",
    }
}

/// The text of an RMCP+ status code, as found in Open Session and RAKP
/// messages (IPMI 2.0 table 13-15).
pub fn rmcp_status_text(code: u8) -> &'static str {
    match code {
        0x00 => "no errors",
        0x01 => "insufficient resources to create a session",
        0x02 => "invalid session ID",
        0x03 => "invalid payload type",
        0x04 => "invalid authentication algorithm",
        0x05 => "invalid integrity algorithm",
        0x06 => "no matching authentication payload",
        0x07 => "no matching integrity payload",
        0x08 => "inactive session ID",
        0x09 => "invalid role",
        0x0A => "unauthorized role or privilege level requested",
        0x0B => "insufficient resources to create a session at the requested role",
        0x0C => "invalid name length",
        0x0D => "unauthorized name",
        0x0E => "unauthorized GUID",
        0x0F => "invalid integrity check value",
        0x10 => "invalid confidentiality algorithm",
        0x11 => "no cipher suite match with proposed security algorithms",
        0x12 => "illegal or unrecognized parameter",
        _ => "reserved status code",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts() {
        assert_eq!(completion_code_text(0xFF), "unspecified error");
        assert_eq!(completion_code_text(0xD4), "insufficient privilege level");
        assert_eq!(completion_code_text(0xC0), "node busy");
        assert_eq!(rmcp_status_text(0x0D), "unauthorized name");
        assert_eq!(rmcp_status_text(0x01), "insufficient resources to create a session");
        assert_eq!(rmcp_status_text(0x42), "reserved status code");
    }
}
