//! The transactional outbox (`[outbox]`, feature `postgres`): enqueue a job in your own
//! PostgreSQL transaction, and a relay publishes it once the transaction commits.
//!
//! ```no_run
//! # use stevedore::Client;
//! # async fn f(client: Client, pool: stevedore::outbox::sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
//! let mut tx = pool.begin().await?;
//! stevedore::outbox::sqlx::query("INSERT INTO orders (id) VALUES ($1)")
//!     .bind(42_i64)
//!     .execute(&mut *tx)
//!     .await?;
//! let job_id = client
//!     .enqueue("send_receipt", &serde_json::json!({"order": 42}))
//!     .queue("emails")
//!     .within(&mut tx)
//!     .await?;
//! tx.commit().await?; // the job exists from here on; a rollback would have enqueued nothing
//! # let _ = job_id; Ok(()) }
//! ```
//!
//! The row is published by a relay: every worker whose config has `[outbox]` runs one (and
//! `stevedore relay` runs one alone). Relays wake on the commit's `NOTIFY`, and poll every
//! `outbox.poll` in case they missed one. Several relays share the table without publishing a
//! row twice (`FOR UPDATE SKIP LOCKED`). A relay killed between publishing a batch and deleting
//! its rows leaves them to be published again, under the same job ids: pair the outbox with
//! `idempotent = true` on the consuming queue so such a duplicate is recognized and skipped
//! (and, for handlers writing to PostgreSQL, [`JobContext::mark_done_in`](crate::JobContext::mark_done_in)
//! so the effect and the mark commit together).
//!
//! A row the broker refuses for good (a payload over its limit, too many headers) is not
//! retried for ever and does not block the rows behind it: it stays in the table with its
//! error in `error`, is counted in `stats`, and is logged; `stevedore relay --retry-refused`
//! puts such rows back once the cause is fixed. Any other failure (the broker down, a
//! permission) leaves the batch's rows in place and is retried with backoff.

use crate::config::OutboxConfig;
use crate::runtime::ErrorBackoff;
use crate::Client;
use std::time::Duration;
use stevedore_core::Envelope;
use tokio::sync::watch;

pub use stevedore_postgres::outbox::{create_table, Outbox, Pending, DEFAULT_OUTBOX_TABLE};
/// The sqlx these APIs take (`PgConnection`, `PgPool`, transactions): use this one, or the same
/// version (0.8) in your own `Cargo.toml`, so the types match.
pub use stevedore_postgres::sqlx;

/// Gauge: rows waiting in the outbox. Label `table`.
pub const OUTBOX_ROWS: &str = "stevedore_outbox_rows";
/// Gauge: age in seconds of the oldest row waiting in the outbox (the relay's lag). Label `table`.
pub const OUTBOX_OLDEST: &str = "stevedore_outbox_oldest_seconds";
/// Counter: outbox rows published. Label `table`.
pub const OUTBOX_PUBLISHED: &str = "stevedore_outbox_published_total";

/// Connects to the configured outbox, retrying with backoff until it answers or `stop` fires.
pub(crate) async fn connect(
    cfg: &OutboxConfig,
    stop: &mut watch::Receiver<bool>,
) -> Option<Outbox> {
    let mut backoff = ErrorBackoff::default();
    loop {
        let connected = tokio::select! {
            c = Outbox::connect(&cfg.url, &cfg.table) => c,
            _ = stop.wait_for(|s| *s) => return None,
        };
        match connected {
            Ok(o) => {
                if let Some((failures, down)) = backoff.recovered() {
                    tracing::info!(failures, down = ?down, table = %cfg.table, "outbox: connected after failures");
                }
                return Some(o);
            }
            Err(e) => {
                let pause = backoff.next();
                tracing::warn!(error = %e, retry_in = ?pause, "outbox: cannot connect to its database; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = stop.wait_for(|s| *s) => return None,
                }
            }
        }
    }
}

