//! The state store: a little shared key-value state for the features a message broker cannot
//! hold by itself (periodic jobs' last tick, unique-job keys, rate limits), on Redis, SQLite or
//! PostgreSQL, whatever the broker is.
//!
//! The seam is one atomic primitive, [`Store::swap`] (compare-and-swap of one key, with an
//! optional time to live), and [`Store::get`]. Everything the runtime needs is built on them:
//! "set if absent" is a swap from `None`; a lease is a value with a TTL, renewed by a swap from
//! itself to itself; "delete if still mine" is a swap to `None`. So a store is small to write and
//! easy to hold to its contract: [`crate::factory`]-style registration ([`StoreFactory`]), and the
//! conformance suite's store scenarios run against each.
//!
//! A broker that can hold the state itself (Redis, the embedded SQLite file, the in-memory
//! broker) offers a store through [`crate::factory::BackendSetup::store`], used when the config
//! names none.
//!
//! ```
//! use stevedore_core::store::{MemoryStore, Store};
//! use std::time::Duration;
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), stevedore_core::BrokerError> {
//! let store = MemoryStore::new();
//! // Only the first of two writers claims the key.
//! assert!(store.swap("lock", None, Some(b"a"), Some(Duration::from_secs(30))).await?);
//! assert!(!store.swap("lock", None, Some(b"b"), Some(Duration::from_secs(30))).await?);
//! assert_eq!(store.get("lock").await?.as_deref(), Some(&b"a"[..]));
//! // The holder releases it; nobody else can.
//! assert!(!store.swap("lock", Some(b"b"), None, None).await?);
//! assert!(store.swap("lock", Some(b"a"), None, None).await?);
//! assert_eq!(store.get("lock").await?, None);
//! # Ok(()) }
//! ```

use crate::error::BrokerError;
use crate::factory::{Settings, SettingsError};
use async_trait::async_trait;
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Longest key a store must accept, in bytes. Callers keep keys below it (they hash longer
/// user-given parts).
pub const MAX_KEY: usize = 512;
/// Largest value a store must accept, in bytes.
pub const MAX_VALUE: usize = 64 * 1024;

/// Shared key-value state with atomic compare-and-swap.
///
/// Contract, held by the conformance suite's store scenarios on every implementation:
/// - **Atomic per key, across processes**: of concurrent swaps from the same expected value,
///   at most one succeeds, whichever process or connection makes it.
/// - **Expiry**: a value written with a TTL reads as absent once the TTL has passed (measured
///   on the store's own clock, so workers' clocks do not matter); a swap that expects `None`
///   succeeds on an expired value. Expired values may linger in storage; they are never seen.
/// - **Durability** is the backing server's or file's: Redis without persistence loses state on
///   restart, which the features built on it tolerate (a schedule resumes, a unique key lapses).
///
/// Thread safety: `Send + Sync`; one handle serves the whole process.
///
/// Failure: errors are [`BrokerError`]s; [`BrokerError::is_transient`] says whether to retry.
/// A swap that fails with a transient error may or may not have been applied: read back with
/// [`Store::get`] before acting on it.
#[async_trait]
pub trait Store: Send + Sync + fmt::Debug {
    /// The store's kind (`redis`, `sqlite`, `postgres`, `memory`), for logs.
    fn name(&self) -> &'static str;

    /// Whether processes on other machines see the same state (false for `memory`, which is
    /// per process, and `sqlite`, which is per machine). The runtime notes it at start-up.
    fn shared_across_machines(&self) -> bool;

    /// The store as [`std::any::Any`], for features that need one store kind's own API (a
    /// PostgreSQL store's marks written in the caller's transaction). `None` by default.
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        None
    }

    /// The live value of `key`, if any.
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, BrokerError>;

    /// Atomically: if the live value of `key` equals `expected` (`None`: absent or expired),
    /// replace it by `new` (`None`: delete) with time to live `ttl` (`None`: no expiry; a TTL
    /// below one millisecond counts as one) and return `true`; otherwise change nothing and
    /// return `false`.
    async fn swap(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
        ttl: Option<Duration>,
    ) -> Result<bool, BrokerError>;

    /// Sets `key` to `value` (`None`: delete) with time to live `ttl`, whatever it holds now
    /// (last writer wins). The default reads and swaps until a swap lands; stores with a
    /// one-step write override it.
    async fn set(
        &self,
        key: &str,
        value: Option<&[u8]>,
        ttl: Option<Duration>,
    ) -> Result<(), BrokerError> {
        for _ in 0..16 {
            let current = self.get(key).await?;
            if self.swap(key, current.as_deref(), value, ttl).await? {
                return Ok(());
            }
        }
        Err(BrokerError::transient(format!(
            "the key {key} kept changing while it was being set; try again"
        )))
    }
}

/// One store kind: the `[store] kind` it answers to and how to build it from the rest of the
/// `[store]` table.
///
/// Thread safety: shared (`Send + Sync`); `configure` is a pure function of the settings.
pub trait StoreFactory: Send + Sync + 'static {
    /// The `store.kind` value (`redis`, `sqlite`, `postgres`, `memory`).
    fn kind(&self) -> &'static str;

    /// Reads and checks the settings without touching the network. An error names the key at
    /// fault, relative to `[store]`, and what is allowed.
    fn configure(&self, settings: &Settings) -> Result<Box<dyn StoreSetup>, SettingsError>;
}

