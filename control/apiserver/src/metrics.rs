//! `metrics.k8s.io/v1beta1` and `custom.metrics.k8s.io/v1beta2`, served by the API server
//! itself: what `kubectl top` and the HorizontalPodAutoscaler read, without a
//! metrics-server or a metrics adapter add-on. The custom metrics are HTTP components'
//! requests per second and in flight, per pod ([`POD_METRICS`]).
//!
//! Nothing here is stored. A get or list asks the nodes concerned for their Summary
//! (`/stats/summary`, over the mutually authenticated node link) and answers with what
//! they measured: CPU as a rate over the node's last sampling window, memory as held now.
//! A node that cannot be reached is left out, as metrics-server leaves out a node it
//! cannot scrape; a pod with no figures yet is absent, and a get of it is a 404.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::error::{ApiError, ApiResult};
use crate::objects::{Objects, ReadAt};
use crate::resources;
use crate::selectors::LabelSelector;

/// How long a node may take to answer before it is left out.
const NODE_TIMEOUT: Duration = Duration::from_secs(5);

const API_VERSION: &str = "metrics.k8s.io/v1beta1";

/// A node's Summary, or None if it could not be had in time.
async fn summary(objects: &Objects, node: &str) -> Option<Value> {
    let asked = crate::nodelink::node_json(objects, node, "/stats/summary");
    match tokio::time::timeout(NODE_TIMEOUT, asked).await {
        Ok(Ok(v)) => Some(v),
        Ok(Err(e)) => {
            tracing::info!(node, error = %e, "no metrics from node");
            None
        }
        Err(_) => {
            tracing::info!(node, "no metrics from node: timed out");
            None
        }
    }
}

async fn summaries(objects: &Objects, nodes: Vec<String>) -> HashMap<String, Value> {
    let asked = nodes.into_iter().map(|n| async move {
        let s = summary(objects, &n).await;
        (n, s)
    });
    futures::future::join_all(asked)
        .await
        .into_iter()
        .filter_map(|(n, s)| Some((n, s?)))
        .collect()
}

fn cpu(nanocores: u64) -> String {
    format!("{nanocores}n")
}

fn memory(bytes: u64) -> String {
    format!("{}Ki", bytes.div_ceil(1024))
}

fn window(summary: &Value) -> String {
    let secs = summary.get("window").and_then(Value::as_f64).unwrap_or(0.0);
    format!("{}ms", (secs * 1000.0).round() as u64)
}

fn timestamp(summary: &Value) -> Value {
    summary
        .pointer("/node/cpu/time")
        .cloned()
        .unwrap_or(Value::Null)
}

fn labels(obj: &Value) -> Value {
    obj.pointer("/metadata/labels")
        .cloned()
        .unwrap_or_else(|| json!({}))
}

fn not_found(res: &str, name: &str) -> ApiError {
    ApiError::NotFound {
        group: "metrics.k8s.io".into(),
        resource: res.into(),
        name: name.into(),
    }
}

/// The objects a get (`name`) or list of metrics is about: the one named, or those the
/// selector picks.
async fn measured_objects(
    objects: &Objects,
    res: &crate::resources::Resource,
    namespace: Option<&str>,
    name: Option<&str>,
    selector: &LabelSelector,
) -> ApiResult<Vec<Value>> {
    Ok(match name {
        Some(n) => objects
            .get(res, namespace, n, ReadAt::Latest)
            .await?
            .map(|(o, _)| o)
            .into_iter()
            .collect(),
        None => {
            objects
                .list(res, namespace, ReadAt::Latest, 0, None, |o| {
                    selector.matches(o)
                })
                .await?
                .items
        }
    })
}

