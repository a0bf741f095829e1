//! Rate limits and concurrency limits across all workers (`rate`, `burst`, `max_concurrent` on
//! `[queues.<name>]` and `[jobs.<name>]`), kept in the state store.
//!
//! - **Rate**: GCRA (the token bucket as one timestamp): the store holds the limit's theoretical
//!   arrival time; a job may start when it is no further than `(burst - 1) × interval` ahead of
//!   now, and moves it on by one interval. One compare-and-swap per admitted job.
//! - **Concurrency**: `max_concurrent` slot keys, each taken by a job with a compare-and-swap
//!   from absent, with a time to live (the lease) that this process renews every third of it
//!   while the job runs, and deleted when it ends. A worker that dies holding slots gives them
//!   back when their lease lapses.
//!
//! A job that is not admitted is neither failed nor retried: it is published again on its queue
//! with a delay until it may run (same id, same attempt) and its delivery acked, so it waits on
//! the broker, not in this process. A queue-wide limit also pauses the queue's fetching until
//! then, so the worker does not pull what it cannot start.

use crate::config::Rate;
use rand::Rng;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use stevedore_core::store::Store;
use stevedore_core::BrokerError;

/// Most slots tried per admission.
const PROBES: u32 = 4;

/// How long a job that found every slot taken waits before it is offered again.
pub(crate) const SLOT_RETRY: Duration = Duration::from_millis(250);

/// One limit: a rate, a concurrency limit, or both, over one scope (a queue, a job name).
#[derive(Debug)]
pub(crate) struct Limiter {
    /// `queue:<name>` or `job:<name>` (in store keys and logs).
    pub(crate) scope: String,
    rate: Option<Gcra>,
    slots: Option<(u32, Duration)>,
    store: Arc<dyn Store>,
    /// Slots this process holds: key → token (renewed by [`renew_loop`]).
    held: Mutex<HashMap<String, String>>,
    /// The earliest time (Unix ms) the next job this process puts off should come back: put-off
    /// jobs are spaced one interval apart instead of all returning at once.
    spread: Mutex<f64>,
}

/// GCRA parameters, in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Gcra {
    /// Time between two jobs at the steady rate.
    pub(crate) interval: f64,
    /// How far ahead of now the arrival time may run: `(burst - 1) × interval`.
    pub(crate) tolerance: f64,
}

impl Gcra {
    pub(crate) fn new(rate: Rate, burst: u32) -> Self {
        let interval = rate.per.as_secs_f64() * 1000.0 / f64::from(rate.count.max(1));
        Gcra {
            interval,
            tolerance: interval * f64::from(burst.max(1) - 1),
        }
    }

    /// At `now` with theoretical arrival time `tat` (both ms): `Ok(new tat)` when a job may
    /// start, else `Err(ms to wait)`.
    pub(crate) fn take(&self, tat: f64, now: f64) -> Result<f64, f64> {
        let tat = tat.max(now);
        if tat - now <= self.tolerance {
            Ok(tat + self.interval)
        } else {
            Err(tat - self.tolerance - now)
        }
    }
}

/// What [`Limiter::admit`] decided.
pub(crate) enum Admission {
    /// The job may start; it holds these slots until dropped.
    Go(Option<SlotGuard>),
    /// Not now: offer it again after this long.
    Wait(Duration),
}

/// A concurrency slot held by a running job; dropping it gives the slot back.
#[derive(Debug)]
pub(crate) struct SlotGuard {
    limiter: Arc<Limiter>,
    key: String,
    token: String,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        let limiter = self.limiter.clone();
        let (key, token) = (
            std::mem::take(&mut self.key),
            std::mem::take(&mut self.token),
        );
        limiter.forget(&key);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = limiter
                    .store
                    .swap(&key, Some(token.as_bytes()), None, None)
                    .await
                {
                    tracing::warn!(scope = %limiter.scope, error = %e, "could not give a concurrency slot back; it returns when its lease lapses");
                }
            });
        }
    }
}

fn now_ms() -> f64 {
    stevedore_core::to_millis(std::time::SystemTime::now()) as f64
}

