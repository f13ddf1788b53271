//! Orgs and their members.

use kiln_domain::{Email, OrgId, OrgName, Permission, Role, UserId};
use kiln_store::{AuditEvent, OrgScope, Principal, StoreError};
use sqlx::PgConnection;

use super::{Checks, page, parse_role};
use crate::error::ApiError;
use crate::state::AppState;
use crate::state::Caller;
use crate::views::*;

pub(crate) fn audit(
    scope: &OrgScope,
    caller: &Caller,
    action: &'static str,
    target: String,
    details: serde_json::Value,
) -> AuditEvent {
    AuditEvent {
        org_id: Some(scope.org_id()),
        actor_user: match scope.principal() {
            Principal::User { user_id, .. } => Some(*user_id),
            Principal::ApiKey { created_by, .. } => *created_by,
        },
        actor_api_key: scope.principal().api_key_id(),
        action,
        target: Some(target),
        ip: caller.client.ip.clone(),
        details,
    }
}

pub async fn list(
    state: &AppState,
    caller: &Caller,
    limit: Option<i64>,
    cursor: Option<&str>,
) -> Result<OrgList, ApiError> {
    let page = page::<OrgId>(limit, cursor, |o| o.as_uuid())?;
    match &caller.principal {
        Principal::User { user_id, .. } => {
            let p = state.store.org_list_for_user(*user_id, page).await?;
            Ok(OrgList {
                items: p.items.iter().map(|(o, r)| OrgView::new(o, *r)).collect(),
                next_cursor: p.next_cursor,
            })
        }
        Principal::ApiKey { org_id, .. } => {
            let scope = state
                .store
                .authorize(&caller.principal, *org_id, Permission::OrgRead)
                .await?;
            let org = state.store.org_get(&scope).await?;
            let items = if page.after.is_some_and(|a| a >= org.id.as_uuid()) {
                vec![]
            } else {
                vec![OrgView::new(&org, scope.role())]
            };
            Ok(OrgList {
                items,
                next_cursor: None,
            })
        }
    }
}

pub async fn create(
    state: &AppState,
    conn: &mut PgConnection,
    caller: &Caller,
    input: &CreateOrgInput,
) -> Result<OrgView, ApiError> {
    let Principal::User { user_id, .. } = &caller.principal else {
        return Err(ApiError::Forbidden(
            "API keys cannot create orgs; sign in as a person".into(),
        ));
    };
    let name = OrgName::parse("name", &input.name)?;
    let org = state.store.org_create(conn, *user_id, &name).await?;
    state.me_forget(*user_id);
    state
        .store
        .audit_record(
            conn,
            &AuditEvent::by_user(
                Some(org.id),
                *user_id,
                "org.create",
                org.id.to_string(),
                caller.client.ip.clone(),
                serde_json::json!({ "name": org.name }),
            ),
        )
        .await?;
    Ok(OrgView::new(&org, Role::Owner))
}

pub async fn get(state: &AppState, caller: &Caller, org: OrgId) -> Result<OrgView, ApiError> {
    let scope = state
        .store
        .authorize(&caller.principal, org, Permission::OrgRead)
        .await?;
    let record = state.store.org_get(&scope).await?;
    Ok(OrgView::new(&record, scope.role()))
}

pub async fn members(
    state: &AppState,
    caller: &Caller,
    org: OrgId,
    limit: Option<i64>,
    cursor: Option<&str>,
) -> Result<MemberList, ApiError> {
    let page = page::<UserId>(limit, cursor, |u| u.as_uuid())?;
    let scope = state
        .store
        .authorize(&caller.principal, org, Permission::MemberRead)
        .await?;
    let p = state.store.member_list(&scope, page).await?;
    Ok(MemberList {
        items: p.items.iter().map(MemberView::from).collect(),
        next_cursor: p.next_cursor,
    })
}

