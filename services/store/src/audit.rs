//! The audit log: who did what, when, from where. Append-only.

use kiln_domain::{ApiKeyId, OrgId, UserId};
use sqlx::PgConnection;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::{OrgScope, PageOf, Store, StoreResult};

/// An event to record.
#[derive(Debug, Clone)]
pub struct AuditEvent {
    /// `None` for events about a person rather than an org (sign-in).
    pub org_id: Option<OrgId>,
    pub actor_user: Option<UserId>,
    pub actor_api_key: Option<ApiKeyId>,
    /// Dotted verb, e.g. `auth.login`, `api_key.create`, `member.remove`.
    pub action: &'static str,
    pub target: Option<String>,
    pub ip: Option<String>,
    pub details: serde_json::Value,
}

impl AuditEvent {
    /// An event a person caused with their own account (sign-in, sign-out, …), recorded against
    /// `org` or, with `None`, against the person alone.
    pub fn by_user(
        org_id: Option<OrgId>,
        user: UserId,
        action: &'static str,
        target: String,
        ip: Option<String>,
        details: serde_json::Value,
    ) -> Self {
        Self {
            org_id,
            actor_user: Some(user),
            actor_api_key: None,
            action,
            target: Some(target),
            ip,
            details,
        }
    }
}

/// A recorded event as an org admin sees it.
#[derive(Debug, Clone)]
pub struct AuditRecord {
    pub id: i64,
    pub org_id: Option<OrgId>,
    pub actor_user: Option<UserId>,
    pub actor_email: Option<String>,
    pub actor_api_key: Option<ApiKeyId>,
    pub action: String,
    pub target: Option<String>,
    pub ip: Option<String>,
    pub details: serde_json::Value,
    pub created_at: OffsetDateTime,
}

type AuditRow = (
    i64,
    Option<Uuid>,
    Option<Uuid>,
    Option<String>,
    Option<Uuid>,
    String,
    Option<String>,
    Option<String>,
    serde_json::Value,
    OffsetDateTime,
);

impl Store {
    pub async fn audit_record(&self, conn: &mut PgConnection, e: &AuditEvent) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO audit_events (org_id, actor_user_id, actor_api_key_id, action, target, ip, details)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(e.org_id.map(|o| o.as_uuid()))
        .bind(e.actor_user.map(|u| u.as_uuid()))
        .bind(e.actor_api_key.map(|k| k.as_uuid()))
        .bind(e.action)
        .bind(&e.target)
        .bind(&e.ip)
        .bind(&e.details)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    /// Record outside any transaction (sign-in events).
    pub async fn audit_record_now(&self, e: &AuditEvent) -> StoreResult<()> {
        let mut conn = self.pool.acquire().await?;
        self.audit_record(&mut conn, e).await
    }

    /// The org's events, newest first: everything recorded against the org, plus the sign-in
    /// events of its current members since they joined (admins answer for their members'
    /// access, not for what those people did before or elsewhere).
    pub async fn audit_list(
        &self,
        scope: &OrgScope,
        limit: u32,
        before: Option<i64>,
    ) -> StoreResult<PageOf<AuditRecord>> {
        let limit = limit.clamp(1, crate::PageRequest::MAX_LIMIT);
        let rows: Vec<AuditRow> = sqlx::query_as(
                "SELECT e.id, e.org_id, e.actor_user_id, u.email, e.actor_api_key_id, e.action, e.target, e.ip, e.details, e.created_at
                 FROM audit_events e LEFT JOIN users u ON u.id = e.actor_user_id
                 WHERE ($2::bigint IS NULL OR e.id < $2)
                   AND (e.org_id = $1
                        OR (e.org_id IS NULL AND EXISTS (
                            SELECT 1 FROM memberships m
                            WHERE m.org_id = $1 AND m.user_id = e.actor_user_id AND e.created_at >= m.created_at)))
                 ORDER BY e.id DESC LIMIT $3",
            )
            .bind(scope.org_id().as_uuid())
            .bind(before)
            .bind(i64::from(limit) + 1)
            .fetch_all(&self.pool)
            .await?;
        let mut items: Vec<AuditRecord> = rows
            .into_iter()
            .map(|r| AuditRecord {
                id: r.0,
                org_id: r.1.map(OrgId::from_uuid),
                actor_user: r.2.map(UserId::from_uuid),
                actor_email: r.3,
                actor_api_key: r.4.map(ApiKeyId::from_uuid),
                action: r.5,
                target: r.6,
                ip: r.7,
                details: r.8,
                created_at: r.9,
            })
            .collect();
        let more = items.len() > limit as usize;
        items.truncate(limit as usize);
        let next_cursor = if more {
            items.last().map(|e| e.id.to_string())
        } else {
            None
        };
        Ok(PageOf { items, next_cursor })
    }
}
