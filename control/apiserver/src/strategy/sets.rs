//! DaemonSets, StatefulSets and CronJobs: their defaults, rules and columns.

use serde_json::{json, Value};

use super::workloads::{containers, images, selector};
use super::{age, name, Column, Strategy};
use crate::defaults::{default, obj_mut, pod_spec as default_pod_spec, template};
use crate::error::FieldError;
use crate::table::{age_of, container_field, i, s, selector_string};
use crate::validation;

#[derive(Debug)]
pub struct DaemonSets;
#[derive(Debug)]
pub struct StatefulSets;
#[derive(Debug)]
pub struct CronJobs;

/// A template's pods must restart: a set replaces a pod, it does not finish.
fn restarts_always(obj: &Value, errs: &mut Vec<FieldError>) {
    let policy = s(obj, "/spec/template/spec/restartPolicy");
    if !policy.is_empty() && policy != "Always" {
        errs.push(FieldError {
            field: "spec.template.spec.restartPolicy".into(),
            reason: "FieldValueNotSupported",
            message: format!("Unsupported value: {policy:?}: supported values: \"Always\""),
        });
    }
}

fn one_of(obj: &Value, ptr: &str, field: &str, allowed: &[&str], errs: &mut Vec<FieldError>) {
    let v = s(obj, ptr);
    if !v.is_empty() && !allowed.contains(&v) {
        let supported: Vec<String> = allowed.iter().map(|a| format!("{a:?}")).collect();
        errs.push(FieldError {
            field: field.into(),
            reason: "FieldValueNotSupported",
            message: format!(
                "Unsupported value: {v:?}: supported values: {}",
                supported.join(", ")
            ),
        });
    }
}

fn non_negative(obj: &Value, ptr: &str, field: &str, errs: &mut Vec<FieldError>) {
    if let Some(n) = obj.pointer(ptr).and_then(Value::as_i64) {
        if n < 0 {
            errs.push(FieldError::invalid(
                field,
                &n.to_string(),
                "must be greater than or equal to 0",
            ));
        }
    }
}

/// A field that may not change once set, as kube-apiserver words it.
fn immutable(old: &Value, new: &Value, ptr: &str, field: &str, errs: &mut Vec<FieldError>) {
    if old.pointer(ptr) != new.pointer(ptr) {
        errs.push(FieldError {
            field: field.into(),
            reason: "FieldValueInvalid",
            message: "Invalid value: \"object\": field is immutable".into(),
        });
    }
}

static DAEMONSET_COLUMNS: &[Column] = &[
    Column::new("Name", "string", 0, name),
    Column::new("Desired", "integer", 0, |o| {
        json!(i(o, "/status/desiredNumberScheduled"))
    }),
    Column::new("Current", "integer", 0, |o| {
        json!(i(o, "/status/currentNumberScheduled"))
    }),
    Column::new("Ready", "integer", 0, |o| {
        json!(i(o, "/status/numberReady"))
    }),
    Column::new("Up-to-date", "integer", 0, |o| {
        json!(i(o, "/status/updatedNumberScheduled"))
    }),
    Column::new("Available", "integer", 0, |o| {
        json!(i(o, "/status/numberAvailable"))
    }),
    Column::new("Node Selector", "string", 0, |o| {
        json!(selector_string(
            o.pointer("/spec/template/spec/nodeSelector")
        ))
    }),
    Column::new("Age", "string", 0, age),
    Column::new("Containers", "string", 1, containers),
    Column::new("Images", "string", 1, images),
    Column::new("Selector", "string", 1, selector),
];

impl Strategy for DaemonSets {
    fn pod_spec(&self) -> Option<super::PodSpecAt> {
        Some(super::PodSpecAt::Template("/spec/template/spec"))
    }

    fn validate(&self, obj: &Value, errs: &mut Vec<FieldError>) {
        validation::selector_matches_template(obj, errs);
        restarts_always(obj, errs);
        one_of(
            obj,
            "/spec/updateStrategy/type",
            "spec.updateStrategy.type",
            &["OnDelete", "RollingUpdate"],
            errs,
        );
        non_negative(obj, "/spec/minReadySeconds", "spec.minReadySeconds", errs);
    }

    fn validate_update(&self, old: &Value, new: &Value, errs: &mut Vec<FieldError>) {
        immutable(old, new, "/spec/selector", "spec.selector", errs);
    }

    fn prepare_create(&self, obj: &mut Value) {
        let spec = obj_mut(obj, "spec");
        default(spec, "revisionHistoryLimit", json!(10));
        default(
            spec,
            "updateStrategy",
            json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}}),
        );
        template(obj);
        obj["status"] = json!({
            "currentNumberScheduled": 0, "desiredNumberScheduled": 0,
            "numberMisscheduled": 0, "numberReady": 0,
        });
    }

    fn columns(&self) -> &[Column] {
        DAEMONSET_COLUMNS
    }
}

