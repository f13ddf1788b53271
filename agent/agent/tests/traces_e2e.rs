//! One trace follows a pod from the API through the scheduler to the agent: a tenant's
//! `POST …/pods` (joining the caller's `traceparent`), the placer's span, the `kiln-agent`
//! process applying the assignment, and the fleet service handling the agent's report of it.
//! A small OTLP/HTTP receiver in the test plays the collector; the API and scheduler run in
//! this process (exporting as one service), the agent is a real process exporting on its own.
//! The agent's placeholder runtime (`--docker disabled`) applies the pod: no image is needed.

use std::collections::HashMap;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use kiln_testkit::TestApp;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;
use reqwest::StatusCode;
use serde_json::json;
use sqlx::PgPool;

mod common;

use common::{Agent, ControlPlane, until};

/// A span as the collector saw it.
#[derive(Debug, Clone)]
struct Seen {
    service: String,
    name: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent_span_id: Vec<u8>,
}

/// An OTLP/HTTP (protobuf) receiver on an ephemeral port: its base URL and what it received.
async fn collector() -> (String, Arc<Mutex<Vec<Seen>>>) {
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let store = seen.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: Bytes| {
            let store = store.clone();
            async move {
                let Ok(req) = ExportTraceServiceRequest::decode(body) else {
                    return StatusCode::BAD_REQUEST;
                };
                let mut out = store.lock().unwrap();
                for rs in req.resource_spans {
                    let service = rs
                        .resource
                        .iter()
                        .flat_map(|r| &r.attributes)
                        .find(|kv| kv.key == "service.name")
                        .and_then(|kv| kv.value.as_ref())
                        .and_then(|v| match &v.value {
                            Some(opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(s)) => Some(s.clone()),
                            _ => None,
                        })
                        .unwrap_or_default();
                    for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                        out.push(Seen {
                            service: service.clone(),
                            name: span.name,
                            trace_id: span.trace_id,
                            span_id: span.span_id,
                            parent_span_id: span.parent_span_id,
                        });
                    }
                }
                StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, seen)
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn one_trace_follows_a_pod_from_the_api_to_the_agent_and_back(pool: PgPool) {
    let (otlp, seen) = collector().await;
    let telemetry = kiln_telemetry::init_tracing_to("kiln-control-plane", &otlp);

    let app = TestApp::spawn(pool).await;
    let store = app.store().clone();
    let control = ControlPlane::start(&app).await;
    let dir = tempfile::tempdir().unwrap();
    let hostname = format!("traced-{}", std::process::id());
    let token = kiln_testkit::fleet::bootstrap_token(&store, Duration::from_secs(600)).await;
    let inventory = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../inventory/inventories/l40s-2x.toml");
    let _agent = Agent(
        Command::new(env!("CARGO_BIN_EXE_kiln-agent"))
            .args(["--control-plane", &control.fleet_url])
            .args(["--nvml", "disabled", "--docker", "disabled"])
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--simulated-inventory")
            .arg(&inventory)
            .args(["--hostname", &hostname])
            .env_remove("KILN_AGENT_CONFIG")
            .env_remove("OTEL_SERVICE_NAME")
            .env("KILN_AGENT_BOOTSTRAP_TOKEN", &token)
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", &otlp)
            .env("OTEL_BSP_SCHEDULE_DELAY", "100")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("agent.log")).unwrap())
            .spawn()
            .expect("start kiln-agent"),
    );
    until(
        "the node to register",
        Duration::from_secs(30),
        async || {
            let nodes = store
                .node_list(kiln_store::PageRequest {
                    limit: 10,
                    after: None,
                })
                .await
                .ok()?;
            nodes
                .items
                .into_iter()
                .find(|n| n.hostname == hostname && n.registered_at.is_some())
        },
    )
    .await;

    // The caller's own trace: the API's request span joins it.
    let trace_hex = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let ada = app.user("ada").await;
    let res = reqwest::Client::new()
        .post(format!("{}/v1/orgs/{}/pods", app.url, ada.org_id))
        .bearer_auth(&ada.access_token)
        .header("traceparent", format!("00-{trace_hex}-{caller_span}-01"))
        .json(&json!({"name": "traced", "image": "kiln/demo:1", "gpu": {"type": "l40s-48gb", "count": 1}}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);

    let trace_id = hex(trace_hex);
    let spans = until(
        "the pod's trace to reach the agent's report",
        Duration::from_secs(60),
        async || {
            telemetry.flush();
            let spans: Vec<Seen> = seen
                .lock()
                .unwrap()
                .iter()
                .filter(|s| s.trace_id == trace_id)
                .cloned()
                .collect();
            let has = |service: &str, name: &str| {
                spans.iter().any(|s| s.service == service && s.name == name)
            };
            (has("kiln-control-plane", "request")
                && has("kiln-control-plane", "place")
                && has("kiln-agent", "apply assignment")
                && has("kiln-control-plane", "ReportObserved"))
            .then_some(spans)
        },
    )
    .await;
    let by_id: HashMap<&[u8], &Seen> = spans.iter().map(|s| (s.span_id.as_slice(), s)).collect();
    let one = |name: &str| spans.iter().find(|s| s.name == name).unwrap();
    let parent_of = |s: &Seen| {
        by_id
            .get(s.parent_span_id.as_slice())
            .map(|p| p.name.clone())
    };
    let request = one("request");
    assert_eq!(
        request.parent_span_id,
        hex(caller_span),
        "the API joins the caller's trace"
    );
    assert_eq!(parent_of(one("place")).as_deref(), Some("request"));
    assert_eq!(parent_of(one("apply assignment")).as_deref(), Some("place"));
    assert_eq!(
        parent_of(one("ReportObserved")).as_deref(),
        Some("apply assignment")
    );
    control.stop().await;
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}
