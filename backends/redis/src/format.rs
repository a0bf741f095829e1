//! How an envelope is laid out in a stream entry.
//!
//! Stevedore writes an entry of **one field**: its name is [`PREFIX`] followed by the envelope's
//! metadata, its value is the body, untouched:
//!
//! ```text
//! XADD emails * "stevedore/1 1764840000123 1 0193a9f0-2c3b-7d2e-9f00-1234567890ab send_email" '{"to":"a@b"}'
//!                            enqueued-at ms  attempt  id                       job  [ k=v&k=v ]
//! ```
//!
//! The optional last part carries every other header of [`wire::to_wire`] (delay, priority, key,
//! content type, trace context, user headers) as `name=value` pairs joined by `&`. Every part is
//! percent-encoded (space, `%`, `&`, `=`, control and non-ASCII bytes), so none holds a space.
//!
//! Why one field: Redis's work per entry, and the client's, grows with the number of fields. A
//! one-field entry costs both sides what a hand-written producer's `payload` entry costs, where
//! the header-per-field layout it replaces (5+ fields) cost about twice as much on both sides.
//!
//! Read as well (so entries written by earlier versions and by other producers still work): an
//! entry with a `payload` field (the body) and one field per header; an entry of one foreign
//! field (its value is the body); several foreign fields (a JSON object of them). A plain client
//! reading Stevedore's entries finds the body as the value of the entry's only field.

use bytes::Bytes;
use percent_encoding::{percent_decode, utf8_percent_encode, AsciiSet, CONTROLS};
use std::borrow::Cow;
use stevedore_core::{wire, Envelope};

/// What the name of Stevedore's one field starts with (the format's version).
pub(crate) const PREFIX: &[u8] = b"stevedore/1 ";
/// The field a release adds: deliveries before the entry was re-added.
pub(crate) const REDELIVERIES: &[u8] = b"stevedore-redeliveries";

/// Bytes escaped in every part: what separates parts and pairs, and what is not printable.
const ESCAPED: &AsciiSet = &CONTROLS.add(b' ').add(b'%').add(b'&').add(b'=');

/// The entry's one field name (metadata) and value (the body).
pub(crate) fn encode(env: &Envelope) -> (Vec<u8>, Bytes) {
    let (headers, body) = wire::to_wire(env);
    let mut name = String::with_capacity(96);
    name.push_str("stevedore/1");
    let (mut at, mut attempt, mut id, mut job) = ("", "1", "", "");
    let mut rest = Vec::new();
    for (k, v) in &headers {
        match k.as_str() {
            wire::ENQUEUED_AT => at = v,
            wire::ATTEMPT => attempt = v,
            wire::ID => id = v,
            wire::JOB => job = v,
            _ => rest.push((k, v)),
        }
    }
    for part in [at, attempt, id, job] {
        name.push(' ');
        name.extend(utf8_percent_encode(part, ESCAPED));
    }
    if !rest.is_empty() {
        name.push(' ');
        for (i, (k, v)) in rest.into_iter().enumerate() {
            if i > 0 {
                name.push('&');
            }
            name.extend(utf8_percent_encode(k, ESCAPED));
            name.push('=');
            name.extend(utf8_percent_encode(v, ESCAPED));
        }
    }
    (name.into_bytes(), body)
}

fn decoded(part: &[u8]) -> Cow<'_, str> {
    match percent_decode(part).into() {
        Cow::Borrowed(b) => String::from_utf8_lossy(b),
        Cow::Owned(v) => Cow::Owned(String::from_utf8_lossy(&v).into_owned()),
    }
}

/// The envelope of an entry with id `entry_id` and these fields, and its redelivery count (what
/// a release recorded). Never fails: what cannot be read becomes a plain header or a default,
/// and the runtime decides what to do with the job.
pub(crate) fn decode(entry_id: &str, fields: Vec<(Vec<u8>, Vec<u8>)>) -> (Envelope, u32) {
    let mut redeliveries = 0u32;
    let mut ours = None;
    let mut others = Vec::new();
    for (k, v) in fields {
        if k.starts_with(PREFIX) && ours.is_none() {
            ours = Some((k, v));
        } else if k == REDELIVERIES {
            redeliveries = std::str::from_utf8(&v)
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
        } else {
            others.push((k, v));
        }
    }
    let env = match ours {
        Some((meta, body)) => compact(entry_id, &meta[PREFIX.len()..], Bytes::from(body)),
        None => legacy(entry_id, others),
    };
    (env, redeliveries)
}

fn compact(entry_id: &str, meta: &[u8], body: Bytes) -> Envelope {
    let mut parts = meta.splitn(5, |b| *b == b' ');
    let head = [wire::ENQUEUED_AT, wire::ATTEMPT, wire::ID, wire::JOB].map(|name| {
        parts
            .next()
            .filter(|p| !p.is_empty())
            .map(|p| (Cow::Borrowed(name), decoded(p)))
    });
    let has_id = head[2].is_some();
    let rest = parts
        .next()
        .unwrap_or_default()
        .split(|b| *b == b'&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let mut kv = pair.splitn(2, |b| *b == b'=');
            let k = decoded(kv.next().unwrap_or_default());
            (k, decoded(kv.next().unwrap_or_default()))
        });
    let pairs = head.into_iter().flatten().chain(rest);
    wire::from_wire(pairs, body, if has_id { "" } else { entry_id })
}

