//! Scenario 11, delay. Broker half: native delay, and the backend's durable delay store. Runtime
//! half: a delayed job survives a worker restart, and delays beyond a (testably short) native cap
//! arrive through the runtime's hops.
//!
//! Bounds, with D the delay and T the backend's declared `delay_tolerance`: a message is never
//! received before D − 50 ms after its envelope was built (not_before travels in milliseconds), and
//! is received within D + T + 500 ms after the publish (or schedule) call returned. The runtime
//! half adds the worker's idle poll and promote interval to T, once per hop.

use super::runtime::{
    batch_for, delay_slack, producer, queue_toml, wait_drained, wait_for, worker_toml, Log, Running,
};
use crate::backend::Backend;
use crate::names::unique;
use crate::support::{
    close, ensure, expect_empty, handle, millis, opts, pass, s2, secs, skip, Checked, Context,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use stevedore::{JobContext, Payload, Router, State};
use stevedore_core::{
    to_millis, Broker, Capabilities, DelayStore, DelaySupport, Envelope, Priority,
};
use tokio::task::JoinSet;
use tokio::time::Instant;

const LONG: Duration = Duration::from_millis(1500);
const SHORT: Duration = Duration::from_millis(500);
const EARLY_MARGIN: Duration = Duration::from_millis(50);
const LATE_GRACE: Duration = Duration::from_millis(500);
const PROMOTERS: usize = 4;
const STORED: usize = 5;
/// Runtime half: the delay, when hops cannot be tested.
const RT_DELAY: Duration = Duration::from_millis(1500);
/// Runtime half: a native cap at most this long is tested with a delay of 2.5 caps, so the runtime
/// must hop twice; a longer cap (SQS: 900 s) cannot be waited out in a test.
const HOP_TESTABLE: Duration = Duration::from_secs(2);
const RT_JOB: &str = "conformance.delayed";

/// Native delay (if declared): one batch of three messages, due now, in 0.5 s and in 1.5 s, each
/// received within its bounds, with `not_before` intact. Delay store (if the backend has one): five
/// messages scheduled 1.5 s ahead are counted by `delayed`, are not received before they are due
/// while four promoters call `promote_due` concurrently every 50 ms, then arrive exactly once each
/// within the bound (+ 50 ms promoter period), and leave the store. The runtime half (see
/// [`runtime_delay`]) runs alongside on queues of its own.
pub(crate) async fn delay(backend: Arc<dyn Backend>) -> Checked {
    let queue = unique("delay");
    let stored_queue = unique("delaystore");
    let h = handle(&backend, &[&queue, &stored_queue]).await?;
    let caps = h.capabilities().clone();
    let store = h.delay_store();
    let native = match caps.delay {
        DelaySupport::Native { max } => Some(max),
        DelaySupport::None => None,
    };
    if native.is_none() && store.is_none() {
        close(&[&h]).await;
        return skip(
            "backend declares no native delay (DelaySupport::None) and has no delay store",
        );
    }
    let tolerance = caps.delay_tolerance;
    let broker_half = async {
        let native_detail = match native {
            Some(max) => native_delay(&h, &queue, max, tolerance).await?,
            None => "no native delay".to_string(),
        };
        let store_detail = match store {
            Some(store) => store_delay(&h, store, &stored_queue, tolerance).await?,
            None => "no delay store".to_string(),
        };
        Ok::<_, String>(format!("{native_detail}; {store_detail}"))
    };
    let (broker, runtime) = tokio::join!(broker_half, runtime_delay(&backend, &caps));
    close(&[&h]).await;
    let broker = broker?;
    let runtime = runtime.map_err(|e| format!("runtime: {e}"))?;
    pass(format!("{broker}; runtime: {runtime}"))
}

async fn delayed_job(State(log): State<Log>, ctx: JobContext, Payload(body): Payload) {
    let i = log.start(&ctx, body);
    log.end(i);
}

/// Runtime half: worker A enqueues, through its own `client()`, a job delayed by D (1.5 s, or 2.5 ×
/// the native cap when the backend declares a cap of at most 2 s, so the runtime must re-publish
/// it twice) and is shut down before D. Worker B, on a fresh handle, runs it exactly once: never
/// before D − 50 ms, within D + (hops + 1) × (declared tolerance + idle poll + promote interval
/// where a delay store is used) + 500 ms, at attempt 1 (neither the restart nor a hop is an
/// attempt), and the queue then holds no copy (ready, in flight or delayed).
async fn runtime_delay(backend: &Arc<dyn Backend>, caps: &Capabilities) -> Result<String, String> {
    let queue = unique("delay-rt");
    let p = producer(backend, &queue, &[Priority::Normal]).await?;
    let (d, hops, how) = match caps.delay {
        DelaySupport::Native { max: Some(cap) } if cap <= HOP_TESTABLE => (
            cap.mul_f64(2.5),
            2u32,
            format!(", beyond the native cap of {}, so in 2 hops", s2(cap)),
        ),
        DelaySupport::Native { max: Some(cap) } => (
            RT_DELAY,
            0,
            format!(" (native cap {} too long to test hops)", s2(cap)),
        ),
        DelaySupport::Native { max: None } => (RT_DELAY, 0, " (native)".to_string()),
        DelaySupport::None => (RT_DELAY, 0, " (delay store + promoter)".to_string()),
    };
    let log = Log::default();
    let router = || Router::with_state(log.clone()).route(RT_JOB, delayed_job);
    let batch = batch_for(caps, 2);
    let config = |id: &str| worker_toml(id, 2, secs(1), &[queue_toml(&queue, 2, batch, &[])]);
    let mut a = Running::start(backend, router(), &config(&unique("w-delay-a"))).await?;
    let t0 = Instant::now();
    let id = a
        .client
        .enqueue(
            RT_JOB,
            &serde_json::json!({"delay_ms": d.as_millis() as u64}),
        )
        .queue(&queue)
        .delay(d)
        .send()
        .await
        .map_err(|e| format!("enqueue through worker A's client: {e}"))?;
    a.stop(secs(5)).await?;
    let down = t0.elapsed();
    ensure!(
        down < d,
        "worker A took {} to shut down, past the {} delay, so the restart was not tested",
        s2(down),
        s2(d)
    );
    ensure!(
        log.count(|_| true) == 0,
        "worker A ran the job delayed {} before it shut down, {} after the enqueue",
        s2(d),
        s2(down)
    );
    let mut b = Running::start(backend, router(), &config(&unique("w-delay-b"))).await?;
    let late = d + delay_slack(&p) * (hops + 1) + LATE_GRACE;
    wait_for(
        (late + secs(1)).saturating_sub(t0.elapsed()),
        || log.count(|_| true) >= 1,
        || format!("worker B never ran the job delayed {}{how}", s2(d)),
    )
    .await?;
    b.stop(secs(5)).await?;
    wait_drained(&p, &queue, millis(500)).await?;
    close(&[&p]).await;
    let runs = log.runs();
    ensure!(
        runs.len() == 1,
        "the delayed job ran {} times (expected once)",
        runs.len()
    );
    let r = &runs[0];
    ensure!(
        r.id == id,
        "a job {} ran, not the one enqueued ({id})",
        r.id
    );
    ensure!(
        r.worker == b.id,
        "the job ran on {} rather than on worker B ({})",
        r.worker,
        b.id
    );
    let at = r.started - t0;
    ensure!(
        at + EARLY_MARGIN >= d,
        "the job delayed {}{how} ran after only {}",
        s2(d),
        s2(at)
    );
    ensure!(
        at <= late,
        "the job delayed {}{how} ran only after {} (limit {})",
        s2(d),
        s2(at),
        s2(late)
    );
    ensure!(
        r.attempt == 1,
        "the delayed job ran as attempt {}: the restart or a hop counted as an attempt",
        r.attempt
    );
    Ok(format!(
        "a job delayed {}{how} enqueued by worker A (stopped after {}) ran once on worker B at {} \
         (limit {}), attempt 1, nothing left behind",
        s2(d),
        s2(down),
        s2(at),
        s2(late)
    ))
}

async fn native_delay(
    h: &Arc<dyn Broker>,
    queue: &str,
    max: Option<Duration>,
    tolerance: Duration,
) -> Result<String, String> {
    let long = max.map_or(LONG, |m| m.min(LONG));
    let delays = [Duration::ZERO, SHORT.min(long / 3), long];
    let t0 = Instant::now();
    let sent: Vec<Envelope> = delays
        .iter()
        .map(|d| {
            let e = Envelope::new("conformance.delay", format!("delay {}ms", d.as_millis()));
            if d.is_zero() {
                e
            } else {
                e.delayed(*d)
            }
        })
        .collect();
    let by_id: HashMap<String, (Duration, Option<SystemTime>)> = sent
        .iter()
        .zip(delays)
        .map(|(e, d)| (e.id.clone(), (d, e.not_before)))
        .collect();
    h.publish(queue, sent)
        .await
        .ctx("publish delayed messages")?;
    let t1 = Instant::now();
    let mut seen: HashMap<String, Duration> = HashMap::new();
    let deadline = t1 + long + tolerance + LATE_GRACE + secs(1);
    while seen.len() < delays.len() {
        ensure!(
            Instant::now() < deadline,
            "{} of 3 delayed messages arrived within {}",
            seen.len(),
            s2(deadline - t0)
        );
        let got = h
            .receive(queue, opts(3, millis(50), secs(30)))
            .await
            .ctx("receive")?;
        let now = Instant::now();
        for d in &got {
            let id = &d.envelope.id;
            let Some((delay, not_before)) = by_id.get(id) else {
                return Err(format!("unknown message {id} received"));
            };
            ensure!(
                !seen.contains_key(id),
                "delayed message {id} delivered twice"
            );
            ensure!(
                now - t0 + EARLY_MARGIN >= *delay,
                "message delayed {} delivered after only {}",
                s2(*delay),
                s2(now - t0)
            );
            let late = now - t1;
            ensure!(
                late <= *delay + tolerance + LATE_GRACE,
                "message delayed {} delivered only after {} (limit {} = delay + declared \
                 tolerance {} + {})",
                s2(*delay),
                s2(late),
                s2(*delay + tolerance + LATE_GRACE),
                s2(tolerance),
                s2(LATE_GRACE)
            );
            ensure!(
                d.envelope.not_before.map(to_millis) == not_before.map(to_millis),
                "message delayed {}: not_before {:?} arrived as {:?}",
                s2(*delay),
                not_before.map(to_millis),
                d.envelope.not_before.map(to_millis)
            );
            seen.insert(id.clone(), now - t0);
        }
        if !got.is_empty() {
            h.ack(&crate::support::receipts(&got))
                .await
                .ctx("ack delayed messages")?;
        }
    }
    let mut at: Vec<(Duration, Duration)> = by_id
        .iter()
        .map(|(id, (d, _))| (*d, seen.get(id).copied().unwrap_or_default()))
        .collect();
    at.sort();
    let pairs: Vec<String> = at
        .iter()
        .map(|(d, t)| format!("{}→{}", s2(*d), s2(*t)))
        .collect();
    Ok(format!(
        "native: delays delivered at {} (bounds ≥ D − {}ms, ≤ D + {})",
        pairs.join(", "),
        EARLY_MARGIN.as_millis(),
        s2(tolerance + LATE_GRACE)
    ))
}

async fn store_delay(
    h: &Arc<dyn Broker>,
    store: Arc<dyn DelayStore>,
    queue: &str,
    tolerance: Duration,
) -> Result<String, String> {
    let t0 = Instant::now();
    let sent: Vec<Envelope> = (0..STORED)
        .map(|i| Envelope::new("conformance.delay_store", format!("stored {i}")).delayed(LONG))
        .collect();
    let ids: Vec<String> = sent.iter().map(|e| e.id.clone()).collect();
    store
        .schedule(queue, sent)
        .await
        .ctx("DelayStore::schedule")?;
    let t1 = Instant::now();
    let waiting = store.delayed(queue).await.ctx("DelayStore::delayed")?;
    ensure!(
        waiting == STORED as u64,
        "DelayStore::delayed reads {waiting} right after scheduling {STORED}"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let moved = Arc::new(AtomicUsize::new(0));
    let mut promoters = JoinSet::new();
    for _ in 0..PROMOTERS {
        let (store, stop, moved) = (store.clone(), stop.clone(), moved.clone());
        promoters.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let n = store
                    .promote_due(SystemTime::now(), 10)
                    .await
                    .ctx("DelayStore::promote_due")?;
                moved.fetch_add(n, Ordering::Relaxed);
                tokio::time::sleep(millis(50)).await;
            }
            Ok::<_, String>(())
        });
    }
    let received = receive_promoted(h, queue, &ids, t0, t1, tolerance).await;
    // Keep the promoters running while checking that nothing is moved a second time.
    let again = match &received {
        Ok(_) => {
            let why = "every promoted message had arrived and been acked";
            let again = expect_empty(h, queue, secs(1), why).await;
            again.map_err(|e| format!("{e}: promote_due moved messages twice"))
        }
        Err(_) => Ok(()),
    };
    stop.store(true, Ordering::Relaxed);
    while let Some(joined) = promoters.join_next().await {
        joined.map_err(|e| format!("promoter task failed: {e}"))??;
    }
    let (first, last) = received?;
    again?;
    let left = store.delayed(queue).await.ctx("DelayStore::delayed")?;
    ensure!(
        left == 0,
        "DelayStore::delayed still reads {left} after every message was delivered"
    );
    Ok(format!(
        "delay store: {STORED} messages due in {} moved by {PROMOTERS} concurrent promoters \
         arrived once each at {}-{} (promote_due reported {} moves)",
        s2(LONG),
        s2(first),
        s2(last),
        moved.load(Ordering::Relaxed)
    ))
}

