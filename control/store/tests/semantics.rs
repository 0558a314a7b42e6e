//! etcd's semantics, checked on the embedded single-member store (the same Raft code path
//! as a cluster): conflicts, transactions, old revisions, compaction, watches.

use std::collections::HashSet;
use std::time::Duration;

use baton_store::*;

async fn open(dir: &std::path::Path, tweak: impl FnOnce(&mut StoreConfig)) -> Store {
    let mut cfg = StoreConfig::new(1, dir, "127.0.0.1:0");
    tweak(&mut cfg);
    Store::open_single(cfg).await.expect("open embedded store")
}

async fn next_event(w: &mut Watch) -> Result<WatchEvent, Error> {
    tokio::time::timeout(Duration::from_secs(10), w.next())
        .await
        .expect("watch event within 10s")
        .expect("watch still open")
}

/// Next Events item, skipping progress notifications.
async fn next_revision(w: &mut Watch) -> RevisionEvents {
    loop {
        match next_event(w).await.expect("no watch error") {
            WatchEvent::Events(re) => return re,
            WatchEvent::Progress(_) => continue,
        }
    }
}

const LATEST: ReadOptions = ReadOptions {
    revision: 0,
    serializable: false,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditional_writes_report_conflicts() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), |_| {}).await;
    let r1 = s.put_if("a", "1", Precondition::Absent).await.unwrap();
    match s.put_if("a", "2", Precondition::Absent).await {
        Err(Error::Conflict {
            current_revision,
            store_revision,
            ..
        }) => {
            assert_eq!(current_revision, r1);
            assert_eq!(store_revision, r1);
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    let r2 = s
        .put_if("a", "2", Precondition::ModRevision(r1))
        .await
        .unwrap();
    assert!(r2 > r1);
    // A stale revision is a conflict naming the key's current revision, never a lost update.
    let err = s
        .put_if("a", "3", Precondition::ModRevision(r1))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Conflict { current_revision, .. } if current_revision == r2),
        "{err}"
    );
    assert_eq!(s.get(b"a", LATEST).await.unwrap().unwrap().value, b"2");
    let err = s
        .delete_if("a", Precondition::ModRevision(r1))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Conflict { .. }));
    let prev = s
        .delete_if("a", Precondition::ModRevision(r2))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(prev.value, b"2");
    // Absent keys have mod_revision 0 in conflicts.
    let err = s
        .put_if("a", "x", Precondition::ModRevision(r2))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Conflict {
                current_revision: 0,
                ..
            }
        ),
        "{err}"
    );
    s.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_commit_in_one_revision() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), |_| {}).await;
    let base = s.put("k/x", "0").await.unwrap();
    let mut w = s.watch("k/", base + 1).unwrap();
    let txn = Txn::new()
        .when([Compare::mod_revision("k/x", CompareOp::Equal, base)])
        .and_then([
            Op::put("k/x", "1"),
            Op::put("k/y", "1"),
            Op::put("k/z", "1"),
            Op::get("k/x"),
        ]);
    let resp = s.txn(txn).await.unwrap();
    assert!(resp.succeeded);
    assert_eq!(resp.revision, base + 1);
    // The get inside the transaction sees the transaction's own put.
    assert!(matches!(&resp.results[3], OpResult::Get { kv: Some(kv) } if kv.value == b"1"));
    for k in ["k/x", "k/y", "k/z"] {
        assert_eq!(
            s.get(k.as_bytes(), LATEST)
                .await
                .unwrap()
                .unwrap()
                .mod_revision,
            base + 1
        );
    }
    let re = next_revision(&mut w).await;
    assert_eq!(re.revision, base + 1);
    assert_eq!(re.events.len(), 3, "one revision's events arrive together");
    // The failure branch runs when a compare fails, in a revision of its own.
    let txn = Txn::new()
        .when([Compare::value("k/x", "nope")])
        .and_then([Op::delete("k/x")])
        .or_else([Op::put("k/failed", "yes")]);
    let resp = s.txn(txn).await.unwrap();
    assert!(!resp.succeeded);
    assert_eq!(resp.revision, base + 2);
    assert!(s.get(b"k/x", LATEST).await.unwrap().is_some());
    // Invalid transactions are refused before they reach the log.
    let dup = Txn::new().and_then([Op::put("d", "1"), Op::put("d", "2")]);
    assert!(matches!(
        s.txn(dup).await,
        Err(Error::InvalidRequest { .. })
    ));
    assert!(matches!(
        s.put("", "x").await,
        Err(Error::InvalidKey { .. })
    ));
    assert!(matches!(
        s.put(&b"a\0b"[..], "x").await,
        Err(Error::InvalidKey { .. })
    ));
    s.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_values_are_refused_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), |_| {}).await;
    let rev = s.put("big", vec![7u8; MAX_VALUE_BYTES]).await.unwrap();
    let err = s
        .put("big", vec![8u8; MAX_VALUE_BYTES + 1])
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::ValueTooLarge { size, limit } if size == MAX_VALUE_BYTES + 1 && limit == MAX_VALUE_BYTES)
    );
    assert!(err.to_string().contains("exceeds the limit"), "{err}");
    let kv = s.get(b"big", LATEST).await.unwrap().unwrap();
    assert_eq!((kv.mod_revision, kv.value.len()), (rev, MAX_VALUE_BYTES));
    s.shutdown().await.unwrap();
}

