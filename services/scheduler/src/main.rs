//! `kiln-scheduler` binary: node control for agents, and the node lifecycle controller.

use anyhow::Context;
use clap::Parser;
use kiln_scheduler::{Scheduler, SchedulerConfig};

#[derive(Parser)]
#[command(
    name = "kiln-scheduler",
    about = "Kiln's scheduler: where node agents dial in, and what watches the fleet"
)]
struct Cli {
    #[command(flatten)]
    config: SchedulerConfig,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Held to the end of main: dropping it flushes the last spans.
    let _telemetry = kiln_telemetry::init_tracing("kiln-scheduler");
    let mut config = Cli::parse().config;
    config.validate()?;
    config.liveness_database_url = Some(config.database_url.clone());
    let store = kiln_store::Store::connect(&config.database_url, config.db_max_connections)
        .await
        .context("connecting to PostgreSQL")?;
    store.migrate().await.context("applying migrations")?;
    let fleet_listener = tokio::net::TcpListener::bind(config.fleet_listen)
        .await
        .with_context(|| format!("binding {}", config.fleet_listen))?;
    let ops_listener = tokio::net::TcpListener::bind(config.ops_listen)
        .await
        .with_context(|| format!("binding {}", config.ops_listen))?;
    tracing::info!(
        fleet = %fleet_listener.local_addr()?,
        ops = %ops_listener.local_addr()?,
        "kiln-scheduler listening"
    );
    let pool = store.pool().clone();
    let grace = config.shutdown_grace();
    let (signal, deadline) = kiln_telemetry::shutdown_with_deadline(grace);
    let scheduler = Scheduler {
        store,
        config,
        fleet_listener,
        ops_listener,
    };
    tokio::select! {
        ran = scheduler.run(signal) => ran?,
        () = deadline => {
            tracing::warn!(?grace, "work still under way after the shutdown grace period; exiting");
        }
    }
    // Session locks and LISTENs go with their connections: close them now, not whenever the
    // process's sockets are torn down.
    pool.close().await;
    tracing::info!("kiln-scheduler stopped");
    Ok(())
}
