//! OpenSSH public keys, validated before Duffy writes them anywhere.
//!
//! A key line is `TYPE BASE64 [COMMENT]` on a single line. Validation checks
//! the type against an allow-list, decodes the base64 blob and checks that
//! the blob names the same type (the first field of the SSH wire encoding),
//! and refuses control characters anywhere (a newline would let a "key"
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
    if !blob_names_type(&blob, key_type) {
        return Err(KeyError::TypeMismatch(key_type.to_string()));
    }
    let comment: Vec<&str> = fields.collect();
    let comment = if comment.is_empty() { None } else { Some(comment.join(" ")) };
    Ok(PublicKey { key_type: key_type.to_string(), data: data.to_string(), comment })
}

/// The SSH wire encoding of a public key starts with its type as a
/// length-prefixed string; an Ed25519 key is exactly that plus a 32-byte key.
fn blob_names_type(blob: &[u8], key_type: &str) -> bool {
    let Some((len, rest)) = read_u32(blob) else { return false };
    let Some(name) = rest.get(..len as usize) else { return false };
    if name != key_type.as_bytes() {
        return false;
    }
    let rest = &rest[len as usize..];
    match key_type {
        "ssh-ed25519" => matches!(read_u32(rest), Some((32, k)) if k.len() == 32),
        _ => !rest.is_empty(),
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
