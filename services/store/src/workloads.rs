//! Tenant reads of workloads (pods today): one org's workloads of one kind, with the GPUs they
//! hold and the ports their node's agent reports. Every method takes an [`OrgScope`]; the
//! scheduler's own access is in [`crate::scheduling`].

use kiln_domain::PodId;
use sqlx::PgConnection;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::{OrgScope, PageOf, PageRequest, Store, StoreError, StoreResult};

/// A workload as its tenant sees it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct TenantWorkloadRecord {
    pub id: Uuid,
    pub kind: String,
    pub name: String,
    pub state: String,
    pub state_reason: String,
    pub tier: String,
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
    /// The node's host name, while placed.
    pub node_hostname: Option<String>,
    /// UUIDs of the GPUs it holds (whole, or the GPU a MIG slice or share is on), in the
    /// node's GPU index order.
    pub gpus: Vec<String>,
    /// What the agent last reported for its current assignment (`[{port, protocol,
    /// host_port}]`), or `None` before any report.
    pub observed_ports: Option<serde_json::Value>,
    /// What its charges in the billing ledger add up to so far, in micro-units.
    pub cost_micros: i64,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
}

pub(crate) const TENANT_COLUMNS: &str = "w.id, w.kind, w.name, w.state, w.state_reason, w.tier, \
     w.gpu_mode, w.gpu_type, w.gpu_count, w.mig_profile, w.share_memory_mib, w.cpu_millis, \
     w.memory_mib, w.disk_gib, w.spec, w.node_id, COALESCE(NULLIF(n.public_address, ''), n.hostname) AS node_hostname, \
     ARRAY(SELECT a.gpu_uuid FROM gpu_allocations a \
           LEFT JOIN node_gpus g ON g.node_id = a.node_id AND g.uuid = a.gpu_uuid \
           WHERE a.workload_id = w.id ORDER BY g.idx, a.gpu_uuid) AS gpus, \
     (SELECT o.ports FROM node_observed o \
      WHERE o.assignment_id = w.assignment_id AND o.node_id = w.node_id) AS observed_ports, \
     COALESCE((SELECT sum(p.amount_micros) FROM ledger_postings p \
               WHERE p.workload_id = w.id), 0)::int8 AS cost_micros, \
     w.created_at, w.updated_at";

/// The public id of a workload of `kind`, as lists hand out cursors.
fn public_id(kind: &str, id: Uuid) -> String {
    match kind {
        "pod" => PodId::from_uuid(id).to_string(),
        "instance" => kiln_domain::InstanceId::from_uuid(id).to_string(),
        _ => kiln_domain::WorkloadId::from_uuid(id).to_string(),
    }
}

impl Store {
    /// The org's workloads of `kind`, newest first; the cursor is the last item's public id.
    pub async fn workload_list(
        &self,
        scope: &OrgScope,
        kind: &str,
        page: PageRequest,
    ) -> StoreResult<PageOf<TenantWorkloadRecord>> {
        let rows: Vec<TenantWorkloadRecord> = sqlx::query_as(&format!(
            "SELECT {TENANT_COLUMNS} FROM workloads w LEFT JOIN nodes n ON n.id = w.node_id
             WHERE w.org_id = $1 AND w.kind = $2 AND ($3::uuid IS NULL OR w.id < $3)
             ORDER BY w.id DESC LIMIT $4"
        ))
        .bind(scope.org_id().as_uuid())
        .bind(kind)
        .bind(page.after)
        .bind(page.fetch())
        .fetch_all(&self.pool)
        .await?;
        Ok(page.finish(rows, |w| public_id(kind, w.id)))
    }

    /// One workload of `kind` of the scope's org, read on `conn` (so a caller's transaction
    /// sees its own writes). Another org's, or another kind's, is `NotFound`.
    pub async fn workload_view(
        &self,
        conn: &mut PgConnection,
        scope: &OrgScope,
        kind: &str,
        id: Uuid,
    ) -> StoreResult<TenantWorkloadRecord> {
        sqlx::query_as(&format!(
            "SELECT {TENANT_COLUMNS} FROM workloads w LEFT JOIN nodes n ON n.id = w.node_id
             WHERE w.id = $1 AND w.org_id = $2 AND w.kind = $3"
        ))
        .bind(id)
        .bind(scope.org_id().as_uuid())
        .bind(kind)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or(StoreError::NotFound {
            what: kind_noun(kind),
        })
    }

    /// Lock one workload of `kind` of the scope's org for the rest of `conn`'s transaction and
    /// answer its state; another org's is `NotFound`.
    pub async fn workload_lock(
        &self,
        conn: &mut PgConnection,
        scope: &OrgScope,
        kind: &str,
        id: Uuid,
    ) -> StoreResult<String> {
        let row: Option<(String,)> = sqlx::query_as(
            "SELECT state FROM workloads WHERE id = $1 AND org_id = $2 AND kind = $3 FOR UPDATE",
        )
        .bind(id)
        .bind(scope.org_id().as_uuid())
        .bind(kind)
        .fetch_optional(&mut *conn)
        .await?;
        row.map(|(s,)| s).ok_or(StoreError::NotFound {
            what: kind_noun(kind),
        })
    }

    /// The memory of a GPU type present in the fleet (the largest, in MiB), for validating
    /// requests in the scope's org; `None` when no such GPU is present on a node that is not
    /// retired.
    pub async fn gpu_type_fleet_memory(
        &self,
        conn: &mut PgConnection,
        _scope: &OrgScope,
        gpu_type: &str,
    ) -> StoreResult<Option<i64>> {
        let (mib,): (Option<i64>,) = sqlx::query_as(
            "SELECT max(g.memory_mib) FROM node_gpus g JOIN nodes n ON n.id = g.node_id
             WHERE g.gpu_type = $1 AND g.removed_at IS NULL AND n.admin_state <> 'retired'",
        )
        .bind(gpu_type)
        .fetch_one(&mut *conn)
        .await?;
        Ok(mib)
    }
}

fn kind_noun(kind: &str) -> &'static str {
    match kind {
        "pod" => "pod",
        "instance" => "instance",
        _ => "workload",
    }
}
