//! StorageClasses, PersistentVolumes and PersistentVolumeClaims: their defaults, rules and
//! columns.

use serde_json::{json, Value};

use baton_kube::storage::{CLAIM_PROTECTION, DEFAULT_CLASS};

use super::{age, name, Column, Strategy};
use crate::defaults::{default, obj_mut};
use crate::error::FieldError;
use crate::table::{none_if_empty, s};

#[derive(Debug)]
pub struct StorageClasses;
#[derive(Debug)]
pub struct PersistentVolumes;
#[derive(Debug)]
pub struct PersistentVolumeClaims;

const ACCESS_MODES: &[&str] = &[
    "ReadWriteOnce",
    "ReadOnlyMany",
    "ReadWriteMany",
    "ReadWriteOncePod",
];

fn modes_short(o: &Value, ptr: &str) -> Value {
    let short: Vec<&str> = o
        .pointer(ptr)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(|m| match m {
            "ReadWriteOnce" => "RWO",
            "ReadOnlyMany" => "ROX",
            "ReadWriteMany" => "RWX",
            "ReadWriteOncePod" => "RWOP",
            other => other,
        })
        .collect();
    json!(short.join(","))
}

fn quantity_ok(q: &Value) -> bool {
    match q {
        Value::String(s) => baton_kube::quantity::nanos(s).is_ok(),
        Value::Number(n) => n.as_f64().is_some_and(|n| n >= 0.0),
        _ => false,
    }
}

fn access_modes(o: &Value, ptr: &str, field: &str, errs: &mut Vec<FieldError>) {
    let modes: Vec<&str> = o
        .pointer(ptr)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    if modes.is_empty() {
        errs.push(FieldError::required(field));
    }
    for m in modes {
        if !ACCESS_MODES.contains(&m) {
            errs.push(FieldError {
                field: field.into(),
                reason: "FieldValueNotSupported",
                message: format!(
                    "Unsupported value: {m:?}: supported values: \"ReadOnlyMany\", \"ReadWriteMany\", \"ReadWriteOnce\", \"ReadWriteOncePod\""
                ),
            });
        }
    }
}

/// Checks a claim (or a StatefulSet's claim template) spec at `path`.
pub(crate) fn claim_spec(claim: &Value, path: &str, errs: &mut Vec<FieldError>) {
    access_modes(
        claim,
        "/spec/accessModes",
        &format!("{path}.accessModes"),
        errs,
    );
    match claim.pointer("/spec/resources/requests/storage") {
        None => errs.push(FieldError::required(format!("{path}.resources[storage]"))),
        Some(q) if !quantity_ok(q) => errs.push(FieldError::invalid(
            format!("{path}.resources.requests[storage]"),
            &q.to_string(),
            "must be a non-negative quantity",
        )),
        Some(_) => {}
    }
}

/// A claim's defaults, also inside a StatefulSet's templates.
pub(crate) fn default_claim(claim: &mut Value) {
    default(obj_mut(claim, "spec"), "volumeMode", json!("Filesystem"));
}

static STORAGECLASS_COLUMNS: &[Column] = &[
    Column::new("Name", "string", 0, |o| {
        let n = s(o, "/metadata/name");
        let is_default = o
            .pointer("/metadata/annotations")
            .and_then(|a| a.get(DEFAULT_CLASS))
            .and_then(Value::as_str)
            == Some("true");
        json!(if is_default {
            format!("{n} (default)")
        } else {
            n.to_string()
        })
    }),
    Column::new("Provisioner", "string", 0, |o| json!(s(o, "/provisioner"))),
    Column::new("ReclaimPolicy", "string", 0, |o| {
        json!(s(o, "/reclaimPolicy"))
    }),
    Column::new("VolumeBindingMode", "string", 0, |o| {
        json!(s(o, "/volumeBindingMode"))
    }),
    Column::new("AllowVolumeExpansion", "string", 0, |o| {
        json!(o
            .get("allowVolumeExpansion")
            .and_then(Value::as_bool)
            .unwrap_or(false))
    }),
    Column::new("Age", "string", 0, age),
];

