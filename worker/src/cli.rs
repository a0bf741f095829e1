//! The entry point a user's binary calls: `App::new(router).run().await` gives it the commands
//! `run`, `enqueue`, `stats`, `dlq list|inspect|replay|purge` and `config check`.

use crate::backend::{Backends, Configured};
use crate::config::{self, Config, ConfigError, ScheduleConfig};
use crate::dlq::{self, Select};
use crate::router::Router;
use crate::shutdown::{listen_for_signals, ShutdownHandle};
use crate::stats::Stats;
use crate::{Client, Worker};
use clap::{Parser, Subcommand};
use futures::future::BoxFuture;
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use stevedore_core::factory::BackendFactory;
use stevedore_core::store::{Store, StoreFactory};
use stevedore_core::{names, Broker, Priority};

/// `println!` for a command's output: a reader that goes away (`| head`) ends the command quietly
/// (exit 0) instead of a panic; any other write error is reported (exit 1).
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout().lock(), $($arg)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
            eprintln!("error: cannot write the output: {e}");
            std::process::exit(1);
        }
    }};
}

#[derive(Parser, Debug)]
#[command(
    about = "A Stevedore worker: runs your job handlers on the broker your config names",
    after_help = "Examples:\n  \
        run --config config/default.toml            start the worker (Ctrl-C drains and exits)\n  \
        enqueue send_email '{\"to\":\"a@b.c\"}' --queue emails --priority high --delay 10m\n  \
        stats                                        queue depths per priority level and dead letters\n  \
        dashboard                                    the web dashboard alone (run serves it too, at /ui)\n  \
        dlq list --queue emails                      what died, and why\n  \
        dlq replay --queue emails --all              send dead letters back to their queue\n  \
        config check --profile production            validate and print the effective config (secrets redacted)\n\n\
        Config: --config FILE (or STEVEDORE_CONFIG), --profile NAME (or STEVEDORE_PROFILE); any key can be\n\
        overridden by STEVEDORE_<SECTION>__<KEY>, e.g. STEVEDORE_WORKER__CONCURRENCY=8. Logs: RUST_LOG=debug."
)]
struct Cli {
    /// Config file (TOML). Without it: built-in defaults plus STEVEDORE_* overrides.
    #[arg(short, long, global = true, env = "STEVEDORE_CONFIG")]
    config: Option<PathBuf>,
    /// Profile: a [profile.NAME] section of the config file applied on top of it.
    #[arg(short, long, global = true, env = "STEVEDORE_PROFILE")]
    profile: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the worker until SIGTERM or Ctrl-C (a second signal exits at once).
    Run,
    /// Enqueue a job.
    Enqueue {
        /// Job name (the handler registered under it runs the job).
        job: String,
        /// JSON payload: the JSON itself, `-` to read it from stdin, or `@FILE` to read it from
        /// a file.
        #[arg(default_value = "{}")]
        payload: String,
        /// Logical queue.
        #[arg(short, long, default_value = config::DEFAULT_QUEUE)]
        queue: String,
        /// Priority level: high, normal or low.
        #[arg(long, default_value = "normal", value_parser = parse_priority)]
        priority: Priority,
        /// Run no sooner than this from now ("30s", "10m", "2h").
        #[arg(long, value_parser = humantime::parse_duration)]
        delay: Option<Duration>,
        /// Ordering key.
        #[arg(long)]
        key: Option<String>,
        /// Enqueue this many copies (each with its own id).
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// A unique job: another enqueue of the same key (--dedup-key, else the job name and
        /// payload) into the queue within this window enqueues nothing and prints the first
        /// job's id ("10m", "1h"). Needs a state store.
        #[arg(long, value_parser = humantime::parse_duration)]
        unique_for: Option<Duration>,
        /// The unique key; alone, the job is unique until it finishes (at most 24 h).
        #[arg(long)]
        dedup_key: Option<String>,
        /// Send it even if this binary has no handler for the job or the config does not define
        /// the queue (for a worker built or configured differently).
        #[arg(long)]
        force: bool,
    },
    /// Serve the web dashboard (`/ui`, with /healthz, /metrics and /scale) without running jobs,
    /// until SIGTERM or Ctrl-C. `run` serves the same dashboard beside its jobs.
    Dashboard {
        /// Address to listen on (default: http.bind).
        #[arg(long)]
        bind: Option<std::net::SocketAddr>,
    },
    /// Relay the transactional outbox (`[outbox]`) to the broker until SIGTERM or Ctrl-C,
    /// without running jobs (`run` relays beside its jobs unless `outbox.relay = false`).
    Relay {
        /// First put the rows the broker refused for good back in line (once their cause is
        /// fixed: a raised payload limit, say).
        #[arg(long)]
        retry_refused: bool,
    },
    /// Show queue depths (ready, in flight, delayed, oldest age) per priority level and dead letters.
    Stats {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show a job's status (queued, delayed, running, succeeded, retrying, dead), its attempt,
    /// timestamps, last error and result, for queues with `track_status`. Exits 1 when none
    /// is recorded.
    Status {
        /// The job id (printed by `enqueue`).
        id: String,
        /// Print the status as JSON (what `GET /jobs/{id}` answers).
        #[arg(long)]
        json: bool,
    },
    /// Dead-letter queue tools.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Periodic jobs (`[schedules.<name>]`).
    #[command(subcommand)]
    Schedules(SchedulesCommand),
    /// Config tools.
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Subcommand, Debug)]
enum SchedulesCommand {
    /// List the schedules with their last tick (when, by which worker, the job id) and the next.
    List {
        /// Print JSON (one object per schedule) instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum DlqCommand {
    /// List dead letters with their error, attempts and time of death.
    List {
        /// Logical queue.
        #[arg(short, long, default_value = config::DEFAULT_QUEUE)]
        queue: String,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Print JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Show one dead letter in full, payload included.
    Inspect {
        /// Message id.
        id: String,
        /// Logical queue.
        #[arg(short, long, default_value = config::DEFAULT_QUEUE)]
        queue: String,
    },
    /// Send dead letters back to their queue as fresh jobs.
    Replay {
        /// Logical queue.
        #[arg(short, long, default_value = config::DEFAULT_QUEUE)]
        queue: String,
        /// Only these message ids (repeatable).
        #[arg(long = "id")]
        ids: Vec<String>,
        /// Every dead letter (up to --limit).
        #[arg(long, conflicts_with = "ids")]
        all: bool,
        /// At most this many.
        #[arg(long, default_value_t = 10_000)]
        limit: usize,
    },
    /// Delete dead letters for good.
    Purge {
        /// Logical queue.
        #[arg(short, long, default_value = config::DEFAULT_QUEUE)]
        queue: String,
        /// Only these message ids (repeatable).
        #[arg(long = "id")]
        ids: Vec<String>,
        /// Every dead letter (up to --limit).
        #[arg(long, conflicts_with = "ids")]
        all: bool,
        /// Confirm the deletion.
        #[arg(long)]
        yes: bool,
        /// At most this many.
        #[arg(long, default_value_t = 100_000)]
        limit: usize,
    },
}

#[derive(Subcommand, Debug)]
enum ConfigCommand {
    /// Load and validate the config against the backend, print notices and the effective config
    /// with secrets redacted.
    Check,
}

fn parse_priority(s: &str) -> Result<Priority, String> {
    Priority::parse(s).ok_or_else(|| format!("unknown priority {s:?}: use high, normal or low"))
}

type OnStart = Box<dyn FnOnce(Client, Arc<Stats>, ShutdownHandle) -> BoxFuture<'static, ()> + Send>;

/// Your binary's command line. Build it with your router; `run().await` parses `std::env::args`.
pub struct App<S = ()> {
    router: Router<S>,
    backends: Backends,
    supplied: Option<Arc<dyn Broker>>,
    schedules: BTreeMap<String, ScheduleConfig>,
    on_start: Option<OnStart>,
    summary: Option<Duration>,
}

enum Failure {
    Config(ConfigError),
    Other(String),
}

impl From<ConfigError> for Failure {
    fn from(e: ConfigError) -> Self {
        Failure::Config(e)
    }
}

impl From<stevedore_core::BrokerError> for Failure {
    fn from(e: stevedore_core::BrokerError) -> Self {
        Failure::Other(format!("broker: {e}"))
    }
}

impl From<crate::EnqueueError> for Failure {
    fn from(e: crate::EnqueueError) -> Self {
        Failure::Other(e.to_string())
    }
}

impl<S: Clone + Send + Sync + 'static> App<S> {
    /// An app serving `router`'s handlers.
    pub fn new(router: Router<S>) -> Self {
        App {
            router,
            backends: Backends::builtin(),
            supplied: None,
            schedules: BTreeMap::new(),
            on_start: None,
            summary: None,
        }
    }

    /// Adds a backend: `broker.kind = "<its kind>"` then runs on it, with every command (`run`,
    /// `enqueue`, `stats`, `dlq`, `config check`). A factory of a built-in kind replaces the
    /// built-in one. See [`stevedore_core::factory`] for writing one.
    pub fn backend(mut self, factory: impl BackendFactory) -> Self {
        self.backends = self.backends.register(factory);
        self
    }

    /// Runs every command on `broker`, built by the application itself, whatever `[broker]` says
    /// (the worker logs that `[broker]` is not used when it sets anything). For a backend that
    /// needs no settings of its own, or one wired up in code; [`App::backend`] is the
    /// config-driven way.
    pub fn broker(mut self, broker: Arc<dyn Broker>) -> Self {
        self.supplied = Some(broker);
        self
    }

    /// Adds a state store kind: `[store] kind = "<its kind>"` then keeps the runtime's shared
    /// state there. A factory of a built-in kind replaces the built-in one.
    pub fn store(mut self, factory: impl StoreFactory) -> Self {
        self.backends = self.backends.register_store(factory);
        self
    }

    /// Registers a periodic job in code, as `[schedules.<name>]` would (a `[schedules.<name>]`
    /// of the same name in the config replaces it whole, so operators can retune or disable it).
    /// Checked with the rest of the config at start.
    ///
    /// ```no_run
    /// use stevedore::config::ScheduleConfig;
    /// use stevedore::{App, Router};
    /// # async fn report() {}
    /// # #[tokio::main] async fn main() {
    /// let nightly = ScheduleConfig {
    ///     job: "report".into(),
    ///     cron: Some("0 0 3 * * *".into()),
    ///     timezone: "Europe/Berlin".into(),
    ///     ..ScheduleConfig::default()
    /// };
    /// App::new(Router::new().route("report", report)).schedule("nightly", nightly).run().await;
    /// # }
    /// ```
    pub fn schedule(mut self, name: &str, schedule: ScheduleConfig) -> Self {
        self.schedules.insert(name.to_string(), schedule);
        self
    }

    fn configure(&self, cfg: &Config) -> Result<crate::backend::Configured, ConfigError> {
        match &self.supplied {
            Some(b) => crate::backend::Configured::supplied(b.clone(), cfg)
                .with_store_from(&self.backends, cfg),
            None => self.backends.configure(cfg),
        }
    }

    /// Runs `f` once the worker of `run` has started, with a producer on the same broker, the live
    /// counters and the shutdown handle (the quickstart uses it to produce demo jobs in-process).
    pub fn on_start<F, Fut>(mut self, f: F) -> Self
    where
        F: FnOnce(Client, Arc<Stats>, ShutdownHandle) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        self.on_start = Some(Box::new(move |c, s, h| Box::pin(f(c, s, h))));
        self
    }

