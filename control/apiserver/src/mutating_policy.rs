//! MutatingAdmissionPolicy (admissionregistration.k8s.io/v1alpha1): mutations written in
//! CEL, bound by MutatingAdmissionPolicyBindings, run before the mutating webhooks as
//! kube-apiserver runs them.
//!
//! A policy matches as a ValidatingAdmissionPolicy does (`matchConstraints`, the
//! binding's `matchResources`, `matchConditions`, `paramKind` with the binding's
//! `paramRef`), computes its `variables`, then applies its `mutations` in order, each
//! seeing the object as the ones before it left it:
//! - `JSONPatch`: the expression gives a list of `JSONPatch{op: ..., path: ..., value:
//!   ...}`, applied as an RFC 6902 patch;
//! - `ApplyConfiguration`: the expression gives an `Object{...}` (with nested
//!   `Object.spec{...}` and the like), merged into the object as a strategic merge patch
//!   merges it: maps field by field, lists of containers and the like by name.
//!
//! The `cel` crate has no message types for `Object` and `JSONPatch`, so
//! [`struct_literals_as_maps`] rewrites those literals into CEL maps before the
//! expression is compiled; what they build is the same JSON. An expression that fails,
//! or a patch that does not apply, refuses the write under `failurePolicy: Fail` (the
//! default) and is skipped under `Ignore`.
//!
//! Not yet: `reinvocationPolicy: IfNeeded`, the `jsonpatch.escapeKey` function, and
//! server-side apply's list-type semantics for custom resources (their lists are
//! replaced whole).

use serde_json::{json, Value};

use crate::crd::cel::Expression;
use crate::error::{ApiError, ApiResult, FieldError};
use crate::objects::{Objects, ReadAt};
use crate::policy::{self, eval, Attempt, Compiled, VARIABLES};
use crate::resources;
use crate::table::s;

/// The names whose struct literals become maps: kube's two mutation types.
const LITERAL_TYPES: [&str; 2] = ["Object", "JSONPatch"];

/// Rewrites `Object{a: 1}`, `Object.spec{b: x}` and `JSONPatch{op: "add", ...}` into
/// the CEL maps `{"a": 1}`, `{"b": x}`, `{"op": "add", ...}`. String literals are left
/// alone, and so is everything else.
pub fn struct_literals_as_maps(src: &str) -> String {
    let chars: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(src.len());
    // One entry per open bracket: whether it opened a struct literal.
    let mut stack: Vec<(char, bool)> = Vec::new();
    let mut expect_field = false;
    let mut i = 0;
    let next_non_space = |from: usize| {
        let mut j = from;
        while j < chars.len() && chars[j].is_whitespace() {
            j += 1;
        }
        j
    };
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' {
            let raw = i > 0 && matches!(chars[i - 1], 'r' | 'R');
            let triple = i + 2 < chars.len() && chars[i + 1] == c && chars[i + 2] == c;
            let end = if triple {
                let mut j = i + 3;
                while j + 2 < chars.len()
                    && !(chars[j] == c && chars[j + 1] == c && chars[j + 2] == c)
                {
                    j += if !raw && chars[j] == '\\' { 2 } else { 1 };
                }
                (j + 3).min(chars.len())
            } else {
                let mut j = i + 1;
                while j < chars.len() && chars[j] != c {
                    j += if !raw && chars[j] == '\\' { 2 } else { 1 };
                }
                (j + 1).min(chars.len())
            };
            out.extend(&chars[i..end]);
            i = end;
            expect_field = false;
            continue;
        }
        if c.is_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_alphanumeric() || chars[i] == '_' || chars[i] == '.')
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let j = next_non_space(i);
            let first = word.split('.').next().unwrap_or_default();
            if expect_field && !word.contains('.') && chars.get(j) == Some(&':') {
                out.push('"');
                out.push_str(&word);
                out.push('"');
            } else if LITERAL_TYPES.contains(&first) && chars.get(j) == Some(&'{') {
                // The type name goes; its brace opens a map.
                out.push('{');
                stack.push(('{', true));
                i = j + 1;
                expect_field = true;
                continue;
            } else {
                out.push_str(&word);
            }
            expect_field = false;
            continue;
        }
        match c {
            '(' | '[' | '{' => stack.push((c, false)),
            ')' | ']' | '}' => {
                stack.pop();
            }
            _ => {}
        }
        if !c.is_whitespace() {
            expect_field = c == ',' && stack.last().is_some_and(|(_, s)| *s);
        }
        out.push(c);
        i += 1;
    }
    out
}

