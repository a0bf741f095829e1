//! # stevedore-redis
//!
//! Redis Streams backend. One stream per physical queue (key = prefix + queue name, so
//! `redis-cli XADD emails * payload '{...}'` writes to queue `emails`), one consumer group
//! (`stevedore`) per stream, one consumer name per worker process.
//!
//! | broker method | Redis |
//! |---|---|
//! | `publish` | pipelined `XADD` of one field: its name the metadata, its value the body (layout in the `format` module; `payload` entries of other producers read too) |
//! | `receive` | `XAUTOCLAIM` (min-idle = lease; gated to a few times a lease) for entries whose lease ran out, then `XREADGROUP COUNT n BLOCK ms` for new ones |
//! | `ack` | pipelined `XACK`; acked entries are trimmed later by `XTRIM MINID`, never an unacked one |
//! | `release` | atomic script: re-add at the stream's end with the delivery count so far, `XACK` + `XDEL` the old entry |
//! | `extend_lease` | atomic script: `XCLAIM ... JUSTID` if this consumer still owns it (resets idle time) |
//! | `depth` | `XINFO GROUPS` lag and pending, `ZCARD` of the delay set, age of the first undelivered entry |
//! | delay | [`DelayStore`]: a sorted set scored by due time + a hash per message, promoted by an atomic Lua script in bounded batches |
//!
//! Reconnects on its own (a `ConnectionManager` for commands, fresh connections for blocking reads),
//! re-creates a missing group ("NOGROUP" after a Redis restart without persistence), and warns at
//! start-up when Redis keeps nothing on disk.

mod factory;
mod format;
mod parse;
mod scripts;
mod store;

pub use factory::RedisFactory;
pub use store::{RedisStore, RedisStoreFactory};

use async_trait::async_trait;
use parse::Entry;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Client, RedisError, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use stevedore_core::{
    to_millis, Broker, BrokerError, Capabilities, DelayStore, DelaySupport, Delivery, Depth,
    Envelope, LeaseSupport, OrderingSupport, Receipt, ReceiveOptions,
};

/// How long a command other than a blocking read may go unanswered before it fails as a timeout.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long past its BLOCK time a blocking read may go unanswered before the connection is
/// taken for dead (see `read_new`).
const BLOCK_GRACE: Duration = Duration::from_secs(5);

/// Default largest payload: 16 MiB (Redis itself allows 512 MiB per value).
pub const DEFAULT_MAX_PAYLOAD: usize = 16 * 1024 * 1024;
/// The consumer group every worker joins.
pub const GROUP: &str = "stevedore";
/// Default of [`RedisConfig::forget_idle`].
pub const DEFAULT_FORGET_IDLE: Duration = Duration::from_secs(600);
const TRIM_EVERY: u64 = 2048;

/// Connection settings.
#[derive(Clone, Debug)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port/db`, or `rediss://` for TLS (server certificates are
    /// checked against the system roots and the Mozilla roots; append `#insecure` to skip the check,
    /// for self-signed test servers only).
    pub url: String,
    /// Prepended to every key (streams and delay keys), to share one Redis. Default: empty, so a
    /// stream's key is the queue name.
    pub key_prefix: String,
    /// Largest payload accepted at publish.
    pub max_payload: usize,
    /// Consumer name of this process; default `<hostname>-<pid>-<random>`.
    pub consumer: Option<String>,
    /// Group hygiene: a consumer of a queue's group that holds nothing and has not read for this
    /// long (and for twice its lease) is removed from the group, with its lease record, by the
    /// next worker that looks for expired leases there. A worker killed without a graceful
    /// close leaves its name behind (its entries are taken over by others); this keeps
    /// `XINFO CONSUMERS` from growing with every crash. Default 10 minutes; `Duration::ZERO`
    /// turns it off. A live worker that has not read a queue for that long (its slots busy
    /// elsewhere) may be removed too, harmlessly: its next receive registers its lease again
    /// and its read creates the consumer again.
    pub forget_idle: Duration,
    /// Whether [`RedisBroker::connect`] warns when the server keeps nothing on disk (default
    /// true). The factory turns it off for processes that only enqueue or inspect (the CLI's
    /// commands), so the warning comes once per worker start, not with every command.
    pub warn_if_volatile: bool,
}