fn may_grant(scope: &OrgScope, role: Role) -> Result<(), ApiError> {
    if role == Role::Owner && !scope.allows(Permission::OwnerManage) {
        return Err(ApiError::Forbidden("only owners can make owners".into()));
    }
    if !scope.role().may_grant(role) {
        return Err(ApiError::Forbidden(format!(
            "a `{}` cannot grant the `{role}` role",
            scope.role()
        )));
    }
    Ok(())
}

pub async fn member_add(
    state: &AppState,
    conn: &mut PgConnection,
    caller: &Caller,
    org: OrgId,
    input: &AddMemberInput,
) -> Result<MemberView, ApiError> {
    let scope = state
        .store
        .authorize_in(conn, &caller.principal, org, Permission::MemberManage)
        .await?;
    let mut checks = Checks::default();
    let email = checks.take(Email::parse("email", &input.email));
    let role = checks.take(parse_role("role", &input.role));
    checks.finish()?;
    let (Some(email), Some(role)) = (email, role) else {
        return Err(ApiError::BadRequest("invalid member".into()));
    };
    may_grant(&scope, role)?;
    let member = state
        .store
        .member_add(conn, &scope, &email, role)
        .await
        .map_err(|e| match e {
            StoreError::NotFound { .. } => ApiError::field(
                "email",
                "no account with this email exists; they must sign up first",
            ),
            StoreError::Conflict { .. } => {
                ApiError::Conflict("this person is already a member".into())
            }
            other => other.into(),
        })?;
    state.me_forget(member.user_id);
    let event = audit(
        &scope,
        caller,
        "member.add",
        member.user_id.to_string(),
        serde_json::json!({ "email": member.email, "role": role }),
    );
    state.store.audit_record(conn, &event).await?;
    Ok((&member).into())
}

pub async fn member_update(
    state: &AppState,
    conn: &mut PgConnection,
    caller: &Caller,
    org: OrgId,
    user: UserId,
    input: &UpdateMemberInput,
) -> Result<MemberView, ApiError> {
    let scope = state
        .store
        .authorize_in(conn, &caller.principal, org, Permission::MemberManage)
        .await?;
    let role = parse_role("role", &input.role)?;
    let current = state
        .store
        .member_role_for_update(conn, &scope, user)
        .await?;
    if current == Role::Owner && !scope.allows(Permission::OwnerManage) {
        return Err(ApiError::Forbidden(
            "only owners can change an owner's role".into(),
        ));
    }
    may_grant(&scope, role)?;
    let member = state
        .store
        .member_set_role(conn, &scope, user, role)
        .await?;
    state.me_forget(user);
    let event = audit(
        &scope,
        caller,
        "member.update",
        user.to_string(),
        serde_json::json!({ "from": current, "to": role }),
    );
    state.store.audit_record(conn, &event).await?;
    Ok((&member).into())
}

/// Remove a member. Anyone may leave an org themselves; removing others takes `MemberManage`,
/// and removing an owner takes an owner.
pub async fn member_remove(
    state: &AppState,
    conn: &mut PgConnection,
    caller: &Caller,
    org: OrgId,
    user: UserId,
) -> Result<(), ApiError> {
    let leaving = caller.principal.user_id() == Some(user);
    let needed = if leaving {
        Permission::OrgRead
    } else {
        Permission::MemberManage
    };
    let scope = state
        .store
        .authorize_in(conn, &caller.principal, org, needed)
        .await?;
    let current = state
        .store
        .member_role_for_update(conn, &scope, user)
        .await?;
    if current == Role::Owner && !leaving && !scope.allows(Permission::OwnerManage) {
        return Err(ApiError::Forbidden(
            "only owners can remove an owner".into(),
        ));
    }
    state.store.member_remove(conn, &scope, user).await?;
    state.me_forget(user);
    let event = audit(
        &scope,
        caller,
        "member.remove",
        user.to_string(),
        serde_json::json!({ "role": current, "left": leaving }),
    );
    state.store.audit_record(conn, &event).await?;
    Ok(())
}
