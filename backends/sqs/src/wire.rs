//! How an envelope travels on SQS: the body, at most 10 message attributes, FIFO group and
//! deduplication ids, and queue names.
//!
//! - The body is the payload when it is text SQS accepts (valid UTF-8 of the XML character
//!   range SQS allows); anything else (binary, control characters) goes base64-encoded and the
//!   packed attribute says so, so bytes always come back exactly.
//! - Stevedore's own headers (`stevedore-*`, `content-type`, `traceparent`) travel packed as one
//!   JSON object in the String attribute `stevedore`. Each application header is an attribute of
//!   its own where its name and value are legal SQS attribute names and values, so plain SQS
//!   consumers see them; the rest go into the packed object. The client allows at most 9
//!   application headers ([`stevedore_core::Capabilities::max_headers`]), so a message never
//!   needs more than 10 attributes.
//! - A message written by a plain SQS client (no `stevedore` attribute) reads as a foreign job:
//!   its String and Number attributes become headers, its SQS message id becomes its id, its
//!   `SentTimestamp` its enqueue time.

use aws_sdk_sqs::types::MessageAttributeValue;
use base64::Engine as _;
use bytes::Bytes;
use std::collections::HashMap;
use stevedore_core::{wire, Envelope};

/// The attribute holding Stevedore's packed headers.
pub(crate) const PACKED: &str = "stevedore";
/// Packed key saying the body is base64 of the payload.
const BODY_ENCODING: &str = "stevedore-body";
/// Most attributes SQS takes on one message.
pub(crate) const MAX_ATTRIBUTES: usize = 10;

/// One message ready to send: body, attributes and their size as SQS counts it.
#[derive(Debug)]
pub(crate) struct Outgoing {
    pub(crate) body: String,
    pub(crate) attributes: HashMap<String, MessageAttributeValue>,
    /// Body plus every attribute's name, type and value, in bytes: what SQS holds against
    /// `MaximumMessageSize`.
    pub(crate) size: usize,
}

/// Whether SQS accepts `s` as a body or attribute value: `#x9 | #xA | #xD | #x20-#xD7FF |
/// #xE000-#xFFFD | #x10000-#x10FFFF` (Rust strings hold no surrogates).
pub(crate) fn sqs_text(s: &str) -> bool {
    s.chars()
        .all(|c| matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{FFFD}' | '\u{10000}'..))
}

/// Whether `name` may be a message attribute name: at most 256 of `A-Za-z0-9_-.`, not starting
/// or ending with `.`, no `..`, not starting with `AWS.` or `Amazon.` (any case), and not ours.
fn attribute_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    !name.is_empty()
        && name.len() <= 256
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        && !name.starts_with('.')
        && !name.ends_with('.')
        && !name.contains("..")
        && !lower.starts_with("aws.")
        && !lower.starts_with("amazon.")
        && lower != PACKED
}

fn string_attribute(value: String) -> Option<MessageAttributeValue> {
    MessageAttributeValue::builder()
        .data_type("String")
        .string_value(value)
        .build()
        .ok()
}

/// The envelope as an SQS message.
pub(crate) fn encode(env: &Envelope) -> Outgoing {
    let (headers, payload) = wire::to_wire(env);
    let mut packed = serde_json::Map::new();
    let mut attributes = HashMap::new();
    let mut size = 0;
    for (k, v) in headers {
        let ours = k.starts_with("stevedore-") || k == wire::CONTENT_TYPE || k == wire::TRACEPARENT;
        if !ours
            && attributes.len() < MAX_ATTRIBUTES - 1
            && attribute_name(&k)
            && !v.is_empty()
            && sqs_text(&v)
        {
            size += k.len() + "String".len() + v.len();
            if let Some(a) = string_attribute(v) {
                attributes.insert(k, a);
            }
        } else {
            packed.insert(k, serde_json::Value::String(v));
        }
    }
    let body = match std::str::from_utf8(&payload) {
        Ok(text) if sqs_text(text) => text.to_string(),
        _ => {
            packed.insert(BODY_ENCODING.into(), "base64".into());
            base64::engine::general_purpose::STANDARD.encode(&payload)
        }
    };
    let packed = serde_json::Value::Object(packed).to_string();
    size += PACKED.len() + "String".len() + packed.len() + body.len();
    if let Some(a) = string_attribute(packed) {
        attributes.insert(PACKED.into(), a);
    }
    Outgoing {
        body,
        attributes,
        size,
    }
}

