//! Scheduling: the queue of pending workloads, the fleet as the scheduler sees it, and the one
//! transaction that turns a decision into held capacity.
//!
//! Capacity is enforced by the schema (see `migrations/…_scheduling.sql`): GPU slots by two
//! exclusion constraints on `gpu_allocations`, node CPU/memory/disk by conditional `UPDATE`s,
//! share tenancy and share memory under the GPU row's lock. A commit that would double-book
//! fails with [`PlaceError::Conflict`] and changes nothing; the scheduler retries the workload
//! on its next pass with a fresh view.

use kiln_domain::{AssignmentId, NodeId, WorkloadId};
use sqlx::PgConnection;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::fleet::{AssignmentKind, AssignmentPut};
use crate::{OrgScope, Store, StoreError, StoreResult};

/// Postgres channel: "there may be pending work" (a workload was created or capacity freed).
pub const PENDING_CHANNEL: &str = "kiln_workloads_pending";

/// A workload as the scheduler and the API see it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct WorkloadRecord {
    pub id: Uuid,
    pub org_id: Uuid,
    pub kind: String,
    pub name: String,
    pub state: String,
    pub state_reason: String,
    pub state_changed_at: OffsetDateTime,
    pub tier: String,
    pub priority: i32,
    pub gpu_mode: String,
    pub gpu_type: Option<String>,
    pub gpu_count: i32,
    pub mig_profile: Option<String>,
    pub share_memory_mib: Option<i64>,
    pub cpu_millis: i64,
    pub memory_mib: i64,
    pub disk_gib: i64,
    pub spec: serde_json::Value,
    pub node_id: Option<Uuid>,
    pub assignment_id: Option<Uuid>,
    pub placed_at: Option<OffsetDateTime>,
    pub created_at: OffsetDateTime,
}

const WORKLOAD_COLUMNS: &str = "id, org_id, kind, name, state, state_reason, state_changed_at, \
     tier, priority, gpu_mode, gpu_type, gpu_count, mig_profile, share_memory_mib, cpu_millis, \
     memory_mib, disk_gib, spec, node_id, assignment_id, placed_at, created_at";

/// What a tenant asks to run. Validated by the caller (the API's operations).
#[derive(Debug, Clone)]
pub struct NewWorkload<'a> {
    pub kind: &'a str,
    pub name: &'a str,
    pub tier: &'a str,
    pub priority: i32,
    pub gpu_mode: &'a str,
    pub gpu_type: Option<&'a str>,
    pub gpu_count: i32,
    pub mig_profile: Option<&'a str>,
    pub share_memory_mib: Option<i64>,
    pub cpu_millis: i64,
    pub memory_mib: i64,
    pub disk_gib: i64,
    pub spec: serde_json::Value,
}

/// A schedulable node with what it has left.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SchedNode {
    pub id: Uuid,
    pub cpu_millis_free: i64,
    pub memory_mib_free: i64,
    pub disk_gib_free: i64,
}

/// A GPU of a schedulable node.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SchedGpu {
    pub node_id: Uuid,
    pub uuid: String,
    pub idx: i32,
    pub gpu_type: Option<String>,
    pub memory_mib: i64,
    pub numa_node: Option<i32>,
    pub iommu_group: Option<i32>,
    pub healthy: bool,
    pub mig_enabled: bool,
    pub nvlink_peers: Vec<String>,
}

/// One held GPU slot range, with its holder's identity.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SchedAllocation {
    pub workload_id: Uuid,
    pub node_id: Uuid,
    pub gpu_uuid: String,
    pub mode: String,
    pub slot_start: i64,
    pub slot_end: i64,
    pub mig_profile: Option<String>,
    pub org_id: Uuid,
    pub kind: String,
    pub tier: String,
    pub priority: i32,
    pub cpu_millis: i64,
    pub memory_mib: i64,
    pub disk_gib: i64,
}

/// The fleet as one scheduling pass sees it (only what new work could use).
#[derive(Debug, Clone, Default)]
pub struct SchedFleet {
    pub nodes: Vec<SchedNode>,
    pub gpus: Vec<SchedGpu>,
    pub allocations: Vec<SchedAllocation>,
}

