//! Job status: where a job is (queued, delayed, running, succeeded, retrying, dead), with
//! timestamps, its attempt, the last error and a result the handler chose to keep
//! ([`JobContext::set_result`](crate::JobContext::set_result)).
//!
//! Off by default; `track_status = true` (or a window, `"7d"`) on a queue turns it on. A status
//! lives in the state store under `status:<id>`, kept for the window after the job's last
//! change (24 h for `true`). Producers with the config write `queued` (or `delayed`) before
//! they publish; the worker writes the rest. Read it with [`Client::status`](crate::Client::status),
//! `GET /jobs/{id}` on the worker's HTTP server, or `stevedore status ID`.
//!
//! Status is a view for people and APIs ("202 Accepted, poll here"), not a lock: two workers
//! running duplicates of one job may overwrite each other's status, and a status write that
//! fails is logged, never fails the job.

use serde::{Deserialize, Serialize};
use std::time::{Duration, SystemTime};

/// Where a job is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum JobState {
    /// Published, waiting for a worker.
    Queued,
    /// Published with a time it may not run before ([`JobStatus::run_at`]).
    Delayed,
    /// A worker is running it ([`JobStatus::attempt`], [`JobStatus::worker`]).
    Running,
    /// Its handler succeeded ([`JobStatus::result`]); final.
    Succeeded,
    /// An attempt failed ([`JobStatus::last_error`]); the next runs at [`JobStatus::run_at`].
    Retrying,
    /// It failed for the last time and is in the dead-letter queue; final unless redriven.
    Dead,
}

impl JobState {
    /// `queued`, `delayed`, `running`, `succeeded`, `retrying` or `dead`.
    pub fn as_str(&self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Delayed => "delayed",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Retrying => "retrying",
            JobState::Dead => "dead",
        }
    }

    /// Whether the job is done with (succeeded or dead).
    pub fn is_final(&self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Dead)
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One job's status, as kept in the state store. Timestamps are RFC 3339 in JSON.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct JobStatus {
    /// The job's id.
    pub id: String,
    /// Its logical queue.
    pub queue: String,
    /// Its job name.
    pub job: String,
    /// Where it is.
    pub state: JobState,
    /// The attempt running or last run, from 1; 0 before the first.
    pub attempt: u32,
    /// Attempts allowed (known once a worker has taken it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// When it was first enqueued.
    #[serde(with = "rfc3339")]
    pub enqueued_at: SystemTime,
    /// When this status was written.
    #[serde(with = "rfc3339")]
    pub updated_at: SystemTime,
    /// Delayed or retrying: not before this time.
    #[serde(default, with = "rfc3339_opt", skip_serializing_if = "Option::is_none")]
    pub run_at: Option<SystemTime>,
    /// When the current or last attempt started.
    #[serde(default, with = "rfc3339_opt", skip_serializing_if = "Option::is_none")]
    pub started_at: Option<SystemTime>,
    /// Succeeded or dead: when.
    #[serde(default, with = "rfc3339_opt", skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<SystemTime>,
    /// The last failure's message (kept across later attempts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The worker running it or that ran it last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    /// What the handler kept with [`JobContext::set_result`](crate::JobContext::set_result).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
}

/// Largest result a handler may keep, serialized: 16 KiB (a status is read often and lives
/// in a key-value store; larger results belong in the application's own storage).
pub const MAX_RESULT: usize = 16 * 1024;

/// Longest `last_error` kept, in bytes.
pub(crate) const MAX_ERROR: usize = 2048;

/// The state store key of job `id`'s status.
pub(crate) fn key(id: &str) -> String {
    if id.len() <= 200 {
        format!("status:{id}")
    } else {
        format!("status:#{}", crate::client::hash_hex(&[id.as_bytes()]))
    }
}

