//! The hook a backend gives the suite.

use async_trait::async_trait;
use std::sync::Arc;
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
}
