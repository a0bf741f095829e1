//! Delay accuracy as a user sees it: delayed jobs enqueued ahead of time, run by a worker with the
//! default configuration, lateness = when the handler started minus the job's due time. Prints
//! min / p50 / p99 / max lateness and the number of early starts (must be 0) per backend and
//! delay, measured in one run, the backends alternating round by round.
//!
//! ```text
//! cargo run --release -p stevedore-examples --bin delay_bench -- rabbitmq,redis 250 1s,10s
//! ```
//!
//! Arguments: backends (`rabbitmq`, `redis`, `sqlite`, `memory`; `RABBITMQ_URL` / `REDIS_URL`;
//! SQLite in a temporary file), jobs per delay, delays. Each (backend, delay) runs on a fresh
//! queue under a key prefix of its own, which is deleted afterwards (RabbitMQ: the queues and the
//! prefix's delay topology; Redis: every key under the prefix).
//!
//! Latency mode: jobs enqueued one by one at a fixed rate into an idle worker (default config),
//! latency = handler start − enqueue time, p50 / p99 / max per backend, alternating round by round:
//!
//! ```text
//! cargo run --release -p stevedore-examples --bin delay_bench -- latency redis,rabbitmq,sqlite 5000 1000
//! ```
//!
//! Arguments: `latency`, backends, jobs per round, rate (jobs per second), rounds (default 3).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use stevedore::core::to_millis;
use stevedore::{config, Broker, Envelope, Json, MemoryBroker, Router, State, Worker};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

#[derive(serde::Serialize, serde::Deserialize)]
struct Due {
    due_ms: u64,
}

/// Lateness of each start, in milliseconds (negative = early).
type Log = Arc<Mutex<Vec<i64>>>;

async fn delayed(State(log): State<Log>, Json(job): Json<Due>) {
    let late = to_millis(SystemTime::now()) as i64 - job.due_ms as i64;
    log.lock().unwrap_or_else(|p| p.into_inner()).push(late);
}

fn url(var: &str, default: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| default.to_string())
}

async fn connect(backend: &str, prefix: &str) -> Res<Arc<dyn Broker>> {
    Ok(match backend {
        "memory" => Arc::new(MemoryBroker::new()),
        "redis" => {
            let mut c =
                stevedore_redis::RedisConfig::new(url("REDIS_URL", "redis://127.0.0.1:6379/0"));
            c.key_prefix = prefix.to_string();
            Arc::new(stevedore_redis::RedisBroker::connect(c).await?)
        }
        "rabbitmq" => {
            let mut c = stevedore_rabbitmq::RabbitConfig::new(url(
                "RABBITMQ_URL",
                "amqp://guest:guest@127.0.0.1:5672/%2f",
            ));
            c.key_prefix = prefix.to_string();
            Arc::new(stevedore_rabbitmq::RabbitBroker::connect(c).await?)
        }
        "sqlite" => {
            let path = std::env::temp_dir().join(format!("{prefix}db"));
            Arc::new(
                stevedore_sqlite::SqliteBroker::open(stevedore_sqlite::SqliteConfig::new(path))
                    .await?,
            )
        }
        other => {
            return Err(
                format!("unknown backend {other:?}: rabbitmq, redis, sqlite or memory").into(),
            )
        }
    })
}

async fn cleanup(backend: &str, prefix: &str, queue: &str) -> Res<()> {
    match backend {
        "redis" => {
            let client = redis::Client::open(url("REDIS_URL", "redis://127.0.0.1:6379/0"))?;
            let mut c = client.get_multiplexed_async_connection().await?;
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{prefix}*"))
                .query_async(&mut c)
                .await?;
            if !keys.is_empty() {
                let _: u64 = redis::cmd("DEL").arg(&keys).query_async(&mut c).await?;
            }
        }
        "rabbitmq" => {
            let conn = lapin::Connection::connect(
                &url("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"),
                lapin::ConnectionProperties::default(),
            )
            .await?;
            let ch = conn.create_channel().await?;
            let (mut queues, exchanges) = stevedore_rabbitmq::delay::topology(prefix);
            queues.push(format!("{prefix}{queue}"));
            queues.push(format!("{prefix}{queue}__dlq"));
            for q in queues {
                ch.queue_delete(q.as_str().into(), Default::default())
                    .await?;
            }
            for x in exchanges {
                ch.exchange_delete(x.as_str().into(), Default::default())
                    .await?;
            }
            let _ = conn.close(200, "delay bench done".into()).await;
        }
        "sqlite" => {
            for ext in ["db", "db-wal", "db-shm"] {
                let _ = std::fs::remove_file(std::env::temp_dir().join(format!("{prefix}{ext}")));
            }
        }
        _ => {}
    }
    Ok(())
}

