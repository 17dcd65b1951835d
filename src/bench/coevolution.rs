//! `coevo bench coevolution`: does co-evolution pay? On one seeded writer split it measures
//! (a) the teacher trained on the server's labelled set only (lower bound), (b) the teacher
//! trained centrally on every training sample (upper bound), (c) the FedAvg student and
//! (d) the co-evolved teacher and student — (c) and (d) through the real broker and edge agents
//! with the same clients, seed and local training, so the only difference is the mode.
//!
//! `gap_closed = (coevolve_teacher − lower) / (upper − lower)`: how much of what the fleet's
//! data could teach the teacher actually reached it without the data leaving the cameras.

use super::split::{BenchSplit, SplitArgs};
use super::write_json;
use crate::demo::{run_fleet_with, FleetRun};
use anyhow::{bail, Context, Result};
use coevo_coordinator::coevolve::{CoevolutionConfig, Mode, TeacherLoop};
use coevo_coordinator::{RoundEvent, RoundReport};
use coevo_models::distill::GuardOutcome;
use coevo_models::train::{evaluate, train};
use coevo_models::Teacher;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// `coevo bench coevolution` flags.
#[derive(Clone, Debug, clap::Args)]
pub struct CoevolutionArgs {
    #[command(flatten)]
    pub split: SplitArgs,
    /// Output directory (must not hold a previous bench): summary.json, and one coordinator
    /// output (reports, checkpoints) per mode under fedavg/ and coevolve/.
    #[arg(long)]
    pub out: PathBuf,
    /// Federated rounds of each mode.
    #[arg(long, default_value_t = 20)]
    pub rounds: u64,
    #[command(flatten)]
    pub local: super::LocalArgs,
    /// Epochs of the upper-bound teacher over all training data.
    #[arg(long, default_value_t = 12)]
    pub upper_epochs: usize,
    /// Epochs of the teacher's pre-training on the labelled set (the lower bound, and the
    /// co-evolved teacher's starting point).
    #[arg(long, default_value_t = 40)]
    pub pretrain_epochs: usize,
    /// Most passes of upward fusion over the unlabelled pool per round (early-stopped on the
    /// held-out validation writers; the best epoch is kept).
    #[arg(long, default_value_t = 3)]
    pub fuse_epochs: usize,
    /// Fuse on randomly shifted/rotated/scaled views of the pool, the ensemble labelling each
    /// view online: more transfer data from the same pool, for an ensemble pass per batch
    /// (`--fuse-augment false` fuses on the pool as is, with the ensemble's logits computed
    /// once). Measured: +2.9 points of teacher accuracy at round 20 (BENCHMARKS.md).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub fuse_augment: bool,
    /// Client students in the fusion ensemble besides the merged one (sampled per round;
    /// each costs a forward pass over the pool). 0, the merged student alone, is the setting
    /// measured in BENCHMARKS.md.
    #[arg(long, default_value_t = 0)]
    pub ensemble_clients: usize,
    /// Weight of the KD term in fusion (1 − α goes to cross-entropy on the labelled set).
    #[arg(long, default_value_t = 0.5)]
    pub fuse_alpha: f64,
    /// Pool rows whose ensemble target's top-class probability is below this are left out of
    /// fusion's KD term (0 keeps all).
    #[arg(long, default_value_t = 0.5)]
    pub fuse_min_confidence: f64,
    /// Weight fusion-ensemble members by their accuracy on the held-out validation writers
    /// (members below half the best left out); `false` = uniform, as before issue #12.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub fuse_weighted: bool,
    /// Which parts to run; with `--reuse`, the others are taken from an earlier bench.
    #[arg(long, value_delimiter = ',', default_value = "bounds,fedavg,coevolve")]
    pub only: Vec<Part>,
    /// An earlier bench directory on the same data, split, seed and rounds: parts not run now
    /// (see `--only`) are copied from its summary.json, e.g. to try another fusion setting
    /// without re-training the bounds and the FedAvg fleet.
    #[arg(long)]
    pub reuse: Option<PathBuf>,
    /// Few and noisy labels on every client (issue #18; `bench labels` runs the grid).
    #[command(flatten)]
    pub labels: super::labels::LabelArgs,
}

/// A part of the bench.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    Bounds,
    Fedavg,
    Coevolve,
}

/// One round of the curves.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct CurvePoint {
    pub round: u64,
    pub fedavg_student: Option<f64>,
    pub coevolve_student: Option<f64>,
    pub coevolve_teacher: Option<f64>,
    pub distillation: Option<String>,
    pub fusion: Option<String>,
}

