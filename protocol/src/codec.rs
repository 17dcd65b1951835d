//! Compression codecs for models going down to the fleet and deltas coming back up.
//!
//! One module, used by both ends (and by the fuzzers), so a payload is never encoded one way and
//! decoded another. The input and output of every codec is a model as an ordered list of
//! [`NamedTensor`]s (row-major `f32`, dim 0 = output channel).
//!
//! # Codecs
//!
//! | codec | direction | what is sent | error bound per value |
//! |---|---|---|---|
//! | `f32` ([`DownlinkCodec::F32`], [`UplinkCodec::F32`]) | both | raw little-endian `f32`, no zstd: the baseline | exact |
//! | `f16` ([`DownlinkCodec::F16`]) | down | IEEE half, byte planes, zstd | relative 2⁻¹¹ for normal halves (\|x\| ≥ 2⁻¹⁴), absolute 2⁻²⁵ below |
//! | `int8` ([`DownlinkCodec::Int8`], [`UplinkCodec::Int8`]) | both | affine `u8` per output channel, zstd | `scale/2`, `scale = (max − min)/255` of the value's row |
//! | `top-k:ρ` ([`UplinkCodec::TopK`]) | up | the ⌈ρ·n⌉ largest-magnitude entries, symmetric `i8` per tensor, delta-coded indices, zstd | kept: `scale/2`, `scale = max\|kept\|/127` of the tensor; dropped: the value itself (it stays in the [`ErrorFeedback`] residual) |
//!
//! Bounds hold up to `f32` rounding of the arithmetic (a few ulps of the row's magnitude) and for
//! rows whose range `max − min` is a normal `f32` (`int8` refuses rows whose range overflows).
//!
//! *Why per output channel for `int8`*: the rows of a weight matrix (filters of a conv) differ in
//! scale by orders of magnitude, and one scale per tensor would spend the 256 levels of a small
//! row on the range of the largest. A row costs 8 bytes of parameters, noise next to its values.
//!
//! *Why top-k selects over the whole model, not per tensor*: the byte budget goes where the update
//! is (a layer that barely moved this round sends nothing), the payload size follows from ρ and n
//! alone, and this is the operator whose convergence with error feedback is analysed (Stich et
//! al., "Sparsified SGD with memory", 2018). Layers starved in one round are not lost: their
//! entries grow in the residual until they are selected.
//!
//! # Wire format (version 1)
//!
//! ```text
//! payload = "CVCD" · version u8 · codec u8 · varint count · count × spec · body
//! spec    = varint name_len · name (UTF-8) · varint ndim · ndim × varint dim
//! body    f32:   Σ numel × f32 LE, uncompressed
//!         other: one zstd frame of
//!           f16:   per tensor, the numel low bytes then the numel high bytes of the halves
//!           int8:  per tensor, rows × (lo f32, scale f32) then numel × u8 q;   x̂ = lo + scale·q
//!           top-k: per tensor, varint k_t; if k_t > 0: scale f32, k_t varint index gaps
//!                  (first index, then idx_i − idx_(i−1) − 1), k_t × i8 q;    x̂ = scale·q
//! ```
//!
//! Varints are unsigned LEB128, canonical (no trailing zero groups), at most 10 bytes. The tensor
//! table sits outside the zstd frame so the decoder knows exactly how large the body may be
//! before it decompresses a byte: zstd output is capped at that size, and a frame that wants more
//! is a [`CodecError::BodyTooLarge`], not an allocation.
//!
//! # Decoding untrusted bytes
//!
//! [`decode`] needs only [`Limits`] (input bytes, total parameters) and optionally the expected
//! layout (names and shapes). Every length and count is checked against the bytes present and
//! the limits before anything is allocated from it; every failure is a typed [`CodecError`];
//! decoded values are always finite. No input makes it panic (see `tests/codec_props.rs` and the
//! `codec` fuzz target).

use std::collections::HashSet;
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use half::f16;
use half::slice::HalfFloatSliceExt;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// First bytes of every codec payload.
pub const MAGIC: [u8; 4] = *b"CVCD";
/// Version of the payload layout; a decoder refuses any other rather than guess.
pub const CODEC_VERSION: u8 = 1;
/// First bytes of a persisted [`ErrorFeedback`] residual.
pub const RESIDUAL_MAGIC: [u8; 4] = *b"CVEF";
/// Version of the residual file layout.
pub const RESIDUAL_VERSION: u8 = 1;
/// Longest tensor name accepted (bytes of UTF-8).
pub const MAX_NAME_LEN: usize = 1024;
/// Most dimensions a tensor may have (conv3d weights have 5).
pub const MAX_NDIM: usize = 8;
/// Most tensors in one payload: zero-sized tensors cost nothing against the parameter limit, so
/// without this a payload of empty tensors could make the decoder build millions of entries.
pub const MAX_TENSORS: usize = 1 << 16;

/// zstd level: 3 is zstd's default speed/ratio trade-off; on quantised weights higher levels
/// gain a few percent for several times the encode time.
const ZSTD_LEVEL: i32 = 3;
/// Largest zstd window (log2 bytes) a decoder accepts: 8 MiB. A frame may ask for up to 128 MiB,
/// which the decoder would allocate up front whatever the output cap; ours never use more than
/// the level-3 default of 2 MiB.
const ZSTD_MAX_WINDOW_LOG: u32 = 23;
/// Length of the SHA-256 trailer of a residual file.
const DIGEST_LEN: usize = 32;

/// Everything that can go wrong encoding, decoding, parsing a codec name or persisting a
/// residual. Decoders return these for every malformed input; none of them panics.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    #[error("payload of {got} bytes exceeds the limit of {limit}")]
    TooLarge { got: usize, limit: usize },
    #[error("payload truncated in {0}")]
    Truncated(&'static str),
    #[error("not a coevo codec payload (bad magic)")]
    BadMagic,
    #[error("unsupported codec format version {0}")]
    Version(u8),
    #[error("unknown codec id {0}")]
    UnknownCodec(u8),
    #[error("expected a {expected} payload, got {got}")]
    WrongCodec {
        expected: PayloadCodec,
        got: PayloadCodec,
    },
    #[error("payload has more than {limit} parameters (at least {got})")]
    TooManyParams { got: usize, limit: usize },
    #[error("tensor {tensor:?}: shape overflows")]
    ShapeOverflow { tensor: String },
    #[error("decompressed body exceeds the {limit} bytes its header allows")]
    BodyTooLarge { limit: usize },
    #[error("malformed payload: {0}")]
    Malformed(String),
    #[error("layout mismatch: {0}")]
    Layout(String),
    #[error("tensor {tensor:?}: non-finite {what}")]
    NonFinite { tensor: String, what: &'static str },
    #[error("tensor {tensor:?}: value {value} is outside the codec's range")]
    OutOfRange { tensor: String, value: f32 },
    #[error("invalid tensor {tensor:?}: {reason}")]
    InvalidTensor { tensor: String, reason: String },
    #[error("top-k payload carries {got} entries, more than the {limit} its ρ allows")]
    TooManyEntries { got: usize, limit: usize },
    #[error("zstd: {0}")]
    Zstd(String),
    #[error("invalid codec {0:?}: expected f32, f16, int8, top-k:RHO or top-k:RHO:no-ef with 0 < RHO <= 1")]
    Spec(String),
    #[error("residual checksum mismatch")]
    Checksum,
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
}

/// One named parameter tensor: row-major values, dim 0 = output channel.
#[derive(Clone, Debug, PartialEq)]
pub struct NamedTensor {
    pub name: String,
    /// Dimensions; the empty shape is a scalar (one value).
    pub shape: Vec<usize>,
    /// `shape.iter().product()` values, row-major.
    pub values: Vec<f32>,
}

impl NamedTensor {
    /// A tensor, checking that `values` has as many entries as `shape` describes.
    pub fn new(
        name: impl Into<String>,
        shape: Vec<usize>,
        values: Vec<f32>,
    ) -> Result<Self, CodecError> {
        let t = NamedTensor {
            name: name.into(),
            shape,
            values,
        };
        let numel = numel(&t.name, &t.shape)?;
        if numel != t.values.len() {
            return Err(CodecError::InvalidTensor {
                tensor: t.name,
                reason: format!("shape holds {numel} values, got {}", t.values.len()),
            });
        }
        Ok(t)
    }

    /// A tensor of zeros with `spec`'s name and shape.
    pub fn zeros(spec: &TensorSpec) -> Result<Self, CodecError> {
        let n = numel(&spec.name, &spec.shape)?;
        NamedTensor::new(spec.name.clone(), spec.shape.clone(), vec![0.0; n])
    }

    /// Its name and shape.
    pub fn spec(&self) -> TensorSpec {
        TensorSpec {
            name: self.name.clone(),
            shape: self.shape.clone(),
        }
    }
}

/// A tensor's name and shape: what a decoder checks a payload against when the layout is known.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

/// Bounds for decoding untrusted bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest total number of parameters the payload may declare; the decoded model is at most
    /// `4 · max_params` bytes of values (decompressed bodies are bounded by it too).
    pub max_params: usize,
    /// Largest encoded payload (or residual file) accepted, in bytes.
    pub max_bytes: usize,
}

