//! `coevo bench robustness` (issue #6): what Byzantine clients do to the federated student, and
//! what each aggregation rule and the coordinator's checks stop. On the benches' writer split,
//! every strategy gets one clean run and then one run per attack in which the same seeded 20 %
//! of the clients are Byzantine ([`coevo_edge::attack`]); everything else — data, seed, local
//! training — is identical, so each difference from the clean run is the attack's doing.
//!
//! Every run is a whole fleet through the embedded broker and real edge agents
//! ([`run_fleet_with`]) writing into `DIR/<strategy>/<attack>/`; `DIR/summary.json` collects
//! the final accuracies, their change from the strategy's clean run (and from clean FedAvg),
//! and what was rejected, excluded or clipped, rewritten after every run so a long bench can
//! be read while it runs.

use super::split::{BenchSplit, SplitArgs};
use super::{write_json, RunMode};
use crate::demo::{run_fleet_with, FleetRun};
use crate::table::acc;
use anyhow::{bail, Context, Result};
use coevo_coordinator::coevolve::{CoevolutionConfig, Mode};
use coevo_coordinator::strategy::StrategyConfig;
use coevo_coordinator::{RoundEvent, RoundReport};
use coevo_edge::Attack;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Round deadline of the clean runs: they close as soon as every client is in, so this only
/// bounds a run that has gone wrong.
const CLEAN_ROUND_TIMEOUT_S: u64 = 900;

/// The criterion of issue #6: the best robust rule ends within this much accuracy of clean.
const GOAL_POINTS: f64 = 0.02;

/// `coevo bench robustness` flags.
#[derive(Clone, Debug, clap::Args)]
#[command(after_help = "\
Every strategy gets one clean run, then one run per attack with the same Byzantine clients \
(the first --byzantine share of the clients in a seeded shuffle). Uploads that fail the \
coordinator's checks (nan, replay, impersonate) never complete a round early, so those runs \
close at the round deadline: by default 1.5 × the slowest collection of the strategy's clean \
run + 5 s, so honest clients still make it.

Default grid: 5 strategies × 7 runs = 35 fleet runs of 75 clients × 4 rounds; about 40 min \
on 2 cores in fedavg mode. --mode coevolve adds the server's teacher (pretrained once per run) and costs \
about 100 s a round on 2 cores: narrow --strategies/--attacks or lower --rounds with it.

Example: coevo bench robustness --data ../shared/data/femnist --out out/bench-robustness")]
pub struct RobustnessArgs {
    #[command(flatten)]
    pub split: SplitArgs,
    /// Output directory (must not hold a previous bench): summary.json, and one coordinator
    /// output (reports, checkpoints, accepted deltas) per run under STRATEGY/ATTACK/, with
    /// ATTACK = `clean` for the run without attackers.
    #[arg(long)]
    pub out: PathBuf,
    /// Federated rounds of every run. 4 keeps the default grid near 40 min on 2 cores (a clean
    /// round of 75 clients takes ~11 s, a round with rejected uploads runs to its ~21 s
    /// deadline); the FEMNIST student is still early in training there (~0.3 accuracy), so
    /// use more rounds on a narrower grid to compare rules nearer convergence.
    #[arg(long, default_value_t = 4)]
    pub rounds: u64,
    /// Share of the clients that are Byzantine in the attacked runs (rounded to whole
    /// clients). Trimmed mean's trim fraction and Multi-Krum's f are set to cover it.
    #[arg(long, default_value_t = 0.2)]
    pub byzantine: f64,
    /// Attacks, comma-separated (`all` = every one): sign-flip (−Δ), scale (Δ × --scale),
    /// noise (Gaussian, --noise × the honest norm), nan (NaN/∞ values), replay (the previous
    /// round's signed upload re-sent), impersonate (upload under another client's id).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "all")]
    pub attacks: Vec<AttackKind>,
    /// Aggregation rules, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "fedavg,norm-clip,trimmed-mean,median,multi-krum,fltrust"
    )]
    pub strategies: Vec<StrategyKind>,
    /// `fedavg`: the student alone (the default: a round of 75 clients is ~11 s on 2 cores);
    /// `coevolve`: with the server's teacher, reporting its accuracy too (~100 s a round, plus
    /// the teacher's pretraining in every run).
    #[arg(long, value_enum, default_value_t = RunMode::Fedavg)]
    pub mode: RunMode,
    #[command(flatten)]
    pub local: super::LocalArgs,
    /// Factor of the scaling attack.
    #[arg(long, default_value_t = 10.0)]
    pub scale: f32,
    /// Norm of the noise attack's Gaussian noise, relative to the attacker's honest delta.
    #[arg(long, default_value_t = 1.0)]
    pub noise: f32,
    /// Round deadline of the attacked runs, seconds (0: derived from the clean run).
    #[arg(long, default_value_t = 0)]
    pub round_timeout: u64,
}

