//! Per-key order on FIFO queues: one message of a message group handed out at a time.
//!
//! SQS returns the messages of a group in order and returns none of a group while one of it is
//! in flight, but one `ReceiveMessage` may return *several* messages of the same group at once.
//! The runtime runs a received batch concurrently, so the backend hands out only the first
//! message of each group and holds the rest here, still invisible on SQS, until the one before
//! them is settled:
//!
//! - **ack** of the message handed out frees its group: the next receive hands out the next held
//!   message of it (at once: a receive waiting on SQS is woken, and the SQS call it started is
//!   kept for a later receive, never thrown away).
//! - **release** (or a lease found lost) sends the held messages of its group back with it, so
//!   SQS delivers the group again from the released message on, in order. Held messages are
//!   *not* released one by one while they wait: every release would count a delivery
//!   (`ApproximateReceiveCount`) and could dead-letter a message that never ran.
//! - **lease**: a held message's visibility runs from its receive. Extending the lease of the
//!   message handed out extends the held messages of its group too; a held message handed out
//!   with less than two thirds of the lease left is extended to the full lease first, and one
//!   with under [`MIN_LEFT`] left is dropped with everything behind it (SQS delivers them again,
//!   in order, when their visibility ends).
//! - If SQS hands out a message of a group this process still thinks busy, the earlier
//!   messages' visibility has ended on SQS: what was held of the group is stale and is dropped.
//!
//! State is per broker (clones share it) and bounded by what SQS handed this process: at most
//! nine held messages per receive, each still counted in flight on SQS.

use crate::Token;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};
use stevedore_core::{BrokerError, Delivery, Receipt};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// A held message with less visibility left than this is not handed out.
pub(crate) const MIN_LEFT: Duration = Duration::from_secs(2);

/// A receive started by an earlier call and still running.
pub(crate) type Pending = JoinHandle<Result<Vec<Delivery>, BrokerError>>;

/// The held messages of one FIFO queue.
#[derive(Default)]
pub(crate) struct Hold {
    state: Mutex<State>,
    /// Signalled when a group with held messages comes free, or a kept receive finishes.
    pub(crate) freed: Notify,
}

#[derive(Default)]
struct State {
    groups: HashMap<Arc<str>, Group>,
    /// Receives a caller stopped waiting for (a group came free, or the caller was dropped).
    pending: Vec<Pending>,
}

#[derive(Default)]
struct Group {
    /// Receipt handle of the message of this group handed out and not yet settled.
    out: Option<String>,
    /// Received after it, in group order, not yet handed out.
    held: VecDeque<Delivery>,
}

/// What a FIFO receipt knows of its group, so settling it through any clone of the broker frees
/// the group.
pub(crate) struct Member {
    pub(crate) hold: Weak<Hold>,
    pub(crate) group: Arc<str>,
}

fn token(d: &Delivery) -> Option<&Token> {
    d.receipt.token::<Token>()
}

fn group_of(d: &Delivery) -> Option<Arc<str>> {
    token(d).and_then(|t| t.member.as_ref().map(|m| m.group.clone()))
}

fn handle_of(d: &Delivery) -> String {
    token(d).map(|t| t.handle.clone()).unwrap_or_default()
}

impl Hold {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Up to `max` held messages whose group is free, each now marked handed out.
    pub(crate) fn take_ready(&self, max: usize) -> Vec<Delivery> {
        let now = Instant::now();
        let mut st = self.lock();
        let mut out = Vec::new();
        st.groups.retain(|_, g| {
            if out.len() < max && g.out.is_none() {
                if let Some(d) = g.held.pop_front() {
                    let left = token(&d).map(|t| t.until().saturating_duration_since(now));
                    if left.is_some_and(|l| l >= MIN_LEFT) {
                        g.out = Some(handle_of(&d));
                        out.push(d);
                    } else {
                        // Its visibility is (nearly) over: SQS delivers it again, and what is
                        // held behind it must not overtake it.
                        g.held.clear();
                    }
                }
            }
            g.out.is_some() || !g.held.is_empty()
        });
        out
    }

