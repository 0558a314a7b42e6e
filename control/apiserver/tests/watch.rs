//! Watch and read semantics through the router, in process: resume from a
//! resourceVersion, 410 Expired after compaction, bookmarks, timeoutSeconds.

mod support;

use std::time::Duration;

use axum::body::Body;
use axum::http::StatusCode;
use baton_apiserver::fairness::Class;
use futures::StreamExt;
use serde_json::{json, Value};
use support::env;

/// Reads watch lines until `n` events arrived or the stream ended.
async fn events(body: Body, n: usize) -> Vec<Value> {
    let mut stream = body.into_data_stream();
    let mut buf = Vec::new();
    let mut out = Vec::new();
    while out.len() < n {
        let chunk = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("a watch event in time");
        let Some(chunk) = chunk else { break };
        buf.extend_from_slice(&chunk.unwrap());
        while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            out.push(serde_json::from_slice(&line).unwrap());
        }
    }
    out
}

fn cm(name: &str, v: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {"v": v}})
}

const CMS: &str = "/api/v1/namespaces/default/configmaps";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_resumes_from_a_resource_version_and_carries_deletes() {
    let e = env().await;
    let (code, a) = e.json("POST", CMS, Some(cm("a", "1"))).await;
    assert_eq!(code, StatusCode::CREATED);
    let rv = a["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    e.json("POST", CMS, Some(cm("b", "1"))).await;
    let mut a2 = a.clone();
    a2["data"]["v"] = json!("2");
    let (code, _) = e.json("PUT", &format!("{CMS}/a"), Some(a2)).await;
    assert_eq!(code, StatusCode::OK);
    e.json("DELETE", &format!("{CMS}/b"), None).await;
    // Everything after rv, in order.
    let (code, body) = e
        .call_get(&format!("{CMS}?watch=true&resourceVersion={rv}"))
        .await;
    assert_eq!(code, StatusCode::OK);
    let evs = events(body, 3).await;
    let kinds: Vec<_> = evs
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap().to_string(),
                e["object"]["metadata"]["name"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        vec![
            ("ADDED".into(), "b".into()),
            ("MODIFIED".into(), "a".into()),
            ("DELETED".into(), "b".into())
        ]
    );
    // The DELETED event carries the final object, at the deletion's revision.
    assert_eq!(evs[2]["object"]["data"]["v"], "1");
    let del_rv: i64 = evs[2]["object"]["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let mod_rv: i64 = evs[1]["object"]["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(del_rv > mod_rv);
    // Resume after the MODIFIED event: only the delete follows.
    let (_, body) = e
        .call_get(&format!("{CMS}?watch=true&resourceVersion={mod_rv}"))
        .await;
    let evs = events(body, 1).await;
    assert_eq!(evs[0]["type"], "DELETED");
    e.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compacted_resource_versions_get_410_expired() {
    let e = env().await;
    let (_, a) = e.json("POST", CMS, Some(cm("a", "0"))).await;
    let old_rv = a["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    for i in 1..5 {
        let (_, cur) = e.json("GET", &format!("{CMS}/a"), None).await;
        let mut next = cur.clone();
        next["data"]["v"] = json!(i.to_string());
        e.json("PUT", &format!("{CMS}/a"), Some(next)).await;
    }
    e.store.compact(e.store.local_revision()).await.unwrap();
    let (code, body) = e
        .call_get(&format!("{CMS}?watch=true&resourceVersion={old_rv}"))
        .await;
    assert_eq!(
        code,
        StatusCode::OK,
        "watch errors arrive in the stream, as kube-apiserver sends them"
    );
    let evs = events(body, 1).await;
    assert_eq!(evs[0]["type"], "ERROR");
    assert_eq!(evs[0]["object"]["code"], 410);
    assert_eq!(evs[0]["object"]["reason"], "Expired");
    let (code, status) = e
        .json(
            "GET",
            &format!("{CMS}?resourceVersion={old_rv}&resourceVersionMatch=Exact"),
            None,
        )
        .await;
    assert_eq!(code, StatusCode::GONE);
    assert_eq!(status["reason"], "Expired");
    e.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bookmarks_and_timeouts() {
    let e = env().await;
    let (_, list) = e.json("GET", CMS, None).await;
    let rv = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    // Bookmarks come once a minute, and two seconds before the watch's time runs out.
    let (_, body) = e
        .call_get(&format!(
            "{CMS}?watch=true&allowWatchBookmarks=true&timeoutSeconds=3&resourceVersion={rv}"
        ))
        .await;
    // A write the watch does not see moves the store on; the bookmark says so.
    let (code, other) = e
        .json(
            "POST",
            "/api/v1/namespaces/default/secrets",
            Some(json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "moved-on"}})),
        )
        .await;
    assert_eq!(code, StatusCode::CREATED, "{other}");
    let evs = events(body, 2).await;
    assert_eq!(evs.len(), 1, "one bookmark, then the end: {evs:?}");
    assert_eq!(evs[0]["type"], "BOOKMARK");
    let rv_of = |v: &Value| {
        v["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .parse::<i64>()
            .unwrap()
    };
    assert!(rv_of(&evs[0]["object"]) >= rv_of(&other), "{evs:?}");
    assert_eq!(evs[0]["object"]["kind"], "ConfigMap");
    assert!(
        evs[0]["object"]["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .parse::<i64>()
            .unwrap()
            >= rv.parse::<i64>().unwrap()
    );
    // timeoutSeconds ends the stream by itself.
    let (_, body) = e
        .call_get(&format!(
            "{CMS}?watch=true&timeoutSeconds=1&resourceVersion={rv}"
        ))
        .await;
    let started = std::time::Instant::now();
    let evs = events(body, 1).await;
    assert!(evs.is_empty());
    assert!(started.elapsed() < Duration::from_secs(5));
    e.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_page_with_continue_and_honour_selectors() {
    let e = env().await;
    for i in 0..5 {
        let mut c = cm(&format!("c{i}"), "x");
        c["metadata"]["labels"] = json!({"parity": if i % 2 == 0 { "even" } else { "odd" }});
        e.json("POST", CMS, Some(c)).await;
    }
    let (_, page1) = e.json("GET", &format!("{CMS}?limit=2"), None).await;
    assert_eq!(page1["items"].as_array().unwrap().len(), 2);
    let cont = page1["metadata"]["continue"].as_str().unwrap().to_string();
    e.json("POST", CMS, Some(cm("late", "x"))).await;
    let (_, page2) = e
        .json("GET", &format!("{CMS}?limit=10&continue={cont}"), None)
        .await;
    let names: Vec<_> = page2["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        names,
        vec!["c2", "c3", "c4"],
        "later pages read at the first page's revision"
    );
    let (_, even) = e
        .json("GET", &format!("{CMS}?labelSelector=parity%3Deven"), None)
        .await;
    assert_eq!(even["items"].as_array().unwrap().len(), 3);
    let (_, one) = e
        .json(
            "GET",
            &format!("{CMS}?fieldSelector=metadata.name%3Dc1"),
            None,
        )
        .await;
    assert_eq!(one["items"].as_array().unwrap().len(), 1);
    let (code, bad) = e
        .json("GET", &format!("{CMS}?fieldSelector=spec.nope%3D1"), None)
        .await;
    assert_eq!(code, StatusCode::BAD_REQUEST, "{bad}");
    e.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_its_timeout_is_answered_504() {
    let e = env().await;
    // A revision the store will not reach soon: the read would wait 3 s for it.
    let started = std::time::Instant::now();
    let (code, status) = e
        .json(
            "GET",
            &format!("{CMS}/none?resourceVersion=999999999&timeout=300ms"),
            None,
        )
        .await;
    assert_eq!(code, StatusCode::GATEWAY_TIMEOUT, "{status}");
    assert_eq!(status["reason"], "Timeout");
    assert!(
        status["message"]
            .as_str()
            .unwrap()
            .contains("within the requested timeout"),
        "{status}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "answered at the timeout"
    );
    // Within its time, the same server answers as before.
    let (code, _) = e.json("GET", &format!("{CMS}?timeout=30s"), None).await;
    assert_eq!(code, StatusCode::OK);
    let (code, status) = e.json("GET", &format!("{CMS}?timeout=soon"), None).await;
    assert_eq!(code, StatusCode::BAD_REQUEST, "{status}");
    e.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_gets_429_and_terminating_namespaces_403() {
    let e = support::env_with_tokens("dev-token,dev").await;
    // A user's level (global-default) is saturated: its seats held, its queues filled.
    let fairness = e.api.fairness().clone();
    // Its own seats and those the idle levels lend it.
    let seats = fairness.most_at_once("global-default").unwrap();
    let mut held = Vec::new();
    for _ in 0..seats {
        held.push(
            fairness
                .admit(Class::named("global-default"), "noisy")
                .await
                .unwrap(),
        );
    }
    let waiting: Vec<_> = (0..500)
        .map(|_| {
            let f = fairness.clone();
            // Served, it gives its seat back at once, to the next in the queue.
            tokio::spawn(async move {
                f.admit(Class::named("global-default"), "noisy")
                    .await
                    .map(drop)
            })
        })
        .collect();
    baton_testkit::wait_until_async(Duration::from_secs(10), "the queues full", || async {
        (fairness.level("global-default").unwrap().queued == 500).then_some(())
    })
    .await
    .unwrap();
    // The next request of that level is refused at once with 429...
    let (code, status) = e.json_as("dev-token", "GET", "/api", None).await;
    assert_eq!(code, StatusCode::TOO_MANY_REQUESTS, "{status}");
    assert_eq!(status["reason"], "TooManyRequests");
    // ...while other levels are served: a node's heartbeat, and the administrator.
    let lease = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "n1"}, "spec": {"holderIdentity": "n1"}});
    let (code, _) = e
        .json(
            "POST",
            "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases",
            Some(lease),
        )
        .await;
    assert_eq!(code, StatusCode::CREATED);
    let (code, _) = e.json("GET", CMS, None).await;
    assert_eq!(code, StatusCode::OK);
    // Seats free up: the queued requests are served, then the user is.
    drop(held);
    for w in waiting {
        w.await.unwrap().expect("a queued request gets its seat");
    }
    let (code, _) = e.json_as("dev-token", "GET", "/api", None).await;
    assert_eq!(code, StatusCode::OK);
    // A terminating namespace takes no new objects.
    let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "leaving"}});
    assert_eq!(
        e.json("POST", "/api/v1/namespaces", Some(ns)).await.0,
        StatusCode::CREATED
    );
    let (code, gone) = e.json("DELETE", "/api/v1/namespaces/leaving", None).await;
    assert_eq!(code, StatusCode::ACCEPTED, "{gone}");
    assert_eq!(gone["status"]["phase"], "Terminating");
    let (code, status) = e
        .json(
            "POST",
            "/api/v1/namespaces/leaving/configmaps",
            Some(cm("x", "1")),
        )
        .await;
    assert_eq!(code, StatusCode::FORBIDDEN, "{status}");
    assert_eq!(status["reason"], "Forbidden");
    e.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_only_reads_and_formats_that_cannot_be_served() {
    let e = env().await;
    let (code, _) = e.json("POST", CMS, Some(cm("a", "1"))).await;
    assert_eq!(code, StatusCode::CREATED);
    let meta = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1,application/json";
    let (code, list) = e.json_with("GET", CMS, meta).await;
    assert_eq!(code, StatusCode::OK, "{list}");
    assert_eq!(list["kind"], "PartialObjectMetadataList");
    assert_eq!(list["apiVersion"], "meta.k8s.io/v1");
    assert!(list["metadata"]["resourceVersion"].is_string());
    assert_eq!(list["items"][0]["kind"], "PartialObjectMetadata");
    assert_eq!(list["items"][0]["metadata"]["name"], "a");
    assert!(list["items"][0].get("data").is_none(), "{list}");
    let one = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1";
    let (code, got) = e.json_with("GET", &format!("{CMS}/a"), one).await;
    assert_eq!(code, StatusCode::OK, "{got}");
    assert_eq!(got["kind"], "PartialObjectMetadata");
    assert!(got.get("data").is_none());
    // Nothing servable: 406. Something servable further down the list: served.
    let (code, err) = e.json_with("GET", CMS, "application/xml").await;
    assert_eq!(code, StatusCode::NOT_ACCEPTABLE, "{err}");
    assert_eq!(err["reason"], "NotAcceptable");
    let (code, err) = e.json_with("GET", CMS, "application/json;as=Graph").await;
    assert_eq!(code, StatusCode::NOT_ACCEPTABLE, "{err}");
    let (code, list) = e
        .json_with("GET", CMS, "application/xml, application/json")
        .await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(list["kind"], "ConfigMapList");
    e.close().await;
}

fn pod(name: &str, node: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "x.wasm"}]}})
}

