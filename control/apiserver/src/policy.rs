//! ValidatingAdmissionPolicy: admission rules written in CEL, bound to resources by
//! ValidatingAdmissionPolicyBindings, as kube-apiserver's admission plugin runs them.
//!
//! A policy says what it matches (`matchConstraints`: resource rules with operations,
//! namespace and object selectors), optional `matchConditions` that must all hold,
//! `variables`, and `validations`; a binding selects the policy, may narrow what it
//! matches (`matchResources`), names its parameters (`paramRef`, of the policy's
//! `paramKind`) and says what a failed validation does (`validationActions`: Deny, Warn,
//! Audit). Expressions see `object`, `oldObject`, `request`, `params`,
//! `namespaceObject` and `variables`; `failurePolicy` says whether an expression that
//! fails to compile or run refuses the request (Fail, the default) or is skipped (Ignore).
//!
//! Policies and bindings are compiled once, when they change, into an index every API
//! server keeps from the store ([`crate::cache`]). A write that no binding concerns costs
//! one read of that index.
//!
//! Warn results go back to the client as `Warning` headers, as kube-apiserver sends them.
//! Not yet: the `authorizer` variable; DELETE and CONNECT operations are not evaluated.

use std::collections::BTreeMap;
use std::sync::Arc;

use baton_auth::UserInfo;
use serde_json::{json, Value};

use crate::cache::Index;
use crate::crd::cel::Expression;
use crate::error::{ApiError, ApiResult, FieldError};
use crate::objects::{Objects, ReadAt};
use crate::resources::{self, Resource};
use crate::table::{s, strings};

/// Store prefix of the admissionregistration.k8s.io kinds.
pub const PREFIX: &str = "/registry/admissionregistration.k8s.io/";

/// The names an admission expression may use.
pub const VARIABLES: &[&str] = &[
    "object",
    "oldObject",
    "request",
    "params",
    "namespaceObject",
    "variables",
];

pub(crate) type Compiled = Result<Expression, String>;

#[derive(Debug)]
struct Validation {
    source: String,
    expr: Compiled,
    message: Option<String>,
    message_expr: Option<Compiled>,
    reason: String,
}

/// One policy, compiled.
#[derive(Debug)]
pub struct Policy {
    name: String,
    spec: Value,
    fail: bool,
    conditions: Vec<(String, Compiled)>,
    variables: Vec<(String, Compiled)>,
    validations: Vec<Validation>,
}

fn compile(src: &str) -> Compiled {
    Expression::compile(src, VARIABLES)
}

/// The `(name, expression)` lists of a policy spec (`matchConditions`, `variables`),
/// compiled with `compile`.
pub(crate) fn named_expressions(
    spec: &Value,
    field: &str,
    compile: fn(&str) -> Compiled,
) -> Vec<(String, Compiled)> {
    spec.get(field)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|c| (s(c, "/name").to_string(), compile(s(c, "/expression"))))
        .collect()
}

/// The identity fields an admission mutation may not change.
const IDENTITY: [&str; 5] = [
    "/metadata/name",
    "/metadata/namespace",
    "/metadata/uid",
    "/kind",
    "/apiVersion",
];

/// The first identity field (name, namespace, uid, kind, apiVersion) a mutation changed
/// from `before` to `after`, if any.
pub(crate) fn identity_changed(before: &Value, after: &Value) -> Option<&'static str> {
    IDENTITY
        .into_iter()
        .find(|f| before.pointer(f) != after.pointer(f))
}

impl Policy {
    fn new(obj: &Value) -> Self {
        let spec = obj.get("spec").cloned().unwrap_or(json!({}));
        let validations = spec
            .get("validations")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(|v| Validation {
                source: s(v, "/expression").to_string(),
                expr: compile(s(v, "/expression")),
                message: v.get("message").and_then(Value::as_str).map(String::from),
                message_expr: v
                    .get("messageExpression")
                    .and_then(Value::as_str)
                    .map(compile),
                reason: v
                    .get("reason")
                    .and_then(Value::as_str)
                    .unwrap_or("Invalid")
                    .to_string(),
            })
            .collect();
        Self {
            name: s(obj, "/metadata/name").to_string(),
            fail: s(&spec, "/failurePolicy") != "Ignore",
            conditions: named_expressions(&spec, "matchConditions", compile),
            variables: named_expressions(&spec, "variables", compile),
            validations,
            spec,
        }
    }
}

