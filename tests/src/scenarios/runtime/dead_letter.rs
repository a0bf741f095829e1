//! Scenario 9, dead letter: exhausted retries, a permanent error, a malformed payload and an
//! unknown job name each land in the DLQ once, payload intact, with the standard headers, and the
//! worker keeps going.

use super::{
    batch_for, dead_letters, enqueue, no_delay, producer, queue_toml, wait_drained, wait_for,
    worker_toml, Log, Running,
};
use crate::backend::Backend;
use crate::names::unique;
use crate::support::{close, ensure, millis, pass, s2, secs, skip, Checked, Context};
use bytes::Bytes;
use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use stevedore::dlq::{self, DeadLetter, Select};
use stevedore::{JobContext, JobError, Json, Payload, Router, State};
use stevedore_core::{names, to_millis, Priority};

const ALWAYS: &str = "conformance.always_fails";
const REFUSES: &str = "conformance.refuses";
const TYPED: &str = "conformance.typed";
const UNKNOWN: &str = "conformance.no_such_job";
const ALWAYS_TEXT: &str = "downstream unavailable";
const PERMANENT_TEXT: &str = "refused for good: bad input";
/// Not JSON at all: the object is cut off.
const MALFORMED: &[u8] = b"{\"order\": 7";
const MAX_ATTEMPTS: u32 = 3;
const BASE: Duration = Duration::from_millis(100);
/// Timestamps travel in whole milliseconds.
const MS: Duration = Duration::from_millis(2);

/// The payload of [`TYPED`] jobs.
#[derive(serde::Deserialize)]
struct Order {
    order: u64,
}

async fn always_fails(
    State(log): State<Log>,
    ctx: JobContext,
    Payload(body): Payload,
) -> Result<(), JobError> {
    let i = log.start(&ctx, body);
    log.end(i);
    Err(JobError::retry(format!(
        "{ALWAYS_TEXT} (attempt {})",
        ctx.attempt
    )))
}

async fn refuses(
    State(log): State<Log>,
    ctx: JobContext,
    Payload(body): Payload,
) -> Result<(), JobError> {
    let i = log.start(&ctx, body);
    log.end(i);
    Err(JobError::permanent(PERMANENT_TEXT))
}

async fn typed(State(log): State<Log>, ctx: JobContext, Json(order): Json<Order>) {
    let i = log.start(&ctx, Bytes::from(order.order.to_string()));
    log.end(i);
}

