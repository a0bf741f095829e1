//! Kafka backend for Stevedore (`broker.kind = "kafka"`), through rdkafka with librdkafka built
//! from its bundled sources and linked statically.
//!
//! Kafka has no per-message ack, no redelivery count and no delay. This backend gives the
//! runtime the same contract as every other broker as follows:
//!
//! | Stevedore | Kafka |
//! |---|---|
//! | physical queue (each priority level, the dead letters) | one topic `key_prefix` + name, `partitions` partitions, created idempotently |
//! | consumers of a queue | one consumer group per physical queue (`group_prefix` + name); each handle is one member |
//! | lease | the group session: a record stays with its partition's owner until acked or released; a rebalance or a dead member returns it (`LeaseSupport::Session`) |
//! | receive | records fetched by a background thread per topic, each partition through its own librdkafka queue (the thread polls the group all the time, so a long job never trips `max.poll.interval.ms`; a partition with enough fetched records waiting is simply not read from, and librdkafka's bounded prefetch stops fetching it: nothing is buffered without bound, nothing fetched twice) |
//! | per-key order | key = the job key, so a key lives in one partition; within it, a record is not handed out while an earlier one of its key is out (records without a key flow freely) |
//! | ack | per record: the group's committed offset is the lowest unsettled offset of the partition; the acked offsets above it are kept in the partition's checkpoint |
//! | release | the record is ready again at once, for this partition's owner, before the later records of its key |
//! | delivery count | the checkpoint keeps each unsettled offset's hand-out count and a reservation: first hand-outs are made durable ahead, 1,000 offsets per partition at a time (written in the background before they are needed), a record handed out again waits for its own count, so a record that kills its worker every time still reaches `max_attempts`; after a crash, unsettled records of the reservation count one delivery more (as SQS counts every message of a received batch), after a clean hand-over none |
//! | checkpoint | the last record of partition *p* of a compacted companion topic `<topic>.state` (one record per produce request, so every Kafka-protocol broker's high watermark finds it), read by the partition's next owner |
//! | depth | ready = the group's lag minus what this handle holds, in flight = what this handle holds, delayed = the delay-topic group's lag |
//! | delay, retry backoff | tiered delay topics per queue (see the `delay` module): a record waits in a paused partition until it is due to leave its tier, never in worker memory, and moves on at or after its due time |
//! | rebalance | cooperative (incremental): only the partitions that change hands are revoked; their held records get `drain` to be acked, then their receipts answer `LeaseLost` |
//!
//! Why a checkpoint topic and not the commit's metadata (what Confluent's parallel consumer
//! uses): some Kafka-protocol brokers drop offset-commit metadata (tansu, measured here), and a
//! commit's metadata is limited to `offset.metadata.max.bytes` (4 KiB by default); a record in a
//! topic of our own works everywhere and is bounded only by the message size.
//!
//! Kafka 4.2+ share groups (KIP-932) have per-record acquire/release/accept and a broker-side
//! delivery count, which would map onto the trait directly (receive = acquire with a lock
//! duration as a timed lease, release = release, ack = accept, dead-lettering = reject) and
//! would lift the partition-ownership limits below. rdkafka has no share consumer yet.
//!
//! Limits of the group model, stated: a released record comes back to its partition's owner,
//! not to any member; no more members get work than the topic has partitions.

mod delay;
mod factory;
mod window;

pub use factory::KafkaFactory;

use async_trait::async_trait;
use delay::KafkaDelayStore;
use rdkafka::admin::AdminClient;
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    base_consumer::PartitionQueue, BaseConsumer, CommitMode, Consumer, ConsumerContext,
    RebalanceProtocol,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};
use stevedore_core::{
    wire, Broker, BrokerError, Capabilities, DelayStore, DelaySupport, Delivery, Depth, Envelope,
    LeaseSupport, OrderingSupport, Receipt, ReceiveOptions, Sharing,
};
use window::{Checkpoint, Keyed, Window};

/// librdkafka's and many brokers' limit is 1,000,000 bytes per record batch, so the default
/// leaves 64 KiB of that to headers, key and framing.
pub const DEFAULT_MAX_PAYLOAD: usize = 1_000_000 - 64 * 1024;

/// Longest a new member's first receive waits to be given its partitions.
const JOIN_WAIT: Duration = Duration::from_secs(30);

/// How long an empty receive waits more for records the broker holds but the fetcher has not
/// brought yet.
const CATCH_UP: Duration = Duration::from_secs(1);

/// Longest an empty receive spends asking the broker whether records are on their way.
const BEHIND_TIMEOUT: Duration = Duration::from_millis(500);

/// Fetched records a partition may hold waiting in its window before the fetch thread stops
/// reading its librdkafka queue; it reads again once receive has taken half of them (1,000:
/// the same rate as 4,000 at a 1M backlog, 5 MiB less peak RSS). Nothing is
/// paused: librdkafka stops fetching a partition whose queue holds `queued.min.messages` (or
/// `queued.max.messages.kbytes`), and its prefetch is the buffer. (Pausing made librdkafka drop
/// that prefetch and fetch it again on resume: a backlog drained at 13–100k jobs/s depending on
/// how often it paused.)
const READY_CAP: usize = 1000;

/// librdkafka's prefetch per partition, in records, unless the config sets `queued.min.messages`
/// (librdkafka: 100,000, which held a 1M backlog's first 400k records in a worker of 260 MiB;
/// bench on nisshi, 1M backlog, 4 partitions: 260 MiB peak RSS at 100,000, 78 MiB with these
/// two, at the same or a better rate). Fetching resumes 10 ms after the queue drains below it
/// (`fetch.queue.backoff.ms`; librdkafka's 1 s stalled the worker: 2,000 and 10,000 ran at
/// 28–76k jobs/s with it, 10,000 at 87–114k without).
const PREFETCH: &str = "10000";

/// The same in KiB of fetched data per partition, unless the config sets
/// `queued.max.messages.kbytes` (librdkafka: 64 MiB).
const PREFETCH_KIB: &str = "4096";

/// Most bytes one fetch asks of a partition, unless the config sets `max.partition.fetch.bytes`
/// (librdkafka: 1 MiB). Smaller fetches keep a backlogged partition's queue topped up in steps
/// the worker drains between them: bench on nisshi, 1M backlog, 4 partitions, two alternating
/// runs each: 205–240k jobs/s at 256 KiB, 187–204k at 1 MiB, the same peak RSS. A record
/// larger than this is still fetched (alone).
const FETCH_BYTES: &str = "262144";

/// `properties` as logs may show them: values of keys naming a password, secret or key are
/// replaced.
fn redacted(props: &BTreeMap<String, String>) -> BTreeMap<&str, &str> {
    props
        .iter()
        .map(|(k, v)| {
            let secret = ["password", "secret", "key", "token", "jaas"]
                .iter()
                .any(|w| k.contains(w));
            (k.as_str(), if secret { "<redacted>" } else { v.as_str() })
        })
        .collect()
}

impl std::fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaConfig")
            .field("bootstrap", &self.bootstrap)
            .field("key_prefix", &self.key_prefix)
            .field("group_prefix", &self.group_prefix)
            .field("partitions", &self.partitions)
            .field("replication", &self.replication)
            .field("max_payload", &self.max_payload)
            .field("session_timeout", &self.session_timeout)
            .field("drain", &self.drain)
            .field("timeout", &self.timeout)
            .field("properties", &redacted(&self.properties))
            .finish()
    }
}

/// Settings of one Kafka broker handle.
///
/// Thread safety: plain data. Its `Debug` form hides secret-looking properties.
#[derive(Clone)]
pub struct KafkaConfig {
    /// `bootstrap.servers`, e.g. `"127.0.0.1:9092"`.
    pub bootstrap: String,
    /// Prepended to every topic name.
    pub key_prefix: String,
    /// Prepended to every consumer group id (default: `key_prefix`).
    pub group_prefix: Option<String>,
    /// Partitions of each topic this backend creates.
    pub partitions: i32,
    /// Replication factor of each topic this backend creates (`-1`: the broker's default).
    pub replication: i32,
    /// Largest payload accepted at publish, in bytes.
    pub max_payload: usize,
    /// How long a member may go silent before the group gives its partitions to others (its
    /// held records come back then): `session.timeout.ms`.
    pub session_timeout: Duration,
    /// How long a revoked partition's held records get to be acked before they are given up
    /// (their receipts then answer `LeaseLost` and the partition's next owner runs them).
    pub drain: Duration,
    /// Longest any broker call may take.
    pub timeout: Duration,
    /// Extra librdkafka properties for every client (security, tuning), e.g.
    /// `security.protocol`.
    pub properties: BTreeMap<String, String>,
}

