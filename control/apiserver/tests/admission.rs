//! LimitRange and ResourceQuota admission through the router in process: defaults fill
//! containers, bounds refuse with 403 in kube-apiserver's words, a quota is charged per
//! create and refuses what would pass it, concurrent creates never overrun it, and a pod
//! without the requests a quota needs is refused.

mod support;

use axum::http::StatusCode;
use serde_json::{json, Value};
use support::{env, Env};

const PODS: &str = "/api/v1/namespaces/default/pods";
const QUOTAS: &str = "/api/v1/namespaces/default/resourcequotas";
const LIMITS: &str = "/api/v1/namespaces/default/limitranges";

fn pod(name: &str, resources: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
           "spec": {"containers": [{"name": "c", "image": "registry.local/x:1",
                                    "resources": resources}]}})
}

async fn create(e: &Env, path: &str, body: Value) -> (StatusCode, Value) {
    e.json("POST", path, Some(body)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_ranges_default_containers_and_hold_them_to_bounds() {
    let e = env().await;
    let (code, got) = create(
        &e,
        LIMITS,
        json!({"apiVersion": "v1", "kind": "LimitRange", "metadata": {"name": "lr"},
               "spec": {"limits": [{"type": "Container",
                   "defaultRequest": {"cpu": "100m", "memory": "64Mi"},
                   "default": {"cpu": "500m", "memory": "128Mi"},
                   "min": {"cpu": "50m"}, "max": {"memory": "1Gi"}}]}}),
    )
    .await;
    assert_eq!(code, StatusCode::CREATED, "{got}");

    let (code, got) = create(&e, PODS, pod("plain", json!({}))).await;
    assert_eq!(code, StatusCode::CREATED, "{got}");
    let r = &got["spec"]["containers"][0]["resources"];
    assert_eq!(r["requests"], json!({"cpu": "100m", "memory": "64Mi"}));
    assert_eq!(r["limits"], json!({"cpu": "500m", "memory": "128Mi"}));

    // A limit but no request: the request is the limit.
    let (code, got) = create(&e, PODS, pod("limited", json!({"limits": {"cpu": "200m"}}))).await;
    assert_eq!(code, StatusCode::CREATED, "{got}");
    assert_eq!(
        got["spec"]["containers"][0]["resources"]["requests"]["cpu"],
        "100m"
    );

    let (code, got) = create(
        &e,
        PODS,
        pod(
            "greedy",
            json!({"requests": {"cpu": "10m"}, "limits": {"memory": "2Gi"}}),
        ),
    )
    .await;
    assert_eq!(code, StatusCode::FORBIDDEN, "{got}");
    let msg = got["message"].as_str().unwrap();
    assert!(
        msg.starts_with("pods \"greedy\" is forbidden: [")
            && msg.contains("minimum cpu usage per Container is 50m, but request is 10m")
            && msg.contains("maximum memory usage per Container is 1Gi, but limit is 2Gi"),
        "{msg}"
    );
    let (code, _) = e.json("GET", &format!("{PODS}/greedy"), None).await;
    assert_eq!(code, StatusCode::NOT_FOUND, "a refused pod leaves nothing");

    // A range that contradicts itself is invalid.
    let (code, got) = create(
        &e,
        LIMITS,
        json!({"apiVersion": "v1", "kind": "LimitRange", "metadata": {"name": "bad"},
               "spec": {"limits": [{"type": "Container", "min": {"cpu": "2"}, "max": {"cpu": "1"}}]}}),
    )
    .await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{got}");
    e.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quota_is_charged_per_create_and_never_overrun() {
    let e = std::sync::Arc::new(env().await);
    let (code, got) = create(
        &e,
        QUOTAS,
        json!({"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "q"},
               "spec": {"hard": {"pods": "3", "requests.cpu": "1", "count/configmaps": "100"}}}),
    )
    .await;
    assert_eq!(code, StatusCode::CREATED, "{got}");

    let (code, got) = create(&e, PODS, pod("bare", json!({}))).await;
    assert_eq!(code, StatusCode::FORBIDDEN, "{got}");
    assert!(
        got["message"]
            .as_str()
            .unwrap()
            .contains("failed quota: q: must specify requests.cpu for: c"),
        "{got}"
    );

    // Five creates at once against three pods' room: exactly three get in.
    let mut tasks = Vec::new();
    for i in 0..5 {
        let e = e.clone();
        tasks.push(tokio::spawn(async move {
            create(
                &e,
                PODS,
                pod(&format!("p{i}"), json!({"requests": {"cpu": "100m"}})),
            )
            .await
        }));
    }
    let mut created = 0;
    let mut refused = Vec::new();
    for t in tasks {
        let (code, got) = t.await.unwrap();
        match code {
            StatusCode::CREATED => created += 1,
            StatusCode::FORBIDDEN => refused.push(got["message"].as_str().unwrap().to_string()),
            other => panic!("{other}: {got}"),
        }
    }
    assert_eq!(created, 3, "{refused:?}");
    assert!(
        refused[0].contains("exceeded quota: q, requested: pods=1, used: pods=3, limited: pods=3"),
        "{refused:?}"
    );
    let (_, q) = e.json("GET", &format!("{QUOTAS}/q"), None).await;
    assert_eq!(q["status"]["used"]["pods"], "3", "{q}");
    assert_eq!(q["status"]["used"]["requests.cpu"], "300m", "{q}");
    assert_eq!(q["status"]["hard"]["pods"], "3", "{q}");

    // A dry run is checked but not charged.
    let (code, _) = e
        .json(
            "POST",
            "/api/v1/namespaces/default/configmaps?dryRun=All",
            Some(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "dry"}})),
        )
        .await;
    assert_eq!(code, StatusCode::CREATED);
    let (_, q) = e.json("GET", &format!("{QUOTAS}/q"), None).await;
    assert!(q["status"]["used"].get("count/configmaps").is_none(), "{q}");
    std::sync::Arc::try_unwrap(e)
        .ok()
        .expect("the tasks are done")
        .close()
        .await;
}