/// A worker on a fresh queue of `backend` under `prefix`, whose handler logs into `log`.
struct Bench {
    backend: String,
    prefix: String,
    queue: &'static str,
    broker: Arc<dyn Broker>,
    log: Log,
    stop: stevedore::ShutdownHandle,
    client: stevedore::Client,
    stats: Arc<stevedore::stats::Stats>,
    run: tokio::task::JoinHandle<Result<stevedore::RunReport, stevedore::BrokerError>>,
}

impl Bench {
    /// Starts the worker (16 concurrent jobs) with the router `route` makes from the log.
    async fn start(
        backend: &str,
        prefix: String,
        queue: &'static str,
        route: impl FnOnce(Log) -> Router<Log>,
    ) -> Res<Bench> {
        let broker = connect(backend, &prefix).await?;
        let log: Log = Arc::default();
        let cfg = config::from_toml_str(
            &format!("[http]\nenabled = false\n[queues.{queue}]\nconcurrency = 16\n"),
            None,
        )?;
        let worker = Worker::new(broker.clone(), route(log.clone()), cfg)?;
        Ok(Bench {
            backend: backend.to_string(),
            prefix,
            queue,
            broker,
            log,
            stop: worker.shutdown_handle(),
            client: worker.client(),
            stats: worker.stats(),
            run: tokio::spawn(worker.run()),
        })
    }

