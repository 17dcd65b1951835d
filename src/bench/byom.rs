//! `coevo bench byom` (issue #16, Must 5): does a TorchScript export of the built-in student
//! train like the built-in one? Two whole fleets on the benches' writer split (FEMNIST by
//! default), identical but for the student: the built-in `Student` and `--student FILE`
//! (`examples/models/builtin_student_femnist.pt`, exported from `examples/models/
//! builtin_student.py` by `scripts/export-model.py`), each through the embedded broker and real
//! edge agents that fetch the module over MQTT. Both start from the **same weights**: the
//! bench loads the built-in student's seeded initial weights, renamed to the module's
//! parameter names (`conv1.weight` → `conv1_weight`), into the module and saves it as
//! `DIR/student-builtin-init.pt`, the TorchScript run's student, so the only difference left is libtorch running a TorchScript graph instead of
//! tch's layers. The goal: final student accuracy within ±0.5 point and mean round time within
//! ±20 % of the built-in run. `DIR/summary.json` holds both runs' curves and the verdict.

use super::split::{BenchSplit, SplitArgs};
use super::write_json;
use crate::demo::{run_fleet, FleetRun};
use crate::table::acc;
use anyhow::{bail, Context, Result};
use coevo_coordinator::coevolve::Mode;
use coevo_coordinator::{RoundEvent, RoundReport};
use coevo_models::{Arch, Net, ScriptModule, Weights};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Largest accepted gap in final student accuracy (fraction: 0.005 = half a point).
const ACCURACY_GOAL: f64 = 0.005;
/// Largest accepted relative gap in mean round time.
const ROUND_TIME_GOAL: f64 = 0.20;

/// `coevo bench byom` flags.
#[derive(Clone, Debug, clap::Args)]
#[command(after_help = "\
Example (two FedAvg fleets of 75 FEMNIST writers, 20 rounds each; ~8 s a round on 2 cores):
  coevo bench byom --data ../shared/data/femnist --out out/bench-byom \\
      --student examples/models/builtin_student_femnist.pt")]
pub struct ByomArgs {
    #[command(flatten)]
    pub split: SplitArgs,
    /// Output directory, empty or absent: summary.json and one coordinator output per run
    /// (builtin/, torchscript/).
    #[arg(long)]
    pub out: PathBuf,
    /// TorchScript export of the built-in student for the data's shape.
    #[arg(long, default_value = "examples/models/builtin_student_femnist.pt")]
    pub student: PathBuf,
    /// Federated rounds of each run (FedAvg).
    #[arg(long, default_value_t = 20)]
    pub rounds: u64,
    /// Round deadline, seconds.
    #[arg(long, default_value_t = 900)]
    pub round_timeout: u64,
    #[command(flatten)]
    pub local: super::LocalArgs,
}

#[derive(Debug, Serialize)]
struct RunSummary {
    name: String,
    final_accuracy: Option<f64>,
    best_accuracy: Option<f64>,
    /// Mean `duration_ms` of the rounds (publish → report).
    mean_round_ms: f64,
    wall_s: f64,
    params: Option<usize>,
    accuracy_curve: Vec<Option<f64>>,
    round_ms: Vec<u64>,
}

fn summarize(name: &str, reports: &[RoundReport], wall_s: f64) -> RunSummary {
    let curve: Vec<Option<f64>> = reports.iter().map(|r| r.student.test_accuracy).collect();
    let round_ms: Vec<u64> = reports.iter().map(|r| r.duration_ms).collect();
    RunSummary {
        name: name.into(),
        final_accuracy: curve.last().copied().flatten(),
        best_accuracy: curve.iter().flatten().copied().reduce(f64::max),
        mean_round_ms: round_ms.iter().sum::<u64>() as f64 / round_ms.len().max(1) as f64,
        wall_s,
        params: reports.last().and_then(|r| r.student.params),
        accuracy_curve: curve,
        round_ms,
    }
}

