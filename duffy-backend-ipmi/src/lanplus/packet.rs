//! Packet framing: RMCP header, IPMI v1.5 and v2.0 (RMCP+) session
//! wrappers, IPMI LAN request and response messages.

use super::DecodeError;
use super::crypto::{INTEGRITY_LEN, SessionKeys};

/// RMCP header for IPMI: version 6, reserved, sequence 0xFF (no RMCP ACK),
/// class 7 (IPMI).
pub const RMCP_IPMI: [u8; 4] = [0x06, 0x00, 0xFF, 0x07];
/// Session authentication type "none" (IPMI v1.5 framing, before a session).
pub const AUTH_TYPE_NONE: u8 = 0x00;
/// Session authentication type "RMCP+" (IPMI v2.0 framing).
pub const AUTH_TYPE_RMCP_PLUS: u8 = 0x06;
/// The BMC's IPMB slave address, the responder of every request.
pub const BMC_ADDR: u8 = 0x20;
/// The remote console's software ID, the requester.
pub const CONSOLE_SWID: u8 = 0x81;
/// The Next Header byte of the integrity trailer.
const NEXT_HEADER: u8 = 0x07;
/// Payload-type flag: the payload is encrypted.
const FLAG_ENCRYPTED: u8 = 0x80;
/// Payload-type flag: the packet carries an integrity trailer.
const FLAG_AUTHENTICATED: u8 = 0x40;

/// RMCP+ payload types used by this crate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadType {
    /// An IPMI message.
    Ipmi = 0x00,
    /// RMCP+ Open Session Request.
    OpenSessionRequest = 0x10,
    /// RMCP+ Open Session Response.
    OpenSessionResponse = 0x11,
    /// RAKP Message 1.
    Rakp1 = 0x12,
    /// RAKP Message 2.
    Rakp2 = 0x13,
    /// RAKP Message 3.
    Rakp3 = 0x14,
    /// RAKP Message 4.
    Rakp4 = 0x15,
}

impl PayloadType {
    /// The payload type for its 6-bit wire value.
    pub fn from_wire(v: u8) -> Option<Self> {
        Some(match v & 0x3f {
            0x00 => PayloadType::Ipmi,
            0x10 => PayloadType::OpenSessionRequest,
            0x11 => PayloadType::OpenSessionResponse,
            0x12 => PayloadType::Rakp1,
            0x13 => PayloadType::Rakp2,
            0x14 => PayloadType::Rakp3,
            0x15 => PayloadType::Rakp4,
            _ => return None,
        })
    }
}

/// The IPMI checksum: the two's complement of the byte sum, so that the
/// bytes and their checksum add up to zero (mod 256).
pub fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b)).wrapping_neg()
}

/// An IPMI request from the remote console to the BMC (LUN 0 both sides).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Network function (even: a request).
    pub netfn: u8,
    /// Command number.
    pub cmd: u8,
    /// Request sequence number (6 bits), echoed in the response.
    pub rq_seq: u8,
    /// Request data.
    pub data: Vec<u8>,
}

impl Request {
    /// The LAN message bytes: rsAddr, netFn/rsLUN, checksum, rqAddr,
    /// rqSeq/rqLUN, cmd, data, checksum.
    pub fn encode(&self) -> Vec<u8> {
        let mut m = Vec::with_capacity(7 + self.data.len());
        m.push(BMC_ADDR);
        m.push(self.netfn << 2);
        m.push(checksum(&m[0..2]));
        m.push(CONSOLE_SWID);
        m.push((self.rq_seq & 0x3f) << 2);
        m.push(self.cmd);
        m.extend_from_slice(&self.data);
        m.push(checksum(&m[3..]));
        m
    }

    /// Whether `resp` answers this request (same command, response netfn,
    /// same sequence number).
    pub fn is_answered_by(&self, resp: &Response) -> bool {
        resp.netfn == (self.netfn | 1) && resp.cmd == self.cmd && resp.rq_seq == (self.rq_seq & 0x3f)
    }
}

/// An IPMI response from the BMC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Network function (odd: a response).
    pub netfn: u8,
    /// Command number.
    pub cmd: u8,
    /// The request's sequence number.
    pub rq_seq: u8,
    /// Completion code (0 = success).
    pub completion: u8,
    /// Response data after the completion code.
    pub data: Vec<u8>,
}

