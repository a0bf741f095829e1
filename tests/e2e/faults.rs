//! The fault suite: the real worker binary on each backend's real broker, under the faults real
//! networks and real jobs produce. One test per backend runs every fault that applies to it and
//! prints its rows of the backend × fault table; every cell counts job numbers exactly (lost,
//! run twice, and the bound on duplicates it was allowed) and reports what it measured.
//!
//! Network faults go through a loopback TCP proxy ([`stevedore_conformance::proxy`]) between the
//! worker and its broker:
//! - **half-open**: the proxy stops forwarding for 20 s without closing anything, then resumes.
//!   The worker must notice (log a failed broker call) within its backend's declared timeout,
//!   must not hang, and loses nothing.
//! - **resets**: every connection is reset (RST) every 2 s, six times, under load.
//! - **shutdown in an outage**: SIGTERM while the broker does not answer: the worker exits
//!   within its drain deadline plus the bound on its last broker calls, and a second worker,
//!   once the broker is back, finishes every job.
//!
//! Process and broker faults:
//! - **kill -9 of 1 of 2**: two workers share 10,000 jobs (SQS 2,000); one is killed with
//!   SIGKILL mid-run; the other finishes everything, the dead one's jobs after their lease.
//! - **broker restart**: the broker is stopped and started again on the same data under load
//!   (a private Redis, the private RabbitMQ node, a durable Kafka broker; not applicable to
//!   moto, which keeps nothing across a restart, nor to SQLite, which has no broker process).
//! - **cluster failover**: Redis: the worker runs on a Redis Cluster the test starts (3
//!   masters with a replica each, `cluster = true`); a quarter in, the master serving the
//!   queue's slot is killed with SIGKILL and its replica takes over. RabbitMQ: a 3-node
//!   cluster (quorum queues, a replica on every node), the worker's `url` listing every node;
//!   the node it is connected to is killed with SIGKILL. Both checked like a restart.
//!
//! And one job fault: **poison**, 1% of 10,000 jobs fail on every attempt; each must reach the
//! dead-letter queue after exactly `max_attempts` runs, and every other job must run once. The
//! rate with poison is reported beside the rate without (measured in the same test, alternately);
//! the test asserts only a floor of 0.5 that catches a pathology (poison holding slots through
//! its backoff, say), since a timing ratio on a 2-core machine is a measurement, not a unit test.

use super::{finish, free_port, lines, serial, signal, start_with, tally, wait_until, Run, WORKER};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};
use stevedore_conformance::proxy::Proxy;

/// How the worker reaches one backend: its kind, the environment that points it at the broker
/// (through `port` where it is proxied), and its queue settings.
struct Target {
    kind: &'static str,
    /// Environment for the worker, given the port it should connect to.
    env: Box<dyn Fn(u16) -> Vec<(String, String)>>,
    /// The broker's own address (what the proxy forwards to).
    addr: SocketAddr,
    /// Most messages one broker call takes (the queue's `batch`).
    batch: usize,
    /// `[broker]` lines beyond `kind`.
    broker_toml: String,
    /// How long a broker call may hang before the worker gives up on it (what the backend
    /// declares): the worker must notice a half-open connection within this plus slack.
    call_timeout: Duration,
    /// Jobs of the half-open and reset cells (4,000; fewer where the broker is slow to fill).
    jobs: u64,
    /// The port the proxy must listen on, where the broker tells clients where to connect
    /// (Kafka's advertised listener): every connection then goes through it, so even the cells
    /// without a network fault run behind a proxy that forwards.
    proxy_at: Option<u16>,
}

impl Target {
    /// A broker on loopback `port` reached through a proxy of the test's own, 32 a call, calls
    /// bounded at 10 s, 4,000 jobs for the network faults.
    fn plain(
        kind: &'static str,
        env: Box<dyn Fn(u16) -> Vec<(String, String)>>,
        port: u16,
    ) -> Target {
        Target {
            kind,
            env,
            addr: addr(port),
            batch: 32,
            broker_toml: String::new(),
            call_timeout: Duration::from_secs(10),
            jobs: 4000,
            proxy_at: None,
        }
    }
}

