//! Periodic jobs (`[schedules.<name>]`): one enqueue per tick across any number of workers.
//!
//! Every worker runs every enabled schedule's loop; the state store decides who fires a tick.
//! The state of a schedule is one key (`schedule:<name>`) holding its last tick and, while a
//! worker is publishing one, a claim (`pending`: the tick, who, until when). A tick is:
//! 1. claimed by a compare-and-swap from the state this worker read (only one worker wins);
//! 2. published, with an id derived from the schedule and the tick;
//! 3. recorded as the last tick (a swap from the claim).
//!
//! The claim holds for [`CLAIM`] (10 s) and the publishing worker renews it every quarter of
//! that while its publish goes on (at most [`PUBLISH_TIMEOUT`], 20 s), so a live worker's slow
//! publish is not taken over. A worker that dies between 1 and 3 leaves a claim that lapses
//! within 10 s; another worker (or a restarted one) then publishes that tick under the same id
//! and records it, and the ticks that passed meanwhile run late, each once. So a tick is never
//! lost, and published twice only when a worker died (or its publish hung for 20 s and then
//! went through) mid-publish, as the same job id. Claims are compared with the workers' clocks:
//! they should agree to well within 10 s.
//!
//! A tick at most [`GRACE`] (a minute) late is late, not missed: it runs, once, and so does
//! every other such tick, oldest first (a round slowed by a busy broker, a rolling deploy: none
//! is lost). Ticks older than that were missed while no worker ran: `catch_up = "skip"` records
//! them without an enqueue, `"once"` publishes the latest of them once; never one per missed
//! tick.

use crate::client::Client;
use crate::config::{CatchUp, Config, ScheduleConfig};
use chrono::{TimeZone, Utc};
use serde::{Deserialize, Serialize};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use stevedore_core::store::Store;
use stevedore_core::{names, Envelope};
use tokio::sync::watch;

/// How long a claim on a tick holds unless renewed (the publishing worker renews it every
/// quarter of this until its publish ends).
pub(crate) const CLAIM: Duration = Duration::from_secs(10);
/// The longest a publish of a tick may take before the worker gives it up (and leaves the
/// claim to lapse).
pub(crate) const PUBLISH_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a round may go on once the worker is asked to stop.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// A tick later than this when first seen counts as missed (see [`CatchUp`]).
pub(crate) const GRACE: Duration = Duration::from_secs(60);
/// The longest a schedule's loop sleeps without looking at the store again (another worker may
/// have moved the schedule on, or a claim may have lapsed).
const LOOK_AGAIN: Duration = Duration::from_secs(60);
/// Header naming the schedule on the jobs it enqueues.
pub const SCHEDULE_HEADER: &str = "stevedore-schedule";
/// Header holding the tick (RFC 3339, UTC) a scheduled job was enqueued for.
pub const TICK_HEADER: &str = "stevedore-tick";

/// When a schedule ticks.
#[derive(Clone, Debug)]
pub(crate) enum Spec {
    /// Multiples of the period (ms) since the Unix epoch.
    Every(i64),
    /// A cron pattern in a time zone.
    Cron(Box<croner::Cron>, chrono_tz::Tz),
}

impl Spec {
    /// The schedule's spec, or what is wrong with it (for an error at `schedules.<name>`), as
    /// `(key, message)`.
    pub(crate) fn parse(s: &ScheduleConfig) -> Result<Spec, (&'static str, String)> {
        match (&s.cron, s.every) {
            (Some(_), Some(_)) => Err((
                "cron",
                "set either cron or every, not both".to_string(),
            )),
            (None, None) => Err((
                "cron",
                "missing: set cron = \"0 */5 * * * *\" (seconds first; 5 fields for minutes) or every = \"30s\""
                    .to_string(),
            )),
            (None, Some(_)) if chrono_tz::Tz::from_str(&s.timezone).is_err() => Err((
                "timezone",
                format!(
                    "\"{}\" is not an IANA time zone (e.g. \"UTC\", \"Europe/Berlin\"); it is not used with every, so leave it out",
                    s.timezone
                ),
            )),
            (None, Some(every)) => {
                let ms = i64::try_from(every.as_millis()).unwrap_or(i64::MAX);
                if ms < 1000 || every.subsec_millis() != 0 {
                    return Err((
                        "every",
                        format!(
                            "must be a whole number of seconds, at least 1s (got {})",
                            humantime::format_duration(every)
                        ),
                    ));
                }
                Ok(Spec::Every(ms))
            }
            (Some(pattern), None) => {
                let tz = chrono_tz::Tz::from_str(&s.timezone).map_err(|_| {
                    (
                        "timezone",
                        format!(
                            "\"{}\" is not an IANA time zone (e.g. \"UTC\", \"Europe/Berlin\", \"America/New_York\")",
                            s.timezone
                        ),
                    )
                })?;
                let cron = croner::Cron::from_str(pattern).map_err(|e| {
                    (
                        "cron",
                        format!(
                            "\"{pattern}\" is not a cron pattern ({e}); 5 fields (minute hour day month weekday) or 6 with seconds first"
                        ),
                    )
                })?;
                let spec = Spec::Cron(Box::new(cron), tz);
                if spec.next_after(now_ms()).is_none() {
                    return Err(("cron", format!("\"{pattern}\" never matches a future time")));
                }
                Ok(spec)
            }
        }
    }

