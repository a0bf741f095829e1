//! The worker runtime: one fetch loop per logical queue, a task per job, a batched acker. The
//! acts on a finished job live with their subject: [`crate::retry::retry_later`],
//! [`crate::dlq::dead_letter`], [`crate::delay::hop`], all through [`forward`]; supervision
//! (timeout, panics, heartbeats, hard stop) is in `supervise`.
//!
//! ```text
//!   fetch loop (per queue) --receive--> job task --ack--> acker --ack(batch)--> broker
//!        ^  priority::Selector             |  retry: republish attempt+1 with backoff, then ack
//!        |  global + per-queue slots       |  dead letter: publish to <queue>__dlq, then ack
//!        +------------- finished ----------+  lease heartbeat while it runs; release on hard stop
//! ```

use crate::config::RetryConfig;
use crate::config::{Config, QueueConfig};
use crate::delay::{self, hop, Scheduler};
use crate::dlq::dead_letter;
use crate::handler::{JobContext, JobParts};
use crate::priority::{Level, Selector};
use crate::retry::retry_later;
use crate::retry::Decision;
use crate::router::Routes;
use crate::shutdown::ShutdownHandle;
use crate::stats::{JobResult, QueueStats, Stats};
use crate::JobError;
use futures::FutureExt;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime};
use stevedore_core::{
    names, Broker, BrokerError, Delivery, Envelope, Priority, Receipt, ReceiveOptions,
};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tracing::Instrument;

mod supervise;

use supervise::{flatten, supervise_slow, Supervised};

/// Everything a job task needs, shared per logical queue.
pub(crate) struct QueueCtx {
    pub name: String,
    pub cfg: QueueConfig,
    pub routes: Routes,
    pub scheduler: Scheduler,
    pub stats: Arc<QueueStats>,
    pub acks: mpsc::UnboundedSender<Receipt>,
    /// Jobs that ended, as (level index, how many).
    pub finished: mpsc::UnboundedSender<(usize, usize)>,
    pub worker_id: Arc<str>,
    /// Handed to handlers (the `Client` extractor).
    pub client: crate::Client,
    pub hard_stop: watch::Receiver<bool>,
    pub lease_timed: bool,
    /// Retry policy and timeout of every registered job on this queue, resolved once at start:
    /// exactly the router's job names (one lookup per job says both whether it is routable and
    /// how it runs).
    pub jobs: std::collections::BTreeMap<String, (RetryConfig, Duration)>,
    /// Rate and concurrency limits on this queue's jobs.
    pub limits: crate::limit::Limits,
    /// Until when (Unix ms) this queue's fetching pauses: a queue-wide limit said no.
    pub paused_until: Arc<std::sync::atomic::AtomicU64>,
    /// Inbox and status recording, for queues that have either.
    pub effects: Option<Arc<crate::effects::Effects>>,
}

impl QueueCtx {
    pub(crate) fn broker(&self) -> &Arc<dyn Broker> {
        self.scheduler.broker()
    }
}

/// The slots a running job holds (queue-wide, per job name); given back when dropped.
type Held = Box<(
    Option<crate::limit::SlotGuard>,
    Option<crate::limit::SlotGuard>,
)>;

/// What the limits say about one job.
enum Gate {
    Go(Held),
    /// Not yet: wait this long; `true` when a queue-wide limit said so.
    Wait(Duration, bool),
}

/// Asks the queue's limit, then the job name's.
async fn admit(
    limits: &crate::limit::Limits,
    job: Option<&str>,
    id: &str,
) -> Result<Gate, BrokerError> {
    use crate::limit::Admission;
    let mut held: Held = Box::new((None, None));
    if let Some(q) = &limits.queue {
        // The queue's rate was taken before the receive (see the fetch loop): slots only.
        match q.admit(id, false).await? {
            Admission::Go(g) => held.0 = g,
            Admission::Wait(w) => return Ok(Gate::Wait(w, true)),
        }
    }
    if let Some(l) = job.and_then(|j| limits.jobs.get(j)) {
        match l.admit(id, true).await? {
            Admission::Go(g) => held.1 = g,
            Admission::Wait(w) => return Ok(Gate::Wait(w, false)),
        }
    }
    Ok(Gate::Go(held))
}

/// A job its limits did not admit: put off ([`defer`]), also when the state store could not be
/// asked (no limit can be kept without it), with the queue paused a moment rather than run over
/// the limit.
async fn put_off(ctx: &QueueCtx, d: Delivery, verdict: Result<Gate, BrokerError>) {
    match verdict {
        Ok(Gate::Wait(wait, queue_wide)) => defer(ctx, d, wait, queue_wide, "limited").await,
        // Not reached: run_job runs admitted jobs itself.
        Ok(Gate::Go(_)) => {}
        Err(e) => {
            // Put off like a limited job (a release would count a delivery, and enough of them
            // would dead-letter a job that never ran), and the queue pauses a moment.
            tracing::warn!(error = %e, "state store unreachable: cannot check this job's limits; put it off for 1s");
            defer(ctx, d, Duration::from_secs(1), true, "limits unknown").await;
        }
    }
}

