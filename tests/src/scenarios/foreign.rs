//! Scenario 18, foreign messages, broker half: a message written by a plain client of the broker,
//! without our headers, is received with no job name, its body intact and a stable id.
//!
//! The runtime half — the message reaches the queue's default handler — needs the worker runtime.
// LEAD: add the runtime half here (route a foreign message to the queue's default handler).

use crate::backend::Backend;
use crate::names::unique;
use crate::support::{
    close, collect, ensure, expect_empty, handle, pass, receipts, secs, skip, Checked, Context,
};
use std::collections::BTreeMap;
use std::sync::Arc;
use stevedore_core::Delivery;

const BODIES: [&[u8]; 2] = [
    br#"{"event":"signup","user":42}"#,
    "plain text from another system: ünïcödé".as_bytes(),
];

/// Writes two bodies through [`Backend::publish_foreign`], receives them (job `None`, body byte for
/// byte, a non-empty id, two distinct ids, delivery_count 1 and attempt() 1, no `stevedore-*`
/// header), releases them and receives them again with the same ids and delivery_count 2, then
/// acks.
pub(crate) async fn foreign_messages(backend: Arc<dyn Backend>) -> Checked {
    let queue = unique("foreign");
    let h = handle(&backend, &[&queue]).await?;
    for body in BODIES {
        if let Err(reason) = backend.publish_foreign(&queue, body).await {
            close(&[&h]).await;
            return skip(format!(
                "backend cannot write a plain client's message: {reason}"
            ));
        }
    }
    let first = collect(&h, &queue, BODIES.len(), secs(30), secs(15)).await?;
    let ids = check(&first, 1)?;
    h.release(&receipts(&first))
        .await
        .ctx("release the foreign messages")?;
    let again = collect(&h, &queue, BODIES.len(), secs(30), secs(15)).await?;
    let ids_again = check(&again, 2)?;
    ensure!(
        ids == ids_again,
        "foreign message ids changed across redelivery: {ids:?} then {ids_again:?}"
    );
    h.ack(&receipts(&again))
        .await
        .ctx("ack the foreign messages")?;
    expect_empty(&h, &queue, secs(1), "both foreign messages were acked").await?;
    close(&[&h]).await;
    pass(format!(
        "{} plain-client messages received with job None, bodies intact, ids stable across a \
         release ({})",
        BODIES.len(),
        ids.values().cloned().collect::<Vec<_>>().join(", ")
    ))
}

/// Checks one round of deliveries; returns body index → id.
fn check(got: &[Delivery], count: u32) -> Result<BTreeMap<usize, String>, String> {
    let mut ids = BTreeMap::new();
    for d in got {
        let env = &d.envelope;
        let Some(i) = BODIES.iter().position(|b| env.payload.as_ref() == *b) else {
            return Err(format!(
                "foreign message {} arrived with a body of {} bytes matching neither body sent",
                env.id,
                env.payload.len()
            ));
        };
        ensure!(
            env.job.is_none(),
            "foreign message {i} arrived with job {:?}",
            env.job
        );
        ensure!(
            !env.id.is_empty(),
            "foreign message {i} arrived without an id"
        );
        ensure!(
            d.delivery_count == count && d.attempt() == count,
            "foreign message {i}: delivery_count {} and attempt() {} on delivery {count}",
            d.delivery_count,
            d.attempt()
        );
        let ours: Vec<&String> = env
            .headers
            .keys()
            .filter(|k| k.starts_with("stevedore-"))
            .collect();
        ensure!(
            ours.is_empty(),
            "foreign message {i} carries headers {ours:?}"
        );
        ensure!(
            ids.insert(i, env.id.clone()).is_none(),
            "body {i} arrived twice in one round"
        );
    }
    let distinct: std::collections::HashSet<&String> = ids.values().collect();
    ensure!(
        distinct.len() == ids.len(),
        "two foreign messages share the id {ids:?}"
    );
    Ok(ids)
}
