//! Admission that reads other objects before a create: LimitRanges and ResourceQuotas;
//! and NodeRestriction, which holds a node to its own name.
//!
//! kube-apiserver runs these as admission plugins, after defaults and before the object
//! is stored, and so does Baton:
//! - **NodeRestriction**: a node agent may create only its own Node and its own Lease
//!   (the Node authorizer cannot tell, as a create names its object in the body).
//! - **LimitRanger** (mutating, before validation): a container without requests or
//!   limits gets its namespace's `defaultRequest` and `default`; then each container (or
//!   the pod, or a claim) is held to the ranges' `min`, `max` and `maxLimitRequestRatio`.
//! - **ServiceAccount** (mutating, pods): a pod that may have its ServiceAccount's token
//!   (`automountServiceAccountToken`, on the pod, else on the ServiceAccount, true unless
//!   one says false) gets the projected volume `kube-api-access-*`: a token bound to the
//!   pod (1 h, refreshed by the node), the cluster CA from the `kube-root-ca.crt`
//!   ConfigMap, and the namespace, mounted read-only at [`SERVICE_ACCOUNT_DIR`] in every
//!   container that mounts nothing there. Unlike kube-apiserver, a ServiceAccount that
//!   does not exist yet does not refuse the pod: it only means no opt-out to read, and a
//!   namespace's `default` ServiceAccount is made a moment after the namespace.
//! - **DefaultStorageClass** (mutating): a claim that names no class gets the default one.
//! - **ResourceQuota** (last): what the new object uses ([`baton_kube::quota::usage`]) is
//!   added to each matching quota's `status.used` with a compare-and-swap, and the create
//!   is refused with 403 if that would pass `spec.hard`. Two API servers charging at once
//!   conflict on the quota and one of them counts again, so a quota is never overrun. The
//!   quota controller recounts `used` from the objects, giving back what deleted (or
//!   never created) objects were charged.

use std::collections::BTreeMap;

use baton_kube::quantity::nanos;
use baton_kube::quota;
use serde_json::{json, Map, Value};

use crate::error::{ApiError, ApiResult};
use crate::objects::{Objects, ReadAt};
use crate::resources::{self, Resource};

fn s<'a>(v: &'a Value, ptr: &str) -> &'a str {
    v.pointer(ptr).and_then(Value::as_str).unwrap_or("")
}

fn q(v: Option<&Value>) -> Option<u128> {
    match v? {
        Value::String(s) => nanos(s).ok(),
        Value::Number(n) => n.as_u64().map(|n| n as u128 * 1_000_000_000),
        _ => None,
    }
}

fn forbidden(res: &Resource, name: &str, why: String) -> ApiError {
    ApiError::Forbidden {
        message: format!("{} {name:?} is forbidden: {why}", res.qualified()),
    }
}

/// NodeRestriction on creates: a node creates only the Node and Lease named after it.
pub(crate) fn node_restriction(
    user: &baton_auth::UserInfo,
    res: &Resource,
    obj: &Value,
) -> ApiResult<()> {
    let Some(node) = user.as_node() else {
        return Ok(());
    };
    let own = matches!(
        (res.group.as_str(), res.plural.as_str()),
        ("", "nodes") | ("coordination.k8s.io", "leases")
    );
    let name = s(obj, "/metadata/name");
    if own && name != node {
        return Err(forbidden(
            res,
            name,
            format!(
                "node {node:?} is not allowed to create a {} named {name:?}",
                res.kind
            ),
        ));
    }
    Ok(())
}

