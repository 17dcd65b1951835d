//! `coevo bench labels` (issue #18): cameras with few and noisy labels. On the benches' writer
//! split, every cell of label fraction × label noise corrupts each client's labels the same
//! seeded way ([`coevo_models::noise`]: the simulator is the only one that knows the truth),
//! then runs whole fleets through the embedded broker and real edge agents:
//!
//! - `fedavg`: the student alone, each camera training on its labelled frames only;
//! - `coevolve`: the teacher loop, cameras still training on their labels as given;
//! - `coevolve-clean`: the teacher loop with the edge's pseudo-labelling and cleaning
//!   ([`coevo_models::semi`]) and the coordinator's label-quality weighting
//!   ([`coevo_coordinator::labels`]).
//!
//! `DIR/summary.json` has every run's final accuracies, per-round curves (student, teacher,
//! label counts summed over the fleet, who was left out) and the goals, rewritten after
//! every run; a run whose `run.json` exists is reused, so an interrupted grid resumes.

use super::split::{BenchSplit, SplitArgs};
use super::write_json;
use crate::demo::{run_fleet_with, FleetRun};
use crate::table::acc;
use anyhow::{bail, Context, Result};
use coevo_coordinator::coevolve::{CoevolutionConfig, Mode};
use coevo_coordinator::{RoundEvent, RoundReport};
use coevo_models::noise::{corrupt, Injected, LabelCorruption, NoiseKind};
use coevo_models::semi::SemiConfig;
use coevo_models::Dataset;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Label corruption flags of the demo (and of any fleet run on a fully labelled dataset).
#[derive(Clone, Debug, clap::Args)]
pub struct LabelArgs {
    /// Fraction of each camera's frames that keep a label (the rest become unlabelled).
    #[arg(long, default_value_t = 1.0)]
    pub label_fraction: f64,
    /// Fraction of each camera's labelled frames given a wrong label.
    #[arg(long, default_value_t = 0.0)]
    pub label_noise: f64,
    /// How a wrong label is chosen: symmetric (any other class) or pair (class c → c + 1).
    #[arg(long, default_value = "symmetric", value_parser = parse_kind)]
    pub noise_kind: NoiseKind,
    /// Pseudo-label and clean at the edge (`[labels]` in edge.toml) with default settings.
    #[arg(long)]
    pub clean_labels: bool,
}

fn parse_kind(s: &str) -> Result<NoiseKind, String> {
    s.parse()
        .map_err(|e: coevo_models::ModelError| e.to_string())
}

impl LabelArgs {
    /// The corruption for a seed.
    pub fn corruption(&self, seed: u64) -> LabelCorruption {
        LabelCorruption {
            fraction: self.label_fraction,
            noise: self.label_noise,
            kind: self.noise_kind,
            seed,
        }
    }
}

/// Clients' data with corrupted labels, and what was injected per client.
pub type Corrupted = (Vec<(String, Dataset)>, BTreeMap<String, Injected>);

/// Corrupts every client's labels (per camera, seeded); returns the corrupted data and what
/// was injected per client. The clean labels stay with the caller.
pub fn corrupt_clients(clients: Vec<(String, Dataset)>, c: &LabelCorruption) -> Result<Corrupted> {
    c.validate()?;
    let mut out = Vec::with_capacity(clients.len());
    let mut injected = BTreeMap::new();
    for (id, d) in clients {
        if c.is_identity() {
            out.push((id, d));
            continue;
        }
        let (d, inj) = corrupt(&d, c, &id)?;
        injected.insert(id.clone(), inj);
        out.push((id, d));
    }
    Ok((out, injected))
}

/// What is compared in each cell.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum, Serialize, Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    Fedavg,
    Coevolve,
    CoevolveClean,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::Fedavg => "fedavg",
            Method::Coevolve => "coevolve",
            Method::CoevolveClean => "coevolve-clean",
        }
    }
}

/// `coevo bench labels` flags.
#[derive(Clone, Debug, clap::Args)]
#[command(after_help = "\
Default grid: 3 methods × label fraction {1, 0.1, 0.02} × noise {0, 0.4 symmetric} = 18 fleet \
runs of 75 FEMNIST writers × 20 rounds: many hours on 2 cores (a coevolve round of 75 clients \
is ~100 s). Narrow it with --fractions/--noises/--methods/--rounds/--clients; a run whose \
run.json exists in DIR is reused, so an interrupted grid resumes where it stopped.