/// A job a limit (or its inbox) put off, `why`: published again on its queue, not before `wait`
/// from now (plus a little jitter, so put-off jobs do not all come back at once), with its
/// attempt so far and the same id; then its delivery is acked. A queue-wide limit also pauses
/// the queue's fetching for that long. If the publish fails the delivery is released instead.
async fn defer(ctx: &QueueCtx, d: Delivery, wait: Duration, queue_wide: bool, why: &str) {
    let now = SystemTime::now();
    if queue_wide {
        let until = stevedore_core::to_millis(now + wait);
        ctx.paused_until
            .fetch_max(until, std::sync::atomic::Ordering::Relaxed);
    }
    let jitter = rand::random_range(Duration::ZERO..=(wait / 4).min(Duration::from_millis(250)));
    let attempt = d.attempt();
    let mut envelope = d.envelope;
    envelope.attempt = attempt;
    envelope.not_before = Some(now + wait + jitter);
    stevedore_core::wire::mark_resent(&mut envelope);
    // A queue-wide rate token was taken for this job before the receive: it did not run.
    if let Some(q) = ctx.limits.queue.as_ref().filter(|q| q.has_rate()) {
        q.give_back(1).await;
    }
    let to = d.receipt.queue().to_string();
    tracing::debug!(id = %envelope.id, wait = ?wait, why, "job put off");
    ctx.stats.deferred();
    if let Err(e) = forward(ctx, d.receipt, &to, envelope).await {
        tracing::warn!(error = %e, why, "could not put off a job; released it");
    }
}

/// The levels of a queue as configured ([`QueueConfig::levels`], the one place levels come from;
/// validation refuses a queue without any), with their weights, reservations and physical names.
pub(crate) fn levels_of(name: &str, cfg: &QueueConfig) -> Vec<Level> {
    cfg.levels()
        .into_iter()
        .map(|priority| Level {
            priority,
            physical: names::physical(name, priority),
            weight: cfg.weights.get(&priority).copied().unwrap_or(1),
            reserved: cfg.reserved.get(&priority).copied().unwrap_or(0),
        })
        .collect()
}

/// Exponential backoff for broker errors in loops: 100 ms doubling to 5 s.
#[derive(Debug, Default)]
pub(crate) struct ErrorBackoff {
    failures: u32,
    /// When the current run of failures began.
    since: Option<Instant>,
}

impl ErrorBackoff {
    pub(crate) fn next(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        self.since.get_or_insert_with(Instant::now);
        let ms = 100u64.saturating_mul(1 << self.failures.min(6));
        Duration::from_millis(ms.min(5_000))
    }
    pub(crate) fn reset(&mut self) {
        self.failures = 0;
        self.since = None;
    }
    /// After a success: how many failures in a row it ends and for how long they lasted, if
    /// any (then resets).
    pub(crate) fn recovered(&mut self) -> Option<(u32, Duration)> {
        let ended = self.since.map(|t| (self.failures, t.elapsed()));
        self.reset();
        ended
    }
}

/// Most receives of one fetch loop in flight at once. A second receive is started only while
/// the last one came back full (a backlog) and slots are free, so the broker has the next batch
/// on its way while this one is handed out: on a broker that groups writes (sqlite) or pipelines
/// commands (redis), the next claim then shares a round trip or a commit with the acks.
const PIPELINE: usize = 2;

/// One receive started by the fetch loop, with the slots it holds for what it brings.
struct Fetched {
    index: usize,
    priority: Priority,
    physical: String,
    permits: Vec<OwnedSemaphorePermit>,
    result: Result<Vec<Delivery>, BrokerError>,
    /// The queue's rate gave no token: nothing was asked of the broker (the level is not empty).
    throttled: bool,
}

