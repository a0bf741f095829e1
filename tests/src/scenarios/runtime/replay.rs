//! Scenario 10, DLQ replay: dead letters replayed by id, then all of them, are processed again as
//! fresh jobs and leave the DLQ.

use super::{
    batch_for, dead_letters, producer, queue_toml, wait_drained, wait_for, worker_toml, Log,
    Running,
};
use crate::backend::Backend;
use crate::names::unique;
use crate::support::{close, ensure, millis, pass, secs, Checked, Context};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use stevedore::dlq::{self, Select};
use stevedore::{JobContext, JobError, Payload, Router, State};
use stevedore_core::{names, Priority};

const JOB: &str = "conformance.poisoned";
const N: usize = 3;

/// Router state: the run log and whether the downstream is healthy yet.
#[derive(Clone, Debug, Default)]
struct Replayed {
    log: Log,
    healthy: Arc<AtomicBool>,
}

async fn poisoned(
    State(s): State<Replayed>,
    ctx: JobContext,
    Payload(body): Payload,
) -> Result<(), JobError> {
    let i = s.log.start(&ctx, body);
    s.log.end(i);
    if s.healthy.load(Ordering::SeqCst) {
        Ok(())
    } else {
        Err(JobError::permanent("poisoned until the fix is deployed"))
    }
}

/// Three jobs fail permanently into the DLQ. Then the handler is "fixed": one dead letter is
/// replayed by id and must run again (attempt 1, payload intact, no dead-letter headers) while the
/// other two stay in the DLQ untouched; then `Select::All` replays the rest. Checks: `replay`
/// returns 1 then 2; every id ran exactly twice (once failing, once after its replay, both at
/// attempt 1); stats dead_lettered 3, processed 3; afterwards `dlq::list` is empty and the DLQ's
/// depth reads 0 ready, 0 in flight, 0 delayed.
pub(crate) async fn dlq_replay(backend: Arc<dyn Backend>) -> Checked {
    let queue = unique("replay");
    let p = producer(&backend, &queue, &[Priority::Normal]).await?;
    let caps = p.capabilities().clone();
    let toml = worker_toml(
        &unique("w-replay"),
        4,
        secs(1),
        &[queue_toml(&queue, 4, batch_for(&caps, 4), &[])],
    );
    let state = Replayed::default();
    let mut w = Running::start(
        &backend,
        Router::with_state(state.clone()).route(JOB, poisoned),
        &toml,
    )
    .await?;
    let client = stevedore::Client::new(p.clone());
    let ids = super::backlog(&client, &queue, JOB, Priority::Normal, N).await?;
    wait_for(
        secs(10),
        || w.snapshot(&queue).dead_lettered >= N as u64,
        || {
            format!(
                "{} of {N} poisoned jobs dead-lettered",
                w.snapshot(&queue).dead_lettered
            )
        },
    )
    .await?;
    let letters = dead_letters(&p, &queue, N, secs(5)).await?;
    let mut listed: Vec<&str> = letters.iter().map(|d| d.envelope.id.as_str()).collect();
    listed.sort_unstable();
    let mut want: Vec<&str> = ids.iter().map(String::as_str).collect();
    want.sort_unstable();
    ensure!(
        listed == want,
        "the DLQ lists {listed:?}, expected the {N} poisoned ids {want:?}"
    );
    state.healthy.store(true, Ordering::SeqCst);

    // One by id.
    let first = ids[0].clone();
    let replayed = dlq::replay(&p, &queue, &Select::Ids(vec![first.clone()]), 100)
        .await
        .ctx("dlq::replay(Ids)")?;
    ensure!(
        replayed == 1,
        "dlq::replay by id reported {replayed} replayed, expected 1"
    );
    let runs_of = |id: &str| state.log.count(|r| r.id == id);
    wait_for(
        secs(10),
        || runs_of(&first) >= 2 && w.snapshot(&queue).processed >= 1,
        || {
            format!(
                "the job replayed by id ran {} time(s) in all",
                runs_of(&first)
            )
        },
    )
    .await?;
    let rest = dead_letters(&p, &queue, N - 1, secs(5)).await?;
    ensure!(
        rest.iter().all(|d| d.envelope.id != first),
        "the replayed dead letter {first} is still listed in the DLQ"
    );
    for id in &ids[1..] {
        ensure!(
            runs_of(id) == 1,
            "{id} ran again although only {first} was replayed"
        );
    }

    // All the rest.
    let replayed = dlq::replay(&p, &queue, &Select::All, 100)
        .await
        .ctx("dlq::replay(All)")?;
    ensure!(
        replayed == N - 1,
        "dlq::replay(All) reported {replayed} replayed, expected {}",
        N - 1
    );
    wait_for(
        secs(10),
        || w.snapshot(&queue).processed >= N as u64,
        || {
            format!(
                "{} of {N} replayed jobs processed",
                w.snapshot(&queue).processed
            )
        },
    )
    .await?;
    let left = dlq::list(&p, &queue, 100).await.ctx("dlq::list")?;
    ensure!(
        left.is_empty(),
        "{} dead letter(s) still listed after replaying all",
        left.len()
    );
    wait_drained(&p, &names::dead_letter(&queue), millis(500)).await?;
    let stopped = w.stop(secs(5)).await?;
    ensure!(
        stopped.report.drained,
        "run() reported drained = false with nothing in flight"
    );
    wait_drained(&p, &queue, millis(500)).await?;

    let runs = state.log.runs();
    for (k, id) in ids.iter().enumerate() {
        let mine: Vec<_> = runs.iter().filter(|r| &r.id == id).collect();
        ensure!(
            mine.len() == 2,
            "job {k} ({id}) ran {} times; expected twice (poisoned, then replayed)",
            mine.len()
        );
        let again = mine[1];
        ensure!(
            again.attempt == 1,
            "job {k} ran after its replay as attempt {}; a replay starts again at 1",
            again.attempt
        );
        ensure!(
            again.body == mine[0].body,
            "job {k}: payload changed across dead letter and replay"
        );
        let stale: Vec<&String> = again
            .headers
            .keys()
            .filter(|h| h.starts_with("stevedore-dlq-"))
            .collect();
        ensure!(
            stale.is_empty(),
            "job {k} carried dead-letter headers {stale:?} into its replay"
        );
    }
    let st = w.snapshot(&queue);
    ensure!(
        st.dead_lettered == N as u64 && st.processed == N as u64 && st.retried == 0,
        "stats {st:?}; expected dead_lettered {N}, processed {N}, retried 0"
    );
    close(&[&p]).await;
    pass(format!(
        "{N} dead letters: 1 replayed by id ran again (others untouched), then 2 by All; each ran \
         twice, replays at attempt 1 without DLQ headers; DLQ empty (list and depth)"
    ))
}
