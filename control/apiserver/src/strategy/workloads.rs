//! Deployments, ReplicaSets and Jobs: the defaults of their specs and templates, their
//! rules, and their columns.

use k8s_openapi::chrono::{DateTime, Utc};
use serde_json::{json, Value};

use super::{age, name, Column, Strategy};
use crate::defaults::{default, obj_mut, template};
use crate::error::FieldError;
use crate::table::{container_field, human_duration, i, s, selector_string};
use crate::validation;

#[derive(Debug)]
pub struct Deployments;
#[derive(Debug)]
pub struct ReplicaSets;
#[derive(Debug)]
pub struct Jobs;
/// The ReplicaSet's older form, which old clients and charts still create: its selector
/// is a plain map of labels.
#[derive(Debug)]
pub struct ReplicationControllers;

fn replicas(o: &Value) -> i64 {
    o.pointer("/spec/replicas")
        .and_then(Value::as_i64)
        .unwrap_or(1)
}

pub(super) fn containers(o: &Value) -> Value {
    json!(container_field(o, "/spec/template/spec/containers", "name"))
}

pub(super) fn images(o: &Value) -> Value {
    json!(container_field(
        o,
        "/spec/template/spec/containers",
        "image"
    ))
}

pub(super) fn selector(o: &Value) -> Value {
    json!(selector_string(o.pointer("/spec/selector")))
}

/// A replicated workload's selector must select its template, and it may not ask for
/// fewer than no replicas.
fn replicated(obj: &Value, errs: &mut Vec<FieldError>) {
    validation::selector_matches_template(obj, errs);
    non_negative_replicas(obj, errs);
}

pub(super) fn non_negative_replicas(obj: &Value, errs: &mut Vec<FieldError>) {
    if let Some(r) = obj.pointer("/spec/replicas").and_then(Value::as_i64) {
        if r < 0 {
            errs.push(FieldError::invalid(
                "spec.replicas",
                &r.to_string(),
                "must be greater than or equal to 0",
            ));
        }
    }
}

static DEPLOYMENT_COLUMNS: &[Column] = &[
    Column::new("Name", "string", 0, name),
    Column::new("Ready", "string", 0, |o| {
        json!(format!("{}/{}", i(o, "/status/readyReplicas"), replicas(o)))
    }),
    Column::new("Up-to-date", "string", 0, |o| {
        json!(i(o, "/status/updatedReplicas"))
    }),
    Column::new("Available", "string", 0, |o| {
        json!(i(o, "/status/availableReplicas"))
    }),
    Column::new("Age", "string", 0, age),
    Column::new("Containers", "string", 1, containers),
    Column::new("Images", "string", 1, images),
    Column::new("Selector", "string", 1, selector),
];

impl Strategy for Deployments {
    fn pod_spec(&self) -> Option<super::PodSpecAt> {
        Some(super::PodSpecAt::Template("/spec/template/spec"))
    }

    fn validate(&self, obj: &Value, errs: &mut Vec<FieldError>) {
        replicated(obj, errs);
    }

    fn prepare_create(&self, obj: &mut Value) {
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

    fn columns(&self) -> &[Column] {
        DEPLOYMENT_COLUMNS
    }
}

static REPLICASET_COLUMNS: &[Column] = &[
    Column::new("Name", "string", 0, name),
    Column::new("Desired", "integer", 0, |o| json!(replicas(o))),
    Column::new("Current", "integer", 0, |o| json!(i(o, "/status/replicas"))),
    Column::new("Ready", "integer", 0, |o| {
        json!(i(o, "/status/readyReplicas"))
    }),
    Column::new("Age", "string", 0, age),
    Column::new("Containers", "string", 1, containers),
    Column::new("Images", "string", 1, images),
    Column::new("Selector", "string", 1, selector),
];

impl Strategy for ReplicaSets {
    fn pod_spec(&self) -> Option<super::PodSpecAt> {
        Some(super::PodSpecAt::Template("/spec/template/spec"))
    }

    fn validate(&self, obj: &Value, errs: &mut Vec<FieldError>) {
        replicated(obj, errs);
    }

    fn prepare_create(&self, obj: &mut Value) {
        default(obj_mut(obj, "spec"), "replicas", json!(1));
        template(obj);
        obj["status"] = json!({});
    }

    fn columns(&self) -> &[Column] {
        REPLICASET_COLUMNS
    }
}

fn job_status(o: &Value) -> Value {
    let conds = o
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[]);
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
    json!(status)
}

