//! Patches: JSON merge (RFC 7386), JSON patch (RFC 6902), and Kubernetes' strategic merge,
//! with the directives kubectl sends (`$patch`, `$retainKeys`, `$setElementOrder/…`,
//! `$deleteFromPrimitiveList/…`).
//!
//! Strategic merge needs each list's merge key. The Go types carry them as struct tags,
//! which k8s-openapi does not expose, so the ones of the served types are listed here
//! (`merge_key`), keyed by the list's field name and, where a name is ambiguous, its parent.

use serde_json::{Map, Value};

use crate::error::{ApiError, ApiResult};

/// The patch types of the `Content-Type` header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchType {
    Json,
    Merge,
    Strategic,
    Apply,
}

impl PatchType {
    pub fn from_content_type(ct: &str) -> Option<Self> {
        let ct = ct.split(';').next().unwrap_or("").trim();
        match ct {
            "application/json-patch+json" => Some(PatchType::Json),
            "application/merge-patch+json" => Some(PatchType::Merge),
            "application/strategic-merge-patch+json" => Some(PatchType::Strategic),
            // apply-patch+cbor is not served: it falls through to 415.
            "application/apply-patch+yaml" => Some(PatchType::Apply),
            _ => None,
        }
    }
}

/// How a list field merges: by a key field, as a set of primitives, or not at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ListMerge {
    Key(&'static str),
    PrimitiveSet,
    Replace,
}

/// The merge strategy of list field `field` whose parent object is at `parent` (the field
/// names leading to it).
pub(crate) fn merge_key(parent: &[String], field: &str) -> ListMerge {
    let in_container = parent
        .last()
        .is_some_and(|p| p == "containers" || p == "initContainers" || p == "ephemeralContainers");
    match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "volumes"
        | "imagePullSecrets"
        | "env"
        | "resourceClaims" => ListMerge::Key("name"),
        "ports" if in_container => ListMerge::Key("containerPort"),
        "ports" if parent.last().is_some_and(|p| p == "spec") => ListMerge::Key("port"),
        "volumeMounts" => ListMerge::Key("mountPath"),
        "volumeDevices" => ListMerge::Key("devicePath"),
        "conditions" => ListMerge::Key("type"),
        "ownerReferences" => ListMerge::Key("uid"),
        "hostAliases" => ListMerge::Key("ip"),
        "topologySpreadConstraints" => ListMerge::Key("topologyKey"),
        "addresses" if parent.last().is_some_and(|p| p == "status") => ListMerge::Key("type"),
        "finalizers" => ListMerge::PrimitiveSet,
        _ => ListMerge::Replace,
    }
}

fn key_of(item: &Value, key: &str) -> Option<Value> {
    item.get(key).cloned()
}

/// Applies a strategic-merge patch to `target`.
pub fn strategic_merge(target: &mut Value, patch: &Value) -> ApiResult<()> {
    merge_map(target, patch, &mut Vec::new())
}

