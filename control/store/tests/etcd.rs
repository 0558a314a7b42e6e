//! The store over an external etcd: Debian's etcd-server, with client TLS and client
//! certificate authentication, behind the same [`Store`] API as the embedded store.
//! Everything the API server relies on holds: conditional writes, reads at a revision,
//! paged ranges, ordered watches with previous values and progress, compaction and its
//! errors. A client without the right certificate is refused, and a lost etcd is an
//! error, never a hang.

use std::path::Path;
use std::time::Duration;

use baton_store::{
    Compare, CompareOp, Error, EtcdConfig, EtcdTls, EventKind, Op, OpResult, Precondition,
    RangeRequest, ReadOptions, Store, StoreCa, Txn, WatchEvent, MAX_VALUE_BYTES,
};
use baton_testkit::etcd::{Etcd, ServingTls};

/// An etcd that serves TLS and takes only clients with a certificate from `ca`.
fn tls_etcd(dir: &Path, ca: &StoreCa) -> Etcd {
    let server = ca.member(1, &["127.0.0.1"]).unwrap();
    let (cert, key) = server.cert_and_key_pem();
    std::fs::write(dir.join("etcd.crt"), cert).unwrap();
    std::fs::write(dir.join("etcd.key"), key).unwrap();
    std::fs::write(dir.join("ca.crt"), &ca.cert_pem).unwrap();
    Etcd::start_tls(ServingTls {
        cert: &dir.join("etcd.crt"),
        key: &dir.join("etcd.key"),
        client_ca: &dir.join("ca.crt"),
    })
    .unwrap()
}

fn config(etcd: &Etcd, ca_pem: &str, identity: Option<(String, String)>) -> EtcdConfig {
    let hosts = etcd.url().trim_start_matches("https://");
    let tls = EtcdTls {
        ca_pem: ca_pem.as_bytes().to_vec(),
        identity: identity.map(|(c, k)| (c.into_bytes(), k.into_bytes())),
    };
    let mut cfg = EtcdConfig::from_url(&format!("etcd://{hosts}"), Some(tls)).unwrap();
    cfg.progress_interval = Duration::from_millis(200);
    cfg.request_timeout = Duration::from_secs(3);
    cfg
}

fn client_identity(ca: &StoreCa) -> Option<(String, String)> {
    let client = ca.client("baton-apiserver").unwrap();
    let (c, k) = client.cert_and_key_pem();
    Some((c.to_string(), k.to_string()))
}

async fn next_event(w: &mut baton_store::Watch) -> WatchEvent {
    tokio::time::timeout(Duration::from_secs(10), w.next())
        .await
        .expect("a watch event within 10 s")
        .expect("the watch is open")
        .expect("an event, not an error")
}

