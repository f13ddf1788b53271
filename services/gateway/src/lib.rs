//! `kiln-gateway`: the inference entry point, `ANY /v1/endpoints/{endpoint}/{path…}`.
//!
//! A call is authenticated by an API key of the endpoint's org or of an org its owner granted
//! (401 for a missing, invalid, expired or revoked key; another org's endpoint is a 404, like an
//! unknown one), then sent to
//! the ready replica with the fewest calls in flight on this gateway and streamed back as it
//! comes. An org out of credit gets 402 (the billing core's decision on the ledger, as the API
//! refuses new work), after the key check. No ready replica (scaled to zero, or starting):
//! the call is held, bounded in number and time, until one is — else 503 with `Retry-After`.
//! A body-less idempotent call whose replica cannot be reached is tried on another. Keys, standing and routes come from [`cache`]
//! (invalidated by Postgres notices, so a revoked key stops at once). Rate and concurrency
//! limits per key and per endpoint are checked in Redis (`kiln_ratelimit::admission`) before
//! any replica is woken or called.

use std::net::SocketAddr;
use std::sync::Arc;

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use clap::Args;
use futures::StreamExt;
use kiln_auth::{ApiKeySecret, SecretDigest};
use kiln_domain::EndpointId;
use kiln_store::ReadyReplica;
use kiln_store::Store;
use time::OffsetDateTime;
use uuid::Uuid;

pub mod cache;
pub mod metering;

use cache::{CacheTtls, Caches};
use kiln_ratelimit::admission::{Admission, Bucket, CallLimits, Permit, Verdict};

#[derive(Debug, Clone, Args)]
pub struct GatewayConfig {
    /// Address to serve inference traffic on.
    #[arg(long, env = "KILN_GATEWAY_LISTEN", default_value = "127.0.0.1:8090")]
    pub listen: SocketAddr,
    /// PostgreSQL connection URL.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://kiln:kiln@127.0.0.1:5432/kiln"
    )]
    pub database_url: String,
    /// Maximum PostgreSQL connections in this process's pool.
    #[arg(long, env = "KILN_DB_MAX_CONNECTIONS", default_value_t = 16)]
    pub db_max_connections: u32,
    /// Redis: the usage stream every completed call is metered into.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// Prefix of this deployment's Redis keys (the API's and scheduler's too).
    #[arg(long, env = "KILN_REDIS_NAMESPACE", default_value = "kiln")]
    pub redis_namespace: String,
    /// Seconds a usage event may stay unacknowledged by another gateway's ingester (one that
    /// died) before this one takes it over.
    #[arg(
        long,
        env = "KILN_GATEWAY_USAGE_CLAIM_IDLE_SECS",
        default_value_t = 30.0
    )]
    pub usage_claim_idle_secs: f64,
    /// Seconds a call that finds no ready replica (a cold start) is held before 503.
    #[arg(
        long,
        env = "KILN_GATEWAY_COLD_START_TIMEOUT_SECS",
        default_value_t = 60
    )]
    pub cold_start_timeout_secs: u64,
    /// On SIGTERM: stop accepting, let calls in flight (streams too) finish for at most this
    /// many seconds, then exit. Keep it under the orchestrator's grace period.
    #[arg(long, env = "KILN_SHUTDOWN_GRACE_SECS", default_value_t = 25)]
    pub shutdown_grace_secs: u64,
}

/// The largest request body forwarded to a replica.
pub const MAX_BODY_BYTES: u64 = 32 * 1024 * 1024;
/// How long a call that finds no ready replica is held by default.
pub const DEFAULT_COLD_START_TIMEOUT: Duration = Duration::from_secs(60);
/// Calls held per endpoint on one gateway while a replica starts; more get 503 at once.
pub const MAX_HELD_PER_ENDPOINT: usize = 256;
/// How long one call may take end to end (model servers stream long answers).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Clone)]
pub struct GatewayState {
    pub store: Store,
    upstream: reqwest::Client,
    in_flight: InFlight,
    meter: Option<metering::Meter>,
    admission: Option<Admission>,
    caches: Caches,
    /// Calls held per endpoint while a replica starts.
    held: InFlight,
    cold_start_timeout: Duration,
}

