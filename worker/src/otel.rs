//! OpenTelemetry traces across the queue (the `otel` feature).
//!
//! With it, a trace continues from the code that enqueues a job to the handler that runs it, on
//! every broker: the client publishes inside a `send {queue}` span (kind producer) and writes
//! that span's W3C `traceparent` into the message ([`crate::Envelope::trace_parent`], carried in
//! the broker's headers); the worker's `process {queue}` span (kind consumer) of the first
//! attempt is its child, and a retry's span starts a trace of its own with a link to it (a retry
//! is a new unit of work, often much later). Both spans carry the OpenTelemetry messaging
//! attributes: `messaging.system` (the backend), `messaging.destination.name` (the logical
//! queue), `messaging.operation.type` and `.name`, `messaging.message.id`, plus
//! `stevedore.job` and `stevedore.attempt`.
//!
//! [`crate::App`] exports the spans by OTLP (HTTP/protobuf) when the standard variables ask for
//! it: `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set, or
//! `OTEL_TRACES_EXPORTER=otlp`; `OTEL_SDK_DISABLED=true` turns it off. The service name is
//! `OTEL_SERVICE_NAME` (resource attributes from `OTEL_RESOURCE_ATTRIBUTES`). A binary that
//! installs its own `tracing-opentelemetry` layer calls [`enable`] instead.
//!
//! Without an OpenTelemetry layer (the default), none of this runs: the job span stays what it is
//! without the feature, and nothing is written into messages.

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use stevedore_core::Envelope;
use tracing_opentelemetry::OpenTelemetrySpanExt;

static ENABLED: AtomicBool = AtomicBool::new(false);
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Turns trace propagation on for this process: call it once after installing your own
/// `tracing-opentelemetry` layer ([`crate::App`] does it for you when it exports). Thread-safe,
/// idempotent.
pub fn enable() {
    ENABLED.store(true, Ordering::Release);
}

/// Whether [`enable`] was called.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Acquire)
}

/// Whether the standard OpenTelemetry variables ask for OTLP trace export.
fn wanted() -> bool {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    if var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return false;
    }
    var("OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
        || var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some()
        || var("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("otlp"))
}

/// The layer [`crate::App`] adds to its subscriber when the environment asks for export: spans
/// go by OTLP/HTTP in batches. `Err` says why the exporter cannot be built (the app then logs
/// without it).
pub(crate) fn layer_from_env<S>() -> Result<Option<impl tracing_subscriber::Layer<S>>, String>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    if !wanted() {
        return Ok(None);
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
        .map_err(|e| format!("cannot build the OTLP span exporter: {e}"))?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .build();
    let tracer = provider.tracer("stevedore");
    let _ = PROVIDER.set(provider);
    enable();
    Ok(Some(tracing_opentelemetry::layer().with_tracer(tracer)))
}

/// Sends the spans still buffered (at exit).
pub(crate) fn flush() {
    if let Some(p) = PROVIDER.get() {
        if let Err(e) = p.shutdown() {
            eprintln!("warning: OpenTelemetry spans may be lost: {e}");
        }
    }
}

fn traceparent(cx: &opentelemetry::Context) -> Option<String> {
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(cx, &mut carrier);
    carrier.remove("traceparent")
}

/// The producer span of one publish, with its messaging attributes; sets the `traceparent` of
/// every envelope that has none to this span's.
pub(crate) fn publish_span(system: &str, queue: &str, envelopes: &mut [Envelope]) -> tracing::Span {
    let span = tracing::info_span!("publish", otel.kind = "producer", otel.name = %format!("send {queue}"));
    span.set_attribute("messaging.system", system.to_string());
    span.set_attribute("messaging.destination.name", queue.to_string());
    span.set_attribute("messaging.operation.type", "send");
    span.set_attribute("messaging.operation.name", "send");
    match &*envelopes {
        [one] => {
            span.set_attribute("messaging.message.id", one.id.clone());
            if let Some(job) = &one.job {
                span.set_attribute("stevedore.job", job.clone());
            }
        }
        many => {
            span.set_attribute("messaging.batch.message_count", many.len() as i64);
        }
    }
    if let Some(tp) = traceparent(&span.context()) {
        for e in envelopes.iter_mut().filter(|e| e.trace_parent.is_none()) {
            e.trace_parent = Some(tp.clone());
        }
    }
    span
}

/// The consumer span of one job run: the producer's child on the first attempt, linked to it on
/// a retry; with its messaging attributes.
pub(crate) fn job_span(
    system: &str,
    queue: &str,
    job: &str,
    env: &Envelope,
    attempt: u32,
) -> tracing::Span {
    let span = tracing::info_span!("job", queue = %queue, job = %job, id = %env.id, attempt, otel.kind = "consumer", otel.name = %format!("process {queue}"));
    if let Some(tp) = &env.trace_parent {
        let carrier = HashMap::from([("traceparent".to_string(), tp.clone())]);
        let cx = TraceContextPropagator::new().extract(&carrier);
        let remote = cx.span().span_context().clone();
        if remote.is_valid() {
            if attempt <= 1 {
                let _ = span.set_parent(cx);
            } else {
                span.add_link(remote);
            }
        }
    }
    span.set_attribute("messaging.system", system.to_string());
    span.set_attribute("messaging.destination.name", queue.to_string());
    span.set_attribute("messaging.operation.type", "process");
    span.set_attribute("messaging.operation.name", "process");
    span.set_attribute("messaging.message.id", env.id.clone());
    span.set_attribute("stevedore.job", job.to_string());
    span.set_attribute("stevedore.attempt", i64::from(attempt));
    span
}

#[cfg(test)]
mod tests;
