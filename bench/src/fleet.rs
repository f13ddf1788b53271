//! The fleet benchmark: one `kiln-scheduler` holding many simulated agents.
//!
//! N agents (default 10,000) are multiplexed in this process over a few HTTP/2 connections.
//! Each one joins with its own bootstrap token, registers an 8-GPU inventory, and then
//! heartbeats at the interval the control plane asks for (10 s by default), its phase spread
//! evenly so the load is steady. Figures:
//!
//! * `fleet.agents` — agents that joined, registered and heartbeated without error;
//! * `fleet.heartbeat.p50_ms` / `.p99_ms` / `.rps` / `.errors` — over the measured window;
//! * `fleet.control_plane.cpu_cores` — the scheduler process's CPU time over the window, per
//!   wall-clock second (1.0 = one core busy);
//! * `fleet.loss_detect_s` — from one agent's last heartbeat to its node being `unreachable`,
//!   with the scheduler's configured grace (`KILN_NODE_UNREACHABLE_AFTER_MS`) included.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use hdrhistogram::Histogram;
use kiln_auth::OpaqueSecret;
use kiln_proto::node::v1::node_control_client::NodeControlClient;
use kiln_proto::node::v1::{
    Gpu, GpuHealth, GpuHealthStatus, HeartbeatRequest, HostCapacity, HostInventory, JoinRequest,
    PROTOCOL_VERSION, RegisterRequest,
};
use tokio::process::{Child, Command};
use tokio::sync::Mutex;
use tokio::time::{Instant, sleep, sleep_until};
use tonic::Request;
use tonic::transport::{Channel, Endpoint};

pub struct FleetPlan {
    pub agents: u32,
    pub connections: u32,
    pub warmup: Duration,
    pub duration: Duration,
    pub heartbeat_ms: u64,
    pub unreachable_after_ms: u64,
    pub startup: Duration,
}

struct Agent {
    node_id: String,
    authorization: tonic::metadata::AsciiMetadataValue,
    gpu_uuids: Vec<String>,
}

