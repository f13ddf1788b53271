//! The fleet, for operators: bootstrap tokens for joining nodes, the nodes with their GPUs and
//! what runs on each, cordon / uncordon / drain, credentials, and GPU capacity.
//!
//! These are deployment-wide, not tenant data, so there is no `OrgScope`; every operation starts
//! with [`require_operator`]. Anyone else gets 404 — the same answer as an unknown path — so the
//! admin surface is invisible to tenants rather than merely forbidden.

use std::collections::HashMap;
use std::time::Duration;

use kiln_auth::OpaqueSecret;
use kiln_domain::{AdminState, AssignmentId, NodeId};
use kiln_store::{
    AssignmentRecord, AuditEvent, GpuRecord, NewNodeToken, NodeRecord, ObservedView, StoreError,
};
use sqlx::PgConnection;
use uuid::Uuid;

use super::{Checks, page};
use crate::error::ApiError;
use crate::state::{AppState, Caller};
use crate::views::*;

/// The text a bootstrap token starts with (`kiln_nbt_…`); long enough that it is never mistaken
/// for an API key (`kiln_` + 43).
pub const NODE_TOKEN_PREFIX: &str = "kiln_nbt";
pub const DEFAULT_TOKEN_TTL_SECS: i64 = 3600;
pub const MIN_TOKEN_TTL_SECS: i64 = 60;
pub const MAX_TOKEN_TTL_SECS: i64 = 7 * 24 * 3600;
const MAX_NOTE_CHARS: usize = 200;

/// Operators only; everyone else sees nothing here.
pub fn require_operator(caller: &Caller) -> Result<(), ApiError> {
    if caller.principal.is_operator() {
        Ok(())
    } else {
        Err(ApiError::NotFound("resource"))
    }
}

/// A node id from a path: anything malformed is a node that does not exist.
pub fn parse_node(raw: &str) -> Result<NodeId, ApiError> {
    raw.parse().map_err(|_| ApiError::NotFound("node"))
}

pub(crate) fn audit(
    caller: &Caller,
    action: &'static str,
    target: String,
    details: serde_json::Value,
) -> AuditEvent {
    AuditEvent {
        org_id: None,
        actor_user: caller.principal.user_id(),
        actor_api_key: None,
        action,
        target: Some(target),
        ip: caller.client.ip.clone(),
        details,
    }
}

/// Issue a one-time bootstrap token; the answer is the only time the secret is shown.
pub async fn token_create(
    state: &AppState,
    conn: &mut PgConnection,
    caller: &Caller,
    input: &CreateNodeTokenInput,
) -> Result<NodeTokenCreatedView, ApiError> {
    require_operator(caller)?;
    let mut checks = Checks::default();
    let ttl = input.ttl_secs.unwrap_or(DEFAULT_TOKEN_TTL_SECS);
    if !(MIN_TOKEN_TTL_SECS..=MAX_TOKEN_TTL_SECS).contains(&ttl) {
        checks.push(
            "ttl_secs",
            format!("must be between {MIN_TOKEN_TTL_SECS} and {MAX_TOKEN_TTL_SECS} (7 days)"),
        );
    }
    let note = input.note.as_deref().unwrap_or("").trim().to_owned();
    if note.chars().count() > MAX_NOTE_CHARS {
        checks.push(
            "note",
            format!("must be at most {MAX_NOTE_CHARS} characters"),
        );
    }
    checks.finish()?;
    let secret = OpaqueSecret::generate(NODE_TOKEN_PREFIX);
    let record = state
        .store
        .node_token_create(
            conn,
            NewNodeToken {
                digest: &secret.digest(),
                created_by: caller.principal.user_id(),
                ttl: Duration::from_secs(ttl as u64),
                note: &note,
            },
        )
        .await?;
    let event = audit(
        caller,
        "node_token.create",
        record.id.to_string(),
        serde_json::json!({ "ttl_secs": ttl, "note": record.note }),
    );
    state.store.audit_record(conn, &event).await?;
    Ok(NodeTokenCreatedView {
        id: record.id.to_string(),
        token: secret.expose().to_owned(),
        note: record.note,
        created_at: ts(record.created_at),
        expires_at: ts(record.expires_at),
    })
}

/// Nodes, oldest first, each with its GPUs and what runs on them. The page's GPUs come from one
/// query; assignments are read per node that has GPUs and has ever had an assignment.
pub async fn list(
    state: &AppState,
    caller: &Caller,
    limit: Option<i64>,
    cursor: Option<&str>,
) -> Result<NodeList, ApiError> {
    require_operator(caller)?;
    let page = page::<NodeId>(limit, cursor, |n| n.as_uuid())?;
    let p = state.store.node_list(page).await?;
    Ok(NodeList {
        items: node_views(state, &p.items).await?,
        next_cursor: p.next_cursor,
    })
}