/// `socket.timeout.ms` (see [`KafkaConfig::client`]).
const SOCKET_TIMEOUT_MS: &str = "10000";

impl KafkaConfig {
    /// Defaults for `bootstrap`: 6 partitions, the broker's replication, a 10 s session.
    pub fn new(bootstrap: impl Into<String>) -> Self {
        KafkaConfig {
            bootstrap: bootstrap.into(),
            key_prefix: String::new(),
            group_prefix: None,
            partitions: 6,
            replication: -1,
            max_payload: DEFAULT_MAX_PAYLOAD,
            session_timeout: Duration::from_secs(10),
            drain: Duration::from_secs(2),
            timeout: Duration::from_secs(30),
            properties: BTreeMap::new(),
        }
    }

    fn client(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap);
        c.set(
            "log_level",
            if self.properties.contains_key("debug") {
                "7"
            } else {
                "3"
            },
        );
        for (k, v) in &self.properties {
            c.set(k, v);
        }
        c
    }

    /// [`KafkaConfig::client`] for a consumer: with this handle's session timeout (librdkafka
    /// refuses a `max.poll.interval.ms` below it, for group-less readers too).
    fn consumer_client(&self) -> ClientConfig {
        let mut c = self.client();
        // A consumer's request unanswered for 10 s (librdkafka's default: 60 s) fails and its
        // connection is torn down: a broker that stops answering without closing is noticed,
        // and left, that soon. Producers keep the default, longer than their request timeout
        // (a produce may wait on a slow follower). `properties` may set it otherwise.
        if !self.properties.contains_key("socket.timeout.ms") {
            c.set("socket.timeout.ms", SOCKET_TIMEOUT_MS);
        }
        c.set(
            "session.timeout.ms",
            self.session_timeout.as_millis().to_string(),
        );
        c.set(
            "heartbeat.interval.ms",
            (self.session_timeout.as_millis() / 4).max(100).to_string(),
        );
        c
    }

    fn topic(&self, physical: &str) -> String {
        format!("{}{physical}", self.key_prefix)
    }

    fn group(&self, physical: &str) -> String {
        format!(
            "{}{physical}",
            self.group_prefix.as_deref().unwrap_or(&self.key_prefix)
        )
    }
}

/// What this backend declares with `config`.
pub fn capabilities(config: &KafkaConfig) -> Capabilities {
    Capabilities {
        delay: DelaySupport::None,
        lease: LeaseSupport::Session { max: None },
        ordering: OrderingSupport::PerKey,
        max_payload: config.max_payload,
        max_batch: 500,
        durable: true,
        // In steady state a due record is at most ~1 s late (behind a later one in the 0 s delay
        // tier); when workers start or stop, the delay partitions they promote change hands like
        // any others, so the bound is the handoff plus that second.
        delay_tolerance: handoff(config) + Duration::from_secs(1),
        depth_staleness: Duration::from_secs(1),
        max_headers: None,
        shared: true,
        counts_deliveries: true,
        uncounted_release: true,
        // A member that dies is noticed after the session timeout, then every member drains its
        // revoked partitions before the new assignment.
        sharing: Sharing::Partitioned {
            handoff: handoff(config),
            partitions: u32::try_from(config.partitions.max(1)).unwrap_or(1),
        },
    }
}

/// How long a departed member's partitions take to reach the others, at most.
fn handoff(config: &KafkaConfig) -> Duration {
    config.session_timeout + config.drain + HANDOFF_SLACK
}

/// The rejoin round trips of a rebalance, beyond the session timeout and the drain.
const HANDOFF_SLACK: Duration = Duration::from_secs(3);

fn kafka_error(op: &str, topic: &str, e: &KafkaError) -> BrokerError {
    let text = format!("{op} {topic}: {e}");
    match e.rdkafka_error_code() {
        Some(
            RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::GroupAuthorizationFailed
            | RDKafkaErrorCode::ClusterAuthorizationFailed
            | RDKafkaErrorCode::SaslAuthenticationFailed
            | RDKafkaErrorCode::Authentication,
        ) => BrokerError::permanent(format!(
            "{text} (check broker.properties: security.protocol, sasl.*)"
        )),
        Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidTopic) => {
            BrokerError::permanent(text)
        }
        _ => BrokerError::transient(text),
    }
}

/// A fetched record, decoded.
#[derive(Debug, Clone)]
struct Rec {
    offset: i64,
    key: Option<String>,
    /// Shared with the copy kept while the record is out (for a release), so that copy costs
    /// no allocation under the partition's lock; a delivery gets its own envelope, made outside.
    envelope: Arc<Envelope>,
}

impl Keyed for Rec {
    fn offset(&self) -> i64 {
        self.offset
    }
    fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }
}

/// One assigned partition.
struct Part {
    window: Window<Rec>,
    /// Records out (with their hand-out count), for a release to put back.
    out: HashMap<i64, (Rec, u32)>,
    /// Changes on every assignment: receipts of an earlier one are lost.
    epoch: u64,
    /// The offset last committed to the group for this partition.
    committed: i64,
    /// Being revoked: nothing more is handed out while what is out drains.
    revoking: bool,
    /// The fetch thread stopped reading this partition's queue at [`READY_CAP`]: receive wakes
    /// it once half of that is taken.
    full: bool,
    /// Changed (handed out, acked) since its checkpoint was last written.
    unsaved: bool,
    /// The reservation of the last checkpoint written: a first hand-out below it needs no
    /// write (see [`RESERVE`]).
    durable_to: i64,
}

/// How many offsets a checkpoint reserves for first hand-outs beyond the highest one handed
/// out: a receive that stays below the last written reservation hands out at once, and one
/// that gets within half of it starts the next write in the background, so a backlog is
/// handed out without waiting on the broker. The price, after a crash only: up to this many
/// unsettled records per partition are counted as delivered once more than they were (the
/// window's module docs).
const RESERVE: i64 = 1000;

#[derive(Default)]
struct State {
    parts: BTreeMap<i32, Part>,
    closed: bool,
}

/// What receive and the fetch thread share for one topic.
struct Shared {
    topic: String,
    state_topic: String,
    state: Mutex<State>,
    /// Signalled when records arrive or a partition changes hands (for receive).
    arrived: tokio::sync::Notify,
    /// Signalled when a record is settled (for a revocation draining).
    settled: Condvar,
    epochs: AtomicU64,
    /// Set by the first assignment this member gets (possibly of no partitions).
    joined: AtomicBool,
    config: KafkaConfig,
    /// Writes checkpoints from the fetch thread (rebalances) and from receive/ack.
    state_producer: FutureProducer,
    /// The checkpoint writes shared by concurrent callers (see [`Shared::save`]).
    saves: Mutex<Saves>,
    /// Signalled when a checkpoint write ends.
    saved: tokio::sync::Notify,
    /// Reads checkpoints back (no group).
    reader: Mutex<BaseConsumer>,
    /// The fetch thread, once it runs: woken when a queue it reads from gets records or
    /// events, when receive makes room, and to stop.
    fetcher: OnceLock<std::thread::Thread>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes the fetch thread (a wake-up before it sleeps is kept: it does not sleep then).
    fn wake_fetcher(&self) {
        if let Some(t) = self.fetcher.get() {
            t.unpark();
        }
    }