const PODS: &str = "/api/v1/namespaces/default/pods";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nodes_watch_is_served_from_the_watch_cache_and_sees_only_its_pods() {
    let e = env().await;
    let (code, a) = e.json("POST", PODS, Some(pod("on-a", "node-a"))).await;
    assert_eq!(code, StatusCode::CREATED, "{a}");
    e.json("POST", PODS, Some(pod("on-b", "node-b"))).await;
    // From now, as a node agent starts: its pods, then their changes.
    let (code, body) = e
        .call_get(
            "/api/v1/pods?watch=true&fieldSelector=spec.nodeName%3Dnode-a&allowWatchBookmarks=true",
        )
        .await;
    assert_eq!(code, StatusCode::OK);
    let mut lines = Lines {
        stream: body.into_data_stream(),
        buf: Vec::new(),
    };
    let first = lines.next().await;
    assert_eq!(
        (
            first["type"].as_str(),
            first["object"]["metadata"]["name"].as_str()
        ),
        (Some("ADDED"), Some("on-a"))
    );
    let sizes = e.api.watch_caches().sizes();
    let pods = sizes
        .iter()
        .find(|(r, _, _)| r == "pods")
        .expect("pods are cached");
    assert_eq!((pods.1, pods.2), (2, 1), "two pods, one watcher: {sizes:?}");
    // node-b's pod changes: nothing for node-a. Then node-a's pod changes and goes.
    let (_, mut b) = e.json("GET", &format!("{PODS}/on-b"), None).await;
    b["metadata"]["labels"] = json!({"x": "1"});
    let (code, _) = e.json("PUT", &format!("{PODS}/on-b"), Some(b)).await;
    assert_eq!(code, StatusCode::OK);
    let mut a2 = e.json("GET", &format!("{PODS}/on-a"), None).await.1;
    a2["metadata"]["labels"] = json!({"x": "2"});
    let (code, a2) = e.json("PUT", &format!("{PODS}/on-a"), Some(a2)).await;
    assert_eq!(code, StatusCode::OK);
    let ev = lines.next().await;
    assert_eq!(
        (
            ev["type"].as_str(),
            ev["object"]["metadata"]["name"].as_str()
        ),
        (Some("MODIFIED"), Some("on-a"))
    );
    assert_eq!(ev["object"]["metadata"]["labels"]["x"], "2");
    let (code, _) = e
        .json(
            "DELETE",
            &format!("{PODS}/on-a"),
            Some(json!({"gracePeriodSeconds": 0})),
        )
        .await;
    assert!(code.is_success(), "{code}");
    let mut gone = lines.next().await;
    while gone["type"] == "MODIFIED" {
        gone = lines.next().await;
    }
    assert_eq!(gone["type"], "DELETED");
    assert_eq!(gone["object"]["metadata"]["name"], "on-a");
    // A watch resumed from the update's revision replays the ring: the delete only.
    let rv = a2["metadata"]["resourceVersion"].as_str().unwrap();
    let (_, body) = e
        .call_get(&format!(
            "/api/v1/pods?watch=true&fieldSelector=spec.nodeName%3Dnode-a&resourceVersion={rv}"
        ))
        .await;
    let evs = events(body, 1).await;
    assert_eq!(evs.last().unwrap()["type"], "DELETED", "{evs:?}");
    // A list at resourceVersion=0 is served from memory, in pages.
    let (_, page) = e
        .json("GET", "/api/v1/pods?resourceVersion=0&limit=1", None)
        .await;
    assert_eq!(page["items"].as_array().unwrap().len(), 1, "{page}");
    assert!(
        page["metadata"].get("continue").is_none(),
        "one pod is left: {page}"
    );
    e.close().await;
}

