//! The broker trait: the one seam between the runtime and a message broker.

use crate::capabilities::Capabilities;
use crate::envelope::Envelope;
use crate::error::BrokerError;
use async_trait::async_trait;
use std::any::Any;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Proof of one delivery, used to ack, release or extend it: the physical queue plus a token of
/// the backend's own type, so a backend settles without re-parsing anything (an AMQP channel id
/// and delivery tag; a Redis entry id and lease end; an SQS receipt handle; a Kafka partition,
/// offset and group generation). Opaque to the runtime, cheap to clone (the token is shared).
///
/// A backend reads its token back with [`Receipt::token`]; a receipt made by another backend
/// reads as `None`, which backends treat as a lease they do not hold
/// ([`BrokerError::LeaseLost`]).
#[derive(Clone)]
pub struct Receipt {
    queue: Arc<str>,
    token: Arc<dyn Any + Send + Sync>,
    shown: fn(&(dyn Any + Send + Sync), &mut fmt::Formatter<'_>) -> fmt::Result,
}

impl Receipt {
    /// Made by backends only: the delivery of `queue` identified by `token`.
    pub fn new<T: Any + Send + Sync + fmt::Debug>(queue: impl Into<Arc<str>>, token: T) -> Self {
        Receipt {
            queue: queue.into(),
            token: Arc::new(token),
            shown: |t, f| match t.downcast_ref::<T>() {
                Some(t) => fmt::Debug::fmt(t, f),
                None => f.write_str("?"),
            },
        }
    }

    /// The physical queue the message was received from.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// The backend's token, if this receipt holds a `T`.
    pub fn token<T: Any>(&self) -> Option<&T> {
        self.token.downcast_ref::<T>()
    }
}

impl fmt::Debug for Receipt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Receipt({}#", self.queue)?;
        (self.shown)(self.token.as_ref(), f)?;
        f.write_str(")")
    }
}

/// A received message and its lease.
#[derive(Clone, Debug)]
pub struct Delivery {
    /// The message.
    pub envelope: Envelope,
    /// Ack / release / extend handle.
    pub receipt: Receipt,
    /// How many times the broker has handed this copy out, this one included (1 on first
    /// delivery). Grows when a lease expires or a message is released.
    pub delivery_count: u32,
}

impl Delivery {
    /// The attempt this delivery represents: the envelope's attempt plus the broker redeliveries of
    /// this copy. A message that crashes its worker every time thus still reaches max attempts.
    pub fn attempt(&self) -> u32 {
        self.envelope
            .attempt
            .saturating_add(self.delivery_count.saturating_sub(1))
    }
}

/// Options of one [`Broker::receive`] call.
#[derive(Clone, Copy, Debug)]
pub struct ReceiveOptions {
    /// Most messages to return (the backend may return fewer; it caps at its `max_batch`).
    pub max: usize,
    /// How long to wait for the first message when the queue is empty (0 = do not wait).
    pub wait: Duration,
    /// Lease to take on each message (for [`crate::LeaseSupport::Timed`] backends).
    pub lease: Duration,
}

/// How many messages a physical queue holds, by state.
///
/// The default is an empty queue: all counts zero, `delayed` `Some(0)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Depth {
    /// Ready to be received now.
    pub ready: u64,
    /// Received and neither acked nor released (leased).
    pub in_flight: u64,
    /// Waiting for their `not_before` (native delay, or the backend's [`DelayStore`]); `None`
    /// where the backend cannot count them per queue (RabbitMQ keeps every queue's delayed
    /// messages in one shared set of delay queues). Never a guess: `Some(0)` means none wait.
    pub delayed: Option<u64>,
    /// Age of the oldest ready message, where the broker can tell.
    #[serde(with = "opt_secs")]
    pub oldest_age: Option<Duration>,
}

impl Default for Depth {
    fn default() -> Self {
        Depth {
            ready: 0,
            in_flight: 0,
            delayed: Some(0),
            oldest_age: None,
        }
    }
}

mod opt_secs {
    use std::time::Duration;
    pub(super) fn serialize<S: serde::Serializer>(
        d: &Option<Duration>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&d.as_secs_f64()),
            None => s.serialize_none(),
        }
    }
}

