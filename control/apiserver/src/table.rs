//! Server-side printing: `meta.k8s.io/v1` Tables with the columns `kubectl get` shows for
//! each kind. Columns with priority 1 appear only with `-o wide`.

use k8s_openapi::chrono::{DateTime, Utc};
use serde_json::{json, Value};

/// Kubernetes' human-readable duration (`5s`, `3m20s`, `4h`, `12d`).
pub fn human_duration(secs: i64) -> String {
    if secs < 0 {
        return "<invalid>".into();
    }
    let (m, h, d) = (secs / 60, secs / 3600, secs / 86400);
    if secs < 120 {
        format!("{secs}s")
    } else if m < 10 {
        if secs % 60 == 0 {
            format!("{m}m")
        } else {
            format!("{m}m{}s", secs % 60)
        }
    } else if h < 3 {
        format!("{m}m")
    } else if h < 8 {
        if m % 60 == 0 {
            format!("{h}h")
        } else {
            format!("{h}h{}m", m % 60)
        }
    } else if h < 48 {
        format!("{h}h")
    } else if d < 8 {
        if h % 24 == 0 {
            format!("{d}d")
        } else {
            format!("{d}d{}h", h % 24)
        }
    } else if d < 365 * 2 {
        format!("{d}d")
    } else {
        format!("{}y", d / 365)
    }
}

fn age_of(ts: Option<&str>) -> String {
    let Some(ts) = ts else {
        return "<unknown>".into();
    };
    match ts.parse::<DateTime<Utc>>() {
        Ok(t) => human_duration((Utc::now() - t).num_seconds()),
        Err(_) => "<unknown>".into(),
    }
}

fn s<'a>(v: &'a Value, ptr: &str) -> &'a str {
    v.pointer(ptr).and_then(Value::as_str).unwrap_or("")
}

fn i(v: &Value, ptr: &str) -> i64 {
    v.pointer(ptr).and_then(Value::as_i64).unwrap_or(0)
}

fn none_if_empty(x: String) -> String {
    if x.is_empty() {
        "<none>".into()
    } else {
        x
    }
}

fn col(name: &str, ty: &str, priority: i32) -> Value {
    let format = if name == "Name" { "name" } else { "" };
    json!({"name": name, "type": ty, "format": format, "description": "", "priority": priority})
}

fn age(obj: &Value) -> Value {
    Value::String(age_of(
        obj.pointer("/metadata/creationTimestamp")
            .and_then(Value::as_str),
    ))
}

fn pod_status(p: &Value) -> String {
    if p.pointer("/metadata/deletionTimestamp").is_some() {
        return "Terminating".into();
    }
    let mut reason = s(p, "/status/reason").to_string();
    if reason.is_empty() {
        reason = s(p, "/status/phase").to_string();
    }
    if let Some(cs) = p
        .pointer("/status/containerStatuses")
        .and_then(Value::as_array)
    {
        for c in cs.iter().rev() {
            if let Some(r) = c.pointer("/state/waiting/reason").and_then(Value::as_str) {
                if !r.is_empty() {
                    reason = r.to_string();
                }
            } else if let Some(r) = c
                .pointer("/state/terminated/reason")
                .and_then(Value::as_str)
            {
                reason = r.to_string();
            } else if let Some(code) = c
                .pointer("/state/terminated/exitCode")
                .and_then(Value::as_i64)
            {
                reason = format!("ExitCode:{code}");
            }
        }
    }
    if reason.is_empty() {
        "Pending".into()
    } else {
        reason
    }
}

fn join_ports(svc: &Value) -> String {
    let ports = svc
        .pointer("/spec/ports")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let parts: Vec<String> = ports
        .iter()
        .map(|p| {
            let proto = p.get("protocol").and_then(Value::as_str).unwrap_or("TCP");
            match p.get("nodePort").and_then(Value::as_i64) {
                Some(np) => format!("{}:{np}/{proto}", i(p, "/port")),
                None => format!("{}/{proto}", i(p, "/port")),
            }
        })
        .collect();
    none_if_empty(parts.join(","))
}

fn container_field(obj: &Value, spec_ptr: &str, field: &str) -> String {
    obj.pointer(spec_ptr)
        .and_then(Value::as_array)
        .map(|cs| {
            cs.iter()
                .map(|c| {
                    c.get(field)
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string()
                })
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default()
}

fn selector_string(sel: Option<&Value>) -> String {
    let Some(sel) = sel else {
        return "<none>".into();
    };
    let map = sel.get("matchLabels").unwrap_or(sel);
    let parts: Vec<String> = map
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                .collect()
        })
        .unwrap_or_default();
    none_if_empty(parts.join(","))
}

