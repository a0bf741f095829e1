//! # stevedore-rabbitmq
//!
//! RabbitMQ (AMQP 0-9-1) backend, on [lapin](https://docs.rs/lapin) with the tokio runtime and
//! rustls (ring) for `amqps://`. No plugin is needed.
//!
//! ## Topology
//!
//! Each physical queue is a durable **quorum queue** named `key_prefix + queue`, declared
//! idempotently by [`Broker::prepare`] and lazily on first use, published to through the default
//! exchange. So `rabbitmqadmin publish routing_key=emails payload='{...}'` (or any AMQP client
//! publishing to queue `emails`) reaches queue `emails` with `key_prefix = ""`. Delays live in
//! ONE shared set of TTL queues per key prefix, whatever the number of queues (see the [`delay`]
//! module): 32 level queues `stevedore.delay.00` … `stevedore.delay.31`, their exchanges, a
//! deliver exchange every work queue is bound to, and `stevedore.delay.unroutable`. A logical
//! queue with levels high, normal and low and its dead letters is therefore 4 broker queues.
//!
//! | broker method | AMQP |
//! |---|---|
//! | `publish` | `basic.publish` (persistent, mandatory) on a confirm-mode channel; returns once every message is confirmed |
//! | `receive` | deliveries of a `basic.consume` consumer (one channel per queue) buffered in the process; see *Prefetch*. Returns empty only when the broker reports no ready message in the queue (or this consumer has no credit left): a push the broker owes is waited for |
//! | `ack` | `basic.ack`, with `multiple` where every unsettled tag up to the last one is being acked |
//! | `release` | cancels this handle's consumer of the queue, then `basic.nack` with requeue |
//! | `extend_lease` | no-op (the lease is the channel) that still reports a lost lease |
//! | `depth` | ready = the queue's message count (from an idempotent `queue.declare`, which unlike a passive one cannot close the channel with a 404) + this process's buffer; in flight = handed out by this process; delayed = `None`: waiting messages sit in the shared delay queues, which cannot be counted per queue ([`RabbitBroker::delayed_total`] counts them all) |
//! | delay | native, by the broker alone: `publish` sends a message with a future `not_before` through the shared TTL levels (binary decomposition of the delay), which hand it to its queue when due; no promoter |
//!
//! ## Messages
//!
//! The body is the payload, untouched; messages are persistent (`delivery_mode` 2). The envelope's
//! fields travel where AMQP has properties for them: `message_id` = id, `type` = job,
//! `timestamp` = enqueue time (seconds), `content_type`, with `app_id = "stevedore"` marking the
//! layout. Everything else is a long-string header named as in [`stevedore_core::wire`], and only
//! when it says something: the attempt above 1, the enqueue time in milliseconds when the id (a
//! UUIDv7 made at enqueue) does not carry it, an id or job name longer than a short string, the
//! other fields and the user's headers. A plain job has no header table at all (5 headers cost
//! the broker ~20% of its throughput in a raw lapin loop). Messages in the earlier layout (every
//! field a `stevedore-*` header) still decode, and so does a plain client's message that names its
//! job with a `stevedore-job` header. Any other message from a plain AMQP client is received as a
//! foreign message: job `None` (its `type` is its own business), body as sent, id = its
//! `message_id`, or a hash of body and properties that is the same on every redelivery.
//!
//! ## Delivery counting: why quorum queues
//!
//! The runtime needs [`Delivery::delivery_count`] to grow with every redelivery (release, crash,
//! channel loss), or a message that kills its worker would be retried forever. Measured on
//! RabbitMQ 3.10.8: a quorum queue sets `x-delivery-count` on every return (1 after the first
//! `basic.nack`/`basic.reject` with requeue, 2 after the next, and it also counts a channel closing
//! with the message unacked), while a classic queue only sets the `redelivered` flag, which cannot
//! tell a second redelivery from a tenth. Quorum queues also keep the rest of the contract: a
//! nacked message is ready again at once (returned messages are served first), a closed channel or
//! connection returns every message it held, and they are durable (replicated, persisted) across a
//! broker restart. So `delivery_count = x-delivery-count + 1`. A queue that already exists as a
//! classic queue (created by someone else) is used as it is, with a warning: there a redelivered
//! message counts 2, whatever its history. (Release-by-republish with a counter header was the
//! alternative; it would put released messages at the back of the queue and still could not count
//! crashes.)
//!
//! ## Prefetch, and why the consumer follows demand
//!
//! AMQP pushes messages to a consumer up to its prefetch before anyone asks for them, and the
//! broker counts each push as a delivery. Two things follow. A message pushed to a process that
//! then crashes comes back with its delivery count raised although no handler ever saw it; and a
//! consumer with spare credit takes back the very messages its own handle just released, so another
//! worker never sees them. So this backend sizes the consumer's credit by demand instead of
//! holding a fixed prefetch from the start: the first `receive(max)` consumes with a per-consumer
//! prefetch of `max`; when a later receive finds the buffer short and the consumer's credit used
//! up by deliveries still in flight, the consumer is replaced by one with credit
//! `in flight + h × max`, where the headroom `h` doubles with each such replacement up to 4
//! batches (acks on a quorum queue free credit only once its Raft log settles them), and never
//! above the queue's configured prefetch ([`RabbitConfig::prefetch`], default
//! [`RabbitConfig::default_prefetch`]). A worker thus holds what it runs plus one batch (plus up
//! to four while it drains a backlog), never more than the prefetch (which the worker sets to the
//! queue's concurrency: a worker cannot run more of a queue's jobs at once than its prefetch). `release` cancels the consumer before
//! nacking, so released messages go to whoever asks next; the next receive consumes again.
//! Messages buffered but not yet handed out count as `ready` in this process's `depth` (other
//! processes cannot see them).
//!
//! ## Leases, consumer_timeout, reconnects
//!
//! A delivery is leased for as long as its channel lives ([`LeaseSupport::Session`]). RabbitMQ
//! closes a channel that holds one delivery longer than its `consumer_timeout` (30 min by default
//! since 3.8.15) with `PRECONDITION_FAILED`; the backend then logs an error saying to raise
//! `consumer_timeout` in rabbitmq.conf for longer jobs, counts it
//! ([`RabbitBroker::consumer_timeouts`]), and reports the channel's loss to the next `receive` as a
//! transient [`BrokerError::Connection`]. Declare the server's value in
//! [`RabbitConfig::consumer_timeout`]: it becomes the lease's `max`, so config validation warns
//! about queue timeouts above it.
//!
//! When the connection or a channel breaks, it is marked dead; the next call reconnects (or
//! re-opens the channel), declares the prepared queues again and consumes again, and a call that
//! cannot returns [`BrokerError::Connection`] (transient), so the runtime backs off and retries.
//! Receipts from a channel that died are [`BrokerError::LeaseLost`]: the broker already requeued
//! those messages.
//!
//! Credentials never appear in logs, errors or `Debug` output: the URL is shown as
//! `amqp://user:***@host:port/vhost`.

mod amqp;
mod consumer;
pub mod delay;
mod factory;
mod link;

pub use delay::{max_delay, LEVELS};
pub use factory::RabbitFactory;

use async_trait::async_trait;
use consumer::{send_settle, spawn_pump, Active, Chan, Counters, QueueState, Raw, Settle};
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicQosOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use link::{call, short, Bind, ExchangeKind, Link, QueueKind, Route};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};
use stevedore_core::{
    Broker, BrokerError, Capabilities, DelaySupport, Delivery, Depth, Envelope, LeaseSupport,
    OrderingSupport, Receipt, ReceiveOptions,
};
use tokio::time::Instant;