impl Response {
    /// Parses a LAN response message and checks both checksums.
    pub fn decode(m: &[u8]) -> Result<Self, DecodeError> {
        if m.len() < 8 {
            return Err(DecodeError::Truncated { what: "IPMI response", len: m.len() });
        }
        if checksum(&m[0..2]) != m[2] || checksum(&m[3..m.len() - 1]) != m[m.len() - 1] {
            return Err(DecodeError::BadChecksum);
        }
        Ok(Response {
            netfn: m[1] >> 2,
            cmd: m[5],
            rq_seq: m[4] >> 2,
            completion: m[6],
            data: m[7..m.len() - 1].to_vec(),
        })
    }
}

/// Wraps an IPMI message in RMCP and an IPMI v1.5 session header without
/// authentication (used before a session, for Get Channel Authentication
/// Capabilities).
pub fn encode_v15(message: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(14 + message.len());
    p.extend_from_slice(&RMCP_IPMI);
    p.push(AUTH_TYPE_NONE);
    p.extend_from_slice(&[0; 4]); // session sequence number
    p.extend_from_slice(&[0; 4]); // session ID
    p.push(message.len().min(255) as u8);
    p.extend_from_slice(message);
    p
}

/// The IPMI message of an IPMI v1.5 packet without authentication.
pub fn decode_v15(p: &[u8]) -> Result<&[u8], DecodeError> {
    check_rmcp(p)?;
    if p.len() < 14 {
        return Err(DecodeError::Truncated { what: "IPMI v1.5 session header", len: p.len() });
    }
    if p[4] != AUTH_TYPE_NONE {
        return Err(DecodeError::Malformed("IPMI v1.5 packet with authentication"));
    }
    let len = usize::from(p[13]);
    p.get(14..14 + len).ok_or(DecodeError::Truncated { what: "IPMI v1.5 message", len: p.len() - 14 })
}

fn check_rmcp(p: &[u8]) -> Result<(), DecodeError> {
    if p.len() < 4 || p[0] != 0x06 || p[3] & 0x1f != 0x07 {
        return Err(DecodeError::NotRmcp);
    }
    Ok(())
}

/// Wraps a payload in RMCP and an RMCP+ session header, unauthenticated and
/// unencrypted (Open Session and RAKP messages: session ID and sequence 0).
pub fn encode_v20_clear(payload_type: PayloadType, payload: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(16 + payload.len());
    p.extend_from_slice(&RMCP_IPMI);
    p.push(AUTH_TYPE_RMCP_PLUS);
    p.push(payload_type as u8);
    p.extend_from_slice(&0u32.to_le_bytes());
    p.extend_from_slice(&0u32.to_le_bytes());
    p.extend_from_slice(&(payload.len().min(u16::MAX as usize) as u16).to_le_bytes());
    p.extend_from_slice(payload);
    p
}

/// Wraps an IPMI payload for an active session: encrypted with AES-CBC-128
/// under `iv`, followed by the integrity pad, pad length, Next Header and
/// the HMAC-SHA1-96 code over everything after the RMCP header.
pub fn encode_v20_secure(keys: &SessionKeys, session_id: u32, seq: u32, iv: &[u8; 16], payload: &[u8]) -> Vec<u8> {
    let body = keys.encrypt(iv, payload);
    let mut p = Vec::with_capacity(16 + body.len() + 4 + 2 + INTEGRITY_LEN);
    p.extend_from_slice(&RMCP_IPMI);
    p.push(AUTH_TYPE_RMCP_PLUS);
    p.push(FLAG_ENCRYPTED | FLAG_AUTHENTICATED | PayloadType::Ipmi as u8);
    p.extend_from_slice(&session_id.to_le_bytes());
    p.extend_from_slice(&seq.to_le_bytes());
    p.extend_from_slice(&(body.len().min(u16::MAX as usize) as u16).to_le_bytes());
    p.extend_from_slice(&body);
    let pad = integrity_pad_len(p.len() - RMCP_IPMI.len());
    p.extend(std::iter::repeat_n(0xFF, pad));
    p.push(pad as u8);
    p.push(NEXT_HEADER);
    let code = keys.auth_code(&p[RMCP_IPMI.len()..]);
    p.extend_from_slice(&code);
    p
}

/// How many 0xFF bytes pad a session packet of `len` bytes (from the
/// authentication type through the payload) so that, with the pad length
/// and Next Header bytes, it is a multiple of four bytes long.
pub fn integrity_pad_len(len: usize) -> usize {
    (4 - (len + 2) % 4) % 4
}

/// A received RMCP+ packet, checked and decrypted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inbound {
    /// The payload type, or `None` for one this crate does not know.
    pub payload_type: Option<PayloadType>,
    /// The session ID in the header (the console's, inside a session).
    pub session_id: u32,
    /// The BMC's session sequence number.
    pub seq: u32,
    /// Whether the packet carried a valid integrity code.
    pub authenticated: bool,
    /// The payload, decrypted when it was encrypted.
    pub payload: Vec<u8>,
}

