//! The fleet's lifecycle with real processes: a real `kiln-scheduler` (in process, serving on a
//! veth address) and real `kiln-agent` processes, one of them in its own network namespace.
//!
//! One scenario, in order, because each step is slow to set up and they share the fleet:
//! a forged token is refused; three agents of different GPU types join; one is SIGKILLed and is
//! marked unreachable, then lost (its work handed back), within the configured times; it
//! restarts and resumes its stream without replaying what it had applied; the namespaced one
//! has its link cut, goes the same way, and heals when the link comes back; a simulated GPU
//! fault takes exactly that GPU out of capacity and back.
//!
//! Needs root (network namespaces and veth, from iproute2): `make test` runs as root here.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln_domain::{AssignmentId, NodeId};
use kiln_proto::node::v1::{Assignment, PodSpec, assignment};
use kiln_scheduler::{Scheduler, SchedulerConfig};
use kiln_store::Store;
use kiln_testkit::fleet;
use prost::Message;
use sqlx::PgPool;

const UNREACHABLE_MS: u64 = 2_000;
const LOST_MS: u64 = 5_000;

/// A network namespace joined to the host by a veth pair; removed on drop.
struct Netns {
    name: String,
    host_if: String,
    host_ip: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("run ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Netns {
    fn create() -> Self {
        let tag = std::process::id() % 100_000;
        let name = format!("kiln-e2e-{tag}");
        let (host_if, ns_if) = (format!("kh{tag}"), format!("kn{tag}"));
        let octet = tag % 250 + 1;
        let host_ip = format!("10.213.{octet}.1");
        let ns_ip = format!("10.213.{octet}.2");
        // A namespace left by a crashed run of the same pid is in the way.
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
        ]);
        ip(&["link", "set", &ns_if, "netns", &name]);
        ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &host_if]);
        ip(&["link", "set", &host_if, "up"]);
        ip(&[
            "netns",
            "exec",
            &name,
            "ip",
            "addr",
            "add",
            &format!("{ns_ip}/30"),
            "dev",
            &ns_if,
        ]);
        ip(&["netns", "exec", &name, "ip", "link", "set", &ns_if, "up"]);
        ip(&["netns", "exec", &name, "ip", "link", "set", "lo", "up"]);
        Self {
            name,
            host_if,
            host_ip,
        }
    }

    fn cut(&self) {
        ip(&["link", "set", &self.host_if, "down"]);
    }

    fn heal(&self) {
        ip(&["link", "set", &self.host_if, "up"]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
    }
}

struct Agent {
    child: Child,
    state_dir: PathBuf,
    log: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Spawn<'a> {
    url: &'a str,
    dir: &'a Path,
    name: &'a str,
    inventory: &'a str,
    token: Option<&'a str>,
    netns: Option<&'a str>,
    run: u32,
}

fn spawn(s: Spawn<'_>) -> Agent {
    let state_dir = s.dir.join(s.name);
    let log = s.dir.join(format!("{}-{}.log", s.name, s.run));
    let bin = env!("CARGO_BIN_EXE_kiln-agent");
    let mut cmd = match s.netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, bin]);
            c
        }
        None => Command::new(bin),
    };
    cmd.arg("--control-plane")
        .arg(s.url)
        .arg("--state-dir")
        .arg(&state_dir)
        .arg("--nvml")
        .arg("disabled")
        // These tests are about the fleet, not containers: pods stay on the placeholder.
        .arg("--docker")
        .arg("disabled")
        .arg("--simulated-inventory")
        .arg(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join(format!("../inventory/inventories/{}.toml", s.inventory)),
        )
        .arg("--fault-file")
        .arg(s.dir.join(format!("{}.faults.toml", s.name)))
        .arg("--hostname")
        .arg(s.name)
        .arg("--metrics-interval-ms")
        .arg("300")
        .env_remove("KILN_AGENT_CONFIG")
        .env_remove("KILN_AGENT_BOOTSTRAP_TOKEN")
        .env("KILN_LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    if let Some(t) = s.token {
        cmd.env("KILN_AGENT_BOOTSTRAP_TOKEN", t);
    }
    Agent {
        child: cmd.spawn().expect("start kiln-agent"),
        state_dir,
        log,
    }
}

async fn token(store: &Store) -> String {
    fleet::bootstrap_token(store, Duration::from_secs(600)).await
}

async fn put(store: &Store, node: NodeId) -> u64 {
    let spec = Assignment {
        kind: Some(assignment::Kind::Pod(PodSpec {
            image: "kiln/test:1".into(),
            ..PodSpec::default()
        })),
        ..Assignment::default()
    }
    .encode_to_vec();
    fleet::put_assignment(store, node, AssignmentId::new(), &spec)
        .await
        .0
}

