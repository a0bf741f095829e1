//! Bookkeeping of deliveries and acks per message id, shared by concurrent consumers.
//!
//! The rule it enforces: every published id is acked successfully exactly once; an id may be
//! received more than once only if each earlier delivery's ack came back
//! [`stevedore_core::BrokerError::LeaseLost`]; and nothing is delivered again after a successful
//! ack.

use crate::support::sample;
use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};
use stevedore_core::Delivery;
use tokio::time::Instant;

/// Deliveries and acks per id. Never held across an `.await`.
#[derive(Debug)]
pub(crate) struct Ledger {
    expected: HashSet<String>,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    entries: HashMap<String, Entry>,
    acked: usize,
    lost: usize,
}

#[derive(Debug, Default)]
struct Entry {
    deliveries: u32,
    oks: u32,
    lost: u32,
    acked_at: Option<Instant>,
}

impl Ledger {
    /// A ledger expecting these ids.
    pub(crate) fn new(ids: impl IntoIterator<Item = String>) -> Self {
        Ledger {
            expected: ids.into_iter().collect(),
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records the deliveries of one receive call that started at `call_started`.
    pub(crate) fn received(&self, call_started: Instant, ds: &[Delivery]) -> Result<(), String> {
        let mut st = self.lock();
        for d in ds {
            let id = &d.envelope.id;
            if !self.expected.contains(id) {
                return Err(format!(
                    "received id {id} (job {:?}), which was never published to this queue",
                    d.envelope.job
                ));
            }
            let e = st.entries.entry(id.clone()).or_default();
            e.deliveries += 1;
            if let Some(at) = e.acked_at {
                if call_started > at {
                    return Err(format!(
                        "id {id} delivered again (delivery_count {}) {:.3}s after it was acked",
                        d.delivery_count,
                        (call_started - at).as_secs_f64()
                    ));
                }
            }
        }
        Ok(())
    }

    /// Records a successful ack of one delivery of `id`.
    pub(crate) fn acked(&self, id: &str) -> Result<(), String> {
        let mut st = self.lock();
        let e = st.entries.entry(id.to_string()).or_default();
        e.oks += 1;
        e.acked_at.get_or_insert_with(Instant::now);
        let oks = e.oks;
        if oks > 1 {
            return Err(format!("id {id} acked successfully {oks} times"));
        }
        st.acked += 1;
        Ok(())
    }

    /// Records an ack of one delivery of `id` that came back `LeaseLost`.
    pub(crate) fn lease_lost(&self, id: &str) {
        let mut st = self.lock();
        st.entries.entry(id.to_string()).or_default().lost += 1;
        st.lost += 1;
    }

    /// How many ids have been acked successfully.
    pub(crate) fn acked_count(&self) -> usize {
        self.lock().acked
    }

    /// How many acks came back `LeaseLost`.
    pub(crate) fn lost_count(&self) -> usize {
        self.lock().lost
    }

    /// Whether every expected id has been acked.
    pub(crate) fn complete(&self) -> bool {
        self.acked_count() >= self.expected.len()
    }

    /// "acked X of N within …; never acked: ids…", for a shortfall.
    pub(crate) fn shortfall(&self, within: &str) -> String {
        let st = self.lock();
        let mut missing: Vec<&String> = self
            .expected
            .iter()
            .filter(|id| !matches!(st.entries.get(*id), Some(e) if e.oks > 0))
            .collect();
        missing.sort();
        format!(
            "acked {} of {} messages within {within}; {} never acked, e.g. {}",
            st.acked,
            self.expected.len(),
            missing.len(),
            sample(missing)
        )
    }

    /// Final check: every id acked exactly once, every extra delivery explained by a lost lease.
    pub(crate) fn finish(&self) -> Result<(), String> {
        let st = self.lock();
        for id in &self.expected {
            let Some(e) = st.entries.get(id) else {
                return Err(format!("id {id} was never delivered"));
            };
            if e.oks != 1 {
                return Err(format!("id {id} acked successfully {} times", e.oks));
            }
            if e.deliveries != e.oks + e.lost {
                return Err(format!(
                    "id {id} delivered {} times but only {} earlier lease(s) were lost: a duplicate \
                     delivery while a lease was still held",
                    e.deliveries, e.lost
                ));
            }
        }
        Ok(())
    }
}