fn merge_map(target: &mut Value, patch: &Value, path: &mut Vec<String>) -> ApiResult<()> {
    let Some(pobj) = patch.as_object() else {
        *target = patch.clone();
        return Ok(());
    };
    if pobj.get("$patch").and_then(Value::as_str) == Some("replace") {
        let mut clean = pobj.clone();
        clean.remove("$patch");
        *target = Value::Object(clean);
        return Ok(());
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let mut orders: Vec<(String, Vec<Value>)> = Vec::new();
    for (k, v) in pobj {
        if k == "$patch" || k == "$retainKeys" {
            continue;
        }
        if let Some(field) = k.strip_prefix("$setElementOrder/") {
            orders.push((field.to_string(), v.as_array().cloned().unwrap_or_default()));
            continue;
        }
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            let remove = v.as_array().cloned().unwrap_or_default();
            if let Some(list) = target.get_mut(field).and_then(Value::as_array_mut) {
                list.retain(|x| !remove.contains(x));
            }
            continue;
        }
        if k.starts_with('$') {
            return Err(ApiError::bad_request(format!(
                "unknown patch directive {k:?}"
            )));
        }
        let tobj = target.as_object_mut().expect("made an object above");
        if v.is_null() {
            tobj.remove(k);
            continue;
        }
        match v {
            Value::Object(inner)
                if inner.get("$patch").and_then(Value::as_str) == Some("delete") =>
            {
                tobj.remove(k);
            }
            Value::Object(_) => {
                let entry = tobj.entry(k.clone()).or_insert(Value::Null);
                path.push(k.clone());
                merge_map(entry, v, path)?;
                path.pop();
            }
            Value::Array(items) => {
                let strategy = merge_key(path, k);
                let entry = tobj.entry(k.clone()).or_insert(Value::Array(Vec::new()));
                path.push(k.clone());
                merge_list(entry, items, strategy, path)?;
                path.pop();
            }
            other => {
                tobj.insert(k.clone(), other.clone());
            }
        }
    }
    if let Some(retain) = pobj.get("$retainKeys").and_then(Value::as_array) {
        let keep: Vec<&str> = retain.iter().filter_map(Value::as_str).collect();
        if let Some(tobj) = target.as_object_mut() {
            tobj.retain(|k, _| keep.contains(&k.as_str()));
        }
    }
    for (field, order) in orders {
        let strategy = merge_key(path, &field);
        if let Some(list) = target.get_mut(&field).and_then(Value::as_array_mut) {
            reorder(list, &order, strategy);
        }
    }
    Ok(())
}

fn merge_list(
    target: &mut Value,
    items: &[Value],
    strategy: ListMerge,
    path: &mut Vec<String>,
) -> ApiResult<()> {
    if items
        .iter()
        .any(|i| i.get("$patch").and_then(Value::as_str) == Some("replace"))
    {
        *target = Value::Array(
            items
                .iter()
                .filter(|i| i.get("$patch").is_none())
                .cloned()
                .collect(),
        );
        return Ok(());
    }
    if !target.is_array() {
        *target = Value::Array(Vec::new());
    }
    let list = target.as_array_mut().expect("made an array above");
    match strategy {
        ListMerge::Replace => *list = items.to_vec(),
        ListMerge::PrimitiveSet => {
            for i in items {
                if !list.contains(i) {
                    list.push(i.clone());
                }
            }
        }
        ListMerge::Key(key) => {
            for item in items {
                let Some(kv) = key_of(item, key) else {
                    return Err(ApiError::bad_request(format!(
                        "map: {item} does not contain declared merge key: {key}"
                    )));
                };
                let pos = list
                    .iter()
                    .position(|x| key_of(x, key).as_ref() == Some(&kv));
                let delete = item.get("$patch").and_then(Value::as_str) == Some("delete");
                match (pos, delete) {
                    (Some(p), true) => {
                        list.remove(p);
                    }
                    (None, true) => {}
                    (Some(p), false) => merge_map(&mut list[p], item, path)?,
                    (None, false) => {
                        let mut fresh = Value::Object(Map::new());
                        merge_map(&mut fresh, item, path)?;
                        list.push(fresh);
                    }
                }
            }
        }
    }
    Ok(())
}

fn reorder(list: &mut Vec<Value>, order: &[Value], strategy: ListMerge) {
    let ident = |v: &Value| -> Value {
        match strategy {
            ListMerge::Key(k) => v.get(k).cloned().unwrap_or(Value::Null),
            _ => v.clone(),
        }
    };
    let wanted: Vec<Value> = order.iter().map(ident).collect();
    let mut ordered: Vec<Value> = Vec::with_capacity(list.len());
    for w in &wanted {
        if let Some(p) = list.iter().position(|x| &ident(x) == w) {
            ordered.push(list.remove(p));
        }
    }
    ordered.append(list);
    *list = ordered;
}

/// Operations one JSON patch may have, as kube-apiserver bounds them.
pub const MAX_JSON_PATCH_OPERATIONS: usize = 10_000;

/// The size of a value serialized as JSON, without building the text.
fn json_size(v: &Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 += b.len();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Count(0);
    let _ = serde_json::to_writer(&mut c, v);
    c.0
}

