//! Dead-letter queue tools: list, inspect, replay, purge. They work on every backend through the
//! broker trait alone. Listing reads without taking ([`Broker::browse`]) where the backend can,
//! so it changes nothing; elsewhere (RabbitMQ) it receives under a short lease and releases, which
//! counts a delivery. Replay and purge receive under a short lease, and whatever they do not
//! replay or purge is released untouched.

use crate::client::Client;
use crate::error::JobError;
use crate::runtime::{forward, truncate, QueueCtx};
use crate::stats::JobResult;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use stevedore_core::{
    from_millis, names, to_millis, wire, Broker, BrokerError, Delivery, Envelope, ReceiveOptions,
};

/// Lease taken on dead letters while a tool looks at them.
const TOOL_LEASE: Duration = Duration::from_secs(60);

/// A dead-lettered job and why it died.
#[derive(Clone, Debug)]
pub struct DeadLetter {
    /// The message, payload intact.
    pub envelope: Envelope,
    /// Last error and why it was given up.
    pub error: String,
    /// Attempts made.
    pub attempts: u32,
    /// Logical queue it came from.
    pub origin: String,
    /// First failure.
    pub first_failure: Option<SystemTime>,
    /// Last failure.
    pub last_failure: Option<SystemTime>,
    /// Worker that gave up.
    pub worker: String,
}

impl DeadLetter {
    /// Reads the dead-letter headers of a message.
    pub fn from_envelope(envelope: Envelope) -> Self {
        let h = |k: &str| envelope.headers.get(k).cloned().unwrap_or_default();
        let t = |k: &str| {
            envelope
                .headers
                .get(k)
                .and_then(|v| v.parse().ok())
                .map(from_millis)
        };
        DeadLetter {
            error: h(wire::DLQ_ERROR),
            attempts: h(wire::DLQ_ATTEMPTS).parse().unwrap_or(0),
            origin: h(wire::DLQ_ORIGIN),
            first_failure: t(wire::DLQ_FIRST_FAILURE),
            last_failure: t(wire::DLQ_LAST_FAILURE),
            worker: h(wire::DLQ_WORKER),
            envelope,
        }
    }
}

/// Which dead letters an operation applies to.
#[derive(Clone, Debug)]
pub enum Select {
    /// Every one (up to the limit).
    All,
    /// Only these message ids.
    Ids(Vec<String>),
}

impl Select {
    fn matches(&self, id: &str) -> bool {
        match self {
            Select::All => true,
            Select::Ids(ids) => ids.iter().any(|i| i == id),
        }
    }
}

async fn take_all(
    broker: &Arc<dyn Broker>,
    dlq: &str,
    limit: usize,
) -> Result<Vec<Delivery>, BrokerError> {
    let mut out = Vec::new();
    let batch = broker.capabilities().max_batch.clamp(1, 100);
    while out.len() < limit {
        let opts = ReceiveOptions {
            max: batch.min(limit - out.len()),
            wait: Duration::from_millis(200),
            lease: TOOL_LEASE,
        };
        let got = broker.receive(dlq, opts).await?;
        if got.is_empty() {
            break;
        }
        out.extend(got);
    }
    Ok(out)
}

/// Leases up to `limit` dead letters of `queue`, split into the selected ones and the rest.
async fn take_selected(
    broker: &Arc<dyn Broker>,
    queue: &str,
    select: &Select,
    limit: usize,
) -> Result<(Vec<Delivery>, Vec<Delivery>), BrokerError> {
    let got = take_all(broker, &names::dead_letter(queue), limit).await?;
    Ok(got
        .into_iter()
        .partition(|d| select.matches(&d.envelope.id)))
}

async fn give_back(broker: &Arc<dyn Broker>, rest: Vec<Delivery>) -> Result<(), BrokerError> {
    if rest.is_empty() {
        return Ok(());
    }
    let receipts: Vec<_> = rest.into_iter().map(|d| d.receipt).collect();
    broker.release(&receipts).await
}

