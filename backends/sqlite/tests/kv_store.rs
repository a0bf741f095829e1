//! The state store contract on the SQLite file: two handles opened on one file, as two
//! processes on one machine would.

use std::sync::Arc;
use stevedore_sqlite::SqliteStore;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_store_holds_the_store_contract() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state.db");
    let a = SqliteStore::open(&path).await.expect("open");
    let b = SqliteStore::open(&path).await.expect("open");
    stevedore_conformance::store_contract(Arc::new(a), Arc::new(b)).await;
}
