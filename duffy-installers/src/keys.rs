//! OpenSSH public keys, validated before Duffy writes them anywhere.
//!
//! A key line is `TYPE BASE64 [COMMENT]` on a single line. Validation checks
//! the type against an allow-list, decodes the base64 blob and checks that
//! the blob names the same type (the first field of the SSH wire encoding)
//! and holds exactly that type's fields (an Ed25519 key of 32 bytes, an
//! RSA modulus of 1024 to 16384 bits, an ECDSA point of the named curve's
//! size), and refuses control characters anywhere (a newline would let a "key"
//! smuggle a second `authorized_keys` line or a shell command). Leading
//! and trailing whitespace (including a final newline, as in a `.pub`
//! file) is ignored. `authorized_keys` options (`from="…"`, `command=…`)
//! are not accepted.

use std::fmt;

/// Key types accepted for a project's keys.
pub const USER_KEY_TYPES: [&str; 7] = [
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

/// Key types accepted for a machine's host key.
pub const HOST_KEY_TYPES: [&str; 5] =
    ["ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521"];

/// The longest key line accepted (an RSA-16384 key is about 2.8 KB).
pub const MAX_KEY_LINE: usize = 8 * 1024;

/// Why a string is not an acceptable OpenSSH public key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Nothing but whitespace.
    #[error("empty key")]
    Empty,
    /// Longer than [`MAX_KEY_LINE`].
    #[error("key line is {0} bytes long; at most {MAX_KEY_LINE} are accepted")]
    TooLong(usize),
    /// A newline or another control character inside the line.
    #[error("key contains a line break or another control character (U+{0:04X}); a key is one line")]
    ControlCharacter(u32),
    /// The first field is not an accepted key type.
    #[error("unsupported key type {0:?} (options before the key are not accepted); allowed: {1}")]
    UnsupportedType(String, String),
    /// No base64 field after the type.
    #[error("key of type {0} has no key data")]
    MissingData(String),
    /// The key data is not valid base64.
    #[error("key data is not valid base64")]
    BadBase64,
    /// The decoded key data does not start with the declared type.
    #[error("key data does not match the declared type {0}")]
    TypeMismatch(String),
    /// The decoded key data names the type but is not a well-formed key
    /// of it (missing, short or extra fields, an RSA modulus outside 1024
    /// to 16384 bits, an ECDSA point not on the named curve's size).
    #[error("key data is not a well-formed {0} public key")]
    Malformed(String),
}

/// A validated OpenSSH public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    key_type: String,
    data: String,
    comment: Option<String>,
}

impl PublicKey {
    /// Parses a project (user) key: any type of [`USER_KEY_TYPES`], with an
    /// optional comment.
    pub fn parse(line: &str) -> Result<PublicKey, KeyError> {
        parse_with(line, &USER_KEY_TYPES)
    }

    /// Parses a machine's host key: `ssh-ed25519`, `ecdsa-sha2-*` or
    /// `ssh-rsa`, with an optional comment.
    pub fn parse_host_key(line: &str) -> Result<PublicKey, KeyError> {
        parse_with(line, &HOST_KEY_TYPES)
    }

    /// The key type, e.g. `ssh-ed25519`.
    pub fn key_type(&self) -> &str {
        &self.key_type
    }

    /// The base64 key data.
    pub fn data(&self) -> &str {
        &self.data
    }

    /// The comment, if any (spaces inside it kept, runs of whitespace
    /// collapsed to one space).
    pub fn comment(&self) -> Option<&str> {
        self.comment.as_deref()
    }

    /// `TYPE BASE64`, without the comment: the form Duffy records as a
    /// node's host key and writes to `known_hosts`.
    pub fn without_comment(&self) -> String {
        format!("{} {}", self.key_type, self.data)
    }
}

impl fmt::Display for PublicKey {
    /// The normalised line: `TYPE BASE64[ COMMENT]`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.key_type, self.data)?;
        if let Some(c) = &self.comment {
            write!(f, " {c}")?;
        }
        Ok(())
    }
}

