//! The transactional outbox on the machine's PostgreSQL (127.0.0.1:5432, or `DATABASE_URL`),
//! relaying to the embedded SQLite broker:
//! - rolled-back transactions enqueue nothing, committed ones everything;
//! - 10,000 relay crashes between publishing a batch and marking it lose no row, duplicate
//!   exactly the rows of the crashed batches, and an idempotent worker runs each job once;
//! - two relays at once publish no row twice;
//! - a row the broker refuses for good is set aside with its error and does not block the rest.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use stevedore::outbox::relay_one_batch;
use stevedore::outbox::sqlx::{self, postgres::PgPoolOptions, PgPool};
use stevedore::{config, Client, JobContext, Router, State, Worker};
use stevedore_core::store::MemoryStore;
use stevedore_core::{new_id, Broker, Priority, ReceiveOptions};
use stevedore_postgres::outbox::Outbox;
use stevedore_sqlite::{Durability, SqliteBroker, SqliteConfig};

fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string())
}

async fn pool() -> PgPool {
    PgPoolOptions::new()
        .max_connections(8)
        .connect(&database_url())
        .await
        .expect("PostgreSQL at DATABASE_URL or postgres://postgres@127.0.0.1:5432/test")
}

/// A fresh outbox table (dropped at the end by the caller) and a SQLite broker in `dir`.
async fn setup(dir: &tempfile::TempDir) -> (PgPool, Outbox, Arc<dyn Broker>, String) {
    let pool = pool().await;
    let table = format!("outbox_t_{}", new_id().replace('-', "").to_lowercase());
    let outbox = Outbox::new(pool.clone(), &table).await.expect("outbox");
    let mut cfg = SqliteConfig::new(dir.path().join("jobs.db"));
    cfg.durability = Durability::Normal;
    let broker: Arc<dyn Broker> = Arc::new(SqliteBroker::open(cfg).await.expect("sqlite"));
    (pool, outbox, broker, table)
}

async fn drop_table(pool: &PgPool, table: &str) {
    let _ = sqlx::query(&format!("DROP TABLE IF EXISTS {table}"))
        .execute(pool)
        .await;
}

fn client(broker: &Arc<dyn Broker>, table: &str) -> Client {
    let cfg = config::from_toml_str(
        &format!(
            "[outbox]\nurl = \"{}\"\ntable = \"{table}\"\n",
            database_url()
        ),
        None,
    )
    .expect("config");
    Client::new(broker.clone()).with_limits_from(&cfg)
}

/// Enqueues `per_tx` jobs in each of `txs` transactions, committing or rolling back; returns
/// the ids.
async fn enqueue_in_transactions(
    pool: &PgPool,
    client: &Client,
    job: &str,
    txs: usize,
    per_tx: usize,
    commit: bool,
) -> Vec<String> {
    let mut ids = Vec::new();
    for t in 0..txs {
        let mut tx = pool.begin().await.expect("begin");
        for k in 0..per_tx {
            let id = client
                .enqueue(job, &serde_json::json!({"t": t, "k": k}))
                .queue("orders")
                .within(&mut tx)
                .await
                .expect("within");
            ids.push(id);
        }
        if commit {
            tx.commit().await.expect("commit");
        } else {
            tx.rollback().await.expect("rollback");
        }
    }
    ids
}