/// Column definitions and the row cells of one object, for a kind.
pub fn columns(kind: &str) -> Vec<Value> {
    match kind {
        "Pod" => vec![
            col("Name", "string", 0),
            col("Ready", "string", 0),
            col("Status", "string", 0),
            col("Restarts", "string", 0),
            col("Age", "string", 0),
            col("IP", "string", 1),
            col("Node", "string", 1),
            col("Nominated Node", "string", 1),
            col("Readiness Gates", "string", 1),
        ],
        "Deployment" => vec![
            col("Name", "string", 0),
            col("Ready", "string", 0),
            col("Up-to-date", "string", 0),
            col("Available", "string", 0),
            col("Age", "string", 0),
            col("Containers", "string", 1),
            col("Images", "string", 1),
            col("Selector", "string", 1),
        ],
        "ReplicaSet" => vec![
            col("Name", "string", 0),
            col("Desired", "integer", 0),
            col("Current", "integer", 0),
            col("Ready", "integer", 0),
            col("Age", "string", 0),
            col("Containers", "string", 1),
            col("Images", "string", 1),
            col("Selector", "string", 1),
        ],
        "Service" => vec![
            col("Name", "string", 0),
            col("Type", "string", 0),
            col("Cluster-IP", "string", 0),
            col("External-IP", "string", 0),
            col("Port(s)", "string", 0),
            col("Age", "string", 0),
            col("Selector", "string", 1),
        ],
        "Node" => vec![
            col("Name", "string", 0),
            col("Status", "string", 0),
            col("Roles", "string", 0),
            col("Age", "string", 0),
            col("Version", "string", 0),
            col("Internal-IP", "string", 1),
        ],
        "Namespace" => vec![
            col("Name", "string", 0),
            col("Status", "string", 0),
            col("Age", "string", 0),
        ],
        "Job" => vec![
            col("Name", "string", 0),
            col("Status", "string", 0),
            col("Completions", "string", 0),
            col("Duration", "string", 0),
            col("Age", "string", 0),
            col("Containers", "string", 1),
            col("Images", "string", 1),
        ],
        "ConfigMap" => vec![
            col("Name", "string", 0),
            col("Data", "integer", 0),
            col("Age", "string", 0),
        ],
        "Secret" => vec![
            col("Name", "string", 0),
            col("Type", "string", 0),
            col("Data", "integer", 0),
            col("Age", "string", 0),
        ],
        "ServiceAccount" => vec![
            col("Name", "string", 0),
            col("Secrets", "integer", 0),
            col("Age", "string", 0),
        ],
        "Endpoints" => vec![
            col("Name", "string", 0),
            col("Endpoints", "string", 0),
            col("Age", "string", 0),
        ],
        "EndpointSlice" => vec![
            col("Name", "string", 0),
            col("AddressType", "string", 0),
            col("Ports", "string", 0),
            col("Endpoints", "string", 0),
            col("Age", "string", 0),
        ],
        "Event" => vec![
            col("Last Seen", "string", 0),
            col("Type", "string", 0),
            col("Reason", "string", 0),
            col("Object", "string", 0),
            col("Message", "string", 0),
        ],
        "Lease" => vec![
            col("Name", "string", 0),
            col("Holder", "string", 0),
            col("Age", "string", 0),
        ],
        _ => vec![col("Name", "string", 0), col("Age", "string", 0)],
    }
}

