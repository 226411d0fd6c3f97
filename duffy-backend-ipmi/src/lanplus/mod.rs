//! IPMI 2.0 RMCP+ ("lanplus") on the wire, without I/O: framing, session
//! packets, the messages of session setup, the commands Duffy sends, and the
//! cryptography of cipher suite 3.
//!
//! Written from the IPMI 2.0 specification (rev. 1.1): RMCP framing
//! (section 13.1), the IPMI v1.5 and v2.0/RMCP+ session headers (13.6,
//! 13.8), IPMI LAN messages (13.8, with checksums as in 5.x), Open Session
//! and RAKP messages (13.17 to 13.23), key derivation (13.31, 13.32) and
//! the commands of chapters 22 and 28. The transport that sends these bytes
//! is [`crate::native`].

pub mod codes;
pub mod commands;
pub mod crypto;
pub mod messages;
pub mod packet;

/// Why received bytes could not be understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Fewer bytes than the structure needs.
    #[error("{what} truncated: {len} bytes")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// How many bytes there were.
        len: usize,
    },
    /// Not an RMCP message of class IPMI.
    #[error("not an RMCP/IPMI packet")]
    NotRmcp,
    /// A checksum of an IPMI message did not add up.
    #[error("IPMI message checksum mismatch")]
    BadChecksum,
    /// The integrity code (HMAC-SHA1-96) did not match.
    #[error("integrity check failed")]
    BadAuthCode,
    /// The confidentiality pad was wrong (wrong key or corrupt data).
    #[error("bad confidentiality pad")]
    BadPadding,
    /// Some other field made no sense.
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
}

#[cfg(test)]
pub(crate) mod test_util {
    /// Bytes from a hex string (whitespace allowed); invalid digits panic,
    /// which is fine for literals in tests.
    pub fn hex(s: &str) -> Vec<u8> {
        let digits: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
        assert!(digits.len() % 2 == 0, "odd hex length");
        digits
            .chunks(2)
            .map(|p| {
                let s = std::str::from_utf8(p).unwrap_or("zz");
                u8::from_str_radix(s, 16).unwrap_or_else(|_| panic!("bad hex {s}"))
            })
            .collect()
    }
}