    /// The first tick strictly after `t` (Unix ms).
    pub(crate) fn next_after(&self, t: i64) -> Option<i64> {
        match self {
            Spec::Every(p) => t.div_euclid(*p).checked_add(1)?.checked_mul(*p),
            Spec::Cron(cron, tz) => {
                // Ticks are whole seconds: look from the second `t` falls in.
                let at = tz.timestamp_opt(t.div_euclid(1000), 0).single()?;
                let next = cron.find_next_occurrence(&at, false).ok()?;
                Some(next.timestamp_millis())
            }
        }
    }

    /// The latest tick at or before `t`, if it is after `after`.
    pub(crate) fn latest_between(&self, after: i64, t: i64) -> Option<i64> {
        let latest = match self {
            Spec::Every(p) => t.div_euclid(*p).checked_mul(*p)?,
            Spec::Cron(cron, tz) => {
                let at = tz.timestamp_opt(t.div_euclid(1000), 0).single()?;
                cron.find_previous_occurrence(&at, true)
                    .ok()?
                    .timestamp_millis()
            }
        };
        (latest > after).then_some(latest)
    }

    /// How many ticks lie strictly between `a` and `b` (counted up to `cap`).
    fn ticks_between(&self, a: i64, b: i64, cap: u64) -> u64 {
        match self {
            Spec::Every(p) => {
                let n = (b - 1).div_euclid(*p) - a.div_euclid(*p);
                u64::try_from(n.max(0)).unwrap_or(0).min(cap)
            }
            Spec::Cron(..) => {
                let mut n = 0;
                let mut t = a;
                while n < cap {
                    match self.next_after(t) {
                        Some(next) if next < b => {
                            n += 1;
                            t = next;
                        }
                        _ => break,
                    }
                }
                n
            }
        }
    }
}

/// One schedule, ready to run.
#[derive(Clone, Debug)]
pub(crate) struct Schedule {
    pub(crate) name: String,
    pub(crate) config: ScheduleConfig,
    pub(crate) spec: Spec,
}

/// The enabled schedules of `config` (already validated).
pub(crate) fn from_config(config: &Config) -> Vec<Schedule> {
    config
        .schedules
        .iter()
        .filter(|(_, s)| s.enabled)
        .filter_map(|(name, s)| {
            Some(Schedule {
                name: name.clone(),
                config: s.clone(),
                spec: Spec::parse(s).ok()?,
            })
        })
        .collect()
}

/// The state of one schedule in the store.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct TickState {
    /// The last tick done (published, or dropped as missed), Unix ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) last: Option<i64>,
    /// When the last tick was published, and by which worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) fired_at: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) by: Option<String>,
    /// The job id of the last published tick.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) job_id: Option<String>,
    /// Ticks dropped as missed, in all.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub(crate) skipped: u64,
    /// A tick being published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) pending: Option<Pending>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A claimed tick: who publishes it and until when the claim holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Pending {
    pub(crate) tick: i64,
    pub(crate) by: String,
    pub(crate) until: i64,
}

/// The state store key holding schedule `name`'s state (its last tick, a tick being
/// published). Deleting it makes the schedule start afresh from its next tick.
pub fn state_key(name: &str) -> String {
    key(name)
}

fn key(name: &str) -> String {
    format!("schedule:{name}")
}

