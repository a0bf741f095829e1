//! One trace from the enqueuing span through the handler, with an in-process span exporter.

use super::*;
use crate::{config, JobContext, JobError, Router, Worker};
use opentelemetry::trace::{SpanId, SpanKind, TraceId};
use opentelemetry::Value;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SpanData};
use std::sync::Arc;
use std::time::Duration;
use stevedore_core::MemoryBroker;
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt as _;

/// Fails its first attempt (to be retried), runs a span of its own on the second.
async fn flaky(ctx: JobContext) -> Result<(), JobError> {
    if ctx.attempt == 1 {
        return Err(JobError::retry("first attempt fails"));
    }
    tracing::info_span!("inside_handler").in_scope(|| tracing::info!("working"));
    Ok(())
}

/// Succeeds at once.
async fn steady() {
    tracing::info_span!("inside_handler").in_scope(|| tracing::info!("working"));
}

fn attr<'a>(s: &'a SpanData, key: &str) -> Option<&'a Value> {
    s.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| &kv.value)
}

fn named<'a>(spans: &'a [SpanData], name: &str) -> Vec<&'a SpanData> {
    spans.iter().filter(|s| s.name == name).collect()
}

#[tokio::test(flavor = "current_thread")]
async fn one_trace_from_the_enqueuing_span_through_the_handler_and_a_link_for_a_retry(
) -> Result<(), Box<dyn std::error::Error>> {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    // This thread only (the runtime is current-thread, so every task runs here).
    let _guard = tracing::subscriber::set_default(subscriber);
    enable();

    let cfg = config::from_toml_str(
        "[http]\nenabled = false\n[worker]\npoll_wait = \"50ms\"\n\
         [retry]\nbase = \"10ms\"\ncap = \"20ms\"\nmax_attempts = 3\n",
        None,
    )?;
    let router = Router::new().route("flaky", flaky).route("steady", steady);
    let worker = Worker::new(Arc::new(MemoryBroker::new()), router, cfg)?;
    let client = worker.client();
    let (flaky_id, steady_id) = async {
        let a = client.enqueue("flaky", &1).send().await?;
        let b = client.enqueue("steady", &2).send().await?;
        Ok::<_, crate::EnqueueError>((a, b))
    }
    .instrument(tracing::info_span!("request"))
    .await?;
    let stats = worker.stats();
    let stop = worker.shutdown_handle();
    let run = tokio::spawn(worker.run());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while stats.snapshot().get("default").map_or(0, |q| q.processed) < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "jobs did not finish"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.shutdown();
    run.await??;
    provider.force_flush()?;
    let spans = exporter.get_finished_spans()?;
    let names: Vec<_> = spans.iter().map(|s| s.name.to_string()).collect();

    let request = named(&spans, "request")[0];
    let trace: TraceId = request.span_context.trace_id();
    let sends = named(&spans, "send default");
    assert_eq!(sends.len(), 2, "{names:?}");
    for s in &sends {
        assert_eq!(s.span_kind, SpanKind::Producer);
        assert_eq!(
            s.span_context.trace_id(),
            trace,
            "the publish is in the caller's trace"
        );
        assert_eq!(s.parent_span_id, request.span_context.span_id());
        assert_eq!(
            attr(s, "messaging.operation.type"),
            Some(&Value::from("send"))
        );
    }
    let send_of = |id: &str| {
        sends
            .iter()
            .find(|s| attr(s, "messaging.message.id") == Some(&Value::from(id.to_string())))
            .copied()
            .ok_or_else(|| format!("no send span for {id}: {names:?}"))
    };

    let jobs = named(&spans, "process default");
    let job_of = |id: &str, attempt: i64| {
        jobs.iter()
            .find(|s| {
                attr(s, "messaging.message.id") == Some(&Value::from(id.to_string()))
                    && attr(s, "stevedore.attempt") == Some(&Value::I64(attempt))
            })
            .copied()
            .ok_or_else(|| format!("no job span for {id} attempt {attempt}: {names:?}"))
    };
    let inside = named(&spans, "inside_handler");

    // The first attempt: the publish's child, in the caller's trace, with the messaging
    // attributes; what the handler does is its child.
    let steady_send = send_of(&steady_id)?;
    let steady_job = job_of(&steady_id, 1)?;
    assert_eq!(steady_job.span_kind, SpanKind::Consumer);
    assert_eq!(steady_job.span_context.trace_id(), trace);
    assert_eq!(
        steady_job.parent_span_id,
        steady_send.span_context.span_id()
    );
    assert!(
        steady_job.parent_span_is_remote,
        "the parent came through the message"
    );
    for (k, v) in [
        ("messaging.system", "memory"),
        ("messaging.destination.name", "default"),
        ("messaging.operation.type", "process"),
        ("stevedore.job", "steady"),
    ] {
        assert_eq!(attr(steady_job, k), Some(&Value::from(v)), "{k}");
    }
    assert!(
        inside
            .iter()
            .any(|s| s.parent_span_id == steady_job.span_context.span_id()
                && s.span_context.trace_id() == trace),
        "the handler's own span is the job span's child"
    );

    // The retry: a trace of its own, linked to the publish.
    let flaky_send = send_of(&flaky_id)?;
    let first = job_of(&flaky_id, 1)?;
    assert_eq!(first.parent_span_id, flaky_send.span_context.span_id());
    let retry = job_of(&flaky_id, 2)?;
    assert_ne!(retry.span_context.trace_id(), trace);
    assert_eq!(retry.parent_span_id, SpanId::INVALID, "a root span");
    assert!(
        retry
            .links
            .iter()
            .any(|l| l.span_context.span_id() == flaky_send.span_context.span_id()),
        "linked to the publish: {:?}",
        retry.links
    );
    Ok(())
}

#[test]
fn export_is_asked_for_by_the_standard_variables_only() {
    // Read-only look at this process's environment: none of these is set by the test runner.
    for k in [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_TRACES_EXPORTER",
    ] {
        if std::env::var_os(k).is_some() {
            return;
        }
    }
    assert!(!wanted());
}
