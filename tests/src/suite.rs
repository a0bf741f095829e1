//! One named test per scenario: [`conformance_tests!`](crate::conformance_tests) in a backend's
//! test file makes `cargo test` list `redis::lease_expiry ... ok`, and a failure names its
//! scenario and says why.
//!
//! The scenarios still run as one suite, in the runner's phases (timing-sensitive ones with
//! nothing heavy beside them, then the bulk ones, then the broker restart alone): the first named
//! test to start runs every *selected* scenario (those the `cargo test` filters match) and the
//! others wait for that run, then each reports its own row. So the timing guarantees of
//! [`run`](crate::run) hold however many threads libtest uses, and the printed backend × scenario
//! table is kept.

use crate::backend::Backend;
use crate::report::{Outcome, Report};
use crate::scenarios;
use std::sync::{Arc, OnceLock};

/// Starts a private server and returns a hook on it (see [`Hooks::restart`]).
pub type StartPrivate = fn() -> Result<Arc<dyn Backend>, String>;

/// How a backend's test file builds its hooks. Plain functions, called once per test binary.
#[derive(Clone, Copy)]
pub struct Hooks {
    /// The hook every scenario runs against.
    pub backend: fn() -> Arc<dyn Backend>,
    /// A hook on a private server that scenario 16 (broker restart) may restart, where the
    /// shared one must not be; called only when scenario 16 is selected. `Err` fails scenario 16
    /// with that reason. `None`: scenario 16 runs against `backend` (which then usually skips it).
    pub restart: Option<StartPrivate>,
}

/// The state behind one test binary's named tests (a `static` the macro declares).
pub struct Suite {
    done: OnceLock<Done>,
}

struct Done {
    report: Report,
    cleanup: Result<(), String>,
}

impl Suite {
    /// An empty suite; runs on the first [`Suite::scenario`] call.
    #[allow(clippy::new_without_default)] // used in a `static`
    pub const fn new() -> Self {
        Suite {
            done: OnceLock::new(),
        }
    }

    /// The body of the named test `slug` (scenario `no`) declared in module `module`
    /// (`module_path!()`). Runs the suite if no test of this binary has yet, then panics if the
    /// scenario failed or the clean-up did; a skipped scenario passes and prints why.
    pub fn scenario(&self, module: &str, no: u8, slug: &str, hooks: fn() -> Hooks) {
        let known = scenarios::all()
            .into_iter()
            .find(|s| s.no == no)
            .map(|s| s.slug);
        assert_eq!(
            known,
            Some(slug),
            "conformance_tests! names scenario {no} {slug:?}; the suite calls it {known:?}"
        );
        let done = self.done.get_or_init(|| run_selected(module, hooks()));
        if let Err(e) = &done.cleanup {
            panic!(
                "{}: clean-up of the test queues failed: {e}",
                done.report.backend
            );
        }
        let Some((_, name, outcome, took)) = done.report.rows.iter().find(|r| r.0 == no) else {
            panic!("scenario {no} ({slug}) did not run: is it filtered out?");
        };
        let backend = &done.report.backend;
        match outcome {
            Outcome::Pass { detail } => {
                println!(
                    "{backend} {no} {name}: PASS in {:.2}s: {detail}",
                    took.as_secs_f64()
                )
            }
            Outcome::Skip { reason } => println!("{backend} {no} {name}: SKIP: {reason}"),
            Outcome::Fail { reason } => panic!(
                "{backend} scenario {no} ({name}) failed after {:.2}s: {reason}",
                took.as_secs_f64()
            ),
        }
    }
}

/// The scenarios whose named test the command line selects.
fn selected(module: &str) -> Vec<u8> {
    let prefix = module.split_once("::").map_or("", |(_, rest)| rest);
    let filter = Filter::from_args(std::env::args().skip(1));
    scenarios::all()
        .into_iter()
        .filter(|s| {
            let name = if prefix.is_empty() {
                s.slug.to_string()
            } else {
                format!("{prefix}::{}", s.slug)
            };
            filter.selects(&name)
        })
        .map(|s| s.no)
        .collect()
}

/// libtest's test selection: positional filters (substring, or whole name with `--exact`) and
/// `--skip`.
#[derive(Debug, Default, PartialEq)]
struct Filter {
    include: Vec<String>,
    skip: Vec<String>,
    exact: bool,
}

impl Filter {
    fn from_args(args: impl IntoIterator<Item = String>) -> Self {
        /// libtest options that take a value as the next argument.
        const VALUED: [&str; 8] = [
            "--test-threads",
            "--color",
            "--format",
            "--logfile",
            "--shuffle-seed",
            "-Z",
            "--report-time",
            "--ensure-time",
        ];
        let mut f = Filter::default();
        let mut args = args.into_iter();
        while let Some(a) = args.next() {
            if a == "--exact" {
                f.exact = true;
            } else if a == "--skip" {
                f.skip.extend(args.next());
            } else if let Some(v) = a.strip_prefix("--skip=") {
                f.skip.push(v.to_string());
            } else if VALUED.contains(&a.as_str()) {
                args.next();
            } else if !a.starts_with('-') {
                f.include.push(a);
            }
        }
        f
    }