impl GatewayState {
    /// A gateway over `store` with the default cache lifetimes; starts the cache's
    /// invalidation listener (so it must be called inside a Tokio runtime).
    pub fn new(store: Store) -> Self {
        Self::with_cache_ttls(store, CacheTtls::default())
    }

    pub fn with_cache_ttls(store: Store, ttls: CacheTtls) -> Self {
        let upstream = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .timeout(CALL_TIMEOUT)
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            .expect("an HTTP client with default TLS settings");
        let caches = Caches::new(ttls);
        caches.spawn_listener(store.dedicated_pool());
        Self {
            store,
            upstream,
            in_flight: InFlight::default(),
            meter: None,
            admission: None,
            caches,
            held: InFlight::default(),
            cold_start_timeout: DEFAULT_COLD_START_TIMEOUT,
        }
    }

    /// Hold a call that finds no ready replica at most this long (then 503).
    pub fn with_cold_start_timeout(mut self, timeout: Duration) -> Self {
        self.cold_start_timeout = timeout;
        self
    }

    /// Enforce endpoints' rate and concurrency limits with `admission` (without it, none are).
    pub fn with_admission(mut self, admission: Admission) -> Self {
        self.admission = Some(admission);
        self
    }

    /// Meter completed calls into `meter`'s stream (without one, calls are not metered).
    pub fn with_meter(mut self, meter: metering::Meter) -> Self {
        self.meter = Some(meter);
        self
    }
}

/// Calls this gateway has in flight per replica: what "least outstanding" counts.
#[derive(Clone, Default)]
struct InFlight(Arc<Mutex<HashMap<Uuid, usize>>>);

impl InFlight {
    fn count(&self, replica: Uuid) -> usize {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&replica)
            .copied()
            .unwrap_or(0)
    }

    /// Like [`start`](Self::start), unless `id` already has `max`.
    fn try_start(&self, id: Uuid, max: usize) -> Option<InFlightGuard> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(id).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        drop(m);
        Some(InFlightGuard {
            map: self.clone(),
            replica: id,
        })
    }

    fn start(&self, replica: Uuid) -> InFlightGuard {
        *self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(replica)
            .or_default() += 1;
        InFlightGuard {
            map: self.clone(),
            replica,
        }
    }
}

/// Counts one call against its replica until dropped (when the response body is done).
struct InFlightGuard {
    map: InFlight,
    replica: Uuid,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        let mut m = self.map.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.replica) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.replica);
            }
        }
    }
}

/// The ready replica with the fewest calls in flight (ties: the oldest), skipping `tried`.
pub fn pick<'a>(
    ready: &'a [ReadyReplica],
    in_flight: impl Fn(Uuid) -> usize,
    tried: &[Uuid],
) -> Option<&'a ReadyReplica> {
    ready
        .iter()
        .filter(|r| !tried.contains(&r.workload_id))
        .min_by_key(|r| in_flight(r.workload_id))
}

/// Headers that belong to one hop, not to the call (RFC 9110 §7.6.1), plus what the gateway
/// itself answers for (the caller's credential never reaches a replica).
fn hop_by_hop(name: &header::HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
            | "authorization"
            | "content-length"
    )
}

fn problem(status: StatusCode, title: &str, detail: &str) -> Response {
    let body = serde_json::json!({
        "type": format!("https://kiln.dev/problems/{}", title.to_lowercase().replace(' ', "-")),
        "title": title,
        "status": status.as_u16(),
        "detail": detail,
    });
    let mut r = (status, body.to_string()).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    r
}