/// Bytes SQS counts for `env` beyond its payload when sent (attributes, base64 growth): used to
/// say how large a payload could have been.
pub(crate) fn overhead(env: &Envelope, out: &Outgoing) -> usize {
    out.size.saturating_sub(env.payload.len())
}

/// Rebuilds the envelope of a received message. `sent_ms` is its `SentTimestamp`, used as the
/// enqueue time of a foreign message. A `stevedore` attribute that is not our JSON is kept as a
/// plain header, and a body marked base64 that does not decode is delivered as it came: the
/// runtime then sees a bad payload and dead-letters it with the reason, nothing is dropped here.
pub(crate) fn decode(
    message_id: &str,
    body: Option<String>,
    attributes: Option<HashMap<String, MessageAttributeValue>>,
    sent_ms: Option<u64>,
) -> Envelope {
    let mut pairs: Vec<(String, String)> = Vec::new();
    let mut base64_body = false;
    for (name, value) in attributes.unwrap_or_default() {
        let text = match value.data_type() {
            t if t.starts_with("String") || t.starts_with("Number") => {
                value.string_value().unwrap_or_default().to_string()
            }
            // Binary attributes of foreign producers: kept, base64, so nothing is silently lost.
            _ => value
                .binary_value()
                .map(|b| base64::engine::general_purpose::STANDARD.encode(b.as_ref()))
                .unwrap_or_default(),
        };
        if name == PACKED {
            if let Ok(serde_json::Value::Object(map)) = serde_json::from_str(&text) {
                for (k, v) in map {
                    let v = match v {
                        serde_json::Value::String(s) => s,
                        other => other.to_string(),
                    };
                    if k == BODY_ENCODING {
                        base64_body = v == "base64";
                    } else {
                        pairs.push((k, v));
                    }
                }
                continue;
            }
        }
        pairs.push((name, text));
    }
    if let Some(ms) = sent_ms {
        if !pairs.iter().any(|(k, _)| k == wire::ENQUEUED_AT) {
            pairs.push((wire::ENQUEUED_AT.into(), ms.to_string()));
        }
    }
    let body = body.unwrap_or_default();
    let payload = if base64_body {
        match base64::engine::general_purpose::STANDARD.decode(body.as_bytes()) {
            Ok(bytes) => Bytes::from(bytes),
            Err(_) => Bytes::from(body),
        }
    } else {
        Bytes::from(body)
    };
    wire::from_wire(pairs, payload, message_id)
}