    /// Waits until `n` jobs logged (or `deadline`, saying `what`), stops the worker, deletes the
    /// queue's keys, and returns the log.
    async fn finish(self, n: usize, deadline: Instant, what: &str) -> Res<Vec<i64>> {
        while self.log.lock().map(|l| l.len()).unwrap_or(0) < n {
            if Instant::now() > deadline {
                return Err(format!("{}: only some of {n} {what}", self.backend).into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.stop.shutdown();
        self.run.await??;
        let _ = self.broker.close().await;
        cleanup(&self.backend, &self.prefix, self.queue).await?;
        let out = self.log.lock().map(|l| l.clone()).unwrap_or_default();
        Ok(out)
    }
}

/// One round: `n` jobs delayed by `delay`, all enqueued before the worker starts; returns the
/// lateness of each start.
async fn round(backend: &str, n: usize, delay: Duration, tag: usize) -> Res<Vec<i64>> {
    let prefix = format!("delaybench-{}-{tag}.", std::process::id());
    let bench = Bench::start(backend, prefix, "delayed", |log| {
        Router::with_state(log).route("delayed", delayed)
    })
    .await?;
    let jobs: Vec<Envelope> = (0..n)
        .map(|_| {
            let mut e = Envelope::new("delayed", Vec::new()).json().delayed(delay);
            let due_ms = e.not_before.map(to_millis).unwrap_or(0);
            e.payload = serde_json::to_vec(&Due { due_ms })?.into();
            Ok(e)
        })
        .collect::<Result<_, serde_json::Error>>()?;
    for chunk in jobs.chunks(100) {
        bench.client.publish(bench.queue, chunk.to_vec()).await?;
    }
    let deadline = Instant::now() + delay + Duration::from_secs(30);
    bench
        .finish(n, deadline, "delayed jobs ran within 30 s of due")
        .await
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Sent {
    sent_us: u64,
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

async fn timed(State(log): State<Log>, Json(job): Json<Sent>) {
    let late = now_us() as i64 - job.sent_us as i64;
    log.lock().unwrap_or_else(|p| p.into_inner()).push(late);
}

/// One latency round: an idle worker, then `n` jobs enqueued one at a time, `rate` per second;
/// returns each job's enqueue → handler start, in microseconds.
async fn latency_round(backend: &str, n: usize, rate: f64, tag: usize) -> Res<Vec<i64>> {
    let prefix = format!("latencybench-{}-{tag}.", std::process::id());
    let bench = Bench::start(backend, prefix, "latency", |log| {
        Router::with_state(log).route("timed", timed)
    })
    .await?;
    while !bench.stats.is_ready() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Idle: the fetch loop is waiting on the broker when the first job comes.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for _ in 0..n {
        tick.tick().await;
        let payload = serde_json::to_vec(&Sent { sent_us: now_us() })?;
        let e = Envelope::new("timed", payload).json();
        bench.client.publish(bench.queue, vec![e]).await?;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    bench.finish(n, deadline, "jobs ran within 30 s").await
}

/// `latency BACKENDS N RATE [ROUNDS]`: medians over rounds of each round's p50 / p99 / max.
async fn latency(mut args: impl Iterator<Item = String>) -> Res<()> {
    let backends: Vec<String> = args
        .next()
        .unwrap_or_else(|| "redis,rabbitmq,sqlite".into())
        .split(',')
        .map(str::to_string)
        .collect();
    let n: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(5000);
    let rate: f64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(1000.0);
    let rounds: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(3);
    println!("latency: {n} jobs per round enqueued one by one at {rate}/s into an idle worker (default config), enqueue → handler start (ms); medians of {rounds} alternating rounds");
    let mut rows: std::collections::BTreeMap<String, Vec<[i64; 3]>> = Default::default();
    let mut tag = 0;
    for _ in 0..rounds {
        for b in &backends {
            tag += 1;
            let mut l = latency_round(b, n, rate, tag).await?;
            l.sort_unstable();
            rows.entry(b.clone())
                .or_default()
                .push([pct(&l, 0.5), pct(&l, 0.99), l[l.len() - 1]]);
        }
    }
    println!("{:<10} {:>9} {:>9} {:>9}", "backend", "p50", "p99", "max");
    for b in &backends {
        let r = &rows[b];
        let med = |i: usize| {
            let mut v: Vec<i64> = r.iter().map(|x| x[i]).collect();
            v.sort_unstable();
            v[v.len() / 2] as f64 / 1000.0
        };
        println!("{b:<10} {:>9.2} {:>9.2} {:>9.2}", med(0), med(1), med(2));
    }
    Ok(())
}

fn pct(sorted: &[i64], p: f64) -> i64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn parse_delay(s: &str) -> Option<Duration> {
    let s = s.trim();
    if let Some(ms) = s.strip_suffix("ms") {
        return ms.parse().ok().map(Duration::from_millis);
    }
    s.strip_suffix('s')?.parse().ok().map(Duration::from_secs)
}

#[tokio::main]
async fn main() -> Res<()> {
    let mut args = std::env::args().skip(1).peekable();
    if args.peek().map(String::as_str) == Some("latency") {
        args.next();
        return latency(args).await;
    }
    let backends: Vec<String> = args
        .next()
        .unwrap_or_else(|| "rabbitmq,redis".into())
        .split(',')
        .map(str::to_string)
        .collect();
    let n: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(250);
    let delays: Vec<Duration> = args
        .next()
        .unwrap_or_else(|| "1s,10s".into())
        .split(',')
        .filter_map(parse_delay)
        .collect();
    println!("delay accuracy: {n} jobs per delay enqueued at once, default worker config, lateness = handler start − due time (ms)");
    println!(
        "{:<10} {:>6} {:>6} {:>7} {:>7} {:>7} {:>7}",
        "backend", "delay", "early", "min", "p50", "p99", "max"
    );
    let mut tag = 0;
    for d in &delays {
        // Alternate the backends for each delay, so both see the same machine.
        for b in &backends {
            tag += 1;
            let mut late = round(b, n, *d, tag).await?;
            late.sort_unstable();
            let early = late.iter().filter(|l| **l < 0).count();
            println!(
                "{b:<10} {:>5}s {early:>6} {:>7} {:>7} {:>7} {:>7}",
                d.as_secs_f64(),
                late[0],
                pct(&late, 0.5),
                pct(&late, 0.99),
                late[late.len() - 1]
            );
        }
    }
    Ok(())
}
