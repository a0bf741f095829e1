//! Delay scheduling that never holds a job in worker memory.
//!
//! Where the broker delays natively without a cap (the in-memory broker), a delayed message is
//! simply published. Where the cap is finite (SQS: 900 s), the broker holds it for the cap and the
//! runtime, seeing it arrive before its `not_before`, re-publishes it with the remaining delay (a
//! "hop") and acks the early copy, so any delay works. Where the broker has no native delay, the
//! message goes to the backend's durable [`DelayStore`] and a promoter task moves due messages
//! into their queue, in bounded batches.

use std::sync::Arc;
use std::time::{Duration, SystemTime};
use stevedore_core::{Broker, BrokerError, DelayStore, DelaySupport, Envelope};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Most messages one promotion call moves.
pub(crate) const PROMOTE_BATCH: usize = 512;

/// Publishes messages, routing delayed ones natively, by hops, or to the delay store. Cheap to
/// clone; thread safe.
#[derive(Clone, Debug)]
pub(crate) struct Scheduler {
    broker: Arc<dyn Broker>,
    store: Option<Arc<dyn DelayStore>>,
}

impl Scheduler {
    /// A scheduler over `broker` (and its delay store, if it has one).
    pub(crate) fn new(broker: Arc<dyn Broker>) -> Self {
        let store = broker.delay_store();
        Scheduler { broker, store }
    }

    /// The broker it publishes to.
    pub(crate) fn broker(&self) -> &Arc<dyn Broker> {
        &self.broker
    }

    /// Whether delayed messages can be handled at all (natively or emulated).
    #[cfg(test)]
    fn supports_delay(&self) -> bool {
        !matches!(self.broker.capabilities().delay, DelaySupport::None) || self.store.is_some()
    }

    /// One line for the start-up log: how delays are done on this backend.
    pub(crate) fn describe(&self) -> String {
        let name = self.broker.name();
        match (self.broker.capabilities().delay, &self.store) {
            (DelaySupport::Native { max: None }, _) => format!("delay: native on {name}"),
            (DelaySupport::Native { max: Some(cap) }, _) => format!(
                "delay: native on {name} up to {}s; longer delays are re-published in hops",
                cap.as_secs()
            ),
            (DelaySupport::None, Some(_)) => {
                format!("delay: emulated on {name} by its durable delay store")
            }
            (DelaySupport::None, None) => {
                format!("delay: UNAVAILABLE on {name}: delayed jobs and retry backoff are refused")
            }
        }
    }

    /// Publishes to physical queue `queue`. Messages due now go straight to the queue; delayed ones
    /// as described in the module docs. Fails with [`BrokerError::Unsupported`] for a delayed
    /// message on a backend with no way to delay.
    pub(crate) async fn publish(
        &self,
        queue: &str,
        messages: Vec<Envelope>,
    ) -> Result<(), BrokerError> {
        if !matches!(
            self.broker.queue_capabilities(queue).delay,
            DelaySupport::None
        ) {
            return self.broker.publish(queue, messages).await;
        }
        let now = SystemTime::now();
        let (later, due): (Vec<_>, Vec<_>) = messages
            .into_iter()
            .partition(|m| m.delay_remaining(now).is_some());
        if !due.is_empty() {
            self.broker.publish(queue, due).await?;
        }
        if !later.is_empty() {
            let store = self.store.as_ref().ok_or(BrokerError::Unsupported {
                backend: self.broker.name(),
                what: "delayed delivery (no native delay and no delay store)",
            })?;
            store.schedule(queue, later).await?;
        }
        Ok(())
    }

    /// How early a received message is (a hop of a capped delay), or `None` when it is due.
    pub(crate) fn early_by(&self, env: &Envelope, now: SystemTime) -> Option<Duration> {
        env.delay_remaining(now)
    }
}

/// Starts the promoter when the backend has a delay store: it moves due messages into their queues
/// every `interval` (sooner when the store knows the next due time), in batches of
/// [`PROMOTE_BATCH`], until `shutdown` turns true. Any number of workers may run one at once.
pub(crate) fn spawn_promoter(
    broker: &Arc<dyn Broker>,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) -> Option<JoinHandle<()>> {
    let store = broker.delay_store()?;
    Some(tokio::spawn(async move {
        let mut failures = 0u32;
        while !*shutdown.borrow() {
            let pause = match store.promote_due(SystemTime::now(), PROMOTE_BATCH).await {
                Ok(n) if n >= PROMOTE_BATCH => Duration::ZERO,
                Ok(_) => {
                    failures = 0;
                    match store.next_due().await {
                        Ok(Some(t)) => t
                            .duration_since(SystemTime::now())
                            .unwrap_or_default()
                            .min(interval),
                        _ => interval,
                    }
                }
                Err(e) => {
                    failures += 1;
                    tracing::warn!(error = %e, failures, "delay promotion failed; retrying");
                    interval * failures.min(20)
                }
            };
            if !pause.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = shutdown.changed() => {}
                }
            }
        }
    }))
}

