//! The state store on Redis (`[store] kind = "redis"`, or the Redis broker's own when the config
//! has no `[store]`): one string key per entry under `<key_prefix>stevedore:kv:`, TTLs on the
//! server's clock (`PX`), compare-and-swap in one Lua script.

use crate::conn::{Conn, Connector};
use crate::{err, redact, RedisConfig};
use redis::Script;
use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;
use stevedore_core::factory::{url_setting, Settings, SettingsError};
use stevedore_core::store::{ttl_floor, Store, StoreFactory, StoreSetup};
use stevedore_core::{async_trait, BrokerError};

/// Compare-and-swap of one key: ARGV = has_expected, expected, has_new, new, ttl_ms (0: none).
const SWAP: &str = r"
local cur = redis.call('GET', KEYS[1])
if ARGV[1] == '0' then
  if cur then return 0 end
elseif (not cur) or cur ~= ARGV[2] then
  return 0
end
if ARGV[3] == '0' then
  redis.call('DEL', KEYS[1])
elseif ARGV[5] ~= '0' then
  redis.call('SET', KEYS[1], ARGV[4], 'PX', ARGV[5])
else
  redis.call('SET', KEYS[1], ARGV[4])
end
return 1
";

/// A [`Store`] on one Redis. Cheap to clone; reconnects on its own. Thread safe.
#[derive(Clone)]
pub struct RedisStore {
    conn: Conn,
    prefix: String,
    script: Arc<Script>,
    url_redacted: String,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("url", &self.url_redacted)
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl RedisStore {
    /// Connects to one server at `url`; keys go under `<key_prefix>stevedore:kv:`.
    pub async fn connect(url: &str, key_prefix: &str) -> Result<Self, BrokerError> {
        let mut config = RedisConfig::new(url);
        config.key_prefix = key_prefix.to_string();
        Self::connect_with(&config).await
    }

    /// Connects as `config` says (its `url`, `cluster` and `key_prefix`); keys go under
    /// `<key_prefix>stevedore:kv:`. Each operation touches one key, so it runs on a cluster too.
    pub async fn connect_with(config: &RedisConfig) -> Result<Self, BrokerError> {
        let url_redacted = redact(&config.url);
        let conn = Connector::new(config)?.commands().await.map_err(|e| {
            BrokerError::Connection(format!("cannot connect to {url_redacted}: {e}"))
        })?;
        Ok(RedisStore {
            conn,
            prefix: format!("{}stevedore:kv:", config.key_prefix),
            script: Arc::new(Script::new(SWAP)),
            url_redacted,
        })
    }
}

#[async_trait]
impl Store for RedisStore {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn shared_across_machines(&self) -> bool {
        true
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, BrokerError> {
        let mut c = self.conn.clone();
        redis::cmd("GET")
            .arg(format!("{}{key}", self.prefix))
            .query_async(&mut c)
            .await
            .map_err(err)
    }

    async fn set(
        &self,
        key: &str,
        value: Option<&[u8]>,
        ttl: Option<Duration>,
    ) -> Result<(), BrokerError> {
        let mut c = self.conn.clone();
        let key = format!("{}{key}", self.prefix);
        let cmd = match value {
            Some(v) => {
                let mut cmd = redis::cmd("SET");
                cmd.arg(&key).arg(v);
                if let Some(t) = ttl {
                    let ms = u64::try_from(ttl_floor(t).as_millis()).unwrap_or(u64::MAX);
                    cmd.arg("PX").arg(ms);
                }
                cmd
            }
            None => {
                let mut cmd = redis::cmd("DEL");
                cmd.arg(&key);
                cmd
            }
        };
        let _: redis::Value = cmd.query_async(&mut c).await.map_err(err)?;
        Ok(())
    }

    async fn swap(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
        ttl: Option<Duration>,
    ) -> Result<bool, BrokerError> {
        let ttl_ms = ttl.map_or(0, |t| {
            u64::try_from(ttl_floor(t).as_millis()).unwrap_or(u64::MAX)
        });
        let mut c = self.conn.clone();
        let won: i64 = self
            .script
            .key(format!("{}{key}", self.prefix))
            .arg(u8::from(expected.is_some()))
            .arg(expected.unwrap_or_default())
            .arg(u8::from(new.is_some()))
            .arg(new.unwrap_or_default())
            .arg(ttl_ms)
            .invoke_async(&mut c)
            .await
            .map_err(err)?;
        Ok(won == 1)
    }
}

/// The factory of `[store] kind = "redis"`. Keys: `url` (required, `redis://` or `rediss://`;
/// with `cluster`, nodes separated by commas), `cluster` (default false), `key_prefix` (default
/// `""`).
#[derive(Clone, Copy, Debug, Default)]
pub struct RedisStoreFactory;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StoreSettings {
    url: Option<String>,
    cluster: Option<bool>,
    key_prefix: Option<String>,
}

/// A Redis store configured, not connected.
#[derive(Debug)]
pub(crate) struct RedisStoreSetup {
    pub(crate) url: String,
    pub(crate) key_prefix: String,
    pub(crate) cluster: bool,
}

impl RedisStoreSetup {
    fn config(&self) -> RedisConfig {
        let mut c = RedisConfig::new(self.url.clone());
        c.key_prefix = self.key_prefix.clone();
        c.cluster = self.cluster;
        c
    }
}

impl StoreFactory for RedisStoreFactory {
    fn kind(&self) -> &'static str {
        "redis"
    }

    fn configure(&self, settings: &Settings) -> Result<Box<dyn StoreSetup>, SettingsError> {
        let s: StoreSettings = settings.parse()?;
        let url = url_setting(
            "url",
            s.url,
            "redis",
            &["redis://", "rediss://"],
            "redis://localhost:6379/0",
            redact,
        )?;
        let setup = RedisStoreSetup {
            url,
            key_prefix: s.key_prefix.unwrap_or_default(),
            cluster: s.cluster.unwrap_or(false),
        };
        crate::factory::check_cluster(&setup.config())?;
        Ok(Box::new(setup))
    }
}

#[async_trait]
impl StoreSetup for RedisStoreSetup {
    fn describe(&self) -> String {
        format!(
            "redis at {} (keys {}stevedore:kv:*)",
            redact(&self.url),
            self.key_prefix
        )
    }

    async fn connect(&self) -> Result<Arc<dyn Store>, BrokerError> {
        Ok(Arc::new(RedisStore::connect_with(&self.config()).await?))
    }
}
