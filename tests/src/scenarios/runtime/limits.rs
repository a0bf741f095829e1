//! Scenario 21, rate and concurrency limits across two workers: a queue-wide rate is never
//! exceeded, a per-job concurrency limit never either, every job runs once, and no attempt is
//! spent on waiting.

use super::{backlog, batch_for, producer, queue_toml, wait_for, worker_toml, Log, Running};
use crate::backend::Backend;
use crate::names::unique;
use crate::support::{ensure, pass, s2, secs, Checked};
use bytes::Bytes;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use stevedore::{Client, JobContext, Router, State};
use stevedore_core::Priority;
use tokio::time::Instant;

const RATED: &str = "conformance.rated";
const GATED: &str = "conformance.gated";
/// Jobs through the rate limit, and the rate (per second, burst 1).
const RATED_JOBS: usize = 1_000;
const RATE: usize = 50;
/// Jobs through the concurrency limit, each running this long, at most this many at once.
const GATED_JOBS: usize = 16;
const GATED_MS: u64 = 100;
const MAX_CONCURRENT: usize = 2;

async fn rated(State(log): State<Log>, ctx: JobContext) {
    let i = log.start(&ctx, Bytes::new());
    log.end(i);
}

async fn gated(State(log): State<Log>, ctx: JobContext) {
    let i = log.start(&ctx, Bytes::new());
    tokio::time::sleep(Duration::from_millis(GATED_MS)).await;
    log.end(i);
}

/// Most starts within any window of `window` (the busiest second).
fn busiest(mut starts: Vec<Instant>, window: Duration) -> usize {
    starts.sort();
    let mut best = 0;
    let mut j = 0;
    for i in 0..starts.len() {
        while starts[i] - starts[j] >= window {
            j += 1;
        }
        best = best.max(i - j + 1);
    }
    best
}

