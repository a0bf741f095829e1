//! Redis-specific behaviour beyond the conformance suite: TLS (`rediss://`) against a private TLS
//! redis-server, and stream trimming that never drops an unacked entry (machine Redis, 6379).

use std::process::{Command, Stdio};
use std::time::Duration;
use stevedore_core::{Broker, BrokerError, Envelope, ReceiveOptions};
use stevedore_redis::{RedisBroker, RedisConfig};

fn machine_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

fn opts(max: usize, lease: Duration) -> ReceiveOptions {
    ReceiveOptions {
        max,
        wait: Duration::from_millis(200),
        lease,
    }
}

/// A test's own key prefix on the machine's Redis; every key under it is deleted when the test
/// ends, passed or failed.
struct Cleanup {
    url: String,
    prefix: String,
    _keys: stevedore_conformance::servers::RedisKeys,
}

impl Cleanup {
    fn machine(tag: &str) -> Cleanup {
        let (url, prefix) = (machine_url(), format!("bt-{tag}-{}:", std::process::id()));
        Cleanup {
            _keys: stevedore_conformance::servers::RedisKeys {
                url: url.clone(),
                prefix: prefix.clone(),
            },
            url,
            prefix,
        }
    }

    fn config(&self) -> RedisConfig {
        let mut c = RedisConfig::new(self.url.clone());
        c.key_prefix = self.prefix.clone();
        c
    }
}

fn xlen(url: &str, key: &str) -> i64 {
    let mut c = redis::Client::open(url)
        .and_then(|c| c.get_connection())
        .expect("redis");
    redis::cmd("XLEN").arg(key).query(&mut c).expect("XLEN")
}

#[tokio::test]
async fn trimming_keeps_every_unacked_entry() -> Result<(), BrokerError> {
    let guard = Cleanup::machine("trim");
    let url = guard.url.clone();
    let q = "trim".to_string();
    let stream = format!("{}{q}", guard.prefix);
    let b = RedisBroker::connect(guard.config()).await?;
    b.prepare(std::slice::from_ref(&q)).await?;
    let msgs: Vec<Envelope> = (0..300)
        .map(|i| Envelope::new("j", format!("{i}")))
        .collect();
    b.publish(&q, msgs).await?;
    let mut got = Vec::new();
    while got.len() < 300 {
        got.extend(b.receive(&q, opts(300, Duration::from_secs(60))).await?);
    }
    // Ack all but entries 100..110; leave 50 more never delivered.
    b.publish(
        &q,
        (0..50)
            .map(|i| Envelope::new("j", format!("late {i}")))
            .collect(),
    )
    .await?;
    let (held, done): (Vec<_>, Vec<_>) = got
        .into_iter()
        .enumerate()
        .partition(|(i, _)| (100..110).contains(i));
    let done: Vec<_> = done.into_iter().map(|(_, d)| d.receipt).collect();
    b.ack(&done).await?;
    let trimmed = b.trim_now(&q).await?;
    assert_eq!(
        trimmed, 100,
        "only the acked entries before the oldest pending one go"
    );
    assert_eq!(
        xlen(&url, &stream),
        250,
        "pending 100..110, acked 110..300 behind them, 50 undelivered"
    );
    let depth = b.depth(&q).await?;
    assert_eq!((depth.ready, depth.in_flight), (50, 10));
    // The held ones are still there to ack; after that, everything acked can go.
    let held: Vec<_> = held.into_iter().map(|(_, d)| d.receipt).collect();
    b.ack(&held).await?;
    let rest = b.receive(&q, opts(100, Duration::from_secs(60))).await?;
    assert_eq!(rest.len(), 50, "undelivered entries survived trimming");
    b.ack(&rest.into_iter().map(|d| d.receipt).collect::<Vec<_>>())
        .await?;
    b.trim_now(&q).await?;
    assert!(
        xlen(&url, &stream) <= 1,
        "all acked entries trimmed (the last delivered may stay)"
    );
    Ok(())
}

/// Names of the consumers of `stream`'s group, with their pending counts.
fn consumers(url: &str, stream: &str) -> Vec<(String, i64)> {
    let mut c = redis::Client::open(url)
        .and_then(|c| c.get_connection())
        .expect("redis");
    let rows: Vec<std::collections::HashMap<String, redis::Value>> = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(stream)
        .arg(stevedore_redis::GROUP)
        .query(&mut c)
        .expect("XINFO CONSUMERS");
    rows.into_iter()
        .map(|r| {
            let name = redis::from_redis_value::<String>(r["name"].clone()).expect("name");
            let pending = redis::from_redis_value::<i64>(r["pending"].clone()).expect("pending");
            (name, pending)
        })
        .collect()
}

