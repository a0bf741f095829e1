//! Scenarios 5 (lease expiry) and 6 (lease extension).
//!
//! Bounds, with L = 1 s and the backend's declared `delay_tolerance` T: an unacked delivery must
//! not be received again before L − 100 ms after the receive call that leased it *started* (the
//! lease cannot start earlier; 100 ms absorbs broker timer granularity), and must be back within
//! L + 2 s + T after that call *returned* (T is the backend's word for how late a due message
//! may surface to idle consumers; 2 s covers a polling reclaimer such as Redis `XAUTOCLAIM`).

use crate::backend::Backend;
use crate::names::unique;
use crate::support::{
    close, collect_across, ensure, expect_empty, handle, members, millis, opts, pass, receipts, s2,
    secs, skip, Checked, Context,
};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use stevedore_core::{Broker, BrokerError, Delivery, Envelope, LeaseSupport, Sharing};
use tokio::time::Instant;

const LEASE: Duration = Duration::from_secs(1);
const EARLY_MARGIN: Duration = Duration::from_millis(100);
const GRACE: Duration = Duration::from_secs(2);

/// A delivery and the start and end of the receive call that leased it.
struct Leased {
    delivery: Delivery,
    call_started: Instant,
    call_returned: Instant,
}

/// Receives `n` messages on `h` with lease [`LEASE`], noting when each receive call ran.
async fn lease_n(h: &Arc<dyn Broker>, queue: &str, n: usize) -> Result<Vec<Leased>, String> {
    let deadline = Instant::now() + secs(10);
    let mut out: Vec<Leased> = Vec::new();
    while out.len() < n {
        ensure!(
            Instant::now() < deadline,
            "received {} of {n} messages within 10s",
            out.len()
        );
        let call_started = Instant::now();
        let got = h
            .receive(queue, opts(n - out.len(), millis(500), LEASE))
            .await
            .ctx("receive")?;
        let call_returned = Instant::now();
        out.extend(got.into_iter().map(|delivery| Leased {
            delivery,
            call_started,
            call_returned,
        }));
    }
    Ok(out)
}

async fn publish_n(h: &Arc<dyn Broker>, queue: &str, n: usize) -> Result<(), String> {
    let msgs = (0..n)
        .map(|i| Envelope::new("conformance.lease", format!("lease {i}")))
        .collect();
    h.publish(queue, msgs).await.ctx("publish")
}

/// Scenario 5: handle A receives 3 messages with a 1 s lease and does nothing. Handle B polls every
/// 100 ms: each message must come back within the bounds above with `delivery_count` 2. Then A's
/// stale receipt must fail `extend_lease` with `LeaseLost`, B's ack must succeed, A's ack of the
/// stale receipt must fail with `LeaseLost`, and nothing comes back afterwards.
pub(crate) async fn lease_expiry(backend: Arc<dyn Backend>) -> Checked {
    let queue = unique("expiry");
    let a = handle(&backend, &[&queue]).await?;
    let caps = a.capabilities().clone();
    if let LeaseSupport::Session { .. } = caps.lease {
        return skip(
            "backend declares session leases (LeaseSupport::Session): a lease never times out while \
             the consumer lives; scenario 7 covers the session ending",
        );
    }
    let b = handle(&backend, &[&queue]).await?;
    publish_n(&a, &queue, 3).await?;
    let held = lease_n(&a, &queue, 3).await?;
    let by_id: HashMap<&str, &Leased> = held
        .iter()
        .map(|l| (l.delivery.envelope.id.as_str(), l))
        .collect();
    let latest = held
        .iter()
        .map(|l| l.call_returned)
        .max()
        .unwrap_or_else(Instant::now);
    let upper = LEASE + GRACE + caps.delay_tolerance;
    let mut back = Vec::new();
    let (mut soonest, mut latest_back) = (Duration::MAX, Duration::ZERO);
    while back.len() < held.len() {
        ensure!(
            Instant::now() < latest + upper,
            "{} of 3 unacked messages came back within {} of their lease start (L = {})",
            back.len(),
            s2(upper),
            s2(LEASE)
        );
        let got = b
            .receive(&queue, opts(3, millis(100), secs(30)))
            .await
            .ctx("receive on the second handle")?;
        let now = Instant::now();
        for d in got {
            let Some(l) = by_id.get(d.envelope.id.as_str()) else {
                return Err(format!("unknown message {} received", d.envelope.id));
            };
            let after = now - l.call_started;
            ensure!(
                after + EARLY_MARGIN >= LEASE,
                "message {} came back {} after its lease began, before the {} lease ended",
                d.envelope.id,
                s2(after),
                s2(LEASE)
            );
            ensure!(
                now <= l.call_returned + upper,
                "message {} came back {} after its receive returned (limit {})",
                d.envelope.id,
                s2(now - l.call_returned),
                s2(upper)
            );
            ensure!(
                d.delivery_count == 2,
                "message {} came back with delivery_count {} (expected 2)",
                d.envelope.id,
                d.delivery_count
            );
            soonest = soonest.min(after);
            latest_back = latest_back.max(after);
            back.push(d);
        }
    }
    let stale = &held[0].delivery.receipt;
    match a.extend_lease(stale, secs(30)).await {
        Err(BrokerError::LeaseLost { .. }) => {}
        other => {
            return Err(format!(
                "extend_lease on an expired lease returned {other:?}, expected LeaseLost"
            ))
        }
    }
    b.ack(&receipts(&back)).await.ctx("ack by the new holder")?;
    match a.ack(std::slice::from_ref(stale)).await {
        Err(BrokerError::LeaseLost { .. }) => {}
        other => {
            return Err(format!(
                "ack of an expired lease returned {other:?}, expected LeaseLost"
            ))
        }
    }
    expect_empty(&b, &queue, LEASE + millis(500), "the messages were acked").await?;
    close(&[&a, &b]).await;
    pass(format!(
        "3 unacked deliveries (lease {}) came back after {}-{} (bounds ≥ {}, ≤ {}) with \
         delivery_count 2; stale extend and ack → LeaseLost",
        s2(LEASE),
        s2(soonest),
        s2(latest_back),
        s2(LEASE - EARLY_MARGIN),
        s2(upper)
    ))
}

