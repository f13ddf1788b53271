//! `kiln-gateway` binary.

use anyhow::Context;
use clap::Parser;
use kiln_gateway::{GatewayConfig, GatewayState};

#[derive(Parser)]
#[command(name = "kiln-gateway", about = "Kiln's metered inference gateway")]
struct Cli {
    #[command(flatten)]
    config: GatewayConfig,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    kiln_telemetry::init_tracing("kiln-gateway");
    let config = Cli::parse().config;
    let store = kiln_store::Store::connect(&config.database_url, config.db_max_connections)
        .await
        .context("connecting to PostgreSQL")?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    tracing::info!(addr = %listener.local_addr()?, "kiln-gateway listening");
    axum::serve(listener, kiln_gateway::app(GatewayState::new(store)))
        .with_graceful_shutdown(kiln_telemetry::shutdown_signal())
        .await?;
    Ok(())
}
