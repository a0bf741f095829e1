//! Scenario outcomes and the backend × scenario table.

use std::fmt::Write as _;
use std::time::Duration;

/// The reason runtime scenarios give until they are wired to the worker runtime.
pub(crate) const NOT_IMPLEMENTED: &str = "not implemented yet";

/// How one scenario ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The backend did what the scenario checks.
    Pass {
        /// What was checked, with the numbers observed.
        detail: String,
    },
    /// The scenario does not apply to this backend.
    Skip {
        /// The missing capability (or the hook's own reason).
        reason: String,
    },
    /// The backend broke the contract, an operation failed, or the scenario hit its time limit.
    Fail {
        /// What went wrong, with the numbers observed.
        reason: String,
    },
}

impl Outcome {
    /// `PASS`, `SKIP` or `FAIL`.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Pass { .. } => "PASS",
            Outcome::Skip { .. } => "SKIP",
            Outcome::Fail { .. } => "FAIL",
        }
    }

    /// The detail of a pass, or the reason of a skip or failure.
    pub fn text(&self) -> &str {
        match self {
            Outcome::Pass { detail } => detail,
            Outcome::Skip { reason } | Outcome::Fail { reason } => reason,
        }
    }
}

/// One row of a [`Report`]: scenario number, scenario name, outcome, and how long it took.
pub type Row = (u8, &'static str, Outcome, Duration);

/// The outcome of every scenario run against one backend.
#[derive(Clone, Debug)]
pub struct Report {
    /// The backend's [`crate::Backend::name`].
    pub backend: String,
    /// One row per scenario run, by scenario number.
    pub rows: Vec<Row>,
}

impl Report {
    /// A fixed-width table (number, name, result, seconds, detail or reason) and a summary line
    /// such as `memory: 13 passed, 0 failed, 5 skipped`.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:>2}  {:<24}  {:<6}  {:>6}  detail",
            "#", "scenario", "result", "secs"
        );
        let _ = writeln!(
            out,
            "{:->2}  {:-<24}  {:-<6}  {:->6}  {:-<6}",
            "", "", "", "", ""
        );
        for (no, name, outcome, took) in &self.rows {
            let _ = writeln!(
                out,
                "{no:>2}  {name:<24}  {:<6}  {:>6.2}  {}",
                outcome.label(),
                took.as_secs_f64(),
                outcome.text()
            );
        }
        let _ = write!(out, "{}", self.summary());
        out
    }

    /// `backend: P passed, F failed, S skipped`.
    pub fn summary(&self) -> String {
        let count = |label: &str| self.rows.iter().filter(|r| r.2.label() == label).count();
        format!(
            "{}: {} passed, {} failed, {} skipped",
            self.backend,
            count("PASS"),
            count("FAIL"),
            count("SKIP")
        )
    }

    /// The failed scenarios: number, name and reason.
    pub fn failures(&self) -> Vec<(u8, &'static str, String)> {
        self.rows
            .iter()
            .filter_map(|(no, name, outcome, _)| match outcome {
                Outcome::Fail { reason } => Some((*no, *name, reason.clone())),
                _ => None,
            })
            .collect()
    }

    /// Panics, listing every failed scenario with its reason, if any scenario failed.
    pub fn assert_ok(&self) {
        self.assert_ok_except(&[]);
    }

    /// Like [`Report::assert_ok`], but ignores the scenarios numbered in `not_implemented` as long
    /// as their reason is exactly "not implemented yet" (any other failure of theirs still counts).
    /// Temporary: exists only while the runtime scenarios are being wired.
    pub fn assert_ok_except(&self, not_implemented: &[u8]) {
        let failed: Vec<String> = self
            .failures()
            .into_iter()
            .filter(|(no, _, reason)| !(not_implemented.contains(no) && reason == NOT_IMPLEMENTED))
            .map(|(no, name, reason)| format!("  {no:>2} {name}: {reason}"))
            .collect();
        if !failed.is_empty() {
            panic!(
                "{} conformance: {} scenario(s) failed:\n{}",
                self.backend,
                failed.len(),
                failed.join("\n")
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Report {
        let row = |no, name, outcome| (no, name, outcome, Duration::from_millis(1500));
        Report {
            backend: "test".into(),
            rows: vec![
                row(
                    1,
                    "one",
                    Outcome::Pass {
                        detail: "fine".into(),
                    },
                ),
                row(
                    2,
                    "two",
                    Outcome::Skip {
                        reason: "no x".into(),
                    },
                ),
                row(
                    8,
                    "eight",
                    Outcome::Fail {
                        reason: NOT_IMPLEMENTED.into(),
                    },
                ),
            ],
        }
    }

    #[test]
    fn table_has_rows_and_summary() {
        let t = report().table();
        assert!(
            t.contains(" 1  one                       PASS      1.50  fine"),
            "{t}"
        );
        assert!(t.ends_with("test: 1 passed, 1 failed, 1 skipped"), "{t}");
    }

    #[test]
    fn except_ignores_only_not_implemented() {
        report().assert_ok_except(&[8]);
        let mut r = report();
        r.rows[2].2 = Outcome::Fail {
            reason: "broken".into(),
        };
        let caught = std::panic::catch_unwind(|| r.assert_ok_except(&[8]));
        assert!(caught.is_err());
    }

    #[test]
    #[should_panic(expected = "8 eight: not implemented yet")]
    fn assert_ok_lists_failures() {
        report().assert_ok();
    }
}