/// A watch's events, bookmarks left out.
struct Lines {
    stream: axum::body::BodyDataStream,
    buf: Vec<u8>,
}

impl Lines {
    async fn next(&mut self) -> Value {
        loop {
            if let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                let v: Value = serde_json::from_slice(&line).unwrap();
                if v["type"] != "BOOKMARK" {
                    return v;
                }
                continue;
            }
            let chunk = tokio::time::timeout(Duration::from_secs(10), self.stream.next())
                .await
                .expect("a watch event in time")
                .expect("the watch goes on");
            self.buf.extend_from_slice(&chunk.unwrap());
        }
    }
}

/// Lists `uri` not older than `made`: the resource's watch cache then runs and holds it.
async fn listed_since(e: &support::Env, uri: &str, made: &Value) -> Value {
    let rv = made["metadata"]["resourceVersion"].as_str().unwrap();
    let (code, list) = e
        .json(
            "GET",
            &format!("{uri}?resourceVersion={rv}&resourceVersionMatch=NotOlderThan"),
            None,
        )
        .await;
    assert_eq!(code, StatusCode::OK, "{list}");
    list
}

/// A create checks its namespace in the namespaces' watch cache, as kube-apiserver checks
/// it in an informer's; one the cache does not hold yet is looked up in the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_check_their_namespace_in_the_cache_and_the_store_when_it_is_not_there_yet() {
    let e = env().await;
    const NSS: &str = "/api/v1/namespaces";
    let ns =
        |name: &str| json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
    let (code, made) = e.json("POST", NSS, Some(ns("early"))).await;
    assert_eq!(code, StatusCode::CREATED);
    listed_since(&e, NSS, &made).await;
    let in_ns = |ns: &str| format!("/api/v1/namespaces/{ns}/configmaps");
    let (code, out) = e.json("POST", &in_ns("early"), Some(cm("a", "1"))).await;
    assert_eq!(code, StatusCode::CREATED, "{out}");
    // Held back, the cache does not know a namespace made now: the store is asked.
    let hold = e.api.watch_caches().hold();
    let (code, _) = e.json("POST", NSS, Some(ns("late"))).await;
    assert_eq!(code, StatusCode::CREATED);
    let (code, out) = e.json("POST", &in_ns("late"), Some(cm("a", "1"))).await;
    assert_eq!(code, StatusCode::CREATED, "{out}");
    let (code, out) = e.json("POST", &in_ns("never"), Some(cm("a", "1"))).await;
    assert_eq!(code, StatusCode::NOT_FOUND, "{out}");
    drop(hold);
    e.close().await;
}