    /// Prints a one-line-per-queue summary (processed, retried, dead-lettered, in flight) to stdout
    /// every `every` while `run` runs, and once more at exit.
    pub fn live_summary(mut self, every: Duration) -> Self {
        self.summary = Some(every);
        self
    }

    /// Parses the process arguments and runs the command. Exit status: 0 success, 2 bad config or
    /// usage, 1 broker or other failure.
    pub async fn run(self) -> ExitCode {
        self.run_with(std::env::args_os()).await
    }

    /// As [`App::run`], with explicit arguments (the first is the program name).
    pub async fn run_with<I: IntoIterator<Item = OsString>>(self, args: I) -> ExitCode {
        let cli = match Cli::try_parse_from(args) {
            Ok(c) => c,
            Err(e) => {
                let _ = e.print();
                return if e.use_stderr() {
                    ExitCode::from(2)
                } else {
                    ExitCode::SUCCESS
                };
            }
        };
        init_tracing();
        let result = self.dispatch(cli).await;
        #[cfg(feature = "otel")]
        crate::otel::flush();
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(Failure::Config(e)) => {
                eprintln!("error: invalid config: {e}");
                ExitCode::from(2)
            }
            Err(Failure::Other(e)) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        }
    }

    async fn dispatch(self, cli: Cli) -> Result<(), Failure> {
        let mut cfg = config::load(cli.config.as_deref(), cli.profile.as_deref())?;
        for (name, s) in &self.schedules {
            cfg.schedules
                .entry(name.clone())
                .or_insert_with(|| s.clone());
        }
        match cli.command {
            Command::Run => self.run_worker(cfg).await,
            Command::Dashboard { bind } => self.run_dashboard(cfg, bind).await,
            Command::Relay { retry_refused } => self.run_relay(cfg, retry_refused).await,
            Command::Config(ConfigCommand::Check) => {
                let backend = self.configure(&cfg)?;
                let caps = backend.capabilities();
                let mut notices = backend.notices().to_vec();
                notices.extend(cfg.validate(&caps)?);
                out!(
                    "config OK ({})",
                    cfg.source
                        .as_deref()
                        .unwrap_or("built-in defaults and environment")
                );
                out!("  backend {}: {caps}", backend.kind());
                for n in notices {
                    out!("  note: {n}");
                }
                out!("\n{}", cfg.redacted());
                Ok(())
            }
            command => {
                if let Command::Enqueue {
                    job,
                    queue,
                    force,
                    priority,
                    ..
                } = &command
                {
                    if !force {
                        check_enqueue(&self.router.job_names(), &cfg, job, queue, *priority)?;
                    }
                }
                let backend = self.configure(&cfg)?;
                if !backend.capabilities().shared {
                    eprintln!(
                        "warning: broker.kind = \"{}\" keeps queues inside one process; this command sees only its own empty broker, not a running worker's",
                        backend.kind()
                    );
                }
                // A command answers now: one attempt. A broker that does not answer is a
                // broker failure (1), not a bad config (2).
                let broker = backend.try_connect_client(&cfg).await.map_err(|e| {
                    let err = backend.connect_error(&cfg, &e);
                    if e.is_transient() {
                        Failure::Other(err.to_string())
                    } else {
                        Failure::Config(err)
                    }
                })?;
                let wants_store = match &command {
                    Command::Schedules(_) => !cfg.schedules.is_empty(),
                    // Stats show schedules when they can; never fail over them.
                    Command::Stats { .. } => {
                        cfg.schedules.values().any(|s| s.enabled) && backend.has_store()
                    }
                    Command::Status { .. } => true,
                    Command::Enqueue {
                        job,
                        queue,
                        unique_for,
                        dedup_key,
                        ..
                    } => {
                        unique_for.is_some()
                            || dedup_key.is_some()
                            || cfg.jobs.get(job).is_some_and(|j| j.unique.is_some())
                            || cfg.status_for(queue).is_some()
                    }
                    _ => false,
                };
                let store = match &command {
                    _ if wants_store => {
                        if !backend.has_store() {
                            return Err(Failure::Config(cfg.error_at(
                                "store",
                                format!(
                                    "schedules, unique jobs and job status keep their state in a state store, and the {} broker holds none: set [store] kind",
                                    backend.kind()
                                ),
                            )));
                        }
                        match backend.connect_store().await {
                            Ok(store) => store,
                            Err(e) if matches!(command, Command::Stats { .. }) => {
                                eprintln!(
                                    "warning: schedules not shown: {}",
                                    backend.store_error(&cfg, &e)
                                );
                                None
                            }
                            Err(e) => {
                                let err = backend.store_error(&cfg, &e);
                                return Err(if e.is_transient() {
                                    Failure::Other(err.to_string())
                                } else {
                                    Failure::Config(err)
                                });
                            }
                        }
                    }
                    _ => None,
                };
                admin(command, &cfg, broker, store).await
            }
        }
    }

    async fn run_worker(self, cfg: Config) -> Result<(), Failure> {
        let backend = self.configure(&cfg)?;
        // A bad config fails before anything is opened or connected.
        cfg.validate(&backend.capabilities())?;
        let broker = connect_patiently(&backend, &cfg, false).await?;
        let store = connect_store_patiently(&backend, &cfg).await?;
        let mut worker = Worker::new(broker, self.router, cfg)?.with_notices(backend.notices());
        if let Some(store) = store {
            worker = worker.with_store(store);
        }
        let handle = worker.shutdown_handle();
        let signals = listen_for_signals(handle.clone());
        let stats = worker.stats();
        if let Some(f) = self.on_start {
            tokio::spawn(f(worker.client(), stats.clone(), handle.clone()));
        }
        let printer = self.summary.map(|every| {
            let stats = stats.clone();
            let mut stop = handle.subscribe();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(every) => print_summary(&stats),
                        _ = stop.wait_for(|s| *s) => return,
                    }
                }
            })
        });
        let report = worker.run().await;
        signals.abort();
        if let Some(p) = printer {
            p.abort();
        }
        if self.summary.is_some() {
            print_summary(&stats);
        }
        report
            .map(|_| ())
            .map_err(|e| Failure::Other(e.to_string()))
    }
}