impl RedisConfig {
    /// Settings for `url` with defaults for the rest.
    pub fn new(url: impl Into<String>) -> Self {
        RedisConfig {
            url: url.into(),
            key_prefix: String::new(),
            max_payload: DEFAULT_MAX_PAYLOAD,
            consumer: None,
            warn_if_volatile: true,
            forget_idle: DEFAULT_FORGET_IDLE,
        }
    }
}

/// A Redis receipt's token: the stream entry id, and when the lease taken with it ends (Unix ms,
/// less a safety margin), before which an ack needs no ownership check.
#[derive(Debug)]
struct Token {
    id: String,
    lease_until: u64,
}

/// Redis Streams broker. Cheap to clone (clones share connections and the consumer name); thread
/// safe.
#[derive(Clone)]
pub struct RedisBroker {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    conn: ConnectionManager,
    blocking: Mutex<Vec<MultiplexedConnection>>,
    prefix: String,
    consumer: String,
    caps: Capabilities,
    /// Per stream: when this handle last looked for expired leases, and the shortest lease any
    /// consumer of the stream holds (it sets how often to look).
    last_reclaim: Mutex<HashMap<String, (Instant, Duration)>>,
    /// [`RedisConfig::forget_idle`], and per stream when this handle last removed idle consumers.
    forget_idle: Duration,
    last_forget: Mutex<HashMap<String, Instant>>,
    acks: AtomicU64,
    closed: std::sync::atomic::AtomicBool,
    url_redacted: String,
}

impl std::fmt::Debug for RedisBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBroker")
            .field("url", &self.inner.url_redacted)
            .field("prefix", &self.inner.prefix)
            .field("consumer", &self.inner.consumer)
            .finish()
    }
}

fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}***{}", &url[..s + 3], &url[at..]),
        _ => url.to_string(),
    }
}

fn err(e: RedisError) -> BrokerError {
    let transient_code = matches!(
        e.code(),
        Some("LOADING" | "BUSY" | "TRYAGAIN" | "MASTERDOWN" | "READONLY")
    );
    if e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || transient_code
    {
        BrokerError::Connection(e.to_string())
    } else {
        BrokerError::permanent(format!("redis: {e}"))
    }
}

fn is_nogroup(e: &RedisError) -> bool {
    e.code() == Some("NOGROUP") || e.to_string().contains("NOGROUP")
}

impl RedisBroker {
    /// [`Broker::release`], and with `uncounted` [`Broker::release_uncounted`].
    async fn give_back(&self, receipts: &[Receipt], uncounted: bool) -> Result<(), BrokerError> {
        let mut by_stream: HashMap<&str, Vec<&str>> = HashMap::new();
        let mut lost = None;
        for r in receipts {
            match r.token::<Token>() {
                Some(t) => by_stream.entry(r.queue()).or_default().push(t.id.as_str()),
                None => lost = Some(r.queue().to_string()),
            }
        }
        for (queue, ids) in by_stream {
            let stream = self.stream_key(queue);
            let mut c = self.conn()?;
            let n: i64 = scripts::RELEASE
                .key(&stream)
                .arg(GROUP)
                .arg(&self.inner.consumer)
                .arg(u8::from(uncounted))
                .arg(&ids)
                .invoke_async(&mut c)
                .await
                .map_err(err)?;
            if (n as usize) < ids.len() {
                lost = Some(queue.to_string());
            }
        }
        match lost {
            Some(queue) => Err(BrokerError::LeaseLost { queue }),
            None => Ok(()),
        }
    }

    /// Connects (checking the server answers) and warns if the server keeps nothing on disk.
    pub async fn connect(config: RedisConfig) -> Result<Self, BrokerError> {
        let url_redacted = redact(&config.url);
        if config.url.starts_with("rediss://") {
            // Ignored when a provider is already installed (by us or by the application).
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let client = Client::open(config.url.as_str()).map_err(|e| {
            BrokerError::permanent(format!("invalid redis url {url_redacted}: {e}"))
        })?;
        // Every command on this connection is short (no blocking reads: those use their own
        // connections), so a reply that takes 10 s means the connection stopped answering.
        let mgr_cfg = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(6)
            .set_max_delay(Duration::from_secs(2));
        let conn = ConnectionManager::new_with_config(client.clone(), mgr_cfg)
            .await
            .map_err(|e| {
                BrokerError::Connection(format!("cannot connect to {url_redacted}: {e}"))
            })?;
        let consumer = config.consumer.clone().unwrap_or_else(|| {
            let host = hostname::get()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "host".into());
            format!("{host}-{}-{:04x}", std::process::id(), rand_u16())
        });
        let broker = RedisBroker {
            inner: Arc::new(Inner {
                client,
                conn,
                blocking: Mutex::new(Vec::new()),
                prefix: config.key_prefix.clone(),
                consumer,
                caps: capabilities(config.max_payload),
                last_reclaim: Mutex::new(HashMap::new()),
                forget_idle: config.forget_idle,
                last_forget: Mutex::new(HashMap::new()),
                acks: AtomicU64::new(0),
                closed: std::sync::atomic::AtomicBool::new(false),
                url_redacted,
            }),
        };
        if config.warn_if_volatile {
            broker.warn_if_not_persistent().await;
        }
        Ok(broker)
    }

