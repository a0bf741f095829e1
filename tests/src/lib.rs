//! # stevedore-conformance
//!
//! The one conformance suite every Stevedore backend runs against its real broker: the scenarios of
//! `CONFORMANCE.md`, each holding the backend to the [`Capabilities`](stevedore_core::Capabilities)
//! it declares. A backend hooks in with a [`Backend`] of a dozen lines in its own crate's
//! `tests/conformance.rs`, and [`conformance_tests!`] there declares one named test per scenario
//! (`cargo test` lists `redis::lease_expiry ... ok`; a failure names its scenario and says why;
//! `cargo test lease` runs only the lease scenarios). [`run`] gives the same report to code:
//!
//! ```
//! use std::sync::Arc;
//! use stevedore_conformance::{async_trait, run, Backend};
//! use stevedore_core::{new_id, Broker, BrokerError, Envelope, MemoryBroker};
//!
//! struct Memory(MemoryBroker);
//!
//! #[async_trait]
//! impl Backend for Memory {
//!     fn name(&self) -> &'static str {
//!         "memory"
//!     }
//!     async fn connect(&self) -> Result<Arc<dyn Broker>, BrokerError> {
//!         Ok(Arc::new(self.0.clone())) // clones share queues, like connections to one server
//!     }
//!     async fn publish_foreign(&self, queue: &str, body: &[u8]) -> Result<(), String> {
//!         let foreign = Envelope::foreign(new_id(), body.to_vec());
//!         self.0.publish(queue, vec![foreign]).await.map_err(|e| e.to_string())
//!     }
//!     async fn restart(&self) -> Result<(), String> {
//!         Err("in-process broker: no server to restart".into())
//!     }
//! }
//!
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() {
//! // `None` runs every scenario; here only publish/receive and queue isolation.
//! let report = run(Arc::new(Memory(MemoryBroker::new())), Some(&[1, 3])).await;
//! println!("{}", report.table());
//! report.assert_ok();
//! # }
//! ```
//!
//! Every scenario uses fresh queue names ([`unique`]), has a hard time limit (a hanging backend
//! fails its scenario, not the run), and asserts what a user observes: exact ids, counts, payload
//! bytes and timings. A scenario is skipped only when the backend's declared capabilities (or its
//! hook) say it cannot apply, and the skip names what is missing. Scenarios run concurrently in
//! three phases so timing-sensitive ones never share the machine with the heavy ones, and the
//! broker restart of scenario 16 never disturbs another scenario.

mod backend;
mod ledger;
mod names;
pub mod proxy;
mod report;
mod runner;
mod scenarios;
pub mod servers;
mod store;
mod suite;
mod support;

pub use async_trait::async_trait;
pub use backend::{derived_queues, Backend};
pub use names::{run_prefix, take_created, unique};
pub use report::{Outcome, Report, Row};
pub use runner::{check, run};
pub use stevedore_core;
pub use store::store_contract;
pub use suite::{Hooks, StartPrivate, Suite};