impl<S: Clone + Send + Sync + 'static> App<S> {
    /// `relay`: the outbox relay alone, until a signal.
    async fn run_relay(self, cfg: Config, retry_refused: bool) -> Result<(), Failure> {
        let backend = self.configure(&cfg)?;
        cfg.validate(&backend.capabilities())?;
        let Some(outbox) = cfg.outbox.clone() else {
            return Err(Failure::Config(cfg.error_at(
                "outbox",
                "is not configured: add [outbox] with url = \"postgres://...\" (the database your transactions write to)".into(),
            )));
        };
        #[cfg(not(feature = "postgres"))]
        {
            let _ = (outbox, retry_refused);
            Err(Failure::Config(
                cfg.error_at(
                    "outbox",
                    "the transactional outbox needs the `postgres` feature of the stevedore crate"
                        .into(),
                ),
            ))
        }
        #[cfg(feature = "postgres")]
        {
            let broker = connect_patiently(&backend, &cfg, true).await?;
            // Statuses of relayed jobs need the store, when a queue tracks them.
            let tracks = cfg
                .effective_queues()
                .values()
                .any(|q| q.track_status.window().is_some());
            let mut client = Client::new(broker.clone()).with_limits_from(&cfg);
            if tracks {
                if let Some(store) = connect_store_patiently(&backend, &cfg).await? {
                    client = client.with_store(store);
                }
            }
            if retry_refused {
                let table = crate::outbox::Outbox::connect(&outbox.url, &outbox.table)
                    .await
                    .map_err(|e| Failure::Other(format!("outbox: {e}")))?;
                let n = table
                    .retry_refused()
                    .await
                    .map_err(|e| Failure::Other(format!("outbox: {e}")))?;
                tracing::info!(rows = n, "outbox: refused rows put back in line");
            }
            let handle = ShutdownHandle::new();
            let signals = listen_for_signals(handle.clone());
            crate::outbox::relay(outbox, client, handle.subscribe()).await;
            signals.abort();
            if let Err(e) = broker.close().await {
                tracing::warn!(error = %e, "closing the broker failed");
            }
            Ok(())
        }
    }

    /// `dashboard`: the web dashboard and the read-only endpoints, with an autoscale sampler of
    /// its own, and no jobs.
    async fn run_dashboard(
        self,
        cfg: Config,
        bind: Option<std::net::SocketAddr>,
    ) -> Result<(), Failure> {
        let backend = self.configure(&cfg)?;
        let caps = backend.capabilities();
        let mut notices = backend.notices().to_vec();
        notices.extend(cfg.validate(&caps)?);
        if !cfg.http.ui {
            return Err(Failure::Config(
                cfg.error_at(
                    "http.ui",
                    "is false, so there is no dashboard to serve; set it to true (or leave it out)"
                        .into(),
                ),
            ));
        }
        if !caps.shared {
            tracing::warn!(
                "broker.kind = \"{}\" keeps queues inside one process: this dashboard shows its own empty broker, not a worker's",
                backend.kind()
            );
        }
        let broker = connect_patiently(&backend, &cfg, true).await?;
        let bind = bind.unwrap_or(cfg.http.bind);
        let listener = tokio::net::TcpListener::bind(bind).await.map_err(|e| {
            Failure::Other(format!(
                "cannot serve the dashboard on {bind}: {e}; pass --bind with a free address (127.0.0.1:0 takes any free port)"
            ))
        })?;
        let shown = listener.local_addr().unwrap_or(bind);
        let cfg = Arc::new(cfg);
        let handle = ShutdownHandle::new();
        let signals = listen_for_signals(handle.clone());
        let stats = Stats::new();
        let hints = crate::autoscale::Hints::new();
        let sampler = crate::autoscale::spawn_sampler(
            broker.clone(),
            crate::autoscale::specs(&cfg),
            stats.clone(),
            crate::autoscale::Settings::from_config(&cfg, broker.capabilities()),
            hints.clone(),
            handle.subscribe(),
        );
        // For job status (GET /jobs/{id}, the job page): one try; the dashboard serves without.
        let store = match backend.connect_store().await {
            Ok(store) => store,
            Err(e) => {
                tracing::warn!(error = %e, "state store unreachable: no job status on this dashboard");
                None
            }
        };
        let ui = crate::ui::Ui::new(crate::ui::UiParts {
            broker: broker.clone(),
            config: cfg.clone(),
            jobs: self
                .router
                .job_names()
                .into_iter()
                .map(str::to_string)
                .collect(),
            stats: stats.clone(),
            hints: hints.clone(),
            worker_id: cfg.worker.worker_id(),
            notices,
            runs_jobs: false,
            store: store.clone(),
        });
        let state = crate::http::HttpState {
            stats,
            hints,
            prometheus: crate::stats::install_prometheus().ok(),
            worker_id: cfg.worker.worker_id(),
            ui: Some(ui),
            store,
        };
        tracing::info!(%bind, "dashboard at http://{shown}/ui (no jobs run in this process)");
        state.stats.set_ready(true);
        let served = crate::http::serve(listener, state, handle.subscribe()).await;
        signals.abort();
        let _ = sampler.await;
        if let Err(e) = broker.close().await {
            tracing::warn!(error = %e, "closing the broker failed");
        }
        served.map_err(|e| Failure::Other(format!("the dashboard's HTTP server failed: {e}")))
    }
}

