//! Scenario 3, queue isolation: messages on one queue never appear on another, even on queues whose
//! names share a prefix (a priority sibling, a dead-letter queue, a longer name).

use crate::backend::Backend;
use crate::names::unique;
use crate::support::{
    close, collect, ensure, expect_empty, handle, pass, publish_all, receipts, secs, Checked,
    Context,
};
use futures::future::join_all;
use std::collections::HashSet;
use std::sync::Arc;
use stevedore_core::names::{dead_letter, physical};
use stevedore_core::{Delivery, Envelope, Priority};

const N: usize = 50;

/// Publishes 50 messages to `q` and 50 to its priority sibling `q__high`; `q__dlq` and `q2` stay
/// empty. Each published queue yields exactly its own ids (receipts naming it), the empty ones
/// yield nothing, and one ack call with receipts from both queues removes all 100.
pub(crate) async fn queue_isolation(backend: Arc<dyn Backend>) -> Checked {
    let a = unique("iso");
    let b = physical(&a, Priority::High);
    let dlq = dead_letter(&a);
    let longer = crate::names::track(format!("{a}2"));
    let h = handle(&backend, &[&a, &b, &dlq, &longer]).await?;
    let batch = |tag: &str| -> Vec<Envelope> {
        (0..N)
            .map(|i| Envelope::new("conformance.iso", format!("{tag}-{i}")))
            .collect()
    };
    let (to_a, to_b) = (batch("a"), batch("b"));
    let ids = |v: &[Envelope]| -> HashSet<String> { v.iter().map(|e| e.id.clone()).collect() };
    let (ids_a, ids_b) = (ids(&to_a), ids(&to_b));
    publish_all(&h, &a, to_a).await?;
    publish_all(&h, &b, to_b).await?;

    let got_a = collect(&h, &a, N, secs(30), secs(15)).await?;
    check(&got_a, &a, &ids_a, &b, &ids_b)?;
    let got_b = collect(&h, &b, N, secs(30), secs(15)).await?;
    check(&got_b, &b, &ids_b, &a, &ids_a)?;
    let held = "every message published was already held";
    let empties = [&dlq, &longer, &a, &b].map(|q| expect_empty(&h, q, secs(1), held));
    join_all(empties)
        .await
        .into_iter()
        .collect::<Result<(), String>>()?;
    let mut both = receipts(&got_a);
    both.extend(receipts(&got_b));
    h.ack(&both)
        .await
        .ctx("one ack call with receipts from two queues")?;
    let empties = [&a, &b].map(|q| expect_empty(&h, q, secs(1), "every message was acked"));
    join_all(empties)
        .await
        .into_iter()
        .collect::<Result<(), String>>()?;
    close(&[&h]).await;
    pass(format!(
        "{N} + {N} messages on {a} and its sibling __high stayed apart; __dlq and a longer name \
         sharing the prefix stayed empty; a two-queue ack call removed all"
    ))
}

fn check(
    got: &[Delivery],
    queue: &str,
    own: &HashSet<String>,
    other_queue: &str,
    other: &HashSet<String>,
) -> Result<(), String> {
    for d in got {
        let id = &d.envelope.id;
        ensure!(
            !other.contains(id),
            "message {id} published to {other_queue} was delivered from {queue}"
        );
        ensure!(
            own.contains(id),
            "unknown message {id} delivered from {queue}"
        );
        ensure!(
            d.receipt.queue() == queue,
            "receipt of {id} names queue {:?}, received from {queue:?}",
            d.receipt.queue()
        );
    }
    Ok(())
}
