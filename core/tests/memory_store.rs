//! The state store contract on the in-memory store (two clones share one state, as two handles
//! of one process would).

use std::sync::Arc;
use stevedore_core::store::MemoryStore;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store_holds_the_store_contract() {
    let store = MemoryStore::new();
    stevedore_conformance::store_contract(Arc::new(store.clone()), Arc::new(store)).await;
}
