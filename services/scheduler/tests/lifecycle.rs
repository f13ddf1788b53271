//! The node lifecycle controller over a real database: silence makes a node unreachable, then
//! lost (its work handed back), a heartbeat brings it back to what the operator decided, and
//! two controllers racing make each transition once.

use std::time::Duration;

use kiln_domain::{AdminState, AssignmentId, LivenessPolicy, NodeId};
use kiln_scheduler::LifecycleController;
use kiln_store::{AssignmentKind, AssignmentPut, Store};
use sqlx::PgPool;

async fn node(store: &Store, hostname: &str) -> NodeId {
    kiln_testkit::fleet::registered_node(store, hostname, 0, false).await
}

/// Pretend the node last spoke `secs` seconds ago.
async fn silence(store: &Store, node: NodeId, secs: i64) {
    sqlx::query(
        "UPDATE nodes SET last_heartbeat_at = now() - make_interval(secs => $2) WHERE id = $1",
    )
    .bind(node.as_uuid())
    .bind(secs as f64)
    .execute(store.pool())
    .await
    .unwrap();
}

fn policy() -> LivenessPolicy {
    LivenessPolicy {
        unreachable_after: Duration::from_secs(30),
        lost_after: Duration::from_secs(300),
    }
}

async fn state(store: &Store, node: NodeId) -> String {
    store.node_get(node).await.unwrap().state
}

async fn audits(store: &Store, action: &str) -> i64 {
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM audit_events WHERE action = $1")
        .bind(action)
        .fetch_one(store.pool())
        .await
        .unwrap();
    n
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn a_silent_node_becomes_unreachable_then_lost_and_its_work_is_handed_back(pool: PgPool) {
    let store = Store::new(pool);
    let quiet = node(&store, "quiet").await;
    let chatty = node(&store, "chatty").await;
    let work = AssignmentId::new();
    let mut tx = store.begin().await.unwrap();
    store
        .assignment_put(
            &mut tx,
            AssignmentPut {
                id: work,
                node: quiet,
                kind: AssignmentKind::Pod,
                spec: &[],
                gpu_uuids: &[],
            },
        )
        .await
        .unwrap();
    store
        .node_set_admin_state(&mut tx, quiet, AdminState::Cordoned)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let controller = LifecycleController::new(store.clone(), policy());

    silence(&store, quiet, 29).await;
    assert!(
        controller.tick().await.unwrap().is_empty(),
        "inside the grace"
    );
    assert_eq!(state(&store, quiet).await, "cordoned");

    silence(&store, quiet, 31).await;
    let changes = controller.tick().await.unwrap();
    assert_eq!(changes.len(), 1);
    assert_eq!((changes[0].node, changes[0].to), (quiet, "unreachable"));
    assert_eq!(state(&store, quiet).await, "unreachable");
    assert_eq!(state(&store, chatty).await, "ready");
    assert_eq!(
        store.assignment_list(quiet).await.unwrap().len(),
        1,
        "work is kept while unreachable"
    );

    silence(&store, quiet, 301).await;
    let changes = controller.tick().await.unwrap();
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0].to, "lost");
    assert_eq!(changes[0].lost_assignments, vec![work]);
    assert_eq!(state(&store, quiet).await, "lost");
    assert!(store.assignment_list(quiet).await.unwrap().is_empty());
    let observed = store.observed_list(quiet).await.unwrap();
    assert_eq!(
        (observed[0].state.as_str(), observed[0].reason.as_str()),
        ("lost", "the node was lost")
    );
    // The removal is in the node's log, so the agent stops the work if it comes back.
    let log = store.assignment_events_after(quiet, 1, 10).await.unwrap();
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].op, "remove");
    assert_eq!(
        (
            audits(&store, "node.unreachable").await,
            audits(&store, "node.lost").await
        ),
        (1, 1)
    );

    // It comes back: online, and cordoned again as the operator left it.
    let status = store.node_heartbeat(quiet, 0, &[]).await.unwrap();
    assert_eq!(status.recovered_from.as_deref(), Some("lost"));
    assert_eq!(state(&store, quiet).await, "cordoned");
    assert!(controller.tick().await.unwrap().is_empty());
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn two_controllers_racing_make_each_transition_once(pool: PgPool) {
    let store = Store::new(pool);
    let nodes = [
        node(&store, "a").await,
        node(&store, "b").await,
        node(&store, "c").await,
    ];
    for n in nodes {
        silence(&store, n, 31).await;
    }
    let one = LifecycleController::new(store.clone(), policy());
    let two = LifecycleController::new(store.clone(), policy());
    let (a, b) = tokio::join!(one.tick(), two.tick());
    assert_eq!(a.unwrap().len() + b.unwrap().len(), 3);
    for n in nodes {
        silence(&store, n, 301).await;
    }
    let (a, b) = tokio::join!(one.tick(), two.tick());
    assert_eq!(a.unwrap().len() + b.unwrap().len(), 3);
    assert_eq!(
        (
            audits(&store, "node.unreachable").await,
            audits(&store, "node.lost").await
        ),
        (3, 3)
    );
}