/// `nodes`: each node's CPU and memory, from its own Summary.
pub async fn node_metrics(
    objects: &Objects,
    name: Option<&str>,
    selector: &LabelSelector,
) -> ApiResult<Vec<Value>> {
    let res = resources::builtin("Node");
    let nodes = measured_objects(objects, res, None, name, selector).await?;
    let names: Vec<String> = nodes
        .iter()
        .filter_map(|n| n.pointer("/metadata/name")?.as_str().map(String::from))
        .collect();
    let got = summaries(objects, names).await;
    let mut items = Vec::new();
    for n in &nodes {
        let Some(node) = n.pointer("/metadata/name").and_then(Value::as_str) else {
            continue;
        };
        let Some(s) = got.get(node) else { continue };
        let (Some(c), Some(m)) = (
            s.pointer("/node/cpu/usageNanoCores")
                .and_then(Value::as_u64),
            s.pointer("/node/memory/workingSetBytes")
                .and_then(Value::as_u64),
        ) else {
            continue;
        };
        items.push(json!({
            "kind": "NodeMetrics",
            "apiVersion": API_VERSION,
            "metadata": {"name": node, "labels": labels(n), "creationTimestamp": timestamp(s)},
            "timestamp": timestamp(s),
            "window": window(s),
            "usage": {"cpu": cpu(c), "memory": memory(m)},
        }));
    }
    match name {
        Some(n) if items.is_empty() => Err(not_found("nodes", n)),
        _ => Ok(items),
    }
}

/// A pod as its node measured it: the pod, its entry in the node's Summary, and the
/// Summary (whose time and window the figures share).
struct MeasuredPod {
    pod: Value,
    measured: Value,
    summary: Arc<Value>,
}

impl MeasuredPod {
    fn name(&self) -> &str {
        self.pod
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("")
    }

    fn namespace(&self) -> &str {
        self.pod
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or("")
    }

    fn containers(&self) -> impl Iterator<Item = &Value> {
        self.measured
            .get("containers")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
    }
}

/// The pods named or selected that their nodes have figures for, asking each node once.
async fn measured_pods(
    objects: &Objects,
    namespace: Option<&str>,
    name: Option<&str>,
    selector: &LabelSelector,
) -> ApiResult<Vec<MeasuredPod>> {
    let res = resources::builtin("Pod");
    let pods = measured_objects(objects, res, namespace, name, selector).await?;
    let on_node = |p: &Value| -> Option<String> {
        p.pointer("/spec/nodeName")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .map(String::from)
    };
    let mut nodes: Vec<String> = pods.iter().filter_map(on_node).collect();
    nodes.sort();
    nodes.dedup();
    let got: HashMap<String, Arc<Value>> = summaries(objects, nodes)
        .await
        .into_iter()
        .map(|(n, s)| (n, Arc::new(s)))
        .collect();
    let mut out = Vec::new();
    for p in pods {
        let (Some(node), Some(ns), Some(pod), uid) = (
            on_node(&p),
            p.pointer("/metadata/namespace").and_then(Value::as_str),
            p.pointer("/metadata/name").and_then(Value::as_str),
            p.pointer("/metadata/uid").and_then(Value::as_str),
        ) else {
            continue;
        };
        let Some(s) = got.get(&node) else { continue };
        let Some(measured) = s
            .get("pods")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .find(|m| {
                m.pointer("/podRef/namespace").and_then(Value::as_str) == Some(ns)
                    && m.pointer("/podRef/name").and_then(Value::as_str) == Some(pod)
                    && (uid.is_none() || m.pointer("/podRef/uid").and_then(Value::as_str) == uid)
            })
            .cloned()
        else {
            continue;
        };
        out.push(MeasuredPod {
            pod: p,
            measured,
            summary: s.clone(),
        });
    }
    Ok(out)
}