static STATEFULSET_COLUMNS: &[Column] = &[
    Column::new("Name", "string", 0, name),
    Column::new("Ready", "string", 0, |o| {
        let want = o
            .pointer("/spec/replicas")
            .and_then(Value::as_i64)
            .unwrap_or(1);
        json!(format!("{}/{want}", i(o, "/status/readyReplicas")))
    }),
    Column::new("Age", "string", 0, age),
    Column::new("Containers", "string", 1, containers),
    Column::new("Images", "string", 1, images),
];

/// The parts of a StatefulSet's spec an update may change; kube-apiserver forbids the rest.
const STATEFULSET_MUTABLE: &[&str] = &[
    "replicas",
    "ordinals",
    "template",
    "updateStrategy",
    "persistentVolumeClaimRetentionPolicy",
    "minReadySeconds",
];

/// The StatefulSet with each claim template as a volume of its pod template, as its
/// pods will have them: what the pod template's mounts are checked against.
fn with_claim_volumes(obj: &Value) -> Value {
    let mut o = obj.clone();
    let names: Vec<Value> = obj
        .pointer("/spec/volumeClaimTemplates")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|t| json!(s(t, "/metadata/name")))
        .collect();
    if let Some(spec) = o
        .pointer_mut("/spec/template/spec")
        .and_then(Value::as_object_mut)
    {
        let volumes = spec.entry("volumes").or_insert(json!([]));
        if let Some(vs) = volumes.as_array_mut() {
            for n in names {
                vs.push(json!({"name": n, "persistentVolumeClaim": {"claimName": n}}));
            }
        }
    }
    o
}

impl Strategy for StatefulSets {
    fn pod_spec(&self) -> Option<super::PodSpecAt> {
        Some(super::PodSpecAt::Template("/spec/template/spec"))
    }

    fn validate(&self, obj: &Value, errs: &mut Vec<FieldError>) {
        validation::selector_matches_template(&with_claim_volumes(obj), errs);
        restarts_always(obj, errs);
        non_negative(obj, "/spec/replicas", "spec.replicas", errs);
        non_negative(obj, "/spec/minReadySeconds", "spec.minReadySeconds", errs);
        non_negative(obj, "/spec/ordinals/start", "spec.ordinals.start", errs);
        one_of(
            obj,
            "/spec/podManagementPolicy",
            "spec.podManagementPolicy",
            &["OrderedReady", "Parallel"],
            errs,
        );
        one_of(
            obj,
            "/spec/updateStrategy/type",
            "spec.updateStrategy.type",
            &["OnDelete", "RollingUpdate"],
            errs,
        );
        for (n, t) in obj
            .pointer("/spec/volumeClaimTemplates")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            let p = format!("spec.volumeClaimTemplates[{n}]");
            if s(t, "/metadata/name").is_empty() {
                errs.push(FieldError::required(format!("{p}.metadata.name")));
            }
            super::storage::claim_spec(t, &format!("{p}.spec"), errs);
        }
    }

    fn validate_update(&self, old: &Value, new: &Value, errs: &mut Vec<FieldError>) {
        let frozen = |o: &Value| -> Value {
            let mut spec = o.get("spec").cloned().unwrap_or(json!({}));
            if let Some(m) = spec.as_object_mut() {
                for k in STATEFULSET_MUTABLE {
                    m.remove(*k);
                }
            }
            spec
        };
        if frozen(old) != frozen(new) {
            errs.push(FieldError {
                field: "spec".into(),
                reason: "FieldValueForbidden",
                message: "Forbidden: updates to statefulset spec for fields other than 'replicas', 'ordinals', 'template', 'updateStrategy', 'persistentVolumeClaimRetentionPolicy' and 'minReadySeconds' are forbidden".into(),
            });
        }
    }

    fn prepare_create(&self, obj: &mut Value) {
        let spec = obj_mut(obj, "spec");
        default(spec, "replicas", json!(1));
        default(spec, "podManagementPolicy", json!("OrderedReady"));
        default(spec, "revisionHistoryLimit", json!(10));
        default(
            spec,
            "updateStrategy",
            json!({"type": "RollingUpdate", "rollingUpdate": {"partition": 0}}),
        );
        default(
            spec,
            "persistentVolumeClaimRetentionPolicy",
            json!({"whenDeleted": "Retain", "whenScaled": "Retain"}),
        );
        if let Some(ts) = spec
            .get_mut("volumeClaimTemplates")
            .and_then(Value::as_array_mut)
        {
            for t in ts {
                super::storage::default_claim(t);
            }
        }
        template(obj);
        obj["status"] = json!({"replicas": 0, "availableReplicas": 0});
    }

    fn columns(&self) -> &[Column] {
        STATEFULSET_COLUMNS
    }
}