/// The job id of `schedule`'s tick `tick`: a UUIDv7 whose time is the tick and whose other bits
/// hash the schedule's name, so every worker (and every retry of the same tick) makes the same.
pub(crate) fn tick_id(schedule: &str, tick: i64) -> String {
    let (a, b) = crate::client::hash128(&[schedule.as_bytes(), &tick.to_le_bytes()]);
    let mut rand = [0u8; 10];
    rand[..8].copy_from_slice(&a.to_le_bytes());
    rand[8..].copy_from_slice(&b.to_le_bytes()[..2]);
    let ms = u64::try_from(tick).unwrap_or(0);
    uuid::Builder::from_unix_timestamp_millis(ms, &rand)
        .into_uuid()
        .to_string()
}

pub(crate) fn now_ms() -> i64 {
    i64::try_from(stevedore_core::to_millis(SystemTime::now())).unwrap_or(i64::MAX)
}

fn rfc3339(ms: i64) -> String {
    Utc.timestamp_millis_opt(ms)
        .single()
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_else(|| ms.to_string())
}

/// Runs `schedule` until `stop` turns true. Store and broker errors are logged and retried with
/// backoff; nothing here ends the worker.
pub(crate) async fn run(
    schedule: Schedule,
    store: Arc<dyn Store>,
    client: Client,
    worker_id: Arc<str>,
    mut stop: watch::Receiver<bool>,
) {
    let key = key(&schedule.name);
    let started = now_ms();
    let mut backoff = crate::runtime::ErrorBackoff::default();
    loop {
        if *stop.borrow() {
            return;
        }
        let this_round = round(
            &schedule,
            &key,
            store.as_ref(),
            &client,
            &worker_id,
            started,
            now_ms(),
        );
        tokio::pin!(this_round);
        // A round that hangs on the store or the broker does not hold up shutdown: once asked
        // to stop it gets a few seconds (a tick being published is best finished), then is
        // dropped (its claim, if any, lapses and another worker publishes that tick).
        let outcome = tokio::select! {
            r = &mut this_round => Some(r),
            _ = stop.wait_for(|s| *s) => None,
        };
        let Some(outcome) = outcome else {
            let _ = tokio::time::timeout(STOP_GRACE, &mut this_round).await;
            return;
        };
        let wait = match outcome {
            Ok(wait) => {
                backoff = crate::runtime::ErrorBackoff::default();
                wait
            }
            Err(e) => {
                let pause = backoff.next();
                tracing::warn!(schedule = %schedule.name, error = %e, retry_in = ?pause, "schedule: store or broker failed; retrying");
                pause
            }
        };
        if !wait.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }
}

/// One look at the schedule at time `now`: fires or records what is due, and says how long to
/// wait before the next look. `started`: when this worker started looking (a schedule with no
/// state yet starts from there).
async fn round(
    s: &Schedule,
    key: &str,
    store: &dyn Store,
    client: &Client,
    me: &str,
    started: i64,
    now: i64,
) -> Result<Duration, String> {
    let raw = store.get(key).await.map_err(|e| e.to_string())?;
    let state: TickState = match raw.as_deref() {
        None => TickState::default(),
        Some(bytes) => match serde_json::from_slice(bytes) {
            Ok(st) => st,
            Err(e) => {
                // Not ours to guess at: start afresh from now, replacing it atomically.
                tracing::error!(schedule = %s.name, error = %e, "schedule: its state in the store is unreadable; starting afresh from now");
                let fresh = TickState {
                    last: Some(now),
                    ..TickState::default()
                };
                swap(store, key, raw.as_deref(), &fresh).await?;
                return Ok(Duration::ZERO);
            }
        },
    };
    if let Some(p) = &state.pending {
        if p.until > now {
            return Ok(ms(p.until - now).min(LOOK_AGAIN));
        }
        // Its worker died (or its publish kept failing): take the claim over and publish the
        // same tick, under the same id.
        tracing::warn!(schedule = %s.name, tick = %rfc3339(p.tick), claimed_by = %p.by, "schedule: a tick claimed by another worker was not published in time; publishing it");
        let tick = p.tick;
        return fire(s, key, store, client, me, raw.as_deref(), &state, tick, 0).await;
    }
    let after = state.last.unwrap_or(started);
    if s.spec.latest_between(after, now).is_none() {
        let next = s.spec.next_after(after.max(now)).ok_or("no next tick")?;
        return Ok(ms(next - now).min(LOOK_AGAIN));
    }
    // Ticks at most GRACE late are late, not missed: each runs, oldest first (a slow round, a
    // rolling deploy). Older ones were missed while no worker ran: catch_up decides, and they
    // never run one by one.
    let grace = i64::try_from(GRACE.as_millis()).unwrap_or(60_000);
    if let Some(missed) = s.spec.latest_between(after, now - grace) {
        // Counted for the log and `skipped` only: capped, so a long outage costs no long loop.
        let count = s.spec.ticks_between(after, missed, 10_000) + 1;
        if s.config.catch_up == CatchUp::Skip {
            let mut next = state.clone();
            next.last = Some(missed);
            next.skipped += count;
            if swap(store, key, raw.as_deref(), &next).await? {
                tracing::warn!(schedule = %s.name, missed = count, latest = %rfc3339(missed), "schedule: ticks missed while no worker ran were skipped (catch_up = \"skip\")");
            }
            return Ok(Duration::ZERO);
        }
        return fire(
            s,
            key,
            store,
            client,
            me,
            raw.as_deref(),
            &state,
            missed,
            count - 1,
        )
        .await;
    }
    let due = s.spec.next_after(after).ok_or("no next tick")?;
    fire(s, key, store, client, me, raw.as_deref(), &state, due, 0).await
}