/// Every policy and binding, as last seen in the store.
///
/// The webhook configurations live under the same store prefix and are kept here too,
/// for [`crate::webhook`].
#[derive(Debug, Default)]
pub struct Policies {
    policies: BTreeMap<String, Arc<Policy>>,
    bindings: BTreeMap<String, Arc<Value>>,
    mutating_webhooks: BTreeMap<String, Arc<Value>>,
    validating_webhooks: BTreeMap<String, Arc<Value>>,
    mutating: BTreeMap<String, Arc<crate::mutating_policy::MutatingPolicy>>,
    mutating_bindings: BTreeMap<String, Arc<Value>>,
}

impl Index for Policies {
    fn apply(&mut self, key: &str, obj: Option<Value>) {
        let Some(rest) = key.strip_prefix(PREFIX) else {
            return;
        };
        let Some((plural, name)) = rest.split_once('/') else {
            return;
        };
        match (plural, obj) {
            ("validatingadmissionpolicies", Some(o)) => {
                self.policies.insert(name.into(), Arc::new(Policy::new(&o)));
            }
            ("validatingadmissionpolicies", None) => {
                self.policies.remove(name);
            }
            ("validatingadmissionpolicybindings", Some(o)) => {
                self.bindings.insert(name.into(), Arc::new(o));
            }
            ("validatingadmissionpolicybindings", None) => {
                self.bindings.remove(name);
            }
            ("mutatingadmissionpolicies", Some(o)) => {
                let p = crate::mutating_policy::MutatingPolicy::new(&o);
                self.mutating.insert(name.into(), Arc::new(p));
            }
            ("mutatingadmissionpolicies", None) => {
                self.mutating.remove(name);
            }
            ("mutatingadmissionpolicybindings", o) => {
                set(&mut self.mutating_bindings, name, o);
            }
            ("mutatingwebhookconfigurations", o) => {
                set(&mut self.mutating_webhooks, name, o);
            }
            ("validatingwebhookconfigurations", o) => {
                set(&mut self.validating_webhooks, name, o);
            }
            _ => {}
        }
    }
}

fn set(map: &mut BTreeMap<String, Arc<Value>>, name: &str, obj: Option<Value>) {
    match obj {
        Some(o) => map.insert(name.into(), Arc::new(o)),
        None => map.remove(name),
    };
}

impl Policies {
    /// The webhook configurations of `phase`, in the order of their names.
    pub fn webhooks(&self, phase: crate::webhook::Phase) -> Vec<Arc<Value>> {
        let map = match phase {
            crate::webhook::Phase::Mutating => &self.mutating_webhooks,
            crate::webhook::Phase::Validating => &self.validating_webhooks,
        };
        map.values().cloned().collect()
    }

    /// Each MutatingAdmissionPolicyBinding with the policy it names, in the bindings'
    /// order.
    pub fn mutating_bound(&self) -> Vec<(Arc<crate::mutating_policy::MutatingPolicy>, Arc<Value>)> {
        self.mutating_bindings
            .values()
            .filter_map(|b| {
                let p = self.mutating.get(s(b, "/spec/policyName"))?;
                Some((p.clone(), b.clone()))
            })
            .collect()
    }

    /// Each binding with the policy it names.
    fn bound(&self) -> Vec<(Arc<Policy>, Arc<Value>)> {
        self.bindings
            .values()
            .filter_map(|b| {
                let p = self.policies.get(s(b, "/spec/policyName"))?;
                Some((p.clone(), b.clone()))
            })
            .collect()
    }
}

/// The expressions of a policy, compiled, as errors kube words them (for the policy's
/// own validation when it is written).
pub fn compile_errors(obj: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let spec = obj.get("spec").cloned().unwrap_or(json!({}));
    for (field, key) in [
        ("validations", "expression"),
        ("validations", "messageExpression"),
        ("matchConditions", "expression"),
        ("variables", "expression"),
    ] {
        for (i, item) in spec
            .get(field)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            let Some(src) = item.get(key).and_then(Value::as_str) else {
                continue;
            };
            if let Err(e) = compile(src) {
                errs.push(FieldError::invalid(
                    format!("spec.{field}[{i}].{key}"),
                    src,
                    e,
                ));
            }
        }
    }
    errs
}