/// The member's HTTP routes refuse a body larger than the route can carry, with 413,
/// before reading it whole; a transaction of the largest value still goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_are_bounded_per_route() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), |_| {}).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = s.serve(listener);
    let _ = rustls::crypto::ring::default_provider().install_default();
    // A refused body leaves its connection to be closed by the server; a pooled client
    // could pick that connection for the next request just as it closes, so each request
    // gets its own.
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let post = |path: &str, len: usize| {
        http.post(format!("http://{addr}{path}"))
            .body(vec![0xffu8; len])
            .send()
    };
    for (path, len) in [
        ("/store/v1/get", 1 << 20),
        ("/store/v1/range", 1 << 20),
        ("/store/v1/watch", 1 << 20),
        ("/raft/vote", 1 << 20),
        ("/store/v1/txn", 8 << 20),
    ] {
        // Refused from its Content-Length, before it is read: the answer is a 413, or,
        // when the client is still writing a large body, a closed connection.
        match post(path, len).await {
            Ok(resp) => assert_eq!(resp.status(), 413, "{path} with {len} bytes"),
            Err(e) => assert!(e.is_request(), "{path} with {len} bytes: {e}"),
        }
    }
    // Within the bounds, an undecodable body is a 400, not a 413.
    assert_eq!(post("/store/v1/get", 16).await.unwrap().status(), 400);
    let client = StoreClient::new([addr.to_string()]);
    client
        .put("big", vec![7u8; MAX_VALUE_BYTES])
        .await
        .expect("the largest value fits a transaction request");
    server.abort();
    s.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_at_old_revisions_and_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), |_| {}).await;
    let mut revs = Vec::new();
    for i in 0..20 {
        revs.push(s.put(format!("r/{i:02}"), format!("{i}")).await.unwrap());
    }
    s.delete("r/05").await.unwrap();
    let at10 = s
        .range(RangeRequest {
            revision: revs[9],
            ..RangeRequest::prefix("r/")
        })
        .await
        .unwrap();
    assert_eq!(at10.kvs.len(), 10);
    assert_eq!(at10.revision, revs[9]);
    let now = s.range(RangeRequest::prefix("r/")).await.unwrap();
    assert_eq!(now.kvs.len(), 19);
    // Pages continue at the revision of the first page, even as writes go on.
    let mut req = RangeRequest {
        limit: 7,
        ..RangeRequest::prefix("r/")
    };
    let first = s.range(req.clone()).await.unwrap();
    s.put("r/99", "late").await.unwrap();
    req.start_after = Some(first.kvs.last().unwrap().key.clone());
    req.revision = first.revision;
    let second = s.range(req).await.unwrap();
    assert_eq!(first.kvs.len() + second.kvs.len(), 14);
    assert!(second.kvs.iter().all(|kv| kv.key != b"r/99"));

    let compact_at = revs[15];
    assert_eq!(s.compact(compact_at).await.unwrap(), compact_at);
    let err = s
        .range(RangeRequest {
            revision: revs[9],
            ..RangeRequest::prefix("r/")
        })
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Compacted { compact_revision, .. } if compact_revision == compact_at),
        "{err}"
    );
    let err = s
        .get(
            b"r/01",
            ReadOptions {
                revision: revs[2],
                serializable: false,
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Compacted { .. }));
    // The compacted revision itself is still readable, and nothing visible was lost.
    let at = s
        .range(RangeRequest {
            revision: compact_at,
            ..RangeRequest::prefix("r/")
        })
        .await
        .unwrap();
    assert_eq!(at.kvs.len(), 16);
    assert_eq!(
        s.range(RangeRequest::prefix("r/")).await.unwrap().kvs.len(),
        20
    );
    match s.watch("r/", revs[3]) {
        Err(Error::Compacted {
            compact_revision, ..
        }) => assert_eq!(compact_revision, compact_at),
        other => panic!("expected Compacted, got {other:?}"),
    }
    assert!(matches!(
        s.compact(compact_at).await,
        Err(Error::Compacted { .. })
    ));
    assert!(matches!(
        s.compact(1_000_000).await,
        Err(Error::FutureRevision { .. })
    ));
    let err = s
        .get(
            b"r/01",
            ReadOptions {
                revision: 1_000_000,
                serializable: true,
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::FutureRevision { .. }));
    s.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_are_ordered_unique_gap_free_and_resumable() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), |_| {}).await;
    let start = s.put("other", "x").await.unwrap() + 1;
    let mut w = s.watch("w/", start).unwrap();
    // Concurrent writers; some writes fall outside the prefix.
    let mut tasks = Vec::new();
    for t in 0..4 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..50 {
                s.put(format!("w/{t}/{i}"), "v").await.unwrap();
                if i % 10 == 0 {
                    s.put("outside", "v").await.unwrap();
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let end = s.local_revision();
    let mut seen_keys = HashSet::new();
    let mut last = 0;
    let mut resumed_from = 0;
    while seen_keys.len() < 200 {
        let re = next_revision(&mut w).await;
        assert!(re.revision > last, "ordered and unique");
        last = re.revision;
        for e in &re.events {
            assert!(e.kv.key.starts_with(b"w/"));
            assert_eq!(e.kv.mod_revision, re.revision);
            assert!(seen_keys.insert(e.kv.key.clone()), "no event twice");
        }
        if seen_keys.len() == 100 && resumed_from == 0 {
            // Resume: a new watch from last+1 continues exactly where this one stopped.
            drop(w);
            resumed_from = last + 1;
            w = s.watch("w/", resumed_from).unwrap();
        }
    }
    assert!(last <= end);
    // Delete events carry the deleted object.
    let mut w2 = s.watch("w/0/", 0).unwrap();
    s.delete("w/0/7").await.unwrap();
    let re = next_revision(&mut w2).await;
    assert_eq!(re.events[0].kind, EventKind::Delete);
    assert_eq!(re.events[0].prev_kv.as_ref().unwrap().key, b"w/0/7");
    s.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_watches_get_progress_notifications() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), |c| {
        c.progress_interval = Duration::from_millis(100)
    })
    .await;
    let mut w = s.watch("quiet/", 0).unwrap();
    let rev = s.put("elsewhere", "x").await.unwrap();
    // The progress revision covers writes outside the prefix too.
    loop {
        match next_event(&mut w).await.unwrap() {
            WatchEvent::Progress(p) if p >= rev => break,
            WatchEvent::Progress(_) => continue,
            WatchEvent::Events(e) => panic!("unexpected events {e:?}"),
        }
    }
    s.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_watchers_are_cut_off_not_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), |c| c.watch_buffer = 8).await;
    let first = s.local_revision() + 1;
    let mut w = s.watch("s/", 0).unwrap();
    for i in 0..200 {
        s.put(format!("s/{i}"), "v").await.unwrap();
    }
    // Every event before the error is in order with no gap; then the watch ends with an error.
    let mut expected = first;
    loop {
        match next_event(&mut w).await {
            Ok(WatchEvent::Events(re)) => {
                assert_eq!(re.revision, expected, "no gap before the cut-off");
                expected += 1;
            }
            Ok(WatchEvent::Progress(_)) => {}
            Err(Error::SlowWatcher { .. }) => break,
            Err(e) => panic!("unexpected error {e}"),
        }
        assert!(
            expected <= first + 200,
            "a consumer this slow must be cut off"
        );
    }
    s.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cas_has_exactly_one_winner() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), |_| {}).await;
    let rev = s.put("cas", "0").await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..32 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            s.put_if("cas", format!("{i}"), Precondition::ModRevision(rev))
                .await
        }));
    }
    let mut wins = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => wins += 1,
            Err(Error::Conflict { .. }) => {}
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    assert_eq!(wins, 1);
    s.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_and_revision_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), |_| {}).await;
    for i in 0..50 {
        s.put(format!("p/{i}"), format!("{i}")).await.unwrap();
    }
    let rev = s.local_revision();
    s.shutdown().await.unwrap();
    drop(s);
    // RocksDB's lock is released once the last handle is gone; wait for that, not a timer.
    let reopen = async {
        loop {
            let mut cfg = StoreConfig::new(1, dir.path(), "127.0.0.1:0");
            cfg.election_timeout = (Duration::from_millis(150), Duration::from_millis(300));
            match Store::open_single(cfg).await {
                Ok(s) => break s,
                Err(Error::Db(DbError::Corrupt { source, .. }))
                    if source.to_string().contains("lock") =>
                {
                    tokio::time::sleep(Duration::from_millis(10)).await
                }
                Err(e) => panic!("reopen failed: {e}"),
            }
        }
    };
    let s = tokio::time::timeout(Duration::from_secs(30), reopen)
        .await
        .expect("the old handle let go of the data dir");
    assert!(
        s.local_revision() >= rev,
        "the revision never goes backwards"
    );
    assert_eq!(
        s.range(RangeRequest::prefix("p/")).await.unwrap().kvs.len(),
        50
    );
    assert!(s.put("p/after", "x").await.unwrap() > rev);
    s.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_report_leadership_revisions_and_size() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), |_| {}).await;
    let before = s.metrics();
    let leads = before.status.leader == Some(before.status.id);
    assert!(leads, "{before:?}");
    // Its own election, counted as the member sees it (a task follows Raft's metrics).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while s.metrics().leader_changes != 1 {
        assert!(std::time::Instant::now() < deadline, "{:?}", s.metrics());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(before.status.term >= 1);
    let rev = s.put("k/x", "a value").await.unwrap();
    let after = s.metrics();
    assert_eq!(after.status.revision, rev);
    assert!(
        after.status.applied_index > before.status.applied_index,
        "{after:?}"
    );
    assert!(after.db_bytes > 0, "{after:?}");
    // A lone member has no one to replicate to but itself.
    assert!(
        after.replication_lag.iter().all(|(_, lag)| *lag == 0),
        "{after:?}"
    );
}

