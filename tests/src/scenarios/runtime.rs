//! Scenarios that drive the real worker runtime (`stevedore`) against the backend under test:
//! 8 retry with backoff, 9 dead letter, 10 DLQ replay, 12 priority and 13 graceful shutdown, one
//! module each. The runtime halves of 11 (delays surviving a worker restart, delays beyond the
//! native cap) and 18 (foreign messages reaching the queue's default handler) live next to their
//! broker halves in `delay.rs` and `foreign.rs`, and use the helpers here.
//!
//! Conventions shared by all of them:
//!
//! - every worker runs on its own [`Backend::connect`] handle (a worker closes its handle when it
//!   stops), with HTTP off, a [`POLL_WAIT`] idle poll, a [`PROMOTE_INTERVAL`] promoter, a fresh
//!   worker id and a batch no larger than the backend's `max_batch`;
//! - producers use a separate handle that prepares the physical queues (every level and the
//!   dead-letter queue) before anything is published;
//! - handlers record each run in a [`Log`] (id, attempt, level, worker, start and end), and the
//!   scenarios wait for observable conditions (runs recorded, counters reached) under deadlines;
//!   a fixed wait is used only to check that something does *not* happen;
//! - only the broker trait, the runtime's public API and the declared capabilities are used, so
//!   each scenario runs unchanged on every backend;
//! - a [`Running`] worker that goes out of scope is shut down, so a failed scenario leaves no
//!   worker polling behind it.

mod dead_letter;
mod effects;
mod limits;
mod priority;
mod replay;
mod retry;
mod schedules;
mod shutdown;
mod unique;

pub(crate) use dead_letter::dead_letter;
pub(crate) use effects::status_and_inbox;
pub(crate) use limits::limits;
pub(crate) use priority::priority;
pub(crate) use replay::dlq_replay;
pub(crate) use retry::retry_backoff;
pub(crate) use schedules::schedules;
pub(crate) use shutdown::graceful_shutdown;
pub(crate) use unique::unique_jobs;

use crate::backend::Backend;
use crate::support::{ensure, s2, Context};
use bytes::Bytes;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use stevedore::dlq::{self, DeadLetter};
use stevedore::stats::{QueueSnapshot, Stats};
use stevedore::{config, Client, JobContext, Router, RunReport, ShutdownHandle, Worker};
use stevedore_core::{names, Broker, BrokerError, Capabilities, DelaySupport, Envelope, Priority};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Longest idle wait of every test worker (`worker.poll_wait`): short, so idle workers notice new
/// work and shutdowns quickly.
pub(crate) const POLL_WAIT: Duration = Duration::from_millis(200);
/// Promotion period of every test worker (`worker.promote_interval`, for delay-store backends).
pub(crate) const PROMOTE_INTERVAL: Duration = Duration::from_millis(100);
/// How long a worker may take from `run()` to fetching (prepare included).
const READY_WITHIN: Duration = Duration::from_secs(10);

/// The `[http]` and `[worker]` sections of a test worker's TOML, followed by `queues` (sections
/// made with [`queue_toml`], or `[jobs.*]` tables).
pub(crate) fn worker_toml(
    id: &str,
    concurrency: usize,
    shutdown_timeout: Duration,
    queues: &[String],
) -> String {
    format!(
        "[http]\nenabled = false\n\n[worker]\nid = \"{id}\"\nconcurrency = {concurrency}\n\
         shutdown_timeout = \"{}ms\"\npoll_wait = \"{}ms\"\npromote_interval = \"{}ms\"\n\n{}",
        shutdown_timeout.as_millis(),
        POLL_WAIT.as_millis(),
        PROMOTE_INTERVAL.as_millis(),
        queues.join("\n")
    )
}

/// A `[queues.<name>]` section with `concurrency`, `batch` (see [`batch_for`]) and `extra` lines
/// (`mode = "strict"`, `retry = { ... }`, ...). The lease stays at its 30 s default unless `extra`
/// sets one.
pub(crate) fn queue_toml(name: &str, concurrency: usize, batch: usize, extra: &[&str]) -> String {
    format!(
        "[queues.{name}]\nconcurrency = {concurrency}\nbatch = {batch}\n{}\n",
        extra.join("\n")
    )
}

/// A batch of at most `want` that the backend accepts.
pub(crate) fn batch_for(caps: &Capabilities, want: usize) -> usize {
    want.min(caps.max_batch).max(1)
}

