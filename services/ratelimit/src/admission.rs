//! Admission for calls that hold a slot while they run (the gateway's inference calls): token
//! buckets for rates and in-flight sets for concurrency, per caller and in total, decided in
//! one Redis script so every gateway shares them and a check never half-applies.
//!
//! * A token bucket refills at `per_second` up to `burst`; each admitted call takes a token.
//!   A refused call takes nothing and learns when the next token is due (`Retry-After`).
//! * Concurrency is a sorted set of the calls in flight, scored by when their lease ends. A
//!   call is admitted while the set is below its limit, joins it, and leaves when it ends
//!   ([`Permit`] drop). Leases are renewed every few seconds by the process holding them, so
//!   the calls of a gateway that died free their slots within one lease ([`LEASE`]).
//! * The in-flight sets are kept even without a concurrency limit, and admitted calls are
//!   counted: that is what the autoscaler reads as the load on an endpoint ([`Admission::load`]).
//!
//! Time is Redis's (`TIME`), so gateways with skewed clocks agree. When Redis is unreachable
//! calls are admitted (and the failure counted): an outage of Redis degrades protection, never
//! availability.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::ConnectionManager;

use crate::RateLimitError;

/// How long a call's slot is held without renewal.
pub const LEASE: Duration = Duration::from_secs(30);
/// How often a process renews the leases of its calls.
pub const RENEW_EVERY: Duration = Duration::from_secs(10);

/// A token bucket: `per_second` sustained, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bucket {
    pub per_second: f64,
    pub burst: u32,
}

/// The limits one call is checked against; `None`: unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct CallLimits {
    pub caller_rate: Option<Bucket>,
    pub caller_concurrency: Option<u32>,
    pub total_rate: Option<Bucket>,
    pub total_concurrency: Option<u32>,
}

/// Which limit refused a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    CallerConcurrency,
    TotalConcurrency,
    CallerRate,
    TotalRate,
}

impl Refusal {
    /// For a problem's detail.
    pub fn describe(self) -> &'static str {
        match self {
            Refusal::CallerConcurrency => "this API key has as many calls in flight as it may",
            Refusal::TotalConcurrency => "the endpoint has as many calls in flight as it may",
            Refusal::CallerRate => "this API key is over its request rate",
            Refusal::TotalRate => "the endpoint is over its request rate",
        }
    }
}

/// The verdict for one call.
#[derive(Debug)]
pub enum Verdict {
    /// Go ahead; the slot is held until the permit is dropped.
    Admitted(Permit),
    /// Refused; the caller may try again after this long.
    Refused { by: Refusal, retry_after: Duration },
}

/// One call's slot in the in-flight sets; dropping it frees the slot.
#[derive(Debug)]
pub struct Permit {
    admission: Option<Admission>,
    call: String,
}

impl Permit {
    /// A permit that holds nothing (limits not checked, e.g. Redis unreachable).
    pub fn unchecked() -> Self {
        Self {
            admission: None,
            call: String::new(),
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let Some(admission) = self.admission.take() else {
            return;
        };
        let Some(sets) = admission
            .leases
            .lock()
            .expect("not poisoned")
            .remove(&self.call)
        else {
            return;
        };
        let call = std::mem::take(&mut self.call);
        // Drop cannot wait: free the slot in the background (its lease bounds a failure).
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let mut conn = admission.conn.clone();
                let mut pipe = redis::pipe();
                for set in &sets {
                    pipe.zrem(set, &call).ignore();
                }
                if let Err(error) = pipe.query_async::<()>(&mut conn).await {
                    tracing::warn!(%error, "could not free a call's slot; its lease will");
                }
            });
        }
    }
}

