//! What the SQLite store does that the conformance suite does not check: files it must refuse
//! (each error naming the path), a full store losing nothing, waking a waiting receive on another
//! handle's commit, and the schema version.

use std::path::Path;
use std::time::{Duration, Instant};
use stevedore_core::{Broker, BrokerError, Envelope, ReceiveOptions};
use stevedore_sqlite::{SqliteBroker, SqliteConfig};

fn opts(max: usize, wait: Duration) -> ReceiveOptions {
    ReceiveOptions {
        max,
        wait,
        lease: Duration::from_secs(30),
    }
}

async fn open(path: &Path) -> Result<SqliteBroker, BrokerError> {
    SqliteBroker::open(SqliteConfig::new(path)).await
}

#[track_caller]
fn refused(r: Result<SqliteBroker, BrokerError>, path: &Path, says: &str) {
    let err = r.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        err.contains(&path.display().to_string()),
        "names the path: {err}"
    );
    assert!(err.contains(says), "says {says:?}: {err}");
}

#[tokio::test]
async fn files_it_cannot_use_are_refused_naming_the_path() {
    let dir = tempfile::tempdir().expect("tempdir");

    let missing = dir.path().join("no/such/dir/jobs.db");
    refused(open(&missing).await, &missing, "directory");
    assert!(!missing.exists());

    let text = dir.path().join("notes.db");
    std::fs::write(
        &text,
        b"these are my notes, not a database, and they stay as they are",
    )
    .expect("write");
    refused(open(&text).await, &text, "is not a SQLite database");
    assert_eq!(
        std::fs::read(&text).expect("read"),
        b"these are my notes, not a database, and they stay as they are"
    );

    // A file a newer Stevedore wrote (schema version 99) is refused, and left as it is.
    let newer = dir.path().join("newer.db");
    {
        let b = open(&newer).await.expect("create");
        b.publish("q", vec![Envelope::new("j", "kept")])
            .await
            .expect("publish");
        b.close().await.expect("close");
        let c = rusqlite::Connection::open(&newer).expect("open");
        c.execute(
            "UPDATE stevedore_meta SET value = 99 WHERE key = 'schema_version'",
            [],
        )
        .expect("bump the version");
    }
    refused(
        open(&newer).await,
        &newer,
        "written by a newer Stevedore (schema version 99",
    );
    let c = rusqlite::Connection::open(&newer).expect("open");
    let n: i64 = c
        .query_row("SELECT COUNT(*) FROM stevedore_jobs", [], |r| r.get(0))
        .expect("count");
    assert_eq!(n, 1, "the refused file still holds its job");
}

#[tokio::test]
async fn a_full_store_refuses_the_publish_and_loses_nothing_committed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("small.db");
    let mut cfg = SqliteConfig::new(&path);
    cfg.max_size = Some(256 * 1024);
    let b = SqliteBroker::open(cfg).await.expect("open");
    let body = vec![7u8; 8 * 1024];
    let mut kept = Vec::new();
    let err = loop {
        let e = Envelope::new("j", body.clone());
        let id = e.id.clone();
        match b.publish("q", vec![e]).await {
            Ok(()) => kept.push(id),
            Err(err) => break err,
        }
        assert!(
            kept.len() < 1000,
            "a 256 KiB store took {} x 8 KiB",
            kept.len()
        );
    };
    assert!(
        err.to_string()
            .contains("broker.max_size of 262144 bytes reached"),
        "{err}"
    );
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
    assert!(err.is_transient(), "space may come back: {err:?}");
    assert!(!kept.is_empty());
    // Everything committed before is there, in order, and can be acked (acks free space).
    let mut got = Vec::new();
    while got.len() < kept.len() {
        let ds = b
            .receive("q", opts(100, Duration::ZERO))
            .await
            .expect("receive");
        assert!(
            !ds.is_empty(),
            "only {} of {} came back",
            got.len(),
            kept.len()
        );
        let receipts: Vec<_> = ds.iter().map(|d| d.receipt.clone()).collect();
        got.extend(ds.into_iter().map(|d| d.envelope.id));
        b.ack(&receipts).await.expect("ack on a full store");
    }
    assert_eq!(got, kept);
    b.publish("q", vec![Envelope::new("j", body)])
        .await
        .expect("room again after the acks");
}

