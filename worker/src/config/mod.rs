//! The whole configuration of a worker.
//!
//! Layers, each overriding the one before: built-in defaults (every field has one, so an empty
//! file is valid) ← the TOML file ← the selected `[profile.<name>]` section of that same file ←
//! `STEVEDORE_*` environment variables (`STEVEDORE_WORKER__CONCURRENCY=8` sets
//! `worker.concurrency`; `__` separates levels). Unknown keys are errors, durations are human
//! (`"30s"`, `"10m"`), and [`Config::validate`] checks the result against the chosen backend's
//! [`Capabilities`](stevedore_core::Capabilities) before anything connects. Every error names the
//! file and key it is about and what is allowed.
//!
//! ```
//! use stevedore::config::{self, PriorityMode};
//! use stevedore::{Broker, MemoryBroker, Priority};
//!
//! let config = config::from_toml_str(
//!     r#"
//!     [worker]
//!     concurrency = 32
//!
//!     [queues.emails]
//!     weights = { high = 4, normal = 2, low = 1 }
//!     reserved = { high = 2 }
//!
//!     [profile.production.worker]
//!     concurrency = 200
//!     "#,
//!     Some("production"),
//! )?;
//! assert_eq!(config.queues["emails"].mode, PriorityMode::Weighted);
//! assert_eq!(config.levels("emails"), [Priority::High, Priority::Normal, Priority::Low]);
//! assert_eq!(config.worker.concurrency, 200);
//! let broker = MemoryBroker::new();
//! let notices = config.validate(broker.capabilities())?; // log these at start-up
//! # let _ = notices;
//! # Ok::<(), config::ConfigError>(())
//! ```

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;
use stevedore_core::Priority;

mod load;
mod redact;
#[cfg(test)]
mod tests;
mod validate;

pub use load::{from_toml_str, load};
pub use redact::redact_url;

/// Prefix of environment variables that override config keys (`STEVEDORE_WORKER__CONCURRENCY`).
/// Only variables with `__` after the prefix are config keys, so `STEVEDORE_PROFILE`,
/// `STEVEDORE_CONFIG` and other single-word variables never are.
pub const ENV_PREFIX: &str = "STEVEDORE_";
/// Environment variable naming the profile when none is given explicitly.
pub const ENV_PROFILE: &str = "STEVEDORE_PROFILE";
/// Environment variable naming the config file when none is given explicitly.
pub const ENV_CONFIG: &str = "STEVEDORE_CONFIG";
/// Top-level tables of [`Config`], in declaration order.
pub(crate) const SECTIONS: [&str; 9] = [
    "broker",
    "store",
    "worker",
    "http",
    "retry",
    "autoscale",
    "queues",
    "jobs",
    "schedules",
];
/// The queue served when the config defines none.
pub const DEFAULT_QUEUE: &str = "default";

/// A worker's whole configuration. See the [module docs](self) for how it is loaded.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Which broker to use and how to reach it (`[broker]`).
    pub broker: BrokerConfig,
    /// Where the shared state of periodic jobs lives (`[store]`); the broker's own by default.
    pub store: StoreConfig,
    /// Process-wide settings (`[worker]`).
    pub worker: WorkerConfig,
    /// Metrics, health and scale endpoints (`[http]`).
    pub http: HttpConfig,
    /// Default retry policy (`[retry]`), overridden per queue and per job.
    pub retry: RetryConfig,
    /// Autoscaling hints (`[autoscale]`).
    pub autoscale: AutoscaleConfig,
    /// Logical queues to serve, by name (`[queues.<name>]`). Empty means one queue named
    /// [`DEFAULT_QUEUE`] with default settings; see [`Config::effective_queues`].
    pub queues: BTreeMap<String, QueueConfig>,
    /// Per-job-name overrides (`[jobs.<name>]`).
    pub jobs: BTreeMap<String, JobConfig>,
    /// Periodic jobs, by name (`[schedules.<name>]`).
    pub schedules: BTreeMap<String, ScheduleConfig>,
    /// The transactional outbox this worker relays (`[outbox]`); none by default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outbox: Option<OutboxConfig>,
    /// The file this config was read from, if any (set by [`load`], never read from TOML).
    #[serde(skip)]
    pub source: Option<String>,
    /// The profile applied, if any (set by [`load`], never read from TOML).
    #[serde(skip)]
    pub profile: Option<String>,
    /// Keys whose value came from the selected profile or the environment, mapped to where the
    /// user wrote them (`profile.production.worker.concurrency`, `STEVEDORE_WORKER__CONCURRENCY`).
    /// Keys from the file's top level or the defaults are absent. Set by [`load`]; errors and
    /// [`Config::redacted`] use it to point at the right place.
    #[serde(skip)]
    pub origins: BTreeMap<String, String>,
}