Example: coevo bench labels --data ../shared/data/femnist --out out/bench-labels")]
pub struct LabelsArgs {
    #[command(flatten)]
    pub split: SplitArgs,
    /// Output directory: summary.json, and one coordinator output per run under
    /// METHOD-fFRACTION-nNOISE/ (with its run.json once finished).
    #[arg(long)]
    pub out: PathBuf,
    /// Federated rounds of every run.
    #[arg(long, default_value_t = 20)]
    pub rounds: u64,
    #[command(flatten)]
    pub local: super::LocalArgs,
    /// Label fractions (share of each camera's frames that keep a label).
    #[arg(long, value_delimiter = ',', default_value = "1,0.1,0.02")]
    pub fractions: Vec<f64>,
    /// Label noise rates (share of the labelled frames with a wrong label).
    #[arg(long, value_delimiter = ',', default_value = "0,0.4")]
    pub noises: Vec<f64>,
    /// symmetric or pair.
    #[arg(long, default_value = "symmetric", value_parser = parse_kind)]
    pub noise_kind: NoiseKind,
    /// Methods, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "fedavg,coevolve,coevolve-clean"
    )]
    pub methods: Vec<Method>,
    /// Epochs of the teacher's pre-training on the server's labelled set.
    #[arg(long, default_value_t = 40)]
    pub pretrain_epochs: usize,
    /// Most passes of upward fusion per round (as `bench coevolution`).
    #[arg(long, default_value_t = 3)]
    pub fuse_epochs: usize,
    /// `[coevolution] max_client_noise` of the coevolve-clean runs.
    #[arg(long, default_value_t = 0.5)]
    pub max_client_noise: f64,
    /// Pseudo-label confidence threshold at the edge (coevolve-clean).
    #[arg(long, default_value_t = 0.9)]
    pub threshold: f64,
    /// Round deadline, seconds (rounds close once every client is in).
    #[arg(long, default_value_t = 900)]
    pub round_timeout: u64,
}

/// One round of a run's curve.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RoundPoint {
    pub round: u64,
    pub student: Option<f64>,
    pub teacher: Option<f64>,
    /// Summed over the accepted clients' signed label counts.
    pub labelled: u64,
    pub unlabelled: u64,
    pub pseudo_labelled: u64,
    pub relabelled: u64,
    pub discarded: u64,
    /// Mean of the clients' estimates (those that sent one).
    pub mean_estimated_noise: Option<f64>,
    /// Clients left out of the merge and fusion for their label noise.
    pub excluded_for_noise: Vec<String>,
}

/// One fleet run (`DIR/RUN/run.json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Run {
    pub name: String,
    pub method: Method,
    pub fraction: f64,
    pub noise: f64,
    pub kind: NoiseKind,
    /// What the simulator injected, summed over the clients.
    pub injected: Injected,
    pub final_student: Option<f64>,
    pub final_teacher: Option<f64>,
    pub curve: Vec<RoundPoint>,
    pub wall_s: f64,
}

/// The goals, from the runs there are (`null` when a run they need is missing).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Goals {
    /// coevolve-clean at 40 % noise (fraction 1) within 3 points of its clean-label run.
    pub noise_within_3_points: Option<bool>,
    pub noise_loss_coevolve_clean: Option<f64>,
    /// FedAvg's loss from the same noise, beside it.
    pub noise_loss_fedavg: Option<f64>,
    /// coevolve-clean with 10 % of frames labelled ≥ 90 % of its fully labelled accuracy.
    pub ten_percent_at_least_90: Option<bool>,
    pub ten_percent_ratio: Option<f64>,
    /// coevolve-clean with 2 % labelled ≥ 75 %.
    pub two_percent_at_least_75: Option<bool>,
    pub two_percent_ratio: Option<f64>,
}

/// `DIR/summary.json`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Summary {
    pub dataset: String,
    pub split: String,
    pub seed: u64,
    pub rounds: u64,
    pub runs: Vec<Run>,
    pub goals: Goals,
    pub settings: serde_json::Value,
}

fn run_name(m: Method, fraction: f64, noise: f64) -> String {
    format!("{}-f{fraction}-n{noise}", m.name())
}

fn find(runs: &[Run], m: Method, fraction: f64, noise: f64) -> Option<f64> {
    runs.iter()
        .find(|r| r.method == m && r.fraction == fraction && r.noise == noise)
        .and_then(|r| r.final_student)
}

