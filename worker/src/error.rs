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

/// Any error a handler may return: every `std::error::Error + Send + Sync`, `anyhow::Error`,
/// `String` and `&str` convert into it, so `?` works in handlers returning
/// `Result<(), BoxError>` (or `anyhow::Result<()>`).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A failed job, with what should happen next. It is a `std::error::Error`, so it travels through
/// `?` into [`BoxError`] or `anyhow::Error` and keeps its [`FailureKind`] there: a handler may
/// return `Result<(), JobError>`, `Result<(), BoxError>`, `anyhow::Result<()>` or any
/// `Result<(), E>` with `E: Into<BoxError>`. Errors that are not a `JobError` are retried with
/// backoff, their whole cause chain recorded as the message.
///
/// ```
/// use stevedore::{BoxError, Fail, JobError};
///
/// fn check(amount: i64) -> Result<(), JobError> {
///     if amount < 0 {
///         return Err(JobError::permanent(format!("negative amount {amount}")));
///     }
///     Ok(())
/// }
///
/// // `?` on any error retries; `.permanent()` dead-letters at once instead.
/// fn handle(raw: &str) -> Result<(), BoxError> {
///     let amount: i64 = raw.parse().permanent()?;
///     check(amount)?;
///     std::fs::metadata("/")?;
///     Ok(())
/// }
/// # assert!(check(-1).is_err());
/// # assert!(handle("x").is_err());
/// ```
pub struct JobError {
    kind: FailureKind,
    message: String,
    /// The kind, as the error's `source()`: it survives wrappers that hide the `JobError` itself
    /// from `downcast` (anyhow boxes its own type around it), and shows in printed chains as
    /// "permanent failure" and the like.
    marker: KindMarker,
}

/// A [`JobError`]'s kind, reachable through `Error::source` (see the field's doc).
#[derive(Debug)]
struct KindMarker(FailureKind);

impl fmt::Display for KindMarker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            FailureKind::Retry => f.write_str("retry with backoff"),
            FailureKind::RetryAfter(d) => {
                write!(f, "retry after {}", humantime::format_duration(d))
            }
            FailureKind::Permanent => f.write_str("permanent failure"),
        }
    }
}

impl std::error::Error for KindMarker {}

impl JobError {
    fn with(kind: FailureKind, message: String) -> Self {
        JobError {
            kind,
            message,
            marker: KindMarker(kind),
        }
    }

    /// A failure worth retrying with backoff.
    pub fn retry(message: impl fmt::Display) -> Self {
        Self::with(FailureKind::Retry, message.to_string())
    }

    /// A failure to retry no sooner than `after`.
    pub fn retry_after(after: Duration, message: impl fmt::Display) -> Self {
        Self::with(FailureKind::RetryAfter(after), message.to_string())
    }

    /// A failure that retrying cannot fix (bad input): dead-letter now.
    pub fn permanent(message: impl fmt::Display) -> Self {
        Self::with(FailureKind::Permanent, message.to_string())
    }

    /// What the handler asked for.
    pub fn kind(&self) -> FailureKind {
        self.kind
    }

    /// The error text recorded in logs and dead-letter headers.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The `JobError` an error stands for: the error itself when it is one, else the first
    /// `JobError` kind found along its cause chain (through anyhow and other wrappers), else a
    /// retry. The message is the whole chain, outermost first, joined by `": "`.
    pub fn from_error(error: BoxError) -> Self {
        let error = match error.downcast::<JobError>() {
            Ok(job) => return *job,
            Err(other) => other,
        };
        let mut kind = FailureKind::Retry;
        let mut message = String::new();
        let mut next: Option<&(dyn std::error::Error + 'static)> = Some(error.as_ref());
        while let Some(e) = next {
            if let Some(marker) = e.downcast_ref::<KindMarker>() {
                kind = marker.0;
                break; // the marker ends a JobError's chain
            }
            if let Some(job) = e.downcast_ref::<JobError>() {
                kind = job.kind;
            }
            let text = e.to_string();
            if !message.ends_with(&text) {
                if !message.is_empty() {
                    message.push_str(": ");
                }
                message.push_str(&text);
            }
            next = e.source();
        }
        Self::with(kind, message)
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

impl std::error::Error for JobError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.marker)
    }
}

/// Turns any failed `Result` into a [`JobError`] of a chosen kind, for `?`:
/// `parse(raw).permanent()?` dead-letters a bad input at once, `call().retry_after(d)?` waits.
pub trait Fail<T> {
    /// The error becomes [`JobError::permanent`] (its cause chain as the message).
    fn permanent(self) -> Result<T, JobError>;
    /// The error becomes [`JobError::retry`].
    fn retry(self) -> Result<T, JobError>;
    /// The error becomes [`JobError::retry_after`].
    fn retry_after(self, after: Duration) -> Result<T, JobError>;
}

