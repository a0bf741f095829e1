//! Scenario 13, graceful shutdown: in-flight jobs finish within the deadline and nothing new
//! starts; past the deadline the unfinished are released at once; across two workers every job
//! runs exactly once.

use super::{
    backlog, batch_for, combine, producer, queue_toml, wait_drained, wait_for, worker_toml, Log,
    Running, POLL_WAIT,
};
use crate::backend::Backend;
use crate::names::unique;
use crate::support::{close, ensure, millis, pass, s2, secs, Checked};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use stevedore::{JobContext, Payload, Router, State};
use stevedore_core::{names, Priority};

const JOB: &str = "conformance.slow";
const CONCURRENCY: usize = 4;
/// Drain case: backlog, handler length, deadline.
const BACKLOG: usize = 20;
const SHORT_JOB: Duration = Duration::from_millis(500);
const DRAIN_DEADLINE: Duration = Duration::from_secs(5);
/// Release case: handler length (far past the deadline), deadline, lease (far past the test).
const LONG_JOB: Duration = Duration::from_secs(30);
const RELEASE_DEADLINE: Duration = Duration::from_secs(1);
const LONG_LEASE: &str = "lease = \"60s\"";
/// Slack on `run()` returning, and how soon released jobs must reach another worker.
const SLACK: Duration = Duration::from_secs(1);
const PROMPT: Duration = Duration::from_secs(3);

/// Router state: the log and how long each job sleeps.
#[derive(Clone, Debug, Default)]
struct Slow {
    log: Log,
    sleep: Duration,
}

async fn slow(State(s): State<Slow>, ctx: JobContext, Payload(body): Payload) {
    let i = s.log.start(&ctx, body);
    tokio::time::sleep(s.sleep).await;
    s.log.end(i);
}

fn toml(queue: &str, batch: usize, deadline: Duration, extra: &[&str]) -> String {
    worker_toml(
        &unique("w-stop"),
        CONCURRENCY,
        deadline,
        &[queue_toml(queue, CONCURRENCY, batch, extra)],
    )
}

/// Two cases side by side, each with worker A (concurrency 4) then worker B on a fresh handle and
/// with an id of its own:
///
/// - **drain**: 20 jobs of 0.5 s, `shutdown_timeout` 5 s. Shutdown is asked once A runs 4 jobs:
///   those 4 finish, A starts no other (exactly 4 runs, all started before the request), `run()`
///   returns drained = true within 0.5 s + 1 s, A counts processed 4, released 0. B then runs the
///   other 16. Every id ran exactly once across A and B, on attempt 1 (unless the backend
///   declares that its give-back counts: `Capabilities::uncounted_release`); the queue ends
///   empty.
/// - **release**: 4 jobs of 30 s, `shutdown_timeout` 1 s, lease 60 s. Shutdown is asked once all
///   4 run: `run()` returns no sooner than the 1 s deadline and within 1 s + 1 s, with drained =
///   false, A counts released 4 and processed 0, and none of A's handlers completed. B (quick
///   handlers) receives all 4 within 3 s of starting, far inside the 60 s lease, so they were
///   released, not left to expire; each runs once there, on attempt 1: a shutdown does not use
///   up an attempt.
pub(crate) async fn graceful_shutdown(backend: Arc<dyn Backend>) -> Checked {
    let (drain, release) = tokio::join!(drain_case(&backend), release_case(&backend));
    pass(combine(vec![("drain", drain), ("release", release)])?)
}

fn router(log: &Log, sleep: Duration) -> Router<Slow> {
    Router::with_state(Slow {
        log: log.clone(),
        sleep,
    })
    .route(JOB, slow)
}

