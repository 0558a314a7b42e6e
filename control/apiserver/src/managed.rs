//! Field management and server-side apply.
//!
//! Each write records, in `metadata.managedFields`, which fields its manager set, in
//! Kubernetes' FieldsV1 form (`{"f:spec": {"f:replicas": {}}}`, list items by merge key as
//! `k:{"name":"web"}`, set members as `v:"x"`). Server-side apply uses these sets:
//! - an apply that sets a field another manager owns, to a different value, is a conflict
//!   (409) unless forced, in which case the field changes hands;
//! - a field the applier set before and no longer sets is removed, unless someone else
//!   owns it too;
//! - an apply to an absent object creates it.

use std::collections::BTreeSet;

use axum::http::StatusCode;
use axum::response::Response;
use serde_json::{json, Map, Value};

use crate::error::{ApiError, ApiResult, FieldError};
use crate::objects::{Objects, ReadAt};
use crate::patch::{merge_key, strategic_merge, ListMerge};
use crate::rest::{self, Request};

/// A field path as FieldsV1 segments.
type Path = Vec<String>;

/// Fields that belong to the system, never to a manager.
fn skipped(path: &[String]) -> bool {
    match path {
        [a] => a == "f:apiVersion" || a == "f:kind" || a == "f:status",
        [m, f] if m == "f:metadata" => matches!(
            f.as_str(),
            "f:name"
                | "f:namespace"
                | "f:uid"
                | "f:resourceVersion"
                | "f:creationTimestamp"
                | "f:generation"
                | "f:managedFields"
                | "f:deletionTimestamp"
                | "f:deletionGracePeriodSeconds"
                | "f:selfLink"
        ),
        _ => false,
    }
}

fn field_names(path: &[String]) -> Vec<String> {
    path.iter()
        .filter_map(|s| s.strip_prefix("f:").map(String::from))
        .collect()
}

/// Every leaf field an object sets.
pub fn leaf_paths(obj: &Value) -> BTreeSet<Path> {
    let mut out = BTreeSet::new();
    walk(obj, &mut Vec::new(), &mut out);
    out
}

fn walk(v: &Value, path: &mut Path, out: &mut BTreeSet<Path>) {
    if skipped(path) {
        return;
    }
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, child) in m {
                path.push(format!("f:{k}"));
                walk(child, path, out);
                path.pop();
            }
        }
        Value::Array(items) if !items.is_empty() => {
            let names = field_names(path);
            let (parent, field) = match names.split_last() {
                Some((f, p)) => (p.to_vec(), f.clone()),
                None => (Vec::new(), String::new()),
            };
            match merge_key(&parent, &field) {
                ListMerge::Key(key) => {
                    for item in items {
                        let Some(kv) = item.get(key) else {
                            out.insert(path.clone());
                            return;
                        };
                        path.push(format!("k:{}", json!({key: kv})));
                        walk(item, path, out);
                        path.pop();
                    }
                }
                ListMerge::PrimitiveSet => {
                    for item in items {
                        path.push(format!("v:{item}"));
                        out.insert(path.clone());
                        path.pop();
                    }
                }
                ListMerge::Replace => {
                    out.insert(path.clone());
                }
            }
        }
        _ => {
            out.insert(path.clone());
        }
    }
}

/// The FieldsV1 document of a set of paths.
pub fn to_fields_v1(paths: &BTreeSet<Path>) -> Value {
    let mut root = Map::new();
    for p in paths {
        let mut node = &mut root;
        for seg in p {
            node = node
                .entry(seg.clone())
                .or_insert_with(|| json!({}))
                .as_object_mut()
                .expect("nodes are objects");
        }
    }
    Value::Object(root)
}

/// The FieldsV1 of everything an object sets.
pub fn fields_v1(obj: &Value) -> Value {
    to_fields_v1(&leaf_paths(obj))
}

/// The set of paths in a FieldsV1 document.
pub fn from_fields_v1(v: &Value) -> BTreeSet<Path> {
    fn go(v: &Value, path: &mut Path, out: &mut BTreeSet<Path>) {
        match v.as_object() {
            Some(m) if !m.is_empty() => {
                for (k, child) in m {
                    if k == "." {
                        out.insert(path.clone());
                        continue;
                    }
                    path.push(k.clone());
                    go(child, path, out);
                    path.pop();
                }
            }
            _ => {
                if !path.is_empty() {
                    out.insert(path.clone());
                }
            }
        }
    }
    let mut out = BTreeSet::new();
    go(v, &mut Vec::new(), &mut out);
    out
}

