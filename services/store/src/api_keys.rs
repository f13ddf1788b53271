//! API keys: org-scoped credentials with a role, kept only as a digest.

use kiln_auth::SecretDigest;
use kiln_domain::{ApiKeyId, ApiKeyName, OrgId, Role, UserId};
use sqlx::PgConnection;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::{OrgScope, PageOf, PageRequest, Store, StoreError, StoreResult};

#[derive(Debug, Clone)]
pub struct ApiKeyRecord {
    pub id: ApiKeyId,
    pub org_id: OrgId,
    pub name: String,
    pub prefix: String,
    pub role: Role,
    pub created_by: Option<UserId>,
    pub created_at: OffsetDateTime,
    pub expires_at: Option<OffsetDateTime>,
    pub revoked_at: Option<OffsetDateTime>,
    pub last_used_at: Option<OffsetDateTime>,
}

/// What a live key authenticates as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyAuth {
    pub key_id: ApiKeyId,
    pub org_id: OrgId,
    pub role: Role,
    pub created_by: Option<UserId>,
    /// When the key stops working on its own (a cache of this answer must still honour it).
    pub expires_at: Option<OffsetDateTime>,
}

pub struct NewApiKey<'a> {
    pub name: &'a ApiKeyName,
    pub role: Role,
    pub prefix: &'a str,
    pub digest: &'a SecretDigest,
    pub expires_at: Option<OffsetDateTime>,
    pub created_by: Option<UserId>,
}

type KeyRow = (
    Uuid,
    Uuid,
    String,
    String,
    String,
    Option<Uuid>,
    OffsetDateTime,
    Option<OffsetDateTime>,
    Option<OffsetDateTime>,
    Option<OffsetDateTime>,
);

const KEY_COLUMNS: &str =
    "id, org_id, name, prefix, role, created_by, created_at, expires_at, revoked_at, last_used_at";

fn key_from_row(r: KeyRow) -> StoreResult<ApiKeyRecord> {
    Ok(ApiKeyRecord {
        id: ApiKeyId::from_uuid(r.0),
        org_id: OrgId::from_uuid(r.1),
        name: r.2,
        prefix: r.3,
        role: r
            .4
            .parse()
            .map_err(|_| StoreError::NotFound { what: "role" })?,
        created_by: r.5.map(UserId::from_uuid),
        created_at: r.6,
        expires_at: r.7,
        revoked_at: r.8,
        last_used_at: r.9,
    })
}

impl Store {
    pub async fn api_key_create(
        &self,
        conn: &mut PgConnection,
        scope: &OrgScope,
        new: NewApiKey<'_>,
    ) -> StoreResult<ApiKeyRecord> {
        let row: KeyRow = sqlx::query_as(&format!(
            "INSERT INTO api_keys (id, org_id, name, prefix, secret_hash, role, created_by, expires_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING {KEY_COLUMNS}"
        ))
        .bind(ApiKeyId::new().as_uuid())
        .bind(scope.org_id().as_uuid())
        .bind(new.name.as_str())
        .bind(new.prefix)
        .bind(new.digest.as_bytes())
        .bind(new.role.as_str())
        .bind(new.created_by.map(|u| u.as_uuid()))
        .bind(new.expires_at)
        .fetch_one(&mut *conn)
        .await
        .map_err(|e| StoreError::from_unique(e, "api key"))?;
        key_from_row(row)
    }

    /// Keys of the org, newest last; revoked keys are listed with `revoked_at`.
    pub async fn api_key_list(
        &self,
        scope: &OrgScope,
        page: PageRequest,
    ) -> StoreResult<PageOf<ApiKeyRecord>> {
        let rows: Vec<KeyRow> = sqlx::query_as(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE org_id = $1 AND ($2::uuid IS NULL OR id > $2)
             ORDER BY id LIMIT $3"
        ))
        .bind(scope.org_id().as_uuid())
        .bind(page.after)
        .bind(page.fetch())
        .fetch_all(&self.pool)
        .await?;
        let items = rows
            .into_iter()
            .map(key_from_row)
            .collect::<StoreResult<Vec<_>>>()?;
        Ok(page.finish(items, |k| k.id.to_string()))
    }

    pub async fn api_key_get(
        &self,
        conn: &mut PgConnection,
        scope: &OrgScope,
        id: ApiKeyId,
    ) -> StoreResult<ApiKeyRecord> {
        let row: Option<KeyRow> = sqlx::query_as(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE org_id = $1 AND id = $2"
        ))
        .bind(scope.org_id().as_uuid())
        .bind(id.as_uuid())
        .fetch_optional(&mut *conn)
        .await?;
        row.map(key_from_row)
            .transpose()?
            .ok_or(StoreError::NotFound { what: "api key" })
    }

    /// Revoke a key of this org. Revoking twice is not an error (the first time stands).
    pub async fn api_key_revoke(
        &self,
        conn: &mut PgConnection,
        scope: &OrgScope,
        id: ApiKeyId,
    ) -> StoreResult<ApiKeyRecord> {
        let row: Option<KeyRow> = sqlx::query_as(&format!(
            "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, now())
             WHERE org_id = $1 AND id = $2 RETURNING {KEY_COLUMNS}"
        ))
        .bind(scope.org_id().as_uuid())
        .bind(id.as_uuid())
        .fetch_optional(&mut *conn)
        .await?;
        row.map(key_from_row)
            .transpose()?
            .ok_or(StoreError::NotFound { what: "api key" })
    }

    /// Look a presented key up by digest: live (not revoked, not expired) keys only. Records
    /// `last_used_at` at most once a minute per key, so the hot path stays a read.
    pub async fn api_key_authenticate(
        &self,
        digest: &SecretDigest,
    ) -> StoreResult<Option<ApiKeyAuth>> {
        type Row = (
            Uuid,
            Uuid,
            String,
            Option<Uuid>,
            Option<OffsetDateTime>,
            bool,
        );
        let row: Option<Row> = sqlx::query_as(
            "SELECT id, org_id, role, created_by, expires_at,
                    last_used_at IS NULL OR last_used_at < now() - interval '60 seconds'
             FROM api_keys
             WHERE secret_hash = $1 AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now())",
        )
        .bind(digest.as_bytes())
        .fetch_optional(&self.pool)
        .await?;
        let Some((id, org, role, created_by, expires_at, stale)) = row else {
            return Ok(None);
        };
        if stale {
            sqlx::query("UPDATE api_keys SET last_used_at = now() WHERE id = $1")
                .bind(id)
                .execute(&self.pool)
                .await?;
        }
        let Ok(role) = role.parse() else {
            return Ok(None);
        };
        Ok(Some(ApiKeyAuth {
            key_id: ApiKeyId::from_uuid(id),
            org_id: OrgId::from_uuid(org),
            role,
            created_by: created_by.map(UserId::from_uuid),
            expires_at,
        }))
    }
}