/// `pods`: each running pod's containers, from the Summary of the pod's node.
pub async fn pod_metrics(
    objects: &Objects,
    namespace: Option<&str>,
    name: Option<&str>,
    selector: &LabelSelector,
) -> ApiResult<Vec<Value>> {
    let mut items = Vec::new();
    for m in measured_pods(objects, namespace, name, selector).await? {
        // The containers with both figures: one first seen in the node's latest reading
        // (just started, or an ephemeral one) has no CPU rate yet and is left out rather
        // than hiding its whole pod.
        let mut containers = Vec::new();
        for c in m.containers() {
            let (Some(name), Some(cpu_n), Some(mem)) = (
                c.get("name").and_then(Value::as_str),
                c.pointer("/cpu/usageNanoCores").and_then(Value::as_u64),
                c.pointer("/memory/workingSetBytes").and_then(Value::as_u64),
            ) else {
                continue;
            };
            containers
                .push(json!({"name": name, "usage": {"cpu": cpu(cpu_n), "memory": memory(mem)}}));
        }
        if containers.is_empty() {
            continue;
        }
        let s = &m.summary;
        items.push(json!({
            "kind": "PodMetrics",
            "apiVersion": API_VERSION,
            "metadata": {
                "name": m.name(),
                "namespace": m.namespace(),
                "labels": labels(&m.pod),
                "creationTimestamp": timestamp(s),
            },
            "timestamp": timestamp(s),
            "window": window(s),
            "containers": containers,
        }));
    }
    match name {
        Some(n) if items.is_empty() => Err(not_found("pods", n)),
        _ => Ok(items),
    }
}

const CUSTOM_API_VERSION: &str = "custom.metrics.k8s.io/v1beta2";

/// The per-pod metrics served at `custom.metrics.k8s.io`: HTTP components' requests, as
/// the sandbox counts them. Each is the sum over the pod's HTTP containers.
pub const POD_METRICS: &[&str] = &["http_requests_per_second", "http_requests_in_flight"];

/// A custom metric's value as a quantity, in thousandths where it is not whole.
fn metric_quantity(value: f64) -> String {
    baton_kube::quantity::from_milli((value * 1000.0).round() as i64)
}

/// `custom.metrics.k8s.io/v1beta2`, `namespaces/{ns}/pods/{name}/{metric}`: a
/// MetricValueList with the pod named, or with every pod the selector picks when the name
/// is `*`. A pod without the metric (no HTTP component, or not measured twice yet) is
/// absent; a named one is a 404 then.
pub async fn pod_custom_metric(
    objects: &Objects,
    namespace: Option<&str>,
    name: &str,
    metric: &str,
    selector: &LabelSelector,
) -> ApiResult<Value> {
    let field = match metric {
        "http_requests_per_second" => "requestsPerSecond",
        "http_requests_in_flight" => "inFlight",
        _ => {
            return Err(ApiError::NotFound {
                group: "custom.metrics.k8s.io".into(),
                resource: format!("pods/{metric}"),
                name: name.into(),
            })
        }
    };
    let named = (name != "*").then_some(name);
    let mut items = Vec::new();
    for m in measured_pods(objects, namespace, named, selector).await? {
        let values: Vec<f64> = m
            .containers()
            .filter_map(|c| c.get("http")?.get(field)?.as_f64())
            .collect();
        if values.is_empty() {
            continue;
        }
        let s = &m.summary;
        let window = s.get("window").and_then(Value::as_f64).unwrap_or(0.0);
        items.push(json!({
            "describedObject": {"kind": "Pod", "namespace": m.namespace(), "name": m.name(), "apiVersion": "/v1"},
            "metric": {"name": metric},
            "timestamp": timestamp(s),
            "windowSeconds": window.round() as i64,
            "value": metric_quantity(values.iter().sum()),
        }));
    }
    if let Some(n) = named {
        if items.is_empty() {
            return Err(ApiError::NotFound {
                group: "custom.metrics.k8s.io".into(),
                resource: format!("pods/{metric}"),
                name: n.into(),
            });
        }
    }
    Ok(json!({
        "kind": "MetricValueList",
        "apiVersion": CUSTOM_API_VERSION,
        "metadata": {},
        "items": items,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_are_what_metrics_server_writes() {
        assert_eq!(cpu(1_234_567), "1234567n");
        assert_eq!(memory(1 << 20), "1024Ki");
        assert_eq!(memory(1), "1Ki");
        assert_eq!(window(&json!({"window": 5.0021})), "5002ms");
        assert_eq!(metric_quantity(12.0), "12");
        assert_eq!(metric_quantity(0.0), "0");
        assert_eq!(metric_quantity(2.5004), "2500m");
    }
}
