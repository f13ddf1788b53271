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

/// Postgres channel: "there may be pending work" (payload `created`, or `freed:<workload uuid>`
/// when a workload gave capacity back, which schedulers apply to their cached view of the fleet).
pub const PENDING_CHANNEL: &str = "kiln_workloads_pending";
/// The prefix of a "capacity freed" notice; the workload's UUID follows.
pub const FREED: &str = "freed:";

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
    /// The W3C `traceparent` of the request that created it ('' when tracing was off).
    #[sqlx(default)]
    pub trace_parent: String,
}

pub(crate) const WORKLOAD_COLUMNS: &str = "id, org_id, kind, name, state, state_reason, state_changed_at, \
     tier, priority, gpu_mode, gpu_type, gpu_count, mig_profile, share_memory_mib, cpu_millis, \
     memory_mib, disk_gib, spec, node_id, assignment_id, placed_at, created_at, trace_parent";

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
    /// The held GPU's type and memory (for quota units).
    pub gpu_type: String,
    pub gpu_memory_mib: i64,
}

/// The fleet as one scheduling pass sees it (only what new work could use).
#[derive(Debug, Clone, Default)]
pub struct SchedFleet {
    pub nodes: Vec<SchedNode>,
    pub gpus: Vec<SchedGpu>,
    pub allocations: Vec<SchedAllocation>,
    pub quotas: Vec<crate::QuotaRecord>,
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

/// Insert one pending workload (of `endpoint`, for a replica); the caller wakes the schedulers.
pub(crate) async fn insert_workload(
    conn: &mut PgConnection,
    org: Uuid,
    endpoint: Option<Uuid>,
    new: &NewWorkload<'_>,
) -> StoreResult<WorkloadRecord> {
    Ok(sqlx::query_as(&format!(
        "INSERT INTO workloads (id, org_id, kind, name, tier, priority, gpu_mode, gpu_type,
             gpu_count, mig_profile, share_memory_mib, cpu_millis, memory_mib, disk_gib, spec,
             state_reason, endpoint_id, trace_parent)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15,
             'waiting for the scheduler', $16, $17)
         RETURNING {WORKLOAD_COLUMNS}"
    ))
    .bind(WorkloadId::new().as_uuid())
    .bind(org)
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
    .bind(endpoint)
    // The current span's trace (the API request's), so the work's trace goes on from here.
    .bind(kiln_telemetry::current_traceparent().unwrap_or_default())
    .fetch_one(&mut *conn)
    .await?)
}

