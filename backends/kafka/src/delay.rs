//! Tiered delay topics: the Kafka backend's [`DelayStore`].
//!
//! Each physical queue `q` has six companion topics `q.delay-0s`, `q.delay-1s`, `q.delay-5s`,
//! `q.delay-30s`, `q.delay-5m` and `q.delay-1h`. A message with `r` left to wait goes to the
//! largest tier not longer than `r` (the `0s` tier when `r` is under a second). A record of tier
//! `t > 0` leaves its topic `t` after it was written, which is never after its due time; a
//! record of the `0s` tier leaves at its due time. Leaving means: produced on to the queue when
//! due, otherwise to the tier that fits what is left (so an hour and a half hops 1h, 5m × 6, and
//! on down), and only then committed.
//!
//! Within a tier topic `t > 0` records leave in the order they were written, so a promoter
//! reads each partition head first: when the head is not due to leave it **pauses the
//! partition and seeks back to the head** until then (nothing is buffered, and a worker that
//! dies holds nothing: the uncommitted head is read again by the partition's next owner). In the
//! `0s` tier a record may wait behind one due later, by under a second: that is the declared
//! delay tolerance. Nothing is delivered early: the move to the queue happens at or after the
//! due time, by the promoter's clock.
//!
//! The promoters of a queue form one consumer group (`group_prefix` + queue + `.delay`) over its
//! tier topics, so any number of workers share the work by partition and a partition is
//! promoted by one of them at a time. A worker killed between a move and its commit moves that
//! record again (at least once, as everywhere). `delayed` is the group's lag over the tier
//! topics.

use crate::{block_on, kafka_error, KafkaConfig};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use stevedore_core::{wire, BrokerError, DelayStore, Envelope};

/// The tiers: topic suffix and how long a record stays in it.
pub(crate) const TIERS: [(&str, Duration); 6] = [
    ("0s", Duration::ZERO),
    ("1s", Duration::from_secs(1)),
    ("5s", Duration::from_secs(5)),
    ("30s", Duration::from_secs(30)),
    ("5m", Duration::from_secs(300)),
    ("1h", Duration::from_secs(3600)),
];

/// The tier for a message with `remaining` left to wait: the longest not longer than it.
pub(crate) fn tier_for(remaining: Duration) -> usize {
    TIERS
        .iter()
        .rposition(|(_, d)| *d <= remaining)
        .unwrap_or(0)
}

/// The topic of tier `i` of the queue whose topic is `topic`.
pub(crate) fn tier_topic(topic: &str, i: usize) -> String {
    format!("{topic}.delay-{}", TIERS[i].0)
}

/// The tier index of a tier topic of `topic`, if it is one.
fn tier_of(topic: &str, tier: &str) -> Option<usize> {
    let suffix = tier.strip_prefix(topic)?.strip_prefix(".delay-")?;
    TIERS.iter().position(|(s, _)| *s == suffix)
}

fn millis(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// When a record of tier `tier` written at `written` (ms) for a message due at `due` leaves.
fn leaves_at(tier: usize, written: Option<i64>, due: SystemTime) -> SystemTime {
    let hold = TIERS[tier].1;
    match written {
        Some(ms) if tier > 0 => {
            let out = UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64) + hold;
            out.min(due)
        }
        _ => due,
    }
}

/// A record of an encoded envelope (its wire headers, body and key) for `topic`, stamped now:
/// what publish, schedule and the promoters produce.
pub(crate) fn record<'a>(
    topic: &'a str,
    key: Option<&'a str>,
    headers: &'a [(String, String)],
    body: &'a [u8],
) -> FutureRecord<'a, str, [u8]> {
    let mut h = OwnedHeaders::new_with_capacity(headers.len());
    for (k, v) in headers {
        h = h.insert(Header {
            key: k.as_str(),
            value: Some(v.as_str()),
        });
    }
    let mut rec = FutureRecord::to(topic)
        .payload(body)
        .headers(h)
        .timestamp(millis(SystemTime::now()));
    if let Some(k) = key {
        rec = rec.key(k);
    }
    rec
}

