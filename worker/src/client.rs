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

use crate::config::Unique;
use crate::delay::Scheduler;
use bytes::Bytes;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use stevedore_core::store::Store;
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
    /// A unique job ([`Enqueue::unique_for`], [`Enqueue::dedup_key`], `[jobs.<name>] unique`)
    /// but the client has no state store to keep the key in ([`Client::with_store`]).
    #[error("job {job:?} is unique, but this client has no state store to keep its key in (Client::with_store; [store] in the config)")]
    NoStore {
        /// The job name.
        job: String,
    },
    /// A delay longer than [`MAX_DELAY`] (a mistake, and past what timestamps on the wire hold).
    #[error("a delay of {} is longer than the longest allowed (100 years)", humantime::format_duration(*.delay))]
    InvalidDelay {
        /// The delay asked for.
        delay: Duration,
    },
    /// What was asked cannot be done this way (a unique job in a transaction: its key lives
    /// in the state store, outside the transaction).
    #[error("{0}")]
    Unsupported(String),
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
    /// Per job name: `[jobs.<name>] unique`.
    unique: BTreeMap<String, Unique>,
    /// Where unique jobs' keys and job status live.
    store: Option<Arc<dyn Store>>,
    /// Per logical queue that tracks status (`track_status`): how long a status is kept.
    status: BTreeMap<String, Duration>,
    /// The outbox table of [`Enqueue::within`] (`outbox.table`).
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    outbox_table: String,
}

/// The outbox table when `[outbox] table` is not set.
const DEFAULT_OUTBOX_TABLE: &str = "stevedore_outbox";

/// Header marking a job whose unique key is held until it finishes (`until_done`): the worker
/// releases the key when the job succeeds or is dead-lettered.
pub const UNIQUE_HEADER: &str = "stevedore-unique";

/// The state store key of a unique job's key `dedup` in logical queue `queue` (user keys longer
/// than 200 bytes are hashed).
pub(crate) fn unique_key(queue: &str, dedup: &str) -> String {
    if dedup.len() <= 200 {
        format!("unique:{queue}:{dedup}")
    } else {
        format!("unique:{queue}:#{}", hash_hex(&[dedup.as_bytes()]))
    }
}

/// A stable 128-bit hash of `parts` as 32 hex digits (FNV-1a twice, with different seeds; the
/// same on every build and platform, unlike std's hasher).
pub(crate) fn hash_hex(parts: &[&[u8]]) -> String {
    let (a, b) = hash128(parts);
    format!("{a:016x}{b:016x}")
}

