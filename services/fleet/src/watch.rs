//! The assignment stream of one node: replay from the agent's revision, then follow.
//!
//! The contract (node.proto, `WatchRequest`): events with a revision greater than
//! `from_revision`, in order, with no gaps. `from_revision = 0`, a revision older than the log
//! keeps (pruned) or newer than any issued (the agent is ahead of this database) start with a
//! `Snapshot` instead, after which events continue from the snapshot's revision. The stream is
//! level-triggered: a wake-up from the [`WatchHub`] or the re-check timer only makes it read the
//! log again, so missed wake-ups cost latency, never events.

use std::time::Duration;

use futures::Stream;
use kiln_domain::{AssignmentId, NodeId};
use kiln_proto::node::v1::{
    Assignment, AssignmentEvent, AssignmentRemoval, AssignmentSnapshot, assignment_event,
};
use kiln_store::{AssignmentEventRecord, AssignmentRecord, Store};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::hub::WatchHub;

/// Events read per query.
const BATCH: i64 = 256;

/// Start the stream; it ends when the agent goes away.
pub fn stream(
    store: Store,
    hub: WatchHub,
    node: NodeId,
    from_revision: u64,
    recheck: Duration,
) -> impl Stream<Item = Result<AssignmentEvent, Status>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        if let Err(status) = follow(&store, &hub, node, from_revision, recheck, &tx).await {
            let _ = tx.send(Err(status)).await;
        }
    });
    ReceiverStream::new(rx)
}

type Sink = mpsc::Sender<Result<AssignmentEvent, Status>>;

/// Whether the agent is still there to send to.
async fn send(tx: &Sink, event: AssignmentEvent) -> bool {
    tx.send(Ok(event)).await.is_ok()
}

async fn follow(
    store: &Store,
    hub: &WatchHub,
    node: NodeId,
    from_revision: u64,
    recheck: Duration,
    tx: &Sink,
) -> Result<(), Status> {
    // Subscribe before the first read, so a change committed in between still wakes us.
    let mut wake = hub.subscribe(node);
    let mut last = from_revision;
    let mut need_snapshot = from_revision == 0;
    if !need_snapshot {
        let (revision,) = current_revision(store, node).await?;
        // The agent is ahead of this database (restored from backup?): start over.
        need_snapshot = from_revision > revision;
    }
    loop {
        if need_snapshot {
            let snap = store
                .assignment_snapshot(node)
                .await
                .map_err(|e| crate::internal("snapshot", &e))?;
            let revision = snap.revision.max(0) as u64;
            let event = AssignmentEvent {
                revision,
                event: Some(assignment_event::Event::Snapshot(AssignmentSnapshot {
                    assignments: snap.assignments.iter().map(assignment).collect(),
                })),
            };
            if !send(tx, event).await {
                return Ok(());
            }
            last = revision;
            need_snapshot = false;
        }
        let events = store
            .assignment_events_after(node, last, BATCH)
            .await
            .map_err(|e| crate::internal("assignment events", &e))?;
        let full = events.len() as i64 == BATCH;
        for e in &events {
            if e.revision.max(0) as u64 != last + 1 {
                // The log was pruned past what the agent has: a snapshot covers the gap.
                need_snapshot = true;
                break;
            }
            if !send(tx, event(e)).await {
                return Ok(());
            }
            last = e.revision as u64;
        }
        if need_snapshot || full {
            continue;
        }
        tokio::select! {
            changed = wake.changed() => {
                if changed.is_err() {
                    // The hub dropped our channel; make a new one.
                    wake = hub.subscribe(node);
                }
            }
            () = tokio::time::sleep(recheck) => {}
            () = tx.closed() => return Ok(()),
        }
    }
}

async fn current_revision(store: &Store, node: NodeId) -> Result<(u64,), Status> {
    let record = store.node_get(node).await.map_err(|e| match e {
        kiln_store::StoreError::NotFound { .. } => Status::not_found("node not found"),
        e => crate::internal("watch", &e),
    })?;
    Ok((record.assignment_revision.max(0) as u64,))
}

/// The stored spec, with the row's id and generation (the row is the authority).
fn assignment(row: &AssignmentRecord) -> Assignment {
    with_identity(&row.spec, row.id, row.generation)
}

fn with_identity(spec: &[u8], id: uuid::Uuid, generation: i64) -> Assignment {
    let mut a = Assignment::decode(spec).unwrap_or_default();
    a.assignment_id = AssignmentId::from_uuid(id).to_string();
    a.generation = generation.max(0) as u64;
    a
}

fn event(e: &AssignmentEventRecord) -> AssignmentEvent {
    let revision = e.revision.max(0) as u64;
    let event = match &e.spec {
        Some(spec) if e.op == "upsert" => {
            assignment_event::Event::Upsert(with_identity(spec, e.assignment_id, e.generation))
        }
        _ => assignment_event::Event::Remove(AssignmentRemoval {
            assignment_id: AssignmentId::from_uuid(e.assignment_id).to_string(),
            generation: e.generation.max(0) as u64,
        }),
    };
    AssignmentEvent {
        revision,
        event: Some(event),
    }
}
