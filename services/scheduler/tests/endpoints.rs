//! The endpoint controller over a real database: an endpoint keeps its replicas — one that
//! failed is replaced, exactly once even with two controllers racing — and a deleted endpoint
//! gets none. Replicas are placed like pods, as `endpoint_replica` work.

use kiln_domain::{Permission, WorkloadId};
use kiln_scheduler::{EndpointController, Placer};
use kiln_store::{NewEndpoint, ReplicaTemplate, Store};
use kiln_testkit::fleet;
use sqlx::PgPool;

fn template() -> ReplicaTemplate {
    ReplicaTemplate {
        tier: "on_demand".into(),
        gpu_mode: "whole".into(),
        gpu_type: Some("h100-80gb".into()),
        gpu_count: 1,
        mig_profile: None,
        share_memory_mib: None,
        cpu_millis: 1000,
        memory_mib: 4096,
        disk_gib: 10,
        spec: serde_json::json!({"image": "kiln/demo-model:1", "ports": [8000], "env": {},
                                 "command": [], "restart_policy": "always"}),
    }
}

async fn live(store: &Store, endpoint: uuid::Uuid) -> Vec<(uuid::Uuid, String)> {
    sqlx::query_as(
        "SELECT id, state FROM workloads WHERE endpoint_id = $1
         AND state IN ('pending', 'scheduled', 'starting', 'running') ORDER BY id",
    )
    .bind(endpoint)
    .fetch_all(store.pool())
    .await
    .unwrap()
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn a_failed_replica_is_replaced_once_and_a_deleted_endpoint_gets_none(pool: PgPool) {
    let store = Store::new(pool);
    fleet::registered_node(&store, "gpu-a", 8, false).await;
    let scope = fleet::org_scope(&store, "owner", Permission::WorkloadWrite).await;
    let mut tx = store.begin().await.unwrap();
    let ep = store
        .endpoint_create(
            &mut tx,
            &scope,
            &NewEndpoint {
                name: "llm",
                port: 8000,
                health_path: "/health",
                min_replicas: 2,
                max_replicas: 4,
                limits: Default::default(),
                autoscaling: Default::default(),
                replica: template(),
                price: None,
            },
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    Placer::new(store.clone()).pass().await.unwrap();
    let replicas = live(&store, ep.id).await;
    assert_eq!(replicas.len(), 2);
    assert!(
        replicas.iter().all(|(_, s)| s == "scheduled"),
        "{replicas:?}"
    );

    // One replica fails (its container died for good): two controllers race to replace it.
    let mut tx = store.begin().await.unwrap();
    store
        .workload_release(
            &mut tx,
            WorkloadId::from_uuid(replicas[0].0),
            "failed",
            "container exited 1",
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let (one, two) = (
        EndpointController::new(store.clone()),
        EndpointController::new(store.clone()),
    );
    let (a, b) = tokio::join!(one.pass(), two.pass());
    assert_eq!(a.unwrap().0 + b.unwrap().0, 1, "replaced exactly once");
    assert_eq!(live(&store, ep.id).await.len(), 2);
    assert_eq!(
        EndpointController::new(store.clone()).pass().await.unwrap(),
        (0, 0)
    );

    // The autoscaler asks for fewer (and never below min or above max): the surplus ends, by
    // two controllers at once exactly once.
    let newest = live(&store, ep.id).await.last().unwrap().0;
    assert!(
        !store.endpoint_set_desired(ep.id, 1).await.unwrap(),
        "min_replicas is 2: clamped to it, so no change"
    );
    let (a, b) = tokio::join!(one.pass(), two.pass());
    assert_eq!((a.unwrap(), b.unwrap()), ((0, 0), (0, 0)), "already at min");
    sqlx::query("UPDATE endpoints SET min_replicas = 1 WHERE id = $1")
        .bind(ep.id)
        .execute(store.pool())
        .await
        .unwrap();
    assert!(store.endpoint_set_desired(ep.id, 1).await.unwrap());
    let (a, b) = tokio::join!(one.pass(), two.pass());
    assert_eq!(a.unwrap().1 + b.unwrap().1, 1, "removed exactly once");
    let left = live(&store, ep.id).await;
    assert_eq!(left.len(), 1);
    assert_ne!(left[0].0, newest, "the newest replica went");
    assert!(store.endpoint_set_desired(ep.id, 99).await.unwrap());
    assert_eq!(one.pass().await.unwrap(), (3, 0), "up to max_replicas, 4");
    assert!(store.endpoint_set_desired(ep.id, 2).await.unwrap());
    assert_eq!(one.pass().await.unwrap(), (0, 2));

    // Out of credit: billing stopped the org's work, and the controller does not bring it back
    // until the mark is lifted.
    sqlx::query("UPDATE billing_settings SET credit_exhausted_at = now() WHERE org_id = $1")
        .bind(scope.org_id().as_uuid())
        .execute(store.pool())
        .await
        .unwrap();
    let replicas = live(&store, ep.id).await;
    let mut tx = store.begin().await.unwrap();
    store
        .workload_release(
            &mut tx,
            WorkloadId::from_uuid(replicas[0].0),
            "stopped",
            "out of credit",
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let controller = EndpointController::new(store.clone());
    assert_eq!(
        controller.pass().await.unwrap(),
        (0, 0),
        "not while out of credit"
    );
    sqlx::query("UPDATE billing_settings SET credit_exhausted_at = NULL WHERE org_id = $1")
        .bind(scope.org_id().as_uuid())
        .execute(store.pool())
        .await
        .unwrap();
    assert_eq!(controller.pass().await.unwrap(), (1, 0));

    // Deleted: its replicas end and nothing replaces them.
    let mut tx = store.begin().await.unwrap();
    assert!(
        store
            .endpoint_delete(&mut tx, &scope, ep.id, "deleted")
            .await
            .unwrap()
    );
    tx.commit().await.unwrap();
    assert!(live(&store, ep.id).await.is_empty());
    assert_eq!(
        EndpointController::new(store.clone()).pass().await.unwrap(),
        (0, 0)
    );
    let (held,): (i64,) = sqlx::query_as("SELECT count(*) FROM gpu_allocations")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(held, 0, "their GPUs are free");
}
