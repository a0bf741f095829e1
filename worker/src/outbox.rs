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
//! error in `error`, is counted in `stats`, and is logged.

use crate::config::OutboxConfig;
use crate::runtime::ErrorBackoff;
use crate::Client;
use stevedore_core::Envelope;
use stevedore_postgres::outbox::{Batch, Outbox};
use tokio::sync::watch;

pub use stevedore_postgres::outbox::{create_table, Pending, DEFAULT_OUTBOX_TABLE};
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
        match Outbox::connect(&cfg.url, &cfg.table).await {
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
/// `client` (statuses and delays as for any enqueue), deletes them. Finishes the batch in hand
/// when stopped. Broker or database errors back off and retry; nothing is lost.
pub(crate) async fn relay(cfg: OutboxConfig, client: Client, mut stop: watch::Receiver<bool>) {
    let Some(outbox) = connect(&cfg, &mut stop).await else {
        return;
    };
    tracing::info!(table = %cfg.table, batch = cfg.batch, "outbox relay started");
    let mut listener = match outbox.listen().await {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::warn!(error = %e, poll = ?cfg.poll, "outbox: cannot listen for commits; polling only");
            None
        }
    };
    let mut backoff = ErrorBackoff::default();
    let mut last_gauge = tokio::time::Instant::now() - cfg.poll;
    while !*stop.borrow() {
        if last_gauge.elapsed() >= cfg.poll {
            last_gauge = tokio::time::Instant::now();
            if let Ok(p) = outbox.pending().await {
                let table = cfg.table.clone();
                metrics::gauge!(OUTBOX_ROWS, "table" => table.clone()).set(p.rows as f64);
                metrics::gauge!(OUTBOX_OLDEST, "table" => table)
                    .set(p.oldest.map_or(0.0, |d| d.as_secs_f64()));
            }
        }
        let wait = match outbox.take(cfg.batch).await {
            Ok(Some(batch)) => {
                let n = batch.jobs.len();
                match relay_batch(&client, batch).await {
                    Ok(published) => {
                        if let Some((failures, down)) = backoff.recovered() {
                            tracing::info!(failures, down = ?down, "outbox relay works again");
                        }
                        metrics::counter!(OUTBOX_PUBLISHED, "table" => cfg.table.clone())
                            .increment(published as u64);
                        tracing::debug!(published, "outbox: relayed a batch");
                        // A full batch: more may wait.
                        if n >= cfg.batch {
                            continue;
                        }
                        None
                    }
                    Err(e) => {
                        let pause = backoff.next();
                        tracing::warn!(error = %e, retry_in = ?pause, "outbox: relaying a batch failed; its rows stay and are published again");
                        Some(pause)
                    }
                }
            }
            Ok(None) => None,
            Err(e) => {
                let pause = backoff.next();
                tracing::warn!(error = %e, retry_in = ?pause, "outbox: cannot read the outbox; retrying");
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

/// Publishes a batch's rows, queue by queue in row order, then deletes them. A run of rows the
/// broker refuses for good is published row by row, and a row that is still refused is marked
/// with its error (kept in the table, not retried). Returns how many rows were published; an
/// error leaves every row in place (the batch's transaction rolls back).
async fn relay_batch(client: &Client, mut batch: Batch) -> Result<usize, String> {
    let jobs = std::mem::take(&mut batch.jobs);
    let mut published = 0;
    let mut refused: Vec<(usize, String)> = Vec::new();
    let mut i = 0;
    while i < jobs.len() {
        let queue = &jobs[i].0;
        let end = jobs[i..]
            .iter()
            .position(|(q, _)| q != queue)
            .map_or(jobs.len(), |k| i + k);
        let run: Vec<Envelope> = jobs[i..end].iter().map(|(_, e)| e.clone()).collect();
        match client.publish_recorded(queue, run).await {
            Ok(()) => published += end - i,
            Err(e) if is_transient(&e) => return Err(e.to_string()),
            Err(_) => {
                for (k, (q, env)) in jobs.iter().enumerate().take(end).skip(i) {
                    match client.publish_recorded(q, vec![env.clone()]).await {
                        Ok(()) => published += 1,
                        Err(e) if is_transient(&e) => return Err(e.to_string()),
                        Err(e) => {
                            tracing::error!(id = %env.id, queue = %q, error = %e, "outbox: the broker refuses this row for good; it stays in the outbox table with its error");
                            refused.push((k, e.to_string()));
                        }
                    }
                }
            }
        }
        i = end;
    }
    batch.jobs = jobs;
    for (k, error) in refused {
        batch.refuse(k, &error).await.map_err(|e| e.to_string())?;
    }
    batch.done().await.map_err(|e| e.to_string())?;
    Ok(published)
}

fn is_transient(e: &crate::EnqueueError) -> bool {
    matches!(e, crate::EnqueueError::Broker(b) if b.is_transient())
}

/// Rows waiting in the outbox of `cfg` (for `stats`): one connection, one query.
pub(crate) async fn pending(cfg: &OutboxConfig) -> Result<Pending, stevedore_core::BrokerError> {
    Outbox::connect(&cfg.url, &cfg.table).await?.pending().await
}