/// One write, as admission sees it.
#[derive(Debug, Clone, Copy)]
pub struct Attempt<'a> {
    pub res: &'a Resource,
    /// `CREATE` or `UPDATE`.
    pub operation: &'static str,
    pub namespace: Option<&'a str>,
    pub name: &'a str,
    /// The subresource written (`status`, `scale`), if any.
    pub subresource: Option<&'a str>,
    pub object: &'a Value,
    pub old: Option<&'a Value>,
    pub user: &'a UserInfo,
    pub dry_run: bool,
    /// Where admission's warnings for the client go (`Warning` headers).
    pub warnings: &'a crate::rest::Warnings,
}

impl Attempt<'_> {
    /// Adds a warning for the client.
    pub fn warn(&self, message: String) {
        self.warnings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(message);
    }
}

/// Whether a rule's `resources` name the attempt's resource and subresource, in kube's
/// forms: `pods`, `pods/status`, `pods/*` (pods and every subresource of them),
/// `*/status`, `*` (every resource, no subresource) and `*/*` (everything).
fn resources_match(listed: &[String], plural: &str, sub: Option<&str>) -> bool {
    let sub = sub.unwrap_or("");
    listed.iter().any(|r| {
        let (res, rsub) = r.split_once('/').unwrap_or((r, ""));
        (res == "*" || res == plural) && (rsub == "*" || rsub == sub)
    })
}

/// Whether a rule list (`resourceRules`, a webhook's `rules`) names the attempt.
pub(crate) fn rules_match(rules: Option<&Value>, a: &Attempt<'_>) -> bool {
    rules
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .any(|r| {
            let has = |field: &str, want: &str| {
                strings(r.get(field)).iter().any(|x| x == "*" || x == want)
            };
            let scope = s(r, "/scope");
            let scope_ok = match scope {
                "Namespaced" => a.res.namespaced,
                "Cluster" => !a.res.namespaced,
                _ => true,
            };
            let names = strings(r.get("resourceNames"));
            has("apiGroups", &a.res.group)
                && has("apiVersions", &a.res.version)
                && resources_match(&strings(r.get("resources")), &a.res.plural, a.subresource)
                && has("operations", a.operation)
                && scope_ok
                && (names.is_empty() || names.iter().any(|n| n == a.name))
        })
}

pub(crate) fn selector_matches(sel: Option<&Value>, labels: Option<&Value>) -> bool {
    let Some(sel) = sel.filter(|s| !s.is_null()) else {
        return true;
    };
    let Ok(sel) = serde_json::from_value::<
        k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
    >(sel.clone()) else {
        return false;
    };
    let Ok(sel) = kube_core::Selector::try_from(sel) else {
        return false;
    };
    let labels: BTreeMap<String, String> = labels
        .and_then(|l| serde_json::from_value(l.clone()).ok())
        .unwrap_or_default();
    use kube_core::SelectorExt;
    sel.matches(&labels)
}

/// Whether `constraints` (a policy's `matchConstraints` or a binding's `matchResources`)
/// take the attempt, given its namespace object.
pub(crate) fn constraints_match(
    c: Option<&Value>,
    a: &Attempt<'_>,
    ns_obj: Option<&Value>,
) -> bool {
    let Some(c) = c.filter(|c| !c.is_null()) else {
        return true;
    };
    if c.get("resourceRules").is_some() && !rules_match(c.get("resourceRules"), a) {
        return false;
    }
    if rules_match(c.get("excludeResourceRules"), a) {
        return false;
    }
    let labels = |o: &Value| o.pointer("/metadata/labels").cloned();
    if a.res.namespaced {
        let ns_labels = ns_obj.and_then(labels);
        if !selector_matches(c.get("namespaceSelector"), ns_labels.as_ref()) {
            return false;
        }
    }
    let sel = c.get("objectSelector");
    selector_matches(sel, labels(a.object).as_ref())
        || a.old
            .is_some_and(|o| selector_matches(sel, labels(o).as_ref()))
}