/// Claims `tick`, publishes it and records it. `skipped`: earlier ticks this one stands for.
#[allow(clippy::too_many_arguments)]
async fn fire(
    s: &Schedule,
    key: &str,
    store: &dyn Store,
    client: &Client,
    me: &str,
    raw: Option<&[u8]>,
    state: &TickState,
    tick: i64,
    skipped: u64,
) -> Result<Duration, String> {
    let mut claimed = state.clone();
    claimed.pending = Some(Pending {
        tick,
        by: me.to_string(),
        until: claim_until(),
    });
    let mut claimed_bytes = encode(&claimed)?;
    let won = store
        .swap(key, raw, Some(&claimed_bytes), None)
        .await
        .map_err(|e| e.to_string())?;
    if !won {
        // Another worker moved first: look again at once.
        return Ok(Duration::ZERO);
    }
    let id = tick_id(&s.name, tick);
    let mut envelope = Envelope::new(
        &s.config.job,
        serde_json::to_vec(&s.config.payload).map_err(|e| e.to_string())?,
    )
    .json();
    envelope.id = id.clone();
    envelope.priority = s.config.priority;
    envelope
        .headers
        .insert(SCHEDULE_HEADER.to_string(), s.name.clone());
    envelope
        .headers
        .insert(TICK_HEADER.to_string(), rfc3339(tick));
    if !s.config.jitter.is_zero() {
        let jitter = rand::random_range(Duration::ZERO..=s.config.jitter);
        envelope.not_before = SystemTime::now().checked_add(jitter);
    }
    // A failed publish leaves the claim: it is published again once the claim lapses. While
    // the publish goes on the claim is renewed, so a slow broker does not get the tick taken over.
    let publish = tokio::time::timeout(
        PUBLISH_TIMEOUT,
        client.publish(&s.config.queue, vec![envelope]),
    );
    tokio::pin!(publish);
    let mut renew = tokio::time::interval_at(tokio::time::Instant::now() + CLAIM / 4, CLAIM / 4);
    let published = loop {
        tokio::select! {
            r = &mut publish => break r,
            _ = renew.tick() => {
                let mut longer = claimed.clone();
                if let Some(p) = &mut longer.pending {
                    p.until = claim_until();
                }
                let bytes = encode(&longer)?;
                match store.swap(key, Some(&claimed_bytes), Some(&bytes), None).await {
                    Ok(true) => claimed_bytes = bytes,
                    Ok(false) => tracing::warn!(schedule = %s.name, "schedule: the claim on a tick being published was taken over; it may be enqueued twice, with the same job id"),
                    Err(e) => tracing::debug!(schedule = %s.name, error = %e, "schedule: could not renew a claim; trying again"),
                }
            }
        }
    };
    match published {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(format!("publishing tick {}: {e}", rfc3339(tick))),
        Err(_) => {
            return Err(format!(
                "publishing tick {} took over {PUBLISH_TIMEOUT:?}; it is tried again when its claim lapses",
                rfc3339(tick)
            ))
        }
    }
    let mut done = state.clone();
    done.pending = None;
    done.last = Some(tick.max(state.last.unwrap_or(i64::MIN)));
    done.fired_at = Some(now_ms());
    done.by = Some(me.to_string());
    done.job_id = Some(id.clone());
    done.skipped += skipped;
    // Published: record it, trying a little harder than a round (a record lost here would have
    // the tick published again once its claim lapses).
    let mut recorded = swap(store, key, Some(&claimed_bytes), &done).await;
    for pause in [100, 500, 2000] {
        if recorded.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(pause)).await;
        recorded = swap(store, key, Some(&claimed_bytes), &done).await;
    }
    if !recorded? {
        tracing::warn!(schedule = %s.name, "schedule: its claim was taken over while publishing; the tick may be enqueued twice, with the same job id");
    }
    tracing::info!(schedule = %s.name, job = %s.config.job, queue = %s.config.queue, tick = %rfc3339(tick), job_id = %id, physical = %names::physical(&s.config.queue, s.config.priority), "schedule: enqueued");
    if skipped > 0 {
        tracing::warn!(schedule = %s.name, skipped, "schedule: ticks missed while no worker ran were caught up by this one (catch_up = \"once\")");
    }
    Ok(Duration::ZERO)
}

