//! The worker: validates its config against the backend, runs the runtime until shut down, drains.

use crate::autoscale::{self, Hints};
use crate::client::Client;
use crate::config::{Config, ConfigError};
use crate::delay::Scheduler;
use crate::http::{self, HttpState};
use crate::router::{Router, Routes};
use crate::runtime::{self, ErrorBackoff};
use crate::shutdown::ShutdownHandle;
use crate::stats::Stats;
use std::sync::Arc;
use std::time::Duration;
use stevedore_core::store::Store;
use stevedore_core::{names, Broker, BrokerError};

/// A configured worker, ready to [`Worker::run`].
///
/// ```no_run
/// # use stevedore::{config, Router, Worker, MemoryBroker};
/// # use std::sync::Arc;
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let config = config::from_toml_str("[queues.emails]\nconcurrency = 8", None)?;
/// let worker = Worker::new(Arc::new(MemoryBroker::new()), Router::new(), config)?;
/// let stop = worker.shutdown_handle();
/// tokio::spawn(async move { tokio::time::sleep(std::time::Duration::from_secs(1)).await; stop.shutdown() });
/// worker.run().await?;
/// # Ok(()) }
/// ```
pub struct Worker {
    broker: Arc<dyn Broker>,
    routes: Routes,
    config: Arc<Config>,
    stats: Arc<Stats>,
    hints: Arc<Hints>,
    shutdown: ShutdownHandle,
    worker_id: Arc<str>,
    notices: Vec<String>,
    store: Option<Arc<dyn Store>>,
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunReport {
    /// Every in-flight job finished within the shutdown deadline.
    pub drained: bool,
}

impl Worker {
    /// Checks `config` against the broker's capabilities and the router (every `default_job` must
    /// have a handler). Connects nothing.
    pub fn new<S: Clone + Send + Sync + 'static>(
        broker: Arc<dyn Broker>,
        router: Router<S>,
        config: Config,
    ) -> Result<Self, ConfigError> {
        let mut notices = config.validate_on(broker.as_ref())?;
        if let Some(job) = router.duplicates().first() {
            return Err(ConfigError {
                file: config.source.clone(),
                key: None,
                message: format!(
                    "job \"{job}\" is registered twice on the router (Router::route); each job \
                     name needs exactly one handler"
                ),
            });
        }
        let routes = router.into_routes();
        for (name, q) in config.effective_queues() {
            if let Some(job) = &q.default_job {
                if !routes.contains(job) {
                    return Err(ConfigError {
                        file: config.source.clone(),
                        key: Some(format!("queues.{name}.default_job")),
                        message: format!(
                            "no handler is registered for job \"{job}\"; registered: {}",
                            routes.names().join(", ")
                        ),
                    });
                }
            }
        }
        for (name, s) in config.schedules.iter().filter(|(_, s)| s.enabled) {
            if !routes.contains(&s.job) {
                return Err(config.error_at(
                    &format!("schedules.{name}.job"),
                    format!(
                        "no handler is registered for job \"{}\"; registered: {}",
                        s.job,
                        routes.names().join(", ")
                    ),
                ));
            }
        }
        let scheduler = Scheduler::new(broker.clone());
        // The scheduler knows how delays are done on this connected broker: its line replaces
        // the config check's (which is written without a connection).
        notices.retain(|n| !n.starts_with("delay:"));
        notices.push(scheduler.describe());
        notices.push(format!(
            "backend {}: {}",
            broker.name(),
            broker.capabilities()
        ));
        Ok(Worker {
            worker_id: config.worker.worker_id().into(),
            broker,
            routes,
            config: Arc::new(config),
            stats: Stats::new(),
            hints: Hints::new(),
            shutdown: ShutdownHandle::new(),
            notices,
            store: None,
        })
    }

    /// The state store behind periodic jobs (`[schedules.*]`): [`crate::App`] connects the one
    /// `[store]` names (or the broker's own); code that builds a worker itself passes one here.
    /// A worker with enabled schedules and no store fails [`Worker::run`].
    pub fn with_store(mut self, store: Arc<dyn Store>) -> Self {
        if !store.shared_across_machines() {
            let reach = if store.name() == "memory" {
                "this process only: every other worker keeps its own"
            } else {
                "shared only by the processes of this machine; workers elsewhere keep their own"
            };
            self.notices.push(format!(
                "store {}: {reach} state (schedules, unique keys, limits)",
                store.name()
            ));
        }
        self.store = Some(store);
        self
    }

