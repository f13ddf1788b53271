//! `kiln-bench`: an end-to-end benchmark of `kiln-api` on loopback.
//!
//! It creates a throw-away database, runs the real `kiln-api` binary against it as a child
//! process on a free 127.0.0.1 port, signs a user up, and measures:
//!
//! * `api.login.*` — sequential `POST /v1/auth/login` latency (password hashing dominates);
//! * `api.me.*` — `GET /v1/me` under closed-loop load from N keep-alive HTTP/1.1 connections
//!   (hyper's low-level client, one connection per task, so the client costs little).
//!
//! * `fleet.*` — one real `kiln-scheduler` holding 10,000 simulated agents that heartbeat, and
//!   how long it takes to notice one that stops (see `fleet.rs`).
//! * `scheduler.e2e.*` — a real `kiln-scheduler` placing pods committed to Postgres, in a burst
//!   and at a steady rate (see `scheduling.rs`; `--only scheduling`).
//! * `billing.*` — postings per second, rating lag under 10,000 running workloads and a month
//!   closed for 10,000 orgs, in process with `kiln-billing` (see `billing.rs`; `--only billing`).
//! * `scheduler.core.*`, `scheduler.packing.*` — the placement core alone, in process, on
//!   10,000 nodes × 8 GPUs and on a seeded trace (see `placement.rs`; `--only placement`).
//!
//! * `pods.*` — real `kiln-api`, `kiln-scheduler` and `kiln-agent` processes running pods in
//!   this machine's Docker, one at a time: create → running, and the part that is not Docker
//!   (see `pods.rs`; `--only pods`), and `endpoints.cold_start_ms`: a call to an endpoint at
//!   zero replicas through the real `kiln-gateway` until its answer.
//!
//! * `instances.*` — the same three processes running VMs under QEMU (TCG) from the project's
//!   tiny guest: create → SSH login, and the part that is not QEMU (see `instances.rs`;
//!   `--only instances`).
//!
//! * `scale.*` — the scheduling burst with one and with two `kiln-scheduler` replicas, and
//!   `GET /v1/me` load on one and on two `kiln-api` replicas, side by side (see `scale.rs`;
//!   `--only scale`).
//!
//! * `gateway.*` — the real `kiln-gateway` in front of an in-process model server: what it adds
//!   to a call at a fixed rate, side by side with direct calls, and its closed-loop ceiling
//!   (see `gateway.rs`; `--only gateway`).
//!
//! Stdout carries only `BENCH <name> <value> <unit>` lines; everything else goes to stderr.
//! The child and the database are removed at the end, also on failure, Ctrl-C or SIGTERM.
//! The load targets only the child on 127.0.0.1 and is bounded in time and request count.

mod billing;
mod fleet;
mod gateway;
mod instances;
mod load;
mod placement;
mod pods;
mod scale;
mod scheduling;
mod server;
mod stack;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use hdrhistogram::Histogram;
use serde_json::json;
use uuid::Uuid;

