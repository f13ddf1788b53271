//! `kiln-billing` binary: rating, credit limits, promotional expiry and month close.

use anyhow::Context;
use clap::Parser;
use kiln_billing::{Billing, BillingConfig};

#[derive(Parser)]
#[command(
    name = "kiln-billing",
    about = "Kiln's billing service: usage into ledger charges, credit limits enforced, invoices closed"
)]
struct Cli {
    #[command(flatten)]
    config: BillingConfig,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Held to the end of main: dropping it flushes the last spans.
    let _telemetry = kiln_telemetry::init_tracing("kiln-billing");
    let config = Cli::parse().config;
    anyhow::ensure!(
        config.rating_tick_ms > 0,
        "KILN_RATING_TICK_MS must be greater than zero"
    );
    let store = kiln_store::Store::connect(&config.database_url, config.db_max_connections)
        .await
        .context("connecting to PostgreSQL")?;
    store.migrate().await.context("applying migrations")?;
    let ops_listener = tokio::net::TcpListener::bind(config.ops_listen)
        .await
        .with_context(|| format!("binding {}", config.ops_listen))?;
    tracing::info!(
        ops = %ops_listener.local_addr()?,
        tick_ms = config.rating_tick_ms,
        "kiln-billing running"
    );
    let pool = store.pool().clone();
    let grace = config.shutdown_grace();
    let (signal, deadline) = kiln_telemetry::shutdown_with_deadline(grace);
    let billing = Billing {
        store,
        config,
        ops_listener,
    };
    tokio::select! {
        ran = billing.run(signal) => ran?,
        () = deadline => {
            // Transactions not yet committed roll back whole; the next tick redoes them.
            tracing::warn!(?grace, "billing tick still under way after the shutdown grace period; exiting");
        }
    }
    pool.close().await;
    tracing::info!("kiln-billing stopped");
    Ok(())
}