/// The top-level fields of the object that a patch may change, or None when it may
/// change any of them (a JSON patch of the root, a strategic merge patch's directives at
/// the top, an apply). Every other field keeps its stored value.
pub(crate) fn touched_fields(ty: PatchType, patch: &Value) -> Option<Vec<String>> {
    let mut keys: Vec<String> = Vec::new();
    let mut touch = |k: String| {
        if !keys.contains(&k) {
            keys.push(k);
        }
    };
    match ty {
        PatchType::Merge | PatchType::Strategic => {
            for k in patch.as_object()?.keys() {
                if k.starts_with('$') {
                    return None;
                }
                touch(k.clone());
            }
        }
        PatchType::Json => {
            for op in patch.as_array()? {
                // `from` too: a move takes its value away from there.
                for at in ["path", "from"] {
                    let Some(pointer) = op.get(at) else { continue };
                    let first = pointer.as_str()?.strip_prefix('/')?.split('/').next()?;
                    touch(first.replace("~1", "/").replace("~0", "~"));
                }
            }
        }
        PatchType::Apply => return None,
    }
    Some(keys)
}

/// Applies a patch of the given type to `target`.
pub fn apply_patch(ty: PatchType, target: &mut Value, patch: &Value) -> ApiResult<()> {
    apply_unchecked(ty, target, patch)?;
    // No object larger than a request may be: what a patch makes is bounded as a body is.
    let size = json_size(target);
    if size > crate::rest::MAX_BODY_BYTES {
        return Err(ApiError::TooLarge {
            size,
            limit: crate::rest::MAX_BODY_BYTES,
        });
    }
    Ok(())
}

