//! The coevo edge client: the agent a camera runs. It verifies the coordinator's signed round
//! manifest, fetches and checks the model, fine-tunes it on local data with libtorch, and
//! publishes a signed delta (trained − as-received weights), retrying until it gets a receipt.
//!
//! # Layout
//! - [`config`]: the device's TOML configuration (`coevo edge --config edge.toml`).
//! - [`agent`]: the MQTT round loop.
//! - [`state`]: what an edge remembers across restarts (the last round it completed) and the
//!   freshness rule that keeps it off stale or replayed manifests; ignored-message counters.
//! - [`module_fetch`]: the student's TorchScript module, fetched by the digest the manifest
//!   signs and cached (issue #16).
//! - [`cli`]: the command line shared by `coevo edge` and the lean `coevo-edge` binary.
//! - [`attack`]: Byzantine upload behaviour for tests and benches of the coordinator's
//!   defences (never enabled by a device's configuration).

pub mod agent;
pub mod attack;
pub mod cli;
pub mod config;
pub mod module_fetch;
pub mod state;

pub use agent::{Agent, AgentOptions, AgentSummary, DroppedResidual};
pub use attack::Attack;
pub use config::EdgeConfig;
pub use state::IgnoreReason;

#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    #[error("configuration: {0}")]
    Config(String),
    #[error("broker: {0}")]
    Broker(String),
    #[error("model: {0}")]
    Model(#[from] coevo_models::ModelError),
    #[error("MQTT: {0}")]
    Mqtt(#[from] coevo_mqtt::MqttError),
    #[error("key: {0}")]
    Key(#[from] coevo_protocol::CryptoError),
    #[error("codec: {0}")]
    Codec(#[from] coevo_protocol::CodecError),
    #[error("training task: {0}")]
    Task(String),
    /// `state_dir` could not be read or written.
    #[error("state: {0}")]
    State(String),
}
