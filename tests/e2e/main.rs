//! End-to-end tests: the real worker binary, a real config file, real signals. They check what a user
//! observes from outside: which jobs ran and how often, exit codes, the HTTP endpoints, error text.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

mod browser;
mod faults;

const WORKER: &str = env!("CARGO_BIN_EXE_e2e_worker");

/// One test at a time: several start broker nodes or measure timings, and the machine has 2 cores.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

struct Run {
    child: Reaped,
    out: PathBuf,
    port: u16,
    /// Where the worker runs (its working directory, config, logs and default store).
    dir: PathBuf,
    /// Suffix of its file names.
    name: String,
    _owned: Option<tempfile::TempDir>,
}

/// A worker process that is killed if its test ends (or panics) while it still runs, so a failed
/// test leaves no worker behind writing to the shared brokers.
struct Reaped(Child);

impl std::ops::Deref for Reaped {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Reaped {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A free loopback port for a worker's HTTP server: the suite's (below the ephemeral range,
/// each handed out once per process).
fn free_port() -> u16 {
    stevedore_conformance::servers::free_port().unwrap_or_else(|e| panic!("{e}"))
}

fn start(config: &str, jobs: u64, sleep_ms: u64) -> Run {
    start_with(config, jobs, sleep_ms, &[])
}

fn start_with(config: &str, jobs: u64, sleep_ms: u64, env: &[(&str, &str)]) -> Run {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut run = start_in(dir.path(), "", config, jobs, sleep_ms, env);
    run._owned = Some(dir);
    run
}

/// A worker in `dir` (shared with other workers of the test: the default SQLite store is
/// `dir/stevedore.db`); its files are named with `name` (`out{name}.txt`, ...).
fn start_in(
    dir: &Path,
    name: &str,
    config: &str,
    jobs: u64,
    sleep_ms: u64,
    env: &[(&str, &str)],
) -> Run {
    let cfg = dir.join(format!("worker{name}.toml"));
    std::fs::write(&cfg, config).expect("write config");
    let out = dir.join(format!("out{name}.txt"));
    let port = free_port();
    let child = Command::new(WORKER)
        .args(["run", "--config"])
        .arg(&cfg)
        // The default broker is the SQLite file stevedore.db in the working directory: each
        // run gets its own.
        .current_dir(dir)
        .env("E2E_OUT", &out)
        .env("E2E_JOBS", jobs.to_string())
        .env("E2E_SLEEP_MS", sleep_ms.to_string())
        .env("STEVEDORE_HTTP__BIND", format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "info")
        .envs(env.iter().copied())
        // Files, not pipes: an unread pipe would block a chatty worker.
        .stdout(std::fs::File::create(dir.join(format!("stdout{name}.txt"))).expect("stdout file"))
        .stderr(std::fs::File::create(dir.join(format!("stderr{name}.txt"))).expect("stderr file"))
        .spawn()
        .expect("start the worker binary");
    Run {
        child: Reaped(child),
        out,
        port,
        dir: dir.to_path_buf(),
        name: name.to_string(),
        _owned: None,
    }
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "kill {sig} failed");
}

/// What a finished worker left: exit status and its log (stderr).
struct Output {
    status: std::process::ExitStatus,
    stderr: Vec<u8>,
}

fn finish(run: Run, limit: Duration) -> (Output, Duration, Vec<String>) {
    let t = Instant::now();
    let Run {
        mut child,
        out,
        dir,
        name,
        _owned,
        ..
    } = run;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if t.elapsed() > limit {
            let _ = child.kill();
            let log =
                std::fs::read_to_string(dir.join(format!("stderr{name}.txt"))).unwrap_or_default();
            panic!("worker did not exit within {limit:?}; its log:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let read = |f: &str| std::fs::read(dir.join(format!("{f}{name}.txt"))).unwrap_or_default();
    let output = Output {
        status,
        stderr: read("stderr"),
    };
    (output, t.elapsed(), lines(&out))
}

fn get(port: u16, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the worker's HTTP port");
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .expect("send request");
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    let status = resp
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

/// Count of "start"/"done" lines per job number.
fn tally(lines: &[String], kind: &str) -> BTreeMap<u64, usize> {
    let mut m = BTreeMap::new();
    for l in lines {
        let mut p = l.split(' ');
        if p.next() == Some(kind) {
            if let Some(n) = p.next().and_then(|n| n.parse().ok()) {
                *m.entry(n).or_insert(0) += 1;
            }
        }
    }
    m
}

const CONFIG: &str = r#"
[worker]
concurrency = 8
shutdown_timeout = "10s"
poll_wait = "200ms"

[autoscale]
interval = "200ms"

[queues.default]
concurrency = 8
"#;

#[test]
fn runs_every_job_once_and_serves_http() {
    let _serial = serial();
    let run = start(CONFIG, 200, 5);
    let port = run.port;
    let out = run.out.clone();
    wait_until("all 200 jobs done", Duration::from_secs(30), || {
        tally(&lines(&out), "done").len() == 200
    });
    let (status, body) = get(port, "/readyz");
    assert_eq!(status, 200, "ready while running: {body}");
    // A job's counter moves just after its handler wrote its line: allow a moment.
    let counted = "stevedore_jobs_processed_total{queue=\"default\",job=\"work\"} 200";
    let asked = Instant::now();
    loop {
        let (status, metrics) = get(port, "/metrics");
        if status == 200 && metrics.contains(counted) {
            break;
        }
        assert!(
            asked.elapsed() < Duration::from_secs(5),
            "metrics count every job (status {status}):\n{metrics}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
    wait_until("a scale hint", Duration::from_secs(5), || {
        get(port, "/scale/default").0 == 200
    });
    let (_, hint) = get(port, "/scale/default");
    assert!(hint.contains("\"desired_workers\""), "{hint}");
    signal(&run.child, "-TERM");
    let (output, took, lines) = finish(run, Duration::from_secs(15));
    assert_eq!(
        output.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        took < Duration::from_secs(5),
        "idle worker stops fast, took {took:?}"
    );
    let done = tally(&lines, "done");
    assert!(
        done.values().all(|&c| c == 1),
        "each job exactly once: {done:?}"
    );
}

#[test]
fn sigterm_lets_in_flight_jobs_finish_and_starts_no_new_ones() {
    let _serial = serial();
    // 8 slots, 40 jobs of 700 ms: at SIGTERM about 8 are running and the rest wait.
    let run = start(CONFIG, 40, 700);
    let out = run.out.clone();
    wait_until("jobs running", Duration::from_secs(20), || {
        tally(&lines(&out), "start").len() >= 8
    });
    signal(&run.child, "-TERM");
    let (output, took, lines) = finish(run, Duration::from_secs(20));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "stderr: {stderr}");
    let started = tally(&lines, "start");
    let done = tally(&lines, "done");
    assert_eq!(
        started.keys().collect::<Vec<_>>(),
        done.keys().collect::<Vec<_>>(),
        "every started job finished"
    );
    assert!(
        started.values().chain(done.values()).all(|&c| c == 1),
        "nothing ran twice: {started:?}"
    );
    assert!(
        started.len() < 40,
        "no new jobs after SIGTERM: {} started",
        started.len()
    );
    assert!(took < Duration::from_secs(5), "drain took {took:?}");
    assert!(stderr.contains("drained=true"), "{stderr}");
}

#[test]
fn drain_deadline_releases_unfinished_jobs() {
    let _serial = serial();
    let config = CONFIG.replace("shutdown_timeout = \"10s\"", "shutdown_timeout = \"1s\"");
    let run = start(&config, 4, 60_000);
    let out = run.out.clone();
    wait_until("4 long jobs running", Duration::from_secs(20), || {
        tally(&lines(&out), "start").len() == 4
    });
    signal(&run.child, "-TERM");
    let (output, took, lines) = finish(run, Duration::from_secs(20));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "stderr: {stderr}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "deadline 1s, took {took:?}"
    );
    assert!(
        tally(&lines, "done").is_empty(),
        "the long jobs were cut short, not finished"
    );
    assert_eq!(
        stderr.matches("job released for another worker").count(),
        4,
        "{stderr}"
    );
}

#[test]
fn second_signal_exits_at_once() {
    let _serial = serial();
    let run = start(CONFIG, 2, 60_000);
    let out = run.out.clone();
    wait_until("jobs running", Duration::from_secs(20), || {
        tally(&lines(&out), "start").len() == 2
    });
    signal(&run.child, "-TERM");
    std::thread::sleep(Duration::from_millis(300));
    signal(&run.child, "-INT");
    let (output, took, _) = finish(run, Duration::from_secs(5));
    assert_eq!(output.status.code(), Some(130));
    assert!(took < Duration::from_secs(2), "took {took:?}");
}

#[test]
fn bad_config_fails_at_start_naming_file_and_key() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("temp dir");
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "[queues.emails]\nconcurency = 4\n").expect("write");
    let output = Command::new(WORKER)
        .args(["run", "--config"])
        .arg(&cfg)
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("bad.toml"), "names the file: {stderr}");
    assert!(stderr.contains("concurency"), "names the key: {stderr}");
    assert!(
        stderr.contains("concurrency"),
        "says what is allowed: {stderr}"
    );

    std::fs::write(&cfg, "[queues.emails]\nconcurrency = 0\n").expect("write");
    let output = Command::new(WORKER)
        .args(["config", "check", "--config"])
        .arg(&cfg)
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("queues.emails.concurrency"), "{stderr}");
}

#[test]
fn config_check_redacts_secrets_and_lists_notices() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("temp dir");
    let cfg = dir.path().join("ok.toml");
    std::fs::write(
        &cfg,
        "[queues.emails]\nweights = { high = 3, normal = 1 }\n",
    )
    .expect("write");
    let output = Command::new(WORKER)
        .args(["config", "check", "--config"])
        .arg(&cfg)
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("config OK"), "{stdout}");
    assert!(
        stdout.contains("delay"),
        "notices say how delay works: {stdout}"
    );
}

