//! # stevedore-core
//!
//! The message model ([`Envelope`]), the one broker trait ([`Broker`]), backends' declared
//! [`Capabilities`], broker errors, and the in-memory broker ([`MemoryBroker`]).
//!
//! ```
//! use stevedore_core::{Broker, Envelope, MemoryBroker, ReceiveOptions};
//! use std::time::Duration;
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), stevedore_core::BrokerError> {
//! let broker = MemoryBroker::new();
//! broker.publish("emails", vec![Envelope::new("send_email", r#"{"to":"a@example.com"}"#).json()]).await?;
//! let got = broker
//!     .receive("emails", ReceiveOptions { max: 10, wait: Duration::ZERO, lease: Duration::from_secs(30) })
//!     .await?;
//! assert_eq!(got[0].envelope.job.as_deref(), Some("send_email"));
//! broker.ack(&[got[0].receipt.clone()]).await?;
//! # Ok(()) }
//! ```
//!
//! ## How each broker maps onto the trait
//!
//! The trait was cut against all six backends: the three that exist (memory, Redis, RabbitMQ)
//! and the three that come next (the embedded SQLite store, Amazon SQS, Kafka). None of their
//! concepts leaks into it; what differs is declared as data ([`Capabilities`], per queue where a
//! broker's queues differ) and the runtime emulates what is missing. A backend plugs in through a
//! [`factory::BackendFactory`]: its `broker.kind`, its own `[broker]` settings, its capabilities
//! known without connecting, and `connect` with the process's consumption plan.
//!
//! | method | Redis Streams | RabbitMQ (AMQP 0-9-1) | SQLite (embedded, planned) | Amazon SQS (planned) | Kafka (planned) |
//! |---|---|---|---|---|---|
//! | `prepare` | `XGROUP CREATE … MKSTREAM` (ignore `BUSYGROUP`) | quorum queue + bindings to the shared delay exchange | create the schema once (WAL, `busy_timeout`) | `CreateQueue` (idempotent), cache queue URLs | create topics (admin API), subscribe the group |
//! | `publish` | pipelined `XADD` (field `payload` + one per header) | `basic.publish` persistent, publisher confirms; headers as AMQP headers | one `BEGIN IMMEDIATE` insert batch through the writer thread (group commit) | `SendMessageBatch` (≤ 10, ≤ 1 MiB); Stevedore's metadata packed in one attribute, the application's in the rest | produce with headers, key = `Envelope::key`; wait for the delivery report |
//! | `receive` | `XAUTOCLAIM` for ended leases, then `XREADGROUP COUNT n BLOCK ms` | consumer with prefetch = the plan's `max_unsettled`; empty only when the queue's ready count is 0 | one `UPDATE … RETURNING` claim of due ready rows, woken by `data_version` polling | `ReceiveMessage` (≤ 10, long poll ≤ 20 s, `VisibilityTimeout` = lease) | poll assigned partitions (a poll task apart from the jobs, `pause()` for backpressure) |
//! | [`Receipt`] token | entry id + lease end (an ack within the lease skips the ownership check) | consumer channel number + delivery tag | row id + lease owner | receipt handle | partition + offset + group generation |
//! | `delivery_count` | PEL delivery counter + a redeliveries field kept across releases | `x-delivery-count` (quorum queues) | the row's `attempts` column | `ApproximateReceiveCount` | each unsettled offset's hand-out count in the partition's checkpoint record, written before the hand-out |
//! | `ack` | pipelined `XACK` (trimmed later by `XTRIM MINID`) | `basic.ack`, `multiple` over contiguous runs | delete the row (or mark done for retention) | `DeleteMessageBatch` | mark the offset done; commit the highest contiguous done offset per partition |
//! | `release` | atomic script: re-add at the end with the count so far, `XACK` + `XDEL` | `basic.nack` requeue | `state = 'ready'`, lease cleared | `ChangeMessageVisibility` to 0 | back into the partition's window, ahead of the later records of its key (for the partition's owner) |
//! | `extend_lease` | `XCLAIM … JUSTID` if still ours | no-op (session lease; `consumer_timeout` caps it) | move `lease_expires_ms` if still ours | `ChangeMessageVisibility` (12 h cap) | no-op (session lease: stay in the group, keep polling) |
//! | `browse` | `XRANGE` after last-delivered + `XPENDING` entries | unsupported (no peek in 0-9-1): the DLQ tools receive and release | `SELECT` on a read-only connection | unsupported (a receive hides the message): the tools receive and release | read the DLQ topic from its start offsets with a throw-away consumer, committing nothing |
//! | `depth` | `XINFO GROUPS` lag and pending, `ZCARD` of the delay set | passive declare count; in-flight from own accounting; delayed `None` (shared levels) | `COUNT` by state on a read-only connection | `ApproximateNumberOf…` attributes (stale: `depth_staleness` ≈ 1 min) | lag = high watermark − committed offset, less what is held and acked above it; delayed = the delay-topic group's lag |
//! | delay | [`DelayStore`]: sorted set + atomic Lua promotion | native: 32 shared TTL level queues (binary digits of the delay), hops beyond 49 days | native: `run_at_ms` | native ≤ 900 s, hops beyond; FIFO queues take no per-message delay ([`Broker::queue_capabilities`]), so the runtime emulates it there | [`DelayStore`]: tiered delay topics, paused partitions until due |
//! | lease | [`LeaseSupport::Timed`] | [`LeaseSupport::Session`] (consumer_timeout) | [`LeaseSupport::Timed`] | [`LeaseSupport::Timed`] (12 h) | [`LeaseSupport::Session`] (partition ownership) |
//! | ordering | none across competing consumers | none across competing consumers | none (per key possible: one claim per key) | per key on FIFO queues (message group) | [`OrderingSupport::PerKey`] (key → partition) |
//! | [`Capabilities::shared`] | yes | yes | yes (one file, many processes; one writer each) | yes | yes |
//! | [`Capabilities::max_headers`] | none | none | none | 9 of the application's own (10 attributes, one for Stevedore) | none |
//!
//! Why these cuts:
//! - **Receipts are typed** ([`Receipt::new`] takes any token, [`Receipt::token`] reads it back):
//!   a Kafka receipt is three numbers and an AMQP one two; squeezing them into a string and a
//!   number meant parsing on every ack. A receipt of another backend reads as `None`, treated as
//!   a lease this broker does not hold.
//! - **Delivery counting is declared**, not assumed: Kafka commits offsets and counts nothing per
//!   message, so crash-loop detection there rests on the envelope's attempt, and the worker says
//!   so at start-up.
//! - **`shared`** decides whether `stats` and `dlq` from a second process can see a worker's
//!   queues (false only for the in-process memory broker; the CLI warns).
//! - **The header budget** exists for SQS, where message attributes are few and count toward the
//!   size limit; the client refuses an enqueue over it before anything is sent.
//! - **Per-queue capabilities**: within one SQS account a FIFO queue and a standard one differ
//!   in delay and ordering; validation, delay routing and the header check ask per queue.
//! - **`browse`** lets the dead-letter tools list without taking: receiving and releasing would
//!   re-produce a whole Kafka DLQ and count a delivery on every other broker. Brokers that cannot
//!   peek say so ([`BrokerError::Unsupported`]) and the tools fall back.
//! - **Retries and per-key order**: a retry is a new copy published later and the original is
//!   acked, so the next message of the key may run first, on every backend; dead letters give
//!   up their key. [`OrderingSupport::PerKey`] covers first deliveries and releases only, and says
//!   so.
//!
//! Priority is never a broker feature here: each level of a logical queue is its own physical queue
//! (see [`names`]), so it behaves the same everywhere and the runtime can reserve concurrency per level.
#![doc(html_no_source)]

mod broker;
mod capabilities;
mod envelope;
mod error;
pub mod factory;
pub mod memory;
pub mod names;
pub mod store;
pub mod wire;

/// Re-exported for backend crates implementing [`Broker`] and [`factory::BackendSetup`].
pub use async_trait::async_trait;
pub use broker::{resend_uncounted, Broker, DelayStore, Delivery, Depth, Receipt, ReceiveOptions};
pub use capabilities::{Capabilities, DelaySupport, LeaseSupport, OrderingSupport, Sharing};
pub use envelope::{from_millis, new_id, to_millis, Envelope, Priority};
pub use error::BrokerError;
pub use memory::{MemoryBroker, MemoryFactory};
