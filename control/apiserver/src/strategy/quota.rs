//! ResourceQuotas and LimitRanges: their rules and columns. What they enforce on other
//! objects is admission ([`crate::admission`]).

use serde_json::{json, Value};

use super::{age, name, Column, Strategy};
use crate::error::FieldError;

#[derive(Debug)]
pub struct ResourceQuotas;
#[derive(Debug)]
pub struct LimitRanges;

fn quantities(o: &Value, ptr: &str, field: &str, errs: &mut Vec<FieldError>) {
    for (k, q) in o
        .pointer(ptr)
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
    {
        let ok = match q {
            Value::String(s) => baton_kube::quantity::nanos(s).is_ok(),
            Value::Number(n) => n.as_f64().is_some_and(|n| n >= 0.0),
            _ => false,
        };
        if !ok {
            errs.push(FieldError::invalid(
                format!("{field}[{k}]"),
                &q.to_string(),
                "must be a non-negative quantity",
            ));
        }
    }
}

/// `used/hard` per resource, sorted, as kubectl prints a quota's requests or limits.
fn usage(o: &Value, limits: bool) -> Value {
    let hard = o.pointer("/status/hard").and_then(Value::as_object);
    let used = o.pointer("/status/used").and_then(Value::as_object);
    let mut parts = Vec::new();
    for (k, h) in hard.into_iter().flatten() {
        if k.starts_with("limits.") != limits {
            continue;
        }
        let u = used
            .and_then(|u| u.get(k))
            .map(|u| u.as_str().map_or_else(|| u.to_string(), str::to_string))
            .unwrap_or_else(|| "0".into());
        let h = h.as_str().map_or_else(|| h.to_string(), str::to_string);
        parts.push(format!("{k}: {u}/{h}"));
    }
    json!(parts.join(", "))
}

static QUOTA_COLUMNS: &[Column] = &[
    Column::new("Name", "string", 0, name),
    Column::new("Age", "string", 0, age),
    Column::new("Request", "string", 0, |o| usage(o, false)),
    Column::new("Limit", "string", 0, |o| usage(o, true)),
];

impl Strategy for ResourceQuotas {
    fn validate(&self, o: &Value, errs: &mut Vec<FieldError>) {
        quantities(o, "/spec/hard", "spec.hard", errs);
    }

    fn prepare_create(&self, o: &mut Value) {
        o["status"] = json!({});
    }

    fn columns(&self) -> &[Column] {
        QUOTA_COLUMNS
    }
}

impl Strategy for LimitRanges {
    fn validate(&self, o: &Value, errs: &mut Vec<FieldError>) {
        for (n, l) in o
            .pointer("/spec/limits")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            let p = format!("spec.limits[{n}]");
            let t = l.get("type").and_then(Value::as_str).unwrap_or("");
            if !matches!(t, "Container" | "Pod" | "PersistentVolumeClaim") {
                errs.push(FieldError {
                    field: format!("{p}.type"),
                    reason: "FieldValueNotSupported",
                    message: format!("Unsupported value: {t:?}: supported values: \"Container\", \"Pod\", \"PersistentVolumeClaim\""),
                });
            }
            for key in [
                "min",
                "max",
                "default",
                "defaultRequest",
                "maxLimitRequestRatio",
            ] {
                quantities(l, &format!("/{key}"), &format!("{p}.{key}"), errs);
            }
            // min <= defaultRequest <= default <= max, per resource.
            let q = |key: &str, r: &str| {
                l.get(key)
                    .and_then(|m| m.get(r))
                    .and_then(Value::as_str)
                    .and_then(|s| baton_kube::quantity::nanos(s).ok())
            };
            let resources: Vec<String> = ["min", "max", "default", "defaultRequest"]
                .iter()
                .filter_map(|k| l.get(*k).and_then(Value::as_object))
                .flat_map(|m| m.keys().cloned())
                .collect();
            for r in resources {
                let order = [
                    ("min", q("min", &r)),
                    ("defaultRequest", q("defaultRequest", &r)),
                    ("default", q("default", &r)),
                    ("max", q("max", &r)),
                ];
                let set: Vec<(&str, u128)> = order
                    .iter()
                    .filter_map(|(k, v)| v.map(|v| (*k, v)))
                    .collect();
                for w in set.windows(2) {
                    if w[0].1 > w[1].1 {
                        errs.push(FieldError::invalid(
                            format!("{p}.{}[{r}]", w[1].0),
                            "",
                            format!(
                                "{} value must be greater than or equal to {} value",
                                w[1].0, w[0].0
                            ),
                        ));
                    }
                }
            }
        }
    }

    fn columns(&self) -> &[Column] {
        super::NAME_AGE
    }
}