/// See [`hash_hex`].
pub(crate) fn hash128(parts: &[&[u8]]) -> (u64, u64) {
    let fnv = |seed: u64| {
        let mut h = seed;
        for part in parts {
            for b in part.iter().copied().chain([0xff]) {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
        h
    };
    (fnv(0xcbf2_9ce4_8422_2325), fnv(0x8422_2325_cbf2_9ce4))
}

/// What [`Enqueue::send_or_existing`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Enqueued {
    /// The job's id: the new job's, or for a duplicate of a unique job, the first job's.
    pub id: String,
    /// `true` when nothing was published because a job with the same unique key holds it.
    pub duplicate: bool,
}

impl Client {
    /// A client publishing to `broker`.
    pub fn new(broker: Arc<dyn Broker>) -> Self {
        Client {
            inner: Arc::new(ClientInner {
                scheduler: Scheduler::new(broker),
                limits: BTreeMap::new(),
                unique: BTreeMap::new(),
                store: None,
                status: BTreeMap::new(),
                outbox_table: DEFAULT_OUTBOX_TABLE.to_string(),
            }),
        }
    }

    /// Applies the `max_depth` of every queue in `config` (backpressure): an enqueue to a queue at
    /// or over its limit fails with [`EnqueueError::QueueFull`] unless [`Enqueue::max_depth`] says
    /// otherwise for that call. Also takes `[jobs.<name>] unique` and the queues' `track_status`
    /// (with a store, [`Client::with_store`], an enqueue to such a queue records `queued` before
    /// it publishes).
    pub fn with_limits_from(mut self, config: &crate::config::Config) -> Self {
        let limits = config
            .effective_queues()
            .into_iter()
            .filter_map(|(name, q)| q.max_depth.map(|m| (name, m)))
            .collect();
        let unique = config
            .jobs
            .iter()
            .filter_map(|(name, j)| j.unique.map(|u| (name.clone(), u)))
            .collect();
        let status = config
            .effective_queues()
            .into_iter()
            .filter_map(|(name, q)| q.track_status.window().map(|keep| (name, keep)))
            .collect();
        self.inner = Arc::new(ClientInner {
            scheduler: self.inner.scheduler.clone(),
            limits,
            unique,
            store: self.inner.store.clone(),
            status,
            outbox_table: config
                .outbox
                .as_ref()
                .map_or_else(|| DEFAULT_OUTBOX_TABLE.to_string(), |o| o.table.clone()),
        });
        self
    }

    /// Keeps unique jobs' keys in `store` (the worker's client has the worker's store).
    pub fn with_store(mut self, store: Arc<dyn Store>) -> Self {
        self.inner = Arc::new(ClientInner {
            scheduler: self.inner.scheduler.clone(),
            limits: self.inner.limits.clone(),
            unique: self.inner.unique.clone(),
            store: Some(store),
            status: self.inner.status.clone(),
            outbox_table: self.inner.outbox_table.clone(),
        });
        self
    }

    /// The state store, if any.
    pub(crate) fn store(&self) -> Option<&Arc<dyn Store>> {
        self.inner.store.as_ref()
    }

    /// The status of job `id` ([`JobStatus`](crate::JobStatus)), `None` when none is recorded:
    /// its queue does not track status (`track_status`), the id is unknown, or its status
    /// expired. Needs a state store ([`Client::with_store`]); fails with the store's error when
    /// there is none or it does not answer. Read-only; safe to call from anywhere, as often as
    /// an API polls.
    pub async fn status(&self, id: &str) -> Result<Option<crate::JobStatus>, BrokerError> {
        let store = self.inner.store.as_ref().ok_or_else(|| {
            BrokerError::permanent(
                "job status needs a state store: this client has none (Client::with_store; [store] in the config)",
            )
        })?;
        match store.get(&crate::status::key(id)).await? {
            None => Ok(None),
            Some(bytes) => crate::JobStatus::decode(&bytes).map(Some).ok_or_else(|| {
                BrokerError::permanent(format!("the status of job {id} is not readable"))
            }),
        }
    }

    /// [`Client::publish`]: records each job's status first on a queue that tracks status
    /// (`queued` or `delayed`: first, so a fast worker's `running` is never overwritten by
    /// it). Only where no status is recorded yet: a copy published again (an outbox relay
    /// that crashed after publishing) must not turn a job that already ran back to `queued`.
    /// When the publish fails, the statuses this call wrote are removed again.
    pub(crate) async fn publish_recorded(
        &self,
        queue: &str,
        envelopes: Vec<Envelope>,
    ) -> Result<(), EnqueueError> {
        let tracked = self
            .inner
            .status
            .get(queue)
            .copied()
            .zip(self.inner.store.as_ref());
        let Some((keep, store)) = tracked else {
            return self.publish_traced(queue, envelopes).await;
        };
        let statuses: Vec<(String, Vec<u8>)> = envelopes
            .iter()
            .map(|e| {
                let status = crate::JobStatus::enqueued(
                    &e.id,
                    queue,
                    e.job.as_deref().unwrap_or("-"),
                    e.enqueued_at,
                    e.not_before,
                );
                (crate::status::key(&e.id), status.encode())
            })
            .collect();
        // A few at a time: a whole relay batch at once would queue on the store's pool and
        // starve the workers' own store calls; one by one, a hanging store would cost one
        // timeout per job.
        let mut written: Vec<&(String, Vec<u8>)> = Vec::new();
        for chunk in statuses.chunks(4) {
            let swaps = chunk.iter().map(|(key, bytes)| {
                crate::effects::timed(store.swap(key, None, Some(bytes), Some(keep)))
            });
            for (w, r) in chunk.iter().zip(futures::future::join_all(swaps).await) {
                match r {
                    Ok(true) => written.push(w),
                    Ok(false) => {}
                    Err(err) => {
                        tracing::warn!(error = %err, key = %w.0, "could not record the job's status");
                    }
                }
            }
        }
        let result = self.publish_traced(queue, envelopes).await;
        if result.is_err() {
            for chunk in written.chunks(4) {
                let undo = chunk.iter().map(|(key, bytes)| {
                    crate::effects::timed(store.swap(key, Some(bytes), None, None))
                });
                for (w, r) in chunk.iter().zip(futures::future::join_all(undo).await) {
                    if let Err(e) = r {
                        tracing::warn!(error = %e, key = %w.0, "enqueue failed and its status could not be removed: it lapses");
                    }
                }
            }
        }
        result
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
            unique: None,
        }
    }

    /// Publishes ready-made envelopes to logical queue `queue`, each to the physical queue of its
    /// priority, delayed ones through the delay scheduler. With the `otel` feature and an
    /// OpenTelemetry layer, inside a producer span whose `traceparent` the envelopes carry (those
    /// that have none yet). On a queue with `track_status` (this client built with
    /// [`Client::with_limits_from`] and [`Client::with_store`]), records `queued` (or
    /// `delayed`) first for each job that has no status yet.
    pub async fn publish(&self, queue: &str, envelopes: Vec<Envelope>) -> Result<(), EnqueueError> {
        self.publish_recorded(queue, envelopes).await
    }

    /// [`Client::publish`] without recording statuses.
    async fn publish_traced(
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

    /// What the broker would refuse of `envelopes` before anything is sent: an invalid queue
    /// name, more headers than the broker takes.
    fn check_sendable(&self, queue: &str, envelopes: &[Envelope]) -> Result<(), EnqueueError> {
        names::validate(queue).map_err(|reason| EnqueueError::InvalidQueue {
            queue: queue.to_string(),
            reason,
        })?;
        let broker = self.inner.scheduler.broker();
        for e in envelopes {
            let physical = names::physical(queue, e.priority);
            let Some(budget) = broker.queue_capabilities(&physical).max_headers else {
                continue;
            };
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
        Ok(())
    }

    async fn publish_now(&self, queue: &str, envelopes: Vec<Envelope>) -> Result<(), EnqueueError> {
        self.check_sendable(queue, &envelopes)?;
        let mut by_level: BTreeMap<Priority, Vec<Envelope>> = BTreeMap::new();
        for e in envelopes {
            by_level.entry(e.priority).or_default().push(e);
        }
        let max = self
            .inner
            .scheduler
            .broker()
            .capabilities()
            .max_batch
            .max(1);
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

/// Backpressure: [`EnqueueError::QueueFull`] when `queue` holds its `max_depth` (this call's,
/// else the configured one) or more.
async fn check_depth(
    client: &Client,
    queue: &str,
    max_depth: Option<u64>,
) -> Result<(), EnqueueError> {
    let limit = max_depth.or_else(|| client.inner.limits.get(queue).copied());
    if let Some(max) = limit {
        let depth = client.waiting(queue).await?;
        if depth >= max {
            return Err(EnqueueError::QueueFull {
                queue: queue.to_string(),
                depth,
                max,
            });
        }
    }
    Ok(())
}

/// One enqueue being built. Consumed by [`Enqueue::send`].
#[must_use = "nothing is enqueued until .send().await"]
#[derive(Debug)]
pub struct Enqueue {
    client: Client,
    envelope: Result<Envelope, EnqueueError>,
    queue: String,
    max_depth: Option<u64>,
    unique: Option<Unique>,
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

    /// A unique job: a second enqueue of the same key into the same queue within `window`
    /// publishes nothing and returns the first job's id (see [`Enqueue::send_or_existing`]).
    /// The key is [`Enqueue::dedup_key`] if given, else the job name and payload bytes. The
    /// window starts at the first enqueue and holds whatever becomes of the job. Needs a state
    /// store ([`Client::with_store`]); replaces `[jobs.<name>] unique` for this call.
    pub fn unique_for(mut self, window: Duration) -> Self {
        self.unique = Some(Unique::For(window.max(Duration::from_millis(1))));
        self
    }

    /// A unique job whose key holds until the job succeeds or is dead-lettered (a retry keeps
    /// it), and at most `max`: a second enqueue meanwhile publishes nothing and returns the
    /// first job's id. See [`Enqueue::unique_for`] for the key.
    pub fn unique_until_done(mut self, max: Duration) -> Self {
        self.unique = Some(Unique::UntilDone(max.max(Duration::from_millis(1))));
        self
    }

    /// The deduplication key (default: the job name and payload). Alone, it makes the job
    /// unique until done (at most 24 h); with [`Enqueue::unique_for`], for that window. On
    /// brokers that deduplicate natively (SQS FIFO queues, 5 minutes) it is also sent as theirs.
    pub fn dedup_key(self, key: &str) -> Self {
        self.map(|e| e.dedup_key = Some(key.to_string()))
    }

    /// Publishes; returns the message id once the broker holds it (for a duplicate of a unique
    /// job, the first job's id: [`Enqueue::send_or_existing`] tells them apart).
    pub async fn send(self) -> Result<String, EnqueueError> {
        Ok(self.send_or_existing().await?.id)
    }

    /// The envelope, checked for an enqueue inside a transaction: not unique (a unique job's
    /// key lives in the state store, outside the transaction), and sendable to the queue.
    #[cfg(any(feature = "postgres", feature = "sqlite"))]
    fn checked_for_a_transaction(&mut self) -> Result<Envelope, EnqueueError> {
        let envelope = std::mem::replace(
            &mut self.envelope,
            Err(EnqueueError::Unsupported("already taken".into())),
        )?;
        let job = envelope.job.clone().unwrap_or_default();
        if self.unique.is_some()
            || envelope.dedup_key.is_some()
            || self.client.inner.unique.contains_key(&job)
        {
            return Err(EnqueueError::Unsupported(format!(
                "job {job:?} is unique, and a unique job cannot be enqueued in a transaction: its key lives in the state store, outside the transaction; use send() after the commit"
            )));
        }
        self.client
            .check_sendable(&self.queue, std::slice::from_ref(&envelope))?;
        Ok(envelope)
    }

    /// Enqueues inside your PostgreSQL transaction (the transactional outbox, feature
    /// `postgres`): writes the job to the outbox table on `conn` (`&mut *tx` of your
    /// transaction) and returns its id. Nothing is published now: a relay (any worker with
    /// `[outbox]`, or `stevedore relay`) publishes it after your transaction commits, and it
    /// never exists if the transaction rolls back. See [`crate::outbox`].
    ///
    /// The same checks as [`Enqueue::send`] run first (payload, delay, queue name, headers,
    /// `max_depth` against the broker). A unique job is refused with
    /// [`EnqueueError::Unsupported`]: its key lives in the state store, outside your
    /// transaction. The job's status (`track_status`) is recorded when the relay publishes it.
    /// The payload is checked against the broker this client is on (the relay's should be the
    /// same kind). Database errors come back as [`EnqueueError::Broker`]; PostgreSQL then aborts your
    /// transaction, as for any failed statement.
    #[cfg(feature = "postgres")]
    pub async fn within(
        mut self,
        conn: &mut stevedore_postgres::sqlx::PgConnection,
    ) -> Result<String, EnqueueError> {
        let envelope = self.checked_for_a_transaction()?;
        let broker = self.client.inner.scheduler.broker();
        broker
            .capabilities()
            .check_payloads(std::slice::from_ref(&envelope), broker.name())?;
        check_depth(&self.client, &self.queue, self.max_depth).await?;
        let id = envelope.id.clone();
        stevedore_postgres::outbox::insert(
            conn,
            &self.client.inner.outbox_table,
            &self.queue,
            &[envelope],
        )
        .await?;
        Ok(id)
    }

    /// Enqueues inside your SQLite transaction, on the embedded SQLite broker (feature
    /// `sqlite`, the default): `conn` is your connection to the broker's file (`&tx` of your
    /// `rusqlite` transaction, `stevedore_sqlite::rusqlite` 0.43), and the job is a row of its
    /// job table, written in your transaction: it exists exactly when your other writes do, a
    /// rollback enqueues nothing, and no relay is needed (workers see it within 50 ms of the
    /// commit). Returns the job id.
    ///
    /// Synchronous, like rusqlite. The same checks as [`Enqueue::send`] run first (payload,
    /// delay, queue name, headers; `max_depth` counted in your transaction). Fails with
    /// [`EnqueueError::Unsupported`] for a unique job (its key lives in the state store,
    /// outside the transaction) or when this client's broker is not SQLite; with a permanent
    /// [`EnqueueError::Broker`] when `conn` is not on a Stevedore file. The job's status
    /// (`track_status`) is recorded once a worker takes it, not here: a state store write beside
    /// your open write transaction on the file would wait for it.
    #[cfg(feature = "sqlite")]
    pub fn within_sqlite(
        mut self,
        conn: &stevedore_sqlite::rusqlite::Connection,
    ) -> Result<String, EnqueueError> {
        let envelope = self.checked_for_a_transaction()?;
        let broker = self.client.inner.scheduler.broker().clone();
        if broker.name() != "sqlite" {
            return Err(EnqueueError::Unsupported(format!(
                "within_sqlite enqueues into the SQLite broker's file, and this client's broker is {}: use within(&mut tx) with [outbox] on PostgreSQL, or send()",
                broker.name()
            )));
        }
        let limit = self
            .max_depth
            .or_else(|| self.client.inner.limits.get(&self.queue).copied());
        if let Some(max) = limit {
            let physical: Vec<String> = Priority::ALL
                .iter()
                .map(|p| names::physical(&self.queue, *p))
                .collect();
            let depth = stevedore_sqlite::waiting_in(conn, &physical)?;
            if depth >= max {
                return Err(EnqueueError::QueueFull {
                    queue: self.queue,
                    depth,
                    max,
                });
            }
        }
        let id = envelope.id.clone();
        let physical = names::physical(&self.queue, envelope.priority);
        let max_payload = broker.capabilities().max_payload;
        stevedore_sqlite::publish_in(conn, &physical, &[envelope], max_payload)?;
        Ok(id)
    }

    /// As [`Enqueue::send`], saying whether a unique job was a duplicate (nothing published).
    ///
    /// A unique job's key is claimed in the state store first (one compare-and-swap: of many
    /// concurrent enqueues of one key, exactly one publishes), then the job is published; when
    /// the publish fails, the claim is taken back so a retry can enqueue.
    pub async fn send_or_existing(self) -> Result<Enqueued, EnqueueError> {
        let mut envelope = self.envelope?;
        check_depth(&self.client, &self.queue, self.max_depth).await?;
        let job = envelope.job.clone().unwrap_or_default();
        let unique = self
            .unique
            .or_else(|| self.client.inner.unique.get(&job).copied());
        let unique = match (unique, &envelope.dedup_key) {
            (Some(u), _) => Some(u),
            (None, Some(_)) => Some(Unique::UntilDone(crate::config::UNTIL_DONE_MAX)),
            (None, None) => None,
        };
        let id = envelope.id.clone();
        let Some(unique) = unique else {
            self.client
                .publish_recorded(&self.queue, vec![envelope])
                .await?;
            return Ok(Enqueued {
                id,
                duplicate: false,
            });
        };
        let store = self
            .client
            .inner
            .store
            .clone()
            .ok_or_else(|| EnqueueError::NoStore { job: job.clone() })?;
        let dedup = envelope
            .dedup_key
            .get_or_insert_with(|| hash_hex(&[job.as_bytes(), &envelope.payload]))
            .clone();
        if let Unique::UntilDone(_) = unique {
            envelope
                .headers
                .insert(UNIQUE_HEADER.to_string(), "until_done".to_string());
        }
        let key = unique_key(&self.queue, &dedup);
        // The holder's id, or ours once claimed. A key that is freed between our failed claim
        // and our read (it lapsed, or its job finished) is claimed again.
        for _ in 0..5 {
            let claimed = match store
                .swap(&key, None, Some(id.as_bytes()), Some(unique.ttl()))
                .await
            {
                Ok(claimed) => claimed,
                // The swap may have been applied: read back before deciding (a claim by our id
                // that we gave up on would block the key with no job behind it).
                Err(e) if e.is_transient() => match store.get(&key).await? {
                    Some(holder) if holder == id.as_bytes() => true,
                    _ => return Err(e.into()),
                },
                Err(e) => return Err(e.into()),
            };
            if claimed {
                if let Err(e) = self
                    .client
                    .publish_recorded(&self.queue, vec![envelope])
                    .await
                {
                    if let Err(undo) = store.swap(&key, Some(id.as_bytes()), None, None).await {
                        tracing::warn!(error = %undo, key, "enqueue failed and its unique key could not be taken back: it lapses after its window");
                    }
                    return Err(e);
                }
                return Ok(Enqueued {
                    id,
                    duplicate: false,
                });
            }
            if let Some(holder) = store.get(&key).await? {
                return Ok(Enqueued {
                    id: String::from_utf8_lossy(&holder).into_owned(),
                    duplicate: true,
                });
            }
        }
        Err(EnqueueError::Broker(BrokerError::transient(format!(
            "the unique key {key} kept changing hands; try again"
        ))))
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
        async fn release_uncounted(
            &self,
            d: Vec<stevedore_core::Delivery>,
        ) -> Result<(), BrokerError> {
            self.inner.release_uncounted(d).await
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

#[cfg(test)]
mod unique_tests {
    use super::*;
    use stevedore_core::store::MemoryStore;
    use stevedore_core::{MemoryBroker, ReceiveOptions};

    fn client(broker: &MemoryBroker, store: &MemoryStore) -> Client {
        Client::new(Arc::new(broker.clone())).with_store(Arc::new(store.clone()))
    }

    async fn drain(broker: &MemoryBroker, queue: &str) -> Vec<Envelope> {
        let opts = ReceiveOptions {
            max: 1000,
            wait: Duration::ZERO,
            lease: Duration::from_secs(30),
        };
        let got = broker.receive(queue, opts).await.expect("receive");
        got.into_iter().map(|d| d.envelope).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hundred_concurrent_enqueues_of_one_key_publish_one_job() {
        let broker = MemoryBroker::new();
        let store = MemoryStore::new();
        let mut tasks = Vec::new();
        for i in 0..100 {
            // Two producers (clients) sharing the store, as two services would.
            let c = client(&broker, &store);
            tasks.push(tokio::spawn(async move {
                c.enqueue("report", &serde_json::json!({"day": "2026-12-05"}))
                    .queue("q")
                    .unique_for(Duration::from_secs(60))
                    .header("n", &i.to_string())
                    .send_or_existing()
                    .await
                    .expect("enqueue")
            }));
        }
        let mut results = Vec::new();
        for t in tasks {
            results.push(t.await.expect("task"));
        }
        let jobs = drain(&broker, "q").await;
        assert_eq!(jobs.len(), 1, "one job published");
        assert!(
            results.iter().all(|r| r.id == jobs[0].id),
            "every caller got its id"
        );
        assert_eq!(results.iter().filter(|r| !r.duplicate).count(), 1);
        // Another payload is another key; another queue is another key space.
        let other = client(&broker, &store)
            .enqueue("report", &serde_json::json!({"day": "2026-12-06"}))
            .queue("q")
            .unique_for(Duration::from_secs(60))
            .send_or_existing()
            .await
            .expect("enqueue");
        assert!(!other.duplicate);
        let elsewhere = client(&broker, &store)
            .enqueue("report", &serde_json::json!({"day": "2026-12-05"}))
            .queue("q2")
            .unique_for(Duration::from_secs(60))
            .send_or_existing()
            .await
            .expect("enqueue");
        assert!(!elsewhere.duplicate);
    }

    #[tokio::test]
    async fn the_window_ends_and_a_failed_publish_takes_its_claim_back() {
        let broker = MemoryBroker::with_max_payload(64);
        let store = MemoryStore::new();
        let c = client(&broker, &store);
        let send = |payload: &'static str| {
            c.enqueue_bytes("j", payload)
                .queue("q")
                .dedup_key("k")
                .unique_for(Duration::from_millis(200))
                .send_or_existing()
        };
        // Too large: refused, and the key is not left claimed.
        let big = Box::leak("x".repeat(100).into_boxed_str());
        assert!(matches!(
            send(big).await,
            Err(EnqueueError::Broker(BrokerError::PayloadTooLarge { .. }))
        ));
        let first = send("a").await.expect("first");
        assert!(!first.duplicate);
        let again = send("b").await.expect("second");
        assert_eq!(
            (again.id.as_str(), again.duplicate),
            (first.id.as_str(), true)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
        let later = send("c").await.expect("after the window");
        assert!(!later.duplicate);
        assert_ne!(later.id, first.id);
        let jobs = drain(&broker, "q").await;
        assert_eq!(jobs.len(), 2);
        assert_eq!(jobs[0].dedup_key.as_deref(), Some("k"));
    }

    #[tokio::test]
    async fn a_unique_job_without_a_store_is_refused_before_anything_is_sent() {
        let broker = MemoryBroker::new();
        let c = Client::new(Arc::new(broker.clone()));
        let e = c
            .enqueue("j", &1)
            .unique_for(Duration::from_secs(1))
            .send()
            .await
            .expect_err("no store");
        assert!(matches!(e, EnqueueError::NoStore { .. }), "{e}");
        assert!(drain(&broker, "default").await.is_empty());
        // The config's `unique` applies without anything said at the call.
        let cfg = crate::config::from_toml_str("[jobs.j]\nunique = \"1h\"\n", None).expect("cfg");
        let c = Client::new(Arc::new(broker.clone()))
            .with_limits_from(&cfg)
            .with_store(Arc::new(MemoryStore::new()));
        let a = c.enqueue("j", &1).send_or_existing().await.expect("a");
        let b = c.enqueue("j", &1).send_or_existing().await.expect("b");
        assert_eq!((b.id, b.duplicate), (a.id, true));
        let other_job = c.enqueue("k", &1).send_or_existing().await.expect("k");
        assert!(
            !other_job.duplicate,
            "jobs without `unique` are not deduplicated"
        );
    }

    /// `within_sqlite`: the job row commits or rolls back with the caller's own writes; the
    /// checks of `send` hold in the transaction; what it cannot do it refuses.
    #[cfg(feature = "sqlite")]
    #[tokio::test]
    async fn within_sqlite_enqueues_exactly_when_the_transaction_commits() {
        use stevedore_sqlite::rusqlite;
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("jobs.db");
        let broker: Arc<dyn Broker> = Arc::new(
            stevedore_sqlite::SqliteBroker::open(stevedore_sqlite::SqliteConfig::new(&path))
                .await
                .expect("open"),
        );
        broker.prepare(&["orders".into()]).await.expect("prepare");
        let cfg = crate::config::from_toml_str(
            "[queues.orders]\nmax_depth = 2\n[jobs.once]\nunique = \"1m\"\n",
            None,
        )
        .expect("config");
        let client = Client::new(broker.clone()).with_limits_from(&cfg);
        let mut conn = rusqlite::Connection::open(&path).expect("connect");
        conn.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY)", [])
            .expect("user table");
        // Rolled back: neither the order nor the job.
        let tx = conn.transaction().expect("begin");
        tx.execute("INSERT INTO orders (id) VALUES (1)", [])
            .expect("insert");
        client
            .enqueue("receipt", &1)
            .queue("orders")
            .within_sqlite(&tx)
            .expect("within");
        tx.rollback().expect("rollback");
        assert_eq!(broker.depth("orders").await.expect("depth").ready, 0);
        // Committed: both, and the job is an ordinary one.
        let tx = conn.transaction().expect("begin");
        tx.execute("INSERT INTO orders (id) VALUES (2)", [])
            .expect("insert");
        let id = client
            .enqueue("receipt", &2)
            .queue("orders")
            .within_sqlite(&tx)
            .expect("within");
        let second = client
            .enqueue("receipt", &3)
            .queue("orders")
            .within_sqlite(&tx)
            .expect("within");
        // max_depth counts this transaction's own rows.
        let full = client
            .enqueue("receipt", &4)
            .queue("orders")
            .within_sqlite(&tx);
        assert!(
            matches!(full, Err(EnqueueError::QueueFull { depth: 2, .. })),
            "{full:?}"
        );
        let unique = client
            .enqueue("once", &5)
            .queue("orders")
            .within_sqlite(&tx);
        assert!(
            matches!(unique, Err(EnqueueError::Unsupported(_))),
            "{unique:?}"
        );
        tx.commit().expect("commit");
        let got = broker
            .receive(
                "orders",
                stevedore_core::ReceiveOptions {
                    max: 10,
                    wait: Duration::from_millis(200),
                    lease: Duration::from_secs(30),
                },
            )
            .await
            .expect("receive");
        let ids: Vec<&str> = got.iter().map(|d| d.envelope.id.as_str()).collect();
        assert_eq!(ids, vec![id.as_str(), second.as_str()]);
        assert_eq!(got[0].envelope.job.as_deref(), Some("receipt"));
        assert_eq!(&got[0].envelope.payload[..], b"2");
        // Another broker: refused, nothing written.
        let memory = Client::new(Arc::new(MemoryBroker::new()));
        let tx = conn.transaction().expect("begin");
        let other = memory
            .enqueue("receipt", &6)
            .queue("orders")
            .within_sqlite(&tx);
        assert!(
            matches!(other, Err(EnqueueError::Unsupported(_))),
            "{other:?}"
        );
    }

    /// A copy published again (an outbox relay that crashed after publishing) does not turn
    /// a finished job's status back to `queued`.
    #[tokio::test]
    async fn publishing_a_copy_again_keeps_the_status_it_finds() {
        use stevedore_core::store::MemoryStore;
        let store = Arc::new(MemoryStore::new());
        let cfg = crate::config::from_toml_str("[queues.q]\ntrack_status = true\n", None)
            .expect("config");
        let client = Client::new(Arc::new(MemoryBroker::new()))
            .with_limits_from(&cfg)
            .with_store(store.clone());
        let env = Envelope::new("j", "1");
        let id = env.id.clone();
        client
            .publish_recorded("q", vec![env.clone()])
            .await
            .expect("publish");
        let mut s = client.status(&id).await.expect("status").expect("queued");
        assert_eq!(s.state, crate::JobState::Queued);
        s.state = crate::JobState::Succeeded;
        crate::status::write(store.as_ref(), &s, Duration::from_secs(60)).await;
        client
            .publish_recorded("q", vec![env])
            .await
            .expect("publish again");
        assert_eq!(
            client.status(&id).await.expect("status").map(|s| s.state),
            Some(crate::JobState::Succeeded)
        );
    }
}
