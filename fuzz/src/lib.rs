//! Shared pieces of the fuzz targets.
//!
//! Seeds (small valid inputs: every message kind, topics, both weight codecs, a complete
//! out-of-order transfer) live in `fuzz/seeds/<target>/` and are read alongside the working
//! corpus `fuzz/corpus/<target>/` (git-ignored), so libFuzzer starts from well-formed inputs.

use coevo_protocol::SigningKey;

/// PKCS#8 v1 (RFC 8410) document of a fixed Ed25519 key: seed `[7; 32]`.
pub fn fixed_key() -> SigningKey {
    let mut der = vec![
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    der.extend_from_slice(&[7u8; 32]);
    match SigningKey::from_pkcs8(&der) {
        Ok(k) => k,
        Err(e) => panic!("fixed fuzz key: {e}"),
    }
}

/// Size limit the targets decode with (the coordinator's control-message limits are smaller).
pub const LIMIT: usize = 1 << 20;
