//! Validation against the chosen backend's capabilities, before anything connects.

use super::{Config, ConfigError, PriorityMode, QueueConfig, RetryConfig, ENV_PREFIX};
use std::time::Duration;
use stevedore_core::{names, Broker, Capabilities, DelaySupport, LeaseSupport, Priority};

/// Shortest lease accepted: shorter ones expire before the background extension can renew them.
const MIN_LEASE: Duration = Duration::from_secs(1);

fn human(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

impl Config {
    /// Checks the config against what the backend declares (`caps`) and returns start-up notices
    /// to log: one line per feature the runtime emulates, and settings that are legal but risky or
    /// ignored. The first problem found is an error naming the file, key, value and what is
    /// allowed. The `[broker]` settings are the backend's to check
    /// ([`Backends::configure`](crate::backend::Backends::configure)).
    pub fn validate(&self, caps: &Capabilities) -> Result<Vec<String>, ConfigError> {
        self.check(caps)
    }

    /// As [`Config::validate`], against a connected broker: each served queue is checked against
    /// what the broker declares for it ([`Broker::queue_capabilities`] of its highest level), the
    /// rest against [`Broker::capabilities`].
    pub fn validate_on(&self, broker: &dyn Broker) -> Result<Vec<String>, ConfigError> {
        let levels = |name: &str| {
            self.queue(name)
                .and_then(|q| q.levels().first().copied())
                .unwrap_or(Priority::Normal)
        };
        self.check_with(broker.capabilities(), &|name| {
            broker
                .queue_capabilities(&names::physical(name, levels(name)))
                .clone()
        })
    }

    /// Every check of [`Config::validate`].
    pub(super) fn check(&self, caps: &Capabilities) -> Result<Vec<String>, ConfigError> {
        self.check_with(caps, &|_| caps.clone())
    }

    /// [`Config::check`] with per-queue capabilities (`queue_caps` of a logical queue's name).
    pub(super) fn check_with(
        &self,
        caps: &Capabilities,
        queue_caps: &dyn Fn(&str) -> Capabilities,
    ) -> Result<Vec<String>, ConfigError> {
        let mut notices = Vec::new();
        if self.broker.kind.trim().is_empty() {
            return Err(self.error_at("broker.kind", "must not be empty".into()));
        }

        let w = &self.worker;
        self.at_least("worker.concurrency", w.concurrency as u64, 1)?;
        self.nonzero("worker.poll_wait", w.poll_wait)?;
        self.nonzero("worker.promote_interval", w.promote_interval)?;

        let a = &self.autoscale;
        self.at_least("autoscale.target_per_worker", a.target_per_worker, 1)?;
        self.at_least("autoscale.max_workers", a.max_workers.into(), 1)?;
        if a.min_workers > a.max_workers {
            return Err(self.error_at(
                "autoscale.min_workers",
                format!(
                    "must not exceed autoscale.max_workers ({} > {})",
                    a.min_workers, a.max_workers
                ),
            ));
        }
        self.nonzero("autoscale.interval", a.interval)?;

        let h = &self.http;
        if h.token.as_deref().is_some_and(|t| t.trim().is_empty()) {
            return Err(self.error_at(
                "http.token",
                "is empty; set a token (at least 16 characters) or leave the key out".into(),
            ));
        }
        if h.token.as_deref().is_some_and(|t| {
            !t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.~+/=".contains(&b))
        }) {
            return Err(self.error_at(
                "http.token",
                "may hold letters, digits and - _ . ~ + / = only (it is kept in a cookie)".into(),
            ));
        }
        if h.token.as_deref().is_some_and(|t| t.len() < 16) {
            return Err(self.error_at(
                "http.token",
                "is shorter than 16 characters; use a long random one (e.g. `openssl rand -hex 24`)"
                    .into(),
            ));
        }
        if h.enabled && h.ui && !h.read_only && h.token.is_none() && !h.bind.ip().is_loopback() {
            notices.push(format!(
                "http: the dashboard's actions (replay, purge, enqueue) are open to anyone who \
                 reaches {}; set http.token or http.read_only = true",
                h.bind
            ));
        }

        self.check_retry_fields("retry", &self.retry)?;
        for (name, q) in &self.effective_queues() {
            let caps = queue_caps(name);
            self.check_queue(name, q, &caps, &mut notices)?;
            if !caps.uncounted_release {
                notices.push(format!(
                    "queues.{name}: a job given back at a shutdown (received but not started, or \
                     cut off at the drain deadline) uses an attempt on this {} queue, whose \
                     order a copy sent to the back would break",
                    self.broker.kind
                ));
            }
        }
        for (name, j) in &self.jobs {
            if name.is_empty() {
                return Err(self.error_at("jobs", "job names must not be empty".into()));
            }
            self.check_retry_fields(&format!("jobs.{name}.retry"), &j.retry.apply(&self.retry))?;
            if let Some(t) = j.timeout {
                let key = format!("jobs.{name}.timeout");
                self.nonzero(&key, t)?;
                session_notice(&key, t, caps, &mut notices);
            }
        }
        self.check_retry_combinations()?;
        self.check_retry_levels(&mut notices)?;
        self.check_schedules()?;
        for (name, q) in &self.effective_queues() {
            self.check_limits(&format!("queues.{name}"), q.rate, q.burst, q.max_concurrent)?;
        }
        for (name, j) in &self.jobs {
            self.check_limits(&format!("jobs.{name}"), j.rate, j.burst, j.max_concurrent)?;
        }
        if let Some(o) = &self.outbox {
            if !(o.url.starts_with("postgres://") || o.url.starts_with("postgresql://")) {
                return Err(self.error_at(
                    "outbox.url",
                    if o.url.is_empty() {
                        "is required: the PostgreSQL database your transactions write to, like \"postgres://app@localhost:5432/app\"".to_string()
                    } else {
                        format!(
                            "\"{}\" is not a PostgreSQL URL: write \"postgres://user@host:5432/database\"",
                            super::redact::redact_url(&o.url)
                        )
                    },
                ));
            }
            let plain = |p: &str| {
                !p.is_empty()
                    && p.len() <= 63
                    && p.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
                    && p.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            };
            let parts: Vec<&str> = o.table.split('.').collect();
            if parts.len() > 2 || !parts.iter().all(|p| plain(p)) {
                return Err(self.error_at(
                    "outbox.table",
                    format!(
                        "\"{}\" is not a plain table name: lowercase letters, digits and '_', optionally \"schema.table\"",
                        o.table
                    ),
                ));
            }
            self.at_least("outbox.batch", o.batch as u64, 1)?;
            if o.poll < Duration::from_millis(10) {
                return Err(self.error_at("outbox.poll", "must be at least 10ms".to_string()));
            }
            if !cfg!(feature = "postgres") {
                return Err(self.error_at(
                    "outbox",
                    "the transactional outbox needs the `postgres` feature of the stevedore crate: build with --features postgres".to_string(),
                ));
            }
        }

        let reserved: usize = self
            .effective_queues()
            .values()
            .map(|q| q.reserved_total())
            .sum();
        if reserved > w.concurrency {
            notices.push(format!(
                "reserved: queues reserve {reserved} slots in total but worker.concurrency is {}; \
                 a busy queue can hold slots another queue reserved",
                w.concurrency
            ));
        }
        if caps.depth_staleness > Duration::ZERO
            && self.queues.values().any(|q| q.max_depth.is_some())
        {
            notices.push(format!(
                "max_depth: producers check depths up to {} stale on {}, so a queue may overshoot briefly",
                human(caps.depth_staleness),
                self.broker.kind
            ));
        }
        match caps.delay {
            DelaySupport::None => notices.push(format!(
                "delay: emulated on {} via its durable delay store (where the backend has none, the worker refuses delays and retry backoff, and says so at start-up)",
                self.broker.kind
            )),
            DelaySupport::Native { max: Some(m) } => notices.push(format!(
                "delay: native up to {}, longer delays hop",
                human(m)
            )),
            DelaySupport::Native { max: None } => {}
        }
        if !caps.counts_deliveries {
            notices.push(format!(
                "attempts: {} does not count redeliveries, so a job that kills its worker process \
                 is run again without its attempt growing (only failures the handler returns count)",
                self.broker.kind
            ));
        }
        Ok(notices)
    }

    fn check_queue(
        &self,
        name: &str,
        q: &QueueConfig,
        caps: &Capabilities,
        notices: &mut Vec<String>,
    ) -> Result<(), ConfigError> {
        let key = |field: &str| format!("queues.{name}.{field}");
        if let Err(rule) = names::validate(name) {
            return Err(self.error_at(
                &format!("queues.{name}"),
                format!("invalid queue name \"{name}\": {rule}"),
            ));
        }
        self.at_least(&key("concurrency"), q.concurrency as u64, 1)?;
        if q.batch < 1 || q.batch > caps.max_batch {
            return Err(self.error_at(
                &key("batch"),
                format!(
                    "must be between 1 and {}, the most {} handles per call (got {})",
                    caps.max_batch, self.broker.kind, q.batch
                ),
            ));
        }
        if q.lease < MIN_LEASE {
            return Err(self.error_at(
                &key("lease"),
                format!(
                    "must be at least {} (got {})",
                    human(MIN_LEASE),
                    human(q.lease)
                ),
            ));
        }
        if let LeaseSupport::Timed { max: Some(m) } = caps.lease {
            if q.lease > m {
                return Err(self.error_at(
                    &key("lease"),
                    format!(
                        "must be at most {}, the longest lease {} allows (got {})",
                        human(m),
                        self.broker.kind,
                        human(q.lease)
                    ),
                ));
            }
        }
        self.nonzero(&key("timeout"), q.timeout)?;
        session_notice(&key("timeout"), q.timeout, caps, notices);
        self.nonzero(&key("aging"), q.aging)?;

        if q.weights.is_empty() {
            return Err(self.error_at(
                &key("weights"),
                "must name at least one level (high, normal, low): the levels present are served"
                    .into(),
            ));
        }
        for (level, weight) in &q.weights {
            if *weight < 1 {
                return Err(self.error_at(
                    &key(&format!("weights.{level}")),
                    format!(
                        "must be at least 1 (got {weight}); leave the level out to not serve it"
                    ),
                ));
            }
        }
        let served: Vec<&str> = q.weights.keys().map(|p| p.as_str()).collect();
        for level in q.reserved.keys() {
            if !q.weights.contains_key(level) {
                return Err(self.error_at(
                    &key(&format!("reserved.{level}")),
                    format!(
                        "level {level} is not served by this queue (weights has {}); \
                         reserve only served levels",
                        served.join(", ")
                    ),
                ));
            }
        }
        let reserved = q.reserved_total();
        if reserved > 0 && reserved >= q.concurrency {
            return Err(self.error_at(
                &key("reserved"),
                format!(
                    "reserves {reserved} of the queue's {} slots; at least one must stay \
                     unreserved (raise {} or reserve fewer)",
                    q.concurrency,
                    key("concurrency")
                ),
            ));
        }
        if reserved > self.worker.concurrency {
            return Err(self.error_at(
                &key("reserved"),
                format!(
                    "reserves {reserved} slots but worker.concurrency is {}; worker.concurrency \
                     must be at least every queue's reserved total",
                    self.worker.concurrency
                ),
            ));
        }
        if q.default_job
            .as_deref()
            .is_some_and(|j| j.trim().is_empty())
        {
            return Err(self.error_at(
                &key("default_job"),
                "must name a job (leave it out for none)".into(),
            ));
        }
        if let Some(max) = q.max_depth {
            if max < 1 {
                return Err(self.error_at(
                    &key("max_depth"),
                    "must be at least 1 (got 0); leave it out for no limit".into(),
                ));
            }
        }
        self.check_retry_fields(&key("retry"), &q.retry.apply(&self.retry))?;

        if served.len() > 1 {
            let how = match q.mode {
                PriorityMode::Weighted => {
                    let w: Vec<String> = q.weights.values().map(u32::to_string).collect();
                    format!("weighted-fair fetching ({})", w.join(":"))
                }
                PriorityMode::Strict => format!(
                    "strict fetching (lower levels age after {})",
                    human(q.aging)
                ),
            };
            notices.push(format!(
                "priority: queue {name}: separate queues per level ({}) with {how}",
                served.join(", ")
            ));
        }
        Ok(())
    }

    /// Checks the fields of one effective retry policy. `prefix` is the table that set it; the
    /// individual fields are reported there. `base ≤ cap` is checked across layers by
    /// [`Config::check_retry_combinations`].
    fn check_retry_fields(&self, prefix: &str, r: &RetryConfig) -> Result<(), ConfigError> {
        self.at_least(&format!("{prefix}.max_attempts"), r.max_attempts.into(), 1)?;
        if !(r.factor.is_finite() && r.factor >= 1.0) {
            return Err(self.error_at(
                &format!("{prefix}.factor"),
                format!("must be a number of at least 1.0 (got {})", r.factor),
            ));
        }
        self.nonzero(&format!("{prefix}.max_age"), r.max_age)?;
        Ok(())
    }

    /// `retry.level` names a level every queue it applies to serves: for each (queue, job) pair
    /// the most specific table that sets it is reported. A queue whose retries move gets a notice.
    fn check_retry_levels(&self, notices: &mut Vec<String>) -> Result<(), ConfigError> {
        let queues = self.effective_queues();
        for (q, cfg) in &queues {
            let jobs = std::iter::once(None).chain(self.jobs.keys().map(|j| Some(j.as_str())));
            for job in jobs {
                let Some(level) = self.retry_for(q, job).level else {
                    continue;
                };
                if cfg.weights.contains_key(&level) {
                    continue;
                }
                let key = match job {
                    Some(j) if self.jobs[j].retry.level.is_some() => {
                        format!("jobs.{j}.retry.level")
                    }
                    _ if cfg.retry.level.is_some() => format!("queues.{q}.retry.level"),
                    _ => "retry.level".to_string(),
                };
                let served: Vec<&str> = cfg.weights.keys().map(|p| p.as_str()).collect();
                return Err(self.error_at(
                    &key,
                    format!(
                        "retries would go to level {level}, which queue {q} does not serve \
                         (its weights have {}); name one of those, or add {level} to \
                         queues.{q}.weights",
                        served.join(", ")
                    ),
                ));
            }
            if let Some(level) = self.retry_for(q, None).level {
                notices.push(format!(
                    "queues.{q}: retries go to level {level} after their backoff (retry.level)"
                ));
            }
        }
        Ok(())
    }

    /// `base ≤ cap` for every (queue, job) pair, since each layer may set one of the two.
    fn check_retry_combinations(&self) -> Result<(), ConfigError> {
        let queues = self.effective_queues();
        let mut pairs: Vec<(Option<&str>, Option<&str>)> = vec![(None, None)];
        for q in queues.keys() {
            pairs.push((Some(q), None));
            pairs.extend(
                self.jobs
                    .keys()
                    .map(|j| (Some(q.as_str()), Some(j.as_str()))),
            );
        }
        for (queue, job) in pairs {
            let r = match queue {
                Some(q) => self.retry_for(q, job),
                None => self.retry,
            };
            if r.base <= r.cap {
                continue;
            }
            // The most specific table that sets each field is where the user wrote it.
            let source = |field: &str, set_by_job: bool, set_by_queue: bool| match (job, queue) {
                (Some(j), _) if set_by_job => format!("jobs.{j}.retry.{field}"),
                (_, Some(q)) if set_by_queue => format!("queues.{q}.retry.{field}"),
                _ => format!("retry.{field}"),
            };
            let jo = job.and_then(|j| self.jobs.get(j)).map(|j| &j.retry);
            let qo = queue.and_then(|q| queues.get(q)).map(|q| &q.retry);
            let base = source(
                "base",
                jo.is_some_and(|o| o.base.is_some()),
                qo.is_some_and(|o| o.base.is_some()),
            );
            let cap = source(
                "cap",
                jo.is_some_and(|o| o.cap.is_some()),
                qo.is_some_and(|o| o.cap.is_some()),
            );
            let rank = |k: &str| {
                ["jobs.", "queues.", "retry."]
                    .iter()
                    .position(|p| k.starts_with(p))
            };
            let (key, other) = if rank(&cap) < rank(&base) {
                (&cap, &base)
            } else {
                (&base, &cap)
            };
            let mut context = String::new();
            if let Some(q) = queue {
                context = format!(" on queue {q}");
            }
            return Err(self.error_at(
                key,
                format!(
                    "retry base {} exceeds cap {}{context} (the other is {other}); \
                     base must not exceed cap",
                    human(r.base),
                    human(r.cap)
                ),
            ));
        }
        Ok(())
    }

    /// Each `[schedules.<name>]`: a job, a valid `cron` or `every`, a time zone, and a queue of
    /// this config that serves the schedule's priority level.
    fn check_schedules(&self) -> Result<(), ConfigError> {
        let queues = self.effective_queues();
        for (name, s) in &self.schedules {
            let at = |key: &str| format!("schedules.{name}.{key}");
            if let Err(why) = names::validate(name) {
                return Err(self.error_at(
                    &format!("schedules.{name}"),
                    format!("a schedule's name {why}"),
                ));
            }
            if s.job.trim().is_empty() {
                return Err(self.error_at(
                    &at("job"),
                    "missing: the job to enqueue on each tick (job = \"send_report\")".into(),
                ));
            }
            if let Err((key, message)) = crate::schedule::Spec::parse(s) {
                return Err(self.error_at(&at(key), message));
            }
            let Some(q) = queues.get(&s.queue) else {
                return Err(self.error_at(
                    &at("queue"),
                    format!(
                        "\"{}\" is not a queue of this config; queues: {}",
                        s.queue,
                        queues.keys().cloned().collect::<Vec<_>>().join(", ")
                    ),
                ));
            };
            if !q.levels().contains(&s.priority) {
                return Err(self.error_at(
                    &at("priority"),
                    format!(
                        "queue \"{}\" does not serve level {} (its weights have {}); add it to queues.{}.weights",
                        s.queue,
                        s.priority.as_str(),
                        q.levels().iter().map(|l| l.as_str()).collect::<Vec<_>>().join(", "),
                        s.queue
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The key of the first enabled feature that needs a state store (`[store]`), if any.
    pub(crate) fn needs_store(&self) -> Option<String> {
        self.schedules
            .iter()
            .find(|(_, s)| s.enabled)
            .map(|(name, _)| format!("schedules.{name}"))
            .or_else(|| {
                self.jobs.iter().find_map(|(name, j)| {
                    let key = if j.unique.is_some() {
                        "unique"
                    } else if j.idempotent.window().is_some() {
                        "idempotent"
                    } else if j.rate.is_some() {
                        "rate"
                    } else if j.max_concurrent.is_some() {
                        "max_concurrent"
                    } else {
                        return None;
                    };
                    Some(format!("jobs.{name}.{key}"))
                })
            })
            .or_else(|| {
                self.effective_queues().iter().find_map(|(name, q)| {
                    let key = if q.rate.is_some() {
                        "rate"
                    } else if q.idempotent.window().is_some() {
                        "idempotent"
                    } else if q.track_status.window().is_some() {
                        "track_status"
                    } else if q.max_concurrent.is_some() {
                        "max_concurrent"
                    } else {
                        return None;
                    };
                    Some(format!("queues.{name}.{key}"))
                })
            })
    }

    /// `burst` without `rate`, and zero `burst` or `max_concurrent`, at `prefix` (`queues.x`).
    fn check_limits(
        &self,
        prefix: &str,
        rate: Option<super::Rate>,
        burst: Option<u32>,
        max_concurrent: Option<u32>,
    ) -> Result<(), ConfigError> {
        if burst.is_some() && rate.is_none() {
            return Err(self.error_at(
                &format!("{prefix}.burst"),
                "applies to a rate: set rate too (rate = \"50/s\") or leave burst out".into(),
            ));
        }
        if burst == Some(0) {
            return Err(self.error_at(&format!("{prefix}.burst"), "must be at least 1".into()));
        }
        if max_concurrent == Some(0) {
            return Err(self.error_at(
                &format!("{prefix}.max_concurrent"),
                "must be at least 1 (leave it out for no limit)".into(),
            ));
        }
        Ok(())
    }

    fn at_least(&self, key: &str, got: u64, min: u64) -> Result<(), ConfigError> {
        if got < min {
            return Err(self.error_at(key, format!("must be at least {min} (got {got})")));
        }
        Ok(())
    }

    fn nonzero(&self, key: &str, got: Duration) -> Result<(), ConfigError> {
        if got.is_zero() {
            return Err(self.error_at(key, "must be more than 0 (like \"30s\")".into()));
        }
        Ok(())
    }

    /// An error at `key` (a dotted path of the merged config), pointing at where the user wrote it:
    /// the file's top level, the profile section, or the environment variable.
    pub(crate) fn error_at(&self, key: &str, message: String) -> ConfigError {
        let prefix = format!("{key}.");
        let written = self.origins.get(key).or_else(|| {
            self.origins
                .iter()
                .find(|(k, _)| k.starts_with(&prefix))
                .map(|(_, w)| w)
        });
        let (file, key) = match written {
            Some(w) if w.starts_with(ENV_PREFIX) => {
                // A table set through several variables: name the table, and the variable.
                let k = if self.origins.contains_key(key) {
                    w.clone()
                } else {
                    format!("{key} (from {w})")
                };
                (None, k)
            }
            Some(w) if self.origins.contains_key(key) => (self.source.clone(), w.clone()),
            Some(w) => {
                let profile_key = w.split_once(&prefix).map_or(w.as_str(), |(p, _)| p);
                (
                    self.source.clone(),
                    profile_key.trim_end_matches('.').to_string() + "." + key,
                )
            }
            None => (self.source.clone(), key.to_string()),
        };
        ConfigError {
            file,
            key: Some(key),
            message,
        }
    }
}

/// Session-lease brokers drop a consumer that holds one message longer than their limit.
fn session_notice(key: &str, timeout: Duration, caps: &Capabilities, notices: &mut Vec<String>) {
    if let LeaseSupport::Session { max: Some(m) } = caps.lease {
        if timeout > m {
            notices.push(format!(
                "{key}: {} exceeds the broker's session limit of {}: jobs longer than {} risk \
                 the broker dropping the consumer",
                human(timeout),
                human(m),
                human(m)
            ));
        }
    }
}
