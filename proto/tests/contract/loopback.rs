//! The generated client and server, end to end: a tiny in-process `NodeControl` server on a real
//! loopback TCP socket, called by the generated client.

use std::net::SocketAddr;

use futures::StreamExt;
use futures::stream::{self, BoxStream};
use kiln_proto::auth;
use kiln_proto::node::v1::{
    Assignment, AssignmentEvent, AssignmentRemoval, AssignmentSnapshot, GpuAllocation, GpuSample,
    HeartbeatRequest, HeartbeatResponse, HostInventory, JoinRequest, JoinResponse, LogAck,
    LogBatch, MetricsReport, MetricsSummary, NodeState, ObservedAck, ObservedReport,
    PROTOCOL_VERSION, PodSpec, RegisterRequest, RegisterResponse, WatchRequest, WholeGpus,
    assignment, assignment_event, gpu_allocation,
    node_control_client::NodeControlClient,
    node_control_server::{NodeControl, NodeControlServer},
};
use tokio::sync::oneshot;
use tonic::transport::{Channel, Server, server::TcpIncoming};
use tonic::{Request, Response, Status, Streaming};

const TOKEN: &str = "kiln-bootstrap-good";
const CREDENTIAL: &str = "kiln-node-credential";
const NODE: &str = "node_0190a0b0c0d0e0f00000000000000001";

/// A fixed control plane: one good bootstrap token, one node, one assignment.
struct FakeControlPlane;

fn authenticate<T>(request: &Request<T>) -> Result<(), Status> {
    match auth::credential(request.metadata()) {
        Some(CREDENTIAL) => Ok(()),
        _ => Err(Status::unauthenticated(
            "missing or unknown node credential",
        )),
    }
}

fn pod(generation: u64) -> Assignment {
    Assignment {
        assignment_id: "asg_1".into(),
        generation,
        trace_parent: String::new(),
        kind: Some(assignment::Kind::Pod(PodSpec {
            image: "kiln/echo:1".into(),
            command: vec!["echo".into(), "hi".into()],
            cpu_millis: 500,
            memory_mib: 256,
            gpus: Some(GpuAllocation {
                kind: Some(gpu_allocation::Kind::Whole(WholeGpus {
                    gpu_uuids: vec!["GPU-0".into()],
                })),
            }),
            ..Default::default()
        })),
    }
}