/// Worker settings of the kill tests: 8 at a time, a 2 s lease (a killed worker's jobs come back
/// after it), a 10 s drain.
const KILL_WORKER: &str = r#"
[worker]
concurrency = 8
shutdown_timeout = "10s"
poll_wait = "200ms"

[queues.default]
concurrency = 8
lease = "2s"
"#;

/// SIGKILLs `a` (no drain, no release, no final ack flush); returns the jobs it had started but
/// not finished. `a` stays alive: its directory holds its output.
fn kill_hard(a: &mut Run) -> Vec<u64> {
    let _ = a.child.kill();
    let _ = a.child.wait();
    let l = lines(&a.out);
    let done = tally(&l, "done");
    tally(&l, "start")
        .into_keys()
        .filter(|n| !done.contains_key(n))
        .collect()
}

/// After worker A was killed with `unfinished_a` in flight: waits until `jobs` distinct jobs are
/// done by A or B, stops B with SIGTERM and checks that it exited 0, ran nothing twice and
/// finished everything A was running. Returns (done by A, done by B, done by both).
fn take_over(
    out_a: &Path,
    b: Run,
    jobs: u64,
    unfinished_a: &[u64],
    limit: Duration,
) -> (BTreeMap<u64, usize>, BTreeMap<u64, usize>, Vec<u64>) {
    let out_b = b.out.clone();
    wait_until("every job done by A or B", limit, || {
        let mut all = tally(&lines(out_a), "done");
        all.extend(tally(&lines(&out_b), "done"));
        all.len() as u64 == jobs
    });
    signal(&b.child, "-TERM");
    let (output, _, lines_b) = finish(b, Duration::from_secs(20));
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let done_a = tally(&lines(out_a), "done");
    let done_b = tally(&lines_b, "done");
    assert!(done_b.values().all(|&c| c == 1), "B ran nothing twice");
    assert!(
        unfinished_a.iter().all(|n| done_b.contains_key(n)),
        "B finished every job A was running when it died: {unfinished_a:?}"
    );
    let twice = done_b
        .keys()
        .filter(|n| done_a.contains_key(n))
        .copied()
        .collect();
    (done_a, done_b, twice)
}

/// Redis, two worker processes sharing a queue: one is killed with SIGKILL mid-run; the other
/// finishes every job (the dead one's after their lease). Nothing is lost.
#[test]
fn redis_two_workers_one_killed_loses_nothing() {
    let _serial = serial();
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into());
    let prefix = format!("e2e{}-{}:", std::process::id(), free_port());
    let _cleanup = stevedore_conformance::servers::RedisKeys {
        url: url.clone(),
        prefix: prefix.clone(),
    };
    let config = format!("[broker]\nkind = \"redis\"\n{KILL_WORKER}");
    let env = [
        ("STEVEDORE_BROKER__URL", url.as_str()),
        ("STEVEDORE_BROKER__KEY_PREFIX", prefix.as_str()),
    ];
    let spawn = |jobs: u64| start_with(&config, jobs, 40, &env);
    const JOBS: u64 = 2000; // 10 s of work for A alone: B, a new process, joins well before the end
    let a = spawn(JOBS);
    let out_a = a.out.clone();
    wait_until(
        "worker A enqueued and started",
        Duration::from_secs(30),
        || {
            let l = lines(&out_a);
            l.iter().any(|x| x == "enqueued") && tally(&l, "done").len() >= 20
        },
    );
    let b = spawn(0);
    let out_b = b.out.clone();
    wait_until("worker B working", Duration::from_secs(30), || {
        !tally(&lines(&out_b), "done").is_empty()
    });
    // Kill A hard while it holds jobs.
    let mut a = a;
    let unfinished_a = kill_hard(&mut a);
    let (done_a, done_b, twice) =
        take_over(&out_a, b, JOBS, &unfinished_a, Duration::from_secs(60));
    // At-least-once: only jobs A had finished but not yet acked when it died may run twice.
    assert!(twice.len() <= 8 + 100, "too many duplicates: {twice:?}");
    // Leave the shared Redis as we found it.
    if let Ok(mut c) = redis::Client::open(url.as_str()).and_then(|c| c.get_connection()) {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}*"))
            .query(&mut c)
            .unwrap_or_default();
        if !keys.is_empty() {
            let _: Result<(), _> = redis::cmd("DEL").arg(&keys).query(&mut c);
        }
    }
    eprintln!(
        "redis e2e: A done {}, B done {}, {} in flight when A was killed (all finished by B), {} ran on both",
        done_a.len(),
        done_b.len(),
        unfinished_a.len(),
        twice.len()
    );
}

