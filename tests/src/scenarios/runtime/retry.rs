//! Scenario 8, retry with backoff: a handler failing on attempts 1 and 2 and succeeding on 3 runs
//! exactly three times, with gaps that follow the configured backoff, and never reaches the DLQ.

use super::{
    backlog, batch_for, combine, delay_slack, enqueue, no_delay, producer, queue_toml,
    wait_drained, wait_for, worker_toml, Log, Running,
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
///
/// Then the **level** case ([`level_case`]): retries sent to another level with `retry.level`.
pub(crate) async fn retry_backoff(backend: Arc<dyn Backend>) -> Checked {
    let probe = producer(&backend, &unique("retry-probe"), &[Priority::Normal]).await?;
    let why = no_delay(&probe);
    close(&[&probe]).await;
    if let Some(why) = why {
        return skip(why);
    }
    let backoff = backoff_case(&backend).await;
    let level = level_case(&backend).await;
    pass(combine(vec![("backoff", backoff), ("level", level)])?)
}

async fn backoff_case(backend: &Arc<dyn Backend>) -> Result<String, String> {
    let queue = unique("retry");
    let p = producer(backend, &queue, &[Priority::Normal]).await?;
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
        backend,
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
    Ok(format!(
        "3 runs of one id, attempts 1→2→3, gaps {} (floor {}, +slack {}); stats processed 1, \
         retried 2; DLQ and queue empty",
        gaps.join(", "),
        s2(BASE),
        s2(slack)
    ))
}

const ONCE: &str = "conformance.fails-once";
const FILLER: &str = "conformance.filler";
/// Backlog behind the failing job, and how long each of its jobs takes: with concurrency 2 the
/// backlog takes about `FILLERS × FILL / 2` = 4 s to drain, far longer than a retry's backoff.
const FILLERS: usize = 400;
const FILL: Duration = Duration::from_millis(20);

async fn fails_once(
    State(log): State<Log>,
    ctx: JobContext,
    Payload(body): Payload,
) -> Result<(), JobError> {
    let i = log.start(&ctx, body);
    log.end(i);
    if ctx.attempt < 2 {
        return Err(JobError::retry("fails on attempt 1"));
    }
    Ok(())
}

async fn filler(State(log): State<Log>, ctx: JobContext, Payload(body): Payload) {
    let i = log.start(&ctx, body);
    tokio::time::sleep(FILL).await;
    log.end(i);
}

/// A queue serving `high` and `normal` with `retry = { base = cap = 300 ms, level = "high" }`,
/// concurrency 2. One job that fails on attempt 1 is enqueued at `normal`, then 400 jobs of
/// 20 ms behind it. Checks: the failing job runs twice, attempt 1 from `normal` and attempt 2
/// from `high` (the level its retry was sent to), the second no sooner than `base` − 50 ms and
/// no later than `base` + the backend's delay slack + 300 ms after the first: the backoff is
/// honoured and the retry does not wait behind the backlog. Where the first attempt ran with
/// at least half the backlog still to start, some of it must start after the retry. Every
/// filler runs once; stats processed 401, retried 1; both levels end empty.
async fn level_case(backend: &Arc<dyn Backend>) -> Result<String, String> {
    let queue = unique("retry-level");
    let levels = [Priority::High, Priority::Normal];
    let p = producer(backend, &queue, &levels).await?;
    let caps = p.capabilities().clone();
    let retry = format!(
        "retry = {{ max_attempts = 3, base = \"{0}ms\", cap = \"{0}ms\", level = \"high\" }}",
        BASE.as_millis()
    );
    let toml = worker_toml(
        &unique("w-retry-level"),
        2,
        secs(1),
        &[queue_toml(
            &queue,
            2,
            batch_for(&caps, 2),
            &["weights = { high = 1, normal = 1 }", &retry],
        )],
    );
    let client = stevedore::Client::new(p.clone());
    let id = enqueue(
        &client,
        &queue,
        ONCE,
        &serde_json::json!({"n": 1}),
        Priority::Normal,
    )
    .await?;
    let fillers = backlog(&client, &queue, FILLER, Priority::Normal, FILLERS).await?;
    let log = Log::default();
    let mut w = Running::start(
        backend,
        Router::with_state(log.clone())
            .route(ONCE, fails_once)
            .route(FILLER, filler),
        &toml,
    )
    .await?;
    let total = FILLERS as u64 + 1;
    let slack = delay_slack(&p) + SLACK;
    wait_for(
        FILL * FILLERS as u32 + BASE + slack + secs(20),
        || w.snapshot(&queue).processed >= total,
        || {
            format!(
                "processed {} of {total} jobs; stats {:?}",
                w.snapshot(&queue).processed,
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
    let tries: Vec<_> = runs.iter().filter(|r| r.id == id).collect();
    let seen: Vec<(u32, Priority)> = tries.iter().map(|r| (r.attempt, r.priority)).collect();
    ensure!(
        seen == [(1, Priority::Normal), (2, Priority::High)],
        "the failing job ran as (attempt, level) {seen:?}; expected attempt 1 from normal, then \
         attempt 2 from high (retry.level = \"high\")"
    );
    let (first, second) = (tries[0].started, tries[1].started);
    let gap = second - first;
    ensure!(
        gap + EARLY_MARGIN >= BASE,
        "the retry ran {} after attempt 1: earlier than its backoff {}",
        s2(gap),
        s2(BASE)
    );
    ensure!(
        gap <= BASE + slack,
        "the retry ran {} after attempt 1: later than its backoff {} + slack {}; it waited \
         behind the backlog",
        s2(gap),
        s2(BASE),
        s2(slack)
    );
    let filled = |after: tokio::time::Instant| {
        runs.iter()
            .filter(|r| r.job == FILLER && r.started > after)
            .count()
    };
    let (left_at_fail, left_at_retry) = (filled(first), filled(second));
    if left_at_fail >= FILLERS / 2 {
        ensure!(
            left_at_retry > 0,
            "{left_at_fail} of {FILLERS} backlog jobs were still to start when attempt 1 failed, \
             yet the retry ran after all of them"
        );
    }
    let mut count: std::collections::HashMap<&str, usize> = Default::default();
    for r in runs.iter().filter(|r| r.job == FILLER) {
        *count.entry(r.id.as_str()).or_default() += 1;
    }
    for f in &fillers {
        let n = count.get(f.as_str()).copied().unwrap_or(0);
        ensure!(n == 1, "backlog job {f} ran {n} times (expected once)");
    }
    let st = w.snapshot(&queue);
    ensure!(
        st.processed == total && st.retried == 1 && st.dead_lettered == 0,
        "stats after the run: {st:?}; expected processed {total}, retried 1, dead_lettered 0"
    );
    for level in levels {
        wait_drained(&p, &names::physical(&queue, level), millis(500)).await?;
    }
    close(&[&p]).await;
    Ok(format!(
        "attempt 1 from normal, attempt 2 from high {} later (backoff {}, +slack {}); of the \
         {FILLERS} backlog jobs {left_at_fail} were still to start when attempt 1 failed, \
         {left_at_retry} when its retry ran; every backlog job once; stats processed {total}, \
         retried 1",
        s2(gap),
        s2(BASE),
        s2(slack)
    ))
}
