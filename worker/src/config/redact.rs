//! Showing the effective config without its secrets (`config check`).

use super::Config;
use serde_json::{Map, Value};
use std::fmt::Write as _;

// Top-level tables are written in the order [`Config`] declares them (serde_json sorts map keys).
use super::SECTIONS;
/// Keys inside tables in the order the structs declare them, then priority levels highest first.
/// Keys not listed follow in alphabetical order.
const FIELDS: [&str; 52] = [
    "kind",
    "url",
    "max_payload",
    "key_prefix",
    "region",
    "endpoint", // broker
    "id",
    "concurrency",
    "shutdown_timeout",
    "poll_wait",
    "promote_interval",
    "startup_timeout", // worker
    "enabled",
    "bind",
    "ui",
    "read_only",
    "token",
    "allowed_hosts", // http
    "max_attempts",
    "base",
    "factor",
    "cap",
    "max_age", // retry
    "target_per_worker",
    "min_workers",
    "max_workers",
    "interval", // autoscale
    "lease",
    "timeout",
    "batch",
    "mode",
    "weights",
    "reserved",
    "aging",
    "default_job",
    "retry",
    "max_depth",
    "rate",
    "burst",
    "max_concurrent",
    "unique", // queues, jobs
    "job",
    "queue",
    "cron",
    "every",
    "timezone",
    "jitter",
    "priority",
    "catch_up",
    "payload", // schedules
    "high",
    "normal", // priority levels ("low" sorts last anyway)
];

fn ordered(table: &Map<String, Value>, top: bool) -> Vec<(&String, &Value)> {
    let order: &[&str] = if top { &SECTIONS } else { &FIELDS };
    let rank = |k: &str| order.iter().position(|o| *o == k).unwrap_or(usize::MAX);
    let mut items: Vec<(&String, &Value)> = table.iter().collect();
    items.sort_by_key(|(k, _)| rank(k)); // stable: unlisted keys stay alphabetical
    items
}

/// Query parameters whose value is hidden by [`redact_url`] (matched as substrings, any case).
const SECRET_PARAMS: [&str; 5] = ["pass", "secret", "token", "key", "credential"];

/// `url` with its password (or whole user-info when there is no password) and secret-looking
/// query parameters replaced by `***`: `redis://:***@host:6379/0`, `amqp://guest:***@host/`,
/// `https://host/?token=***`. Text that is not a URL is returned unchanged.
pub fn redact_url(url: &str) -> String {
    let start = url.find("://").map_or(0, |i| i + 3);
    // Up to the query or fragment; the last '@' in there ends the user-info, even when an
    // unencoded password contains '/'.
    let end = url[start..]
        .find(['?', '#'])
        .map_or(url.len(), |i| start + i);
    let mut out = String::with_capacity(url.len());
    match url[start..end].rfind('@') {
        Some(at) => {
            let info = &url[start..start + at];
            out.push_str(&url[..start]);
            match info.split_once(':') {
                Some((user, _)) => {
                    out.push_str(user);
                    out.push_str(":***");
                }
                None => out.push_str("***"),
            }
            out.push_str(&url[start + at..end]);
        }
        None => out.push_str(&url[..end]),
    }
    let rest = &url[end..];
    let Some(query) = rest.strip_prefix('?') else {
        out.push_str(rest);
        return out;
    };
    let (query, fragment) = match query.split_once('#') {
        Some((q, f)) => (q, Some(f)),
        None => (query, None),
    };
    out.push('?');
    let pairs: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((k, _)) if is_secret(k) => format!("{k}=***"),
            _ => pair.to_string(),
        })
        .collect();
    out.push_str(&pairs.join("&"));
    if let Some(f) = fragment {
        out.push('#');
        out.push_str(f);
    }
    out
}

/// Keys of `[broker]` whose whole value is hidden.
const SECRET_KEYS: [&str; 4] = ["password", "secret", "token", "credential"];

fn redact_setting(key: &str, value: &mut Value) {
    let k = key.to_ascii_lowercase();
    match value {
        _ if SECRET_KEYS.iter().any(|s| k.contains(s)) => *value = Value::String("***".into()),
        Value::String(s) => *s = redact_url(s),
        Value::Array(items) => items.iter_mut().for_each(|v| redact_setting(key, v)),
        Value::Object(table) => table.iter_mut().for_each(|(k, v)| redact_setting(k, v)),
        _ => {}
    }
}