/// The real worker on `kind` at `url` runs 3,000 jobs (8 at a time); `restart` takes the broker
/// down and up again once a third are done. Every job must be done, the worker must exit 0 on
/// SIGTERM, and a job may run twice only if it was in flight or its ack was on the wire when the
/// connection went (at most 2 × concurrency), or its enqueue was retried after a lost confirm (+1).
fn restart_mid_run(kind: &str, url: &str, restart: impl FnOnce() -> Result<(), String>) {
    const JOBS: u64 = 3000;
    const CONCURRENCY: usize = 8;
    let config = format!(
        "[broker]\nkind = \"{kind}\"\n\n[worker]\nconcurrency = {CONCURRENCY}\npoll_wait = \"200ms\"\n\n\
         [queues.default]\nconcurrency = {CONCURRENCY}\nbatch = 8\nlease = \"3s\"\n"
    );
    let run = start_with(&config, JOBS, 3, &[("STEVEDORE_BROKER__URL", url)]);
    let out = run.out.clone();
    wait_until("a third done", Duration::from_secs(90), || {
        tally(&lines(&out), "done").len() as u64 >= JOBS / 3
    });
    let began = Instant::now();
    restart().unwrap_or_else(|e| panic!("{e}"));
    let restart_took = began.elapsed();
    let done_at_restart = tally(&lines(&out), "done").len();
    wait_until(
        "every job done after the restart",
        Duration::from_secs(120),
        || tally(&lines(&out), "done").len() as u64 == JOBS,
    );
    signal(&run.child, "-TERM");
    let (output, _, lines) = finish(run, Duration::from_secs(15));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    let done = tally(&lines, "done");
    assert_eq!(done.len() as u64, JOBS, "every job done");
    let twice: Vec<u64> = done
        .iter()
        .filter(|(_, &c)| c > 1)
        .map(|(n, _)| *n)
        .collect();
    if stderr.contains("receive failed") {
        assert!(
            stderr.contains("receive works again"),
            "the recovery is logged: {stderr}"
        );
    }
    let bound = 2 * CONCURRENCY + 1;
    assert!(
        twice.len() <= bound,
        "{} jobs ran twice (bound {bound}): {twice:?}",
        twice.len()
    );
    eprintln!(
        "{kind} restart e2e: {JOBS} jobs, restart (took {restart_took:?}) after {done_at_restart} done, \
         all done, {} ran twice, {} receive errors logged",
        twice.len(),
        stderr.matches("receive failed").count()
    );
}

/// Redis restarts (down for a second) in the middle of a run: the worker reconnects with backoff
/// and every job is done; nothing is lost.
#[test]
fn redis_restart_mid_run_loses_nothing() {
    let _serial = serial();
    let server =
        stevedore_conformance::servers::RedisServer::start().unwrap_or_else(|e| panic!("{e}"));
    restart_mid_run("redis", &server.url(), || {
        server.restart(Duration::from_secs(1))
    });
}

/// RabbitMQ restarts in the middle of a run (a private server on free loopback ports, stopped
/// gracefully and started again on the same data): the worker reconnects with backoff and every job
/// is done; nothing is lost. A job runs twice only if it was in flight when the connection went
/// (the broker requeues unacked deliveries, so a job that finished but whose ack did not reach the
/// broker runs again) or its enqueue was retried after a lost confirm.
#[test]
fn rabbitmq_restart_mid_run_loses_nothing() {
    let _serial = serial();
    let server =
        stevedore_conformance::servers::RabbitServer::start().unwrap_or_else(|e| panic!("{e}"));
    let url = server.url();
    restart_mid_run("rabbitmq", &url, || server.restart(Duration::from_secs(1)));
    // Nothing left behind on the broker.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let left = rt.block_on(async {
        use stevedore::Broker;
        let b = stevedore_rabbitmq::RabbitBroker::connect(stevedore_rabbitmq::RabbitConfig::new(
            url.as_str(),
        ))
        .await
        .expect("connect");
        let d = b.depth("default").await.expect("depth");
        let delayed = b.delayed_total().await.expect("delayed total");
        let _ = b.close().await;
        (d.ready, d.in_flight, delayed)
    });
    assert_eq!(
        left,
        (0, 0, 0),
        "the queue (ready, in flight) and the private node's delay levels are empty at the end"
    );
}

/// The default backend (the SQLite file in the working directory), the real worker binary:
/// 5,000 jobs, SIGKILL mid-run, a fresh worker on the same file finishes them. Meanwhile a second
/// process enqueues a job and reads stats from the file the worker is using. Nothing is lost;
/// only what the killed worker held (running, or done but not yet acked) runs twice.
#[test]
fn sqlite_worker_killed_mid_run_loses_nothing() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("temp dir");
    let config = KILL_WORKER;
    const JOBS: u64 = 5_000;
    let a = start_in(dir.path(), "-a", config, JOBS, 10, &[]);
    let out_a = a.out.clone();
    wait_until(
        "worker A enqueued 5,000 and ran 500",
        Duration::from_secs(120),
        || {
            let l = lines(&out_a);
            l.iter().any(|x| x == "enqueued") && tally(&l, "done").len() >= 500
        },
    );
    // A second process, on the same file, while the worker runs.
    let cli = |args: &[&str]| {
        let out = Command::new(WORKER)
            .args(args)
            .current_dir(dir.path())
            .env("STEVEDORE_HTTP__ENABLED", "false")
            .output()
            .expect("run the CLI");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !String::from_utf8_lossy(&out.stderr).contains("keeps queues inside one process"),
            "no single-process warning for sqlite"
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    cli(&[
        "enqueue",
        "work",
        &format!("{{\"n\":{JOBS},\"sleep_ms\":0}}"),
    ]);
    let stats: serde_json::Value =
        serde_json::from_str(&cli(&["stats", "--json"])).expect("stats --json");
    let ready = stats
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["level"] == "normal"))
        .and_then(|r| r["depth"]["ready"].as_u64())
        .unwrap_or(0);
    assert!(
        ready > 0,
        "stats from another process sees the backlog: {stats}"
    );

    let mut a = a;
    let unfinished_a = kill_hard(&mut a);
    let b = start_in(dir.path(), "-b", config, 0, 1, &[]);
    let (done_a, done_b, twice) =
        take_over(&out_a, b, JOBS + 1, &unfinished_a, Duration::from_secs(120));
    assert!(
        done_a.values().all(|&c| c == 1),
        "A ran nothing twice before it died"
    );
    // Only jobs A finished whose ack had not been committed yet may run again: at most the
    // jobs in flight plus one ack batch (the worker acks in batches of what finished meanwhile).
    assert!(twice.len() <= 8 + 64, "too many duplicates: {twice:?}");
    // And the store is empty afterwards: every job acked, none left behind.
    let stats: serde_json::Value =
        serde_json::from_str(&cli(&["stats", "--json"])).expect("stats --json");
    for row in stats.as_array().into_iter().flatten() {
        assert_eq!(row["depth"]["ready"], 0, "{stats}");
        assert_eq!(row["depth"]["in_flight"], 0, "{stats}");
    }
    eprintln!(
        "sqlite e2e: A done {}, B done {}, {} in flight when A was killed (all finished by B), {} ran on both",
        done_a.len(),
        done_b.len(),
        unfinished_a.len(),
        twice.len()
    );
}

