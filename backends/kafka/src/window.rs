//! One assigned partition's window of records between the committed position and what was
//! fetched: what is ready to hand out, what is out (unsettled), what was acked above the lowest
//! unsettled offset, and how often each unsettled offset was handed out. Pure bookkeeping; the
//! consumer thread and `receive`/`ack`/`release` drive it under one lock.
//!
//! Per-key order: a record whose key has a record out is not handed out, and neither is any later
//! record of that key (they wait in offset order behind it). Records without a key have no order.
//!
//! What survives a crash or a rebalance is a [`Checkpoint`]: the lowest unsettled offset, the acked
//! offsets above it, the hand-out counts of the unsettled ones, and how far records may have been
//! handed out since (`upto`, a reservation). The backend makes a first hand-out durable in
//! advance, a reservation at a time: before a record at or above the last durable `upto` goes
//! out, a checkpoint reserving the next offsets (the backend's `RESERVE`) is written; a record handed out
//! again (released, or restored with a count) waits for its own count to be written. So a record
//! that kills its worker is always counted, and a new owner after a crash counts every unsettled
//! record below `upto` as handed out once even if it was not (as SQS counts each message of a
//! received batch): one delivery too many at most, for at most a reservation of records, never
//! one too few. A clean hand-over (revocation, close) writes the exact counts and no reservation.

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::fmt::Write as _;

/// What the window needs of a fetched record.
pub(crate) trait Keyed {
    /// The record's offset in its partition.
    fn offset(&self) -> i64;
    /// Its ordering key, if it has one.
    fn key(&self) -> Option<&str>;
}

/// A record handed out: the record, how many times it has been handed out (this one included),
/// and that count less this handle's uncounted releases of it (what the delivery reports).
#[derive(Debug)]
pub(crate) struct Out<T> {
    pub(crate) record: T,
    /// Every hand-out counted: tells this hand-out from earlier ones (receipts) and decides
    /// whether a checkpoint must be written before it goes out.
    pub(crate) count: u32,
    pub(crate) delivery_count: u32,
}

#[derive(Debug)]
pub(crate) struct Window<T> {
    /// Fetched, not out, in offset order (a released record goes back to its place).
    ready: VecDeque<T>,
    /// Out: offset → key.
    out: BTreeMap<i64, Option<String>>,
    /// Keys with a record out.
    busy: HashSet<String>,
    /// Acked offsets at or above [`Window::low`].
    acked: BTreeSet<i64>,
    /// Hand-out counts of unsettled offsets (restored ones may not be fetched yet).
    tries: BTreeMap<i64, u32>,
    /// Uncounted releases of unsettled offsets on this handle (a shutdown's give-back). They are
    /// taken off the count a delivery reports and the count a clean handover passes on
    /// ([`Window::final_checkpoint`]), never off a regular checkpoint's: a crash after them is
    /// still counted.
    discount: BTreeMap<i64, u32>,
    /// Where the next fetched record starts (the offset after the last one fetched), or where
    /// fetching starts.
    fetched_to: i64,
    /// Unsettled offsets below this without a count may have been handed out by an owner that
    /// crashed: their first hand-out here is counted as their second.
    maybe_to: i64,
    /// The reservation the next checkpoint writes: offsets below it may be handed out before
    /// another checkpoint is written.
    reserved: i64,
}

impl<T: Keyed> Window<T> {
    /// A window starting at `from` (the committed position) with nothing known above it.
    pub(crate) fn new(from: i64) -> Self {
        Window {
            ready: VecDeque::new(),
            out: BTreeMap::new(),
            busy: HashSet::new(),
            acked: BTreeSet::new(),
            tries: BTreeMap::new(),
            discount: BTreeMap::new(),
            fetched_to: from.max(0),
            maybe_to: from.max(0),
            reserved: from.max(0),
        }
    }

    /// A window restored from a checkpoint and the group's committed offset (whichever is
    /// further along: a checkpoint older than the commit knows nothing below it).
    pub(crate) fn restore(committed: i64, cp: Option<&Checkpoint>) -> Self {
        let mut w = Window::new(committed);
        if let Some(cp) = cp {
            let low = cp.low.max(committed);
            w.fetched_to = low;
            w.acked = cp.acked.iter().copied().filter(|o| *o >= low).collect();
            w.tries = cp
                .tries
                .iter()
                .filter(|(o, _)| **o >= low)
                .map(|(o, n)| (*o, *n))
                .collect();
            w.maybe_to = cp.upto.max(low);
            w.reserved = w.maybe_to;
        }
        w
    }

