//! Helpers the scenarios share: results, handles, receiving and checking.

use crate::backend::Backend;
use crate::report::Outcome;
use std::fmt::Display;
use std::sync::Arc;
use std::time::Duration;
use stevedore_core::{Broker, BrokerError, Capabilities, Delivery, Envelope, ReceiveOptions};
use tokio::time::Instant;

/// What a scenario body returns: `Ok(Pass | Skip)`, or `Err(reason)` (also for an explicit
/// failure).
pub(crate) type Checked = Result<Outcome, String>;

/// Fails the scenario with a formatted reason unless `cond` holds.
macro_rules! ensure {
    ($cond:expr, $($arg:tt)+) => {
        if !$cond {
            return Err(format!($($arg)+));
        }
    };
}
pub(crate) use ensure;

/// A pass with this detail.
pub(crate) fn pass(detail: impl Into<String>) -> Checked {
    Ok(Outcome::Pass {
        detail: detail.into(),
    })
}

/// A skip with this reason.
pub(crate) fn skip(reason: impl Into<String>) -> Checked {
    Ok(Outcome::Skip {
        reason: reason.into(),
    })
}

/// Turns a broker error into the scenario's failure reason, saying what was being done.
pub(crate) trait Context<T> {
    /// `Err(e)` becomes `Err("{what}: {e}")`.
    fn ctx(self, what: impl Display) -> Result<T, String>;
}

impl<T> Context<T> for Result<T, BrokerError> {
    fn ctx(self, what: impl Display) -> Result<T, String> {
        self.map_err(|e| format!("{what}: {e}"))
    }
}