/// A member with a TLS identity refuses, at the handshake, a client with no certificate
/// and one whose certificate another CA signed; a store client's certificate may use the
/// store API but not speak Raft for a member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_member_takes_only_certificates_from_its_store_ca() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let ca = StoreCa::generate().unwrap();
    let s = open(dir.path(), |c| {
        c.tls = Some(ca.member(1, &["127.0.0.1:0"]).unwrap());
    })
    .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let server = s.serve(listener);

    // Plain HTTP gets no answer from a TLS server.
    let plain = StoreClient::new([addr.clone()]).with_timeout(Duration::from_secs(5));
    assert!(plain.status().await.is_err(), "plain HTTP was answered");

    // TLS that trusts the member but presents no certificate: the handshake fails.
    let roots = {
        let mut r = rustls::RootCertStore::empty();
        for c in rustls::pki_types::pem::PemObject::pem_slice_iter(ca.cert_pem.as_bytes()) {
            r.add(c.unwrap()).unwrap();
        }
        r
    };
    let anonymous = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let http = reqwest::Client::builder()
        .use_preconfigured_tls(anonymous)
        .build()
        .unwrap();
    let err = http
        .get(format!("https://{addr}/store/v1/status"))
        .send()
        .await
        .expect_err("a client without a certificate was served");
    assert!(!err.is_status(), "{err}");

    // A certificate from another CA, even one that trusts this member, is refused.
    let stranger = StoreCa::generate().unwrap().client("stranger").unwrap();
    let trusting_stranger = StoreTls::from_pem(
        &ca.cert_pem,
        stranger.cert_and_key_pem().0,
        stranger.cert_and_key_pem().1,
    )
    .unwrap();
    let c = StoreClient::new([addr.clone()])
        .with_tls(&trusting_stranger)
        .unwrap();
    assert!(c.put("k", "v").await.is_err(), "a stranger's write went in");

    // The store's own client certificate reads and writes ...
    let admin = ca.client("admin").unwrap();
    let c = StoreClient::new([addr.clone()]).with_tls(&admin).unwrap();
    c.put("k", "v").await.expect("a store client writes");
    let status = c.status().await.expect("a store client reads the status");
    assert_eq!(status.id, 1);
    // ... but Raft's routes are for members.
    let vote_as = |who: StoreTls| {
        let url = format!("https://{addr}/raft/vote");
        async move {
            let http = reqwest::Client::builder()
                .use_preconfigured_tls(who.client_config().unwrap())
                .build()
                .unwrap();
            http.post(url)
                .body(vec![0u8; 8])
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    assert_eq!(vote_as(admin).await, 403);
    // A member gets past the check, to Raft itself.
    assert_ne!(vote_as(ca.member(2, &["127.0.0.1:0"]).unwrap()).await, 403);
    server.abort();
    s.shutdown().await.unwrap();
}

/// A caller's deadline (an API server's request's, through `with_deadline`) bounds the
/// store's wait for a leader: a write to a member that has none fails "no leader" before
/// the deadline, rather than after an election's wait (12 s with these timeouts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_without_a_leader_fails_within_the_callers_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = StoreConfig::new(1, dir.path(), "127.0.0.1:0");
    cfg.election_timeout = (Duration::from_secs(2), Duration::from_secs(3));
    // Never initialized: no member of it will ever lead.
    let s = Store::open(cfg).await.expect("open a member");
    let started = std::time::Instant::now();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(300);
    let err = with_deadline(deadline, s.put("k", "v")).await.unwrap_err();
    assert!(matches!(err, Error::NoLeader { .. }), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "answered at the deadline, not after {:?}",
        started.elapsed()
    );
    let err = with_deadline(deadline + Duration::from_millis(300), s.get(b"k", LATEST))
        .await
        .unwrap_err();
    // A read is safe to repeat either way.
    assert!(
        matches!(err, Error::NoLeader { .. } | Error::Unavailable { .. }),
        "a linearizable read too: {err}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
}