    fn selects(&self, name: &str) -> bool {
        let hit = |pat: &String| {
            if self.exact {
                name == pat
            } else {
                name.contains(pat.as_str())
            }
        };
        (self.include.is_empty() || self.include.iter().any(hit)) && !self.skip.iter().any(hit)
    }
}

fn run_selected(module: &str, hooks: Hooks) -> Done {
    let chosen = selected(module);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => panic!("cannot start a tokio runtime for the suite: {e}"),
    };
    runtime.block_on(async move {
        let backend = (hooks.backend)();
        let main: Vec<u8> = chosen
            .iter()
            .copied()
            .filter(|no| !(hooks.restart.is_some() && *no == 16))
            .collect();
        let mut report = crate::run(backend.clone(), Some(&main)).await;
        let mut cleanup = clean(&backend).await;
        if let (Some(restart), true) = (hooks.restart, chosen.contains(&16)) {
            let made = tokio::task::spawn_blocking(restart).await;
            match made {
                Ok(Ok(private)) => {
                    let r = crate::run(private.clone(), Some(&[16])).await;
                    report.rows.extend(r.rows);
                    let c = clean(&private).await;
                    cleanup = cleanup.and(c);
                }
                Ok(Err(reason)) => report.rows.push(failed_16(format!(
                    "cannot start the private server: {reason}"
                ))),
                Err(e) => report.rows.push(failed_16(format!(
                    "starting the private server panicked: {e}"
                ))),
            }
            report.rows.sort_by_key(|r| r.0);
        }
        let table = report.table();
        println!("{table}");
        eprintln!("{table}");
        Done { report, cleanup }
    })
}

fn failed_16(reason: String) -> crate::Row {
    let name = scenarios::all()
        .into_iter()
        .find(|s| s.no == 16)
        .map_or("reconnect", |s| s.name);
    (
        16,
        name,
        Outcome::Fail { reason },
        std::time::Duration::ZERO,
    )
}

/// Deletes what the run created on `backend`'s broker ([`Backend::cleanup`]).
async fn clean(backend: &Arc<dyn Backend>) -> Result<(), String> {
    let names = crate::names::take_created();
    match backend.cleanup(&names).await {
        Ok(n) => {
            println!(
                "{}: clean-up deleted {n} broker objects for {} test queue names",
                backend.name(),
                names.len()
            );
            Ok(())
        }
        Err(e) => {
            eprintln!("{}: clean-up FAILED: {e}", backend.name());
            Err(e)
        }
    }
}

/// Declares one `#[test]` per conformance scenario in the current module, all sharing one suite
/// run. Put it in a module named after the backend, so tests read `redis::lease_expiry`:
///
/// ```ignore
/// mod redis {
///     stevedore_conformance::conformance_tests! {
///         backend: || std::sync::Arc::new(super::RedisBackend::new(super::machine_url(), None)),
///         restart: || super::private_server(),
///     }
/// }
/// ```
///
/// `restart` is optional (see [`Hooks::restart`]).
#[macro_export]
macro_rules! conformance_tests {
    (backend: $backend:expr $(, restart: $restart:expr)? $(,)?) => {
        static __STEVEDORE_SUITE: $crate::Suite = $crate::Suite::new();

        fn __stevedore_hooks() -> $crate::Hooks {
            #[allow(unused_mut, unused_assignments)]
            let mut restart: Option<$crate::StartPrivate> = None;
            $( restart = Some($restart); )?
            $crate::Hooks { backend: $backend, restart }
        }

        $crate::conformance_tests!(@tests
            1 publish_receive, 2 competing_consumers, 3 queue_isolation, 4 release_redelivery,
            5 lease_expiry, 6 lease_extension, 7 crash_recovery, 8 retry_backoff, 9 dead_letter,
            10 dlq_replay, 11 delay, 12 priority, 13 graceful_shutdown, 14 depth, 15 limits,
            16 reconnect, 17 ordering, 18 foreign_messages, 19 schedules, 20 unique_jobs,
            21 rate_limits, 22 status_inbox
        );
    };
    (@tests $($no:literal $slug:ident),* $(,)?) => {
        $(
            #[test]
            fn $slug() {
                __STEVEDORE_SUITE.scenario(module_path!(), $no, stringify!($slug), __stevedore_hooks);
            }
        )*
    };
}

#[cfg(test)]
mod tests {
    use super::Filter;

    fn f(args: &[&str]) -> Filter {
        Filter::from_args(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn follows_libtest_selection() {
        assert!(f(&[]).selects("redis::delay"));
        assert!(f(&["--nocapture", "--test-threads", "1"]).selects("redis::delay"));
        let lease = f(&["lease"]);
        assert!(lease.selects("redis::lease_expiry") && !lease.selects("redis::delay"));
        let exact = f(&["--exact", "redis::delay"]);
        assert!(exact.selects("redis::delay") && !exact.selects("redis::delay_x"));
        let skip = f(&["--skip", "reconnect"]);
        assert!(skip.selects("redis::delay") && !skip.selects("redis::reconnect"));
        assert!(!f(&["--skip=delay"]).selects("redis::delay"));
        assert!(f(&["--test-threads", "delay"]).selects("redis::lease_expiry"));
    }
}
