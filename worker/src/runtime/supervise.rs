//! Job supervision: the handler (with the router's layers) runs under its timeout, with panics
//! caught, its lease extended while it runs, and the hard-stop signal able to cut it off.

use super::QueueCtx;
use crate::JobError;
use std::panic::AssertUnwindSafe;
use std::time::Duration;
use stevedore_core::Receipt;
use tokio::sync::watch;

pub(super) enum Supervised {
    Done(Result<(), JobError>),
    Aborted,
}

/// Runs a handler that did not finish on its first poll (that poll happens in the job's task)
/// to its end: under its timeout, catching panics, extending the lease while it runs, and giving
/// up when the hard stop fires.
pub(super) async fn supervise_slow(
    ctx: &QueueCtx,
    fut: futures::future::CatchUnwind<
        AssertUnwindSafe<futures::future::BoxFuture<'static, Result<(), JobError>>>,
    >,
    receipt: &Receipt,
    timeout: Duration,
    claim: Option<&crate::effects::Begun>,
) -> Supervised {
    tokio::pin!(fut);
    let lease = ctx.cfg.lease;
    let effects = ctx.effects.as_ref().zip(claim);
    // The inbox claim's renewal in flight, if any (at most one; stopped when the job ends, so
    // none lands after the claim was settled).
    let mut renewing = AbortOnDrop(None);
    let beat = crate::lease::beat(lease);
    let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + beat, beat);
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    let mut hard = ctx.hard_stop.clone();
    loop {
        tokio::select! {
            biased;
            r = &mut fut => return Supervised::Done(flatten(r)),
            _ = &mut deadline => {
                return Supervised::Done(Err(JobError::retry(format!(
                    "timed out after {}",
                    humantime::format_duration(timeout)
                ))));
            }
            _ = turned_true(&mut hard) => return Supervised::Aborted,
            _ = heartbeat.tick(), if ctx.lease_timed || effects.is_some() => {
                if ctx.lease_timed {
                    crate::lease::renew(ctx.broker().as_ref(), receipt, lease).await;
                }
                if let Some((effects, begun)) = effects {
                    if renewing.0.as_ref().is_none_or(|r| r.is_finished()) {
                        renewing.0 = crate::effects::renew(effects, begun);
                    }
                }
            }
        }
    }
}

/// A task aborted when this is dropped.
struct AbortOnDrop(Option<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(t) = self.0.take() {
            t.abort();
        }
    }
}

/// Resolves once the watch holds `true` (never, if its sender is gone while false).
pub(super) async fn turned_true(rx: &mut watch::Receiver<bool>) {
    if rx.wait_for(|v| *v).await.is_err() {
        futures::future::pending::<()>().await;
    }
}

pub(super) fn flatten(
    r: Result<Result<(), JobError>, Box<dyn std::any::Any + Send>>,
) -> Result<(), JobError> {
    r.unwrap_or_else(|panic| {
        let msg = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "non-string panic payload".into());
        Err(JobError::retry(format!("handler panicked: {msg}")))
    })
}