/// The value at a path, if present.
fn value_at<'a>(obj: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut cur = obj;
    for seg in path {
        if let Some(f) = seg.strip_prefix("f:") {
            cur = cur.get(f)?;
        } else if let Some(k) = seg.strip_prefix("k:") {
            let key: Map<String, Value> = serde_json::from_str(k).ok()?;
            cur = cur
                .as_array()?
                .iter()
                .find(|item| key.iter().all(|(kk, kv)| item.get(kk) == Some(kv)))?;
        } else if let Some(v) = seg.strip_prefix("v:") {
            let want: Value = serde_json::from_str(v).ok()?;
            cur = cur.as_array()?.iter().find(|item| **item == want)?;
        } else {
            return None;
        }
    }
    Some(cur)
}

/// Removes the field at a path.
fn remove_at(obj: &mut Value, path: &[String]) {
    let Some((last, parent)) = path.split_last() else {
        return;
    };
    let mut cur = obj;
    for seg in parent {
        let next = if let Some(f) = seg.strip_prefix("f:") {
            cur.get_mut(f)
        } else if let Some(k) = seg.strip_prefix("k:") {
            let Ok(key) = serde_json::from_str::<Map<String, Value>>(k) else {
                return;
            };
            cur.as_array_mut().and_then(|a| {
                a.iter_mut()
                    .find(|item| key.iter().all(|(kk, kv)| item.get(kk) == Some(kv)))
            })
        } else {
            None
        };
        match next {
            Some(n) => cur = n,
            None => return,
        }
    }
    if let Some(f) = last.strip_prefix("f:") {
        if let Some(m) = cur.as_object_mut() {
            m.remove(f);
        }
    } else if let Some(k) = last.strip_prefix("k:") {
        if let (Ok(key), Some(a)) = (
            serde_json::from_str::<Map<String, Value>>(k),
            cur.as_array_mut(),
        ) {
            a.retain(|item| !key.iter().all(|(kk, kv)| item.get(kk) == Some(kv)));
        }
    } else if let Some(v) = last.strip_prefix("v:") {
        if let (Ok(want), Some(a)) = (serde_json::from_str::<Value>(v), cur.as_array_mut()) {
            a.retain(|item| *item != want);
        }
    }
}

fn display(path: &[String]) -> String {
    let mut s = String::new();
    for seg in path {
        if let Some(f) = seg.strip_prefix("f:") {
            s.push('.');
            s.push_str(f);
        } else if let Some(k) = seg.strip_prefix("k:") {
            let key: Map<String, Value> = serde_json::from_str(k).unwrap_or_default();
            let parts: Vec<String> = key.iter().map(|(kk, kv)| format!("{kk}={kv}")).collect();
            s.push_str(&format!("[{}]", parts.join(",")));
        } else if let Some(v) = seg.strip_prefix("v:") {
            s.push_str(&format!("[={v}]"));
        }
    }
    s
}