/// Shorthand for a duration in seconds or milliseconds.
pub(crate) fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// Shorthand for a duration in milliseconds.
pub(crate) fn millis(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

/// Seconds with two decimals, for details and reasons.
pub(crate) fn s2(d: Duration) -> String {
    format!("{:.2}s", d.as_secs_f64())
}

/// Receive options.
pub(crate) fn opts(max: usize, wait: Duration, lease: Duration) -> ReceiveOptions {
    ReceiveOptions { max, wait, lease }
}

/// A new handle on the backend's broker, with `queues` prepared.
pub(crate) async fn handle(
    backend: &Arc<dyn Backend>,
    queues: &[&str],
) -> Result<Arc<dyn Broker>, String> {
    let broker = backend.connect().await.ctx("connect")?;
    let queues: Vec<String> = queues.iter().map(|q| q.to_string()).collect();
    broker
        .prepare(&queues)
        .await
        .ctx(format!("prepare {queues:?}"))?;
    Ok(broker)
}

/// Closes handles at the end of a scenario. Errors are ignored: the scenario's checks are done.
pub(crate) async fn close(handles: &[&Arc<dyn Broker>]) {
    for h in handles {
        let _ = h.close().await;
    }
}

/// A publish batch size that suits every backend.
pub(crate) fn batch_size(caps: &Capabilities) -> usize {
    caps.max_batch.clamp(1, 100)
}

/// Publishes `messages` in batches of [`batch_size`].
pub(crate) async fn publish_all(
    broker: &Arc<dyn Broker>,
    queue: &str,
    messages: Vec<Envelope>,
) -> Result<(), String> {
    let size = batch_size(broker.capabilities());
    let total = messages.len();
    let mut rest = messages;
    let mut done = 0;
    while !rest.is_empty() {
        let tail = rest.split_off(size.min(rest.len()));
        let n = rest.len();
        broker.publish(queue, rest).await.ctx(format!(
            "publish messages {done}..{} of {total} to {queue}",
            done + n
        ))?;
        done += n;
        rest = tail;
    }
    Ok(())
}

/// Receives from `queue` without acking until `n` distinct messages are held, each leased for
/// `lease`, failing if they do not all arrive `within`, if one arrives twice, or if more arrive.
pub(crate) async fn collect(
    broker: &Arc<dyn Broker>,
    queue: &str,
    n: usize,
    lease: Duration,
    within: Duration,
) -> Result<Vec<Delivery>, String> {
    let deadline = Instant::now() + within;
    let mut out: Vec<Delivery> = Vec::new();
    while out.len() < n {
        let now = Instant::now();
        ensure!(
            now < deadline,
            "received {} of {n} messages from {queue} within {}",
            out.len(),
            s2(within)
        );
        let max = (n - out.len()).min(broker.capabilities().max_batch).max(1);
        let wait = (deadline - now).min(secs(1));
        let got = broker
            .receive(queue, opts(max, wait, lease))
            .await
            .ctx(format!("receive from {queue}"))?;
        for d in got {
            ensure!(
                !out.iter().any(|o| o.envelope.id == d.envelope.id),
                "message {} delivered twice while its {} lease was held",
                d.envelope.id,
                s2(lease)
            );
            out.push(d);
        }
        ensure!(
            out.len() <= n,
            "received {} messages from {queue}, {n} expected",
            out.len()
        );
    }
    Ok(out)
}

/// Handles that are all members of `queue`'s consumers before the scenario goes on: each one
/// [`Broker::subscribe`]s, concurrently (on a partitioned backend a member that joins later takes
/// partitions, and what is held on them, from the others).
pub(crate) async fn members(
    backend: &Arc<dyn Backend>,
    queue: &str,
    n: usize,
) -> Result<Vec<Arc<dyn Broker>>, String> {
    let mut hs = Vec::with_capacity(n);
    for _ in 0..n {
        hs.push(handle(backend, &[queue]).await?);
    }
    let queues = [queue.to_string()];
    let joins = hs.iter().map(|h| h.subscribe(&queues));
    for (i, r) in futures::future::join_all(joins)
        .await
        .into_iter()
        .enumerate()
    {
        r.ctx(format!("subscribe member {i} to {queue}"))?;
    }
    Ok(hs)
}

/// Receives from `queue` on several handles in turn, `step` at a time, without acking, until
/// `n` distinct messages are held among them; what each handle holds, in the order given. Fails
/// as [`collect`] does.
pub(crate) async fn collect_across(
    handles: &[&Arc<dyn Broker>],
    queue: &str,
    n: usize,
    step: usize,
    lease: Duration,
    within: Duration,
) -> Result<Vec<Vec<Delivery>>, String> {
    let deadline = Instant::now() + within;
    let mut out: Vec<Vec<Delivery>> = handles.iter().map(|_| Vec::new()).collect();
    let mut seen = std::collections::HashSet::new();
    while seen.len() < n {
        for (h, held) in handles.iter().zip(out.iter_mut()) {
            let now = Instant::now();
            ensure!(
                now < deadline,
                "received {} of {n} messages from {queue} on {} handles within {}",
                seen.len(),
                handles.len(),
                s2(within)
            );
            let max = (n - seen.len()).min(step).max(1);
            let got = h
                .receive(queue, opts(max, Duration::from_millis(200), lease))
                .await
                .ctx(format!("receive from {queue}"))?;
            for d in got {
                ensure!(
                    seen.insert(d.envelope.id.clone()),
                    "message {} delivered twice while its {} lease was held",
                    d.envelope.id,
                    s2(lease)
                );
                held.push(d);
            }
            ensure!(
                seen.len() <= n,
                "received {} messages from {queue}, {n} expected",
                seen.len()
            );
            if seen.len() == n {
                break;
            }
        }
    }
    Ok(out)
}

/// Checks that nothing at all is received from `queue` for `within`.
pub(crate) async fn expect_empty(
    broker: &Arc<dyn Broker>,
    queue: &str,
    within: Duration,
    why: &str,
) -> Result<(), String> {
    let deadline = Instant::now() + within;
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Ok(());
        }
        let got = broker
            .receive(queue, opts(10, (deadline - now).min(secs(1)), secs(30)))
            .await
            .ctx(format!("receive from {queue}"))?;
        if !got.is_empty() {
            let seen: Vec<String> = got
                .iter()
                .take(5)
                .map(|d| format!("{} (delivery_count {})", d.envelope.id, d.delivery_count))
                .collect();
            return Err(format!(
                "{why}, yet {} message(s) arrived on {queue}: {}",
                got.len(),
                seen.join(", ")
            ));
        }
    }
}

/// The receipts of some deliveries.
pub(crate) fn receipts(ds: &[Delivery]) -> Vec<stevedore_core::Receipt> {
    ds.iter().map(|d| d.receipt.clone()).collect()
}

/// A few ids for a failure message.
pub(crate) fn sample<'a>(ids: impl IntoIterator<Item = &'a String>) -> String {
    let v: Vec<&str> = ids.into_iter().take(5).map(String::as_str).collect();
    v.join(", ")
}
