//! What the runtime records around a job for idempotent handlers (the inbox) and job status,
//! in the state store. Only queues with `idempotent` or `track_status` pay for it: the others
//! carry no [`Effects`] and skip all of this with one branch.
//!
//! **The inbox** (`idempotent = true`): before a job runs, its key `inbox:<job>:<id>` is
//! claimed from absent with this delivery's own value and a TTL of the queue's lease, renewed
//! while the job runs. After success the key becomes `done` for the configured window, before
//! the ack; after a failure the claim is deleted so the retry may run. A delivery that finds
//! `done` is acked without running (a duplicate: a redelivery after a lost ack, a relay that
//! published twice); one that finds another delivery's claim is put off until that one ends,
//! so two deliveries of one job never run at once. A worker that dies mid-job leaves a claim
//! that lapses with its lease, like the broker's own lease. What the store-backed inbox cannot
//! close is a crash between the handler's effect and the `done` mark; a handler writing to
//! PostgreSQL closes it by marking in its own transaction (issue #13, next step).

use crate::status::{self, JobState, JobStatus};
use crate::JobError;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use stevedore_core::store::Store;
use stevedore_core::Envelope;

/// The value of a finished job's inbox key.
pub(crate) const DONE: &[u8] = b"done";

/// Longest any one state store call of this module may take: a store that hangs costs a job
/// this much, never its lease (a slow call counts as a failed one).
const STORE_TIMEOUT: Duration = Duration::from_secs(5);

/// `fut` under [`STORE_TIMEOUT`].
pub(crate) async fn timed<T>(
    fut: impl std::future::Future<Output = Result<T, stevedore_core::BrokerError>>,
) -> Result<T, stevedore_core::BrokerError> {
    tokio::time::timeout(STORE_TIMEOUT, fut)
        .await
        .unwrap_or_else(|_| {
            Err(stevedore_core::BrokerError::transient(format!(
                "the state store did not answer within {}s",
                STORE_TIMEOUT.as_secs()
            )))
        })
}

/// The state store key of job `id`'s inbox mark for handler `job`.
pub(crate) fn inbox_key(job: &str, id: &str) -> String {
    if job.len() + id.len() <= 200 {
        format!("inbox:{job}:{id}")
    } else {
        format!(
            "inbox:#{}",
            crate::client::hash_hex(&[job.as_bytes(), id.as_bytes()])
        )
    }
}

/// One queue's inbox and status settings.
pub(crate) struct Effects {
    store: Arc<dyn Store>,
    /// How long statuses are kept; `None`: not tracked.
    status: Option<Duration>,
    /// Idempotent job names and how long their marks are kept.
    inbox: BTreeMap<String, Duration>,
    /// How long a running job's inbox claim holds without renewal.
    lease: Duration,
}

impl Effects {
    /// The effects of `queue` for `jobs` (its routable job names), `None` when it has none.
    pub(crate) fn new<'a>(
        config: &crate::config::Config,
        queue: &str,
        lease: Duration,
        jobs: impl IntoIterator<Item = &'a str>,
        store: Option<&Arc<dyn Store>>,
    ) -> Option<Arc<Effects>> {
        let store = store?;
        let status = config.status_for(queue);
        let inbox: BTreeMap<String, Duration> = jobs
            .into_iter()
            .filter_map(|job| {
                config
                    .idempotent_for(queue, job)
                    .map(|keep| (job.to_string(), keep))
            })
            .collect();
        if status.is_none() && inbox.is_empty() {
            return None;
        }
        Some(Arc::new(Effects {
            store: store.clone(),
            status,
            inbox,
            lease,
        }))
    }
}

/// A delivery's inbox claim.
pub(crate) struct Claim {
    key: String,
    value: Vec<u8>,
    keep: Duration,
}

/// What [`begin`] recorded for a job that runs.
#[derive(Default)]
pub(crate) struct Begun {
    claim: Option<Claim>,
    status: Option<(JobStatus, Duration)>,
    /// What the handler's [`JobContext`](crate::JobContext) reaches.
    pub(crate) shared: Option<Arc<JobShared>>,
}

/// The part of a job's effects its handler reaches through its context.
pub(crate) struct JobShared {
    /// The result slot ([`crate::JobContext::set_result`]), with status tracked.
    pub(crate) output: Option<Mutex<Option<serde_json::Value>>>,
    /// The inbox key and how long its `done` mark is kept, for an idempotent job.
    pub(crate) inbox: Option<(String, Duration)>,
    /// The state store (for `JobContext::mark_done_in`).
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) store: Arc<dyn Store>,
    /// Set by `JobContext::mark_done_in`: the handler's own transaction holds (then commits)
    /// the inbox key, so the claim is no longer renewed.
    pub(crate) marked: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for JobShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobShared")
            .field("inbox", &self.inbox)
            .finish_non_exhaustive()
    }
}

/// Whether a job runs.
pub(crate) enum Begin {
    Run(Box<Begun>),
    /// It already succeeded: ack it without running.
    Duplicate,
    /// Another delivery of it is running, or the store could not be asked: put it off this long.
    Busy(Duration),
}

