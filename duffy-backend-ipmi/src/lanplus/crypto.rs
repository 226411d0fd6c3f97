//! The cryptography of cipher suite 3: RAKP-HMAC-SHA1 key exchange,
//! HMAC-SHA1-96 integrity and AES-CBC-128 confidentiality (IPMI 2.0
//! sections 13.28 to 13.31).

use std::fmt;

use aes::Aes128;
use aes::cipher::block_padding::NoPadding;
use aes::cipher::{BlockDecryptMut, BlockEncryptMut, KeyIvInit};
use hmac::{Hmac, Mac};
use sha1::Sha1;

use super::DecodeError;

type HmacSha1 = Hmac<Sha1>;

/// Length of an HMAC-SHA1 output: RAKP authentication codes and keys.
pub const SHA1_LEN: usize = 20;
/// Length of an HMAC-SHA1-96 integrity code (session trailer, RAKP 4).
pub const INTEGRITY_LEN: usize = 12;
/// AES block (and IV) length.
pub const AES_BLOCK: usize = 16;

/// HMAC-SHA1 over the concatenation of `parts`.
pub fn hmac_sha1(key: &[u8], parts: &[&[u8]]) -> [u8; SHA1_LEN] {
    let mut mac = new_mac(key);
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

fn new_mac(key: &[u8]) -> HmacSha1 {
    // HMAC takes keys of any length (long keys are hashed, short ones padded).
    #[allow(clippy::expect_used)]
    <HmacSha1 as Mac>::new_from_slice(key).expect("HMAC accepts keys of any length")
}

/// Constant-time comparison of a received code with the expected one.
pub fn codes_match(received: &[u8], expected: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    received.len() == expected.len() && bool::from(received.ct_eq(expected))
}

/// The values both sides of a RAKP exchange hash, as they travel on the wire.
///
/// The specification names the remote console "m" and the managed system
/// (the BMC) "c": `SIDm` is `console_sid`, `SIDc` is `bmc_sid`, `Rm` is
/// `console_rand`, `Rc` is `bmc_rand`, `GUIDc` is `bmc_guid`.
#[derive(Clone)]
pub struct Rakp<'a> {
    /// The session ID the console chose (SIDm).
    pub console_sid: u32,
    /// The session ID the BMC chose (SIDc).
    pub bmc_sid: u32,
    /// The console's random number, sent in RAKP 1 (Rm).
    pub console_rand: [u8; 16],
    /// The BMC's random number, received in RAKP 2 (Rc).
    pub bmc_rand: [u8; 16],
    /// The BMC's GUID, received in RAKP 2 (GUIDc).
    pub bmc_guid: [u8; 16],
    /// The requested-role byte of RAKP 1 as sent, lookup bit included (ROLEm).
    pub role: u8,
    /// The user name (UNAMEm), at most 16 bytes.
    pub username: &'a [u8],
}

impl fmt::Debug for Rakp<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rakp")
            .field("console_sid", &format_args!("{:#010x}", self.console_sid))
            .field("bmc_sid", &format_args!("{:#010x}", self.bmc_sid))
            .field("role", &format_args!("{:#04x}", self.role))
            .finish_non_exhaustive()
    }
}

