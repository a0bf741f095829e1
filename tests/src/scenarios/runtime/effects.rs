//! Scenario 22, job status and idempotent handlers: on a queue with `track_status = true` and
//! `idempotent = true`, each job's status moves through its states as a user polling
//! `Client::status` sees them, and copies of one job id run it once.

use super::{batch_for, producer, queue_toml, wait_for, worker_toml, Log, Running};
use crate::backend::Backend;
use crate::names::unique;
use crate::support::{ensure, pass, secs, Checked};
use bytes::Bytes;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use stevedore::{config, Client, JobContext, JobError, JobState, Router, State};
use stevedore_core::{Envelope, Priority};

const SLOW: &str = "conformance.status_slow";
const FLAKY: &str = "conformance.status_flaky";
const BAD: &str = "conformance.status_bad";
const ONCE: &str = "conformance.inbox_once";

#[derive(Clone, Default)]
struct St {
    log: Log,
    /// Opened once the test has seen the slow job running.
    gate: Arc<AtomicBool>,
}

async fn slow(State(st): State<St>, ctx: JobContext) -> Result<(), JobError> {
    let i = st.log.start(&ctx, Bytes::new());
    let t0 = std::time::Instant::now();
    while !st.gate.load(Ordering::Relaxed) && t0.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    ctx.set_result(&serde_json::json!({ "done": ctx.id }))?;
    st.log.end(i);
    Ok(())
}

async fn flaky(State(st): State<St>, ctx: JobContext) -> Result<(), JobError> {
    let i = st.log.start(&ctx, Bytes::new());
    st.log.end(i);
    if ctx.attempt == 1 {
        return Err(JobError::retry("the first attempt fails"));
    }
    Ok(())
}

async fn bad(State(st): State<St>, ctx: JobContext) -> Result<(), JobError> {
    let i = st.log.start(&ctx, Bytes::new());
    st.log.end(i);
    Err(JobError::permanent("refused"))
}

async fn once(State(st): State<St>, ctx: JobContext) {
    let i = st.log.start(&ctx, Bytes::new());
    // Long enough for copies delivered meanwhile to find it running.
    tokio::time::sleep(Duration::from_millis(300)).await;
    st.log.end(i);
}