    /// A librdkafka queue's non-empty callback that wakes the fetch thread (and holds no
    /// reference that would keep this consumer alive).
    fn waker(shared: &Arc<Shared>) -> impl Fn() + Send + Sync + 'static {
        let wake = Arc::downgrade(shared);
        move || {
            if let Some(s) = wake.upgrade() {
                s.wake_fetcher();
            }
        }
    }

    /// Reads partition `p`'s last checkpoint, if it has one this backend can read.
    fn read_checkpoint(&self, p: i32) -> Result<Option<Checkpoint>, KafkaError> {
        let reader = self.reader.lock().unwrap_or_else(|e| e.into_inner());
        let (low, high) = reader.fetch_watermarks(&self.state_topic, p, self.config.timeout)?;
        if high <= low {
            return Ok(None);
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.state_topic, p, Offset::Offset(high - 1))?;
        reader.assign(&tpl)?;
        let deadline = Instant::now() + self.config.timeout;
        while Instant::now() < deadline {
            match reader.poll(Duration::from_millis(200)) {
                Some(Ok(m)) if m.partition() == p && m.offset() == high - 1 => {
                    let text = m.payload().map(String::from_utf8_lossy);
                    return Ok(text.and_then(|t| Checkpoint::decode(&t)));
                }
                Some(Err(e)) => return Err(e),
                _ => {}
            }
        }
        Err(KafkaError::MessageConsumption(
            RDKafkaErrorCode::OperationTimedOut,
        ))
    }

    fn saves(&self) -> MutexGuard<'_, Saves> {
        self.saves.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes every change to this consumer's windows made before the call durable: writes the
    /// checkpoint of each partition marked unsaved. Concurrent callers share writes (group
    /// commit): one write is on its way at a time, and a caller waits for the first write that
    /// started after its call, so a write serves every receive and ack that came before it and a
    /// partition's checkpoints reach the broker in the order they were taken. Works on the
    /// runtime and, through [`block_on`], on the fetch thread.
    async fn save(&self) -> Result<(), BrokerError> {
        let ticket = {
            let mut s = self.saves();
            s.asked += 1;
            s.asked
        };
        loop {
            let ended = self.saved.notified();
            let mut ended = std::pin::pin!(ended);
            ended.as_mut().enable();
            let lead = {
                let mut s = self.saves();
                if s.saved >= ticket {
                    return Ok(());
                }
                if let Some((upto, e)) = &s.failed {
                    if *upto >= ticket {
                        return Err(BrokerError::transient(e.clone()));
                    }
                }
                if s.writing {
                    None
                } else {
                    s.writing = true;
                    Some(s.asked)
                }
            };
            let Some(covers) = lead else {
                ended.await;
                continue;
            };
            // This caller writes for everyone asking up to `covers`; the round reports how it
            // went when it ends (dropped unfinished too).
            let mut round = SaveRound {
                shared: self,
                covers,
                parts: Vec::new(),
                outcome: None,
            };
            round.outcome = Some(round.write().await);
        }
    }

    /// Waits until no checkpoint write is on its way (a revocation then writes the final
    /// checkpoints of partitions no later write can touch, so they land last).
    async fn no_write_on_its_way(&self) {
        loop {
            let ended = self.saved.notified();
            let mut ended = std::pin::pin!(ended);
            ended.as_mut().enable();
            if !self.saves().writing {
                return;
            }
            ended.await;
        }
    }

    /// Writes checkpoints of partitions, each as its own produce (see the crate docs), and
    /// waits for all. Runtime-agnostic (the fetch thread runs it through [`block_on`]).
    async fn write_checkpoints(&self, cps: &[(i32, String)]) -> Result<(), KafkaError> {
        let mut waits = Vec::with_capacity(cps.len());
        for (p, text) in cps {
            let key = p.to_string();
            let rec = FutureRecord::to(&self.state_topic)
                .partition(*p)
                .key(&key)
                .payload(text);
            match self.state_producer.send_result(rec) {
                Ok(w) => waits.push(w),
                Err((e, _)) => return Err(e),
            }
        }
        for w in waits {
            match w.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => return Err(e),
                Err(_) => return Err(KafkaError::Canceled),
            }
        }
        Ok(())
    }

    /// The same, from a thread outside the runtime (the fetch thread's rebalance callbacks).
    fn write_checkpoints_blocking(&self, cps: Vec<(i32, String)>) -> Result<(), KafkaError> {
        block_on(self.write_checkpoints(&cps))
    }
}

/// The state of [`Shared::save`]'s group commit.
#[derive(Default)]
struct Saves {
    /// Calls numbered so far.
    asked: u64,
    /// Every call up to this number is saved.
    saved: u64,
    /// The last failed write: the calls it served, and why.
    failed: Option<(u64, String)>,
    /// A write is on its way.
    writing: bool,
}

/// One checkpoint write of [`Shared::save`], for the calls up to `covers`. Its drop records the
/// outcome and wakes every waiter; a round that failed, or was dropped unfinished (its caller
/// gave up), leaves its partitions unsaved for the next write.
struct SaveRound<'a> {
    shared: &'a Shared,
    covers: u64,
    /// Partitions written: number, epoch, and the reservation written.
    parts: Vec<(i32, u64, i64)>,
    outcome: Option<Result<(), String>>,
}

impl SaveRound<'_> {
    /// Writes the checkpoint of every unsaved partition and waits for all.
    async fn write(&mut self) -> Result<(), String> {
        let shared = self.shared;
        let cps: Vec<(i32, String)> = {
            let mut st = shared.lock();
            let mut cps = Vec::new();
            for (p, part) in st.parts.iter_mut().filter(|(_, part)| part.unsaved) {
                part.unsaved = false;
                let cp = part.window.checkpoint();
                self.parts.push((*p, part.epoch, cp.upto));
                cps.push((*p, cp.encode()));
            }
            cps
        };
        shared
            .write_checkpoints(&cps)
            .await
            .map_err(|e| kafka_error("checkpoint", &shared.topic, &e).to_string())
    }
}

impl Drop for SaveRound<'_> {
    fn drop(&mut self) {
        let ok = matches!(self.outcome, Some(Ok(())));
        if !self.parts.is_empty() {
            let mut st = self.shared.lock();
            for (p, epoch, upto) in &self.parts {
                let Some(part) = st.parts.get_mut(p).filter(|part| part.epoch == *epoch) else {
                    continue;
                };
                if ok {
                    part.durable_to = part.durable_to.max(*upto);
                } else {
                    part.unsaved = true;
                }
            }
        }
        let mut s = self.shared.saves();
        s.writing = false;
        match self.outcome.take() {
            Some(Ok(())) => s.saved = s.saved.max(self.covers),
            Some(Err(e)) => s.failed = Some((self.covers, e)),
            // Unfinished: its callers wait on, and one of them writes.
            None => {}
        }
        drop(s);
        self.shared.saved.notify_waiters();
    }
}

/// Runs a future to completion on this (non-runtime) thread.
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    use std::task::{Context, Poll, Wake, Waker};
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut f = std::pin::pin!(f);
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park_timeout(Duration::from_millis(100));
    }
}

/// The fetch thread's client context: rebalances.
struct Ctx {
    shared: Weak<Shared>,
    /// The consumer itself, for splitting an assigned partition's queue off the group's queue.
    me: OnceLock<Weak<BaseConsumer<Ctx>>>,
    /// Partition queues split off or given up in a rebalance, for the fetch thread to take.
    changes: Mutex<Vec<QueueChange>>,
}

/// A partition's own queue, split off at its assignment or dropped at its revocation.
enum QueueChange {
    Split(i32, PartitionQueue<Ctx>),
    Gone(i32),
}

impl Ctx {
    fn changes(&self) -> MutexGuard<'_, Vec<QueueChange>> {
        self.changes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Gives each newly assigned partition its own queue (before it is assigned, so librdkafka
    /// never forwards its records to the group's queue), which wakes the fetch thread when
    /// records arrive on it. A partition that cannot be split keeps delivering through the
    /// group's queue, which the fetch thread reads too.
    fn split(&self, shared: &Arc<Shared>, assigned: &[i32]) {
        let Some(me) = self.me.get().and_then(Weak::upgrade) else {
            return;
        };
        let mut changes = self.changes();
        for p in assigned {
            match me.split_partition_queue(&shared.topic, *p) {
                Some(mut q) => {
                    q.set_nonempty_callback(Shared::waker(shared));
                    changes.push(QueueChange::Split(*p, q));
                }
                None => {
                    tracing::warn!(topic = %shared.topic, partition = p, "could not give the partition its own queue: it is read through the group's")
                }
            }
        }
    }
}

impl ClientContext for Ctx {
    /// librdkafka's error events (a broker that went away, requests that timed out): logged,
    /// so that a connection that stopped answering shows in the worker's log.
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        tracing::warn!(target: "librdkafka", %error, "{reason}");
    }

    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        use rdkafka::config::RDKafkaLogLevel as L;
        match level {
            L::Emerg | L::Alert | L::Critical | L::Error => {
                tracing::error!(target: "librdkafka", fac, "{log_message}")
            }
            L::Warning => tracing::warn!(target: "librdkafka", fac, "{log_message}"),
            L::Notice | L::Info => tracing::info!(target: "librdkafka", fac, "{log_message}"),
            L::Debug => tracing::debug!(target: "librdkafka", fac, "{log_message}"),
        }
    }
}

