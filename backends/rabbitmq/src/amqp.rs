//! Envelope ⇄ AMQP message: properties, headers, body, and the delivery count.

use bytes::Bytes;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::BasicProperties;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use stevedore_core::{wire, BrokerError, Envelope};

/// Header RabbitMQ's quorum queues set on every redelivery: how many times the message was returned
/// (nack/reject with requeue, or a consumer's channel closing with it unacked).
pub(crate) const DELIVERY_COUNT: &str = "x-delivery-count";
/// Header of a message waiting in the delay store: the physical queue it is for.
pub(crate) const TARGET: &str = "stevedore-target";

/// `app_id` of a message in Stevedore's own layout (what [`properties`] writes).
pub(crate) const APP_ID: &str = "stevedore";

/// The AMQP properties of an envelope, in the compact layout: the fields AMQP has properties
/// for travel in them (`message_id` = id, `type` = job, `timestamp` = enqueued_at in seconds,
/// `content_type`; persistent, `delivery_mode` 2; `app_id` = [`APP_ID`] marks the layout), and the
/// rest of [`wire::to_wire`] as long-string headers, only where it says something: the attempt
/// when above 1, the enqueue time in milliseconds when the id (a UUIDv7 made at enqueue) does not
/// carry it, an id or job name too long for a short string, and every other field and user header.
/// A plain job has no headers at all: a header table cost the broker ~20% of its throughput
/// (measured with a raw lapin loop, 5 headers against none). `extra` headers (the delay store's
/// target) are added last.
pub(crate) fn properties(
    env: &Envelope,
    extra: &[(&str, &str)],
) -> Result<(BasicProperties, Bytes), BrokerError> {
    let (headers, body) = wire::to_wire(env);
    let mut props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_app_id(ShortString::from(APP_ID))
        .with_timestamp(unix_secs(env.enqueued_at));
    let id = ShortString::try_new(env.id.as_str()).ok();
    let job = env
        .job
        .as_deref()
        .and_then(|j| ShortString::try_new(j).ok());
    let content_type = env
        .content_type
        .as_deref()
        .and_then(|c| ShortString::try_new(c).ok());
    let enqueued_in_id = uuid7_millis(&env.id) == Some(stevedore_core::to_millis(env.enqueued_at));
    let mut table = FieldTable::default();
    for (k, v) in headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .filter(|(k, v)| match *k {
            wire::ID => id.is_none(),
            wire::JOB => job.is_none(),
            wire::ATTEMPT => *v != "1",
            wire::ENQUEUED_AT => !enqueued_in_id,
            wire::CONTENT_TYPE => content_type.is_none(),
            _ => true,
        })
        .chain(extra.iter().copied())
    {
        if is_broker_header(k) && !extra.iter().any(|(e, _)| *e == k) {
            return Err(BrokerError::permanent(format!(
                "header {k:?} on message {}: RabbitMQ sets it itself (delivery count, dead-letter \
                 history), so a user header of that name is refused rather than misread",
                env.id
            )));
        }
        let key = ShortString::try_new(k).map_err(|_| {
            BrokerError::permanent(format!(
                "header name of {} bytes in message {}: AMQP allows at most 255",
                k.len(),
                env.id
            ))
        })?;
        table.insert(key, AMQPValue::LongString(LongString::from(v)));
    }
    if !table.inner().is_empty() {
        props = props.with_headers(table);
    }
    if let Some(id) = id {
        props = props.with_message_id(id);
    }
    if let Some(job) = job {
        props = props.with_type(job);
    }
    if let Some(ct) = content_type {
        props = props.with_content_type(ct);
    }
    Ok((props, body))
}