/// The fetch loop of one logical queue. Ends when `soft` turns true; messages received after that
/// are released at once.
pub(crate) async fn fetch_loop(
    ctx: Arc<QueueCtx>,
    global: Arc<Semaphore>,
    mut finished_rx: mpsc::UnboundedReceiver<(usize, usize)>,
    mut soft: watch::Receiver<bool>,
    poll_wait: Duration,
) {
    let mode = ctx.cfg.mode;
    let levels = levels_of(&ctx.name, &ctx.cfg);
    let n_levels = levels.len() as u32;
    let probe_after = (poll_wait / 4).clamp(Duration::from_millis(20), Duration::from_millis(250));
    let mut selector = Selector::new(
        levels,
        mode,
        ctx.cfg.concurrency,
        ctx.cfg.aging,
        probe_after,
        Instant::now(),
    );
    let idle_wait = (poll_wait / n_levels.max(1)).max(Duration::from_millis(10));
    let mut backoff = ErrorBackoff::default();
    let mut fetches: tokio::task::JoinSet<Fetched> = tokio::task::JoinSet::new();
    // Whether the last receive brought all it asked for: only then is another one started
    // before it is handed out.
    let mut full = false;
    'run: loop {
        if *soft.borrow() {
            break;
        }
        while let Ok((i, n)) = finished_rx.try_recv() {
            selector.finished(i, n);
        }
        // A queue-wide limit said no: pull nothing, and hold no slot, until it may say yes.
        let paused = Duration::from_millis(
            ctx.paused_until
                .load(std::sync::atomic::Ordering::Relaxed)
                .saturating_sub(stevedore_core::to_millis(SystemTime::now())),
        );
        if !paused.is_zero() && fetches.is_empty() {
            tokio::select! {
                _ = tokio::time::sleep(paused.min(poll_wait)) => {}
                Some((i, n)) = finished_rx.recv() => selector.finished(i, n),
                _ = soft.changed() => {}
            }
            continue;
        }
        if fetches.is_empty() || (full && fetches.len() < PIPELINE) {
            let mut permits = Vec::new();
            if fetches.is_empty() {
                // Nothing on its way: wait for a slot.
                if selector.pick_would_run() {
                    tokio::select! {
                        p = global.clone().acquire_owned() => match p {
                            Ok(p) => permits.push(p),
                            Err(_) => break,
                        },
                        _ = soft.changed() => continue,
                    }
                }
            } else if let Ok(p) = global.clone().try_acquire_owned() {
                permits.push(p);
            }
            if !permits.is_empty() {
                match selector.pick(Instant::now()) {
                    // A long poll only when nothing else is on its way.
                    Some(pick) if !pick.idle || fetches.is_empty() => {
                        // No point pulling more than the queue may run at once anywhere.
                        let most = ctx
                            .limits
                            .queue
                            .as_ref()
                            .and_then(|l| l.max_concurrent())
                            .map_or(usize::MAX, |n| n as usize);
                        let want = pick.capacity.min(ctx.cfg.batch).min(most).max(1);
                        while permits.len() < want {
                            match global.clone().try_acquire_owned() {
                                Ok(p) => permits.push(p),
                                Err(_) => break,
                            }
                        }
                        permits.truncate(want);
                        selector.reserve(pick.index, permits.len());
                        let level = selector.level(pick.index);
                        let (priority, physical) = (level.priority, level.physical.clone());
                        let opts = ReceiveOptions {
                            max: permits.len(),
                            wait: if pick.idle { idle_wait } else { Duration::ZERO },
                            lease: ctx.cfg.lease,
                        };
                        let broker = ctx.broker().clone();
                        let index = pick.index;
                        let paused = ctx.paused_until.clone();
                        let rate = ctx.limits.queue.clone().filter(|l| l.has_rate());
                        fetches.spawn(async move {
                            let mut opts = opts;
                            let mut tokens = 0;
                            let mut result = Ok(Vec::new());
                            let mut throttled = false;
                            if let Some(l) = &rate {
                                match l.take_up_to(opts.max as u32).await {
                                    Ok(Ok(n)) => {
                                        tokens = n;
                                        opts.max = n as usize;
                                    }
                                    Ok(Err(wait)) => {
                                        // The fetch loop waits this out, holding no slot.
                                        let until =
                                            stevedore_core::to_millis(SystemTime::now() + wait);
                                        paused
                                            .fetch_max(until, std::sync::atomic::Ordering::Relaxed);
                                        throttled = true;
                                        opts.max = 0;
                                    }
                                    Err(e) => {
                                        result = Err(e);
                                        opts.max = 0;
                                    }
                                }
                            }
                            if opts.max > 0 {
                                // A receive that panics comes back as an error like any other,
                                // with its slots, so the selector gets them back.
                                result = AssertUnwindSafe(broker.receive(&physical, opts))
                                    .catch_unwind()
                                    .await
                                    .unwrap_or_else(|_| {
                                        Err(BrokerError::transient("the broker's receive panicked"))
                                    });
                            }
                            if let Some(l) = &rate {
                                let got = result.as_ref().map_or(0, |d| d.len()) as u32;
                                l.give_back(tokens.saturating_sub(got)).await;
                            }
                            Fetched {
                                index,
                                priority,
                                physical,
                                permits,
                                result,
                                throttled,
                            }
                        });
                        continue;
                    }
                    _ => drop(permits),
                }
            }
        }
        let fetched = tokio::select! {
            Some(done) = fetches.join_next(), if !fetches.is_empty() => match done {
                Ok(f) => f,
                // Only a cancelled task ends without its `Fetched`, and none is cancelled while
                // the loop runs.
                Err(e) => {
                    tracing::error!(queue = %ctx.name, error = %e, "a receive task was lost");
                    full = false;
                    continue;
                }
            },
            Some((i, n)) = finished_rx.recv() => {
                selector.finished(i, n);
                continue;
            }
            _ = soft.changed() => continue,
        };
        let Fetched {
            index,
            priority,
            physical,
            mut permits,
            result,
            throttled,
        } = fetched;
        selector.unreserve(index, permits.len());
        if throttled {
            // Not an empty level (that would hand its turn to lower levels): the loop pauses.
            full = false;
            continue;
        }
        match result {
            Ok(deliveries) => {
                if let Some((failures, down)) = backoff.recovered() {
                    tracing::info!(queue = %ctx.name, %physical, failures, down = ?down, "receive works again: the broker answers");
                }
                full = deliveries.len() >= permits.len();
                selector.received(index, deliveries.len(), Instant::now());
                if *soft.borrow() {
                    release_unstarted(&ctx, deliveries).await;
                    break 'run;
                }
                permits.truncate(deliveries.len());
                tokio::spawn(run_batch(ctx.clone(), priority, index, deliveries, permits));
            }
            Err(e) => {
                full = false;
                drop(permits);
                let pause = backoff.next();
                tracing::warn!(queue = %ctx.name, %physical, error = %e, transient = e.is_transient(), retry_in = ?pause, "receive failed");
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = soft.changed() => {}
                }
            }
        }
    }
    // Receives still on their way when the loop stopped: what they bring goes back at once.
    while let Some(done) = fetches.join_next().await {
        if let Ok(Fetched {
            result: Ok(deliveries),
            ..
        }) = done
        {
            release_unstarted(&ctx, deliveries).await;
        }
    }
}

