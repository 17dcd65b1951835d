//! Coordinator configuration (TOML). Every field has a default that works for `coevo demo`;
//! `coordinator.sample.toml` documents them for operators.

use crate::CoordinatorError;
use coevo_protocol::{DownlinkCodec, UplinkCodec};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// Fleet name: the topic namespace `coevo/v1/{fleet}/`.
    pub fleet: String,
    /// MQTT client id, also the signer id clients pin. Fixed, so the broker keeps our session.
    pub client_id: String,
    /// PKCS#8 Ed25519 private key (`coevo keys gen`).
    pub key: PathBuf,
    /// Fleet registry (`coevo fleet add`), re-read every round.
    pub registry: PathBuf,
    /// Output directory: reports, checkpoints, accepted deltas, state.
    pub out: PathBuf,
    /// Rounds to run (the coordinator resumes after the last completed one).
    pub rounds: u64,
    /// Seed for the initial student.
    pub seed: u64,
    pub broker: BrokerEndpoint,
    pub data: DataConfig,
    pub round: RoundPolicy,
    pub task: TaskConfig,
    pub transfer: TransferConfig,
    /// Aggregation rule: FedAvg or a robust one (norm clipping, trimmed mean, median, Multi-Krum).
    /// The default is norm clipping at 2 × the median norm ([`default_aggregation`]).
    pub aggregation: crate::strategy::StrategyConfig,
    /// `fedavg` (student only) or `coevolve` (teacher ⇄ student; needs server data).
    pub mode: crate::coevolve::Mode,
    pub coevolution: crate::coevolve::CoevolutionConfig,
    /// Which part of the dataset's training split the server keeps (coevolve mode).
    pub server_data: ServerDataConfig,
    /// The check of every merged model before it is published (rollback on a collapse).
    pub guard: crate::guard::GuardConfig,
    /// `[metrics]`: Prometheus `/metrics` listener (opt-in) and the `status.json` interval.
    pub metrics: crate::metrics::MetricsConfig,
    /// Alert thresholds (logged at ERROR, stored in the round report and the HTML report).
    pub alerts: crate::alerts::AlertConfig,
    /// TorchScript student and teacher files (issue #16); built-in CNNs when absent.
    pub model: crate::byom::ModelFiles,
}

/// The aggregation rule when the config names none: norm clipping at 2 × the round's median
/// delta norm. Plain FedAvg lets one camera's boosted (or merely diverged) delta dominate the
/// merge — issue #11 measured an honest fleet dying from a single delta of norm 108 among
/// 12–17 — while a bound at twice the median leaves ordinary honest spread untouched (only
/// outliers are scaled down) and caps any one client's pull on the model.
pub fn default_aggregation() -> crate::strategy::StrategyConfig {
    crate::strategy::StrategyConfig::NormClip { multiplier: 2.0 }
}

/// The server's data roles: either fractions of the dataset's training split after a seeded
/// shuffle (labelled first, then unlabelled, then validation), or, when `labelled_clients` is
/// set, whole writers named by their ids in the dataset's clients file — the realistic case of
/// a data centre that owns some sources' data outright.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerDataConfig {
    pub labelled_fraction: f64,
    pub unlabelled_fraction: f64,
    pub validation_fraction: f64,
    /// Writers whose samples form the labelled set (selects roles by id).
    pub labelled_clients: Vec<String>,
    /// Writers whose images form the unlabelled pool (labels never read).
    pub unlabelled_clients: Vec<String>,
    /// Writers held out for validation. When empty in id mode, `validation_holdout` of the
    /// labelled writers are held out whole instead (never frames of a trained-on writer), so no
    /// writer is lost to the clients.
    pub validation_clients: Vec<String>,
    /// Share of the labelled writers held out whole for validation when `validation_clients`
    /// is empty (at least one writer when there are two or more).
    pub validation_holdout: f64,
}

impl ServerDataConfig {
    /// True when roles are chosen by writer id rather than by fraction.
    pub fn by_clients(&self) -> bool {
        !self.labelled_clients.is_empty()
    }
}