async fn endpoint_call(
    State(state): State<GatewayState>,
    Path(params): Path<Vec<(String, String)>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim().to_owned());
    let Some(token) = token.filter(|t| ApiKeySecret::looks_like(t)) else {
        return problem(
            StatusCode::UNAUTHORIZED,
            "Authentication required",
            "send `Authorization: Bearer kiln_…` with an API key",
        );
    };
    let digest = SecretDigest::of(&token);
    let key = match state
        .caches
        .key(digest.0, state.store.api_key_authenticate(&digest))
        .await
    {
        Ok(Some(key)) => key,
        Ok(None) => {
            return problem(
                StatusCode::UNAUTHORIZED,
                "Authentication required",
                "the API key is invalid, expired or revoked",
            );
        }
        Err(error) => {
            tracing::error!(%error, "api key lookup failed");
            return unavailable("the gateway cannot reach its database; retry shortly");
        }
    };
    if let Some(refusal) = out_of_credit(&state, key.org_id.as_uuid()).await {
        return refusal;
    }
    let not_found = || problem(StatusCode::NOT_FOUND, "Not found", "endpoint not found");
    let raw = params
        .iter()
        .find(|(k, _)| k == "endpoint")
        .map(|(_, v)| v.as_str())
        .unwrap_or_default();
    let Ok(endpoint) = raw.parse::<EndpointId>() else {
        return not_found();
    };
    let route = match route_of(&state, endpoint.as_uuid()).await {
        Ok(Some(route)) if route.admits(key.org_id.as_uuid()) => route,
        // Another org's endpoint, unless it granted the caller's, is as unknown as a made-up one.
        Ok(_) => return not_found(),
        Err(error) => {
            tracing::error!(%error, "endpoint lookup failed");
            return unavailable("the gateway cannot reach its database; retry shortly");
        }
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES) {
        return problem(
            StatusCode::PAYLOAD_TOO_LARGE,
            "Payload too large",
            &format!("request bodies are limited to {MAX_BODY_BYTES} bytes"),
        );
    }
    // Over a limit: refused here, before any replica is woken or called.
    let permit = match &state.admission {
        Some(admission) => match admission
            .admit(
                &endpoint.to_string(),
                &key.key_id.to_string(),
                &call_limits(&route.limits),
            )
            .await
        {
            Verdict::Admitted(permit) => permit,
            Verdict::Refused { by, retry_after } => {
                metrics::counter!("kiln_gateway_calls_limited_total").increment(1);
                return too_many_requests(by.describe(), retry_after);
            }
        },
        None => Permit::unchecked(),
    };
    // No replica ready (scaled to zero, or starting): the call is held while one starts —
    // it already counts as in flight, which is what makes the autoscaler ask for a replica.
    let route = if route.ready.is_empty() {
        match hold_for_replica(&state, endpoint.as_uuid(), key.org_id.as_uuid()).await {
            Ok(route) => route,
            Err(refusal) => return refusal,
        }
    } else {
        route
    };

    let path = params
        .iter()
        .find(|(k, _)| k == "path")
        .map(|(_, v)| v.as_str())
        .unwrap_or_default();
    let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    // A call without a body can be sent again to another replica when the first cannot be
    // reached; one with a body streams through once.
    let replayable = declared.unwrap_or(0) == 0
        && !headers.contains_key(header::TRANSFER_ENCODING)
        && matches!(
            method,
            Method::GET | Method::HEAD | Method::OPTIONS | Method::DELETE
        );
    let started = std::time::Instant::now();
    let request_bytes = Arc::new(AtomicU64::new(0));
    let mut body = Some(body);
    let mut tried = Vec::new();
    loop {
        let Some(replica) = pick(&route.ready, |r| state.in_flight.count(r), &tried).cloned()
        else {
            return problem(
                StatusCode::BAD_GATEWAY,
                "Bad gateway",
                "no replica of this endpoint could be reached; retry shortly",
            );
        };
        tried.push(replica.workload_id);
        let guard = state.in_flight.start(replica.workload_id);
        let url = format!(
            "http://{}:{}/{path}{query}",
            replica.host, replica.host_port
        );
        let mut req = state.upstream.request(method.clone(), &url);
        for (name, value) in &headers {
            if !hop_by_hop(name) {
                req = req.header(name, value);
            }
        }
        if let Some(b) = body.take().filter(|_| !replayable) {
            let counted = request_bytes.clone();
            let stream = b.into_data_stream().map(move |chunk| {
                if let Ok(c) = &chunk {
                    counted.fetch_add(c.len() as u64, Ordering::Relaxed);
                }
                chunk
            });
            req = req.body(reqwest::Body::wrap_stream(stream));
        }
        match req.send().await {
            Ok(resp) => {
                let metered = state.meter.clone().map(|meter| Metered {
                    meter,
                    started,
                    request_bytes: request_bytes.clone(),
                    event: metering::UsageEvent {
                        id: Uuid::now_v7(),
                        endpoint_id: endpoint.as_uuid(),
                        org_id: route.org_id,
                        api_key_id: Some(key.key_id.as_uuid()),
                        replica_id: Some(replica.workload_id),
                        status: resp.status().as_u16(),
                        duration_ms: 0,
                        request_bytes: 0,
                        response_bytes: 0,
                        prompt_tokens: None,
                        completion_tokens: None,
                        at_unix_ms: 0,
                        caller_org_id: (key.org_id.as_uuid() != route.org_id)
                            .then(|| key.org_id.as_uuid()),
                        resale: route.price.filter(|_| key.org_id.as_uuid() != route.org_id),
                    },
                });
                return relay(resp, (guard, permit), metered);
            }
            Err(e) if e.is_connect() && replayable => {
                tracing::warn!(replica = %replica.workload_id, error = %e, "replica unreachable; trying another");
                continue;
            }
            Err(e) => {
                tracing::warn!(replica = %replica.workload_id, error = %e, "call to replica failed");
                return problem(
                    StatusCode::BAD_GATEWAY,
                    "Bad gateway",
                    "the endpoint's replica did not answer",
                );
            }
        }
    }
}

