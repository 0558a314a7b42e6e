//! ValidatingAdmissionPolicy through the router in process: a policy bound with Deny
//! refuses what its validations reject, in kube's words; parameters, match conditions,
//! namespace selectors, messageExpression and failurePolicy behave as in Kubernetes; a
//! policy whose expression does not compile is refused when it is written.

mod support;

use std::time::Duration;

use axum::http::StatusCode;
use serde_json::{json, Value};
use support::{env, Env};

const POLICIES: &str = "/apis/admissionregistration.k8s.io/v1/validatingadmissionpolicies";
const BINDINGS: &str = "/apis/admissionregistration.k8s.io/v1/validatingadmissionpolicybindings";
const DEPLOYMENTS: &str = "/apis/apps/v1/namespaces/default/deployments";

fn deployment(name: &str, labels: Value, replicas: i64) -> Value {
    json!({"apiVersion": "apps/v1", "kind": "Deployment",
           "metadata": {"name": name, "labels": labels},
           "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                    "template": {"metadata": {"labels": {"app": name}},
                                 "spec": {"containers": [{"name": "c", "image": "registry.example/app:1"}]}}}})
}

fn policy(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
           "metadata": {"name": name}, "spec": spec})
}

fn deployments_rule() -> Value {
    json!({"resourceRules": [{"apiGroups": ["apps"], "apiVersions": ["v1"],
                              "operations": ["CREATE", "UPDATE"], "resources": ["deployments"]}]})
}

async fn bind(e: &Env, name: &str, policy: &str, extra: Value) {
    let mut spec = json!({"policyName": policy, "validationActions": ["Deny"]});
    if let (Some(s), Some(x)) = (spec.as_object_mut(), extra.as_object()) {
        s.extend(x.clone());
    }
    let (code, got) = e
        .json(
            "POST",
            BINDINGS,
            Some(json!({"apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicyBinding", "metadata": {"name": name}, "spec": spec})),
        )
        .await;
    assert_eq!(code, StatusCode::CREATED, "{got}");
}

