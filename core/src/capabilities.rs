//! What a backend does natively, as data. The runtime reads it to decide what to emulate (and says so
//! at start-up); config validation reads it to refuse settings a backend cannot honour; the
//! conformance suite holds each backend to what it claims.

use std::fmt;
use std::time::Duration;

/// How a backend delays delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DelaySupport {
    /// No native delay: the backend must supply a [`crate::DelayStore`] (durable emulation on the same
    /// broker), or delays and retry backoff are refused at start-up.
    None,
    /// `publish` honours [`crate::Envelope::not_before`] natively up to `max` ahead (`None` = any
    /// length). Longer delays are sent in hops by the runtime: each hop re-publishes the message with
    /// the remaining delay when it arrives early.
    Native {
        /// The longest delay the broker holds in one go.
        max: Option<Duration>,
    },
}

/// How a delivery's lease works.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseSupport {
    /// A time-limited lease chosen per receive (SQS visibility timeout, Redis claim idle time, the
    /// in-memory broker). It expires on its own, and [`crate::Broker::extend_lease`] renews it up to
    /// `max` in total (`None` = unbounded).
    Timed {
        /// Longest total lease the broker allows.
        max: Option<Duration>,
    },
    /// The lease lasts as long as the consumer's session (AMQP channel, Kafka group membership);
    /// extending is a no-op, and a broken session returns the message. `max` is the broker's hard
    /// limit on holding one message (RabbitMQ's consumer_timeout), if any.
    Session {
        /// Longest time one message may stay unacknowledged before the broker drops the session.
        max: Option<Duration>,
    },
}

/// Ordering a backend guarantees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OrderingSupport {
    /// No ordering promise between any two messages.
    None,
    /// Messages with the same [`crate::Envelope::key`] are delivered in publish order, and the next
    /// one is not handed out while an earlier one of the same key is in flight.
    ///
    /// What this covers, on every backend that declares it: first deliveries, and a message that
    /// comes back by [`crate::Broker::release`] or an ended lease, which is handed out again before
    /// the later messages of its key. What it does not cover: a **retry**. The runtime retries by
    /// publishing a copy with a later `not_before` and acking the original, so the next message of
    /// the same key may run before the retried one (and a dead-lettered message no longer holds
    /// its key back at all). Handlers that need strict per-key order across failures must not rely
    /// on retries for it (return `JobError::permanent` and replay from the DLQ, or keep the order
    /// in the handler's own state).
    PerKey,
}

/// A backend's declared abilities.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// Native delay, and its cap.
    pub delay: DelaySupport,
    /// How leases work.
    pub lease: LeaseSupport,
    /// Ordering guarantee.
    pub ordering: OrderingSupport,
    /// Largest body accepted by `publish`, in bytes; larger ones fail at publish with
    /// [`crate::BrokerError::PayloadTooLarge`].
    pub max_payload: usize,
    /// Most messages one `publish`, `receive`, `ack` or `release` call handles (larger calls are
    /// split by the backend itself).
    pub max_batch: usize,
    /// Whether accepted messages survive a broker restart.
    pub durable: bool,
    /// How late a due delayed message may be delivered, at most, when consumers are idle.
    pub delay_tolerance: Duration,
    /// How stale [`crate::Broker::depth`] may be.
    pub depth_staleness: Duration,
    /// Most headers of the application's own ([`crate::Envelope::headers`] whose names do not
    /// start with `stevedore-`) one message may carry; `None`: bounded only by
    /// [`Capabilities::max_payload`]. Stevedore's own metadata never counts against it (a backend
    /// with a budget packs it itself: SQS allows 10 message attributes per message). The client
    /// refuses an enqueue over the budget before anything is sent.
    pub max_headers: Option<usize>,
    /// Whether another process that opens the same settings sees the same queues (a server, or a
    /// store file several processes may open at once). False for the in-process memory broker:
    /// `stats` or `dlq` run from a second process would see an empty broker of its own, and the
    /// CLI says so.
    pub shared: bool,
    /// Whether [`crate::Delivery::delivery_count`] counts redeliveries of one copy (a lease that
    /// ended, a release, a consumer that died). Where false (Kafka commits offsets and counts
    /// nothing per message, unless the backend keeps a count of its own as ours does) it is always
    /// 1, so a job that kills its worker process is redelivered without its attempt growing; the
    /// worker says so at start-up.
    pub counts_deliveries: bool,
    /// Whether [`crate::Broker::release_uncounted`] keeps a delivery's attempt. False where a
    /// backend must fall back to a counted release (SQS FIFO queues: a copy sent to the back of
    /// a message group would break the group's order), so a job given back at a shutdown uses an
    /// attempt there; the worker says so at start-up.
    pub uncounted_release: bool,
    /// How the consumers of one queue share its messages.
    pub sharing: Sharing,
}

/// How the consumers of one queue share its messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sharing {
    /// Any consumer may receive any ready message, a released or lease-expired one included.
    Any,
    /// Messages are divided by partition, each partition owned by one consumer at a time (a
    /// Kafka consumer group). A consumer receives only from the partitions it owns; a released
    /// message comes back to its partition's owner; a consumer that leaves (or dies) hands its
    /// partitions, with what it held, to the others within `handoff`; and a consumer joining
    /// takes partitions (and what is held on them) from the others. Consumers beyond the
    /// partition count receive nothing.
    Partitioned {
        /// Longest a departed consumer's partitions take to reach the remaining ones.
        handoff: Duration,
        /// Partitions of each queue (level) this backend creates: no more consumers than this
        /// get work on it at once, so autoscaling hints stop there.
        partitions: u32,
    },
}

impl Capabilities {
    /// [`crate::BrokerError::PayloadTooLarge`] for the first of `messages` over
    /// [`Capabilities::max_payload`], before anything is sent: the check every backend's
    /// `publish` starts with.
    pub fn check_payloads(
        &self,
        messages: &[crate::Envelope],
        backend: &'static str,
    ) -> Result<(), crate::BrokerError> {
        match messages.iter().find(|m| m.payload.len() > self.max_payload) {
            Some(big) => Err(crate::BrokerError::PayloadTooLarge {
                size: big.payload.len(),
                max: self.max_payload,
                backend,
            }),
            None => Ok(()),
        }
    }
}

impl fmt::Display for Capabilities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let delay = match self.delay {
            DelaySupport::None => "emulated".to_string(),
            DelaySupport::Native { max: None } => "native".to_string(),
            DelaySupport::Native { max: Some(m) } => {
                format!("native up to {}s, hops beyond", m.as_secs())
            }
        };
        let lease = match self.lease {
            LeaseSupport::Timed { .. } => "timed",
            LeaseSupport::Session { .. } => "session",
        };
        let order = match self.ordering {
            OrderingSupport::None => "none",
            OrderingSupport::PerKey => "per key",
        };
        let sharing = match self.sharing {
            Sharing::Any => "any consumer".to_string(),
            Sharing::Partitioned { handoff, .. } => {
                format!("by partition (handoff {}s)", handoff.as_secs())
            }
        };
        write!(
            f,
            "delay={delay}, lease={lease}, ordering={order}, sharing={sharing}, max_payload={}B, \
             durable={}, shared={}",
            self.max_payload, self.durable, self.shared
        )
    }
}