/// Server-side apply (PATCH with `application/apply-patch+yaml`).
pub async fn apply(
    objects: &Objects,
    req: &Request,
    body: Value,
    dups: Vec<String>,
) -> ApiResult<Response> {
    let res = &*req.target.res;
    let name = req.target.name.clone().unwrap_or_default();
    let manager = req
        .query
        .get("fieldManager")
        .cloned()
        .filter(|m| !m.is_empty())
        .ok_or_else(|| ApiError::Invalid {
            group: res.group.clone(),
            kind: res.kind.clone(),
            name: name.clone(),
            causes: vec![FieldError::required("fieldManager")],
        })?;
    let force = req.query.get("force").is_some_and(|f| f == "true");
    if !body.is_object() {
        return Err(ApiError::bad_request(
            "the apply configuration must be an object",
        ));
    }
    if let Some(n) = body.pointer("/metadata/name").and_then(Value::as_str) {
        if n != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({n}) does not match the name on the URL ({name})"
            )));
        }
    }
    let (typed, warnings) = rest::typecheck(req, res, &body, &dups)?;
    let applied = leaf_paths(&body);
    let api_version = res.api_version();
    let existing = objects
        .get(
            res,
            req.target.ns.as_deref().filter(|_| res.namespaced),
            &name,
            ReadAt::Latest,
        )
        .await?;
    if existing.is_none() {
        let mut obj = typed.clone();
        obj["metadata"]["name"] = json!(name);
        // The creating apply owns exactly what it applied, recorded in the create itself:
        // a second write would race whatever writes the new object first (a controller
        // writing its status) and fail with a conflict the client never caused.
        set_entry(&mut obj, &manager, "Apply", &api_version, &applied);
        let created = rest::create_object(objects, req, obj, "Apply").await?;
        return Ok(rest::object_response(
            req,
            StatusCode::CREATED,
            &created,
            &warnings,
        ));
    }
    let stored = rest::guaranteed_update(objects, req, &name, |current, _rev| {
        let mut entries: Vec<Value> = current
            .pointer("/metadata/managedFields")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let mut conflicts: Vec<(String, String)> = Vec::new();
        let mut previous: BTreeSet<Path> = BTreeSet::new();
        for e in entries.iter_mut() {
            let m = e
                .get("manager")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let op = e.get("operation").and_then(Value::as_str).unwrap_or("");
            let set = from_fields_v1(e.get("fieldsV1").unwrap_or(&Value::Null));
            if m == manager && op == "Apply" {
                previous = set;
                continue;
            }
            let mut keep = set.clone();
            for p in set.intersection(&applied) {
                if value_at(current, p) != value_at(&body, p) {
                    if force {
                        keep.remove(p);
                    } else {
                        conflicts.push((m.clone(), display(p)));
                    }
                }
            }
            e["fieldsV1"] = to_fields_v1(&keep);
        }
        if !conflicts.is_empty() {
            let list: Vec<String> = conflicts
                .iter()
                .map(|(m, f)| format!("- {m}: {f}"))
                .collect();
            return Err(ApiError::Conflict {
                group: res.group.clone(),
                resource: res.plural.clone(),
                name: name.clone(),
                message: format!(
                    "Apply failed with {} conflict{}: conflict with {}\nPlease review the fields above--they currently have other managers. Use force to take ownership.\n{}",
                    conflicts.len(),
                    if conflicts.len() == 1 { "" } else { "s" },
                    conflicts.iter().map(|(m, _)| format!("{m:?}")).collect::<BTreeSet<_>>().into_iter().collect::<Vec<_>>().join(", "),
                    list.join("\n")
                ),
            });
        }
        entries.retain(|e| {
            let empty = e
                .get("fieldsV1")
                .is_none_or(|f| f.as_object().is_none_or(Map::is_empty));
            let mine = e.get("manager").and_then(Value::as_str) == Some(manager.as_str())
                && e.get("operation").and_then(Value::as_str) == Some("Apply");
            !empty && !mine
        });
        let mut merged = current.clone();
        strategic_merge(&mut merged, &typed)?;
        // Fields this manager applied before, applies no more, and nobody else owns.
        let others: BTreeSet<Path> = entries
            .iter()
            .flat_map(|e| from_fields_v1(e.get("fieldsV1").unwrap_or(&Value::Null)))
            .collect();
        for p in previous.difference(&applied) {
            if !others.contains(p) {
                remove_at(&mut merged, p);
            }
        }
        merged["metadata"]["managedFields"] = Value::Array(entries);
        set_entry(&mut merged, &manager, "Apply", &api_version, &applied);
        let (typed_merged, _) = rest::typecheck(req, res, &merged, &[])?;
        let mut new = rest::prepare_update(res, current, typed_merged, req.target.sub.as_deref())?;
        new["metadata"]["managedFields"] = merged["metadata"]["managedFields"].clone();
        Ok(rest::Change::Write(new))
    })
    .await?;
    Ok(rest::object_response(
        req,
        StatusCode::OK,
        &stored,
        &warnings,
    ))
}

/// Records a non-apply write by `manager`: it takes over the fields it changed (all of
/// them on create), and every other manager loses those fields, as Kubernetes does.
pub fn record_update(
    new: &mut Value,
    old: Option<&Value>,
    manager: Option<&str>,
    api_version: &str,
    sub: Option<&str>,
) {
    // A write without managedFields (absent, null or an empty list) keeps the stored
    // ones, as Kubernetes does, so that a client that never saw them (an informer that
    // trims them, an old client) does not strip everyone's ownership; `[{}]` resets them.
    let given = new
        .pointer("/metadata/managedFields")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    if given == 0 {
        if let Some(kept) = old.and_then(|o| o.pointer("/metadata/managedFields")) {
            if let Some(meta) = new.get_mut("metadata").and_then(Value::as_object_mut) {
                meta.insert("managedFields".into(), kept.clone());
            }
        }
    }
    let Some(manager) = manager.filter(|m| !m.is_empty()) else {
        return;
    };
    let now_paths = leaf_paths(new);
    let changed: BTreeSet<Path> = match old {
        None => now_paths.clone(),
        Some(o) => now_paths
            .iter()
            .filter(|p| value_at(o, p) != value_at(new, p))
            .cloned()
            .collect(),
    };
    let mut list: Vec<Value> = new
        .pointer("/metadata/managedFields")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut mine: BTreeSet<Path> = BTreeSet::new();
    for e in list.iter_mut() {
        let is_mine = e.get("manager").and_then(Value::as_str) == Some(manager)
            && e.get("operation").and_then(Value::as_str) == Some("Update")
            && e.get("subresource").and_then(Value::as_str) == sub;
        let set = from_fields_v1(e.get("fieldsV1").unwrap_or(&Value::Null));
        if is_mine {
            mine = set.intersection(&now_paths).cloned().collect();
            continue;
        }
        let keep: BTreeSet<Path> = set
            .into_iter()
            .filter(|p| !changed.contains(p) && now_paths.contains(p))
            .collect();
        e["fieldsV1"] = to_fields_v1(&keep);
    }
    list.retain(|e| {
        let is_mine = e.get("manager").and_then(Value::as_str) == Some(manager)
            && e.get("operation").and_then(Value::as_str) == Some("Update")
            && e.get("subresource").and_then(Value::as_str) == sub;
        !is_mine
            && e.get("fieldsV1")
                .is_some_and(|f| f.as_object().is_some_and(|m| !m.is_empty()))
    });
    mine.extend(changed);
    if !mine.is_empty() {
        let mut entry = json!({
            "manager": manager, "operation": "Update", "apiVersion": api_version, "time": rest::now(),
            "fieldsType": "FieldsV1", "fieldsV1": to_fields_v1(&mine),
        });
        if let Some(s) = sub {
            entry["subresource"] = json!(s);
        }
        list.push(entry);
    }
    new["metadata"]["managedFields"] = Value::Array(list);
}

