//! Decoding Redis replies (RESP2 and RESP3 shapes) into stream entries.

use redis::Value;

/// One stream entry: id and flat field/value pairs.
pub(crate) struct Entry {
    pub id: String,
    pub fields: Vec<(Vec<u8>, Vec<u8>)>,
}

pub(crate) fn bytes(v: &Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b.clone()),
        Value::SimpleString(s) => Some(s.as_bytes().to_vec()),
        Value::Int(i) => Some(i.to_string().into_bytes()),
        Value::Okay => Some(b"OK".to_vec()),
        _ => None,
    }
}

pub(crate) fn string(v: &Value) -> Option<String> {
    bytes(v).and_then(|b| String::from_utf8(b).ok())
}

pub(crate) fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        other => string(other).and_then(|s| s.parse().ok()),
    }
}

fn items(v: &Value) -> &[Value] {
    match v {
        Value::Array(a) | Value::Set(a) => a,
        _ => &[],
    }
}

/// A bulk or simple string, moved out of the reply (no copy).
fn into_bytes(v: Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        Value::Int(i) => Some(i.to_string().into_bytes()),
        Value::Okay => Some(b"OK".to_vec()),
        _ => None,
    }
}

fn into_items(v: Value) -> Vec<Value> {
    match v {
        Value::Array(a) | Value::Set(a) => a,
        _ => Vec::new(),
    }
}

/// `[id, [f, v, f, v, ...]]` → entry, its strings moved out of the reply. Deleted entries (nil
/// fields) are skipped.
fn entry(v: Value) -> Option<Entry> {
    let mut parts = into_items(v).into_iter();
    let id = String::from_utf8(into_bytes(parts.next()?)?).ok()?;
    let flat: Vec<Value> = match parts.next()? {
        Value::Nil => return None,
        Value::Map(m) => m.into_iter().flat_map(|(k, v)| [k, v]).collect(),
        other => into_items(other),
    };
    let mut fields = Vec::with_capacity(flat.len() / 2);
    let mut flat = flat.into_iter();
    while let (Some(k), Some(v)) = (flat.next(), flat.next()) {
        fields.push((into_bytes(k)?, into_bytes(v)?));
    }
    Some(Entry { id, fields })
}

/// Entries of an `XRANGE` reply or of one stream's list.
pub(crate) fn entries(v: Value) -> Vec<Entry> {
    into_items(v).into_iter().filter_map(entry).collect()
}

/// Entries of an `XREADGROUP` reply for a single stream (nil = nothing).
pub(crate) fn read_reply(v: Value) -> Vec<Entry> {
    match v {
        Value::Nil => Vec::new(),
        Value::Map(m) => m.into_iter().flat_map(|(_, list)| entries(list)).collect(),
        other => into_items(other)
            .into_iter()
            .flat_map(|stream| {
                into_items(stream)
                    .into_iter()
                    .nth(1)
                    .map(entries)
                    .unwrap_or_default()
            })
            .collect(),
    }
}

/// The reclaim script's reply: `[shortest lease ms, [[id, [fields], delivery_count], ...],
/// consumers removed]`.
pub(crate) fn claimed(v: Value) -> (Option<u64>, Vec<(Entry, u32)>, u64) {
    let mut parts = into_items(v).into_iter();
    let min = parts.next().as_ref().and_then(int).map(|n| n.max(1) as u64);
    let rows = parts.next().map(into_items).unwrap_or_default();
    let claimed = rows
        .into_iter()
        .filter_map(|row| {
            let count = int(items(&row).get(2)?)?.clamp(1, u32::MAX as i64) as u32;
            Some((entry(row)?, count))
        })
        .collect();
    let removed = parts.next().as_ref().and_then(int).unwrap_or(0).max(0) as u64;
    (min, claimed, removed)
}

/// Field `name` of one `XINFO GROUPS` row (flat array in RESP2, map in RESP3).
pub(crate) fn info_field<'a>(row: &'a Value, name: &str) -> Option<&'a Value> {
    match row {
        Value::Map(m) => m
            .iter()
            .find(|(k, _)| string(k).as_deref() == Some(name))
            .map(|(_, v)| v),
        other => items(other)
            .chunks_exact(2)
            .find(|p| string(&p[0]).as_deref() == Some(name))
            .map(|p| &p[1]),
    }
}

/// The row of group `group` in an `XINFO GROUPS` reply.
pub(crate) fn group_row<'a>(v: &'a Value, group: &str) -> Option<&'a Value> {
    items(v)
        .iter()
        .find(|row| info_field(row, "name").and_then(string).as_deref() == Some(group))
}

/// The ids of an extended `XPENDING key group - + n` reply (`[[id, consumer, idle, count], ...]`).
pub(crate) fn pending_ids(v: &Value) -> Vec<String> {
    items(v)
        .iter()
        .filter_map(|row| string(items(row).first()?))
        .collect()
}

/// Milliseconds part of a stream id `1700000000000-0`.
pub(crate) fn id_millis(id: &str) -> Option<u64> {
    id.split('-').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn reads_resp2_xreadgroup() {
        let v = Value::Array(vec![Value::Array(vec![
            bulk("q"),
            Value::Array(vec![
                Value::Array(vec![
                    bulk("1-0"),
                    Value::Array(vec![bulk("payload"), bulk("{}")]),
                ]),
                Value::Array(vec![bulk("2-0"), Value::Nil]),
            ]),
        ])]);
        let e = read_reply(v);
        assert_eq!(e.len(), 1, "deleted entry skipped");
        assert_eq!(e[0].id, "1-0");
        assert_eq!(e[0].fields, vec![(b"payload".to_vec(), b"{}".to_vec())]);
        assert!(read_reply(Value::Nil).is_empty());
    }

    #[test]
    fn reads_groups_and_ids() {
        let row = Value::Array(vec![bulk("name"), bulk("g"), bulk("lag"), Value::Int(3)]);
        let v = Value::Array(vec![row]);
        let r = group_row(&v, "g").expect("row");
        assert_eq!(info_field(r, "lag").and_then(int), Some(3));
        assert!(group_row(&v, "other").is_none());
        assert_eq!(id_millis("1700000000123-7"), Some(1_700_000_000_123));
    }
}
