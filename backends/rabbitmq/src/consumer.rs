//! Consuming one queue: its channel, its consumer, the deliveries buffered for `receive`, and the
//! bookkeeping that makes acks safe (never an unknown tag, `multiple` only when exact).

use futures::{FutureExt, StreamExt};
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::BasicProperties;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// A delivery held by this process, not yet handed to `receive`.
pub(crate) struct Raw {
    /// The consumer (of this channel) it came through.
    pub consumer: u64,
    pub redelivered: bool,
    pub props: BasicProperties,
    pub data: Vec<u8>,
}

/// The consumer currently registered on the channel.
pub(crate) struct Active {
    pub no: u64,
    pub tag: String,
    pub credit: u16,
}

/// One consumer channel of one queue. Replaced (with a new `id`) when it or its connection breaks;
/// receipts of an older `id` are lost leases (the broker has requeued those messages).
pub(crate) struct Chan {
    pub id: u64,
    pub link_gen: u64,
    pub channel: lapin::Channel,
    /// Why the channel died, once it did.
    pub failed: Option<String>,
    /// Whether `failed` has been reported to a caller yet.
    pub reported: bool,
    pub active: Option<Active>,
    pub consumers: u64,
    /// Delivered by the broker, not yet handed out, by delivery tag.
    pub buffer: BTreeMap<u64, Raw>,
    /// Handed out by `receive`, neither acked nor released: tag → consumer number.
    pub outstanding: BTreeMap<u64, u64>,
    /// Per consumer number: delivered and not yet settled (buffered or outstanding).
    pub unsettled: HashMap<u64, usize>,
    pub pumps: Vec<JoinHandle<()>>,
    /// When this handle last settled deliveries or started a consumer here: the broker may still
    /// be pushing the replacements.
    pub last_change: Option<std::time::Instant>,
    /// Batches of credit the active consumer has beyond what this handle holds (see
    /// `HEADROOM_MAX`): 1 for a new consumer, doubled with each upgrade.
    pub headroom: usize,
}

impl Chan {
    pub(crate) fn new(id: u64, link_gen: u64, channel: lapin::Channel) -> Self {
        Chan {
            id,
            link_gen,
            channel,
            failed: None,
            reported: false,
            active: None,
            consumers: 0,
            buffer: BTreeMap::new(),
            outstanding: BTreeMap::new(),
            unsettled: HashMap::new(),
            pumps: Vec::new(),
            last_change: None,
            headroom: 1,
        }
    }

    /// Settles `tag` if it is outstanding; returns whether it was.
    pub(crate) fn settle(&mut self, tag: u64) -> bool {
        match self.outstanding.remove(&tag) {
            Some(consumer) => {
                if let Some(n) = self.unsettled.get_mut(&consumer) {
                    *n = n.saturating_sub(1);
                }
                true
            }
            None => false,
        }
    }