/// `DIR/summary.json`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Summary {
    pub dataset: String,
    pub split: String,
    pub seed: u64,
    pub rounds: u64,
    /// Test accuracy of the co-evolved teacher's round-0 checkpoint (its pretraining on the
    /// labelled set), read back from `coevolve/checkpoints/` when that part ran.
    pub lower_bound: Option<f64>,
    /// Whether the bounds part's pretrained teacher and the coevolve run's round-0 teacher
    /// checkpoint are byte-identical (they must be: same code path, same seed).
    pub lower_is_round0_checkpoint: Option<bool>,
    pub upper_bound: Option<f64>,
    pub fedavg_student: Option<f64>,
    pub coevolve_teacher: Option<f64>,
    pub coevolve_student: Option<f64>,
    pub gap_closed: Option<f64>,
    /// Pass/fail of the two goals (`gap_closed ≥ 0.5`, `coevolve_student ≥ fedavg − 0.01`).
    pub goals: Goals,
    pub curves: Vec<CurvePoint>,
    /// Wall time per part, seconds.
    pub wall_s: std::collections::BTreeMap<String, f64>,
    pub settings: serde_json::Value,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Goals {
    pub gap_closed_at_least_half: Option<bool>,
    pub student_not_worse_than_fedavg: Option<bool>,
}

/// One line per guarded step: the decision, before → after, and why (the yardstick compared).
fn guard_text(g: &Option<GuardOutcome>) -> Option<String> {
    g.as_ref().map(|g| {
        let verdict = if g.accepted() {
            "accepted"
        } else {
            "rolled back"
        };
        let (before, after) = match g {
            GuardOutcome::Accepted { before, after, .. }
            | GuardOutcome::RolledBack { before, after, .. } => (before, after),
        };
        format!(
            "{verdict} {:+.4} ({before:.4} -> {after:.4}): {}",
            after - before,
            g.reason()
        )
    })
}

