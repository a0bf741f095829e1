//! The file: schema, opening (with errors that name the path), and the one writer thread per
//! broker that runs every write as part of a group commit.

use rusqlite::{params, Connection, ErrorCode, OpenFlags, OptionalExtension, TransactionBehavior};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;
use stevedore_core::BrokerError;
use tokio::sync::oneshot;

/// The schema this build writes and reads. Older files are migrated forward at open; a newer one
/// is refused (a newer Stevedore wrote it).
pub(crate) const SCHEMA_VERSION: i64 = 1;

/// The jobs table. One row per message of any physical queue:
/// - `run_at`: Unix ms from which it may be delivered (0 = at once; a delay is a later value);
/// - `lease_until`/`lease_token`: set while a consumer holds it; a lease ends at `lease_until`;
/// - `deliveries`: how many times it was handed out;
/// - `headers`: the envelope's metadata as a JSON array of `[name, value]` pairs; `body`: bytes.
///
/// Acked rows are deleted, so the ready index only ever holds what waits.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS stevedore_meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS stevedore_jobs (
    id          INTEGER PRIMARY KEY,
    queue       TEXT    NOT NULL,
    run_at      INTEGER NOT NULL DEFAULT 0,
    lease_until INTEGER,
    lease_token INTEGER,
    deliveries  INTEGER NOT NULL DEFAULT 0,
    headers     TEXT    NOT NULL DEFAULT '[]',
    body        BLOB    NOT NULL
);
CREATE INDEX IF NOT EXISTS stevedore_jobs_ready
    ON stevedore_jobs (queue, run_at, id) WHERE lease_until IS NULL;
CREATE INDEX IF NOT EXISTS stevedore_jobs_leased
    ON stevedore_jobs (queue, lease_until) WHERE lease_until IS NOT NULL;
";

/// How long a connection waits for another process's write lock before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest the `-wal` file is kept between bursts, in bytes.
pub(crate) const WAL_LIMIT: i64 = 16 * 1024 * 1024;
/// Most operations one group commit carries.
const GROUP: usize = 128;

/// `synchronous` setting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// `synchronous=FULL`: a commit survives power loss.
    Full,
    /// `synchronous=NORMAL`: a commit survives a process crash; the last commits may be lost on
    /// power loss or an OS crash.
    Normal,
}

/// A message to insert.
pub(crate) struct NewRow {
    pub run_at: i64,
    pub headers: String,
    pub body: Vec<u8>,
}

/// A claimed row; its headers and body are ranges of its batch's [`Claimed::buf`].
pub(crate) struct ClaimedRow {
    pub id: i64,
    pub run_at: i64,
    pub deliveries: i64,
    pub headers: std::ops::Range<usize>,
    pub body: std::ops::Range<usize>,
}

/// The rows one claim took, oldest first. Every row's headers and body are copied into one
/// buffer: one allocation per claim instead of two per row, made and filled on the writer
/// thread, and the bodies then share it without another copy.
pub(crate) struct Claimed {
    pub buf: Vec<u8>,
    pub rows: Vec<ClaimedRow>,
}

/// What a settle does to a leased row.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Settle {
    Ack,
    Release,
    /// A release that undoes the hand-out's delivery count.
    ReleaseUncounted,
}

type Reply<T> = oneshot::Sender<Result<T, BrokerError>>;

/// One write, run by the writer thread inside a group commit.
pub(crate) enum Op {
    Publish {
        queue: String,
        rows: Vec<NewRow>,
        reply: Reply<()>,
    },
    Claim {
        queue: String,
        max: usize,
        now: i64,
        lease_until: i64,
        token: i64,
        reply: Reply<Claimed>,
    },
    /// Returns how many of `items` (row id, lease token) were not held any more.
    Settle {
        items: Vec<(i64, i64)>,
        how: Settle,
        reply: Reply<usize>,
    },
    Extend {
        id: i64,
        token: i64,
        now: i64,
        lease_until: i64,
        reply: Reply<bool>,
    },
}

