//! The real `kiln-agent` binary against a small in-memory `NodeControl` server: joining,
//! the 0600 credential, registering, the bearer credential on every call, applying the
//! assignment stream, resuming after a restart without replaying, a graceful stop, and the
//! exit codes for a refused token and a revoked credential.
//!
//! The server here is a test double of the contract only; the real control plane's tests (with
//! Postgres) live with `kiln-fleet`.

// Wire messages are built with `..Default::default()` so that fields the contract adds later do
// not break this test.
#![allow(clippy::needless_update)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::stream::BoxStream;
use kiln_proto::node::v1 as pb;
use kiln_proto::node::v1::node_control_server::{NodeControl, NodeControlServer};
use pb::assignment_event::Event;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

const TOKEN: &str = "kiln_nbt_test";
const CREDENTIAL: &str = "kiln_ncr_test";
const NODE: &str = "node_00000000000000000000000000000001";

#[derive(Default)]
struct Recorded {
    joins: u32,
    registers: Vec<pb::RegisterRequest>,
    heartbeats: u32,
    watches: Vec<u64>,
    observed: Vec<pb::ObservedReport>,
    metrics_reports: u32,
    events: Vec<pb::AssignmentEvent>,
    watchers: Vec<mpsc::Sender<Result<pb::AssignmentEvent, Status>>>,
    revoked: bool,
}

#[derive(Clone, Default)]
struct Fake(Arc<Mutex<Recorded>>);

impl Fake {
    fn authorise<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let r = self.0.lock().unwrap();
        match kiln_proto::auth::credential(request.metadata()) {
            Some(CREDENTIAL) if !r.revoked => Ok(()),
            _ => Err(Status::unauthenticated("node credential revoked")),
        }
    }

    fn push(&self, event: pb::AssignmentEvent) {
        let mut r = self.0.lock().unwrap();
        r.events.push(event.clone());
        r.watchers.retain(|w| w.try_send(Ok(event.clone())).is_ok());
    }
}

#[tonic::async_trait]
impl NodeControl for Fake {
    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let join = request.into_inner();
        let mut r = self.0.lock().unwrap();
        if join.bootstrap_token != TOKEN || r.joins > 0 {
            return Err(Status::unauthenticated("bootstrap token unknown or used"));
        }
        assert_eq!(join.agent_version, env!("CARGO_PKG_VERSION"));
        assert_eq!(join.protocol_version, Some(pb::PROTOCOL_VERSION));
        r.joins += 1;
        Ok(Response::new(pb::JoinResponse {
            node_id: NODE.into(),
            node_credential: CREDENTIAL.into(),
            protocol_version: Some(pb::PROTOCOL_VERSION),
            ..Default::default()
        }))
    }

    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        self.authorise(&request)?;
        self.0.lock().unwrap().registers.push(request.into_inner());
        Ok(Response::new(pb::RegisterResponse {
            node_id: NODE.into(),
            heartbeat_interval_ms: 200,
            protocol_version: Some(pb::PROTOCOL_VERSION),
            node_state: pb::NodeState::Ready as i32,
            ..Default::default()
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        self.authorise(&request)?;
        let hb = request.into_inner();
        assert_eq!(hb.node_id, NODE);
        let mut r = self.0.lock().unwrap();
        r.heartbeats += 1;
        Ok(Response::new(pb::HeartbeatResponse {
            node_state: pb::NodeState::Ready as i32,
            next_interval_ms: 200,
            latest_revision: r.events.last().map_or(0, |e| e.revision),
            ..Default::default()
        }))
    }

    async fn stream_metrics(
        &self,
        request: Request<Streaming<pb::MetricsReport>>,
    ) -> Result<Response<pb::MetricsSummary>, Status> {
        self.authorise(&request)?;
        let mut stream = request.into_inner();
        let mut reports = 0;
        while let Some(report) = stream.message().await? {
            assert_eq!(report.node_id, NODE);
            reports += 1;
            self.0.lock().unwrap().metrics_reports += 1;
        }
        Ok(Response::new(pb::MetricsSummary {
            reports_received: reports,
            ..Default::default()
        }))
    }

    type WatchAssignmentsStream = BoxStream<'static, Result<pb::AssignmentEvent, Status>>;

    async fn watch_assignments(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchAssignmentsStream>, Status> {
        self.authorise(&request)?;
        let from = request.into_inner().from_revision;
        let (tx, rx) = mpsc::channel(64);
        {
            let mut r = self.0.lock().unwrap();
            r.watches.push(from);
            for e in r.events.iter().filter(|e| e.revision > from) {
                tx.try_send(Ok(e.clone())).unwrap();
            }
            r.watchers.push(tx);
        }
        let stream =
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn report_observed(
        &self,
        request: Request<pb::ObservedReport>,
    ) -> Result<Response<pb::ObservedAck>, Status> {
        self.authorise(&request)?;
        let report = request.into_inner();
        let recorded_revision = report.applied_revision;
        self.0.lock().unwrap().observed.push(report);
        Ok(Response::new(pb::ObservedAck {
            recorded_revision,
            ..Default::default()
        }))
    }
}

/// A fake control plane on a loopback port, for as long as the test runs.
fn start_fake(fake: Fake) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            tonic::transport::Server::builder()
                .add_service(NodeControlServer::new(fake))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
                .await
                .unwrap();
        });
    });
    format!("http://{addr}")
}

