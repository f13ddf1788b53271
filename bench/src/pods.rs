//! Pods end to end on this machine's Docker engine: a tenant's `POST …/pods` until the API's
//! own event stream says `running`.
//!
//! Real `kiln-api`, `kiln-scheduler` and `kiln-agent` processes (the agent with a simulated
//! 8× H100 inventory and the Docker runtime) over a throw-away database; the image is the
//! local demo image (`scripts/build-images.sh`), so nothing is pulled. Pods are created one at
//! a time (each deleted, and its container gone, before the next), so each figure is one pod's
//! path through every part, not a queue. Figures:
//!
//! * `pods.create_to_running_ms.p50` / `.p99` — from sending the POST to receiving the
//!   `running` event on `GET …/pods/{pod}/events` (opened right after the POST answers);
//! * `pods.control_plane_overhead_ms.p50` / `.p99` — the same minus the time the agent spent
//!   inside Docker API calls for that pod (network, create, start; `runtime_ms`, reported with
//!   the observation): what Kiln itself adds (API, scheduler, fleet stream, agent, reports,
//!   notifications);
//! * `pods.docker_ms.p50` — the Docker part, for scale;
//! * `endpoints.cold_start_ms` (p50) and `.max` — an endpoint scaled to zero (min 0, idle
//!   after 1 s) called through a real `kiln-gateway`: from sending the call to its answer,
//!   which takes the autoscaler's reading, placement, the agent starting the container and
//!   the model server listening. Each call waits for the endpoint to be back at zero first.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::process::{Child, Command};
use tokio::time::Instant;
use uuid::Uuid;

pub struct PodsPlan {
    pub pods: u32,
    pub warmup: u32,
    pub image: String,
    pub startup: Duration,
}

pub struct Binaries<'a> {
    pub api: &'a Path,
    pub scheduler: &'a Path,
    pub agent: &'a Path,
    pub gateway: &'a Path,
}

pub async fn run(
    plan: &PodsPlan,
    bins: &Binaries<'_>,
    db_url: &str,
    redis_url: &str,
    run_id: &str,
    children: &mut Vec<Child>,
    figure: impl Fn(&str, String, &str),
) -> Result<()> {
    let image_ok = Command::new("docker")
        .args(["image", "inspect", &plan.image])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .context("running docker")?
        .success();
    if !image_ok {
        bail!(
            "image {} is not here: run scripts/build-images.sh",
            plan.image
        );
    }
    crate::server::migrate(bins.api, db_url, plan.startup).await?;
    let mut slot = None;
    let api =
        crate::server::start(bins.api, db_url, redis_url, run_id, plan.startup, &mut slot).await;
    children.extend(slot.take());
    let base = format!("http://{}", api?.addr);
    let namespace = format!("bench-{run_id}");
    let started = crate::server::start_scheduler(
        bins.scheduler,
        db_url,
        &[
            ("REDIS_URL", redis_url),
            ("KILN_REDIS_NAMESPACE", &namespace),
        ],
        plan.startup,
        &mut slot,
    )
    .await;
    children.extend(slot.take());
    let (fleet, _) = started?;

    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(db_url)
        .await
        .context("connecting to the bench database")?;
    let token = crate::stack::bootstrap_token(&pool).await?;
    let state_dir = std::env::temp_dir().join(format!("kiln-bench-agent-{run_id}"));
    let hostname = format!("bench-pods-{run_id}");
    let agent = crate::stack::spawn_agent(
        bins.agent,
        (fleet, &hostname),
        &state_dir,
        &token,
        "auto",
        &[],
    )?;
    children.push(agent);
    let gateway_addr = crate::server::free_port()?;
    children.push(
        Command::new(bins.gateway)
            .env("DATABASE_URL", db_url)
            .env("REDIS_URL", redis_url)
            .env("KILN_REDIS_NAMESPACE", &namespace)
            .env("KILN_GATEWAY_LISTEN", gateway_addr.to_string())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::from(std::io::stderr()))
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("starting kiln-gateway")?,
    );
    let gateway = format!("http://{gateway_addr}");
    let outcome = measure(plan, (&base, &gateway), &pool, &hostname, figure).await;
    // The agent's containers and the org network go with the run.
    let node: Option<(Uuid,)> = sqlx::query_as("SELECT id FROM nodes WHERE hostname = $1")
        .bind(&hostname)
        .fetch_optional(&pool)
        .await
        .unwrap_or(None);
    if let Some((node,)) = node {
        let node = format!("node_{}", node.simple());
        remove_containers(&node).await;
    }
    let _ = std::fs::remove_dir_all(&state_dir);
    outcome
}

