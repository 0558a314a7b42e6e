//! CustomResourceDefinitions through the router in process: a CRD becomes served, its
//! schema prunes, defaults and validates objects, its rules run, its subresources,
//! columns and versions work, bad CRDs are refused with nothing left behind, and deleting
//! a CRD deletes its objects first.

mod support;

use std::time::{Duration, Instant};

use axum::http::StatusCode;
use serde_json::{json, Value};
use support::{env, Env};

const CRDS: &str = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions";
const WIDGETS: &str = "/apis/example.com/v1/namespaces/default/widgets";

fn widget_crd() -> Value {
    let schema = json!({
        "type": "object",
        "properties": {
            "spec": {
                "type": "object",
                "required": ["size"],
                "x-kubernetes-validations": [
                    {"rule": "self.replicas <= self.maxReplicas", "message": "replicas must not exceed maxReplicas"},
                    {"rule": "!has(oldSelf.size) || self.size == oldSelf.size", "message": "size is immutable"}
                ],
                "properties": {
                    "size": {"type": "string", "enum": ["small", "large"]},
                    "replicas": {"type": "integer", "minimum": 0, "default": 1},
                    "maxReplicas": {"type": "integer", "default": 10},
                    "color": {"type": "string", "pattern": "^[a-z]+$", "maxLength": 10},
                    "selector": {"type": "string"}
                }
            },
            "status": {
                "type": "object",
                "properties": {"replicas": {"type": "integer"}, "phase": {"type": "string"}}
            }
        }
    });
    let version = |name: &str, storage: bool| {
        json!({
            "name": name, "served": true, "storage": storage,
            "schema": {"openAPIV3Schema": schema},
            "subresources": {"status": {}, "scale": {
                "specReplicasPath": ".spec.replicas",
                "statusReplicasPath": ".status.replicas",
                "labelSelectorPath": ".spec.selector"}},
            "additionalPrinterColumns": [
                {"name": "Size", "type": "string", "jsonPath": ".spec.size"},
                {"name": "Replicas", "type": "integer", "jsonPath": ".spec.replicas"},
                {"name": "Color", "type": "string", "jsonPath": ".spec.color", "priority": 1},
                {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
            ]
        })
    };
    json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.example.com"},
        "spec": {
            "group": "example.com",
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget",
                      "shortNames": ["wd"], "categories": ["all"]},
            "versions": [version("v1", true), version("v1beta1", false)]
        }
    })
}

fn widget(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": name}, "spec": spec})
}

/// Polls `check` until it holds or `within` passes; returns how long it took.
async fn wait_until<F, Fut>(within: Duration, what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < within, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    start.elapsed()
}

async fn established(e: &Env, name: &str) -> bool {
    let (_, crd) = e.json("GET", &format!("{CRDS}/{name}"), None).await;
    crd["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Established" && c["status"] == "True")
}

