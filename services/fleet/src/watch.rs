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
use kiln_auth::{SecretBox, pod_env_context};
use kiln_domain::{AssignmentId, NodeId, OrgId};
use kiln_proto::node::v1::{
    Assignment, AssignmentEvent, AssignmentRemoval, AssignmentSnapshot, PodSpec, assignment,
    assignment_event,
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
    secrets: Option<SecretBox>,
) -> impl Stream<Item = Result<AssignmentEvent, Status>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let f = Follow {
            store: &store,
            hub: &hub,
            secrets: secrets.as_ref(),
            node,
            recheck,
        };
        if let Err(status) = f.run(from_revision, &tx).await {
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

struct Follow<'a> {
    store: &'a Store,
    hub: &'a WatchHub,
    secrets: Option<&'a SecretBox>,
    node: NodeId,
    recheck: Duration,
}

impl Follow<'_> {
    async fn run(&self, from_revision: u64, tx: &Sink) -> Result<(), Status> {
        let Follow {
            store,
            hub,
            secrets,
            node,
            recheck,
        } = *self;
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
                        assignments: snap
                            .assignments
                            .iter()
                            .map(|row| assignment(row, secrets))
                            .collect(),
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
                if !send(tx, event(e, secrets)).await {
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
}

async fn current_revision(store: &Store, node: NodeId) -> Result<(u64,), Status> {
    let record = store.node_get(node).await.map_err(|e| match e {
        kiln_store::StoreError::NotFound { .. } => Status::not_found("node not found"),
        e => crate::internal("watch", &e),
    })?;
    Ok((record.assignment_revision.max(0) as u64,))
}

/// The stored spec, with the row's id and generation (the row is the authority).
fn assignment(row: &AssignmentRecord, secrets: Option<&SecretBox>) -> Assignment {
    with_identity(&row.spec, row.id, row.generation, secrets)
}

fn with_identity(
    spec: &[u8],
    id: uuid::Uuid,
    generation: i64,
    secrets: Option<&SecretBox>,
) -> Assignment {
    let mut a = Assignment::decode(spec).unwrap_or_default();
    a.assignment_id = AssignmentId::from_uuid(id).to_string();
    a.generation = generation.max(0) as u64;
    if let Some(assignment::Kind::Pod(pod)) = &mut a.kind {
        unseal_env(pod, secrets, &a.assignment_id);
    }
    a
}

/// Open a pod's sealed secret env values into its env, for this stream only: the assignment
/// log keeps them sealed. A value that cannot be opened (no key here, or another key sealed it)
/// stays in `env_sealed`, and the agent fails the pod with a reason rather than run it without.
pub fn unseal_env(pod: &mut PodSpec, secrets: Option<&SecretBox>, assignment_id: &str) {
    if pod.env_sealed.is_empty() {
        return;
    }
    let Some(secrets) = secrets else {
        tracing::error!(
            assignment = assignment_id,
            "a pod has secret env values but this control plane has no KILN_SECRETS_KEY"
        );
        return;
    };
    let Ok(org) = pod.org_id.parse::<OrgId>() else {
        tracing::error!(
            assignment = assignment_id,
            "a pod with secret env values names no org"
        );
        return;
    };
    let sealed = std::mem::take(&mut pod.env_sealed);
    for (key, value) in sealed {
        match secrets.open(&pod_env_context(org, &key), &value) {
            Ok(plain) => {
                pod.env.insert(key, plain);
            }
            Err(e) => {
                tracing::error!(assignment = assignment_id, key = %key, error = %e, "a secret env value does not open");
                pod.env_sealed.insert(key, value);
            }
        }
    }
}

fn event(e: &AssignmentEventRecord, secrets: Option<&SecretBox>) -> AssignmentEvent {
    let revision = e.revision.max(0) as u64;
    let event = match &e.spec {
        Some(spec) if e.op == "upsert" => assignment_event::Event::Upsert(with_identity(
            spec,
            e.assignment_id,
            e.generation,
            secrets,
        )),
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
