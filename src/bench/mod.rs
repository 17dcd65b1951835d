//! `coevo bench …`: the product's measured claims, each run through the real broker and edge
//! agents (the fleet runner of `coevo demo`) on a seeded writer split, writing
//! `DIR/summary.json` plus per-round curves.

pub mod byom;
pub mod coevolution;
pub mod compression;
pub mod fleet;
pub mod labels;
pub mod robustness;
pub mod split;

use anyhow::Result;
use coevo_coordinator::coevolve::Mode;
use coevo_coordinator::config::{BelowQuorum, RoundPolicy, TaskConfig};
use coevo_coordinator::CoordinatorConfig;
use indicatif::{ProgressBar, ProgressStyle};
use split::BenchSplit;

/// Local training flags shared by the benches, with the same defaults, so their figures
/// compare.
#[derive(Clone, Debug, clap::Args)]
pub struct LocalArgs {
    /// Local epochs per round.
    #[arg(long, default_value_t = 2)]
    pub local_epochs: u32,
    /// Local learning rate (SGD, momentum 0.9).
    #[arg(long, default_value_t = 0.05)]
    pub lr: f64,
    /// Local batch size.
    #[arg(long, default_value_t = 16)]
    pub batch: u32,
}

/// The coordinator settings every bench fleet shares: rounds, mode, the split's server roles,
/// a half-fleet quorum with one deadline extension, the local training task, and lossless f32
/// codecs both ways — so a bench measures only its own variable, and its figures stay
/// comparable when the coordinator's default codecs change (`bench compression` sets its own).
pub fn fleet_config(
    c: &mut CoordinatorConfig,
    split: &BenchSplit,
    mode: Mode,
    rounds: u64,
    timeout_s: u64,
    local: &LocalArgs,
) {
    c.rounds = rounds;
    c.mode = mode;
    c.server_data = split.roles.clone();
    c.round = RoundPolicy {
        quorum: (split.clients.len() as u32).div_ceil(2),
        timeout_s,
        below_quorum: BelowQuorum::Extend,
        max_extensions: 1,
    };
    c.task = TaskConfig {
        epochs: local.local_epochs,
        batch_size: local.batch,
        lr: local.lr,
        momentum: 0.9,
        prox_mu: 0.0,
    };
    c.transfer.downlink_codec = coevo_protocol::DownlinkCodec::F32;
    c.transfer.uplink_codec = coevo_protocol::UplinkCodec::F32;
}

/// Which coordinator loop a bench's fleet runs use (`--mode` of the robustness and compression
/// benches).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RunMode {
    Fedavg,
    Coevolve,
}

impl RunMode {
    /// As written on the command line and in summaries.
    pub fn name(self) -> &'static str {
        match self {
            RunMode::Fedavg => "fedavg",
            RunMode::Coevolve => "coevolve",
        }
    }

    /// The coordinator's mode.
    pub fn mode(self) -> Mode {
        match self {
            RunMode::Fedavg => Mode::Fedavg,
            RunMode::Coevolve => Mode::Coevolve,
        }
    }
}

/// A progress bar over one fleet run's rounds.
pub fn round_bar(name: &str, rounds: u64) -> ProgressBar {
    let bar = ProgressBar::new(rounds);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "[{name}] round {{pos}}/{{len}} [{{bar:30}}] {{msg}} {{elapsed}}"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

/// The benches.
#[derive(Debug, clap::Subcommand)]
pub enum BenchCmd {
    /// Teacher ⇄ student co-evolution vs FedAvg vs the teacher's lower and upper bounds.
    Coevolution(coevolution::CoevolutionArgs),
    /// Byzantine clients (sign flip, ×10, noise, NaN, replay, impersonation) against every
    /// aggregation rule: accuracy vs the clean run, and what was rejected.
    Robustness(robustness::RobustnessArgs),
    /// Uplink and downlink codecs (int8, top-k with and without error feedback, f16): bytes
    /// per client and round against final accuracy, next to uncompressed f32.
    Compression(compression::CompressionArgs),
    /// A synthetic city fleet (no training) against the real coordinator and broker as
    /// separate processes: connect storm, publish → close, phases, peak RSS, resends vs N.
    Fleet(fleet::FleetArgs),
    /// A TorchScript export of the built-in student against the built-in one (issue #16):
    /// same split, same initial weights; final accuracy and round time.
    Byom(byom::ByomArgs),
    /// Cameras with few and noisy labels (issue #18): FedAvg vs coevolve with and without
    /// edge pseudo-labelling and cleaning, over label fraction × label noise.
    Labels(labels::LabelsArgs),
}

impl BenchCmd {
    /// Runs the bench on `rt` (fleet runs are async; training runs on its blocking pool).
    pub fn run(&self, rt: &tokio::runtime::Runtime) -> Result<()> {
        match self {
            BenchCmd::Coevolution(a) => coevolution::run(rt, a),
            BenchCmd::Robustness(a) => robustness::run(rt, a),
            BenchCmd::Compression(a) => compression::run(rt, a),
            BenchCmd::Fleet(a) => fleet::run(rt, a),
            BenchCmd::Byom(a) => byom::run(rt, a),
            BenchCmd::Labels(a) => labels::run(rt, a),
        }
    }
}

/// Writes `value` as pretty JSON to `path` via a temporary file, so a reader (or a crash)
/// never sees half a summary.
pub fn write_json(path: &std::path::Path, value: &impl serde::Serialize) -> Result<()> {
    use anyhow::Context;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(value)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