    /// Sorts what one receive returned: the first message of each free group is handed out (up
    /// to `max`), everything else is held behind it.
    pub(crate) fn distribute(&self, got: Vec<Delivery>, max: usize) -> Vec<Delivery> {
        let mut st = self.lock();
        let mut out = Vec::new();
        let mut fresh: Vec<Arc<str>> = Vec::new();
        for d in got {
            let Some(group) = group_of(&d) else {
                out.push(d);
                continue;
            };
            let g = st.groups.entry(group.clone()).or_default();
            if !fresh.contains(&group) {
                // SQS handed out a message of this group, so nothing earlier of it is in flight
                // there any more: whatever this process still holds of it is stale.
                if g.out.is_some() || !g.held.is_empty() {
                    tracing::debug!(group = %group, "SQS redelivered a group held here; dropping the stale copies");
                }
                g.out = None;
                g.held.clear();
                fresh.push(group);
            }
            if g.out.is_none() && g.held.is_empty() && out.len() < max {
                g.out = Some(handle_of(&d));
                out.push(d);
            } else {
                g.held.push_back(d);
            }
        }
        st.groups
            .retain(|_, g| g.out.is_some() || !g.held.is_empty());
        out
    }

    /// The held messages of `group` behind `handle`, taken out (to be released with it).
    pub(crate) fn take_behind(&self, group: &str, handle: &str) -> Vec<Receipt> {
        let mut st = self.lock();
        match st.groups.get_mut(group) {
            Some(g) if g.out.as_deref() == Some(handle) => {
                g.held.drain(..).map(|d| d.receipt).collect()
            }
            _ => Vec::new(),
        }
    }

    /// The held messages of `group` behind `handle`, left in place (to extend with it).
    pub(crate) fn behind(&self, group: &str, handle: &str) -> Vec<Receipt> {
        let st = self.lock();
        match st.groups.get(group) {
            Some(g) if g.out.as_deref() == Some(handle) => {
                g.held.iter().map(|d| d.receipt.clone()).collect()
            }
            _ => Vec::new(),
        }
    }

    /// `handle` of `group` is settled (or lost): the group is free again.
    pub(crate) fn free(&self, group: &str, handle: &str) {
        let mut st = self.lock();
        let Some(g) = st.groups.get_mut(group) else {
            return;
        };
        if g.out.as_deref() != Some(handle) {
            return;
        }
        g.out = None;
        if g.held.is_empty() {
            st.groups.remove(group);
        } else {
            drop(st);
            self.freed.notify_one();
        }
    }

    /// A receive this caller stopped waiting for, kept for the next one.
    pub(crate) fn keep(&self, task: Pending) {
        self.lock().pending.push(task);
    }

    /// A kept receive, finished ones first.
    pub(crate) fn take_pending(&self) -> Option<Pending> {
        let mut st = self.lock();
        let i = st
            .pending
            .iter()
            .position(|t| t.is_finished())
            .or(if st.pending.is_empty() { None } else { Some(0) })?;
        Some(st.pending.swap_remove(i))
    }

    /// Everything held and every kept receive, for close.
    pub(crate) fn take_all(&self) -> (Vec<Receipt>, Vec<Pending>) {
        let mut st = self.lock();
        let held = st
            .groups
            .drain()
            .flat_map(|(_, g)| g.held.into_iter().map(|d| d.receipt))
            .collect();
        (held, std::mem::take(&mut st.pending))
    }

    #[cfg(test)]
    fn held_count(&self) -> usize {
        self.lock().groups.values().map(|g| g.held.len()).sum()
    }
}

/// The hold behind a receipt, with its group and handle.
pub(crate) fn member_of(r: &Receipt) -> Option<(Arc<Hold>, &str, &str)> {
    let t = r.token::<Token>()?;
    let m = t.member.as_ref()?;
    Some((m.hold.upgrade()?, &m.group, &t.handle))
}

#[cfg(test)]
mod tests {
    use super::*;
    use stevedore_core::Envelope;

    fn msg(hold: &Arc<Hold>, group: &str, n: u32, left: Duration) -> Delivery {
        let now = Instant::now();
        Delivery {
            envelope: Envelope::new("j", format!("{group}:{n}")),
            receipt: Receipt::new(
                "q",
                Token {
                    url: "u".into(),
                    handle: format!("{group}-{n}"),
                    received: now,
                    until: std::sync::Mutex::new(now + left),
                    member: Some(Member {
                        hold: Arc::downgrade(hold),
                        group: group.into(),
                    }),
                },
            ),
            delivery_count: 1,
        }
    }