/// A message that arrived before its `not_before` (a hop of a capped native delay): send it on with
/// the remaining delay, then ack this copy.
pub(crate) async fn hop(ctx: &QueueCtx, d: Delivery, early: Duration) {
    tracing::debug!(id = %d.envelope.id, remaining = ?early, "delayed message arrived early; re-publishing for the rest");
    let to = d.receipt.queue().to_string();
    let mut envelope = d.envelope;
    stevedore_core::wire::mark_resent(&mut envelope);
    if let Err(e) = forward(ctx, d.receipt, &to, envelope).await {
        tracing::warn!(error = %e, "could not re-publish a delayed message; released it");
    }
}

use crate::runtime::{forward, QueueCtx};
use stevedore_core::Delivery;

#[cfg(test)]
mod tests {
    use super::*;
    use async_trait::async_trait;
    use stevedore_core::{Capabilities, Delivery, Depth, MemoryBroker, Receipt, ReceiveOptions};

    /// A broker with no native delay and no store: delays must be refused, never ignored.
    #[derive(Debug)]
    struct NoDelay(MemoryBroker, Capabilities);

    #[async_trait]
    impl Broker for NoDelay {
        fn name(&self) -> &'static str {
            "no-delay"
        }
        fn capabilities(&self) -> &Capabilities {
            &self.1
        }
        async fn publish(&self, q: &str, m: Vec<Envelope>) -> Result<(), BrokerError> {
            self.0.publish(q, m).await
        }
        async fn receive(&self, q: &str, o: ReceiveOptions) -> Result<Vec<Delivery>, BrokerError> {
            self.0.receive(q, o).await
        }
        async fn ack(&self, r: &[Receipt]) -> Result<(), BrokerError> {
            self.0.ack(r).await
        }
        async fn release(&self, r: &[Receipt]) -> Result<(), BrokerError> {
            self.0.release(r).await
        }
        async fn release_uncounted(&self, d: Vec<Delivery>) -> Result<(), BrokerError> {
            self.0.release_uncounted(d).await
        }
        async fn extend_lease(&self, r: &Receipt, l: Duration) -> Result<(), BrokerError> {
            self.0.extend_lease(r, l).await
        }
        async fn depth(&self, q: &str) -> Result<Depth, BrokerError> {
            self.0.depth(q).await
        }
    }

    #[tokio::test]
    async fn native_delay_is_published_as_is() -> Result<(), BrokerError> {
        let b: Arc<dyn Broker> = Arc::new(MemoryBroker::new());
        let s = Scheduler::new(b.clone());
        assert!(s.supports_delay());
        assert_eq!(s.describe(), "delay: native on memory");
        let e = Envelope::new("j", "x").delayed(Duration::from_secs(60));
        assert!(s.early_by(&e, SystemTime::now()).is_some());
        s.publish("q", vec![e, Envelope::new("j", "now")]).await?;
        let d = b.depth("q").await?;
        assert_eq!((d.ready, d.delayed), (1, Some(1)));
        Ok(())
    }

    #[tokio::test]
    async fn no_way_to_delay_is_refused_but_due_messages_go_through() -> Result<(), BrokerError> {
        let mem = MemoryBroker::new();
        let mut caps = mem.capabilities().clone();
        caps.delay = DelaySupport::None;
        let b: Arc<dyn Broker> = Arc::new(NoDelay(mem, caps));
        let s = Scheduler::new(b.clone());
        assert!(!s.supports_delay());
        assert!(s.describe().contains("UNAVAILABLE"));
        s.publish("q", vec![Envelope::new("j", "now")]).await?;
        let later = Envelope::new("j", "later").delayed(Duration::from_secs(5));
        let err = s.publish("q", vec![later]).await;
        assert!(
            matches!(err, Err(BrokerError::Unsupported { .. })),
            "{err:?}"
        );
        assert_eq!(
            b.depth("q").await?.ready,
            1,
            "the delayed one was not silently sent now"
        );
        Ok(())
    }
}
