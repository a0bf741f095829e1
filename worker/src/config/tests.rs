//! Tests of loading, validation and redaction.
#![allow(clippy::unwrap_used)]

use super::*;
use std::io::Write as _;
use std::path::Path;
use std::sync::Arc;
use stevedore_core::{
    Broker, Capabilities, DelaySupport, LeaseSupport, MemoryBroker, OrderingSupport,
};

// Loading reads `STEVEDORE_*`. No test here sets one: the test that does is
// `tests/environment.rs`, a binary (a process) of its own, since a variable set while other
// threads load a config would change what they load.

fn parse(toml: &str) -> Result<Config, ConfigError> {
    from_toml_str(toml, None)
}

fn memory_caps() -> Capabilities {
    MemoryBroker::new().capabilities().clone()
}

/// Roughly what SQS declares: capped native delay, 10 per batch, 12h visibility.
fn sqs_caps() -> Capabilities {
    Capabilities {
        delay: DelaySupport::Native {
            max: Some(Duration::from_secs(900)),
        },
        lease: LeaseSupport::Timed {
            max: Some(Duration::from_secs(12 * 3600)),
        },
        ordering: OrderingSupport::None,
        max_payload: 256 * 1024,
        max_batch: 10,
        durable: true,
        delay_tolerance: Duration::from_secs(1),
        depth_staleness: Duration::from_secs(60),
        shared: true,
        counts_deliveries: true,
        uncounted_release: true,
        sharing: stevedore_core::Sharing::Any,
        max_headers: None,
    }
}

/// Roughly what RabbitMQ declares: emulated delay, session leases with consumer_timeout.
fn rabbit_caps() -> Capabilities {
    Capabilities {
        delay: DelaySupport::None,
        lease: LeaseSupport::Session {
            max: Some(Duration::from_secs(1800)),
        },
        max_batch: 100,
        ..sqs_caps()
    }
}

fn invalid(toml: &str, caps: &Capabilities) -> ConfigError {
    parse(toml).unwrap().validate(caps).unwrap_err()
}

#[track_caller]
fn assert_err(err: &ConfigError, key: &str, says: &str) {
    assert_eq!(err.key.as_deref(), Some(key), "{err}");
    assert!(err.message.contains(says), "{err}");
    assert!(err.to_string().contains(&format!("{key}: ")), "{err}");
}

fn temp_file(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f
}

// ---- loading ----

#[test]
fn empty_file_gives_defaults() {
    let c = parse("").unwrap();
    assert_eq!(c, Config::default());
    assert_eq!(c.broker.kind, DEFAULT_KIND);
    assert_eq!(c.worker.concurrency, 64);
    assert_eq!(c.worker.shutdown_timeout, Duration::from_secs(30));
    assert_eq!(c.worker.poll_wait, Duration::from_secs(1));
    assert_eq!(c.worker.promote_interval, Duration::from_millis(250));
    assert!(c.http.enabled);
    assert_eq!(c.http.bind.to_string(), "127.0.0.1:9464");
    assert_eq!(c.retry.max_attempts, 5);
    assert_eq!(c.retry.cap, Duration::from_secs(600));
    assert_eq!(c.retry.max_age, Duration::from_secs(7 * 86400));
    assert_eq!(c.autoscale.max_workers, 10);
    let queues = c.effective_queues();
    assert_eq!(queues.keys().collect::<Vec<_>>(), ["default"]);
    assert_eq!(queues["default"], QueueConfig::default());
    assert_eq!(c.levels("default"), [Priority::Normal]);
    assert!(c.levels("other").is_empty());
    let notices = c.validate(&memory_caps()).unwrap();
    assert!(notices.is_empty(), "{notices:?}");
}

#[test]
fn file_overrides_defaults() {
    let c = parse(
        r#"
        [worker]
        concurrency = 8
        shutdown_timeout = "1m 30s"
        [retry]
        factor = 3
        [queues.emails]
        mode = "strict"
        weights = { high = 2, low = 1 }
        reserved = { high = 1 }
        "#,
    )
    .unwrap();
    assert_eq!(c.worker.concurrency, 8);
    assert_eq!(c.worker.shutdown_timeout, Duration::from_secs(90));
    assert_eq!(c.retry.factor, 3.0);
    assert_eq!(c.retry.base, Duration::from_secs(1));
    let q = &c.queues["emails"];
    assert_eq!(q.mode, PriorityMode::Strict);
    assert_eq!(q.levels(), [Priority::High, Priority::Low]);
    assert_eq!(q.reserved_total(), 1);
    assert_eq!(q.concurrency, 16);
    assert_eq!(c.effective_queues().keys().collect::<Vec<_>>(), ["emails"]);
    assert!(c.origins.is_empty());
}

#[test]
fn profile_overrides_file() {
    let toml = r#"
        [worker]
        concurrency = 8
        poll_wait = "2s"
        [queues.emails]
        concurrency = 4
        [profile.production.worker]
        concurrency = 200
        [profile.production.queues.emails]
        batch = 2
        [profile.staging.worker]
        concurrency = 20
    "#;
    let plain = parse(toml).unwrap();
    assert_eq!(plain.worker.concurrency, 8);
    assert_eq!(plain.profile, None);

    let prod = from_toml_str(toml, Some("production")).unwrap();
    assert_eq!(prod.worker.concurrency, 200);
    assert_eq!(prod.worker.poll_wait, Duration::from_secs(2));
    assert_eq!(prod.queues["emails"].concurrency, 4);
    assert_eq!(prod.queues["emails"].batch, 2);
    assert_eq!(prod.profile.as_deref(), Some("production"));
    assert_eq!(
        prod.origins.get("worker.concurrency").map(String::as_str),
        Some("profile.production.worker.concurrency")
    );
    assert!(!prod.origins.contains_key("worker.poll_wait"));

    let err = from_toml_str(toml, Some("prod")).unwrap_err();
    assert_err(&err, "profile", "no profile \"prod\"");
    assert!(
        err.message.contains("defined: production, staging"),
        "{err}"
    );
    let err = from_toml_str("", Some("prod")).unwrap_err();
    assert!(err.message.contains("none is defined"), "{err}");
}

