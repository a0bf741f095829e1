//! A backend defined in this file, outside every Stevedore crate, runs under `App` with the whole
//! CLI: `config check`, `enqueue`, `run` (stopped by SIGTERM), `stats` and `dlq list`, each as its
//! own process, as a user's binary would run them.
//!
//! The backend ("dir") keeps each message as a file: `<path>/<queue>/ready/<due>-<seq>-<count>`
//! holds a message that is ready once the clock passes `due` (Unix ms), and receiving renames it
//! to `leased/<deadline>~<ready name>` (a rename is atomic, so two processes never lease one
//! message). A lease that ran out is renamed back with its count grown. Several processes may open
//! the same directory, so `stats` and `dlq` from a second process see the worker's queues.
//!
//! This file is its own test harness (`harness = false`): run with `STEVEDORE_TEST_APP=1` it *is*
//! the user's binary (an `App` with the "dir" backend and two handlers); run without it, it runs
//! the test, spawning itself for each command.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use stevedore::core::factory::{
    BackendFactory, BackendSetup, ConnectContext, Settings, SettingsError,
};
use stevedore::core::{
    async_trait, from_millis, to_millis, wire, Broker, BrokerError, Capabilities, DelaySupport,
    Delivery, Depth, Envelope, LeaseSupport, OrderingSupport, Receipt, ReceiveOptions,
};
use stevedore::{App, JobError, Json, Router};

// ---- the backend ----

struct DirFactory;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DirSettings {
    path: Option<PathBuf>,
    max_payload: Option<usize>,
}

#[derive(Debug)]
struct DirSetup {
    root: PathBuf,
    max_payload: usize,
}

impl BackendFactory for DirFactory {
    fn kind(&self) -> &'static str {
        "dir"
    }

    fn keys(&self) -> &'static [&'static str] {
        &["path", "max_payload"]
    }

    fn configure(&self, settings: &Settings) -> Result<Box<dyn BackendSetup>, SettingsError> {
        let s: DirSettings = settings.parse()?;
        let root = s.path.ok_or_else(|| {
            SettingsError::at("path", "required for kind = \"dir\": the store's directory")
        })?;
        Ok(Box::new(DirSetup {
            root,
            max_payload: s.max_payload.unwrap_or(1 << 20),
        }))
    }
}

fn caps(max_payload: usize) -> Capabilities {
    Capabilities {
        delay: DelaySupport::Native { max: None },
        lease: LeaseSupport::Timed { max: None },
        ordering: OrderingSupport::None,
        max_payload,
        max_batch: 100,
        durable: true,
        delay_tolerance: Duration::from_millis(100),
        depth_staleness: Duration::ZERO,
        shared: true,
        counts_deliveries: true,
        uncounted_release: true,
        sharing: stevedore_core::Sharing::Any,
        max_headers: None,
    }
}

#[async_trait]
impl BackendSetup for DirSetup {
    fn capabilities(&self) -> Capabilities {
        caps(self.max_payload)
    }

    async fn connect(&self, _ctx: &ConnectContext) -> Result<Arc<dyn Broker>, BrokerError> {
        std::fs::create_dir_all(&self.root).map_err(|e| {
            BrokerError::permanent(format!("cannot create {}: {e}", self.root.display()))
        })?;
        Ok(Arc::new(DirBroker {
            root: self.root.clone(),
            caps: caps(self.max_payload),
        }))
    }
}

#[derive(Debug)]
struct DirBroker {
    root: PathBuf,
    caps: Capabilities,
}

static SEQ: AtomicU64 = AtomicU64::new(0);

fn io(e: std::io::Error) -> BrokerError {
    BrokerError::Other {
        message: e.to_string(),
        transient: true,
    }
}

fn now_ms() -> u64 {
    to_millis(SystemTime::now())
}

/// `<due>-<seq>-<count>`: sorts by due time, then publish order.
fn ready_name(due: u64, count: u32) -> String {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    format!(
        "{due:015}-{nanos:024}{:06}{seq:08}-{count}",
        std::process::id()
    )
}