/// How many GPU events the node detail shows.
pub const NODE_EVENTS: i64 = 20;

/// One node in full: its GPUs with health, utilisation and what runs on each, and its newest
/// GPU events.
pub async fn get(
    state: &AppState,
    caller: &Caller,
    node: &str,
) -> Result<NodeDetailView, ApiError> {
    require_operator(caller)?;
    let node = parse_node(node)?;
    let record = state.store.node_get(node).await?;
    let view = node_view(state, &record).await?;
    let events = state.store.gpu_events(node, NODE_EVENTS).await?;
    Ok(NodeDetailView {
        node: view,
        gpu_events: events
            .into_iter()
            .map(|e| GpuEventView {
                gpu_uuid: e.gpu_uuid,
                at: ts(e.at),
                kind: e.kind,
                code: e.code,
                message: e.message,
            })
            .collect(),
    })
}

/// The fleet's GPUs per type: present, schedulable, unhealthy.
pub async fn capacity(state: &AppState, caller: &Caller) -> Result<FleetCapacityView, ApiError> {
    require_operator(caller)?;
    let rows = state.store.fleet_capacity().await?;
    Ok(FleetCapacityView {
        items: rows
            .into_iter()
            .map(|r| GpuTypeCapacityView {
                gpu_type: r.gpu_type,
                total: r.total,
                schedulable: r.schedulable,
                unhealthy: r.unhealthy,
            })
            .collect(),
    })
}

/// Cordon: the node keeps its work and takes no new work.
pub async fn cordon(state: &AppState, caller: &Caller, node: &str) -> Result<NodeView, ApiError> {
    set_admin_state(state, caller, node, AdminState::Cordoned).await
}

/// Uncordon: the node takes new work again (this also ends a drain).
pub async fn uncordon(state: &AppState, caller: &Caller, node: &str) -> Result<NodeView, ApiError> {
    set_admin_state(state, caller, node, AdminState::Active).await
}

/// Drain: the node takes no new work and its work is moved or stopped, per its kind.
pub async fn drain(state: &AppState, caller: &Caller, node: &str) -> Result<NodeView, ApiError> {
    set_admin_state(state, caller, node, AdminState::Draining).await
}

/// Record the operator's decision about a node, audited, in one transaction. A retired node
/// stays retired (409). Doing it twice is harmless (and audited twice: it was asked twice).
async fn set_admin_state(
    state: &AppState,
    caller: &Caller,
    node: &str,
    to: AdminState,
) -> Result<NodeView, ApiError> {
    require_operator(caller)?;
    let node = parse_node(node)?;
    let mut tx = state.store.begin().await?;
    let record = match state.store.node_set_admin_state(&mut tx, node, to).await {
        Ok(r) => r,
        Err(StoreError::Conflict { .. }) => {
            return Err(ApiError::Conflict(format!(
                "node {node} is retired: its credential was revoked, so it cannot be cordoned, \
                 uncordoned or drained"
            )));
        }
        Err(e) => return Err(e.into()),
    };
    let action = match to {
        AdminState::Cordoned => "node.cordon",
        AdminState::Draining => "node.drain",
        AdminState::Active | AdminState::Retired => "node.uncordon",
    };
    let event = audit(
        caller,
        action,
        record.id.to_string(),
        serde_json::json!({ "hostname": record.hostname, "admin_state": record.admin_state }),
    );
    state.store.audit_record(&mut tx, &event).await?;
    tx.commit().await.map_err(StoreError::from)?;
    node_view(state, &record).await
}

/// Revoke a node's credential, which retires it: its agent is refused from its next call and
/// the host must join again with a new token.
pub async fn credential_revoke(
    state: &AppState,
    caller: &Caller,
    node: &str,
) -> Result<NodeView, ApiError> {
    require_operator(caller)?;
    let node = parse_node(node)?;
    let mut tx = state.store.begin().await?;
    let record = state.store.node_credential_revoke(&mut tx, node).await?;
    let event = audit(
        caller,
        "node.credential_revoke",
        record.id.to_string(),
        serde_json::json!({ "hostname": record.hostname }),
    );
    state.store.audit_record(&mut tx, &event).await?;
    tx.commit().await.map_err(StoreError::from)?;
    node_view(state, &record).await
}

// ---- building node views ----

/// One node with its GPUs (read after any transaction has committed: never a second pooled
/// connection while a transaction holds one).
async fn node_view(state: &AppState, record: &NodeRecord) -> Result<NodeView, ApiError> {
    let mut views = node_views(state, std::slice::from_ref(record)).await?;
    Ok(views.pop().expect("one view per record"))
}