    /// Reserves offsets below `to` for hand-out: the next checkpoint says they may be out.
    pub(crate) fn reserve(&mut self, to: i64) {
        self.reserved = self.reserved.max(to);
    }

    /// What the next checkpoint reserves (see [`Window::reserve`]).
    pub(crate) fn reserved(&self) -> i64 {
        self.reserved.max(self.maybe_to)
    }

    /// The offset the consumer should fetch from after a restore or a seek.
    pub(crate) fn fetch_from(&self) -> i64 {
        self.fetched_to
    }

    /// Takes a fetched record. Records below the window, acked ones, and ones already held
    /// (fetched again after a seek) are dropped; returns whether it was kept.
    pub(crate) fn push(&mut self, record: T) -> bool {
        let o = record.offset();
        if o < self.fetched_to || self.acked.contains(&o) {
            // Behind what was fetched: a duplicate after a seek, or settled already.
            if o >= self.fetched_to {
                self.fetched_to = o + 1;
            }
            return false;
        }
        self.fetched_to = o + 1;
        self.ready.push_back(record);
        true
    }

    /// How many fetched records wait to be handed out (the consumer pauses the partition above
    /// a bound).
    pub(crate) fn ready_len(&self) -> usize {
        self.ready.len()
    }

    /// How many records are out.
    pub(crate) fn out_len(&self) -> usize {
        self.out.len()
    }

    /// Hands out up to `max` ready records in offset order, skipping those whose key has a
    /// record out (and so every later record of that key). Counts each hand-out.
    pub(crate) fn take(&mut self, max: usize) -> Vec<Out<T>> {
        let mut taken = Vec::with_capacity(max.min(self.ready.len()));
        // Records passed over (their key is busy), to go back in front in their order: only what
        // was looked at moves, not the whole ready list.
        let mut skipped = Vec::new();
        while taken.len() < max {
            let Some(r) = self.ready.pop_front() else {
                break;
            };
            let key = r.key().map(str::to_owned);
            if let Some(k) = &key {
                if self.busy.contains(k) {
                    skipped.push(r);
                    continue;
                }
                self.busy.insert(k.clone());
            }
            let o = r.offset();
            let before = u32::from(o < self.maybe_to);
            let n = self.tries.entry(o).or_insert(before);
            *n = n.saturating_add(1);
            let count = *n;
            let discount = self.discount.get(&o).copied().unwrap_or(0);
            self.out.insert(o, key);
            taken.push(Out {
                record: r,
                count,
                delivery_count: count.saturating_sub(discount).max(1),
            });
        }
        for r in skipped.into_iter().rev() {
            self.ready.push_front(r);
        }
        taken
    }

    /// Whether `offset` is out (its receipt still holds the record).
    pub(crate) fn is_out(&self, offset: i64) -> bool {
        self.out.contains_key(&offset)
    }

    /// Settles an out record for good. False if it was not out.
    pub(crate) fn ack(&mut self, offset: i64) -> bool {
        let Some(key) = self.out.remove(&offset) else {
            return false;
        };
        if let Some(k) = key {
            self.busy.remove(&k);
        }
        self.tries.remove(&offset);
        self.discount.remove(&offset);
        let low = self.low();
        if offset >= low {
            self.acked.insert(offset);
        }
        // Everything below the low mark is implied: dropped from the front, without a copy.
        while self.acked.first().is_some_and(|o| *o < low) {
            self.acked.pop_first();
        }
        true
    }

    /// Puts an out record back in its place among the ready ones (it is handed out again before
    /// the later records of its key). False if it was not out.
    pub(crate) fn release(&mut self, record: T, uncounted: bool) -> bool {
        let offset = record.offset();
        let Some(key) = self.out.remove(&offset) else {
            return false;
        };
        if uncounted {
            let d = self.discount.entry(offset).or_insert(0);
            *d = d.saturating_add(1);
        }
        if let Some(k) = key {
            self.busy.remove(&k);
        }
        let at = self.ready.partition_point(|r| r.offset() < offset);
        self.ready.insert(at, record);
        true
    }

