//! Billing against a throw-away database, in process with `kiln-billing`'s own functions (the
//! ones the service runs). Figures:
//!
//! * `billing.postings_per_s` — charges posted through [`kiln_billing::ledger::post_charges`]
//!   (org locks, promotional credit read, the core's split, bulk insert, the balance check at
//!   commit), 1,000 per transaction over 1,000 orgs: postings per second.
//! * `billing.calls_rated_per_s` — endpoint calls (the gateway's `usage_events`, 100 H100
//!   endpoints) rated by one pass of the rater: claimed, aggregated, charged and marked, 1,000
//!   per transaction: calls per second.
//! * `billing.rating.pass_s` — one rating pass over N running workloads (every one has a
//!   new window to rate): seconds.
//! * `billing.rating.lag_s` — with N workloads running and the rater ticking every
//!   `KILN_RATING_TICK_MS` (default 15 s) with the default 2 s settle, the worst staleness seen
//!   of the oldest running workload's rated-until (sampled every 250 ms): how far behind now
//!   balances can be. Bounded below by tick + settle.
//! * `billing.invoice_run_s` — closing one month for M orgs with 6 charges each (final
//!   invoices written, each reconciling with the ledger): seconds.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use kiln_billing::{BillingConfig, Rater};
use kiln_billing_core::{Charge, Money, Product, Tier, Timestamp, Unit};
use kiln_store::Store;
use sqlx::PgPool;
use time::OffsetDateTime;
use uuid::Uuid;

pub struct BillingPlan {
    pub postings: u32,
    pub calls: u32,
    pub workloads: u32,
    pub lag_secs: u64,
    pub tick_ms: u64,
    pub invoice_orgs: u32,
}

async fn orgs(pool: &PgPool, n: u32) -> Result<Vec<Uuid>> {
    let rows: Vec<(Uuid,)> = sqlx::query_as(
        "INSERT INTO orgs (id, name) SELECT gen_random_uuid(), 'bench-' || i
         FROM generate_series(1, $1) AS i RETURNING id",
    )
    .bind(n as i32)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|(o,)| o).collect())
}