/// Nodes with their GPUs and what runs on them: three queries for the whole page (GPUs,
/// assignments, observed state), none for nodes that never had an assignment.
async fn node_views(state: &AppState, records: &[NodeRecord]) -> Result<Vec<NodeView>, ApiError> {
    if records.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<NodeId> = records.iter().map(|n| n.id).collect();
    let mut gpus_by_node: HashMap<Uuid, Vec<GpuRecord>> = HashMap::new();
    for g in state.store.node_gpus_of(&ids).await? {
        gpus_by_node.entry(g.node_id).or_default().push(g);
    }
    // A node that never had an assignment (or has no GPU to run one on) needs no lookup.
    let busy: Vec<NodeId> = records
        .iter()
        .filter(|n| n.assignment_revision > 0 && gpus_by_node.contains_key(&n.id.as_uuid()))
        .map(|n| n.id)
        .collect();
    let mut work: HashMap<Uuid, NodeWork> = HashMap::new();
    if !busy.is_empty() {
        for a in state.store.assignment_list_of(&busy).await? {
            work.entry(a.node_id).or_default().assignments.push(a);
        }
        for o in state.store.observed_list_of(&busy).await? {
            work.entry(o.node_id)
                .or_default()
                .observed
                .insert(o.assignment_id, o);
        }
    }
    let mut views = Vec::with_capacity(records.len());
    for n in records {
        let gpus = gpus_by_node.remove(&n.id.as_uuid()).unwrap_or_default();
        let node_work = work.remove(&n.id.as_uuid()).unwrap_or_default();
        views.push(NodeView::new(n, gpu_views(&gpus, &node_work)));
    }
    Ok(views)
}

/// A node's assignments and what its agent last reported about them.
#[derive(Default)]
struct NodeWork {
    assignments: Vec<AssignmentRecord>,
    observed: HashMap<Uuid, ObservedView>,
}

fn gpu_views(gpus: &[GpuRecord], work: &NodeWork) -> Vec<GpuView> {
    gpus.iter()
        .map(|g| {
            let mut assignments = Vec::new();
            for a in &work.assignments {
                let mig = g
                    .mig_instances
                    .0
                    .iter()
                    .find(|m| a.gpu_uuids.contains(&m.uuid));
                if !(a.gpu_uuids.contains(&g.uuid) || mig.is_some()) {
                    continue;
                }
                let (state, reason) = match work.observed.get(&a.id) {
                    Some(o) if o.generation >= a.generation => (o.state.clone(), o.reason.clone()),
                    Some(o) => (
                        "pending".to_owned(),
                        format!("was {} at generation {}", o.state, o.generation),
                    ),
                    None => ("pending".to_owned(), String::new()),
                };
                assignments.push(GpuAssignmentView {
                    id: AssignmentId::from_uuid(a.id).to_string(),
                    kind: a.kind.clone(),
                    generation: a.generation,
                    mig_uuid: mig.map(|m| m.uuid.clone()),
                    state,
                    reason,
                });
            }
            let mig_instances = g
                .mig_instances
                .0
                .iter()
                .map(|m| MigInstanceView {
                    profile: m.profile.clone(),
                    start: m.start as i32,
                    size: m.size as i32,
                    uuid: m.uuid.clone(),
                    allocated: assignments
                        .iter()
                        .any(|a| a.mig_uuid.as_deref() == Some(m.uuid.as_str())),
                })
                .collect();
            GpuView {
                uuid: g.uuid.clone(),
                index: g.idx,
                model: g.model.clone(),
                gpu_type: g.gpu_type.clone(),
                memory_mib: g.memory_mib,
                pci_bus_id: g.pci_bus_id.clone(),
                numa_node: g.numa_node,
                mig_capable: g.mig_capable,
                mig_enabled: g.mig_enabled,
                mig_instances,
                nvlink_peers: g.nvlink_peers.clone(),
                health: g.health.clone(),
                health_reason: g.health_reason.clone(),
                health_changed_at: ts(g.health_changed_at),
                sampled_at: g.sampled_at.map(ts),
                sm_util_pct: g.sm_util_pct,
                mem_util_pct: g.mem_util_pct,
                memory_used_mib: g.memory_used_mib,
                temperature_c: g.temperature_c,
                power_w: g.power_w,
                ecc_corrected: g.ecc_corrected,
                ecc_uncorrected: g.ecc_uncorrected,
                allocated: !assignments.is_empty(),
                assignments,
            }
        })
        .collect()
}
