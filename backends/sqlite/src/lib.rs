//! # stevedore-sqlite
//!
//! The embedded backend: durable jobs in one SQLite file, no server. A worker, a second worker
//! and the CLI (`enqueue`, `stats`, `dlq`) may open the same file at once, on one host.
//!
//! | broker method | SQLite |
//! |---|---|
//! | `publish` | `INSERT` rows (queue, `run_at`, headers as JSON, body) |
//! | `receive` | ended leases back to ready, then one `UPDATE … RETURNING` claim of the due ready rows, oldest first; an empty result waits for a commit (this process's: at once; another's: `PRAGMA data_version`, polled every 50 ms) or the next due time |
//! | `ack` | `DELETE` the row if this lease still holds it (acked rows never linger in the hot index) |
//! | `release` | clear the lease: ready again at its old place |
//! | `extend_lease` | move `lease_until` if this lease still holds it |
//! | `browse` | `SELECT` on a read-only connection |
//! | `depth` | `COUNT`s on the partial indexes, read-only |
//! | delay | native: `run_at` (unbounded, never early) |
//!
//! Every write goes through one writer thread per broker, which runs whatever is queued (up to
//! 128 operations) as one `BEGIN IMMEDIATE` transaction with a savepoint per operation: one
//! commit, one fsync, for many publishes, claims and acks (group commit). Reads use a read-only
//! connection on a blocking thread. The file is in WAL mode with a 5 s busy timeout, so
//! processes wait for each other's writes instead of failing.
//!
//! A plain `sqlite3` producer enqueues with one statement; the message reaches the queue's
//! `default_job` (or names its job in a header):
//!
//! ```sql
//! INSERT INTO stevedore_jobs (queue, body) VALUES ('emails', '{"to":"a@example.com"}');
//! INSERT INTO stevedore_jobs (queue, headers, body)
//!     VALUES ('emails', '[["stevedore-job","send_email"]]', '{"to":"a@example.com"}');
//! ```

mod factory;
mod kv;
mod store;

pub use factory::SqliteFactory;
pub use kv::{SqliteStore, SqliteStoreFactory};
pub use store::Durability;

use async_trait::async_trait;
use bytes::Bytes;
use rusqlite::{params, Connection};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use stevedore_core::{
    to_millis, wire, Broker, BrokerError, Capabilities, DelaySupport, Delivery, Depth, Envelope,
    LeaseSupport, OrderingSupport, Receipt, ReceiveOptions,
};
use store::{ClaimedRow, NewRow, Op, Settle};
use tokio::sync::{oneshot, Notify};

/// The row of `m`, ready at `now` (Unix ms) or at its due time.
fn new_row(m: &Envelope, now: i64) -> NewRow {
    let (headers, body) = wire::to_wire(m);
    NewRow {
        run_at: m
            .not_before
            .map_or(now, |t| i64::try_from(to_millis(t)).unwrap_or(i64::MAX)),
        headers: serde_json::to_string(&headers).unwrap_or_else(|_| "[]".into()),
        body: body.to_vec(),
    }
}

/// The rusqlite this backend is built on (0.43, SQLite bundled): its `Connection` and
/// `Transaction` are what [`publish_in`] takes.
pub use rusqlite;

