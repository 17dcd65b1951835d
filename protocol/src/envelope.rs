//! The one place raw message bytes are produced and read.
//!
//! Layout: `[PROTOCOL_VERSION][kind][bincode body]`. Decoding is bounded by a caller-given byte
//! limit (bincode's own limit guards length prefixes, so a forged length can't make us allocate)
//! and every failure is a typed [`DecodeError`].

use crate::crypto::{PublicKey, SigningKey};
use crate::PROTOCOL_VERSION;
use bincode::Options;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// What a message is; also the signature domain, so a signature over one kind can never pass as
/// another.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Manifest = 1,
    ModelChunk = 2,
    DeltaChunk = 3,
    Receipt = 4,
    Status = 5,
    DeltaHeader = 6,
}

impl Kind {
    fn from_byte(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Manifest,
            2 => Kind::ModelChunk,
            3 => Kind::DeltaChunk,
            4 => Kind::Receipt,
            5 => Kind::Status,
            6 => Kind::DeltaHeader,
            _ => return None,
        })
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("empty message")]
    Empty,
    #[error("message of {got} bytes exceeds the limit of {limit}")]
    TooLarge { got: usize, limit: usize },
    #[error("unsupported protocol version {0}")]
    Version(u8),
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    #[error("expected a {expected:?} message, got {got:?}")]
    WrongKind { expected: Kind, got: Kind },
    #[error("malformed body: {0}")]
    Body(String),
    #[error("signature does not verify")]
    BadSignature,
    #[error("signed by {got:?}, expected {expected:?}")]
    WrongSigner { expected: String, got: String },
}

fn options(limit: usize) -> impl Options {
    bincode::DefaultOptions::new()
        .with_limit(limit as u64)
        .reject_trailing_bytes()
}

/// Encodes `msg` as a `kind` message.
pub fn encode<T: Serialize>(kind: Kind, msg: &T) -> Vec<u8> {
    let mut out = vec![PROTOCOL_VERSION, kind as u8];
    // Serialising our own in-memory types into a Vec cannot fail (no limit on encode).
    if let Err(e) = bincode::DefaultOptions::new().serialize_into(&mut out, msg) {
        unreachable!("bincode encode of an in-memory message failed: {e}");
    }
    out
}

/// Reads the header of a message: its kind, after checking size and version.
pub fn peek_kind(bytes: &[u8], limit: usize) -> Result<Kind, DecodeError> {
    if bytes.len() > limit {
        return Err(DecodeError::TooLarge {
            got: bytes.len(),
            limit,
        });
    }
    match bytes {
        [] => Err(DecodeError::Empty),
        [v, ..] if *v != PROTOCOL_VERSION => Err(DecodeError::Version(*v)),
        [_] => Err(DecodeError::Body("missing kind byte".into())),
        [_, k, ..] => Kind::from_byte(*k).ok_or(DecodeError::UnknownKind(*k)),
    }
}

/// Decodes a `kind` message of at most `limit` bytes.
pub fn decode<T: DeserializeOwned>(
    bytes: &[u8],
    kind: Kind,
    limit: usize,
) -> Result<T, DecodeError> {
    let got = peek_kind(bytes, limit)?;
    if got != kind {
        return Err(DecodeError::WrongKind {
            expected: kind,
            got,
        });
    }
    options(limit)
        .deserialize(&bytes[2..])
        .map_err(|e| DecodeError::Body(e.to_string()))
}

/// A body with the signer's id and an Ed25519 signature over
/// `"coevo/v1" ‖ 0 ‖ kind ‖ signer ‖ 0 ‖ body`.
///
/// The body is kept as bytes so the signature is checked over exactly what was received, before
/// anything is decoded from it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signed {
    pub kind: u8,
    pub signer: String,
    pub body: Vec<u8>,
    pub signature: Vec<u8>,
}

fn signing_message(kind: u8, signer: &str, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(body.len() + signer.len() + 16);
    m.extend_from_slice(b"coevo/v1\0");
    m.push(kind);
    m.extend_from_slice(signer.as_bytes());
    m.push(0);
    m.extend_from_slice(body);
    m
}