/// What the inbox says of a delivery past its last attempt.
pub(crate) enum Over {
    /// It already succeeded (a success whose ack was lost): a duplicate.
    Done,
    /// Another delivery of it runs, or the store did not answer: put it off and look again.
    Busy,
    /// Nothing: the crash loop it looks like (or the job is not idempotent).
    Nothing,
}

/// Looks up the inbox mark of a delivery of idempotent `job` past its last attempt.
pub(crate) async fn over(effects: &Effects, job: &str, id: &str) -> Over {
    if !effects.inbox.contains_key(job) {
        return Over::Nothing;
    }
    match timed(effects.store.get(&inbox_key(job, id))).await {
        Ok(Some(v)) if v == DONE => Over::Done,
        Ok(None) => Over::Nothing,
        Ok(Some(_)) | Err(_) => Over::Busy,
    }
}

/// Claims the inbox key and records `running`, as configured for `job`.
pub(crate) async fn begin(
    effects: &Effects,
    queue: &str,
    job: &str,
    env: &Envelope,
    attempt: u32,
    max_attempts: u32,
    worker: &str,
) -> Begin {
    let store = &*effects.store;
    let mut begun = Begun::default();
    if let Some(&keep) = effects.inbox.get(job) {
        let key = inbox_key(job, &env.id);
        // A plain read first: it never waits on a row a handler's transaction holds (the
        // claim below could), and a duplicate or a busy job is told apart at once.
        match timed(store.get(&key)).await {
            Ok(Some(v)) if v == DONE => return Begin::Duplicate,
            Ok(Some(_)) => return Begin::Busy(Duration::from_secs(1).min(effects.lease)),
            Ok(None) => {}
            Err(e) => return store_down(&e),
        }
        let value = format!("running {worker} {:016x}", rand::random::<u64>()).into_bytes();
        match timed(store.swap(&key, None, Some(&value), Some(effects.lease))).await {
            Ok(true) => begun.claim = Some(Claim { key, value, keep }),
            Ok(false) => {
                return match timed(store.get(&key)).await {
                    Ok(Some(v)) if v == DONE => Begin::Duplicate,
                    // Another delivery runs it (or just finished: then the next look says so).
                    Ok(_) => {
                        tracing::debug!(id = %env.id, "another delivery of this job is running: put off");
                        Begin::Busy(Duration::from_secs(1).min(effects.lease))
                    }
                    Err(e) => store_down(&e),
                };
            }
            Err(e) => return store_down(&e),
        }
    }
    if let Some(keep) = effects.status {
        let now = SystemTime::now();
        let earlier = if attempt > 1 {
            timed(store.get(&status::key(&env.id)))
                .await
                .ok()
                .flatten()
                .and_then(|b| JobStatus::decode(&b))
        } else {
            None
        };
        let mut s = earlier
            .unwrap_or_else(|| JobStatus::enqueued(&env.id, queue, job, env.enqueued_at, None));
        s.state = JobState::Running;
        s.attempt = attempt;
        s.max_attempts = Some(max_attempts);
        s.updated_at = now;
        s.started_at = Some(now);
        s.run_at = None;
        s.finished_at = None;
        s.worker = Some(worker.to_string());
        status::write(store, &s, keep).await;
        begun.status = Some((s, keep));
    }
    begun.shared = Some(Arc::new(JobShared {
        output: begun.status.is_some().then(|| Mutex::new(None)),
        inbox: begun.claim.as_ref().map(|c| (c.key.clone(), c.keep)),
        store: effects.store.clone(),
        marked: std::sync::atomic::AtomicBool::new(false),
    }));
    Begin::Run(Box::new(begun))
}

fn store_down(e: &stevedore_core::BrokerError) -> Begin {
    tracing::warn!(error = %e, "state store unreachable: cannot check this idempotent job's inbox; put it off for 1s");
    Begin::Busy(Duration::from_secs(1))
}

/// Renews a running job's inbox claim (from its heartbeat), in a task of its own, so the
/// handler goes on being polled meanwhile: the renewal may wait on the key's row while the
/// handler's own transaction holds it (`mark_done_in`), and that transaction only commits if
/// the handler runs. Returns `None` when there is nothing to renew (no claim, or the handler
/// marked the job in its transaction).
pub(crate) fn renew(effects: &Arc<Effects>, begun: &Begun) -> Option<tokio::task::JoinHandle<()>> {
    let c = begun.claim.as_ref()?;
    let shared = begun.shared.clone();
    let marked = move || {
        shared
            .as_ref()
            .is_some_and(|s| s.marked.load(std::sync::atomic::Ordering::Relaxed))
    };
    if marked() {
        return None;
    }
    let (effects, key, value) = (effects.clone(), c.key.clone(), c.value.clone());
    Some(tokio::spawn(async move {
        let renewed = timed(effects.store.swap(
            &key,
            Some(&value),
            Some(&value),
            Some(effects.lease),
        ))
        .await;
        match renewed {
            Ok(true) => {}
            // The handler's transaction took the key meanwhile and committed `done`.
            Ok(false) if marked() => {}
            Ok(false) => {
                tracing::warn!(key = %key, "this job's inbox claim lapsed while it ran: another delivery may run it too")
            }
            Err(e) => {
                tracing::warn!(error = %e, key = %key, "could not renew this job's inbox claim")
            }
        }
    }))
}

