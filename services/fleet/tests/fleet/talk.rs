//! Register, heartbeat, metrics and observed state: what an agent tells the control plane, and
//! what it may not.

use futures::stream;
use kiln_domain::{AssignmentId, NodeId};
use kiln_proto::node::v1::{
    GpuHealth, GpuHealthStatus, GpuSample, HeartbeatRequest, MetricsReport, NodeState,
    ObservedAssignment, ObservedReport, ObservedState, ProtocolVersion, XidEvent,
};
use kiln_store::{AssignmentKind, AssignmentPut};
use sqlx::PgPool;
use tonic::Code;

use crate::{Fleet, authed, gpu_uuid, register};

fn beat(node: &str, health: Vec<GpuHealthStatus>) -> HeartbeatRequest {
    HeartbeatRequest {
        node_id: node.into(),
        sent_at_unix_ms: 0,
        last_applied_revision: 0,
        gpu_health: health,
    }
}

async fn capacity(fleet: &Fleet) -> (i64, i64, i64) {
    let rows = fleet.store.fleet_capacity().await.unwrap();
    let h100 = rows
        .iter()
        .find(|r| r.gpu_type == "h100-80gb")
        .expect("h100s");
    (h100.total, h100.schedulable, h100.unhealthy)
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn registering_records_the_gpus_and_a_later_inventory_replaces_it(pool: PgPool) {
    let fleet = Fleet::start(pool).await;
    let (node, _) = fleet.node("gpu-a", 8).await;
    let id: NodeId = node.parse().unwrap();
    let gpus = fleet.store.node_gpus(id).await.unwrap();
    assert_eq!(gpus.len(), 8);
    assert_eq!(
        gpus[0].gpu_type.as_deref(),
        Some("h100-80gb"),
        "derived from the model"
    );
    assert_eq!(gpus[3].nvlink_peers.len(), 7);
    assert_eq!(gpus[5].numa_node, Some(1));
    let record = fleet.store.node_get(id).await.unwrap();
    assert_eq!(
        (record.cpu_cores, record.driver_version.as_str()),
        (64, "550.90.07")
    );
    assert!(record.registered_at.is_some());
    assert_eq!(capacity(&fleet).await, (8, 8, 0));

    // The host comes back with two GPUs fewer: they leave capacity.
    let (node2, cred2) = fleet.node("gpu-c", 4).await;
    fleet
        .client
        .clone()
        .register(authed(&cred2, register("gpu-c", 2)))
        .await
        .unwrap();
    let gpus = fleet.store.node_gpus(node2.parse().unwrap()).await.unwrap();
    assert_eq!(gpus.len(), 2);
    assert_eq!(capacity(&fleet).await, (10, 10, 0));
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn calls_without_a_good_credential_or_for_another_node_are_refused(pool: PgPool) {
    let fleet = Fleet::start(pool).await;
    let (a, cred_a) = fleet.node("gpu-a", 1).await;
    let (b, _) = fleet.node("gpu-b", 1).await;
    let mut client = fleet.client.clone();

    let forged = client
        .heartbeat(authed("kiln_ncr_forged", beat(&a, vec![])))
        .await
        .unwrap_err();
    assert_eq!(forged.code(), Code::Unauthenticated, "{forged:?}");
    assert!(forged.message().contains("join again"), "{forged:?}");

    let other = client
        .heartbeat(authed(&cred_a, beat(&b, vec![])))
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::PermissionDenied, "{other:?}");

    let ok = client
        .heartbeat(authed(&cred_a, beat(&a, vec![])))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.node_state(), NodeState::Ready);
    assert_eq!(ok.next_interval_ms, 1000);

    // Revoked: every replica drops the cached credential when the notice arrives, long before
    // its cache entry would expire.
    let mut tx = fleet.store.begin().await.unwrap();
    fleet
        .store
        .node_credential_revoke(&mut tx, a.parse().unwrap())
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let revoked = loop {
        match client.heartbeat(authed(&cred_a, beat(&a, vec![]))).await {
            Err(status) => break status,
            Ok(_) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await
            }
            Ok(_) => panic!("the revoked credential still works after 10 s"),
        }
    };
    assert_eq!(revoked.code(), Code::Unauthenticated, "{revoked:?}");
    assert_eq!(
        fleet
            .store
            .node_get(a.parse().unwrap())
            .await
            .unwrap()
            .state,
        "retired"
    );
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn bad_registrations_are_refused_and_change_nothing(pool: PgPool) {
    let fleet = Fleet::start(pool).await;
    let (node, cred) = fleet.node("gpu-a", 2).await;
    let mut client = fleet.client.clone();

    let mut too_many = register("gpu-a", 65);
    too_many.inventory.as_mut().unwrap().hostname = "gpu-a".into();
    let status = client.register(authed(&cred, too_many)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    let mut twice = register("gpu-a", 2);
    let inv = twice.inventory.as_mut().unwrap();
    inv.gpus[1].uuid = inv.gpus[0].uuid.clone();
    let status = client.register(authed(&cred, twice)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("listed twice"), "{status:?}");

    let mut v2 = register("gpu-a", 2);
    v2.protocol_version = Some(ProtocolVersion { major: 2, minor: 0 });
    let status = client.register(authed(&cred, v2)).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");

    // A newer minor version of the same major is fine.
    let mut newer = register("gpu-a", 2);
    newer.protocol_version = Some(ProtocolVersion {
        major: 1,
        minor: 99,
    });
    client
        .register(authed(&cred, newer))
        .await
        .expect("same major");

    assert_eq!(
        fleet
            .store
            .node_gpus(node.parse().unwrap())
            .await
            .unwrap()
            .len(),
        2
    );
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn an_unhealthy_gpu_leaves_capacity_and_comes_back_when_healthy(pool: PgPool) {
    let fleet = Fleet::start(pool).await;
    let (node, cred) = fleet.node("gpu-a", 4).await;
    let mut client = fleet.client.clone();
    assert_eq!(capacity(&fleet).await, (4, 4, 0));

    let sick = GpuHealthStatus {
        uuid: gpu_uuid("gpu-a", 2),
        health: GpuHealth::Unhealthy as i32,
        reason: "XID 79: GPU has fallen off the bus".into(),
    };
    client
        .heartbeat(authed(&cred, beat(&node, vec![sick.clone()])))
        .await
        .unwrap();
    assert_eq!(
        capacity(&fleet).await,
        (4, 3, 1),
        "the node stays, the GPU goes"
    );
    assert_eq!(
        fleet
            .store
            .node_get(node.parse().unwrap())
            .await
            .unwrap()
            .state,
        "ready"
    );
    // Repeating the same health writes no new event.
    client
        .heartbeat(authed(&cred, beat(&node, vec![sick])))
        .await
        .unwrap();

    let well = GpuHealthStatus {
        uuid: gpu_uuid("gpu-a", 2),
        health: GpuHealth::Healthy as i32,
        reason: String::new(),
    };
    client
        .heartbeat(authed(&cred, beat(&node, vec![well])))
        .await
        .unwrap();
    assert_eq!(capacity(&fleet).await, (4, 4, 0));
    let events = fleet
        .store
        .gpu_events(node.parse().unwrap(), 10)
        .await
        .unwrap();
    let health: Vec<&str> = events
        .iter()
        .filter(|e| e.kind == "health")
        .map(|e| e.message.as_str())
        .collect();
    assert_eq!(
        health,
        ["healthy", "unhealthy: XID 79: GPU has fallen off the bus"]
    );
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn metrics_record_the_latest_sample_and_xid_events(pool: PgPool) {
    let fleet = Fleet::start(pool).await;
    let (node, cred) = fleet.node("gpu-a", 2).await;
    let report = |sm: u32, xid: bool| MetricsReport {
        node_id: node.clone(),
        sampled_at_unix_ms: 1_790_000_000_000,
        samples: vec![GpuSample {
            uuid: gpu_uuid("gpu-a", 1),
            temperature_c: 61,
            power_w: 512.5,
            sm_util_pct: sm,
            mem_util_pct: 40,
            memory_used_mib: 70_000,
            health: if xid {
                GpuHealth::Unhealthy
            } else {
                GpuHealth::Healthy
            } as i32,
            xid_events: if xid {
                vec![XidEvent {
                    code: 48,
                    at_unix_ms: 0,
                    message: "double-bit ECC".into(),
                }]
            } else {
                vec![]
            },
            ..GpuSample::default()
        }],
    };
    let summary = fleet
        .client
        .clone()
        .stream_metrics(authed(
            &cred,
            stream::iter(vec![report(10, false), report(93, true)]),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((summary.reports_received, summary.samples_received), (2, 2));
    let gpus = fleet.store.node_gpus(node.parse().unwrap()).await.unwrap();
    assert_eq!(gpus[1].sm_util_pct, Some(93));
    assert_eq!(gpus[1].memory_used_mib, Some(70_000));
    // Health is the heartbeat's to set (it carries the reason); the XID is on record.
    assert_eq!(gpus[1].health, "healthy");
    let events = fleet
        .store
        .gpu_events(node.parse().unwrap(), 10)
        .await
        .unwrap();
    assert!(
        events.iter().any(|e| e.kind == "xid" && e.code == Some(48)),
        "{events:?}"
    );
    assert_eq!(capacity(&fleet).await, (2, 2, 0));
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn observed_state_is_recorded_but_never_for_another_nodes_work(pool: PgPool) {
    let fleet = Fleet::start(pool).await;
    let (a, cred_a) = fleet.node("gpu-a", 1).await;
    let (b, _) = fleet.node("gpu-b", 1).await;
    let mine = AssignmentId::new();
    let theirs = AssignmentId::new();
    let mut tx = fleet.store.begin().await.unwrap();
    for (id, node) in [(mine, &a), (theirs, &b)] {
        fleet
            .store
            .assignment_put(
                &mut tx,
                AssignmentPut {
                    id,
                    node: node.parse().unwrap(),
                    kind: AssignmentKind::Pod,
                    spec: &[],
                    gpu_uuids: &[],
                },
            )
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    let seen = |id: AssignmentId, state: ObservedState| ObservedAssignment {
        assignment_id: id.to_string(),
        generation: 1,
        state: state as i32,
        reason: "pulling image 43%".into(),
        observed_at_unix_ms: 1_790_000_000_000,
        ..ObservedAssignment::default()
    };
    let mut client = fleet.client.clone();
    let ack = client
        .report_observed(authed(
            &cred_a,
            ObservedReport {
                node_id: a.clone(),
                applied_revision: 1,
                assignments: vec![seen(mine, ObservedState::Starting)],
                complete: true,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ack.recorded_revision, 1);

    let refused = client
        .report_observed(authed(
            &cred_a,
            ObservedReport {
                node_id: a.clone(),
                applied_revision: 1,
                assignments: vec![seen(theirs, ObservedState::Failed)],
                complete: false,
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(
        fleet
            .store
            .observed_list(b.parse().unwrap())
            .await
            .unwrap()
            .is_empty()
    );
    let observed = fleet.store.observed_list(a.parse().unwrap()).await.unwrap();
    assert_eq!(observed.len(), 1);
    assert_eq!(
        (observed[0].state.as_str(), observed[0].reason.as_str()),
        ("starting", "pulling image 43%")
    );

    let garbage = client
        .report_observed(authed(
            &cred_a,
            ObservedReport {
                node_id: a.clone(),
                applied_revision: 1,
                assignments: vec![ObservedAssignment {
                    assignment_id: "not-an-id".into(),
                    ..ObservedAssignment::default()
                }],
                complete: false,
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(garbage.code(), Code::InvalidArgument, "{garbage:?}");
}