    /// The lowest unsettled offset: everything below it is acked (the position to commit).
    pub(crate) fn low(&self) -> i64 {
        let ready = self.ready.front().map(Keyed::offset);
        let out = self.out.keys().next().copied();
        let tried = self.tries.keys().next().copied();
        [ready, out, tried]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(self.fetched_to)
            .min(self.fetched_to)
    }

    /// What a new owner needs if this one may crash: see the module docs. Carries the
    /// reservation.
    pub(crate) fn checkpoint(&self) -> Checkpoint {
        self.checkpoint_upto(self.reserved(), false)
    }

    /// What a new owner needs when this one hands over cleanly (revocation, close): the exact
    /// counts, and no reservation beyond what an earlier crash left uncertain.
    pub(crate) fn final_checkpoint(&self) -> Checkpoint {
        self.checkpoint_upto(self.maybe_to, true)
    }

    /// `discounted`: uncounted releases come off the counts (a clean handover only). A count
    /// that reaches 0 stays, as 0: a missing one below `upto` would read as "may have been
    /// handed out once".
    fn checkpoint_upto(&self, upto: i64, discounted: bool) -> Checkpoint {
        let low = self.low();
        let less = |o: &i64| {
            if discounted {
                self.discount.get(o).copied().unwrap_or(0)
            } else {
                0
            }
        };
        Checkpoint {
            low,
            upto: upto.max(low),
            acked: self.acked.range(low..).copied().collect(),
            tries: self
                .tries
                .range(low..)
                .map(|(o, n)| (*o, n.saturating_sub(less(o))))
                .collect(),
        }
    }

    /// Drops everything (the partition was revoked); returns the offsets that were out.
    pub(crate) fn clear(&mut self) -> Vec<i64> {
        let out: Vec<i64> = self.out.keys().copied().collect();
        self.ready.clear();
        self.out.clear();
        self.busy.clear();
        self.discount.clear();
        out
    }
}

/// The durable part of a [`Window`], written to the partition's checkpoint and read back by its
/// next owner. Text, so operators can read it:
/// `v2 low=120 upto=1130 acked=125-127,130 tries=120-124:1,128:3` (`v1`, without `upto`, is
/// read too).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Checkpoint {
    /// Every offset below is acked.
    pub(crate) low: i64,
    /// Unsettled offsets from `low` up to here without a count in `tries` may have been handed
    /// out once.
    pub(crate) upto: i64,
    /// Acked offsets at or above `low`.
    pub(crate) acked: BTreeSet<i64>,
    /// Hand-out counts of unsettled offsets at or above `low`.
    pub(crate) tries: BTreeMap<i64, u32>,
}

impl Checkpoint {
    /// The text form (runs of consecutive offsets written as ranges).
    pub(crate) fn encode(&self) -> String {
        let mut s = format!("v2 low={} upto={}", self.low, self.upto.max(self.low));
        s.push_str(" acked=");
        push_runs(&mut s, self.acked.iter().map(|o| (*o, ())), |_, _| {});
        s.push_str(" tries=");
        push_runs(&mut s, self.tries.iter().map(|(o, n)| (*o, *n)), |s, n| {
            let _ = write!(s, ":{n}");
        });
        s
    }

    /// Reads [`Checkpoint::encode`]'s form; `None` for anything else (a record this backend did
    /// not write is ignored, never trusted).
    pub(crate) fn decode(text: &str) -> Option<Checkpoint> {
        let mut parts = text.split(' ');
        let v2 = match parts.next()? {
            "v1" => false,
            "v2" => true,
            _ => return None,
        };
        let mut cp = Checkpoint::default();
        let mut seen_low = false;
        let mut upto = None;
        for part in parts {
            let (name, value) = part.split_once('=')?;
            match name {
                "low" => {
                    cp.low = value.parse().ok()?;
                    seen_low = true;
                }
                "upto" if v2 => upto = Some(value.parse::<i64>().ok()?),
                "acked" => {
                    for (lo, hi, _) in runs(value)? {
                        cp.acked.extend(lo..=hi);
                    }
                }
                "tries" => {
                    for (lo, hi, n) in runs(value)? {
                        let n: u32 = n?.parse().ok()?;
                        cp.tries.extend((lo..=hi).map(|o| (o, n)));
                    }
                }
                _ => return None,
            }
        }
        if v2 && upto.is_none() {
            return None;
        }
        cp.upto = upto.unwrap_or(cp.low).max(cp.low);
        seen_low.then_some(cp)
    }
}