/// Scenario 6 on a partitioned backend ([`Sharing::Partitioned`]): handles A and B both join
/// first (a member joining later would take partitions, and what is held on them, from the
/// other); three messages are held between them, each extended by its holder every L/3 for 3 L
/// while both keep polling: neither may receive anything, and every ack afterwards succeeds.
async fn extension_partitioned(backend: Arc<dyn Backend>) -> Checked {
    let queue = unique("extend");
    let hs = members(&backend, &queue, 2).await?;
    let (a, b) = (&hs[0], &hs[1]);
    // Distinct keys spread the messages over the partitions, so both members may hold some.
    let msgs = (0..3)
        .map(|i| {
            let mut e = Envelope::new("conformance.lease", format!("lease {i}"));
            e.key = Some(format!("lease-{i}"));
            e
        })
        .collect();
    a.publish(&queue, msgs).await.ctx("publish")?;
    let held = collect_across(&[a, b], &queue, 3, 1, LEASE, secs(10)).await?;
    let hold_for = LEASE * 3;
    let until = Instant::now() + hold_for;
    let heartbeat = async {
        let mut beats = 0;
        while Instant::now() < until {
            tokio::time::sleep(LEASE / 3).await;
            for (h, mine) in [a, b].into_iter().zip(&held) {
                for d in mine {
                    h.extend_lease(&d.receipt, LEASE)
                        .await
                        .ctx(format!("extend_lease of {} (beat {beats})", d.envelope.id))?;
                }
            }
            beats += 1;
        }
        Ok::<_, String>(beats)
    };
    let watch = |h: &Arc<dyn Broker>| {
        let h = h.clone();
        let queue = queue.clone();
        async move {
            while Instant::now() < until {
                let got = h
                    .receive(&queue, opts(3, millis(100), secs(30)))
                    .await
                    .ctx("receive while the messages are held")?;
                if let Some(d) = got.first() {
                    return Err(format!(
                        "message {} was redelivered (delivery_count {}) while its lease was \
                         being extended every {}",
                        d.envelope.id,
                        d.delivery_count,
                        s2(LEASE / 3)
                    ));
                }
            }
            Ok::<_, String>(())
        }
    };
    let (beats, wa, wb) = tokio::join!(heartbeat, watch(a), watch(b));
    let beats = beats?;
    wa?;
    wb?;
    for (h, mine) in [a, b].into_iter().zip(&held) {
        h.ack(&receipts(mine)).await.ctx(format!(
            "ack after holding {} with extensions",
            s2(hold_for)
        ))?;
    }
    let (ea, eb) = tokio::join!(
        expect_empty(a, &queue, LEASE + secs(1), "every message was acked"),
        expect_empty(b, &queue, LEASE + secs(1), "every message was acked")
    );
    ea?;
    eb?;
    close(&[a, b]).await;
    pass(format!(
        "partitioned: 3 messages held {}+{} by two members for {} with {beats} extensions \
         every {} were never redelivered to either and acked fine (session lease: extension is \
         a no-op)",
        held[0].len(),
        held[1].len(),
        s2(hold_for),
        s2(LEASE / 3)
    ))
}

