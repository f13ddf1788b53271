//! Orgs and memberships. Every membership change locks the org row first, so concurrent
//! demotions cannot leave an org without an owner.

use kiln_domain::{Email, OrgId, OrgName, Role, UserId};
use sqlx::PgConnection;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::{OrgScope, PageOf, PageRequest, Store, StoreError, StoreResult};

#[derive(Debug, Clone)]
pub struct OrgRecord {
    pub id: OrgId,
    pub name: String,
    pub personal: bool,
    pub created_at: OffsetDateTime,
}

#[derive(Debug, Clone)]
pub struct MemberRecord {
    pub user_id: UserId,
    pub email: String,
    pub name: String,
    pub role: Role,
    pub joined_at: OffsetDateTime,
}

type OrgRow = (Uuid, String, bool, OffsetDateTime);
type MemberRow = (Uuid, String, String, String, OffsetDateTime);

fn org_from_row((id, name, personal, created_at): OrgRow) -> OrgRecord {
    OrgRecord {
        id: OrgId::from_uuid(id),
        name,
        personal,
        created_at,
    }
}

fn member_from_row((id, email, name, role, joined_at): MemberRow) -> StoreResult<MemberRecord> {
    let role = role
        .parse()
        .map_err(|_| StoreError::NotFound { what: "role" })?;
    Ok(MemberRecord {
        user_id: UserId::from_uuid(id),
        email,
        name,
        role,
        joined_at,
    })
}

const MEMBER_COLUMNS: &str = "u.id, u.email, u.name, m.role, m.created_at";

impl Store {
    pub(crate) async fn org_insert(
        &self,
        conn: &mut PgConnection,
        owner: UserId,
        name: &OrgName,
        personal: bool,
    ) -> StoreResult<OrgRecord> {
        let id = OrgId::new();
        let row: OrgRow = sqlx::query_as(
            "INSERT INTO orgs (id, name, personal, created_by) VALUES ($1, $2, $3, $4)
             RETURNING id, name, personal, created_at",
        )
        .bind(id.as_uuid())
        .bind(name.as_str())
        .bind(personal)
        .bind(owner.as_uuid())
        .fetch_one(&mut *conn)
        .await?;
        sqlx::query("INSERT INTO memberships (org_id, user_id, role) VALUES ($1, $2, 'owner')")
            .bind(id.as_uuid())
            .bind(owner.as_uuid())
            .execute(&mut *conn)
            .await?;
        Ok(org_from_row(row))
    }

    /// A new org owned by `owner`. Any signed-in person may create orgs.
    pub async fn org_create(
        &self,
        conn: &mut PgConnection,
        owner: UserId,
        name: &OrgName,
    ) -> StoreResult<OrgRecord> {
        self.org_insert(conn, owner, name, false).await
    }

    /// The orgs a user belongs to, with their role in each.
    pub async fn org_list_for_user(
        &self,
        user: UserId,
        page: PageRequest,
    ) -> StoreResult<PageOf<(OrgRecord, Role)>> {
        let rows: Vec<(Uuid, String, bool, OffsetDateTime, String)> = sqlx::query_as(
            "SELECT o.id, o.name, o.personal, o.created_at, m.role
             FROM memberships m JOIN orgs o ON o.id = m.org_id
             WHERE m.user_id = $1 AND ($2::uuid IS NULL OR o.id > $2)
             ORDER BY o.id LIMIT $3",
        )
        .bind(user.as_uuid())
        .bind(page.after)
        .bind(page.fetch())
        .fetch_all(&self.pool)
        .await?;
        let items = rows
            .into_iter()
            .filter_map(|(id, n, p, c, role)| {
                Some((org_from_row((id, n, p, c)), role.parse().ok()?))
            })
            .collect();
        Ok(page.finish(items, |(o, _)| o.id.to_string()))
    }

    pub async fn org_get(&self, scope: &OrgScope) -> StoreResult<OrgRecord> {
        let row: Option<OrgRow> =
            sqlx::query_as("SELECT id, name, personal, created_at FROM orgs WHERE id = $1")
                .bind(scope.org_id().as_uuid())
                .fetch_optional(&self.pool)
                .await?;
        row.map(org_from_row)
            .ok_or(StoreError::NotFound { what: "org" })
    }

    pub async fn member_list(
        &self,
        scope: &OrgScope,
        page: PageRequest,
    ) -> StoreResult<PageOf<MemberRecord>> {
        let rows: Vec<MemberRow> = sqlx::query_as(&format!(
            "SELECT {MEMBER_COLUMNS} FROM memberships m JOIN users u ON u.id = m.user_id
             WHERE m.org_id = $1 AND ($2::uuid IS NULL OR u.id > $2) ORDER BY u.id LIMIT $3"
        ))
        .bind(scope.org_id().as_uuid())
        .bind(page.after)
        .bind(page.fetch())
        .fetch_all(&self.pool)
        .await?;
        let items = rows
            .into_iter()
            .map(member_from_row)
            .collect::<StoreResult<Vec<_>>>()?;
        Ok(page.finish(items, |m| m.user_id.to_string()))
    }

