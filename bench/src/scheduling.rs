//! The scheduler end to end through Postgres: committed request → committed placement.
//!
//! A real `kiln-scheduler` runs over a throw-away database seeded with N nodes × 8 H100s
//! (rows written directly, as registered agents would leave them). Figures:
//!
//! * `scheduler.e2e.placements_per_s` — a burst of pending 1-GPU pods committed in one
//!   statement (then one wake-up), until every one is `scheduled`: pods per second;
//! * `scheduler.e2e.p50_ms` / `scheduler.e2e.p99_ms` — pods created one per transaction at a
//!   steady rate (500/s by default, as the API would), each timed from its insert's commit to
//!   the moment this process sees it `scheduled` (polled every 2 ms, so figures carry up to
//!   ~2 ms of polling).

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;
use sqlx::PgPool;
use tokio::process::Child;
use tokio::time::{Instant, sleep, sleep_until};
use uuid::Uuid;

pub struct SchedPlan {
    pub nodes: u32,
    pub burst: u32,
    pub rate: u32,
    pub rate_secs: u64,
    pub startup: Duration,
}

pub async fn run(
    plan: &SchedPlan,
    scheduler_bin: &Path,
    db_url: &str,
    child: &mut Option<Child>,
    figure: impl Fn(&str, String, &str),
) -> Result<()> {
    // The seeded nodes never heartbeat: keep them ready for the run.
    crate::server::start_scheduler(
        scheduler_bin,
        db_url,
        &[
            ("KILN_NODE_UNREACHABLE_AFTER_MS", "3600000"),
            ("KILN_NODE_LOST_AFTER_MS", "7200000"),
        ],
        plan.startup,
        child,
    )
    .await?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(db_url)
        .await
        .context("connecting to the bench database")?;
    let org = seed(&pool, plan.nodes).await?;
    eprintln!(
        "kiln-bench: {} nodes × 8 GPUs seeded; burst of {} pods",
        plan.nodes, plan.burst
    );

    let rate = burst(&pool, org, plan.burst).await?;
    figure(
        "scheduler.e2e.placements_per_s",
        format!("{rate:.1}"),
        "placements/s",
    );
    reset(&pool).await?;

    // Steady rate: one pod per transaction, as the API creates them.
    let total = plan.rate as u64 * plan.rate_secs;
    eprintln!(
        "kiln-bench: {} pods/s for {} s, one per transaction",
        plan.rate, plan.rate_secs
    );
    let inflight: std::sync::Arc<tokio::sync::Mutex<HashMap<Uuid, Instant>>> = Default::default();
    let interval = Duration::from_secs_f64(1.0 / f64::from(plan.rate));
    let producer = {
        let pool = pool.clone();
        let inflight = inflight.clone();
        tokio::spawn(async move {
            let begin = Instant::now();
            for i in 0..total {
                sleep_until(begin + interval.mul_f64(i as f64)).await;
                let id = Uuid::now_v7();
                let mut tx = pool.begin().await?;
                sqlx::query(
                    "INSERT INTO workloads (id, org_id, kind, name, gpu_mode, gpu_type, gpu_count,
                         cpu_millis, memory_mib, disk_gib, spec)
                     VALUES ($1, $2, 'pod', 'steady', 'whole', 'h100-80gb', 1, 1000, 4096, 10,
                         '{\"image\": \"kiln/bench:1\"}')",
                )
                .bind(id)
                .bind(org)
                .execute(&mut *tx)
                .await?;
                sqlx::query("SELECT pg_notify('kiln_workloads_pending', '')")
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                inflight.lock().await.insert(id, Instant::now());
            }
            anyhow::Ok(())
        })
    };
    let mut hist = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    let deadline = Instant::now() + Duration::from_secs(plan.rate_secs + 120);
    let mut seen = 0u64;
    while seen < total {
        let ids: Vec<Uuid> = inflight.lock().await.keys().copied().collect();
        if !ids.is_empty() {
            let placed: Vec<(Uuid,)> = sqlx::query_as(
                "SELECT id FROM workloads WHERE id = ANY($1) AND state = 'scheduled'",
            )
            .bind(&ids)
            .fetch_all(&pool)
            .await?;
            let now = Instant::now();
            let mut map = inflight.lock().await;
            for (id,) in placed {
                if let Some(at) = map.remove(&id) {
                    hist.saturating_record((now - at).as_micros().try_into().unwrap_or(u64::MAX));
                    seen += 1;
                }
            }
        }
        if Instant::now() > deadline {
            bail!("only {seen} of {total} steady pods placed in time");
        }
        sleep(Duration::from_millis(2)).await;
    }
    producer.await??;
    figure(
        "scheduler.e2e.p50_ms",
        crate::ms(hist.value_at_quantile(0.50)),
        "ms",
    );
    figure(
        "scheduler.e2e.p99_ms",
        crate::ms(hist.value_at_quantile(0.99)),
        "ms",
    );
    pool.close().await;
    Ok(())
}

