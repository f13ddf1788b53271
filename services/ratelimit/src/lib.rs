//! Rate limits in Redis. Fixed windows here (sign-in and API limits); token buckets and
//! concurrency for calls that hold a slot in [`admission`] (the gateway's).
//!
//! The fixed windows are counted with `INCR` and expired with `EXPIRE … NX` in one
//! transaction, so every replica of a service shares the same counters.
//!
//! Redis holds only what may be lost: when it is unreachable the limiter fails open (and logs),
//! so an outage of Redis degrades protection but never availability.

use std::time::Duration;

pub mod admission;

use redis::aio::ConnectionManager;

#[derive(Debug, thiserror::Error)]
pub enum RateLimitError {
    #[error("redis is unreachable")]
    Redis(#[from] redis::RedisError),
}

/// A limit: at most `max` hits per `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub max: u32,
    pub window: Duration,
}

impl Limit {
    pub const fn per_minute(max: u32) -> Self {
        Self {
            max,
            window: Duration::from_secs(60),
        }
    }
    pub const fn per_hour(max: u32) -> Self {
        Self {
            max,
            window: Duration::from_secs(3600),
        }
    }
}

/// The verdict for one hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allowed {
        remaining: u32,
    },
    /// Over the limit; try again after this long.
    Limited {
        retry_after: Duration,
    },
}

#[derive(Clone)]
pub struct RateLimiter {
    conn: ConnectionManager,
    namespace: String,
}

impl RateLimiter {
    /// Connect; `namespace` prefixes every key (tests give each server its own).
    pub async fn connect(url: &str, namespace: &str) -> Result<Self, RateLimitError> {
        let client = redis::Client::open(url)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Duration::from_secs(2))
            .set_response_timeout(Duration::from_secs(2))
            .set_number_of_retries(1);
        let conn = ConnectionManager::new_with_config(client, config).await?;
        Ok(Self {
            conn,
            namespace: namespace.to_owned(),
        })
    }

    /// Count a hit against `bucket`/`key` under `limit`.
    pub async fn try_hit(
        &self,
        bucket: &str,
        key: &str,
        limit: Limit,
    ) -> Result<Decision, RateLimitError> {
        let secs = limit.window.as_secs().max(1);
        let window_start = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() / secs)
            .unwrap_or(0);
        let redis_key = format!("{}:rl:{bucket}:{key}:{window_start}", self.namespace);
        let mut conn = self.conn.clone();
        let (count, ttl): (u64, i64) = redis::pipe()
            .atomic()
            .incr(&redis_key, 1u64)
            .cmd("EXPIRE")
            .arg(&redis_key)
            .arg(secs)
            .arg("NX")
            .ignore()
            .ttl(&redis_key)
            .query_async(&mut conn)
            .await?;
        if count > u64::from(limit.max) {
            let retry = u64::try_from(ttl).unwrap_or(secs).clamp(1, secs);
            return Ok(Decision::Limited {
                retry_after: Duration::from_secs(retry),
            });
        }
        Ok(Decision::Allowed {
            remaining: limit
                .max
                .saturating_sub(u32::try_from(count).unwrap_or(u32::MAX)),
        })
    }

    /// Like [`try_hit`](Self::try_hit) but fails open when Redis is unreachable.
    pub async fn hit(&self, bucket: &str, key: &str, limit: Limit) -> Decision {
        match self.try_hit(bucket, key, limit).await {
            Ok(d) => d,
            Err(error) => {
                tracing::error!(%error, bucket, "rate limiter unavailable; allowing the request");
                Decision::Allowed { remaining: 0 }
            }
        }
    }

    /// Forget a key's count (after a successful sign-in, say).
    pub async fn reset(&self, bucket: &str, key: &str, limit: Limit) -> Result<(), RateLimitError> {
        let secs = limit.window.as_secs().max(1);
        let window_start = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() / secs)
            .unwrap_or(0);
        let mut conn = self.conn.clone();
        let _: () = redis::cmd("DEL")
            .arg(format!(
                "{}:rl:{bucket}:{key}:{window_start}",
                self.namespace
            ))
            .query_async(&mut conn)
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redis_url() -> String {
        std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
    }

    #[tokio::test]
    async fn counts_up_to_the_limit_then_refuses_with_retry_after() {
        let ns = format!("test-{}", uuid::Uuid::new_v4());
        let rl = RateLimiter::connect(&redis_url(), &ns)
            .await
            .expect("redis must be running (make test starts it)");
        let limit = Limit::per_minute(3);
        for expected in [2, 1, 0] {
            assert_eq!(
                rl.try_hit("login", "ada", limit).await.unwrap(),
                Decision::Allowed {
                    remaining: expected
                }
            );
        }
        match rl.try_hit("login", "ada", limit).await.unwrap() {
            Decision::Limited { retry_after } => {
                assert!(retry_after.as_secs() >= 1 && retry_after.as_secs() <= 60)
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        // Other keys and other namespaces have their own counters.
        assert!(matches!(
            rl.try_hit("login", "bob", limit).await.unwrap(),
            Decision::Allowed { .. }
        ));
        let other = RateLimiter::connect(&redis_url(), &format!("{ns}-other"))
            .await
            .unwrap();
        assert!(matches!(
            other.try_hit("login", "ada", limit).await.unwrap(),
            Decision::Allowed { .. }
        ));
        // Reset clears it.
        rl.reset("login", "ada", limit).await.unwrap();
        assert!(matches!(
            rl.try_hit("login", "ada", limit).await.unwrap(),
            Decision::Allowed { .. }
        ));
    }
}