/// Where a pod's containers find their ServiceAccount's token, the CA and the namespace.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// The ServiceAccount plugin: mounts the pod's token, CA and namespace (see the module
/// docs).
pub(crate) async fn service_account(objects: &Objects, pod: &mut Value) -> ApiResult<()> {
    let ns = s(pod, "/metadata/namespace").to_string();
    let sa_name = s(pod, "/spec/serviceAccountName").to_string();
    let mount = match pod
        .pointer("/spec/automountServiceAccountToken")
        .and_then(Value::as_bool)
    {
        Some(m) => m,
        None => {
            let sa = objects
                .get_local(resources::builtin("ServiceAccount"), Some(&ns), &sa_name)
                .await?;
            sa.and_then(|sa| sa.get("automountServiceAccountToken")?.as_bool())
                .unwrap_or(true)
        }
    };
    let Some(spec) = pod.get_mut("spec").and_then(Value::as_object_mut) else {
        return Ok(());
    };
    let mounts_there = |c: &Value| {
        c.get("volumeMounts")
            .and_then(Value::as_array)
            .is_some_and(|m| {
                m.iter().any(|m| {
                    m.get("mountPath")
                        .and_then(Value::as_str)
                        .is_some_and(|p| p.trim_end_matches('/') == SERVICE_ACCOUNT_DIR)
                })
            })
    };
    let containers = ["initContainers", "containers"];
    let needy = containers.iter().any(|k| {
        spec.get(*k)
            .and_then(Value::as_array)
            .is_some_and(|cs| cs.iter().any(|c| !mounts_there(c)))
    });
    if !mount || !needy {
        return Ok(());
    }
    let volume = format!("kube-api-access-{}", crate::rest::random_suffix());
    let volumes = spec.entry("volumes").or_insert(json!([]));
    if let Some(list) = volumes.as_array_mut() {
        list.push(json!({
            "name": volume,
            "projected": {"defaultMode": 420, "sources": [
                {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                {"downwardAPI": {"items": [{"path": "namespace",
                    "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}},
            ]},
        }));
    }
    for k in containers {
        for c in spec
            .get_mut(k)
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
        {
            if mounts_there(c) {
                continue;
            }
            if let Some(m) = c.as_object_mut() {
                let list = m.entry("volumeMounts").or_insert(json!([]));
                if let Some(list) = list.as_array_mut() {
                    list.push(
                        json!({"name": volume, "readOnly": true, "mountPath": SERVICE_ACCOUNT_DIR}),
                    );
                }
            }
        }
    }
    Ok(())
}

/// What LimitRanges apply to: a pod's containers and the pod, or a claim.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Limited {
    Pod,
    Claim,
}

fn limited(res: &Resource) -> Option<Limited> {
    match (res.group.as_str(), res.plural.as_str()) {
        ("", "pods") => Some(Limited::Pod),
        ("", "persistentvolumeclaims") => Some(Limited::Claim),
        _ => None,
    }
}

/// Applies the namespace's LimitRanges to a new pod or claim: defaults, then bounds.
pub(crate) async fn limit_ranges(
    objects: &Objects,
    res: &Resource,
    ns: &str,
    obj: &mut Value,
) -> ApiResult<()> {
    let Some(what) = limited(res) else {
        return Ok(());
    };
    let ranges = objects
        .list_local(resources::builtin("LimitRange"), Some(ns))
        .await?;
    if ranges.is_empty() {
        return Ok(());
    }
    let items: Vec<&Value> = ranges
        .iter()
        .filter_map(|r| r.pointer("/spec/limits").and_then(Value::as_array))
        .flatten()
        .collect();
    let mut problems = Vec::new();
    match what {
        Limited::Pod => {
            for item in items.iter().filter(|i| s(i, "/type") == "Container") {
                for list in ["initContainers", "containers"] {
                    let Some(cs) = obj
                        .pointer_mut(&format!("/spec/{list}"))
                        .and_then(Value::as_array_mut)
                    else {
                        continue;
                    };
                    for c in cs {
                        default_container(c, item);
                        bounds(c, item, "Container", &mut problems);
                    }
                }
            }
            for item in items.iter().filter(|i| s(i, "/type") == "Pod") {
                let mut sum = json!({"resources": {"requests": {}, "limits": {}}});
                for kind in ["requests", "limits"] {
                    let mut totals: BTreeMap<String, u128> = BTreeMap::new();
                    for c in obj
                        .pointer("/spec/containers")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                    {
                        for (r, v) in c
                            .pointer(&format!("/resources/{kind}"))
                            .and_then(Value::as_object)
                            .into_iter()
                            .flatten()
                        {
                            *totals.entry(r.clone()).or_default() += q(Some(v)).unwrap_or(0);
                        }
                    }
                    for (r, n) in totals {
                        sum["resources"][kind][&r] = json!(quota::format(&r, n));
                    }
                }
                bounds(&sum, item, "Pod", &mut problems);
            }
        }
        Limited::Claim => {
            for item in items
                .iter()
                .filter(|i| s(i, "/type") == "PersistentVolumeClaim")
            {
                let claim = json!({"resources": obj.pointer("/spec/resources").cloned().unwrap_or(json!({}))});
                bounds(&claim, item, "PersistentVolumeClaim", &mut problems);
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(forbidden(
            res,
            s(obj, "/metadata/name"),
            format!("[{}]", problems.join(", ")),
        ))
    }
}

/// A container's missing limits and requests from a range's defaults. A request left
/// unset takes the limit, as Kubernetes defaults it.
fn default_container(c: &mut Value, item: &Value) {
    let Some(c) = c.as_object_mut() else { return };
    let resources = c.entry("resources").or_insert(json!({}));
    for (from, to) in [("default", "limits"), ("defaultRequest", "requests")] {
        let Some(defaults) = item.get(from).and_then(Value::as_object) else {
            continue;
        };
        let Some(r) = resources.as_object_mut() else {
            return;
        };
        let target = r.entry(to).or_insert(json!({}));
        let Some(target) = target.as_object_mut() else {
            continue;
        };
        for (k, v) in defaults {
            target.entry(k.clone()).or_insert(v.clone());
        }
    }
    let limits: Map<String, Value> = resources
        .get("limits")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    if let Some(r) = resources.as_object_mut() {
        let requests = r.entry("requests").or_insert(json!({}));
        if let Some(requests) = requests.as_object_mut() {
            for (k, v) in limits {
                requests.entry(k).or_insert(v);
            }
        }
    }
    for key in ["limits", "requests"] {
        if resources
            .get(key)
            .and_then(Value::as_object)
            .is_some_and(Map::is_empty)
        {
            if let Some(r) = resources.as_object_mut() {
                r.remove(key);
            }
        }
    }
}

/// Checks one container, pod or claim (`{resources: {requests, limits}}`) against a
/// range item, in kube-apiserver's words.
fn bounds(target: &Value, item: &Value, what: &str, problems: &mut Vec<String>) {
    let get = |kind: &str, r: &str| q(target.pointer(&format!("/resources/{kind}/{r}")));
    let bound = |key: &str| {
        item.get(key)
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default()
    };
    for (r, min) in bound("min") {
        let min_n = q(Some(&min)).unwrap_or(0);
        match get("requests", &r) {
            None => problems.push(format!(
                "minimum {r} usage per {what} is {}, but no request is specified",
                show(&min)
            )),
            Some(n) if n < min_n => problems.push(format!(
                "minimum {r} usage per {what} is {}, but request is {}",
                show(&min),
                quota::format(&r, n)
            )),
            Some(_) => {}
        }
    }
    for (r, max) in bound("max") {
        let max_n = q(Some(&max)).unwrap_or(0);
        // A claim is bounded by its request; everything else by its limit.
        let kind = if what == "PersistentVolumeClaim" {
            "requests"
        } else {
            "limits"
        };
        match get(kind, &r) {
            None => problems.push(format!(
                "maximum {r} usage per {what} is {}, but no limit is specified",
                show(&max)
            )),
            Some(n) if n > max_n => problems.push(format!(
                "maximum {r} usage per {what} is {}, but {} is {}",
                show(&max),
                if kind == "requests" {
                    "request"
                } else {
                    "limit"
                },
                quota::format(&r, n)
            )),
            Some(_) => {}
        }
    }
    for (r, ratio) in bound("maxLimitRequestRatio") {
        let (Some(limit), Some(request), Some(max)) =
            (get("limits", &r), get("requests", &r), q(Some(&ratio)))
        else {
            continue;
        };
        if request > 0 && limit * 1_000_000_000 > max * request {
            problems.push(format!(
                "{r} max limit to request ratio per {what} is {}, but provided ratio is {:.6}",
                show(&ratio),
                limit as f64 / request as f64
            ));
        }
    }
}

fn show(v: &Value) -> String {
    v.as_str().map_or_else(|| v.to_string(), str::to_string)
}

/// Gives a new claim that names no class the default StorageClass (the one annotated
/// `storageclass.kubernetes.io/is-default-class: "true"`; the newest if several), as
/// kube-apiserver's DefaultStorageClass plugin does. A claim with `storageClassName: ""`
/// asks for no class and keeps it.
pub(crate) async fn default_storage_class(
    objects: &Objects,
    res: &Resource,
    obj: &mut Value,
) -> ApiResult<()> {
    if limited(res) != Some(Limited::Claim)
        || obj
            .pointer("/spec/storageClassName")
            .is_some_and(|c| !c.is_null())
    {
        return Ok(());
    }
    let classes = objects
        .list_local(resources::builtin("StorageClass"), None)
        .await?;
    let newest = classes
        .iter()
        .filter(|c| {
            c.pointer("/metadata/annotations")
                .and_then(|a| a.get(baton_kube::storage::DEFAULT_CLASS))
                .and_then(Value::as_str)
                == Some("true")
        })
        .max_by_key(|c| s(c, "/metadata/creationTimestamp").to_string());
    if let (Some(c), Some(spec)) = (newest, obj.get_mut("spec").and_then(Value::as_object_mut)) {
        spec.insert("storageClassName".into(), json!(s(c, "/metadata/name")));
    }
    Ok(())
}

/// Charges a new object to its namespace's ResourceQuotas, or refuses it.
pub(crate) async fn charge_quota(
    objects: &Objects,
    res: &Resource,
    ns: &str,
    obj: &Value,
    dry_run: bool,
) -> ApiResult<()> {
    let quotas_res = resources::builtin("ResourceQuota");
    let name = s(obj, "/metadata/name");
    // Which quotas there are, as this member's store has them, from the watch cache:
    // most namespaces have none, and a create there reads nothing from the store. Each
    // quota is then read at the latest revision and charged with a compare-and-swap; a
    // conflict reads it again.
    let names: Vec<String> = objects
        .list_local(quotas_res, Some(ns))
        .await?
        .iter()
        .map(|q| s(q, "/metadata/name").to_string())
        .collect();
    if names.is_empty() {
        return Ok(());
    }
    let usage = quota::usage(&res.group, &res.plural, obj);
    if usage.is_empty() {
        return Ok(());
    }
    for qname in names {
        for _attempt in 0..32 {
            let Some((quota_obj, _)) = objects
                .get(quotas_res, Some(ns), &qname, ReadAt::Latest)
                .await?
            else {
                break;
            };
            let hard = quota_obj
                .pointer("/spec/hard")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default();
            let mut charged = false;
            let mut next = quota_obj.clone();
            for (key, limit) in &hard {
                let missing = quota::missing(obj, key);
                if res.group.is_empty() && res.plural == "pods" && !missing.is_empty() {
                    return Err(forbidden(
                        res,
                        name,
                        format!(
                            "failed quota: {qname}: must specify {key} for: {}",
                            missing.join(",")
                        ),
                    ));
                }
                let Some(add) = usage.get(key) else { continue };
                let used = match q(quota_obj.pointer(&format!("/status/used/{}", escape(key)))) {
                    Some(u) => u,
                    None => recount(objects, res, ns, key).await?,
                };
                let limit_n = q(Some(limit)).unwrap_or(0);
                if used + add > limit_n {
                    return Err(forbidden(
                        res,
                        name,
                        format!(
                            "exceeded quota: {qname}, requested: {key}={}, used: {key}={}, limited: {key}={}",
                            quota::format(key, *add),
                            quota::format(key, used),
                            show(limit)
                        ),
                    ));
                }
                next["status"]["used"][key] = json!(quota::format(key, used + add));
                charged = true;
            }
            if !charged || dry_run {
                break;
            }
            next["status"]["hard"] = Value::Object(hard.clone());
            let rev = crate::objects::rv_of(&quota_obj).unwrap_or(0);
            match objects
                .replace(quotas_res, Some(ns), &qname, next, rev)
                .await
            {
                Ok(_) => break,
                Err(ApiError::Conflict { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

/// A JSON pointer segment for a quota key (`count/pods` has a slash).
fn escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// What the objects of `res` in `ns` use of `key` now: for a quota whose status has not
/// been counted yet.
async fn recount(objects: &Objects, res: &Resource, ns: &str, key: &str) -> ApiResult<u128> {
    let all = objects
        .list(res, Some(ns), ReadAt::Latest, 0, None, |_| true)
        .await?
        .items;
    Ok(all
        .iter()
        .filter_map(|o| quota::usage(&res.group, &res.plural, o).get(key).copied())
        .sum())
}
