//! `/version`, discovery (aggregated v2 and v2beta1, and the legacy per-group documents),
//! and the OpenAPI v3 documents kubectl reads before `create` and `apply`.

use serde_json::{json, Value};

use std::sync::Arc;

use crate::resources::{Body, Resource, Served};

/// The server minor version: kubectl's dispatcher on this machine runs `kubectl.1.<minor>`.
pub const MINOR: &str = "33";

pub fn version() -> Value {
    json!({
        "major": "1",
        "minor": MINOR,
        "gitVersion": format!("v1.{MINOR}.0-baton.{}", env!("CARGO_PKG_VERSION")),
        "gitCommit": "",
        "gitTreeState": "clean",
        "buildDate": "2026-01-01T00:00:00Z",
        "goVersion": "rust",
        "compiler": "rustc",
        "platform": "linux/amd64",
    })
}

fn subresource_kind(r: &Resource, sub: &str) -> (String, String, String) {
    match sub {
        "scale" => ("autoscaling".into(), "v1".into(), "Scale".into()),
        "binding" => ("".into(), "v1".into(), "Binding".into()),
        "eviction" => ("policy".into(), "v1".into(), "Eviction".into()),
        "token" => (
            "authentication.k8s.io".into(),
            "v1".into(),
            "TokenRequest".into(),
        ),
        "log" => ("".into(), "v1".into(), "".into()),
        "exec" => ("".into(), "v1".into(), "PodExecOptions".into()),
        "attach" => ("".into(), "v1".into(), "PodAttachOptions".into()),
        "portforward" => ("".into(), "v1".into(), "PodPortForwardOptions".into()),
        _ => (r.group.clone(), r.version.clone(), r.kind.clone()),
    }
}

fn sub_verbs(r: &Resource, sub: &str) -> Vec<&'static str> {
    if r.strategy.metrics().contains(&sub) {
        return vec!["get"];
    }
    match sub {
        "log" => vec!["get"],
        "exec" | "attach" | "portforward" => vec!["create", "get"],
        "binding" | "eviction" | "token" => vec!["create"],
        "finalize" => vec!["update"],
        _ => vec!["get", "patch", "update"],
    }
}

fn aggregated_resource(r: &Resource) -> Value {
    let subs: Vec<Value> = r
        .subresources
        .iter()
        .map(|s| {
            let (g, v, k) = subresource_kind(r, s);
            json!({"subresource": s, "responseKind": {"group": g, "version": v, "kind": k}, "verbs": sub_verbs(r, s)})
        })
        .collect();
    let mut out = json!({
        "resource": r.plural,
        "responseKind": {"group": r.group, "version": r.version, "kind": r.kind},
        "scope": if r.namespaced { "Namespaced" } else { "Cluster" },
        "singularResource": r.singular,
        "verbs": r.verbs(),
    });
    if !r.short_names.is_empty() {
        out["shortNames"] = json!(r.short_names);
    }
    if !r.categories.is_empty() {
        out["categories"] = json!(r.categories);
    }
    if !subs.is_empty() {
        out["subresources"] = json!(subs);
    }
    out
}

/// The aggregated discovery document of `/api` (core) or `/apis` (named groups).
pub fn aggregated(served: &Served, core: bool, api_version: &str) -> Value {
    let items: Vec<Value> = served
        .groups()
        .into_iter()
        .filter(|g| g.is_empty() == core)
        .map(|g| {
            let versions: Vec<Value> = served
                .versions_of(g)
                .into_iter()
                .map(|version| {
                    let rs: Vec<Value> = served
                        .in_group_version(g, version)
                        .map(|r| aggregated_resource(r))
                        .collect();
                    json!({"version": version, "resources": rs, "freshness": "Current"})
                })
                .collect();
            json!({
                "metadata": {"name": g, "creationTimestamp": null},
                "versions": versions,
            })
        })
        .collect();
    json!({"kind": "APIGroupDiscoveryList", "apiVersion": api_version, "metadata": {}, "items": items})
}

pub fn api_versions() -> Value {
    json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}]})
}

fn group_doc(served: &Served, g: &str) -> Value {
    let versions: Vec<Value> = served
        .versions_of(g)
        .into_iter()
        .map(|v| json!({"groupVersion": format!("{g}/{v}"), "version": v}))
        .collect();
    let preferred = versions.first().cloned().unwrap_or(Value::Null);
    json!({"kind": "APIGroup", "apiVersion": "v1", "name": g, "versions": versions, "preferredVersion": preferred})
}

