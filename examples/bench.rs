//! Throughput of no-op jobs through the Stevedore runtime next to a raw loop on the same broker doing
//! the same at-least-once work (receive a batch of 100, ack it), measured in one run, for several
//! backlog sizes; plus the idle RSS of a real worker process.
//!
//! ```text
//! cargo run --release -p stevedore-examples --bin bench -- 10000,100000,1000000
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};
use stevedore::core::ReceiveOptions;
use stevedore::{config, Broker, Envelope, MemoryBroker, Router, Worker};

const BATCH: usize = 100;

async fn fill(broker: &dyn Broker, queue: &str, n: usize) -> Result<(), stevedore::BrokerError> {
    let mut left = n;
    while left > 0 {
        let k = left.min(1000);
        let batch = (0..k).map(|_| Envelope::new("noop", &b"{}"[..])).collect();
        broker.publish(queue, batch).await?;
        left -= k;
    }
    Ok(())
}

async fn raw(n: usize) -> Result<f64, Box<dyn std::error::Error>> {
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

async fn noop() {}

async fn runtime(n: usize) -> Result<f64, Box<dyn std::error::Error>> {
    let broker = Arc::new(MemoryBroker::new());
    fill(broker.as_ref(), "bench", n).await?;
    let cfg = config::from_toml_str(
        "[http]\nenabled = false\n[worker]\nconcurrency = 512\n[queues.bench]\nconcurrency = 512\nbatch = 100\n",
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
            .get("bench")
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

fn idle_rss_kib() -> Option<u64> {
    let exe = std::env::current_exe().ok()?.with_file_name("e2e_worker");
    let mut child = std::process::Command::new(exe)
        .args(["run"])
        .env("STEVEDORE_HTTP__ENABLED", "false")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
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

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let sizes: Vec<usize> = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "10000,100000,1000000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    println!(
        "backend: memory   no-op jobs, one process, {} worker threads",
        tokio::runtime::Handle::current().metrics().num_workers()
    );
    println!(
        "{:>10} {:>14} {:>14} {:>7}",
        "backlog", "raw msgs/s", "stevedore/s", "ratio"
    );
    for n in sizes {
        let r = raw(n).await?;
        let s = runtime(n).await?;
        println!("{n:>10} {r:>14.0} {s:>14.0} {:>7.2}", s / r);
    }
    match idle_rss_kib() {
        Some(kib) => println!(
            "idle worker RSS (e2e_worker run, memory backend): {:.1} MiB",
            kib as f64 / 1024.0
        ),
        None => println!(
            "idle worker RSS: build the e2e_worker binary in the same profile to measure it"
        ),
    }
    Ok(())
}
