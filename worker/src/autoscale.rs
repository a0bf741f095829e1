//! Autoscale hints: per logical queue, what an external autoscaler (KEDA, an HPA on custom metrics,
//! a script) needs to size the worker fleet.
//!
//! A background sampler ([`spawn_sampler`]) reads the broker's depth of each queue's physical queues
//! every interval, combines it with this worker's [`Stats`], and publishes a [`Hint`] per queue:
//! in [`Hints`] (served as JSON by `GET /scale`), as Prometheus gauges, and as one log line whenever
//! `desired_workers` or `busy` changes.
//!
//! `desired_workers = clamp(ceil((ready + in_flight) / target_per_worker), min_workers, max_workers)`,
//! then capped at the partition count where the broker has one (Kafka). `busy` tells the
//! autoscaler this worker is running jobs, so scale-in should pick another one.

use crate::stats::{QueueStats, Stats};
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};
use stevedore_core::{names, Broker, BrokerError, Depth, Priority};
use tokio::sync::watch;

/// Gauge: messages ready in the queue (all priority levels). Label `queue`.
pub const QUEUE_READY: &str = "stevedore_queue_ready";
/// Gauge: messages waiting for their delay (all priority levels). Label `queue`.
pub const QUEUE_DELAYED: &str = "stevedore_queue_delayed";
/// Gauge: age in seconds of the oldest ready message, 0 when none (or the broker cannot tell).
/// Label `queue`.
pub const QUEUE_OLDEST_AGE: &str = "stevedore_queue_oldest_age_seconds";
/// Gauge: the [`Hint::desired_workers`] of the queue. Label `queue`.
pub const DESIRED_WORKERS: &str = "stevedore_autoscale_desired_workers";

/// The sampler never runs more often than this, whatever [`Settings::interval`] says.
const MIN_INTERVAL: Duration = Duration::from_millis(10);

/// The autoscale hint of one logical queue at the last successful sample. Serialized as a flat JSON
/// object (the shape a KEDA `metrics-api` scaler reads with `valueLocation: desired_workers`).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Hint {
    /// Logical queue name.
    pub queue: String,
    /// Messages ready to be received, summed over the queue's priority levels.
    pub ready: u64,
    /// Messages being processed: the broker's leased count summed over the levels, or this
    /// worker's own count if that is larger (brokers that only see their own consumer's leases).
    pub in_flight: u64,
    /// Messages waiting for their delay, summed over the levels; `None` (JSON `null`) where the
    /// backend cannot count them per queue (RabbitMQ's shared delay queues).
    pub delayed: Option<u64>,
    /// Age of the oldest ready message, in seconds, over all levels; `None` (JSON `null`) when
    /// nothing is ready or the broker cannot tell.
    pub oldest_age_seconds: Option<f64>,
    /// Estimated messages per second entering the queue: `completion_rate` plus the growth rate of
    /// `ready + delayed + in_flight`, never negative. Exact when this worker is the queue's only
    /// consumer; with several workers it undercounts by the others' completions.
    pub arrival_rate: f64,
    /// Jobs per second this worker finished (succeeded or failed, not released) since the previous
    /// sample. 0 on the first sample.
    pub completion_rate: f64,
    /// Workers the queue needs now (see [`desired_workers`]).
    pub desired_workers: u32,
    /// Whether this worker is running jobs of this queue: scale-in should pick another one.
    pub busy: bool,
}

/// Autoscale settings, for every queue of the worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Messages (ready + in flight) one worker is expected to handle; 0 is taken as 1.
    pub target_per_worker: u64,
    /// Fewest workers to ask for (0 allows scale to zero).
    pub min_workers: u32,
    /// Most workers to ask for; a value below `min_workers` is taken as `min_workers`.
    pub max_workers: u32,
    /// Time between samples (at least 10 ms). Each depth call may take at most
    /// `max(interval, 1 s)` before it counts as failed.
    pub interval: Duration,
    /// Most workers that can do useful work at once (Kafka: the partition count), applied after
    /// the min/max clamp; `Some(0)` is taken as 1.
    pub partition_cap: Option<u32>,
}

