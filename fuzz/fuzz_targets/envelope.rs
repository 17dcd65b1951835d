//! Every envelope decoder on arbitrary bytes, plus signature verification with a fixed key.
//!
//! Invariants: no panic, and whatever decodes re-encodes to bytes that decode to the same
//! encoding (checked on bytes, so NaN floats in a manifest don't break equality).
#![no_main]

use std::sync::OnceLock;

use coevo_fuzz::{fixed_key, LIMIT};
use coevo_protocol::message::*;
use coevo_protocol::{envelope, Kind, PublicKey, Signed, SigningKey};
use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde::Serialize;

fn key() -> &'static (SigningKey, PublicKey) {
    static KEY: OnceLock<(SigningKey, PublicKey)> = OnceLock::new();
    KEY.get_or_init(|| {
        let k = fixed_key();
        let p = k.public_key();
        (k, p)
    })
}

/// Decodes `data` as a `kind` message; if that works, checks encode ∘ decode is stable.
fn round_trip<T: Serialize + DeserializeOwned>(data: &[u8], kind: Kind, limit: usize) -> Option<T> {
    let msg: T = envelope::decode(data, kind, limit).ok()?;
    let again = envelope::encode(kind, &msg);
    let msg2: T = match envelope::decode(&again, kind, LIMIT.max(again.len())) {
        Ok(m) => m,
        Err(e) => panic!("re-encoded {kind:?} does not decode: {e}"),
    };
    assert_eq!(
        envelope::encode(kind, &msg2),
        again,
        "{kind:?} encoding is not stable"
    );
    Some(msg)
}

/// A signed body (whatever its origin) verified with the fixed key as `kind` → `T`.
fn verify<T: DeserializeOwned>(s: &Signed, kind: Kind, limit: usize) {
    let (_, public) = key();
    let _ = s.verify::<T>(kind, public, limit);
    let _ = s.verify_from::<T>(kind, "coordinator", public, limit);
}

/// Signs `body` with the fixed key, so verification passes and the body decoder runs on
/// arbitrary bytes behind a valid signature (what a compromised-but-registered client sends).
fn sign_and_verify<T: DeserializeOwned>(body: &[u8], kind: Kind, signer: &str, limit: usize) {
    let (secret, public) = key();
    let mut msg = Vec::with_capacity(body.len() + 32);
    msg.extend_from_slice(b"coevo/v1\0");
    msg.push(kind as u8);
    msg.extend_from_slice(signer.as_bytes());
    msg.push(0);
    msg.extend_from_slice(body);
    let s = Signed {
        kind: kind as u8,
        signer: signer.into(),
        body: body.to_vec(),
        signature: secret.sign(&msg),
    };
    match s.verify::<T>(kind, public, limit) {
        Err(coevo_protocol::DecodeError::BadSignature) => {
            panic!("a body signed with the key does not verify")
        }
        _ => {}
    }
}

fuzz_target!(|data: &[u8]| {
    // The first byte picks a size limit so the bounded paths (TooLarge, bincode's own limit on
    // length prefixes) are exercised as well as the generous one.
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let limit = if sel & 0x80 != 0 {
        LIMIT
    } else {
        usize::from(sel) * 4
    };
    let _ = envelope::peek_kind(rest, limit);

    let _ = round_trip::<ModelChunk>(rest, Kind::ModelChunk, limit);
    let _ = round_trip::<Status>(rest, Kind::Status, limit);
    let _ = round_trip::<DeltaHeader>(rest, Kind::DeltaHeader, limit);
    if let Some(chunk) = round_trip::<DeltaChunk>(rest, Kind::DeltaChunk, limit) {
        if let Some(h) = &chunk.header {
            verify::<DeltaHeader>(h, Kind::DeltaHeader, limit);
        }
    }
    // Manifests and receipts travel as a `Signed` inside an envelope of their kind.
    if let Some(s) = round_trip::<Signed>(rest, Kind::Manifest, limit) {
        verify::<RoundManifest>(&s, Kind::Manifest, limit);
    }
    if let Some(s) = round_trip::<Signed>(rest, Kind::Receipt, limit) {
        verify::<Receipt>(&s, Kind::Receipt, limit);
    }

    // Behind a valid signature: each signed kind's body decoder on the raw bytes.
    match sel % 3 {
        0 => sign_and_verify::<RoundManifest>(rest, Kind::Manifest, "coordinator", limit),
        1 => sign_and_verify::<Receipt>(rest, Kind::Receipt, "coordinator", limit),
        _ => sign_and_verify::<DeltaHeader>(rest, Kind::DeltaHeader, "cam-1", limit),
    }
});