    /// This process's consumer name in every group.
    pub fn consumer(&self) -> &str {
        &self.inner.consumer
    }

    /// The stream key of a physical queue.
    pub fn stream_key(&self, queue: &str) -> String {
        format!("{}{queue}", self.inner.prefix)
    }

    fn delay_key(&self) -> String {
        format!("{}stevedore:delayed", self.inner.prefix)
    }
    fn delay_queue_prefix(&self) -> String {
        format!("{}stevedore:delayed:q:", self.inner.prefix)
    }
    fn delay_msg_prefix(&self) -> String {
        format!("{}stevedore:delayed:m:", self.inner.prefix)
    }

    fn conn(&self) -> Result<ConnectionManager, BrokerError> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(BrokerError::Closed);
        }
        Ok(self.inner.conn.clone())
    }

    async fn warn_if_not_persistent(&self) {
        let Ok(mut c) = self.conn() else { return };
        let aof: Result<Vec<String>, _> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("appendonly")
            .query_async(&mut c)
            .await;
        let save: Result<Vec<String>, _> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("save")
            .query_async(&mut c)
            .await;
        if let (Ok(aof), Ok(save)) = (aof, save) {
            let aof_on = aof.get(1).map(|v| v == "yes").unwrap_or(false);
            let save_on = save.get(1).map(|v| !v.trim().is_empty()).unwrap_or(false);
            if !aof_on && !save_on {
                tracing::warn!(
                    url = %self.inner.url_redacted,
                    "Redis keeps nothing on disk (appendonly no, save \"\"): a Redis restart loses every queued and delayed job; enable appendonly for durability"
                );
            }
        }
    }

    async fn ensure_group(&self, stream: &str) -> Result<(), BrokerError> {
        let mut c = self.conn()?;
        let r: Result<Value, RedisError> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(stream)
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut c)
            .await;
        match r {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some("BUSYGROUP") || e.to_string().contains("BUSYGROUP") => {
                Ok(())
            }
            Err(e) => Err(err(e)),
        }
    }

    /// Runs `f` on the command connection; on NOGROUP re-creates the group and runs it once more.
    async fn with_group<T, F, Fut>(&self, stream: &str, f: F) -> Result<T, BrokerError>
    where
        F: Fn(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = Result<T, RedisError>>,
    {
        match f(self.conn()?).await {
            Err(e) if is_nogroup(&e) => {
                tracing::info!(
                    stream,
                    "consumer group missing (Redis restarted or stream deleted): re-creating it"
                );
                self.ensure_group(stream).await?;
                f(self.conn()?).await.map_err(err)
            }
            other => other.map_err(err),
        }
    }

    async fn blocking_conn(&self) -> Result<MultiplexedConnection, BrokerError> {
        let pooled = self
            .inner
            .blocking
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop();
        if let Some(c) = pooled {
            return Ok(c);
        }
        let cfg = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(None);
        self.inner
            .client
            .get_multiplexed_async_connection_with_config(&cfg)
            .await
            .map_err(|e| {
                BrokerError::Connection(format!(
                    "cannot connect to {}: {e}",
                    self.inner.url_redacted
                ))
            })
    }

    fn return_blocking(&self, c: MultiplexedConnection) {
        let mut pool = self
            .inner
            .blocking
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if pool.len() < 16 {
            pool.push(c);
        }
    }

    /// Whether to look for expired leases on `stream` now: every quarter of the shortest lease held
    /// on it (see [`reclaim_interval`]). Also the slice a blocking read waits at most.
    fn reclaim_due(&self, stream: &str, lease: Duration) -> (bool, Duration) {
        let mut m = self
            .inner
            .last_reclaim
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let (last, shortest) = m.get(stream).copied().unwrap_or((now, lease));
        let every = reclaim_interval(shortest.min(lease));
        let first = !m.contains_key(stream);
        if first || now.duration_since(last) >= every {
            m.insert(stream.to_string(), (now, shortest.min(lease)));
            (true, every)
        } else {
            (false, every)
        }
    }

    /// The `forget ms` argument of the reclaim script for `stream`: [`RedisConfig::forget_idle`]
    /// once every half of it per stream (the first reclaim included), else 0 (no look).
    fn forget_due(&self, stream: &str) -> u64 {
        let idle = self.inner.forget_idle;
        if idle.is_zero() {
            return 0;
        }
        let mut m = self
            .inner
            .last_forget
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        match m.get(stream) {
            Some(last) if now.duration_since(*last) < idle / 2 => 0,
            _ => {
                m.insert(stream.to_string(), now);
                idle.as_millis().max(1) as u64
            }
        }
    }

    /// `lease_until` (Unix ms) goes into the receipt: an ack well before it cannot meet a takeover.
    fn to_delivery(queue: &Arc<str>, e: Entry, pel_count: u32, lease_until: u64) -> Delivery {
        let (envelope, redeliveries) = format::decode(&e.id, e.fields);
        Delivery {
            envelope,
            receipt: Receipt::new(
                queue.clone(),
                Token {
                    id: e.id,
                    lease_until,
                },
            ),
            delivery_count: pel_count.max(1).saturating_add(redeliveries),
        }
    }

    fn lease_key(&self, stream: &str) -> String {
        format!("{}stevedore:leases:{stream}", self.inner.prefix)
    }

    async fn reclaim(
        &self,
        queue: &str,
        stream: &str,
        max: usize,
        lease: Duration,
    ) -> Result<Vec<Delivery>, BrokerError> {
        let consumer = self.inner.consumer.clone();
        let lease_ms = lease.as_millis().max(1) as u64;
        let lease_key = self.lease_key(stream);
        let forget_ms = self.forget_due(stream);
        let reply: Value = self
            .with_group(stream, |mut c| {
                let (consumer, lease_key) = (consumer.clone(), lease_key.clone());
                async move {
                    scripts::RECLAIM
                        .key(stream)
                        .key(&lease_key)
                        .arg(GROUP)
                        .arg(&consumer)
                        .arg(lease_ms)
                        .arg(max)
                        .arg(forget_ms)
                        .invoke_async(&mut c)
                        .await
                }
            })
            .await?;
        let (shortest, claimed, removed) = parse::claimed(reply);
        if removed > 0 {
            tracing::info!(
                stream,
                removed,
                "removed consumers that held nothing and had not read for {:?} (workers that stopped without closing)",
                self.inner.forget_idle
            );
        }
        if let Some(ms) = shortest {
            let mut m = self
                .inner
                .last_reclaim
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if let Some(state) = m.get_mut(stream) {
                state.1 = Duration::from_millis(ms);
            }
        }
        let queue: Arc<str> = Arc::from(queue);
        Ok(claimed
            .into_iter()
            .map(|(e, n)| Self::to_delivery(&queue, e, n, lease_until(lease)))
            .collect())
    }

    async fn read_new(
        &self,
        queue: &str,
        stream: &str,
        max: usize,
        wait: Duration,
        lease: Duration,
    ) -> Result<Vec<Delivery>, BrokerError> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(GROUP)
            .arg(&self.inner.consumer)
            .arg("COUNT")
            .arg(max);
        let blocking = !wait.is_zero();
        if blocking {
            cmd.arg("BLOCK").arg(wait.as_millis().max(1) as u64);
        }
        cmd.arg("STREAMS").arg(stream).arg(">");
        let reply: Result<Value, RedisError> = if blocking {
            let mut c = self.blocking_conn().await?;
            // A blocking read answers within its BLOCK time; one that does not is on a
            // connection that stopped answering without closing (half-open). It is dropped, not
            // pooled, and the caller hears of it now rather than when TCP gives up (minutes).
            // Entries the read took after all come back after their lease (XAUTOCLAIM).
            let limit = wait + BLOCK_GRACE;
            let r = match tokio::time::timeout(limit, cmd.query_async(&mut c)).await {
                Ok(r) => r,
                Err(_) => {
                    return Err(BrokerError::Connection(format!(
                        "no reply from {} to a {}ms blocking read within {}s: the connection \
                         stopped answering; reconnecting",
                        self.inner.url_redacted,
                        wait.as_millis(),
                        limit.as_secs()
                    )))
                }
            };
            if r.is_ok() || r.as_ref().err().is_some_and(is_nogroup) {
                self.return_blocking(c);
            }
            r
        } else {
            let mut c = self.conn()?;
            cmd.query_async(&mut c).await
        };
        let reply = match reply {
            Err(e) if is_nogroup(&e) => {
                tracing::info!(
                    stream,
                    "consumer group missing (Redis restarted or stream deleted): re-creating it"
                );
                self.ensure_group(stream).await?;
                return Ok(Vec::new());
            }
            other => other.map_err(err)?,
        };
        let queue: Arc<str> = Arc::from(queue);
        Ok(parse::read_reply(reply)
            .into_iter()
            .map(|e| Self::to_delivery(&queue, e, 1, lease_until(lease)))
            .collect())
    }

    /// Trims acknowledged entries of physical queue `queue` now (it also happens on its own every
    /// few thousand acks). Never removes an entry that is undelivered or pending. Returns how many
    /// entries went.
    pub async fn trim_now(&self, queue: &str) -> Result<u64, BrokerError> {
        let mut c = self.conn()?;
        let n: i64 = scripts::TRIM
            .key(self.stream_key(queue))
            .arg(GROUP)
            .invoke_async(&mut c)
            .await
            .map_err(err)?;
        Ok(n.max(0) as u64)
    }

    async fn trim(&self, stream: String) {
        let Ok(mut c) = self.conn() else { return };
        let r: Result<i64, RedisError> = scripts::TRIM
            .key(&stream)
            .arg(GROUP)
            .invoke_async(&mut c)
            .await;
        match r {
            Ok(n) if n > 0 => tracing::debug!(stream, trimmed = n, "trimmed acknowledged entries"),
            Ok(_) => {}
            Err(e) => tracing::debug!(stream, error = %e, "trim failed; will retry later"),
        }
    }
}

