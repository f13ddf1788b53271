//! The inference gateway: what it adds to a call, and how many calls it carries.
//!
//! One replica — the reference model server (`kiln-demo-model`'s app) in this process on a
//! loopback port — is registered as the running replica of an endpoint (rows written as the
//! scheduler and an agent would leave them); the real `kiln-gateway` binary routes to it, with
//! metering on. Figures:
//!
//! * `gateway.overhead.p50_ms` / `.p99_ms` — at a fixed rate (`--gateway-rate`, alternating),
//!   `GET /health` through the gateway and straight to the same replica, side by side in one
//!   run; the figure is the gateway's percentile minus the direct one;
//! * `gateway.max_rps` — closed-loop `GET /health` through the gateway from 32 connections.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;
use tokio::process::{Child, Command};
use tokio::sync::Mutex;
use tokio::time::{Instant, sleep, sleep_until};

pub struct GatewayPlan {
    pub rate: u32,
    pub duration: Duration,
    pub startup: Duration,
}

pub async fn run(
    plan: &GatewayPlan,
    (api_bin, gateway_bin): (&Path, &Path),
    db_url: &str,
    redis_url: &str,
    run_id: &str,
    children: &mut Vec<Child>,
    figure: impl Fn(&str, String, &str),
) -> Result<()> {
    crate::server::migrate(api_bin, db_url, plan.startup).await?;
    // The replica.
    let replica = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let replica_addr = replica.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(replica, kiln_demo_model::app()).await;
    });
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(db_url)
        .await
        .context("connecting to the bench database")?;
    let (endpoint, key) = seed(&pool, replica_addr).await?;

    let gw_addr = crate::server::free_port()?;
    let gateway = Command::new(gateway_bin)
        .env("DATABASE_URL", db_url)
        .env("REDIS_URL", redis_url)
        .env("KILN_REDIS_NAMESPACE", format!("bench-{run_id}"))
        .env("KILN_GATEWAY_LISTEN", gw_addr.to_string())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::from(std::io::stderr()))
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("starting kiln-gateway")?;
    children.push(gateway);
    let through = format!("http://{gw_addr}/v1/endpoints/{endpoint}/health");
    let direct = format!("http://{replica_addr}/health");
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .timeout(Duration::from_secs(10))
        .build()?;
    let deadline = Instant::now() + plan.startup;
    loop {
        match http.get(&through).bearer_auth(&key).send().await {
            Ok(r) if r.status().is_success() => break,
            _ if Instant::now() >= deadline => bail!("kiln-gateway did not route a call in time"),
            _ => sleep(Duration::from_millis(100)).await,
        }
    }

    // Side by side at a fixed rate: direct and through the gateway alternate.
    let hist = Arc::new(Mutex::new((
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?,
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?,
    )));
    let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let interval = Duration::from_secs_f64(1.0 / f64::from(plan.rate.max(1)));
    let warmup = Duration::from_secs(2);
    let start = Instant::now();
    let end = start + warmup + plan.duration;
    let mut next = start;
    let mut i: u64 = 0;
    let mut tasks = tokio::task::JoinSet::new();
    while next < end {
        sleep_until(next).await;
        let via_gateway = i % 2 == 1;
        let (url, http, key, hist, errors) = (
            if via_gateway {
                through.clone()
            } else {
                direct.clone()
            },
            http.clone(),
            key.clone(),
            hist.clone(),
            errors.clone(),
        );
        let measured = next >= start + warmup;
        tasks.spawn(async move {
            let t0 = Instant::now();
            let mut req = http.get(&url);
            if via_gateway {
                req = req.bearer_auth(&key);
            }
            let ok = match req.send().await {
                Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                Err(_) => false,
            };
            let us = t0.elapsed().as_micros() as u64;
            if !measured {
                return;
            }
            if !ok {
                errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return;
            }
            let mut h = hist.lock().await;
            let h = if via_gateway { &mut h.1 } else { &mut h.0 };
            let _ = h.record(us.max(1));
        });
        i += 1;
        next += interval;
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let (d, g) = {
        let h = hist.lock().await;
        (h.0.clone(), h.1.clone())
    };
    let ms = |us: i64| format!("{:.3}", us as f64 / 1000.0);
    let over = |q: f64| g.value_at_quantile(q) as i64 - d.value_at_quantile(q) as i64;
    eprintln!(
        "kiln-bench: gateway at {} req/s alternating: direct p50 {} ms p99 {} ms, gateway p50 {} ms p99 {} ms, {} errors",
        plan.rate,
        ms(d.value_at_quantile(0.5) as i64),
        ms(d.value_at_quantile(0.99) as i64),
        ms(g.value_at_quantile(0.5) as i64),
        ms(g.value_at_quantile(0.99) as i64),
        errors.load(std::sync::atomic::Ordering::Relaxed),
    );
    figure("gateway.overhead.p50_ms", ms(over(0.5)), "ms");
    figure("gateway.overhead.p99_ms", ms(over(0.99)), "ms");
    figure(
        "gateway.overhead.errors",
        errors
            .load(std::sync::atomic::Ordering::Relaxed)
            .to_string(),
        "count",
    );

    // The most it carries, closed loop.
    let report = crate::load::run(crate::load::Plan {
        addr: gw_addr,
        path: format!("/v1/endpoints/{endpoint}/health"),
        authorization: format!("Bearer {key}"),
        connections: 32,
        warmup: Duration::from_secs(2),
        duration: Duration::from_secs(8),
        max_requests: 5_000_000,
    })
    .await?;
    figure(
        "gateway.max_rps",
        format!("{:.1}", report.ok as f64 / report.measured.as_secs_f64()),
        "req/s",
    );
    Ok(())
}

/// An org, an API key, a node and a running replica of one endpoint whose port 8000 is
/// published at `replica`, with limits no benchmark reaches: answers the endpoint's public id
/// and the key.
async fn seed(pool: &sqlx::PgPool, replica: SocketAddr) -> Result<(String, String)> {
    let unlimited = kiln_store::RateLimit {
        per_second: 100_000.0,
        burst: 100_000,
    };
    let limits = kiln_store::EndpointLimits {
        per_key_rate: unlimited,
        per_key_concurrency: 100_000,
        total_rate: None,
        total_concurrency: None,
    };
    let seeded = kiln_testkit::gateway::seed_running_endpoint(pool, replica, &limits).await?;
    Ok((seeded.endpoint, seeded.key.expose().to_owned()))
}
