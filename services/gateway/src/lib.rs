//! `kiln-gateway`: the inference entry point, `ANY /v1/endpoints/{endpoint}/{path…}`.
//!
//! Today it authenticates the caller's API key against the same store as `kiln-api` (401 for a
//! missing, invalid, expired or revoked key), refuses calls of an org that is out of credit
//! (402, the billing core's decision on the ledger, as the API refuses new work) and answers 404
//! for endpoints, since endpoints
//! arrive with the endpoints issue; routing to replicas, metering, rate limits and scale-from-zero
//! are built there, behind this same front door.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use clap::Args;
use kiln_auth::{ApiKeySecret, SecretDigest};
use kiln_store::Store;

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
}

#[derive(Clone)]
pub struct GatewayState {
    pub store: Store,
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
    headers: HeaderMap,
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
    let key = match state
        .store
        .api_key_authenticate(&SecretDigest::of(&token))
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
            return problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "Unavailable",
                "the gateway cannot reach its database; retry shortly",
            );
        }
    };
    if let Some(refusal) = out_of_credit(&state, key.org_id.as_uuid()).await {
        return refusal;
    }
    let endpoint = params.first().map(|(_, v)| v.as_str()).unwrap_or_default();
    tracing::debug!(endpoint, "unknown endpoint");
    problem(StatusCode::NOT_FOUND, "Not found", "endpoint not found")
}

/// 402 when the caller's org is out of credit (503 when that cannot be told).
async fn out_of_credit(state: &GatewayState, org: uuid::Uuid) -> Option<Response> {
    let standing = match state.store.pool().acquire().await {
        Ok(mut conn) => kiln_billing::limits::standing(
            &state.store,
            &mut conn,
            org,
            time::OffsetDateTime::now_utc(),
        )
        .await
        .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    match standing {
        Ok(None) => None,
        Ok(Some(_)) => Some(problem(
            StatusCode::PAYMENT_REQUIRED,
            "Payment required",
            "the endpoint's org is out of credit; calls resume after a top-up",
        )),
        Err(error) => {
            tracing::error!(%error, "credit check failed");
            Some(problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "Unavailable",
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
    let health: kiln_telemetry::HealthCheck = Arc::new(move || {
        let store = store.clone();
        Box::pin(async move { store.ping().await.map_err(|e| format!("postgres: {e}")) })
    });
    Router::new()
        .route("/v1/endpoints/{endpoint}", any(endpoint_call))
        .route("/v1/endpoints/{endpoint}/{*path}", any(endpoint_call))
        .fallback(fallback)
        .with_state(state)
        .merge(kiln_telemetry::ops_router("kiln-gateway", health))
        .layer(axum::middleware::from_fn(kiln_telemetry::http_metrics))
        .layer(tower_http::trace::TraceLayer::new_for_http())
}
