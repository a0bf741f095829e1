//! Retry policy ([`RetryConfig`], the `[retry]` table itself): exponential backoff with jitter,
//! bounded by attempts and age. Pure logic: the
//! runtime republishes the retry (with `attempt + 1` and a `not_before`) and acks the original, so a
//! backoff never sleeps inside a consumer and never holds the message in worker memory.

pub(crate) use crate::config::RetryConfig;
use crate::error::{FailureKind, JobError};
use crate::runtime::{forward_held, truncate, QueueCtx};
use crate::stats::JobResult;
use std::time::{Duration, SystemTime};
use stevedore_core::{names, to_millis, wire, Delivery, Priority};

/// What to do with a failed delivery.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Republish with attempt + 1, due after `delay`.
    Retry {
        /// Backoff before the next attempt.
        delay: Duration,
    },
    /// Give up: dead-letter queue, with this reason appended to the error.
    DeadLetter {
        /// Why no retry (attempts exhausted, too old, permanent).
        reason: String,
    },
}

/// The backoff maths of a `[retry]` policy (the config type is the policy: one type, no mapping).
impl RetryConfig {
    /// The upper bound of the backoff after failed attempt `attempt` (1-based):
    /// `min(cap, base × factor^(attempt−1))`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let exp = self
            .factor
            .max(1.0)
            .powi(attempt.saturating_sub(1).min(64) as i32);
        let secs = self.base.as_secs_f64() * exp;
        if !secs.is_finite() || secs >= self.cap.as_secs_f64() {
            self.cap
        } else {
            Duration::from_secs_f64(secs)
        }
    }

    /// The backoff after failed attempt `attempt`, drawn uniformly from `[base, ceiling(attempt)]`
    /// ("full jitter" above a floor of `base`), so synchronized failures spread out, yet no retry is
    /// ever sooner than `base`. `unit` is a uniform random number in `[0, 1)`.
    pub fn backoff(&self, attempt: u32, unit: f64) -> Duration {
        let hi = self.ceiling(attempt);
        let lo = self.base.min(hi);
        lo + (hi - lo).mul_f64(unit.clamp(0.0, 1.0))
    }

    /// Decides what follows a failure of `attempt`, for a job first enqueued at `enqueued_at`.
    pub fn decide(
        &self,
        error: &JobError,
        attempt: u32,
        enqueued_at: SystemTime,
        now: SystemTime,
        unit: f64,
    ) -> Decision {
        let delay = match error.kind() {
            FailureKind::Permanent => {
                return Decision::DeadLetter {
                    reason: "permanent failure".into(),
                }
            }
            FailureKind::Retry => self.backoff(attempt, unit),
            FailureKind::RetryAfter(d) => d.max(self.base.min(d)),
        };
        if attempt >= self.max_attempts {
            return Decision::DeadLetter {
                reason: format!("gave up after {attempt} of {} attempts", self.max_attempts),
            };
        }
        let age = now.duration_since(enqueued_at).unwrap_or_default();
        if age + delay > self.max_age {
            return Decision::DeadLetter {
                reason: format!(
                    "gave up: the next attempt would come {}s after first enqueue, past max_age {}s",
                    (age + delay).as_secs(),
                    self.max_age.as_secs()
                ),
            };
        }
        Decision::Retry { delay }
    }
}

/// The retry act: publishes a copy with `attempt + 1`, due after `delay`, carrying the first
/// failure time and the last error, to the queue's `level` ([`RetryConfig::level`]) or else the
/// physical queue it came from, then acks the original. If the copy cannot be published, the
/// original is held for its backoff (at most half its lease and 30 s) and then released: it
/// comes back with a higher delivery count, so its attempts still grow, and not at once.
pub(crate) async fn retry_later(
    ctx: &QueueCtx,
    d: Delivery,
    attempt: u32,
    err: &JobError,
    delay: Duration,
    level: Option<Priority>,
) -> JobResult {
    let now = SystemTime::now();
    let mut copy = d.envelope.clone();
    copy.attempt = attempt + 1;
    let to = match level {
        Some(level) => {
            copy.priority = level;
            names::physical(&ctx.name, level)
        }
        None => d.receipt.queue().to_string(),
    };
    copy.not_before = Some(now + delay);
    copy.headers
        .entry(wire::FIRST_FAILURE.to_string())
        .or_insert_with(|| to_millis(now).to_string());
    copy.headers
        .insert("stevedore-last-error".into(), truncate(err.message(), 1024));
    tracing::debug!(error = %err, next_attempt = attempt + 1, in_ms = delay.as_millis() as u64, "job failed; retry scheduled");
    // If the retry cannot be scheduled, the original is held for (up to) the backoff before it
    // is released, so it does not come back at once and run again without one.
    let hold = delay.min(ctx.cfg.lease / 2).min(Duration::from_secs(30));
    match forward_held(ctx, d.receipt, &to, copy, hold).await {
        Ok(()) => JobResult::Retried,
        Err(e) => {
            tracing::warn!(error = %e, held_ms = hold.as_millis() as u64, "could not schedule the retry; the original is released after its backoff");
            JobResult::Released
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryConfig {
        RetryConfig {
            max_attempts: 4,
            base: Duration::from_millis(100),
            factor: 2.0,
            cap: Duration::from_millis(500),
            max_age: Duration::from_secs(60),
            level: None,
        }
    }

    #[test]
    fn ceiling_grows_then_caps() {
        let p = policy();
        let c: Vec<u128> = (1..=5).map(|a| p.ceiling(a).as_millis()).collect();
        assert_eq!(c, vec![100, 200, 400, 500, 500]);
        assert_eq!(p.ceiling(u32::MAX), p.cap);
    }

    #[test]
    fn jitter_stays_within_floor_and_ceiling() {
        let p = policy();
        assert_eq!(p.backoff(3, 0.0), Duration::from_millis(100));
        assert_eq!(p.backoff(3, 1.0), Duration::from_millis(400));
        assert_eq!(p.backoff(3, 0.5), Duration::from_millis(250));
        // Out-of-range randomness is clamped, never panics.
        assert_eq!(p.backoff(1, 7.0), Duration::from_millis(100));
    }

    #[test]
    fn decisions() {
        let p = policy();
        let now = SystemTime::now();
        let retry = JobError::retry("boom");
        assert_eq!(
            p.decide(&retry, 1, now, now, 0.0),
            Decision::Retry {
                delay: Duration::from_millis(100)
            }
        );
        assert!(
            matches!(p.decide(&retry, 4, now, now, 0.0), Decision::DeadLetter { reason } if reason.contains("4 of 4"))
        );
        let perm = JobError::permanent("bad input");
        assert!(matches!(
            p.decide(&perm, 1, now, now, 0.0),
            Decision::DeadLetter { .. }
        ));
        let after = JobError::retry_after(Duration::from_secs(3), "rate limited");
        assert_eq!(
            p.decide(&after, 1, now, now, 0.9),
            Decision::Retry {
                delay: Duration::from_secs(3)
            }
        );
        let old = now - Duration::from_secs(59);
        assert!(
            matches!(p.decide(&after, 1, old, now, 0.0), Decision::DeadLetter { reason } if reason.contains("max_age"))
        );
    }
}
