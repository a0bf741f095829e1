//! Scenario 17, ordering: where a backend declares per-key ordering, 1,000 messages per key arrive
//! in publish order, and never two of one key are in flight at once.

use crate::backend::Backend;
use crate::names::unique;
use crate::support::{
    close, ensure, handle, millis, opts, pass, publish_all, s2, secs, skip, Checked, Context,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use stevedore_core::{Broker, Envelope, OrderingSupport};
use tokio::task::JoinSet;
use tokio::time::Instant;

const KEYS: usize = 3;
const PER_KEY: u32 = 1000;
const CONSUMERS: usize = 4;

#[derive(Default)]
struct State {
    /// Next expected sequence number per key.
    next: HashMap<String, u32>,
    /// Key → sequence number currently held by some consumer.
    holding: HashMap<String, u32>,
    done: usize,
}

/// Publishes 3 keys × 1,000 messages interleaved, in batches, with the sequence number in the
/// payload. Four consumers on their own handles receive (10 at a time, 30 s lease), record each
/// message under a shared lock before acking it, and check that each key's messages arrive as
/// 0, 1, 2, … with no gap or repeat, and that no message is handed out while an earlier one of its
/// key is still unacked.
pub(crate) async fn ordering(backend: Arc<dyn Backend>) -> Checked {
    let queue = unique("order");
    let producer = handle(&backend, &[&queue]).await?;
    if producer.capabilities().ordering == OrderingSupport::None {
        close(&[&producer]).await;
        return skip("backend declares no per-key ordering");
    }
    let keys: Vec<String> = (0..KEYS).map(|k| format!("{queue}-k{k}")).collect();
    let mut sent = Vec::new();
    for seq in 0..PER_KEY {
        for key in &keys {
            let mut e = Envelope::new("conformance.order", format!("{key}:{seq}"));
            e.key = Some(key.clone());
            sent.push(e);
        }
    }
    let total = sent.len();
    publish_all(&producer, &queue, sent).await?;

    let state = Arc::new(Mutex::new(State::default()));
    // Generous: this scenario is about order, not speed. SQS FIFO through moto needs one request
    // per message (each ack frees its key for the next), ~30 s of moto's one core on a loaded
    // machine; 60 s was exceeded once with the machine compiling beside it.
    let within = secs(120);
    let deadline = Instant::now() + within;
    let started = Instant::now();
    let mut set = JoinSet::new();
    let mut handles = vec![producer];
    for _ in 0..CONSUMERS {
        let h = handle(&backend, &[&queue]).await?;
        handles.push(h.clone());
        set.spawn(consume(h, queue.clone(), state.clone(), total, deadline));
    }
    while let Some(joined) = set.join_next().await {
        joined.map_err(|e| format!("consumer task failed: {e}"))??;
    }
    let done = lock(&state).done;
    ensure!(
        done == total,
        "{done} of {total} ordered messages arrived within {}",
        s2(within)
    );
    for h in &handles {
        close(&[h]).await;
    }
    pass(format!(
        "{KEYS} keys × {PER_KEY} messages over {CONSUMERS} consumers arrived in publish order per key \
         in {}, never two of one key in flight",
        s2(started.elapsed())
    ))
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

async fn consume(
    h: Arc<dyn Broker>,
    queue: String,
    state: Arc<Mutex<State>>,
    total: usize,
    deadline: Instant,
) -> Result<(), String> {
    let max = h.capabilities().max_batch.clamp(1, 10);
    while lock(&state).done < total && Instant::now() < deadline {
        let got = h
            .receive(&queue, opts(max, millis(500), secs(30)))
            .await
            .ctx("receive")?;
        let mut parsed = Vec::new();
        {
            let mut st = lock(&state);
            for d in &got {
                let body = String::from_utf8_lossy(&d.envelope.payload).into_owned();
                let Some((key, seq)) = body.rsplit_once(':') else {
                    return Err(format!("unexpected payload {body:?}"));
                };
                let seq: u32 = seq
                    .parse()
                    .map_err(|_| format!("unexpected payload {body:?}"))?;
                ensure!(
                    d.envelope.key.as_deref() == Some(key),
                    "message {body} arrived with key {:?}",
                    d.envelope.key
                );
                if let Some(earlier) = st.holding.get(key) {
                    return Err(format!(
                        "key {key}: message {seq} handed out while {earlier} was still in flight"
                    ));
                }
                let next = st.next.entry(key.to_string()).or_default();
                ensure!(
                    seq == *next,
                    "key {key}: message {seq} arrived when {} was next (delivery_count {})",
                    *next,
                    d.delivery_count
                );
                *next += 1;
                st.holding.insert(key.to_string(), seq);
                parsed.push(key.to_string());
            }
        }
        for (d, key) in got.iter().zip(parsed) {
            // Let go of the key before acking: a receive that sees the next one after the ack lands
            // must not be mistaken for one that overtook it.
            {
                let mut st = lock(&state);
                st.holding.remove(&key);
                st.done += 1;
            }
            h.ack(std::slice::from_ref(&d.receipt))
                .await
                .ctx(format!("ack {key}"))?;
        }
    }
    Ok(())
}
