//! `coevo report DIR`: the round reports of a run (or of a `coevo bench coevolution`
//! directory) as a table with its alerts, as JSON lines, as an offline HTML page
//! (`--html FILE`) or as one CSV row per client per round (`--csv FILE`).

use anyhow::{bail, Context, Result};
use coevo_ops::alerts::AlertConfig;
use coevo_ops::html::{History, Run};
use std::path::PathBuf;

/// `coevo report` flags.
#[derive(Clone, Debug, clap::Args)]
pub struct ReportArgs {
    /// A coordinator output directory (or its reports/ folder), or a `coevo bench coevolution`
    /// output (its coevolve/ run, with the fedavg/ student as baseline).
    pub dir: PathBuf,
    /// Print the reports as JSON lines instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Write a self-contained offline HTML report (charts, per-class heatmap, alerts, client
    /// contributions) to FILE.
    #[arg(long, value_name = "FILE")]
    pub html: Option<PathBuf>,
    /// Write one CSV row per client per round to FILE (`-` for standard output).
    #[arg(long, value_name = "FILE")]
    pub csv: Option<PathBuf>,
    /// Alert when a client has messages rejected in this many consecutive rounds.
    #[arg(long, default_value_t = AlertConfig::default().rejected_rounds)]
    pub rejected_rounds: u32,
    /// Alert when test accuracy falls this far (absolute) below the model's best so far.
    #[arg(long, default_value_t = AlertConfig::default().collapse_drop)]
    pub collapse_drop: f64,
}

pub fn run(args: &ReportArgs) -> Result<()> {
    let run = Run::load(&args.dir)?;
    if run.reports.is_empty() {
        bail!("no round-NNNN.json reports under {}", args.dir.display());
    }
    let cfg = AlertConfig {
        rejected_rounds: args.rejected_rounds,
        collapse_drop: args.collapse_drop,
        ..AlertConfig::default()
    };
    cfg.validate()?;
    let to_stdout = args.csv.as_deref() == Some(std::path::Path::new("-"));
    if let Some(path) = &args.csv {
        if to_stdout {
            coevo_ops::export::write_csv(&run.reports, std::io::stdout().lock())?;
        } else {
            let f = std::fs::File::create(path)
                .with_context(|| format!("creating {}", path.display()))?;
            let rows = coevo_ops::export::write_csv(&run.reports, std::io::BufWriter::new(f))
                .with_context(|| format!("writing {}", path.display()))?;
            eprintln!("{rows} rows in {}", path.display());
        }
    }
    let history = History::from_run(&run, cfg);
    if let Some(path) = &args.html {
        let html = coevo_ops::html::render(&history);
        coevo_ops::html::write(path, &html)?;
        eprintln!(
            "{} rounds, {} alerts: {} ({})",
            history.rounds(),
            history.alerts().len(),
            path.display(),
            crate::table::bytes(html.len() as u64)
        );
    }
    if args.json {
        for r in &run.reports {
            println!("{}", serde_json::to_string(r)?);
        }
    } else if args.html.is_none() && args.csv.is_none() {
        print!("{}", crate::table::render(&run.reports));
        print!("{}", crate::table::render_alerts(history.alerts()));
    }
    Ok(())
}