/// Connects for `run`: a broker that does not answer yet is tried again with the runtime's
/// backoff (200 ms doubling to 5 s) until `[worker] startup_timeout`, each failure logged; after
/// that, a broker failure (exit 1). A broker that refuses the settings fails at once, as a bad
/// config (exit 2).
///
/// `client`: the process consumes nothing (the dashboard).
async fn connect_patiently(
    backend: &Configured,
    cfg: &Config,
    client: bool,
) -> Result<Arc<dyn Broker>, Failure> {
    let within = cfg.worker.startup_timeout;
    let started = tokio::time::Instant::now();
    let deadline = started + within;
    let mut backoff = crate::runtime::ErrorBackoff::default();
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        // An attempt never runs past the deadline (a client's own retries can take longer).
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let attempt_once = async {
            if client {
                backend.try_connect_client(cfg).await
            } else {
                backend.try_connect(cfg).await
            }
        };
        let tried = tokio::time::timeout(left.max(Duration::from_secs(1)), attempt_once).await;
        let error = match tried {
            Ok(Ok(broker)) => {
                if attempt > 1 {
                    tracing::info!(
                        attempt,
                        waited = ?started.elapsed(),
                        "reached the {} broker",
                        backend.kind()
                    );
                }
                return Ok(broker);
            }
            Ok(Err(e)) if !e.is_transient() => {
                return Err(Failure::Config(backend.connect_error(cfg, &e)))
            }
            Ok(Err(e)) => e,
            Err(_) => stevedore_core::BrokerError::Timeout(left.max(Duration::from_secs(1))),
        };
        let pause = backoff.next();
        if tokio::time::Instant::now() + pause > deadline {
            return Err(Failure::Other(format!(
                "{} (gave up after {attempt} attempt(s) in {}: [worker] startup_timeout = \"{}\")",
                backend.connect_error(cfg, &error),
                humantime::format_duration(Duration::from_secs(started.elapsed().as_secs())),
                humantime::format_duration(within)
            )));
        }
        tracing::warn!(
            attempt,
            error = %error,
            retry_in = ?pause,
            "cannot reach the {} broker yet; retrying until [worker] startup_timeout ({})",
            backend.kind(),
            humantime::format_duration(within)
        );
        tokio::time::sleep(pause).await;
    }
}