#[test]
fn unselected_profile_is_still_checked() {
    let err = parse("[profile.production.worker]\nconcurency = 3\n").unwrap_err();
    assert_err(&err, "profile.production.worker.concurency", "allowed keys");
    let err = parse("profile = 3").unwrap_err();
    assert_err(&err, "profile", "table of profiles");
}

#[test]
fn missing_file_is_an_error_naming_it() {
    let err = load(Some(Path::new("config/nope.toml")), None).unwrap_err();
    assert_eq!(err.file.as_deref(), Some("config/nope.toml"));
    assert!(
        err.to_string().starts_with("config/nope.toml: cannot read"),
        "{err}"
    );
}

#[test]
fn unknown_key_names_key_file_and_allowed_keys() {
    let file = temp_file("[worker]\nconcurency = 3\n");
    let path = file.path().display().to_string();
    let err = { load(Some(file.path()), None).unwrap_err() };
    assert_eq!(err.file.as_deref(), Some(path.as_str()));
    assert_err(&err, "worker.concurency", "unknown key");
    assert!(
        err.message.contains("id, concurrency, shutdown_timeout"),
        "{err}"
    );
    assert!(err
        .to_string()
        .starts_with(&format!("{path}: worker.concurency: ")));

    let err = parse("[queues.emails]\nweight = { high = 1 }\n").unwrap_err();
    assert_err(&err, "queues.emails.weight", "weights");
    let err = parse("[queues.emails.retry]\nattempts = 1\n").unwrap_err();
    assert_err(&err, "queues.emails.retry.attempts", "max_attempts");
    let err = parse("[brokers]\nkind = \"memory\"\n").unwrap_err();
    assert_err(&err, "brokers", "broker, store, worker, http");
    let err = parse("source = \"x\"").unwrap_err();
    assert_err(&err, "source", "unknown key");
}

#[test]
fn bad_values_say_what_is_allowed() {
    let err = configure("[broker]\nkind = \"mongo\"\n").unwrap_err();
    assert_err(
        &err,
        "broker.kind",
        "unknown broker kind \"mongo\"; this build has \"memory\"",
    );
    let err = parse("[queues.q]\nmode = \"fifo\"\n").unwrap_err();
    assert_err(&err, "queues.q.mode", "\"weighted\", \"strict\"");
    let err = parse("[queues.q]\nweights = { urgent = 1 }\n").unwrap_err();
    assert!(
        err.message.contains("\"high\", \"normal\", \"low\""),
        "{err}"
    );
    let err = parse("[worker]\nshutdown_timeout = \"30 parsecs\"\n").unwrap_err();
    assert_err(&err, "worker.shutdown_timeout", "durations look like");
    let err = parse("[worker]\nconcurrency = \"many\"\n").unwrap_err();
    assert_err(&err, "worker.concurrency", "expected");
    let err = parse("[http]\nbind = \"localhost\"\n").unwrap_err();
    assert_err(&err, "http.bind", "address");
    let err = parse("[worker\n").unwrap_err();
    assert!(err.message.starts_with("not valid TOML"), "{err}");
}

// ---- accessors ----

#[test]
fn retry_and_timeout_layers() {
    let c = parse(
        r#"
        [retry]
        max_attempts = 4
        [queues.emails]
        timeout = "1m"
        retry = { max_attempts = 8, cap = "1h" }
        [queues.other]
        [jobs.send_email]
        timeout = "10s"
        retry = { base = "5s" }
        "#,
    )
    .unwrap();
    let r = c.retry_for("emails", Some("send_email"));
    assert_eq!(
        (r.max_attempts, r.base, r.cap),
        (8, Duration::from_secs(5), Duration::from_secs(3600))
    );
    assert_eq!(r.factor, 2.0);
    assert_eq!(c.retry_for("other", None).max_attempts, 4);
    assert_eq!(
        c.retry_for("other", Some("send_email")).base,
        Duration::from_secs(5)
    );
    assert_eq!(c.retry_for("unknown", Some("unknown")), c.retry);
    assert_eq!(c.timeout_for("emails", None), Duration::from_secs(60));
    assert_eq!(
        c.timeout_for("emails", Some("send_email")),
        Duration::from_secs(10)
    );
    assert_eq!(c.timeout_for("other", Some("x")), Duration::from_secs(300));
    assert!(RetryOverride::default().is_empty());
}

#[test]
fn worker_id_defaults_to_host_and_pid() {
    let mut w = WorkerConfig::default();
    assert!(w.worker_id().ends_with(&format!("-{}", std::process::id())));
    w.id = Some("w1".into());
    assert_eq!(w.worker_id(), "w1");
}

// ---- validation ----

