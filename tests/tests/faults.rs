//! The suite checks itself: a broker with one injected fault must fail the scenario that covers it
//! (so no scenario passes vacuously), a correct delay store must pass scenarios 11 and 14, and a
//! broker whose native delay is capped at 1 s must pass scenario 11 through the runtime's hops.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use stevedore_conformance::{async_trait, run, Backend, Outcome};
use stevedore_core::{
    new_id, Broker, BrokerError, Capabilities, DelayStore, DelaySupport, Delivery, Depth, Envelope,
    MemoryBroker, Receipt, ReceiveOptions,
};

/// One way for a broker to break its contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// Correct, but with no native delay and a [`Store`] instead.
    None,
    /// User headers vanish on the way.
    DropsUserHeaders,
    /// `extend_lease` answers Ok and does nothing.
    IgnoresExtend,
    /// Declares a 1 KiB limit, enforces none.
    NoLimitCheck,
    /// Delivers delayed messages at once.
    IgnoresDelay,
    /// Declares per-key ordering, keeps none.
    NoKeyOrdering,
    /// Reports no in-flight messages.
    DepthLies,
    /// Acks of lost leases succeed.
    HidesLeaseLost,
    /// Takes half the requested lease.
    ShortLease,
    /// The delay store's promotion is not atomic: concurrent promoters move a message twice.
    DoublePromote,
    /// Forgets released messages.
    LosesReleased,
    /// Counts an uncounted release (as a plain release does).
    CountsUncounted,
    /// Correct and restartable: while "restarting" (500 ms) every call fails with a connection error.
    Restartable,
    /// Correct, with native delay capped at [`DELAY_CAP`]: a message due later is held for the cap
    /// only and arrives early with its true `not_before`, for the runtime to re-publish ("hop").
    CappedDelay,
    /// Priority levels are not kept apart: `q__high` and `q__low` are the same queue as `q`.
    MergesLevels,
    /// The first receive from each high-priority queue on a handle comes back empty although
    /// messages are ready (a push consumer the broker has not pushed to yet, as RabbitMQ's was
    /// under load, while the low level's consumer had been pushed to).
    LagsFirstPush,
}

/// The longest delay a [`Fault::CappedDelay`] broker holds in one go.
const DELAY_CAP: Duration = Duration::from_secs(1);
/// Where a [`Fault::CappedDelay`] broker keeps a capped message's true `not_before` (nanoseconds
/// since the epoch) while holding it.
const TRUE_NOT_BEFORE: &str = "x-capped-not-before";

/// The queue a [`Fault::MergesLevels`] broker really uses for `queue`.
fn merged(queue: &str) -> &str {
    queue
        .strip_suffix("__high")
        .or_else(|| queue.strip_suffix("__low"))
        .unwrap_or(queue)
}

#[derive(Debug)]
struct Faulty {
    inner: MemoryBroker,
    fault: Fault,
    caps: Capabilities,
    store: Option<Arc<Store>>,
    down: Arc<AtomicBool>,
    /// Publishes a [`Fault::CappedDelay`] broker shortened to the cap.
    capped: Arc<AtomicUsize>,
    /// Queues this handle received from ([`Fault::LagsFirstPush`]).
    pushed: Mutex<std::collections::HashSet<String>>,
}

impl Faulty {
    fn up(&self) -> Result<(), BrokerError> {
        if self.down.load(Ordering::Relaxed) {
            return Err(BrokerError::Connection(
                "connection refused (restarting)".into(),
            ));
        }
        Ok(())
    }
}

