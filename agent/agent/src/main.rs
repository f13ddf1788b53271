//! `kiln-agent`: see the library's documentation for what it does.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use kiln_agent::config::{Config, Overrides};
use kiln_agent::{EXIT_FAILURE, EXIT_REFUSED, EXIT_REVOKED, EXIT_STOPPED, Outcome, Shutdown};
use kiln_inventory::NvmlPolicy;

/// The Kiln node agent: joins the fleet, reports this host's GPUs, and applies the work the
/// control plane assigns to it. It only dials out; it listens on no port.
///
/// Exit codes: 0 stopped by SIGTERM/SIGINT, 2 refused to start (the message says why),
/// 3 the control plane rejected the node credential (join again with a new bootstrap token),
/// 1 anything else.
#[derive(Debug, Parser)]
#[command(name = "kiln-agent", version)]
struct Cli {
    /// The TOML config file (optional: without one, the defaults and the flags below).
    #[arg(long, env = "KILN_AGENT_CONFIG")]
    config: Option<PathBuf>,
    /// The control plane's NodeControl address, e.g. http://127.0.0.1:7070.
    #[arg(long, env = "KILN_AGENT_CONTROL_PLANE")]
    control_plane: Option<String>,
    /// Where the node credential and the applied state are kept.
    #[arg(long, env = "KILN_AGENT_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// A file holding the one-time bootstrap token (the token itself can also come from
    /// KILN_AGENT_BOOTSTRAP_TOKEN; it is never a flag, which `ps` would show).
    #[arg(long, env = "KILN_AGENT_BOOTSTRAP_TOKEN_FILE")]
    bootstrap_token_file: Option<PathBuf>,
    /// The host name to report (and, for a simulated inventory, to derive GPU UUIDs from).
    #[arg(long, env = "KILN_AGENT_HOSTNAME")]
    hostname: Option<String>,
    /// Whether to try NVML.
    #[arg(long, env = "KILN_AGENT_NVML", value_parser = ["auto", "disabled"])]
    nvml: Option<String>,
    /// Whether pods run in Docker: "auto" (if /var/run/docker.sock answers) or "disabled".
    #[arg(long, env = "KILN_AGENT_DOCKER", value_parser = ["auto", "disabled"])]
    docker: Option<String>,
    /// Where tenants reach pods' published ports on this host (IP or DNS name) [default: the
    /// publish address if specific, else the hostname].
    #[arg(long, env = "KILN_AGENT_PUBLIC_ADDRESS")]
    public_address: Option<String>,
    /// A declared GPU inventory to simulate, on hosts without NVIDIA GPUs.
    #[arg(long, env = "KILN_AGENT_SIMULATED_INVENTORY")]
    simulated_inventory: Option<PathBuf>,
    /// The simulated inventory's fault file (see kiln-inventory's `sim::faults`).
    #[arg(long, env = "KILN_AGENT_FAULT_FILE")]
    fault_file: Option<PathBuf>,
    /// How often to send GPU metrics, in milliseconds.
    #[arg(long, env = "KILN_AGENT_METRICS_INTERVAL_MS")]
    metrics_interval_ms: Option<u64>,
}

fn load_config(cli: Cli) -> Result<Config, kiln_agent::config::ConfigError> {
    Config::load(cli.config.as_deref())?.with_overrides(Overrides {
        control_plane: cli.control_plane,
        state_dir: cli.state_dir,
        bootstrap_token_file: cli.bootstrap_token_file,
        bootstrap_token: std::env::var("KILN_AGENT_BOOTSTRAP_TOKEN").ok(),
        metrics_interval_ms: cli.metrics_interval_ms,
        hostname: cli.hostname,
        nvml: cli.nvml.map(|v| match v.as_str() {
            "disabled" => NvmlPolicy::Disabled,
            _ => NvmlPolicy::Auto,
        }),
        simulated_inventory: cli.simulated_inventory,
        fault_file: cli.fault_file,
        docker: cli.docker.map(|v| match v.as_str() {
            "disabled" => kiln_agent::config::DockerPolicy::Disabled,
            _ => kiln_agent::config::DockerPolicy::Auto,
        }),
        public_address: cli.public_address,
    })
}

/// Completes at the first SIGTERM or SIGINT.
async fn stop_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        _ = int.recv() => tracing::info!("SIGINT: stopping"),
    }
    Ok(())
}

/// One line on stderr: the error and its causes.
fn refuse(e: &dyn std::error::Error) -> ExitCode {
    eprintln!(
        "kiln-agent: refusing to start: {}",
        kiln_agent::agent::error_chain(e)
    );
    ExitCode::from(EXIT_REFUSED)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Held to the end of main: dropping it flushes the last spans.
    let _telemetry = kiln_telemetry::init_tracing("kiln-agent");
    let config = match load_config(cli) {
        Ok(c) => c,
        Err(e) => return refuse(&e),
    };
    let result = (|| -> anyhow::Result<Result<Outcome, kiln_agent::AgentError>> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        rt.block_on(async {
            let (tx, rx) = tokio::sync::watch::channel(false);
            // Install the handlers before anything else, so an early signal is not lost.
            let signals = tokio::spawn(stop_signal());
            let stopper = tokio::spawn(async move {
                let r = signals.await;
                let _ = tx.send(true);
                r
            });
            let outcome = kiln_agent::run(config, Shutdown::new(rx)).await;
            if stopper.is_finished() {
                stopper
                    .await
                    .context("signal task")?
                    .context("signal task")?
                    .context("signal handling")?;
            }
            Ok(outcome)
        })
    })();
    match result {
        Ok(Ok(Outcome::Stopped)) => {
            tracing::info!("stopped");
            ExitCode::from(EXIT_STOPPED)
        }
        Ok(Ok(Outcome::Revoked { .. })) => ExitCode::from(EXIT_REVOKED),
        Ok(Err(e)) => refuse(&e),
        Err(e) => {
            eprintln!("kiln-agent: {e:#}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}