fn parse_ready(name: &str) -> Option<(u64, u32)> {
    let mut parts = name.split('-');
    let due = parts.next()?.parse().ok()?;
    let count = parts.nth(1)?.parse().ok()?;
    Some((due, count))
}

impl DirBroker {
    fn dir(&self, queue: &str, state: &str) -> Result<PathBuf, BrokerError> {
        let d = self.root.join(queue).join(state);
        std::fs::create_dir_all(&d).map_err(io)?;
        Ok(d)
    }

    fn names(dir: &Path) -> Result<Vec<String>, BrokerError> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .map_err(io)?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| !n.starts_with('.'))
            .collect();
        v.sort();
        Ok(v)
    }

    /// Leases whose deadline passed go back to ready, their count grown.
    fn reclaim(&self, queue: &str) -> Result<(), BrokerError> {
        let (leased, ready) = (self.dir(queue, "leased")?, self.dir(queue, "ready")?);
        let now = now_ms();
        for name in Self::names(&leased)? {
            let Some((deadline, inner)) = name.split_once('~') else {
                continue;
            };
            if deadline.parse::<u64>().map_or(true, |d| d > now) {
                continue;
            }
            let (_, count) = parse_ready(inner).unwrap_or((0, 0));
            // A lost race (another process reclaimed it first) is fine.
            let _ = std::fs::rename(leased.join(&name), ready.join(ready_name(0, count + 1)));
        }
        Ok(())
    }

    fn take(&self, queue: &str, max: usize, lease: Duration) -> Result<Vec<Delivery>, BrokerError> {
        self.reclaim(queue)?;
        let (ready, leased) = (self.dir(queue, "ready")?, self.dir(queue, "leased")?);
        let now = now_ms();
        let deadline = now + u64::try_from(lease.as_millis()).unwrap_or(u64::MAX / 2);
        let mut out = Vec::new();
        for name in Self::names(&ready)? {
            if out.len() >= max {
                break;
            }
            let Some((due, count)) = parse_ready(&name) else {
                continue;
            };
            if due > now {
                break; // sorted by due time: the rest are later
            }
            let to = format!("{deadline:015}~{name}");
            if std::fs::rename(ready.join(&name), leased.join(&to)).is_err() {
                continue; // another process leased it first
            }
            let bytes = std::fs::read(leased.join(&to)).map_err(io)?;
            let envelope = decode(&bytes, &name);
            out.push(Delivery {
                envelope,
                receipt: Receipt::new(queue, Leased(Mutex::new(to))),
                delivery_count: count + 1,
            });
        }
        Ok(out)
    }
}

/// A receipt's token: the leased file's current name (extending the lease renames it).
#[derive(Debug)]
struct Leased(Mutex<String>);

fn leased_name(r: &Receipt) -> Option<&Mutex<String>> {
    r.token::<Leased>().map(|l| &l.0)
}

/// A message file: one line of JSON headers, then the body.
fn encode(e: &Envelope) -> Vec<u8> {
    let (headers, body) = wire::to_wire(e);
    let mut out = serde_json::to_vec(&headers).unwrap_or_else(|_| b"[]".to_vec());
    out.push(b'\n');
    out.extend_from_slice(&body);
    out
}

fn decode(bytes: &[u8], fallback_id: &str) -> Envelope {
    let split = bytes
        .iter()
        .position(|b| *b == b'\n')
        .unwrap_or(bytes.len());
    let headers: Vec<(String, String)> =
        serde_json::from_slice(&bytes[..split]).unwrap_or_default();
    let body = bytes.get(split + 1..).unwrap_or_default().to_vec();
    wire::from_wire(headers, body.into(), fallback_id)
}

