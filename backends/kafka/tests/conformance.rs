//! The conformance suite on Kafka, each scenario against a private tansu broker of its own on a
//! free loopback port: `cargo test -p stevedore-kafka --features conformance --test conformance`
//! (opt in while the backend is in progress: see the feature's note in Cargo.toml).

use std::sync::Arc;
use std::time::Duration;
use stevedore_conformance::servers::TansuServer;
use stevedore_conformance::{async_trait, Backend};
use stevedore_core::{Broker, BrokerError};
use stevedore_kafka::{KafkaBroker, KafkaConfig};

struct KafkaBackend {
    server: TansuServer,
}

impl KafkaBackend {
    fn start() -> Arc<dyn Backend> {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let server = TansuServer::start().unwrap_or_else(|e| panic!("{e}"));
        Arc::new(KafkaBackend { server })
    }

    fn config(&self) -> KafkaConfig {
        let mut c = KafkaConfig::new(self.server.bootstrap());
        c.partitions = 4;
        c.session_timeout = Duration::from_secs(6);
        // tansu's high watermark is right only for one record per batch (see TansuServer).
        c.properties.insert("batch.num.messages".into(), "1".into());
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
        Err("the test broker (tansu) keeps its topics in memory only".into())
    }

    async fn isolated(&self) -> Result<Option<Arc<dyn Backend>>, String> {
        let server = tokio::task::spawn_blocking(TansuServer::start)
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