impl Limits {
    /// Limits for a model of up to `max_params` parameters in any codec, `f32` included: room for
    /// the dense values plus 1 MiB of tensor table.
    pub fn for_params(max_params: usize) -> Self {
        Limits {
            max_params,
            max_bytes: max_params.saturating_mul(4).saturating_add(1 << 20),
        }
    }
}

/// The codec a payload says it uses (its codec byte).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PayloadCodec {
    F32 = 1,
    F16 = 2,
    /// Affine `u8` per output channel.
    Int8 = 3,
    /// Top-k, symmetric `i8` per tensor.
    TopK = 4,
}

impl PayloadCodec {
    fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            1 => PayloadCodec::F32,
            2 => PayloadCodec::F16,
            3 => PayloadCodec::Int8,
            4 => PayloadCodec::TopK,
            _ => return None,
        })
    }
}

impl fmt::Display for PayloadCodec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PayloadCodec::F32 => "f32",
            PayloadCodec::F16 => "f16",
            PayloadCodec::Int8 => "int8",
            PayloadCodec::TopK => "top-k",
        })
    }
}

/// How the coordinator compresses the student it broadcasts. Written `f32` (or `none`), `f16`,
/// `int8` in configs, CLIs and (as that string) in serde formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DownlinkCodec {
    F32,
    F16,
    /// Affine per output channel + zstd.
    Int8,
}

impl DownlinkCodec {
    /// The codec byte its payloads carry.
    pub fn payload_codec(self) -> PayloadCodec {
        match self {
            DownlinkCodec::F32 => PayloadCodec::F32,
            DownlinkCodec::F16 => PayloadCodec::F16,
            DownlinkCodec::Int8 => PayloadCodec::Int8,
        }
    }

    /// Encodes a model. Fails on non-finite values, inconsistent shapes, duplicate or overlong
    /// names, and (f16) values beyond ±65504.
    pub fn encode(self, model: &[NamedTensor]) -> Result<Vec<u8>, CodecError> {
        encode_payload(self.payload_codec(), model, 0, None)
    }

    /// Decodes a model, refusing a payload of any other codec (the manifest names the codec, so
    /// a mismatch is a fault, not something to adapt to).
    pub fn decode(
        self,
        bytes: &[u8],
        limits: Limits,
        layout: Option<&[TensorSpec]>,
    ) -> Result<Vec<NamedTensor>, CodecError> {
        let d = decode(bytes, limits, layout)?;
        check_codec(self.payload_codec(), d.codec)?;
        Ok(d.tensors)
    }
}

impl fmt::Display for DownlinkCodec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.payload_codec().fmt(f)
    }
}

impl FromStr for DownlinkCodec {
    type Err = CodecError;

    fn from_str(s: &str) -> Result<Self, CodecError> {
        match s {
            "f32" | "none" => Ok(DownlinkCodec::F32),
            "f16" => Ok(DownlinkCodec::F16),
            "int8" => Ok(DownlinkCodec::Int8),
            _ => Err(CodecError::Spec(s.to_string())),
        }
    }
}

/// How clients compress their deltas. Written `f32` (or `none`), `int8`, `top-k:ρ` (with error
/// feedback) or `top-k:ρ:no-ef` in configs, CLIs and (as that string) in serde formats.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum UplinkCodec {
    F32,
    /// Affine per output channel + zstd (the downlink `int8`).
    Int8,
    /// The ⌈ρ·n⌉ largest-magnitude entries of the whole delta; see [`UplinkCodec::keep_count`].
    TopK {
        /// Fraction of entries kept, in (0, 1].
        rho: f32,
        /// Whether clients carry what wasn't sent over to the next round ([`ErrorFeedback`]).
        /// Without it top-k is biased: small coordinates are never sent at all.
        error_feedback: bool,
    },
}

impl UplinkCodec {
    /// The codec byte its payloads carry.
    pub fn payload_codec(self) -> PayloadCodec {
        match self {
            UplinkCodec::F32 => PayloadCodec::F32,
            UplinkCodec::Int8 => PayloadCodec::Int8,
            UplinkCodec::TopK { .. } => PayloadCodec::TopK,
        }
    }

    /// Whether [`ErrorFeedback::compress`] carries the residual for this codec: always, except
    /// for `top-k:…:no-ef`. (For `f32` the residual is zero after every round, so a residual
    /// left from a lossy codec is flushed in full.)
    pub fn error_feedback(self) -> bool {
        match self {
            UplinkCodec::F32 | UplinkCodec::Int8 => true,
            UplinkCodec::TopK { error_feedback, .. } => error_feedback,
        }
    }

    /// Entries sent out of `n`: all of them for dense codecs; ⌈ρ·n⌉ for top-k.
    ///
    /// ρ is taken as the decimal it prints as (so `0.1` is 0.1, not the f32 0.100000001) and a
    /// product within 10⁻¹² of an integer counts as that integer: `top-k:0.1` keeps exactly
    /// 100 000 of 1 000 000, not 100 001. Both ends use this function, so they agree.
    pub fn keep_count(self, n: usize) -> Result<usize, CodecError> {
        match self {
            UplinkCodec::F32 | UplinkCodec::Int8 => Ok(n),
            UplinkCodec::TopK { rho, .. } => {
                check_rho(rho)?;
                let rho = rho.to_string().parse::<f64>().unwrap_or(f64::from(rho));
                let x = rho * n as f64;
                let k = (x * (1.0 - 1e-12)).ceil();
                // `as` saturates; k ≤ n for ρ ≤ 1 anyway.
                Ok((k as usize).min(n))
            }
        }
    }

    /// Encodes a delta as it is, without error feedback (use [`ErrorFeedback::compress`] on
    /// clients). Fails on non-finite values, inconsistent shapes, duplicate or overlong names,
    /// and an out-of-range ρ.
    pub fn encode(self, delta: &[NamedTensor]) -> Result<Vec<u8>, CodecError> {
        let k = self.keep_count(total_params(delta)?)?;
        encode_payload(self.payload_codec(), delta, k, None)
    }

    /// Decodes a delta, refusing a payload of another codec and a top-k payload carrying more
    /// entries than [`UplinkCodec::keep_count`] allows.
    pub fn decode(
        self,
        bytes: &[u8],
        limits: Limits,
        layout: Option<&[TensorSpec]>,
    ) -> Result<Vec<NamedTensor>, CodecError> {
        let d = decode(bytes, limits, layout)?;
        check_codec(self.payload_codec(), d.codec)?;
        let n = total_params(&d.tensors)?;
        let limit = self.keep_count(n)?;
        if d.entries > limit {
            return Err(CodecError::TooManyEntries {
                got: d.entries,
                limit,
            });
        }
        Ok(d.tensors)
    }
}

fn check_rho(rho: f32) -> Result<(), CodecError> {
    if rho.is_finite() && rho > 0.0 && rho <= 1.0 {
        Ok(())
    } else {
        Err(CodecError::Spec(format!("top-k:{rho}")))
    }
}

fn check_codec(expected: PayloadCodec, got: PayloadCodec) -> Result<(), CodecError> {
    if expected == got {
        Ok(())
    } else {
        Err(CodecError::WrongCodec { expected, got })
    }
}

impl fmt::Display for UplinkCodec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UplinkCodec::F32 => f.write_str("f32"),
            UplinkCodec::Int8 => f.write_str("int8"),
            UplinkCodec::TopK {
                rho,
                error_feedback: true,
            } => write!(f, "top-k:{rho}"),
            UplinkCodec::TopK {
                rho,
                error_feedback: false,
            } => write!(f, "top-k:{rho}:no-ef"),
        }
    }
}

impl FromStr for UplinkCodec {
    type Err = CodecError;

    fn from_str(s: &str) -> Result<Self, CodecError> {
        let bad = || CodecError::Spec(s.to_string());
        match s {
            "f32" | "none" => return Ok(UplinkCodec::F32),
            "int8" => return Ok(UplinkCodec::Int8),
            _ => {}
        }
        let mut parts = s.split(':');
        if parts.next() != Some("top-k") {
            return Err(bad());
        }
        let rho: f32 = parts.next().and_then(|r| r.parse().ok()).ok_or_else(bad)?;
        check_rho(rho).map_err(|_| bad())?;
        let error_feedback = match parts.next() {
            None | Some("ef") => true,
            Some("no-ef") => false,
            Some(_) => return Err(bad()),
        };
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(UplinkCodec::TopK {
            rho,
            error_feedback,
        })
    }
}