/// Publishes `messages` to physical queue `queue` on `conn`, a connection of yours on the
/// broker's file, inside your transaction (`&tx`): the rows are the jobs (the job table is its
/// own outbox), so they exist exactly when your transaction's other writes do, and a rollback
/// enqueues nothing. Workers on the file see them within 50 ms of the commit.
///
/// Synchronous, like rusqlite. Checks payload sizes against `max_payload` (the broker's
/// default unless you pass the configured one); `broker.max_size` is not checked here. Fails
/// with a permanent error naming the table when `conn` is not on a Stevedore file (the job
/// table is missing), a transient one when the file stayed locked past its busy timeout.
/// SQLite has one writer per file: while your transaction is open, the broker's own writes
/// (claims, acks) on that file wait, so keep it short.
pub fn publish_in(
    conn: &Connection,
    queue: &str,
    messages: &[Envelope],
    max_payload: usize,
) -> Result<(), BrokerError> {
    capabilities(max_payload).check_payloads(messages, "sqlite")?;
    let now = now_ms();
    let rows: Vec<NewRow> = messages.iter().map(|m| new_row(m, now)).collect();
    store::publish(conn, queue, &rows).map_err(|e| {
        let text = e.to_string();
        let busy = matches!(
            e.sqlite_error_code(),
            Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
        );
        if busy {
            BrokerError::transient(format!("sqlite: {text}"))
        } else if text.contains("no such table") {
            BrokerError::permanent(format!(
                "this connection's database has no Stevedore job table (stevedore_jobs): open the broker's file (broker.path) with a worker or the CLI once, then enqueue on a connection to that file ({text})"
            ))
        } else {
            BrokerError::permanent(format!("sqlite: {text}"))
        }
    })
}

/// Ready and delayed jobs of physical queues `queues`, counted on `conn` (inside your
/// transaction, it sees your own uncommitted enqueues): for `max_depth` checks in
/// [`publish_in`]'s callers.
pub fn waiting_in(conn: &Connection, queues: &[String]) -> Result<u64, BrokerError> {
    let mut n: u64 = 0;
    for q in queues {
        let c: i64 = conn
            .query_row(
                "SELECT count(*) FROM stevedore_jobs WHERE queue = ?1 AND lease_until IS NULL",
                [q],
                |r| r.get(0),
            )
            .map_err(|e| BrokerError::permanent(format!("sqlite: {e}")))?;
        n += u64::try_from(c).unwrap_or(0);
    }
    Ok(n)
}

/// Default largest payload: 16 MiB.
pub const DEFAULT_MAX_PAYLOAD: usize = 16 * 1024 * 1024;
/// Default file, in the working directory.
pub const DEFAULT_PATH: &str = "stevedore.db";
/// How often a waiting receive looks for commits of other processes.
const POLL: Duration = Duration::from_millis(50);

/// Settings of one store.
#[derive(Clone, Debug)]
pub struct SqliteConfig {
    /// The database file (created with its schema when missing; its directory must exist).
    pub path: PathBuf,
    /// `synchronous=FULL` (default) or `NORMAL`.
    pub durability: Durability,
    /// Largest payload accepted at publish.
    pub max_payload: usize,
    /// Largest the database file may grow, in bytes (`None`: as large as the disk allows). A
    /// publish that would grow it beyond fails like a full disk: nothing of it is kept, and
    /// what was committed before stays (acks and claims keep working).
    pub max_size: Option<u64>,
}

impl SqliteConfig {
    /// Settings for `path`, defaults for the rest.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        SqliteConfig {
            path: path.into(),
            durability: Durability::Full,
            max_payload: DEFAULT_MAX_PAYLOAD,
            max_size: None,
        }
    }
}

/// What the SQLite backend declares: native unbounded delay, timed extendable leases, no
/// ordering across competing consumers, durable, exact counts, shared by every process that
/// opens the file.
pub fn capabilities(max_payload: usize) -> Capabilities {
    Capabilities {
        delay: DelaySupport::Native { max: None },
        lease: LeaseSupport::Timed { max: None },
        ordering: OrderingSupport::None,
        max_payload,
        max_batch: 1000,
        durable: true,
        delay_tolerance: Duration::from_millis(250),
        depth_staleness: Duration::ZERO,
        shared: true,
        counts_deliveries: true,
        uncounted_release: true,
        sharing: stevedore_core::Sharing::Any,
        max_headers: None,
    }
}

