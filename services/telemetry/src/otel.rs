//! OpenTelemetry traces, on only when an OTLP endpoint is configured (the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`; OTLP over
//! HTTP/protobuf). Off, no layer is installed and every helper here is a no-op.
//!
//! One workload's work crosses Postgres, not direct calls, so its trace context is carried as a
//! W3C `traceparent` string: stored on the workload by the API, put on the assignment by the
//! scheduler, sent back by the agent in gRPC metadata.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The W3C header (and gRPC metadata key) that carries a trace context.
pub const TRACEPARENT: &str = "traceparent";

/// Whether the environment asks for traces.
pub(crate) fn enabled() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|k| std::env::var(k).is_ok_and(|v| !v.trim().is_empty()))
}

/// A batch exporter to the configured endpoint, named `OTEL_SERVICE_NAME` or `service`.
/// With `endpoint` (the collector's base URL), spans go to its `/v1/traces` whatever the
/// environment says.
pub(crate) fn provider(
    service: &'static str,
    endpoint: Option<&str>,
) -> Result<SdkTracerProvider, String> {
    use opentelemetry_otlp::WithExportConfig as _;
    let mut builder = opentelemetry_otlp::SpanExporter::builder().with_http();
    if let Some(endpoint) = endpoint {
        builder = builder.with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')));
    }
    let exporter = builder.build().map_err(|e| e.to_string())?;
    let name = std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| service.to_string());
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(name)
        .build();
    Ok(SdkTracerProvider::builder()
        .with_resource(resource)
        .with_batch_exporter(exporter)
        .build())
}

/// The `tracing` layer that turns spans into OpenTelemetry spans.
pub(crate) fn layer<S>(
    provider: &SdkTracerProvider,
    service: &'static str,
) -> tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::Tracer>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    tracing_opentelemetry::layer().with_tracer(provider.tracer(service))
}

/// Keeps the exporter alive; dropping it flushes the spans not yet sent and stops the exporter.
/// Hold it in `main` until the binary's graceful shutdown is done.
#[must_use = "dropping the guard stops trace export"]
pub struct TracingGuard {
    pub(crate) provider: Option<SdkTracerProvider>,
}

impl TracingGuard {
    /// Send the spans ended so far now, not at the next batch.
    pub fn flush(&self) {
        if let Some(provider) = &self.provider {
            let _ = provider.force_flush();
        }
    }

    /// Flush and stop the exporter now (idempotent; also done on drop).
    pub fn shutdown(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = provider.force_flush();
            if let Err(e) = provider.shutdown() {
                eprintln!("trace export shutdown: {e}");
            }
        }
    }
}

impl Drop for TracingGuard {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The current span's context as a W3C `traceparent`, or `None` when tracing is off (or the
/// span is not sampled).
pub fn current_traceparent() -> Option<String> {
    let cx = tracing::Span::current().context();
    let mut carrier: HashMap<String, String> = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.remove(TRACEPARENT)
}

/// Make `span` a child of the remote context in `traceparent` (a no-op for an empty or
/// malformed value, or when tracing is off).
pub fn set_remote_parent(span: &tracing::Span, traceparent: &str) {
    if traceparent.is_empty() || span.is_disabled() {
        return;
    }
    let carrier = HashMap::from([(TRACEPARENT.to_string(), traceparent.to_string())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    use opentelemetry::trace::TraceContextExt as _;
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}