/// An error of the file at `path`, in words that say what to do.
pub(crate) fn file_error(path: &Path, e: &rusqlite::Error) -> BrokerError {
    let p = path.display();
    let code = e.sqlite_error_code();
    let message = match code {
        Some(ErrorCode::NotADatabase) => format!("{p} is not a SQLite database (or is encrypted)"),
        Some(ErrorCode::ReadOnly) => format!("{p} is read-only: the worker needs to write it"),
        Some(ErrorCode::PermissionDenied) => format!("{p}: permission denied"),
        Some(ErrorCode::CannotOpen) => format!("cannot open {p}: {e}"),
        Some(ErrorCode::DiskFull) => {
            format!("{p}: the disk (or broker.max_size) is full; nothing of this write was kept")
        }
        Some(ErrorCode::DatabaseCorrupt) => format!("{p} is corrupt: {e}"),
        _ => format!("{p}: {e}"),
    };
    let transient = matches!(
        code,
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked | ErrorCode::DiskFull)
    ) || matches!(code, Some(ErrorCode::SystemIoFailure));
    BrokerError::Other { message, transient }
}

/// Opens (creating if needed) the store for writing: WAL, busy timeout, durability, schema at
/// [`SCHEMA_VERSION`].
pub(crate) fn open_writer(
    path: &Path,
    durability: Durability,
    max_size: Option<u64>,
) -> Result<Connection, BrokerError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.is_dir() {
            return Err(BrokerError::permanent(format!(
                "cannot create {}: directory {} does not exist",
                path.display(),
                dir.display()
            )));
        }
    }
    let fail = |e: rusqlite::Error| file_error(path, &e);
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(fail)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(fail)?;
    // journal_mode answers with the mode in force; anything but WAL would mean the file cannot
    // be shared safely by several processes.
    let mode: String = conn
        .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
        .map_err(fail)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(BrokerError::permanent(format!(
            "{}: cannot use write-ahead logging (journal_mode is {mode}); is it on a network file system?",
            path.display()
        )));
    }
    let sync = match durability {
        Durability::Full => "FULL",
        Durability::Normal => "NORMAL",
    };
    conn.pragma_update(None, "synchronous", sync)
        .map_err(fail)?;
    // The WAL file keeps its high-water size unless told otherwise: after a burst (one huge
    // publish, a backlog drained) it is cut back to this when the log restarts.
    let _: i64 = conn
        .query_row(
            &format!("PRAGMA journal_size_limit = {WAL_LIMIT}"),
            [],
            |r| r.get(0),
        )
        .map_err(fail)?;
    migrate(&conn, path)?;
    if let Some(bytes) = max_size {
        let page: i64 = conn
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .map_err(fail)?;
        // Publishes stop at `max_size` (see `apply`); the pages beyond are headroom so claims,
        // releases and acks keep working on a store that is "full".
        let pages = i64::try_from(bytes).unwrap_or(i64::MAX) / page.max(1);
        let pages = pages.saturating_add((pages / 10).max(64));
        let _: i64 = conn
            .query_row(
                &format!("PRAGMA max_page_count = {}", pages.max(1)),
                [],
                |r| r.get(0),
            )
            .map_err(fail)?;
    }
    Ok(conn)
}

/// Opens the store read-only, for depth, browsing and change detection.
pub(crate) fn open_reader(path: &Path) -> Result<Connection, BrokerError> {
    let fail = |e: rusqlite::Error| file_error(path, &e);
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(fail)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(fail)?;
    Ok(conn)
}

/// Creates the schema, or checks and migrates an existing one.
fn migrate(conn: &Connection, path: &Path) -> Result<(), BrokerError> {
    let fail = |e: rusqlite::Error| file_error(path, &e);
    conn.execute_batch("BEGIN IMMEDIATE").map_err(fail)?;
    let result = (|| {
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS stevedore_meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)",
        )?;
        let found: Option<i64> = conn
            .query_row(
                "SELECT value FROM stevedore_meta WHERE key = 'schema_version'",
                [],
                |r| r.get(0),
            )
            .optional()?;
        Ok::<_, rusqlite::Error>(found)
    })();
    let found = match result {
        Ok(f) => f,
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            return Err(fail(e));
        }
    };
    if let Some(v) = found.filter(|v| *v > SCHEMA_VERSION) {
        let _ = conn.execute_batch("ROLLBACK");
        return Err(BrokerError::permanent(format!(
            "{} was written by a newer Stevedore (schema version {v}; this build reads up to \
             {SCHEMA_VERSION}): upgrade this program, or point broker.path at another file",
            path.display()
        )));
    }
    // Version 1 is the first: nothing older to migrate from yet. Later versions add their steps
    // here, each guarded by `found < N`.
    let created = conn.execute_batch(SCHEMA).and_then(|()| {
        conn.execute(
            "INSERT INTO stevedore_meta (key, value) VALUES ('schema_version', ?1)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            params![SCHEMA_VERSION],
        )
    });
    if let Err(e) = created {
        let _ = conn.execute_batch("ROLLBACK");
        return Err(fail(e));
    }
    conn.execute_batch("COMMIT").map_err(fail)
}