pub async fn run(
    plan: &FleetPlan,
    scheduler_bin: &Path,
    db_url: &str,
    child: &mut Option<Child>,
    figure: impl Fn(&str, String, &str),
) -> Result<()> {
    let lost_after_ms = (plan.unreachable_after_ms * 10).to_string();
    let unreachable_after_ms = plan.unreachable_after_ms.to_string();
    let heartbeat_ms = plan.heartbeat_ms.to_string();
    let (fleet_addr, pid) = crate::server::start_scheduler(
        scheduler_bin,
        db_url,
        &[
            ("KILN_HEARTBEAT_INTERVAL_MS", &heartbeat_ms),
            ("KILN_NODE_UNREACHABLE_AFTER_MS", &unreachable_after_ms),
            ("KILN_NODE_LOST_AFTER_MS", &lost_after_ms),
        ],
        plan.startup,
        child,
    )
    .await?;

    // Tokens straight into the database, as `POST /v1/admin/node-tokens` would make them.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(db_url)
        .await
        .context("connecting to the bench database")?;
    let secrets: Vec<OpaqueSecret> = (0..plan.agents)
        .map(|_| OpaqueSecret::generate("kiln_nbt"))
        .collect();
    let digests: Vec<Vec<u8>> = secrets
        .iter()
        .map(|s| s.digest().as_bytes().to_vec())
        .collect();
    let ids: Vec<uuid::Uuid> = (0..plan.agents).map(|_| uuid::Uuid::now_v7()).collect();
    sqlx::query(
        "INSERT INTO node_bootstrap_tokens (id, token_hash, expires_at)
         SELECT id, hash, now() + interval '1 hour' FROM unnest($1::uuid[], $2::bytea[]) AS t(id, hash)",
    )
    .bind(&ids)
    .bind(&digests)
    .execute(&pool)
    .await
    .context("inserting bootstrap tokens")?;

    let channels: Vec<Channel> = {
        let mut v = Vec::new();
        for _ in 0..plan.connections {
            let ch = Endpoint::from_shared(format!("http://{fleet_addr}"))?
                .connect()
                .await
                .context("connecting to the scheduler")?;
            v.push(ch);
        }
        v
    };

    // Join and register everyone.
    let started = Instant::now();
    let joined: Vec<Result<Agent>> = futures::stream::iter(secrets.iter().enumerate())
        .map(|(i, secret)| {
            let client = NodeControlClient::new(channels[i % channels.len()].clone());
            async move { join(client, i, secret.expose()).await }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let mut agents = Vec::with_capacity(joined.len());
    for a in joined {
        agents.push(a?);
    }
    let join_secs = started.elapsed().as_secs_f64();
    eprintln!(
        "kiln-bench: {} agents joined and registered in {join_secs:.1} s",
        agents.len()
    );
    figure(
        "fleet.join_register.per_s",
        format!("{:.1}", agents.len() as f64 / join_secs),
        "agents/s",
    );

    // Heartbeats, phases spread evenly over one interval.
    let interval = Duration::from_millis(plan.heartbeat_ms);
    let begin = Instant::now();
    let window_from = begin + plan.warmup;
    let window_until = window_from + plan.duration;
    let histogram = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(
        1, 60_000_000, 3,
    )?));
    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let silenced = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let last_beat_of_victim = Arc::new(Mutex::new(None::<Instant>));
    let n = agents.len();
    let victim_node = agents[0].node_id.clone();
    let mut tasks = Vec::with_capacity(n);
    for (i, agent) in agents.into_iter().enumerate() {
        let mut client = NodeControlClient::new(channels[i % channels.len()].clone());
        let phase = interval.mul_f64(i as f64 / n as f64);
        let (histogram, ok, errors, silenced, stop, victim_last) = (
            histogram.clone(),
            ok.clone(),
            errors.clone(),
            silenced.clone(),
            stop.clone(),
            last_beat_of_victim.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut next = begin + phase;
            loop {
                sleep_until(next).await;
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                if i == 0 && silenced.load(Ordering::Relaxed) {
                    return;
                }
                let sent = Instant::now();
                let r = client.heartbeat(heartbeat(&agent)).await;
                let done = Instant::now();
                if i == 0 {
                    *victim_last.lock().await = Some(done);
                }
                let counts = sent >= window_from && done <= window_until;
                match r {
                    Ok(_) if counts => {
                        ok.fetch_add(1, Ordering::Relaxed);
                        let micros = (done - sent).as_micros().try_into().unwrap_or(u64::MAX);
                        histogram.lock().await.saturating_record(micros);
                    }
                    Ok(_) => {}
                    Err(status) => {
                        if counts {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                        if errors.load(Ordering::Relaxed) < 5 {
                            eprintln!("kiln-bench: heartbeat failed: {status}");
                        }
                    }
                }
                next += interval;
            }
        }));
    }
    eprintln!(
        "kiln-bench: {n} agents heartbeating every {:?}: {:?} warm-up, {:?} measured",
        interval, plan.warmup, plan.duration
    );
    sleep_until(window_from).await;
    let cpu_from = cpu_ticks(pid)?;
    sleep_until(window_until).await;
    let cpu_until = cpu_ticks(pid)?;
    let measured = plan.duration.as_secs_f64();
    let ticks = clock_ticks_per_second().await;
    let cores = (cpu_until - cpu_from) as f64 / ticks / measured;
    let hist = histogram.lock().await.clone();
    let ok = ok.load(Ordering::Relaxed);
    let errors = errors.load(Ordering::Relaxed);
    figure("fleet.agents", n.to_string(), "agents");
    figure(
        "fleet.heartbeat.rps",
        format!("{:.1}", ok as f64 / measured),
        "req/s",
    );
    figure(
        "fleet.heartbeat.p50_ms",
        crate::ms(hist.value_at_quantile(0.50)),
        "ms",
    );
    figure(
        "fleet.heartbeat.p99_ms",
        crate::ms(hist.value_at_quantile(0.99)),
        "ms",
    );
    figure("fleet.heartbeat.errors", errors.to_string(), "count");
    figure(
        "fleet.control_plane.cpu_cores",
        format!("{cores:.3}"),
        "cores",
    );
    if ok == 0 {
        bail!("no heartbeat succeeded");
    }

    // Loss detection: silence one agent, the rest keep beating.
    silenced.store(true, Ordering::Relaxed);
    let deadline =
        Instant::now() + Duration::from_millis(plan.unreachable_after_ms) + Duration::from_secs(60);
    let victim_uuid = victim_node
        .strip_prefix("node_")
        .and_then(|hex| uuid::Uuid::parse_str(hex).ok())
        .context("parsing the node id")?;
    let detected = loop {
        let (state,): (String,) = sqlx::query_as("SELECT state FROM nodes WHERE id = $1")
            .bind(victim_uuid)
            .fetch_one(&pool)
            .await?;
        if state == "unreachable" {
            break Instant::now();
        }
        if Instant::now() > deadline {
            bail!("the silenced node was not marked unreachable in time");
        }
        sleep(Duration::from_millis(50)).await;
    };
    let last = last_beat_of_victim
        .lock()
        .await
        .context("the victim never heartbeated")?;
    figure(
        "fleet.loss_detect_s",
        format!("{:.2}", (detected - last).as_secs_f64()),
        "s",
    );
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.abort();
    }
    pool.close().await;
    Ok(())
}

