//! What every Kiln service exposes to its operator: `tracing` logs (text or JSON),
//! Prometheus metrics at `GET /metrics`, and the probes `GET /livez`, `GET /readyz` and
//! `GET /healthz`.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

mod otel;

pub use otel::{TRACEPARENT, TracingGuard, current_traceparent, set_remote_parent};

/// Start logging. `RUST_LOG` filters (default `info`); `KILN_LOG_FORMAT=json` for JSON lines.
/// With `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) set, spans are
/// also exported as OpenTelemetry traces over OTLP/HTTP, named `OTEL_SERVICE_NAME` or
/// `service`. Keep the returned guard until shutdown: dropping it flushes the last spans.
pub fn init_tracing(service: &'static str) -> TracingGuard {
    init(service, None)
}

/// [`init_tracing`], exporting traces to the OTLP/HTTP collector at `otlp_endpoint` whatever
/// the environment says (for tests and embedders that cannot set the process environment).
pub fn init_tracing_to(service: &'static str, otlp_endpoint: &str) -> TracingGuard {
    init(service, Some(otlp_endpoint))
}

fn init(service: &'static str, endpoint: Option<&str>) -> TracingGuard {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::{EnvFilter, Layer as _, fmt};
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("KILN_LOG_FORMAT").is_ok_and(|v| v == "json");
    let fmt_layer = if json {
        fmt::layer().json().with_writer(std::io::stderr).boxed()
    } else {
        fmt::layer().with_writer(std::io::stderr).boxed()
    };
    let (provider, otel_error) = if endpoint.is_some() || otel::enabled() {
        match otel::provider(service, endpoint) {
            Ok(p) => (Some(p), None),
            Err(e) => (None, Some(e)),
        }
    } else {
        (None, None)
    };
    let otel_layer = provider.as_ref().map(|p| {
        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
        otel::layer(p, service).with_filter(filter)
    });
    let result = tracing_subscriber::registry()
        .with(fmt_layer.with_filter(filter))
        .with(otel_layer)
        .try_init();
    if result.is_ok() {
        tracing::info!(service, traces = provider.is_some(), "logging started");
        if let Some(error) = otel_error {
            tracing::warn!(%error, "OpenTelemetry export is configured but could not start");
        }
    }
    TracingGuard { provider }
}

/// The span of one HTTP request (for `tower_http`'s `TraceLayer::make_span_with`): at INFO, so
/// it is exported, and a child of the caller's trace when the request carries `traceparent`.
pub fn http_span<B>(req: &axum::http::Request<B>) -> tracing::Span {
    let span = tracing::info_span!(
        "request",
        method = %req.method(),
        uri = %req.uri().path(),
        otel.kind = "server",
    );
    if let Some(parent) = req.headers().get(TRACEPARENT).and_then(|v| v.to_str().ok()) {
        set_remote_parent(&span, parent);
    }
    span
}

/// The process-wide Prometheus recorder (installed once, shared by every server in the process).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets(&[
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
                ])
                .unwrap_or_else(|_| PrometheusBuilder::new());
            match builder.install_recorder() {
                Ok(handle) => handle,
                // Another recorder is installed already: render an empty registry.
                Err(_) => PrometheusBuilder::new().build_recorder().handle(),
            }
        })
        .clone()
}

/// A readiness probe: resolves to `Err(reason)` when a dependency is down.
pub type HealthCheck =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

#[derive(Clone)]
struct Ops {
    service: &'static str,
    handle: PrometheusHandle,
    health: HealthCheck,
}

/// The operator's routes:
///
/// * `GET /livez`: 200 while the process serves HTTP, whatever its dependencies do (a liveness
///   probe: restarting a replica does not bring PostgreSQL back).
/// * `GET /readyz`: 200 `ok` when `health` passes (the service's dependencies are reachable),
///   503 with the reason otherwise (a readiness probe: take the replica out of rotation).
/// * `GET /healthz`: the same check as `/readyz`, kept for `make up` and existing monitors.
/// * `GET /metrics`: Prometheus text format.
pub fn ops_router<S: Clone + Send + Sync + 'static>(
    service: &'static str,
    health: HealthCheck,
) -> Router<S> {
    let ops = Ops {
        service,
        handle: metrics_handle(),
        health,
    };
    Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(healthz))
        .route("/healthz", get(healthz))
        .route("/metrics", get(render_metrics))
        .with_state(ops)
}

