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
