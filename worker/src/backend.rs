//! The registry of backends: which `broker.kind` values this build can run, and building the
//! broker the config names.
//!
//! Each backend crate exports one [`BackendFactory`]; [`Backends::builtin`] holds the in-memory
//! one and those the `stevedore` crate's Cargo features enable (`redis`, `rabbitmq`), and an
//! application adds its own with [`Backends::register`] (or [`App::backend`](crate::App::backend)),
//! so a backend from outside this repository runs under the full CLI. Nothing else in the worker
//! knows which backends exist.
//!
//! ```
//! use stevedore::backend::Backends;
//! use stevedore::config;
//!
//! let config = config::from_toml_str("[broker]\nkind = \"memory\"\nmax_payload = 1024", None)?;
//! let backend = Backends::builtin().configure(&config)?;
//! assert_eq!(backend.capabilities().max_payload, 1024);
//! let err = Backends::builtin()
//!     .configure(&config::from_toml_str("[broker]\nkind = \"mongo\"", None)?)
//!     .unwrap_err();
//! assert_eq!(err.key.as_deref(), Some("broker.kind"));
//! # Ok::<(), stevedore::config::ConfigError>(())
//! ```

use crate::config::{Config, ConfigError, ENV_PREFIX};
use serde_json::Map;
use std::fmt;
use std::sync::Arc;
use stevedore_core::factory::{
    BackendFactory, BackendSetup, ConnectContext, PlannedQueue, Settings, SettingsError,
};
use stevedore_core::store::{MemoryStoreFactory, Store, StoreFactory, StoreSetup};
use stevedore_core::{names, Broker, Capabilities, MemoryFactory};

/// Kinds this project ships or plans that a build may lack, with the `stevedore` Cargo feature
/// that adds each (`None`: not released yet). Only for error messages.
const KNOWN: [(&str, Option<&str>); 5] = [
    ("redis", Some("redis")),
    ("rabbitmq", Some("rabbitmq")),
    ("sqlite", Some("sqlite")),
    ("sqs", Some("sqs")),
    ("kafka", Some("kafka")),
];

/// The backends a process can run, by kind. Cheap to clone; immutable once built.
#[derive(Clone)]
pub struct Backends {
    factories: Vec<Arc<dyn BackendFactory>>,
    stores: Vec<Arc<dyn StoreFactory>>,
}

impl fmt::Debug for Backends {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.kinds()).finish()
    }
}

impl Default for Backends {
    fn default() -> Self {
        Self::builtin()
    }
}

impl Backends {
    /// No backend at all (add them with [`Backends::register`]).
    pub fn empty() -> Self {
        Backends {
            factories: Vec::new(),
            stores: Vec::new(),
        }
    }

    /// `memory`, plus `sqlite` (a default feature), `redis`, `rabbitmq` and `sqs` when the crate
    /// is built with those features.
    pub fn builtin() -> Self {
        #[allow(unused_mut)] // without features there is nothing to add
        let mut b = Self::empty()
            .register(MemoryFactory)
            .register_store(MemoryStoreFactory);
        #[cfg(feature = "sqlite")]
        {
            b = b
                .register(stevedore_sqlite::SqliteFactory)
                .register_store(stevedore_sqlite::SqliteStoreFactory);
        }
        #[cfg(feature = "redis")]
        {
            b = b
                .register(stevedore_redis::RedisFactory)
                .register_store(stevedore_redis::RedisStoreFactory);
        }
        #[cfg(feature = "postgres")]
        {
            b = b.register_store(stevedore_postgres::PostgresStoreFactory);
        }
        #[cfg(feature = "rabbitmq")]
        {
            b = b.register(stevedore_rabbitmq::RabbitFactory);
        }
        #[cfg(feature = "sqs")]
        {
            b = b.register(stevedore_sqs::SqsFactory);
        }
        #[cfg(feature = "kafka")]
        {
            b = b.register(stevedore_kafka::KafkaFactory);
        }
        b
    }

    /// Adds `factory`, replacing a registered one of the same kind (so an application can swap a
    /// built-in backend for its own build of it).
    pub fn register(mut self, factory: impl BackendFactory) -> Self {
        self.factories.retain(|f| f.kind() != factory.kind());
        self.factories.push(Arc::new(factory));
        self
    }