/// The partitions of `topic` in a rebalance's list.
fn partitions_of(topic: &str, tpl: &TopicPartitionList) -> Vec<i32> {
    tpl.elements_for_topic(topic)
        .iter()
        .map(|e| e.partition())
        .collect()
}

impl ConsumerContext for Ctx {
    /// Rebalances under the cooperative protocol (only the partitions that move are revoked, so
    /// a member joining or leaving never interrupts the others' held records) or the eager one
    /// (a `partition.assignment.strategy` of the user's choosing).
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let shared = self.shared.upgrade();
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                if let Some(shared) = &shared {
                    assign(shared, consumer, tpl);
                    self.split(shared, &partitions_of(&shared.topic, tpl));
                }
                let r = if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                };
                if let Some(shared) = &shared {
                    if let Err(e) = r {
                        tracing::warn!(topic = %shared.topic, error = %e, "taking the assigned partitions failed");
                    }
                    shared.joined.store(true, Ordering::Relaxed);
                    shared.arrived.notify_waiters();
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                if let Some(shared) = &shared {
                    let revoked = partitions_of(&shared.topic, tpl);
                    revoke(shared, consumer, &revoked);
                    self.changes()
                        .extend(revoked.into_iter().map(QueueChange::Gone));
                }
                let r = if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                };
                if let (Some(shared), Err(e)) = (&shared, r) {
                    tracing::warn!(topic = %shared.topic, error = %e, "giving up the revoked partitions failed");
                }
            }
            other => {
                let code: RDKafkaErrorCode = other.into();
                tracing::warn!(error = %code, "rebalance failed (the group retries)");
                let _ = consumer.unassign();
            }
        }
    }
}

/// Gives revoked partitions a moment to settle what is out, writes their checkpoints, commits,
/// and forgets them: their receipts answer `LeaseLost` from now on.
fn revoke(shared: &Shared, consumer: &BaseConsumer<Ctx>, revoked: &[i32]) {
    tracing::debug!(topic = %shared.topic, ?revoked, "revoking");
    let deadline = Instant::now() + shared.config.drain;
    let mut st = shared.lock();
    for p in revoked {
        if let Some(part) = st.parts.get_mut(p) {
            part.revoking = true;
        }
    }
    loop {
        let out: usize = revoked
            .iter()
            .filter_map(|p| st.parts.get(p))
            .map(|part| part.window.out_len())
            .sum();
        let now = Instant::now();
        if out == 0 || now >= deadline || st.closed {
            break;
        }
        st = shared
            .settled
            .wait_timeout(st, deadline - now)
            .map(|(g, _)| g)
            .unwrap_or_else(|p| p.into_inner().0);
    }
    let mut cps = Vec::new();
    let mut tpl = TopicPartitionList::new();
    for p in revoked {
        if let Some(mut part) = st.parts.remove(p) {
            let cp = part.window.final_checkpoint();
            let lost = part.window.clear();
            if !lost.is_empty() {
                tracing::info!(topic = %shared.topic, partition = p, held = lost.len(), "partition revoked with records held: its next owner runs them");
            }
            let _ = tpl.add_partition_offset(&shared.topic, *p, Offset::Offset(cp.low));
            cps.push((*p, cp.encode()));
        }
    }
    drop(st);
    // A save on its way may carry an older checkpoint of these partitions: this one lands after.
    block_on(shared.no_write_on_its_way());
    if let Err(e) = shared.write_checkpoints_blocking(cps) {
        tracing::warn!(topic = %shared.topic, error = %e, "checkpoint at revocation failed: acked records above the commit may run again");
    }
    if tpl.count() > 0 {
        if let Err(e) = consumer.commit(&tpl, CommitMode::Sync) {
            tracing::warn!(topic = %shared.topic, error = %e, "commit at revocation failed");
        }
    }
}

/// Restores newly assigned partitions from the group's commits and their checkpoints, and sets
/// each one's position in `tpl` to its lowest unsettled offset (the caller then takes them).
fn assign(shared: &Shared, consumer: &BaseConsumer<Ctx>, tpl: &mut TopicPartitionList) {
    let assigned = partitions_of(&shared.topic, tpl);
    tracing::debug!(topic = %shared.topic, ?assigned, "assigned");
    if assigned.is_empty() {
        return;
    }
    let mut ask = TopicPartitionList::new();
    for p in &assigned {
        let _ = ask.add_partition(&shared.topic, *p);
    }
    let committed: HashMap<i32, i64> = match consumer.committed_offsets(ask, shared.config.timeout)
    {
        Ok(c) => c
            .elements_for_topic(&shared.topic)
            .iter()
            .map(|e| (e.partition(), e.offset().to_raw().unwrap_or(0).max(0)))
            .collect(),
        Err(e) => {
            tracing::warn!(topic = %shared.topic, error = %e, "reading committed offsets failed: starting from the earliest");
            HashMap::new()
        }
    };
    let mut parts = Vec::new();
    for p in &assigned {
        let c = committed.get(p).copied().unwrap_or(0);
        let cp = match shared.read_checkpoint(*p) {
            Ok(cp) => cp,
            Err(e) => {
                tracing::warn!(topic = %shared.topic, partition = p, error = %e, "reading the partition's checkpoint failed: counting deliveries afresh from the commit");
                None
            }
        };
        tracing::debug!(topic = %shared.topic, partition = p, committed = c, checkpoint = ?cp, "restoring");
        let window = Window::restore(c, cp.as_ref());
        if let Err(e) =
            tpl.set_partition_offset(&shared.topic, *p, Offset::Offset(window.fetch_from()))
        {
            tracing::warn!(topic = %shared.topic, partition = p, error = %e, "setting the restored position failed");
        }
        parts.push((
            *p,
            Part {
                window,
                out: HashMap::new(),
                epoch: shared.epochs.fetch_add(1, Ordering::Relaxed) + 1,
                committed: c,
                revoking: false,
                full: false,
                unsaved: false,
                // Nothing reserved by this owner yet.
                durable_to: 0,
            },
        ));
    }
    let mut st = shared.lock();
    for (p, part) in parts {
        st.parts.insert(p, part);
    }
}

/// How often the fetch thread commits each partition's progress to the group (the checkpoint
/// is what counts; the commit keeps the group's lag true for the tools that read it).
const COMMIT_EVERY: Duration = Duration::from_millis(200);

/// Writes the checkpoints of partitions acked since their last one, then commits, without
/// waiting, each partition's lowest unsettled offset where it moved. Acks are made durable here,
/// every [`COMMIT_EVERY`], not on each ack call: a worker killed in between runs those jobs again
/// (at least once), while a rebalance or a close writes them first.
fn commit_progress(shared: &Shared, consumer: &BaseConsumer<Ctx>) {
    let mut tpl = TopicPartitionList::new();
    let unsaved = {
        let mut st = shared.lock();
        let mut unsaved = false;
        for (p, part) in st.parts.iter_mut() {
            unsaved |= part.unsaved;
            let low = part.window.low();
            if low > part.committed {
                part.committed = low;
                let _ = tpl.add_partition_offset(&shared.topic, *p, Offset::Offset(low));
            }
        }
        unsaved
    };
    if unsaved {
        if let Err(e) = block_on(shared.save()) {
            tracing::warn!(topic = %shared.topic, error = %e, "writing checkpoints failed (the next round carries them)");
        }
    }
    if tpl.count() > 0 {
        if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
            tracing::debug!(topic = %shared.topic, error = %e, "commit failed (the next one carries it)");
        }
    }
}

/// Most fetched records the fetch thread decodes before handing them to the window at once.
const FETCH_BATCH: usize = 256;