/// The embedded SQLite broker. Cheap to clone (clones share the writer and reader); thread safe.
/// Opening the same file from several brokers or processes is safe.
#[derive(Clone)]
pub struct SqliteBroker {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    caps: Capabilities,
    ops: Mutex<Option<mpsc::Sender<Op>>>,
    /// Joined by `close`, so what was queued is committed when it returns.
    writer_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// `None` once closed.
    reader: Arc<Mutex<Option<Connection>>>,
    /// Wakes this process's waiting receives when it commits something they may want.
    changed: Notify,
    closed: AtomicBool,
    tokens: AtomicU64,
}

impl std::fmt::Debug for SqliteBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteBroker")
            .field("path", &self.inner.path)
            .finish()
    }
}

/// A receipt's token: the row and the lease that holds it (a later claim of the same row carries
/// another token, so a stale receipt cannot settle it).
#[derive(Debug)]
struct Token {
    id: i64,
    lease: i64,
}

pub(crate) fn now_ms() -> i64 {
    i64::try_from(to_millis(SystemTime::now())).unwrap_or(i64::MAX)
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 4)
}

impl SqliteBroker {
    /// Opens (or creates) the store at `config.path`. Fails, naming the path, when its directory
    /// is missing, the file is not a database, is read-only, or was written by a newer schema.
    pub async fn open(config: SqliteConfig) -> Result<Self, BrokerError> {
        let path = config.path.clone();
        let (durability, max_size) = (config.durability, config.max_size);
        let opening = path.clone();
        let (writer, reader) = tokio::task::spawn_blocking(move || {
            let path = opening;
            let w = store::open_writer(&path, durability, max_size)?;
            let r = store::open_reader(&path)?;
            Ok::<_, BrokerError>((w, r))
        })
        .await
        .map_err(|e| BrokerError::permanent(format!("opening the store panicked: {e}")))??;
        let (tx, rx) = mpsc::channel();
        let path = config.path.clone();
        let writer_thread = std::thread::Builder::new()
            .name("stevedore-sqlite-writer".into())
            .spawn(move || store::writer(writer, path, max_size, rx))
            .map_err(|e| BrokerError::permanent(format!("cannot start the writer thread: {e}")))?;
        let seed = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            ^ (u64::from(std::process::id()) << 40);
        Ok(SqliteBroker {
            inner: Arc::new(Inner {
                path: config.path,
                caps: capabilities(config.max_payload),
                ops: Mutex::new(Some(tx)),
                writer_thread: Mutex::new(Some(writer_thread)),
                reader: Arc::new(Mutex::new(Some(reader))),
                changed: Notify::new(),
                closed: AtomicBool::new(false),
                tokens: AtomicU64::new(seed),
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    async fn write<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, BrokerError>>) -> Op,
    ) -> Result<T, BrokerError> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(BrokerError::Closed);
        }
        let (tx, rx) = oneshot::channel();
        {
            let ops = self.inner.ops.lock().unwrap_or_else(|p| p.into_inner());
            let Some(ops) = ops.as_ref() else {
                return Err(BrokerError::Closed);
            };
            ops.send(make(tx))
                .map_err(|_| BrokerError::permanent("the store's writer thread has stopped"))?;
        }
        rx.await
            .map_err(|_| BrokerError::permanent("the store's writer thread has stopped"))?
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, BrokerError> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(BrokerError::Closed);
        }
        let reader = self.inner.reader.clone();
        let path = self.inner.path.clone();
        tokio::task::spawn_blocking(move || {
            let c = reader.lock().unwrap_or_else(|p| p.into_inner());
            let c = c.as_ref().ok_or(BrokerError::Closed)?;
            f(c).map_err(|e| store::file_error(&path, &e))
        })
        .await
        .map_err(|e| BrokerError::transient(format!("a read of the store panicked: {e}")))?
    }

    fn token(&self) -> i64 {
        // Unique per claim across processes: a per-process random start, then a counter.
        (self.inner.tokens.fetch_add(1, Ordering::Relaxed) & (i64::MAX as u64)) as i64
    }

