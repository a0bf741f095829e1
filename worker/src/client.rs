//! Enqueueing jobs from any service.
//!
//! ```
//! # use stevedore::{Client, MemoryBroker, Priority};
//! # use std::{sync::Arc, time::Duration};
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), stevedore::EnqueueError> {
//! let client = Client::new(Arc::new(MemoryBroker::new()));
//! let id = client
//!     .enqueue("send_email", &serde_json::json!({"to": "a@example.com"}))
//!     .queue("emails")
//!     .priority(Priority::High)
//!     .delay(Duration::from_secs(600))
//!     .key("order-42")
//!     .send()
//!     .await?;
//! # assert!(!id.is_empty());
//! # Ok(()) }
//! ```

use crate::delay::Scheduler;
use bytes::Bytes;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use stevedore_core::{names, Broker, BrokerError, Envelope, Priority};

/// Why an enqueue failed. Nothing was published unless the variant says otherwise.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EnqueueError {
    /// The payload could not be serialized.
    #[error("cannot encode the payload as JSON: {0}")]
    Encode(#[from] serde_json::Error),
    /// The queue name is not valid.
    #[error("invalid queue name {queue:?}: {reason}")]
    InvalidQueue {
        /// The name given.
        queue: String,
        /// What is allowed.
        reason: String,
    },
    /// The queue holds more than the limit given with [`Enqueue::max_depth`].
    #[error("queue {queue:?} is full: {depth} messages waiting, limit {max}")]
    QueueFull {
        /// Logical queue.
        queue: String,
        /// Ready + delayed messages counted.
        depth: u64,
        /// The limit.
        max: u64,
    },
    /// A message carries more headers of its own than the broker takes
    /// ([`Capabilities::max_headers`](stevedore_core::Capabilities::max_headers)); nothing was
    /// sent.
    #[error("{count} headers on a message for queue {queue:?}, but {backend} takes at most {max} (headers named stevedore-* do not count)")]
    TooManyHeaders {
        /// Logical queue.
        queue: String,
        /// Headers the message carries (its own, not Stevedore's).
        count: usize,
        /// The broker's budget.
        max: usize,
        /// Which backend.
        backend: &'static str,
    },
    /// A delay longer than [`MAX_DELAY`] (a mistake, and past what timestamps on the wire hold).
    #[error("a delay of {} is longer than the longest allowed (100 years)", humantime::format_duration(*.delay))]
    InvalidDelay {
        /// The delay asked for.
        delay: Duration,
    },
    /// The broker refused or failed (see [`BrokerError::is_transient`]; on a transient error the
    /// message may or may not have been accepted).
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

/// The longest delay an enqueue takes: 100 years.
pub const MAX_DELAY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// A producer handle. Cheap to clone; thread safe.
#[derive(Clone, Debug)]
pub struct Client {
    /// One reference count for the whole handle: every job's context holds a clone, and a count
    /// shared by the runtime's threads costs per atomic operation.
    inner: Arc<ClientInner>,
}

#[derive(Debug)]
struct ClientInner {
    scheduler: Scheduler,
    /// Per logical queue: refuse enqueues once this many messages wait (`queues.<name>.max_depth`).
    limits: BTreeMap<String, u64>,
}

impl Client {
    /// A client publishing to `broker`.
    pub fn new(broker: Arc<dyn Broker>) -> Self {
        Client {
            inner: Arc::new(ClientInner {
                scheduler: Scheduler::new(broker),
                limits: BTreeMap::new(),
            }),
        }
    }

    /// Applies the `max_depth` of every queue in `config` (backpressure): an enqueue to a queue at
    /// or over its limit fails with [`EnqueueError::QueueFull`] unless [`Enqueue::max_depth`] says
    /// otherwise for that call.
    pub fn with_limits_from(mut self, config: &crate::config::Config) -> Self {
        let limits = config
            .effective_queues()
            .into_iter()
            .filter_map(|(name, q)| q.max_depth.map(|m| (name, m)))
            .collect();
        self.inner = Arc::new(ClientInner {
            scheduler: self.inner.scheduler.clone(),
            limits,
        });
        self
    }

    /// Starts an enqueue of `job` with a JSON payload, to queue `default` unless
    /// [`Enqueue::queue`] says otherwise. Nothing is sent until [`Enqueue::send`].
    pub fn enqueue<T: serde::Serialize + ?Sized>(&self, job: &str, payload: &T) -> Enqueue {
        let envelope = serde_json::to_vec(payload)
            .map(|bytes| Envelope::new(job, bytes).json())
            .map_err(EnqueueError::from);
        self.build(envelope)
    }

    /// Starts an enqueue of `job` with raw payload bytes.
    pub fn enqueue_bytes(&self, job: &str, payload: impl Into<Bytes>) -> Enqueue {
        self.build(Ok(Envelope::new(job, payload)))
    }

    fn build(&self, envelope: Result<Envelope, EnqueueError>) -> Enqueue {
        Enqueue {
            client: self.clone(),
            envelope,
            queue: "default".into(),
            max_depth: None,
        }
    }

    /// Publishes ready-made envelopes to logical queue `queue`, each to the physical queue of its
    /// priority, delayed ones through the delay scheduler. With the `otel` feature and an
    /// OpenTelemetry layer, inside a producer span whose `traceparent` the envelopes carry (those
    /// that have none yet).
    pub async fn publish(
        &self,
        queue: &str,
        #[allow(unused_mut)] mut envelopes: Vec<Envelope>,
    ) -> Result<(), EnqueueError> {
        #[cfg(feature = "otel")]
        if crate::otel::enabled() {
            use tracing::Instrument;
            let span = crate::otel::publish_span(
                self.inner.scheduler.broker().name(),
                queue,
                &mut envelopes,
            );
            return self.publish_now(queue, envelopes).instrument(span).await;
        }
        self.publish_now(queue, envelopes).await
    }

    async fn publish_now(&self, queue: &str, envelopes: Vec<Envelope>) -> Result<(), EnqueueError> {
        names::validate(queue).map_err(|reason| EnqueueError::InvalidQueue {
            queue: queue.to_string(),
            reason,
        })?;
        let mut by_level: BTreeMap<Priority, Vec<Envelope>> = BTreeMap::new();
        for e in envelopes {
            by_level.entry(e.priority).or_default().push(e);
        }
        let broker = self.inner.scheduler.broker();
        let max = broker.capabilities().max_batch.max(1);
        for (priority, batch) in &by_level {
            let physical = names::physical(queue, *priority);
            let Some(budget) = broker.queue_capabilities(&physical).max_headers else {
                continue;
            };
            for e in batch {
                let count = e
                    .headers
                    .keys()
                    .filter(|k| !k.starts_with("stevedore-"))
                    .count();
                if count > budget {
                    return Err(EnqueueError::TooManyHeaders {
                        queue: queue.to_string(),
                        count,
                        max: budget,
                        backend: broker.name(),
                    });
                }
            }
        }
        for (priority, batch) in by_level {
            let physical = names::physical(queue, priority);
            let mut batch = batch;
            while !batch.is_empty() {
                let rest = batch.split_off(batch.len().min(max));
                self.inner.scheduler.publish(&physical, batch).await?;
                batch = rest;
            }
        }
        Ok(())
    }

    /// Ready + delayed messages over every priority level of `queue`.
    pub async fn waiting(&self, queue: &str) -> Result<u64, BrokerError> {
        let mut n = 0;
        for p in Priority::ALL {
            let d = self
                .inner
                .scheduler
                .broker()
                .depth(&names::physical(queue, p))
                .await?;
            n += d.ready + d.delayed.unwrap_or(0);
        }
        Ok(n)
    }
}

/// One enqueue being built. Consumed by [`Enqueue::send`].
#[must_use = "nothing is enqueued until .send().await"]
#[derive(Debug)]
pub struct Enqueue {
    client: Client,
    envelope: Result<Envelope, EnqueueError>,
    queue: String,
    max_depth: Option<u64>,
}

impl Enqueue {
    fn map(mut self, f: impl FnOnce(&mut Envelope)) -> Self {
        if let Ok(e) = &mut self.envelope {
            f(e);
        }
        self
    }

    /// The logical queue (default `default`).
    pub fn queue(mut self, queue: &str) -> Self {
        self.queue = queue.to_string();
        self
    }

    /// Priority level (default normal).
    pub fn priority(self, priority: Priority) -> Self {
        self.map(|e| e.priority = priority)
    }

    /// Not to run before `delay` from now. A delay longer than [`MAX_DELAY`] makes
    /// [`Enqueue::send`] fail with [`EnqueueError::InvalidDelay`] (nothing is published).
    pub fn delay(self, delay: Duration) -> Self {
        match SystemTime::now().checked_add(delay) {
            Some(at) if delay <= MAX_DELAY => self.map(|e| e.not_before = Some(at)),
            _ => self.fail(EnqueueError::InvalidDelay { delay }),
        }
    }

    /// Not to run before `at`. A time more than [`MAX_DELAY`] ahead makes [`Enqueue::send`]
    /// fail with [`EnqueueError::InvalidDelay`].
    pub fn at(self, at: SystemTime) -> Self {
        match at.duration_since(SystemTime::now()) {
            Ok(ahead) if ahead > MAX_DELAY => {
                self.fail(EnqueueError::InvalidDelay { delay: ahead })
            }
            _ => self.map(|e| e.not_before = Some(at)),
        }
    }

    fn fail(mut self, error: EnqueueError) -> Self {
        if self.envelope.is_ok() {
            self.envelope = Err(error);
        }
        self
    }

    /// Ordering / partition key.
    pub fn key(self, key: &str) -> Self {
        self.map(|e| e.key = Some(key.to_string()))
    }

    /// A user header.
    pub fn header(self, key: &str, value: &str) -> Self {
        self.map(|e| {
            e.headers.insert(key.to_string(), value.to_string());
        })
    }

    /// Refuse with [`EnqueueError::QueueFull`] when the queue already holds `max` or more ready and
    /// delayed messages (backpressure; the check and the publish are not atomic, so concurrent
    /// producers may overshoot by a few). Overrides the queue's configured `max_depth`.
    pub fn max_depth(mut self, max: u64) -> Self {
        self.max_depth = Some(max);
        self
    }

    /// Publishes; returns the message id once the broker holds it.
    pub async fn send(self) -> Result<String, EnqueueError> {
        let envelope = self.envelope?;
        let limit = self
            .max_depth
            .or_else(|| self.client.inner.limits.get(&self.queue).copied());
        if let Some(max) = limit {
            let depth = self.client.waiting(&self.queue).await?;
            if depth >= max {
                return Err(EnqueueError::QueueFull {
                    queue: self.queue,
                    depth,
                    max,
                });
            }
        }
        let id = envelope.id.clone();
        self.client.publish(&self.queue, vec![envelope]).await?;
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stevedore_core::MemoryBroker;

    #[tokio::test]
    async fn configured_max_depth_rejects_and_loses_nothing_already_queued() {
        let cfg =
            crate::config::from_toml_str("[queues.q]\nmax_depth = 2\n", None).expect("config");
        let broker: Arc<dyn Broker> = Arc::new(MemoryBroker::new());
        let client = Client::new(broker.clone()).with_limits_from(&cfg);
        for _ in 0..2 {
            client
                .enqueue("j", &1)
                .queue("q")
                .send()
                .await
                .expect("under the limit");
        }
        let full = client.enqueue("j", &1).queue("q").send().await;
        assert!(
            matches!(
                full,
                Err(EnqueueError::QueueFull {
                    depth: 2,
                    max: 2,
                    ..
                })
            ),
            "{full:?}"
        );
        // A delayed message counts too; an explicit limit overrides the configured one.
        client
            .enqueue("j", &1)
            .queue("q")
            .max_depth(10)
            .delay(Duration::from_secs(60))
            .send()
            .await
            .expect("override");
        assert_eq!(client.waiting("q").await.expect("depth"), 3);
        // Other queues are unlimited.
        client
            .enqueue("j", &1)
            .queue("other")
            .send()
            .await
            .expect("no limit");
    }

    /// Memory queues, except that queue "strict" (a FIFO-like queue of a broker whose queues
    /// differ) takes no per-message delay, one header of the application's own, batches of 10.
    #[derive(Debug)]
    struct PerQueue {
        inner: MemoryBroker,
        strict: stevedore_core::Capabilities,
    }

    impl PerQueue {
        fn new() -> Self {
            let inner = MemoryBroker::new();
            let mut strict = inner.capabilities().clone();
            strict.delay = stevedore_core::DelaySupport::None;
            strict.max_headers = Some(1);
            strict.max_batch = 10;
            PerQueue { inner, strict }
        }
    }

    #[async_trait::async_trait]
    impl Broker for PerQueue {
        fn name(&self) -> &'static str {
            "per-queue"
        }
        fn capabilities(&self) -> &stevedore_core::Capabilities {
            self.inner.capabilities()
        }
        fn queue_capabilities(&self, queue: &str) -> &stevedore_core::Capabilities {
            if queue == "strict" {
                &self.strict
            } else {
                self.inner.capabilities()
            }
        }
        async fn publish(&self, q: &str, m: Vec<Envelope>) -> Result<(), BrokerError> {
            self.inner.publish(q, m).await
        }
        async fn receive(
            &self,
            q: &str,
            o: stevedore_core::ReceiveOptions,
        ) -> Result<Vec<stevedore_core::Delivery>, BrokerError> {
            self.inner.receive(q, o).await
        }
        async fn ack(&self, r: &[stevedore_core::Receipt]) -> Result<(), BrokerError> {
            self.inner.ack(r).await
        }
        async fn release(&self, r: &[stevedore_core::Receipt]) -> Result<(), BrokerError> {
            self.inner.release(r).await
        }
        async fn extend_lease(
            &self,
            r: &stevedore_core::Receipt,
            l: Duration,
        ) -> Result<(), BrokerError> {
            self.inner.extend_lease(r, l).await
        }
        async fn depth(&self, q: &str) -> Result<stevedore_core::Depth, BrokerError> {
            self.inner.depth(q).await
        }
    }

    #[tokio::test]
    async fn per_queue_capabilities_decide_delay_headers_and_validation() {
        let broker: Arc<dyn Broker> = Arc::new(PerQueue::new());
        let client = Client::new(broker.clone());
        // Header budget: two of the application's own headers are refused on "strict" before
        // anything is sent; Stevedore's own do not count; other queues take any number.
        let two = client
            .enqueue("j", &1)
            .queue("strict")
            .header("a", "1")
            .header("b", "2")
            .send()
            .await;
        assert!(
            matches!(
                two,
                Err(EnqueueError::TooManyHeaders {
                    count: 2,
                    max: 1,
                    ..
                })
            ),
            "{two:?}"
        );
        assert_eq!(broker.depth("strict").await.map(|d| d.ready).ok(), Some(0));
        client
            .enqueue("j", &1)
            .queue("strict")
            .header("a", "1")
            .header("stevedore-trace", "x")
            .send()
            .await
            .expect("one header of its own");
        client
            .enqueue("j", &1)
            .queue("loose")
            .header("a", "1")
            .header("b", "2")
            .send()
            .await
            .expect("no budget elsewhere");
        // Delay: native on "loose", none (and no delay store) on "strict".
        client
            .enqueue("j", &1)
            .queue("loose")
            .delay(Duration::from_secs(60))
            .send()
            .await
            .expect("native delay");
        let delayed = client
            .enqueue("j", &1)
            .queue("strict")
            .delay(Duration::from_secs(60))
            .send()
            .await;
        assert!(
            matches!(
                delayed,
                Err(EnqueueError::Broker(BrokerError::Unsupported { .. }))
            ),
            "{delayed:?}"
        );
        // Validation reads each queue's own limits: batch 16 is fine on "loose", not on "strict".
        let cfg = crate::config::from_toml_str(
            "[queues.loose]\nbatch = 16\n[queues.strict]\nbatch = 16\n",
            None,
        )
        .expect("config");
        let err = cfg
            .validate_on(broker.as_ref())
            .expect_err("strict takes 10");
        assert_eq!(err.key.as_deref(), Some("queues.strict.batch"), "{err}");
        assert!(cfg.validate(broker.capabilities()).is_ok());
    }
}