/// The physical queues of logical `queue` at `levels`, plus its dead-letter queue: what a producer
/// handle prepares.
pub(crate) fn physical(queue: &str, levels: &[Priority]) -> Vec<String> {
    let mut out: Vec<String> = levels.iter().map(|p| names::physical(queue, *p)).collect();
    out.push(names::dead_letter(queue));
    out
}

/// A producer handle with the physical queues of `queue` at `levels` (and its DLQ) prepared.
pub(crate) async fn producer(
    backend: &Arc<dyn Backend>,
    queue: &str,
    levels: &[Priority],
) -> Result<Arc<dyn Broker>, String> {
    let queues = physical(queue, levels);
    let refs: Vec<&str> = queues.iter().map(String::as_str).collect();
    crate::support::handle(backend, &refs).await
}

/// Why the runtime cannot delay (retry backoff, delayed jobs) on this backend, if it cannot.
pub(crate) fn no_delay(broker: &Arc<dyn Broker>) -> Option<String> {
    (broker.capabilities().delay == DelaySupport::None && broker.delay_store().is_none()).then(
        || {
            "backend declares no native delay (DelaySupport::None) and has no delay store, so the \
             runtime cannot delay a job or a retry"
                .to_string()
        },
    )
}

/// The extra lateness a delayed message may show on this backend beyond its delay: the declared
/// tolerance, the idle poll, and the promoter period where a delay store is used.
pub(crate) fn delay_slack(broker: &Arc<dyn Broker>) -> Duration {
    let caps = broker.capabilities();
    let promote = if caps.delay == DelaySupport::None {
        PROMOTE_INTERVAL
    } else {
        Duration::ZERO
    };
    caps.delay_tolerance + POLL_WAIT + promote
}

/// Enqueues `job` with a JSON payload through `client`; returns the message id.
pub(crate) async fn enqueue(
    client: &Client,
    queue: &str,
    job: &str,
    payload: &serde_json::Value,
    priority: Priority,
) -> Result<String, String> {
    client
        .enqueue(job, payload)
        .queue(queue)
        .priority(priority)
        .send()
        .await
        .map_err(|e| format!("enqueue {job} to {queue}: {e}"))
}

/// Publishes `n` JSON jobs `{"i": k, "level": "<priority>"}` of `job` at `priority` in one call;
/// returns their ids. The level in the payload lets a handler tell the level a job was enqueued at
/// from the level it was received from.
pub(crate) async fn backlog(
    client: &Client,
    queue: &str,
    job: &str,
    priority: Priority,
    n: usize,
) -> Result<Vec<String>, String> {
    let envelopes: Vec<Envelope> = (0..n)
        .map(|k| {
            Envelope::new(job, format!("{{\"i\":{k},\"level\":\"{priority}\"}}"))
                .json()
                .with_priority(priority)
        })
        .collect();
    let ids = envelopes.iter().map(|e| e.id.clone()).collect();
    client
        .publish(queue, envelopes)
        .await
        .map_err(|e| format!("publish {n} {priority} jobs to {queue}: {e}"))?;
    Ok(ids)
}

/// One handler run, as recorded by the handler itself.
#[derive(Clone, Debug)]
pub(crate) struct Run {
    /// Message id.
    pub id: String,
    /// Job name it was routed by.
    pub job: String,
    /// Logical queue.
    pub queue: String,
    /// `JobContext::attempt`.
    pub attempt: u32,
    /// Level it was received from.
    pub priority: Priority,
    /// Id of the worker that ran it.
    pub worker: String,
    /// The payload the handler saw.
    pub body: Bytes,
    /// The headers the handler saw.
    pub headers: BTreeMap<String, String>,
    /// When the handler started.
    pub started: Instant,
    /// When the handler returned (`None`: still running, or cut off).
    pub ended: Option<Instant>,
}

/// Every handler run of a scenario, in start order. Cheap to clone (shared); used as the router's
/// state. Never locked across an `.await`.
#[derive(Clone, Debug, Default)]
pub(crate) struct Log(Arc<Mutex<Vec<Run>>>);

