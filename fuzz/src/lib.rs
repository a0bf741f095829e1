//! What the fuzz targets share: an envelope drawn from the fuzzer's bytes, and what a transport
//! must keep of it (what `stevedore_core::wire` itself round-trips).

use arbitrary::{Arbitrary, Result, Unstructured};
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use stevedore_core::{wire, Envelope, Priority};

/// Headers RabbitMQ sets itself: its publish refuses them as user headers.
const RABBITMQ_OWN: [&str; 8] = [
    "x-delivery-count",
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
];

/// A millisecond time between 1970 and about 2255 (what every wire form carries).
fn time(u: &mut Unstructured<'_>) -> Result<SystemTime> {
    let ms = u64::arbitrary(u)? % 9_000_000_000_000;
    Ok(UNIX_EPOCH + Duration::from_millis(ms))
}

/// Any envelope a producer can make: any strings, any payload, any user headers but the
/// reserved ones, attempt from 1.
pub fn envelope(u: &mut Unstructured<'_>) -> Result<Envelope> {
    let mut headers: BTreeMap<String, String> = BTreeMap::arbitrary(u)?;
    // Reserved: the `stevedore-` prefix, and the two names that are fields of their own on
    // the wire (`content-type`, `traceparent`).
    headers.retain(|k, _| {
        !k.to_ascii_lowercase().starts_with("stevedore-")
            && k != wire::CONTENT_TYPE
            && k != wire::TRACEPARENT
            && !RABBITMQ_OWN.contains(&k.as_str())
    });
    let priority = match u8::arbitrary(u)? % 3 {
        0 => Priority::High,
        1 => Priority::Normal,
        _ => Priority::Low,
    };
    let mut env = Envelope::new("job", Vec::<u8>::arbitrary(u)?);
    env.id = String::arbitrary(u)?;
    // An empty job name reads back as none on Redis (its entry leaves empty parts out).
    env.job = Option::<String>::arbitrary(u)?.filter(|j| !j.is_empty());
    env.content_type = Option::<String>::arbitrary(u)?;
    env.headers = headers;
    env.attempt = u32::arbitrary(u)?.max(1);
    env.enqueued_at = time(u)?;
    env.not_before = if bool::arbitrary(u)? {
        Some(time(u)?)
    } else {
        None
    };
    env.priority = priority;
    env.key = Option::<String>::arbitrary(u)?;
    env.dedup_key = Option::<String>::arbitrary(u)?;
    env.trace_parent = Option::<String>::arbitrary(u)?;
    Ok(env)
}

/// What the shared wire form keeps of `env`: a transport that carries its headers and body
/// must hand back exactly this.
pub fn canonical(env: &Envelope) -> Envelope {
    let (headers, body) = wire::to_wire(env);
    wire::from_wire(headers, body, "")
}