/// Fills in the goals from the runs so far.
pub fn goals(runs: &[Run]) -> Goals {
    let clean = Method::CoevolveClean;
    let base = find(runs, clean, 1.0, 0.0);
    let mut g = Goals::default();
    if let (Some(b), Some(n)) = (base, find(runs, clean, 1.0, 0.4)) {
        g.noise_loss_coevolve_clean = Some(b - n);
        g.noise_within_3_points = Some(b - n <= 0.03);
    }
    if let (Some(b), Some(n)) = (
        find(runs, Method::Fedavg, 1.0, 0.0),
        find(runs, Method::Fedavg, 1.0, 0.4),
    ) {
        g.noise_loss_fedavg = Some(b - n);
    }
    if let Some(b) = base.filter(|b| *b > 0.0) {
        if let Some(a) = find(runs, clean, 0.1, 0.0) {
            g.ten_percent_ratio = Some(a / b);
            g.ten_percent_at_least_90 = Some(a / b >= 0.9);
        }
        if let Some(a) = find(runs, clean, 0.02, 0.0) {
            g.two_percent_ratio = Some(a / b);
            g.two_percent_at_least_75 = Some(a / b >= 0.75);
        }
    }
    g
}

/// A run's curve from its reports.
pub fn curve(reports: &[RoundReport]) -> Vec<RoundPoint> {
    reports
        .iter()
        .map(|r| {
            let mut p = RoundPoint {
                round: r.round,
                student: r.student.test_accuracy,
                teacher: r.teacher.test_accuracy,
                ..RoundPoint::default()
            };
            let mut est = Vec::new();
            for c in r.clients.iter().filter_map(|c| c.labels.as_ref()) {
                p.labelled += c.labelled;
                p.unlabelled += c.unlabelled;
                p.pseudo_labelled += c.pseudo_labelled;
                p.relabelled += c.relabelled;
                p.discarded += c.discarded;
                est.extend(c.estimated_noise);
            }
            if !est.is_empty() {
                p.mean_estimated_noise = Some(est.iter().sum::<f64>() / est.len() as f64);
            }
            p.excluded_for_noise = r
                .labels
                .iter()
                .filter(|q| q.excluded)
                .map(|q| q.client.clone())
                .collect();
            p
        })
        .collect()
}

/// Finished runs an earlier invocation wrote into the same directory for the same data, split,
/// seed, rounds and settings (still backed by their `run.json`): a grid narrowed with `--methods`,
/// `--fractions` or `--noises` and run in parts adds up in one summary, and the goals see every
/// cell. Without a matching summary nothing is carried over; an unreadable run is skipped.
fn earlier_runs(path: &std::path::Path, now: &Summary) -> Vec<Run> {
    let Ok(bytes) = std::fs::read(path) else {
        return Vec::new();
    };
    let Ok(old) = serde_json::from_slice::<Summary>(&bytes) else {
        return Vec::new();
    };
    // Same data, split, seed, rounds and settings; only the command line may differ.
    let settings = |v: &serde_json::Value| {
        let mut v = v.clone();
        if let Some(o) = v.as_object_mut() {
            o.remove("command");
        }
        v
    };
    if (
        &old.dataset,
        &old.split,
        old.seed,
        old.rounds,
        settings(&old.settings),
    ) != (
        &now.dataset,
        &now.split,
        now.seed,
        now.rounds,
        settings(&now.settings),
    ) {
        return Vec::new();
    }
    // Every finished run in the directory, as the grid itself reuses them (one directory, one
    // set of settings), sorted by name for a stable summary.
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    let mut runs: Vec<Run> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter_map(|e| std::fs::read(e.path().join("run.json")).ok())
                .filter_map(|b| serde_json::from_slice::<Run>(&b).ok())
                .collect()
        })
        .unwrap_or_default();
    runs.sort_by(|a, b| a.name.cmp(&b.name));
    runs
}