impl Limiter {
    /// A limiter over `scope`; `None` when neither limit is set.
    pub(crate) fn new(
        scope: String,
        rate: Option<Rate>,
        burst: Option<u32>,
        max_concurrent: Option<u32>,
        lease: Duration,
        store: Arc<dyn Store>,
    ) -> Option<Arc<Limiter>> {
        if rate.is_none() && max_concurrent.is_none() {
            return None;
        }
        let limiter = Arc::new(Limiter {
            scope,
            rate: rate.map(|r| Gcra::new(r, burst.unwrap_or(1))),
            slots: max_concurrent.map(|n| (n.max(1), lease.max(Duration::from_secs(1)))),
            store,
            held: Mutex::new(HashMap::new()),
            spread: Mutex::new(0.0),
        });
        if limiter.slots.is_some() {
            tokio::spawn(renew_loop(Arc::downgrade(&limiter)));
        }
        Some(limiter)
    }

    fn forget(&self, key: &str) {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }

    /// Whether this limiter has a rate.
    pub(crate) fn has_rate(&self) -> bool {
        self.rate.is_some()
    }

    /// The most jobs of this scope that may run at once, if limited.
    pub(crate) fn max_concurrent(&self) -> Option<u32> {
        self.slots.map(|(n, _)| n)
    }

    /// Takes up to `want` rate tokens at once (one compare-and-swap): `Ok(n)` with `n >= 1`, or
    /// `Err(wait)` until the next one. No rate: `Ok(want)`. For a queue-wide rate, taken before
    /// a receive so that the worker pulls only what it may start.
    pub(crate) async fn take_up_to(&self, want: u32) -> Result<Result<u32, Duration>, BrokerError> {
        let Some(gcra) = self.rate else {
            return Ok(Ok(want));
        };
        let key = self.rate_key();
        for _ in 0..32 {
            let raw = self.store.get(&key).await?;
            let now = now_ms();
            let mut tat = parse_tat(raw.as_deref());
            let mut n = 0;
            while n < want {
                match gcra.take(tat, now) {
                    Ok(next) => {
                        tat = next;
                        n += 1;
                    }
                    Err(wait) if n == 0 => return Ok(Err(ms(wait))),
                    Err(_) => break,
                }
            }
            if self.put_tat(&key, raw.as_deref(), tat, now).await? {
                return Ok(Ok(n));
            }
        }
        Ok(Err(Duration::from_secs_f64(
            gcra.interval.max(1.0) / 1000.0,
        )))
    }

    /// Gives back `n` tokens taken by [`Limiter::take_up_to`] and not used (a receive brought
    /// fewer jobs), so the rate is not wasted. Best effort.
    pub(crate) async fn give_back(&self, n: u32) {
        let Some(gcra) = self.rate.filter(|_| n > 0) else {
            return;
        };
        let key = self.rate_key();
        for _ in 0..8 {
            let Ok(raw) = self.store.get(&key).await else {
                return;
            };
            let now = now_ms();
            let tat = (parse_tat(raw.as_deref()) - f64::from(n) * gcra.interval).max(now);
            match self.put_tat(&key, raw.as_deref(), tat, now).await {
                Ok(false) => continue,
                _ => return,
            }
        }
    }

    fn rate_key(&self) -> String {
        format!("limit:{}:rate", self.scope)
    }

    /// Stores a new arrival time if the key still holds `raw`; the key outlives it by a second,
    /// so an idle limit vanishes.
    async fn put_tat(
        &self,
        key: &str,
        raw: Option<&[u8]>,
        tat: f64,
        now: f64,
    ) -> Result<bool, BrokerError> {
        let ttl = ms((tat - now).max(0.0) + 1000.0);
        let value = format!("{tat:.3}");
        self.store
            .swap(key, raw, Some(value.as_bytes()), Some(ttl))
            .await
    }

