//! How a backend plugs in: a [`BackendFactory`] names its kind, reads its own `[broker]` settings,
//! declares its capabilities without connecting, and connects.
//!
//! The worker crate keeps a registry of factories (the built-in ones its Cargo features enable,
//! plus any the application adds) and picks one by `broker.kind`. Nothing else in the worker knows
//! which backends exist, so a backend is one crate exporting one factory, inside this repository
//! or outside it.
//!
//! ```
//! use std::sync::Arc;
//! use stevedore_core::factory::{BackendFactory, BackendSetup, ConnectContext, Settings, SettingsError};
//! use stevedore_core::{async_trait, Broker, BrokerError, Capabilities, MemoryBroker};
//!
//! /// `[broker] kind = "scratch"`, with one setting of its own.
//! struct Scratch;
//!
//! #[derive(serde::Deserialize)]
//! #[serde(deny_unknown_fields)]
//! struct ScratchSettings { max_payload: Option<usize> }
//!
//! #[derive(Debug)]
//! struct ScratchSetup { broker: MemoryBroker }
//!
//! impl BackendFactory for Scratch {
//!     fn kind(&self) -> &'static str { "scratch" }
//!     fn keys(&self) -> &'static [&'static str] { &["max_payload"] }
//!     fn configure(&self, settings: &Settings) -> Result<Box<dyn BackendSetup>, SettingsError> {
//!         let s: ScratchSettings = settings.parse()?;
//!         let broker = MemoryBroker::with_max_payload(s.max_payload.unwrap_or(1024));
//!         Ok(Box::new(ScratchSetup { broker }))
//!     }
//! }
//!
//! #[async_trait]
//! impl BackendSetup for ScratchSetup {
//!     fn capabilities(&self) -> Capabilities { self.broker.capabilities().clone() }
//!     async fn connect(&self, _: &ConnectContext) -> Result<Arc<dyn Broker>, BrokerError> {
//!         Ok(Arc::new(self.broker.clone()))
//!     }
//! }
//!
//! let settings = Settings::from_toml_like([("max_payload", serde_json::json!(10))]);
//! let setup = Scratch.configure(&settings).unwrap();
//! assert_eq!(setup.capabilities().max_payload, 10);
//! let err = Scratch.configure(&Settings::from_toml_like([("url", serde_json::json!("x"))])).unwrap_err();
//! assert_eq!(err.key.as_deref(), Some("url"));
//! ```

use crate::broker::Broker;
use crate::capabilities::Capabilities;
use crate::error::BrokerError;
use async_trait::async_trait;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use std::fmt;
use std::sync::Arc;

/// One backend kind: the `broker.kind` it answers to and how to build it from its settings.
///
/// Thread safety: factories are shared (`Send + Sync`) and hold no connection; `configure` is a
/// pure function of the settings and may be called any number of times.
pub trait BackendFactory: Send + Sync + 'static {
    /// The `broker.kind` value (`memory`, `redis`, ...): lowercase, unique in a registry.
    fn kind(&self) -> &'static str;

    /// Every key this backend accepts in `[broker]` besides `kind`, for the registry's notices (a
    /// key another backend accepts but this one does not is reported as ignored rather than
    /// refused, so one file can switch kinds per profile).
    fn keys(&self) -> &'static [&'static str];

    /// Reads and checks the settings (the `[broker]` table without `kind`) without touching the
    /// network. An error names the key at fault, relative to `[broker]`, and what is allowed.
    fn configure(&self, settings: &Settings) -> Result<Box<dyn BackendSetup>, SettingsError>;
}

/// A backend configured from valid settings, not yet connected.
#[async_trait]
pub trait BackendSetup: Send + Sync + fmt::Debug {
    /// What the backend will declare once connected, known from the settings alone (config
    /// validation and `config check` use it without a broker).
    fn capabilities(&self) -> Capabilities;

    /// Start-up notices about the settings (defaults that matter, emulations). Default: none.
    fn notices(&self) -> Vec<String> {
        Vec::new()
    }

    /// Connects (or opens the store). Each call gives an independent handle. Errors are the
    /// broker's, without credentials; the caller names the config key.
    async fn connect(&self, ctx: &ConnectContext) -> Result<Arc<dyn Broker>, BrokerError>;

    /// A [`crate::store::Store`] on the same server or file, when this backend can hold the
    /// runtime's shared state itself (Redis, the SQLite file, the in-memory broker); used when
    /// the config has no `[store]`. Default: none (RabbitMQ, SQS and Kafka hold no key-value
    /// state), so features that need a store ask the user for one.
    fn store(&self) -> Option<Box<dyn crate::store::StoreSetup>> {
        None
    }
}

/// What the process that connects will do, for backends that size themselves by it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConnectContext {
    /// The worker id the config sets (`worker.id`), for consumer and connection names; `None`
    /// lets the backend pick a name unique to this process.
    pub worker_id: Option<String>,
    /// The physical queues this process will consume, with how many messages of each it may hold
    /// unsettled at once (its concurrency there plus one fetch batch). Empty for a process that
    /// only produces or inspects (`enqueue`, `stats`, `dlq`). RabbitMQ sets each consumer's
    /// prefetch from it; Kafka would size `max.poll.records`.
    pub consumes: Vec<PlannedQueue>,
}

/// One physical queue a process consumes. See [`ConnectContext::consumes`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedQueue {
    /// The physical queue name.
    pub queue: String,
    /// Most messages of it held unsettled at once (at least 1).
    pub max_unsettled: usize,
}

/// A backend's `[broker]` table, without `kind`, as the config layers left it (file, profile,
/// environment). Read it with [`Settings::parse`] into the backend's own `Deserialize` type.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    table: Map<String, Value>,
}

