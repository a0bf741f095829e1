//! Handlers are plain async functions whose arguments are extractors, after axum: [`Json<T>`] decodes
//! the payload, [`JobContext`] tells about the delivery, [`State<S>`] shares application state,
//! [`Payload`] gives the raw bytes. A payload that fails to decode becomes a permanent failure, so the
//! message goes to the dead-letter queue with the reason instead of crashing the worker.
//!
//! ```
//! use serde::Deserialize;
//! use stevedore::{JobContext, JobError, Json, Router};
//!
//! #[derive(Deserialize)]
//! struct SendEmail { to: String }
//!
//! async fn send_email(Json(job): Json<SendEmail>, ctx: JobContext) -> Result<(), JobError> {
//!     println!("attempt {} emailing {}", ctx.attempt, job.to);
//!     Ok(())
//! }
//!
//! let router = Router::new().route("send_email", send_email);
//! # let _ = router;
//! ```

use crate::client::Client;
use crate::error::{IntoOutcome, JobError};
use bytes::Bytes;
use futures::future::BoxFuture;
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::SystemTime;
use stevedore_core::{Envelope, Priority};

/// Facts about the delivery being handled. Also an extractor.
#[derive(Clone, Debug)]
pub struct JobContext {
    /// Message id (stable across retries and redeliveries).
    pub id: String,
    /// Job name the message was routed by (the queue's default job for foreign messages).
    pub job: String,
    /// Logical queue.
    pub queue: String,
    /// Priority level it was received from.
    pub priority: Priority,
    /// This attempt, from 1.
    pub attempt: u32,
    /// Attempts allowed before the dead-letter queue.
    pub max_attempts: u32,
    /// When the job was first enqueued.
    pub enqueued_at: SystemTime,
    /// User headers.
    pub headers: BTreeMap<String, String>,
    /// The worker running it.
    pub worker_id: Arc<str>,
    /// The job's result slot and inbox mark (only on queues with `track_status` or
    /// `idempotent`).
    pub(crate) effects: Option<Arc<crate::effects::JobShared>>,
}

impl JobContext {
    /// A context for job `id` named `job` on `queue` at attempt 1 of 1, enqueued now, with no
    /// headers: for testing handlers outside a worker (set the public fields as needed).
    pub fn new(id: &str, job: &str, queue: &str) -> Self {
        JobContext {
            id: id.to_string(),
            job: job.to_string(),
            queue: queue.to_string(),
            priority: Priority::Normal,
            attempt: 1,
            max_attempts: 1,
            enqueued_at: SystemTime::now(),
            headers: BTreeMap::new(),
            worker_id: Arc::from("test"),
            effects: None,
        }
    }

    /// Keeps `value` as the job's result in its status ([`crate::JobStatus::result`]), shown
    /// once the job succeeds (a later call replaces an earlier one; a failed attempt's result
    /// is dropped). Without `track_status` on the queue it keeps nothing and returns `Ok`.
    ///
    /// Fails (keeping nothing) when `value` does not serialize to JSON or is larger than
    /// [`crate::status::MAX_RESULT`] serialized: keep large results in your own storage and
    /// return where they are.
    pub fn set_result<T: serde::Serialize + ?Sized>(&self, value: &T) -> Result<(), JobError> {
        let Some(slot) = self.effects.as_ref().and_then(|e| e.output.as_ref()) else {
            return Ok(());
        };
        let json = serde_json::to_vec(value).map_err(|e| {
            JobError::permanent(format!("the job's result does not serialize: {e}"))
        })?;
        if json.len() > crate::status::MAX_RESULT {
            return Err(JobError::permanent(format!(
                "the job's result is {} bytes serialized; at most {} are kept",
                json.len(),
                crate::status::MAX_RESULT
            )));
        }
        let value: serde_json::Value = serde_json::from_slice(&json).map_err(|e| {
            JobError::permanent(format!("the job's result does not serialize: {e}"))
        })?;
        *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(value);
        Ok(())
    }