    async fn claim(
        &self,
        queue: &str,
        max: usize,
        lease: Duration,
    ) -> Result<Vec<Delivery>, BrokerError> {
        let now = now_ms();
        let token = self.token();
        let rows = self
            .write(|reply| Op::Claim {
                queue: queue.to_string(),
                max: max.clamp(1, self.inner.caps.max_batch),
                now,
                lease_until: now.saturating_add(ms(lease)),
                token,
                reply,
            })
            .await?;
        let buf = Bytes::from(rows.buf);
        // One name shared by every receipt of this receive.
        let receipt_queue: Arc<str> = Arc::from(queue);
        Ok(rows
            .rows
            .into_iter()
            .map(|row| to_delivery(&receipt_queue, &buf, row, token))
            .collect())
    }

    /// `(data_version, the next time something of `queue` becomes due)`.
    async fn watch(&self, queue: &str) -> Result<(i64, Option<i64>), BrokerError> {
        let queue = queue.to_string();
        self.read(move |c| {
            let version: i64 = c.query_row("PRAGMA data_version", [], |r| r.get(0))?;
            let next: Option<i64> = c
                .prepare_cached(
                    "SELECT MIN(v) FROM (
                        SELECT MIN(run_at) AS v FROM stevedore_jobs
                            WHERE queue = ?1 AND lease_until IS NULL
                        UNION ALL
                        SELECT MIN(lease_until) FROM stevedore_jobs
                            WHERE queue = ?1 AND lease_until IS NOT NULL)",
                )?
                .query_row(params![queue], |r| r.get(0))?;
            Ok((version, next))
        })
        .await
    }

    async fn data_version(&self) -> Result<i64, BrokerError> {
        self.read(|c| c.query_row("PRAGMA data_version", [], |r| r.get(0)))
            .await
    }

    async fn settle(&self, receipts: &[Receipt], how: Settle) -> Result<(), BrokerError> {
        let mut lost: Option<String> = None;
        let mut items = Vec::with_capacity(receipts.len());
        for r in receipts {
            match r.token::<Token>() {
                Some(t) => items.push((t.id, t.lease)),
                None => lost = Some(r.queue().to_string()),
            }
        }
        if !items.is_empty() {
            let missing = self.write(|reply| Op::Settle { items, how, reply }).await?;
            if matches!(how, Settle::Release | Settle::ReleaseUncounted) {
                self.inner.changed.notify_waiters();
            }
            if missing > 0 {
                lost = receipts.first().map(|r| r.queue().to_string());
            }
        }
        match lost {
            Some(queue) => Err(BrokerError::LeaseLost { queue }),
            None => Ok(()),
        }
    }
}

fn to_delivery(queue: &Arc<str>, buf: &Bytes, row: ClaimedRow, lease: i64) -> Delivery {
    let raw = &buf[row.headers];
    // Validating is cheaper than the lossy scan; only a foreign row that is not UTF-8 pays for it.
    let headers = match std::str::from_utf8(raw) {
        Ok(s) => std::borrow::Cow::Borrowed(s),
        Err(_) => String::from_utf8_lossy(raw),
    };
    Delivery {
        envelope: decode(row.id, &headers, body_of(buf, row.body)),
        receipt: Receipt::new(queue.clone(), Token { id: row.id, lease }),
        delivery_count: u32::try_from(row.deliveries.max(1)).unwrap_or(u32::MAX),
    }
}

/// A large body gets its own copy, so a long job does not keep its whole batch's buffer alive.
fn body_of(buf: &Bytes, range: std::ops::Range<usize>) -> Bytes {
    if range.len() > 64 * 1024 {
        Bytes::copy_from_slice(&buf[range])
    } else {
        buf.slice(range)
    }
}

fn decode(id: i64, headers: &str, body: Bytes) -> Envelope {
    let mut env = match plain_pairs(headers) {
        Some(pairs) => wire::from_wire(pairs, body, ""),
        None => {
            let pairs: Vec<(String, String)> = serde_json::from_str(headers).unwrap_or_default();
            wire::from_wire(pairs, body, "")
        }
    };
    if env.id.is_empty() {
        env.id = format!("sqlite-{id}");
    }
    env
}

