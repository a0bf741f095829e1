//! # stevedore-postgres
//!
//! The state store on PostgreSQL (`[store] kind = "postgres"`): the shared state behind periodic
//! jobs, unique jobs and rate limits, for brokers that cannot hold it themselves (RabbitMQ, SQS,
//! Kafka) or for teams that keep their state in the database they already run.
//!
//! One table (`stevedore_kv` by default, created at connect when missing): `key TEXT PRIMARY
//! KEY, value BYTEA, expires_at TIMESTAMPTZ`. Every operation is one statement, so the
//! compare-and-swap of [`Store::swap`] is atomic under PostgreSQL's own row locking (an upsert
//! that only overwrites an expired row; an update or delete that matches the expected value).
//! TTLs are on the server's clock (`now()`), so workers' clocks do not matter. Expired rows are
//! never seen and are swept now and then.
//!
//! ```no_run
//! use stevedore_core::store::Store;
//! use stevedore_postgres::PostgresStore;
//! # #[tokio::main] async fn main() -> Result<(), stevedore_core::BrokerError> {
//! let store = PostgresStore::connect("postgres://postgres@127.0.0.1:5432/test", "stevedore_kv").await?;
//! assert!(store.swap("hello", None, Some(b"world"), None).await? || true);
//! # Ok(()) }
//! ```
#![doc(html_no_source)]

pub mod outbox;

/// The sqlx this crate is built on (0.8): its `PgConnection` and transactions are what
/// [`PostgresStore::mark_in`] and [`outbox::insert`] take.
pub use sqlx;

use serde::Deserialize;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::Connection;
use sqlx::Row;
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;
use stevedore_core::factory::{url_setting, Settings, SettingsError};
use stevedore_core::store::{ttl_floor, Store, StoreFactory, StoreSetup};
use stevedore_core::{async_trait, BrokerError};

/// The table when `[store] table` is not set.
pub const DEFAULT_TABLE: &str = "stevedore_kv";

/// A [`Store`] on PostgreSQL. Cheap to clone (a connection pool). Thread safe.
#[derive(Clone)]
pub struct PostgresStore {
    pool: PgPool,
    table: Arc<str>,
    url_redacted: Arc<str>,
    swaps: Arc<AtomicU32>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("url", &self.url_redacted)
            .field("table", &self.table)
            .finish()
    }
}

/// `postgres://user:secret@host/db` → `postgres://user:***@host/db`.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let auth = &url[s + 3..at];
            let user = auth.split(':').next().unwrap_or_default();
            if auth.contains(':') {
                format!("{}{user}:***{}", &url[..s + 3], &url[at..])
            } else {
                url.to_string()
            }
        }
        _ => url.to_string(),
    }
}

fn err(e: sqlx::Error) -> BrokerError {
    match &e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => {
            BrokerError::Connection(format!("postgres: {e}"))
        }
        sqlx::Error::Database(db) => {
            // Class 08 (connection), 40 (serialization, deadlock), 53 (resources), 57 (shutdown),
            // and 55P03 (a lock wait past lock_timeout).
            let transient = db.code().is_some_and(|c| {
                ["08", "40", "53", "57", "55P03"]
                    .iter()
                    .any(|p| c.starts_with(p))
            });
            if transient {
                BrokerError::Connection(format!("postgres: {e}"))
            } else {
                BrokerError::permanent(format!("postgres: {e}"))
            }
        }
        _ => BrokerError::permanent(format!("postgres: {e}")),
    }
}

/// Whether `name` is a plain SQL identifier (`[a-z_][a-z0-9_]*`, at most 63 bytes), optionally
/// schema-qualified once (`jobs.stevedore_kv`).
fn valid_table(name: &str) -> bool {
    let part = |p: &str| {
        !p.is_empty()
            && p.len() <= 63
            && p.bytes()
                .next()
                .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
            && p.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    };
    let mut parts = name.split('.');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(a), None, _) => part(a),
        (Some(a), Some(b), None) => part(a) && part(b),
        _ => false,
    }
}

impl PostgresStore {
    /// Marks `key` as `value` for `keep` on `conn` (inside the caller's transaction: the mark
    /// commits or rolls back with the caller's other writes), unless it already holds `value`
    /// and has not expired. Returns `true` when this call set it, `false` when it already held
    /// `value`. A concurrent transaction marking the same key waits for this one to end, then
    /// sees its mark (if it committed). The idempotent-handler inbox writes its `done` marks
    /// through this (`JobContext::mark_done_in` in the `stevedore` crate).
    pub async fn mark_in(
        &self,
        conn: &mut PgConnection,
        key: &str,
        value: &[u8],
        keep: Duration,
    ) -> Result<bool, BrokerError> {
        let t = &self.table;
        let sql = format!(
            "INSERT INTO {t} (key, value, expires_at) \
             VALUES ($1, $2, now() + ($3::bigint * interval '1 millisecond')) \
             ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, expires_at = EXCLUDED.expires_at \
             WHERE {t}.value <> EXCLUDED.value OR ({t}.expires_at IS NOT NULL AND {t}.expires_at <= now()) \
             RETURNING 1"
        );
        let row = sqlx::query(&sql)
            .bind(key)
            .bind(value)
            .bind(ttl_ms(Some(keep)))
            .fetch_optional(&mut *conn)
            .await
            .map_err(err)?;
        Ok(row.is_some())
    }