/// One GPU's part of a placement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GpuHold {
    Whole {
        gpu_uuid: String,
    },
    Mig {
        gpu_uuid: String,
        profile: String,
        start: i64,
        size: i64,
    },
    /// A time-sliced share: `memory_mib` of the GPU, at most `max_tenants` shares per GPU.
    Share {
        gpu_uuid: String,
        memory_mib: i64,
        max_tenants: i64,
    },
}

/// A decision to commit.
#[derive(Debug, Clone)]
pub struct PlacementCommit<'a> {
    pub workload: WorkloadId,
    pub node: NodeId,
    pub holds: &'a [GpuHold],
    /// The encoded `kiln.node.v1.Assignment` for the agent.
    pub assignment_spec: &'a [u8],
    pub assignment_kind: AssignmentKind,
}

#[derive(Debug, thiserror::Error)]
pub enum PlaceError {
    /// The capacity is no longer free (another replica, or the node changed): retry later.
    #[error("the capacity was taken or changed: {0}")]
    Conflict(&'static str),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for PlaceError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::Database(db) if db.code().as_deref() == Some("23P01") => {
                PlaceError::Conflict("a GPU slot is held by another workload")
            }
            _ => PlaceError::Store(StoreError::Database(e)),
        }
    }
}

/// A whole GPU's slot range: everything.
const WHOLE: (i64, i64) = (0, i64::MAX / 2);