fn gpu_uuid(i: usize, g: u32) -> String {
    format!("GPU-bench-{i:06}-{g}")
}

async fn join(mut client: NodeControlClient<Channel>, i: usize, token: &str) -> Result<Agent> {
    let hostname = format!("bench-{i:06}");
    let joined = client
        .join(JoinRequest {
            bootstrap_token: token.to_owned(),
            hostname: hostname.clone(),
            agent_version: "bench".into(),
            protocol_version: Some(PROTOCOL_VERSION),
        })
        .await
        .context("join")?
        .into_inner();
    let authorization = kiln_proto::auth::bearer(&joined.node_credential)?;
    let gpu_uuids: Vec<String> = (0..8).map(|g| gpu_uuid(i, g)).collect();
    let mut register = Request::new(RegisterRequest {
        agent_version: "bench".into(),
        protocol_version: Some(PROTOCOL_VERSION),
        inventory: Some(HostInventory {
            hostname,
            driver_version: "550.90.07".into(),
            cuda_version: "12.4".into(),
            gpus: (0..8u32)
                .map(|g| Gpu {
                    index: g,
                    uuid: gpu_uuids[g as usize].clone(),
                    model: "NVIDIA H100 80GB HBM3".into(),
                    memory_mib: 81559,
                    pci_bus_id: format!("00000000:{:02X}:00.0", 0x18 + g),
                    numa_node: Some(g / 4),
                    mig_capable: true,
                    nvlink_peer_uuids: gpu_uuids
                        .iter()
                        .filter(|u| **u != gpu_uuids[g as usize])
                        .cloned()
                        .collect(),
                    gpu_type: "h100-80gb".into(),
                    ..Gpu::default()
                })
                .collect(),
        }),
        capacity: Some(HostCapacity {
            cpu_cores: 192,
            memory_mib: 2 * 1024 * 1024,
            disk_gib: 30_000,
        }),
        public_address: String::new(),
    });
    register
        .metadata_mut()
        .insert(kiln_proto::auth::AUTHORIZATION, authorization.clone());
    client.register(register).await.context("register")?;
    Ok(Agent {
        node_id: joined.node_id,
        authorization,
        gpu_uuids,
    })
}

fn heartbeat(agent: &Agent) -> Request<HeartbeatRequest> {
    let mut r = Request::new(HeartbeatRequest {
        node_id: agent.node_id.clone(),
        sent_at_unix_ms: 0,
        last_applied_revision: 0,
        gpu_health: agent
            .gpu_uuids
            .iter()
            .map(|u| GpuHealthStatus {
                uuid: u.clone(),
                health: GpuHealth::Healthy as i32,
                reason: String::new(),
            })
            .collect(),
    });
    r.metadata_mut()
        .insert(kiln_proto::auth::AUTHORIZATION, agent.authorization.clone());
    r
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name may hold spaces; fields after the closing parenthesis are fixed.
    let rest = stat.rsplit_once(')').context("parsing /proc stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11).context("utime")?.parse()?;
    let stime: u64 = fields.get(12).context("stime")?.parse()?;
    Ok(utime + stime)
}

async fn clock_ticks_per_second() -> f64 {
    let out = Command::new("getconf").arg("CLK_TCK").output().await;
    out.ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}
