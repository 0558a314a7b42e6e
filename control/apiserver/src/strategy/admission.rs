//! admissionregistration.k8s.io/v1: ValidatingAdmissionPolicies and their bindings.
//! Stored and validated here (a policy's expressions must compile, as kube checks them
//! when the policy is written); enforcing them is [`crate::policy`]'s job.

use serde_json::{json, Value};

use super::{age, name, Column, Strategy};
use crate::error::FieldError;
use crate::table::s;

#[derive(Debug)]
pub struct ValidatingAdmissionPolicies;
#[derive(Debug)]
pub struct ValidatingAdmissionPolicyBindings;

static POLICY_COLUMNS: &[Column] = &[
    Column::new("Name", "string", 0, name),
    Column::new("Validations", "integer", 0, |o| {
        json!(o
            .pointer("/spec/validations")
            .and_then(Value::as_array)
            .map_or(0, Vec::len))
    }),
    Column::new("ParamKind", "string", 0, |o| {
        let k = o.pointer("/spec/paramKind");
        json!(k.map_or("<unset>".to_string(), |k| format!(
            "{}/{}",
            s(k, "/apiVersion"),
            s(k, "/kind")
        )))
    }),
    Column::new("Age", "string", 0, age),
];

static BINDING_COLUMNS: &[Column] = &[
    Column::new("Name", "string", 0, name),
    Column::new("PolicyName", "string", 0, |o| {
        json!(s(o, "/spec/policyName"))
    }),
    Column::new("ParamRef", "string", 0, |o| {
        json!(o
            .pointer("/spec/paramRef/name")
            .and_then(Value::as_str)
            .unwrap_or("<unset>"))
    }),
    Column::new("Age", "string", 0, age),
];

const ACTIONS: [&str; 3] = ["Deny", "Warn", "Audit"];

impl Strategy for ValidatingAdmissionPolicies {
    fn validate(&self, obj: &Value, errs: &mut Vec<FieldError>) {
        if obj
            .pointer("/spec/validations")
            .and_then(Value::as_array)
            .is_none_or(Vec::is_empty)
            && obj.pointer("/spec/auditAnnotations").is_none()
        {
            errs.push(FieldError::required("spec.validations"));
        }
        errs.extend(crate::policy::compile_errors(obj));
    }

    fn columns(&self) -> &[Column] {
        POLICY_COLUMNS
    }
}

impl Strategy for ValidatingAdmissionPolicyBindings {
    fn validate(&self, obj: &Value, errs: &mut Vec<FieldError>) {
        if s(obj, "/spec/policyName").is_empty() {
            errs.push(FieldError::required("spec.policyName"));
        }
        let actions: Vec<&str> = obj
            .pointer("/spec/validationActions")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        if actions.is_empty() {
            errs.push(FieldError::required("spec.validationActions"));
        }
        for (i, a) in actions.iter().enumerate() {
            if !ACTIONS.contains(a) {
                errs.push(FieldError {
                    field: format!("spec.validationActions[{i}]"),
                    reason: "FieldValueNotSupported",
                    message: format!(
                        "Unsupported value: {a:?}: supported values: \"Audit\", \"Deny\", \"Warn\""
                    ),
                });
            }
        }
        if actions.contains(&"Deny") && actions.contains(&"Warn") {
            errs.push(FieldError::invalid(
                "spec.validationActions",
                &actions.join(","),
                "must not contain both Deny and Warn (repeating the same validation failure information in the API response and headers serves no purpose)",
            ));
        }
    }

    fn columns(&self) -> &[Column] {
        BINDING_COLUMNS
    }
}