    /// Connects to `url` (`postgres://user[:password]@host[:port]/db`) and creates `table` when
    /// missing. `table` must be a plain identifier, optionally schema-qualified.
    pub async fn connect(url: &str, table: &str) -> Result<Self, BrokerError> {
        let url_redacted = redact(url);
        if !valid_table(table) {
            return Err(BrokerError::permanent(format!(
                "invalid table name {table:?}: lowercase letters, digits and '_' (optionally schema.table)"
            )));
        }
        let pool = connect_pool(url).await?;
        let create = format!(
            "CREATE TABLE IF NOT EXISTS {table} (key TEXT PRIMARY KEY, value BYTEA NOT NULL, expires_at TIMESTAMPTZ)"
        );
        // Two processes creating the table at once: one may see a unique violation on the
        // catalog; the table then exists, which is all we need. The index keeps the sweep of
        // expired keys from scanning the table.
        // (An index lives in its table's schema: its name is not qualified.)
        let index_name = format!("{}_expires", table.replace('.', "_"));
        let index = format!(
            "CREATE INDEX IF NOT EXISTS {index_name} ON {table} (expires_at) WHERE expires_at IS NOT NULL"
        );
        let created = async {
            sqlx::query(&create).execute(&pool).await?;
            sqlx::query(&index).execute(&pool).await
        };
        if let Err(e) = created.await {
            let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
                .bind(table)
                .fetch_one(&pool)
                .await
                .map_err(err)?;
            if !exists {
                return Err(err(e));
            }
        }
        Ok(PostgresStore {
            pool,
            table: table.into(),
            url_redacted: url_redacted.into(),
            swaps: Arc::new(AtomicU32::new(0)),
        })
    }
}

/// A small pool on `url`, after one direct connection: a server that is not there fails now,
/// once (the pool would retry until its acquire timeout); the caller decides whether to try
/// again. Errors carry the URL without its password.
pub(crate) async fn connect_pool(url: &str) -> Result<PgPool, BrokerError> {
    let url_redacted = redact(url);
    let options = PgConnectOptions::from_str(url)
        .map_err(|e| BrokerError::permanent(format!("invalid postgres url {url_redacted}: {e}")))?;
    let first = PgConnection::connect_with(&options).await.map_err(|e| {
        let e = err(e);
        let message = format!("cannot connect to {url_redacted}: {e}");
        if e.is_transient() {
            BrokerError::Connection(message)
        } else {
            BrokerError::permanent(message)
        }
    })?;
    let _ = first.close().await;
    Ok(PgPoolOptions::new()
        .max_connections(4)
        .min_connections(0)
        .acquire_timeout(Duration::from_secs(10))
        .idle_timeout(Duration::from_secs(300))
        // A statement never waits long for a row another transaction holds (an application's
        // transaction holding an inbox key, say): it fails as transient instead, and the
        // connection is free again at once rather than stuck until that transaction ends.
        .after_connect(|conn, _| {
            Box::pin(async move {
                sqlx::Executor::execute(&mut *conn, "SET lock_timeout = '3s'").await?;
                Ok(())
            })
        })
        .connect_lazy_with(options))
}

fn ttl_ms(ttl: Option<Duration>) -> Option<i64> {
    ttl.map(|t| i64::try_from(ttl_floor(t).as_millis()).unwrap_or(i64::MAX))
}