impl Rakp<'_> {
    fn name_len(&self) -> [u8; 1] {
        // Callers check the 16-byte limit; the cast cannot truncate then.
        [self.username.len().min(255) as u8]
    }

    /// The key exchange authentication code the BMC must send in RAKP 2:
    /// HMAC_Kuid(SIDm, SIDc, Rm, Rc, GUIDc, ROLEm, ULENGTHm, UNAMEm).
    pub fn rakp2_auth_code(&self, kuid: &[u8]) -> [u8; SHA1_LEN] {
        hmac_sha1(
            kuid,
            &[
                &self.console_sid.to_le_bytes(),
                &self.bmc_sid.to_le_bytes(),
                &self.console_rand,
                &self.bmc_rand,
                &self.bmc_guid,
                &[self.role],
                &self.name_len(),
                self.username,
            ],
        )
    }

    /// The key exchange authentication code the console sends in RAKP 3:
    /// HMAC_Kuid(Rc, SIDm, ROLEm, ULENGTHm, UNAMEm).
    pub fn rakp3_auth_code(&self, kuid: &[u8]) -> [u8; SHA1_LEN] {
        hmac_sha1(
            kuid,
            &[&self.bmc_rand, &self.console_sid.to_le_bytes(), &[self.role], &self.name_len(), self.username],
        )
    }

    /// The session integrity key: SIK = HMAC_Kg(Rm, Rc, ROLEm, ULENGTHm,
    /// UNAMEm), where Kg is the BMC key, or Kuid when the BMC has none.
    pub fn session_integrity_key(&self, kg: &[u8]) -> [u8; SHA1_LEN] {
        hmac_sha1(kg, &[&self.console_rand, &self.bmc_rand, &[self.role], &self.name_len(), self.username])
    }

    /// The integrity check value the BMC must send in RAKP 4: the first 12
    /// bytes of HMAC_SIK(Rm, SIDc, GUIDc).
    pub fn rakp4_integrity_check(&self, sik: &[u8; SHA1_LEN]) -> [u8; INTEGRITY_LEN] {
        let full = hmac_sha1(sik, &[&self.console_rand, &self.bmc_sid.to_le_bytes(), &self.bmc_guid]);
        truncate96(&full)
    }
}

fn truncate96(full: &[u8; SHA1_LEN]) -> [u8; INTEGRITY_LEN] {
    let mut out = [0u8; INTEGRITY_LEN];
    out.copy_from_slice(&full[..INTEGRITY_LEN]);
    out
}

/// The keys of an active session, derived from the SIK: K1 for integrity,
/// the first 16 bytes of K2 for AES-CBC-128. Debug output hides them.
#[derive(Clone)]
pub struct SessionKeys {
    k1: [u8; SHA1_LEN],
    aes_key: [u8; AES_BLOCK],
}

impl fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionKeys(***)")
    }
}

impl SessionKeys {
    /// Derives K1 = HMAC_SIK(0x01 × 20) and K2 = HMAC_SIK(0x02 × 20).
    pub fn from_sik(sik: &[u8; SHA1_LEN]) -> Self {
        let k1 = hmac_sha1(sik, &[&[0x01; SHA1_LEN]]);
        let k2 = hmac_sha1(sik, &[&[0x02; SHA1_LEN]]);
        let mut aes_key = [0u8; AES_BLOCK];
        aes_key.copy_from_slice(&k2[..AES_BLOCK]);
        SessionKeys { k1, aes_key }
    }

    /// The HMAC-SHA1-96 integrity code of `data` (the session header through
    /// the Next Header byte).
    pub fn auth_code(&self, data: &[u8]) -> [u8; INTEGRITY_LEN] {
        truncate96(&hmac_sha1(&self.k1, &[data]))
    }

    /// Encrypts a payload: the result is the IV followed by the AES-CBC-128
    /// encryption of the payload, its confidentiality pad (1, 2, 3, ...) and
    /// the pad length, a multiple of 16 bytes in all.
    pub fn encrypt(&self, iv: &[u8; AES_BLOCK], payload: &[u8]) -> Vec<u8> {
        let pad = confidentiality_pad_len(payload.len());
        let mut buf = Vec::with_capacity(AES_BLOCK + payload.len() + pad + 1);
        buf.extend_from_slice(iv);
        buf.extend_from_slice(payload);
        buf.extend((1..=pad).map(|i| i as u8));
        buf.push(pad as u8);
        let len = buf.len() - AES_BLOCK;
        let enc = cbc::Encryptor::<Aes128>::new(&self.aes_key.into(), iv.into());
        // The plaintext is a whole number of blocks, so NoPadding cannot fail.
        if enc.encrypt_padded_mut::<NoPadding>(&mut buf[AES_BLOCK..], len).is_err() {
            unreachable!("confidentiality padding makes whole AES blocks");
        }
        buf
    }