pub fn cells(kind: &str, o: &Value) -> Vec<Value> {
    let name = Value::String(s(o, "/metadata/name").to_string());
    match kind {
        "Pod" => {
            let statuses = o
                .pointer("/status/containerStatuses")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let total = o
                .pointer("/spec/containers")
                .and_then(Value::as_array)
                .map_or(0, Vec::len);
            let ready = statuses
                .iter()
                .filter(|c| c.get("ready").and_then(Value::as_bool) == Some(true))
                .count();
            let restarts: i64 = statuses.iter().map(|c| i(c, "/restartCount")).sum();
            vec![
                name,
                json!(format!("{ready}/{total}")),
                json!(pod_status(o)),
                json!(restarts.to_string()),
                age(o),
                json!(none_if_empty(s(o, "/status/podIP").to_string())),
                json!(none_if_empty(s(o, "/spec/nodeName").to_string())),
                json!("<none>"),
                json!("<none>"),
            ]
        }
        "Deployment" => vec![
            name,
            json!(format!(
                "{}/{}",
                i(o, "/status/readyReplicas"),
                o.pointer("/spec/replicas")
                    .and_then(Value::as_i64)
                    .unwrap_or(1)
            )),
            json!(i(o, "/status/updatedReplicas")),
            json!(i(o, "/status/availableReplicas")),
            age(o),
            json!(container_field(o, "/spec/template/spec/containers", "name")),
            json!(container_field(
                o,
                "/spec/template/spec/containers",
                "image"
            )),
            json!(selector_string(o.pointer("/spec/selector"))),
        ],
        "ReplicaSet" => vec![
            name,
            json!(o
                .pointer("/spec/replicas")
                .and_then(Value::as_i64)
                .unwrap_or(1)),
            json!(i(o, "/status/replicas")),
            json!(i(o, "/status/readyReplicas")),
            age(o),
            json!(container_field(o, "/spec/template/spec/containers", "name")),
            json!(container_field(
                o,
                "/spec/template/spec/containers",
                "image"
            )),
            json!(selector_string(o.pointer("/spec/selector"))),
        ],
        "Service" => {
            let ext: Vec<String> = o
                .pointer("/status/loadBalancer/ingress")
                .and_then(Value::as_array)
                .map(|a| a.iter().map(|x| s(x, "/ip").to_string()).collect())
                .unwrap_or_default();
            vec![
                name,
                json!(o
                    .pointer("/spec/type")
                    .and_then(Value::as_str)
                    .unwrap_or("ClusterIP")),
                json!(none_if_empty(s(o, "/spec/clusterIP").to_string())),
                json!(none_if_empty(ext.join(","))),
                json!(join_ports(o)),
                age(o),
                json!(selector_string(o.pointer("/spec/selector"))),
            ]
        }
        "Node" => {
            let ready = o
                .pointer("/status/conditions")
                .and_then(Value::as_array)
                .and_then(|cs| cs.iter().find(|c| s(c, "/type") == "Ready"))
                .map(|c| match s(c, "/status") {
                    "True" => "Ready",
                    _ => "NotReady",
                })
                .unwrap_or("Unknown");
            let mut status = ready.to_string();
            if o.pointer("/spec/unschedulable").and_then(Value::as_bool) == Some(true) {
                status.push_str(",SchedulingDisabled");
            }
            let roles: Vec<String> = o
                .pointer("/metadata/labels")
                .and_then(Value::as_object)
                .map(|l| {
                    l.keys()
                        .filter_map(|k| {
                            k.strip_prefix("node-role.kubernetes.io/").map(String::from)
                        })
                        .collect()
                })
                .unwrap_or_default();
            let ip = o
                .pointer("/status/addresses")
                .and_then(Value::as_array)
                .and_then(|a| a.iter().find(|x| s(x, "/type") == "InternalIP"))
                .map(|x| s(x, "/address").to_string())
                .unwrap_or_default();
            vec![
                name,
                json!(status),
                json!(none_if_empty(roles.join(","))),
                age(o),
                json!(s(o, "/status/nodeInfo/kubeletVersion")),
                json!(none_if_empty(ip)),
            ]
        }
        "Namespace" => vec![
            name,
            json!(o
                .pointer("/status/phase")
                .and_then(Value::as_str)
                .unwrap_or("Active")),
            age(o),
        ],
        "Job" => {
            let conds = o
                .pointer("/status/conditions")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let has = |t: &str| {
                conds
                    .iter()
                    .any(|c| s(c, "/type") == t && s(c, "/status") == "True")
            };
            let status = if has("Complete") {
                "Complete"
            } else if has("Failed") {
                "Failed"
            } else if has("Suspended") {
                "Suspended"
            } else {
                "Running"
            };
            let completions = o
                .pointer("/spec/completions")
                .and_then(Value::as_i64)
                .unwrap_or(1);
            let start = o
                .pointer("/status/startTime")
                .and_then(Value::as_str)
                .and_then(|t| t.parse::<DateTime<Utc>>().ok());
            let end = o
                .pointer("/status/completionTime")
                .and_then(Value::as_str)
                .and_then(|t| t.parse::<DateTime<Utc>>().ok())
                .unwrap_or_else(Utc::now);
            let duration = start
                .map(|st| human_duration((end - st).num_seconds()))
                .unwrap_or_default();
            vec![
                name,
                json!(status),
                json!(format!("{}/{completions}", i(o, "/status/succeeded"))),
                json!(duration),
                age(o),
                json!(container_field(o, "/spec/template/spec/containers", "name")),
                json!(container_field(
                    o,
                    "/spec/template/spec/containers",
                    "image"
                )),
            ]
        }
        "ConfigMap" => {
            let n = o
                .get("data")
                .and_then(Value::as_object)
                .map_or(0, |m| m.len())
                + o.get("binaryData")
                    .and_then(Value::as_object)
                    .map_or(0, |m| m.len());
            vec![name, json!(n), age(o)]
        }
        "Secret" => {
            let n = o
                .get("data")
                .and_then(Value::as_object)
                .map_or(0, |m| m.len());
            vec![
                name,
                json!(o.get("type").and_then(Value::as_str).unwrap_or("Opaque")),
                json!(n),
                age(o),
            ]
        }
        "ServiceAccount" => vec![
            name,
            json!(o
                .get("secrets")
                .and_then(Value::as_array)
                .map_or(0, Vec::len)),
            age(o),
        ],
        "Endpoints" => {
            let mut eps = Vec::new();
            for subset in o
                .get("subsets")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let ports: Vec<i64> = subset
                    .get("ports")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .map(|p| i(p, "/port"))
                    .collect();
                for a in subset
                    .get("addresses")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    for p in &ports {
                        eps.push(format!("{}:{p}", s(a, "/ip")));
                    }
                }
            }
            vec![name, json!(none_if_empty(eps.join(","))), age(o)]
        }
        "EndpointSlice" => {
            let ports: Vec<String> = o
                .get("ports")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .map(|p| i(p, "/port").to_string())
                .collect();
            let addrs: Vec<String> = o
                .get("endpoints")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .flat_map(|e| {
                    e.get("addresses")
                        .and_then(Value::as_array)
                        .cloned()
                        .unwrap_or_default()
                })
                .filter_map(|a| a.as_str().map(String::from))
                .collect();
            vec![
                name,
                json!(s(o, "/addressType")),
                json!(none_if_empty(ports.join(","))),
                json!(none_if_empty(addrs.join(","))),
                age(o),
            ]
        }
        "Event" => {
            let last = o
                .get("lastTimestamp")
                .and_then(Value::as_str)
                .or_else(|| o.get("eventTime").and_then(Value::as_str))
                .or_else(|| {
                    o.pointer("/metadata/creationTimestamp")
                        .and_then(Value::as_str)
                });
            let object = format!(
                "{}/{}",
                s(o, "/involvedObject/kind").to_lowercase(),
                s(o, "/involvedObject/name")
            );
            vec![
                json!(age_of(last)),
                json!(s(o, "/type")),
                json!(s(o, "/reason")),
                json!(object),
                json!(s(o, "/message")),
            ]
        }
        "Lease" => vec![
            name,
            json!(none_if_empty(s(o, "/spec/holderIdentity").to_string())),
            age(o),
        ],
        _ => vec![name, age(o)],
    }
}

