//! Scenario 18, foreign messages. Broker half: a message written by a plain client of the broker,
//! without our headers, is received with no job name, its body intact and a stable id. Runtime
//! half: the worker hands such a message to the queue's `default_job` handler, and dead-letters it
//! with a reason on a queue without one.

use super::runtime::{
    batch_for, dead_letters, physical, queue_toml, wait_drained, wait_for, worker_toml, Log,
    Running,
};
use crate::backend::Backend;
use crate::names::unique;
use crate::support::{
    close, collect, ensure, expect_empty, handle, millis, pass, receipts, secs, skip, Checked,
    Context,
};
use std::collections::BTreeMap;
use std::sync::Arc;
use stevedore::{JobContext, Payload, Router, State};
use stevedore_core::{names, Delivery, Priority};

/// The runtime half's default job.
const DEFAULT_JOB: &str = "conformance.ingest";

const BODIES: [&[u8]; 2] = [
    br#"{"event":"signup","user":42}"#,
    "plain text from another system: ünïcödé".as_bytes(),
];

/// Writes two bodies through [`Backend::publish_foreign`], receives them (job `None`, body byte for
/// byte, a non-empty id, two distinct ids, delivery_count 1 and attempt() 1, no `stevedore-*`
/// header), releases them and receives them again with the same ids and delivery_count 2, then
/// acks. Then the runtime half, [`runtime_half`].
pub(crate) async fn foreign_messages(backend: Arc<dyn Backend>) -> Checked {
    let queue = unique("foreign");
    let h = handle(&backend, &[&queue]).await?;
    for body in BODIES {
        if let Err(reason) = backend.publish_foreign(&queue, body).await {
            close(&[&h]).await;
            return skip(format!(
                "backend cannot write a plain client's message: {reason}"
            ));
        }
    }
    let first = collect(&h, &queue, BODIES.len(), secs(30), secs(15)).await?;
    let ids = check(&first, 1)?;
    h.release(&receipts(&first))
        .await
        .ctx("release the foreign messages")?;
    let again = collect(&h, &queue, BODIES.len(), secs(30), secs(15)).await?;
    let ids_again = check(&again, 2)?;
    ensure!(
        ids == ids_again,
        "foreign message ids changed across redelivery: {ids:?} then {ids_again:?}"
    );
    h.ack(&receipts(&again))
        .await
        .ctx("ack the foreign messages")?;
    expect_empty(&h, &queue, secs(1), "both foreign messages were acked").await?;
    close(&[&h]).await;
    let runtime = runtime_half(&backend)
        .await
        .map_err(|e| format!("runtime: {e}"))?;
    pass(format!(
        "{} plain-client messages received with job None, bodies intact, ids stable across a \
         release ({}); runtime: {runtime}",
        BODIES.len(),
        ids.values().cloned().collect::<Vec<_>>().join(", ")
    ))
}

async fn ingest(State(log): State<Log>, ctx: JobContext, Payload(body): Payload) {
    let i = log.start(&ctx, body);
    log.end(i);
}

