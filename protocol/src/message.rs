//! The messages of DESIGN §4. Fields that bind a message to its context (fleet, round, sender,
//! payload digest) sit inside the signed bodies, so a signature can't be replayed elsewhere.

use crate::codec::{DownlinkCodec, UplinkCodec};
use crate::crypto::Digest;
use serde::{Deserialize, Serialize};
use std::fmt;

/// The network a manifest's weights belong to; the client builds the same architecture from it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelArch {
    /// Architecture name, e.g. `student-cnn-v1`.
    pub name: String,
    pub channels: u32,
    pub height: u32,
    pub width: u32,
    pub classes: u32,
    /// The user's TorchScript module the weights belong to (issue #16); `None`: the built-in
    /// net `name`. Signed with the manifest, so a camera fetches exactly this module (chunked
    /// and retained like the model, on `model/{digest}/{i}`) and refuses any other bytes.
    pub module: Option<ModuleRef>,
}

/// Where to fetch a TorchScript module: the same chunked, retained transport as the model,
/// under the module's own digest. Cameras cache modules by digest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleRef {
    /// SHA-256 of the module file's bytes (all chunks concatenated).
    pub digest: Digest,
    /// File size in bytes.
    pub size: u64,
    pub chunks: u32,
}

/// Where and how to fetch the round's base model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelRef {
    /// SHA-256 of the encoded model bytes (all chunks concatenated).
    pub digest: Digest,
    /// Encoded size in bytes.
    pub size: u64,
    /// How the model is compressed; clients train from the weights as decoded, and the
    /// coordinator applies deltas to that same dequantised base.
    pub codec: DownlinkCodec,
    pub chunks: u32,
    pub arch: ModelArch,
}

/// What each client does with the model this round.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainTask {
    pub epochs: u32,
    pub batch_size: u32,
    pub lr: f64,
    pub momentum: f64,
    /// FedProx proximal term μ (0 = plain FedAvg local training).
    pub prox_mu: f64,
}

/// The signed announcement of a round, retained on `round/current`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundManifest {
    pub fleet: String,
    pub round: u64,
    /// Client id of the coordinator that signed it.
    pub coordinator: String,
    pub model: ModelRef,
    pub task: TrainTask,
    /// How clients must compress their deltas this round (codec and, for top-k, ρ and error
    /// feedback): signed here, so the fleet's uplink can be changed from one round to the next.
    pub uplink_codec: UplinkCodec,
    /// Largest delta payload (encoded bytes) the coordinator will accept.
    pub max_delta_bytes: u64,
    /// Chunk size clients must use for deltas.
    pub chunk_size: u32,
    /// Unix ms after which the coordinator closes the round (once quorum is met).
    pub deadline_unix_ms: u64,
    pub quorum: u32,
    pub issued_unix_ms: u64,
}

/// Local training outcome a client reports with its delta.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LocalMetrics {
    pub loss: f64,
    pub accuracy: f64,
    pub train_ms: u64,
    /// Partial and noisy labels (issue #18): `None` when every frame had a label and no
    /// selection ran. A wire change (bincode is positional): old edges' headers no longer
    /// decode, which the coordinator rejects as `malformed`.
    #[serde(default)]
    pub labels: Option<crate::labels::LabelCounts>,
}

/// Signed description of a delta, carried in chunk 0 of the upload.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeltaHeader {
    pub fleet: String,
    pub round: u64,
    pub client: String,
    /// Digest of the model the delta was computed against.
    pub base_digest: Digest,
    /// Local training samples, the FedAvg weight.
    pub samples: u64,
    pub metrics: LocalMetrics,
    /// Must equal the manifest's `uplink_codec`.
    pub codec: UplinkCodec,
    pub payload_digest: Digest,
    pub payload_len: u64,
    pub chunks: u32,
}

/// One chunk of a model, retained on `model/{digest}/{index}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelChunk {
    pub digest: Digest,
    pub index: u32,
    pub total: u32,
    #[serde(with = "serde_bytes_compat")]
    pub data: Vec<u8>,
}

/// One chunk of a delta upload; chunk 0 also carries the signed header.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeltaChunk {
    pub client: String,
    pub round: u64,
    pub index: u32,
    pub total: u32,
    /// Signed [`DeltaHeader`], present in chunk 0 only.
    pub header: Option<crate::Signed>,
    #[serde(with = "serde_bytes_compat")]
    pub data: Vec<u8>,
}

/// Why the coordinator refused a delta. The `code` strings are stable: reports and scripts
/// group by them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RejectReason {
    UnknownClient,
    BadSignature,
    WrongFleet,
    WrongRound { got: u64, current: u64 },
    WrongBase,
    ClientMismatch,
    DigestMismatch,
    LengthMismatch { declared: u64, got: u64 },
    Oversized { bytes: u64, max: u64 },
    Malformed(String),
    NonFinite,
    ShapeMismatch(String),
    ConflictingUpload,
    RoundClosed,
}

impl RejectReason {
    /// Stable short code, e.g. `bad-signature`.
    pub fn code(&self) -> &'static str {
        match self {
            RejectReason::UnknownClient => "unknown-client",
            RejectReason::BadSignature => "bad-signature",
            RejectReason::WrongFleet => "wrong-fleet",
            RejectReason::WrongRound { .. } => "wrong-round",
            RejectReason::WrongBase => "wrong-base",
            RejectReason::ClientMismatch => "client-mismatch",
            RejectReason::DigestMismatch => "digest-mismatch",
            RejectReason::LengthMismatch { .. } => "length-mismatch",
            RejectReason::Oversized { .. } => "oversized",
            RejectReason::Malformed(_) => "malformed",
            RejectReason::NonFinite => "non-finite",
            RejectReason::ShapeMismatch(_) => "shape-mismatch",
            RejectReason::ConflictingUpload => "conflicting-upload",
            RejectReason::RoundClosed => "round-closed",
        }
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RejectReason::WrongRound { got, current } => {
                write!(
                    f,
                    "wrong-round: delta for round {got}, current round {current}"
                )
            }
            RejectReason::LengthMismatch { declared, got } => {
                write!(
                    f,
                    "length-mismatch: header says {declared} bytes, got {got}"
                )
            }
            RejectReason::Oversized { bytes, max } => {
                write!(f, "oversized: {bytes} bytes, limit {max}")
            }
            RejectReason::Malformed(m) => write!(f, "malformed: {m}"),
            RejectReason::ShapeMismatch(m) => write!(f, "shape-mismatch: {m}"),
            other => f.write_str(other.code()),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReceiptOutcome {
    Accepted,
    Rejected(RejectReason),
}

/// The coordinator's signed answer to one upload: the client stops retrying when it has one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    pub fleet: String,
    pub round: u64,
    pub client: String,
    pub payload_digest: Digest,
    pub outcome: ReceiptOutcome,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StatusState {
    Online,
    Offline,
}

/// Retained client status (its last will says Offline). Unsigned: informational only.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub client: String,
    pub state: StatusState,
    pub last_round: Option<u64>,
    pub error: Option<String>,
}

/// bincode writes `Vec<u8>` as a length and the bytes already; this module only exists to make
/// the intent explicit and keep the field encoding in one place should it ever change.
mod serde_bytes_compat {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        Vec::<u8>::deserialize(d)
    }
}