/// Poll `check` until it gives a value or `within` passes; say what was awaited on failure.
async fn until<T, F, Fut>(what: &str, within: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            start.elapsed() < within,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn node_of(agent: &Agent) -> Option<NodeId> {
    let text = std::fs::read_to_string(agent.state_dir.join("credential.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["node_id"].as_str()?.parse().ok()
}

fn applied_revision(agent: &Agent) -> u64 {
    std::fs::read_to_string(agent.state_dir.join("state.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["applied_revision"].as_u64())
        .unwrap_or(0)
}

/// Wait until one run's log shows exactly these applied revisions (the line follows the state
/// file's write, so it may lag it a little).
async fn applied_exactly(agent: &Agent, want: &[u64]) {
    let start = Instant::now();
    loop {
        let got = applied_lines(&agent.log);
        if got == want {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10) && got.len() <= want.len(),
            "applied assignment events: {got:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Revisions of the `applied assignment event` lines in one run's log.
fn applied_lines(log: &Path) -> Vec<u64> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["fields"]["message"] == "applied assignment event")
        .filter_map(|v| v["fields"]["revision"].as_u64())
        .collect()
}

async fn state(store: &Store, node: NodeId) -> String {
    store.node_get(node).await.unwrap().state
}

/// Wait for `node` to reach `want`; answers how long it took.
async fn reaches(store: &Store, node: NodeId, want: &str, within: Duration) -> Duration {
    let start = Instant::now();
    until(&format!("{node} to be {want}"), within, || async {
        (state(store, node).await == want).then_some(())
    })
    .await;
    start.elapsed()
}

async fn capacity(store: &Store, gpu_type: &str) -> (i64, i64, i64) {
    let rows = store.fleet_capacity().await.unwrap();
    rows.iter()
        .find(|r| r.gpu_type == gpu_type)
        .map(|r| (r.total, r.schedulable, r.unhealthy))
        .unwrap_or_default()
}

fn write_faults(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!("{name}.faults.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(format!("{name}.faults.toml"))).unwrap();
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn agents_join_die_resume_are_cut_off_heal_and_report_gpu_faults(pool: PgPool) {
    let store = Store::new(pool);
    let netns = Netns::create();

    // The control plane listens only on the host end of the veth: every agent reaches it there.
    let fleet_listener = tokio::net::TcpListener::bind(format!("{}:0", netns.host_ip))
        .await
        .unwrap();
    let url = format!("http://{}", fleet_listener.local_addr().unwrap());
    let ops_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = SchedulerConfig {
        fleet_listen: fleet_listener.local_addr().unwrap(),
        ops_listen: ops_listener.local_addr().unwrap(),
        database_url: String::new(),
        db_max_connections: 8,
        liveness_database_url: None,
        heartbeat_interval_ms: 300,
        node_unreachable_after_ms: UNREACHABLE_MS,
        node_lost_after_ms: LOST_MS,
        lifecycle_tick_ms: 100,
        placement_tick_ms: 200,
        autoscale_tick_ms: 200,
        node_credential_cache_ms: 60_000,
        redis_url: None,
        redis_namespace: "kiln".into(),
        secrets_key: None,
        shutdown_grace_secs: 25,
    };
    config.validate().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let scheduler = tokio::spawn(
        Scheduler {
            store: store.clone(),
            config,
            fleet_listener,
            ops_listener,
        }
        .run(async {
            let _ = stop_rx.await;
        }),
    );
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    // A forged token: refused, the agent says so and exits 2, no node appears.
    let mut forged = spawn(Spawn {
        url: &url,
        dir: d,
        name: "forged",
        inventory: "l40s-2x",
        token: Some("kiln_nbt_forged"),
        netns: None,
        run: 1,
    });
    let code = until("the forged agent to exit", Duration::from_secs(30), || {
        let status = forged.child.try_wait().unwrap();
        async move { status.map(|s| s.code()) }
    })
    .await;
    assert_eq!(code, Some(2));
    assert!(
        store
            .node_list(kiln_store::PageRequest {
                limit: 10,
                after: None
            })
            .await
            .unwrap()
            .items
            .is_empty()
    );

    // Three agents, three GPU types, one of them behind the veth.
    let t = [
        token(&store).await,
        token(&store).await,
        token(&store).await,
    ];
    let mut h100 = spawn(Spawn {
        url: &url,
        dir: d,
        name: "h100",
        inventory: "h100-sxm-8x",
        token: Some(&t[0]),
        netns: None,
        run: 1,
    });
    let a100 = spawn(Spawn {
        url: &url,
        dir: d,
        name: "a100",
        inventory: "a100-40gb-4x",
        token: Some(&t[1]),
        netns: None,
        run: 1,
    });
    let l40s = spawn(Spawn {
        url: &url,
        dir: d,
        name: "l40s",
        inventory: "l40s-2x",
        token: Some(&t[2]),
        netns: Some(&netns.name),
        run: 1,
    });
    let mut nodes = Vec::new();
    for agent in [&h100, &a100, &l40s] {
        let node = until(
            "the agent's credential",
            Duration::from_secs(30),
            || async { node_of(agent) },
        )
        .await;
        nodes.push(node);
    }
    let [n_h100, n_a100, n_l40s] = [nodes[0], nodes[1], nodes[2]];
    until("all GPUs registered", Duration::from_secs(30), || async {
        let caps = [
            capacity(&store, "h100-80gb").await,
            capacity(&store, "a100-40gb").await,
            capacity(&store, "l40s-48gb").await,
        ];
        (caps == [(8, 8, 0), (4, 4, 0), (2, 2, 0)]).then_some(())
    })
    .await;
    for n in &nodes {
        assert_eq!(state(&store, *n).await, "ready");
    }

    // Work on the H100 node, applied.
    put(&store, n_h100).await;
    let r2 = put(&store, n_h100).await;
    until(
        "the H100 agent to apply revision 2",
        Duration::from_secs(30),
        || async { (applied_revision(&h100) >= r2).then_some(()) },
    )
    .await;
    // Two events, or one snapshot at 2 when the stream opened after both were put.
    let first_run = until(
        "the log line for revision 2",
        Duration::from_secs(10),
        || async {
            let lines = applied_lines(&h100.log);
            (lines.last() == Some(&2)).then_some(lines)
        },
    )
    .await;
    assert!(first_run == [1, 2] || first_run == [2], "{first_run:?}");

    // SIGKILL: unreachable after the grace, then lost, and its work is handed back.
    h100.child.kill().unwrap();
    h100.child.wait().unwrap();
    let to_unreachable = reaches(&store, n_h100, "unreachable", Duration::from_secs(20)).await;
    assert!(
        to_unreachable >= Duration::from_millis(UNREACHABLE_MS - 500),
        "marked unreachable too early: {to_unreachable:?}"
    );
    reaches(&store, n_h100, "lost", Duration::from_secs(20)).await;
    assert!(store.assignment_list(n_h100).await.unwrap().is_empty());
    let lost = store.observed_list(n_h100).await.unwrap();
    assert_eq!(lost.len(), 2);
    assert!(lost.iter().all(|o| o.state == "lost"), "{lost:?}");
    assert_eq!(
        state(&store, n_a100).await,
        "ready",
        "the others are untouched"
    );
    assert_eq!(
        capacity(&store, "h100-80gb").await.1,
        0,
        "a lost node offers nothing"
    );

    // It restarts with its stored credential and resumes after revision 2: it applies the two
    // removals (3 and 4) and replays nothing it had applied.
    let h100 = spawn(Spawn {
        url: &url,
        dir: d,
        name: "h100",
        inventory: "h100-sxm-8x",
        token: None,
        netns: None,
        run: 2,
    });
    reaches(&store, n_h100, "ready", Duration::from_secs(30)).await;
    until(
        "the restarted agent to apply the removals",
        Duration::from_secs(30),
        || async { (applied_revision(&h100) >= 4).then_some(()) },
    )
    .await;
    // No replay of 1 and 2.
    applied_exactly(&h100, &[3, 4]).await;

    // A network cut behaves like a kill, and heals.
    until(
        "the L40S agent to watch",
        Duration::from_secs(30),
        || async {
            let log = std::fs::read_to_string(&l40s.log).unwrap_or_default();
            log.contains("watching assignments").then_some(())
        },
    )
    .await;
    let r = put(&store, n_l40s).await;
    until(
        "the L40S agent to apply its work",
        Duration::from_secs(30),
        || async { (applied_revision(&l40s) >= r).then_some(()) },
    )
    .await;
    netns.cut();
    reaches(&store, n_l40s, "unreachable", Duration::from_secs(20)).await;
    reaches(&store, n_l40s, "lost", Duration::from_secs(20)).await;
    netns.heal();
    reaches(&store, n_l40s, "ready", Duration::from_secs(60)).await;
    until(
        "the L40S agent to apply the removal of its lost work",
        Duration::from_secs(60),
        || async { (applied_revision(&l40s) > r).then_some(()) },
    )
    .await;
    applied_exactly(&l40s, &[r, r + 1]).await;

    // A GPU fault takes that GPU, and only it, out of capacity; clearing it brings it back.
    write_faults(
        d,
        "h100",
        "[[gpu]]\nindex = 3\nunhealthy = \"double-bit ECC error\"\n",
    );
    until(
        "GPU 3 to leave capacity",
        Duration::from_secs(30),
        || async { (capacity(&store, "h100-80gb").await == (8, 7, 1)).then_some(()) },
    )
    .await;
    assert_eq!(state(&store, n_h100).await, "ready", "the node stays up");
    let gpus = store.node_gpus(n_h100).await.unwrap();
    assert_eq!(gpus[3].health, "unhealthy");
    assert!(
        gpus[3].health_reason.contains("double-bit ECC"),
        "{:?}",
        gpus[3].health_reason
    );
    write_faults(d, "h100", "");
    until("GPU 3 to come back", Duration::from_secs(30), || async {
        (capacity(&store, "h100-80gb").await == (8, 8, 0)).then_some(())
    })
    .await;

    drop((h100, a100, l40s));
    let _ = stop_tx.send(());
    scheduler.await.unwrap().unwrap();
}