/// Default largest payload: 16 MiB (RabbitMQ's own default `max_message_size` is 128 MiB).
pub const DEFAULT_MAX_PAYLOAD: usize = 16 * 1024 * 1024;
/// RabbitMQ's default `consumer_timeout` (since 3.8.15): 30 minutes.
pub const DEFAULT_CONSUMER_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// Default most unsettled deliveries one consumer holds (the worker sets each queue's prefetch to
/// its concurrency instead).
pub const DEFAULT_PREFETCH: u16 = 64;
/// Most messages one call handles.
pub const MAX_BATCH: usize = 1000;
/// How long a receive that just started consuming waits for the first push, even with `wait = 0`.
const START_GRACE: Duration = Duration::from_millis(25);
/// How long a receive that found the buffer empty but the queue not waits for the broker's push
/// before it asks the broker again whether the queue still holds ready messages.
const PUSH_GRACE: Duration = Duration::from_millis(50);
/// Longest a receive keeps waiting for a push the broker owes it (ready messages in the queue and
/// credit left on our consumer) past its own `wait`. Reached only when the broker serves other
/// consumers first (consumer priorities, single-active-consumer set by someone else); the receive
/// then returns empty with a warning instead of hanging.
const OWED_MAX: Duration = Duration::from_secs(5);

/// Connection and queue settings.
#[derive(Clone)]
pub struct RabbitConfig {
    /// `amqp://user:password@host:port/vhost` (vhost `/` is written `%2f`), or `amqps://` for TLS
    /// (server certificates are checked against the system roots and the Mozilla roots).
    ///
    /// A cluster: the URLs of several of its nodes, separated by commas. The backend connects to
    /// the first that answers, and when that connection is lost it tries the others, starting
    /// with the one after it, so a stopped node is tried last. Work queues are quorum queues,
    /// replicated across the cluster, so they survive the loss of a minority of nodes.
    pub url: String,
    /// Prepended to every queue name the backend declares (work, delay and dead-letter queues).
    /// Default: empty, so the AMQP queue is named exactly like the physical queue.
    pub key_prefix: String,
    /// Most unsettled deliveries a consumer of a physical queue may hold (see the crate docs on
    /// prefetch), by physical queue name; others use [`RabbitConfig::default_prefetch`].
    pub prefetch: HashMap<String, u16>,
    /// Prefetch of queues not in [`RabbitConfig::prefetch`] (at least 1).
    pub default_prefetch: u16,
    /// The server's `consumer_timeout` (rabbitmq.conf; default 30 min): the longest a delivery may
    /// stay unacked before RabbitMQ closes its channel. Not sent to the server; it is the lease's
    /// declared maximum, so config validation can warn about longer job timeouts.
    pub consumer_timeout: Duration,
    /// Largest payload accepted at publish.
    pub max_payload: usize,
    /// `x-expires` for every queue declared, so unused queues are deleted by the broker after this
    /// long without consumers or declares. For tests and throw-away setups only (`None`, the
    /// default, in production: an expired delay tier would take its waiting messages with it).
    pub queue_expires: Option<Duration>,
    /// Connection name shown in the management UI; default `stevedore <host>-<pid>`.
    pub connection_name: Option<String>,
    /// PEM file of CA certificates to trust for `amqps://` besides the system and Mozilla roots
    /// (a private CA).
    pub tls_ca_file: Option<std::path::PathBuf>,
    /// How many of the shared delay levels a delay may use (1 to [`LEVELS`], default [`LEVELS`]):
    /// the broker holds a message for at most 2^levels − 1 ms, and the runtime re-publishes a
    /// longer-delayed message when it arrives early. Lower it only to test hops; processes with
    /// different values share the same topology safely.
    pub delay_levels: u32,
}

impl RabbitConfig {
    /// Settings for `url`, defaults for the rest.
    pub fn new(url: impl Into<String>) -> Self {
        RabbitConfig {
            url: url.into(),
            key_prefix: String::new(),
            prefetch: HashMap::new(),
            default_prefetch: DEFAULT_PREFETCH,
            consumer_timeout: DEFAULT_CONSUMER_TIMEOUT,
            max_payload: DEFAULT_MAX_PAYLOAD,
            queue_expires: None,
            connection_name: None,
            tls_ca_file: None,
            delay_levels: LEVELS,
        }
    }

    /// The prefetch of physical queue `queue`.
    pub fn prefetch_for(&self, queue: &str) -> u16 {
        self.prefetch
            .get(queue)
            .copied()
            .unwrap_or(self.default_prefetch)
            .max(1)
    }
}

impl fmt::Debug for RabbitConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitConfig")
            .field("url", &redact(&self.url))
            .field("key_prefix", &self.key_prefix)
            .field("prefetch", &self.prefetch)
            .field("default_prefetch", &self.default_prefetch)
            .field("consumer_timeout", &self.consumer_timeout)
            .field("max_payload", &self.max_payload)
            .field("queue_expires", &self.queue_expires)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("delay_levels", &self.delay_levels)
            .finish()
    }
}

/// The URL with its password replaced by `***` (each URL of a comma-separated list).
pub fn redact(url: &str) -> String {
    nodes(url)
        .into_iter()
        .map(redact_one)
        .collect::<Vec<_>>()
        .join(",")
}

/// The nodes of a `url` setting: split at each comma an `amqp://` or `amqps://` URL follows
/// (so a comma in a password stays in its URL), blanks trimmed.
pub fn nodes(url: &str) -> Vec<&str> {
    stevedore_core::factory::url_list(url, &["amqp://", "amqps://"])
}

fn redact_one(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_string();
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    match authority.rfind('@') {
        Some(at) => {
            let userinfo = &authority[..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme_end], &rest[at..])
        }
        None => url.to_string(),
    }
}

/// What the RabbitMQ backend declares: native delay up to [`max_delay`]`(delay_levels)` (the shared
/// TTL levels; the runtime hops beyond), session leases bounded by the server's
/// `consumer_timeout`, no ordering across competing consumers, durable, exact ready and in-flight
/// counts. A due delayed message is handed to its queue by the broker itself, a few milliseconds
/// per level it passed; `delay_tolerance` bounds that with room for a loaded machine.
pub fn capabilities(
    max_payload: usize,
    consumer_timeout: Duration,
    delay_levels: u32,
) -> Capabilities {
    Capabilities {
        delay: DelaySupport::Native {
            max: Some(max_delay(delay_levels)),
        },
        lease: LeaseSupport::Session {
            max: Some(consumer_timeout),
        },
        ordering: OrderingSupport::None,
        max_payload,
        max_batch: MAX_BATCH,
        durable: true,
        delay_tolerance: Duration::from_millis(250),
        depth_staleness: Duration::ZERO,
        shared: true,
        counts_deliveries: true,
        uncounted_release: true,
        sharing: stevedore_core::Sharing::Any,
        max_headers: None,
    }
}

/// A RabbitMQ receipt's token: which consumer channel (this broker's own numbering, so a
/// delivery of a channel that has since been replaced is recognised as lost) and the AMQP
/// delivery tag on it.
#[derive(Debug)]
struct Token {
    channel: u64,
    tag: u64,
}

