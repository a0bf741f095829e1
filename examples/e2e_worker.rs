//! A worker for the end-to-end tests (`tests/e2e/`). It enqueues `E2E_JOBS` jobs in-process at start
//! and records each handler's start and finish in the file `E2E_OUT`, so a test can see from
//! outside exactly which jobs ran, how often, and whether shutdown cut any short.
//!
//! Job payload: `{"n": 7, "sleep_ms": 300}`. The job numbered `E2E_ABORT_N`, if set, aborts the
//! process each time it runs. A job with `"fail": true` fails (permanently) while the file
//! `E2E_FAIL_FILE` exists, and runs normally once it is gone. With `E2E_FAIL_EVERY=k`, every job
//! whose number is a multiple of k fails on every attempt (recording `fail <n> <attempt> <ms>`), a
//! poison job for the retry policy to dead-letter. A job a schedule enqueued also
//! records `tick <schedule>/<tick> <job id>`.
//!
//! Job `effect` (payload `{"n": 7, "hold_ms": 20}`, on a queue with `idempotent = true` and a
//! PostgreSQL store): in one transaction on `E2E_DATABASE_URL`, marks the job done
//! (`JobContext::mark_done_in`), inserts `(n, job id, pid)` into the table `E2E_EFFECTS`, holds
//! the transaction `hold_ms`, and commits; records `effect <n>` after the commit, or `dup <n>`
//! for a delivery the mark says already took effect.

use serde::{Deserialize, Serialize};
use std::io::Write;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use stevedore::{App, JobContext, JobError, Json, Router, State};

#[derive(Serialize, Deserialize)]
struct Work {
    n: u64,
    sleep_ms: u64,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    fail: bool,
}

#[derive(Clone)]
struct Out(Arc<Mutex<std::fs::File>>);

impl Out {
    fn line(&self, s: &str) {
        let mut f = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writeln!(f, "{s}");
        let _ = f.flush();
    }
}

async fn work(
    Json(w): Json<Work>,
    ctx: JobContext,
    State(out): State<Out>,
) -> Result<(), JobError> {
    out.line(&format!("start {} {}", w.n, ctx.attempt));
    if let Some(tick) = ctx.headers.get(stevedore::schedule::TICK_HEADER) {
        let schedule = ctx.headers.get(stevedore::schedule::SCHEDULE_HEADER);
        out.line(&format!(
            "tick {}/{tick} {}",
            schedule.map_or("-", String::as_str),
            ctx.id
        ));
    }
    if w.fail
        && std::env::var_os("E2E_FAIL_FILE").is_some_and(|f| std::path::Path::new(&f).exists())
    {
        return Err(JobError::permanent("refused: the E2E fail flag is set"));
    }
    if fail_every().is_some_and(|k| w.n % k == 0) {
        let ms = times().map_or(0, |t0| t0.elapsed().as_millis());
        out.line(&format!("fail {} {} {ms}", w.n, ctx.attempt));
        return Err(JobError::retry("poison: this job fails on every attempt"));
    }
    if poison() == Some(w.n) {
        // A job that kills its worker: no ack, no release, no failure reported.
        std::process::abort();
    }
    tokio::time::sleep(Duration::from_millis(w.sleep_ms)).await;
    match times() {
        Some(t0) => out.line(&format!("done {} {}", w.n, t0.elapsed().as_millis())),
        None => out.line(&format!("done {}", w.n)),
    }
    Ok(())
}

#[derive(Deserialize)]
struct Effect {
    n: i64,
    hold_ms: u64,
}

/// The effects database (`E2E_DATABASE_URL`), connected once.
async fn effects_db() -> Result<&'static stevedore::outbox::sqlx::PgPool, JobError> {
    static POOL: tokio::sync::OnceCell<stevedore::outbox::sqlx::PgPool> =
        tokio::sync::OnceCell::const_new();
    POOL.get_or_try_init(|| async {
        let url = std::env::var("E2E_DATABASE_URL")
            .map_err(|_| JobError::permanent("E2E_DATABASE_URL is not set"))?;
        stevedore::outbox::sqlx::postgres::PgPoolOptions::new()
            .max_connections(8)
            .connect(&url)
            .await
            .map_err(|e| JobError::retry(format!("effects database: {e}")))
    })
    .await
}

