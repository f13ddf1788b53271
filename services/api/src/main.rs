//! `kiln-api` binary: `serve` (default) or `migrate`.

use anyhow::Context;
use clap::{Parser, Subcommand};
use kiln_api::ApiConfig;

#[derive(Parser)]
#[command(
    name = "kiln-api",
    about = "Kiln's public API: REST, GraphQL and the web console"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    config: ApiConfig,
}

#[derive(Subcommand)]
enum Command {
    /// Apply database migrations and serve (the default).
    Serve,
    /// Apply database migrations and exit.
    Migrate,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Held to the end of main: dropping it flushes the last spans.
    let _telemetry = kiln_telemetry::init_tracing("kiln-api");
    let cli = Cli::parse();
    let config = cli.config;
    let store = kiln_store::Store::connect(&config.database_url, 2)
        .await
        .context("connecting to PostgreSQL")?;
    store.migrate().await.context("applying migrations")?;
    if matches!(cli.command, Some(Command::Migrate)) {
        tracing::info!("migrations applied");
        return Ok(());
    }
    let listen = config.listen;
    let admin = (config.admin_email.clone(), config.admin_password.clone());
    let state = kiln_api::connect(config)
        .await
        .context("connecting to PostgreSQL and Redis")?;
    if let (Some(email), Some(password)) = admin {
        let email = kiln_domain::Email::parse("KILN_ADMIN_EMAIL", &email)?;
        let password = kiln_domain::Password::new_for("KILN_ADMIN_PASSWORD", &password, &email)?;
        let hash = state.hasher.hash(password.expose())?;
        state
            .store
            .user_ensure_operator(&email, &hash)
            .await
            .context("creating the operator account")?;
        tracing::info!(%email, "operator account ready");
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    tracing::info!(addr = %listener.local_addr()?, "kiln-api listening");
    let grace = std::time::Duration::from_secs(state.config.shutdown_grace_secs);
    let (signal, deadline) = kiln_telemetry::shutdown_with_deadline(grace);
    tokio::select! {
        served = kiln_api::serve(listener, state, signal) => served?,
        () = deadline => {
            tracing::warn!(?grace, "requests still open after the shutdown grace period; exiting");
        }
    }
    Ok(())
}