async fn livez() -> &'static str {
    "ok\n"
}

async fn healthz(State(ops): State<Ops>) -> Response {
    match (ops.health)().await {
        Ok(()) => (StatusCode::OK, "ok\n").into_response(),
        Err(reason) => {
            tracing::warn!(service = ops.service, %reason, "health check failed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("unhealthy: {reason}\n"),
            )
                .into_response()
        }
    }
}

async fn render_metrics(State(ops): State<Ops>) -> Response {
    metrics::gauge!("kiln_up", "service" => ops.service).set(1.0);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        ops.handle.render(),
    )
        .into_response()
}

/// Middleware: count requests and time them per route template and status.
pub async fn http_metrics(req: Request, next: Next) -> Response {
    let start = Instant::now();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = req.method().as_str().to_owned();
    let resp = next.run(req).await;
    let status = resp.status().as_u16().to_string();
    let labels = [("method", method), ("route", route), ("status", status)];
    metrics::counter!("kiln_http_requests_total", &labels).increment(1);
    metrics::histogram!("kiln_http_request_duration_seconds", &labels)
        .record(start.elapsed().as_secs_f64());
    resp
}

/// Resolves on Ctrl-C or SIGTERM (what systemd, Docker and Kubernetes send), logging which:
/// the graceful-shutdown trigger every Kiln binary uses.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! { () = ctrl_c => {}, () = term => {} }
    tracing::info!("shutting down");
}

/// A graceful shutdown with a bound: `signal` resolves on SIGTERM or Ctrl-C (hand it to
/// `with_graceful_shutdown`, which then stops accepting and lets what is in flight finish);
/// `deadline` resolves `grace` after that, for the caller to stop waiting on calls or streams
/// that are still open.
pub fn shutdown_with_deadline(
    grace: std::time::Duration,
) -> (
    impl Future<Output = ()> + Send + 'static,
    impl Future<Output = ()> + Send + 'static,
) {
    let (tx, mut rx) = tokio::sync::watch::channel(false);
    let signal = async move {
        shutdown_signal().await;
        let _ = tx.send(true);
    };
    let deadline = async move {
        if rx.wait_for(|signalled| *signalled).await.is_err() {
            // The signal future was dropped without firing: no shutdown to bound.
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(grace).await;
    };
    (signal, deadline)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    #[tokio::test]
    async fn healthz_reports_dependency_failures_and_metrics_render() {
        let ok: HealthCheck = Arc::new(|| Box::pin(async { Ok(()) }));
        let bad: HealthCheck =
            Arc::new(|| Box::pin(async { Err("postgres unreachable".to_owned()) }));
        let app: Router = ops_router("test", ok)
            .route("/hello", get(|| async { "hi" }))
            .layer(axum::middleware::from_fn(http_metrics));
        let r = app
            .clone()
            .oneshot(Request::get("/healthz").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let _ = app
            .clone()
            .oneshot(Request::get("/hello").body(Body::empty()).unwrap())
            .await
            .unwrap();
        let r = app
            .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
            .await
            .unwrap();
        let text =
            String::from_utf8(r.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
        assert!(text.contains("kiln_http_requests_total"), "{text}");
        assert!(text.contains("route=\"/hello\""), "{text}");

        let app: Router = ops_router("test", bad);
        let r = app
            .oneshot(Request::get("/healthz").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    }

    async fn get_status(app: &Router, path: &str) -> (StatusCode, String) {
        let r = app
            .clone()
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = r.status();
        let body = r.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn readyz_follows_the_dependencies_and_livez_does_not() {
        let down: HealthCheck =
            Arc::new(|| Box::pin(async { Err("postgres: connection refused".to_owned()) }));
        let app: Router = ops_router("test", down);
        let (status, body) = get_status(&app, "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("postgres: connection refused"), "{body}");
        // A dependency being down is no reason to restart the process.
        assert_eq!(get_status(&app, "/livez").await.0, StatusCode::OK);

        let up: HealthCheck = Arc::new(|| Box::pin(async { Ok(()) }));
        let app: Router = ops_router("test", up);
        assert_eq!(
            get_status(&app, "/readyz").await,
            (StatusCode::OK, "ok\n".into())
        );
        assert_eq!(get_status(&app, "/livez").await.0, StatusCode::OK);
    }
}
