//! `broker.kind = "rabbitmq"`: the settings of `[broker]` and the factory the worker's registry
//! holds.

use crate::{capabilities, redact, RabbitBroker, RabbitConfig, DEFAULT_MAX_PAYLOAD, LEVELS};
use serde::Deserialize;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use stevedore_core::factory::{
    size_setting, url_setting, BackendFactory, BackendSetup, ConnectContext, Settings,
    SettingsError,
};
use stevedore_core::{async_trait, Broker, BrokerError, Capabilities};

/// The factory of `broker.kind = "rabbitmq"`. Keys of `[broker]`:
///
/// | key | default | meaning |
/// |---|---|---|
/// | `url` | required | `amqp://user:password@host:port/vhost` (`%2f` for `/`), or `amqps://` for TLS; a cluster: several nodes' URLs separated by commas (tried in turn on a reconnect) |
/// | `key_prefix` | `""` | prepended to every queue and exchange the backend declares |
/// | `max_payload` | 16 MiB | largest payload accepted at publish, in bytes |
/// | `consumer_timeout` | `"30m"` | the server's `consumer_timeout` (rabbitmq.conf), so validation can warn about longer job timeouts; not sent to the server |
/// | `tls_ca_file` | none | PEM file of extra CA certificates to trust for `amqps://` |
/// | `delay_levels` | 32 | how many shared delay levels a delay may use (1 to 32): the broker holds a message up to 2^levels − 1 ms, the runtime hops beyond |
///
/// Each consumed queue's prefetch is the most messages the worker may hold of it at once
/// ([`ConnectContext::consumes`]); the connection is named `stevedore <worker.id>` when the id
/// is set.
#[derive(Clone, Copy, Debug, Default)]
pub struct RabbitFactory;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RabbitSettings {
    url: Option<String>,
    key_prefix: Option<String>,
    max_payload: Option<u64>,
    #[serde(default, with = "humantime_serde")]
    consumer_timeout: Option<Duration>,
    tls_ca_file: Option<PathBuf>,
    delay_levels: Option<u32>,
}

#[derive(Debug)]
struct RabbitSetup {
    config: RabbitConfig,
}

impl BackendFactory for RabbitFactory {
    fn kind(&self) -> &'static str {
        "rabbitmq"
    }

    fn keys(&self) -> &'static [&'static str] {
        &[
            "url",
            "key_prefix",
            "max_payload",
            "consumer_timeout",
            "tls_ca_file",
            "delay_levels",
        ]
    }

    fn configure(&self, settings: &Settings) -> Result<Box<dyn BackendSetup>, SettingsError> {
        let s: RabbitSettings = settings.parse()?;
        let url = url_setting(
            "url",
            s.url,
            "rabbitmq",
            &["amqp://", "amqps://"],
            "amqp://guest:guest@localhost:5672/%2f",
            redact,
        )?;
        for node in crate::nodes(&url) {
            if !(node.starts_with("amqp://") || node.starts_with("amqps://")) {
                return Err(SettingsError::at(
                    "url",
                    format!(
                        "each node of a cluster's list starts with amqp:// or amqps://, got {}",
                        redact(node)
                    ),
                ));
            }
        }
        let mut config = RabbitConfig::new(url);
        config.key_prefix = s.key_prefix.unwrap_or_default();
        config.max_payload = size_setting("max_payload", s.max_payload, DEFAULT_MAX_PAYLOAD)?;
        if let Some(t) = s.consumer_timeout {
            if t.is_zero() {
                return Err(SettingsError::at(
                    "consumer_timeout",
                    "must be more than 0 (the server's consumer_timeout, e.g. \"30m\")",
                ));
            }
            config.consumer_timeout = t;
        }
        if let Some(path) = s.tls_ca_file {
            if !path.is_file() {
                return Err(SettingsError::at(
                    "tls_ca_file",
                    format!("no such file: {}", path.display()),
                ));
            }
            config.tls_ca_file = Some(path);
        }
        if let Some(levels) = s.delay_levels {
            if !(1..=LEVELS).contains(&levels) {
                return Err(SettingsError::at(
                    "delay_levels",
                    format!("must be 1 to {LEVELS} (got {levels})"),
                ));
            }
            config.delay_levels = levels;
        }
        Ok(Box::new(RabbitSetup { config }))
    }
}

#[async_trait]
impl BackendSetup for RabbitSetup {
    fn capabilities(&self) -> Capabilities {
        capabilities(
            self.config.max_payload,
            self.config.consumer_timeout,
            self.config.delay_levels,
        )
    }

    async fn connect(&self, ctx: &ConnectContext) -> Result<Arc<dyn Broker>, BrokerError> {
        let mut config = self.config.clone();
        config.connection_name = ctx.worker_id.as_ref().map(|id| format!("stevedore {id}"));
        for q in &ctx.consumes {
            let prefetch = u16::try_from(q.max_unsettled.max(1)).unwrap_or(u16::MAX);
            config.prefetch.insert(q.queue.clone(), prefetch);
        }
        Ok(Arc::new(RabbitBroker::connect(config).await?))
    }
}