    /// Adds a state store kind (`[store] kind`), replacing a registered one of the same kind.
    pub fn register_store(mut self, factory: impl StoreFactory) -> Self {
        self.stores.retain(|f| f.kind() != factory.kind());
        self.stores.push(Arc::new(factory));
        self
    }

    /// The registered store kinds, in registration order.
    pub fn store_kinds(&self) -> Vec<&'static str> {
        self.stores.iter().map(|f| f.kind()).collect()
    }

    /// The registered kinds, in registration order.
    pub fn kinds(&self) -> Vec<&'static str> {
        self.factories.iter().map(|f| f.kind()).collect()
    }

    /// The factory of `kind`, if registered.
    pub fn get(&self, kind: &str) -> Option<&dyn BackendFactory> {
        self.factories
            .iter()
            .find(|f| f.kind() == kind)
            .map(|f| f.as_ref())
    }

    /// Picks the factory `config.broker.kind` names and hands it the rest of `[broker]`. A key
    /// that only other registered backends take is dropped with a notice ("ignored by the memory
    /// broker"), so one file can switch kinds per profile; any other key the backend does not
    /// take is an error listing the keys it does. Touches no network.
    pub fn configure(&self, config: &Config) -> Result<Configured, ConfigError> {
        let kind = config.broker.kind.as_str();
        let Some(factory) = self.get(kind) else {
            return Err(config.error_at("broker.kind", self.unknown_kind(kind)));
        };
        let mut notices = Vec::new();
        let mut table = Map::new();
        for (key, value) in &config.broker.settings {
            let theirs = !factory.keys().contains(&key.as_str())
                && self
                    .factories
                    .iter()
                    .any(|f| f.keys().contains(&key.as_str()));
            if theirs {
                notices.push(format!("broker.{key}: ignored by the {kind} broker"));
            } else {
                table.insert(key.clone(), value.clone());
            }
        }
        let setup = factory
            .configure(&Settings::new(table))
            .map_err(|e| settings_error(config, factory, e))?;
        notices.extend(setup.notices());
        let store = self.configure_store(config, setup.as_ref(), kind, &mut notices)?;
        Ok(Configured {
            kind: factory.kind(),
            setup,
            store,
            notices,
        })
    }

    /// The store `[store]` names, else the broker's own; an error when a feature needs one and
    /// there is none.
    fn configure_store(
        &self,
        config: &Config,
        broker: &dyn BackendSetup,
        broker_kind: &str,
        notices: &mut Vec<String>,
    ) -> Result<Option<Box<dyn StoreSetup>>, ConfigError> {
        let have = || {
            self.store_kinds()
                .iter()
                .map(|k| format!("\"{k}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let store = match config.store.kind.as_deref() {
            Some(kind) => {
                let Some(factory) = self.stores.iter().find(|f| f.kind() == kind) else {
                    let hint = match kind {
                        "postgres" => " (build the stevedore crate with feature \"postgres\")",
                        "redis" => " (build the stevedore crate with feature \"redis\")",
                        _ => "",
                    };
                    return Err(config.error_at(
                        "store.kind",
                        format!(
                            "unknown store kind \"{kind}\"{hint}; this build has {}",
                            have()
                        ),
                    ));
                };
                let table: Map<_, _> = config
                    .store
                    .settings
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                let setup = factory.configure(&Settings::new(table)).map_err(|e| {
                    let key = e.key.map_or("store".to_string(), |k| format!("store.{k}"));
                    let message = if e.message.starts_with("unknown field") {
                        format!("not a setting of the {kind} store: {}", e.message)
                    } else {
                        e.message
                    };
                    config.error_at(&key, message)
                })?;
                Some(setup)
            }
            None => {
                if let Some(key) = config.store.settings.keys().next() {
                    return Err(config.error_at(
                        &format!("store.{key}"),
                        format!(
                            "[store] has settings but no kind; set store.kind to one of {}",
                            have()
                        ),
                    ));
                }
                broker.store()
            }
        };
        match (&store, config.needs_store()) {
            (None, Some(key)) => Err(config.error_at(
                &key,
                format!(
                    "needs a shared state store (where schedules and unique jobs keep their state \
                     across workers), and the {broker_kind} broker cannot hold one: add [store] with kind = \"redis\" \
                     (url), \"postgres\" (url) or \"sqlite\" (path; one machine only); this \
                     build has {}",
                    have()
                ),
            )),
            (Some(s), Some(_)) => {
                notices.push(format!("store: {}", s.describe()));
                Ok(store)
            }
            _ => Ok(store),
        }
    }

    /// Configures ([`Backends::configure`]) and connects, with the queues the config serves as
    /// the consumption plan.
    pub async fn connect(&self, config: &Config) -> Result<Arc<dyn Broker>, ConfigError> {
        self.configure(config)?.connect(config).await
    }

    fn unknown_kind(&self, kind: &str) -> String {
        let have = self
            .kinds()
            .iter()
            .map(|k| format!("\"{k}\""))
            .collect::<Vec<_>>()
            .join(", ");
        match KNOWN.iter().find(|(k, _)| *k == kind) {
            Some((_, Some(feature))) => format!(
                "\"{kind}\" is not in this build: build the stevedore crate with feature \
                 \"{feature}\" (this build has {have})"
            ),
            Some((_, None)) => {
                format!("\"{kind}\" is not yet available (this build has {have})")
            }
            None => format!("unknown broker kind \"{kind}\"; this build has {have}"),
        }
    }
}

fn settings_error(config: &Config, factory: &dyn BackendFactory, e: SettingsError) -> ConfigError {
    let kind = factory.kind();
    let Some(key) = e.key else {
        return config.error_at("broker", format!("{kind}: {}", e.message));
    };
    let message = if e.message.starts_with("unknown field") {
        format!(
            "not a setting of the {kind} broker; it takes {}",
            factory.keys().join(", ")
        )
    } else if e.message.starts_with("required") || e.message.starts_with("missing field") {
        format!(
            "{} (or set {ENV_PREFIX}BROKER__{})",
            e.message,
            key.to_ascii_uppercase()
        )
    } else {
        e.message
    };
    config.error_at(&format!("broker.{key}"), message)
}

/// A backend configured from a valid `[broker]` table, not yet connected.
#[derive(Debug)]
pub struct Configured {
    kind: &'static str,
    setup: Box<dyn BackendSetup>,
    store: Option<Box<dyn StoreSetup>>,
    notices: Vec<String>,
}

impl Configured {
    /// A broker the application built itself, standing in for whatever `[broker]` says (which
    /// then only earns a notice that it is not used).
    pub(crate) fn supplied(broker: Arc<dyn Broker>, config: &Config) -> Configured {
        let mut notices = Vec::new();
        if config.broker != crate::config::BrokerConfig::default() {
            notices.push(format!(
                "broker: [broker] is not used: the application supplies its own {} broker",
                broker.name()
            ));
        }
        Configured {
            kind: broker.name(),
            setup: Box::new(Supplied(broker)),
            store: None,
            notices,
        }
    }

    /// Uses `[store]` (resolved by `backends`) beside a supplied broker.
    pub(crate) fn with_store_from(
        mut self,
        backends: &Backends,
        config: &Config,
    ) -> Result<Configured, ConfigError> {
        let mut notices = Vec::new();
        self.store =
            backends.configure_store(config, self.setup.as_ref(), self.kind, &mut notices)?;
        self.notices.extend(notices);
        Ok(self)
    }

    /// Whether a state store is configured (`[store]` or the broker's own).
    pub fn has_store(&self) -> bool {
        self.store.is_some()
    }

    /// Connects the state store, if one is configured. An error names `[store]` (or `[broker]`
    /// when it is the broker's own) with the store's redacted reason.
    pub async fn connect_store(
        &self,
    ) -> Result<Option<Arc<dyn Store>>, stevedore_core::BrokerError> {
        match &self.store {
            None => Ok(None),
            Some(s) => s.connect().await.map(Some),
        }
    }

    /// A failed store connection as an error at the key that says where the store is.
    pub(crate) fn store_error(
        &self,
        config: &Config,
        e: &stevedore_core::BrokerError,
    ) -> ConfigError {
        // The key that says where the store is: [store]'s own, or the broker's for its own store.
        let (table, section) = match config.store.kind {
            Some(_) => (&config.store.settings, "store"),
            None => (&config.broker.settings, "broker"),
        };
        let key = ["url", "path"]
            .iter()
            .find(|k| table.contains_key(**k))
            .map_or(section.to_string(), |k| format!("{section}.{k}"));
        let key = key.as_str();
        let what = self.store.as_ref().map_or(String::new(), |s| s.describe());
        config.error_at(key, format!("cannot use the state store ({what}): {e}"))
    }

    /// The kind (`memory`, `redis`, ...).
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// What the backend will declare, known without connecting.
    pub fn capabilities(&self) -> Capabilities {
        self.setup.capabilities()
    }

    /// Notices about the `[broker]` settings, to log at start-up.
    pub fn notices(&self) -> &[String] {
        &self.notices
    }

    /// Connects, telling the backend which queues this process consumes (every level of every
    /// queue `config` serves, each holding at most its concurrency plus one batch). A broker that
    /// cannot be reached is an error at `broker`, with the broker's (redacted) reason.
    pub async fn connect(&self, config: &Config) -> Result<Arc<dyn Broker>, ConfigError> {
        self.try_connect(config)
            .await
            .map_err(|e| self.connect_error(config, &e))
    }

    /// One connection attempt, with the broker's own error (whether it is worth retrying:
    /// [`stevedore_core::BrokerError::is_transient`]).
    pub(crate) async fn try_connect(
        &self,
        config: &Config,
    ) -> Result<Arc<dyn Broker>, stevedore_core::BrokerError> {
        self.setup.connect(&plan(config)).await
    }

    /// One connection attempt for a process that consumes nothing (the CLI's commands: empty
    /// [`ConnectContext::consumes`]).
    pub(crate) async fn try_connect_client(
        &self,
        config: &Config,
    ) -> Result<Arc<dyn Broker>, stevedore_core::BrokerError> {
        let mut ctx = plan(config);
        ctx.consumes.clear();
        self.setup.connect(&ctx).await
    }

    /// A failed connection as an error at the `[broker]` key that says where the broker is.
    pub(crate) fn connect_error(
        &self,
        config: &Config,
        e: &stevedore_core::BrokerError,
    ) -> ConfigError {
        let key = if config.broker.settings.contains_key("url") {
            "broker.url"
        } else {
            "broker"
        };
        config.error_at(key, format!("cannot use the {} broker: {e}", self.kind))
    }
}

/// [`Configured::supplied`]: every connect hands out the same broker.
#[derive(Debug)]
struct Supplied(Arc<dyn Broker>);

#[stevedore_core::async_trait]
impl BackendSetup for Supplied {
    fn capabilities(&self) -> Capabilities {
        self.0.capabilities().clone()
    }

    async fn connect(
        &self,
        _ctx: &ConnectContext,
    ) -> Result<Arc<dyn Broker>, stevedore_core::BrokerError> {
        Ok(self.0.clone())
    }
}

/// What a process serving `config` consumes.
fn plan(config: &Config) -> ConnectContext {
    let mut consumes = Vec::new();
    for (name, q) in config.effective_queues() {
        let slots = q.concurrency.min(config.worker.concurrency).max(1);
        for level in q.levels() {
            consumes.push(PlannedQueue {
                queue: names::physical(&name, level),
                max_unsettled: slots.saturating_add(q.batch),
            });
        }
    }
    ConnectContext {
        worker_id: config.worker.id.clone().filter(|id| !id.is_empty()),
        consumes,
    }
}

/// Connects to the broker `config.broker` names, with the built-in backends
/// ([`Backends::builtin`]). Fails with the config key at fault when the kind is not in this build
/// or a setting is wrong, and with the broker's error (redacted) when it cannot be reached.
pub async fn connect(config: &Config) -> Result<Arc<dyn Broker>, ConfigError> {
    Backends::builtin().connect(config).await
}

/// The capabilities the configured built-in backend declares, known without connecting.
pub fn capabilities(config: &Config) -> Result<Capabilities, ConfigError> {
    Ok(Backends::builtin().configure(config)?.capabilities())
}