    /// How long a job this process puts off for `wait` should wait, spacing this process's
    /// put-off jobs one interval apart (so they come back at the rate, not all at once).
    pub(crate) fn spaced(&self, wait: Duration) -> Duration {
        let Some(gcra) = self.rate else {
            return wait;
        };
        let now = now_ms();
        let mut next = self.spread.lock().unwrap_or_else(|p| p.into_inner());
        let at = (now + wait.as_secs_f64() * 1000.0).max(*next);
        *next = at + gcra.interval;
        ms(at - now)
    }

    /// Decides whether job `id` may start now: takes a slot (if limited), then a rate token (if
    /// limited and `rate`; the slot is given back when the rate says no).
    pub(crate) async fn admit(
        self: &Arc<Self>,
        id: &str,
        rate: bool,
    ) -> Result<Admission, BrokerError> {
        let guard = match self.slots {
            None => None,
            Some((n, lease)) => match self.take_slot(id, n, lease).await? {
                Some(g) => Some(g),
                None => return Ok(Admission::Wait(SLOT_RETRY)),
            },
        };
        if rate && self.rate.is_some() {
            if let Err(wait) = self.take_up_to(1).await? {
                drop(guard);
                return Ok(Admission::Wait(self.spaced(wait)));
            }
        }
        Ok(Admission::Go(guard))
    }

    async fn take_slot(
        self: &Arc<Self>,
        id: &str,
        n: u32,
        lease: Duration,
    ) -> Result<Option<SlotGuard>, BrokerError> {
        // A random first slot, so workers do not all fight over slot 0; a few probes at most,
        // so a full limit costs a few round trips, not one per slot (the job is put off and
        // offered again).
        let start = rand::rng().random_range(0..n);
        let token = format!("{id}:{:08x}", rand::random::<u32>());
        let step = if n > PROBES { n / PROBES } else { 1 };
        for k in 0..n.min(PROBES) {
            let k = k * step;
            let key = format!("limit:{}:slot:{}", self.scope, (start + k) % n);
            if self
                .store
                .swap(&key, None, Some(token.as_bytes()), Some(lease))
                .await?
            {
                self.held
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(key.clone(), token.clone());
                return Ok(Some(SlotGuard {
                    limiter: self.clone(),
                    key,
                    token,
                }));
            }
        }
        Ok(None)
    }
}

/// The stored arrival time; anything unreadable or absurd (not finite, more than a day ahead)
/// counts as none, so a damaged key costs one burst, never a panic or a stalled limit.
fn parse_tat(raw: Option<&[u8]>) -> f64 {
    raw.and_then(|b| std::str::from_utf8(b).ok())
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|t| t.is_finite() && *t < now_ms() + 86_400_000.0)
        .unwrap_or(0.0)
}

/// `ms` milliseconds as a duration (at least 1 ms, at most a day).
fn ms(ms: f64) -> Duration {
    Duration::try_from_secs_f64(ms.clamp(1.0, 86_400_000.0) / 1000.0)
        .unwrap_or(Duration::from_secs(1))
}

/// Renews the slots this process holds every third of their lease, until the limiter is gone.
async fn renew_loop(limiter: Weak<Limiter>) {
    let every = match limiter.upgrade().and_then(|l| l.slots) {
        Some((_, lease)) => lease / 3,
        None => return,
    };
    loop {
        tokio::time::sleep(every).await;
        let Some(l) = limiter.upgrade() else { return };
        let Some((_, lease)) = l.slots else { return };
        let held: Vec<(String, String)> = l
            .held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, t)| (k.clone(), t.clone()))
            .collect();
        for (key, token) in held {
            match l
                .store
                .swap(
                    &key,
                    Some(token.as_bytes()),
                    Some(token.as_bytes()),
                    Some(lease),
                )
                .await
            {
                Ok(true) => {}
                Ok(false) => {
                    // Released meanwhile (the job ended), or lapsed: then another job may hold
                    // it, and this one runs over the limit until it ends.
                    if l.held
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .contains_key(&key)
                    {
                        tracing::warn!(scope = %l.scope, "a concurrency slot lapsed while its job ran (the store was unreachable for a lease?)");
                    }
                }
                Err(e) => {
                    tracing::warn!(scope = %l.scope, error = %e, "could not renew a concurrency slot; retrying")
                }
            }
        }
    }
}