const ADMIT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[1])
local call = ARGV[2]
local caller_conc, total_conc = tonumber(ARGV[3]), tonumber(ARGV[4])
local caller_rate, caller_burst = tonumber(ARGV[5]), tonumber(ARGV[6])
local total_rate, total_burst = tonumber(ARGV[7]), tonumber(ARGV[8])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if caller_conc > 0 and redis.call('ZCARD', KEYS[1]) >= caller_conc then return {1, 1000} end
if total_conc > 0 and redis.call('ZCARD', KEYS[2]) >= total_conc then return {2, 1000} end
local function level(key, rate, burst)
  local v = redis.call('HMGET', key, 'tokens', 'at')
  local tokens, at = tonumber(v[1]), tonumber(v[2])
  if tokens == nil or at == nil then return burst end
  return math.min(burst, tokens + math.max(0, now - at) * rate / 1000)
end
local caller_level, total_level
if caller_rate > 0 then
  caller_level = level(KEYS[3], caller_rate, caller_burst)
  if caller_level < 1 then return {3, math.ceil((1 - caller_level) * 1000 / caller_rate)} end
end
if total_rate > 0 then
  total_level = level(KEYS[4], total_rate, total_burst)
  if total_level < 1 then return {4, math.ceil((1 - total_level) * 1000 / total_rate)} end
end
if caller_rate > 0 then
  redis.call('HSET', KEYS[3], 'tokens', tostring(caller_level - 1), 'at', now)
  redis.call('PEXPIRE', KEYS[3], math.ceil(caller_burst * 1000 / caller_rate) + 1000)
end
if total_rate > 0 then
  redis.call('HSET', KEYS[4], 'tokens', tostring(total_level - 1), 'at', now)
  redis.call('PEXPIRE', KEYS[4], math.ceil(total_burst * 1000 / total_rate) + 1000)
end
redis.call('ZADD', KEYS[1], now + lease, call)
redis.call('PEXPIRE', KEYS[1], lease * 2)
redis.call('ZADD', KEYS[2], now + lease, call)
redis.call('PEXPIRE', KEYS[2], lease * 2)
redis.call('INCR', KEYS[5])
redis.call('PEXPIRE', KEYS[5], 86400000)
return {0, 0}
"#;

/// KEYS: in-flight sets; ARGV: lease, then one member per set.
const RENEW: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[1])
for i, set in ipairs(KEYS) do
  redis.call('ZADD', set, 'XX', now + lease, ARGV[i + 1])
  redis.call('PEXPIRE', set, lease * 2)
end
return 0
"#;

/// KEYS: the scope's in-flight set, its admitted counter.
const LOAD: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return {redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf'), tonumber(redis.call('GET', KEYS[2]) or '0')}
"#;

/// A scope's load now, across every process using this Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Load {
    /// Calls in flight (admitted, not yet ended: served or waiting for a replica).
    pub in_flight: u64,
    /// Calls admitted so far (a counter: compare two readings; it restarts from 0 after a day
    /// without calls).
    pub admitted: u64,
}

