//! The in-memory broker: full broker semantics (leases that expire and can be extended, native
//! unbounded delay, per-key ordering, depth counts, payload limit) inside one process. It backs the
//! quickstart and the test suites, and is a fine choice for tests of your own handlers. It keeps
//! nothing across a process restart ([`Capabilities::durable`] is false).
//!
//! Handles made with [`Clone`] share the same queues, like several connections to one server; each
//! handle has its own closed flag, so one worker closing its handle does not close the others.

use crate::broker::{Broker, Delivery, Depth, Receipt, ReceiveOptions};
use crate::capabilities::{Capabilities, DelaySupport, LeaseSupport, OrderingSupport};
use crate::envelope::Envelope;
use crate::error::BrokerError;
use crate::factory::{
    size_setting, BackendFactory, BackendSetup, ConnectContext, Settings, SettingsError,
};
use async_trait::async_trait;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::Notify;

/// Default largest payload, in bytes (4 MiB).
pub const DEFAULT_MAX_PAYLOAD: usize = 4 * 1024 * 1024;

/// In-process broker. Cheap to clone; clones share queues. Thread safe.
#[derive(Debug)]
pub struct MemoryBroker {
    shared: Arc<Shared>,
    closed: Arc<AtomicBool>,
}

#[derive(Debug)]
struct Shared {
    queues: Mutex<HashMap<String, Queue>>,
    caps: Capabilities,
    next_token: AtomicU64,
}

#[derive(Debug)]
struct Stored {
    env: Envelope,
    deliveries: u32,
    ready_since: SystemTime,
}

#[derive(Debug)]
struct Leased {
    stored: Stored,
    deadline: Instant,
}

#[derive(Debug)]
struct DelayedItem {
    due: SystemTime,
    seq: u64,
    stored: Stored,
}

impl PartialEq for DelayedItem {
    fn eq(&self, o: &Self) -> bool {
        (self.due, self.seq) == (o.due, o.seq)
    }
}
impl Eq for DelayedItem {}
impl PartialOrd for DelayedItem {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for DelayedItem {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.due, self.seq).cmp(&(o.due, o.seq))
    }
}

#[derive(Debug, Default)]
struct Queue {
    ready: VecDeque<Stored>,
    delayed: BinaryHeap<Reverse<DelayedItem>>,
    in_flight: HashMap<u64, Leased>,
    expiries: BinaryHeap<Reverse<(Instant, u64)>>,
    keys_in_flight: HashMap<String, u32>,
    notify: Arc<Notify>,
}

impl Queue {
    /// Promotes due delayed messages and takes back expired leases.
    fn maintain(&mut self, now: SystemTime, now_i: Instant) {
        while let Some(Reverse(top)) = self.delayed.peek() {
            if top.due > now {
                break;
            }
            if let Some(Reverse(mut item)) = self.delayed.pop() {
                item.stored.ready_since = now;
                self.ready.push_back(item.stored);
            }
        }
        while let Some(Reverse((deadline, token))) = self.expiries.peek().copied() {
            if deadline > now_i {
                break;
            }
            self.expiries.pop();
            let current = self.in_flight.get(&token).map(|l| l.deadline);
            if current == Some(deadline) {
                if let Some(leased) = self.in_flight.remove(&token) {
                    self.unlock_key(&leased.stored.env);
                    let mut s = leased.stored;
                    s.ready_since = now;
                    self.ready.push_front(s);
                }
            }
        }
    }

    fn unlock_key(&mut self, env: &Envelope) {
        if let Some(k) = &env.key {
            if let Some(n) = self.keys_in_flight.get_mut(k) {
                *n -= 1;
                if *n == 0 {
                    self.keys_in_flight.remove(k);
                }
            }
        }
    }

    fn next_event(&self, now: SystemTime, now_i: Instant) -> Option<Duration> {
        let d = self
            .delayed
            .peek()
            .map(|Reverse(i)| i.due.duration_since(now).unwrap_or_default());
        let e = self
            .expiries
            .peek()
            .map(|Reverse((t, _))| t.saturating_duration_since(now_i));
        match (d, e) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// `broker.kind = "memory"`: the in-process broker. Settings: `max_payload` (bytes, default
/// [`DEFAULT_MAX_PAYLOAD`]). Every [`BackendSetup::connect`] of one setup returns a handle on the
/// same queues, so a worker and the producers of its process share them; another process never
/// sees them ([`Capabilities::shared`] is false).
#[derive(Clone, Copy, Debug, Default)]
pub struct MemoryFactory;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct MemorySettings {
    max_payload: Option<u64>,
}

#[derive(Debug)]
struct MemorySetup {
    broker: MemoryBroker,
    store: crate::store::MemoryStore,
}

impl BackendFactory for MemoryFactory {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn keys(&self) -> &'static [&'static str] {
        &["max_payload"]
    }

    fn configure(&self, settings: &Settings) -> Result<Box<dyn BackendSetup>, SettingsError> {
        let s: MemorySettings = settings.parse()?;
        let max = size_setting("max_payload", s.max_payload, DEFAULT_MAX_PAYLOAD)?;
        Ok(Box::new(MemorySetup {
            broker: MemoryBroker::with_max_payload(max),
            store: crate::store::MemoryStore::new(),
        }))
    }
}

#[async_trait]
impl BackendSetup for MemorySetup {
    fn capabilities(&self) -> Capabilities {
        self.broker.shared.caps.clone()
    }