/// What is needed to meter one call once its answer is done.
struct Metered {
    meter: metering::Meter,
    started: std::time::Instant,
    request_bytes: Arc<AtomicU64>,
    event: metering::UsageEvent,
}

/// The relay's state: the replica's stream, the chunk held back, what is counted.
struct Relay {
    upstream: futures::stream::BoxStream<'static, Result<bytes::Bytes, reqwest::Error>>,
    held: Option<bytes::Bytes>,
    response_bytes: u64,
    scan: Vec<u8>,
    metered: Option<Metered>,
    /// The replica's in-flight count and the call's admission slot, held to the end.
    _held: (InFlightGuard, Permit),
}

/// The replica's answer, streamed through as it comes (chunked bodies and server-sent events
/// are not buffered), one chunk behind: when the replica's answer ends, the call's usage event
/// is made durable, and only then is the last chunk sent (see [`metering`]). The replica's
/// in-flight count drops when the body is done or the caller goes away.
fn relay(
    resp: reqwest::Response,
    held: (InFlightGuard, Permit),
    metered: Option<Metered>,
) -> Response {
    let status = resp.status();
    let mut headers = HeaderMap::new();
    for (name, value) in resp.headers() {
        if !hop_by_hop(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    let relay = Relay {
        upstream: resp.bytes_stream().boxed(),
        held: None,
        response_bytes: 0,
        scan: Vec::new(),
        metered,
        _held: held,
    };
    let stream = futures::stream::unfold(relay, |mut r| async move {
        loop {
            match r.upstream.next().await {
                Some(Ok(chunk)) => {
                    r.response_bytes += chunk.len() as u64;
                    if r.metered.is_some() && r.scan.len() < metering::USAGE_SCAN_BYTES {
                        let room = metering::USAGE_SCAN_BYTES - r.scan.len();
                        r.scan.extend_from_slice(&chunk[..chunk.len().min(room)]);
                    }
                    if let Some(previous) = r.held.replace(chunk) {
                        return Some((Ok::<_, std::io::Error>(previous), r));
                    }
                }
                Some(Err(e)) => {
                    // Cut off: not a completed call, so not metered.
                    r.metered = None;
                    r.held = None;
                    return Some((Err(std::io::Error::other(e)), r));
                }
                None => {
                    if let Some(m) = r.metered.take() {
                        let mut event = m.event;
                        event.duration_ms = m.started.elapsed().as_millis() as u64;
                        event.request_bytes = m.request_bytes.load(Ordering::Relaxed);
                        event.response_bytes = r.response_bytes;
                        (event.prompt_tokens, event.completion_tokens) =
                            metering::usage_of(&r.scan);
                        event.at_unix_ms =
                            OffsetDateTime::now_utc().unix_timestamp_nanos() as i64 / 1_000_000;
                        let endpoint = EndpointId::from_uuid(event.endpoint_id).to_string();
                        metrics::counter!("kiln_gateway_calls_total",
                            "endpoint" => endpoint.clone(), "status" => event.status.to_string())
                        .increment(1);
                        metrics::histogram!("kiln_gateway_call_duration_seconds", "endpoint" => endpoint)
                            .record(m.started.elapsed().as_secs_f64());
                        if let Err(e) = m.meter.record(&event).await {
                            // The caller still gets the answer; the event is lost and said so.
                            tracing::error!(error = %e, event = %event.id, "a usage event could not be recorded");
                            metrics::counter!("kiln_gateway_usage_events_lost_total").increment(1);
                        }
                    }
                    return r.held.take().map(|last| (Ok(last), r));
                }
            }
        }
    });
    let mut out = Response::new(Body::from_stream(stream));
    *out.status_mut() = status;
    *out.headers_mut() = headers;
    out
}

/// The limits a call to an endpoint with `limits` is admitted under.
pub fn call_limits(limits: &kiln_store::EndpointLimits) -> CallLimits {
    let bucket = |r: kiln_store::RateLimit| Bucket {
        per_second: r.per_second,
        burst: u32::try_from(r.burst).unwrap_or(1),
    };
    CallLimits {
        caller_rate: Some(bucket(limits.per_key_rate)),
        caller_concurrency: u32::try_from(limits.per_key_concurrency).ok(),
        total_rate: limits.total_rate.map(bucket),
        total_concurrency: limits.total_concurrency.and_then(|n| u32::try_from(n).ok()),
    }
}

/// 429 with `Retry-After` in whole seconds (at least 1), rounded up.
fn too_many_requests(detail: &str, retry_after: Duration) -> Response {
    let secs = retry_after.as_millis().div_ceil(1000).max(1);
    let mut r = problem(
        StatusCode::TOO_MANY_REQUESTS,
        "Too many requests",
        &format!("{detail}; retry after {secs} s"),
    );
    if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
        r.headers_mut().insert(header::RETRY_AFTER, v);
    }
    r
}

fn unavailable(detail: &str) -> Response {
    let mut r = problem(StatusCode::SERVICE_UNAVAILABLE, "Unavailable", detail);
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    r
}

/// Endpoint `id`'s route, from the cache or else Postgres (`None`: unknown or deleted).
async fn route_of(
    state: &GatewayState,
    id: Uuid,
) -> Result<Option<Arc<kiln_store::EndpointRoute>>, kiln_store::StoreError> {
    state
        .caches
        .route(id, async {
            Ok(state.store.endpoint_route(id).await?.map(Arc::new))
        })
        .await
}

/// Wait, bounded in number and time, until endpoint `id` has a ready replica that accepts
/// connections (the agent reports a replica running once its container is; the server in it
/// may take a moment more to listen). The route's changes wake the wait (Postgres notices).
async fn hold_for_replica(
    state: &GatewayState,
    id: Uuid,
    org: Uuid,
) -> Result<Arc<kiln_store::EndpointRoute>, Response> {
    let Some(_slot) = state.held.try_start(id, MAX_HELD_PER_ENDPOINT) else {
        return Err(unavailable(
            "too many calls are waiting for this endpoint to start a replica; retry shortly",
        ));
    };
    let started = std::time::Instant::now();
    let deadline = tokio::time::Instant::now() + state.cold_start_timeout;
    let timed_out =
        || unavailable("no replica of this endpoint became ready in time; retry shortly");
    let mut changed = state.caches.watch_route(id);
    loop {
        let route = route_of(state, id).await.map_err(|error| {
            tracing::error!(%error, "endpoint lookup failed");
            unavailable("the gateway cannot reach its database; retry shortly")
        })?;
        let Some(route) = route.filter(|r| r.admits(org)) else {
            return Err(problem(
                StatusCode::NOT_FOUND,
                "Not found",
                "endpoint not found",
            ));
        };
        if let Some(replica) = route.ready.first() {
            let addr = (
                replica.host.clone(),
                u16::try_from(replica.host_port).unwrap_or(0),
            );
            loop {
                if tokio::net::TcpStream::connect(addr.clone()).await.is_ok() {
                    metrics::histogram!("kiln_gateway_cold_start_seconds")
                        .record(started.elapsed().as_secs_f64());
                    return Ok(route);
                }
                if tokio::time::Instant::now() >= deadline {
                    return Err(timed_out());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        tokio::select! {
            woken = changed.changed() => {
                if woken.is_err() {
                    changed = state.caches.watch_route(id);
                }
            }
            // A lost notice costs at most this.
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
            () = tokio::time::sleep_until(deadline) => return Err(timed_out()),
        }
    }
}

/// 402 when the caller's org is out of credit (503 when that cannot be told).
async fn out_of_credit(state: &GatewayState, org: Uuid) -> Option<Response> {
    let load = async {
        let mut conn = state
            .store
            .pool()
            .acquire()
            .await
            .map_err(|e| e.to_string())?;
        kiln_billing::limits::standing(&state.store, &mut conn, org, OffsetDateTime::now_utc())
            .await
            .map(|s| s.is_some())
            .map_err(|e| e.to_string())
    };
    match state.caches.out_of_credit(org, load).await {
        Ok(false) => None,
        Ok(true) => Some(problem(
            StatusCode::PAYMENT_REQUIRED,
            "Payment required",
            "the calling key's org is out of credit; calls resume after a top-up",
        )),
        Err(error) => {
            tracing::error!(%error, "credit check failed");
            Some(unavailable(
                "the gateway cannot check the org's credit; retry shortly",
            ))
        }
    }
}

async fn fallback() -> Response {
    problem(
        StatusCode::NOT_FOUND,
        "Not found",
        "the gateway serves /v1/endpoints/{endpoint}/…",
    )
}

pub fn app(state: GatewayState) -> Router {
    let store = state.store.clone();
    let caches = state.caches.clone();
    let health: kiln_telemetry::HealthCheck = Arc::new(move || {
        let store = store.clone();
        let listening = caches.listening();
        Box::pin(async move {
            store.ping().await.map_err(|e| format!("postgres: {e}"))?;
            if listening {
                Ok(())
            } else {
                Err("not listening for cache invalidations (revocations would be late)".into())
            }
        })
    });
    Router::new()
        .route("/v1/endpoints/{endpoint}", any(endpoint_call))
        .route("/v1/endpoints/{endpoint}/{*path}", any(endpoint_call))
        .fallback(fallback)
        .with_state(state)
        .merge(kiln_telemetry::ops_router("kiln-gateway", health))
        .layer(axum::middleware::from_fn(kiln_telemetry::http_metrics))
        .layer(
            tower_http::trace::TraceLayer::new_for_http().make_span_with(kiln_telemetry::http_span),
        )
}