/// The headers column as this backend writes it (`[["name","value"],…]`: no whitespace, no
/// escapes), as pairs borrowed from the text; `None` for any other JSON (a foreign producer's
/// spacing or escapes), which then takes serde's path. Wherever serde reads the text too, it
/// reads the same pairs (the `sqlite_row` fuzz target checks it); the fast path is also
/// lenient where serde is not, taking raw control characters that JSON does not allow (a
/// foreign writer's), rather than losing every header of the row.
fn plain_pairs(s: &str) -> Option<Vec<(&str, &str)>> {
    let mut rest = s.strip_prefix('[')?.strip_suffix(']')?;
    let mut out = Vec::with_capacity(8);
    while !rest.is_empty() {
        let r = rest.strip_prefix("[\"")?;
        let (name, r) = r.split_once('"')?;
        let r = r.strip_prefix(",\"")?;
        let (value, r) = r.split_once('"')?;
        let r = r.strip_prefix(']')?;
        if name.contains('\\') || value.contains('\\') {
            return None;
        }
        out.push((name, value));
        rest = match r.strip_prefix(',') {
            Some("") => return None,
            Some(more) => more,
            None if r.is_empty() => r,
            None => return None,
        };
    }
    Some(out)
}

#[async_trait]
impl Broker for SqliteBroker {
    fn name(&self) -> &'static str {
        "sqlite"
    }

    fn capabilities(&self) -> &Capabilities {
        &self.inner.caps
    }

    async fn publish(&self, queue: &str, messages: Vec<Envelope>) -> Result<(), BrokerError> {
        self.inner.caps.check_payloads(&messages, "sqlite")?;
        // `run_at` is when a message becomes ready: now, or its due time. Claims take the oldest
        // first, so a delayed message that came due queues up by its due time, not behind every
        // message published meanwhile.
        let now = now_ms();
        let rows = messages.iter().map(|m| new_row(m, now)).collect();
        self.write(|reply| Op::Publish {
            queue: queue.to_string(),
            rows,
            reply,
        })
        .await?;
        self.inner.changed.notify_waiters();
        Ok(())
    }

    async fn receive(
        &self,
        queue: &str,
        opts: ReceiveOptions,
    ) -> Result<Vec<Delivery>, BrokerError> {
        let deadline = Instant::now() + opts.wait;
        loop {
            // Listen before looking, so a commit in between is not missed.
            let changed = self.inner.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let got = self.claim(queue, opts.max, opts.lease).await?;
            if !got.is_empty() || Instant::now() >= deadline {
                return Ok(got);
            }
            let (version, next_due) = self.watch(queue).await?;
            loop {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                let mut pause = POLL.min(deadline - now);
                if let Some(due) = next_due {
                    let until = Duration::from_millis(u64::try_from(due - now_ms()).unwrap_or(0));
                    pause = pause.min(until);
                }
                tokio::select! {
                    _ = &mut changed => break,
                    _ = tokio::time::sleep(pause) => {}
                }
                if next_due.is_some_and(|due| due <= now_ms()) {
                    break;
                }
                if self.data_version().await? != version {
                    break;
                }
            }
        }
    }

    async fn ack(&self, receipts: &[Receipt]) -> Result<(), BrokerError> {
        if receipts.is_empty() {
            return Ok(());
        }
        self.settle(receipts, Settle::Ack).await
    }

    async fn release(&self, receipts: &[Receipt]) -> Result<(), BrokerError> {
        if receipts.is_empty() {
            return Ok(());
        }
        self.settle(receipts, Settle::Release).await
    }

    /// Gives the rows back in place with this hand-out's delivery count undone.
    async fn release_uncounted(&self, deliveries: Vec<Delivery>) -> Result<(), BrokerError> {
        if deliveries.is_empty() {
            return Ok(());
        }
        let receipts: Vec<Receipt> = deliveries.into_iter().map(|d| d.receipt).collect();
        self.settle(&receipts, Settle::ReleaseUncounted).await
    }

    async fn extend_lease(&self, receipt: &Receipt, lease: Duration) -> Result<(), BrokerError> {
        let lost = || BrokerError::LeaseLost {
            queue: receipt.queue().to_string(),
        };
        let t = receipt.token::<Token>().ok_or_else(lost)?;
        let now = now_ms();
        let (id, token) = (t.id, t.lease);
        let held = self
            .write(|reply| Op::Extend {
                id,
                token,
                now,
                lease_until: now.saturating_add(ms(lease)),
                reply,
            })
            .await?;
        if held {
            Ok(())
        } else {
            Err(lost())
        }
    }

    async fn browse(&self, queue: &str, max: usize) -> Result<Vec<Envelope>, BrokerError> {
        let queue = queue.to_string();
        let now = now_ms();
        let limit = i64::try_from(max).unwrap_or(i64::MAX);
        self.read(move |c| {
            let mut out = Vec::new();
            // Ready first (an ended lease is ready), in delivery order, then the held ones.
            let mut s = c.prepare_cached(
                "SELECT id, headers, body FROM stevedore_jobs
                 WHERE queue = ?1 AND run_at <= ?2 AND (lease_until IS NULL OR lease_until <= ?2)
                 ORDER BY run_at, id LIMIT ?3",
            )?;
            let ready = s.query_map(params![queue, now, limit], |r| {
                Ok(decode(
                    r.get(0)?,
                    &store::text(r.get_ref(1)?),
                    Bytes::from(store::bytes(r.get_ref(2)?)),
                ))
            })?;
            for e in ready {
                out.push(e?);
            }
            let rest = limit.saturating_sub(out.len() as i64);
            let mut s = c.prepare_cached(
                "SELECT id, headers, body FROM stevedore_jobs
                 WHERE queue = ?1 AND lease_until > ?2 ORDER BY lease_until, id LIMIT ?3",
            )?;
            let held = s.query_map(params![queue, now, rest], |r| {
                Ok(decode(
                    r.get(0)?,
                    &store::text(r.get_ref(1)?),
                    Bytes::from(store::bytes(r.get_ref(2)?)),
                ))
            })?;
            for e in held {
                out.push(e?);
            }
            Ok(out)
        })
        .await
    }

    async fn depth(&self, queue: &str) -> Result<Depth, BrokerError> {
        let queue = queue.to_string();
        let now = now_ms();
        let (ready, oldest, delayed, held, ended) = self
            .read(move |c| {
                let (ready, oldest): (i64, Option<i64>) = c
                    .prepare_cached(
                        "SELECT COUNT(*), MIN(run_at) FROM stevedore_jobs
                         WHERE queue = ?1 AND lease_until IS NULL AND run_at <= ?2",
                    )?
                    .query_row(params![queue, now], |r| Ok((r.get(0)?, r.get(1)?)))?;
                let delayed: i64 = c
                    .prepare_cached(
                        "SELECT COUNT(*) FROM stevedore_jobs
                         WHERE queue = ?1 AND lease_until IS NULL AND run_at > ?2",
                    )?
                    .query_row(params![queue, now], |r| r.get(0))?;
                let (held, ended): (i64, i64) = c
                    .prepare_cached(
                        "SELECT COALESCE(SUM(lease_until > ?2), 0), COALESCE(SUM(lease_until <= ?2), 0)
                         FROM stevedore_jobs WHERE queue = ?1 AND lease_until IS NOT NULL",
                    )?
                    .query_row(params![queue, now], |r| Ok((r.get(0)?, r.get(1)?)))?;
                Ok((ready, oldest, delayed, held, ended))
            })
            .await?;
        let count = |n: i64| u64::try_from(n).unwrap_or(0);
        // `run_at` 0 (a foreign row inserted without one) says nothing about age.
        let oldest_age = oldest
            .filter(|t| *t > 0)
            .map(|t| Duration::from_millis(u64::try_from(now - t).unwrap_or(0)));
        Ok(Depth {
            ready: count(ready) + count(ended),
            in_flight: count(held),
            delayed: Some(count(delayed)),
            oldest_age,
        })
    }

    /// Stops taking writes, lets the writer finish what is queued, and returns once that is
    /// committed and both of this broker's connections are closed. Idempotent; every clone is
    /// closed with it.
    async fn close(&self) -> Result<(), BrokerError> {
        self.inner.closed.store(true, Ordering::Release);
        // Dropping the sender lets the writer finish what is queued, then stop.
        self.inner
            .ops
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let thread = self
            .inner
            .writer_thread
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let reader = self.inner.reader.clone();
        // A read still running holds the lock; it finishes first.
        tokio::task::spawn_blocking(move || {
            reader.lock().unwrap_or_else(|p| p.into_inner()).take()
        })
        .await
        .map_err(|e| BrokerError::permanent(format!("closing the store: {e}")))?;
        if let Some(thread) = thread {
            tokio::task::spawn_blocking(move || thread.join())
                .await
                .map_err(|e| BrokerError::permanent(format!("closing the store: {e}")))?
                .map_err(|_| BrokerError::permanent("the store's writer thread panicked"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_headers_read_as_serde_reads_them() {
        let serde = |s: &str| serde_json::from_str::<Vec<(String, String)>>(s).ok();
        let own = |s: &str| {
            plain_pairs(s).map(|v| {
                v.into_iter()
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .collect::<Vec<_>>()
            })
        };
        let written = serde_json::to_string(&vec![
            ("stevedore-id", "01J"),
            ("stevedore-job", "send_email"),
            ("x-note", "héllo, wörld ]["),
            ("", ""),
        ])
        .unwrap();
        for s in ["[]", r#"[["a","b"]]"#, r#"[["a","b"],["c","d"]]"#, &written] {
            assert_eq!(own(s), serde(s), "{s}");
            assert!(own(s).is_some(), "{s}");
        }
        // Anything else is left to serde: spacing, escapes, other shapes, broken text.
        for s in [
            r#"[ ["a","b"]]"#,
            r#"[["a", "b"]]"#,
            r#"[["a\"b","c"]]"#,
            r#"[["a","b\\"]]"#,
            r#"[["a","b"],]"#,
            r#"[["a","b"]"#,
            r#"[["a","b","c"]]"#,
            r#"[["a"]]"#,
            "",
            "null",
        ] {
            assert_eq!(own(s), None, "{s}");
        }
    }

    #[test]
    fn a_row_without_an_id_header_is_named_by_its_row() {
        let env = decode(7, "[]", Bytes::from_static(b"{}"));
        assert_eq!(env.id, "sqlite-7");
        let env = decode(7, r#"[["stevedore-id","abc"]]"#, Bytes::from_static(b"{}"));
        assert_eq!(env.id, "abc");
        let env = decode(
            7,
            r#"[["stevedore-job", "a\u0062"]]"#,
            Bytes::from_static(b"{}"),
        );
        assert_eq!(env.job.as_deref(), Some("ab"));
        assert_eq!(env.id, "sqlite-7");
    }
}

/// Entry points for the fuzz targets in `fuzz/` (the `fuzzing` feature; not an API): the
/// decoder of a row as stored, its fast path for the headers column, and the encoder.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing {
    use stevedore_core::Envelope;

    /// The envelope of row `id` with this headers column and body.
    pub fn decode(id: i64, headers: &str, body: Vec<u8>) -> Envelope {
        crate::decode(id, headers, body.into())
    }

    /// The fast path's reading of a headers column, `None` where it defers to serde.
    pub fn plain_pairs(headers: &str) -> Option<Vec<(String, String)>> {
        crate::plain_pairs(headers).map(|v| {
            v.into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
    }

    /// The headers column and body an envelope is stored as.
    pub fn encode(env: &Envelope) -> (String, Vec<u8>) {
        let row = crate::new_row(env, 0);
        (row.headers, row.body)
    }
}
