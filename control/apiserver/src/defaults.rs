//! What the API server fills in on create, as Kubernetes' defaulting and PrepareForCreate
//! do: default field values, initial status, and allocated Service addresses.

use rand::Rng;
use serde_json::{json, Map, Value};

use crate::error::{ApiError, ApiResult, FieldError};
use crate::objects::Objects;

fn obj_mut<'a>(v: &'a mut Value, key: &str) -> &'a mut Map<String, Value> {
    if !v.get(key).is_some_and(Value::is_object) {
        v[key] = json!({});
    }
    v[key].as_object_mut().expect("just made an object")
}

fn default(m: &mut Map<String, Value>, key: &str, value: Value) {
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
fn default_tolerations(spec: &mut Value) {
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

fn template(obj: &mut Value) {
    if let Some(spec) = obj.pointer_mut("/spec/template/spec") {
        pod_spec(spec);
    }
}

/// Fills defaults and the initial status of a new object.
pub async fn on_create(
    kind: &str,
    obj: &mut Value,
    objects: &Objects,
    dry_run: bool,
) -> ApiResult<()> {
    match kind {
        "Namespace" => {
            obj_mut(obj, "spec")
                .entry("finalizers")
                .or_insert(json!(["kubernetes"]));
            obj["status"] = json!({"phase": "Active"});
        }
        "Pod" => {
            if let Some(spec) = obj.get_mut("spec") {
                pod_spec(spec);
                default_tolerations(spec);
            }
            obj["status"] = json!({"phase": "Pending", "qosClass": "BestEffort"});
        }
        "Deployment" => {
            let spec = obj_mut(obj, "spec");
            default(spec, "replicas", json!(1));
            default(spec, "revisionHistoryLimit", json!(10));
            default(spec, "progressDeadlineSeconds", json!(600));
            default(
                spec,
                "strategy",
                json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}}),
            );
            template(obj);
            obj["status"] = json!({});
        }
        "ReplicaSet" => {
            default(obj_mut(obj, "spec"), "replicas", json!(1));
            template(obj);
            obj["status"] = json!({});
        }
        "Job" => {
            let uid = obj
                .pointer("/metadata/uid")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let name = obj
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let spec = obj_mut(obj, "spec");
            default(spec, "parallelism", json!(1));
            default(spec, "completions", json!(1));
            default(spec, "backoffLimit", json!(6));
            default(spec, "completionMode", json!("NonIndexed"));
            default(spec, "suspend", json!(false));
            let manual = spec.get("manualSelector").and_then(Value::as_bool) == Some(true);
            if !manual {
                // As the Job registry does: a selector on the job's uid, and matching labels.
                spec.insert(
                    "selector".into(),
                    json!({"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}),
                );
                let labels = json!({
                    "batch.kubernetes.io/controller-uid": uid, "controller-uid": uid,
                    "batch.kubernetes.io/job-name": name, "job-name": name,
                });
                let t = spec.entry("template").or_insert(json!({}));
                let meta = obj_mut(t, "metadata");
                let l = meta.entry("labels").or_insert(json!({}));
                if let (Some(l), Some(add)) = (l.as_object_mut(), labels.as_object()) {
                    for (k, v) in add {
                        l.insert(k.clone(), v.clone());
                    }
                }
            }
            template(obj);
            obj["status"] = json!({});
        }
        "Service" => service(obj, objects, dry_run).await?,
        "Secret" => {
            let m = obj.as_object_mut().expect("objects are JSON objects");
            if m.get("type").and_then(Value::as_str) == Some("") {
                m.remove("type");
            }
            default(m, "type", json!("Opaque"));
            string_data(obj);
        }
        _ => {}
    }
    Ok(())
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

async fn service(obj: &mut Value, objects: &Objects, dry_run: bool) -> ApiResult<()> {
    let spec = obj_mut(obj, "spec");
    default(spec, "type", json!("ClusterIP"));
    default(spec, "sessionAffinity", json!("None"));
    default(spec, "ipFamilies", json!(["IPv4"]));
    default(spec, "ipFamilyPolicy", json!("SingleStack"));
    default(spec, "internalTrafficPolicy", json!("Cluster"));
    let ty = spec
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("ClusterIP")
        .to_string();
    if let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut) {
        for p in ports.iter_mut().filter_map(Value::as_object_mut) {
            default(p, "protocol", json!("TCP"));
            if let Some(port) = p.get("port").cloned() {
                default(p, "targetPort", port);
            }
        }
    }
    let headless = spec.get("clusterIP").and_then(Value::as_str) == Some("None");
    if ty != "ExternalName" && !headless {
        let ip = match spec.get("clusterIP").and_then(Value::as_str) {
            Some(ip) if !ip.is_empty() => {
                if !reserve(objects, "serviceips", ip, dry_run).await? {
                    return Err(invalid_service(
                        "spec.clusterIP",
                        ip,
                        "provided IP is already allocated",
                    ));
                }
                ip.to_string()
            }
            _ => allocate_ip(objects, dry_run).await?,
        };
        spec.insert("clusterIP".into(), json!(ip));
        spec.insert("clusterIPs".into(), json!([ip]));
    }
    if ty == "NodePort" || ty == "LoadBalancer" {
        if let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut) {
            for p in ports.iter_mut().filter_map(Value::as_object_mut) {
                match p
                    .get("nodePort")
                    .and_then(Value::as_i64)
                    .filter(|np| *np != 0)
                {
                    Some(np) => {
                        if !(30000..=32767).contains(&np) {
                            return Err(invalid_service("spec.ports.nodePort", &np.to_string(), "provided port is not in the valid range. The range of valid ports is 30000-32767"));
                        }
                        if !reserve(objects, "servicenodeports", &np.to_string(), dry_run).await? {
                            return Err(invalid_service(
                                "spec.ports.nodePort",
                                &np.to_string(),
                                "provided port is already allocated",
                            ));
                        }
                    }
                    None => {
                        let np = allocate_node_port(objects, dry_run).await?;
                        p.insert("nodePort".into(), json!(np));
                    }
                }
            }
        }
        default(spec, "externalTrafficPolicy", json!("Cluster"));
    }
    obj["status"] = json!({"loadBalancer": {}});
    Ok(())
}