    async fn connect(&self, _ctx: &ConnectContext) -> Result<Arc<dyn Broker>, BrokerError> {
        Ok(Arc::new(self.broker.clone()))
    }

    fn store(&self) -> Option<Box<dyn crate::store::StoreSetup>> {
        Some(crate::store::memory_setup(self.store.clone()))
    }
}

/// A memory receipt's token: the lease's number within its queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Token(u64);

fn token_of(r: &Receipt) -> Option<u64> {
    r.token::<Token>().map(|t| t.0)
}

impl Default for MemoryBroker {
    fn default() -> Self {
        Self::new()
    }
}

impl Clone for MemoryBroker {
    /// A new handle on the same queues, with its own closed flag.
    fn clone(&self) -> Self {
        MemoryBroker {
            shared: self.shared.clone(),
            closed: Arc::new(AtomicBool::new(false)),
        }
    }
}

impl MemoryBroker {
    /// Puts leased messages back at the front of their queues (`uncounted`: with this hand-out's
    /// delivery count undone).
    fn give_back(&self, receipts: &[Receipt], uncounted: bool) -> Result<(), BrokerError> {
        let now = SystemTime::now();
        let mut lost = None;
        let mut map = self.lock()?;
        // Release in reverse so that pushing to the front keeps the original order.
        for r in receipts.iter().rev() {
            let Some(q) = map.get_mut(r.queue()) else {
                lost = Some(r.queue().to_string());
                continue;
            };
            match token_of(r).and_then(|t| q.in_flight.remove(&t)) {
                Some(l) => {
                    q.unlock_key(&l.stored.env);
                    let mut s = l.stored;
                    s.ready_since = now;
                    if uncounted {
                        s.deliveries = s.deliveries.saturating_sub(1);
                    }
                    q.ready.push_front(s);
                    q.notify.notify_waiters();
                }
                None => lost = Some(r.queue().to_string()),
            }
        }
        match lost {
            Some(queue) => Err(BrokerError::LeaseLost { queue }),
            None => Ok(()),
        }
    }

    /// A broker with the default payload limit ([`DEFAULT_MAX_PAYLOAD`]).
    pub fn new() -> Self {
        Self::with_max_payload(DEFAULT_MAX_PAYLOAD)
    }

    /// A broker that refuses payloads over `max_payload` bytes at publish.
    pub fn with_max_payload(max_payload: usize) -> Self {
        MemoryBroker {
            shared: Arc::new(Shared {
                queues: Mutex::new(HashMap::new()),
                caps: Capabilities {
                    delay: DelaySupport::Native { max: None },
                    lease: LeaseSupport::Timed { max: None },
                    ordering: OrderingSupport::PerKey,
                    max_payload,
                    max_batch: 1000,
                    durable: false,
                    delay_tolerance: Duration::from_millis(20),
                    depth_staleness: Duration::ZERO,
                    shared: false,
                    counts_deliveries: true,
                    uncounted_release: true,
                    sharing: crate::Sharing::Any,
                    max_headers: None,
                },
                next_token: AtomicU64::new(1),
            }),
            closed: Arc::new(AtomicBool::new(false)),
        }
    }

