//! The message model: what travels through every broker.

use bytes::Bytes;
use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Priority level of a job. Each level of a logical queue is a separate physical queue
/// (see [`crate::names::physical`]), so priority never depends on a broker feature.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    /// Served first.
    High,
    /// The default level; the physical queue carries the logical queue's own name, so plain
    /// producers that know nothing of priorities write here.
    #[default]
    Normal,
    /// Served last, but never starved forever (see the runtime's aging).
    Low,
}

impl Priority {
    /// Every level, highest first.
    pub const ALL: [Priority; 3] = [Priority::High, Priority::Normal, Priority::Low];

    /// The lowercase name used in config, headers and queue names.
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }

    /// Parses `high`, `normal` or `low` (case-insensitive).
    pub fn parse(s: &str) -> Option<Priority> {
        match s.to_ascii_lowercase().as_str() {
            "high" => Some(Priority::High),
            "normal" | "default" => Some(Priority::Normal),
            "low" => Some(Priority::Low),
            _ => None,
        }
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One job message, as published and as delivered.
///
/// On the wire the payload is the message body and every other field travels in the broker's
/// native headers or attributes (see [`crate::wire`]), so plain clients of the broker can read and
/// write our messages.
#[derive(Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Unique, time-sortable id (UUIDv7 unless the producer set one).
    pub id: String,
    /// Job name the router dispatches on; `None` for foreign messages, which go to the queue's
    /// default handler.
    pub job: Option<String>,
    /// The body, untouched by Stevedore.
    pub payload: Bytes,
    /// MIME type of the payload, `application/json` for jobs enqueued with a typed value.
    pub content_type: Option<String>,
    /// User headers. Keys starting with `stevedore-` are reserved, and so are `content-type`
    /// and `traceparent`: on the wire they are [`content_type`](Envelope::content_type) and
    /// [`trace_parent`](Envelope::trace_parent) (so a foreign producer's trace context is
    /// picked up), and a header of either name is read back as that field. RabbitMQ refuses
    /// the headers it sets itself (`x-delivery-count`, `x-death`, ...) at publish.
    pub headers: BTreeMap<String, String>,
    /// Which attempt this is, starting at 1. The runtime republishes a retry with `attempt + 1`.
    pub attempt: u32,
    /// When the job was first enqueued (kept across retries).
    pub enqueued_at: SystemTime,
    /// Not to be processed before this time (delays and retry backoff).
    pub not_before: Option<SystemTime>,
    /// Priority level; decides the physical queue.
    pub priority: Priority,
    /// Ordering / partition key: brokers that declare per-key ordering keep messages with the same
    /// key in order.
    pub key: Option<String>,
    /// Deduplication key, for brokers that deduplicate on publish.
    pub dedup_key: Option<String>,
    /// W3C `traceparent` of the producer's span, if any.
    pub trace_parent: Option<String>,
}

impl fmt::Debug for Envelope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The payload may hold personal data: show its size, not its bytes.
        f.debug_struct("Envelope")
            .field("id", &self.id)
            .field("job", &self.job)
            .field("payload_len", &self.payload.len())
            .field("content_type", &self.content_type)
            .field("headers", &self.headers)
            .field("attempt", &self.attempt)
            .field("enqueued_at", &self.enqueued_at)
            .field("not_before", &self.not_before)
            .field("priority", &self.priority)
            .field("key", &self.key)
            .finish()
    }
}

impl Envelope {
    /// A new envelope for `job` with a fresh UUIDv7 id, attempt 1, enqueued now.
    pub fn new(job: impl Into<String>, payload: impl Into<Bytes>) -> Self {
        Envelope {
            job: Some(job.into()),
            ..Envelope::foreign(new_id(), payload)
        }
    }

    /// An envelope with no job name, as a plain client of the broker would write it.
    pub fn foreign(id: impl Into<String>, payload: impl Into<Bytes>) -> Self {
        Envelope {
            id: id.into(),
            job: None,
            payload: payload.into(),
            content_type: None,
            headers: BTreeMap::new(),
            attempt: 1,
            enqueued_at: SystemTime::now(),
            not_before: None,
            priority: Priority::Normal,
            key: None,
            dedup_key: None,
            trace_parent: None,
        }
    }

    /// Builder: JSON content type.
    pub fn json(mut self) -> Self {
        self.content_type = Some("application/json".into());
        self
    }

    /// Builder: delay delivery by `delay` from now.
    pub fn delayed(mut self, delay: Duration) -> Self {
        self.not_before = Some(SystemTime::now() + delay);
        self
    }

    /// Builder: set the priority.
    pub fn with_priority(mut self, priority: Priority) -> Self {
        self.priority = priority;
        self
    }

    /// Builder: add a user header.
    pub fn with_header(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(key.into(), value.into());
        self
    }

    /// How long until `not_before`, or `None` if the message is due now.
    pub fn delay_remaining(&self, now: SystemTime) -> Option<Duration> {
        self.not_before
            .and_then(|t| t.duration_since(now).ok())
            .filter(|d| !d.is_zero())
    }
}

/// A fresh time-sortable message id (UUIDv7).
pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Milliseconds since the Unix epoch, as carried in headers.
pub fn to_millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The inverse of [`to_millis`].
pub fn from_millis(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}