/// An attack as named on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum AttackKind {
    All,
    SignFlip,
    Scale,
    Noise,
    Nan,
    Replay,
    Impersonate,
}

impl AttackKind {
    const EVERY: [AttackKind; 6] = [
        AttackKind::SignFlip,
        AttackKind::Scale,
        AttackKind::Noise,
        AttackKind::Nan,
        AttackKind::Replay,
        AttackKind::Impersonate,
    ];

    fn name(self) -> &'static str {
        match self {
            AttackKind::All => "all",
            AttackKind::SignFlip => "sign-flip",
            AttackKind::Scale => "scale",
            AttackKind::Noise => "noise",
            AttackKind::Nan => "nan",
            AttackKind::Replay => "replay",
            AttackKind::Impersonate => "impersonate",
        }
    }
}

/// An aggregation rule as named on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum StrategyKind {
    Fedavg,
    NormClip,
    TrimmedMean,
    Median,
    MultiKrum,
    /// FLTrust: trust by cosine to the coordinator's reference delta (its labelled writers).
    Fltrust,
}

impl StrategyKind {
    fn name(self) -> &'static str {
        match self {
            StrategyKind::Fedavg => "fedavg",
            StrategyKind::NormClip => "norm-clip",
            StrategyKind::TrimmedMean => "trimmed-mean",
            StrategyKind::Median => "median",
            StrategyKind::MultiKrum => "multi-krum",
            StrategyKind::Fltrust => "fltrust",
        }
    }

    /// The rule's configuration for `clients` clients of which `byzantine` attack: trimmed
    /// mean trims at least `byzantine` values at each end (⌊trim · n⌋ with every client in),
    /// Multi-Krum tolerates f = `byzantine`; norm clipping bounds at 1× the median norm.
    fn config(self, clients: usize, byzantine: usize) -> StrategyConfig {
        match self {
            StrategyKind::Fedavg => StrategyConfig::FedAvg,
            StrategyKind::NormClip => StrategyConfig::NormClip { multiplier: 1.0 },
            StrategyKind::TrimmedMean => StrategyConfig::TrimmedMean {
                // The epsilon keeps ⌊trim · n⌋ from rounding down to byzantine − 1.
                trim: (byzantine as f64 / clients.max(1) as f64 + 1e-9).min(0.49),
            },
            StrategyKind::Median => StrategyConfig::Median,
            StrategyKind::MultiKrum => StrategyConfig::MultiKrum {
                byzantine,
                select: None,
            },
            StrategyKind::Fltrust => StrategyConfig::FlTrust,
        }
    }
}

/// One fleet run in `DIR/summary.json`.
#[derive(Clone, Debug, Serialize)]
pub struct RunSummary {
    pub strategy: String,
    /// `clean` or the attack's name.
    pub attack: String,
    pub strategy_config: StrategyConfig,
    /// Student test accuracy after the last round.
    pub student_accuracy: Option<f64>,
    /// Teacher test accuracy after the last round (coevolve mode).
    pub teacher_accuracy: Option<f64>,
    /// `student_accuracy` minus that of this strategy's clean run.
    pub student_delta_vs_clean: Option<f64>,
    pub teacher_delta_vs_clean: Option<f64>,
    /// `student_accuracy` minus that of the clean FedAvg run (no attack, no defence).
    pub student_delta_vs_fedavg_clean: Option<f64>,
    /// Student test accuracy after every round.
    pub student_curve: Vec<Option<f64>>,
    pub rounds_completed: usize,
    pub rounds_skipped: usize,
    /// Rejections over all rounds by reason code (`non-finite`, `wrong-round`, …).
    pub rejected: BTreeMap<String, usize>,
    /// Rejections listed under a Byzantine client's id / an honest one's (an impersonator's
    /// uploads are listed under its victim's id).
    pub rejected_byzantine_ids: usize,
    pub rejected_honest_ids: usize,
    /// Byzantine deltas that passed every check and reached the aggregation rule.
    pub byzantine_accepted: usize,
    /// (honest client, round) pairs whose delta was not accepted (deadline, or interference).
    pub honest_missed: usize,
    /// Accepted deltas the rule left out (Multi-Krum), Byzantine and honest.
    pub excluded_byzantine: usize,
    pub excluded_honest: usize,
    /// Deltas the rule scaled down (norm clipping), Byzantine and honest.
    pub clipped_byzantine: usize,
    pub clipped_honest: usize,
    pub round_timeout_s: u64,
    pub wall_s: f64,
    /// This run's coordinator output (reports under `reports/`).
    pub out: String,
}

