//! The roles and bindings every cluster starts with, as kube-apiserver's bootstrap
//! policy: `cluster-admin` (bound to `system:masters`), the user-facing `admin`, `edit`
//! and `view` (aggregated from `system:aggregate-to-*`, so CRDs can extend them), the
//! discovery and self-review roles every authenticated user has, and least-privilege
//! roles for Baton's own scheduler and controller manager.
//!
//! Each is written at start if missing, and brought back to its defaults if it carries
//! `rbac.authorization.kubernetes.io/autoupdate: "true"` (as they all do unless an
//! administrator sets it to false), so an upgrade adds what a new version needs.

use serde_json::{json, Value};

use crate::error::{ApiError, ApiResult};
use crate::objects::{Objects, ReadAt};
use crate::resources;

const AUTOUPDATE: &str = "rbac.authorization.kubernetes.io/autoupdate";

/// The role that lets bootstrap tokens and nodes ask for node client certificates.
pub const NODE_BOOTSTRAPPER: &str = "system:node-bootstrapper";

/// The user the scheduler acts as.
pub const SCHEDULER: &str = "system:kube-scheduler";
/// The user the controller manager acts as.
pub const CONTROLLER_MANAGER: &str = "system:kube-controller-manager";

fn rule(groups: &[&str], resources: &[&str], verbs: &[&str]) -> Value {
    json!({"apiGroups": groups, "resources": resources, "verbs": verbs})
}

fn urls(paths: &[&str], verbs: &[&str]) -> Value {
    json!({"nonResourceURLs": paths, "verbs": verbs})
}

const READ: &[&str] = &["get", "list", "watch"];
const WRITE: &[&str] = &["create", "delete", "deletecollection", "patch", "update"];

fn view_rules() -> Vec<Value> {
    vec![
        // What system:aggregated-metrics-reader adds to view, edit and admin.
        rule(
            &["metrics.k8s.io"],
            &["pods", "nodes"],
            &["get", "list", "watch"],
        ),
        rule(
            &[""],
            &[
                "configmaps",
                "endpoints",
                "persistentvolumeclaims",
                "persistentvolumeclaims/status",
                "pods",
                "pods/log",
                "pods/status",
                "replicationcontrollers",
                "replicationcontrollers/scale",
                "replicationcontrollers/status",
                "serviceaccounts",
                "services",
                "services/status",
                "bindings",
                "events",
                "limitranges",
                "resourcequotas",
                "resourcequotas/status",
                "namespaces",
                "namespaces/status",
            ],
            READ,
        ),
        rule(
            &["apps"],
            &[
                "controllerrevisions",
                "daemonsets",
                "daemonsets/status",
                "deployments",
                "deployments/scale",
                "deployments/status",
                "replicasets",
                "replicasets/scale",
                "replicasets/status",
                "statefulsets",
                "statefulsets/scale",
                "statefulsets/status",
            ],
            READ,
        ),
        rule(
            &["autoscaling"],
            &[
                "horizontalpodautoscalers",
                "horizontalpodautoscalers/status",
            ],
            READ,
        ),
        rule(
            &["batch"],
            &["cronjobs", "cronjobs/status", "jobs", "jobs/status"],
            READ,
        ),
        rule(&["discovery.k8s.io"], &["endpointslices"], READ),
        rule(
            &["policy"],
            &["poddisruptionbudgets", "poddisruptionbudgets/status"],
            READ,
        ),
        rule(
            &["networking.k8s.io"],
            &["ingresses", "ingresses/status", "networkpolicies"],
            READ,
        ),
        rule(&["events.k8s.io"], &["events"], READ),
    ]
}