async fn remove_containers(node: &str) {
    let ids = Command::new("docker")
        .args(["ps", "-aq", "--filter", &format!("label=kiln.node={node}")])
        .output()
        .await;
    if let Ok(out) = ids {
        for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = Command::new("docker").args(["rm", "-f", id]).output().await;
        }
    }
}

async fn measure(
    plan: &PodsPlan,
    (base, gateway): (&str, &str),
    pool: &sqlx::PgPool,
    hostname: &str,
    figure: impl Fn(&str, String, &str),
) -> Result<()> {
    crate::stack::registered(pool, hostname).await?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()?;
    let (token, org) = crate::stack::tenant(&http, base, "Pods Bench").await?;
    let pods = format!("{base}/v1/orgs/{org}/pods");

    let mut total = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    let mut overhead = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    let mut docker = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    for i in 0..plan.warmup + plan.pods {
        let t0 = Instant::now();
        let created: Value = http
            .post(&pods)
            .bearer_auth(&token)
            .json(&json!({
                "name": format!("bench-{i}"),
                "image": plan.image,
                "gpu": {"type": "h100-80gb", "count": 1},
                "ports": [8000],
            }))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let id = created["id"].as_str().context("no pod id")?.to_owned();
        let mut events = http
            .get(format!("{pods}/{id}/events"))
            .bearer_auth(&token)
            .send()
            .await?
            .error_for_status()?
            .bytes_stream();
        let mut buf = String::new();
        let ran = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(chunk) = events.next().await {
                buf.push_str(&String::from_utf8_lossy(&chunk?));
                while let Some(end) = buf.find("\n\n") {
                    let block: String = buf.drain(..end + 2).collect();
                    let data: String = block
                        .lines()
                        .filter_map(|l| l.strip_prefix("data:"))
                        .map(str::trim)
                        .collect();
                    if let Ok(v) = serde_json::from_str::<Value>(&data) {
                        match v["state"].as_str() {
                            Some("running") => return Ok(true),
                            Some("failed" | "terminated" | "stopped") => {
                                bail!("pod {id} ended: {}", v["state_reason"])
                            }
                            _ => {}
                        }
                    }
                }
            }
            Ok(false)
        })
        .await
        .context("a pod did not run within 60 s")??;
        if !ran {
            bail!("the event stream of pod {id} ended before it ran");
        }
        let elapsed = t0.elapsed();
        let pod_uuid = id
            .strip_prefix("pod_")
            .and_then(|u| Uuid::parse_str(u).ok())
            .context("a pod id that is not pod_<uuid>")?;
        let (runtime_ms,): (i64,) = sqlx::query_as(
            "SELECT o.runtime_ms FROM node_observed o JOIN workloads w ON w.assignment_id = o.assignment_id
             WHERE w.id = $1",
        )
        .bind(pod_uuid)
        .fetch_one(pool)
        .await
        .context("reading the pod's observation")?;
        if i >= plan.warmup {
            let total_us = elapsed.as_micros() as u64;
            let docker_us = (runtime_ms.max(0) as u64) * 1000;
            total.record(total_us.max(1))?;
            docker.record(docker_us.max(1))?;
            overhead.record(total_us.saturating_sub(docker_us).max(1))?;
        }
        let assignment: (Option<Uuid>,) =
            sqlx::query_as("SELECT assignment_id FROM workloads WHERE id = $1")
                .bind(pod_uuid)
                .fetch_one(pool)
                .await?;
        http.delete(format!("{pods}/{id}"))
            .bearer_auth(&token)
            .send()
            .await?
            .error_for_status()?;
        // The container is gone (the agent reports it stopped) before the next pod starts.
        if let Some(a) = assignment.0 {
            crate::stack::until(
                "the pod's container to go",
                Duration::from_secs(60),
                async || {
                    let r: Option<(String,)> =
                        sqlx::query_as("SELECT state FROM node_observed WHERE assignment_id = $1")
                            .bind(a)
                            .fetch_optional(pool)
                            .await?;
                    Ok(r.filter(|(s,)| s == "stopped").map(|_| ()))
                },
            )
            .await?;
        }
    }
    let ms = |us: u64| format!("{:.1}", us as f64 / 1000.0);
    eprintln!(
        "kiln-bench: {} pods created one at a time on a simulated 8× H100 host with the local image",
        plan.pods
    );
    figure(
        "pods.create_to_running_ms.p50",
        ms(total.value_at_quantile(0.5)),
        "ms",
    );
    figure(
        "pods.create_to_running_ms.p99",
        ms(total.value_at_quantile(0.99)),
        "ms",
    );
    figure(
        "pods.control_plane_overhead_ms.p50",
        ms(overhead.value_at_quantile(0.5)),
        "ms",
    );
    figure(
        "pods.control_plane_overhead_ms.p99",
        ms(overhead.value_at_quantile(0.99)),
        "ms",
    );
    figure(
        "pods.docker_ms.p50",
        ms(docker.value_at_quantile(0.5)),
        "ms",
    );
    cold_starts(plan, &http, (base, gateway), (&org, &token), figure).await
}