/// Relays the outbox until `stop` turns true: takes batches of rows, publishes them through
/// `client` (statuses and delays as for any enqueue), deletes them. A batch in hand when stop
/// comes is finished (its publish bounded by [`PUBLISH_TIMEOUT`]); a wait for the database is
/// not. Broker or database errors back off and retry; nothing is lost.
pub(crate) async fn relay(cfg: OutboxConfig, client: Client, mut stop: watch::Receiver<bool>) {
    let Some(outbox) = connect(&cfg, &mut stop).await else {
        return;
    };
    tracing::info!(table = %cfg.table, batch = cfg.batch, "outbox relay started");
    let listened = tokio::select! {
        l = outbox.listen() => Some(l),
        _ = stop.wait_for(|s| *s) => None,
    };
    let mut listener = match listened {
        None => return,
        Some(Ok(l)) => Some(l),
        Some(Err(e)) => {
            tracing::warn!(error = %e, poll = ?cfg.poll, "outbox: cannot listen for commits; polling only");
            None
        }
    };
    let mut backoff = ErrorBackoff::default();
    let mut last_gauge = tokio::time::Instant::now() - cfg.poll;
    while !*stop.borrow() {
        if last_gauge.elapsed() >= cfg.poll {
            last_gauge = tokio::time::Instant::now();
            let pending = tokio::select! {
                p = outbox.pending() => p.ok(),
                _ = stop.wait_for(|s| *s) => break,
            };
            if let Some(p) = pending {
                let table = cfg.table.clone();
                metrics::gauge!(OUTBOX_ROWS, "table" => table.clone()).set(p.rows as f64);
                metrics::gauge!(OUTBOX_OLDEST, "table" => table)
                    .set(p.oldest.map_or(0.0, |d| d.as_secs_f64()));
            }
        }
        // A stop ends the wait for rows; a batch once taken is published and deleted first
        // (each step bounded), so a graceful stop repeats nothing.
        let taken = tokio::select! {
            t = outbox.take(cfg.batch) => t.map_err(|e| e.to_string()),
            _ = stop.wait_for(|s| *s) => break,
        };
        let round = match taken {
            Ok(Some(batch)) => finish(batch, &client, true).await.map(Some),
            Ok(None) => Ok(None),
            Err(e) => Err(e),
        };
        let wait = match round {
            Ok(Some(Round { taken, published })) => {
                if let Some((failures, down)) = backoff.recovered() {
                    tracing::info!(failures, down = ?down, "outbox relay works again");
                }
                metrics::counter!(OUTBOX_PUBLISHED, "table" => cfg.table.clone())
                    .increment(published as u64);
                tracing::debug!(published, "outbox: relayed a batch");
                // A full batch: more may wait.
                if taken >= cfg.batch {
                    continue;
                }
                None
            }
            Ok(None) => None,
            Err(e) => {
                let pause = backoff.next();
                tracing::warn!(error = %e, retry_in = ?pause, "outbox: relaying failed; the rows stay and are published again");
                Some(pause)
            }
        };
        let pause = wait.unwrap_or(cfg.poll);
        match listener.as_mut() {
            Some(l) if wait.is_none() => {
                tokio::select! {
                    got = l.try_recv() => {
                        if let Err(e) = got {
                            tracing::debug!(error = %e, "outbox: the listener dropped; it reconnects");
                        }
                    }
                    _ = tokio::time::sleep(pause) => {}
                    _ = stop.changed() => {}
                }
            }
            _ => {
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = stop.changed() => {}
                }
            }
        }
    }
    tracing::info!("outbox relay stopped");
}

/// The longest one batch's publish may take before the round gives up (its rows stay, to be
/// published again).
pub const PUBLISH_TIMEOUT: Duration = Duration::from_secs(30);

/// What one relay round did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Round {
    /// Rows taken from the outbox.
    pub taken: usize,
    /// Rows published (the rest the broker refused for good and are set aside).
    pub published: usize,
}

/// One relay round: takes up to `max` of the oldest rows no other relay holds, publishes them
/// through `client`, queue by queue in row order, and (with `commit`) deletes them. `None`
/// when the outbox is empty.
///
/// A row the broker refuses for good for reasons of its own (a payload over the broker's
/// limit, too many headers, an invalid queue name, a delay it cannot keep) is published alone
/// and, if still refused, set aside with its error; any other failure ends the round with the
/// error: the rows published before it are deleted, the rest stay (to be published again,
/// under the same ids).
///
/// `commit = false` publishes and then drops the batch without deleting its rows, exactly as
/// a relay killed between the publish and the delete leaves them: for fault-injection tests.
pub async fn relay_one_batch(
    outbox: &Outbox,
    client: &Client,
    max: usize,
    commit: bool,
) -> Result<Option<Round>, String> {
    match outbox.take(max).await.map_err(|e| e.to_string())? {
        Some(batch) => finish(batch, client, commit).await.map(Some),
        None => Ok(None),
    }
}