/// The writer thread: takes the first waiting op, then every op already queued (up to
/// [`GROUP`]), runs them in one `BEGIN IMMEDIATE` transaction with a savepoint each (one op's
/// failure does not undo the others), commits once, then answers. Ends when every sender is gone.
pub(crate) fn writer(
    mut conn: Connection,
    path: PathBuf,
    max_size: Option<u64>,
    ops: mpsc::Receiver<Op>,
) {
    let mut carried = Vec::new();
    loop {
        let mut batch = std::mem::take(&mut carried);
        if batch.is_empty() {
            match ops.recv() {
                Ok(first) => batch.push(first),
                Err(_) => return,
            }
        }
        while batch.len() < GROUP {
            match ops.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        carried = run_batch(&mut conn, &path, max_size, batch);
    }
}

/// An op's answer, kept until the commit says whether it holds.
enum Done {
    Unit(Reply<()>, Result<(), BrokerError>),
    Rows(Reply<Claimed>, Result<Claimed, BrokerError>),
    Count(Reply<usize>, Result<usize, BrokerError>),
    Flag(Reply<bool>, Result<bool, BrokerError>),
}

impl Done {
    /// The same answer slot, now holding `e`.
    fn failed(self, e: BrokerError) -> Done {
        match self {
            Done::Unit(tx, _) => Done::Unit(tx, Err(e)),
            Done::Rows(tx, _) => Done::Rows(tx, Err(e)),
            Done::Count(tx, _) => Done::Count(tx, Err(e)),
            Done::Flag(tx, _) => Done::Flag(tx, Err(e)),
        }
    }

    fn send(self, commit: &Result<(), BrokerError>) {
        let fail = copy;
        // An op's own failure says more than the commit's.
        match self {
            Done::Unit(tx, r) => {
                let _ = tx.send(r.and_then(|v| commit.as_ref().map_err(fail).map(|()| v)));
            }
            Done::Rows(tx, r) => {
                let _ = tx.send(r.and_then(|v| commit.as_ref().map_err(fail).map(|()| v)));
            }
            Done::Count(tx, r) => {
                let _ = tx.send(r.and_then(|v| commit.as_ref().map_err(fail).map(|()| v)));
            }
            Done::Flag(tx, r) => {
                let _ = tx.send(r.and_then(|v| commit.as_ref().map_err(fail).map(|()| v)));
            }
        }
    }
}

/// Runs `batch` in one transaction and answers every op it ran. Returns the ops it did not get to
/// (SQLite rolled the whole transaction back under an op: a full disk, an I/O error), for the
/// next transaction.
fn run_batch(conn: &mut Connection, path: &Path, max_size: Option<u64>, batch: Vec<Op>) -> Vec<Op> {
    let fail = |e: rusqlite::Error| file_error(path, &e);
    let mut tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => {
            let err = fail(e);
            for op in batch {
                answer_now(op, &err);
            }
            return Vec::new();
        }
    };
    let mut done = Vec::with_capacity(batch.len());
    let mut ops = batch.into_iter();
    let mut aborted = None;
    for op in ops.by_ref() {
        // A publish runs in a savepoint of its own, so a failed one keeps nothing of its batch
        // and takes nothing of the others' with it. Claims, settles and extensions need none:
        // they cannot fail half-way except by an error that ends the whole transaction, and a
        // savepoint costs a sub-journal copy of every page they touch.
        let d = if matches!(op, Op::Publish { .. }) {
            let sp = match tx.savepoint() {
                Ok(sp) => sp,
                Err(e) => {
                    answer_now(op, &fail(e));
                    continue;
                }
            };
            let (d, ok) = apply(&sp, op, path, max_size);
            // A failed publish's savepoint rolls back when dropped; the others' writes stay.
            match ok.then(|| sp.commit()) {
                Some(Err(e)) => d.failed(fail(e)),
                _ => d,
            }
        } else {
            apply(&tx, op, path, max_size).0
        };
        done.push(d);
        if tx.is_autocommit() {
            // Some errors (SQLITE_FULL, I/O errors) make SQLite roll back the whole
            // transaction, so what the ops before this one wrote is gone too.
            aborted = Some(BrokerError::transient(format!(
                "{}: the write was rolled back with another one that failed in the same commit; retry",
                path.display()
            )));
            break;
        }
    }
    let commit = match aborted {
        Some(e) => {
            drop(tx);
            Err(e)
        }
        None => tx.commit().map_err(fail),
    };
    for d in done {
        d.send(&commit);
    }
    ops.collect()
}

