//! Scenario 14, depth: ready, in-flight and delayed counts match what the test put there, within
//! the backend's declared `depth_staleness`.

use crate::backend::Backend;
use crate::names::unique;
use crate::support::{close, collect, ensure, handle, millis, pass, s2, secs, Checked, Context};
use std::sync::Arc;
use std::time::Duration;
use stevedore_core::{Broker, DelaySupport, Depth, Envelope};
use tokio::time::Instant;

const READY: u64 = 10;
const DELAYED: u64 = 4;
const HELD: u64 = 3;
/// Beyond the declared staleness, how long a count may take to show a change.
const GRACE: Duration = Duration::from_millis(500);

/// A fresh queue reads all zero. Then 10 ready and 4 delayed (60 s: natively, or through the
/// backend's delay store) read 10/0/4; receiving 3 reads 7/3/4; acking one reads 7/2/4; releasing
/// one reads 8/1/4. Each count must show within `depth_staleness` + 500 ms, and `oldest_age`, where
/// reported, must not exceed the age of the oldest message.
pub(crate) async fn depth(backend: Arc<dyn Backend>) -> Checked {
    let queue = unique("depth");
    let h = handle(&backend, &[&queue]).await?;
    let caps = h.capabilities().clone();
    let staleness = caps.depth_staleness;
    let mut counted = await_depth(&h, &queue, (0, 0, 0), "a fresh queue", staleness, None).await?;

    let first_publish = Instant::now();
    let ready = (0..READY)
        .map(|i| Envelope::new("conformance.depth", format!("ready {i}")))
        .collect();
    h.publish(&queue, ready)
        .await
        .ctx("publish ready messages")?;
    let delay_len = match caps.delay {
        DelaySupport::Native { max } => Some(max.map_or(secs(60), |m| m.min(secs(60)))),
        DelaySupport::None => None,
    };
    let delayed = |d: Duration| -> Vec<Envelope> {
        (0..DELAYED)
            .map(|i| Envelope::new("conformance.depth", format!("delayed {i}")).delayed(d))
            .collect()
    };
    let (delayed_n, how) = match (delay_len, h.delay_store()) {
        (Some(d), _) => {
            h.publish(&queue, delayed(d))
                .await
                .ctx("publish delayed messages")?;
            (DELAYED, format!("{} natively", s2(d)))
        }
        (None, Some(store)) => {
            store
                .schedule(&queue, delayed(secs(60)))
                .await
                .ctx("schedule delayed messages in the delay store")?;
            (DELAYED, "60s in the delay store".to_string())
        }
        (None, None) => (
            0,
            "no delay: backend has neither native delay nor a delay store".into(),
        ),
    };
    let age = Some(first_publish);
    counted &= await_depth(
        &h,
        &queue,
        (READY, 0, delayed_n),
        "publishing",
        staleness,
        age,
    )
    .await?;

    let held = collect(&h, &queue, HELD as usize, secs(60), secs(10)).await?;
    counted &= await_depth(
        &h,
        &queue,
        (READY - HELD, HELD, delayed_n),
        "receiving 3",
        staleness,
        age,
    )
    .await?;
    h.ack(std::slice::from_ref(&held[0].receipt))
        .await
        .ctx("ack one")?;
    let stage = (READY - HELD, HELD - 1, delayed_n);
    counted &= await_depth(&h, &queue, stage, "acking 1 of them", staleness, age).await?;
    h.release(std::slice::from_ref(&held[1].receipt))
        .await
        .ctx("release one")?;
    let stage = (READY - HELD + 1, HELD - 2, delayed_n);
    counted &= await_depth(&h, &queue, stage, "releasing 1 of them", staleness, age).await?;
    let browsed = browse(&h, &queue, &held, stage, staleness, age).await?;
    close(&[&h]).await;
    if counted {
        pass(format!(
            "ready/in_flight/delayed read 0/0/0 → 10/0/4 → 7/3/4 → 7/2/4 → 8/1/4 (delayed {how}) \
             within the declared staleness of {}; {browsed}",
            s2(staleness)
        ))
    } else {
        pass(format!(
            "ready/in_flight read 0/0 → 10/0 → 7/3 → 7/2 → 8/1 within the declared staleness of \
             {}; delayed ({how}) not counted per queue: the backend reports None (shared delay \
             queues); {browsed}",
            s2(staleness)
        ))
    }
}

