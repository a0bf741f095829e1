//! Scenario 19, schedules: a schedule every second, served by two workers with a rolling restart
//! of one of them in the middle, enqueues each tick exactly once.

use super::{producer, queue_toml, wait_for, worker_toml, Log, Running};
use crate::backend::Backend;
use crate::names::unique;
use crate::support::{ensure, pass, secs, Checked};
use bytes::Bytes;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use stevedore::schedule::TICK_HEADER;
use stevedore::{JobContext, Router, State};
use stevedore_core::{to_millis, Priority, Sharing};

const JOB: &str = "conformance.tick";
/// Ticks measured.
const TICKS: u64 = 10;

async fn tick(State(log): State<Log>, ctx: JobContext) {
    let i = log.start(&ctx, Bytes::new());
    log.end(i);
}

fn now_ms() -> u64 {
    to_millis(SystemTime::now())
}

/// Two workers (A, B) serve `[schedules.<unique>] every = "1s"` on one queue, each with its own
/// broker handle and its own store handle ([`Backend::store`]). Once both fetch, the next
/// [`TICKS`] whole seconds are the window; at its middle A is shut down and A2 (a new worker id,
/// a new handle) starts: a rolling deploy. After the window, every tick of it must have run
/// exactly once: one run per tick (the `stevedore-tick` header), each under its own id, no
/// tick missing, none twice; and no job was run twice by id. On a partitioned backend the wait
/// for the last ticks' runs includes the declared handoff (A's partitions change hands).
pub(crate) async fn schedules(backend: Arc<dyn Backend>) -> Checked {
    let queue = unique("sched");
    let name = unique("every-second");
    let p = producer(&backend, &queue, &[Priority::Normal]).await?;
    // Where consumers own partitions (Kafka), A's restart moves its partitions, with the ticks
    // published to them meanwhile, to the others: two rebalances (A leaves, A2 joins), each
    // within the declared handoff.
    let handoff = match p.capabilities().sharing {
        Sharing::Partitioned { handoff, .. } => handoff,
        Sharing::Any => Duration::ZERO,
    };
    drop(p);
    let toml = |id: &str| {
        worker_toml(
            id,
            4,
            secs(5),
            &[
                queue_toml(&queue, 4, 4, &[]),
                format!(
                    "[schedules.{name}]\njob = \"{JOB}\"\nqueue = \"{queue}\"\nevery = \"1s\"\n"
                ),
            ],
        )
    };
    let log = Log::default();
    let router = || Router::with_state(log.clone()).route(JOB, tick);
    let store = backend.store().await?;
    let mut a = Running::start_with(
        &backend,
        router(),
        &toml(&unique("w-sched-a")),
        Some(backend.store().await?),
    )
    .await?;
    let _b = Running::start_with(
        &backend,
        router(),
        &toml(&unique("w-sched-b")),
        Some(backend.store().await?),
    )
    .await?;
    // The window: the TICKS whole seconds after the next one (so both workers were looking).
    let first = (now_ms() / 1000 + 2) * 1000;
    let last = first + (TICKS - 1) * 1000;
    let rfc = |ms: u64| {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(ms);
        humantime::format_rfc3339_millis(t).to_string()
    };
    let wanted: Vec<String> = (0..TICKS).map(|k| rfc(first + k * 1000)).collect();
    // Mid-window rolling restart of A.
    let middle = first + TICKS / 2 * 1000 + 300;
    tokio::time::sleep(Duration::from_millis(middle.saturating_sub(now_ms()))).await;
    a.stop(secs(10)).await?;
    let _a2 = Running::start_with(
        &backend,
        router(),
        &toml(&unique("w-sched-a2")),
        Some(backend.store().await?),
    )
    .await?;
    // Every tick of the window seen at least once (duplicates are counted after).
    let seen = |log: &Log| {
        log.runs()
            .iter()
            .filter_map(|r| r.headers.get(TICK_HEADER).filter(|t| wanted.contains(t)))
            .collect::<std::collections::BTreeSet<_>>()
            .len()
    };
    let end_wait =
        Duration::from_millis((last + 1000).saturating_sub(now_ms())) + secs(10) + handoff * 2;
    if let Err(why) = wait_for(
        end_wait,
        || seen(&log) == wanted.len(),
        || format!("{} of {TICKS} ticks ran", seen(&log)),
    )
    .await
    {
        // Enqueued but not run, or never enqueued? The schedule's state says how far it got.
        let state = store
            .get(&stevedore::schedule::state_key(&name))
            .await
            .ok()
            .flatten()
            .map(|v| String::from_utf8_lossy(&v).into_owned());
        let ran: std::collections::BTreeSet<String> = log
            .runs()
            .iter()
            .filter_map(|r| r.headers.get(TICK_HEADER).cloned())
            .collect();
        let missing: Vec<&String> = wanted.iter().filter(|t| !ran.contains(*t)).collect();
        return Err(format!(
            "{why}; missing {missing:?}; the schedule's state in the store: {state:?}"
        ));
    }
    // A duplicate would arrive right behind: give it time to show.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut per_tick: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut per_id: BTreeMap<String, usize> = BTreeMap::new();
    for r in log.runs() {
        *per_id.entry(r.id.clone()).or_default() += 1;
        if let Some(t) = r.headers.get(TICK_HEADER).filter(|t| wanted.contains(t)) {
            per_tick.entry(t.clone()).or_default().push(r.id.clone());
        }
    }
    let missing: Vec<&String> = wanted
        .iter()
        .filter(|t| !per_tick.contains_key(*t))
        .collect();
    ensure!(missing.is_empty(), "ticks never enqueued: {missing:?}");
    let twice: Vec<(&String, usize)> = per_tick
        .iter()
        .filter(|(_, ids)| ids.len() != 1)
        .map(|(t, ids)| (t, ids.len()))
        .collect();
    ensure!(
        twice.is_empty(),
        "{} of {TICKS} ticks ran more than once (tick, runs): {:?}",
        twice.len(),
        &twice[..twice.len().min(3)]
    );
    let rerun: Vec<(&String, &usize)> = per_id.iter().filter(|(_, n)| **n > 1).collect();
    ensure!(
        rerun.is_empty(),
        "{} jobs ran more than once (id, runs): {:?}",
        rerun.len(),
        &rerun[..rerun.len().min(3)]
    );
    // The schedule's state stays in the store (no TTL): remove this run's.
    let key = stevedore::schedule::state_key(&name);
    if let Ok(Some(v)) = store.get(&key).await {
        let _ = store.swap(&key, Some(&v), None, None).await;
    }
    let workers: std::collections::BTreeSet<String> =
        log.runs().iter().map(|r| r.worker.clone()).collect();
    pass(format!(
        "{TICKS} ticks over two workers (one restarted mid-window): each enqueued exactly once, \
         run by {} worker(s)",
        workers.len()
    ))
}
