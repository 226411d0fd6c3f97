//! The payloads of RMCP+ session setup: Open Session Request/Response and
//! RAKP messages 1 to 4 (IPMI 2.0 sections 13.17 to 13.23), for cipher
//! suite 3.

use super::DecodeError;

/// Authentication algorithm RAKP-HMAC-SHA1.
pub const AUTH_RAKP_HMAC_SHA1: u8 = 0x01;
/// Integrity algorithm HMAC-SHA1-96.
pub const INTEGRITY_HMAC_SHA1_96: u8 = 0x01;
/// Confidentiality algorithm AES-CBC-128.
pub const CONFIDENTIALITY_AES_CBC_128: u8 = 0x01;
/// Privilege level ADMINISTRATOR.
pub const PRIV_ADMINISTRATOR: u8 = 0x04;
/// RAKP 1 role bit: look the user up by name only (not name and role).
pub const NAME_ONLY_LOOKUP: u8 = 0x10;
/// The longest user name IPMI allows.
pub const MAX_USERNAME: usize = 16;

/// RMCP+ Open Session Request, proposing cipher suite 3.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenSessionRequest {
    /// Message tag, echoed by the BMC.
    pub tag: u8,
    /// Requested maximum privilege level (0: the highest the BMC allows).
    pub max_privilege: u8,
    /// The session ID the console chose; the BMC puts it in its packets.
    pub console_sid: u32,
}

impl OpenSessionRequest {
    /// The 32 payload bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut p = Vec::with_capacity(32);
        p.extend_from_slice(&[self.tag, self.max_privilege, 0, 0]);
        p.extend_from_slice(&self.console_sid.to_le_bytes());
        for (kind, alg) in [(0u8, AUTH_RAKP_HMAC_SHA1), (1, INTEGRITY_HMAC_SHA1_96), (2, CONFIDENTIALITY_AES_CBC_128)] {
            // Payload type, reserved (2), payload length 8, algorithm, reserved (3).
            p.extend_from_slice(&[kind, 0, 0, 8, alg, 0, 0, 0]);
        }
        p
    }
}

/// RMCP+ Open Session Response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenSessionResponse {
    /// Message tag of the request.
    pub tag: u8,
    /// RMCP+ status code (0: session created).
    pub status: u8,
    /// The console's session ID.
    pub console_sid: u32,
    /// The session ID the BMC chose (0 on error).
    pub bmc_sid: u32,
    /// Authentication, integrity and confidentiality algorithms chosen, when
    /// the status is 0.
    pub algorithms: Option<[u8; 3]>,
}

impl OpenSessionResponse {
    /// Parses the payload. With an error status the BMC may send as little
    /// as the tag and the status (ipmi_sim does); missing IDs read as 0.
    pub fn decode(p: &[u8]) -> Result<Self, DecodeError> {
        let (tag, status) = tag_and_status(p, "Open Session Response")?;
        if status != 0 {
            let console_sid = le32_at(p, 4).unwrap_or(0);
            let bmc_sid = le32_at(p, 8).unwrap_or(0);
            return Ok(OpenSessionResponse { tag, status, console_sid, bmc_sid, algorithms: None });
        }
        if p.len() < 36 {
            return Err(DecodeError::Truncated { what: "Open Session Response", len: p.len() });
        }
        Ok(OpenSessionResponse {
            tag,
            status,
            console_sid: le32_at(p, 4).unwrap_or(0),
            bmc_sid: le32_at(p, 8).unwrap_or(0),
            algorithms: Some([p[16] & 0x3f, p[24] & 0x3f, p[32] & 0x3f]),
        })
    }
}

/// RAKP Message 1: the console's random number and user name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rakp1<'a> {
    /// Message tag.
    pub tag: u8,
    /// The BMC's session ID.
    pub bmc_sid: u32,
    /// The console's random number (Rm).
    pub console_rand: [u8; 16],
    /// Requested role byte, with [`NAME_ONLY_LOOKUP`] or not.
    pub role: u8,
    /// User name, at most [`MAX_USERNAME`] bytes.
    pub username: &'a [u8],
}