/// Writes `(offset, tag)` pairs as comma-separated runs `a-b` of consecutive offsets with equal
/// tags, each followed by `tag_fmt`'s text.
fn push_runs<V: PartialEq + Copy>(
    s: &mut String,
    items: impl Iterator<Item = (i64, V)>,
    tag_fmt: impl Fn(&mut String, V),
) {
    let mut run: Option<(i64, i64, V)> = None;
    let mut first = true;
    let mut flush = |s: &mut String, (lo, hi, v): (i64, i64, V)| {
        if !first {
            s.push(',');
        }
        first = false;
        if lo == hi {
            let _ = write!(s, "{lo}");
        } else {
            let _ = write!(s, "{lo}-{hi}");
        }
        tag_fmt(s, v);
    };
    for (o, v) in items {
        run = match run {
            Some((lo, hi, rv)) if o == hi + 1 && rv == v => Some((lo, o, rv)),
            Some(r) => {
                flush(s, r);
                Some((o, o, v))
            }
            None => Some((o, o, v)),
        };
    }
    if let Some(r) = run {
        flush(s, r);
    }
}

/// Parses `a-b:tag,c,...` into (low, high, tag) runs; at most 1,000,000 offsets in all, so a
/// corrupt record cannot make the reader allocate without bound.
fn runs(value: &str) -> Option<Vec<(i64, i64, Option<&str>)>> {
    let mut out = Vec::new();
    let mut total: i64 = 0;
    for item in value.split(',').filter(|i| !i.is_empty()) {
        let (range, tag) = match item.split_once(':') {
            Some((r, t)) => (r, Some(t)),
            None => (item, None),
        };
        let (lo, hi) = match range.split_once('-') {
            Some((a, b)) => (a.parse().ok()?, b.parse().ok()?),
            None => {
                let o: i64 = range.parse().ok()?;
                (o, o)
            }
        };
        if lo < 0 || hi < lo {
            return None;
        }
        total = total.checked_add(hi - lo + 1)?;
        if total > 1_000_000 {
            return None;
        }
        out.push((lo, hi, tag));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq)]
    struct R(i64, Option<&'static str>);

    impl Keyed for R {
        fn offset(&self) -> i64 {
            self.0
        }
        fn key(&self) -> Option<&str> {
            self.1
        }
    }

    /// Pushes keyless records at offsets `0..n`.
    fn fill(w: &mut Window<R>, n: i64) {
        for o in 0..n {
            w.push(R(o, None));
        }
    }

    fn offsets(out: &[Out<R>]) -> Vec<i64> {
        out.iter().map(|o| o.record.0).collect()
    }

    #[test]
    fn one_record_per_key_is_out_and_keyless_ones_flow() {
        let mut w = Window::new(0);
        for r in [
            R(0, Some("a")),
            R(1, Some("a")),
            R(2, None),
            R(3, Some("b")),
            R(4, None),
        ] {
            assert!(w.push(r));
        }
        let first = w.take(10);
        assert_eq!(offsets(&first), [0, 2, 3, 4]);
        assert!(w.take(10).is_empty(), "a@1 waits for a@0");
        assert!(w.ack(0));
        assert_eq!(offsets(&w.take(10)), [1]);
        assert_eq!(w.low(), 1);
    }

    #[test]
    fn records_passed_over_keep_their_place_when_the_take_stops_early() {
        let mut w = Window::new(0);
        for r in [
            R(0, Some("a")),
            R(1, Some("a")),
            R(2, Some("a")),
            R(3, Some("b")),
            R(4, Some("c")),
            R(5, Some("d")),
        ] {
            assert!(w.push(r));
        }
        assert_eq!(offsets(&w.take(1)), [0]);
        // a@1 and a@2 are passed over; the take stops after c@4, before d@5.
        assert_eq!(offsets(&w.take(2)), [3, 4]);
        assert_eq!(w.ready_len(), 3);
        assert!(w.ack(0));
        assert_eq!(offsets(&w.take(10)), [1, 5]);
        assert!(w.ack(1));
        assert_eq!(offsets(&w.take(10)), [2]);
        assert_eq!(w.ready_len(), 0);
    }

    #[test]
    fn the_low_mark_waits_for_the_lowest_unsettled_offset() {
        let mut w = Window::new(10);
        for o in 10..15 {
            w.push(R(o, None));
        }
        let _ = w.take(5);
        for o in [11, 12, 14] {
            assert!(w.ack(o));
        }
        assert_eq!(w.low(), 10);
        let cp = w.checkpoint();
        assert_eq!(
            cp.encode(),
            "v2 low=10 upto=10 acked=11-12,14 tries=10:1,13:1"
        );
        assert!(w.ack(10));
        assert_eq!(w.low(), 13);
        assert!(!w.ack(10), "acked twice");
        assert!(w.ack(13));
        assert_eq!(w.low(), 15);
        assert_eq!(w.checkpoint().encode(), "v2 low=15 upto=15 acked= tries=");
    }

    #[test]
    fn a_released_record_goes_back_before_the_later_ones_of_its_key_and_counts_again() {
        let mut w = Window::new(0);
        for r in [R(0, Some("k")), R(1, Some("k")), R(2, Some("j"))] {
            w.push(r);
        }
        let out = w.take(10);
        assert_eq!(offsets(&out), [0, 2]);
        let rec = out.into_iter().next().map(|o| o.record);
        assert!(w.release(rec.clone().unwrap_or(R(0, None)), false));
        let again = w.take(10);
        assert_eq!(offsets(&again), [0]);
        assert_eq!(again[0].delivery_count, 2);
        assert!(!w.release(R(5, None), false), "never out");
    }

    #[test]
    fn an_uncounted_release_hands_the_record_out_again_with_the_same_count_here_and_at_a_new_owner()
    {
        let mut w = Window::new(0);
        for o in 0..3 {
            w.push(R(o, None));
        }
        let out = w.take(10);
        assert!(out.iter().all(|o| o.delivery_count == 1));
        for o in out {
            assert!(w.release(o.record, true));
        }
        let again = w.take(10);
        let counts: Vec<u32> = again.iter().map(|o| o.delivery_count).collect();
        assert_eq!(counts, [1, 1, 1], "an uncounted release is not a delivery");
        // A counted release after an uncounted one counts; the next owner reads the counts back.
        let mut it = again.into_iter();
        let first = it.next().map(|o| o.record).unwrap_or(R(0, None));
        assert!(w.release(first, false));
        for o in it {
            assert!(w.release(o.record, true));
        }
        // Each hand-out keeps a count of its own (receipts of earlier ones are stale), and a
        // regular checkpoint (what a crash leaves) counts every hand-out.
        assert_eq!(
            w.checkpoint().tries.values().copied().collect::<Vec<_>>(),
            [2, 2, 2]
        );
        let cp = Checkpoint::decode(&w.final_checkpoint().encode());
        let mut next = Window::restore(0, cp.as_ref());
        for o in 0..3 {
            next.push(R(o, None));
        }
        let counts: Vec<u32> = next.take(10).iter().map(|o| o.delivery_count).collect();
        assert_eq!(
            counts,
            [2, 1, 1],
            "a clean handover passes on the uncounted releases"
        );
    }

    #[test]
    fn a_new_owner_skips_what_was_acked_and_counts_on() {
        let mut w = Window::new(0);
        for o in 0..6 {
            w.push(R(o, None));
        }
        let _ = w.take(6);
        w.ack(1);
        w.ack(2);
        w.ack(4);
        // Crash: the checkpoint is what survives; the group committed only 0.
        let text = w.checkpoint().encode();
        let cp = Checkpoint::decode(&text).expect("decodes");
        let mut next = Window::restore(0, Some(&cp));
        assert_eq!(next.fetch_from(), 0);
        for o in 0..6 {
            next.push(R(o, None));
        }
        let out = next.take(10);
        assert_eq!(offsets(&out), [0, 3, 5]);
        assert!(out.iter().all(|o| o.delivery_count == 2), "{out:?}");
    }

    #[test]
    fn a_commit_newer_than_the_checkpoint_wins() {
        let cp = Checkpoint::decode("v1 low=5 acked=7 tries=5-6:2").expect("decodes");
        let w: Window<R> = Window::restore(8, Some(&cp));
        assert_eq!(w.fetch_from(), 8);
        assert!(w.checkpoint().tries.is_empty());
    }

    #[test]
    fn records_fetched_twice_are_dropped() {
        let mut w = Window::new(0);
        assert!(w.push(R(0, None)));
        assert!(!w.push(R(0, None)));
        let _ = w.take(1);
        w.ack(0);
        assert!(!w.push(R(0, None)));
        assert!(w.push(R(1, None)));
    }

    #[test]
    fn checkpoints_read_back_and_refuse_what_they_did_not_write() {
        let cp = Checkpoint {
            low: 3,
            upto: 12,
            acked: [5, 6, 7, 9].into_iter().collect(),
            tries: [(3, 1), (4, 1), (8, 4)].into_iter().collect(),
        };
        let text = cp.encode();
        assert_eq!(text, "v2 low=3 upto=12 acked=5-7,9 tries=3-4:1,8:4");
        assert_eq!(Checkpoint::decode(&text), Some(cp));
        for bad in [
            "",
            "v2 low=1",
            "v1 acked=1",
            "v1 low=x",
            "v1 low=1 acked=5-3",
            "v1 low=1 tries=4",
            "v1 low=1 acked=0-99999999",
            "v1 low=1 other=2",
            "v1 low=1 upto=4",
            "v2 low=1 acked=",
            "v2 low=1 upto=x",
        ] {
            assert_eq!(Checkpoint::decode(bad), None, "{bad:?}");
        }
    }
    #[test]
    fn version_one_checkpoints_read_back_without_a_reservation() {
        let cp = Checkpoint::decode("v1 low=4 acked=6 tries=4:2").expect("decodes");
        assert_eq!(cp.upto, 4);
        assert_eq!(cp.acked, [6].into_iter().collect());
    }

    #[test]
    fn after_a_crash_every_unsettled_record_of_the_reservation_counts_as_handed_out_once() {
        let mut w = Window::new(0);
        fill(&mut w, 10);
        w.reserve(8);
        let _ = w.take(3);
        assert!(w.ack(1));
        // Killed: the last checkpoint written is one with the reservation.
        let cp = Checkpoint::decode(&w.checkpoint().encode()).expect("decodes");
        assert_eq!((cp.low, cp.upto), (0, 8));
        let mut next = Window::restore(0, Some(&cp));
        fill(&mut next, 10);
        let out = next.take(10);
        let counts: Vec<(i64, u32)> = out.iter().map(|o| (o.record.0, o.delivery_count)).collect();
        // 0 and 2 were out (counted 1 each): now their second; 3..8 may have been out; 8 and 9
        // were beyond the reservation.
        assert_eq!(
            counts,
            [
                (0, 2),
                (2, 2),
                (3, 2),
                (4, 2),
                (5, 2),
                (6, 2),
                (7, 2),
                (8, 1),
                (9, 1)
            ]
        );
    }

    #[test]
    fn a_clean_hand_over_writes_exact_counts_and_keeps_what_a_crash_left_uncertain() {
        let mut w = Window::new(0);
        fill(&mut w, 6);
        w.reserve(1000);
        let _ = w.take(2);
        let cp = w.final_checkpoint();
        assert_eq!(cp.upto, 0, "no reservation in a hand-over");
        assert_eq!(cp.tries, [(0, 1), (1, 1)].into_iter().collect());

        // A window restored after a crash hands over cleanly: the uncertain range stays.
        let crashed = Checkpoint {
            low: 0,
            upto: 5,
            ..Checkpoint::default()
        };
        let mut r: Window<R> = Window::restore(0, Some(&crashed));
        fill(&mut r, 6);
        let first = r.take(1);
        assert_eq!(first[0].delivery_count, 2);
        let cp = r.final_checkpoint();
        assert_eq!(cp.upto, 5);
        let mut again: Window<R> = Window::restore(0, Some(&cp));
        fill(&mut again, 6);
        let counts: Vec<u32> = again.take(10).iter().map(|o| o.delivery_count).collect();
        assert_eq!(counts, [3, 2, 2, 2, 2, 1], "uncertain once, never twice");
    }
}