#[test]
fn error_display_reads_file_key_message() {
    let err = ConfigError {
        file: Some("config/dev.toml".into()),
        key: Some("queues.emails.concurrency".into()),
        message: "must be at least 1 (got 0)".into(),
    };
    assert_eq!(
        err.to_string(),
        "config/dev.toml: queues.emails.concurrency: must be at least 1 (got 0)"
    );
    assert_eq!(ConfigError::new("boom").to_string(), "boom");

    let file = temp_file("[queues.emails]\nconcurrency = 0\n");
    let c = { load(Some(file.path()), None).unwrap() };
    let err = c.validate(&memory_caps()).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{}: queues.emails.concurrency: must be at least 1 (got 0)",
            file.path().display()
        )
    );
}

#[test]
fn validation_points_into_the_profile() {
    let toml = "[profile.production.queues.emails]\nconcurrency = 0\nreserved = { low = 1 }\n";
    let c = from_toml_str(toml, Some("production")).unwrap();
    let err = c.validate(&memory_caps()).unwrap_err();
    assert_err(
        &err,
        "profile.production.queues.emails.concurrency",
        "at least 1",
    );
    let mut c = c;
    c.queues.get_mut("emails").unwrap().concurrency = 4;
    let err = c.validate(&memory_caps()).unwrap_err();
    assert_err(
        &err,
        "profile.production.queues.emails.reserved.low",
        "not served",
    );
}

#[test]
fn concurrency_must_be_positive() {
    let caps = memory_caps();
    assert_err(
        &invalid("[worker]\nconcurrency = 0", &caps),
        "worker.concurrency",
        "at least 1 (got 0)",
    );
    assert_err(
        &invalid("[queues.q]\nconcurrency = 0", &caps),
        "queues.q.concurrency",
        "at least 1 (got 0)",
    );
}

#[test]
fn reservations_leave_room() {
    let caps = memory_caps();
    let err = invalid(
        "[worker]\nconcurrency = 2\n[queues.q]\nweights = { high = 1, normal = 1 }\nreserved = { high = 3 }",
        &caps,
    );
    assert_err(&err, "queues.q.reserved", "worker.concurrency is 2");
    let err = invalid(
        "[queues.q]\nconcurrency = 4\nweights = { high = 1, normal = 1 }\nreserved = { high = 2, normal = 2 }",
        &caps,
    );
    assert_err(
        &err,
        "queues.q.reserved",
        "at least one must stay unreserved",
    );
    let err = invalid(
        "[queues.q]\nweights = { high = 1 }\nreserved = { low = 1 }",
        &caps,
    );
    assert_err(&err, "queues.q.reserved.low", "weights has high");
    let ok = parse(
        "[worker]\nconcurrency = 3\n[queues.a]\nweights = { high = 1, normal = 1 }\nreserved = { high = 2 }\n\
         [queues.b]\nweights = { high = 1, normal = 1 }\nreserved = { high = 2 }",
    )
    .unwrap();
    let notices = ok.validate(&caps).unwrap();
    assert!(
        notices
            .iter()
            .any(|n| n.starts_with("reserved: queues reserve 4 slots")),
        "{notices:?}"
    );
}

#[test]
fn weights_name_served_levels() {
    let caps = memory_caps();
    assert_err(
        &invalid("[queues.q]\nweights = {}", &caps),
        "queues.q.weights",
        "at least one level",
    );
    assert_err(
        &invalid("[queues.q]\nweights = { high = 0, normal = 1 }", &caps),
        "queues.q.weights.high",
        "at least 1 (got 0)",
    );
}

#[test]
fn batch_within_broker_limit() {
    assert_err(
        &invalid("[queues.q]\nbatch = 0", &memory_caps()),
        "queues.q.batch",
        "between 1 and 1000",
    );
    // The default batch (16) is over SQS's 10.
    let c = parse("[broker]\nkind = \"sqs\"\n").unwrap();
    let err = c.check(&sqs_caps()).unwrap_err();
    assert_err(
        &err,
        "queues.default.batch",
        "between 1 and 10, the most sqs handles per call (got 16)",
    );
}

#[test]
fn queue_names_are_checked() {
    let err = invalid("[queues.\"bad name\"]", &memory_caps());
    assert_err(&err, "queues.bad name", "letters, digits");
    let err = invalid("[queues.a__b]", &memory_caps());
    assert_err(&err, "queues.a__b", "reserved");
}

#[test]
fn retry_rules() {
    let caps = memory_caps();
    assert_err(
        &invalid("[retry]\nfactor = 0.5", &caps),
        "retry.factor",
        "at least 1.0 (got 0.5)",
    );
    assert_err(
        &invalid("[retry]\nfactor = nan", &caps),
        "retry.factor",
        "at least 1.0",
    );
    assert_err(
        &invalid("[retry]\nmax_attempts = 0", &caps),
        "retry.max_attempts",
        "at least 1",
    );
    assert_err(
        &invalid("[retry]\nbase = \"20m\"", &caps),
        "retry.base",
        "exceeds cap 10m",
    );
    assert_err(
        &invalid("[queues.q.retry]\nfactor = 0.9", &caps),
        "queues.q.retry.factor",
        "at least 1.0",
    );
    assert_err(
        &invalid("[jobs.j.retry]\nmax_attempts = 0", &caps),
        "jobs.j.retry.max_attempts",
        "at least 1",
    );
    // Base from the job, cap from the queue: the job's key is named, the other in the message.
    let err = invalid(
        "[queues.q.retry]\ncap = \"5s\"\n[jobs.j.retry]\nbase = \"10s\"",
        &caps,
    );
    assert_err(
        &err,
        "jobs.j.retry.base",
        "on queue q (the other is queues.q.retry.cap)",
    );
    let err = invalid("[queues.q.retry]\ncap = \"500ms\"", &caps);
    assert_err(&err, "queues.q.retry.cap", "the other is retry.base");
}