impl Rakp1<'_> {
    /// The payload bytes (28 + user name length).
    pub fn encode(&self) -> Vec<u8> {
        let name = &self.username[..self.username.len().min(MAX_USERNAME)];
        let mut p = Vec::with_capacity(28 + name.len());
        p.extend_from_slice(&[self.tag, 0, 0, 0]);
        p.extend_from_slice(&self.bmc_sid.to_le_bytes());
        p.extend_from_slice(&self.console_rand);
        p.extend_from_slice(&[self.role, 0, 0, name.len() as u8]);
        p.extend_from_slice(name);
        p
    }
}

/// RAKP Message 2: the BMC's random number, GUID and proof it knows the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rakp2 {
    /// Message tag.
    pub tag: u8,
    /// RMCP+ status code.
    pub status: u8,
    /// The console's session ID.
    pub console_sid: u32,
    /// The BMC's random number (Rc).
    pub bmc_rand: [u8; 16],
    /// The BMC's GUID.
    pub bmc_guid: [u8; 16],
    /// Key exchange authentication code (20 bytes for HMAC-SHA1).
    pub auth_code: Vec<u8>,
}

impl Rakp2 {
    /// Parses the payload. With an error status the BMC may send as little
    /// as the tag and the status; a missing ID reads as 0.
    pub fn decode(p: &[u8]) -> Result<Self, DecodeError> {
        let (tag, status) = tag_and_status(p, "RAKP 2")?;
        let mut m = Rakp2 {
            tag,
            status,
            console_sid: le32_at(p, 4).unwrap_or(0),
            bmc_rand: [0; 16],
            bmc_guid: [0; 16],
            auth_code: Vec::new(),
        };
        if m.status != 0 {
            return Ok(m);
        }
        if p.len() < 40 {
            return Err(DecodeError::Truncated { what: "RAKP 2", len: p.len() });
        }
        m.bmc_rand.copy_from_slice(&p[8..24]);
        m.bmc_guid.copy_from_slice(&p[24..40]);
        m.auth_code = p[40..].to_vec();
        Ok(m)
    }
}

/// RAKP Message 3: the console's proof it knows the key, or an error status
/// telling the BMC to drop the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rakp3 {
    /// Message tag.
    pub tag: u8,
    /// RMCP+ status code (0, or why the console gives up).
    pub status: u8,
    /// The BMC's session ID.
    pub bmc_sid: u32,
    /// Key exchange authentication code (empty with an error status).
    pub auth_code: Vec<u8>,
}

impl Rakp3 {
    /// The payload bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut p = Vec::with_capacity(8 + self.auth_code.len());
        p.extend_from_slice(&[self.tag, self.status, 0, 0]);
        p.extend_from_slice(&self.bmc_sid.to_le_bytes());
        p.extend_from_slice(&self.auth_code);
        p
    }
}

/// RAKP Message 4: the BMC's integrity check value over the new session key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rakp4 {
    /// Message tag.
    pub tag: u8,
    /// RMCP+ status code.
    pub status: u8,
    /// The console's session ID.
    pub console_sid: u32,
    /// Integrity check value (12 bytes for HMAC-SHA1-96).
    pub integrity_check: Vec<u8>,
}

impl Rakp4 {
    /// Parses the payload. With an error status the BMC may send as little
    /// as the tag and the status; a missing ID reads as 0.
    pub fn decode(p: &[u8]) -> Result<Self, DecodeError> {
        let (tag, status) = tag_and_status(p, "RAKP 4")?;
        if status == 0 && p.len() < 8 {
            return Err(DecodeError::Truncated { what: "RAKP 4", len: p.len() });
        }
        Ok(Rakp4 {
            tag,
            status,
            console_sid: le32_at(p, 4).unwrap_or(0),
            integrity_check: p.get(8..).unwrap_or_default().to_vec(),
        })
    }
}

fn tag_and_status(p: &[u8], what: &'static str) -> Result<(u8, u8), DecodeError> {
    match p {
        [tag, status, ..] => Ok((*tag, *status)),
        _ => Err(DecodeError::Truncated { what, len: p.len() }),
    }
}

