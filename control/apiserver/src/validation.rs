//! Validation of request bodies: syntax (duplicate fields), the schema (unknown fields,
//! through the k8s-openapi types), and the semantic rules of each kind (names, labels,
//! selectors, containers), with Kubernetes' messages and field paths.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use crate::error::FieldError;

/// Parses JSON, recording every field that appears twice in one object.
pub fn parse_json_checked(body: &[u8]) -> Result<(Value, Vec<String>), serde_json::Error> {
    let mut dups = Vec::new();
    let mut de = serde_json::Deserializer::from_slice(body);
    let v = Checked {
        path: String::new(),
        dups: &mut dups,
    }
    .deserialize(&mut de)?;
    de.end()?;
    Ok((v, dups))
}

/// Why a body could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error("yaml")]
    Yaml(#[source] serde_yaml::Error),
}

/// Parses a YAML body (`application/yaml`, `application/apply-patch+yaml`), as
/// kube-apiserver converts YAML to JSON before decoding. JSON is YAML, and most clients
/// (kubectl among them) send JSON under these types: it is read as JSON first, so that
/// its duplicate fields are found as for any JSON body. One document only; aliases are
/// expanded under serde_yaml's repetition limit, and the body itself is bounded before.
pub fn parse_yaml_checked(body: &[u8]) -> Result<(Value, Vec<String>), DecodeError> {
    if let Ok(parsed) = parse_json_checked(body) {
        return Ok(parsed);
    }
    let v: Value = serde_yaml::from_slice(body).map_err(DecodeError::Yaml)?;
    Ok((v, Vec::new()))
}

struct Checked<'a> {
    path: String,
    dups: &'a mut Vec<String>,
}

impl<'de> DeserializeSeed<'de> for Checked<'_> {
    type Value = Value;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Checked<'_> {
    type Value = Value;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        let mut i = 0;
        loop {
            let path = format!("{}[{i}]", self.path);
            match seq.next_element_seed(Checked {
                path,
                dups: &mut *self.dups,
            })? {
                Some(v) => out.push(v),
                None => break,
            }
            i += 1;
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let path = if self.path.is_empty() {
                key.clone()
            } else {
                format!("{}.{key}", self.path)
            };
            let v = map.next_value_seed(Checked {
                path: path.clone(),
                dups: &mut *self.dups,
            })?;
            if out.insert(key, v).is_some() {
                self.dups.push(path);
            }
        }
        Ok(Value::Object(out))
    }
}

/// Fields of `input` that the typed round trip dropped: unknown to the schema.
pub fn unknown_fields(input: &Value, typed: &Value) -> Vec<String> {
    let mut out = Vec::new();
    walk_unknown(input, typed, &mut String::new(), &mut out);
    out
}

/// Walks both trees with one path buffer, grown and cut back as it goes: every write
/// walks its whole object, and a path formatted per field was most of the walk.
fn walk_unknown(input: &Value, typed: &Value, path: &mut String, out: &mut Vec<String>) {
    use std::fmt::Write;
    let at = path.len();
    match (input, typed) {
        (Value::Object(i), Value::Object(t)) => {
            for (k, v) in i {
                if at > 0 {
                    path.push('.');
                }
                path.push_str(k);
                match t.get(k) {
                    None if !v.is_null() => out.push(path.clone()),
                    Some(tv) => walk_unknown(v, tv, path, out),
                    None => {}
                }
                path.truncate(at);
            }
        }
        (Value::Array(i), Value::Array(t)) => {
            for (n, (iv, tv)) in i.iter().zip(t).enumerate() {
                let _ = write!(path, "[{n}]");
                walk_unknown(iv, tv, path, out);
                path.truncate(at);
            }
        }
        _ => {}
    }
}

pub fn dns1123_label(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err("a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')".into())
    }
}

pub fn dns1123_subdomain(s: &str) -> Result<(), String> {
    let ok = !s.is_empty() && s.len() <= 253 && s.split('.').all(|l| dns1123_label(l).is_ok());
    if ok {
        Ok(())
    } else {
        Err("a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')".into())
    }
}

