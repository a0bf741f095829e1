//! Scenario 4, release and redelivery: a released message comes back promptly, to any consumer,
//! with its delivery count and attempt incremented; one released uncounted comes back as
//! promptly on the same attempt.

use crate::backend::Backend;
use crate::names::unique;
use crate::support::{
    close, collect, collect_across, ensure, expect_empty, handle, members, pass, receipts, s2,
    secs, Checked, Context,
};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use stevedore_core::{Broker, Delivery, Envelope, Sharing};
use tokio::time::Instant;

const N: usize = 3;
/// A released message must be receivable again within this long.
const PROMPT: Duration = Duration::from_secs(1);

/// Publishes 3 messages with `attempt = 2`. Handle A receives them (30 s lease, so only a release
/// can bring them back) and releases all three in one call; handle B must receive them within 1 s
/// with `delivery_count` 2 and `attempt()` 3; B releases, A gets them again within 1 s with 3 and
/// 4; A then releases them uncounted ([`Broker::release_uncounted`]) and B must get them within
/// 1 s still on attempt 4, and acks. Payload and id stay the same throughout; nothing comes back
/// after the ack.
///
/// On a partitioned backend ([`Sharing::Partitioned`]) a released message comes back to its
/// partition's owner, so: A and B both join first; each releases what it holds and must get
/// exactly that back within 1 s (count 2); then both release again and B closes, and A must get
/// all three within 1 s + the declared handoff (count 3), releases them uncounted and gets them
/// back within 1 s still on attempt 4, and acks.
pub(crate) async fn release_redelivery(backend: Arc<dyn Backend>) -> Checked {
    let queue = unique("release");
    let a = handle(&backend, &[&queue]).await?;
    if let Sharing::Partitioned { handoff, .. } = a.capabilities().sharing {
        close(&[&a]).await;
        return partitioned(backend, handoff).await;
    }
    let b = handle(&backend, &[&queue]).await?;
    let sent = sent_messages();
    let by_id: HashMap<String, Envelope> = sent.iter().map(|e| (e.id.clone(), e.clone())).collect();
    a.publish(&queue, sent).await.ctx("publish")?;

    let first = collect(&a, &queue, N, secs(30), secs(10)).await?;
    check(&first, &by_id, 1)?;
    let mut slowest = Duration::ZERO;
    let mut held = first;
    for (round, (from, to)) in [(&a, &b), (&b, &a)].into_iter().enumerate() {
        from.release(&receipts(&held))
            .await
            .ctx(format!("release {N} deliveries"))?;
        let released = Instant::now();
        held = back(to, &queue).await?;
        let took = released.elapsed();
        ensure!(
            took <= PROMPT,
            "released messages came back only after {} (limit {})",
            s2(took),
            s2(PROMPT)
        );
        slowest = slowest.max(took);
        check(&held, &by_id, round as u32 + 2)?;
    }
    // An uncounted release (a shutdown's): back as promptly, on the same attempt.
    let (held, uncounted, kept) = uncounted_round(&a, &b, &queue, held, &by_id).await?;
    b.ack(&receipts(&held))
        .await
        .ctx("ack after two releases and an uncounted one")?;
    expect_empty(&a, &queue, secs(1), "the messages were acked").await?;
    close(&[&a, &b]).await;
    pass(format!(
        "{N} released messages came back to the other handle within {} (limit {}), \
         delivery_count 1→2→3 and attempt() 2→3→4; released uncounted, back within {} on \
         attempt() {}",
        s2(slowest),
        s2(PROMPT),
        s2(uncounted),
        uncounted_note(kept)
    ))
}

fn sent_messages() -> Vec<Envelope> {
    (0..N)
        .map(|i| {
            let mut e = Envelope::new("conformance.release", format!("release me {i}"));
            e.attempt = 2;
            e
        })
        .collect()
}

