//! Environment overrides (`STEVEDORE_*`, `STEVEDORE_PROFILE`, `STEVEDORE_CONFIG`): the one test
//! that sets process environment variables, in a binary of its own so that no other test loads a
//! config while they are set.
#![allow(clippy::unwrap_used)]

use std::io::Write as _;
use std::time::Duration;
use stevedore::backend::Backends;
use stevedore::config::{load, ConfigError};
use stevedore::{Broker, MemoryBroker};

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

#[test]
fn environment_overrides_everything() {
    // A guard removes the variables, however the test ends.
    struct Vars(Vec<&'static str>);
    impl Vars {
        fn set(&mut self, k: &'static str, v: &str) {
            std::env::set_var(k, v);
            self.0.push(k);
        }
    }
    impl Drop for Vars {
        fn drop(&mut self) {
            for k in &self.0 {
                std::env::remove_var(k);
            }
        }
    }
    let file = temp_file(
        r#"
        [worker]
        concurrency = 8
        [queues.emails]
        concurrency = 4
        [profile.production.worker]
        concurrency = 200
        shutdown_timeout = "2m"
        "#,
    );
    let path = file.path().display().to_string();
    let mut vars = Vars(Vec::new());
    vars.set("STEVEDORE_CONFIG", &path);
    vars.set("STEVEDORE_PROFILE", "production");
    vars.set("STEVEDORE_WORKER__CONCURRENCY", "12");
    vars.set("STEVEDORE_QUEUES__EMAILS__BATCH", "4");
    vars.set("STEVEDORE_RETRY__BASE", "250ms");
    vars.set("STEVEDORE_LOG", "debug"); // not a config key: no "__"

    let c = load(None, None).unwrap();
    assert_eq!(c.source.as_deref(), Some(path.as_str()));
    assert_eq!(c.profile.as_deref(), Some("production"));
    assert_eq!(c.worker.concurrency, 12);
    assert_eq!(c.worker.shutdown_timeout, Duration::from_secs(120));
    assert_eq!(c.queues["emails"].batch, 4);
    assert_eq!(c.queues["emails"].concurrency, 4);
    assert_eq!(c.retry.base, Duration::from_millis(250));
    assert_eq!(
        c.origins.get("worker.concurrency").map(String::as_str),
        Some("STEVEDORE_WORKER__CONCURRENCY")
    );
    assert!(c
        .redacted()
        .contains("# from STEVEDORE_WORKER__CONCURRENCY"));

    // An explicit profile beats STEVEDORE_PROFILE; a missing one names the variable.
    let c = load(Some(file.path()), Some("production")).unwrap();
    assert_eq!(c.worker.shutdown_timeout, Duration::from_secs(120));
    vars.set("STEVEDORE_PROFILE", "nope");
    let err = load(None, None).unwrap_err();
    assert!(err.message.contains("(from STEVEDORE_PROFILE)"), "{err}");
    vars.set("STEVEDORE_PROFILE", "production");

    // Validation blames the variable, not the file.
    vars.set("STEVEDORE_QUEUES__EMAILS__CONCURRENCY", "0");
    let err = load(None, None)
        .unwrap()
        .validate(MemoryBroker::new().capabilities())
        .unwrap_err();
    assert_eq!(err.file, None);
    assert_err(
        &err,
        "STEVEDORE_QUEUES__EMAILS__CONCURRENCY",
        "at least 1 (got 0)",
    );
    vars.set("STEVEDORE_QUEUES__EMAILS__CONCURRENCY", "4");

    // Unknown keys and bad values in the environment name the variable.
    vars.set("STEVEDORE_WORKER__CONCURENCY", "3");
    let err = load(None, None).unwrap_err();
    assert_eq!(err.file, None);
    assert_err(
        &err,
        "STEVEDORE_WORKER__CONCURENCY",
        "allowed keys: id, concurrency",
    );
    std::env::remove_var("STEVEDORE_WORKER__CONCURENCY");
    vars.set("STEVEDORE_BROKER__KIND", "mongo");
    let c = load(None, None).unwrap();
    let err = Backends::builtin().configure(&c).unwrap_err();
    assert_eq!(err.file, None);
    assert_err(&err, "STEVEDORE_BROKER__KIND", "this build has \"memory\"");
    vars.set("STEVEDORE_BROKER__KIND", "memory");
    vars.set("STEVEDORE_BROKER__MAX_PAYLOAD", "0");
    let c = load(None, None).unwrap();
    let err = Backends::builtin().configure(&c).unwrap_err();
    assert_err(&err, "STEVEDORE_BROKER__MAX_PAYLOAD", "at least 1");
    std::env::remove_var("STEVEDORE_BROKER__MAX_PAYLOAD");
    std::env::remove_var("STEVEDORE_BROKER__KIND");

    // STEVEDORE_CONFIG naming a missing file is an error naming it.
    vars.set("STEVEDORE_CONFIG", "/nonexistent/stevedore.toml");
    let err = load(None, None).unwrap_err();
    assert_eq!(err.file.as_deref(), Some("/nonexistent/stevedore.toml"));
    assert!(err.message.contains("STEVEDORE_CONFIG"), "{err}");
}
