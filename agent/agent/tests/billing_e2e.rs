//! Running out of credit end to end, every part real but the clock of rating: the API and
//! scheduler (in process), the gateway (in process), a `kiln-agent` process running a pod and an
//! endpoint replica in this machine's Docker, and kiln-billing's tick driven at chosen times.
//! The org's money runs out: its pod and replica are stopped (containers gone, the workloads
//! kept as `stopped`), new work and endpoint calls get 402; a top-up brings both back and the
//! endpoint answers again. Its calls were charged per request and token.

use std::process::Command;
use std::time::Duration;

use kiln_billing::BillingConfig;
use kiln_domain::Email;
use kiln_testkit::TestApp;
use reqwest::{Method, StatusCode};
use serde_json::json;
use sqlx::PgPool;
use time::OffsetDateTime;

mod common;

use common::{ControlPlane, containers_of, demo_image, start_agent, start_gateway, until};

async fn bill(app: &TestApp, at: OffsetDateTime) -> kiln_billing::TickReport {
    kiln_billing::tick(app.store(), &BillingConfig::for_tests(String::new()), at)
        .await
        .unwrap()
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn an_org_out_of_credit_is_stopped_refused_and_resumed_by_a_top_up(pool: PgPool) {
    let image = demo_image();
    let app = TestApp::spawn(pool).await;
    let store = app.store().clone();
    let control = ControlPlane::start(&app).await;
    let gateway = start_gateway(&app).await;
    let dir = tempfile::tempdir().unwrap();
    let hostname = format!("bill-e2e-{}", std::process::id());
    let (_agent, node) = start_agent(&store, &control.fleet_url, &hostname, dir.path()).await;

    // An operator gives the org 1 USD and no credit limit; an L40S costs about 1 USD an hour.
    let (email, password) = ("op@example.com", "op-correct-horse-battery");
    let hash = app.state.hasher.hash(password).unwrap();
    store
        .user_ensure_operator(&Email::parse("email", email).unwrap(), &hash)
        .await
        .unwrap();
    let op = app.login(email, password).await.0;
    let ada = app.user("ada").await;
    let org = ada.org_id.clone();
    let (status, body) = app
        .call(
            Method::PUT,
            &format!("/v1/admin/orgs/{org}/billing"),
            Some(&op),
            Some(json!({"credit_limit_micros": 0})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let top_up = async |amount: i64, reference: &str| {
        let (status, body) = app
            .post(
                &format!("/v1/orgs/{org}/credits"),
                &op,
                json!({"amount_micros": amount, "currency": "USD", "reference": reference}),
            )
            .await;
        assert!(status.is_success(), "{body}");
    };
    top_up(1_000_000, "first").await;

    let pods = format!("/v1/orgs/{org}/pods");
    let endpoints = format!("/v1/orgs/{org}/endpoints");
    let gpu = json!({"type": "l40s-48gb", "count": 1});
    let (status, pod) = app
        .post(
            &pods,
            &ada.access_token,
            json!({"name": "trainer", "image": image, "gpu": gpu, "ports": [8000]}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{pod}");
    let pod = pod["id"].as_str().unwrap().to_owned();
    let (status, ep) = app
        .post(
            &endpoints,
            &ada.access_token,
            json!({"name": "llm", "image": image, "gpu": gpu, "port": 8000,
                   "health_path": "/health", "min_replicas": 1, "max_replicas": 1}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{ep}");
    let ep = ep["id"].as_str().unwrap().to_owned();
    let (_, key) = app.api_key(&ada, &org, "member").await;
    let http = reqwest::Client::new();
    let call_url = format!("{gateway}/v1/endpoints/{ep}/v1/completions");
    let call = async || {
        http.post(&call_url)
            .bearer_auth(&key)
            .json(&json!({"prompt": "kiln serves models"}))
            .send()
            .await
            .unwrap()
    };
    let pod_state = async || {
        let (_, p) = app.get(&format!("{pods}/{pod}"), &ada.access_token).await;
        p
    };
    let both_run = async |what: &str| {
        until(what, Duration::from_secs(90), async || {
            let p = pod_state().await;
            (p["state"] == "running").then_some(())?;
            (call().await.status() == StatusCode::OK).then_some(())
        })
        .await
    };
    both_run("the pod to run and the endpoint to answer").await;
    assert_eq!(containers_of(&node.to_string()), 2);
    until(
        "the call to be metered",
        Duration::from_secs(20),
        async || {
            let (n,): (i64,) =
                sqlx::query_as("SELECT count(*) FROM usage_events WHERE status = 200")
                    .fetch_one(store.pool())
                    .await
                    .ok()?;
            (n >= 1).then_some(())
        },
    )
    .await;

    // Three hours on, two L40S have cost far more than 1 USD: out of credit, both stopped.
    let later = OffsetDateTime::now_utc() + time::Duration::hours(3);
    let report = bill(&app, later).await;
    assert!(report.rating.calls >= 1, "the calls were rated: {report:?}");
    assert_eq!(report.enforcement.stopped.len(), 2, "{report:?}");
    let p = pod_state().await;
    assert_eq!(p["state"], "stopped", "{p}");
    assert!(
        p["state_reason"]
            .as_str()
            .unwrap()
            .contains("out of credit"),
        "{p}"
    );
    until(
        "the agent to remove both containers",
        Duration::from_secs(30),
        async || (containers_of(&node.to_string()) == 0).then_some(()),
    )
    .await;
    let (_, balance) = app
        .get(&format!("/v1/orgs/{org}/balance"), &ada.access_token)
        .await;
    assert_eq!(balance["out_of_credit"], true, "{balance}");
    let refused = call().await;
    assert_eq!(refused.status(), StatusCode::PAYMENT_REQUIRED);
    assert_eq!(
        refused.headers()["content-type"],
        "application/problem+json"
    );
    let (status, problem) = app
        .post(
            &pods,
            &ada.access_token,
            json!({"name": "another", "image": image, "gpu": gpu}),
        )
        .await;
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED, "{problem}");
    // The endpoint's call was charged: per request and per token, under inference.
    let (charged,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM usage_events WHERE status = 200 AND charge_key IS NOT NULL",
    )
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert!(charged >= 1);

    // A top-up: both come back by themselves, and the endpoint answers again.
    top_up(100_000_000, "second").await;
    let report = bill(&app, later + time::Duration::seconds(1)).await;
    assert_eq!(report.enforcement.restored.len(), 1, "{report:?}");
    both_run("the pod and the endpoint to come back after the top-up").await;
    let (_, balance) = app
        .get(&format!("/v1/orgs/{org}/balance"), &ada.access_token)
        .await;
    assert_eq!(balance["out_of_credit"], false, "{balance}");

    for path in [format!("{pods}/{pod}"), format!("{endpoints}/{ep}")] {
        let (status, body) = app
            .call(Method::DELETE, &path, Some(&ada.access_token), None)
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    }
    until(
        "the containers to be removed",
        Duration::from_secs(30),
        async || (containers_of(&node.to_string()) == 0).then_some(()),
    )
    .await;
    let _ = Command::new("docker")
        .args(["network", "rm", &format!("kiln-org-{org}")])
        .output();
    control.stop().await;
}
