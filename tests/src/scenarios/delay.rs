//! Scenario 11, delay, broker half: native delay, and the backend's durable delay store.
//!
//! Bounds, with D the delay and T the backend's declared `delay_tolerance`: a message is never
//! received before D − 50 ms after its envelope was built (not_before travels in milliseconds), and
//! is received within D + T + 500 ms after the publish (or schedule) call returned.
// LEAD: add the runtime half here (delays beyond the native cap hop; delayed messages survive a
// worker restart).

use crate::backend::Backend;
use crate::names::unique;
use crate::support::{
    close, ensure, expect_empty, handle, millis, opts, pass, s2, secs, skip, Checked, Context,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use stevedore_core::{to_millis, Broker, DelayStore, DelaySupport, Envelope};
use tokio::task::JoinSet;
use tokio::time::Instant;

const LONG: Duration = Duration::from_millis(1500);
const SHORT: Duration = Duration::from_millis(500);
const EARLY_MARGIN: Duration = Duration::from_millis(50);
const LATE_GRACE: Duration = Duration::from_millis(500);
const PROMOTERS: usize = 4;
const STORED: usize = 5;

/// Native delay (if declared): one batch of three messages, due now, in 0.5 s and in 1.5 s, each
/// received within its bounds, with `not_before` intact. Delay store (if the backend has one): five
/// messages scheduled 1.5 s ahead are counted by `delayed`, are not received before they are due
/// while four promoters call `promote_due` concurrently every 50 ms, then arrive exactly once each
/// within the bound (+ 50 ms promoter period), and leave the store.
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
    let native_detail = match native {
        Some(max) => native_delay(&h, &queue, max, tolerance).await?,
        None => "no native delay".to_string(),
    };
    let store_detail = match store {
        Some(store) => store_delay(&h, store, &stored_queue, tolerance).await?,
        None => "no delay store".to_string(),
    };
    close(&[&h]).await;
    pass(format!("{native_detail}; {store_detail}"))
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
