//! The conformance suite against the in-memory broker.

use std::sync::Arc;
use stevedore_conformance::{async_trait, check, Backend};
use stevedore_core::{new_id, Broker, BrokerError, Envelope, MemoryBroker};

/// The in-memory broker's hook: every handle is a clone of one broker (clones share queues), and
/// its plain client is its own API.
struct MemoryBackend {
    broker: MemoryBroker,
}

#[async_trait]
impl Backend for MemoryBackend {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn connect(&self) -> Result<Arc<dyn Broker>, BrokerError> {
        Ok(Arc::new(self.broker.clone()))
    }

    async fn publish_foreign(&self, queue: &str, body: &[u8]) -> Result<(), String> {
        let foreign = Envelope::foreign(new_id(), body.to_vec());
        self.broker
            .publish(queue, vec![foreign])
            .await
            .map_err(|e| e.to_string())
    }

    async fn restart(&self) -> Result<(), String> {
        Err("in-process broker: no server to restart".into())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_conformance() {
    let backend = Arc::new(MemoryBackend {
        broker: MemoryBroker::new(),
    });
    check(backend, None).await;
}