fn edit_rules() -> Vec<Value> {
    vec![
        rule(
            &[""],
            &["pods/eviction", "serviceaccounts/token"],
            &["create"],
        ),
        rule(
            &[""],
            &[
                "pods",
                "configmaps",
                "endpoints",
                "persistentvolumeclaims",
                "replicationcontrollers",
                "replicationcontrollers/scale",
                "secrets",
                "serviceaccounts",
                "services",
            ],
            WRITE,
        ),
        rule(&[""], &["secrets"], READ),
        rule(&[""], &["serviceaccounts"], &["impersonate"]),
        rule(
            &["apps"],
            &[
                "daemonsets",
                "deployments",
                "deployments/rollback",
                "deployments/scale",
                "replicasets",
                "replicasets/scale",
                "statefulsets",
                "statefulsets/scale",
            ],
            WRITE,
        ),
        rule(&["autoscaling"], &["horizontalpodautoscalers"], WRITE),
        rule(&["batch"], &["cronjobs", "jobs"], WRITE),
        rule(&["discovery.k8s.io"], &["endpointslices"], WRITE),
        rule(
            &["networking.k8s.io"],
            &["ingresses", "networkpolicies"],
            WRITE,
        ),
        rule(&["policy"], &["poddisruptionbudgets"], WRITE),
    ]
}

fn admin_rules() -> Vec<Value> {
    vec![
        rule(
            &["authorization.k8s.io"],
            &["localsubjectaccessreviews"],
            &["create"],
        ),
        rule(
            &["rbac.authorization.k8s.io"],
            &["rolebindings", "roles"],
            crate::strategy::ALL_VERBS,
        ),
    ]
}

fn scheduler_rules() -> Vec<Value> {
    vec![
        rule(
            &[""],
            &[
                "pods",
                "nodes",
                "namespaces",
                "services",
                "persistentvolumeclaims",
                "persistentvolumes",
                "replicationcontrollers",
            ],
            READ,
        ),
        rule(&["apps"], &["replicasets", "statefulsets"], READ),
        rule(&["storage.k8s.io"], &["storageclasses", "csinodes"], READ),
        rule(&["policy"], &["poddisruptionbudgets"], READ),
        rule(&[""], &["pods/binding", "bindings"], &["create"]),
        rule(&[""], &["pods/status"], &["patch", "update"]),
        rule(&[""], &["persistentvolumeclaims"], &["patch", "update"]),
        rule(
            &["", "events.k8s.io"],
            &["events"],
            &["create", "patch", "update"],
        ),
        rule(
            &["coordination.k8s.io"],
            &["leases"],
            &["create", "get", "update", "patch"],
        ),
        rule(
            &["authorization.k8s.io"],
            &["selfsubjectaccessreviews"],
            &["create"],
        ),
    ]
}

/// What Baton's controllers do between them: read, update and delete any object (the
/// garbage collector and the namespace controller reach every kind), create only the
/// kinds the controllers make, and fill aggregated ClusterRoles. No impersonation, no
/// binding, no Secrets made.
fn controller_manager_rules() -> Vec<Value> {
    vec![
        rule(
            &["*"],
            &["*"],
            &[
                "get",
                "list",
                "watch",
                "patch",
                "update",
                "delete",
                "deletecollection",
            ],
        ),
        rule(
            &[""],
            &[
                "pods",
                "events",
                "configmaps",
                "endpoints",
                "persistentvolumes",
                "persistentvolumeclaims",
                "serviceaccounts",
                "pods/eviction",
            ],
            &["create"],
        ),
        rule(
            &["apps"],
            &["replicasets", "controllerrevisions"],
            &["create"],
        ),
        rule(&["batch"], &["jobs"], &["create"]),
        rule(&["discovery.k8s.io"], &["endpointslices"], &["create"]),
        // csrapproving and csrsigning: decide and sign for the cluster's signers.
        rule(&["certificates.k8s.io"], &["signers"], &["approve", "sign"]),
        rule(&["coordination.k8s.io"], &["leases"], &["create"]),
        rule(&["events.k8s.io"], &["events"], &["create"]),
        rule(
            &["rbac.authorization.k8s.io"],
            &["clusterroles"],
            &["escalate"],
        ),
    ]
}

