//! Label and field selectors, as `kubectl -l` and `--field-selector` send them.

use std::collections::{BTreeMap, BTreeSet};

use kube_core::{Expression, Selector, SelectorExt};
use serde_json::Value;

use crate::error::ApiError;
use crate::resources::Resource;

/// What label and field selectors read of an object: a whole object, or the watch
/// cache's compact copy of the parts they may read.
pub trait Selectable {
    /// The object's labels with string values.
    fn labels(&self) -> BTreeMap<String, String>;
    /// A field's value as a field selector compares it (see [`field_value`]).
    fn field(&self, path: &str) -> std::borrow::Cow<'_, str>;
}

impl Selectable for Value {
    fn labels(&self) -> BTreeMap<String, String> {
        self.pointer("/metadata/labels")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
            .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
            .collect()
    }

    fn field(&self, path: &str) -> std::borrow::Cow<'_, str> {
        field_value(self, path)
    }
}

/// A parsed label selector; the empty selector matches everything. Matching is
/// kube-core's [`Selector`]; what kube does not have, and this adds, is reading the
/// query-string form (`a=b,c in (x,y),!d`) with kube-apiserver's errors.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector(Selector);

/// Splits at commas that are not inside parentheses.
fn split_top(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut depth = 0;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

impl LabelSelector {
    pub fn parse(s: &str) -> Result<Self, ApiError> {
        let bad = |why: &str| {
            ApiError::bad_request(format!(
                "unable to parse requirement: {why} in label selector {s:?}"
            ))
        };
        let mut reqs = Vec::new();
        for part in split_top(s) {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            let set = |rest: &str| -> Result<BTreeSet<String>, ApiError> {
                let rest = rest.trim();
                let inner = rest
                    .strip_prefix('(')
                    .and_then(|r| r.strip_suffix(')'))
                    .ok_or_else(|| bad("expected (values)"))?;
                Ok(inner
                    .split(',')
                    .map(|v| v.trim().to_string())
                    .filter(|v| !v.is_empty())
                    .collect())
            };
            let req = if let Some(key) = part.strip_prefix('!') {
                Expression::DoesNotExist(key.trim().to_string())
            } else if let Some((k, v)) = part.split_once("!=") {
                Expression::NotEqual(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = part.split_once("==") {
                Expression::Equal(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = part.split_once('=') {
                Expression::Equal(k.trim().into(), v.trim().into())
            } else if let Some((k, rest)) = part.split_once(" notin ") {
                Expression::NotIn(k.trim().into(), set(rest)?)
            } else if let Some((k, rest)) = part.split_once(" in ") {
                Expression::In(k.trim().into(), set(rest)?)
            } else if part.contains(' ') || part.contains('(') {
                return Err(bad("unknown operator"));
            } else {
                Expression::Exists(part.to_string())
            };
            let key = match &req {
                Expression::Equal(k, _)
                | Expression::NotEqual(k, _)
                | Expression::In(k, _)
                | Expression::NotIn(k, _)
                | Expression::Exists(k)
                | Expression::DoesNotExist(k) => k,
            };
            if let Err(why) = crate::validation::label_key(key) {
                return Err(bad(&why));
            }
            reqs.push(req);
        }
        Ok(Self(reqs.into_iter().collect()))
    }

    /// From a `LabelSelector` object (Deployment/ReplicaSet/Service selectors). One that
    /// cannot be read (an unknown operator, `In` without values) selects nothing.
    pub fn from_object(sel: &Value) -> Self {
        let parsed = serde_json::from_value::<
            k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
        >(sel.clone());
        match parsed.ok().map(Selector::try_from) {
            Some(Ok(s)) => Self(s),
            // Nothing has this label twice with two values: no object matches.
            _ => Self(Selector::from_iter([
                Expression::Exists(String::new()),
                Expression::DoesNotExist(String::new()),
            ])),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.selects_all()
    }

    pub fn matches<T: Selectable + ?Sized>(&self, obj: &T) -> bool {
        if self.0.selects_all() {
            return true;
        }
        self.0.matches(&obj.labels())
    }
}

/// A parsed field selector over the fields each resource supports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector(Vec<(String, bool, String)>);

impl FieldSelector {
    pub fn parse(s: &str, res: &Resource) -> Result<Self, ApiError> {
        let mut reqs = Vec::new();
        for part in s.split(',') {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            let (field, eq, value) = if let Some((f, v)) = part.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = part.split_once("==") {
                (f, true, v)
            } else if let Some((f, v)) = part.split_once('=') {
                (f, true, v)
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid field selector: {part:?}"
                )));
            };
            let field = field.trim();
            let supported = matches!(field, "metadata.name" | "metadata.namespace")
                || res.strategy.field_selectable(field);
            if !supported {
                return Err(ApiError::bad_request(format!(
                    "field label not supported: {field}"
                )));
            }
            reqs.push((field.to_string(), eq, value.trim().to_string()));
        }
        Ok(Self(reqs))
    }

    /// The field selector pins one name: lists can read one key instead of a range.
    pub fn exact_name(&self) -> Option<&str> {
        self.0
            .iter()
            .find(|(f, eq, _)| f == "metadata.name" && *eq)
            .map(|(_, _, v)| v.as_str())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// A field the selector pins to one value (the first such), by which a watch can be
    /// indexed: `spec.nodeName=NODE` for a node's pods.
    pub fn pinned(&self) -> Option<(&str, &str)> {
        self.0
            .iter()
            .find(|(_, eq, _)| *eq)
            .map(|(f, _, v)| (f.as_str(), v.as_str()))
    }

    pub fn matches<T: Selectable + ?Sized>(&self, obj: &T) -> bool {
        self.0
            .iter()
            .all(|(field, eq, want)| (obj.field(field) == want.as_str()) == *eq)
    }
}

/// A field's value as a field selector compares it: a string as itself, a missing field
/// or null as "", anything else in its JSON form.
pub fn field_value<'a>(obj: &'a Value, field: &str) -> std::borrow::Cow<'a, str> {
    let mut at = obj;
    for part in field.split('.') {
        match at.get(part) {
            Some(v) => at = v,
            None => return "".into(),
        }
    }
    field_text(at)
}

/// A value as a field selector compares it: a string as itself, null as "", anything
/// else in its JSON form.
pub fn field_text(v: &Value) -> std::borrow::Cow<'_, str> {
    match v {
        Value::String(s) => s.as_str().into(),
        Value::Null => "".into(),
        v => v.to_string().into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pods() -> &'static Resource {
        crate::resources::builtin("Pod")
    }

    #[test]
    fn label_selectors() {
        let obj = json!({"metadata": {"labels": {"app": "web", "tier": "front"}}});
        for (sel, want) in [
            ("app=web", true),
            ("app==web,tier=front", true),
            ("app!=web", false),
            ("app in (web, api)", true),
            ("app notin (web)", false),
            ("tier", true),
            ("!tier", false),
            ("missing", false),
            ("", true),
        ] {
            assert_eq!(
                LabelSelector::parse(sel).unwrap().matches(&obj),
                want,
                "{sel}"
            );
        }
        assert!(LabelSelector::parse("a in b").is_err());
        assert!(LabelSelector::parse("bad key!=x").is_err());
    }

    #[test]
    fn field_selectors() {
        let pod = json!({"metadata": {"name": "p", "namespace": "d"}, "spec": {"nodeName": "n1"}, "status": {"phase": "Running"}});
        let sel = FieldSelector::parse("spec.nodeName=n1,status.phase!=Failed", pods()).unwrap();
        assert!(sel.matches(&pod));
        assert!(!FieldSelector::parse("spec.nodeName=", pods())
            .unwrap()
            .matches(&pod));
        assert!(FieldSelector::parse("spec.foo=x", pods()).is_err());
        assert_eq!(
            FieldSelector::parse("metadata.name=p", pods())
                .unwrap()
                .exact_name(),
            Some("p")
        );
    }
}