#[async_trait]
impl Broker for DirBroker {
    fn name(&self) -> &'static str {
        "dir"
    }

    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    async fn prepare(&self, queues: &[String]) -> Result<(), BrokerError> {
        for q in queues {
            self.dir(q, "ready")?;
            self.dir(q, "leased")?;
        }
        Ok(())
    }

    async fn publish(&self, queue: &str, messages: Vec<Envelope>) -> Result<(), BrokerError> {
        if let Some(big) = messages
            .iter()
            .find(|m| m.payload.len() > self.caps.max_payload)
        {
            return Err(BrokerError::PayloadTooLarge {
                size: big.payload.len(),
                max: self.caps.max_payload,
                backend: "dir",
            });
        }
        let ready = self.dir(queue, "ready")?;
        for m in messages {
            let name = ready_name(m.not_before.map_or(0, to_millis), 0);
            let tmp = ready.join(format!(".{name}"));
            std::fs::write(&tmp, encode(&m)).map_err(io)?;
            std::fs::rename(&tmp, ready.join(name)).map_err(io)?;
        }
        Ok(())
    }

    async fn receive(
        &self,
        queue: &str,
        opts: ReceiveOptions,
    ) -> Result<Vec<Delivery>, BrokerError> {
        let until = Instant::now() + opts.wait;
        loop {
            let got = self.take(queue, opts.max.max(1), opts.lease)?;
            if !got.is_empty() || Instant::now() >= until {
                return Ok(got);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn ack(&self, receipts: &[Receipt]) -> Result<(), BrokerError> {
        let mut lost = None;
        for r in receipts {
            let leased = self.dir(r.queue(), "leased")?;
            let removed = leased_name(r).is_some_and(|name| {
                let name = name.lock().unwrap_or_else(|p| p.into_inner());
                std::fs::remove_file(leased.join(&*name)).is_ok()
            });
            if !removed {
                lost = Some(r.queue().to_string());
            }
        }
        match lost {
            Some(queue) => Err(BrokerError::LeaseLost { queue }),
            None => Ok(()),
        }
    }

    async fn release(&self, receipts: &[Receipt]) -> Result<(), BrokerError> {
        let mut lost = None;
        for r in receipts {
            let (leased, ready) = (
                self.dir(r.queue(), "leased")?,
                self.dir(r.queue(), "ready")?,
            );
            let back = leased_name(r).is_some_and(|name| {
                let name = name.lock().unwrap_or_else(|p| p.into_inner());
                let count = name
                    .split_once('~')
                    .and_then(|(_, inner)| parse_ready(inner))
                    .map_or(0, |(_, c)| c);
                std::fs::rename(leased.join(&*name), ready.join(ready_name(0, count + 1))).is_ok()
            });
            if !back {
                lost = Some(r.queue().to_string());
            }
        }
        match lost {
            Some(queue) => Err(BrokerError::LeaseLost { queue }),
            None => Ok(()),
        }
    }

    /// Renames the leased file to the new deadline (the token follows the file).
    async fn extend_lease(&self, receipt: &Receipt, lease: Duration) -> Result<(), BrokerError> {
        let leased = self.dir(receipt.queue(), "leased")?;
        let lost = || BrokerError::LeaseLost {
            queue: receipt.queue().to_string(),
        };
        let name = leased_name(receipt).ok_or_else(lost)?;
        let mut name = name.lock().unwrap_or_else(|p| p.into_inner());
        let (deadline, inner) = name.split_once('~').ok_or_else(lost)?;
        if deadline.parse::<u64>().map_or(true, |d| d <= now_ms()) {
            return Err(lost()); // ran out: another consumer may have it
        }
        let until = now_ms() + u64::try_from(lease.as_millis()).unwrap_or(u64::MAX / 2);
        let renamed = format!("{until:015}~{inner}");
        std::fs::rename(leased.join(&*name), leased.join(&renamed)).map_err(|_| lost())?;
        *name = renamed;
        Ok(())
    }

    async fn depth(&self, queue: &str) -> Result<Depth, BrokerError> {
        let now = now_ms();
        let (mut ready, mut delayed, mut oldest) = (0, 0, None::<u64>);
        for name in Self::names(&self.dir(queue, "ready")?)? {
            match parse_ready(&name) {
                Some((due, _)) if due > now => delayed += 1,
                _ => ready += 1,
            }
            if oldest.is_none() {
                let meta = std::fs::metadata(self.dir(queue, "ready")?.join(&name)).ok();
                oldest = meta.and_then(|m| m.modified().ok()).map(to_millis);
            }
        }
        let in_flight = Self::names(&self.dir(queue, "leased")?)?.len() as u64;
        Ok(Depth {
            ready,
            in_flight,
            delayed: Some(delayed),
            oldest_age: oldest.and_then(|t| SystemTime::now().duration_since(from_millis(t)).ok()),
        })
    }
}

// ---- the user's binary ----

async fn ok_job(Json(v): Json<serde_json::Value>) -> Result<(), JobError> {
    let log = std::env::var("DONE_LOG").map_err(JobError::permanent)?;
    let line = format!("{v}\n");
    use std::io::Write as _;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .and_then(|mut f| f.write_all(line.as_bytes()))
        .map_err(JobError::retry)
}

async fn failing_job(Json(v): Json<serde_json::Value>) -> Result<(), JobError> {
    Err(JobError::permanent(format!("boom on {v}")))
}

fn app_main() -> ExitCode {
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start tokio: {e}");
            return ExitCode::FAILURE;
        }
    };
    let router = Router::new().route("ok", ok_job).route("fail", failing_job);
    let app = App::new(router);
    // The same store, as a broker the application builds itself.
    let app = match std::env::var_os("SUPPLIED_STORE") {
        Some(root) => app.broker(Arc::new(DirBroker {
            root: root.into(),
            caps: caps(1 << 20),
        })),
        None => app.backend(DirFactory),
    };
    rt.block_on(app.run())
}