/// A message broker, as the runtime sees it. Dyn-compatible: the config picks the backend at run
/// time and everything else holds an `Arc<dyn Broker>`.
///
/// Every method is safe to call concurrently from many tasks (`Send + Sync`). Transient failures
/// ([`BrokerError::is_transient`]) are for the caller to retry; a backend reconnects on the next call
/// after its connection breaks and never stays in a permanent error state.
///
/// Delivery is at-least-once: a message is delivered again when its lease expires or it is released,
/// so handlers must tolerate duplicates.
#[async_trait]
pub trait Broker: Send + Sync + fmt::Debug + 'static {
    /// Short backend name for logs and tables (`memory`, `redis`, ...).
    fn name(&self) -> &'static str;

    /// What the backend does natively. Constant for the broker's life.
    fn capabilities(&self) -> &Capabilities;

    /// What the backend does on physical queue `queue`, where that differs between the queues of
    /// one broker (an SQS FIFO queue takes no per-message delay and keeps per-group order; a
    /// standard queue delays up to 15 minutes and keeps no order). The runtime asks it for each
    /// queue it validates, publishes to or delays on. Default: [`Broker::capabilities`] for
    /// every queue.
    fn queue_capabilities(&self, queue: &str) -> &Capabilities {
        let _ = queue;
        self.capabilities()
    }

    /// Declares the physical queues idempotently (creating them where the broker needs that). Safe to
    /// call repeatedly and from several processes at once. Backends that need nothing return `Ok`.
    async fn prepare(&self, queues: &[String]) -> Result<(), BrokerError> {
        let _ = queues;
        Ok(())
    }

    /// Says that this handle is about to receive from `queues` (the physical queues a worker
    /// polls: every priority level of its queues). A backend whose consumers must first join
    /// something (a Kafka consumer group) joins all of them here at once, so that a level the
    /// runtime polls later does not wait for its own join on its first receive, and may wait
    /// for the joins before returning. The runtime calls it once before its fetch loops start;
    /// producers never do (a producer's handle must not take a share of a queue's consumers).
    /// Idempotent. Default: nothing.
    async fn subscribe(&self, queues: &[String]) -> Result<(), BrokerError> {
        let _ = queues;
        Ok(())
    }

    /// Says that this handle will receive no more from `queues`: a worker calls it when its
    /// graceful shutdown begins, once its receive loops have stopped and while its last jobs
    /// still run. A backend whose broker pushes deliveries ahead of `receive` (AMQP's prefetch)
    /// stops those pushes here, so that the acks of the last jobs do not draw new deliveries
    /// that would only go back, counted, when the handle closes. What was pushed already stays
    /// with the handle for [`close`](Broker::close) to give back; acks, releases and lease
    /// extensions keep working, and a later `receive` may consume again. Idempotent; best
    /// effort (the runtime does not wait for it past its shutdown bound). Default: nothing.
    async fn unsubscribe(&self, queues: &[String]) -> Result<(), BrokerError> {
        let _ = queues;
        Ok(())
    }

    /// Publishes a batch to one physical queue. Returns only once the broker holds every message
    /// durably (per [`Capabilities::durable`]); on error, some of the batch may have been accepted
    /// (publish is at-least-once, never at-most-once). Payloads over [`Capabilities::max_payload`]
    /// fail the call with [`BrokerError::PayloadTooLarge`] before anything is sent. Messages whose
    /// `not_before` lies in the future are held back natively: a backend with a capped delay holds
    /// them for `min(remaining, cap)` (rounded *up* to its granularity, never early) and keeps the
    /// true `not_before` in the message, and the runtime re-publishes a copy that arrives early with
    /// the remaining delay ("hops"). Backends without native delay never see a future `not_before`:
    /// the runtime routes those to [`Broker::delay_store`].
    async fn publish(&self, queue: &str, messages: Vec<Envelope>) -> Result<(), BrokerError>;

    /// Receives up to `opts.max` ready messages from one physical queue, waiting up to `opts.wait`
    /// for the first. Each returned message is leased to this caller until acked, released, or the
    /// lease ends. An empty vector means nothing was ready in time: a backend returns empty only
    /// when the broker held no ready message this caller could be given (after `opts.wait`, or at
    /// once with a zero wait), never merely because a delivery the broker owes it is still on the
    /// wire. Strict priority relies on this: an empty receive marks a level empty. Cancel-safety:
    /// do not drop the future mid-way; a message received by a dropped call comes back after its
    /// lease.
    async fn receive(
        &self,
        queue: &str,
        opts: ReceiveOptions,
    ) -> Result<Vec<Delivery>, BrokerError>;

    /// Acknowledges deliveries: they are removed for good. Receipts may span queues. A receipt whose
    /// lease is gone yields [`BrokerError::LeaseLost`] (after the others are acked); acking is
    /// otherwise idempotent in effect.
    async fn ack(&self, receipts: &[Receipt]) -> Result<(), BrokerError>;

    /// Gives deliveries back unprocessed: each becomes ready again at once, for any consumer, with
    /// its delivery count incremented on the next delivery.
    async fn release(&self, receipts: &[Receipt]) -> Result<(), BrokerError>;

    /// Gives deliveries back like [`release`](Broker::release), except that this hand-out is not
    /// counted: the next delivery of each has the same [`Delivery::attempt`] as the one given
    /// back. The runtime uses it only for deliveries it gives back without a failure of their own
    /// (received during a graceful shutdown, or cut off at the drain deadline), so that deploys do
    /// not use up a job's attempts. A crash (a lease that runs out) still counts, which keeps
    /// crash loops bounded.
    ///
    /// The default is [`resend_uncounted`]: each envelope is published again to its queue with
    /// its attempt carried in the envelope, then the original is acked. The copy goes to the back
    /// of its queue, keeps its id, and a crash between the two steps leaves both (at-least-once).
    /// Backends that count deliveries themselves override it to undo the count in place, and
    /// backends whose order a re-publish would break (FIFO groups) may fall back to a counted
    /// [`release`](Broker::release). Fails like `release`; on error some deliveries may have
    /// been given back.
    async fn release_uncounted(&self, deliveries: Vec<Delivery>) -> Result<(), BrokerError> {
        resend_uncounted(self, deliveries).await
    }

    /// Extends a delivery's lease to `lease` from now. A no-op for [`crate::LeaseSupport::Session`]
    /// backends. Fails with [`BrokerError::LeaseLost`] if the lease already ended.
    async fn extend_lease(&self, receipt: &Receipt, lease: Duration) -> Result<(), BrokerError>;

    /// Reads up to `max` messages of one physical queue without taking them: no lease, no
    /// delivery counted, nothing moves or is reordered. Returns the ready messages in the order
    /// they would be delivered, then those leased to consumers; never the delayed ones. For
    /// operator tools (`dlq list`, `dlq inspect`) on queues that are not being consumed; a
    /// concurrent consumer may take or settle a listed message at any time.
    ///
    /// Backends that cannot read without receiving (AMQP 0-9-1 has no peek) keep the default,
    /// which fails with [`BrokerError::Unsupported`]; the tools then receive and release instead,
    /// which counts a delivery per message.
    async fn browse(&self, queue: &str, max: usize) -> Result<Vec<Envelope>, BrokerError> {
        let _ = (queue, max);
        Err(BrokerError::Unsupported {
            backend: self.name(),
            what: "reading a queue without receiving",
        })
    }

    /// Counts of one physical queue, stale by at most [`Capabilities::depth_staleness`]. `delayed`
    /// includes the backend's [`DelayStore`] for that queue.
    async fn depth(&self, queue: &str) -> Result<Depth, BrokerError>;

    /// The durable delay emulation of a backend without (unbounded) native delay, if it has one.
    fn delay_store(&self) -> Option<Arc<dyn DelayStore>> {
        None
    }

    /// Whether [`ack`](Broker::ack) only changes this handle's own bookkeeping (no broker round
    /// trip) and is made durable by a later write of the handle, such as the checkpoint written
    /// with the next hand-out (Kafka). The runtime then acks each job as it ends, before its slot
    /// is reused, instead of batching acks in the background: the next receive's write then
    /// carries the ack, and a worker that crashes on the next job does not count a delivery
    /// against a job that already succeeded. The default, `false`, suits brokers whose ack is a
    /// broker call worth batching.
    fn acks_locally(&self) -> bool {
        false
    }

    /// Flushes and closes connections. Later calls fail with [`BrokerError::Closed`]. Idempotent.
    async fn close(&self) -> Result<(), BrokerError> {
        Ok(())
    }
}

