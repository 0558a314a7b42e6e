//! Kinds charts and controllers create that Baton stores and shows: autoscalers, priority
//! classes, pod templates, controller revisions and certificate signing requests.

use serde_json::{json, Value};

use super::{age, name, Column, Strategy};
use crate::error::FieldError;
use crate::table::{container_field, i, none_if_empty, s, selector_string};

#[derive(Debug)]
pub struct HorizontalPodAutoscalers;
#[derive(Debug)]
pub struct PriorityClasses;
#[derive(Debug)]
pub struct PodTemplates;
#[derive(Debug)]
pub struct ControllerRevisions;
#[derive(Debug)]
pub struct CertificateSigningRequests;

/// `cpu: 40%/80%`, as kubectl shows a resource metric's current and target utilization.
fn hpa_targets(o: &Value) -> Value {
    let current = |name: &str| {
        o.pointer("/status/currentMetrics")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .find(|m| s(m, "/resource/name") == name)
            .and_then(|m| m.pointer("/resource/current/averageUtilization"))
            .and_then(Value::as_i64)
            .map(|u| format!("{u}%"))
            .unwrap_or_else(|| "<unknown>".into())
    };
    let targets: Vec<String> = o
        .pointer("/spec/metrics")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|m| s(m, "/type") == "Resource")
        .map(|m| {
            let name = s(m, "/resource/name");
            let target = match m
                .pointer("/resource/target/averageUtilization")
                .and_then(Value::as_i64)
            {
                Some(u) => format!("{u}%"),
                None => s(m, "/resource/target/averageValue").to_string(),
            };
            format!("{name}: {}/{target}", current(name))
        })
        .collect();
    json!(none_if_empty(targets.join(", ")))
}

static HPA_COLUMNS: &[Column] = &[
    Column::new("Name", "string", 0, name),
    Column::new("Reference", "string", 0, |o| {
        json!(format!(
            "{}/{}",
            s(o, "/spec/scaleTargetRef/kind"),
            s(o, "/spec/scaleTargetRef/name")
        ))
    }),
    Column::new("Targets", "string", 0, hpa_targets),
    Column::new("MinPods", "string", 0, |o| {
        json!(o
            .pointer("/spec/minReplicas")
            .and_then(Value::as_i64)
            .unwrap_or(1)
            .to_string())
    }),
    Column::new("MaxPods", "string", 0, |o| {
        json!(i(o, "/spec/maxReplicas").to_string())
    }),
    Column::new("Replicas", "string", 0, |o| {
        json!(i(o, "/status/currentReplicas").to_string())
    }),
    Column::new("Age", "string", 0, age),
];

impl Strategy for HorizontalPodAutoscalers {
    fn validate(&self, obj: &Value, errs: &mut Vec<FieldError>) {
        let min = obj
            .pointer("/spec/minReplicas")
            .and_then(Value::as_i64)
            .unwrap_or(1);
        let max = i(obj, "/spec/maxReplicas");
        if max < 1 {
            errs.push(FieldError::invalid(
                "spec.maxReplicas",
                &max.to_string(),
                "must be greater than or equal to 1",
            ));
        }
        if min > max {
            errs.push(FieldError::invalid(
                "spec.maxReplicas",
                &max.to_string(),
                "must be greater than or equal to `minReplicas`",
            ));
        }
    }

    fn columns(&self) -> &[Column] {
        HPA_COLUMNS
    }
}

static PRIORITYCLASS_COLUMNS: &[Column] = &[
    Column::new("Name", "string", 0, name),
    Column::new("Value", "integer", 0, |o| json!(i(o, "/value"))),
    Column::new("Global-Default", "boolean", 0, |o| {
        json!(o
            .get("globalDefault")
            .and_then(Value::as_bool)
            .unwrap_or(false))
    }),
    Column::new("Age", "string", 0, age),
    Column::new("PreemptionPolicy", "string", 0, |o| {
        json!(o
            .get("preemptionPolicy")
            .and_then(Value::as_str)
            .unwrap_or("PreemptLowerPriority"))
    }),
];

impl Strategy for PriorityClasses {
    fn validate(&self, obj: &Value, errs: &mut Vec<FieldError>) {
        let value = i(obj, "/value");
        // Higher values are reserved for the system's own classes.
        if value > 1_000_000_000 && !s(obj, "/metadata/name").starts_with("system-") {
            errs.push(FieldError::invalid(
                "value",
                &value.to_string(),
                "maximum allowed value of a user defined priority is 1000000000",
            ));
        }
    }

    fn validate_update(&self, old: &Value, new: &Value, errs: &mut Vec<FieldError>) {
        if old.get("value") != new.get("value") {
            errs.push(FieldError::invalid(
                "value",
                &new.get("value").map(Value::to_string).unwrap_or_default(),
                "field is immutable",
            ));
        }
    }

    fn columns(&self) -> &[Column] {
        PRIORITYCLASS_COLUMNS
    }
}

static PODTEMPLATE_COLUMNS: &[Column] = &[
    Column::new("Name", "string", 0, name),
    Column::new("Containers", "string", 0, |o| {
        json!(container_field(o, "/template/spec/containers", "name"))
    }),
    Column::new("Images", "string", 0, |o| {
        json!(container_field(o, "/template/spec/containers", "image"))
    }),
    Column::new("Pod Labels", "string", 0, |o| {
        json!(selector_string(o.pointer("/template/metadata/labels")))
    }),
];

impl Strategy for PodTemplates {
    fn pod_spec(&self) -> Option<super::PodSpecAt> {
        Some(super::PodSpecAt::Template("/template/spec"))
    }

    fn columns(&self) -> &[Column] {
        PODTEMPLATE_COLUMNS
    }
}

