//! Scenario 12, priority: strict order, weighted shares, reserved slots and aging, each on its own
//! queue and worker, run side by side.

use super::{
    backlog, batch_for, combine, enqueue, producer, queue_toml, wait_for, worker_toml, Log, Run,
    Running, POLL_WAIT,
};
use crate::backend::Backend;
use crate::names::unique;
use crate::support::{close, ensure, pass, s2, secs, Checked};
use std::sync::Arc;
use std::time::Duration;
use stevedore::{JobContext, Payload, Router, State};
use stevedore_core::{Broker, Priority};

const JOB: &str = "conformance.prioritized";
const LEVELS: [Priority; 2] = [Priority::High, Priority::Low];

/// Strict: jobs per level.
const STRICT_N: usize = 20;
/// Strict: most low jobs allowed before the last high one: what one fetch (batch 1, concurrency 1)
/// can hold when the run starts.
const STRICT_BOUND: usize = 1;
/// Weighted: jobs per level, and how many of the first processed are counted.
const WEIGHTED_N: usize = 60;
const WEIGHTED_WINDOW: usize = 40;
/// Weighted 3:1: the 30 high jobs expected in the window may be off by this many.
const WEIGHTED_TOLERANCE: usize = 4;
/// Reserved: how long a low job runs, and how soon a high job must start once enqueued.
const LOW_SLEEP: Duration = Duration::from_secs(2);
const RESERVED_PROMPT: Duration = Duration::from_millis(500);
/// Aging: the setting, the high backlog and its job length, and the slack on top of aging.
const AGING: Duration = Duration::from_secs(1);
const AGING_HIGHS: usize = 60;
const HIGH_SLEEP: Duration = Duration::from_millis(25);
const AGING_SLACK: Duration = Duration::from_millis(500);
/// Start-up: workers started side by side, each on its own backlog of this many jobs per level.
const STARTUP_WORKERS: usize = 6;
const STARTUP_EACH: usize = 3;

/// Router state: the log, and how long a job of each level sleeps.
#[derive(Clone, Debug, Default)]
struct Sleepy {
    log: Log,
    high: Duration,
    low: Duration,
}

/// The level a job was enqueued at, from its payload (`"level": "high"`).
fn enqueued_at(body: &[u8]) -> Priority {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            v.get("level")
                .and_then(|l| l.as_str())
                .and_then(Priority::parse)
        })
        .unwrap_or(Priority::Normal)
}

async fn prioritized(State(s): State<Sleepy>, ctx: JobContext, Payload(body): Payload) {
    let level = enqueued_at(&body);
    let i = s.log.start(&ctx, body);
    let pause = match level {
        Priority::High => s.high,
        Priority::Low => s.low,
        Priority::Normal => Duration::ZERO,
    };
    if !pause.is_zero() {
        tokio::time::sleep(pause).await;
    }
    s.log.end(i);
}

/// Four sub-scenarios side by side, each with a queue serving levels high and low:
///
/// - **strict** (`mode = "strict"`, concurrency 1, batch 1): a backlog of 20 low and 20 high jobs
///   is in place before the worker starts; every high job runs before any low one, except at most
///   1 low (one fetch's worth);
/// - **weighted** (weights high 3, low 1, concurrency 1, batch 1): backlogs of 60 + 60; of the first
///   40 processed, 30 ± 4 are high;
/// - **reserved** (concurrency 4, `reserved = { high = 1 }`): 4 low jobs of 2 s each; 3 start and
///   the 4th must not take the reserved slot; a high job enqueued then starts within 0.5 s (+ the
///   idle poll), before any low job ends; never more than 3 low jobs at once;
/// - **aging** (strict, `aging = "1s"`, concurrency 1): one low job behind 60 high jobs of 25 ms;
///   the low job runs no sooner than 1 s after the worker started and no later than 1 s + 25 ms
///   + 0.5 s after it was ready, while high jobs are still waiting;
/// - **start-up** (strict, concurrency 1, batch 1): 6 workers started at once, each on a fresh
///   queue holding 3 low and 3 high jobs; every worker runs its 3 high jobs before any low one.
///   The first fetches of a fresh worker are where a broker that pushes deliveries (RabbitMQ)
///   can look empty while it still holds ready messages: strict must hold from the first job.
pub(crate) async fn priority(backend: Arc<dyn Backend>) -> Checked {
    let (a, b, c, d, e) = tokio::join!(
        strict(&backend),
        weighted(&backend),
        reserved(&backend),
        aging(&backend),
        startup(&backend)
    );
    let detail = combine(vec![
        ("strict", a),
        ("weighted", b),
        ("reserved", c),
        ("aging", d),
        ("start-up", e),
    ])?;
    pass(detail)
}