fn qualified_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric()
}

/// A label (or annotation) key: an optional DNS subdomain prefix and a qualified name.
pub fn label_key(k: &str) -> Result<(), String> {
    let (prefix, name) = match k.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    if let Some(p) = prefix {
        dns1123_subdomain(p).map_err(|e| format!("prefix part {e}"))?;
    }
    if qualified_name(name) {
        Ok(())
    } else {
        Err("name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')".into())
    }
}

pub fn label_value(v: &str) -> Result<(), String> {
    if v.is_empty() || qualified_name(v) {
        Ok(())
    } else {
        Err("a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')".into())
    }
}

/// Validates the metadata every object has.
pub fn metadata(
    obj: &Value,
    namespaced: bool,
    name_rule: fn(&str) -> Result<(), String>,
) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let meta = obj.get("metadata").cloned().unwrap_or(Value::Null);
    match meta.get("name").and_then(Value::as_str) {
        None | Some("") => errs.push(FieldError::required("metadata.name")),
        Some(n) => {
            if let Err(why) = name_rule(n) {
                errs.push(FieldError::invalid("metadata.name", n, why));
            }
        }
    }
    if namespaced
        && meta
            .get("namespace")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
    {
        errs.push(FieldError::required("metadata.namespace"));
    }
    if let Some(labels) = meta.get("labels").and_then(Value::as_object) {
        for (k, v) in labels {
            if let Err(why) = label_key(k) {
                errs.push(FieldError::invalid("metadata.labels", k, why));
            }
            let v = v.as_str().unwrap_or_default();
            if let Err(why) = label_value(v) {
                errs.push(FieldError::invalid(format!("metadata.labels.{k}"), v, why));
            }
        }
    }
    if let Some(ann) = meta.get("annotations").and_then(Value::as_object) {
        let mut total = 0;
        for (k, v) in ann {
            if let Err(why) = label_key(k) {
                errs.push(FieldError::invalid("metadata.annotations", k, why));
            }
            total += k.len() + v.as_str().map_or(0, str::len);
        }
        if total > 256 * 1024 {
            errs.push(FieldError {
                field: "metadata.annotations".into(),
                reason: "FieldValueTooLong",
                message: format!("Too long: may not be more than 262144 bytes (got {total})"),
            });
        }
    }
    errs
}

/// Containers (init containers included) one pod may have. Each running container holds
/// one of the node's instance slots and a status entry that the node rewrites on every
/// change; past a few dozen, a pod's status alone approaches the object size limit and
/// every container exit rewrites all of it. Kubernetes leaves this to the object size;
/// Baton refuses early, with a clear field error.
pub const MAX_CONTAINERS: usize = 64;

/// The pod spec rules: containers, volumes and how containers mount them.
pub(crate) fn pod_spec(spec: &Value, path: &str, errs: &mut Vec<FieldError>) {
    containers(spec, path, errs);
    let count = items(spec, "initContainers").count() + items(spec, "containers").count();
    if count > MAX_CONTAINERS {
        errs.push(FieldError {
            field: format!("{path}.containers"),
            reason: "FieldValueTooMany",
            message: format!(
                "Too many: {count}: must have at most {MAX_CONTAINERS} items (containers and initContainers together)"
            ),
        });
    }
    let mut volumes = BTreeSet::new();
    for (i, v) in items(spec, "volumes").enumerate() {
        let p = format!("{path}.volumes[{i}]");
        unique_label(v, &p, &mut volumes, errs);
        if let Some(h) = v.get("hostPath") {
            let hp = h.get("path").and_then(Value::as_str).unwrap_or("");
            if hp.is_empty() {
                errs.push(FieldError::required(format!("{p}.hostPath.path")));
            } else if has_dot_dot(hp) {
                errs.push(FieldError::invalid(
                    format!("{p}.hostPath.path"),
                    hp,
                    "must not contain '..'",
                ));
            }
        }
    }
    for list in ["initContainers", "containers"] {
        for (i, c) in items(spec, list).enumerate() {
            for (j, m) in items(c, "volumeMounts").enumerate() {
                let p = format!("{path}.{list}[{i}].volumeMounts[{j}]");
                volume_mount(m, &p, &volumes, errs);
            }
            resources(c, &format!("{path}.{list}[{i}].resources"), errs);
        }
    }
}