fn compile(src: &str) -> Compiled {
    Expression::compile(&struct_literals_as_maps(src), VARIABLES)
}

#[derive(Debug)]
enum Mutation {
    JsonPatch(Compiled),
    Apply(Compiled),
}

/// One policy, compiled.
#[derive(Debug)]
pub struct MutatingPolicy {
    name: String,
    spec: Value,
    fail: bool,
    conditions: Vec<(String, Compiled)>,
    variables: Vec<(String, Compiled)>,
    mutations: Vec<Mutation>,
}

impl MutatingPolicy {
    pub fn new(obj: &Value) -> Self {
        let spec = obj.get("spec").cloned().unwrap_or(json!({}));
        let mutations = spec
            .get("mutations")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(|m| match s(m, "/patchType") {
                "JSONPatch" => Mutation::JsonPatch(compile(s(m, "/jsonPatch/expression"))),
                _ => Mutation::Apply(compile(s(m, "/applyConfiguration/expression"))),
            })
            .collect();
        Self {
            name: s(obj, "/metadata/name").to_string(),
            fail: s(&spec, "/failurePolicy") != "Ignore",
            conditions: policy::named_expressions(&spec, "matchConditions", compile),
            variables: policy::named_expressions(&spec, "variables", compile),
            mutations,
            spec,
        }
    }
}

/// The checks of a policy when it is written: known patch types, and expressions that
/// compile.
pub fn policy_errors(obj: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let spec = obj.get("spec").cloned().unwrap_or(json!({}));
    let mutations = spec.get("mutations").and_then(Value::as_array);
    if mutations.is_none_or(Vec::is_empty) {
        errs.push(FieldError::required("spec.mutations"));
    }
    for (i, m) in mutations.into_iter().flatten().enumerate() {
        let (field, src) = match s(m, "/patchType") {
            "JSONPatch" => ("jsonPatch", s(m, "/jsonPatch/expression")),
            "ApplyConfiguration" => ("applyConfiguration", s(m, "/applyConfiguration/expression")),
            other => {
                errs.push(FieldError {
                    field: format!("spec.mutations[{i}].patchType"),
                    reason: "FieldValueNotSupported",
                    message: format!("Unsupported value: {other:?}: supported values: \"ApplyConfiguration\", \"JSONPatch\""),
                });
                continue;
            }
        };
        if let Err(e) = compile(src) {
            errs.push(FieldError::invalid(
                format!("spec.mutations[{i}].{field}.expression"),
                src,
                e,
            ));
        }
    }
    for field in ["matchConditions", "variables"] {
        for (i, c) in spec
            .get(field)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            if let Err(e) = compile(s(c, "/expression")) {
                errs.push(FieldError::invalid(
                    format!("spec.{field}[{i}].expression"),
                    s(c, "/expression"),
                    e,
                ));
            }
        }
    }
    errs
}

/// Runs every bound mutating policy that matches the write on `obj`, in the order of
/// the bindings' names (`a.object` is not read: `obj` is the object).
pub async fn mutate(objects: &Objects, a: &Attempt<'_>, obj: &mut Value) -> ApiResult<()> {
    let bound = objects.policies.read(|p| p.mutating_bound());
    if bound.is_empty() || a.res.group == "admissionregistration.k8s.io" {
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
        let current = Attempt { object: obj, ..*a };
        if !policy::constraints_match(
            policy.spec.get("matchConstraints"),
            &current,
            ns_obj.as_ref(),
        ) || !policy::constraints_match(
            binding.pointer("/spec/matchResources"),
            &current,
            ns_obj.as_ref(),
        ) {
            continue;
        }
        apply(objects, &policy, &binding, a, ns_obj.as_ref(), obj).await?;
    }
    Ok(())
}

