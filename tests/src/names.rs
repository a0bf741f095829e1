//! Fresh queue names.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

/// Longest name [`unique`] returns.
const MAX_LEN: usize = 40;

/// A fresh queue name valid for every broker: `prefix` (characters other than ASCII letters,
/// digits, `-` and `_` become `-`, `__` is shortened to `_`, and it is cut to fit) followed by `-`
/// and a suffix made of the time in milliseconds, a per-process random number and a per-process
/// counter. At most 40 characters, so the runtime's `__high` / `__dlq` suffixes still fit every
/// broker.
///
/// ```
/// let a = stevedore_conformance::unique("emails");
/// let b = stevedore_conformance::unique("emails");
/// assert_ne!(a, b);
/// assert!(a.starts_with("emails-") && a.len() <= 40);
/// ```
pub fn unique(prefix: &str) -> String {
    let name = make_unique(prefix);
    created().push(name.clone());
    name
}

fn created() -> std::sync::MutexGuard<'static, Vec<String>> {
    static CREATED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    CREATED.lock().unwrap_or_else(|p| p.into_inner())
}

/// A key prefix of its own for one suite run against a shared broker (`ct<pid>-<n>` then
/// `separator`: `.` for RabbitMQ names, `:` for Redis keys), so clean-up can delete everything
/// under it.
pub fn run_prefix(separator: char) -> String {
    static RUNS: AtomicU32 = AtomicU32::new(0);
    let n = RUNS.fetch_add(1, Ordering::Relaxed);
    format!("ct{}-{n}{separator}", std::process::id())
}

/// Records a queue name made from a [`unique`] one (`{name}2`), so clean-up deletes it too.
pub(crate) fn track(name: String) -> String {
    created().push(name.clone());
    name
}

/// Every name [`unique`] handed out since the last call, for clean-up.
pub fn take_created() -> Vec<String> {
    std::mem::take(&mut *created())
}

fn make_unique(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    static PROCESS: OnceLock<u64> = OnceLock::new();
    let process = *PROCESS.get_or_init(|| {
        let mut h = RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        h.finish() % 36u64.pow(5)
    });
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    // Fixed-width time and process parts, then the counter: distinct inputs give distinct suffixes.
    let suffix = format!(
        "{}{}{}",
        base36(millis % 36u64.pow(9), 9),
        base36(process, 5),
        base36(u64::from(n), 1)
    );
    let mut clean: String = prefix
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    while clean.contains("__") {
        clean = clean.replace("__", "_");
    }
    clean.truncate(MAX_LEN.saturating_sub(suffix.len() + 1));
    if clean.is_empty() {
        clean.push('q');
    }
    format!("{clean}-{suffix}")
}

fn base36(mut n: u64, width: usize) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    while n > 0 || out.len() < width {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
    }
    out.reverse();
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_short_clean_and_distinct() {
        let long = unique(&"x".repeat(100));
        assert!(long.len() <= MAX_LEN, "{long}");
        let odd = unique("a.b c__d");
        assert!(stevedore_core::names::validate(&odd).is_ok(), "{odd}");
        let many: std::collections::HashSet<String> = (0..2000).map(|_| unique("q")).collect();
        assert_eq!(many.len(), 2000);
    }

    #[test]
    fn base36_pads() {
        assert_eq!(base36(0, 3), "000");
        assert_eq!(base36(35, 1), "z");
        assert_eq!(base36(36, 1), "10");
    }
}
