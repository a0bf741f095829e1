//! Throughput of no-op jobs through the Stevedore runtime next to a raw client loop on the same
//! broker doing the same at-least-once work, measured in one run, for several backlog sizes; plus
//! the idle RSS of a real worker process.
//!
//! ```text
//! cargo run --release -p stevedore-examples --bin bench -- memory 10000,100000,1000000
//! cargo run --release -p stevedore-examples --bin bench -- redis 10000,100000,1000000   # REDIS_URL, default 127.0.0.1:6379
//! cargo run --release -p stevedore-examples --bin bench -- rabbitmq 10000,100000        # RABBITMQ_URL, default 127.0.0.1:5672
//! cargo run --release -p stevedore-examples --bin bench -- sqlite 10000,100000,1000000  # files in $TMPDIR, both durability settings
//! cargo run --release -p stevedore-examples --bin bench -- sqs 500,2000                 # SQS_ENDPOINT, default http://127.0.0.1:9324 (moto_server)
//! cargo run --release -p stevedore-examples --bin bench -- kafka 10000,100000           # KAFKA_BOOTSTRAP, default 127.0.0.1:9092 (e.g. nisshi)
//! ```
//!
//! sqlite's raw loop is the best a hand-written rusqlite client does for the same durable work on
//! one connection: each `BEGIN IMMEDIATE` transaction deletes the previous batch (the ack) and
//! claims the next 100 with the same `UPDATE … RETURNING` over the same partial index, so one
//! commit (one fsync with `synchronous=FULL`) serves 100 jobs. Both start from the same file
//! state: the backlog written through the backend, the store closed, the file opened afresh.
//!
//! Raw loops: memory — `receive(100)` + `ack(batch)`; redis — the best redis-crate loop: entries
//! of one `payload` field, `XREADGROUP COUNT 100` with the previous batch's `XACK` pipelined into
//! the same round trip, on one connection; rabbitmq — lapin on a durable quorum queue (what the backend
//! declares): publish persistent messages with confirms (1000 in flight), then consume with
//! prefetch 500 and one `multiple` ack per 100 deliveries (one frame per message made the
//! reference weak); sqs — `ReceiveMessage` of 10 and one
//! `DeleteMessageBatch`, the best of 1, 2 and 4 such loops at once on one client; kafka — one
//! rdkafka group member polling the topic, storing each done record's offset for librdkafka's
//! commit every 200 ms. Stevedore: a worker with one queue, batch 100, a
//! no-op handler, counting until every job is processed (rabbitmq: prefetch 500 too, and the
//! publish rate of the backlog through `Broker::publish` next to the raw one). kafka, redis and
//! rabbitmq run that worker as a process of its own (`bench --worker kafka QUEUE N`, the real
//! deployment); kafka and redis print its peak RSS. The worker runs under the subscriber `App` installs (fmt
//! at info, no colours), its lines discarded. `BENCH_KAFKA_PROPERTIES=name=value,...` adds
//! librdkafka properties to the backend's clients (not the raw loop's), to try tunings such as a
//! smaller prefetch. `BENCH_BACKEND_LOOP=1` (redis, kafka) also drains a backlog with the
//! backend alone in a process of its own (`receive(100)` beside the previous batch's `ack`, no
//! runtime) and prints its rate beside the raw loop's and the worker's: where a gap lies.
//! Built with `--no-default-features --features count-allocs`, it also prints the heap
//! allocations per job of the worker (and of the backend loop alone): rates are then not
//! comparable, the counts are.

use std::sync::Arc;
use std::time::{Duration, Instant};
use stevedore::core::ReceiveOptions;
use stevedore::{config, Broker, Envelope, MemoryBroker, Router, Worker};
use stevedore_redis::{RedisBroker, RedisConfig};

/// Heap allocations so far, in a `count-allocs` build (see the feature in `Cargo.toml`).
#[cfg(feature = "count-allocs")]
mod counting {
    use stats_alloc::{StatsAlloc, INSTRUMENTED_SYSTEM};

    #[global_allocator]
    static GLOBAL: &StatsAlloc<std::alloc::System> = &INSTRUMENTED_SYSTEM;

    /// Allocations and reallocations so far.
    pub(crate) fn allocs() -> Option<u64> {
        let s = GLOBAL.stats();
        Some((s.allocations + s.reallocations) as u64)
    }
}

#[cfg(not(feature = "count-allocs"))]
mod counting {
    pub(crate) fn allocs() -> Option<u64> {
        None
    }
}

/// Allocations per job measured in this size's runs (a `count-allocs` build): by the worker, and
/// by the backend loop alone; the worker processes report theirs on their last line.
static ALLOCS_PER_JOB: std::sync::Mutex<(Vec<f64>, Vec<f64>)> =
    std::sync::Mutex::new((Vec::new(), Vec::new()));

/// Records the allocations per job since `before` (a [`counting::allocs`] reading) over `n` jobs,
/// as the worker's (`backend == false`) or the backend loop's; returns them.
fn record_allocs(before: Option<u64>, n: usize, backend: bool) -> Option<f64> {
    let per_job = (counting::allocs()? - before?) as f64 / n.max(1) as f64;
    push_allocs(per_job, backend);
    Some(per_job)
}

fn push_allocs(per_job: f64, backend: bool) {
    if let Ok(mut a) = ALLOCS_PER_JOB.lock() {
        if backend { &mut a.1 } else { &mut a.0 }.push(per_job);
    }
}

/// Each size runs this many times, raw and Stevedore alternating, and reports the medians (the
/// ratio's spread over rounds shows how noisy the machine was).
const ROUNDS: usize = 3;
const BATCH: usize = 100;
/// Every job's body in every loop: 24 bytes of JSON.
const BODY: &[u8] = br#"{"n":1,"to":"a@b.c.dee"}"#;
type Res<T> = Result<T, Box<dyn std::error::Error>>;

