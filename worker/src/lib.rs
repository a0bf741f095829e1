//! # stevedore
//!
//! Background jobs on any message broker. Write handlers as plain async functions, register them on
//! a [`Router`], and hand it to [`App`], which gives your binary the commands `run`, `enqueue`,
//! `stats`, `dlq list|inspect|replay|purge` and `config check`. The TOML config picks the broker;
//! handler code never changes.
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
//! Modules, one concern each: [`handler`] (extractors), [`router`], [`layer`] (code around every
//! handler), [`retry`], [`priority`],
//! [`delay`], [`lease`], [`shutdown`], [`autoscale`], [`stats`] (metrics), [`http`], [`config`], [`dlq`],
//! [`client`], [`cli`].
#![doc(html_no_source)]

pub mod autoscale;
pub mod backend;
pub mod cli;
pub mod client;
pub mod config;
pub mod delay;
pub mod dlq;
mod error;
pub mod handler;
pub mod http;
pub mod layer;
pub mod lease;
pub mod priority;
pub mod retry;
pub mod router;
mod runtime;
pub mod shutdown;
pub mod stats;
mod worker;

pub use cli::App;
pub use client::{Client, Enqueue, EnqueueError};
pub use error::{BoxError, Fail, FailureKind, IntoOutcome, JobError};
pub use handler::{FromJob, Handler, JobContext, Json, Payload, State};
pub use layer::Layer;
pub use router::Router;
pub use shutdown::ShutdownHandle;
pub use stevedore_core as core;
pub use stevedore_core::{Broker, BrokerError, Envelope, MemoryBroker, Priority};
pub use worker::{RunReport, Worker};