/// Admission control over one Redis; cheap to clone (shared).
#[derive(Clone)]
pub struct Admission {
    conn: ConnectionManager,
    namespace: String,
    admit: Arc<redis::Script>,
    renew: Arc<redis::Script>,
    load: Arc<redis::Script>,
    /// This process's calls in flight: call id → the sets it is in (what renewal renews).
    leases: Arc<Mutex<HashMap<String, [String; 2]>>>,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission")
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

impl Admission {
    /// Connect; `namespace` prefixes every key. Spawns the lease renewal (needs a runtime).
    pub async fn connect(url: &str, namespace: &str) -> Result<Self, RateLimitError> {
        let client = redis::Client::open(url)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Duration::from_secs(2))
            .set_response_timeout(Duration::from_secs(2))
            .set_number_of_retries(1);
        let conn = ConnectionManager::new_with_config(client, config).await?;
        let admission = Self {
            conn,
            namespace: namespace.to_owned(),
            admit: Arc::new(redis::Script::new(ADMIT)),
            renew: Arc::new(redis::Script::new(RENEW)),
            load: Arc::new(redis::Script::new(LOAD)),
            leases: Arc::default(),
        };
        let renewer = admission.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(RENEW_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                if let Err(error) = renewer.renew_all().await {
                    tracing::warn!(%error, "could not renew call leases; retrying");
                }
                // Stop with the last clone outside this task.
                if Arc::strong_count(&renewer.leases) == 1 {
                    return;
                }
            }
        });
        Ok(admission)
    }

    fn set(&self, scope: &str, caller: Option<&str>) -> String {
        match caller {
            Some(c) => format!("{}:adm:{scope}:caller:{c}:in_flight", self.namespace),
            None => format!("{}:adm:{scope}:in_flight", self.namespace),
        }
    }

    fn admitted(&self, scope: &str) -> String {
        format!("{}:adm:{scope}:admitted", self.namespace)
    }

    fn bucket(&self, scope: &str, caller: Option<&str>) -> String {
        match caller {
            Some(c) => format!("{}:adm:{scope}:caller:{c}:tokens", self.namespace),
            None => format!("{}:adm:{scope}:tokens", self.namespace),
        }
    }

    /// Check one call by `caller` against `scope`'s `limits` (errors: Redis failed).
    pub async fn try_admit(
        &self,
        scope: &str,
        caller: &str,
        limits: &CallLimits,
    ) -> Result<Verdict, RateLimitError> {
        let call = uuid::Uuid::now_v7().to_string();
        let sets = [self.set(scope, Some(caller)), self.set(scope, None)];
        let rate = |b: Option<Bucket>| match b {
            Some(b) if b.per_second > 0.0 => (b.per_second, b.burst.max(1)),
            _ => (0.0, 0),
        };
        let (caller_rate, caller_burst) = rate(limits.caller_rate);
        let (total_rate, total_burst) = rate(limits.total_rate);
        let mut conn = self.conn.clone();
        let (code, retry_ms): (i64, i64) = self
            .admit
            .key(&sets[0])
            .key(&sets[1])
            .key(self.bucket(scope, Some(caller)))
            .key(self.bucket(scope, None))
            .key(self.admitted(scope))
            .arg(LEASE.as_millis() as u64)
            .arg(&call)
            .arg(limits.caller_concurrency.unwrap_or(0))
            .arg(limits.total_concurrency.unwrap_or(0))
            .arg(caller_rate)
            .arg(caller_burst)
            .arg(total_rate)
            .arg(total_burst)
            .invoke_async(&mut conn)
            .await?;
        let by = match code {
            0 => {
                self.leases
                    .lock()
                    .expect("not poisoned")
                    .insert(call.clone(), sets);
                return Ok(Verdict::Admitted(Permit {
                    admission: Some(self.clone()),
                    call,
                }));
            }
            1 => Refusal::CallerConcurrency,
            2 => Refusal::TotalConcurrency,
            3 => Refusal::CallerRate,
            _ => Refusal::TotalRate,
        };
        Ok(Verdict::Refused {
            by,
            retry_after: Duration::from_millis(retry_ms.max(1) as u64),
        })
    }

    /// Like [`try_admit`](Self::try_admit), admitting (unchecked) when Redis fails.
    pub async fn admit(&self, scope: &str, caller: &str, limits: &CallLimits) -> Verdict {
        match self.try_admit(scope, caller, limits).await {
            Ok(v) => v,
            Err(error) => {
                tracing::error!(%error, scope, "admission unavailable; admitting the call");
                Verdict::Admitted(Permit::unchecked())
            }
        }
    }

    /// `scope`'s load now: what the autoscaler reads.
    pub async fn load(&self, scope: &str) -> Result<Load, RateLimitError> {
        let mut conn = self.conn.clone();
        let (in_flight, admitted): (u64, u64) = self
            .load
            .key(self.set(scope, None))
            .key(self.admitted(scope))
            .invoke_async(&mut conn)
            .await?;
        Ok(Load {
            in_flight,
            admitted,
        })
    }

    /// Calls in flight in `scope` now, across every process using this Redis.
    pub async fn in_flight(&self, scope: &str) -> Result<u64, RateLimitError> {
        Ok(self.load(scope).await?.in_flight)
    }

    async fn renew_all(&self) -> Result<(), RateLimitError> {
        let held: Vec<(String, [String; 2])> = self
            .leases
            .lock()
            .expect("not poisoned")
            .iter()
            .map(|(c, s)| (c.clone(), s.clone()))
            .collect();
        for chunk in held.chunks(256) {
            let mut inv = self.renew.prepare_invoke();
            inv.arg(LEASE.as_millis() as u64);
            for (call, sets) in chunk {
                for set in sets {
                    inv.key(set).arg(call);
                }
            }
            let mut conn = self.conn.clone();
            let _: i64 = inv.invoke_async(&mut conn).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redis_url() -> String {
        std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
    }

    async fn admission() -> Admission {
        Admission::connect(&redis_url(), &format!("test-{}", uuid::Uuid::new_v4()))
            .await
            .expect("redis must be running (make test starts it)")
    }

    fn admitted(v: &Verdict) -> bool {
        matches!(v, Verdict::Admitted(_))
    }

    #[tokio::test]
    async fn a_bucket_allows_its_burst_then_says_when_to_retry() {
        let adm = admission().await;
        let limits = CallLimits {
            caller_rate: Some(Bucket {
                per_second: 0.5,
                burst: 3,
            }),
            ..CallLimits::default()
        };
        for _ in 0..3 {
            assert!(admitted(
                &adm.try_admit("ep", "ada", &limits).await.unwrap()
            ));
        }
        match adm.try_admit("ep", "ada", &limits).await.unwrap() {
            Verdict::Refused { by, retry_after } => {
                assert_eq!(by, Refusal::CallerRate);
                // One token every 2 s: the next one is due within 2 s.
                assert!(retry_after > Duration::ZERO && retry_after <= Duration::from_secs(2));
            }
            v => panic!("expected a refusal, got {v:?}"),
        }
        // Another caller has its own bucket; a refusal took nothing from it.
        assert!(admitted(
            &adm.try_admit("ep", "bob", &limits).await.unwrap()
        ));
    }

    #[tokio::test]
    async fn concurrency_slots_free_when_calls_end() {
        let adm = admission().await;
        let limits = CallLimits {
            caller_concurrency: Some(2),
            total_concurrency: Some(3),
            ..CallLimits::default()
        };
        let a1 = adm.try_admit("ep", "ada", &limits).await.unwrap();
        let a2 = adm.try_admit("ep", "ada", &limits).await.unwrap();
        assert!(admitted(&a1) && admitted(&a2));
        assert!(matches!(
            adm.try_admit("ep", "ada", &limits).await.unwrap(),
            Verdict::Refused {
                by: Refusal::CallerConcurrency,
                ..
            }
        ));
        let b1 = adm.try_admit("ep", "bob", &limits).await.unwrap();
        assert!(admitted(&b1));
        assert!(matches!(
            adm.try_admit("ep", "bob", &limits).await.unwrap(),
            Verdict::Refused {
                by: Refusal::TotalConcurrency,
                ..
            }
        ));
        assert_eq!(
            adm.load("ep").await.unwrap(),
            Load {
                in_flight: 3,
                admitted: 3
            },
            "refusals are not counted as admitted"
        );
        drop(a1);
        // The slot is freed in the background: poll with a deadline.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while adm.in_flight("ep").await.unwrap() != 2 {
            assert!(std::time::Instant::now() < deadline, "slot never freed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(admitted(
            &adm.try_admit("ep", "ada", &limits).await.unwrap()
        ));
    }

    #[tokio::test]
    async fn renewal_keeps_slots_that_are_still_held() {
        let adm = admission().await;
        let held = adm
            .try_admit("ep", "ada", &CallLimits::default())
            .await
            .unwrap();
        adm.renew_all().await.unwrap();
        assert_eq!(adm.in_flight("ep").await.unwrap(), 1);
        drop(held);
    }
}