/// A GET with `resourceVersion=0` may be served any revision, so the watch cache answers
/// it, as kube-apiserver's does; a GET without one reads the store. With the cache held
/// back, the two see different versions, and an object the cache has not seen yet is
/// read from the store rather than reported missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_at_any_revision_is_served_from_the_watch_cache() {
    let e = env().await;
    let (code, made) = e.json("POST", CMS, Some(cm("a", "old"))).await;
    assert_eq!(code, StatusCode::CREATED);
    listed_since(&e, CMS, &made).await;
    let hold = e.api.watch_caches().hold();
    let (code, out) = e
        .json_patch(&format!("{CMS}/a"), json!({"data": {"v": "new"}}))
        .await;
    assert_eq!(code, StatusCode::OK, "{out}");
    let (code, out) = e.json("POST", CMS, Some(cm("b", "1"))).await;
    assert_eq!(code, StatusCode::CREATED, "{out}");

    let (code, any) = e
        .json("GET", &format!("{CMS}/a?resourceVersion=0"), None)
        .await;
    assert_eq!(code, StatusCode::OK, "{any}");
    assert_eq!(any["data"]["v"], "old", "served from the held-back cache");
    let (code, latest) = e.json("GET", &format!("{CMS}/a"), None).await;
    assert_eq!(code, StatusCode::OK, "{latest}");
    assert_eq!(latest["data"]["v"], "new", "read from the store");
    let (code, b) = e
        .json("GET", &format!("{CMS}/b?resourceVersion=0"), None)
        .await;
    assert_eq!(
        code,
        StatusCode::OK,
        "not in the cache yet, so read from the store: {b}"
    );
    let (code, _) = e
        .json("GET", &format!("{CMS}/c?resourceVersion=0"), None)
        .await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    drop(hold);
    e.close().await;
}