#[test]
fn lease_rules() {
    let err = invalid("[queues.q]\nlease = \"500ms\"", &memory_caps());
    assert_err(&err, "queues.q.lease", "at least 1s (got 500ms)");
    let c = parse("[broker]\nkind = \"sqs\"\n[queues.q]\nbatch = 10\nlease = \"13h\"").unwrap();
    let err = c.check(&sqs_caps()).unwrap_err();
    assert_err(
        &err,
        "queues.q.lease",
        "at most 12h, the longest lease sqs allows (got 13h)",
    );
    let c = parse(
        "[broker]\nkind = \"rabbitmq\"\nurl = \"amqp://localhost\"\n[queues.q]\ntimeout = \"1h\"\n\
         [jobs.long]\ntimeout = \"2h\"",
    )
    .unwrap();
    let notices = c.check(&rabbit_caps()).unwrap();
    assert!(
        notices.contains(
            &"queues.q.timeout: 1h exceeds the broker's session limit of 30m: jobs longer than 30m \
              risk the broker dropping the consumer"
                .to_string()
        ),
        "{notices:?}"
    );
    assert!(
        notices
            .iter()
            .any(|n| n.starts_with("jobs.long.timeout: 2h")),
        "{notices:?}"
    );
}

fn configure(toml: &str) -> Result<crate::backend::Configured, ConfigError> {
    crate::backend::Backends::builtin().configure(&parse(toml)?)
}

#[test]
fn broker_rules() {
    let err = configure("[broker]\nkind = \"kafka\"").unwrap_err();
    if cfg!(feature = "kafka") {
        assert_err(&err, "broker.bootstrap", "required");
    } else {
        assert_err(
            &err,
            "broker.kind",
            "build the stevedore crate with feature \"kafka\"",
        );
    }
    let sqs = configure("[broker]\nkind = \"sqs\"\nregion = \"eu-west-1\"");
    if cfg!(feature = "sqs") {
        let b = sqs.expect("sqs with a region is valid");
        assert_eq!(b.capabilities().max_batch, 10);
        let err = configure("[broker]\nkind = \"sqs\"").unwrap_err();
        assert_err(&err, "broker.region", "required");
    } else {
        assert_err(
            &sqs.unwrap_err(),
            "broker.kind",
            "build the stevedore crate with feature \"sqs\"",
        );
    }
    let err = configure("[broker]\nkind = \"\"").unwrap_err();
    assert_err(&err, "broker.kind", "unknown broker kind \"\"");

    for (kind, url, feature) in [
        ("rabbitmq", "amqp://localhost", cfg!(feature = "rabbitmq")),
        ("redis", "redis://localhost", cfg!(feature = "redis")),
    ] {
        let toml = format!("[broker]\nkind = \"{kind}\"\nurl = \"{url}\"\nmax_payload = 10");
        match configure(&toml) {
            Ok(b) => {
                assert!(feature);
                assert_eq!(b.kind(), kind);
                assert_eq!(b.capabilities().max_payload, 10, "{kind} takes max_payload");
            }
            Err(err) => {
                assert!(!feature, "{err}");
                assert_err(
                    &err,
                    "broker.kind",
                    &format!("build the stevedore crate with feature \"{kind}\""),
                );
            }
        }
    }
    if cfg!(feature = "redis") {
        let err = configure("[broker]\nkind = \"redis\"\nurl = \"http://:pw@x\"").unwrap_err();
        assert_err(&err, "broker.url", "must start with redis:// or rediss://");
        assert!(
            !err.to_string().contains("pw"),
            "the password is redacted: {err}"
        );
        let err = configure("[broker]\nkind = \"redis\"").unwrap_err();
        assert_err(
            &err,
            "broker.url",
            "required for kind = \"redis\", e.g. url = \"redis://localhost:6379/0\" (or set STEVEDORE_BROKER__URL)",
        );
        let err =
            configure("[broker]\nkind = \"redis\"\nurl = \"redis://x\"\nurll = 1").unwrap_err();
        assert_err(
            &err,
            "broker.urll",
            "not a setting of the redis broker; it takes url, cluster, key_prefix, max_payload",
        );
    }
    let err = configure("[broker]\nkind = \"memory\"\nmax_payload = 0").unwrap_err();
    assert_err(&err, "broker.max_payload", "at least 1");
    let err = configure("[broker]\nkind = \"memory\"\nmax_payload = \"big\"").unwrap_err();
    assert_err(&err, "broker.max_payload", "invalid type");
    let err = configure("[broker]\nkind = \"memory\"\ncolour = \"blue\"").unwrap_err();
    assert_err(
        &err,
        "broker.colour",
        "not a setting of the memory broker; it takes max_payload",
    );
    if cfg!(feature = "sqlite") {
        // The default kind: no key needed; its keys are checked like any backend's.
        let b = configure("").expect("an empty config runs on sqlite");
        assert_eq!(b.kind(), "sqlite");
        assert!(b.capabilities().shared && b.capabilities().durable);
        let err = configure("[broker]\ndurability = \"fast\"").unwrap_err();
        assert_err(
            &err,
            "broker.durability",
            "\"fast\" is not a durability; allowed: \"full\", \"normal\"",
        );
        let err = configure("[broker]\npath = \"\"").unwrap_err();
        assert_err(&err, "broker.path", "must not be empty");
    }

    // A key only another registered backend takes is ignored with a notice (profiles switch kinds).
    let memory = configure("[broker]\nkind = \"memory\"\nurl = \"redis://x\"\nkey_prefix = \"p\"");
    if cfg!(any(feature = "redis", feature = "rabbitmq")) {
        let notices = memory.unwrap().notices().to_vec();
        assert!(notices.contains(&"broker.url: ignored by the memory broker".to_string()));
        assert!(notices.contains(&"broker.key_prefix: ignored by the memory broker".to_string()));
    } else {
        // serde reports the first unknown key in key order.
        assert_err(
            &memory.unwrap_err(),
            "broker.key_prefix",
            "not a setting of the memory broker",
        );
    }
}

