//! What an object counts against a ResourceQuota.
//!
//! kube-apiserver's quota admission and kube-controller-manager's quota controller share
//! one set of evaluators, so that what admission charges is what the controller later
//! recounts. This is Baton's: [`usage`] gives, for one object, each quota resource it
//! uses (`pods`, `requests.cpu`, `count/deployments.apps`…) in nano-units.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::quantity::nanos;

const NANO: u128 = 1_000_000_000;

/// The quota resources an object of `group`/`plural` uses, in nano-units (a count of 1
/// is `1_000_000_000`). Objects that no longer count (a finished pod) use nothing.
pub fn usage(group: &str, plural: &str, obj: &Value) -> BTreeMap<String, u128> {
    let mut out = BTreeMap::new();
    let count = if group.is_empty() {
        format!("count/{plural}")
    } else {
        format!("count/{plural}.{group}")
    };
    if group.is_empty() && plural == "pods" {
        let phase = obj
            .pointer("/status/phase")
            .and_then(Value::as_str)
            .unwrap_or("");
        if matches!(phase, "Succeeded" | "Failed") {
            return out;
        }
        out.insert(count, NANO);
        out.insert("pods".into(), NANO);
        for (key, sum) in pod_resources(obj) {
            out.insert(key, sum);
        }
        return out;
    }
    out.insert(count, NANO);
    if !group.is_empty() {
        return out;
    }
    match plural {
        "services" => {
            out.insert("services".into(), NANO);
            let ports = obj
                .pointer("/spec/ports")
                .and_then(Value::as_array)
                .map_or(0, Vec::len) as u128;
            match obj.pointer("/spec/type").and_then(Value::as_str) {
                Some("NodePort") => {
                    out.insert("services.nodeports".into(), ports * NANO);
                }
                Some("LoadBalancer") => {
                    out.insert("services.loadbalancers".into(), NANO);
                    out.insert("services.nodeports".into(), ports * NANO);
                }
                _ => {}
            }
        }
        "persistentvolumeclaims" => {
            out.insert("persistentvolumeclaims".into(), NANO);
            if let Some(q) = obj
                .pointer("/spec/resources/requests/storage")
                .and_then(quantity)
            {
                out.insert("requests.storage".into(), q);
            }
        }
        "configmaps" | "secrets" | "replicationcontrollers" | "resourcequotas" => {
            out.insert(plural.to_string(), NANO);
        }
        _ => {}
    }
    out
}

fn quantity(v: &Value) -> Option<u128> {
    match v {
        Value::String(s) => nanos(s).ok(),
        Value::Number(n) => n.as_u64().map(|n| n as u128 * NANO),
        _ => None,
    }
}

/// A pod's requests and limits as quota names them: the larger of the containers' sum
/// and the biggest init container, as Kubernetes sizes a pod.
fn pod_resources(pod: &Value) -> BTreeMap<String, u128> {
    let mut out = BTreeMap::new();
    for (kind, short) in [("requests", true), ("limits", false)] {
        for res in ["cpu", "memory", "ephemeral-storage"] {
            let of = |list: &str| -> Vec<u128> {
                pod.pointer(&format!("/spec/{list}"))
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(|c| c.pointer(&format!("/resources/{kind}/{res}")))
                    .filter_map(quantity)
                    .collect()
            };
            let sum: u128 = of("containers").iter().sum();
            let init = of("initContainers").into_iter().max().unwrap_or(0);
            let total = sum.max(init);
            if total == 0 {
                continue;
            }
            out.insert(format!("{kind}.{res}"), total);
            if short {
                out.insert(res.to_string(), total);
            }
        }
    }
    out
}

/// Which containers lack a value a quota needs (`requests.cpu` needs every container
/// to request cpu), as kube-apiserver refuses them.
pub fn missing(obj: &Value, resource: &str) -> Vec<String> {
    let Some((kind, res)) = resource
        .split_once('.')
        .filter(|(k, _)| *k == "requests" || *k == "limits")
        .or_else(|| {
            matches!(resource, "cpu" | "memory" | "ephemeral-storage")
                .then_some(("requests", resource))
        })
    else {
        return Vec::new();
    };
    obj.pointer("/spec/containers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|c| c.pointer(&format!("/resources/{kind}/{res}")).is_none())
        .filter_map(|c| c.get("name").and_then(Value::as_str).map(str::to_string))
        .collect()
}

/// A nano-unit amount written as Kubernetes would write it for `resource`.
pub fn format(resource: &str, n: u128) -> String {
    let bytes = resource.contains("memory") || resource.contains("storage");
    if n % NANO == 0 {
        let whole = n / NANO;
        if bytes && whole > 0 {
            for (unit, size) in [("Gi", 1u128 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)] {
                if whole % size == 0 {
                    return format!("{}{unit}", whole / size);
                }
            }
        }
        whole.to_string()
    } else if n % 1_000_000 == 0 {
        format!("{}m", n / 1_000_000)
    } else {
        format!("{n}n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_pod_counts_itself_and_its_requests_and_limits() {
        let pod = json!({"spec": {
        "initContainers": [{"name": "i", "resources": {"requests": {"cpu": "2"}}}],
        "containers": [
            {"name": "a", "resources": {"requests": {"cpu": "500m", "memory": "64Mi"},
                                        "limits": {"memory": "128Mi"}}},
            {"name": "b", "resources": {"requests": {"cpu": "250m", "memory": "64Mi"}}}
        ]}});
        let u = usage("", "pods", &pod);
        assert_eq!(format("pods", u["pods"]), "1");
        assert_eq!(format("requests.cpu", u["requests.cpu"]), "2");
        assert_eq!(format("requests.memory", u["requests.memory"]), "128Mi");
        assert_eq!(format("memory", u["memory"]), "128Mi");
        assert_eq!(format("limits.memory", u["limits.memory"]), "128Mi");
        assert_eq!(u["count/pods"], NANO);
        assert_eq!(missing(&pod, "limits.memory"), ["b"]);
        assert!(missing(&pod, "requests.cpu").is_empty());

        let done = json!({"spec": {"containers": []}, "status": {"phase": "Succeeded"}});
        assert!(usage("", "pods", &done).is_empty());
    }

    #[test]
    fn other_kinds_count_by_name_and_by_group() {
        let svc = json!({"spec": {"type": "NodePort", "ports": [{"port": 80}, {"port": 81}]}});
        let u = usage("", "services", &svc);
        assert_eq!(u["services"], NANO);
        assert_eq!(u["services.nodeports"], 2 * NANO);
        let pvc = json!({"spec": {"resources": {"requests": {"storage": "1Gi"}}}});
        assert_eq!(
            format(
                "requests.storage",
                usage("", "persistentvolumeclaims", &pvc)["requests.storage"]
            ),
            "1Gi"
        );
        let d = usage("apps", "deployments", &json!({}));
        assert_eq!(d.keys().collect::<Vec<_>>(), ["count/deployments.apps"]);
        assert_eq!(format("requests.cpu", 1_500_000_000), "1500m");
    }
}