/// `endpoints.cold_start_ms`: calls to an endpoint at zero replicas (see the module docs).
async fn cold_starts(
    plan: &PodsPlan,
    http: &reqwest::Client,
    (base, gateway): (&str, &str),
    (org, token): (&str, &str),
    figure: impl Fn(&str, String, &str),
) -> Result<()> {
    let key: Value = http
        .post(format!("{base}/v1/orgs/{org}/api-keys"))
        .bearer_auth(token)
        .json(&json!({"name": "cold-start", "role": "member"}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let key = key["key"].as_str().context("no key secret")?.to_owned();
    let endpoint: Value = http
        .post(format!("{base}/v1/orgs/{org}/endpoints"))
        .bearer_auth(token)
        .json(&json!({
            "name": "cold", "image": plan.image, "port": 8000, "health_path": "/health",
            "gpu": {"type": "h100-80gb", "count": 1}, "min_replicas": 0, "max_replicas": 1,
            "autoscaling": {"scale_to_zero_after_s": 1, "scale_down_window_s": 0},
        }))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let id = endpoint["id"]
        .as_str()
        .context("no endpoint id")?
        .to_owned();
    let get = format!("{base}/v1/orgs/{org}/endpoints/{id}");
    let mut hist = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    let calls = plan.pods.clamp(3, 10);
    for _ in 0..calls {
        crate::stack::until(
            "the endpoint to be back at zero",
            Duration::from_secs(120),
            async || {
                let e: Value = http
                    .get(&get)
                    .bearer_auth(token)
                    .send()
                    .await?
                    .json()
                    .await?;
                Ok((e["desired_replicas"] == 0
                    && e["replicas"].as_array().is_some_and(|r| r.is_empty()))
                .then_some(()))
            },
        )
        .await?;
        let t0 = Instant::now();
        let answer = http
            .post(format!("{gateway}/v1/endpoints/{id}/v1/completions"))
            .bearer_auth(&key)
            .json(&json!({"prompt": "cold starts happen"}))
            .send()
            .await?;
        if !answer.status().is_success() {
            bail!("a cold call was answered {}", answer.status());
        }
        answer.bytes().await?;
        hist.record((t0.elapsed().as_micros() as u64).max(1))?;
    }
    let ms = |us: u64| format!("{:.1}", us as f64 / 1000.0);
    eprintln!("kiln-bench: {calls} calls to an endpoint at zero replicas");
    figure(
        "endpoints.cold_start_ms",
        ms(hist.value_at_quantile(0.5)),
        "ms",
    );
    figure("endpoints.cold_start_ms.max", ms(hist.max()), "ms");
    http.delete(&get).bearer_auth(token).send().await?;
    Ok(())
}