/// Produces every record and waits for each to be delivered. All are handed to librdkafka
/// before the first is awaited, so they travel in a few batched requests (one round trip per
/// partition and batch, where awaiting each in turn cost one round trip per record). A full
/// local queue is waited out (the earliest delivery frees room), up to `timeout`; nothing is
/// dropped. Order within a partition is the order given (the producers keep one request in
/// flight per connection, so a retried batch cannot overtake).
pub(crate) async fn produce_all<'a>(
    producer: &FutureProducer,
    records: Vec<FutureRecord<'a, str, [u8]>>,
    timeout: Duration,
) -> Result<(), KafkaError> {
    let give_up = tokio::time::Instant::now() + timeout;
    let mut waits = std::collections::VecDeque::new();
    for mut rec in records {
        loop {
            match producer.send_result(rec) {
                Ok(w) => {
                    waits.push_back(w);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                    if tokio::time::Instant::now() < give_up =>
                {
                    rec = back;
                    match waits.pop_front() {
                        Some(w) => delivered(w.await)?,
                        None => tokio::time::sleep(Duration::from_millis(10)).await,
                    }
                }
                Err((e, _)) => return Err(e),
            }
        }
    }
    for w in waits {
        delivered(w.await)?;
    }
    Ok(())
}

/// What a delivery future's outcome says: delivered, or why not.
fn delivered<T, M, C>(w: Result<Result<T, (KafkaError, M)>, C>) -> Result<(), KafkaError> {
    match w {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((e, _))) => Err(e),
        Err(_) => Err(KafkaError::Canceled),
    }
}

/// Creates topics (idempotently).
pub(crate) async fn create_topics(
    admin: &AdminClient<DefaultClientContext>,
    config: &KafkaConfig,
    topics: &[(String, bool)],
) -> Result<(), BrokerError> {
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|(name, compact)| {
            let t = NewTopic::new(
                name,
                config.partitions,
                TopicReplication::Fixed(config.replication),
            );
            if *compact {
                t.set("cleanup.policy", "compact")
            } else {
                t
            }
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(config.timeout));
    let first = topics.first().map(|t| t.0.as_str()).unwrap_or_default();
    let results = admin
        .create_topics(new.iter(), &opts)
        .await
        .map_err(|e| kafka_error("create topic", first, &e))?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => {
                return Err(kafka_error(
                    "create topic",
                    &name,
                    &KafkaError::AdminOp(code),
                ))
            }
        }
    }
    Ok(())
}

/// The group's lag over `topics` (high watermark minus the committed offset, or minus the low
/// watermark where nothing is committed), read by a fresh probe client. Blocking.
pub(crate) fn lag(config: &KafkaConfig, group: &str, topics: &[String]) -> Result<u64, KafkaError> {
    let probe: BaseConsumer = config
        .consumer_client()
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()?;
    let timeout = config.timeout;
    let mut tpl = TopicPartitionList::new();
    for t in topics {
        let meta = probe.fetch_metadata(Some(t), timeout)?;
        for mt in meta.topics() {
            for p in mt.partitions() {
                tpl.add_partition(t, p.id());
            }
        }
    }
    if tpl.count() == 0 {
        return Ok(0);
    }
    let committed = probe.committed_offsets(tpl, timeout)?;
    let mut lag = 0u64;
    for e in committed.elements() {
        let (low, high) = probe.fetch_watermarks(e.topic(), e.partition(), timeout)?;
        let from = e.offset().to_raw().filter(|o| *o >= 0).unwrap_or(low);
        lag += (high - from.max(low)).max(0) as u64;
    }
    Ok(lag)
}

/// The delay store of one broker handle.
pub(crate) struct KafkaDelayStore {
    config: KafkaConfig,
    /// One record per request (see the crate docs on tansu's high watermark): `delayed` counts
    /// by watermarks.
    producer: FutureProducer,
    admin: Arc<AdminClient<DefaultClientContext>>,
    /// Queues whose tier topics exist.
    prepared: Mutex<HashSet<String>>,
    /// Queues this handle promotes for: those it subscribed to or scheduled into.
    known: Mutex<HashSet<String>>,
    promoters: Mutex<HashMap<String, Promoter>>,
    /// Moved since `promote_due` last asked.
    moved: Arc<AtomicUsize>,
    closed: AtomicBool,
}

impl std::fmt::Debug for KafkaDelayStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaDelayStore")
            .field("key_prefix", &self.config.key_prefix)
            .finish_non_exhaustive()
    }
}

struct Promoter {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
    /// The thread's two signals on stopping: moves committed, then group left.
    progress: std::sync::mpsc::Receiver<()>,
}

impl KafkaDelayStore {
    pub(crate) fn new(
        config: KafkaConfig,
        producer: FutureProducer,
        admin: Arc<AdminClient<DefaultClientContext>>,
    ) -> Self {
        KafkaDelayStore {
            config,
            producer,
            admin,
            prepared: Mutex::new(HashSet::new()),
            known: Mutex::new(HashSet::new()),
            promoters: Mutex::new(HashMap::new()),
            moved: Arc::new(AtomicUsize::new(0)),
            closed: AtomicBool::new(false),
        }
    }