/// RabbitMQ broker. Cheap to clone (clones share the connection and consumers); thread safe.
/// Dropping the last clone closes the connection, which returns every unacked message.
#[derive(Clone)]
pub struct RabbitBroker {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: RabbitConfig,
    url_redacted: String,
    /// The node URLs of `cfg.url`, and which one the current connection is to.
    nodes: Vec<String>,
    node: std::sync::atomic::AtomicUsize,
    connection_name: String,
    tls_ca_pem: Option<String>,
    caps: Capabilities,
    link: Mutex<Option<Arc<Link>>>,
    connecting: tokio::sync::Mutex<()>,
    link_gens: AtomicU64,
    chan_ids: AtomicU64,
    queues: Mutex<HashMap<String, Arc<QueueState>>>,
    prepared: Mutex<BTreeSet<String>>,
    delay_setup: tokio::sync::Mutex<()>,
    counters: Arc<Counters>,
    closed: AtomicBool,
}

impl fmt::Debug for RabbitBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitBroker")
            .field("url", &self.inner.url_redacted)
            .field("key_prefix", &self.inner.cfg.key_prefix)
            .field("connection", &self.inner.connection_name)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Most batches of credit a draining consumer gets. A consumer starts with one batch beyond what
/// its handle holds; each time a receive finds it starved (buffer short, credit all used by
/// deliveries not yet settled) its headroom doubles, up to this. A quorum queue settles acks
/// through its Raft log, so the broker frees credit well after an ack leaves: with one batch of
/// headroom a draining consumer spent much of its time waiting on that (the backend alone drained
/// ~80k/s with one batch, ~100k/s with four, ~105k/s with the whole prefetch, beside a raw lapin
/// loop's ~135k/s with a prefetch of 500). A handle that takes what it needs and stops (and
/// whose neighbours want the rest) keeps one batch.
const HEADROOM_MAX: usize = 4;

/// The consumer credit for a handle holding `in_flight` deliveries that asks for `want` more
/// with `headroom` batches: `in_flight + headroom × want`, at least 1 and at most `prefetch`.
fn credit(prefetch: u16, in_flight: usize, want: usize, headroom: usize) -> u16 {
    u16::try_from(
        in_flight
            .saturating_add(want.saturating_mul(headroom))
            .clamp(1, usize::from(prefetch.max(1))),
    )
    .unwrap_or(u16::MAX)
}

/// Whether the consumer of `qs` can be pushed nothing more only because its credit is held by
/// deliveries this handle handed out and has not settled yet (its buffer is empty).
fn credit_held_by_handed_out(qs: &QueueState) -> bool {
    qs.slot().as_ref().is_some_and(|c| {
        c.failed.is_none()
            && c.buffer.is_empty()
            && !c.outstanding.is_empty()
            && c.active
                .as_ref()
                .is_some_and(|a| c.active_unsettled() >= usize::from(a.credit))
    })
}

/// What `ensure_consumer` has to do.
enum Plan {
    Nothing,
    Open,
    Consume(u16),
    Upgrade(String, u16),
}

