//! Access control through the router in process: users from tokens, RBAC with the
//! default roles, the access reviews kubectl's `auth` commands send, impersonation, the
//! escalation check, the Node authorizer, and ServiceAccount tokens bound to pods.

mod support;

use std::time::Duration;

use axum::http::StatusCode;
use serde_json::{json, Value};
use support::{env_with_tokens, Env};

const TOKENS: &str =
    "alice-token,alice,devs\nbob-token,bob\nn1-token,system:node:n1,system:nodes\n";

async fn ok(e: &Env, method: &str, uri: &str, body: Value) -> Value {
    let (code, got) = e.json(method, uri, Some(body)).await;
    assert!(code.is_success(), "{method} {uri}: {code} {got}");
    got
}

/// Waits until the policy loop has seen a change: `token` gets `want` on `uri`.
async fn until(e: &Env, token: &str, uri: &str, want: StatusCode) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (code, got) = e.json_as(token, "GET", uri, None).await;
        if code == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{uri} stays {code}: {got}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn namespace(e: &Env, name: &str) {
    ok(
        e,
        "POST",
        "/api/v1/namespaces",
        json!({"metadata": {"name": name}}),
    )
    .await;
}

fn rolebinding(name: &str, kind: &str, role: &str, subject: Value) -> Value {
    json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
           "metadata": {"name": name},
           "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": role},
           "subjects": [subject]})
}