    fn tier_topics(&self, queue: &str) -> Vec<String> {
        let topic = self.config.topic(queue);
        (0..TIERS.len()).map(|i| tier_topic(&topic, i)).collect()
    }

    /// Creates `queue`'s tier topics, once per handle.
    pub(crate) async fn prepare(&self, queue: &str) -> Result<(), BrokerError> {
        if lock(&self.prepared).contains(queue) {
            return Ok(());
        }
        let topics: Vec<(String, bool)> = self
            .tier_topics(queue)
            .into_iter()
            .map(|t| (t, false))
            .collect();
        create_topics(&self.admin, &self.config, &topics).await?;
        lock(&self.prepared).insert(queue.to_string());
        Ok(())
    }

    /// Promotes for `queues` from now on (a worker's queues; dead-letter queues are left out:
    /// nothing is delayed into them). The promoters start joining their groups at once, so
    /// they are running by the time the worker is.
    pub(crate) async fn watch(&self, queues: &[String]) -> Result<(), BrokerError> {
        for q in queues.iter().filter(|q| !q.ends_with("__dlq")) {
            self.prepare(q).await?;
            lock(&self.known).insert(q.clone());
        }
        self.start_promoters()
    }

    /// Starts a promoter for every known queue that has none.
    fn start_promoters(&self) -> Result<(), BrokerError> {
        if self.closed.load(Ordering::Relaxed) {
            return Err(BrokerError::Closed);
        }
        let known: Vec<String> = lock(&self.known).iter().cloned().collect();
        let mut running = lock(&self.promoters);
        for q in known {
            if running.contains_key(&q) {
                continue;
            }
            let stop = Arc::new(AtomicBool::new(false));
            let run = PromoterRun::new(&self.config, &q, self.producer.clone(), self.moved.clone())
                .map_err(|e| kafka_error("delay promoter", &q, &e))?;
            let flag = stop.clone();
            let (tx, progress) = std::sync::mpsc::channel();
            let thread = std::thread::Builder::new()
                .name(format!("kafka-delay-{q}"))
                .spawn(move || run.run(&flag, &tx))
                .map_err(|e| BrokerError::transient(format!("cannot start a promoter: {e}")))?;
            running.insert(
                q,
                Promoter {
                    stop,
                    thread,
                    progress,
                },
            );
        }
        Ok(())
    }

    /// Tells every promoter to stop (each commits what it moved and leaves its group); what to
    /// wait for.
    pub(crate) fn begin_stop(&self) -> Vec<crate::Stopping> {
        self.closed.store(true, Ordering::Relaxed);
        lock(&self.promoters)
            .drain()
            .map(|(q, p)| {
                p.stop.store(true, Ordering::Relaxed);
                crate::Stopping {
                    what: format!("{q} (delay promoter)"),
                    thread: p.thread,
                    progress: p.progress,
                }
            })
            .collect()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[async_trait::async_trait]
impl DelayStore for KafkaDelayStore {
    async fn schedule(&self, queue: &str, messages: Vec<Envelope>) -> Result<(), BrokerError> {
        if self.closed.load(Ordering::Relaxed) {
            return Err(BrokerError::Closed);
        }
        self.prepare(queue).await?;
        lock(&self.known).insert(queue.to_string());
        let topic = self.config.topic(queue);
        let now = SystemTime::now();
        let encoded: Vec<(
            String,
            Option<String>,
            (Vec<(String, String)>, bytes::Bytes),
        )> = messages
            .iter()
            .map(|m| {
                let tier = tier_for(m.delay_remaining(now).unwrap_or_default());
                (tier_topic(&topic, tier), m.key.clone(), wire::to_wire(m))
            })
            .collect();
        let records: Vec<_> = encoded
            .iter()
            .map(|(t, key, (headers, body))| record(t, key.as_deref(), headers, body))
            .collect();
        produce_all(&self.producer, records, self.config.timeout)
            .await
            .map_err(|e| kafka_error("schedule into", &topic, &e))
    }

    async fn promote_due(&self, _now: SystemTime, _limit: usize) -> Result<usize, BrokerError> {
        // The promoters run on their own (each paused until its head record is due); this
        // starts those not yet running and reports what they moved.
        self.start_promoters()?;
        Ok(self.moved.swap(0, Ordering::Relaxed))
    }

    async fn delayed(&self, queue: &str) -> Result<u64, BrokerError> {
        // Tier topics that do not exist (nothing was ever delayed here) count as empty.
        let config = self.config.clone();
        let group = format!("{}.delay", self.config.group(queue));
        let topics = self.tier_topics(queue);
        let topic = self.config.topic(queue);
        tokio::task::spawn_blocking(move || lag(&config, &group, &topics))
            .await
            .map_err(|e| BrokerError::transient(format!("delayed {topic}: {e}")))?
            .map_err(|e| kafka_error("delayed", &topic, &e))
    }
}

/// The promoter's consumer context: a partition that changes hands forgets its pause.
struct PromoterCtx {
    paused: Mutex<HashMap<(String, i32), SystemTime>>,
}

impl ClientContext for PromoterCtx {}

impl ConsumerContext for PromoterCtx {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) | Rebalance::Assign(tpl) = rebalance {
            tracing::debug!(
                assign = matches!(rebalance, Rebalance::Assign(_)),
                partitions = tpl.count(),
                "delay promoter rebalance"
            );
            let mut paused = lock(&self.paused);
            for e in tpl.elements() {
                paused.remove(&(e.topic().to_string(), e.partition()));
            }
        }
    }
}