/// Creates `body` at `uri` until the answer is `want` (policies take effect through the
/// server's watch of them), then returns the answer.
async fn until(e: &Env, uri: &str, body: Value, want: StatusCode) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (code, got) = e.json("POST", uri, Some(body.clone())).await;
        if code == want {
            return got;
        }
        if code.is_success() {
            let name = body["metadata"]["name"].as_str().unwrap();
            e.json("DELETE", &format!("{uri}/{name}"), None).await;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{uri} stays {code}: {got}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_denies_a_deployment_without_a_label() {
    let e = env().await;
    let (code, got) = e
        .json("POST", POLICIES, Some(policy("require-team", json!({
            "matchConstraints": deployments_rule(),
            "validations": [{"expression": "has(object.metadata.labels) && 'team' in object.metadata.labels",
                             "message": "every Deployment needs a team label"}]}))))
        .await;
    assert_eq!(code, StatusCode::CREATED, "{got}");
    bind(&e, "require-team-binding", "require-team", json!({})).await;
    let got = until(
        &e,
        DEPLOYMENTS,
        deployment("web", json!({"app": "web"}), 1),
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(
        got["message"],
        r#"Deployment "web" is invalid: : ValidatingAdmissionPolicy 'require-team' with binding 'require-team-binding' denied request: every Deployment needs a team label"#
    );
    let (code, got) = e
        .json(
            "POST",
            DEPLOYMENTS,
            Some(deployment("web", json!({"team": "a"}), 1)),
        )
        .await;
    assert_eq!(code, StatusCode::CREATED, "{got}");
    // An update is checked too.
    let mut d = got.clone();
    d["metadata"]["labels"] = json!({"app": "web"});
    let (code, got) = e.json("PUT", &format!("{DEPLOYMENTS}/web"), Some(d)).await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{got}");
    // Other kinds are not concerned.
    let (code, _) = e
        .json(
            "POST",
            "/api/v1/namespaces/default/configmaps",
            Some(json!({"metadata": {"name": "c"}})),
        )
        .await;
    assert_eq!(code, StatusCode::CREATED);
    e.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parameters_conditions_and_failure_policies_work_as_in_kubernetes() {
    let e = env().await;
    // A ceiling from a ConfigMap parameter, with the message made by an expression.
    let (code, got) = e.json("POST", POLICIES, Some(policy("max-replicas", json!({
        "paramKind": {"apiVersion": "v1", "kind": "ConfigMap"},
        "matchConstraints": deployments_rule(),
        "matchConditions": [{"name": "not-exempt", "expression": "!('exempt' in object.metadata.labels)"}],
        "variables": [{"name": "ceiling", "expression": "int(params.data.maxReplicas)"}],
        "validations": [{"expression": "object.spec.replicas <= variables.ceiling",
                         "messageExpression": "'replicas must be at most ' + string(variables.ceiling)",
                         "reason": "Forbidden"}]})))).await;
    assert_eq!(code, StatusCode::CREATED, "{got}");
    bind(
        &e,
        "max-replicas",
        "max-replicas",
        json!({"paramRef": {"name": "limits", "namespace": "default",
        "parameterNotFoundAction": "Deny"}}),
    )
    .await;
    // No parameter yet: Deny.
    let got = until(
        &e,
        DEPLOYMENTS,
        deployment("a", json!({"x": "y"}), 1),
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert!(
        got["message"]
            .as_str()
            .unwrap()
            .contains("no params found for policy binding"),
        "{got}"
    );
    let (code, _) = e
        .json(
            "POST",
            "/api/v1/namespaces/default/configmaps",
            Some(json!({"metadata": {"name": "limits"}, "data": {"maxReplicas": "3"}})),
        )
        .await;
    assert_eq!(code, StatusCode::CREATED);
    let (code, got) = e
        .json(
            "POST",
            DEPLOYMENTS,
            Some(deployment("a", json!({"x": "y"}), 3)),
        )
        .await;
    assert_eq!(code, StatusCode::CREATED, "{got}");
    let (code, got) = e
        .json(
            "POST",
            DEPLOYMENTS,
            Some(deployment("b", json!({"x": "y"}), 4)),
        )
        .await;
    assert_eq!(code, StatusCode::FORBIDDEN, "{got}");
    assert_eq!(
        got["message"],
        r#"deployments.apps "b" is forbidden: ValidatingAdmissionPolicy 'max-replicas' with binding 'max-replicas' denied request: replicas must be at most 3"#
    );
    // A match condition that does not hold skips the policy.
    let (code, _) = e
        .json(
            "POST",
            DEPLOYMENTS,
            Some(deployment("c", json!({"exempt": "yes"}), 9)),
        )
        .await;
    assert_eq!(code, StatusCode::CREATED);

    // An expression that fails at run time: Fail refuses, Ignore lets through.
    for (name, policy_fail) in [("broken-fail", "Fail"), ("broken-ignore", "Ignore")] {
        let (code, got) = e.json("POST", POLICIES, Some(policy(name, json!({
            "failurePolicy": policy_fail,
            "matchConstraints": {"resourceRules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["secrets"]}]},
            "validations": [{"expression": "object.data.missing == 'x'"}]})))).await;
        assert_eq!(code, StatusCode::CREATED, "{got}");
        bind(&e, name, name, json!({})).await;
    }
    let got = until(
        &e,
        "/api/v1/namespaces/default/secrets",
        json!({"metadata": {"name": "s"}, "data": {}}),
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert!(
        got["message"]
            .as_str()
            .unwrap()
            .contains("ValidatingAdmissionPolicy 'broken-fail'"),
        "{got}"
    );
    assert!(
        got["message"]
            .as_str()
            .unwrap()
            .contains("resulted in error"),
        "{got}"
    );
    let (code, _) = e
        .json("DELETE", &format!("{BINDINGS}/broken-fail"), None)
        .await;
    assert!(code.is_success());
    until(
        &e,
        "/api/v1/namespaces/default/secrets",
        json!({"metadata": {"name": "s"}, "data": {}}),
        StatusCode::CREATED,
    )
    .await;
    e.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_selectors_and_bad_policies() {
    let e = env().await;
    for (ns, labels) in [("prod", json!({"env": "prod"})), ("dev", json!({}))] {
        let (code, _) = e
            .json(
                "POST",
                "/api/v1/namespaces",
                Some(json!({"metadata": {"name": ns, "labels": labels}})),
            )
            .await;
        assert_eq!(code, StatusCode::CREATED);
    }
    let (code, got) = e.json("POST", POLICIES, Some(policy("no-configmaps-in-prod", json!({
        "matchConstraints": {"resourceRules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["configmaps"]}],
                             "namespaceSelector": {"matchLabels": {"env": "prod"}}},
        "validations": [{"expression": "false", "message": "no"}]})))).await;
    assert_eq!(code, StatusCode::CREATED, "{got}");
    bind(&e, "b", "no-configmaps-in-prod", json!({})).await;
    until(
        &e,
        "/api/v1/namespaces/prod/configmaps",
        json!({"metadata": {"name": "c"}}),
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    let (code, _) = e
        .json(
            "POST",
            "/api/v1/namespaces/dev/configmaps",
            Some(json!({"metadata": {"name": "c"}})),
        )
        .await;
    assert_eq!(code, StatusCode::CREATED);

    // An expression that does not compile is refused when the policy is written.
    let (code, got) = e
        .json(
            "POST",
            POLICIES,
            Some(policy(
                "bad",
                json!({
        "matchConstraints": deployments_rule(),
        "validations": [{"expression": "object.spec.replicas <="}]}),
            )),
        )
        .await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{got}");
    assert!(
        got["message"]
            .as_str()
            .unwrap()
            .contains("spec.validations[0].expression"),
        "{got}"
    );
    let (code, got) = e
        .json(
            "POST",
            POLICIES,
            Some(policy(
                "unknown-name",
                json!({
        "matchConstraints": deployments_rule(),
        "validations": [{"expression": "self.x == 1"}]}),
            )),
        )
        .await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{got}");
    // A binding must say what a failure does.
    let (code, _) = e
        .json(
            "POST",
            BINDINGS,
            Some(json!({"apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding", "metadata": {"name": "x"},
        "spec": {"policyName": "p", "validationActions": ["Deny", "Warn"]}})),
        )
        .await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY);
    e.close().await;
}

const MUTATING: &str = "/apis/admissionregistration.k8s.io/v1alpha1/mutatingadmissionpolicies";
const MUTATING_BINDINGS: &str =
    "/apis/admissionregistration.k8s.io/v1alpha1/mutatingadmissionpolicybindings";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutating_policies_label_and_patch_what_they_match() {
    let e = env().await;
    // The team comes from a parameter; the replicas are patched by JSONPatch.
    let (code, got) = e
        .json(
            "POST",
            "/api/v1/namespaces/default/configmaps",
            Some(json!({"apiVersion": "v1", "kind": "ConfigMap",
                        "metadata": {"name": "owner"}, "data": {"team": "blue"}})),
        )
        .await;
    assert_eq!(code, StatusCode::CREATED, "{got}");
    let (code, got) = e
        .json(
            "POST",
            MUTATING,
            Some(json!({"apiVersion": "admissionregistration.k8s.io/v1alpha1",
                "kind": "MutatingAdmissionPolicy", "metadata": {"name": "stamp"},
                "spec": {
                    "paramKind": {"apiVersion": "v1", "kind": "ConfigMap"},
                    "matchConstraints": deployments_rule(),
                    "matchConditions": [{"name": "not-opted-out",
                        "expression": "!has(object.metadata.labels) || !('no-stamp' in object.metadata.labels)"}],
                    "mutations": [
                        {"patchType": "ApplyConfiguration", "applyConfiguration": {"expression":
                            "Object{metadata: Object.metadata{labels: {\"team\": params.data.team}}}"}},
                        {"patchType": "JSONPatch", "jsonPatch": {"expression":
                            "[JSONPatch{op: \"replace\", path: \"/spec/replicas\", value: object.spec.replicas * 2}]"}}
                    ]}})),
        )
        .await;
    assert_eq!(code, StatusCode::CREATED, "{got}");
    let (code, got) = e
        .json(
            "POST",
            MUTATING_BINDINGS,
            Some(
                json!({"apiVersion": "admissionregistration.k8s.io/v1alpha1",
                "kind": "MutatingAdmissionPolicyBinding", "metadata": {"name": "stamp"},
                "spec": {"policyName": "stamp",
                         "paramRef": {"name": "owner", "namespace": "default",
                                      "parameterNotFoundAction": "Deny"}}}),
            ),
        )
        .await;
    assert_eq!(code, StatusCode::CREATED, "{got}");
    // The policy takes effect through the server's watch: wait for the label.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let made = loop {
        let (code, got) = e
            .json(
                "POST",
                DEPLOYMENTS,
                Some(deployment("web", json!({"app": "web"}), 2)),
            )
            .await;
        assert_eq!(code, StatusCode::CREATED, "{got}");
        if got.pointer("/metadata/labels/team").is_some() {
            break got;
        }
        e.json("DELETE", &format!("{DEPLOYMENTS}/web"), None).await;
        assert!(
            tokio::time::Instant::now() < deadline,
            "never mutated: {got}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        made["metadata"]["labels"],
        json!({"app": "web", "team": "blue"})
    );
    assert_eq!(made["spec"]["replicas"], 4);
    // The matchCondition leaves an opted-out Deployment alone.
    let (code, got) = e
        .json(
            "POST",
            DEPLOYMENTS,
            Some(deployment("free", json!({"no-stamp": "1"}), 1)),
        )
        .await;
    assert_eq!(code, StatusCode::CREATED, "{got}");
    assert_eq!(got["metadata"]["labels"], json!({"no-stamp": "1"}));
    assert_eq!(got["spec"]["replicas"], 1);
    // A mutation that cannot apply refuses the write (failurePolicy Fail).
    let (code, got) = e
        .json(
            "POST",
            MUTATING,
            Some(
                json!({"apiVersion": "admissionregistration.k8s.io/v1alpha1",
                "kind": "MutatingAdmissionPolicy", "metadata": {"name": "broken"},
                "spec": {"matchConstraints": deployments_rule(),
                    "mutations": [{"patchType": "JSONPatch", "jsonPatch": {"expression":
                        "[JSONPatch{op: \"remove\", path: \"/spec/nothing/here\"}]"}}]}}),
            ),
        )
        .await;
    assert_eq!(code, StatusCode::CREATED, "{got}");
    let (code, got) = e
        .json(
            "POST",
            MUTATING_BINDINGS,
            Some(
                json!({"apiVersion": "admissionregistration.k8s.io/v1alpha1",
                "kind": "MutatingAdmissionPolicyBinding", "metadata": {"name": "broken"},
                "spec": {"policyName": "broken"}}),
            ),
        )
        .await;
    assert_eq!(code, StatusCode::CREATED, "{got}");
    let got = until(
        &e,
        DEPLOYMENTS,
        deployment("late", json!({"no-stamp": "1"}), 1),
        StatusCode::FORBIDDEN,
    )
    .await;
    assert!(
        got["message"]
            .as_str()
            .unwrap_or_default()
            .contains("MutatingAdmissionPolicy 'broken' with binding 'broken' failed"),
        "{got}"
    );
    // An expression that does not compile is refused when the policy is written.
    let (code, got) = e
        .json(
            "POST",
            MUTATING,
            Some(
                json!({"apiVersion": "admissionregistration.k8s.io/v1alpha1",
                "kind": "MutatingAdmissionPolicy", "metadata": {"name": "bad"},
                "spec": {"matchConstraints": deployments_rule(),
                    "mutations": [{"patchType": "ApplyConfiguration",
                                   "applyConfiguration": {"expression": "Object{"}}]}}),
            ),
        )
        .await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{got}");
}