// ---- the test ----

struct Env {
    config: PathBuf,
    done: PathBuf,
    store: PathBuf,
}

fn app(env: &Env, args: &[&str]) -> Command {
    let mut c = Command::new(std::env::current_exe().expect("own path"));
    c.env("STEVEDORE_TEST_APP", "1")
        .env("STEVEDORE_CONFIG", &env.config)
        .env("DONE_LOG", &env.done)
        .env("RUST_LOG", "info")
        .args(args);
    c
}

fn run(env: &Env, args: &[&str]) -> Output {
    let out = app(env, args).output().expect("spawn the app");
    eprintln!(
        "$ app {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout_of(env: &Env, args: &[&str]) -> String {
    let out = run(env, args);
    assert!(out.status.success(), "{args:?} failed: {:?}", out.status);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stats(env: &Env) -> serde_json::Value {
    serde_json::from_str(&stdout_of(env, &["stats", "--json"])).expect("stats --json is JSON")
}

fn depth(stats: &serde_json::Value, level: &str, field: &str) -> u64 {
    stats
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["level"] == level))
        .and_then(|r| r["depth"][field].as_u64())
        .unwrap_or_else(|| panic!("no {level}.{field} in {stats}"))
}

fn test() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = tmp.path().join("store");
    let config = tmp.path().join("dir.toml");
    std::fs::write(
        &config,
        format!(
            "[broker]\nkind = \"dir\"\npath = {:?}\n\n[http]\nenabled = false\n\n\
             [worker]\nshutdown_timeout = \"5s\"\npoll_wait = \"100ms\"\n\n\
             [retry]\nmax_attempts = 1\n",
            store.display().to_string()
        ),
    )
    .expect("write config");
    let env = Env {
        config,
        done: tmp.path().join("done.log"),
        store,
    };

    // config check knows the backend and its capabilities without connecting.
    let shown = stdout_of(&env, &["config", "check"]);
    assert!(shown.contains("backend dir: delay=native"), "{shown}");
    assert!(shown.contains("shared=true"), "{shown}");
    assert!(!env.store.exists(), "config check must not open the store");

    // A setting the backend refuses names the key; exit status 2.
    let bad = tmp.path().join("bad.toml");
    let refused = |toml: &str, args: &[&str], says: &str| {
        std::fs::write(&bad, toml).expect("write");
        let out = app(&env, args)
            .env("STEVEDORE_CONFIG", &bad)
            .output()
            .expect("spawn");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains(says), "{err}");
    };
    refused(
        "[broker]\nkind = \"dir\"\npth = \"/tmp/x\"\n",
        &["config", "check"],
        "broker.pth: not a setting of the dir broker; it takes path, max_payload",
    );
    refused(
        "[broker]\nkind = \"dir\"\n",
        &["stats"],
        "broker.path: required for kind = \"dir\"",
    );

    // Enqueue from one process: 3 good jobs, 2 that fail for good.
    for i in 0..3 {
        stdout_of(&env, &["enqueue", "ok", &format!("{{\"n\":{i}}}")]);
    }
    stdout_of(&env, &["enqueue", "fail", "{\"n\":10}", "--count", "2"]);
    let s = stats(&env);
    assert_eq!(depth(&s, "normal", "ready"), 5, "{s}");
    assert_eq!(depth(&s, "dead-letter", "ready"), 0, "{s}");

    // Run the worker in another, until its queue is drained; SIGTERM stops it cleanly.
    let worker = app(&env, &["run"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn run");
    let started = Instant::now();
    loop {
        let s = stats(&env);
        if depth(&s, "normal", "ready") == 0
            && depth(&s, "normal", "in_flight") == 0
            && depth(&s, "dead-letter", "ready") == 2
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the worker did not drain the queue: {s}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let pid = worker.id().to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status();
    assert!(killed.map(|s| s.success()).unwrap_or(false), "kill -TERM");
    let out = worker.wait_with_output().expect("wait for run");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "run exited {:?}: {log}", out.status);
    assert!(
        log.contains("backend dir"),
        "start-up notices name the backend: {log}"
    );

    // Each good job ran exactly once.
    let done = std::fs::read_to_string(&env.done).expect("done log");
    let mut lines: Vec<&str> = done.lines().collect();
    lines.sort();
    assert_eq!(lines, ["{\"n\":0}", "{\"n\":1}", "{\"n\":2}"], "{done}");

    // A third process lists the dead letters, with the handler's error, and leaves them there.
    let listed = stdout_of(&env, &["dlq", "list", "--json"]);
    let letters: Vec<serde_json::Value> = listed
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(letters.len(), 2, "{listed}");
    for l in &letters {
        assert_eq!(l["job"], "fail", "{l}");
        assert_eq!(l["error"], "boom on {\"n\":10} (permanent failure)", "{l}");
        assert_eq!(l["origin"], "default", "{l}");
    }
    let s = stats(&env);
    assert_eq!(
        depth(&s, "dead-letter", "ready"),
        2,
        "dlq list leaves them: {s}"
    );
    assert_eq!(depth(&s, "dead-letter", "in_flight"), 0, "{s}");

    // The same store as a broker the application supplies (App::broker): [broker] is not used.
    let none = tmp.path().join("no-broker.toml");
    std::fs::write(&none, "[http]\nenabled = false\n").expect("write");
    let out = app(&env, &["stats", "--json"])
        .env("STEVEDORE_CONFIG", &none)
        .env("SUPPLIED_STORE", &env.store)
        .output()
        .expect("spawn");
    assert!(out.status.success(), "{out:?}");
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(depth(&s, "dead-letter", "ready"), 2, "{s}");
    let out = app(&env, &["config", "check"])
        .env("SUPPLIED_STORE", &env.store)
        .output()
        .expect("spawn");
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains(
            "note: broker: [broker] is not used: the application supplies its own dir broker"
        ),
        "{shown}"
    );
}

fn main() -> ExitCode {
    if std::env::var_os("STEVEDORE_TEST_APP").is_some() {
        return app_main();
    }
    // Enough of libtest's command line for `cargo test <filter>` and `--list`.
    const NAME: &str = "dir_backend_under_app";
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        println!("{NAME}: test");
        return ExitCode::SUCCESS;
    }
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    if !filters.is_empty() && !filters.iter().any(|f| NAME.contains(f.as_str())) {
        println!("running 0 tests");
        return ExitCode::SUCCESS;
    }
    let started = Instant::now();
    test();
    println!(
        "test {NAME} ... ok ({:.1}s)",
        started.elapsed().as_secs_f64()
    );
    ExitCode::SUCCESS
}