fn print_summary(stats: &Stats) {
    for (queue, s) in stats.snapshot() {
        out!(
            "[{queue}] processed {:>7}  retried {:>5}  dead-lettered {:>4}  in flight {:>3}",
            s.processed,
            s.retried,
            s.dead_lettered,
            s.in_flight
        );
    }
}

/// `RUST_LOG`, `info` when unset; lapin (the RabbitMQ client) stays quiet unless `RUST_LOG`
/// names it: it logs expected conditions as errors (a passive declare's 404, a channel closed on
/// shutdown) and repeats, as three ERROR lines, what the backend then reports in one clear
/// message.
fn log_filter(rust_log: Option<&str>) -> String {
    let base = rust_log.filter(|s| !s.trim().is_empty()).unwrap_or("info");
    if base.contains("lapin") {
        base.to_string()
    } else {
        format!("{base},lapin=off")
    }
}

fn init_tracing() {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let rust_log = std::env::var("RUST_LOG").ok();
    let filter = tracing_subscriber::EnvFilter::try_new(log_filter(rust_log.as_deref()))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,lapin=off"));
    let fmt = tracing_subscriber::fmt::layer()
        .fmt_fields(crate::LogFields)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(filter).with(fmt);
    #[cfg(feature = "otel")]
    {
        match crate::otel::layer_from_env() {
            Ok(otel) => {
                let exporting = otel.is_some();
                if registry.with(otel).try_init().is_ok() && exporting {
                    tracing::info!("OpenTelemetry: exporting traces by OTLP (OTEL_* variables)");
                }
            }
            Err(e) => {
                let _ = registry.try_init();
                tracing::warn!("OpenTelemetry: {e}; traces are not exported");
            }
        }
    }
    #[cfg(not(feature = "otel"))]
    let _ = registry.try_init();
}

/// Refuses an enqueue no worker of this binary and config would ever take: a job name none of
/// its handlers serves (when it has any: a binary without handlers cannot tell), or a queue its
/// config does not define.
fn check_enqueue(
    jobs: &[&str],
    cfg: &Config,
    job: &str,
    queue: &str,
    priority: Priority,
) -> Result<(), Failure> {
    let file = cfg.source.as_deref().unwrap_or("the built-in defaults");
    if cfg.queue(queue).is_none() {
        let defined: Vec<String> = cfg.effective_queues().into_keys().collect();
        return Err(Failure::Other(format!(
            "queue {queue:?} is not defined in {file} (it defines: {}): no worker with this \
             config would take the job. Define [queues.{queue}], pick one of those with \
             --queue, or add --force to send it anyway",
            defined.join(", ")
        )));
    }
    let levels = cfg.levels(queue);
    if !levels.contains(&priority) {
        let served: Vec<&str> = levels.iter().map(|p| p.as_str()).collect();
        return Err(Failure::Other(format!(
            "queue {queue:?} serves only {} in {file} (queues.{queue}.weights), so a {} job \
             would wait where no worker looks. Pick one of those with --priority, add the level \
             to the queue's weights, or add --force to send it anyway",
            served.join(", "),
            priority.as_str()
        )));
    }
    if !jobs.is_empty() && !jobs.contains(&job) {
        return Err(Failure::Other(format!(
            "no handler is registered for job {job:?} in this binary (it has: {}): the job would \
             be dead-lettered as unroutable. Add --force to send it anyway (for a worker built \
             with that handler)",
            jobs.join(", ")
        )));
    }
    Ok(())
}

