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
//! | delay | [`DelayStore`]: per queue, a sorted set scored by due time + a hash per message, promoted by an atomic Lua script in bounded batches |
//!
//! Reconnects on its own (a `ConnectionManager` for commands, fresh connections for blocking reads),
//! re-creates a missing group ("NOGROUP" after a Redis restart without persistence), and warns at
//! start-up when Redis keeps nothing on disk.
//!
//! ## Keys, and Redis Cluster
//!
//! With [`RedisConfig::cluster`] the backend talks to a Redis Cluster (any of its nodes as seeds;
//! the client follows `MOVED`/`ASK` and a failover). Every key of a physical queue shares the
//! stream's slot, so each script and pipeline stays on one node: the queue's companion keys carry
//! the stream key as a hash tag.
//!
//! | key | holds |
//! |---|---|
//! | `<prefix><queue>` | the stream |
//! | `<prefix>stevedore:leases:{<prefix><queue>}` | each consumer's lease |
//! | `<prefix>stevedore:due:{<prefix><queue>}` | delayed messages by due time |
//! | `<prefix>stevedore:job:{<prefix><queue>}:<id>:<attempt>` | one delayed message's fields |
//! | `<prefix>stevedore:due-index` | the queues that have delayed messages, each scored no later than its earliest (the promoter visits those due) |
//!
//! A prefix with a hash tag of its own (`{app}:`) puts every key in that one slot (the braces
//! then are not added).
//!
//! Upgrading from the layout before this one: delayed messages it wrote (one global
//! `stevedore:delayed` set) are still counted and promoted on a single server, so none is lost;
//! deploy the new version to every worker (an older worker does not promote the new sets). The
//! lease hash was `stevedore:leases:<stream>`: the old hashes are no longer read (a worker
//! registers its lease again within a quarter of it) and may be deleted.

mod conn;
mod factory;
mod format;
mod parse;
mod scripts;
mod store;

pub use factory::RedisFactory;
pub use store::{RedisStore, RedisStoreFactory};

use async_trait::async_trait;
use conn::{Conn, Connector};
use parse::Entry;
use redis::{RedisError, Value};
use std::borrow::Cow;
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
    /// Whether `url` is a Redis Cluster: then `url` may name several nodes, separated by
    /// commas (any reachable one is enough to find the rest; name more than one so a start
    /// succeeds while one is down). Default false. A `key_prefix` on a cluster has either no
    /// brace or a complete hash tag (`{app}:`).
    pub cluster: bool,
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
            cluster: false,
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
    connector: Connector,
    conn: Conn,
    blocking: Mutex<Vec<Conn>>,
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

