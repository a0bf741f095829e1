//! `broker.kind = "kafka"`: the settings of `[broker]` and the factory the worker's registry holds.

use crate::{capabilities, KafkaBroker, KafkaConfig, DEFAULT_MAX_PAYLOAD};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use stevedore_core::factory::{
    size_setting, BackendFactory, BackendSetup, ConnectContext, Settings, SettingsError,
};
use stevedore_core::{async_trait, Broker, BrokerError, Capabilities};

/// The factory of `broker.kind = "kafka"`. Keys of `[broker]`:
///
/// | key | default | meaning |
/// |---|---|---|
/// | `bootstrap` | required | `bootstrap.servers`, e.g. `"127.0.0.1:9092"` or `"b1:9092,b2:9092"` |
/// | `key_prefix` | `""` | prepended to every topic name (letters, digits, `.`, `_`, `-`) |
/// | `group_prefix` | `key_prefix` | prepended to every consumer group id |
/// | `partitions` | `6` | partitions of each topic Stevedore creates (no more workers get work on a queue level than it has partitions) |
/// | `replication` | broker default | replication factor of each topic Stevedore creates |
/// | `max_payload` | 934,464 | largest payload accepted at publish, in bytes |
/// | `session_timeout` | `"10s"` | how long a silent worker keeps its partitions (and the jobs on them) before the group gives them to others |
/// | `drain` | `"2s"` | how long a worker losing partitions in a rebalance waits for their running jobs' acks |
/// | `timeout` | `"30s"` | longest any broker call may take |
/// | `properties` | none | extra librdkafka properties for every client, e.g. `{ "security.protocol" = "SASL_SSL", "sasl.mechanism" = "PLAIN" }`; values of keys naming a password, secret or key never appear in logs or `config check` |
#[derive(Clone, Copy, Debug, Default)]
pub struct KafkaFactory;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KafkaSettings {
    bootstrap: Option<String>,
    key_prefix: Option<String>,
    group_prefix: Option<String>,
    partitions: Option<i64>,
    replication: Option<i64>,
    max_payload: Option<u64>,
    #[serde(default, with = "humantime_serde::option")]
    session_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde::option")]
    drain: Option<Duration>,
    #[serde(default, with = "humantime_serde::option")]
    timeout: Option<Duration>,
    properties: Option<BTreeMap<String, String>>,
}

#[derive(Debug)]
struct KafkaSetup {
    config: KafkaConfig,
}

/// Properties this backend sets itself; overriding them would break its guarantees.
const OWN_PROPERTIES: &[&str] = &[
    "bootstrap.servers",
    "group.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "acks",
];

fn topic_chars(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

impl BackendFactory for KafkaFactory {
    fn kind(&self) -> &'static str {
        "kafka"
    }

    fn keys(&self) -> &'static [&'static str] {
        &[
            "bootstrap",
            "key_prefix",
            "group_prefix",
            "partitions",
            "replication",
            "max_payload",
            "session_timeout",
            "drain",
            "timeout",
            "properties",
        ]
    }

    fn configure(&self, settings: &Settings) -> Result<Box<dyn BackendSetup>, SettingsError> {
        let s: KafkaSettings = settings.parse()?;
        let bootstrap = match s.bootstrap {
            Some(b) if !b.trim().is_empty() => b,
            _ => {
                return Err(SettingsError::at(
                    "bootstrap",
                    "required for kind = \"kafka\", e.g. bootstrap = \"127.0.0.1:9092\"",
                ))
            }
        };
        if let Some(bad) = bootstrap.split(',').map(str::trim).find(|hp| {
            hp.rsplit_once(':')
                .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
        }) {
            return Err(SettingsError::at(
                "bootstrap",
                format!("each server is host:port, got {bad:?}"),
            ));
        }
        let mut config = KafkaConfig::new(bootstrap);
        config.key_prefix = s.key_prefix.unwrap_or_default();
        if !topic_chars(&config.key_prefix) {
            return Err(SettingsError::at(
                "key_prefix",
                "may contain only ASCII letters, digits, '.', '_' and '-' (Kafka topic names)",
            ));
        }
        config.group_prefix = s.group_prefix;
        if let Some(p) = s.partitions {
            config.partitions = i32::try_from(p)
                .ok()
                .filter(|p| (1..=10_000).contains(p))
                .ok_or_else(|| SettingsError::at("partitions", "must be 1 to 10000"))?;
        }
        if let Some(r) = s.replication {
            config.replication = i32::try_from(r)
                .ok()
                .filter(|r| *r == -1 || (1..=100).contains(r))
                .ok_or_else(|| {
                    SettingsError::at(
                        "replication",
                        "must be 1 to 100, or -1 for the broker's default",
                    )
                })?;
        }
        config.max_payload = size_setting("max_payload", s.max_payload, DEFAULT_MAX_PAYLOAD)?;
        for (key, value, min) in [
            ("session_timeout", s.session_timeout, Duration::from_secs(1)),
            ("timeout", s.timeout, Duration::from_secs(1)),
        ] {
            if let Some(v) = value {
                if v < min {
                    return Err(SettingsError::at(key, "must be at least 1s"));
                }
            }
        }
        if let Some(v) = s.session_timeout {
            config.session_timeout = v;
        }
        if let Some(v) = s.timeout {
            config.timeout = v;
        }
        if let Some(v) = s.drain {
            config.drain = v;
        }
        for (k, _) in s.properties.iter().flatten() {
            if OWN_PROPERTIES.contains(&k.as_str()) {
                return Err(SettingsError::at(
                    format!("properties.{k}"),
                    "is set by the backend itself (see the bootstrap and group_prefix keys)",
                ));
            }
        }
        config.properties = s.properties.unwrap_or_default();
        Ok(Box::new(KafkaSetup { config }))
    }
}

