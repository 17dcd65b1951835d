//! Command line of the edge agent, shared by `coevo edge` and `coevo-edge`.

use crate::{Agent, AgentOptions, EdgeConfig, EdgeError};
use coevo_models::partition::{partition, PartitionSpec};
use coevo_protocol::SigningKey;
use std::path::PathBuf;

/// Run the edge agent: fetch each round's student, fine-tune on local data, upload a signed delta.
#[derive(Debug, clap::Args)]
pub struct EdgeArgs {
    /// Device configuration (see edge.sample.toml).
    #[arg(long, short)]
    pub config: PathBuf,
    /// Stop after this many rounds (overrides the config).
    #[arg(long)]
    pub rounds: Option<u64>,
}

/// Loads the config, the key and this device's data, then runs until Ctrl-C or `max_rounds`.
pub async fn run(args: &EdgeArgs) -> Result<(), EdgeError> {
    let cfg = EdgeConfig::load(&args.config)?;
    let key_bytes = std::fs::read(&cfg.key)
        .map_err(|e| EdgeError::Config(format!("key {}: {e}", cfg.key.display())))?;
    let key = SigningKey::from_pkcs8(&key_bytes)
        .map_err(|e| EdgeError::Config(format!("key {}: {e}", cfg.key.display())))?;
    // Checked before the (slow) data load, so a bad pinned key fails at once.
    let coordinator_key = cfg.coordinator_public_key()?;
    let split = coevo_models::data::load_dir(&cfg.data.path)
        .map_err(|e| EdgeError::Config(format!("data.path: {e}")))?;
    let spec: PartitionSpec = cfg
        .data
        .partition
        .parse()
        .map_err(|e| EdgeError::Config(format!("data.partition: {e}")))?;
    let parts = partition(
        &split.train.labels_vec(),
        split.train.clients.as_deref(),
        &spec,
        cfg.data.seed,
    )?;
    let indices = parts
        .iter()
        .find(|(name, _)| *name == cfg.data.part)
        .or_else(|| {
            cfg.data
                .part
                .parse::<usize>()
                .ok()
                .and_then(|i| parts.get(i))
        })
        .map(|(_, idx)| idx.clone())
        .ok_or_else(|| {
            EdgeError::Config(format!(
                "data.part {:?} is not one of the {} parts of partition {}",
                cfg.data.part,
                parts.len(),
                cfg.data.partition
            ))
        })?;
    let data = split.train.subset(&indices);
    tracing::info!(client = %cfg.client_id, samples = data.len(), "local data loaded");
    let mut opts = AgentOptions::new(
        &cfg.fleet,
        &cfg.client_id,
        &cfg.coordinator_id,
        coordinator_key,
    );
    opts.broker_host = cfg.broker.host.clone();
    opts.broker_port = cfg.broker.port;
    opts.ca_cert = cfg.broker.ca_cert.clone();
    opts.password = cfg
        .broker
        .password
        .clone()
        .or_else(|| std::env::var("COEVO_BROKER_PASSWORD").ok());
    opts.max_rounds = args.rounds.or(cfg.max_rounds);
    opts.state_dir = cfg.state_dir.clone();
    opts.seed = cfg.seed;
    opts.deadline_grace = std::time::Duration::from_secs(cfg.deadline_grace_s);
    opts.max_auth_refusals = cfg.max_auth_refusals;
    opts.max_residual_age_rounds = cfg.max_residual_age_rounds;
    let agent = Agent::new(opts, key, data)?;
    let summary = agent
        .run(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    tracing::info!(accepted = ?summary.accepted_rounds, rejected = ?summary.rejected_rounds, "edge agent stopped");
    Ok(())
}