    /// Decrypts a payload made by [`SessionKeys::encrypt`] (or the BMC) and
    /// removes and checks the confidentiality pad.
    pub fn decrypt(&self, data: &[u8]) -> Result<Vec<u8>, DecodeError> {
        if data.len() < 2 * AES_BLOCK || data.len() % AES_BLOCK != 0 {
            return Err(DecodeError::Malformed("encrypted payload is not an IV and whole AES blocks"));
        }
        let (iv, body) = data.split_at(AES_BLOCK);
        let mut iv_arr = [0u8; AES_BLOCK];
        iv_arr.copy_from_slice(iv);
        let mut buf = body.to_vec();
        let dec = cbc::Decryptor::<Aes128>::new(&self.aes_key.into(), &iv_arr.into());
        let plain_len = dec
            .decrypt_padded_mut::<NoPadding>(&mut buf)
            .map_err(|_| DecodeError::Malformed("encrypted payload is not whole AES blocks"))?
            .len();
        buf.truncate(plain_len);
        let pad = usize::from(*buf.last().ok_or(DecodeError::Malformed("empty encrypted payload"))?);
        if pad >= AES_BLOCK || pad + 1 > buf.len() {
            return Err(DecodeError::BadPadding);
        }
        let data_len = buf.len() - pad - 1;
        // The pad bytes are 1, 2, 3, ...; a wrong key shows up here first.
        if buf[data_len..data_len + pad].iter().enumerate().any(|(i, b)| usize::from(*b) != i + 1) {
            return Err(DecodeError::BadPadding);
        }
        buf.truncate(data_len);
        Ok(buf)
    }
}