#[test]
fn autoscale_rules() {
    let caps = memory_caps();
    assert_err(
        &invalid("[autoscale]\nmin_workers = 5\nmax_workers = 2", &caps),
        "autoscale.min_workers",
        "must not exceed autoscale.max_workers (5 > 2)",
    );
    assert_err(
        &invalid("[autoscale]\ntarget_per_worker = 0", &caps),
        "autoscale.target_per_worker",
        "at least 1",
    );
    assert_err(
        &invalid("[worker]\npoll_wait = \"0s\"", &caps),
        "worker.poll_wait",
        "more than 0",
    );
    assert_err(
        &invalid("[queues.q]\ntimeout = \"0s\"", &caps),
        "queues.q.timeout",
        "more than 0",
    );
    assert_err(
        &invalid("[queues.q]\nmax_depth = 0", &caps),
        "queues.q.max_depth",
        "no limit",
    );
    assert_err(
        &invalid("[queues.q]\ndefault_job = \"\"", &caps),
        "queues.q.default_job",
        "must name a job",
    );
}

#[test]
fn notices_describe_emulation() {
    let c = parse(
        "[queues.q]\nbatch = 10\nweights = { high = 3, normal = 1 }\nmax_depth = 10\n\
         [queues.s]\nbatch = 10\nmode = \"strict\"\nweights = { normal = 1, low = 1 }",
    )
    .unwrap();
    let notices = c.check(&sqs_caps()).unwrap();
    for want in [
        "priority: queue q: separate queues per level (high, normal) with weighted-fair fetching (3:1)",
        "priority: queue s: separate queues per level (normal, low) with strict fetching (lower levels age after 30s)",
        "delay: native up to 15m, longer delays hop",
        "max_depth: producers check depths up to 1m stale on sqlite, so a queue may overshoot briefly",
    ] {
        assert!(notices.contains(&want.to_string()), "missing {want:?} in {notices:?}");
    }
    let mut c = c;
    c.broker = BrokerConfig {
        kind: "rabbitmq".into(),
        settings: BTreeMap::from([("url".into(), "amqp://localhost".into())]),
    };
    let notices = c.check(&rabbit_caps()).unwrap();
    assert!(notices
        .iter()
        .any(|n| n.starts_with("delay: emulated on rabbitmq via its durable delay store")));
}

// ---- redaction ----

#[test]
fn urls_are_redacted() {
    assert_eq!(
        redact_url("redis://:s3cret@host:6379/0"),
        "redis://:***@host:6379/0"
    );
    assert_eq!(
        redact_url("amqp://guest:guest@host/"),
        "amqp://guest:***@host/"
    );
    assert_eq!(
        redact_url("amqps://app:p/ss@word@host:5671/%2f"),
        "amqps://app:***@host:5671/%2f"
    );
    assert_eq!(redact_url("redis://token@host"), "redis://***@host");
    assert_eq!(redact_url("redis://host:6379/0"), "redis://host:6379/0");
    assert_eq!(
        redact_url("kafka-1:9092,kafka-2:9092"),
        "kafka-1:9092,kafka-2:9092"
    );
    assert_eq!(redact_url("user:pw@host:9092"), "user:***@host:9092");
    assert_eq!(
        redact_url("https://host/q?Password=x&region=eu&api_token=y#frag"),
        "https://host/q?Password=***&region=eu&api_token=***#frag"
    );
}

#[test]
fn redacted_config_hides_secrets_and_round_trips() {
    let c = parse(
        r#"
        [broker]
        url = "redis://:s3cret@host:6379/0"
        [queues.emails]
        weights = { high = 3, normal = 1 }
        reserved = { high = 1 }
        retry = { max_attempts = 3 }
        [jobs.send_email]
        timeout = "2m"
        "#,
    )
    .unwrap();
    let shown = c.redacted();
    assert!(!shown.contains("s3cret"), "{shown}");
    assert!(
        shown.contains("url = \"redis://:***@host:6379/0\""),
        "{shown}"
    );
    assert!(
        shown.contains("weights = { high = 3, normal = 1 }"),
        "{shown}"
    );
    assert!(shown.contains("[queues.emails]"), "{shown}");
    let back = parse(&shown).unwrap();
    assert_eq!(
        back.broker.settings["url"],
        serde_json::Value::from("redis://:***@host:6379/0")
    );
    let mut expected = c.clone();
    expected
        .broker
        .settings
        .insert("url".into(), back.broker.settings["url"].clone());
    assert_eq!(back, expected, "{shown}");

    // The implicit default queue is shown.
    let shown = parse("").unwrap().redacted();
    assert!(shown.contains("[queues.default]"), "{shown}");
    assert_eq!(
        parse(&shown).unwrap().effective_queues(),
        Config::default().effective_queues()
    );
}