#[async_trait]
impl Store for PostgresStore {
    fn name(&self) -> &'static str {
        "postgres"
    }

    fn shared_across_machines(&self) -> bool {
        true
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, BrokerError> {
        let sql = format!(
            "SELECT value FROM {} WHERE key = $1 AND (expires_at IS NULL OR expires_at > now())",
            self.table
        );
        let row = sqlx::query(&sql)
            .bind(key)
            .fetch_optional(&self.pool)
            .await
            .map_err(err)?;
        row.map(|r| r.try_get::<Vec<u8>, _>(0))
            .transpose()
            .map_err(err)
    }

    async fn set(
        &self,
        key: &str,
        value: Option<&[u8]>,
        ttl: Option<Duration>,
    ) -> Result<(), BrokerError> {
        let t = &self.table;
        match value {
            Some(v) => {
                let sql = format!(
                    "INSERT INTO {t} (key, value, expires_at) \
                     VALUES ($1, $2, now() + ($3::bigint * interval '1 millisecond')) \
                     ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, expires_at = EXCLUDED.expires_at"
                );
                sqlx::query(&sql)
                    .bind(key)
                    .bind(v)
                    .bind(ttl_ms(ttl))
                    .execute(&self.pool)
                    .await
                    .map_err(err)?;
            }
            None => {
                let sql = format!("DELETE FROM {t} WHERE key = $1");
                sqlx::query(&sql)
                    .bind(key)
                    .execute(&self.pool)
                    .await
                    .map_err(err)?;
            }
        }
        Ok(())
    }

    async fn swap(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
        ttl: Option<Duration>,
    ) -> Result<bool, BrokerError> {
        let t = &self.table;
        let live = "(expires_at IS NULL OR expires_at > now())";
        let until = "now() + ($3::bigint * interval '1 millisecond')";
        let done = match (expected, new) {
            (None, None) => {
                let sql =
                    format!("SELECT NOT EXISTS (SELECT 1 FROM {t} WHERE key = $1 AND {live})");
                sqlx::query_scalar::<_, bool>(&sql)
                    .bind(key)
                    .fetch_one(&self.pool)
                    .await
                    .map_err(err)?
            }
            (None, Some(v)) => {
                let sql = format!(
                    "INSERT INTO {t} (key, value, expires_at) VALUES ($1, $2, {until}) \
                     ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, expires_at = EXCLUDED.expires_at \
                     WHERE {t}.expires_at IS NOT NULL AND {t}.expires_at <= now()"
                );
                sqlx::query(&sql)
                    .bind(key)
                    .bind(v)
                    .bind(ttl_ms(ttl))
                    .execute(&self.pool)
                    .await
                    .map_err(err)?
                    .rows_affected()
                    == 1
            }
            (Some(old), Some(v)) => {
                let sql = format!(
                    "UPDATE {t} SET value = $2, expires_at = {until} WHERE key = $1 AND value = $4 AND {live}"
                );
                sqlx::query(&sql)
                    .bind(key)
                    .bind(v)
                    .bind(ttl_ms(ttl))
                    .bind(old)
                    .execute(&self.pool)
                    .await
                    .map_err(err)?
                    .rows_affected()
                    == 1
            }
            (Some(old), None) => {
                let sql = format!("DELETE FROM {t} WHERE key = $1 AND value = $2 AND {live}");
                sqlx::query(&sql)
                    .bind(key)
                    .bind(old)
                    .execute(&self.pool)
                    .await
                    .map_err(err)?
                    .rows_affected()
                    == 1
            }
        };
        if self.swaps.fetch_add(1, Ordering::Relaxed) % 256 == 255 {
            let sql =
                format!("DELETE FROM {t} WHERE expires_at IS NOT NULL AND expires_at <= now()");
            if let Err(e) = sqlx::query(&sql).execute(&self.pool).await {
                tracing::debug!(error = %e, "postgres store: sweeping expired keys failed; next time");
            }
        }
        Ok(done)
    }
}

/// The factory of `[store] kind = "postgres"`. Keys of `[store]`:
///
/// | key | default | meaning |
/// |---|---|---|
/// | `url` | required | `postgres://user[:password]@host[:port]/database` (prefer `STEVEDORE_STORE__URL` for a password) |
/// | `table` | `"stevedore_kv"` | the table, created when missing; optionally `schema.table` |
#[derive(Clone, Copy, Debug, Default)]
pub struct PostgresStoreFactory;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PgSettings {
    url: Option<String>,
    table: Option<String>,
}

#[derive(Debug)]
struct PgSetup {
    url: String,
    table: String,
}

impl StoreFactory for PostgresStoreFactory {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    fn configure(&self, settings: &Settings) -> Result<Box<dyn StoreSetup>, SettingsError> {
        let s: PgSettings = settings.parse()?;
        let url = url_setting(
            "url",
            s.url,
            "postgres",
            &["postgres://", "postgresql://"],
            "postgres://stevedore@localhost:5432/app",
            redact,
        )?;
        let table = s.table.unwrap_or_else(|| DEFAULT_TABLE.to_string());
        if !valid_table(&table) {
            return Err(SettingsError::at(
                "table",
                format!(
                    "\"{table}\" is not a plain table name: lowercase letters, digits and '_', \
                     optionally \"schema.table\""
                ),
            ));
        }
        Ok(Box::new(PgSetup { url, table }))
    }
}

#[async_trait]
impl StoreSetup for PgSetup {
    fn describe(&self) -> String {
        format!("postgres at {} (table {})", redact(&self.url), self.table)
    }

    async fn connect(&self) -> Result<Arc<dyn Store>, BrokerError> {
        Ok(Arc::new(
            PostgresStore::connect(&self.url, &self.table).await?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_urls() {
        assert!(valid_table("stevedore_kv"));
        assert!(valid_table("jobs.kv2"));
        assert!(!valid_table("kv; drop table x"));
        assert!(!valid_table("a.b.c"));
        assert!(!valid_table("Kv"));
        assert_eq!(redact("postgres://u:pw@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        let e = PostgresStoreFactory
            .configure(&Settings::from_toml_like([("table", "x y".into())]))
            .unwrap_err();
        assert_eq!(e.key.as_deref(), Some("url"));
        let e = PostgresStoreFactory
            .configure(&Settings::from_toml_like([
                ("url", "postgres://h/db".into()),
                ("table", "x y".into()),
            ]))
            .unwrap_err();
        assert_eq!(e.key.as_deref(), Some("table"));
    }
}
