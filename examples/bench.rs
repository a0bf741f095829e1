//! Throughput of no-op jobs through the Stevedore runtime next to a raw client loop on the same
//! broker doing the same at-least-once work, measured in one run, for several backlog sizes; plus
//! the idle RSS of a real worker process.
//!
//! ```text
//! cargo run --release -p stevedore-examples --bin bench -- memory 10000,100000,1000000
//! cargo run --release -p stevedore-examples --bin bench -- redis 10000,100000,1000000   # REDIS_URL, default 127.0.0.1:6379
//! ```
//!
//! Raw loops: memory — `receive(100)` + `ack(batch)`; redis — `XREADGROUP COUNT 100` + one `XACK`
//! of the batch, on one connection. Stevedore: a worker with one queue, batch 100, a no-op handler,
//! counting until every job is processed.

use std::sync::Arc;
use std::time::{Duration, Instant};
use stevedore::core::ReceiveOptions;
use stevedore::{config, Broker, Envelope, MemoryBroker, Router, Worker};
use stevedore_redis::{RedisBroker, RedisConfig};

const BATCH: usize = 100;
type Res<T> = Result<T, Box<dyn std::error::Error>>;

async fn fill(broker: &dyn Broker, queue: &str, n: usize) -> Res<()> {
    let mut left = n;
    while left > 0 {
        let k = left.min(1000);
        let batch = (0..k).map(|_| Envelope::new("noop", &b"{}"[..])).collect();
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
    // Same fields as a Stevedore message, so both loops move the same bytes.
    let broker = RedisBroker::connect(RedisConfig::new(url)).await?;
    fill(&broker, &stream, n).await?;
    let t = Instant::now();
    let mut done = 0;
    while done < n {
        let reply: redis::streams::StreamReadReply = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg("g")
            .arg("c")
            .arg("COUNT")
            .arg(BATCH)
            .arg("STREAMS")
            .arg(&stream)
            .arg(">")
            .query_async(&mut c)
            .await?;
        let ids: Vec<String> = reply
            .keys
            .into_iter()
            .flat_map(|k| k.ids.into_iter().map(|i| i.id))
            .collect();
        if ids.is_empty() {
            break;
        }
        let _: i64 = redis::cmd("XACK")
            .arg(&stream)
            .arg("g")
            .arg(&ids)
            .query_async(&mut c)
            .await?;
        done += ids.len();
    }
    let rate = done as f64 / t.elapsed().as_secs_f64();
    let _: () = redis::cmd("DEL").arg(&stream).query_async(&mut c).await?;
    Ok(rate)
}

async fn noop() {}

async fn through_runtime(broker: Arc<dyn Broker>, queue: &str, n: usize) -> Res<f64> {
    broker.prepare(&[queue.to_string()]).await?;
    fill(broker.as_ref(), queue, n).await?;
    let cfg = config::from_toml_str(
        &format!("[http]\nenabled = false\n[worker]\nconcurrency = 512\n[queues.{queue}]\nconcurrency = 512\nbatch = 100\n"),
        None,
    )?;
    let worker = Worker::new(broker, Router::new().route("noop", noop), cfg)?;
    let stats = worker.stats();
    let stop = worker.shutdown_handle();
    let t = Instant::now();
    let run = tokio::spawn(worker.run());
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
    stop.shutdown();
    run.await??;
    Ok(rate)
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
    if backend == "redis" {
        cmd.env("STEVEDORE_BROKER__KIND", "redis")
            .env("STEVEDORE_BROKER__URL", redis_url());
    }
    let mut child = cmd.spawn().ok()?;
    std::thread::sleep(Duration::from_secs(2));
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).ok();
    let _ = child.kill();
    let _ = child.wait();
    status?
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

#[tokio::main]
async fn main() -> Res<()> {
    let mut args = std::env::args().skip(1);
    let backend = args.next().unwrap_or_else(|| "memory".into());
    let sizes: Vec<usize> = args
        .next()
        .unwrap_or_else(|| "10000,100000,1000000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let threads = tokio::runtime::Handle::current().metrics().num_workers();
    println!("backend: {backend}   no-op jobs, one worker process, {threads} runtime threads, release build");
    println!(
        "{:>10} {:>14} {:>14} {:>7}",
        "backlog", "raw msgs/s", "stevedore/s", "ratio"
    );
    for n in sizes {
        let (r, s) = match backend.as_str() {
            "memory" => (
                raw_memory(n).await?,
                through_runtime(Arc::new(MemoryBroker::new()), "bench", n).await?,
            ),
            "redis" => {
                let url = redis_url();
                let r = raw_redis(&url, n).await?;
                let queue = format!("bench-{}-{n}", std::process::id());
                let broker: Arc<dyn Broker> =
                    Arc::new(RedisBroker::connect(RedisConfig::new(url.as_str())).await?);
                let s = through_runtime(broker, &queue, n).await?;
                let client = redis::Client::open(url.as_str())?;
                let mut c = client.get_multiplexed_async_connection().await?;
                let _: () = redis::cmd("DEL").arg(&queue).query_async(&mut c).await?;
                (r, s)
            }
            other => return Err(format!("unknown backend {other:?}: memory or redis").into()),
        };
        println!("{n:>10} {r:>14.0} {s:>14.0} {:>7.2}", s / r);
    }
    match idle_rss_kib(&backend) {
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