/// Serde as the string of `Display`/`FromStr`, so a TOML config says `codec = "top-k:0.01"`.
macro_rules! serde_as_string {
    ($t:ty) => {
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}
serde_as_string!(DownlinkCodec);
serde_as_string!(UplinkCodec);

/// A decoded payload.
#[derive(Clone, Debug, PartialEq)]
pub struct Decoded {
    /// The codec its header names.
    pub codec: PayloadCodec,
    /// The model, dense (top-k's dropped entries are zeros), in payload order.
    pub tensors: Vec<NamedTensor>,
    /// Values the payload actually carried: every parameter for dense codecs, k for top-k.
    pub entries: usize,
}

/// Decodes any codec payload within `limits`, checking it against `layout` when given.
///
/// This is the one decoder; [`DownlinkCodec::decode`] and [`UplinkCodec::decode`] add the check
/// that the codec is the expected one.
pub fn decode(
    bytes: &[u8],
    limits: Limits,
    layout: Option<&[TensorSpec]>,
) -> Result<Decoded, CodecError> {
    if bytes.len() > limits.max_bytes {
        return Err(CodecError::TooLarge {
            got: bytes.len(),
            limit: limits.max_bytes,
        });
    }
    let mut r = Reader::new(bytes);
    let (codec, specs) = read_header(&mut r, limits, layout)?;
    let body = r.rest();
    let mut entries = 0;
    let tensors = match codec {
        PayloadCodec::F32 => {
            entries = specs.iter().map(|s| s.numel).sum();
            decode_f32(&specs, body)?
        }
        PayloadCodec::F16 => {
            entries = specs.iter().map(|s| s.numel).sum();
            let cap = checked_sum(specs.iter().map(|s| s.numel.checked_mul(2)))?;
            let body = decompress(body, cap, true)?;
            decode_f16(&specs, &body)?
        }
        PayloadCodec::Int8 => {
            entries = specs.iter().map(|s| s.numel).sum();
            let cap = checked_sum(specs.iter().map(|s| {
                rows(&s.shape, s.numel)
                    .checked_mul(8)
                    .and_then(|p| p.checked_add(s.numel))
            }))?;
            let body = decompress(body, cap, true)?;
            decode_int8(&specs, &body)?
        }
        PayloadCodec::TopK => {
            // k_t varint + scale + ≤ 10 bytes of index and 1 of value per entry.
            let cap = checked_sum(
                specs
                    .iter()
                    .map(|s| s.numel.checked_mul(11).and_then(|b| b.checked_add(14))),
            )?;
            let body = decompress(body, cap, false)?;
            decode_top_k(&specs, &body, &mut entries)?
        }
    };
    Ok(Decoded {
        codec,
        tensors,
        entries,
    })
}

/// The client side of error feedback: what previous rounds computed but did not send.
///
/// Each round the client compresses `delta + residual` and keeps as the new residual everything
/// the server will not reconstruct (entries top-k dropped, int8 rounding error), so over rounds
/// the server receives the whole sum: Σ decoded payloads + final residual = Σ deltas. Without it
/// top-k never sends small coordinates at all and training stalls at high compression.
///
/// It must survive a client restart (else the unsent mass is lost), hence
/// [`ErrorFeedback::save`] / [`ErrorFeedback::load`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ErrorFeedback {
    /// Empty until the first round: a zero residual of any layout.
    residual: Vec<NamedTensor>,
}

impl ErrorFeedback {
    /// A zero residual.
    pub fn new() -> Self {
        Self::default()
    }

    /// The residual: empty (zero) before the first compression, else the last delta's layout.
    pub fn residual(&self) -> &[NamedTensor] {
        &self.residual
    }

    /// L2 norm of the residual (0 before the first compression): how much unsent update the
    /// client is carrying, for logs and tests.
    pub fn residual_norm(&self) -> f64 {
        self.residual
            .iter()
            .flat_map(|t| &t.values)
            .map(|&v| f64::from(v) * f64::from(v))
            .sum::<f64>()
            .sqrt()
    }

    /// Compresses `delta + residual` with `codec` and returns the payload and the new state;
    /// `self` is unchanged, so the caller decides when to commit (e.g. [`ErrorFeedback::save`]
    /// the new state, then replace the old one).
    ///
    /// With `top-k:…:no-ef` the delta is encoded alone and the residual returned unchanged.
    /// Fails with [`CodecError::Layout`] if the delta's names and shapes differ from the
    /// residual's (a new model architecture: start from [`ErrorFeedback::new`]).
    pub fn compress(
        &self,
        delta: &[NamedTensor],
        codec: UplinkCodec,
    ) -> Result<(Vec<u8>, ErrorFeedback), CodecError> {
        if !codec.error_feedback() {
            return Ok((codec.encode(delta)?, self.clone()));
        }
        let sum = if self.residual.is_empty() {
            delta.to_vec()
        } else {
            add_same_layout(delta, &self.residual)?
        };
        let k = codec.keep_count(total_params(&sum)?)?;
        let mut error = Vec::with_capacity(sum.len());
        let payload = encode_payload(codec.payload_codec(), &sum, k, Some(&mut error))?;
        let residual = sum
            .into_iter()
            .zip(error)
            .map(|(t, values)| NamedTensor { values, ..t })
            .collect();
        Ok((payload, ErrorFeedback { residual }))
    }

    /// The residual as bytes: `"CVEF" · version · f32 codec payload · SHA-256 of all before`.
    /// Exact (f32), so a restart continues bit for bit where it stopped.
    pub fn to_bytes(&self) -> Result<Vec<u8>, CodecError> {
        let payload = encode_payload(PayloadCodec::F32, &self.residual, 0, None)?;
        let mut out = Vec::with_capacity(payload.len() + 5 + DIGEST_LEN);
        out.extend_from_slice(&RESIDUAL_MAGIC);
        out.push(RESIDUAL_VERSION);
        out.extend_from_slice(&payload);
        let d = crate::crypto::digest(&out);
        out.extend_from_slice(&d.0);
        Ok(out)
    }

    /// Reads what [`ErrorFeedback::to_bytes`] wrote, bounded by `limits` (the whole file counts
    /// against `max_bytes`), refusing a bad checksum, another version or non-finite values.
    pub fn from_bytes(bytes: &[u8], limits: Limits) -> Result<Self, CodecError> {
        if bytes.len() > limits.max_bytes {
            return Err(CodecError::TooLarge {
                got: bytes.len(),
                limit: limits.max_bytes,
            });
        }
        let Some((content, sum)) = bytes.split_at_checked(bytes.len().saturating_sub(DIGEST_LEN))
        else {
            return Err(CodecError::Truncated("residual"));
        };
        if content.len() < 5 || sum.len() != DIGEST_LEN {
            return Err(CodecError::Truncated("residual header"));
        }
        if content[..4] != RESIDUAL_MAGIC {
            return Err(CodecError::BadMagic);
        }
        if content[4] != RESIDUAL_VERSION {
            return Err(CodecError::Version(content[4]));
        }
        if crate::crypto::digest(content).0 != sum {
            return Err(CodecError::Checksum);
        }
        let d = decode(&content[5..], limits, None)?;
        check_codec(PayloadCodec::F32, d.codec)?;
        Ok(ErrorFeedback {
            residual: d.tensors,
        })
    }

    /// Writes the residual to `path` atomically: a temporary file beside it, fsync, rename,
    /// fsync of the directory. A crash leaves the old file or the new one, never a torn one.
    pub fn save(&self, path: &Path) -> Result<(), CodecError> {
        let bytes = self.to_bytes()?;
        let io_err = |p: &Path| {
            let p = p.to_path_buf();
            move |source| CodecError::Io { path: p, source }
        };
        let Some(file_name) = path.file_name() else {
            return Err(CodecError::Io {
                path: path.to_path_buf(),
                source: io::Error::new(io::ErrorKind::InvalidInput, "not a file path"),
            });
        };
        let mut tmp_name = file_name.to_os_string();
        tmp_name.push(".tmp");
        let tmp = path.with_file_name(tmp_name);
        {
            let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
            f.write_all(&bytes).map_err(io_err(&tmp))?;
            f.sync_all().map_err(io_err(&tmp))?;
        }
        fs::rename(&tmp, path).map_err(io_err(path))?;
        // The rename is durable only once the directory entry is on disk.
        #[cfg(unix)]
        {
            let dir = match path.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => Path::new("."),
            };
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err(dir))?;
        }
        Ok(())
    }

    /// Reads a residual saved by [`ErrorFeedback::save`]; `Ok(None)` if there is no file yet
    /// (first run). Reads at most `limits.max_bytes + 1` bytes whatever the file's size.
    pub fn load(path: &Path, limits: Limits) -> Result<Option<Self>, CodecError> {
        let io_err = |source| CodecError::Io {
            path: path.to_path_buf(),
            source,
        };
        let f = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(e)),
        };
        let mut bytes = Vec::new();
        let cap = u64::try_from(limits.max_bytes)
            .unwrap_or(u64::MAX)
            .saturating_add(1);
        f.take(cap).read_to_end(&mut bytes).map_err(io_err)?;
        Self::from_bytes(&bytes, limits).map(Some)
    }
}

// ---------------------------------------------------------------------------------------------
// Encoding

/// Checks what every encoder needs: consistent shapes, unique short names, finite values.
fn validate(tensors: &[NamedTensor]) -> Result<(), CodecError> {
    if tensors.len() > MAX_TENSORS {
        return Err(CodecError::InvalidTensor {
            tensor: String::new(),
            reason: format!("{} tensors, more than {MAX_TENSORS}", tensors.len()),
        });
    }
    let mut names = HashSet::with_capacity(tensors.len());
    for t in tensors {
        let invalid = |reason: String| CodecError::InvalidTensor {
            tensor: t.name.clone(),
            reason,
        };
        if t.name.len() > MAX_NAME_LEN {
            return Err(invalid(format!("name longer than {MAX_NAME_LEN} bytes")));
        }
        if !names.insert(t.name.as_str()) {
            return Err(invalid("duplicate name".into()));
        }
        if t.shape.len() > MAX_NDIM {
            return Err(invalid(format!("more than {MAX_NDIM} dimensions")));
        }
        let n = numel(&t.name, &t.shape)?;
        if n != t.values.len() {
            return Err(invalid(format!(
                "shape holds {n} values, got {}",
                t.values.len()
            )));
        }
        if !t.values.iter().all(|v| v.is_finite()) {
            return Err(CodecError::NonFinite {
                tensor: t.name.clone(),
                what: "value",
            });
        }
    }
    Ok(())
}