#[tokio::test]
async fn a_waiting_receive_wakes_on_another_handles_commit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("wake.db");
    let consumer = open(&path).await.expect("open");
    // A second, separately opened store on the same file: what another process is.
    let producer = open(&path).await.expect("open again");
    for round in 0..3 {
        let waiting = {
            let c = consumer.clone();
            tokio::spawn(async move {
                let t = Instant::now();
                let got = c.receive("q", opts(1, Duration::from_secs(5))).await;
                (got, t)
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        producer
            .publish("q", vec![Envelope::new("j", format!("round {round}"))])
            .await
            .expect("publish");
        let committed = Instant::now();
        let (got, _) = waiting.await.expect("join");
        let got = got.expect("receive");
        let late = committed.elapsed();
        assert_eq!(got.len(), 1);
        // Polled every 50 ms, then a claim (a write, with its fsync); far below the 5 s wait.
        // The bound leaves room for a loaded 2-core machine.
        assert!(
            late < Duration::from_millis(1000),
            "woke {late:?} after the commit"
        );
        consumer.ack(&[got[0].receipt.clone()]).await.expect("ack");
    }
}

#[tokio::test]
async fn acked_rows_leave_the_table() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("trim.db");
    let b = open(&path).await.expect("open");
    let batch: Vec<_> = (0..500)
        .map(|i| Envelope::new("j", format!("{i}")))
        .collect();
    b.publish("q", batch).await.expect("publish");
    let mut n = 0;
    while n < 500 {
        let ds = b
            .receive("q", opts(100, Duration::ZERO))
            .await
            .expect("receive");
        n += ds.len();
        let rs: Vec<_> = ds.into_iter().map(|d| d.receipt).collect();
        b.ack(&rs).await.expect("ack");
    }
    let c = rusqlite::Connection::open(&path).expect("open");
    let rows: i64 = c
        .query_row("SELECT COUNT(*) FROM stevedore_jobs", [], |r| r.get(0))
        .expect("count");
    assert_eq!(
        rows, 0,
        "cost per job must not grow with the jobs ever processed"
    );
}

/// The two statements the README gives a non-Rust producer, run as written.
#[tokio::test]
async fn the_documented_plain_sqlite_inserts_reach_the_queue() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("stevedore.db");
    let b = open(&path).await.expect("create the schema");
    let statements = [
        r#"INSERT INTO stevedore_jobs (queue, body) VALUES ('emails', '{"to":"a@b.c"}')"#,
        r#"INSERT INTO stevedore_jobs (queue, headers, body) VALUES ('emails', '[["stevedore-job","send_email"]]', '{}')"#,
    ];
    // The sqlite3 shell where the machine has it (as the README runs them), else the same SQL
    // through another connection.
    let shell = std::process::Command::new("sqlite3")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    for sql in statements {
        if shell {
            let out = std::process::Command::new("sqlite3")
                .arg(&path)
                .arg(sql)
                .output()
                .expect("run sqlite3");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        } else {
            let c = rusqlite::Connection::open(&path).expect("a plain client");
            c.execute(sql, []).expect("the documented insert");
        }
    }
    let got = b
        .receive("emails", opts(10, Duration::from_secs(2)))
        .await
        .expect("receive");
    assert_eq!(got.len(), 2);
    assert_eq!(
        got[0].envelope.job, None,
        "no job: the queue's default_job runs it"
    );
    assert_eq!(&got[0].envelope.payload[..], br#"{"to":"a@b.c"}"#);
    assert_eq!(got[1].envelope.job.as_deref(), Some("send_email"));
    assert_eq!(got[1].delivery_count, 1);
    // Ids are stable per row (the message has none of its own).
    assert!(
        got[0].envelope.id.starts_with("sqlite-"),
        "{}",
        got[0].envelope.id
    );
}

/// A read-only store file is refused with a clear error naming it, and left as it was. Made
/// read-only with `chattr +i` (which binds root too: these tests run as root here, and root
/// ignores permission bits), or with `chmod 444` where the tests run as another user.
#[tokio::test]
async fn a_read_only_file_is_refused_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("frozen.db");
    {
        let b = open(&path).await.expect("create");
        b.publish("q", vec![Envelope::new("j", "kept")])
            .await
            .expect("publish");
        b.close().await.expect("close");
    }
    // Fold the WAL into the file, so the file alone holds the job.
    {
        let c = rusqlite::Connection::open(&path).expect("open");
        let _: (i64, i64, i64) = c
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .expect("checkpoint");
    }
    let immutable = std::process::Command::new("chattr")
        .arg("+i")
        .arg(&path)
        .status()
        .is_ok_and(|s| s.success());
    if !immutable {
        let mut perms = std::fs::metadata(&path).expect("metadata").permissions();
        perms.set_readonly(true);
        std::fs::set_permissions(&path, perms).expect("chmod");
        assert!(
            std::fs::OpenOptions::new()
                .append(true)
                .open(&path)
                .is_err(),
            "cannot make {} read-only here: chattr +i failed and this user writes read-only files",
            path.display()
        );
    }
    let refusal = open(&path).await;
    // Undo before asserting, so the temporary directory can always be removed.
    if immutable {
        let _ = std::process::Command::new("chattr")
            .arg("-i")
            .arg(&path)
            .status();
    }
    refused(refusal, &path, "is read-only");
    let c =
        rusqlite::Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .expect("open");
    let n: i64 = c
        .query_row("SELECT COUNT(*) FROM stevedore_jobs", [], |r| r.get(0))
        .expect("count");
    assert_eq!(n, 1, "the job is still there");
}

