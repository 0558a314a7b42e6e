//! Kinds charts and controllers create that Baton stores and shows: autoscalers, priority
//! classes, pod templates, controller revisions and certificate signing requests.

use baton_auth::UserInfo;
use serde_json::{json, Value};

use super::{age, name, Column, Hook, Strategy};
use crate::error::{ApiError, ApiResult, FieldError};
use crate::objects::Objects;
use crate::table::{container_field, i, none_if_empty, s, selector_string};

#[derive(Debug)]
pub struct HorizontalPodAutoscalers;
/// autoscaling/v1, served from the autoscaling/v2 objects stored (`kubectl autoscale`
/// writes v1).
#[derive(Debug)]
pub struct HorizontalPodAutoscalersV1;
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
    // The current figure of the metric that `same` picks, at `pointer` within it.
    let current = |same: &dyn Fn(&Value) -> bool, pointer: &str| -> Option<String> {
        o.pointer("/status/currentMetrics")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .find(|m| same(m))
            .and_then(|m| m.pointer(pointer))
            .map(|v| match v {
                Value::Number(n) => format!("{n}%"),
                other => other.as_str().unwrap_or_default().to_string(),
            })
    };
    let unknown = || "<unknown>".to_string();
    let targets: Vec<String> = o
        .pointer("/spec/metrics")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|m| match s(m, "/type") {
            "Resource" => {
                let name = s(m, "/resource/name");
                let same =
                    |c: &Value| s(c, "/type") == "Resource" && s(c, "/resource/name") == name;
                let (now, target) = match m
                    .pointer("/resource/target/averageUtilization")
                    .and_then(Value::as_i64)
                {
                    Some(u) => (
                        current(&same, "/resource/current/averageUtilization"),
                        format!("{u}%"),
                    ),
                    None => (
                        current(&same, "/resource/current/averageValue"),
                        s(m, "/resource/target/averageValue").to_string(),
                    ),
                };
                Some(format!("{name}: {}/{target}", now.unwrap_or_else(unknown)))
            }
            "Pods" => {
                let name = s(m, "/pods/metric/name");
                let same = |c: &Value| s(c, "/type") == "Pods" && s(c, "/pods/metric/name") == name;
                let now = current(&same, "/pods/current/averageValue");
                Some(format!(
                    "{}/{}",
                    now.unwrap_or_else(unknown),
                    s(m, "/pods/target/averageValue")
                ))
            }
            _ => None,
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
        if min < 0 {
            errs.push(FieldError::invalid(
                "spec.minReplicas",
                &min.to_string(),
                "must be greater than or equal to 0",
            ));
        }
        // HPAScaleToZero: with no pods there is no CPU to read, so only a metric that
        // still means something at zero (the pods' requests, an object's or an external
        // one) may take a workload there.
        let beyond_resources = obj
            .pointer("/spec/metrics")
            .and_then(Value::as_array)
            .is_some_and(|m| {
                m.iter()
                    .any(|m| m["type"] != "Resource" && m["type"] != "ContainerResource")
            });
        if min == 0 && !beyond_resources {
            errs.push(FieldError::invalid(
                "spec.minReplicas",
                "0",
                "must be greater than or equal to 1 unless a Pods, Object or External metric is set (scale to zero follows a metric of the workload's traffic, such as the Pods metric http_requests_per_second)",
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

/// Where v1 keeps what only v2 can say, as kube-apiserver's conversion does, so that a
/// v1 read-modify-write loses nothing.
const V2_METRICS: &str = "autoscaling.alpha.kubernetes.io/metrics";
const V2_BEHAVIOR: &str = "autoscaling.alpha.kubernetes.io/behavior";

/// Whether a v2 metric is the one v1 has a field for: CPU utilization.
fn is_cpu_utilization(m: &Value) -> bool {
    s(m, "/type") == "Resource"
        && s(m, "/resource/name") == "cpu"
        && s(m, "/resource/target/type") == "Utilization"
}

impl Strategy for HorizontalPodAutoscalersV1 {
    fn validate(&self, obj: &Value, errs: &mut Vec<FieldError>) {
        HorizontalPodAutoscalers.validate(obj, errs);
    }

    /// v2 → v1: the CPU utilization target and reading in v1's fields; other metrics and
    /// the behavior in annotations.
    fn stored_to_served(&self, obj: &mut Value) {
        let metrics: Vec<Value> = obj
            .pointer("/spec/metrics")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let (cpu, others): (Vec<Value>, Vec<Value>) =
            metrics.into_iter().partition(is_cpu_utilization);
        let mut notes = serde_json::Map::new();
        if !others.is_empty() {
            notes.insert(V2_METRICS.into(), json!(Value::Array(others).to_string()));
        }
        if let Some(spec) = obj.get_mut("spec").and_then(Value::as_object_mut) {
            spec.remove("metrics");
            if let Some(b) = spec.remove("behavior") {
                notes.insert(V2_BEHAVIOR.into(), json!(b.to_string()));
            }
            if let Some(u) = cpu
                .first()
                .and_then(|m| m.pointer("/resource/target/averageUtilization"))
            {
                spec.insert("targetCPUUtilizationPercentage".into(), u.clone());
            }
        }
        if let Some(status) = obj.get_mut("status").and_then(Value::as_object_mut) {
            let current = status
                .remove("currentMetrics")
                .and_then(|m| m.as_array().cloned())
                .unwrap_or_default()
                .into_iter()
                .find(|m| s(m, "/type") == "Resource" && s(m, "/resource/name") == "cpu")
                .and_then(|m| m.pointer("/resource/current/averageUtilization").cloned());
            if let Some(u) = current {
                status.insert("currentCPUUtilizationPercentage".into(), u);
            }
            status.remove("conditions");
        }
        if !notes.is_empty() {
            let meta = obj["metadata"].as_object_mut();
            if let Some(meta) = meta {
                let a = meta.entry("annotations").or_insert_with(|| json!({}));
                if let Some(a) = a.as_object_mut() {
                    a.extend(notes);
                }
            }
        }
    }

    /// v1 → v2: the CPU target as a metric, beside what the annotations kept.
    fn served_to_stored(&self, obj: &mut Value) {
        let mut kept = (None, None);
        if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
            if let Some(a) = meta.get_mut("annotations").and_then(Value::as_object_mut) {
                kept = (a.remove(V2_METRICS), a.remove(V2_BEHAVIOR));
                // What conversion added and took back leaves no trace: a v1 write of an
                // unchanged object stays a no-op.
                if a.is_empty() && (kept.0.is_some() || kept.1.is_some()) {
                    meta.remove("annotations");
                }
            }
        }
        let parse = |v: Option<Value>| {
            v.as_ref()
                .and_then(Value::as_str)
                .and_then(|t| serde_json::from_str::<Value>(t).ok())
        };
        let mut metrics: Vec<Value> = parse(kept.0)
            .and_then(|m| m.as_array().cloned())
            .unwrap_or_default();
        if let Some(spec) = obj.get_mut("spec").and_then(Value::as_object_mut) {
            if let Some(u) = spec.remove("targetCPUUtilizationPercentage") {
                metrics.insert(
                    0,
                    json!({"type": "Resource", "resource": {"name": "cpu",
                        "target": {"type": "Utilization", "averageUtilization": u}}}),
                );
            }
            if !metrics.is_empty() {
                spec.insert("metrics".into(), Value::Array(metrics));
            }
            if let Some(b) = parse(kept.1) {
                spec.insert("behavior".into(), b);
            }
        }
        if let Some(status) = obj.get_mut("status").and_then(Value::as_object_mut) {
            if let Some(u) = status.remove("currentCPUUtilizationPercentage") {
                status.insert(
                    "currentMetrics".into(),
                    json!([{"type": "Resource", "resource": {"name": "cpu",
                        "current": {"averageUtilization": u}}}]),
                );
            }
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
        let request = s(obj, "/spec/request");
        if request.is_empty() {
            errs.push(FieldError::required("spec.request"));
        } else if !csr_request_is_pem(request) {
            errs.push(FieldError::invalid(
                "spec.request",
                "",
                "must be a base64-encoded PEM CERTIFICATE REQUEST",
            ));
        }
        if let Some(secs) = obj
            .pointer("/spec/expirationSeconds")
            .and_then(Value::as_i64)
        {
            if secs < 600 {
                errs.push(FieldError::invalid(
                    "spec.expirationSeconds",
                    &secs.to_string(),
                    "may not specify a duration less than 600 seconds (10 minutes)",
                ));
            }
        }
    }

    fn admit<'a>(
        &'a self,
        objects: &'a Objects,
        user: &'a UserInfo,
        obj: &'a Value,
        old: Option<&'a Value>,
    ) -> Hook<'a, ApiResult<()>> {
        Box::pin(async move {
            match old {
                Some(old) => crate::access::signers::csr_update(objects, user, obj, old).await,
                None => Ok(()),
            }
        })
    }

    fn prepare_create(&self, obj: &mut Value) {
        // A new request is neither approved nor signed, whatever the body says.
        if let Some(o) = obj.as_object_mut() {
            o.remove("status");
        }
    }

    fn prepare_update(&self, old: &Value, new: &mut Value) {
        // A request is what it was made as: who asked and what for cannot change after
        // the fact (between an approval and the signing, say).
        new["spec"] = old.get("spec").cloned().unwrap_or(Value::Null);
    }

    fn prepare_status_update(&self, old: &Value, new: &mut Value) {
        // The decision is the approver's (/approval), and a certificate once issued stays
        // the one issued: a signer writing /status changes neither.
        let decision = |o: &Value| -> Vec<Value> {
            o.pointer("/status/conditions")
                .and_then(Value::as_array)
                .map(|c| c.iter().filter(|c| is_decision(c)).cloned().collect())
                .unwrap_or_default()
        };
        let mut conditions: Vec<Value> = new
            .pointer("/status/conditions")
            .and_then(Value::as_array)
            .map(|c| c.iter().filter(|c| !is_decision(c)).cloned().collect())
            .unwrap_or_default();
        conditions.extend(decision(old));
        new["status"]["conditions"] = json!(conditions);
        if let Some(cert) = old
            .pointer("/status/certificate")
            .filter(|c| c.as_str().is_some_and(|c| !c.is_empty()))
        {
            new["status"]["certificate"] = cert.clone();
        }
    }

    fn prepare_approval_update(&self, old: &Value, new: &mut Value) -> ApiResult<()> {
        let kinds = |o: &Value| -> Vec<String> {
            o.pointer("/status/conditions")
                .and_then(Value::as_array)
                .map(|c| {
                    c.iter()
                        .filter(|c| is_decision(c))
                        .filter_map(|c| c.get("type").and_then(Value::as_str).map(String::from))
                        .collect()
                })
                .unwrap_or_default()
        };
        let (before, after) = (kinds(old), kinds(new));
        let invalid = |message: &str| ApiError::Invalid {
            group: "certificates.k8s.io".into(),
            kind: "CertificateSigningRequest".into(),
            name: s(old, "/metadata/name").to_string(),
            causes: vec![FieldError::invalid("status.conditions", "", message)],
        };
        if before.iter().any(|k| !after.contains(k)) {
            return Err(invalid(
                "an Approved or Denied condition may not be removed",
            ));
        }
        if after.iter().any(|k| k == "Approved") && after.iter().any(|k| k == "Denied") {
            return Err(invalid(
                "Approved and Denied conditions are mutually exclusive",
            ));
        }
        Ok(())
    }

    fn prepare_create_by(&self, user: &UserInfo, obj: &mut Value) {
        // Who asked is what the approver decides on: the API server says it, never the
        // body (kube-apiserver's CSR strategy does the same).
        obj["spec"]["username"] = json!(user.name);
        obj["spec"]["uid"] = json!(user.uid);
        obj["spec"]["groups"] = json!(user.groups);
        if user.extra.is_empty() {
            if let Some(spec) = obj["spec"].as_object_mut() {
                spec.remove("extra");
            }
        } else {
            obj["spec"]["extra"] = json!(user.extra);
        }
    }

    fn columns(&self) -> &[Column] {
        CSR_COLUMNS
    }
}

/// Whether a CSR condition is a decision (Approved or Denied) rather than the signer's.
fn is_decision(c: &Value) -> bool {
    matches!(
        c.get("type").and_then(Value::as_str),
        Some("Approved" | "Denied")
    )
}

/// Whether a CSR's `spec.request` (base64 in JSON) holds a PEM certificate request.
fn csr_request_is_pem(b64: &str) -> bool {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .ok()
        .and_then(|pem| String::from_utf8(pem).ok())
        .is_some_and(|pem| pem.contains("-----BEGIN CERTIFICATE REQUEST-----"))
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

#[cfg(test)]
mod tests {

    #[test]
    fn a_csrs_decision_is_kept_by_status_writes_and_not_undone_by_approvals() {
        let csr = CertificateSigningRequests;
        let approved = json!({"metadata": {"name": "c"}, "status": {"conditions": [
            {"type": "Approved", "status": "True"}]}});
        // A status write that drops the approval and sets a certificate keeps the first.
        let mut written = json!({"status": {"conditions": [], "certificate": "Q0VSVA=="}});
        csr.prepare_status_update(&approved, &mut written);
        assert_eq!(written["status"]["conditions"][0]["type"], "Approved");
        assert_eq!(written["status"]["certificate"], "Q0VSVA==");
        // An issued certificate is not replaced.
        let mut again = json!({"status": {"certificate": "T1RIRVI="}});
        csr.prepare_status_update(&written, &mut again);
        assert_eq!(again["status"]["certificate"], "Q0VSVA==");
        // /approval may not remove a decision, nor approve and deny at once.
        let mut removed = json!({"status": {"conditions": []}});
        assert!(csr
            .prepare_approval_update(&approved, &mut removed)
            .is_err());
        let mut both = json!({"status": {"conditions": [
            {"type": "Approved", "status": "True"}, {"type": "Denied", "status": "True"}]}});
        assert!(csr.prepare_approval_update(&approved, &mut both).is_err());
        let mut kept = approved.clone();
        assert!(csr.prepare_approval_update(&approved, &mut kept).is_ok());
    }

    use super::*;

    #[test]
    fn an_autoscaler_round_trips_through_v1_without_losing_its_v2_fields() {
        let v2 = json!({
            "metadata": {"name": "web"},
            "spec": {"minReplicas": 1, "maxReplicas": 5,
                "metrics": [
                    {"type": "Resource", "resource": {"name": "memory",
                        "target": {"type": "AverageValue", "averageValue": "64Mi"}}},
                    {"type": "Resource", "resource": {"name": "cpu",
                        "target": {"type": "Utilization", "averageUtilization": 50}}},
                ],
                "behavior": {"scaleDown": {"stabilizationWindowSeconds": 5}}},
            "status": {"currentReplicas": 2, "desiredReplicas": 3,
                "currentMetrics": [{"type": "Resource", "resource": {"name": "cpu",
                    "current": {"averageUtilization": 70}}}]},
        });
        let mut v1 = v2.clone();
        HorizontalPodAutoscalersV1.stored_to_served(&mut v1);
        assert_eq!(v1["spec"]["targetCPUUtilizationPercentage"], 50);
        assert_eq!(v1["status"]["currentCPUUtilizationPercentage"], 70);
        assert!(v1["spec"].get("metrics").is_none() && v1["spec"].get("behavior").is_none());
        let mut back = v1.clone();
        HorizontalPodAutoscalersV1.served_to_stored(&mut back);
        assert_eq!(back["spec"]["behavior"], v2["spec"]["behavior"]);
        let metrics = back["spec"]["metrics"].as_array().unwrap();
        assert_eq!(metrics.len(), 2);
        assert!(metrics.iter().any(is_cpu_utilization));
        assert!(back["metadata"].get("annotations").is_none(), "{back}");
        assert_eq!(
            back["status"]["currentMetrics"],
            v2["status"]["currentMetrics"]
        );
        // What kubectl autoscale writes.
        let mut plain = json!({"spec": {"maxReplicas": 3, "targetCPUUtilizationPercentage": 80}});
        HorizontalPodAutoscalersV1.served_to_stored(&mut plain);
        assert_eq!(
            plain["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"],
            80
        );
    }
}