pub fn run(rt: &tokio::runtime::Runtime, args: &LabelsArgs) -> Result<()> {
    if args.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let split = BenchSplit::load(&args.split)?;
    println!(
        "coevo bench labels: {} — {}; {} rounds; output {}",
        args.split.data.display(),
        split.describe(),
        args.rounds,
        args.out.display()
    );
    let coevolution = CoevolutionConfig {
        pretrain_epochs: args.pretrain_epochs,
        ensemble_clients: 0,
        fuse: coevo_models::distill::KdConfig {
            epochs: args.fuse_epochs,
            augment: true,
            ..CoevolutionConfig::default().fuse
        },
        ..CoevolutionConfig::default()
    };
    let semi = SemiConfig {
        threshold: args.threshold,
        ..SemiConfig::default()
    };
    semi.validate()?;
    let mut summary = Summary {
        dataset: args.split.data.display().to_string(),
        split: split.describe(),
        seed: args.split.seed,
        rounds: args.rounds,
        settings: serde_json::json!({
            "client_writers": split.clients.len(),
            "local_epochs": args.local.local_epochs,
            "lr": args.local.lr,
            "batch": args.local.batch,
            "noise_kind": args.noise_kind,
            "max_client_noise": args.max_client_noise,
            "edge_labels": serde_json::to_value(&semi)?,
            "coevolution": serde_json::to_value(&coevolution)?,
            "command": std::env::args().collect::<Vec<_>>().join(" "),
        }),
        ..Summary::default()
    };
    let summary_path = args.out.join("summary.json");
    summary.runs = earlier_runs(&summary_path, &summary);
    if !summary.runs.is_empty() {
        summary.goals = goals(&summary.runs);
        println!(
            "keeping {} finished run(s) of an earlier invocation on the same split in the summary",
            summary.runs.len()
        );
    }
    for &fraction in &args.fractions {
        for &noise in &args.noises {
            let c = LabelCorruption {
                fraction,
                noise,
                kind: args.noise_kind,
                seed: args.split.seed,
            };
            let (clients, injected) = corrupt_clients(split.client_data(), &c)?;
            let total = injected
                .values()
                .fold(Injected::default(), |a, i| Injected {
                    frames: a.frames + i.frames,
                    labelled: a.labelled + i.labelled,
                    unlabelled: a.unlabelled + i.unlabelled,
                    flipped: a.flipped + i.flipped,
                });
            for &m in &args.methods {
                let name = run_name(m, fraction, noise);
                let dir = args.out.join(&name);
                let done = dir.join("run.json");
                let r = if done.exists() {
                    println!("[{name}] reusing {}", done.display());
                    serde_json::from_slice(&std::fs::read(&done)?)
                        .with_context(|| format!("parsing {}", done.display()))?
                } else {
                    if dir.exists() {
                        // An interrupted run: start it again from scratch.
                        std::fs::remove_dir_all(&dir)
                            .with_context(|| format!("removing {}", dir.display()))?;
                    }
                    let t = Instant::now();
                    let data: Vec<(String, Dataset)> = clients
                        .iter()
                        .map(|(id, d)| (id.clone(), d.shallow_clone()))
                        .collect();
                    let reports =
                        fleet_run(rt, args, &split, m, &coevolution, &semi, &name, &dir, data)?;
                    let last = reports.iter().rev().find(|r| r.round == args.rounds);
                    let r = Run {
                        name: name.clone(),
                        method: m,
                        fraction,
                        noise,
                        kind: args.noise_kind,
                        injected: total.clone(),
                        final_student: last.and_then(|r| r.student.test_accuracy),
                        final_teacher: last.and_then(|r| r.teacher.test_accuracy),
                        curve: curve(&reports),
                        wall_s: t.elapsed().as_secs_f64(),
                    };
                    write_json(&done, &r)?;
                    r
                };
                println!(
                    "[{name}] student {}  teacher {}",
                    acc(r.final_student),
                    acc(r.final_teacher)
                );
                summary.runs.retain(|x| x.name != r.name);
                summary.runs.push(r);
                summary.goals = goals(&summary.runs);
                write_json(&summary_path, &summary)?;
            }
        }
    }
    print_table(&summary);
    println!("summary in {}", summary_path.display());
    Ok(())
}

fn print_table(s: &Summary) {
    println!("\n| method | labelled | noise | student | teacher |");
    println!("|---|---:|---:|---:|---:|");
    for r in &s.runs {
        println!(
            "| {} | {} | {} | {} | {} |",
            r.method.name(),
            r.fraction,
            r.noise,
            acc(r.final_student),
            acc(r.final_teacher)
        );
    }
    println!(
        "goals: {}",
        serde_json::to_string(&s.goals).unwrap_or_default()
    );
}

