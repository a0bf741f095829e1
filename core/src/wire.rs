//! How an [`Envelope`] maps onto a broker's headers / attributes and body.
//!
//! Every backend uses these two functions so that a message written by one backend's producer reads
//! the same through any consumer, and so that foreign messages (no headers of ours) are understood:
//! a missing field takes its default, a malformed one is kept as a plain header and never fails the
//! read (the runtime decides what to do with a bad payload, not the transport).

use crate::envelope::{from_millis, to_millis, Envelope, Priority};
use bytes::Bytes;

/// Header carrying [`Envelope::id`].
pub const ID: &str = "stevedore-id";
/// Header carrying [`Envelope::job`].
pub const JOB: &str = "stevedore-job";
/// Header carrying [`Envelope::attempt`].
pub const ATTEMPT: &str = "stevedore-attempt";
/// Header carrying [`Envelope::enqueued_at`] in Unix milliseconds.
pub const ENQUEUED_AT: &str = "stevedore-enqueued-at";
/// Header carrying [`Envelope::not_before`] in Unix milliseconds.
pub const NOT_BEFORE: &str = "stevedore-not-before";
/// Header carrying [`Envelope::priority`].
pub const PRIORITY: &str = "stevedore-priority";
/// Header carrying [`Envelope::key`].
pub const KEY: &str = "stevedore-key";
/// Header carrying [`Envelope::dedup_key`].
pub const DEDUP: &str = "stevedore-dedup";
/// Header carrying [`Envelope::content_type`].
pub const CONTENT_TYPE: &str = "content-type";
/// Header carrying [`Envelope::trace_parent`] (W3C trace context).
pub const TRACEPARENT: &str = "traceparent";

/// Dead-letter header: the last error, as text.
pub const DLQ_ERROR: &str = "stevedore-dlq-error";
/// Dead-letter header: how many attempts were made.
pub const DLQ_ATTEMPTS: &str = "stevedore-dlq-attempts";
/// Dead-letter header: first failure, Unix milliseconds.
pub const DLQ_FIRST_FAILURE: &str = "stevedore-dlq-first-failure";
/// Dead-letter header: last failure, Unix milliseconds.
pub const DLQ_LAST_FAILURE: &str = "stevedore-dlq-last-failure";
/// Dead-letter header: id of the worker that gave up.
pub const DLQ_WORKER: &str = "stevedore-dlq-worker";
/// Dead-letter header: the logical queue the message came from.
pub const DLQ_ORIGIN: &str = "stevedore-dlq-origin";
/// Header recording the first failure time while a job is being retried.
pub const FIRST_FAILURE: &str = "stevedore-first-failure";
/// Header the runtime sets on a message it sends again itself at the same attempt (a job a limit
/// put off, a delayed message hopping on): how many times it did. Brokers that deduplicate on
/// the dedup key (SQS FIFO) must then not take the send for the producer's first.
pub const RESENT: &str = "stevedore-resent";

/// Counts one more re-send of the runtime's own at the same attempt in `envelope`'s
/// [`RESENT`] header.
pub fn mark_resent(envelope: &mut crate::Envelope) {
    let n = envelope
        .headers
        .get(RESENT)
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(0);
    envelope
        .headers
        .insert(RESENT.to_string(), n.saturating_add(1).to_string());
}

/// The envelope as `(header, value)` pairs plus the body. User headers come last and never override
/// ours.
pub fn to_wire(env: &Envelope) -> (Vec<(String, String)>, Bytes) {
    let mut h: Vec<(String, String)> = Vec::with_capacity(8 + env.headers.len());
    h.push((ID.into(), env.id.clone()));
    if let Some(job) = &env.job {
        h.push((JOB.into(), job.clone()));
    }
    h.push((ATTEMPT.into(), env.attempt.to_string()));
    h.push((ENQUEUED_AT.into(), to_millis(env.enqueued_at).to_string()));
    if let Some(t) = env.not_before {
        h.push((NOT_BEFORE.into(), to_millis(t).to_string()));
    }
    if env.priority != Priority::Normal {
        h.push((PRIORITY.into(), env.priority.as_str().into()));
    }
    if let Some(k) = &env.key {
        h.push((KEY.into(), k.clone()));
    }
    if let Some(k) = &env.dedup_key {
        h.push((DEDUP.into(), k.clone()));
    }
    if let Some(ct) = &env.content_type {
        h.push((CONTENT_TYPE.into(), ct.clone()));
    }
    if let Some(tp) = &env.trace_parent {
        h.push((TRACEPARENT.into(), tp.clone()));
    }
    for (k, v) in &env.headers {
        if !is_reserved(k) {
            h.push((k.clone(), v.clone()));
        }
    }
    (h, env.payload.clone())
}