impl Settings {
    /// Settings from a table of values.
    pub fn new(table: Map<String, Value>) -> Self {
        Settings { table }
    }

    /// Settings from `(key, value)` pairs (tests, examples).
    pub fn from_toml_like<'a>(pairs: impl IntoIterator<Item = (&'a str, Value)>) -> Self {
        Settings {
            table: pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        }
    }

    /// The raw table.
    pub fn table(&self) -> &Map<String, Value> {
        &self.table
    }

    /// Deserializes the table into `T` (use `#[serde(deny_unknown_fields)]` so typos are
    /// refused). The error names the key at fault, relative to `[broker]`.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, SettingsError> {
        let value = Value::Object(self.table.clone());
        serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner().to_string();
            // serde reports an unknown field at its parent; the field is in the message.
            let key = if path == "." {
                unknown_field(&inner)
            } else {
                Some(path)
            };
            SettingsError {
                key,
                message: inner,
            }
        })
    }
}

/// The URLs of a comma-separated list of broker nodes (`redis://a:6379,redis://b:6379`), each
/// trimmed. A comma splits only where a URL of one of `schemes` follows it (after optional
/// blanks), so a comma inside a password (`redis://:p,w@host`) stays part of its URL.
pub fn url_list<'a>(list: &'a str, schemes: &[&str]) -> Vec<&'a str> {
    let mut out = Vec::new();
    let mut start = 0;
    for (i, _) in list.match_indices(',') {
        let rest = list[i + 1..].trim_start();
        if schemes.iter().any(|s| rest.starts_with(s)) {
            out.push(list[start..i].trim());
            start = i + 1;
        }
    }
    out.push(list[start..].trim());
    out.retain(|u| !u.is_empty());
    out
}

/// Checks a required connection URL setting: present, not blank, starting with one of `schemes`
/// (`["redis://", "rediss://"]`). Errors name `key` and show the URL through `redact`.
pub fn url_setting(
    key: &str,
    value: Option<String>,
    kind: &str,
    schemes: &[&str],
    example: &str,
    redact: fn(&str) -> String,
) -> Result<String, SettingsError> {
    match value {
        None => Err(SettingsError::at(
            key,
            format!("required for kind = \"{kind}\", e.g. {key} = \"{example}\""),
        )),
        Some(u) if u.trim().is_empty() => Err(SettingsError::at(key, "must not be empty")),
        Some(u) if !schemes.iter().any(|s| u.starts_with(s)) => Err(SettingsError::at(
            key,
            format!(
                "must start with {} (TLS), got {}",
                schemes.join(" or "),
                redact(&u)
            ),
        )),
        Some(u) => Ok(u),
    }
}

/// A size in bytes: `default` when unset, at least 1.
pub fn size_setting(key: &str, value: Option<u64>, default: usize) -> Result<usize, SettingsError> {
    match value {
        None => Ok(default),
        Some(0) => Err(SettingsError::at(key, "must be at least 1 (bytes)")),
        Some(n) => Ok(usize::try_from(n).unwrap_or(usize::MAX)),
    }
}

/// The field named by serde's "unknown field `x`" and "missing field `x`" messages.
fn unknown_field(message: &str) -> Option<String> {
    let rest = message
        .strip_prefix("unknown field `")
        .or_else(|| message.strip_prefix("missing field `"))?;
    Some(rest[..rest.find('`')?].to_string())
}

/// Settings a backend refuses. `key` is relative to `[broker]` (`url`, `tls.ca_file`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", key.as_deref().map(|k| format!("{k}: ")).unwrap_or_default())]
pub struct SettingsError {
    /// The key at fault, if one is.
    pub key: Option<String>,
    /// What is wrong and what is allowed.
    pub message: String,
}

impl SettingsError {
    /// An error about `key`.
    pub fn at(key: impl Into<String>, message: impl Into<String>) -> Self {
        SettingsError {
            key: Some(key.into()),
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_lists_split_only_before_a_url() {
        let s = &["redis://", "rediss://"];
        assert_eq!(url_list("redis://a:1", s), ["redis://a:1"]);
        assert_eq!(
            url_list(" redis://a:1 , rediss://b:2,", s),
            ["redis://a:1", "rediss://b:2,"]
        );
        assert_eq!(
            url_list("redis://:p,w@h:1,redis://:x,y@h:2", s),
            ["redis://:p,w@h:1", "redis://:x,y@h:2"]
        );
        assert!(url_list(" ", s).is_empty());
    }

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct S {
        url: String,
        #[serde(default)]
        n: u32,
    }

    #[test]
    fn parse_errors_name_the_key() {
        let ok: S = Settings::from_toml_like([("url", Value::from("x"))])
            .parse()
            .unwrap();
        assert_eq!(ok.n, 0);
        let e = Settings::from_toml_like([("url", Value::from("x")), ("m", Value::from(1))])
            .parse::<S>()
            .unwrap_err();
        assert_eq!(e.key.as_deref(), Some("m"));
        assert!(e.message.contains("expected `url` or `n`"), "{e}");
        let e = Settings::from_toml_like([("url", Value::from("x")), ("n", Value::from("big"))])
            .parse::<S>()
            .unwrap_err();
        assert_eq!(e.key.as_deref(), Some("n"));
        assert!(e.message.contains("expected u32"), "{e}");
        let e = Settings::default().parse::<S>().unwrap_err();
        assert!(e.message.contains("missing field `url`"), "{e}");
        assert_eq!(e.key.as_deref(), Some("url"));
    }
}