impl Strategy for StorageClasses {
    fn validate(&self, o: &Value, errs: &mut Vec<FieldError>) {
        if s(o, "/provisioner").is_empty() {
            errs.push(FieldError::required("provisioner"));
        }
        for (ptr, field, allowed) in [
            ("/reclaimPolicy", "reclaimPolicy", &["Delete", "Retain"][..]),
            (
                "/volumeBindingMode",
                "volumeBindingMode",
                &["Immediate", "WaitForFirstConsumer"][..],
            ),
        ] {
            let v = s(o, ptr);
            if !v.is_empty() && !allowed.contains(&v) {
                errs.push(FieldError {
                    field: field.into(),
                    reason: "FieldValueNotSupported",
                    message: format!("Unsupported value: {v:?}"),
                });
            }
        }
    }

    fn validate_update(&self, old: &Value, new: &Value, errs: &mut Vec<FieldError>) {
        for key in [
            "provisioner",
            "parameters",
            "reclaimPolicy",
            "volumeBindingMode",
        ] {
            if old.get(key) != new.get(key) {
                errs.push(FieldError {
                    field: key.into(),
                    reason: "FieldValueForbidden",
                    message: "Forbidden: updates to this field are forbidden".into(),
                });
            }
        }
    }

    fn prepare_create(&self, o: &mut Value) {
        if let Some(m) = o.as_object_mut() {
            default(m, "reclaimPolicy", json!("Delete"));
            default(m, "volumeBindingMode", json!("Immediate"));
        }
    }

    fn columns(&self) -> &[Column] {
        STORAGECLASS_COLUMNS
    }
}

static PV_COLUMNS: &[Column] = &[
    Column::new("Name", "string", 0, name),
    Column::new("Capacity", "string", 0, |o| {
        json!(s(o, "/spec/capacity/storage"))
    }),
    Column::new("Access Modes", "string", 0, |o| {
        modes_short(o, "/spec/accessModes")
    }),
    Column::new("Reclaim Policy", "string", 0, |o| {
        json!(s(o, "/spec/persistentVolumeReclaimPolicy"))
    }),
    Column::new("Status", "string", 0, |o| json!(s(o, "/status/phase"))),
    Column::new("Claim", "string", 0, |o| {
        let ns = s(o, "/spec/claimRef/namespace");
        let n = s(o, "/spec/claimRef/name");
        json!(if n.is_empty() {
            String::new()
        } else {
            format!("{ns}/{n}")
        })
    }),
    Column::new("StorageClass", "string", 0, |o| {
        json!(s(o, "/spec/storageClassName"))
    }),
    Column::new("VolumeAttributesClass", "string", 0, |o| {
        json!(none_if_empty(
            s(o, "/spec/volumeAttributesClassName").to_string()
        ))
    }),
    Column::new("Reason", "string", 0, |o| json!(s(o, "/status/reason"))),
    Column::new("Age", "string", 0, age),
    Column::new("VolumeMode", "string", 1, |o| {
        json!(s(o, "/spec/volumeMode"))
    }),
];

/// The volume sources a PersistentVolume may name; one is required.
const PV_SOURCES: &[&str] = &["hostPath", "local", "nfs", "csi"];