// ---- the shipped files ----

const FILES: [(&str, &str); 5] = [
    ("default.toml", include_str!("../../../config/default.toml")),
    ("redis.toml", include_str!("../../../config/redis.toml")),
    (
        "rabbitmq.toml",
        include_str!("../../../config/rabbitmq.toml"),
    ),
    ("sqs.toml", include_str!("../../../config/sqs.toml")),
    ("kafka.toml", include_str!("../../../config/kafka.toml")),
];

#[test]
fn shipped_files_parse() {
    for (name, text) in FILES {
        let c = from_toml_str(text, None).unwrap_or_else(|e| panic!("{name}: {e}"));
        let caps = match c.broker.kind.as_str() {
            "memory" => memory_caps(),
            "sqs" => sqs_caps(),
            _ => rabbit_caps(),
        };
        // Valid apart from the backend not being in this build (yet).
        c.check(&caps).unwrap_or_else(|e| panic!("{name}: {e}"));
        match crate::backend::Backends::builtin().configure(&c) {
            Ok(b) => assert_eq!(b.kind(), c.broker.kind),
            Err(err) if err.message.contains("not yet available") => {
                assert!(text.contains("NOT YET AVAILABLE IN THIS BUILD"), "{name}")
            }
            Err(err) => assert!(err.message.contains("with feature"), "{name}: {err}"),
        }
    }
}

#[test]
fn default_file_validates_and_documents_the_defaults() {
    let text = FILES[0].1;
    let broker = MemoryBroker::new();
    let c = from_toml_str(text, None).unwrap();
    let notices = c.validate(broker.capabilities()).unwrap();
    assert!(
        notices
            .iter()
            .any(|n| n.starts_with("priority: queue emails")),
        "{notices:?}"
    );
    // Every value the file writes for a section with defaults is that default.
    assert_eq!(c.broker, BrokerConfig::default());
    assert_eq!(c.worker, WorkerConfig::default());
    assert_eq!(c.http, HttpConfig::default());
    assert_eq!(c.retry, RetryConfig::default());
    assert_eq!(c.autoscale, AutoscaleConfig::default());
    assert_eq!(c.queues["default"], QueueConfig::default());
    assert!(c.queues["emails"].reserved.contains_key(&Priority::High));
    assert_eq!(c.jobs.len(), 1);
    // Every key of every table is mentioned (set or commented out).
    let shown = Config::default().redacted();
    for line in shown.lines().filter(|l| l.contains(" = ")) {
        let key = line.split(" = ").next().unwrap();
        assert!(
            text.contains(&format!("{key} = ")) || text.contains(&format!(".{key}]")),
            "default.toml does not document {key}"
        );
    }
    for key in [
        "id",
        "max_payload",
        "default_job",
        "max_depth",
        "idempotent",
        "track_status",
        "url",
    ] {
        assert!(
            text.contains(&format!("# {key} = ")),
            "default.toml does not document {key}"
        );
    }

    let prod = from_toml_str(text, Some("production")).unwrap();
    assert_eq!(prod.worker.concurrency, 200);
    prod.validate(broker.capabilities()).unwrap();
}

// ---- the dashboard's settings ----

#[test]
fn dashboard_token_is_checked_hidden_and_open_actions_are_noted() {
    let caps = memory_caps();
    assert_err(
        &invalid("[http]\ntoken = \" \"\n", &caps),
        "http.token",
        "is empty",
    );
    assert_err(
        &invalid("[http]\ntoken = \"short\"\n", &caps),
        "http.token",
        "16 characters",
    );
    assert_err(
        &invalid("[http]\ntoken = \"0123456789abcdef; x\"\n", &caps),
        "http.token",
        "letters, digits",
    );
    let c = parse("[http]\ntoken = \"0123456789abcdef-secret\"\n").unwrap();
    c.validate(&caps).unwrap();
    let shown = c.redacted();
    assert!(!shown.contains("0123456789abcdef"), "{shown}");
    assert!(shown.contains("token = \"***\""), "{shown}");
    assert!(!format!("{c:?}").contains("0123456789abcdef"));

    let open = parse("[http]\nbind = \"0.0.0.0:9464\"\n").unwrap();
    let notes = open.validate(&caps).unwrap();
    assert!(
        notes
            .iter()
            .any(|n| n.contains("open to anyone who reaches 0.0.0.0:9464")),
        "{notes:?}"
    );
    for safe in [
        "[http]\nbind = \"0.0.0.0:9464\"\nread_only = true\n",
        "[http]\nbind = \"0.0.0.0:9464\"\ntoken = \"0123456789abcdef\"\n",
        "[http]\nbind = \"0.0.0.0:9464\"\nui = false\n",
        "",
    ] {
        let notes = parse(safe).unwrap().validate(&caps).unwrap();
        assert!(
            !notes.iter().any(|n| n.starts_with("http:")),
            "{safe}: {notes:?}"
        );
    }
}