/// One queue's promoter, run on a thread of its own.
struct PromoterRun {
    topic: String,
    consumer: BaseConsumer<PromoterCtx>,
    producer: FutureProducer,
    moved: Arc<AtomicUsize>,
    timeout: Duration,
}

/// How long a promoter waits before retrying a record it could not move.
const RETRY_MOVE: Duration = Duration::from_secs(1);

impl PromoterRun {
    fn new(
        config: &KafkaConfig,
        queue: &str,
        producer: FutureProducer,
        moved: Arc<AtomicUsize>,
    ) -> Result<Self, KafkaError> {
        let topic = config.topic(queue);
        let tiers: Vec<String> = (0..TIERS.len()).map(|i| tier_topic(&topic, i)).collect();
        let mut client = config.consumer_client();
        if !config
            .properties
            .contains_key("partition.assignment.strategy")
        {
            client.set("partition.assignment.strategy", "cooperative-sticky");
        }
        let consumer: BaseConsumer<PromoterCtx> = client
            .set("group.id", format!("{}.delay", config.group(queue)))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            // A record hopping to a shorter tier is fetched at once, not after a long poll.
            .set("fetch.wait.max.ms", "50")
            .create_with_context(PromoterCtx {
                paused: Mutex::new(HashMap::new()),
            })?;
        let names: Vec<&str> = tiers.iter().map(String::as_str).collect();
        consumer.subscribe(&names)?;
        Ok(PromoterRun {
            topic,
            consumer,
            producer,
            moved,
            timeout: config.timeout,
        })
    }