fn invalid_service(field: &str, value: &str, why: &str) -> ApiError {
    ApiError::Invalid {
        group: String::new(),
        kind: "Service".into(),
        name: String::new(),
        causes: vec![FieldError::invalid(field, value, why)],
    }
}

/// Claims one value of a range (an IP or port) with a create-if-absent in the store, so
/// that two API servers can never hand out the same one. Ok(false): someone has it. A
/// store that cannot answer is an error of its own, not a taken value.
async fn reserve(objects: &Objects, range: &str, value: &str, dry_run: bool) -> ApiResult<bool> {
    let key = format!("/registry/ranges/{range}/{value}");
    if dry_run {
        let got = objects
            .store
            .get(key.as_bytes(), Default::default())
            .await?;
        return Ok(got.is_none());
    }
    match objects
        .store
        .put_if(key, "1", baton_store::Precondition::Absent)
        .await
    {
        Ok(_) => Ok(true),
        Err(baton_store::Error::Conflict { .. }) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Gives an allocated IP or port back.
pub async fn release(objects: &Objects, svc: &Value) {
    let mut keys = Vec::new();
    if let Some(ip) = svc.pointer("/spec/clusterIP").and_then(Value::as_str) {
        if ip != "None" && !ip.is_empty() {
            keys.push(format!("/registry/ranges/serviceips/{ip}"));
        }
    }
    for p in svc
        .pointer("/spec/ports")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(np) = p.get("nodePort").and_then(Value::as_i64) {
            keys.push(format!("/registry/ranges/servicenodeports/{np}"));
        }
    }
    for k in keys {
        let _ = objects.store.delete(k).await;
    }
}

async fn allocate_ip(objects: &Objects, dry_run: bool) -> ApiResult<String> {
    // 10.96.0.0/16, skipping .0 and 10.96.0.1 (the `kubernetes` service's by convention).
    for _ in 0..64 {
        let n: u32 = rand::thread_rng().gen_range(2..65534);
        let ip = format!("10.96.{}.{}", n >> 8, n & 0xff);
        if reserve(objects, "serviceips", &ip, dry_run).await? {
            return Ok(ip);
        }
    }
    Err(ApiError::Internal {
        message: "failed to allocate a service IP: 64 random picks were all taken; the range is nearly full".into(),
    })
}

async fn allocate_node_port(objects: &Objects, dry_run: bool) -> ApiResult<i64> {
    for _ in 0..64 {
        let port: i64 = rand::thread_rng().gen_range(30000..=32767);
        if reserve(objects, "servicenodeports", &port.to_string(), dry_run).await? {
            return Ok(port);
        }
    }
    Err(ApiError::Internal {
        message: "failed to allocate a node port: 64 random picks were all taken; the range is nearly full".into(),
    })
}