fn is_secret(param: &str) -> bool {
    let p = param.to_ascii_lowercase();
    SECRET_PARAMS.iter().any(|s| p.contains(s))
}

impl Config {
    /// The effective config (defaults, file, profile and environment applied; the implicit
    /// `default` queue shown) as TOML, with the backend's secrets redacted: every `[broker]`
    /// string by [`redact_url`], and the whole value of a key that names a secret (`password`,
    /// `secret`, `token`, `credential`). Values set by the profile or the environment carry a comment
    /// saying so. Unset optional keys are left out.
    pub fn redacted(&self) -> String {
        let mut shown = self.clone();
        for (key, value) in shown.broker.settings.iter_mut() {
            redact_setting(key, value);
        }
        for (key, value) in shown.store.settings.iter_mut() {
            redact_setting(key, value);
        }
        if let Some(o) = shown.outbox.as_mut() {
            o.url = redact_url(&o.url);
        }
        if shown.http.token.is_some() {
            shown.http.token = Some("***".into());
        }
        shown.queues = self.effective_queues();
        let mut out = String::from("# effective configuration (secrets redacted)\n");
        if let Some(file) = &self.source {
            let _ = writeln!(out, "# file: {file}");
        }
        if let Some(profile) = &self.profile {
            let _ = writeln!(out, "# profile: {profile}");
        }
        match serde_json::to_value(&shown) {
            Ok(Value::Object(root)) => self.write_table(&mut out, &mut Vec::new(), &root),
            Ok(_) => {}
            Err(e) => {
                let _ = writeln!(out, "# cannot be shown: {e}");
            }
        }
        out
    }

    /// Writes one table: its plain values under a `[header]`, then its sub-tables. Tables three
    /// levels deep whose values are all plain (weights, retry overrides) are written inline.
    fn write_table(&self, out: &mut String, path: &mut Vec<String>, table: &Map<String, Value>) {
        let depth = path.len();
        let inline = |v: &Value| match v {
            Value::Object(m) => depth >= 2 && m.values().all(|v| !v.is_object()),
            _ => true,
        };
        let plain: Vec<(&String, &Value)> = ordered(table, path.is_empty())
            .into_iter()
            .filter(|(_, v)| !v.is_null() && inline(v))
            .collect();
        if !plain.is_empty() && !path.is_empty() {
            if !out.ends_with("\n\n") {
                out.push('\n');
            }
            let header: Vec<String> = path.iter().map(|k| toml_key(k)).collect();
            let _ = writeln!(out, "[{}]", header.join("."));
        }
        for (k, v) in plain {
            path.push(k.clone());
            let dotted = path.join(".");
            let mut from: Vec<&str> = self
                .origins
                .iter()
                .filter(|(o, _)| *o == &dotted || o.starts_with(&format!("{dotted}.")))
                .map(|(_, w)| w.as_str())
                .collect();
            from.dedup();
            path.pop();
            let _ = write!(out, "{} = {}", toml_key(k), toml_value(v));
            if !from.is_empty() {
                let _ = write!(out, "  # from {}", from.join(", "));
            }
            out.push('\n');
        }
        for (k, v) in ordered(table, path.is_empty()) {
            if let Value::Object(m) = v {
                if !inline(v) {
                    path.push(k.clone());
                    self.write_table(out, path, m);
                    path.pop();
                }
            }
        }
    }
}

fn toml_key(k: &str) -> String {
    let bare = !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare {
        k.to_string()
    } else {
        toml_string(k)
    }
}

fn toml_string(s: &str) -> String {
    // JSON string escapes are valid TOML basic-string escapes; TOML also forbids a raw DEL.
    serde_json::to_string(s)
        .unwrap_or_default()
        .replace('\u{7f}', "\\u007F")
}

fn toml_value(v: &Value) -> String {
    match v {
        Value::String(s) => toml_string(s),
        Value::Object(m) => {
            let items: Vec<String> = ordered(m, false)
                .into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| format!("{} = {}", toml_key(k), toml_value(v)))
                .collect();
            if items.is_empty() {
                "{}".into()
            } else {
                format!("{{ {} }}", items.join(", "))
            }
        }
        Value::Array(a) => {
            let items: Vec<String> = a.iter().map(toml_value).collect();
            format!("[{}]", items.join(", "))
        }
        Value::Null => "\"\"".into(),
        other => other.to_string(),
    }
}