static CONTROLLERREVISION_COLUMNS: &[Column] = &[
    Column::new("Name", "string", 0, name),
    Column::new("Controller", "string", 0, |o| {
        let owner = o
            .pointer("/metadata/ownerReferences")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .find(|r| r.get("controller").and_then(Value::as_bool) == Some(true));
        json!(match owner {
            Some(r) => {
                let kind = s(r, "/kind").to_lowercase();
                let group_kind = match s(r, "/apiVersion").split_once('/') {
                    Some((group, _)) => format!("{kind}.{group}"),
                    None => kind,
                };
                format!("{group_kind}/{}", s(r, "/name"))
            }
            None => "<none>".into(),
        })
    }),
    Column::new("Revision", "integer", 0, |o| json!(i(o, "/revision"))),
    Column::new("Age", "string", 0, age),
];

impl Strategy for ControllerRevisions {
    fn columns(&self) -> &[Column] {
        CONTROLLERREVISION_COLUMNS
    }
}

fn csr_condition(o: &Value) -> Value {
    let conds: Vec<&str> = o
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|c| s(c, "/type"))
        .collect();
    let mut shown = if conds.is_empty() {
        "Pending".to_string()
    } else {
        conds.join(",")
    };
    if o.pointer("/status/certificate").is_some() {
        shown.push_str(",Issued");
    }
    json!(shown)
}

static CSR_COLUMNS: &[Column] = &[
    Column::new("Name", "string", 0, name),
    Column::new("Age", "string", 0, age),
    Column::new("SignerName", "string", 0, |o| {
        json!(s(o, "/spec/signerName"))
    }),
    Column::new("Requestor", "string", 0, |o| json!(s(o, "/spec/username"))),
    Column::new("RequestedDuration", "string", 0, |o| {
        json!(
            match o.pointer("/spec/expirationSeconds").and_then(Value::as_i64) {
                Some(secs) => crate::table::human_duration(secs),
                None => "<none>".into(),
            }
        )
    }),
    Column::new("Condition", "string", 0, csr_condition),
];

impl Strategy for CertificateSigningRequests {
    fn validate(&self, obj: &Value, errs: &mut Vec<FieldError>) {
        if s(obj, "/spec/signerName").is_empty() {
            errs.push(FieldError::required("spec.signerName"));
        }
        if s(obj, "/spec/request").is_empty() {
            errs.push(FieldError::required("spec.request"));
        }
    }

    fn columns(&self) -> &[Column] {
        CSR_COLUMNS
    }
}

#[derive(Debug)]
pub struct PodDisruptionBudgets;

/// A budget's `minAvailable`/`maxUnavailable` as kubectl prints it: the number or the
/// percentage, `N/A` when unset.
fn int_or_percent(o: &Value, ptr: &str) -> Value {
    match o.pointer(ptr) {
        Some(Value::Number(n)) => json!(n.to_string()),
        Some(Value::String(p)) => json!(p),
        _ => json!("N/A"),
    }
}

static PDB_COLUMNS: &[Column] = &[
    Column::new("Name", "string", 0, name),
    Column::new("Min Available", "string", 0, |o| {
        int_or_percent(o, "/spec/minAvailable")
    }),
    Column::new("Max Unavailable", "string", 0, |o| {
        int_or_percent(o, "/spec/maxUnavailable")
    }),
    Column::new("Allowed Disruptions", "integer", 0, |o| {
        json!(i(o, "/status/disruptionsAllowed"))
    }),
    Column::new("Age", "string", 0, age),
];

/// Checks an int-or-percent field: a non-negative number, or a percentage up to 100%.
fn check_int_or_percent(o: &Value, ptr: &str, field: &str, errs: &mut Vec<FieldError>) {
    match o.pointer(ptr) {
        None | Some(Value::Null) => {}
        Some(Value::Number(n)) if n.as_i64().is_some_and(|n| n >= 0) => {}
        Some(Value::Number(n)) => errs.push(FieldError::invalid(
            field,
            &n.to_string(),
            "must be greater than or equal to 0",
        )),
        Some(Value::String(p)) => {
            let ok = p
                .strip_suffix('%')
                .and_then(|n| n.parse::<u32>().ok())
                .is_some_and(|n| n <= 100);
            if !ok {
                errs.push(FieldError::invalid(
                    field,
                    p,
                    "must be an integer or a percentage between 0% and 100%",
                ));
            }
        }
        Some(_) => errs.push(FieldError::invalid(
            field,
            "",
            "must be an integer or a percentage",
        )),
    }
}

impl Strategy for PodDisruptionBudgets {
    fn validate(&self, o: &Value, errs: &mut Vec<FieldError>) {
        check_int_or_percent(o, "/spec/minAvailable", "spec.minAvailable", errs);
        check_int_or_percent(o, "/spec/maxUnavailable", "spec.maxUnavailable", errs);
        if o.pointer("/spec/minAvailable")
            .is_some_and(|v| !v.is_null())
            && o.pointer("/spec/maxUnavailable")
                .is_some_and(|v| !v.is_null())
        {
            errs.push(FieldError {
                field: "spec".into(),
                reason: "FieldValueInvalid",
                message:
                    "Invalid value: \"object\": minAvailable and maxUnavailable cannot be both set"
                        .into(),
            });
        }
    }

    fn prepare_create(&self, o: &mut Value) {
        o["status"] = json!({
            "disruptionsAllowed": 0, "currentHealthy": 0, "desiredHealthy": 0,
            "expectedPods": 0, "observedGeneration": 0,
        });
    }

    fn columns(&self) -> &[Column] {
        PDB_COLUMNS
    }
}
