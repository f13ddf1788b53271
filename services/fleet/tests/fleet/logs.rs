//! `PushLogs` and secret env values on the wire: a server with a log store and a secrets key.

use std::time::Duration;

use base64::Engine;
use kiln_domain::{AssignmentId, NodeId, Permission};
use kiln_fleet::{FleetConfig, NodeControlService};
use kiln_logs::LogStore;
use kiln_proto::node::v1::node_control_client::NodeControlClient;
use kiln_proto::node::v1::{
    Assignment, LogBatch, LogLine, LogSource, PodSpec, WatchRequest, assignment, assignment_event,
};
use prost::Message;
use sqlx::PgPool;
use uuid::Uuid;

use crate::{Fleet, authed};

struct Served {
    client: NodeControlClient<tonic::transport::Channel>,
    logs: LogStore,
    secrets: kiln_auth::SecretBox,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn serve(fleet: &Fleet) -> Served {
    let logs = LogStore::connect(
        &kiln_testkit::redis_url(),
        &format!("test-fleet-{}", Uuid::new_v4().simple()),
    )
    .await
    .unwrap();
    let key = base64::engine::general_purpose::STANDARD.encode([9u8; 32]);
    let secrets = kiln_auth::SecretBox::from_base64(&key).unwrap();
    let service = NodeControlService::new(fleet.store.clone(), FleetConfig::default())
        .with_logs(logs.clone())
        .with_secrets(secrets.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let pool = fleet.store.pool().clone();
    tokio::spawn(kiln_fleet::serve_service(listener, service, pool, async {
        let _ = rx.await;
    }));
    let client = NodeControlClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    Served {
        client,
        logs,
        secrets,
        _stop: tx,
    }
}

/// A pod placed on `node` as assignment `asg`: its workload id.
async fn placed_pod(fleet: &Fleet, node: &str, asg: AssignmentId, spec: &[u8]) -> Uuid {
    let who = format!("tenant-{}", &Uuid::new_v4().simple().to_string()[..8]);
    let scope = kiln_testkit::fleet::org_scope(&fleet.store, &who, Permission::WorkloadWrite).await;
    let node: NodeId = node.parse().unwrap();
    kiln_testkit::fleet::put_assignment(&fleet.store, node, asg, spec).await;
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO workloads (id, org_id, kind, name, state, gpu_mode, cpu_millis, memory_mib,
                                node_id, assignment_id)
         VALUES ($1, $2, 'pod', 'p', 'scheduled', 'none', 100, 64, $3, $4)",
    )
    .bind(id)
    .bind(scope.org_id().as_uuid())
    .bind(node.as_uuid())
    .bind(asg.as_uuid())
    .execute(fleet.store.pool())
    .await
    .unwrap();
    id
}

fn line(assignment: &str, text: &str) -> LogLine {
    LogLine {
        assignment_id: assignment.into(),
        source: LogSource::Stdout as i32,
        text: text.into(),
        at_unix_ms: 1,
    }
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn a_node_writes_only_its_own_workloads_output(pool: PgPool) {
    let fleet = Fleet::start(pool).await;
    let served = serve(&fleet).await;
    let (node_a, cred_a) = fleet.node("logs-a", 1).await;
    let (node_b, _) = fleet.node("logs-b", 1).await;
    let asg_a = AssignmentId::new();
    let asg_b = AssignmentId::new();
    let pod_a = placed_pod(&fleet, &node_a, asg_a, &[]).await;
    let pod_b = placed_pod(&fleet, &node_b, asg_b, &[]).await;

    let batches = vec![
        LogBatch {
            lines: vec![
                line(&asg_a.to_string(), "mine 1"),
                line(&asg_b.to_string(), "not mine"),
            ],
        },
        LogBatch {
            lines: vec![line("garbage", "x"), line(&asg_a.to_string(), "mine 2")],
        },
    ];
    let ack = served
        .client
        .clone()
        .push_logs(authed(&cred_a, futures::stream::iter(batches)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ack.accepted, 2);
    let a: Vec<String> = served
        .logs
        .tail(pod_a, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.text)
        .collect();
    assert_eq!(a, ["mine 1", "mine 2"]);
    assert!(
        served.logs.tail(pod_b, 10).await.unwrap().is_empty(),
        "node A cannot write B's logs"
    );

    // Without a credential: refused.
    let anonymous = served
        .client
        .clone()
        .push_logs(tonic::Request::new(futures::stream::iter(
            Vec::<LogBatch>::new(),
        )))
        .await;
    assert_eq!(anonymous.unwrap_err().code(), tonic::Code::Unauthenticated);
    // An oversized batch: refused, nothing stored.
    let huge = LogBatch {
        lines: (0..2000)
            .map(|i| line(&asg_a.to_string(), &format!("flood {i}")))
            .collect(),
    };
    let r = served
        .client
        .clone()
        .push_logs(authed(&cred_a, futures::stream::iter(vec![huge])))
        .await;
    assert_eq!(r.unwrap_err().code(), tonic::Code::InvalidArgument);
    assert_eq!(served.logs.tail(pod_a, 10).await.unwrap().len(), 2);
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn sealed_secrets_are_opened_only_on_the_way_to_the_node(pool: PgPool) {
    let fleet = Fleet::start(pool).await;
    let served = serve(&fleet).await;
    let (node, cred) = fleet.node("secret-host", 1).await;
    let scope =
        kiln_testkit::fleet::org_scope(&fleet.store, "owner", Permission::WorkloadWrite).await;
    let org = scope.org_id();
    let sealed = served
        .secrets
        .seal(&kiln_auth::pod_env_context(org, "TOKEN"), "s3cret")
        .unwrap();
    let foreign = served
        .secrets
        .seal(&kiln_auth::pod_env_context(org, "OTHER_NAME"), "moved")
        .unwrap();
    let spec = Assignment {
        kind: Some(assignment::Kind::Pod(PodSpec {
            image: "app:1".into(),
            org_id: org.to_string(),
            env: [("PLAIN".to_owned(), "1".to_owned())].into(),
            // A value sealed for another variable name must not open under this one.
            env_sealed: [("TOKEN".to_owned(), sealed), ("COPIED".to_owned(), foreign)].into(),
            ..PodSpec::default()
        })),
        ..Assignment::default()
    }
    .encode_to_vec();
    placed_pod(&fleet, &node, AssignmentId::new(), &spec).await;
    let mut stream = served
        .client
        .clone()
        .watch_assignments(authed(
            &cred,
            WatchRequest {
                node_id: node.clone(),
                from_revision: 0,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let Some(assignment_event::Event::Snapshot(snap)) = first.event else {
        panic!("a snapshot first: {first:?}");
    };
    let Some(assignment::Kind::Pod(pod)) = &snap.assignments[0].kind else {
        panic!("a pod");
    };
    assert_eq!(pod.env.get("TOKEN").map(String::as_str), Some("s3cret"));
    assert_eq!(pod.env.get("PLAIN").map(String::as_str), Some("1"));
    assert!(!pod.env.contains_key("COPIED"));
    assert!(
        pod.env_sealed.contains_key("COPIED"),
        "left sealed: the agent fails the pod"
    );
    let stored: (Vec<u8>,) = sqlx::query_as("SELECT spec FROM node_assignments")
        .fetch_one(fleet.store.pool())
        .await
        .unwrap();
    assert!(!String::from_utf8_lossy(&stored.0).contains("s3cret"));
}