fn wal_size(db: &Path) -> u64 {
    let mut p = db.as_os_str().to_owned();
    p.push("-wal");
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wal_shrinks_back_after_a_burst_and_nothing_is_lost() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("jobs.db");
    let b = open(&path).await.expect("open");
    // One 40 MiB publish: the log must hold it whole until it commits.
    let big: Vec<Envelope> = (0..40)
        .map(|i| Envelope::new("big", vec![b'x'; 1024 * 1024]).with_header("n", i.to_string()))
        .collect();
    b.publish("burst", big).await.expect("publish");
    let high = wal_size(&path);
    assert!(
        high > 40 * 1024 * 1024,
        "the burst went through the log: {high}"
    );
    let mut left = 40;
    while left > 0 {
        let got = b
            .receive("burst", opts(10, Duration::ZERO))
            .await
            .expect("receive");
        assert!(!got.is_empty(), "{left} still to come");
        left -= got.len();
        let r: Vec<_> = got.into_iter().map(|d| d.receipt).collect();
        b.ack(&r).await.expect("ack");
    }
    // Ordinary small commits afterwards: the log restarts and is cut back to its limit.
    for _ in 0..200 {
        b.publish("small", vec![Envelope::new("small", &b"{}"[..])])
            .await
            .expect("publish");
    }
    assert_eq!(b.depth("small").await.expect("depth").ready, 200);
    let after = wal_size(&path);
    assert!(
        after <= 17 * 1024 * 1024,
        "the log is cut back after the burst: {after} bytes (was {high})"
    );
    b.close().await.expect("close");
    let again = open(&path).await.expect("reopen");
    let d = again.depth("small").await.expect("depth");
    assert_eq!(d.ready, 200, "everything committed is in the file");
    again.close().await.expect("close");
}