/// Gives back deliveries that never ran: uncounted, since nothing was attempted.
async fn release_unstarted(ctx: &QueueCtx, deliveries: Vec<Delivery>) {
    if deliveries.is_empty() {
        return;
    }
    if let Err(e) = ctx.broker().release_uncounted(deliveries).await {
        tracing::warn!(queue = %ctx.name, error = %e, "could not release messages received during shutdown; they return after their lease");
    }
}

/// `$fut`, boxed: the job's rare paths, so that their state is not part of every job's future.
macro_rules! boxed {
    ($fut:expr) => {{
        let boxed: futures::future::BoxFuture<'_, _> = Box::pin($fut);
        boxed
    }};
}

/// Jobs a batch finishes before it hands their slots back: the selector and the global
/// semaphore then hear of them in one message and one release, not one per job, while a batch
/// of slow jobs still frees its slots as it goes.
const SLOTS_BACK_EVERY: usize = 16;

/// How long a batch runs its jobs' first polls one after the other before it hands the rest to
/// tasks of their own: quick jobs share one task, while jobs that compute for a while still spread
/// over the runtime's threads (another thread can take a task, not the rest of a batch).
const INLINE_BUDGET: Duration = Duration::from_millis(1);

/// Starts the jobs of one receive, one after the other, each with its slot: a job that finishes
/// on its first poll (most do: a no-op one, a quick computation, I/O that is ready) finishes here,
/// without a task of its own; one still pending after it goes on as a task of its own (its next
/// poll, in that task, registers the task's waker). One task per receive rather than per job:
/// a task costs an allocation, a registration and a wake-up, about a sixth of what the runtime
/// spent on a no-op job. Once the batch has spent [`INLINE_BUDGET`] on first polls, each job left
/// gets a task of its own at once, as every job did before.
async fn run_batch(
    ctx: Arc<QueueCtx>,
    priority: Priority,
    index: usize,
    deliveries: Vec<Delivery>,
    permits: Vec<OwnedSemaphorePermit>,
) {
    // Slots of jobs finished here and not yet given back.
    let mut done: Option<OwnedSemaphorePermit> = None;
    let started = Instant::now();
    for (d, permit) in deliveries.into_iter().zip(permits) {
        let mut job = Box::pin(run_job(ctx.clone(), priority, d));
        let first = if started.elapsed() < INLINE_BUDGET {
            std::future::poll_fn(|cx| Poll::Ready(job.poll_unpin(cx))).await
        } else {
            Poll::Pending
        };
        if first.is_pending() {
            let ctx = ctx.clone();
            tokio::spawn(async move {
                job.await;
                let _ = ctx.finished.send((index, 1));
                drop(permit);
            });
            continue;
        }
        let held = match &mut done {
            Some(slots) => {
                slots.merge(permit);
                slots.num_permits()
            }
            None => done.insert(permit).num_permits(),
        };
        if held >= SLOTS_BACK_EVERY {
            give_back(&ctx, index, done.take());
        }
    }
    give_back(&ctx, index, done);
}

/// Tells the fetch loop that the jobs holding `slots` ended, and frees the slots.
fn give_back(ctx: &QueueCtx, index: usize, slots: Option<OwnedSemaphorePermit>) {
    if let Some(slots) = slots {
        let _ = ctx.finished.send((index, slots.num_permits()));
    }
}

