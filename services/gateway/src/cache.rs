//! What the gateway looks up per call, kept in memory so the hot path makes no database round
//! trip: API keys by digest, each org's standing (may it spend?), each endpoint's route.
//!
//! Freshness is pushed, not polled: triggers (`migrations/…_gateway_cache_notify.sql`) send
//! `NOTIFY kiln_gateway_cache` with `key:<digest hex>`, `org:<uuid>` or `endpoint:<uuid>` when
//! any of these changes, and each gateway keeps one `LISTEN` connection that drops the entry —
//! so a revoked key stops working as soon as the notice arrives (milliseconds), on every
//! gateway. The TTLs are the safety net for what no trigger covers (an org's funds shrinking
//! with each charge; a node's address) and for notices missed while the listener reconnects
//! (everything is dropped then, and the gateway reports itself unhealthy until it listens
//! again).
//!
//! A load that races an invalidation of the same cache does not store its answer: each cache
//! counts invalidations, and an answer read before the latest one may already be stale.

use std::hash::Hash;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kiln_store::{ApiKeyAuth, EndpointRoute, Wakers};
use moka::Expiry;
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use uuid::Uuid;

/// The channel the triggers notify.
pub const CHANNEL: &str = "kiln_gateway_cache";

/// How long answers may be kept when no notice says otherwise.
#[derive(Debug, Clone, Copy)]
pub struct CacheTtls {
    /// A live key. Reloading also refreshes the key's `last_used_at` (at most once a minute).
    pub key: Duration,
    /// "No such live key": short, so a flood of made-up keys costs one lookup per key per TTL
    /// and cannot pin memory (the cache is bounded too).
    pub unknown_key: Duration,
    /// Whether an org may spend. Charges lower the funds without a notice, so this bounds
    /// how long an org that just ran out can still call.
    pub standing: Duration,
    /// An endpoint's ready replicas.
    pub route: Duration,
}

impl Default for CacheTtls {
    fn default() -> Self {
        Self {
            key: Duration::from_secs(60),
            unknown_key: Duration::from_secs(5),
            standing: Duration::from_secs(2),
            route: Duration::from_secs(5),
        }
    }
}

/// One cache with its invalidation count (see the module docs).
struct Cached<K, V> {
    entries: moka::sync::Cache<K, V>,
    invalidations: AtomicU64,
}

impl<K, V> Cached<K, V>
where
    K: Hash + Eq + Send + Sync + Clone + 'static,
    V: Clone + Send + Sync + 'static,
{
    fn new(capacity: u64, expiry: impl Expiry<K, V> + Send + Sync + 'static) -> Self {
        Self {
            entries: moka::sync::Cache::builder()
                .max_capacity(capacity)
                .expire_after(expiry)
                .build(),
            invalidations: AtomicU64::new(0),
        }
    }

    async fn get_or_load<E, F>(&self, key: K, load: F) -> Result<V, E>
    where
        F: Future<Output = Result<V, E>>,
    {
        if let Some(v) = self.entries.get(&key) {
            metrics::counter!("kiln_gateway_cache_hits_total").increment(1);
            return Ok(v);
        }
        metrics::counter!("kiln_gateway_cache_misses_total").increment(1);
        let before = self.invalidations.load(Ordering::SeqCst);
        let v = load.await?;
        if self.invalidations.load(Ordering::SeqCst) == before {
            self.entries.insert(key, v.clone());
        }
        Ok(v)
    }

    fn invalidate(&self, key: &K) {
        self.invalidations.fetch_add(1, Ordering::SeqCst);
        self.entries.invalidate(key);
    }

    fn invalidate_all(&self) {
        self.invalidations.fetch_add(1, Ordering::SeqCst);
        self.entries.invalidate_all();
    }
}

/// Per-entry lifetimes: a fixed one, or one for present and one for absent answers.
struct Lifetimes {
    present: Duration,
    absent: Duration,
}

impl<K, V> Expiry<K, Option<V>> for Lifetimes {
    fn expire_after_create(&self, _: &K, value: &Option<V>, _: Instant) -> Option<Duration> {
        Some(if value.is_some() {
            self.present
        } else {
            self.absent
        })
    }
}