async fn install(e: &Env) {
    let (code, got) = e.json("POST", CRDS, Some(widget_crd())).await;
    assert_eq!(code, StatusCode::CREATED, "{got}");
    wait_until(Duration::from_secs(5), "the CRD to be established", || {
        established(e, "widgets.example.com")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_crd_is_served_in_discovery_and_openapi_within_a_second() {
    let e = env().await;
    let started = Instant::now();
    let (code, got) = e.json("POST", CRDS, Some(widget_crd())).await;
    assert_eq!(code, StatusCode::CREATED, "{got}");
    assert!(
        got["metadata"]["finalizers"]
            .as_array()
            .unwrap()
            .contains(&json!("customresourcecleanup.apiextensions.k8s.io")),
        "{got}"
    );
    // The first object is accepted as soon as the resource is served.
    wait_until(Duration::from_secs(1), "the first Widget", || async {
        e.json(
            "POST",
            WIDGETS,
            Some(widget("first", json!({"size": "small"}))),
        )
        .await
        .0 == StatusCode::CREATED
    })
    .await;
    let first = started.elapsed();
    assert!(first < Duration::from_secs(1), "{first:?}");
    assert!(established(&e, "widgets.example.com").await);
    let (_, crd) = e
        .json("GET", &format!("{CRDS}/widgets.example.com"), None)
        .await;
    assert_eq!(crd["status"]["acceptedNames"]["kind"], "Widget", "{crd}");
    assert_eq!(crd["status"]["acceptedNames"]["listKind"], "WidgetList");
    assert_eq!(crd["status"]["storedVersions"], json!(["v1"]));

    let (code, list) = e.json("GET", "/apis/example.com/v1", None).await;
    assert_eq!(code, StatusCode::OK, "{list}");
    let names: Vec<&str> = list["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["widgets", "widgets/status", "widgets/scale"]);
    assert_eq!(list["resources"][0]["shortNames"], json!(["wd"]));
    assert_eq!(list["resources"][0]["categories"], json!(["all"]));
    let (_, group) = e.json("GET", "/apis/example.com", None).await;
    assert_eq!(group["preferredVersion"]["version"], "v1", "{group}");
    let (_, agg) = e
        .json_with(
            "GET",
            "/apis",
            "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList",
        )
        .await;
    let ours = agg["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["metadata"]["name"] == "example.com")
        .expect("the group is discovered");
    assert_eq!(ours["versions"][0]["version"], "v1");

    let (_, index) = e.json("GET", "/openapi/v3", None).await;
    let url = index["paths"]["apis/example.com/v1"]["serverRelativeURL"]
        .as_str()
        .expect("the group-version has a document")
        .to_string();
    let (code, doc) = e.json("GET", &url, None).await;
    assert_eq!(code, StatusCode::OK);
    let schema = &doc["components"]["schemas"]["com.example.v1.Widget"];
    assert_eq!(
        schema["x-kubernetes-group-version-kind"][0]["kind"], "Widget",
        "{schema}"
    );
    assert_eq!(
        schema["properties"]["spec"]["properties"]["size"]["enum"],
        json!(["small", "large"])
    );
    assert!(schema["properties"]["metadata"]["allOf"][0]["$ref"]
        .as_str()
        .unwrap()
        .ends_with("ObjectMeta"));
    // The CRD's own schema has a property named `$ref`: a property, not a reference
    // (kubectl cannot read the document otherwise, and validates on the client).
    let (_, doc) = e
        .json("GET", "/openapi/v3/apis/apiextensions.k8s.io/v1", None)
        .await;
    let props = &doc["components"]["schemas"]
        ["io.k8s.apiextensions-apiserver.pkg.apis.apiextensions.v1.JSONSchemaProps"]["properties"];
    assert_eq!(props["$ref"]["type"], "string", "{props}");
    assert!(
        props.get("allOf").is_some_and(|a| a["type"] == "array"),
        "{props}"
    );
    e.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_objects_are_pruned_defaulted_and_validated() {
    let e = env().await;
    install(&e).await;
    let (code, got) = e
        .json(
            "POST",
            WIDGETS,
            Some(widget("a", json!({"size": "small", "extra": "dropped"}))),
        )
        .await;
    assert_eq!(code, StatusCode::CREATED, "{got}");
    assert_eq!(got["spec"]["replicas"], 1, "defaulted: {got}");
    assert_eq!(got["spec"]["maxReplicas"], 10);
    assert!(got["spec"].get("extra").is_none(), "pruned: {got}");
    assert_eq!(got["metadata"]["generation"], 1);

    // Every bad field is named, and the rule's message is the CEL rule's.
    let (code, got) = e
        .json(
            "POST",
            WIDGETS,
            Some(widget(
                "b",
                json!({"size": "huge", "replicas": 20, "maxReplicas": 5, "color": "Red"}),
            )),
        )
        .await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{got}");
    let causes: Vec<String> = got["details"]["causes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| format!("{}: {}", c["field"].as_str().unwrap(), c["message"]))
        .collect();
    let all = causes.join("\n");
    for want in [
        "spec.size",
        "spec.color",
        "replicas must not exceed maxReplicas",
    ] {
        assert!(all.contains(want), "{want} missing from:\n{all}");
    }
    assert_eq!(got["details"]["kind"], "Widget");
    assert_eq!(got["details"]["group"], "example.com");
    let (code, _) = e.json("GET", &format!("{WIDGETS}/b"), None).await;
    assert_eq!(
        code,
        StatusCode::NOT_FOUND,
        "nothing is left of a refused object"
    );

    // A transition rule: the size cannot change.
    let (code, got) = e
        .json_patch(&format!("{WIDGETS}/a"), json!({"spec": {"size": "large"}}))
        .await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{got}");
    assert!(
        got["message"]
            .as_str()
            .unwrap()
            .contains("size is immutable"),
        "{got}"
    );
    // A strategic merge patch needs a built-in type's merge keys: 415, as Kubernetes.
    let (code, got) = e
        .patch_as(
            &format!("{WIDGETS}/a"),
            "application/strategic-merge-patch+json",
            json!({"spec": {"color": "blue"}}),
        )
        .await;
    assert_eq!(code, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{got}");
    let (code, got) = e
        .json_patch(&format!("{WIDGETS}/a"), json!({"spec": {"color": "blue"}}))
        .await;
    assert_eq!(code, StatusCode::OK, "{got}");
    assert_eq!(got["metadata"]["generation"], 2);
    e.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_scale_columns_and_versions_work_on_custom_objects() {
    let e = env().await;
    install(&e).await;
    let mut w = widget(
        "a",
        json!({"size": "large", "selector": "app=a", "color": "red"}),
    );
    w["status"] = json!({"phase": "ignored on create"});
    let (code, got) = e.json("POST", WIDGETS, Some(w)).await;
    assert_eq!(code, StatusCode::CREATED, "{got}");
    assert!(got.get("status").is_none(), "{got}");

    // Status changes only through /status, and spec only through the object.
    let (code, got) = e
        .json_patch(
            &format!("{WIDGETS}/a/status"),
            json!({"status": {"replicas": 1, "phase": "Ready"}, "spec": {"color": "blue"}}),
        )
        .await;
    assert_eq!(code, StatusCode::OK, "{got}");
    assert_eq!(got["status"]["phase"], "Ready");
    assert_eq!(got["spec"]["color"], "red");
    let (_, got) = e
        .json_patch(
            &format!("{WIDGETS}/a"),
            json!({"status": {"phase": "Lost"}}),
        )
        .await;
    assert_eq!(got["status"]["phase"], "Ready", "{got}");

    // Scale reads and writes the CRD's paths.
    let (code, scale) = e.json("GET", &format!("{WIDGETS}/a/scale"), None).await;
    assert_eq!(code, StatusCode::OK, "{scale}");
    assert_eq!(scale["spec"]["replicas"], 1);
    assert_eq!(scale["status"]["replicas"], 1);
    assert_eq!(scale["status"]["selector"], "app=a");
    let (code, scale) = e
        .json_patch(
            &format!("{WIDGETS}/a/scale"),
            json!({"spec": {"replicas": 3}}),
        )
        .await;
    assert_eq!(code, StatusCode::OK, "{scale}");
    let (_, got) = e.json("GET", &format!("{WIDGETS}/a"), None).await;
    assert_eq!(got["spec"]["replicas"], 3);

    // The printer columns, the wide one at priority 1.
    let (code, table) = e
        .json_with(
            "GET",
            WIDGETS,
            "application/json;as=Table;v=v1;g=meta.k8s.io,application/json",
        )
        .await;
    assert_eq!(code, StatusCode::OK, "{table}");
    let cols: Vec<(&str, i64)> = table["columnDefinitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["name"].as_str().unwrap(), c["priority"].as_i64().unwrap()))
        .collect();
    assert_eq!(
        cols,
        [
            ("Name", 0),
            ("Size", 0),
            ("Replicas", 0),
            ("Color", 1),
            ("Age", 0)
        ]
    );
    let cells = &table["rows"][0]["cells"];
    assert_eq!(cells[0], "a");
    assert_eq!(cells[1], "large");
    assert_eq!(cells[2], 3);
    assert_eq!(cells[3], "red");
    assert!(cells[4].as_str().unwrap().ends_with('s'), "{cells}");

    // Another served version reads the same object, as that version.
    let (code, got) = e
        .json(
            "GET",
            "/apis/example.com/v1beta1/namespaces/default/widgets/a",
            None,
        )
        .await;
    assert_eq!(code, StatusCode::OK, "{got}");
    assert_eq!(got["apiVersion"], "example.com/v1beta1");
    assert_eq!(got["spec"]["size"], "large");
    // Label and field selectors.
    let (_, list) = e
        .json(
            "GET",
            &format!("{WIDGETS}?fieldSelector=metadata.name%3Da"),
            None,
        )
        .await;
    assert_eq!(list["items"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list["kind"], "WidgetList");
    let (_, list) = e
        .json(
            "GET",
            &format!("{WIDGETS}?fieldSelector=metadata.name%3Db"),
            None,
        )
        .await;
    assert_eq!(list["items"].as_array().unwrap().len(), 0, "{list}");
    e.close().await;
}

async fn refused(e: &Env, crd: Value, wants: &[&str]) {
    let name = crd["metadata"]["name"].as_str().unwrap().to_string();
    let (code, got) = e.json("POST", CRDS, Some(crd)).await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{got}");
    let message = got["message"].as_str().unwrap();
    for want in wants {
        assert!(message.contains(want), "{want:?} missing from {message}");
    }
    assert_eq!(got["details"]["kind"], "CustomResourceDefinition");
    let (code, _) = e.json("GET", &format!("{CRDS}/{name}"), None).await;
    assert_eq!(code, StatusCode::NOT_FOUND, "nothing is left of {name}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_crds_are_refused_and_leave_nothing_behind() {
    let e = env().await;
    let mut crd = widget_crd();
    crd["metadata"]["name"] = json!("gadgets.example.com");
    refused(
        &e,
        crd,
        &[r#"metadata.name: Invalid value: "gadgets.example.com": must be spec.names.plural+"."+spec.group"#],
    )
    .await;

    let mut crd = widget_crd();
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
        ["loose"] = json!({"description": "no type"});
    refused(
        &e,
        crd,
        &["spec.versions[0].schema.openAPIV3Schema.properties[spec].properties[loose].type: Required value"],
    )
    .await;

    let mut crd = widget_crd();
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
        ["x-kubernetes-validations"] = json!([{"rule": "self.replicas <"}]);
    refused(&e, crd, &["x-kubernetes-validations[0].rule", "compil"]).await;

    let mut crd = widget_crd();
    crd["spec"]["versions"][1]["storage"] = json!(true);
    refused(
        &e,
        crd,
        &["must have exactly one version marked as storage version"],
    )
    .await;

    // Nothing was served on the way.
    let (code, _) = e.json("GET", WIDGETS, None).await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    e.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_custom_object_is_refused() {
    let e = env().await;
    install(&e).await;
    let big = "x".repeat(3 * 1024 * 1024);
    let (code, got) = e
        .json(
            "POST",
            WIDGETS,
            Some(widget("big", json!({"size": "small", "selector": big}))),
        )
        .await;
    assert_eq!(code, StatusCode::PAYLOAD_TOO_LARGE, "{got}");
    assert_eq!(got["kind"], "Status");
    let (code, _) = e.json("GET", &format!("{WIDGETS}/big"), None).await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    e.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_taken_by_an_older_crd_is_not_accepted() {
    let e = env().await;
    install(&e).await;
    let mut crd = widget_crd();
    crd["metadata"]["name"] = json!("gizmos.example.com");
    crd["spec"]["names"] = json!({"plural": "gizmos", "kind": "Gizmo", "shortNames": ["wd"]});
    let (code, got) = e.json("POST", CRDS, Some(crd)).await;
    assert_eq!(code, StatusCode::CREATED, "{got}");
    wait_until(Duration::from_secs(5), "NamesAccepted=False", || async {
        let (_, crd) = e
            .json("GET", &format!("{CRDS}/gizmos.example.com"), None)
            .await;
        crd["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| {
                c["type"] == "NamesAccepted"
                    && c["status"] == "False"
                    && c["message"].as_str().unwrap_or("").contains("\"wd\"")
            })
    })
    .await;
    let (code, _) = e
        .json(
            "GET",
            "/apis/example.com/v1/namespaces/default/gizmos",
            None,
        )
        .await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    e.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_crd_deletes_its_objects_first() {
    let e = env().await;
    install(&e).await;
    for name in ["a", "b"] {
        let (code, got) = e
            .json(
                "POST",
                WIDGETS,
                Some(widget(name, json!({"size": "small"}))),
            )
            .await;
        assert_eq!(code, StatusCode::CREATED, "{got}");
    }
    // One object is held by a finalizer of its own: the CRD waits for it.
    let (code, got) = e
        .json_patch(
            &format!("{WIDGETS}/b"),
            json!({"metadata": {"finalizers": ["example.com/hold"]}}),
        )
        .await;
    assert_eq!(code, StatusCode::OK, "{got}");
    let (code, got) = e
        .json("DELETE", &format!("{CRDS}/widgets.example.com"), None)
        .await;
    assert!(code.is_success(), "{got}");
    wait_until(Duration::from_secs(5), "a to be deleted", || async {
        e.json("GET", &format!("{WIDGETS}/a"), None).await.0 == StatusCode::NOT_FOUND
    })
    .await;
    // The objects are deleted one after the other: b is marked a moment after a goes.
    wait_until(
        Duration::from_secs(5),
        "b to be marked for deletion",
        || async {
            let (_, b) = e.json("GET", &format!("{WIDGETS}/b"), None).await;
            b["metadata"]["deletionTimestamp"].is_string()
        },
    )
    .await;
    // No new objects while terminating.
    let (code, got) = e
        .json("POST", WIDGETS, Some(widget("c", json!({"size": "small"}))))
        .await;
    assert_eq!(code, StatusCode::METHOD_NOT_ALLOWED, "{got}");
    let (_, crd) = e
        .json("GET", &format!("{CRDS}/widgets.example.com"), None)
        .await;
    assert!(
        crd["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["type"] == "Terminating" && c["status"] == "True"),
        "{crd}"
    );
    // Releasing the finalizer lets the object, then the CRD, go.
    let (code, got) = e
        .json_patch(
            &format!("{WIDGETS}/b"),
            json!({"metadata": {"finalizers": null}}),
        )
        .await;
    assert_eq!(code, StatusCode::OK, "{got}");
    wait_until(Duration::from_secs(5), "the CRD to be gone", || async {
        e.json("GET", &format!("{CRDS}/widgets.example.com"), None)
            .await
            .0
            == StatusCode::NOT_FOUND
    })
    .await;
    wait_until(
        Duration::from_secs(2),
        "the resource to be unserved",
        || async { e.json("GET", WIDGETS, None).await.0 == StatusCode::NOT_FOUND },
    )
    .await;
    e.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_on_custom_objects_sees_them_change() {
    let e = env().await;
    install(&e).await;
    let (code, body) = e
        .call(
            "GET",
            &format!("{WIDGETS}?watch=true&timeoutSeconds=5"),
            None,
        )
        .await;
    assert_eq!(code, StatusCode::OK);
    let mut stream = body.into_data_stream();
    let (code, _) = e
        .json("POST", WIDGETS, Some(widget("w", json!({"size": "small"}))))
        .await;
    assert_eq!(code, StatusCode::CREATED);
    use futures::StreamExt;
    let chunk = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("an event")
        .expect("a chunk")
        .unwrap();
    let ev: Value = serde_json::from_slice(&chunk).unwrap();
    assert_eq!(ev["type"], "ADDED");
    assert_eq!(ev["object"]["metadata"]["name"], "w");
    assert_eq!(ev["object"]["kind"], "Widget");
    e.close().await;
}
