//! The fleet: nodes (GPU hosts) and the one-time bootstrap tokens they join with.
//!
//! Nothing here is tenant data, so no method takes an `OrgScope`: the operator-only check lives
//! with the callers (`kiln-api`'s admin operations; the node-control service for `Join`).
//! Both secrets — bootstrap tokens and node credentials — are stored only as digests.

use std::time::Duration;

use kiln_auth::SecretDigest;
use kiln_domain::{NodeId, NodeTokenId, UserId};
use sqlx::PgConnection;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::{PageOf, PageRequest, Store, StoreError, StoreResult};

/// A node as operators see it (never its credential).
#[derive(Debug, Clone)]
pub struct NodeRecord {
    pub id: NodeId,
    pub hostname: String,
    /// ready, cordoned, draining, unreachable, lost or retired (derived from the two below).
    pub state: String,
    /// active, cordoned, draining or retired: what the operator decided.
    pub admin_state: String,
    /// online, unreachable or lost: whether the node is talking to us.
    pub liveness: String,
    pub agent_version: String,
    pub joined_at: OffsetDateTime,
    pub last_heartbeat_at: Option<OffsetDateTime>,
    pub credential_revoked_at: Option<OffsetDateTime>,
    /// When the agent last registered its inventory; `None` until it has.
    pub registered_at: Option<OffsetDateTime>,
    pub driver_version: String,
    pub cuda_version: String,
    pub cpu_cores: i32,
    pub memory_mib: i64,
    pub disk_gib: i64,
    /// The newest revision of the node's assignment log, and the newest its agent applied.
    pub assignment_revision: i64,
    pub applied_revision: i64,
}

/// A bootstrap token as issued (the secret itself is only ever in the creator's hands).
#[derive(Debug, Clone)]
pub struct NodeTokenRecord {
    pub id: NodeTokenId,
    pub created_by: Option<UserId>,
    pub created_at: OffsetDateTime,
    pub expires_at: OffsetDateTime,
    pub note: String,
}

pub struct NewNodeToken<'a> {
    pub digest: &'a SecretDigest,
    pub created_by: Option<UserId>,
    /// How long the token may be spent, from now (the database's clock).
    pub ttl: Duration,
    pub note: &'a str,
}

/// What joining with a presented node's details needs.
pub struct NewNode<'a> {
    pub token: &'a SecretDigest,
    pub hostname: &'a str,
    pub agent_version: &'a str,
    pub credential: &'a SecretDigest,
}

