//! The coevo wire protocol: every byte that crosses MQTT is defined here, once.
//!
//! Edge clients and the coordinator both depend on this crate and on nothing else for the
//! format of what they exchange, so a message can never be encoded one way and decoded another.
//! It has no tokio and no tch: it is pure data, codecs and cryptography, easy to fuzz.
//!
//! # Layout
//! - [`topic`]: the MQTT topic tree `coevo/v1/{fleet}/…` as an enum, with a strict parser.
//! - [`message`]: the messages (manifest, delta header, chunks, receipt, status) and the
//!   rejection reasons that receipts and round reports carry.
//! - [`envelope`]: the one place raw bytes are produced and read: version byte, kind byte,
//!   bincode body, bounded decode with typed errors; and [`envelope::Signed`], a body with an
//!   Ed25519 signature over a domain-separated message.
//! - [`crypto`]: Ed25519 keys (ring, PKCS#8) and SHA-256 digests.
//! - [`chunk`]: splitting payloads into chunks and bounded, duplicate- and reorder-tolerant
//!   reassembly.
//! - [`codec`]: model and delta compression (f32, f16, per-channel int8, top-k with error
//!   feedback; zstd), one self-describing payload format with a bounded decoder.

pub mod chunk;
pub mod codec;
pub mod crypto;
pub mod envelope;
pub mod labels;
pub mod message;
pub mod topic;

pub use chunk::{ChunkError, Reassembler, ReassemblyPeaks};
pub use codec::{
    CodecError, DownlinkCodec, ErrorFeedback, NamedTensor, PayloadCodec, TensorSpec, UplinkCodec,
};
pub use crypto::{digest, CryptoError, Digest, PublicKey, SigningKey};
pub use envelope::{DecodeError, Kind, Signed};
pub use labels::LabelCounts;
pub use message::{
    DeltaChunk, DeltaHeader, LocalMetrics, ModelArch, ModelChunk, ModelRef, ModuleRef, Receipt,
    ReceiptOutcome, RejectReason, RoundManifest, Status, StatusState, TrainTask,
};
pub use topic::{Topic, TopicError};

/// Version byte at the front of every message; a receiver refuses any other version outright
/// rather than guessing at a layout it does not know.
/// 3: the manifest's `ModelArch` names an optional TorchScript module (issue #16).
pub const PROTOCOL_VERSION: u8 = 3;

/// Default chunk size for models and deltas: small enough to pass brokers with a 1 MiB packet
/// limit with room for the envelope.
pub const DEFAULT_CHUNK_SIZE: usize = 256 * 1024;