/// One job: runs one delivery to its end (handler, then ack / retry / dead letter / release,
/// all inside the job's span); [`run_batch`] gives its slot back.
///
/// One async fn, kept small (see the `job_future_stays_small` test): it is allocated for every
/// job, and moved into a task of its own when it does not finish at once; it was 2.6 KB when it
/// was three nested async fns (each kept its own copy of the delivery). The common path awaits
/// nothing but the handler's first poll; the rare ones (a handler still pending after it, a
/// failure, an unroutable or early message, an ack on a broker that acks locally) await futures
/// made and boxed by `boxed!`.
async fn run_job(ctx: Arc<QueueCtx>, priority: Priority, d: Delivery) {
    let c = &*ctx;
    if let Some(early) = c.scheduler.early_by(&d.envelope, SystemTime::now()) {
        boxed!(hop(c, d, early)).await;
    } else {
        let job = d.envelope.job.clone().or_else(|| c.cfg.default_job.clone());
        // Held until this function ends: the job's concurrency slots, if limited.
        let mut _held = None;
        if c.limits.applies(job.as_deref()) {
            match boxed!(admit(&c.limits, job.as_deref(), &d.envelope.id)).await {
                Ok(Gate::Go(held)) => _held = Some(held),
                other => {
                    boxed!(put_off(c, d, other)).await;
                    return;
                }
            }
        }
        let attempt = d.attempt();
        // The inbox claim and status of a job on a queue that records them.
        let mut begun = None;
        if let (Some(effects), Some(j)) = (&c.effects, job.as_deref()) {
            // Past its last attempt (the crash loop below): unless its inbox says it succeeded
            // (an ack was lost: a duplicate) or another delivery of it still runs (put off).
            let over = c.jobs.get(j).is_some_and(|(r, _)| attempt > r.max_attempts);
            if over {
                use crate::effects::Over;
                match boxed!(crate::effects::over(effects, j, &d.envelope.id)).await {
                    Over::Done => {
                        boxed!(skip_duplicate(c, d)).await;
                        return;
                    }
                    Over::Busy => {
                        let why = "past its last attempt while another delivery of it runs, or the state store did not answer";
                        boxed!(defer(c, d, Duration::from_secs(1), false, why)).await;
                        return;
                    }
                    Over::Nothing => {}
                }
            }
            if let Some(&(retry, _)) = c.jobs.get(j).filter(|(r, _)| attempt <= r.max_attempts) {
                use crate::effects::Begin;
                let (queue, worker) = (&c.name, &*c.worker_id);
                let env = &d.envelope;
                let max = retry.max_attempts;
                match boxed!(crate::effects::begin(
                    effects, queue, j, env, attempt, max, worker
                ))
                .await
                {
                    Begin::Run(b) => begun = Some(b),
                    Begin::Duplicate => {
                        boxed!(skip_duplicate(c, d)).await;
                        return;
                    }
                    Begin::Busy(wait) => {
                        boxed!(defer(c, d, wait, false, "another delivery of this idempotent job runs, or the state store did not answer")).await;
                        return;
                    }
                }
            }
        }
        let span = job_span(c, job.as_deref().unwrap_or("-"), &d.envelope, attempt);
        let started = Instant::now();
        c.stats.started();
        let running = c.stats.track(
            job.as_deref().unwrap_or("-"),
            &d.envelope.id,
            attempt,
            started,
        );
        let (name, result) = match job {
            Some(job) => match c.jobs.get(&job) {
                Some(&(retry, timeout)) => {
                    if attempt > retry.max_attempts {
                        let max = retry.max_attempts;
                        boxed!(crash_loop(c, job, d, attempt, max).instrument(span.clone())).await
                    } else {
                        // Fields move out of `d` straight into place: a local holding them would
                        // keep its own slot in this future.
                        let parts = Arc::new(JobParts {
                            context: JobContext {
                                id: d.envelope.id.clone(),
                                job,
                                queue: c.name.clone(),
                                priority,
                                attempt,
                                max_attempts: retry.max_attempts,
                                enqueued_at: d.envelope.enqueued_at,
                                headers: d.envelope.headers.clone(),
                                worker_id: c.worker_id.clone(),
                                effects: begun.as_ref().and_then(|b| b.shared.clone()),
                            },
                            envelope: d.envelope,
                            client: c.client.clone(),
                        });
                        let outcome = match c.routes.dispatch(&parts.context.job, parts.clone()) {
                            Some(fut) => {
                                let mut fut = AssertUnwindSafe(fut).catch_unwind();
                                // Most jobs finish on their first poll: no timers, nothing boxed.
                                let done = std::future::poll_fn(|cx| {
                                    let _in = span.enter();
                                    Poll::Ready(match fut.poll_unpin(cx) {
                                        Poll::Ready(r) => Some(flatten(r)),
                                        Poll::Pending => None,
                                    })
                                })
                                .await;
                                match done {
                                    Some(r) => {
                                        drop(fut);
                                        Supervised::Done(r)
                                    }
                                    None => {
                                        let receipt = &d.receipt;
                                        let claim = begun.as_deref();
                                        boxed!(supervise_slow(c, fut, receipt, timeout, claim)
                                            .instrument(span.clone()))
                                        .await
                                    }
                                }
                            }
                            None => Supervised::Done(Err(JobError::permanent("handler vanished"))),
                        };
                        match outcome {
                            Supervised::Done(Ok(()))
                                if !c.broker().acks_locally()
                                    && begun.is_none()
                                    && unique_hold(&c.name, &parts.envelope).is_none() =>
                            {
                                let _ = c.acks.send(d.receipt);
                                (JobParts::into_job(parts), JobResult::Succeeded)
                            }
                            outcome => {
                                let (receipt, count) = (d.receipt, d.delivery_count);
                                let begun = begun.take();
                                boxed!(settle(c, parts, receipt, count, retry, outcome, begun)
                                    .instrument(span.clone()))
                                .await
                            }
                        }
                    }
                }
                None => boxed!(unroutable(c, Some(job), d, attempt).instrument(span.clone())).await,
            },
            None => boxed!(unroutable(c, None, d, attempt).instrument(span.clone())).await,
        };
        drop(running);
        c.stats.finished(&name, result, started.elapsed());
    }
}

