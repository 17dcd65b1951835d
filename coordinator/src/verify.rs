//! Verification of a reassembled delta upload, in the order of DESIGN §5.4: cheap checks first,
//! decoding last. Pure: no I/O, so every rejection path is unit-testable.

use crate::registry::FleetRegistry;
use coevo_models::{WeightCodec as ModelCodec, Weights};
use coevo_protocol::{
    digest, envelope::Kind, DeltaHeader, Digest, RejectReason, Signed, WeightCodec,
};

/// Largest signed header we decode.
pub const MAX_HEADER_BYTES: usize = 4096;

/// What a delta must match this round.
pub struct RoundContext<'a> {
    pub fleet: &'a str,
    pub round: u64,
    pub base_digest: Digest,
    pub uplink_codec: WeightCodec,
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

/// Maps the wire codec to the models crate's codec.
pub fn model_codec(c: WeightCodec) -> ModelCodec {
    match c {
        WeightCodec::F32 => ModelCodec::F32,
        WeightCodec::F32Zstd => ModelCodec::F32Zstd,
    }
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
    // Decoded size can't exceed an f32 copy of the model (plus container overhead).
    let cap = ctx.layout.num_params() * 4 + 64 * 1024;
    let delta = Weights::decode(payload, model_codec(h.codec), cap)
        .map_err(|e| RejectReason::Malformed(e.to_string()))?;
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