/// Encodes `tensors` as `codec` (`keep` entries for top-k). With `error`, also pushes per tensor
/// `x − x̂`, computed with the decoder's own arithmetic so error feedback is exact.
fn encode_payload(
    codec: PayloadCodec,
    tensors: &[NamedTensor],
    keep: usize,
    mut error: Option<&mut Vec<Vec<f32>>>,
) -> Result<Vec<u8>, CodecError> {
    validate(tensors)?;
    let n = total_params(tensors)?;
    let mut out = Vec::with_capacity(64 + tensors.len() * 32);
    out.extend_from_slice(&MAGIC);
    out.push(CODEC_VERSION);
    out.push(codec as u8);
    put_varint(&mut out, tensors.len() as u64);
    for t in tensors {
        put_varint(&mut out, t.name.len() as u64);
        out.extend_from_slice(t.name.as_bytes());
        put_varint(&mut out, t.shape.len() as u64);
        for &d in &t.shape {
            put_varint(&mut out, d as u64);
        }
    }
    match codec {
        PayloadCodec::F32 => {
            out.reserve(n * 4);
            for t in tensors {
                for v in &t.values {
                    out.extend_from_slice(&v.to_le_bytes());
                }
                if let Some(e) = error.as_deref_mut() {
                    e.push(vec![0.0; t.values.len()]);
                }
            }
        }
        PayloadCodec::F16 => {
            let mut body = Vec::with_capacity(n * 2);
            let mut halves = Vec::new();
            for t in tensors {
                halves.clear();
                halves.resize(t.values.len(), f16::ZERO);
                halves.convert_from_f32_slice(&t.values);
                if let Some(i) = halves.iter().position(|h| !h.is_finite()) {
                    return Err(CodecError::OutOfRange {
                        tensor: t.name.clone(),
                        value: t.values.get(i).copied().unwrap_or(f32::NAN),
                    });
                }
                // Byte planes: the high bytes (sign, exponent) are what zstd can compress.
                body.extend(halves.iter().map(|h| h.to_bits() as u8));
                body.extend(halves.iter().map(|h| (h.to_bits() >> 8) as u8));
                if let Some(e) = error.as_deref_mut() {
                    e.push(
                        t.values
                            .iter()
                            .zip(&halves)
                            .map(|(x, h)| x - h.to_f32())
                            .collect(),
                    );
                }
            }
            compress_into(&mut out, &body)?;
        }
        PayloadCodec::Int8 => {
            let mut body = Vec::with_capacity(n + 64);
            for t in tensors {
                let rows = rows(&t.shape, t.values.len());
                let mut e = error.as_ref().map(|_| Vec::with_capacity(t.values.len()));
                // Empty tensors have no rows (and nothing to send).
                if let Some(row_len) = t.values.len().checked_div(rows) {
                    let params = t
                        .values
                        .chunks_exact(row_len)
                        .map(affine_params)
                        .collect::<Option<Vec<_>>>()
                        .ok_or_else(|| CodecError::OutOfRange {
                            tensor: t.name.clone(),
                            value: t.values.iter().fold(0.0, |m, v| m.max(v.abs())),
                        })?;
                    for (lo, scale) in &params {
                        body.extend_from_slice(&lo.to_le_bytes());
                        body.extend_from_slice(&scale.to_le_bytes());
                    }
                    for (row, &(lo, scale)) in t.values.chunks_exact(row_len).zip(&params) {
                        let start = body.len();
                        affine_quantise(row, lo, scale, &mut body);
                        if let Some(e) = e.as_mut() {
                            e.extend(
                                row.iter()
                                    .zip(&body[start..])
                                    .map(|(x, &q)| x - affine_value(lo, scale, q)),
                            );
                        }
                    }
                }
                if let (Some(errors), Some(e)) = (error.as_deref_mut(), e) {
                    errors.push(e);
                }
            }
            compress_into(&mut out, &body)?;
        }
        PayloadCodec::TopK => {
            let kept = select_top_k(tensors, keep);
            let total: usize = kept.iter().map(Vec::len).sum();
            let mut body = Vec::with_capacity(total * 3 + tensors.len() * 8);
            for (t, idx) in tensors.iter().zip(&kept) {
                put_varint(&mut body, idx.len() as u64);
                let mut e = error.as_ref().map(|_| t.values.clone());
                if !idx.is_empty() {
                    let amax = idx
                        .iter()
                        .filter_map(|&i| t.values.get(i))
                        .fold(0.0f32, |m, v| m.max(v.abs()));
                    let scale = amax / 127.0;
                    body.extend_from_slice(&scale.to_le_bytes());
                    let mut next = 0;
                    for &i in idx {
                        put_varint(&mut body, (i - next) as u64);
                        next = i + 1;
                    }
                    let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
                    for &i in idx {
                        let x = t.values.get(i).copied().unwrap_or(0.0);
                        let q = (x * inv).round().clamp(-127.0, 127.0) as i8;
                        body.push(q as u8);
                        if let Some(v) = e.as_mut().and_then(|e| e.get_mut(i)) {
                            *v = x - symmetric_value(scale, q);
                        }
                    }
                }
                if let (Some(errors), Some(e)) = (error.as_deref_mut(), e) {
                    errors.push(e);
                }
            }
            compress_into(&mut out, &body)?;
        }
    }
    Ok(out)
}

/// Indices (ascending, per tensor) of the `k` largest-magnitude entries over all tensors; ties
/// at the threshold go to the earliest entries (tensor order, then index), and zeros are never
/// kept (they decode as zero anyway), so fewer than `k` come back if fewer are non-zero.
fn select_top_k(tensors: &[NamedTensor], k: usize) -> Vec<Vec<usize>> {
    // |x| as bits: for finite floats the order of the bit patterns is the order of magnitudes,
    // and integer selection is faster than float comparison.
    let mut mags: Vec<u32> = tensors
        .iter()
        .flat_map(|t| t.values.iter().map(|v| v.to_bits() & 0x7fff_ffff))
        .collect();
    let n = mags.len();
    if k == 0 || n == 0 {
        return vec![Vec::new(); tensors.len()];
    }
    let k = k.min(n);
    let (_, &mut threshold, upper) = mags.select_nth_unstable(n - k);
    let above = upper.iter().filter(|&&m| m > threshold).count();
    let mut ties = if threshold == 0 { 0 } else { k - above };
    tensors
        .iter()
        .map(|t| {
            let mut idx = Vec::new();
            for (i, v) in t.values.iter().enumerate() {
                let m = v.to_bits() & 0x7fff_ffff;
                if m > threshold {
                    idx.push(i);
                } else if m == threshold && ties > 0 {
                    ties -= 1;
                    idx.push(i);
                }
            }
            idx
        })
        .collect()
}

/// A row's affine parameters: `lo` = its minimum (the zero point, as an f32 rather than an
/// integer so there is no clamping term in the bound) and `scale = (max − min)/255`; `None` if
/// the row's range or its top code overflows f32 (values near ±1.7e38), which the decoder would
/// refuse.
fn affine_params(row: &[f32]) -> Option<(f32, f32)> {
    let (lo, hi) = row
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        });
    if row.is_empty() {
        return Some((0.0, 0.0));
    }
    let scale = (hi - lo) / 255.0;
    affine_value(lo, scale, 255)
        .is_finite()
        .then_some((lo, scale))
}

fn affine_quantise(row: &[f32], lo: f32, scale: f32, out: &mut Vec<u8>) {
    if scale > 0.0 {
        let inv = 1.0 / scale;
        // x ≥ lo, so (x − lo)·inv ≥ 0 and adding ½ then truncating rounds to nearest; the cast
        // saturates at 255 (and maps NaN, impossible here, to 0).
        out.extend(row.iter().map(|&x| ((x - lo) * inv + 0.5) as u8));
    } else {
        out.resize(out.len() + row.len(), 0);
    }
}

/// The value of `int8` code `q`: shared by encoder (for the residual) and decoder.
#[inline]
fn affine_value(lo: f32, scale: f32, q: u8) -> f32 {
    lo + scale * f32::from(q)
}

/// The value of top-k code `q`: shared by encoder (for the residual) and decoder.
#[inline]
fn symmetric_value(scale: f32, q: i8) -> f32 {
    scale * f32::from(q)
}

