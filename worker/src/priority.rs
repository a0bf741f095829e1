//! Which priority level a queue fetches from next. Pure logic, owned by one fetch loop.
//!
//! - **Weighted** (default): smooth weighted round-robin over the levels that have work, so with
//!   weights high=6, normal=3, low=1 and a backlog everywhere, fetches split 6:3:1.
//! - **Strict**: always the highest level that has work.
//! - **Reserved concurrency**: a level's reserved slots are never used by other levels, so slow low
//!   jobs cannot occupy every slot while high jobs wait.
//! - **Aging**: a level that has work but was not served for `aging` is served next, whatever the
//!   mode, so no level starves forever.
//!
//! "Has work" is learned by fetching: a fetch that returns nothing marks the level empty, and an
//! empty level is probed again after `probe_after`. When every level is empty the loop long-polls
//! them in turn.

use std::time::{Duration, Instant};
use stevedore_core::Priority;

use crate::config::PriorityMode as Mode;

/// One priority level of a logical queue.
#[derive(Clone, Debug)]
pub(crate) struct Level {
    /// The level.
    pub priority: Priority,
    /// Physical queue it is fetched from.
    pub physical: String,
    /// Share of fetches in weighted mode (≥ 1).
    pub weight: u32,
    /// Slots only this level may use.
    pub reserved: usize,
}

#[derive(Debug)]
struct LevelState {
    level: Level,
    in_flight: usize,
    current: i64,
    empty_since: Option<Instant>,
    last_served: Instant,
}

/// The next fetch to make.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Pick {
    /// Index of the level (levels are ordered highest priority first).
    pub index: usize,
    /// Most jobs this level may start now.
    pub capacity: usize,
    /// Every level looked empty: the caller should long-poll this one.
    pub idle: bool,
}

/// Level selection state of one logical queue.
#[derive(Debug)]
pub(crate) struct Selector {
    levels: Vec<LevelState>,
    mode: Mode,
    concurrency: usize,
    aging: Duration,
    probe_after: Duration,
    rotate: usize,
}

impl Selector {
    /// `levels` in any order (sorted here, highest first); `concurrency` is the queue's slot count.
    pub(crate) fn new(
        mut levels: Vec<Level>,
        mode: Mode,
        concurrency: usize,
        aging: Duration,
        probe_after: Duration,
        now: Instant,
    ) -> Self {
        levels.sort_by_key(|l| l.priority);
        Selector {
            levels: levels
                .into_iter()
                .map(|level| LevelState {
                    level,
                    in_flight: 0,
                    current: 0,
                    empty_since: None,
                    last_served: now,
                })
                .collect(),
            mode,
            concurrency,
            aging,
            probe_after,
            rotate: 0,
        }
    }

    /// Level `i`.
    pub(crate) fn level(&self, i: usize) -> &Level {
        &self.levels[i].level
    }

    /// Jobs in flight across levels.
    pub(crate) fn in_flight(&self) -> usize {
        self.levels.iter().map(|l| l.in_flight).sum()
    }

