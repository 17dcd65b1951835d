//! Command line of the edge agent, shared by `coevo edge` and `coevo-edge`.

use crate::{Agent, AgentOptions, EdgeConfig, EdgeError};
use coevo_models::local::{LocalOptions, LocalSet, TrainData};
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
    log_memory("start");
    let data = load_data(&cfg)?;
    log_memory("data loaded");
    let mut opts = AgentOptions::new(
        &cfg.fleet,
        &cfg.client_id,
        &cfg.coordinator_id,
        coordinator_key,
    );
    opts.broker_host = cfg.broker.host.clone();
    opts.broker_port = cfg.broker.port;
    opts.cluster = cfg.broker.nodes()?;
    opts.qos0_subscriptions = cfg.broker.subscribe_qos == 0;
    opts.max_reconnect_wait =
        std::time::Duration::from_secs(cfg.broker.max_reconnect_wait_s.max(1));
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
    opts.train_threads = Some(cfg.threads.train());
    opts.student_module = cfg
        .model
        .student
        .as_deref()
        .map(coevo_models::ScriptModule::read)
        .transpose()
        .map_err(|e| EdgeError::Config(format!("[model] student: {e}")))?;
    opts.labels = cfg.labels.clone();
    let agent = Agent::new(opts, key, data)?;
    let summary = agent
        .run(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    tracing::info!(accepted = ?summary.accepted_rounds, rejected = ?summary.rejected_rounds, "edge agent stopped");
    Ok(())
}

/// This device's training data: its own frames, or (simulation) its part of a shared dataset.
pub fn load_data(cfg: &EdgeConfig) -> Result<TrainData, EdgeError> {
    let d = &cfg.data;
    let Some(partition_spec) = &d.partition else {
        let opts = LocalOptions {
            max_memory_bytes: d.max_memory_mb.saturating_mul(1 << 20),
            classes: d.classes.clone(),
        };
        let set = LocalSet::open(&d.path, &opts)
            .map_err(|e| EdgeError::Config(format!("data.path: {e}")))?;
        tracing::info!(client = %cfg.client_id, frames = set.len(), shape = ?set.shape,
            resident_mb = set.resident_bytes() as f64 / (1 << 20) as f64, lazy = set.is_lazy(),
            "own frames opened");
        return Ok(set.into());
    };
    let part = d.part.as_deref().ok_or_else(|| {
        EdgeError::Config("data.part is required with data.partition (which part is ours)".into())
    })?;
    let split = coevo_models::data::load_dir(&d.path)
        .map_err(|e| EdgeError::Config(format!("data.path: {e}")))?;
    let spec: PartitionSpec = partition_spec
        .parse()
        .map_err(|e| EdgeError::Config(format!("data.partition: {e}")))?;
    let parts = partition(
        &split.train.labels_vec(),
        split.train.clients.as_deref(),
        &spec,
        d.seed,
    )?;
    let indices = parts
        .iter()
        .find(|(name, _)| name == part)
        .or_else(|| part.parse::<usize>().ok().and_then(|i| parts.get(i)))
        .map(|(_, idx)| idx.clone())
        .ok_or_else(|| {
            EdgeError::Config(format!(
                "data.part {part:?} is not one of the {} parts of partition {partition_spec}",
                parts.len(),
            ))
        })?;
    // Only our part is kept: the shared set (and its test split) is dropped here.
    let data = split.train.subset(&indices);
    tracing::info!(client = %cfg.client_id, samples = data.len(), "local part of the shared dataset loaded");
    Ok(data.into())
}

/// Caps glibc's malloc arenas at 2. glibc gives each thread that allocates its own arena (up
/// to 8 per core), and libtorch's and tokio's threads each keep freed memory in theirs, which
/// on a camera shows up as resident memory that no round is using.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before any worker thread.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Returns freed heap pages to the kernel (glibc keeps them otherwise).
pub fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory held by the allocator.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// This process's resident memory now and at its peak (`VmRSS`, `VmHWM`), in MiB, read from
/// `/proc/self/status`: the edge logs it at each stage so a camera's footprint can be broken
/// down (libtorch baseline, data, model, training) from one run. `None` off Linux.
pub fn memory_mb() -> Option<(f64, f64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| -> Option<f64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some((kb / 102.4).round() / 10.0)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// Logs [`memory_mb`] at a named stage.
pub fn log_memory(stage: &str) {
    if let Some((rss_mb, hwm_mb)) = memory_mb() {
        tracing::info!(stage, rss_mb, hwm_mb, "memory");
    }
}