fn apply_unchecked(ty: PatchType, target: &mut Value, patch: &Value) -> ApiResult<()> {
    match ty {
        PatchType::Merge => {
            json_patch::merge(target, patch);
            Ok(())
        }
        PatchType::Json => {
            let p: json_patch::Patch = serde_json::from_value(patch.clone())
                .map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}")))?;
            if p.0.len() > MAX_JSON_PATCH_OPERATIONS {
                return Err(ApiError::TooLarge {
                    size: p.0.len(),
                    limit: MAX_JSON_PATCH_OPERATIONS,
                });
            }
            // `copy` and `add` can double a document per operation: a few hundred bytes of
            // patch would otherwise build gigabytes before the size check at the end. The
            // result's size is bounded as it grows: each operation adds at most the size
            // of the value it puts in (removals are not credited, which only refuses
            // sooner a patch that moves that much around).
            let mut size = json_size(target);
            for op in p.0 {
                size += match &op {
                    json_patch::PatchOperation::Add(a) => json_size(&a.value),
                    json_patch::PatchOperation::Replace(r) => json_size(&r.value),
                    json_patch::PatchOperation::Copy(c) => {
                        target.pointer(&c.from.to_string()).map_or(0, json_size)
                    }
                    _ => 0,
                };
                if size > crate::rest::MAX_BODY_BYTES {
                    return Err(ApiError::TooLarge {
                        size,
                        limit: crate::rest::MAX_BODY_BYTES,
                    });
                }
                json_patch::patch(target, &[op]).map_err(|e| ApiError::Invalid {
                    group: String::new(),
                    kind: "JSONPatch".into(),
                    name: String::new(),
                    causes: vec![crate::error::FieldError {
                        field: String::new(),
                        reason: "FieldValueInvalid",
                        message: e.to_string(),
                    }],
                })?;
            }
            Ok(())
        }
        PatchType::Strategic | PatchType::Apply => strategic_merge(target, patch),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strategic_merge_merges_containers_by_name() {
        let mut pod = json!({"spec": {"containers": [
            {"name": "a", "image": "a:1", "env": [{"name": "X", "value": "1"}]},
            {"name": "b", "image": "b:1"}
        ]}, "metadata": {"finalizers": ["f1"]}});
        let patch = json!({
            "spec": {
                "$setElementOrder/containers": [{"name": "b"}, {"name": "a"}, {"name": "c"}],
                "containers": [
                    {"name": "a", "image": "a:2", "env": [{"name": "Y", "value": "2"}]},
                    {"name": "c", "image": "c:1"},
                    {"name": "b", "$patch": "delete"}
                ]
            },
            "metadata": {"finalizers": ["f2"]}
        });
        strategic_merge(&mut pod, &patch).unwrap();
        let names: Vec<_> = pod["spec"]["containers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, vec!["a", "c"]);
        assert_eq!(pod["spec"]["containers"][0]["image"], "a:2");
        assert_eq!(
            pod["spec"]["containers"][0]["env"]
                .as_array()
                .unwrap()
                .len(),
            2
        );
        assert_eq!(pod["metadata"]["finalizers"], json!(["f1", "f2"]));
    }

    #[test]
    fn directives() {
        let mut obj = json!({"spec": {"strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1}}, "args": ["x"]}});
        let patch = json!({"spec": {
            "strategy": {"$retainKeys": ["type"], "type": "Recreate", "rollingUpdate": null},
            "$deleteFromPrimitiveList/args": ["x"]
        }});
        strategic_merge(&mut obj, &patch).unwrap();
        assert_eq!(obj["spec"]["strategy"], json!({"type": "Recreate"}));
        assert_eq!(obj["spec"]["args"], json!([]));
        let mut obj = json!({"a": {"b": 1, "c": 2}});
        strategic_merge(&mut obj, &json!({"a": {"$patch": "replace", "d": 3}})).unwrap();
        assert_eq!(obj, json!({"a": {"d": 3}}));
    }

    #[test]
    fn json_patch_amplification_is_refused_as_it_grows() {
        let mut doc = json!({"metadata": {"name": "x"}, "data": {"a": "x".repeat(1000)}});
        // Each copy doubles `data`; 18 of them would be a quarter of a gigabyte.
        let mut ops = Vec::new();
        for i in 0..18 {
            ops.push(json!({"op": "copy", "from": "/data", "path": format!("/data/c{i}")}));
        }
        let err = apply_patch(PatchType::Json, &mut doc, &Value::Array(ops)).unwrap_err();
        assert!(matches!(err, ApiError::TooLarge { .. }), "{err:?}");
        assert!(json_size(&doc) < 4 << 20);
    }

    #[test]
    fn json_and_merge_patches() {
        let mut obj = json!({"a": 1, "b": {"c": 2}});
        apply_patch(
            PatchType::Merge,
            &mut obj,
            &json!({"b": {"c": null, "d": 4}}),
        )
        .unwrap();
        assert_eq!(obj, json!({"a": 1, "b": {"d": 4}}));
        apply_patch(
            PatchType::Json,
            &mut obj,
            &json!([{"op": "replace", "path": "/a", "value": 5}]),
        )
        .unwrap();
        assert_eq!(obj["a"], 5);
        assert!(apply_patch(
            PatchType::Json,
            &mut obj,
            &json!([{"op": "test", "path": "/a", "value": 6}])
        )
        .is_err());
    }

    #[test]
    fn a_patch_names_the_top_level_fields_it_may_change() {
        let touched = |ty, p: Value| touched_fields(ty, &p);
        assert_eq!(
            touched(
                PatchType::Merge,
                json!({"status": {"phase": "Running"}, "metadata": null})
            ),
            Some(vec!["metadata".to_string(), "status".to_string()])
        );
        assert_eq!(
            touched(
                PatchType::Json,
                json!([
                    {"op": "replace", "path": "/status/phase", "value": "Running"},
                    {"op": "move", "from": "/spec/a", "path": "/status/b"},
                    {"op": "add", "path": "/a~1b~0c", "value": 1},
                ])
            ),
            Some(vec![
                "status".to_string(),
                "spec".to_string(),
                "a/b~c".to_string()
            ])
        );
        // What may change anything: the root replaced, directives at the top, an apply,
        // and what is not a patch at all (refused later, when it is applied).
        for (ty, p) in [
            (
                PatchType::Json,
                json!([{"op": "replace", "path": "", "value": {}}]),
            ),
            (PatchType::Json, json!({"op": "add"})),
            (
                PatchType::Strategic,
                json!({"$patch": "replace", "spec": {}}),
            ),
            (
                PatchType::Strategic,
                json!({"$setElementOrder/x": [], "x": []}),
            ),
            (PatchType::Merge, json!([1])),
            (PatchType::Apply, json!({"spec": {}})),
        ] {
            assert_eq!(touched(ty, p.clone()), None, "{p}");
        }
    }
}
