//! The hook a backend gives the suite.

use async_trait::async_trait;
use std::sync::Arc;
use stevedore_core::store::Store;
use stevedore_core::{Broker, BrokerError};

/// How the suite reaches one backend's real broker. Implementations are a dozen lines in the
/// backend's own test file (see the crate example).
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Short backend name for the report (`memory`, `redis`, ...).
    fn name(&self) -> &'static str;

    /// A new, independent handle / connection to the same broker (think: another worker process).
    /// Scenarios call it once per simulated worker, and drop or close the handle when done.
    async fn connect(&self) -> Result<Arc<dyn Broker>, BrokerError>;

    /// Writes `body` to physical queue `queue` the way a plain client of this broker would
    /// (`redis-cli XADD`, `aws sqs send-message`, ...), with none of Stevedore's headers. The suite
    /// has already `prepare`d the queue. `Err(reason)` means this backend cannot do it; the
    /// scenario is then skipped with that reason.
    async fn publish_foreign(&self, queue: &str, body: &[u8]) -> Result<(), String>;

    /// Restarts the broker server while clients stay alive, returning once it accepts connections
    /// again. `Err(reason)` when the backend has no server to restart; the scenario is then skipped
    /// with that reason.
    async fn restart(&self) -> Result<(), String>;

    /// A hook on a broker server of its own for one scenario, or `None` (the default): every
    /// scenario of a phase shares this backend's broker, as services share a production broker.
    ///
    /// For a broker emulated by one process with one global lock (moto for SQS), where the
    /// suite's concurrent scenarios would measure the emulator's queueing rather than the
    /// backend: each scenario then runs alone on its own server, still with all of its own
    /// concurrency (many handles, consumers and workers on that server). The runner asks for it
    /// before the scenario's time limit starts and drops it when the scenario ends. `Err(reason)`
    /// fails the scenario with that reason. [`cleanup`](Backend::cleanup) is still called on this
    /// backend only: an isolated server must clean up after itself when dropped.
    ///
    /// `restarts` says the scenario restarts the broker ([`restart`](Backend::restart)): its
    /// server must keep what it holds across a restart (a server kept in memory, quicker for
    /// every other scenario, would not).
    async fn isolated(
        &self,
        restarts: bool,
    ) -> Result<Option<std::sync::Arc<dyn Backend>>, String> {
        let _ = restarts;
        Ok(None)
    }

    /// A new handle on the state store a worker of this backend uses for schedules (think:
    /// another worker process's). The default is the machine's PostgreSQL (`DATABASE_URL`, else
    /// `postgres://postgres@127.0.0.1:5432/test`), the store for brokers that hold no state
    /// themselves; backends that serve as their own store (Redis, SQLite, memory) return theirs.
    async fn store(&self) -> Result<Arc<dyn Store>, String> {
        let url = std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let store = stevedore_postgres::PostgresStore::connect(&url, "stevedore_kv_conformance")
            .await
            .map_err(|e| format!("the PostgreSQL state store at {url}: {e}"))?;
        Ok(Arc::new(store))
    }

    /// Deletes everything the suite created on the broker for `queues`: each name as a physical
    /// queue and as a logical one (its priority levels `__high`, `__low` and its dead letters
    /// `__dlq`), with whatever the backend keeps beside them (delay keys, shared structures under a
    /// test-only key prefix). Called once at the end of every [`run`](crate::run), whether the
    /// scenarios passed or not, with every name [`unique`](crate::unique) handed out during the
    /// run. Names that were never used must be accepted. Returns how many broker objects were
    /// deleted, for the report. The default does nothing (an in-process broker dies with the test).
    async fn cleanup(&self, queues: &[String]) -> Result<usize, String> {
        let _ = queues;
        Ok(0)
    }
}

/// Every physical queue the runtime may derive from logical queue `name`, `name` itself first.
pub fn derived_queues(name: &str) -> Vec<String> {
    let mut all = vec![name.to_string()];
    for p in stevedore_core::Priority::ALL {
        let q = stevedore_core::names::physical(name, p);
        if !all.contains(&q) {
            all.push(q);
        }
    }
    all.push(stevedore_core::names::dead_letter(name));
    all
}