/// `[broker]`: which backend, and its own settings.
///
/// `kind` picks a backend registered in [`crate::backend::Backends`]; every other key belongs to
/// that backend and is checked by it (see each backend crate's factory for its keys: `url`,
/// `key_prefix`, `max_payload`, ...). A key only another backend takes is ignored with a
/// start-up notice, so profiles can switch kinds; any other unknown key is an error.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct BrokerConfig {
    /// The backend ([`DEFAULT_KIND`], `"sqlite"`, by default).
    pub kind: String,
    /// The backend's settings: the rest of the `[broker]` table. Values may hold passwords (a
    /// URL's): they are redacted whenever the config is shown; prefer `STEVEDORE_BROKER__URL`
    /// for secrets.
    #[serde(flatten)]
    pub settings: BTreeMap<String, serde_json::Value>,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            kind: DEFAULT_KIND.to_string(),
            settings: BTreeMap::new(),
        }
    }
}

/// The broker kind when the config names none: the embedded SQLite store (`stevedore.db` in the
/// working directory), durable and shared by every process that opens it. `"memory"` keeps jobs
/// inside one process (tests).
pub const DEFAULT_KIND: &str = "sqlite";

/// `[store]`: the shared state behind periodic jobs (each schedule's last tick, so that one
/// enqueue happens per tick across any number of workers).
///
/// `kind` picks a store registered in [`crate::backend::Backends`]: `redis` (keys `url`,
/// `key_prefix`), `sqlite` (`path`; shared by the processes of one machine), `postgres` (`url`,
/// `table`; with the `postgres` feature), `memory` (one process). Unset: the broker's own store
/// where the broker can hold one (Redis, SQLite, memory); RabbitMQ, SQS and Kafka cannot, so a
/// config with schedules on them must name a store, and `config check` says so.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct StoreConfig {
    /// The store kind; `None`: the broker's own.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// The store's settings: the rest of the `[store]` table (redacted when shown; prefer
    /// `STEVEDORE_STORE__URL` for a password).
    #[serde(flatten)]
    pub settings: BTreeMap<String, serde_json::Value>,
}

/// `[outbox]`: the transactional outbox in your PostgreSQL database. Jobs enqueued with
/// `Enqueue::within(&mut tx)` are rows of its table, written in your transaction; a relay
/// publishes them to the broker after the transaction commits (and never if it rolls back).
/// Every `stevedore run` with this section relays (`relay = false` turns that off), and
/// `stevedore relay` relays without running jobs. Needs the `postgres` feature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutboxConfig {
    /// `postgres://user[:password]@host[:port]/database`: the database your transactions
    /// write to (prefer `STEVEDORE_OUTBOX__URL` for a password).
    pub url: String,
    /// The table, created when missing (default `stevedore_outbox`; optionally `schema.table`).
    pub table: String,
    /// Most rows published per round.
    pub batch: usize,
    /// How often the relay looks when no commit woke it (it also listens for commits).
    #[serde(with = "humantime_serde")]
    pub poll: Duration,
    /// Whether `stevedore run` relays beside its jobs.
    pub relay: bool,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        OutboxConfig {
            url: String::new(),
            table: "stevedore_outbox".into(),
            batch: 100,
            poll: Duration::from_secs(1),
            relay: true,
        }
    }
}

