//! Billing over the API: operator credits (idempotent, even raced), the signed payment webhook,
//! running out of credit end to end (charged by the billing service, stopped, 402, topped up,
//! resumed), invoices and usage that reconcile with the ledger, the price catalog.

use kiln_billing::BillingConfig;
use kiln_testkit::serde_json::{Value, json};
use kiln_testkit::{TestApp, TestUser};
use reqwest::{Method, StatusCode};
use sqlx::PgPool;
use time::OffsetDateTime;

use crate::assert_problem;

async fn credit(
    app: &TestApp,
    token: &str,
    org: &str,
    amount: i64,
    reference: &str,
) -> (StatusCode, Value) {
    app.post(
        &format!("/v1/orgs/{org}/credits"),
        token,
        json!({"amount_micros": amount, "currency": "USD", "reference": reference}),
    )
    .await
}

async fn balance(app: &TestApp, u: &TestUser) -> Value {
    let (status, b) = app
        .get(&format!("/v1/orgs/{}/balance", u.org_id), &u.access_token)
        .await;
    assert_eq!(status, StatusCode::OK, "{b}");
    b
}

/// One tick of kiln-billing at `now` (no settle delay, no grace period).
async fn bill(app: &TestApp, now: OffsetDateTime) -> kiln_billing::TickReport {
    kiln_billing::tick(app.store(), &BillingConfig::for_tests(String::new()), now)
        .await
        .unwrap()
}