async fn drain_case(backend: &Arc<dyn Backend>) -> Result<String, String> {
    let queue = unique("drain");
    let p = producer(backend, &queue, &[Priority::Normal]).await?;
    let batch = batch_for(p.capabilities(), CONCURRENCY);
    let uncounted = p
        .queue_capabilities(&names::physical(&queue, Priority::Normal))
        .uncounted_release;
    let client = stevedore::Client::new(p.clone());
    let ids = backlog(&client, &queue, JOB, Priority::Normal, BACKLOG).await?;
    let log = Log::default();
    let config = || toml(&queue, batch, DRAIN_DEADLINE, &[]);
    let mut a = Running::start(backend, router(&log, SHORT_JOB), &config()).await?;
    let by = |log: &Log, id: &str| log.count(|r| r.worker == id);
    wait_for(
        secs(10),
        || by(&log, &a.id) >= CONCURRENCY,
        || format!("worker A started {} of {CONCURRENCY} jobs", by(&log, &a.id)),
    )
    .await?;
    let stopped = a.stop(DRAIN_DEADLINE + SLACK * 2).await?;
    let a_runs: Vec<_> = log
        .runs()
        .into_iter()
        .filter(|r| r.worker == a.id)
        .collect();
    ensure!(
        a_runs.len() == CONCURRENCY,
        "worker A ran {} jobs with concurrency {CONCURRENCY}: it started new ones after shutdown",
        a_runs.len()
    );
    for r in &a_runs {
        ensure!(
            r.started <= stopped.asked,
            "worker A started job {} {} after shutdown was asked",
            r.id,
            s2(r.started - stopped.asked)
        );
        ensure!(
            r.ended.is_some(),
            "worker A's in-flight job {} did not finish before run() returned",
            r.id
        );
    }
    ensure!(
        stopped.report.drained,
        "run() reported drained = false although the 4 jobs of {} had {} to finish",
        s2(SHORT_JOB),
        s2(DRAIN_DEADLINE)
    );
    ensure!(
        stopped.took <= SHORT_JOB + SLACK,
        "run() returned {} after shutdown was asked; in-flight jobs needed at most {}",
        s2(stopped.took),
        s2(SHORT_JOB)
    );
    let st = a.snapshot(&queue);
    ensure!(
        st.processed == CONCURRENCY as u64 && st.released == 0 && st.in_flight == 0,
        "worker A stats {st:?}; expected processed {CONCURRENCY}, released 0, in_flight 0"
    );

    let mut b = Running::start(backend, router(&log, SHORT_JOB), &config()).await?;
    let rest = BACKLOG - CONCURRENCY;
    let need = SHORT_JOB * (rest / CONCURRENCY + 1) as u32 + secs(10);
    wait_for(
        need,
        || b.snapshot(&queue).processed >= rest as u64,
        || {
            format!(
                "worker B processed {} of the {rest} remaining jobs",
                b.snapshot(&queue).processed
            )
        },
    )
    .await?;
    let b_stop = b.stop(DRAIN_DEADLINE + SLACK * 2).await?;
    ensure!(b_stop.report.drained, "worker B did not drain");
    wait_drained(&p, &queue, millis(500)).await?;
    close(&[&p]).await;
    let runs = log.runs();
    let mut count: HashMap<&str, usize> = HashMap::new();
    for r in &runs {
        *count.entry(r.id.as_str()).or_default() += 1;
    }
    for id in &ids {
        let n = count.get(id.as_str()).copied().unwrap_or(0);
        ensure!(
            n == 1,
            "job {id} ran {n} times across both workers (expected exactly once)"
        );
    }
    ensure!(
        runs.len() == BACKLOG,
        "{} runs recorded for {BACKLOG} jobs",
        runs.len()
    );
    // A shutdown does not charge the jobs A never ran (received or pushed ahead, not started),
    // unless the backend declares that its give-back counts.
    let later: Vec<String> = runs
        .iter()
        .filter(|r| r.attempt != 1)
        .map(|r| format!("{} on attempt {}", r.id, r.attempt))
        .collect();
    ensure!(
        later.is_empty() || !uncounted,
        "{} of the jobs A never ran came back on a later attempt ({}): its shutdown used up \
         an attempt of jobs that never failed",
        later.len(),
        later.join(", ")
    );
    let later = later.len();

    Ok(format!(
        "A finished its 4 in-flight jobs and returned drained in {} (no new start), B ran the \
         other {rest}; all {BACKLOG} ran exactly once ({later} of them on a later attempt)",
        s2(stopped.took)
    ))
}

