//! Delayed delivery on RabbitMQ itself, with no plugin: ONE shared set of TTL queues per key
//! prefix, whatever the number of queues, walked by binary decomposition of the delay (the
//! technique NServiceBus uses on RabbitMQ).
//!
//! For each level `k` in `0..LEVELS` there is a durable classic queue `{prefix}stevedore.delay.{k:02}`
//! that holds every message for exactly 2^k ms (`x-message-ttl`) and then dead-letters it into the
//! headers exchange `{prefix}stevedore.delay.after.{k:02}`. A delayed message carries its route:
//! for its delay in milliseconds, with set bits k₁ > k₂ > … > kₙ, the headers
//! `stevedore-after-32 = k₁`, `stevedore-after-k₁ = k₂`, …, `stevedore-after-kₙ = deliver`
//! ([`hops`]). Exchange `after.k` sends a message to the level its `stevedore-after-k` names, or
//! to the deliver exchange; a message enters at `after.32` ([`entry_name`]). So it waits, in
//! total, exactly the sum of its set bits: its delay, rounded *up* to the millisecond, and every
//! move between levels crosses one exchange with at most 33 bindings. (Headers, not a topic key of
//! 32 binary words as NServiceBus does: RabbitMQ's topic matching of such keys cost ~0.2 ms per
//! message here, which a burst of 250 due messages turned into 200 ms of lateness.) Every level's
//! messages share one TTL, so expiry is first in, first out and a short delay never waits behind
//! a long one. The routing key is the delay written in binary, for people reading the queues.
//!
//! The deliver exchange `{prefix}stevedore.delay.deliver` is a headers exchange: each work queue
//! is bound to it by the `stevedore-target` header (its AMQP name), bound whenever this backend
//! declares the queue. A message whose target has no binding (its queue was deleted while it
//! waited) goes to the deliver exchange's alternate exchange and waits in
//! `{prefix}stevedore.delay.unroutable`; [`Broker::prepare`](stevedore_core::Broker::prepare)
//! moves such messages on to their (re-declared) queues, so nothing is dropped silently.
//!
//! Properties:
//! - never early: the broker holds each message for at least its delay (rounded up to the ms);
//! - late only by the broker's expiry and dead-letter work (a few ms per set bit) plus the
//!   consumer's push: no promoter, no polling;
//! - durable: exchanges, queues and bindings are durable and messages persistent, so a broker
//!   restart keeps waiting messages (their TTL keeps running across it). A move between levels
//!   that falls due while the broker is down happens when the level's queue is back, and the
//!   next level's wait starts then: such a message arrives late by up to the outage, never early;
//! - unbounded: delays above [`max_delay`] wait the maximum and arrive early; the runtime
//!   re-publishes an early arrival for the remaining time ("hops"), as for any capped native delay;
//! - a fixed topology: `LEVELS + 3` exchanges and `LEVELS + 1` queues per prefix, declared on
//!   first use, instead of two dozen queues per physical queue.
//!
//! Trade-off: RabbitMQ cannot count the messages waiting *for one queue* in shared queues, so
//! [`Depth::delayed`](stevedore_core::Depth::delayed) is `None` on this backend;
//! [`RabbitBroker::delayed_total`](crate::RabbitBroker::delayed_total) gives the total over every
//! queue. Dead-lettering from classic queues is at-most-once inside the broker (a broker crash in
//! the middle of moving a message between levels can drop it), as it was for the earlier per-queue
//! tiers.

use std::time::Duration;

/// Number of delay levels: 2^0 … 2^31 ms. The longest native delay is 2^32 − 1 ms (49.7 days).
pub const LEVELS: u32 = 32;

/// The longest delay the broker holds natively with `levels` levels (at most [`LEVELS`]).
pub fn max_delay(levels: u32) -> Duration {
    let levels = levels.clamp(1, LEVELS);
    Duration::from_millis((1u64 << levels) - 1)
}

/// The delay, in whole milliseconds rounded up (so never early), capped at `2^levels − 1`.
pub fn delay_ms(remaining: Duration, levels: u32) -> u64 {
    let cap = (1u64 << levels.clamp(1, LEVELS)) - 1;
    let ms = remaining.as_nanos().div_ceil(1_000_000);
    u64::try_from(ms).unwrap_or(u64::MAX).min(cap)
}

/// The routing key of a delay of `ms` milliseconds: [`LEVELS`] words `0`/`1`, most significant
/// bit first.
pub fn routing_key(ms: u64) -> String {
    let mut key = String::with_capacity(2 * LEVELS as usize);
    for k in (0..LEVELS).rev() {
        key.push(if ms >> k & 1 == 1 { '1' } else { '0' });
        if k > 0 {
            key.push('.');
        }
    }
    key
}

/// The level a delay of `ms` (> 0) enters at: its highest set bit.
pub fn entry_level(ms: u64) -> u32 {
    63 - ms.max(1).leading_zeros()
}

/// The route of a delay of `ms` (> 0): `(k, next)` for the entry (`k = LEVELS`) and each set bit
/// `k`, where `next` is the next lower set bit, or `None` (deliver) after the lowest.
pub fn hops(ms: u64) -> Vec<(u32, Option<u32>)> {
    let bits: Vec<u32> = (0..LEVELS).rev().filter(|k| ms >> k & 1 == 1).collect();
    let mut out = Vec::with_capacity(bits.len() + 1);
    let mut at = LEVELS;
    for b in bits {
        out.push((at, Some(b)));
        at = b;
    }
    out.push((at, None));
    out
}

