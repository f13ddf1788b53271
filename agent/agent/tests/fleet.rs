//! The real `kiln-agent` binary against the real control plane (`kiln_fleet::serve` over a
//! per-test Postgres database): join with an operator token, apply assignments put through the
//! store, resume after a restart without replaying, and exit 3 when the credential is revoked.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln_domain::{AssignmentId, NodeId};
use kiln_fleet::FleetConfig;
use kiln_proto::node::v1::{Assignment, PodSpec, assignment};
use kiln_store::Store;
use kiln_testkit::fleet;
use prost::Message;
use sqlx::PgPool;

async fn start_fleet(store: Store) -> (String, tokio::sync::oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let config = FleetConfig {
        heartbeat_interval: Duration::from_millis(500),
        credential_cache_ttl: Duration::ZERO,
        stream_recheck: Duration::from_secs(1),
    };
    tokio::spawn(kiln_fleet::serve(listener, store, config, async {
        let _ = rx.await;
    }));
    (format!("http://{addr}"), tx)
}

async fn token(store: &Store) -> String {
    fleet::bootstrap_token(store, Duration::from_secs(600)).await
}

async fn put(store: &Store, node: NodeId, id: AssignmentId) -> u64 {
    fleet::put_assignment(store, node, id, &pod_spec()).await.0
}

fn pod_spec() -> Vec<u8> {
    Assignment {
        kind: Some(assignment::Kind::Pod(PodSpec {
            image: "kiln/test:1".into(),
            ..PodSpec::default()
        })),
        ..Assignment::default()
    }
    .encode_to_vec()
}

fn agent(control_plane: &str, state_dir: &Path, token: Option<&str>, log: &Path) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln-agent"));
    cmd.arg("--control-plane")
        .arg(control_plane)
        .arg("--state-dir")
        .arg(state_dir)
        .arg("--nvml")
        .arg("disabled")
        // About the fleet protocol, not containers (tests/docker.rs has those).
        .arg("--docker")
        .arg("disabled")
        .arg("--simulated-inventory")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../inventory/inventories/l40s-2x.toml"))
        .arg("--hostname")
        .arg(format!("sim-agent-{}", std::process::id()))
        .arg("--metrics-interval-ms")
        .arg("300")
        .env_remove("KILN_AGENT_CONFIG")
        .env_remove("KILN_AGENT_BOOTSTRAP_TOKEN")
        .env("KILN_LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    if let Some(t) = token {
        cmd.env("KILN_AGENT_BOOTSTRAP_TOKEN", t);
    }
    cmd.spawn().expect("start kiln-agent")
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_exit(child: &mut Child) -> i32 {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code().expect("exited, not killed by a signal");
        }
        if start.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("kiln-agent did not exit");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn applied_revision(state_dir: &Path) -> u64 {
    std::fs::read_to_string(state_dir.join("state.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["applied_revision"].as_u64())
        .unwrap_or(0)
}

/// Revisions of the `applied assignment event` lines in a log.
fn applied_lines(log: &PathBuf) -> Vec<u64> {
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["fields"]["message"] == "applied assignment event")
        .map(|v| v["fields"]["revision"].as_u64().unwrap())
        .collect()
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn agent_joins_applies_resumes_and_stops_when_revoked(pool: PgPool) {
    let store = Store::new(pool);
    let (url, _stop) = start_fleet(store.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let state_dir = dir.path().join("state");
    let token = token(&store).await;

    let log1 = dir.path().join("agent-1.log");
    let mut child = agent(&url, &state_dir, Some(&token), &log1);
    let cred = state_dir.join("credential.json");
    wait_for("the credential", || cred.exists()).await;
    let node: NodeId =
        serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(&cred).unwrap())
            .unwrap()["node_id"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();

    put(&store, node, AssignmentId::new()).await;
    let r2 = put(&store, node, AssignmentId::new()).await;
    wait_for("revision 2 applied", || applied_revision(&state_dir) >= r2).await;

    let kill = |child: &Child| {
        assert!(
            Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status()
                .unwrap()
                .success()
        )
    };
    kill(&child);
    assert_eq!(wait_exit(&mut child).await, 0);
    let first = applied_lines(&log1);
    assert!(
        !first.is_empty() && *first.last().unwrap() == r2,
        "{first:?}"
    );

    // While the agent is down, one more; after the restart only that one is applied.
    let r3 = put(&store, node, AssignmentId::new()).await;
    let log2 = dir.path().join("agent-2.log");
    let mut child = agent(&url, &state_dir, None, &log2);
    wait_for("revision 3 applied", || applied_revision(&state_dir) >= r3).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(applied_lines(&log2), vec![r3], "nothing replayed");

    // Revoking the credential stops the agent with exit code 3.
    let mut tx = store.begin().await.unwrap();
    store.node_credential_revoke(&mut tx, node).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(wait_exit(&mut child).await, 3);
    let log = std::fs::read_to_string(&log2).unwrap();
    assert!(log.contains("revoked"), "{log}");
}

/// Run `kiln-agent` with `args` and no config or token from the environment; (exit code,
/// stderr).
fn refused(args: &[&str], state_dir: &Path) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln-agent"))
        .args(args)
        .arg("--state-dir")
        .arg(state_dir)
        .arg("--control-plane")
        .arg("http://127.0.0.1:9")
        .env_remove("KILN_AGENT_CONFIG")
        .env_remove("KILN_AGENT_BOOTSTRAP_TOKEN")
        .env_remove("KILN_AGENT_SIMULATED_INVENTORY")
        .output()
        .expect("run kiln-agent");
    (
        out.status.code().expect("exited"),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_agent_refuses_to_start_without_a_gpu_source_or_a_way_to_join() {
    let dir = tempfile::tempdir().unwrap();
    // No NVML (disabled) and no simulated inventory: one clear line, exit 2.
    let (code, err) = refused(&["--nvml", "disabled"], &dir.path().join("a"));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("refusing to start"), "{err}");
    assert!(err.to_lowercase().contains("gpu"), "{err}");

    // A GPU source but neither a stored credential nor a bootstrap token.
    let inventory =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../inventory/inventories/l40s-2x.toml");
    let (code, err) = refused(
        &[
            "--nvml",
            "disabled",
            "--simulated-inventory",
            inventory.to_str().unwrap(),
        ],
        &dir.path().join("b"),
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no bootstrap token"), "{err}");
}
