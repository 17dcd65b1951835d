//! `Weights::decode` for both codecs. Input: `[selector][bytes]`: bit 0 picks the codec, bit 1 a
//! small (4 KiB) or generous (16 MiB) size limit.
//!
//! Invariants: no panic, decoded sizes within the limit, and whatever decodes re-encodes and
//! decodes again to the same bytes.
#![no_main]

use coevo_models::{WeightCodec, Weights};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, bytes)) = data.split_first() else {
        return;
    };
    let codec = if sel & 1 == 0 {
        WeightCodec::F32
    } else {
        WeightCodec::F32Zstd
    };
    let max = if sel & 2 == 0 { 4 << 10 } else { 16 << 20 };
    let Ok(w) = Weights::decode(bytes, codec, max) else {
        return;
    };
    assert!(
        w.num_params() * 4 <= max,
        "{} params decoded under a {max} byte limit",
        w.num_params()
    );
    let enc = match w.encode(WeightCodec::F32) {
        Ok(e) => e,
        Err(e) => panic!("decoded weights do not re-encode: {e}"),
    };
    let w2 = match Weights::decode(&enc, WeightCodec::F32, usize::MAX) {
        Ok(w2) => w2,
        Err(e) => panic!("re-encoded weights do not decode: {e}"),
    };
    assert_eq!(w2.encode(WeightCodec::F32).ok(), Some(enc));
});
