//! API keys: stored only as SHA-256 hashes, compared in constant time.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::model::ApiKeyHash;

/// The hash under which `key` is stored.
pub fn hash_api_key(key: &str) -> ApiKeyHash {
    ApiKeyHash(Sha256::digest(key.as_bytes()).into())
}

/// Whether `key` hashes to `stored`, compared in constant time.
pub fn verify_api_key(key: &str, stored: &ApiKeyHash) -> bool {
    hash_api_key(key).0.ct_eq(&stored.0).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_and_verifies() {
        let h = hash_api_key("secret");
        assert!(verify_api_key("secret", &h));
        assert!(!verify_api_key("secreT", &h));
        // Known SHA-256 vector.
        assert_eq!(hash_api_key("abc").0[..4], [0xba, 0x78, 0x16, 0xbf]);
    }
}