/// Parses an RMCP+ packet. With `keys`, an authenticated packet's integrity
/// code is checked and an encrypted payload decrypted; without them such a
/// packet is refused.
pub fn decode_v20(p: &[u8], keys: Option<&SessionKeys>) -> Result<Inbound, DecodeError> {
    check_rmcp(p)?;
    if p.len() < 16 {
        return Err(DecodeError::Truncated { what: "RMCP+ session header", len: p.len() });
    }
    if p[4] != AUTH_TYPE_RMCP_PLUS {
        return Err(DecodeError::Malformed("not an RMCP+ session packet"));
    }
    let flags = p[5];
    if flags & 0x3f == 0x02 {
        return Err(DecodeError::Malformed("OEM payload"));
    }
    let session_id = u32::from_le_bytes([p[6], p[7], p[8], p[9]]);
    let seq = u32::from_le_bytes([p[10], p[11], p[12], p[13]]);
    let len = usize::from(u16::from_le_bytes([p[14], p[15]]));
    let body = p.get(16..16 + len).ok_or(DecodeError::Truncated { what: "RMCP+ payload", len: p.len() - 16 })?;
    let authenticated = flags & FLAG_AUTHENTICATED != 0;
    let encrypted = flags & FLAG_ENCRYPTED != 0;
    if authenticated || encrypted {
        let keys = keys.ok_or(DecodeError::Malformed("authenticated packet outside a session"))?;
        if !authenticated {
            return Err(DecodeError::Malformed("encrypted packet without integrity"));
        }
        let end = 16 + len;
        let pad = integrity_pad_len(end - 4);
        let trailer_end = end + pad + 2;
        if p.len() != trailer_end + INTEGRITY_LEN {
            return Err(DecodeError::Truncated { what: "integrity trailer", len: p.len().saturating_sub(end) });
        }
        if usize::from(p[trailer_end - 2]) != pad || p[trailer_end - 1] != NEXT_HEADER {
            return Err(DecodeError::Malformed("integrity pad length or next header"));
        }
        let expected = keys.auth_code(&p[4..trailer_end]);
        if !super::crypto::codes_match(&p[trailer_end..], &expected) {
            return Err(DecodeError::BadAuthCode);
        }
    }
    let payload =
        if encrypted { keys.map(|k| k.decrypt(body)).transpose()?.unwrap_or_default() } else { body.to_vec() };
    Ok(Inbound { payload_type: PayloadType::from_wire(flags), session_id, seq, authenticated, payload })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lanplus::crypto::Rakp;
    use crate::lanplus::test_util::hex;

    #[test]
    fn checksums_add_up_to_zero() {
        assert_eq!(checksum(&[0x20, 0x18]), 0xc8);
        assert_eq!(checksum(&[]), 0);
        assert_eq!(checksum(&[0x81, 0x00, 0x38, 0x8e, 0x04]), 0xb5);
        let bytes = [0x12u8, 0xff, 0x80, 0x01];
        let sum = bytes.iter().fold(checksum(&bytes), |a, b| a.wrapping_add(*b));
        assert_eq!(sum, 0);
    }

    #[test]
    fn get_channel_auth_capabilities_request_bytes() {
        // The request ipmitool sends first, as the IPMI 2.0 spec's example
        // framing: RMCP, auth none, seq 0, session 0, length 9, message.
        let msg = Request { netfn: 0x06, cmd: 0x38, rq_seq: 0, data: vec![0x8e, 0x04] }.encode();
        assert_eq!(msg, hex("20 18 c8 81 00 38 8e 04 b5"));
        assert_eq!(encode_v15(&msg), hex("06 00 ff 07 00 00000000 00000000 09 20 18 c8 81 00 38 8e 04 b5"));
    }

    #[test]
    fn response_decoding_checks_checksums() {
        // Get Chassis Status response: power on.
        let m = hex("81 04 7b 20 14 01 00 01 00 00 ca");
        let r = Response::decode(&m).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((r.netfn, r.cmd, r.rq_seq, r.completion), (0x01, 0x01, 5, 0));
        assert_eq!(r.data, vec![1, 0, 0]);
        let req = Request { netfn: 0x00, cmd: 0x01, rq_seq: 5, data: vec![] };
        assert!(req.is_answered_by(&r));
        assert!(!Request { rq_seq: 6, ..req.clone() }.is_answered_by(&r));
        let mut bad = m.clone();
        bad[7] ^= 1;
        assert_eq!(Response::decode(&bad), Err(DecodeError::BadChecksum));
        assert!(matches!(Response::decode(&m[..5]), Err(DecodeError::Truncated { .. })));
    }

    #[test]
    fn v15_round_trip_and_truncation() {
        let p = encode_v15(&[1, 2, 3]);
        assert_eq!(decode_v15(&p), Ok(&[1u8, 2, 3][..]));
        assert!(decode_v15(&p[..15]).is_err());
        assert_eq!(decode_v15(&[0x05, 0, 0xff, 7]), Err(DecodeError::NotRmcp));
    }

    #[test]
    fn integrity_pad_lengths() {
        // 12 header bytes + payload + pad + 2 must be a multiple of 4.
        for payload in 0..64 {
            let len = 12 + payload;
            assert_eq!((len + integrity_pad_len(len) + 2) % 4, 0);
            assert!(integrity_pad_len(len) < 4);
        }
        // The captured packet: 12 + 32 bytes, two pad bytes.
        assert_eq!(integrity_pad_len(44), 2);
    }

    fn keys() -> SessionKeys {
        let r = Rakp {
            console_sid: 0xa0a2_a3a4,
            bmc_sid: 0x0000_0a82,
            console_rand: hex("e1ac73304d4aa6856c373d6241cb351e").try_into().unwrap_or_default(),
            bmc_rand: hex("5f91b32bd54ba6afdfbbb1ba53df25c4").try_into().unwrap_or_default(),
            bmc_guid: hex("a123456789abcdefa123456789ab3f1e").try_into().unwrap_or_default(),
            role: 0x14,
            username: b"admin0",
        };
        SessionKeys::from_sik(&r.session_integrity_key(b"pass0"))
    }

    #[test]
    fn decodes_a_captured_bmc_packet() {
        // ipmi_sim's answer to Set Session Privilege Level, as ipmitool saw it.
        let p = hex("06 00 ff 07 06c0a4a3a2a00100000020007d413160f95c74211fe65be844453c43\
             e7c7d79cae7ada427c6aaa2fff834011ffff0207 04f21b6f226ee318c745768d");
        let inb = decode_v20(&p, Some(&keys())).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(inb.payload_type, Some(PayloadType::Ipmi));
        assert_eq!((inb.session_id, inb.seq, inb.authenticated), (0xa0a2_a3a4, 1, true));
        let r = Response::decode(&inb.payload).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((r.netfn, r.cmd, r.completion, r.data.as_slice()), (0x07, 0x3b, 0, &[4u8][..]));
        // A flipped bit anywhere is caught by the integrity code.
        for i in 4..p.len() {
            let mut bad = p.clone();
            bad[i] ^= 0x01;
            assert!(decode_v20(&bad, Some(&keys())).is_err(), "byte {i}");
        }
        // Without session keys an authenticated packet is refused.
        assert!(decode_v20(&p, None).is_err());
    }

    #[test]
    fn reproduces_a_captured_console_packet() {
        // The console's Set Session Privilege Level request, rebuilt from its
        // plaintext with the captured IV, must be byte-identical.
        let k = keys();
        let iv: [u8; 16] = hex("049d615ad63e0c3c55c484d4618c171b").try_into().unwrap_or_default();
        let plain =
            k.decrypt(&hex("049d615ad63e0c3c55c484d4618c171b2135e31a2a86b834d7cf5b3498318b51")).unwrap_or_default();
        let p = encode_v20_secure(&k, 0x0000_0a82, 3, &iv, &plain);
        assert_eq!(
            p,
            hex("06 00 ff 07 06c0820a000003000000200004\
                 9d615ad63e0c3c55c484d4618c171b2135e31a2a86b834d7cf5b3498318b51ffff0207 60dcc45faaf94b528c48a8ac")
        );
        let req = Request { netfn: 0x06, cmd: 0x3b, rq_seq: plain[4] >> 2, data: vec![0x04] };
        assert_eq!(req.encode(), plain);
    }

    #[test]
    fn clear_v20_round_trip() {
        let p = encode_v20_clear(PayloadType::Rakp1, &[1, 2, 3, 4]);
        assert_eq!(p, hex("06 00 ff 07 06 12 00000000 00000000 0400 01020304"));
        let inb = decode_v20(&p, None).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(inb.payload_type, Some(PayloadType::Rakp1));
        assert!(!inb.authenticated);
        assert_eq!(inb.payload, vec![1, 2, 3, 4]);
        assert!(decode_v20(&p[..18], None).is_err());
    }
}