/// Scenario 6: handle A receives 3 messages with a 1 s lease and extends two of them every L/3 for
/// 3 L while handle B polls: B must never see those two, and A's ack after 3 L must succeed;
/// nothing comes back afterwards. For timed leases the third message is not extended and must come
/// back to B (proof that B would have seen an expired lease). For session leases extending is a
/// no-op that must succeed, and no message may come back for 3 L.
pub(crate) async fn lease_extension(backend: Arc<dyn Backend>) -> Checked {
    let queue = unique("extend");
    let a = handle(&backend, &[&queue]).await?;
    let caps = a.capabilities().clone();
    let timed = match caps.lease {
        LeaseSupport::Timed { max: Some(m) } if m < LEASE * 4 => {
            return skip(format!(
            "backend caps a timed lease at {} in total (LeaseSupport::Timed max), less than the \
                 {} this scenario holds",
            s2(m),
            s2(LEASE * 4)
        ))
        }
        LeaseSupport::Timed { .. } => true,
        LeaseSupport::Session { .. } => false,
    };
    if let Sharing::Partitioned { .. } = caps.sharing {
        close(&[&a]).await;
        return extension_partitioned(backend).await;
    }
    let b = handle(&backend, &[&queue]).await?;
    publish_n(&a, &queue, 3).await?;
    let mut held: Vec<Delivery> = lease_n(&a, &queue, 3)
        .await?
        .into_iter()
        .map(|l| l.delivery)
        .collect();
    let control = if timed { held.pop() } else { None };
    let hold_for = LEASE * 3;
    let until = Instant::now() + hold_for;

    let heartbeat = async {
        let mut beats = 0;
        while Instant::now() < until {
            tokio::time::sleep(LEASE / 3).await;
            for d in &held {
                a.extend_lease(&d.receipt, LEASE)
                    .await
                    .ctx(format!("extend_lease of {} (beat {beats})", d.envelope.id))?;
            }
            beats += 1;
        }
        Ok::<_, String>(beats)
    };
    let watch = async {
        let mut control_back = None;
        while Instant::now() < until {
            let got = b
                .receive(&queue, opts(3, millis(100), secs(30)))
                .await
                .ctx("receive on the second handle")?;
            for d in got {
                let is_control = control
                    .as_ref()
                    .is_some_and(|c| c.envelope.id == d.envelope.id);
                ensure!(
                    is_control,
                    "message {} was redelivered (delivery_count {}) while its lease was being \
                     extended every {}",
                    d.envelope.id,
                    d.delivery_count,
                    s2(LEASE / 3)
                );
                b.ack(std::slice::from_ref(&d.receipt))
                    .await
                    .ctx("ack the control message")?;
                control_back = Some(Instant::now());
            }
        }
        Ok::<_, String>(control_back)
    };
    let started = Instant::now();
    let (beats, control_back) = tokio::join!(heartbeat, watch);
    let (beats, control_back) = (beats?, control_back?);
    a.ack(&receipts(&held)).await.ctx(format!(
        "ack after holding {} with extensions",
        s2(hold_for)
    ))?;
    if timed {
        ensure!(
            control_back.is_some(),
            "the message whose lease was not extended did not come back within {} (lease {})",
            s2(hold_for),
            s2(LEASE)
        );
    }
    expect_empty(&b, &queue, LEASE + secs(1), "every message was acked").await?;
    close(&[&a, &b]).await;
    let kind = match control_back {
        Some(t) => format!(
            "timed lease: the unextended control came back after {}",
            s2(t - started)
        ),
        None => "session lease: extension is a no-op".to_string(),
    };
    pass(format!(
        "{} messages held {} with {beats} extensions every {} were never redelivered and acked \
         fine; {kind}",
        held.len(),
        s2(hold_for),
        s2(LEASE / 3)
    ))
}