/// What a schedule does with ticks that passed while no worker ran (`catch_up`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CatchUp {
    /// Ticks missed by more than a minute are dropped (each drop is logged); the schedule goes
    /// on with its next tick. Ticks late by less (a rolling deploy, a slow round) still run,
    /// each once, oldest first.
    #[default]
    Skip,
    /// However many ticks were missed (by more than a minute), the latest of them runs once when
    /// a worker is back; never one enqueue per missed tick.
    Once,
}

/// `[schedules.<name>]`: a periodic job. Exactly one of `cron` and `every`.
///
/// One enqueue per tick across every worker serving the config: each tick is claimed in the
/// state store (`[store]`) before it is published, with the job id derived from the schedule's
/// name and the tick (so the same tick is always the same id, and a duplicate after a crash
/// between claim and publish is recognizable). A claim lapses 10 s after its last renewal,
/// compared with the workers' clocks: they should agree to well within that.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScheduleConfig {
    /// The job to enqueue (a handler must be registered for it).
    pub job: String,
    /// The logical queue it goes to (default `default`); it must be a queue of this config.
    pub queue: String,
    /// The job's JSON payload (default `{}`).
    pub payload: serde_json::Value,
    /// A cron pattern: 5 fields (minute precision), or 6 with seconds first
    /// (`"*/10 * * * * *"`), names (`MON`, `JAN`), `L`, `#` and the `@daily`-style aliases.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cron: Option<String>,
    /// A fixed period instead of `cron` (`"30s"`, `"1h"`): ticks at the multiples of it since
    /// the Unix epoch, so `"1h"` ticks on the hour (UTC).
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub every: Option<Duration>,
    /// The IANA time zone `cron` is read in (`"Europe/Berlin"`; default `"UTC"`). Across a
    /// daylight-saving change a skipped local time does not run that day and a repeated one runs
    /// once.
    pub timezone: String,
    /// Each tick's job waits a random time up to this before it runs (durably, on the broker),
    /// so many schedules on one tick do not start together. Default 0.
    #[serde(with = "humantime_serde")]
    pub jitter: Duration,
    /// Priority of the enqueued job.
    pub priority: Priority,
    /// Ticks missed while no worker ran: `"skip"` (default) or `"once"`.
    pub catch_up: CatchUp,
    /// `false` turns the schedule off (in a profile, say) without deleting it.
    pub enabled: bool,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        ScheduleConfig {
            job: String::new(),
            queue: DEFAULT_QUEUE.to_string(),
            payload: serde_json::Value::Object(serde_json::Map::new()),
            cron: None,
            every: None,
            timezone: "UTC".to_string(),
            jitter: Duration::ZERO,
            priority: Priority::Normal,
            catch_up: CatchUp::Skip,
            enabled: true,
        }
    }
}

/// `[worker]`: process-wide settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    /// Worker id in logs, metrics and dead-letter headers; `None` means `hostname-pid` (see
    /// [`WorkerConfig::worker_id`]).
    pub id: Option<String>,
    /// Most jobs in flight in this process, across all queues.
    pub concurrency: usize,
    /// How long graceful shutdown waits for in-flight jobs before releasing them (uncounted).
    /// Releases, the last acks and closing the broker take at most 6 s more, even when the
    /// broker does not answer (and the receive loops stop within this or `poll_wait` + 2 s,
    /// whichever is longer).
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Longest idle wait on a queue in one receive call.
    #[serde(with = "humantime_serde")]
    pub poll_wait: Duration,
    /// How often due delayed messages are promoted (for backends with a delay store).
    #[serde(with = "humantime_serde")]
    pub promote_interval: Duration,
    /// How long `run` keeps trying to reach a broker that does not answer yet at start-up (a
    /// worker started before its broker, as compose and Kubernetes do), logging each attempt,
    /// before it exits with code 1. `"0s"`: one attempt. A broker that refuses the settings
    /// (a bad URL, say) fails at once with code 2.
    #[serde(with = "humantime_serde")]
    pub startup_timeout: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            id: None,
            concurrency: 64,
            shutdown_timeout: Duration::from_secs(30),
            poll_wait: Duration::from_secs(1),
            promote_interval: Duration::from_millis(250),
            startup_timeout: Duration::from_secs(60),
        }
    }
}