async fn release_case(backend: &Arc<dyn Backend>) -> Result<String, String> {
    let queue = unique("release-rt");
    let p = producer(backend, &queue, &[Priority::Normal]).await?;
    let batch = batch_for(p.capabilities(), CONCURRENCY);
    let client = stevedore::Client::new(p.clone());
    let ids = backlog(&client, &queue, JOB, Priority::Normal, CONCURRENCY).await?;
    let log = Log::default();
    let config = || toml(&queue, batch, RELEASE_DEADLINE, &[LONG_LEASE]);
    let mut a = Running::start(backend, router(&log, LONG_JOB), &config()).await?;
    wait_for(
        secs(10),
        || log.count(|_| true) >= CONCURRENCY,
        || {
            format!(
                "worker A started {} of {CONCURRENCY} jobs",
                log.count(|_| true)
            )
        },
    )
    .await?;
    let stopped = a.stop(RELEASE_DEADLINE + SLACK * 5).await?;
    ensure!(
        !stopped.report.drained,
        "run() reported drained = true although 4 jobs of {} were cut off",
        s2(LONG_JOB)
    );
    ensure!(
        stopped.took + millis(50) >= RELEASE_DEADLINE,
        "run() returned {} after shutdown was asked, before the {} deadline",
        s2(stopped.took),
        s2(RELEASE_DEADLINE)
    );
    ensure!(
        stopped.took <= RELEASE_DEADLINE + SLACK,
        "run() returned {} after shutdown was asked (deadline {} + {})",
        s2(stopped.took),
        s2(RELEASE_DEADLINE),
        s2(SLACK)
    );
    let st = a.snapshot(&queue);
    ensure!(
        st.released == CONCURRENCY as u64 && st.processed == 0 && st.in_flight == 0,
        "worker A stats {st:?}; expected released {CONCURRENCY}, processed 0, in_flight 0"
    );
    let finished = log.count(|r| r.ended.is_some());
    ensure!(
        finished == 0,
        "{finished} of worker A's 30 s jobs reported completion"
    );

    let mut b = Running::start(backend, router(&log, Duration::ZERO), &config()).await?;
    let on_b = |log: &Log, id: &str| log.count(|r| r.worker == id && r.ended.is_some());
    let took = wait_for(
        PROMPT + POLL_WAIT,
        || on_b(&log, &b.id) >= CONCURRENCY,
        || {
            format!(
                "worker B ran {} of the {CONCURRENCY} released jobs (lease 60s: only a release \
                 brings them back this soon)",
                on_b(&log, &b.id)
            )
        },
    )
    .await?;
    let b_stop = b.stop(secs(5)).await?;
    ensure!(b_stop.report.drained, "worker B did not drain");
    wait_drained(&p, &queue, millis(500)).await?;
    close(&[&p]).await;
    let runs = log.runs();
    let attempts: Vec<u32> = runs
        .iter()
        .filter(|r| r.worker == b.id)
        .map(|r| r.attempt)
        .collect();
    for id in &ids {
        let n = runs
            .iter()
            .filter(|r| &r.id == id && r.worker == b.id)
            .count();
        ensure!(n == 1, "released job {id} ran {n} times on worker B");
    }
    // Cut off by a shutdown is not a failure: B runs them on the attempt A did (where the
    // backend declares it can give back uncounted).
    let want = if p.queue_capabilities(&queue).uncounted_release {
        1
    } else {
        2
    };
    ensure!(
        attempts.iter().all(|a| *a == want),
        "worker B ran the jobs A released at its deadline on attempts {attempts:?}; a shutdown \
         must not use up an attempt (expected {want} each)"
    );
    Ok(format!(
        "A cut off 4 jobs at the 1s deadline, returned in {} with drained = false and released \
         4; B ran them within {} (lease 60s), once each, attempts {attempts:?}",
        s2(stopped.took),
        s2(took)
    ))
}