impl Strategy for PersistentVolumes {
    fn validate(&self, o: &Value, errs: &mut Vec<FieldError>) {
        access_modes(o, "/spec/accessModes", "spec.accessModes", errs);
        match o.pointer("/spec/capacity/storage") {
            None => errs.push(FieldError::required("spec.capacity")),
            Some(q) if !quantity_ok(q) => errs.push(FieldError::invalid(
                "spec.capacity[storage]",
                &q.to_string(),
                "must be a non-negative quantity",
            )),
            Some(_) => {}
        }
        let sources: Vec<&&str> = PV_SOURCES
            .iter()
            .filter(|k| o.pointer(&format!("/spec/{k}")).is_some())
            .collect();
        match sources.len() {
            0 => errs.push(FieldError::required("spec")),
            1 => {}
            _ => errs.push(FieldError {
                field: format!("spec.{}", sources[1]),
                reason: "FieldValueForbidden",
                message: "Forbidden: may not specify more than 1 volume type".into(),
            }),
        }
        for key in ["hostPath", "local"] {
            let p = s(o, &format!("/spec/{key}/path"));
            if o.pointer(&format!("/spec/{key}")).is_some()
                && (!p.starts_with('/') || p.split('/').any(|c| c == ".."))
            {
                errs.push(FieldError::invalid(
                    format!("spec.{key}.path"),
                    p,
                    "must be an absolute path without '..'",
                ));
            }
        }
    }

    fn prepare_create(&self, o: &mut Value) {
        let spec = obj_mut(o, "spec");
        default(spec, "persistentVolumeReclaimPolicy", json!("Retain"));
        default(spec, "volumeMode", json!("Filesystem"));
        o["status"] = json!({"phase": "Pending"});
    }

    fn columns(&self) -> &[Column] {
        PV_COLUMNS
    }
}

static PVC_COLUMNS: &[Column] = &[
    Column::new("Name", "string", 0, name),
    Column::new("Status", "string", 0, |o| json!(s(o, "/status/phase"))),
    Column::new("Volume", "string", 0, |o| json!(s(o, "/spec/volumeName"))),
    Column::new("Capacity", "string", 0, |o| {
        json!(s(o, "/status/capacity/storage"))
    }),
    Column::new("Access Modes", "string", 0, |o| {
        modes_short(o, "/status/accessModes")
    }),
    Column::new("StorageClass", "string", 0, |o| {
        json!(s(o, "/spec/storageClassName"))
    }),
    Column::new("VolumeAttributesClass", "string", 0, |o| {
        json!(none_if_empty(
            s(o, "/spec/volumeAttributesClassName").to_string()
        ))
    }),
    Column::new("Age", "string", 0, age),
    Column::new("VolumeMode", "string", 1, |o| {
        json!(s(o, "/spec/volumeMode"))
    }),
];

impl Strategy for PersistentVolumeClaims {
    fn validate(&self, o: &Value, errs: &mut Vec<FieldError>) {
        claim_spec(o, "spec", errs);
    }

    /// Only the storage request may grow and an unbound claim may be bound; the rest of
    /// a claim's spec is fixed once made.
    fn validate_update(&self, old: &Value, new: &Value, errs: &mut Vec<FieldError>) {
        let fixed = |o: &Value| {
            let mut spec = o.get("spec").cloned().unwrap_or(json!({}));
            if let Some(m) = spec.as_object_mut() {
                m.remove("resources");
                if s(old, "/spec/volumeName").is_empty() {
                    m.remove("volumeName");
                }
                if s(old, "/spec/storageClassName").is_empty() {
                    m.remove("storageClassName");
                }
            }
            spec
        };
        if fixed(old) != fixed(new) {
            errs.push(FieldError {
                field: "spec".into(),
                reason: "FieldValueForbidden",
                message: "Forbidden: spec is immutable after creation except resources.requests and volumeAttributesClassName for bound claims".into(),
            });
        }
    }

    /// Defaults, and the protection finalizer kube-apiserver's
    /// StorageObjectInUseProtection adds: the claim outlives the pods that use it (the
    /// volume controller lifts it once none does).
    fn prepare_create(&self, o: &mut Value) {
        default_claim(o);
        let meta = obj_mut(o, "metadata");
        let finalizers = meta.entry("finalizers").or_insert(json!([]));
        if let Some(f) = finalizers.as_array_mut() {
            if !f.iter().any(|x| x == CLAIM_PROTECTION) {
                f.push(json!(CLAIM_PROTECTION));
            }
        }
        o["status"] = json!({"phase": "Pending"});
    }

    fn columns(&self) -> &[Column] {
        PVC_COLUMNS
    }
}