impl WorkerConfig {
    /// The configured id, or `hostname-pid` when none is set.
    pub fn worker_id(&self) -> String {
        if let Some(id) = self.id.as_deref().filter(|id| !id.is_empty()) {
            return id.to_string();
        }
        let host = hostname::get()
            .ok()
            .and_then(|h| h.into_string().ok())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".to_string());
        format!("{host}-{}", std::process::id())
    }
}

/// `[http]`: the metrics, health and scale-hint endpoints, and the web dashboard under `/ui`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Whether to serve them.
    pub enabled: bool,
    /// Address to listen on (`"127.0.0.1:9464"`; use `"0.0.0.0:9464"` in a container).
    pub bind: SocketAddr,
    /// Whether to serve the web dashboard under `/ui` (default `true`).
    pub ui: bool,
    /// Dashboard without actions: no replay, purge or enqueue (the forms are not shown, and their
    /// endpoints answer 403).
    pub read_only: bool,
    /// When set, the dashboard's actions need this token (entered once on its sign-in page, then
    /// kept in a same-site cookie); viewing stays open. Set it from the environment
    /// (`STEVEDORE_HTTP__TOKEN`) rather than in a file. Never shown by `config check`.
    pub token: Option<String>,
    /// Host names the dashboard answers to besides IP addresses and `localhost` (e.g. the name
    /// a reverse proxy forwards); `"*"` allows any. A request for another name is refused, so a
    /// page elsewhere cannot reach the dashboard through a name pointed at this address.
    pub allowed_hosts: Vec<String>,
}

impl std::fmt::Debug for HttpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpConfig")
            .field("enabled", &self.enabled)
            .field("bind", &self.bind)
            .field("ui", &self.ui)
            .field("read_only", &self.read_only)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("allowed_hosts", &self.allowed_hosts)
            .finish()
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            enabled: true,
            bind: SocketAddr::from((Ipv4Addr::LOCALHOST, 9464)),
            ui: true,
            read_only: false,
            token: None,
            allowed_hosts: Vec::new(),
        }
    }
}

/// `[retry]`: exponential backoff with full jitter. After failed attempt `n` (from 1) the retry waits
/// a random time drawn from `[base, min(cap, base * factor^(n-1))]`; after `max_attempts` attempts, or once the job is older than
/// `max_age`, it goes to the dead-letter queue.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    /// Attempts in total, the first included (1 = never retry).
    pub max_attempts: u32,
    /// Backoff before the first retry, before jitter.
    #[serde(with = "humantime_serde")]
    pub base: Duration,
    /// Growth of the backoff per attempt.
    pub factor: f64,
    /// Longest backoff.
    #[serde(with = "humantime_serde")]
    pub cap: Duration,
    /// No retry is scheduled once a job was first enqueued this long ago.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// The priority level a retry is sent to (`high`, `normal` or `low`), so that retries do not
    /// wait behind a backlog of new work: each queue it applies to must serve the level (have it
    /// in `weights`), and `reserved` slots on it give retries concurrency of their own. Unset
    /// (the default): a retry goes back to the level it came from. The backoff is honoured either
    /// way; a retry keeps the level it moved to (a replay from the dead letters too).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub level: Option<Priority>,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_attempts: 5,
            base: Duration::from_secs(1),
            factor: 2.0,
            cap: Duration::from_secs(600),
            max_age: Duration::from_secs(7 * 24 * 3600),
            level: None,
        }
    }
}

