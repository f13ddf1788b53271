//! An endpoint end to end, every part real: the API and scheduler (in process), the gateway
//! (in process, on its own port), a `kiln-agent` process running replicas in this machine's
//! Docker. A tenant deploys the demo model, calls it through the gateway with an API key —
//! plain and streaming — and other callers are refused; deleting it stops the calls.

use std::process::Command;
use std::time::Duration;

use futures::StreamExt;
use kiln_testkit::TestApp;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sqlx::PgPool;

mod common;

use common::{ControlPlane, containers_of, demo_image, start_agent, start_gateway, until};

/// Everything an endpoint needs, real: the API and scheduler in process, the gateway, a
/// `kiln-agent` process on this machine's Docker, and a tenant (Ada) with an API key.
struct Stack {
    app: TestApp,
    control: ControlPlane,
    gateway: String,
    node: kiln_domain::NodeId,
    ada: kiln_testkit::TestUser,
    key: String,
    /// `/v1/orgs/{ada's org}/endpoints`
    endpoints: String,
    _agent: common::Agent,
    _dir: tempfile::TempDir,
}

impl Stack {
    async fn start(pool: PgPool, host_prefix: &str) -> Self {
        let app = TestApp::spawn(pool).await;
        let control = ControlPlane::start(&app).await;
        let gateway = start_gateway(&app).await;
        let dir = tempfile::tempdir().unwrap();
        let hostname = format!("{host_prefix}-{}", std::process::id());
        let (agent, node) =
            start_agent(app.store(), &control.fleet_url, &hostname, dir.path()).await;
        let ada = app.user("ada").await;
        let (_, key) = app.api_key(&ada, &ada.org_id, "member").await;
        let endpoints = format!("/v1/orgs/{}/endpoints", ada.org_id);
        Self {
            app,
            control,
            gateway,
            node,
            ada,
            key,
            endpoints,
            _agent: agent,
            _dir: dir,
        }
    }

