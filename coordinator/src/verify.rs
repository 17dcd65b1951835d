//! Verification of a reassembled delta upload, in the order of DESIGN §5.4: cheap checks first,
//! decoding last. Pure: no I/O, so every rejection path is unit-testable.

use crate::registry::FleetRegistry;
use coevo_models::ModelError;
use coevo_models::Weights;
use coevo_protocol::{
    digest, envelope::Kind, CodecError, DeltaHeader, Digest, RejectReason, Signed, UplinkCodec,
};

/// Largest signed header we decode.
pub const MAX_HEADER_BYTES: usize = 4096;

/// What a delta must match this round.
pub struct RoundContext<'a> {
    pub fleet: &'a str,
    pub round: u64,
    pub base_digest: Digest,
    pub uplink_codec: UplinkCodec,
    pub max_delta_bytes: u64,
    /// The global model: names and shapes every delta must have.
    pub layout: &'a Weights,
    pub registry: &'a FleetRegistry,
}

/// An upload that passed every check.
#[derive(Debug)]
pub struct Verified {
    pub header: DeltaHeader,
    pub delta: Weights,
}

/// Checks who sent a header: a registered client, signing for the id whose topic it used.
pub fn verify_signer(
    registry: &FleetRegistry,
    topic_client: &str,
    header: &Signed,
) -> Result<DeltaHeader, RejectReason> {
    let key = registry
        .key(topic_client)
        .ok_or(RejectReason::UnknownClient)?;
    let h: DeltaHeader = header
        .verify_from(Kind::DeltaHeader, topic_client, &key, MAX_HEADER_BYTES)
        .map_err(|e| match e {
            coevo_protocol::DecodeError::BadSignature
            | coevo_protocol::DecodeError::WrongSigner { .. } => RejectReason::BadSignature,
            other => RejectReason::Malformed(other.to_string()),
        })?;
    if h.client != topic_client {
        return Err(RejectReason::ClientMismatch);
    }
    Ok(h)
}

/// Checks the signed header of a delta sent on `topic_client`'s topic (signature, identity,
/// fleet, round, base model): everything that can be judged before the payload.
pub fn verify_header(
    ctx: &RoundContext<'_>,
    topic_client: &str,
    header: &Signed,
) -> Result<DeltaHeader, RejectReason> {
    let h = verify_signer(ctx.registry, topic_client, header)?;
    if h.fleet != ctx.fleet {
        return Err(RejectReason::WrongFleet);
    }
    if h.round != ctx.round {
        return Err(RejectReason::WrongRound {
            got: h.round,
            current: ctx.round,
        });
    }
    if h.base_digest != ctx.base_digest {
        return Err(RejectReason::WrongBase);
    }
    if h.codec != ctx.uplink_codec {
        return Err(RejectReason::Malformed(format!(
            "codec {} where the round asked for {}",
            h.codec, ctx.uplink_codec
        )));
    }
    if h.payload_len > ctx.max_delta_bytes {
        return Err(RejectReason::Oversized {
            bytes: h.payload_len,
            max: ctx.max_delta_bytes,
        });
    }
    Ok(h)
}

/// Full check of a complete upload.
pub fn verify_upload(
    ctx: &RoundContext<'_>,
    topic_client: &str,
    header: Option<&Signed>,
    payload: &[u8],
) -> Result<Verified, RejectReason> {
    let header = header.ok_or_else(|| RejectReason::Malformed("upload without a header".into()))?;
    let h = verify_header(ctx, topic_client, header)?;
    if payload.len() as u64 != h.payload_len {
        return Err(RejectReason::LengthMismatch {
            declared: h.payload_len,
            got: payload.len() as u64,
        });
    }
    if digest(payload) != h.payload_digest {
        return Err(RejectReason::DigestMismatch);
    }
    // Bounded by the round model's size and checked against its names and shapes while
    // decoding, so a payload can't make the coordinator allocate more than one model.
    let delta = Weights::decode_delta(payload, h.codec, ctx.layout).map_err(|e| match e {
        ModelError::Wire(CodecError::Layout(m)) => RejectReason::ShapeMismatch(m),
        ModelError::Wire(CodecError::NonFinite { .. }) => RejectReason::NonFinite,
        other => RejectReason::Malformed(other.to_string()),
    })?;
    if !delta.same_layout(ctx.layout) {
        return Err(RejectReason::ShapeMismatch(
            "tensor names or shapes differ from the round's model".into(),
        ));
    }
    if !delta.all_finite() {
        return Err(RejectReason::NonFinite);
    }
    Ok(Verified { header: h, delta })
}

