//! The delay store: tiered TTL wait queues on RabbitMQ itself (no plugin).
//!
//! For each physical queue `Q` (AMQP name, prefix included):
//!
//! - tier queues `Q.delay.<ms>` for `ms` = 50 × 2^k, k = 0..=21 (50 ms … 29 h): durable classic
//!   queues with `x-message-ttl = ms` that dead-letter every expired message, through the default
//!   exchange, into
//! - one router queue `Q.delay.ready` (durable, classic).
//!
//! [`DelayStore::schedule`] publishes each message (persistent, confirmed, with a
//! `stevedore-target` header) to the largest tier not longer than its remaining delay (the smallest
//! tier when less than 50 ms remain). Every message of a tier waits the same time, so a short delay
//! never waits behind a long one. [`DelayStore::promote_due`] drains router queues with `basic.get`:
//! a message whose `not_before` has come is published (confirmed) to its queue, an early one goes
//! into the next tier for what remains, and only then is the router message acked. A delay of any
//! length is therefore never early, and late by at most the promoter's interval plus 50 ms.
//! Everything is durable: a broker restart keeps waiting messages (a tier's TTL keeps running
//! across it), and a worker crash between publish and ack moves a message twice at worst
//! (at-least-once), never loses it.

use crate::amqp;
use crate::link::{call, short, Link, QueueKind};
use crate::RabbitBroker;
use async_trait::async_trait;
use futures::future::join_all;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions};
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};
use stevedore_core::{to_millis, BrokerError, DelayStore, Envelope};

/// Number of tiers: 50 ms × 2^k for k below this (the longest is 29 h 7 min).
pub const TIERS: u32 = 22;
/// The shortest tier, in milliseconds.
pub const SHORTEST_TIER_MS: u64 = 50;

/// Tier lengths in milliseconds, shortest first.
pub fn tiers() -> impl Iterator<Item = u64> {
    (0..TIERS).map(|k| SHORTEST_TIER_MS << k)
}

/// The tier a message with `remaining` delay goes to: the longest tier not longer than it, or the
/// shortest tier.
pub fn tier_for(remaining: Duration) -> u64 {
    let ms = u64::try_from(remaining.as_millis()).unwrap_or(u64::MAX);
    tiers()
        .take_while(|t| *t <= ms)
        .last()
        .unwrap_or(SHORTEST_TIER_MS)
}

pub(crate) fn tier_name(amqp: &str, ms: u64) -> String {
    format!("{amqp}.delay.{ms}")
}

pub(crate) fn router_name(amqp: &str) -> String {
    format!("{amqp}.delay.ready")
}

/// The router queue a tier queue dead-letters into.
pub(crate) fn router_of_tier(tier: &str) -> String {
    match tier.rfind(".delay.") {
        Some(i) => router_name(&tier[..i]),
        None => router_name(tier),
    }
}

/// Delay-store state of one broker handle.
#[derive(Default)]
pub(crate) struct DelayShared {
    /// Physical queues whose router queues this handle drains (prepared or scheduled to).
    queues: Mutex<BTreeSet<String>>,
    /// Where the next promotion starts, so no queue's router is starved by another's backlog.
    cursor: AtomicUsize,
    /// The channel `basic.get`s run on, with the connection generation it belongs to. Promotion
    /// holds it for the whole call, so all unacked tags on it are that call's.
    channel: tokio::sync::Mutex<Option<(u64, lapin::Channel)>>,
}

impl DelayShared {
    pub(crate) fn register(&self, queue: &str) {
        self.queues
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(queue.to_string());
    }

    fn rotation(&self) -> Vec<String> {
        let all: Vec<String> = self
            .queues
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect();
        if all.is_empty() {
            return all;
        }
        let start = self.cursor.fetch_add(1, Ordering::Relaxed) % all.len();
        all[start..].iter().chain(&all[..start]).cloned().collect()
    }

    pub(crate) async fn reset(&self) {
        self.channel.lock().await.take();
    }
}

/// The RabbitMQ delay store (see the module docs). Obtained from
/// [`Broker::delay_store`](stevedore_core::Broker::delay_store); shares the broker's connection.
#[derive(Clone, Debug)]
pub struct RabbitDelayStore {
    pub(crate) broker: RabbitBroker,
}