impl RabbitBroker {
    /// Connects (checking the server answers and accepts the login).
    pub async fn connect(config: RabbitConfig) -> Result<Self, BrokerError> {
        if config.url.starts_with("amqps://") {
            // Ignored when a provider is already installed (by us or by the application).
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let url_redacted = redact(&config.url);
        let connection_name = config.connection_name.clone().unwrap_or_else(|| {
            let host = hostname();
            format!("stevedore {host}-{}", std::process::id())
        });
        if !(1..=LEVELS).contains(&config.delay_levels) {
            return Err(BrokerError::permanent(format!(
                "delay_levels = {}: must be 1 to {LEVELS}",
                config.delay_levels
            )));
        }
        let caps = capabilities(
            config.max_payload,
            config.consumer_timeout,
            config.delay_levels,
        );
        let tls_ca_pem = match &config.tls_ca_file {
            Some(path) => Some(std::fs::read_to_string(path).map_err(|e| {
                BrokerError::permanent(format!("cannot read tls_ca_file {}: {e}", path.display()))
            })?),
            None => None,
        };
        let node_urls: Vec<String> = nodes(&config.url).into_iter().map(String::from).collect();
        if node_urls.is_empty() {
            return Err(BrokerError::permanent(
                "rabbitmq url names no node (give one amqp:// URL, or several separated by commas)",
            ));
        }
        let broker = RabbitBroker {
            inner: Arc::new(Inner {
                cfg: config,
                url_redacted,
                nodes: node_urls,
                node: std::sync::atomic::AtomicUsize::new(0),
                connection_name,
                tls_ca_pem,
                caps,
                link: Mutex::new(None),
                connecting: tokio::sync::Mutex::new(()),
                link_gens: AtomicU64::new(0),
                chan_ids: AtomicU64::new(0),
                queues: Mutex::new(HashMap::new()),
                prepared: Mutex::new(BTreeSet::new()),
                delay_setup: tokio::sync::Mutex::new(()),
                counters: Arc::new(Counters::default()),
                closed: AtomicBool::new(false),
            }),
        };
        broker.link().await?;
        Ok(broker)
    }

    /// The AMQP name of physical queue `queue` (prefix included), or why it cannot be one.
    pub fn queue_name(&self, queue: &str) -> Result<String, BrokerError> {
        self.amqp_name(queue)
    }

    /// How many times the broker closed a consumer channel of this handle because a delivery
    /// outlived the server's `consumer_timeout`.
    pub fn consumer_timeouts(&self) -> u64 {
        self.inner
            .counters
            .consumer_timeouts
            .load(Ordering::Relaxed)
    }

    /// Which connection this handle is on (1 for the first; grows with every reconnect).
    pub fn connection_generation(&self) -> u64 {
        lock(&self.inner.link).as_ref().map_or(0, |l| l.gen)
    }

    pub(crate) fn amqp_name(&self, queue: &str) -> Result<String, BrokerError> {
        let invalid = |reason: &str| BrokerError::InvalidQueue {
            queue: queue.to_string(),
            reason: reason.to_string(),
        };
        if queue.is_empty() {
            return Err(invalid("empty name"));
        }
        let name = format!("{}{queue}", self.inner.cfg.key_prefix);
        if name.starts_with("amq.") {
            return Err(invalid(
                "names starting with \"amq.\" are reserved by RabbitMQ",
            ));
        }
        if name.len() > 255 {
            return Err(invalid(
                "prefix + name must be at most 255 bytes (AMQP's limit)",
            ));
        }
        Ok(name)
    }

    pub(crate) fn expires(&self) -> Option<Duration> {
        self.inner.cfg.queue_expires
    }

    pub(crate) fn check_payloads(&self, messages: &[Envelope]) -> Result<(), BrokerError> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(BrokerError::Closed);
        }
        self.inner.caps.check_payloads(messages, "rabbitmq")
    }

    fn current_link(&self) -> Option<Arc<Link>> {
        lock(&self.inner.link).clone()
    }

    /// The live connection, reconnecting first if it broke (and declaring the prepared queues on
    /// the new one).
    pub(crate) async fn link(&self) -> Result<Arc<Link>, BrokerError> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(BrokerError::Closed);
        }
        if let Some(l) = self.current_link().filter(|l| l.alive()) {
            return Ok(l);
        }
        let _connecting = self.inner.connecting.lock().await;
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(BrokerError::Closed);
        }
        let old = self.current_link();
        if let Some(l) = old.as_ref().filter(|l| l.alive()) {
            return Ok(l.clone());
        }
        if old.is_some() {
            tracing::warn!(url = %self.inner.url_redacted, "connection to RabbitMQ lost; reconnecting");
        }
        let gen = self.inner.link_gens.fetch_add(1, Ordering::Relaxed) + 1;
        let (link, node) = self.open_any(old.is_some(), gen).await?;
        let link = Arc::new(link);
        *lock(&self.inner.link) = Some(link.clone());
        if let Some(old) = old {
            tracing::info!(node = %node, generation = gen, "reconnected to RabbitMQ");
            // Consumer channels may still hold the old connection open: close it for good.
            tokio::spawn(async move {
                let _ = tokio::time::timeout(
                    Duration::from_secs(5),
                    old.conn.close(200, "replaced".into()),
                )
                .await;
            });
        }
        let prepared: Vec<String> = lock(&self.inner.prepared).iter().cloned().collect();
        for q in prepared {
            self.ensure_work(&link, &self.amqp_name(&q)?).await?;
        }
        Ok(link)
    }

    /// Opens a connection to the first node that answers, trying each once: from the one in use
    /// (the first time) or from the one after it (after a loss, which the node in use likely
    /// caused). Returns the link and the node's redacted URL; on failure, the first refusal by a
    /// node that answered (a login or vhost error, permanent), else the last node's error,
    /// naming every node that failed.
    async fn open_any(&self, after_loss: bool, gen: u64) -> Result<(Link, String), BrokerError> {
        let n = self.inner.nodes.len();
        let start = self.inner.node.load(Ordering::Relaxed) + usize::from(after_loss && n > 1);
        let mut failed = Vec::new();
        let mut last = None;
        let mut refused = None;
        for i in 0..n {
            let idx = (start + i) % n;
            let url = &self.inner.nodes[idx];
            let redacted = redact_one(url);
            match Link::open(
                url,
                &redacted,
                &self.inner.connection_name,
                self.inner.tls_ca_pem.as_deref(),
                gen,
            )
            .await
            {
                Ok(link) => {
                    self.inner.node.store(idx, Ordering::Relaxed);
                    if !failed.is_empty() {
                        tracing::warn!(node = %redacted, failed = ?failed, "connected to another RabbitMQ node");
                    }
                    return Ok((link, redacted));
                }
                Err(e) if !e.is_transient() => {
                    failed.push(redacted);
                    refused.get_or_insert(e);
                }
                Err(e) => {
                    failed.push(redacted);
                    last = Some(e);
                }
            }
        }
        // A node that answered and refused (the login, the vhost) says more than one that did
        // not answer.
        let e = refused
            .or(last)
            .unwrap_or_else(|| BrokerError::permanent("rabbitmq url names no node"));
        Err(match e {
            BrokerError::Connection(m) if n > 1 => BrokerError::Connection(format!(
                "{m} (and no other node answered: {})",
                failed.join(", ")
            )),
            e => e,
        })
    }

    fn queue_state(&self, queue: &str) -> Result<Arc<QueueState>, BrokerError> {
        let amqp = self.amqp_name(queue)?;
        let mut m = lock(&self.inner.queues);
        Ok(m.entry(queue.to_string())
            .or_insert_with(|| {
                Arc::new(QueueState::new(
                    amqp,
                    self.inner.cfg.prefetch_for(queue),
                    self.inner.counters.clone(),
                    self.inner.cfg.consumer_timeout,
                ))
            })
            .clone())
    }

    fn existing_queue_state(&self, queue: &str) -> Option<Arc<QueueState>> {
        lock(&self.inner.queues).get(queue).cloned()
    }

    /// Makes sure `qs` has a live channel and a consumer with enough credit for `want` more
    /// deliveries. Returns whether it started a consumer. The caller holds `qs.setup`.
    async fn ensure_consumer(
        &self,
        qs: &Arc<QueueState>,
        want: usize,
    ) -> Result<bool, BrokerError> {
        let link = self.link().await?;
        let plan = {
            let mut slot = qs.slot();
            match slot.as_mut() {
                Some(c) if c.failed.is_some() && !c.reported => {
                    c.reported = true;
                    let why = c.failed.clone().unwrap_or_default();
                    return Err(BrokerError::Connection(why));
                }
                Some(c)
                    if c.failed.is_none()
                        && c.link_gen == link.gen
                        && c.channel.status().connected() =>
                {
                    let in_flight = c.outstanding.len();
                    match &c.active {
                        None => {
                            c.headroom = 1;
                            Plan::Consume(credit(qs.prefetch, in_flight, want, 1))
                        }
                        Some(a) => {
                            let blocked = c.buffer.len() < want
                                && c.active_unsettled() >= usize::from(a.credit);
                            let headroom = (c.headroom * 2).min(HEADROOM_MAX);
                            let next = credit(qs.prefetch, in_flight, want, headroom);
                            if blocked && next > a.credit {
                                c.headroom = headroom;
                                Plan::Upgrade(a.tag.clone(), next)
                            } else {
                                Plan::Nothing
                            }
                        }
                    }
                }
                _ => Plan::Open,
            }
        };
        match plan {
            Plan::Nothing => Ok(false),
            Plan::Open => {
                self.ensure_work(&link, &qs.amqp).await?;
                let ch = call(
                    format!("open a consumer channel for {}", qs.amqp),
                    link.conn.create_channel(),
                )
                .await
                .map_err(|e| link.note(e))?;
                let id = self.inner.chan_ids.fetch_add(1, Ordering::Relaxed) + 1;
                let old = qs.slot().replace(Chan::new(id, link.gen, ch));
                // Closing the old channel (if any) returns what it held to the queue.
                drop(old);
                qs.notify.notify_waiters();
                self.start_consumer(&link, qs, credit(qs.prefetch, 0, want, 1))
                    .await?;
                Ok(true)
            }
            Plan::Consume(n) => {
                self.start_consumer(&link, qs, n).await?;
                Ok(true)
            }
            Plan::Upgrade(tag, n) => {
                let ch = {
                    let mut slot = qs.slot();
                    let Some(c) = slot.as_mut() else {
                        return Ok(false);
                    };
                    c.active = None;
                    c.channel.clone()
                };
                call(
                    "basic.cancel",
                    ch.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()),
                )
                .await
                .map_err(|e| self.chan_failed(qs, e))?;
                self.start_consumer(&link, qs, n).await?;
                Ok(true)
            }
        }
    }

    /// Marks the current channel of `qs` as dead when `e` broke it; returns `e`.
    fn chan_failed(&self, qs: &QueueState, e: BrokerError) -> BrokerError {
        let mut slot = qs.slot();
        if let Some(c) = slot.as_mut() {
            if !c.channel.status().connected() {
                c.failed.get_or_insert_with(|| e.to_string());
                c.reported = true;
                c.buffer.clear();
            }
        }
        e
    }

    /// Sets the consumer's credit and starts consuming on the queue's current channel.
    async fn start_consumer(
        &self,
        link: &Link,
        qs: &Arc<QueueState>,
        credit: u16,
    ) -> Result<(), BrokerError> {
        let (ch, id, no) = {
            let mut slot = qs.slot();
            let Some(c) = slot.as_mut() else {
                return Err(BrokerError::Connection("consumer channel went away".into()));
            };
            c.consumers += 1;
            (c.channel.clone(), c.id, c.consumers)
        };
        call(
            "basic.qos",
            ch.basic_qos(credit, BasicQosOptions { global: false }),
        )
        .await
        .map_err(|e| self.chan_failed(qs, e))?;
        let tag = format!("stevedore-{id}-{no}");
        let consumer = match call(
            format!("basic.consume on {}", qs.amqp),
            ch.basic_consume(
                short(&qs.amqp)?,
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            ),
        )
        .await
        {
            Ok(c) => c,
            Err(e) => {
                if matches!(&e, BrokerError::Other { message, .. } if message.contains("NOT-FOUND"))
                {
                    // Deleted under us: declared again on the next call.
                    link.forget(&qs.amqp);
                    return Err(self.chan_failed(qs, BrokerError::transient(e.to_string())));
                }
                return Err(self.chan_failed(qs, e));
            }
        };
        let pump = spawn_pump(qs, id, no, consumer);
        let mut slot = qs.slot();
        match slot.as_mut().filter(|c| c.id == id) {
            Some(c) => {
                c.active = Some(Active { no, tag, credit });
                c.pumps.push(pump);
                c.last_change = Some(std::time::Instant::now());
                Ok(())
            }
            None => {
                pump.abort();
                Err(BrokerError::Connection(
                    "consumer channel replaced while consuming".into(),
                ))
            }
        }
    }

    /// Cancels the consumer of `qs`, if any, so nothing more is pushed to this handle. The caller
    /// holds `qs.setup`.
    async fn cancel_consumer(&self, qs: &QueueState) {
        let cancel = {
            let mut slot = qs.slot();
            slot.as_mut()
                .and_then(|c| c.active.take().map(|a| (c.channel.clone(), a.tag)))
        };
        if let Some((ch, tag)) = cancel {
            if let Err(e) = call(
                "basic.cancel",
                ch.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()),
            )
            .await
            {
                self.chan_failed(qs, e);
            }
        }
    }

    /// Whether the broker may still push to this handle's consumer of `qs`: it has credit left,
    /// and either this handle settled deliveries or started consuming moments ago (the broker's
    /// replacement pushes may be on the wire) or the queue holds ready messages (one declare round
    /// trip).
    async fn may_push(&self, qs: &QueueState) -> Result<bool, BrokerError> {
        let (has_credit, recent) = match qs.slot().as_ref() {
            Some(c) if c.failed.is_none() => (
                c.active
                    .as_ref()
                    .is_some_and(|a| c.active_unsettled() < usize::from(a.credit)),
                c.last_change.is_some_and(|t| t.elapsed() < PUSH_GRACE),
            ),
            _ => (false, false),
        };
        if !has_credit {
            return Ok(false);
        }
        if recent {
            return Ok(true);
        }
        let link = self.link().await?;
        let ready = link
            .declare(&qs.amqp, QueueKind::Work, self.expires())
            .await?;
        Ok(ready > 0)
    }

    /// Gives back, uncounted, the deliveries the broker pushed to this handle that no `receive`
    /// took. Closing their channel would return them counted (a quorum queue counts every
    /// return), so a worker that stops gracefully would charge an attempt to up to a few batches
    /// of jobs it never ran. Best effort ([`Broker::close`] bounds it at 5 s): what is not handed
    /// back returns counted when the channel closes.
    async fn return_buffered(&self) {
        let states: Vec<(String, Arc<QueueState>)> = lock(&self.inner.queues)
            .iter()
            .map(|(name, qs)| (name.clone(), qs.clone()))
            .collect();
        for (_, qs) in &states {
            let _setup = qs.setup.lock().await;
            self.cancel_consumer(qs).await;
        }
        // Deliveries the broker pushed before its cancel-ok reach the buffer through the pump
        // tasks a moment later: take what is there, then once more after a pause.
        let mut deliveries = Vec::new();
        for round in 0..2 {
            if round > 0 {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            for (queue, qs) in &states {
                let receipt_queue: Arc<str> = Arc::from(queue.as_str());
                let mut slot = qs.slot();
                if let Some(c) = slot.as_mut().filter(|c| c.failed.is_none()) {
                    let id = c.id;
                    while let Some((tag, raw)) = c.buffer.pop_first() {
                        c.outstanding.insert(tag, raw.consumer);
                        deliveries.push(Self::to_delivery(&receipt_queue, id, tag, raw));
                    }
                }
            }
        }
        if deliveries.is_empty() {
            return;
        }
        let n = deliveries.len();
        match stevedore_core::resend_uncounted(self, deliveries).await {
            Ok(()) => tracing::debug!(n, "buffered deliveries handed back uncounted at close"),
            Err(e) => {
                tracing::warn!(n, error = %e, "could not hand back buffered deliveries uncounted at close; the broker returns them with their delivery counted")
            }
        }
    }

    fn to_delivery(queue: &Arc<str>, chan_id: u64, tag: u64, raw: Raw) -> Delivery {
        let d = amqp::decode(&raw.props, raw.data, raw.redelivered);
        Delivery {
            envelope: d.envelope,
            receipt: Receipt::new(
                queue.clone(),
                Token {
                    channel: chan_id,
                    tag,
                },
            ),
            delivery_count: d.delivery_count,
        }
    }

    /// Acks or requeues receipts, queue by queue.
    async fn settle(&self, receipts: &[Receipt], how: Settle) -> Result<(), BrokerError> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(BrokerError::Closed);
        }
        let mut by_queue: BTreeMap<&str, Vec<&Receipt>> = BTreeMap::new();
        for r in receipts {
            by_queue.entry(r.queue()).or_default().push(r);
        }
        let mut lost: Option<String> = None;
        for (queue, rs) in by_queue {
            let Some(qs) = self.existing_queue_state(queue) else {
                lost = Some(queue.to_string());
                continue;
            };
            let _setup = match how {
                Settle::Requeue => {
                    let g = qs.setup.lock().await;
                    // Stop pushes to this handle first, so the released messages go to whoever
                    // asks next rather than straight back into our own buffer.
                    self.cancel_consumer(&qs).await;
                    Some(g)
                }
                Settle::Ack => None,
            };
            let _wire = qs.wire.lock().await;
            let planned = {
                let mut slot = qs.slot();
                match slot.as_mut().filter(|c| c.failed.is_none()) {
                    None => None,
                    Some(c) => {
                        let mut tags = Vec::with_capacity(rs.len());
                        for r in &rs {
                            match r.token::<Token>() {
                                Some(t) if t.channel == c.id && c.settle(t.tag) => tags.push(t.tag),
                                _ => lost = Some(queue.to_string()),
                            }
                        }
                        let frames = c.plan(&mut tags);
                        c.last_change = Some(std::time::Instant::now());
                        Some((c.channel.clone(), c.id, frames))
                    }
                }
            };
            let Some((channel, id, frames)) = planned else {
                lost = Some(queue.to_string());
                continue;
            };
            if !send_settle(&channel, how, &frames).await {
                // The channel is gone: the broker requeues what it held.
                let mut slot = qs.slot();
                if let Some(c) = slot.as_mut().filter(|c| c.id == id) {
                    c.failed
                        .get_or_insert_with(|| format!("consumer channel of {} closed", qs.amqp));
                    c.buffer.clear();
                }
                lost = Some(queue.to_string());
            }
        }
        match lost {
            Some(queue) => Err(BrokerError::LeaseLost { queue }),
            None => Ok(()),
        }
    }
}