fn cluster_role(name: &str, rules: Vec<Value>, labels: Value, aggregate: Option<&[&str]>) -> Value {
    let mut v = json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": {"name": name, "labels": labels, "annotations": {AUTOUPDATE: "true"}},
        "rules": rules,
    });
    if let Some(sources) = aggregate {
        let selectors: Vec<Value> = sources
            .iter()
            .map(|s| json!({"matchLabels": {format!("rbac.authorization.k8s.io/aggregate-to-{s}"): "true"}}))
            .collect();
        v["aggregationRule"] = json!({"clusterRoleSelectors": selectors});
    }
    v
}

fn binding(name: &str, role: &str, subjects: &[(&str, &str)]) -> Value {
    let subjects: Vec<Value> = subjects
        .iter()
        .map(|(kind, n)| json!({"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": n}))
        .collect();
    json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": name, "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"},
                     "annotations": {AUTOUPDATE: "true"}},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
        "subjects": subjects,
    })
}

/// The default ClusterRoles, in the order they are written.
pub fn cluster_roles() -> Vec<Value> {
    let defaults = json!({"kubernetes.io/bootstrapping": "rbac-defaults"});
    let agg = |to: &[&str]| {
        let mut l = json!({"kubernetes.io/bootstrapping": "rbac-defaults"});
        for t in to {
            l[format!("rbac.authorization.k8s.io/aggregate-to-{t}")] = json!("true");
        }
        l
    };
    let view = view_rules();
    let edit: Vec<Value> = edit_rules()
        .into_iter()
        .chain(view.iter().cloned())
        .collect();
    let admin: Vec<Value> = admin_rules()
        .into_iter()
        .chain(edit.iter().cloned())
        .collect();
    let discovery_paths = [
        "/api",
        "/api/*",
        "/apis",
        "/apis/*",
        "/healthz",
        "/livez",
        "/readyz",
        "/version",
        "/version/",
        "/openapi",
        "/openapi/*",
    ];
    vec![
        cluster_role(
            "cluster-admin",
            vec![rule(&["*"], &["*"], &["*"]), urls(&["*"], &["*"])],
            defaults.clone(),
            None,
        ),
        cluster_role(
            "system:aggregate-to-view",
            view_rules(),
            agg(&["view", "edit", "admin"]),
            None,
        ),
        cluster_role(
            "system:aggregate-to-edit",
            edit_rules(),
            agg(&["edit", "admin"]),
            None,
        ),
        cluster_role(
            "system:aggregate-to-admin",
            admin_rules(),
            agg(&["admin"]),
            None,
        ),
        // Aggregated, with the rules they aggregate written in from the start, so that
        // they grant from the first request (the aggregation controller keeps them).
        cluster_role("view", view, agg(&["edit"]), Some(&["view"])),
        cluster_role("edit", edit, agg(&["admin"]), Some(&["edit"])),
        cluster_role("admin", admin, defaults.clone(), Some(&["admin"])),
        cluster_role(
            "system:discovery",
            vec![urls(&discovery_paths, &["get"])],
            defaults.clone(),
            None,
        ),
        cluster_role(
            "system:public-info-viewer",
            vec![urls(
                &["/healthz", "/livez", "/readyz", "/version", "/version/"],
                &["get"],
            )],
            defaults.clone(),
            None,
        ),
        cluster_role(
            "system:basic-user",
            vec![
                rule(
                    &["authorization.k8s.io"],
                    &["selfsubjectaccessreviews", "selfsubjectrulesreviews"],
                    &["create"],
                ),
                rule(
                    &["authentication.k8s.io"],
                    &["selfsubjectreviews"],
                    &["create"],
                ),
            ],
            defaults.clone(),
            None,
        ),
        cluster_role(
            "system:service-account-issuer-discovery",
            vec![urls(
                &["/.well-known/openid-configuration", "/openid/v1/jwks"],
                &["get"],
            )],
            defaults.clone(),
            None,
        ),
        cluster_role(
            "system:auth-delegator",
            vec![
                rule(&["authentication.k8s.io"], &["tokenreviews"], &["create"]),
                rule(
                    &["authorization.k8s.io"],
                    &["subjectaccessreviews"],
                    &["create"],
                ),
            ],
            defaults.clone(),
            None,
        ),
        // What a joining node's bootstrap token may do: ask for its client certificate
        // and read the answer (kube-apiserver's system:node-bootstrapper).
        cluster_role(
            NODE_BOOTSTRAPPER,
            vec![rule(
                &["certificates.k8s.io"],
                &["certificatesigningrequests"],
                &["create", "get", "list", "watch"],
            )],
            defaults.clone(),
            None,
        ),
        cluster_role(SCHEDULER, scheduler_rules(), defaults.clone(), None),
        cluster_role(
            CONTROLLER_MANAGER,
            controller_manager_rules(),
            defaults,
            None,
        ),
    ]
}