    fn bodies(ds: &[Delivery]) -> Vec<String> {
        ds.iter()
            .map(|d| String::from_utf8_lossy(&d.envelope.payload).into_owned())
            .collect()
    }

    const LEASE: Duration = Duration::from_secs(30);

    #[test]
    fn one_message_per_group_is_out_and_the_next_follows_its_settle() {
        let h = Arc::new(Hold::default());
        let got = vec![
            msg(&h, "a", 1, LEASE),
            msg(&h, "a", 2, LEASE),
            msg(&h, "b", 1, LEASE),
            msg(&h, "a", 3, LEASE),
        ];
        assert_eq!(bodies(&h.distribute(got, 10)), ["a:1", "b:1"]);
        assert_eq!(h.held_count(), 2);
        assert!(h.take_ready(10).is_empty(), "a:1 is still out");
        h.free("a", "a-1");
        assert_eq!(bodies(&h.take_ready(10)), ["a:2"]);
        assert!(h.take_ready(10).is_empty(), "a:2 is out");
        h.free("a", "a-1"); // a stale settle frees nothing
        assert!(h.take_ready(10).is_empty());
        h.free("a", "a-2");
        assert_eq!(bodies(&h.take_ready(10)), ["a:3"]);
        h.free("a", "a-3");
        h.free("b", "b-1");
        assert!(
            h.lock().groups.is_empty(),
            "nothing left once every group is done"
        );
    }

    #[test]
    fn a_release_takes_what_is_held_behind_it_back() {
        let h = Arc::new(Hold::default());
        let got = (1..=3).map(|n| msg(&h, "a", n, LEASE)).collect();
        assert_eq!(bodies(&h.distribute(got, 10)), ["a:1"]);
        assert!(
            h.take_behind("a", "a-2").is_empty(),
            "only the one out has a tail"
        );
        let behind = h.take_behind("a", "a-1");
        assert_eq!(behind.len(), 2);
        h.free("a", "a-1");
        assert!(
            h.take_ready(10).is_empty(),
            "nothing of a is handed out here after a release"
        );
    }

    #[test]
    fn more_first_messages_than_asked_for_wait_for_the_next_receive() {
        let h = Arc::new(Hold::default());
        let got = ["a", "b", "c"]
            .iter()
            .map(|g| msg(&h, g, 1, LEASE))
            .collect();
        assert_eq!(bodies(&h.distribute(got, 1)), ["a:1"]);
        assert_eq!(bodies(&h.take_ready(1)).len(), 1);
        assert_eq!(bodies(&h.take_ready(5)).len(), 1);
        assert!(h.take_ready(5).is_empty());
    }

    #[test]
    fn a_held_message_near_its_visibility_end_is_dropped_with_what_follows() {
        let h = Arc::new(Hold::default());
        let got = vec![
            msg(&h, "a", 1, LEASE),
            msg(&h, "a", 2, Duration::from_millis(500)),
            msg(&h, "a", 3, LEASE),
        ];
        h.distribute(got, 10);
        h.free("a", "a-1");
        assert!(
            h.take_ready(10).is_empty(),
            "a:2 has too little visibility left, and a:3 must not overtake it"
        );
        assert_eq!(h.held_count(), 0);
    }

    #[test]
    fn sqs_redelivering_a_busy_group_replaces_the_stale_copies() {
        let h = Arc::new(Hold::default());
        h.distribute((1..=3).map(|n| msg(&h, "a", n, LEASE)).collect(), 10);
        // The leases ended on SQS, which hands the group out again from a:1.
        let again = vec![msg(&h, "a", 11, LEASE), msg(&h, "a", 12, LEASE)];
        assert_eq!(bodies(&h.distribute(again, 10)), ["a:11"]);
        assert_eq!(h.held_count(), 1, "only the new copy of a:2 is held");
        h.free("a", "a-1");
        assert!(h.take_ready(10).is_empty(), "the stale a:1 frees nothing");
        h.free("a", "a-11");
        assert_eq!(bodies(&h.take_ready(10)), ["a:12"]);
    }
}
