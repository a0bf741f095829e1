//! Scenarios that need the worker runtime (`stevedore`): 8 retry with backoff, 9 dead letter,
//! 10 DLQ replay, 12 priority, 13 graceful shutdown; plus the runtime halves of 11 (delays beyond
//! the native cap, delays surviving a worker restart) and 18 (foreign messages routed to the
//! queue's default handler), which belong in `delay.rs` and `foreign.rs` next to their broker
//! halves.
//!
//! Until they are wired, each reports an honest failure, "not implemented yet", so the table never
//! shows them as passing.

use crate::backend::Backend;
use crate::report::{Outcome, NOT_IMPLEMENTED};
use crate::support::Checked;
use std::sync::Arc;

fn not_implemented() -> Checked {
    Ok(Outcome::Fail {
        reason: NOT_IMPLEMENTED.into(),
    })
}

/// Scenario 8, retry with backoff: a handler failing twice then succeeding runs exactly 3 times,
/// with gaps that follow the configured backoff.
// LEAD: wire to the runtime
pub(crate) async fn retry_backoff(_backend: Arc<dyn Backend>) -> Checked {
    not_implemented()
}

/// Scenario 9, dead letter: an always-failing handler lands in the DLQ after exactly max_attempts;
/// a permanent error on the first failure; a malformed payload without crashing the worker.
// LEAD: wire to the runtime
pub(crate) async fn dead_letter(_backend: Arc<dyn Backend>) -> Checked {
    not_implemented()
}

/// Scenario 10, DLQ replay: replayed dead letters are processed again and leave the DLQ.
// LEAD: wire to the runtime
pub(crate) async fn dlq_replay(_backend: Arc<dyn Backend>) -> Checked {
    not_implemented()
}

/// Scenario 12, priority: high is served first (strict) or in proportion (weighted); reserved
/// concurrency holds; low is never starved forever.
// LEAD: wire to the runtime
pub(crate) async fn priority(_backend: Arc<dyn Backend>) -> Checked {
    not_implemented()
}

/// Scenario 13, graceful shutdown: shutdown finishes in-flight jobs within the deadline, releases
/// the rest at once, loses and duplicates nothing.
// LEAD: wire to the runtime
pub(crate) async fn graceful_shutdown(_backend: Arc<dyn Backend>) -> Checked {
    not_implemented()
}