    /// Slots level `i` may use now: free slots less the unused reservations of other levels.
    pub(crate) fn capacity(&self, i: usize) -> usize {
        let free = self.concurrency.saturating_sub(self.in_flight());
        let held_for_others: usize = self
            .levels
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, l)| l.level.reserved.saturating_sub(l.in_flight))
            .sum();
        free.saturating_sub(held_for_others)
    }

    fn has_work(&self, i: usize, now: Instant) -> bool {
        self.levels[i]
            .empty_since
            .is_none_or(|t| now.saturating_duration_since(t) >= self.probe_after)
    }

    /// Chooses the next level to fetch from, or `None` when no level has a free slot. Allocates
    /// nothing: the fetch loop asks after every finished job.
    pub(crate) fn pick(&mut self, now: Instant) -> Option<Pick> {
        // Sets of level indexes as bit masks (a queue has at most a handful of levels).
        let n = self.levels.len().min(64);
        let mut eligible = 0u64;
        let mut ready = 0u64;
        for i in 0..n {
            if self.capacity(i) > 0 {
                eligible |= 1 << i;
                if self.has_work(i, now) {
                    ready |= 1 << i;
                }
            }
        }
        if eligible == 0 {
            return None;
        }
        let pick = |index: usize, idle: bool, s: &Self| Pick {
            index,
            capacity: s.capacity(index),
            idle,
        };
        if ready == 0 {
            let nth = self.rotate % eligible.count_ones() as usize;
            let index = bits(eligible).nth(nth).unwrap_or_default();
            self.rotate = self.rotate.wrapping_add(1);
            return Some(pick(index, true, self));
        }
        let starving = bits(ready)
            .filter(|&i| now.saturating_duration_since(self.levels[i].last_served) >= self.aging)
            .max_by_key(|&i| now.saturating_duration_since(self.levels[i].last_served));
        if let Some(i) = starving {
            return Some(pick(i, false, self));
        }
        let first = ready.trailing_zeros() as usize;
        let index = match self.mode {
            Mode::Strict => first,
            Mode::Weighted => {
                let total: i64 = bits(ready)
                    .map(|i| i64::from(self.levels[i].level.weight.max(1)))
                    .sum();
                let mut best = first;
                for i in bits(ready) {
                    let l = &mut self.levels[i];
                    l.current += i64::from(l.level.weight.max(1));
                    if l.current > self.levels[best].current {
                        best = i;
                    }
                }
                self.levels[best].current -= total;
                best
            }
        };
        Some(pick(index, false, self))
    }

    /// Whether some level has a free slot (so [`Selector::pick`] would choose one).
    pub(crate) fn pick_would_run(&self) -> bool {
        (0..self.levels.len()).any(|i| self.capacity(i) > 0)
    }

    /// Holds `n` slots of level `i` for a receive on its way (so a second receive cannot take
    /// them too), until [`Selector::unreserve`].
    pub(crate) fn reserve(&mut self, i: usize, n: usize) {
        self.levels[i].in_flight += n;
    }

    /// Gives back slots held by [`Selector::reserve`].
    pub(crate) fn unreserve(&mut self, i: usize, n: usize) {
        let l = &mut self.levels[i];
        l.in_flight = l.in_flight.saturating_sub(n);
    }

    /// Records a fetch from level `i` that returned `n` messages.
    pub(crate) fn received(&mut self, i: usize, n: usize, now: Instant) {
        let l = &mut self.levels[i];
        l.in_flight += n;
        l.last_served = now;
        l.empty_since = if n == 0 { Some(now) } else { None };
    }

    /// Records that `n` jobs of level `i` ended.
    pub(crate) fn finished(&mut self, i: usize, n: usize) {
        let l = &mut self.levels[i];
        l.in_flight = l.in_flight.saturating_sub(n);
    }
}

