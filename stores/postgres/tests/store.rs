//! The state store contract against the machine's PostgreSQL (127.0.0.1:5432, database `test`,
//! trust auth; `DATABASE_URL` overrides), through two pools, in a table of this run's own that
//! is dropped at the end.

use std::sync::Arc;
use stevedore_postgres::PostgresStore;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_holds_the_store_contract() {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let table = format!("stevedore_kv_{}", std::process::id());
    let a = PostgresStore::connect(&url, &table).await.expect("connect");
    let b = PostgresStore::connect(&url, &table).await.expect("connect");
    stevedore_conformance::store_contract(Arc::new(a), Arc::new(b)).await;
    let pool = sqlx::PgPool::connect(&url).await.expect("connect");
    let left: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {table} WHERE expires_at IS NULL OR expires_at > now()"
    ))
    .fetch_one(&pool)
    .await
    .expect("count");
    sqlx::query(&format!("DROP TABLE {table}"))
        .execute(&pool)
        .await
        .expect("drop");
    assert!(left <= 1, "{left} live keys left behind");
}

#[tokio::test]
async fn a_bad_url_or_a_server_that_is_not_there_is_a_clear_error() {
    let e = PostgresStore::connect("postgres://postgres@127.0.0.1:1/test", "kv")
        .await
        .expect_err("nothing listens on port 1");
    assert!(e.is_transient(), "{e}");
    assert!(
        e.to_string()
            .contains("cannot connect to postgres://postgres@127.0.0.1:1/test"),
        "{e}"
    );
    let e = PostgresStore::connect("postgres://u:secret@127.0.0.1:1/test", "kv")
        .await
        .expect_err("nothing listens on port 1");
    assert!(!e.to_string().contains("secret"), "{e}");
}