fn set_entry(obj: &mut Value, manager: &str, op: &str, api_version: &str, paths: &BTreeSet<Path>) {
    let mut list: Vec<Value> = obj
        .pointer("/metadata/managedFields")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    list.retain(|e| {
        !(e.get("manager").and_then(Value::as_str) == Some(manager)
            && e.get("operation").and_then(Value::as_str) == Some(op))
    });
    list.push(json!({
        "manager": manager, "operation": op, "apiVersion": api_version, "time": rest::now(),
        "fieldsType": "FieldsV1", "fieldsV1": to_fields_v1(paths),
    }));
    obj["metadata"]["managedFields"] = Value::Array(list);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_update_without_managed_fields_keeps_the_stored_ones_and_a_single_empty_entry_resets_them()
    {
        let mut old = json!({"metadata": {"name": "a"}, "spec": {"x": 1, "y": 1}});
        record_update(&mut old, None, Some("maker"), "v1", None);
        let mut new = json!({"metadata": {"name": "a"}, "spec": {"x": 1, "y": 2}});
        record_update(&mut new, Some(&old), Some("editor"), "v1", None);
        let managers: Vec<&str> = new["metadata"]["managedFields"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["manager"].as_str().unwrap())
            .collect();
        assert_eq!(managers, ["maker", "editor"], "maker still owns spec.x");
        let mut reset =
            json!({"metadata": {"name": "a", "managedFields": [{}]}, "spec": {"x": 1, "y": 2}});
        record_update(&mut reset, Some(&new), None, "v1", None);
        assert_eq!(
            reset["metadata"]["managedFields"],
            json!([{}]),
            "no manager: as sent"
        );
        // A writer that changes nothing owns nothing new: reset means empty.
        record_update(&mut reset, Some(&new), Some("editor"), "v1", None);
        assert_eq!(reset["metadata"]["managedFields"], json!([]));
    }

    #[test]
    fn paths_roundtrip_through_fields_v1() {
        let obj = json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "x", "labels": {"app": "x"}, "finalizers": ["a"]},
            "spec": {"replicas": 2, "template": {"spec": {"containers": [{"name": "web", "image": "i", "args": ["a", "b"]}]}}}
        });
        let paths = leaf_paths(&obj);
        let shown: Vec<String> = paths.iter().map(|p| display(p)).collect();
        assert!(shown.contains(&".spec.replicas".to_string()));
        assert!(shown.contains(&".spec.template.spec.containers[name=\"web\"].image".to_string()));
        assert!(shown.contains(&".spec.template.spec.containers[name=\"web\"].args".to_string()));
        assert!(shown.contains(&".metadata.finalizers[=\"a\"]".to_string()));
        assert!(!shown.contains(&".metadata.name".to_string()));
        assert_eq!(from_fields_v1(&to_fields_v1(&paths)), paths);
        for p in &paths {
            assert!(value_at(&obj, p).is_some(), "{}", display(p));
        }
        let mut o = obj.clone();
        let image = paths
            .iter()
            .find(|p| display(p).ends_with(".image"))
            .unwrap();
        remove_at(&mut o, image);
        assert!(o
            .pointer("/spec/template/spec/containers/0/image")
            .is_none());
    }
}
