//! `kiln-api`: the public API of Kiln.
//!
//! One process serves three surfaces over one set of operations ([`ops`]):
//! REST under `/v1` with its OpenAPI document at `/openapi.json` ([`rest`]), GraphQL at
//! `/graphql` ([`graphql`]), and the server-rendered web console at `/` ([`console`]).
//! Every tenant-scoped operation goes through `Store::authorize`, the one gate to tenant data.

pub mod config;
pub mod console;
pub mod error;
pub mod fanout;
pub mod graphql;
pub mod live;
pub mod ops;
pub mod pdf;
pub mod rest;
pub mod state;
pub mod views;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use kiln_ratelimit::RateLimiter;
use kiln_store::Store;
use tokio::net::TcpListener;

pub use config::ApiConfig;
pub use state::AppState;

/// Connect to Postgres and Redis and build the state (migrations must already be applied).
pub async fn connect(config: ApiConfig) -> anyhow::Result<AppState> {
    let store = Store::connect(&config.database_url, config.db_max_connections).await?;
    let limiter = RateLimiter::connect(&config.redis_url, &config.redis_namespace).await?;
    AppState::new(store, limiter, config).await
}

/// The whole HTTP application.
pub fn app(state: AppState) -> Router {
    let health_state = state.clone();
    let health: kiln_telemetry::HealthCheck = Arc::new(move || {
        let s = health_state.clone();
        Box::pin(async move { s.store.ping().await.map_err(|e| format!("postgres: {e}")) })
    });
    let max_body = state.config.max_body_bytes;
    Router::new()
        .merge(rest::router())
        .merge(graphql::router())
        .merge(console::router())
        .fallback(rest::not_found)
        .method_not_allowed_fallback(rest::method_not_allowed)
        .with_state(state)
        .merge(kiln_telemetry::ops_router("kiln-api", health))
        .layer(DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::from_fn(kiln_telemetry::http_metrics))
        .layer(
            tower_http::trace::TraceLayer::new_for_http().make_span_with(kiln_telemetry::http_span),
        )
}

/// Periodic upkeep every replica runs: key rotation and forgetting old idempotency records.
pub fn spawn_upkeep(state: AppState) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tick.tick().await;
            if let Err(error) = state.rotate_and_reload_keys().await {
                tracing::warn!(%error, "signing key upkeep failed");
            }
            match state
                .store
                .idempotency_purge(time::Duration::hours(24))
                .await
            {
                Ok(n) if n > 0 => tracing::info!(purged = n, "forgot old idempotency keys"),
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "idempotency purge failed"),
            }
        }
    })
}

/// Serve until the future `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let upkeep = spawn_upkeep(state.clone());
    let (subscribed, ready) = tokio::sync::oneshot::channel();
    let listener_task = state.fanout.spawn_listener(state.clone(), subscribed);
    // Serve once invalidations from other replicas are heard (or carry on after a bound: the
    // caches' TTLs cover a Redis that is down).
    if tokio::time::timeout(Duration::from_secs(2), ready)
        .await
        .is_err()
    {
        tracing::warn!("not subscribed to invalidations yet; serving anyway");
    }
    let stopping = state.clone();
    let app = app(state).into_make_service_with_connect_info::<std::net::SocketAddr>();
    // On shutdown, live streams (pod events and logs) end first, so open consoles and `-f`
    // followers do not hold the drain open; requests in flight finish.
    let shutdown = async move {
        shutdown.await;
        stopping.begin_shutdown();
    };
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await;
    upkeep.abort();
    listener_task.abort();
    result
}
