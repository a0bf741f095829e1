//! Physical queue names. A logical queue `emails` is served from up to three physical queues, one
//! per [`Priority`] level, plus a dead-letter queue:
//!
//! | level / role | physical name |
//! |---|---|
//! | normal | `emails` (so plain producers that know nothing of priority write to the right place) |
//! | high | `emails__high` |
//! | low | `emails__low` |
//! | dead letters | `emails__dlq` |
//!
//! `__` is reserved for these suffixes, and names keep to the characters every broker accepts
//! (SQS allows only ASCII letters, digits, `-` and `_`, at most 80 characters).

use crate::envelope::Priority;

/// Longest logical queue name: SQS's 80 less room for our suffixes and a `.fifo`.
pub const MAX_QUEUE_NAME: usize = 64;

/// The physical queue for `queue` at `priority`.
pub fn physical(queue: &str, priority: Priority) -> String {
    match priority {
        Priority::Normal => queue.to_string(),
        p => format!("{queue}__{}", p.as_str()),
    }
}

/// The dead-letter queue of logical queue `queue`.
pub fn dead_letter(queue: &str) -> String {
    format!("{queue}__dlq")
}

/// Checks a logical queue name; the error says what is allowed.
pub fn validate(queue: &str) -> Result<(), String> {
    if queue.is_empty() || queue.len() > MAX_QUEUE_NAME {
        return Err(format!("must be 1 to {MAX_QUEUE_NAME} characters long"));
    }
    if !queue
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err("may contain only ASCII letters, digits, '-' and '_'".into());
    }
    if queue.contains("__") {
        return Err("may not contain '__' (reserved for priority and dead-letter suffixes)".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_per_level() {
        assert_eq!(physical("emails", Priority::Normal), "emails");
        assert_eq!(physical("emails", Priority::High), "emails__high");
        assert_eq!(physical("emails", Priority::Low), "emails__low");
        assert_eq!(dead_letter("emails"), "emails__dlq");
    }

    #[test]
    fn validation_names_the_rule() {
        assert!(validate("send-email_v2").is_ok());
        assert!(validate("").is_err());
        assert!(validate("a.b").unwrap_err().contains("letters"));
        assert!(validate("a__b").unwrap_err().contains("reserved"));
        assert!(validate(&"x".repeat(65)).is_err());
    }
}