fn inventory() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../inventory/inventories/l40s-2x.toml")
}

/// Starts the agent binary; its stderr (the log, JSON lines) goes to `log`.
fn agent(control_plane: &str, state_dir: &Path, token: Option<&str>, log: &Path) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln-agent"));
    cmd.arg("--control-plane")
        .arg(control_plane)
        .arg("--state-dir")
        .arg(state_dir)
        .arg("--nvml")
        .arg("disabled")
        .arg("--simulated-inventory")
        .arg(inventory())
        .arg("--hostname")
        .arg("sim-test-0")
        .arg("--metrics-interval-ms")
        .arg("200")
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

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_exit(child: &mut Child, timeout: Duration) -> i32 {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code().expect("exited, not killed by a signal");
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            panic!("kiln-agent did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn sigterm(child: &Child) {
    let ok = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

/// The `applied assignment event` log lines: (revision, kind).
fn applied_lines(log: &Path) -> Vec<(u64, String)> {
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["fields"]["message"] == "applied assignment event")
        .map(|v| {
            (
                v["fields"]["revision"].as_u64().unwrap(),
                v["fields"]["kind"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn pod(id: &str, generation: u64, gpu: &str) -> pb::Assignment {
    pb::Assignment {
        assignment_id: id.into(),
        generation,
        kind: Some(pb::assignment::Kind::Pod(pb::PodSpec {
            image: "kiln/test:1".into(),
            gpus: Some(pb::GpuAllocation {
                kind: Some(pb::gpu_allocation::Kind::Whole(pb::WholeGpus {
                    gpu_uuids: vec![gpu.into()],
                })),
            }),
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn event(revision: u64, event: Event) -> pb::AssignmentEvent {
    pb::AssignmentEvent {
        revision,
        event: Some(event),
        ..Default::default()
    }
}

#[test]
fn joins_applies_resumes_without_replay_and_exits_3_when_revoked() {
    let fake = Fake::default();
    let url = start_fake(fake.clone());
    let dir = tempfile::tempdir().unwrap();
    let state_dir = dir.path().join("state");
    fake.push(event(1, Event::Upsert(pod("asg_a", 1, "GPU-x"))));
    fake.push(event(2, Event::Upsert(pod("asg_b", 1, "GPU-y"))));
    fake.push(event(
        3,
        Event::Remove(pb::AssignmentRemoval {
            assignment_id: "asg_b".into(),
            generation: 1,
        }),
    ));

    // First start: joins with the token, registers, applies revisions 1..=3.
    let log1 = dir.path().join("agent-1.log");
    let mut child = agent(&url, &state_dir, Some(TOKEN), &log1);
    let observed_at = |rev: u64| {
        let fake = fake.clone();
        move || {
            fake.0
                .lock()
                .unwrap()
                .observed
                .iter()
                .any(|o| o.applied_revision >= rev)
        }
    };
    wait_for(
        "revision 3 to be reported",
        Duration::from_secs(30),
        observed_at(3),
    );
    wait_for("metrics", Duration::from_secs(10), || {
        fake.0.lock().unwrap().metrics_reports >= 1
    });
    {
        let r = fake.0.lock().unwrap();
        assert_eq!(r.joins, 1);
        assert_eq!(r.watches, vec![0]);
        let reg = &r.registers[0];
        let inv = reg.inventory.as_ref().unwrap();
        assert_eq!(inv.hostname, "sim-test-0");
        assert_eq!(inv.gpus.len(), 2);
        assert!(reg.capacity.unwrap().cpu_cores >= 1);
        let last = r.observed.last().unwrap();
        assert!(last.complete);
        assert_eq!(last.assignments.len(), 1, "asg_b was removed");
        assert_eq!(last.assignments[0].assignment_id, "asg_a");
        assert_eq!(last.assignments[0].state, pb::ObservedState::Pending as i32);
        assert_eq!(
            last.assignments[0].reason,
            "this agent has no runtime for pods yet"
        );
    }
    let cred = state_dir.join("credential.json");
    let mode = std::fs::metadata(&cred).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o600);
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(state_dir.join("state.json")).unwrap())
            .unwrap();
    assert_eq!(state["applied_revision"], 3);
    assert_eq!(state["node_id"], NODE);

    sigterm(&child);
    assert_eq!(wait_exit(&mut child, Duration::from_secs(10)), 0);
    assert_eq!(
        applied_lines(&log1),
        vec![
            (1, "upsert".to_owned()),
            (2, "upsert".to_owned()),
            (3, "remove".to_owned())
        ]
    );

    // Second start, no token: uses the credential, resumes from 3, applies only 4.
    fake.push(event(4, Event::Upsert(pod("asg_c", 1, "GPU-z"))));
    let log2 = dir.path().join("agent-2.log");
    let mut child = agent(&url, &state_dir, None, &log2);
    wait_for(
        "revision 4 to be reported",
        Duration::from_secs(30),
        observed_at(4),
    );
    assert_eq!(fake.0.lock().unwrap().joins, 1, "never joins again");
    assert_eq!(fake.0.lock().unwrap().watches, vec![0, 3]);
    assert_eq!(applied_lines(&log2), vec![(4, "upsert".to_owned())]);

    // Revoked: the next call fails UNAUTHENTICATED and the agent exits 3 instead of spinning.
    fake.0.lock().unwrap().revoked = true;
    assert_eq!(wait_exit(&mut child, Duration::from_secs(15)), 3);
    let log = std::fs::read_to_string(&log2).unwrap();
    assert!(log.contains("revoked"), "{log}");
}

#[test]
fn a_refused_token_or_none_at_all_exits_2() {
    let fake = Fake::default();
    let url = start_fake(fake.clone());
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("agent.log");

    let mut child = agent(&url, &dir.path().join("s1"), Some("kiln_nbt_forged"), &log);
    assert_eq!(wait_exit(&mut child, Duration::from_secs(15)), 2);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("refused the bootstrap token"), "{text}");
    assert!(!dir.path().join("s1/credential.json").exists());

    let mut child = agent(&url, &dir.path().join("s2"), None, &log);
    assert_eq!(wait_exit(&mut child, Duration::from_secs(15)), 2);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("no bootstrap token"), "{text}");
    assert_eq!(fake.0.lock().unwrap().registers.len(), 0);
}