/// How a job that [`begin`] let run ended.
pub(crate) enum End<'a> {
    Succeeded,
    Retrying {
        error: &'a JobError,
        at: SystemTime,
    },
    Dead {
        error: &'a JobError,
    },
    /// Given back unfinished (shutdown).
    Released,
}

/// [`end`], when there is something to record.
pub(crate) async fn end_if(recorded: Option<(&Effects, Box<Begun>)>, how: End<'_>) {
    if let Some((effects, begun)) = recorded {
        end(effects, begun, how).await;
    }
}

/// Records how the job ended: the inbox mark (`done`, or the claim given up) and its status.
/// Called before the ack or the publish that settles the job, so a crash in between leaves a
/// record that errs towards running again, never towards losing the job.
pub(crate) async fn end(effects: &Effects, begun: Box<Begun>, how: End<'_>) {
    let store = &*effects.store;
    if let Some(c) = &begun.claim {
        let r = match how {
            End::Succeeded => timed(store.set(&c.key, Some(DONE), Some(c.keep))).await,
            _ => timed(store.swap(&c.key, Some(&c.value), None, None))
                .await
                .map(drop),
        };
        if let Err(e) = r {
            tracing::warn!(error = %e, key = %c.key, "could not record this job's inbox mark: a duplicate delivery would run it again");
        }
    }
    let Some((mut s, keep)) = begun.status else {
        return;
    };
    let now = SystemTime::now();
    s.updated_at = now;
    match how {
        End::Succeeded => {
            s.state = JobState::Succeeded;
            s.finished_at = Some(now);
            s.result = begun
                .shared
                .as_ref()
                .and_then(|sh| sh.output.as_ref())
                .and_then(|o| o.lock().map(|mut r| r.take()).unwrap_or_default());
        }
        End::Retrying { error, at } => {
            s.state = JobState::Retrying;
            s.run_at = Some(at);
            s.last_error = Some(crate::runtime::truncate(
                &error.to_string(),
                status::MAX_ERROR,
            ));
        }
        End::Dead { error } => {
            s.state = JobState::Dead;
            s.finished_at = Some(now);
            s.last_error = Some(crate::runtime::truncate(
                &error.to_string(),
                status::MAX_ERROR,
            ));
        }
        End::Released => {
            s.state = JobState::Queued;
        }
    }
    status::write(store, &s, keep).await;
}

/// Records `dead` for a job dead-lettered before it ran (a crash loop), if status is tracked.
pub(crate) async fn dead_on_arrival(
    effects: &Effects,
    queue: &str,
    job: &str,
    env: &Envelope,
    attempt: u32,
    error: &JobError,
) {
    let Some(keep) = effects.status else { return };
    // A job that succeeded and whose ack was lost (its queue keeps no inbox): keep `succeeded`.
    if let Ok(Some(b)) = timed(effects.store.get(&status::key(&env.id))).await {
        if JobStatus::decode(&b).is_some_and(|s| s.state == JobState::Succeeded) {
            return;
        }
    }
    let now = SystemTime::now();
    let mut s = JobStatus::enqueued(&env.id, queue, job, env.enqueued_at, None);
    s.state = JobState::Dead;
    s.attempt = attempt;
    s.updated_at = now;
    s.finished_at = Some(now);
    s.last_error = Some(crate::runtime::truncate(
        &error.to_string(),
        status::MAX_ERROR,
    ));
    status::write(&*effects.store, &s, keep).await;
}

/// A duplicate of a job that already succeeded: its status says so too (a republished copy's
/// producer may have written `queued` over it; a handler that committed its mark and then
/// failed left `retrying`), unless it already reads final.
pub(crate) async fn duplicate_seen(effects: &Effects, id: &str) {
    let Some(keep) = effects.status else { return };
    let key = status::key(id);
    let Ok(Some(bytes)) = timed(effects.store.get(&key)).await else {
        return;
    };
    let Some(mut s) = JobStatus::decode(&bytes) else {
        return;
    };
    if s.state.is_final() {
        return;
    }
    let now = SystemTime::now();
    s.state = JobState::Succeeded;
    s.updated_at = now;
    s.run_at = None;
    s.finished_at.get_or_insert(now);
    // Only over what was read: a fresher status (the run itself finishing) wins.
    let swapped = timed(
        effects
            .store
            .swap(&key, Some(&bytes), Some(&s.encode()), Some(keep)),
    )
    .await;
    if let Err(e) = swapped {
        tracing::debug!(error = %e, id, "could not record a duplicate's job as succeeded");
    }
}
