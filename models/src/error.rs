//! The one error type of the crate.
//!
//! Every fallible path (file parsing, wire decoding, libtorch calls) ends in a [`ModelError`] so
//! callers (edge client, coordinator) can tell a corrupt payload from a bug without string
//! matching, and so library code never has to `unwrap`.

/// Errors raised by dataset loading, partitioning, training and weight codecs.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// Reading a dataset file or directory failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// A dataset file is malformed (bad magic, inconsistent counts, undecodable image, …).
    #[error("bad data format: {0}")]
    Format(String),
    /// Tensor names or shapes do not line up (weights vs. model, data vs. labels, …).
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// libtorch reported an error.
    #[error("torch error: {0}")]
    Torch(#[from] tch::TchError),
    /// A weight payload could not be encoded or decoded.
    #[error("weight codec error: {0}")]
    Codec(String),
    /// A wire payload (model or delta) could not be encoded or decoded.
    #[error("wire codec: {0}")]
    Wire(#[from] coevo_protocol::CodecError),
    /// An input exceeded a configured bound (bytes, elements, …); refusing protects memory.
    #[error("limit exceeded: {0}")]
    Limit(String),
    /// A partition spec is malformed or cannot be satisfied by the data.
    #[error("partition error: {0}")]
    Partition(String),
    /// A training/evaluation configuration value is invalid (e.g. batch size 0).
    #[error("invalid config: {0}")]
    Config(String),
    /// A TorchScript module cannot be read, loaded or does not fit the data (issue #16).
    #[error("TorchScript module: {0}")]
    Script(String),
}