    /// Once the node has no container left: remove the org's network, stop the scheduler.
    async fn finish(self) {
        until(
            "the replica's container to be removed",
            Duration::from_secs(30),
            async || (containers_of(&self.node.to_string()) == 0).then_some(()),
        )
        .await;
        let _ = Command::new("docker")
            .args(["network", "rm", &format!("kiln-org-{}", self.ada.org_id)])
            .output();
        self.control.stop().await;
    }
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn a_tenant_deploys_an_endpoint_and_calls_it_through_the_gateway(pool: PgPool) {
    let image = demo_image();

    let stack = Stack::start(pool, "ep-e2e").await;
    let Stack {
        app,
        gateway,
        node,
        ada,
        key,
        endpoints,
        ..
    } = &stack;
    let store = app.store().clone();
    // Bad input first: each field named.
    let (status, bad) = app
        .post(
            endpoints,
            &ada.access_token,
            json!({"name": "x", "image": image, "port": 0, "min_replicas": 3, "max_replicas": 2}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}");
    let fields: Vec<&str> = bad["errors"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["field"].as_str())
        .collect();
    assert!(
        fields.contains(&"port") && fields.contains(&"max_replicas"),
        "{bad}"
    );

    let (status, ep) = app
        .post(
            endpoints,
            &ada.access_token,
            json!({"name": "llm", "image": image, "gpu": {"type": "l40s-48gb", "count": 1},
                   "port": 8000, "health_path": "/health", "min_replicas": 1, "max_replicas": 2}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{ep}");
    let id = ep["id"].as_str().unwrap().to_owned();
    assert_eq!(
        ep["url"],
        format!("http://127.0.0.1:8090/v1/endpoints/{id}")
    );
    assert_eq!(ep["replicas"].as_array().unwrap().len(), 1);
    let call_url = format!("{gateway}/v1/endpoints/{id}/v1/completions");
    let http = reqwest::Client::new();

    // Not ready yet, or ready: a 503 with Retry-After until a replica runs.
    let ready: Value = until(
        "the endpoint to be ready",
        Duration::from_secs(60),
        async || {
            let (_, e) = app
                .get(&format!("{endpoints}/{id}"), &ada.access_token)
                .await;
            (e["state"] == "ready").then_some(e)
        },
    )
    .await;
    assert_eq!(ready["replicas"][0]["node"], node.to_string());

    let answer: Value = until(
        "the model to answer through the gateway",
        Duration::from_secs(20),
        async || {
            let r = http
                .post(&call_url)
                .bearer_auth(key)
                .json(&json!({"prompt": "kiln serves models"}))
                .send()
                .await
                .ok()?;
            (r.status() == StatusCode::OK).then_some(())?;
            r.json().await.ok()
        },
    )
    .await;
    assert_eq!(answer["choices"][0]["text"], "models serves kiln");
    assert_eq!(answer["usage"]["total_tokens"], 6);

    // Streaming passes through as it comes, not buffered: the first event arrives while the
    // model is still producing (it waits 1.5 s between words).
    let streamed = http
        .post(&call_url)
        .bearer_auth(key)
        .json(&json!({"prompt": "one two three", "stream": true, "delay_ms": 1500}))
        .send()
        .await
        .unwrap();
    assert_eq!(streamed.status(), StatusCode::OK);
    assert!(
        streamed.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut body = streamed.bytes_stream();
    let first = String::from_utf8_lossy(&body.next().await.unwrap().unwrap()).to_string();
    assert!(first.contains("three"), "{first}");
    assert!(
        !first.contains("[DONE]"),
        "the first event came alone: {first}"
    );
    let mut rest = String::new();
    while let Some(chunk) = body.next().await {
        rest.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    assert!(
        rest.contains("\"usage\"") && rest.contains("[DONE]"),
        "{rest}"
    );

    // Refusals, all problem+json: no key, another org's key, an unknown endpoint.
    let r = http.post(&call_url).json(&json!({})).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let bob = app.user("bob").await;
    let (_, bobs_key) = app.api_key(&bob, &bob.org_id, "member").await;
    let r = http
        .post(&call_url)
        .bearer_auth(&bobs_key)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::NOT_FOUND,
        "another org's endpoint is not found"
    );
    let r = http
        .post(format!(
            "{gateway}/v1/endpoints/ep_0193f0c5e8a77c3b9b1e2d5f6a7b8c9d/x"
        ))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let (status, _) = app
        .get(
            &format!("/v1/orgs/{}/endpoints/{id}", bob.org_id),
            &bob.access_token,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Metered: one event per call that got an answer (the two above), with its tokens; the
    // refused calls were never metered.
    let events: Vec<(i32, Option<i64>, Option<i64>, i64)> = until(
        "the usage events to be ingested",
        Duration::from_secs(20),
        async || {
            let rows: Vec<(i32, Option<i64>, Option<i64>, i64)> = sqlx::query_as(
                "SELECT status, prompt_tokens, completion_tokens, response_bytes
                 FROM usage_events ORDER BY occurred_at",
            )
            .fetch_all(store.pool())
            .await
            .ok()?;
            (rows.len() >= 2).then_some(rows)
        },
    )
    .await;
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[0].0, 200);
    assert_eq!((events[0].1, events[0].2), (Some(3), Some(3)));
    assert_eq!(
        (events[1].1, events[1].2),
        (Some(3), Some(3)),
        "streamed usage counted"
    );
    assert!(events.iter().all(|e| e.3 > 0));

    // Deleted: calls are 404 as soon as the gateway hears of it (a Postgres notice), and the
    // replica's container goes.
    let (status, gone) = app
        .call(
            Method::DELETE,
            &format!("{endpoints}/{id}"),
            Some(&ada.access_token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{gone}");
    assert_eq!(gone["state"], "deleted");
    until(
        "calls to the deleted endpoint to be refused",
        Duration::from_secs(10),
        async || {
            let r = http
                .post(&call_url)
                .bearer_auth(key)
                .json(&json!({}))
                .send()
                .await
                .ok()?;
            (r.status() == StatusCode::NOT_FOUND).then_some(())
        },
    )
    .await;
    stack.finish().await;
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn an_endpoint_at_zero_starts_on_the_first_call_and_goes_back_to_zero(pool: PgPool) {
    let image = demo_image();
    let stack = Stack::start(pool, "ep-cold").await;
    let Stack {
        app,
        gateway,
        ada,
        key,
        endpoints,
        ..
    } = &stack;
    let (status, ep) = app
        .post(
            endpoints,
            &ada.access_token,
            json!({"name": "cold", "image": image, "port": 8000, "min_replicas": 0,
                   "max_replicas": 1,
                   "autoscaling": {"scale_to_zero_after_s": 2, "scale_down_window_s": 0}}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{ep}");
    assert_eq!(ep["state"], "idle");
    let id = ep["id"].as_str().unwrap().to_owned();

    // The first call finds no replica: it is held while one starts, then answered.
    let started = std::time::Instant::now();
    let r = reqwest::Client::new()
        .post(format!("{gateway}/v1/endpoints/{id}/v1/completions"))
        .bearer_auth(key)
        .json(&json!({"prompt": "cold starts happen"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let answer: Value = r.json().await.unwrap();
    assert_eq!(answer["choices"][0]["text"], "happen starts cold");
    eprintln!(
        "cold start answered after {} ms",
        started.elapsed().as_millis()
    );

    // Idle: back to zero replicas, and the container goes.
    until(
        "the endpoint to scale back to zero",
        Duration::from_secs(60),
        async || {
            let (_, e) = app
                .get(&format!("{endpoints}/{id}"), &ada.access_token)
                .await;
            (e["desired_replicas"] == 0 && e["state"] == "idle").then_some(())
        },
    )
    .await;
    stack.finish().await;
}

/// Calls keep being answered when one of two replicas dies under them: idempotent calls that
/// find the dead replica's port closed go to the other; only a call caught inside the dying
/// replica can fail (502, problem+json); the dead replica comes back; every answered call is
/// metered once.
#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn calls_keep_being_answered_when_a_replica_dies_mid_traffic(pool: PgPool) {
    let image = demo_image();
    let stack = Stack::start(pool, "ep-kill").await;
    let Stack {
        app,
        gateway,
        node,
        ada,
        key,
        endpoints,
        ..
    } = &stack;
    let (status, ep) = app
        .post(
            endpoints,
            &ada.access_token,
            json!({"name": "pair", "image": image, "gpu": {"type": "l40s-48gb", "count": 1},
                   "port": 8000, "health_path": "/health", "min_replicas": 2, "max_replicas": 2}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{ep}");
    let id = ep["id"].as_str().unwrap().to_owned();
    let running = async || {
        let (_, e) = app
            .get(&format!("{endpoints}/{id}"), &ada.access_token)
            .await;
        let replicas = e["replicas"].as_array()?;
        (replicas.len() == 2 && replicas.iter().all(|r| r["state"] == "running")).then_some(())
    };
    until(
        "two replicas running",
        Duration::from_secs(90),
        async || running().await,
    )
    .await;
    let url = format!("{gateway}/v1/endpoints/{id}/v1/models");
    let http = reqwest::Client::new();
    until(
        "the gateway to route",
        Duration::from_secs(20),
        async || {
            let r = http.get(&url).bearer_auth(key).send().await.ok()?;
            (r.status() == StatusCode::OK).then_some(())
        },
    )
    .await;

    // Two callers in a loop for the whole test, each call's status recorded.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let callers: Vec<_> = (0..2)
        .map(|_| {
            let (http, url, key, stop) = (http.clone(), url.clone(), key.clone(), stop.clone());
            tokio::spawn(async move {
                let mut seen: Vec<(StatusCode, String)> = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let r = http.get(&url).bearer_auth(&key).send().await.unwrap();
                    let status = r.status();
                    let kind = r
                        .headers()
                        .get("content-type")
                        .map(|v| v.to_str().unwrap_or_default().to_owned())
                        .unwrap_or_default();
                    let _ = r.bytes().await;
                    seen.push((status, kind));
                }
                seen
            })
        })
        .collect();
    let answered = async || -> i64 {
        sqlx::query_as::<_, (i64,)>("SELECT count(*) FROM usage_events WHERE status = 200")
            .fetch_one(app.store().pool())
            .await
            .map(|(n,)| n)
            .unwrap_or(0)
    };
    until("calls to flow", Duration::from_secs(20), async || {
        (answered().await >= 50).then_some(())
    })
    .await;

    // One replica's model server dies (its process killed, as a crash would).
    let ids = Command::new("docker")
        .args(["ps", "-q", "--filter", &format!("label=kiln.node={node}")])
        .output()
        .unwrap();
    let victim = String::from_utf8_lossy(&ids.stdout)
        .lines()
        .next()
        .expect("a replica container")
        .to_owned();
    let pid = Command::new("docker")
        .args(["inspect", "-f", "{{.State.Pid}}", &victim])
        .output()
        .unwrap();
    let pid = String::from_utf8_lossy(&pid.stdout).trim().to_owned();
    let killed = Command::new("kill").args(["-9", &pid]).status().unwrap();
    assert!(killed.success(), "kill -9 {pid}");
    let at_kill = answered().await;

    // Calls go on being answered, and the dead replica comes back.
    until(
        "calls answered after the kill",
        Duration::from_secs(30),
        async || (answered().await >= at_kill + 200).then_some(()),
    )
    .await;
    until(
        "both replicas running again",
        Duration::from_secs(90),
        async || running().await,
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut seen = Vec::new();
    for c in callers {
        seen.extend(c.await.unwrap());
    }
    let ok = seen.iter().filter(|(s, _)| *s == StatusCode::OK).count() as i64;
    let failed: Vec<_> = seen.iter().filter(|(s, _)| *s != StatusCode::OK).collect();
    assert!(
        failed.len() <= 2,
        "only calls inside the dying replica may fail: {failed:?}"
    );
    assert!(
        failed
            .iter()
            .all(|(s, kind)| *s == StatusCode::BAD_GATEWAY && kind == "application/problem+json"),
        "{failed:?}"
    );
    // Metered once each: the count of answered calls settles at what the callers got (plus
    // the probe's answer).
    until(
        "every answered call metered",
        Duration::from_secs(20),
        async || (answered().await > ok).then_some(()),
    )
    .await;
    assert_eq!(answered().await, ok + 1, "no call metered twice");

    let (status, _) = app
        .call(
            Method::DELETE,
            &format!("{endpoints}/{id}"),
            Some(&ada.access_token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    stack.finish().await;
}
