//! The fleet at work: inventories, heartbeats, GPU health and metrics, the per-node assignment
//! log and what agents observe, node lifecycle transitions, and the operator's cordon/drain.
//!
//! Assignment changes are appended to `node_assignment_events` under the node row's lock, so a
//! node's revisions are gap-free and strictly increasing, and every change sends
//! `NOTIFY kiln_node_assignments, '<node uuid>:<revision>'` in the same transaction. Whichever
//! control-plane replica holds that node's stream hears it (see `kiln-fleet`'s watch hub); no
//! replica needs to know which one that is.

use std::time::Duration;

use kiln_domain::{AdminState, AssignmentId, NodeId};
use sqlx::PgConnection;
use sqlx::types::Json;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::nodes::{NODE_COLUMNS, NodeRecord, NodeRow, node_from_row};
use crate::{Store, StoreError, StoreResult};

/// The Postgres channel that carries `<node uuid>:<revision>` for every assignment change.
pub const ASSIGNMENT_CHANNEL: &str = "kiln_node_assignments";

/// The Postgres channel that carries `<node uuid>` when a node's credential is revoked.
pub const CREDENTIAL_CHANNEL: &str = "kiln_node_credentials";

/// A GPU as the node registered it.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuRegistration {
    pub uuid: String,
    pub index: u32,
    pub model: String,
    pub gpu_type: Option<String>,
    pub memory_mib: u64,
    pub pci_bus_id: String,
    pub numa_node: Option<u32>,
    pub iommu_group: Option<u32>,
    pub mig_capable: bool,
    pub mig_enabled: bool,
    pub mig_instances: Vec<MigInstanceRecord>,
    pub nvlink_peers: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MigInstanceRecord {
    pub profile: String,
    pub start: u32,
    pub size: u32,
    pub uuid: String,
}

/// What `Register` tells us about a host.
#[derive(Debug, Clone)]
pub struct NodeRegistration {
    pub hostname: String,
    pub agent_version: String,
    pub protocol_minor: u32,
    pub driver_version: String,
    pub cuda_version: String,
    pub cpu_cores: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
    pub gpus: Vec<GpuRegistration>,
}

/// The parts of a node's row the agent is told after a register or heartbeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStatus {
    pub state: String,
    pub assignment_revision: u64,
    /// Set when this call brought the node back from unreachable or lost.
    pub recovered_from: Option<String>,
}

/// A GPU's health as reported (healthy, degraded or unhealthy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuHealthReport {
    pub uuid: String,
    pub health: &'static str,
    pub reason: String,
}

/// One metrics sample of one GPU.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuSampleReport {
    pub uuid: String,
    pub sampled_at: OffsetDateTime,
    pub temperature_c: Option<i32>,
    pub power_w: Option<f64>,
    pub sm_util_pct: Option<i32>,
    pub mem_util_pct: Option<i32>,
    pub memory_used_mib: Option<i64>,
    pub ecc_corrected: Option<i64>,
    pub ecc_uncorrected: Option<i64>,
    /// (code, message) of XID events since the previous sample.
    pub xids: Vec<(i32, String)>,
}

/// A GPU as operators see it: what it is, how it is, and its latest sample.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct GpuRecord {
    pub node_id: Uuid,
    pub uuid: String,
    pub idx: i32,
    pub model: String,
    pub gpu_type: Option<String>,
    pub memory_mib: i64,
    pub pci_bus_id: String,
    pub numa_node: Option<i32>,
    pub iommu_group: Option<i32>,
    pub mig_capable: bool,
    pub mig_enabled: bool,
    pub mig_instances: Json<Vec<MigInstanceRecord>>,
    pub nvlink_peers: Vec<String>,
    pub health: String,
    pub health_reason: String,
    pub health_changed_at: OffsetDateTime,
    pub sampled_at: Option<OffsetDateTime>,
    pub temperature_c: Option<i32>,
    pub power_w: Option<f64>,
    pub sm_util_pct: Option<i32>,
    pub mem_util_pct: Option<i32>,
    pub memory_used_mib: Option<i64>,
    pub ecc_corrected: Option<i64>,
    pub ecc_uncorrected: Option<i64>,
}

const GPU_COLUMNS: &str = "node_id, uuid, idx, model, gpu_type, memory_mib, pci_bus_id, \
     numa_node, iommu_group, mig_capable, mig_enabled, mig_instances, nvlink_peers, health, \
     health_reason, health_changed_at, sampled_at, temperature_c, power_w, sm_util_pct, \
     mem_util_pct, memory_used_mib, ecc_corrected, ecc_uncorrected";

/// Something that happened to a GPU (an XID, a health change).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct GpuEventRecord {
    pub node_id: Uuid,
    pub gpu_uuid: String,
    pub at: OffsetDateTime,
    pub kind: String,
    pub code: Option<i32>,
    pub message: String,
}

/// A kind of work an assignment carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AssignmentKind {
    Pod,
    Instance,
}

impl AssignmentKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AssignmentKind::Pod => "pod",
            AssignmentKind::Instance => "instance",
        }
    }
}