impl Signed {
    /// Encodes `msg` as a `kind` body and signs it as `signer`.
    pub fn sign<T: Serialize>(kind: Kind, msg: &T, signer: &str, key: &SigningKey) -> Signed {
        let body = encode(kind, msg);
        let signature = key.sign(&signing_message(kind as u8, signer, &body));
        Signed {
            kind: kind as u8,
            signer: signer.to_string(),
            body,
            signature,
        }
    }

    /// Verifies the signature with `key` and decodes the body as `kind`, bounded by `limit`.
    /// The caller has chosen `key` from `self.signer` (e.g. the fleet registry) and must still
    /// check the body's context fields (fleet, round, sender).
    pub fn verify<T: DeserializeOwned>(
        &self,
        kind: Kind,
        key: &PublicKey,
        limit: usize,
    ) -> Result<T, DecodeError> {
        if self.kind != kind as u8 {
            return Err(DecodeError::Body(format!(
                "signed kind {} where {:?} was expected",
                self.kind, kind
            )));
        }
        key.verify(
            &signing_message(self.kind, &self.signer, &self.body),
            &self.signature,
        )
        .map_err(|_| DecodeError::BadSignature)?;
        decode(&self.body, kind, limit)
    }

    /// Like [`Signed::verify`], also requiring a given signer id.
    pub fn verify_from<T: DeserializeOwned>(
        &self,
        kind: Kind,
        signer: &str,
        key: &PublicKey,
        limit: usize,
    ) -> Result<T, DecodeError> {
        if self.signer != signer {
            return Err(DecodeError::WrongSigner {
                expected: signer.to_string(),
                got: self.signer.clone(),
            });
        }
        self.verify(kind, key, limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::*;
    use crate::{digest, SigningKey};
    use proptest::prelude::*;

    const LIMIT: usize = 1 << 20;

    fn header() -> DeltaHeader {
        DeltaHeader {
            fleet: "city".into(),
            round: 3,
            client: "cam-1".into(),
            base_digest: digest(b"base"),
            samples: 120,
            metrics: LocalMetrics {
                loss: 0.5,
                accuracy: 0.8,
                train_ms: 10,
                labels: Some(crate::LabelCounts {
                    labelled: 12,
                    unlabelled: 100,
                    pseudo_labelled: 60,
                    relabelled: 2,
                    discarded: 1,
                    agreement: Some(0.75),
                    estimated_noise: None,
                    judged: 0,
                }),
            },
            codec: crate::UplinkCodec::F32,
            payload_digest: digest(b"payload"),
            payload_len: 7,
            chunks: 1,
        }
    }

    #[test]
    fn round_trip_and_kind_checks() {
        let h = header();
        let bytes = encode(Kind::DeltaHeader, &h);
        assert_eq!(
            decode::<DeltaHeader>(&bytes, Kind::DeltaHeader, LIMIT).unwrap(),
            h
        );
        assert!(matches!(
            decode::<DeltaHeader>(&bytes, Kind::Receipt, LIMIT),
            Err(DecodeError::WrongKind { .. })
        ));
        assert!(matches!(
            decode::<DeltaHeader>(&bytes, Kind::DeltaHeader, 10),
            Err(DecodeError::TooLarge { .. })
        ));
        let mut other = bytes.clone();
        other[0] = PROTOCOL_VERSION + 1;
        assert_eq!(
            decode::<DeltaHeader>(&other, Kind::DeltaHeader, LIMIT),
            Err(DecodeError::Version(PROTOCOL_VERSION + 1))
        );
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(decode::<DeltaHeader>(&trailing, Kind::DeltaHeader, LIMIT).is_err());
        for cut in 0..bytes.len() {
            assert!(decode::<DeltaHeader>(&bytes[..cut], Kind::DeltaHeader, LIMIT).is_err());
        }
    }

    #[test]
    fn flipping_any_byte_breaks_the_signature() {
        let key = SigningKey::generate().unwrap();
        let signed = Signed::sign(Kind::DeltaHeader, &header(), "cam-1", &key);
        let pk = key.public_key();
        let ok: DeltaHeader = signed
            .verify_from(Kind::DeltaHeader, "cam-1", &pk, LIMIT)
            .unwrap();
        assert_eq!(ok, header());
        for i in 0..signed.body.len() {
            let mut t = signed.clone();
            t.body[i] ^= 0x01;
            assert!(
                t.verify::<DeltaHeader>(Kind::DeltaHeader, &pk, LIMIT)
                    .is_err(),
                "body byte {i}"
            );
        }
        for i in 0..signed.signature.len() {
            let mut t = signed.clone();
            t.signature[i] ^= 0x80;
            assert_eq!(
                t.verify::<DeltaHeader>(Kind::DeltaHeader, &pk, LIMIT),
                Err(DecodeError::BadSignature)
            );
        }
        let mut renamed = signed.clone();
        renamed.signer = "cam-2".into();
        assert_eq!(
            renamed.verify::<DeltaHeader>(Kind::DeltaHeader, &pk, LIMIT),
            Err(DecodeError::BadSignature)
        );
        let other = SigningKey::generate().unwrap().public_key();
        assert_eq!(
            signed.verify::<DeltaHeader>(Kind::DeltaHeader, &other, LIMIT),
            Err(DecodeError::BadSignature)
        );
        // A signature made for one kind never verifies as another.
        let mut as_receipt = signed.clone();
        as_receipt.kind = Kind::Receipt as u8;
        assert!(as_receipt
            .verify::<DeltaHeader>(Kind::Receipt, &pk, LIMIT)
            .is_err());
        // And the whole envelope, byte-flipped, never yields a verified header.
        let chunk = DeltaChunk {
            client: "cam-1".into(),
            round: 3,
            index: 0,
            total: 1,
            header: Some(signed),
            data: vec![1, 2, 3],
        };
        let wire = encode(Kind::DeltaChunk, &chunk);
        for i in 0..wire.len() {
            let mut t = wire.clone();
            t[i] ^= 0x01;
            if let Ok(c) = decode::<DeltaChunk>(&t, Kind::DeltaChunk, LIMIT) {
                if let Some(h) = c.header {
                    if let Ok(hd) = h.verify::<DeltaHeader>(Kind::DeltaHeader, &pk, LIMIT) {
                        // Only bytes outside the signed header may change undetected.
                        assert_eq!(hd, header());
                    }
                }
            }
        }
    }

    proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode::<RoundManifest>(&bytes, Kind::Manifest, 4096);
            let _ = decode::<DeltaChunk>(&bytes, Kind::DeltaChunk, 4096);
            let _ = decode::<ModelChunk>(&bytes, Kind::ModelChunk, 4096);
            let _ = decode::<Receipt>(&bytes, Kind::Receipt, 4096);
            let _ = decode::<Status>(&bytes, Kind::Status, 4096);
            let _ = decode::<Signed>(&bytes, Kind::Manifest, 4096);
        }

        #[test]
        fn decoders_never_panic_on_valid_prefix(kind in 1u8..=6, bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut m = vec![crate::PROTOCOL_VERSION, kind];
            m.extend(bytes);
            let _ = decode::<RoundManifest>(&m, Kind::Manifest, 4096);
            let _ = decode::<DeltaChunk>(&m, Kind::DeltaChunk, 4096);
            let _ = decode::<ModelChunk>(&m, Kind::ModelChunk, 4096);
            let _ = decode::<DeltaHeader>(&m, Kind::DeltaHeader, 4096);
        }

        #[test]
        fn chunk_round_trip(data in proptest::collection::vec(any::<u8>(), 0..2048), index in 0u32..100, round in any::<u64>()) {
            let c = DeltaChunk { client: "c".into(), round, index, total: index + 1, header: None, data };
            let bytes = encode(Kind::DeltaChunk, &c);
            prop_assert_eq!(decode::<DeltaChunk>(&bytes, Kind::DeltaChunk, 1 << 16).unwrap(), c);
        }
    }
}
