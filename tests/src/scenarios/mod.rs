//! The scenarios of `CONFORMANCE.md`, one module per idea, and the list the runner walks.

mod consumers;
mod crash;
mod delay;
mod depth;
mod foreign;
mod isolation;
mod leases;
mod limits;
mod ordering;
mod publish;
mod reconnect;
mod redelivery;
pub(crate) mod runtime;

use crate::backend::Backend;
use crate::support::{secs, Checked};
use futures::future::BoxFuture;
use std::sync::Arc;
use std::time::Duration;

/// When a scenario runs. Scenarios of one phase run concurrently; phases run one after another.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Light but timing-sensitive: nothing heavy beside them.
    Timing,
    /// Throughput and everything else.
    Bulk,
    /// Restarts the broker: runs alone.
    Restart,
}

/// One scenario.
pub(crate) struct Scenario {
    /// Number in `CONFORMANCE.md`.
    pub no: u8,
    /// Short name for the table.
    pub name: &'static str,
    /// Its named test (`lease_expiry`), see [`crate::conformance_tests`].
    pub slug: &'static str,
    /// When it runs.
    pub phase: Phase,
    /// Base hard time limit (the runner adds the backend's declared staleness and tolerance).
    pub limit: Duration,
    /// The scenario itself.
    pub run: Run,
}

/// A scenario's body: takes the backend, returns its outcome (or failure reason).
pub(crate) type Run = fn(Arc<dyn Backend>) -> BoxFuture<'static, Checked>;

/// The named test of each scenario, by number from 1 (the names
/// [`crate::conformance_tests`] declares).
const SLUGS: [&str; 22] = [
    "publish_receive",
    "competing_consumers",
    "queue_isolation",
    "release_redelivery",
    "lease_expiry",
    "lease_extension",
    "crash_recovery",
    "retry_backoff",
    "dead_letter",
    "dlq_replay",
    "delay",
    "priority",
    "graceful_shutdown",
    "depth",
    "limits",
    "reconnect",
    "ordering",
    "foreign_messages",
    "schedules",
    "unique_jobs",
    "rate_limits",
    "status_inbox",
];

/// Every scenario, by number.
pub(crate) fn all() -> Vec<Scenario> {
    use Phase::*;
    let s = |no, name, phase, limit: u64, run: Run| Scenario {
        no,
        name,
        slug: SLUGS[usize::from(no) - 1],
        phase,
        limit: secs(limit),
        run,
    };
    vec![
        s(1, "publish/receive", Bulk, 60, |b| {
            Box::pin(publish::publish_receive(b))
        }),
        s(2, "competing consumers", Bulk, 120, |b| {
            Box::pin(consumers::competing_consumers(b))
        }),
        s(3, "queue isolation", Bulk, 30, |b| {
            Box::pin(isolation::queue_isolation(b))
        }),
        s(4, "release and redelivery", Timing, 30, |b| {
            Box::pin(redelivery::release_redelivery(b))
        }),
        s(5, "lease expiry", Timing, 30, |b| {
            Box::pin(leases::lease_expiry(b))
        }),
        s(6, "lease extension", Timing, 30, |b| {
            Box::pin(leases::lease_extension(b))
        }),
        s(7, "crash recovery", Timing, 30, |b| {
            Box::pin(crash::crash_recovery(b))
        }),
        s(8, "retry with backoff", Timing, 60, |b| {
            Box::pin(runtime::retry_backoff(b))
        }),
        s(9, "dead letter", Bulk, 60, |b| {
            Box::pin(runtime::dead_letter(b))
        }),
        s(10, "DLQ replay", Bulk, 60, |b| {
            Box::pin(runtime::dlq_replay(b))
        }),
        s(11, "delay", Timing, 30, |b| Box::pin(delay::delay(b))),
        s(12, "priority", Timing, 60, |b| {
            Box::pin(runtime::priority(b))
        }),
        s(13, "graceful shutdown", Timing, 60, |b| {
            Box::pin(runtime::graceful_shutdown(b))
        }),
        s(14, "depth", Bulk, 30, |b| Box::pin(depth::depth(b))),
        s(15, "limits", Bulk, 60, |b| Box::pin(limits::limits(b))),
        s(16, "reconnect", Restart, 180, |b| {
            Box::pin(reconnect::reconnect(b))
        }),
        s(17, "ordering", Bulk, 150, |b| {
            Box::pin(ordering::ordering(b))
        }),
        s(18, "foreign messages", Bulk, 30, |b| {
            Box::pin(foreign::foreign_messages(b))
        }),
        s(19, "schedules", Timing, 90, |b| {
            Box::pin(runtime::schedules(b))
        }),
        s(20, "unique jobs", Bulk, 90, |b| {
            Box::pin(runtime::unique_jobs(b))
        }),
        s(21, "rate limits", Timing, 90, |b| {
            Box::pin(runtime::limits(b))
        }),
        s(22, "status and inbox", Timing, 90, |b| {
            Box::pin(runtime::status_and_inbox(b))
        }),
    ]
}