/// Up to `limit` dead letters of logical queue `queue`, oldest first where the broker keeps order.
/// Leaves the queue as it was: read by [`Broker::browse`], or, on a backend that cannot browse,
/// received and released at once (their delivery counts grow by one, and leased ones are not
/// seen).
pub async fn list(
    broker: &Arc<dyn Broker>,
    queue: &str,
    limit: usize,
) -> Result<Vec<DeadLetter>, BrokerError> {
    match broker.browse(&names::dead_letter(queue), limit).await {
        Ok(found) => return Ok(found.into_iter().map(DeadLetter::from_envelope).collect()),
        Err(BrokerError::Unsupported { .. }) => {}
        Err(e) => return Err(e),
    }
    let got = take_all(broker, &names::dead_letter(queue), limit).await?;
    let out = got
        .iter()
        .map(|d| DeadLetter::from_envelope(d.envelope.clone()))
        .collect();
    give_back(broker, got).await?;
    Ok(out)
}

/// Moves the selected dead letters back to their origin queue (at their priority level) as fresh
/// jobs (attempt 1, dead-letter headers removed) and removes them from the dead-letter queue.
/// Returns how many were replayed. Each message is published before it is acked, so a crash in
/// between duplicates rather than loses.
pub async fn replay(
    broker: &Arc<dyn Broker>,
    queue: &str,
    select: &Select,
    limit: usize,
) -> Result<usize, BrokerError> {
    let (chosen, rest) = take_selected(broker, queue, select, limit).await?;
    let client = Client::new(broker.clone());
    let mut done = 0;
    let mut result = Ok(());
    for d in &chosen {
        let dl = DeadLetter::from_envelope(d.envelope.clone());
        let origin = if dl.origin.is_empty() {
            queue.to_string()
        } else {
            dl.origin
        };
        let mut fresh = d.envelope.clone();
        fresh.attempt = 1;
        fresh.not_before = None;
        // A new unit of work: its trace starts at the replay, not at the first enqueue.
        fresh.trace_parent = None;
        fresh
            .headers
            .retain(|k, _| !k.starts_with("stevedore-dlq-") && k != wire::FIRST_FAILURE);
        if let Err(e) = client.publish(&origin, vec![fresh]).await {
            result = Err(match e {
                crate::EnqueueError::Broker(b) => b,
                other => BrokerError::permanent(other.to_string()),
            });
            break;
        }
        broker.ack(std::slice::from_ref(&d.receipt)).await?;
        done += 1;
    }
    let unreplayed: Vec<_> = chosen.into_iter().skip(done).chain(rest).collect();
    give_back(broker, unreplayed).await?;
    result.map(|()| done)
}

/// Deletes the selected dead letters for good. Returns how many.
pub async fn purge(
    broker: &Arc<dyn Broker>,
    queue: &str,
    select: &Select,
    limit: usize,
) -> Result<usize, BrokerError> {
    let (chosen, rest) = take_selected(broker, queue, select, limit).await?;
    let receipts: Vec<_> = chosen.iter().map(|d| d.receipt.clone()).collect();
    if !receipts.is_empty() {
        broker.ack(&receipts).await?;
    }
    give_back(broker, rest).await?;
    Ok(receipts.len())
}

/// Builds the dead-letter copy of a message: payload intact, with the standard headers.
pub(crate) fn dead_letter_copy(
    env: &Envelope,
    origin: &str,
    attempt: u32,
    error: &str,
    worker_id: &str,
) -> Envelope {
    let now = to_millis(SystemTime::now()).to_string();
    let mut copy = env.clone();
    copy.not_before = None;
    let first = copy
        .headers
        .remove(wire::FIRST_FAILURE)
        .unwrap_or_else(|| now.clone());
    copy.headers.remove("stevedore-last-error");
    copy.headers
        .insert(wire::DLQ_ERROR.into(), truncate(error, 4096));
    copy.headers
        .insert(wire::DLQ_ATTEMPTS.into(), attempt.to_string());
    copy.headers.insert(wire::DLQ_FIRST_FAILURE.into(), first);
    copy.headers.insert(wire::DLQ_LAST_FAILURE.into(), now);
    copy.headers
        .insert(wire::DLQ_WORKER.into(), worker_id.to_string());
    copy.headers
        .insert(wire::DLQ_ORIGIN.into(), origin.to_string());
    copy
}