/// How long [`resend_uncounted`] makes sure each delivery stays leased while its copy is sent.
const HOLD_WHILE_RESENT: Duration = Duration::from_secs(30);

/// [`Broker::release_uncounted`]'s default: publishes each delivery's envelope again to its
/// physical queue (the receipt's) with `attempt` set to the delivery's
/// [`attempt`](Delivery::attempt), so that the copy's first delivery is the same attempt, then
/// acks the originals, queue by queue in the given order. A delivery whose `not_before` still
/// lies ahead (an early hop of a capped delay) is released plainly instead: publishing it again
/// is the runtime's work, not the broker's. A delivery whose lease is already gone
/// ([`Broker::extend_lease`] fails) is left alone: the broker has it back. Each copy carries
/// [`crate::wire::RESENT`], so a broker that deduplicates takes it. Nothing is lost on failure: a failed publish
/// releases the originals it covered (counted) and returns the error; a failed ack leaves both
/// copies, the original coming back after its lease.
pub async fn resend_uncounted<B: Broker + ?Sized>(
    broker: &B,
    deliveries: Vec<Delivery>,
) -> Result<(), BrokerError> {
    let now = SystemTime::now();
    let mut plain: Vec<Receipt> = Vec::new();
    let mut lost: Option<BrokerError> = None;
    // Queue → (copies, originals), in the order queues first appear.
    let mut by_queue: Vec<(Arc<str>, Vec<Envelope>, Vec<Receipt>)> = Vec::new();
    for d in deliveries {
        if d.envelope.not_before.is_some_and(|t| t > now) {
            plain.push(d.receipt);
            continue;
        }
        // Only a delivery still held is copied: one whose lease is gone is back with the broker
        // already, and a copy would run it twice. (A no-op check on session-leased brokers whose
        // channel still holds it; a short extension on timed ones.)
        if let Err(e) = broker.extend_lease(&d.receipt, HOLD_WHILE_RESENT).await {
            lost.get_or_insert(e);
            continue;
        }
        let attempt = d.attempt();
        let mut copy = d.envelope;
        copy.attempt = attempt;
        // A re-send of the same attempt: brokers that deduplicate must not drop it.
        crate::wire::mark_resent(&mut copy);
        let queue = d.receipt.queue.clone();
        match by_queue.iter_mut().find(|(q, _, _)| *q == queue) {
            Some((_, copies, originals)) => {
                copies.push(copy);
                originals.push(d.receipt);
            }
            None => by_queue.push((queue, vec![copy], vec![d.receipt])),
        }
    }
    let mut first_err = None;
    if !plain.is_empty() {
        if let Err(e) = broker.release(&plain).await {
            first_err = Some(e);
        }
    }
    for (queue, copies, originals) in by_queue {
        match broker.publish(&queue, copies).await {
            Ok(()) => {
                if let Err(e) = broker.ack(&originals).await {
                    first_err.get_or_insert(e);
                }
            }
            Err(e) => {
                let _ = broker.release(&originals).await;
                first_err.get_or_insert(e);
            }
        }
    }
    match first_err.or(lost) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Durable delay emulation on the broker itself, for brokers without native delay (Redis: a
/// sorted set per queue promoted by an atomic script; Kafka: tiered delay topics consumed with
/// paused partitions).
/// Messages never wait in worker memory.
///
/// Thread safety: all methods may run concurrently, from any number of workers; `promote_due` must
/// never move one message twice.
#[async_trait]
pub trait DelayStore: Send + Sync + fmt::Debug {
    /// Durably stores messages for `queue` (a physical queue) until their `not_before`.
    async fn schedule(&self, queue: &str, messages: Vec<Envelope>) -> Result<(), BrokerError>;

    /// Moves up to `limit` due messages (across queues) into their queues; returns how many moved.
    /// Self-promoting stores (TTL queues) return `Ok(0)`. Work per call is bounded by `limit`, never
    /// by how many are waiting.
    async fn promote_due(&self, now: SystemTime, limit: usize) -> Result<usize, BrokerError>;

    /// How many messages wait for `queue`.
    async fn delayed(&self, queue: &str) -> Result<u64, BrokerError>;

    /// When the next message is due, if the store can tell (lets the promoter sleep precisely).
    async fn next_due(&self) -> Result<Option<SystemTime>, BrokerError> {
        Ok(None)
    }
}
