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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,rumqttc=warn".into()),
        )
        .init();
    let cli = Cli::parse();
    coevo_edge::cli::run(&cli.edge).await?;
    Ok(())
}
