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
//! The trait was written against all four production brokers; none of their concepts leaks into it.
//!
//! | method | Amazon SQS | RabbitMQ (AMQP 0-9-1) | Redis Streams | Kafka |
//! |---|---|---|---|---|
//! | `prepare` | `CreateQueue` (idempotent), cache queue URLs | `queue.declare` durable, plus wait queues and DLX | `XGROUP CREATE ... MKSTREAM` (ignore `BUSYGROUP`) | create topics (admin API), subscribe the group |
//! | `publish` | `SendMessageBatch` (10 per call, 256 KiB each); `DelaySeconds` ≤ 900 s; metadata in message attributes | `basic.publish` persistent, waits for publisher confirms; metadata in AMQP headers | pipelined `XADD` (fields `payload` + one per header) | produce with headers, key = `Envelope::key`; wait for delivery report |
//! | `receive` | `ReceiveMessage` (≤ 10, long poll ≤ 20 s, `VisibilityTimeout` = lease) | a consumer with prefetch (QoS) = the runtime's concurrency; deliveries buffered from the channel | `XREADGROUP COUNT n BLOCK ms`, plus `XAUTOCLAIM` with min-idle = lease for a dead consumer's entries | poll assigned partitions; a delivery is (partition, offset) |
//! | `Receipt` | receipt handle | channel generation + delivery tag | stream key + entry id | partition + offset |
//! | `delivery_count` | `ApproximateReceiveCount` | 1, or 2+ when `redelivered` / `x-delivery-count` | PEL delivery counter | 1 (redelivery after a rebalance is not counted by the broker; offsets are) |
//! | `ack` | `DeleteMessageBatch` | `basic.ack` (multiple = true where contiguous) | pipelined `XACK` (+ `XDEL` for trimming) | mark offset done; commit the highest *contiguous* done offset per partition |
//! | `release` | `ChangeMessageVisibility` to 0 | `basic.nack` requeue = true | `XCLAIM` back to idle-0 so `XAUTOCLAIM` picks it up at once (or re-add + ack) | re-produce to the same topic then mark done (no per-message nack) |
//! | `extend_lease` | `ChangeMessageVisibility` (12 h cap) | no-op (session lease; `consumer_timeout` caps it) | `XCLAIM ... JUSTID` resets idle time | no-op (session lease: stay in the group, keep polling) |
//! | `depth` | `ApproximateNumberOfMessages` / `...NotVisible` / `...Delayed` | passive declare message count; in-flight from own accounting; wait-queue counts | `XINFO GROUPS` lag, `XPENDING` count, `ZCARD` of the delay set | lag = high watermark − committed offset |
//! | delay | native up to 900 s ([`DelaySupport::Native`] with a cap); the runtime hops beyond | [`DelayStore`]: tiered TTL wait queues dead-lettering back | [`DelayStore`]: sorted set + atomic Lua promotion | [`DelayStore`]: tiered delay topics, paused until due |
//! | lease | [`LeaseSupport::Timed`] (12 h max) | [`LeaseSupport::Session`] (consumer_timeout, 30 min default) | [`LeaseSupport::Timed`] (unbounded) | [`LeaseSupport::Session`] (max.poll.interval) |
//! | ordering | per key on FIFO queues (message group) | none across competing consumers | none across competing consumers | [`OrderingSupport::PerKey`] (key → partition) |
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
pub mod wire;

/// Re-exported for backend crates implementing [`Broker`] and [`factory::BackendSetup`].
pub use async_trait::async_trait;
pub use broker::{Broker, DelayStore, Delivery, Depth, Receipt, ReceiveOptions};
pub use capabilities::{Capabilities, DelaySupport, LeaseSupport, OrderingSupport};
pub use envelope::{from_millis, new_id, to_millis, Envelope, Priority};
pub use error::BrokerError;
pub use memory::{MemoryBroker, MemoryFactory};
