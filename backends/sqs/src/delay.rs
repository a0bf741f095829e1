//! Delay on FIFO queues, which refuse per-message `DelaySeconds`.
//!
//! A delayed message for FIFO queue `orders.fifo` is sent to the standard queue `orders-delay`
//! with `DelaySeconds` = its remaining delay (at most 900 s), so SQS itself holds it, durably,
//! off every worker's memory. The promoter (any worker, any number at once) receives what has
//! become visible there and, when it is due, sends it into the FIFO queue and deletes it from the
//! delay queue; one that is not due yet (a delay longer than 15 minutes) goes back to the delay
//! queue for the rest. Send-then-delete: a crash in between sends it twice, never loses it, like
//! every other move in Stevedore. A delayed message takes its place in its key's order when it
//! comes due, not when it was published.

use crate::{QueueInfo, SqsBroker};
use async_trait::async_trait;
use std::time::{Duration, SystemTime};
use stevedore_core::{Broker, BrokerError, DelayStore, Envelope};

/// Visibility a promoter takes on what it moves: long enough to send it on.
const MOVE_LEASE: Duration = Duration::from_secs(30);

/// The delay store of FIFO queues. See the module docs.
#[derive(Debug)]
pub(crate) struct FifoDelay(pub(crate) SqsBroker);

impl SqsBroker {
    /// Sends messages for FIFO queue `queue` to its delay queue.
    pub(crate) async fn schedule_fifo(
        &self,
        queue: &str,
        q: &QueueInfo,
        messages: &[Envelope],
    ) -> Result<(), BrokerError> {
        let Some(delay_url) = &q.delay_url else {
            return Err(BrokerError::permanent(format!(
                "{queue} is a FIFO queue without a delay queue"
            )));
        };
        self.send(queue, delay_url, q.max_size, false, messages)
            .await
    }
}

#[async_trait]
impl DelayStore for FifoDelay {
    async fn schedule(&self, queue: &str, messages: Vec<Envelope>) -> Result<(), BrokerError> {
        // `publish` sends what is due at once and parks the rest.
        self.0.publish(queue, messages).await
    }

    async fn promote_due(&self, now: SystemTime, limit: usize) -> Result<usize, BrokerError> {
        let _ = now;
        let mut moved = 0;
        for (queue, q) in self.0.known_fifo() {
            let Some(delay_url) = q.delay_url.clone() else {
                continue;
            };
            while moved < limit {
                let got = self
                    .0
                    .receive_from(&queue, &delay_url, 10, Duration::ZERO, MOVE_LEASE, None)
                    .await?;
                if got.is_empty() {
                    break;
                }
                let now = SystemTime::now();
                let (later, due): (Vec<_>, Vec<_>) = got
                    .iter()
                    .map(|d| d.envelope.clone())
                    .partition(|e| e.delay_remaining(now).is_some());
                if !due.is_empty() {
                    self.0.send(&queue, &q.url, q.max_size, true, &due).await?;
                }
                if !later.is_empty() {
                    self.0
                        .send(&queue, &delay_url, q.max_size, false, &later)
                        .await?;
                }
                let receipts: Vec<_> = got.into_iter().map(|d| d.receipt).collect();
                match self.0.ack(&receipts).await {
                    // A lease that ended while moving: the copy comes back and is moved again
                    // (a duplicate, never a loss).
                    Ok(()) | Err(BrokerError::LeaseLost { .. }) => {}
                    Err(e) => return Err(e),
                }
                moved += due.len();
            }
        }
        Ok(moved)
    }

    async fn delayed(&self, queue: &str) -> Result<u64, BrokerError> {
        Ok(self.0.depth(queue).await?.delayed.unwrap_or(0))
    }

    async fn next_due(&self) -> Result<Option<SystemTime>, BrokerError> {
        // SQS does not tell; the promoter passes every interval.
        Ok(None)
    }
}