#[async_trait]
impl Broker for Faulty {
    fn name(&self) -> &'static str {
        "faulty"
    }
    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }
    async fn publish(&self, queue: &str, mut messages: Vec<Envelope>) -> Result<(), BrokerError> {
        self.up()?;
        let now = SystemTime::now();
        for m in &mut messages {
            match self.fault {
                Fault::IgnoresDelay => m.not_before = None,
                Fault::CappedDelay => {
                    let due = m.not_before.filter(|t| {
                        t.duration_since(now)
                            .is_ok_and(|remaining| remaining > DELAY_CAP)
                    });
                    if let Some(due) = due {
                        let nanos = due
                            .duration_since(UNIX_EPOCH)
                            .unwrap_or_default()
                            .as_nanos();
                        m.headers.insert(TRUE_NOT_BEFORE.into(), nanos.to_string());
                        m.not_before = Some(now + DELAY_CAP);
                        self.capped.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Fault::NoKeyOrdering => {
                    if let Some(k) = m.key.take() {
                        m.headers.insert("x-hidden-key".into(), k);
                    }
                }
                _ => {}
            }
        }
        let queue = if self.fault == Fault::MergesLevels {
            merged(queue)
        } else {
            queue
        };
        self.inner.publish(queue, messages).await
    }
    async fn receive(&self, queue: &str, o: ReceiveOptions) -> Result<Vec<Delivery>, BrokerError> {
        self.up()?;
        let mut o = o;
        if self.fault == Fault::ShortLease {
            o.lease /= 2;
        }
        let queue = if self.fault == Fault::MergesLevels {
            merged(queue)
        } else {
            queue
        };
        if self.fault == Fault::LagsFirstPush && queue.ends_with("__high") {
            let first = self
                .pushed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(queue.to_string());
            if first {
                return Ok(Vec::new());
            }
        }
        let mut got = self.inner.receive(queue, o).await?;
        for d in &mut got {
            match self.fault {
                Fault::DropsUserHeaders => d.envelope.headers.clear(),
                Fault::CappedDelay => {
                    let held = d.envelope.headers.remove(TRUE_NOT_BEFORE);
                    if let Some(nanos) = held.and_then(|v| v.parse::<u64>().ok()) {
                        d.envelope.not_before = Some(UNIX_EPOCH + Duration::from_nanos(nanos));
                    }
                }
                Fault::NoKeyOrdering => d.envelope.key = d.envelope.headers.remove("x-hidden-key"),
                _ => {}
            }
        }
        Ok(got)
    }
    async fn ack(&self, receipts: &[Receipt]) -> Result<(), BrokerError> {
        self.up()?;
        match self.inner.ack(receipts).await {
            Err(BrokerError::LeaseLost { .. }) if self.fault == Fault::HidesLeaseLost => Ok(()),
            other => other,
        }
    }
    async fn release(&self, receipts: &[Receipt]) -> Result<(), BrokerError> {
        if self.fault == Fault::LosesReleased {
            return self.inner.ack(receipts).await;
        }
        self.inner.release(receipts).await
    }
    async fn release_uncounted(&self, deliveries: Vec<Delivery>) -> Result<(), BrokerError> {
        let receipts = || {
            deliveries
                .iter()
                .map(|d| d.receipt.clone())
                .collect::<Vec<_>>()
        };
        match self.fault {
            Fault::LosesReleased => self.inner.ack(&receipts()).await,
            Fault::CountsUncounted => self.inner.release(&receipts()).await,
            _ => self.inner.release_uncounted(deliveries).await,
        }
    }
    async fn extend_lease(&self, receipt: &Receipt, lease: Duration) -> Result<(), BrokerError> {
        if self.fault == Fault::IgnoresExtend {
            return Ok(());
        }
        self.inner.extend_lease(receipt, lease).await
    }
    async fn depth(&self, queue: &str) -> Result<Depth, BrokerError> {
        let mut d = self.inner.depth(queue).await?;
        if self.fault == Fault::DepthLies {
            d.in_flight = 0;
        }
        if let Some(store) = &self.store {
            let stored = store.delayed(queue).await?;
            d.delayed = Some(d.delayed.unwrap_or(0) + stored);
        }
        Ok(d)
    }
    fn delay_store(&self) -> Option<Arc<dyn DelayStore>> {
        self.store.clone().map(|s| s as Arc<dyn DelayStore>)
    }
    async fn close(&self) -> Result<(), BrokerError> {
        self.inner.close().await
    }
}

/// A delay store kept in memory, promoting into the memory broker.
#[derive(Debug)]
struct Store {
    broker: MemoryBroker,
    waiting: Mutex<Vec<(String, Envelope)>>,
    racy: bool,
}

impl Store {
    fn waiting(&self) -> std::sync::MutexGuard<'_, Vec<(String, Envelope)>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl DelayStore for Store {
    async fn schedule(&self, queue: &str, messages: Vec<Envelope>) -> Result<(), BrokerError> {
        self.waiting()
            .extend(messages.into_iter().map(|m| (queue.to_string(), m)));
        Ok(())
    }
    async fn promote_due(&self, now: SystemTime, limit: usize) -> Result<usize, BrokerError> {
        let is_due = |e: &Envelope| match e.not_before {
            None => true,
            Some(t) => t <= now,
        };
        let due: Vec<(String, Envelope)> = if self.racy {
            // Read, pause, then remove: two promoters can both read the same message.
            let seen: Vec<_> = self
                .waiting()
                .iter()
                .filter(|(_, e)| is_due(e))
                .cloned()
                .collect();
            tokio::time::sleep(Duration::from_millis(20)).await;
            self.waiting().retain(|(_, e)| !is_due(e));
            seen
        } else {
            let mut w = self.waiting();
            let (due, keep): (Vec<_>, Vec<_>) = w.drain(..).partition(|(_, e)| is_due(e));
            *w = keep;
            due
        };
        let moved = due.len().min(limit);
        let mut by_queue: BTreeMap<String, Vec<Envelope>> = BTreeMap::new();
        for (q, e) in due {
            by_queue.entry(q).or_default().push(e);
        }
        for (q, es) in by_queue {
            self.broker.publish(&q, es).await?;
        }
        Ok(moved)
    }
    async fn delayed(&self, queue: &str) -> Result<u64, BrokerError> {
        Ok(self.waiting().iter().filter(|(q, _)| q == queue).count() as u64)
    }
}

struct FaultyBackend {
    broker: MemoryBroker,
    fault: Fault,
    store: Option<Arc<Store>>,
    down: Arc<AtomicBool>,
    capped: Arc<AtomicUsize>,
}

impl FaultyBackend {
    fn new(fault: Fault) -> Self {
        let broker = MemoryBroker::new();
        let store = matches!(fault, Fault::None | Fault::DoublePromote).then(|| {
            Arc::new(Store {
                broker: broker.clone(),
                waiting: Mutex::new(Vec::new()),
                racy: fault == Fault::DoublePromote,
            })
        });
        FaultyBackend {
            broker,
            fault,
            store,
            down: Arc::new(AtomicBool::new(false)),
            capped: Arc::new(AtomicUsize::new(0)),
        }
    }
}

#[async_trait]
impl Backend for FaultyBackend {
    fn name(&self) -> &'static str {
        "faulty"
    }
    async fn connect(&self) -> Result<Arc<dyn Broker>, BrokerError> {
        let mut caps = self.broker.capabilities().clone();
        if self.fault == Fault::NoLimitCheck {
            caps.max_payload = 1024;
        }
        if self.store.is_some() {
            caps.delay = DelaySupport::None;
        }
        if self.fault == Fault::Restartable {
            caps.durable = true; // the messages never leave the process, so they do survive
        }
        if self.fault == Fault::CappedDelay {
            caps.delay = DelaySupport::Native {
                max: Some(DELAY_CAP),
            };
        }
        Ok(Arc::new(Faulty {
            inner: self.broker.clone(),
            fault: self.fault,
            caps,
            store: self.store.clone(),
            down: self.down.clone(),
            capped: self.capped.clone(),
            pushed: Mutex::new(Default::default()),
        }))
    }
    async fn publish_foreign(&self, queue: &str, body: &[u8]) -> Result<(), String> {
        let e = Envelope::foreign(new_id(), body.to_vec());
        self.broker
            .publish(queue, vec![e])
            .await
            .map_err(|e| e.to_string())
    }
    async fn restart(&self) -> Result<(), String> {
        if self.fault != Fault::Restartable {
            return Err("in-process broker".into());
        }
        self.down.store(true, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(500)).await;
        self.down.store(false, Ordering::Relaxed);
        Ok(())
    }
}