/// A row's object: the object's metadata as PartialObjectMetadata, or the full object.
pub fn row_object(o: &Value, full: bool) -> Value {
    if full {
        return o.clone();
    }
    json!({
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": o.get("metadata").cloned().unwrap_or(json!({})),
    })
}

/// A Table of objects of one kind.
pub fn table(kind: &str, objects: &[Value], list_meta: Value, full: bool) -> Value {
    let rows: Vec<Value> = objects
        .iter()
        .map(|o| json!({"cells": cells(kind, o), "object": row_object(o, full)}))
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": list_meta,
        "columnDefinitions": columns(kind),
        "rows": rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_kubectl() {
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(200), "3m20s");
        assert_eq!(human_duration(3600), "60m");
        assert_eq!(human_duration(4 * 3600), "4h");
        assert_eq!(human_duration(3 * 86400), "3d");
    }

    #[test]
    fn every_kind_has_as_many_cells_as_columns() {
        let obj = json!({"metadata": {"name": "x", "creationTimestamp": "2026-01-01T00:00:00Z"}, "spec": {}, "status": {}});
        for r in crate::resources::RESOURCES {
            assert_eq!(
                columns(r.kind).len(),
                cells(r.kind, &obj).len(),
                "{}",
                r.kind
            );
        }
    }
}