fn lease_records(url: &str, prefix: &str, stream: &str) -> Vec<String> {
    let mut c = redis::Client::open(url)
        .and_then(|c| c.get_connection())
        .expect("redis");
    let mut keys: Vec<String> = redis::cmd("HKEYS")
        .arg(format!("{prefix}stevedore:leases:{{{stream}}}"))
        .query(&mut c)
        .expect("HKEYS");
    keys.sort();
    keys
}

/// Group hygiene: a worker killed without closing leaves its consumer name in the group; once
/// its entries were taken over and it has not read for `forget_idle` and twice its lease, the
/// next worker that looks for expired leases removes it and its lease record. A consumer that
/// still holds an entry, and the live one, stay.
#[tokio::test]
async fn a_killed_workers_consumer_is_removed_once_it_holds_nothing() -> Result<(), BrokerError> {
    let guard = Cleanup::machine("forget");
    let url = guard.url.clone();
    let q = "forget".to_string();
    let stream = format!("{}{q}", guard.prefix);
    let named = |name: &str| {
        let mut c = guard.config();
        c.consumer = Some(name.to_string());
        c.forget_idle = Duration::from_secs(1);
        c
    };
    let lease = Duration::from_secs(1);
    let dead = RedisBroker::connect(named("dead")).await?;
    dead.prepare(std::slice::from_ref(&q)).await?;
    dead.publish(
        &q,
        (0..4).map(|i| Envelope::new("j", format!("{i}"))).collect(),
    )
    .await?;
    let taken = dead.receive(&q, opts(3, lease)).await?;
    assert_eq!(taken.len(), 3);
    let last_read = std::time::Instant::now();
    // Killed: never closed, never acked.
    drop(dead);
    let holder = RedisBroker::connect(named("holder")).await?;
    let held = holder.receive(&q, opts(1, Duration::from_secs(60))).await?;
    assert_eq!(held.len(), 1);

    let survivor = RedisBroker::connect(named("survivor")).await?;
    let mut rerun = Vec::new();
    let removed_after = loop {
        let got = survivor.receive(&q, opts(10, lease)).await?;
        rerun.extend(got.iter().map(|d| d.envelope.payload.clone()));
        survivor
            .ack(&got.into_iter().map(|d| d.receipt).collect::<Vec<_>>())
            .await?;
        let names: Vec<String> = consumers(&url, &stream).into_iter().map(|c| c.0).collect();
        if !names.iter().any(|n| n == "dead") {
            break last_read.elapsed();
        }
        assert!(
            last_read.elapsed() < Duration::from_secs(8),
            "consumer `dead` still in the group {:?} after it had not read for 8 s",
            consumers(&url, &stream)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    rerun.sort();
    assert_eq!(
        rerun.len(),
        3,
        "the survivor took over the killed worker's 3 entries"
    );
    // Twice the 1 s lease it held, and a look at most every half of forget_idle plus a reclaim
    // interval later.
    assert!(
        removed_after >= Duration::from_millis(1900),
        "removed {removed_after:?} after its last read: sooner than twice its lease"
    );
    let left = consumers(&url, &stream);
    assert_eq!(
        left,
        vec![("holder".to_string(), 1), ("survivor".to_string(), 0)],
        "the consumer holding an entry and the live one stay"
    );
    assert_eq!(
        lease_records(&url, &guard.prefix, &stream),
        vec!["holder".to_string(), "survivor".to_string()],
        "the killed worker's lease record went with it"
    );
    holder
        .ack(&held.into_iter().map(|d| d.receipt).collect::<Vec<_>>())
        .await?;
    holder.close().await?;
    survivor.close().await?;
    Ok(())
}

struct TlsServer {
    port: u16,
    _dir: tempfile::TempDir,
    child: std::process::Child,
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tls_server() -> TlsServer {
    let dir = tempfile::tempdir().expect("tempdir");
    let (key, cert) = (dir.path().join("key.pem"), dir.path().join("cert.pem"));
    let ok = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
        ])
        .args(["-addext", "subjectAltName=IP:127.0.0.1", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "openssl is needed to make a test certificate (.ci/run installs it)"
    );
    // Not a port from binding port 0: another test's outgoing connection could take it before
    // redis-server binds it (see `free_port`).
    let port = stevedore_conformance::servers::free_port().expect("free port");
    let child = Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--bind",
            "127.0.0.1",
            "--tls-port",
            &port.to_string(),
            "--save",
            "",
        ])
        .args([
            "--appendonly",
            "no",
            "--tls-auth-clients",
            "no",
            "--tls-cert-file",
        ])
        .arg(&cert)
        .arg("--tls-key-file")
        .arg(&key)
        .arg("--tls-ca-cert-file")
        .arg(&cert)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server with TLS");
    let t = std::time::Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "TLS redis-server did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    TlsServer {
        port,
        _dir: dir,
        child,
    }
}