/// SQS (a private moto server), two worker processes sharing a standard queue: one is killed with
/// SIGKILL mid-run; the other finishes every job, the dead one's once their visibility timeout
/// (the 2 s lease) ends. Nothing is lost. Endpoint, region and static credentials are explicit,
/// so nothing reaches for the AWS credential chain or the instance-metadata address. 1,500 jobs
/// of 200 ms, 8 at a time (40 a second per worker): moto takes ~15 s to take in the enqueue, and
/// with short jobs A had run them all by then, before B was even started.
#[test]
fn sqs_two_workers_one_killed_loses_nothing() {
    let _serial = serial();
    let server =
        stevedore_conformance::servers::MotoServer::start().unwrap_or_else(|e| panic!("{e}"));
    let endpoint = server.endpoint();
    let config = format!("[broker]\nkind = \"sqs\"\n{KILL_WORKER}batch = 10\n");
    let env = [
        ("STEVEDORE_BROKER__REGION", "us-east-1"),
        ("STEVEDORE_BROKER__ENDPOINT", endpoint.as_str()),
        ("STEVEDORE_BROKER__ACCESS_KEY_ID", "testing"),
        ("STEVEDORE_BROKER__SECRET_ACCESS_KEY", "testing"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ];
    let spawn = |jobs: u64| start_with(&config, jobs, 200, &env);
    // Only jobs A had finished but whose delete had not reached SQS may run twice.
    kill_one_of_two("sqs", spawn, 8 + 10);
}

/// Kafka (a private nisshi broker), two worker processes in one consumer group per queue level:
/// one is killed with SIGKILL mid-run; the group's session timeout (6 s) gives its partitions to
/// the other, which restores each partition's checkpoint and finishes every job. Nothing is
/// lost. A job may run on both only if A was running it when B joined (the rebalance moved its
/// partition and A's ack answered LeaseLost) or when A died, or A had finished it but its ack
/// had not been flushed: at most twice A's 8 slots plus one ack batch.
#[test]
fn kafka_two_workers_one_killed_loses_nothing() {
    let _serial = serial();
    let server =
        stevedore_conformance::servers::KafkaServer::start().unwrap_or_else(|e| panic!("{e}"));
    let bootstrap = server.bootstrap();
    let config = format!(
        "[broker]\nkind = \"kafka\"\npartitions = 4\nsession_timeout = \"6s\"\n{KILL_WORKER}"
    );
    let env = [("STEVEDORE_BROKER__BOOTSTRAP", bootstrap.as_str())];
    let spawn = |jobs: u64| start_with(&config, jobs, 200, &env);
    kill_one_of_two("kafka", spawn, 2 * 8 + 16);
}

/// Kafka keeps no delivery count, so a job that aborts its worker every time must still end:
/// with `max_attempts = 3`, job 2 of 5 aborts worker after worker (each restarted at once, as
/// a supervisor would). It runs exactly 3 times (attempts 1, 2, 3: its first hand-out is
/// covered by the backend's written reservation, each later one by its count written before
/// it goes out), then the next worker dead-letters it without running it; the other 4 jobs
/// are done, none dead-lettered.
#[test]
fn kafka_a_job_that_kills_its_worker_ends_in_the_dead_letters() {
    let _serial = serial();
    let server =
        stevedore_conformance::servers::KafkaServer::start().unwrap_or_else(|e| panic!("{e}"));
    let bootstrap = server.bootstrap();
    let config = "[broker]\nkind = \"kafka\"\npartitions = 1\nsession_timeout = \"6s\"\n\
                  [retry]\nmax_attempts = 3\n\
                  [worker]\nconcurrency = 1\npoll_wait = \"200ms\"\n";
    let env = [
        ("STEVEDORE_BROKER__BOOTSTRAP", bootstrap.as_str()),
        ("E2E_ABORT_N", "2"),
    ];
    let dir = tempfile::tempdir().expect("temp dir");
    let starts = |dir: &Path| -> Vec<String> {
        (0..8)
            .flat_map(|i| lines(&dir.join(format!("out{i}.txt"))))
            .collect()
    };
    let mut run = start_in(dir.path(), "0", config, 5, 10, &env);
    let mut aborted = 0;
    for i in 1..8 {
        // Until this worker dies, or has dead-lettered job 2 and done the other four.
        let t = Instant::now();
        let exited = loop {
            if let Some(status) = run.child.try_wait().expect("wait") {
                break Some(status);
            }
            let all = starts(dir.path());
            let done = tally(&all, "done");
            let up = done.len() == 4 && TcpStream::connect(("127.0.0.1", run.port)).is_ok();
            if up
                && get(run.port, "/metrics").1.contains(
                    "stevedore_jobs_dead_lettered_total{queue=\"default\",job=\"work\"} 1",
                )
            {
                break None;
            }
            assert!(
                t.elapsed() < Duration::from_secs(90),
                "worker {} neither died nor finished within 90s; starts so far: {all:?}",
                i - 1
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        match exited {
            Some(status) => {
                assert!(!status.success(), "worker {} exited cleanly", i - 1);
                aborted += 1;
                run = start_in(dir.path(), &i.to_string(), config, 0, 10, &env);
            }
            None => break,
        }
    }
    let all = starts(dir.path());
    let poison: Vec<&String> = all.iter().filter(|l| l.starts_with("start 2 ")).collect();
    assert_eq!(
        poison,
        ["start 2 1", "start 2 2", "start 2 3"]
            .iter()
            .collect::<Vec<_>>(),
        "job 2 runs at attempts 1, 2 and 3 only ({aborted} workers aborted); all lines: {all:?}"
    );
    assert_eq!(aborted, 3, "three workers died on job 2");
    let done = tally(&all, "done");
    assert_eq!(done.keys().copied().collect::<Vec<u64>>(), vec![0, 1, 3, 4]);
    // Jobs 0 and 1 succeeded just before the first crash, within the ack-write interval: they
    // may run once more (at least once), never more. From then on every hand-out is a second
    // one, written before it goes out with the acks before it: no later crash repeats them
    // (before that write existed, job 1 ran again after every crash and was dead-lettered as a
    // crash loop itself). Jobs 3 and 4 were never out before the poison job was dead-lettered.
    for job in [0, 1, 3, 4] {
        let runs: Vec<&String> = all
            .iter()
            .filter(|l| l.starts_with(&format!("start {job} ")))
            .collect();
        let most = if job < 2 { 2 } else { 1 };
        assert!(
            (1..=most).contains(&runs.len()),
            "job {job} ran {} times (at most {most}); all lines: {all:?}",
            runs.len()
        );
    }
    signal(&run.child, "-TERM");
    let (output, _, _) = finish(run, Duration::from_secs(20));
    assert_eq!(output.status.code(), Some(0));
}

/// The kill test of the slow brokers: worker A enqueues 1,500 jobs of 200 ms and starts on them;
/// once worker B has done a job, A is SIGKILLed. Every job must end up done, B runs none twice
/// and finishes what A was running, and at most `duplicates` ran on both.
fn kill_one_of_two(backend: &str, spawn: impl Fn(u64) -> Run, duplicates: usize) {
    const JOBS: u64 = 1500;
    let a = spawn(JOBS);
    let out_a = a.out.clone();
    wait_until(
        "worker A enqueued and started",
        Duration::from_secs(60),
        || {
            let l = lines(&out_a);
            l.iter().any(|x| x == "enqueued") && tally(&l, "done").len() >= 20
        },
    );
    let b = spawn(0);
    let out_b = b.out.clone();
    let b_started = std::time::Instant::now();
    while tally(&lines(&out_b), "done").is_empty() {
        if b_started.elapsed() > Duration::from_secs(60) {
            let dir = out_b.parent().expect("dir");
            panic!(
                "worker B did no job within 60 s (A done {}); B's stderr:\n{}",
                tally(&lines(&out_a), "done").len(),
                std::fs::read_to_string(dir.join("stderr.txt")).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut a = a;
    let unfinished_a = kill_hard(&mut a);
    let done_before_kill = tally(&lines(&out_a), "done").len() as u64;
    assert!(
        done_before_kill < JOBS,
        "A finished all {JOBS} jobs before it was killed: the test proves nothing"
    );
    let (done_a, done_b, twice) =
        take_over(&out_a, b, JOBS, &unfinished_a, Duration::from_secs(180));
    assert!(twice.len() <= duplicates, "too many duplicates: {twice:?}");
    eprintln!(
        "{backend} e2e: A done {}, B done {}, {} in flight when A was killed (all finished by B), {} ran on both",
        done_a.len(),
        done_b.len(),
        unfinished_a.len(),
        twice.len()
    );
}

/// Stops `run` with SIGTERM and checks that it exits 0 within 15 s; returns its log.
fn stop_cleanly(run: Run) -> String {
    signal(&run.child, "-TERM");
    let (output, _, _) = finish(run, Duration::from_secs(15));
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    stderr
}

/// Runs the worker binary's CLI in `dir` with `config` (and `stdin`); returns (exit code, stdout,
/// stderr).
fn cli_in(dir: &Path, config: &Path, args: &[&str], stdin: &str) -> (Option<i32>, String, String) {
    let mut child = Command::new(WORKER)
        .args(args)
        .arg("--config")
        .arg(config)
        .current_dir(dir)
        .env("STEVEDORE_HTTP__ENABLED", "false")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run the CLI");
    if let Some(mut i) = child.stdin.take() {
        i.write_all(stdin.as_bytes()).expect("write stdin");
    }
    let out = child.wait_with_output().expect("wait for the CLI");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A command whose reader goes away (`... | head -1`) ends quietly with exit 0, not with a panic
/// about a broken pipe.
#[test]
fn a_command_whose_reader_goes_away_ends_quietly() {
    use std::io::BufRead;
    let _serial = serial();
    let dir = tempfile::tempdir().expect("temp dir");
    let cfg = dir.path().join("pipe.toml");
    std::fs::write(&cfg, "[queues.default]\n").expect("config");
    let mut child = Command::new(WORKER)
        .args([
            "enqueue",
            "work",
            "{\"n\":1,\"sleep_ms\":0}",
            "--count",
            "5000",
        ])
        .arg("--config")
        .arg(&cfg)
        .current_dir(dir.path())
        .env("STEVEDORE_HTTP__ENABLED", "false")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run the CLI");
    let stdout = child.stdout.take().expect("stdout");
    let mut first = String::new();
    std::io::BufReader::new(stdout)
        .read_line(&mut first)
        .expect("one line");
    assert_eq!(first.trim().len(), 36, "an id: {first}");
    // The reader is gone now: 5,000 ids do not fit in a pipe's buffer.
    let out = child.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// `enqueue` refuses what no worker of this binary and config would take (a job without a
/// handler, a queue the config does not define), naming what exists, unless `--force`; reads the
/// payload from stdin (`-`) or a file (`@FILE`); `dlq list --limit` says how many there are in all.
#[test]
fn enqueue_refuses_what_no_worker_takes_and_reads_payloads_from_stdin_and_files() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("temp dir");
    let config = "[worker]\npoll_wait = \"100ms\"\n\n[autoscale]\ntarget_per_worker = 2\n\n\
                  [queues.default]\nconcurrency = 4\n";
    let cfg = dir.path().join("cli.toml");
    std::fs::write(&cfg, config).expect("write config");
    let cli = |args: &[&str], stdin: &str| cli_in(dir.path(), &cfg, args, stdin);

    let (code, _, err) = cli(&["enqueue", "nosuch", "{}"], "");
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("no handler is registered for job \"nosuch\"") && err.contains("work"),
        "names the job and the ones there are: {err}"
    );
    assert!(err.contains("--force"), "{err}");
    let (code, _, err) = cli(&["enqueue", "work", "{}", "--queue", "elsewhere"], "");
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("queue \"elsewhere\" is not defined in")
            && err.contains("cli.toml")
            && err.contains("default"),
        "names the queue, the file and the queues there are: {err}"
    );
    let (code, _, err) = cli(&["enqueue", "work", "@missing.json"], "");
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("missing.json"), "{err}");
    // A level the queue does not serve: the job would wait where no worker looks.
    let (code, _, err) = cli(&["enqueue", "work", "{}", "--priority", "high"], "");
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("queue \"default\" serves only normal") && err.contains("--priority"),
        "{err}"
    );
    let ready = || {
        let (_, out, _) = cli(&["stats", "--json"], "");
        let v: serde_json::Value = serde_json::from_str(&out).expect("stats --json");
        v.as_array()
            .and_then(|rows| rows.iter().find(|r| r["level"] == "normal"))
            .and_then(|r| r["depth"]["ready"].as_u64())
            .unwrap_or(0)
    };
    assert_eq!(ready(), 0, "nothing refused was sent");

    // From stdin, from a file, and forced: three jobs without a handler.
    std::fs::write(dir.path().join("job.json"), r#"{"n":2,"sleep_ms":0}"#).expect("write");
    for (args, stdin) in [
        (vec!["enqueue", "work", "-"], r#"{"n":1,"sleep_ms":0}"#),
        (vec!["enqueue", "work", "@job.json"], ""),
        (
            vec!["enqueue", "nosuch", "{}", "--force", "--count", "3"],
            "",
        ),
    ] {
        let (code, out, err) = cli(&args, stdin);
        assert_eq!(code, Some(0), "{args:?}: {err}");
        assert!(!out.trim().is_empty(), "prints the id(s)");
    }
    assert_eq!(ready(), 5);
    // The autoscale hint: ceil(5 / 2) workers, in the table and in the JSON.
    let (_, table, _) = cli(&["stats"], "");
    assert!(
        table.contains("autoscale: default wants 3 worker(s)"),
        "{table}"
    );
    let (_, out, _) = cli(&["stats", "--json"], "");
    let v: serde_json::Value = serde_json::from_str(&out).expect("stats --json");
    assert!(
        v.as_array()
            .is_some_and(|rows| rows.iter().all(|r| r["desired_workers"] == 3)),
        "{v}"
    );

    // A worker runs the two and dead-letters the three as unroutable.
    let run = start_in(dir.path(), "", config, 0, 0, &[]);
    let out = run.out.clone();
    wait_until("both jobs done", Duration::from_secs(30), || {
        tally(&lines(&out), "done").len() == 2
    });
    wait_until("three dead letters", Duration::from_secs(30), || {
        cli(&["dlq", "list"], "").1.contains("3 dead letter(s)")
    });
    stop_cleanly(run);
    let (code, out, err) = cli(&["dlq", "list", "--limit", "1"], "");
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("1 of 3 dead letter(s)"),
        "shown of total: {out}"
    );
}

/// A worker started before its broker (compose, Kubernetes) keeps trying, logging each attempt,
/// and runs once the broker is up; one that never comes up makes it exit 1 (a broker failure,
/// not a bad config) after `[worker] startup_timeout`, saying so.
#[test]
fn run_waits_for_a_broker_that_starts_late_and_gives_up_after_startup_timeout() {
    let _serial = serial();
    let server =
        stevedore_conformance::servers::RedisServer::start().unwrap_or_else(|e| panic!("{e}"));
    server.stop();
    let config = |timeout: &str| {
        format!(
            "[broker]\nkind = \"redis\"\nurl = \"{}\"\nkey_prefix = \"e2e-late-{}.\"\n\n\
             [worker]\nstartup_timeout = \"{timeout}\"\npoll_wait = \"200ms\"\n",
            server.url(),
            std::process::id()
        )
    };

    // Never up: exit 1 after the timeout, with the reason.
    let run = start_with(&config("2s"), 0, 0, &[]);
    let (output, took, _) = finish(run, Duration::from_secs(30));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(took < Duration::from_secs(15), "gave up in {took:?}");
    assert!(stderr.contains("startup_timeout"), "{stderr}");
    assert!(stderr.contains("broker.url"), "names the key: {stderr}");

    // Up once the worker has logged a failed attempt (the Redis client's own reconnects take
    // ~5-10 s, more on a loaded machine, so no fixed wait): the worker waits, logging, then runs
    // every job.
    let run = start_with(&config("60s"), 20, 0, &[]);
    let log = run.dir.join(format!("stderr{}.txt", run.name));
    wait_until("a failed attempt logged", Duration::from_secs(45), || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("cannot reach the redis broker yet")
    });
    server
        .restart(Duration::ZERO)
        .unwrap_or_else(|e| panic!("{e}"));
    let out = run.out.clone();
    wait_until("every job done", Duration::from_secs(60), || {
        tally(&lines(&out), "done").len() == 20
    });
    let stderr = stop_cleanly(run);
    assert!(
        stderr.contains("cannot reach the redis broker yet"),
        "each attempt is logged: {stderr}"
    );
    assert!(stderr.contains("reached the redis broker"), "{stderr}");
}

/// The machine's Redis keeps nothing on disk: a worker says so once at start; the CLI's commands,
/// which hold no jobs, do not repeat it every time.
#[test]
fn redis_volatility_warning_comes_once_per_worker_not_with_every_command() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("temp dir");
    let config = format!(
        "[broker]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:6379/0\"\nkey_prefix = \"e2e-warn-{}.\"\n",
        std::process::id()
    );
    let cfg = dir.path().join("redis.toml");
    std::fs::write(&cfg, &config).expect("write config");
    let (code, _, err) = cli_in(dir.path(), &cfg, &["stats"], "");
    assert_eq!(code, Some(0), "{err}");
    assert!(!err.contains("keeps nothing on disk"), "{err}");

    let run = start_in(dir.path(), "", &config, 0, 0, &[]);
    wait_until("the worker ready", Duration::from_secs(30), || {
        get_status(run.port, "/readyz") == Some(200)
    });
    let stderr = stop_cleanly(run);
    assert_eq!(
        stderr.matches("keeps nothing on disk").count(),
        1,
        "{stderr}"
    );
    assert_eq!(
        stderr.matches("delay: ").count(),
        1,
        "one start-up line on how delays are done: {stderr}"
    );
    // What the worker made under its prefix goes.
    let keys = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", "6379", "--scan", "--pattern"])
        .arg(format!("e2e-warn-{}.*", std::process::id()))
        .output()
        .expect("redis-cli");
    for key in String::from_utf8_lossy(&keys.stdout).lines() {
        let _ = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", "6379", "del", key])
            .output();
    }
}

/// The HTTP status of `path` on the worker's port, `None` while nothing listens there.
fn get_status(port: u16, path: &str) -> Option<u16> {
    TcpStream::connect(("127.0.0.1", port)).ok()?;
    Some(get(port, path).0)
}

/// A second worker whose HTTP address is taken fails its start (exit 1) naming the address and
/// the key, instead of running on without metrics and health checks; port 0 takes a free port
/// and the log says which.
#[test]
fn a_taken_http_address_fails_the_start_and_port_zero_logs_the_port() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("temp dir");
    let a = start_in(dir.path(), "-a", KILL_WORKER, 0, 0, &[]);
    wait_until("A serves HTTP", Duration::from_secs(30), || {
        get_status(a.port, "/healthz") == Some(200)
    });
    let taken = format!("127.0.0.1:{}", a.port);
    let b = start_in(
        dir.path(),
        "-b",
        KILL_WORKER,
        0,
        0,
        &[("STEVEDORE_HTTP__BIND", taken.as_str())],
    );
    let (output, _, _) = finish(b, Duration::from_secs(30));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&taken), "names the address: {stderr}");
    assert!(stderr.contains("http.bind"), "names the key: {stderr}");

    let c = start_in(
        dir.path(),
        "-c",
        KILL_WORKER,
        0,
        0,
        &[("STEVEDORE_HTTP__BIND", "127.0.0.1:0")],
    );
    let log = dir.path().join("stderr-c.txt");
    let mut port = None;
    wait_until("C logs its port", Duration::from_secs(30), || {
        port = std::fs::read_to_string(&log).ok().and_then(|l| {
            l.split("HTTP endpoints listening addr=127.0.0.1:")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse::<u16>()
                .ok()
        });
        port.is_some()
    });
    let port = port.unwrap_or_default();
    assert_eq!(get_status(port, "/healthz"), Some(200));
    for run in [a, c] {
        stop_cleanly(run);
    }
}

