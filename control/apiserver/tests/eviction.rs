//! The eviction subresource through the router in process: a PodDisruptionBudget that
//! allows no disruption refuses with 429, one that allows a disruption gives it up to
//! exactly one eviction, pods that are not running go without asking, and a pod under two
//! budgets cannot be evicted.

mod support;

use axum::http::StatusCode;
use serde_json::{json, Value};
use support::{env, Env};

const PODS: &str = "/api/v1/namespaces/default/pods";
const PDBS: &str = "/apis/policy/v1/namespaces/default/poddisruptionbudgets";

async fn pod(e: &Env, name: &str, scheduled: bool) {
    let mut p = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "web"}},
        "spec": {"containers": [{"name": "c", "image": "registry.local/x:1"}]}});
    if scheduled {
        p["spec"]["nodeName"] = json!("n1");
    }
    let (code, got) = e.json("POST", PODS, Some(p)).await;
    assert_eq!(code, StatusCode::CREATED, "{got}");
}

/// What the disruption controller would write.
async fn budget_status(e: &Env, name: &str, allowed: i64) {
    let (code, got) = e
        .json_patch(
            &format!("{PDBS}/{name}/status"),
            json!({"status": {"observedGeneration": 1, "disruptionsAllowed": allowed,
                              "currentHealthy": 2, "desiredHealthy": 2 - allowed, "expectedPods": 2}}),
        )
        .await;
    assert_eq!(code, StatusCode::OK, "{got}");
}

async fn evict(e: &Env, name: &str) -> (StatusCode, Value) {
    e.json(
        "POST",
        &format!("{PODS}/{name}/eviction"),
        Some(json!({"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": name}})),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evictions_respect_the_pods_disruption_budget() {
    let e = env().await;
    pod(&e, "a", true).await;
    pod(&e, "b", true).await;
    let (code, got) = e
        .json(
            "POST",
            PDBS,
            Some(
                json!({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
                "metadata": {"name": "web"},
                "spec": {"minAvailable": 2, "selector": {"matchLabels": {"app": "web"}}}}),
            ),
        )
        .await;
    assert_eq!(code, StatusCode::CREATED, "{got}");
    // Not yet observed by the disruption controller: nothing is evicted on a guess.
    let (code, got) = evict(&e, "a").await;
    assert_eq!(code, StatusCode::TOO_MANY_REQUESTS, "{got}");

    budget_status(&e, "web", 0).await;
    let (code, got) = evict(&e, "a").await;
    assert_eq!(code, StatusCode::TOO_MANY_REQUESTS, "{got}");
    assert!(
        got["message"]
            .as_str()
            .unwrap()
            .contains("needs 2 healthy pods and has 2 currently"),
        "{got}"
    );
    let (_, a) = e.json("GET", &format!("{PODS}/a"), None).await;
    assert!(a["metadata"].get("deletionTimestamp").is_none(), "{a}");

    // One disruption allowed: the first eviction takes it, the second is refused.
    budget_status(&e, "web", 1).await;
    let (code, got) = evict(&e, "a").await;
    assert_eq!(code, StatusCode::CREATED, "{got}");
    let (_, a) = e.json("GET", &format!("{PODS}/a"), None).await;
    assert!(a["metadata"]["deletionTimestamp"].is_string(), "{a}");
    let (_, budget) = e.json("GET", &format!("{PDBS}/web"), None).await;
    assert_eq!(budget["status"]["disruptionsAllowed"], 0, "{budget}");
    assert!(
        budget["status"]["disruptedPods"]["a"].is_string(),
        "{budget}"
    );
    let (code, _) = evict(&e, "b").await;
    assert_eq!(code, StatusCode::TOO_MANY_REQUESTS);

    // A pod not yet scheduled disrupts nothing by going.
    pod(&e, "pending", false).await;
    let (code, got) = evict(&e, "pending").await;
    assert_eq!(code, StatusCode::CREATED, "{got}");

    // Two budgets over one pod: kube refuses to choose.
    let (code, _) = e
        .json(
            "POST",
            PDBS,
            Some(
                json!({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
                "metadata": {"name": "other"},
                "spec": {"maxUnavailable": "50%", "selector": {"matchLabels": {"app": "web"}}}}),
            ),
        )
        .await;
    assert_eq!(code, StatusCode::CREATED);
    let (code, got) = evict(&e, "b").await;
    assert_eq!(code, StatusCode::INTERNAL_SERVER_ERROR, "{got}");
    assert!(got["message"]
        .as_str()
        .unwrap()
        .contains("more than one PodDisruptionBudget"));

    let (code, got) = evict(&e, "missing").await;
    assert_eq!(code, StatusCode::NOT_FOUND, "{got}");
    e.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_with_both_bounds_or_a_bad_percentage_is_refused() {
    let e = env().await;
    let (code, got) = e
        .json(
            "POST",
            PDBS,
            Some(
                json!({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
                "metadata": {"name": "bad"},
                "spec": {"minAvailable": 1, "maxUnavailable": "120%",
                         "selector": {"matchLabels": {"app": "web"}}}}),
            ),
        )
        .await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{got}");
    let message = got["message"].as_str().unwrap();
    assert!(message.contains("cannot be both set"), "{message}");
    assert!(message.contains("spec.maxUnavailable"), "{message}");
    e.close().await;
}
