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
//! * `gateway.max_rps` — closed-loop `GET /health` through the gateway from 32 connections;
//! * `gateway.metering.lost` / `.duplicated` — a gateway SIGKILLed during a burst, against the
//!   calls answered and the calls the replica saw (see [`metering_under_a_kill`]).

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
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
    // The replica, counting the calls that reach it.
    let replica = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let replica_addr = replica.local_addr()?;
    let reached = Arc::new(AtomicU64::new(0));
    let counted = reached.clone();
    let app = kiln_demo_model::app().layer(axum::middleware::from_fn(
        move |req: axum::extract::Request, next: axum::middleware::Next| {
            counted.fetch_add(1, Ordering::Relaxed);
            next.run(req)
        },
    ));
    tokio::spawn(async move {
        let _ = axum::serve(replica, app).await;
    });
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(db_url)
        .await
        .context("connecting to the bench database")?;
    let (endpoint, key) = seed(&pool, replica_addr).await?;

    let namespace = format!("bench-{run_id}");
    let gw_addr = crate::server::free_port()?;
    children.push(start_gateway(
        gateway_bin,
        db_url,
        redis_url,
        &namespace,
        gw_addr,
    )?);
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

    metering_under_a_kill(
        gateway_bin,
        (db_url, redis_url, &namespace),
        &pool,
        (&endpoint, &key),
        &reached,
        children,
        &figure,
    )
    .await
}

/// A `kiln-gateway` process: a dead gateway's usage is taken over after 1 s (not 30).
fn start_gateway(
    bin: &Path,
    db_url: &str,
    redis_url: &str,
    namespace: &str,
    addr: SocketAddr,
) -> Result<Child> {
    Command::new(bin)
        .env("DATABASE_URL", db_url)
        .env("REDIS_URL", redis_url)
        .env("KILN_REDIS_NAMESPACE", namespace)
        .env("KILN_GATEWAY_LISTEN", addr.to_string())
        .env("KILN_GATEWAY_USAGE_CLAIM_IDLE_SECS", "1")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::from(std::io::stderr()))
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("starting kiln-gateway")
}

/// `gateway.metering.lost` / `.duplicated`: a second gateway joins, a burst of 32 callers goes
/// through a third one, which is SIGKILLed mid-burst; once the usage stream is ingested,
/// `lost` = calls answered in full minus calls metered, `duplicated` = calls metered minus
/// calls that reached the replica (each at least 0; both should be 0). Calls cut off by the
/// kill reached the replica and may be metered: neither lost nor duplicated.
async fn metering_under_a_kill(
    gateway_bin: &Path,
    (db_url, redis_url, namespace): (&str, &str, &str),
    pool: &sqlx::PgPool,
    (endpoint, key): (&str, &str),
    reached: &AtomicU64,
    children: &mut Vec<Child>,
    figure: &impl Fn(&str, String, &str),
) -> Result<()> {
    let survivor = crate::server::free_port()?;
    children.push(start_gateway(
        gateway_bin,
        db_url,
        redis_url,
        namespace,
        survivor,
    )?);
    let doomed_addr = crate::server::free_port()?;
    let mut doomed = start_gateway(gateway_bin, db_url, redis_url, namespace, doomed_addr)?;
    let http = reqwest::Client::new();
    let call = |addr: SocketAddr| format!("http://{addr}/v1/endpoints/{endpoint}/health");
    for addr in [survivor, doomed_addr] {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !http
            .get(call(addr))
            .bearer_auth(key)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            if Instant::now() >= deadline {
                bail!("kiln-gateway on {addr} did not route a call in time");
            }
            sleep(Duration::from_millis(50)).await;
        }
    }
    let metered = || async {
        let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM usage_events")
            .fetch_one(pool)
            .await?;
        Ok::<u64, sqlx::Error>(n as u64)
    };
    let stream_len = |conn: redis::aio::MultiplexedConnection| async move {
        let mut conn = conn;
        redis::cmd("XLEN")
            .arg(format!("{namespace}:usage"))
            .query_async::<u64>(&mut conn)
            .await
    };
    let redis = redis::Client::open(redis_url)?;
    let conn = redis.get_multiplexed_async_connection().await?;
    // Let what came before settle: the figures count only the burst.
    let deadline = Instant::now() + Duration::from_secs(60);
    while metered().await? != stream_len(conn.clone()).await? {
        if Instant::now() >= deadline {
            bail!("the usage stream was not ingested in time before the burst");
        }
        sleep(Duration::from_millis(100)).await;
    }
    let (metered_before, reached_before) = (metered().await?, reached.load(Ordering::SeqCst));

    let answered = Arc::new(AtomicU64::new(0));
    let mut callers = tokio::task::JoinSet::new();
    for _ in 0..32 {
        let (http, url, key, answered) = (
            http.clone(),
            call(doomed_addr),
            key.to_owned(),
            answered.clone(),
        );
        callers.spawn(async move {
            loop {
                let Ok(r) = http.get(&url).bearer_auth(&key).send().await else {
                    return;
                };
                if !r.status().is_success() || r.bytes().await.is_err() {
                    return;
                }
                answered.fetch_add(1, Ordering::SeqCst);
            }
        });
    }
    sleep(Duration::from_secs(3)).await;
    doomed.start_kill()?; // SIGKILL
    let _ = doomed.wait().await;
    while callers.join_next().await.is_some() {}
    let deadline = Instant::now() + Duration::from_secs(120);
    while metered().await? != stream_len(conn.clone()).await? {
        if Instant::now() >= deadline {
            bail!("the usage stream was not ingested in time after the kill");
        }
        sleep(Duration::from_millis(100)).await;
    }
    let answered = answered.load(Ordering::SeqCst);
    let metered = metered().await? - metered_before;
    let reached = reached.load(Ordering::SeqCst) - reached_before;
    eprintln!(
        "kiln-bench: gateway killed mid-burst: {answered} answered, {reached} reached the replica, {metered} metered"
    );
    figure("gateway.metering.calls", answered.to_string(), "count");
    figure(
        "gateway.metering.lost",
        answered.saturating_sub(metered).to_string(),
        "count",
    );
    figure(
        "gateway.metering.duplicated",
        metered.saturating_sub(reached).to_string(),
        "count",
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
