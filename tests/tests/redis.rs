//! The conformance suite against real Redis servers:
//! - every scenario against the machine's Redis on 127.0.0.1:6379 (`REDIS_URL` overrides);
//! - scenario 16 (broker restart mid-run) against a private `redis-server` this test starts on a free
//!   loopback port with `appendonly yes`, so a restart keeps the data, and restarts it. The shared
//!   server is never restarted (it keeps nothing on disk, and other work may be using it).

use std::sync::Arc;
use std::time::Duration;
use stevedore_conformance::servers::RedisServer;
use stevedore_conformance::{async_trait, check, Backend};
use stevedore_core::{Broker, BrokerError};
use stevedore_redis::{RedisBroker, RedisConfig};

struct RedisBackend {
    url: String,
    server: Option<RedisServer>,
}

#[async_trait]
impl Backend for RedisBackend {
    fn name(&self) -> &'static str {
        "redis"
    }

    async fn connect(&self) -> Result<Arc<dyn Broker>, BrokerError> {
        Ok(Arc::new(
            RedisBroker::connect(RedisConfig::new(self.url.clone())).await?,
        ))
    }

    async fn publish_foreign(&self, queue: &str, body: &[u8]) -> Result<(), String> {
        // Exactly what `redis-cli XADD <queue> * payload '<body>'` sends.
        let client = redis::Client::open(self.url.as_str()).map_err(|e| e.to_string())?;
        let mut c = client
            .get_multiplexed_async_connection()
            .await
            .map_err(|e| e.to_string())?;
        let _: String = redis::cmd("XADD")
            .arg(queue)
            .arg("*")
            .arg("payload")
            .arg(body)
            .query_async(&mut c)
            .await
            .map_err(|e| e.to_string())?;
        Ok(())
    }

    async fn restart(&self) -> Result<(), String> {
        let Some(p) = &self.server else {
            return Err("the machine's shared Redis (no persistence) is never restarted by tests; scenario 16 runs in redis_restart against a private persistent redis-server".into());
        };
        tokio::task::block_in_place(|| p.restart(Duration::from_millis(500)))
    }
}

fn machine_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

/// The two tests never overlap (timing scenarios and a server restart on a 2-core machine).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_conformance() {
    let _one = ONE_AT_A_TIME.lock().await;
    let backend = Arc::new(RedisBackend {
        url: machine_url(),
        server: None,
    });
    check(backend, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart() {
    let _one = ONE_AT_A_TIME.lock().await;
    let server = RedisServer::start().unwrap_or_else(|e| panic!("{e}"));
    let url = server.url();
    let backend = Arc::new(RedisBackend {
        url,
        server: Some(server),
    });
    check(backend, Some(&[16])).await;
}