/// 64-bit FNV-1a: a stable hash (same in every process and version) for shortening ids.
fn fnv64(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// `s` as a FIFO group or deduplication id: at most 128 printable ASCII characters. Longer or
/// other text keeps a readable prefix and a stable hash of the whole, so two different keys never
/// share an id by truncation.
pub(crate) fn fifo_id(s: &str) -> String {
    let ok = |c: char| c.is_ascii_graphic();
    if !s.is_empty() && s.len() <= 128 && s.chars().all(ok) {
        return s.to_string();
    }
    let prefix: String = s.chars().filter(|c| ok(*c)).take(100).collect();
    format!("{prefix}~{:016x}", fnv64(s))
}

/// The FIFO deduplication id of one send. SQS drops a second message with the same id within 5
/// minutes, so the id must change whenever the runtime sends a job again on purpose (a retry
/// carries the same job id with a higher attempt; a replay from the dead-letter queue the same
/// id and attempt, later): it is the job id (or the producer's dedup key), the attempt, and the
/// send time in milliseconds. The SDK's own retries resend the same request, and so the same id.
/// A producer's dedup key on a first attempt is used as it is, which is what dedup keys are for;
/// not on the runtime's own re-sends at that attempt (header `stevedore-resent`: a job a limit
/// put off, a delay hop), which SQS would drop as duplicates of the first.
pub(crate) fn dedup_id(env: &Envelope, sent_ms: u64) -> String {
    // The runtime's own re-sends at the same attempt (a put-off job, a delay hop) say so.
    let resent = env.headers.contains_key(stevedore_core::wire::RESENT);
    match &env.dedup_key {
        Some(k) if env.attempt <= 1 && !resent => fifo_id(k),
        Some(k) => fifo_id(&format!("{k}:{}:{sent_ms}", env.attempt)),
        None => fifo_id(&format!("{}:{}:{sent_ms}", env.id, env.attempt)),
    }
}

/// The FIFO message group of a message: its key (per-key order), else its own id (no order
/// with anything else, so unkeyed messages never wait for each other).
pub(crate) fn group_id(env: &Envelope) -> String {
    fifo_id(env.key.as_deref().unwrap_or(&env.id))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(env: &Envelope) -> Envelope {
        let out = encode(env);
        decode("m-1", Some(out.body), Some(out.attributes), Some(1))
    }

    #[test]
    fn text_binary_and_headers_come_back_exactly() {
        let mut env = Envelope::new("send", &b"{\"a\":1}"[..])
            .json()
            .with_header("x-tenant", "42")
            .with_header("bad name!", "v")
            .with_header("empty", "");
        env.key = Some("k".into());
        let back = round_trip(&env);
        assert_eq!(back.payload, env.payload);
        assert_eq!(back.headers, env.headers);
        assert_eq!(back.job, env.job);
        assert_eq!(back.id, env.id);
        assert_eq!(back.key, env.key);
        let out = encode(&env);
        assert!(
            out.attributes.contains_key("x-tenant"),
            "plain consumers see it"
        );
        assert!(!out.attributes.contains_key("bad name!"));
        assert_eq!(out.body, "{\"a\":1}", "text bodies travel as they are");

        for payload in [vec![0u8, 159, 146, 150, 255], b"a\x01b".to_vec(), vec![]] {
            let env = Envelope::new("bin", payload.clone());
            let out = encode(&env);
            assert!(sqs_text(&out.body));
            assert_eq!(round_trip(&env).payload.as_ref(), &payload[..]);
        }
    }

    #[test]
    fn ten_attributes_at_most() {
        let mut env = Envelope::new("j", "p");
        for i in 0..9 {
            env = env.with_header(format!("h{i}"), "v");
        }
        let out = encode(&env);
        assert_eq!(out.attributes.len(), 10);
        assert_eq!(round_trip(&env).headers, env.headers);
    }

    #[test]
    fn foreign_messages_read_as_plain_jobs() {
        let a = HashMap::from([(
            "tenant".to_string(),
            MessageAttributeValue::builder()
                .data_type("Number")
                .string_value("7")
                .build()
                .expect("attribute"),
        )]);
        let env = decode(
            "sqs-id",
            Some("{\"x\":1}".into()),
            Some(a),
            Some(1_700_000_000_000),
        );
        assert_eq!(env.id, "sqs-id");
        assert_eq!(env.job, None);
        assert_eq!(env.payload.as_ref(), b"{\"x\":1}");
        assert_eq!(env.headers.get("tenant").map(String::as_str), Some("7"));
        assert_eq!(
            stevedore_core::to_millis(env.enqueued_at),
            1_700_000_000_000
        );
    }

    #[test]
    fn fifo_ids_are_legal_and_distinct() {
        assert_eq!(fifo_id("order-1"), "order-1");
        let long_a = format!("{}a", "x".repeat(200));
        let long_b = format!("{}b", "x".repeat(200));
        assert!(fifo_id(&long_a).len() <= 128);
        assert_ne!(fifo_id(&long_a), fifo_id(&long_b));
        assert!(fifo_id("a b é").chars().all(|c| c.is_ascii_graphic()));
        let mut env = Envelope::new("j", "p");
        let first = dedup_id(&env, 1);
        env.attempt = 2;
        assert_ne!(dedup_id(&env, 1), first, "a retry is not deduplicated away");
        env.attempt = 1;
        assert_ne!(
            dedup_id(&env, 2),
            first,
            "a replay is not deduplicated away"
        );
        env.dedup_key = Some("once".into());
        assert_eq!(
            dedup_id(&env, 1),
            dedup_id(&env, 2),
            "producer dedup keys hold"
        );
        // The runtime sending a job again at the same attempt (a limit put it off, a delay hop)
        // is not the producer's send: SQS must not drop it as a duplicate of the first.
        let producers = dedup_id(&env, 1);
        env.headers
            .insert(stevedore_core::wire::RESENT.into(), "1".into());
        assert_ne!(dedup_id(&env, 5), producers);
        assert_ne!(dedup_id(&env, 5), dedup_id(&env, 6));
    }
}