/// A producer and a worker for one sub-scenario; the worker is started only after `before` ran
/// (to put a backlog in place).
struct Bench {
    queue: String,
    p: Arc<dyn Broker>,
    client: stevedore::Client,
    log: Log,
}

impl Bench {
    async fn new(backend: &Arc<dyn Backend>, prefix: &str) -> Result<Bench, String> {
        let queue = unique(prefix);
        let p = producer(backend, &queue, &LEVELS).await?;
        Ok(Bench {
            client: stevedore::Client::new(p.clone()),
            queue,
            p,
            log: Log::default(),
        })
    }

    async fn start(
        &self,
        backend: &Arc<dyn Backend>,
        concurrency: usize,
        batch: usize,
        extra: &[&str],
        high: Duration,
        low: Duration,
    ) -> Result<Running, String> {
        let batch = batch_for(self.p.capabilities(), batch);
        let toml = worker_toml(
            &unique("w-prio"),
            concurrency,
            secs(3),
            &[queue_toml(&self.queue, concurrency, batch, extra)],
        );
        let state = Sleepy {
            log: self.log.clone(),
            high,
            low,
        };
        Running::start(
            backend,
            Router::with_state(state).route(JOB, prioritized),
            &toml,
        )
        .await
    }

    async fn finish(&self, mut w: Running) -> Result<(), String> {
        let stopped = w.stop(secs(10)).await?;
        close(&[&self.p]).await;
        ensure!(
            stopped.report.drained,
            "run() reported drained = false (shutdown_timeout 3s)"
        );
        Ok(())
    }
}

/// The levels the runs were enqueued at, in start order.
fn levels_of(runs: &[Run]) -> Vec<Priority> {
    runs.iter().map(|r| enqueued_at(&r.body)).collect()
}

/// Every run was received from the level it was enqueued at.
fn check_levels(runs: &[Run]) -> Result<(), String> {
    for r in runs {
        let want = enqueued_at(&r.body);
        ensure!(
            r.priority == want,
            "job {} enqueued at {want} was received from level {}",
            r.id,
            r.priority
        );
    }
    Ok(())
}

fn check_once(runs: &[Run], ids: &[String]) -> Result<(), String> {
    for id in ids {
        let n = runs.iter().filter(|r| &r.id == id).count();
        ensure!(n == 1, "job {id} ran {n} times");
    }
    Ok(())
}

/// A strict worker (concurrency 1, batch 1, aging 60 s) started on a fresh queue that already
/// holds `n` low and then `n` high jobs; runs them all, stops, and returns the runs in start order
/// after checking every job ran once.
async fn strict_run(
    backend: &Arc<dyn Backend>,
    prefix: &str,
    n: usize,
) -> Result<Vec<Run>, String> {
    let b = Bench::new(backend, prefix).await?;
    let mut ids = backlog(&b.client, &b.queue, JOB, Priority::Low, n).await?;
    ids.extend(backlog(&b.client, &b.queue, JOB, Priority::High, n).await?);
    let extra = [
        "mode = \"strict\"",
        "weights = { high = 1, low = 1 }",
        "aging = \"60s\"",
    ];
    let w = b
        .start(backend, 1, 1, &extra, Duration::ZERO, Duration::ZERO)
        .await?;
    wait_for(
        secs(20),
        || b.log.count(|_| true) >= 2 * n,
        || format!("{} of {} jobs ran", b.log.count(|_| true), 2 * n),
    )
    .await?;
    b.finish(w).await?;
    let runs = b.log.runs();
    check_once(&runs, &ids)?;
    Ok(runs)
}

async fn strict(backend: &Arc<dyn Backend>) -> Result<String, String> {
    let runs = strict_run(backend, "strict", STRICT_N).await?;
    let order = levels_of(&runs);
    let last_high = order
        .iter()
        .rposition(|p| *p == Priority::High)
        .unwrap_or(0);
    let lows_first = order[..last_high]
        .iter()
        .filter(|p| **p == Priority::Low)
        .count();
    ensure!(
        lows_first <= STRICT_BOUND,
        "{lows_first} low job(s) ran before the last high one (bound {STRICT_BOUND}); order: {}",
        letters(&order)
    );
    check_levels(&runs)?;
    Ok(format!(
        "{STRICT_N} high then {STRICT_N} low, {lows_first} low before the last high (bound \
         {STRICT_BOUND})"
    ))
}