/// A change starts from the watch cache's copy, which can be behind the store. Each
/// change below is made while the caches are held back and the store has a newer
/// version: a patch that changes nothing on the stale copy, one that would overwrite the
/// newer version, and one whose test fails on the stale copy. Each must land on the
/// newest version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_from_a_stale_cached_copy_lands_on_the_latest_object() {
    let e = env().await;
    let mut first = cm("a", "0");
    first["data"]["n"] = json!("k");
    let (code, made) = e.json("POST", CMS, Some(first)).await;
    assert_eq!(code, StatusCode::CREATED);
    let list = listed_since(&e, CMS, &made).await;
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    let hold = e.api.watch_caches().hold();
    let key = "/registry/core/configmaps/default/a";
    let write_behind = |data: Value| {
        let raw = json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "a", "namespace": "default", "uid": made["metadata"]["uid"],
                         "creationTimestamp": made["metadata"]["creationTimestamp"]},
            "data": data});
        let store = e.store.clone();
        async move {
            store
                .put(key, serde_json::to_vec(&raw).unwrap())
                .await
                .unwrap();
        }
    };
    let stored = || async {
        let kv = e
            .store
            .get(key.as_bytes(), Default::default())
            .await
            .unwrap()
            .unwrap();
        serde_json::from_slice::<Value>(&kv.value).unwrap()["data"].clone()
    };
    let uri = format!("{CMS}/a");

    write_behind(json!({"v": "behind", "w": "behind"})).await;
    let (code, out) = e
        .json_patch(&uri, json!({"data": {"v": "0", "n": "k"}}))
        .await;
    assert_eq!(code, StatusCode::OK, "{out}");
    let want = json!({"v": "0", "n": "k", "w": "behind"});
    assert_eq!(
        stored().await,
        want,
        "no change on the stale copy is one on the store"
    );
    assert_eq!(out["data"], want);

    write_behind(json!({"v": "again", "w": "again"})).await;
    let (code, out) = e.json_patch(&uri, json!({"data": {"x": "1"}})).await;
    assert_eq!(code, StatusCode::OK, "{out}");
    let want = json!({"v": "again", "w": "again", "x": "1"});
    assert_eq!(stored().await, want, "the newer version is kept");
    assert_eq!(out["data"], want);

    write_behind(json!({"v": "third"})).await;
    let (code, out) = e
        .patch_as(
            &uri,
            "application/json-patch+json",
            json!([{"op": "test", "path": "/data/v", "value": "third"},
                   {"op": "add", "path": "/data/y", "value": "2"}]),
        )
        .await;
    assert_eq!(
        code,
        StatusCode::OK,
        "a test that fails on the stale copy: {out}"
    );
    assert_eq!(stored().await, json!({"v": "third", "y": "2"}));
    drop(hold);
    // On a current copy, a patch that changes nothing and one whose test fails keep
    // their answers once a fresh read finds the same revision.
    let (_, now) = e.json("GET", &uri, None).await;
    let (code, same) = e.json_patch(&uri, json!({"data": {"y": "2"}})).await;
    assert_eq!(code, StatusCode::OK, "{same}");
    assert_eq!(
        same["metadata"]["resourceVersion"],
        now["metadata"]["resourceVersion"]
    );
    let (code, out) = e
        .patch_as(
            &uri,
            "application/json-patch+json",
            json!([{"op": "test", "path": "/data/v", "value": "not it"}]),
        )
        .await;
    assert!(code.is_client_error(), "{code}: {out}");
    assert_eq!(stored().await, json!({"v": "third", "y": "2"}));
    e.close().await;
}

