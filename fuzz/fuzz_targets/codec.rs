//! The compression codecs' decoders (`coevo_protocol::codec`) on arbitrary bytes: the generic
//! `codec::decode`, the downlink/uplink decoders with their codec and ρ checks,
//! `ErrorFeedback::from_bytes`, and the codec-name parser. Input: `[selector][bytes]`: bit 0
//! picks a small (4096 parameters, 64 KiB) or generous (1M parameters, 16 MiB) limit, bit 1
//! whether to check against a fixed expected layout.
//!
//! Invariants: no panic; whatever decodes is within the parameter limit and finite, and
//! re-encodes as f32 to a payload that decodes to the same model; an f32 payload or a residual
//! that decodes re-encodes to exactly the input bytes (their encodings are canonical); a codec
//! name that parses prints as a name that parses to the same codec.
#![no_main]

use coevo_protocol::codec::{self, Limits, PayloadCodec};
use coevo_protocol::{DownlinkCodec, ErrorFeedback, TensorSpec, UplinkCodec};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, bytes)) = data.split_first() else {
        return;
    };
    let limits = if sel & 1 == 0 {
        Limits {
            max_params: 4096,
            max_bytes: 64 << 10,
        }
    } else {
        Limits {
            max_params: 1 << 20,
            max_bytes: 16 << 20,
        }
    };
    let fixed = [
        TensorSpec {
            name: "w".into(),
            shape: vec![4, 4],
        },
        TensorSpec {
            name: "b".into(),
            shape: vec![4],
        },
    ];
    let layout = (sel & 2 != 0).then_some(&fixed[..]);

    if let Ok(d) = codec::decode(bytes, limits, layout) {
        let n: usize = d.tensors.iter().map(|t| t.values.len()).sum();
        assert!(n <= limits.max_params, "{n} parameters decoded");
        assert!(d.entries <= n, "{} entries of {n}", d.entries);
        assert!(
            d.tensors
                .iter()
                .all(|t| t.values.iter().all(|v| v.is_finite())),
            "non-finite value decoded"
        );
        let enc = match DownlinkCodec::F32.encode(&d.tensors) {
            Ok(e) => e,
            Err(e) => panic!("decoded model does not re-encode: {e}"),
        };
        if d.codec == PayloadCodec::F32 {
            assert_eq!(enc, bytes, "f32 encoding is not canonical");
        }
        let exact = Limits {
            max_params: n,
            max_bytes: enc.len(),
        };
        match DownlinkCodec::F32.decode(&enc, exact, layout) {
            Ok(again) => assert_eq!(again, d.tensors, "f32 round trip changed the model"),
            Err(e) => panic!("re-encoded model does not decode: {e}"),
        }
    }
    for codec in [DownlinkCodec::F16, DownlinkCodec::Int8] {
        let _ = codec.decode(bytes, limits, layout);
    }
    for codec in [
        UplinkCodec::Int8,
        UplinkCodec::TopK {
            rho: 0.01,
            error_feedback: true,
        },
    ] {
        let _ = codec.decode(bytes, limits, layout);
    }

    if let Ok(ef) = ErrorFeedback::from_bytes(bytes, limits) {
        match ef.to_bytes() {
            Ok(again) => assert_eq!(again, bytes, "residual encoding is not canonical"),
            Err(e) => panic!("loaded residual does not re-encode: {e}"),
        }
    }

    if let Ok(s) = std::str::from_utf8(bytes) {
        if let Ok(c) = s.parse::<UplinkCodec>() {
            assert_eq!(c.to_string().parse::<UplinkCodec>().ok(), Some(c));
        }
        if let Ok(c) = s.parse::<DownlinkCodec>() {
            assert_eq!(c.to_string().parse::<DownlinkCodec>().ok(), Some(c));
        }
    }
});