impl RabbitDelayStore {
    /// Declares the router and every tier of AMQP queue `amqp` (once per connection).
    async fn ensure_tiers(&self, link: &Link, amqp: &str) -> Result<(), BrokerError> {
        let expires = self.broker.expires();
        let router = router_name(amqp);
        link.ensure(&router, QueueKind::Router, expires).await?;
        let names: Vec<(String, u64)> = tiers().map(|ms| (tier_name(amqp, ms), ms)).collect();
        let results = join_all(
            names
                .iter()
                .map(|(n, ms)| link.ensure(n, QueueKind::Tier { ttl_ms: *ms }, expires)),
        )
        .await;
        results.into_iter().collect()
    }
}

#[async_trait]
impl DelayStore for RabbitDelayStore {
    /// Publishes each message to the tier of its remaining delay (confirmed); messages already due
    /// go straight to `queue`.
    async fn schedule(&self, queue: &str, messages: Vec<Envelope>) -> Result<(), BrokerError> {
        self.broker.check_payloads(&messages)?;
        if messages.is_empty() {
            return Ok(());
        }
        let amqp_q = self.broker.amqp_name(queue)?;
        let link = self.broker.link().await?;
        self.broker.inner.delay.register(queue);
        self.ensure_tiers(&link, &amqp_q).await?;
        let now = SystemTime::now();
        let mut batches: HashMap<String, Vec<_>> = HashMap::new();
        for env in &messages {
            match env.delay_remaining(now) {
                None => {
                    link.ensure(&amqp_q, QueueKind::Work, self.broker.expires())
                        .await?;
                    batches
                        .entry(amqp_q.clone())
                        .or_default()
                        .push(amqp::properties(env, &[])?);
                }
                Some(left) => batches
                    .entry(tier_name(&amqp_q, tier_for(left)))
                    .or_default()
                    .push(amqp::properties(env, &[(amqp::TARGET, queue)])?),
            }
        }
        for (dest, batch) in batches {
            link.publish_confirmed(&dest, batch).await?;
        }
        Ok(())
    }

    /// Drains up to `limit` messages from the router queues of the queues this handle prepared or
    /// scheduled to: due ones are published to their queue, early ones to the next tier, then all
    /// are acked. Returns how many router messages were handled (moved to their queue or to a
    /// tier), so a caller that gets `limit` back knows more may be waiting.
    async fn promote_due(&self, now: SystemTime, limit: usize) -> Result<usize, BrokerError> {
        let b = &self.broker;
        let queues = b.inner.delay.rotation();
        if queues.is_empty() || limit == 0 {
            return Ok(0);
        }
        let link = b.link().await?;
        let expires = b.expires();
        let mut slot = b.inner.delay.channel.lock().await;
        let ch = match slot.as_ref() {
            Some((gen, ch)) if *gen == link.gen && ch.status().connected() => ch.clone(),
            _ => {
                let ch = call("open the delay channel", link.conn.create_channel())
                    .await
                    .map_err(|e| link.note(e))?;
                *slot = Some((link.gen, ch.clone()));
                ch
            }
        };
        let mut taken: Vec<(u64, String, amqp::Decoded)> = Vec::new();
        for q in &queues {
            if taken.len() >= limit {
                break;
            }
            let router = router_name(&b.amqp_name(q)?);
            link.ensure(&router, QueueKind::Router, expires).await?;
            let router_short = short(&router)?;
            while taken.len() < limit {
                let got = call(
                    format!("basic.get from {router}"),
                    ch.basic_get(router_short.clone(), BasicGetOptions { no_ack: false }),
                )
                .await;
                match got {
                    Ok(Some(m)) => {
                        let d = m.delivery;
                        let decoded = amqp::decode(&d.properties, d.data, d.redelivered);
                        taken.push((d.delivery_tag, q.clone(), decoded));
                    }
                    Ok(None) => break,
                    Err(e) => {
                        // Dropping the channel returns what this call took to the router queues.
                        *slot = None;
                        if let BrokerError::Other { message, .. } = &e {
                            if message.contains("NOT-FOUND") {
                                // Deleted under us: declared again on the next call.
                                link.forget(&router);
                                return Err(BrokerError::transient(message.clone()));
                            }
                        }
                        return Err(link.note(e));
                    }
                }
            }
        }
        let Some(last_tag) = taken.iter().map(|(t, _, _)| *t).max() else {
            return Ok(0);
        };
        let moved = taken.len();
        let routed = self.route(&link, now, taken).await;
        let settle = match &routed {
            Ok(()) => {
                call(
                    "ack promoted delay messages",
                    ch.basic_ack(last_tag, BasicAckOptions { multiple: true }),
                )
                .await
            }
            Err(_) => {
                call(
                    "return delay messages to their router",
                    ch.basic_nack(
                        last_tag,
                        BasicNackOptions {
                            multiple: true,
                            requeue: true,
                        },
                    ),
                )
                .await
            }
        };
        if settle.is_err() {
            // The channel is gone; the broker returns its unacked messages to the router (they
            // may be moved again: at-least-once).
            *slot = None;
        }
        routed?;
        settle.map_err(|e| link.note(e))?;
        Ok(moved)
    }