fn is_reserved(k: &str) -> bool {
    matches!(
        k,
        ID | JOB
            | ATTEMPT
            | ENQUEUED_AT
            | NOT_BEFORE
            | PRIORITY
            | KEY
            | DEDUP
            | CONTENT_TYPE
            | TRACEPARENT
    )
}

/// Rebuilds an envelope from headers and body. `fallback_id` is used when the message carries no
/// id of ours (a foreign message): pass the broker's own message id so it stays stable across
/// redeliveries.
pub fn from_wire<I, K, V>(headers: I, body: Bytes, fallback_id: &str) -> Envelope
where
    I: IntoIterator<Item = (K, V)>,
    K: AsRef<str>,
    V: AsRef<str>,
{
    let mut env = Envelope::foreign(fallback_id, body);
    for (k, v) in headers {
        let (k, v) = (k.as_ref(), v.as_ref());
        let parsed = match k {
            ID => {
                env.id = v.to_string();
                true
            }
            JOB => {
                env.job = Some(v.to_string());
                true
            }
            ATTEMPT => v.parse().map(|a: u32| env.attempt = a.max(1)).is_ok(),
            ENQUEUED_AT => v
                .parse()
                .map(|ms| env.enqueued_at = from_millis(ms))
                .is_ok(),
            NOT_BEFORE => v
                .parse()
                .map(|ms| env.not_before = Some(from_millis(ms)))
                .is_ok(),
            PRIORITY => Priority::parse(v).map(|p| env.priority = p).is_some(),
            KEY => {
                env.key = Some(v.to_string());
                true
            }
            DEDUP => {
                env.dedup_key = Some(v.to_string());
                true
            }
            CONTENT_TYPE => {
                env.content_type = Some(v.to_string());
                true
            }
            TRACEPARENT => {
                env.trace_parent = Some(v.to_string());
                true
            }
            _ => false,
        };
        if !parsed {
            env.headers.insert(k.to_string(), v.to_string());
        }
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn round_trip_keeps_every_field() {
        let mut env = Envelope::new("send_email", &b"{\"to\":\"a@b\"}"[..])
            .json()
            .delayed(Duration::from_secs(5))
            .with_priority(Priority::High)
            .with_header("x-tenant", "42");
        env.attempt = 3;
        env.key = Some("order-1".into());
        env.dedup_key = Some("d1".into());
        env.trace_parent = Some("00-abc-def-01".into());
        let (h, body) = to_wire(&env);
        let back = from_wire(h, body, "ignored");
        // Millisecond precision on the wire.
        assert_eq!(to_millis(back.enqueued_at), to_millis(env.enqueued_at));
        assert_eq!(
            back.not_before.map(to_millis),
            env.not_before.map(to_millis)
        );
        let mut expect = env.clone();
        expect.enqueued_at = back.enqueued_at;
        expect.not_before = back.not_before;
        assert_eq!(back, expect);
    }

    #[test]
    fn foreign_message_gets_defaults_and_keeps_bad_headers() {
        let env = from_wire(
            [("stevedore-attempt", "zero?"), ("x-a", "1")],
            Bytes::from_static(b"{}"),
            "m-1",
        );
        assert_eq!(env.id, "m-1");
        assert_eq!(env.job, None);
        assert_eq!(env.attempt, 1);
        assert_eq!(
            env.headers.get("stevedore-attempt").map(String::as_str),
            Some("zero?")
        );
        assert_eq!(env.headers.get("x-a").map(String::as_str), Some("1"));
    }

    #[test]
    fn user_headers_cannot_override_ours() {
        let env = Envelope::new("j", "p").with_header(ID, "forged");
        let (h, _) = to_wire(&env);
        assert_eq!(h.iter().filter(|(k, _)| k == ID).count(), 1);
        assert_eq!(from_wire(h, Bytes::new(), "x").id, env.id);
    }
}
