//! Shared state of one `kiln-api` process, and authentication of bearer tokens.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use kiln_auth::{ApiKeySecret, KeyRing, PasswordHasher, SecretDigest};
use kiln_domain::{SessionId, UserId};
use kiln_ratelimit::RateLimiter;
use kiln_store::{Principal, Store};

use crate::config::ApiConfig;
use crate::error::ApiError;
use crate::fanout::{Fanout, Invalidation};

/// How long a "session is live" answer is trusted before asking Postgres again. A revocation on
/// this replica evicts at once; other replicas see it within this bound.
const SESSION_CACHE_TTL: Duration = Duration::from_secs(2);

#[derive(Clone)]
pub struct AppState(Arc<Inner>);

pub struct Inner {
    pub store: Store,
    pub limiter: RateLimiter,
    pub hasher: PasswordHasher,
    pub config: ApiConfig,
    pub fanout: Fanout,
    /// Wakes live views (server-sent events) when a workload changes.
    pub live: crate::live::LiveHub,
    /// Seals tenant secrets at rest; `None` without `KILN_SECRETS_KEY`.
    pub secrets: Option<kiln_auth::SecretBox>,
    /// Workloads' recent output (pushed by agents through the fleet service).
    pub logs: kiln_logs::LogStore,
    keyring: RwLock<Arc<KeyRing>>,
    sessions: Mutex<HashMap<SessionId, (Instant, bool)>>,
    me_cache: Mutex<HashMap<UserId, (Instant, Arc<crate::views::MeView>)>>,
    last_key_reload: Mutex<Option<Instant>>,
}

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

/// Who is calling, and from where.
#[derive(Debug, Clone)]
pub struct Caller {
    pub principal: Principal,
    pub client: ClientInfo,
}

/// The client's address and user agent, for rate limits and the audit log.
#[derive(Debug, Clone, Default)]
pub struct ClientInfo {
    pub ip: Option<String>,
    pub user_agent: Option<String>,
}

pub fn now_unix() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

impl AppState {
    /// Connect nothing: build from parts that are already connected.
    pub async fn new(
        store: Store,
        limiter: RateLimiter,
        config: ApiConfig,
    ) -> anyhow::Result<Self> {
        let hasher = PasswordHasher::new()?;
        let secrets = match config
            .secrets_key
            .as_deref()
            .filter(|k| !k.trim().is_empty())
        {
            Some(raw) => Some(kiln_auth::SecretBox::from_base64(raw)?),
            None => {
                tracing::warn!(
                    "KILN_SECRETS_KEY is not set: pods with secret env values will be refused"
                );
                None
            }
        };
        let fanout = Fanout::connect(&config.redis_url, &config.redis_namespace).await?;
        let logs = kiln_logs::LogStore::connect(&config.redis_url, &config.redis_namespace).await?;
        let issuer = config.public_url.trim_end_matches('/').to_owned();
        let ring = KeyRing::new(issuer, "kiln-api", config.access_token_ttl_secs, &[]);
        let live = crate::live::LiveHub::default();
        live.spawn(store.pool().clone());
        let state = Self(Arc::new(Inner {
            live,
            store,
            limiter,
            hasher,
            config,
            fanout,
            secrets,
            logs,
            keyring: RwLock::new(Arc::new(ring)),
            sessions: Mutex::new(HashMap::new()),
            me_cache: Mutex::new(HashMap::new()),
            last_key_reload: Mutex::new(None),
        }));
        state.rotate_and_reload_keys().await?;
        Ok(state)
    }