fn job_duration(o: &Value) -> Value {
    let time = |p: &str| {
        o.pointer(p)
            .and_then(Value::as_str)
            .and_then(|t| t.parse::<DateTime<Utc>>().ok())
    };
    let end = time("/status/completionTime").unwrap_or_else(Utc::now);
    let duration = time("/status/startTime")
        .map(|st| human_duration((end - st).num_seconds()))
        .unwrap_or_default();
    json!(duration)
}

static JOB_COLUMNS: &[Column] = &[
    Column::new("Name", "string", 0, name),
    Column::new("Status", "string", 0, job_status),
    Column::new("Completions", "string", 0, |o| {
        let completions = o
            .pointer("/spec/completions")
            .and_then(Value::as_i64)
            .unwrap_or(1);
        json!(format!("{}/{completions}", i(o, "/status/succeeded")))
    }),
    Column::new("Duration", "string", 0, job_duration),
    Column::new("Age", "string", 0, age),
    Column::new("Containers", "string", 1, containers),
    Column::new("Images", "string", 1, images),
];

impl Strategy for Jobs {
    fn pod_spec(&self) -> Option<super::PodSpecAt> {
        Some(super::PodSpecAt::Template("/spec/template/spec"))
    }

    fn field_selectable(&self, field: &str) -> bool {
        field == "status.successful"
    }

    fn validate(&self, obj: &Value, errs: &mut Vec<FieldError>) {
        let Some(spec) = obj.pointer("/spec/template/spec") else {
            errs.push(FieldError::required("spec.template.spec.containers"));
            return;
        };
        validation::pod_spec(spec, "spec.template.spec", errs);
        let policy = spec
            .get("restartPolicy")
            .and_then(Value::as_str)
            .unwrap_or("");
        if !matches!(policy, "Never" | "OnFailure") {
            errs.push(FieldError {
                field: "spec.template.spec.restartPolicy".into(),
                reason: "FieldValueNotSupported",
                message: format!(
                    "Unsupported value: {policy:?}: supported values: \"OnFailure\", \"Never\""
                ),
            });
        }
    }

    fn prepare_create(&self, obj: &mut Value) {
        let uid = s(obj, "/metadata/uid").to_string();
        let name = s(obj, "/metadata/name").to_string();
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

    fn columns(&self) -> &[Column] {
        JOB_COLUMNS
    }
}

impl Strategy for ReplicationControllers {
    fn pod_spec(&self) -> Option<super::PodSpecAt> {
        Some(super::PodSpecAt::Template("/spec/template/spec"))
    }

    fn validate(&self, obj: &Value, errs: &mut Vec<FieldError>) {
        let selector = obj.pointer("/spec/selector").and_then(Value::as_object);
        let labels = obj
            .pointer("/spec/template/metadata/labels")
            .and_then(Value::as_object);
        match selector {
            None => errs.push(FieldError::required("spec.selector")),
            Some(sel) if sel.is_empty() => errs.push(FieldError::required("spec.selector")),
            Some(sel) => {
                let selected = sel
                    .iter()
                    .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v));
                if !selected {
                    errs.push(FieldError::invalid(
                        "spec.template.metadata.labels",
                        &labels
                            .map(|l| Value::Object(l.clone()).to_string())
                            .unwrap_or_default(),
                        "`selector` does not match template `labels`",
                    ));
                }
            }
        }
        non_negative_replicas(obj, errs);
        match obj.pointer("/spec/template/spec") {
            Some(spec) => validation::pod_spec(spec, "spec.template.spec", errs),
            None => errs.push(FieldError::required("spec.template")),
        }
    }

    /// As Kubernetes defaults it: one replica, and a selector of the template's labels
    /// when none is given.
    fn prepare_create(&self, obj: &mut Value) {
        let labels = obj.pointer("/spec/template/metadata/labels").cloned();
        let spec = obj_mut(obj, "spec");
        default(spec, "replicas", json!(1));
        let empty = |v: Option<&Value>| v.and_then(Value::as_object).is_none_or(|m| m.is_empty());
        if empty(spec.get("selector")) {
            if let Some(l) = labels.filter(|l| !empty(Some(l))) {
                spec.insert("selector".into(), l);
            }
        }
        template(obj);
        obj["status"] = json!({"replicas": 0});
    }

    /// A ReplicaSet's columns: the Selector cell reads a plain map as well.
    fn columns(&self) -> &[Column] {
        REPLICASET_COLUMNS
    }
}