/// Receives the promoted messages; returns when the first and the last arrived, after `t0`.
async fn receive_promoted(
    h: &Arc<dyn Broker>,
    queue: &str,
    ids: &[String],
    t0: Instant,
    t1: Instant,
    tolerance: Duration,
) -> Result<(Duration, Duration), String> {
    let limit = LONG + tolerance + LATE_GRACE + millis(50);
    let mut seen: Vec<Duration> = Vec::new();
    let mut seen_ids: Vec<String> = Vec::new();
    while seen.len() < ids.len() {
        ensure!(
            Instant::now() < t1 + limit + secs(1),
            "{} of {STORED} stored messages arrived within {}",
            seen.len(),
            s2(limit + secs(1))
        );
        let got = h
            .receive(queue, opts(STORED, millis(50), secs(30)))
            .await
            .ctx("receive")?;
        let now = Instant::now();
        for d in &got {
            let id = &d.envelope.id;
            ensure!(ids.contains(id), "unknown message {id} received");
            ensure!(
                !seen_ids.contains(id),
                "stored message {id} delivered twice"
            );
            ensure!(
                now - t0 + EARLY_MARGIN >= LONG,
                "stored message delivered after {}, before its {} delay",
                s2(now - t0),
                s2(LONG)
            );
            ensure!(
                now - t1 <= limit,
                "stored message delivered only after {} (limit {})",
                s2(now - t1),
                s2(limit)
            );
            seen.push(now - t0);
            seen_ids.push(id.clone());
        }
        if !got.is_empty() {
            h.ack(&crate::support::receipts(&got))
                .await
                .ctx("ack promoted messages")?;
        }
    }
    let first = seen.iter().min().copied().unwrap_or_default();
    let last = seen.iter().max().copied().unwrap_or_default();
    Ok((first, last))
}