/// Per-queue or per-job changes to [`RetryConfig`]: each field set here replaces the inherited one.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryOverride {
    /// See [`RetryConfig::max_attempts`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// See [`RetryConfig::base`].
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub base: Option<Duration>,
    /// See [`RetryConfig::factor`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub factor: Option<f64>,
    /// See [`RetryConfig::cap`].
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub cap: Option<Duration>,
    /// See [`RetryConfig::max_age`].
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub max_age: Option<Duration>,
    /// See [`RetryConfig::level`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub level: Option<Priority>,
}

impl RetryOverride {
    /// `base` with every field set here replaced.
    pub fn apply(&self, base: &RetryConfig) -> RetryConfig {
        RetryConfig {
            max_attempts: self.max_attempts.unwrap_or(base.max_attempts),
            base: self.base.unwrap_or(base.base),
            factor: self.factor.unwrap_or(base.factor),
            cap: self.cap.unwrap_or(base.cap),
            max_age: self.max_age.unwrap_or(base.max_age),
            level: self.level.or(base.level),
        }
    }

    /// Whether no field is set.
    pub fn is_empty(&self) -> bool {
        *self == RetryOverride::default()
    }
}

/// `[autoscale]`: how `desired_workers = clamp(ceil((ready + in_flight) / target_per_worker),
/// min_workers, max_workers)` is computed and how often.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AutoscaleConfig {
    /// Ready plus in-flight messages one worker is expected to handle.
    pub target_per_worker: u64,
    /// Lower bound of the hint.
    pub min_workers: u32,
    /// Upper bound of the hint.
    pub max_workers: u32,
    /// How often depths are sampled.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
}

impl Default for AutoscaleConfig {
    fn default() -> Self {
        AutoscaleConfig {
            target_per_worker: 100,
            min_workers: 1,
            max_workers: 10,
            interval: Duration::from_secs(5),
        }
    }
}

/// How a queue's priority levels share its fetching.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PriorityMode {
    /// Levels are fetched in proportion to their weights.
    #[default]
    Weighted,
    /// A level is fetched only when every higher level is empty (lower levels still age). A level
    /// counts as empty only when the broker says so (an empty receive, which every backend
    /// returns only when it holds no ready message for the caller), so strict order holds from
    /// the first fetch after start-up or a reconnect.
    Strict,
}

impl PriorityMode {
    /// The name used in config (`weighted`, `strict`).
    pub fn as_str(self) -> &'static str {
        match self {
            PriorityMode::Weighted => "weighted",
            PriorityMode::Strict => "strict",
        }
    }
}

/// `[queues.<name>]`: one logical queue.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueConfig {
    /// Most jobs of this queue in flight in this process.
    pub concurrency: usize,
    /// Lease taken on each received message; extended in the background while the job runs.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// A job running longer than this fails (and is retried).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Most messages per receive call (kept small so priority stays real).
    pub batch: usize,
    /// How levels share fetching.
    pub mode: PriorityMode,
    /// Weight of each level (`high`, `normal`, `low`). The levels present are the levels served.
    pub weights: BTreeMap<Priority, u32>,
    /// Concurrency slots only a level may use, so long jobs of other levels never take them all.
    pub reserved: BTreeMap<Priority, usize>,
    /// Aging: a level with work that was not served for this long is served next, whatever the mode.
    #[serde(with = "humantime_serde")]
    pub aging: Duration,
    /// Handler for messages without a job name (foreign producers).
    pub default_job: Option<String>,
    /// Retry changes for this queue's jobs.
    pub retry: RetryOverride,
    /// Depth beyond which producers reject or wait (backpressure); `None` = unbounded.
    pub max_depth: Option<u64>,
    /// Most jobs of this queue started per period across all workers (`"50/s"`, `"100/m"`,
    /// `"5/10s"`); see [`Rate`]. Needs a state store.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate: Option<Rate>,
    /// Jobs `rate` lets start at once after a quiet spell (default 1: an even pace).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// Most jobs of this queue running at once across all workers (slots with a lease: a worker
    /// that dies gives its slots back after `lease`). Needs a state store.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_concurrent: Option<u32>,
    /// Idempotent handlers (the inbox): `true` (keep a finished job's mark 24 h), a window
    /// (`"7d"`) or `false`. A delivery of a job id that already succeeded in this queue's job
    /// is acked without running it again; two deliveries of one id never run at once. See
    /// [`Keep`]. Needs a state store.
    #[serde(skip_serializing_if = "Keep::is_unset")]
    pub idempotent: Keep,
    /// Job status (`client.status(id)`, `GET /jobs/{id}`, `stevedore status ID`): `true` (kept
    /// 24 h after the job's last change), a window (`"7d"`) or `false` (the default). Needs a
    /// state store.
    #[serde(skip_serializing_if = "Keep::is_unset")]
    pub track_status: Keep,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            concurrency: 16,
            lease: Duration::from_secs(30),
            timeout: Duration::from_secs(300),
            batch: 16,
            mode: PriorityMode::Weighted,
            weights: BTreeMap::from([(Priority::Normal, 1)]),
            reserved: BTreeMap::new(),
            aging: Duration::from_secs(30),
            default_job: None,
            retry: RetryOverride::default(),
            max_depth: None,
            rate: None,
            burst: None,
            max_concurrent: None,
            idempotent: Keep::Unset,
            track_status: Keep::Unset,
        }
    }
}

