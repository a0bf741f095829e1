//! Delayed delivery on RabbitMQ itself, with no plugin: ONE shared set of TTL queues per key
//! prefix, whatever the number of queues, walked by binary decomposition of the delay (the
//! technique NServiceBus uses on RabbitMQ).
//!
//! For each level `k` in `0..LEVELS` there is a topic exchange and a durable classic queue, both
//! named `{prefix}stevedore.delay.{k:02}`. The queue holds every message for exactly 2^k ms
//! (`x-message-ttl`) and then dead-letters it, keeping its routing key, into the exchange of level
//! `k − 1` (level 0 into the *deliver* exchange). The routing key of a delayed message is its delay
//! in milliseconds written as [`LEVELS`] binary words, most significant first (`0.0.…1.0.1`).
//! Exchange `k` routes a key whose word for bit `k` is `1` into its queue (wait 2^k ms) and one
//! whose word is `0` straight on to exchange `k − 1`. So a message published at the exchange of its
//! highest set bit waits, in total, exactly the sum of its set bits: its delay, rounded *up* to the
//! millisecond. Every queue's messages share one TTL, so expiry is first in, first out and a short
//! delay never waits behind a long one.
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
//!   restart keeps waiting messages (their TTL keeps running across it);
//! - unbounded: delays above [`max_delay`] wait the maximum and arrive early; the runtime
//!   re-publishes an early arrival for the remaining time ("hops"), as for any capped native delay;
//! - a fixed topology: `2 × LEVELS + 2` exchanges and `LEVELS + 1` queues per prefix, declared on
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

/// The binding key that selects, at level `k`, routing keys whose bit `k` is `bit`.
pub(crate) fn pattern(k: u32, bit: bool) -> String {
    let mut p = "*.".repeat((LEVELS - 1 - k) as usize);
    p.push(if bit { '1' } else { '0' });
    p.push_str(".#");
    p
}

/// Level `k`'s exchange and queue name.
pub fn level_name(prefix: &str, k: u32) -> String {
    format!("{prefix}stevedore.delay.{k:02}")
}

/// The headers exchange that hands due messages to their queues.
pub fn deliver_name(prefix: &str) -> String {
    format!("{prefix}stevedore.delay.deliver")
}

/// The alternate exchange and queue of messages whose target queue had no binding.
pub fn unroutable_name(prefix: &str) -> String {
    format!("{prefix}stevedore.delay.unroutable")
}

/// Where level `k`'s queue dead-letters to: the exchange one level down, or the deliver exchange.
pub(crate) fn next_exchange(prefix: &str, k: u32) -> String {
    if k == 0 {
        deliver_name(prefix)
    } else {
        level_name(prefix, k - 1)
    }
}

/// Every queue and exchange of the shared delay topology of `prefix` (for clean-up tools and
/// tests): `(queues, exchanges)`.
pub fn topology(prefix: &str) -> (Vec<String>, Vec<String>) {
    let mut queues: Vec<String> = (0..LEVELS).map(|k| level_name(prefix, k)).collect();
    queues.push(unroutable_name(prefix));
    let mut exchanges = queues.clone();
    exchanges.push(deliver_name(prefix));
    (queues, exchanges)
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

    #[test]
    fn patterns_pick_one_word() {
        assert_eq!(pattern(LEVELS - 1, true), "1.#");
        assert_eq!(pattern(0, false), format!("{}0.#", "*.".repeat(31)));
    }

    /// Walks a delay through the levels as the broker would and adds up the waits.
    #[test]
    fn the_levels_add_up_to_the_delay_exactly() {
        for ms in [
            1u64,
            2,
            3,
            50,
            999,
            1000,
            1500,
            65_535,
            86_400_000,
            (1 << 32) - 1,
        ] {
            let key = routing_key(ms);
            let key: Vec<&str> = key.split('.').collect();
            let mut waited = 0u64;
            for k in (0..=entry_level(ms)).rev() {
                let word = key[(LEVELS - 1 - k) as usize];
                if word == "1" {
                    waited += 1 << k;
                }
            }
            assert_eq!(waited, ms);
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
        assert_eq!(x.len(), LEVELS as usize + 2);
        assert_eq!(q[0], "app.stevedore.delay.00");
        assert_eq!(next_exchange("app.", 0), "app.stevedore.delay.deliver");
        assert_eq!(next_exchange("app.", 3), "app.stevedore.delay.02");
    }
}