/// A fetched record as the window keeps it: Stevedore's headers read into the envelope, a
/// foreign record given an id stable across releases and owners, and its key (the envelope's,
/// else the record's).
fn decode<M: Message>(topic: &str, m: &M) -> Rec {
    let headers = m.headers();
    let fields = headers.iter().flat_map(|h| {
        h.iter()
            .filter_map(|h| h.value.map(|v| (h.key, String::from_utf8_lossy(v))))
    });
    let body = bytes::Bytes::copy_from_slice(m.payload().unwrap_or_default());
    let mut envelope = wire::from_wire(fields, body, "");
    if envelope.id.is_empty() {
        envelope.id = format!("kafka-{topic}-{}-{}", m.partition(), m.offset());
    }
    let key = envelope.key.clone().or_else(|| {
        m.key()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .filter(|k| !k.is_empty())
    });
    Rec {
        offset: m.offset(),
        key,
        envelope: Arc::new(envelope),
    }
}

/// Longest the fetch thread sleeps with nothing to do: it polls the group at least this often
/// (librdkafka's own timers, `max.poll.interval.ms`) and commits progress.
const IDLE: Duration = Duration::from_millis(100);

/// Reads up to `max` records from `next` (a queue's poll with no wait) into `batch`; returns
/// whether the queue ran dry.
fn drain<M: Message>(
    topic: &str,
    max: usize,
    batch: &mut Vec<(i32, Rec)>,
    mut next: impl FnMut() -> Option<rdkafka::error::KafkaResult<M>>,
) -> bool {
    let mut n = 0;
    while n < max {
        match next() {
            Some(Ok(m)) => {
                batch.push((m.partition(), decode(topic, &m)));
                n += 1;
            }
            Some(Err(e)) => {
                tracing::warn!(topic, error = %e, "fetch failed (retrying)");
                return false;
            }
            None => return true,
        }
    }
    false
}

/// The background fetch loop of one topic on one handle.
///
/// It polls the group's queue (rebalances, errors, and the records of a partition that could not
/// be split) and each assigned partition's own queue while that partition's window has room, and
/// sleeps when none of them has anything, woken by librdkafka when a queue gets something, by
/// receive when it makes room, and by close.
fn fetch_loop(
    shared: Arc<Shared>,
    consumer: Arc<BaseConsumer<Ctx>>,
    stop: Arc<AtomicBool>,
    progress: std::sync::mpsc::Sender<()>,
) {
    let _ = shared.fetcher.set(std::thread::current());
    let mut queues: BTreeMap<i32, PartitionQueue<Ctx>> = BTreeMap::new();
    let mut last_commit = Instant::now();
    let mut batch: Vec<(i32, Rec)> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        // The group's queue first: a rebalance in it splits or drops partition queues.
        let mut idle = drain(&shared.topic, FETCH_BATCH, &mut batch, || {
            consumer.poll(Duration::ZERO)
        });
        for change in std::mem::take(&mut *consumer.context().changes()) {
            match change {
                QueueChange::Split(p, q) => {
                    queues.insert(p, q);
                }
                QueueChange::Gone(p) => {
                    queues.remove(&p);
                }
            }
        }
        // Each partition with room in its window, up to the room.
        let room: Vec<(i32, usize)> = {
            let mut st = shared.lock();
            queues
                .keys()
                .filter_map(|p| {
                    let part = st.parts.get_mut(p)?;
                    let room = READY_CAP.saturating_sub(part.window.ready_len());
                    part.full = room == 0;
                    Some((*p, room.min(FETCH_BATCH)))
                })
                .collect()
        };
        for (p, room) in room {
            if room == 0 {
                continue;
            }
            if let Some(q) = queues.get(&p) {
                idle &= drain(&shared.topic, room, &mut batch, || q.poll(Duration::ZERO));
            }
        }
        if !batch.is_empty() {
            let mut st = shared.lock();
            for (p, rec) in batch.drain(..) {
                if let Some(part) = st.parts.get_mut(&p) {
                    part.window.push(rec);
                }
            }
            drop(st);
            shared.arrived.notify_waiters();
        }
        if last_commit.elapsed() >= COMMIT_EVERY {
            last_commit = Instant::now();
            commit_progress(&shared, &consumer);
        }
        if idle {
            std::thread::park_timeout(IDLE.min(COMMIT_EVERY.saturating_sub(last_commit.elapsed())));
        }
    }
    // Leaving: what is settled is committed and checkpointed, then the group is left (on drop).
    let parts: Vec<i32> = shared.lock().parts.keys().copied().collect();
    shared.lock().closed = true;
    shared.settled.notify_all();
    revoke(&shared, &consumer, &parts);
    // Settled, checkpointed and committed: what close waits for in any case.
    let _ = progress.send(());
    // The partition queues hold the consumer: they go first, so it is the last holder.
    drop(queues);
    consumer.context().changes().clear();
    // Leaving the group (librdkafka's close) can hang on a broker mid-rebalance; close waits for
    // it only briefly.
    drop(consumer);
    let _ = progress.send(());
}

/// How long closing a handle waits, once every consumer's state is saved, for them to leave
/// their groups. A LeaveGroup sent while the group is rebalancing is answered only after the
/// rebalance (a broker answers a connection's requests in order, behind the held JoinGroup):
/// close does not wait for that. The request is on its way; if it is lost with the process, the
/// group notices the member gone by its session timeout, and nothing unsaved is left to lose.
const LEAVE_WAIT: Duration = Duration::from_millis(500);

/// How long closing a handle waits, beyond the drain, for a consumer's checkpoints and commit.
const SAVE_WAIT: Duration = Duration::from_secs(3);

/// A background consumer thread told to stop: it signals twice on `progress` (state saved, then
/// group left) and ends.
pub(crate) struct Stopping {
    pub(crate) what: String,
    pub(crate) thread: std::thread::JoinHandle<()>,
    pub(crate) progress: std::sync::mpsc::Receiver<()>,
}

/// Waits for every stopping thread to save its state (up to `saved_by`), then for all of them
/// together to leave their groups (up to [`LEAVE_WAIT`] more). Joins the threads that are done;
/// leaves the others to finish on their own. Blocking.
pub(crate) fn finish_stopping(all: Vec<Stopping>, saved_by: Instant) {
    use std::sync::mpsc::RecvTimeoutError;
    // A thread that is gone (disconnected) has nothing more to wait for.
    let wait = |s: &Stopping, by: Instant| {
        !matches!(
            s.progress
                .recv_timeout(by.saturating_duration_since(Instant::now())),
            Err(RecvTimeoutError::Timeout)
        )
    };
    let mut saved = Vec::with_capacity(all.len());
    for s in all {
        if wait(&s, saved_by) {
            saved.push(s);
        } else {
            // Still busy after the drain plus a checkpoint write and a commit (a broker
            // mid-rebalance or gone): what it has not saved runs again on the partition's next
            // owner, at least once as always.
            tracing::warn!(consumer = %s.what, "the consumer did not save its state in time (the broker is mid-rebalance or gone): its partitions go to the others after the session timeout");
        }
    }
    let left_by = Instant::now() + LEAVE_WAIT;
    for s in saved {
        if wait(&s, left_by) {
            let _ = s.thread.join();
        } else {
            tracing::info!(consumer = %s.what, "state saved; the group leave is still waiting for the broker (a rebalance in progress): not waiting for it");
        }
    }
}

/// One topic consumed by one handle.
struct TopicConsumer {
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    /// The fetch thread and its two signals on stopping (state saved, then group left): taken by
    /// the first stop.
    thread: Mutex<Option<(std::thread::JoinHandle<()>, std::sync::mpsc::Receiver<()>)>>,
}

impl TopicConsumer {
    /// Tells the fetch thread to stop; what to wait for (once).
    fn begin_stop(&self) -> Option<Stopping> {
        self.stop.store(true, Ordering::Relaxed);
        self.shared.wake_fetcher();
        let (thread, progress) = self
            .thread
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()?;
        Some(Stopping {
            what: self.shared.topic.clone(),
            thread,
            progress,
        })
    }
}

/// What a hand-out needs written first (see [`KafkaBroker::take`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Save {
    /// Nothing: every record handed out is covered by a written reservation.
    None,
    /// The next reservation, written in the background.
    Background,
    /// A checkpoint, written before the records go out.
    Wait,
}

