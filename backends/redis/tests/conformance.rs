//! The conformance suite against real Redis servers, one named test per scenario
//! (`cargo test -p stevedore-redis --test conformance -- --list`):
//! - every scenario against the machine's Redis on 127.0.0.1:6379 (`REDIS_URL` overrides);
//! - scenario 16 (broker restart mid-run) against a private `redis-server` this test starts on a free
//!   loopback port with `appendonly yes`, so a restart keeps the data, and restarts it. The shared
//!   server is never restarted (it keeps nothing on disk, and other work may be using it).
//!
//! Every run uses a key prefix of its own (`ct<pid>-<n>:`); at the end of the run, passed or
//! failed, [`Backend::cleanup`] deletes every key under it (streams, delay sets, lease hashes) and
//! checks that none is left.

use std::sync::Arc;
use std::time::Duration;
use stevedore_conformance::servers::RedisServer;
use stevedore_conformance::{async_trait, Backend};
use stevedore_core::{Broker, BrokerError};
use stevedore_redis::{RedisBroker, RedisConfig};

struct RedisBackend {
    url: String,
    server: Option<RedisServer>,
    /// This run's key prefix.
    prefix: String,
}

impl RedisBackend {
    fn new(url: String, server: Option<RedisServer>) -> Self {
        RedisBackend {
            url,
            server,
            prefix: stevedore_conformance::run_prefix(':'),
        }
    }

    async fn keys(
        &self,
        c: &mut ::redis::aio::MultiplexedConnection,
    ) -> Result<Vec<String>, String> {
        let mut cursor: u64 = 0;
        let mut keys = Vec::new();
        loop {
            let (next, batch): (u64, Vec<String>) = ::redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{}*", self.prefix))
                .arg("COUNT")
                .arg(1000)
                .query_async(c)
                .await
                .map_err(|e| e.to_string())?;
            keys.extend(batch);
            cursor = next;
            if cursor == 0 {
                return Ok(keys);
            }
        }
    }
}

#[async_trait]
impl Backend for RedisBackend {
    fn name(&self) -> &'static str {
        "redis"
    }

    async fn connect(&self) -> Result<Arc<dyn Broker>, BrokerError> {
        let mut cfg = RedisConfig::new(self.url.clone());
        cfg.key_prefix = self.prefix.clone();
        Ok(Arc::new(RedisBroker::connect(cfg).await?))
    }

    async fn store(&self) -> Result<Arc<dyn stevedore_core::store::Store>, String> {
        // The broker's own: keys under this run's prefix on the same server.
        let store = stevedore_redis::RedisStore::connect(&self.url, &self.prefix)
            .await
            .map_err(|e| e.to_string())?;
        Ok(Arc::new(store))
    }

    async fn publish_foreign(&self, queue: &str, body: &[u8]) -> Result<(), String> {
        // Exactly what `redis-cli XADD <queue> * payload '<body>'` sends.
        let client = ::redis::Client::open(self.url.as_str()).map_err(|e| e.to_string())?;
        let mut c = client
            .get_multiplexed_async_connection()
            .await
            .map_err(|e| e.to_string())?;
        let _: String = ::redis::cmd("XADD")
            .arg(format!("{}{queue}", self.prefix))
            .arg("*")
            .arg("payload")
            .arg(body)
            .query_async(&mut c)
            .await
            .map_err(|e| e.to_string())?;
        Ok(())
    }

    async fn cleanup(&self, _queues: &[String]) -> Result<usize, String> {
        let client = ::redis::Client::open(self.url.as_str()).map_err(|e| e.to_string())?;
        let mut c = client
            .get_multiplexed_async_connection()
            .await
            .map_err(|e| e.to_string())?;
        let keys = self.keys(&mut c).await?;
        for chunk in keys.chunks(500) {
            let _: u64 = ::redis::cmd("DEL")
                .arg(chunk)
                .query_async(&mut c)
                .await
                .map_err(|e| e.to_string())?;
        }
        let left = self.keys(&mut c).await?;
        if !left.is_empty() {
            return Err(format!(
                "{} keys under {} survived DEL",
                left.len(),
                self.prefix
            ));
        }
        Ok(keys.len())
    }

    async fn restart(&self) -> Result<(), String> {
        let Some(p) = &self.server else {
            return Err("the machine's shared Redis (no persistence) is never restarted by tests; scenario 16 runs against a private persistent redis-server".into());
        };
        tokio::task::block_in_place(|| p.restart(Duration::from_millis(500)))
    }
}

fn machine_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

/// Scenario 16 restarts a private, persistent `redis-server` on a free loopback port.
fn private_server() -> Result<Arc<dyn Backend>, String> {
    let server = RedisServer::start()?;
    let url = server.url();
    Ok(Arc::new(RedisBackend::new(url, Some(server))))
}

mod redis {
    stevedore_conformance::conformance_tests! {
        backend: || std::sync::Arc::new(super::RedisBackend::new(super::machine_url(), None)),
        restart: super::private_server,
    }
}