/// `url` with each password hidden (each node of a comma-separated cluster list on its own).
fn redact(url: &str) -> String {
    stevedore_core::factory::url_list(url, conn::SCHEMES)
        .into_iter()
        .map(|url| match (url.find("://"), url.rfind('@')) {
            (Some(s), Some(at)) if at > s => format!("{}***{}", &url[..s + 3], &url[at..]),
            _ => url.to_string(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn err(e: RedisError) -> BrokerError {
    let transient_code = matches!(
        e.code(),
        Some("LOADING" | "BUSY" | "TRYAGAIN" | "MASTERDOWN" | "READONLY" | "CLUSTERDOWN")
    );
    // A cluster moving a slot or electing a master (MOVED/ASK/TRYAGAIN/CLUSTERDOWN left after
    // the client's own retries, or no connection to the slot's node yet) is transient too.
    if e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.is_cluster_error()
        || e.kind() == redis::ErrorKind::ClusterConnectionNotFound
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
    /// On a cluster ([`RedisConfig::cluster`]) it reads the cluster's slot map from the first
    /// seed node that answers.
    pub async fn connect(config: RedisConfig) -> Result<Self, BrokerError> {
        let url_redacted = redact(&config.url);
        if config.cluster {
            conn::check_cluster_prefix(&config.key_prefix).map_err(BrokerError::permanent)?;
        }
        let connector = Connector::new(&config)?;
        let conn = connector.commands().await.map_err(|e| {
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
                connector,
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

    /// The stream key as it appears in its companion keys' names: itself when it has a hash tag
    /// (from the prefix), else wrapped in braces. Either way a companion key hashes to the
    /// stream's cluster slot.
    fn slot_tag(stream: &str) -> Cow<'_, str> {
        if conn::has_hash_tag(stream) {
            Cow::Borrowed(stream)
        } else {
            Cow::Owned(format!("{{{stream}}}"))
        }
    }

    /// The sorted set of `stream`'s delayed messages, scored by due time (Unix ms).
    fn due_key(&self, stream: &str) -> String {
        format!(
            "{}stevedore:due:{}",
            self.inner.prefix,
            Self::slot_tag(stream)
        )
    }

    /// The prefix of `stream`'s delayed messages' hashes (then `<id>:<attempt>`).
    fn job_prefix(&self, stream: &str) -> String {
        format!(
            "{}stevedore:job:{}:",
            self.inner.prefix,
            Self::slot_tag(stream)
        )
    }

    /// The delay index: a sorted set of the queues that have delayed messages, each scored no
    /// later than its earliest one (Unix ms), so a promotion pass visits only queues with
    /// something due.
    fn due_index_key(&self) -> String {
        format!("{}stevedore:due-index", self.inner.prefix)
    }

    /// Lowers `queue`'s score in the delay index to `due` (adds it if missing): `ZADD LT`.
    async fn index_lower(&self, c: &mut Conn, queue: &str, due: u64) -> Result<(), BrokerError> {
        let _: i64 = redis::cmd("ZADD")
            .arg(self.due_index_key())
            .arg("LT")
            .arg(due)
            .arg(queue)
            .query_async(c)
            .await
            .map_err(err)?;
        Ok(())
    }

    /// Sets `queue`'s score in the delay index to `next` (its earliest delayed message after a
    /// promotion, or none: removed), then reads the queue's delay set again and lowers the score
    /// to what is there, so a message scheduled meanwhile (whose own lowering this may have
    /// overwritten) is not missed.
    async fn index_reset(
        &self,
        c: &mut Conn,
        queue: &str,
        due_key: &str,
        next: Option<u64>,
    ) -> Result<(), BrokerError> {
        let mut cmd = redis::cmd(if next.is_some() { "ZADD" } else { "ZREM" });
        cmd.arg(self.due_index_key());
        if let Some(t) = next {
            cmd.arg(t);
        }
        let _: i64 = cmd.arg(queue).query_async(c).await.map_err(err)?;
        let first: Vec<(String, f64)> = first_of(due_key).query_async(c).await.map_err(err)?;
        match score_ms(&first) {
            Some(t) if next.is_none_or(|n| t < n) => self.index_lower(c, queue, t).await,
            _ => Ok(()),
        }
    }

    /// Keys of the delay layout before per-queue sets (one server only): the global set, and
    /// the prefixes of the per-queue counting sets and of the message hashes.
    fn legacy_delay_keys(&self) -> (String, String, String) {
        let p = &self.inner.prefix;
        (
            format!("{p}stevedore:delayed"),
            format!("{p}stevedore:delayed:q:"),
            format!("{p}stevedore:delayed:m:"),
        )
    }

    fn conn(&self) -> Result<Conn, BrokerError> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(BrokerError::Closed);
        }
        Ok(self.inner.conn.clone())
    }

    /// `CONFIG GET name` (on a cluster, of one node, taken as every node's).
    async fn config_get(&self, name: &str) -> Option<String> {
        let mut cmd = redis::cmd("CONFIG");
        cmd.arg("GET").arg(name);
        let reply: Value = match self.conn().ok()? {
            Conn::Cluster(mut c) => {
                use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
                c.route_command(cmd, RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random))
                    .await
                    .ok()?
            }
            mut c => cmd.query_async(&mut c).await.ok()?,
        };
        let pair: Vec<String> = redis::from_redis_value(reply).ok()?;
        pair.into_iter().nth(1)
    }

    async fn warn_if_not_persistent(&self) {
        let aof = self.config_get("appendonly").await;
        let save = self.config_get("save").await;
        if let (Some(aof), Some(save)) = (aof, save) {
            let aof_on = aof == "yes";
            let save_on = !save.trim().is_empty();
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
        F: Fn(Conn) -> Fut,
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

    async fn blocking_conn(&self) -> Result<Conn, BrokerError> {
        let pooled = self
            .inner
            .blocking
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop();
        if let Some(c) = pooled {
            return Ok(c);
        }
        self.inner.connector.blocking().await.map_err(|e| {
            BrokerError::Connection(format!(
                "cannot connect to {}: {e}",
                self.inner.url_redacted
            ))
        })
    }

    fn return_blocking(&self, c: Conn) {
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
        format!(
            "{}stevedore:leases:{}",
            self.inner.prefix,
            Self::slot_tag(stream)
        )
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

    /// Creates each queue's group, and puts each queue with delayed messages in the delay index
    /// (which a lost index key would otherwise leave unpromoted).
    async fn prepare(&self, queues: &[String]) -> Result<(), BrokerError> {
        for q in queues {
            let stream = self.stream_key(q);
            self.ensure_group(&stream).await?;
            let mut c = self.conn()?;
            let first: Vec<(String, f64)> = first_of(&self.due_key(&stream))
                .query_async(&mut c)
                .await
                .map_err(err)?;
            if let Some(t) = score_ms(&first) {
                self.index_lower(&mut c, q, t).await?;
            }
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
            // One round trip for every queue on one server; on a cluster, one per queue (a
            // pipeline keeps to one slot).
            let cluster = self.inner.connector.is_cluster();
            let mut pipe = redis::pipe();
            for (queue, ids) in &fresh {
                pipe.cmd("XACK")
                    .arg(self.stream_key(queue))
                    .arg(GROUP)
                    .arg(ids)
                    .ignore();
                if cluster {
                    let mut c = self.conn()?;
                    pipe.query_async::<()>(&mut c).await.map_err(err)?;
                    pipe = redis::pipe();
                }
            }
            if !cluster {
                let mut c = self.conn()?;
                pipe.query_async::<()>(&mut c).await.map_err(err)?;
            }
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
        let delayed_key = self.due_key(&stream);
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
        let legacy = self.legacy_delayed(queue).await?;
        Ok(Depth {
            ready,
            in_flight: pending,
            delayed: Some(delayed + legacy),
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

/// The durable delay store on Redis: per physical queue, a sorted set of its delayed messages
/// (score = due time in ms) and one hash per message holding its stream fields, all in the
/// stream's cluster slot; plus a set naming the queues that have one, which the promoter walks.
#[derive(Clone, Debug)]
pub struct RedisDelayStore {
    broker: RedisBroker,
}

impl RedisBroker {
    /// Messages waiting in the delay layout of versions before per-queue sets (one server only;
    /// 0 on a cluster).
    async fn legacy_delayed(&self, queue: &str) -> Result<u64, BrokerError> {
        if self.inner.connector.is_cluster() {
            return Ok(0);
        }
        let (_, per_queue, _) = self.legacy_delay_keys();
        let mut c = self.conn()?;
        redis::cmd("ZCARD")
            .arg(format!("{per_queue}{queue}"))
            .query_async(&mut c)
            .await
            .map_err(err)
    }

    /// Promotes from the delay layout of versions before per-queue sets, while it holds anything
    /// (one server only). Returns how many moved.
    async fn promote_legacy(&self, now: SystemTime, limit: usize) -> Result<usize, BrokerError> {
        if self.inner.connector.is_cluster() {
            return Ok(0);
        }
        let (global, per_queue, msgs) = self.legacy_delay_keys();
        let mut c = self.conn()?;
        let exists: bool = redis::cmd("EXISTS")
            .arg(&global)
            .query_async(&mut c)
            .await
            .map_err(err)?;
        if !exists {
            return Ok(0);
        }
        let n: i64 = scripts::PROMOTE_LEGACY
            .key(&global)
            .arg(to_millis(now))
            .arg(limit.max(1))
            .arg(msgs)
            .arg(per_queue)
            .invoke_async(&mut c)
            .await
            .map_err(err)?;
        Ok(n.max(0) as usize)
    }
}

/// `ZRANGE key 0 0 WITHSCORES`: a sorted set's first member with its score.
fn first_of(key: &str) -> redis::Cmd {
    let mut cmd = redis::cmd("ZRANGE");
    cmd.arg(key).arg(0).arg(0).arg("WITHSCORES");
    cmd
}

/// The score (ms) of what [`first_of`] read.
fn score_ms(first: &[(String, f64)]) -> Option<u64> {
    first.first().map(|(_, s)| *s as u64)
}

/// Most queues one promotion pass visits.
const INDEX_BATCH: usize = 64;

/// How long a queue whose promotion failed waits before it is tried again.
const BROKEN_BACKOFF: Duration = Duration::from_secs(5);

impl RedisDelayStore {
    /// Promotes up to `want` due messages of `queue`, then resets its score in the delay index.
    async fn promote_queue(
        &self,
        c: &mut Conn,
        queue: &str,
        now_ms: u64,
        want: usize,
    ) -> Result<usize, BrokerError> {
        let b = &self.broker;
        let stream = b.stream_key(queue);
        let due_key = b.due_key(&stream);
        let (members, first): (Vec<String>, Vec<(String, f64)>) = redis::pipe()
            .cmd("ZRANGEBYSCORE")
            .arg(&due_key)
            .arg("-inf")
            .arg(now_ms)
            .arg("LIMIT")
            .arg(0)
            .arg(want.max(1))
            .add_command(first_of(&due_key))
            .query_async(c)
            .await
            .map_err(err)?;
        let mut moved = 0;
        let mut next = score_ms(&first);
        if !members.is_empty() {
            let prefix = b.job_prefix(&stream);
            let mut call = scripts::PROMOTE.key(&due_key);
            call.key(&stream);
            for m in &members {
                call.key(format!("{prefix}{m}"));
            }
            call.arg(now_ms).arg(&members);
            let (n, left): (i64, i64) = call.invoke_async(c).await.map_err(err)?;
            moved = n.max(0) as usize;
            next = u64::try_from(left).ok();
        }
        b.index_reset(c, queue, &due_key, next).await?;
        Ok(moved)
    }
}

#[async_trait]
impl DelayStore for RedisDelayStore {
    async fn schedule(&self, queue: &str, messages: Vec<Envelope>) -> Result<(), BrokerError> {
        let b = &self.broker;
        b.inner.caps.check_payloads(&messages, "redis")?;
        if messages.is_empty() {
            return Ok(());
        }
        let stream = b.stream_key(queue);
        let (due_key, job_prefix) = (b.due_key(&stream), b.job_prefix(&stream));
        let earliest = messages
            .iter()
            .map(|e| e.not_before.map(to_millis).unwrap_or(0))
            .min()
            .unwrap_or(0);
        let mut c = b.conn()?;
        // The index is in another slot, so it cannot share the transaction below: lowered first
        // (so a crash between the two leaves the promoter a visit too many, never a message it
        // does not know of), and again after (a promoter may have reset it in between).
        b.index_lower(&mut c, queue, earliest).await?;
        let mut pipe = redis::pipe();
        pipe.atomic();
        for env in &messages {
            let due = env.not_before.map(to_millis).unwrap_or(0);
            let member = format!("{}:{}", env.id, env.attempt);
            let (meta, body) = format::encode(env);
            pipe.cmd("HSET")
                .arg(format!("{job_prefix}{member}"))
                .arg(meta)
                .arg(body.as_ref())
                .ignore();
            pipe.cmd("ZADD")
                .arg(&due_key)
                .arg(due)
                .arg(&member)
                .ignore();
        }
        pipe.query_async::<()>(&mut c).await.map_err(err)?;
        b.index_lower(&mut c, queue, earliest).await
    }

    /// Visits the queues the delay index says have something due (at most [`INDEX_BATCH`] a
    /// call), promoting each one's due messages with one script on the stream's node, until
    /// `limit` moved. A queue that fails is logged, and its index score put [`BROKEN_BACKOFF`]
    /// ahead, so it neither stops the others nor keeps the promoter busy; the call fails only
    /// when the index cannot be read.
    async fn promote_due(&self, now: SystemTime, limit: usize) -> Result<usize, BrokerError> {
        let b = &self.broker;
        let mut moved = b.promote_legacy(now, limit).await?;
        let now_ms = to_millis(now);
        let mut c = b.conn()?;
        let queues: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(b.due_index_key())
            .arg("-inf")
            .arg(now_ms)
            .arg("LIMIT")
            .arg(0)
            .arg(INDEX_BATCH)
            .query_async(&mut c)
            .await
            .map_err(err)?;
        for queue in &queues {
            if moved >= limit {
                break;
            }
            match self
                .promote_queue(&mut c, queue, now_ms, limit - moved)
                .await
            {
                Ok(n) => moved += n,
                Err(e) => {
                    tracing::warn!(queue = %queue, error = %e, "promoting this queue's delayed messages failed; the others go on, this one is tried again in {BROKEN_BACKOFF:?}");
                    let later = now_ms + BROKEN_BACKOFF.as_millis() as u64;
                    let _: Result<i64, _> = redis::cmd("ZADD")
                        .arg(b.due_index_key())
                        .arg("XX")
                        .arg("GT")
                        .arg(later)
                        .arg(queue)
                        .query_async(&mut c)
                        .await;
                }
            }
        }
        Ok(moved)
    }

    async fn delayed(&self, queue: &str) -> Result<u64, BrokerError> {
        let b = &self.broker;
        let mut c = b.conn()?;
        let n: u64 = redis::cmd("ZCARD")
            .arg(b.due_key(&b.stream_key(queue)))
            .query_async(&mut c)
            .await
            .map_err(err)?;
        Ok(n + b.legacy_delayed(queue).await?)
    }

    /// The lowest score of the delay index (each queue's is no later than its earliest delayed
    /// message), and on one server the earliest of the layout before it.
    async fn next_due(&self) -> Result<Option<SystemTime>, BrokerError> {
        let b = &self.broker;
        let mut c = b.conn()?;
        let first: Vec<(String, f64)> = first_of(&b.due_index_key())
            .query_async(&mut c)
            .await
            .map_err(err)?;
        let mut next = score_ms(&first);
        if !b.inner.connector.is_cluster() {
            let legacy: Vec<(String, f64)> = first_of(&b.legacy_delay_keys().0)
                .query_async(&mut c)
                .await
                .map_err(err)?;
            next = match (next, score_ms(&legacy)) {
                (Some(a), Some(l)) => Some(a.min(l)),
                (a, l) => a.or(l),
            };
        }
        Ok(next.map(stevedore_core::from_millis))
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
        assert_eq!(
            redact("redis://:a@h1:1,redis://h2:2,redis://u:b@h3:3"),
            "redis://***@h1:1,redis://h2:2,redis://***@h3:3"
        );
        // A comma inside a password does not split the URL.
        assert_eq!(redact("redis://:p,w@h:1/0"), "redis://***@h:1/0");
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