/// How many confidentiality pad bytes follow a payload of `len` bytes so
/// that payload, pad and pad-length byte fill whole AES blocks.
pub fn confidentiality_pad_len(len: usize) -> usize {
    (AES_BLOCK - (len + 1) % AES_BLOCK) % AES_BLOCK
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lanplus::test_util::hex;

    /// A session captured between ipmitool 1.8.19 (`-vvvv`, which prints
    /// every input and output of the key exchange) and ipmi_sim 2.0.33,
    /// user `admin0`, password `pass0`.
    fn captured() -> Rakp<'static> {
        Rakp {
            console_sid: 0xa0a2_a3a4,
            bmc_sid: 0x0000_0a82,
            console_rand: hex("e1ac73304d4aa6856c373d6241cb351e").try_into().unwrap_or_default(),
            bmc_rand: hex("5f91b32bd54ba6afdfbbb1ba53df25c4").try_into().unwrap_or_default(),
            bmc_guid: hex("a123456789abcdefa123456789ab3f1e").try_into().unwrap_or_default(),
            role: 0x14,
            username: b"admin0",
        }
    }

    #[test]
    fn rakp_codes_match_a_captured_session() {
        let r = captured();
        assert_eq!(r.rakp2_auth_code(b"pass0").to_vec(), hex("f5565c4d93e27e949a363ef327b54722986fe154"));
        // Zero padding of the password to 20 bytes does not change HMAC.
        assert_eq!(r.rakp2_auth_code(b"pass0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0"), r.rakp2_auth_code(b"pass0"));
        assert_ne!(r.rakp2_auth_code(b"pass1"), r.rakp2_auth_code(b"pass0"));
        assert_eq!(r.rakp3_auth_code(b"pass0").to_vec(), hex("866d0828237fb2a46dd41d431a9ae2220aae27e0"));
        let sik = r.session_integrity_key(b"pass0");
        assert_eq!(sik.to_vec(), hex("8e1fa4f737ef74399dc71f50b83bae1766011781"));
        assert_eq!(r.rakp4_integrity_check(&sik).to_vec(), hex("ef3e2339e7a264b3cbee939e"));
        let keys = SessionKeys::from_sik(&sik);
        assert_eq!(keys.k1.to_vec(), hex("4d886f472231b78311356b689b118464b07ec12e"));
        assert_eq!(keys.aes_key.to_vec(), hex("c375305184b195486ff0a53a424e537a"));
    }

    #[test]
    fn integrity_code_matches_a_captured_packet() {
        let keys = SessionKeys::from_sik(&captured().session_integrity_key(b"pass0"));
        // Session header through Next Header of the console's first
        // (Set Session Privilege Level) packet.
        let data = hex("06c0820a000003000000200004\
             9d615ad63e0c3c55c484d4618c171b2135e31a2a86b834d7cf5b3498318b51ffff0207");
        assert_eq!(keys.auth_code(&data).to_vec(), hex("60dcc45faaf94b528c48a8ac"));
        // And the BMC's answer, which ipmitool verified.
        let data = hex("06c0a4a3a2a00100000020007d413160f95c74211fe65be844453c43\
             e7c7d79cae7ada427c6aaa2fff834011ffff0207");
        assert_eq!(keys.auth_code(&data).to_vec(), hex("04f21b6f226ee318c745768d"));
    }

    #[test]
    fn decrypts_captured_payloads() {
        let keys = SessionKeys::from_sik(&captured().session_integrity_key(b"pass0"));
        // The console's Set Session Privilege Level (ADMINISTRATOR) request.
        let plain =
            keys.decrypt(&hex("049d615ad63e0c3c55c484d4618c171b2135e31a2a86b834d7cf5b3498318b51")).unwrap_or_default();
        assert_eq!(plain.len(), 8, "{plain:02x?}");
        assert_eq!((plain[0], plain[1], plain[3], plain[5], plain[6]), (0x20, 0x18, 0x81, 0x3b, 0x04));
        // The BMC's answer: completion code 0, new privilege level 4.
        let plain =
            keys.decrypt(&hex("7d413160f95c74211fe65be844453c43e7c7d79cae7ada427c6aaa2fff834011")).unwrap_or_default();
        assert_eq!(plain.len(), 9, "{plain:02x?}");
        assert_eq!((plain[0], plain[1], plain[3], plain[5], plain[6], plain[7]), (0x81, 0x1c, 0x20, 0x3b, 0x00, 0x04));
    }

    #[test]
    fn encrypt_round_trips_and_pads() {
        let keys = SessionKeys::from_sik(&[7u8; 20]);
        for len in 0..40 {
            let payload: Vec<u8> = (0..len).map(|i| i as u8 ^ 0x5a).collect();
            let ct = keys.encrypt(&[9u8; 16], &payload);
            assert_eq!((ct.len() - 16) % 16, 0);
            assert_eq!(ct.len() - 16, payload.len() + confidentiality_pad_len(len) + 1);
            assert_eq!(keys.decrypt(&ct).ok(), Some(payload));
        }
        assert_eq!(confidentiality_pad_len(15), 0);
        assert_eq!(confidentiality_pad_len(0), 15);
        assert_eq!(confidentiality_pad_len(8), 7);
        // A wrong key gives a bad pad (with overwhelming probability) or garbage, never a panic.
        let other = SessionKeys::from_sik(&[8u8; 20]);
        let ct = keys.encrypt(&[1u8; 16], b"hello");
        assert_ne!(other.decrypt(&ct).ok(), Some(b"hello".to_vec()));
        assert!(keys.decrypt(&ct[..20]).is_err());
        assert!(keys.decrypt(&ct[..16]).is_err());
    }

    #[test]
    fn debug_hides_keys() {
        let keys = SessionKeys::from_sik(&[7u8; 20]);
        assert_eq!(format!("{keys:?}"), "SessionKeys(***)");
    }
}