pub async fn run(
    plan: &BillingPlan,
    db_url: &str,
    figure: impl Fn(&str, String, &str),
) -> Result<()> {
    let store = Store::connect(db_url, 8).await?;
    store.migrate().await.context("applying migrations")?;
    let pool = store.pool().clone();

    // Postings.
    let payers = orgs(&pool, 1_000).await?;
    let now = Timestamp::from_offset_datetime(OffsetDateTime::now_utc()).unwrap_or_default();
    let charges: Vec<Charge> = (0..plan.postings)
        .map(|i| Charge {
            key: format!("bench:{i}"),
            org: payers[i as usize % payers.len()],
            workload: Uuid::now_v7(),
            product: Product::PodGpu,
            gpu_type: Some("h100-80gb".into()),
            detail: None,
            tier: Tier::OnDemand,
            start: Timestamp(now.0 - 15_000_000),
            end: now,
            price_version: Timestamp(0),
            unit: Unit::GpuSeconds,
            quantity: 15,
            amount: Money::from_micros(12_458),
        })
        .collect();
    eprintln!("kiln-bench: posting {} charges", charges.len());
    let started = Instant::now();
    let mut posted = 0;
    for batch in charges.chunks(1_000) {
        let rows: Vec<(Charge, Option<&str>)> =
            batch.iter().map(|c| (c.clone(), Some("pod"))).collect();
        let mut tx = store.begin().await?;
        posted += kiln_billing::ledger::post_charges(&store, &mut tx, &rows).await?;
        tx.commit().await?;
    }
    let secs = started.elapsed().as_secs_f64();
    anyhow::ensure!(
        posted == charges.len(),
        "posted {posted} of {}",
        charges.len()
    );
    figure(
        "billing.postings_per_s",
        format!("{:.0}", posted as f64 / secs),
        "postings/s",
    );

    // Endpoint calls, before any workload runs (so the pass rates calls only).
    let endpoints: Vec<(Uuid,)> = sqlx::query_as(
        "INSERT INTO endpoints (id, org_id, name, spec, port, min_replicas, max_replicas,
             desired_replicas)
         SELECT gen_random_uuid(), ($1::uuid[])[i], 'bench-' || i,
             '{\"replica\": {\"gpu_type\": \"h100-80gb\"}}'::jsonb, 8000, 0, 1, 0
         FROM generate_series(1, 100) AS i RETURNING id",
    )
    .bind(&payers)
    .fetch_all(&pool)
    .await?;
    let endpoints: Vec<Uuid> = endpoints.into_iter().map(|(e,)| e).collect();
    sqlx::query(
        "INSERT INTO usage_events (id, endpoint_id, org_id, status, duration_ms, request_bytes,
             response_bytes, prompt_tokens, completion_tokens, occurred_at)
         SELECT gen_random_uuid(), e.id, e.org_id, CASE WHEN i % 50 = 0 THEN 502 ELSE 200 END,
             40, 200, 2000, 10 + i % 90, 50 + i % 400, now() - interval '1 minute'
         FROM generate_series(1, $2) AS i
         JOIN endpoints e ON e.id = ($1::uuid[])[1 + i % 100]",
    )
    .bind(&endpoints)
    .bind(plan.calls as i32)
    .execute(&pool)
    .await?;
    eprintln!("kiln-bench: rating {} endpoint calls", plan.calls);
    let started = Instant::now();
    let report = Rater::new(store.clone(), Duration::ZERO)
        .pass(OffsetDateTime::now_utc())
        .await?;
    let secs = started.elapsed().as_secs_f64();
    anyhow::ensure!(
        report.calls as u32 == plan.calls,
        "rated {} of {} calls",
        report.calls,
        plan.calls
    );
    figure(
        "billing.calls_rated_per_s",
        format!("{:.0}", report.calls as f64 / secs),
        "calls/s",
    );

    // Rating: N running workloads, one org each 10.
    let owners = orgs(&pool, plan.workloads.div_ceil(10)).await?;
    sqlx::query(
        "INSERT INTO workloads (id, org_id, kind, name, state, gpu_mode, gpu_type, gpu_count,
             cpu_millis, memory_mib)
         SELECT gen_random_uuid(), ($1::uuid[])[1 + (i % array_length($1::uuid[], 1))], 'pod',
             'bench-' || i, 'running', 'whole', 'h100-80gb', 1, 1000, 4096
         FROM generate_series(1, $2) AS i",
    )
    .bind(&owners)
    .bind(plan.workloads as i32)
    .execute(&pool)
    .await?;
    eprintln!("kiln-bench: {} running workloads", plan.workloads);
    let config = BillingConfig {
        rating_tick_ms: plan.tick_ms,
        ..BillingConfig::for_tests(db_url.to_owned())
    };
    let rater = Rater::new(store.clone(), Duration::from_millis(2_000));
    // The first pass after a few seconds of running: every workload has a window to rate.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let started = Instant::now();
    let report = rater.pass(OffsetDateTime::now_utc()).await?;
    figure(
        "billing.rating.pass_s",
        format!("{:.3}", started.elapsed().as_secs_f64()),
        "s",
    );
    anyhow::ensure!(
        report.workloads as u32 >= plan.workloads,
        "rated {} of {} workloads",
        report.workloads,
        plan.workloads
    );
    // The service's loop for a while; the worst staleness seen.
    let ticker = {
        let (store, config) = (store.clone(), config.clone());
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(config.tick());
            loop {
                interval.tick().await;
                let rater = Rater::new(store.clone(), Duration::from_millis(2_000));
                if let Err(e) = rater.pass(OffsetDateTime::now_utc()).await {
                    eprintln!("kiln-bench: rating pass failed: {e}");
                }
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(plan.lag_secs);
    let mut worst: f64 = 0.0;
    while Instant::now() < deadline {
        worst = worst.max(store.rating_lag().await?);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    ticker.abort();
    figure("billing.rating.lag_s", format!("{worst:.2}"), "s");

    // Month close: M orgs × 6 charges in last month, written as the ledger would hold them.
    let month = kiln_billing::invoices::previous_month(OffsetDateTime::now_utc());
    let invoiced = orgs(&pool, plan.invoice_orgs).await?;
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO ledger_postings (id, idempotency_key, org_id, kind, at, amount_micros,
             workload_id, workload_kind, product, gpu_type, detail, tier, period_end,
             price_version, unit, quantity)
         SELECT gen_random_uuid(), 'bench-month:' || o || ':' || i, o, 'charge',
             $2 + make_interval(hours => i), 1000 + i, gen_random_uuid(), 'pod',
             CASE WHEN i % 2 = 0 THEN 'pod_gpu' ELSE 'mig_slice' END, 'h100-80gb',
             CASE WHEN i % 2 = 0 THEN NULL ELSE '1g.10gb' END, 'on_demand',
             $2 + make_interval(hours => i + 1), '2026-01-01T00:00:00Z',
             CASE WHEN i % 2 = 0 THEN 'gpu_seconds' ELSE 'slice_seconds' END, 3600
         FROM unnest($1::uuid[]) AS o, generate_series(1, 6) AS i",
    )
    .bind(&invoiced)
    .bind(kiln_billing::convert::odt(month.start()))
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO ledger_entries (posting_id, account, org_id, amount_micros)
         SELECT id, 'org:' || org_id || ':balance', org_id, -amount_micros FROM ledger_postings
         WHERE idempotency_key LIKE 'bench-month:%'
         UNION ALL
         SELECT id, 'revenue:gpu', NULL, amount_micros FROM ledger_postings
         WHERE idempotency_key LIKE 'bench-month:%'",
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    eprintln!("kiln-bench: closing {month} for {} orgs", plan.invoice_orgs);
    let started = Instant::now();
    let written = kiln_billing::invoices::close_month(&store, month, 500).await?;
    figure(
        "billing.invoice_run_s",
        format!("{:.3}", started.elapsed().as_secs_f64()),
        "s",
    );
    anyhow::ensure!(
        written >= plan.invoice_orgs as usize,
        "wrote {written} of {} invoices",
        plan.invoice_orgs
    );
    Ok(())
}
