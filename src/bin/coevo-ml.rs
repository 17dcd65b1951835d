//! `coevo-ml`: the full `coevo` command line, including the commands that need libtorch
//! (coordinator, edge, demo, bench, models). The lean `coevo` binary (src/main.rs) runs
//! `keys`, `fleet`, `broker`, `status` and `report` itself and `exec`s this binary, installed
//! beside it, for everything else, so `coevo --help` and `coevo demo` end up here with the same
//! argv. The lean commands are [`coevo_cli::LeanCommand`], flattened in: one definition.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use coevo::provision::read_key;
use coevo_coordinator::{Coordinator, CoordinatorConfig, RoundEvent};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "coevo",
    version,
    about = "Federated co-evolution of a teacher and edge students over MQTT",
    long_about = "coevo runs federated rounds over MQTT: the coordinator publishes a signed \
                  student model, edge clients fine-tune it on local data and upload signed \
                  deltas, the coordinator verifies, merges and reports.\n\n\
                  Quick start: `coevo demo` runs a broker, a coordinator and 10 edge clients \
                  on this machine."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The commands that need no libtorch (broker, keys, fleet, report, status): shared with
    /// the lean `coevo` binary, which runs them itself.
    #[command(flatten)]
    Lean(coevo_cli::LeanCommand),
    #[command(flatten)]
    Ml(MlCommand),
}

/// The commands that need libtorch (or a whole fleet in one process).
#[derive(Subcommand)]
enum MlCommand {
    /// Run the coordinator: rounds of publish, collect, verify, aggregate, report.
    Coordinator {
        /// Coordinator config (see coordinator/coordinator.sample.toml).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run an edge agent on this device.
    Edge(coevo_edge::cli::EdgeArgs),
    /// Run broker, coordinator and N edge clients on this machine (real MQTT over 127.0.0.1).
    Demo(coevo::demo::DemoOptions),
    /// Measure the product's claims through the real broker and edge agents (writes
    /// DIR/summary.json and per-round curves).
    #[command(subcommand)]
    Bench(coevo::bench::BenchCmd),
    /// Print the student's and teacher's size and cost for a dataset's shape; with
    /// --student/--teacher, check TorchScript files against it and train each one step.
    Models {
        /// Dataset directory (IDX or image folder).
        #[arg(long, default_value = "/usr/share/datasets/fashion-mnist")]
        data: PathBuf,
        /// TorchScript student (scripts/export-model.py) instead of the built-in one.
        #[arg(long)]
        student: Option<PathBuf>,
        /// TorchScript teacher instead of the built-in one.
        #[arg(long)]
        teacher: Option<PathBuf>,
    },
}

fn init_tracing(default: &str) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default.into());
    tracing_subscriber::fmt().with_env_filter(filter).init();
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let command = match cli.command {
        Command::Lean(cmd) => return cmd.run(),
        Command::Ml(cmd) => cmd,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    match command {
        MlCommand::Coordinator { config } => {
            init_tracing("info,rumqttc=warn");
            let cfg = CoordinatorConfig::load(&config)?;
            let key = read_key(&cfg.key)?;
            let split = coevo_models::data::load_dir(&cfg.data.path)
                .with_context(|| format!("loading {}", cfg.data.path.display()))?;
            let mut test = split.test;
            if cfg.data.test_limit > 0 && cfg.data.test_limit < test.len() {
                let idx: Vec<usize> = (0..cfg.data.test_limit).collect();
                test = test.subset(&idx);
            }
            let out = cfg.out.clone();
            let server = if cfg.mode == coevo_coordinator::coevolve::Mode::Coevolve
                || cfg.aggregation.needs_reference()
            {
                let (server, _) = coevo_coordinator::coevolve::split_server_data(
                    &split.train,
                    &cfg.server_data,
                    cfg.seed,
                )?;
                Some(server)
            } else {
                None
            };
            let mut coordinator = Coordinator::new(cfg, key, test)?;
            if let Some(server) = server {
                coordinator = coordinator.with_server_data(server);
            }
            let reports = rt.block_on(coordinator.run(async {
                let _ = tokio::signal::ctrl_c().await;
            }))?;
            print!("{}", coevo::table::render(&reports));
            println!("reports in {}", out.join("reports").display());
            Ok(())
        }
        MlCommand::Edge(args) => {
            init_tracing("info,rumqttc=warn");
            rt.block_on(coevo_edge::cli::run(&args))?;
            Ok(())
        }
        MlCommand::Models {
            data,
            student,
            teacher,
        } if student.is_some() || teacher.is_some() => {
            coevo::byom::models_command(&data, student.as_deref(), teacher.as_deref())
        }
        MlCommand::Models { data, .. } => models(&data),
        MlCommand::Bench(cmd) => {
            init_tracing("warn,rumqttd=off");
            cmd.run(&rt)
        }
        MlCommand::Demo(opts) => {
            init_tracing("warn,rumqttd=off");
            demo(&rt, &opts)
        }
    }
}

