//! Usage events of inference calls, ingested from the gateway's stream idempotently.

use time::OffsetDateTime;
use uuid::Uuid;

use crate::{Store, StoreResult};

/// One completed call through the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageEventRow {
    pub id: Uuid,
    pub endpoint_id: Uuid,
    pub org_id: Uuid,
    pub api_key_id: Option<Uuid>,
    pub replica_id: Option<Uuid>,
    pub status: i32,
    pub duration_ms: i64,
    pub request_bytes: i64,
    pub response_bytes: i64,
    pub prompt_tokens: Option<i64>,
    pub completion_tokens: Option<i64>,
    pub occurred_at: OffsetDateTime,
    /// The org whose key made the call (`None`: the endpoint's own org).
    pub caller_org_id: Option<Uuid>,
    /// The endpoint's price for a granted caller, as the gateway saw it.
    pub resale: Option<crate::EndpointPrice>,
}

impl Store {
    /// Insert events; an id already there is skipped (so redelivery never counts twice).
    /// Answers how many were new.
    pub async fn usage_events_insert(&self, rows: &[UsageEventRow]) -> StoreResult<u64> {
        if rows.is_empty() {
            return Ok(0);
        }
        let col = |f: fn(&UsageEventRow) -> Option<i64>| rows.iter().map(f).collect::<Vec<_>>();
        let done = sqlx::query(
            "INSERT INTO usage_events (id, endpoint_id, org_id, api_key_id, replica_id, status,
                 duration_ms, request_bytes, response_bytes, prompt_tokens, completion_tokens,
                 occurred_at, caller_org_id, resale_per_request_micros,
                 resale_per_1k_prompt_tokens_micros, resale_per_1k_completion_tokens_micros)
             SELECT u.* FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::uuid[], $5::uuid[],
                 $6::int[], $7::bigint[], $8::bigint[], $9::bigint[], $10::bigint[], $11::bigint[],
                 $12::timestamptz[], $13::uuid[], $14::bigint[], $15::bigint[], $16::bigint[])
                 AS u(id, endpoint_id, org_id, api_key_id, replica_id, status, duration_ms,
                      request_bytes, response_bytes, prompt_tokens, completion_tokens, occurred_at,
                      caller_org_id, resale_per_request_micros, resale_per_1k_prompt_tokens_micros,
                      resale_per_1k_completion_tokens_micros)
             -- An endpoint removed for good takes its events with it (instead of failing the batch).
             WHERE EXISTS (SELECT 1 FROM endpoints e WHERE e.id = u.endpoint_id)
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(rows.iter().map(|r| r.id).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.endpoint_id).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.org_id).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.api_key_id).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.replica_id).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.status).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.duration_ms).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.request_bytes).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.response_bytes).collect::<Vec<_>>())
        .bind(col(|r| r.prompt_tokens))
        .bind(col(|r| r.completion_tokens))
        .bind(rows.iter().map(|r| r.occurred_at).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.caller_org_id).collect::<Vec<_>>())
        .bind(col(|r| r.resale.map(|p| p.per_request_micros)))
        .bind(col(|r| r.resale.map(|p| p.per_1k_prompt_tokens_micros)))
        .bind(col(|r| r.resale.map(|p| p.per_1k_completion_tokens_micros)))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }
}

/// An unrated call, with what rating it needs: its endpoint's GPU type.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct CallToRate {
    pub id: Uuid,
    pub org_id: Uuid,
    pub endpoint_id: Uuid,
    pub gpu_type: Option<String>,
    pub status: i32,
    pub prompt_tokens: Option<i64>,
    pub completion_tokens: Option<i64>,
    pub occurred_at: OffsetDateTime,
    /// The org whose key made the call (`None`: the endpoint's own org).
    pub caller_org_id: Option<Uuid>,
    pub resale_per_request_micros: Option<i64>,
    pub resale_per_1k_prompt_tokens_micros: Option<i64>,
    pub resale_per_1k_completion_tokens_micros: Option<i64>,
}

impl CallToRate {
    /// The endpoint's price the caller was answered under, if any.
    pub fn resale(&self) -> Option<crate::EndpointPrice> {
        crate::EndpointPrice::from_columns(
            self.resale_per_request_micros,
            self.resale_per_1k_prompt_tokens_micros,
            self.resale_per_1k_completion_tokens_micros,
        )
    }
}

impl Store {
    /// Lock up to `limit` unrated calls that happened before `before`, oldest first, skipping
    /// the ones another rater holds and those of `skip` endpoints (ones that cannot be rated
    /// yet). The lock lasts until the caller's transaction ends.
    pub async fn usage_calls_claim(
        &self,
        conn: &mut sqlx::PgConnection,
        before: OffsetDateTime,
        limit: i64,
        skip: &[Uuid],
    ) -> StoreResult<Vec<CallToRate>> {
        Ok(sqlx::query_as(
            "SELECT u.id, u.org_id, u.endpoint_id, e.spec -> 'replica' ->> 'gpu_type' AS gpu_type,
                    u.status, u.prompt_tokens, u.completion_tokens, u.occurred_at,
                    u.caller_org_id, u.resale_per_request_micros,
                    u.resale_per_1k_prompt_tokens_micros, u.resale_per_1k_completion_tokens_micros
             FROM usage_events u JOIN endpoints e ON e.id = u.endpoint_id
             WHERE u.rated_at IS NULL AND u.occurred_at < $1 AND NOT (u.endpoint_id = ANY($3))
             ORDER BY u.occurred_at, u.id
             LIMIT $2
             FOR UPDATE OF u SKIP LOCKED",
        )
        .bind(before)
        .bind(limit)
        .bind(skip)
        .fetch_all(&mut *conn)
        .await?)
    }

    /// Mark calls rated, each with the key of the aggregate that charged it (`None`: free).
    pub async fn usage_calls_rated(
        &self,
        conn: &mut sqlx::PgConnection,
        rated: &[(Uuid, Option<String>)],
    ) -> StoreResult<u64> {
        if rated.is_empty() {
            return Ok(0);
        }
        let done = sqlx::query(
            "UPDATE usage_events u SET rated_at = now(), charge_key = r.key
             FROM unnest($1::uuid[], $2::text[]) AS r(id, key)
             WHERE u.id = r.id AND u.rated_at IS NULL",
        )
        .bind(rated.iter().map(|(id, _)| *id).collect::<Vec<_>>())
        .bind(rated.iter().map(|(_, k)| k.clone()).collect::<Vec<_>>())
        .execute(&mut *conn)
        .await?;
        Ok(done.rows_affected())
    }

    /// How many calls wait to be rated, and the oldest one's time (the rating lag's source).
    pub async fn usage_calls_unrated(&self) -> StoreResult<(i64, Option<OffsetDateTime>)> {
        Ok(sqlx::query_as(
            "SELECT count(*), min(occurred_at) FROM usage_events WHERE rated_at IS NULL",
        )
        .fetch_one(&self.pool)
        .await?)
    }
}