impl Store {
    /// Record a workload as pending and wake the schedulers.
    pub async fn workload_create(
        &self,
        conn: &mut PgConnection,
        scope: &OrgScope,
        new: &NewWorkload<'_>,
    ) -> StoreResult<WorkloadRecord> {
        let row = insert_workload(conn, scope.org_id().as_uuid(), None, new).await?;
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

    /// How many workloads wait to be placed (the scheduling queue's depth), whoever holds them.
    pub async fn workloads_pending_count(&self) -> StoreResult<i64> {
        let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM workloads WHERE state = 'pending'")
            .fetch_one(&self.pool)
            .await?;
        Ok(n)
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

    /// The schedulable fleet — GPUs of `types` only, or of every type with `None` (plus every
    /// ready node, for CPU-only work): ready nodes with their free CPU/memory/disk, their
    /// present GPUs, and what holds them.
    pub async fn sched_fleet(
        &self,
        conn: &mut PgConnection,
        types: Option<&[String]>,
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
             WHERE n.state = 'ready' AND g.removed_at IS NULL
               AND ($1::text[] IS NULL OR g.gpu_type = ANY($1))
             ORDER BY g.node_id, g.idx",
        )
        .bind(types)
        .fetch_all(&mut *conn)
        .await?;
        // Every allocation, ready node or not: quota usage counts them all.
        let allocations: Vec<SchedAllocation> = sqlx::query_as(
            "SELECT a.workload_id, a.node_id, a.gpu_uuid, a.mode, lower(a.slots) AS slot_start,
                    upper(a.slots) AS slot_end, a.mig_profile, w.org_id, w.kind, w.tier,
                    w.priority, w.cpu_millis, w.memory_mib, w.disk_gib,
                    COALESCE(g.gpu_type, '') AS gpu_type, g.memory_mib AS gpu_memory_mib
             FROM gpu_allocations a JOIN workloads w ON w.id = a.workload_id
             JOIN node_gpus g ON g.node_id = a.node_id AND g.uuid = a.gpu_uuid",
        )
        .fetch_all(&mut *conn)
        .await?;
        let quotas = self.quota_all(conn).await?;
        Ok(SchedFleet {
            nodes,
            gpus,
            allocations,
            quotas,
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

    /// Commit many placements at once, all or nothing, in a handful of set-based statements
    /// (the per-placement path costs a dozen round trips each). Whole GPUs and MIG slices
    /// only — shares need the GPU row lock of [`placement_commit`](Self::placement_commit).
    /// On [`PlaceError::Conflict`] nothing of the batch remains (savepoint) and the caller
    /// falls back to committing one by one. Answers the assignment ids, in input order.
    pub async fn placements_commit_batch(
        &self,
        conn: &mut PgConnection,
        commits: &[PlacementCommit<'_>],
    ) -> Result<Vec<AssignmentId>, PlaceError> {
        if commits.is_empty() {
            return Ok(Vec::new());
        }
        sqlx::query("SAVEPOINT place_batch")
            .execute(&mut *conn)
            .await?;
        match batch_inner(conn, commits).await {
            Ok(ids) => {
                sqlx::query("RELEASE SAVEPOINT place_batch")
                    .execute(&mut *conn)
                    .await?;
                Ok(ids)
            }
            Err(e) => {
                sqlx::query("ROLLBACK TO SAVEPOINT place_batch")
                    .execute(&mut *conn)
                    .await?;
                Err(e)
            }
        }
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
        if held {
            wake_schedulers_freed(conn, w.id).await?;
        } else if state == "pending" {
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

pub(crate) async fn wake_schedulers(conn: &mut PgConnection) -> StoreResult<()> {
    sqlx::query("SELECT pg_notify($1, 'created')")
        .bind(PENDING_CHANNEL)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Capacity was freed: schedulers release the workload from their cached view of the fleet.
async fn wake_schedulers_freed(conn: &mut PgConnection, workload: Uuid) -> StoreResult<()> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(PENDING_CHANNEL)
        .bind(format!("{FREED}{workload}"))
        .execute(&mut *conn)
        .await?;
    Ok(())
}

async fn batch_inner(
    conn: &mut PgConnection,
    commits: &[PlacementCommit<'_>],
) -> Result<Vec<AssignmentId>, PlaceError> {
    use std::collections::BTreeMap;
    let ids: Vec<Uuid> = commits.iter().map(|c| c.workload.as_uuid()).collect();
    // The workloads: still pending, and what they need of their nodes.
    let rows: Vec<(Uuid, i64, i64, i64)> = sqlx::query_as(
        "SELECT id, cpu_millis, memory_mib, disk_gib FROM workloads
         WHERE id = ANY($1) AND state = 'pending' FOR UPDATE",
    )
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await?;
    if rows.len() != commits.len() {
        return Err(PlaceError::Conflict("a workload is no longer pending"));
    }
    let need: std::collections::HashMap<Uuid, (i64, i64, i64)> = rows
        .into_iter()
        .map(|(id, c, m, d)| (id, (c, m, d)))
        .collect();
    // Node CPU/memory/disk, summed per node, each node in one conditional UPDATE.
    let mut per_node: BTreeMap<Uuid, (i64, i64, i64, i64)> = BTreeMap::new();
    for c in commits {
        let (cpu, mem, disk) = need[&c.workload.as_uuid()];
        let e = per_node.entry(c.node.as_uuid()).or_default();
        e.0 += cpu;
        e.1 += mem;
        e.2 += disk;
        e.3 += 1;
    }
    let nodes: Vec<Uuid> = per_node.keys().copied().collect();
    let col =
        |f: fn(&(i64, i64, i64, i64)) -> i64| -> Vec<i64> { per_node.values().map(f).collect() };
    let held = sqlx::query(
        "UPDATE nodes n SET cpu_millis_allocated = n.cpu_millis_allocated + d.cpu,
             memory_mib_allocated = n.memory_mib_allocated + d.mem,
             disk_gib_allocated = n.disk_gib_allocated + d.disk
         FROM unnest($1::uuid[], $2::bigint[], $3::bigint[], $4::bigint[]) AS d(id, cpu, mem, disk)
         WHERE n.id = d.id AND n.state = 'ready'
           AND n.cpu_millis_allocated + d.cpu <= n.cpu_cores::bigint * 1000
           AND n.memory_mib_allocated + d.mem <= n.memory_mib
           AND n.disk_gib_allocated + d.disk <= n.disk_gib",
    )
    .bind(&nodes)
    .bind(col(|v| v.0))
    .bind(col(|v| v.1))
    .bind(col(|v| v.2))
    .execute(&mut *conn)
    .await?;
    if held.rows_affected() as usize != nodes.len() {
        return Err(PlaceError::Conflict(
            "a node is no longer ready or lacks the CPU, memory or disk",
        ));
    }
    // GPU slots, all in one INSERT: the exclusion constraints refuse any double booking.
    let mut a_workload = Vec::new();
    let mut a_node = Vec::new();
    let mut a_gpu = Vec::new();
    let mut a_mode = Vec::new();
    let mut a_lo = Vec::new();
    let mut a_hi = Vec::new();
    let mut a_profile: Vec<Option<String>> = Vec::new();
    for c in commits {
        for h in c.holds {
            let (gpu, mode, lo, hi, profile) = match h {
                GpuHold::Whole { gpu_uuid } => (gpu_uuid, "whole", WHOLE.0, WHOLE.1, None),
                GpuHold::Mig {
                    gpu_uuid,
                    profile,
                    start,
                    size,
                } => (gpu_uuid, "mig", *start, start + size, Some(profile.clone())),
                GpuHold::Share { .. } => {
                    return Err(PlaceError::Conflict("shares are committed one by one"));
                }
            };
            a_workload.push(c.workload.as_uuid());
            a_node.push(c.node.as_uuid());
            a_gpu.push(gpu.clone());
            a_mode.push(mode);
            a_lo.push(lo);
            a_hi.push(hi);
            a_profile.push(profile);
        }
    }
    if !a_gpu.is_empty() {
        let inserted = sqlx::query(
            "INSERT INTO gpu_allocations (workload_id, node_id, gpu_uuid, mode, slots, mig_profile)
             SELECT a.w, a.n, a.g, a.m, int8range(a.lo, a.hi), a.p
             FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::bigint[],
                         $6::bigint[], $7::text[]) AS a(w, n, g, m, lo, hi, p)
             JOIN node_gpus ng ON ng.node_id = a.n AND ng.uuid = a.g
             WHERE ng.health <> 'unhealthy' AND ng.removed_at IS NULL",
        )
        .bind(&a_workload)
        .bind(&a_node)
        .bind(&a_gpu)
        .bind(&a_mode)
        .bind(&a_lo)
        .bind(&a_hi)
        .bind(&a_profile)
        .execute(&mut *conn)
        .await?;
        if inserted.rows_affected() as usize != a_gpu.len() {
            return Err(PlaceError::Conflict("a GPU is gone or unhealthy"));
        }
    }
    // Each node's log grows by its count of new assignments, under its row lock.
    let counts: Vec<i64> = per_node.values().map(|v| v.3).collect();
    let bumped: Vec<(Uuid, i64)> = sqlx::query_as(
        "UPDATE nodes n SET assignment_revision = n.assignment_revision + d.k
         FROM unnest($1::uuid[], $2::bigint[]) AS d(id, k)
         WHERE n.id = d.id AND n.admin_state <> 'retired'
         RETURNING n.id, n.assignment_revision",
    )
    .bind(&nodes)
    .bind(&counts)
    .fetch_all(&mut *conn)
    .await?;
    if bumped.len() != nodes.len() {
        return Err(PlaceError::Conflict("a node cannot take assignments"));
    }
    let mut next: std::collections::HashMap<Uuid, i64> = bumped
        .into_iter()
        .map(|(id, rev)| (id, rev - per_node[&id].3 + 1))
        .collect();
    let assignment_ids: Vec<AssignmentId> = commits.iter().map(|_| AssignmentId::new()).collect();
    let mut revisions = Vec::with_capacity(commits.len());
    for c in commits {
        let r = next.get_mut(&c.node.as_uuid()).expect("bumped above");
        revisions.push(*r);
        *r += 1;
    }
    let a_ids: Vec<Uuid> = assignment_ids.iter().map(|a| a.as_uuid()).collect();
    let c_nodes: Vec<Uuid> = commits.iter().map(|c| c.node.as_uuid()).collect();
    let kinds: Vec<&str> = commits.iter().map(|c| c.assignment_kind.as_str()).collect();
    let specs: Vec<&[u8]> = commits.iter().map(|c| c.assignment_spec).collect();
    let gpus: Vec<String> = commits
        .iter()
        .map(|c| {
            c.holds
                .iter()
                .map(|h| match h {
                    GpuHold::Whole { gpu_uuid }
                    | GpuHold::Mig { gpu_uuid, .. }
                    | GpuHold::Share { gpu_uuid, .. } => gpu_uuid.as_str(),
                })
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect();
    sqlx::query(
        "INSERT INTO node_assignments (id, node_id, generation, kind, spec, gpu_uuids, revision)
         SELECT a.id, a.node, 1, a.kind, a.spec,
                CASE WHEN a.gpus = '' THEN '{}'::text[] ELSE string_to_array(a.gpus, ',') END,
                a.rev
         FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::bytea[], $5::text[], $6::bigint[])
              AS a(id, node, kind, spec, gpus, rev)",
    )
    .bind(&a_ids)
    .bind(&c_nodes)
    .bind(&kinds)
    .bind(&specs)
    .bind(&gpus)
    .bind(&revisions)
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "INSERT INTO node_assignment_events (node_id, revision, assignment_id, generation, op, spec)
         SELECT a.node, a.rev, a.id, 1, 'upsert', a.spec
         FROM unnest($1::uuid[], $2::bigint[], $3::uuid[], $4::bytea[]) AS a(node, rev, id, spec)",
    )
    .bind(&c_nodes)
    .bind(&revisions)
    .bind(&a_ids)
    .bind(&specs)
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "UPDATE workloads w SET state = 'scheduled', state_reason = '', node_id = d.node,
             assignment_id = d.a, placed_at = now(), state_changed_at = now(), updated_at = now()
         FROM unnest($1::uuid[], $2::uuid[], $3::uuid[]) AS d(id, node, a)
         WHERE w.id = d.id",
    )
    .bind(&ids)
    .bind(&c_nodes)
    .bind(&a_ids)
    .execute(&mut *conn)
    .await?;
    // One notice per node, with its newest revision.
    let payloads: Vec<String> = next
        .iter()
        .map(|(node, after_last)| format!("{node}:{}", after_last - 1))
        .collect();
    sqlx::query("SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p")
        .bind(crate::fleet::ASSIGNMENT_CHANNEL)
        .bind(&payloads)
        .execute(&mut *conn)
        .await?;
    Ok(assignment_ids)
}
