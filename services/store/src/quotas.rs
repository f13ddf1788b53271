//! Per-org GPU quotas (per GPU type and product), set by operators, enforced by the scheduler.

use kiln_domain::OrgId;
use sqlx::PgConnection;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::{Store, StoreResult};

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct QuotaRecord {
    pub org_id: Uuid,
    pub gpu_type: String,
    /// instance, pod or endpoint.
    pub product: String,
    pub max_gpus: i32,
    pub updated_at: OffsetDateTime,
}

impl Store {
    /// Set (or replace) one quota. Operators only: the caller checks.
    pub async fn quota_set(
        &self,
        conn: &mut PgConnection,
        org: OrgId,
        gpu_type: &str,
        product: &str,
        max_gpus: i32,
    ) -> StoreResult<QuotaRecord> {
        Ok(sqlx::query_as(
            "INSERT INTO org_gpu_quotas (org_id, gpu_type, product, max_gpus)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (org_id, gpu_type, product) DO UPDATE
                 SET max_gpus = EXCLUDED.max_gpus, updated_at = now()
             RETURNING org_id, gpu_type, product, max_gpus, updated_at",
        )
        .bind(org.as_uuid())
        .bind(gpu_type)
        .bind(product)
        .bind(max_gpus)
        .fetch_one(&mut *conn)
        .await?)
    }

    /// Remove one quota (no limit any more). Answers whether there was one.
    pub async fn quota_remove(
        &self,
        conn: &mut PgConnection,
        org: OrgId,
        gpu_type: &str,
        product: &str,
    ) -> StoreResult<bool> {
        let done = sqlx::query(
            "DELETE FROM org_gpu_quotas WHERE org_id = $1 AND gpu_type = $2 AND product = $3",
        )
        .bind(org.as_uuid())
        .bind(gpu_type)
        .bind(product)
        .execute(&mut *conn)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    /// One org's quotas; `NotFound` when the org does not exist (an empty list means no
    /// limits).
    pub async fn quota_list(&self, org: OrgId) -> StoreResult<Vec<QuotaRecord>> {
        let exists: Option<(Uuid,)> = sqlx::query_as("SELECT id FROM orgs WHERE id = $1")
            .bind(org.as_uuid())
            .fetch_optional(&self.pool)
            .await?;
        if exists.is_none() {
            return Err(crate::StoreError::NotFound { what: "org" });
        }
        Ok(sqlx::query_as(
            "SELECT org_id, gpu_type, product, max_gpus, updated_at FROM org_gpu_quotas
             WHERE org_id = $1 ORDER BY gpu_type, product",
        )
        .bind(org.as_uuid())
        .fetch_all(&self.pool)
        .await?)
    }

    /// Every quota, for the scheduler's view of the fleet.
    pub async fn quota_all(&self, conn: &mut PgConnection) -> StoreResult<Vec<QuotaRecord>> {
        Ok(sqlx::query_as(
            "SELECT org_id, gpu_type, product, max_gpus, updated_at FROM org_gpu_quotas",
        )
        .fetch_all(&mut *conn)
        .await?)
    }
}