    pub fn keyring(&self) -> Arc<KeyRing> {
        self.keyring
            .read()
            .map(|k| k.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Rotate the signing key if it is due, then load the live keys. Run at start-up and
    /// periodically by every replica.
    pub async fn rotate_and_reload_keys(&self) -> Result<(), ApiError> {
        let rotate_after = time::Duration::hours(self.config.signing_key_rotate_hours.max(1));
        // Keep a retired signer verifying for two token lifetimes after it stopped signing.
        let retire_after = time::Duration::seconds(self.config.access_token_ttl_secs * 2 + 60);
        self.store
            .signing_keys_rotate(rotate_after, retire_after)
            .await?;
        self.reload_keys().await
    }

    async fn reload_keys(&self) -> Result<(), ApiError> {
        let keys = self.store.signing_keys_live().await?;
        let issuer = self.config.public_url.trim_end_matches('/').to_owned();
        let ring = KeyRing::new(issuer, "kiln-api", self.config.access_token_ttl_secs, &keys);
        if let Ok(mut w) = self.keyring.write() {
            *w = Arc::new(ring);
        }
        if let Ok(mut t) = self.last_key_reload.lock() {
            *t = Some(Instant::now());
        }
        Ok(())
    }

    /// Authenticate an `Authorization: Bearer` token: an API key (`kiln_…`) or an access JWT.
    pub async fn authenticate(&self, token: &str) -> Result<Principal, ApiError> {
        if ApiKeySecret::looks_like(token) {
            let auth = self
                .store
                .api_key_authenticate(&SecretDigest::of(token))
                .await?
                .ok_or(ApiError::Unauthenticated(
                    "the API key is invalid, expired or revoked",
                ))?;
            return Ok(Principal::ApiKey {
                key_id: auth.key_id,
                org_id: auth.org_id,
                role: auth.role,
                created_by: auth.created_by,
            });
        }
        let invalid = ApiError::Unauthenticated("the access token is invalid or expired");
        let mut ring = self.keyring();
        let kid = KeyRing::kid_of(token)
            .map_err(|_| ApiError::Unauthenticated("the access token is malformed"))?;
        if !ring.knows(&kid) && self.may_reload_keys() {
            // Another replica may have rotated: look again, at most once a second.
            self.reload_keys().await?;
            ring = self.keyring();
        }
        let claims = ring.verify(token).map_err(|_| invalid)?;
        let (user_id, session_id) = match (claims.user_id(), claims.session_id()) {
            (Ok(u), Ok(s)) => (u, s),
            _ => {
                return Err(ApiError::Unauthenticated(
                    "the access token is invalid or expired",
                ));
            }
        };
        let is_operator =
            self.session_live(session_id, user_id)
                .await?
                .ok_or(ApiError::Unauthenticated(
                    "the session has ended; sign in again",
                ))?;
        Ok(Principal::User {
            user_id,
            session_id,
            is_operator,
        })
    }

    fn may_reload_keys(&self) -> bool {
        self.last_key_reload
            .lock()
            .map(|t| t.is_none_or(|t| t.elapsed() > Duration::from_secs(1)))
            .unwrap_or(true)
    }

    async fn session_live(
        &self,
        session: SessionId,
        user: UserId,
    ) -> Result<Option<bool>, ApiError> {
        if let Ok(cache) = self.sessions.lock()
            && let Some((at, op)) = cache.get(&session)
            && at.elapsed() < SESSION_CACHE_TTL
        {
            return Ok(Some(*op));
        }
        let live = self.store.session_check(session, user).await?;
        if let Ok(mut cache) = self.sessions.lock() {
            match live {
                Some(op) => {
                    if cache.len() > 100_000 {
                        cache.retain(|_, (at, _)| at.elapsed() < SESSION_CACHE_TTL);
                    }
                    cache.insert(session, (Instant::now(), op));
                }
                None => {
                    cache.remove(&session);
                }
            }
        }
        Ok(live)
    }

    /// Forget a revoked session here at once and tell the other replicas.
    pub fn forget_session(&self, session: SessionId) {
        self.evict_local(Invalidation::Session(session));
        self.fanout.publish(Invalidation::Session(session));
    }

    /// Evict from this replica's caches only (what the fan-out listener does).
    pub fn evict_local(&self, what: Invalidation) {
        match what {
            Invalidation::Session(session) => {
                if let Ok(mut cache) = self.sessions.lock() {
                    cache.remove(&session);
                }
            }
            Invalidation::Me(user) => {
                if let Ok(mut cache) = self.me_cache.lock() {
                    cache.remove(&user);
                }
            }
        }
    }

    /// A recent `/v1/me` answer for `user`, if one is fresh enough.
    pub fn me_cached(&self, user: UserId) -> Option<Arc<crate::views::MeView>> {
        let ttl = Duration::from_millis(self.config.me_cache_ms);
        if ttl.is_zero() {
            return None;
        }
        let cache = self.me_cache.lock().ok()?;
        cache
            .get(&user)
            .filter(|(at, _)| at.elapsed() < ttl)
            .map(|(_, me)| me.clone())
    }

    pub fn me_remember(&self, user: UserId, me: Arc<crate::views::MeView>) {
        if self.config.me_cache_ms == 0 {
            return;
        }
        let ttl = Duration::from_millis(self.config.me_cache_ms);
        if let Ok(mut cache) = self.me_cache.lock() {
            if cache.len() > 100_000 {
                cache.retain(|_, (at, _)| at.elapsed() < ttl);
            }
            cache.insert(user, (Instant::now(), me));
        }
    }

    /// Forget `user`'s cached `/v1/me` (their memberships changed), here and on other replicas.
    pub fn me_forget(&self, user: UserId) {
        self.evict_local(Invalidation::Me(user));
        self.fanout.publish(Invalidation::Me(user));
    }
}