/// Events are read from the store, never from a watch cache, as kube-apiserver keeps
/// none for them: a list or a watch of them starts nothing that would hold them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_listed_and_watched_from_the_store_without_a_cache() {
    let e = env().await;
    const EVENTS: &str = "/api/v1/namespaces/default/events";
    let event = |name: &str| {
        json!({"apiVersion": "v1", "kind": "Event", "metadata": {"name": name},
               "involvedObject": {"kind": "Pod", "name": "p", "namespace": "default"},
               "reason": "Started", "message": "started", "type": "Normal"})
    };
    let (code, first) = e.json("POST", EVENTS, Some(event("one"))).await;
    assert_eq!(code, StatusCode::CREATED, "{first}");
    let rv = first["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    for at in ["", "?resourceVersion=0", "?limit=1"] {
        let (code, list) = e.json("GET", &format!("{EVENTS}{at}"), None).await;
        assert_eq!(code, StatusCode::OK, "{list}");
        assert_eq!(list["items"][0]["metadata"]["name"], "one", "{at}: {list}");
    }
    let (code, body) = e
        .call_get(&format!("{EVENTS}?watch=true&resourceVersion={rv}"))
        .await;
    assert_eq!(code, StatusCode::OK);
    e.json("POST", EVENTS, Some(event("two"))).await;
    let evs = events(body, 1).await;
    assert_eq!(
        (
            evs[0]["type"].as_str(),
            evs[0]["object"]["metadata"]["name"].as_str()
        ),
        (Some("ADDED"), Some("two"))
    );
    // A watch of the store paces its bookmarks as a cached one does: the last comes two
    // seconds before the end, at the revision of the newest event sent.
    let (_, body) = e
        .call_get(&format!(
            "{EVENTS}?watch=true&allowWatchBookmarks=true&timeoutSeconds=3&resourceVersion={rv}"
        ))
        .await;
    let evs = events(body, 3).await;
    let types: Vec<_> = evs.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["ADDED", "BOOKMARK"], "{evs:?}");
    assert_eq!(
        evs[1]["object"]["metadata"]["resourceVersion"],
        evs[0]["object"]["metadata"]["resourceVersion"]
    );
    let sizes = e.api.watch_caches().sizes();
    assert!(
        sizes.iter().all(|(r, _, _)| r != "events"),
        "no cache of events: {sizes:?}"
    );
    // Other kinds are cached as before.
    e.json("GET", &format!("{CMS}?resourceVersion=0"), None)
        .await;
    let sizes = e.api.watch_caches().sizes();
    assert!(sizes.iter().any(|(r, _, _)| r == "configmaps"), "{sizes:?}");
    e.close().await;
}