    /// Adds start-up notices from outside the runtime (the backend's, about its settings); they are
    /// logged first.
    pub fn with_notices(mut self, notices: &[String]) -> Self {
        self.notices.splice(0..0, notices.iter().cloned());
        self
    }

    /// Live counters.
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// Autoscale hints, refreshed every `autoscale.interval` while running.
    pub fn hints(&self) -> Arc<Hints> {
        self.hints.clone()
    }

    /// Triggers the graceful shutdown from code (signals are wired by [`crate::App`]).
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.shutdown.clone()
    }

    /// A producer on the same broker.
    pub fn client(&self) -> Client {
        let client = Client::new(self.broker.clone()).with_limits_from(&self.config);
        match &self.store {
            Some(store) => client.with_store(store.clone()),
            None => client,
        }
    }

    /// What the runtime emulates or notes about this backend, logged at start-up.
    pub fn notices(&self) -> &[String] {
        &self.notices
    }

    /// This worker's id (in dead-letter headers and logs).
    pub fn id(&self) -> &str {
        &self.worker_id
    }

    /// Runs until the shutdown handle fires, then drains: stops fetching, waits for in-flight jobs up
    /// to `worker.shutdown_timeout`, releases the rest, flushes acks and closes the broker. Returns an
    /// error only when the broker could not be prepared before shutdown was asked for, or when
    /// the HTTP endpoints cannot listen on `http.bind` (a permanent error naming the address).
    pub async fn run(self) -> Result<RunReport, BrokerError> {
        if let (Some(key), None) = (self.config.needs_store(), &self.store) {
            return Err(BrokerError::permanent(format!(
                "{key} needs a state store, and the worker has none (Worker::with_store, or [store] with App)"
            )));
        }
        for n in &self.notices {
            tracing::info!("{n}");
        }
        // First, so that a taken address fails the start rather than leaving a worker without
        // metrics and health checks; and health is served while the broker is being prepared.
        let http_task = self.start_http(self.shutdown.subscribe()).await?;
        let specs = autoscale::specs(&self.config);
        let mut physical = Vec::new();
        for s in &specs {
            physical.extend(s.physical.iter().cloned());
            physical.push(names::dead_letter(&s.name));
        }
        let mut backoff = ErrorBackoff::default();
        while let Err(e) = self.broker.prepare(&physical).await {
            if self.shutdown.is_shutting_down() {
                return Err(e);
            }
            let pause = backoff.next();
            tracing::warn!(error = %e, retry_in = ?pause, "cannot prepare queues on the broker; retrying");
            tokio::time::sleep(pause).await;
        }
        let polled: Vec<String> = specs.iter().flat_map(|s| s.physical.clone()).collect();
        while let Err(e) = self.broker.subscribe(&polled).await {
            if self.shutdown.is_shutting_down() {
                return Err(e);
            }
            let pause = backoff.next();
            tracing::warn!(error = %e, retry_in = ?pause, "cannot subscribe to the queues on the broker; retrying");
            tokio::time::sleep(pause).await;
        }
        let mut soft = self.shutdown.subscribe();
        let sampler = autoscale::spawn_sampler(
            self.broker.clone(),
            specs,
            self.stats.clone(),
            autoscale::Settings::from_config(&self.config, self.broker.capabilities()),
            self.hints.clone(),
            soft.clone(),
        );
        let started = runtime::start(
            self.config.clone(),
            self.routes.clone(),
            Scheduler::new(self.broker.clone()),
            self.client(),
            &self.stats,
            &self.shutdown,
            self.worker_id.clone(),
        );
        let schedules = crate::schedule::from_config(&self.config);
        let mut schedule_tasks = Vec::new();
        if let Some(store) = self.store.clone().filter(|_| !schedules.is_empty()) {
            for s in schedules {
                schedule_tasks.push(tokio::spawn(crate::schedule::run(
                    s,
                    store.clone(),
                    self.client(),
                    self.worker_id.clone(),
                    self.shutdown.subscribe(),
                )));
            }
        }
        let schedules = schedule_tasks.len();
        // The outbox relay stops with the schedules, before the queues drain.
        #[cfg(feature = "postgres")]
        if let Some(o) = self.config.outbox.clone().filter(|o| o.relay) {
            schedule_tasks.push(tokio::spawn(crate::outbox::relay(
                o,
                self.client(),
                self.shutdown.subscribe(),
            )));
        }
        tracing::info!(worker = %self.worker_id, queues = ?self.config.effective_queues().keys().collect::<Vec<_>>(), schedules, "worker started");
        self.stats.set_ready(true);

        let _ = soft.wait_for(|s| *s).await;
        self.stats.set_ready(false);
        tracing::info!("shutting down: no new jobs; draining in-flight jobs");
        // The whole shutdown is bounded, whatever the broker does: the drain (and the loops that
        // stop taking work) by `shutdown_timeout`, then releases, the last acks and the close
        // by FINAL_GRACE (+ at most a second for the close). A broker that stopped answering
        // cannot hold a deploy up; what was not settled in time comes back after its lease
        // (at-least-once), and the log says so.
        let deadline = self.config.worker.shutdown_timeout;
        let now = tokio::time::Instant::now();
        let drain_until = now + deadline;
        // The loops that take work end within a receive's wait (each backend bounds its calls);
        // one that does not (a broker that stopped answering) is stopped, past the deadline or
        // a receive's wait and 2 s, whichever is later.
        let loops_until = drain_until.max(now + self.config.worker.poll_wait + STOP_LOOPS);
        for t in schedule_tasks {
            join_by(loops_until, t, "a schedule or the outbox relay").await;
        }
        for f in started.fetchers {
            join_by(loops_until, f, "a queue's receive loop").await;
        }
        // Nothing more is received: a broker that pushes ahead stops now, before the last
        // jobs' acks free its credit. In a task of its own, so a silent broker does not eat
        // the drain; it is stopped with the other tasks at the end.
        let unsubscribe = {
            let broker = self.broker.clone();
            tokio::spawn(async move {
                if let Err(e) = broker.unsubscribe(&polled).await {
                    tracing::debug!(error = %e, "could not stop the broker's pushes at shutdown");
                }
            })
        };
        let all = u32::try_from(self.config.worker.concurrency).unwrap_or(u32::MAX);
        let drained =
            match tokio::time::timeout_at(drain_until, started.global.acquire_many(all)).await {
                Ok(_) => true,
                // Past the deadline already (the loops took it): drained if nothing runs.
                Err(_) => started.global.try_acquire_many(all).is_ok(),
            };
        let final_until = tokio::time::Instant::now() + FINAL_GRACE;
        if !drained {
            tracing::warn!(deadline = ?deadline, "shutdown deadline passed: releasing unfinished jobs");
            started.hard_tx.send_replace(true);
            // The releases get 3 of the 5 s: the last acks keep at least 2.
            let release_until = final_until - Duration::from_secs(2);
            if tokio::time::timeout_at(release_until, started.global.acquire_many(all))
                .await
                .is_err()
            {
                tracing::error!(within = ?FINAL_GRACE, "some jobs were not released in time; they return after their lease");
            }
        }
        let mut acker = started.acker;
        if tokio::time::timeout_at(final_until, &mut acker)
            .await
            .is_err()
        {
            acker.abort();
            tracing::error!(within = ?FINAL_GRACE, "acks did not flush in time (is the broker answering?); those jobs run again after their lease");
        }
        if let Some(p) = started.promoter {
            join_by(final_until, p, "the delay promoter").await;
        }
        join_by(final_until, sampler, "the autoscale sampler").await;
        join_by(final_until, unsubscribe, "stopping the broker's pushes").await;
        if let Some(h) = http_task {
            join_by(final_until, h, "the HTTP server").await;
        }
        // The close gets what is left of the grace, and at least a second.
        let close_until = final_until.max(tokio::time::Instant::now() + Duration::from_secs(1));
        match tokio::time::timeout_at(close_until, self.broker.close()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "closing the broker failed"),
            Err(_) => tracing::warn!(
                "closing the broker did not finish in time; its connections are dropped"
            ),
        }
        tracing::info!(drained, "worker stopped");
        Ok(RunReport { drained })
    }

    async fn start_http(
        &self,
        soft: tokio::sync::watch::Receiver<bool>,
    ) -> Result<Option<tokio::task::JoinHandle<()>>, BrokerError> {
        if !self.config.http.enabled {
            return Ok(None);
        }
        let bind = self.config.http.bind;
        let listener = tokio::net::TcpListener::bind(bind).await.map_err(|e| {
            let file = self.config.source.as_deref().unwrap_or("the config");
            BrokerError::permanent(format!(
                "cannot serve the HTTP endpoints (metrics, health, scale) on {bind}: {e}. \
                 Set http.bind in {file} (or STEVEDORE_HTTP__BIND) to a free address \
                 (\"127.0.0.1:0\" takes any free port and logs it), or http.enabled = false"
            ))
        })?;
        let ui = self.config.http.ui.then(|| {
            crate::ui::Ui::new(crate::ui::UiParts {
                broker: self.broker.clone(),
                config: self.config.clone(),
                jobs: self
                    .routes
                    .names()
                    .into_iter()
                    .map(str::to_string)
                    .collect(),
                stats: self.stats.clone(),
                hints: self.hints.clone(),
                worker_id: self.worker_id.to_string(),
                notices: self.notices.clone(),
                runs_jobs: true,
                store: self.store.clone(),
            })
        });
        let shown = listener.local_addr().unwrap_or(bind);
        if ui.is_some() {
            tracing::info!(%bind, "HTTP endpoint: /metrics /healthz /readyz /scale /stats; dashboard at http://{shown}/ui");
        } else {
            tracing::info!(%bind, "HTTP endpoint: /metrics /healthz /readyz /scale /stats");
        }
        let state = HttpState {
            stats: self.stats.clone(),
            hints: self.hints.clone(),
            prometheus: crate::stats::install_prometheus().ok(),
            worker_id: self.worker_id.to_string(),
            ui,
            store: self.store.clone(),
        };
        Ok(Some(tokio::spawn(async move {
            if let Err(e) = http::serve(listener, state, soft).await {
                tracing::error!(error = %e, "HTTP endpoint stopped");
            }
        })))
    }
}