impl<T, E: Into<BoxError>> Fail<T> for Result<T, E> {
    fn permanent(self) -> Result<T, JobError> {
        self.map_err(|e| JobError::with(FailureKind::Permanent, chain(e.into())))
    }
    fn retry(self) -> Result<T, JobError> {
        self.map_err(|e| JobError::with(FailureKind::Retry, chain(e.into())))
    }
    fn retry_after(self, after: Duration) -> Result<T, JobError> {
        self.map_err(|e| JobError::with(FailureKind::RetryAfter(after), chain(e.into())))
    }
}

fn chain(e: BoxError) -> String {
    JobError::from_error(e).message
}

/// What a handler may return: `()`, or `Result<(), E>` with `E: Into<`[`BoxError`]`>`
/// ([`JobError`], any `std::error::Error + Send + Sync`, `anyhow::Error`, `String`).
#[diagnostic::on_unimplemented(
    message = "a job handler cannot return `{Self}`",
    note = "return (), or Result<(), E> where E is JobError, anyhow::Error, Box<dyn Error + Send + Sync> or any std::error::Error + Send + Sync + 'static"
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

impl<E: Into<BoxError>> IntoOutcome for Result<(), E> {
    fn into_outcome(self) -> Result<(), JobError> {
        self.map_err(|e| JobError::from_error(e.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Outer(std::io::Error);
    impl fmt::Display for Outer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("loading the card")
        }
    }
    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    fn outcome<E: Into<BoxError>>(e: E) -> JobError {
        match Err::<(), E>(e).into_outcome() {
            Err(j) => j,
            Ok(()) => panic!("an error is not a success"),
        }
    }

    #[test]
    fn any_error_retries_with_its_cause_chain() {
        let io = std::io::Error::other("connection reset");
        let j = outcome(Outer(io));
        assert_eq!(j.kind(), FailureKind::Retry);
        assert_eq!(j.message(), "loading the card: connection reset");
        let j = outcome("plain text");
        assert_eq!((j.kind(), j.message()), (FailureKind::Retry, "plain text"));
    }

    #[test]
    fn a_job_error_keeps_its_kind_through_boxes_and_wrappers() {
        let j = outcome(JobError::permanent("bad input"));
        assert_eq!(
            (j.kind(), j.message()),
            (FailureKind::Permanent, "bad input")
        );
        let boxed: BoxError = JobError::retry_after(Duration::from_secs(30), "rate limited").into();
        let j = outcome(boxed);
        assert_eq!(j.kind(), FailureKind::RetryAfter(Duration::from_secs(30)));

        /// A wrapper that hides its inner error from `downcast`, like anyhow's.
        #[derive(Debug)]
        struct Opaque(JobError);
        impl fmt::Display for Opaque {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }
        impl std::error::Error for Opaque {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                self.0.source()
            }
        }
        let j = outcome(Opaque(JobError::permanent("declined")));
        assert_eq!(
            (j.kind(), j.message()),
            (FailureKind::Permanent, "declined")
        );
    }

    async fn with_anyhow(crate::Json(n): crate::Json<i64>) -> anyhow::Result<()> {
        use anyhow::Context as _;
        if n < 0 {
            return Err(JobError::permanent("negative amount").into());
        }
        if n == 0 {
            Err(JobError::permanent("zero amount")).context("charging the card")?;
        }
        let _: u8 = n.to_string().parse()?;
        Ok(())
    }

    #[tokio::test]
    async fn anyhow_handlers_keep_job_error_kinds() {
        // It is a handler the router takes.
        let _ = crate::Router::new().route("charge", with_anyhow);
        let run = |n: i64| async move {
            match with_anyhow(crate::Json(n)).await.into_outcome() {
                Err(j) => (j.kind(), j.message().to_string()),
                Ok(()) => (FailureKind::Retry, "ok".to_string()),
            }
        };
        assert_eq!(
            run(-1).await,
            (FailureKind::Permanent, "negative amount".into())
        );
        assert_eq!(
            run(0).await,
            (
                FailureKind::Permanent,
                "charging the card: zero amount".into()
            )
        );
        assert_eq!(
            run(300).await,
            (
                FailureKind::Retry,
                "number too large to fit in target type".into()
            )
        );
        assert_eq!(run(5).await.1, "ok");
    }

    #[test]
    fn fail_picks_the_kind_for_question_mark() {
        let r: Result<u8, _> = "x".parse::<u8>().permanent();
        let j = r.err().map(outcome);
        assert_eq!(
            j.as_ref().map(|j| (j.kind(), j.message())),
            Some((FailureKind::Permanent, "invalid digit found in string"))
        );
        let r = Err::<(), _>("busy").retry_after(Duration::from_secs(5));
        assert_eq!(
            r.err().map(|j| j.kind()),
            Some(FailureKind::RetryAfter(Duration::from_secs(5)))
        );
    }
}
