//! The transactional outbox on PostgreSQL: jobs written in the application's own transaction,
//! published by a relay after it commits.
//!
//! The table (`stevedore_outbox` by default): `seq BIGSERIAL PRIMARY KEY, queue TEXT, job_id
//! TEXT, headers JSONB, payload BYTEA, created_at TIMESTAMPTZ, error TEXT` (`error`: set on a
//! row the broker refused for good; such rows stay, and are not taken again). [`insert`] adds rows inside the
//! caller's transaction (and a `NOTIFY stevedore_outbox`, delivered when it commits), so a job
//! exists exactly when the transaction's other writes do: a rollback enqueues nothing.
//!
//! A relay takes a [`Batch`] of the oldest rows with `FOR UPDATE SKIP LOCKED` (several relays
//! at once take different rows, so none is published twice in the normal case), publishes
//! them, and [`Batch::done`] deletes them and commits. A relay that dies between the publish and
//! the commit leaves its rows in place, unlocked: they are published again, under the same job
//! ids, which an idempotent handler (`idempotent = true`) recognizes. Rows are never lost.
//!
//! Order: one relay publishes the rows it takes in `seq` order. Rows of transactions that
//! commit out of their `seq` order, and rows taken by different relays, may be published out of
//! order; per-key order is the broker's once published.

use crate::{err, valid_table};
use sqlx::postgres::{PgConnection, PgPool, Postgres};
use sqlx::{Row, Transaction};
use std::time::Duration;
use stevedore_core::{wire, BrokerError, Envelope};

/// The outbox table when none is configured.
pub const DEFAULT_OUTBOX_TABLE: &str = "stevedore_outbox";

/// The channel [`insert`] notifies on commit and relays listen on.
pub const CHANNEL: &str = "stevedore_outbox";

fn check(table: &str) -> Result<(), BrokerError> {
    if valid_table(table) {
        Ok(())
    } else {
        Err(BrokerError::permanent(format!(
            "invalid outbox table name {table:?}: lowercase letters, digits and '_' (optionally schema.table)"
        )))
    }
}

/// Creates the outbox table (and its index) when missing. Idempotent; safe to run from several
/// processes at once (a concurrent creation is not an error). Runs on `conn`, so it can be part
/// of your own migrations' transaction.
pub async fn create_table(conn: &mut PgConnection, table: &str) -> Result<(), BrokerError> {
    check(table)?;
    let create = format!(
        "CREATE TABLE IF NOT EXISTS {table} (\
         seq BIGSERIAL PRIMARY KEY, queue TEXT NOT NULL, job_id TEXT NOT NULL, \
         headers JSONB NOT NULL, payload BYTEA NOT NULL, \
         created_at TIMESTAMPTZ NOT NULL DEFAULT now(), error TEXT)"
    );
    if let Err(e) = sqlx::query(&create).execute(&mut *conn).await {
        let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(table)
            .fetch_one(&mut *conn)
            .await
            .map_err(err)?;
        if !exists {
            return Err(err(e));
        }
    }
    Ok(())
}

/// Writes `envelopes` for logical queue `queue` into the outbox on `conn`, which should be
/// inside the caller's transaction (`&mut *tx`): they are published after it commits, and never
/// if it rolls back. Also notifies [`CHANNEL`] (delivered at commit), so a listening relay
/// publishes at once rather than at its next poll.
///
/// Fails with a permanent error naming the table when it does not exist (a relay creates it at
/// start; [`create_table`] in your migrations does too). PostgreSQL then aborts the
/// transaction, as for any failed statement.
pub async fn insert(
    conn: &mut PgConnection,
    table: &str,
    queue: &str,
    envelopes: &[Envelope],
) -> Result<(), BrokerError> {
    check(table)?;
    if envelopes.is_empty() {
        return Ok(());
    }
    let mut queues = Vec::with_capacity(envelopes.len());
    let mut ids = Vec::with_capacity(envelopes.len());
    let mut headers = Vec::with_capacity(envelopes.len());
    let mut payloads = Vec::with_capacity(envelopes.len());
    for env in envelopes {
        let (h, body) = wire::to_wire(env);
        let map: serde_json::Map<String, serde_json::Value> = h
            .into_iter()
            .map(|(k, v)| (k, serde_json::Value::String(v)))
            .collect();
        queues.push(queue.to_string());
        ids.push(env.id.clone());
        headers.push(serde_json::Value::Object(map).to_string());
        payloads.push(body.to_vec());
    }
    let sql = format!(
        "INSERT INTO {table} (queue, job_id, headers, payload) \
         SELECT q, i, h::jsonb, p FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bytea[]) AS t(q, i, h, p)"
    );
    let inserted = sqlx::query(&sql)
        .bind(&queues)
        .bind(&ids)
        .bind(&headers)
        .bind(&payloads)
        .execute(&mut *conn)
        .await;
    if let Err(e) = inserted {
        if let sqlx::Error::Database(db) = &e {
            if db.code().as_deref() == Some("42P01") {
                return Err(BrokerError::permanent(format!(
                    "the outbox table {table} does not exist: start a worker or `stevedore relay` with [outbox] once, or create it in your migrations (stevedore_postgres::outbox::create_table)"
                )));
            }
        }
        return Err(err(e));
    }
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(CHANNEL)
        .execute(&mut *conn)
        .await
        .map_err(err)?;
    Ok(())
}