async fn can_i(e: &Env, token: &str, attrs: Value) -> bool {
    let (code, got) = e
        .json_as(
            token,
            "POST",
            "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
            Some(
                json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
                        "spec": {"resourceAttributes": attrs}}),
            ),
        )
        .await;
    assert_eq!(code, StatusCode::CREATED, "{got}");
    got["status"]["allowed"] == true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_in_one_namespace_sees_only_what_view_grants_there() {
    let e = env_with_tokens(TOKENS).await;
    namespace(&e, "team-a").await;
    namespace(&e, "team-b").await;
    ok(
        &e,
        "POST",
        "/api/v1/namespaces/team-a/secrets",
        json!({"metadata": {"name": "s"}, "stringData": {"k": "v"}}),
    )
    .await;
    // No grant yet: alice is authenticated, but may do nothing in the namespace.
    let (code, got) = e
        .json_as("alice-token", "GET", "/api/v1/namespaces/team-a/pods", None)
        .await;
    assert_eq!(code, StatusCode::FORBIDDEN);
    assert_eq!(
        got["message"],
        r#"pods is forbidden: User "alice" cannot list resource "pods" in API group "" in the namespace "team-a""#
    );
    assert_eq!(got["reason"], "Forbidden");
    ok(
        &e,
        "POST",
        "/apis/rbac.authorization.k8s.io/v1/namespaces/team-a/rolebindings",
        rolebinding(
            "alice-view",
            "ClusterRole",
            "view",
            json!({"kind": "User", "name": "alice", "apiGroup": "rbac.authorization.k8s.io"}),
        ),
    )
    .await;
    until(
        &e,
        "alice-token",
        "/api/v1/namespaces/team-a/pods",
        StatusCode::OK,
    )
    .await;

    let cases = [
        (
            "/api/v1/namespaces/team-a/pods",
            "list",
            "team-a",
            "pods",
            StatusCode::OK,
        ),
        (
            "/apis/apps/v1/namespaces/team-a/deployments",
            "list",
            "team-a",
            "deployments",
            StatusCode::OK,
        ),
        (
            "/api/v1/namespaces/team-a/secrets",
            "list",
            "team-a",
            "secrets",
            StatusCode::FORBIDDEN,
        ),
        (
            "/api/v1/namespaces/team-a/secrets/s",
            "get",
            "team-a",
            "secrets",
            StatusCode::FORBIDDEN,
        ),
        (
            "/api/v1/namespaces/team-b/pods",
            "list",
            "team-b",
            "pods",
            StatusCode::FORBIDDEN,
        ),
        (
            "/api/v1/namespaces/team-b/configmaps",
            "list",
            "team-b",
            "configmaps",
            StatusCode::FORBIDDEN,
        ),
        ("/api/v1/nodes", "list", "", "nodes", StatusCode::FORBIDDEN),
    ];
    for (uri, verb, ns, resource, want) in cases {
        let (code, got) = e.json_as("alice-token", "GET", uri, None).await;
        assert_eq!(code, want, "{uri}: {got}");
        let group = if resource == "deployments" {
            "apps"
        } else {
            ""
        };
        let name = if uri.ends_with("/s") { "s" } else { "" };
        let allowed = can_i(&e, "alice-token",
            json!({"verb": verb, "namespace": ns, "group": group, "resource": resource, "name": name})).await;
        assert_eq!(allowed, want == StatusCode::OK, "can-i disagrees on {uri}");
    }
    // Writes are not viewing.
    let (code, _) = e
        .json_as(
            "alice-token",
            "POST",
            "/api/v1/namespaces/team-a/configmaps",
            Some(json!({"metadata": {"name": "c"}})),
        )
        .await;
    assert_eq!(code, StatusCode::FORBIDDEN);
    // Discovery and the self reviews are every authenticated user's.
    let (code, _) = e.json_as("alice-token", "GET", "/apis", None).await;
    assert_eq!(code, StatusCode::OK);
    let (code, got) = e
        .json_as(
            "alice-token",
            "POST",
            "/apis/authentication.k8s.io/v1/selfsubjectreviews",
            Some(json!({"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"})),
        )
        .await;
    assert_eq!(code, StatusCode::CREATED, "{got}");
    assert_eq!(got["status"]["userInfo"]["username"], "alice");
    assert_eq!(
        got["status"]["userInfo"]["groups"],
        json!(["devs", "system:authenticated"])
    );
    let (_, got) = e
        .json_as(
            "alice-token",
            "POST",
            "/apis/authorization.k8s.io/v1/selfsubjectrulesreviews",
            Some(
                json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectRulesReview",
                             "spec": {"namespace": "team-a"}}),
            ),
        )
        .await;
    let rules = got["status"]["resourceRules"].as_array().unwrap();
    assert!(
        rules.iter().any(
            |r| r["resources"].as_array().unwrap().contains(&json!("pods"))
                && r["verbs"].as_array().unwrap().contains(&json!("list"))
        ),
        "{got}"
    );
    assert!(
        !rules.iter().any(|r| r["resources"]
            .as_array()
            .unwrap()
            .contains(&json!("secrets"))),
        "{got}"
    );
    // The reviews are questions: nothing to list.
    let (code, _) = e
        .json(
            "GET",
            "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
            None,
        )
        .await;
    assert_eq!(code, StatusCode::METHOD_NOT_ALLOWED);
    e.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_are_required_and_checked() {
    let e = env_with_tokens(TOKENS).await;
    let (code, _) = e.json_as("", "GET", "/api/v1/pods", None).await;
    assert_eq!(code, StatusCode::UNAUTHORIZED);
    let (code, _) = e.json_as("nope", "GET", "/api/v1/pods", None).await;
    assert_eq!(code, StatusCode::UNAUTHORIZED);
    let (code, _) = e.json_as("", "GET", "/version", None).await;
    assert_eq!(code, StatusCode::OK);
    // bob has no grant but the defaults.
    let (code, got) = e
        .json_as("bob-token", "DELETE", "/api/v1/namespaces/default", None)
        .await;
    assert_eq!(code, StatusCode::FORBIDDEN);
    assert_eq!(
        got["message"],
        r#"namespaces "default" is forbidden: User "bob" cannot delete resource "namespaces" in API group "" in the namespace "default""#
    );
    e.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impersonation_is_itself_authorized() {
    let e = env_with_tokens(TOKENS).await;
    let as_alice = [("impersonate-user", "alice")];
    let (code, body) = e
        .call_with(
            &e.token,
            &as_alice,
            "GET",
            "/api/v1/namespaces/default/secrets",
            None,
            "application/json",
        )
        .await;
    let bytes = axum::body::to_bytes(body, 1 << 20).await.unwrap();
    assert_eq!(
        code,
        StatusCode::FORBIDDEN,
        "{}",
        String::from_utf8_lossy(&bytes)
    );
    assert!(String::from_utf8_lossy(&bytes).contains(r#"User \"alice\" cannot list"#));
    // bob may not act as alice.
    let (code, body) = e
        .call_with(
            "bob-token",
            &as_alice,
            "GET",
            "/api/v1/namespaces/default/pods",
            None,
            "application/json",
        )
        .await;
    let bytes = axum::body::to_bytes(body, 1 << 20).await.unwrap();
    assert_eq!(code, StatusCode::FORBIDDEN);
    assert!(String::from_utf8_lossy(&bytes).contains(r#"cannot impersonate resource \"users\""#));
    // The admin acting as a group member gets what the group is granted.
    let as_master = [
        ("impersonate-user", "carol"),
        ("impersonate-group", "system:masters"),
    ];
    let (code, _) = e
        .call_with(
            &e.token,
            &as_master,
            "GET",
            "/api/v1/namespaces/default/secrets",
            None,
            "application/json",
        )
        .await;
    assert_eq!(code, StatusCode::OK);
    e.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nobody_grants_what_they_do_not_hold() {
    let e = env_with_tokens(TOKENS).await;
    namespace(&e, "team-a").await;
    ok(
        &e,
        "POST",
        "/apis/rbac.authorization.k8s.io/v1/namespaces/team-a/rolebindings",
        rolebinding(
            "alice-admin",
            "ClusterRole",
            "admin",
            json!({"kind": "User", "name": "alice"}),
        ),
    )
    .await;
    until(
        &e,
        "alice-token",
        "/apis/rbac.authorization.k8s.io/v1/namespaces/team-a/roles",
        StatusCode::OK,
    )
    .await;
    let role = |name: &str, rules: Value| {
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                                                  "metadata": {"name": name}, "rules": rules})
    };
    let roles = "/apis/rbac.authorization.k8s.io/v1/namespaces/team-a/roles";
    // What admin holds in the namespace may be granted...
    let (code, got) = e
        .json_as(
            "alice-token",
            "POST",
            roles,
            Some(role(
                "pod-reader",
                json!([{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}]),
            )),
        )
        .await;
    assert_eq!(code, StatusCode::CREATED, "{got}");
    // ...but not what it does not: nodes are cluster-wide, and admin has no escalate.
    let (code, got) = e
        .json_as(
            "alice-token",
            "POST",
            roles,
            Some(role(
                "node-reader",
                json!([{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]}]),
            )),
        )
        .await;
    assert_eq!(code, StatusCode::FORBIDDEN, "{got}");
    let msg = got["message"].as_str().unwrap();
    assert!(
        msg.contains("is attempting to grant RBAC permissions not currently held"),
        "{msg}"
    );
    assert!(
        msg.contains(r#"{APIGroups:[""], Resources:["nodes"], Verbs:["get"]}"#),
        "{msg}"
    );
    let (code, _) = e.json("GET", &format!("{roles}/node-reader"), None).await;
    assert_eq!(code, StatusCode::NOT_FOUND, "a refused role is not stored");
    // Binding a role that grants more than alice holds is refused too.
    let bindings = "/apis/rbac.authorization.k8s.io/v1/namespaces/team-a/rolebindings";
    let (code, got) = e
        .json_as(
            "alice-token",
            "POST",
            bindings,
            Some(rolebinding(
                "bob-root",
                "ClusterRole",
                "cluster-admin",
                json!({"kind": "User", "name": "bob"}),
            )),
        )
        .await;
    assert_eq!(code, StatusCode::FORBIDDEN, "{got}");
    let (code, got) = e
        .json_as(
            "alice-token",
            "POST",
            bindings,
            Some(rolebinding(
                "bob-reads",
                "Role",
                "pod-reader",
                json!({"kind": "User", "name": "bob"}),
            )),
        )
        .await;
    assert_eq!(code, StatusCode::CREATED, "{got}");
    // An update that changes only labels is not an escalation even for a weaker writer.
    e.close().await;
}

/// The Node authorizer answers from the pods' watch cache as it is, as kube-apiserver's
/// answers from its informers' graph: a pod the cache holds lets its node read its
/// Secret at once, even while the cache is behind; a pod bound a moment ago, which the
/// cache has not seen, does not (the node asks again), and the store is not scanned for
/// it. A pod's status write, which names one pod, reads that pod from the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_authorizer_answers_from_the_cache_even_when_it_is_behind() {
    let e = env_with_tokens(TOKENS).await;
    ok(
        &e,
        "POST",
        "/api/v1/nodes",
        json!({"metadata": {"name": "n1"}}),
    )
    .await;
    let pod = |name: &str, secret: &str| {
        json!({
            "metadata": {"name": name},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "registry.example/app:1",
                     "env": [{"name": "K", "valueFrom": {"secretKeyRef": {"name": secret, "key": "k"}}}]}]}
        })
    };
    const SECRETS: &str = "/api/v1/namespaces/default/secrets";
    const PODS: &str = "/api/v1/namespaces/default/pods";
    for name in ["early", "late"] {
        ok(
            &e,
            "POST",
            SECRETS,
            json!({"metadata": {"name": name}, "stringData": {"k": "v"}}),
        )
        .await;
    }
    ok(&e, "POST", PODS, pod("early", "early")).await;
    let n1 = "n1-token";
    let read = |secret: &'static str| {
        let e = &e;
        async move {
            e.json_as(n1, "GET", &format!("{SECRETS}/{secret}"), None)
                .await
                .0
        }
    };
    assert_eq!(read("early").await, StatusCode::OK);

    let hold = e.api.watch_caches().hold();
    ok(&e, "POST", PODS, pod("late", "late")).await;
    assert_eq!(
        read("early").await,
        StatusCode::OK,
        "found in the held cache"
    );
    // Over etcd, where the cache cannot be brought up to date at once, a miss reads the
    // store.
    let unseen = if e.store.is_external() {
        StatusCode::OK
    } else {
        StatusCode::FORBIDDEN
    };
    assert_eq!(
        read("late").await,
        unseen,
        "a pod the cache has not seen yet gives no access"
    );
    let (code, _) = e
        .call_with(
            n1,
            &[("content-type", "application/merge-patch+json")],
            "PATCH",
            &format!("{PODS}/late/status"),
            Some(json!({"status": {"phase": "Running"}})),
            "application/json",
        )
        .await;
    assert_eq!(code, StatusCode::OK, "its own pod, read from the store");
    drop(hold);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while read("late").await != StatusCode::OK {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the cache caught up, and the node may read its new pod's Secret"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    e.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_reads_only_what_its_pods_use_and_writes_only_itself() {
    let e = env_with_tokens(TOKENS).await;
    for (name, node) in [("n1", "n1"), ("n2", "n2")] {
        ok(
            &e,
            "POST",
            "/api/v1/nodes",
            json!({"metadata": {"name": name}}),
        )
        .await;
        ok(
            &e,
            "POST",
            "/api/v1/namespaces/default/secrets",
            json!({"metadata": {"name": format!("secret-{node}")}, "stringData": {"k": "v"}}),
        )
        .await;
        ok(&e, "POST", "/api/v1/namespaces/default/pods", json!({
            "metadata": {"name": format!("pod-{node}")},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "registry.example/app:1",
                     "env": [{"name": "K", "valueFrom": {"secretKeyRef": {"name": format!("secret-{node}"), "key": "k"}}}]}]}
        })).await;
    }
    let n1 = "n1-token";
    let (code, got) = e
        .json_as(
            n1,
            "GET",
            "/api/v1/namespaces/default/secrets/secret-n1",
            None,
        )
        .await;
    assert_eq!(code, StatusCode::OK, "{got}");
    let (code, got) = e
        .json_as(
            n1,
            "GET",
            "/api/v1/namespaces/default/secrets/secret-n2",
            None,
        )
        .await;
    assert_eq!(code, StatusCode::FORBIDDEN, "{got}");
    assert!(
        got["message"]
            .as_str()
            .unwrap()
            .contains("no relationship found between node \"n1\""),
        "{got}"
    );
    let (code, _) = e
        .json_as(n1, "GET", "/api/v1/namespaces/default/secrets", None)
        .await;
    assert_eq!(code, StatusCode::FORBIDDEN);
    let (code, _) = e.json_as(n1, "DELETE", "/api/v1/nodes/n2", None).await;
    assert_eq!(code, StatusCode::FORBIDDEN);
    let (code, got) = e
        .json_as(n1, "PATCH", "/api/v1/nodes/n1/status", None)
        .await;
    assert_ne!(code, StatusCode::FORBIDDEN, "{got}");
    let (code, _) = e
        .json_as(
            n1,
            "POST",
            "/api/v1/nodes",
            Some(json!({"metadata": {"name": "n3"}})),
        )
        .await;
    assert_eq!(code, StatusCode::FORBIDDEN, "a node registers only itself");
    let (code, _) = e.json_as(n1, "GET", "/api/v1/pods", None).await;
    assert_eq!(code, StatusCode::OK);
    // Tokens: only bound to its own pods.
    let token = |pod: Option<&str>| {
        let mut spec = json!({});
        if let Some(p) = pod {
            spec["boundObjectRef"] = json!({"kind": "Pod", "apiVersion": "v1", "name": p});
        }
        json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec})
    };
    let uri = "/api/v1/namespaces/default/serviceaccounts/default/token";
    ok(
        &e,
        "POST",
        "/api/v1/namespaces/default/serviceaccounts",
        json!({"metadata": {"name": "default"}}),
    )
    .await;
    let (code, got) = e
        .json_as(n1, "POST", uri, Some(token(Some("pod-n1"))))
        .await;
    assert_eq!(code, StatusCode::CREATED, "{got}");
    let (code, _) = e
        .json_as(n1, "POST", uri, Some(token(Some("pod-n2"))))
        .await;
    assert_eq!(code, StatusCode::FORBIDDEN);
    let (code, _) = e.json_as(n1, "POST", uri, Some(token(None))).await;
    assert_eq!(code, StatusCode::FORBIDDEN);

    // Scale from zero: a node may scale only what an autoscaler with minReplicas 0
    // targets.
    for name in ["fn", "web"] {
        ok(
            &e,
            "POST",
            "/apis/apps/v1/namespaces/default/deployments",
            json!({
                "metadata": {"name": name},
                "spec": {"replicas": 0, "selector": {"matchLabels": {"app": name}},
                    "template": {"metadata": {"labels": {"app": name}},
                        "spec": {"containers": [{"name": "c", "image": "registry.example/app:1"}]}}}
            }),
        )
        .await;
    }
    let hpa = |name: &str, min: i32| {
        json!({
            "metadata": {"name": name},
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
                "minReplicas": min, "maxReplicas": 3,
                "metrics": [{"type": "Pods", "pods": {"metric": {"name": "http_requests_per_second"},
                    "target": {"type": "AverageValue", "averageValue": "10"}}}]}
        })
    };
    let hpas = "/apis/autoscaling/v2/namespaces/default/horizontalpodautoscalers";
    ok(&e, "POST", hpas, hpa("fn", 0)).await;
    ok(&e, "POST", hpas, hpa("web", 1)).await;
    let (code, got) = e.json_as(n1, "GET", hpas, None).await;
    assert_eq!(code, StatusCode::OK, "{got}");
    let scale = |name: &str| format!("/apis/apps/v1/namespaces/default/deployments/{name}/scale");
    let (code, mut fn_scale) = e.json_as(n1, "GET", &scale("fn"), None).await;
    assert_eq!(code, StatusCode::OK, "{fn_scale}");
    fn_scale["spec"]["replicas"] = json!(1);
    let (code, got) = e.json_as(n1, "PUT", &scale("fn"), Some(fn_scale)).await;
    assert_eq!(code, StatusCode::OK, "{got}");
    let (code, got) = e.json_as(n1, "GET", &scale("web"), None).await;
    assert_eq!(code, StatusCode::FORBIDDEN, "{got}");
    assert!(
        got["message"].as_str().unwrap().contains("minReplicas 0"),
        "{got}"
    );
    let (code, _) = e
        .json_as(
            n1,
            "PATCH",
            "/apis/apps/v1/namespaces/default/deployments/fn",
            Some(json!({"spec": {"replicas": 3}})),
        )
        .await;
    assert_eq!(
        code,
        StatusCode::FORBIDDEN,
        "only the scale, not the Deployment"
    );
    // It reads the template of what it may wake (to answer from it until the pod is
    // up), and of nothing else.
    let deployment = |name: &str| format!("/apis/apps/v1/namespaces/default/deployments/{name}");
    let (code, got) = e.json_as(n1, "GET", &deployment("fn"), None).await;
    assert_eq!(code, StatusCode::OK, "{got}");
    assert_eq!(got["spec"]["template"]["metadata"]["labels"]["app"], "fn");
    let (code, got) = e.json_as(n1, "GET", &deployment("web"), None).await;
    assert_eq!(code, StatusCode::FORBIDDEN, "{got}");
    let (code, got) = e
        .json_as(
            n1,
            "GET",
            "/apis/apps/v1/namespaces/default/deployments",
            None,
        )
        .await;
    assert_eq!(code, StatusCode::FORBIDDEN, "{got}");
    e.close().await;
}