fn parse_with(line: &str, allowed: &[&str]) -> Result<PublicKey, KeyError> {
    let line = line.trim_matches(|c: char| c.is_ascii_whitespace());
    if line.is_empty() {
        return Err(KeyError::Empty);
    }
    if line.len() > MAX_KEY_LINE {
        return Err(KeyError::TooLong(line.len()));
    }
    if let Some(c) = line.chars().find(|c| c.is_control() && *c != '\t') {
        return Err(KeyError::ControlCharacter(u32::from(c)));
    }
    let mut fields = line.split([' ', '\t']).filter(|f| !f.is_empty());
    let key_type = fields.next().unwrap_or_default();
    if !allowed.contains(&key_type) {
        return Err(KeyError::UnsupportedType(key_type.chars().take(40).collect(), allowed.join(", ")));
    }
    let data = fields.next().ok_or_else(|| KeyError::MissingData(key_type.to_string()))?;
    let blob = base64_decode(data).ok_or(KeyError::BadBase64)?;
    check_blob(&blob, key_type)?;
    let comment: Vec<&str> = fields.collect();
    let comment = if comment.is_empty() { None } else { Some(comment.join(" ")) };
    Ok(PublicKey { key_type: key_type.to_string(), data: data.to_string(), comment })
}

/// Whether `blob` is a well-formed SSH wire encoding (RFC 4253 §6.6,
/// RFC 5656 §3.1, OpenSSH's PROTOCOL.u2f) of a public key of `key_type`:
/// its type as a length-prefixed string, then exactly the fields of that
/// type with sane sizes, and nothing after them. A host key is what every
/// later SSH connection to a node checks, so "some bytes after the type
/// name" is not enough: a blob that no SSH server could present is refused
/// here rather than recorded.
fn check_blob(blob: &[u8], key_type: &str) -> Result<(), KeyError> {
    let mut r = Reader(blob);
    if r.string() != Some(key_type.as_bytes()) {
        return Err(KeyError::TypeMismatch(key_type.to_string()));
    }
    let fields_ok = match key_type {
        "ssh-ed25519" => r.string().is_some_and(|k| k.len() == 32),
        "sk-ssh-ed25519@openssh.com" => {
            r.string().is_some_and(|k| k.len() == 32) && r.string().is_some_and(|app| !app.is_empty())
        }
        "ssh-rsa" => {
            // mpint e, mpint n: a positive exponent and a modulus of 1024
            // to 16384 bits (OpenSSH refuses smaller ones; larger ones do
            // not exist in practice).
            let e = r.mpint();
            let n = r.mpint();
            e.is_some_and(|e| !e.is_empty()) && n.is_some_and(|n| (1024..=16384).contains(&bit_length(n)))
        }
        _ => match ecdsa_curve(key_type) {
            // string curve (the type's suffix), string Q: an uncompressed
            // point, 0x04 then two coordinates of the curve's size.
            Some((curve, coord)) => {
                let point_ok = |q: &[u8]| q.len() == 1 + 2 * coord && q[0] == 0x04;
                let sk = key_type.starts_with("sk-");
                r.string() == Some(curve.as_bytes())
                    && r.string().is_some_and(point_ok)
                    && (!sk || r.string().is_some_and(|app| !app.is_empty()))
            }
            None => false,
        },
    };
    if fields_ok && r.0.is_empty() { Ok(()) } else { Err(KeyError::Malformed(key_type.to_string())) }
}

/// The curve name and coordinate size (bytes) of an ECDSA key type.
fn ecdsa_curve(key_type: &str) -> Option<(&'static str, usize)> {
    match key_type {
        "ecdsa-sha2-nistp256" | "sk-ecdsa-sha2-nistp256@openssh.com" => Some(("nistp256", 32)),
        "ecdsa-sha2-nistp384" => Some(("nistp384", 48)),
        "ecdsa-sha2-nistp521" => Some(("nistp521", 66)),
        _ => None,
    }
}