/// The span a job runs in (with the `otel` feature on and an OpenTelemetry layer installed, the
/// consumer span of the message's trace).
fn job_span(ctx: &QueueCtx, job: &str, env: &Envelope, attempt: u32) -> tracing::Span {
    #[cfg(feature = "otel")]
    if crate::otel::enabled() {
        return crate::otel::job_span(ctx.broker().name(), &ctx.name, job, env, attempt);
    }
    tracing::info_span!("job", queue = %ctx.name, job = job, id = %env.id, attempt)
}

/// Dead-letters a message no handler can take; returns its job name ("-" without one).
async fn unroutable(
    ctx: &QueueCtx,
    job: Option<String>,
    d: Delivery,
    attempt: u32,
) -> (String, JobResult) {
    let (name, err) = match job {
        None => (
            "-".to_string(),
            JobError::permanent(format!(
                "message has no job name and queue '{}' has no default_job",
                ctx.name
            )),
        ),
        Some(job) => {
            let err = JobError::permanent(format!(
                "no handler registered for job '{job}' (registered: {})",
                ctx.routes.names().join(", ")
            ));
            (job, err)
        }
    };
    let result = dead_letter(ctx, d, attempt, &err, "unroutable").await;
    (name, result)
}

/// Dead-letters a job delivered past its last attempt: every one of its allowed attempts ended
/// without a result (the worker died running it, a job that aborts or exhausts its process, or
/// its lease ended). Running it again would only loop.
async fn crash_loop(
    ctx: &QueueCtx,
    job: String,
    d: Delivery,
    attempt: u32,
    max_attempts: u32,
) -> (String, JobResult) {
    let err = JobError::permanent(format!(
        "delivered for attempt {attempt} of {max_attempts}: the earlier deliveries ended \
         without a result (the worker died running it, or its lease ended)"
    ));
    if let Some(effects) = &ctx.effects {
        crate::effects::dead_on_arrival(effects, &ctx.name, &job, &d.envelope, attempt, &err).await;
    }
    (job, dead_letter(ctx, d, attempt, &err, "crash loop").await)
}

/// Acks a delivery of a job that already succeeded (its inbox mark says so) without running it.
async fn skip_duplicate(ctx: &QueueCtx, d: Delivery) {
    tracing::debug!(id = %d.envelope.id, "duplicate delivery of a job that already succeeded: acked without running");
    // A queue-wide rate token was taken for this delivery before the receive: it did not run.
    if let Some(q) = ctx.limits.queue.as_ref().filter(|q| q.has_rate()) {
        q.give_back(1).await;
    }
    ctx.stats.duplicate();
    if let Some(effects) = &ctx.effects {
        crate::effects::duplicate_seen(effects, &d.envelope.id).await;
    }
    ack(ctx, d.receipt).await;
}

/// Settles a job that ran: acked (on a broker that acks locally), released (hard stop), retried
/// later, or dead-lettered. Returns its job name and how it ended.
async fn settle(
    ctx: &QueueCtx,
    parts: Arc<JobParts>,
    receipt: Receipt,
    delivery_count: u32,
    retry: RetryConfig,
    outcome: Supervised,
    begun: Option<Box<crate::effects::Begun>>,
) -> (String, JobResult) {
    use crate::effects::End;
    let attempt = parts.context.attempt;
    // The handler future is gone, so this is the only reference left: the envelope and the job
    // name come back without a copy.
    let (envelope, job) = Arc::try_unwrap(parts)
        .map(|p| (p.envelope, p.context.job))
        .unwrap_or_else(|p| (p.envelope.clone(), p.context.job.clone()));
    let hold = unique_hold(&ctx.name, &envelope);
    let d = Delivery {
        envelope,
        receipt,
        delivery_count,
    };
    // Inbox and status are recorded before the act that settles the job.
    let effects = ctx.effects.as_deref().zip(begun);
    let end = |how| crate::effects::end_if(effects, how);
    let result = match outcome {
        Supervised::Done(Ok(())) => {
            end(End::Succeeded).await;
            ack(ctx, d.receipt).await;
            release_unique(ctx, hold).await;
            JobResult::Succeeded
        }
        Supervised::Aborted => {
            end(End::Released).await;
            // Cut off by a shutdown, not failed: the attempt is not used up, so deploys cannot
            // dead-letter a job. A crash (the lease running out) still counts.
            match ctx.broker().release_uncounted(vec![d]).await {
                Ok(()) => {
                    tracing::info!("shutdown deadline passed: job released for another worker")
                }
                Err(e) => {
                    tracing::warn!(error = %e, "shutdown deadline passed and release failed: the job returns after its lease")
                }
            }
            JobResult::Released
        }
        Supervised::Done(Err(err)) => {
            let unit: f64 = rand::random();
            match retry.decide(
                &err,
                attempt,
                d.envelope.enqueued_at,
                SystemTime::now(),
                unit,
            ) {
                Decision::Retry { delay } => {
                    let at = SystemTime::now() + delay;
                    end(End::Retrying { error: &err, at }).await;
                    retry_later(ctx, d, attempt, &err, delay, retry.level).await
                }
                Decision::DeadLetter { reason } => {
                    end(End::Dead { error: &err }).await;
                    dead_letter(ctx, d, attempt, &err, &reason).await
                }
            }
        }
    };
    (job, result)
}