impl Settings {
    /// What `[autoscale]` of `config` says, on a broker with `caps` (a partitioned broker gives no
    /// more workers work than a level has partitions).
    pub(crate) fn from_config(
        config: &crate::config::Config,
        caps: &stevedore_core::Capabilities,
    ) -> Settings {
        Settings {
            target_per_worker: config.autoscale.target_per_worker,
            min_workers: config.autoscale.min_workers,
            max_workers: config.autoscale.max_workers,
            interval: config.autoscale.interval,
            partition_cap: match caps.sharing {
                stevedore_core::Sharing::Partitioned { partitions, .. } => Some(partitions),
                stevedore_core::Sharing::Any => None,
            },
        }
    }
}

/// Every queue `config` serves, with the physical queues of its priority levels.
pub(crate) fn specs(config: &crate::config::Config) -> Vec<QueueSpec> {
    config
        .effective_queues()
        .iter()
        .map(|(name, q)| QueueSpec {
            name: name.clone(),
            physical: crate::runtime::levels_of(name, q)
                .into_iter()
                .map(|l| l.physical)
                .collect(),
        })
        .collect()
}

/// `clamp(ceil((ready + in_flight) / target_per_worker), min_workers, max_workers)`, then at most
/// `partition_cap`. Never panics: `target_per_worker = 0` counts as 1, `max_workers < min_workers`
/// counts as `max_workers = min_workers`, and sums saturate.
pub fn desired_workers(ready: u64, in_flight: u64, s: &Settings) -> u32 {
    let target = s.target_per_worker.max(1);
    let needed = ready.saturating_add(in_flight).div_ceil(target);
    let needed = u32::try_from(needed).unwrap_or(u32::MAX);
    let max = s.max_workers.max(s.min_workers);
    let desired = needed.clamp(s.min_workers, max);
    match s.partition_cap {
        Some(cap) => desired.min(cap.max(1)),
        None => desired,
    }
}

/// The latest [`Hint`] per logical queue, shared between the sampler (writer) and readers (HTTP,
/// CLI). Reads take a short read lock and copy.
#[derive(Debug, Default)]
pub struct Hints {
    by_queue: RwLock<BTreeMap<String, Hint>>,
    history: RwLock<BTreeMap<String, VecDeque<Rates>>>,
}

/// Samples of rates kept per queue for [`Hints::history`] (the dashboard's chart).
pub const HISTORY: usize = 120;

/// One sample's rates ([`Hints::history`]).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Rates {
    /// [`Hint::arrival_rate`].
    pub arrival: f64,
    /// [`Hint::completion_rate`].
    pub completion: f64,
}

impl Hints {
    /// No hints yet (a queue appears after its first successful sample).
    pub fn new() -> Arc<Hints> {
        Arc::new(Hints::default())
    }

    /// Every hint, ordered by queue name.
    pub fn all(&self) -> Vec<Hint> {
        self.by_queue
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }

    /// The hint of `queue`, if it has been sampled successfully at least once.
    pub fn get(&self, queue: &str) -> Option<Hint> {
        self.by_queue
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(queue)
            .cloned()
    }

