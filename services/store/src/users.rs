//! Users, sign-in sessions with their refresh-token families, and the JWT signing key ring.

use kiln_auth::{SecretDigest, SigningKey};
use kiln_domain::{Email, OrgName, PersonName, SessionId, UserId};
use sqlx::PgConnection;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::orgs::OrgRecord;
use crate::{Store, StoreError, StoreResult};

#[derive(Debug, Clone)]
pub struct UserRecord {
    pub id: UserId,
    pub email: Email,
    pub name: String,
    pub is_operator: bool,
    pub created_at: OffsetDateTime,
}

/// What `/v1/me` shows: the user and every org they belong to.
#[derive(Debug, Clone)]
pub struct Me {
    pub user: UserRecord,
    pub memberships: Vec<MembershipView>,
}

#[derive(Debug, Clone, serde::Deserialize)]
pub struct MembershipView {
    pub org_id: Uuid,
    pub org_name: String,
    pub role: String,
    pub personal: bool,
}

/// What exchanging a refresh token did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefreshOutcome {
    /// The token was live; it is now spent and the new one belongs to the same session.
    Rotated {
        session_id: SessionId,
        user_id: UserId,
    },
    /// The token had been spent before: the whole session has now been revoked.
    Reused {
        session_id: SessionId,
        user_id: UserId,
    },
    /// Unknown token, or its session is revoked or expired.
    Invalid,
}

type UserRow = (Uuid, String, String, bool, OffsetDateTime);
type MeRow = (
    Uuid,
    String,
    String,
    bool,
    OffsetDateTime,
    sqlx::types::Json<Vec<MembershipView>>,
);

fn user_from_row((id, email, name, is_operator, created_at): UserRow) -> UserRecord {
    UserRecord {
        id: UserId::from_uuid(id),
        email: Email::from_trusted(email),
        name,
        is_operator,
        created_at,
    }
}

impl Store {
    /// Create a user and their personal org (they own it), in the caller's transaction.
    pub async fn user_create_with_personal_org(
        &self,
        conn: &mut PgConnection,
        email: &Email,
        name: &PersonName,
        password_hash: &str,
    ) -> StoreResult<(UserRecord, OrgRecord)> {
        let user_id = UserId::new();
        let row: UserRow = sqlx::query_as(
            "INSERT INTO users (id, email, name, password_hash) VALUES ($1, $2, $3, $4)
             RETURNING id, email, name, is_operator, created_at",
        )
        .bind(user_id.as_uuid())
        .bind(email.as_str())
        .bind(name.as_str())
        .bind(password_hash)
        .fetch_one(&mut *conn)
        .await
        .map_err(|e| StoreError::from_unique(e, "an account with this email"))?;
        let user = user_from_row(row);
        let org_name = OrgName::from_trusted(format!("{}'s org", name.as_str()));
        let org = self.org_insert(conn, user.id, &org_name, true).await?;
        Ok((user, org))
    }

    /// Create or update the operator account named by the deployment's settings.
    pub async fn user_ensure_operator(
        &self,
        email: &Email,
        password_hash: &str,
    ) -> StoreResult<UserId> {
        let mut tx = self.begin().await?;
        let existing: Option<(Uuid,)> =
            sqlx::query_as("SELECT id FROM users WHERE email = $1 FOR UPDATE")
                .bind(email.as_str())
                .fetch_optional(&mut *tx)
                .await?;
        let id = match existing {
            Some((id,)) => {
                sqlx::query(
                    "UPDATE users SET password_hash = $2, is_operator = true WHERE id = $1",
                )
                .bind(id)
                .bind(password_hash)
                .execute(&mut *tx)
                .await?;
                UserId::from_uuid(id)
            }
            None => {
                let name = PersonName::from_trusted("Operator".into());
                let (user, _org) = self
                    .user_create_with_personal_org(&mut tx, email, &name, password_hash)
                    .await?;
                sqlx::query("UPDATE users SET is_operator = true WHERE id = $1")
                    .bind(user.id.as_uuid())
                    .execute(&mut *tx)
                    .await?;
                user.id
            }
        };
        tx.commit().await?;
        Ok(id)
    }

