//! events.k8s.io/v1 Events are core/v1 Events in another form: one written in either
//! form is read in the other, in lists and watches too, and the newer form's rules hold.

mod support;

use axum::http::StatusCode;
use serde_json::json;
use support::env;

const CORE: &str = "/api/v1/namespaces/default/events";
const V1: &str = "/apis/events.k8s.io/v1/namespaces/default/events";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_event_is_read_in_both_forms() {
    let e = env().await;
    let (code, got) = e
        .json(
            "POST",
            CORE,
            Some(
                json!({"apiVersion": "v1", "kind": "Event", "metadata": {"name": "old"},
                "involvedObject": {"kind": "Pod", "name": "p", "namespace": "default"},
                "reason": "Started", "message": "started it", "type": "Normal", "count": 2,
                "source": {"component": "kubelet"}}),
            ),
        )
        .await;
    assert_eq!(code, StatusCode::CREATED, "{got}");
    let (code, got) = e.json("GET", &format!("{V1}/old"), None).await;
    assert_eq!(code, StatusCode::OK, "{got}");
    assert_eq!(got["apiVersion"], "events.k8s.io/v1");
    assert_eq!(got["regarding"]["name"], "p");
    assert_eq!(got["note"], "started it");
    assert_eq!(got["deprecatedCount"], 2);
    assert_eq!(got["deprecatedSource"]["component"], "kubelet");

    let (code, got) = e
        .json(
            "POST",
            V1,
            Some(json!({"apiVersion": "events.k8s.io/v1", "kind": "Event",
                "metadata": {"name": "new"}, "eventTime": "2026-12-03T10:00:00.000000Z",
                "reportingController": "example.com/op", "reportingInstance": "op-1",
                "action": "Reconcile", "reason": "Synced", "type": "Normal",
                "regarding": {"kind": "Widget", "name": "w"}, "note": "synced"})),
        )
        .await;
    assert_eq!(code, StatusCode::CREATED, "{got}");
    let (_, got) = e.json("GET", &format!("{CORE}/new"), None).await;
    assert_eq!(got["apiVersion"], "v1");
    assert_eq!(got["involvedObject"]["name"], "w");
    assert_eq!(got["message"], "synced");
    assert_eq!(got["reportingComponent"], "example.com/op");

    // Both lists hold both, and field selectors use each form's names.
    let (_, list) = e.json("GET", V1, None).await;
    assert_eq!(list["items"].as_array().unwrap().len(), 2, "{list}");
    let (_, list) = e
        .json(
            "GET",
            &format!("{V1}?fieldSelector=regarding.name%3Dp"),
            None,
        )
        .await;
    let names: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["old"]);

    // The newer form's rules: what it requires, and a bounded note.
    let (code, got) = e
        .json(
            "POST",
            V1,
            Some(json!({"apiVersion": "events.k8s.io/v1", "kind": "Event",
                "metadata": {"name": "bad"}, "type": "Info", "note": "x".repeat(2000)})),
        )
        .await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{got}");
    let fields: Vec<&str> = got["details"]["causes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["field"].as_str().unwrap())
        .collect();
    for f in [
        "eventTime",
        "reportingController",
        "action",
        "reason",
        "type",
        "note",
    ] {
        assert!(fields.contains(&f), "{f} not in {fields:?}");
    }
    e.close().await;
}

/// Events go a TTL after their last write, as kube-apiserver's `--event-ttl` has them:
/// one already older than that when the API server starts goes at once, the others when
/// their time comes, and nothing else goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_go_a_ttl_after_their_last_write() {
    use k8s_openapi::chrono::{Duration as Age, SecondsFormat, Utc};
    use std::time::{Duration, Instant};
    let e = env().await;
    let ttl = Duration::from_secs(3);
    let at = |t: k8s_openapi::chrono::DateTime<Utc>| t.to_rfc3339_opts(SecondsFormat::Secs, true);
    let event = |name: &str| {
        json!({"apiVersion": "v1", "kind": "Event", "metadata": {"name": name},
            "involvedObject": {"kind": "Pod", "name": "p", "namespace": "default"},
            "reason": "Started", "message": "m", "type": "Normal"})
    };
    // Written two hours ago: the API server stamps what it writes now, so this one goes
    // into the store as an older server would have left it.
    let mut old = event("old");
    old["metadata"]["namespace"] = json!("default");
    old["metadata"]["creationTimestamp"] = json!(at(Utc::now() - Age::hours(2)));
    old["lastTimestamp"] = old["metadata"]["creationTimestamp"].clone();
    let key = baton_apiserver::resources::builtin("Event").key(Some("default"), "old");
    e.store.put(key, old.to_string()).await.unwrap();
    let (code, got) = e.json("POST", CORE, Some(event("young"))).await;
    assert_eq!(code, StatusCode::CREATED, "{got}");
    let young_written = Instant::now();
    let (code, _) = e
        .json(
            "POST",
            "/api/v1/namespaces/default/configmaps",
            Some(json!({"metadata": {"name": "kept"}})),
        )
        .await;
    assert_eq!(code, StatusCode::CREATED);
    let _expiring = e.api.expire_events(ttl);
    let exists = |name: &str| {
        let uri = format!("{CORE}/{name}");
        let e = &e;
        async move { e.json("GET", &uri, None).await.0 == StatusCode::OK }
    };
    let gone = |name: &'static str| {
        baton_testkit::wait_until_async(Duration::from_secs(30), name, move || async move {
            (!exists(name).await).then_some(())
        })
    };
    gone("old").await.unwrap();
    assert!(exists("young").await, "young went with the old one");
    let (code, _) = e.json("POST", CORE, Some(event("later"))).await;
    assert_eq!(code, StatusCode::CREATED);
    let later_written = Instant::now();
    // Not early: the margin is the timestamps' second, by which the Events the store
    // held at start are aged.
    let margin = Duration::from_secs(1);
    gone("young").await.unwrap();
    assert!(young_written.elapsed() >= ttl - margin);
    gone("later").await.unwrap();
    assert!(later_written.elapsed() >= ttl - margin);
    let (code, _) = e
        .json("GET", "/api/v1/namespaces/default/configmaps/kept", None)
        .await;
    assert_eq!(code, StatusCode::OK);
    e.close().await;
}