/// Why a bootstrap token was refused. Each case is told apart so the refusal can be logged
/// precisely; all of them mean "no node joined, nothing changed".
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("the bootstrap token is unknown")]
    Unknown,
    #[error("the bootstrap token was already used")]
    Used,
    #[error("the bootstrap token has expired")]
    Expired,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for JoinError {
    fn from(e: sqlx::Error) -> Self {
        JoinError::Store(StoreError::Database(e))
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct NodeRow {
    id: Uuid,
    hostname: String,
    state: String,
    admin_state: String,
    liveness: String,
    agent_version: String,
    joined_at: OffsetDateTime,
    last_heartbeat_at: Option<OffsetDateTime>,
    credential_revoked_at: Option<OffsetDateTime>,
    registered_at: Option<OffsetDateTime>,
    driver_version: String,
    cuda_version: String,
    cpu_cores: i32,
    memory_mib: i64,
    disk_gib: i64,
    assignment_revision: i64,
    applied_revision: i64,
}

pub(crate) const NODE_COLUMNS: &str = "id, hostname, state, admin_state, liveness, agent_version, \
     joined_at, last_heartbeat_at, credential_revoked_at, registered_at, driver_version, \
     cuda_version, cpu_cores, memory_mib, disk_gib, assignment_revision, applied_revision";

pub(crate) fn node_from_row(r: NodeRow) -> NodeRecord {
    NodeRecord {
        id: NodeId::from_uuid(r.id),
        hostname: r.hostname,
        state: r.state,
        admin_state: r.admin_state,
        liveness: r.liveness,
        agent_version: r.agent_version,
        joined_at: r.joined_at,
        last_heartbeat_at: r.last_heartbeat_at,
        credential_revoked_at: r.credential_revoked_at,
        registered_at: r.registered_at,
        driver_version: r.driver_version,
        cuda_version: r.cuda_version,
        cpu_cores: r.cpu_cores,
        memory_mib: r.memory_mib,
        disk_gib: r.disk_gib,
        assignment_revision: r.assignment_revision,
        applied_revision: r.applied_revision,
    }
}

impl Store {
    /// Issue a bootstrap token. The caller must already have checked that an operator asks.
    pub async fn node_token_create(
        &self,
        conn: &mut PgConnection,
        new: NewNodeToken<'_>,
    ) -> StoreResult<NodeTokenRecord> {
        let secs = i64::try_from(new.ttl.as_secs()).unwrap_or(i64::MAX);
        let row: (Uuid, Option<Uuid>, OffsetDateTime, OffsetDateTime, String) = sqlx::query_as(
            "INSERT INTO node_bootstrap_tokens (id, token_hash, created_by, expires_at, note)
             VALUES ($1, $2, $3, now() + make_interval(secs => $4), $5)
             RETURNING id, created_by, created_at, expires_at, note",
        )
        .bind(NodeTokenId::new().as_uuid())
        .bind(new.digest.as_bytes())
        .bind(new.created_by.map(|u| u.as_uuid()))
        .bind(secs as f64)
        .bind(new.note)
        .fetch_one(&mut *conn)
        .await
        .map_err(|e| StoreError::from_unique(e, "node token"))?;
        Ok(NodeTokenRecord {
            id: NodeTokenId::from_uuid(row.0),
            created_by: row.1.map(UserId::from_uuid),
            created_at: row.2,
            expires_at: row.3,
            note: row.4,
        })
    }

    /// Spend a bootstrap token and create the node it admits, in one statement: the token is
    /// marked used only if it is unused and unexpired, and the node exists only if the token was
    /// spent, so two agents racing with one token cannot both join. On refusal a second read
    /// says why (used wins over expired; a token that never existed is `Unknown`).
    pub async fn node_join(
        &self,
        conn: &mut PgConnection,
        new: NewNode<'_>,
    ) -> Result<NodeId, JoinError> {
        let id = NodeId::new();
        // The foreign key from the token to the node is checked at the end of the statement,
        // after the node row of the same statement exists.
        let joined: Option<(Uuid,)> = sqlx::query_as(
            "WITH spent AS (
                 UPDATE node_bootstrap_tokens SET used_at = now(), used_by_node = $2
                 WHERE token_hash = $1 AND used_at IS NULL AND expires_at > now()
                 RETURNING id
             )
             INSERT INTO nodes (id, hostname, agent_version, credential_hash)
             SELECT $2, $3, $4, $5 FROM spent
             RETURNING id",
        )
        .bind(new.token.as_bytes())
        .bind(id.as_uuid())
        .bind(new.hostname)
        .bind(new.agent_version)
        .bind(new.credential.as_bytes())
        .fetch_optional(&mut *conn)
        .await
        .map_err(|e| StoreError::from_unique(e, "node credential"))?;
        if joined.is_some() {
            return Ok(id);
        }
        let why: Option<(bool, bool)> = sqlx::query_as(
            "SELECT used_at IS NOT NULL, expires_at <= now()
             FROM node_bootstrap_tokens WHERE token_hash = $1",
        )
        .bind(new.token.as_bytes())
        .fetch_optional(&mut *conn)
        .await?;
        Err(match why {
            None => JoinError::Unknown,
            Some((true, _)) => JoinError::Used,
            Some((false, _)) => JoinError::Expired,
        })
    }

    /// The node a presented credential belongs to, unless the credential was revoked.
    pub async fn node_authenticate(
        &self,
        credential: &SecretDigest,
    ) -> StoreResult<Option<NodeId>> {
        let row: Option<(Uuid,)> = sqlx::query_as(
            "SELECT id FROM nodes WHERE credential_hash = $1 AND credential_revoked_at IS NULL
             AND admin_state <> 'retired'",
        )
        .bind(credential.as_bytes())
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|(id,)| NodeId::from_uuid(id)))
    }

    /// Revoke a node's credential, which retires the node: its agent is refused from its next
    /// call, and the host must join again with a new token (as a new node). Revoking twice is
    /// not an error (the first time stands).
    pub async fn node_credential_revoke(
        &self,
        conn: &mut PgConnection,
        node: NodeId,
    ) -> StoreResult<NodeRecord> {
        let row: Option<NodeRow> = sqlx::query_as(&format!(
            "UPDATE nodes SET credential_revoked_at = COALESCE(credential_revoked_at, now()),
                 admin_state = 'retired',
                 admin_state_changed_at = CASE WHEN admin_state = 'retired'
                     THEN admin_state_changed_at ELSE now() END
             WHERE id = $1 RETURNING {NODE_COLUMNS}"
        ))
        .bind(node.as_uuid())
        .fetch_optional(&mut *conn)
        .await?;
        let record = row
            .map(node_from_row)
            .ok_or(StoreError::NotFound { what: "node" })?;
        // Replicas drop the credential from their caches at commit.
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(crate::fleet::CREDENTIAL_CHANNEL)
            .bind(node.as_uuid().to_string())
            .execute(&mut *conn)
            .await?;
        Ok(record)
    }

    /// Joined nodes, oldest first.
    pub async fn node_list(&self, page: PageRequest) -> StoreResult<PageOf<NodeRecord>> {
        let rows: Vec<NodeRow> = sqlx::query_as(&format!(
            "SELECT {NODE_COLUMNS} FROM nodes WHERE ($1::uuid IS NULL OR id > $1)
             ORDER BY id LIMIT $2"
        ))
        .bind(page.after)
        .bind(page.fetch())
        .fetch_all(&self.pool)
        .await?;
        let items = rows.into_iter().map(node_from_row).collect();
        Ok(page.finish(items, |n| n.id.to_string()))
    }

    pub async fn node_get(&self, node: NodeId) -> StoreResult<NodeRecord> {
        let row: Option<NodeRow> =
            sqlx::query_as(&format!("SELECT {NODE_COLUMNS} FROM nodes WHERE id = $1"))
                .bind(node.as_uuid())
                .fetch_optional(&self.pool)
                .await?;
        row.map(node_from_row)
            .ok_or(StoreError::NotFound { what: "node" })
    }
}