/// For a job whose unique key holds until it is done (`until_done`): the key and the job id
/// (its value). Cheap for every other job: most carry no headers at all.
pub(crate) fn unique_hold(queue: &str, env: &Envelope) -> Option<(String, String)> {
    if env.headers.is_empty() || !env.headers.contains_key(crate::client::UNIQUE_HEADER) {
        return None;
    }
    let dedup = env.dedup_key.as_deref()?;
    Some((crate::client::unique_key(queue, dedup), env.id.clone()))
}

/// Releases a finished job's unique key (see [`unique_hold`]) if it still holds it: the key may
/// have lapsed and gone to another job since, which keeps it.
pub(crate) async fn release_unique(ctx: &QueueCtx, hold: Option<(String, String)>) {
    let (Some((key, id)), Some(store)) = (hold, ctx.client.store()) else {
        return;
    };
    match store.swap(&key, Some(id.as_bytes()), None, None).await {
        Ok(released) => tracing::debug!(key, released, "unique key of a finished job"),
        Err(e) => {
            tracing::warn!(error = %e, key, "could not release the unique key of a finished job; it lapses after its window")
        }
    }
}

/// The one "publish a copy, then settle the original" act (a delay hop, a retry, a dead letter):
/// publishes `copy` to physical queue `to` through the scheduler (a future `not_before` waits
/// natively or in the delay store, never in this process), then acks the original. When the
/// publish fails, releases the original instead, so the message comes back rather than being
/// lost; the caller logs the error. At-least-once: a crash between the two steps duplicates,
/// never loses.
pub(crate) async fn forward(
    ctx: &QueueCtx,
    receipt: Receipt,
    to: &str,
    copy: Envelope,
) -> Result<(), BrokerError> {
    forward_held(ctx, receipt, to, copy, Duration::ZERO).await
}