/// One worker serves two queues: one with `default_job` set, one without. A plain client writes
/// `BODIES[0]` to the first and `BODIES[1]` to the second. The default handler must run once with
/// the exact body, as its job, at attempt 1; the second message must land in that queue's DLQ with
/// its body intact, attempts 1, and a reason saying it has no job name and the queue no
/// default_job; both queues end empty and nothing else is dead-lettered.
async fn runtime_half(backend: &Arc<dyn Backend>) -> Result<String, String> {
    let with = unique("foreign-dj");
    let without = unique("foreign-nodj");
    let mut queues = physical(&with, &[Priority::Normal]);
    queues.extend(physical(&without, &[Priority::Normal]));
    let refs: Vec<&str> = queues.iter().map(String::as_str).collect();
    let p = handle(backend, &refs).await?;
    let batch = batch_for(p.capabilities(), 2);
    let default_job = format!("default_job = \"{DEFAULT_JOB}\"");
    let toml = worker_toml(
        &unique("w-foreign"),
        4,
        secs(1),
        &[
            queue_toml(&with, 2, batch, &[&default_job]),
            queue_toml(&without, 2, batch, &[]),
        ],
    );
    let log = Log::default();
    let mut w = Running::start(
        backend,
        Router::with_state(log.clone()).route(DEFAULT_JOB, ingest),
        &toml,
    )
    .await?;
    for (queue, body) in [(&with, BODIES[0]), (&without, BODIES[1])] {
        backend
            .publish_foreign(queue, body)
            .await
            .map_err(|e| format!("publish_foreign to {queue}: {e}"))?;
    }
    wait_for(
        secs(10),
        || log.count(|_| true) >= 1 && w.snapshot(&without).dead_lettered >= 1,
        || {
            format!(
                "default handler runs {}, dead letters on the queue without default_job {}",
                log.count(|_| true),
                w.snapshot(&without).dead_lettered
            )
        },
    )
    .await?;
    let letters = dead_letters(&p, &without, 1, secs(5)).await?;
    let stopped = w.stop(secs(5)).await?;
    ensure!(stopped.report.drained, "run() reported drained = false");
    let runs = log.runs();
    ensure!(
        runs.len() == 1,
        "the default handler ran {} times (expected once, for the one message on {with})",
        runs.len()
    );
    let r = &runs[0];
    ensure!(
        r.queue == with && r.job == DEFAULT_JOB && r.attempt == 1,
        "the default handler ran on queue {} as job {:?} attempt {} (expected {with}, \
         {DEFAULT_JOB:?}, 1)",
        r.queue,
        r.job,
        r.attempt
    );
    ensure!(
        r.body.as_ref() == BODIES[0],
        "the default handler got {} bytes that differ from the {} written",
        r.body.len(),
        BODIES[0].len()
    );
    let dl = &letters[0];
    ensure!(
        dl.envelope.payload.as_ref() == BODIES[1] && dl.envelope.job.is_none(),
        "the dead-lettered foreign message changed: job {:?}, {} bytes",
        dl.envelope.job,
        dl.envelope.payload.len()
    );
    ensure!(
        dl.attempts == 1 && dl.origin == without,
        "dead letter attempts {} origin {:?} (expected 1, {without:?})",
        dl.attempts,
        dl.origin
    );
    ensure!(
        dl.error.contains("no job name") && dl.error.contains("default_job"),
        "dead letter reason {:?} does not say the message has no job name and the queue no \
         default_job",
        dl.error
    );
    let st = w.snapshot(&with);
    ensure!(
        st.processed == 1 && st.dead_lettered == 0,
        "stats of {with}: {st:?}; expected processed 1, dead_lettered 0"
    );
    wait_drained(&p, &with, millis(500)).await?;
    wait_drained(&p, &names::dead_letter(&with), millis(500)).await?;
    wait_drained(&p, &without, millis(500)).await?;
    close(&[&p]).await;
    Ok(format!(
        "default_job {DEFAULT_JOB} handled the plain-client body byte for byte; without \
         default_job it went to the DLQ: {:?}",
        dl.error
    ))
}

/// Checks one round of deliveries; returns body index → id.
fn check(got: &[Delivery], count: u32) -> Result<BTreeMap<usize, String>, String> {
    let mut ids = BTreeMap::new();
    for d in got {
        let env = &d.envelope;
        let Some(i) = BODIES.iter().position(|b| env.payload.as_ref() == *b) else {
            return Err(format!(
                "foreign message {} arrived with a body of {} bytes matching neither body sent",
                env.id,
                env.payload.len()
            ));
        };
        ensure!(
            env.job.is_none(),
            "foreign message {i} arrived with job {:?}",
            env.job
        );
        ensure!(
            !env.id.is_empty(),
            "foreign message {i} arrived without an id"
        );
        ensure!(
            d.delivery_count == count && d.attempt() == count,
            "foreign message {i}: delivery_count {} and attempt() {} on delivery {count}",
            d.delivery_count,
            d.attempt()
        );
        let ours: Vec<&String> = env
            .headers
            .keys()
            .filter(|k| k.starts_with("stevedore-"))
            .collect();
        ensure!(
            ours.is_empty(),
            "foreign message {i} carries headers {ours:?}"
        );
        ensure!(
            ids.insert(i, env.id.clone()).is_none(),
            "body {i} arrived twice in one round"
        );
    }
    let distinct: std::collections::HashSet<&String> = ids.values().collect();
    ensure!(
        distinct.len() == ids.len(),
        "two foreign messages share the id {ids:?}"
    );
    Ok(ids)
}
