//! The conformance suite against real RabbitMQ servers, one named test per scenario
//! (`cargo test -p stevedore-rabbitmq --test conformance -- --list`):
//! - every scenario against the machine's RabbitMQ on 127.0.0.1:5672 (`RABBITMQ_URL` overrides);
//! - scenario 16 (broker restart mid-run) against a private `rabbitmq-server` this test starts on
//!   free loopback ports ([`RabbitServer`]) and restarts. The machine's server is never restarted.
//!
//! Every run uses a key prefix of its own (`ct<pid>-<n>.`), so its queues and its shared delay
//! topology are its own; at the end of the run, passed or failed, [`Backend::cleanup`] deletes
//! them all and checks with passive declares that none is left. `x-expires` (5 min) on every queue
//! is the backstop for a run that is killed before it can clean up.

use lapin::options::{
    BasicPublishOptions, ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use std::sync::Arc;
use std::time::Duration;
use stevedore_conformance::servers::RabbitServer;
use stevedore_conformance::{async_trait, derived_queues, Backend};
use stevedore_core::{Broker, BrokerError};
use stevedore_rabbitmq::{RabbitBroker, RabbitConfig};

struct RabbitBackend {
    url: String,
    server: Option<RabbitServer>,
    /// This run's key prefix.
    prefix: String,
    /// Whether the prefix's delay topology was created.
    warmed: std::sync::atomic::AtomicBool,
}

impl RabbitBackend {
    fn new(url: String, server: Option<RabbitServer>) -> Self {
        RabbitBackend {
            url,
            server,
            prefix: stevedore_conformance::run_prefix('.'),
            warmed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn config(&self) -> RabbitConfig {
        let mut c = RabbitConfig::new(&self.url);
        c.key_prefix = self.prefix.clone();
        c.queue_expires = Some(Duration::from_secs(5 * 60));
        c
    }
}

#[async_trait]
impl Backend for RabbitBackend {
    fn name(&self) -> &'static str {
        "rabbitmq"
    }

    async fn connect(&self) -> Result<Arc<dyn Broker>, BrokerError> {
        let broker = RabbitBroker::connect(self.config()).await?;
        // This run's prefix is new, so its shared delay topology does not exist yet: create it
        // on the first connection (the runner's probe, before any scenario), as a broker in
        // service has it, rather than inside whichever timing-sensitive scenario delays first.
        if !self.warmed.swap(true, std::sync::atomic::Ordering::AcqRel) {
            broker.delayed_total().await?;
        }
        Ok(Arc::new(broker))
    }

    async fn publish_foreign(&self, queue: &str, body: &[u8]) -> Result<(), String> {
        // What any AMQP client does: publish the bytes to the queue through the default exchange,
        // no headers, no message id, not even a content type.
        let conn = Connection::connect(&self.url, ConnectionProperties::default())
            .await
            .map_err(|e| e.to_string())?;
        let ch = conn.create_channel().await.map_err(|e| e.to_string())?;
        let queue = format!("{}{queue}", self.prefix);
        ch.basic_publish(
            "".into(),
            queue.as_str().into(),
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

    async fn cleanup(&self, queues: &[String]) -> Result<usize, String> {
        let e = |e: lapin::Error| e.to_string();
        let conn = Connection::connect(&self.url, ConnectionProperties::default())
            .await
            .map_err(e)?;
        let ch = conn.create_channel().await.map_err(e)?;
        let (delay_queues, delay_exchanges) = stevedore_rabbitmq::delay::topology(&self.prefix);
        let mut names: Vec<String> = queues
            .iter()
            .flat_map(|q| derived_queues(q))
            .map(|q| format!("{}{q}", self.prefix))
            .collect();
        names.extend(delay_queues);
        for q in &names {
            ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await
                .map_err(|err| format!("delete queue {q}: {err}"))?;
        }
        for x in &delay_exchanges {
            ch.exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
                .await
                .map_err(|err| format!("delete exchange {x}: {err}"))?;
        }
        // Check: a passive declare of each must fail with NOT_FOUND (which closes the channel).
        let mut left = Vec::new();
        for q in &names {
            let probe = conn.create_channel().await.map_err(e)?;
            let passive = QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            };
            if probe
                .queue_declare(q.as_str().into(), passive, FieldTable::default())
                .await
                .is_ok()
            {
                left.push(q.clone());
                let _ = probe.close(200, "checked".into()).await;
            }
        }
        let _ = conn.close(200, "cleaned up".into()).await;
        if !left.is_empty() {
            return Err(format!("queues still exist after deleting them: {left:?}"));
        }
        Ok(names.len() + delay_exchanges.len())
    }

    async fn restart(&self) -> Result<(), String> {
        let Some(server) = &self.server else {
            return Err(
                "the machine's shared RabbitMQ is never restarted by tests; scenario 16 \
                        runs against a private rabbitmq-server"
                    .into(),
            );
        };
        tokio::task::block_in_place(|| server.restart(Duration::from_millis(500)))
    }
}

fn machine_url() -> String {
    std::env::var("RABBITMQ_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// Scenario 16 restarts a private `rabbitmq-server` on free loopback ports. It boots after the
/// other scenarios are done (the suite's restart phase), never beside them: a booting Erlang node
/// starves the shared broker on a 2-core machine.
fn private_server() -> Result<Arc<dyn Backend>, String> {
    let server = RabbitServer::start()?;
    let url = server.url();
    Ok(Arc::new(RabbitBackend::new(url, Some(server))))
}

mod rabbitmq {
    stevedore_conformance::conformance_tests! {
        backend: || std::sync::Arc::new(super::RabbitBackend::new(super::machine_url(), None)),
        restart: super::private_server,
    }
}
