//! `broker.kind = "redis"`: the settings of `[broker]` and the factory the worker's registry holds.

use crate::{capabilities, RedisBroker, RedisConfig, DEFAULT_MAX_PAYLOAD};
use serde::Deserialize;
use std::sync::Arc;
use stevedore_core::factory::{
    size_setting, url_setting, BackendFactory, BackendSetup, ConnectContext, Settings,
    SettingsError,
};
use stevedore_core::{async_trait, Broker, BrokerError, Capabilities};

/// The factory of `broker.kind = "redis"`. Keys of `[broker]`:
///
/// | key | default | meaning |
/// |---|---|---|
/// | `url` | required | `redis://[user:password@]host:port/db`, or `rediss://` for TLS; with `cluster`, one or more nodes separated by commas |
/// | `cluster` | `false` | the URL is a Redis Cluster: commands follow the slot map and a failover ([`RedisConfig::cluster`]) |
/// | `key_prefix` | `""` | prepended to every key the backend creates, to share one Redis |
/// | `max_payload` | 16 MiB | largest payload accepted at publish, in bytes |
/// | `forget_idle` | `"10m"` | a group's consumer that holds nothing and has not read for this long (and twice its lease) is removed: the names of workers that were killed; `"0s"` turns it off ([`RedisConfig::forget_idle`]) |
///
/// The consumer name is `worker.id` when set, else `<hostname>-<pid>-<random>`.
#[derive(Clone, Copy, Debug, Default)]
pub struct RedisFactory;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RedisSettings {
    url: Option<String>,
    cluster: Option<bool>,
    key_prefix: Option<String>,
    max_payload: Option<u64>,
    #[serde(default, with = "humantime_serde::option")]
    forget_idle: Option<std::time::Duration>,
}

#[derive(Debug)]
struct RedisSetup {
    config: RedisConfig,
}

impl BackendFactory for RedisFactory {
    fn kind(&self) -> &'static str {
        "redis"
    }

    fn keys(&self) -> &'static [&'static str] {
        &["url", "cluster", "key_prefix", "max_payload", "forget_idle"]
    }

    fn configure(&self, settings: &Settings) -> Result<Box<dyn BackendSetup>, SettingsError> {
        let s: RedisSettings = settings.parse()?;
        let url = url_setting(
            "url",
            s.url,
            "redis",
            &["redis://", "rediss://"],
            "redis://localhost:6379/0",
            crate::redact,
        )?;
        let mut config = RedisConfig::new(url);
        config.cluster = s.cluster.unwrap_or(false);
        config.key_prefix = s.key_prefix.unwrap_or_default();
        check_cluster(&config)?;
        config.max_payload = size_setting("max_payload", s.max_payload, DEFAULT_MAX_PAYLOAD)?;
        if let Some(idle) = s.forget_idle {
            config.forget_idle = idle;
        }
        Ok(Box::new(RedisSetup { config }))
    }
}

#[async_trait]
impl BackendSetup for RedisSetup {
    fn capabilities(&self) -> Capabilities {
        capabilities(self.config.max_payload)
    }

    async fn connect(&self, ctx: &ConnectContext) -> Result<Arc<dyn Broker>, BrokerError> {
        let mut config = self.config.clone();
        config.consumer = ctx.worker_id.clone();
        // Only a process that consumes warns about a Redis that keeps nothing on disk.
        config.warn_if_volatile = !ctx.consumes.is_empty();
        Ok(Arc::new(RedisBroker::connect(config).await?))
    }

    fn store(&self) -> Option<Box<dyn stevedore_core::store::StoreSetup>> {
        Some(Box::new(crate::store::RedisStoreSetup {
            url: self.config.url.clone(),
            key_prefix: self.config.key_prefix.clone(),
            cluster: self.config.cluster,
        }))
    }
}

/// With `cluster`, every comma-separated node of `url` has a Redis scheme, and the key prefix
/// suits a cluster; without it, `url` names one server.
pub(crate) fn check_cluster(config: &RedisConfig) -> Result<(), SettingsError> {
    let nodes = crate::conn::seeds(&config.url);
    if !config.cluster {
        if nodes.len() > 1 {
            return Err(SettingsError::at(
                "url",
                "names several servers (commas); set cluster = true for a Redis Cluster, or name one server",
            ));
        }
        return Ok(());
    }
    for n in &nodes {
        if !(n.starts_with("redis://") || n.starts_with("rediss://")) {
            return Err(SettingsError::at(
                "url",
                format!(
                    "each node of a cluster starts with redis:// or rediss://, got {}",
                    crate::redact(n)
                ),
            ));
        }
    }
    crate::conn::check_cluster_prefix(&config.key_prefix)
        .map_err(|m| SettingsError::at("key_prefix", m))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn configure(pairs: &[(&str, serde_json::Value)]) -> Result<(), SettingsError> {
        let s = Settings::from_toml_like(pairs.iter().map(|(k, v)| (*k, v.clone())));
        RedisFactory.configure(&s).map(|_| ())
    }

    #[test]
    fn cluster_settings_are_checked_at_start() {
        configure(&[("url", json!("redis://a:1"))]).expect("one server");
        configure(&[
            ("url", json!("redis://a:1, redis://b:2")),
            ("cluster", json!(true)),
            ("key_prefix", json!("{app}:")),
        ])
        .expect("a cluster");
        let e = configure(&[("url", json!("redis://a:1,redis://b:2"))]).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("url"));
        assert!(e.message.contains("cluster = true"), "{}", e.message);
        // A comma in a password is not a list.
        configure(&[("url", json!("redis://:p,w@a:1"))]).expect("one server");
        let e = configure(&[
            ("url", json!("redis://a:1")),
            ("cluster", json!(true)),
            ("key_prefix", json!("app{")),
        ])
        .unwrap_err();
        assert_eq!(e.key.as_deref(), Some("key_prefix"));
        assert!(e.message.contains("hash tag"), "{}", e.message);
        let e = configure(&[("url", json!("redis://a:1")), ("cluster", json!("yes"))]).unwrap_err();
        assert!(e.to_string().contains("cluster"), "{e}");
    }
}
