//! The GPU catalog's live inputs: every present GPU of the fleet with what holds it, read in one
//! statement so the availability computed from it is one consistent instant.

use sqlx::types::Json;
use uuid::Uuid;

use crate::{Store, StoreResult};

/// One GPU of a node that is not retired, with its allocations.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct CatalogGpu {
    pub node_id: Uuid,
    pub uuid: String,
    pub gpu_type: Option<String>,
    /// The model name the driver reports ("NVIDIA H100 80GB HBM3").
    pub model: String,
    pub memory_mib: i64,
    /// healthy, degraded or unhealthy.
    pub health: String,
    /// The node is ready (online, active, registered): new work can go to it.
    pub node_ready: bool,
    pub mig_enabled: bool,
    /// What holds the GPU now, lowest slot first.
    pub slots: Json<Vec<CatalogSlot>>,
}

/// One allocation's hold on a GPU: `mode` whole, mig or share; `[start, end)` its slot range
/// (MIG: memory slices; share: MiB of the GPU's memory).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CatalogSlot {
    pub mode: String,
    pub start: i64,
    pub end: i64,
    pub mig_profile: Option<String>,
}

impl Store {
    /// Every GPU present on a node that is not retired, with its node's readiness and its
    /// allocations, node by node in GPU index order.
    pub async fn gpu_catalog(&self) -> StoreResult<Vec<CatalogGpu>> {
        Ok(sqlx::query_as(
            "SELECT g.node_id, g.uuid, g.gpu_type, g.model, g.memory_mib, g.health,
                    (n.state = 'ready' AND n.registered_at IS NOT NULL) AS node_ready,
                    g.mig_enabled,
                    COALESCE(
                        jsonb_agg(jsonb_build_object(
                                'mode', a.mode, 'start', lower(a.slots), 'end', upper(a.slots),
                                'mig_profile', a.mig_profile)
                            ORDER BY lower(a.slots))
                            FILTER (WHERE a.workload_id IS NOT NULL),
                        '[]') AS slots
             FROM node_gpus g
             JOIN nodes n ON n.id = g.node_id
             LEFT JOIN gpu_allocations a ON a.node_id = g.node_id AND a.gpu_uuid = g.uuid
             WHERE g.removed_at IS NULL AND n.admin_state <> 'retired'
             GROUP BY g.node_id, g.uuid, n.id
             ORDER BY g.node_id, g.idx",
        )
        .fetch_all(&self.pool)
        .await?)
    }
}