/// `e` once more, for each op it answers (`BrokerError` is not `Clone`).
fn copy(e: &BrokerError) -> BrokerError {
    BrokerError::Other {
        message: e.to_string(),
        transient: e.is_transient(),
    }
}

/// Answers an op that did not run with `e`.
fn answer_now(op: Op, e: &BrokerError) {
    let e = copy(e);
    match op {
        Op::Publish { reply, .. } => {
            let _ = reply.send(Err(e));
        }
        Op::Claim { reply, .. } => {
            let _ = reply.send(Err(e));
        }
        Op::Settle { reply, .. } => {
            let _ = reply.send(Err(e));
        }
        Op::Extend { reply, .. } => {
            let _ = reply.send(Err(e));
        }
    }
}

/// Runs one op on the open savepoint; returns its answer and whether it succeeded.
fn apply(c: &Connection, op: Op, path: &Path, max_size: Option<u64>) -> (Done, bool) {
    let fail = |e: rusqlite::Error| file_error(path, &e);
    match op {
        Op::Publish { queue, rows, reply } => {
            let r = room(c, &rows, max_size, path)
                .and_then(|()| publish(c, &queue, &rows).map_err(fail));
            let ok = r.is_ok();
            (Done::Unit(reply, r), ok)
        }
        Op::Claim {
            queue,
            max,
            now,
            lease_until,
            token,
            reply,
        } => {
            let r = claim(c, &queue, max, now, lease_until, token).map_err(fail);
            let ok = r.is_ok();
            (Done::Rows(reply, r), ok)
        }
        Op::Settle { items, how, reply } => {
            let r = settle(c, &items, how).map_err(fail);
            let ok = r.is_ok();
            (Done::Count(reply, r), ok)
        }
        Op::Extend {
            id,
            token,
            now,
            lease_until,
            reply,
        } => {
            let r = c
                .prepare_cached(
                    "UPDATE stevedore_jobs SET lease_until = ?3
                     WHERE id = ?1 AND lease_token = ?2 AND lease_until > ?4",
                )
                .and_then(|mut s| s.execute(params![id, token, lease_until, now]))
                .map(|n| n == 1)
                .map_err(fail);
            let ok = r.is_ok();
            (Done::Flag(reply, r), ok)
        }
    }
}

/// Refuses a publish that would take the file past `max_size` (pages in use, free pages not
/// counted, plus the new rows).
fn room(
    c: &Connection,
    rows: &[NewRow],
    max_size: Option<u64>,
    path: &Path,
) -> Result<(), BrokerError> {
    let Some(max) = max_size else {
        return Ok(());
    };
    let pragma = |name: &str| -> Result<u64, BrokerError> {
        c.query_row(&format!("PRAGMA {name}"), [], |r| r.get::<_, i64>(0))
            .map(|n| u64::try_from(n).unwrap_or(0))
            .map_err(|e| file_error(path, &e))
    };
    let used =
        pragma("page_count")?.saturating_sub(pragma("freelist_count")?) * pragma("page_size")?;
    let adding: u64 = rows
        .iter()
        .map(|r| (r.body.len() + r.headers.len() + 64) as u64)
        .sum();
    if used + adding > max {
        return Err(BrokerError::Other {
            message: format!(
                "{}: broker.max_size of {max} bytes reached ({used} in use, {adding} more asked); \
                 nothing of this publish was kept; acked jobs make room",
                path.display()
            ),
            transient: true,
        });
    }
    Ok(())
}