/// RabbitMQ: a clean run logs no ERROR (the client library's own lines for expected conditions,
/// such as a passive declare's 404, stay quiet), and a wrong password gives one clear message
/// (exit 2), not the client's three ERROR lines before it.
#[test]
fn rabbitmq_clean_run_and_wrong_password_log_no_client_errors() {
    let _serial = serial();
    let server =
        stevedore_conformance::servers::RabbitServer::start().unwrap_or_else(|e| panic!("{e}"));
    let config = "[broker]\nkind = \"rabbitmq\"\n\n[worker]\npoll_wait = \"200ms\"\n";
    let run = start_with(config, 20, 0, &[("STEVEDORE_BROKER__URL", &server.url())]);
    let out = run.out.clone();
    wait_until("every job done", Duration::from_secs(60), || {
        tally(&lines(&out), "done").len() == 20
    });
    let stderr = stop_cleanly(run);
    assert!(!stderr.contains(" ERROR "), "{stderr}");

    let dir = tempfile::tempdir().expect("temp dir");
    let cfg = dir.path().join("rabbit.toml");
    let wrong = server.url().replacen("guest:guest@", "guest:wrong@", 1);
    assert_ne!(wrong, server.url(), "the URL carries guest:guest");
    std::fs::write(
        &cfg,
        format!("[broker]\nkind = \"rabbitmq\"\nurl = \"{wrong}\"\n"),
    )
    .expect("write config");
    let (code, _, err) = cli_in(dir.path(), &cfg, &["stats"], "");
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("refused the login"), "{err}");
    assert!(
        !err.contains(" ERROR "),
        "one message, not the client's: {err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

/// Periodic jobs on the default backend (the SQLite file, which is also the state store), the
/// real binary: two workers share two schedules ticking every second (`every = "1s"`, and a cron
/// pattern with seconds in a time zone); worker A is killed with SIGKILL mid-run and comes back
/// as A2. For each schedule, every tick of the run is enqueued exactly once (the `tick` lines:
/// one per tick, each under its own id) and none is missing between its first and last; and
/// `schedules list` from a third process shows the last and next tick.
#[test]
fn a_schedule_ticks_once_per_second_across_two_workers_and_a_kill() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("temp dir");
    let config = "[queues.default]\nconcurrency = 4\n\n\
                  [schedules.heartbeat]\njob = \"work\"\nevery = \"1s\"\n\
                  payload = { n = 0, sleep_ms = 0 }\n\n\
                  [schedules.crontab]\njob = \"work\"\ncron = \"* * * * * *\"\n\
                  timezone = \"America/New_York\"\npayload = { n = 1, sleep_ms = 0 }\n";
    let mut a = start_in(dir.path(), "-a", config, 0, 0, &[]);
    let b = start_in(dir.path(), "-b", config, 0, 0, &[]);
    // "<schedule>/<tick>" -> the ids it ran under.
    let ticks = |who: &[&Path]| {
        let mut all: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for p in who {
            for l in lines(p) {
                if let Some(rest) = l.strip_prefix("tick ") {
                    let (tick, id) = rest.split_once(' ').expect("tick <schedule>/<tick> <id>");
                    all.entry(tick.to_string())
                        .or_default()
                        .push(id.to_string());
                }
            }
        }
        all
    };
    let (out_a, out_b) = (a.out.clone(), b.out.clone());
    wait_until("8 ticks", Duration::from_secs(30), || {
        ticks(&[&out_a, &out_b]).len() >= 8
    });
    signal(&a.child, "-KILL");
    let _ = a.child.wait();
    let a2 = start_in(dir.path(), "-a2", config, 0, 0, &[]);
    let out_a2 = a2.out.clone();
    let seen_before = ticks(&[&out_a, &out_b, &out_a2]).len();
    wait_until("8 more ticks", Duration::from_secs(30), || {
        ticks(&[&out_a, &out_b, &out_a2]).len() >= seen_before + 8
    });
    // A third process reads the schedules' state from the same file (one JSON line each, by name).
    let (code, stdout, stderr) = cli_in(
        dir.path(),
        &dir.path().join("worker-a.toml"),
        &["schedules", "list", "--json"],
        "",
    );
    assert_eq!(code, Some(0), "{stderr}");
    let listed: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    assert_eq!(listed.len(), 2, "{stdout}");
    assert_eq!(listed[0]["name"], "crontab", "{stdout}");
    assert_eq!(listed[1]["name"], "heartbeat", "{stdout}");
    for l in &listed {
        assert!(
            l["last_tick"].is_string() && l["next_tick"].is_string(),
            "{l}"
        );
    }
    let (_, table, _) = cli_in(
        dir.path(),
        &dir.path().join("worker-a.toml"),
        &["schedules", "list"],
        "",
    );
    assert!(
        table.contains("heartbeat") && table.contains("every 1s"),
        "{table}"
    );
    assert!(table.contains("America/New_York"), "{table}");
    stop_cleanly(b);
    stop_cleanly(a2);
    let all = ticks(&[&out_a, &out_b, &out_a2]);
    let twice: Vec<_> = all.iter().filter(|(_, ids)| ids.len() > 1).collect();
    assert!(twice.is_empty(), "ticks run more than once: {twice:?}");
    // Per schedule, consecutive: from its first tick to its last, one per second, none missing.
    let mut counts = Vec::new();
    for schedule in ["heartbeat", "crontab"] {
        let prefix = format!("{schedule}/");
        let secs: Vec<i64> = all
            .keys()
            .filter_map(|k| k.strip_prefix(&prefix))
            .map(|t| {
                humantime::parse_rfc3339(t)
                    .expect("rfc3339")
                    .duration_since(std::time::UNIX_EPOCH)
                    .expect("after 1970")
                    .as_secs() as i64
            })
            .collect();
        let gaps: Vec<_> = secs.windows(2).filter(|w| w[1] - w[0] != 1).collect();
        assert!(
            gaps.is_empty(),
            "{schedule}: ticks missing between {gaps:?}"
        );
        assert!(secs.len() >= 6, "{schedule}: {secs:?}");
        counts.push(secs.len());
    }
    eprintln!(
        "schedule e2e: {counts:?} ticks (every 1s; cron each second), each once, across a SIGKILL"
    );
}

