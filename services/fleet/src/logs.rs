//! `PushLogs`: workload output from agents into the log store.
//!
//! A node may only write the output of workloads placed on it: each line's assignment is looked
//! up (once per stream) among the node's own, and lines of anything else — another node's
//! assignment, one since removed, or a malformed id — are dropped and counted, never stored.

use std::collections::HashMap;

use kiln_domain::NodeId;
use kiln_logs::{LogStore, NewLine, Source};
use kiln_proto::node::v1::{LogBatch, LogSource};
use kiln_store::Store;
use tonic::Status;
use uuid::Uuid;

/// Most lines one batch may carry.
pub const MAX_BATCH_LINES: usize = 1024;

/// Which workload each assignment of this stream's node realises (`None`: not the node's).
#[derive(Debug, Default)]
pub struct Owners {
    known: HashMap<Uuid, Option<Uuid>>,
}

impl Owners {
    async fn workload(
        &mut self,
        store: &Store,
        node: NodeId,
        assignment: Uuid,
    ) -> Result<Option<Uuid>, Status> {
        if let Some(w) = self.known.get(&assignment) {
            return Ok(*w);
        }
        let w = store
            .workload_of_assignment(node, assignment)
            .await
            .map_err(|e| crate::internal("log owner lookup", &e))?;
        // Bounded: a node has few assignments; a flood of made-up ids just stops being cached.
        if self.known.len() < 4096 {
            self.known.insert(assignment, w);
        }
        Ok(w)
    }
}

fn source(raw: i32) -> Source {
    match LogSource::try_from(raw).unwrap_or(LogSource::Unspecified) {
        LogSource::Stderr => Source::Stderr,
        LogSource::Console => Source::Console,
        LogSource::Agent => Source::Agent,
        LogSource::Stdout | LogSource::Unspecified => Source::Stdout,
    }
}

/// Store one batch; answers how many lines were accepted.
pub async fn store_batch(
    store: &Store,
    logs: &LogStore,
    node: NodeId,
    owners: &mut Owners,
    batch: LogBatch,
) -> Result<u64, Status> {
    if batch.lines.len() > MAX_BATCH_LINES {
        return Err(Status::invalid_argument(format!(
            "at most {MAX_BATCH_LINES} lines per batch"
        )));
    }
    // Consecutive lines of one workload go in one round trip.
    let mut accepted = 0u64;
    let mut dropped = 0u64;
    let mut run: Vec<NewLine<'_>> = Vec::new();
    let mut run_owner: Option<Uuid> = None;
    for line in &batch.lines {
        let owner = match line.assignment_id.parse::<kiln_domain::AssignmentId>() {
            Ok(a) => owners.workload(store, node, a.as_uuid()).await?,
            Err(_) => None,
        };
        let Some(owner) = owner else {
            dropped += 1;
            continue;
        };
        if run_owner != Some(owner) {
            if let Some(prev) = run_owner {
                append(logs, prev, &run).await?;
                run.clear();
            }
            run_owner = Some(owner);
        }
        run.push(NewLine {
            source: source(line.source),
            text: kiln_logs::clip(&line.text),
            at_unix_ms: line.at_unix_ms,
        });
        accepted += 1;
    }
    if let Some(owner) = run_owner {
        append(logs, owner, &run).await?;
    }
    if dropped > 0 {
        tracing::debug!(%node, dropped, "log lines of assignments that are not this node's were dropped");
    }
    Ok(accepted)
}

async fn append(logs: &LogStore, workload: Uuid, lines: &[NewLine<'_>]) -> Result<(), Status> {
    logs.append(workload, lines).await.map_err(|e| {
        tracing::warn!(error = %e, "storing workload output failed");
        Status::unavailable("the log store is unreachable; retry")
    })
}
