//! The router: handlers registered by job name.

use crate::error::JobError;
use crate::handler::{Handler, JobParts};
use crate::layer::Layer;
use futures::future::BoxFuture;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

type BoxedHandler =
    Arc<dyn Fn(Arc<JobParts>) -> BoxFuture<'static, Result<(), JobError>> + Send + Sync>;

/// Handlers by job name, with the application state they share.
///
/// Build it once at start-up; it is immutable afterwards and shared by every worker task.
/// Registering the same job name twice is an error: [`crate::Worker::new`] refuses the router,
/// naming the job, rather than silently keeping one of the two handlers.
pub struct Router<S = ()> {
    state: S,
    handlers: BTreeMap<String, BoxedHandler>,
    layers: Vec<Arc<dyn Layer>>,
    /// Job names registered more than once, in the order the second registration happened.
    duplicates: Vec<String>,
}

impl Router<()> {
    /// A router without shared state.
    pub fn new() -> Self {
        Router {
            state: (),
            handlers: BTreeMap::new(),
            layers: Vec::new(),
            duplicates: Vec::new(),
        }
    }
}

impl Default for Router<()> {
    fn default() -> Self {
        Self::new()
    }
}

impl<S: Clone + Send + Sync + 'static> Router<S> {
    /// A router whose handlers can take [`crate::State<S>`].
    pub fn with_state(state: S) -> Self {
        Router {
            state,
            handlers: BTreeMap::new(),
            layers: Vec::new(),
            duplicates: Vec::new(),
        }
    }

    /// Registers `handler` for messages whose job name is `job`.
    pub fn route<H, T>(mut self, job: &str, handler: H) -> Self
    where
        H: Handler<T, S>,
    {
        let state = self.state.clone();
        let boxed: BoxedHandler = Arc::new(move |parts| handler.call(parts, state.clone()));
        if self.handlers.insert(job.to_string(), boxed).is_some()
            && !self.duplicates.iter().any(|d| d == job)
        {
            self.duplicates.push(job.to_string());
        }
        self
    }

    /// Wraps every route (registered before or after this call) in `layer`; the first layer added
    /// is the outermost. See [`crate::layer`].
    pub fn layer(mut self, layer: impl Layer) -> Self {
        self.layers.push(Arc::new(layer));
        self
    }

    /// Registered job names, sorted.
    pub(crate) fn job_names(&self) -> Vec<&str> {
        self.handlers.keys().map(String::as_str).collect()
    }

    /// Job names that were registered more than once (empty for a valid router).
    pub fn duplicates(&self) -> &[String] {
        &self.duplicates
    }

    /// Freezes the router into the table the runtime dispatches on.
    pub fn into_routes(self) -> Routes {
        Routes {
            handlers: Arc::new(self.handlers),
            layers: self.layers.into(),
        }
    }
}

/// The frozen dispatch table. Cheap to clone.
#[derive(Clone)]
pub struct Routes {
    handlers: Arc<BTreeMap<String, BoxedHandler>>,
    layers: Arc<[Arc<dyn Layer>]>,
}

impl Routes {
    /// Starts the handler for `job` inside the router's layers, or `None` when no handler has
    /// that name.
    pub fn dispatch(
        &self,
        job: &str,
        parts: Arc<JobParts>,
    ) -> Option<BoxFuture<'static, Result<(), JobError>>> {
        let handler = self.handlers.get(job)?;
        if self.layers.is_empty() {
            return Some(handler(parts));
        }
        let mut fut = handler(parts.clone());
        for layer in self.layers.iter().rev() {
            fut = layer.wrap(&parts.context, fut);
        }
        Some(fut)
    }

    /// Whether a handler has this name.
    pub fn contains(&self, job: &str) -> bool {
        self.handlers.contains_key(job)
    }

    /// Registered job names, sorted.
    pub fn names(&self) -> Vec<&str> {
        self.handlers.keys().map(String::as_str).collect()
    }
}

impl fmt::Debug for Routes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.handlers.keys()).finish()
    }
}