#[derive(Debug, Parser)]
#[command(
    name = "kiln-bench",
    about = "Benchmark kiln-api on loopback; prints BENCH lines"
)]
pub struct Args {
    /// An existing database on the server to benchmark against; the benchmark creates (and
    /// drops) its own `kiln_bench_<random>` database there, so the role needs CREATEDB.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://kiln:kiln@127.0.0.1:5432/kiln"
    )]
    database_url: String,

    /// Redis for the API's rate limits (under a fresh namespace per run).
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    redis_url: String,

    /// The kiln-api binary [default: `kiln-api` next to this executable].
    #[arg(long, env = "KILN_API_BIN")]
    api_bin: Option<PathBuf>,

    /// Concurrent keep-alive connections for the GET /v1/me load.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=1024))]
    connections: u32,

    /// Measured seconds of GET /v1/me load (after the warm-up).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
    duration_secs: u64,

    /// Seconds of GET /v1/me load before measuring.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(0..=60))]
    warmup_secs: u64,

    /// Upper bound on the number of GET /v1/me requests, warm-up included.
    #[arg(long, default_value_t = 20_000_000)]
    max_requests: u64,

    /// Measured sequential logins.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    logins: u32,

    /// Sequential logins before measuring.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(0..=1_000))]
    login_warmup: u32,

    /// How long kiln-api may take to migrate and to answer /healthz.
    #[arg(long, default_value_t = 60)]
    startup_timeout_secs: u64,

    /// Which benchmarks to run.
    #[arg(long, value_enum, default_value = "all")]
    only: Only,

    /// The kiln-scheduler binary [default: `kiln-scheduler` next to this executable].
    #[arg(long, env = "KILN_SCHEDULER_BIN")]
    scheduler_bin: Option<PathBuf>,

    /// Simulated agents held by one scheduler.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    fleet_agents: u32,

    /// HTTP/2 connections the agents are multiplexed over.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=4096))]
    fleet_connections: u32,

    /// Heartbeat interval the scheduler asks for, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    fleet_heartbeat_ms: u64,

    /// The scheduler's grace before a silent node is unreachable, in milliseconds.
    #[arg(long, default_value_t = 30_000)]
    fleet_unreachable_after_ms: u64,

    /// Seconds of heartbeats before measuring.
    #[arg(long, default_value_t = 12)]
    fleet_warmup_secs: u64,

    /// Measured seconds of heartbeats.
    #[arg(long, default_value_t = 30)]
    fleet_duration_secs: u64,

    /// Nodes (8 H100 each) seeded for the scheduler's end-to-end benchmark.
    #[arg(long, default_value_t = 3_000)]
    sched_nodes: u32,

    /// Pending 1-GPU pods committed at once for `scheduler.e2e.placements_per_s`.
    #[arg(long, default_value_t = 20_000)]
    sched_burst: u32,

    /// Pods per second, one per transaction, for `scheduler.e2e.p99_ms`.
    #[arg(long, default_value_t = 500)]
    sched_rate: u32,

    /// Seconds of the steady rate.
    #[arg(long, default_value_t = 20)]
    sched_rate_secs: u64,

    /// The kiln-gateway binary [default: `kiln-gateway` next to this executable].
    #[arg(long, env = "KILN_GATEWAY_BIN")]
    gateway_bin: Option<PathBuf>,

    /// Requests per second (half direct, half through the gateway) for the gateway overhead.
    /// The target rate is 5,000/s through the gateway (`--gateway-rate 10000`); on a
    /// 2-core machine that is above the ceiling (`gateway.max_rps`, ~3.8k/s closed loop, with
    /// the load generator and the replica on the same cores), where the figure measures
    /// queueing, so the default stays well under it.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    gateway_rate: u32,

    /// The kiln-agent binary [default: `kiln-agent` next to this executable].
    #[arg(long, env = "KILN_AGENT_BIN")]
    agent_bin: Option<PathBuf>,

    /// Measured pods of the pods benchmark (created one at a time).
    #[arg(long, default_value_t = 40, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pods: u32,

    /// Measured instances of the instances benchmark (VMs under TCG, one at a time).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1_000))]
    instances: u32,

    /// The image the pods benchmark runs (local; built by scripts/build-images.sh).
    #[arg(long, env = "KILN_DEMO_IMAGE", default_value = "kiln/demo-model:1")]
    pods_image: String,

    /// Nodes (8 H100 each) of the placement-core benchmark's fleet.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(10..=100_000))]
    placement_nodes: u32,

    /// Measured best-fit and first-fit decisions of the placement-core benchmark.
    #[arg(long, default_value_t = 50_000, value_parser = clap::value_parser!(u32).range(100..=10_000_000))]
    placement_decisions: u32,

    /// Charges posted for `billing.postings_per_s`.
    #[arg(long, default_value_t = 50_000, value_parser = clap::value_parser!(u32).range(1_000..=10_000_000))]
    billing_postings: u32,

    /// Endpoint calls (usage events) rated for `billing.calls_rated_per_s`.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u32).range(100..=10_000_000))]
    billing_calls: u32,

    /// Running workloads rated for `billing.rating.*`.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(10..=1_000_000))]
    billing_workloads: u32,

    /// Seconds the rater ticks while `billing.rating.lag_s` is sampled.
    #[arg(long, default_value_t = 40)]
    billing_lag_secs: u64,

    /// The rater's tick (`KILN_RATING_TICK_MS`) during the lag measurement.
    #[arg(long, default_value_t = 15_000)]
    billing_tick_ms: u64,

    /// Orgs whose month is closed for `billing.invoice_run_s`.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    billing_invoice_orgs: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Only {
    All,
    Api,
    Fleet,
    Placement,
    Scheduling,
    Billing,
    Pods,
    Gateway,
    Instances,
    Scale,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("kiln-bench: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Print one figure. Stdout holds nothing else.
fn figure(name: &str, value: impl std::fmt::Display, unit: &str) {
    let mut out = std::io::stdout().lock();
    // A closed stdout is not worth a panic; the figure is lost either way.
    let _ = writeln!(out, "BENCH {name} {value} {unit}");
    let _ = out.flush();
}

fn ms(micros: u64) -> String {
    format!("{:.3}", micros as f64 / 1000.0)
}

async fn run(args: &Args) -> Result<()> {
    if matches!(args.only, Only::All | Only::Api) {
        run_api(args).await?;
    }
    if matches!(args.only, Only::All | Only::Fleet) {
        run_fleet(args).await?;
    }
    if matches!(args.only, Only::All | Only::Scheduling) {
        run_scheduling(args).await?;
    }
    if matches!(args.only, Only::All | Only::Gateway) {
        run_gateway(args).await?;
    }
    if matches!(args.only, Only::All | Only::Pods) {
        run_pods(args).await?;
    }
    if matches!(args.only, Only::All | Only::Instances) {
        run_instances(args).await?;
    }
    if matches!(args.only, Only::All | Only::Scale) {
        run_scale(args).await?;
    }
    if matches!(args.only, Only::All | Only::Placement) {
        let plan = placement::PlacementPlan {
            nodes: args.placement_nodes,
            decisions: args.placement_decisions,
            seed: 0x6b696c6e,
        };
        placement::run(&plan, figure);
    }
    if matches!(args.only, Only::All | Only::Billing) {
        run_billing(args).await?;
    }
    Ok(())
}

/// A binary next to this executable unless given.
fn sibling(given: &Option<PathBuf>, name: &str, hint: &str) -> Result<PathBuf> {
    let path = match given {
        Some(path) => path.clone(),
        None => std::env::current_exe()
            .context("locating this executable")?
            .with_file_name(name),
    };
    if !path.is_file() {
        bail!("{name} binary not found at {} ({hint})", path.display());
    }
    Ok(path)
}

async fn run_fleet(args: &Args) -> Result<()> {
    let scheduler_bin = sibling(
        &args.scheduler_bin,
        "kiln-scheduler",
        "set KILN_SCHEDULER_BIN or --scheduler-bin",
    )?;
    let run_id = Uuid::new_v4().simple().to_string()[..12].to_owned();
    let db = server::BenchDatabase::create(&args.database_url, &run_id).await?;
    let mut child = None;
    let plan = fleet::FleetPlan {
        agents: args.fleet_agents,
        connections: args.fleet_connections,
        warmup: Duration::from_secs(args.fleet_warmup_secs),
        duration: Duration::from_secs(args.fleet_duration_secs),
        heartbeat_ms: args.fleet_heartbeat_ms,
        unreachable_after_ms: args.fleet_unreachable_after_ms,
        startup: Duration::from_secs(args.startup_timeout_secs),
    };
    let outcome = tokio::select! {
        r = fleet::run(&plan, &scheduler_bin, &db.url, &mut child, figure) => r,
        r = server::shutdown_signal() => r.and_then(|sig| bail!("interrupted by {sig}")),
    };
    if let Some(child) = child {
        server::stop(child).await;
    }
    if let Err(err) = db.drop_database().await {
        eprintln!("kiln-bench: warning: {err:#}");
    }
    outcome
}

async fn run_scheduling(args: &Args) -> Result<()> {
    let scheduler_bin = sibling(
        &args.scheduler_bin,
        "kiln-scheduler",
        "set KILN_SCHEDULER_BIN or --scheduler-bin",
    )?;
    let run_id = Uuid::new_v4().simple().to_string()[..12].to_owned();
    let db = server::BenchDatabase::create(&args.database_url, &run_id).await?;
    let mut child = None;
    let plan = scheduling::SchedPlan {
        nodes: args.sched_nodes,
        burst: args.sched_burst,
        rate: args.sched_rate,
        rate_secs: args.sched_rate_secs,
        startup: Duration::from_secs(args.startup_timeout_secs),
    };
    let outcome = tokio::select! {
        r = scheduling::run(&plan, &scheduler_bin, &db.url, &mut child, figure) => r,
        r = server::shutdown_signal() => r.and_then(|sig| bail!("interrupted by {sig}")),
    };
    if let Some(child) = child {
        server::stop(child).await;
    }
    if let Err(err) = db.drop_database().await {
        eprintln!("kiln-bench: warning: {err:#}");
    }
    outcome
}

async fn run_billing(args: &Args) -> Result<()> {
    let run_id = Uuid::new_v4().simple().to_string()[..12].to_owned();
    let db = server::BenchDatabase::create(&args.database_url, &run_id).await?;
    let plan = billing::BillingPlan {
        postings: args.billing_postings,
        calls: args.billing_calls,
        workloads: args.billing_workloads,
        lag_secs: args.billing_lag_secs,
        tick_ms: args.billing_tick_ms,
        invoice_orgs: args.billing_invoice_orgs,
    };
    let outcome = tokio::select! {
        r = billing::run(&plan, &db.url, figure) => r,
        r = server::shutdown_signal() => r.and_then(|sig| bail!("interrupted by {sig}")),
    };
    if let Err(err) = db.drop_database().await {
        eprintln!("kiln-bench: warning: {err:#}");
    }
    outcome
}

async fn run_gateway(args: &Args) -> Result<()> {
    let hint = "set KILN_API_BIN / KILN_GATEWAY_BIN";
    let api = sibling(&args.api_bin, "kiln-api", hint)?;
    let gateway_bin = sibling(&args.gateway_bin, "kiln-gateway", hint)?;
    let run_id = Uuid::new_v4().simple().to_string()[..12].to_owned();
    let db = server::BenchDatabase::create(&args.database_url, &run_id).await?;
    let plan = gateway::GatewayPlan {
        rate: args.gateway_rate,
        duration: Duration::from_secs(10),
        startup: Duration::from_secs(args.startup_timeout_secs),
    };
    let mut children = Vec::new();
    let outcome = tokio::select! {
        r = gateway::run(&plan, (&api, &gateway_bin), &db.url, &args.redis_url, &run_id, &mut children, figure) => r,
        r = server::shutdown_signal() => r.and_then(|sig| bail!("interrupted by {sig}")),
    };
    for child in children {
        server::stop(child).await;
    }
    if let Err(err) = db.drop_database().await {
        eprintln!("kiln-bench: warning: {err:#}");
    }
    outcome
}

async fn run_pods(args: &Args) -> Result<()> {
    let hint = "set KILN_API_BIN / KILN_SCHEDULER_BIN / KILN_AGENT_BIN / KILN_GATEWAY_BIN";
    let api = sibling(&args.api_bin, "kiln-api", hint)?;
    let scheduler = sibling(&args.scheduler_bin, "kiln-scheduler", hint)?;
    let agent = sibling(&args.agent_bin, "kiln-agent", hint)?;
    let gateway = sibling(&args.gateway_bin, "kiln-gateway", hint)?;
    let run_id = Uuid::new_v4().simple().to_string()[..12].to_owned();
    let db = server::BenchDatabase::create(&args.database_url, &run_id).await?;
    let plan = pods::PodsPlan {
        pods: args.pods,
        warmup: 3,
        image: args.pods_image.clone(),
        startup: Duration::from_secs(args.startup_timeout_secs),
    };
    let bins = pods::Binaries {
        api: &api,
        scheduler: &scheduler,
        agent: &agent,
        gateway: &gateway,
    };
    let mut children = Vec::new();
    let outcome = tokio::select! {
        r = pods::run(&plan, &bins, &db.url, &args.redis_url, &run_id, &mut children, figure) => r,
        r = server::shutdown_signal() => r.and_then(|sig| bail!("interrupted by {sig}")),
    };
    // The agent first, so it does not fight the control plane going away.
    for child in children.into_iter().rev() {
        server::stop(child).await;
    }
    if let Err(err) = db.drop_database().await {
        eprintln!("kiln-bench: warning: {err:#}");
    }
    outcome
}

async fn run_instances(args: &Args) -> Result<()> {
    let hint = "set KILN_API_BIN / KILN_SCHEDULER_BIN / KILN_AGENT_BIN";
    let api = sibling(&args.api_bin, "kiln-api", hint)?;
    let scheduler = sibling(&args.scheduler_bin, "kiln-scheduler", hint)?;
    let agent = sibling(&args.agent_bin, "kiln-agent", hint)?;
    let run_id = Uuid::new_v4().simple().to_string()[..12].to_owned();
    let db = server::BenchDatabase::create(&args.database_url, &run_id).await?;
    let plan = instances::InstancesPlan {
        instances: args.instances,
        warmup: 1,
        startup: Duration::from_secs(args.startup_timeout_secs),
    };
    let mut children = Vec::new();
    let outcome = tokio::select! {
        r = instances::run(&plan, (&api, &scheduler, &agent), (&db.url, &args.redis_url), &run_id, &mut children, figure) => r,
        r = server::shutdown_signal() => r.and_then(|sig| bail!("interrupted by {sig}")),
    };
    for child in children.into_iter().rev() {
        server::stop(child).await;
    }
    if let Err(err) = db.drop_database().await {
        eprintln!("kiln-bench: warning: {err:#}");
    }
    outcome
}

async fn run_scale(args: &Args) -> Result<()> {
    let hint = "set KILN_API_BIN / KILN_SCHEDULER_BIN";
    let api = sibling(&args.api_bin, "kiln-api", hint)?;
    let scheduler = sibling(&args.scheduler_bin, "kiln-scheduler", hint)?;
    let run_id = Uuid::new_v4().simple().to_string()[..12].to_owned();
    let db = server::BenchDatabase::create(&args.database_url, &run_id).await?;
    let plan = scale::ScalePlan {
        nodes: args.sched_nodes,
        burst: args.sched_burst,
        connections: args.connections,
        duration: Duration::from_secs(args.duration_secs),
        warmup: Duration::from_secs(args.warmup_secs),
        startup: Duration::from_secs(args.startup_timeout_secs),
    };
    let mut children = Vec::new();
    let outcome = tokio::select! {
        r = scale::run(&plan, (&api, &scheduler), (&db.url, &args.redis_url), &run_id, &mut children, figure) => r,
        r = server::shutdown_signal() => r.and_then(|sig| bail!("interrupted by {sig}")),
    };
    for child in children {
        server::stop(child).await;
    }
    if let Err(err) = db.drop_database().await {
        eprintln!("kiln-bench: warning: {err:#}");
    }
    outcome
}

async fn run_api(args: &Args) -> Result<()> {
    let run_id = Uuid::new_v4().simple().to_string()[..12].to_owned();
    let api_bin = sibling(&args.api_bin, "kiln-api", "set KILN_API_BIN or --api-bin")?;

    let db = server::BenchDatabase::create(&args.database_url, &run_id).await?;
    let mut child = None;
    let outcome = tokio::select! {
        r = bench(args, &api_bin, &db.url, &run_id, &mut child) => r,
        r = server::shutdown_signal() => r.and_then(|sig| bail!("interrupted by {sig}")),
    };
    if let Some(child) = child {
        server::stop(child).await;
    }
    if let Err(err) = db.drop_database().await {
        eprintln!("kiln-bench: warning: {err:#}");
    }
    outcome
}

async fn bench(
    args: &Args,
    api_bin: &std::path::Path,
    db_url: &str,
    run_id: &str,
    child: &mut Option<tokio::process::Child>,
) -> Result<()> {
    let startup = Duration::from_secs(args.startup_timeout_secs);
    server::migrate(api_bin, db_url, startup).await?;
    let api = server::start(api_bin, db_url, &args.redis_url, run_id, startup, child).await?;
    let base = format!("http://{}", api.addr);

    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .context("building the HTTP client")?;

    // A user of our own.
    let email = format!("bench-{run_id}@example.com");
    let password = format!("Bench-{}-pw!", Uuid::new_v4().simple());
    let resp = http
        .post(format!("{base}/v1/auth/signup"))
        .json(&json!({ "email": email, "password": password, "name": "Bench User" }))
        .send()
        .await
        .context("POST /v1/auth/signup")?;
    let status = resp.status();
    if status != reqwest::StatusCode::CREATED {
        bail!(
            "signup answered {status}: {}",
            resp.text().await.unwrap_or_default()
        );
    }

    // Sequential logins.
    let login_body = json!({ "email": email, "password": password });
    let mut login_hist = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    let mut access_token = String::new();
    eprintln!(
        "kiln-bench: {} sequential logins after {} warm-up",
        args.logins, args.login_warmup
    );
    for i in 0..(args.login_warmup + args.logins) {
        let started = Instant::now();
        let resp = http
            .post(format!("{base}/v1/auth/login"))
            .json(&login_body)
            .send()
            .await
            .context("POST /v1/auth/login")?;
        let status = resp.status();
        let body = resp.bytes().await.context("reading the login answer")?;
        let elapsed = started.elapsed();
        if status != reqwest::StatusCode::OK {
            bail!(
                "login answered {status}: {}",
                String::from_utf8_lossy(&body)
            );
        }
        if i >= args.login_warmup {
            login_hist.saturating_record(elapsed.as_micros().try_into().unwrap_or(u64::MAX));
        }
        if access_token.is_empty() {
            let v: serde_json::Value =
                serde_json::from_slice(&body).context("parsing the login answer")?;
            access_token = v["access_token"]
                .as_str()
                .context("login answer has no access_token")?
                .to_owned();
        }
    }
    figure(
        "api.login.p50_ms",
        ms(login_hist.value_at_quantile(0.50)),
        "ms",
    );
    figure(
        "api.login.p99_ms",
        ms(login_hist.value_at_quantile(0.99)),
        "ms",
    );

    // One checked call before the load, for a clear error if /v1/me does not work.
    let resp = http
        .get(format!("{base}/v1/me"))
        .bearer_auth(&access_token)
        .send()
        .await
        .context("GET /v1/me")?;
    let status = resp.status();
    if status != reqwest::StatusCode::OK {
        bail!(
            "GET /v1/me answered {status}: {}",
            resp.text().await.unwrap_or_default()
        );
    }

    eprintln!(
        "kiln-bench: GET /v1/me from {} connections: {} s warm-up, {} s measured",
        args.connections, args.warmup_secs, args.duration_secs
    );
    let report = load::run(load::Plan {
        addr: api.addr,
        path: "/v1/me".to_owned(),
        authorization: format!("Bearer {access_token}"),
        connections: args.connections,
        warmup: Duration::from_secs(args.warmup_secs),
        duration: Duration::from_secs(args.duration_secs),
        max_requests: args.max_requests,
    })
    .await?;
    let secs = report.measured.as_secs_f64();
    figure(
        "api.me.rps",
        format!("{:.1}", report.ok as f64 / secs),
        "req/s",
    );
    figure(
        "api.me.p50_ms",
        ms(report.latency.value_at_quantile(0.50)),
        "ms",
    );
    figure(
        "api.me.p99_ms",
        ms(report.latency.value_at_quantile(0.99)),
        "ms",
    );
    figure("api.me.errors", report.errors, "count");
    if report.ok == 0 {
        bail!("no GET /v1/me succeeded under load");
    }
    Ok(())
}
