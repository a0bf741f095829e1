//! RabbitMQ-specific behaviour beyond the conformance suite:
//! - delayed messages survive a broker restart and are never early (private server);
//! - a channel closed by the server's consumer_timeout is reported, its message comes back and the
//!   old receipt is a lost lease (private server with a 2 s consumer_timeout);
//! - a plain AMQP publish without any of our headers is received as a foreign message;
//! - a crashed handle returns exactly what it was handed, with delivery counts to match, and
//!   nothing it was not handed (no prefetch beyond demand);
//! - `amqps://` against a private server whose certificate is signed by a private CA;
//! - the password stays out of errors, `Debug` and even trace-level logs.
//!
//! The machine's RabbitMQ (127.0.0.1:5672, `RABBITMQ_URL` overrides) is only used as a client,
//! each test under a key prefix of its own, and a [`Cleanup`] guard deletes what the test created
//! there (its queues and the prefix's delay topology) when it ends, passed or failed.

use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use stevedore_conformance::servers::RabbitServer;
use stevedore_conformance::unique;
use stevedore_core::{to_millis, Broker, BrokerError, Delivery, Envelope, ReceiveOptions};
use stevedore_rabbitmq::{RabbitBroker, RabbitConfig};
use tokio::time::Instant;

fn machine_url() -> String {
    std::env::var("RABBITMQ_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

fn config(url: &str, prefix: &str) -> RabbitConfig {
    let mut c = RabbitConfig::new(url);
    c.key_prefix = prefix.to_string();
    // Backstop for a test process killed before its guard ran.
    c.queue_expires = Some(Duration::from_secs(30 * 60));
    c
}

/// Deletes, when dropped (the test passed or panicked), queue `queue` (with its dead-letter
/// queue) and the shared delay topology under `prefix` on the server at `url`.
struct Cleanup {
    url: String,
    prefix: String,
    queue: String,
}

impl Cleanup {
    /// A fresh prefix and queue name for a test on the machine's server.
    fn machine(tag: &str) -> Cleanup {
        Cleanup {
            url: machine_url(),
            prefix: format!("{}.", unique("bt")),
            queue: unique(tag),
        }
    }

    fn config(&self) -> RabbitConfig {
        config(&self.url, &self.prefix)
    }

    /// The AMQP name of the test's queue.
    fn amqp(&self) -> String {
        format!("{}{}", self.prefix, self.queue)
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let (url, prefix, queue) = (self.url.clone(), self.prefix.clone(), self.amqp());
        let done = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async {
                let conn = Connection::connect(&url, ConnectionProperties::default())
                    .await
                    .map_err(|e| e.to_string())?;
                let ch = conn.create_channel().await.map_err(|e| e.to_string())?;
                let (mut queues, exchanges) = stevedore_rabbitmq::delay::topology(&prefix);
                for suffix in ["__dlq", "__high", "__low", ""] {
                    queues.push(format!("{queue}{suffix}"));
                }
                for q in queues {
                    ch.queue_delete(q.as_str().into(), Default::default())
                        .await
                        .map_err(|e| e.to_string())?;
                }
                for x in exchanges {
                    ch.exchange_delete(x.as_str().into(), Default::default())
                        .await
                        .map_err(|e| e.to_string())?;
                }
                let _ = conn.close(200, "cleaned up".into()).await;
                Ok::<(), String>(())
            })
        })
        .join();
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("cleanup of {}: {e}", self.prefix),
            Err(_) => eprintln!("cleanup of {} panicked", self.prefix),
        }
    }
}

fn opts(max: usize, wait: Duration) -> ReceiveOptions {
    ReceiveOptions {
        max,
        wait,
        lease: Duration::from_secs(60),
    }
}

/// Receives until `n` deliveries are held or `within` passes.
async fn collect(b: &RabbitBroker, q: &str, n: usize, within: Duration) -> Vec<Delivery> {
    let deadline = Instant::now() + within;
    let mut out = Vec::new();
    while out.len() < n && Instant::now() < deadline {
        match b
            .receive(q, opts(n - out.len(), Duration::from_millis(200)))
            .await
        {
            Ok(got) => out.extend(got),
            Err(e) if e.is_transient() => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => panic!("receive: {e}"),
        }
    }
    out
}