    /// The smallest delivery tag still unsettled on the channel (outstanding or buffered).
    fn lowest_unsettled(&self) -> Option<u64> {
        let a = self.outstanding.keys().next().copied();
        let b = self.buffer.keys().next().copied();
        match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// How to settle `tags` (already removed from the bookkeeping): see [`plan_frames`].
    pub(crate) fn plan(&self, tags: &mut [u64]) -> Vec<(u64, bool)> {
        plan_frames(self.lowest_unsettled(), tags)
    }

    /// Delivered-and-unsettled count of the active consumer.
    pub(crate) fn active_unsettled(&self) -> usize {
        self.active
            .as_ref()
            .and_then(|a| self.unsettled.get(&a.no))
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for Chan {
    fn drop(&mut self) {
        for p in &self.pumps {
            p.abort();
        }
    }
}

/// Counters shared with the pump tasks.
#[derive(Default)]
pub(crate) struct Counters {
    /// Channels the broker closed because a delivery outlived its consumer_timeout.
    pub consumer_timeouts: AtomicU64,
}

/// Everything about consuming one physical queue in this process.
pub(crate) struct QueueState {
    /// AMQP queue name (prefix + queue).
    pub amqp: String,
    /// Most unsettled deliveries a consumer may hold.
    pub prefetch: u16,
    /// Serializes channel and consumer changes (open, consume, upgrade, cancel).
    pub setup: tokio::sync::Mutex<()>,
    /// Serializes ack/nack frames so their order on the wire matches the bookkeeping.
    pub wire: tokio::sync::Mutex<()>,
    slot: Mutex<Option<Chan>>,
    pub notify: Notify,
    pub counters: Arc<Counters>,
    pub consumer_timeout: Duration,
}

impl QueueState {
    pub(crate) fn new(
        amqp: String,
        prefetch: u16,
        counters: Arc<Counters>,
        consumer_timeout: Duration,
    ) -> Self {
        QueueState {
            amqp,
            prefetch: prefetch.max(1),
            setup: tokio::sync::Mutex::new(()),
            wire: tokio::sync::Mutex::new(()),
            slot: Mutex::new(None),
            notify: Notify::new(),
            counters,
            consumer_timeout,
        }
    }

    pub(crate) fn slot(&self) -> MutexGuard<'_, Option<Chan>> {
        self.slot.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drops the channel (its unsettled messages go back to the queue when it closes).
    pub(crate) fn reset(&self) {
        let old = self.slot().take();
        drop(old);
        self.notify.notify_waiters();
    }
}

/// Most deliveries the pump moves into the buffer under one lock.
const PUMP_BATCH: usize = 256;

/// Moves deliveries of one consumer into the queue's buffer until the consumer ends (cancelled by
/// us or by the broker) or its channel dies.
pub(crate) fn spawn_pump(
    qs: &Arc<QueueState>,
    chan_id: u64,
    consumer_no: u64,
    mut consumer: lapin::Consumer,
) -> JoinHandle<()> {
    let weak: Weak<QueueState> = Arc::downgrade(qs);
    tokio::spawn(async move {
        // What the consumer yielded after the deliveries taken in one go, for the next turn.
        let mut stashed = None;
        loop {
            let item = match stashed.take() {
                Some(item) => item,
                None => consumer.next().await,
            };
            let Some(qs) = weak.upgrade() else { return };
            match item {
                Some(Ok(d)) => {
                    {
                        // Every delivery already here goes in under one lock and one wake-up
                        // (up to PUMP_BATCH), not one each. (Polling without a waker is safe:
                        // the next turn polls again with this task's before it sleeps.)
                        let mut slot = qs.slot();
                        let mut next = Some(d);
                        let mut taken = 0;
                        while let Some(d) = next.take() {
                            if let Some(c) = slot.as_mut().filter(|c| c.id == chan_id) {
                                c.buffer.insert(
                                    d.delivery_tag,
                                    Raw {
                                        consumer: consumer_no,
                                        redelivered: d.redelivered,
                                        props: d.properties,
                                        data: d.data,
                                    },
                                );
                                *c.unsettled.entry(consumer_no).or_insert(0) += 1;
                            }
                            taken += 1;
                            if taken < PUMP_BATCH {
                                match consumer.next().now_or_never() {
                                    Some(Some(Ok(d))) => next = Some(d),
                                    Some(end) => stashed = Some(end),
                                    None => {}
                                }
                            }
                        }
                    }
                    qs.notify.notify_waiters();
                }
                Some(Err(e)) => {
                    let why = describe_close(&qs, &e);
                    {
                        let mut slot = qs.slot();
                        if let Some(c) = slot.as_mut().filter(|c| c.id == chan_id) {
                            c.failed.get_or_insert(why);
                            c.buffer.clear();
                        }
                    }
                    qs.notify.notify_waiters();
                    return;
                }
                None => {
                    // Cancelled: by us (active already cleared), or by the broker (queue deleted).
                    {
                        let mut slot = qs.slot();
                        if let Some(c) = slot.as_mut().filter(|c| c.id == chan_id) {
                            if c.active.as_ref().is_some_and(|a| a.no == consumer_no) {
                                tracing::info!(queue = %qs.amqp, "the broker cancelled our consumer (queue deleted?); consuming again on the next receive");
                                c.active = None;
                            }
                        }
                    }
                    qs.notify.notify_waiters();
                    return;
                }
            }
        }
    })
}

/// Why a consumer channel died, for the caller's error; logs an explanation when the broker's
/// consumer_timeout closed it.
fn describe_close(qs: &QueueState, e: &lapin::Error) -> String {
    let text = e.to_string();
    let timed_out = crate::link::amqp_error(e).is_some_and(|a| {
        let m = a.get_message().as_str();
        m.contains("PRECONDITION_FAILED") && m.contains("timed out")
            || m.contains("delivery acknowledgement")
    });
    if timed_out {
        qs.counters
            .consumer_timeouts
            .fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            queue = %qs.amqp,
            declared_consumer_timeout = ?qs.consumer_timeout,
            error = %text,
            "RabbitMQ closed the consumer channel because a delivery was not acknowledged within \
             the server's consumer_timeout; every message held on that channel was requeued and \
             will run again. Jobs that may run longer than consumer_timeout need it raised on the \
             server (rabbitmq.conf: consumer_timeout = <milliseconds>) and the new value declared \
             in the backend config (RabbitConfig::consumer_timeout), so config validation can warn \
             about queue timeouts above it"
        );
        format!(
            "consumer channel of {} closed by the broker's consumer_timeout (a delivery was held \
             longer than the server allows; raise consumer_timeout in rabbitmq.conf for long jobs): \
             {text}",
            qs.amqp
        )
    } else {
        tracing::warn!(queue = %qs.amqp, error = %text, "consumer channel closed; it is re-opened on the next receive");
        format!("consumer channel of {} closed: {text}", qs.amqp)
    }
}

/// Settle frames for `tags` as `(tag, multiple)`: one `multiple` frame for every tag below `lowest`,
/// the lowest tag still unsettled on the channel (a multiple frame settles every unsettled tag up to
/// its own, so it must not reach one that stays held), and single frames for the rest.
pub(crate) fn plan_frames(lowest: Option<u64>, tags: &mut [u64]) -> Vec<(u64, bool)> {
    tags.sort_unstable();
    let low = lowest.unwrap_or(u64::MAX);
    let covered = tags.partition_point(|t| *t < low);
    let mut frames = Vec::with_capacity(tags.len() - covered + 1);
    match covered {
        0 => {}
        1 => frames.push((tags[0], false)),
        n => frames.push((tags[n - 1], true)),
    }
    frames.extend(tags[covered..].iter().map(|t| (*t, false)));
    frames
}

/// What settling does to a delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Settle {
    /// `basic.ack`: gone for good.
    Ack,
    /// `basic.nack` with requeue: ready again, its delivery count incremented by the broker.
    Requeue,
}

/// Sends settle frames in order on `channel`; returns whether all went out.
pub(crate) async fn send_settle(
    channel: &lapin::Channel,
    how: Settle,
    frames: &[(u64, bool)],
) -> bool {
    for (tag, multiple) in frames {
        let sent = match how {
            Settle::Ack => {
                crate::link::call(
                    "basic.ack",
                    channel.basic_ack(
                        *tag,
                        BasicAckOptions {
                            multiple: *multiple,
                        },
                    ),
                )
                .await
            }
            Settle::Requeue => {
                crate::link::call(
                    "basic.nack",
                    channel.basic_nack(
                        *tag,
                        BasicNackOptions {
                            multiple: *multiple,
                            requeue: true,
                        },
                    ),
                )
                .await
            }
        };
        if sent.is_err() {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::plan_frames;

    #[test]
    fn plan_uses_multiple_only_below_the_lowest_unsettled_tag() {
        // Acking 1..=3 while 4 is still held: one multiple frame.
        assert_eq!(plan_frames(Some(4), &mut [3, 1, 2]), vec![(3, true)]);
        // Nothing else held: everything in one frame.
        assert_eq!(plan_frames(None, &mut [7, 5, 6]), vec![(7, true)]);
        // Acking 1 and 3 while 2 is held: two single frames.
        assert_eq!(
            plan_frames(Some(2), &mut [3, 1]),
            vec![(1, false), (3, false)]
        );
        // A lone tag never needs `multiple`.
        assert_eq!(plan_frames(None, &mut [9]), vec![(9, false)]);
        // A held tag below all of them: single frames only.
        assert_eq!(
            plan_frames(Some(1), &mut [4, 2, 3]),
            vec![(2, false), (3, false), (4, false)]
        );
    }
}
