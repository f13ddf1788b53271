//! `kiln-gateway` binary.

use anyhow::Context;
use axum::serve::ListenerExt;
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
    // Held to the end of main: dropping it flushes the last spans.
    let _telemetry = kiln_telemetry::init_tracing("kiln-gateway");
    let config = Cli::parse().config;
    let store = kiln_store::Store::connect(&config.database_url, config.db_max_connections)
        .await
        .context("connecting to PostgreSQL")?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    tracing::info!(addr = %listener.local_addr()?, "kiln-gateway listening");
    let meter = kiln_gateway::metering::Meter::connect(&config.redis_url, &config.redis_namespace)
        .await
        .context("connecting to Redis (REDIS_URL)")?;
    let idle = config.usage_claim_idle_secs;
    anyhow::ensure!(
        idle.is_finite() && (0.1..=3600.0).contains(&idle),
        "--usage-claim-idle-secs must be between 0.1 and 3600"
    );
    let ingester = kiln_gateway::metering::Ingester::new(
        store.clone(),
        &config.redis_url,
        &config.redis_namespace,
    )?
    .with_claim_idle(std::time::Duration::from_secs_f64(idle));
    tokio::spawn(ingester.run());
    let admission =
        kiln_ratelimit::admission::Admission::connect(&config.redis_url, &config.redis_namespace)
            .await
            .context("connecting to Redis for rate limits (REDIS_URL)")?;
    // Answers are streamed in several writes (headers, then chunks): without TCP_NODELAY, Nagle
    // holds each small write until the caller's delayed ACK (~40 ms on Linux).
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
    });
    let grace = std::time::Duration::from_secs(config.shutdown_grace_secs);
    let (signal, deadline) = kiln_telemetry::shutdown_with_deadline(grace);
    let serving = axum::serve(
        listener,
        kiln_gateway::app(
            GatewayState::new(store)
                .with_meter(meter)
                .with_admission(admission)
                .with_cold_start_timeout(std::time::Duration::from_secs(
                    config.cold_start_timeout_secs.clamp(1, 3600),
                )),
        ),
    )
    .with_graceful_shutdown(signal);
    tokio::select! {
        served = serving => served?,
        () = deadline => {
            tracing::warn!(?grace, "calls still open after the shutdown grace period; exiting");
        }
    }
    Ok(())
}