/// A concurrency limit across processes survives a SIGKILL: `[jobs.work] max_concurrent = 2` on
/// the SQLite file (its own state store), lease 2 s. Worker A starts 2 of 6 jobs of 5 s (the
/// others are put off, not run); worker B starts beside it and runs none; A is killed holding
/// both slots. B gets them back when their lease lapses: its first job starts within the lease
/// (plus the put-off retry and a poll) of the kill, never more than 2 run at once, and all 6
/// jobs finish.
#[test]
fn a_worker_killed_holding_concurrency_slots_gives_them_back_within_the_lease() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("temp dir");
    let config = format!("{KILL_WORKER}\n[jobs.work]\nmax_concurrent = 2\n");
    let mut a = start_in(dir.path(), "-a", &config, 6, 5000, &[]);
    let out_a = a.out.clone();
    wait_until("A started 2 jobs", Duration::from_secs(30), || {
        tally(&lines(&out_a), "start").len() >= 2
    });
    // B starts before the kill (so its own start-up is not part of what is measured) and, the
    // two slots being A's, runs nothing yet.
    let b = start_in(dir.path(), "-b", &config, 0, 5000, &[]);
    let out_b = b.out.clone();
    wait_until("B ready (fetching)", Duration::from_secs(30), || {
        get_status(b.port, "/readyz") == Some(200)
    });
    std::thread::sleep(Duration::from_millis(500));
    let started_a = tally(&lines(&out_a), "start");
    assert_eq!(
        started_a.len(),
        2,
        "A ran only what the limit allows: {started_a:?}"
    );
    let started_b = tally(&lines(&out_b), "start");
    assert!(
        started_b.is_empty(),
        "B started jobs while A held both slots: {started_b:?}"
    );
    let killed = Instant::now();
    let unfinished = kill_hard(&mut a);
    assert_eq!(unfinished.len(), 2, "A was killed holding both slots");
    wait_until("B's first job", Duration::from_secs(30), || {
        !tally(&lines(&out_b), "start").is_empty()
    });
    let back_after = killed.elapsed();
    // Lease 2 s; a put-off job is offered again within ~0.3 s; a poll; slack for a loaded machine.
    assert!(
        back_after < Duration::from_millis(2_000 + 300 + 1_500),
        "the slots came back {back_after:?} after the kill (lease 2s)"
    );
    wait_until("all 6 jobs done", Duration::from_secs(60), || {
        let done: std::collections::BTreeSet<u64> =
            tally(&lines(&out_b), "done").into_keys().collect();
        (0..6).all(|n| done.contains(&n))
    });
    // Never more than 2 at once in B: replay its start/done lines in order.
    let (mut now, mut most) = (0i32, 0i32);
    for l in lines(&out_b) {
        if l.starts_with("start ") {
            now += 1;
        } else if l.starts_with("done ") {
            now -= 1;
        }
        most = most.max(now);
    }
    assert!(most <= 2, "{most} jobs ran at once in B");
    stop_cleanly(b);
    eprintln!("limits e2e: slots back {back_after:?} after SIGKILL (lease 2s); B ran at most {most} at once");
}