/// A container's requests and limits: quantities Kubernetes can read, none negative, and
/// no request above its limit.
fn resources(c: &Value, p: &str, errs: &mut Vec<FieldError>) {
    use baton_kube::quantity::{nanos, QuantityError};
    let Some(r) = c.get("resources") else {
        return;
    };
    let read = |which: &str, errs: &mut Vec<FieldError>| {
        let mut out = BTreeMap::new();
        let map = r
            .get(which)
            .and_then(Value::as_object)
            .into_iter()
            .flatten();
        for (name, q) in map {
            let field = format!("{p}.{which}[{name}]");
            let text = q
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| q.to_string());
            match nanos(&text) {
                Ok(v) => {
                    out.insert(name.clone(), v);
                }
                Err(QuantityError::Negative(_)) => errs.push(FieldError::invalid(
                    field,
                    &text,
                    "must be greater than or equal to 0",
                )),
                Err(e) => errs.push(FieldError::invalid(
                    field,
                    &text,
                    format!("{e}; quantities must match the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'"),
                )),
            }
        }
        out
    };
    let limits = read("limits", errs);
    let requests = read("requests", errs);
    for (name, req) in &requests {
        if limits.get(name).is_some_and(|lim| req > lim) {
            let text = r
                .pointer(&format!("/requests/{name}"))
                .and_then(Value::as_str)
                .unwrap_or_default();
            errs.push(FieldError::invalid(
                format!("{p}.requests[{name}]"),
                text,
                format!("must be less than or equal to {name} limit"),
            ));
        }
    }
}

/// The items of the array at `obj.key`, none if it is missing or not an array.
fn items<'a>(obj: &'a Value, key: &str) -> impl Iterator<Item = &'a Value> {
    obj.get(key).and_then(Value::as_array).into_iter().flatten()
}

/// `item.name` (at field path `p`) must be a DNS label not yet in `seen`.
fn unique_label(item: &Value, p: &str, seen: &mut BTreeSet<String>, errs: &mut Vec<FieldError>) {
    match item.get("name").and_then(Value::as_str) {
        None | Some("") => errs.push(FieldError::required(format!("{p}.name"))),
        Some(n) => {
            if let Err(why) = dns1123_label(n) {
                errs.push(FieldError::invalid(format!("{p}.name"), n, why));
            } else if !seen.insert(n.to_string()) {
                errs.push(FieldError {
                    field: format!("{p}.name"),
                    reason: "FieldValueDuplicate",
                    message: format!("Duplicate value: {n:?}"),
                });
            }
        }
    }
}

/// Whether a path has a `..` element (which could lead out of where it is joined).
fn has_dot_dot(p: &str) -> bool {
    p.split(['/', '\\']).any(|e| e == "..")
}

fn volume_mount(m: &Value, p: &str, volumes: &BTreeSet<String>, errs: &mut Vec<FieldError>) {
    match m.get("name").and_then(Value::as_str) {
        None | Some("") => errs.push(FieldError::required(format!("{p}.name"))),
        Some(n) if !volumes.contains(n) => errs.push(FieldError {
            field: format!("{p}.name"),
            reason: "FieldValueNotFound",
            message: format!("Not found: {n:?}"),
        }),
        Some(_) => {}
    }
    match m.get("mountPath").and_then(Value::as_str) {
        None | Some("") => errs.push(FieldError::required(format!("{p}.mountPath"))),
        Some(mp) if !mp.starts_with('/') => errs.push(FieldError::invalid(
            format!("{p}.mountPath"),
            mp,
            "must be an absolute path",
        )),
        Some(mp) if has_dot_dot(mp) || mp.contains('\0') => errs.push(FieldError::invalid(
            format!("{p}.mountPath"),
            mp,
            "must not contain '..'",
        )),
        Some(_) => {}
    }
    let sub = m.get("subPath").and_then(Value::as_str).unwrap_or("");
    let expr = m.get("subPathExpr").and_then(Value::as_str).unwrap_or("");
    if !sub.is_empty() && !expr.is_empty() {
        errs.push(FieldError::invalid(
            format!("{p}.subPathExpr"),
            expr,
            "subPathExpr and subPath are mutually exclusive",
        ));
    }
    for (field, v) in [("subPath", sub), ("subPathExpr", expr)] {
        if v.is_empty() {
            continue;
        }
        if v.starts_with('/') {
            errs.push(FieldError::invalid(
                format!("{p}.{field}"),
                v,
                "must be a relative path",
            ));
        } else if has_dot_dot(v) || v.contains('\0') {
            errs.push(FieldError::invalid(
                format!("{p}.{field}"),
                v,
                "must not contain '..'",
            ));
        }
    }
}

