//! The coevo coordinator: runs rounds (publish model and signed manifest, collect and verify
//! deltas, aggregate, evaluate, report, checkpoint) over MQTT.
//!
//! # Layout
//! - [`config`]: the TOML configuration.
//! - [`byom`]: `[model]`, the user's TorchScript student and teacher (issue #16).
//! - [`coevolve`]: the teacher loop (distil before a round, fuse after it).
//! - [`registry`]: the fleet registry (client ids and their public keys).
//! - [`collect`]: pure collect-phase decisions: admission of chunks, rejection tally, recovery.
//! - [`verify`]: pure checks of a delta upload, each failure a [`coevo_protocol::RejectReason`].
//! - [`ingest`]: verification on a worker pool, group commit, deltas read back from disk.
//! - [`labels`]: cleaning upward: cameras weighed by their estimated label noise (issue #18).
//! - [`strategy`]: aggregation rules as pure functions.
//! - [`guard`]: the check of a merged model before it is published (rollback, outliers).
//! - [`store`]: durable state (accepted deltas written before they are acknowledged).
//! - [`report`]: the round report, a stable JSON interface for analysts.
//! - [`metrics`]: Prometheus metrics and the live status the round stages keep up to date.
//! - [`status`]: `out/status.json`, the live state `coevo status` reads.
//! - [`export`], [`html`]: per-client CSV rows and the offline HTML report.
//! - [`alerts`]: alerts over the report history (collapse, rollback, skip, …).
//! - [`server`]: the round loop, the only part doing I/O.

pub mod byom;
// The records a report reader needs, in a crate without libtorch (the lean `coevo` binary).
pub use coevo_ops::{alerts, export, html, registry, report};
pub mod coevolve;
pub mod collect;
pub mod config;
pub mod guard;
pub mod ingest;
pub mod labels;
pub mod metrics;
pub mod server;
pub mod status;
pub mod store;
pub mod strategy;
pub mod verify;

pub use config::CoordinatorConfig;
pub use registry::FleetRegistry;
pub use report::RoundReport;
pub use server::{Coordinator, RoundEvent};

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error("configuration: {0}")]
    Config(String),
    #[error("I/O: {0}")]
    Io(String),
    #[error("broker: {0}")]
    Broker(String),
    #[error("model: {0}")]
    Model(#[from] coevo_models::ModelError),
    #[error("aggregation: {0}")]
    Strategy(#[from] strategy::StrategyError),
    #[error("MQTT: {0}")]
    Mqtt(#[from] coevo_mqtt::MqttError),
    #[error("key: {0}")]
    Key(#[from] coevo_protocol::CryptoError),
    #[error("metrics: {0}")]
    Metrics(#[from] coevo_telemetry::TelemetryError),
}

impl From<coevo_ops::OpsError> for CoordinatorError {
    fn from(e: coevo_ops::OpsError) -> Self {
        match e {
            coevo_ops::OpsError::Config(m) => CoordinatorError::Config(m),
            coevo_ops::OpsError::Io(m) => CoordinatorError::Io(m),
        }
    }
}