#[cfg(test)]
mod tests {
    use super::*;
    use coevo_models::ParamTensor;
    use coevo_protocol::{LocalMetrics, SigningKey};

    struct Fixture {
        registry: FleetRegistry,
        key: SigningKey,
        layout: Weights,
        base: Digest,
    }

    fn fixture() -> Fixture {
        let key = SigningKey::generate().unwrap();
        let mut registry = FleetRegistry::default();
        registry.add("cam-1", &key.public_key()).unwrap();
        let mut layout = Weights::default();
        layout.tensors.insert(
            "w".into(),
            ParamTensor {
                shape: vec![2, 3],
                data: vec![0.0; 6],
            },
        );
        Fixture {
            registry,
            key,
            layout,
            base: digest(b"base model"),
        }
    }

    fn ctx(f: &Fixture) -> RoundContext<'_> {
        RoundContext {
            fleet: "city",
            round: 5,
            base_digest: f.base,
            uplink_codec: UplinkCodec::F32,
            max_delta_bytes: 1 << 20,
            layout: &f.layout,
            registry: &f.registry,
        }
    }

    /// A correctly signed upload of `delta`, after `tweak` edits the header.
    fn upload(
        f: &Fixture,
        delta: &Weights,
        tweak: impl FnOnce(&mut DeltaHeader),
    ) -> (Signed, Vec<u8>) {
        let payload = encode_f32(delta);
        let mut h = DeltaHeader {
            fleet: "city".into(),
            round: 5,
            client: "cam-1".into(),
            base_digest: f.base,
            samples: 10,
            metrics: LocalMetrics::default(),
            codec: UplinkCodec::F32,
            payload_digest: digest(&payload),
            payload_len: payload.len() as u64,
            chunks: 1,
        };
        tweak(&mut h);
        (
            Signed::sign(Kind::DeltaHeader, &h, &h.client.clone(), &f.key),
            payload,
        )
    }

    /// The `f32` payload of `delta`, NaNs included: the codec refuses to encode non-finite
    /// values, so they are written into the raw body (the last `4 · n` bytes) afterwards.
    fn encode_f32(delta: &Weights) -> Vec<u8> {
        let mut clean = delta.clone();
        for t in clean.tensors.values_mut() {
            t.data.iter_mut().for_each(|v| *v = 0.0);
        }
        let mut payload = UplinkCodec::F32.encode(&clean.to_named()).unwrap();
        let body: Vec<u8> = delta
            .tensors
            .values()
            .flat_map(|t| t.data.iter().flat_map(|v| v.to_le_bytes()))
            .collect();
        let start = payload.len() - body.len();
        payload[start..].copy_from_slice(&body);
        payload
    }

    fn code(r: Result<Verified, RejectReason>) -> &'static str {
        match r {
            Ok(_) => "accepted",
            Err(e) => e.code(),
        }
    }

    #[test]
    fn every_rejection_has_its_reason() {
        let f = fixture();
        let c = ctx(&f);
        let good = f.layout.clone();
        let (h, p) = upload(&f, &good, |_| {});
        assert_eq!(code(verify_upload(&c, "cam-1", Some(&h), &p)), "accepted");

        // forged: signed by a key the registry doesn't hold for cam-1
        let stranger = SigningKey::generate().unwrap();
        let (h, p) = upload(&f, &good, |_| {});
        let forged = Signed::sign(
            Kind::DeltaHeader,
            &h.verify::<DeltaHeader>(Kind::DeltaHeader, &f.key.public_key(), 4096)
                .unwrap(),
            "cam-1",
            &stranger,
        );
        assert_eq!(
            code(verify_upload(&c, "cam-1", Some(&forged), &p)),
            "bad-signature"
        );
        // tampered payload under a valid header
        let mut tampered = p.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert_eq!(
            code(verify_upload(&c, "cam-1", Some(&h), &tampered)),
            "digest-mismatch"
        );
        // truncated payload
        assert_eq!(
            code(verify_upload(&c, "cam-1", Some(&h), &p[..p.len() - 4])),
            "length-mismatch"
        );
        // someone else's id: header from cam-1 sent on another client's topic
        assert_eq!(
            code(verify_upload(&c, "cam-2", Some(&h), &p)),
            "unknown-client"
        );
        let mut reg2 = f.registry.clone();
        reg2.add("cam-2", &stranger.public_key()).unwrap();
        let c2 = RoundContext {
            registry: &reg2,
            ..ctx(&f)
        };
        assert_eq!(
            code(verify_upload(&c2, "cam-2", Some(&h), &p)),
            "bad-signature"
        );
        // wrong fleet, wrong round (replay), wrong base
        let (h, p) = upload(&f, &good, |h| h.fleet = "other".into());
        assert_eq!(
            code(verify_upload(&c, "cam-1", Some(&h), &p)),
            "wrong-fleet"
        );
        let (h, p) = upload(&f, &good, |h| h.round = 4);
        assert_eq!(
            code(verify_upload(&c, "cam-1", Some(&h), &p)),
            "wrong-round"
        );
        let (h, p) = upload(&f, &good, |h| h.base_digest = digest(b"old"));
        assert_eq!(code(verify_upload(&c, "cam-1", Some(&h), &p)), "wrong-base");
        // oversized
        let small = RoundContext {
            max_delta_bytes: 10,
            ..ctx(&f)
        };
        let (h, p) = upload(&f, &good, |_| {});
        assert_eq!(
            code(verify_upload(&small, "cam-1", Some(&h), &p)),
            "oversized"
        );
        // NaN values
        let mut nan = good.clone();
        if let Some(t) = nan.tensors.get_mut("w") {
            t.data[3] = f32::NAN;
        }
        let (h, p) = upload(&f, &nan, |_| {});
        assert_eq!(code(verify_upload(&c, "cam-1", Some(&h), &p)), "non-finite");
        // wrong shape
        let mut shape = Weights::default();
        shape.tensors.insert(
            "w".into(),
            ParamTensor {
                shape: vec![3, 2],
                data: vec![0.0; 6],
            },
        );
        let (h, p) = upload(&f, &shape, |_| {});
        assert_eq!(
            code(verify_upload(&c, "cam-1", Some(&h), &p)),
            "shape-mismatch"
        );
        // garbage payload with a matching header
        let junk = b"definitely not a codec payload".to_vec();
        let (h, _) = upload(&f, &good, |h| {
            h.payload_digest = digest(&junk);
            h.payload_len = junk.len() as u64;
        });
        assert_eq!(
            code(verify_upload(&c, "cam-1", Some(&h), &junk)),
            "malformed"
        );
        // another codec than the round's
        let (h, p) = upload(&f, &good, |h| h.codec = UplinkCodec::Int8);
        assert_eq!(code(verify_upload(&c, "cam-1", Some(&h), &p)), "malformed");
        // a top-k payload with more entries than its ρ allows
        let topk = RoundContext {
            uplink_codec: UplinkCodec::TopK {
                rho: 0.2,
                error_feedback: true,
            },
            ..ctx(&f)
        };
        let mut dense = good.clone();
        if let Some(t) = dense.tensors.get_mut("w") {
            t.data = vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        }
        let wide = UplinkCodec::TopK {
            rho: 1.0,
            error_feedback: true,
        };
        let payload = wide.encode(&dense.to_named()).unwrap();
        let (h, _) = upload(&f, &good, |h| {
            h.codec = topk.uplink_codec;
            h.payload_digest = digest(&payload);
            h.payload_len = payload.len() as u64;
        });
        assert_eq!(
            code(verify_upload(&topk, "cam-1", Some(&h), &payload)),
            "malformed"
        );
        // and one within it is accepted
        let payload = topk.uplink_codec.encode(&dense.to_named()).unwrap();
        let (h, _) = upload(&f, &good, |h| {
            h.codec = topk.uplink_codec;
            h.payload_digest = digest(&payload);
            h.payload_len = payload.len() as u64;
        });
        let v = verify_upload(&topk, "cam-1", Some(&h), &payload).unwrap();
        assert_eq!(
            v.delta.tensors["w"]
                .data
                .iter()
                .filter(|x| **x != 0.0)
                .count(),
            2
        );
        // no header at all
        assert_eq!(code(verify_upload(&c, "cam-1", None, &junk)), "malformed");
    }
}
