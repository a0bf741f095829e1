//! Scenario 8, retry with backoff: a handler failing on attempts 1 and 2 and succeeding on 3 runs
//! exactly three times, with gaps that follow the configured backoff, and never reaches the DLQ.

use super::{
    batch_for, delay_slack, enqueue, no_delay, producer, queue_toml, wait_drained, wait_for,
    worker_toml, Log, Running,
};
use crate::backend::Backend;
use crate::names::unique;
use crate::support::{close, ensure, millis, pass, s2, secs, skip, Checked, Context};
use std::sync::Arc;
use std::time::Duration;
use stevedore::{dlq, JobContext, JobError, Payload, Router, State};
use stevedore_core::{names, Priority};

const JOB: &str = "conformance.flaky";
/// Backoff floor (and first ceiling); the second retry's ceiling is `BASE × FACTOR`.
const BASE: Duration = Duration::from_millis(300);
const FACTOR: u32 = 2;
const CAP: Duration = Duration::from_millis(600);
/// `not_before` travels in whole milliseconds and may be compared on another clock.
const EARLY_MARGIN: Duration = Duration::from_millis(50);
/// Scheduling slack on top of the backend's declared delay tolerance and the worker's idle poll.
const SLACK: Duration = Duration::from_millis(300);

async fn flaky(
    State(log): State<Log>,
    ctx: JobContext,
    Payload(body): Payload,
) -> Result<(), JobError> {
    let i = log.start(&ctx, body);
    log.end(i);
    if ctx.attempt < 3 {
        return Err(JobError::retry(format!(
            "transient failure on attempt {}",
            ctx.attempt
        )));
    }
    Ok(())
}

/// One job whose handler fails attempts 1 and 2 (retryable) and succeeds on 3, with retry
/// `base` 300 ms, `factor` 2, `cap` 600 ms, `max_attempts` 5. Checks: exactly three runs of the same
/// id with attempts 1, 2, 3; each gap between runs at least `base` − 50 ms and at most the backoff
/// ceiling of that retry (300 ms, then 600 ms) plus the declared delay tolerance, the idle poll and
/// 300 ms; stats `processed` 1, `retried` 2, `dead_lettered` 0; the worker drains on shutdown; the
/// queue and its DLQ end empty (by depth and by `dlq::list`).
pub(crate) async fn retry_backoff(backend: Arc<dyn Backend>) -> Checked {
    let queue = unique("retry");
    let p = producer(&backend, &queue, &[Priority::Normal]).await?;
    if let Some(why) = no_delay(&p) {
        close(&[&p]).await;
        return skip(why);
    }
    let caps = p.capabilities().clone();
    let retry = format!(
        "retry = {{ max_attempts = 5, base = \"{}ms\", factor = {FACTOR}.0, cap = \"{}ms\" }}",
        BASE.as_millis(),
        CAP.as_millis()
    );
    let toml = worker_toml(
        &unique("w-retry"),
        2,
        secs(1),
        &[queue_toml(&queue, 2, batch_for(&caps, 2), &[&retry])],
    );
    let log = Log::default();
    let mut w = Running::start(
        &backend,
        Router::with_state(log.clone()).route(JOB, flaky),
        &toml,
    )
    .await?;
    let client = stevedore::Client::new(p.clone());
    let id = enqueue(
        &client,
        &queue,
        JOB,
        &serde_json::json!({"n": 1}),
        Priority::Normal,
    )
    .await?;
    let slack = delay_slack(&p) + SLACK;
    let within = BASE + CAP + slack * 2 + secs(5);
    wait_for(
        within,
        || w.snapshot(&queue).processed >= 1,
        || {
            format!(
                "the job did not succeed: {} run(s) recorded, stats {:?}",
                log.count(|_| true),
                w.snapshot(&queue)
            )
        },
    )
    .await?;
    let stopped = w.stop(secs(5)).await?;
    ensure!(
        stopped.report.drained,
        "run() reported drained = false with nothing in flight"
    );

    let runs = log.runs();
    let attempts: Vec<u32> = runs.iter().map(|r| r.attempt).collect();
    ensure!(
        attempts == [1, 2, 3],
        "expected 3 runs with attempts [1, 2, 3], got {} with attempts {attempts:?}",
        runs.len()
    );
    ensure!(
        runs.iter().all(|r| r.id == id),
        "the retries ran under other ids: {:?} (enqueued {id})",
        runs.iter().map(|r| r.id.as_str()).collect::<Vec<_>>()
    );
    let mut gaps = Vec::new();
    for (n, pair) in runs.windows(2).enumerate() {
        let gap = pair[1].started - pair[0].started;
        let ceiling = (BASE * FACTOR.pow(n as u32)).min(CAP);
        ensure!(
            gap + EARLY_MARGIN >= BASE,
            "attempt {} ran only {} after attempt {}: earlier than the backoff floor {}",
            n + 2,
            s2(gap),
            n + 1,
            s2(BASE)
        );
        ensure!(
            gap <= ceiling + slack,
            "attempt {} ran {} after attempt {}: later than the backoff ceiling {} + slack {} \
             (declared delay tolerance {}, idle poll {})",
            n + 2,
            s2(gap),
            n + 1,
            s2(ceiling),
            s2(slack),
            s2(caps.delay_tolerance),
            s2(super::POLL_WAIT)
        );
        gaps.push(format!("{} (≤ {})", s2(gap), s2(ceiling)));
    }
    let st = w.snapshot(&queue);
    ensure!(
        st.processed == 1 && st.retried == 2 && st.dead_lettered == 0 && st.released == 0,
        "stats after the run: {st:?}; expected processed 1, retried 2, dead_lettered 0, released 0"
    );
    let letters = dlq::list(&p, &queue, 10)
        .await
        .ctx(format!("dlq::list({queue})"))?;
    ensure!(
        letters.is_empty(),
        "{} message(s) in the DLQ although the job succeeded on attempt 3",
        letters.len()
    );
    wait_drained(&p, &queue, millis(500)).await?;
    wait_drained(&p, &names::dead_letter(&queue), millis(500)).await?;
    close(&[&p]).await;
    pass(format!(
        "3 runs of one id, attempts 1→2→3, gaps {} (floor {}, +slack {}); stats processed 1, \
         retried 2; DLQ and queue empty",
        gaps.join(", "),
        s2(BASE),
        s2(slack)
    ))
}