/// What a shutdown allows, past the drain deadline, for releasing cut-off jobs (3 s of it), the
/// last acks and the remaining tasks; the broker's close then gets what is left, and at least a
/// second: at most 6 s in all.
const FINAL_GRACE: Duration = Duration::from_secs(5);

/// How long past a receive's wait a loop that takes work may take to stop at shutdown.
const STOP_LOOPS: Duration = Duration::from_secs(2);

/// Waits for `task` until `until`; aborts it if it is not done by then (a task stuck on a
/// broker that does not answer), says so, and waits for the abort to land (so what the task
/// held, such as concurrency permits, is given back before the caller goes on).
async fn join_by(until: tokio::time::Instant, mut task: tokio::task::JoinHandle<()>, what: &str) {
    if tokio::time::timeout_at(until, &mut task).await.is_err() {
        task.abort();
        let _ = task.await;
        tracing::warn!(
            what,
            "did not stop in time at shutdown (is the broker answering?): stopped"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config, JobContext, Json, State};
    use std::sync::Mutex;
    use std::time::Duration;
    use stevedore_core::MemoryBroker;

    fn cfg() -> Config {
        config::from_toml_str(
            "[http]\nenabled = false\n[worker]\npoll_wait = \"50ms\"\n[queues.default]\nconcurrency = 2\n",
            None,
        )
        .expect("config")
    }

    async fn noop() {}
    async fn other() {}

    #[test]
    fn registering_a_job_name_twice_is_refused() {
        let router = Router::new()
            .route("a", noop)
            .route("b", noop)
            .route("a", other);
        assert_eq!(router.duplicates(), ["a".to_string()]);
        let err = Worker::new(Arc::new(MemoryBroker::new()), router, cfg())
            .err()
            .expect("a duplicate job name is an error");
        assert!(
            err.to_string().contains("job \"a\" is registered twice"),
            "{err}"
        );
        let fine = Router::new().route("a", noop).route("b", noop);
        assert!(fine.duplicates().is_empty());
        assert!(Worker::new(Arc::new(MemoryBroker::new()), fine, cfg()).is_ok());
    }

    type Seen = Arc<Mutex<Vec<String>>>;

    /// The first job enqueues a follow-up through its `Client` extractor; the follow-up runs.
    async fn first(
        State(seen): State<Seen>,
        client: Client,
        Json(n): Json<u32>,
    ) -> Result<(), crate::JobError> {
        seen.lock()
            .map_err(|_| crate::JobError::retry("poisoned"))?
            .push(format!("first {n}"));
        client
            .enqueue("second", &(n + 1))
            .send()
            .await
            .map_err(crate::JobError::retry)?;
        Ok(())
    }

    async fn second(State(seen): State<Seen>, Json(n): Json<u32>) -> Result<(), crate::JobError> {
        seen.lock()
            .map_err(|_| crate::JobError::retry("poisoned"))?
            .push(format!("second {n}"));
        Ok(())
    }

    /// Sixteen extractors: the most a handler takes.
    #[allow(clippy::too_many_arguments)]
    async fn wide(
        _: JobContext,
        _: crate::Payload,
        _: Client,
        _: State<Seen>,
        _: JobContext,
        _: crate::Payload,
        _: Client,
        _: State<Seen>,
        _: JobContext,
        _: crate::Payload,
        _: Client,
        _: State<Seen>,
        _: JobContext,
        _: crate::Payload,
        _: Client,
        State(seen): State<Seen>,
    ) {
        if let Ok(mut s) = seen.lock() {
            s.push("wide".into());
        }
    }

    /// Runs `worker` until its handlers have noted `n` entries in `seen` (10 s at most), then
    /// stops it cleanly.
    async fn run_until_seen(
        worker: Worker,
        seen: &Seen,
        n: usize,
    ) -> Result<(), Box<dyn std::error::Error>> {
        let stop = worker.shutdown_handle();
        let run = tokio::spawn(worker.run());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while seen.lock().map(|s| s.len()).unwrap_or(0) < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{n} jobs never ran: {seen:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop.shutdown();
        run.await??;
        Ok(())
    }

    /// Computes for 20 ms without awaiting anything, and notes the thread it ran on.
    async fn busy(State(seen): State<Seen>) {
        std::thread::sleep(Duration::from_millis(20));
        if let Ok(mut s) = seen.lock() {
            s.push(format!("{:?}", std::thread::current().id()));
        }
    }

    /// Jobs that finish on their first poll but compute for a while still run on every thread of
    /// the runtime, not one after the other in the task that started their batch.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn jobs_that_compute_spread_over_the_runtime_threads(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let seen: Seen = Arc::default();
        let config = config::from_toml_str(
            "[http]\nenabled = false\n[worker]\npoll_wait = \"50ms\"\n[queues.default]\nconcurrency = 8\nbatch = 8\n",
            None,
        )?;
        let router = Router::with_state(seen.clone()).route("busy", busy);
        let worker = Worker::new(Arc::new(MemoryBroker::new()), router, config)?;
        let client = worker.client();
        for _ in 0..8 {
            client.enqueue("busy", &()).send().await?;
        }
        run_until_seen(worker, &seen, 8).await?;
        let threads: std::collections::HashSet<String> = seen
            .lock()
            .map_err(|_| "poisoned")?
            .iter()
            .cloned()
            .collect();
        assert_eq!(threads.len(), 2, "the 8 jobs ran on {threads:?}");
        Ok(())
    }

    #[test]
    fn handlers_take_up_to_sixteen_extractors() {
        let router = Router::with_state(Seen::default()).route("wide", wide);
        assert!(router.duplicates().is_empty());
    }

    /// A memory broker whose delayed publishes fail (RabbitMQ with its delay queues' node down,
    /// its work queues up).
    #[derive(Debug)]
    struct DelayDown(MemoryBroker);

    #[async_trait::async_trait]
    impl Broker for DelayDown {
        fn name(&self) -> &'static str {
            "delay-down"
        }
        fn capabilities(&self) -> &stevedore_core::Capabilities {
            self.0.capabilities()
        }
        async fn publish(
            &self,
            q: &str,
            m: Vec<stevedore_core::Envelope>,
        ) -> Result<(), BrokerError> {
            let now = std::time::SystemTime::now();
            if m.iter().any(|e| e.delay_remaining(now).is_some()) {
                return Err(BrokerError::transient("the delay queues are unreachable"));
            }
            self.0.publish(q, m).await
        }
        async fn receive(
            &self,
            q: &str,
            o: stevedore_core::ReceiveOptions,
        ) -> Result<Vec<stevedore_core::Delivery>, BrokerError> {
            self.0.receive(q, o).await
        }
        async fn ack(&self, r: &[stevedore_core::Receipt]) -> Result<(), BrokerError> {
            self.0.ack(r).await
        }
        async fn release(&self, r: &[stevedore_core::Receipt]) -> Result<(), BrokerError> {
            self.0.release(r).await
        }
        async fn extend_lease(
            &self,
            r: &stevedore_core::Receipt,
            l: Duration,
        ) -> Result<(), BrokerError> {
            self.0.extend_lease(r, l).await
        }
        async fn depth(&self, q: &str) -> Result<stevedore_core::Depth, BrokerError> {
            self.0.depth(q).await
        }
    }

    /// When each run of [`always_fails`] began.
    static FAILED_RUNS: Mutex<Vec<std::time::Instant>> = Mutex::new(Vec::new());

    async fn always_fails(State(seen): State<Seen>) -> Result<(), crate::JobError> {
        if let Ok(mut r) = FAILED_RUNS.lock() {
            r.push(std::time::Instant::now());
        }
        if let Ok(mut s) = seen.lock() {
            s.push("run".into());
        }
        Err(crate::JobError::retry("fails"))
    }

    /// A retry that cannot be scheduled (delayed publishes fail, the queue works) is held for
    /// its backoff before the job is released: it runs again no sooner than that, not at once,
    /// so an outage of the delay queues does not burn through its attempts.
    #[tokio::test]
    async fn a_retry_that_cannot_be_scheduled_still_waits_its_backoff(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let seen: Seen = Arc::default();
        let config = config::from_toml_str(
            "[http]\nenabled = false\n[worker]\npoll_wait = \"50ms\"\n[retry]\nmax_attempts = 3\n\
             base = \"300ms\"\ncap = \"300ms\"\n[queues.default]\nconcurrency = 2\n",
            None,
        )?;
        let router = Router::with_state(seen.clone()).route("fails", always_fails);
        let memory = MemoryBroker::new();
        let worker = Worker::new(Arc::new(DelayDown(memory.clone())), router, config)?;
        worker.client().enqueue("fails", &()).send().await?;
        run_until_seen(worker, &seen, 3).await?;
        let runs = FAILED_RUNS.lock().map_err(|_| "poisoned")?.clone();
        assert_eq!(runs.len(), 3, "three attempts ran");
        for pair in runs.windows(2) {
            let gap = pair[1] - pair[0];
            assert!(
                gap >= Duration::from_millis(290),
                "attempts {gap:?} apart: the backoff (300 ms) was skipped"
            );
        }
        Ok(())
    }

    #[tokio::test]
    async fn a_handler_enqueues_a_follow_up_job() -> Result<(), Box<dyn std::error::Error>> {
        let seen: Seen = Arc::default();
        let router = Router::with_state(seen.clone())
            .route("first", first)
            .route("second", second);
        let worker = Worker::new(Arc::new(MemoryBroker::new()), router, cfg())?;
        worker.client().enqueue("first", &1u32).send().await?;
        run_until_seen(worker, &seen, 2).await?;
        assert_eq!(
            *seen.lock().map_err(|_| "poisoned")?,
            ["first 1", "second 2"]
        );
        Ok(())
    }
}