/// One worker on one queue (`max_attempts` 3, backoff 100-200 ms, concurrency 4) with three
/// handlers. Enqueued together: a job whose handler always fails, one whose handler returns
/// `JobError::permanent`, a `Json<Order>` job whose payload is cut-off JSON, and a job whose name
/// has no handler. Once the worker counts 4 dead letters, a valid `Json<Order>` job follows and
/// must be processed (the worker survived). Checks: the failing handler ran exactly 3 times
/// (attempts 1, 2, 3), the permanent one once, the typed handler only for the valid job; the DLQ
/// holds exactly the 4 messages, each with its original id, job name and payload bytes, origin =
/// the queue, worker = the worker's id, first ≤ last failure (both after the enqueue; for the
/// retried job at least two backoffs apart), attempts 3 / 1 / 1 / 1, and an error naming the
/// handler's text, the decode error, or the unknown job; stats dead_lettered 4, retried 2,
/// processed 1; the queue ends empty; `dlq::purge` then removes all 4.
pub(crate) async fn dead_letter(backend: Arc<dyn Backend>) -> Checked {
    let queue = unique("dead");
    let p = producer(&backend, &queue, &[Priority::Normal]).await?;
    if let Some(why) = no_delay(&p) {
        close(&[&p]).await;
        return skip(why);
    }
    let caps = p.capabilities().clone();
    let retry = format!(
        "retry = {{ max_attempts = {MAX_ATTEMPTS}, base = \"{}ms\", factor = 2.0, cap = \"{}ms\" }}",
        BASE.as_millis(),
        (BASE * 2).as_millis()
    );
    let toml = worker_toml(
        &unique("w-dead"),
        4,
        secs(1),
        &[queue_toml(&queue, 4, batch_for(&caps, 4), &[&retry])],
    );
    let log = Log::default();
    let router = Router::with_state(log.clone())
        .route(ALWAYS, always_fails)
        .route(REFUSES, refuses)
        .route(TYPED, typed);
    let mut w = Running::start(&backend, router, &toml).await?;
    let client = stevedore::Client::new(p.clone());

    let t0 = SystemTime::now();
    let mut sent: HashMap<String, (&str, Bytes)> = HashMap::new();
    for (job, payload) in [
        (ALWAYS, json!({"case": "always fails"})),
        (REFUSES, json!({"case": "permanent"})),
        (UNKNOWN, json!({"case": "unknown job"})),
    ] {
        let id = enqueue(&client, &queue, job, &payload, Priority::Normal).await?;
        let bytes = serde_json::to_vec(&payload).map_err(|e| e.to_string())?;
        sent.insert(id, (job, Bytes::from(bytes)));
    }
    let malformed_id = client
        .enqueue_bytes(TYPED, MALFORMED)
        .queue(&queue)
        .send()
        .await
        .map_err(|e| format!("enqueue the malformed payload: {e}"))?;
    sent.insert(malformed_id.clone(), (TYPED, Bytes::from_static(MALFORMED)));

    let within = secs(10) + super::delay_slack(&p) * 2;
    wait_for(
        within,
        || w.snapshot(&queue).dead_lettered >= 4,
        || {
            format!(
                "the worker dead-lettered {} of 4 messages",
                w.snapshot(&queue).dead_lettered
            )
        },
    )
    .await?;
    let valid_id = enqueue(
        &client,
        &queue,
        TYPED,
        &json!({"order": 7}),
        Priority::Normal,
    )
    .await?;
    wait_for(
        secs(10),
        || w.snapshot(&queue).processed >= 1,
        || {
            format!(
                "a valid job after the malformed one was not processed: stats {:?}",
                w.snapshot(&queue)
            )
        },
    )
    .await?;
    let letters = dead_letters(&p, &queue, 4, secs(5)).await?;
    let stopped = w.stop(secs(5)).await?;
    ensure!(
        stopped.report.drained,
        "run() reported drained = false with nothing in flight"
    );
    let t1 = SystemTime::now();

    // Handler runs.
    let runs = log.runs();
    let always: Vec<u32> = runs
        .iter()
        .filter(|r| r.job == ALWAYS)
        .map(|r| r.attempt)
        .collect();
    ensure!(
        always == [1, 2, 3],
        "the always-failing handler ran with attempts {always:?}; expected exactly [1, 2, 3] \
         (max_attempts {MAX_ATTEMPTS})"
    );
    let refused = runs.iter().filter(|r| r.job == REFUSES).count();
    ensure!(
        refused == 1,
        "the handler returning a permanent error ran {refused} times; expected once"
    );
    let typed_runs: Vec<&str> = runs
        .iter()
        .filter(|r| r.job == TYPED)
        .map(|r| r.id.as_str())
        .collect();
    ensure!(
        typed_runs == [valid_id.as_str()],
        "the Json<Order> handler ran for {typed_runs:?}; expected only the valid job {valid_id} \
         (the malformed one must never reach it)"
    );

    // Dead letters.
    let decode_error = match serde_json::from_slice::<Order>(MALFORMED) {
        Err(e) => e.to_string(),
        Ok(_) => return Err("the malformed test payload decodes".into()),
    };
    let mut seen = Vec::new();
    for dl in &letters {
        let id = &dl.envelope.id;
        let Some((job, payload)) = sent.get(id) else {
            return Err(format!(
                "dead letter {id} (job {:?}) is none of the 4 messages expected there",
                dl.envelope.job
            ));
        };
        check_letter(dl, job, payload, &queue, &w.id, t0, t1)?;
        let (attempts, needle): (u32, &str) = match *job {
            ALWAYS => (MAX_ATTEMPTS, ALWAYS_TEXT),
            REFUSES => (1, PERMANENT_TEXT),
            UNKNOWN => (1, UNKNOWN),
            _ => (1, decode_error.as_str()),
        };
        ensure!(
            dl.attempts == attempts,
            "dead letter of {job}: attempts {} (expected {attempts})",
            dl.attempts
        );
        ensure!(
            dl.error.contains(needle),
            "dead letter of {job}: error {:?} does not mention {needle:?}",
            dl.error
        );
        if *job == ALWAYS {
            ensure!(
                dl.error.contains(&format!("attempt {MAX_ATTEMPTS}")),
                "dead letter of {job}: error {:?} is not the last attempt's",
                dl.error
            );
            let (first, last) = (dl.first_failure, dl.last_failure);
            let apart = match (first, last) {
                (Some(f), Some(l)) => l.duration_since(f).unwrap_or_default(),
                _ => Duration::ZERO,
            };
            ensure!(
                apart + MS >= BASE * 2,
                "dead letter of {job}: first and last failure only {} apart, less than two \
                 backoffs ({})",
                s2(apart),
                s2(BASE * 2)
            );
        }
        if id == &malformed_id {
            ensure!(
                dl.error.contains("malformed payload"),
                "dead letter of the malformed payload: error {:?} does not say so",
                dl.error
            );
        }
        seen.push(*job);
    }
    seen.sort_unstable();
    seen.dedup();
    ensure!(
        seen.len() == 4,
        "the 4 dead letters are not one per case: {seen:?}"
    );
    let st = w.snapshot(&queue);
    ensure!(
        st.dead_lettered == 4 && st.retried == 2 && st.processed == 1,
        "stats {st:?}; expected dead_lettered 4, retried 2, processed 1"
    );
    wait_drained(&p, &queue, millis(500)).await?;
    let purged = dlq::purge(&p, &queue, &Select::All, 100)
        .await
        .ctx("dlq::purge")?;
    ensure!(purged == 4, "dlq::purge removed {purged} of 4 dead letters");
    wait_drained(&p, &names::dead_letter(&queue), millis(500)).await?;
    close(&[&p]).await;
    pass(format!(
        "always-failing: 3 runs then DLQ (attempts 3, last error kept); permanent: 1 run; \
         malformed JSON: 0 handler runs, decode error recorded, next job processed; unknown job \
         named; payloads, ids, origin, worker {} and timestamps intact; purged",
        w.id
    ))
}