/// A burst of `n` pending 1-GPU pods committed in one statement, then one wake-up, until
/// every one is `scheduled`: placements per second.
pub async fn burst(pool: &PgPool, org: Uuid, n: u32) -> Result<f64> {
    let started = Instant::now();
    sqlx::query(
        "INSERT INTO workloads (id, org_id, kind, name, gpu_mode, gpu_type, gpu_count,
             cpu_millis, memory_mib, disk_gib, spec)
         SELECT gen_random_uuid(), $1, 'pod', 'burst-' || i, 'whole', 'h100-80gb', 1, 1000,
             4096, 10, '{\"image\": \"kiln/bench:1\"}'
         FROM generate_series(1, $2) AS i",
    )
    .bind(org)
    .bind(n as i32)
    .execute(pool)
    .await?;
    sqlx::query("SELECT pg_notify('kiln_workloads_pending', '')")
        .execute(pool)
        .await?;
    let deadline = started + Duration::from_secs(900);
    loop {
        let (placed,): (i64,) =
            sqlx::query_as("SELECT count(*) FROM workloads WHERE state = 'scheduled'")
                .fetch_one(pool)
                .await?;
        if placed >= i64::from(n) {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {placed} of {n} pods placed in 15 minutes");
        }
        sleep(Duration::from_millis(20)).await;
    }
    Ok(f64::from(n) / started.elapsed().as_secs_f64())
}

/// Free every GPU and end every workload, behind the store's back, and tell the schedulers to
/// read the fleet again.
pub async fn reset(pool: &PgPool) -> Result<()> {
    sqlx::query("DELETE FROM gpu_allocations")
        .execute(pool)
        .await?;
    sqlx::query(
        "UPDATE nodes SET cpu_millis_allocated = 0, memory_mib_allocated = 0,
             disk_gib_allocated = 0",
    )
    .execute(pool)
    .await?;
    sqlx::query("UPDATE workloads SET state = 'terminated', node_id = NULL, assignment_id = NULL")
        .execute(pool)
        .await?;
    sqlx::query("SELECT pg_notify('kiln_workloads_pending', 'freed:*')")
        .execute(pool)
        .await?;
    Ok(())
}

/// One org, `nodes` ready nodes with 8 NVLinked H100s each. Answers the org.
pub async fn seed(pool: &PgPool, nodes: u32) -> Result<Uuid> {
    let org = Uuid::now_v7();
    sqlx::query("INSERT INTO orgs (id, name) VALUES ($1, 'bench')")
        .bind(org)
        .execute(pool)
        .await?;
    sqlx::query(
        "INSERT INTO nodes (id, hostname, agent_version, credential_hash, registered_at,
             last_heartbeat_at, cpu_cores, memory_mib, disk_gib)
         SELECT gen_random_uuid(), 'bench-' || i, 'bench', sha256(('bench-' || i)::bytea),
             now(), now(), 192, 2097152, 30000
         FROM generate_series(1, $1) AS i",
    )
    .bind(nodes as i32)
    .execute(pool)
    .await?;
    sqlx::query(
        "INSERT INTO node_gpus (node_id, uuid, idx, model, gpu_type, memory_mib, pci_bus_id,
             numa_node, mig_capable, nvlink_peers)
         SELECT n.id, 'GPU-' || n.id || '-' || g, g, 'NVIDIA H100 80GB HBM3', 'h100-80gb',
             81920, '00000000:' || (24 + g) || ':00.0', g / 4, true,
             ARRAY(SELECT 'GPU-' || n.id || '-' || p FROM generate_series(0, 7) AS p WHERE p <> g)
         FROM nodes n, generate_series(0, 7) AS g",
    )
    .execute(pool)
    .await?;
    Ok(org)
}