/// Publishes `copies` one by one, a few milliseconds apart, as separate sends would come (a
/// broker deduplicating natively by id and send time, SQS FIFO, keeps them apart).
async fn publish_apart(client: &Client, queue: &str, copies: Vec<Envelope>) -> Result<(), String> {
    for e in copies {
        client
            .publish(queue, vec![e])
            .await
            .map_err(|e| format!("publish a copy: {e}"))?;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// The states one job was seen in, in order, without repeats.
#[derive(Default, Debug)]
struct Seen {
    states: Vec<JobState>,
    last: Option<stevedore::JobStatus>,
}

/// Checks:
/// - **status**, polled every 25 ms while the jobs run:
///   - a job enqueued by a client with the config reads `queued` (attempt 0) before any worker
///     runs; a delayed one reads `delayed` with its run time;
///   - the slow job reads `running` (attempt 1, the worker's id, a start time) while it
///     runs, then `succeeded` with the result its handler kept and a finish time;
///   - a job failing its first attempt reads `retrying` (with the error and a run time in the
///     future), then `succeeded` at attempt 2 with the error kept;
///   - a refused job reads `dead` with its error;
///   - an unknown id has no status.
/// - **inbox**: three copies of one job id published before the worker starts (so some are
///   delivered while the first runs) run it once; the others are acked as duplicates (or put
///   off and merged by the broker), and two more copies published after it finished are both
///   acked as duplicates (the worker's `duplicates` counter).
///   The failed first attempt of the flaky job did not mark it done: its retry ran.
pub(crate) async fn status_and_inbox(backend: Arc<dyn Backend>) -> Checked {
    let queue = unique("fx");
    let p = producer(&backend, &queue, &[Priority::Normal]).await?;
    let caps = p.capabilities().clone();
    let st = St::default();
    let router = Router::with_state(st.clone())
        .route(SLOW, slow)
        .route(FLAKY, flaky)
        .route(BAD, bad)
        .route(ONCE, once);
    let toml = worker_toml(
        &unique("w-fx"),
        4,
        secs(5),
        &[queue_toml(
            &queue,
            4,
            batch_for(&caps, 4),
            &[
                "track_status = true",
                "idempotent = true",
                "retry = { max_attempts = 3, base = \"2s\" }",
            ],
        )],
    );
    let cfg = config::from_toml_str(&toml, None).map_err(|e| format!("config: {e}"))?;
    let client = Client::new(p.clone())
        .with_limits_from(&cfg)
        .with_store(backend.store().await?);
    let status = |id: String| {
        let client = client.clone();
        async move {
            client
                .status(&id)
                .await
                .map_err(|e| format!("status of {id}: {e}"))
        }
    };
    let send = |job: &'static str| client.enqueue(job, &serde_json::json!({})).queue(&queue);
    let s = send(SLOW).send().await.map_err(|e| e.to_string())?;
    let d = send(ONCE)
        .delay(Duration::from_secs(3))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let f = send(FLAKY).send().await.map_err(|e| e.to_string())?;
    let x = send(BAD).send().await.map_err(|e| e.to_string())?;
    let before = status(s.clone()).await?;
    ensure!(
        before
            .as_ref()
            .is_some_and(|b| b.state == JobState::Queued && b.attempt == 0 && b.job == SLOW),
        "right after enqueue the status is {before:?}, want queued at attempt 0"
    );
    let delayed = status(d.clone()).await?;
    ensure!(
        delayed.as_ref().is_some_and(
            |b| b.state == JobState::Delayed && b.run_at.is_some_and(|t| t > SystemTime::now())
        ),
        "a delayed job's status is {delayed:?}, want delayed with a future run time"
    );
    ensure!(
        status(unique("no-such-job")).await?.is_none(),
        "an unknown id has a status"
    );
    // Three copies of one id (told apart for brokers that deduplicate natively, as the
    // runtime's own re-sends are).
    let copy = Envelope::new(ONCE, "{}").json();
    let dup = copy.id.clone();
    let copies = |n: usize, from: usize| {
        (from..from + n)
            .map(|k| {
                let mut e = copy.clone();
                e.headers
                    .insert(stevedore_core::wire::RESENT.into(), k.to_string());
                e
            })
            .collect::<Vec<_>>()
    };
    publish_apart(&client, &queue, copies(3, 1)).await?;

    let w = Running::start_with(&backend, router, &toml, Some(backend.store().await?)).await?;
    let ids = [s.clone(), d.clone(), f.clone(), x.clone()];
    let mut seen: BTreeMap<String, Seen> = BTreeMap::new();
    let t0 = tokio::time::Instant::now();
    loop {
        for id in &ids {
            let now = status(id.clone()).await?;
            let entry = seen.entry(id.clone()).or_default();
            if let Some(now) = now {
                if entry.states.last() != Some(&now.state) {
                    entry.states.push(now.state);
                }
                if id == &s && now.state == JobState::Running {
                    st.gate.store(true, Ordering::Relaxed);
                }
                entry.last = Some(now);
            }
        }
        let finished = ids.iter().all(|id| {
            seen.get(id)
                .and_then(|e| e.last.as_ref())
                .is_some_and(|l| l.state.is_final())
        });
        if finished {
            break;
        }
        ensure!(
            t0.elapsed() < secs(40),
            "not every job reached a final status within 40 s: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let last = |id: &str| seen.get(id).and_then(|e| e.last.clone());
    let states = |id: &str| seen.get(id).map(|e| e.states.clone()).unwrap_or_default();

    // The slow job: running (while the gate held it), then succeeded with its result.
    let sl = last(&s).ok_or("no status for the slow job")?;
    ensure!(
        states(&s).ends_with(&[JobState::Running, JobState::Succeeded]),
        "the slow job went through {:?}, want ... running, succeeded",
        states(&s)
    );
    ensure!(
        sl.attempt == 1
            && sl.worker.as_deref() == Some(w.id.as_str())
            && sl.started_at.is_some()
            && sl.finished_at.is_some(),
        "the slow job's final status lacks its attempt, worker or times: {sl:?}"
    );
    ensure!(
        sl.result == Some(serde_json::json!({ "done": s })),
        "the slow job's result is {:?}, want its handler's",
        sl.result
    );
    // The flaky job: retrying with the error, then succeeded at attempt 2.
    let fl = last(&f).ok_or("no status for the flaky job")?;
    ensure!(
        states(&f).contains(&JobState::Retrying)
            && fl.state == JobState::Succeeded
            && fl.attempt == 2
            && fl
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("the first attempt fails")),
        "the flaky job went through {:?} and ended as {fl:?}, want retrying then succeeded at attempt 2 with its error kept",
        states(&f)
    );
    // The refused job: dead with the reason.
    let xl = last(&x).ok_or("no status for the refused job")?;
    ensure!(
        xl.state == JobState::Dead
            && xl
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("refused")),
        "the refused job ended as {xl:?}, want dead with its error"
    );
    // The delayed job ran after its delay.
    ensure!(
        last(&d).is_some_and(|l| l.state == JobState::Succeeded),
        "the delayed job ended as {:?}",
        last(&d)
    );

    // The inbox: three copies ran once (a copy put off while the first ran may be merged
    // with another by a broker that keys delayed messages by id and attempt: Redis); two more
    // published after it finished are both skipped.
    let runs_of = |id: &str| st.log.count(|r| r.id == id);
    let t1 = tokio::time::Instant::now();
    loop {
        let waiting = client
            .waiting(&queue)
            .await
            .map_err(|e| format!("depth: {e}"))?;
        let snap = w.snapshot(&queue);
        if waiting == 0 && snap.in_flight == 0 && snap.duplicates >= 1 && runs_of(&dup) == 1 {
            break;
        }
        ensure!(
            t1.elapsed() < secs(20),
            "{} runs of the copied job, {} duplicates skipped, {waiting} waiting: want 1 run, the rest skipped",
            runs_of(&dup),
            snap.duplicates
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let first_copies = w.snapshot(&queue).duplicates;
    publish_apart(&client, &queue, copies(2, 4)).await?;
    wait_for(
        secs(20),
        || w.snapshot(&queue).duplicates >= first_copies + 2,
        || {
            format!(
                "{} duplicates skipped after two more copies, want {}",
                w.snapshot(&queue).duplicates,
                first_copies + 2
            )
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    ensure!(
        runs_of(&dup) == 1,
        "5 copies of one job id ran it {} times, want 1",
        runs_of(&dup)
    );
    ensure!(
        runs_of(&f) == 2,
        "the flaky job ran {} times, want 2 (a failed attempt must not mark it done)",
        runs_of(&f)
    );
    pass(format!(
        "statuses seen: slow {:?}, flaky {:?}, refused {:?}, delayed {:?}; 5 copies of one id ran once ({} skipped as duplicates)",
        states(&s),
        states(&f),
        states(&x),
        states(&d),
        w.snapshot(&queue).duplicates
    ))
}