/// The `request` variable.
pub(crate) fn request(a: &Attempt<'_>) -> Value {
    json!({
        "kind": {"group": a.res.group, "version": a.res.version, "kind": a.res.kind},
        "resource": {"group": a.res.group, "version": a.res.version, "resource": a.res.plural},
        "name": a.name, "namespace": a.namespace.unwrap_or(""), "operation": a.operation,
        "userInfo": {"username": a.user.name, "uid": a.user.uid, "groups": a.user.groups},
        "dryRun": a.dry_run,
    })
}

/// The parameter objects of a binding: None if the policy takes none.
pub(crate) async fn params(
    objects: &Objects,
    spec: &Value,
    who: &str,
    binding: &Value,
    a: &Attempt<'_>,
) -> ApiResult<Option<Vec<Value>>> {
    let Some(kind) = spec.get("paramKind").filter(|k| !k.is_null()) else {
        return Ok(None);
    };
    let served = objects.registry.snapshot();
    let (api_version, kind) = (s(kind, "/apiVersion"), s(kind, "/kind"));
    let found = served
        .all()
        .find(|r| r.api_version() == api_version && r.kind == kind)
        .cloned();
    let Some(res) = found else {
        return Err(ApiError::Forbidden {
            message: format!("{who}: paramKind {api_version}/{kind} is not served"),
        });
    };
    let r = binding
        .pointer("/spec/paramRef")
        .cloned()
        .unwrap_or(json!({}));
    let ns = if res.namespaced {
        let n = s(&r, "/namespace");
        Some(if n.is_empty() {
            a.namespace.unwrap_or("default")
        } else {
            n
        })
    } else {
        None
    };
    let name = s(&r, "/name");
    let found: Vec<Value> = if !name.is_empty() {
        objects
            .get(&res, ns, name, ReadAt::Latest)
            .await?
            .map(|(v, _)| vec![v])
            .unwrap_or_default()
    } else {
        let sel = r.get("selector").cloned();
        objects
            .list(&res, ns, ReadAt::Latest, 0, None, |o| {
                selector_matches(sel.as_ref(), o.pointer("/metadata/labels"))
            })
            .await?
            .items
    };
    Ok(Some(found))
}

/// What one expression gave.
pub(crate) fn eval(expr: &Compiled, vars: &[(&str, &Value)]) -> Result<Value, String> {
    match expr {
        Ok(e) => e.eval(vars),
        Err(e) => Err(e.clone()),
    }
}

fn denial(reason: &str, res: &Resource, name: &str, message: String) -> ApiError {
    match reason {
        "Forbidden" => ApiError::Forbidden {
            message: format!("{} {name:?} is forbidden: {message}", res.qualified()),
        },
        "Unauthorized" => ApiError::Unauthorized,
        _ => ApiError::Invalid {
            group: res.group.clone(),
            kind: res.kind.clone(),
            name: name.to_string(),
            causes: vec![FieldError {
                field: String::new(),
                reason: "FieldValueInvalid",
                message,
            }],
        },
    }
}

/// Runs every bound policy that matches the attempt; the first Deny refuses it.
pub async fn validate(objects: &Objects, a: &Attempt<'_>) -> ApiResult<()> {
    let bound = objects.policies.read(Policies::bound);
    if bound.is_empty() {
        return Ok(());
    }
    let ns_obj = match a.namespace {
        Some(ns) if a.res.namespaced => objects
            .get(resources::builtin("Namespace"), None, ns, ReadAt::Latest)
            .await?
            .map(|(v, _)| v),
        _ => None,
    };
    for (policy, binding) in bound {
        if !constraints_match(policy.spec.get("matchConstraints"), a, ns_obj.as_ref())
            || !constraints_match(binding.pointer("/spec/matchResources"), a, ns_obj.as_ref())
        {
            continue;
        }
        check(objects, &policy, &binding, a, ns_obj.as_ref()).await?;
    }
    Ok(())
}

