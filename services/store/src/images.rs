//! The VM image catalog (`vm_images`): what instances boot. Operators write it; anyone signed in
//! reads the active images. Not tenant data, so no [`crate::OrgScope`]: the API checks the
//! operator before calling the writing methods.

use sqlx::PgConnection;
use time::OffsetDateTime;

use crate::{Store, StoreError, StoreResult};

/// One catalog image.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct VmImageRecord {
    pub name: String,
    pub description: String,
    pub kernel: String,
    pub initrd: String,
    pub disk: String,
    pub kernel_args: String,
    pub login_user: String,
    pub min_disk_gib: i64,
    /// `active` or `deprecated`.
    pub status: String,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
}

/// An image's fields as an operator gives them (validated by the caller).
#[derive(Debug, Clone)]
pub struct VmImageFields<'a> {
    pub description: &'a str,
    pub kernel: &'a str,
    pub initrd: &'a str,
    pub disk: &'a str,
    pub kernel_args: &'a str,
    pub login_user: &'a str,
    pub min_disk_gib: i64,
    pub status: &'a str,
}

const COLUMNS: &str = "name, description, kernel, initrd, disk, kernel_args, login_user, \
     min_disk_gib, status, created_at, updated_at";

impl Store {
    /// The catalog by name; deprecated images only with `include_deprecated`.
    pub async fn vm_image_list(&self, include_deprecated: bool) -> StoreResult<Vec<VmImageRecord>> {
        Ok(sqlx::query_as(&format!(
            "SELECT {COLUMNS} FROM vm_images WHERE $1 OR status = 'active' ORDER BY name"
        ))
        .bind(include_deprecated)
        .fetch_all(&self.pool)
        .await?)
    }

    /// One image, read on `conn` (a caller's transaction sees its own writes).
    pub async fn vm_image_get(
        &self,
        conn: &mut PgConnection,
        name: &str,
    ) -> StoreResult<Option<VmImageRecord>> {
        Ok(
            sqlx::query_as(&format!("SELECT {COLUMNS} FROM vm_images WHERE name = $1"))
                .bind(name)
                .fetch_optional(&mut *conn)
                .await?,
        )
    }

    /// Add an image; `Conflict` when the name is taken.
    pub async fn vm_image_create(
        &self,
        conn: &mut PgConnection,
        name: &str,
        f: &VmImageFields<'_>,
    ) -> StoreResult<VmImageRecord> {
        sqlx::query_as(&format!(
            "INSERT INTO vm_images (name, description, kernel, initrd, disk, kernel_args,
                 login_user, min_disk_gib, status)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING {COLUMNS}"
        ))
        .bind(name)
        .bind(f.description)
        .bind(f.kernel)
        .bind(f.initrd)
        .bind(f.disk)
        .bind(f.kernel_args)
        .bind(f.login_user)
        .bind(f.min_disk_gib)
        .bind(f.status)
        .fetch_one(&mut *conn)
        .await
        .map_err(|e| StoreError::from_unique(e, "image"))
    }

    /// Create the image or replace all its fields; answers the row and whether it is new.
    /// Instances already created keep the image as it was when they were created (their
    /// workload's spec holds a copy), so a change never swaps the base disk under an overlay.
    pub async fn vm_image_put(
        &self,
        conn: &mut PgConnection,
        name: &str,
        f: &VmImageFields<'_>,
    ) -> StoreResult<(VmImageRecord, bool)> {
        let row: VmImageRecord = sqlx::query_as(&format!(
            "INSERT INTO vm_images AS i (name, description, kernel, initrd, disk, kernel_args,
                 login_user, min_disk_gib, status)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
             ON CONFLICT (name) DO UPDATE SET description = EXCLUDED.description,
                 kernel = EXCLUDED.kernel, initrd = EXCLUDED.initrd, disk = EXCLUDED.disk,
                 kernel_args = EXCLUDED.kernel_args, login_user = EXCLUDED.login_user,
                 min_disk_gib = EXCLUDED.min_disk_gib, status = EXCLUDED.status,
                 updated_at = now()
             RETURNING {COLUMNS}"
        ))
        .bind(name)
        .bind(f.description)
        .bind(f.kernel)
        .bind(f.initrd)
        .bind(f.disk)
        .bind(f.kernel_args)
        .bind(f.login_user)
        .bind(f.min_disk_gib)
        .bind(f.status)
        .fetch_one(&mut *conn)
        .await?;
        let created = row.created_at == row.updated_at;
        Ok((row, created))
    }

    /// How many instances that are not terminated were created from the image.
    pub async fn vm_image_in_use(&self, conn: &mut PgConnection, name: &str) -> StoreResult<i64> {
        let (n,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM workloads
             WHERE kind = 'instance' AND state <> 'terminated' AND spec->>'image' = $1",
        )
        .bind(name)
        .fetch_one(&mut *conn)
        .await?;
        Ok(n)
    }

    /// Remove an image; `NotFound` when there is none.
    pub async fn vm_image_delete(&self, conn: &mut PgConnection, name: &str) -> StoreResult<()> {
        let done = sqlx::query("DELETE FROM vm_images WHERE name = $1")
            .bind(name)
            .execute(&mut *conn)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound { what: "image" });
        }
        Ok(())
    }
}