#[test]
fn schedules_are_checked_with_the_key_at_fault() {
    let ok = parse(
        "[queues.reports]\nweights = { normal = 1, high = 1 }\n\
         [schedules.nightly]\njob = \"report\"\nqueue = \"reports\"\ncron = \"0 30 3 * * *\"\n\
         timezone = \"Europe/Berlin\"\npriority = \"high\"\npayload = { kind = \"daily\" }\n",
    )
    .unwrap();
    ok.validate(&memory_caps()).unwrap();
    let s = &ok.schedules["nightly"];
    assert_eq!(s.payload, serde_json::json!({"kind": "daily"}));
    assert_eq!(s.catch_up, CatchUp::Skip);
    assert!(ok.needs_store().is_some());

    let check = |toml: &str| parse(toml).unwrap().validate(&memory_caps()).unwrap_err();
    let e = check("[schedules.a]\njob = \"j\"\ncron = \"99 * * * *\"\n");
    assert_err(&e, "schedules.a.cron", "not a cron pattern");
    let e = check("[schedules.a]\njob = \"j\"\n");
    assert_err(&e, "schedules.a.cron", "every = \"30s\"");
    let e = check("[schedules.a]\njob = \"j\"\nevery = \"1s\"\nqueue = \"nope\"\n");
    assert_err(
        &e,
        "schedules.a.queue",
        "not a queue of this config; queues: default",
    );
    let e = check("[schedules.a]\njob = \"j\"\nevery = \"1s\"\npriority = \"low\"\n");
    assert_err(&e, "schedules.a.priority", "does not serve level low");
    let e = check("[schedules.a]\nevery = \"1s\"\n");
    assert_err(&e, "schedules.a.job", "missing");
    let e = check("[schedules.\"a.b\"]\njob = \"j\"\nevery = \"1s\"\n");
    assert_err(&e, "schedules.a.b", "letters");
    let e = parse("[schedules.a]\njob = \"j\"\nevry = \"1s\"\n").unwrap_err();
    assert_err(&e, "schedules.a.evry", "every");
    let e = parse("[schedules.a]\njob = \"j\"\nevery = \"1s\"\ncatch_up = \"all\"\n").unwrap_err();
    assert_err(&e, "schedules.a.catch_up", "skip");
    // A disabled schedule needs no store.
    let off = parse("[schedules.a]\njob = \"j\"\nevery = \"1s\"\nenabled = false\n").unwrap();
    assert_eq!(off.needs_store(), None);
}

#[test]
fn a_schedule_on_a_broker_without_a_store_asks_for_one() {
    use crate::backend::Backends;
    let toml = "[broker]\nkind = \"memory\"\n[schedules.tick]\njob = \"j\"\nevery = \"10s\"\n";
    // The memory broker serves as its own store.
    let cfg = parse(toml).unwrap();
    let b = Backends::builtin().configure(&cfg).unwrap();
    assert!(b.has_store());
    assert!(
        b.notices().iter().any(|n| n.starts_with("store: memory")),
        "{:?}",
        b.notices()
    );
    // A broker that holds no state (an application's own, here) needs [store].
    let supplied = crate::backend::Configured::supplied(Arc::new(MemoryBroker::new()), &cfg);
    let e = supplied
        .with_store_from(&Backends::builtin(), &cfg)
        .unwrap_err();
    assert_err(&e, "schedules.tick", "needs a shared state store");
    assert!(e.message.contains("add [store] with kind"), "{e}");
    // Named: fine; unknown kinds and keys are refused with what is allowed.
    let named = parse(&format!("{toml}[store]\nkind = \"memory\"\n")).unwrap();
    assert!(
        crate::backend::Configured::supplied(Arc::new(MemoryBroker::new()), &named)
            .with_store_from(&Backends::builtin(), &named)
            .unwrap()
            .has_store()
    );
    let e = Backends::builtin()
        .configure(&parse(&format!("{toml}[store]\nkind = \"mongo\"\n")).unwrap())
        .unwrap_err();
    assert_err(&e, "store.kind", "this build has \"memory\"");
    let e = Backends::builtin()
        .configure(&parse(&format!("{toml}[store]\nurl = \"redis://x\"\n")).unwrap())
        .unwrap_err();
    assert_err(&e, "store.url", "no kind");
    let e = Backends::builtin()
        .configure(
            &parse(&format!(
                "{toml}[store]\nkind = \"sqlite\"\nfile = \"x.db\"\n"
            ))
            .unwrap(),
        )
        .unwrap_err();
    assert_err(&e, "store.file", "not a setting of the sqlite store");
}

#[test]
fn rates_and_concurrency_limits_are_checked() {
    let cfg = parse(
        "[queues.q]\nrate = \"50/s\"\nburst = 10\nmax_concurrent = 4\n\
         [jobs.j]\nrate = \"5/10s\"\nmax_concurrent = 1\n",
    )
    .unwrap();
    cfg.validate(&memory_caps()).unwrap();
    let q = &cfg.queues["q"];
    assert_eq!(
        q.rate,
        Some(Rate {
            count: 50,
            per: Duration::from_secs(1)
        })
    );
    assert_eq!((q.burst, q.max_concurrent), (Some(10), Some(4)));
    assert_eq!(
        cfg.jobs["j"].rate.map(|r| r.to_string()).as_deref(),
        Some("5/10s")
    );
    assert_eq!(cfg.needs_store().as_deref(), Some("jobs.j.rate"));
    for (toml, key, says) in [
        ("[queues.q]\nrate = \"fast\"\n", "queues.q.rate", "\"50/s\""),
        (
            "[queues.q]\nrate = \"0/s\"\n",
            "queues.q.rate",
            "at least 1 job",
        ),
        (
            "[jobs.j]\nrate = \"10 per second\"\n",
            "jobs.j.rate",
            "not a rate",
        ),
    ] {
        assert_err(&parse(toml).unwrap_err(), key, says);
    }
    let check = |toml: &str| parse(toml).unwrap().validate(&memory_caps()).unwrap_err();
    assert_err(
        &check("[queues.q]\nburst = 5\n"),
        "queues.q.burst",
        "set rate too",
    );
    assert_err(
        &check("[jobs.j]\nrate = \"1/s\"\nburst = 0\n"),
        "jobs.j.burst",
        "at least 1",
    );
    assert_err(
        &check("[jobs.j]\nmax_concurrent = 0\n"),
        "jobs.j.max_concurrent",
        "at least 1",
    );
}