impl Log {
    fn lock(&self) -> MutexGuard<'_, Vec<Run>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records the start of a run; returns its index for [`Log::end`].
    pub(crate) fn start(&self, ctx: &JobContext, body: Bytes) -> usize {
        let mut runs = self.lock();
        runs.push(Run {
            id: ctx.id.clone(),
            job: ctx.job.clone(),
            queue: ctx.queue.clone(),
            attempt: ctx.attempt,
            priority: ctx.priority,
            worker: ctx.worker_id.to_string(),
            body,
            headers: ctx.headers.clone(),
            started: Instant::now(),
            ended: None,
        });
        runs.len() - 1
    }

    /// Records that run `i` returned.
    pub(crate) fn end(&self, i: usize) {
        if let Some(r) = self.lock().get_mut(i) {
            r.ended = Some(Instant::now());
        }
    }

    /// A copy of every run so far.
    pub(crate) fn runs(&self) -> Vec<Run> {
        self.lock().clone()
    }

    /// How many runs so far match `f`.
    pub(crate) fn count(&self, f: impl Fn(&Run) -> bool) -> usize {
        self.lock().iter().filter(|r| f(r)).count()
    }
}

/// Waits until `done()` holds, checking every 5 ms; returns how long it took. On timeout the
/// failure reason is `what()` (called then, so it can show the state reached).
pub(crate) async fn wait_for(
    within: Duration,
    mut done: impl FnMut() -> bool,
    what: impl FnOnce() -> String,
) -> Result<Duration, String> {
    let t0 = Instant::now();
    loop {
        if done() {
            return Ok(t0.elapsed());
        }
        if t0.elapsed() >= within {
            return Err(format!("{} (waited {})", what(), s2(within)));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Lists the dead letters of logical `queue` until exactly `n` are there, failing if more show up
/// or fewer than `n` within `within`.
pub(crate) async fn dead_letters(
    broker: &Arc<dyn Broker>,
    queue: &str,
    n: usize,
    within: Duration,
) -> Result<Vec<DeadLetter>, String> {
    let deadline = Instant::now() + within;
    loop {
        let got = dlq::list(broker, queue, n + 10)
            .await
            .ctx(format!("dlq::list({queue})"))?;
        ensure!(
            got.len() <= n,
            "{} dead letters listed for {queue}, {n} expected",
            got.len()
        );
        if got.len() == n {
            return Ok(got);
        }
        ensure!(
            Instant::now() < deadline,
            "{} of {n} dead letters listed for {queue} within {}",
            got.len(),
            s2(within)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until physical queue `physical` holds nothing (ready, in flight or delayed), allowing the
/// backend's declared depth staleness on top of `within`.
pub(crate) async fn wait_drained(
    broker: &Arc<dyn Broker>,
    physical: &str,
    within: Duration,
) -> Result<(), String> {
    let within = within + broker.capabilities().depth_staleness;
    let deadline = Instant::now() + within;
    loop {
        let d = broker
            .depth(physical)
            .await
            .ctx(format!("depth({physical})"))?;
        if d.ready + d.in_flight + d.delayed.unwrap_or(0) == 0 {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{physical} still holds ready/in_flight/delayed {}/{}/{:?} after {}: a message was left \
             behind or a copy was made",
            d.ready,
            d.in_flight,
            d.delayed,
            s2(within)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How a worker's `run()` ended.
#[derive(Debug)]
pub(crate) struct Stopped {
    /// What `run()` returned.
    pub report: RunReport,
    /// When shutdown was asked for.
    pub asked: Instant,
    /// From the shutdown request to `run()` returning.
    pub took: Duration,
}

/// A worker running in a task of its own. Dropping it triggers its shutdown (it then drains and
/// closes its handle in the background).
pub(crate) struct Running {
    /// The worker's id (in dead-letter headers and `JobContext::worker_id`).
    pub id: String,
    /// Its live counters.
    pub stats: Arc<Stats>,
    /// A producer on the worker's own broker handle (usable until the worker stops).
    pub client: Client,
    /// When `run()` was spawned.
    pub spawned_at: Instant,
    /// When the worker reported ready (fetching).
    pub ready_at: Instant,
    stop: ShutdownHandle,
    task: Option<JoinHandle<Result<RunReport, BrokerError>>>,
}

impl Running {
    /// Builds a worker from `toml` on a new handle of `backend`, spawns `run()` and waits until
    /// it is fetching.
    pub(crate) async fn start<S: Clone + Send + Sync + 'static>(
        backend: &Arc<dyn Backend>,
        router: Router<S>,
        toml: &str,
    ) -> Result<Running, String> {
        Self::start_with(backend, router, toml, None).await
    }

    /// As [`Running::start`], with a state store for the worker's schedules.
    pub(crate) async fn start_with<S: Clone + Send + Sync + 'static>(
        backend: &Arc<dyn Backend>,
        router: Router<S>,
        toml: &str,
        store: Option<Arc<dyn stevedore_core::store::Store>>,
    ) -> Result<Running, String> {
        let config =
            config::from_toml_str(toml, None).map_err(|e| format!("test worker config: {e}"))?;
        let broker = backend.connect().await.ctx("connect a worker")?;
        let mut worker = Worker::new(broker, router, config)
            .map_err(|e| format!("Worker::new refused the test config: {e}"))?;
        if let Some(store) = store {
            worker = worker.with_store(store);
        }
        let stats = worker.stats();
        let spawned_at = Instant::now();
        let mut running = Running {
            id: worker.id().to_string(),
            client: worker.client(),
            stats: stats.clone(),
            spawned_at,
            ready_at: spawned_at,
            stop: worker.shutdown_handle(),
            task: Some(tokio::spawn(worker.run())),
        };
        while !stats.is_ready() {
            if running.task.as_ref().is_some_and(|t| t.is_finished()) {
                let end = match running.task.take() {
                    Some(t) => format!("{:?}", t.await),
                    None => "gone".into(),
                };
                return Err(format!(
                    "worker {} stopped before it was ready: {end}",
                    running.id
                ));
            }
            ensure!(
                spawned_at.elapsed() < READY_WITHIN,
                "worker {} not ready within {} of run()",
                running.id,
                s2(READY_WITHIN)
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        running.ready_at = Instant::now();
        Ok(running)
    }

    /// The counters of logical `queue` (all zero if it has seen no job).
    pub(crate) fn snapshot(&self, queue: &str) -> QueueSnapshot {
        self.stats.snapshot().remove(queue).unwrap_or_default()
    }

    /// Asks for shutdown and waits up to `within` for `run()` to return.
    pub(crate) async fn stop(&mut self, within: Duration) -> Result<Stopped, String> {
        let asked = Instant::now();
        self.stop.shutdown();
        let Some(task) = self.task.take() else {
            return Err(format!("worker {} was already stopped", self.id));
        };
        match tokio::time::timeout(within, task).await {
            Ok(Ok(Ok(report))) => Ok(Stopped {
                report,
                asked,
                took: asked.elapsed(),
            }),
            Ok(Ok(Err(e))) => Err(format!("worker {}: run() failed: {e}", self.id)),
            Ok(Err(e)) => Err(format!("worker {}: run() task failed: {e}", self.id)),
            Err(_) => Err(format!(
                "worker {}: run() had not returned {} after shutdown was asked",
                self.id,
                s2(within)
            )),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            self.stop.shutdown();
            DROPPED.lock().unwrap_or_else(|p| p.into_inner()).push(task);
        }
    }
}

/// Workers dropped without [`Running::stop`]: their `run()` goes on draining in the background.
/// The runner waits for them ([`drain_dropped`]) before it returns, so none of them still writes
/// to the broker (a dead letter, a release) when the suite cleans up.
static DROPPED: Mutex<Vec<JoinHandle<Result<RunReport, BrokerError>>>> = Mutex::new(Vec::new());

/// Waits up to `within` for every dropped worker to finish, then aborts those that have not.
/// Returns how many were aborted.
pub(crate) async fn drain_dropped(within: Duration) -> usize {
    let tasks = std::mem::take(&mut *DROPPED.lock().unwrap_or_else(|p| p.into_inner()));
    let deadline = tokio::time::Instant::now() + within;
    let mut aborted = 0;
    for mut task in tasks {
        if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
            task.abort();
            // An aborted task stops at its next poll: wait for that.
            let _ = tokio::time::timeout(Duration::from_secs(1), task).await;
            aborted += 1;
        }
    }
    aborted
}

/// Joins the results of independent sub-checks: every detail when all passed, else every failure.
pub(crate) fn combine(parts: Vec<(&str, Result<String, String>)>) -> Result<String, String> {
    let mut details = Vec::new();
    let mut failures = Vec::new();
    for (name, r) in parts {
        match r {
            Ok(d) => details.push(format!("{name}: {d}")),
            Err(e) => failures.push(format!("{name}: {e}")),
        }
    }
    if failures.is_empty() {
        Ok(details.join("; "))
    } else {
        Err(failures.join("; "))
    }
}