async fn apply(
    objects: &Objects,
    policy: &MutatingPolicy,
    binding: &Value,
    a: &Attempt<'_>,
    ns_obj: Option<&Value>,
    obj: &mut Value,
) -> ApiResult<()> {
    let bname = s(binding, "/metadata/name");
    let who = format!("MutatingAdmissionPolicy '{}'", policy.name);
    let failed = |why: String| -> ApiResult<()> {
        if policy.fail {
            Err(ApiError::Forbidden {
                message: format!(
                    "{} {:?} is forbidden: {who} with binding '{bname}' failed: {why}",
                    a.res.qualified(),
                    a.name
                ),
            })
        } else {
            tracing::warn!(policy = %policy.name, binding = bname, %why, "mutating admission policy skipped");
            Ok(())
        }
    };
    let current = Attempt { object: obj, ..*a };
    let param = match policy::params(objects, &policy.spec, &who, binding, &current).await? {
        None => Value::Null,
        Some(mut p) if !p.is_empty() => p.swap_remove(0),
        Some(_) => {
            if s(binding, "/spec/paramRef/parameterNotFoundAction") == "Allow" {
                return Ok(());
            }
            return failed(
                "no params found for policy binding with `Deny` parameterNotFoundAction".into(),
            );
        }
    };
    let request = policy::request(&current);
    let null = Value::Null;
    let mut variables = serde_json::Map::new();
    // Conditions and variables see the object as it came; each mutation sees it as the
    // mutations before it left it.
    let snapshot = obj.clone();
    let run = |expr: &Compiled, object: &Value, variables: &serde_json::Map<String, Value>| {
        let v = Value::Object(variables.clone());
        eval(
            expr,
            &[
                ("object", object),
                ("oldObject", a.old.unwrap_or(&null)),
                ("request", &request),
                ("params", &param),
                ("namespaceObject", ns_obj.unwrap_or(&null)),
                ("variables", &v),
            ],
        )
    };
    for (name, cond) in &policy.conditions {
        match run(cond, &snapshot, &variables) {
            Ok(Value::Bool(true)) => {}
            Ok(Value::Bool(false)) => return Ok(()),
            Ok(_) => {
                return failed(format!(
                    "matchCondition {name:?} did not evaluate to a bool"
                ))
            }
            Err(e) => return failed(format!("matchCondition {name:?}: {e}")),
        }
    }
    for (name, expr) in &policy.variables {
        match run(expr, &snapshot, &variables) {
            Ok(v) => {
                variables.insert(name.clone(), v);
            }
            Err(e) => return failed(format!("variable {name:?}: {e}")),
        }
    }
    for (i, m) in policy.mutations.iter().enumerate() {
        let (expr, is_patch) = match m {
            Mutation::JsonPatch(e) => (e, true),
            Mutation::Apply(e) => (e, false),
        };
        let got = match run(expr, obj, &variables) {
            Ok(v) => v,
            Err(e) => return failed(format!("mutation {i}: {e}")),
        };
        let mut next = obj.clone();
        let applied = if is_patch {
            serde_json::from_value::<json_patch::Patch>(got)
                .map_err(|e| format!("mutation {i} did not give a list of JSONPatch: {e}"))
                .and_then(|p| {
                    json_patch::patch(&mut next, &p)
                        .map_err(|e| format!("mutation {i}: the patch does not apply: {e}"))
                })
        } else if got.is_object() {
            crate::patch::strategic_merge(&mut next, &got)
                .map_err(|e| format!("mutation {i}: the apply configuration does not merge: {e}"))
        } else {
            Err(format!("mutation {i} did not give an Object"))
        };
        if let Err(why) = applied {
            return failed(why);
        }
        if let Some(field) = policy::identity_changed(obj, &next) {
            return failed(format!("mutation {i} changes {field}"));
        }
        *obj = next;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn struct_literals_become_maps_and_strings_stay() {
        assert_eq!(
            struct_literals_as_maps(r#"Object{metadata: Object.metadata{labels: {"a": "b"}}}"#),
            r#"{"metadata": {"labels": {"a": "b"}}}"#
        );
        assert_eq!(
            struct_literals_as_maps(
                r#"[JSONPatch{op: "add", path: "/x", value: object.spec.replicas + 1}]"#
            ),
            r#"[{"op": "add", "path": "/x", "value": object.spec.replicas + 1}]"#
        );
        // Inside a string, and outside a literal, nothing changes.
        let plain = r#"'Object{a: 1}' + x.y + (c ? d : e) + {"k": v}"#;
        assert_eq!(struct_literals_as_maps(plain), plain);
        assert_eq!(
            struct_literals_as_maps(
                "Object{spec: Object.spec{replicas: params.n, paused: (a ? b : c)}}"
            ),
            r#"{"spec": {"replicas": params.n, "paused": (a ? b : c)}}"#
        );
    }

    #[test]
    fn the_rewritten_expressions_build_json() {
        let e =
            compile(r#"Object{metadata: Object.metadata{labels: {"team": params.team}}}"#).unwrap();
        let params = json!({"team": "blue"});
        assert_eq!(
            e.eval(&[("params", &params)]).unwrap(),
            json!({"metadata": {"labels": {"team": "blue"}}})
        );
        let e = compile(r#"[JSONPatch{op: "add", path: "/data/x", value: "1"}]"#).unwrap();
        assert_eq!(
            e.eval(&[]).unwrap(),
            json!([{"op": "add", "path": "/data/x", "value": "1"}])
        );
    }
}