impl QueueConfig {
    /// The levels served, highest first.
    pub fn levels(&self) -> Vec<Priority> {
        self.weights.keys().copied().collect()
    }

    /// Slots reserved across all levels.
    pub fn reserved_total(&self) -> usize {
        self.reserved.values().sum()
    }
}

/// `[jobs.<name>]`: overrides for one job name, on whichever queue it runs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JobConfig {
    /// Retry changes for this job (applied after the queue's).
    pub retry: RetryOverride,
    /// Per-job timeout replacing the queue's.
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// Unique jobs: `"10m"` (a second enqueue of the same job with the same payload into the
    /// same queue within 10 minutes enqueues nothing and returns the first job's id) or
    /// `"until_done"` (until the first job succeeds or is dead-lettered, at most 24 h). The
    /// key is the job name and payload unless the producer gives one
    /// ([`Enqueue::dedup_key`](crate::Enqueue::dedup_key)). Needs a state store (`[store]`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unique: Option<Unique>,
    /// Most jobs of this name started per period across all workers and queues (see
    /// [`QueueConfig::rate`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate: Option<Rate>,
    /// See [`QueueConfig::burst`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// Most jobs of this name running at once across all workers and queues.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_concurrent: Option<u32>,
    /// Idempotent handler for this job name, on whichever queue it runs; overrides the
    /// queue's [`QueueConfig::idempotent`] (`false` turns it off for this job).
    #[serde(skip_serializing_if = "Keep::is_unset")]
    pub idempotent: Keep,
}

/// A feature that keeps state for a while: `true` (for [`Keep::DEFAULT`], 24 h), a duration
/// (`"7d"`, `"30m"`) or `false`. Not given is [`Keep::Unset`], which inherits where a
/// setting has a parent (`[jobs]` over `[queues]`) and is off otherwise.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Keep {
    /// Not given.
    #[default]
    Unset,
    /// Explicitly off.
    Off,
    /// On, keeping state this long.
    For(Duration),
}

impl Keep {
    /// How long `true` keeps state: 24 hours.
    pub const DEFAULT: Duration = Duration::from_secs(24 * 3600);

    /// The longest window allowed: 10 years.
    pub const LONGEST: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

    /// Whether nothing was given.
    pub fn is_unset(&self) -> bool {
        matches!(self, Keep::Unset)
    }

    /// How long state is kept, `None` when off or unset.
    pub fn window(&self) -> Option<Duration> {
        match self {
            Keep::For(d) => Some(*d),
            _ => None,
        }
    }

    /// `self` unless unset, else `parent`.
    pub fn or(self, parent: Keep) -> Keep {
        if self.is_unset() {
            parent
        } else {
            self
        }
    }
}

impl Serialize for Keep {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Keep::For(d) if *d == Keep::DEFAULT => s.serialize_bool(true),
            Keep::For(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
            Keep::Unset | Keep::Off => s.serialize_bool(false),
        }
    }
}

