//! The JSONPath of CRD printer columns (`additionalPrinterColumns[].jsonPath`) and how a
//! column's cell is made from it.
//!
//! Kubernetes accepts kubectl's JSONPath there but prints only the first result, so the
//! paths people write are simple: `.spec.replicas`, `.status.conditions[0].type`,
//! `.status.conditions[?(@.type=="Ready")].status`, `.metadata.labels['app\.kubernetes\.io/name']`.
//! This module parses that subset (fields, indexes, `*`, and `==`/`!=` filters on a
//! relative path) and refuses the rest with a message, at CRD create.

use serde_json::{json, Value};

/// One step of a path.
#[derive(Debug, Clone, PartialEq)]
enum Step {
    Field(String),
    Index(i64),
    Wildcard,
    /// `[?(@.a.b == "x")]`: elements whose relative path compares as asked.
    Filter {
        path: Vec<String>,
        equal: bool,
        value: Value,
    },
}

/// A parsed printer-column path.
#[derive(Debug, Clone, PartialEq)]
pub struct JsonPath {
    source: String,
    steps: Vec<Step>,
}

impl JsonPath {
    /// Parses a path; an error says what is wrong, for the CRD's field error.
    pub fn parse(src: &str) -> Result<Self, String> {
        let trimmed = src.trim();
        // kubectl accepts the template form `{.spec.x}` as well.
        let body = trimmed
            .strip_prefix('{')
            .and_then(|s| s.strip_suffix('}'))
            .unwrap_or(trimmed);
        let body = body.strip_prefix('$').unwrap_or(body);
        if !body.starts_with('.') && !body.starts_with('[') {
            return Err("must be a simple json path starting with .".into());
        }
        let chars: Vec<char> = body.chars().collect();
        let mut i = 0;
        let mut steps = Vec::new();
        while i < chars.len() {
            match chars[i] {
                '.' => {
                    i += 1;
                    let start = i;
                    while i < chars.len() && chars[i] != '.' && chars[i] != '[' {
                        i += 1;
                    }
                    let name: String = chars[start..i].iter().collect();
                    if name.is_empty() {
                        return Err(format!("empty field name at {start}"));
                    }
                    if name == "*" {
                        steps.push(Step::Wildcard);
                    } else if !name
                        .chars()
                        .all(|c| c.is_alphanumeric() || c == '_' || c == '-' || c == '$')
                    {
                        return Err(format!("unexpected character in field name {name:?}"));
                    } else {
                        steps.push(Step::Field(name));
                    }
                }
                '[' => {
                    let close = find_close(&chars, i).ok_or("unclosed [")?;
                    let inner: String = chars[i + 1..close].iter().collect();
                    steps.push(bracket(inner.trim())?);
                    i = close + 1;
                }
                c => return Err(format!("unexpected {c:?} at {i}")),
            }
        }
        Ok(Self {
            source: src.to_string(),
            steps,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// The first value the path reaches in `obj`.
    pub fn first<'a>(&self, obj: &'a Value) -> Option<&'a Value> {
        let mut current = vec![obj];
        for step in &self.steps {
            let mut next = Vec::new();
            for v in current {
                match step {
                    Step::Field(f) => next.extend(v.get(f.as_str())),
                    Step::Index(n) => {
                        if let Some(a) = v.as_array() {
                            let idx = if *n < 0 { a.len() as i64 + n } else { *n };
                            next.extend(usize::try_from(idx).ok().and_then(|i| a.get(i)));
                        }
                    }
                    Step::Wildcard => match v {
                        Value::Array(a) => next.extend(a.iter()),
                        Value::Object(m) => next.extend(m.values()),
                        _ => {}
                    },
                    Step::Filter { path, equal, value } => {
                        if let Some(a) = v.as_array() {
                            next.extend(a.iter().filter(|e| {
                                let got = path.iter().try_fold(*e, |acc, k| acc.get(k.as_str()));
                                (got == Some(value)) == *equal
                            }));
                        }
                    }
                }
            }
            current = next;
        }
        current.into_iter().next()
    }

    /// The Table cell of a column of this type, as kube-apiserver makes it: dates become
    /// ages, numbers stay numbers, strings print the value; nothing found is null.
    pub fn cell(&self, obj: &Value, type_: &str) -> Value {
        let Some(v) = self.first(obj) else {
            return Value::Null;
        };
        match type_ {
            "integer" => v.as_i64().map(Value::from).unwrap_or(Value::Null),
            "number" => v.as_f64().map(Value::from).unwrap_or(Value::Null),
            "boolean" => v.as_bool().map(Value::from).unwrap_or(Value::Null),
            "date" => match v.as_str() {
                Some(ts) => json!(crate::table::age_of(Some(ts))),
                None => Value::Null,
            },
            _ => match v {
                Value::String(s) => json!(s),
                Value::Null => Value::Null,
                other => json!(other.to_string()),
            },
        }
    }
}

fn find_close(chars: &[char], open: usize) -> Option<usize> {
    let mut quote: Option<char> = None;
    let mut i = open + 1;
    while i < chars.len() {
        let c = chars[i];
        match quote {
            Some(_) if c == '\\' => i += 1,
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '\'' || c == '"' => quote = Some(c),
            None if c == ']' => return Some(i),
            None => {}
        }
        i += 1;
    }
    None
}

fn unquote(s: &str) -> Option<String> {
    let q = s.chars().next()?;
    if (q != '\'' && q != '"') || s.len() < 2 || !s.ends_with(q) {
        return None;
    }
    let mut out = String::new();
    let mut escaped = false;
    for c in s[1..s.len() - 1].chars() {
        if escaped {
            out.push(c);
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else {
            out.push(c);
        }
    }
    Some(out)
}

fn bracket(inner: &str) -> Result<Step, String> {
    if inner == "*" {
        return Ok(Step::Wildcard);
    }
    if let Some(name) = unquote(inner) {
        return Ok(Step::Field(name));
    }
    if let Ok(n) = inner.parse::<i64>() {
        return Ok(Step::Index(n));
    }
    let filter = inner
        .strip_prefix("?(")
        .and_then(|s| s.strip_suffix(')'))
        .ok_or_else(|| format!("unsupported subscript [{inner}]"))?;
    let (lhs, rhs, equal) = if let Some((l, r)) = filter.split_once("==") {
        (l, r, true)
    } else if let Some((l, r)) = filter.split_once("!=") {
        (l, r, false)
    } else {
        return Err(format!("unsupported filter {filter:?}: use == or !="));
    };
    let path: Vec<String> = lhs
        .trim()
        .strip_prefix("@.")
        .ok_or_else(|| format!("a filter compares @.field, not {:?}", lhs.trim()))?
        .split('.')
        .map(String::from)
        .collect();
    let rhs = rhs.trim();
    let value = match unquote(rhs) {
        Some(s) => Value::String(s),
        None => serde_json::from_str(rhs).map_err(|_| format!("bad filter value {rhs:?}"))?,
    };
    Ok(Step::Filter { path, equal, value })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_people_write_find_their_value() {
        let o = json!({"spec": {"replicas": 3}, "status": {"conditions": [
            {"type": "Synced", "status": "True"}, {"type": "Ready", "status": "False"}]},
            "metadata": {"labels": {"app.kubernetes.io/name": "web"}}});
        let get = |p: &str| JsonPath::parse(p).unwrap().first(&o).cloned();
        assert_eq!(get(".spec.replicas"), Some(json!(3)));
        assert_eq!(get("{.spec.replicas}"), Some(json!(3)));
        assert_eq!(get(".status.conditions[1].type"), Some(json!("Ready")));
        assert_eq!(get(".status.conditions[-1].type"), Some(json!("Ready")));
        assert_eq!(
            get(r#".status.conditions[?(@.type=="Ready")].status"#),
            Some(json!("False"))
        );
        assert_eq!(
            get(r#".status.conditions[?(@.type!="Synced")].type"#),
            Some(json!("Ready"))
        );
        assert_eq!(
            get(r#".metadata.labels['app\.kubernetes\.io/name']"#),
            Some(json!("web"))
        );
        assert_eq!(
            get(".metadata.labels['app.kubernetes.io/name']"),
            Some(json!("web"))
        );
        assert_eq!(get(".spec.missing"), None);
    }

    #[test]
    fn cells_follow_the_column_type() {
        let o = json!({"spec": {"n": 2, "s": "x", "m": {"a": 1}}});
        let cell = |p: &str, t: &str| JsonPath::parse(p).unwrap().cell(&o, t);
        assert_eq!(cell(".spec.n", "integer"), json!(2));
        assert_eq!(cell(".spec.s", "string"), json!("x"));
        assert_eq!(cell(".spec.m", "string"), json!("{\"a\":1}"));
        assert_eq!(cell(".spec.none", "string"), Value::Null);
    }

    #[test]
    fn bad_paths_are_refused() {
        for p in ["spec.x", ".spec[", ".spec[?(@.a>1)]", ".spec..x", ".sp ec"] {
            assert!(JsonPath::parse(p).is_err(), "{p}");
        }
    }
}