    /// For an idempotent job (`idempotent = true`) whose state store is PostgreSQL: marks it
    /// done inside your transaction on `conn` (`&mut *tx`), so the mark commits or rolls back
    /// with your other writes. Returns `Ok(true)` when this delivery marked it: go on with
    /// your writes and commit. Returns `Ok(false)` when a delivery of this job already
    /// committed its mark: a duplicate; write nothing, roll back, and return `Ok(())`.
    ///
    /// Call it first in the transaction: a concurrent duplicate then waits on the mark's row
    /// until your transaction ends. This closes the gap the store-backed inbox leaves (a crash
    /// between your commit and the worker's own `done` mark would run the job again); with it,
    /// a job's effects in that database happen exactly once, whatever is killed when. The store
    /// (`[store] kind = "postgres"`) must be the database `conn` is connected to.
    ///
    /// Fails (a permanent error, so the job is dead-lettered with the reason) when the job is
    /// not idempotent or the store is not PostgreSQL; with the database's error otherwise
    /// (transient ones are retried).
    #[cfg(feature = "postgres")]
    pub async fn mark_done_in(
        &self,
        conn: &mut stevedore_postgres::sqlx::PgConnection,
    ) -> Result<bool, JobError> {
        let shared = self.effects.as_ref();
        let Some((key, keep)) = shared.and_then(|e| e.inbox.as_ref()) else {
            return Err(JobError::permanent(format!(
                "mark_done_in: job {} on queue {} is not idempotent: set idempotent = true on queues.{} or jobs.{}",
                self.job, self.queue, self.queue, self.job
            )));
        };
        if let Some(e) = shared {
            // From here the transaction holds the key: the runtime stops renewing its claim.
            e.marked.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        let store = shared
            .and_then(|e| e.store.as_any())
            .and_then(|a| a.downcast_ref::<stevedore_postgres::PostgresStore>())
            .ok_or_else(|| {
                JobError::permanent(
                    "mark_done_in needs the state store to be PostgreSQL ([store] kind = \"postgres\"), in the database the transaction writes to",
                )
            })?;
        let marked = store.mark_in(conn, key, crate::effects::DONE, *keep).await;
        if marked.is_err() {
            // Not held by the transaction after all: the runtime renews its claim again.
            if let Some(e) = shared {
                e.marked.store(false, std::sync::atomic::Ordering::Relaxed);
            }
        }
        marked.map_err(|e| {
            if e.is_transient() {
                JobError::retry(format!("marking the job done: {e}"))
            } else {
                JobError::permanent(format!("marking the job done: {e}"))
            }
        })
    }
}

/// Everything an extractor may look at.
#[derive(Debug)]
pub struct JobParts {
    /// The message as delivered.
    pub envelope: Envelope,
    /// Delivery facts.
    pub context: JobContext,
    /// A producer on the broker the job came from (the [`Client`] extractor).
    pub client: Client,
}

impl JobParts {
    /// The job name, moved out when `parts` is the last reference (the handler future is gone),
    /// copied otherwise.
    pub(crate) fn into_job(parts: Arc<JobParts>) -> String {
        Arc::try_unwrap(parts)
            .map(|p| p.context.job)
            .unwrap_or_else(|p| p.context.job.clone())
    }
}

/// Builds a handler argument from the job; failing means the payload cannot be handled at all.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be a job handler argument",
    label = "not an extractor",
    note = "handler arguments are extractors: Json<T>, Payload, JobContext, State<S> (with Router::with_state), Client, or your own type implementing FromJob<S>"
)]
pub trait FromJob<S>: Sized {
    /// Extracts the value, or says why the message can never be handled (it will be dead-lettered
    /// with this reason).
    fn from_job(parts: &JobParts, state: &S) -> Result<Self, JobError>;
}

/// Extracts and decodes a JSON payload into `T`.
#[derive(Debug, Clone)]
pub struct Json<T>(pub T);

impl<T: DeserializeOwned, S> FromJob<S> for Json<T> {
    fn from_job(parts: &JobParts, _: &S) -> Result<Self, JobError> {
        serde_json::from_slice(&parts.envelope.payload)
            .map(Json)
            .map_err(|e| {
                JobError::permanent(format!(
                    "malformed payload: cannot decode as {}: {e}",
                    std::any::type_name::<T>()
                ))
            })
    }
}

/// The raw payload bytes.
#[derive(Debug, Clone)]
pub struct Payload(pub Bytes);

