//! Scenario 16, reconnect: the broker restarts in the middle of a run of 10,000 messages; all
//! arrive.

use crate::backend::Backend;
use crate::names::unique;
use crate::support::{
    batch_size, close, ensure, handle, millis, opts, pass, s2, secs, skip, Checked,
};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use stevedore_core::{Broker, BrokerError, Envelope, Receipt};
use tokio::task::JoinSet;
use tokio::time::Instant;

const N: usize = 10_000;
/// Published before the restart.
const BEFORE: usize = 5_000;
/// Published while the broker restarts; the rest is published after `restart` returned.
const DURING: usize = 4_000;
/// Received before the restart is triggered.
const RESTART_AT: usize = 2_500;
const CONSUMERS: usize = 4;
const LEASE: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Shared {
    received: Mutex<HashSet<String>>,
    transient: AtomicUsize,
    stop: AtomicBool,
    error: Mutex<Option<String>>,
}

impl Shared {
    fn received(&self) -> MutexGuard<'_, HashSet<String>> {
        self.received.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
    fn fail(&self, e: String) {
        self.error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(e);
    }
}

/// Publishes 5,000 messages; four consumers (own handles, 10 s lease) receive and ack, retrying
/// transient errors with backoff. Once 2,500 have arrived, `Backend::restart` is called while
/// 4,000 more are published (publisher retrying transient errors too); the last 1,000 are
/// published after the restart returned. Every id must arrive (for a backend that declares itself
/// not durable, the 1,000 published after the restart). Skipped with the hook's reason when the
/// backend cannot restart its broker.
pub(crate) async fn reconnect(backend: Arc<dyn Backend>) -> Checked {
    let queue = unique("reconnect");
    let producer = handle(&backend, &[&queue]).await?;
    let durable = producer.capabilities().durable;
    let mut sent: Vec<Envelope> = (0..N)
        .map(|i| Envelope::new("conformance.reconnect", format!("{{\"n\":{i}}}")))
        .collect();
    let after = sent.split_off(BEFORE + DURING);
    let during = sent.split_off(BEFORE);
    let before = sent;
    let mut required: HashSet<String> = after.iter().map(|e| e.id.clone()).collect();
    if durable {
        required.extend(before.iter().chain(&during).map(|e| e.id.clone()));
    }
    let shared = Arc::new(Shared::default());
    publish_retrying(producer.clone(), queue.clone(), before, shared.clone()).await?;

    let started = Instant::now();
    let mut tasks = JoinSet::new();
    let mut handles = vec![producer.clone()];
    for _ in 0..CONSUMERS {
        let h = handle(&backend, &[&queue]).await?;
        handles.push(h.clone());
        let (queue, shared) = (queue.clone(), shared.clone());
        tasks.spawn(async move {
            if let Err(e) = consume(h, queue, shared.clone()).await {
                shared.fail(e);
            }
        });
    }
    wait_for(&shared, secs(60), |n| n >= RESTART_AT, "before the restart").await?;
    let received_at_restart = shared.received().len();
    // In a JoinSet so that the publisher stops with the scenario, whichever way it ends.
    let mut publisher = JoinSet::new();
    publisher.spawn(publish_retrying(
        producer.clone(),
        queue.clone(),
        during,
        shared.clone(),
    ));
    let restart_began = Instant::now();
    let restarted = backend.restart().await;
    let restart_took = restart_began.elapsed();
    if let Err(reason) = restarted {
        shared.stop.store(true, Ordering::Relaxed);
        return skip(format!("backend cannot restart its broker: {reason}"));
    }
    if let Some(joined) = publisher.join_next().await {
        joined.map_err(|e| format!("publisher task failed: {e}"))??;
    }
    publish_retrying(producer.clone(), queue.clone(), after, shared.clone()).await?;
    let want = required.len();
    let req = Arc::new(required);
    let check = {
        let req = req.clone();
        let shared = shared.clone();
        move || {
            let seen = shared.received();
            req.iter().filter(|id| seen.contains(*id)).count()
        }
    };
    let waited = wait_for(&shared, secs(120), |_| check() >= want, "after the restart").await;
    shared.stop.store(true, Ordering::Relaxed);
    while tasks.join_next().await.is_some() {}
    if let Err(e) = waited {
        let got = check();
        let missing: Vec<String> = {
            let seen = shared.received();
            req.iter()
                .filter(|id| !seen.contains(*id))
                .take(5)
                .cloned()
                .collect()
        };
        return Err(format!(
            "{e}: {got} of {want} required ids arrived; missing e.g. {}",
            missing.join(", ")
        ));
    }
    for h in &handles {
        close(&[h]).await;
    }
    let scope = if durable {
        format!("all {N} arrived")
    } else {
        format!(
            "all {want} published after the restart arrived (backend declares itself not durable; \
             {} of the others survived)",
            shared.received().len() - want
        )
    };
    pass(format!(
        "broker restarted (took {}) after {received_at_restart} of {N} had arrived, while publishing; \
         {scope} in {}; {} transient errors retried",
        s2(restart_took),
        s2(started.elapsed()),
        shared.transient.load(Ordering::Relaxed)
    ))
}