/// The number of significant bits of a big-endian unsigned integer.
fn bit_length(n: &[u8]) -> usize {
    match n.iter().position(|&b| b != 0) {
        Some(i) => (n.len() - i - 1) * 8 + (8 - n[i].leading_zeros() as usize),
        None => 0,
    }
}

/// Reads the SSH wire encoding's fields off the front of a byte slice.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    /// A `string`: a 32-bit big-endian length and that many bytes.
    fn string(&mut self) -> Option<&'a [u8]> {
        let (len, rest) = read_u32(self.0)?;
        let len = usize::try_from(len).ok()?;
        let value = rest.get(..len)?;
        self.0 = &rest[len..];
        Some(value)
    }

    /// An `mpint` that must be positive: a string, without the sign byte
    /// (a leading zero byte only when the next byte's high bit is set).
    fn mpint(&mut self) -> Option<&'a [u8]> {
        let v = self.string()?;
        match v {
            [] => Some(v),
            [first, ..] if first & 0x80 != 0 => None, // negative
            [0, next, ..] if next & 0x80 != 0 => Some(&v[1..]),
            [0, ..] => None, // not minimal
            _ => Some(v),
        }
    }
}

fn read_u32(b: &[u8]) -> Option<(u32, &[u8])> {
    let head: [u8; 4] = b.get(..4)?.try_into().ok()?;
    Some((u32::from_be_bytes(head), &b[4..]))
}