impl<S> FromJob<S> for Payload {
    fn from_job(parts: &JobParts, _: &S) -> Result<Self, JobError> {
        Ok(Payload(parts.envelope.payload.clone()))
    }
}

/// A [`Client`] on the running broker, so a handler can enqueue follow-up jobs (with the same
/// `max_depth` limits as the worker's own client). Cheap: a few reference-count increments.
impl<S> FromJob<S> for Client {
    fn from_job(parts: &JobParts, _: &S) -> Result<Self, JobError> {
        Ok(parts.client.clone())
    }
}

impl<S> FromJob<S> for JobContext {
    fn from_job(parts: &JobParts, _: &S) -> Result<Self, JobError> {
        Ok(parts.context.clone())
    }
}

/// Shared application state given to [`crate::Router::with_state`]. Cloned per job, so wrap large
/// state in an `Arc`.
#[derive(Debug, Clone)]
pub struct State<S>(pub S);

impl<S: Clone> FromJob<S> for State<S> {
    fn from_job(_: &JobParts, state: &S) -> Result<Self, JobError> {
        Ok(State(state.clone()))
    }
}

/// An async function usable as a job handler; implemented for `async fn`s of up to 16 extractor
/// arguments returning `()` or `Result<(), E>`. You never implement it yourself.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a job handler",
    label = "not a handler",
    note = "a handler is an `async fn` (or closure returning a Send future) taking up to 16 extractors (Json<T>, Payload, JobContext, State<S>, Client) and returning () or Result<(), E> with E: Into<JobError>; with Router::with_state(s), State<S> must match the router's state type"
)]
pub trait Handler<T, S>: Clone + Send + Sync + 'static {
    /// Runs the handler on one job.
    fn call(&self, parts: Arc<JobParts>, state: S) -> BoxFuture<'static, Result<(), JobError>>;
}

macro_rules! impl_handler {
    ($($t:ident),*) => {
        #[allow(non_snake_case, unused_variables)]
        impl<F, Fut, R, S, $($t,)*> Handler<($($t,)*), S> for F
        where
            F: Fn($($t),*) -> Fut + Clone + Send + Sync + 'static,
            Fut: Future<Output = R> + Send + 'static,
            R: IntoOutcome,
            S: Send + Sync + 'static,
            $($t: FromJob<S> + Send + 'static,)*
        {
            fn call(&self, parts: Arc<JobParts>, state: S) -> BoxFuture<'static, Result<(), JobError>> {
                $(
                    let $t = match $t::from_job(&parts, &state) {
                        Ok(v) => v,
                        Err(e) => return Box::pin(async move { Err(e) }),
                    };
                )*
                let fut = (self)($($t),*);
                Box::pin(async move { fut.await.into_outcome() })
            }
        }
    };
}

impl_handler!();
impl_handler!(T1);
impl_handler!(T1, T2);
impl_handler!(T1, T2, T3);
impl_handler!(T1, T2, T3, T4);
impl_handler!(T1, T2, T3, T4, T5);
impl_handler!(T1, T2, T3, T4, T5, T6);
impl_handler!(T1, T2, T3, T4, T5, T6, T7);
impl_handler!(T1, T2, T3, T4, T5, T6, T7, T8);
impl_handler!(T1, T2, T3, T4, T5, T6, T7, T8, T9);
impl_handler!(T1, T2, T3, T4, T5, T6, T7, T8, T9, T10);
impl_handler!(T1, T2, T3, T4, T5, T6, T7, T8, T9, T10, T11);
impl_handler!(T1, T2, T3, T4, T5, T6, T7, T8, T9, T10, T11, T12);
impl_handler!(T1, T2, T3, T4, T5, T6, T7, T8, T9, T10, T11, T12, T13);
impl_handler!(T1, T2, T3, T4, T5, T6, T7, T8, T9, T10, T11, T12, T13, T14);
impl_handler!(T1, T2, T3, T4, T5, T6, T7, T8, T9, T10, T11, T12, T13, T14, T15);
impl_handler!(T1, T2, T3, T4, T5, T6, T7, T8, T9, T10, T11, T12, T13, T14, T15, T16);