/// Rows waiting in the outbox, and how long the oldest has waited (the relay's lag).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct Pending {
    /// Rows not yet published (or published by a relay that has not committed yet).
    pub rows: u64,
    /// Age of the oldest of them, by the server's clock.
    pub oldest: Option<Duration>,
    /// Rows the broker refused for good, kept with their `error` (not published).
    pub refused: u64,
}

/// The relay's side of an outbox table. Cheap to clone (a pool); thread safe.
#[derive(Clone, Debug)]
pub struct Outbox {
    pool: PgPool,
    table: String,
}

impl Outbox {
    /// An outbox on `pool`'s database in `table`, created when missing.
    pub async fn new(pool: PgPool, table: &str) -> Result<Outbox, BrokerError> {
        check(table)?;
        let mut conn = pool.acquire().await.map_err(err)?;
        create_table(&mut conn, table).await?;
        Ok(Outbox {
            pool,
            table: table.to_string(),
        })
    }

    /// Connects to `url` (see [`crate::PostgresStore::connect`]) with a small pool.
    pub async fn connect(url: &str, table: &str) -> Result<Outbox, BrokerError> {
        let pool = crate::connect_pool(url).await?;
        Outbox::new(pool, table).await
    }

    /// The table.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// A listener on [`CHANNEL`]: wakes a relay when a transaction with an outbox row commits.
    pub async fn listen(&self) -> Result<sqlx::postgres::PgListener, BrokerError> {
        let mut l = sqlx::postgres::PgListener::connect_with(&self.pool)
            .await
            .map_err(err)?;
        l.listen(CHANNEL).await.map_err(err)?;
        Ok(l)
    }

    /// Takes up to `max` of the oldest rows no other relay holds, in a transaction that holds
    /// them until [`Batch::done`] (or until the batch is dropped or the process dies: then they
    /// are free again, for this relay or another). `None` when there are none.
    ///
    /// A row whose headers cannot be read (written by hand, say) is still published, as a
    /// message with its payload and whatever headers could be read, so it reaches the queue's
    /// dead-letter queue with a reason rather than blocking the outbox.
    pub async fn take(&self, max: usize) -> Result<Option<Batch>, BrokerError> {
        let mut tx = self.pool.begin().await.map_err(err)?;
        let sql = format!(
            "SELECT seq, queue, job_id, headers::text, payload FROM {} WHERE error IS NULL \
             ORDER BY seq LIMIT $1 FOR UPDATE SKIP LOCKED",
            self.table
        );
        let rows = sqlx::query(&sql)
            .bind(i64::try_from(max.max(1)).unwrap_or(i64::MAX))
            .fetch_all(&mut *tx)
            .await
            .map_err(err)?;
        if rows.is_empty() {
            let _ = tx.rollback().await;
            return Ok(None);
        }
        let mut seqs = Vec::with_capacity(rows.len());
        let mut jobs = Vec::with_capacity(rows.len());
        for row in rows {
            let seq: i64 = row.try_get(0).map_err(err)?;
            let queue: String = row.try_get(1).map_err(err)?;
            let id: String = row.try_get(2).map_err(err)?;
            let headers: String = row.try_get(3).map_err(err)?;
            let payload: Vec<u8> = row.try_get(4).map_err(err)?;
            let pairs: Vec<(String, String)> = match serde_json::from_str::<
                serde_json::Map<String, serde_json::Value>,
            >(&headers)
            {
                Ok(map) => map
                    .into_iter()
                    .filter_map(|(k, v)| v.as_str().map(|v| (k, v.to_string())))
                    .collect(),
                Err(e) => {
                    tracing::warn!(seq, error = %e, "outbox row with unreadable headers: published with its payload alone");
                    Vec::new()
                }
            };
            seqs.push(seq);
            jobs.push((queue, wire::from_wire(pairs, payload.into(), &id)));
        }
        Ok(Some(Batch {
            tx,
            table: self.table.clone(),
            seqs,
            jobs,
        }))
    }

