//! What the conformance suite does not cover on SQS, against private moto servers on free
//! loopback ports: stale receipts, the 12 h visibility cap, binary bodies and the attribute
//! budget on the wire, FIFO delays through the delay queue, one message per key at a time on
//! FIFO queues, an unreachable endpoint, wrong credentials, a configured queue URL naming no
//! queue, and recovery after the endpoint went away.

#[allow(dead_code)]
mod common;

use common::SqsBackend;
use std::time::{Duration, Instant};
use stevedore_conformance::servers::MotoServer;
use stevedore_core::{Broker, BrokerError, Envelope, ReceiveOptions};
use stevedore_sqs::SqsBroker;

fn opts(max: usize, wait_ms: u64, lease_ms: u64) -> ReceiveOptions {
    ReceiveOptions {
        max,
        wait: Duration::from_millis(wait_ms),
        lease: Duration::from_millis(lease_ms),
    }
}

async fn broker(server: &MotoServer, fifo: bool) -> SqsBroker {
    std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
    SqsBroker::connect(SqsBackend::config(server.endpoint(), fifo))
        .await
        .expect("connect")
}

fn moto() -> MotoServer {
    MotoServer::start().unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test]
async fn an_ack_after_the_lease_ended_is_lease_lost_and_the_message_comes_back() {
    let server = moto();
    let b = broker(&server, false).await;
    b.prepare(&["stale".into()]).await.expect("prepare");
    let env = Envelope::new("j", "once");
    b.publish("stale", vec![env.clone()])
        .await
        .expect("publish");
    let got = b
        .receive("stale", opts(1, 1000, 1000))
        .await
        .expect("receive");
    assert_eq!(got.len(), 1);
    tokio::time::sleep(Duration::from_millis(1300)).await;
    // SQS would accept this delete and keep the message: the backend must say the lease is gone.
    let err = b.ack(&[got[0].receipt.clone()]).await.unwrap_err();
    assert!(matches!(err, BrokerError::LeaseLost { .. }), "{err}");
    let again = b
        .receive("stale", opts(1, 2000, 30_000))
        .await
        .expect("receive");
    assert_eq!(
        again.len(),
        1,
        "the message was not deleted by the stale ack"
    );
    assert_eq!(again[0].envelope.id, env.id);
    assert_eq!(again[0].delivery_count, 2);
    b.ack(&[again[0].receipt.clone()]).await.expect("ack");
    let err = b.ack(&[again[0].receipt.clone()]).await.unwrap_err();
    assert!(
        matches!(err, BrokerError::LeaseLost { .. }),
        "acked twice: {err}"
    );
    assert!(b
        .receive("stale", opts(1, 0, 1000))
        .await
        .expect("receive")
        .is_empty());
}

#[tokio::test]
async fn a_lease_is_never_extended_past_twelve_hours_and_extends_below_it() {
    let server = moto();
    let b = broker(&server, false).await;
    b.prepare(&["cap".into()]).await.expect("prepare");
    b.publish("cap", vec![Envelope::new("j", "x")])
        .await
        .expect("publish");
    let got = b
        .receive("cap", opts(1, 1000, 2000))
        .await
        .expect("receive");
    let r = &got[0].receipt;
    let err = b
        .extend_lease(r, Duration::from_secs(13 * 3600))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("12 h"), "{err}");
    assert!(!err.is_transient());
    b.extend_lease(r, Duration::from_secs(5))
        .await
        .expect("extend");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        b.receive("cap", opts(1, 0, 1000))
            .await
            .expect("receive")
            .is_empty(),
        "the extended lease holds past the first one"
    );
    b.ack(std::slice::from_ref(r))
        .await
        .expect("ack within the extended lease");
}

#[tokio::test]
async fn binary_bodies_headers_and_sizes_on_the_wire() {
    let server = moto();
    let b = broker(&server, false).await;
    b.prepare(&["wire".into()]).await.expect("prepare");
    let mut env = Envelope::new("bin", vec![0u8, 1, 2, 255, 254, b'\n']);
    for i in 0..9 {
        env = env.with_header(format!("h-{i}"), format!("v{i}"));
    }
    env = env.with_header("stevedore-dlq-error", "x");
    b.publish("wire", vec![env.clone()]).await.expect("publish");
    let got = b
        .receive("wire", opts(1, 1000, 5000))
        .await
        .expect("receive");
    assert_eq!(got[0].envelope.payload, env.payload);
    assert_eq!(got[0].envelope.headers, env.headers);
    b.ack(&[got[0].receipt.clone()]).await.expect("ack");

    // A text payload at the declared max fits; one byte of base64 growth past it does not.
    let max = b.capabilities().max_payload;
    b.publish("wire", vec![Envelope::new("big", "a".repeat(max))])
        .await
        .expect("max_payload of text fits a 1 MiB queue");
    let err = b
        .publish("wire", vec![Envelope::new("big", vec![0u8; max])])
        .await
        .unwrap_err();
    match err {
        BrokerError::PayloadTooLarge { size, max: m, .. } => {
            assert_eq!(size, max);
            assert!(
                m < max,
                "binary payloads are limited by their base64 size: {m}"
            );
        }
        other => panic!("{other}"),
    }
    let got = b
        .receive("wire", opts(1, 1000, 5000))
        .await
        .expect("receive");
    assert_eq!(got[0].envelope.payload.len(), max);
}