struct Fixed(Duration);

impl<K, V> Expiry<K, V> for Fixed {
    fn expire_after_create(&self, _: &K, _: &V, _: Instant) -> Option<Duration> {
        Some(self.0)
    }
}

/// The gateway's caches; cheap to clone (shared).
#[derive(Clone)]
pub struct Caches(Arc<Inner>);

struct Inner {
    keys: Cached<[u8; 32], Option<ApiKeyAuth>>,
    /// `true`: the org is out of credit.
    standing: Cached<Uuid, bool>,
    routes: Cached<Uuid, Option<Arc<EndpointRoute>>>,
    /// Woken when an endpoint's route may have changed (calls waiting for a replica listen).
    route_changed: Wakers<Uuid>,
    listening: AtomicBool,
}

impl Caches {
    pub fn new(ttls: CacheTtls) -> Self {
        Self(Arc::new(Inner {
            keys: Cached::new(
                100_000,
                Lifetimes {
                    present: ttls.key,
                    absent: ttls.unknown_key,
                },
            ),
            standing: Cached::new(100_000, Fixed(ttls.standing)),
            routes: Cached::new(
                100_000,
                Lifetimes {
                    present: ttls.route,
                    absent: ttls.route,
                },
            ),
            route_changed: Wakers::default(),
            listening: AtomicBool::new(false),
        }))
    }

    /// The live key with this digest (`None`: no such key, or revoked, or expired).
    pub async fn key<E, F>(&self, digest: [u8; 32], load: F) -> Result<Option<ApiKeyAuth>, E>
    where
        F: Future<Output = Result<Option<ApiKeyAuth>, E>>,
    {
        let key = self.0.keys.get_or_load(digest, load).await?;
        // Expiry is a moment, not an event: no notice comes when it passes.
        Ok(key.filter(|k| {
            k.expires_at
                .is_none_or(|at| at > time::OffsetDateTime::now_utc())
        }))
    }

    /// Whether `org` is out of credit.
    pub async fn out_of_credit<E, F>(&self, org: Uuid, load: F) -> Result<bool, E>
    where
        F: Future<Output = Result<bool, E>>,
    {
        self.0.standing.get_or_load(org, load).await
    }

    /// The route of endpoint `id` (`None`: unknown or deleted).
    pub async fn route<E, F>(&self, id: Uuid, load: F) -> Result<Option<Arc<EndpointRoute>>, E>
    where
        F: Future<Output = Result<Option<Arc<EndpointRoute>>, E>>,
    {
        self.0.routes.get_or_load(id, load).await
    }

    /// Changes whenever endpoint `id`'s route may have changed.
    pub fn watch_route(&self, id: Uuid) -> tokio::sync::watch::Receiver<u64> {
        self.0.route_changed.subscribe(id)
    }

    /// Whether the invalidation listener is connected (without it, only TTLs bound staleness).
    pub fn listening(&self) -> bool {
        self.0.listening.load(Ordering::SeqCst)
    }

    /// Apply one notice; unknown ones drop everything (a newer schema may send more kinds).
    pub fn apply(&self, payload: &str) {
        let parsed = payload.split_once(':').and_then(|(kind, rest)| match kind {
            "key" => {
                let mut digest = [0u8; 32];
                hex::decode_to_slice(rest, &mut digest).ok()?;
                self.0.keys.invalidate(&digest);
                Some(())
            }
            "org" => {
                self.0.standing.invalidate(&rest.parse().ok()?);
                Some(())
            }
            "endpoint" => {
                let id = rest.parse().ok()?;
                self.0.routes.invalidate(&id);
                self.0.route_changed.wake(id, 0);
                Some(())
            }
            _ => None,
        });
        if parsed.is_none() {
            tracing::warn!(
                payload,
                "unknown gateway cache notice; dropping every cache"
            );
            self.invalidate_all();
        }
    }