fn le32_at(p: &[u8], at: usize) -> Option<u32> {
    let b = p.get(at..at + 4)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lanplus::test_util::hex;

    #[test]
    fn open_session_request_layout() {
        let p = OpenSessionRequest { tag: 7, max_privilege: 4, console_sid: 0xa0a2_a3a4 }.encode();
        assert_eq!(
            p,
            hex("07 04 0000 a4a3a2a0 \
                 00 0000 08 01 000000 \
                 01 0000 08 01 000000 \
                 02 0000 08 01 000000")
        );
    }

    #[test]
    fn open_session_response_ok_and_error() {
        let ok = hex("07 00 04 00 a4a3a2a0 820a0000 \
             00 0000 08 01 000000 01 0000 08 01 000000 02 0000 08 01 000000");
        let r = OpenSessionResponse::decode(&ok).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((r.tag, r.status, r.console_sid, r.bmc_sid), (7, 0, 0xa0a2_a3a4, 0xa82));
        assert_eq!(r.algorithms, Some([1, 1, 1]));
        // "Insufficient resources": the BMC may stop after the console's ID,
        // or (ipmi_sim) right after the status.
        let busy = hex("07 01 00 00 a4a3a2a0");
        let r = OpenSessionResponse::decode(&busy).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((r.status, r.console_sid, r.algorithms), (1, 0xa0a2_a3a4, None));
        let r = OpenSessionResponse::decode(&hex("25 01")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((r.tag, r.status, r.console_sid), (0x25, 1, 0));
        assert!(OpenSessionResponse::decode(&ok[..20]).is_err());
        assert!(OpenSessionResponse::decode(&busy[..1]).is_err());
    }

    #[test]
    fn rakp1_layout() {
        let p = Rakp1 {
            tag: 1,
            bmc_sid: 0xa82,
            console_rand: hex("e1ac73304d4aa6856c373d6241cb351e").try_into().unwrap_or_default(),
            role: PRIV_ADMINISTRATOR | NAME_ONLY_LOOKUP,
            username: b"admin0",
        }
        .encode();
        assert_eq!(p, hex("01 000000 820a0000 e1ac73304d4aa6856c373d6241cb351e 14 0000 06 61646d696e30"));
    }

    #[test]
    fn rakp2_and_rakp4_decode() {
        let p = hex("01 00 0000 a4a3a2a0 5f91b32bd54ba6afdfbbb1ba53df25c4 a123456789abcdefa123456789ab3f1e \
             f5565c4d93e27e949a363ef327b54722986fe154");
        let m = Rakp2::decode(&p).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((m.tag, m.status, m.console_sid), (1, 0, 0xa0a2_a3a4));
        assert_eq!(m.bmc_rand.to_vec(), hex("5f91b32bd54ba6afdfbbb1ba53df25c4"));
        assert_eq!(m.bmc_guid.to_vec(), hex("a123456789abcdefa123456789ab3f1e"));
        assert_eq!(m.auth_code.len(), 20);
        let err = Rakp2::decode(&hex("01 0d 0000 a4a3a2a0")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(err.status, 0x0d);
        let err = Rakp2::decode(&hex("01 0d")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((err.status, err.console_sid), (0x0d, 0));
        assert!(Rakp2::decode(&p[..30]).is_err());
        assert!(Rakp2::decode(&p[..1]).is_err());

        let m = Rakp4::decode(&hex("01 00 0000 a4a3a2a0 ef3e2339e7a264b3cbee939e")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((m.status, m.console_sid, m.integrity_check.len()), (0, 0xa0a2_a3a4, 12));
        assert_eq!(Rakp4::decode(&hex("01 0f")).map(|m| m.status), Ok(0x0f));
        assert!(Rakp4::decode(&hex("01 00 0000")).is_err());
    }

    #[test]
    fn rakp3_layout() {
        let p = Rakp3 { tag: 2, status: 0, bmc_sid: 0xa82, auth_code: vec![0xaa; 20] }.encode();
        assert_eq!(p.len(), 28);
        assert_eq!(&p[..8], &hex("02 00 0000 820a0000")[..]);
        let abort = Rakp3 { tag: 2, status: 0x0f, bmc_sid: 0xa82, auth_code: vec![] }.encode();
        assert_eq!(abort, hex("02 0f 0000 820a0000"));
    }
}
