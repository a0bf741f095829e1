//! The state store contract against the machine's Redis (127.0.0.1:6379; `REDIS_URL`
//! overrides), through two connections, with a key prefix of this run's own that is emptied at
//! the end.

use std::sync::Arc;
use stevedore_redis::RedisStore;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_holds_the_store_contract() {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into());
    let prefix = stevedore_conformance::run_prefix(':');
    let a = RedisStore::connect(&url, &prefix).await.expect("connect");
    let b = RedisStore::connect(&url, &prefix).await.expect("connect");
    stevedore_conformance::store_contract(Arc::new(a), Arc::new(b)).await;
    // Nothing is left behind: the contract deletes what it does not let expire.
    let client = redis::Client::open(url.as_str()).expect("url");
    let mut c = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut c)
        .await
        .expect("keys");
    for k in &keys {
        let _: () = redis::cmd("DEL")
            .arg(k)
            .query_async(&mut c)
            .await
            .expect("del");
    }
    assert!(keys.len() <= 1, "left behind: {keys:?}");
}