/// The payload argument: JSON as given, `-` for stdin, `@FILE` for a file's contents.
fn read_payload(arg: &str) -> Result<String, Failure> {
    if arg == "-" {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
            .map_err(|e| Failure::Other(format!("cannot read the payload from stdin: {e}")))?;
        return Ok(text);
    }
    match arg.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| Failure::Other(format!("cannot read the payload file {path}: {e}"))),
        None => Ok(arg.to_string()),
    }
}

fn check_queue(q: &str) -> Result<(), Failure> {
    names::validate(q)
        .map_err(|reason| Failure::Other(format!("invalid queue name {q:?}: {reason}")))
}

fn select(ids: Vec<String>, all: bool, verb: &str) -> Result<Select, Failure> {
    match (all, ids.is_empty()) {
        (true, _) => Ok(Select::All),
        (false, false) => Ok(Select::Ids(ids)),
        (false, true) => Err(Failure::Other(format!(
            "say which dead letters to {verb}: --id ID (repeatable) or --all"
        ))),
    }
}

/// Connects the state store for `run`, if one is configured: retried with backoff until
/// `[worker] startup_timeout`, like the broker.
async fn connect_store_patiently(
    backend: &Configured,
    cfg: &Config,
) -> Result<Option<Arc<dyn Store>>, Failure> {
    let deadline = tokio::time::Instant::now() + cfg.worker.startup_timeout;
    let mut backoff = crate::runtime::ErrorBackoff::default();
    loop {
        match backend.connect_store().await {
            Ok(store) => return Ok(store),
            Err(e) if e.is_transient() && tokio::time::Instant::now() < deadline => {
                let pause = backoff.next();
                tracing::warn!(error = %e, retry_in = ?pause, "cannot reach the state store yet; retrying");
                tokio::time::sleep(pause).await;
            }
            Err(e) if e.is_transient() => {
                return Err(Failure::Other(backend.store_error(cfg, &e).to_string()))
            }
            Err(e) => return Err(Failure::Config(backend.store_error(cfg, &e))),
        }
    }
}