/// PostgreSQL for the effect tests (`DATABASE_URL`, else the machine's), a runtime to talk to
/// it, and a fresh effects table `effects` (what e2e_worker's `effect` job inserts into).
fn effects_db(
    effects: &str,
) -> (
    String,
    tokio::runtime::Runtime,
    stevedore::outbox::sqlx::PgPool,
) {
    use stevedore::outbox::sqlx;
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let db = rt.block_on(async {
        let db = sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .connect(&url)
            .await
            .expect("PostgreSQL at DATABASE_URL or 127.0.0.1:5432/test");
        sqlx::query(&format!(
            "CREATE TABLE {effects} (n BIGINT NOT NULL, job_id TEXT NOT NULL, pid BIGINT, at TIMESTAMPTZ DEFAULT now())"
        ))
        .execute(&db)
        .await
        .expect("effects table");
        db
    });
    (url, rt, db)
}

/// The outbox and the inbox together, under SIGKILL: 2,000 jobs enqueued in committed
/// PostgreSQL transactions (and 200 in rolled-back ones) are relayed and run by two worker
/// processes (each relays too) that are SIGKILLed and restarted again and again while they
/// work. Each job's effect, an INSERT made in the handler's transaction with
/// `JobContext::mark_done_in`, exists exactly once; the rolled-back jobs never run; the outbox
/// ends empty.
#[test]
fn outbox_and_inbox_under_repeated_kills_give_each_effect_exactly_once() {
    use stevedore::outbox::sqlx;
    let _serial = serial();
    const N: i64 = 2_000;
    let tag = stevedore::core::new_id().replace('-', "").to_lowercase();
    let (effects, kv, outbox) = (
        format!("e2e_effects_{tag}"),
        format!("e2e_kv_{tag}"),
        format!("e2e_outbox_{tag}"),
    );
    let (url, rt, db) = effects_db(&effects);
    let dir = tempfile::tempdir().expect("temp dir");
    let config = format!(
        "[worker]\nconcurrency = 8\nshutdown_timeout = \"10s\"\npoll_wait = \"100ms\"\n\
         [retry]\nbase = \"100ms\"\nmax_attempts = 20\n\
         [store]\nkind = \"postgres\"\nurl = \"{url}\"\ntable = \"{kv}\"\n\
         [outbox]\nurl = \"{url}\"\ntable = \"{outbox}\"\nbatch = 50\npoll = \"200ms\"\n\
         [queues.default]\nconcurrency = 8\nlease = \"2s\"\nidempotent = true\n"
    );
    let cfg = stevedore::config::from_toml_str(&config, None).expect("config");
    rt.block_on(async {
        let mut conn = db.acquire().await.expect("conn");
        stevedore::outbox::create_table(&mut conn, &outbox)
            .await
            .expect("outbox table");
        // The producer: the test, on the workers' SQLite file.
        let broker = stevedore_sqlite::SqliteBroker::open(stevedore_sqlite::SqliteConfig::new(
            dir.path().join("stevedore.db"),
        ))
        .await
        .expect("sqlite");
        let client = stevedore::Client::new(std::sync::Arc::new(broker)).with_limits_from(&cfg);
        for (first, count, commit) in [(0, N, true), (N, 200, false)] {
            let per_tx = if commit { 10 } else { 1 };
            let mut n = first;
            while n < first + count {
                let mut tx = db.begin().await.expect("begin");
                for _ in 0..per_tx {
                    client
                        .enqueue(
                            "effect",
                            &serde_json::json!({"n": n, "hold_ms": (n * 7) % 60}),
                        )
                        .within(&mut tx)
                        .await
                        .expect("within");
                    n += 1;
                }
                if commit {
                    tx.commit().await.expect("commit");
                } else {
                    tx.rollback().await.expect("rollback");
                }
            }
        }
    });
    let env = [
        ("E2E_DATABASE_URL", url.as_str()),
        ("E2E_EFFECTS", effects.as_str()),
    ];
    let count = |sql: &str| -> i64 {
        rt.block_on(sqlx::query_scalar::<_, i64>(sql).fetch_one(&db))
            .expect("count")
    };
    let mut workers = [
        start_in(dir.path(), "-a0", &config, 0, 0, &env),
        start_in(dir.path(), "-b0", &config, 0, 0, &env),
    ];
    let mut outs: Vec<PathBuf> = workers.iter().map(|w| w.out.clone()).collect();
    let started = Instant::now();
    let mut kills = 0;
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    // Kill one of the two every 0.4–1.2 s while effects are still missing, for up to 25 s.
    while started.elapsed() < Duration::from_secs(25)
        && count(&format!("SELECT count(DISTINCT n) FROM {effects}")) < N
    {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_millis(400 + seed % 800));
        let i = (kills % 2) as usize;
        kill_hard(&mut workers[i]);
        kills += 1;
        let name = format!("-{}{kills}", if i == 0 { "a" } else { "b" });
        workers[i] = start_in(dir.path(), &name, &config, 0, 0, &env);
        outs.push(workers[i].out.clone());
    }
    wait_until("every job's effect", Duration::from_secs(180), || {
        count(&format!("SELECT count(DISTINCT n) FROM {effects}")) >= N
    });
    // Past a lease, so any copy still on its way has come and gone.
    std::thread::sleep(Duration::from_secs(4));
    let rows = count(&format!("SELECT count(*) FROM {effects}"));
    let distinct = count(&format!("SELECT count(DISTINCT n) FROM {effects}"));
    let rolled_back = count(&format!("SELECT count(*) FROM {effects} WHERE n >= {N}"));
    let left = count(&format!("SELECT count(*) FROM {outbox}"));
    let dup_lines: usize = outs
        .iter()
        .map(|o| lines(o).iter().filter(|l| l.starts_with("dup ")).count())
        .sum();
    let effect_lines: usize = outs
        .iter()
        .map(|o| lines(o).iter().filter(|l| l.starts_with("effect ")).count())
        .sum();
    for w in workers {
        stop_cleanly(w);
    }
    rt.block_on(async {
        for t in [&effects, &kv, &outbox] {
            let _ = sqlx::query(&format!("DROP TABLE IF EXISTS {t}"))
                .execute(&db)
                .await;
        }
    });
    assert_eq!(rolled_back, 0, "a rolled-back enqueue ran");
    assert_eq!(distinct, N, "every committed job took effect");
    assert_eq!(rows, N, "{} effects happened twice", rows - N);
    assert_eq!(left, 0, "the outbox is empty");
    assert!(
        kills >= 5,
        "only {kills} kills happened before the work was done"
    );
    eprintln!(
        "outbox+inbox e2e: {N} jobs through the outbox, {kills} SIGKILLs of worker/relay processes; \
         {rows} effects (each once); {effect_lines} effect commits logged, {dup_lines} deliveries \
         refused by the in-transaction mark"
    );
}