/// When a message published at `published` and due at `due` moves between delay levels: after
/// each level's wait (its delay's set bits, highest first), the last move being its delivery.
fn moves(published: SystemTime, due: SystemTime) -> Vec<SystemTime> {
    let ms = stevedore_rabbitmq::delay::delay_ms(
        due.duration_since(published).unwrap_or_default(),
        stevedore_rabbitmq::LEVELS,
    );
    let mut at = published;
    (0..stevedore_rabbitmq::LEVELS)
        .rev()
        .filter(|k| ms >> k & 1 == 1)
        .map(|k| {
            at += Duration::from_millis(1 << k);
            at
        })
        .collect()
}

fn receipts(ds: &[Delivery]) -> Vec<stevedore_core::Receipt> {
    ds.iter().map(|d| d.receipt.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_messages_survive_a_restart_and_are_never_early() -> Result<(), BrokerError> {
    let server = tokio::task::block_in_place(RabbitServer::start).unwrap_or_else(|e| panic!("{e}"));
    let q = "delayed-restart".to_string();
    let b = RabbitBroker::connect(RabbitConfig::new(server.url())).await?;
    b.prepare(std::slice::from_ref(&q)).await?;
    assert!(
        b.delay_store().is_none(),
        "delay is native: no store, no promoter"
    );
    // Two due while the broker is down, two after it is back (start-up takes 6-25 s). 25 s moves
    // between levels at 16.4 s (often while the broker is down); 40 s at 32.8 s (after it is back).
    let delays = [2u64, 4, 25, 40].map(Duration::from_secs);
    let sent: Vec<Envelope> = delays
        .iter()
        .map(|d| Envelope::new("delayed", format!("in {}s", d.as_secs())).delayed(*d))
        .collect();
    let due: HashMap<String, SystemTime> = sent
        .iter()
        .map(|e| (e.id.clone(), e.not_before.expect("delayed")))
        .collect();
    let published = SystemTime::now();
    b.publish(&q, sent).await?;
    assert_eq!(
        b.delayed_total().await?,
        4,
        "all four wait in the delay levels"
    );
    assert_eq!(b.depth(&q).await?.ready, 0, "none is ready yet");

    let restart_began = Instant::now();
    let down_from = SystemTime::now();
    tokio::task::block_in_place(|| server.restart(Duration::from_millis(500)))
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "private rabbitmq-server restart took {:?}",
        restart_began.elapsed()
    );
    // "Back" is when the client is reconnected and every delay level and the queue answer again
    // (a node accepts connections before its queues have recovered, later on a loaded machine):
    // from then on, a message that comes due is moved on in time.
    let serving = Instant::now() + Duration::from_secs(60);
    loop {
        match (b.delayed_total().await, b.depth(&q).await) {
            (Ok(_), Ok(_)) => break,
            (Err(e), _) | (_, Err(e)) if e.is_transient() && Instant::now() < serving => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (Err(e), _) | (_, Err(e)) => panic!("the restarted broker does not serve: {e}"),
        }
    }
    let back_at = SystemTime::now();
    eprintln!(
        "serving again {:?} after the restart began",
        restart_began.elapsed()
    );

    // No promoter: the broker moves due messages on by itself, even those due while it was down.
    let mut seen: HashSet<String> = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.len() < due.len() {
        assert!(
            Instant::now() < deadline,
            "only {} of 4 delayed messages arrived",
            seen.len()
        );
        let got = match b.receive(&q, opts(4, Duration::from_millis(200))).await {
            Ok(got) => got,
            Err(e) if e.is_transient() => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Err(e) => panic!("receive: {e}"),
        };
        let now = SystemTime::now();
        for d in &got {
            let at = due[&d.envelope.id];
            assert!(
                to_millis(now) >= to_millis(at),
                "message {} arrived {} ms early",
                d.envelope.id,
                to_millis(at) - to_millis(now)
            );
            let late = now.duration_since(at).unwrap_or_default();
            // A move between levels that falls while the broker is down happens when it is back,
            // so the message is late by the rest of the outage; one with every move outside the
            // outage is on time.
            let moved_in_outage = moves(published, at)
                .into_iter()
                .find(|m| *m >= down_from && *m <= back_at);
            let allowed = match moved_in_outage {
                Some(m) => back_at.duration_since(m).unwrap_or_default() + Duration::from_secs(2),
                None => Duration::from_millis(1000),
            };
            eprintln!(
                "delayed message arrived {late:?} after its due time (allowed {allowed:?}, {})",
                if moved_in_outage.is_some() {
                    "a move fell in the outage"
                } else {
                    "no move in the outage"
                }
            );
            assert!(
                late <= allowed,
                "message {} arrived {late:?} late (allowed {allowed:?})",
                d.envelope.id
            );
            assert!(seen.insert(d.envelope.id.clone()), "delivered twice");
        }
        if !got.is_empty() {
            b.ack(&receipts(&got)).await?;
        }
    }
    assert_eq!(b.delayed_total().await?, 0, "nothing left in the levels");
    b.close().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_timeout_closing_the_channel_is_reported() -> Result<(), BrokerError> {
    let server =
        tokio::task::block_in_place(|| RabbitServer::start_with("consumer_timeout = 2000"))
            .unwrap_or_else(|e| panic!("{e}"));
    // The server checks consumer timeouts on each channel tick (once a minute by default): tick
    // every 500 ms for channels opened from now on.
    tokio::task::block_in_place(|| {
        server.ctl(&[
            "eval",
            "application:set_env(rabbit, channel_tick_interval, 500).",
        ])
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let q = "held-too-long".to_string();
    let mut cfg = RabbitConfig::new(server.url());
    cfg.consumer_timeout = Duration::from_secs(2);
    let b = RabbitBroker::connect(cfg).await?;
    assert_eq!(
        b.capabilities().lease,
        stevedore_core::LeaseSupport::Session {
            max: Some(Duration::from_secs(2))
        }
    );
    b.prepare(std::slice::from_ref(&q)).await?;
    b.publish(&q, vec![Envelope::new("slow", "takes too long")])
        .await?;
    let held = collect(&b, &q, 1, Duration::from_secs(10)).await;
    assert_eq!(held.len(), 1);
    let started = Instant::now();
    // Hold it past the timeout; a waiting receive is told the channel is gone.
    let mut reported = None;
    while started.elapsed() < Duration::from_secs(15) {
        match b.receive(&q, opts(1, Duration::from_millis(500))).await {
            Err(e) => {
                reported = Some(e);
                break;
            }
            Ok(got) => assert!(got.is_empty(), "nothing else to receive while it is held"),
        }
    }
    let e = reported.expect("the channel closed by consumer_timeout was reported");
    eprintln!("reported after {:?}: {e}", started.elapsed());
    assert!(
        e.is_transient(),
        "a transient error, so the runtime retries"
    );
    assert!(
        e.to_string().contains("consumer_timeout"),
        "the error names consumer_timeout: {e}"
    );
    assert_eq!(b.consumer_timeouts(), 1);
    // The old receipt is gone; the message comes back on a new channel, counted.
    assert!(matches!(
        b.ack(&receipts(&held)).await,
        Err(BrokerError::LeaseLost { .. })
    ));
    assert!(matches!(
        b.extend_lease(&held[0].receipt, Duration::from_secs(1))
            .await,
        Err(BrokerError::LeaseLost { .. })
    ));
    let again = collect(&b, &q, 1, Duration::from_secs(10)).await;
    assert_eq!(again.len(), 1, "the timed-out message was requeued");
    assert_eq!(again[0].envelope.id, held[0].envelope.id);
    assert_eq!(again[0].delivery_count, 2);
    b.ack(&receipts(&again)).await?;
    b.close().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_amqp_messages_are_foreign() -> Result<(), BrokerError> {
    let guard = Cleanup::machine("plain-amqp");
    let (url, q) = (guard.url.clone(), guard.queue.clone());
    let b = RabbitBroker::connect(guard.config()).await?;
    b.prepare(std::slice::from_ref(&q)).await?;
    let conn = Connection::connect(&url, ConnectionProperties::default())
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    let mut headers = FieldTable::default();
    headers.insert(
        "x-source".into(),
        AMQPValue::LongString(LongString::from("billing")),
    );
    headers.insert("x-retries".into(), AMQPValue::LongInt(3));
    let plain = [
        // Bytes only, as `rabbitmqadmin publish` sends them.
        (
            b"{\"event\":\"signup\"}".to_vec(),
            BasicProperties::default(),
        ),
        // A client that sets its own id, type and headers.
        (
            b"second".to_vec(),
            BasicProperties::default()
                .with_message_id("their-id-1".into())
                .with_content_type("text/plain".into())
                .with_headers(headers),
        ),
    ];
    for (body, props) in &plain {
        ch.basic_publish(
            "".into(),
            guard.amqp().as_str().into(),
            BasicPublishOptions::default(),
            body,
            props.clone(),
        )
        .await
        .expect("publish");
    }
    ch.close(200, "done".into()).await.expect("close");
    let got = collect(&b, &q, 2, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 2);
    let first = got
        .iter()
        .find(|d| d.envelope.payload.as_ref() == plain[0].0.as_slice())
        .expect("first body intact");
    assert_eq!(first.envelope.job, None);
    assert!(
        first.envelope.id.starts_with("amqp-"),
        "{}",
        first.envelope.id
    );
    assert_eq!(first.delivery_count, 1);
    assert!(first.envelope.headers.is_empty());
    let second = got
        .iter()
        .find(|d| d.envelope.payload.as_ref() == b"second")
        .expect("second body intact");
    assert_eq!(second.envelope.job, None);
    assert_eq!(second.envelope.id, "their-id-1");
    assert_eq!(second.envelope.content_type.as_deref(), Some("text/plain"));
    assert_eq!(
        second.envelope.headers.get("x-source").map(String::as_str),
        Some("billing")
    );
    assert_eq!(
        second.envelope.headers.get("x-retries").map(String::as_str),
        Some("3")
    );
    // Same ids after a release, and counted.
    let ids: HashSet<String> = got.iter().map(|d| d.envelope.id.clone()).collect();
    b.release(&receipts(&got)).await?;
    let again = collect(&b, &q, 2, Duration::from_secs(10)).await;
    let ids_again: HashSet<String> = again.iter().map(|d| d.envelope.id.clone()).collect();
    assert_eq!(ids, ids_again);
    assert!(again.iter().all(|d| d.delivery_count == 2));
    b.ack(&receipts(&again)).await?;
    b.close().await?;
    let _ = conn.close(200, "done".into()).await;
    Ok(())
}

/// Two handles hold 10 messages each (received with max 10: no more is pushed to them); one is
/// dropped (a crash), the other closed. A third gets all 30 at once: the 20 held ones counted 2, the
/// 10 others 1 — nothing a handle was not handed comes back counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_handle_returns_only_what_it_was_handed() -> Result<(), BrokerError> {
    let guard = Cleanup::machine("crash-held");
    let q = guard.queue.clone();
    let b = RabbitBroker::connect(guard.config()).await?;
    b.prepare(std::slice::from_ref(&q)).await?;
    let sent: Vec<Envelope> = (0..30)
        .map(|i| Envelope::new("crash", format!("{i}")))
        .collect();
    b.publish(&q, sent).await?;
    let a = Arc::new(RabbitBroker::connect(guard.config()).await?);
    let c = RabbitBroker::connect(guard.config()).await?;
    let held_a = collect(&a, &q, 10, Duration::from_secs(10)).await;
    let held_c = collect(&c, &q, 10, Duration::from_secs(10)).await;
    let held: HashSet<String> = held_a
        .iter()
        .chain(&held_c)
        .map(|d| d.envelope.id.clone())
        .collect();
    assert_eq!(held.len(), 20, "two handles, 20 distinct messages");
    let depth = b.depth(&q).await?;
    assert_eq!(
        depth.ready, 10,
        "exactly 10 left ready: no handle prefetched more"
    );
    drop(held_a);
    drop(a); // a crash: no ack, no release, no close
    c.close().await?;
    let crashed = Instant::now();
    let mut seen = HashSet::new();
    while seen.len() < 30 {
        assert!(
            crashed.elapsed() < Duration::from_secs(6),
            "only {} of 30 back within 6 s",
            seen.len()
        );
        let got = b.receive(&q, opts(30, Duration::from_millis(200))).await?;
        for d in &got {
            let was_held = held.contains(&d.envelope.id);
            assert_eq!(
                d.delivery_count,
                if was_held { 2 } else { 1 },
                "message {} (held: {was_held})",
                d.envelope.id
            );
            assert!(seen.insert(d.envelope.id.clone()), "delivered twice");
        }
        b.ack(&receipts(&got)).await?;
    }
    eprintln!("all 30 back {:?} after the crash", crashed.elapsed());
    b.close().await?;
    Ok(())
}

/// Logs captured by the trace-level subscriber of this test binary.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The password never shows: not in errors, not in `Debug`, not even in trace-level logs of the
/// AMQP client (which logs the URI it connects to).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_stay_out_of_errors_and_logs() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .finish();
    let _ = tracing::subscriber::set_global_default(subscriber);
    let good = machine_url();
    let bad = good.replacen("guest:guest", "guest:not-the-s3cret", 1);
    let err = RabbitBroker::connect(RabbitConfig::new(bad.as_str()))
        .await
        .expect_err("a wrong password is refused");
    eprintln!("wrong password: {err}");
    assert!(!err.to_string().contains("not-the-s3cret"), "{err}");
    assert!(!err.is_transient(), "a refused login is not retried: {err}");
    let b = RabbitBroker::connect(RabbitConfig::new(good.as_str()))
        .await
        .expect("the right password works through the auth provider");
    let cfg = RabbitConfig::new(bad.as_str());
    assert!(!format!("{cfg:?} {b:?}").contains("not-the-s3cret"));
    let _ = b.close().await;
    let logs =
        String::from_utf8_lossy(&captured.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned();
    assert!(logs.contains("Connecting"), "trace logs were captured");
    assert!(!logs.contains("not-the-s3cret"), "password in the logs");
    assert!(
        !logs.contains("password: \"guest\""),
        "password in the logs"
    );
}

fn openssl(args: &[&str]) {
    let ok = std::process::Command::new("openssl")
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "openssl {args:?} failed (openssl is needed for the TLS test)"
    );
}

/// `amqps://` to a private server with a TLS listener whose certificate a private CA signed: refused
/// while the CA is unknown, working once `tls_ca_file` names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_with_a_private_ca() -> Result<(), BrokerError> {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = |f: &str| dir.path().join(f).to_string_lossy().into_owned();
    let (ca_key, ca, key, csr, cert, ext) = (
        p("ca.key"),
        p("ca.pem"),
        p("key.pem"),
        p("req.csr"),
        p("cert.pem"),
        p("ext.cnf"),
    );
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=stevedore test CA",
        "-keyout",
        &ca_key,
        "-out",
        &ca,
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        &key,
        "-out",
        &csr,
    ]);
    std::fs::write(
        &ext,
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
         keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
    )
    .expect("write extensions");
    openssl(&[
        "x509",
        "-req",
        "-in",
        &csr,
        "-CA",
        &ca,
        "-CAkey",
        &ca_key,
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        &ext,
        "-out",
        &cert,
    ]);
    let tls_port = stevedore_conformance::servers::free_port().unwrap_or_else(|e| panic!("{e}"));
    let conf = format!(
        "listeners.ssl.1 = 127.0.0.1:{tls_port}\nssl_options.cacertfile = {ca}\n\
         ssl_options.certfile = {cert}\nssl_options.keyfile = {key}\n\
         ssl_options.verify = verify_none\nssl_options.fail_if_no_peer_cert = false"
    );
    let server = tokio::task::block_in_place(|| RabbitServer::start_with(&conf))
        .unwrap_or_else(|e| panic!("{e}"));
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", tls_port)).is_err() {
        assert!(t.elapsed() < Duration::from_secs(20), "no TLS listener");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let url = format!("amqps://guest:guest@127.0.0.1:{tls_port}/%2f");
    let untrusted = RabbitBroker::connect(RabbitConfig::new(url.as_str())).await;
    match untrusted {
        Ok(_) => panic!("a certificate from an unknown CA must be refused"),
        Err(e) => {
            eprintln!("without the CA: {e}");
            assert!(
                e.to_string().to_lowercase().contains("certificate"),
                "refused for its certificate: {e}"
            );
        }
    }
    let mut cfg = RabbitConfig::new(url.as_str());
    cfg.tls_ca_file = Some(dir.path().join("ca.pem"));
    let b = RabbitBroker::connect(cfg).await?;
    let q = "over-tls".to_string();
    b.prepare(std::slice::from_ref(&q)).await?;
    b.publish(&q, vec![Envelope::new("tls", "over amqps")])
        .await?;
    let got = collect(&b, &q, 1, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(&got[0].envelope.payload[..], b"over amqps");
    b.ack(&receipts(&got)).await?;
    b.close().await?;
    drop(server);
    Ok(())
}

/// Names of the queues (or exchanges) on the machine's server that start with `prefix`, read with
/// `rabbitmqctl` (the AMQP protocol cannot list them).
fn listed(what: &str, prefix: &str) -> Vec<String> {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["-q", what, "name", "--no-table-headers"])
        .output()
        .unwrap_or_else(|e| panic!("rabbitmqctl {what} (installed with rabbitmq-server): {e}"));
    assert!(
        out.status.success(),
        "rabbitmqctl {what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with(prefix))
        .map(str::to_string)
        .collect()
}

/// The broker-side footprint: a logical queue with two priority levels is its two level queues
/// and its dead-letter queue, whatever it delays; the delay topology (32 level queues and the
/// unroutable queue, 35 exchanges) is shared by every queue under the key prefix and declared on
/// first use. Before the shared topology, each physical queue had 22 TTL tiers and a router of
/// its own: ~50 broker queues for this logical queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_topology_is_shared_by_every_queue() -> Result<(), BrokerError> {
    let guard = Cleanup::machine("topology");
    let mut second = Cleanup::machine("topology-b");
    second.prefix = guard.prefix.clone();
    let b = RabbitBroker::connect(guard.config()).await?;
    let logical = |q: &str| {
        vec![
            format!("{q}__high"),
            format!("{q}__low"),
            format!("{q}__dlq"),
        ]
    };
    let (q1, q2) = (guard.queue.clone(), second.queue.clone());
    b.prepare(&logical(&q1)).await?;
    let delayed = |q: &str| {
        vec![Envelope::new("later", "x")
            .delayed(Duration::from_secs(3600))
            .with_header("q", q)]
    };
    b.publish(&format!("{q1}__low"), delayed(&q1)).await?;
    let queues = tokio::task::block_in_place(|| listed("list_queues", &guard.prefix));
    let exchanges = tokio::task::block_in_place(|| listed("list_exchanges", &guard.prefix));
    let shared = stevedore_rabbitmq::LEVELS as usize + 1;
    assert_eq!(
        queues.len(),
        3 + shared,
        "one logical queue: its 3 queues + the shared delay set: {queues:?}"
    );
    assert_eq!(
        exchanges.len(),
        stevedore_rabbitmq::LEVELS as usize + 3,
        "{exchanges:?}"
    );
    b.prepare(&logical(&q2)).await?;
    b.publish(&format!("{q2}__high"), delayed(&q2)).await?;
    let queues = tokio::task::block_in_place(|| listed("list_queues", &guard.prefix));
    assert_eq!(
        queues.len(),
        6 + shared,
        "a second logical queue adds its own 3 queues only: {queues:?}"
    );
    assert_eq!(b.delayed_total().await?, 2);
    eprintln!(
        "broker queues: 3 per logical queue with two levels, {shared} shared by all (prefix {})",
        guard.prefix
    );
    b.close().await?;
    // The second guard deletes its own queues; the first, the shared topology too.
    drop(second);
    Ok(())
}