async fn fill(broker: &dyn Broker, queue: &str, n: usize) -> Res<()> {
    let mut left = n;
    while left > 0 {
        let k = left.min(1000);
        let batch = (0..k).map(|_| Envelope::new("noop", BODY)).collect();
        broker.publish(queue, batch).await?;
        left -= k;
    }
    Ok(())
}

async fn raw_memory(n: usize) -> Res<f64> {
    let broker = MemoryBroker::new();
    fill(&broker, "raw", n).await?;
    let opts = ReceiveOptions {
        max: BATCH,
        wait: Duration::ZERO,
        lease: Duration::from_secs(30),
    };
    let t = Instant::now();
    let mut done = 0;
    while done < n {
        let got = broker.receive("raw", opts).await?;
        let receipts: Vec<_> = got.into_iter().map(|d| d.receipt).collect();
        broker.ack(&receipts).await?;
        done += receipts.len();
    }
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

/// The best raw redis-crate loop for the same at-least-once work: entries of one field (a
/// 24-byte JSON body, what a hand-written producer writes), `XREADGROUP COUNT 100` with the
/// previous batch's `XACK` pipelined into the same round trip, ids read straight off the reply.
async fn raw_redis(url: &str, n: usize) -> Res<f64> {
    let stream = format!("bench-raw-{}", std::process::id());
    let client = redis::Client::open(url)?;
    let mut c = client.get_multiplexed_async_connection().await?;
    let _: () = redis::cmd("DEL").arg(&stream).query_async(&mut c).await?;
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream)
        .arg("g")
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut c)
        .await?;
    let mut left = n;
    while left > 0 {
        let k = left.min(1000);
        let mut pipe = redis::pipe();
        for _ in 0..k {
            pipe.cmd("XADD")
                .arg(&stream)
                .arg("*")
                .arg("payload")
                .arg(BODY)
                .ignore();
        }
        pipe.query_async::<()>(&mut c).await?;
        left -= k;
    }
    let t = Instant::now();
    let mut done = 0;
    let mut ids: Vec<Vec<u8>> = Vec::new();
    loop {
        let mut pipe = redis::pipe();
        if !ids.is_empty() {
            pipe.cmd("XACK").arg(&stream).arg("g").arg(&ids).ignore();
        }
        pipe.cmd("XREADGROUP")
            .arg("GROUP")
            .arg("g")
            .arg("c")
            .arg("COUNT")
            .arg(BATCH)
            .arg("STREAMS")
            .arg(&stream)
            .arg(">");
        let (reply,): (redis::Value,) = pipe.query_async(&mut c).await?;
        ids = raw_ids(reply);
        if ids.is_empty() {
            break;
        }
        done += ids.len();
    }
    let rate = done as f64 / t.elapsed().as_secs_f64();
    if done < n {
        return Err(format!("raw redis: {done} of {n} entries").into());
    }
    let _: () = redis::cmd("DEL").arg(&stream).query_async(&mut c).await?;
    Ok(rate)
}

