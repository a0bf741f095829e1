//! Scenario 1, publish/receive: 1,000 messages keep payload bytes, headers, job name, id, priority,
//! key, content type, attempt, enqueue time and trace parent exactly.

use crate::backend::Backend;
use crate::ledger::Ledger;
use crate::names::unique;
use crate::support::{
    ensure, expect_empty, handle, opts, pass, publish_all, receipts, s2, secs, Checked, Context,
};
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use stevedore_core::{to_millis, Delivery, Envelope, Priority};
use tokio::time::Instant;

const N: usize = 1000;

/// Publishes 1,000 varied messages (JSON, UTF-8 text, binary with every byte value, up to 4 KiB;
/// every priority; keys, content types, attempts and trace parents on some), receives them on a
/// second handle with a 60 s lease and batch acks, and compares every field. Headers the broker
/// adds on its own are tolerated but named in the detail.
pub(crate) async fn publish_receive(backend: Arc<dyn Backend>) -> Checked {
    let queue = unique("publish");
    let producer = handle(&backend, &[&queue]).await?;
    let consumer = handle(&backend, &[&queue]).await?;
    let sent: Vec<Envelope> = (0..N).map(message).collect();
    let by_id: HashMap<String, Envelope> = sent.iter().map(|e| (e.id.clone(), e.clone())).collect();
    ensure!(by_id.len() == N, "Envelope::new produced duplicate ids");
    let ledger = Ledger::new(by_id.keys().cloned());
    publish_all(&producer, &queue, sent).await?;

    let started = Instant::now();
    let within = secs(30);
    let max = consumer.capabilities().max_batch.clamp(1, 100);
    let mut extra_headers = BTreeSet::new();
    while !ledger.complete() {
        ensure!(
            started.elapsed() < within,
            "{}",
            ledger.shortfall(&s2(within))
        );
        let call = Instant::now();
        let got = consumer
            .receive(&queue, opts(max, secs(1), secs(60)))
            .await
            .ctx("receive")?;
        ledger.received(call, &got)?;
        for d in &got {
            let Some(sent) = by_id.get(&d.envelope.id) else {
                continue; // the ledger has refused unknown ids already
            };
            compare(sent, d, &queue, &mut extra_headers)?;
        }
        if got.is_empty() {
            continue;
        }
        consumer.ack(&receipts(&got)).await.ctx(format!(
            "ack a batch of {} held under a 60s lease",
            got.len()
        ))?;
        for d in &got {
            ledger.acked(&d.envelope.id)?;
        }
    }
    ledger.finish()?;
    let took = started.elapsed();
    expect_empty(&consumer, &queue, secs(1), "all 1000 messages were acked").await?;
    crate::support::close(&[&producer, &consumer]).await;
    let extras = if extra_headers.is_empty() {
        String::new()
    } else {
        let names: Vec<String> = extra_headers.into_iter().collect();
        format!("; broker added headers {}", names.join(", "))
    };
    pass(format!(
        "{N} messages (JSON, UTF-8, binary 0x00-0xFF, 1 B-4 KiB) received in {} with payload, \
         headers, job, id, priority, key, content type, attempt, enqueue time exact{extras}",
        s2(took)
    ))
}

/// Message `i`: four payload kinds, every priority, and optional fields set on some.
fn message(i: usize) -> Envelope {
    let (payload, content_type): (Vec<u8>, Option<&str>) = match i % 4 {
        0 => (
            format!(r#"{{"n":{i},"to":"user{i}@example.com"}}"#).into_bytes(),
            Some("application/json"),
        ),
        1 => (
            format!("ünïcödé ✓ 日本 {i}").into_bytes(),
            Some("text/plain; charset=utf-8"),
        ),
        2 => (
            (0..=255u8)
                .cycle()
                .skip(i % 256)
                .take(256 + i % 7)
                .collect(),
            Some("application/octet-stream"),
        ),
        _ => (vec![b'a' + (i % 26) as u8; 1 + (i * 37) % 4096], None),
    };
    let mut env = Envelope::new(format!("conformance.job_{}", i % 5), payload)
        .with_priority(Priority::ALL[i % 3])
        .with_header("x-seq", i.to_string())
        .with_header("x-tenant", format!("tenant-{}", i % 7));
    env.content_type = content_type.map(str::to_string);
    env.attempt = 1 + (i % 3) as u32;
    if i.is_multiple_of(2) {
        env.key = Some(format!("key-{i}"));
    }
    if i % 4 == 1 {
        env = env.with_header("x-note", "café ☕");
    }
    if i.is_multiple_of(5) {
        env.trace_parent = Some(format!("00-{:032x}-{:016x}-01", i + 1, i + 1));
    }
    env
}

/// Checks one delivery against what was sent.
fn compare(
    sent: &Envelope,
    d: &Delivery,
    queue: &str,
    extra_headers: &mut BTreeSet<String>,
) -> Result<(), String> {
    let got = &d.envelope;
    let i = sent.headers.get("x-seq").map(String::as_str).unwrap_or("?");
    let what = format!("message {i} ({})", sent.id);
    if got.payload != sent.payload {
        let at = got
            .payload
            .iter()
            .zip(sent.payload.iter())
            .position(|(a, b)| a != b)
            .unwrap_or(got.payload.len().min(sent.payload.len()));
        return Err(format!(
            "{what}: payload differs: sent {} bytes, got {} bytes, first difference at byte {at}",
            sent.payload.len(),
            got.payload.len()
        ));
    }
    ensure!(
        got.job == sent.job,
        "{what}: job {:?}, sent {:?}",
        got.job,
        sent.job
    );
    for (k, v) in &sent.headers {
        ensure!(
            got.headers.get(k) == Some(v),
            "{what}: header {k:?} is {:?}, sent {v:?}",
            got.headers.get(k)
        );
    }
    extra_headers.extend(
        got.headers
            .keys()
            .filter(|k| !sent.headers.contains_key(*k))
            .cloned(),
    );
    ensure!(
        got.priority == sent.priority,
        "{what}: priority {}, sent {}",
        got.priority,
        sent.priority
    );
    ensure!(
        got.key == sent.key,
        "{what}: key {:?}, sent {:?}",
        got.key,
        sent.key
    );
    ensure!(
        got.content_type == sent.content_type,
        "{what}: content type {:?}, sent {:?}",
        got.content_type,
        sent.content_type
    );
    ensure!(
        got.trace_parent == sent.trace_parent,
        "{what}: trace parent {:?}, sent {:?}",
        got.trace_parent,
        sent.trace_parent
    );
    ensure!(
        got.attempt == sent.attempt,
        "{what}: attempt {}, sent {}",
        got.attempt,
        sent.attempt
    );
    ensure!(
        to_millis(got.enqueued_at) == to_millis(sent.enqueued_at),
        "{what}: enqueued_at {} ms, sent {} ms",
        to_millis(got.enqueued_at),
        to_millis(sent.enqueued_at)
    );
    ensure!(
        got.not_before.is_none(),
        "{what}: not_before {:?} appeared on a message sent without one",
        got.not_before
    );
    ensure!(
        d.delivery_count == 1 && d.attempt() == sent.attempt,
        "{what}: first delivery has delivery_count {} and attempt() {} (expected 1 and {})",
        d.delivery_count,
        d.attempt(),
        sent.attempt
    );
    ensure!(
        d.receipt.queue() == queue,
        "{what}: receipt names queue {:?}, received from {queue:?}",
        d.receipt.queue()
    );
    Ok(())
}
