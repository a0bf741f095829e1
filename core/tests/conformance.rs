//! The conformance suite against the in-memory broker: one named test per scenario
//! (`cargo test -p stevedore-core --test conformance -- --list`).

use std::sync::Arc;
use stevedore_conformance::{async_trait, Backend};
use stevedore_core::{new_id, Broker, BrokerError, Envelope, MemoryBroker};

/// The in-memory broker's hook: every handle is a clone of one broker (clones share queues), and
/// its plain client is its own API.
struct MemoryBackend {
    broker: MemoryBroker,
    /// The broker's own state store (clones share it, like the broker's handles).
    store: stevedore_core::store::MemoryStore,
}

#[async_trait]
impl Backend for MemoryBackend {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn connect(&self) -> Result<Arc<dyn Broker>, BrokerError> {
        Ok(Arc::new(self.broker.clone()))
    }

    async fn store(&self) -> Result<Arc<dyn stevedore_core::store::Store>, String> {
        Ok(Arc::new(self.store.clone()))
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

mod memory {
    stevedore_conformance::conformance_tests! {
        backend: || std::sync::Arc::new(super::MemoryBackend { broker: stevedore_core::MemoryBroker::new(), store: Default::default() }),
    }
}