/// Every limit that applies to a queue's jobs: the queue's own, and per job name.
#[derive(Debug, Default)]
pub(crate) struct Limits {
    pub(crate) queue: Option<Arc<Limiter>>,
    pub(crate) jobs: std::collections::BTreeMap<String, Arc<Limiter>>,
}

impl Limits {
    /// Whether a limit applies to a job of this name on this queue (one check per job; no
    /// allocation, no store call for unlimited jobs).
    pub(crate) fn applies(&self, job: Option<&str>) -> bool {
        self.queue.is_some()
            || (!self.jobs.is_empty() && job.is_some_and(|j| self.jobs.contains_key(j)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stevedore_core::store::MemoryStore;

    fn rate(s: &str) -> Rate {
        s.parse().expect("rate")
    }

    #[test]
    fn gcra_admits_the_rate_and_the_burst_and_no_more() {
        let g = Gcra::new(rate("50/s"), 1);
        assert_eq!(g.interval, 20.0);
        // Steady: one every 20 ms.
        let mut tat = 0.0;
        let mut admitted = 0;
        for ms in 0..1000 {
            if let Ok(next) = g.take(tat, 10_000.0 + f64::from(ms)) {
                tat = next;
                admitted += 1;
            }
        }
        assert_eq!(admitted, 50);
        // A burst of 10 at once, then the rate.
        let g = Gcra::new(rate("50/s"), 10);
        let mut tat = 0.0;
        let mut at_once = 0;
        while let Ok(next) = g.take(tat, 10_000.0) {
            tat = next;
            at_once += 1;
        }
        assert_eq!(at_once, 10);
        let wait = g.take(tat, 10_000.0).expect_err("over");
        assert_eq!(wait, 20.0);
        let g = Gcra::new(rate("6/m"), 1);
        assert_eq!(g.interval, 10_000.0);
    }

    #[tokio::test]
    async fn tokens_are_taken_in_batches_and_given_back() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let l = Limiter::new(
            "queue:q".into(),
            Some(rate("10/s")),
            Some(5),
            None,
            Duration::from_secs(30),
            store,
        )
        .expect("limiter");
        // A burst of 5 is there at once; then one per 100 ms.
        assert_eq!(l.take_up_to(16).await.expect("store"), Ok(5));
        let wait = l.take_up_to(16).await.expect("store").expect_err("empty");
        assert!(
            wait <= Duration::from_millis(100) && wait > Duration::from_millis(50),
            "{wait:?}"
        );
        l.give_back(2).await;
        assert_eq!(l.take_up_to(16).await.expect("store"), Ok(2));
        // Put-off jobs are spaced one interval apart.
        let a = l.spaced(Duration::from_millis(10));
        let b = l.spaced(Duration::from_millis(10));
        assert!(b >= a + Duration::from_millis(95), "{a:?} {b:?}");
    }

    #[tokio::test]
    async fn slots_are_shared_through_the_store_and_given_back() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let lease = Duration::from_secs(30);
        let a = Limiter::new("job:x".into(), None, None, Some(2), lease, store.clone())
            .expect("limiter");
        let b = Limiter::new("job:x".into(), None, None, Some(2), lease, store.clone())
            .expect("limiter");
        let g1 = match a.admit("1", true).await.expect("admit") {
            Admission::Go(g) => g,
            Admission::Wait(_) => panic!("slot 1"),
        };
        let g2 = match b.admit("2", true).await.expect("admit") {
            Admission::Go(g) => g,
            Admission::Wait(_) => panic!("slot 2"),
        };
        assert!(matches!(
            a.admit("3", true).await.expect("admit"),
            Admission::Wait(SLOT_RETRY)
        ));
        drop(g1);
        // The release runs as a task.
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(matches!(
            b.admit("3", true).await.expect("admit"),
            Admission::Go(Some(_))
        ));
        drop(g2);
    }
}