async fn admin(
    command: Command,
    cfg: &Config,
    broker: Arc<dyn Broker>,
    store: Option<Arc<dyn Store>>,
) -> Result<(), Failure> {
    match command {
        Command::Status { id, json } => {
            let Some(store) = store else {
                return Err(Failure::Other("job status needs a state store".into()));
            };
            let client = Client::new(broker).with_store(store);
            let Some(s) = client.status(&id).await? else {
                return Err(Failure::Other(format!(
                    "no status recorded for job {id}: its queue does not track status (queues.<name>.track_status), the id is unknown, or its status expired"
                )));
            };
            if json {
                out!("{}", serde_json::to_string(&s).unwrap_or_default());
                return Ok(());
            }
            let time = |t: Option<std::time::SystemTime>| {
                t.map_or_else(
                    || "-".to_string(),
                    |t| humantime::format_rfc3339_millis(crate::status::clamp(t)).to_string(),
                )
            };
            let attempts = match s.max_attempts {
                Some(max) => format!("{} of {max}", s.attempt),
                None => s.attempt.to_string(),
            };
            out!("id          {}", s.id);
            out!("job         {} (queue {})", s.job, s.queue);
            out!("state       {}", s.state);
            out!("attempt     {attempts}");
            out!("enqueued    {}", time(Some(s.enqueued_at)));
            if s.run_at.is_some() {
                out!("runs at     {}", time(s.run_at));
            }
            out!("started     {}", time(s.started_at));
            out!("finished    {}", time(s.finished_at));
            out!("updated     {}", time(Some(s.updated_at)));
            out!("worker      {}", s.worker.as_deref().unwrap_or("-"));
            if let Some(e) = &s.last_error {
                out!("last error  {e}");
            }
            if let Some(r) = &s.result {
                out!("result      {r}");
            }
            Ok(())
        }
        Command::Schedules(SchedulesCommand::List { json }) => {
            let Some(store) = store else {
                out!("no schedules in this config ([schedules.<name>])");
                return Ok(());
            };
            let list = crate::schedule::statuses(cfg, store.as_ref()).await?;
            if json {
                for s in &list {
                    out!("{}", serde_json::to_string(s).unwrap_or_default());
                }
                return Ok(());
            }
            out!(
                "{:<20} {:<20} {:<12} {:<32} {:<25} {:<25} {}",
                "SCHEDULE",
                "JOB",
                "QUEUE",
                "WHEN",
                "LAST TICK",
                "NEXT TICK",
                "LAST BY"
            );
            for s in &list {
                let dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
                let next = if s.enabled {
                    dash(&s.next_tick)
                } else {
                    "(disabled)".into()
                };
                out!(
                    "{:<20} {:<20} {:<12} {:<32} {:<25} {:<25} {}",
                    s.name,
                    s.job,
                    s.queue,
                    s.spec,
                    dash(&s.last_tick),
                    next,
                    dash(&s.last_by)
                );
                if let Some(p) = &s.pending_tick {
                    out!("  tick {p} is claimed and being published (or its worker died: another takes it over)");
                }
                if s.skipped > 0 {
                    out!(
                        "  {} tick(s) skipped as missed (catch_up = \"skip\")",
                        s.skipped
                    );
                }
            }
            Ok(())
        }
        Command::Enqueue {
            job,
            payload,
            queue,
            priority,
            delay,
            key,
            count,
            force: _,
            unique_for,
            dedup_key,
        } => {
            check_queue(&queue)?;
            let payload = read_payload(&payload)?;
            let value: serde_json::Value = serde_json::from_str(&payload)
                .map_err(|e| Failure::Other(format!("payload is not valid JSON: {e}")))?;
            let mut client = Client::new(broker).with_limits_from(cfg);
            if let Some(store) = store {
                client = client.with_store(store);
            }
            for _ in 0..count {
                let mut e = client
                    .enqueue(&job, &value)
                    .queue(&queue)
                    .priority(priority);
                if let Some(d) = delay {
                    e = e.delay(d);
                }
                if let Some(k) = &key {
                    e = e.key(k);
                }
                if let Some(w) = unique_for {
                    e = e.unique_for(w);
                }
                if let Some(k) = &dedup_key {
                    e = e.dedup_key(k);
                }
                let sent = e.send_or_existing().await?;
                out!("{}", sent.id);
                if sent.duplicate {
                    eprintln!(
                        "note: not enqueued: job {} holds this unique key (its id is printed)",
                        sent.id
                    );
                }
            }
            Ok(())
        }
        Command::Stats { json } => {
            let mut rows = Vec::new();
            for (name, q) in cfg.effective_queues() {
                for p in q.levels() {
                    let d = broker.depth(&names::physical(&name, p)).await?;
                    rows.push((name.clone(), p.as_str().to_string(), d));
                }
                let d = broker.depth(&names::dead_letter(&name)).await?;
                rows.push((name.clone(), "dead-letter".to_string(), d));
            }
            // The autoscale hint of each queue, from the same depths the worker's sampler
            // reads (ready + in flight over its levels, dead letters excluded).
            let settings = crate::autoscale::Settings::from_config(cfg, broker.capabilities());
            let mut wanted: std::collections::BTreeMap<&str, (u64, u64)> = Default::default();
            for (q, l, d) in &rows {
                if l != "dead-letter" {
                    let w = wanted.entry(q.as_str()).or_default();
                    w.0 += d.ready;
                    w.1 += d.in_flight;
                }
            }
            let desired = |q: &str| {
                let (ready, in_flight) = wanted.get(q).copied().unwrap_or_default();
                crate::autoscale::desired_workers(ready, in_flight, &settings)
            };
            if json {
                let mut v: Vec<_> = rows
                    .iter()
                    .map(|(q, l, d)| {
                        serde_json::json!({"queue": q, "level": l, "depth": d, "desired_workers": desired(q)})
                    })
                    .collect();
                // Schedules follow the queues' rows, one object each, told apart by "schedule".
                if let Some(store) = &store {
                    for s in crate::schedule::statuses(cfg, store.as_ref()).await? {
                        let mut row = serde_json::to_value(&s).unwrap_or_default();
                        if let Some(obj) = row.as_object_mut() {
                            if let Some(name) = obj.remove("name") {
                                obj.insert("schedule".into(), name);
                            }
                        }
                        v.push(row);
                    }
                }
                // The outbox, told apart by "outbox" (its table).
                if let Some(p) = outbox_pending(cfg).await {
                    v.push(serde_json::json!({
                        "outbox": p.0,
                        "waiting": p.1.rows,
                        "oldest_age_seconds": p.1.oldest.map(|d| d.as_secs_f64()),
                        "refused": p.1.refused,
                    }));
                }
                out!("{}", serde_json::Value::Array(v));
            } else {
                out!(
                    "{:<24} {:<12} {:>10} {:>10} {:>10} {:>12}",
                    "QUEUE",
                    "LEVEL",
                    "READY",
                    "IN FLIGHT",
                    "DELAYED",
                    "OLDEST"
                );
                for (q, l, d) in &rows {
                    let oldest = d
                        .oldest_age
                        .map(|a| format!("{}s", a.as_secs()))
                        .unwrap_or_else(|| "-".into());
                    // Backends that keep delayed messages in shared structures (RabbitMQ)
                    // cannot count them per queue: shown as "-".
                    let delayed = d.delayed.map_or_else(|| "-".to_string(), |n| n.to_string());
                    out!(
                        "{q:<24} {l:<12} {:>10} {:>10} {delayed:>10} {oldest:>12}",
                        d.ready,
                        d.in_flight
                    );
                }
                out!();
                for (q, (ready, in_flight)) in &wanted {
                    out!(
                        "autoscale: {q} wants {} worker(s) (ready + in flight {} / target_per_worker {}, between {} and {})",
                        desired(q),
                        ready + in_flight,
                        settings.target_per_worker,
                        settings.min_workers,
                        settings.max_workers
                    );
                }
                if let Some(store) = &store {
                    for s in crate::schedule::statuses(cfg, store.as_ref()).await? {
                        out!(
                            "schedule: {} ({}, job {} to {}): last tick {}, next {}",
                            s.name,
                            s.spec,
                            s.job,
                            s.queue,
                            s.last_tick.as_deref().unwrap_or("-"),
                            if s.enabled {
                                s.next_tick.as_deref().unwrap_or("-")
                            } else {
                                "(disabled)"
                            }
                        );
                    }
                }
                if let Some((table, p)) = outbox_pending(cfg).await {
                    out!(
                        "outbox: {table}: {} row(s) waiting to be relayed, oldest {}{}",
                        p.rows,
                        p.oldest.map_or_else(
                            || "-".to_string(),
                            |d| format!("{:.1}s", d.as_secs_f64())
                        ),
                        if p.refused > 0 {
                            format!(
                                "; {} refused by the broker (see the error column; relay --retry-refused puts them back)",
                                p.refused
                            )
                        } else {
                            String::new()
                        }
                    );
                }
            }
            Ok(())
        }
        Command::Dlq(DlqCommand::List { queue, limit, json }) => {
            check_queue(&queue)?;
            let list = dlq::list(&broker, &queue, limit).await?;
            for d in &list {
                if json {
                    out!("{}", dead_letter_json(d));
                } else {
                    out!(
                        "{}  job={}  attempts={}  died={}  error={}",
                        d.envelope.id,
                        d.envelope.job.as_deref().unwrap_or("-"),
                        d.attempts,
                        d.last_failure
                            .map(
                                |t| humantime::format_rfc3339_seconds(crate::status::clamp(t))
                                    .to_string()
                            )
                            .unwrap_or_default(),
                        d.error
                    );
                }
            }
            if !json {
                // How many there are in all, where the broker can count them.
                let total = broker
                    .depth(&names::dead_letter(&queue))
                    .await
                    .ok()
                    .map(|d| d.ready + d.in_flight)
                    .filter(|&t| t > list.len() as u64);
                match total {
                    Some(total) => out!(
                        "{} of {total} dead letter(s) in {} (--limit shows more)",
                        list.len(),
                        names::dead_letter(&queue)
                    ),
                    None => out!(
                        "{} dead letter(s) in {}",
                        list.len(),
                        names::dead_letter(&queue)
                    ),
                }
            }
            Ok(())
        }
        Command::Dlq(DlqCommand::Inspect { id, queue }) => {
            check_queue(&queue)?;
            let list = dlq::list(&broker, &queue, usize::MAX).await?;
            let found = list.iter().find(|d| d.envelope.id == id).ok_or_else(|| {
                Failure::Other(format!(
                    "no dead letter with id {id} in {}",
                    names::dead_letter(&queue)
                ))
            })?;
            let pretty = serde_json::to_string_pretty(&dead_letter_json(found)).unwrap_or_default();
            out!("{pretty}");
            Ok(())
        }
        Command::Dlq(DlqCommand::Replay {
            queue,
            ids,
            all,
            limit,
        }) => {
            check_queue(&queue)?;
            let n = dlq::replay(&broker, &queue, &select(ids, all, "replay")?, limit).await?;
            out!(
                "replayed {n} dead letter(s) from {}",
                names::dead_letter(&queue)
            );
            Ok(())
        }
        Command::Dlq(DlqCommand::Purge {
            queue,
            ids,
            all,
            yes,
            limit,
        }) => {
            check_queue(&queue)?;
            let sel = select(ids, all, "purge")?;
            if !yes {
                return Err(Failure::Other(
                    "purge deletes dead letters for good: add --yes to confirm".into(),
                ));
            }
            let n = dlq::purge(&broker, &queue, &sel, limit).await?;
            out!(
                "purged {n} dead letter(s) from {}",
                names::dead_letter(&queue)
            );
            Ok(())
        }
        Command::Run | Command::Config(_) | Command::Dashboard { .. } | Command::Relay { .. } => {
            Ok(())
        }
    }
}