#[tokio::test]
async fn rediss_url_speaks_tls() -> Result<(), BrokerError> {
    let server = tls_server();
    // A self-signed certificate is refused unless the URL says #insecure.
    let strict = RedisBroker::connect(RedisConfig::new(format!(
        "rediss://127.0.0.1:{}/0",
        server.port
    )))
    .await;
    assert!(strict.is_err(), "an untrusted certificate must be refused");
    let url = format!("rediss://127.0.0.1:{}/0#insecure", server.port);
    let b = RedisBroker::connect(RedisConfig::new(url)).await?;
    b.prepare(&["tls".to_string()]).await?;
    b.publish("tls", vec![Envelope::new("j", "over tls")])
        .await?;
    let got = b.receive("tls", opts(1, Duration::from_secs(5))).await?;
    assert_eq!(got.len(), 1);
    assert_eq!(&got[0].envelope.payload[..], b"over tls");
    b.ack(&[got[0].receipt.clone()]).await?;
    Ok(())
}

/// After a Redis restart without persistence the streams and groups are gone: the next publish
/// re-creates the stream without a group, and receive must re-create the group ("NOGROUP") and
/// deliver, not stay in an error state.
#[tokio::test]
async fn missing_group_is_recreated() -> Result<(), BrokerError> {
    let guard = Cleanup::machine("nogroup");
    let url = guard.url.clone();
    let q = "nogroup".to_string();
    let b = RedisBroker::connect(guard.config()).await?;
    b.prepare(std::slice::from_ref(&q)).await?;
    let mut c = redis::Client::open(url.as_str())
        .and_then(|c| c.get_connection())
        .expect("redis");
    let _: () = redis::cmd("DEL")
        .arg(format!("{}{q}", guard.prefix))
        .query(&mut c)
        .expect("DEL");
    b.publish(&q, vec![Envelope::new("j", "after the wipe")])
        .await?;
    let mut got = Vec::new();
    for _ in 0..3 {
        got = b.receive(&q, opts(1, Duration::from_secs(5))).await?;
        if !got.is_empty() {
            break;
        }
    }
    assert_eq!(got.len(), 1, "delivered once the group was re-created");
    assert_eq!(&got[0].envelope.payload[..], b"after the wipe");
    b.ack(&[got[0].receipt.clone()]).await?;
    assert_eq!(b.depth(&q).await?.in_flight, 0);
    Ok(())
}