fn compress_into(out: &mut Vec<u8>, body: &[u8]) -> Result<(), CodecError> {
    let z = zstd::bulk::compress(body, ZSTD_LEVEL).map_err(|e| CodecError::Zstd(e.to_string()))?;
    out.extend_from_slice(&z);
    Ok(())
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

// ---------------------------------------------------------------------------------------------
// Decoding

/// A header entry, with its (already bounded) element count.
struct Spec {
    name: String,
    shape: Vec<usize>,
    numel: usize,
}

/// Reads magic, version, codec and the tensor table, checking every count against the bytes
/// present, `limits` and `layout`.
fn read_header(
    r: &mut Reader<'_>,
    limits: Limits,
    layout: Option<&[TensorSpec]>,
) -> Result<(PayloadCodec, Vec<Spec>), CodecError> {
    if r.take(4, "magic")? != MAGIC {
        return Err(CodecError::BadMagic);
    }
    let version = r.u8("version")?;
    if version != CODEC_VERSION {
        return Err(CodecError::Version(version));
    }
    let id = r.u8("codec")?;
    let codec = PayloadCodec::from_byte(id).ok_or(CodecError::UnknownCodec(id))?;
    let count = r.varint_usize("tensor count")?;
    if count > MAX_TENSORS {
        return Err(CodecError::Malformed(format!(
            "{count} tensors, more than {MAX_TENSORS}"
        )));
    }
    if let Some(layout) = layout {
        if count != layout.len() {
            return Err(CodecError::Layout(format!(
                "{count} tensors, expected {}",
                layout.len()
            )));
        }
    }
    // Each entry takes at least two bytes (name length, ndim).
    if count > r.remaining() / 2 {
        return Err(CodecError::Truncated("tensor table"));
    }
    let mut specs = Vec::with_capacity(count);
    let mut names = HashSet::with_capacity(count);
    let mut total = 0usize;
    for i in 0..count {
        let len = r.varint_usize("name length")?;
        if len > MAX_NAME_LEN {
            return Err(CodecError::Malformed(format!(
                "tensor {i}: name of {len} bytes"
            )));
        }
        let name = std::str::from_utf8(r.take(len, "name")?)
            .map_err(|_| CodecError::Malformed(format!("tensor {i}: name is not UTF-8")))?
            .to_string();
        let ndim = r.varint_usize("ndim")?;
        if ndim > MAX_NDIM {
            return Err(CodecError::Malformed(format!(
                "tensor {name:?}: {ndim} dimensions"
            )));
        }
        let mut shape = Vec::with_capacity(ndim);
        for _ in 0..ndim {
            shape.push(r.varint_usize("shape")?);
        }
        let n = numel(&name, &shape)?;
        total = total
            .checked_add(n)
            .filter(|&t| t <= limits.max_params)
            .ok_or(CodecError::TooManyParams {
                got: total.saturating_add(n),
                limit: limits.max_params,
            })?;
        if let Some(want) = layout.and_then(|l| l.get(i)) {
            if want.name != name || want.shape != shape {
                return Err(CodecError::Layout(format!(
                    "tensor {i} is {name:?} {shape:?}, expected {:?} {:?}",
                    want.name, want.shape
                )));
            }
        }
        if !names.insert(name.clone()) {
            return Err(CodecError::Malformed(format!("duplicate tensor {name:?}")));
        }
        specs.push(Spec {
            name,
            shape,
            numel: n,
        });
    }
    Ok((codec, specs))
}

/// Decompresses one zstd body of at most `cap` bytes. Memory is bounded by the output actually
/// produced (≤ cap + 1 bytes read) and the capped window, whatever the frame claims.
///
/// `exact`: the body must be exactly `cap` bytes (dense codecs), so reserving that up front is
/// within the limits and saves the reallocations; top-k's `cap` is a loose upper bound.
fn decompress(src: &[u8], cap: usize, exact: bool) -> Result<Vec<u8>, CodecError> {
    let zerr = |e: io::Error| CodecError::Zstd(e.to_string());
    let mut dec = zstd::stream::read::Decoder::with_buffer(src).map_err(zerr)?;
    dec.window_log_max(ZSTD_MAX_WINDOW_LOG).map_err(zerr)?;
    let reserve = if exact {
        cap
    } else {
        cap.min(src.len().saturating_mul(4))
    };
    let mut out = Vec::with_capacity(reserve);
    let take = u64::try_from(cap).unwrap_or(u64::MAX).saturating_add(1);
    dec.take(take).read_to_end(&mut out).map_err(zerr)?;
    if out.len() > cap {
        return Err(CodecError::BodyTooLarge { limit: cap });
    }
    Ok(out)
}

fn exact_len(body: &[u8], want: usize) -> Result<(), CodecError> {
    match body.len().cmp(&want) {
        std::cmp::Ordering::Less => Err(CodecError::Truncated("body")),
        std::cmp::Ordering::Greater => Err(CodecError::Malformed(format!(
            "body of {} bytes, expected {want}",
            body.len()
        ))),
        std::cmp::Ordering::Equal => Ok(()),
    }
}

fn finite(name: &str, values: &[f32]) -> Result<(), CodecError> {
    if values.iter().all(|v| v.is_finite()) {
        Ok(())
    } else {
        Err(CodecError::NonFinite {
            tensor: name.to_string(),
            what: "value",
        })
    }
}

fn decode_f32(specs: &[Spec], body: &[u8]) -> Result<Vec<NamedTensor>, CodecError> {
    let want = checked_sum(specs.iter().map(|s| s.numel.checked_mul(4)))?;
    exact_len(body, want)?;
    let mut r = Reader::new(body);
    specs
        .iter()
        .map(|s| {
            let raw = r.take(s.numel * 4, "values")?;
            let values: Vec<f32> = raw
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            finite(&s.name, &values)?;
            Ok(tensor(s, values))
        })
        .collect()
}

fn decode_f16(specs: &[Spec], body: &[u8]) -> Result<Vec<NamedTensor>, CodecError> {
    let want = checked_sum(specs.iter().map(|s| s.numel.checked_mul(2)))?;
    exact_len(body, want)?;
    let mut r = Reader::new(body);
    let mut halves = Vec::new();
    specs
        .iter()
        .map(|s| {
            let lo = r.take(s.numel, "f16 low bytes")?;
            let hi = r.take(s.numel, "f16 high bytes")?;
            halves.clear();
            halves.extend(
                lo.iter()
                    .zip(hi)
                    .map(|(&l, &h)| f16::from_bits(u16::from_le_bytes([l, h]))),
            );
            if !halves.iter().all(|h| h.is_finite()) {
                return Err(CodecError::NonFinite {
                    tensor: s.name.clone(),
                    what: "value",
                });
            }
            let mut values = vec![0.0f32; s.numel];
            halves.convert_to_f32_slice(&mut values);
            Ok(tensor(s, values))
        })
        .collect()
}

fn decode_int8(specs: &[Spec], body: &[u8]) -> Result<Vec<NamedTensor>, CodecError> {
    let want = checked_sum(specs.iter().map(|s| {
        rows(&s.shape, s.numel)
            .checked_mul(8)
            .and_then(|p| p.checked_add(s.numel))
    }))?;
    exact_len(body, want)?;
    let mut r = Reader::new(body);
    specs
        .iter()
        .map(|s| {
            let rows = rows(&s.shape, s.numel);
            let mut values = Vec::with_capacity(s.numel);
            if let Some(row_len) = s.numel.checked_div(rows) {
                let params = r.take(rows.saturating_mul(8), "row parameters")?;
                let codes = r.take(s.numel, "codes")?;
                for (p, row) in params.chunks_exact(8).zip(codes.chunks_exact(row_len)) {
                    let lo = f32::from_le_bytes([p[0], p[1], p[2], p[3]]);
                    let scale = f32::from_le_bytes([p[4], p[5], p[6], p[7]]);
                    // Values are monotone in q, so finite at 0 and 255 means finite throughout.
                    if !(lo.is_finite()
                        && scale.is_finite()
                        && scale >= 0.0
                        && affine_value(lo, scale, 255).is_finite())
                    {
                        return Err(CodecError::NonFinite {
                            tensor: s.name.clone(),
                            what: "zero point or scale",
                        });
                    }
                    values.extend(row.iter().map(|&q| affine_value(lo, scale, q)));
                }
            }
            Ok(tensor(s, values))
        })
        .collect()
}

fn decode_top_k(
    specs: &[Spec],
    body: &[u8],
    entries: &mut usize,
) -> Result<Vec<NamedTensor>, CodecError> {
    let mut r = Reader::new(body);
    let tensors = specs
        .iter()
        .map(|s| {
            let k = r.varint_usize("kept count")?;
            if k > s.numel {
                return Err(CodecError::Malformed(format!(
                    "tensor {:?} keeps {k} of {} entries",
                    s.name, s.numel
                )));
            }
            let mut values = vec![0.0f32; s.numel];
            if k > 0 {
                let scale = r.f32("scale")?;
                if !(scale.is_finite() && scale >= 0.0 && (scale * 127.0).is_finite()) {
                    return Err(CodecError::NonFinite {
                        tensor: s.name.clone(),
                        what: "scale",
                    });
                }
                // Indices first (the codes follow them), checked strictly increasing and in
                // range; k ≤ numel bounds this allocation.
                let mut idx = Vec::with_capacity(k);
                let mut next = 0usize;
                for _ in 0..k {
                    let i = next
                        .checked_add(r.varint_usize("index")?)
                        .filter(|&i| i < s.numel)
                        .ok_or_else(|| {
                            CodecError::Malformed(format!(
                                "tensor {:?}: index out of range",
                                s.name
                            ))
                        })?;
                    idx.push(i);
                    next = i + 1;
                }
                let codes = r.take(k, "codes")?;
                for (&i, &q) in idx.iter().zip(codes) {
                    let q = q as i8;
                    if q == i8::MIN {
                        return Err(CodecError::Malformed(format!(
                            "tensor {:?}: code -128",
                            s.name
                        )));
                    }
                    if let Some(v) = values.get_mut(i) {
                        *v = symmetric_value(scale, q);
                    }
                }
                *entries += k;
            }
            Ok(tensor(s, values))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if r.remaining() != 0 {
        return Err(CodecError::Malformed(format!(
            "{} trailing bytes after the top-k body",
            r.remaining()
        )));
    }
    Ok(tensors)
}

fn tensor(s: &Spec, values: Vec<f32>) -> NamedTensor {
    NamedTensor {
        name: s.name.clone(),
        shape: s.shape.clone(),
        values,
    }
}

/// A cursor over untrusted bytes: every read is bounds-checked and fails with what it was
/// reading.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn rest(&self) -> &'a [u8] {
        self.buf.get(self.pos..).unwrap_or_default()
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], CodecError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or(CodecError::Truncated(what))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, CodecError> {
        Ok(self.take(1, what)?[0])
    }

    fn f32(&mut self, what: &'static str) -> Result<f32, CodecError> {
        let b = self.take(4, what)?;
        Ok(f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// Canonical unsigned LEB128, at most 10 bytes and 64 bits.
    fn varint(&mut self, what: &'static str) -> Result<u64, CodecError> {
        let mut v = 0u64;
        for i in 0..10 {
            let b = self.u8(what)?;
            if i == 9 && b > 1 {
                return Err(CodecError::Malformed(format!("{what}: varint overflows")));
            }
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                if b == 0 && i > 0 {
                    return Err(CodecError::Malformed(format!(
                        "{what}: non-canonical varint"
                    )));
                }
                return Ok(v);
            }
        }
        Err(CodecError::Malformed(format!("{what}: varint too long")))
    }

    fn varint_usize(&mut self, what: &'static str) -> Result<usize, CodecError> {
        let v = self.varint(what)?;
        usize::try_from(v).map_err(|_| CodecError::Malformed(format!("{what}: {v} too large")))
    }
}

// ---------------------------------------------------------------------------------------------
// Shared helpers

/// Elements of `shape`, or [`CodecError::ShapeOverflow`] if the product overflows `usize`.
fn numel(name: &str, shape: &[usize]) -> Result<usize, CodecError> {
    shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| CodecError::ShapeOverflow {
            tensor: name.to_string(),
        })
}

/// Rows of the per-output-channel `int8` codec: dim 0 for ≥ 2-D tensors, one row for vectors
/// and scalars, none for an empty tensor.
fn rows(shape: &[usize], numel: usize) -> usize {
    match shape {
        _ if numel == 0 => 0,
        [d0, _, ..] => *d0,
        _ => 1,
    }
}

fn total_params(tensors: &[NamedTensor]) -> Result<usize, CodecError> {
    tensors.iter().try_fold(0usize, |acc, t| {
        acc.checked_add(t.values.len())
            .ok_or_else(|| CodecError::ShapeOverflow {
                tensor: t.name.clone(),
            })
    })
}

fn checked_sum(it: impl Iterator<Item = Option<usize>>) -> Result<usize, CodecError> {
    let mut total = 0usize;
    for x in it {
        total = x
            .and_then(|x| total.checked_add(x))
            .ok_or_else(|| CodecError::Malformed("body size overflows".into()))?;
    }
    Ok(total)
}

fn add_same_layout(a: &[NamedTensor], b: &[NamedTensor]) -> Result<Vec<NamedTensor>, CodecError> {
    if a.len() != b.len() {
        return Err(CodecError::Layout(format!(
            "delta has {} tensors, residual {}",
            a.len(),
            b.len()
        )));
    }
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            if x.name != y.name || x.shape != y.shape || x.values.len() != y.values.len() {
                return Err(CodecError::Layout(format!(
                    "delta tensor {:?} {:?}, residual {:?} {:?}",
                    x.name, x.shape, y.name, y.shape
                )));
            }
            Ok(NamedTensor {
                name: x.name.clone(),
                shape: x.shape.clone(),
                values: x.values.iter().zip(&y.values).map(|(p, q)| p + q).collect(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str, shape: Vec<usize>, values: Vec<f32>) -> NamedTensor {
        NamedTensor::new(name, shape, values).unwrap_or_else(|e| panic!("{e}"))
    }

    fn small_model() -> Vec<NamedTensor> {
        vec![
            t(
                "conv.weight",
                vec![2, 1, 2, 2],
                vec![0.5, -0.25, 1.0, 0.0, 100.0, -100.0, 3.0, 7.0],
            ),
            t("conv.bias", vec![2], vec![0.125, -2.0]),
            t("scalar", vec![], vec![42.0]),
            t("empty", vec![0, 3], vec![]),
        ]
    }

    fn limits() -> Limits {
        Limits::for_params(1 << 20)
    }

    fn layout(m: &[NamedTensor]) -> Vec<TensorSpec> {
        m.iter().map(NamedTensor::spec).collect()
    }

    fn ok<T>(r: Result<T, CodecError>) -> T {
        r.unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn header_layout_is_as_documented() {
        let m = vec![t("ab", vec![3, 200], vec![1.0; 600])];
        let p = ok(DownlinkCodec::F32.encode(&m));
        // magic, version, codec, count 1, name "ab", ndim 2, dims 3 and 200 (two-byte varint).
        assert_eq!(
            &p[..14],
            &[b'C', b'V', b'C', b'D', 1, 1, 1, 2, b'a', b'b', 2, 3, 0xc8, 0x01]
        );
        assert_eq!(p.len(), 14 + 600 * 4);
        assert_eq!(&p[14..18], &1.0f32.to_le_bytes());
    }

    #[test]
    fn f32_is_exact_and_checks_layout() {
        let m = small_model();
        let p = ok(DownlinkCodec::F32.encode(&m));
        assert_eq!(
            ok(DownlinkCodec::F32.decode(&p, limits(), Some(&layout(&m)))),
            m
        );
        assert_eq!(ok(UplinkCodec::F32.decode(&p, limits(), None)), m);
        let mut other = layout(&m);
        other[1].shape = vec![3];
        assert!(matches!(
            decode(&p, limits(), Some(&other)),
            Err(CodecError::Layout(_))
        ));
        assert!(matches!(
            decode(&p, limits(), Some(&other[..2])),
            Err(CodecError::Layout(_))
        ));
    }

    #[test]
    fn f16_within_relative_bound_and_refuses_overflow() {
        let m = small_model();
        let p = ok(DownlinkCodec::F16.encode(&m));
        let d = ok(DownlinkCodec::F16.decode(&p, limits(), None));
        for (a, b) in m.iter().zip(&d) {
            assert_eq!((&a.name, &a.shape), (&b.name, &b.shape));
            for (x, y) in a.values.iter().zip(&b.values) {
                assert!((x - y).abs() <= x.abs() * 2f32.powi(-11) + 2f32.powi(-25));
            }
        }
        let big = vec![t("w", vec![2], vec![1.0, 70000.0])];
        assert!(matches!(
            DownlinkCodec::F16.encode(&big),
            Err(CodecError::OutOfRange { .. })
        ));
        // 65504 is f16::MAX and must survive.
        let edge = vec![t("w", vec![2], vec![65504.0, -65504.0])];
        let d =
            ok(DownlinkCodec::F16.decode(&ok(DownlinkCodec::F16.encode(&edge)), limits(), None));
        assert_eq!(d, edge);
    }

    #[test]
    fn int8_per_row_bound() {
        let m = small_model();
        let p = ok(DownlinkCodec::Int8.encode(&m));
        let d = ok(DownlinkCodec::Int8.decode(&p, limits(), Some(&layout(&m))));
        // Row 0 of the conv spans [-0.25, 1]: its error must be far below row 1's ([-100, 100]).
        let row0 = 1.25 / 255.0 / 2.0;
        for (x, y) in m[0].values[..4].iter().zip(&d[0].values[..4]) {
            assert!((x - y).abs() <= row0 * 1.001, "{x} vs {y}");
        }
        let row1 = 200.0 / 255.0 / 2.0;
        for (x, y) in m[0].values[4..].iter().zip(&d[0].values[4..]) {
            assert!((x - y).abs() <= row1 * 1.001, "{x} vs {y}");
        }
        // Extremes and constant rows (the scalar) are exact.
        assert_eq!(d[0].values[4], 100.0);
        assert_eq!(d[0].values[5], -100.0);
        assert_eq!(d[2].values, vec![42.0]);
        assert!(d[3].values.is_empty());
        // A row whose range overflows f32 is refused at encode, not sent as infinities.
        let wide = vec![t("w", vec![2], vec![-3.0e38, 3.0e38])];
        assert!(matches!(
            DownlinkCodec::Int8.encode(&wide),
            Err(CodecError::OutOfRange { .. })
        ));
        let wide = vec![t("w", vec![2], vec![-1.0e38, 1.0e38])];
        let d =
            ok(DownlinkCodec::Int8.decode(&ok(DownlinkCodec::Int8.encode(&wide)), limits(), None));
        assert_eq!(d, wide);
    }

    #[test]
    fn keep_count_is_the_decimal_ceiling() {
        let k = |rho: f32, n| {
            ok(UplinkCodec::TopK {
                rho,
                error_feedback: true,
            }
            .keep_count(n))
        };
        assert_eq!(k(0.1, 1_000_000), 100_000);
        assert_eq!(k(0.01, 1_000_000), 10_000);
        assert_eq!(k(0.001, 1_000_000), 1_000);
        assert_eq!(k(0.07, 100), 7);
        assert_eq!(k(0.01, 1), 1);
        assert_eq!(k(0.01, 150), 2);
        assert_eq!(k(1.0, 17), 17);
        assert_eq!(k(0.5, 0), 0);
        for rho in [0.0, -0.1, 1.5, f32::NAN, f32::INFINITY] {
            assert!(UplinkCodec::TopK {
                rho,
                error_feedback: true
            }
            .keep_count(10)
            .is_err());
        }
    }

    #[test]
    fn top_k_keeps_the_largest_and_breaks_ties_by_position() {
        let m = vec![
            t("a", vec![4], vec![1.0, -5.0, 2.0, 0.0]),
            t("b", vec![2, 2], vec![-2.0, 3.0, 2.0, 0.5]),
        ];
        // 8 entries, ρ = 0.5: k = 4: -5, 3, then two of the three ±2s (first ones: a[2], b[0]).
        let codec = UplinkCodec::TopK {
            rho: 0.5,
            error_feedback: false,
        };
        let p = ok(codec.encode(&m));
        let d = ok(decode(&p, limits(), None));
        assert_eq!(d.entries, 4);
        let nonzero: Vec<(usize, usize)> = d
            .tensors
            .iter()
            .enumerate()
            .flat_map(|(ti, t)| {
                t.values
                    .iter()
                    .enumerate()
                    .filter(|(_, v)| **v != 0.0)
                    .map(move |(i, _)| (ti, i))
            })
            .collect();
        assert_eq!(nonzero, vec![(0, 1), (0, 2), (1, 0), (1, 1)]);
        // Tensor a's scale is 5/127: -5 exact, 2 within scale/2.
        assert_eq!(d.tensors[0].values[1], -5.0);
        assert!((d.tensors[0].values[2] - 2.0).abs() <= 5.0 / 127.0 / 2.0 * 1.001);
        // Zeros are never sent, even when k asks for them.
        let zeros = vec![t("z", vec![3], vec![0.0, 1.0, 0.0])];
        let all = UplinkCodec::TopK {
            rho: 1.0,
            error_feedback: false,
        };
        let d = ok(decode(&ok(all.encode(&zeros)), limits(), None));
        assert_eq!(d.entries, 1);
        assert_eq!(d.tensors, zeros);
    }

    #[test]
    fn uplink_decode_refuses_more_entries_than_rho_allows() {
        let m = vec![t(
            "a",
            vec![100],
            (0..100).map(|i| i as f32 + 1.0).collect(),
        )];
        let sent = UplinkCodec::TopK {
            rho: 0.1,
            error_feedback: true,
        };
        let p = ok(sent.encode(&m));
        assert_eq!(ok(sent.decode(&p, limits(), None)).len(), 1);
        let stricter = UplinkCodec::TopK {
            rho: 0.05,
            error_feedback: true,
        };
        assert!(matches!(
            stricter.decode(&p, limits(), None),
            Err(CodecError::TooManyEntries { got: 10, limit: 5 })
        ));
        assert!(matches!(
            UplinkCodec::Int8.decode(&p, limits(), None),
            Err(CodecError::WrongCodec { .. })
        ));
    }

    #[test]
    fn codec_names_parse_and_print() {
        for s in ["f32", "int8", "top-k:0.01", "top-k:0.001:no-ef", "top-k:1"] {
            let c: UplinkCodec = ok(s.parse());
            assert_eq!(c.to_string(), s);
        }
        assert_eq!(ok("none".parse::<UplinkCodec>()), UplinkCodec::F32);
        assert_eq!(
            ok("top-k:0.5:ef".parse::<UplinkCodec>()),
            UplinkCodec::TopK {
                rho: 0.5,
                error_feedback: true
            }
        );
        for s in [
            "",
            "f16",
            "top-k",
            "top-k:",
            "top-k:0",
            "top-k:2",
            "top-k:nan",
            "top-k:0.1:x",
            "top-k:0.1:ef:ef",
            "TOP-K:0.1",
            "int8 ",
        ] {
            assert!(
                matches!(s.parse::<UplinkCodec>(), Err(CodecError::Spec(_))),
                "{s:?}"
            );
        }
        for s in ["f32", "f16", "int8"] {
            assert_eq!(ok(s.parse::<DownlinkCodec>()).to_string(), s);
        }
        assert!("top-k:0.1".parse::<DownlinkCodec>().is_err());
    }

    #[test]
    fn serde_uses_the_codec_strings() {
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct Cfg {
            down: DownlinkCodec,
            up: UplinkCodec,
        }
        let cfg = Cfg {
            down: DownlinkCodec::Int8,
            up: UplinkCodec::TopK {
                rho: 0.01,
                error_feedback: false,
            },
        };
        let bytes = crate::envelope::encode(crate::Kind::Status, &cfg);
        let back: Cfg = ok(crate::envelope::decode(&bytes, crate::Kind::Status, 1024)
            .map_err(|e| CodecError::Malformed(e.to_string())));
        assert_eq!(back, cfg);
        // Through bincode the codec is its string, so a bad one is refused at decode.
        let bad = ("int8", "top-k:7");
        let bytes = crate::envelope::encode(crate::Kind::Status, &bad);
        assert!(crate::envelope::decode::<Cfg>(&bytes, crate::Kind::Status, 1024).is_err());
    }

    #[test]
    fn error_feedback_carries_what_was_not_sent() {
        let codec = UplinkCodec::TopK {
            rho: 0.25,
            error_feedback: true,
        };
        let d1 = vec![t("w", vec![4], vec![4.0, 1.0, -0.5, 0.25])];
        let (p1, ef1) = ok(ErrorFeedback::new().compress(&d1, codec));
        let s1 = ok(codec.decode(&p1, limits(), None));
        assert_eq!(s1[0].values, vec![4.0, 0.0, 0.0, 0.0]);
        assert_eq!(ef1.residual()[0].values, vec![0.0, 1.0, -0.5, 0.25]);
        // Next round the residual's 1.0 plus the new 0.5 beats the new 1.25.
        let d2 = vec![t("w", vec![4], vec![0.0, 0.5, 0.0, 1.25])];
        let (p2, ef2) = ok(ef1.compress(&d2, codec));
        let s2 = ok(codec.decode(&p2, limits(), None));
        assert_eq!(s2[0].values, vec![0.0, 1.5, 0.0, 0.0]);
        assert_eq!(ef2.residual()[0].values, vec![0.0, 0.0, -0.5, 1.5]);
        // no-ef: the residual is left alone and the delta is sent as is.
        let plain = UplinkCodec::TopK {
            rho: 0.25,
            error_feedback: false,
        };
        let (p3, ef3) = ok(ef2.compress(&d2, plain));
        assert_eq!(ef3, ef2);
        assert_eq!(
            ok(plain.decode(&p3, limits(), None))[0].values,
            vec![0.0, 0.0, 0.0, 1.25]
        );
        // f32 flushes the residual completely.
        let (p4, ef4) = ok(ef2.compress(&d2, UplinkCodec::F32));
        assert_eq!(
            ok(UplinkCodec::F32.decode(&p4, limits(), None))[0].values,
            vec![0.0, 0.5, -0.5, 2.75]
        );
        assert!(ef4.residual()[0].values.iter().all(|v| *v == 0.0));
        // A different layout is refused, not silently mixed.
        let other = vec![t("v", vec![4], vec![0.0; 4])];
        assert!(matches!(
            ef2.compress(&other, codec),
            Err(CodecError::Layout(_))
        ));
    }

    #[test]
    fn residual_bytes_round_trip_and_detect_damage() {
        let codec = UplinkCodec::Int8;
        let (_, ef) = ok(ErrorFeedback::new().compress(&small_model(), codec));
        let bytes = ok(ef.to_bytes());
        assert_eq!(&bytes[..5], b"CVEF\x01");
        assert_eq!(ok(ErrorFeedback::from_bytes(&bytes, limits())), ef);
        let empty = ok(ErrorFeedback::new().to_bytes());
        assert_eq!(
            ok(ErrorFeedback::from_bytes(&empty, limits())),
            ErrorFeedback::new()
        );

        let mut flipped = bytes.clone();
        flipped[20] ^= 1;
        assert!(matches!(
            ErrorFeedback::from_bytes(&flipped, limits()),
            Err(CodecError::Checksum)
        ));
        let mut v2 = bytes.clone();
        v2[4] = 2;
        assert!(matches!(
            ErrorFeedback::from_bytes(&v2, limits()),
            Err(CodecError::Version(2))
        ));
        for len in 0..bytes.len() {
            assert!(ErrorFeedback::from_bytes(&bytes[..len], limits()).is_err());
        }
        assert!(matches!(
            ErrorFeedback::from_bytes(&bytes, Limits::for_params(4)),
            Err(CodecError::TooManyParams { .. })
        ));
        assert!(matches!(
            ErrorFeedback::from_bytes(
                &bytes,
                Limits {
                    max_params: 100,
                    max_bytes: 10
                }
            ),
            Err(CodecError::TooLarge { .. })
        ));
    }

    #[test]
    fn save_is_atomic_and_load_bounded() {
        let dir = ok(tempfile::tempdir().map_err(|e| CodecError::Malformed(e.to_string())));
        let path = dir.path().join("residual.bin");
        assert_eq!(ok(ErrorFeedback::load(&path, limits())), None);
        let (_, ef) = ok(ErrorFeedback::new().compress(&small_model(), UplinkCodec::Int8));
        ok(ef.save(&path));
        assert!(!dir.path().join("residual.bin.tmp").exists());
        assert_eq!(ok(ErrorFeedback::load(&path, limits())), Some(ef.clone()));
        // Overwrite with a newer state.
        let (_, ef2) = ok(ef.compress(&small_model(), UplinkCodec::Int8));
        ok(ef2.save(&path));
        assert_eq!(ok(ErrorFeedback::load(&path, limits())), Some(ef2));
        assert!(matches!(
            ErrorFeedback::load(
                &path,
                Limits {
                    max_params: 100,
                    max_bytes: 16
                }
            ),
            Err(CodecError::TooLarge { .. })
        ));
        assert!(matches!(
            ErrorFeedback::load(dir.path(), limits()),
            Err(CodecError::Io { .. })
        ));
    }

    /// A payload with `codec`'s header for `m` and `body` zstd-compressed as its body.
    fn forged(codec: PayloadCodec, m: &[NamedTensor], body: &[u8]) -> Vec<u8> {
        let mut p = ok(DownlinkCodec::F32.encode(m));
        let header_len = p.len() - 4 * m.iter().map(|t| t.values.len()).sum::<usize>();
        p.truncate(header_len);
        p[5] = codec as u8;
        ok(compress_into(&mut p, body));
        p
    }

    #[test]
    fn malformed_payloads_are_typed_errors() {
        let m = small_model();
        let lim = limits();
        for codec in [DownlinkCodec::F32, DownlinkCodec::F16, DownlinkCodec::Int8] {
            let p = ok(codec.encode(&m));
            for len in 0..p.len() {
                assert!(
                    decode(&p[..len], lim, None).is_err(),
                    "{codec} prefix {len}"
                );
            }
            let mut longer = p.clone();
            longer.push(0);
            assert!(
                decode(&longer, lim, None).is_err(),
                "{codec} + trailing byte"
            );
        }
        let p = ok(DownlinkCodec::F32.encode(&m));
        let with = |i: usize, b: u8| {
            let mut q = p.clone();
            q[i] = b;
            decode(&q, lim, None)
        };
        assert!(matches!(with(0, b'X'), Err(CodecError::BadMagic)));
        assert!(matches!(with(4, 2), Err(CodecError::Version(2))));
        assert!(matches!(with(5, 9), Err(CodecError::UnknownCodec(9))));
        assert!(matches!(with(6, 0x7f), Err(CodecError::Truncated(_))));
        assert!(matches!(
            DownlinkCodec::F16.decode(&p, lim, None),
            Err(CodecError::WrongCodec { .. })
        ));
        assert!(matches!(
            decode(&p, Limits::for_params(5), None),
            Err(CodecError::TooManyParams { .. })
        ));
        assert!(matches!(
            decode(
                &p,
                Limits {
                    max_params: 1 << 20,
                    max_bytes: 10
                },
                None
            ),
            Err(CodecError::TooLarge { .. })
        ));

        let header = |count: u8, entries: &[&[u8]]| {
            let mut h = vec![b'C', b'V', b'C', b'D', 1, 1, count];
            for e in entries {
                h.extend_from_slice(e);
            }
            h
        };
        // Shape whose product overflows usize.
        let mut huge = vec![1u8, b'x', 3];
        for _ in 0..3 {
            put_varint(&mut huge, 1 << 30);
        }
        assert!(matches!(
            decode(&header(1, &[&huge]), lim, None),
            Err(CodecError::ShapeOverflow { .. })
        ));
        // Lying count, duplicate names, too many dims, overlong/non-canonical varints, bad UTF-8.
        assert!(matches!(
            decode(&header(5, &[&[1, b'x', 0]]), lim, None),
            Err(CodecError::Truncated(_))
        ));
        assert!(matches!(
            decode(&header(2, &[&[1, b'x', 0], &[1, b'x', 0]]), lim, None),
            Err(CodecError::Malformed(_))
        ));
        assert!(matches!(
            decode(
                &header(1, &[&[1, b'x', 9, 1, 1, 1, 1, 1, 1, 1, 1, 1]]),
                lim,
                None
            ),
            Err(CodecError::Malformed(_))
        ));
        assert!(matches!(
            decode(&header(1, &[&[0x81, 0x00, b'x', 0]]), lim, None),
            Err(CodecError::Malformed(_))
        ));
        assert!(matches!(
            decode(&header(1, &[&[0xff; 11]]), lim, None),
            Err(CodecError::Malformed(_))
        ));
        assert!(matches!(
            decode(&header(1, &[&[1, 0xff, 0]]), lim, None),
            Err(CodecError::Malformed(_))
        ));
        let mut many = vec![b'C', b'V', b'C', b'D', 1, 1];
        put_varint(&mut many, (MAX_TENSORS + 1) as u64);
        assert!(matches!(
            decode(&many, lim, None),
            Err(CodecError::Malformed(_))
        ));

        // Non-finite values and scales.
        let one = vec![t("x", vec![1], vec![0.0])];
        let mut nan = ok(DownlinkCodec::F32.encode(&one));
        let at = nan.len() - 4;
        nan[at..].copy_from_slice(&f32::NAN.to_le_bytes());
        assert!(matches!(
            decode(&nan, lim, None),
            Err(CodecError::NonFinite { .. })
        ));
        let inf16 = forged(PayloadCodec::F16, &one, &[0x00, 0x7c]);
        assert!(matches!(
            decode(&inf16, lim, None),
            Err(CodecError::NonFinite { .. })
        ));
        let mut body = f32::INFINITY.to_le_bytes().to_vec();
        body.extend_from_slice(&1.0f32.to_le_bytes());
        body.push(0);
        let bad_lo = forged(PayloadCodec::Int8, &one, &body);
        assert!(matches!(
            decode(&bad_lo, lim, None),
            Err(CodecError::NonFinite { .. })
        ));
        let mut body = 3.0e38f32.to_le_bytes().to_vec();
        body.extend_from_slice(&1.0e37f32.to_le_bytes());
        body.push(0);
        let overflow = forged(PayloadCodec::Int8, &one, &body);
        assert!(matches!(
            decode(&overflow, lim, None),
            Err(CodecError::NonFinite { .. })
        ));
        let mut body = vec![1];
        body.extend_from_slice(&f32::NAN.to_le_bytes());
        body.extend_from_slice(&[0, 1]);
        let nan_scale = forged(PayloadCodec::TopK, &one, &body);
        assert!(matches!(
            decode(&nan_scale, lim, None),
            Err(CodecError::NonFinite { .. })
        ));

        // Top-k bodies: index out of range, more entries than values, code -128, trailing bytes.
        let four = vec![t("x", vec![4], vec![0.0; 4])];
        let topk = |body: &[u8]| decode(&forged(PayloadCodec::TopK, &four, body), lim, None);
        let s = 1.0f32.to_le_bytes();
        let ok_body = [&[2u8][..], &s, &[1, 1], &[5, 0xfb]].concat();
        let d = ok(topk(&ok_body));
        assert_eq!(d.tensors[0].values, vec![0.0, 5.0, 0.0, -5.0]);
        assert_eq!(d.entries, 2);
        assert!(matches!(
            topk(&[&[2u8][..], &s, &[1, 2], &[5, 5]].concat()),
            Err(CodecError::Malformed(_))
        ));
        assert!(matches!(topk(&[5u8]), Err(CodecError::Malformed(_))));
        assert!(matches!(
            topk(&[&[1u8][..], &s, &[0], &[0x80]].concat()),
            Err(CodecError::Malformed(_))
        ));
        assert!(matches!(
            topk(&[&ok_body[..], &[0]].concat()),
            Err(CodecError::Malformed(_))
        ));
        assert!(matches!(topk(&ok_body[..7]), Err(CodecError::Truncated(_))));
        // Garbage instead of a zstd frame.
        let mut garbage = forged(PayloadCodec::F16, &one, &[0, 0]);
        let n = garbage.len();
        garbage[n - 3] ^= 0xff;
        assert!(decode(&garbage, lim, None).is_err());
    }

    #[test]
    fn zstd_bomb_is_capped_by_the_header() {
        // 64 MiB of zeros compress to a few KiB; the header promises 2 bytes of f16.
        let bomb = vec![0u8; 64 << 20];
        let one = vec![t("x", vec![1], vec![0.0])];
        for codec in [PayloadCodec::F16, PayloadCodec::Int8, PayloadCodec::TopK] {
            let p = forged(codec, &one, &bomb);
            assert!(p.len() < 64 << 10, "{}", p.len());
            assert!(
                matches!(
                    decode(&p, limits(), None),
                    Err(CodecError::BodyTooLarge { .. })
                ),
                "{codec}"
            );
        }
    }
}