/// A pod of one H100, as its agent would report it: running.
async fn running_pod(app: &TestApp, u: &TestUser, name: &str) -> String {
    let (status, pod) = app
        .post(
            &format!("/v1/orgs/{}/pods", u.org_id),
            &u.access_token,
            json!({"name": name, "image": "busybox", "gpu": {"type": "h100-80gb", "count": 1}}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{pod}");
    let id = pod["id"].as_str().unwrap().to_owned();
    let uuid = id.parse::<kiln_domain::PodId>().unwrap().as_uuid();
    sqlx::query("UPDATE workloads SET state = 'running' WHERE id = $1")
        .bind(uuid)
        .execute(app.store().pool())
        .await
        .unwrap();
    id
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn operator_credits_post_once_per_reference_even_when_eight_race(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let op = app.operator().await;
    let u = app.user("ada").await;
    let org = u.org_id.clone();
    let results =
        futures::future::join_all((0..8).map(|_| credit(&app, &op, &org, 25_000_000, "wire-0042")))
            .await;
    let created = results
        .iter()
        .filter(|(s, _)| *s == StatusCode::CREATED)
        .count();
    assert_eq!(created, 1, "{results:?}");
    assert!(results.iter().all(|(s, _)| s.is_success()));
    let ids: std::collections::BTreeSet<&str> = results
        .iter()
        .map(|(_, b)| b["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 1, "every duplicate answers the one posting");
    let b = balance(&app, &u).await;
    assert_eq!(
        b["balance"],
        json!({"amount_micros": 25_000_000, "currency": "USD"})
    );
    let (_, ledger) = app
        .get(&format!("/v1/orgs/{org}/ledger"), &u.access_token)
        .await;
    assert_eq!(ledger["items"].as_array().unwrap().len(), 1, "{ledger}");
    let entries = &ledger["items"][0]["entries"];
    let sum: i64 = entries
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["amount_micros"].as_i64().unwrap())
        .sum();
    assert_eq!(sum, 0, "a posting balances: {entries}");

    // The same reference with another amount is a conflict, not a second credit.
    let (status, body) = credit(&app, &op, &org, 1, "wire-0042").await;
    assert_problem(status, &body, StatusCode::CONFLICT);
    // Members cannot credit themselves; strangers do not learn the org exists.
    let (status, body) = credit(&app, &u.access_token, &org, 1, "self").await;
    assert_problem(status, &body, StatusCode::FORBIDDEN);
    let eve = app.user("eve").await;
    let (status, body) = credit(&app, &eve.access_token, &org, 1, "x").await;
    assert_problem(status, &body, StatusCode::NOT_FOUND);
    let (status, body) = credit(&app, &op, &org, 0, "").await;
    assert_problem(status, &body, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        balance(&app, &u).await["balance"]["amount_micros"],
        25_000_000
    );
}

async fn webhook(app: &TestApp, signature: &str, body: &str) -> (StatusCode, Value) {
    let resp = app
        .client
        .post(format!("{}/v1/billing/webhook", app.url))
        .header("content-type", "application/json")
        .header("kiln-signature", signature)
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// `KILN_BILLING_WEBHOOK_SECRET=` (set but empty, an easy slip in a compose file or a
/// Secret) must not turn into an HMAC key anyone can sign with: the webhook stays off.
#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn an_empty_webhook_secret_leaves_the_webhook_off(pool: PgPool) {
    let app = TestApp::spawn_with(pool, |c| c.billing_webhook_secret = Some(String::new())).await;
    let u = app.user("ada").await;
    let body = json!({"id": "evt_1", "type": "payment.succeeded", "org": u.org_id,
                      "amount_micros": 40_000_000, "currency": "USD"})
    .to_string();
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let forged = kiln_api::ops::billing::sign(b"", now, body.as_bytes());
    let (status, problem) = webhook(&app, &forged, &body).await;
    assert_problem(status, &problem, StatusCode::NOT_FOUND);
    assert_eq!(balance(&app, &u).await["balance"]["amount_micros"], 0);
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn the_payment_webhook_credits_once_and_refuses_bad_signatures_and_replays(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let u = app.user("ada").await;
    let secret = app.state.config.billing_webhook_secret.clone().unwrap();
    let body = json!({"id": "evt_1", "type": "payment.succeeded", "org": u.org_id,
                      "amount_micros": 40_000_000, "currency": "USD"})
    .to_string();
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let sign = |t: i64, b: &str| kiln_api::ops::billing::sign(secret.as_bytes(), t, b.as_bytes());

    // Signed with another secret, or over another body: refused, nothing credited.
    let forged = kiln_api::ops::billing::sign(b"not-the-secret", now, body.as_bytes());
    let (status, problem) = webhook(&app, &forged, &body).await;
    assert_problem(status, &problem, StatusCode::UNAUTHORIZED);
    let tampered = body.replace("40000000", "90000000");
    let (status, problem) = webhook(&app, &sign(now, &body), &tampered).await;
    assert_problem(status, &problem, StatusCode::UNAUTHORIZED);
    // A correctly signed delivery captured and replayed after the 5-minute window: refused.
    let (status, problem) = webhook(&app, &sign(now - 600, &body), &body).await;
    assert_problem(status, &problem, StatusCode::UNAUTHORIZED);
    assert!(
        problem["detail"].as_str().unwrap().contains("replay"),
        "{problem}"
    );
    assert_eq!(balance(&app, &u).await["balance"]["amount_micros"], 0);

    // The real delivery credits; redeliveries of the same event do not.
    let (status, ack) = webhook(&app, &sign(now, &body), &body).await;
    assert_eq!(status, StatusCode::OK, "{ack}");
    assert_eq!(ack["duplicate"], false);
    let (status, again) = webhook(&app, &sign(now + 1, &body), &body).await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again["duplicate"], true);
    assert_eq!(again["posting"], ack["posting"]);
    assert_eq!(
        balance(&app, &u).await["balance"]["amount_micros"],
        40_000_000
    );
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn running_out_of_credit_stops_work_refuses_new_work_and_a_top_up_resumes_it(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let op = app.operator().await;
    let u = app.user("ada").await;
    let org = u.org_id.clone();
    // A 1 USD credit limit; an H100 pod costs 2.99 USD an hour.
    let (status, body) = app
        .call(
            Method::PUT,
            &format!("/v1/admin/orgs/{org}/billing"),
            Some(&op),
            Some(json!({"credit_limit_micros": 1_000_000})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let pod = running_pod(&app, &u, "trainer").await;

    // Twenty minutes in: 0.996 USD charged, still within the limit.
    let now = OffsetDateTime::now_utc();
    let report = bill(&app, now + time::Duration::minutes(20)).await;
    assert!(report.enforcement.stopped.is_empty());
    let b = balance(&app, &u).await;
    assert!(b["balance"]["amount_micros"].as_i64().unwrap() < 0, "{b}");
    assert_eq!(b["out_of_credit"], false, "{b}");
    let (_, view) = app
        .get(&format!("/v1/orgs/{org}/pods/{pod}"), &u.access_token)
        .await;
    assert_eq!(
        view["cost_so_far"]["amount_micros"].as_i64().unwrap(),
        -b["balance"]["amount_micros"].as_i64().unwrap(),
        "the pod shows what it cost: {view}"
    );

    // An hour in: over the limit. The pod is stopped (no grace period here), new work is
    // refused with 402, and the audit log says why.
    let report = bill(&app, now + time::Duration::hours(1)).await;
    assert_eq!(report.enforcement.stopped.len(), 1);
    let (_, view) = app
        .get(&format!("/v1/orgs/{org}/pods/{pod}"), &u.access_token)
        .await;
    assert_eq!(view["state"], "stopped", "{view}");
    assert!(
        view["state_reason"]
            .as_str()
            .unwrap()
            .contains("out of credit")
    );
    let (status, problem) = app
        .post(
            &format!("/v1/orgs/{org}/pods"),
            &u.access_token,
            json!({"name": "another", "image": "busybox"}),
        )
        .await;
    assert_problem(status, &problem, StatusCode::PAYMENT_REQUIRED);
    assert_eq!(balance(&app, &u).await["out_of_credit"], true);
    let (_, audit) = app
        .get(&format!("/v1/orgs/{org}/audit-log"), &u.access_token)
        .await;
    let actions: Vec<&str> = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert!(actions.contains(&"billing.credit_exhausted"), "{actions:?}");
    assert!(
        actions.contains(&"billing.workloads_stopped"),
        "{actions:?}"
    );
    // Stopped work accrues nothing more.
    let charged = balance(&app, &u).await["balance"]["amount_micros"].clone();
    bill(&app, now + time::Duration::hours(2)).await;
    assert_eq!(balance(&app, &u).await["balance"]["amount_micros"], charged);

    // A top-up lifts the refusal at once, and the next tick queues the pod again.
    let (status, body) = credit(&app, &op, &org, 20_000_000, "top-up-1").await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) = app
        .post(
            &format!("/v1/orgs/{org}/pods"),
            &u.access_token,
            json!({"name": "another", "image": "busybox"}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let report = bill(
        &app,
        now + time::Duration::hours(2) + time::Duration::seconds(1),
    )
    .await;
    assert_eq!(report.enforcement.resumed.len(), 1);
    let (_, view) = app
        .get(&format!("/v1/orgs/{org}/pods/{pod}"), &u.access_token)
        .await;
    assert_eq!(view["state"], "pending", "{view}");
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn invoices_and_usage_reconcile_with_the_ledger_and_download(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let op = app.operator().await;
    let u = app.user("ada").await;
    let org = u.org_id.clone();
    running_pod(&app, &u, "a").await;
    running_pod(&app, &u, "b").await;
    let now = OffsetDateTime::now_utc();
    for minutes in [1, 7, 13] {
        bill(&app, now + time::Duration::minutes(minutes)).await;
    }
    let (status, inv) = app
        .post(&format!("/v1/admin/orgs/{org}/invoices"), &op, json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{inv}");
    // The ledger's charges (what was drawn from the org) equal the invoice's total.
    let (_, ledger) = app
        .get(&format!("/v1/orgs/{org}/ledger?limit=200"), &u.access_token)
        .await;
    let drawn: i64 = ledger["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["kind"] == "charge")
        .flat_map(|p| p["entries"].as_array().unwrap().clone())
        .filter(|e| e["account"].as_str().unwrap().starts_with("org:"))
        .map(|e| -e["amount_micros"].as_i64().unwrap())
        .sum();
    assert!(drawn > 0);
    assert_eq!(inv["total"]["amount_micros"].as_i64().unwrap(), drawn);
    assert_eq!(inv["lines"][0]["product"], "pod_gpu");
    assert_eq!(inv["lines"][0]["gpu_type"], "h100-80gb");
    let seconds: i64 = ledger["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["kind"] == "charge")
        .map(|p| p["quantity"].as_i64().unwrap())
        .sum();
    assert!(
        seconds >= 2 * 13 * 60,
        "both pods, 13 minutes each: {seconds}"
    );
    assert_eq!(
        inv["lines"][0]["quantity"], seconds,
        "GPU-seconds of both pods"
    );

    let (_, list) = app
        .get(&format!("/v1/orgs/{org}/invoices"), &u.access_token)
        .await;
    assert_eq!(list["items"][0]["id"], inv["id"]);
    let id = inv["id"].as_str().unwrap();
    let csv = app
        .client
        .get(format!(
            "{}/v1/orgs/{org}/invoices/{id}?format=csv",
            app.url
        ))
        .bearer_auth(&u.access_token)
        .send()
        .await
        .unwrap();
    assert!(
        csv.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/csv")
    );
    let text = csv.text().await.unwrap();
    assert!(text.contains(&format!(",total,,,,,{drawn},")), "{text}");
    let pdf = app
        .client
        .get(format!(
            "{}/v1/orgs/{org}/invoices/{id}?format=pdf",
            app.url
        ))
        .bearer_auth(&u.access_token)
        .send()
        .await
        .unwrap();
    assert_eq!(pdf.headers()["content-type"], "application/pdf");
    assert!(pdf.bytes().await.unwrap().starts_with(b"%PDF-"));

    // Usage by GPU type and by workload add up to the same money.
    for group in ["gpu_type", "workload", "day"] {
        let (status, usage) = app
            .get(
                &format!("/v1/orgs/{org}/usage?group_by={group}&to=2999-01-01"),
                &u.access_token,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{usage}");
        assert_eq!(
            usage["total"]["amount_micros"].as_i64().unwrap(),
            drawn,
            "{usage}"
        );
    }
    let (status, problem) = app
        .get(
            &format!("/v1/orgs/{org}/usage?group_by=planet"),
            &u.access_token,
        )
        .await;
    assert_problem(status, &problem, StatusCode::UNPROCESSABLE_ENTITY);

    // GraphQL answers the same balance.
    let (status, body) = app
        .call(
            Method::POST,
            "/graphql",
            Some(&u.access_token),
            Some(json!({"query": "query($o: ID!) { balance(orgId: $o) { balance { amountMicros } } }",
                        "variables": {"o": org}})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body["data"]["balance"]["balance"]["amountMicros"]
            .as_i64()
            .unwrap(),
        -drawn,
        "{body}"
    );
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn operators_version_prices_and_the_catalog_shows_those_in_effect(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let op = app.operator().await;
    let u = app.user("ada").await;
    let (status, types) = app.get("/v1/gpu-types", &u.access_token).await;
    assert_eq!(status, StatusCode::OK);
    let h100 = types
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == "h100-80gb")
        .unwrap();
    assert_eq!(
        h100["prices"]["pod"],
        json!({"amount_micros": 2_990_000, "currency": "USD"})
    );
    assert_eq!(h100["prices"]["mig"]["1g.10gb"]["amount_micros"], 450_000);

    let (status, list) = app.get("/v1/admin/prices", &op).await;
    assert_eq!(status, StatusCode::OK);
    let default_version = list["items"][0]["id"].as_str().unwrap().to_owned();
    assert_eq!(list["items"][0]["in_effect"], true);
    let (status, v) = app
        .post(
            "/v1/admin/prices",
            &op,
            json!({"effective_from": "2999-01-01T00:00:00Z", "note": "far future",
                   "gpus": [{"gpu_type": "h100-80gb", "pod_gpu_hour_micros": 1_000_000,
                             "mig_hour_micros": {"1g.10gb": 100_000}}]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    assert_eq!(v["in_effect"], false);
    // Bad versions are refused field by field; the past is history.
    let (status, problem) = app
        .post(
            "/v1/admin/prices",
            &op,
            json!({"effective_from": "2001-01-01T00:00:00Z",
                   "gpus": [{"gpu_type": "h100-80gb", "spot_discount_bps": 20000,
                             "mig_hour_micros": {"9g.1tb": 1}}]}),
        )
        .await;
    assert_problem(status, &problem, StatusCode::UNPROCESSABLE_ENTITY);
    let fields = crate::error_fields(&problem);
    assert!(fields.contains(&"effective_from".to_owned()), "{fields:?}");
    assert!(
        fields.contains(&"gpus[0].spot_discount_bps".to_owned()),
        "{fields:?}"
    );
    assert!(
        fields.contains(&"gpus[0].mig_hour_micros".to_owned()),
        "{fields:?}"
    );
    // A future version can be withdrawn; one in effect cannot.
    let id = v["id"].as_str().unwrap();
    let (status, _) = app
        .call(
            Method::DELETE,
            &format!("/v1/admin/prices/{id}"),
            Some(&op),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, problem) = app
        .call(
            Method::DELETE,
            &format!("/v1/admin/prices/{default_version}"),
            Some(&op),
            None,
        )
        .await;
    assert_problem(status, &problem, StatusCode::CONFLICT);
    // Not an operator: the admin surface does not exist.
    let (status, problem) = app.get("/v1/admin/prices", &u.access_token).await;
    assert_problem(status, &problem, StatusCode::NOT_FOUND);
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn the_console_billing_page_shows_balance_usage_and_invoices(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let op = app.operator().await;
    let u = app.user("ada").await;
    let org = u.org_id.clone();
    credit(&app, &op, &org, 12_500_000, "first").await;
    running_pod(&app, &u, "a").await;
    bill(
        &app,
        OffsetDateTime::now_utc() + time::Duration::minutes(30),
    )
    .await;
    let (_, inv) = app
        .post(&format!("/v1/admin/orgs/{org}/invoices"), &op, json!({}))
        .await;
    let cookies = format!(
        "kiln_access={}; kiln_refresh={}",
        u.access_token, u.refresh_token
    );
    let page = app
        .client
        .get(format!("{}/orgs/{org}/billing", app.url))
        .header("cookie", &cookies)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let html = page.text().await.unwrap();
    assert!(html.contains("id=\"balance-amount\""), "{html}");
    // 12.50 credited, 30 minutes of one H100 pod (1.495) charged.
    assert!(html.contains("$11.00"), "balance in dollars: {html}");
    assert!(html.contains("h100-80gb"), "usage by GPU type: {html}");
    assert!(html.contains("/ hour"), "burn rate: {html}");
    let id = inv["id"].as_str().unwrap();
    assert!(
        html.contains(&format!("/billing/invoices/{id}/pdf")),
        "{html}"
    );
    let page = app
        .client
        .get(format!("{}/orgs/{org}/billing/invoices/{id}", app.url))
        .header("cookie", &cookies)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("id=\"invoice-total\""), "{page}");
    assert!(page.contains("pod gpu"), "a line per product: {page}");
    let pdf = app
        .client
        .get(format!("{}/orgs/{org}/billing/invoices/{id}/pdf", app.url))
        .header("cookie", &cookies)
        .send()
        .await
        .unwrap();
    assert_eq!(pdf.headers()["content-type"], "application/pdf");
    // Another org's invoice is not found through the console either.
    let eve = app.user("eve").await;
    let theirs = app
        .client
        .get(format!("{}/orgs/{org}/billing", app.url))
        .header(
            "cookie",
            format!(
                "kiln_access={}; kiln_refresh={}",
                eve.access_token, eve.refresh_token
            ),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(theirs.status(), StatusCode::NOT_FOUND);
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn budget_alerts_show_in_the_balance_and_on_the_console_billing_page(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let op = app.operator().await;
    let u = app.user("ada").await;
    let org = u.org_id.clone();
    credit(&app, &op, &org, 10_000_000, "first").await;
    // A 1 USD monthly budget; an H100 pod costs 2.99 USD an hour.
    let (status, body) = app
        .call(
            Method::PUT,
            &format!("/v1/admin/orgs/{org}/billing"),
            Some(&op),
            Some(json!({"credit_limit_micros": 0, "monthly_budget_micros": 1_000_000})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(balance(&app, &u).await["budget_alert_percent"], Value::Null);
    running_pod(&app, &u, "trainer").await;
    let cookies = format!(
        "kiln_access={}; kiln_refresh={}",
        u.access_token, u.refresh_token
    );
    let console = |cookies: String| {
        let (client, url) = (
            app.client.clone(),
            format!("{}/orgs/{org}/billing", app.url),
        );
        async move {
            let page = client
                .get(url)
                .header("cookie", cookies)
                .send()
                .await
                .unwrap();
            assert_eq!(page.status(), StatusCode::OK);
            page.text().await.unwrap()
        }
    };
    assert!(
        !console(cookies.clone())
            .await
            .contains("id=\"budget-alert\"")
    );

    // Fifteen minutes in: 0.75 USD, past half the budget.
    let now = OffsetDateTime::now_utc();
    bill(&app, now + time::Duration::minutes(15)).await;
    assert_eq!(balance(&app, &u).await["budget_alert_percent"], 50);
    let html = console(cookies.clone()).await;
    assert!(html.contains("id=\"budget-alert\""), "{html}");
    assert!(html.contains("passed 50% of the monthly budget"), "{html}");

    // Twenty-five minutes in: 1.25 USD, over it. Work keeps running (a budget only alerts).
    let report = bill(&app, now + time::Duration::minutes(25)).await;
    assert!(report.enforcement.stopped.is_empty());
    let b = balance(&app, &u).await;
    assert_eq!(b["budget_alert_percent"], 100, "{b}");
    assert_eq!(b["out_of_credit"], false, "{b}");
    let html = console(cookies).await;
    assert!(html.contains("reached the monthly budget"), "{html}");

    // Another org sees none of it.
    let eve = app.user("eve").await;
    assert_eq!(
        balance(&app, &eve).await["budget_alert_percent"],
        Value::Null
    );
}