/// The default ClusterRoleBindings.
pub fn cluster_role_bindings() -> Vec<Value> {
    vec![
        binding(
            "cluster-admin",
            "cluster-admin",
            &[("Group", baton_auth::MASTERS)],
        ),
        binding(
            "system:discovery",
            "system:discovery",
            &[("Group", baton_auth::AUTHENTICATED)],
        ),
        binding(
            "system:public-info-viewer",
            "system:public-info-viewer",
            &[
                ("Group", baton_auth::AUTHENTICATED),
                ("Group", "system:unauthenticated"),
            ],
        ),
        binding(
            "system:basic-user",
            "system:basic-user",
            &[("Group", baton_auth::AUTHENTICATED)],
        ),
        binding(
            "system:service-account-issuer-discovery",
            "system:service-account-issuer-discovery",
            &[("Group", baton_auth::SERVICE_ACCOUNTS)],
        ),
        // Bootstrap tokens ask for a node's first certificate; nodes renew theirs.
        binding(
            NODE_BOOTSTRAPPER,
            NODE_BOOTSTRAPPER,
            &[
                ("Group", crate::access::authn::BOOTSTRAPPERS),
                ("Group", "system:nodes"),
            ],
        ),
        binding(SCHEDULER, SCHEDULER, &[("User", SCHEDULER)]),
        binding(
            CONTROLLER_MANAGER,
            CONTROLLER_MANAGER,
            &[("User", CONTROLLER_MANAGER)],
        ),
    ]
}

/// Writes the defaults that are missing, and resets those that ask to be kept current.
pub async fn reconcile(objects: &Objects) -> ApiResult<()> {
    let roles = resources::builtin("ClusterRole");
    let bindings = resources::builtin("ClusterRoleBinding");
    for (res, want) in cluster_roles()
        .into_iter()
        .map(|r| (roles, r))
        .chain(cluster_role_bindings().into_iter().map(|b| (bindings, b)))
    {
        let name = want["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        match objects.get(res, None, &name, ReadAt::Latest).await? {
            None => {
                let mut obj = want;
                obj["metadata"]["uid"] = json!(uuid::Uuid::new_v4().to_string());
                obj["metadata"]["creationTimestamp"] = json!(crate::rest::now());
                match objects.create(res, None, &name, obj, &[]).await {
                    Ok(_) | Err(ApiError::AlreadyExists { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            Some((have, rev)) => {
                let keep = have
                    .pointer(&format!(
                        "/metadata/annotations/{}",
                        AUTOUPDATE.replace('/', "~1")
                    ))
                    .and_then(Value::as_str)
                    == Some("false");
                let fields = ["rules", "aggregationRule", "roleRef", "subjects"];
                if keep || fields.iter().all(|f| have.get(*f) == want.get(*f)) {
                    continue;
                }
                let mut obj = have.clone();
                for f in fields {
                    match want.get(f) {
                        Some(v) => obj[f] = v.clone(),
                        None => {
                            if let Some(m) = obj.as_object_mut() {
                                m.remove(f);
                            }
                        }
                    }
                }
                // The aggregation controller owns an aggregated role's rules.
                if want.get("aggregationRule").is_some() {
                    obj["rules"] = have.get("rules").cloned().unwrap_or(json!([]));
                    if have.get("aggregationRule") == want.get("aggregationRule") {
                        continue;
                    }
                }
                match objects.replace(res, None, &name, obj, rev).await {
                    Ok(_) | Err(ApiError::Conflict { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
        }
    }
    Ok(())
}
