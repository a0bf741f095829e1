//! The state store's contract ([`stevedore_core::store::Store`]), run against each store on its
//! real server: [`store_contract`] takes two independent handles (two connections, as two worker
//! processes would hold) and panics with what broke.

use std::sync::Arc;
use std::time::Duration;
use stevedore_core::new_id;
use stevedore_core::store::{Store, MAX_KEY, MAX_VALUE};

/// Runs every scenario of the store contract on `a` and `b`, two handles on one store.
///
/// Checks: absent keys; plain sets (with a TTL, and deletes); set-if-absent, compare-and-swap and delete-if-equal from both handles;
/// exactly one winner among 32 concurrent claims of one key split over both handles; expiry on
/// the store's clock (a TTL'd value disappears, a swap from `None` then wins, a renewed TTL
/// keeps it); binary values and the size limits ([`MAX_KEY`], [`MAX_VALUE`]).
pub async fn store_contract(a: Arc<dyn Store>, b: Arc<dyn Store>) {
    let k = format!("contract:k-{}", new_id());
    let ttl = Some(Duration::from_secs(60));

    // Absent.
    assert_eq!(a.get(&k).await.expect("get"), None, "a fresh key is absent");
    assert!(
        a.swap(&k, None, None, None).await.expect("swap"),
        "deleting an absent key expecting absence succeeds"
    );
    assert!(
        !a.swap(&k, Some(b"x"), Some(b"y"), None)
            .await
            .expect("swap"),
        "a swap expecting a value fails on an absent key"
    );

    // Set if absent: first wins, the second sees the first's value.
    assert!(a.swap(&k, None, Some(b"one"), ttl).await.expect("swap"));
    assert!(!b.swap(&k, None, Some(b"two"), ttl).await.expect("swap"));
    assert_eq!(b.get(&k).await.expect("get").as_deref(), Some(&b"one"[..]));
    // Compare and swap from the other handle.
    assert!(!b
        .swap(&k, Some(b"two"), Some(b"three"), ttl)
        .await
        .expect("swap"));
    assert!(b
        .swap(&k, Some(b"one"), Some(b"three"), ttl)
        .await
        .expect("swap"));
    assert_eq!(
        a.get(&k).await.expect("get").as_deref(),
        Some(&b"three"[..])
    );
    // Delete only if equal.
    assert!(!a.swap(&k, Some(b"one"), None, None).await.expect("swap"));
    assert!(a.swap(&k, Some(b"three"), None, None).await.expect("swap"));
    assert_eq!(b.get(&k).await.expect("get"), None);

    // A plain set overwrites whatever is there, from either handle, and deletes.
    a.set(&k, Some(b"set-1"), ttl).await.expect("set");
    assert_eq!(
        b.get(&k).await.expect("get").as_deref(),
        Some(&b"set-1"[..])
    );
    b.set(&k, Some(b"set-2"), Some(Duration::from_millis(300)))
        .await
        .expect("set");
    assert_eq!(
        a.get(&k).await.expect("get").as_deref(),
        Some(&b"set-2"[..])
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(a.get(&k).await.expect("get"), None, "a set's TTL holds");
    a.set(&k, Some(b"set-3"), None).await.expect("set");
    b.set(&k, None, None).await.expect("set");
    assert_eq!(a.get(&k).await.expect("get"), None, "set None deletes");
    b.set(&k, None, None)
        .await
        .expect("deleting an absent key is fine");

    // Exactly one winner among concurrent claims over both handles.
    let race = format!("contract:race-{}", new_id());
    let mut tasks = Vec::new();
    for i in 0..32u8 {
        let s = if i % 2 == 0 { a.clone() } else { b.clone() };
        let key = race.clone();
        tasks.push(tokio::spawn(async move {
            s.swap(&key, None, Some(&[i]), Some(Duration::from_secs(60)))
                .await
                .expect("swap")
        }));
    }
    let mut winners = 0;
    for t in tasks {
        winners += usize::from(t.await.expect("task"));
    }
    assert_eq!(winners, 1, "exactly one of 32 concurrent claims wins");
    // And concurrent increments by compare-and-swap lose none.
    let counter = format!("contract:counter-{}", new_id());
    let mut tasks = Vec::new();
    for i in 0..8 {
        let s = if i % 2 == 0 { a.clone() } else { b.clone() };
        let key = counter.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..5 {
                loop {
                    let cur = s.get(&key).await.expect("get");
                    let n: u32 = cur
                        .as_deref()
                        .map(|v| String::from_utf8_lossy(v).parse().expect("number"))
                        .unwrap_or(0);
                    let next = (n + 1).to_string();
                    if s.swap(&key, cur.as_deref(), Some(next.as_bytes()), None)
                        .await
                        .expect("swap")
                    {
                        break;
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    assert_eq!(
        a.get(&counter).await.expect("get").as_deref(),
        Some(&b"40"[..]),
        "40 compare-and-swap increments from 8 tasks over two handles"
    );
    a.swap(&counter, Some(b"40"), None, None)
        .await
        .expect("swap");

    // Expiry on the store's clock.
    let e = format!("contract:ttl-{}", new_id());
    // Each step has 0.8 s of slack for a slow round trip (a loaded machine, an fsync).
    let short = Some(Duration::from_millis(2000));
    assert!(a.swap(&e, None, Some(b"lease"), short).await.expect("swap"));
    assert!(!b.swap(&e, None, Some(b"other"), short).await.expect("swap"));
    // Renewing (a swap from itself to itself) pushes the end out.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(a
        .swap(&e, Some(b"lease"), Some(b"lease"), short)
        .await
        .expect("swap"));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        b.get(&e).await.expect("get").as_deref(),
        Some(&b"lease"[..]),
        "a renewed value lives on past its first TTL"
    );
    tokio::time::sleep(Duration::from_millis(2200)).await;
    assert_eq!(b.get(&e).await.expect("get"), None, "expired");
    assert!(
        !a.swap(&e, Some(b"lease"), Some(b"lease"), short)
            .await
            .expect("swap"),
        "an expired lease cannot be renewed"
    );
    assert!(
        b.swap(&e, None, Some(b"other"), None).await.expect("swap"),
        "a swap from absent wins over an expired value"
    );
    assert_eq!(
        a.get(&e).await.expect("get").as_deref(),
        Some(&b"other"[..])
    );
    b.swap(&e, Some(b"other"), None, None).await.expect("swap");

    // Binary values and the limits every store must take.
    let big_key = format!("contract:big-{}:{}", new_id(), "k".repeat(MAX_KEY - 64));
    assert!(big_key.len() <= MAX_KEY);
    let value: Vec<u8> = (0..MAX_VALUE).map(|i| (i % 256) as u8).collect();
    assert!(a
        .swap(&big_key, None, Some(&value), ttl)
        .await
        .expect("swap"));
    assert_eq!(b.get(&big_key).await.expect("get"), Some(value.clone()));
    assert!(b
        .swap(&big_key, Some(&value), None, None)
        .await
        .expect("swap"));
}