/// Per attack: the best robust rule (highest final student accuracy under the attack) next to
/// plain FedAvg.
#[derive(Clone, Debug, Serialize)]
pub struct AttackOutcome {
    pub attack: String,
    pub best_robust_strategy: Option<String>,
    pub best_robust_accuracy: Option<f64>,
    pub best_robust_delta_vs_clean: Option<f64>,
    pub best_robust_delta_vs_fedavg_clean: Option<f64>,
    pub fedavg_accuracy: Option<f64>,
    pub fedavg_delta_vs_clean: Option<f64>,
    /// `best_robust_delta_vs_clean ≥ −0.02`: the attack costs the best rule at most 2 points.
    pub within_2_points: Option<bool>,
    /// `best_robust_delta_vs_fedavg_clean ≥ −0.02`: with the attackers and the best rule, at
    /// most 2 points below a fleet with no attackers and no defence.
    pub within_2_points_of_fedavg_clean: Option<bool>,
}

/// `DIR/summary.json`.
#[derive(Debug, Serialize)]
pub struct Summary {
    pub dataset: String,
    pub split: String,
    pub command: String,
    pub mode: String,
    pub seed: u64,
    pub rounds: u64,
    pub clients: usize,
    pub byzantine_fraction: f64,
    pub byzantine_clients: Vec<String>,
    /// Who each impersonator posed as.
    pub impersonation_victims: BTreeMap<String, String>,
    pub settings: serde_json::Value,
    pub runs: Vec<RunSummary>,
    pub attacks: Vec<AttackOutcome>,
    /// Robust rules within 2 points of their clean run under every attack that was run.
    pub robust_under_every_attack: Vec<String>,
    pub wall_s: f64,
}

/// Who attacks, and how, in an attacked run.
struct Byzantine {
    ids: Vec<String>,
    victims: BTreeMap<String, String>,
}

impl Byzantine {
    /// The first `fraction` of the clients in a seeded shuffle; each impersonator poses as an
    /// honest client of the same shuffle (distinct ones while there are enough).
    fn choose(clients: &[String], fraction: f64, seed: u64) -> Byzantine {
        let mut order = clients.to_vec();
        order.sort();
        // Its own stream: the writer split already drew with `seed` itself.
        order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed ^ 0xB42A));
        let f = ((fraction * clients.len() as f64).round() as usize).min(clients.len());
        let (byz, honest) = order.split_at(f);
        let victims = byz
            .iter()
            .cloned()
            .zip(honest.iter().cycle().cloned())
            .collect();
        let mut ids = byz.to_vec();
        ids.sort();
        Byzantine { ids, victims }
    }

    fn attack_of(&self, client: &str, kind: AttackKind, args: &RobustnessArgs) -> Option<Attack> {
        if !self.ids.iter().any(|b| b == client) {
            return None;
        }
        Some(match kind {
            AttackKind::SignFlip => Attack::SignFlip,
            AttackKind::Scale => Attack::Scale(args.scale),
            AttackKind::Noise => Attack::GaussianNoise {
                relative_std: args.noise,
            },
            AttackKind::Nan => Attack::NonFinite,
            AttackKind::Replay => Attack::StaleReplay,
            AttackKind::Impersonate => Attack::Impersonate {
                victim: self.victims.get(client)?.clone(),
            },
            AttackKind::All => return None,
        })
    }
}

/// The attacks to run, in the order of `--help`, each once.
fn attack_list(asked: &[AttackKind]) -> Vec<AttackKind> {
    let set: BTreeSet<AttackKind> = if asked.contains(&AttackKind::All) {
        AttackKind::EVERY.into_iter().collect()
    } else {
        asked.iter().copied().collect()
    };
    AttackKind::EVERY
        .into_iter()
        .filter(|a| set.contains(a))
        .collect()
}

