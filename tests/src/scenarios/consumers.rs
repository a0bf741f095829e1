//! Scenario 2, competing consumers: 5,000 messages across 20 concurrent consumers, each on its own
//! handle; every id acked exactly once, none missing.

use crate::backend::Backend;
use crate::ledger::Ledger;
use crate::names::unique;
use crate::support::{
    close, ensure, expect_empty, handle, opts, pass, publish_all, s2, secs, Checked, Context,
};
use std::sync::Arc;
use std::time::Duration;
use stevedore_core::{Broker, BrokerError, Envelope};
use tokio::sync::Barrier;
use tokio::task::JoinSet;
use tokio::time::Instant;

const N: usize = 5000;
const CONSUMERS: usize = 20;

/// Publishes 5,000 messages, then 20 tasks, each with its own `connect()` handle, start together
/// and receive (up to 10 at a time, 30 s lease) and ack one by one until all are acked. At least
/// two consumers must get work. A message may be received twice only if the earlier delivery's ack
/// came back `LeaseLost`; no id may be acked twice, none may be missing, and nothing may come back
/// afterwards.
pub(crate) async fn competing_consumers(backend: Arc<dyn Backend>) -> Checked {
    let queue = unique("compete");
    let producer = handle(&backend, &[&queue]).await?;
    let sent: Vec<Envelope> = (0..N)
        .map(|i| Envelope::new("conformance.compete", format!("{{\"n\":{i}}}")))
        .collect();
    let ledger = Arc::new(Ledger::new(sent.iter().map(|e| e.id.clone())));
    publish_all(&producer, &queue, sent).await?;

    let within = secs(90);
    let deadline = Instant::now() + within;
    let started = Instant::now();
    let mut set = JoinSet::new();
    let mut handles = Vec::new();
    let start = Arc::new(Barrier::new(CONSUMERS));
    for _ in 0..CONSUMERS {
        let h = handle(&backend, &[&queue]).await?;
        handles.push(h.clone());
        set.spawn(consume(
            h,
            queue.clone(),
            ledger.clone(),
            start.clone(),
            deadline,
        ));
    }
    let mut per_consumer = Vec::new();
    while let Some(joined) = set.join_next().await {
        let n = joined.map_err(|e| format!("consumer task failed: {e}"))??;
        per_consumer.push(n);
    }
    ensure!(ledger.complete(), "{}", ledger.shortfall(&s2(within)));
    ledger.finish()?;
    let took = started.elapsed();
    expect_empty(&producer, &queue, secs(1), "all 5000 messages were acked").await?;
    for h in &handles {
        close(&[h]).await;
    }
    close(&[&producer]).await;
    let busy = per_consumer.iter().filter(|n| **n > 0).count();
    ensure!(
        busy >= 2,
        "only {busy} of {CONSUMERS} concurrent consumers received anything: the messages were not \
         shared out"
    );
    pass(format!(
        "{N} ids acked exactly once by {CONSUMERS} consumers in {} ({busy} got work, {}-{} acks \
         each); {} duplicate deliveries after lost leases",
        s2(took),
        per_consumer.iter().min().copied().unwrap_or(0),
        per_consumer.iter().max().copied().unwrap_or(0),
        ledger.lost_count()
    ))
}

/// One consumer: receive, record, ack each delivery on its own; returns how many it acked.
async fn consume(
    h: Arc<dyn Broker>,
    queue: String,
    ledger: Arc<Ledger>,
    start: Arc<Barrier>,
    deadline: Instant,
) -> Result<usize, String> {
    let max = h.capabilities().max_batch.clamp(1, 10);
    let mut acked = 0;
    start.wait().await;
    while !ledger.complete() && Instant::now() < deadline {
        let call = Instant::now();
        let got = h
            .receive(&queue, opts(max, Duration::from_millis(500), secs(30)))
            .await
            .ctx("receive")?;
        ledger.received(call, &got)?;
        for d in got {
            // The handler's work: give the other consumers a turn, as a real handler would.
            tokio::task::yield_now().await;
            match h.ack(std::slice::from_ref(&d.receipt)).await {
                Ok(()) => {
                    ledger.acked(&d.envelope.id)?;
                    acked += 1;
                }
                Err(BrokerError::LeaseLost { .. }) => ledger.lease_lost(&d.envelope.id),
                Err(e) => return Err(format!("ack {}: {e}", d.envelope.id)),
            }
        }
    }
    Ok(acked)
}
