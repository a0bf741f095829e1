//! Scenario 20, unique jobs: 100 concurrent enqueues of one key from two producers make one job;
//! an `until_done` key is released when its job succeeds and when it is dead-lettered.

use super::{batch_for, producer, queue_toml, wait_for, worker_toml, Log, Running};
use crate::backend::Backend;
use crate::names::unique;
use crate::support::{ensure, pass, secs, Checked};
use bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;
use stevedore::{Client, JobContext, JobError, Router, State};
use stevedore_core::Priority;

const OK: &str = "conformance.unique";
const FAILS: &str = "conformance.unique_fails";
const CALLS: usize = 100;

async fn ok(State(log): State<Log>, ctx: JobContext) {
    let i = log.start(&ctx, Bytes::new());
    log.end(i);
}

async fn fails(State(log): State<Log>, ctx: JobContext) -> Result<(), JobError> {
    let i = log.start(&ctx, Bytes::new());
    log.end(i);
    Err(JobError::permanent("refused"))
}

/// Two producers, each on its own broker handle and its own store handle ([`Backend::store`]),
/// make [`CALLS`] concurrent enqueues of one job with one payload, unique until done, before
/// the worker starts. Checks:
/// every call returns the same id and exactly one says it published; the worker runs that job
/// exactly once (nothing else arrives within a second after). Once it has run, the key is free:
/// the same enqueue publishes a new job (a new id), which runs. A job of the same kind whose
/// handler refuses it goes to the dead-letter queue, and frees its key too.
pub(crate) async fn unique_jobs(backend: Arc<dyn Backend>) -> Checked {
    let queue = unique("uniq");
    let p = producer(&backend, &queue, &[Priority::Normal]).await?;
    let caps = p.capabilities().clone();
    let log = Log::default();
    let router = Router::with_state(log.clone())
        .route(OK, ok)
        .route(FAILS, fails);
    let toml = worker_toml(
        &unique("w-uniq"),
        4,
        secs(5),
        &[queue_toml(
            &queue,
            4,
            batch_for(&caps, 4),
            &["retry = { max_attempts = 1 }"],
        )],
    );
    let a = Client::new(p.clone()).with_store(backend.store().await?);
    let b = Client::new(backend.connect().await.map_err(|e| e.to_string())?)
        .with_store(backend.store().await?);
    let payload = serde_json::json!({"invoice": unique("inv")});
    let send = |c: &Client, job: &'static str| {
        c.enqueue(job, &payload)
            .queue(&queue)
            .unique_until_done(secs(60))
            .send_or_existing()
    };
    let mut calls = Vec::new();
    for i in 0..CALLS {
        let c = if i % 2 == 0 { a.clone() } else { b.clone() };
        let send = send(&c, OK);
        calls.push(tokio::spawn(send));
    }
    let mut results = Vec::new();
    for c in calls {
        results.push(
            c.await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("enqueue: {e}"))?,
        );
    }
    let first = results[0].id.clone();
    ensure!(
        results.iter().all(|r| r.id == first),
        "the {CALLS} enqueues returned different ids: {:?}",
        results
            .iter()
            .map(|r| r.id.as_str())
            .collect::<std::collections::BTreeSet<_>>()
    );
    let published = results.iter().filter(|r| !r.duplicate).count();
    ensure!(published == 1, "{published} of {CALLS} enqueues published");
    // The worker starts only now: an `until_done` key is free again as soon as its job ran.
    let _w = Running::start_with(&backend, router, &toml, Some(backend.store().await?)).await?;
    let runs_of = |id: &str| log.count(|r| r.id == id);
    wait_for(
        secs(20),
        || runs_of(&first) >= 1,
        || "the unique job ran".into(),
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    ensure!(
        log.count(|r| r.job == OK) == 1,
        "{} runs of the unique job, want 1",
        log.count(|r| r.job == OK)
    );
    // Done: the key is free again (released just after the ack; allow a moment).
    let mut again = send(&a, OK).await.map_err(|e| e.to_string())?;
    for _ in 0..50 {
        if !again.duplicate {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        again = send(&a, OK).await.map_err(|e| e.to_string())?;
    }
    ensure!(
        !again.duplicate && again.id != first,
        "after the job succeeded its key stayed held ({})",
        again.id
    );
    wait_for(
        secs(20),
        || runs_of(&again.id) == 1,
        || "the second job ran".into(),
    )
    .await?;
    // Dead-lettered: the key is freed too.
    let doomed = send(&b, FAILS).await.map_err(|e| e.to_string())?;
    ensure!(!doomed.duplicate, "a different job name is a different key");
    wait_for(
        secs(20),
        || runs_of(&doomed.id) == 1,
        || "the refused job ran".into(),
    )
    .await?;
    let mut after = send(&b, FAILS).await.map_err(|e| e.to_string())?;
    for _ in 0..50 {
        if !after.duplicate {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        after = send(&b, FAILS).await.map_err(|e| e.to_string())?;
    }
    ensure!(
        !after.duplicate,
        "after the job was dead-lettered its key stayed held"
    );
    wait_for(
        secs(20),
        || runs_of(&after.id) == 1,
        || "the next refused job ran".into(),
    )
    .await?;
    pass(format!(
        "{CALLS} concurrent enqueues over two producers: 1 published, 1 run; the key freed after success and after dead-lettering"
    ))
}