/// The partitioned variant (see [`release_redelivery`]).
async fn partitioned(backend: Arc<dyn Backend>, handoff: Duration) -> Checked {
    let queue = unique("release");
    let hs = members(&backend, &queue, 2).await?;
    let (a, b) = (&hs[0], &hs[1]);
    // Distinct keys spread the messages over the partitions, so both members may hold some.
    let sent: Vec<Envelope> = sent_messages()
        .into_iter()
        .enumerate()
        .map(|(i, mut e)| {
            e.key = Some(format!("release-{i}"));
            e
        })
        .collect();
    let by_id: HashMap<String, Envelope> = sent.iter().map(|e| (e.id.clone(), e.clone())).collect();
    a.publish(&queue, sent).await.ctx("publish")?;
    let mut held = collect_across(&[a, b], &queue, N, 1, secs(30), secs(10)).await?;
    for h in &held {
        check(h, &by_id, 1)?;
    }
    let split = format!("{}+{}", held[0].len(), held[1].len());
    // Round 1: each owner releases and gets its own back.
    let mut slowest = Duration::ZERO;
    for (h, mine) in [a, b].into_iter().zip(held.iter_mut()) {
        if mine.is_empty() {
            continue;
        }
        h.release(&receipts(mine))
            .await
            .ctx(format!("release {} deliveries", mine.len()))?;
        let released = Instant::now();
        let again = collect(h, &queue, mine.len(), secs(30), secs(5))
            .await
            .map_err(|e| format!("after a release, on the partition's owner: {e}"))?;
        let took = released.elapsed();
        ensure!(
            took <= PROMPT,
            "released messages came back to their partition's owner only after {} (limit {})",
            s2(took),
            s2(PROMPT)
        );
        slowest = slowest.max(took);
        check(&again, &by_id, 2)?;
        let want: Vec<&String> = mine.iter().map(|d| &d.envelope.id).collect();
        ensure!(
            again.iter().all(|d| want.contains(&&d.envelope.id)),
            "a release brought back other messages than the released ones"
        );
        *mine = again;
    }
    // Round 2: both release, B leaves; A gets everything.
    for (h, mine) in [a, b].into_iter().zip(held.iter()) {
        if !mine.is_empty() {
            h.release(&receipts(mine)).await.ctx("release again")?;
        }
    }
    b.close().await.ctx("close B")?;
    let left = Instant::now();
    let limit = PROMPT + handoff;
    let all = collect(a, &queue, N, secs(30), limit + secs(5))
        .await
        .map_err(|e| format!("after B released and left: {e}"))?;
    let took = left.elapsed();
    ensure!(
        took <= limit,
        "B's released messages reached A {} after B left (limit {} = 1 s + the declared handoff)",
        s2(took),
        s2(limit)
    );
    check(&all, &by_id, 3)?;
    // An uncounted release (a shutdown's): back as promptly, on the same attempt.
    let (all, uncounted, kept) = uncounted_round(a, a, &queue, all, &by_id).await?;
    a.ack(&receipts(&all)).await.ctx("ack after two releases")?;
    expect_empty(a, &queue, secs(1), "the messages were acked").await?;
    close(&[a]).await;
    pass(format!(
        "partitioned: {N} released messages (held {split} by two members) came back to their \
         owner within {} (limit {}), then all reached the remaining member {} after the other \
         left (limit {}), delivery_count 1→2→3 and attempt() 2→3→4; released uncounted, back \
         within {} on attempt() {}",
        s2(slowest),
        s2(PROMPT),
        s2(took),
        s2(limit),
        s2(uncounted),
        uncounted_note(kept)
    ))
}

/// `from` releases `held` (on attempt 4) uncounted; `to` must get them back within [`PROMPT`],
/// checked by [`check_uncounted`]. Returns them, how long they took, and whether the backend
/// declares the release uncounted on this queue.
async fn uncounted_round(
    from: &Arc<dyn Broker>,
    to: &Arc<dyn Broker>,
    queue: &str,
    held: Vec<Delivery>,
    by_id: &HashMap<String, Envelope>,
) -> Result<(Vec<Delivery>, Duration, bool), String> {
    from.release_uncounted(held)
        .await
        .ctx("release_uncounted")?;
    let released = Instant::now();
    let back = collect(to, queue, N, secs(30), secs(5))
        .await
        .map_err(|e| format!("after release_uncounted: {e}"))?;
    let took = released.elapsed();
    ensure!(
        took <= PROMPT,
        "messages released uncounted came back only after {} (limit {})",
        s2(took),
        s2(PROMPT)
    );
    let kept = from.queue_capabilities(queue).uncounted_release;
    check_uncounted(&back, by_id, 4, kept)?;
    Ok((back, took, kept))
}

/// Receives the released messages, allowing up to 5 s so a slow return is measured, not hidden.
async fn back(h: &Arc<dyn Broker>, queue: &str) -> Result<Vec<Delivery>, String> {
    collect(h, queue, N, secs(30), secs(5))
        .await
        .map_err(|e| format!("after release: {e}"))
}

fn uncounted_note(kept: bool) -> &'static str {
    if kept {
        "4"
    } else {
        "5 (counted, as the backend declares for this queue)"
    }
}

/// After [`Broker::release_uncounted`] of deliveries on `attempt`: same ids and payloads, still on
/// `attempt` where the backend declares [`Capabilities::uncounted_release`] (the delivery count
/// may restart where it re-published a copy that carries the attempt), else on the next one.
///
/// [`Capabilities::uncounted_release`]: stevedore_core::Capabilities::uncounted_release
fn check_uncounted(
    got: &[Delivery],
    sent: &HashMap<String, Envelope>,
    attempt: u32,
    kept: bool,
) -> Result<(), String> {
    if !kept {
        for d in got {
            ensure!(
                d.attempt() == attempt + 1,
                "message {}: attempt() {} after a release_uncounted the backend declares counted \
                 (expected {})",
                d.envelope.id,
                d.attempt(),
                attempt + 1
            );
        }
        return Ok(());
    }
    for d in got {
        let id = same_message(d, sent, "an uncounted release")?;
        ensure!(
            d.attempt() == attempt,
            "message {id}: attempt() {} after an uncounted release of attempt {attempt} \
             (delivery_count {}): the release was counted",
            d.attempt(),
            d.delivery_count
        );
    }
    Ok(())
}

/// `d` is one of `sent`, payload unchanged across `what`; returns its id.
fn same_message<'a>(
    d: &'a Delivery,
    sent: &HashMap<String, Envelope>,
    what: &str,
) -> Result<&'a str, String> {
    let id = &d.envelope.id;
    let Some(s) = sent.get(id) else {
        return Err(format!("unknown message {id} received"));
    };
    ensure!(
        d.envelope.payload == s.payload,
        "message {id}: payload changed across {what}"
    );
    Ok(id)
}

fn check(got: &[Delivery], sent: &HashMap<String, Envelope>, count: u32) -> Result<(), String> {
    for d in got {
        let id = same_message(d, sent, "redelivery")?;
        ensure!(
            d.delivery_count == count && d.attempt() == count + 1,
            "message {id}: delivery_count {} and attempt() {} on delivery {count} (expected {count} \
             and {})",
            d.delivery_count,
            d.attempt(),
            count + 1
        );
    }
    Ok(())
}
