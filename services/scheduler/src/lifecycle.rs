//! The node lifecycle controller: silence makes a node unreachable, longer silence makes it
//! lost, and a lost node's work is handed back (recorded `lost`, removed from the node's log so
//! the agent stops it if it ever returns).
//!
//! The thresholds are [`LivenessPolicy`]'s; the transitions are conditional `UPDATE`s in
//! [`kiln_store`], so any number of replicas may run this loop: each transition happens once,
//! in whichever replica gets there first. A heartbeat brings a node back online (in the
//! node-control service, not here).

use std::future::Future;
use std::time::Duration;

use kiln_domain::{LivenessPolicy, WorkloadId};
use kiln_store::{AuditEvent, LivenessChange, Store, StoreError};

/// Log entries applied by their node and older than this are pruned.
const EVENT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone)]
pub struct LifecycleController {
    store: Store,
    policy: LivenessPolicy,
}

impl LifecycleController {
    pub fn new(store: Store, policy: LivenessPolicy) -> Self {
        Self { store, policy }
    }

    /// One pass: mark what fell silent, audit it, answer what changed.
    pub async fn tick(&self) -> Result<Vec<LivenessChange>, StoreError> {
        let mut changes = self
            .store
            .nodes_mark_unreachable(self.policy.unreachable_after)
            .await?;
        changes.extend(self.store.nodes_mark_lost(self.policy.lost_after).await?);
        for change in &changes {
            match change.to {
                "lost" => tracing::warn!(
                    node = %change.node,
                    hostname = change.hostname,
                    lost_assignments = change.lost_assignments.len(),
                    "node lost; its work is handed back to the scheduler"
                ),
                to => {
                    tracing::warn!(node = %change.node, hostname = change.hostname, to, "node unreachable")
                }
            }
            metrics::counter!("kiln_node_liveness_transitions_total", "to" => change.to)
                .increment(1);
            let mut tx = self.store.begin().await?;
            let event = AuditEvent {
                org_id: None,
                actor_user: None,
                actor_api_key: None,
                action: if change.to == "lost" {
                    "node.lost"
                } else {
                    "node.unreachable"
                },
                target: Some(change.node.to_string()),
                ip: None,
                details: serde_json::json!({
                    "hostname": change.hostname,
                    "lost_assignments": change
                        .lost_assignments
                        .iter()
                        .map(|a| a.to_string())
                        .collect::<Vec<_>>(),
                }),
            };
            self.store.audit_record(&mut tx, &event).await?;
            tx.commit().await?;
        }
        Ok(changes)
    }

    /// Move the work off draining nodes, by kind: pods and endpoint replicas back to the queue
    /// (placed elsewhere), instances stopped (their GPUs are passed through on that host).
    /// Answers how many workloads moved.
    pub async fn drain(&self) -> Result<usize, StoreError> {
        let mut moved = 0;
        for node in self.store.nodes_draining_with_work().await? {
            let mut tx = self.store.begin().await?;
            let hostname = self.store.node_get(node).await?.hostname;
            for w in self.store.workloads_on_node(&mut tx, node).await? {
                let (state, reason) = if w.kind == "instance" {
                    (
                        "stopped",
                        format!(
                            "the node {hostname} was drained; start the instance to place it on another node"
                        ),
                    )
                } else {
                    (
                        "pending",
                        format!("the node {hostname} is draining; placing it elsewhere"),
                    )
                };
                self.store
                    .workload_release(&mut tx, WorkloadId::from_uuid(w.id), state, &reason)
                    .await?;
                moved += 1;
            }
            tx.commit().await?;
            tracing::info!(%node, hostname, moved, "drained node");
        }
        Ok(moved)
    }

    /// Tick every `every` until `stop`; failures are logged and retried at the next tick.
    pub async fn run(self, every: Duration, stop: impl Future<Output = ()> + Send) {
        let mut interval = tokio::time::interval(every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_prune = tokio::time::Instant::now();
        tokio::pin!(stop);
        loop {
            tokio::select! {
                biased;
                () = &mut stop => return,
                _ = interval.tick() => {}
            }
            if let Err(e) = self.tick().await {
                tracing::error!(error = %e, "lifecycle pass failed; retrying next tick");
            }
            if let Err(e) = self.drain().await {
                tracing::error!(error = %e, "draining failed; retrying next tick");
            }
            if last_prune.elapsed() >= PRUNE_EVERY {
                last_prune = tokio::time::Instant::now();
                match self.store.assignment_events_prune(EVENT_RETENTION).await {
                    Ok(n) => tracing::debug!(pruned = n, "assignment log pruned"),
                    Err(e) => tracing::warn!(error = %e, "pruning the assignment log failed"),
                }
            }
        }
    }
}