#[cfg(test)]
mod limit_tests {
    use super::*;
    use crate::{config, JobContext, State};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;
    use stevedore_core::store::MemoryStore;
    use stevedore_core::MemoryBroker;

    /// A store that fails every call while `down` is set.
    #[derive(Debug)]
    struct Flaky {
        inner: MemoryStore,
        down: Arc<AtomicBool>,
    }

    #[async_trait::async_trait]
    impl Store for Flaky {
        fn name(&self) -> &'static str {
            "flaky"
        }
        fn shared_across_machines(&self) -> bool {
            true
        }
        async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, BrokerError> {
            if self.down.load(Ordering::Relaxed) {
                return Err(BrokerError::Connection("store down".into()));
            }
            self.inner.get(key).await
        }
        async fn swap(
            &self,
            key: &str,
            expected: Option<&[u8]>,
            new: Option<&[u8]>,
            ttl: Option<Duration>,
        ) -> Result<bool, BrokerError> {
            if self.down.load(Ordering::Relaxed) {
                return Err(BrokerError::Connection("store down".into()));
            }
            self.inner.swap(key, expected, new, ttl).await
        }
    }

    async fn note(State(seen): State<Arc<Mutex<Vec<u32>>>>, ctx: JobContext) {
        if let Ok(mut s) = seen.lock() {
            s.push(ctx.attempt);
        }
    }

    /// Runs one job `j` (handler `note`) on a worker configured by `toml` while the state store
    /// is down for at least 3 put-offs, then brings the store back and lets the job run; returns
    /// the attempts the handler saw, the queue's counters and the broker.
    async fn through_a_store_outage(
        toml: &str,
    ) -> (Vec<u32>, crate::stats::QueueSnapshot, MemoryBroker) {
        let cfg = config::from_toml_str(toml, None).expect("config");
        let broker = MemoryBroker::new();
        let down = Arc::new(AtomicBool::new(true));
        let store = Arc::new(Flaky {
            inner: MemoryStore::new(),
            down: down.clone(),
        });
        let seen: Arc<Mutex<Vec<u32>>> = Arc::default();
        let router = crate::Router::with_state(seen.clone()).route("j", note);
        let worker = Worker::new(Arc::new(broker.clone()), router, cfg)
            .expect("worker")
            .with_store(store);
        let stats = worker.stats();
        let stop = worker.shutdown_handle();
        worker
            .client()
            .enqueue("j", &1)
            .send()
            .await
            .expect("enqueue");
        let run = tokio::spawn(worker.run());
        // Four put-offs at least (1 s each would be too slow: count them as they come).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while stats.snapshot().get("default").map_or(0, |q| q.deferred) < 3 {
            assert!(tokio::time::Instant::now() < deadline, "no put-offs");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            seen.lock().expect("seen").is_empty(),
            "nothing ran while the store was down"
        );
        down.store(false, Ordering::Relaxed);
        while seen.lock().map(|s| s.is_empty()).unwrap_or(true) {
            assert!(tokio::time::Instant::now() < deadline, "never ran");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.shutdown();
        run.await.expect("task").expect("run");
        let seen = seen.lock().expect("seen").clone();
        (seen, stats.snapshot()["default"].clone(), broker)
    }

    /// While the state store is down a limited job cannot be admitted: it is put off again and
    /// again (never released, which would count deliveries), so when the store is back it runs,
    /// at attempt 1, and nothing is dead-lettered, though the outage outlasted max_attempts.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_store_outage_costs_a_limited_job_no_attempt() {
        let (seen, q, broker) = through_a_store_outage(
            "[http]\nenabled = false\n[worker]\npoll_wait = \"50ms\"\n\
             [retry]\nmax_attempts = 2\n[queues.default]\nmax_concurrent = 1\n",
        )
        .await;
        assert_eq!(seen, vec![1]);
        assert_eq!((q.processed, q.dead_lettered), (1, 0));
        assert!(
            crate::dlq::list(&(Arc::new(broker) as Arc<dyn Broker>), "default", 10)
                .await
                .expect("dlq")
                .is_empty()
        );
    }

    /// A worker on a fresh memory broker and memory store, HTTP off, polling every 50 ms,
    /// with the rest of its config from `toml`.
    fn test_worker(
        toml: &str,
        router: crate::Router<Arc<Mutex<Vec<u32>>>>,
    ) -> (Worker, MemoryBroker, Arc<MemoryStore>) {
        let cfg = config::from_toml_str(
            &format!("[http]\nenabled = false\n[worker]\npoll_wait = \"50ms\"\n{toml}"),
            None,
        )
        .expect("config");
        let broker = MemoryBroker::new();
        let store = Arc::new(MemoryStore::new());
        let worker = Worker::new(Arc::new(broker.clone()), router, cfg)
            .expect("worker")
            .with_store(store.clone());
        (worker, broker, store)
    }

    async fn slow_note(State(seen): State<Arc<Mutex<Vec<u32>>>>, ctx: JobContext) {
        if let Ok(mut s) = seen.lock() {
            s.push(ctx.attempt);
        }
        tokio::time::sleep(Duration::from_millis(2500)).await;
    }

    /// An idempotent job whose inbox cannot be checked (store down) is put off, not released
    /// and not run unchecked: when the store is back it runs once, at attempt 1.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_store_outage_puts_off_an_idempotent_job_without_an_attempt() {
        let (seen, q, _) = through_a_store_outage(
            "[http]\nenabled = false\n[worker]\npoll_wait = \"50ms\"\n\
             [retry]\nmax_attempts = 2\n[queues.default]\nidempotent = true\n",
        )
        .await;
        assert_eq!(seen, vec![1]);
        assert_eq!((q.processed, q.dead_lettered, q.duplicates), (1, 0, 0));
    }

    /// A running idempotent job's claim is renewed while it runs past its lease (1 s, the job
    /// takes 2.5 s): a copy of it delivered meanwhile never runs beside it, and once the job
    /// succeeded the copy is acked as a duplicate.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_copy_of_a_long_idempotent_job_waits_and_is_skipped() {
        let seen: Arc<Mutex<Vec<u32>>> = Arc::default();
        let (worker, _, store) = test_worker(
            "[queues.default]\nidempotent = \"1h\"\nlease = \"1s\"\n",
            crate::Router::with_state(seen.clone()).route("j", slow_note),
        );
        let stats = worker.stats();
        let stop = worker.shutdown_handle();
        let client = worker.client();
        let env = stevedore_core::Envelope::new("j", "1").json();
        let id = env.id.clone();
        client
            .publish("default", vec![env.clone()])
            .await
            .expect("publish");
        let run = tokio::spawn(worker.run());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        while seen.lock().map(|s| s.is_empty()).unwrap_or(true) {
            assert!(tokio::time::Instant::now() < deadline, "never ran");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Past the 1 s lease of the claim: only its renewal keeps the copy out.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        client
            .publish("default", vec![env])
            .await
            .expect("publish a copy");
        while stats.snapshot().get("default").map_or(0, |q| q.duplicates) < 1 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the copy was not skipped"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.shutdown();
        run.await.expect("task").expect("run");
        assert_eq!(*seen.lock().expect("seen"), vec![1], "ran once");
        assert_eq!(
            store
                .get(&crate::effects::inbox_key("j", &id))
                .await
                .expect("get")
                .as_deref(),
            Some(crate::effects::DONE)
        );
    }

    /// A job that succeeded at its last attempt and whose ack was lost comes back past its last
    /// attempt: its inbox says done, so it is acked as a duplicate, not dead-lettered as a crash
    /// loop, and its status stays `succeeded`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lost_ack_on_the_last_attempt_is_a_duplicate_not_a_crash_loop() {
        let seen: Arc<Mutex<Vec<u32>>> = Arc::default();
        let (worker, broker, store) = test_worker(
            "[retry]\nmax_attempts = 1\n[queues.default]\nidempotent = true\ntrack_status = true\n",
            crate::Router::with_state(seen.clone()).route("j", note),
        );
        let stats = worker.stats();
        let stop = worker.shutdown_handle();
        let client = worker.client();
        // What the first delivery left: done, succeeded; the redelivery counts attempt 2.
        let mut env = stevedore_core::Envelope::new("j", "1").json();
        env.attempt = 2;
        let id = env.id.clone();
        store
            .set(
                &crate::effects::inbox_key("j", &id),
                Some(crate::effects::DONE),
                None,
            )
            .await
            .expect("mark");
        let mut done =
            crate::JobStatus::enqueued(&id, "default", "j", std::time::SystemTime::now(), None);
        done.state = crate::JobState::Succeeded;
        done.attempt = 1;
        crate::status::write(store.as_ref(), &done, Duration::from_secs(60)).await;
        client.publish("default", vec![env]).await.expect("publish");
        let run = tokio::spawn(worker.run());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while stats.snapshot().get("default").map_or(0, |q| q.duplicates) < 1 {
            assert!(tokio::time::Instant::now() < deadline, "not skipped");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.shutdown();
        run.await.expect("task").expect("run");
        assert!(seen.lock().expect("seen").is_empty(), "not run again");
        let q = stats.snapshot()["default"].clone();
        assert_eq!(q.dead_lettered, 0);
        assert!(
            crate::dlq::list(&(Arc::new(broker) as Arc<dyn Broker>), "default", 10)
                .await
                .expect("dlq")
                .is_empty()
        );
        let status = client.status(&id).await.expect("status").expect("kept");
        assert_eq!(status.state, crate::JobState::Succeeded);
    }
}
