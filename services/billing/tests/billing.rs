//! kiln-billing against a real PostgreSQL (a database per test): rating races, price changes,
//! promotional credit, running out of credit and coming back, invoices against the ledger.

use std::time::Duration;

use kiln_billing::convert::{odt, ts};
use kiln_billing::{BillingConfig, Enforcer, Rater, invoices, ledger};
use kiln_billing_core::{Money, Month, Timestamp};
use kiln_store::{GpuPriceRecord, NewPriceVersion, Store};
use sqlx::PgPool;
use time::OffsetDateTime;
use uuid::Uuid;

/// H100 pods cost 2.99 USD per GPU-hour in the default catalog.
const H100_POD_HOUR: i64 = 2_990_000;

async fn org(pool: &PgPool) -> Uuid {
    let id = Uuid::now_v7();
    sqlx::query("INSERT INTO orgs (id, name) VALUES ($1, 'acme')")
        .bind(id)
        .execute(pool)
        .await
        .unwrap();
    id
}

/// A pod on `gpus` H100s, recorded running from `at` (its cursor starts just before).
async fn running_pod(pool: &PgPool, org: Uuid, gpus: i32, at: OffsetDateTime) -> Uuid {
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO workloads (id, org_id, kind, name, gpu_mode, gpu_type, gpu_count,
             cpu_millis, memory_mib, created_at)
         VALUES ($1, $2, 'pod', 'p', 'whole', 'h100-80gb', $3, 1000, 1024, $4)",
    )
    .bind(id)
    .bind(org)
    .bind(gpus)
    .bind(at - time::Duration::seconds(1))
    .execute(pool)
    .await
    .unwrap();
    sqlx::query("UPDATE billing_rating_cursors SET rated_until = $2 WHERE workload_id = $1")
        .bind(id)
        .bind(at - time::Duration::seconds(1))
        .execute(pool)
        .await
        .unwrap();
    // The API and agents move the state; the trigger records it at the wall clock, so the
    // history row at the chosen instant is written directly.
    sqlx::query("UPDATE workloads SET state = 'running' WHERE id = $1")
        .bind(id)
        .execute(pool)
        .await
        .unwrap();
    sqlx::query(
        "UPDATE workload_state_history SET at = $2 WHERE workload_id = $1 AND state = 'running'",
    )
    .bind(id)
    .bind(at)
    .execute(pool)
    .await
    .unwrap();
    id
}

async fn set_state(pool: &PgPool, workload: Uuid, state: &str, at: OffsetDateTime) {
    sqlx::query("UPDATE workloads SET state = $2 WHERE id = $1")
        .bind(workload)
        .bind(state)
        .execute(pool)
        .await
        .unwrap();
    sqlx::query(
        "UPDATE workload_state_history SET at = $3
         WHERE id = (SELECT max(id) FROM workload_state_history WHERE workload_id = $1 AND state = $2)",
    )
    .bind(workload)
    .bind(state)
    .bind(at)
    .execute(pool)
    .await
    .unwrap();
}

/// A whole second some minutes from now, so every instant a test names is after the rows it
/// creates.
fn t0() -> OffsetDateTime {
    kiln_billing::rater::whole_second(OffsetDateTime::now_utc() + time::Duration::minutes(5))
}

fn secs(n: i64) -> time::Duration {
    time::Duration::seconds(n)
}