/// The outbox's table and what waits in it, for `stats`; `None` without `[outbox]`. Never fails
/// the command: an unreachable database is a warning.
#[cfg(feature = "postgres")]
async fn outbox_pending(cfg: &Config) -> Option<(String, crate::outbox::Pending)> {
    let o = cfg.outbox.as_ref()?;
    match crate::outbox::pending(o).await {
        Ok(p) => Some((o.table.clone(), p)),
        Err(e) => {
            eprintln!("warning: outbox not shown: {e}");
            None
        }
    }
}

/// Without the `postgres` feature there is no outbox.
#[cfg(not(feature = "postgres"))]
async fn outbox_pending(_: &Config) -> Option<(String, OutboxCounts)> {
    None
}

/// What `stats` shows of the outbox (the `postgres` feature's `outbox::Pending`).
#[cfg(not(feature = "postgres"))]
#[allow(dead_code)]
struct OutboxCounts {
    rows: u64,
    oldest: Option<std::time::Duration>,
    refused: u64,
}

fn dead_letter_json(d: &dlq::DeadLetter) -> serde_json::Value {
    let e = &d.envelope;
    let payload = match std::str::from_utf8(&e.payload) {
        Ok(s) => {
            serde_json::from_str(s).unwrap_or_else(|_| serde_json::Value::String(s.to_string()))
        }
        Err(_) => serde_json::Value::String(format!("<{} bytes of binary>", e.payload.len())),
    };
    serde_json::json!({
        "id": e.id,
        "job": e.job,
        "origin": d.origin,
        "attempts": d.attempts,
        "error": d.error,
        "first_failure": d.first_failure.map(|t| humantime::format_rfc3339_millis(crate::status::clamp(t)).to_string()),
        "last_failure": d.last_failure.map(|t| humantime::format_rfc3339_millis(crate::status::clamp(t)).to_string()),
        "worker": d.worker,
        "priority": e.priority.as_str(),
        "headers": e.headers,
        "payload": payload,
    })
}

#[cfg(test)]
mod tests {
    use super::log_filter;

    #[test]
    fn lapin_is_quiet_unless_named() {
        assert_eq!(log_filter(None), "info,lapin=off");
        assert_eq!(log_filter(Some("")), "info,lapin=off");
        assert_eq!(log_filter(Some("debug")), "debug,lapin=off");
        assert_eq!(log_filter(Some("info,lapin=debug")), "info,lapin=debug");
    }
}