/// The path from the worker to the broker: a proxy (on `proxy_at` where the broker names it).
fn path(t: &Target) -> Result<Proxy, String> {
    match t.proxy_at {
        None => Proxy::start(t.addr),
        Some(port) => {
            // The previous cell's proxy may still be letting go of the port.
            let mut last = String::new();
            for _ in 0..100 {
                match Proxy::start_on(port, t.addr) {
                    Ok(p) => return Ok(p),
                    Err(e) => last = e,
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(last)
        }
    }
}

/// The port a worker connects to for a cell without a network fault.
fn direct_port(t: &Target, proxy: &Option<Proxy>) -> u16 {
    proxy.as_ref().map_or(t.addr.port(), Proxy::port)
}

const CONCURRENCY: usize = 16;

fn config(t: &Target, max_attempts: u32) -> String {
    format!(
        "[broker]\nkind = \"{}\"\n{}\n\n[worker]\nconcurrency = {CONCURRENCY}\npoll_wait = \"200ms\"\n\
         shutdown_timeout = \"3s\"\nstartup_timeout = \"60s\"\n\n[retry]\nmax_attempts = {max_attempts}\n\
         base = \"20ms\"\nfactor = 2.0\ncap = \"100ms\"\n\n[queues.default]\nconcurrency = {CONCURRENCY}\n\
         batch = {}\nlease = \"5s\"\n",
        t.kind, t.broker_toml, t.batch
    )
}

fn spawn(
    t: &Target,
    port: u16,
    jobs: u64,
    sleep_ms: u64,
    max_attempts: u32,
    extra: &[(&str, &str)],
) -> Run {
    let env: Vec<(String, String)> = (t.env)(port);
    let mut all: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let batch = t.batch.to_string();
    all.push(("E2E_BATCH", batch.as_str()));
    all.extend_from_slice(extra);
    start_with(&config(t, max_attempts), jobs, sleep_ms, &all)
}

fn stderr_of(run: &Run) -> String {
    let bytes = std::fs::read(run.dir.join(format!("stderr{}.txt", run.name))).unwrap_or_default();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Job numbers done, and those done more than once.
fn done_counts(l: &[String]) -> (BTreeMap<u64, usize>, Vec<u64>) {
    let done = tally(l, "done");
    let twice = done
        .iter()
        .filter(|(_, c)| **c > 1)
        .map(|(n, _)| *n)
        .collect();
    (done, twice)
}

/// One cell of the table.
struct Cell {
    fault: &'static str,
    outcome: Result<String, String>,
    took: Duration,
}

fn cell(fault: &'static str, f: impl FnOnce() -> Result<String, String>) -> Cell {
    // `FAULTS_ONLY=half-open,poison`: run only the cells whose name contains one of these.
    if let Ok(only) = std::env::var("FAULTS_ONLY") {
        if !only.split(',').any(|w| fault.contains(w.trim())) {
            return Cell {
                fault,
                outcome: Ok("skipped (FAULTS_ONLY)".into()),
                took: Duration::ZERO,
            };
        }
    }
    let t = Instant::now();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| {
        Err(p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panicked".into()))
    });
    Cell {
        fault,
        outcome,
        took: t.elapsed(),
    }
}

/// Prints the backend's rows and fails if any cell did.
fn report(kind: &str, cells: Vec<Cell>) {
    let mut table = format!(
        "\nfault table, {kind}:\n{:<10} {:<22} {:<6} {:>7}  detail\n",
        "backend", "fault", "result", "secs"
    );
    for c in &cells {
        let (result, detail) = match &c.outcome {
            Ok(d) if d.starts_with("n/a: ") => ("N/A", &d[5..]),
            Ok(d) => ("PASS", d.as_str()),
            Err(e) => ("FAIL", e.as_str()),
        };
        table.push_str(&format!(
            "{kind:<10} {:<22} {result:<6} {:>7.1}  {detail}\n",
            c.fault,
            c.took.as_secs_f64()
        ));
    }
    eprintln!("{table}");
    let failed: Vec<&str> = cells
        .iter()
        .filter(|c| c.outcome.is_err())
        .map(|c| c.fault)
        .collect();
    assert!(
        failed.is_empty(),
        "{kind}: faults failed: {failed:?}{table}"
    );
}

macro_rules! check {
    ($cond:expr, $($fmt:tt)+) => {
        let ok: bool = $cond;
        if !ok {
            return Err(format!($($fmt)+));
        }
    };
}

/// Stops `run` with SIGTERM; returns (exit code, how long it took, its output lines, its log).
fn stop(run: Run, limit: Duration) -> (Option<i32>, Duration, Vec<String>, String) {
    signal(&run.child, "-TERM");
    let (output, took, l) = finish(run, limit);
    (
        output.status.code(),
        took,
        l,
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Stops `run` with SIGTERM and checks that it exited 0 having done every one of `jobs`;
/// returns the jobs it ran twice, and its log.
fn stop_all_done(run: Run, jobs: u64) -> Result<(Vec<u64>, String), String> {
    let (code, _, l, log) = stop(run, Duration::from_secs(20));
    check!(
        code == Some(0),
        "exit code {code:?} after SIGTERM; log:\n{log}"
    );
    let (done, twice) = done_counts(&l);
    check!(
        done.len() as u64 == jobs,
        "{} of {jobs} jobs done: lost {}",
        done.len(),
        jobs - done.len() as u64
    );
    Ok((twice, log))
}

/// Whether a worker log (the part written since the fault began) says the broker stopped
/// answering: a warning or an error (a failed or timed-out broker call, a lost connection).
fn noticed(log: &str) -> bool {
    log.lines()
        .any(|l| l.contains(" WARN ") || l.contains(" ERROR "))
}

/// Half-open: 4,000 jobs of 2 ms through the proxy; once 1,000 are done the proxy forwards
/// nothing for 20 s. The worker must log a failed broker call within its call timeout (+5 s),
/// run nothing new meanwhile beyond what it held, then finish every job once the path is back;
/// a job may run twice only if it was in flight or its ack was held in the blackhole.
fn half_open(t: &Target) -> Result<String, String> {
    let jobs = t.jobs;
    const HOLE: Duration = Duration::from_secs(20);
    let proxy = path(t)?;
    let run = spawn(t, proxy.port(), jobs, 2, 3, &[]);
    let out = run.out.clone();
    let before = (jobs / 4) as usize;
    wait_until(
        "a quarter of the jobs done",
        Duration::from_secs(120),
        || tally(&lines(&out), "done").len() >= before,
    );
    let log_before = stderr_of(&run).len();
    proxy.blackhole(true);
    let began = Instant::now();
    let mut seen = None;
    while began.elapsed() < HOLE {
        if seen.is_none() && noticed(stderr_of(&run).get(log_before..).unwrap_or("")) {
            seen = Some(began.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let done_in_hole = tally(&lines(&out), "done").len();
    proxy.blackhole(false);
    let resumed = Instant::now();
    let accepted_at_resume = proxy.accepted();
    wait_until(
        "every job done after the blackhole",
        Duration::from_secs(120),
        || tally(&lines(&out), "done").len() as u64 >= jobs,
    );
    let recovered = resumed.elapsed();
    let (twice, _) = stop_all_done(run, jobs)?;
    let bound = 2 * (CONCURRENCY + t.batch);
    check!(
        twice.len() <= bound,
        "{} jobs ran twice (bound {bound}): {twice:?}",
        twice.len()
    );
    let limit = t.call_timeout + Duration::from_secs(5);
    let seen = seen.ok_or_else(|| {
        format!("the worker logged no failed broker call during the 20 s blackhole (its calls time out after {:?})", t.call_timeout)
    })?;
    check!(
        seen <= limit,
        "the worker noticed the blackhole only after {seen:?} (limit {limit:?})"
    );
    Ok(format!(
        "noticed in {:.1}s (call timeout {}s), {} done during the 20s hole, all {jobs} done {:.1}s after it lifted ({} new connections), lost 0, ran twice {} (bound {bound})",
        seen.as_secs_f64(),
        t.call_timeout.as_secs(),
        done_in_hole.saturating_sub(before),
        recovered.as_secs_f64(),
        proxy.accepted().saturating_sub(accepted_at_resume),
        twice.len()
    ))
}

/// Resets: 4,000 jobs of 2 ms; every connection is reset every 2 s, six times, once 500 are
/// done. Every job is done; a job may run twice only if it was in flight or its ack was lost at
/// a reset (at most concurrency + batch per reset); the recovery is logged.
fn resets(t: &Target) -> Result<String, String> {
    let jobs = t.jobs;
    let proxy = path(t)?;
    let run = spawn(t, proxy.port(), jobs, 2, 3, &[]);
    let out = run.out.clone();
    wait_until(
        "an eighth of the jobs done",
        Duration::from_secs(120),
        || tally(&lines(&out), "done").len() as u64 >= jobs / 8,
    );
    let mut reset = 0;
    for _ in 0..6 {
        reset += proxy.reset_all();
        std::thread::sleep(Duration::from_secs(2));
    }
    wait_until(
        "every job done after the resets",
        Duration::from_secs(120),
        || tally(&lines(&out), "done").len() as u64 >= jobs,
    );
    let (twice, _) = stop_all_done(run, jobs)?;
    let bound = 6 * (CONCURRENCY + t.batch);
    check!(
        twice.len() <= bound,
        "{} jobs ran twice (bound {bound}): {twice:?}",
        twice.len()
    );
    Ok(format!(
        "{reset} connections reset in 6 rounds 2s apart, {} accepted in all, all {jobs} done, lost 0, ran twice {} (bound {bound})",
        proxy.accepted(),
        twice.len()
    ))
}

/// Poison: 10,000 jobs of 3 ms, 100 of which (every 100th) fail on every attempt, with
/// `max_attempts = 3`; and the same 10,000 without poison. Rounds alternate (clean, poisoned,
/// clean, poisoned); the rate is jobs settled per second from the first start to the last end.
fn poison(target: &dyn Fn(&str) -> Target, jobs: u64) -> Result<String, String> {
    let mut clean = Vec::new();
    let mut poisoned = Vec::new();
    let mut dead_seen = 0;
    let mut dead_listed = 0;
    for round in 0..4 {
        let with = round % 2 == 1;
        let extra: &[(&str, &str)] = if with {
            &[("E2E_FAIL_EVERY", "100"), ("E2E_TIMES", "1")]
        } else {
            &[("E2E_TIMES", "1")]
        };
        // Each round on queues of its own (a key prefix of its own).
        let t = &target(&format!("poison{round}"));
        let proxy = match t.proxy_at {
            Some(_) => Some(path(t)?),
            None => None,
        };
        let port = direct_port(t, &proxy);
        let run = spawn(t, port, jobs, 3, 3, extra);
        let out = run.out.clone();
        let poison_n = if with { jobs.div_ceil(100) } else { 0 };
        wait_until("every job settled", Duration::from_secs(300), || {
            let l = lines(&out);
            let done = tally(&l, "done").len() as u64;
            let failed_thrice = tally(&l, "fail").values().filter(|c| **c >= 3).count() as u64;
            done + failed_thrice >= jobs && failed_thrice >= poison_n
        });
        let env: Vec<(String, String)> = (t.env)(port);
        let (code, _, l, log) = stop(run, Duration::from_secs(20));
        check!(code == Some(0), "exit code {code:?}; log:\n{log}");
        let (done, twice) = done_counts(&l);
        let fails = tally(&l, "fail");
        check!(
            twice.is_empty(),
            "jobs ran twice without any fault: {twice:?}"
        );
        let rate = rate_of(&l);
        if with {
            check!(
                fails.len() as u64 == poison_n,
                "{} poison jobs failed, expected {poison_n}",
                fails.len()
            );
            check!(
                fails.values().all(|c| *c == 3),
                "poison jobs ran other than exactly 3 times: {fails:?}"
            );
            check!(
                done.len() as u64 == jobs - poison_n,
                "{} good jobs done of {}",
                done.len(),
                jobs - poison_n
            );
            check!(
                fails.keys().all(|n| !done.contains_key(n)),
                "a poison job was recorded done"
            );
            // Every poison job is in the dead letters, with 3 attempts.
            let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
            let cfg = dir.path().join("worker.toml");
            std::fs::write(&cfg, config(t, 3)).map_err(|e| e.to_string())?;
            let listed = Command::new(WORKER)
                .args([
                    "dlq", "list", "--queue", "default", "--json", "--limit", "100000", "--config",
                ])
                .arg(&cfg)
                .current_dir(dir.path())
                .env("STEVEDORE_HTTP__ENABLED", "false")
                .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .output()
                .map_err(|e| format!("dlq list: {e}"))?;
            let text = String::from_utf8_lossy(&listed.stdout);
            let mut dead: BTreeMap<u64, u64> = BTreeMap::new();
            for line in text.lines() {
                let v: serde_json::Value = serde_json::from_str(line)
                    .map_err(|e| format!("dlq list line {line:?}: {e}"))?;
                let n = v["payload"]["n"].as_u64().ok_or("dead letter without n")?;
                let attempts = v["attempts"].as_u64().unwrap_or(0);
                *dead.entry(n).or_default() += 1;
                check!(
                    attempts == 3,
                    "dead letter of job {n} says {attempts} attempts"
                );
            }
            // How many wait in the dead-letter queue in all: `dlq list` on a broker that cannot
            // browse receives them, and RabbitMQ stops handing out at the tool's prefetch.
            let stats = Command::new(WORKER)
                .args(["stats", "--json", "--config"])
                .arg(&cfg)
                .current_dir(dir.path())
                .env("STEVEDORE_HTTP__ENABLED", "false")
                .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .output()
                .map_err(|e| format!("stats: {e}"))?;
            let rows: serde_json::Value =
                serde_json::from_slice(&stats.stdout).map_err(|e| format!("stats --json: {e}"))?;
            let total = rows
                .as_array()
                .and_then(|r| r.iter().find(|r| r["level"] == "dead-letter"))
                .map(|r| {
                    r["depth"]["ready"].as_u64().unwrap_or(0)
                        + r["depth"]["in_flight"].as_u64().unwrap_or(0)
                })
                .unwrap_or(0);
            check!(
                total == poison_n
                    && dead.values().all(|c| *c == 1)
                    && dead.keys().all(|n| fails.contains_key(n)),
                "{total} dead letters, {} listed (each poison job once expected: {poison_n}); \
                 stderr {}",
                dead.len(),
                String::from_utf8_lossy(&listed.stderr)
            );
            dead_seen = total as usize;
            dead_listed = dead.len();
            poisoned.push(rate);
        } else {
            check!(
                done.len() as u64 == jobs && fails.is_empty(),
                "clean round: {} of {jobs} done",
                done.len()
            );
            clean.push(rate);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (v[0] + v[v.len() - 1]) / 2.0
    };
    let (c, p) = (median(&mut clean), median(&mut poisoned));
    let ratio = p / c;
    check!(
        ratio >= 0.5,
        "with 1% poison the rate fell to {ratio:.2} of the clean rate ({p:.0} vs {c:.0} jobs/s)"
    );
    Ok(format!(
        "{} of {jobs} poison: each failed exactly 3 times and all {dead_seen} are in the DLQ ({dead_listed} listed, each with attempts 3); others once each; rate with poison {p:.0}/s vs {c:.0}/s clean = {ratio:.2} (mean of 2 alternating rounds each)",
        jobs.div_ceil(100)
    ))
}

/// Good jobs done per second, from the first done to the last (the worker's own clock,
/// `E2E_TIMES`): the enqueue and start-up are not counted, nor the poison jobs' last retries,
/// which wait out their backoff after the good work is done.
fn rate_of(l: &[String]) -> f64 {
    let ms: Vec<u64> = l
        .iter()
        .filter(|x| x.starts_with("done "))
        .filter_map(|x| x.rsplit(' ').next()?.parse().ok())
        .collect();
    let (Some(first), Some(last)) = (ms.iter().min(), ms.iter().max()) else {
        return 0.0;
    };
    ms.len() as f64 / (last.saturating_sub(*first).max(1) as f64 / 1000.0)
}

/// Shutdown in an outage: 400 jobs of 200 ms; once 50 are done the proxy goes silent and the
/// worker is sent SIGTERM. It must exit 0 within its 3 s drain deadline plus the 6 s it allows
/// its last broker calls (+2 s); then, the broker answering again (through the same proxy, now
/// forwarding), a second worker finishes every job: nothing lost.
fn outage_shutdown(t: &Target) -> Result<String, String> {
    const JOBS: u64 = 400;
    let proxy = path(t)?;
    let run = spawn(t, proxy.port(), JOBS, 200, 3, &[]);
    let out = run.out.clone();
    wait_until("enqueued and 50 done", Duration::from_secs(120), || {
        let l = lines(&out);
        l.iter().any(|x| x == "enqueued") && tally(&l, "done").len() >= 50
    });
    proxy.blackhole(true);
    // The drain deadline (3 s) plus the 6 s the worker allows its last broker calls, plus 2 s.
    let limit = Duration::from_secs(3 + 6 + 2);
    let (code, took, l_a, log) = stop(run, limit + Duration::from_secs(30));
    check!(
        took <= limit,
        "the worker took {took:?} to exit during the outage (limit {limit:?}: 3s deadline + 6s for its last calls + 2s); its log:\n{log}"
    );
    check!(
        code == Some(0),
        "exit code {code:?} during the outage; log:\n{log}"
    );
    // The broker answers again; B (same queue: the env is the same) goes the same way.
    proxy.blackhole(false);
    let env: Vec<(String, String)> = (t.env)(proxy.port());
    let mut all: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    // A's directory went with it; B gets its own.
    let dir_b = tempfile::tempdir().map_err(|e| e.to_string())?;
    let dir = dir_b.path().to_path_buf();
    let out_b = dir.join("out-b.txt");
    let cfg = dir.join("worker-b.toml");
    std::fs::write(&cfg, config(t, 3)).map_err(|e| e.to_string())?;
    let port = free_port().to_string();
    let bind = format!("127.0.0.1:{port}");
    all.push(("STEVEDORE_HTTP__BIND", bind.as_str()));
    let child = Command::new(WORKER)
        .args(["run", "--config"])
        .arg(&cfg)
        .current_dir(&dir)
        .env("E2E_OUT", &out_b)
        .env("E2E_JOBS", "0")
        .env("RUST_LOG", "info")
        .envs(all.iter().copied())
        .stdout(std::fs::File::create(dir.join("stdout-b.txt")).map_err(|e| e.to_string())?)
        .stderr(std::fs::File::create(dir.join("stderr-b.txt")).map_err(|e| e.to_string())?)
        .spawn()
        .map_err(|e| e.to_string())?;
    let b = super::Reaped(child);
    let done_a = tally(&l_a, "done");
    let t0 = Instant::now();
    let all_done = || {
        let mut all = done_a.clone();
        all.extend(tally(&lines(&out_b), "done"));
        all.len() as u64 >= JOBS
    };
    while !all_done() {
        if t0.elapsed() > Duration::from_secs(180) {
            let mut all = done_a.clone();
            all.extend(tally(&lines(&out_b), "done"));
            return Err(format!(
                "after the outage only {} of {JOBS} jobs done; B's log:\n{}",
                all.len(),
                std::fs::read_to_string(dir.join("stderr-b.txt")).unwrap_or_default()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    signal(&b, "-TERM");
    let mut b = b;
    let _ = b.0.wait();
    let done_b = tally(&lines(&out_b), "done");
    let twice = done_b.keys().filter(|n| done_a.contains_key(n)).count();
    let bound = CONCURRENCY + t.batch;
    check!(
        twice <= bound,
        "{twice} jobs ran on both workers (bound {bound})"
    );
    Ok(format!(
        "SIGTERM in a silent outage: exited 0 in {:.1}s (limit {:.0}s); A done {}, B done the other {} after it, lost 0, ran on both {twice} (bound {bound})",
        took.as_secs_f64(),
        limit.as_secs_f64(),
        done_a.len(),
        done_b.len()
    ))
}

/// Kill -9: two workers share `jobs` jobs of 3 ms, enqueued by a third process; once both are
/// working, A is killed with SIGKILL (no drain, no release, no last acks). B must finish
/// everything: lost 0, B runs nothing twice, and a job runs on both only if A had finished it
/// without its ack reaching the broker: within its last second. Reports how long after the kill B had started
/// every job A was running, beside the lease (Kafka: the group session).
fn kill_one(t: &Target, jobs: u64) -> Result<String, String> {
    let proxy = path(t)?;
    let port = proxy.port();
    // Both workers wait on the queue (a Kafka member of the group each, a RabbitMQ consumer
    // each) while a third process enqueues: one that serves only another level of the queue,
    // so it runs none of these jobs and is not killed with A.
    let a = spawn(t, port, 0, 3, 3, &[("E2E_TIMES", "1")]);
    let b = spawn(t, port, 0, 3, 3, &[]);
    let (out_a, out_b) = (a.out.clone(), b.out.clone());
    wait_until("A and B started", Duration::from_secs(60), || {
        stderr_of(&a).contains("worker started") && stderr_of(&b).contains("worker started")
    });
    let producer = {
        let env: Vec<(String, String)> = (t.env)(port);
        let mut all: Vec<(&str, &str)> =
            env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let batch = t.batch.to_string();
        all.push(("E2E_BATCH", batch.as_str()));
        let config = config(t, 3).replace(
            "[queues.default]\n",
            "[queues.default]\nweights = { low = 1 }\n",
        );
        super::start_with(&config, jobs, 3, &all)
    };
    // Killed in the middle of jobs: with some running, after a batch or so done.
    wait_until(
        "both working, A with jobs running",
        Duration::from_secs(180),
        || {
            let l = lines(&out_a);
            let done = tally(&l, "done");
            let running = tally(&l, "start")
                .keys()
                .filter(|n| !done.contains_key(n))
                .count();
            // Half its slots busy, or, where fetching is slow (moto), any job at all once a
            // few batches are done.
            done.len() >= CONCURRENCY
                && (running >= CONCURRENCY / 2 || (done.len() >= 8 * CONCURRENCY && running > 0))
                && !tally(&lines(&out_b), "done").is_empty()
        },
    );
    let mut a = a;
    let unfinished = super::kill_hard(&mut a);
    let killed = Instant::now();
    let done_at_kill = tally(&lines(&out_a), "done").len() as u64;
    check!(
        done_at_kill < jobs,
        "A finished all {jobs} jobs before it was killed: the cell proves nothing"
    );
    let mut rerun_after = None;
    let all_done = || {
        let mut all = tally(&lines(&out_a), "done");
        all.extend(tally(&lines(&out_b), "done"));
        all.len() as u64 >= jobs
    };
    while !all_done() || rerun_after.is_none() {
        if rerun_after.is_none() {
            let started_b = tally(&lines(&out_b), "start");
            if unfinished.iter().all(|n| started_b.contains_key(n)) {
                rerun_after = Some(killed.elapsed());
            }
        }
        if killed.elapsed() > Duration::from_secs(180) {
            let mut all = tally(&lines(&out_a), "done");
            all.extend(tally(&lines(&out_b), "done"));
            return Err(format!(
                "180 s after the kill: {} of {jobs} jobs done, B started A's {} unfinished: {}; B's log:\n{}",
                all.len(),
                unfinished.len(),
                rerun_after.is_some(),
                stderr_of(&b)
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = killed.elapsed();
    let (p_code, _, l_p, p_log) = stop(producer, Duration::from_secs(20));
    check!(
        p_code == Some(0) && l_p.iter().any(|x| x == "enqueued"),
        "the producer exited {p_code:?} without enqueuing all {jobs}; log:\n{p_log}"
    );
    check!(
        tally(&l_p, "start").is_empty(),
        "the producer ran jobs of the level it does not serve"
    );
    let (code, _, l_b, log) = stop(b, Duration::from_secs(20));
    check!(
        code == Some(0),
        "B's exit code {code:?} after SIGTERM; log:\n{log}"
    );
    let done_a = tally(&lines(&out_a), "done");
    let done_b = tally(&l_b, "done");
    let b_twice: Vec<u64> = done_b
        .iter()
        .filter(|(_, c)| **c > 1)
        .map(|(n, _)| *n)
        .collect();
    check!(b_twice.is_empty(), "B ran jobs twice: {b_twice:?}");
    let mut all = done_a.clone();
    all.extend(done_b.clone());
    check!(
        all.len() as u64 == jobs,
        "{} of {jobs} jobs done: lost {}",
        all.len(),
        jobs - all.len() as u64
    );
    // A job may run on both only if A finished it so shortly before it died that its ack was
    // not yet durable: an ack batch on its way, or (Kafka) the checkpoint write that carries
    // it. How many that is depends on the rate and the write's latency, not on a count, so
    // the bound is on time: each must be among what A finished in its last second.
    let a_done_ms: BTreeMap<u64, u64> = lines(&out_a)
        .iter()
        .filter_map(|l| {
            let mut p = l.split(' ');
            (p.next() == Some("done")).then_some(())?;
            Some((p.next()?.parse().ok()?, p.next()?.parse().ok()?))
        })
        .collect();
    let last_ms = a_done_ms.values().copied().max().unwrap_or(0);
    let both: Vec<u64> = done_b
        .keys()
        .filter(|n| done_a.contains_key(n))
        .copied()
        .collect();
    let age = |n: &u64| last_ms.saturating_sub(a_done_ms.get(n).copied().unwrap_or(0));
    let (late, early): (Vec<u64>, Vec<u64>) = both.iter().partition(|n| age(n) <= 1000);
    let oldest = late.iter().map(age).max().unwrap_or(0);
    // Kafka only: a rebalance while both ran (the producer's join, say) moves partitions, and
    // what A had finished there but not yet committed runs again at its new owner, however
    // long before the kill; at most what A held per rebalance.
    let rebalance_bound = if t.kind == "kafka" {
        2 * (CONCURRENCY + t.batch)
    } else {
        0
    };
    check!(
        early.len() <= rebalance_bound,
        "{} jobs ran on both workers that A had finished more than 1 s before it died (an ack \
         that old should have reached the broker; allowed {rebalance_bound}): {early:?}",
        early.len()
    );
    let rerun_after = rerun_after.unwrap_or(took);
    // What hands a dead worker's jobs over: their lease, Kafka's group session, or RabbitMQ's
    // connection closing.
    let takeover = match t.kind {
        "kafka" => "its group session 6s",
        "rabbitmq" => "its connection closing; lease 5s",
        _ => "lease 5s",
    };
    let both = match (late.len(), early.len()) {
        (0, 0) => "0".to_string(),
        (n, 0) => format!("{n} (each finished by A at most {oldest} ms before it died; bound 1 s)"),
        (n, m) => format!(
            "{} ({n} finished by A at most {oldest} ms before it died, bound 1 s; {m} earlier, \
             moved by a rebalance, bound {rebalance_bound})",
            n + m
        ),
    };
    Ok(format!(
        "A killed with {} running after {done_at_kill} of {jobs} done; B started all of them {:.1}s after the kill ({takeover}) and finished every job {:.1}s after it; lost 0, ran on both {both}",
        unfinished.len(),
        rerun_after.as_secs_f64(),
        took.as_secs_f64(),
    ))
}

/// Broker restart: 4,000 jobs of 2 ms (SQS 1,000); once a quarter are done the broker is
/// stopped and started again on the same data (`restart`, down about a second). Every job must
/// be done, the worker exit 0 on SIGTERM, and a job may run twice only if it was in flight or
/// its ack was on the wire when the connection went (2 × (concurrency + batch)), or its enqueue
/// was retried after a lost confirm (+1). Reports how long the restart took and how long after
/// the broker was back the first job was done.
/// `expect`: lines the worker must log after the restart (each must appear in one line).
fn restart(
    t: &Target,
    restart: &dyn Fn() -> Result<(), String>,
    expect: &[&str],
) -> Result<String, String> {
    let jobs = t.jobs;
    let run = spawn(t, t.addr.port(), jobs, 2, 3, &[]);
    let out = run.out.clone();
    wait_until(
        "enqueued and a quarter done",
        Duration::from_secs(120),
        || {
            let l = lines(&out);
            l.iter().any(|x| x == "enqueued") && tally(&l, "done").len() as u64 >= jobs / 4
        },
    );
    let log_at_restart = stderr_of(&run).len();
    let began = Instant::now();
    restart()?;
    let up = Instant::now();
    let down_for = up - began;
    let done_at_up = tally(&lines(&out), "done").len();
    let mut first_after = None;
    while (tally(&lines(&out), "done").len() as u64) < jobs {
        if first_after.is_none() && tally(&lines(&out), "done").len() > done_at_up {
            first_after = Some(up.elapsed());
        }
        if up.elapsed() > Duration::from_secs(180) {
            return Err(format!(
                "180 s after the restart only {} of {jobs} jobs done; log:\n{}",
                tally(&lines(&out), "done").len(),
                stderr_of(&run)
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let first_after = first_after.unwrap_or_else(|| up.elapsed());
    let (twice, log) = stop_all_done(run, jobs)?;
    let bound = 2 * (CONCURRENCY + t.batch) + 1;
    check!(
        twice.len() <= bound,
        "{} jobs ran twice (bound {bound}): {twice:?}",
        twice.len()
    );
    let after = log.get(log_at_restart..).unwrap_or("");
    let reconnected = after
        .lines()
        .any(|l| l.contains(" WARN ") || l.contains(" ERROR "));
    check!(
        reconnected,
        "the worker logged nothing about losing the broker; log:\n{log}"
    );
    for want in expect {
        check!(
            after.lines().any(|l| l.contains(want)),
            "the worker did not log {want:?} after the restart; log:\n{log}"
        );
    }
    Ok(format!(
        "broker down and up again in {:.1}s; first job done {:.1}s after it was back; all {jobs} done, lost 0, ran twice {} (bound {bound})",
        down_for.as_secs_f64(),
        first_after.as_secs_f64(),
        twice.len()
    ))
}

/// The resident set of process `pid` in KiB (`VmRSS`), if it runs.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Counts the `done` lines a worker appends to its output file, reading only what was added
/// since the last look (a backlog round's file grows to hundreds of thousands of lines; reading
/// it whole every 50 ms would load the machine the worker is measured on).
struct DoneCounter {
    path: std::path::PathBuf,
    offset: u64,
    partial: Vec<u8>,
    done: u64,
}

impl DoneCounter {
    fn new(path: std::path::PathBuf) -> Self {
        DoneCounter {
            path,
            offset: 0,
            partial: Vec::new(),
            done: 0,
        }
    }

    /// `done` lines so far.
    fn count(&mut self) -> u64 {
        use std::io::{Read, Seek, SeekFrom};
        let Ok(mut f) = std::fs::File::open(&self.path) else {
            return self.done;
        };
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return self.done;
        }
        let mut added = Vec::new();
        let Ok(n) = f.read_to_end(&mut added) else {
            return self.done;
        };
        self.offset += n as u64;
        self.partial.extend_from_slice(&added);
        if let Some(end) = self.partial.iter().rposition(|&b| b == b'\n') {
            let whole: Vec<u8> = self.partial.drain(..=end).collect();
            self.done += whole
                .split(|&b| b == b'\n')
                .filter(|l| l.starts_with(b"done "))
                .count() as u64;
        }
        self.done
    }
}

/// What one backlog round measured.
struct Backlog {
    /// Peak resident set of the worker while it worked, KiB.
    rss: u64,
    /// Jobs done per second (first done to last).
    rate: f64,
    done: usize,
    enqueue: Duration,
}

/// How long a backlog round's worker works.
const BACKLOG_WINDOW: Duration = Duration::from_secs(10);

/// A producer process (serving only another level of the queue, so it runs none of them)
/// leaves `jobs` jobs in the broker and exits; then a worker starts on that backlog and works
/// for [`BACKLOG_WINDOW`] (or until it is through), its resident set sampled every 50 ms.
fn backlog_round(t: &Target, jobs: u64) -> Result<Backlog, String> {
    let proxy = path(t)?;
    let port = proxy.port();
    let env: Vec<(String, String)> = (t.env)(port);
    let mut all: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    // Large publish batches fill the broker fast (SQS takes at most 10 a call).
    let batch = if t.kind == "sqs" { 10 } else { 500 }.to_string();
    all.push(("E2E_BATCH", batch.as_str()));
    let config = config(t, 3).replace(
        "[queues.default]\n",
        "[queues.default]\nweights = { low = 1 }\n",
    );
    let began = Instant::now();
    let producer = super::start_with(&config, jobs, 0, &all);
    let out_p = producer.out.clone();
    wait_until("the backlog enqueued", Duration::from_secs(900), || {
        lines(&out_p)
            .iter()
            .any(|x| x == "enqueued" || x == "enqueue failed")
    });
    let enqueue = began.elapsed();
    let (code, _, l_p, log_p) = stop(producer, Duration::from_secs(20));
    check!(
        code == Some(0) && l_p.iter().any(|x| x == "enqueued"),
        "the producer exited {code:?} without enqueuing all {jobs}; log:\n{log_p}"
    );
    let run = spawn(t, port, 0, 0, 3, &[("E2E_TIMES", "1")]);
    let pid = run.child.id();
    let mut counter = DoneCounter::new(run.out.clone());
    let mut rss = 0;
    let mut working_since = None;
    loop {
        if let Some(kib) = rss_kib(pid) {
            rss = rss.max(kib);
        }
        let done = counter.count();
        if working_since.is_none() && done > 0 {
            working_since = Some(Instant::now());
        }
        if done >= jobs || working_since.is_some_and(|t| t.elapsed() >= BACKLOG_WINDOW) {
            break;
        }
        check!(
            began.elapsed() < Duration::from_secs(900),
            "the worker did no job of its backlog; log:\n{}",
            stderr_of(&run)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (code, _, l, log) = stop(run, Duration::from_secs(20));
    check!(code == Some(0), "the worker exited {code:?}; log:\n{log}");
    Ok(Backlog {
        rss,
        rate: rate_of(&l),
        done: tally(&l, "done").len(),
        enqueue,
    })
}

/// Backlog growth: the worker's peak resident set and its rate on a backlog of `small` jobs and
/// on one of `large` (each left in the broker by a producer that exited): the backlog lives in
/// the broker, so the resident set must not grow with it (at most 16 MiB more, for buffers that
/// fill up to their bound), and the rate is reported beside it (with a floor of 0.5 that
/// catches per-job work growing with the backlog; a timing ratio on a 2-core machine is a
/// measurement, not a unit test).
fn backlog(target: &dyn Fn(&str) -> Target, small: u64, large: u64) -> Result<String, String> {
    let s = backlog_round(&target("backlog-small"), small)?;
    let l = backlog_round(&target("backlog-large"), large)?;
    let mib = |kib: u64| kib as f64 / 1024.0;
    let ratio = if s.rate > 0.0 { l.rate / s.rate } else { 0.0 };
    check!(
        l.rss <= s.rss + 16 * 1024,
        "peak RSS {:.1} MiB on a backlog of {large} vs {:.1} MiB on {small}: it grows with the backlog",
        mib(l.rss),
        mib(s.rss)
    );
    check!(
        ratio >= 0.5,
        "{:.0} jobs/s on a backlog of {large} vs {:.0}/s on {small}: per-job cost grows with the backlog",
        l.rate,
        s.rate
    );
    Ok(format!(
        "worker peak RSS {:.1} MiB on a backlog of {small} ({} done at {:.0}/s), {:.1} MiB on {large} ({} done in {}s at {:.0}/s; rate ratio {ratio:.2}); enqueued in {:.1}s and {:.1}s (debug build: the release bench measures the rate)",
        mib(s.rss),
        s.done,
        s.rate,
        mib(l.rss),
        l.done,
        BACKLOG_WINDOW.as_secs(),
        l.rate,
        s.enqueue.as_secs_f64(),
        l.enqueue.as_secs_f64(),
    ))
}

/// The faults of a networked broker, each on queues of its own (`target(name)`), poison and the
/// kill with `many` jobs.
fn every_fault(target: &dyn Fn(&str) -> Target, many: u64) -> Vec<Cell> {
    vec![
        cell("kill -9 of 1 of 2", || kill_one(&target("kill"), many)),
        cell("half-open 20s", || half_open(&target("hole"))),
        cell("resets every 2s", || resets(&target("reset"))),
        cell("shutdown in outage", || outage_shutdown(&target("outage"))),
        cell("1% poison", || poison(target, many)),
    ]
}

/// A worker environment of a broker URL (`{port}` in `url` becomes the port to connect to) and
/// a key prefix.
fn url_and_prefix(url: &'static str, prefix: String) -> Box<dyn Fn(u16) -> Vec<(String, String)>> {
    Box::new(move |port| {
        vec![
            (
                "STEVEDORE_BROKER__URL".into(),
                url.replace("{port}", &port.to_string()),
            ),
            ("STEVEDORE_BROKER__KEY_PREFIX".into(), prefix.clone()),
        ]
    })
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

#[test]
fn faults_redis() {
    let _serial = serial();
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into());
    let port = url
        .rsplit(':')
        .next()
        .and_then(|p| p.split('/').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or(6379);
    let prefix = format!("e2e-faults{}-{}:", std::process::id(), free_port());
    let _cleanup = stevedore_conformance::servers::RedisKeys {
        url: url.clone(),
        prefix: prefix.clone(),
    };
    // Commands time out after 10 s, blocking reads 5 s past their BLOCK time.
    let target = |sub: &str| {
        Target::plain(
            "redis",
            url_and_prefix("redis://127.0.0.1:{port}/0", format!("{prefix}{sub}:")),
            port,
        )
    };
    let mut cells = every_fault(&target, 10_000);
    // The machine's Redis cannot be restarted: a private, persistent one can.
    cells.push(cell("broker restart", || {
        let server = stevedore_conformance::servers::RedisServer::start()?;
        let port = server
            .url()
            .rsplit(':')
            .next()
            .and_then(|p| p.split('/').next())
            .and_then(|p| p.parse().ok())
            .ok_or("private redis url")?;
        let t = Target::plain(
            "redis",
            url_and_prefix("redis://127.0.0.1:{port}/0", "restart:".into()),
            port,
        );
        restart(&t, &|| server.restart(Duration::from_secs(1)), &[])
    }));
    // A Redis Cluster (3 masters, a replica each) the test starts: the master serving the
    // queue's slot is killed (SIGKILL) a quarter in; its replica takes over.
    cells.push(cell("cluster failover", || {
        let cluster = stevedore_conformance::servers::RedisCluster::start(3)?;
        let urls = cluster.urls();
        let env: Box<dyn Fn(u16) -> Vec<(String, String)>> = Box::new(move |_| {
            vec![
                ("STEVEDORE_BROKER__URL".into(), urls.clone()),
                ("STEVEDORE_BROKER__KEY_PREFIX".into(), "failover:".into()),
            ]
        });
        let mut t = Target::plain("redis", env, cluster.ports()[0]);
        t.broker_toml = "cluster = true".into();
        let killed = std::cell::Cell::new(0u16);
        let report = restart(
            &t,
            &|| {
                killed.set(cluster.fail_over("failover:default")?);
                Ok(())
            },
            &[],
        )?;
        Ok(format!(
            "master {} of the queue's slot killed; {}",
            killed.get(),
            report.replacen("broker down and up again", "its replica took over", 1)
        ))
    }));
    // Last: it leaves most of its backlog in the broker (deleted with the test's keys).
    cells.push(cell("backlog growth", || {
        backlog(&target, 10_000, 1_000_000)
    }));
    report("redis", cells);
}

#[test]
fn faults_rabbitmq() {
    let _serial = serial();
    // A private node: the test's queues and exchanges go with it.
    let server =
        stevedore_conformance::servers::RabbitServer::start().unwrap_or_else(|e| panic!("{e}"));
    // AMQP calls time out after 10 s.
    let target = |sub: &str| {
        Target::plain(
            "rabbitmq",
            url_and_prefix("amqp://guest:guest@127.0.0.1:{port}/%2f", format!("{sub}.")),
            server.port(),
        )
    };
    let mut cells = every_fault(&target, 10_000);
    cells.push(cell("broker restart", || {
        restart(
            &target("restart"),
            &|| server.restart(Duration::from_secs(1)),
            &[],
        )
    }));
    // A 3-node cluster the test starts: the node the worker is connected to (the first of its
    // url's list) is killed a quarter in; the queue's quorum replicas on the other two elect a
    // leader, and the worker reconnects to the next node of its list.
    cells.push(cell("cluster failover", || {
        let cluster = stevedore_conformance::servers::RabbitCluster::start(3)?;
        let first = cluster.node(0).ok_or("the cluster has no node")?;
        let urls = cluster.urls();
        let env: Box<dyn Fn(u16) -> Vec<(String, String)>> = Box::new(move |_| {
            vec![
                ("STEVEDORE_BROKER__URL".into(), urls.clone()),
                ("STEVEDORE_BROKER__KEY_PREFIX".into(), "failover.".into()),
            ]
        });
        let t = Target::plain("rabbitmq", env, first.port());
        // It reconnects to the next node of its list, not to the dead one.
        let second = cluster.node(1).ok_or("the cluster has one node")?;
        let next = format!(
            "reconnected to RabbitMQ node=amqp://guest:***@127.0.0.1:{}/",
            second.port()
        );
        let report = restart(
            &t,
            &|| {
                first.kill();
                check!(
                    first.ctl(&["status"]).is_err(),
                    "node {} still answers after the kill",
                    first.node()
                );
                Ok(())
            },
            &[next.as_str()],
        )?;
        Ok(report.replacen(
            "broker down and up again in",
            "the worker's node (1 of 3) killed with SIGKILL in",
            1,
        ))
    }));
    // Last: it leaves most of its backlog in the private node (which the restart cell would
    // otherwise have to recover).
    cells.push(cell("backlog growth", || {
        backlog(&target, 10_000, 1_000_000)
    }));
    report("rabbitmq", cells);
}

#[test]
fn faults_sqs() {
    let _serial = serial();
    let server =
        stevedore_conformance::servers::MotoServer::start().unwrap_or_else(|e| panic!("{e}"));
    let port: u16 = server
        .endpoint()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("moto endpoint {}", server.endpoint()));
    let target = |sub: &str| Target {
        kind: "sqs",
        env: Box::new({
            let prefix = format!("{sub}-");
            move |port| {
                vec![
                    ("STEVEDORE_BROKER__REGION".into(), "us-east-1".into()),
                    (
                        "STEVEDORE_BROKER__ENDPOINT".into(),
                        format!("http://127.0.0.1:{port}"),
                    ),
                    ("STEVEDORE_BROKER__ACCESS_KEY_ID".into(), "testing".into()),
                    (
                        "STEVEDORE_BROKER__SECRET_ACCESS_KEY".into(),
                        "testing".into(),
                    ),
                    ("STEVEDORE_BROKER__KEY_PREFIX".into(), prefix.clone()),
                    ("AWS_EC2_METADATA_DISABLED".into(), "true".into()),
                ]
            }
        }),
        addr: addr(port),
        batch: 10,
        // SQS calls time out after `timeout` (a receive: its long poll plus `timeout`).
        broker_toml: "timeout = \"10s\"".into(),
        call_timeout: Duration::from_secs(10),
        jobs: 1000,
        proxy_at: None,
    };
    // moto takes in about 100 messages a second one by one and ~1,000 in batches: 2,000 jobs.
    let mut cells = every_fault(&target, 2_000);
    // moto takes ~1,000 messages a second in batches: a 1M backlog would take 17 minutes.
    cells.push(cell("backlog growth", || backlog(&target, 2_000, 20_000)));
    cells.push(cell("broker restart", || {
        Ok(
            "n/a: moto keeps its queues in memory, so a restart loses them (SQS is a service a \
            client never sees restart); losing the connection is the half-open and reset rows"
                .into(),
        )
    }));
    report("sqs", cells);
}

#[test]
fn faults_kafka() {
    let _serial = serial();
    // The broker tells clients to connect to the proxy's port: every connection goes through it.
    let (port, proxy_port) = (free_port(), free_port());
    let _server = stevedore_conformance::servers::KafkaServer::start_behind(port, proxy_port)
        .unwrap_or_else(|e| panic!("{e}"));
    let target = |sub: &str| Target {
        kind: "kafka",
        env: Box::new({
            let prefix = format!("{sub}-");
            move |port| {
                vec![
                    (
                        "STEVEDORE_BROKER__BOOTSTRAP".into(),
                        format!("127.0.0.1:{port}"),
                    ),
                    ("STEVEDORE_BROKER__KEY_PREFIX".into(), prefix.clone()),
                ]
            }
        }),
        addr: addr(port),
        batch: 32,
        broker_toml: "partitions = 4\nsession_timeout = \"6s\"".into(),
        // The group session: a member that hears nothing for 6 s is out.
        call_timeout: Duration::from_secs(10),
        jobs: 4000,
        proxy_at: Some(proxy_port),
    };
    let mut cells = every_fault(&target, 10_000);
    // The proxied server keeps its topics in memory: the restart runs on a durable one.
    cells.push(cell("broker restart", || {
        let server = stevedore_conformance::servers::KafkaServer::start_durable()?;
        let mut t = target("restart");
        t.addr = server
            .bootstrap()
            .parse()
            .map_err(|e| format!("{}: {e}", server.bootstrap()))?;
        restart(&t, &|| server.restart(), &[])
    }));
    // librdkafka prefetches up to 10,000 records (4 MiB) per partition, 4 partitions here: a
    // backlog smaller than that does not fill it, so the worker's resident set grows up to
    // that bound (smaller prefetches cost 4× the rate: the release bench). Flat from a backlog
    // that fills it.
    cells.push(cell("backlog growth", || {
        backlog(&target, 200_000, 1_000_000)
    }));
    report("kafka", cells);
}

#[test]
fn faults_sqlite() {
    let _serial = serial();
    // The embedded broker: no network between worker and broker, so the network faults do not
    // apply; two worker processes share one database file.
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path().to_path_buf();
    let target = |sub: &str| Target {
        kind: "sqlite",
        env: Box::new({
            let file = root.join(format!("{sub}.db"));
            move |_| vec![("STEVEDORE_BROKER__PATH".into(), file.display().to_string())]
        }),
        addr: addr(0),
        batch: 32,
        broker_toml: String::new(),
        call_timeout: Duration::from_secs(10),
        jobs: 4000,
        proxy_at: None,
    };
    let cells =
        vec![
            cell("kill -9 of 1 of 2", || kill_one(&target("kill"), 10_000)),
            cell("1% poison", || poison(&target, 10_000)),
            cell("backlog growth", || backlog(&target, 10_000, 1_000_000)),
            cell("broker restart", || {
                Ok("n/a: the broker is the worker's own file; a worker's restart after a crash is \
                the kill row"
                .into())
            }),
        ];
    report("sqlite", cells);
}