/// A receipt's token.
#[derive(Debug)]
struct Token {
    handle: u64,
    /// The consumer that handed it out (gone once that consumer is closed: the receipt is lost).
    shared: std::sync::Weak<Shared>,
    partition: i32,
    offset: i64,
    epoch: u64,
    /// Which hand-out of the record this is: an earlier one's receipt is stale.
    count: u32,
}

static HANDLES: AtomicU64 = AtomicU64::new(1);

/// A Kafka broker handle. Cheap to clone (clones share clients and consumers).
///
/// Thread safety: `Send + Sync`; every method may be called concurrently. Each handle is one
/// member of each group it receives from: another handle (another worker) shares the work by
/// partitions.
#[derive(Clone)]
pub struct KafkaBroker {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for KafkaBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaBroker")
            .field("bootstrap", &self.inner.config.bootstrap)
            .field("key_prefix", &self.inner.config.key_prefix)
            .finish_non_exhaustive()
    }
}

struct Inner {
    config: KafkaConfig,
    caps: Capabilities,
    producer: FutureProducer,
    state_producer: FutureProducer,
    admin: Arc<AdminClient<DefaultClientContext>>,
    /// The tiered delay topics.
    delay: Arc<KafkaDelayStore>,
    prepared: Mutex<HashSet<String>>,
    consumers: Mutex<HashMap<String, Arc<TopicConsumer>>>,
    handle: u64,
    closed: AtomicBool,
}

impl Inner {
    /// Takes every topic consumer out of the handle (to stop them).
    fn take_consumers(&self) -> Vec<Arc<TopicConsumer>> {
        self.consumers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .map(|(_, c)| c)
            .collect()
    }

    /// Stops every fetch thread and promoter at once, and waits for them (see
    /// [`finish_stopping`]). Blocking.
    fn stop_all(&self) {
        let mut stopping: Vec<Stopping> = self
            .take_consumers()
            .iter()
            .filter_map(|c| c.begin_stop())
            .collect();
        stopping.extend(self.delay.begin_stop());
        finish_stopping(stopping, Instant::now() + self.config.drain + SAVE_WAIT);
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Dropped without close: leave the groups now, so the partitions go to the other
        // members at once (the fetch thread writes checkpoints, commits and leaves).
        self.stop_all();
    }
}

impl KafkaBroker {
    /// Builds the clients. Makes no broker call: the first call that needs a topic creates it.
    pub async fn connect(config: KafkaConfig) -> Result<Self, BrokerError> {
        let mk = |what: &str, e: KafkaError| {
            BrokerError::permanent(format!("kafka: cannot build the {what}: {e}"))
        };
        let timeout_ms = config.timeout.as_millis().to_string();
        let producer: FutureProducer = config
            .client()
            .set("acks", "all")
            .set("linger.ms", "1")
            // A retried batch never overtakes a later one: per-key order holds (see produce_all).
            .set("max.in.flight.requests.per.connection", "1")
            .set("message.timeout.ms", &timeout_ms)
            .create()
            .map_err(|e| mk("producer", e))?;
        let state_producer: FutureProducer = config
            .client()
            .set("acks", "all")
            .set("linger.ms", "0")
            // One record per produce request and partition: see the crate docs.
            .set("batch.num.messages", "1")
            .set("message.timeout.ms", &timeout_ms)
            .create()
            .map_err(|e| mk("checkpoint producer", e))?;
        let admin: Arc<AdminClient<DefaultClientContext>> = Arc::new(
            config
                .client()
                .create()
                .map_err(|e| mk("admin client", e))?,
        );
        let delay = Arc::new(KafkaDelayStore::new(
            config.clone(),
            state_producer.clone(),
            admin.clone(),
        ));
        Ok(KafkaBroker {
            inner: Arc::new(Inner {
                caps: capabilities(&config),
                config,
                producer,
                state_producer,
                admin,
                delay,
                prepared: Mutex::new(HashSet::new()),
                consumers: Mutex::new(HashMap::new()),
                handle: HANDLES.fetch_add(1, Ordering::Relaxed),
                closed: AtomicBool::new(false),
            }),
        })
    }

    fn check_open(&self) -> Result<(), BrokerError> {
        if self.inner.closed.load(Ordering::Relaxed) {
            Err(BrokerError::Closed)
        } else {
            Ok(())
        }
    }

    /// Creates the topic of `physical` and its checkpoint topic, if missing.
    async fn ensure_topic(&self, physical: &str) -> Result<(), BrokerError> {
        if self
            .inner
            .prepared
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(physical)
        {
            return Ok(());
        }
        let c = &self.inner.config;
        let topic = c.topic(physical);
        let state = format!("{topic}.state");
        delay::create_topics(&self.inner.admin, c, &[(topic, false), (state, true)]).await?;
        self.inner
            .prepared
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(physical.to_string());
        Ok(())
    }

