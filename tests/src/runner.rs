//! Runs the scenarios in phases, each under its hard time limit.

use crate::backend::Backend;
use crate::report::{Outcome, Report, Row};
use crate::scenarios::{self, Phase, Scenario};
use futures::future::join_all;
use std::any::Any;
use std::sync::Arc;
use std::time::Duration;
use stevedore_core::Capabilities;
use tokio::time::Instant;

/// Runs the selected scenarios (`None` = all) against `backend` and reports each outcome. Prints
/// nothing itself (progress goes to `tracing` at debug level) except a line on stderr when a
/// worker a scenario dropped had to be aborted. One `run` per process at a time: it waits for
/// (and at last aborts) every worker dropped in the process, not only its own.
///
/// Scenarios run concurrently within three phases: the timing-sensitive ones (4, 5, 6, 7, 11, and
/// the runtime's 8, 12 and 13, whose checks include backoff gaps, start latencies and shutdown
/// deadlines) first, with nothing heavy beside them; then the bulk ones (9 and 10 among them: their
/// checks are counts and contents); then scenario 16 alone, since it restarts the broker under
/// everyone's feet. Each scenario's hard limit is its base limit plus
/// four times the backend's declared `depth_staleness + delay_tolerance`. A backend that gives
/// each scenario a server of its own ([`Backend::isolated`]) gets it before that limit starts.
pub async fn run(backend: Arc<dyn Backend>, select: Option<&[u8]>) -> Report {
    let chosen: Vec<Scenario> = scenarios::all()
        .into_iter()
        .filter(|s| match select {
            None => true,
            Some(sel) => sel.contains(&s.no),
        })
        .collect();
    let mut report = Report {
        backend: backend.name().to_string(),
        rows: Vec::new(),
    };
    // One handle up front, to read the declared capabilities and to fail fast if the broker is down.
    let caps = match backend.connect().await {
        Ok(probe) => {
            let caps = probe.capabilities().clone();
            let _ = probe.close().await;
            caps
        }
        Err(e) => {
            let reason = format!("connect failed: {e}");
            report.rows = chosen
                .iter()
                .map(|s| {
                    (
                        s.no,
                        s.name,
                        Outcome::Fail {
                            reason: reason.clone(),
                        },
                        Duration::ZERO,
                    )
                })
                .collect();
            return report;
        }
    };
    for phase in [Phase::Timing, Phase::Bulk, Phase::Restart] {
        let runs = chosen
            .iter()
            .filter(|s| s.phase == phase)
            .map(|s| run_one(backend.clone(), s, &caps));
        report.rows.extend(join_all(runs).await);
    }
    // Workers a scenario dropped without stopping them are still draining: wait for them, so
    // the caller's clean-up is the last thing that touches the broker.
    let aborted = crate::scenarios::runtime::drain_dropped(Duration::from_secs(10)).await;
    if aborted > 0 {
        eprintln!(
            "{}: {aborted} dropped worker(s) had not stopped 10s after the last scenario: aborted",
            backend.name()
        );
    }
    report.rows.sort_by_key(|r| r.0);
    report
}

async fn run_one(backend: Arc<dyn Backend>, s: &Scenario, caps: &Capabilities) -> Row {
    let limit = s.limit + (caps.depth_staleness + caps.delay_tolerance) * 4;
    let backend = match backend.isolated(s.phase == Phase::Restart).await {
        Ok(Some(own)) => own,
        Ok(None) => backend,
        Err(e) => {
            let reason = format!("starting the scenario's own broker server failed: {e}");
            return (s.no, s.name, Outcome::Fail { reason }, Duration::ZERO);
        }
    };
    tracing::debug!(scenario = s.no, name = s.name, "starting");
    let started = Instant::now();
    let mut task = tokio::spawn((s.run)(backend));
    let outcome = match tokio::time::timeout(limit, &mut task).await {
        Ok(Ok(Ok(outcome))) => outcome,
        Ok(Ok(Err(reason))) => Outcome::Fail { reason },
        Ok(Err(e)) if e.is_panic() => Outcome::Fail {
            reason: format!("panicked: {}", panic_text(e.into_panic())),
        },
        Ok(Err(e)) => Outcome::Fail {
            reason: format!("task failed: {e}"),
        },
        Err(_) => {
            // Aborted, and awaited: its workers are dropped (and so drained by `run`) before
            // the next phase, not at some later poll.
            task.abort();
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
            Outcome::Fail {
                reason: format!(
                    "hit the hard time limit of {:.0}s (a broker call hung or messages never came)",
                    limit.as_secs_f64()
                ),
            }
        }
    };
    let took = started.elapsed();
    tracing::debug!(scenario = s.no, result = outcome.label(), ?took, "finished");
    (s.no, s.name, outcome, took)
}

fn panic_text(p: Box<dyn Any + Send>) -> String {
    match p.downcast::<String>() {
        Ok(s) => *s,
        Err(p) => p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .unwrap_or_else(|| "(non-text panic)".into()),
    }
}

/// Runs the suite ([`run`]), prints the backend × scenario table to stdout (shown with
/// `cargo test -- --nocapture`) and to stderr (shown by cargo when the test fails), then panics
/// listing every failed scenario. The one call a backend's test makes.
///
/// Then it deletes what the run created on the broker ([`Backend::cleanup`]), passed or failed,
/// and fails the test if that clean-up failed: the shared brokers hold afterwards what they held
/// before.
pub async fn check(backend: Arc<dyn Backend>, select: Option<&[u8]>) {
    let report = run(backend.clone(), select).await;
    let table = report.table();
    println!("{table}");
    eprintln!("{table}");
    let names = crate::names::take_created();
    let cleaned = backend.cleanup(&names).await;
    match &cleaned {
        Ok(n) => println!(
            "{}: clean-up deleted {n} broker objects for {} test queue names",
            backend.name(),
            names.len()
        ),
        Err(e) => eprintln!("{}: clean-up FAILED: {e}", backend.name()),
    }
    report.assert_ok();
    if let Err(e) = cleaned {
        panic!(
            "{}: clean-up of the test queues failed: {e}",
            backend.name()
        );
    }
}
