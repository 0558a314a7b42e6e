//! Defaults several kinds share (a pod spec's, inside pods and templates), as Kubernetes'
//! defaulting fills them in; each kind's own are in its strategy ([`crate::strategy`]).

use serde_json::{json, Map, Value};

pub(crate) fn obj_mut<'a>(v: &'a mut Value, key: &str) -> &'a mut Map<String, Value> {
    if !v.get(key).is_some_and(Value::is_object) {
        v[key] = json!({});
    }
    v[key].as_object_mut().expect("just made an object")
}

pub(crate) fn default(m: &mut Map<String, Value>, key: &str, value: Value) {
    if m.get(key).is_none_or(Value::is_null) {
        m.insert(key.to_string(), value);
    }
}

/// Defaults of a pod spec (also inside templates).
pub fn pod_spec(spec: &mut Value) {
    let Some(m) = spec.as_object_mut() else {
        return;
    };
    default(m, "restartPolicy", json!("Always"));
    default(m, "terminationGracePeriodSeconds", json!(30));
    default(m, "dnsPolicy", json!("ClusterFirst"));
    default(m, "schedulerName", json!("default-scheduler"));
    default(m, "serviceAccountName", json!("default"));
    default(m, "securityContext", json!({}));
    if let Some(sa) = m.get("serviceAccountName").cloned() {
        default(m, "serviceAccount", sa);
    }
    for list in ["containers", "initContainers"] {
        if let Some(cs) = m.get_mut(list).and_then(Value::as_array_mut) {
            for c in cs {
                let Some(c) = c.as_object_mut() else { continue };
                let image = c
                    .get("image")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                let last = image.rsplit('/').next().unwrap_or("");
                let latest =
                    !last.contains(':') && !image.contains('@') || image.ends_with(":latest");
                default(
                    c,
                    "imagePullPolicy",
                    json!(if latest { "Always" } else { "IfNotPresent" }),
                );
                default(c, "terminationMessagePath", json!("/dev/termination-log"));
                default(c, "terminationMessagePolicy", json!("File"));
                default(c, "resources", json!({}));
                if let Some(ports) = c.get_mut("ports").and_then(Value::as_array_mut) {
                    for p in ports.iter_mut().filter_map(Value::as_object_mut) {
                        default(p, "protocol", json!("TCP"));
                    }
                }
            }
        }
    }
}

/// What Kubernetes' DefaultTolerationSeconds admission adds to every pod: it stays on a
/// node that went not-ready or unreachable for 300 s before it is evicted, unless it
/// says otherwise.
pub(crate) fn default_tolerations(spec: &mut Value) {
    let Some(m) = spec.as_object_mut() else {
        return;
    };
    let list = m.entry("tolerations").or_insert(json!([]));
    let Some(list) = list.as_array_mut() else {
        return;
    };
    for key in [
        "node.kubernetes.io/not-ready",
        "node.kubernetes.io/unreachable",
    ] {
        let tolerated = list.iter().any(|t| {
            let k = t.get("key").and_then(Value::as_str).unwrap_or("");
            let effect = t.get("effect").and_then(Value::as_str).unwrap_or("");
            let exists_all =
                k.is_empty() && t.get("operator").and_then(Value::as_str) == Some("Exists");
            (k == key || exists_all) && (effect.is_empty() || effect == "NoExecute")
        });
        if !tolerated {
            list.push(json!({"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}));
        }
    }
}

pub(crate) fn template(obj: &mut Value) {
    if let Some(spec) = obj.pointer_mut("/spec/template/spec") {
        pod_spec(spec);
    }
}

/// Folds a Secret's `stringData` into `data`, as the API server does on every write.
pub fn string_data(obj: &mut Value) {
    use base64::Engine;
    let Some(sd) = obj.as_object_mut().and_then(|m| m.remove("stringData")) else {
        return;
    };
    let data = obj_mut(obj, "data");
    for (k, v) in sd.as_object().into_iter().flatten() {
        let s = v.as_str().unwrap_or_default();
        data.insert(
            k.clone(),
            json!(base64::engine::general_purpose::STANDARD.encode(s)),
        );
    }
}