fn claims(token: &str) -> Value {
    use base64::Engine;
    let part = token.split('.').nth(1).unwrap();
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(part)
            .unwrap(),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_bound_token_acts_as_its_service_account_until_the_pod_is_gone() {
    let e = env_with_tokens(TOKENS).await;
    ok(
        &e,
        "POST",
        "/api/v1/namespaces/default/serviceaccounts",
        json!({"metadata": {"name": "lister"}}),
    )
    .await;
    let pod = ok(&e, "POST", "/api/v1/namespaces/default/pods", json!({
        "metadata": {"name": "app"},
        "spec": {"serviceAccountName": "lister", "containers": [{"name": "c", "image": "registry.example/app:1"}]}
    })).await;
    ok(
        &e,
        "POST",
        "/apis/rbac.authorization.k8s.io/v1/namespaces/default/roles",
        json!({
        "metadata": {"name": "pod-lister"},
        "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]}),
    )
    .await;
    ok(
        &e,
        "POST",
        "/apis/rbac.authorization.k8s.io/v1/namespaces/default/rolebindings",
        rolebinding(
            "lister",
            "Role",
            "pod-lister",
            json!({"kind": "ServiceAccount", "name": "lister", "namespace": "default"}),
        ),
    )
    .await;
    let got = ok(&e, "POST", "/api/v1/namespaces/default/serviceaccounts/lister/token", json!({
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
        "spec": {"boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": "app", "uid": pod["metadata"]["uid"]}}
    })).await;
    let token = got["status"]["token"].as_str().unwrap().to_string();
    let c = claims(&token);
    assert_eq!(c["sub"], "system:serviceaccount:default:lister");
    assert_eq!(c["kubernetes.io"]["pod"]["name"], "app");
    assert_eq!(
        c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(),
        3600
    );
    until(
        &e,
        &token,
        "/api/v1/namespaces/default/pods",
        StatusCode::OK,
    )
    .await;
    let (code, _) = e
        .json_as(&token, "GET", "/api/v1/namespaces/default/secrets", None)
        .await;
    assert_eq!(code, StatusCode::FORBIDDEN);
    let (_, review) = e.json("POST", "/apis/authentication.k8s.io/v1/tokenreviews", Some(json!({
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token}}))).await;
    assert_eq!(review["status"]["authenticated"], true, "{review}");
    assert_eq!(
        review["status"]["user"]["username"],
        "system:serviceaccount:default:lister"
    );
    // Anyone may fetch the keys, and the token's key is among them.
    let (code, jwks) = e.json_as("", "GET", "/openid/v1/jwks", None).await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(jwks["keys"][0]["kty"], "EC");
    let (code, oidc) = e
        .json_as("", "GET", "/.well-known/openid-configuration", None)
        .await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(oidc["issuer"], c["iss"]);
    // A tampered token is nobody.
    let mut forged = token.clone();
    forged.pop();
    forged.push(if token.ends_with('A') { 'B' } else { 'A' });
    let (code, _) = e
        .json_as(&forged, "GET", "/api/v1/namespaces/default/pods", None)
        .await;
    assert_eq!(code, StatusCode::UNAUTHORIZED);
    // The pod goes, and the token with it.
    let (code, _) = e
        .json(
            "DELETE",
            "/api/v1/namespaces/default/pods/app?gracePeriodSeconds=0",
            None,
        )
        .await;
    assert!(code.is_success());
    let (code, _) = e
        .json_as(&token, "GET", "/api/v1/namespaces/default/pods", None)
        .await;
    assert_eq!(code, StatusCode::UNAUTHORIZED);
    let (_, review) = e.json("POST", "/apis/authentication.k8s.io/v1/tokenreviews", Some(json!({
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token}}))).await;
    assert_eq!(review["status"]["authenticated"], false);
    assert!(
        review["status"]["error"]
            .as_str()
            .unwrap()
            .contains("has been deleted"),
        "{review}"
    );
    // Too short a lifetime is refused.
    let (code, _) = e.json("POST", "/api/v1/namespaces/default/serviceaccounts/lister/token",
        Some(json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"expirationSeconds": 60}}))).await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY);
    e.close().await;
}
