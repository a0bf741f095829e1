//! The conformance suite on Kafka, each scenario against a private Kafka-protocol broker of its
//! own (nisshi; scenario 16's keeps its topics in a SQLite file, so that it can restart it) on a free
//! loopback port: `cargo test -p stevedore-kafka --test conformance`.

use std::sync::Arc;
use std::time::Duration;
use stevedore_conformance::servers::KafkaServer;
use stevedore_conformance::{async_trait, Backend};
use stevedore_core::{Broker, BrokerError};
use stevedore_kafka::{KafkaBroker, KafkaConfig};

struct KafkaBackend {
    server: KafkaServer,
}

impl KafkaBackend {
    fn start() -> Arc<dyn Backend> {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let server = KafkaServer::start().unwrap_or_else(|e| panic!("{e}"));
        Arc::new(KafkaBackend { server })
    }

    fn config(&self) -> KafkaConfig {
        let mut c = KafkaConfig::new(self.server.bootstrap());
        c.partitions = 4;
        c.session_timeout = Duration::from_secs(6);
        if let Ok(d) = std::env::var("KAFKA_DEBUG") {
            c.properties.insert("debug".into(), d);
        }
        c
    }
}

#[async_trait]
impl Backend for KafkaBackend {
    fn name(&self) -> &'static str {
        "kafka"
    }

    async fn connect(&self) -> Result<Arc<dyn Broker>, BrokerError> {
        Ok(Arc::new(KafkaBroker::connect(self.config()).await?))
    }

    async fn publish_foreign(&self, queue: &str, body: &[u8]) -> Result<(), String> {
        use rdkafka::producer::{FutureProducer, FutureRecord};
        let producer: FutureProducer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", self.server.bootstrap())
            .create()
            .map_err(|e| e.to_string())?;
        producer
            .send(
                FutureRecord::<(), [u8]>::to(queue).payload(body),
                Duration::from_secs(10),
            )
            .await
            .map(|_| ())
            .map_err(|(e, _)| e.to_string())
    }

    async fn restart(&self) -> Result<(), String> {
        let server = &self.server;
        if !server.is_durable() {
            return Err("this test broker keeps its topics in memory".into());
        }
        // Stopping waits for the process; the blocking pool keeps the runtime free meanwhile.
        tokio::task::block_in_place(|| server.restart())
    }

    /// A server of its own per scenario: the scenarios' many groups rebalancing on one broker
    /// made its coordinator the bottleneck. In memory, except for the restart scenario: with
    /// its SQLite store nisshi served a checkpoint write in 150–250 ms under the priority
    /// scenario's load, against ~30 ms in memory (measured here).
    async fn isolated(&self, restarts: bool) -> Result<Option<Arc<dyn Backend>>, String> {
        let start = if restarts {
            KafkaServer::start_durable
        } else {
            KafkaServer::start
        };
        let server = tokio::task::spawn_blocking(start)
            .await
            .map_err(|e| e.to_string())??;
        Ok(Some(Arc::new(KafkaBackend { server })))
    }
}

mod kafka {
    stevedore_conformance::conformance_tests! {
        backend: || super::KafkaBackend::start(),
    }
}