    /// The rates of the last [`HISTORY`] samples of `queue`, oldest first (empty for a queue not
    /// sampled yet).
    pub fn history(&self, queue: &str) -> Vec<Rates> {
        self.history
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(queue)
            .map(|q| q.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Stores `hint` under `hint.queue`, returning the one it replaces. The sampler calls it;
    /// public for custom samplers and tests.
    pub fn insert(&self, hint: Hint) -> Option<Hint> {
        {
            let mut h = self.history.write().unwrap_or_else(PoisonError::into_inner);
            let q = match h.get_mut(&hint.queue) {
                Some(q) => q,
                None => h.entry(hint.queue.clone()).or_default(),
            };
            if q.len() == HISTORY {
                q.pop_front();
            }
            q.push_back(Rates {
                arrival: hint.arrival_rate,
                completion: hint.completion_rate,
            });
        }
        self.by_queue
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(hint.queue.clone(), hint)
    }
}

/// A logical queue to sample and its physical queues.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueSpec {
    /// Logical queue name (the key of its [`Hint`] and of its [`Stats`] counters).
    pub name: String,
    /// The physical queues of its priority levels (not the dead-letter queue), whose depths are
    /// summed.
    pub physical: Vec<String>,
}

impl QueueSpec {
    /// `name` with the physical queues of every priority level ([`stevedore_core::names`]).
    pub fn all_levels(name: &str) -> QueueSpec {
        QueueSpec {
            name: name.to_string(),
            physical: Priority::ALL
                .iter()
                .map(|&p| names::physical(name, p))
                .collect(),
        }
    }
}

/// Spawns the sampler on the current Tokio runtime. Every `settings.interval` (the first sample is
/// taken at once) it updates, for each queue, the [`Hint`] in `hints`, the gauges
/// `stevedore_queue_ready`, `stevedore_queue_delayed`, `stevedore_queue_oldest_age_seconds`,
/// `stevedore_autoscale_desired_workers` and `stevedore_jobs_in_flight`, and logs at info when
/// `desired_workers` or `busy` changed. When a queue's depth cannot be read (error or timeout) it
/// logs a warning and keeps that queue's previous hint.
///
/// The task ends soon after `shutdown` turns `true` (or its sender is dropped), even in the middle
/// of a sample.
pub fn spawn_sampler(
    broker: Arc<dyn Broker>,
    queues: Vec<QueueSpec>,
    stats: Arc<Stats>,
    settings: Settings,
    hints: Arc<Hints>,
    mut shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let interval = settings.interval.max(MIN_INTERVAL);
    let mut sampler = Sampler {
        depth_timeout: interval.max(Duration::from_secs(1)),
        queues: queues
            .into_iter()
            .map(|spec| QueueState {
                stats: stats.queue(&spec.name),
                spec,
                previous: None,
            })
            .collect(),
        broker,
        settings,
        hints,
    };
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                () = wait_for_shutdown(&mut shutdown) => break,
                _ = ticker.tick() => {}
            }
            tokio::select! {
                biased;
                () = wait_for_shutdown(&mut shutdown) => break,
                () = sampler.sample_all() => {}
            }
        }
        tracing::debug!("autoscale sampler stopped");
    })
}

