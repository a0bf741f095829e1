//! Scenario 15, limits: a payload over the backend's declared `max_payload` fails at publish with
//! `PayloadTooLarge`, and nothing of that call is enqueued; a payload of exactly `max_payload` goes
//! through intact.

use crate::backend::Backend;
use crate::names::unique;
use crate::support::{
    close, collect, ensure, expect_empty, handle, pass, receipts, secs, skip, Checked, Context,
};
use bytes::Bytes;
use std::sync::Arc;
use stevedore_core::{Broker, BrokerError, Envelope};

/// Above this declared limit, the exact-size payload is not sent (only the over-limit one is
/// built).
const EXACT_UP_TO: usize = 8 * 1024 * 1024;
/// Above this declared limit, nothing is tested: building such a payload would exhaust the machine.
const TESTABLE_UP_TO: usize = 1024 * 1024 * 1024;

/// Publishes `max_payload + 1` bytes alone, then inside a batch after a small message: both calls
/// must fail with `PayloadTooLarge { size: max + 1, max }`, and the queue must stay empty (the
/// small message must not have been sent either). Then, if the limit is at most 8 MiB, a payload of
/// exactly `max_payload` bytes is published and received byte for byte.
pub(crate) async fn limits(backend: Arc<dyn Backend>) -> Checked {
    let queue = unique("limits");
    let h = handle(&backend, &[&queue]).await?;
    let max = h.capabilities().max_payload;
    if max >= TESTABLE_UP_TO {
        close(&[&h]).await;
        return skip(format!(
            "backend declares no practical payload limit (max_payload = {max} bytes ≥ 1 GiB)"
        ));
    }
    let over = Bytes::from(vec![b'o'; max + 1]);
    refused(
        &h,
        &queue,
        vec![Envelope::new("conformance.big", over.clone())],
        max,
        "alone",
    )
    .await?;
    let batch = vec![
        Envelope::new("conformance.small", "small, before the big one"),
        Envelope::new("conformance.big", over),
    ];
    refused(&h, &queue, batch, max, "in a batch after a small message").await?;
    expect_empty(&h, &queue, secs(1), "every publish call failed").await?;

    if max > EXACT_UP_TO {
        close(&[&h]).await;
        return pass(format!(
            "{} bytes refused at publish with PayloadTooLarge (max {max}), nothing enqueued; \
             exact-size payload not sent (limit above 8 MiB)",
            max + 1
        ));
    }
    let exact: Bytes = (0..max)
        .map(|i| b'a' + (i % 26) as u8)
        .collect::<Vec<u8>>()
        .into();
    let env = Envelope::new("conformance.exact", exact.clone());
    h.publish(&queue, vec![env.clone()]).await.ctx(format!(
        "publish a payload of exactly max_payload = {max} bytes"
    ))?;
    let got = collect(&h, &queue, 1, secs(60), secs(30)).await?;
    ensure!(
        got[0].envelope.id == env.id && got[0].envelope.payload == exact,
        "the {max}-byte message came back as {} with {} bytes{}",
        got[0].envelope.id,
        got[0].envelope.payload.len(),
        if got[0].envelope.payload.len() == max {
            " that differ"
        } else {
            ""
        }
    );
    h.ack(&receipts(&got))
        .await
        .ctx("ack the exact-size message")?;
    close(&[&h]).await;
    pass(format!(
        "{} bytes refused at publish with PayloadTooLarge, alone and in a batch, nothing enqueued; \
         exactly {max} bytes delivered intact",
        max + 1
    ))
}

async fn refused(
    h: &Arc<dyn Broker>,
    queue: &str,
    batch: Vec<Envelope>,
    max: usize,
    how: &str,
) -> Result<(), String> {
    match h.publish(queue, batch).await {
        Err(BrokerError::PayloadTooLarge { size, max: m, .. }) if size == max + 1 && m == max => {
            Ok(())
        }
        Err(e @ BrokerError::PayloadTooLarge { .. }) => Err(format!(
            "{} bytes {how}: PayloadTooLarge names the wrong sizes: {e}",
            max + 1
        )),
        Err(e) => Err(format!(
            "{} bytes {how} failed with {e:?}, expected PayloadTooLarge",
            max + 1
        )),
        Ok(()) => Err(format!(
            "{} bytes {how} were accepted although max_payload is {max}",
            max + 1
        )),
    }
}