async fn effect(
    Json(e): Json<Effect>,
    ctx: JobContext,
    State(out): State<Out>,
) -> Result<(), JobError> {
    let db = effects_db().await?;
    let table = std::env::var("E2E_EFFECTS").unwrap_or_else(|_| "e2e_effects".into());
    let retry = |e: stevedore::outbox::sqlx::Error| JobError::retry(e.to_string());
    let mut tx = db.begin().await.map_err(retry)?;
    if !ctx.mark_done_in(&mut tx).await? {
        out.line(&format!("dup {}", e.n));
        return Ok(());
    }
    stevedore::outbox::sqlx::query(&format!(
        "INSERT INTO {table} (n, job_id, pid) VALUES ($1, $2, $3)"
    ))
    .bind(e.n)
    .bind(&ctx.id)
    .bind(i64::from(std::process::id()))
    .execute(&mut *tx)
    .await
    .map_err(retry)?;
    // A window for a kill between the effect and its commit.
    tokio::time::sleep(Duration::from_millis(e.hold_ms)).await;
    tx.commit().await.map_err(retry)?;
    out.line(&format!("effect {}", e.n));
    Ok(())
}

/// `E2E_TIMES`: when set, `done` and `fail` lines end with the milliseconds since the process
/// started (for rates measured from outside).
fn times() -> Option<std::time::Instant> {
    static T0: std::sync::OnceLock<Option<std::time::Instant>> = std::sync::OnceLock::new();
    *T0.get_or_init(|| std::env::var_os("E2E_TIMES").map(|_| std::time::Instant::now()))
}

/// `E2E_FAIL_EVERY`: every job whose number is a multiple of it fails (retryably) on every
/// attempt: a poison job, for the retry policy to dead-letter.
fn fail_every() -> Option<u64> {
    static K: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *K.get_or_init(|| {
        std::env::var("E2E_FAIL_EVERY")
            .ok()
            .and_then(|s| s.parse().ok())
            .filter(|k| *k > 0)
    })
}

/// `E2E_ABORT_N`: the job whose handler aborts the process every time it runs.
fn poison() -> Option<u64> {
    static N: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *N.get_or_init(|| {
        std::env::var("E2E_ABORT_N")
            .ok()
            .and_then(|s| s.parse().ok())
    })
}

/// `E2E_BATCH` > 1: the jobs go out `batch` to a publish call, each call retried while the
/// broker says it may succeed later (a re-sent batch may duplicate jobs, which the tests allow
/// for as a lost confirm). Returns whether every batch went out.
async fn enqueue_batched(
    client: &stevedore::Client,
    jobs: u64,
    sleep_ms: u64,
    batch: usize,
) -> bool {
    let step = batch.max(1) as u64;
    for from in (0..jobs).step_by(batch.max(1)) {
        let envelopes: Vec<stevedore::Envelope> = (from..(from + step).min(jobs))
            .map(|n| {
                let body = serde_json::to_vec(&Work {
                    n,
                    sleep_ms,
                    fail: false,
                })
                .unwrap_or_default();
                stevedore::Envelope::new("work", body)
            })
            .collect();
        if !retrying(|| client.publish("default", envelopes.clone())).await {
            return false;
        }
    }
    true
}

/// Runs `send` until it succeeds or fails for good, like any producer: retrying, with backoff,
/// what may succeed later (the broker restarting). Returns whether it succeeded.
async fn retrying<T, F, Fut>(mut send: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, stevedore::EnqueueError>>,
{
    let mut pause = Duration::from_millis(50);
    loop {
        match send().await {
            Ok(_) => return true,
            Err(stevedore::EnqueueError::Broker(e)) if e.is_transient() => {
                eprintln!("enqueue failed, retrying: {e}");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
            Err(e) => {
                eprintln!("enqueue failed: {e}");
                return false;
            }
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let path = std::env::var("E2E_OUT").unwrap_or_else(|_| "e2e-out.txt".into());
    let file = match std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: cannot open {path}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let jobs: u64 = std::env::var("E2E_JOBS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let sleep_ms: u64 = std::env::var("E2E_SLEEP_MS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let batch: usize = std::env::var("E2E_BATCH")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let _ = times();
    let out = Out(Arc::new(Mutex::new(file)));
    let router = Router::with_state(out.clone())
        .route("work", work)
        .route("effect", effect);
    App::new(router)
        .on_start(move |client, _, _| async move {
            if batch > 1 {
                let all = enqueue_batched(&client, jobs, sleep_ms, batch).await;
                out.line(if all { "enqueued" } else { "enqueue failed" });
                return;
            }
            for n in 0..jobs {
                let work = Work {
                    n,
                    sleep_ms,
                    fail: false,
                };
                retrying(|| client.enqueue("work", &work).send()).await;
            }
            out.line("enqueued");
        })
        .run()
        .await
}
