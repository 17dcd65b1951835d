//! `coevo-edge`: the lean device binary (the same agent as `coevo edge`).

use clap::Parser;

#[derive(Parser)]
#[command(
    version,
    about = "coevo edge agent: fine-tunes the fleet's student on local data and uploads signed deltas"
)]
struct Cli {
    #[command(flatten)]
    edge: coevo_edge::cli::EdgeArgs,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,rumqttc=warn".into()),
        )
        .init();
    let cli = Cli::parse();
    coevo_edge::cli::tune_allocator();
    // The runtime's size comes from the config, so read it before starting the runtime.
    let cfg = coevo_edge::EdgeConfig::load(&cli.edge.config)?;
    let workers = cfg.threads.runtime();
    tracing::info!(
        runtime_threads = workers,
        train_threads = cfg.threads.train(),
        "edge threads"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()?;
    rt.block_on(coevo_edge::cli::run(&cli.edge))?;
    Ok(())
}