/// A new desired state for one assignment.
#[derive(Debug, Clone)]
pub struct AssignmentPut<'a> {
    pub id: AssignmentId,
    pub node: NodeId,
    pub kind: AssignmentKind,
    /// The encoded `kiln.node.v1.Assignment`; its id and generation are overwritten from the
    /// row when sent, so callers need not know the generation in advance.
    pub spec: &'a [u8],
    pub gpu_uuids: &'a [String],
}

/// One assignment in a node's desired state.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AssignmentRecord {
    pub id: Uuid,
    pub node_id: Uuid,
    pub generation: i64,
    pub kind: String,
    pub spec: Vec<u8>,
    pub gpu_uuids: Vec<String>,
    pub revision: i64,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
}

/// One entry of a node's assignment log.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AssignmentEventRecord {
    pub revision: i64,
    pub assignment_id: Uuid,
    pub generation: i64,
    pub op: String,
    pub spec: Option<Vec<u8>>,
}

/// The node's complete desired state as of `revision`.
#[derive(Debug, Clone)]
pub struct AssignmentSnapshot {
    pub revision: i64,
    pub assignments: Vec<AssignmentRecord>,
}

/// What an agent reports for one assignment.
#[derive(Debug, Clone)]
pub struct ObservedRecord {
    pub assignment_id: Uuid,
    pub generation: i64,
    pub state: &'static str,
    pub reason: String,
    pub exit_code: Option<i32>,
    /// `[{port, protocol, host_port}]`.
    pub ports: serde_json::Value,
    pub observed_at: OffsetDateTime,
    /// Time spent inside the container runtime bringing this generation up (0: unknown).
    pub runtime_ms: i64,
}

/// What the control plane last heard about one assignment.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ObservedView {
    pub assignment_id: Uuid,
    pub node_id: Uuid,
    pub generation: i64,
    pub state: String,
    pub reason: String,
    pub exit_code: Option<i32>,
    pub ports: serde_json::Value,
    pub observed_at: OffsetDateTime,
    pub reported_at: OffsetDateTime,
    pub runtime_ms: i64,
}

/// The result of a report: what was recorded, and what was refused because it names an
/// assignment of another node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObservedOutcome {
    pub recorded_revision: u64,
    pub refused: usize,
}

/// A node whose liveness the controller changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LivenessChange {
    pub node: NodeId,
    pub hostname: String,
    pub to: &'static str,
    /// For a node declared lost: the assignments whose work was lost with it.
    pub lost_assignments: Vec<AssignmentId>,
}

