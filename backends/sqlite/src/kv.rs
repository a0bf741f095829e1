//! The state store in the SQLite file (`[store] kind = "sqlite"`, or the SQLite broker's own
//! when the config has no `[store]`): table `stevedore_kv`, TTLs on this machine's clock,
//! compare-and-swap in one `BEGIN IMMEDIATE` transaction, so every process that opens the file
//! sees one state.

use crate::store::{file_error, open_writer, Durability};
use crate::{now_ms, DEFAULT_PATH};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde::Deserialize;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use stevedore_core::factory::{Settings, SettingsError};
use stevedore_core::store::{ttl_floor, Store, StoreFactory, StoreSetup};
use stevedore_core::{async_trait, BrokerError};

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS stevedore_kv (
    key        TEXT PRIMARY KEY,
    value      BLOB NOT NULL,
    expires_ms INTEGER
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS stevedore_kv_expires ON stevedore_kv (expires_ms)
    WHERE expires_ms IS NOT NULL;";

/// A [`Store`] in one SQLite file. Cheap to clone (clones share one connection). Thread safe:
/// each call runs on tokio's blocking pool.
#[derive(Clone, Debug)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
    path: Arc<PathBuf>,
    swaps: Arc<AtomicU32>,
}

impl SqliteStore {
    /// Opens `path` (creating the file and table when missing; its directory must exist).
    pub async fn open(path: impl Into<PathBuf>) -> Result<Self, BrokerError> {
        let path = path.into();
        let p = path.clone();
        let conn = tokio::task::spawn_blocking(move || {
            let conn = open_writer(&p, Durability::Full, None)?;
            conn.execute_batch(SCHEMA).map_err(|e| file_error(&p, &e))?;
            Ok::<_, BrokerError>(conn)
        })
        .await
        .map_err(|e| BrokerError::permanent(format!("sqlite store: {e}")))??;
        Ok(SqliteStore {
            conn: Arc::new(Mutex::new(conn)),
            path: Arc::new(path),
            swaps: Arc::new(AtomicU32::new(0)),
        })
    }

    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, BrokerError> {
        let conn = self.conn.clone();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let mut c = conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut c).map_err(|e| file_error(&path, &e))
        })
        .await
        .map_err(|e| BrokerError::permanent(format!("sqlite store: {e}")))?
    }
}

#[async_trait]
impl Store for SqliteStore {
    fn name(&self) -> &'static str {
        "sqlite"
    }

    fn shared_across_machines(&self) -> bool {
        false
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, BrokerError> {
        let key = key.to_string();
        self.with(move |c| {
            c.query_row(
                "SELECT value FROM stevedore_kv WHERE key = ?1 AND (expires_ms IS NULL OR expires_ms > ?2)",
                params![key, now_ms()],
                |r| r.get(0),
            )
            .optional()
        })
        .await
    }

    async fn swap(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
        ttl: Option<Duration>,
    ) -> Result<bool, BrokerError> {
        let key = key.to_string();
        let expected = expected.map(<[u8]>::to_vec);
        let new = new.map(<[u8]>::to_vec);
        let sweep = self.swaps.fetch_add(1, Ordering::Relaxed) % 256 == 255;
        self.with(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            // After the lock: the wait for it (up to the busy timeout) must not shorten TTLs.
            let now = now_ms();
            let current: Option<Vec<u8>> = tx
                .query_row(
                    "SELECT value FROM stevedore_kv WHERE key = ?1 AND (expires_ms IS NULL OR expires_ms > ?2)",
                    params![key, now],
                    |r| r.get(0),
                )
                .optional()?;
            if current != expected {
                return Ok(false);
            }
            match new {
                Some(v) => {
                    let until = ttl.map(|t| {
                        now.saturating_add(i64::try_from(ttl_floor(t).as_millis()).unwrap_or(i64::MAX))
                    });
                    tx.execute(
                        "INSERT OR REPLACE INTO stevedore_kv (key, value, expires_ms) VALUES (?1, ?2, ?3)",
                        params![key, v, until],
                    )?;
                }
                None => {
                    tx.execute("DELETE FROM stevedore_kv WHERE key = ?1", params![key])?;
                }
            }
            if sweep {
                tx.execute(
                    "DELETE FROM stevedore_kv WHERE expires_ms IS NOT NULL AND expires_ms <= ?1",
                    params![now],
                )?;
            }
            tx.commit()?;
            Ok(true)
        })
        .await
    }
}

/// The factory of `[store] kind = "sqlite"`. Key: `path` (default `"stevedore.db"`): every
/// process on this machine that opens the file shares the state; processes on other machines
/// do not (use `redis` or `postgres` there).
#[derive(Clone, Copy, Debug, Default)]
pub struct SqliteStoreFactory;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StoreSettings {
    path: Option<PathBuf>,
}

/// A SQLite store configured, not opened.
#[derive(Debug)]
pub(crate) struct SqliteStoreSetup {
    pub(crate) path: PathBuf,
}

impl StoreFactory for SqliteStoreFactory {
    fn kind(&self) -> &'static str {
        "sqlite"
    }

    fn configure(&self, settings: &Settings) -> Result<Box<dyn StoreSetup>, SettingsError> {
        let s: StoreSettings = settings.parse()?;
        let path = s.path.unwrap_or_else(|| PathBuf::from(DEFAULT_PATH));
        if path.as_os_str().is_empty() {
            return Err(SettingsError::at(
                "path",
                "must not be empty (e.g. \"stevedore.db\")",
            ));
        }
        Ok(Box::new(SqliteStoreSetup { path }))
    }
}

#[async_trait]
impl StoreSetup for SqliteStoreSetup {
    fn describe(&self) -> String {
        format!(
            "sqlite in {} (table stevedore_kv; shared by the processes of this machine)",
            self.path.display()
        )
    }

    async fn connect(&self) -> Result<Arc<dyn Store>, BrokerError> {
        Ok(Arc::new(SqliteStore::open(self.path.clone()).await?))
    }
}