async fn weighted(backend: &Arc<dyn Backend>) -> Result<String, String> {
    let b = Bench::new(backend, "weighted").await?;
    let mut ids = backlog(&b.client, &b.queue, JOB, Priority::Low, WEIGHTED_N).await?;
    ids.extend(backlog(&b.client, &b.queue, JOB, Priority::High, WEIGHTED_N).await?);
    let extra = ["weights = { high = 3, low = 1 }", "aging = \"60s\""];
    let w = b
        .start(backend, 1, 1, &extra, Duration::ZERO, Duration::ZERO)
        .await?;
    wait_for(
        secs(20),
        || b.log.count(|_| true) >= 2 * WEIGHTED_N,
        || format!("{} of {} jobs ran", b.log.count(|_| true), 2 * WEIGHTED_N),
    )
    .await?;
    b.finish(w).await?;
    let runs = b.log.runs();
    check_once(&runs, &ids)?;
    let order = levels_of(&runs);
    let window = &order[..WEIGHTED_WINDOW];
    let high = window.iter().filter(|p| **p == Priority::High).count();
    let expect = WEIGHTED_WINDOW * 3 / 4;
    ensure!(
        high.abs_diff(expect) <= WEIGHTED_TOLERANCE,
        "{high} high of the first {WEIGHTED_WINDOW} processed, expected {expect} ± \
         {WEIGHTED_TOLERANCE} for weights 3:1; order: {}",
        letters(window)
    );
    check_levels(&runs)?;
    Ok(format!(
        "{high}:{} high:low in the first {WEIGHTED_WINDOW} (3:1 → {expect} ± {WEIGHTED_TOLERANCE})",
        WEIGHTED_WINDOW - high
    ))
}

async fn reserved(backend: &Arc<dyn Backend>) -> Result<String, String> {
    const LOWS: usize = 4;
    let b = Bench::new(backend, "reserved").await?;
    let low_ids = backlog(&b.client, &b.queue, JOB, Priority::Low, LOWS).await?;
    let extra = [
        "weights = { high = 1, low = 1 }",
        "reserved = { high = 1 }",
        "aging = \"60s\"",
    ];
    let w = b
        .start(backend, 4, 4, &extra, Duration::ZERO, LOW_SLEEP)
        .await?;
    let lows = |b: &Bench| b.log.count(|r| enqueued_at(&r.body) == Priority::Low);
    wait_for(
        secs(5),
        || lows(&b) >= 3,
        || format!("{} of 3 low jobs started", lows(&b)),
    )
    .await?;
    let sent = tokio::time::Instant::now();
    let high_id = enqueue(
        &b.client,
        &b.queue,
        JOB,
        &serde_json::json!({"urgent": true, "level": "high"}),
        Priority::High,
    )
    .await?;
    let prompt = RESERVED_PROMPT + POLL_WAIT;
    let high_started = |b: &Bench| b.log.count(|r| r.id == high_id) > 0;
    wait_for(
        LOW_SLEEP + secs(3),
        || high_started(&b),
        || "the high job never started".to_string(),
    )
    .await?;
    let runs = b.log.runs();
    let Some(high) = runs.iter().find(|r| r.id == high_id) else {
        return Err("the high job's run vanished from the log".into());
    };
    let waited = high.started.saturating_duration_since(sent);
    let first_low_end = runs
        .iter()
        .filter(|r| enqueued_at(&r.body) == Priority::Low)
        .filter_map(|r| r.ended)
        .min();
    ensure!(
        first_low_end.is_none_or(|e| high.started < e),
        "the high job started only after a low job ended: the reserved slot was taken"
    );
    ensure!(
        waited <= prompt,
        "the high job started {} after it was enqueued (limit {}) while 3 slow low jobs ran",
        s2(waited),
        s2(prompt)
    );
    b.finish(w).await?;
    let runs = b.log.runs();
    check_levels(&runs)?;
    let low_runs: Vec<&Run> = runs
        .iter()
        .filter(|r| enqueued_at(&r.body) == Priority::Low)
        .collect();
    let most = low_runs
        .iter()
        .map(|r| {
            low_runs
                .iter()
                .filter(|o| o.started <= r.started && o.ended.is_none_or(|e| e > r.started))
                .count()
        })
        .max()
        .unwrap_or(0);
    ensure!(
        most <= 3,
        "{most} low jobs ran at once with concurrency 4 and 1 slot reserved for high"
    );
    let low_ran: Vec<String> = low_runs.iter().map(|r| r.id.clone()).collect();
    ensure!(
        low_ran.iter().all(|id| low_ids.contains(id)),
        "a low run had an id never enqueued: {low_ran:?}"
    );
    check_once(&runs, &low_ran)?;
    Ok(format!(
        "3 slow low jobs held 3 of 4 slots (never more), the high job started {} after enqueue \
         (limit {})",
        s2(waited),
        s2(prompt)
    ))
}