pub(crate) fn publish(c: &Connection, queue: &str, rows: &[NewRow]) -> rusqlite::Result<()> {
    let mut insert = c.prepare_cached(
        "INSERT INTO stevedore_jobs (queue, run_at, headers, body) VALUES (?1, ?2, ?3, ?4)",
    )?;
    for r in rows {
        insert.execute(params![queue, r.run_at, r.headers, r.body])?;
    }
    Ok(())
}

fn claim(
    c: &Connection,
    queue: &str,
    max: usize,
    now: i64,
    lease_until: i64,
    token: i64,
) -> rusqlite::Result<Claimed> {
    // Leases that ended come back first, keeping their place (their run_at is in the past).
    c.prepare_cached(
        "UPDATE stevedore_jobs SET lease_until = NULL, lease_token = NULL
         WHERE queue = ?1 AND lease_until IS NOT NULL AND lease_until <= ?2",
    )?
    .execute(params![queue, now])?;
    let mut take = c.prepare_cached(
        "UPDATE stevedore_jobs
         SET lease_until = ?3, lease_token = ?4, deliveries = deliveries + 1
         WHERE id IN (
             SELECT id FROM stevedore_jobs
             WHERE queue = ?1 AND lease_until IS NULL AND run_at <= ?2
             ORDER BY run_at, id LIMIT ?5)
         RETURNING id, run_at, deliveries, headers, body",
    )?;
    let limit = i64::try_from(max).unwrap_or(i64::MAX);
    let mut out = Claimed {
        buf: Vec::with_capacity(max.min(1000) * 256),
        rows: Vec::with_capacity(max.min(1000)),
    };
    let mut rows = take.query(params![queue, now, lease_until, token, limit])?;
    while let Some(r) = rows.next()? {
        let headers = append(&mut out.buf, r.get_ref(3)?);
        let body = append(&mut out.buf, r.get_ref(4)?);
        out.rows.push(ClaimedRow {
            id: r.get(0)?,
            run_at: r.get(1)?,
            deliveries: r.get(2)?,
            headers,
            body,
        });
    }
    out.rows.sort_by_key(|c| (c.run_at, c.id));
    Ok(out)
}

/// Appends a column's bytes to `buf`, whatever a foreign producer stored (`sqlite3` inserts
/// text literals; NULL is empty); returns where they are.
fn append(buf: &mut Vec<u8>, v: rusqlite::types::ValueRef<'_>) -> std::ops::Range<usize> {
    use rusqlite::types::ValueRef;
    let start = buf.len();
    match v {
        ValueRef::Text(t) | ValueRef::Blob(t) => buf.extend_from_slice(t),
        ValueRef::Integer(i) => buf.extend_from_slice(i.to_string().as_bytes()),
        ValueRef::Real(f) => buf.extend_from_slice(f.to_string().as_bytes()),
        ValueRef::Null => {}
    }
    start..buf.len()
}

fn settle(c: &Connection, items: &[(i64, i64)], how: Settle) -> rusqlite::Result<usize> {
    let sql = match how {
        Settle::Ack => "DELETE FROM stevedore_jobs WHERE id = ?1 AND lease_token = ?2",
        Settle::Release => {
            "UPDATE stevedore_jobs SET lease_until = NULL, lease_token = NULL
             WHERE id = ?1 AND lease_token = ?2"
        }
        Settle::ReleaseUncounted => {
            "UPDATE stevedore_jobs SET lease_until = NULL, lease_token = NULL,
                 deliveries = MAX(deliveries - 1, 0)
             WHERE id = ?1 AND lease_token = ?2"
        }
    };
    let mut s = c.prepare_cached(sql)?;
    let mut lost = 0;
    for (id, token) in items {
        if s.execute(params![id, token])? == 0 {
            lost += 1;
        }
    }
    Ok(lost)
}

/// A column as text, whatever a foreign producer stored (NULL and blobs included).
pub(crate) fn text(v: rusqlite::types::ValueRef<'_>) -> String {
    String::from_utf8(bytes(v))
        .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// A column as bytes, whatever a foreign producer stored (`sqlite3` inserts text literals).
pub(crate) fn bytes(v: rusqlite::types::ValueRef<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    append(&mut out, v);
    out
}