impl RabbitBroker {
    /// Declares work queue `amqp` (once per connection) and binds it to the deliver exchange of
    /// the shared delay topology, so delayed messages for it reach it when due.
    ///
    /// On a cluster whose node holding the delay topology's classic queues is down, the work
    /// queue (a quorum queue, served by the other nodes) is still declared and used: the
    /// binding, durable cluster metadata, was made when the queue was first prepared (a queue
    /// new since then is bound by the next connection, or the next start). Only delayed
    /// publishes fail meanwhile.
    async fn ensure_work(&self, link: &Link, amqp: &str) -> Result<(), BrokerError> {
        if link.is_work_ready(amqp) {
            return Ok(());
        }
        link.ensure(amqp, QueueKind::Work, self.expires()).await?;
        let bound = async {
            let deliver = self.ensure_deliver(link).await?;
            link.ensure_binding(Bind::Queue, amqp, &deliver, header_is(amqp::TARGET, amqp))
                .await
        };
        match bound.await {
            Ok(()) => {
                link.mark_work_ready(amqp);
                Ok(())
            }
            Err(e) if link::is_node_down(&e) => {
                // Not tried again on this connection (each try closes a channel): the binding
                // was made when the queue was first prepared; the next connection tries again.
                link.mark_work_ready(amqp);
                tracing::warn!(queue = amqp, error = %e, "the cluster node holding the delay queues is down: this queue is served, delayed jobs wait on that node until it is back, and delayed publishes fail meanwhile");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Declares the deliver exchange of the shared delay topology and the alternate exchange and
    /// queue that park what it cannot route (once per connection); returns its name.
    async fn ensure_deliver(&self, link: &Link) -> Result<String, BrokerError> {
        let prefix = &self.inner.cfg.key_prefix;
        let unroutable = delay::unroutable_name(prefix);
        let deliver = delay::deliver_name(prefix);
        link.ensure_exchange(&unroutable, ExchangeKind::Fanout)
            .await?;
        link.ensure(&unroutable, QueueKind::Plain, self.expires())
            .await?;
        link.ensure_binding(Bind::Queue, &unroutable, &unroutable, FieldTable::default())
            .await?;
        link.ensure_exchange(
            &deliver,
            ExchangeKind::Headers {
                alternate: Some(&unroutable),
            },
        )
        .await?;
        Ok(deliver)
    }

    /// Declares the shared delay levels of this key prefix (once per connection).
    async fn ensure_delay_levels(&self, link: &Link) -> Result<(), BrokerError> {
        let prefix = &self.inner.cfg.key_prefix;
        let done = format!("delay levels {prefix}");
        if link.is_declared(&done) {
            return Ok(());
        }
        // One setup at a time in this process: concurrent first publishes wait for it instead of
        // declaring the same ~600 objects side by side.
        let _setup = self.inner.delay_setup.lock().await;
        if link.is_declared(&done) {
            return Ok(());
        }
        let entry = delay::entry_name(prefix);
        // The entry exchange is declared last: if it exists, a process declared everything
        // before it. One passive declare (on a channel of its own, which a 404 closes) instead
        // of ~600 declares and binds on every new connection.
        if link.exchange_exists(&entry).await? {
            link.mark_declared(&done);
            return Ok(());
        }
        let deliver = self.ensure_deliver(link).await?;
        let expires = self.expires();
        let level = |j: u32| async move {
            link.ensure(
                &delay::level_name(prefix, j),
                QueueKind::Level {
                    ttl_ms: 1 << j,
                    dlx: &delay::after_name(prefix, j),
                },
                expires,
            )
            .await
        };
        let levels = futures::future::join_all((0..LEVELS).map(level)).await;
        levels.into_iter().collect::<Result<(), _>>()?;
        // Exchange after.k sends a message to the level its stevedore-after-k header names, or on
        // to the deliver exchange; level k's queue dead-letters into after.k.
        let router = |k: u32| {
            let deliver = deliver.clone();
            async move {
                let after = delay::after_name(prefix, k);
                link.ensure_exchange(&after, ExchangeKind::Headers { alternate: None })
                    .await?;
                let on =
                    |next: Option<u32>| header_is(&delay::hop_header(k), &delay::hop_value(next));
                for j in 0..k {
                    link.ensure_binding(
                        Bind::Queue,
                        &delay::level_name(prefix, j),
                        &after,
                        on(Some(j)),
                    )
                    .await?;
                }
                link.ensure_binding(Bind::Exchange, &deliver, &after, on(None))
                    .await
            }
        };
        let routers = futures::future::join_all((0..LEVELS).map(router)).await;
        routers.into_iter().collect::<Result<(), _>>()?;
        router(LEVELS).await?;
        link.mark_declared(&done);
        Ok(())
    }

    /// Publishes `(not_before, message)` pairs for AMQP queue `amqp` into the delay levels, with
    /// the delay left when each is sent as its routing key.
    async fn publish_delayed(
        &self,
        link: &Link,
        amqp: &str,
        messages: Vec<(SystemTime, &Envelope)>,
    ) -> Result<(), BrokerError> {
        self.ensure_delay_levels(link).await?;
        let prefix = &self.inner.cfg.key_prefix;
        let (entry, queue) = (short(&delay::entry_name(prefix))?, short(amqp)?);
        let levels = self.inner.cfg.delay_levels;
        let batch = messages
            .into_iter()
            .map(|(not_before, m)| {
                let (props, body) = amqp::properties(m, &[(amqp::TARGET, amqp)])?;
                let route = Route::Delayed {
                    entry: entry.clone(),
                    queue: queue.clone(),
                    not_before,
                    levels,
                };
                Ok((route, props, body))
            })
            .collect::<Result<Vec<_>, BrokerError>>()?;
        let sent = link.publish_routed(amqp, batch).await;
        if sent.is_err() {
            // A level may have been deleted under us: declare them all again next time.
            link.forget(&format!("delay levels {prefix}"));
        }
        sent
    }

    /// Moves messages that came due while their queue did not exist (parked by the deliver
    /// exchange's alternate exchange) on to their queues, re-declaring them. Bounded per call.
    async fn rescue_unroutable(&self, link: &Link) -> Result<(), BrokerError> {
        match self.rescue_unroutable_now(link).await {
            Err(e) if link::is_node_down(&e) => {
                tracing::warn!(error = %e, "cannot look for parked delayed messages: their cluster node is down; looking again at the next start");
                Ok(())
            }
            other => other,
        }
    }

    async fn rescue_unroutable_now(&self, link: &Link) -> Result<(), BrokerError> {
        const MOST: usize = 10_000;
        let prefix = &self.inner.cfg.key_prefix;
        let parked = delay::unroutable_name(prefix);
        let ch = call("open a channel", link.conn.create_channel())
            .await
            .map_err(|e| link.note(e))?;
        let mut moved = 0usize;
        let mut kept = 0usize;
        while moved + kept < MOST {
            let got = call(
                format!("basic.get from {parked}"),
                ch.basic_get(short(&parked)?, BasicGetOptions { no_ack: false }),
            )
            .await?;
            let Some(m) = got else { break };
            let tag = m.delivery.delivery_tag;
            let d = amqp::decode(&m.delivery.properties, m.delivery.data, false);
            let physical = d
                .target
                .as_deref()
                .and_then(|t| t.strip_prefix(prefix.as_str()))
                .filter(|q| self.amqp_name(q).is_ok())
                .map(str::to_string);
            match physical {
                Some(q) => {
                    self.publish(&q, vec![d.envelope]).await?;
                    call("ack", ch.basic_ack(tag, BasicAckOptions::default())).await?;
                    moved += 1;
                }
                None => {
                    kept += 1;
                    tracing::error!(queue = %parked, id = %d.envelope.id, "a parked delayed message names no valid target queue; left in place for inspection");
                }
            }
        }
        // Closing the channel returns what was kept to the queue.
        let _ = call("close", ch.close(200, "done".into())).await;
        if moved > 0 {
            tracing::warn!(moved, queue = %parked, "delayed messages came due while their queue did not exist; moved on to the re-declared queues");
        }
        Ok(())
    }

    /// Messages waiting in the shared delay levels of this key prefix, for every queue (RabbitMQ
    /// cannot count them per queue). Declares the levels if they do not exist yet.
    pub async fn delayed_total(&self) -> Result<u64, BrokerError> {
        let link = self.link().await?;
        self.ensure_delay_levels(&link).await?;
        let prefix = &self.inner.cfg.key_prefix;
        let expires = self.expires();
        let counts = futures::future::join_all((0..LEVELS).map(|k| {
            let name = delay::level_name(prefix, k);
            let dlx = delay::after_name(prefix, k);
            let link = link.clone();
            async move {
                link.declare(
                    &name,
                    QueueKind::Level {
                        ttl_ms: 1 << k,
                        dlx: &dlx,
                    },
                    expires,
                )
                .await
            }
        }))
        .await;
        counts
            .into_iter()
            .try_fold(0u64, |sum, c| c.map(|c| sum.saturating_add(c)))
    }
}

/// Binding arguments of a headers exchange that match messages whose header `name` is `value`.
fn header_is(name: &str, value: &str) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-match".into(), AMQPValue::LongString("all".into()));
    args.insert(name.into(), AMQPValue::LongString(LongString::from(value)));
    args
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".into())
}

#[async_trait]
impl Broker for RabbitBroker {
    fn name(&self) -> &'static str {
        "rabbitmq"
    }

    fn capabilities(&self) -> &Capabilities {
        &self.inner.caps
    }

    /// Declares each queue (durable quorum queue, bound to the shared delay topology's deliver
    /// exchange) and the shared delay levels (so a worker sets them up at start, never on a job's
    /// retry; one passive declare once they exist), then moves on any delayed message that came
    /// due while its queue did not exist.
    async fn prepare(&self, queues: &[String]) -> Result<(), BrokerError> {
        let names: Vec<String> = queues
            .iter()
            .map(|q| self.amqp_name(q))
            .collect::<Result<_, _>>()?;
        let link = self.link().await?;
        for (q, amqp) in queues.iter().zip(&names) {
            self.ensure_work(&link, amqp).await?;
            lock(&self.inner.prepared).insert(q.clone());
        }
        self.ensure_delay_levels(&link).await?;
        self.rescue_unroutable(&link).await
    }

    /// Messages due now go to the queue; messages with a future `not_before` go through the shared
    /// delay levels (see the [`delay`] module), held for their remaining delay rounded up to the
    /// millisecond, at most [`max_delay`]. Returns once the broker confirmed every message.
    async fn publish(&self, queue: &str, messages: Vec<Envelope>) -> Result<(), BrokerError> {
        self.check_payloads(&messages)?;
        if messages.is_empty() {
            return Ok(());
        }
        let amqp = self.amqp_name(queue)?;
        let now = SystemTime::now();
        let mut due = Vec::with_capacity(messages.len());
        let mut later = Vec::new();
        for m in &messages {
            match (m.delay_remaining(now), m.not_before) {
                (Some(_), Some(at)) => later.push((at, m)),
                _ => due.push(amqp::properties(m, &[])?),
            }
        }
        let link = self.link().await?;
        self.ensure_work(&link, &amqp).await?;
        if !due.is_empty() {
            link.publish_confirmed(&amqp, due).await?;
        }
        if !later.is_empty() {
            self.publish_delayed(&link, &amqp, later).await?;
        }
        Ok(())
    }

    async fn receive(
        &self,
        queue: &str,
        opts: ReceiveOptions,
    ) -> Result<Vec<Delivery>, BrokerError> {
        let qs = self.queue_state(queue)?;
        let max = opts.max.clamp(1, self.inner.caps.max_batch);
        let mut deadline = Instant::now() + opts.wait;
        // Set once the wait ran out while the broker still owed us deliveries.
        let mut owed_since: Option<Instant> = None;
        // Set once this call waited for acks of deliveries it handed out before (see below).
        let mut waited_for_acks = false;
        loop {
            let started = {
                let _setup = qs.setup.lock().await;
                self.ensure_consumer(&qs, max).await?
            };
            if started {
                deadline = deadline.max(Instant::now() + START_GRACE);
            }
            let notified = qs.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (taken, chan_id, dead) = {
                let mut slot = qs.slot();
                match slot.as_mut().filter(|c| c.failed.is_none()) {
                    Some(c) => {
                        let mut out = Vec::new();
                        while out.len() < max {
                            let Some((tag, raw)) = c.buffer.pop_first() else {
                                break;
                            };
                            c.outstanding.insert(tag, raw.consumer);
                            out.push((tag, raw));
                        }
                        (out, c.id, false)
                    }
                    None => (Vec::new(), 0, true),
                }
            };
            if !taken.is_empty() {
                // One name shared by every receipt of this receive.
                let receipt_queue: Arc<str> = Arc::from(queue);
                return Ok(taken
                    .into_iter()
                    .map(|(tag, raw)| Self::to_delivery(&receipt_queue, chan_id, tag, raw))
                    .collect());
            }
            if dead {
                // ensure_consumer reports the loss once, then opens a new channel.
                continue;
            }
            if Instant::now() >= deadline {
                // The buffer lags the broker by a push: "empty" only once the broker says the
                // queue holds no ready message this consumer could still be sent. While it does,
                // keep waiting for the push (asking again every PUSH_GRACE), up to OWED_MAX.
                let since = *owed_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= OWED_MAX {
                    tracing::warn!(queue = %qs.amqp, waited = ?since.elapsed(), "the queue reports ready messages but the broker pushed none to this consumer (other consumers with priority or single-active-consumer?); returning empty");
                    return Ok(Vec::new());
                }
                if self.may_push(&qs).await? {
                    deadline = Instant::now() + PUSH_GRACE;
                    continue;
                }
                if !waited_for_acks && credit_held_by_handed_out(&qs) {
                    // All the consumer's credit (at the prefetch) is held by deliveries handed
                    // out: a caller that asks again has finished some, and their acks are on
                    // their way (the worker's acker sends them in the background). The broker
                    // pushes more once it has settled them: wait for that once, rather than
                    // report the queue empty (the worker would then skip the level for a while:
                    // a weighted share measured 38 high of 40 instead of 30).
                    waited_for_acks = true;
                    deadline = Instant::now() + PUSH_GRACE;
                    continue;
                }
                return Ok(Vec::new());
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(deadline) => {}
            }
        }
    }

    async fn ack(&self, receipts: &[Receipt]) -> Result<(), BrokerError> {
        self.settle(receipts, Settle::Ack).await
    }

    async fn release(&self, receipts: &[Receipt]) -> Result<(), BrokerError> {
        self.settle(receipts, Settle::Requeue).await
    }

    /// Cancels this handle's consumers of `queues`, so that nothing more is pushed while the
    /// last jobs finish (their acks free prefetch credit; a push that crossed a later cancel
    /// would reach no consumer and go back counted at close). Buffered deliveries stay for
    /// [`Broker::close`] to hand back uncounted.
    async fn unsubscribe(&self, queues: &[String]) -> Result<(), BrokerError> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(BrokerError::Closed);
        }
        for queue in queues {
            if let Some(qs) = self.existing_queue_state(queue) {
                let _setup = qs.setup.lock().await;
                self.cancel_consumer(&qs).await;
            }
        }
        Ok(())
    }

    /// [`stevedore_core::resend_uncounted`]: a requeue cannot be uncounted (a classic queue
    /// marks the message redelivered for good, a quorum queue counts the return), so the copy
    /// carries the attempt and goes to the back of the queue. As for a release, this handle's
    /// consumer of each queue is stopped first, so the copies go to whoever asks next rather
    /// than into this handle's buffer.
    async fn release_uncounted(&self, deliveries: Vec<Delivery>) -> Result<(), BrokerError> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(BrokerError::Closed);
        }
        let mut queues: Vec<&str> = deliveries.iter().map(|d| d.receipt.queue()).collect();
        queues.sort_unstable();
        queues.dedup();
        for queue in queues {
            if let Some(qs) = self.existing_queue_state(queue) {
                let _setup = qs.setup.lock().await;
                self.cancel_consumer(&qs).await;
            }
        }
        stevedore_core::resend_uncounted(self, deliveries).await
    }

    /// A no-op while the delivery is held (the lease is the channel); [`BrokerError::LeaseLost`]
    /// once it is not (acked, released, or its channel died).
    async fn extend_lease(&self, receipt: &Receipt, _lease: Duration) -> Result<(), BrokerError> {
        let held = self
            .existing_queue_state(receipt.queue())
            .is_some_and(|qs| {
                qs.slot().as_ref().is_some_and(|c| {
                    c.failed.is_none()
                        && receipt.token::<Token>().is_some_and(|t| {
                            t.channel == c.id && c.outstanding.contains_key(&t.tag)
                        })
                })
            });
        if held {
            Ok(())
        } else {
            Err(BrokerError::LeaseLost {
                queue: receipt.queue().to_string(),
            })
        }
    }

    async fn depth(&self, queue: &str) -> Result<Depth, BrokerError> {
        let amqp = self.amqp_name(queue)?;
        let link = self.link().await?;
        let queued = link.declare(&amqp, QueueKind::Work, self.expires()).await?;
        let (buffered, in_flight) = self
            .existing_queue_state(queue)
            .and_then(|qs| {
                qs.slot()
                    .as_ref()
                    .filter(|c| c.failed.is_none())
                    .map(|c| (c.buffer.len() as u64, c.outstanding.len() as u64))
            })
            .unwrap_or((0, 0));
        Ok(Depth {
            ready: queued + buffered,
            in_flight,
            // In the shared delay levels, not countable per queue.
            delayed: None,
            oldest_age: None,
        })
    }

    /// Closes every channel (unacked messages go back to their queues) and the connection.
    /// Hands back, uncounted, what the broker pushed to this handle beyond what was received.
    async fn close(&self) -> Result<(), BrokerError> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Ok(());
        }
        if tokio::time::timeout(Duration::from_secs(5), self.return_buffered())
            .await
            .is_err()
        {
            tracing::warn!("handing back buffered deliveries uncounted at close took over 5s; the broker returns the rest with their delivery counted");
        }
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let states: Vec<Arc<QueueState>> =
            lock(&self.inner.queues).drain().map(|(_, qs)| qs).collect();
        for qs in states {
            qs.reset();
        }
        let link = lock(&self.inner.link).take();
        if let Some(link) = link {
            let _ = tokio::time::timeout(
                Duration::from_secs(5),
                link.conn.close(200, "stevedore broker closed".into()),
            )
            .await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_the_password_only() {
        assert_eq!(
            redact("amqp://guest:s3cret@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(
            redact("amqps://app:p@ss@rabbit:5671/vh"),
            "amqps://app:***@rabbit:5671/vh"
        );
        assert_eq!(redact("amqp://localhost:5672"), "amqp://localhost:5672");
        assert_eq!(
            redact("amqp://a:x@h1:1/%2f,amqp://h2:2,amqp://b:y@h3:3/"),
            "amqp://a:***@h1:1/%2f,amqp://h2:2,amqp://b:***@h3:3/"
        );
        assert_eq!(
            nodes(" amqp://h1:1 , amqp://h2:2"),
            ["amqp://h1:1", "amqp://h2:2"]
        );
        assert_eq!(
            redact("amqp://u:p,w@h:1/%2f"),
            "amqp://u:***@h:1/%2f",
            "a comma in a password does not split the URL"
        );
        let cfg = RabbitConfig::new("amqp://u:topsecret@h/%2f");
        assert!(!format!("{cfg:?}").contains("topsecret"));
    }

    #[test]
    fn credit_follows_demand_up_to_the_prefetch() {
        assert_eq!(credit(64, 0, 10, 1), 10);
        assert_eq!(credit(64, 10, 16, 1), 26);
        assert_eq!(credit(64, 60, 16, 1), 64);
        assert_eq!(credit(64, 0, 0, 1), 1);
        assert_eq!(credit(1, 0, 10, 1), 1);
        assert_eq!(credit(500, 30, 100, 4), 430);
        assert_eq!(credit(500, 200, 100, 4), 500);
    }

    #[test]
    fn capabilities_declare_session_leases_bounded_by_consumer_timeout() {
        let c = capabilities(1024, Duration::from_secs(60), LEVELS);
        assert_eq!(
            c.lease,
            LeaseSupport::Session {
                max: Some(Duration::from_secs(60))
            }
        );
        assert_eq!(
            c.delay,
            DelaySupport::Native {
                max: Some(Duration::from_millis((1 << 32) - 1))
            }
        );
        assert!(c.durable);
    }
}

/// Entry points for the fuzz targets in `fuzz/` (the `fuzzing` feature; not an API): the
/// decoder of a delivery's properties and body, and the encoder it must round-trip with.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing {
    use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
    use lapin::BasicProperties;
    use stevedore_core::Envelope;

    /// A header value of the kind `tag` selects (`tag % 6`: long string, short string, long
    /// int, long-long int, boolean, bytes), read from `raw`.
    fn value(tag: u8, raw: &[u8]) -> AMQPValue {
        let mut n = [0u8; 8];
        let len = raw.len().min(8);
        n[..len].copy_from_slice(&raw[..len]);
        let text = String::from_utf8_lossy(raw).into_owned();
        match tag % 6 {
            0 => AMQPValue::LongString(LongString::from(text)),
            1 => {
                AMQPValue::ShortString(ShortString::from(text.chars().take(64).collect::<String>()))
            }
            2 => AMQPValue::LongInt(i32::from_le_bytes([n[0], n[1], n[2], n[3]])),
            3 => AMQPValue::LongLongInt(i64::from_le_bytes(n)),
            4 => AMQPValue::Boolean(n[0] & 1 == 1),
            _ => AMQPValue::ByteArray(raw.to_vec().into()),
        }
    }

    /// Decodes a delivery with these headers (name, value kind, value bytes), properties and
    /// body: its envelope and delivery count.
    #[allow(clippy::too_many_arguments)]
    pub fn decode(
        headers: Vec<(String, u8, Vec<u8>)>,
        message_id: Option<String>,
        app_id: Option<String>,
        kind: Option<String>,
        content_type: Option<String>,
        timestamp: Option<u64>,
        body: Vec<u8>,
        redelivered: bool,
    ) -> (Envelope, u32) {
        let short = |s: String| ShortString::from(s.chars().take(64).collect::<String>());
        let mut props = BasicProperties::default();
        if !headers.is_empty() {
            let mut table = FieldTable::default();
            for (k, tag, raw) in headers {
                table.insert(short(k), value(tag, &raw));
            }
            props = props.with_headers(table);
        }
        if let Some(v) = message_id {
            props = props.with_message_id(short(v));
        }
        if let Some(v) = app_id {
            props = props.with_app_id(short(v));
        }
        if let Some(v) = kind {
            props = props.with_type(short(v));
        }
        if let Some(v) = content_type {
            props = props.with_content_type(short(v));
        }
        if let Some(v) = timestamp {
            props = props.with_timestamp(v);
        }
        let d = crate::amqp::decode(&props, body, redelivered);
        (d.envelope, d.delivery_count)
    }

    /// Encodes an envelope as its publish would, then decodes it as its first delivery; `None`
    /// where publishing refuses it (a header name over 255 bytes).
    pub fn round_trip(env: &Envelope) -> Option<Envelope> {
        let (props, body) = crate::amqp::properties(env, &[]).ok()?;
        Some(crate::amqp::decode(&props, body.to_vec(), false).envelope)
    }
}