impl JobStatus {
    /// A fresh status of a job just enqueued.
    pub(crate) fn enqueued(
        id: &str,
        queue: &str,
        job: &str,
        enqueued_at: SystemTime,
        not_before: Option<SystemTime>,
    ) -> JobStatus {
        let now = SystemTime::now();
        let delayed = not_before.filter(|t| *t > now);
        JobStatus {
            id: id.to_string(),
            queue: queue.to_string(),
            job: job.to_string(),
            state: if delayed.is_some() {
                JobState::Delayed
            } else {
                JobState::Queued
            },
            attempt: 0,
            max_attempts: None,
            enqueued_at,
            updated_at: now,
            run_at: delayed,
            started_at: None,
            finished_at: None,
            last_error: None,
            worker: None,
            result: None,
        }
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        // Strings, numbers, clamped times and a JSON value: nothing here fails to serialize.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub(crate) fn decode(bytes: &[u8]) -> Option<JobStatus> {
        serde_json::from_slice(bytes).ok()
    }
}

/// Writes `status` with time to live `keep`; logs (never fails) when the store does not answer.
pub(crate) async fn write(
    store: &dyn stevedore_core::store::Store,
    status: &JobStatus,
    keep: Duration,
) {
    let written =
        crate::effects::timed(store.set(&key(&status.id), Some(&status.encode()), Some(keep)))
            .await;
    if let Err(e) = written {
        tracing::warn!(error = %e, id = %status.id, state = %status.state, "could not record the job's status");
    }
}

/// `t` within what RFC 3339 writes (1970 to 9999: timestamps come from message headers, which
/// any producer may set, and humantime panics outside that range).
pub(crate) fn clamp(t: SystemTime) -> SystemTime {
    let last = SystemTime::UNIX_EPOCH + Duration::from_secs(253_402_300_799);
    t.clamp(SystemTime::UNIX_EPOCH, last)
}

mod rfc3339 {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::SystemTime;

    pub(super) fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_rfc3339_millis(clamp(*t)).to_string())
    }

    pub(super) use super::clamp;

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_rfc3339_weak(&text).map_err(serde::de::Error::custom)
    }
}

mod rfc3339_opt {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::SystemTime;

    pub(super) fn serialize<S: Serializer>(
        t: &Option<SystemTime>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => super::rfc3339::serialize(t, s),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<SystemTime>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|text| humantime::parse_rfc3339_weak(&text).map_err(serde::de::Error::custom))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_round_trips_through_json_with_readable_times() {
        let t = std::time::UNIX_EPOCH + Duration::from_millis(1_767_225_600_123);
        let mut s = JobStatus::enqueued("id-1", "q", "j", t, None);
        s.updated_at = t;
        s.state = JobState::Retrying;
        s.run_at = Some(t + Duration::from_secs(5));
        s.last_error = Some("boom".into());
        s.result = Some(serde_json::json!({"n": 1}));
        let bytes = s.encode();
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("\"state\":\"retrying\""), "{text}");
        assert!(
            text.contains("\"enqueued_at\":\"2026-01-01T00:00:00.123Z\""),
            "{text}"
        );
        assert!(
            !text.contains("finished_at"),
            "absent fields are left out: {text}"
        );
        assert_eq!(JobStatus::decode(&bytes), Some(s));
    }

    #[test]
    fn times_out_of_rfc3339_range_are_clamped_not_a_panic() {
        let far = std::time::UNIX_EPOCH + Duration::from_secs(400_000_000_000);
        let s = JobStatus::enqueued("a", "q", "j", far, None);
        let text = String::from_utf8(s.encode()).expect("utf-8");
        assert!(
            text.contains("\"enqueued_at\":\"9999-12-31T23:59:59"),
            "{text}"
        );
    }

    #[test]
    fn a_delay_in_the_past_is_queued() {
        let now = SystemTime::now();
        let past = JobStatus::enqueued("a", "q", "j", now, Some(now - Duration::from_secs(1)));
        assert_eq!(past.state, JobState::Queued);
        let later = JobStatus::enqueued("a", "q", "j", now, Some(now + Duration::from_secs(60)));
        assert_eq!(later.state, JobState::Delayed);
        assert!(later.run_at.is_some());
    }
}