static CRONJOB_COLUMNS: &[Column] = &[
    Column::new("Name", "string", 0, name),
    Column::new("Schedule", "string", 0, |o| json!(s(o, "/spec/schedule"))),
    Column::new("Timezone", "string", 0, |o| {
        let z = s(o, "/spec/timeZone");
        json!(if z.is_empty() { "<none>" } else { z })
    }),
    Column::new("Suspend", "boolean", 0, |o| {
        json!(o
            .pointer("/spec/suspend")
            .and_then(Value::as_bool)
            .unwrap_or(false))
    }),
    Column::new("Active", "integer", 0, |o| {
        json!(o
            .pointer("/status/active")
            .and_then(Value::as_array)
            .map_or(0, Vec::len))
    }),
    Column::new("Last Schedule", "string", 0, |o| {
        match o
            .pointer("/status/lastScheduleTime")
            .and_then(Value::as_str)
        {
            Some(t) => json!(age_of(Some(t))),
            None => json!("<none>"),
        }
    }),
    Column::new("Age", "string", 0, age),
    Column::new("Containers", "string", 1, |o| {
        json!(container_field(
            o,
            "/spec/jobTemplate/spec/template/spec/containers",
            "name"
        ))
    }),
    Column::new("Images", "string", 1, |o| {
        json!(container_field(
            o,
            "/spec/jobTemplate/spec/template/spec/containers",
            "image"
        ))
    }),
    Column::new("Selector", "string", 1, |o| {
        json!(selector_string(
            o.pointer("/spec/jobTemplate/spec/selector")
        ))
    }),
];

/// A CronJob's name goes into its Jobs' names with 11 more characters.
const CRONJOB_NAME_MAX: usize = 52;

impl Strategy for CronJobs {
    fn pod_spec(&self) -> Option<super::PodSpecAt> {
        Some(super::PodSpecAt::Template(
            "/spec/jobTemplate/spec/template/spec",
        ))
    }

    fn validate(&self, obj: &Value, errs: &mut Vec<FieldError>) {
        let name = s(obj, "/metadata/name");
        if name.len() > CRONJOB_NAME_MAX {
            errs.push(FieldError::invalid(
                "metadata.name",
                name,
                format!("must be no more than {CRONJOB_NAME_MAX} characters"),
            ));
        }
        let schedule = s(obj, "/spec/schedule");
        let mut zone = obj.pointer("/spec/timeZone").and_then(Value::as_str);
        if let Some(z) = zone.filter(|z| !z.is_empty()) {
            if baton_kube::cron::zone_named(z).is_err() {
                errs.push(FieldError::invalid("spec.timeZone", z, "unknown time zone"));
                zone = None;
            }
        }
        if schedule.is_empty() {
            errs.push(FieldError::required("spec.schedule"));
        } else if let Err(e) = baton_kube::cron::Schedule::parse(schedule, zone) {
            errs.push(FieldError::invalid("spec.schedule", schedule, e));
        }
        one_of(
            obj,
            "/spec/concurrencyPolicy",
            "spec.concurrencyPolicy",
            &["Allow", "Forbid", "Replace"],
            errs,
        );
        for (ptr, field) in [
            (
                "/spec/startingDeadlineSeconds",
                "spec.startingDeadlineSeconds",
            ),
            (
                "/spec/successfulJobsHistoryLimit",
                "spec.successfulJobsHistoryLimit",
            ),
            (
                "/spec/failedJobsHistoryLimit",
                "spec.failedJobsHistoryLimit",
            ),
        ] {
            non_negative(obj, ptr, field, errs);
        }
        let Some(spec) = obj.pointer("/spec/jobTemplate/spec/template/spec") else {
            errs.push(FieldError::required(
                "spec.jobTemplate.spec.template.spec.containers",
            ));
            return;
        };
        validation::pod_spec(spec, "spec.jobTemplate.spec.template.spec", errs);
        let policy = s(spec, "/restartPolicy");
        if !matches!(policy, "Never" | "OnFailure") {
            errs.push(FieldError {
                field: "spec.jobTemplate.spec.template.spec.restartPolicy".into(),
                reason: "FieldValueNotSupported",
                message: format!(
                    "Unsupported value: {policy:?}: supported values: \"OnFailure\", \"Never\""
                ),
            });
        }
    }

    fn prepare_create(&self, obj: &mut Value) {
        let spec = obj_mut(obj, "spec");
        default(spec, "concurrencyPolicy", json!("Allow"));
        default(spec, "suspend", json!(false));
        default(spec, "successfulJobsHistoryLimit", json!(3));
        default(spec, "failedJobsHistoryLimit", json!(1));
        if let Some(t) = obj.pointer_mut("/spec/jobTemplate/spec/template/spec") {
            default_pod_spec(t);
        }
        obj["status"] = json!({});
    }

    fn columns(&self) -> &[Column] {
        CRONJOB_COLUMNS
    }
}