    /// The account and password hash for a sign-in attempt.
    pub async fn user_credentials(
        &self,
        email: &Email,
    ) -> StoreResult<Option<(UserRecord, String)>> {
        let row: Option<(Uuid, String, String, bool, OffsetDateTime, String)> = sqlx::query_as(
            "SELECT id, email, name, is_operator, created_at, password_hash FROM users WHERE email = $1",
        )
        .bind(email.as_str())
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|(id, e, n, op, c, hash)| (user_from_row((id, e, n, op, c)), hash)))
    }

    pub async fn user_get(&self, id: UserId) -> StoreResult<UserRecord> {
        let row: Option<UserRow> = sqlx::query_as(
            "SELECT id, email, name, is_operator, created_at FROM users WHERE id = $1",
        )
        .bind(id.as_uuid())
        .fetch_optional(&self.pool)
        .await?;
        row.map(user_from_row)
            .ok_or(StoreError::NotFound { what: "user" })
    }

    /// The user and all their memberships, in one round trip.
    pub async fn me(&self, id: UserId) -> StoreResult<Me> {
        let row: Option<MeRow> = sqlx::query_as(
                "SELECT u.id, u.email, u.name, u.is_operator, u.created_at,
                        COALESCE((SELECT json_agg(json_build_object(
                                    'org_id', o.id, 'org_name', o.name, 'role', m.role, 'personal', o.personal)
                                  ORDER BY o.id)
                                  FROM memberships m JOIN orgs o ON o.id = m.org_id
                                  WHERE m.user_id = u.id), '[]'::json)
                 FROM users u WHERE u.id = $1",
            )
            .bind(id.as_uuid())
            .fetch_optional(&self.pool)
            .await?;
        let (uid, e, n, op, c, memberships) = row.ok_or(StoreError::NotFound { what: "user" })?;
        Ok(Me {
            user: user_from_row((uid, e, n, op, c)),
            memberships: memberships.0,
        })
    }

    /// Start a session with its first refresh token.
    pub async fn session_create(
        &self,
        user: UserId,
        refresh: &SecretDigest,
        lifetime: time::Duration,
        ip: Option<&str>,
        user_agent: Option<&str>,
    ) -> StoreResult<SessionId> {
        let id = SessionId::new();
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO sessions (id, user_id, expires_at, ip, user_agent) VALUES ($1, $2, now() + $3, $4, $5)",
        )
        .bind(id.as_uuid())
        .bind(user.as_uuid())
        .bind(lifetime)
        .bind(ip)
        .bind(user_agent.map(|u| u.chars().take(256).collect::<String>()))
        .execute(&mut *tx)
        .await?;
        sqlx::query("INSERT INTO refresh_tokens (token_hash, session_id) VALUES ($1, $2)")
            .bind(refresh.as_bytes())
            .bind(id.as_uuid())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(id)
    }

    /// Exchange a refresh token for a new one in the same session. Spending is atomic, so two
    /// concurrent exchanges of one token cannot both succeed; the loser is treated as reuse.
    pub async fn refresh_token_exchange(
        &self,
        old: &SecretDigest,
        new: &SecretDigest,
    ) -> StoreResult<RefreshOutcome> {
        let mut tx = self.begin().await?;
        let spent: Option<(Uuid, Uuid)> = sqlx::query_as(
            "UPDATE refresh_tokens r SET used_at = now()
             FROM sessions s
             WHERE r.token_hash = $1 AND r.used_at IS NULL AND s.id = r.session_id
               AND s.revoked_at IS NULL AND s.expires_at > now()
             RETURNING s.id, s.user_id",
        )
        .bind(old.as_bytes())
        .fetch_optional(&mut *tx)
        .await?;
        if let Some((sid, uid)) = spent {
            sqlx::query("INSERT INTO refresh_tokens (token_hash, session_id) VALUES ($1, $2)")
                .bind(new.as_bytes())
                .bind(sid)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            return Ok(RefreshOutcome::Rotated {
                session_id: SessionId::from_uuid(sid),
                user_id: UserId::from_uuid(uid),
            });
        }
        let known: Option<(Uuid, Uuid, bool)> = sqlx::query_as(
            "SELECT s.id, s.user_id, r.used_at IS NOT NULL FROM refresh_tokens r
             JOIN sessions s ON s.id = r.session_id WHERE r.token_hash = $1",
        )
        .bind(old.as_bytes())
        .fetch_optional(&mut *tx)
        .await?;
        let outcome = match known {
            Some((sid, uid, true)) => {
                sqlx::query(
                    "UPDATE sessions SET revoked_at = now(), revoked_reason = 'refresh token reused'
                     WHERE id = $1 AND revoked_at IS NULL",
                )
                .bind(sid)
                .execute(&mut *tx)
                .await?;
                RefreshOutcome::Reused {
                    session_id: SessionId::from_uuid(sid),
                    user_id: UserId::from_uuid(uid),
                }
            }
            _ => RefreshOutcome::Invalid,
        };
        tx.commit().await?;
        Ok(outcome)
    }

    /// The session a refresh token belongs to, if the token is known (spent or not).
    pub async fn session_of_refresh_token(
        &self,
        token: &SecretDigest,
    ) -> StoreResult<Option<(SessionId, UserId)>> {
        let row: Option<(Uuid, Uuid)> = sqlx::query_as(
            "SELECT s.id, s.user_id FROM refresh_tokens r JOIN sessions s ON s.id = r.session_id WHERE r.token_hash = $1",
        )
        .bind(token.as_bytes())
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|(s, u)| (SessionId::from_uuid(s), UserId::from_uuid(u))))
    }

    /// Revoke a session; returns whether it was live.
    pub async fn session_revoke(&self, id: SessionId, reason: &str) -> StoreResult<bool> {
        let r = sqlx::query(
            "UPDATE sessions SET revoked_at = now(), revoked_reason = $2 WHERE id = $1 AND revoked_at IS NULL",
        )
        .bind(id.as_uuid())
        .bind(reason)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Whether a session may still be used: not revoked, not expired; and whether its user is
    /// an operator (`None` when the session is dead).
    pub async fn session_check(&self, id: SessionId, user: UserId) -> StoreResult<Option<bool>> {
        let row: Option<(bool,)> = sqlx::query_as(
            "SELECT u.is_operator FROM sessions s JOIN users u ON u.id = s.user_id
             WHERE s.id = $1 AND s.user_id = $2 AND s.revoked_at IS NULL AND s.expires_at > now()",
        )
        .bind(id.as_uuid())
        .bind(user.as_uuid())
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|(op,)| op))
    }

    /// Keys that still verify tokens.
    pub async fn signing_keys_live(&self) -> StoreResult<Vec<SigningKey>> {
        let rows: Vec<(String, Vec<u8>, OffsetDateTime)> = sqlx::query_as(
            "SELECT kid, secret, created_at FROM signing_keys WHERE retired_at IS NULL ORDER BY created_at",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(kid, secret, created_at)| SigningKey {
                kid,
                secret,
                created_at: i64::try_from(created_at.unix_timestamp_nanos() / 1000)
                    .unwrap_or(i64::MAX),
            })
            .collect())
    }

    /// Rotate when the newest key is older than `rotate_after`, and retire keys that stopped
    /// signing more than `retire_after` ago (the access-token lifetime plus margin). Safe to run
    /// from every replica at once: an advisory lock makes one of them do it.
    pub async fn signing_keys_rotate(
        &self,
        rotate_after: time::Duration,
        retire_after: time::Duration,
    ) -> StoreResult<bool> {
        let mut tx = self.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(7321001)")
            .execute(&mut *tx)
            .await?;
        let newest: Option<(OffsetDateTime,)> = sqlx::query_as(
            "SELECT max(created_at) FROM signing_keys WHERE retired_at IS NULL HAVING count(*) > 0",
        )
        .fetch_optional(&mut *tx)
        .await?;
        let now = OffsetDateTime::now_utc();
        let rotated = match newest {
            Some((t,)) if now - t < rotate_after => false,
            _ => {
                let key = SigningKey::generate(
                    i64::try_from(now.unix_timestamp_nanos() / 1000).unwrap_or(i64::MAX),
                );
                sqlx::query("INSERT INTO signing_keys (kid, secret) VALUES ($1, $2)")
                    .bind(&key.kid)
                    .bind(&key.secret)
                    .execute(&mut *tx)
                    .await?;
                true
            }
        };
        // A key stops signing when a newer one appears; retire it once its tokens have expired.
        sqlx::query(
            "UPDATE signing_keys k SET retired_at = now()
             WHERE retired_at IS NULL
               AND EXISTS (SELECT 1 FROM signing_keys n WHERE n.created_at > k.created_at
                           AND n.retired_at IS NULL AND n.created_at < now() - $1)",
        )
        .bind(retire_after)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(rotated)
    }
}
