//! Scenario 7, crash recovery: a consumer that vanishes mid-message (no ack, no release) loses
//! nothing.

use crate::backend::Backend;
use crate::ledger::Ledger;
use crate::names::unique;
use crate::support::{
    close, collect, ensure, expect_empty, handle, members, opts, pass, publish_all, receipts, s2,
    secs, Checked, Context,
};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use stevedore_core::{Broker, Delivery, Envelope, LeaseSupport, Sharing};
use tokio::time::Instant;

const N: usize = 30;
const HELD_EACH: usize = 10;
const LEASE: Duration = Duration::from_secs(1);

/// Publishes 30 messages. Handle A receives 10 (1 s lease) and handle C 10 more; then A is dropped
/// without a word and C is closed. A third handle B must then receive all 30 — the 20 held ones
/// with `delivery_count` ≥ 2, the 10 untouched ones with 1 — within L + 5 s + the declared
/// `delay_tolerance`, ack each exactly once, and see nothing more. On a partitioned backend
/// ([`Sharing::Partitioned`]) the messages carry distinct keys, A and C join before either holds
/// anything and hold 20 between them, and the limit is the declared handoff + 5 s.
pub(crate) async fn crash_recovery(backend: Arc<dyn Backend>) -> Checked {
    let queue = unique("crash");
    let b = handle(&backend, &[&queue]).await?;
    let caps = b.capabilities().clone();
    let sent: Vec<Envelope> = (0..N)
        .map(|i| Envelope::new("conformance.crash", format!("crash {i}")))
        .collect();
    let ledger = Ledger::new(sent.iter().map(|e| e.id.clone()));
    let partitioned = matches!(caps.sharing, Sharing::Partitioned { .. });
    let sent = if partitioned {
        // Spread over the partitions, so both members hold some.
        sent.into_iter()
            .enumerate()
            .map(|(i, mut e)| {
                e.key = Some(format!("crash-{i}"));
                e
            })
            .collect()
    } else {
        sent
    };
    publish_all(&b, &queue, sent).await?;

    // Both handles hold their messages before either vanishes: with session leases a vanished
    // handle's messages come back at once, and the second handle must not simply receive those.
    let mut held = HashSet::new();
    let (a, c, got_a, got_c) = if partitioned {
        // All three join first (a member joining later takes partitions, and what is held on
        // them, from the others). A and C then hold up to 20 between them, from their own
        // partitions; the rest wait on B's.
        let mut hs = members(&backend, &queue, 2).await?;
        let (c, a) = (hs.remove(1), hs.remove(0));
        b.subscribe(std::slice::from_ref(&queue))
            .await
            .ctx("subscribe the surviving handle")?;
        let (got_a, got_c) = hold_available(&a, &c, &queue, 2 * HELD_EACH).await?;
        ensure!(
            !got_a.is_empty() && !got_c.is_empty(),
            "a member held nothing ({} and {}): the keys did not spread over the partitions",
            got_a.len(),
            got_c.len()
        );
        (a, c, got_a, got_c)
    } else {
        let a = handle(&backend, &[&queue]).await?;
        let got_a = collect(&a, &queue, HELD_EACH, LEASE, secs(10)).await?;
        let c = handle(&backend, &[&queue]).await?;
        let got_c = collect(&c, &queue, HELD_EACH, LEASE, secs(10)).await?;
        (a, c, got_a, got_c)
    };
    let held_total = got_a.len() + got_c.len();
    held.extend(got_a.iter().map(|d| d.envelope.id.clone()));
    held.extend(got_c.iter().map(|d| d.envelope.id.clone()));
    drop(got_a);
    drop(a); // a crash: no ack, no release, no close
    c.close().await.ctx("close the second vanishing handle")?;
    drop(got_c);
    let expected = if partitioned {
        held_total
    } else {
        2 * HELD_EACH
    };
    ensure!(
        held.len() == expected,
        "the two handles held {} distinct messages ({expected} received)",
        held.len()
    );
    let crashed = Instant::now();
    let within = match caps.sharing {
        Sharing::Partitioned { handoff, .. } => handoff + secs(5),
        Sharing::Any => LEASE + secs(5) + caps.delay_tolerance,
    };
    let mut recovered_at = Duration::ZERO;
    while !ledger.complete() {
        ensure!(
            crashed.elapsed() < within,
            "{}",
            ledger.shortfall(&s2(within))
        );
        let call = Instant::now();
        let got = b
            .receive(&queue, opts(10, Duration::from_millis(500), secs(30)))
            .await
            .ctx("receive on the surviving handle")?;
        ledger.received(call, &got)?;
        for d in &got {
            let was_held = held.contains(&d.envelope.id);
            ensure!(
                (d.delivery_count >= 2) == was_held,
                "message {} ({}) arrived with delivery_count {}",
                d.envelope.id,
                if was_held {
                    "held by a vanished handle"
                } else {
                    "never received before"
                },
                d.delivery_count
            );
            if was_held {
                recovered_at = crashed.elapsed();
            }
        }
        if !got.is_empty() {
            b.ack(&receipts(&got))
                .await
                .ctx("ack on the surviving handle")?;
            for d in &got {
                ledger.acked(&d.envelope.id)?;
            }
        }
    }
    ledger.finish()?;
    expect_empty(&b, &queue, secs(1), "every message was acked").await?;
    close(&[&b]).await;
    let lease = match caps.lease {
        LeaseSupport::Timed { .. } => format!("after their {} lease", s2(LEASE)),
        LeaseSupport::Session { .. } => "when their sessions ended".to_string(),
    };
    pass(format!(
        "{held_total} messages held by a dropped and a closed handle came back {lease} (last at \
         {}, limit {}), {} others untouched; all {N} acked once by a third handle",
        s2(recovered_at),
        s2(within),
        N - held_total
    ))
}

/// Partitioned: A and C receive in turn, without acking, until they hold `cap` messages between
/// them or neither has received anything for 2 s (the rest lie on the third member's
/// partitions).
async fn hold_available(
    a: &Arc<dyn Broker>,
    c: &Arc<dyn Broker>,
    queue: &str,
    cap: usize,
) -> Result<(Vec<Delivery>, Vec<Delivery>), String> {
    let mut held: [Vec<Delivery>; 2] = [Vec::new(), Vec::new()];
    let mut quiet_since = Instant::now();
    let deadline = Instant::now() + secs(15);
    loop {
        let total = held[0].len() + held[1].len();
        if total >= cap || quiet_since.elapsed() >= secs(2) {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the two members were still receiving after 15s ({total} held)"
        );
        for i in 0..2 {
            let room = cap.saturating_sub(held[0].len() + held[1].len());
            if room == 0 {
                break;
            }
            let got = [a, c][i]
                .receive(queue, opts(room.min(2), Duration::from_millis(200), LEASE))
                .await
                .ctx("receive on a member that will vanish")?;
            if !got.is_empty() {
                quiet_since = Instant::now();
            }
            held[i].extend(got);
        }
    }
    let [got_a, got_c] = held;
    Ok((got_a, got_c))
}