/// Standard base64 with padding, as OpenSSH writes it.
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    fn val(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let b = s.as_bytes();
    if b.is_empty() || b.len() % 4 != 0 {
        return None;
    }
    let mut out = Vec::with_capacity(b.len() / 4 * 3);
    let chunks = b.len() / 4;
    for (i, chunk) in b.chunks(4).enumerate() {
        let last = i + 1 == chunks;
        let pad = chunk.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && !last) {
            return None;
        }
        let mut n = 0u32;
        for &c in &chunk[..4 - pad] {
            n = (n << 6) | val(c)?;
        }
        n <<= 6 * pad as u32;
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..4 - pad]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ED: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIByrgFoRodMpGoIGtVxnK/CTnXeEUb1KLNez/P0VJgK+ root@n1.example.org";
    const EC: &str = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBEcbTzXQ2o4dsaenJU4FAX6E36s81FO7Dgmyh87F2vtByzhlkoZW1TXMxVo0KA2d5aCzif5RzNwrsrWxAYDD9n8= x";

    #[test]
    fn accepts_real_keys() {
        let k = PublicKey::parse(&format!("  {ED}\n")).unwrap();
        assert_eq!(k.key_type(), "ssh-ed25519");
        assert_eq!(k.comment(), Some("root@n1.example.org"));
        assert_eq!(k.to_string(), ED);
        assert_eq!(k.without_comment(), ED.rsplit_once(' ').unwrap().0);
        let e = PublicKey::parse_host_key(EC).unwrap();
        assert_eq!(e.key_type(), "ecdsa-sha2-nistp256");
        assert!(
            PublicKey::parse("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIByrgFoRodMpGoIGtVxnK/CTnXeEUb1KLNez/P0VJgK+")
                .is_ok()
        );
    }

    #[test]
    fn refuses_bad_keys() {
        assert_eq!(PublicKey::parse(" \n"), Err(KeyError::Empty));
        assert!(matches!(PublicKey::parse(&format!("{ED}\nrm -rf /")), Err(KeyError::ControlCharacter(10))));
        assert!(matches!(PublicKey::parse(&format!("{ED}\r\nx")), Err(KeyError::ControlCharacter(13))));
        assert!(matches!(PublicKey::parse(&format!("command=\"sh\" {ED}")), Err(KeyError::UnsupportedType(..))));
        assert!(matches!(PublicKey::parse("ssh-dss AAAAB3NzaC1kc3M="), Err(KeyError::UnsupportedType(..))));
        assert!(matches!(PublicKey::parse("ssh-ed25519"), Err(KeyError::MissingData(_))));
        assert_eq!(PublicKey::parse("ssh-ed25519 not$base64"), Err(KeyError::BadBase64));
        assert_eq!(PublicKey::parse("ssh-ed25519 AAAA"), Err(KeyError::TypeMismatch("ssh-ed25519".into())));
        assert_eq!(
            PublicKey::parse("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5"),
            Err(KeyError::Malformed("ssh-ed25519".into()))
        );
        // An ECDSA blob declared as ed25519.
        let data = EC.split(' ').nth(1).unwrap();
        assert!(matches!(PublicKey::parse(&format!("ssh-ed25519 {data}")), Err(KeyError::TypeMismatch(_))));
        // Security-key types are fine for users, not for hosts.
        assert!(matches!(
            PublicKey::parse_host_key("sk-ssh-ed25519@openssh.com AAAA"),
            Err(KeyError::UnsupportedType(..))
        ));
        assert!(matches!(PublicKey::parse(&"A".repeat(MAX_KEY_LINE + 1)), Err(KeyError::TooLong(_))));
    }

    /// Real keys from `ssh-keygen -t rsa -b 2048` and `-t ecdsa -b 521`.
    const RSA: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQDh7UOInIUkvqmNm4p1qePTrwE4YLoFhBZJkXsplkA1n/Qd3IzMwtDmcvLBEddBEjwJPV/tFExY7VmeFEwgyA9ai9ZL/pD39zUCJ1sTxeBE+9BkuNhd9tLn6e8IkLI/smdeX+GZDC2FbEvlpJY/vS5VOwKkX32BnKZwKUtpo69a4xcdF3D8718kRYCWy2CFYkW/5opwfvf9qdLWF2oARu0u6LQQAYYzEi8i472Fyu7ydhlCb02kIM7I48THNTSUj6HY46587QZfer7mzw0v1g8C+MPAp/PO98kZGu8y/y0wP/oLHwzfWz99lzxFiZTUzMAOr5pBT5d+ClTymItjrqq1 r";
    const EC521: &str = "ecdsa-sha2-nistp521 AAAAE2VjZHNhLXNoYTItbmlzdHA1MjEAAAAIbmlzdHA1MjEAAACFBAEMmUXuflaJVsMa1AX/BxJ8Me1kQITxsSM2e9oEKF7/+h7zhmj2lw4UdZp5jQb6EOXyMUrbhqsAwhwmZEQe8VKbegBNw5Xpgn5X7napo9qm+GU4TyiPRujHpu383VS3dAZDOtGj7NuG6xicyIHVX1kT7fsyQ07pDDwvGKLt795OggQ5hA== e";

    fn base64(data: &[u8]) -> String {
        const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for c in data.chunks(3) {
            let n = (u32::from(c[0]) << 16)
                | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
                | u32::from(*c.get(2).unwrap_or(&0));
            for k in 0..4 {
                out.push(if k <= c.len() { T[(n >> (18 - 6 * k) & 63) as usize] as char } else { '=' });
            }
        }
        out
    }

    fn string(out: &mut Vec<u8>, v: &[u8]) {
        out.extend_from_slice(&(v.len() as u32).to_be_bytes());
        out.extend_from_slice(v);
    }

    /// A key line of `key_type` whose blob is the type then `fields`.
    fn line(key_type: &str, fields: &[&[u8]], trailing: &[u8]) -> String {
        let mut blob = Vec::new();
        string(&mut blob, key_type.as_bytes());
        for f in fields {
            string(&mut blob, f);
        }
        blob.extend_from_slice(trailing);
        format!("{key_type} {}", base64(&blob))
    }

    fn blob(line: &str) -> Vec<u8> {
        base64_decode(line.split(' ').nth(1).unwrap()).unwrap()
    }

    #[test]
    fn rsa_and_ecdsa_host_keys_are_accepted() {
        for k in [RSA, EC521, EC] {
            let key = PublicKey::parse_host_key(k).unwrap_or_else(|e| panic!("{k}: {e}"));
            assert_eq!(key.to_string(), k);
            assert!(PublicKey::parse(k).is_ok());
        }
        // Our own encoder agrees with ssh-keygen's output.
        assert_eq!(base64(&blob(RSA)), RSA.split(' ').nth(1).unwrap());
        // Security-key types, for users: type, key, application.
        let sk = line("sk-ssh-ed25519@openssh.com", &[&[7; 32], b"ssh:"], &[]);
        assert!(PublicKey::parse(&sk).is_ok(), "{sk}");
        let sk = line(
            "sk-ecdsa-sha2-nistp256@openssh.com",
            &[b"nistp256", &[[4].as_slice(), &[9; 64]].concat(), b"ssh:"],
            &[],
        );
        assert!(PublicKey::parse(&sk).is_ok(), "{sk}");
    }

    #[test]
    fn malformed_key_data_is_refused() {
        let malformed =
            |k: &str| PublicKey::parse_host_key(k) == Err(KeyError::Malformed(k.split(' ').next().unwrap().into()));
        // Extra bytes after a real key.
        let mut b = blob(RSA);
        b.push(0);
        assert!(malformed(&format!("ssh-rsa {}", base64(&b))));
        // Cut short.
        let b = blob(EC521);
        assert!(malformed(&format!("ecdsa-sha2-nistp521 {}", base64(&b[..b.len() - 3]))));
        // Type name only.
        assert!(malformed(&line("ssh-rsa", &[], &[])));
        assert!(malformed(&line("ecdsa-sha2-nistp521", &[], &[])));
        // RSA: a 512-bit modulus, a negative one, a zero exponent.
        let n512 = [[0x00].as_slice(), &[0xc1; 64]].concat();
        assert!(malformed(&line("ssh-rsa", &[&[1, 0, 1], &n512], &[])));
        assert!(malformed(&line("ssh-rsa", &[&[1, 0, 1], &[0xc1; 256]], &[])));
        assert!(malformed(&line("ssh-rsa", &[&[], &[[0x00].as_slice(), &[0xc1; 256]].concat()], &[])));
        // A 2048-bit modulus is fine (the same fields, well-formed).
        assert!(
            PublicKey::parse_host_key(&line(
                "ssh-rsa",
                &[&[1, 0, 1], &[[0x00].as_slice(), &[0xc1; 256]].concat()],
                &[]
            ))
            .is_ok()
        );
        // ECDSA: another curve's name, a point of another size, a compressed point.
        let p521 = [[4].as_slice(), &[9; 132]].concat();
        assert!(PublicKey::parse_host_key(&line("ecdsa-sha2-nistp521", &[b"nistp521", &p521], &[])).is_ok());
        assert!(malformed(&line("ecdsa-sha2-nistp521", &[b"nistp256", &p521], &[])));
        assert!(malformed(&line("ecdsa-sha2-nistp521", &[b"nistp521", &p521[..65]], &[])));
        assert!(malformed(&line("ecdsa-sha2-nistp521", &[b"nistp521", &[[2].as_slice(), &[9; 132]].concat()], &[])));
        // Ed25519: a 31-byte key.
        assert!(malformed(&line("ssh-ed25519", &[&[7; 31]], &[])));
        // The message says what is wrong.
        let e = PublicKey::parse_host_key(&line("ssh-rsa", &[], &[])).unwrap_err();
        assert_eq!(e.to_string(), "key data is not a well-formed ssh-rsa public key");
    }

    #[test]
    fn base64_round_trips() {
        assert_eq!(base64_decode("TWFu").unwrap(), b"Man");
        assert_eq!(base64_decode("TWE=").unwrap(), b"Ma");
        assert_eq!(base64_decode("TQ==").unwrap(), b"M");
        assert!(base64_decode("TQ=").is_none());
        assert!(base64_decode("TQ==TWFu").is_none());
        assert!(base64_decode("T===").is_none());
    }
}