#[test]
fn idempotent_and_track_status_take_true_false_or_a_window() {
    let cfg = parse(
        "[queues.q]\nidempotent = true\ntrack_status = \"7d\"\n\
         [queues.r]\n\
         [jobs.a]\nidempotent = false\n\
         [jobs.b]\nidempotent = \"30m\"\n",
    )
    .unwrap();
    cfg.validate(&memory_caps()).unwrap();
    let day = Duration::from_secs(24 * 3600);
    assert_eq!(
        cfg.idempotent_for("q", "other"),
        Some(day),
        "true keeps 24 h"
    );
    assert_eq!(cfg.idempotent_for("q", "a"), None, "a job turns it off");
    assert_eq!(
        cfg.idempotent_for("r", "b"),
        Some(Duration::from_secs(1800)),
        "a job turns it on anywhere"
    );
    assert_eq!(cfg.idempotent_for("r", "other"), None);
    assert_eq!(cfg.status_for("q"), Some(7 * day));
    assert_eq!(cfg.status_for("r"), None, "off by default");
    assert_eq!(cfg.needs_store().as_deref(), Some("jobs.b.idempotent"));
    assert_eq!(
        parse("[queues.q]\ntrack_status = true\n")
            .unwrap()
            .needs_store()
            .as_deref(),
        Some("queues.q.track_status")
    );
    assert_eq!(
        parse("[queues.q]\ntrack_status = false\n")
            .unwrap()
            .needs_store(),
        None
    );
    for (toml, key, says) in [
        (
            "[queues.q]\nidempotent = \"often\"\n",
            "queues.q.idempotent",
            "true, false or how long",
        ),
        (
            "[queues.q]\ntrack_status = \"0s\"\n",
            "queues.q.track_status",
            "from 1s to 10 years",
        ),
        (
            "[queues.q]\nidempotent = \"11 years\"\n",
            "queues.q.idempotent",
            "from 1s to 10 years",
        ),
        (
            "[jobs.j]\nidempotent = 3\n",
            "jobs.j.idempotent",
            "true, false or how long",
        ),
    ] {
        assert_err(&parse(toml).unwrap_err(), key, says);
    }
}

#[test]
fn a_queue_whose_broker_counts_a_shutdown_release_is_named_at_start() {
    let c =
        parse("[broker]\nkind = \"sqs\"\n[queues.orders]\nbatch = 10\n[queues.mail]\nbatch = 10")
            .unwrap();
    let fifo = Capabilities {
        uncounted_release: false,
        ..sqs_caps()
    };
    let notices = c
        .check_with(&sqs_caps(), &|q| {
            if q == "orders" {
                fifo.clone()
            } else {
                sqs_caps()
            }
        })
        .unwrap();
    let named: Vec<&String> = notices
        .iter()
        .filter(|n| n.contains("given back at a shutdown"))
        .collect();
    assert_eq!(named.len(), 1, "{notices:?}");
    assert!(named[0].starts_with("queues.orders: "), "{named:?}");
}

#[test]
fn a_retry_level_must_be_served_by_every_queue_it_applies_to() {
    // Set on the queue: served, so accepted, and named at start.
    let c = parse(
        "[queues.mail]\nweights = { high = 1, normal = 3 }\nretry = { level = \"high\" }\n\
         [queues.orders]\n",
    )
    .unwrap();
    assert_eq!(c.retry_for("mail", None).level, Some(Priority::High));
    assert_eq!(c.retry_for("orders", None).level, None);
    let notices = c.validate(&memory_caps()).unwrap();
    assert!(
        notices
            .iter()
            .any(|n| n == "queues.mail: retries go to level high after their backoff (retry.level)"),
        "{notices:?}"
    );

    // Not served by the queue that sets it.
    let c = parse("[queues.mail]\nretry = { level = \"high\" }\n").unwrap();
    let err = c.validate(&memory_caps()).unwrap_err();
    assert_err(&err, "queues.mail.retry.level", "does not serve");
    assert!(err.to_string().contains("its weights have normal"), "{err}");

    // Set for every queue in [retry]: each queue must serve it; the error names [retry].
    let c = parse(
        "[retry]\nlevel = \"low\"\n[queues.mail]\nweights = { normal = 1, low = 1 }\n\
         [queues.orders]\n",
    )
    .unwrap();
    assert_err(
        &c.validate(&memory_caps()).unwrap_err(),
        "retry.level",
        "queue orders does not serve",
    );

    // Set for a job, which may run on any queue: the job's table is named.
    let c = parse(
        "[queues.mail]\nweights = { high = 1, normal = 1 }\n[queues.orders]\n\
         [jobs.send]\nretry = { level = \"high\" }\n",
    )
    .unwrap();
    assert_err(
        &c.validate(&memory_caps()).unwrap_err(),
        "jobs.send.retry.level",
        "queue orders does not serve",
    );
    assert_eq!(
        c.retry_for("mail", Some("send")).level,
        Some(Priority::High)
    );

    // Not a level at all.
    assert!(parse("[queues.mail]\nretry = { level = \"urgent\" }\n").is_err());
}
