//! Errors raised by brokers. SDK error types never leak past a backend: each backend maps its client's
//! errors onto [`BrokerError`], and the runtime decides what to do from [`BrokerError::is_transient`].

use std::time::Duration;

/// What went wrong talking to a broker.
///
/// The enum is `#[non_exhaustive]`: match the cases you care about and treat the rest by
/// [`BrokerError::is_transient`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    /// The broker could not be reached or the connection broke. Transient: reconnect with backoff.
    #[error("broker connection failed: {0}")]
    Connection(String),
    /// The broker did not answer in time. Transient.
    #[error("broker operation timed out after {0:?}")]
    Timeout(Duration),
    /// The message body is larger than the backend accepts. Permanent for that message.
    #[error("payload of {size} bytes exceeds the {backend} limit of {max} bytes")]
    PayloadTooLarge {
        /// Size of the rejected payload, in bytes.
        size: usize,
        /// The backend's limit, in bytes.
        max: usize,
        /// Which backend refused it.
        backend: &'static str,
    },
    /// The queue name is not valid for this backend. Permanent.
    #[error("invalid queue name {queue:?}: {reason}")]
    InvalidQueue {
        /// The name that was refused.
        queue: String,
        /// What the backend allows.
        reason: String,
    },
    /// The receipt no longer holds a lease: it was acked already, or the lease expired and the
    /// message may have gone to another consumer. Not transient; the message is at-least-once.
    #[error("lease lost for message on queue {queue:?}: acked already or lease expired")]
    LeaseLost {
        /// Physical queue of the receipt.
        queue: String,
    },
    /// The backend cannot do this at all (a capability it does not declare). Permanent.
    #[error("{backend} does not support {what}")]
    Unsupported {
        /// Which backend.
        backend: &'static str,
        /// The missing ability.
        what: &'static str,
    },
    /// The broker has been closed by [`crate::Broker::close`].
    #[error("broker is closed")]
    Closed,
    /// Any other broker-side failure, with whether a retry may succeed.
    #[error("broker error: {message}")]
    Other {
        /// Human-readable description, never containing credentials.
        message: String,
        /// Whether retrying the same call later may succeed.
        transient: bool,
    },
}

impl BrokerError {
    /// True when the same call may succeed if retried later (after a reconnect or a pause).
    pub fn is_transient(&self) -> bool {
        match self {
            BrokerError::Connection(_) | BrokerError::Timeout(_) => true,
            BrokerError::Other { transient, .. } => *transient,
            _ => false,
        }
    }

    /// A transient error with this message.
    pub fn transient(message: impl Into<String>) -> Self {
        BrokerError::Other {
            message: message.into(),
            transient: true,
        }
    }

    /// A permanent error with this message.
    pub fn permanent(message: impl Into<String>) -> Self {
        BrokerError::Other {
            message: message.into(),
            transient: false,
        }
    }
}
