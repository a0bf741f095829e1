//! # stevedore
//!
//! Background jobs on any message broker. Write handlers as plain async functions, register them on
//! a [`Router`], and hand it to [`App`], which gives your binary the commands `run`, `enqueue`,
//! `stats`, `dlq list|inspect|replay|purge`, `dashboard` and `config check`. The TOML config picks
//! the broker; handler code never changes. A running worker serves a web dashboard at `/ui`
//! (`[http]`).
//!
//! ```no_run
//! use serde::Deserialize;
//! use stevedore::{App, JobContext, JobError, Json, Router};
//!
//! #[derive(Deserialize)]
//! struct Resize { image: String, width: u32 }
//!
//! async fn resize(Json(job): Json<Resize>, ctx: JobContext) -> Result<(), JobError> {
//!     tracing::info!(attempt = ctx.attempt, "resizing {} to {}px", job.image, job.width);
//!     Ok(())
//! }
//!
//! #[tokio::main]
//! async fn main() -> std::process::ExitCode {
//!     App::new(Router::new().route("resize", resize)).run().await
//! }
//! ```
//!
//! Public modules, one concern each: [`handler`] (extractors), [`router`], [`layer`] (code around
//! every handler), [`client`] (enqueueing), [`config`], [`backend`] (the registry of brokers),
//! [`cli`] ([`App`]), [`dlq`] (dead-letter tools), [`stats`] (metrics), [`autoscale`] (scale
//! hints), [`shutdown`], and with the `otel` feature `otel` (traces across the queue). The
//! runtime's machinery (fetching, priority selection, delay scheduling, leases, retries, the HTTP
//! endpoints and the dashboard) is private: configure it, do not call it.
#![doc(html_no_source)]

/// With the `mimalloc` feature, mimalloc is the process's allocator (see the feature's note in
/// `Cargo.toml`): thread-safe as every global allocator; a binary that declares its own
/// `#[global_allocator]` must leave the feature off.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub mod autoscale;
pub mod backend;
pub mod cli;
pub mod client;
pub mod config;
mod delay;
pub mod dlq;
pub(crate) mod effects;
mod error;
pub mod handler;
mod http;
pub mod layer;
mod lease;
mod limit;
mod logfmt;
#[cfg(feature = "otel")]
pub mod otel;
#[cfg(feature = "postgres")]
pub mod outbox;
mod priority;
mod retry;
pub mod router;
mod runtime;
pub mod schedule;
pub mod shutdown;
pub mod stats;
pub mod status;
mod ui;
mod worker;

pub use cli::App;
pub use client::{Client, Enqueue, EnqueueError};
pub use error::{BoxError, Fail, FailureKind, IntoOutcome, JobError};
pub use handler::{FromJob, Handler, JobContext, Json, Payload, State};
pub use layer::Layer;
pub use logfmt::LogFields;
pub use router::Router;
pub use shutdown::ShutdownHandle;
pub use status::{JobState, JobStatus};
pub use stevedore_core as core;
pub use stevedore_core::{Broker, BrokerError, Envelope, MemoryBroker, Priority};
pub use worker::{RunReport, Worker};