pub fn run(rt: &tokio::runtime::Runtime, args: &RobustnessArgs) -> Result<()> {
    if args.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    if !(0.0..0.5).contains(&args.byzantine) {
        bail!(
            "--byzantine must be in [0, 0.5) (robust rules assume an honest majority), got {}",
            args.byzantine
        );
    }
    if !(args.scale.is_finite() && args.noise.is_finite() && args.noise >= 0.0) {
        bail!("--scale and --noise must be finite (and --noise ≥ 0)");
    }
    let summary_path = args.out.join("summary.json");
    if summary_path.exists() {
        bail!(
            "{} already holds a bench; choose another --out or delete it",
            args.out.display()
        );
    }
    let mut strategies: Vec<StrategyKind> = Vec::new();
    for k in &args.strategies {
        if !strategies.contains(k) {
            strategies.push(*k);
        }
    }
    let attacks = attack_list(&args.attacks);
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let t_all = Instant::now();
    let split = BenchSplit::load(&args.split)?;
    let ids = ids_of(&split);
    let byz = Byzantine::choose(&ids, args.byzantine, args.split.seed);
    let (n, f) = (ids.len(), byz.ids.len());
    if strategies.contains(&StrategyKind::MultiKrum) && n.saturating_sub(f) < 2 * f + 3 {
        bail!(
            "multi-krum with f = {f} needs at least {} updates even when every Byzantine upload \
             is rejected, and there are {} honest clients: lower --byzantine or add --clients",
            2 * f + 3,
            n - f
        );
    }
    let grid = strategies.len() * (attacks.len() + 1);
    println!(
        "coevo bench robustness: {} — {}; {} Byzantine of {n}; {} strategies × {} runs = {grid} \
         fleet runs of {} rounds ({} mode); output {}",
        args.split.data.display(),
        split.describe(),
        f,
        strategies.len(),
        attacks.len() + 1,
        args.rounds,
        args.mode.name(),
        args.out.display()
    );
    let mut summary = Summary {
        dataset: args.split.data.display().to_string(),
        split: split.describe(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        mode: args.mode.name().into(),
        seed: args.split.seed,
        rounds: args.rounds,
        clients: n,
        byzantine_fraction: args.byzantine,
        byzantine_clients: byz.ids.clone(),
        impersonation_victims: byz.victims.clone(),
        settings: serde_json::json!({
            "server_labelled_writers": args.split.server_labelled,
            "server_unlabelled_writers": args.split.server_unlabelled,
            "local_epochs": args.local.local_epochs,
            "lr": args.local.lr,
            "batch": args.local.batch,
            "scale_factor": args.scale,
            "noise_relative_std": args.noise,
            "round_timeout_s": args.round_timeout,
        }),
        runs: Vec::new(),
        attacks: Vec::new(),
        robust_under_every_attack: Vec::new(),
        wall_s: 0.0,
    };
    let mut done = 0usize;
    for &kind in &strategies {
        let cfg = kind.config(n, f);
        done += 1;
        let clean = fleet_run(
            rt,
            args,
            &split,
            &byz,
            kind,
            &cfg,
            None,
            CLEAN_ROUND_TIMEOUT_S,
        )
        .with_context(|| format!("{} clean run", kind.name()))?;
        let timeout = if args.round_timeout > 0 {
            args.round_timeout
        } else {
            derived_timeout(&args.out.join(kind.name()).join("clean"))?
        };
        summary.runs.push(clean);
        finish(&mut summary, &attacks);
        report_run(&summary, done, grid);
        write_json(&summary_path, &summary)?;
        for &attack in &attacks {
            done += 1;
            let r = fleet_run(rt, args, &split, &byz, kind, &cfg, Some(attack), timeout)
                .with_context(|| format!("{} run under {}", kind.name(), attack.name()))?;
            summary.runs.push(r);
            finish(&mut summary, &attacks);
            report_run(&summary, done, grid);
            write_json(&summary_path, &summary)?;
        }
    }
    summary.wall_s = t_all.elapsed().as_secs_f64();
    finish(&mut summary, &attacks);
    write_json(&summary_path, &summary)?;
    println!("\n{}", render(&summary, &strategies, &attacks));
    println!(
        "{grid} runs in {:.1} min; summary in {}",
        summary.wall_s / 60.0,
        summary_path.display()
    );
    Ok(())
}

/// The attacked runs' deadline: 1.5 × the slowest collection of the clean run + 5 s. Their
/// rejected clients never complete a round early, so every round of such a run lasts this
/// long; honest stragglers cut off would mix a dropout effect into the attack's (the summary
/// counts them as `honest_missed`).
fn derived_timeout(clean_out: &Path) -> Result<u64> {
    let reports = coevo_coordinator::report::load_reports(clean_out)
        .with_context(|| format!("reading the clean run's reports in {}", clean_out.display()))?;
    let slowest_ms = reports
        .iter()
        .map(|r| r.phase_ms.collect)
        .max()
        .unwrap_or(CLEAN_ROUND_TIMEOUT_S * 1000);
    Ok((3 * slowest_ms).div_ceil(2000).max(5) + 5)
}

/// One fleet run of `kind` (clean, or under `attack`), with a progress bar over its rounds.
#[allow(clippy::too_many_arguments)]
fn fleet_run(
    rt: &tokio::runtime::Runtime,
    args: &RobustnessArgs,
    split: &BenchSplit,
    byz: &Byzantine,
    kind: StrategyKind,
    cfg: &StrategyConfig,
    attack: Option<AttackKind>,
    timeout_s: u64,
) -> Result<RunSummary> {
    let attack_name = attack.map_or("clean", AttackKind::name);
    let name = format!("{}/{attack_name}", kind.name());
    let out = args.out.join(kind.name()).join(attack_name);
    let n = split.clients.len();
    let bar = super::round_bar(&name, args.rounds);
    let server = split.server_data();
    let mode = args.mode.mode();
    let (mut accepted, mut rejected) = (0usize, 0usize);
    let t = Instant::now();
    let reports = rt.block_on(run_fleet_with(
        FleetRun {
            fleet: "bench",
            out: &out,
            clients: split.client_data(),
            test: split.test.shallow_clone(),
            seed: args.split.seed,
        },
        |c| {
            super::fleet_config(c, split, mode, args.rounds, timeout_s, &args.local);
            c.aggregation = cfg.clone();
            c.coevolution = CoevolutionConfig::default();
        },
        |c| {
            if mode == Mode::Coevolve || cfg.needs_reference() {
                c.with_server_data(server)
            } else {
                c
            }
        },
        |o| {
            if let Some(kind) = attack {
                o.attack = byz.attack_of(&o.client_id, kind, args);
            }
        },
        &mut |ev: &RoundEvent| match ev {
            RoundEvent::Started { .. } => (accepted, rejected) = (0, 0),
            RoundEvent::Accepted { .. } => {
                accepted += 1;
                bar.set_message(format!("{accepted}/{n} accepted, {rejected} rejected"));
            }
            RoundEvent::Rejected { .. } => {
                rejected += 1;
                bar.set_message(format!("{accepted}/{n} accepted, {rejected} rejected"));
            }
            RoundEvent::Finished(r) => {
                bar.suspend(|| println!("[{name}] {}", round_line(r, args.rounds)));
                bar.set_position(r.round);
            }
        },
    ))?;
    bar.finish_and_clear();
    Ok(run_summary(
        &reports,
        kind,
        cfg,
        attack_name,
        byz,
        &ids_of(split),
        args.rounds,
        timeout_s,
        t.elapsed().as_secs_f64(),
        &out,
    ))
}

fn ids_of(split: &BenchSplit) -> Vec<String> {
    split.clients.iter().map(|(id, _)| id.clone()).collect()
}

/// Accuracy change in points (1 point = 0.01), signed.
fn points(x: Option<f64>) -> String {
    x.map_or_else(|| "-".to_string(), |v| format!("{:+.1}", v * 100.0))
}

fn round_line(r: &RoundReport, rounds: u64) -> String {
    format!(
        "round {:>3}/{rounds}  {}  student {}  teacher {}  accepted {}/{}  rejected {}  \
         excluded {}  clipped {}  {:.1}s",
        r.round,
        r.outcome,
        acc(r.student.test_accuracy),
        acc(r.teacher.test_accuracy),
        r.accepted,
        r.registered,
        r.rejected.len(),
        r.excluded.len(),
        r.clipped.len(),
        r.duration_ms as f64 / 1000.0
    )
}

/// Prints the line of the run just added (after [`finish`], so its change from clean is in).
fn report_run(s: &Summary, done: usize, grid: usize) {
    if let Some(r) = s.runs.last() {
        println!("[{done}/{grid}] {}", run_line(r));
    }
}

fn run_line(r: &RunSummary) -> String {
    let rejected: Vec<String> = r.rejected.iter().map(|(k, v)| format!("{k} {v}")).collect();
    format!(
        "{}/{}: student {} ({} vs clean)  teacher {}  rejected [{}]  byzantine accepted {}  \
         excluded {}+{} (byz+honest)  clipped {}+{}  honest missed {}  {:.0} s",
        r.strategy,
        r.attack,
        acc(r.student_accuracy),
        points(r.student_delta_vs_clean),
        acc(r.teacher_accuracy),
        rejected.join(", "),
        r.byzantine_accepted,
        r.excluded_byzantine,
        r.excluded_honest,
        r.clipped_byzantine,
        r.clipped_honest,
        r.honest_missed,
        r.wall_s
    )
}

/// The stable code of a report's rejection text (`non-finite`, `wrong-round: …` → `wrong-round`).
fn reason_code(reason: &str) -> String {
    reason
        .split(':')
        .next()
        .unwrap_or(reason)
        .trim()
        .to_string()
}

/// What one run's reports say, before the comparison with the clean runs ([`finish`]).
#[allow(clippy::too_many_arguments)]
fn run_summary(
    reports: &[RoundReport],
    kind: StrategyKind,
    cfg: &StrategyConfig,
    attack: &str,
    byz: &Byzantine,
    clients: &[String],
    rounds: u64,
    timeout_s: u64,
    wall_s: f64,
    out: &Path,
) -> RunSummary {
    let is_byz = |c: &str| byz.ids.iter().any(|b| b == c) && attack != "clean";
    let honest = clients.iter().filter(|c| !is_byz(c)).count();
    let last = reports
        .iter()
        .rev()
        .find(|r| r.round == rounds)
        .or(reports.last());
    let mut s = RunSummary {
        strategy: kind.name().into(),
        attack: attack.into(),
        strategy_config: cfg.clone(),
        student_accuracy: last.and_then(|r| r.student.test_accuracy),
        teacher_accuracy: last.and_then(|r| r.teacher.test_accuracy),
        student_delta_vs_clean: None,
        teacher_delta_vs_clean: None,
        student_delta_vs_fedavg_clean: None,
        student_curve: reports.iter().map(|r| r.student.test_accuracy).collect(),
        rounds_completed: reports.iter().filter(|r| r.outcome == "completed").count(),
        rounds_skipped: reports.iter().filter(|r| r.outcome != "completed").count(),
        rejected: BTreeMap::new(),
        rejected_byzantine_ids: 0,
        rejected_honest_ids: 0,
        byzantine_accepted: 0,
        honest_missed: 0,
        excluded_byzantine: 0,
        excluded_honest: 0,
        clipped_byzantine: 0,
        clipped_honest: 0,
        round_timeout_s: timeout_s,
        wall_s,
        out: out.display().to_string(),
    };
    for r in reports {
        for x in &r.rejected {
            *s.rejected.entry(reason_code(&x.reason)).or_default() += 1;
            if is_byz(&x.client) {
                s.rejected_byzantine_ids += 1;
            } else {
                s.rejected_honest_ids += 1;
            }
        }
        let accepted_honest = r.clients.iter().filter(|c| !is_byz(&c.client)).count();
        s.byzantine_accepted += r.clients.len() - accepted_honest;
        s.honest_missed += honest.saturating_sub(accepted_honest);
        for x in &r.excluded {
            if is_byz(&x.client) {
                s.excluded_byzantine += 1;
            } else {
                s.excluded_honest += 1;
            }
        }
        for c in &r.clipped {
            if is_byz(c) {
                s.clipped_byzantine += 1;
            } else {
                s.clipped_honest += 1;
            }
        }
    }
    s
}

/// Fills in every run's change from its clean run and the per-attack comparison.
fn finish(s: &mut Summary, attacks: &[AttackKind]) {
    let find = |runs: &[RunSummary], strategy: &str, attack: &str| {
        runs.iter()
            .find(|r| r.strategy == strategy && r.attack == attack)
            .cloned()
    };
    let fedavg_clean = find(&s.runs, "fedavg", "clean").and_then(|r| r.student_accuracy);
    let diff = |a: Option<f64>, b: Option<f64>| Some(a? - b?);
    let snapshot = s.runs.clone();
    for r in s.runs.iter_mut() {
        let clean = find(&snapshot, &r.strategy, "clean");
        r.student_delta_vs_clean = diff(
            r.student_accuracy,
            clean.as_ref().and_then(|c| c.student_accuracy),
        );
        r.teacher_delta_vs_clean = diff(
            r.teacher_accuracy,
            clean.as_ref().and_then(|c| c.teacher_accuracy),
        );
        r.student_delta_vs_fedavg_clean = diff(r.student_accuracy, fedavg_clean);
    }
    s.attacks = attacks
        .iter()
        .map(|a| {
            let under: Vec<&RunSummary> = s.runs.iter().filter(|r| r.attack == a.name()).collect();
            let best = under
                .iter()
                .filter(|r| r.strategy != "fedavg")
                .filter_map(|r| Some((r.student_accuracy?, *r)))
                .max_by(|x, y| x.0.total_cmp(&y.0))
                .map(|(_, r)| r);
            let fedavg = under.iter().find(|r| r.strategy == "fedavg");
            AttackOutcome {
                attack: a.name().into(),
                best_robust_strategy: best.map(|r| r.strategy.clone()),
                best_robust_accuracy: best.and_then(|r| r.student_accuracy),
                best_robust_delta_vs_clean: best.and_then(|r| r.student_delta_vs_clean),
                best_robust_delta_vs_fedavg_clean: best
                    .and_then(|r| r.student_delta_vs_fedavg_clean),
                fedavg_accuracy: fedavg.and_then(|r| r.student_accuracy),
                fedavg_delta_vs_clean: fedavg.and_then(|r| r.student_delta_vs_clean),
                within_2_points: best
                    .and_then(|r| r.student_delta_vs_clean)
                    .map(|d| d >= -GOAL_POINTS),
                within_2_points_of_fedavg_clean: best
                    .and_then(|r| r.student_delta_vs_fedavg_clean)
                    .map(|d| d >= -GOAL_POINTS),
            }
        })
        .collect();
    let robust: BTreeSet<&str> = s
        .runs
        .iter()
        .filter(|r| r.strategy != "fedavg")
        .map(|r| r.strategy.as_str())
        .collect();
    s.robust_under_every_attack = robust
        .into_iter()
        .filter(|strategy| {
            attacks.iter().all(|a| {
                s.runs.iter().any(|r| {
                    r.strategy == *strategy
                        && r.attack == a.name()
                        && r.student_delta_vs_clean.is_some_and(|d| d >= -GOAL_POINTS)
                })
            })
        })
        .map(str::to_string)
        .collect();
}

/// The final tables (Markdown, ready for BENCHMARKS.md): accuracy and change from clean per
/// strategy × attack, the best robust rule per attack next to FedAvg, and what each run
/// rejected, excluded or clipped.
pub fn render(s: &Summary, strategies: &[StrategyKind], attacks: &[AttackKind]) -> String {
    let mut t = String::new();
    let cell = |strategy: &str, attack: &str| {
        s.runs
            .iter()
            .find(|r| r.strategy == strategy && r.attack == attack)
    };
    // One strategy × attack table of a model's final accuracy (Δ vs the rule's clean run).
    let model_table = |t: &mut String,
                       accuracy: fn(&RunSummary) -> Option<f64>,
                       delta: fn(&RunSummary) -> Option<f64>| {
        let _ = write!(t, "| strategy | clean |");
        for a in attacks {
            let _ = write!(t, " {} |", a.name());
        }
        let _ = write!(t, "\n|---|---:|");
        for _ in attacks {
            let _ = write!(t, "---:|");
        }
        t.push('\n');
        for k in strategies {
            let clean = cell(k.name(), "clean").and_then(accuracy);
            let _ = write!(t, "| {} | {} |", k.name(), acc(clean));
            for a in attacks {
                let r = cell(k.name(), a.name());
                let _ = write!(
                    t,
                    " {} ({}) |",
                    acc(r.and_then(accuracy)),
                    points(r.and_then(delta))
                );
            }
            t.push('\n');
        }
    };
    model_table(&mut t, |r| r.student_accuracy, |r| r.student_delta_vs_clean);
    if s.mode == "coevolve" {
        let _ = write!(t, "\nteacher:\n\n");
        model_table(&mut t, |r| r.teacher_accuracy, |r| r.teacher_delta_vs_clean);
    }
    let _ = writeln!(
        t,
        "\n| attack | best robust rule | accuracy | Δ vs its clean | Δ vs clean FedAvg | \
         within 2 points (its clean / clean FedAvg) | FedAvg | FedAvg Δ vs clean |\n\
         |---|---|---:|---:|---:|---|---:|---:|"
    );
    let yes = |x: Option<bool>| x.map_or("-", |ok| if ok { "yes" } else { "**no**" });
    for o in &s.attacks {
        let _ = writeln!(
            t,
            "| {} | {} | {} | {} | {} | {} / {} | {} | {} |",
            o.attack,
            o.best_robust_strategy.as_deref().unwrap_or("-"),
            acc(o.best_robust_accuracy),
            points(o.best_robust_delta_vs_clean),
            points(o.best_robust_delta_vs_fedavg_clean),
            yes(o.within_2_points),
            yes(o.within_2_points_of_fedavg_clean),
            acc(o.fedavg_accuracy),
            points(o.fedavg_delta_vs_clean),
        );
    }
    let _ = writeln!(
        t,
        "\n| strategy | attack | rejected (reason × count) | Byzantine deltas accepted | \
         excluded byz/honest | clipped byz/honest | honest missed | deadline | time |\n\
         |---|---|---|---:|---:|---:|---:|---:|---:|"
    );
    for r in &s.runs {
        let rejected: Vec<String> = r
            .rejected
            .iter()
            .map(|(k, v)| format!("{k} × {v}"))
            .collect();
        let _ = writeln!(
            t,
            "| {} | {} | {} | {} | {}/{} | {}/{} | {} | {} s | {:.0} s |",
            r.strategy,
            r.attack,
            if rejected.is_empty() {
                "-".to_string()
            } else {
                rejected.join(", ")
            },
            r.byzantine_accepted,
            r.excluded_byzantine,
            r.excluded_honest,
            r.clipped_byzantine,
            r.clipped_honest,
            r.honest_missed,
            r.round_timeout_s,
            r.wall_s
        );
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("w{i:03}")).collect()
    }

    #[test]
    fn byzantine_choice_is_seeded_and_sized() {
        let a = Byzantine::choose(&ids(75), 0.2, 1);
        assert_eq!(a.ids.len(), 15);
        assert_eq!(a.ids, Byzantine::choose(&ids(75), 0.2, 1).ids);
        assert_ne!(a.ids, Byzantine::choose(&ids(75), 0.2, 2).ids);
        // Every impersonator poses as a distinct honest client.
        let victims: BTreeSet<&String> = a.victims.values().collect();
        assert_eq!(victims.len(), 15);
        assert!(victims.iter().all(|v| !a.ids.contains(v)));
        assert!(Byzantine::choose(&ids(75), 0.0, 1).ids.is_empty());
    }

    #[test]
    fn rules_cover_the_byzantine_share() {
        match StrategyKind::TrimmedMean.config(75, 15) {
            StrategyConfig::TrimmedMean { trim } => {
                assert_eq!((trim * 75.0).floor() as usize, 15)
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            StrategyKind::MultiKrum.config(75, 15),
            StrategyConfig::MultiKrum {
                byzantine: 15,
                select: None
            }
        );
        for k in [
            StrategyKind::Fedavg,
            StrategyKind::NormClip,
            StrategyKind::TrimmedMean,
            StrategyKind::Median,
            StrategyKind::MultiKrum,
        ] {
            assert!(k.config(75, 15).validate().is_ok(), "{}", k.name());
        }
    }

    #[test]
    fn all_means_every_attack_once_in_order() {
        assert_eq!(attack_list(&[AttackKind::All]), AttackKind::EVERY.to_vec());
        assert_eq!(
            attack_list(&[AttackKind::Nan, AttackKind::SignFlip, AttackKind::Nan]),
            vec![AttackKind::SignFlip, AttackKind::Nan]
        );
    }

    #[test]
    fn reason_codes_drop_the_detail() {
        assert_eq!(
            reason_code("wrong-round: delta for round 1, current round 2"),
            "wrong-round"
        );
        assert_eq!(reason_code("non-finite"), "non-finite");
    }
}