/// The dead-letter act: publishes the dead-letter copy to `<queue>__dlq`, then acks the original
/// ([`forward`]); if the DLQ cannot be written the original is released instead.
pub(crate) async fn dead_letter(
    ctx: &QueueCtx,
    d: Delivery,
    attempt: u32,
    err: &JobError,
    reason: &str,
) -> JobResult {
    let error = format!("{} ({reason})", err.message());
    let copy = dead_letter_copy(&d.envelope, &ctx.name, attempt, &error, &ctx.worker_id);
    let hold = crate::runtime::unique_hold(&ctx.name, &d.envelope);
    tracing::warn!(error = %error, "job dead-lettered");
    match forward(ctx, d.receipt, &names::dead_letter(&ctx.name), copy).await {
        Ok(()) => {
            crate::runtime::release_unique(ctx, hold).await;
            JobResult::DeadLettered
        }
        Err(e) => {
            tracing::error!(error = %e, "could not write to the dead-letter queue; released the message instead");
            JobResult::Released
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_letter_copy_keeps_payload_and_adds_headers() {
        let mut env = Envelope::new("j", &b"\x00\xffraw"[..]).with_header("x-a", "1");
        env.headers.insert(wire::FIRST_FAILURE.into(), "123".into());
        let copy = dead_letter_copy(&env, "emails", 3, "boom", "w-1");
        assert_eq!(copy.payload, env.payload);
        assert_eq!(copy.id, env.id);
        let h = &copy.headers;
        assert_eq!(h.get(wire::DLQ_ERROR).map(String::as_str), Some("boom"));
        assert_eq!(h.get(wire::DLQ_ATTEMPTS).map(String::as_str), Some("3"));
        assert_eq!(
            h.get(wire::DLQ_FIRST_FAILURE).map(String::as_str),
            Some("123")
        );
        assert_eq!(h.get(wire::DLQ_ORIGIN).map(String::as_str), Some("emails"));
        assert_eq!(h.get(wire::DLQ_WORKER).map(String::as_str), Some("w-1"));
        assert!(h.contains_key(wire::DLQ_LAST_FAILURE));
        assert_eq!(h.get("x-a").map(String::as_str), Some("1"));
    }

    use stevedore_core::MemoryBroker;

    async fn seeded() -> Result<(Arc<dyn Broker>, Vec<String>), BrokerError> {
        let broker: Arc<dyn Broker> = Arc::new(MemoryBroker::new());
        let mut ids = Vec::new();
        for i in 0..3 {
            let env = Envelope::new("j", format!("{{\"n\":{i}}}"));
            ids.push(env.id.clone());
            let dl = dead_letter_copy(&env, "emails", 5, "boom", "w");
            broker
                .publish(&names::dead_letter("emails"), vec![dl])
                .await?;
        }
        Ok((broker, ids))
    }

    #[tokio::test]
    async fn list_leaves_everything_in_place() -> Result<(), BrokerError> {
        let (b, ids) = seeded().await?;
        let l = list(&b, "emails", 100).await?;
        assert_eq!(
            l.iter().map(|d| d.envelope.id.clone()).collect::<Vec<_>>(),
            ids
        );
        assert_eq!(l[0].attempts, 5);
        assert_eq!(l[0].origin, "emails");
        assert_eq!(b.depth("emails__dlq").await?.ready, 3);
        Ok(())
    }

    #[tokio::test]
    async fn replay_one_moves_it_back_fresh() -> Result<(), BrokerError> {
        let (b, ids) = seeded().await?;
        let n = replay(&b, "emails", &Select::Ids(vec![ids[1].clone()]), 100).await?;
        assert_eq!(n, 1);
        assert_eq!(b.depth("emails__dlq").await?.ready, 2);
        let got = b
            .receive(
                "emails",
                ReceiveOptions {
                    max: 10,
                    wait: Duration::ZERO,
                    lease: TOOL_LEASE,
                },
            )
            .await?;
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].envelope.id, ids[1]);
        assert_eq!(got[0].envelope.attempt, 1);
        assert!(!got[0].envelope.headers.contains_key(wire::DLQ_ERROR));
        Ok(())
    }

    #[tokio::test]
    async fn purge_all_empties_the_dlq() -> Result<(), BrokerError> {
        let (b, _) = seeded().await?;
        assert_eq!(purge(&b, "emails", &Select::All, 100).await?, 3);
        assert_eq!(
            b.depth("emails__dlq").await?,
            stevedore_core::Depth::default()
        );
        Ok(())
    }
}
