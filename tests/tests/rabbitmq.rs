//! The conformance suite against real RabbitMQ servers:
//! - every scenario against the machine's RabbitMQ on 127.0.0.1:5672 (`RABBITMQ_URL` overrides);
//! - scenario 16 (broker restart mid-run) against a private `rabbitmq-server` this test starts on
//!   free loopback ports ([`RabbitServer`]) and restarts. The machine's server is never restarted.
//!
//! Queues declared here get `x-expires` (5 min), so the shared server does not collect the suite's
//! uniquely named queues run after run.

use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use std::sync::Arc;
use std::time::Duration;
use stevedore_conformance::servers::RabbitServer;
use stevedore_conformance::{async_trait, check, Backend};
use stevedore_core::{Broker, BrokerError};
use stevedore_rabbitmq::{RabbitBroker, RabbitConfig};

struct RabbitBackend {
    url: String,
    server: Option<RabbitServer>,
}

fn config(url: &str) -> RabbitConfig {
    let mut c = RabbitConfig::new(url);
    c.queue_expires = Some(Duration::from_secs(5 * 60));
    c
}

#[async_trait]
impl Backend for RabbitBackend {
    fn name(&self) -> &'static str {
        "rabbitmq"
    }

    async fn connect(&self) -> Result<Arc<dyn Broker>, BrokerError> {
        Ok(Arc::new(RabbitBroker::connect(config(&self.url)).await?))
    }

    async fn publish_foreign(&self, queue: &str, body: &[u8]) -> Result<(), String> {
        // What any AMQP client does: publish the bytes to the queue through the default exchange,
        // no headers, no message id, not even a content type.
        let conn = Connection::connect(&self.url, ConnectionProperties::default())
            .await
            .map_err(|e| e.to_string())?;
        let ch = conn.create_channel().await.map_err(|e| e.to_string())?;
        ch.basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .map_err(|e| e.to_string())?;
        // Closing the channel flushes the publish before the connection goes.
        ch.close(200, "done".into())
            .await
            .map_err(|e| e.to_string())?;
        conn.close(200, "done".into())
            .await
            .map_err(|e| e.to_string())
    }

    async fn restart(&self) -> Result<(), String> {
        let Some(server) = &self.server else {
            return Err(
                "the machine's shared RabbitMQ is never restarted by tests; scenario 16 \
                        runs in rabbitmq_restart against a private rabbitmq-server"
                    .into(),
            );
        };
        tokio::task::block_in_place(|| server.restart(Duration::from_millis(500)))
    }
}

fn machine_url() -> String {
    std::env::var("RABBITMQ_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// The two tests never overlap: booting a private Erlang node next to the suite starves the shared
/// broker on a 2-core machine.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_conformance() {
    let _one = ONE_AT_A_TIME.lock().await;
    let backend = Arc::new(RabbitBackend {
        url: machine_url(),
        server: None,
    });
    check(backend, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_restart() {
    let _one = ONE_AT_A_TIME.lock().await;
    let server = tokio::task::block_in_place(RabbitServer::start).unwrap_or_else(|e| panic!("{e}"));
    let url = server.url();
    let backend = Arc::new(RabbitBackend {
        url,
        server: Some(server),
    });
    check(backend, Some(&[16])).await;
}
