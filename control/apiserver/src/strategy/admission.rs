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

/// MutatingWebhookConfigurations and ValidatingWebhookConfigurations: stored and checked
/// here; [`crate::webhook`] calls them.
#[derive(Debug)]
pub struct WebhookConfigurations;

static WEBHOOK_COLUMNS: &[Column] = &[
    Column::new("Name", "string", 0, name),
    Column::new("Webhooks", "integer", 0, |o| {
        json!(o
            .get("webhooks")
            .and_then(Value::as_array)
            .map_or(0, Vec::len))
    }),
    Column::new("Age", "string", 0, age),
];

fn one_of(at: &str, field: &str, value: &str, allowed: &[&str], errs: &mut Vec<FieldError>) {
    if !allowed.contains(&value) {
        let quoted: Vec<String> = allowed.iter().map(|a| format!("{a:?}")).collect();
        errs.push(FieldError {
            field: format!("{at}.{field}"),
            reason: "FieldValueNotSupported",
            message: format!(
                "Unsupported value: {value:?}: supported values: {}",
                quoted.join(", ")
            ),
        });
    }
}

impl Strategy for WebhookConfigurations {
    fn validate(&self, obj: &Value, errs: &mut Vec<FieldError>) {
        let mut names = std::collections::BTreeSet::new();
        let hooks = obj.get("webhooks").and_then(Value::as_array);
        for (i, w) in hooks.into_iter().flatten().enumerate() {
            let at = format!("webhooks[{i}]");
            let name = s(w, "/name");
            if name.is_empty() {
                errs.push(FieldError::required(format!("{at}.name")));
            } else if name.split('.').count() < 3 {
                errs.push(FieldError::invalid(
                    format!("{at}.name"),
                    name,
                    "should be a domain with at least three segments separated by dots",
                ));
            } else if !names.insert(name) {
                errs.push(FieldError {
                    field: format!("{at}.name"),
                    reason: "FieldValueDuplicate",
                    message: format!("Duplicate value: {name:?}"),
                });
            }
            match (
                w.pointer("/clientConfig/url").and_then(Value::as_str),
                w.pointer("/clientConfig/service"),
            ) {
                (Some(_), Some(_)) | (None, None) => errs.push(FieldError::required(format!(
                    "{at}.clientConfig: exactly one of url or service is required"
                ))),
                (Some(url), None) if !url.starts_with("https://") => {
                    errs.push(FieldError::invalid(
                        format!("{at}.clientConfig.url"),
                        url,
                        "'https' is the only allowed URL scheme",
                    ))
                }
                (None, Some(svc))
                    if s(svc, "/name").is_empty() || s(svc, "/namespace").is_empty() =>
                {
                    errs.push(FieldError::required(format!(
                        "{at}.clientConfig.service.name and namespace"
                    )))
                }
                _ => {}
            }
            let versions = crate::table::strings(w.get("admissionReviewVersions"));
            if !versions.iter().any(|v| v == "v1") {
                errs.push(FieldError::invalid(
                    format!("{at}.admissionReviewVersions"),
                    &versions.join(","),
                    "must include at least one of v1",
                ));
            }
            one_of(
                &at,
                "sideEffects",
                s(w, "/sideEffects"),
                &["None", "NoneOnDryRun"],
                errs,
            );
            if let Some(p) = w.get("failurePolicy").and_then(Value::as_str) {
                one_of(&at, "failurePolicy", p, &["Fail", "Ignore"], errs);
            }
            if let Some(t) = w.get("timeoutSeconds").and_then(Value::as_i64) {
                if !(1..=30).contains(&t) {
                    errs.push(FieldError::invalid(
                        format!("{at}.timeoutSeconds"),
                        &t.to_string(),
                        "the timeout value must be between 1 and 30 seconds",
                    ));
                }
            }
            for (j, c) in w
                .get("matchConditions")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .enumerate()
            {
                let src = s(c, "/expression");
                if let Err(e) =
                    crate::crd::cel::Expression::compile(src, &["object", "oldObject", "request"])
                {
                    errs.push(FieldError::invalid(
                        format!("{at}.matchConditions[{j}].expression"),
                        src,
                        e,
                    ));
                }
            }
        }
    }

    fn columns(&self) -> &[Column] {
        WEBHOOK_COLUMNS
    }
}

/// MutatingAdmissionPolicies (v1alpha1) and their bindings: stored and checked here;
/// [`crate::mutating_policy`] runs them.
#[derive(Debug)]
pub struct MutatingAdmissionPolicies;
#[derive(Debug)]
pub struct MutatingAdmissionPolicyBindings;

static MUTATING_COLUMNS: &[Column] = &[
    Column::new("Name", "string", 0, name),
    Column::new("Mutations", "integer", 0, |o| {
        json!(o
            .pointer("/spec/mutations")
            .and_then(Value::as_array)
            .map_or(0, Vec::len))
    }),
    Column::new("Age", "string", 0, age),
];

impl Strategy for MutatingAdmissionPolicies {
    fn validate(&self, obj: &Value, errs: &mut Vec<FieldError>) {
        errs.extend(crate::mutating_policy::policy_errors(obj));
    }

    fn columns(&self) -> &[Column] {
        MUTATING_COLUMNS
    }
}

impl Strategy for MutatingAdmissionPolicyBindings {
    fn validate(&self, obj: &Value, errs: &mut Vec<FieldError>) {
        if s(obj, "/spec/policyName").is_empty() {
            errs.push(FieldError::required("spec.policyName"));
        }
    }

    fn columns(&self) -> &[Column] {
        BINDING_COLUMNS
    }
}
