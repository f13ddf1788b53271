//! `Idempotency-Key` records. A key is claimed inside the transaction that performs the effect:
//! the primary key makes a concurrent duplicate wait for the first transaction, after which it
//! sees the committed answer and replays it. Failed requests roll back and leave no record, so
//! the client may retry them.

use sqlx::PgConnection;

use crate::{Store, StoreResult};

/// Who an idempotency key belongs to: unique per (org, principal, key).
#[derive(Debug, Clone)]
pub struct IdempotencyScope {
    pub org: String,
    pub principal: String,
    pub key: String,
}

/// The state of a claimed key.
#[derive(Debug, Clone, PartialEq)]
pub enum Claim {
    /// First use: perform the effect, then [`Store::idempotency_complete`] in the same transaction.
    New,
    /// Seen before with the same request: answer this again.
    Replay {
        status: u16,
        body: serde_json::Value,
    },
    /// Seen before with a different request body.
    Mismatch,
    /// Another request with this key is still running; try again shortly.
    InProgress,
}

/// How long a duplicate waits for the first request with its key before answering
/// [`Claim::InProgress`]. Waiting holds a database connection, so it must stay short: a duplicate
/// that waited without bound could hold the pool's last connection while the first request
/// needs one to finish.
const CLAIM_WAIT: &str = "SET LOCAL lock_timeout = '250ms'";

impl Store {
    pub async fn idempotency_claim(
        &self,
        conn: &mut PgConnection,
        scope: &IdempotencyScope,
        request_hash: &[u8],
    ) -> StoreResult<Claim> {
        sqlx::query(CLAIM_WAIT).execute(&mut *conn).await?;
        let inserted = sqlx::query(
            "INSERT INTO idempotency_keys (scope, principal, key, request_hash, response_status, response_body)
             VALUES ($1, $2, $3, $4, 0, 'null'::jsonb) ON CONFLICT DO NOTHING",
        )
        .bind(&scope.org)
        .bind(&scope.principal)
        .bind(&scope.key)
        .bind(request_hash)
        .execute(&mut *conn)
        .await;
        let inserted = match inserted {
            Ok(r) => r,
            // lock_not_available: the first request holds the key and has not finished.
            Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("55P03") => {
                return Ok(Claim::InProgress);
            }
            Err(e) => return Err(e.into()),
        };
        // The effect that follows waits for its own locks as long as it needs to.
        sqlx::query("SET LOCAL lock_timeout = DEFAULT")
            .execute(&mut *conn)
            .await?;
        if inserted.rows_affected() == 1 {
            return Ok(Claim::New);
        }
        let (hash, status, body): (Vec<u8>, i32, serde_json::Value) = sqlx::query_as(
            "SELECT request_hash, response_status, response_body FROM idempotency_keys
             WHERE scope = $1 AND principal = $2 AND key = $3",
        )
        .bind(&scope.org)
        .bind(&scope.principal)
        .bind(&scope.key)
        .fetch_one(&mut *conn)
        .await?;
        if hash != request_hash {
            return Ok(Claim::Mismatch);
        }
        Ok(Claim::Replay {
            status: u16::try_from(status).unwrap_or(200),
            body,
        })
    }

    pub async fn idempotency_complete(
        &self,
        conn: &mut PgConnection,
        scope: &IdempotencyScope,
        status: u16,
        body: &serde_json::Value,
    ) -> StoreResult<()> {
        sqlx::query(
            "UPDATE idempotency_keys SET response_status = $4, response_body = $5
             WHERE scope = $1 AND principal = $2 AND key = $3",
        )
        .bind(&scope.org)
        .bind(&scope.principal)
        .bind(&scope.key)
        .bind(i32::from(status))
        .bind(body)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    /// Forget keys older than `age`; returns how many.
    pub async fn idempotency_purge(&self, age: time::Duration) -> StoreResult<u64> {
        let r = sqlx::query("DELETE FROM idempotency_keys WHERE created_at < now() - $1")
            .bind(age)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected())
    }
}
