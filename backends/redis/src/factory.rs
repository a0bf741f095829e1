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
/// | `url` | required | `redis://[user:password@]host:port/db`, or `rediss://` for TLS |
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
        &["url", "key_prefix", "max_payload", "forget_idle"]
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
        config.key_prefix = s.key_prefix.unwrap_or_default();
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
        }))
    }
}