    /// This handle's consumer of `physical`, started on first use.
    async fn consumer(&self, physical: &str) -> Result<Arc<TopicConsumer>, BrokerError> {
        if let Some(c) = self
            .inner
            .consumers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(physical)
        {
            return Ok(c.clone());
        }
        self.ensure_topic(physical).await?;
        let c = &self.inner.config;
        let topic = c.topic(physical);
        let reader: BaseConsumer = c
            .consumer_client()
            .set("enable.auto.commit", "false")
            .set("group.id", format!("{}.reader", c.group(physical)))
            .create()
            .map_err(|e| kafka_error("checkpoint reader", &topic, &e))?;
        let shared = Arc::new(Shared {
            state_topic: format!("{topic}.state"),
            topic: topic.clone(),
            state: Mutex::new(State::default()),
            arrived: tokio::sync::Notify::new(),
            settled: Condvar::new(),
            epochs: AtomicU64::new(0),
            joined: AtomicBool::new(false),
            config: c.clone(),
            state_producer: self.inner.state_producer.clone(),
            saves: Mutex::new(Saves::default()),
            saved: tokio::sync::Notify::new(),
            reader: Mutex::new(reader),
            fetcher: OnceLock::new(),
        });
        let mut client = c.consumer_client();
        if !c.properties.contains_key("partition.assignment.strategy") {
            // Incremental rebalances: a member joining or leaving moves only the partitions that
            // change hands, and the others keep running what they hold.
            client.set("partition.assignment.strategy", "cooperative-sticky");
        }
        if !c.properties.contains_key("fetch.wait.max.ms") {
            // An idle queue's next job is fetched within 100 ms, not after a 500 ms long poll.
            client.set("fetch.wait.max.ms", "100");
        }
        if !c.properties.contains_key("queued.min.messages") {
            client.set("queued.min.messages", PREFETCH);
        }
        if !c.properties.contains_key("queued.max.messages.kbytes") {
            client.set("queued.max.messages.kbytes", PREFETCH_KIB);
        }
        if !c.properties.contains_key("max.partition.fetch.bytes") {
            client.set("max.partition.fetch.bytes", FETCH_BYTES);
        }
        if !c.properties.contains_key("fetch.queue.backoff.ms") {
            // A partition whose prefetch is full is fetched again this soon after its queue
            // drains below it (librdkafka's 1 s default stalled a fast worker on a bounded
            // prefetch).
            client.set("fetch.queue.backoff.ms", "10");
        }
        let mut consumer: BaseConsumer<Ctx> = client
            .set("group.id", c.group(physical))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .create_with_context(Ctx {
                shared: Arc::downgrade(&shared),
                me: OnceLock::new(),
                changes: Mutex::new(Vec::new()),
            })
            .map_err(|e| kafka_error("consumer", &topic, &e))?;
        // Rebalances and errors arrive on the group's queue: they wake the fetch thread.
        consumer.set_nonempty_callback(Shared::waker(&shared));
        let consumer = Arc::new(consumer);
        let _ = consumer.context().me.set(Arc::downgrade(&consumer));
        consumer
            .subscribe(&[&topic])
            .map_err(|e| kafka_error("subscribe", &topic, &e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let (progress_tx, progress) = std::sync::mpsc::channel();
        let thread = {
            let (shared, stop) = (shared.clone(), stop.clone());
            std::thread::Builder::new()
                .name(format!("kafka-{physical}"))
                .spawn(move || fetch_loop(shared, consumer, stop, progress_tx))
                .map_err(|e| BrokerError::transient(format!("cannot start a fetch thread: {e}")))?
        };
        let tc = Arc::new(TopicConsumer {
            shared,
            stop,
            thread: Mutex::new(Some((thread, progress))),
        });
        let mut all = self
            .inner
            .consumers
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        Ok(all.entry(physical.to_string()).or_insert(tc).clone())
    }

    /// Whether any partition this member holds has records on the broker it has not fetched
    /// yet (their high watermark is past what was fetched).
    async fn behind(&self, tc: &Arc<TopicConsumer>) -> bool {
        let fetched: Vec<(i32, i64)> = tc
            .shared
            .lock()
            .parts
            .iter()
            .map(|(p, part)| (*p, part.window.fetch_from()))
            .collect();
        if fetched.is_empty() {
            return false;
        }
        let shared = tc.shared.clone();
        // A quick look only: a receive must not outlast its wait by much (a shutting-down worker
        // waits for the receives on their way). A reader busy restoring a partition, or a slow
        // broker, counts as not behind.
        let look = tokio::task::spawn_blocking(move || {
            let Ok(reader) = shared.reader.try_lock() else {
                return false;
            };
            fetched.iter().any(|(p, to)| {
                reader
                    .fetch_watermarks(&shared.topic, *p, BEHIND_TIMEOUT)
                    .is_ok_and(|(_, high)| high > *to)
            })
        });
        matches!(
            tokio::time::timeout(BEHIND_TIMEOUT, look).await,
            Ok(Ok(true))
        )
    }

    fn existing_consumer(&self, physical: &str) -> Option<Arc<TopicConsumer>> {
        self.inner
            .consumers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(physical)
            .cloned()
    }

    /// Hands out up to `max` ready records across the assigned partitions, and says what must be
    /// written first: a record handed out again (its count), or one at or above its partition's
    /// written reservation ([`RESERVE`]), makes the caller wait for a checkpoint; a partition
    /// near the end of its reservation asks for the next one in the background.
    fn take(&self, physical: &str, tc: &TopicConsumer, max: usize) -> (Vec<Delivery>, Save) {
        // Under the lock only bookkeeping: the deliveries (envelopes, receipts) are made after.
        let mut handed: Vec<(i32, u64, u32, u32, Rec)> = Vec::new();
        let mut save = Save::None;
        let mut room = false;
        let mut st = tc.shared.lock();
        for (&p, part) in st.parts.iter_mut() {
            if handed.len() >= max {
                break;
            }
            if part.revoking {
                continue;
            }
            let taken = part.window.take(max - handed.len());
            if taken.is_empty() {
                continue;
            }
            let mut highest = -1;
            for out in taken {
                let rec = out.record;
                if out.count > 1 || rec.offset >= part.durable_to {
                    save = Save::Wait;
                    part.unsaved = true;
                }
                highest = highest.max(rec.offset);
                handed.push((p, part.epoch, out.count, out.delivery_count, rec.clone()));
                part.out.insert(rec.offset, (rec, out.count));
            }
            if highest + RESERVE / 2 >= part.window.reserved() {
                part.window.reserve(highest + 1 + RESERVE);
                part.unsaved = true;
                if save == Save::None {
                    save = Save::Background;
                }
            }
            if part.full && part.window.ready_len() <= READY_CAP / 2 {
                part.full = false;
                room = true;
            }
        }
        drop(st);
        if room {
            tc.shared.wake_fetcher();
        }
        let receipt_queue: Arc<str> = Arc::from(physical);
        let weak = Arc::downgrade(&tc.shared);
        let deliveries = handed
            .into_iter()
            .map(|(partition, epoch, count, delivery_count, rec)| Delivery {
                envelope: Envelope::clone(&rec.envelope),
                receipt: Receipt::new(
                    receipt_queue.clone(),
                    Token {
                        handle: self.inner.handle,
                        shared: weak.clone(),
                        partition,
                        offset: rec.offset,
                        epoch,
                        count,
                    },
                ),
                delivery_count,
            })
            .collect();
        (deliveries, save)
    }
}

#[async_trait]
impl Broker for KafkaBroker {
    fn name(&self) -> &'static str {
        "kafka"
    }

    fn capabilities(&self) -> &Capabilities {
        &self.inner.caps
    }

    async fn prepare(&self, queues: &[String]) -> Result<(), BrokerError> {
        self.check_open()?;
        for q in queues {
            self.ensure_topic(q).await?;
        }
        // A worker prepares the queues it serves: it promotes their delayed messages.
        self.inner.delay.watch(queues).await
    }

    async fn subscribe(&self, queues: &[String]) -> Result<(), BrokerError> {
        self.check_open()?;
        let mut all = Vec::with_capacity(queues.len());
        for q in queues {
            all.push((q, self.consumer(q).await?));
        }
        // Every group is joining now; wait for all of them.
        for (q, tc) in all {
            wait_joined(q, &tc).await?;
        }
        // This worker promotes its queues' delayed messages.
        self.inner.delay.watch(queues).await
    }

    async fn publish(&self, queue: &str, messages: Vec<Envelope>) -> Result<(), BrokerError> {
        self.check_open()?;
        if messages.is_empty() {
            return Ok(());
        }
        self.inner.caps.check_payloads(&messages, "kafka")?;
        self.ensure_topic(queue).await?;
        let topic = self.inner.config.topic(queue);
        let encoded: Vec<_> = messages
            .iter()
            .map(|m| (m.key.clone(), wire::to_wire(m)))
            .collect();
        let records: Vec<_> = encoded
            .iter()
            .map(|(key, (headers, body))| delay::record(&topic, key.as_deref(), headers, body))
            .collect();
        delay::produce_all(&self.inner.producer, records, self.inner.config.timeout)
            .await
            .map_err(|e| kafka_error("produce to", &topic, &e))
    }

    async fn receive(
        &self,
        queue: &str,
        opts: ReceiveOptions,
    ) -> Result<Vec<Delivery>, BrokerError> {
        self.check_open()?;
        let tc = self.consumer(queue).await?;
        let max = opts.max.clamp(1, self.inner.caps.max_batch);
        // Until this member has joined its group it cannot know whether records wait for it,
        // and an empty answer would say the queue is empty (strict priority reads it so): the
        // first receive waits for the first assignment, however short its own wait.
        wait_joined(queue, &tc).await?;
        let mut deadline = tokio::time::Instant::now() + opts.wait;
        let mut checked_behind = false;
        loop {
            let arrived = tc.shared.arrived.notified();
            let (deliveries, save) = self.take(queue, &tc, max);
            if save == Save::Background {
                let shared = tc.shared.clone();
                tokio::spawn(async move {
                    if let Err(e) = shared.save().await {
                        tracing::debug!(topic = %shared.topic, error = %e, "writing a reservation failed (the next hand-out waits for one)");
                    }
                });
            }
            if !deliveries.is_empty() {
                // Counts that are not yet durable are written before the records go out
                // (shared with the other receives of the moment).
                if save == Save::Wait {
                    if let Err(e) = tc.shared.save().await {
                        // Not handed out after all: back where they were, counted (a count
                        // too many is safe, one too few is not).
                        let receipts: Vec<Receipt> =
                            deliveries.iter().map(|d| d.receipt.clone()).collect();
                        let _ = self.release(&receipts).await;
                        return Err(e);
                    }
                }
                return Ok(deliveries);
            }
            if tokio::time::Instant::now() >= deadline {
                // Empty means nothing is there for this member: not merely that records the
                // broker holds for it are still on their way (strict priority counts on it).
                if !checked_behind && self.behind(&tc).await {
                    checked_behind = true;
                    deadline = tokio::time::Instant::now() + CATCH_UP;
                    continue;
                }
                return Ok(Vec::new());
            }
            let _ = tokio::time::timeout_at(deadline, arrived).await;
        }
    }

    async fn ack(&self, receipts: &[Receipt]) -> Result<(), BrokerError> {
        self.settle(receipts, true, false).await
    }

    async fn release(&self, receipts: &[Receipt]) -> Result<(), BrokerError> {
        self.settle(receipts, false, false).await
    }

    /// Puts the records back in their window with this hand-out's count undone (the count
    /// reaches the checkpoint, so the partition's next owner sees it too).
    async fn release_uncounted(&self, deliveries: Vec<Delivery>) -> Result<(), BrokerError> {
        let receipts: Vec<Receipt> = deliveries.into_iter().map(|d| d.receipt).collect();
        self.settle(&receipts, false, true).await
    }

    fn delay_store(&self) -> Option<Arc<dyn stevedore_core::DelayStore>> {
        Some(self.inner.delay.clone())
    }

    /// An ack settles the record in this handle's window at once (before the job's slot is free
    /// again, so a checkpoint written for a later hand-out carries it); the next checkpoint
    /// written (within [`COMMIT_EVERY`], or for a hand-out) makes it durable.
    fn acks_locally(&self) -> bool {
        true
    }

    async fn extend_lease(&self, receipt: &Receipt, _lease: Duration) -> Result<(), BrokerError> {
        let Some(t) = receipt.token::<Token>() else {
            return Err(lost(receipt.queue()));
        };
        let held = t.handle == self.inner.handle
            && t.shared.upgrade().is_some_and(|shared| {
                shared.lock().parts.get(&t.partition).is_some_and(|p| {
                    p.epoch == t.epoch
                        && p.window.is_out(t.offset)
                        && p.out.get(&t.offset).is_some_and(|(_, n)| *n == t.count)
                })
            });
        if held {
            Ok(())
        } else {
            Err(lost(receipt.queue()))
        }
    }

    async fn depth(&self, queue: &str) -> Result<Depth, BrokerError> {
        self.check_open()?;
        self.ensure_topic(queue).await?;
        let c = self.inner.config.clone();
        let topic = c.topic(queue);
        let group = c.group(queue);
        let t = topic.clone();
        let lag = tokio::task::spawn_blocking(move || delay::lag(&c, &group, &[t]))
            .await
            .map_err(|e| BrokerError::transient(format!("depth {topic}: {e}")))?
            .map_err(|e| kafka_error("depth", &topic, &e))?;
        // Delayed: what waits in the queue's delay topics (none where they do not exist yet).
        let delayed = Some(self.inner.delay.delayed(queue).await?);
        let (held, acked_above) = match self.existing_consumer(queue) {
            Some(tc) => {
                let st = tc.shared.lock();
                st.parts.values().fold((0u64, 0u64), |(h, a), p| {
                    let cp = p.window.checkpoint();
                    (h + p.window.out_len() as u64, a + cp.acked.len() as u64)
                })
            }
            None => (0, 0),
        };
        let unsettled = lag.saturating_sub(acked_above);
        Ok(Depth {
            ready: unsettled.saturating_sub(held),
            in_flight: held,
            delayed,
            oldest_age: None,
        })
    }

    async fn close(&self) -> Result<(), BrokerError> {
        if self.inner.closed.swap(true, Ordering::Relaxed) {
            return Ok(());
        }
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.stop_all())
            .await
            .map_err(|e| BrokerError::transient(format!("close: {e}")))?;
        let p = self.inner.producer.clone();
        let t = self.inner.config.timeout;
        let _ = tokio::task::spawn_blocking(move || p.flush(t)).await;
        Ok(())
    }
}