#[tokio::test]
async fn fifo_delays_wait_in_the_delay_queue_and_are_never_early() {
    let server = moto();
    let b = broker(&server, true).await;
    b.prepare(&["later".into()]).await.expect("prepare");
    let store = b.delay_store().expect("FIFO queues have a delay store");
    let t0 = Instant::now();
    let env = Envelope::new("j", "soon").delayed(Duration::from_secs(2));
    b.publish("later", vec![env.clone()])
        .await
        .expect("publish");
    assert_eq!(b.depth("later").await.expect("depth").delayed, Some(1));
    assert!(b
        .receive("later", opts(1, 0, 1000))
        .await
        .expect("receive")
        .is_empty());
    let mut moved = 0;
    while moved == 0 {
        assert!(t0.elapsed() < Duration::from_secs(10), "never promoted");
        moved = store
            .promote_due(std::time::SystemTime::now(), 100)
            .await
            .expect("promote");
        if moved == 0 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    assert!(t0.elapsed() >= Duration::from_secs(2), "promoted early");
    let got = b
        .receive("later", opts(1, 1000, 5000))
        .await
        .expect("receive");
    assert_eq!(got[0].envelope.id, env.id);
    assert_eq!(b.depth("later").await.expect("depth").delayed, Some(0));
}

#[tokio::test]
async fn an_unreachable_endpoint_is_a_quick_transient_error() {
    let port = stevedore_conformance::servers::free_port().expect("port");
    std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
    let b = SqsBroker::connect(SqsBackend::config(
        format!("http://127.0.0.1:{port}"),
        false,
    ))
    .await
    .expect("connect makes no call");
    let t = Instant::now();
    let err = b.prepare(&["nowhere".into()]).await.unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert!(err.to_string().contains("nowhere"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
}

#[tokio::test]
async fn after_the_endpoint_went_away_and_came_back_the_broker_carries_on() {
    let server = moto();
    let b = broker(&server, false).await;
    b.prepare(&["back".into()]).await.expect("prepare");
    server.stop();
    let err = b
        .publish("back", vec![Envelope::new("j", "x")])
        .await
        .unwrap_err();
    assert!(err.is_transient(), "{err}");
    server.restart(Duration::ZERO).expect("restart");
    // moto came back empty: the first call learns the queue is gone (transient), the next
    // creates it again.
    let mut sent = false;
    for _ in 0..3 {
        if b.publish("back", vec![Envelope::new("j", "after")])
            .await
            .is_ok()
        {
            sent = true;
            break;
        }
    }
    assert!(sent, "publish never recovered");
    let got = b
        .receive("back", opts(1, 1000, 5000))
        .await
        .expect("receive");
    assert_eq!(got[0].envelope.payload.as_ref(), b"after");
}

#[tokio::test]
async fn wrong_credentials_fail_at_once_naming_the_keys_and_never_showing_the_secret() {
    // moto checks credentials like SQS once this count of unchecked calls is used up.
    let server = MotoServer::start_with(&[("INITIAL_NO_AUTH_ACTION_COUNT", "0")])
        .unwrap_or_else(|e| panic!("{e}"));
    std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
    let mut cfg = SqsBackend::config(server.endpoint(), false);
    cfg.credentials = stevedore_sqs::SqsCredentials::Static {
        access_key_id: "AKIANOTAREALKEY".into(),
        secret_access_key: "not-the-secret-0123456789".into(),
        session_token: None,
    };
    let b = SqsBroker::connect(cfg)
        .await
        .expect("connect makes no call");
    let t = Instant::now();
    let err = b.prepare(&["jobs".into()]).await.unwrap_err();
    let text = err.to_string();
    assert!(
        !err.is_transient(),
        "retrying cannot fix credentials: {text}"
    );
    assert!(text.contains("jobs"), "{text}");
    assert!(text.contains("broker.access_key_id"), "{text}");
    assert!(text.contains("broker.secret_access_key"), "{text}");
    assert!(!text.contains("not-the-secret"), "{text}");
    // Not retried three times with backoff first.
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}

#[tokio::test]
async fn a_configured_queue_url_that_names_no_queue_fails_naming_the_key() {
    let server = moto();
    std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
    let mut cfg = SqsBackend::config(server.endpoint(), false);
    let url = format!("{}/123456789012/no-such-queue", server.endpoint());
    cfg.queue_urls.insert("jobs".into(), url.clone());
    let b = SqsBroker::connect(cfg)
        .await
        .expect("connect makes no call");
    for err in [
        b.prepare(&["jobs".into()]).await.unwrap_err(),
        b.publish("jobs", vec![Envelope::new("j", "x")])
            .await
            .unwrap_err(),
    ] {
        let text = err.to_string();
        assert!(!err.is_transient(), "waiting cannot create it: {text}");
        assert!(text.contains("broker.queue_urls.jobs"), "{text}");
        assert!(text.contains(&url), "{text}");
    }
    // Queues the config does not name are still created.
    b.prepare(&["other".into()]).await.expect("prepare other");
}

fn body(d: &stevedore_core::Delivery) -> String {
    String::from_utf8_lossy(&d.envelope.payload).into_owned()
}

/// The receipt of the delivery among `ds` whose body is `b`.
fn receipt_of(ds: &[stevedore_core::Delivery], b: &str) -> stevedore_core::Receipt {
    ds.iter()
        .find(|d| body(d) == b)
        .unwrap_or_else(|| panic!("{b} was not delivered"))
        .receipt
        .clone()
}

/// A FIFO queue hands out one message per key at a time: a receive of 10 over two keys returns
/// the first of each only; the next of a key comes as soon as the one before it is acked (a
/// long poll waiting meanwhile is cut short); a release sends the key's held messages back with
/// it, so the key starts again from the released message; close hands what it held back at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifo_queues_hand_out_one_message_per_key_at_a_time() {
    let server = moto();
    let a = broker(&server, true).await;
    let q = "perkey".to_string();
    a.prepare(std::slice::from_ref(&q)).await.expect("prepare");
    let mut sent = Vec::new();
    for n in 0..4 {
        for key in ["a", "b"] {
            let mut e = Envelope::new("j", format!("{key}{n}"));
            e.key = Some(key.into());
            sent.push(e);
        }
    }
    a.publish(&q, sent).await.expect("publish");

    let first = a
        .receive(&q, opts(10, 1000, 30_000))
        .await
        .expect("receive");
    let mut got: Vec<String> = first.iter().map(body).collect();
    got.sort();
    assert_eq!(got, ["a0", "b0"], "one message per key, the first of each");

    // Nothing more while both are out: the held ones wait, the rest of each key is blocked on SQS.
    assert!(a
        .receive(&q, opts(10, 0, 30_000))
        .await
        .expect("receive")
        .is_empty());

    // Ack a0 while a receive waits (up to 5 s): a1 comes at once.
    let a0 = receipt_of(&first, "a0");
    let waiter = {
        let a = a.clone();
        let q = q.clone();
        tokio::spawn(async move {
            let t = Instant::now();
            let got = a
                .receive(&q, opts(10, 5000, 30_000))
                .await
                .expect("receive");
            (got, t.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.ack(&[a0]).await.expect("ack a0");
    let (next, took) = waiter.await.expect("join");
    assert_eq!(next.iter().map(body).collect::<Vec<_>>(), ["a1"]);
    assert!(
        took < Duration::from_secs(3),
        "a1 took {took:?} to follow the ack of a0"
    );
    a.ack(&[next[0].receipt.clone()]).await.expect("ack a1");

    // Release b0: the key starts again from b0, and b1 only after b0 is acked.
    let b0 = receipt_of(&first, "b0");
    a.release(&[b0]).await.expect("release b0");
    let b = broker(&server, true).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let again = loop {
        let got = b
            .receive(&q, opts(10, 1000, 30_000))
            .await
            .expect("receive");
        if !got.is_empty() || Instant::now() > deadline {
            break got;
        }
    };
    assert_eq!(
        again.iter().map(body).collect::<Vec<_>>(),
        ["b0"],
        "b0 again, alone"
    );
    assert_eq!(again[0].delivery_count, 2);

    // `b` holds b1..b3 behind b0 (one receive of 10 brought the rest of the key). Release b0
    // and close `b`: everything of the key goes back at once, not after the 30 s lease, and
    // arrives again in order, one at a time.
    b.release(&[again[0].receipt.clone()])
        .await
        .expect("release b0 again");
    b.close().await.expect("close");
    let mut order = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    while order.len() < 6 && Instant::now() < deadline {
        let got = a
            .receive(&q, opts(10, 1000, 30_000))
            .await
            .expect("receive");
        let bodies: Vec<String> = got.iter().map(body).collect();
        assert!(got.len() <= 2, "at most one per key at a time: {bodies:?}");
        order.extend(bodies);
        let receipts: Vec<_> = got.iter().map(|d| d.receipt.clone()).collect();
        a.ack(&receipts).await.expect("ack");
    }
    let of =
        |k: char| -> Vec<String> { order.iter().filter(|s| s.starts_with(k)).cloned().collect() };
    assert_eq!(of('a'), ["a2", "a3"]);
    assert_eq!(of('b'), ["b0", "b1", "b2", "b3"]);
    a.close().await.expect("close");
}