/// What the Redis backend declares: no native delay (a durable delay store instead), timed leases
/// (claim idle time) with no upper bound, no ordering across competing consumers.
pub fn capabilities(max_payload: usize) -> Capabilities {
    Capabilities {
        delay: DelaySupport::None,
        lease: LeaseSupport::Timed { max: None },
        ordering: OrderingSupport::None,
        max_payload,
        max_batch: 1000,
        durable: true,
        delay_tolerance: Duration::from_millis(300),
        depth_staleness: Duration::ZERO,
        shared: true,
        counts_deliveries: true,
        uncounted_release: true,
        sharing: stevedore_core::Sharing::Any,
        max_headers: None,
    }
}

/// When a lease taken now ends, in Unix ms, less a safety margin (a quarter second plus a tenth of
/// the lease) for the time the server's idle clock ran before our receive returned.
fn lease_until(lease: Duration) -> u64 {
    let margin = Duration::from_millis(250) + lease / 10;
    to_millis(SystemTime::now() + lease.saturating_sub(margin))
}

/// How often a consumer looks for entries whose lease ran out: a quarter of the lease, between
/// 50 ms and 5 s. A dead consumer's entries come back within lease + this.
fn reclaim_interval(lease: Duration) -> Duration {
    (lease / 4).clamp(Duration::from_millis(50), Duration::from_secs(5))
}