/// Waits until `done(received count)` holds, a consumer fails, or `within` passes.
async fn wait_for(
    shared: &Shared,
    within: Duration,
    done: impl Fn(usize) -> bool,
    when: &str,
) -> Result<(), String> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(e) = shared.error() {
            return Err(format!("a consumer failed {when}: {e}"));
        }
        let n = shared.received().len();
        if done(n) {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "timed out {when} after {}",
            s2(within)
        );
        tokio::time::sleep(millis(20)).await;
    }
}

/// Exponential backoff from 50 ms to 2 s.
struct Backoff(Duration);

impl Backoff {
    fn new() -> Self {
        Backoff(millis(50))
    }
    async fn pause(&mut self, shared: &Shared) {
        shared.transient.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(self.0).await;
        self.0 = (self.0 * 2).min(secs(2));
    }
}

/// Publishes in batches, retrying a batch on transient errors (publish is at-least-once, so a
/// retried batch may arrive twice; ids stay the same).
async fn publish_retrying(
    h: Arc<dyn Broker>,
    queue: String,
    messages: Vec<Envelope>,
    shared: Arc<Shared>,
) -> Result<(), String> {
    let size = batch_size(h.capabilities());
    for chunk in messages.chunks(size) {
        let mut backoff = Backoff::new();
        loop {
            match h.publish(&queue, chunk.to_vec()).await {
                Ok(()) => break,
                Err(e) if e.is_transient() => backoff.pause(&shared).await,
                Err(e) => return Err(format!("publish: {e} (not transient)")),
            }
        }
        tokio::task::yield_now().await;
    }
    Ok(())
}

async fn consume(h: Arc<dyn Broker>, queue: String, shared: Arc<Shared>) -> Result<(), String> {
    let max = h.capabilities().max_batch.clamp(1, 10);
    let mut backoff = Backoff::new();
    while !shared.stop.load(Ordering::Relaxed) {
        match h.receive(&queue, opts(max, millis(500), LEASE)).await {
            Ok(got) => {
                backoff = Backoff::new();
                for d in got {
                    shared.received().insert(d.envelope.id.clone());
                    ack_retrying(&h, &d.receipt, &shared).await?;
                }
            }
            Err(e) if e.is_transient() => backoff.pause(&shared).await,
            Err(e) => return Err(format!("receive: {e} (not transient)")),
        }
    }
    Ok(())
}

/// Acks, retrying transient errors a few times; a lost lease or a give-up is fine (the message
/// comes back after its lease and is counted once).
async fn ack_retrying(h: &Arc<dyn Broker>, r: &Receipt, shared: &Shared) -> Result<(), String> {
    let mut backoff = Backoff::new();
    for _ in 0..5 {
        match h.ack(std::slice::from_ref(r)).await {
            Ok(()) | Err(BrokerError::LeaseLost { .. }) => return Ok(()),
            Err(e) if e.is_transient() => backoff.pause(shared).await,
            Err(e) => return Err(format!("ack: {e} (not transient)")),
        }
    }
    Ok(())
}