/// Waits (up to [`JOIN_WAIT`]) for the member's first assignment.
async fn wait_joined(queue: &str, tc: &TopicConsumer) -> Result<(), BrokerError> {
    let join_by = tokio::time::Instant::now() + JOIN_WAIT;
    while !tc.shared.joined.load(Ordering::Relaxed) {
        let arrived = tc.shared.arrived.notified();
        if tc.shared.joined.load(Ordering::Relaxed) {
            break;
        }
        if tokio::time::timeout_at(join_by, arrived).await.is_err() {
            return Err(BrokerError::transient(format!(
                "{queue}: this member was given no partitions of {} within {}s (is the group \
                 coordinator reachable?)",
                tc.shared.topic,
                JOIN_WAIT.as_secs()
            )));
        }
    }
    Ok(())
}

fn lost(queue: &str) -> BrokerError {
    BrokerError::LeaseLost {
        queue: queue.to_string(),
    }
}

impl KafkaBroker {
    /// Acks (`ack`) or releases receipts. Each receipt reaches its consumer through its token,
    /// and a run of receipts of one consumer is settled under one lock: no allocation, no
    /// lookup by name, one job at a time being the common call.
    async fn settle(
        &self,
        receipts: &[Receipt],
        ack: bool,
        uncounted: bool,
    ) -> Result<(), BrokerError> {
        let mut lost_queue: Option<&str> = None;
        let mut rest = receipts;
        while let Some(first) = rest.first() {
            let shared = first
                .token::<Token>()
                .filter(|t| t.handle == self.inner.handle)
                .and_then(|t| t.shared.upgrade());
            let Some(shared) = shared else {
                lost_queue = Some(first.queue());
                rest = &rest[1..];
                continue;
            };
            // The run of receipts of this consumer.
            let run = rest
                .iter()
                .take_while(|r| {
                    r.token::<Token>()
                        .is_some_and(|t| std::ptr::eq(t.shared.as_ptr(), Arc::as_ptr(&shared)))
                })
                .count()
                .max(1);
            let (these, later) = rest.split_at(run);
            rest = later;
            let mut draining = false;
            // Settled records, dropped once the lock is given back.
            let mut settled: Vec<Rec> = Vec::new();
            {
                let mut st = shared.lock();
                // A revocation or a close waits for what is out: only then is it woken (a
                // wake-up is a system call, and acks come one job at a time).
                draining |= st.closed;
                for r in these {
                    let Some(t) = r.token::<Token>() else {
                        lost_queue = Some(r.queue());
                        continue;
                    };
                    let Some(part) = st.parts.get_mut(&t.partition) else {
                        lost_queue = Some(r.queue());
                        continue;
                    };
                    let current = part.out.get(&t.offset).is_some_and(|(_, n)| *n == t.count);
                    if part.epoch != t.epoch || !current {
                        lost_queue = Some(r.queue());
                        continue;
                    }
                    let done = match part.out.remove(&t.offset) {
                        Some((rec, _)) if ack => {
                            settled.push(rec);
                            part.window.ack(t.offset)
                        }
                        Some((rec, _)) => part.window.release(rec, uncounted),
                        None => false,
                    };
                    draining |= part.revoking;
                    if !done {
                        lost_queue = Some(r.queue());
                    } else if ack {
                        part.unsaved = true;
                    }
                }
            }
            drop(settled);
            if draining {
                shared.settled.notify_all();
            }
            if !ack {
                shared.arrived.notify_waiters();
            }
        }
        match lost_queue {
            Some(q) => Err(lost(q)),
            None => Ok(()),
        }
    }
}

/// Entry points for the fuzz targets in `fuzz/` (the `fuzzing` feature; not an API): the
/// decoder of a fetched record, and the partition checkpoint's reader and writer.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing {
    use rdkafka::message::{Header, OwnedHeaders, OwnedMessage, Timestamp};
    use stevedore_core::Envelope;

    /// The envelope and key of a record with these headers, payload and key.
    pub fn decode(
        headers: Vec<(String, Option<Vec<u8>>)>,
        payload: Option<Vec<u8>>,
        key: Option<Vec<u8>>,
        offset: i64,
    ) -> (Envelope, Option<String>) {
        let mut h = OwnedHeaders::new();
        for (k, v) in &headers {
            h = h.insert(Header {
                key: k.as_str(),
                value: v.as_deref(),
            });
        }
        let m = OwnedMessage::new(
            payload,
            key,
            "t".into(),
            Timestamp::NotAvailable,
            0,
            offset,
            Some(h),
        );
        let rec = crate::decode("t", &m);
        (Envelope::clone(&rec.envelope), rec.key)
    }

    /// Reads a checkpoint record's text, and writes what it read back: `None` where it is not
    /// one, else the text the checkpoint encodes to, which must read back the same.
    pub fn checkpoint(text: &str) -> Option<(String, bool)> {
        let cp = crate::window::Checkpoint::decode(text)?;
        let again = cp.encode();
        let same = crate::window::Checkpoint::decode(&again).as_ref() == Some(&cp);
        Some((again, same))
    }
}