/// Job status from outside, with the real binary: `enqueue` on a queue with `track_status`
/// records `queued`, `status ID` shows it (table and `--json`), the worker's `GET /jobs/{id}`
/// answers `succeeded` once the job ran, an unknown id exits 1 with the reason.
#[test]
fn status_is_readable_from_the_cli_and_the_http_endpoint() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("temp dir");
    let config = "[worker]\npoll_wait = \"100ms\"\n\n\
                  [queues.default]\nconcurrency = 2\ntrack_status = \"1h\"\n";
    let cfg = dir.path().join("status.toml");
    std::fs::write(&cfg, config).expect("write config");
    let cli = |args: &[&str]| cli_in(dir.path(), &cfg, args, "");
    let (code, id, err) = cli(&["enqueue", "work", "{\"n\":1,\"sleep_ms\":0}"]);
    assert_eq!(code, Some(0), "{err}");
    let id = id.trim().to_string();
    let (code, out, err) = cli(&["status", &id]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("state       queued") && out.contains(&id),
        "a table with the state: {out}"
    );
    let (code, out, err) = cli(&["status", &id, "--json"]);
    assert_eq!(code, Some(0), "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("JSON");
    assert_eq!(
        (v["state"].as_str(), v["attempt"].as_u64()),
        (Some("queued"), Some(0))
    );
    let (code, _, err) = cli(&["status", "no-such-id"]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("no status recorded for job no-such-id"),
        "{err}"
    );

    let w = start_in(dir.path(), "", config, 0, 0, &[]);
    let port = w.port;
    let out = w.out.clone();
    wait_until("the job ran", Duration::from_secs(30), || {
        !tally(&lines(&out), "done").is_empty()
    });
    let mut body = String::new();
    wait_until("succeeded over HTTP", Duration::from_secs(10), || {
        let (code, b) = get(port, &format!("/jobs/{id}"));
        body = b;
        code == 200 && body.contains("\"state\":\"succeeded\"")
    });
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(v["attempt"].as_u64(), Some(1), "{body}");
    assert!(v["finished_at"].as_str().is_some(), "{body}");
    assert_eq!(get(port, "/jobs/no-such-id").0, 404);
    stop_cleanly(w);
}

/// A handler that holds its transaction (after `mark_done_in`) longer than the queue's lease:
/// the inbox claim's renewal waits on the row without stopping the handler, the job commits
/// once, and the worker stops cleanly.
#[test]
fn a_transaction_held_past_the_lease_after_mark_done_in_commits_once() {
    use stevedore::outbox::sqlx;
    let _serial = serial();
    let tag = stevedore::core::new_id().replace('-', "").to_lowercase();
    let (effects, kv) = (format!("e2e_effects_{tag}"), format!("e2e_kv_{tag}"));
    let (url, rt, db) = effects_db(&effects);
    let dir = tempfile::tempdir().expect("temp dir");
    let config = format!(
        "[worker]\nconcurrency = 4\nshutdown_timeout = \"10s\"\npoll_wait = \"100ms\"\n\
         [store]\nkind = \"postgres\"\nurl = \"{url}\"\ntable = \"{kv}\"\n\
         [queues.default]\nconcurrency = 4\nlease = \"1s\"\nidempotent = true\n"
    );
    let cfg = dir.path().join("held.toml");
    std::fs::write(&cfg, &config).expect("config");
    for n in 0..4 {
        let payload = format!("{{\"n\":{n},\"hold_ms\":2500}}");
        let (code, _, err) = cli_in(dir.path(), &cfg, &["enqueue", "effect", &payload], "");
        assert_eq!(code, Some(0), "{err}");
    }
    let env = [
        ("E2E_DATABASE_URL", url.as_str()),
        ("E2E_EFFECTS", effects.as_str()),
    ];
    let w = start_in(dir.path(), "", &config, 0, 0, &env);
    let out = w.out.clone();
    wait_until("4 effects committed", Duration::from_secs(30), || {
        lines(&out)
            .iter()
            .filter(|l| l.starts_with("effect "))
            .count()
            >= 4
    });
    std::thread::sleep(Duration::from_secs(2));
    let stderr = stop_cleanly(w);
    let rows: i64 = rt
        .block_on(sqlx::query_scalar(&format!("SELECT count(*) FROM {effects}")).fetch_one(&db))
        .expect("count");
    rt.block_on(async {
        for t in [&effects, &kv] {
            let _ = sqlx::query(&format!("DROP TABLE IF EXISTS {t}"))
                .execute(&db)
                .await;
        }
    });
    assert_eq!(rows, 4, "each effect once");
    assert!(
        !stderr.contains("claim lapsed"),
        "no false alarm about the claim: {stderr}"
    );
}
