//! What a handler says should happen after it failed.

use std::fmt;
use std::time::Duration;

/// The next step a failed job asks for. Panics and time-outs count as [`FailureKind::Retry`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// Try again after the configured backoff, until max attempts or max age.
    Retry,
    /// Try again no sooner than this (e.g. a rate limit's `Retry-After`); still bounded by max
    /// attempts and max age.
    RetryAfter(Duration),
    /// Do not retry: the message goes straight to the dead-letter queue.
    Permanent,
}

/// A failed job. Any `std::error::Error` converts into a retryable `JobError`, so `?` works in
/// handlers; use [`JobError::permanent`] or [`JobError::retry_after`] to say more.
///
/// ```
/// use stevedore::JobError;
/// fn check(amount: i64) -> Result<(), JobError> {
///     if amount < 0 {
///         return Err(JobError::permanent(format!("negative amount {amount}")));
///     }
///     Ok(())
/// }
/// # assert!(check(-1).is_err());
/// ```
pub struct JobError {
    kind: FailureKind,
    message: String,
}

impl JobError {
    /// A failure worth retrying with backoff.
    pub fn retry(message: impl fmt::Display) -> Self {
        JobError {
            kind: FailureKind::Retry,
            message: message.to_string(),
        }
    }

    /// A failure to retry no sooner than `after`.
    pub fn retry_after(after: Duration, message: impl fmt::Display) -> Self {
        JobError {
            kind: FailureKind::RetryAfter(after),
            message: message.to_string(),
        }
    }

    /// A failure that retrying cannot fix (bad input): dead-letter now.
    pub fn permanent(message: impl fmt::Display) -> Self {
        JobError {
            kind: FailureKind::Permanent,
            message: message.to_string(),
        }
    }

    /// What the handler asked for.
    pub fn kind(&self) -> FailureKind {
        self.kind
    }

    /// The error text recorded in logs and dead-letter headers.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Debug for JobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JobError({:?}: {})", self.kind, self.message)
    }
}

impl fmt::Display for JobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for JobError {
    fn from(e: E) -> Self {
        // Keep the cause chain in the message: it is all the dead-letter queue will have.
        let mut message = e.to_string();
        let mut source = e.source();
        while let Some(s) = source {
            message.push_str(": ");
            message.push_str(&s.to_string());
            source = s.source();
        }
        JobError::retry(message)
    }
}

/// What a handler may return: `()`, `Result<(), E>` with `E: Into<JobError>`.
#[diagnostic::on_unimplemented(
    message = "a job handler cannot return `{Self}`",
    note = "return () or Result<(), E> where E is JobError or implements std::error::Error + Send + Sync + 'static"
)]
pub trait IntoOutcome {
    /// Converts into the runtime's view of the result.
    fn into_outcome(self) -> Result<(), JobError>;
}

impl IntoOutcome for () {
    fn into_outcome(self) -> Result<(), JobError> {
        Ok(())
    }
}

impl<E: Into<JobError>> IntoOutcome for Result<(), E> {
    fn into_outcome(self) -> Result<(), JobError> {
        self.map_err(Into::into)
    }
}