pub fn api_group_list(served: &Served) -> Value {
    let groups: Vec<Value> = served
        .groups()
        .into_iter()
        .filter(|g| !g.is_empty())
        .map(|g| group_doc(served, g))
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

pub fn api_group(served: &Served, g: &str) -> Option<Value> {
    served
        .groups()
        .into_iter()
        .find(|x| *x == g && !g.is_empty())
        .map(|g| group_doc(served, g))
}

pub fn resource_list(served: &Served, group: &str, version: &str) -> Option<Value> {
    let mut out = Vec::new();
    for r in served.in_group_version(group, version) {
        let mut entry = json!({
            "name": r.plural, "singularName": r.singular, "namespaced": r.namespaced,
            "kind": r.kind, "verbs": r.verbs(),
        });
        if !r.short_names.is_empty() {
            entry["shortNames"] = json!(r.short_names);
        }
        if !r.categories.is_empty() {
            entry["categories"] = json!(r.categories);
        }
        out.push(entry);
        for s in &r.subresources {
            let (g, v, k) = subresource_kind(r, s);
            let mut e = json!({"name": format!("{}/{s}", r.plural), "singularName": "", "namespaced": r.namespaced, "kind": k, "verbs": sub_verbs(r, s)});
            if g != r.group || v != r.version {
                e["group"] = json!(g);
                e["version"] = json!(v);
            }
            out.push(e);
        }
    }
    if out.is_empty() {
        return None;
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": out}),
    )
}

/// The OpenAPI v3 index: one document per group-version.
pub fn openapi_index(served: &Served) -> Value {
    let mut paths = serde_json::Map::new();
    for g in served.groups() {
        for v in served.versions_of(g) {
            let rel = if g.is_empty() {
                format!("api/{v}")
            } else {
                format!("apis/{g}/{v}")
            };
            let url = format!("/openapi/v3/{rel}?hash={}", doc_hash(served, g, v));
            paths.insert(rel, json!({ "serverRelativeURL": url }));
        }
    }
    json!({"paths": paths})
}

/// Names a document's content for clients' caches: kubectl keeps OpenAPI documents by
/// this hash, so it must change whenever the document does. Built-in documents change
/// only with the binary; a custom one with its CRDs.
fn doc_hash(served: &Served, group: &str, version: &str) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    env!("CARGO_PKG_VERSION").hash(&mut h);
    group.hash(&mut h);
    version.hash(&mut h);
    for r in served.in_group_version(group, version) {
        r.plural.hash(&mut h);
        r.definition_id.hash(&mut h);
    }
    format!("{:016X}", h.finish())
}

/// OpenAPI component schemas by name.
type Schemas = serde_json::Map<String, Value>;

/// The OpenAPI schemas of a group-version's types and everything they refer to, in the
/// shape kube-apiserver publishes: references wrapped in `allOf` (so that descriptions
/// beside them count) and each kind tagged with its group-version-kind. Built-in types
/// come from k8s-openapi; a custom kind's is its CRD schema, with `apiVersion`, `kind`
/// and an ObjectMeta `metadata` added, as kube-apiserver publishes it.
fn component_schemas(
    served: &Served,
    group: &str,
    version: &str,
) -> (Schemas, Vec<(Arc<Resource>, String)>) {
    let mut generator = schemars::generate::SchemaSettings::openapi3().into_generator();
    let mut names = Vec::new();
    let mut custom = Vec::new();
    for r in served.in_group_version(group, version) {
        let name = match &r.body {
            Body::Typed { schema, .. } => schema(&mut generator)
                .get("$ref")
                .and_then(Value::as_str)
                .and_then(|s| s.rsplit('/').next())
                .unwrap_or_default()
                .to_string(),
            Body::Schema(schema) => {
                let meta = generator
                    .subschema_for::<k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>();
                let name = custom_schema_name(r);
                custom.push((name.clone(), custom_schema(schema, meta.as_value())));
                name
            }
        };
        names.push((r.clone(), name));
    }
    let mut defs = generator.take_definitions(true);
    defs.extend(custom);
    for v in defs.values_mut() {
        wrap_refs(v);
    }
    for (r, name) in &names {
        if let Some(s) = defs.get_mut(name) {
            s["x-kubernetes-group-version-kind"] =
                json!([{"group": r.group, "version": r.version, "kind": r.kind}]);
        }
    }
    (defs, names)
}

