//! Who is calling ([`Principal`]) and the proof that they may act in one org ([`OrgScope`]).

use kiln_domain::{ApiKeyId, OrgId, Permission, Role, SessionId, UserId};

use sqlx::PgConnection;

use crate::{Store, StoreError};

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// A person, signed in with a session.
    User {
        user_id: UserId,
        session_id: SessionId,
        is_operator: bool,
    },
    /// An API key: bound to one org with one role.
    ApiKey {
        key_id: ApiKeyId,
        org_id: OrgId,
        role: Role,
        created_by: Option<UserId>,
    },
}

impl Principal {
    /// Stable text naming the caller, for idempotency records and logs.
    pub fn label(&self) -> String {
        match self {
            Principal::User { user_id, .. } => user_id.to_string(),
            Principal::ApiKey { key_id, .. } => key_id.to_string(),
        }
    }

    pub fn user_id(&self) -> Option<UserId> {
        match self {
            Principal::User { user_id, .. } => Some(*user_id),
            Principal::ApiKey { .. } => None,
        }
    }

    pub fn api_key_id(&self) -> Option<ApiKeyId> {
        match self {
            Principal::ApiKey { key_id, .. } => Some(*key_id),
            Principal::User { .. } => None,
        }
    }

    pub fn is_operator(&self) -> bool {
        matches!(
            self,
            Principal::User {
                is_operator: true,
                ..
            }
        )
    }
}

/// Proof that a principal may act in one org with a given role. Fields are private and the
/// only constructor is [`Store::authorize`]: tenant-scoped store methods take `&OrgScope`, so
/// tenant data cannot be reached without passing authorisation.
#[derive(Debug, Clone)]
pub struct OrgScope {
    org_id: OrgId,
    role: Role,
    principal: Principal,
}

impl OrgScope {
    pub fn org_id(&self) -> OrgId {
        self.org_id
    }
    pub fn role(&self) -> Role {
        self.role
    }
    pub fn principal(&self) -> &Principal {
        &self.principal
    }
    /// Whether the same principal may also do `permission` here (no new query).
    pub fn allows(&self, permission: Permission) -> bool {
        self.role.allows(permission)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthzError {
    /// Not a member (or another org's key): the org does not exist as far as they can tell.
    #[error("org not found")]
    NotFound,
    /// A member whose role lacks the permission.
    #[error("your role `{role}` may not do this")]
    Forbidden { role: Role },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Store {
    /// The one gate to tenant data: resolve the caller's role in `org` and check `permission`.
    pub async fn authorize(
        &self,
        principal: &Principal,
        org_id: OrgId,
        permission: Permission,
    ) -> Result<OrgScope, AuthzError> {
        let mut conn = self.pool.acquire().await.map_err(StoreError::from)?;
        self.authorize_in(&mut conn, principal, org_id, permission)
            .await
    }

    /// [`authorize`](Self::authorize) on a connection the caller already holds — inside a write
    /// transaction, so a request never waits for a second pooled connection while holding one
    /// (which, with every connection held by such requests, would starve them all).
    pub async fn authorize_in(
        &self,
        conn: &mut PgConnection,
        principal: &Principal,
        org_id: OrgId,
        permission: Permission,
    ) -> Result<OrgScope, AuthzError> {
        let role = match principal {
            Principal::ApiKey {
                org_id: key_org,
                role,
                ..
            } => {
                if *key_org != org_id {
                    return Err(AuthzError::NotFound);
                }
                *role
            }
            Principal::User { user_id, .. } => {
                let row: Option<(String,)> = sqlx::query_as(
                    "SELECT role FROM memberships WHERE org_id = $1 AND user_id = $2",
                )
                .bind(org_id.as_uuid())
                .bind(user_id.as_uuid())
                .fetch_optional(&mut *conn)
                .await
                .map_err(StoreError::from)?;
                let Some((role,)) = row else {
                    return Err(AuthzError::NotFound);
                };
                role.parse().map_err(|_| AuthzError::NotFound)?
            }
        };
        if !role.allows(permission) {
            return Err(AuthzError::Forbidden { role });
        }
        Ok(OrgScope {
            org_id,
            role,
            principal: principal.clone(),
        })
    }
}