/// One test at a time: each runs suite scenarios whose timing checks assume the machine is not
/// also running another test's 10,000-message scenario.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn outcome(fault: Fault, scenario: u8) -> Outcome {
    let report = run(Arc::new(FaultyBackend::new(fault)), Some(&[scenario])).await;
    println!("{fault:?}:\n{}", report.table());
    match report.rows.as_slice() {
        [(no, _, outcome, _)] if *no == scenario => outcome.clone(),
        rows => panic!("expected one row for scenario {scenario}, got {rows:?}"),
    }
}

async fn expect_fail(fault: Fault, scenario: u8, reason_has: &str) {
    match outcome(fault, scenario).await {
        Outcome::Fail { reason } => assert!(
            reason.contains(reason_has),
            "{fault:?}: scenario {scenario} failed for another reason: {reason}"
        ),
        other => panic!("{fault:?}: scenario {scenario} should fail, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_fault_fails_its_scenario() {
    let _one_at_a_time = SERIAL.lock().await;
    expect_fail(Fault::DropsUserHeaders, 1, "header").await;
    expect_fail(Fault::IgnoresExtend, 6, "redelivered").await;
    expect_fail(Fault::NoLimitCheck, 15, "accepted").await;
    expect_fail(Fault::IgnoresDelay, 11, "delivered after only").await;
    expect_fail(Fault::NoKeyOrdering, 17, "key").await;
    expect_fail(Fault::DepthLies, 14, "in_flight=0").await;
    expect_fail(Fault::HidesLeaseLost, 5, "expected LeaseLost").await;
    expect_fail(Fault::ShortLease, 5, "before the").await;
    expect_fail(Fault::DoublePromote, 11, "twice").await;
    expect_fail(Fault::LosesReleased, 4, "received 0 of 3").await;
    expect_fail(Fault::CountsUncounted, 4, "the release was counted").await;
}

/// The runtime scenarios fail too when the broker under them breaks its contract.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_fault_fails_its_runtime_scenario() {
    let _one_at_a_time = SERIAL.lock().await;
    expect_fail(Fault::IgnoresDelay, 8, "earlier than the backoff floor").await;
    expect_fail(Fault::DropsUserHeaders, 9, "dead letter of").await;
    expect_fail(Fault::LosesReleased, 10, "replay").await;
    expect_fail(Fault::MergesLevels, 12, "before the last high").await;
    expect_fail(
        Fault::LagsFirstPush,
        12,
        "a low job ran while high jobs were ready",
    )
    .await;
    expect_fail(Fault::LosesReleased, 13, "released jobs").await;
    expect_fail(Fault::CountsUncounted, 13, "must not use up an attempt").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capped_delay_hops_through_the_runtime() {
    let _one_at_a_time = SERIAL.lock().await;
    let backend = Arc::new(FaultyBackend::new(Fault::CappedDelay));
    let capped = backend.capped.clone();
    let report = run(backend, Some(&[11])).await;
    println!("CappedDelay:\n{}", report.table());
    match report.rows.as_slice() {
        [(11, _, Outcome::Pass { detail }, _)] => assert!(
            detail.contains("a job delayed 2.50s, beyond the native cap of 1.00s, so in 2 hops"),
            "{detail}"
        ),
        rows => panic!("scenario 11 against a 1 s delay cap: {rows:?}"),
    }
    // The 2.5 s job was cut to the cap when enqueued and again by the first hop (1.5 s left); the
    // second hop (0.5 s left) fits under the cap.
    let capped = capped.load(Ordering::Relaxed);
    assert_eq!(
        capped, 2,
        "publishes held for the cap only (the runtime's hops re-publish early arrivals)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_store_passes_delay_and_depth() {
    let _one_at_a_time = SERIAL.lock().await;
    for scenario in [11, 14] {
        match outcome(Fault::None, scenario).await {
            Outcome::Pass { detail } => assert!(detail.contains("store"), "{detail}"),
            other => panic!("scenario {scenario} with a correct delay store: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restartable_broker_passes_reconnect() {
    let _one_at_a_time = SERIAL.lock().await;
    match outcome(Fault::Restartable, 16).await {
        Outcome::Pass { detail } => assert!(detail.contains("all 10000 arrived"), "{detail}"),
        other => panic!("scenario 16 against a restartable broker: {other:?}"),
    }
}