impl<'de> Deserialize<'de> for Keep {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bool(bool),
            Text(String),
        }
        match Raw::deserialize(d) {
            Ok(Raw::Bool(true)) => Ok(Keep::For(Keep::DEFAULT)),
            Ok(Raw::Bool(false)) => Ok(Keep::Off),
            Ok(Raw::Text(text)) => match humantime::parse_duration(&text) {
                Ok(w) if w >= Duration::from_secs(1) && w <= Keep::LONGEST => Ok(Keep::For(w)),
                _ => Err(serde::de::Error::custom(format!(
                    "\"{text}\" is not allowed: write true, false or how long to keep it (\"24h\", \"7d\"; from 1s to 10 years)"
                ))),
            },
            Err(_) => Err(serde::de::Error::custom(
                "write true, false or how long to keep it (\"24h\", \"7d\")",
            )),
        }
    }
}

/// A rate: `count` per `per` (`"50/s"`, `"100/m"`, `"1000/h"`, `"5/10s"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    /// Jobs per period (at least 1).
    pub count: u32,
    /// The period (at least 1 ms).
    pub per: Duration,
}

impl std::str::FromStr for Rate {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "\"{text}\" is not a rate: write jobs per period, like \"50/s\", \"100/m\", \"1000/h\" or \"5/10s\""
            )
        };
        let (count, per) = text.split_once('/').ok_or_else(bad)?;
        let count: u32 = count.trim().parse().map_err(|_| bad())?;
        let per = match per.trim() {
            "s" => Duration::from_secs(1),
            "m" | "min" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            "d" => Duration::from_secs(86_400),
            other => humantime::parse_duration(other).map_err(|_| bad())?,
        };
        if count == 0 || per < Duration::from_millis(1) {
            return Err(format!(
                "{}; it must allow at least 1 job per period",
                bad()
            ));
        }
        Ok(Rate { count, per })
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.per.as_secs() {
            1 if self.per.subsec_nanos() == 0 => write!(f, "{}/s", self.count),
            60 if self.per.subsec_nanos() == 0 => write!(f, "{}/m", self.count),
            3600 if self.per.subsec_nanos() == 0 => write!(f, "{}/h", self.count),
            _ => write!(f, "{}/{}", self.count, humantime::format_duration(self.per)),
        }
    }
}

impl Serialize for Rate {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// How long a unique job's key holds (see [`JobConfig::unique`] and
/// [`Enqueue::unique_for`](crate::Enqueue::unique_for)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unique {
    /// For this long after the first enqueue.
    For(Duration),
    /// Until the first job succeeds or is dead-lettered, and at most this long (so a job that
    /// is lost or purged does not block its key for ever).
    UntilDone(Duration),
}

/// The longest an `until_done` key holds when nothing says otherwise: 24 hours.
pub const UNTIL_DONE_MAX: Duration = Duration::from_secs(24 * 3600);

impl Unique {
    /// The key's time to live in the store.
    pub fn ttl(&self) -> Duration {
        match self {
            Unique::For(d) | Unique::UntilDone(d) => *d,
        }
    }
}

impl Serialize for Unique {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Unique::For(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
            Unique::UntilDone(_) => s.serialize_str("until_done"),
        }
    }
}

impl<'de> Deserialize<'de> for Unique {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        if text == "until_done" {
            return Ok(Unique::UntilDone(UNTIL_DONE_MAX));
        }
        match humantime::parse_duration(&text) {
            Ok(w) if !w.is_zero() => Ok(Unique::For(w)),
            _ => Err(serde::de::Error::custom(format!(
                "\"{text}\" is neither a window (\"10m\", \"1h\") nor \"until_done\""
            ))),
        }
    }
}

impl Config {
    /// The queues to serve: [`Config::queues`], or one [`DEFAULT_QUEUE`] with default settings when
    /// none is configured.
    pub fn effective_queues(&self) -> BTreeMap<String, QueueConfig> {
        if self.queues.is_empty() {
            BTreeMap::from([(DEFAULT_QUEUE.to_string(), QueueConfig::default())])
        } else {
            self.queues.clone()
        }
    }