/// One fleet through the real broker and edge agents.
#[allow(clippy::too_many_arguments)]
fn fleet_run(
    rt: &tokio::runtime::Runtime,
    args: &LabelsArgs,
    split: &BenchSplit,
    m: Method,
    coevolution: &CoevolutionConfig,
    semi: &SemiConfig,
    name: &str,
    out: &Path,
    clients: Vec<(String, Dataset)>,
) -> Result<Vec<RoundReport>> {
    let mode = match m {
        Method::Fedavg => Mode::Fedavg,
        _ => Mode::Coevolve,
    };
    let clean = m == Method::CoevolveClean;
    let bar = super::round_bar(name, args.rounds);
    let run = FleetRun {
        fleet: "bench",
        out,
        clients,
        test: split.test.shallow_clone(),
        seed: args.split.seed,
    };
    let server = split.server_data();
    let mut cfg_coevo = coevolution.clone();
    cfg_coevo.max_client_noise = if clean { args.max_client_noise } else { 1.0 };
    cfg_coevo.label_weighting = clean;
    let reports = rt.block_on(run_fleet_with(
        run,
        |cfg| {
            super::fleet_config(cfg, split, mode, args.rounds, args.round_timeout, &args.local);
            cfg.coevolution = cfg_coevo;
        },
        |c| match mode {
            Mode::Coevolve => c.with_server_data(server),
            Mode::Fedavg => c,
        },
        |o| {
            if clean {
                o.labels = Some(semi.clone());
            }
        },
        &mut |ev: &RoundEvent| {
            if let RoundEvent::Finished(r) = ev {
                let pseudo: u64 = r
                    .clients
                    .iter()
                    .filter_map(|c| c.labels.as_ref())
                    .map(|l| l.pseudo_labelled)
                    .sum();
                bar.suspend(|| {
                    println!(
                        "[{name}] round {:>3}/{}  {}  student {}  teacher {}  pseudo {pseudo}  {:.1}s",
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

#[cfg(test)]
mod tests {
    use super::*;

    fn run(m: Method, fraction: f64, noise: f64, student: f64) -> Run {
        Run {
            name: run_name(m, fraction, noise),
            method: m,
            fraction,
            noise,
            kind: NoiseKind::Symmetric,
            injected: Injected::default(),
            final_student: Some(student),
            final_teacher: None,
            curve: Vec::new(),
            wall_s: 1.0,
        }
    }

    fn write(dir: &std::path::Path, r: &Run) {
        std::fs::create_dir_all(dir.join(&r.name)).unwrap();
        std::fs::write(
            dir.join(&r.name).join("run.json"),
            serde_json::to_vec(r).unwrap(),
        )
        .unwrap();
    }

    /// A grid run in parts adds up: the second invocation's summary holds the first one's
    /// finished runs, and the goals are computed over all of them.
    #[test]
    fn a_grid_run_in_parts_adds_up_in_one_summary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("summary.json");
        let now = Summary {
            dataset: "femnist".into(),
            split: "75 clients".into(),
            seed: 1,
            rounds: 20,
            settings: serde_json::json!({"lr": 0.05, "command": "coevo bench labels --methods fedavg"}),
            ..Summary::default()
        };
        assert!(earlier_runs(&path, &now).is_empty(), "no summary yet");
        let clean = run(Method::CoevolveClean, 1.0, 0.0, 0.66);
        let noisy = run(Method::CoevolveClean, 1.0, 0.4, 0.64);
        write(dir.path(), &clean);
        write(dir.path(), &noisy);
        // An interrupted run (no run.json) is not a finished one.
        std::fs::create_dir_all(dir.path().join("fedavg-f1-n0")).unwrap();
        let earlier = Summary {
            settings: serde_json::json!({"lr": 0.05, "command": "coevo bench labels"}),
            runs: vec![clean.clone()],
            dataset: now.dataset.clone(),
            split: now.split.clone(),
            seed: now.seed,
            rounds: now.rounds,
            ..Summary::default()
        };
        std::fs::write(&path, serde_json::to_vec(&earlier).unwrap()).unwrap();
        let runs = earlier_runs(&path, &now);
        let names: Vec<_> = runs.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["coevolve-clean-f1-n0", "coevolve-clean-f1-n0.4"]);
        let g = goals(&runs);
        assert_eq!(g.noise_within_3_points, Some(true));
        assert!((g.noise_loss_coevolve_clean.unwrap() - 0.02).abs() < 1e-9);
        assert_eq!(g.ten_percent_at_least_90, None, "that cell was not run");

        // Other settings (here the local lr): nothing is carried over.
        let other = Summary {
            settings: serde_json::json!({"lr": 0.02, "command": "x"}),
            ..now
        };
        assert!(earlier_runs(&path, &other).is_empty());
    }
}