/// A store configured from valid settings, not yet connected.
#[async_trait]
pub trait StoreSetup: Send + Sync + fmt::Debug {
    /// A line for the start-up log: the kind and where it is (credentials redacted).
    fn describe(&self) -> String;

    /// Connects (creating the table or schema it needs when missing). Errors are the server's,
    /// without credentials.
    async fn connect(&self) -> Result<Arc<dyn Store>, BrokerError>;
}

/// A store inside one process: for the in-memory broker and tests. Clones share their state.
#[derive(Clone, Debug, Default)]
pub struct MemoryStore {
    map: Arc<Mutex<HashMap<String, Entry>>>,
}

/// A value and when it expires.
type Entry = (Vec<u8>, Option<Instant>);

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

fn live(entry: Option<&Entry>, now: Instant) -> Option<&[u8]> {
    match entry {
        Some((v, until)) if until.is_none_or(|u| u > now) => Some(v.as_slice()),
        _ => None,
    }
}

/// `ttl` as the store rounds it: at least one millisecond.
pub fn ttl_floor(ttl: Duration) -> Duration {
    ttl.max(Duration::from_millis(1))
}

#[async_trait]
impl Store for MemoryStore {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn shared_across_machines(&self) -> bool {
        false
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, BrokerError> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        Ok(live(map.get(key), Instant::now()).map(<[u8]>::to_vec))
    }

    async fn swap(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
        ttl: Option<Duration>,
    ) -> Result<bool, BrokerError> {
        let now = Instant::now();
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if live(map.get(key), now) != expected {
            return Ok(false);
        }
        match new {
            Some(v) => {
                let until = ttl.map(|t| now + ttl_floor(t));
                map.insert(key.to_string(), (v.to_vec(), until));
            }
            None => {
                map.remove(key);
            }
        }
        sweep(&mut map, now);
        Ok(true)
    }

    async fn set(
        &self,
        key: &str,
        value: Option<&[u8]>,
        ttl: Option<Duration>,
    ) -> Result<(), BrokerError> {
        let now = Instant::now();
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        match value {
            Some(v) => {
                map.insert(
                    key.to_string(),
                    (v.to_vec(), ttl.map(|t| now + ttl_floor(t))),
                );
            }
            None => {
                map.remove(key);
            }
        }
        sweep(&mut map, now);
        Ok(())
    }
}

/// Expired entries would pile up under keys never touched again: swept now and then.
fn sweep(map: &mut std::collections::HashMap<String, Entry>, now: Instant) {
    {
        if map.len() > 1024 && map.len().is_power_of_two() {
            map.retain(|_, (_, until)| until.is_none_or(|u| u > now));
        }
    }
}

/// `[store] kind = "memory"`: a [`MemoryStore`] per connect (one process only).
pub struct MemoryStoreFactory;

#[derive(Debug)]
struct MemoryStoreSetup(MemoryStore);

impl StoreFactory for MemoryStoreFactory {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn configure(&self, settings: &Settings) -> Result<Box<dyn StoreSetup>, SettingsError> {
        if let Some(key) = settings.table().keys().next() {
            return Err(SettingsError::at(
                key.clone(),
                "the memory store takes no settings",
            ));
        }
        Ok(Box::new(MemoryStoreSetup(MemoryStore::new())))
    }
}

/// A setup handing out one shared [`MemoryStore`] (the memory broker's own store).
pub fn memory_setup(store: MemoryStore) -> Box<dyn StoreSetup> {
    Box::new(MemoryStoreSetup(store))
}

#[async_trait]
impl StoreSetup for MemoryStoreSetup {
    fn describe(&self) -> String {
        "memory (this process only)".to_string()
    }

    async fn connect(&self) -> Result<Arc<dyn Store>, BrokerError> {
        Ok(Arc::new(self.0.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn expiry_makes_a_value_absent() {
        let s = MemoryStore::new();
        let ttl = Some(Duration::from_millis(30));
        assert!(s.swap("k", None, Some(b"1"), ttl).await.unwrap());
        assert!(!s.swap("k", None, Some(b"2"), ttl).await.unwrap());
        tokio::time::sleep(Duration::from_millis(40)).await;
        assert_eq!(s.get("k").await.unwrap(), None);
        assert!(s.swap("k", None, Some(b"2"), None).await.unwrap());
        assert_eq!(s.get("k").await.unwrap().as_deref(), Some(&b"2"[..]));
    }
}