async fn charged(pool: &PgPool, workload: Uuid) -> (i64, i64, i64) {
    sqlx::query_as(
        "SELECT COALESCE(sum(amount_micros), 0)::int8, COALESCE(sum(quantity), 0)::int8, count(*)
         FROM ledger_postings WHERE workload_id = $1",
    )
    .bind(workload)
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn balance(pool: &PgPool, account: &str) -> i64 {
    let (b,): (i64,) = sqlx::query_as(
        "SELECT COALESCE(sum(amount_micros), 0)::int8 FROM ledger_entries WHERE account = $1",
    )
    .bind(account)
    .fetch_one(pool)
    .await
    .unwrap();
    b
}

fn rater(pool: &PgPool) -> Rater {
    let mut r = Rater::new(Store::new(pool.clone()), Duration::ZERO);
    r.batch = 7; // several transactions per pass
    r
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn two_raters_racing_charge_every_second_exactly_once(pool: PgPool) {
    let org = org(&pool).await;
    let start = t0();
    let mut pods = Vec::new();
    for i in 0..20 {
        pods.push(running_pod(&pool, org, 1 + i % 3, start).await);
    }
    let (a, b) = (rater(&pool), rater(&pool));
    // Both replicas tick through the same 3.5 minutes at slightly different instants.
    for k in 1..=30i64 {
        let (ra, rb) = tokio::join!(
            a.pass(start + secs(7 * k)),
            b.pass(start + secs(7 * k) + time::Duration::milliseconds(300))
        );
        ra.unwrap();
        rb.unwrap();
    }
    let mut total = 0;
    for (i, pod) in pods.iter().enumerate() {
        let gpus = 1 + i as i64 % 3;
        let (amount, quantity, _) = charged(&pool, *pod).await;
        assert_eq!(quantity, 210 * gpus, "GPU-seconds charged for pod {i}");
        // The whole run rated at once, rounded down once.
        assert_eq!(
            amount,
            H100_POD_HOUR * gpus * 210 / 3600,
            "amount for pod {i}"
        );
        total += amount;
    }
    assert_eq!(balance(&pool, &format!("org:{org}:balance")).await, -total);
    assert_eq!(balance(&pool, "revenue:gpu").await, total);
    // Rating again changes nothing.
    let again = a.pass(start + secs(210)).await.unwrap();
    assert_eq!(again.postings, 0);
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn a_price_change_mid_run_charges_each_second_at_its_own_price(pool: PgPool) {
    let store = Store::new(pool.clone());
    let org = org(&pool).await;
    let start = t0();
    let pod = running_pod(&pool, org, 1, start).await;
    let mut tx = store.begin().await.unwrap();
    store
        .price_version_create(
            &mut tx,
            &NewPriceVersion {
                effective_from: start + secs(60),
                storage_gib_month_micros: Some(100_000),
                note: "H100 doubles",
                created_by: None,
                gpus: &[GpuPriceRecord {
                    gpu_type: "h100-80gb".into(),
                    pod_gpu_hour_micros: Some(2 * H100_POD_HOUR),
                    ..Default::default()
                }],
            },
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let r = rater(&pool);
    for k in 1..=12 {
        r.pass(start + secs(10 * k)).await.unwrap();
    }
    set_state(&pool, pod, "stopped", start + secs(120)).await;
    r.pass(start + secs(200)).await.unwrap();
    let (amount, quantity, _) = charged(&pool, pod).await;
    assert_eq!(
        quantity, 120,
        "billed from running to stopped, not to the last rating"
    );
    // 60 s at 2.99/h and 60 s at 5.98/h, rounded down once over the run.
    assert_eq!(amount, (H100_POD_HOUR * 60 + 2 * H100_POD_HOUR * 60) / 3600);
    let versions: Vec<(OffsetDateTime,)> = sqlx::query_as(
        "SELECT DISTINCT price_version FROM ledger_postings WHERE workload_id = $1 ORDER BY 1",
    )
    .bind(pod)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        versions.len(),
        2,
        "charges name the version they were rated at"
    );
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn promotional_credit_is_spent_first_then_expires(pool: PgPool) {
    let store = Store::new(pool.clone());
    let org = org(&pool).await;
    let start = t0();
    let mut tx = store.begin().await.unwrap();
    ledger::grant_promo(
        &store,
        &mut tx,
        org,
        "welcome",
        Money::from_micros(1_000_000),
        start + secs(3600),
        start,
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let pod = running_pod(&pool, org, 1, start).await;
    let r = rater(&pool);
    r.pass(start + secs(600)).await.unwrap(); // 10 min of 2.99/h = 498 333
    let spent = H100_POD_HOUR * 600 / 3600;
    let promo = format!("org:{org}:promo:welcome");
    assert_eq!(balance(&pool, &promo).await, 1_000_000 - spent);
    assert_eq!(balance(&pool, &format!("org:{org}:balance")).await, 0);
    r.pass(start + secs(1800)).await.unwrap(); // the promo runs out; the rest is paid
    let (total, _, _) = charged(&pool, pod).await;
    assert_eq!(balance(&pool, &promo).await, 0);
    assert_eq!(
        balance(&pool, &format!("org:{org}:balance")).await,
        -(total - 1_000_000)
    );

    // A second grant expires unspent: what is left is posted out at its expiry, once.
    let mut tx = store.begin().await.unwrap();
    ledger::grant_promo(
        &store,
        &mut tx,
        org,
        "unused",
        Money::from_micros(5),
        start,
        start,
    )
    .await
    .unwrap();
    assert_eq!(
        ledger::expire_promos(&store, &mut tx, start + secs(1), 100)
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        ledger::expire_promos(&store, &mut tx, start + secs(2), 100)
            .await
            .unwrap(),
        0
    );
    tx.commit().await.unwrap();
    assert_eq!(balance(&pool, &format!("org:{org}:promo:unused")).await, 0);
    assert_eq!(balance(&pool, "expense:promotions").await, -1_000_000);
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn an_org_out_of_credit_is_stopped_after_grace_and_resumes_after_a_top_up(pool: PgPool) {
    let store = Store::new(pool.clone());
    let org = org(&pool).await;
    sqlx::query("UPDATE billing_settings SET credit_limit_micros = 1000000 WHERE org_id = $1")
        .bind(org)
        .execute(&pool)
        .await
        .unwrap();
    let start = t0();
    let pod = running_pod(&pool, org, 8, start).await; // 23.92 USD an hour
    let r = rater(&pool);
    let enforcer = Enforcer::new(store.clone(), Duration::from_secs(60));

    // 100 s costs 0.66 USD: within the 1 USD limit.
    let report = r.pass(start + secs(100)).await.unwrap();
    let e = enforcer
        .pass(&report.charged_orgs, start + secs(100))
        .await
        .unwrap();
    assert!(e.exhausted.is_empty());
    let mut conn = pool.acquire().await.unwrap();
    assert!(
        kiln_billing::limits::standing(&store, &mut conn, org, start + secs(100))
            .await
            .unwrap()
            .is_none(),
        "still in credit: new work allowed"
    );

    // 200 s costs 1.33 USD: out of credit. New work is refused at once; running work keeps
    // going for the grace period.
    let report = r.pass(start + secs(200)).await.unwrap();
    let e = enforcer
        .pass(&report.charged_orgs, start + secs(200))
        .await
        .unwrap();
    assert_eq!(e.exhausted, vec![org]);
    assert!(e.stopped.is_empty(), "grace period first");
    assert!(
        kiln_billing::limits::standing(&store, &mut conn, org, start + secs(200))
            .await
            .unwrap()
            .is_some(),
        "out of credit: new work refused"
    );
    let report = r.pass(start + secs(230)).await.unwrap();
    let e = enforcer
        .pass(&report.charged_orgs, start + secs(230))
        .await
        .unwrap();
    assert!(e.stopped.is_empty(), "still within the grace period");

    // Grace over: the pod is stopped, with a reason, and billing for it ends there.
    let report = r.pass(start + secs(260)).await.unwrap();
    let e = enforcer
        .pass(&report.charged_orgs, start + secs(260))
        .await
        .unwrap();
    assert_eq!(e.stopped, vec![pod]);
    let (state, reason): (String, String) =
        sqlx::query_as("SELECT state, state_reason FROM workloads WHERE id = $1")
            .bind(pod)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(state, "stopped");
    assert!(reason.contains("out of credit"), "{reason}");
    let (actions,): (Vec<String>,) =
        sqlx::query_as("SELECT array_agg(action ORDER BY id) FROM audit_events WHERE org_id = $1")
            .bind(org)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        actions,
        vec!["billing.credit_exhausted", "billing.workloads_stopped"]
    );

    // A top-up brings it back: the refusal lifts at once and the pod is queued again.
    let mut tx = store.begin().await.unwrap();
    ledger::top_up(
        &store,
        &mut tx,
        org,
        Money::from_micros(50_000_000),
        "wire-1",
        "bank transfer",
        start + secs(300),
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    assert!(
        kiln_billing::limits::standing(&store, &mut conn, org, start + secs(300))
            .await
            .unwrap()
            .is_none()
    );
    let e = enforcer
        .pass(&Default::default(), start + secs(301))
        .await
        .unwrap();
    assert_eq!(e.restored, vec![org]);
    assert_eq!(e.resumed, vec![pod]);
    let (state,): (String,) = sqlx::query_as("SELECT state FROM workloads WHERE id = $1")
        .bind(pod)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(state, "pending", "queued again for the scheduler");
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn invoices_reconcile_exactly_with_the_ledger(pool: PgPool) {
    let store = Store::new(pool.clone());
    let (a, b) = (org(&pool).await, org(&pool).await);
    let start = t0();
    let mut pods = Vec::new();
    for (i, o) in [a, a, a, b].into_iter().enumerate() {
        pods.push(running_pod(&pool, o, 1 + i as i32, start + secs(i as i64 * 13)).await);
    }
    // A MIG slice and a spot pod too, so lines group by product and GPU type.
    sqlx::query("UPDATE workloads SET gpu_mode = 'mig', gpu_count = 0, mig_profile = '1g.10gb' WHERE id = $1")
        .bind(pods[1])
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("UPDATE workloads SET tier = 'spot' WHERE id = $1")
        .bind(pods[2])
        .execute(&pool)
        .await
        .unwrap();
    let r = rater(&pool);
    for k in 1..=9 {
        r.pass(start + secs(37 * k)).await.unwrap();
    }
    let month = Month::of(ts(start));
    for o in [a, b] {
        let inv = invoices::on_demand(&store, o, month, start, Duration::from_secs(3600))
            .await
            .unwrap();
        let mut conn = pool.acquire().await.unwrap();
        let ledger_total = store
            .ledger_org_charged(&mut conn, o, odt(month.start()), odt(month.end()))
            .await
            .unwrap();
        assert!(inv.total_micros > 0);
        assert_eq!(inv.total_micros, ledger_total, "invoice total = ledger");
        let lines: i64 = inv.lines.0.iter().map(|l| l.amount_micros).sum();
        assert_eq!(lines, inv.total_micros, "lines add up to the total");
        assert_eq!(inv.status, "draft", "the month is still open");
    }
    let inv = invoices::on_demand(&store, a, month, start, Duration::from_secs(3600))
        .await
        .unwrap();
    let products: Vec<&str> = inv.lines.0.iter().map(|l| l.product.as_str()).collect();
    assert_eq!(products, vec!["pod_gpu", "mig_slice"]);
    // Month close writes final invoices once.
    let later = Timestamp(month.end().0);
    assert!(invoices::closed(
        month,
        odt(later) + secs(3600),
        Duration::from_secs(3600)
    ));
    assert_eq!(invoices::close_month(&store, month, 1).await.unwrap(), 2);
    assert_eq!(invoices::close_month(&store, month, 1).await.unwrap(), 0);
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn an_unpriced_workload_is_never_free_it_is_rated_once_priced(pool: PgPool) {
    let store = Store::new(pool.clone());
    let org = org(&pool).await;
    let start = t0();
    let pod = running_pod(&pool, org, 1, start).await;
    sqlx::query("UPDATE workloads SET gpu_type = 'b200-192gb' WHERE id = $1")
        .bind(pod)
        .execute(&pool)
        .await
        .unwrap();
    let r = rater(&pool);
    let report = r.pass(start + secs(60)).await.unwrap();
    assert_eq!(report.unrated, 1);
    assert_eq!(charged(&pool, pod).await.2, 0);
    let mut tx = store.begin().await.unwrap();
    store
        .price_version_create(
            &mut tx,
            &NewPriceVersion {
                effective_from: start - secs(10),
                storage_gib_month_micros: None,
                note: "B200",
                created_by: None,
                gpus: &[GpuPriceRecord {
                    gpu_type: "b200-192gb".into(),
                    pod_gpu_hour_micros: Some(3_600_000),
                    ..Default::default()
                }],
            },
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    r.pass(start + secs(90)).await.unwrap();
    assert_eq!(
        charged(&pool, pod).await.0,
        90_000,
        "3.60 USD an hour is 1000 micros a second, from the start"
    );
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn the_service_tick_rates_up_to_now(pool: PgPool) {
    let store = Store::new(pool.clone());
    let org = org(&pool).await;
    let start = kiln_billing::rater::whole_second(OffsetDateTime::now_utc());
    let pod = running_pod(&pool, org, 1, start - secs(30)).await;
    let config = BillingConfig::for_tests(String::new());
    let report = kiln_billing::tick(&store, &config, start).await.unwrap();
    assert_eq!(report.rating.workloads, 1);
    assert_eq!(charged(&pool, pod).await.1, 30);
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn budget_alerts_are_raised_once_per_level_per_month(pool: PgPool) {
    let store = Store::new(pool.clone());
    let org = org(&pool).await;
    // A 1 USD monthly budget; one H100 pod costs 2.99 USD an hour.
    sqlx::query("UPDATE billing_settings SET monthly_budget_micros = 1000000 WHERE org_id = $1")
        .bind(org)
        .execute(&pool)
        .await
        .unwrap();
    let start = t0();
    running_pod(&pool, org, 1, start).await;
    let r = rater(&pool);
    let enforcer = Enforcer::new(store.clone(), Duration::from_secs(3600));
    let mut alerts = Vec::new();
    // 0.25, 0.62, 0.87, 1.25, 1.50 USD spent.
    for secs_in in [300, 750, 1050, 1500, 1800] {
        let now = start + secs(secs_in);
        let report = r.pass(now).await.unwrap();
        let e = enforcer.pass(&report.charged_orgs, now).await.unwrap();
        alerts.extend(e.alerts.into_iter().map(|(_, p)| p));
    }
    assert_eq!(alerts, vec![50, 80, 100]);
    let (n,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM audit_events WHERE org_id = $1 AND action = 'billing.budget_alert'",
    )
    .bind(org)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(n, 3, "each level once in the org's audit log");
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn the_service_serves_health_and_keeps_balances_current(pool: PgPool) {
    let store = Store::new(pool.clone());
    let org = org(&pool).await;
    let pod = running_pod(&pool, org, 1, OffsetDateTime::now_utc() - secs(60)).await;
    let ops = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = ops.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let service = tokio::spawn(
        kiln_billing::Billing {
            store: store.clone(),
            config: BillingConfig::for_tests(String::new()),
            ops_listener: ops,
        }
        .run(async move {
            let _ = stop_rx.await;
        }),
    );
    let health = reqwest::get(format!("http://{addr}/healthz"))
        .await
        .unwrap();
    assert!(health.status().is_success());
    // The pod's minute of running shows up in the ledger without anyone asking.
    kiln_testkit::eventually(
        "the running pod to be charged",
        Duration::from_secs(20),
        || {
            let pool = pool.clone();
            async move {
                let (amount, quantity, _) = charged(&pool, pod).await;
                (quantity >= 60 && amount > 0).then_some(())
            }
        },
    )
    .await;
    // Each tick is measured (recorded once the tick has finished).
    kiln_testkit::eventually(
        "the tick duration in /metrics",
        Duration::from_secs(20),
        || async move {
            let metrics = reqwest::get(format!("http://{addr}/metrics"))
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            metrics.contains("kiln_billing_tick_seconds").then_some(())
        },
    )
    .await;
    stop_tx.send(()).unwrap();
    service.await.unwrap().unwrap();
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn a_stopped_instance_pays_for_its_disk_not_its_gpus(pool: PgPool) {
    let org = org(&pool).await;
    let start = t0();
    let vm = running_pod(&pool, org, 2, start).await;
    sqlx::query("UPDATE workloads SET kind = 'instance', gpu_mode = 'passthrough', disk_gib = 300 WHERE id = $1")
        .bind(vm)
        .execute(&pool)
        .await
        .unwrap();
    set_state(&pool, vm, "stopped", start + secs(3600)).await;
    let r = rater(&pool);
    r.pass(start + secs(3600 + 86_400)).await.unwrap();
    let rows: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT product, sum(quantity)::int8, sum(amount_micros)::int8 FROM ledger_postings
         WHERE workload_id = $1 GROUP BY product ORDER BY product",
    )
    .bind(vm)
    .fetch_all(&pool)
    .await
    .unwrap();
    // An hour of 2 H100s at 3.29; then a day of 300 GiB at 0.10 per GiB-month (30 days).
    assert_eq!(
        rows,
        vec![
            ("instance_gpu".to_owned(), 2 * 3600, 2 * 3_290_000),
            ("storage".to_owned(), 300 * 86_400, 300 * 100_000 / 30),
        ]
    );
}

/// An endpoint on `gpu_type` (or CPU-only) of `org`, as the API stores it.
async fn endpoint(pool: &PgPool, org: Uuid, gpu_type: Option<&str>) -> Uuid {
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO endpoints (id, org_id, name, spec, port, min_replicas, max_replicas,
             desired_replicas)
         VALUES ($1, $2, $3, $4, 8000, 0, 1, 0)",
    )
    .bind(id)
    .bind(org)
    .bind(format!("ep-{}", id.simple()))
    .bind(serde_json::json!({ "replica": { "gpu_type": gpu_type } }))
    .execute(pool)
    .await
    .unwrap();
    id
}

/// `n` calls of `endpoint` as the gateway's ingester stores them, each with `status` and tokens.
async fn calls(
    pool: &PgPool,
    org: Uuid,
    endpoint: Uuid,
    n: usize,
    status: i32,
    tokens: (i64, i64),
    at: OffsetDateTime,
) -> Vec<Uuid> {
    let rows: Vec<kiln_store::UsageEventRow> = (0..n)
        .map(|i| kiln_store::UsageEventRow {
            caller_org_id: None,
            resale: None,
            id: Uuid::now_v7(),
            endpoint_id: endpoint,
            org_id: org,
            api_key_id: None,
            replica_id: None,
            status,
            duration_ms: 5,
            request_bytes: 10,
            response_bytes: 100,
            prompt_tokens: Some(tokens.0),
            completion_tokens: Some(tokens.1),
            occurred_at: at + time::Duration::milliseconds(i as i64),
        })
        .collect();
    Store::new(pool.clone())
        .usage_events_insert(&rows)
        .await
        .unwrap();
    rows.iter().map(|r| r.id).collect()
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn endpoint_calls_are_charged_per_request_and_token_exactly_once(pool: PgPool) {
    // Default catalog, H100: 100 µ$ a request, 200 µ$ per 1k prompt, 600 µ$ per 1k completion.
    let org = org(&pool).await;
    let ep = endpoint(&pool, org, Some("h100-80gb")).await;
    let start = OffsetDateTime::now_utc() - time::Duration::minutes(1);
    // Token counts whose per-call price is a whole micro, so the total does not depend on how
    // the two racing raters split the batch into aggregates (each aggregate rounds down).
    let ok = calls(&pool, org, ep, 25, 200, (10, 50), start).await;
    let failed = calls(&pool, org, ep, 4, 502, (0, 0), start).await;
    let (a, b) = (rater(&pool), rater(&pool));
    let now = OffsetDateTime::now_utc();
    let (ra, rb) = tokio::join!(a.pass(now), b.pass(now));
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_eq!(
        ra.calls + rb.calls,
        29,
        "every call rated once between the two raters"
    );
    let expected = 25 * 100 + 25 * (10 * 200 / 1000) + 25 * (50 * 600 / 1000);
    assert_eq!(
        balance(&pool, &format!("org:{org}:balance")).await,
        -expected
    );
    assert_eq!(balance(&pool, "revenue:inference").await, expected);
    // Each charged call names the posting that charged it; a 5xx is rated free.
    let keys: Vec<(Uuid, Option<String>)> =
        sqlx::query_as("SELECT id, charge_key FROM usage_events ORDER BY id")
            .fetch_all(&pool)
            .await
            .unwrap();
    for (id, key) in &keys {
        if failed.contains(id) {
            assert_eq!(key, &None, "a server error is not charged");
        } else {
            assert!(ok.contains(id));
            let key = key.as_deref().expect("a charged call names its aggregate");
            let (postings,): (i64,) = sqlx::query_as(
                "SELECT count(*) FROM ledger_postings WHERE idempotency_key LIKE $1 || ':%'",
            )
            .bind(key)
            .fetch_one(&pool)
            .await
            .unwrap();
            assert!(postings >= 1, "{key} has its postings");
        }
    }
    // More passes charge nothing more; a late call is charged on its own.
    let again = a.pass(OffsetDateTime::now_utc()).await.unwrap();
    assert_eq!((again.calls, again.postings), (0, 0));
    calls(&pool, org, ep, 1, 200, (0, 0), start).await;
    a.pass(OffsetDateTime::now_utc()).await.unwrap();
    assert_eq!(
        balance(&pool, &format!("org:{org}:balance")).await,
        -(expected + 100)
    );
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn a_granted_caller_pays_the_owner_its_price_once_from_its_paid_balance(pool: PgPool) {
    let store = Store::new(pool.clone());
    let (owner, caller) = (org(&pool).await, org(&pool).await);
    let ep = endpoint(&pool, owner, Some("h100-80gb")).await;
    let start = OffsetDateTime::now_utc() - time::Duration::minutes(1);
    // The caller has promotional credit: the operator's gift, not money to pass on.
    let mut tx = store.begin().await.unwrap();
    ledger::grant_promo(
        &store,
        &mut tx,
        caller,
        "welcome",
        Money::from_micros(1_000_000),
        start + secs(86_400),
        start - secs(60),
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let price = kiln_store::EndpointPrice {
        per_request_micros: 1_000,
        per_1k_prompt_tokens_micros: 2_000,
        per_1k_completion_tokens_micros: 4_000,
    };
    let granted = calls(&pool, owner, ep, 10, 200, (10, 50), start).await;
    sqlx::query(
        "UPDATE usage_events SET caller_org_id = $2, resale_per_request_micros = $3,
             resale_per_1k_prompt_tokens_micros = $4, resale_per_1k_completion_tokens_micros = $5
         WHERE id = ANY($1)",
    )
    .bind(&granted)
    .bind(caller)
    .bind(price.per_request_micros)
    .bind(price.per_1k_prompt_tokens_micros)
    .bind(price.per_1k_completion_tokens_micros)
    .execute(&pool)
    .await
    .unwrap();
    // The owner's own calls, and a failed granted one (free for both).
    calls(&pool, owner, ep, 2, 200, (10, 50), start).await;
    let failed = calls(&pool, owner, ep, 1, 503, (0, 0), start).await;
    sqlx::query("UPDATE usage_events SET caller_org_id = $2, resale_per_request_micros = 1000, resale_per_1k_prompt_tokens_micros = 0, resale_per_1k_completion_tokens_micros = 0 WHERE id = ANY($1)")
        .bind(&failed)
        .bind(caller)
        .execute(&pool)
        .await
        .unwrap();

    let (a, b) = (rater(&pool), rater(&pool));
    let now = OffsetDateTime::now_utc();
    let (ra, rb) = tokio::join!(a.pass(now), b.pass(now));
    assert_eq!(ra.unwrap().calls + rb.unwrap().calls, 13);
    // The compute: 12 answered calls at the catalog's H100 prices, paid by the owner.
    let catalog = 12 * 100 + 12 * (10 * 200 / 1000) + 12 * (50 * 600 / 1000);
    // The resale: 10 calls × 1,000 + 100 prompt tokens' 200 + 500 completion tokens' 2,000.
    let resale = 10 * 1_000 + 100 * 2_000 / 1000 + 500 * 4_000 / 1000;
    assert_eq!(balance(&pool, "revenue:inference").await, catalog);
    assert_eq!(
        balance(&pool, &format!("org:{owner}:balance")).await,
        resale - catalog
    );
    assert_eq!(
        balance(&pool, &format!("org:{caller}:balance")).await,
        -resale
    );
    assert_eq!(
        balance(&pool, &format!("org:{caller}:promo:welcome")).await,
        1_000_000,
        "promotional credit is not passed on to another org"
    );
    // The caller's charges (and so its invoice) show the resale as its own lines.
    // (Three products per aggregate; how many aggregates depends on how the raters split.)
    let (lines, other): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE detail IS DISTINCT FROM 'resale')
         FROM ledger_postings WHERE org_id = $1 AND kind = 'usage'",
    )
    .bind(caller)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(lines >= 3 && lines % 3 == 0, "{lines} resale postings");
    assert_eq!(other, 0, "the caller is charged nothing but the resale");
    let mut conn = pool.acquire().await.unwrap();
    assert_eq!(
        store
            .ledger_org_charged(&mut conn, caller, start - secs(3600), now + secs(3600))
            .await
            .unwrap(),
        resale
    );
    // Rated once: another pass posts nothing.
    let again = a.pass(OffsetDateTime::now_utc()).await.unwrap();
    assert_eq!((again.calls, again.postings), (0, 0));
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn calls_of_an_unpriced_endpoint_wait_and_are_never_free(pool: PgPool) {
    let org = org(&pool).await;
    let cpu = endpoint(&pool, org, None).await;
    let gpu = endpoint(&pool, org, Some("a100-80gb")).await;
    let start = OffsetDateTime::now_utc() - time::Duration::minutes(1);
    let waiting = calls(&pool, org, cpu, 3, 200, (1, 1), start).await;
    calls(&pool, org, gpu, 2, 200, (0, 0), start).await;
    let r = rater(&pool).pass(OffsetDateTime::now_utc()).await.unwrap();
    assert_eq!((r.calls, r.calls_unrated), (2, 3));
    // A100 80GB: 80 µ$ a request; the CPU endpoint's calls are still unrated, not free.
    assert_eq!(balance(&pool, "revenue:inference").await, 160);
    let (unrated,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM usage_events WHERE rated_at IS NULL AND id = ANY($1)")
            .bind(&waiting)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(unrated, 3);
    assert_eq!(
        Store::new(pool.clone())
            .usage_calls_unrated()
            .await
            .unwrap()
            .0,
        3
    );
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn an_instance_out_of_credit_is_stopped_with_its_disk_kept_and_resumes(pool: PgPool) {
    let store = Store::new(pool.clone());
    let org = org(&pool).await;
    sqlx::query("UPDATE billing_settings SET credit_limit_micros = 1000000 WHERE org_id = $1")
        .bind(org)
        .execute(&pool)
        .await
        .unwrap();
    let start = t0();
    let vm = running_pod(&pool, org, 8, start).await;
    sqlx::query("UPDATE workloads SET kind = 'instance', gpu_mode = 'passthrough', disk_gib = 500 WHERE id = $1")
        .bind(vm)
        .execute(&pool)
        .await
        .unwrap();
    let enforcer = Enforcer::new(store.clone(), Duration::ZERO);
    // 200 s of 8 H100 instance GPUs is well past 1 USD: stopped at once (no grace here).
    let report = rater(&pool).pass(start + secs(200)).await.unwrap();
    let e = enforcer
        .pass(&report.charged_orgs, start + secs(200))
        .await
        .unwrap();
    assert_eq!(e.stopped, vec![vm]);
    let (state, kind, disk): (String, String, Option<i64>) =
        sqlx::query_as("SELECT state, kind, disk_gib FROM workloads WHERE id = $1")
            .bind(vm)
            .fetch_one(&pool)
            .await
            .unwrap();
    // Stopped, not terminated: the instance and its disk are still there (only its GPUs go).
    assert_eq!(
        (state.as_str(), kind.as_str(), disk),
        ("stopped", "instance", Some(500))
    );

    let mut tx = store.begin().await.unwrap();
    ledger::top_up(
        &store,
        &mut tx,
        org,
        Money::from_micros(50_000_000),
        "wire-vm",
        "bank transfer",
        start + secs(300),
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let e = enforcer
        .pass(&Default::default(), start + secs(301))
        .await
        .unwrap();
    assert_eq!(e.resumed, vec![vm]);
    let (state, disk): (String, Option<i64>) =
        sqlx::query_as("SELECT state, disk_gib FROM workloads WHERE id = $1")
            .bind(vm)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        (state.as_str(), disk),
        ("pending", Some(500)),
        "the same instance, queued again"
    );
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn a_charge_rated_after_its_months_final_invoice_goes_on_the_next_one(pool: PgPool) {
    let store = Store::new(pool.clone());
    let org = org(&pool).await;
    let now = OffsetDateTime::now_utc();
    let last = invoices::previous_month(now);
    let end = odt(last.end());
    // An H100 pod ran the last two hours of last month but half an hour of it: 22:00–23:30.
    let pod = running_pod(&pool, org, 1, end - time::Duration::hours(2)).await;
    set_state(&pool, pod, "stopped", end - time::Duration::minutes(30)).await;
    let r = rater(&pool);
    // Rating reached only 23:00 when the month closed (the rater was down, say).
    r.pass(end - time::Duration::hours(1)).await.unwrap();
    store
        .month_closing_mark(kiln_billing::convert::month_date(last))
        .await
        .unwrap();
    assert_eq!(invoices::close_month(&store, last, 10).await.unwrap(), 1);
    // The rest is rated late: onto this month's invoice, the closed one untouched.
    r.pass(now).await.unwrap();
    let closed = invoices::on_demand(&store, org, last, now, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(
        (closed.status.as_str(), closed.total_micros),
        ("final", H100_POD_HOUR)
    );
    let this = Month::of(ts(now));
    let open = invoices::on_demand(&store, org, this, now, Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(
        (open.status.as_str(), open.total_micros),
        ("draft", H100_POD_HOUR / 2)
    );
    // Every charge on exactly one invoice: the two add up to the ledger.
    let mut conn = pool.acquire().await.unwrap();
    let charged = store
        .ledger_org_charged(&mut conn, org, odt(last.start()), odt(this.end()))
        .await
        .unwrap();
    assert_eq!(closed.total_micros + open.total_micros, charged);
    assert_eq!(charged, H100_POD_HOUR * 3 / 2);
    let (late,): (String,) = sqlx::query_as(
        "SELECT description FROM ledger_postings WHERE workload_id = $1 AND at = $2",
    )
    .bind(pod)
    .bind(odt(this.start()))
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(late.contains("after that month's invoice"), "{late}");
}

/// SIGTERM to the `kiln-billing` binary while a tick is under way (held on the org's billing
/// lock, which the test holds): the tick finishes — its charges and the cursor they move are
/// committed together — and the process exits 0 instead of being cut off by its grace period.
#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn a_terminated_billing_service_finishes_the_tick_under_way(pool: PgPool) {
    let org = org(&pool).await;
    let started = kiln_billing::rater::whole_second(OffsetDateTime::now_utc()) - secs(60);
    let pod = running_pod(&pool, org, 1, started).await;
    // The test holds the org's billing lock: the service's charges wait for it.
    let mut held = pool.begin().await.unwrap();
    sqlx::query("SELECT org_id FROM billing_settings WHERE org_id = $1 FOR UPDATE")
        .bind(org)
        .execute(&mut *held)
        .await
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("billing.log");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_kiln-billing"))
        .env("DATABASE_URL", kiln_testkit::database_url(&pool).await)
        .env("KILN_BILLING_OPS_LISTEN", "127.0.0.1:0")
        .env("KILN_RATING_TICK_MS", "100")
        .env("KILN_RATING_SETTLE_MS", "0")
        // Long enough that exiting before it means the tick ran to its end.
        .env("KILN_SHUTDOWN_GRACE_SECS", "600")
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("the kiln-billing binary runs");
    kiln_testkit::eventually(
        "the service's tick to wait on the org's lock",
        Duration::from_secs(30),
        || {
            let pool = pool.clone();
            async move {
                let (waiting,): (i64,) = sqlx::query_as(
                    "SELECT count(*) FROM pg_stat_activity
                     WHERE datname = current_database() AND wait_event_type = 'Lock'",
                )
                .fetch_one(&pool)
                .await
                .ok()?;
                (waiting > 0).then_some(())
            }
        },
    )
    .await;
    assert_eq!(charged(&pool, pod).await.2, 0, "nothing posted yet");

    let pid = child.id().unwrap().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    kiln_testkit::eventually(
        "the service to take the signal",
        Duration::from_secs(30),
        || {
            let log = log.clone();
            async move {
                std::fs::read_to_string(&log)
                    .ok()?
                    .contains("shutting down")
                    .then_some(())
            }
        },
    )
    .await;
    held.rollback().await.unwrap();

    let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .expect("kiln-billing exits")
        .unwrap();
    assert!(status.success(), "{status}");
    let output = std::fs::read_to_string(&log).unwrap();
    assert!(!output.contains("grace period"), "{output}");
    // The pod's running time up to where its cursor now stands is charged, no more, no less:
    // the charges and the cursor were committed together.
    let (rated_until,): (OffsetDateTime,) =
        sqlx::query_as("SELECT rated_until FROM billing_rating_cursors WHERE workload_id = $1")
            .bind(pod)
            .fetch_one(&pool)
            .await
            .unwrap();
    let (amount, quantity, _) = charged(&pool, pod).await;
    assert!(quantity >= 60 && amount > 0, "{quantity} s, {amount} µ");
    assert_eq!(quantity, (rated_until - started).whole_seconds());
    let (unbalanced,): (i64,) =
        sqlx::query_as("SELECT COALESCE(sum(amount_micros), 0)::int8 FROM ledger_entries")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(unbalanced, 0, "every posting balanced");
}
