//! `coevo bench …`: the product's measured claims, each run through the real broker and edge
//! agents (the fleet runner of `coevo demo`) on a seeded writer split, writing
//! `DIR/summary.json` plus per-round curves.

pub mod coevolution;
pub mod robustness;
pub mod split;

use anyhow::Result;

/// The benches.
#[derive(Debug, clap::Subcommand)]
pub enum BenchCmd {
    /// Teacher ⇄ student co-evolution vs FedAvg vs the teacher's lower and upper bounds.
    Coevolution(coevolution::CoevolutionArgs),
    /// Byzantine clients (sign flip, ×10, noise, NaN, replay, impersonation) against every
    /// aggregation rule: accuracy vs the clean run, and what was rejected.
    Robustness(robustness::RobustnessArgs),
}

impl BenchCmd {
    /// Runs the bench on `rt` (fleet runs are async; training runs on its blocking pool).
    pub fn run(&self, rt: &tokio::runtime::Runtime) -> Result<()> {
        match self {
            BenchCmd::Coevolution(a) => coevolution::run(rt, a),
            BenchCmd::Robustness(a) => robustness::run(rt, a),
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
