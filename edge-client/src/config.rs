//! The device's configuration file (`coevo edge --config edge.toml`); see `edge.sample.toml`.

use crate::EdgeError;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeConfig {
    /// Fleet name (topic namespace).
    pub fleet: String,
    /// This device's id: its MQTT client id, broker user name and signer id.
    pub client_id: String,
    /// PKCS#8 Ed25519 private key of this device (`coevo keys gen`).
    pub key: PathBuf,
    /// Signer id of the coordinator.
    #[serde(default = "default_coordinator")]
    pub coordinator_id: String,
    /// The coordinator's public key, pinned: hex, or a path to a file holding the hex.
    pub coordinator_key: String,
    #[serde(default)]
    pub broker: Broker,
    pub data: Data,
    /// Stop after this many rounds (default: run until stopped).
    #[serde(default)]
    pub max_rounds: Option<u64>,
    /// Seed for local shuffling.
    #[serde(default)]
    pub seed: u64,
    /// Folder for state that must survive a restart (the compressed uplink's error-feedback
    /// residual). Default: `state/<client_id>` beside this file.
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    /// Seconds past a round's signed deadline the edge still acts on it (clock skew). Past
    /// it, the round's manifest is ignored and an unfinished fetch or upload is given up.
    #[serde(default = "default_deadline_grace_s")]
    pub deadline_grace_s: u64,
    /// Consecutive refusals of our broker credentials after which the agent exits.
    #[serde(default = "default_max_auth_refusals")]
    pub max_auth_refusals: u32,
    /// Oldest error-feedback residual, in rounds, still added to a delta after the edge was
    /// offline; older ones are dropped (see `coevo_edge::state::stale_residual_age`).
    #[serde(default = "default_max_residual_age_rounds")]
    pub max_residual_age_rounds: u64,
    /// Cores the agent may use (`[threads]`).
    #[serde(default)]
    pub threads: Threads,
    /// Semi-supervised training and label cleaning (`[labels]`; issue #18). Present (even
    /// empty): the round's model pseudo-labels unlabelled frames and cleans labels before
    /// training, with the defaults of `coevo_models::semi::SemiConfig`. Absent: plain training
    /// on the labelled frames only.
    #[serde(default)]
    pub labels: Option<coevo_models::semi::SemiConfig>,
    /// The student's TorchScript module installed with the device (`[model]`, issue #16).
    #[serde(default)]
    pub model: Model,
}

/// `[model]`: optional. The manifest decides which student the fleet trains and cameras
/// fetch it themselves; a file here only saves the first download.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Model {
    /// TorchScript student (`scripts/export-model.py`), used when a manifest names its digest.
    pub student: Option<PathBuf>,
}

fn default_max_residual_age_rounds() -> u64 {
    crate::state::DEFAULT_MAX_RESIDUAL_AGE_ROUNDS
}

/// How many cores the agent may use. A camera's first job is its video pipeline, so by
/// default both pools leave one core free ([`default_threads`]).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Threads {
    /// libtorch intra-op threads used for training (default: cores − 1, at least 1).
    pub train: Option<usize>,
    /// tokio worker threads of `coevo-edge` (MQTT, verification, signing; default: cores − 1,
    /// at least 1). `coevo edge` runs inside `coevo`'s own runtime and ignores it.
    pub runtime: Option<usize>,
}

/// All cores but one, at least 1.
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .saturating_sub(1)
        .max(1)
}

impl Threads {
    /// libtorch threads to train with.
    pub fn train(&self) -> usize {
        self.train.unwrap_or_else(default_threads).max(1)
    }

    /// tokio worker threads.
    pub fn runtime(&self) -> usize {
        self.runtime.unwrap_or_else(default_threads).max(1)
    }
}

fn default_coordinator() -> String {
    "coordinator".into()
}

fn default_deadline_grace_s() -> u64 {
    30
}

fn default_max_auth_refusals() -> u32 {
    3
}