/// When a claim made or renewed now lapses.
fn claim_until() -> i64 {
    now_ms().saturating_add(i64::try_from(CLAIM.as_millis()).unwrap_or(10_000))
}

fn encode(state: &TickState) -> Result<Vec<u8>, String> {
    serde_json::to_vec(state).map_err(|e| e.to_string())
}

async fn swap(
    store: &dyn Store,
    key: &str,
    expected: Option<&[u8]>,
    new: &TickState,
) -> Result<bool, String> {
    store
        .swap(key, expected, Some(&encode(new)?), None)
        .await
        .map_err(|e| e.to_string())
}

fn ms(n: i64) -> Duration {
    Duration::from_millis(u64::try_from(n).unwrap_or(0))
}

/// What `schedules list` and `stats --json` show of one schedule.
#[derive(Clone, Debug, Serialize)]
pub struct ScheduleStatus {
    /// The schedule's name.
    pub name: String,
    /// The job it enqueues.
    pub job: String,
    /// The logical queue.
    pub queue: String,
    /// `cron` (with its time zone) or `every`.
    pub spec: String,
    /// Whether it runs.
    pub enabled: bool,
    /// The last tick done (RFC 3339), if any.
    pub last_tick: Option<String>,
    /// When it was published and by which worker.
    pub last_fired_at: Option<String>,
    /// The worker that published it.
    pub last_by: Option<String>,
    /// The job id of the last tick.
    pub last_job_id: Option<String>,
    /// The next tick (RFC 3339).
    pub next_tick: Option<String>,
    /// Ticks dropped as missed, in all.
    pub skipped: u64,
    /// A tick being published right now (or left by a worker that died).
    pub pending_tick: Option<String>,
}