/// The next change a watch delivers, skipping progress reports.
async fn next_change(w: &mut baton_store::Watch) -> baton_store::RevisionEvents {
    loop {
        if let WatchEvent::Events(e) = next_event(w).await {
            return e;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_behind_the_store_api_keeps_its_semantics() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let ca = StoreCa::generate().unwrap();
    let etcd = tls_etcd(dir.path(), &ca);
    let store = Store::open_etcd(config(&etcd, &ca.cert_pem, client_identity(&ca)))
        .await
        .unwrap();
    assert!(store.is_external());
    store.health().unwrap();
    assert!(store.status().leader.is_some(), "{:?}", store.status());

    // Conditional writes: create, conflict, update at the right revision.
    let r1 = store
        .put_if("/registry/a", "one", Precondition::Absent)
        .await
        .unwrap();
    match store.put_if("/registry/a", "x", Precondition::Absent).await {
        Err(Error::Conflict {
            current_revision, ..
        }) => assert_eq!(current_revision, r1),
        other => panic!("expected a conflict, got {other:?}"),
    }
    let r2 = store
        .put_if("/registry/a", "two", Precondition::ModRevision(r1))
        .await
        .unwrap();
    assert!(r2 > r1);
    assert!(store.local_revision() >= r2);
    let kv = store
        .get(b"/registry/a", ReadOptions::default())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (
            kv.value.as_slice(),
            kv.create_revision,
            kv.mod_revision,
            kv.version
        ),
        (&b"two"[..], r1, r2, 2)
    );
    // A read at a past revision sees the past.
    let old = store
        .get(
            b"/registry/a",
            ReadOptions {
                revision: r1,
                serializable: false,
            },
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(old.value, b"one");

    // A transaction: compares on value, and what each op returns.
    let resp = store
        .txn(
            Txn::new()
                .when([Compare::value("/registry/a", "two")])
                .and_then([
                    Op::put("/registry/b", "bee"),
                    Op::get("/registry/a"),
                    Op::delete("/registry/nothing"),
                ]),
        )
        .await
        .unwrap();
    assert!(resp.succeeded);
    let r3 = resp.revision;
    assert!(matches!(&resp.results[0], OpResult::Put { prev: None }));
    assert!(matches!(&resp.results[1], OpResult::Get { kv: Some(kv) } if kv.value == b"two"));
    assert!(matches!(&resp.results[2], OpResult::Delete { prev: None }));
    let failed = store
        .txn(
            Txn::new()
                .when([Compare::mod_revision("/registry/a", CompareOp::Less, r1)])
                .and_then([Op::put("/registry/c", "never")])
                .or_else([Op::get("/registry/b")]),
        )
        .await
        .unwrap();
    assert!(!failed.succeeded);
    assert!(matches!(&failed.results[0], OpResult::Get { kv: Some(kv) } if kv.value == b"bee"));

    // Input the store refuses before etcd sees it.
    assert!(matches!(
        store
            .put("/registry/big", vec![0u8; MAX_VALUE_BYTES + 1])
            .await,
        Err(Error::ValueTooLarge { .. })
    ));
    assert!(matches!(
        store.put("", "x").await,
        Err(Error::InvalidKey { .. })
    ));

    // A paged range under a prefix, at one revision, leaving out its neighbours.
    for i in 0..5 {
        store
            .put(format!("/registry/pods/p{i}"), format!("{i}"))
            .await
            .unwrap();
    }
    store.put("/registry/pods0", "neighbour").await.unwrap();
    let mut req = RangeRequest::prefix("/registry/pods/");
    req.limit = 2;
    let mut keys = Vec::new();
    loop {
        let page = store.range(req.clone()).await.unwrap();
        assert!(page.kvs.len() <= 2);
        keys.extend(
            page.kvs
                .iter()
                .map(|kv| String::from_utf8(kv.key.clone()).unwrap()),
        );
        if !page.more {
            break;
        }
        req.revision = page.revision;
        req.start_after = page.kvs.last().map(|kv| kv.key.clone());
    }
    assert_eq!(
        keys,
        (0..5)
            .map(|i| format!("/registry/pods/p{i}"))
            .collect::<Vec<_>>()
    );

    // A watch from the past: every change in order, one revision's changes together,
    // with the previous value of updates and deletes.
    let mut w = store.watch("/registry/", r2).unwrap();
    let first = next_change(&mut w).await;
    assert_eq!(first.revision, r2);
    assert_eq!(first.events[0].kind, EventKind::Put);
    assert_eq!(
        first.events[0].prev_kv.as_ref().map(|kv| kv.value.clone()),
        Some(b"one".to_vec())
    );
    assert_eq!(next_change(&mut w).await.revision, r3);
    let both = store
        .txn(Txn::new().and_then([Op::put("/registry/x", "1"), Op::delete("/registry/b")]))
        .await
        .unwrap();
    loop {
        let change = next_change(&mut w).await;
        if change.revision < both.revision {
            continue;
        }
        assert_eq!(change.revision, both.revision);
        assert_eq!(change.events.len(), 2, "one revision, one delivery");
        assert_eq!(change.events[1].kind, EventKind::Delete);
        assert_eq!(
            change.events[1].prev_kv.as_ref().map(|kv| kv.value.clone()),
            Some(b"bee".to_vec())
        );
        break;
    }
    // An idle watch reports progress up to the newest revision.
    let now = store.local_revision();
    loop {
        if let WatchEvent::Progress(rev) = next_event(&mut w).await {
            assert!(rev >= now, "progress {rev} behind {now}");
            break;
        }
    }
    // A watch from now on sees only what comes after. Its "now" is when etcd created it,
    // which its first progress report tells; a write before that may precede it.
    let mut live = store.watch("/registry/live/", 0).unwrap();
    while !matches!(next_event(&mut live).await, WatchEvent::Progress(_)) {}
    let written = store.put("/registry/live/k", "v").await.unwrap();
    assert_eq!(next_change(&mut live).await.revision, written);

    // Compaction: reads and watches below the floor fail with the floor named.
    let floor = store.local_revision();
    assert_eq!(store.compact(floor).await.unwrap(), floor);
    let at_old = ReadOptions {
        revision: r1,
        serializable: false,
    };
    match store.get(b"/registry/a", at_old).await {
        Err(Error::Compacted {
            requested,
            compact_revision,
        }) => assert_eq!((requested, compact_revision), (r1, floor)),
        other => panic!("expected compacted, got {other:?}"),
    }
    assert!(matches!(
        store.compact(r1).await,
        Err(Error::Compacted { .. })
    ));
    let mut stale = store.watch("/registry/", r1).unwrap();
    match tokio::time::timeout(Duration::from_secs(10), stale.next()).await {
        Ok(Some(Err(Error::Compacted {
            compact_revision, ..
        }))) => assert_eq!(compact_revision, floor),
        other => panic!("expected a compacted watch, got {other:?}"),
    }
    let future = ReadOptions {
        revision: floor + 1000,
        serializable: false,
    };
    assert!(matches!(
        store.get(b"/registry/a", future).await,
        Err(Error::FutureRevision { .. })
    ));
    // etcd's members are etcd's to manage.
    match store.add_learner(7, "127.0.0.1:1").await {
        Err(e @ Error::External { .. }) => assert!(e.to_string().contains("external etcd")),
        other => panic!("expected External, got {other:?}"),
    }
    store.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_etcd_does_not_trust_is_refused_and_a_lost_etcd_is_an_error() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let ca = StoreCa::generate().unwrap();
    let etcd = tls_etcd(dir.path(), &ca);
    // No client certificate, then one from another CA: etcd refuses both.
    let other = StoreCa::generate().unwrap();
    for identity in [None, client_identity(&other)] {
        let e = Store::open_etcd(config(&etcd, &ca.cert_pem, identity))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("etcd"), "{e}");
    }
    // A server certificate from a CA the client does not trust.
    let e = Store::open_etcd(config(&etcd, &other.cert_pem, client_identity(&ca)))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("etcd"), "{e}");

    let store = Store::open_etcd(config(&etcd, &ca.cert_pem, client_identity(&ca)))
        .await
        .unwrap();
    store.put("/registry/k", "v").await.unwrap();
    let mut w = store.watch("/registry/", 0).unwrap();
    drop(etcd);
    // A write fails within the request timeout, as unavailable, and says so.
    let started = std::time::Instant::now();
    let e = store.put("/registry/k", "w").await.unwrap_err();
    assert!(e.is_retryable(), "{e:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
    // The watch ends with an error, and health turns bad.
    let end = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match w.next().await {
                Some(Ok(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the watch ends once etcd is gone");
    assert!(matches!(end, Some(Err(_))), "{end:?}");
    baton_testkit::wait_until_async(
        Duration::from_secs(10),
        "health to report etcd lost",
        || async { store.health().is_err().then_some(()) },
    )
    .await
    .unwrap();
    store.shutdown().await.unwrap();
}
