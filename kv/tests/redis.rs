//! Redis buckets against Debian's redis-server.

use std::sync::Arc;

use baton_kv::RedisBucket;
use baton_testkit::redis::Redis;
use baton_wasm_shim::{Bucket, KvError};

#[tokio::test]
async fn two_handles_on_one_redis_bucket_share_its_counter() {
    let redis = Redis::start().unwrap();
    let a: Arc<dyn Bucket> = Arc::new(RedisBucket::new("shared", &redis.url(), 16).unwrap());
    let b: Arc<dyn Bucket> = Arc::new(RedisBucket::new("shared", &redis.url(), 16).unwrap());
    // Concurrent increments from both are each counted once.
    let mut tasks = Vec::new();
    for bucket in [a.clone(), b.clone()] {
        tasks.push(tokio::spawn(async move {
            for _ in 0..50 {
                bucket.increment("hits", 1).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(a.get("hits").await.unwrap().as_deref(), Some(&b"100"[..]));
    assert_eq!(b.increment("hits", 1).await.unwrap(), 101);
    // A value past the cap is refused before it is sent; the rest is intact.
    assert!(matches!(
        a.set("big", vec![1; 17]).await,
        Err(KvError::Full { cap: 16, .. })
    ));
    a.set("text", b"hello".to_vec()).await.unwrap();
    assert!(matches!(
        a.increment("text", 1).await,
        Err(KvError::NotACounter { .. })
    ));
    assert!(b.exists("text").await.unwrap());
    // Compare-and-swap: one of two racing swaps from the same value wins.
    assert!(a
        .swap_if("text", Some(b"hello".to_vec()), b"a".to_vec())
        .await
        .unwrap());
    assert!(!b
        .swap_if("text", Some(b"hello".to_vec()), b"b".to_vec())
        .await
        .unwrap());
    assert!(b.swap_if("fresh", None, b"1".to_vec()).await.unwrap());
    assert!(!a.swap_if("fresh", None, b"2".to_vec()).await.unwrap());
    b.delete("fresh").await.unwrap();
    assert_eq!(a.get("text").await.unwrap().as_deref(), Some(&b"a"[..]));
    let (mut keys, _) = b.list_keys(None).await.unwrap();
    keys.sort();
    assert_eq!(keys, ["hits", "text"]);
    b.delete("text").await.unwrap();
    assert!(!a.exists("text").await.unwrap());
}

#[tokio::test]
async fn a_dead_redis_is_an_error_to_the_guest_not_a_hang() {
    let redis = Redis::start().unwrap();
    let url = redis.url();
    drop(redis);
    let b = RedisBucket::new("gone", &url, 16).unwrap();
    let err = b.get("k").await.unwrap_err();
    assert!(matches!(err, KvError::Backend(_)), "{err}");
}