    fn invalidate_all(&self) {
        self.0.keys.invalidate_all();
        self.0.standing.invalidate_all();
        self.0.routes.invalidate_all();
        self.0.route_changed.wake_all();
    }

    /// Listen for notices until the process ends, reconnecting after failures; everything is
    /// dropped whenever notices may have been missed.
    pub fn spawn_listener(&self, pool: PgPool) -> tokio::task::JoinHandle<()> {
        let caches = self.clone();
        tokio::spawn(async move {
            loop {
                if let Err(e) = caches.listen(&pool).await {
                    tracing::warn!(error = %e, "gateway cache listener failed; reconnecting");
                }
                caches.0.listening.store(false, Ordering::SeqCst);
                caches.invalidate_all();
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    }

    async fn listen(&self, pool: &PgPool) -> Result<(), sqlx::Error> {
        let mut listener = PgListener::connect_with(pool).await?;
        listener.listen(CHANNEL).await?;
        // Whatever was cached before this point may have missed a notice.
        self.invalidate_all();
        self.0.listening.store(true, Ordering::SeqCst);
        loop {
            match listener.try_recv().await? {
                Some(note) => self.apply(note.payload()),
                // The connection was lost and is being re-established: notices in between
                // are gone.
                None => {
                    self.0.listening.store(false, Ordering::SeqCst);
                    self.invalidate_all();
                    listener.listen(CHANNEL).await?;
                    self.0.listening.store(true, Ordering::SeqCst);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(org: Uuid) -> Option<Arc<EndpointRoute>> {
        Some(Arc::new(EndpointRoute {
            id: Uuid::nil(),
            org_id: org,
            ready: Vec::new(),
            coming: 0,
            limits: Default::default(),
            grantees: Vec::new(),
            price: None,
        }))
    }

    #[tokio::test]
    async fn answers_are_kept_until_a_notice_drops_them() {
        let caches = Caches::new(CacheTtls::default());
        let ep = Uuid::now_v7();
        let loads = AtomicU64::new(0);
        let load = || async {
            loads.fetch_add(1, Ordering::SeqCst);
            Ok::<_, ()>(route(Uuid::nil()))
        };
        caches.route(ep, load()).await.unwrap();
        caches.route(ep, load()).await.unwrap();
        assert_eq!(loads.load(Ordering::SeqCst), 1, "the second call is a hit");
        let mut woken = caches.watch_route(ep);
        caches.apply(&format!("endpoint:{ep}"));
        assert!(woken.has_changed().unwrap(), "waiters hear of the change");
        woken.mark_unchanged();
        caches.route(ep, load()).await.unwrap();
        assert_eq!(loads.load(Ordering::SeqCst), 2, "dropped, so loaded again");
        // Another endpoint's notice leaves this one alone.
        caches.apply(&format!("endpoint:{}", Uuid::now_v7()));
        caches.route(ep, load()).await.unwrap();
        assert_eq!(loads.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_load_that_races_a_notice_is_not_kept() {
        let caches = Caches::new(CacheTtls::default());
        let digest = [7u8; 32];
        let hex = hex::encode(digest);
        // The notice arrives while the (stale) answer is being read.
        let stale = caches
            .key(digest, async {
                caches.apply(&format!("key:{hex}"));
                Ok::<_, ()>(None)
            })
            .await
            .unwrap();
        assert!(stale.is_none());
        let mut loaded = false;
        caches
            .key(digest, async {
                loaded = true;
                Ok::<_, ()>(None)
            })
            .await
            .unwrap();
        assert!(loaded, "the raced answer was not cached");
    }

    #[tokio::test]
    async fn garbage_notices_drop_everything() {
        let caches = Caches::new(CacheTtls::default());
        let org = Uuid::now_v7();
        assert!(
            caches
                .out_of_credit(org, async { Ok::<_, ()>(true) })
                .await
                .unwrap()
        );
        caches.apply("org:not-a-uuid");
        assert!(
            !caches
                .out_of_credit(org, async { Ok::<_, ()>(false) })
                .await
                .unwrap(),
            "reloaded after an unreadable notice"
        );
    }
}