/// The millisecond timestamp of a UUIDv7 written in its hyphenated form (what
/// [`Envelope::new`] makes ids of), or `None` for any other id.
fn uuid7_millis(id: &str) -> Option<u64> {
    let b = id.as_bytes();
    if b.len() != 36 || b[8] != b'-' || b[13] != b'-' || b[14] != b'7' {
        return None;
    }
    let mut ms: u64 = 0;
    for &c in b[..8].iter().chain(&b[9..13]) {
        let digit = char::from(c).to_digit(16)?;
        ms = ms << 4 | u64::from(digit);
    }
    Some(ms)
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A header value as text, for the scalar types plain clients send; `None` for tables, arrays and
/// void, which carry nothing a Stevedore field could hold.
fn text(v: &AMQPValue) -> Option<String> {
    Some(match v {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_string(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::Timestamp(n) => n.to_string(),
        AMQPValue::Float(n) => n.to_string(),
        AMQPValue::Double(n) => n.to_string(),
        AMQPValue::ByteArray(b) => String::from_utf8_lossy(b.as_slice()).into_owned(),
        AMQPValue::DecimalValue(_)
        | AMQPValue::FieldArray(_)
        | AMQPValue::FieldTable(_)
        | AMQPValue::Void => return None,
    })
}

fn int(v: &AMQPValue) -> Option<u64> {
    match v {
        AMQPValue::LongLongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongUInt(n) => Some(u64::from(*n)),
        AMQPValue::ShortInt(n) => u64::try_from(*n).ok(),
        AMQPValue::ShortUInt(n) => Some(u64::from(*n)),
        AMQPValue::ShortShortInt(n) => u64::try_from(*n).ok(),
        AMQPValue::ShortShortUInt(n) => Some(u64::from(*n)),
        AMQPValue::Timestamp(n) => Some(*n),
        other => text(other).and_then(|s| s.parse().ok()),
    }
}

/// Broker bookkeeping headers that are never part of the envelope: the delivery count, and the
/// dead-letter history RabbitMQ adds when a delay tier expires a message into its router queue.
/// Exact names, not prefixes: a user's header that merely starts like one (`x-last-death-y`,
/// found by the `amqp_delivery` fuzz target) is the user's and is kept.
fn is_broker_header(k: &str) -> bool {
    k == DELIVERY_COUNT
        || k == TARGET
        || k.starts_with("stevedore-after-")
        || matches!(
            k,
            "x-death"
                | "x-first-death-exchange"
                | "x-first-death-queue"
                | "x-first-death-reason"
                | "x-last-death-exchange"
                | "x-last-death-queue"
                | "x-last-death-reason"
        )
}

/// A message as received, decoded: the envelope, how many times the broker handed it out (this one
/// included), and the delay store's target header if present.
pub(crate) struct Decoded {
    pub envelope: Envelope,
    pub delivery_count: u32,
    pub target: Option<String>,
}

/// Decodes a delivered message. Quorum queues count returns in `x-delivery-count` (absent on the
/// first delivery); a classic queue only says `redelivered`, which counts as the second delivery.
/// A message without our headers (a plain AMQP client's) becomes a foreign envelope: job `None`,
/// body untouched, id = its `message_id`, or a hash of body and properties that is the same on
/// every redelivery.
pub(crate) fn decode(props: &BasicProperties, body: Vec<u8>, redelivered: bool) -> Decoded {
    let mut headers: Vec<(String, String)> = Vec::new();
    let mut returns: Option<u64> = None;
    let mut target = None;
    let mut has_enqueued_at = false;
    if let Some(table) = props.headers() {
        for (k, v) in table.inner() {
            let k = k.as_str();
            if k == DELIVERY_COUNT {
                returns = int(v);
                continue;
            }
            if k == TARGET {
                target = text(v);
                continue;
            }
            if is_broker_header(k) {
                continue;
            }
            if k == wire::ENQUEUED_AT {
                has_enqueued_at = true;
            }
            if let Some(v) = text(v) {
                headers.push((k.to_string(), v));
            }
        }
    }
    let fallback = match props.message_id() {
        Some(id) if !id.as_str().is_empty() => id.as_str().to_string(),
        _ => content_id(props, &body),
    };
    let ours = props
        .app_id()
        .as_ref()
        .is_some_and(|a| a.as_str() == APP_ID);
    let mut envelope = wire::from_wire(headers, Bytes::from(body), &fallback);
    if envelope.content_type.is_none() {
        envelope.content_type = props.content_type().as_ref().map(|c| c.to_string());
    }
    if ours && envelope.job.is_none() {
        envelope.job = props.kind().as_ref().map(|k| k.to_string());
    }
    if !has_enqueued_at {
        if let Some(ms) = uuid7_millis(&envelope.id).filter(|_| ours) {
            envelope.enqueued_at = UNIX_EPOCH + Duration::from_millis(ms);
        } else if let Some(at) = props
            .timestamp()
            .and_then(|ts| UNIX_EPOCH.checked_add(Duration::from_secs(ts)))
        {
            // A foreign producer's timestamp may be anything: one past what a time can hold
            // is ignored (found by the `amqp_delivery` fuzz target).
            envelope.enqueued_at = at;
        }
    }
    let delivery_count = match returns {
        Some(n) => u32::try_from(n.saturating_add(1)).unwrap_or(u32::MAX),
        None if redelivered => 2,
        None => 1,
    };
    Decoded {
        envelope,
        delivery_count,
        target,
    }
}

/// A stable id for a message without `message_id`: 128 bits of FNV-1a over the body and the
/// properties a redelivery keeps (headers other than the broker's own, content type, timestamp,
/// correlation id, type, app id). Two byte-identical messages share it.
fn content_id(props: &BasicProperties, body: &[u8]) -> String {
    let mut a = Fnv(0xcbf2_9ce4_8422_2325);
    let mut b = Fnv(0x6c62_272e_07bb_0142);
    let mut feed = |bytes: &[u8]| {
        a.write(bytes);
        b.write(bytes);
        // Length-separated, so field boundaries cannot shift.
        a.write(&(bytes.len() as u64).to_le_bytes());
        b.write(&(bytes.len() as u64).to_le_bytes());
    };
    feed(body);
    for s in [
        props.content_type(),
        props.correlation_id(),
        props.kind(),
        props.app_id(),
    ] {
        feed(s.as_ref().map(|s| s.as_str()).unwrap_or("").as_bytes());
    }
    feed(&props.timestamp().unwrap_or(0).to_le_bytes());
    if let Some(table) = props.headers() {
        for (k, v) in table.inner() {
            if is_broker_header(k.as_str()) {
                continue;
            }
            feed(k.as_str().as_bytes());
            feed(text(v).unwrap_or_default().as_bytes());
        }
    }
    format!("amqp-{:016x}{:016x}", a.0, b.0)
}

struct Fnv(u64);

impl Fnv {
    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 ^= u64::from(*byte);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_round_trips_through_properties() {
        let mut env = Envelope::new("send", "{}")
            .json()
            .with_header("x-tenant", "7");
        env.attempt = 3;
        let (props, body) = properties(&env, &[]).expect("properties");
        assert_eq!(props.delivery_mode(), &Some(2));
        let d = decode(&props, body.to_vec(), false);
        assert_eq!(d.envelope.id, env.id);
        assert_eq!(d.envelope.job.as_deref(), Some("send"));
        assert_eq!(d.envelope.attempt, 3);
        assert_eq!(d.envelope.content_type.as_deref(), Some("application/json"));
        assert_eq!(
            d.envelope.headers.get("x-tenant").map(String::as_str),
            Some("7")
        );
        assert_eq!(d.delivery_count, 1);
        assert!(d.target.is_none());
    }

    /// Found by the `amqp_delivery` fuzz target: a foreign message's timestamp past what a time
    /// can hold panicked the decoder; a user header that starts like RabbitMQ's dead-letter
    /// history was dropped.
    #[test]
    fn a_foreign_timestamp_out_of_range_is_ignored_and_user_x_headers_are_kept() {
        let mut table = FieldTable::default();
        table.insert(
            "x-last-death-y".into(),
            AMQPValue::LongString("mine".into()),
        );
        table.insert(
            "x-last-death-queue".into(),
            AMQPValue::LongString("q".into()),
        );
        let props = BasicProperties::default()
            .with_timestamp(u64::MAX)
            .with_headers(table);
        let d = decode(&props, b"body".to_vec(), false).envelope;
        // Left at the time it was received, as for a message without a timestamp.
        let age = std::time::SystemTime::now()
            .duration_since(d.enqueued_at)
            .expect("not in the future");
        assert!(age < Duration::from_secs(60), "{age:?}");
        let headers: Vec<(&str, &str)> = d
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(headers, [("x-last-death-y", "mine")]);
    }

    /// Found by the `amqp_delivery` fuzz target: a user header named like one RabbitMQ sets
    /// would be read as the broker's (`x-delivery-count: 100` made a first delivery attempt 101).
    #[test]
    fn a_user_header_named_like_the_brokers_own_is_refused_at_publish() {
        for name in [DELIVERY_COUNT, "x-death", "x-last-death-exchange"] {
            let env = Envelope::new("send", "{}").with_header(name, "100");
            let err = properties(&env, &[]).expect_err(name);
            assert!(err.to_string().contains("RabbitMQ sets it itself"), "{err}");
        }
        let env = Envelope::new("send", "{}").with_header("x-request-id", "7");
        assert!(properties(&env, &[]).is_ok());
    }

    #[test]
    fn a_plain_job_travels_in_properties_alone() {
        let env = Envelope::new("send", "{}").json();
        let (props, _) = properties(&env, &[]).expect("properties");
        let enqueued_in_id =
            uuid7_millis(&env.id) == Some(stevedore_core::to_millis(env.enqueued_at));
        if enqueued_in_id {
            assert!(props.headers().is_none(), "{:?}", props.headers());
        }
        assert_eq!(props.kind().as_ref().map(|k| k.as_str()), Some("send"));
        assert_eq!(props.app_id().as_ref().map(|k| k.as_str()), Some(APP_ID));
        let d = decode(&props, b"{}".to_vec(), false).envelope;
        assert_eq!(d.id, env.id);
        assert_eq!(d.job.as_deref(), Some("send"));
        assert_eq!(d.attempt, 1);
        assert_eq!(
            stevedore_core::to_millis(d.enqueued_at),
            stevedore_core::to_millis(env.enqueued_at)
        );
        assert_eq!(d.content_type.as_deref(), Some("application/json"));
    }

    #[test]
    fn every_field_survives_the_compact_layout() {
        let mut env = Envelope::foreign("custom-id", "body").with_header("x-a", "1");
        env.job = Some("j".repeat(300));
        env.attempt = 4;
        env.enqueued_at = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        env.not_before = Some(UNIX_EPOCH + Duration::from_millis(1_700_000_100_456));
        env.priority = stevedore_core::Priority::High;
        env.key = Some("k".into());
        env.dedup_key = Some("d".into());
        env.trace_parent = Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into());
        env.content_type = Some("text/plain".into());
        let (props, body) = properties(&env, &[]).expect("properties");
        let d = decode(&props, body.to_vec(), false).envelope;
        assert_eq!(d.id, "custom-id");
        assert_eq!(
            d.job, env.job,
            "a job name too long for `type` goes in a header"
        );
        assert_eq!(d.attempt, 4);
        assert_eq!(
            d.enqueued_at, env.enqueued_at,
            "milliseconds kept for an id that is no UUIDv7"
        );
        assert_eq!(d.not_before, env.not_before);
        assert_eq!(d.priority, env.priority);
        assert_eq!(d.key, env.key);
        assert_eq!(d.dedup_key, env.dedup_key);
        assert_eq!(d.trace_parent, env.trace_parent);
        assert_eq!(d.content_type, env.content_type);
        assert_eq!(d.headers, env.headers);
    }

    #[test]
    fn the_earlier_layout_and_plain_clients_still_decode() {
        // What this backend wrote before the compact layout: every field a header.
        let mut t = FieldTable::default();
        for (k, v) in [
            (wire::ID, "old-1"),
            (wire::JOB, "send"),
            (wire::ATTEMPT, "2"),
            (wire::ENQUEUED_AT, "1700000000123"),
        ] {
            t.insert(k.into(), AMQPValue::LongString(LongString::from(v)));
        }
        let props = BasicProperties::default()
            .with_headers(t)
            .with_message_id("old-1".into())
            .with_timestamp(1_700_000_000);
        let d = decode(&props, vec![], false).envelope;
        assert_eq!(
            (d.id.as_str(), d.job.as_deref(), d.attempt),
            ("old-1", Some("send"), 2)
        );
        assert_eq!(stevedore_core::to_millis(d.enqueued_at), 1_700_000_000_123);
        // A plain client's `type` is its own business, not a job name.
        let plain = BasicProperties::default()
            .with_type("OrderPlaced".into())
            .with_message_id("0193a0b1-2c3d-7e4f-8a9b-0c1d2e3f4a5b".into())
            .with_timestamp(1_700_000_000);
        let d = decode(&plain, vec![], false).envelope;
        assert!(d.job.is_none());
        assert_eq!(
            d.enqueued_at,
            UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            "a plain client's timestamp, not its id's"
        );
    }

    #[test]
    fn uuid7_millis_reads_only_v7_ids() {
        assert_eq!(
            uuid7_millis("0193a0b1-2c3d-7e4f-8a9b-0c1d2e3f4a5b"),
            Some(0x0193_a0b1_2c3d)
        );
        assert_eq!(uuid7_millis("0193a0b1-2c3d-4e4f-8a9b-0c1d2e3f4a5b"), None);
        assert_eq!(uuid7_millis("0193a0b1x2c3d-7e4f-8a9b-0c1d2e3f4a5b"), None);
        assert_eq!(uuid7_millis("zz93a0b1-2c3d-7e4f-8a9b-0c1d2e3f4a5b"), None);
        assert_eq!(uuid7_millis("short"), None);
        let id = stevedore_core::new_id();
        let ms = uuid7_millis(&id).expect("new ids are UUIDv7");
        let now = stevedore_core::to_millis(SystemTime::now());
        assert!(now.abs_diff(ms) < 5_000, "{ms} vs {now}");
    }

    #[test]
    fn delivery_count_comes_from_the_quorum_header_or_the_redelivered_flag() {
        let mut t = FieldTable::default();
        t.insert(DELIVERY_COUNT.into(), AMQPValue::LongLongInt(2));
        let props = BasicProperties::default().with_headers(t);
        assert_eq!(decode(&props, vec![], true).delivery_count, 3);
        let plain = BasicProperties::default();
        assert_eq!(decode(&plain, vec![], true).delivery_count, 2);
        assert_eq!(decode(&plain, vec![], false).delivery_count, 1);
    }

    #[test]
    fn foreign_message_id_is_stable_and_ignores_the_delivery_count() {
        let plain = BasicProperties::default();
        let a = decode(&plain, b"hello".to_vec(), false);
        let mut t = FieldTable::default();
        t.insert(DELIVERY_COUNT.into(), AMQPValue::LongLongInt(1));
        let again = decode(
            &BasicProperties::default().with_headers(t),
            b"hello".to_vec(),
            true,
        );
        assert_eq!(a.envelope.id, again.envelope.id);
        assert!(a.envelope.job.is_none());
        assert!(a.envelope.headers.is_empty());
        let other = decode(&plain, b"hello!".to_vec(), false);
        assert_ne!(a.envelope.id, other.envelope.id);
        let with_id = decode(
            &BasicProperties::default().with_message_id("m-1".into()),
            b"hello".to_vec(),
            false,
        );
        assert_eq!(with_id.envelope.id, "m-1");
    }

    #[test]
    fn overlong_header_names_are_refused_not_panicking() {
        let env = Envelope::new("j", "p").with_header("h".repeat(300), "v");
        assert!(properties(&env, &[]).is_err());
        let long_id = Envelope::foreign("i".repeat(300), "p");
        let (props, _) = properties(&long_id, &[]).expect("long ids travel in headers");
        assert!(props.message_id().is_none());
    }
}