fn containers(spec: &Value, path: &str, errs: &mut Vec<FieldError>) {
    let list = spec.get("containers").and_then(Value::as_array);
    match list {
        None => errs.push(FieldError::required(format!("{path}.containers"))),
        Some(cs) if cs.is_empty() => errs.push(FieldError::required(format!("{path}.containers"))),
        Some(cs) => {
            let mut names = BTreeSet::new();
            for (i, c) in cs.iter().enumerate() {
                let p = format!("{path}.containers[{i}]");
                unique_label(c, &p, &mut names, errs);
                if c.get("image")
                    .and_then(Value::as_str)
                    .is_none_or(str::is_empty)
                {
                    errs.push(FieldError::required(format!("{p}.image")));
                }
            }
        }
    }
}

pub(crate) fn selector_matches_template(obj: &Value, errs: &mut Vec<FieldError>) {
    let Some(sel) = obj.pointer("/spec/selector") else {
        errs.push(FieldError::required("spec.selector"));
        return;
    };
    let s = crate::selectors::LabelSelector::from_object(sel);
    if s.is_empty() {
        errs.push(FieldError::invalid(
            "spec.selector",
            "",
            "empty selector is invalid for deployment",
        ));
        return;
    }
    let template = obj
        .pointer("/spec/template")
        .cloned()
        .unwrap_or(Value::Null);
    if !s.matches(&template) {
        let labels = template
            .pointer("/metadata/labels")
            .map(|l| l.to_string())
            .unwrap_or_default();
        errs.push(FieldError::invalid(
            "spec.template.metadata.labels",
            &labels,
            "`selector` does not match template `labels`",
        ));
    }
    if let Some(spec) = obj.pointer("/spec/template/spec") {
        pod_spec(spec, "spec.template.spec", errs);
    } else {
        errs.push(FieldError::required("spec.template.spec.containers"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn duplicates_and_unknown_fields() {
        let (v, dups) = parse_json_checked(br#"{"a":1,"b":{"c":1,"c":2},"a":3}"#).unwrap();
        assert_eq!(dups, vec!["b.c".to_string(), "a".to_string()]);
        assert_eq!(v["a"], 3);
        let input = json!({"spec": {"x": 1, "y": null, "z": [{"q": 1}]}});
        let typed = json!({"spec": {"z": [{}]}});
        assert_eq!(
            unknown_fields(&input, &typed),
            vec!["spec.x", "spec.z[0].q"]
        );
    }

    #[test]
    fn pod_volumes_and_mounts_cannot_name_paths() {
        let pod = |volumes: Value, mounts: Value| {
            json!({"spec": {"volumes": volumes,
                "containers": [{"name": "c", "image": "x", "volumeMounts": mounts}]}})
        };
        let fields = |o: Value| -> Vec<String> {
            let mut errs = Vec::new();
            match o.get("spec") {
                Some(spec) => pod_spec(spec, "spec", &mut errs),
                None => errs.push(FieldError::required("spec.containers")),
            }
            errs.into_iter().map(|e| e.field).collect()
        };
        let ok = pod(
            json!([{"name": "data", "emptyDir": {}}]),
            json!([{"name": "data", "mountPath": "/data", "subPath": "a/b"}]),
        );
        assert!(fields(ok).is_empty());
        let bad = pod(
            json!([{"name": "../etc", "emptyDir": {}}, {"name": "h", "hostPath": {"path": "/x/../etc"}}]),
            json!([
                {"name": "h", "mountPath": "rel"},
                {"name": "h", "mountPath": "/a/../b", "subPath": "/etc"},
                {"name": "h", "mountPath": "/c", "subPathExpr": "$(X)/../.."},
                {"name": "nope", "mountPath": "/d"},
            ]),
        );
        assert_eq!(
            fields(bad),
            [
                "spec.volumes[0].name",
                "spec.volumes[1].hostPath.path",
                "spec.containers[0].volumeMounts[0].mountPath",
                "spec.containers[0].volumeMounts[1].mountPath",
                "spec.containers[0].volumeMounts[1].subPath",
                "spec.containers[0].volumeMounts[2].subPathExpr",
                "spec.containers[0].volumeMounts[3].name",
            ]
        );
        let many: Vec<Value> = (0..=MAX_CONTAINERS)
            .map(|i| json!({"name": format!("c{i}"), "image": "x"}))
            .collect();
        let too_many = json!({"spec": {"containers": many}});
        assert_eq!(fields(too_many), ["spec.containers"]);
        let res = |r: Value| json!({"spec": {"containers": [{"name": "a", "image": "x", "resources": r}]}});
        assert!(fields(res(
            json!({"limits": {"cpu": "500m", "memory": "1.5Gi"}, "requests": {"cpu": "0.25"}})
        ))
        .is_empty());
        assert_eq!(
            fields(res(
                json!({"limits": {"cpu": "12x", "memory": "-1"}, "requests": {"cpu": "2", "memory": "1Ki"}})
            )),
            [
                "spec.containers[0].resources.limits[cpu]",
                "spec.containers[0].resources.limits[memory]",
            ]
        );
        assert_eq!(
            fields(res(
                json!({"limits": {"cpu": "1"}, "requests": {"cpu": "1001m"}})
            )),
            ["spec.containers[0].resources.requests[cpu]"]
        );
    }

    #[test]
    fn yaml_bodies_are_yaml() {
        let (v, _) = parse_yaml_checked(
            b"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\ndata:\n  a: \"1\"\n",
        )
        .unwrap();
        assert_eq!(v["metadata"]["name"], "x");
        assert_eq!(v["data"]["a"], "1");
        let (_, dups) = parse_yaml_checked(br#"{"a":1,"a":2}"#).unwrap();
        assert_eq!(
            dups,
            ["a"],
            "JSON under a YAML type keeps its duplicate check"
        );
        assert!(matches!(
            parse_yaml_checked(b"a: [1, 2\n"),
            Err(DecodeError::Yaml(_))
        ));
        assert!(
            parse_yaml_checked(b"a: 1\n---\nb: 2\n").is_err(),
            "one document"
        );
        // An alias bomb is refused, not expanded.
        let mut bomb = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 0..9 {
            let prev = if i == 0 {
                "a".to_string()
            } else {
                format!("l{}", i - 1)
            };
            bomb.push_str(&format!("l{i}: &l{i} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"));
        }
        assert!(parse_yaml_checked(bomb.as_bytes()).is_err());
    }

    #[test]
    fn names_and_labels() {
        assert!(dns1123_subdomain("web-1.example").is_ok());
        assert!(dns1123_subdomain("Web").is_err());
        assert!(label_key("app.kubernetes.io/name").is_ok());
        assert!(label_key("-bad").is_err());
        assert!(label_value("").is_ok());
        assert!(label_value("has space").is_err());
        let errs = metadata(
            &json!({"metadata": {"labels": {"ok": "bad value!"}}}),
            true,
            dns1123_subdomain,
        );
        let fields: Vec<_> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            vec!["metadata.name", "metadata.namespace", "metadata.labels.ok"]
        );
    }
}