fn models(data: &std::path::Path) -> Result<()> {
    use coevo_models::net::{flops_per_image, param_count};
    use coevo_models::{NetKind, Student, Teacher};
    let split = coevo_models::data::load_dir(data)
        .with_context(|| format!("loading {}", data.display()))?;
    let shape = split.train.shape;
    let count = |kind: NetKind| {
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        match kind {
            NetKind::Student => drop(Student::new(&vs.root(), &shape)),
            NetKind::Teacher => drop(Teacher::new(&vs.root(), &shape)),
        }
        (param_count(&vs), flops_per_image(kind, &shape))
    };
    let (sp, sf) = count(NetKind::Student);
    let (tp, tf) = count(NetKind::Teacher);
    println!(
        "data {}: {}x{}x{} images, {} classes",
        data.display(),
        shape.channels,
        shape.height,
        shape.width,
        shape.classes
    );
    println!(
        "{:<8} {:>12} {:>16}",
        "model", "parameters", "MACs per image"
    );
    println!("{:<8} {:>12} {:>16}", "student", sp, sf);
    println!("{:<8} {:>12} {:>16}", "teacher", tp, tf);
    println!(
        "teacher/student: {:.1}x parameters, {:.1}x MACs",
        tp as f64 / sp.max(1) as f64,
        tf as f64 / sf.max(1) as f64
    );
    Ok(())
}

/// Prints above the progress bar, or plainly when there is no terminal (the bar is hidden then,
/// and so would be its `println`).
fn say(bar: &ProgressBar, line: String) {
    if bar.is_hidden() {
        println!("{line}");
    } else {
        bar.println(line);
    }
}

fn demo(rt: &tokio::runtime::Runtime, opts: &coevo::demo::DemoOptions) -> Result<()> {
    let out = opts.out_dir();
    println!(
        "coevo demo: {} clients, {} rounds, split {}, data {}, output {}",
        opts.clients,
        opts.rounds,
        opts.split,
        opts.data.display(),
        out.display()
    );
    println!(
        "live view from another terminal: coevo status {}{}",
        out.display(),
        opts.metrics
            .map(|m| format!("; Prometheus metrics on http://{m}/metrics"))
            .unwrap_or_default()
    );
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("  round {msg} [{bar:30}] {pos}/{len} deltas  {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let rounds = opts.rounds;
    let reports = rt.block_on(coevo::demo::run(opts, &out, |ev| match ev {
        RoundEvent::Started {
            round, registered, ..
        } => {
            bar.reset();
            bar.set_length(*registered as u64);
            bar.set_position(0);
            bar.set_message(format!("{round}/{rounds}"));
        }
        RoundEvent::Accepted { accepted, .. } => bar.set_position(*accepted as u64),
        RoundEvent::Rejected { client, reason, .. } => {
            say(&bar, format!("  rejected {client}: {reason}"))
        }
        RoundEvent::Finished(r) => {
            say(&bar, format!(
                "round {:>3}/{rounds}  accepted {:>3}/{:<3} rejected {:>2}  student acc {:.4}  teacher acc {}  up {:>8} B  down {:>8} B  {:.1}s",
                r.round,
                r.accepted,
                r.registered,
                r.rejected.len(),
                r.student.test_accuracy.unwrap_or(f64::NAN),
                coevo::table::acc(r.teacher.test_accuracy),
                r.bytes_up,
                r.bytes_down,
                r.duration_ms as f64 / 1000.0
            ));
        }
    }))?;
    bar.finish_and_clear();
    if let Some(last) = reports.last() {
        println!(
            "done: round {} student test accuracy {:.4}; reports in {}",
            last.round,
            last.student.test_accuracy.unwrap_or(f64::NAN),
            out.join("reports").display()
        );
    }
    Ok(())
}