#[tonic::async_trait]
impl NodeControl for FakeControlPlane {
    async fn join(&self, request: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        let join = request.into_inner();
        if join.bootstrap_token != TOKEN {
            return Err(Status::unauthenticated("bootstrap token refused"));
        }
        Ok(Response::new(JoinResponse {
            node_id: NODE.into(),
            node_credential: CREDENTIAL.into(),
            protocol_version: Some(PROTOCOL_VERSION),
        }))
    }

    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        authenticate(&request)?;
        let agent = request.into_inner().protocol_version.unwrap_or_default();
        if !agent.is_compatible_with(&PROTOCOL_VERSION) {
            return Err(Status::failed_precondition("incompatible protocol version"));
        }
        Ok(Response::new(RegisterResponse {
            node_id: NODE.into(),
            heartbeat_interval_ms: 10_000,
            protocol_version: Some(PROTOCOL_VERSION),
            node_state: NodeState::Ready.into(),
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        authenticate(&request)?;
        Ok(Response::new(HeartbeatResponse {
            node_state: NodeState::Cordoned.into(),
            next_interval_ms: 10_000,
            latest_revision: 2,
        }))
    }

    async fn stream_metrics(
        &self,
        request: Request<Streaming<MetricsReport>>,
    ) -> Result<Response<MetricsSummary>, Status> {
        authenticate(&request)?;
        let mut reports = request.into_inner();
        let mut summary = MetricsSummary::default();
        while let Some(report) = reports.message().await? {
            summary.reports_received += 1;
            summary.samples_received += report.samples.len() as u64;
        }
        Ok(Response::new(summary))
    }

    type WatchAssignmentsStream = BoxStream<'static, Result<AssignmentEvent, Status>>;

    async fn watch_assignments(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchAssignmentsStream>, Status> {
        authenticate(&request)?;
        // The node's history: revision 1 created the pod, revision 2 removed it.
        let history = [
            AssignmentEvent {
                revision: 1,
                event: Some(assignment_event::Event::Upsert(pod(1))),
            },
            AssignmentEvent {
                revision: 2,
                event: Some(assignment_event::Event::Remove(AssignmentRemoval {
                    assignment_id: "asg_1".into(),
                    generation: 2,
                })),
            },
        ];
        let from = request.into_inner().from_revision;
        let events: Vec<_> = if from == 0 {
            // Nothing applied yet: a snapshot of the state at revision 1, then what follows.
            let snapshot = AssignmentEvent {
                revision: 1,
                event: Some(assignment_event::Event::Snapshot(AssignmentSnapshot {
                    assignments: vec![pod(1)],
                })),
            };
            std::iter::once(snapshot)
                .chain(history.into_iter().filter(|e| e.revision > 1))
                .collect()
        } else {
            history.into_iter().filter(|e| e.revision > from).collect()
        };
        Ok(Response::new(
            stream::iter(events.into_iter().map(Ok)).boxed(),
        ))
    }

    async fn report_observed(
        &self,
        request: Request<ObservedReport>,
    ) -> Result<Response<ObservedAck>, Status> {
        authenticate(&request)?;
        Ok(Response::new(ObservedAck {
            recorded_revision: request.into_inner().applied_revision,
        }))
    }

    async fn push_logs(
        &self,
        request: Request<tonic::Streaming<LogBatch>>,
    ) -> Result<Response<LogAck>, Status> {
        authenticate(&request)?;
        let mut stream = request.into_inner();
        let mut accepted = 0;
        while let Some(batch) = stream.message().await? {
            accepted += batch.lines.len() as u64;
        }
        Ok(Response::new(LogAck { accepted }))
    }
}

/// A running server; dropping it shuts the server down.
struct TestServer {
    addr: SocketAddr,
    _shutdown: oneshot::Sender<()>,
}

impl TestServer {
    async fn start() -> Self {
        // Bound before the server task starts, so a client may connect at once.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (shutdown, stopped) = oneshot::channel::<()>();
        tokio::spawn(
            Server::builder()
                .add_service(NodeControlServer::new(FakeControlPlane))
                .serve_with_incoming_shutdown(TcpIncoming::from(listener), async {
                    let _ = stopped.await;
                }),
        );
        TestServer {
            addr,
            _shutdown: shutdown,
        }
    }

    async fn client(&self) -> NodeControlClient<Channel> {
        NodeControlClient::connect(format!("http://{}", self.addr))
            .await
            .unwrap()
    }
}

/// A request carrying the node credential, as every call but `Join` must.
fn authed<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert(auth::AUTHORIZATION, auth::bearer(CREDENTIAL).unwrap());
    request
}

#[tokio::test]
async fn join_trades_a_good_token_for_a_credential_and_refuses_a_bad_one() {
    let server = TestServer::start().await;
    let mut client = server.client().await;

    let joined = client
        .join(JoinRequest {
            bootstrap_token: TOKEN.into(),
            hostname: "gpu-host-1".into(),
            agent_version: "0.1.0".into(),
            protocol_version: Some(PROTOCOL_VERSION),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(joined.node_id, NODE);
    assert_eq!(joined.node_credential, CREDENTIAL);
    assert_eq!(joined.protocol_version, Some(PROTOCOL_VERSION));

    let refused = client
        .join(JoinRequest {
            bootstrap_token: "forged".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
}

#[tokio::test]
async fn calls_need_the_node_credential_in_the_metadata() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let register = RegisterRequest {
        agent_version: "0.1.0".into(),
        protocol_version: Some(PROTOCOL_VERSION),
        inventory: Some(HostInventory {
            hostname: "gpu-host-1".into(),
            ..Default::default()
        }),
        capacity: None,
        public_address: String::new(),
    };

    let refused = client.register(register.clone()).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);

    let registered = client
        .register(authed(register))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(registered.node_id, NODE);
    assert_eq!(registered.node_state(), NodeState::Ready);

    let beat = client
        .heartbeat(authed(HeartbeatRequest {
            node_id: NODE.into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(beat.node_state(), NodeState::Cordoned);
}

#[tokio::test]
async fn watch_assignments_streams_events_and_resumes_after_a_revision() {
    let server = TestServer::start().await;
    let mut client = server.client().await;

    let watch = |from_revision| {
        authed(WatchRequest {
            node_id: NODE.into(),
            from_revision,
        })
    };

    // From scratch: a snapshot, then the removal.
    let mut stream = client
        .watch_assignments(watch(0))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().expect("first event");
    let second = stream.message().await.unwrap().expect("second event");
    assert!(
        stream.message().await.unwrap().is_none(),
        "exactly two events"
    );
    assert_eq!(first.revision, 1);
    match first.event {
        Some(assignment_event::Event::Snapshot(snapshot)) => {
            assert_eq!(snapshot.assignments, vec![pod(1)]);
        }
        other => panic!("expected a snapshot, got {other:?}"),
    }
    assert_eq!(second.revision, 2);
    assert!(matches!(
        second.event,
        Some(assignment_event::Event::Remove(AssignmentRemoval {
            generation: 2,
            ..
        }))
    ));

    // Resuming after revision 1 sends only what follows it.
    let resumed: Vec<_> = client
        .watch_assignments(watch(1))
        .await
        .unwrap()
        .into_inner()
        .map(|e| e.unwrap().revision)
        .collect()
        .await;
    assert_eq!(resumed, vec![2]);

    let ack = client
        .report_observed(authed(ObservedReport {
            node_id: NODE.into(),
            applied_revision: 2,
            complete: true,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ack.recorded_revision, 2);
}

#[tokio::test]
async fn stream_metrics_counts_the_client_stream() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let report = |n: usize| MetricsReport {
        node_id: NODE.into(),
        sampled_at_unix_ms: 1_700_000_000_000,
        samples: vec![GpuSample::default(); n],
    };
    let summary = client
        .stream_metrics(authed(stream::iter([report(8), report(8), report(4)])))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(summary.reports_received, 3);
    assert_eq!(summary.samples_received, 20);
}