/// Whether `s` is a public key written out in hex (32 bytes) rather than a path to one.
fn is_hex_key(s: &str) -> bool {
    let s = s.trim();
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Broker {
    pub host: String,
    pub port: u16,
    /// Broker password (or set COEVO_BROKER_PASSWORD).
    pub password: Option<String>,
    /// Fleet CA certificate (PEM, `ca.pem` from `coevo keys tls`): connect over TLS and accept
    /// only a broker certificate it signed for `host`. `None`: plain TCP.
    pub ca_cert: Option<PathBuf>,
    /// The other nodes of a clustered broker, as "host:port". The device starts on one node
    /// picked by its id (so a fleet spreads evenly over `host` and these) and moves to the next
    /// when it loses its node.
    pub cluster: Vec<String>,
    /// QoS of the device's subscriptions, 0 or 1 (default 1). Set 0 on a NATS cluster: NATS
    /// backs each QoS 1 subscription with a replicated JetStream consumer, which a city's
    /// fleet multiplies into tens of thousands, while everything a device subscribes to is
    /// retained (manifest, model, its receipt) and re-delivered on resubscription anyway.
    pub subscribe_qos: u8,
    /// Longest wait between reconnect attempts, seconds (each wait is random in [0, backoff],
    /// the backoff doubling from 0.1 s up to this). A few seconds suits one broker; for a fleet
    /// of thousands on a NATS cluster use 30–60: NATS loads every connecting client's session
    /// from JetStream, and a whole fleet retrying every few seconds after an outage keeps a
    /// small cluster saturated.
    pub max_reconnect_wait_s: u64,
}

impl Default for Broker {
    fn default() -> Self {
        Broker {
            host: "127.0.0.1".into(),
            port: 1883,
            password: None,
            ca_cert: None,
            cluster: Vec::new(),
            subscribe_qos: 1,
            max_reconnect_wait_s: 5,
        }
    }
}

impl Broker {
    /// Every node, `host:port` first, parsed.
    pub fn nodes(&self) -> Result<Vec<(String, u16)>, EdgeError> {
        let mut all = vec![(self.host.clone(), self.port)];
        all.extend(
            coevo_mqtt::parse_nodes(&self.cluster)
                .map_err(|e| EdgeError::Config(format!("broker.cluster: {e}")))?,
        );
        Ok(all)
    }
}

/// Which local data to train on: the device's own folder of frames (the deployment), or one
/// part of a shared dataset (`partition`, for simulating a fleet from one dataset).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Data {
    /// The device's frames (`<class>/*.png`, `train/<class>/…`, a flat folder with
    /// `labels.csv`, or an IDX directory); with `partition`, the shared dataset.
    pub path: PathBuf,
    /// Simulation only: how the shared dataset is split over devices: `natural`, `iid:N`,
    /// `dirichlet:N:ALPHA`, `shards:N:K`. Omitted: all of `path` is this device's.
    #[serde(default)]
    pub partition: Option<String>,
    /// With `partition`: this device's part, a client id (natural) or a part number from 0.
    #[serde(default)]
    pub part: Option<String>,
    /// Seed of the partition (must be the same on every device).
    #[serde(default)]
    pub seed: u64,
    /// Own frames decoded up to this many MiB (as bytes) are held in memory; past it they are
    /// decoded one mini-batch at a time.
    #[serde(default = "default_max_memory_mb")]
    pub max_memory_mb: u64,
    /// The fleet's class names in label order (needed for class names in `labels.csv`, and so
    /// a camera that has not seen every class still numbers them like the fleet). Default: the
    /// sorted class folders.
    #[serde(default)]
    pub classes: Option<Vec<String>>,
}

fn default_max_memory_mb() -> u64 {
    64
}