pub fn run(rt: &tokio::runtime::Runtime, args: &CoevolutionArgs) -> Result<()> {
    if args.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    if args.out.join("summary.json").exists() {
        bail!(
            "{} already holds a bench; choose another --out or delete it",
            args.out.display()
        );
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let t_all = Instant::now();
    let split = BenchSplit::load(&args.split)?;
    println!(
        "coevo bench coevolution: {} — {}; {} rounds; output {}",
        args.split.data.display(),
        split.describe(),
        args.rounds,
        args.out.display()
    );
    let coevolution = CoevolutionConfig {
        pretrain_epochs: args.pretrain_epochs,
        ensemble_clients: args.ensemble_clients,
        fuse_weighted: args.fuse_weighted,
        fuse: coevo_models::distill::KdConfig {
            epochs: args.fuse_epochs,
            augment: args.fuse_augment,
            alpha: args.fuse_alpha,
            min_confidence: args.fuse_min_confidence,
            ..CoevolutionConfig::default().fuse
        },
        ..CoevolutionConfig::default()
    };
    let mut summary = Summary {
        dataset: args.split.data.display().to_string(),
        split: split.describe(),
        seed: args.split.seed,
        rounds: args.rounds,
        settings: serde_json::json!({
            "server_labelled_writers": args.split.server_labelled,
            "server_unlabelled_writers": args.split.server_unlabelled,
            "server_validation_writers": args.split.server_validation,
            "client_writers": split.clients.len(),
            "local_epochs": args.local.local_epochs,
            "lr": args.local.lr,
            "batch": args.local.batch,
            "upper_epochs": args.upper_epochs,
            "coevolution": serde_json::to_value(&coevolution)?,
            "command": std::env::args().collect::<Vec<_>>().join(" "),
        }),
        curves: (1..=args.rounds)
            .map(|round| CurvePoint {
                round,
                ..CurvePoint::default()
            })
            .collect(),
        ..Summary::default()
    };
    let summary_path = args.out.join("summary.json");
    if let Some(dir) = &args.reuse {
        reuse(&mut summary, dir, &args.only)?;
    }

    if args.only.contains(&Part::Bounds) {
        let t = Instant::now();
        println!(
            "[bounds] lower: teacher on the labelled set ({} samples × {} epochs)",
            split.server.labelled.len(),
            args.pretrain_epochs
        );
        let mut tl = TeacherLoop::new(split.shape, split.server_data(), coevolution.clone())?;
        tch::manual_seed(args.split.seed as i64);
        tl.pretrain(args.split.seed)?;
        let lower = tl.evaluate_teacher(&split.test).accuracy;
        std::fs::write(
            args.out.join("lower-teacher.safetensors"),
            tl.teacher_weights()
                .encode(coevo_models::WeightCodec::F32)?,
        )?;
        println!("[bounds] lower_bound {lower:.4}");
        println!(
            "[bounds] upper: teacher on all training data ({} samples × {} epochs)",
            split.train_all.len(),
            args.upper_epochs
        );
        let upper = upper_bound(&split, &coevolution, args.upper_epochs, args.split.seed)?;
        println!(
            "[bounds] upper_bound {upper:.4}  ({:.0} s)",
            t.elapsed().as_secs_f64()
        );
        summary.lower_bound = Some(lower);
        summary.upper_bound = Some(upper);
        summary
            .wall_s
            .insert("bounds".into(), t.elapsed().as_secs_f64());
        write_json(&summary_path, &summary)?;
    }

    for (part, mode) in [
        (Part::Fedavg, Mode::Fedavg),
        (Part::Coevolve, Mode::Coevolve),
    ] {
        if !args.only.contains(&part) {
            continue;
        }
        let name = match mode {
            Mode::Fedavg => "fedavg",
            Mode::Coevolve => "coevolve",
        };
        let t = Instant::now();
        let reports = fleet_run(rt, args, &split, mode, &coevolution, name)?;
        summary
            .wall_s
            .insert(name.into(), t.elapsed().as_secs_f64());
        for r in &reports {
            let Some(p) = summary.curves.iter_mut().find(|p| p.round == r.round) else {
                continue;
            };
            match mode {
                Mode::Fedavg => p.fedavg_student = r.student.test_accuracy,
                Mode::Coevolve => {
                    p.coevolve_student = r.student.test_accuracy;
                    p.coevolve_teacher = r.teacher.test_accuracy;
                    if let Some(c) = &r.coevolution {
                        p.distillation = guard_text(&c.distillation);
                        // Fusion runs only on a round whose merged student was kept; say so
                        // rather than leave the curve silent.
                        p.fusion = guard_text(&c.fusion)
                            .or_else(|| Some(format!("not run: round {}", r.outcome)));
                    }
                }
            }
        }
        if mode == Mode::Coevolve {
            check_round0(&mut summary, &args.out, &split)?;
        }
        let last = reports.iter().rev().find(|r| r.round == args.rounds);
        match mode {
            Mode::Fedavg => summary.fedavg_student = last.and_then(|r| r.student.test_accuracy),
            Mode::Coevolve => {
                summary.coevolve_student = last.and_then(|r| r.student.test_accuracy);
                summary.coevolve_teacher = last.and_then(|r| r.teacher.test_accuracy);
            }
        }
        finish(&mut summary);
        write_json(&summary_path, &summary)?;
    }
    summary
        .wall_s
        .insert("total".into(), t_all.elapsed().as_secs_f64());
    finish(&mut summary);
    write_json(&summary_path, &summary)?;
    print_table(&summary);
    println!("summary in {}", summary_path.display());
    Ok(())
}

/// The lower bound is the co-evolved teacher's round-0 checkpoint: evaluates that checkpoint
/// on the test split and records whether the bounds part pretrained byte-identical weights.
fn check_round0(summary: &mut Summary, out: &Path, split: &BenchSplit) -> Result<()> {
    let path = out.join("coevolve/checkpoints/teacher-0000.safetensors");
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    if let Ok(lower) = std::fs::read(out.join("lower-teacher.safetensors")) {
        summary.lower_is_round0_checkpoint = Some(lower == bytes);
    }
    let w = coevo_models::Weights::decode(&bytes, coevo_models::WeightCodec::F32, 1 << 30)?;
    let mut vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let teacher = Teacher::new(&vs.root(), &split.shape);
    w.load_into(&mut vs)?;
    summary.lower_bound = Some(evaluate(&teacher, &split.test, 512).accuracy);
    Ok(())
}

/// Copies the parts not run now from an earlier bench of the same split.
fn reuse(summary: &mut Summary, dir: &Path, running: &[Part]) -> Result<()> {
    let path = dir.join("summary.json");
    let old: Summary = serde_json::from_slice(
        &std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
    )
    .with_context(|| format!("parsing {}", path.display()))?;
    if (&old.dataset, &old.split, old.seed, old.rounds)
        != (
            &summary.dataset,
            &summary.split,
            summary.seed,
            summary.rounds,
        )
    {
        bail!(
            "{} ran on {} ({}), seed {}, {} rounds: not comparable with this bench",
            path.display(),
            old.dataset,
            old.split,
            old.seed,
            old.rounds
        );
    }
    if !running.contains(&Part::Bounds) {
        summary.lower_bound = old.lower_bound;
        summary.upper_bound = old.upper_bound;
    }
    for (new, old) in summary.curves.iter_mut().zip(old.curves) {
        if !running.contains(&Part::Fedavg) {
            new.fedavg_student = old.fedavg_student;
        }
        if !running.contains(&Part::Coevolve) {
            new.coevolve_student = old.coevolve_student;
            new.coevolve_teacher = old.coevolve_teacher;
            new.distillation = old.distillation;
            new.fusion = old.fusion;
        }
    }
    if !running.contains(&Part::Fedavg) {
        summary.fedavg_student = old.fedavg_student;
    }
    if !running.contains(&Part::Coevolve) {
        summary.coevolve_student = old.coevolve_student;
        summary.coevolve_teacher = old.coevolve_teacher;
    }
    for (k, v) in old.wall_s {
        summary.wall_s.entry(format!("{k} (reused)")).or_insert(v);
    }
    summary.settings["reused_from"] = serde_json::Value::String(dir.display().to_string());
    finish(summary);
    Ok(())
}

/// Fills in the derived fields from what has been measured so far.
fn finish(s: &mut Summary) {
    if let (Some(lo), Some(hi), Some(t)) = (s.lower_bound, s.upper_bound, s.coevolve_teacher) {
        if hi > lo {
            s.gap_closed = Some((t - lo) / (hi - lo));
        }
    }
    s.goals.gap_closed_at_least_half = s.gap_closed.map(|g| g >= 0.5);
    s.goals.student_not_worse_than_fedavg = match (s.coevolve_student, s.fedavg_student) {
        (Some(c), Some(f)) => Some(c >= f - 0.01),
        _ => None,
    };
}

fn print_table(s: &Summary) {
    let f = crate::table::acc;
    println!(
        "\n| lower bound | upper bound | fedavg student | coevolve teacher | coevolve student | gap_closed |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {} | {} | {} | {} | {} | {} |",
        f(s.lower_bound),
        f(s.upper_bound),
        f(s.fedavg_student),
        f(s.coevolve_teacher),
        f(s.coevolve_student),
        s.gap_closed
            .map_or_else(|| "-".into(), |g| format!("{g:.2}"))
    );
}

/// The upper bound: the same teacher trained centrally on every training sample of the split.
fn upper_bound(
    split: &BenchSplit,
    coevolution: &CoevolutionConfig,
    epochs: usize,
    seed: u64,
) -> Result<f64> {
    tch::manual_seed(seed as i64);
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let teacher = Teacher::new(&vs.root(), &split.shape);
    let cfg = coevolution.teacher_training(epochs, seed);
    train(&teacher, &vs, &split.train_all, &cfg)?;
    Ok(evaluate(&teacher, &split.test, 512).accuracy)
}

/// One mode through the real broker and edge agents, with a progress bar over its rounds.
fn fleet_run(
    rt: &tokio::runtime::Runtime,
    args: &CoevolutionArgs,
    split: &BenchSplit,
    mode: Mode,
    coevolution: &CoevolutionConfig,
    name: &str,
) -> Result<Vec<RoundReport>> {
    let out: &Path = &args.out.join(name);
    let n = split.clients.len();
    let bar = super::round_bar(name, args.rounds);
    let (clients, _) = super::labels::corrupt_clients(
        split.client_data(),
        &args.labels.corruption(args.split.seed),
    )?;
    let semi = args
        .labels
        .clean_labels
        .then(coevo_models::semi::SemiConfig::default);
    let run = FleetRun {
        fleet: "bench",
        out,
        clients,
        test: split.test.shallow_clone(),
        seed: args.split.seed,
    };
    let server = split.server_data();
    let mut deltas = 0usize;
    let reports = rt.block_on(run_fleet_with(
        run,
        |cfg| {
            super::fleet_config(cfg, split, mode, args.rounds, 900, &args.local);
            cfg.coevolution = coevolution.clone();
        },
        |c| match mode {
            Mode::Coevolve => c.with_server_data(server),
            Mode::Fedavg => c,
        },
        |o| o.labels = semi.clone(),
        &mut |ev: &RoundEvent| match ev {
            RoundEvent::Started { .. } => deltas = 0,
            RoundEvent::Accepted { .. } => {
                deltas += 1;
                bar.set_message(format!("{deltas}/{n} deltas"));
            }
            RoundEvent::Rejected { client, reason, .. } => {
                bar.suspend(|| println!("[{name}] rejected {client}: {reason}"))
            }
            RoundEvent::Finished(r) => {
                let acc = crate::table::acc;
                bar.suspend(|| {
                    println!(
                        "[{name}] round {:>3}/{}  {}  student {}  teacher {}  {:.1}s",
                        r.round,
                        args.rounds,
                        r.outcome,
                        acc(r.student.test_accuracy),
                        acc(r.teacher.test_accuracy),
                        r.duration_ms as f64 / 1000.0
                    )
                });
                bar.set_position(r.round);
            }
        },
    ))?;
    bar.finish_and_clear();
    Ok(reports)
}