impl Default for ServerDataConfig {
    fn default() -> Self {
        ServerDataConfig {
            labelled_fraction: 0.05,
            unlabelled_fraction: 0.10,
            validation_fraction: 0.02,
            labelled_clients: Vec::new(),
            unlabelled_clients: Vec::new(),
            validation_clients: Vec::new(),
            validation_holdout: 0.2,
        }
    }
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig {
            fleet: "city".into(),
            client_id: "coordinator".into(),
            key: "keys/coordinator.pk8".into(),
            registry: "fleet.toml".into(),
            out: "out".into(),
            rounds: 5,
            seed: 1,
            broker: BrokerEndpoint::default(),
            data: DataConfig::default(),
            round: RoundPolicy::default(),
            task: TaskConfig::default(),
            transfer: TransferConfig::default(),
            aggregation: default_aggregation(),
            mode: crate::coevolve::Mode::default(),
            coevolution: crate::coevolve::CoevolutionConfig::default(),
            server_data: ServerDataConfig::default(),
            guard: crate::guard::GuardConfig::default(),
            metrics: crate::metrics::MetricsConfig::default(),
            alerts: crate::alerts::AlertConfig::default(),
            model: crate::byom::ModelFiles::default(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerEndpoint {
    pub host: String,
    pub port: u16,
    /// Broker password for our client id (or set COEVO_BROKER_PASSWORD).
    pub password: Option<String>,
    /// Give up if the broker cannot be reached for this long at start-up (seconds).
    pub connect_timeout_s: u64,
    /// Fleet CA certificate (PEM, `ca.pem` from `coevo keys tls`): connect over TLS and accept
    /// only a broker certificate it signed for `host`. `None`: plain TCP.
    pub ca_cert: Option<PathBuf>,
    /// The other nodes of a clustered broker (`coevo fleet export-nats`), as "host:port": when
    /// the current node is lost the coordinator reconnects to the next, where its persistent
    /// session and the retained round are kept.
    pub cluster: Vec<String>,
}

impl Default for BrokerEndpoint {
    fn default() -> Self {
        BrokerEndpoint {
            host: "127.0.0.1".into(),
            port: 1883,
            password: None,
            connect_timeout_s: 30,
            ca_cert: None,
            cluster: Vec::new(),
        }
    }
}

impl BrokerEndpoint {
    /// The other cluster nodes, parsed.
    pub fn cluster_nodes(&self) -> Result<Vec<(String, u16)>, CoordinatorError> {
        coevo_mqtt::parse_nodes(&self.cluster)
            .map_err(|e| CoordinatorError::Config(format!("broker.cluster: {e}")))
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// Dataset directory (IDX or image folder); its test split evaluates the global model.
    pub path: PathBuf,
    /// Evaluate on at most this many test samples (0 = all).
    pub test_limit: usize,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            path: "/usr/share/datasets/fashion-mnist".into(),
            test_limit: 0,
        }
    }
}

/// What to do when the deadline passes below quorum.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BelowQuorum {
    /// Extend the deadline (up to `max_extensions` times), then skip.
    Extend,
    /// Skip the round at once: the global model stays as it was.
    Skip,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoundPolicy {
    /// Minimum accepted deltas to aggregate.
    pub quorum: u32,
    /// Round deadline, seconds after the manifest is published. The round closes earlier once
    /// every registered client has been accepted.
    pub timeout_s: u64,
    pub below_quorum: BelowQuorum,
    pub max_extensions: u32,
}

impl Default for RoundPolicy {
    fn default() -> Self {
        RoundPolicy {
            quorum: 1,
            timeout_s: 300,
            below_quorum: BelowQuorum::Extend,
            max_extensions: 1,
        }
    }
}

/// Local training clients are asked to do (sent in the signed manifest).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TaskConfig {
    pub epochs: u32,
    pub batch_size: u32,
    pub lr: f64,
    pub momentum: f64,
    pub prox_mu: f64,
}

impl Default for TaskConfig {
    fn default() -> Self {
        TaskConfig {
            epochs: 1,
            batch_size: 32,
            lr: 0.05,
            momentum: 0.9,
            prox_mu: 0.0,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TransferConfig {
    /// Chunk size for model and delta payloads, bytes.
    pub chunk_size: u32,
    /// How the student is broadcast: `f32`, `f16` or `int8` (the default: affine per output
    /// channel + zstd, 4.2× smaller than f32 at no measured accuracy cost, BENCHMARKS.md).
    /// Clients train from the weights as decoded and the coordinator merges onto that same
    /// base, so the rounding never drifts.
    pub downlink_codec: DownlinkCodec,
    /// How clients send deltas: `f32`, `int8` (the default: 4.8× smaller, −0.1 point after 20
    /// FEMNIST rounds), `top-k:ρ` (the ⌈ρ·n⌉ largest entries, with error feedback) or
    /// `top-k:ρ:no-ef`. Carried in every signed manifest.
    pub uplink_codec: UplinkCodec,
    /// Largest delta payload accepted, bytes.
    pub max_delta_bytes: u64,
    /// Seconds after which an upload still missing chunks is dropped (the client re-sends).
    pub stale_transfer_s: u64,
    /// Incomplete uploads one client may have in reassembly at once (an honest camera sends
    /// one per round). Each client may also hold at most this many × `max_delta_bytes`, so
    /// one client can never take the capacity another needs.
    pub uploads_per_client: u32,
    /// Bytes all incomplete uploads together may hold: the coordinator's reassembly memory
    /// bound. A chunk past it is refused without blame (its client re-sends).
    pub reassembly_bytes: u64,
    /// Complete uploads waiting for or in verification at once. Past it the collect loop stops
    /// reading from the broker until the workers catch up, so what a fast broker delivers
    /// waits in `incoming_bytes` rather than in memory that grows with the fleet.
    pub max_verifying: u32,
    /// Payload bytes the coordinator's MQTT session holds unread. A publish past it is
    /// acknowledged and dropped ("shed", counted in the report's `collect.shed`); its client
    /// re-sends after its receipt timeout. Brokers do not all bound what they push at a slow
    /// subscriber (Mosquitto pushed 1,500+ unacknowledged deltas at once), so this is the
    /// coordinator's own bound.
    pub incoming_bytes: u64,
}

impl TransferConfig {
    /// Bytes one client's incomplete uploads may hold together.
    pub fn per_client_bytes(&self) -> u64 {
        self.max_delta_bytes
            .saturating_mul(u64::from(self.uploads_per_client.max(1)))
    }
}

impl Default for TransferConfig {
    fn default() -> Self {
        TransferConfig {
            chunk_size: coevo_protocol::DEFAULT_CHUNK_SIZE as u32,
            downlink_codec: DownlinkCodec::Int8,
            uplink_codec: UplinkCodec::Int8,
            max_delta_bytes: 64 * 1024 * 1024,
            stale_transfer_s: 120,
            uploads_per_client: 1,
            reassembly_bytes: 1 << 30,
            max_verifying: 256,
            incoming_bytes: 64 << 20,
        }
    }
}

impl CoordinatorConfig {
    /// Loads a TOML file; relative paths inside it are taken relative to the file's folder.
    pub fn load(path: &Path) -> Result<Self, CoordinatorError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| CoordinatorError::Config(format!("{}: {e}", path.display())))?;
        let mut cfg: CoordinatorConfig = toml::from_str(&text)
            .map_err(|e| CoordinatorError::Config(format!("{}: {e}", path.display())))?;
        if let Some(base) = path.parent() {
            for p in [
                &mut cfg.key,
                &mut cfg.registry,
                &mut cfg.out,
                &mut cfg.data.path,
            ]
            .into_iter()
            .chain(cfg.broker.ca_cert.as_mut())
            {
                if p.is_relative() {
                    *p = base.join(&*p);
                }
            }
        }
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), CoordinatorError> {
        let bad = |m: String| Err(CoordinatorError::Config(m));
        self.alerts.validate()?;
        coevo_protocol::topic::validate_id(&self.fleet)
            .map_err(|e| CoordinatorError::Config(format!("fleet: {e}")))?;
        coevo_protocol::topic::validate_id(&self.client_id)
            .map_err(|e| CoordinatorError::Config(format!("client_id: {e}")))?;
        self.broker.cluster_nodes()?;
        if self.transfer.chunk_size < 1024 {
            return bad("transfer.chunk_size must be at least 1024 bytes".into());
        }
        if self.transfer.uploads_per_client == 0 {
            return bad("transfer.uploads_per_client must be at least 1".into());
        }
        if self.transfer.reassembly_bytes < self.transfer.max_delta_bytes {
            return bad(format!(
                "transfer.reassembly_bytes ({}) must be at least transfer.max_delta_bytes ({}), \
                 or no full-size delta could ever be reassembled",
                self.transfer.reassembly_bytes, self.transfer.max_delta_bytes
            ));
        }
        if self.task.epochs == 0 || self.task.batch_size == 0 {
            return bad("task.epochs and task.batch_size must be positive".into());
        }
        if !(self.task.lr.is_finite() && self.task.lr > 0.0) {
            return bad(format!(
                "task.lr must be a positive number, got {}",
                self.task.lr
            ));
        }
        if self.round.timeout_s == 0 {
            return bad("round.timeout_s must be positive".into());
        }
        let f = &self.server_data;
        let fractions = [
            f.labelled_fraction,
            f.unlabelled_fraction,
            f.validation_fraction,
        ];
        if fractions.iter().any(|x| !(0.0..=1.0).contains(x)) || fractions.iter().sum::<f64>() > 1.0
        {
            return bad("server_data fractions must be in [0, 1] and sum to at most 1".into());
        }
        if !(0.0..1.0).contains(&f.validation_holdout) {
            return bad("server_data.validation_holdout must be in [0, 1)".into());
        }
        let other_roles_by_id =
            !f.unlabelled_clients.is_empty() || !f.validation_clients.is_empty();
        if other_roles_by_id && !f.by_clients() {
            return bad(
                "server_data: unlabelled_clients/validation_clients need labelled_clients too"
                    .into(),
            );
        }
        let mut seen = std::collections::HashSet::new();
        for id in f
            .labelled_clients
            .iter()
            .chain(&f.unlabelled_clients)
            .chain(&f.validation_clients)
        {
            if !seen.insert(id) {
                return bad(format!("server_data: client {id:?} is given two roles"));
            }
        }
        self.aggregation
            .validate()
            .map_err(|e| CoordinatorError::Config(format!("aggregation: {e}")))?;
        self.guard.validate().map_err(CoordinatorError::Config)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_config_parses_and_matches_defaults() {
        let sample: CoordinatorConfig =
            toml::from_str(include_str!("../coordinator.sample.toml")).unwrap();
        sample.validate().unwrap();
        let d = CoordinatorConfig::default();
        assert_eq!(sample.rounds, d.rounds);
        assert_eq!(sample.transfer.chunk_size, d.transfer.chunk_size);
        assert_eq!(sample.round.timeout_s, d.round.timeout_s);
        assert_eq!(sample.task.lr, d.task.lr);
        assert_eq!(sample.coevolution, d.coevolution);
        assert_eq!(sample.mode, d.mode);
        assert_eq!(sample.aggregation, d.aggregation);
        assert_eq!(sample.guard, d.guard);
        assert_eq!(sample.metrics, d.metrics);
    }

    #[test]
    fn typos_and_bad_values_are_errors() {
        assert!(toml::from_str::<CoordinatorConfig>("roundz = 3").is_err());
        let mut c = CoordinatorConfig::default();
        c.task.lr = f64::NAN;
        assert!(c.validate().is_err());
        c = CoordinatorConfig::default();
        c.fleet = "a/b".into();
        assert!(c.validate().is_err());
    }

    #[test]
    fn server_roles_by_id_are_checked() {
        let by_id = |toml: &str| -> Result<(), CoordinatorError> {
            toml::from_str::<CoordinatorConfig>(toml)
                .map_err(|e| CoordinatorError::Config(e.to_string()))?
                .validate()
        };
        by_id("[server_data]\nlabelled_clients = [\"a\"]\nunlabelled_clients = [\"b\"]").unwrap();
        // A writer in two roles would leak labels into the pool or validation.
        let e = by_id("[server_data]\nlabelled_clients = [\"a\"]\nunlabelled_clients = [\"a\"]")
            .unwrap_err();
        assert!(e.to_string().contains("two roles"), "{e}");
        // A pool by id with the labelled set by fraction is ambiguous.
        assert!(by_id("[server_data]\nunlabelled_clients = [\"b\"]").is_err());
        assert!(
            by_id("[server_data]\nlabelled_clients = [\"a\"]\nvalidation_holdout = 1.0").is_err()
        );
    }
}