/// What a plain client sees of a published job: one field whose value is the body. Entries in
/// the earlier header-per-field layout (left in a stream across an upgrade) are read with their
/// id, job and attempt; a released entry and a delayed one keep the envelope whole.
#[tokio::test]
async fn entries_hold_one_field_and_the_earlier_layout_still_reads() -> Result<(), BrokerError> {
    let guard = Cleanup::machine("layout");
    let q = "layout".to_string();
    let stream = format!("{}{q}", guard.prefix);
    let b = RedisBroker::connect(guard.config()).await?;
    b.prepare(std::slice::from_ref(&q)).await?;
    let mut env = Envelope::new("send", &br#"{"to":"a@b"}"#[..]).with_header("x-tenant", "4 2&=");
    env.key = Some("k 1".into());
    b.publish(&q, vec![env.clone()]).await?;

    let mut c = redis::Client::open(guard.url.as_str())
        .and_then(|c| c.get_connection())
        .expect("redis");
    type Fields = Vec<(Vec<u8>, Vec<u8>)>;
    let raw: Vec<(String, Fields)> = redis::cmd("XRANGE")
        .arg(&stream)
        .arg("-")
        .arg("+")
        .query(&mut c)
        .expect("XRANGE");
    assert_eq!(raw.len(), 1);
    let fields = &raw[0].1;
    assert_eq!(fields.len(), 1, "one field per entry");
    assert_eq!(fields[0].1, br#"{"to":"a@b"}"#, "its value is the body");
    let name = String::from_utf8_lossy(&fields[0].0);
    assert!(name.starts_with("stevedore/1 "), "{name}");
    assert!(name.contains(&env.id), "{name}");

    // An entry as the earlier layout wrote it.
    let _: String = redis::cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg("payload")
        .arg("{}")
        .arg("stevedore-id")
        .arg("old-1")
        .arg("stevedore-job")
        .arg("legacy")
        .arg("stevedore-attempt")
        .arg("2")
        .query(&mut c)
        .expect("XADD");

    let got = b.receive(&q, opts(10, Duration::from_secs(30))).await?;
    assert_eq!(got.len(), 2);
    let new = &got[0].envelope;
    assert_eq!(
        (new.id.as_str(), new.job.as_deref(), new.key.as_deref()),
        (env.id.as_str(), Some("send"), Some("k 1"))
    );
    assert_eq!(
        new.headers.get("x-tenant").map(String::as_str),
        Some("4 2&=")
    );
    assert_eq!(&new.payload[..], br#"{"to":"a@b"}"#);
    let old = &got[1].envelope;
    assert_eq!(
        (old.id.as_str(), old.job.as_deref(), old.attempt),
        ("old-1", Some("legacy"), 2)
    );

    // Released: re-added with its count, the envelope unchanged.
    b.release(&[got[0].receipt.clone()]).await?;
    b.ack(&[got[1].receipt.clone()]).await?;
    let again = b.receive(&q, opts(10, Duration::from_secs(30))).await?;
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].envelope.id, env.id);
    assert_eq!(again[0].envelope.job.as_deref(), Some("send"));
    assert_eq!(again[0].delivery_count, 2);
    b.ack(&[again[0].receipt.clone()]).await?;

    // Delayed through the delay store, then promoted: the same envelope.
    let store = b.delay_store().expect("redis has a delay store");
    let mut later = env.clone();
    later.id = "delayed-1".into();
    later.not_before = Some(std::time::SystemTime::now());
    store.schedule(&q, vec![later]).await?;
    store
        .promote_due(std::time::SystemTime::now() + Duration::from_secs(1), 10)
        .await?;
    let promoted = b.receive(&q, opts(10, Duration::from_secs(30))).await?;
    assert_eq!(promoted.len(), 1);
    assert_eq!(promoted[0].envelope.id, "delayed-1");
    assert_eq!(promoted[0].envelope.job.as_deref(), Some("send"));
    assert_eq!(&promoted[0].envelope.payload[..], br#"{"to":"a@b"}"#);
    b.ack(&[promoted[0].receipt.clone()]).await?;
    Ok(())
}

/// Delayed jobs written by a version before the per-queue delay sets (one global sorted set,
/// `<prefix>stevedore:delayed`, a counting set per queue and a hash per message naming its
/// stream) are counted and promoted by this version, so an upgrade loses no delayed job or
/// retry in its backoff; the old keys are gone once they are empty.
#[tokio::test]
async fn delayed_jobs_of_the_earlier_layout_are_still_promoted() -> Result<(), BrokerError> {
    let guard = Cleanup::machine("legacy-delay");
    let (p, q) = (guard.prefix.clone(), "legacy".to_string());
    let stream = format!("{p}{q}");
    let mut c = redis::Client::open(guard.url.as_str())
        .and_then(|c| c.get_connection())
        .expect("redis");
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    // Two due already, one due in an hour: as the earlier version's schedule wrote them.
    for (member, due) in [
        ("a:1", now_ms - 10),
        ("b:1", now_ms - 5),
        ("c:1", now_ms + 3_600_000),
    ] {
        let _: () = redis::cmd("HSET")
            .arg(format!("{p}stevedore:delayed:m:{member}"))
            .arg("_stream")
            .arg(&stream)
            .arg("_queue")
            .arg(&q)
            .arg("payload")
            .arg(format!("job {member}"))
            .query(&mut c)
            .expect("HSET");
        let _: () = redis::cmd("ZADD")
            .arg(format!("{p}stevedore:delayed"))
            .arg(due)
            .arg(member)
            .query(&mut c)
            .expect("ZADD");
        let _: () = redis::cmd("ZADD")
            .arg(format!("{p}stevedore:delayed:q:{q}"))
            .arg(due)
            .arg(member)
            .query(&mut c)
            .expect("ZADD");
    }
    let b = RedisBroker::connect(guard.config()).await?;
    b.prepare(std::slice::from_ref(&q)).await?;
    let store = b.delay_store().expect("redis has a delay store");
    assert_eq!(
        store.delayed(&q).await?,
        3,
        "the old layout's jobs are counted"
    );
    assert_eq!(b.depth(&q).await?.delayed, Some(3));
    assert_eq!(
        store.promote_due(std::time::SystemTime::now(), 100).await?,
        2
    );
    let mut got = Vec::new();
    while got.len() < 2 {
        let batch = b.receive(&q, opts(10, Duration::from_secs(30))).await?;
        assert!(!batch.is_empty(), "promoted jobs must arrive");
        got.extend(batch);
    }
    let mut bodies: Vec<String> = got
        .iter()
        .map(|d| String::from_utf8_lossy(&d.envelope.payload).into_owned())
        .collect();
    bodies.sort();
    assert_eq!(bodies, ["job a:1", "job b:1"]);
    assert_eq!(store.delayed(&q).await?, 1, "the one not due yet waits");
    let next = store.next_due().await?.expect("the next due time is known");
    let in_an_hour = std::time::SystemTime::now() + Duration::from_secs(3600);
    let off = in_an_hour
        .duration_since(next)
        .unwrap_or_else(|e| e.duration());
    assert!(
        off < Duration::from_secs(5),
        "next due {next:?}, not in an hour"
    );
    // Promoted again later: nothing moves twice.
    assert_eq!(
        store.promote_due(std::time::SystemTime::now(), 100).await?,
        0
    );
    let acks: Vec<_> = got.iter().map(|d| d.receipt.clone()).collect();
    b.ack(&acks).await?;
    Ok(())
}

/// The delay index: a queue whose delay set is broken (a key of the wrong type) is logged and
/// put off for 5 s, and another queue's due message still moves; once every delayed message
/// moved, that queue leaves the index.
#[tokio::test]
async fn one_broken_delay_set_does_not_stop_the_others() -> Result<(), BrokerError> {
    let guard = Cleanup::machine("delay-index");
    let p = guard.prefix.clone();
    let b = RedisBroker::connect(guard.config()).await?;
    let good = "good".to_string();
    b.prepare(std::slice::from_ref(&good)).await?;
    let store = b.delay_store().expect("redis has a delay store");
    store
        .schedule(
            &good,
            vec![Envelope::new("j", "due soon").delayed(Duration::from_millis(20))],
        )
        .await?;
    let mut c = redis::Client::open(guard.url.as_str())
        .and_then(|c| c.get_connection())
        .expect("redis");
    // Queue "broken": in the index, but its delay set is a string.
    let _: () = redis::cmd("SET")
        .arg(format!("{p}stevedore:due:{{{p}broken}}"))
        .arg("not a sorted set")
        .query(&mut c)
        .expect("SET");
    let _: () = redis::cmd("ZADD")
        .arg(format!("{p}stevedore:due-index"))
        .arg(0)
        .arg("broken")
        .query(&mut c)
        .expect("ZADD");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        store.promote_due(std::time::SystemTime::now(), 100).await?,
        1,
        "the good queue's message moves despite the broken one"
    );
    let got = b.receive(&good, opts(10, Duration::from_secs(30))).await?;
    assert_eq!(got.len(), 1);
    assert_eq!(&got[0].envelope.payload[..], b"due soon");
    b.ack(&[got[0].receipt.clone()]).await?;
    let indexed: Vec<String> = redis::cmd("ZRANGE")
        .arg(format!("{p}stevedore:due-index"))
        .arg(0)
        .arg(-1)
        .query(&mut c)
        .expect("ZRANGE");
    assert_eq!(indexed, ["broken"], "the emptied queue left the index");
    // The broken queue waits 5 s before it is tried again: the promoter does not keep at it.
    let score: f64 = redis::cmd("ZSCORE")
        .arg(format!("{p}stevedore:due-index"))
        .arg("broken")
        .query(&mut c)
        .expect("ZSCORE");
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as f64;
    assert!(score > now_ms + 3000.0, "score {score} vs now {now_ms}");
    assert_eq!(
        store.promote_due(std::time::SystemTime::now(), 100).await?,
        0
    );
    Ok(())
}
