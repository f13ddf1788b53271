//! `WatchAssignments`: a snapshot to start, then every change in order; resuming from the last
//! applied revision replays nothing and misses nothing, whichever replica holds the stream.

use std::time::Duration;

use futures::StreamExt;
use kiln_domain::{AssignmentId, NodeId};
use kiln_proto::node::v1::{
    Assignment, AssignmentEvent, PodSpec, WatchRequest, assignment, assignment_event,
};
use kiln_store::Store;
use prost::Message;
use sqlx::PgPool;
use tonic::Streaming;

use crate::{Fleet, authed};

async fn put(store: &Store, node: &str, id: AssignmentId, image: &str) -> (u64, u64) {
    let spec = Assignment {
        kind: Some(assignment::Kind::Pod(PodSpec {
            image: image.into(),
            ..PodSpec::default()
        })),
        ..Assignment::default()
    }
    .encode_to_vec();
    kiln_testkit::fleet::put_assignment(store, node.parse().unwrap(), id, &spec).await
}

async fn remove(store: &Store, id: AssignmentId) -> u64 {
    let mut tx = store.begin().await.unwrap();
    let r = store.assignment_remove(&mut tx, id).await.unwrap();
    tx.commit().await.unwrap();
    r
}

async fn watch(fleet: &Fleet, node: &str, cred: &str, from: u64) -> Streaming<AssignmentEvent> {
    fleet
        .client
        .clone()
        .watch_assignments(authed(
            cred,
            WatchRequest {
                node_id: node.into(),
                from_revision: from,
            },
        ))
        .await
        .unwrap()
        .into_inner()
}

/// The next event, within a deadline (the stream must be woken by NOTIFY: the servers'
/// re-check timer is ten minutes).
async fn next(stream: &mut Streaming<AssignmentEvent>) -> AssignmentEvent {
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("an event within 10 s")
        .expect("the stream is open")
        .expect("not an error")
}

fn image(a: &Assignment) -> &str {
    match &a.kind {
        Some(assignment::Kind::Pod(p)) => &p.image,
        _ => "",
    }
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn a_new_stream_starts_with_a_snapshot_then_follows_changes(pool: PgPool) {
    let fleet = Fleet::start(pool).await;
    let (node, cred) = fleet.node("gpu-a", 1).await;
    let a = AssignmentId::new();
    let b = AssignmentId::new();
    put(&fleet.store, &node, a, "img:1").await;
    put(&fleet.store, &node, b, "img:1").await;
    remove(&fleet.store, b).await;

    let mut events = watch(&fleet, &node, &cred, 0).await;
    let first = next(&mut events).await;
    assert_eq!(first.revision, 3);
    let Some(assignment_event::Event::Snapshot(snap)) = first.event else {
        panic!("expected a snapshot, got {first:?}");
    };
    assert_eq!(snap.assignments.len(), 1);
    assert_eq!(snap.assignments[0].assignment_id, a.to_string());
    assert_eq!(snap.assignments[0].generation, 1);

    // A change made now arrives as the next revision, with the generation bumped.
    assert_eq!(put(&fleet.store, &node, a, "img:2").await, (4, 2));
    let e = next(&mut events).await;
    assert_eq!(e.revision, 4);
    let Some(assignment_event::Event::Upsert(up)) = e.event else {
        panic!("expected an upsert, got {e:?}");
    };
    assert_eq!((up.generation, image(&up)), (2, "img:2"));
    assert_eq!(up.assignment_id, a.to_string());

    remove(&fleet.store, a).await;
    let e = next(&mut events).await;
    let Some(assignment_event::Event::Remove(rm)) = e.event else {
        panic!("expected a removal, got {e:?}");
    };
    assert_eq!((e.revision, rm.generation), (5, 2));
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn resuming_sends_exactly_what_came_after_the_applied_revision(pool: PgPool) {
    let fleet = Fleet::start(pool).await;
    let (node, cred) = fleet.node("gpu-a", 1).await;
    let ids: Vec<AssignmentId> = (0..5).map(|_| AssignmentId::new()).collect();
    for id in &ids {
        put(&fleet.store, &node, *id, "img").await;
    }
    let mut events = watch(&fleet, &node, &cred, 3).await;
    let got = [next(&mut events).await, next(&mut events).await];
    assert_eq!(got.map(|e| e.revision), [4, 5]);
    put(&fleet.store, &node, AssignmentId::new(), "img").await;
    assert_eq!(next(&mut events).await.revision, 6);
    // Nothing else is pending.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), events.next())
            .await
            .is_err()
    );
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn a_change_reaches_the_stream_on_whichever_replica_holds_it(pool: PgPool) {
    let one = Fleet::start(pool).await;
    let two = Fleet::start_with(one.store.clone()).await;
    let (node, cred) = one.node("gpu-a", 1).await;
    let mut on_two = watch(&two, &node, &cred, 0).await;
    let mut on_one = watch(&one, &node, &cred, 0).await;
    assert_eq!(next(&mut on_two).await.revision, 0);
    assert_eq!(next(&mut on_one).await.revision, 0);
    // Written through a connection neither server owns.
    let writer = Store::connect(&database_url(&one.store).await, 1)
        .await
        .unwrap();
    put(&writer, &node, AssignmentId::new(), "img").await;
    assert_eq!(next(&mut on_two).await.revision, 1);
    assert_eq!(next(&mut on_one).await.revision, 1);
}

/// The per-test database's URL (sqlx::test makes one database per test).
async fn database_url(store: &Store) -> String {
    kiln_testkit::database_url(store.pool()).await
}

#[sqlx::test(migrator = "kiln_store::MIGRATOR")]
async fn a_revision_the_log_no_longer_has_or_never_had_gets_a_snapshot(pool: PgPool) {
    let fleet = Fleet::start(pool).await;
    let (node, cred) = fleet.node("gpu-a", 1).await;
    let keep = AssignmentId::new();
    put(&fleet.store, &node, keep, "img").await;
    let gone = AssignmentId::new();
    put(&fleet.store, &node, gone, "img").await;
    remove(&fleet.store, gone).await;
    put(&fleet.store, &node, AssignmentId::new(), "img").await;
    // Prune the first three entries, as the controller does once a node applied them.
    sqlx::query("DELETE FROM node_assignment_events WHERE revision <= 3")
        .execute(fleet.store.pool())
        .await
        .unwrap();

    let mut events = watch(&fleet, &node, &cred, 1).await;
    let e = next(&mut events).await;
    assert_eq!(e.revision, 4);
    let Some(assignment_event::Event::Snapshot(snap)) = e.event else {
        panic!("a pruned gap is covered by a snapshot: {e:?}");
    };
    assert_eq!(snap.assignments.len(), 2);

    // An agent claiming a revision from the future (a restored database) starts over too.
    let mut events = watch(&fleet, &node, &cred, 99).await;
    let e = next(&mut events).await;
    assert!(
        matches!(e.event, Some(assignment_event::Event::Snapshot(_))),
        "{e:?}"
    );
    assert_eq!(e.revision, 4);
    let _: NodeId = node.parse().unwrap();
}
