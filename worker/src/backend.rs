//! Building the broker the config names.

use crate::config::{BrokerKind, Config, ConfigError};
use std::sync::Arc;
use stevedore_core::{memory::DEFAULT_MAX_PAYLOAD, Broker, Capabilities, MemoryBroker};

/// Connects to the broker of `config.broker` and returns it behind the trait. Does not touch the
/// network for the in-memory backend. Fails with the config key at fault when the kind is not
/// available in this build, and with the broker's error (redacted) when it cannot be reached.
pub async fn connect(config: &Config) -> Result<Arc<dyn Broker>, ConfigError> {
    config.check_kind_available()?;
    match config.broker.kind {
        BrokerKind::Memory => Ok(Arc::new(memory(config))),
        #[cfg(feature = "redis")]
        BrokerKind::Redis => {
            let broker = stevedore_redis::RedisBroker::connect(redis_config(config))
                .await
                .map_err(|e| ConfigError {
                    file: config.source.clone(),
                    key: Some("broker.url".into()),
                    message: format!("cannot use the redis broker: {e}"),
                })?;
            Ok(Arc::new(broker))
        }
        #[cfg(feature = "rabbitmq")]
        BrokerKind::Rabbitmq => {
            let broker = stevedore_rabbitmq::RabbitBroker::connect(rabbitmq_config(config))
                .await
                .map_err(|e| ConfigError {
                    file: config.source.clone(),
                    key: Some("broker.url".into()),
                    message: format!("cannot use the rabbitmq broker: {e}"),
                })?;
            Ok(Arc::new(broker))
        }
        other => Err(unavailable(config, other)),
    }
}

fn memory(config: &Config) -> MemoryBroker {
    MemoryBroker::with_max_payload(max_payload(config, DEFAULT_MAX_PAYLOAD))
}

fn max_payload(config: &Config, default: usize) -> usize {
    config
        .broker
        .max_payload
        .map(|m| usize::try_from(m).unwrap_or(usize::MAX))
        .unwrap_or(default)
}

#[cfg(feature = "redis")]
fn redis_config(config: &Config) -> stevedore_redis::RedisConfig {
    let mut c = stevedore_redis::RedisConfig::new(config.broker.url.clone().unwrap_or_default());
    c.key_prefix = config.broker.key_prefix.clone().unwrap_or_default();
    c.max_payload = max_payload(config, stevedore_redis::DEFAULT_MAX_PAYLOAD);
    c.consumer = config.worker.id.clone();
    c
}

/// RabbitMQ settings from the config. Each served queue's levels get a prefetch of the queue's
/// concurrency plus one batch: a worker never holds more of a queue than it can run at once and
/// fetch next.
#[cfg(feature = "rabbitmq")]
fn rabbitmq_config(config: &Config) -> stevedore_rabbitmq::RabbitConfig {
    let mut c =
        stevedore_rabbitmq::RabbitConfig::new(config.broker.url.clone().unwrap_or_default());
    c.key_prefix = config.broker.key_prefix.clone().unwrap_or_default();
    c.max_payload = max_payload(config, stevedore_rabbitmq::DEFAULT_MAX_PAYLOAD);
    c.connection_name = config
        .worker
        .id
        .as_ref()
        .map(|id| format!("stevedore {id}"));
    for (name, q) in config.effective_queues() {
        let slots = q.concurrency.min(config.worker.concurrency).max(1);
        let prefetch = u16::try_from(slots.saturating_add(q.batch)).unwrap_or(u16::MAX);
        for level in config.levels(&name) {
            c.prefetch
                .insert(stevedore_core::names::physical(&name, level), prefetch);
        }
    }
    c
}

/// The capabilities the configured backend declares, known without connecting (for validation and
/// `config check`).
pub fn capabilities(config: &Config) -> Result<Capabilities, ConfigError> {
    config.check_kind_available()?;
    match config.broker.kind {
        BrokerKind::Memory => Ok(memory(config).capabilities().clone()),
        #[cfg(feature = "redis")]
        BrokerKind::Redis => Ok(stevedore_redis::capabilities(max_payload(
            config,
            stevedore_redis::DEFAULT_MAX_PAYLOAD,
        ))),
        #[cfg(feature = "rabbitmq")]
        BrokerKind::Rabbitmq => Ok(stevedore_rabbitmq::capabilities(
            max_payload(config, stevedore_rabbitmq::DEFAULT_MAX_PAYLOAD),
            stevedore_rabbitmq::DEFAULT_CONSUMER_TIMEOUT,
            stevedore_rabbitmq::LEVELS,
        )),
        other => Err(unavailable(config, other)),
    }
}

fn unavailable(config: &Config, kind: BrokerKind) -> ConfigError {
    ConfigError {
        file: config.source.clone(),
        key: Some("broker.kind".into()),
        message: format!(
            "broker kind \"{}\" is not available in this build",
            kind.as_str()
        ),
    }
}
