//! `broker.kind = "sqlite"`: the settings of `[broker]` and the factory the worker's registry
//! holds.

use crate::{
    capabilities, Durability, SqliteBroker, SqliteConfig, DEFAULT_MAX_PAYLOAD, DEFAULT_PATH,
};
use serde::Deserialize;
use std::path::PathBuf;
use std::sync::Arc;
use stevedore_core::factory::{
    size_setting, BackendFactory, BackendSetup, ConnectContext, Settings, SettingsError,
};
use stevedore_core::{async_trait, Broker, BrokerError, Capabilities};

/// The factory of `broker.kind = "sqlite"`. Keys of `[broker]`:
///
/// | key | default | meaning |
/// |---|---|---|
/// | `path` | `"stevedore.db"` | the database file, relative to the working directory; created when missing (its directory must exist) |
/// | `durability` | `"full"` | `"full"`: a committed job survives power loss (`synchronous=FULL`); `"normal"`: it survives a crash of the process, the last commits may be lost on power loss (`synchronous=NORMAL`), for more speed |
/// | `max_payload` | 16 MiB | largest payload accepted at publish, in bytes |
/// | `max_size` | none | largest the file may grow, in bytes: publishes beyond fail (like a full disk), nothing committed is lost |
#[derive(Clone, Copy, Debug, Default)]
pub struct SqliteFactory;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SqliteSettings {
    path: Option<PathBuf>,
    durability: Option<String>,
    max_payload: Option<u64>,
    max_size: Option<u64>,
}

#[derive(Debug)]
struct SqliteSetup {
    config: SqliteConfig,
}

impl BackendFactory for SqliteFactory {
    fn kind(&self) -> &'static str {
        "sqlite"
    }

    fn keys(&self) -> &'static [&'static str] {
        &["path", "durability", "max_payload", "max_size"]
    }

    fn configure(&self, settings: &Settings) -> Result<Box<dyn BackendSetup>, SettingsError> {
        let s: SqliteSettings = settings.parse()?;
        let path = s.path.unwrap_or_else(|| PathBuf::from(DEFAULT_PATH));
        if path.as_os_str().is_empty() {
            return Err(SettingsError::at(
                "path",
                "must not be empty (e.g. \"stevedore.db\")",
            ));
        }
        let mut config = SqliteConfig::new(path);
        config.durability = match s.durability.as_deref() {
            None | Some("full") => Durability::Full,
            Some("normal") => Durability::Normal,
            Some(other) => {
                return Err(SettingsError::at(
                    "durability",
                    format!("\"{other}\" is not a durability; allowed: \"full\", \"normal\""),
                ))
            }
        };
        config.max_payload = size_setting("max_payload", s.max_payload, DEFAULT_MAX_PAYLOAD)?;
        config.max_size = match s.max_size {
            Some(n) if n < 64 * 1024 => {
                return Err(SettingsError::at(
                    "max_size",
                    format!("must be at least 65536 bytes (got {n}); leave it out for no limit"),
                ))
            }
            other => other,
        };
        Ok(Box::new(SqliteSetup { config }))
    }
}

#[async_trait]
impl BackendSetup for SqliteSetup {
    fn capabilities(&self) -> Capabilities {
        capabilities(self.config.max_payload)
    }

    fn notices(&self) -> Vec<String> {
        let mut n = vec![format!(
            "sqlite: jobs are kept in {}",
            self.config.path.display()
        )];
        if self.config.durability == Durability::Normal {
            n.push(
                "sqlite: durability = \"normal\": the last commits may be lost on power loss or an OS crash"
                    .into(),
            );
        }
        n
    }

    fn store(&self) -> Option<Box<dyn stevedore_core::store::StoreSetup>> {
        Some(Box::new(crate::kv::SqliteStoreSetup {
            path: self.config.path.clone(),
        }))
    }

    async fn connect(&self, _ctx: &ConnectContext) -> Result<Arc<dyn Broker>, BrokerError> {
        Ok(Arc::new(SqliteBroker::open(self.config.clone()).await?))
    }
}
