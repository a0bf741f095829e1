//! Building the broker the config names.

use crate::config::{BrokerKind, Config, ConfigError};
use std::sync::Arc;
use stevedore_core::{memory::DEFAULT_MAX_PAYLOAD, Broker, Capabilities, MemoryBroker};

/// Connects to the broker of `config.broker` and returns it behind the trait. Does not touch the
/// network for the in-memory backend. Fails with the config key at fault when the kind is not
/// available in this build.
pub async fn connect(config: &Config) -> Result<Arc<dyn Broker>, ConfigError> {
    match config.broker.kind {
        BrokerKind::Memory => Ok(Arc::new(memory(config))),
        other => Err(unavailable(config, other)),
    }
}

fn memory(config: &Config) -> MemoryBroker {
    let max = config
        .broker
        .max_payload
        .map(|m| usize::try_from(m).unwrap_or(usize::MAX))
        .unwrap_or(DEFAULT_MAX_PAYLOAD);
    MemoryBroker::with_max_payload(max)
}

/// The capabilities the configured backend declares, known without connecting (for validation and
/// `config check`).
pub fn capabilities(config: &Config) -> Result<Capabilities, ConfigError> {
    match config.broker.kind {
        BrokerKind::Memory => Ok(memory(config).capabilities().clone()),
        other => Err(unavailable(config, other)),
    }
}

fn unavailable(config: &Config, kind: BrokerKind) -> ConfigError {
    ConfigError {
        file: config.source.clone(),
        key: Some("broker.kind".into()),
        message: format!(
            "broker kind \"{}\" is not available in this build; available: \"memory\"",
            kind.as_str()
        ),
    }
}