/// [`forward`], but when the copy cannot be published, the original is held for `hold` before
/// it is released, so a job whose retry could not be scheduled (the broker's delay queues
/// unreachable while its work queue is not) comes back no sooner than that instead of at once,
/// again and again. The hold runs in a task of its own: the job's slot is free at once. A timed
/// lease is renewed first (`hold` is at most half of it); the hold ends early at the worker's
/// hard stop. Should the worker close first, the job comes back as after any lost lease.
pub(crate) async fn forward_held(
    ctx: &QueueCtx,
    receipt: Receipt,
    to: &str,
    copy: Envelope,
    hold: Duration,
) -> Result<(), BrokerError> {
    match ctx.scheduler.publish(to, vec![copy]).await {
        Ok(()) => {
            ack(ctx, receipt).await;
            Ok(())
        }
        Err(e) if hold.is_zero() => {
            let _ = ctx.broker().release(&[receipt]).await;
            Err(e)
        }
        Err(e) => {
            let broker = ctx.broker().clone();
            let mut stop = ctx.hard_stop.clone();
            let (timed, lease) = (ctx.lease_timed, ctx.cfg.lease);
            tokio::spawn(async move {
                if timed {
                    match broker.extend_lease(&receipt, lease).await {
                        Ok(()) => {}
                        // Taken over already: it is another worker's now.
                        Err(BrokerError::LeaseLost { .. }) => return,
                        Err(_) => {
                            let _ = broker.release(&[receipt]).await;
                            return;
                        }
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(hold) => {}
                    _ = supervise::turned_true(&mut stop) => {}
                }
                let _ = broker.release(&[receipt]).await;
            });
            Err(e)
        }
    }
}

/// `s` cut to at most `max` bytes at a character boundary, with `…` when cut.
pub(crate) fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// Settles a finished job: in the background acker's next batch, or at once where the broker
/// acks locally ([`Broker::acks_locally`]: the next receive's write then carries it).
async fn ack(ctx: &QueueCtx, receipt: Receipt) {
    let broker = ctx.broker();
    if broker.acks_locally() {
        match broker.ack(std::slice::from_ref(&receipt)).await {
            Ok(()) => {}
            Err(BrokerError::LeaseLost { queue }) => {
                tracing::warn!(%queue, "ack after the lease was lost: the job may run again elsewhere");
            }
            // A local ack fails only on a closed handle; the acker retries what it can.
            Err(_) => {
                let _ = ctx.acks.send(receipt);
            }
        }
    } else {
        let _ = ctx.acks.send(receipt);
    }
}

/// Acks in batches: whatever has queued up since the last call goes in one broker call.
pub(crate) async fn acker(broker: Arc<dyn Broker>, mut rx: mpsc::UnboundedReceiver<Receipt>) {
    let max = broker.capabilities().max_batch.max(1);
    let mut buf = Vec::with_capacity(max);
    while rx.recv_many(&mut buf, max).await > 0 {
        let mut backoff = ErrorBackoff::default();
        for tries in 1.. {
            match broker.ack(&buf).await {
                Ok(()) => break,
                Err(BrokerError::LeaseLost { queue }) => {
                    tracing::warn!(%queue, "ack after the lease was lost: the job may run again elsewhere");
                    break;
                }
                Err(e) if e.is_transient() && tries < 8 => {
                    let pause = backoff.next();
                    tracing::warn!(error = %e, retry_in = ?pause, "ack failed; retrying");
                    tokio::time::sleep(pause).await;
                }
                Err(e) => {
                    tracing::error!(error = %e, count = buf.len(), "ack failed for good: these jobs will run again after their lease");
                    break;
                }
            }
        }
        buf.clear();
    }
}

/// The pieces [`crate::Worker::run`] starts.
pub(crate) struct Started {
    pub fetchers: Vec<tokio::task::JoinHandle<()>>,
    pub acker: tokio::task::JoinHandle<()>,
    pub promoter: Option<tokio::task::JoinHandle<()>>,
    pub hard_tx: watch::Sender<bool>,
    pub global: Arc<Semaphore>,
}

/// Starts fetch loops, acker and promoter for every configured queue.
pub(crate) fn start(
    config: Arc<Config>,
    routes: Routes,
    scheduler: Scheduler,
    client: crate::Client,
    stats: &Stats,
    shutdown: &ShutdownHandle,
    worker_id: Arc<str>,
) -> Started {
    let broker = scheduler.broker().clone();
    let (ack_tx, ack_rx) = mpsc::unbounded_channel();
    let acker = tokio::spawn(acker(broker.clone(), ack_rx));
    let promoter = delay::spawn_promoter(
        &broker,
        config.worker.promote_interval,
        shutdown.subscribe(),
    );
    let (hard_tx, hard_rx) = watch::channel(false);
    let global = Arc::new(Semaphore::new(config.worker.concurrency));
    let lease_timed = crate::lease::needs_heartbeat(broker.as_ref());
    let mut fetchers = Vec::new();
    let queues = config.effective_queues();
    let shortest_lease = queues
        .values()
        .map(|q| q.lease)
        .min()
        .unwrap_or(Duration::from_secs(30));
    // One limiter per job name, shared by every queue the job runs on.
    let job_limits: std::collections::BTreeMap<String, Arc<crate::limit::Limiter>> =
        match client.store() {
            None => Default::default(),
            Some(store) => config
                .jobs
                .iter()
                .filter_map(|(job, j)| {
                    crate::limit::Limiter::new(
                        format!("job:{job}"),
                        j.rate,
                        j.burst,
                        j.max_concurrent,
                        shortest_lease,
                        store.clone(),
                    )
                    .map(|l| (job.clone(), l))
                })
                .collect(),
        };
    for (name, cfg) in queues {
        let (fin_tx, fin_rx) = mpsc::unbounded_channel();
        let limits = crate::limit::Limits {
            queue: client.store().and_then(|store| {
                crate::limit::Limiter::new(
                    format!("queue:{name}"),
                    cfg.rate,
                    cfg.burst,
                    cfg.max_concurrent,
                    cfg.lease,
                    store.clone(),
                )
            }),
            jobs: job_limits.clone(),
        };
        let jobs = routes
            .names()
            .into_iter()
            .map(|job| {
                let retry = config.retry_for(&name, Some(job));
                (
                    job.to_string(),
                    (retry, config.timeout_for(&name, Some(job))),
                )
            })
            .collect();
        let effects =
            crate::effects::Effects::new(&config, &name, cfg.lease, routes.names(), client.store());
        let ctx = Arc::new(QueueCtx {
            effects,
            jobs,
            stats: stats.queue(&name),
            name,
            cfg,
            routes: routes.clone(),
            scheduler: scheduler.clone(),
            acks: ack_tx.clone(),
            finished: fin_tx,
            worker_id: worker_id.clone(),
            client: client.clone(),
            hard_stop: hard_rx.clone(),
            lease_timed,
            limits,
            paused_until: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        });
        fetchers.push(tokio::spawn(fetch_loop(
            ctx,
            global.clone(),
            fin_rx,
            shutdown.subscribe(),
            config.worker.poll_wait,
        )));
    }
    Started {
        fetchers,
        acker,
        promoter,
        hard_tx,
        global,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of a job's future.
    fn future_size<A, B, F, Fut>(_: F) -> usize
    where
        F: Fn(Arc<QueueCtx>, A, B) -> Fut,
    {
        std::mem::size_of::<Fut>()
    }

    /// Every job's future is allocated in its task and moved by tokio: it was 2.6 KB before the
    /// rare paths were boxed (an allocation of that size and several copies per job).
    #[test]
    fn job_future_stays_small() {
        let size = future_size(run_job);

        assert!(size <= 1024, "a job's future is {size} bytes");
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h…");
        assert_eq!(truncate("abc", 10), "abc");
    }

    #[test]
    fn error_backoff_grows_and_caps() {
        let mut b = ErrorBackoff::default();
        let v: Vec<u64> = (0..8).map(|_| b.next().as_millis() as u64).collect();
        assert_eq!(v, vec![200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
        b.reset();
        assert_eq!(b.next(), Duration::from_millis(200));
    }

    #[test]
    fn error_backoff_reports_a_recovery_once() {
        let mut b = ErrorBackoff::default();
        assert_eq!(b.recovered(), None, "no failures, nothing to report");
        b.next();
        b.next();
        let (failures, _) = b.recovered().expect("a recovery");
        assert_eq!(failures, 2);
        assert_eq!(b.recovered(), None, "reported once");
        assert_eq!(b.next(), Duration::from_millis(200), "and reset");
    }
}