/// `browse` of the queue at 8 ready / 1 in flight / 4 delayed: exactly the 9 undelayed messages
/// not acked (the ready ones first, then the held one), and afterwards the same counts and
/// delivery counts as if nobody had looked (the released message is on its second delivery,
/// the others on their first). A backend that cannot browse says so with `Unsupported`.
async fn browse(
    h: &Arc<dyn Broker>,
    queue: &str,
    held: &[stevedore_core::Delivery],
    stage: (u64, u64, u64),
    staleness: Duration,
    age: Option<Instant>,
) -> Result<String, String> {
    let seen = match h.browse(queue, 100).await {
        Ok(seen) => seen,
        Err(stevedore_core::BrokerError::Unsupported { what, .. }) => {
            return Ok(format!(
                "browse unsupported ({what}): DLQ tools receive and release"
            ))
        }
        Err(e) => return Err(format!("browse: {e}")),
    };
    let held_id = &held[2].envelope.id;
    let acked_id = &held[0].envelope.id;
    ensure!(
        seen.len() as u64 == stage.0 + stage.1,
        "browse returned {} messages, expected {} ready + {} in flight",
        seen.len(),
        stage.0,
        stage.1
    );
    ensure!(
        seen.last().map(|e| &e.id) == Some(held_id),
        "browse: the message leased to a consumer should come after the ready ones"
    );
    ensure!(
        seen.iter()
            .all(|e| &e.id != acked_id && !e.payload.starts_with(b"delayed")),
        "browse returned an acked or a delayed message"
    );
    await_depth(h, queue, stage, "browsing", staleness, age).await?;
    let ready = collect(h, queue, stage.0 as usize, secs(60), secs(10)).await?;
    let released = &held[1].envelope.id;
    for d in &ready {
        let want = if &d.envelope.id == released { 2 } else { 1 };
        ensure!(
            d.delivery_count == want,
            "after browse, {} came with delivery_count {} (expected {want}): browsing counted a \
             delivery",
            d.envelope.id,
            d.delivery_count
        );
    }
    let receipts: Vec<_> = ready.iter().map(|d| d.receipt.clone()).collect();
    h.ack(&receipts).await.ctx("ack after browse")?;
    Ok(format!(
        "browse read the {} undelayed messages without taking them (counts and delivery counts \
         unchanged)",
        seen.len()
    ))
}

/// Polls `depth` until it reads `(ready, in_flight, delayed)`, for up to `staleness` + [`GRACE`].
/// Returns whether the backend counted delayed messages (`Some`) rather than declaring it cannot.
async fn await_depth(
    h: &Arc<dyn Broker>,
    queue: &str,
    want: (u64, u64, u64),
    after: &str,
    staleness: Duration,
    oldest: Option<Instant>,
) -> Result<bool, String> {
    let deadline = Instant::now() + staleness + GRACE;
    loop {
        let d: Depth = h.depth(queue).await.ctx(format!("depth after {after}"))?;
        if let (Some(age), Some(since)) = (d.oldest_age, oldest) {
            let bound = since.elapsed() + staleness + secs(1);
            ensure!(
                age <= bound,
                "after {after}: oldest_age {} exceeds the age of the oldest message ({} + staleness)",
                s2(age),
                s2(since.elapsed())
            );
        }
        // `None`: the backend does not count delayed messages per queue (and says so).
        if (d.ready, d.in_flight) == (want.0, want.1) && d.delayed.is_none_or(|n| n == want.2) {
            return Ok(d.delayed.is_some());
        }
        ensure!(
            Instant::now() < deadline,
            "after {after}: depth reads ready={} in_flight={} delayed={:?}, expected {}/{}/{} \
             (declared staleness {})",
            d.ready,
            d.in_flight,
            d.delayed,
            want.0,
            want.1,
            want.2,
            s2(staleness)
        );
        tokio::time::sleep(millis(100)).await;
    }
}