    fn run(self, stop: &AtomicBool, progress: &std::sync::mpsc::Sender<()>) {
        while !stop.load(Ordering::Relaxed) {
            let now = SystemTime::now();
            let wait = self.resume_due(now);
            match self.consumer.poll(wait) {
                Some(Ok(m)) => {
                    let (tier_topic, p, offset) =
                        (m.topic().to_string(), m.partition(), m.offset());
                    let key = (tier_topic.clone(), p);
                    if lock(&self.consumer.context().paused).contains_key(&key) {
                        continue; // fetched before the pause: read again after it
                    }
                    let Some(tier) = tier_of(&self.topic, &tier_topic) else {
                        continue;
                    };
                    let headers: Vec<(String, String)> = m
                        .headers()
                        .map(|h| {
                            h.iter()
                                .filter_map(|h| {
                                    h.value.map(|v| {
                                        (h.key.to_string(), String::from_utf8_lossy(v).into_owned())
                                    })
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    let body = bytes::Bytes::copy_from_slice(m.payload().unwrap_or_default());
                    let record_key = m
                        .key()
                        .map(|k| String::from_utf8_lossy(k).into_owned())
                        .filter(|k| !k.is_empty());
                    let written = m.timestamp().to_millis();
                    let fallback = format!("kafka-{tier_topic}-{p}-{offset}");
                    let env = wire::from_wire(
                        headers.iter().map(|(k, v)| (k.as_str(), v.clone())),
                        body.clone(),
                        &fallback,
                    );
                    let due = env.not_before.unwrap_or(now);
                    let leave = leaves_at(tier, written, due);
                    if leave > now {
                        self.hold(&tier_topic, p, offset, leave);
                        continue;
                    }
                    let remaining = due.duration_since(now).unwrap_or_default();
                    let to = if remaining.is_zero() {
                        self.topic.clone()
                    } else {
                        crate::delay::tier_topic(&self.topic, tier_for(remaining))
                    };
                    let sent = block_on(self.producer.send(
                        record(&to, record_key.as_deref(), &headers, &body),
                        self.timeout,
                    ));
                    match sent {
                        Ok(_) => {
                            let mut tpl = TopicPartitionList::new();
                            let _ = tpl.add_partition_offset(
                                &tier_topic,
                                p,
                                Offset::Offset(offset + 1),
                            );
                            if let Err(e) = self.consumer.commit(&tpl, CommitMode::Async) {
                                tracing::debug!(topic = %tier_topic, error = %e, "commit of a moved delayed record failed (the next one carries it)");
                            }
                            tracing::debug!(from = %tier_topic, %to, offset, "delayed record moved");
                            if to == self.topic {
                                self.moved.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err((e, _)) => {
                            tracing::warn!(topic = %tier_topic, to = %to, error = %e, "moving a delayed record failed; retrying");
                            self.hold(&tier_topic, p, offset, now + RETRY_MOVE);
                        }
                    }
                }
                Some(Err(e)) => {
                    tracing::debug!(topic = %self.topic, error = %e, "delay promoter: fetch failed (retrying)");
                }
                None => {}
            }
        }
        // Leaving: commit what was moved, then leave the group (on drop).
        let _ = self.consumer.commit_consumer_state(CommitMode::Sync);
        let _ = progress.send(());
        drop(self);
        let _ = progress.send(());
    }

    /// Pauses a partition at `offset` until `until`: it is read again from there.
    fn hold(&self, topic: &str, p: i32, offset: i64, until: SystemTime) {
        let mut tpl = TopicPartitionList::new();
        let _ = tpl.add_partition(topic, p);
        if let Err(e) = self.consumer.pause(&tpl) {
            tracing::warn!(topic, partition = p, error = %e, "delay promoter: pause failed");
        }
        if let Err(e) = self
            .consumer
            .seek(topic, p, Offset::Offset(offset), self.timeout)
        {
            tracing::warn!(topic, partition = p, error = %e, "delay promoter: seek back failed");
        }
        lock(&self.consumer.context().paused).insert((topic.to_string(), p), until);
    }

    /// Resumes the partitions whose head is due; how long to poll before the next one is.
    fn resume_due(&self, now: SystemTime) -> Duration {
        let mut paused = lock(&self.consumer.context().paused);
        let due: Vec<(String, i32)> = paused
            .iter()
            .filter(|(_, until)| **until <= now)
            .map(|(k, _)| k.clone())
            .collect();
        if !due.is_empty() {
            let mut tpl = TopicPartitionList::new();
            for (t, p) in &due {
                let _ = tpl.add_partition(t, *p);
                paused.remove(&(t.clone(), *p));
            }
            if let Err(e) = self.consumer.resume(&tpl) {
                tracing::warn!(topic = %self.topic, error = %e, "delay promoter: resume failed");
            }
        }
        let next = paused
            .values()
            .filter_map(|until| until.duration_since(now).ok())
            .min()
            .unwrap_or(IDLE_POLL);
        next.clamp(Duration::from_millis(1), IDLE_POLL)
    }
}

/// The longest a promoter polls in one go (how soon it sees a stop).
const IDLE_POLL: Duration = Duration::from_millis(100);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_goes_to_the_longest_tier_it_outlasts() {
        assert_eq!(tier_for(Duration::ZERO), 0);
        assert_eq!(tier_for(Duration::from_millis(999)), 0);
        assert_eq!(tier_for(Duration::from_secs(1)), 1);
        assert_eq!(tier_for(Duration::from_secs(29)), 2);
        assert_eq!(tier_for(Duration::from_secs(299)), 3);
        assert_eq!(tier_for(Duration::from_secs(3599)), 4);
        assert_eq!(tier_for(Duration::from_secs(86_400)), 5);
        assert_eq!(tier_of("q", &tier_topic("q", 3)), Some(3));
        assert_eq!(tier_of("q", "q.delay-7s"), None);
        assert_eq!(tier_of("q", "other.delay-1s"), None);
    }

    #[test]
    fn a_record_never_leaves_after_its_due_time_and_tier_zero_waits_for_it() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let written = Some(millis(t0));
        let due = t0 + Duration::from_secs(7);
        // Tier 5s: leaves 5 s after it was written, then hops with 2 s left.
        assert_eq!(leaves_at(2, written, due), t0 + Duration::from_secs(5));
        // Written late (a slow producer): never past its due time.
        assert_eq!(leaves_at(3, written, due), due);
        // Tier 0s: at its due time.
        assert_eq!(leaves_at(0, written, due), due);
        assert_eq!(leaves_at(1, None, due), due);
    }
}