async fn check(
    objects: &Objects,
    policy: &Policy,
    binding: &Value,
    a: &Attempt<'_>,
    ns_obj: Option<&Value>,
) -> ApiResult<()> {
    let bname = s(binding, "/metadata/name");
    let prefix = format!(
        "ValidatingAdmissionPolicy '{}' with binding '{bname}' denied request",
        policy.name
    );
    let actions = strings(binding.pointer("/spec/validationActions"));
    let deny = actions.iter().any(|x| x == "Deny");
    let warn = actions.iter().any(|x| x == "Warn");
    let failed = |why: String| -> ApiResult<()> {
        if policy.fail && deny {
            Err(denial("Invalid", a.res, a.name, format!("{prefix}: {why}")))
        } else {
            tracing::warn!(policy = %policy.name, binding = bname, %why, "admission policy ignored an error");
            Ok(())
        }
    };
    let who = format!("ValidatingAdmissionPolicy '{}'", policy.name);
    let params = match params(objects, &policy.spec, &who, binding, a).await? {
        None => vec![Value::Null],
        Some(p) if !p.is_empty() => p,
        Some(_) => {
            let action = s(binding, "/spec/paramRef/parameterNotFoundAction");
            if action == "Allow" {
                return Ok(());
            }
            return failed("failed to configure binding: no params found for policy binding with `Deny` parameterNotFoundAction".into());
        }
    };
    let request = request(a);
    let null = Value::Null;
    for param in &params {
        let mut variables = serde_json::Map::new();
        let base: Vec<(&str, &Value)> = vec![
            ("object", a.object),
            ("oldObject", a.old.unwrap_or(&null)),
            ("request", &request),
            ("params", param),
            ("namespaceObject", ns_obj.unwrap_or(&null)),
        ];
        let run = |expr: &Compiled, variables: &serde_json::Map<String, Value>| {
            let v = Value::Object(variables.clone());
            let mut all = base.clone();
            all.push(("variables", &v));
            eval(expr, &all)
        };
        let mut skip = false;
        for (name, cond) in &policy.conditions {
            match run(cond, &variables) {
                Ok(Value::Bool(true)) => {}
                Ok(Value::Bool(false)) => {
                    skip = true;
                    break;
                }
                Ok(_) => {
                    return failed(format!(
                        "matchCondition {name:?} did not evaluate to a bool"
                    ))
                }
                Err(e) => return failed(format!("matchCondition {name:?}: {e}")),
            }
        }
        if skip {
            continue;
        }
        for (name, expr) in &policy.variables {
            match run(expr, &variables) {
                Ok(v) => {
                    variables.insert(name.clone(), v);
                }
                Err(e) => return failed(format!("variable {name:?}: {e}")),
            }
        }
        for v in &policy.validations {
            let message = match run(&v.expr, &variables) {
                Ok(Value::Bool(true)) => continue,
                Ok(Value::Bool(false)) => {
                    let from_expr = v
                        .message_expr
                        .as_ref()
                        .and_then(|m| run(m, &variables).ok())
                        .and_then(|m| m.as_str().map(str::trim).map(String::from))
                        .filter(|m| !m.is_empty() && !m.contains('\n'));
                    from_expr
                        .or_else(|| v.message.clone())
                        .unwrap_or_else(|| format!("failed expression: {}", v.source))
                }
                Ok(_) => {
                    failed(format!(
                        "expression '{}' did not evaluate to a bool",
                        v.source
                    ))?;
                    continue;
                }
                Err(e) => {
                    failed(format!("expression '{}' resulted in error: {e}", v.source))?;
                    continue;
                }
            };
            if warn {
                a.warn(format!(
                    "Validation failed for ValidatingAdmissionPolicy '{}' with binding '{bname}': {message}",
                    policy.name
                ));
            }
            if deny {
                return Err(denial(
                    &v.reason,
                    a.res,
                    a.name,
                    format!("{prefix}: {message}"),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::resources_match;

    #[test]
    fn resource_rules_read_subresources_as_kube_does() {
        let m = |listed: &[&str], plural: &str, sub: Option<&str>| {
            let listed: Vec<String> = listed.iter().map(|s| s.to_string()).collect();
            resources_match(&listed, plural, sub)
        };
        assert!(m(&["pods"], "pods", None));
        assert!(
            !m(&["pods"], "pods", Some("status")),
            "a status write is not a pod write"
        );
        assert!(m(&["pods/status"], "pods", Some("status")));
        assert!(m(&["pods/*"], "pods", Some("status")));
        assert!(m(&["pods/*"], "pods", None));
        assert!(m(&["*/status"], "deployments", Some("status")));
        assert!(!m(&["*/status"], "deployments", None));
        assert!(m(&["*"], "configmaps", None));
        assert!(!m(&["*"], "pods", Some("status")));
        assert!(m(&["*/*"], "pods", Some("eviction")));
        assert!(!m(&["services"], "pods", None));
    }
}