    /// Puts the rows the broker refused back in line (clears their `error`), once what made it
    /// refuse them is fixed. Returns how many.
    pub async fn retry_refused(&self) -> Result<u64, BrokerError> {
        let sql = format!(
            "UPDATE {} SET error = NULL WHERE error IS NOT NULL",
            self.table
        );
        Ok(sqlx::query(&sql)
            .execute(&self.pool)
            .await
            .map_err(err)?
            .rows_affected())
    }

    /// How many rows wait and how old the oldest is.
    pub async fn pending(&self) -> Result<Pending, BrokerError> {
        let sql = format!(
            "SELECT count(*) FILTER (WHERE error IS NULL), \
             EXTRACT(EPOCH FROM (now() - min(created_at) FILTER (WHERE error IS NULL)))::float8, \
             count(*) FILTER (WHERE error IS NOT NULL) FROM {}",
            self.table
        );
        let row = sqlx::query(&sql).fetch_one(&self.pool).await.map_err(err)?;
        let rows: i64 = row.try_get(0).map_err(err)?;
        let age: Option<f64> = row.try_get(1).map_err(err)?;
        let refused: i64 = row.try_get(2).map_err(err)?;
        Ok(Pending {
            rows: u64::try_from(rows).unwrap_or(0),
            oldest: age.map(|s| Duration::from_secs_f64(s.max(0.0))),
            refused: u64::try_from(refused).unwrap_or(0),
        })
    }
}

/// Rows taken by [`Outbox::take`], held (locked) until [`Batch::done`].
pub struct Batch {
    tx: Transaction<'static, Postgres>,
    table: String,
    seqs: Vec<i64>,
    /// The jobs, oldest first, each with its logical queue.
    pub jobs: Vec<(String, Envelope)>,
}

impl std::fmt::Debug for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch")
            .field("table", &self.table)
            .field("rows", &self.seqs.len())
            .finish()
    }
}

impl Batch {
    /// Marks the row of `jobs[index]` as refused for good with `error`: at [`Batch::done`] it
    /// stays in the table, with its error, and is never taken again.
    pub async fn refuse(&mut self, index: usize, error: &str) -> Result<(), BrokerError> {
        let Some(&seq) = self.seqs.get(index) else {
            return Ok(());
        };
        let sql = format!("UPDATE {} SET error = $2 WHERE seq = $1", self.table);
        sqlx::query(&sql)
            .bind(seq)
            .bind(error)
            .execute(&mut *self.tx)
            .await
            .map_err(err)?;
        Ok(())
    }

    /// Deletes the rows (they were published; refused ones stay) and commits. When this
    /// fails, or is never called, the rows stay and are published again.
    pub async fn done(self) -> Result<(), BrokerError> {
        let all: Vec<usize> = (0..self.seqs.len()).collect();
        self.done_with(&all).await
    }

    /// Deletes only the rows of `jobs[i]` for each `i` in `published` (refused ones stay) and
    /// commits; the others stay, to be taken again: for a batch whose publish failed part way,
    /// so that what did go out is not published again and again.
    pub async fn done_with(mut self, published: &[usize]) -> Result<(), BrokerError> {
        let seqs: Vec<i64> = published
            .iter()
            .filter_map(|&i| self.seqs.get(i).copied())
            .collect();
        let sql = format!(
            "DELETE FROM {} WHERE seq = ANY($1) AND error IS NULL",
            self.table
        );
        sqlx::query(&sql)
            .bind(&seqs)
            .execute(&mut *self.tx)
            .await
            .map_err(err)?;
        self.tx.commit().await.map_err(err)
    }
}