/// The entry ids of a one-stream `XREADGROUP` reply (RESP2 or RESP3), moved out of it.
fn raw_ids(reply: redis::Value) -> Vec<Vec<u8>> {
    use redis::Value;
    let entries = match reply {
        Value::Array(streams) => streams.into_iter().next().and_then(|s| match s {
            Value::Array(kv) => kv.into_iter().nth(1),
            _ => None,
        }),
        Value::Map(m) => m.into_iter().next().map(|(_, v)| v),
        _ => None,
    };
    let Some(Value::Array(entries)) = entries else {
        return Vec::new();
    };
    entries
        .into_iter()
        .filter_map(|e| match e {
            Value::Array(parts) => match parts.into_iter().next() {
                Some(Value::BulkString(id)) => Some(id),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

fn rabbitmq_url() -> String {
    std::env::var("RABBITMQ_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// Raw lapin on a quorum queue: (publish msgs/s with confirms, consume msgs/s with prefetch 500 and
/// per-message acks).
async fn raw_rabbitmq(url: &str, n: usize) -> Res<(f64, f64)> {
    use futures::StreamExt;
    use lapin::options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
    };
    use lapin::types::{AMQPValue, FieldTable, LongString};
    let queue = format!("bench-raw-{}-{n}", std::process::id());
    let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    ch.queue_declare(queue.as_str().into(), durable, args)
        .await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let props = lapin::BasicProperties::default().with_delivery_mode(2);
    let t = Instant::now();
    let mut left = n;
    while left > 0 {
        let k = left.min(1000);
        let mut confirms = Vec::with_capacity(k);
        for _ in 0..k {
            confirms.push(
                ch.basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions::default(),
                    b"{}",
                    props.clone(),
                )
                .await?,
            );
        }
        for c in futures::future::join_all(confirms).await {
            if !c?.is_ack() {
                return Err("publish nacked".into());
            }
        }
        left -= k;
    }
    let publish = n as f64 / t.elapsed().as_secs_f64();
    let cc = conn.create_channel().await?;
    cc.basic_qos(500, BasicQosOptions::default()).await?;
    let mut consumer = cc
        .basic_consume(
            queue.as_str().into(),
            "bench".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    // Acks as a hand-written consumer does them best: one `multiple` ack for each run of 100
    // deliveries (what the prefetch window refills from), not one frame per message.
    let multiple = BasicAckOptions { multiple: true };
    let mut t = None;
    for i in 1..=n {
        let d = consumer.next().await.ok_or("consumer ended")??;
        t.get_or_insert_with(Instant::now);
        if i % 100 == 0 || i == n {
            d.acker.ack(multiple).await?;
        }
    }
    let consume = n as f64 / t.map_or(f64::MIN_POSITIVE, |t: Instant| t.elapsed().as_secs_f64());
    ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await?;
    let _ = conn.close(200, "bench done".into()).await;
    Ok((publish, consume))
}

/// The RabbitMQ backend under `prefix`, with a prefetch of 500 on `queue` (the raw loop's).
async fn rabbit_broker(url: &str, prefix: &str, queue: &str) -> Res<Arc<dyn Broker>> {
    let mut cfg = stevedore_rabbitmq::RabbitConfig::new(url);
    cfg.key_prefix = prefix.to_string();
    cfg.prefetch.insert(queue.to_string(), 500);
    Ok(Arc::new(
        stevedore_rabbitmq::RabbitBroker::connect(cfg).await?,
    ))
}

/// Stevedore on RabbitMQ: (publish msgs/s through `Broker::publish`, worker msgs/s).
async fn through_rabbitmq(url: &str, n: usize) -> Res<(f64, f64)> {
    let queue = format!("bench-{}-{n}", std::process::id());
    let prefix = format!("bench-{}.", std::process::id());
    let broker = rabbit_broker(url, &prefix, &queue).await?;
    // The worker as a process of its own, as deployed (and the backend alone beside it, with
    // BENCH_BACKEND_LOOP=1, on a second backlog).
    let (consume, _, publish) =
        through_process(broker, "rabbitmq", &queue, n, &[prefix.as_str()]).await?;
    if backend_loop_wanted() {
        let broker = rabbit_broker(url, &prefix, &queue).await?;
        let (b, _, _) =
            through_process(broker, "rabbitmq", &queue, n, &[prefix.as_str(), "--loop"]).await?;
        println!("{n:>10} backend loop alone (RabbitMQ) {b:.0}/s");
    }
    // Every job was acked, not just run: once the worker closed its connection (returning anything
    // unacked), nothing is left in the queue. Then delete it and its delay router with a plain
    // client (the trait has no delete).
    let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    let passive = lapin::options::QueueDeclareOptions {
        passive: true,
        ..lapin::options::QueueDeclareOptions::default()
    };
    let left = ch
        .queue_declare(
            format!("{prefix}{queue}").as_str().into(),
            passive,
            Default::default(),
        )
        .await?
        .message_count();
    if left != 0 {
        return Err(format!("{queue} not drained after the run: {left} left").into());
    }
    let _ = conn.close(200, "bench done".into()).await;
    delete_rabbitmq_queues(url, &prefix, &[queue.clone(), format!("{queue}__dlq")]).await?;
    Ok((publish, consume))
}

/// Deletes queues `names` under `prefix` (the worker prepares the dead-letter queue too) and the
/// prefix's shared delay topology.
async fn delete_rabbitmq_queues(url: &str, prefix: &str, names: &[String]) -> Res<()> {
    let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    let (shared, exchanges) = stevedore_rabbitmq::delay::topology(prefix);
    let queues = names.iter().map(|q| format!("{prefix}{q}")).chain(shared);
    for q in queues {
        ch.queue_delete(
            q.as_str().into(),
            lapin::options::QueueDeleteOptions::default(),
        )
        .await?;
    }
    for x in exchanges {
        ch.exchange_delete(x.as_str().into(), Default::default())
            .await?;
    }
    let _ = conn.close(200, "bench done".into()).await;
    Ok(())
}

/// A fresh store file for the bench, removed (with its WAL) by [`remove_store`].
fn store_path(tag: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("stevedore-bench-{}-{tag}.db", std::process::id()))
}

fn remove_store(path: &std::path::Path) {
    for suffix in ["", "-wal", "-shm"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        let _ = std::fs::remove_file(p);
    }
}

async fn open_sqlite(path: &std::path::Path, durability: &str) -> Res<Arc<dyn Broker>> {
    let mut cfg = stevedore_sqlite::SqliteConfig::new(path);
    cfg.durability = match durability {
        "normal" => stevedore_sqlite::Durability::Normal,
        _ => stevedore_sqlite::Durability::Full,
    };
    Ok(Arc::new(stevedore_sqlite::SqliteBroker::open(cfg).await?))
}

/// A fresh store at `path` with `n` jobs in `queue`, written through the backend and closed, so
/// the loop measured next opens the file afresh (as a worker process does, apart from its
/// producers).
async fn fill_store(path: &std::path::Path, durability: &str, queue: &str, n: usize) -> Res<()> {
    remove_store(path);
    let producer = open_sqlite(path, durability).await?;
    fill(producer.as_ref(), queue, n).await?;
    producer.close().await?;
    Ok(())
}

/// The raw rusqlite loop (see the module docs), on a backlog written by the backend itself so
/// both loops read the same rows.
async fn raw_sqlite(durability: &str, n: usize) -> Res<f64> {
    let path = store_path(&format!("raw-{durability}-{n}"));
    fill_store(&path, durability, "raw", n).await?;
    let sync = if durability == "normal" {
        "NORMAL"
    } else {
        "FULL"
    };
    let p = path.clone();
    let rate = tokio::task::spawn_blocking(move || -> Result<f64, rusqlite::Error> {
        let mut c = rusqlite::Connection::open(&p)?;
        c.busy_timeout(Duration::from_secs(5))?;
        let _: String = c.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        c.pragma_update(None, "synchronous", sync)?;
        let t = Instant::now();
        let mut done = 0usize;
        let mut held: Vec<i64> = Vec::new();
        let mut token = 0i64;
        loop {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            {
                let mut del = tx.prepare_cached(
                    "DELETE FROM stevedore_jobs WHERE id = ?1 AND lease_token = ?2",
                )?;
                for id in &held {
                    del.execute(rusqlite::params![id, token])?;
                }
            }
            done += held.len();
            token += 1;
            let now = i64::try_from(stevedore::core::to_millis(std::time::SystemTime::now()))
                .unwrap_or(i64::MAX);
            held = {
                let mut claim = tx.prepare_cached(
                    "UPDATE stevedore_jobs
                     SET lease_until = ?3, lease_token = ?4, deliveries = deliveries + 1
                     WHERE id IN (
                         SELECT id FROM stevedore_jobs
                         WHERE queue = ?1 AND lease_until IS NULL AND run_at <= ?2
                         ORDER BY run_at, id LIMIT 100)
                     RETURNING id, headers, body",
                )?;
                let rows =
                    claim.query_map(rusqlite::params!["raw", now, now + 30_000, token], |r| {
                        // Read what a consumer reads: the headers and the body.
                        let _: String = r.get(1)?;
                        let _: Vec<u8> = r.get(2)?;
                        r.get::<_, i64>(0)
                    })?;
                rows.collect::<Result<Vec<_>, _>>()?
            };
            tx.commit()?;
            if held.is_empty() {
                break;
            }
        }
        Ok(done as f64 / t.elapsed().as_secs_f64())
    })
    .await??;
    remove_store(&path);
    if rate.is_nan() {
        return Err("raw sqlite loop processed nothing".into());
    }
    Ok(rate)
}

async fn noop() {}

async fn through_runtime(broker: Arc<dyn Broker>, queue: &str, n: usize) -> Res<f64> {
    broker.prepare(&[queue.to_string()]).await?;
    fill(broker.as_ref(), queue, n).await?;
    work(broker, queue, n).await
}

/// A backlog of `n` no-op jobs in `queue`, written through `broker`, which is then closed; then
/// a worker process of its own ([`worker_process`]) drains it. Returns jobs/s, the worker's
/// peak RSS in KiB, and the rate the backlog was published at (`Broker::publish` of 1000 at a
/// time).
async fn through_process(
    broker: Arc<dyn Broker>,
    backend: &str,
    queue: &str,
    n: usize,
    extra: &[&str],
) -> Res<(f64, u64, f64)> {
    broker.prepare(&[queue.to_string()]).await?;
    let t = Instant::now();
    fill(broker.as_ref(), queue, n).await?;
    let published = n as f64 / t.elapsed().as_secs_f64();
    broker.close().await?;
    drop(broker);
    let (rate, hwm) = worker_process(backend, queue, n, extra).await?;
    Ok((rate, hwm, published))
}

/// Runs `bench --worker BACKEND QUEUE N [EXTRA..]` (the real deployment: the worker as a process
/// of its own, not sharing the bench's) and reads its rate and peak RSS from its last line.
async fn worker_process(backend: &str, queue: &str, n: usize, extra: &[&str]) -> Res<(f64, u64)> {
    let exe = std::env::current_exe()?;
    let out = tokio::process::Command::new(exe)
        .arg("--worker")
        .args([backend, queue, &n.to_string()])
        .args(extra)
        .stderr(std::process::Stdio::inherit())
        .output()
        .await?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().unwrap_or_default();
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .and_then(|v| v.parse::<f64>().ok())
    };
    if let Some(a) = field("allocs_per_job=") {
        push_allocs(a, extra.contains(&"--loop"));
    }
    match (out.status.success(), field("rate="), field("hwm_kib=")) {
        (true, Some(rate), Some(hwm)) => Ok((rate, hwm as u64)),
        _ => Err(format!("the worker process failed ({}): {text}", out.status).into()),
    }
}

/// The `--worker` mode: connects to the backend, drains `n` jobs of `queue` with [`work`], and
/// prints `rate=<jobs/s> hwm_kib=<peak RSS>`.
async fn worker_main(mut args: impl Iterator<Item = String>) -> Res<()> {
    let usage =
        "bench --worker BACKEND QUEUE N [SQLITE_PATH DURABILITY | RABBITMQ_PREFIX] [--loop]";
    let (Some(backend), Some(queue), Some(n)) = (args.next(), args.next(), args.next()) else {
        return Err(usage.into());
    };
    let n: usize = n.parse().map_err(|_| usage)?;
    let broker: Arc<dyn Broker> = match backend.as_str() {
        "kafka" => kafka_broker(&kafka_bootstrap()).await?,
        "redis" => redis_broker(&redis_url()).await?,
        "sqs" => sqs_broker(&sqs_endpoint()).await?,
        "rabbitmq" => {
            let prefix = args.next().ok_or(usage)?;
            rabbit_broker(&rabbitmq_url(), &prefix, &queue).await?
        }
        "sqlite" => {
            let (Some(path), Some(durability)) = (args.next(), args.next()) else {
                return Err(usage.into());
            };
            open_sqlite(std::path::Path::new(&path), &durability).await?
        }
        other => return Err(format!("--worker: no worker process for {other:?}").into()),
    };
    let alone = args.any(|a| a == "--loop");
    let rate = if alone {
        backend_loop(broker, &queue, n).await?
    } else {
        work(broker, &queue, n).await?
    };
    let allocs = ALLOCS_PER_JOB
        .lock()
        .ok()
        .and_then(|a| if alone { &a.1 } else { &a.0 }.last().copied())
        .map(|a| format!(" allocs_per_job={a}"))
        .unwrap_or_default();
    let hwm = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0);
    println!("rate={rate} hwm_kib={hwm}{allocs}");
    Ok(())
}

/// The backend without the runtime (`BENCH_BACKEND_LOOP=1`): `receive(100)` and the previous
/// batch's `ack` at once, in one task, until `n` messages are settled; returns messages/s. What
/// the backend itself costs beside the raw loop, so that a gap can be placed in the backend or
/// in the runtime (task, span, dispatch and stats per job).
async fn backend_loop(broker: Arc<dyn Broker>, queue: &str, n: usize) -> Res<f64> {
    broker.prepare(&[queue.to_string()]).await?;
    let opts = ReceiveOptions {
        max: broker.capabilities().max_batch.min(BATCH),
        wait: Duration::from_millis(100),
        lease: Duration::from_secs(60),
    };
    let mut t = None;
    let mut before = None;
    let mut done = 0;
    let mut pending: Vec<stevedore::core::Receipt> = Vec::new();
    let give_up = Instant::now() + Duration::from_secs(300);
    while done < n {
        if Instant::now() > give_up {
            return Err(format!("backend loop: {done} of {n} messages in 300 s").into());
        }
        let acks = std::mem::take(&mut pending);
        let (got, acked) = tokio::join!(broker.receive(queue, opts), async {
            if acks.is_empty() {
                Ok(())
            } else {
                broker.ack(&acks).await
            }
        });
        acked?;
        let got = got?;
        if !got.is_empty() && t.is_none() {
            t = Some(Instant::now());
            before = counting::allocs();
        }
        done += got.len();
        pending = got.into_iter().map(|d| d.receipt).collect();
    }
    broker.ack(&pending).await?;
    let rate = n as f64 / t.map_or(f64::MIN_POSITIVE, |t: Instant| t.elapsed().as_secs_f64());
    record_allocs(before, n, true);
    broker.close().await?;
    Ok(rate)
}

/// Runs a worker over a backlog of `n` no-op jobs already in `queue`; returns jobs/s.
async fn work(broker: Arc<dyn Broker>, queue: &str, n: usize) -> Res<f64> {
    let batch = broker.capabilities().max_batch.min(BATCH);
    let cfg = config::from_toml_str(
        &format!("[http]\nenabled = false\n[worker]\nconcurrency = 512\n[queues.{queue}]\nconcurrency = 512\nbatch = {batch}\n"),
        None,
    )?;
    let worker = Worker::new(broker, Router::new().route("noop", noop), cfg)?;
    let stats = worker.stats();
    let stop = worker.shutdown_handle();
    let run = tokio::spawn(worker.run());
    // The raw loop has no start-up; time the worker from when it reports ready.
    while !stats.is_ready() {
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    let t = Instant::now();
    let before = counting::allocs();
    loop {
        let done = stats
            .snapshot()
            .get(queue)
            .map(|s| s.processed)
            .unwrap_or(0);
        if done as usize >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let rate = n as f64 / t.elapsed().as_secs_f64();
    record_allocs(before, n, false);
    stop.shutdown();
    run.await??;
    Ok(rate)
}

fn sqs_endpoint() -> String {
    std::env::var("SQS_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:9324".into())
}

async fn sqs_broker(endpoint: &str) -> Res<Arc<dyn Broker>> {
    let mut cfg = stevedore_sqs::SqsConfig::new(
        "us-east-1",
        stevedore_sqs::SqsCredentials::Static {
            access_key_id: "testing".into(),
            secret_access_key: "testing".into(),
            session_token: None,
        },
    );
    cfg.endpoint = Some(endpoint.to_string());
    Ok(Arc::new(stevedore_sqs::SqsBroker::connect(cfg).await?))
}

/// A plain aws-sdk-sqs client on `endpoint` with explicit region and static credentials.
async fn raw_sqs_client(endpoint: &str) -> aws_sdk_sqs::Client {
    let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .credentials_provider(aws_credential_types::Credentials::new(
            "testing", "testing", None, None, "bench",
        ))
        .load()
        .await;
    aws_sdk_sqs::Client::new(&sdk)
}

/// The raw aws-sdk-sqs loop: `loops` concurrent tasks on one client, each a `ReceiveMessage` of
/// 10 (long poll) then one `DeleteMessageBatch` of what came, over a backlog written through the
/// backend. Timed until the last delete of the `n`th message returns. The bench runs it with 1, 2
/// and 4 loops and takes the best as the reference: a hand-written client keeps several calls in
/// flight, as the worker does (two receives and its acker).
async fn raw_sqs(endpoint: &str, n: usize, loops: usize) -> Res<f64> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let queue = format!("bench-raw-{}-{n}-{loops}", std::process::id());
    let broker = sqs_broker(endpoint).await?;
    broker.prepare(std::slice::from_ref(&queue)).await?;
    fill(broker.as_ref(), &queue, n).await?;
    let c = raw_sqs_client(endpoint).await;
    let url = c
        .get_queue_url()
        .queue_name(&queue)
        .send()
        .await?
        .queue_url
        .unwrap_or_default();
    let done = Arc::new(AtomicUsize::new(0));
    let t = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..loops {
        let (c, url, done) = (c.clone(), url.clone(), done.clone());
        tasks.spawn(async move {
            let mut finished_at = None;
            while done.load(Ordering::Relaxed) < n {
                let got = c
                    .receive_message()
                    .queue_url(&url)
                    .max_number_of_messages(10)
                    .wait_time_seconds(1)
                    .visibility_timeout(60)
                    .send()
                    .await?
                    .messages
                    .unwrap_or_default();
                if got.is_empty() {
                    continue;
                }
                let entries = got
                    .iter()
                    .enumerate()
                    .map(|(i, m)| {
                        aws_sdk_sqs::types::DeleteMessageBatchRequestEntry::builder()
                            .id(i.to_string())
                            .receipt_handle(m.receipt_handle().unwrap_or_default())
                            .build()
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                c.delete_message_batch()
                    .queue_url(&url)
                    .set_entries(Some(entries))
                    .send()
                    .await?;
                if done.fetch_add(got.len(), Ordering::Relaxed) + got.len() >= n {
                    finished_at = Some(t.elapsed());
                }
            }
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(finished_at)
        });
    }
    let mut took = None;
    while let Some(r) = tasks.join_next().await {
        if let Some(at) = r?.map_err(|e| e.to_string())? {
            took = Some(at);
        }
    }
    let took = took.ok_or("the raw SQS loops ended without draining the queue")?;
    c.delete_queue().queue_url(&url).send().await?;
    Ok(n as f64 / took.as_secs_f64())
}

fn kafka_bootstrap() -> String {
    std::env::var("KAFKA_BOOTSTRAP").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

async fn kafka_broker(bootstrap: &str) -> Res<Arc<dyn Broker>> {
    let mut c = stevedore_kafka::KafkaConfig::new(bootstrap);
    c.partitions = 4;
    // Tuning to try (`name=value,...`), e.g. BENCH_KAFKA_PROPERTIES=queued.min.messages=2000
    if let Ok(props) = std::env::var("BENCH_KAFKA_PROPERTIES") {
        for kv in props.split(',').filter(|kv| !kv.is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .ok_or("BENCH_KAFKA_PROPERTIES: name=value,...")?;
            c.properties.insert(k.to_string(), v.to_string());
        }
    }
    Ok(Arc::new(stevedore_kafka::KafkaBroker::connect(c).await?))
}

/// The raw rdkafka loop, as a hand-written at-least-once consumer does it best: one group member
/// polling the topic (4 partitions, the backlog written through the backend), storing each
/// record's offset once it is done (`enable.auto.offset.store = false`, `store_offset`) and
/// letting librdkafka commit what is stored every 200 ms in the background (the interval at
/// which the backend commits), then once at the end. Committing every 100 records instead, as
/// this loop did before, spends the broker's CPU on commits and made it 1.5x slower than the
/// backend alone. Timed from the first record, as the worker is timed from when it is ready
/// (both after their group join).
async fn raw_kafka(bootstrap: &str, n: usize) -> Res<f64> {
    use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
    let topic = format!("bench-raw-{}-{n}", std::process::id());
    let broker = kafka_broker(bootstrap).await?;
    broker.prepare(std::slice::from_ref(&topic)).await?;
    fill(broker.as_ref(), &topic, n).await?;
    broker.close().await?;
    let bootstrap = bootstrap.to_string();
    let t2 = topic.clone();
    let rate = tokio::task::spawn_blocking(move || -> Result<f64, String> {
        let c: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", &t2)
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "200")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .create()
            .map_err(|e| e.to_string())?;
        c.subscribe(&[&t2]).map_err(|e| e.to_string())?;
        let mut t = None;
        let mut done = 0;
        let give_up = Instant::now() + Duration::from_secs(120);
        while done < n {
            if Instant::now() > give_up {
                return Err(format!("raw kafka: {done} of {n} records in 120 s"));
            }
            match c.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    t.get_or_insert_with(Instant::now);
                    done += 1;
                    c.store_offset_from_message(&m).map_err(|e| e.to_string())?;
                }
                Some(Err(e)) => return Err(e.to_string()),
                None => {}
            }
        }
        c.commit_consumer_state(CommitMode::Sync)
            .map_err(|e| e.to_string())?;
        Ok(n as f64 / t.map_or(f64::MIN_POSITIVE, |t| t.elapsed().as_secs_f64()))
    })
    .await??;
    delete_kafka_topics(&kafka_bootstrap(), &[topic]).await?;
    Ok(rate)
}

/// Deletes each queue's topic, its dead letters' and both checkpoint topics.
async fn delete_kafka_topics(bootstrap: &str, queues: &[String]) -> Res<()> {
    use rdkafka::admin::{AdminClient, AdminOptions};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()?;
    let mut names = Vec::new();
    for q in queues {
        for t in [q.clone(), format!("{q}__dlq")] {
            names.push(format!("{t}.state"));
            names.push(t);
        }
    }
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let _ = admin.delete_topics(&refs, &AdminOptions::new()).await?;
    Ok(())
}

async fn delete_sqs_queues(endpoint: &str, names: &[String]) -> Res<()> {
    let c = raw_sqs_client(endpoint).await;
    for name in names {
        if let Ok(out) = c.get_queue_url().queue_name(name).send().await {
            if let Some(url) = out.queue_url {
                c.delete_queue().queue_url(url).send().await?;
            }
        }
    }
    Ok(())
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn idle_rss_kib(backend: &str) -> Option<u64> {
    let exe = std::env::current_exe().ok()?.with_file_name("e2e_worker");
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["run"])
        .env("STEVEDORE_HTTP__ENABLED", "false")
        .env("E2E_OUT", "/dev/null")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // Its own working directory: the default sqlite store is created there.
    let dir = std::env::temp_dir().join(format!("stevedore-bench-idle-{}", std::process::id()));
    std::fs::create_dir_all(&dir).ok()?;
    cmd.current_dir(&dir).env(
        "STEVEDORE_BROKER__KIND",
        if backend == "sqlite" {
            "sqlite"
        } else {
            "memory"
        },
    );
    if backend == "redis" {
        cmd.env("STEVEDORE_BROKER__KIND", "redis")
            .env("STEVEDORE_BROKER__URL", redis_url())
            .env("STEVEDORE_BROKER__KEY_PREFIX", idle_prefix());
    }
    if backend == "rabbitmq" {
        cmd.env("STEVEDORE_BROKER__KIND", "rabbitmq")
            .env("STEVEDORE_BROKER__URL", rabbitmq_url())
            .env("STEVEDORE_BROKER__KEY_PREFIX", idle_prefix());
    }
    if backend == "sqs" {
        cmd.env("STEVEDORE_BROKER__KIND", "sqs")
            .env("STEVEDORE_BROKER__ENDPOINT", sqs_endpoint())
            .env("STEVEDORE_BROKER__REGION", "us-east-1")
            .env("STEVEDORE_BROKER__ACCESS_KEY_ID", "testing")
            .env("STEVEDORE_BROKER__SECRET_ACCESS_KEY", "testing")
            .env(
                "STEVEDORE_BROKER__KEY_PREFIX",
                idle_prefix().replace('.', "-"),
            )
            .env("STEVEDORE_QUEUES__DEFAULT__BATCH", "10")
            .env("AWS_EC2_METADATA_DISABLED", "true");
    }
    if backend == "kafka" {
        cmd.env("STEVEDORE_BROKER__KIND", "kafka")
            .env("STEVEDORE_BROKER__BOOTSTRAP", kafka_bootstrap())
            .env("STEVEDORE_BROKER__KEY_PREFIX", idle_prefix())
            .env("STEVEDORE_RETRY__MAX_ATTEMPTS", "1");
    }
    let mut child = cmd.spawn().ok()?;
    // A Kafka worker joins its groups first (seconds on some brokers).
    std::thread::sleep(Duration::from_secs(if backend == "kafka" { 8 } else { 2 }));
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).ok();
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    status?
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Queue prefix of the idle RabbitMQ worker, so its queues are its own and can be deleted after.
fn idle_prefix() -> String {
    format!("bench-idle-{}.", std::process::id())
}

async fn redis_broker(url: &str) -> Res<Arc<dyn Broker>> {
    Ok(Arc::new(RedisBroker::connect(RedisConfig::new(url)).await?))
}

/// Deletes `queue`'s stream, the dead-letter stream `prepare` made, and its lease hash.
async fn delete_redis_queue(url: &str, queue: &str) -> Res<()> {
    let client = redis::Client::open(url)?;
    let mut c = client.get_multiplexed_async_connection().await?;
    let _: () = redis::cmd("DEL")
        .arg(queue)
        .arg(format!("{queue}__dlq"))
        .arg(format!("stevedore:leases:{{{queue}}}"))
        .query_async(&mut c)
        .await?;
    Ok(())
}

/// `BENCH_BACKEND_LOOP=1`: also measure the backend alone ([`backend_loop`]).
fn backend_loop_wanted() -> bool {
    std::env::var_os("BENCH_BACKEND_LOOP").is_some_and(|v| v == "1")
}

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

#[tokio::main]
async fn main() -> Res<()> {
    // The subscriber a deployed worker binary runs with (`App`'s: fmt at info, no colours when
    // stderr is not a terminal), so each job's span costs what it costs in deployment; its few
    // lines go nowhere.
    let _ = tracing_subscriber::fmt()
        .fmt_fields(stevedore::LogFields)
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .with_target(false)
        .with_ansi(false)
        .with_writer(std::io::sink)
        .try_init();
    let mut args = std::env::args().skip(1).peekable();
    if args.peek().map(String::as_str) == Some("--worker") {
        args.next();
        return worker_main(args).await;
    }
    let backend = args.next().unwrap_or_else(|| "memory".into());
    let sizes: Vec<usize> = args
        .next()
        .unwrap_or_else(|| "10000,100000,1000000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let threads = tokio::runtime::Handle::current().metrics().num_workers();
    let backend_loop_too = backend_loop_wanted();
    println!("backend: {backend}   no-op jobs, one worker process, {threads} runtime threads, release build");
    if backend == "rabbitmq" {
        let url = rabbitmq_url();
        println!(
            "{:>10} {:>16} {:>16} {:>16} {:>16} {:>7}",
            "backlog",
            "raw publish/s",
            "stevedore pub/s",
            "raw consume/s",
            "stevedore jobs/s",
            "ratio"
        );
        // Rounds alternate raw and Stevedore; the row gives the medians, and the spread of the
        // per-round ratios says how noisy the machine was.
        for n in &sizes {
            let mut rounds = Vec::new();
            for _ in 0..ROUNDS {
                let (rp, rc) = raw_rabbitmq(&url, *n).await?;
                let (sp, sc) = through_rabbitmq(&url, *n).await?;
                rounds.push((rp, sp, rc, sc));
            }
            let col = |f: fn(&(f64, f64, f64, f64)) -> f64| {
                median(&rounds.iter().map(f).collect::<Vec<_>>())
            };
            let ratios: Vec<f64> = rounds.iter().map(|r| r.3 / r.2).collect();
            let (lo, hi) = ratios
                .iter()
                .fold((f64::MAX, f64::MIN), |(lo, hi), r| (lo.min(*r), hi.max(*r)));
            let (rc, sc) = (col(|r| r.2), col(|r| r.3));
            println!(
                "{n:>10} {:>16.0} {:>16.0} {rc:>16.0} {sc:>16.0} {:>7.2}   (per-round ratios {lo:.2}–{hi:.2}, {ROUNDS} rounds)",
                col(|r| r.0),
                col(|r| r.1),
                sc / rc
            );
        }
    } else {
        println!(
            "{:>10} {:>14} {:>14} {:>7}",
            "backlog", "raw msgs/s", "stevedore/s", "ratio"
        );
    }
    let settings: &[&str] = if backend == "sqlite" {
        &["full", "normal"]
    } else {
        &[""]
    };
    for (n, durability) in sizes
        .iter()
        .copied()
        .filter(|_| backend != "rabbitmq")
        .flat_map(|n| settings.iter().map(move |d| (n, *d)))
    {
        let mut raws = Vec::new();
        let mut ours = Vec::new();
        let mut best_loops: Vec<usize> = Vec::new();
        // The largest peak RSS of the worker processes of this size (0: ran in-process).
        let mut peak_kib: u64 = 0;
        // The rates the worker's backlog was published at through the backend (process runs).
        let mut publish_rates: Vec<f64> = Vec::new();
        // BENCH_BACKEND_LOOP=1 (redis, kafka): the backend's own loop's rates ([`backend_loop`]).
        let mut backend_rates: Vec<f64> = Vec::new();
        for _ in 0..ROUNDS {
            let (r, s) = match backend.as_str() {
                "sqlite" => {
                    let r = raw_sqlite(durability, n).await?;
                    let path = store_path(&format!("worker-{durability}-{n}"));
                    fill_store(&path, durability, "bench", n).await?;
                    let broker = open_sqlite(&path, durability).await?;
                    let s = work(broker, "bench", n).await?;
                    remove_store(&path);
                    (r, s)
                }
                "memory" => (
                    raw_memory(n).await?,
                    through_runtime(Arc::new(MemoryBroker::new()), "bench", n).await?,
                ),
                "redis" => {
                    let url = redis_url();
                    let r = raw_redis(&url, n).await?;
                    let queue = format!("bench-{}-{n}", std::process::id());
                    let (s, hwm, p) =
                        through_process(redis_broker(&url).await?, "redis", &queue, n, &[]).await?;
                    peak_kib = peak_kib.max(hwm);
                    publish_rates.push(p);
                    delete_redis_queue(&url, &queue).await?;
                    if backend_loop_too {
                        let (b, _, _) = through_process(
                            redis_broker(&url).await?,
                            "redis",
                            &queue,
                            n,
                            &["--loop"],
                        )
                        .await?;
                        backend_rates.push(b);
                        delete_redis_queue(&url, &queue).await?;
                    }
                    (r, s)
                }
                "sqs" => {
                    let endpoint = sqs_endpoint();
                    let mut r: f64 = 0.0;
                    let mut best = 0;
                    for loops in [1, 2, 4] {
                        let rate = raw_sqs(&endpoint, n, loops).await?;
                        if rate > r {
                            (r, best) = (rate, loops);
                        }
                    }
                    best_loops.push(best);
                    let queue = format!("bench-{}-{n}", std::process::id());
                    let s = through_runtime(sqs_broker(&endpoint).await?, &queue, n).await?;
                    delete_sqs_queues(&endpoint, &[queue.clone(), format!("{queue}__dlq")]).await?;
                    (r, s)
                }
                "kafka" => {
                    let bootstrap = kafka_bootstrap();
                    let r = raw_kafka(&bootstrap, n).await?;
                    let queue = format!("bench-{}-{n}-{}", std::process::id(), raws.len());
                    let (s, hwm, p) =
                        through_process(kafka_broker(&bootstrap).await?, "kafka", &queue, n, &[])
                            .await?;
                    peak_kib = peak_kib.max(hwm);
                    publish_rates.push(p);
                    delete_kafka_topics(&bootstrap, std::slice::from_ref(&queue)).await?;
                    if backend_loop_too {
                        let queue = format!("{queue}-loop");
                        let broker = kafka_broker(&bootstrap).await?;
                        let (b, _, _) =
                            through_process(broker, "kafka", &queue, n, &["--loop"]).await?;
                        backend_rates.push(b);
                        delete_kafka_topics(&bootstrap, std::slice::from_ref(&queue)).await?;
                    }
                    (r, s)
                }
                other => {
                    return Err(format!(
                        "unknown backend {other:?}: memory, sqlite, redis, rabbitmq, sqs or kafka"
                    )
                    .into())
                }
            };
            raws.push(r);
            ours.push(s);
        }
        let ratios: Vec<f64> = ours.iter().zip(&raws).map(|(s, r)| s / r).collect();
        let (r, s) = (median(&raws), median(&ours));
        let lo = ratios.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = ratios.iter().copied().fold(0.0, f64::max);
        let mut label = if !durability.is_empty() {
            format!("  durability={durability}")
        } else if !best_loops.is_empty() {
            format!("  raw: best of 1, 2, 4 concurrent loops each round (won: {best_loops:?})")
        } else {
            String::new()
        };
        if !backend_rates.is_empty() {
            let b = median(&backend_rates);
            label.push_str(&format!(
                "  backend loop alone {b:.0}/s: {:.2}x raw, worker {:.2}x of it",
                b / r,
                s / b
            ));
        }
        if let Ok(mut a) = ALLOCS_PER_JOB.lock() {
            if !a.0.is_empty() {
                label.push_str(&format!("  allocations per job: {:.1}", median(&a.0)));
            }
            if !a.1.is_empty() {
                label.push_str(&format!(" (backend loop alone {:.1})", median(&a.1)));
            }
            a.0.clear();
            a.1.clear();
        }
        let peak = if peak_kib > 0 {
            format!(
                ", worker peak RSS {:.1} MiB, backlog published at {:.0}/s",
                peak_kib as f64 / 1024.0,
                median(&publish_rates)
            )
        } else {
            String::new()
        };
        println!("{n:>10} {r:>14.0} {s:>14.0} {:>7.2}   (per-round ratios {lo:.2}–{hi:.2}, {ROUNDS} rounds{peak}){label}", s / r);
    }
    let idle = idle_rss_kib(&backend);
    if backend == "redis" {
        // What the idle worker made, all under its own prefix.
        let client = redis::Client::open(redis_url().as_str())?;
        let mut c = client.get_multiplexed_async_connection().await?;
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}*", idle_prefix()))
            .query_async(&mut c)
            .await?;
        if !keys.is_empty() {
            let _: () = redis::cmd("DEL").arg(&keys).query_async(&mut c).await?;
        }
    }
    if backend == "rabbitmq" {
        delete_rabbitmq_queues(
            &rabbitmq_url(),
            &idle_prefix(),
            &["default".to_string(), "default__dlq".to_string()],
        )
        .await?;
    }
    if backend == "sqs" {
        let p = idle_prefix().replace('.', "-");
        delete_sqs_queues(
            &sqs_endpoint(),
            &[format!("{p}default"), format!("{p}default__dlq")],
        )
        .await?;
    }
    if backend == "kafka" {
        let p = idle_prefix();
        delete_kafka_topics(&kafka_bootstrap(), &[format!("{p}default")]).await?;
    }
    match idle {
        Some(kib) => println!(
            "idle worker RSS (e2e_worker run, {backend} backend): {:.1} MiB",
            kib as f64 / 1024.0
        ),
        None => println!(
            "idle worker RSS: build the e2e_worker binary in the same profile to measure it"
        ),
    }
    Ok(())
}