async fn aging(backend: &Arc<dyn Backend>) -> Result<String, String> {
    let b = Bench::new(backend, "aging").await?;
    let low = backlog(&b.client, &b.queue, JOB, Priority::Low, 1).await?;
    let mut ids = backlog(&b.client, &b.queue, JOB, Priority::High, AGING_HIGHS).await?;
    ids.extend(low.iter().cloned());
    let aging = format!("aging = \"{}ms\"", AGING.as_millis());
    let extra = [
        "mode = \"strict\"",
        "weights = { high = 1, low = 1 }",
        aging.as_str(),
    ];
    let w = b
        .start(backend, 1, 1, &extra, HIGH_SLEEP, Duration::ZERO)
        .await?;
    let total = AGING_HIGHS + 1;
    wait_for(
        secs(20),
        || b.log.count(|_| true) >= total,
        || format!("{} of {total} jobs ran", b.log.count(|_| true)),
    )
    .await?;
    let (spawned, ready) = (w.spawned_at, w.ready_at);
    b.finish(w).await?;
    let runs = b.log.runs();
    check_once(&runs, &ids)?;
    check_levels(&runs)?;
    let Some(pos) = runs
        .iter()
        .position(|r| enqueued_at(&r.body) == Priority::Low)
    else {
        return Err("the low job never ran".into());
    };
    let at = runs[pos].started;
    let after_spawn = at.saturating_duration_since(spawned);
    let after_ready = at.saturating_duration_since(ready);
    let limit = AGING + HIGH_SLEEP + AGING_SLACK;
    ensure!(
        after_spawn >= AGING,
        "the low job ran {} after the worker started, before aging ({}) let it pass the high \
         backlog: strict mode was not strict",
        s2(after_spawn),
        s2(AGING)
    );
    ensure!(
        after_ready <= limit,
        "the low job waited {} behind the high backlog (limit aging {} + {})",
        s2(after_ready),
        s2(AGING),
        s2(limit - AGING)
    );
    let highs_after = runs.len() - pos - 1;
    ensure!(
        highs_after > 0,
        "the high backlog was exhausted before the low job ran, so aging was not what served it"
    );
    Ok(format!(
        "the low job ran {} after start, after {pos} high jobs and with {highs_after} still \
         waiting (aging {}, limit {})",
        s2(after_ready),
        s2(AGING),
        s2(limit)
    ))
}

async fn startup(backend: &Arc<dyn Backend>) -> Result<String, String> {
    let runs = futures::future::join_all((0..STARTUP_WORKERS).map(|_| startup_one(backend))).await;
    let failed: Vec<String> = runs.into_iter().filter_map(Result::err).collect();
    ensure!(
        failed.is_empty(),
        "{} of {STARTUP_WORKERS} fresh workers broke strict order: {}",
        failed.len(),
        failed.join("; ")
    );
    Ok(format!(
        "{STARTUP_WORKERS} workers started at once on {STARTUP_EACH} low + {STARTUP_EACH} high \
         each all ran their high jobs first"
    ))
}

async fn startup_one(backend: &Arc<dyn Backend>) -> Result<(), String> {
    let runs = strict_run(backend, "startup", STARTUP_EACH).await?;
    check_levels(&runs)?;
    let order = levels_of(&runs);
    ensure!(
        order[..STARTUP_EACH].iter().all(|p| *p == Priority::High),
        "order {} on a fresh worker: a low job ran while high jobs were ready",
        letters(&order)
    );
    Ok(())
}

/// `HHL…` for a failure message.
fn letters(order: &[Priority]) -> String {
    order
        .iter()
        .map(|p| match p {
            Priority::High => 'H',
            Priority::Normal => 'N',
            Priority::Low => 'L',
        })
        .collect()
}
