//! Helpers shared by the end-to-end tests that run a real `kiln-agent` process.
#![allow(dead_code)]

use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// A `kiln-agent` child, killed when dropped.
pub struct Agent(pub Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls `check` every 100 ms until it answers, or panics after `within`.
pub async fn until<T>(
    what: &str,
    within: Duration,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            start.elapsed() < within,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How many containers of `node` exist (running or not).
pub fn containers_of(node: &str) -> usize {
    let out = Command::new("docker")
        .args(["ps", "-aq", "--filter", &format!("label=kiln.node={node}")])
        .output()
        .expect("docker ps");
    String::from_utf8_lossy(&out.stdout).lines().count()
}

/// The demo model image the local stack builds (cached after the first build).
pub fn demo_image() -> String {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let built = Command::new(format!("{root}/scripts/build-images.sh"))
        .output()
        .expect("scripts/build-images.sh");
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    String::from_utf8_lossy(&built.stdout).trim().to_owned()
}

/// A `kiln-scheduler` in process beside `app` (its Redis namespace and secrets key), with
/// quick ticks; stops when the returned sender is dropped or sent to.
pub struct ControlPlane {
    /// Where agents dial in.
    pub fleet_url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl ControlPlane {
    pub async fn start(app: &kiln_testkit::TestApp) -> Self {
        let fleet_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ops_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let fleet_url = format!("http://{}", fleet_listener.local_addr().unwrap());
        let config = kiln_scheduler::SchedulerConfig {
            fleet_listen: fleet_listener.local_addr().unwrap(),
            ops_listen: ops_listener.local_addr().unwrap(),
            database_url: String::new(),
            db_max_connections: 8,
            liveness_database_url: None,
            heartbeat_interval_ms: 500,
            node_unreachable_after_ms: 10_000,
            node_lost_after_ms: 60_000,
            lifecycle_tick_ms: 200,
            placement_tick_ms: 200,
            autoscale_tick_ms: 200,
            node_credential_cache_ms: 60_000,
            // The API's Redis namespace (logs) and secrets key (secret env values).
            redis_url: Some(kiln_testkit::redis_url()),
            redis_namespace: app.config().redis_namespace.clone(),
            secrets_key: app.config().secrets_key.clone(),
            shutdown_grace_secs: 25,
        };
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(
            kiln_scheduler::Scheduler {
                store: app.store().clone(),
                config,
                fleet_listener,
                ops_listener,
            }
            .run(async {
                let _ = stop_rx.await;
            }),
        );
        Self {
            fleet_url,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Stop the scheduler and wait for it.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }
}

/// A `kiln-gateway` in process beside `app` (its store and Redis namespace), metering into
/// Redis with its ingester running and enforcing limits (which records the load the
/// scheduler's autoscaler reads): the base URL callers use.
pub async fn start_gateway(app: &kiln_testkit::TestApp) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let namespace = app.config().redis_namespace.clone();
    let meter = kiln_gateway::metering::Meter::connect(&kiln_testkit::redis_url(), &namespace)
        .await
        .unwrap();
    let ingester = kiln_gateway::metering::Ingester::new(
        app.store().clone(),
        &kiln_testkit::redis_url(),
        &namespace,
    )
    .unwrap();
    tokio::spawn(ingester.run());
    let admission =
        kiln_ratelimit::admission::Admission::connect(&kiln_testkit::redis_url(), &namespace)
            .await
            .unwrap();
    let state = kiln_gateway::GatewayState::new(app.store().clone())
        .with_meter(meter)
        .with_admission(admission);
    tokio::spawn(async move {
        axum::serve(listener, kiln_gateway::app(state))
            .await
            .unwrap();
    });
    url
}

/// A `kiln-agent` process with a simulated 2× L40S inventory and the Docker runtime, joined to
/// `fleet_url` as `hostname` (public address 127.0.0.1), once it has registered: the agent and
/// its node id. Its log is in `dir`.
pub async fn start_agent(
    store: &kiln_store::Store,
    fleet_url: &str,
    hostname: &str,
    dir: &std::path::Path,
) -> (Agent, kiln_domain::NodeId) {
    start_agent_with(store, fleet_url, hostname, dir, None).await
}

/// [`start_agent`] with a config file (`--config`) under the flags.
pub async fn start_agent_with(
    store: &kiln_store::Store,
    fleet_url: &str,
    hostname: &str,
    dir: &std::path::Path,
    config: Option<&std::path::Path>,
) -> (Agent, kiln_domain::NodeId) {
    let token = kiln_testkit::fleet::bootstrap_token(store, Duration::from_secs(600)).await;
    let inventory = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../inventory/inventories/l40s-2x.toml");
    let agent = Agent(
        Command::new(env!("CARGO_BIN_EXE_kiln-agent"))
            .args([
                "--control-plane",
                fleet_url,
                "--nvml",
                "disabled",
                "--docker",
                "auto",
            ])
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--simulated-inventory")
            .arg(&inventory)
            .args(["--hostname", hostname, "--public-address", "127.0.0.1"])
            .args(
                config
                    .map(|c| ["--config".as_ref(), c.as_os_str()])
                    .into_iter()
                    .flatten(),
            )
            .env_remove("KILN_AGENT_CONFIG")
            .env("KILN_AGENT_BOOTSTRAP_TOKEN", &token)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.join("agent.log")).unwrap())
            .spawn()
            .expect("start kiln-agent"),
    );
    let node = until(
        "the node to register its GPUs",
        Duration::from_secs(30),
        async || {
            let nodes = store
                .node_list(kiln_store::PageRequest {
                    limit: 10,
                    after: None,
                })
                .await
                .ok()?;
            let n = nodes.items.into_iter().find(|n| n.hostname == hostname)?;
            n.registered_at.is_some().then_some(n.id)
        },
    )
    .await;
    (agent, node)
}

/// Kills every QEMU the VM directory it names knows (by the pids in `meta.json`), also when
/// the test fails: VMs outlive their runtime by design.
pub struct KillVms(pub std::path::PathBuf);

impl Drop for KillVms {
    fn drop(&mut self) {
        for d in std::fs::read_dir(&self.0).into_iter().flatten().flatten() {
            let meta = std::fs::read(d.path().join("meta.json")).unwrap_or_default();
            if let Some(pid) = serde_json::from_slice::<serde_json::Value>(&meta)
                .ok()
                .and_then(|m| m["pid"].as_u64())
            {
                let _ = Command::new("kill")
                    .args(["-9", &pid.to_string()])
                    .stderr(std::process::Stdio::null())
                    .status();
            }
        }
    }
}

/// Runs `cmd`, asserting it succeeds; its output.
pub fn run(cmd: &mut Command) -> std::process::Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (run scripts/ensure-packages.sh all)"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The project's VM guest (scripts/build-vm-image.sh, cached after the first build): the
/// directory with its kernel, initramfs and disk.
pub fn vm_image() -> std::path::PathBuf {
    let out = run(Command::new("bash")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../scripts/build-vm-image.sh"
        ))
        .stderr(std::process::Stdio::inherit()));
    std::path::PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}