    async fn org_lock(&self, conn: &mut PgConnection, org: OrgId) -> StoreResult<()> {
        let found: Option<(Uuid,)> = sqlx::query_as("SELECT id FROM orgs WHERE id = $1 FOR UPDATE")
            .bind(org.as_uuid())
            .fetch_optional(&mut *conn)
            .await?;
        found
            .map(|_| ())
            .ok_or(StoreError::NotFound { what: "org" })
    }

    async fn member_role_locked(
        &self,
        conn: &mut PgConnection,
        org: OrgId,
        user: UserId,
    ) -> StoreResult<Role> {
        let row: Option<(String,)> =
            sqlx::query_as("SELECT role FROM memberships WHERE org_id = $1 AND user_id = $2")
                .bind(org.as_uuid())
                .bind(user.as_uuid())
                .fetch_optional(&mut *conn)
                .await?;
        let (role,) = row.ok_or(StoreError::NotFound { what: "member" })?;
        role.parse()
            .map_err(|_| StoreError::NotFound { what: "member" })
    }

    async fn owner_count(&self, conn: &mut PgConnection, org: OrgId) -> StoreResult<i64> {
        let (n,): (i64,) =
            sqlx::query_as("SELECT count(*) FROM memberships WHERE org_id = $1 AND role = 'owner'")
                .bind(org.as_uuid())
                .fetch_one(&mut *conn)
                .await?;
        Ok(n)
    }

    /// Add an existing account to the org. The caller has checked the role may be granted.
    pub async fn member_add(
        &self,
        conn: &mut PgConnection,
        scope: &OrgScope,
        email: &Email,
        role: Role,
    ) -> StoreResult<MemberRecord> {
        self.org_lock(conn, scope.org_id()).await?;
        let user: Option<(Uuid,)> = sqlx::query_as("SELECT id FROM users WHERE email = $1")
            .bind(email.as_str())
            .fetch_optional(&mut *conn)
            .await?;
        let (user_id,) = user.ok_or(StoreError::NotFound {
            what: "account with this email",
        })?;
        sqlx::query("INSERT INTO memberships (org_id, user_id, role) VALUES ($1, $2, $3)")
            .bind(scope.org_id().as_uuid())
            .bind(user_id)
            .bind(role.as_str())
            .execute(&mut *conn)
            .await
            .map_err(|e| StoreError::from_unique(e, "membership"))?;
        let row: MemberRow = sqlx::query_as(&format!(
            "SELECT {MEMBER_COLUMNS} FROM memberships m JOIN users u ON u.id = m.user_id
             WHERE m.org_id = $1 AND m.user_id = $2"
        ))
        .bind(scope.org_id().as_uuid())
        .bind(user_id)
        .fetch_one(&mut *conn)
        .await?;
        member_from_row(row)
    }

    /// The current role of a member, read under the org lock (for permission checks that
    /// depend on the target's role).
    pub async fn member_role_for_update(
        &self,
        conn: &mut PgConnection,
        scope: &OrgScope,
        user: UserId,
    ) -> StoreResult<Role> {
        self.org_lock(conn, scope.org_id()).await?;
        self.member_role_locked(conn, scope.org_id(), user).await
    }

    /// Change a member's role; refuses to demote the last owner.
    pub async fn member_set_role(
        &self,
        conn: &mut PgConnection,
        scope: &OrgScope,
        user: UserId,
        role: Role,
    ) -> StoreResult<MemberRecord> {
        self.org_lock(conn, scope.org_id()).await?;
        let current = self.member_role_locked(conn, scope.org_id(), user).await?;
        if current == Role::Owner
            && role != Role::Owner
            && self.owner_count(conn, scope.org_id()).await? <= 1
        {
            return Err(StoreError::LastOwner);
        }
        sqlx::query("UPDATE memberships SET role = $3 WHERE org_id = $1 AND user_id = $2")
            .bind(scope.org_id().as_uuid())
            .bind(user.as_uuid())
            .bind(role.as_str())
            .execute(&mut *conn)
            .await?;
        let row: MemberRow = sqlx::query_as(&format!(
            "SELECT {MEMBER_COLUMNS} FROM memberships m JOIN users u ON u.id = m.user_id
             WHERE m.org_id = $1 AND m.user_id = $2"
        ))
        .bind(scope.org_id().as_uuid())
        .bind(user.as_uuid())
        .fetch_one(&mut *conn)
        .await?;
        member_from_row(row)
    }

    /// Remove a member; refuses to remove the last owner.
    pub async fn member_remove(
        &self,
        conn: &mut PgConnection,
        scope: &OrgScope,
        user: UserId,
    ) -> StoreResult<()> {
        self.org_lock(conn, scope.org_id()).await?;
        let current = self.member_role_locked(conn, scope.org_id(), user).await?;
        if current == Role::Owner && self.owner_count(conn, scope.org_id()).await? <= 1 {
            return Err(StoreError::LastOwner);
        }
        sqlx::query("DELETE FROM memberships WHERE org_id = $1 AND user_id = $2")
            .bind(scope.org_id().as_uuid())
            .bind(user.as_uuid())
            .execute(&mut *conn)
            .await?;
        Ok(())
    }
}