    fn lock(&self) -> Result<MutexGuard<'_, HashMap<String, Queue>>, BrokerError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(BrokerError::Closed);
        }
        // A panic while holding the lock cannot leave a queue half-updated in a way that matters more
        // than losing the whole broker, so recover the guard.
        Ok(self.shared.queues.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn notify_of(&self, queue: &str) -> Result<Arc<Notify>, BrokerError> {
        Ok(self
            .lock()?
            .entry(queue.to_string())
            .or_default()
            .notify
            .clone())
    }

    fn take(
        &self,
        queue: &str,
        opts: &ReceiveOptions,
    ) -> Result<(Vec<Delivery>, Option<Duration>), BrokerError> {
        let now = SystemTime::now();
        let now_i = Instant::now();
        let mut map = self.lock()?;
        let q = map.entry(queue.to_string()).or_default();
        q.maintain(now, now_i);
        let max = opts.max.min(self.shared.caps.max_batch);
        let mut out = Vec::new();
        let mut skipped = VecDeque::new();
        // One name shared by every receipt of this receive.
        let receipt_queue: Arc<str> = Arc::from(queue);
        while out.len() < max {
            let Some(mut s) = q.ready.pop_front() else {
                break;
            };
            if let Some(k) = &s.env.key {
                if q.keys_in_flight.contains_key(k) {
                    skipped.push_back(s);
                    continue;
                }
                *q.keys_in_flight.entry(k.clone()).or_default() += 1;
            }
            s.deliveries += 1;
            let token = self.shared.next_token.fetch_add(1, Ordering::Relaxed);
            let deadline = now_i + opts.lease;
            out.push(Delivery {
                envelope: s.env.clone(),
                receipt: Receipt::new(receipt_queue.clone(), Token(token)),
                delivery_count: s.deliveries,
            });
            q.expiries.push(Reverse((deadline, token)));
            q.in_flight.insert(
                token,
                Leased {
                    stored: s,
                    deadline,
                },
            );
        }
        // Put skipped (key-blocked) messages back in their original order.
        while let Some(s) = skipped.pop_back() {
            q.ready.push_front(s);
        }
        Ok((out, q.next_event(now, now_i)))
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn capabilities(&self) -> &Capabilities {
        &self.shared.caps
    }

    async fn publish(&self, queue: &str, messages: Vec<Envelope>) -> Result<(), BrokerError> {
        self.shared.caps.check_payloads(&messages, "memory")?;
        let now = SystemTime::now();
        let mut map = self.lock()?;
        let q = map.entry(queue.to_string()).or_default();
        for env in messages {
            let stored = Stored {
                env,
                deliveries: 0,
                ready_since: now,
            };
            match stored.env.not_before.filter(|t| *t > now) {
                Some(due) => {
                    let seq = self.shared.next_token.fetch_add(1, Ordering::Relaxed);
                    q.delayed.push(Reverse(DelayedItem { due, seq, stored }));
                }
                None => q.ready.push_back(stored),
            }
        }
        q.notify.notify_waiters();
        Ok(())
    }

    async fn receive(
        &self,
        queue: &str,
        opts: ReceiveOptions,
    ) -> Result<Vec<Delivery>, BrokerError> {
        let deadline = Instant::now() + opts.wait;
        let notify = self.notify_of(queue)?;
        loop {
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (got, next_event) = self.take(queue, &opts)?;
            let now = Instant::now();
            if !got.is_empty() || now >= deadline {
                return Ok(got);
            }
            let mut sleep = deadline - now;
            if let Some(e) = next_event {
                sleep = sleep.min(e.max(Duration::from_millis(1)));
            }
            let _ = tokio::time::timeout(sleep, notified).await;
        }
    }

    async fn ack(&self, receipts: &[Receipt]) -> Result<(), BrokerError> {
        let mut lost = None;
        let mut map = self.lock()?;
        for r in receipts {
            let removed = map.get_mut(r.queue()).and_then(|q| {
                let l = q.in_flight.remove(&token_of(r)?)?;
                q.unlock_key(&l.stored.env);
                if l.stored.env.key.is_some() {
                    q.notify.notify_waiters();
                }
                Some(())
            });
            if removed.is_none() {
                lost = Some(r.queue().to_string());
            }
        }
        match lost {
            Some(queue) => Err(BrokerError::LeaseLost { queue }),
            None => Ok(()),
        }
    }

    async fn release(&self, receipts: &[Receipt]) -> Result<(), BrokerError> {
        self.give_back(receipts, false)
    }

    /// Gives the messages back in place with their delivery count undone.
    async fn release_uncounted(&self, deliveries: Vec<Delivery>) -> Result<(), BrokerError> {
        let receipts: Vec<Receipt> = deliveries.into_iter().map(|d| d.receipt).collect();
        self.give_back(&receipts, true)
    }

    async fn extend_lease(&self, receipt: &Receipt, lease: Duration) -> Result<(), BrokerError> {
        let mut map = self.lock()?;
        let lost = || BrokerError::LeaseLost {
            queue: receipt.queue().to_string(),
        };
        let q = map.get_mut(receipt.queue()).ok_or_else(lost)?;
        let token = token_of(receipt).ok_or_else(lost)?;
        let now_i = Instant::now();
        // A lease that ran out but was not yet taken back by `maintain` is lost all the same.
        let l = q
            .in_flight
            .get_mut(&token)
            .filter(|l| l.deadline > now_i)
            .ok_or_else(lost)?;
        l.deadline = now_i + lease;
        q.expiries.push(Reverse((l.deadline, token)));
        Ok(())
    }

    async fn browse(&self, queue: &str, max: usize) -> Result<Vec<Envelope>, BrokerError> {
        let now = SystemTime::now();
        let mut map = self.lock()?;
        let Some(q) = map.get_mut(queue) else {
            return Ok(Vec::new());
        };
        q.maintain(now, Instant::now());
        let mut leased: Vec<(&u64, &Leased)> = q.in_flight.iter().collect();
        leased.sort_by_key(|(token, _)| **token);
        Ok(q.ready
            .iter()
            .chain(leased.into_iter().map(|(_, l)| &l.stored))
            .take(max)
            .map(|s| s.env.clone())
            .collect())
    }

    async fn depth(&self, queue: &str) -> Result<Depth, BrokerError> {
        let now = SystemTime::now();
        let mut map = self.lock()?;
        let q = map.entry(queue.to_string()).or_default();
        q.maintain(now, Instant::now());
        Ok(Depth {
            ready: q.ready.len() as u64,
            in_flight: q.in_flight.len() as u64,
            delayed: Some(q.delayed.len() as u64),
            oldest_age: q
                .ready
                .iter()
                .map(|s| s.ready_since)
                .min()
                .and_then(|t| now.duration_since(t).ok()),
        })
    }

    async fn close(&self) -> Result<(), BrokerError> {
        self.closed.store(true, Ordering::Release);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(max: usize, wait_ms: u64, lease_ms: u64) -> ReceiveOptions {
        ReceiveOptions {
            max,
            wait: Duration::from_millis(wait_ms),
            lease: Duration::from_millis(lease_ms),
        }
    }

    #[tokio::test]
    async fn expired_lease_redelivers_with_higher_count() -> Result<(), BrokerError> {
        let b = MemoryBroker::new();
        b.publish("q", vec![Envelope::new("j", "x")]).await?;
        let first = b.receive("q", opts(1, 0, 50)).await?;
        assert_eq!(first.len(), 1);
        assert!(
            b.receive("q", opts(1, 0, 50)).await?.is_empty(),
            "leased, not ready"
        );
        let again = b.receive("q", opts(1, 500, 50)).await?;
        assert_eq!(again[0].delivery_count, 2);
        assert!(matches!(
            b.ack(&[first[0].receipt.clone()]).await,
            Err(BrokerError::LeaseLost { .. })
        ));
        b.ack(&[again[0].receipt.clone()]).await?;
        assert_eq!(b.depth("q").await?, Depth::default());
        Ok(())
    }

    #[tokio::test]
    async fn waits_for_delayed_message() -> Result<(), BrokerError> {
        let b = MemoryBroker::new();
        let start = Instant::now();
        b.publish(
            "q",
            vec![Envelope::new("j", "x").delayed(Duration::from_millis(80))],
        )
        .await?;
        assert_eq!(b.depth("q").await?.delayed, Some(1));
        let got = b.receive("q", opts(1, 2000, 1000)).await?;
        assert_eq!(got.len(), 1);
        assert!(start.elapsed() >= Duration::from_millis(80));
        Ok(())
    }

    #[tokio::test]
    async fn per_key_order_holds_while_in_flight() -> Result<(), BrokerError> {
        let b = MemoryBroker::new();
        let mk = |k: &str, n: u8| {
            let mut e = Envelope::new("j", vec![n]);
            e.key = Some(k.into());
            e
        };
        b.publish("q", vec![mk("a", 1), mk("a", 2), mk("b", 3)])
            .await?;
        let got = b.receive("q", opts(10, 0, 1000)).await?;
        let bodies: Vec<u8> = got.iter().map(|d| d.envelope.payload[0]).collect();
        assert_eq!(bodies, vec![1, 3], "second 'a' waits for the first");
        b.ack(&[got[0].receipt.clone()]).await?;
        let got = b.receive("q", opts(10, 0, 1000)).await?;
        assert_eq!(got[0].envelope.payload[0], 2);
        Ok(())
    }

    #[tokio::test]
    async fn oversized_payload_fails_at_publish() {
        let b = MemoryBroker::with_max_payload(4);
        let r = b.publish("q", vec![Envelope::new("j", "12345")]).await;
        assert!(matches!(
            r,
            Err(BrokerError::PayloadTooLarge {
                size: 5,
                max: 4,
                ..
            })
        ));
    }

    #[tokio::test]
    async fn closed_handle_fails_but_clone_works() -> Result<(), BrokerError> {
        let a = MemoryBroker::new();
        let b = a.clone();
        a.close().await?;
        assert!(matches!(a.depth("q").await, Err(BrokerError::Closed)));
        b.publish("q", vec![Envelope::new("j", "x")]).await?;
        Ok(())
    }
}
