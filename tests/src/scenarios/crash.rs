//! Scenario 7, crash recovery: a consumer that vanishes mid-message (no ack, no release) loses
//! nothing.

use crate::backend::Backend;
use crate::ledger::Ledger;
use crate::names::unique;
use crate::support::{
    close, collect, ensure, expect_empty, handle, opts, pass, publish_all, receipts, s2, secs,
    Checked, Context,
};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use stevedore_core::{Envelope, LeaseSupport};
use tokio::time::Instant;

const N: usize = 30;
const HELD_EACH: usize = 10;
const LEASE: Duration = Duration::from_secs(1);

/// Publishes 30 messages. Handle A receives 10 (1 s lease) and handle C 10 more; then A is dropped
/// without a word and C is closed. A third handle B must then receive all 30 — the 20 held ones
/// with `delivery_count` ≥ 2, the 10 untouched ones with 1 — within L + 5 s + the declared
/// `delay_tolerance`, ack each exactly once, and see nothing more.
pub(crate) async fn crash_recovery(backend: Arc<dyn Backend>) -> Checked {
    let queue = unique("crash");
    let b = handle(&backend, &[&queue]).await?;
    let caps = b.capabilities().clone();
    let sent: Vec<Envelope> = (0..N)
        .map(|i| Envelope::new("conformance.crash", format!("crash {i}")))
        .collect();
    let ledger = Ledger::new(sent.iter().map(|e| e.id.clone()));
    publish_all(&b, &queue, sent).await?;

    // Both handles hold their messages before either vanishes: with session leases a vanished
    // handle's messages come back at once, and the second handle must not simply receive those.
    let mut held = HashSet::new();
    let a = handle(&backend, &[&queue]).await?;
    let got_a = collect(&a, &queue, HELD_EACH, LEASE, secs(10)).await?;
    held.extend(got_a.iter().map(|d| d.envelope.id.clone()));
    let c = handle(&backend, &[&queue]).await?;
    let got_c = collect(&c, &queue, HELD_EACH, LEASE, secs(10)).await?;
    held.extend(got_c.iter().map(|d| d.envelope.id.clone()));
    drop(got_a);
    drop(a); // a crash: no ack, no release, no close
    c.close().await.ctx("close the second vanishing handle")?;
    drop(got_c);
    ensure!(
        held.len() == 2 * HELD_EACH,
        "the two handles held {} distinct messages",
        held.len()
    );
    let crashed = Instant::now();
    let within = LEASE + secs(5) + caps.delay_tolerance;
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
        "20 messages held by a dropped and a closed handle came back {lease} (last at {}, limit \
         {}), 10 others untouched; all {N} acked once by a third handle",
        s2(recovered_at),
        s2(within)
    ))
}