/// The indexes of the set bits of `mask`, lowest first.
fn bits(mut mask: u64) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        if mask == 0 {
            return None;
        }
        let i = mask.trailing_zeros() as usize;
        mask &= mask - 1;
        Some(i)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn levels(spec: &[(Priority, u32, usize)]) -> Vec<Level> {
        spec.iter()
            .map(|&(priority, weight, reserved)| Level {
                priority,
                physical: priority.as_str().into(),
                weight,
                reserved,
            })
            .collect()
    }

    fn three(mode: Mode, conc: usize) -> Selector {
        let l = levels(&[
            (Priority::Low, 1, 0),
            (Priority::High, 6, 0),
            (Priority::Normal, 3, 0),
        ]);
        Selector::new(
            l,
            mode,
            conc,
            Duration::from_secs(3600),
            Duration::from_secs(3600),
            Instant::now(),
        )
    }

    #[test]
    fn weighted_fetches_follow_weights() {
        let mut s = three(Mode::Weighted, 100);
        let now = Instant::now();
        let mut counts = [0; 3];
        for _ in 0..100 {
            let p = s.pick(now).expect("capacity");
            counts[p.index] += 1;
        }
        assert_eq!(counts, [60, 30, 10], "high, normal, low");
    }

    #[test]
    fn strict_serves_highest_with_work() {
        let mut s = three(Mode::Strict, 10);
        let now = Instant::now();
        assert_eq!(s.pick(now).map(|p| p.index), Some(0));
        s.received(0, 0, now); // high turned out empty
        assert_eq!(s.pick(now).map(|p| p.index), Some(1));
    }

    #[test]
    fn slots_held_for_a_receive_on_its_way_are_not_given_twice() {
        let mut s = three(Mode::Weighted, 10);
        let now = Instant::now();
        let p = s.pick(now).expect("slots free");
        assert_eq!(p.capacity, 10);
        s.reserve(p.index, 10);
        assert!(!s.pick_would_run(), "a second receive finds no slot");
        assert_eq!(s.pick(now), None);
        // It came back with 4 of the 10: the other 6 are free again, the 4 busy until finished.
        s.unreserve(p.index, 10);
        s.received(p.index, 4, now);
        assert_eq!(s.capacity(p.index), 6);
        for _ in 0..4 {
            s.finished(p.index, 1);
        }
        assert_eq!(s.capacity(p.index), 10);
    }

    #[test]
    fn reserved_slots_stay_free_for_their_level() {
        let l = levels(&[(Priority::High, 1, 2), (Priority::Low, 1, 0)]);
        let now = Instant::now();
        let mut s = Selector::new(
            l,
            Mode::Strict,
            5,
            Duration::from_secs(60),
            Duration::from_secs(60),
            now,
        );
        s.received(0, 0, now); // high empty
        let p = s.pick(now).expect("low may run");
        assert_eq!(
            (p.index, p.capacity),
            (1, 3),
            "two of five slots held for high"
        );
        s.received(1, 3, now);
        assert_eq!(s.capacity(1), 0, "low cannot take the reserved slots");
        assert_eq!(s.capacity(0), 2, "high still can");
        s.finished(1, 1);
        assert_eq!(s.capacity(1), 1);
    }

    #[test]
    fn aging_serves_a_starved_level() {
        let l = levels(&[(Priority::High, 1, 0), (Priority::Low, 1, 0)]);
        let t0 = Instant::now();
        let mut s = Selector::new(
            l,
            Mode::Strict,
            10,
            Duration::from_secs(5),
            Duration::from_secs(60),
            t0,
        );
        for k in 0..5 {
            let now = t0 + Duration::from_secs(k);
            let p = s.pick(now).expect("capacity");
            assert_eq!(p.index, 0);
            s.received(0, 1, now);
            s.finished(0, 1);
        }
        let later = t0 + Duration::from_secs(6);
        assert_eq!(
            s.pick(later).map(|p| p.index),
            Some(1),
            "low waited past aging"
        );
    }

    #[test]
    fn empty_levels_are_long_polled_in_turn_and_reprobed() {
        let l = levels(&[(Priority::High, 1, 0), (Priority::Low, 1, 0)]);
        let t0 = Instant::now();
        let mut s = Selector::new(
            l,
            Mode::Weighted,
            10,
            Duration::from_secs(60),
            Duration::from_millis(100),
            t0,
        );
        s.received(0, 0, t0);
        s.received(1, 0, t0);
        let a = s.pick(t0).expect("capacity");
        let b = s.pick(t0).expect("capacity");
        assert!(a.idle && b.idle);
        assert_ne!(a.index, b.index);
        let later = t0 + Duration::from_millis(150);
        assert!(
            !s.pick(later).expect("capacity").idle,
            "probe again after probe_after"
        );
    }

    #[test]
    fn full_queue_picks_nothing() {
        let mut s = three(Mode::Weighted, 2);
        let now = Instant::now();
        s.received(0, 2, now);
        assert_eq!(s.pick(now), None);
        s.finished(0, 1);
        assert!(s.pick(now).is_some());
    }
}
