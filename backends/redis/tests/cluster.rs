//! The conformance suite against a Redis Cluster this test starts: 3 masters with a replica each,
//! on free loopback ports (`redis-server --cluster-enabled`, joined by `redis-cli --cluster
//! create`), the backend with `cluster = true` and every node as a seed. One named test per
//! scenario (`cargo test -p stevedore-redis --test cluster -- --list`). Scenario 16 (broker
//! restart) stops every node and starts them again on the same data.
//!
//! The failover of one master under a running worker is a cell of the fault table
//! (`tests/e2e/faults.rs`, row redis, "cluster failover").

use std::sync::Arc;
use std::time::Duration;
use stevedore_conformance::servers::RedisCluster;
use stevedore_conformance::{async_trait, Backend};
use stevedore_core::{Broker, BrokerError};
use stevedore_redis::{RedisBroker, RedisConfig, RedisStore};

struct ClusterBackend {
    cluster: Result<RedisCluster, String>,
    prefix: String,
}

impl ClusterBackend {
    fn start() -> Self {
        ClusterBackend {
            cluster: RedisCluster::start(3),
            prefix: stevedore_conformance::run_prefix(':'),
        }
    }

    fn cluster(&self) -> Result<&RedisCluster, String> {
        self.cluster
            .as_ref()
            .map_err(|e| format!("the test's Redis Cluster did not start: {e}"))
    }

    fn config(&self) -> Result<RedisConfig, String> {
        let mut cfg = RedisConfig::new(self.cluster()?.urls());
        cfg.cluster = true;
        cfg.key_prefix = self.prefix.clone();
        Ok(cfg)
    }
}

#[async_trait]
impl Backend for ClusterBackend {
    fn name(&self) -> &'static str {
        "redis-cluster"
    }

    async fn connect(&self) -> Result<Arc<dyn Broker>, BrokerError> {
        let cfg = self.config().map_err(BrokerError::permanent)?;
        Ok(Arc::new(RedisBroker::connect(cfg).await?))
    }

    async fn store(&self) -> Result<Arc<dyn stevedore_core::store::Store>, String> {
        let store = RedisStore::connect_with(&self.config()?)
            .await
            .map_err(|e| e.to_string())?;
        Ok(Arc::new(store))
    }

    async fn publish_foreign(&self, queue: &str, body: &[u8]) -> Result<(), String> {
        // What `redis-cli -c XADD <queue> * payload '<body>'` sends, through a cluster client.
        let nodes: Vec<String> = self
            .cluster()?
            .urls()
            .split(',')
            .map(str::to_string)
            .collect();
        let client = ::redis::cluster::ClusterClient::new(nodes).map_err(|e| e.to_string())?;
        let mut c = client
            .get_async_connection()
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
        let cluster = self.cluster()?;
        let prefix = self.prefix.clone();
        tokio::task::block_in_place(|| {
            let n = cluster.delete_prefix(&prefix)?;
            let left = cluster.delete_prefix(&prefix)?;
            if left > 0 {
                return Err(format!("{left} keys under {prefix} survived DEL"));
            }
            Ok(n)
        })
    }

    async fn restart(&self) -> Result<(), String> {
        let cluster = self.cluster()?;
        tokio::task::block_in_place(|| cluster.restart(Duration::from_millis(500)))
    }
}

mod redis_cluster {
    stevedore_conformance::conformance_tests! {
        backend: || std::sync::Arc::new(super::ClusterBackend::start()),
    }
}