/// The checks every dead letter shares.
fn check_letter(
    dl: &DeadLetter,
    job: &str,
    payload: &Bytes,
    queue: &str,
    worker: &str,
    t0: SystemTime,
    t1: SystemTime,
) -> Result<(), String> {
    ensure!(
        dl.envelope.job.as_deref() == Some(job),
        "dead letter of {job} arrived as job {:?}",
        dl.envelope.job
    );
    ensure!(
        dl.envelope.payload == *payload,
        "dead letter of {job}: payload changed ({} bytes, {} sent)",
        dl.envelope.payload.len(),
        payload.len()
    );
    ensure!(
        dl.origin == queue,
        "dead letter of {job}: origin {:?}, expected {queue:?}",
        dl.origin
    );
    ensure!(
        dl.worker == worker,
        "dead letter of {job}: worker {:?}, expected {worker:?}",
        dl.worker
    );
    let (Some(first), Some(last)) = (dl.first_failure, dl.last_failure) else {
        return Err(format!(
            "dead letter of {job}: first/last failure missing ({:?} / {:?})",
            dl.first_failure, dl.last_failure
        ));
    };
    ensure!(
        first <= last,
        "dead letter of {job}: first failure {} after last failure {}",
        to_millis(first),
        to_millis(last)
    );
    ensure!(
        to_millis(first) >= to_millis(t0) && to_millis(last) <= to_millis(t1),
        "dead letter of {job}: failures at {}..{} ms, outside the scenario's {}..{} ms",
        to_millis(first),
        to_millis(last),
        to_millis(t0),
        to_millis(t1)
    );
    Ok(())
}