fn rand_u16() -> u16 {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    (nanos ^ (std::process::id() << 7)) as u16
}

#[async_trait]
impl Broker for RedisBroker {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn capabilities(&self) -> &Capabilities {
        &self.inner.caps
    }

    async fn prepare(&self, queues: &[String]) -> Result<(), BrokerError> {
        for q in queues {
            self.ensure_group(&self.stream_key(q)).await?;
        }
        Ok(())
    }

    async fn publish(&self, queue: &str, messages: Vec<Envelope>) -> Result<(), BrokerError> {
        self.inner.caps.check_payloads(&messages, "redis")?;
        if messages.is_empty() {
            return Ok(());
        }
        let stream = self.stream_key(queue);
        let mut pipe = redis::pipe();
        for env in &messages {
            let (meta, body) = format::encode(env);
            pipe.cmd("XADD")
                .arg(&stream)
                .arg("*")
                .arg(meta)
                .arg(body.as_ref())
                .ignore();
        }
        let mut c = self.conn()?;
        pipe.query_async::<()>(&mut c).await.map_err(err)
    }

    async fn receive(
        &self,
        queue: &str,
        opts: ReceiveOptions,
    ) -> Result<Vec<Delivery>, BrokerError> {
        let stream = self.stream_key(queue);
        let max = opts.max.clamp(1, self.inner.caps.max_batch);
        let deadline = Instant::now() + opts.wait;
        // Block in slices no longer than the reclaim interval, so entries whose lease runs out
        // while we wait are picked up within that interval.
        loop {
            let mut out = Vec::new();
            let (due, slice) = self.reclaim_due(&stream, opts.lease);
            if due {
                out = self.reclaim(queue, &stream, max, opts.lease).await?;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let wait = if out.is_empty() {
                left.min(slice)
            } else {
                Duration::ZERO
            };
            if out.len() < max {
                out.extend(
                    self.read_new(queue, &stream, max - out.len(), wait, opts.lease)
                        .await?,
                );
            }
            if !out.is_empty() || Instant::now() >= deadline {
                return Ok(out);
            }
        }
    }

    async fn ack(&self, receipts: &[Receipt]) -> Result<(), BrokerError> {
        if receipts.is_empty() {
            return Ok(());
        }
        // Within its lease (the token's lease end), no other consumer can have taken an entry
        // over, so a plain pipelined XACK is safe; later acks check ownership in a script.
        let now = to_millis(SystemTime::now());
        let mut fresh: HashMap<&str, Vec<&str>> = HashMap::new();
        let mut late: HashMap<&str, Vec<&str>> = HashMap::new();
        let mut lost_in = None;
        for r in receipts {
            let Some(t) = r.token::<Token>() else {
                lost_in = Some(r.queue().to_string());
                continue;
            };
            let m = if t.lease_until > now {
                &mut fresh
            } else {
                &mut late
            };
            m.entry(r.queue()).or_default().push(t.id.as_str());
        }
        if !fresh.is_empty() {
            let mut pipe = redis::pipe();
            for (queue, ids) in &fresh {
                pipe.cmd("XACK")
                    .arg(self.stream_key(queue))
                    .arg(GROUP)
                    .arg(ids)
                    .ignore();
            }
            let mut c = self.conn()?;
            pipe.query_async::<()>(&mut c).await.map_err(err)?;
        }
        for (queue, ids) in &late {
            let mut c = self.conn()?;
            let lost: i64 = scripts::ACK
                .key(self.stream_key(queue))
                .arg(GROUP)
                .arg(&self.inner.consumer)
                .arg(ids)
                .invoke_async(&mut c)
                .await
                .map_err(err)?;
            if lost > 0 {
                lost_in = Some(queue.to_string());
            }
        }
        let before = self
            .inner
            .acks
            .fetch_add(receipts.len() as u64, Ordering::Relaxed);
        if before / TRIM_EVERY != (before + receipts.len() as u64) / TRIM_EVERY {
            for queue in fresh.keys().chain(late.keys()) {
                let this = self.clone();
                let stream = self.stream_key(queue);
                tokio::spawn(async move { this.trim(stream).await });
            }
        }
        match lost_in {
            Some(queue) => Err(BrokerError::LeaseLost { queue }),
            None => Ok(()),
        }
    }

    async fn release(&self, receipts: &[Receipt]) -> Result<(), BrokerError> {
        self.give_back(receipts, false).await
    }

    /// Re-adds the entries like [`release`](Broker::release), with this hand-out's count undone
    /// in the carried redelivery count.
    async fn release_uncounted(&self, deliveries: Vec<Delivery>) -> Result<(), BrokerError> {
        let receipts: Vec<Receipt> = deliveries.into_iter().map(|d| d.receipt).collect();
        self.give_back(&receipts, true).await
    }

    async fn extend_lease(&self, receipt: &Receipt, _lease: Duration) -> Result<(), BrokerError> {
        let lost = || BrokerError::LeaseLost {
            queue: receipt.queue().to_string(),
        };
        let token = receipt.token::<Token>().ok_or_else(lost)?;
        let mut c = self.conn()?;
        let ok: i64 = scripts::EXTEND
            .key(self.stream_key(receipt.queue()))
            .arg(GROUP)
            .arg(&self.inner.consumer)
            .arg(&token.id)
            .invoke_async(&mut c)
            .await
            .map_err(err)?;
        if ok == 1 {
            Ok(())
        } else {
            Err(lost())
        }
    }

    /// `XRANGE` after the group's last-delivered id (the ready entries, in delivery order), then
    /// the group's pending entries (`XPENDING`, each read by `XRANGE id id`). Acked entries not
    /// yet trimmed are neither, so they never show.
    async fn browse(&self, queue: &str, max: usize) -> Result<Vec<Envelope>, BrokerError> {
        let stream = self.stream_key(queue);
        let mut c = self.conn()?;
        let groups: Value = match redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(&stream)
            .query_async(&mut c)
            .await
        {
            Ok(v) => v,
            Err(e) if e.to_string().contains("no such key") => return Ok(Vec::new()),
            Err(e) => return Err(err(e)),
        };
        let row = parse::group_row(&groups, GROUP);
        let last = row
            .and_then(|r| parse::info_field(r, "last-delivered-id"))
            .and_then(parse::string)
            .unwrap_or_else(|| "0-0".into());
        let ready: Value = redis::cmd("XRANGE")
            .arg(&stream)
            .arg(format!("({last}"))
            .arg("+")
            .arg("COUNT")
            .arg(max.clamp(1, 1 << 40))
            .query_async(&mut c)
            .await
            .map_err(err)?;
        let mut found = parse::entries(ready);
        if found.len() < max && row.is_some() {
            let pending: Value = redis::cmd("XPENDING")
                .arg(&stream)
                .arg(GROUP)
                .arg("-")
                .arg("+")
                .arg((max - found.len()).min(1 << 40))
                .query_async(&mut c)
                .await
                .map_err(err)?;
            let ids = parse::pending_ids(&pending);
            if !ids.is_empty() {
                let mut pipe = redis::pipe();
                for id in &ids {
                    pipe.cmd("XRANGE").arg(&stream).arg(id).arg(id);
                }
                let each: Vec<Value> = pipe.query_async(&mut c).await.map_err(err)?;
                found.extend(each.into_iter().flat_map(parse::entries));
            }
        }
        Ok(found
            .into_iter()
            .take(max)
            .map(|e| format::decode(&e.id, e.fields).0)
            .collect())
    }

    async fn depth(&self, queue: &str) -> Result<Depth, BrokerError> {
        let stream = self.stream_key(queue);
        let delayed_key = format!("{}{queue}", self.delay_queue_prefix());
        let (groups, xlen, delayed): (Value, u64, u64) = self
            .with_group(&stream, |mut c| {
                let (stream, delayed_key) = (stream.clone(), delayed_key.clone());
                async move {
                    redis::pipe()
                        .cmd("XINFO")
                        .arg("GROUPS")
                        .arg(&stream)
                        .cmd("XLEN")
                        .arg(&stream)
                        .cmd("ZCARD")
                        .arg(&delayed_key)
                        .query_async(&mut c)
                        .await
                }
            })
            .await
            .or_else(|e| match e {
                // No stream yet: nothing is there.
                BrokerError::Other { ref message, .. } if message.contains("no such key") => {
                    Ok((Value::Array(vec![]), 0, 0))
                }
                e => Err(e),
            })?;
        let row = parse::group_row(&groups, GROUP);
        let pending = row
            .and_then(|r| parse::info_field(r, "pending"))
            .and_then(parse::int)
            .unwrap_or(0)
            .max(0) as u64;
        let lag = row
            .and_then(|r| parse::info_field(r, "lag"))
            .and_then(parse::int);
        let ready = match lag {
            Some(l) if l >= 0 => l as u64,
            _ => xlen.saturating_sub(pending),
        };
        let mut oldest_age = None;
        if ready > 0 {
            let last = row
                .and_then(|r| parse::info_field(r, "last-delivered-id"))
                .and_then(parse::string)
                .unwrap_or_else(|| "0-0".into());
            let mut c = self.conn()?;
            let next: Value = redis::cmd("XRANGE")
                .arg(&stream)
                .arg(format!("({last}"))
                .arg("+")
                .arg("COUNT")
                .arg(1)
                .query_async(&mut c)
                .await
                .map_err(err)?;
            oldest_age = parse::entries(next)
                .first()
                .and_then(|e| parse::id_millis(&e.id))
                .map(|ms| Duration::from_millis(to_millis(SystemTime::now()).saturating_sub(ms)));
        }
        Ok(Depth {
            ready,
            in_flight: pending,
            delayed: Some(delayed),
            oldest_age,
        })
    }

    fn delay_store(&self) -> Option<Arc<dyn DelayStore>> {
        Some(Arc::new(RedisDelayStore {
            broker: self.clone(),
        }))
    }

    async fn close(&self) -> Result<(), BrokerError> {
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let streams: Vec<String> = self
            .inner
            .last_reclaim
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        let mut c = self.inner.conn.clone();
        for s in streams {
            let _: Result<i64, _> = scripts::FORGET_CONSUMER
                .key(&s)
                .key(self.lease_key(&s))
                .arg(GROUP)
                .arg(&self.inner.consumer)
                .invoke_async(&mut c)
                .await;
        }
        Ok(())
    }
}

/// The durable delay store on Redis: a global sorted set (score = due time in ms) for promotion,
/// one sorted set per queue for counting, and one hash per message holding its stream fields.
#[derive(Clone, Debug)]
pub struct RedisDelayStore {
    broker: RedisBroker,
}

#[async_trait]
impl DelayStore for RedisDelayStore {
    async fn schedule(&self, queue: &str, messages: Vec<Envelope>) -> Result<(), BrokerError> {
        let b = &self.broker;
        b.inner.caps.check_payloads(&messages, "redis")?;
        let (global, per_queue, msg_prefix) = (
            b.delay_key(),
            format!("{}{queue}", b.delay_queue_prefix()),
            b.delay_msg_prefix(),
        );
        let stream = b.stream_key(queue);
        let mut pipe = redis::pipe();
        pipe.atomic();
        for env in &messages {
            let due = env.not_before.map(to_millis).unwrap_or(0);
            let member = format!("{}:{}", env.id, env.attempt);
            let (meta, body) = format::encode(env);
            pipe.cmd("HSET")
                .arg(format!("{msg_prefix}{member}"))
                .arg("_stream")
                .arg(&stream)
                .arg("_queue")
                .arg(queue)
                .arg(meta)
                .arg(body.as_ref())
                .ignore();
            pipe.cmd("ZADD").arg(&global).arg(due).arg(&member).ignore();
            pipe.cmd("ZADD")
                .arg(&per_queue)
                .arg(due)
                .arg(&member)
                .ignore();
        }
        let mut c = b.conn()?;
        pipe.query_async::<()>(&mut c).await.map_err(err)
    }

