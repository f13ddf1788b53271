//! API keys: created with a role no higher than the creator's, shown once, revocable.

use kiln_auth::ApiKeySecret;
use kiln_domain::{ApiKeyId, ApiKeyName, OrgId, Permission, Role};
use kiln_store::NewApiKey;
use sqlx::PgConnection;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::orgs::audit;
use super::{Checks, page, parse_role};
use crate::error::ApiError;
use crate::state::{AppState, Caller};
use crate::views::*;

pub async fn list(
    state: &AppState,
    caller: &Caller,
    org: OrgId,
    limit: Option<i64>,
    cursor: Option<&str>,
) -> Result<ApiKeyList, ApiError> {
    let page = page::<ApiKeyId>(limit, cursor, |k| k.as_uuid())?;
    let scope = state
        .store
        .authorize(&caller.principal, org, Permission::ApiKeyRead)
        .await?;
    let p = state.store.api_key_list(&scope, page).await?;
    Ok(ApiKeyList {
        items: p.items.iter().map(ApiKeyView::from).collect(),
        next_cursor: p.next_cursor,
    })
}

pub async fn create(
    state: &AppState,
    conn: &mut PgConnection,
    caller: &Caller,
    org: OrgId,
    input: &CreateApiKeyInput,
) -> Result<ApiKeyCreatedView, ApiError> {
    let scope = state
        .store
        .authorize_in(conn, &caller.principal, org, Permission::ApiKeyCreate)
        .await?;
    let mut checks = Checks::default();
    let name = checks.take(ApiKeyName::parse("name", &input.name));
    let role = match input.role.as_deref().filter(|r| !r.trim().is_empty()) {
        None => Some(Role::Member.min(scope.role())),
        Some(r) => checks.take(parse_role("role", r)),
    };
    let expires_at = match input.expires_at.as_deref().filter(|r| !r.trim().is_empty()) {
        None => None,
        Some(raw) => match OffsetDateTime::parse(raw.trim(), &Rfc3339) {
            Ok(t) if t > OffsetDateTime::now_utc() => Some(t),
            Ok(_) => {
                checks.push("expires_at", "must be in the future");
                None
            }
            Err(_) => {
                checks.push(
                    "expires_at",
                    "must be an RFC 3339 timestamp like 2027-01-31T00:00:00Z",
                );
                None
            }
        },
    };
    checks.finish()?;
    let (Some(name), Some(role)) = (name, role) else {
        return Err(ApiError::BadRequest("invalid api key".into()));
    };
    if !scope.role().may_grant(role) {
        return Err(ApiError::Forbidden(format!(
            "a `{}` cannot create a key with the `{role}` role",
            scope.role()
        )));
    }
    let secret = ApiKeySecret::generate();
    let prefix = secret.visible_prefix();
    let created_by = match &caller.principal {
        kiln_store::Principal::User { user_id, .. } => Some(*user_id),
        kiln_store::Principal::ApiKey { created_by, .. } => *created_by,
    };
    let record = state
        .store
        .api_key_create(
            conn,
            &scope,
            NewApiKey {
                name: &name,
                role,
                prefix: &prefix,
                digest: &secret.digest(),
                expires_at,
                created_by,
            },
        )
        .await?;
    let event = audit(
        &scope,
        caller,
        "api_key.create",
        record.id.to_string(),
        serde_json::json!({ "name": record.name, "role": role, "prefix": prefix }),
    );
    state.store.audit_record(conn, &event).await?;
    Ok(ApiKeyCreatedView {
        id: record.id.to_string(),
        name: record.name,
        prefix,
        key: secret.expose().to_owned(),
        role: role.to_string(),
        created_at: ts(record.created_at),
        expires_at: record.expires_at.map(ts),
    })
}

/// Revoke a key. Members may revoke keys they created; admins any key of the org.
pub async fn revoke(
    state: &AppState,
    conn: &mut PgConnection,
    caller: &Caller,
    org: OrgId,
    key: &str,
) -> Result<ApiKeyView, ApiError> {
    let scope = state
        .store
        .authorize_in(conn, &caller.principal, org, Permission::ApiKeyCreate)
        .await?;
    let key: ApiKeyId = key.parse().map_err(|_| ApiError::NotFound("api key"))?;
    let existing = state.store.api_key_get(conn, &scope, key).await?;
    let own = existing.created_by.is_some() && existing.created_by == caller.principal.user_id();
    if !own && !scope.allows(Permission::ApiKeyRevokeAny) {
        return Err(ApiError::Forbidden(
            "only admins can revoke keys that someone else created".into(),
        ));
    }
    let record = state.store.api_key_revoke(conn, &scope, key).await?;
    let event = audit(
        &scope,
        caller,
        "api_key.revoke",
        record.id.to_string(),
        serde_json::json!({ "name": record.name, "prefix": record.prefix }),
    );
    state.store.audit_record(conn, &event).await?;
    Ok((&record).into())
}
