//! Scale-out, side by side in one run: the same work against one replica and against two.
//!
//! * `scale.e2e.placements_per_s.replicas_1` / `.replicas_2` — the scheduling burst
//!   (`scheduling.rs`: pending 1-GPU pods committed at once, until all are `scheduled`) with one
//!   `kiln-scheduler`, then again with a second one beside it, over the same seeded fleet;
//! * `scale.api.rps.replicas_1` / `.replicas_2` — `GET /v1/me` under closed-loop load from the
//!   same number of keep-alive connections, all on one `kiln-api`, then split over two.
//!
//! On this 2-core machine the replicas, Postgres and the load generator share the same cores,
//! so the second replica shows what coordination costs more than what capacity it adds.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::process::Child;

use crate::load;

pub struct ScalePlan {
    pub nodes: u32,
    pub burst: u32,
    pub connections: u32,
    pub duration: Duration,
    pub warmup: Duration,
    pub startup: Duration,
}

pub async fn run(
    plan: &ScalePlan,
    (api_bin, scheduler_bin): (&Path, &Path),
    (db_url, redis_url): (&str, &str),
    run_id: &str,
    children: &mut Vec<Child>,
    figure: impl Fn(&str, String, &str),
) -> Result<()> {
    crate::server::migrate(api_bin, db_url, plan.startup).await?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(db_url)
        .await
        .context("connecting to the bench database")?;

    // Placement: one scheduler, then two.
    let org = crate::scheduling::seed(&pool, plan.nodes).await?;
    let keep_ready = [
        ("KILN_NODE_UNREACHABLE_AFTER_MS", "3600000"),
        ("KILN_NODE_LOST_AFTER_MS", "7200000"),
    ];
    let mut schedulers = Vec::new();
    for replicas in 1..=2 {
        let mut slot = None;
        let started = crate::server::start_scheduler(
            scheduler_bin,
            db_url,
            &keep_ready,
            plan.startup,
            &mut slot,
        )
        .await;
        schedulers.extend(slot.take());
        started?;
        eprintln!(
            "kiln-bench: burst of {} pods on {} nodes with {replicas} scheduler(s)",
            plan.burst, plan.nodes
        );
        let rate = crate::scheduling::burst(&pool, org, plan.burst).await?;
        figure(
            &format!("scale.e2e.placements_per_s.replicas_{replicas}"),
            format!("{rate:.1}"),
            "placements/s",
        );
        crate::scheduling::reset(&pool).await?;
    }
    for s in schedulers {
        crate::server::stop(s).await;
    }

    // The API: one replica, then two, the same connections in total. Replicas of one
    // deployment share its public URL (the tokens' issuer), as behind a load balancer.
    let mut apis = Vec::new();
    for _ in 0..2 {
        let mut slot = None;
        let api = crate::server::start_with(
            api_bin,
            (db_url, redis_url),
            run_id,
            &[("KILN_PUBLIC_URL", "http://api.kiln-bench.invalid")],
            plan.startup,
            &mut slot,
        )
        .await;
        children.extend(slot.take());
        apis.push(api?.addr);
    }
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let (token, _) = crate::stack::tenant(&http, &format!("http://{}", apis[0]), "Scale").await?;
    for replicas in 1..=2usize {
        let share = (plan.connections / replicas as u32).max(1);
        eprintln!(
            "kiln-bench: GET /v1/me from {} connections over {replicas} API replica(s)",
            share * replicas as u32
        );
        let runs = apis[..replicas].iter().map(|addr| {
            load::run(load::Plan {
                addr: *addr,
                path: "/v1/me".to_owned(),
                authorization: format!("Bearer {token}"),
                connections: share,
                warmup: plan.warmup,
                duration: plan.duration,
                max_requests: u64::MAX,
            })
        });
        let reports = futures::future::try_join_all(runs).await?;
        let rps: f64 = reports
            .iter()
            .map(|r| r.ok as f64 / r.measured.as_secs_f64())
            .sum();
        let errors: u64 = reports.iter().map(|r| r.errors).sum();
        if errors > 0 {
            bail!("{errors} failed requests with {replicas} API replica(s)");
        }
        figure(
            &format!("scale.api.rps.replicas_{replicas}"),
            format!("{rps:.1}"),
            "req/s",
        );
    }
    pool.close().await;
    Ok(())
}
