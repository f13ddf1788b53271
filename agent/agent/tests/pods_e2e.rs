//! A pod end to end, every part real: the API (in process), the scheduler (in process), a
//! `kiln-agent` process with the Docker runtime, and the machine's Docker engine running the
//! demo model image the local stack builds. A tenant creates a pod over HTTP, it is placed,
//! started, reachable on the port the API reports; the agent stopped (SIGTERM) exits 0 and
//! leaves the container running, and a new agent adopts it; deleting the pod frees the GPU and
//! removes the container.

use std::process::Command;
use std::time::Duration;

use kiln_testkit::TestApp;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sqlx::PgPool;

mod common;

use common::{ControlPlane, containers_of, demo_image, start_agent, until};

/// The assignment a pod is placed as (its container is `kiln-<assignment>`).
async fn running_assignment(store: &kiln_store::Store, pod: &str) -> String {
    let pod: kiln_domain::PodId = pod.parse().unwrap();
    let (a,): (uuid::Uuid,) = sqlx::query_as("SELECT assignment_id FROM workloads WHERE id = $1")
        .bind(pod.as_uuid())
        .fetch_one(store.pool())
        .await
        .unwrap();
    kiln_domain::AssignmentId::from_uuid(a).to_string()
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn a_tenant_runs_a_pod_reaches_it_and_deletes_it(pool: PgPool) {
    let image = demo_image();

    let app = TestApp::spawn(pool).await;
    let store = app.store().clone();
    let control = ControlPlane::start(&app).await;
    let dir = tempfile::tempdir().unwrap();
    let hostname = format!("e2e-{}", std::process::id());
    let (agent, node) = start_agent(&store, &control.fleet_url, &hostname, dir.path()).await;

    let ada = app.user("ada").await;
    let pods = format!("/v1/orgs/{}/pods", ada.org_id);
    let (status, pod) = app
        .post(
            &pods,
            &ada.access_token,
            json!({
                "name": "demo", "image": image, "gpu": {"type": "l40s-48gb", "count": 1},
                "ports": [8000], "restart_policy": "always",
                "env": {"BANNER": "hello from the tenant", "HF_TOKEN": {"value": "hf_sekrit_42", "secret": true}},
            }),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{pod}");
    assert_eq!(pod["restart_policy"], "always");
    let id = pod["id"].as_str().unwrap().to_owned();

    // Follow the output from the start, over SSE, while the pod starts.
    let follow_url = format!("{}{pods}/{id}/logs?follow=true&tail=0", app.url);
    let follow = reqwest::Client::new()
        .get(&follow_url)
        .bearer_auth(&ada.access_token)
        .send()
        .await
        .unwrap();
    assert_eq!(follow.status(), StatusCode::OK);
    assert!(
        follow.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut follow = follow.bytes_stream();

    let running: Value = until(
        "the pod to run with its port published",
        Duration::from_secs(60),
        async || {
            let (_, p) = app.get(&format!("{pods}/{id}"), &ada.access_token).await;
            (p["state"] == "running" && p["ports"][0]["host_port"].is_u64()).then_some(p)
        },
    )
    .await;
    assert_eq!(running["node"], node.to_string());
    assert_eq!(running["gpus"].as_array().unwrap().len(), 1);
    // Reached through the address the API reports (the agent's public address).
    let host = running["ports"][0]["host"].as_str().unwrap().to_owned();
    assert_eq!(host, "127.0.0.1", "{running}");
    let port = running["ports"][0]["host_port"].as_u64().unwrap();
    let answer: Value = until("the model to answer", Duration::from_secs(20), async || {
        let r = reqwest::Client::new()
            .post(format!("http://{host}:{port}/v1/completions"))
            .json(&json!({"prompt": "kiln runs pods"}))
            .send()
            .await
            .ok()?;
        r.json().await.ok()
    })
    .await;
    assert_eq!(answer["choices"][0]["text"], "pods runs kiln");

    // Its output reaches the tenant: the env-driven banner and the request just served, live
    // on the follow stream and in the recent lines.
    let mut seen = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !(seen.contains("banner: hello from the tenant")
        && seen.contains("POST /v1/completions 200"))
    {
        use futures::StreamExt;
        let chunk = tokio::time::timeout_at(deadline, follow.next())
            .await
            .unwrap_or_else(|_| panic!("the followed output within 30 s; got {seen:?}"))
            .expect("the stream stays open while the pod runs")
            .unwrap();
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(seen.contains("event: log"), "{seen}");
    let recent = reqwest::Client::new()
        .get(format!("{}{pods}/{id}/logs?tail=50", app.url))
        .bearer_auth(&ada.access_token)
        .send()
        .await
        .unwrap();
    assert_eq!(recent.status(), StatusCode::OK);
    let recent = recent.text().await.unwrap();
    assert!(
        recent.contains("banner: hello from the tenant\n"),
        "{recent}"
    );
    assert!(recent.contains("POST /v1/completions 200\n"), "{recent}");

    // The secret reached the container, and nothing echoes it: not the API, not the stored
    // assignment the agent was sent.
    let inspect = Command::new("docker")
        .args([
            "inspect",
            "--format",
            "{{json .Config.Env}}",
            &format!("kiln-{}", running_assignment(&store, &id).await),
        ])
        .output()
        .unwrap();
    let env_inside = String::from_utf8_lossy(&inspect.stdout).to_string();
    assert!(env_inside.contains("HF_TOKEN=hf_sekrit_42"), "{env_inside}");
    assert!(
        env_inside.contains("BANNER=hello from the tenant"),
        "{env_inside}"
    );
    let (_, shown) = app.get(&format!("{pods}/{id}"), &ada.access_token).await;
    assert!(!shown.to_string().contains("hf_sekrit_42"), "{shown}");
    assert_eq!(shown["env"]["HF_TOKEN"], json!({"secret": true}));
    let stored: Vec<(Vec<u8>,)> = sqlx::query_as("SELECT spec FROM node_assignments")
        .fetch_all(store.pool())
        .await
        .unwrap();
    assert!(!stored.is_empty());
    for (spec,) in stored {
        assert!(
            !String::from_utf8_lossy(&spec).contains("hf_sekrit_42"),
            "the assignment log holds the secret only sealed"
        );
    }
    assert_eq!(containers_of(&node.to_string()), 1);
    // On its org's own network.
    let nets = Command::new("docker")
        .args([
            "ps",
            "--filter",
            &format!("label=kiln.node={node}"),
            "--format",
            "{{.Networks}}",
        ])
        .output()
        .unwrap();
    let org_net = format!("kiln-org-{}", ada.org_id);
    assert_eq!(String::from_utf8_lossy(&nets.stdout).trim(), org_net);

    // Stopping the agent (an upgrade, a restart of the unit: SIGTERM, KillMode=process) leaves
    // the workload running; the next agent adopts the same container.
    let container = format!("kiln-{}", running_assignment(&store, &id).await);
    let container_state = || {
        let out = Command::new("docker")
            .args([
                "inspect",
                "--format",
                "{{.Id}} {{.State.Running}}",
                &container,
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let before = container_state();
    assert!(before.ends_with(" true"), "{before}");
    let mut agent = agent;
    assert!(
        Command::new("kill")
            .args(["-TERM", &agent.0.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let exited = until("the agent to exit", Duration::from_secs(60), async || {
        agent.0.try_wait().unwrap()
    })
    .await;
    assert_eq!(exited.code(), Some(0), "{exited}");
    assert_eq!(container_state(), before, "still running, untouched");
    let r = reqwest::Client::new()
        .post(format!("http://{host}:{port}/v1/completions"))
        .json(&json!({"prompt": "kiln runs pods"}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::OK,
        "served with no agent on the node"
    );
    drop(agent);
    let (since,): (time::OffsetDateTime,) = sqlx::query_as("SELECT now()")
        .fetch_one(store.pool())
        .await
        .unwrap();
    let (_agent, again) = start_agent(&store, &control.fleet_url, &hostname, dir.path()).await;
    assert_eq!(again, node);
    until(
        "the new agent to report the pod",
        Duration::from_secs(30),
        async || {
            // Its report comes after its reconcile of what Docker runs.
            let (at, state): (time::OffsetDateTime, String) =
                sqlx::query_as("SELECT reported_at, state FROM node_observed WHERE node_id = $1")
                    .bind(node.as_uuid())
                    .fetch_one(store.pool())
                    .await
                    .ok()?;
            (at > since && state == "running").then_some(())
        },
    )
    .await;
    assert_eq!(container_state(), before, "adopted, not recreated");
    let (_, p) = app.get(&format!("{pods}/{id}"), &ada.access_token).await;
    assert_eq!(p["state"], "running", "{p}");

    let (status, body) = app
        .call(
            Method::DELETE,
            &format!("{pods}/{id}"),
            Some(&ada.access_token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    until(
        "the container to be removed",
        Duration::from_secs(30),
        async || (containers_of(&node.to_string()) == 0).then_some(()),
    )
    .await;
    let (_, p) = app.get(&format!("{pods}/{id}"), &ada.access_token).await;
    assert_eq!(p["state"], "terminated");
    // The follow stream ends with the pod.
    until(
        "the follow stream to end",
        Duration::from_secs(30),
        async || {
            use futures::StreamExt;
            match tokio::time::timeout(Duration::from_secs(5), follow.next()).await {
                Ok(None) | Ok(Some(Err(_))) => Some(()),
                _ => None,
            }
        },
    )
    .await;
    assert_eq!(p["gpus"], json!([]));

    let _ = Command::new("docker")
        .args(["network", "rm", &org_net])
        .output();
    control.stop().await;
}
