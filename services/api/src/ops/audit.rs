//! The audit log, for org admins.

use kiln_domain::{OrgId, Permission};

use crate::error::{ApiError, FieldError};
use crate::state::{AppState, Caller};
use crate::views::*;

pub async fn list(
    state: &AppState,
    caller: &Caller,
    org: OrgId,
    limit: Option<i64>,
    cursor: Option<&str>,
) -> Result<AuditList, ApiError> {
    let scope = state
        .store
        .authorize(&caller.principal, org, Permission::AuditRead)
        .await?;
    let limit = match limit {
        None => 50,
        Some(n) if (1..=200).contains(&n) => n as u32,
        Some(_) => {
            return Err(ApiError::Validation(vec![FieldError {
                field: "limit".into(),
                message: "must be between 1 and 200".into(),
            }]));
        }
    };
    let before = match cursor.filter(|c| !c.is_empty()) {
        None => None,
        Some(c) => Some(
            c.parse::<i64>()
                .map_err(|_| ApiError::field("cursor", "is not a cursor this list gave out"))?,
        ),
    };
    let p = state.store.audit_list(&scope, limit, before).await?;
    Ok(AuditList {
        items: p.items.iter().map(AuditEventView::from).collect(),
        next_cursor: p.next_cursor,
    })
}