/// Writes `module` with the built-in student's initial weights (as the coordinator draws them
/// from `seed`, renamed to the module's parameter names) to `path`; checks the two layouts
/// agree, i.e. that `module` is an export of the built-in student for this data.
fn with_builtin_init(
    split: &BenchSplit,
    module: &ScriptModule,
    seed: u64,
    path: &Path,
) -> Result<()> {
    tch::manual_seed(seed as i64);
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let _net = Arch::student().build(&vs.root(), &split.shape)?;
    let builtin = Weights::from_var_store(&vs);
    let mut svs = tch::nn::VarStore::new(tch::Device::Cpu);
    let script = Arch::Script(module.clone()).build(&svs.root(), &split.shape)?;
    let layout = Weights::from_var_store(&svs);
    let renamed = Weights {
        tensors: builtin
            .tensors
            .into_iter()
            .map(|(k, v)| (k.replace('.', "_"), v))
            .collect(),
    };
    if !renamed.same_layout(&layout) {
        bail!(
            "{module:?} is not an export of the built-in student for this data: its parameters are {:?}",
            layout.specs()
        );
    }
    renamed.load_into(&mut svs)?;
    match script {
        Net::Script(s) => s.save(path)?,
        _ => bail!("not a TorchScript net"),
    }
    Ok(())
}

fn fleet(
    rt: &tokio::runtime::Runtime,
    args: &ByomArgs,
    split: &BenchSplit,
    name: &str,
    student: Option<&Path>,
) -> Result<RunSummary> {
    let out = args.out.join(name);
    let bar = super::round_bar(name, args.rounds);
    let t = Instant::now();
    let reports = rt.block_on(run_fleet(
        FleetRun {
            fleet: "bench",
            out: &out,
            clients: split.client_data(),
            test: split.test.shallow_clone(),
            seed: args.split.seed,
        },
        |c| {
            super::fleet_config(
                c,
                split,
                Mode::Fedavg,
                args.rounds,
                args.round_timeout,
                &args.local,
            );
            c.model.student = student.map(Path::to_path_buf);
        },
        |c| c,
        &mut |ev: &RoundEvent| {
            if let RoundEvent::Finished(r) = ev {
                bar.suspend(|| {
                    println!(
                        "[{name}] round {:>3}/{}  student {}  accepted {}/{}  {:.1}s",
                        r.round,
                        args.rounds,
                        acc(r.student.test_accuracy),
                        r.accepted,
                        r.registered,
                        r.duration_ms as f64 / 1000.0
                    )
                });
                bar.set_position(r.round);
            }
        },
    ))?;
    bar.finish_and_clear();
    Ok(summarize(name, &reports, t.elapsed().as_secs_f64()))
}

/// Runs the built-in fleet, then the TorchScript one, and writes the comparison.
pub fn run(rt: &tokio::runtime::Runtime, args: &ByomArgs) -> Result<()> {
    if args.out.exists() && std::fs::read_dir(&args.out)?.next().is_some() {
        // Both runs must start from scratch (and from the same weights).
        bail!("{} is not empty", args.out.display());
    }
    let split = BenchSplit::load(&args.split)?;
    let module = ScriptModule::read(&args.student)
        .with_context(|| format!("--student {}", args.student.display()))?;
    // `run_fleet` seeds the coordinator with the split's seed: the built-in run draws its
    // initial student from it, and the TorchScript run starts from the same numbers.
    std::fs::create_dir_all(&args.out)?;
    let student = args.out.join("student-builtin-init.pt");
    with_builtin_init(&split, &module, args.split.seed, &student)?;

    let builtin = fleet(rt, args, &split, "builtin", None)?;
    let script = fleet(rt, args, &split, "torchscript", Some(&student))?;
    let gap = match (builtin.final_accuracy, script.final_accuracy) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let time_ratio = script.mean_round_ms / builtin.mean_round_ms.max(1.0);
    let summary = serde_json::json!({
        "data": args.split.data,
        "student": args.student,
        "rounds": args.rounds,
        "same_initial_weights": true,
        "builtin": builtin,
        "torchscript": script,
        "accuracy_gap": gap,
        "round_time_ratio": time_ratio,
        "accuracy_goal_met": gap.map(|g| g.abs() <= ACCURACY_GOAL + 1e-9),
        "round_time_goal_met": (time_ratio - 1.0).abs() <= ROUND_TIME_GOAL,
        "machine_threads": std::thread::available_parallelism().map_or(0, |n| n.get()),
    });
    write_json(&args.out.join("summary.json"), &summary)?;
    println!(
        "final student accuracy: built-in {}, TorchScript {} (gap {:+.2} points; goal ±0.5); mean round: {:.1} s vs {:.1} s (×{:.2}; goal ±20 %)",
        acc(builtin.final_accuracy),
        acc(script.final_accuracy),
        gap.unwrap_or(f64::NAN) * 100.0,
        builtin.mean_round_ms / 1000.0,
        script.mean_round_ms / 1000.0,
        time_ratio
    );
    Ok(())
}