    /// One served queue's settings, `None` if this worker does not serve it.
    pub fn queue(&self, name: &str) -> Option<QueueConfig> {
        if self.queues.is_empty() {
            (name == DEFAULT_QUEUE).then(QueueConfig::default)
        } else {
            self.queues.get(name).cloned()
        }
    }

    /// One served queue's settings by reference (no copy), `None` if this worker does not serve it.
    fn queue_ref(&self, name: &str) -> Option<&QueueConfig> {
        static DEFAULT: std::sync::LazyLock<QueueConfig> =
            std::sync::LazyLock::new(QueueConfig::default);
        if self.queues.is_empty() {
            (name == DEFAULT_QUEUE).then(|| &*DEFAULT)
        } else {
            self.queues.get(name)
        }
    }

    /// The priority levels served on `queue`, highest first (empty if the queue is not served).
    pub fn levels(&self, queue: &str) -> Vec<Priority> {
        self.queue(queue).map(|q| q.levels()).unwrap_or_default()
    }

    /// Retry policy of `job` on `queue`: `[retry]` ← `[queues.<queue>.retry]` ←
    /// `[jobs.<job>.retry]`. Unknown queue or job names contribute nothing.
    pub fn retry_for(&self, queue: &str, job: Option<&str>) -> RetryConfig {
        let mut retry = self.retry;
        if let Some(q) = self.queue_ref(queue) {
            retry = q.retry.apply(&retry);
        }
        if let Some(j) = job.and_then(|j| self.jobs.get(j)) {
            retry = j.retry.apply(&retry);
        }
        retry
    }

    /// How long `job`'s inbox marks on `queue` are kept, `None` if it is not idempotent:
    /// `[jobs.<job>] idempotent`, else the queue's.
    pub fn idempotent_for(&self, queue: &str, job: &str) -> Option<Duration> {
        let queue = self.queue_ref(queue).map_or(Keep::Unset, |q| q.idempotent);
        self.jobs
            .get(job)
            .map_or(Keep::Unset, |j| j.idempotent)
            .or(queue)
            .window()
    }

    /// How long job status on `queue` is kept, `None` if it is not tracked.
    pub fn status_for(&self, queue: &str) -> Option<Duration> {
        self.queue_ref(queue).and_then(|q| q.track_status.window())
    }

    /// Timeout of `job` on `queue`: `[jobs.<job>] timeout`, else the queue's, else the default
    /// queue timeout.
    pub fn timeout_for(&self, queue: &str, job: Option<&str>) -> Duration {
        job.and_then(|j| self.jobs.get(j))
            .and_then(|j| j.timeout)
            .or_else(|| self.queue_ref(queue).map(|q| q.timeout))
            .unwrap_or_else(|| QueueConfig::default().timeout)
    }
}

/// A config that cannot be loaded or is not valid. Displays as `file: key: message`, e.g.
/// `config/dev.toml: queues.emails.concurrency: must be at least 1 (got 0)`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", render(.file.as_deref(), .key.as_deref(), .message))]
pub struct ConfigError {
    /// The file to edit, when the problem is in one.
    pub file: Option<String>,
    /// The key as the user wrote it: a dotted TOML path (`profile.production.worker.concurrency`
    /// when a profile set it) or an environment variable (`STEVEDORE_WORKER__CONCURRENCY`).
    pub key: Option<String>,
    /// What is wrong and what is allowed.
    pub message: String,
}

fn render(file: Option<&str>, key: Option<&str>, message: &str) -> String {
    let mut out = String::new();
    for part in [file, key].into_iter().flatten() {
        out.push_str(part);
        out.push_str(": ");
    }
    out.push_str(message);
    out
}

impl ConfigError {
    /// An error about no particular file or key.
    pub fn new(message: impl Into<String>) -> Self {
        ConfigError {
            file: None,
            key: None,
            message: message.into(),
        }
    }
}
