//! Pods: defaults and initial status, their spec's rules, graceful deletion through their
//! node, and `kubectl get pods`' columns.

use serde_json::{json, Value};

use super::{age, name, Column, Deletion, Strategy};
use crate::defaults;
use crate::error::FieldError;
use crate::table::{i, none_if_empty, pod_status, s};
use crate::validation;

#[derive(Debug)]
pub struct Pods;

fn container_statuses(o: &Value) -> &[Value] {
    o.pointer("/status/containerStatuses")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

fn ready(o: &Value) -> Value {
    let total = o
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    let ready = container_statuses(o)
        .iter()
        .filter(|c| c.get("ready").and_then(Value::as_bool) == Some(true))
        .count();
    json!(format!("{ready}/{total}"))
}

fn restarts(o: &Value) -> Value {
    let n: i64 = container_statuses(o)
        .iter()
        .map(|c| i(c, "/restartCount"))
        .sum();
    json!(n.to_string())
}

static COLUMNS: &[Column] = &[
    Column::new("Name", "string", 0, name),
    Column::new("Ready", "string", 0, ready),
    Column::new("Status", "string", 0, |o| json!(pod_status(o))),
    Column::new("Restarts", "string", 0, restarts),
    Column::new("Age", "string", 0, age),
    Column::new("IP", "string", 1, |o| {
        json!(none_if_empty(s(o, "/status/podIP").to_string()))
    }),
    Column::new("Node", "string", 1, |o| {
        json!(none_if_empty(s(o, "/spec/nodeName").to_string()))
    }),
    Column::new("Nominated Node", "string", 1, |_| json!("<none>")),
    Column::new("Readiness Gates", "string", 1, |_| json!("<none>")),
];

impl Strategy for Pods {
    fn field_selectable(&self, field: &str) -> bool {
        matches!(
            field,
            "spec.nodeName"
                | "status.phase"
                | "spec.restartPolicy"
                | "spec.schedulerName"
                | "spec.serviceAccountName"
                | "status.podIP"
        )
    }

    fn validate(&self, obj: &Value, errs: &mut Vec<FieldError>) {
        match obj.get("spec") {
            Some(spec) => validation::pod_spec(spec, "spec", errs),
            None => errs.push(FieldError::required("spec.containers")),
        }
    }

    fn mutate<'a>(
        &'a self,
        objects: &'a crate::objects::Objects,
        obj: &'a mut Value,
    ) -> super::Hook<'a, crate::error::ApiResult<()>> {
        Box::pin(crate::admission::service_account(objects, obj))
    }

    fn pod_spec(&self) -> Option<super::PodSpecAt> {
        Some(super::PodSpecAt::Pod)
    }

    fn prepare_create(&self, obj: &mut Value) {
        if let Some(spec) = obj.get_mut("spec") {
            defaults::pod_spec(spec);
            defaults::default_tolerations(spec);
        }
        obj["status"] = json!({"phase": "Pending", "qosClass": "BestEffort"});
    }

    /// A pod on a node gets its grace period, and its node finishes the deletion once
    /// the containers have stopped (with a grace period of 0); a pod no node runs, or
    /// one that has ended, goes at once, as kube-apiserver's `CheckGracefulDelete` has
    /// it. Asked again, the deletion keeps the period it has unless a shorter one is asked.
    fn deletion(&self, obj: &Value, grace: Option<i64>) -> Deletion {
        let on_a_node = obj
            .pointer("/spec/nodeName")
            .and_then(Value::as_str)
            .is_some_and(|n| !n.is_empty());
        let ended = matches!(
            obj.pointer("/status/phase").and_then(Value::as_str),
            Some("Succeeded" | "Failed")
        );
        let marked = obj
            .pointer("/metadata/deletionTimestamp")
            .is_some()
            .then(|| {
                obj.pointer("/metadata/deletionGracePeriodSeconds")
                    .and_then(Value::as_i64)
                    .unwrap_or(0)
            });
        let grace = grace
            .or(marked)
            .or_else(|| {
                obj.pointer("/spec/terminationGracePeriodSeconds")
                    .and_then(Value::as_i64)
            })
            .unwrap_or(30);
        let grace = marked.map_or(grace, |m| grace.min(m));
        if on_a_node && !ended && grace > 0 {
            Deletion::Graceful(grace)
        } else {
            Deletion::Immediate
        }
    }

    fn columns(&self) -> &[Column] {
        COLUMNS
    }
}