    /// Messages waiting in `queue`'s tiers and router queue (every tier is declared, idempotently,
    /// to read its count).
    async fn delayed(&self, queue: &str) -> Result<u64, BrokerError> {
        let amqp_q = self.broker.amqp_name(queue)?;
        let link = self.broker.link().await?;
        let expires = self.broker.expires();
        let router = router_name(&amqp_q);
        let mut names: Vec<(String, QueueKind)> = tiers()
            .map(|ms| (tier_name(&amqp_q, ms), QueueKind::Tier { ttl_ms: ms }))
            .collect();
        names.push((router, QueueKind::Router));
        let counts = join_all(
            names
                .iter()
                .map(|(n, kind)| link.declare(n, *kind, expires)),
        )
        .await;
        let mut total = 0u64;
        for c in counts {
            total = total.saturating_add(c?);
        }
        Ok(total)
    }
}

impl RabbitDelayStore {
    /// Publishes the promoted messages: due ones to their queue, early ones to a tier.
    async fn route(
        &self,
        link: &Link,
        now: SystemTime,
        taken: Vec<(u64, String, amqp::Decoded)>,
    ) -> Result<(), BrokerError> {
        let b = &self.broker;
        let expires = b.expires();
        let now_ms = to_millis(now);
        let mut batches: HashMap<String, Vec<_>> = HashMap::new();
        for (_, router_queue, d) in taken {
            // The target header names the queue; fall back to the router's own queue.
            let target = d
                .target
                .filter(|t| b.amqp_name(t).is_ok())
                .unwrap_or(router_queue);
            let target_amqp = b.amqp_name(&target)?;
            let env = d.envelope;
            match env.not_before.map(to_millis) {
                Some(due) if due > now_ms => {
                    self.ensure_tiers(link, &target_amqp).await?;
                    let left = Duration::from_millis(due - now_ms);
                    batches
                        .entry(tier_name(&target_amqp, tier_for(left)))
                        .or_default()
                        .push(amqp::properties(&env, &[(amqp::TARGET, &target)])?);
                }
                _ => {
                    link.ensure(&target_amqp, QueueKind::Work, expires).await?;
                    batches
                        .entry(target_amqp)
                        .or_default()
                        .push(amqp::properties(&env, &[])?);
                }
            }
        }
        for (dest, batch) in batches {
            link.publish_confirmed(&dest, batch).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiers_double_from_50ms_to_about_a_day() {
        let all: Vec<u64> = tiers().collect();
        assert_eq!(all.len(), 22);
        assert_eq!(all[0], 50);
        assert_eq!(all[21], 104_857_600);
        assert!(all.windows(2).all(|w| w[1] == 2 * w[0]));
    }

    #[test]
    fn a_message_goes_to_the_longest_tier_not_longer_than_its_delay() {
        assert_eq!(tier_for(Duration::from_millis(1)), 50);
        assert_eq!(tier_for(Duration::from_millis(50)), 50);
        assert_eq!(tier_for(Duration::from_millis(99)), 50);
        assert_eq!(tier_for(Duration::from_millis(1500)), 800);
        assert_eq!(tier_for(Duration::from_secs(7 * 86_400)), 104_857_600);
    }

    #[test]
    fn tier_names_lead_back_to_their_router() {
        let t = tier_name("app.emails", 800);
        assert_eq!(t, "app.emails.delay.800");
        assert_eq!(router_of_tier(&t), "app.emails.delay.ready");
    }
}