    async fn promote_due(&self, now: SystemTime, limit: usize) -> Result<usize, BrokerError> {
        let b = &self.broker;
        let mut c = b.conn()?;
        let n: i64 = scripts::PROMOTE
            .key(b.delay_key())
            .arg(to_millis(now))
            .arg(limit.max(1))
            .arg(b.delay_msg_prefix())
            .arg(b.delay_queue_prefix())
            .invoke_async(&mut c)
            .await
            .map_err(err)?;
        Ok(n.max(0) as usize)
    }

    async fn delayed(&self, queue: &str) -> Result<u64, BrokerError> {
        let b = &self.broker;
        let mut c = b.conn()?;
        redis::cmd("ZCARD")
            .arg(format!("{}{queue}", b.delay_queue_prefix()))
            .query_async(&mut c)
            .await
            .map_err(err)
    }

    async fn next_due(&self) -> Result<Option<SystemTime>, BrokerError> {
        let b = &self.broker;
        let mut c = b.conn()?;
        let v: Vec<(String, f64)> = redis::cmd("ZRANGE")
            .arg(b.delay_key())
            .arg(0)
            .arg(0)
            .arg("WITHSCORES")
            .query_async(&mut c)
            .await
            .map_err(err)?;
        Ok(v.first()
            .map(|(_, s)| stevedore_core::from_millis(*s as u64)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_password() {
        assert_eq!(
            redact("redis://:secret@localhost:6379/0"),
            "redis://***@localhost:6379/0"
        );
        assert_eq!(redact("redis://localhost:6379"), "redis://localhost:6379");
    }
}

/// Entry points for the fuzz targets in `fuzz/` (the `fuzzing` feature; not an API): the
/// decoder of a stream entry as Redis hands it back, and the encoder it must round-trip with.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing {
    use stevedore_core::Envelope;

    /// [`format::decode`](crate::format) of one entry: its envelope and redelivery count.
    pub fn decode(entry_id: &str, fields: Vec<(Vec<u8>, Vec<u8>)>) -> (Envelope, u32) {
        crate::format::decode(entry_id, fields)
    }

    /// The one field (name, value) an envelope is written as.
    pub fn encode(env: &Envelope) -> (Vec<u8>, Vec<u8>) {
        let (name, body) = crate::format::encode(env);
        (name, body.to_vec())
    }
}