/// Resolves once the watch holds `true` or its sender is gone. Cancel-safe.
pub(crate) async fn wait_for_shutdown(rx: &mut watch::Receiver<bool>) {
    loop {
        if *rx.borrow_and_update() {
            return;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// What the rates are computed from, at one sample.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Counts {
    /// This worker's finished jobs so far: processed + failed.
    completed: u64,
    /// ready + delayed + in_flight of the queue.
    backlog: u64,
}

/// `(arrival_rate, completion_rate)` in messages per second between two samples `elapsed` apart.
/// completion = Δcompleted / elapsed; arrival = completion + Δbacklog / elapsed, floored at 0
/// (messages leaving other than by completing, e.g. purged or consumed by other workers, would
/// otherwise make it negative). Both are 0 when no time has passed.
fn rates(prev: Counts, now: Counts, elapsed: Duration) -> (f64, f64) {
    let secs = elapsed.as_secs_f64();
    if secs <= 0.0 {
        return (0.0, 0.0);
    }
    let completion = now.completed.saturating_sub(prev.completed) as f64 / secs;
    let growth = (now.backlog as f64 - prev.backlog as f64) / secs;
    ((completion + growth).max(0.0), completion)
}

/// Sums the depths of `physical` (read concurrently): counts add up, the oldest age is the largest.
async fn total_depth(broker: &dyn Broker, physical: &[String]) -> Result<Depth, BrokerError> {
    let depths = futures::future::try_join_all(physical.iter().map(|q| broker.depth(q))).await?;
    Ok(depths.into_iter().fold(Depth::default(), |acc, d| Depth {
        ready: acc.ready.saturating_add(d.ready),
        in_flight: acc.in_flight.saturating_add(d.in_flight),
        delayed: acc.delayed.zip(d.delayed).map(|(a, b)| a.saturating_add(b)),
        oldest_age: acc.oldest_age.max(d.oldest_age),
    }))
}

struct Sampler {
    broker: Arc<dyn Broker>,
    settings: Settings,
    hints: Arc<Hints>,
    depth_timeout: Duration,
    queues: Vec<QueueState>,
}

struct QueueState {
    spec: QueueSpec,
    stats: Arc<QueueStats>,
    /// When and what the last successful sample saw.
    previous: Option<(Instant, Counts)>,
}

impl Sampler {
    async fn sample_all(&mut self) {
        for q in &mut self.queues {
            q.stats.refresh_in_flight_gauge();
            let depth = match tokio::time::timeout(
                self.depth_timeout,
                total_depth(&*self.broker, &q.spec.physical),
            )
            .await
            {
                Ok(Ok(depth)) => depth,
                Ok(Err(error)) => {
                    tracing::warn!(queue = %q.spec.name, %error, "autoscale: cannot read queue depth; keeping the previous hint");
                    continue;
                }
                Err(_) => {
                    tracing::warn!(queue = %q.spec.name, timeout = ?self.depth_timeout, "autoscale: queue depth timed out; keeping the previous hint");
                    continue;
                }
            };
            let now = Instant::now();
            let local = q.stats.snapshot();
            let in_flight = depth.in_flight.max(local.in_flight);
            let counts = Counts {
                completed: local.processed.saturating_add(local.failed),
                backlog: depth
                    .ready
                    .saturating_add(depth.delayed.unwrap_or(0))
                    .saturating_add(in_flight),
            };
            let (arrival_rate, completion_rate) = match q.previous {
                Some((at, prev)) => rates(prev, counts, now.duration_since(at)),
                None => (0.0, 0.0),
            };
            q.previous = Some((now, counts));
            let hint = Hint {
                queue: q.spec.name.clone(),
                ready: depth.ready,
                in_flight,
                delayed: depth.delayed,
                oldest_age_seconds: depth.oldest_age.map(|d| d.as_secs_f64()),
                arrival_rate,
                completion_rate,
                desired_workers: desired_workers(depth.ready, in_flight, &self.settings),
                busy: local.in_flight > 0,
            };
            publish_gauges(&hint);
            let previous = self.hints.insert(hint.clone());
            let changed = previous
                .is_none_or(|p| p.desired_workers != hint.desired_workers || p.busy != hint.busy);
            if changed {
                tracing::info!(
                    queue = %hint.queue,
                    desired_workers = hint.desired_workers,
                    busy = hint.busy,
                    ready = hint.ready,
                    in_flight = hint.in_flight,
                    delayed = ?hint.delayed,
                    arrival_rate = hint.arrival_rate,
                    completion_rate = hint.completion_rate,
                    "autoscale hint changed"
                );
            }
        }
    }
}

fn publish_gauges(h: &Hint) {
    let queue = h.queue.clone();
    metrics::gauge!(QUEUE_READY, "queue" => queue.clone()).set(h.ready as f64);
    if let Some(delayed) = h.delayed {
        metrics::gauge!(QUEUE_DELAYED, "queue" => queue.clone()).set(delayed as f64);
    }
    metrics::gauge!(QUEUE_OLDEST_AGE, "queue" => queue.clone())
        .set(h.oldest_age_seconds.unwrap_or(0.0));
    metrics::gauge!(DESIRED_WORKERS, "queue" => queue).set(f64::from(h.desired_workers));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::JobResult;
    use async_trait::async_trait;
    use std::sync::atomic::{AtomicBool, Ordering};
    use stevedore_core::{Capabilities, Delivery, Envelope, MemoryBroker, Receipt, ReceiveOptions};

    fn settings(target: u64, min: u32, max: u32, cap: Option<u32>) -> Settings {
        Settings {
            target_per_worker: target,
            min_workers: min,
            max_workers: max,
            interval: Duration::from_millis(20),
            partition_cap: cap,
        }
    }

    #[test]
    fn history_keeps_the_last_samples_per_queue_oldest_first() {
        let hints = Hints::new();
        for i in 0..(HISTORY + 5) {
            hints.insert(Hint {
                queue: "q".into(),
                ready: 0,
                in_flight: 0,
                delayed: Some(0),
                oldest_age_seconds: None,
                arrival_rate: i as f64,
                completion_rate: 2.0 * i as f64,
                desired_workers: 1,
                busy: false,
            });
        }
        let h = hints.history("q");
        assert_eq!(h.len(), HISTORY);
        assert_eq!(h[0].arrival, 5.0);
        assert_eq!(h[HISTORY - 1].completion, 2.0 * (HISTORY + 4) as f64);
        assert!(hints.history("other").is_empty());
    }

    #[test]
    fn desired_workers_rounds_up_and_clamps() {
        let s = settings(10, 1, 5, None);
        assert_eq!(desired_workers(1, 0, &s), 1);
        assert_eq!(desired_workers(10, 0, &s), 1);
        assert_eq!(desired_workers(11, 0, &s), 2);
        assert_eq!(desired_workers(15, 6, &s), 3, "in-flight work counts");
        assert_eq!(desired_workers(1_000, 0, &s), 5, "capped at max");
        assert_eq!(desired_workers(0, 0, &s), 1, "floored at min");
        assert_eq!(desired_workers(u64::MAX, u64::MAX, &s), 5, "no overflow");
    }

    #[test]
    fn desired_workers_scales_to_zero_only_when_allowed() {
        assert_eq!(desired_workers(0, 0, &settings(10, 0, 5, None)), 0);
        assert_eq!(desired_workers(0, 1, &settings(10, 0, 5, None)), 1);
        assert_eq!(desired_workers(0, 0, &settings(10, 2, 5, None)), 2);
    }

    #[test]
    fn desired_workers_respects_the_partition_cap() {
        assert_eq!(desired_workers(1_000, 0, &settings(10, 1, 50, Some(6))), 6);
        assert_eq!(desired_workers(20, 0, &settings(10, 1, 50, Some(6))), 2);
        assert_eq!(
            desired_workers(0, 0, &settings(10, 8, 50, Some(6))),
            6,
            "the cap wins over min: extra consumers would sit idle"
        );
        assert_eq!(desired_workers(1_000, 0, &settings(10, 1, 50, Some(0))), 1);
    }

    #[test]
    fn desired_workers_tolerates_odd_settings() {
        assert_eq!(
            desired_workers(7, 0, &settings(0, 0, 100, None)),
            7,
            "target 0 as 1"
        );
        assert_eq!(
            desired_workers(1_000, 0, &settings(10, 4, 2, None)),
            4,
            "max < min"
        );
        assert_eq!(
            desired_workers(u64::MAX, 0, &settings(1, 0, u32::MAX, None)),
            u32::MAX
        );
    }

    fn counts(completed: u64, backlog: u64) -> Counts {
        Counts { completed, backlog }
    }

    #[test]
    fn rates_in_steady_state() {
        // 100 completed in 2 s, backlog unchanged: arrivals matched completions.
        let (arrival, completion) = rates(counts(0, 40), counts(100, 40), Duration::from_secs(2));
        assert_eq!(completion, 50.0);
        assert_eq!(arrival, 50.0);
    }

    #[test]
    fn rates_when_the_backlog_grows_or_drains() {
        let (arrival, completion) = rates(counts(10, 40), counts(30, 80), Duration::from_secs(2));
        assert_eq!(
            (arrival, completion),
            (30.0, 10.0),
            "growing: 20 done + 40 more in 2 s"
        );
        let (arrival, completion) = rates(counts(10, 80), counts(50, 40), Duration::from_secs(2));
        assert_eq!(
            (arrival, completion),
            (0.0, 20.0),
            "draining with no arrivals"
        );
    }

    #[test]
    fn arrival_rate_is_never_negative() {
        // The backlog dropped by more than this worker completed (purge, other workers).
        let (arrival, completion) = rates(counts(0, 1_000), counts(5, 0), Duration::from_secs(1));
        assert_eq!(completion, 5.0);
        assert_eq!(arrival, 0.0);
    }

    #[test]
    fn rates_over_no_time_are_zero() {
        assert_eq!(
            rates(counts(0, 0), counts(10, 10), Duration::ZERO),
            (0.0, 0.0)
        );
    }

    #[test]
    fn all_levels_names_every_priority_queue() {
        let spec = QueueSpec::all_levels("emails");
        assert_eq!(spec.name, "emails");
        assert_eq!(spec.physical, ["emails__high", "emails", "emails__low"]);
    }

    #[test]
    fn hints_store_and_list_by_name() {
        let hints = Hints::new();
        assert!(hints.all().is_empty());
        let hint = |q: &str, d| Hint {
            queue: q.into(),
            ready: 0,
            in_flight: 0,
            delayed: Some(0),
            oldest_age_seconds: None,
            arrival_rate: 0.0,
            completion_rate: 0.0,
            desired_workers: d,
            busy: false,
        };
        assert_eq!(hints.insert(hint("b", 1)), None);
        assert_eq!(hints.insert(hint("a", 2)), None);
        assert_eq!(hints.insert(hint("b", 3)), Some(hint("b", 1)));
        let names: Vec<_> = hints.all().into_iter().map(|h| h.queue).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(hints.get("b").map(|h| h.desired_workers), Some(3));
        assert_eq!(hints.get("c"), None);
    }

    /// A memory broker whose `depth` fails while `fail` is set.
    #[derive(Debug)]
    struct Flaky {
        inner: MemoryBroker,
        fail: AtomicBool,
    }

    #[async_trait]
    impl Broker for Flaky {
        fn name(&self) -> &'static str {
            "flaky"
        }
        fn capabilities(&self) -> &Capabilities {
            self.inner.capabilities()
        }
        async fn publish(&self, queue: &str, messages: Vec<Envelope>) -> Result<(), BrokerError> {
            self.inner.publish(queue, messages).await
        }
        async fn receive(
            &self,
            queue: &str,
            opts: ReceiveOptions,
        ) -> Result<Vec<Delivery>, BrokerError> {
            self.inner.receive(queue, opts).await
        }
        async fn ack(&self, receipts: &[Receipt]) -> Result<(), BrokerError> {
            self.inner.ack(receipts).await
        }
        async fn release(&self, receipts: &[Receipt]) -> Result<(), BrokerError> {
            self.inner.release(receipts).await
        }
        async fn release_uncounted(&self, d: Vec<Delivery>) -> Result<(), BrokerError> {
            self.inner.release_uncounted(d).await
        }
        async fn extend_lease(
            &self,
            receipt: &Receipt,
            lease: Duration,
        ) -> Result<(), BrokerError> {
            self.inner.extend_lease(receipt, lease).await
        }
        async fn depth(&self, queue: &str) -> Result<Depth, BrokerError> {
            if self.fail.load(Ordering::SeqCst) {
                return Err(BrokerError::Connection("test outage".into()));
            }
            self.inner.depth(queue).await
        }
    }

    async fn wait_for(hints: &Hints, queue: &str, ok: impl Fn(&Hint) -> bool) -> Hint {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(h) = hints.get(queue) {
                if ok(&h) {
                    return h;
                }
            }
            assert!(
                Instant::now() < deadline,
                "hint for {queue} never matched: {:?}",
                hints.get(queue)
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn sampler_sums_levels_keeps_hints_on_failure_and_stops() {
        let broker = Arc::new(Flaky {
            inner: MemoryBroker::new(),
            fail: AtomicBool::new(false),
        });
        let msgs = |n| {
            (0..n)
                .map(|_| Envelope::new("send", "{}").json())
                .collect::<Vec<_>>()
        };
        broker.publish("emails", msgs(15)).await.expect("publish");
        broker
            .publish("emails__high", msgs(10))
            .await
            .expect("publish");
        broker.publish("other", msgs(3)).await.expect("publish");
        let got = broker
            .receive(
                "emails",
                ReceiveOptions {
                    max: 5,
                    wait: Duration::ZERO,
                    lease: Duration::from_secs(30),
                },
            )
            .await
            .expect("receive");
        assert_eq!(got.len(), 5);

        let stats = Stats::new();
        let q = stats.queue("emails");
        q.started();
        let hints = Hints::new();
        let (tx, rx) = watch::channel(false);
        let interval = Duration::from_millis(150);
        let task = spawn_sampler(
            broker.clone(),
            vec![
                QueueSpec::all_levels("emails"),
                QueueSpec::all_levels("other"),
            ],
            Arc::clone(&stats),
            Settings {
                interval,
                ..settings(10, 0, 100, None)
            },
            Arc::clone(&hints),
            rx,
        );

        let h = wait_for(&hints, "emails", |_| true).await;
        assert_eq!(h.ready, 20);
        assert_eq!(
            h.in_flight, 5,
            "the broker's leased count (≥ this worker's 1)"
        );
        assert_eq!(h.delayed, Some(0));
        assert_eq!(h.desired_workers, 3, "ceil(25 / 10)");
        assert!(h.busy);
        assert!(h.oldest_age_seconds.is_some());
        let other = wait_for(&hints, "other", |_| true).await;
        assert_eq!(
            (other.ready, other.desired_workers, other.busy),
            (3, 1, false)
        );

        // An outage keeps the last hint instead of dropping or zeroing it.
        broker.fail.store(true, Ordering::SeqCst);
        q.finished("send", JobResult::Succeeded, Duration::from_millis(1));
        tokio::time::sleep(interval * 2).await;
        let during = hints.get("emails");
        assert_eq!(
            during.as_ref().map(|h| h.busy),
            Some(true),
            "hint from before the outage"
        );
        tokio::time::sleep(interval * 2).await;
        assert_eq!(hints.get("emails"), during, "failed samples change nothing");

        // Back again: the new hint reflects the finished job and the acked message.
        broker.ack(&[got[0].receipt.clone()]).await.expect("ack");
        broker.fail.store(false, Ordering::SeqCst);
        let h2 = wait_for(&hints, "emails", |h| !h.busy).await;
        assert_eq!(h2.in_flight, 4);
        assert!(h2.completion_rate > 0.0, "{h2:?}");
        assert!(h2.arrival_rate >= 0.0);

        tx.send(true).expect("send shutdown");
        tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .expect("sampler stops on shutdown")
            .expect("sampler did not panic");
    }

    #[tokio::test]
    async fn sampler_stops_when_the_shutdown_sender_is_dropped() {
        let (tx, rx) = watch::channel(false);
        let task = spawn_sampler(
            Arc::new(MemoryBroker::new()),
            vec![QueueSpec::all_levels("q")],
            Stats::new(),
            settings(10, 0, 10, None),
            Hints::new(),
            rx,
        );
        drop(tx);
        tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .expect("sampler stops")
            .expect("no panic");
    }
}