impl EdgeConfig {
    /// Loads a TOML file; relative paths are taken relative to the file's folder.
    pub fn load(path: &Path) -> Result<Self, EdgeError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| EdgeError::Config(format!("{}: {e}", path.display())))?;
        let mut cfg: EdgeConfig = toml::from_str(&text)
            .map_err(|e| EdgeError::Config(format!("{}: {e}", path.display())))?;
        if let Some(base) = path.parent() {
            if cfg.state_dir.is_none() {
                cfg.state_dir = Some(PathBuf::from("state").join(&cfg.client_id));
            }
            for p in [&mut cfg.key, &mut cfg.data.path]
                .into_iter()
                .chain(cfg.broker.ca_cert.as_mut())
                .chain(cfg.state_dir.as_mut())
                .chain(cfg.model.student.as_mut())
            {
                if p.is_relative() {
                    *p = base.join(&*p);
                }
            }
            // Anything but a hex key is a path, relative to this file like the others.
            let k = Path::new(&cfg.coordinator_key);
            if !is_hex_key(&cfg.coordinator_key) && k.is_relative() {
                cfg.coordinator_key = base.join(k).display().to_string();
            }
        }
        cfg.broker
            .nodes()
            .map_err(|e| EdgeError::Config(format!("{}: {e}", path.display())))?;
        if cfg.broker.subscribe_qos > 1 {
            return Err(EdgeError::Config(format!(
                "{}: broker.subscribe_qos must be 0 or 1",
                path.display()
            )));
        }
        if let Some(l) = &cfg.labels {
            l.validate()
                .map_err(|e| EdgeError::Config(format!("{}: {e}", path.display())))?;
        }
        Ok(cfg)
    }

    /// The pinned coordinator key, read from the hex string or the file it names. Anything
    /// that is not 64 hex digits is a path, so a missing `.pub` file is reported as such
    /// rather than as a hex parse error of its name.
    pub fn coordinator_public_key(&self) -> Result<coevo_protocol::PublicKey, EdgeError> {
        if is_hex_key(&self.coordinator_key) {
            return self
                .coordinator_key
                .trim()
                .parse()
                .map_err(|e| EdgeError::Config(format!("coordinator_key: {e}")));
        }
        let path = &self.coordinator_key;
        let text = std::fs::read_to_string(path)
            .map_err(|e| EdgeError::Config(format!("coordinator_key {path}: {e}")))?;
        text.trim().parse().map_err(|e| {
            EdgeError::Config(format!(
                "coordinator_key {path}: not a hex Ed25519 public key: {e}"
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_config_parses() {
        let cfg: EdgeConfig = toml::from_str(include_str!("../edge.sample.toml")).unwrap();
        assert_eq!(cfg.client_id, "cam-001");
        // The sample is a deployment: its own frames, no partition.
        assert_eq!(cfg.data.partition, None);
        assert_eq!(cfg.data.max_memory_mb, 64);
        assert!(cfg.threads.train() >= 1 && cfg.threads.runtime() >= 1);
        let sim: Data = toml::from_str(
            "path = \"d\"\npartition = \"dirichlet:10:0.5\"\npart = \"0\"\nmax_memory_mb = 8\n",
        )
        .unwrap();
        let spec: Result<coevo_models::partition::PartitionSpec, _> =
            sim.partition.as_deref().unwrap_or_default().parse();
        assert!(spec.is_ok());
        assert_eq!(
            cfg.max_residual_age_rounds,
            crate::state::DEFAULT_MAX_RESIDUAL_AGE_ROUNDS
        );
    }

    #[test]
    fn cluster_nodes_and_subscription_qos_are_checked_at_load() {
        let dir = std::env::temp_dir().join(format!("coevo-edge-cluster-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("edge.toml");
        let sample = include_str!("../edge.sample.toml");
        let with = |extra: &str| sample.replacen("[broker]\n", &format!("[broker]\n{extra}\n"), 1);
        std::fs::write(&path, with("cluster = [\"10.0.0.2:1884\", \"[::1]:1885\"]")).unwrap();
        let cfg = EdgeConfig::load(&path).unwrap();
        let nodes = cfg.broker.nodes().unwrap();
        assert_eq!(nodes.len(), 3);
        assert_eq!(nodes[0], ("127.0.0.1".to_string(), 1883), "host:port first");
        assert_eq!(nodes[2], ("::1".to_string(), 1885));
        for (bad, says) in [
            ("cluster = [\"10.0.0.2\"]", "host:port"),
            ("cluster = [\"10.0.0.2:http\"]", "bad port"),
        ] {
            std::fs::write(&path, with(bad)).unwrap();
            let err = EdgeConfig::load(&path).unwrap_err().to_string();
            assert!(
                err.contains("broker.cluster") && err.contains(says),
                "{err}"
            );
        }
        std::fs::write(
            &path,
            sample.replacen("subscribe_qos = 1", "subscribe_qos = 2", 1),
        )
        .unwrap();
        let err = EdgeConfig::load(&path).unwrap_err().to_string();
        assert!(err.contains("subscribe_qos must be 0 or 1"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn coordinator_key_from_hex_or_file() {
        let key = coevo_protocol::SigningKey::generate().unwrap().public_key();
        let dir = std::env::temp_dir().join(format!("coevo-edge-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.pub");
        std::fs::write(&file, format!("{key}\n")).unwrap();
        let mut cfg: EdgeConfig = toml::from_str(include_str!("../edge.sample.toml")).unwrap();
        cfg.coordinator_key = key.to_string();
        assert_eq!(cfg.coordinator_public_key().unwrap(), key);
        cfg.coordinator_key = file.display().to_string();
        assert_eq!(cfg.coordinator_public_key().unwrap(), key);
        cfg.coordinator_key = "not hex".into();
        assert!(cfg.coordinator_public_key().is_err());
        // A missing key file is reported as such, not as a hex parse error of its name.
        cfg.coordinator_key = dir.join("absent.pub").display().to_string();
        let err = cfg.coordinator_public_key().unwrap_err().to_string();
        assert!(
            err.contains("absent.pub") && err.contains("No such file"),
            "{err}"
        );
        // A file that holds something else names the file.
        std::fs::write(&file, "garbage").unwrap();
        cfg.coordinator_key = file.display().to_string();
        let err = cfg.coordinator_public_key().unwrap_err().to_string();
        assert!(err.contains("c.pub") && err.contains("not a hex"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn state_dir_defaults_beside_the_config_file() {
        let dir = std::env::temp_dir().join(format!("coevo-edge-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("edge.toml");
        std::fs::write(&path, include_str!("../edge.sample.toml")).unwrap();
        let cfg = EdgeConfig::load(&path).unwrap();
        assert_eq!(cfg.state_dir, Some(dir.join("state").join("cam-001")));
        let text = format!(
            "{}\nstate_dir = \"/var/lib/coevo\"\n",
            include_str!("../edge.sample.toml")
                .split("\n[broker]")
                .next()
                .unwrap()
        );
        let rest = include_str!("../edge.sample.toml")
            .split_once("\n[broker]")
            .map(|(_, r)| r)
            .unwrap();
        std::fs::write(&path, format!("{text}\n[broker]{rest}")).unwrap();
        let cfg = EdgeConfig::load(&path).unwrap();
        assert_eq!(cfg.state_dir, Some(PathBuf::from("/var/lib/coevo")));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