/// An entry in the header-per-field layout (a `payload` field), or a foreign one.
fn legacy(entry_id: &str, fields: Vec<(Vec<u8>, Vec<u8>)>) -> Envelope {
    let n_fields = fields.len();
    let mut body: Option<Bytes> = None;
    let mut headers: Vec<(String, String)> = Vec::with_capacity(n_fields);
    let mut lone_value = None;
    for (k, v) in fields {
        if k == b"payload" {
            body = Some(Bytes::from(v));
        } else {
            let value = String::from_utf8_lossy(&v).into_owned();
            if n_fields == 1 {
                lone_value = Some(v);
            }
            headers.push((String::from_utf8_lossy(&k).into_owned(), value));
        }
    }
    // A foreign entry without a `payload` field: a lone field's value is the body; several
    // fields become a JSON object.
    let body = body.unwrap_or_else(|| match lone_value {
        Some(v) => {
            headers.clear();
            Bytes::from(v)
        }
        None => {
            let obj: serde_json::Map<String, serde_json::Value> = headers
                .drain(..)
                .map(|(k, v)| (k, serde_json::Value::String(v)))
                .collect();
            Bytes::from(serde_json::Value::Object(obj).to_string())
        }
    });
    wire::from_wire(headers, body, entry_id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use stevedore_core::{to_millis, Priority};

    fn round_trip(env: &Envelope) -> Envelope {
        let (name, body) = encode(env);
        let (back, redeliveries) = decode("1-0", vec![(name, body.to_vec())]);
        assert_eq!(redeliveries, 0);
        back
    }

    fn same(a: &Envelope, b: &Envelope) {
        assert_eq!(to_millis(a.enqueued_at), to_millis(b.enqueued_at));
        assert_eq!(a.not_before.map(to_millis), b.not_before.map(to_millis));
        let mut b = b.clone();
        b.enqueued_at = a.enqueued_at;
        b.not_before = a.not_before;
        assert_eq!(*a, b);
    }

    #[test]
    fn one_field_whose_value_is_the_body() {
        let env = Envelope::new("send_email", &b"{\"to\":\"a@b\"}"[..]);
        let (name, body) = encode(&env);
        let name = String::from_utf8(name).expect("utf-8");
        assert_eq!(&body[..], b"{\"to\":\"a@b\"}");
        assert_eq!(
            name,
            format!(
                "stevedore/1 {} 1 {} send_email",
                to_millis(env.enqueued_at),
                env.id
            )
        );
        same(&round_trip(&env), &env);
    }

    #[test]
    fn every_field_and_awkward_text_survive() {
        let mut env = Envelope::new("a job & more=x%20 ü", &b"\x00\xffbinary"[..])
            .json()
            .delayed(Duration::from_secs(5))
            .with_priority(Priority::High)
            .with_header("x tenant&=", "4 2&=%\n")
            .with_header("stevedore/1 x", "y");
        env.id = "id with space".into();
        env.attempt = 3;
        env.key = Some("order 1".into());
        env.dedup_key = Some("d=1".into());
        env.trace_parent = Some("00-abc-def-01".into());
        let name = encode(&env).0;
        assert_eq!(
            name.iter().filter(|b| **b == b' ').count(),
            5,
            "only the separators are spaces"
        );
        same(&round_trip(&env), &env);
    }

    #[test]
    fn a_job_without_a_name_stays_without() {
        let mut env = Envelope::foreign("f-1", &b"{}"[..]);
        env.job = None;
        let back = round_trip(&env);
        assert_eq!(back.job, None);
        assert_eq!(back.id, "f-1");
    }

    #[test]
    fn malformed_metadata_never_fails_the_read() {
        let (env, _) = decode("7-1", vec![(b"stevedore/1 x".to_vec(), b"body".to_vec())]);
        assert_eq!(env.id, "7-1");
        assert_eq!(&env.payload[..], b"body");
        assert_eq!(env.attempt, 1);
        assert_eq!(
            env.headers.get(wire::ENQUEUED_AT).map(String::as_str),
            Some("x")
        );
    }

    #[test]
    fn a_release_count_is_read_beside_either_layout() {
        let env = Envelope::new("j", &b"{}"[..]);
        let (name, body) = encode(&env);
        let (back, n) = decode(
            "1-0",
            vec![
                (name, body.to_vec()),
                (REDELIVERIES.to_vec(), b"2".to_vec()),
            ],
        );
        assert_eq!((back.id.as_str(), n), (env.id.as_str(), 2));
        let (back, n) = decode(
            "1-0",
            vec![
                (b"payload".to_vec(), b"{}".to_vec()),
                (b"stevedore-id".to_vec(), b"old".to_vec()),
                (b"stevedore-job".to_vec(), b"j".to_vec()),
                (REDELIVERIES.to_vec(), b"1".to_vec()),
            ],
        );
        assert_eq!(
            (back.id.as_str(), back.job.as_deref(), n),
            ("old", Some("j"), 1)
        );
    }

    #[test]
    fn foreign_entries_read_as_before() {
        let (env, _) = decode("5-0", vec![(b"payload".to_vec(), b"{\"a\":1}".to_vec())]);
        assert_eq!(
            (env.id.as_str(), &env.payload[..]),
            ("5-0", &b"{\"a\":1}"[..])
        );
        let (env, _) = decode("5-1", vec![(b"data".to_vec(), b"hello".to_vec())]);
        assert_eq!(&env.payload[..], b"hello");
        assert!(env.headers.is_empty());
        let (env, _) = decode(
            "5-2",
            vec![
                (b"a".to_vec(), b"1".to_vec()),
                (b"b".to_vec(), b"2".to_vec()),
            ],
        );
        let v: serde_json::Value = serde_json::from_slice(&env.payload).expect("json");
        assert_eq!(v, serde_json::json!({"a": "1", "b": "2"}));
    }
}