#[async_trait]
impl BackendSetup for KafkaSetup {
    fn capabilities(&self) -> Capabilities {
        capabilities(&self.config)
    }

    fn notices(&self) -> Vec<String> {
        let c = &self.config;
        vec![
            format!(
                "kafka: bootstrap {}, {} partitions per topic, groups {}<queue>, properties {:?}",
                c.bootstrap,
                c.partitions,
                c.group_prefix.as_deref().unwrap_or(&c.key_prefix),
                crate::redacted(&c.properties)
            ),
            "kafka: each queue level's partitions are shared out among the workers' group \
             members: no more workers get work on a level than it has partitions; a released \
             job comes back to its partition's owner"
                .into(),
            "kafka: delayed jobs and retry backoff wait in tiered delay topics per queue level \
             (<topic>.delay-0s/1s/5s/30s/5m/1h), moved on by the workers of that level when due \
             (never early; about 1 s late at most in steady state, up to the group handoff while \
             workers start or stop)"
                .into(),
        ]
    }

    async fn connect(&self, _ctx: &ConnectContext) -> Result<Arc<dyn Broker>, BrokerError> {
        Ok(Arc::new(KafkaBroker::connect(self.config.clone()).await?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn configure(
        pairs: &[(&str, serde_json::Value)],
    ) -> Result<Box<dyn BackendSetup>, SettingsError> {
        KafkaFactory.configure(&Settings::from_toml_like(pairs.iter().cloned()))
    }

    #[test]
    fn settings_errors_name_the_key() {
        assert_eq!(
            configure(&[]).unwrap_err().key.as_deref(),
            Some("bootstrap")
        );
        let at = |pairs: &[(&str, serde_json::Value)]| configure(pairs).unwrap_err().key;
        let b = ("bootstrap", json!("127.0.0.1:9092"));
        assert_eq!(
            at(&[("bootstrap", json!("localhost"))]).as_deref(),
            Some("bootstrap")
        );
        assert_eq!(
            at(&[b.clone(), ("partitions", json!(0))]).as_deref(),
            Some("partitions")
        );
        assert_eq!(
            at(&[b.clone(), ("replication", json!(0))]).as_deref(),
            Some("replication")
        );
        assert_eq!(
            at(&[b.clone(), ("key_prefix", json!("a b"))]).as_deref(),
            Some("key_prefix")
        );
        assert_eq!(
            at(&[b.clone(), ("properties", json!({"group.id": "x"}))]).as_deref(),
            Some("properties.group.id")
        );
        assert_eq!(
            at(&[b.clone(), ("timeout", json!("10ms"))]).as_deref(),
            Some("timeout")
        );
        assert!(configure(&[
            b,
            ("partitions", json!(12)),
            ("session_timeout", json!("6s"))
        ])
        .is_ok());
    }

    #[test]
    fn secrets_stay_out_of_notices_and_debug() {
        let s = configure(&[
            ("bootstrap", json!("b1:9092,b2:9092")),
            (
                "properties",
                json!({"security.protocol": "SASL_SSL", "sasl.username": "svc", "sasl.password": "hunter2-secret", "ssl.key.password": "k3y-secret"}),
            ),
        ])
        .expect("valid");
        let all = format!("{}\n{s:?}", s.notices().join("\n"));
        assert!(
            !all.contains("hunter2") && !all.contains("k3y-secret"),
            "{all}"
        );
        assert!(all.contains("SASL_SSL") && all.contains("svc"), "{all}");
    }
}