/// Two workers, each with its own broker and store handle. Part 1: queue A has `rate = "50/s"`
/// (burst 1); a backlog of [`RATED_JOBS`] waits in it before the workers start. Checks: every
/// job runs exactly once, at attempt 1; the busiest second holds at most 51 starts (the rate
/// plus the burst, as GCRA allows) plus a tenth of the rate (5) for the time between a token and
/// a start on a loaded machine; the whole
/// backlog takes at least `(jobs - 1) / rate`; nothing was put off (the workers pulled only
/// what the rate let them start). Part 2: queue B, job `GATED` has `max_concurrent = 2`;
/// [`GATED_JOBS`] jobs of 100 ms. Checks: never more than 2 run at once over both workers (from
/// the handlers' own start and end times), every job runs once at attempt 1.
pub(crate) async fn limits(backend: Arc<dyn Backend>) -> Checked {
    let qa = unique("rated");
    let qb = unique("gated");
    let pa = producer(&backend, &qa, &[Priority::Normal]).await?;
    let pb = producer(&backend, &qb, &[Priority::Normal]).await?;
    let caps = pa.capabilities().clone();
    let batch = batch_for(&caps, 16);
    let client = Client::new(pa.clone());
    let ids = backlog(&client, &qa, RATED, Priority::Normal, RATED_JOBS).await?;
    let gated_ids = backlog(
        &Client::new(pb.clone()),
        &qb,
        GATED,
        Priority::Normal,
        GATED_JOBS,
    )
    .await?;
    let log = Log::default();
    let toml = |id: &str| {
        worker_toml(
            id,
            32,
            secs(5),
            &[
                queue_toml(&qa, 16, batch, &[&format!("rate = \"{RATE}/s\"")]),
                queue_toml(&qb, 8, batch, &[]),
                format!("[jobs.\"{GATED}\"]\nmax_concurrent = {MAX_CONCURRENT}\n"),
            ],
        )
    };
    let router = || {
        Router::with_state(log.clone())
            .route(RATED, rated)
            .route(GATED, gated)
    };
    let t0 = Instant::now();
    let w1 = Running::start_with(
        &backend,
        router(),
        &toml(&unique("w-lim-1")),
        Some(backend.store().await?),
    )
    .await?;
    let w2 = Running::start_with(
        &backend,
        router(),
        &toml(&unique("w-lim-2")),
        Some(backend.store().await?),
    )
    .await?;
    let rated_done = || log.count(|r| r.job == RATED && r.ended.is_some());
    let gated_done = || log.count(|r| r.job == GATED && r.ended.is_some());
    let minimum = Duration::from_millis(((RATED_JOBS - 1) * 1000 / RATE) as u64);
    wait_for(
        minimum + secs(30),
        || rated_done() >= RATED_JOBS && gated_done() >= GATED_JOBS,
        || {
            format!(
                "{} of {RATED_JOBS} rated and {} of {GATED_JOBS} gated jobs done",
                rated_done(),
                gated_done()
            )
        },
    )
    .await?;
    let took = t0.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let runs = log.runs();
    let mut per_id: BTreeMap<&str, usize> = BTreeMap::new();
    for r in &runs {
        *per_id.entry(r.id.as_str()).or_default() += 1;
    }
    let all: Vec<&String> = ids.iter().chain(gated_ids.iter()).collect();
    let wrong: Vec<(&String, usize)> = all
        .iter()
        .map(|id| (*id, per_id.get(id.as_str()).copied().unwrap_or(0)))
        .filter(|(_, n)| *n != 1)
        .collect();
    ensure!(
        wrong.is_empty(),
        "{} jobs did not run exactly once (id, runs): {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(3)]
    );
    let late: Vec<u32> = runs.iter().map(|r| r.attempt).filter(|a| *a != 1).collect();
    ensure!(late.is_empty(), "attempts spent on waiting: {late:?}");
    let starts: Vec<Instant> = runs
        .iter()
        .filter(|r| r.job == RATED)
        .map(|r| r.started)
        .collect();
    // Grants are spaced by the limiter; a handler starts a receive (and, on a loaded machine, a
    // scheduling hiccup) after its grant, so starts bunch a little: allow a tenth of the rate on
    // top (a doubled rate or a large burst still fails; `took` below checks the long-run rate).
    let peak = busiest(starts, Duration::from_secs(1));
    ensure!(
        peak <= RATE + 1 + RATE / 10,
        "{peak} rated jobs started within one second; the limit allows {} (rate {RATE}/s, burst 1) and the check {} for start jitter",
        RATE + 1,
        RATE / 10
    );
    ensure!(
        took >= minimum,
        "{RATED_JOBS} jobs at {RATE}/s took {}, less than the {} the rate allows",
        s2(took),
        s2(minimum)
    );
    let deferred_a = w1.snapshot(&qa).deferred + w2.snapshot(&qa).deferred;
    ensure!(
        deferred_a == 0,
        "{deferred_a} rated jobs were pulled and put off: a queue-wide rate should pull only what it may start"
    );
    // Concurrency: sweep the gated runs' starts and ends.
    let mut events: Vec<(Instant, i32)> = Vec::new();
    for r in runs.iter().filter(|r| r.job == GATED) {
        events.push((r.started, 1));
        events.push((r.ended.unwrap_or(r.started), -1));
    }
    events.sort_by_key(|(t, d)| (*t, *d));
    let (mut now, mut most) = (0, 0);
    for (_, d) in events {
        now += d;
        most = most.max(now);
    }
    ensure!(
        most as usize <= MAX_CONCURRENT,
        "{most} gated jobs ran at once over two workers; max_concurrent = {MAX_CONCURRENT}"
    );
    let deferred_b = w1.snapshot(&qb).deferred + w2.snapshot(&qb).deferred;
    pass(format!(
        "{RATED_JOBS} jobs at {RATE}/s over two workers in {} (busiest second {peak}, none put off); \
         {GATED_JOBS} jobs at most {most} at once ({deferred_b} put-offs); every job once, at attempt 1",
        s2(took)
    ))
}