/// `com.example.v1.Widget` for `example.com/v1` Widget: the group reversed, as
/// kube-apiserver names CRD definitions.
fn custom_schema_name(r: &Resource) -> String {
    let group: Vec<&str> = r.group.split('.').rev().collect();
    format!("{}.{}.{}", group.join("."), r.version, r.kind)
}

fn custom_schema(schema: &Value, meta_ref: &Value) -> Value {
    let mut s = schema.clone();
    if !s.get("properties").is_some_and(Value::is_object) {
        s["properties"] = json!({});
    }
    let props = &mut s["properties"];
    props["apiVersion"] = json!({"type": "string", "description": "APIVersion defines the versioned schema of this representation of an object."});
    props["kind"] = json!({"type": "string", "description": "Kind is a string value representing the REST resource this object represents."});
    let mut meta = json!({"description": "Standard object's metadata.", "allOf": [meta_ref]});
    if let Some(m) = props.get("metadata").and_then(Value::as_object) {
        for (k, v) in m {
            if k != "type" {
                meta[k] = v.clone();
            }
        }
    }
    props["metadata"] = meta;
    s
}

fn wrap_refs(v: &mut Value) {
    match v {
        Value::Object(m) => {
            // Only a reference: a schema of JSON schemas has a *property* named `$ref`.
            if m.get("$ref").is_some_and(Value::is_string) && m.len() > 1 {
                let r = m.remove("$ref").expect("checked above");
                m.insert("allOf".into(), json!([{"$ref": r}]));
            }
            for child in m.values_mut() {
                wrap_refs(child);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(wrap_refs),
        _ => {}
    }
}

/// The OpenAPI v3 document of one group-version: every path with its operations. PATCH
/// operations carry `x-kubernetes-group-version-kind` and the `fieldValidation` parameter,
/// which is what tells kubectl to leave validation to the server.
pub fn openapi_doc(served: &Served, group: &str, version: &str) -> Option<Value> {
    let mut paths = serde_json::Map::new();
    let (schemas, names) = component_schemas(served, group, version);
    let field_validation = json!({"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": true}});
    for r in served.in_group_version(group, version) {
        let gvk = json!({"group": r.group, "version": r.version, "kind": r.kind});
        let name = names
            .iter()
            .find(|(x, _)| Arc::ptr_eq(x, r))
            .map(|(_, n)| n.clone())
            .unwrap_or_default();
        let schema_ref = json!({"$ref": format!("#/components/schemas/{name}")});
        let content = json!({"application/json": {"schema": schema_ref}});
        let op = |verb: &str, action: &str| {
            json!({
                "operationId": format!("{verb}{}", r.kind),
                "x-kubernetes-action": action,
                "x-kubernetes-group-version-kind": gvk,
                "parameters": [field_validation],
                "requestBody": {"content": content},
                "responses": {"200": {"description": "OK", "content": content}},
            })
        };
        let base = r.group_version_path();
        let (coll, item) = if r.namespaced {
            (
                format!("{base}/namespaces/{{namespace}}/{}", r.plural),
                format!("{base}/namespaces/{{namespace}}/{}/{{name}}", r.plural),
            )
        } else {
            (
                format!("{base}/{}", r.plural),
                format!("{base}/{}/{{name}}", r.plural),
            )
        };
        paths.insert(
            coll,
            json!({"post": op("create", "post"), "get": op("list", "list")}),
        );
        paths.insert(item.clone(), json!({"get": op("read", "get"), "put": op("replace", "put"), "patch": op("patch", "patch"), "delete": op("delete", "delete")}));
        for s in r
            .subresources
            .iter()
            .filter(|s| matches!(s.as_str(), "status" | "scale"))
        {
            paths.insert(format!("{item}/{s}"), json!({"get": op("read", "get"), "put": op("replace", "put"), "patch": op("patch", "patch")}));
        }
    }
    if paths.is_empty() {
        return None;
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Baton", "version": format!("v1.{MINOR}.0")},
        "paths": paths,
        "components": {"schemas": schemas},
    }))
}