/// Publishes a taken batch and (with `commit`) deletes its rows: see [`relay_one_batch`].
async fn finish(
    mut batch: stevedore_postgres::outbox::Batch,
    client: &Client,
    commit: bool,
) -> Result<Round, String> {
    let jobs = std::mem::take(&mut batch.jobs);
    let taken = jobs.len();
    let mut refused: Vec<(usize, String)> = Vec::new();
    let publish = |q: &str, envs: Vec<Envelope>| {
        let q = q.to_string();
        async move {
            tokio::time::timeout(PUBLISH_TIMEOUT, client.publish_recorded(&q, envs))
                .await
                .unwrap_or_else(|_| {
                    Err(crate::EnqueueError::Broker(
                        stevedore_core::BrokerError::transient(format!(
                            "the broker did not take the batch within {}s",
                            PUBLISH_TIMEOUT.as_secs()
                        )),
                    ))
                })
        }
    };
    // Rows published, rows refused for good, and the failure that ended the round early.
    let mut sent: Vec<usize> = Vec::new();
    let mut failure: Option<String> = None;
    let mut i = 0;
    'runs: while i < jobs.len() {
        let queue = &jobs[i].0;
        let end = jobs[i..]
            .iter()
            .position(|(q, _)| q != queue)
            .map_or(jobs.len(), |k| i + k);
        let run: Vec<Envelope> = jobs[i..end].iter().map(|(_, e)| e.clone()).collect();
        match publish(queue, run).await {
            Ok(()) => sent.extend(i..end),
            Err(e) if !refuses_the_row(&e) => {
                failure = Some(e.to_string());
                break 'runs;
            }
            Err(_) => {
                for (k, (q, env)) in jobs.iter().enumerate().take(end).skip(i) {
                    match publish(q, vec![env.clone()]).await {
                        Ok(()) => sent.push(k),
                        Err(e) if !refuses_the_row(&e) => {
                            failure = Some(e.to_string());
                            break 'runs;
                        }
                        Err(e) => {
                            tracing::error!(id = %env.id, queue = %q, error = %e, "outbox: the broker refuses this row for good; it stays in the outbox table with its error (stevedore relay --retry-refused puts it back)");
                            refused.push((k, e.to_string()));
                        }
                    }
                }
            }
        }
        i = end;
    }
    let published = sent.len();
    if !commit {
        return match failure {
            Some(f) => Err(f),
            None => Ok(Round { taken, published }),
        };
    }
    batch.jobs = jobs;
    // What went out (and what was refused) is settled even when the round ended early, so it
    // is not published again with the rest; the rest stays for the next round.
    let settle = async {
        for (k, error) in refused {
            batch.refuse(k, &error).await?;
        }
        batch.done_with(&sent).await
    };
    // Bounded like the publish: rows not deleted in time are published again.
    tokio::time::timeout(PUBLISH_TIMEOUT, settle)
        .await
        .map_err(|_| "the database did not take the batch's delete in time".to_string())?
        .map_err(|e| e.to_string())?;
    match failure {
        Some(f) => Err(f),
        None => Ok(Round { taken, published }),
    }
}

/// Whether an enqueue error is about the row itself (so publishing it again can never work:
/// its payload, its headers, its queue's name, a delay the broker cannot keep): anything else
/// (the broker down, a permission) is retried with the rest of the batch.
fn refuses_the_row(e: &crate::EnqueueError) -> bool {
    use stevedore_core::BrokerError;
    matches!(
        e,
        crate::EnqueueError::TooManyHeaders { .. }
            | crate::EnqueueError::InvalidQueue { .. }
            | crate::EnqueueError::Broker(
                BrokerError::PayloadTooLarge { .. }
                    | BrokerError::InvalidQueue { .. }
                    | BrokerError::Unsupported { .. }
            )
    )
}

/// Rows waiting in the outbox of `cfg` (for `stats`): one connection, one query.
pub(crate) async fn pending(cfg: &OutboxConfig) -> Result<Pending, stevedore_core::BrokerError> {
    Outbox::connect(&cfg.url, &cfg.table).await?.pending().await
}