/// The header exchange `after.k` routes by.
pub(crate) fn hop_header(k: u32) -> String {
    format!("stevedore-after-{k:02}")
}

/// The value of [`hop_header`] that sends a message to level `next`, or to the deliver exchange.
pub(crate) fn hop_value(next: Option<u32>) -> String {
    match next {
        Some(j) => format!("{j:02}"),
        None => "deliver".to_string(),
    }
}

/// Level `k`'s queue.
pub fn level_name(prefix: &str, k: u32) -> String {
    format!("{prefix}stevedore.delay.{k:02}")
}

/// The topic exchange a message leaving level `k` goes to (`k = LEVELS`: where it enters).
pub fn after_name(prefix: &str, k: u32) -> String {
    format!("{prefix}stevedore.delay.after.{k:02}")
}

/// The exchange delayed messages are published to.
pub fn entry_name(prefix: &str) -> String {
    after_name(prefix, LEVELS)
}

/// The headers exchange that hands due messages to their queues.
pub fn deliver_name(prefix: &str) -> String {
    format!("{prefix}stevedore.delay.deliver")
}

/// The alternate exchange and queue of messages whose target queue had no binding.
pub fn unroutable_name(prefix: &str) -> String {
    format!("{prefix}stevedore.delay.unroutable")
}

/// Every queue and exchange of the shared delay topology of `prefix` (for clean-up tools and
/// tests): `(queues, exchanges)`.
pub fn topology(prefix: &str) -> (Vec<String>, Vec<String>) {
    let mut queues: Vec<String> = (0..LEVELS).map(|k| level_name(prefix, k)).collect();
    queues.push(unroutable_name(prefix));
    let mut exchanges: Vec<String> = (0..=LEVELS).map(|k| after_name(prefix, k)).collect();
    exchanges.push(deliver_name(prefix));
    exchanges.push(unroutable_name(prefix));
    (queues, exchanges)
}

/// Where exchange `after.k` sends a message with `headers`, by its bindings (`x-match = all` on
/// `stevedore-after-k`): `Some(level)`, or `None` for the deliver exchange. For tests.
#[cfg(test)]
fn route(k: u32, headers: &[(String, String)]) -> Vec<Option<u32>> {
    let targets = (0..k).map(Some).chain([None]);
    targets
        .filter(|j| {
            headers
                .iter()
                .any(|(h, v)| *h == hop_header(k) && *v == hop_value(*j))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_spell_the_delay_in_binary_most_significant_first() {
        let k = routing_key(5);
        assert_eq!(k.split('.').count(), LEVELS as usize);
        assert!(k.ends_with("0.1.0.1"), "{k}");
        assert_eq!(routing_key(0), vec!["0"; 32].join("."));
        assert_eq!(entry_level(1), 0);
        assert_eq!(entry_level(5), 2);
        assert_eq!(entry_level(1500), 10);
    }

    const SAMPLES: [u64; 10] = [
        1,
        2,
        3,
        50,
        999,
        1000,
        1500,
        65_535,
        86_400_000,
        (1 << 32) - 1,
    ];

    #[test]
    fn hops_name_the_next_set_bit() {
        assert_eq!(hops(5), vec![(32, Some(2)), (2, Some(0)), (0, None)]);
        assert_eq!(hops(1 << 31), vec![(32, Some(31)), (31, None)]);
        assert_eq!(hop_header(3), "stevedore-after-03");
        assert_eq!(hop_value(None), "deliver");
    }

    /// Walks delays through the bindings as the broker would: every exchange sends a message to
    /// exactly one place, and the waits add up to the delay exactly, one level per set bit.
    #[test]
    fn the_levels_add_up_to_the_delay_exactly() {
        for ms in SAMPLES {
            let headers: Vec<(String, String)> = hops(ms)
                .into_iter()
                .map(|(k, next)| (hop_header(k), hop_value(next)))
                .collect();
            let (mut at, mut waited, mut levels) = (LEVELS, 0u64, 0);
            loop {
                let next = route(at, &headers);
                assert_eq!(next.len(), 1, "after.{at} routes {ms} ms to {next:?}");
                match next[0] {
                    Some(level) => {
                        if levels == 0 {
                            assert_eq!(level, entry_level(ms));
                        }
                        waited += 1 << level;
                        at = level;
                        levels += 1;
                    }
                    None => break,
                }
            }
            assert_eq!(waited, ms, "{ms} ms");
            assert_eq!(levels, ms.count_ones());
        }
    }

    #[test]
    fn delays_round_up_and_cap() {
        assert_eq!(delay_ms(Duration::from_micros(1), LEVELS), 1);
        assert_eq!(delay_ms(Duration::from_micros(1500), LEVELS), 2);
        assert_eq!(delay_ms(Duration::from_millis(7), LEVELS), 7);
        assert_eq!(
            delay_ms(Duration::from_secs(1 << 40), LEVELS),
            (1 << 32) - 1
        );
        assert_eq!(delay_ms(Duration::from_secs(5), 11), 2047);
        assert_eq!(max_delay(11), Duration::from_millis(2047));
        assert_eq!(max_delay(LEVELS).as_secs(), 4_294_967);
    }

    #[test]
    fn topology_is_fixed_per_prefix() {
        let (q, x) = topology("app.");
        assert_eq!(q.len(), LEVELS as usize + 1);
        assert_eq!(x.len(), LEVELS as usize + 3);
        assert_eq!(q[0], "app.stevedore.delay.00");
        assert_eq!(entry_name("app."), "app.stevedore.delay.after.32");
    }
}