/// Every message now ready on the broker's `orders` queue: (id, job) per message, drained.
async fn drain(broker: &Arc<dyn Broker>) -> Vec<(String, String)> {
    let mut out = Vec::new();
    loop {
        let got = broker
            .receive(
                "orders",
                ReceiveOptions {
                    max: 100,
                    wait: Duration::ZERO,
                    lease: Duration::from_secs(60),
                },
            )
            .await
            .expect("receive");
        if got.is_empty() {
            return out;
        }
        let receipts: Vec<_> = got.iter().map(|d| d.receipt.clone()).collect();
        for d in got {
            out.push((d.envelope.id, d.envelope.job.unwrap_or_default()));
        }
        broker.ack(&receipts).await.expect("ack");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_relay_crashes_lose_nothing_and_the_inbox_runs_each_job_once() {
    let dir = tempfile::tempdir().expect("tmp");
    let (pool, outbox, broker, table) = setup(&dir).await;
    broker
        .prepare(&["orders".into(), "orders__dlq".into()])
        .await
        .expect("prepare");
    let client = client(&broker, &table);

    // 1,000 rolled-back transactions with an enqueue inside: nothing.
    let rolled = enqueue_in_transactions(&pool, &client, "rolled_back", 1000, 1, false).await;
    assert_eq!(outbox.pending().await.expect("pending").rows, 0);
    // 10,000 jobs in 1,000 committed transactions.
    let committed = enqueue_in_transactions(&pool, &client, "order", 1000, 10, true).await;
    assert_eq!(outbox.pending().await.expect("pending").rows, 10_000);

    // The relay's own round, with a crash between publish and mark in 10,000 rounds: the
    // batch's transaction is dropped uncommitted (as a killed relay's connection is), so its
    // rows stay and come again.
    let mut crashes = 0u32;
    let mut crashed_rows = 0usize;
    let mut rounds = 0u32;
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    loop {
        let max = 1 + (next() % 4) as usize;
        let crash = crashes < 10_000 && next() % 4 != 0;
        let Some(round) = relay_one_batch(&outbox, &client, max, !crash)
            .await
            .expect("relay round")
        else {
            break;
        };
        rounds += 1;
        assert_eq!(round.published, round.taken, "the broker took every row");
        if crash {
            crashes += 1;
            crashed_rows += round.taken;
        }
    }
    assert_eq!(crashes, 10_000, "the relay crashed 10,000 times");
    assert_eq!(outbox.pending().await.expect("pending").rows, 0);
    let depth = broker.depth("orders").await.expect("depth");
    assert_eq!(
        depth.ready as usize,
        10_000 + crashed_rows,
        "every row once, plus exactly the rows of crashed batches again"
    );

    // An idempotent worker (one job at a time, so copies never meet mid-run) runs each once.
    let cfg = config::from_toml_str(
        "[http]\nenabled = false\n[worker]\nconcurrency = 1\npoll_wait = \"50ms\"\n\
         [queues.orders]\nconcurrency = 1\nbatch = 64\nidempotent = true\n",
        None,
    )
    .expect("config");
    let runs: Arc<Mutex<BTreeMap<String, u32>>> = Arc::default();
    async fn count(State(runs): State<Arc<Mutex<BTreeMap<String, u32>>>>, ctx: JobContext) {
        if let Ok(mut r) = runs.lock() {
            *r.entry(ctx.id).or_default() += 1;
        }
    }
    let router = Router::with_state(runs.clone())
        .route("order", count)
        .route("rolled_back", count);
    let worker = Worker::new(broker.clone(), router, cfg)
        .expect("worker")
        .with_store(Arc::new(MemoryStore::new()));
    let stats = worker.stats();
    let stop = worker.shutdown_handle();
    let run = tokio::spawn(worker.run());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(240);
    loop {
        let q = stats.snapshot().remove("orders").unwrap_or_default();
        if (q.processed + q.duplicates) as usize >= 10_000 + crashed_rows {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "worker stalled: {q:?} of {} messages",
            10_000 + crashed_rows
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // (The worker closes the broker handle when it stops: look first. Acks are flushed in
    // batches just after the counters move: allow them a moment.)
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left = broker.depth("orders").await.expect("depth");
        if (left.ready, left.in_flight) == (0, 0) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the queue is not empty 10s after the last job: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.shutdown();
    run.await.expect("task").expect("run");
    let q = stats.snapshot().remove("orders").unwrap_or_default();
    let runs = runs.lock().expect("runs").clone();
    assert_eq!(runs.len(), 10_000, "every committed job ran");
    assert!(runs.values().all(|&n| n == 1), "a job ran twice");
    assert!(
        committed.iter().all(|id| runs.contains_key(id)),
        "ran exactly the committed jobs"
    );
    assert!(rolled.iter().all(|id| !runs.contains_key(id)));
    assert_eq!(
        (q.processed as usize, q.duplicates as usize),
        (10_000, crashed_rows),
        "each duplicate recognized by the inbox"
    );
    eprintln!(
        "outbox: 10,000 committed jobs, 1,000 rolled back; {rounds} relay rounds, {crashes} crashes \
         between publish and mark, {crashed_rows} extra publishes of rows from crashed batches; worker ran 10,000 once \
         each and skipped {} duplicates",
        q.duplicates
    );
    drop_table(&pool, &table).await;
}

/// Two relays at once, never crashing: every row is published exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_at_once_publish_each_row_once() {
    let dir = tempfile::tempdir().expect("tmp");
    let (pool, outbox, broker, table) = setup(&dir).await;
    broker.prepare(&["orders".into()]).await.expect("prepare");
    let client = client(&broker, &table);
    let ids = enqueue_in_transactions(&pool, &client, "order", 100, 20, true).await;
    let mut relays = Vec::new();
    for _ in 0..2 {
        let (outbox, client) = (outbox.clone(), client.clone());
        relays.push(tokio::spawn(async move {
            let mut n = 0;
            while let Some(batch) = outbox.take(10).await.expect("take") {
                let envs: Vec<_> = batch.jobs.iter().map(|(_, e)| e.clone()).collect();
                n += envs.len();
                client.publish("orders", envs).await.expect("publish");
                batch.done().await.expect("done");
            }
            n
        }));
    }
    let mut per_relay = Vec::new();
    for r in relays {
        per_relay.push(r.await.expect("relay"));
    }
    let got = drain(&broker).await;
    let distinct: std::collections::BTreeSet<_> = got.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(
        got.len(),
        2_000,
        "published once each (relays took {per_relay:?})"
    );
    assert_eq!(distinct.len(), 2_000);
    assert!(ids.iter().all(|id| distinct.contains(id)));
    assert!(
        per_relay.iter().all(|&n| n > 0),
        "both relays worked: {per_relay:?}"
    );
    drop_table(&pool, &table).await;
}

/// The worker's own relay (`[outbox]` in its config) publishes committed jobs within moments,
/// woken by the commit; a row the broker refuses (over its payload limit) is set aside with
/// its error while the rows behind it go through; `stats`' counts say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_workers_relay_publishes_on_commit_and_sets_aside_what_the_broker_refuses() {
    let dir = tempfile::tempdir().expect("tmp");
    let pool = pool().await;
    let table = format!("outbox_t_{}", new_id().replace('-', "").to_lowercase());
    let mut scfg = SqliteConfig::new(dir.path().join("jobs.db"));
    scfg.max_payload = 1024;
    let broker: Arc<dyn Broker> = Arc::new(SqliteBroker::open(scfg).await.expect("sqlite"));
    let toml = format!(
        "[http]\nenabled = false\n[worker]\npoll_wait = \"50ms\"\n\
         [outbox]\nurl = \"{}\"\ntable = \"{table}\"\npoll = \"10s\"\n\
         [queues.orders]\ntrack_status = true\n",
        database_url()
    );
    let cfg = config::from_toml_str(&toml, None).expect("config");
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    async fn note(State(seen): State<Arc<Mutex<Vec<String>>>>, ctx: JobContext) {
        if let Ok(mut s) = seen.lock() {
            s.push(ctx.id);
        }
    }
    let store = Arc::new(MemoryStore::new());
    let worker = Worker::new(
        broker.clone(),
        Router::with_state(seen.clone()).route("order", note),
        cfg.clone(),
    )
    .expect("worker")
    .with_store(store.clone());
    let producer = Client::new(broker.clone())
        .with_limits_from(&cfg)
        .with_store(store);
    let stop = worker.shutdown_handle();
    let run = tokio::spawn(worker.run());
    // The relay creates the table when it starts.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(&table)
            .fetch_one(&pool)
            .await
            .expect("query");
        if exists {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no outbox table");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut tx = pool.begin().await.expect("begin");
    // Within checks the payload against the broker: refused at once.
    let refused_now = producer
        .enqueue_bytes("order", vec![b'x'; 4096])
        .queue("orders")
        .within(&mut tx)
        .await;
    assert!(
        matches!(
            refused_now,
            Err(stevedore::EnqueueError::Broker(
                stevedore::BrokerError::PayloadTooLarge { .. }
            ))
        ),
        "{refused_now:?}"
    );
    tx.rollback().await.expect("rollback");
    let mut tx = pool.begin().await.expect("begin");
    // A row another producer wrote by hand, larger than this broker takes: set aside at relay.
    let too_big = new_id();
    sqlx::query(&format!(
        "INSERT INTO {table} (queue, job_id, headers, payload) VALUES ('orders', $1, $2::jsonb, $3)"
    ))
    .bind(&too_big)
    .bind(serde_json::json!({"stevedore-id": too_big, "stevedore-job": "order"}).to_string())
    .bind(vec![b'x'; 4096])
    .execute(&mut *tx)
    .await
    .expect("a hand-written row");
    let mut ok = Vec::new();
    for i in 0..3 {
        ok.push(
            producer
                .enqueue("order", &i)
                .queue("orders")
                .priority(Priority::Normal)
                .within(&mut tx)
                .await
                .expect("within"),
        );
    }
    let committed_at = tokio::time::Instant::now();
    tx.commit().await.expect("commit");
    // Woken by the commit, not the 10 s poll.
    while seen.lock().map(|s| s.len()).unwrap_or(0) < 3 {
        assert!(
            committed_at.elapsed() < Duration::from_secs(5),
            "the relay did not publish within 5 s of the commit"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = committed_at.elapsed();
    let mut ran = seen.lock().expect("seen").clone();
    ran.sort();
    ok.sort();
    assert_eq!(ran, ok, "the rows behind the refused one went through");
    let outbox = Outbox::new(pool.clone(), &table).await.expect("outbox");
    let p = outbox.pending().await.expect("pending");
    assert_eq!((p.rows, p.refused), (0, 1));
    let error: String = sqlx::query_scalar(&format!("SELECT error FROM {table} WHERE job_id = $1"))
        .bind(&too_big)
        .fetch_one(&pool)
        .await
        .expect("the refused row stays");
    assert!(error.contains("1024"), "its error says why: {error}");
    let status = producer.status(&ok[0]).await.expect("status");
    assert_eq!(
        status.map(|s| s.state),
        Some(stevedore::JobState::Succeeded),
        "relayed jobs are tracked like any other"
    );
    stop.shutdown();
    run.await.expect("task").expect("run");
    eprintln!("outbox: the worker's relay published 3 jobs {took:?} after the commit");
    drop_table(&pool, &table).await;
}