impl Store {
    /// Record a workload as pending and wake the schedulers.
    pub async fn workload_create(
        &self,
        conn: &mut PgConnection,
        scope: &OrgScope,
        new: &NewWorkload<'_>,
    ) -> StoreResult<WorkloadRecord> {
        let row: WorkloadRecord = sqlx::query_as(&format!(
            "INSERT INTO workloads (id, org_id, kind, name, tier, priority, gpu_mode, gpu_type,
                 gpu_count, mig_profile, share_memory_mib, cpu_millis, memory_mib, disk_gib, spec,
                 state_reason)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15,
                 'waiting for the scheduler')
             RETURNING {WORKLOAD_COLUMNS}"
        ))
        .bind(WorkloadId::new().as_uuid())
        .bind(scope.org_id().as_uuid())
        .bind(new.kind)
        .bind(new.name)
        .bind(new.tier)
        .bind(new.priority)
        .bind(new.gpu_mode)
        .bind(new.gpu_type)
        .bind(new.gpu_count)
        .bind(new.mig_profile)
        .bind(new.share_memory_mib)
        .bind(new.cpu_millis)
        .bind(new.memory_mib)
        .bind(new.disk_gib)
        .bind(&new.spec)
        .fetch_one(&mut *conn)
        .await?;
        wake_schedulers(conn).await?;
        Ok(row)
    }

    /// One workload of the scope's org.
    pub async fn workload_get(&self, scope: &OrgScope, id: Uuid) -> StoreResult<WorkloadRecord> {
        sqlx::query_as(&format!(
            "SELECT {WORKLOAD_COLUMNS} FROM workloads WHERE id = $1 AND org_id = $2"
        ))
        .bind(id)
        .bind(scope.org_id().as_uuid())
        .fetch_optional(&self.pool)
        .await?
        .ok_or(StoreError::NotFound { what: "workload" })
    }

    /// Any workload, for the control plane's own loops (never behind a tenant request).
    pub async fn workload_get_any(&self, id: WorkloadId) -> StoreResult<WorkloadRecord> {
        sqlx::query_as(&format!(
            "SELECT {WORKLOAD_COLUMNS} FROM workloads WHERE id = $1"
        ))
        .bind(id.as_uuid())
        .fetch_optional(&self.pool)
        .await?
        .ok_or(StoreError::NotFound { what: "workload" })
    }

    /// Lock up to `limit` pending workloads, highest priority then oldest first, skipping any
    /// another scheduler replica holds. They stay locked until `conn`'s transaction ends.
    pub async fn workloads_claim_pending(
        &self,
        conn: &mut PgConnection,
        limit: i64,
    ) -> StoreResult<Vec<WorkloadRecord>> {
        Ok(sqlx::query_as(&format!(
            "SELECT {WORKLOAD_COLUMNS} FROM workloads WHERE state = 'pending'
             ORDER BY priority DESC, created_at, id LIMIT $1 FOR UPDATE SKIP LOCKED"
        ))
        .bind(limit)
        .fetch_all(&mut *conn)
        .await?)
    }

    /// The schedulable fleet for GPU types `types` (plus every ready node, for CPU-only work):
    /// ready nodes with their free CPU/memory/disk, their present GPUs, and what holds them.
    pub async fn sched_fleet(
        &self,
        conn: &mut PgConnection,
        types: &[String],
    ) -> StoreResult<SchedFleet> {
        let nodes: Vec<SchedNode> = sqlx::query_as(
            "SELECT id, cpu_cores::bigint * 1000 - cpu_millis_allocated AS cpu_millis_free,
                    memory_mib - memory_mib_allocated AS memory_mib_free,
                    disk_gib - disk_gib_allocated AS disk_gib_free
             FROM nodes WHERE state = 'ready' AND registered_at IS NOT NULL ORDER BY id",
        )
        .fetch_all(&mut *conn)
        .await?;
        let gpus: Vec<SchedGpu> = sqlx::query_as(
            "SELECT g.node_id, g.uuid, g.idx, g.gpu_type, g.memory_mib, g.numa_node,
                    g.iommu_group, g.health <> 'unhealthy' AS healthy, g.mig_enabled,
                    g.nvlink_peers
             FROM node_gpus g JOIN nodes n ON n.id = g.node_id
             WHERE n.state = 'ready' AND g.removed_at IS NULL AND g.gpu_type = ANY($1)
             ORDER BY g.node_id, g.idx",
        )
        .bind(types)
        .fetch_all(&mut *conn)
        .await?;
        let allocations: Vec<SchedAllocation> = sqlx::query_as(
            "SELECT a.workload_id, a.node_id, a.gpu_uuid, a.mode, lower(a.slots) AS slot_start,
                    upper(a.slots) AS slot_end, a.mig_profile, w.org_id, w.kind, w.tier,
                    w.priority, w.cpu_millis, w.memory_mib, w.disk_gib
             FROM gpu_allocations a JOIN workloads w ON w.id = a.workload_id
             JOIN nodes n ON n.id = a.node_id
             WHERE n.state = 'ready'",
        )
        .fetch_all(&mut *conn)
        .await?;
        Ok(SchedFleet {
            nodes,
            gpus,
            allocations,
        })
    }

    /// Commit a placement in the caller's transaction, under a savepoint: on `Conflict`
    /// nothing of it remains and the transaction goes on. Holds the node's CPU/memory/disk,
    /// every GPU slot, moves the workload to `scheduled`, and appends the assignment to the
    /// node's log (which wakes its agent's stream).
    pub async fn placement_commit(
        &self,
        conn: &mut PgConnection,
        commit: &PlacementCommit<'_>,
    ) -> Result<AssignmentId, PlaceError> {
        sqlx::query("SAVEPOINT place").execute(&mut *conn).await?;
        match self.placement_commit_inner(conn, commit).await {
            Ok(id) => {
                sqlx::query("RELEASE SAVEPOINT place")
                    .execute(&mut *conn)
                    .await?;
                Ok(id)
            }
            Err(e) => {
                sqlx::query("ROLLBACK TO SAVEPOINT place")
                    .execute(&mut *conn)
                    .await?;
                Err(e)
            }
        }
    }

    async fn placement_commit_inner(
        &self,
        conn: &mut PgConnection,
        commit: &PlacementCommit<'_>,
    ) -> Result<AssignmentId, PlaceError> {
        let w: WorkloadRecord = sqlx::query_as(&format!(
            "SELECT {WORKLOAD_COLUMNS} FROM workloads WHERE id = $1 FOR UPDATE"
        ))
        .bind(commit.workload.as_uuid())
        .fetch_optional(&mut *conn)
        .await?
        .ok_or(StoreError::NotFound { what: "workload" })?;
        if w.state != "pending" {
            return Err(PlaceError::Conflict("the workload is no longer pending"));
        }
        let held = sqlx::query(
            "UPDATE nodes SET cpu_millis_allocated = cpu_millis_allocated + $2,
                 memory_mib_allocated = memory_mib_allocated + $3,
                 disk_gib_allocated = disk_gib_allocated + $4
             WHERE id = $1 AND state = 'ready'
               AND cpu_millis_allocated + $2 <= cpu_cores::bigint * 1000
               AND memory_mib_allocated + $3 <= memory_mib
               AND disk_gib_allocated + $4 <= disk_gib",
        )
        .bind(commit.node.as_uuid())
        .bind(w.cpu_millis)
        .bind(w.memory_mib)
        .bind(w.disk_gib)
        .execute(&mut *conn)
        .await?;
        if held.rows_affected() != 1 {
            return Err(PlaceError::Conflict(
                "the node is no longer ready or lacks the CPU, memory or disk",
            ));
        }
        let mut gpu_uuids = Vec::with_capacity(commit.holds.len());
        for hold in commit.holds {
            let (gpu, mode, start, end, profile) = match hold {
                GpuHold::Whole { gpu_uuid } => (gpu_uuid, "whole", WHOLE.0, WHOLE.1, None),
                GpuHold::Mig {
                    gpu_uuid,
                    profile,
                    start,
                    size,
                } => (
                    gpu_uuid,
                    "mig",
                    *start,
                    start + size,
                    Some(profile.as_str()),
                ),
                GpuHold::Share {
                    gpu_uuid,
                    memory_mib,
                    max_tenants,
                } => {
                    let start =
                        share_offset(conn, commit.node, gpu_uuid, *memory_mib, *max_tenants)
                            .await?;
                    (gpu_uuid, "share", start, start + memory_mib, None)
                }
            };
            let healthy: Option<(bool,)> = sqlx::query_as(
                "SELECT health <> 'unhealthy' AND removed_at IS NULL FROM node_gpus
                 WHERE node_id = $1 AND uuid = $2",
            )
            .bind(commit.node.as_uuid())
            .bind(gpu)
            .fetch_optional(&mut *conn)
            .await?;
            if healthy != Some((true,)) {
                return Err(PlaceError::Conflict("the GPU is gone or unhealthy"));
            }
            sqlx::query(
                "INSERT INTO gpu_allocations (workload_id, node_id, gpu_uuid, mode, slots,
                     mig_profile)
                 VALUES ($1, $2, $3, $4, int8range($5, $6), $7)",
            )
            .bind(commit.workload.as_uuid())
            .bind(commit.node.as_uuid())
            .bind(gpu)
            .bind(mode)
            .bind(start)
            .bind(end)
            .bind(profile)
            .execute(&mut *conn)
            .await?;
            gpu_uuids.push(gpu.clone());
        }
        let assignment = AssignmentId::new();
        self.assignment_put(
            conn,
            AssignmentPut {
                id: assignment,
                node: commit.node,
                kind: commit.assignment_kind,
                spec: commit.assignment_spec,
                gpu_uuids: &gpu_uuids,
            },
        )
        .await
        .map_err(|e| match e {
            StoreError::NotFound { .. } | StoreError::Conflict { .. } => {
                PlaceError::Conflict("the node cannot take assignments")
            }
            e => PlaceError::Store(e),
        })?;
        sqlx::query(
            "UPDATE workloads SET state = 'scheduled', state_reason = '', node_id = $2,
                 assignment_id = $3, placed_at = now(), state_changed_at = now(),
                 updated_at = now()
             WHERE id = $1",
        )
        .bind(commit.workload.as_uuid())
        .bind(commit.node.as_uuid())
        .bind(assignment.as_uuid())
        .execute(&mut *conn)
        .await?;
        Ok(assignment)
    }

    /// Say why a pending workload is still pending (written only when it changed).
    pub async fn workload_set_reason(
        &self,
        conn: &mut PgConnection,
        id: WorkloadId,
        reason: &str,
    ) -> StoreResult<()> {
        sqlx::query(
            "UPDATE workloads SET state_reason = $2, updated_at = now()
             WHERE id = $1 AND state = 'pending' AND state_reason <> $2",
        )
        .bind(id.as_uuid())
        .bind(reason)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    /// Give back everything a workload holds — GPU slots, node CPU/memory/disk, its assignment
    /// (the agent stops it) — and move it to `state` with `reason`. Going back to `pending`
    /// queues it again. Answers whether it held anything. Wakes the schedulers: capacity was
    /// freed.
    pub async fn workload_release(
        &self,
        conn: &mut PgConnection,
        id: WorkloadId,
        state: &str,
        reason: &str,
    ) -> StoreResult<bool> {
        let w: Option<WorkloadRecord> = sqlx::query_as(&format!(
            "SELECT {WORKLOAD_COLUMNS} FROM workloads WHERE id = $1 FOR UPDATE"
        ))
        .bind(id.as_uuid())
        .fetch_optional(&mut *conn)
        .await?;
        let Some(w) = w else {
            return Err(StoreError::NotFound { what: "workload" });
        };
        let held = w.node_id.is_some();
        if let Some(node) = w.node_id {
            sqlx::query("DELETE FROM gpu_allocations WHERE workload_id = $1")
                .bind(w.id)
                .execute(&mut *conn)
                .await?;
            sqlx::query(
                "UPDATE nodes SET cpu_millis_allocated = GREATEST(cpu_millis_allocated - $2, 0),
                     memory_mib_allocated = GREATEST(memory_mib_allocated - $3, 0),
                     disk_gib_allocated = GREATEST(disk_gib_allocated - $4, 0)
                 WHERE id = $1",
            )
            .bind(node)
            .bind(w.cpu_millis)
            .bind(w.memory_mib)
            .bind(w.disk_gib)
            .execute(&mut *conn)
            .await?;
            if let Some(a) = w.assignment_id {
                match self
                    .assignment_remove(conn, AssignmentId::from_uuid(a))
                    .await
                {
                    Ok(_) | Err(StoreError::NotFound { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        sqlx::query(
            "UPDATE workloads SET state = $2, state_reason = $3, node_id = NULL,
                 assignment_id = NULL, placed_at = NULL, state_changed_at = now(),
                 updated_at = now()
             WHERE id = $1",
        )
        .bind(w.id)
        .bind(state)
        .bind(reason)
        .execute(&mut *conn)
        .await?;
        if held || state == "pending" {
            wake_schedulers(conn).await?;
        }
        Ok(held)
    }

    /// Workloads placed on `node`, for the lifecycle controller.
    pub async fn workloads_on_node(
        &self,
        conn: &mut PgConnection,
        node: NodeId,
    ) -> StoreResult<Vec<WorkloadRecord>> {
        Ok(sqlx::query_as(&format!(
            "SELECT {WORKLOAD_COLUMNS} FROM workloads WHERE node_id = $1 ORDER BY id FOR UPDATE"
        ))
        .bind(node.as_uuid())
        .fetch_all(&mut *conn)
        .await?)
    }

    /// Nodes being drained that still hold workloads.
    pub async fn nodes_draining_with_work(&self) -> StoreResult<Vec<NodeId>> {
        let rows: Vec<(Uuid,)> = sqlx::query_as(
            "SELECT DISTINCT n.id FROM nodes n JOIN workloads w ON w.node_id = n.id
             WHERE n.admin_state = 'draining'",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(id,)| NodeId::from_uuid(id))
            .collect())
    }
}

/// Where a share of `memory_mib` fits on the GPU: the lowest gap between existing shares,
/// found under the GPU row's lock (so tenancy and memory cannot be overrun by a race; the
/// exclusion constraint is the second line of defence).
async fn share_offset(
    conn: &mut PgConnection,
    node: NodeId,
    gpu: &str,
    memory_mib: i64,
    max_tenants: i64,
) -> Result<i64, PlaceError> {
    let total: Option<(i64,)> = sqlx::query_as(
        "SELECT memory_mib FROM node_gpus WHERE node_id = $1 AND uuid = $2 FOR UPDATE",
    )
    .bind(node.as_uuid())
    .bind(gpu)
    .fetch_optional(&mut *conn)
    .await?;
    let Some((total,)) = total else {
        return Err(PlaceError::Conflict("the GPU is gone"));
    };
    let held: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT lower(slots), upper(slots) FROM gpu_allocations
         WHERE node_id = $1 AND gpu_uuid = $2 AND mode = 'share' ORDER BY lower(slots)",
    )
    .bind(node.as_uuid())
    .bind(gpu)
    .fetch_all(&mut *conn)
    .await?;
    if held.len() as i64 >= max_tenants {
        return Err(PlaceError::Conflict("the GPU has its most shares already"));
    }
    let mut at = 0;
    for (start, end) in held {
        if start - at >= memory_mib {
            break;
        }
        at = at.max(end);
    }
    if at + memory_mib > total {
        return Err(PlaceError::Conflict("the GPU's memory is taken"));
    }
    Ok(at)
}

async fn wake_schedulers(conn: &mut PgConnection) -> StoreResult<()> {
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(PENDING_CHANNEL)
        .execute(&mut *conn)
        .await?;
    Ok(())
}