/// The status of every schedule of `config`, read from `store`.
pub async fn statuses(
    config: &Config,
    store: &dyn Store,
) -> Result<Vec<ScheduleStatus>, stevedore_core::BrokerError> {
    let now = now_ms();
    let mut out = Vec::new();
    for (name, s) in &config.schedules {
        let state: TickState = store
            .get(&key(name))
            .await?
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let spec = Spec::parse(s).ok();
        let shown = match (&s.cron, s.every) {
            (Some(c), _) => format!("cron \"{c}\" {}", s.timezone),
            (None, Some(e)) => format!("every {}", humantime::format_duration(e)),
            (None, None) => String::new(),
        };
        out.push(ScheduleStatus {
            name: name.clone(),
            job: s.job.clone(),
            queue: s.queue.clone(),
            spec: shown,
            enabled: s.enabled,
            last_tick: state.last.map(rfc3339),
            last_fired_at: state.fired_at.map(rfc3339),
            last_by: state.by.clone(),
            last_job_id: state.job_id.clone(),
            next_tick: spec
                .filter(|_| s.enabled)
                .and_then(|sp| sp.next_after(state.last.unwrap_or(now).max(now)))
                .map(rfc3339),
            skipped: state.skipped,
            pending_tick: state.pending.as_ref().map(|p| rfc3339(p.tick)),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(toml: &str) -> ScheduleConfig {
        let cfg =
            crate::config::from_toml_str(&format!("[schedules.s]\njob = \"j\"\n{toml}"), None)
                .expect("config");
        cfg.schedules["s"].clone()
    }

    #[test]
    fn every_ticks_on_multiples_of_the_period() {
        let spec = Spec::parse(&sched("every = \"10s\"")).expect("spec");
        assert_eq!(spec.next_after(0), Some(10_000));
        assert_eq!(spec.next_after(9_999), Some(10_000));
        assert_eq!(spec.next_after(10_000), Some(20_000));
        assert_eq!(spec.latest_between(0, 25_000), Some(20_000));
        assert_eq!(spec.latest_between(20_000, 25_000), None);
        assert_eq!(spec.ticks_between(0, 50_000, 100), 4);
    }

    #[test]
    fn cron_with_seconds_in_a_time_zone() {
        let spec = Spec::parse(&sched(
            "cron = \"0 30 9 * * *\"\ntimezone = \"Europe/Berlin\"",
        ))
        .expect("spec");
        // 2026-01-15 00:00 UTC → next 09:30 Berlin (CET, UTC+1) is 08:30 UTC.
        let t = Utc
            .with_ymd_and_hms(2026, 1, 15, 0, 0, 0)
            .single()
            .expect("time");
        let next = spec.next_after(t.timestamp_millis()).expect("next");
        assert_eq!(rfc3339(next), "2026-01-15T08:30:00.000Z");
        // In summer (CEST, UTC+2) it is 07:30 UTC.
        let t = Utc
            .with_ymd_and_hms(2026, 7, 15, 0, 0, 0)
            .single()
            .expect("time");
        let next = spec.next_after(t.timestamp_millis()).expect("next");
        assert_eq!(rfc3339(next), "2026-07-15T07:30:00.000Z");
        // From a time with milliseconds, ticks are still whole seconds.
        let next = spec.next_after(t.timestamp_millis() + 651).expect("next");
        assert_eq!(rfc3339(next), "2026-07-15T07:30:00.000Z");
        let every_ten = Spec::parse(&sched("cron = \"*/10 * * * * *\"")).expect("spec");
        let t0 = t.timestamp_millis();
        assert_eq!(every_ten.next_after(t0 + 651), Some(t0 + 10_000));
        assert_eq!(every_ten.next_after(t0), Some(t0 + 10_000));
        assert_eq!(every_ten.latest_between(0, t0 + 9_999), Some(t0));
        // Five fields: minute precision.
        let spec = Spec::parse(&sched("cron = \"*/15 * * * *\"")).expect("spec");
        let t = Utc
            .with_ymd_and_hms(2026, 1, 15, 10, 7, 12)
            .single()
            .expect("time");
        assert_eq!(
            rfc3339(spec.next_after(t.timestamp_millis()).expect("next")),
            "2026-01-15T10:15:00.000Z"
        );
        assert_eq!(
            spec.latest_between(0, t.timestamp_millis()).map(rfc3339),
            Some("2026-01-15T10:00:00.000Z".to_string())
        );
    }

    #[test]
    fn bad_specs_name_the_key() {
        assert_eq!(Spec::parse(&sched("")).expect_err("none").0, "cron");
        assert_eq!(
            Spec::parse(&sched("cron = \"* * * * *\"\nevery = \"1s\""))
                .expect_err("both")
                .0,
            "cron"
        );
        assert_eq!(
            Spec::parse(&sched("every = \"1500ms\"")).expect_err("ms").0,
            "every"
        );
        assert_eq!(
            Spec::parse(&sched("cron = \"61 * * * *\""))
                .expect_err("bad")
                .0,
            "cron"
        );
        let e = Spec::parse(&sched("cron = \"* * * * *\"\ntimezone = \"Mars/Olympus\""))
            .expect_err("tz");
        assert_eq!(e.0, "timezone");
        assert!(e.1.contains("IANA"), "{}", e.1);
    }

    #[test]
    fn tick_ids_are_stable_sortable_and_distinct() {
        let a = tick_id("report", 1_700_000_000_000);
        assert_eq!(a, tick_id("report", 1_700_000_000_000));
        assert_ne!(a, tick_id("report", 1_700_000_001_000));
        assert_ne!(a, tick_id("other", 1_700_000_000_000));
        assert!(a < tick_id("report", 1_700_000_001_000));
        let u = uuid::Uuid::parse_str(&a).expect("uuid");
        assert_eq!(u.get_version_num(), 7);
    }
}

#[cfg(test)]
mod catch_up_tests {
    use super::*;
    use stevedore_core::store::MemoryStore;
    use stevedore_core::{Broker, MemoryBroker, ReceiveOptions};

    const MIN: i64 = 60_000;
    /// A multiple of ten minutes (2027-01-15T08:00:00Z).
    const T0: i64 = 1_800_000_000_000;

    struct Fixture {
        s: Schedule,
        store: MemoryStore,
        broker: MemoryBroker,
        client: Client,
    }

    /// Schedule `s` ticking `every`, on a memory broker and store.
    fn fixture_every(every: &str, catch_up: &str) -> Fixture {
        let toml = format!(
            "[schedules.s]\njob = \"j\"\nevery = \"{every}\"\ncatch_up = \"{catch_up}\"\npayload = {{ n = 1 }}\n"
        );
        let cfg = crate::config::from_toml_str(&toml, None).expect("config");
        let broker = MemoryBroker::new();
        Fixture {
            s: from_config(&cfg).remove(0),
            store: MemoryStore::new(),
            client: Client::new(Arc::new(broker.clone())),
            broker,
        }
    }

    /// Schedule `s` every 10 minutes (T0 is one of its ticks).
    fn fixture(catch_up: &str) -> Fixture {
        fixture_every("10m", catch_up)
    }

    impl Fixture {
        async fn state(&self) -> TickState {
            let raw = self
                .store
                .get(&key("s"))
                .await
                .expect("get")
                .expect("state");
            serde_json::from_slice(&raw).expect("json")
        }

        async fn put(&self, st: &TickState) {
            let raw = self.store.get(&key("s")).await.expect("get");
            assert!(swap(&self.store, &key("s"), raw.as_deref(), st)
                .await
                .expect("swap"));
        }

        async fn published(&self) -> Vec<Envelope> {
            let opts = ReceiveOptions {
                max: 100,
                wait: Duration::ZERO,
                lease: Duration::from_secs(30),
            };
            let got = self.broker.receive("default", opts).await.expect("receive");
            got.into_iter().map(|d| d.envelope).collect()
        }

        /// Runs rounds at `now` until one asks to wait (nothing more is due); returns that wait.
        async fn settle(&self, now: i64) -> Duration {
            for _ in 0..100 {
                let wait = round(&self.s, &key("s"), &self.store, &self.client, "w1", 0, now)
                    .await
                    .expect("round");
                if !wait.is_zero() {
                    return wait;
                }
            }
            panic!("the schedule kept finding work");
        }
    }

    #[tokio::test]
    async fn ticks_missed_while_no_worker_ran_are_skipped_or_run_once_never_each() {
        // Ten ticks passed (T0-90m .. T0) and the latest is 5 minutes old.
        let now = T0 + 5 * MIN;
        let f = fixture("skip");
        f.put(&TickState {
            last: Some(T0 - 100 * MIN),
            ..TickState::default()
        })
        .await;
        let wait = f.settle(now).await;
        assert!(
            f.published().await.is_empty(),
            "skip: nothing enqueued for missed ticks"
        );
        let st = f.state().await;
        assert_eq!((st.last, st.skipped, st.pending), (Some(T0), 10, None));
        assert_eq!(
            wait, LOOK_AGAIN,
            "then it waits for T0+10m, looking again every minute"
        );

        let f = fixture("once");
        f.put(&TickState {
            last: Some(T0 - 100 * MIN),
            ..TickState::default()
        })
        .await;
        f.settle(now).await;
        let jobs = f.published().await;
        assert_eq!(
            jobs.len(),
            1,
            "once: the latest tick once, not one per missed tick"
        );
        assert_eq!(jobs[0].id, tick_id("s", T0));
        assert_eq!(jobs[0].payload.as_ref(), br#"{"n":1}"#);
        assert_eq!(
            jobs[0].headers.get(TICK_HEADER).map(String::as_str),
            Some("2027-01-15T08:00:00.000Z")
        );
        assert_eq!(
            jobs[0].headers.get(SCHEDULE_HEADER).map(String::as_str),
            Some("s")
        );
        let st = f.state().await;
        assert_eq!(
            (st.last, st.skipped, st.by.as_deref()),
            (Some(T0), 9, Some("w1"))
        );
    }

    #[tokio::test]
    async fn a_tick_late_by_less_than_a_minute_still_runs_once() {
        // A rolling deploy: T0 passed 30 s ago with no worker up.
        let f = fixture("skip");
        f.put(&TickState {
            last: Some(T0 - 10 * MIN),
            ..TickState::default()
        })
        .await;
        f.settle(T0 + 30_000).await;
        let jobs = f.published().await;
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].id, tick_id("s", T0));
        assert_eq!(f.state().await.last, Some(T0));
        // Nothing more until the next tick, even if asked again.
        f.settle(T0 + 31_000).await;
        assert!(f.published().await.is_empty());
    }

    #[tokio::test]
    async fn ticks_a_few_seconds_late_each_run_oldest_first() {
        // A 1 s schedule whose worker fell 5 s behind (a slow broker): none of the 5 is lost.
        let f = fixture_every("1s", "skip");
        f.put(&TickState {
            last: Some(T0 - 5_000),
            ..TickState::default()
        })
        .await;
        f.settle(T0 + 500).await;
        let jobs = f.published().await;
        let ticks: Vec<&str> = jobs
            .iter()
            .filter_map(|j| j.headers.get(TICK_HEADER).map(String::as_str))
            .collect();
        assert_eq!(
            ticks,
            [
                "2027-01-15T07:59:56.000Z",
                "2027-01-15T07:59:57.000Z",
                "2027-01-15T07:59:58.000Z",
                "2027-01-15T07:59:59.000Z",
                "2027-01-15T08:00:00.000Z"
            ]
        );
        let st = f.state().await;
        assert_eq!((st.last, st.skipped), (Some(T0), 0));
    }

    #[tokio::test]
    async fn a_claim_left_by_a_dead_worker_is_published_again_under_the_same_id() {
        let f = fixture("skip");
        let now = T0 + 1000;
        let dead = TickState {
            last: Some(T0 - 10 * MIN),
            pending: Some(Pending {
                tick: T0,
                by: "w0".into(),
                until: now + 20_000,
            }),
            ..TickState::default()
        };
        f.put(&dead).await;
        // While the claim holds, nobody else publishes that tick; they look again when it ends.
        assert_eq!(f.settle(now).await, Duration::from_secs(20));
        assert!(f.published().await.is_empty());
        // Once it lapses, w1 publishes it under the id w0 would have used.
        f.settle(now + 20_001).await;
        let jobs = f.published().await;
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].id, tick_id("s", T0));
        let st = f.state().await;
        assert_eq!(
            (st.last, st.by.as_deref(), st.pending),
            (Some(T0), Some("w1"), None)
        );
    }

    #[tokio::test]
    async fn ticks_held_up_by_a_dead_workers_claim_all_run_once_it_lapses() {
        let f = fixture_every("1s", "skip");
        // w0 claimed T0 and died; its claim lapsed at T0 + 10 s; it is now T0 + 11.5 s.
        f.put(&TickState {
            last: Some(T0 - 1000),
            pending: Some(Pending {
                tick: T0,
                by: "w0".into(),
                until: T0 + 10_000,
            }),
            ..TickState::default()
        })
        .await;
        f.settle(T0 + 11_500).await;
        let jobs = f.published().await;
        let ids: Vec<String> = (0..12).map(|k| tick_id("s", T0 + k * 1000)).collect();
        assert_eq!(
            jobs.iter().map(|j| j.id.clone()).collect::<Vec<_>>(),
            ids,
            "the claimed tick, then every tick since, each once, in order"
        );
        assert_eq!(f.state().await.last, Some(T0 + 11_000));
    }

    #[tokio::test]
    async fn unreadable_state_restarts_the_schedule_from_now() {
        let f = fixture("skip");
        assert!(f
            .store
            .swap(&key("s"), None, Some(b"garbage"), None)
            .await
            .expect("swap"));
        f.settle(T0 + 1000).await;
        assert!(f.published().await.is_empty());
        assert_eq!(f.state().await.last, Some(T0 + 1000));
    }
}