/// Schedulable GPU capacity per GPU type.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct CapacityRow {
    pub gpu_type: String,
    /// GPUs present on nodes that are not retired.
    pub total: i64,
    /// GPUs on ready nodes that report healthy (or degraded): what new work can go to.
    pub schedulable: i64,
    pub unhealthy: i64,
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Store {
    /// Record a host's inventory. GPUs no longer reported keep their rows, marked removed; GPUs
    /// reported again come back. Answers what the agent should know of the node.
    pub async fn node_register(
        &self,
        node: NodeId,
        reg: &NodeRegistration,
    ) -> StoreResult<NodeStatus> {
        let mut tx = self.pool.begin().await?;
        let row: Option<(String, i64)> = sqlx::query_as(
            "UPDATE nodes SET hostname = $2, agent_version = $3, protocol_minor = $4,
                 driver_version = $5, cuda_version = $6, cpu_cores = $7, memory_mib = $8,
                 disk_gib = $9, registered_at = now()
             WHERE id = $1 RETURNING state, assignment_revision",
        )
        .bind(node.as_uuid())
        .bind(&reg.hostname)
        .bind(&reg.agent_version)
        .bind(i32::try_from(reg.protocol_minor).unwrap_or(i32::MAX))
        .bind(&reg.driver_version)
        .bind(&reg.cuda_version)
        .bind(i32::try_from(reg.cpu_cores).unwrap_or(i32::MAX))
        .bind(to_i64(reg.memory_mib))
        .bind(to_i64(reg.disk_gib))
        .fetch_optional(&mut *tx)
        .await?;
        let Some((state, revision)) = row else {
            return Err(StoreError::NotFound { what: "node" });
        };
        let uuids: Vec<&str> = reg.gpus.iter().map(|g| g.uuid.as_str()).collect();
        sqlx::query(
            "UPDATE node_gpus SET removed_at = now()
             WHERE node_id = $1 AND removed_at IS NULL AND NOT (uuid = ANY($2))",
        )
        .bind(node.as_uuid())
        .bind(&uuids)
        .execute(&mut *tx)
        .await?;
        for g in &reg.gpus {
            sqlx::query(
                "INSERT INTO node_gpus (node_id, uuid, idx, model, gpu_type, memory_mib,
                     pci_bus_id, numa_node, iommu_group, mig_capable, mig_enabled,
                     mig_instances, nvlink_peers)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
                 ON CONFLICT (node_id, uuid) DO UPDATE SET idx = EXCLUDED.idx,
                     model = EXCLUDED.model, gpu_type = EXCLUDED.gpu_type,
                     memory_mib = EXCLUDED.memory_mib, pci_bus_id = EXCLUDED.pci_bus_id,
                     numa_node = EXCLUDED.numa_node, iommu_group = EXCLUDED.iommu_group,
                     mig_capable = EXCLUDED.mig_capable, mig_enabled = EXCLUDED.mig_enabled,
                     mig_instances = EXCLUDED.mig_instances,
                     nvlink_peers = EXCLUDED.nvlink_peers, removed_at = NULL",
            )
            .bind(node.as_uuid())
            .bind(&g.uuid)
            .bind(i32::try_from(g.index).unwrap_or(i32::MAX))
            .bind(&g.model)
            .bind(&g.gpu_type)
            .bind(to_i64(g.memory_mib))
            .bind(&g.pci_bus_id)
            .bind(g.numa_node.map(|n| n as i32))
            .bind(g.iommu_group.map(|n| n as i32))
            .bind(g.mig_capable)
            .bind(g.mig_enabled)
            .bind(Json(&g.mig_instances))
            .bind(&g.nvlink_peers)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(NodeStatus {
            state,
            assignment_revision: revision.max(0) as u64,
            recovered_from: None,
        })
    }

    /// A heartbeat: the node is online now, its applied revision moves forward (never back), and
    /// GPUs whose health changed are updated (with an event each). Answers the node's state.
    pub async fn node_heartbeat(
        &self,
        node: NodeId,
        applied_revision: u64,
        health: &[GpuHealthReport],
    ) -> StoreResult<NodeStatus> {
        let row: Option<(String, i64, String)> = sqlx::query_as(
            "UPDATE nodes n SET last_heartbeat_at = now(), liveness = 'online',
                 liveness_changed_at = CASE WHEN old.liveness = 'online'
                     THEN n.liveness_changed_at ELSE now() END,
                 applied_revision = GREATEST(n.applied_revision, $2)
             FROM (SELECT id, liveness FROM nodes WHERE id = $1 FOR UPDATE) old
             WHERE n.id = old.id
             RETURNING n.state, n.assignment_revision, old.liveness",
        )
        .bind(node.as_uuid())
        .bind(to_i64(applied_revision))
        .fetch_optional(&self.pool)
        .await?;
        let Some((state, revision, was)) = row else {
            return Err(StoreError::NotFound { what: "node" });
        };
        if !health.is_empty() {
            self.gpu_health_update(node, health).await?;
        }
        Ok(NodeStatus {
            state,
            assignment_revision: revision.max(0) as u64,
            recovered_from: (was != "online").then_some(was),
        })
    }

    /// Update the health of the GPUs whose health or reason changed, recording each change.
    async fn gpu_health_update(&self, node: NodeId, health: &[GpuHealthReport]) -> StoreResult<()> {
        let uuids: Vec<&str> = health.iter().map(|h| h.uuid.as_str()).collect();
        let states: Vec<&str> = health.iter().map(|h| h.health).collect();
        let reasons: Vec<&str> = health.iter().map(|h| h.reason.as_str()).collect();
        sqlx::query(
            "WITH changed AS (
                 UPDATE node_gpus g SET health = h.health, health_reason = h.reason,
                     health_changed_at = now()
                 FROM unnest($2::text[], $3::text[], $4::text[]) AS h(uuid, health, reason)
                 WHERE g.node_id = $1 AND g.uuid = h.uuid
                   AND (g.health <> h.health OR g.health_reason <> h.reason)
                 RETURNING g.node_id, g.uuid, g.health, g.health_reason
             )
             INSERT INTO gpu_events (node_id, gpu_uuid, kind, message)
             SELECT node_id, uuid, 'health',
                    health || CASE WHEN health_reason = '' THEN '' ELSE ': ' || health_reason END
             FROM changed",
        )
        .bind(node.as_uuid())
        .bind(&uuids)
        .bind(&states)
        .bind(&reasons)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Record one metrics report: each GPU's latest sample and its XID events. Health is the
    /// heartbeat's to set (it carries the reason, and both would otherwise flap the reason).
    pub async fn node_metrics(&self, node: NodeId, samples: &[GpuSampleReport]) -> StoreResult<()> {
        if samples.is_empty() {
            return Ok(());
        }
        let col = |f: &dyn Fn(&GpuSampleReport) -> Option<i64>| -> Vec<Option<i64>> {
            samples.iter().map(f).collect()
        };
        let uuids: Vec<&str> = samples.iter().map(|s| s.uuid.as_str()).collect();
        let at: Vec<OffsetDateTime> = samples.iter().map(|s| s.sampled_at).collect();
        let power: Vec<Option<f64>> = samples.iter().map(|s| s.power_w).collect();
        sqlx::query(
            "UPDATE node_gpus g SET sampled_at = s.at, temperature_c = s.temp::int,
                 power_w = s.power, sm_util_pct = s.sm::int, mem_util_pct = s.mem::int,
                 memory_used_mib = s.used, ecc_corrected = s.ecc_c, ecc_uncorrected = s.ecc_u
             FROM unnest($2::text[], $3::timestamptz[], $4::bigint[], $5::float8[],
                         $6::bigint[], $7::bigint[], $8::bigint[], $9::bigint[], $10::bigint[])
                  AS s(uuid, at, temp, power, sm, mem, used, ecc_c, ecc_u)
             WHERE g.node_id = $1 AND g.uuid = s.uuid",
        )
        .bind(node.as_uuid())
        .bind(&uuids)
        .bind(&at)
        .bind(col(&|s| s.temperature_c.map(i64::from)))
        .bind(&power)
        .bind(col(&|s| s.sm_util_pct.map(i64::from)))
        .bind(col(&|s| s.mem_util_pct.map(i64::from)))
        .bind(col(&|s| s.memory_used_mib))
        .bind(col(&|s| s.ecc_corrected))
        .bind(col(&|s| s.ecc_uncorrected))
        .execute(&self.pool)
        .await?;
        let xids: Vec<(&str, i32, &str)> = samples
            .iter()
            .flat_map(|s| {
                s.xids
                    .iter()
                    .map(|(c, m)| (s.uuid.as_str(), *c, m.as_str()))
            })
            .collect();
        if !xids.is_empty() {
            sqlx::query(
                "INSERT INTO gpu_events (node_id, gpu_uuid, kind, code, message)
                 SELECT $1, x.uuid, 'xid', x.code, x.message
                 FROM unnest($2::text[], $3::int[], $4::text[]) AS x(uuid, code, message)
                 WHERE EXISTS (SELECT 1 FROM node_gpus g WHERE g.node_id = $1 AND g.uuid = x.uuid)",
            )
            .bind(node.as_uuid())
            .bind(xids.iter().map(|x| x.0).collect::<Vec<_>>())
            .bind(xids.iter().map(|x| x.1).collect::<Vec<_>>())
            .bind(xids.iter().map(|x| x.2).collect::<Vec<_>>())
            .execute(&self.pool)
            .await?;
        }
        Ok(())
    }

    /// The GPUs of one node (those still present), in index order.
    pub async fn node_gpus(&self, node: NodeId) -> StoreResult<Vec<GpuRecord>> {
        Ok(sqlx::query_as(&format!(
            "SELECT {GPU_COLUMNS} FROM node_gpus WHERE node_id = $1 AND removed_at IS NULL
             ORDER BY idx"
        ))
        .bind(node.as_uuid())
        .fetch_all(&self.pool)
        .await?)
    }

    /// The GPUs of the given nodes (those still present), by node then index.
    pub async fn node_gpus_of(&self, nodes: &[NodeId]) -> StoreResult<Vec<GpuRecord>> {
        let ids: Vec<Uuid> = nodes.iter().map(|n| n.as_uuid()).collect();
        Ok(sqlx::query_as(&format!(
            "SELECT {GPU_COLUMNS} FROM node_gpus WHERE node_id = ANY($1) AND removed_at IS NULL
             ORDER BY node_id, idx"
        ))
        .bind(&ids)
        .fetch_all(&self.pool)
        .await?)
    }

    /// The newest GPU events of a node.
    pub async fn gpu_events(&self, node: NodeId, limit: i64) -> StoreResult<Vec<GpuEventRecord>> {
        Ok(sqlx::query_as(
            "SELECT node_id, gpu_uuid, at, kind, code, message FROM gpu_events
             WHERE node_id = $1 ORDER BY at DESC, id DESC LIMIT $2",
        )
        .bind(node.as_uuid())
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    /// GPU capacity per type: present, schedulable (healthy GPUs of ready nodes), unhealthy.
    pub async fn fleet_capacity(&self) -> StoreResult<Vec<CapacityRow>> {
        Ok(sqlx::query_as(
            "SELECT COALESCE(g.gpu_type, 'unknown') AS gpu_type,
                    count(*) AS total,
                    count(*) FILTER (WHERE n.state = 'ready' AND g.health <> 'unhealthy')
                        AS schedulable,
                    count(*) FILTER (WHERE g.health = 'unhealthy') AS unhealthy
             FROM node_gpus g JOIN nodes n ON n.id = g.node_id
             WHERE g.removed_at IS NULL AND n.admin_state <> 'retired'
             GROUP BY 1 ORDER BY 1",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// Create an assignment on a node, or change it (its generation goes up by one). Appends the
    /// event under the node's lock and notifies the replica holding the node's stream. Answers
    /// (revision, generation). An assignment cannot move between nodes (remove it, then create
    /// another), and a retired node takes nothing.
    pub async fn assignment_put(
        &self,
        conn: &mut PgConnection,
        put: AssignmentPut<'_>,
    ) -> StoreResult<(u64, u64)> {
        let revision = bump_revision(conn, put.node).await?;
        let generation: Option<(i64,)> = sqlx::query_as(
            "INSERT INTO node_assignments AS a (id, node_id, generation, kind, spec, gpu_uuids,
                 revision)
             VALUES ($1, $2, 1, $3, $4, $5, $6)
             ON CONFLICT (id) DO UPDATE SET generation = a.generation + 1, spec = EXCLUDED.spec,
                 gpu_uuids = EXCLUDED.gpu_uuids, revision = EXCLUDED.revision,
                 updated_at = now()
             WHERE a.node_id = EXCLUDED.node_id AND a.kind = EXCLUDED.kind
             RETURNING generation",
        )
        .bind(put.id.as_uuid())
        .bind(put.node.as_uuid())
        .bind(put.kind.as_str())
        .bind(put.spec)
        .bind(put.gpu_uuids)
        .bind(revision)
        .fetch_optional(&mut *conn)
        .await?;
        let Some((generation,)) = generation else {
            return Err(StoreError::Conflict {
                what: "assignment on another node or of another kind",
            });
        };
        sqlx::query(
            "INSERT INTO node_assignment_events (node_id, revision, assignment_id, generation,
                 op, spec)
             VALUES ($1, $2, $3, $4, 'upsert', $5)",
        )
        .bind(put.node.as_uuid())
        .bind(revision)
        .bind(put.id.as_uuid())
        .bind(generation)
        .bind(put.spec)
        .execute(&mut *conn)
        .await?;
        notify(conn, put.node, revision).await?;
        Ok((revision as u64, generation as u64))
    }

    /// Remove an assignment from its node: the agent stops it. Answers the event's revision, or
    /// `NotFound` when there is no such assignment (removing twice is an error the caller may
    /// ignore).
    pub async fn assignment_remove(
        &self,
        conn: &mut PgConnection,
        id: AssignmentId,
    ) -> StoreResult<u64> {
        let node: Option<(Uuid,)> =
            sqlx::query_as("SELECT node_id FROM node_assignments WHERE id = $1")
                .bind(id.as_uuid())
                .fetch_optional(&mut *conn)
                .await?;
        let Some((node,)) = node else {
            return Err(StoreError::NotFound { what: "assignment" });
        };
        let node = NodeId::from_uuid(node);
        remove_assignments(conn, node, &[id]).await?;
        let (revision,): (i64,) =
            sqlx::query_as("SELECT assignment_revision FROM nodes WHERE id = $1")
                .bind(node.as_uuid())
                .fetch_one(&mut *conn)
                .await?;
        Ok(revision as u64)
    }

    /// A node's complete desired state, consistent with its revision.
    pub async fn assignment_snapshot(&self, node: NodeId) -> StoreResult<AssignmentSnapshot> {
        // The rows and the revision are read in one REPEATABLE READ transaction so they agree
        // even while a writer appends.
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .execute(&mut *tx)
            .await?;
        let (revision,): (i64,) =
            sqlx::query_as("SELECT assignment_revision FROM nodes WHERE id = $1")
                .bind(node.as_uuid())
                .fetch_optional(&mut *tx)
                .await?
                .ok_or(StoreError::NotFound { what: "node" })?;
        let assignments = sqlx::query_as(
            "SELECT id, node_id, generation, kind, spec, gpu_uuids, revision, created_at,
                    updated_at
             FROM node_assignments WHERE node_id = $1 ORDER BY created_at, id",
        )
        .bind(node.as_uuid())
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(AssignmentSnapshot {
            revision,
            assignments,
        })
    }

    /// Up to `limit` events of a node's log after `after`, in order.
    pub async fn assignment_events_after(
        &self,
        node: NodeId,
        after: u64,
        limit: i64,
    ) -> StoreResult<Vec<AssignmentEventRecord>> {
        Ok(sqlx::query_as(
            "SELECT revision, assignment_id, generation, op, spec FROM node_assignment_events
             WHERE node_id = $1 AND revision > $2 ORDER BY revision LIMIT $3",
        )
        .bind(node.as_uuid())
        .bind(to_i64(after))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    /// The node's assignments (newest first), for operators.
    pub async fn assignment_list(&self, node: NodeId) -> StoreResult<Vec<AssignmentRecord>> {
        Ok(sqlx::query_as(
            "SELECT id, node_id, generation, kind, spec, gpu_uuids, revision, created_at,
                    updated_at
             FROM node_assignments WHERE node_id = $1 ORDER BY created_at DESC, id",
        )
        .bind(node.as_uuid())
        .fetch_all(&self.pool)
        .await?)
    }

    /// The assignments of several nodes at once, by node then age.
    pub async fn assignment_list_of(&self, nodes: &[NodeId]) -> StoreResult<Vec<AssignmentRecord>> {
        let ids: Vec<Uuid> = nodes.iter().map(|n| n.as_uuid()).collect();
        Ok(sqlx::query_as(
            "SELECT id, node_id, generation, kind, spec, gpu_uuids, revision, created_at,
                    updated_at
             FROM node_assignments WHERE node_id = ANY($1) ORDER BY node_id, created_at DESC, id",
        )
        .bind(&ids)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Drop log entries the node has applied and that are older than `keep`; a node that comes
    /// back from before the floor gets a snapshot instead.
    pub async fn assignment_events_prune(&self, keep: Duration) -> StoreResult<u64> {
        let done = sqlx::query(
            "DELETE FROM node_assignment_events e USING nodes n
             WHERE e.node_id = n.id AND e.revision <= n.applied_revision
               AND e.created_at < now() - make_interval(secs => $1)",
        )
        .bind(keep.as_secs_f64())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// Record what an agent sees. Entries naming an assignment that is (still) placed on another
    /// node are refused and counted; an older generation never overwrites a newer one. With
    /// `complete`, assignments of this node that the report does not list are recorded as gone
    /// (`stopped`, "not present on the node").
    pub async fn observed_report(
        &self,
        node: NodeId,
        applied_revision: u64,
        rows: &[ObservedRecord],
        complete: bool,
    ) -> StoreResult<ObservedOutcome> {
        let mut tx = self.pool.begin().await?;
        let recorded: Option<(i64,)> = sqlx::query_as(
            "UPDATE nodes SET applied_revision = GREATEST(applied_revision, LEAST($2, assignment_revision))
             WHERE id = $1 RETURNING applied_revision",
        )
        .bind(node.as_uuid())
        .bind(to_i64(applied_revision))
        .fetch_optional(&mut *tx)
        .await?;
        let Some((recorded,)) = recorded else {
            return Err(StoreError::NotFound { what: "node" });
        };
        let ids: Vec<Uuid> = rows.iter().map(|r| r.assignment_id).collect();
        let foreign: (i64,) = sqlx::query_as(
            "SELECT count(*) FROM node_assignments WHERE id = ANY($1) AND node_id <> $2",
        )
        .bind(&ids)
        .bind(node.as_uuid())
        .fetch_one(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO node_observed AS o (assignment_id, node_id, generation, state, reason,
                 exit_code, ports, observed_at, runtime_ms)
             SELECT r.id, $1, r.generation, r.state, r.reason, r.exit_code, r.ports, r.at, r.rt
             FROM unnest($2::uuid[], $3::bigint[], $4::text[], $5::text[], $6::int[],
                         $7::jsonb[], $8::timestamptz[], $9::bigint[])
                  AS r(id, generation, state, reason, exit_code, ports, at, rt)
             WHERE NOT EXISTS (SELECT 1 FROM node_assignments a
                               WHERE a.id = r.id AND a.node_id <> $1)
             ON CONFLICT (assignment_id) DO UPDATE SET generation = EXCLUDED.generation,
                 state = EXCLUDED.state, reason = EXCLUDED.reason,
                 exit_code = EXCLUDED.exit_code, ports = EXCLUDED.ports,
                 observed_at = EXCLUDED.observed_at, reported_at = now(),
                 runtime_ms = EXCLUDED.runtime_ms
             WHERE o.node_id = EXCLUDED.node_id AND o.generation <= EXCLUDED.generation",
        )
        .bind(node.as_uuid())
        .bind(&ids)
        .bind(rows.iter().map(|r| r.generation).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.state).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.reason.as_str()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.exit_code).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.ports.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.observed_at).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.runtime_ms).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await?;
        // The workloads these assignments realise follow what their node sees. A pod that
        // stopped or failed for good gives its capacity back (its assignment is removed, so
        // the agent cleans up).
        let moved: Vec<(Uuid, String, String, bool)> = sqlx::query_as(
            "UPDATE workloads w SET
                 state = CASE o.state WHEN 'pending' THEN 'scheduled' WHEN 'unknown' THEN w.state
                                      ELSE o.state END,
                 state_reason = o.reason,
                 state_changed_at = CASE WHEN w.state = (CASE o.state WHEN 'pending'
                     THEN 'scheduled' WHEN 'unknown' THEN w.state ELSE o.state END)
                     THEN w.state_changed_at ELSE now() END,
                 updated_at = now()
             FROM node_observed o
             JOIN node_assignments a ON a.id = o.assignment_id AND a.node_id = o.node_id
             WHERE o.assignment_id = w.assignment_id AND o.node_id = $1 AND w.node_id = $1
               AND o.assignment_id = ANY($2)
               -- Only what the agent saw of the current generation: a report of an older one
               -- (say, an instance running before its stop was applied) must not undo a change.
               AND o.generation >= a.generation
               AND w.state IN ('scheduled', 'starting', 'running', 'stopping')
               AND (w.state <> (CASE o.state WHEN 'pending' THEN 'scheduled'
                                 WHEN 'unknown' THEN w.state ELSE o.state END)
                    OR w.state_reason <> o.reason)
             RETURNING w.id, w.state, w.state_reason,
                 (w.kind = 'instance' AND w.spec->>'power' = 'stopped') AS powered_off",
        )
        .bind(node.as_uuid())
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await?;
        for (id, state, reason, powered_off) in moved {
            // An instance its tenant stopped stays on its node, powered off, with its disk.
            if powered_off && state == "stopped" {
                continue;
            }
            if state == "stopped" || state == "failed" {
                self.workload_release(
                    &mut tx,
                    kiln_domain::WorkloadId::from_uuid(id),
                    &state,
                    &reason,
                )
                .await?;
            }
        }
        if complete {
            sqlx::query(
                "UPDATE node_observed SET state = 'stopped', reason = 'not present on the node',
                     exit_code = NULL, reported_at = now()
                 WHERE node_id = $1 AND NOT (assignment_id = ANY($2))
                   AND state NOT IN ('stopped', 'failed', 'lost')",
            )
            .bind(node.as_uuid())
            .bind(&ids)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(ObservedOutcome {
            recorded_revision: recorded.max(0) as u64,
            refused: foreign.0 as usize,
        })
    }

    /// Where tenants reach the ports `node` publishes ('' for its hostname).
    pub async fn node_set_public_address(&self, node: NodeId, address: &str) -> StoreResult<()> {
        sqlx::query("UPDATE nodes SET public_address = $2 WHERE id = $1 AND public_address <> $2")
            .bind(node.as_uuid())
            .bind(address)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The workload an assignment of `node` realises, if it is still that node's: how pushed
    /// log lines find their workload, and why a node cannot write into another node's logs.
    pub async fn workload_of_assignment(
        &self,
        node: NodeId,
        assignment: Uuid,
    ) -> StoreResult<Option<Uuid>> {
        let row: Option<(Uuid,)> =
            sqlx::query_as("SELECT id FROM workloads WHERE assignment_id = $1 AND node_id = $2")
                .bind(assignment)
                .bind(node.as_uuid())
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(|(id,)| id))
    }

    /// What the control plane last heard about the node's assignments.
    pub async fn observed_list(&self, node: NodeId) -> StoreResult<Vec<ObservedView>> {
        Ok(sqlx::query_as(
            "SELECT assignment_id, node_id, generation, state, reason, exit_code, ports,
                    observed_at, reported_at, runtime_ms
             FROM node_observed WHERE node_id = $1 ORDER BY assignment_id",
        )
        .bind(node.as_uuid())
        .fetch_all(&self.pool)
        .await?)
    }

    /// What the control plane last heard about the assignments of several nodes.
    pub async fn observed_list_of(&self, nodes: &[NodeId]) -> StoreResult<Vec<ObservedView>> {
        let ids: Vec<Uuid> = nodes.iter().map(|n| n.as_uuid()).collect();
        Ok(sqlx::query_as(
            "SELECT assignment_id, node_id, generation, state, reason, exit_code, ports,
                    observed_at, reported_at, runtime_ms
             FROM node_observed WHERE node_id = ANY($1) ORDER BY node_id, assignment_id",
        )
        .bind(&ids)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Mark online nodes silent for `after` as unreachable. Answers the nodes changed.
    pub async fn nodes_mark_unreachable(
        &self,
        after: Duration,
    ) -> StoreResult<Vec<LivenessChange>> {
        let rows: Vec<(Uuid, String)> = sqlx::query_as(
            "UPDATE nodes SET liveness = 'unreachable', liveness_changed_at = now()
             WHERE liveness = 'online' AND admin_state <> 'retired'
               AND COALESCE(last_heartbeat_at, joined_at) < now() - make_interval(secs => $1)
             RETURNING id, hostname",
        )
        .bind(after.as_secs_f64())
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(id, hostname)| LivenessChange {
                node: NodeId::from_uuid(id),
                hostname,
                to: "unreachable",
                lost_assignments: Vec::new(),
            })
            .collect())
    }

    /// Declare nodes silent for `after` lost: each one's assignments are removed from its log
    /// (so the agent, if it ever returns, stops them) and recorded as `lost`, for the scheduler
    /// to place again. One transaction per node, so a crash midway loses nothing.
    pub async fn nodes_mark_lost(&self, after: Duration) -> StoreResult<Vec<LivenessChange>> {
        let candidates: Vec<(Uuid,)> = sqlx::query_as(
            "SELECT id FROM nodes
             WHERE liveness = 'unreachable' AND admin_state <> 'retired'
               AND COALESCE(last_heartbeat_at, joined_at) < now() - make_interval(secs => $1)",
        )
        .bind(after.as_secs_f64())
        .fetch_all(&self.pool)
        .await?;
        let mut changed = Vec::new();
        for (id,) in candidates {
            let mut tx = self.pool.begin().await?;
            // Re-check under the row lock: a heartbeat may have landed in between, and another
            // controller replica may have done it already.
            let row: Option<(String,)> = sqlx::query_as(
                "UPDATE nodes SET liveness = 'lost', liveness_changed_at = now()
                 WHERE id = $1 AND liveness = 'unreachable'
                   AND COALESCE(last_heartbeat_at, joined_at) < now() - make_interval(secs => $2)
                 RETURNING hostname",
            )
            .bind(id)
            .bind(after.as_secs_f64())
            .fetch_optional(&mut *tx)
            .await?;
            let Some((hostname,)) = row else {
                continue;
            };
            let node = NodeId::from_uuid(id);
            // Its workloads are handed back first: pods and endpoint replicas to the queue,
            // passthrough VMs to failed (their GPUs were the host's own; the disk is kept).
            let mut handed_back = Vec::new();
            for w in self.workloads_on_node(&mut tx, node).await? {
                handed_back.extend(w.assignment_id.map(AssignmentId::from_uuid));
                let (state, reason) = if w.kind == "instance" {
                    (
                        "failed",
                        format!("the node {hostname} was lost; the disk is kept"),
                    )
                } else {
                    (
                        "pending",
                        format!("the node {hostname} was lost; placing it again"),
                    )
                };
                self.workload_release(
                    &mut tx,
                    kiln_domain::WorkloadId::from_uuid(w.id),
                    state,
                    &reason,
                )
                .await?;
            }
            let lost: Vec<(Uuid, i64)> =
                sqlx::query_as("SELECT id, generation FROM node_assignments WHERE node_id = $1")
                    .bind(id)
                    .fetch_all(&mut *tx)
                    .await?;
            let mut lost_ids: Vec<AssignmentId> = lost
                .iter()
                .map(|(a, _)| AssignmentId::from_uuid(*a))
                .collect();
            if !lost.is_empty() {
                sqlx::query(
                    "INSERT INTO node_observed AS o (assignment_id, node_id, generation, state,
                         reason, observed_at)
                     SELECT a, $1, g, 'lost', 'the node was lost', now()
                     FROM unnest($2::uuid[], $3::bigint[]) AS x(a, g)
                     ON CONFLICT (assignment_id) DO UPDATE SET state = 'lost',
                         reason = 'the node was lost', exit_code = NULL, reported_at = now()",
                )
                .bind(id)
                .bind(lost.iter().map(|l| l.0).collect::<Vec<_>>())
                .bind(lost.iter().map(|l| l.1).collect::<Vec<_>>())
                .execute(&mut *tx)
                .await?;
                remove_assignments(&mut tx, node, &lost_ids).await?;
            }
            lost_ids.extend(handed_back);
            tx.commit().await?;
            changed.push(LivenessChange {
                node,
                hostname,
                to: "lost",
                lost_assignments: lost_ids,
            });
        }
        Ok(changed)
    }

    /// The operator's decision about a node: cordon, drain, uncordon. A retired node stays
    /// retired (`Conflict`). Answers the node as it is now.
    pub async fn node_set_admin_state(
        &self,
        conn: &mut PgConnection,
        node: NodeId,
        to: AdminState,
    ) -> StoreResult<NodeRecord> {
        let row: Option<NodeRow> = sqlx::query_as(&format!(
            "UPDATE nodes SET admin_state = $2,
                 admin_state_changed_at = CASE WHEN admin_state = $2
                     THEN admin_state_changed_at ELSE now() END
             WHERE id = $1 AND admin_state <> 'retired'
             RETURNING {NODE_COLUMNS}"
        ))
        .bind(node.as_uuid())
        .bind(to.as_str())
        .fetch_optional(&mut *conn)
        .await?;
        match row {
            Some(r) => Ok(node_from_row(r)),
            None => {
                // Tell "no such node" from "retired".
                self.node_get(node).await?;
                Err(StoreError::Conflict {
                    what: "retired node",
                })
            }
        }
    }
}

/// Take the node's row lock and the next revision of its log.
async fn bump_revision(conn: &mut PgConnection, node: NodeId) -> StoreResult<i64> {
    let row: Option<(i64, String)> = sqlx::query_as(
        "UPDATE nodes SET assignment_revision = assignment_revision + 1 WHERE id = $1
         RETURNING assignment_revision, admin_state",
    )
    .bind(node.as_uuid())
    .fetch_optional(&mut *conn)
    .await?;
    match row {
        None => Err(StoreError::NotFound { what: "node" }),
        Some((_, admin)) if admin == "retired" => Err(StoreError::Conflict {
            what: "retired node",
        }),
        Some((revision, _)) => Ok(revision),
    }
}

/// Remove assignments of one node, one event each.
async fn remove_assignments(
    conn: &mut PgConnection,
    node: NodeId,
    ids: &[AssignmentId],
) -> StoreResult<()> {
    let mut last = None;
    for id in ids {
        let revision: Option<(i64,)> = sqlx::query_as(
            "UPDATE nodes SET assignment_revision = assignment_revision + 1 WHERE id = $1
             RETURNING assignment_revision",
        )
        .bind(node.as_uuid())
        .fetch_optional(&mut *conn)
        .await?;
        let Some((revision,)) = revision else {
            return Err(StoreError::NotFound { what: "node" });
        };
        let removed: Option<(i64,)> = sqlx::query_as(
            "DELETE FROM node_assignments WHERE id = $1 AND node_id = $2 RETURNING generation",
        )
        .bind(id.as_uuid())
        .bind(node.as_uuid())
        .fetch_optional(&mut *conn)
        .await?;
        let Some((generation,)) = removed else {
            return Err(StoreError::NotFound { what: "assignment" });
        };
        sqlx::query(
            "INSERT INTO node_assignment_events (node_id, revision, assignment_id, generation, op)
             VALUES ($1, $2, $3, $4, 'remove')",
        )
        .bind(node.as_uuid())
        .bind(revision)
        .bind(id.as_uuid())
        .bind(generation)
        .execute(&mut *conn)
        .await?;
        last = Some(revision);
    }
    if let Some(revision) = last {
        notify(conn, node, revision).await?;
    }
    Ok(())
}

/// Tell every replica (at commit) that the node's log grew to `revision`.
async fn notify(conn: &mut PgConnection, node: NodeId, revision: i64) -> StoreResult<()> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(ASSIGNMENT_CHANNEL)
        .bind(format!("{}:{revision}", node.as_uuid()))
        .execute(&mut *conn)
        .await?;
    Ok(())
}
