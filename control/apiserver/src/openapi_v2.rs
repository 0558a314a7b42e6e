//! `/openapi/v2`: the whole API as one Swagger 2.0 document, in JSON or protobuf.
//!
//! Clients that predate OpenAPI v3, and kubectl when it falls back (`kubectl explain
//! --output plaintext-openapiv2`, or a server without v3), read this. It is made from the
//! same per-group-version documents as `/openapi/v3` ([`crate::discovery::openapi_doc`]):
//! definitions are the v3 component schemas (references rewritten to `#/definitions/`),
//! and each operation is rewritten to v2's shape (a body parameter, a response schema).
//!
//! client-go asks for protobuf only (`application/com.github.proto-openapi.spec.v2@v1.0+protobuf`):
//! the gnostic `openapi.v2.Document` message, written here field by field. Extensions
//! (`x-kubernetes-*`) travel as YAML strings, as gnostic carries them; JSON is YAML.

use std::sync::{Arc, Mutex};

use serde_json::{json, Map, Value};

use crate::discovery::openapi_doc;
use crate::resources::Served;

/// The media type client-go asks for.
pub const PROTOBUF: &str = "application/com.github.proto-openapi.spec.v2.v1.0+protobuf";

/// The document in both encodings, made once per registry snapshot (the served set only
/// changes when a CRD does).
pub fn cached(served: &Served) -> Arc<(Value, Vec<u8>)> {
    type Cache = Option<(Served, Arc<(Value, Vec<u8>)>)>;
    static CACHE: Mutex<Cache> = Mutex::new(None);
    let mut c = CACHE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((s, doc)) = c.as_ref() {
        if s.same(served) {
            return doc.clone();
        }
    }
    let json = document(served);
    let pb = protobuf(&json);
    let doc = Arc::new((json, pb));
    *c = Some((served.clone(), doc.clone()));
    doc
}

/// The Swagger 2.0 document of everything served.
pub fn document(served: &Served) -> Value {
    let mut paths = Map::new();
    let mut definitions = Map::new();
    for g in served.groups() {
        for v in served.versions_of(g) {
            let Some(doc) = openapi_doc(served, g, v) else {
                continue;
            };
            for (name, schema) in doc
                .pointer("/components/schemas")
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
            {
                let mut s = schema.clone();
                to_v2_schema(&mut s);
                definitions.insert(name.clone(), s);
            }
            for (path, item) in doc
                .get("paths")
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
            {
                let mut ops = Map::new();
                for (method, op) in item.as_object().into_iter().flatten() {
                    ops.insert(method.clone(), to_v2_operation(op));
                }
                paths.insert(path.clone(), Value::Object(ops));
            }
        }
    }
    json!({
        "swagger": "2.0",
        "info": {"title": "Baton", "version": crate::discovery::version()["gitVersion"]},
        "paths": paths,
        "definitions": definitions,
    })
}

fn to_v2_schema(v: &mut Value) {
    match v {
        Value::Object(m) => {
            // v2 has no `nullable`; a missing value is already allowed.
            m.remove("nullable");
            // v3's `allOf: [{$ref}]` (a reference with a description beside it) is a plain
            // `$ref` in v2, where kube-openapi's readers follow it.
            let single = m
                .get("allOf")
                .and_then(Value::as_array)
                .filter(|a| a.len() == 1)
                .and_then(|a| a[0].get("$ref"))
                .cloned();
            if let Some(r) = single {
                m.remove("allOf");
                m.insert("$ref".into(), r);
            }
            if let Some(Value::String(r)) = m.get_mut("$ref") {
                if let Some(name) = r.strip_prefix("#/components/schemas/") {
                    *r = format!("#/definitions/{name}");
                }
            }
            for child in m.values_mut() {
                to_v2_schema(child);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(to_v2_schema),
        _ => {}
    }
}

fn to_v2_operation(op: &Value) -> Value {
    let schema = |ptr: &str| {
        op.pointer(ptr).cloned().map(|mut s| {
            to_v2_schema(&mut s);
            s
        })
    };
    let mut params: Vec<Value> = op
        .get("parameters")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|p| {
            json!({"name": p["name"], "in": p["in"], "type": p.pointer("/schema/type").cloned().unwrap_or(json!("string")),
                   "uniqueItems": p.pointer("/schema/uniqueItems").cloned().unwrap_or(json!(false))})
        })
        .collect();
    if let Some(body) = schema("/requestBody/content/application~1json/schema") {
        params.push(json!({"name": "body", "in": "body", "required": true, "schema": body}));
    }
    let mut out = json!({
        "operationId": op["operationId"],
        "consumes": ["application/json", "application/yaml", "application/vnd.kubernetes.protobuf"],
        "produces": ["application/json", "application/yaml", "application/vnd.kubernetes.protobuf"],
        "parameters": params,
        "responses": {"200": {"description": "OK"}},
    });
    if let Some(s) = schema("/responses/200/content/application~1json/schema") {
        out["responses"]["200"]["schema"] = s;
    }
    for (k, v) in op.as_object().into_iter().flatten() {
        if k.starts_with("x-") {
            out[k] = v.clone();
        }
    }
    out
}

/// Protobuf wire encoding, just what the gnostic messages need.
#[derive(Default)]
struct Pb(Vec<u8>);

impl Pb {
    fn varint(&mut self, mut n: u64) {
        while n >= 0x80 {
            self.0.push((n as u8) | 0x80);
            n >>= 7;
        }
        self.0.push(n as u8);
    }
    fn key(&mut self, tag: u32, wire: u8) {
        self.varint(u64::from(tag) << 3 | u64::from(wire));
    }
    fn bytes(&mut self, tag: u32, b: &[u8]) {
        self.key(tag, 2);
        self.varint(b.len() as u64);
        self.0.extend_from_slice(b);
    }
    fn string(&mut self, tag: u32, s: &str) {
        if !s.is_empty() {
            self.bytes(tag, s.as_bytes());
        }
    }
    fn message(&mut self, tag: u32, f: impl FnOnce(&mut Pb)) {
        let mut inner = Pb::default();
        f(&mut inner);
        self.bytes(tag, &inner.0);
    }
    fn uint(&mut self, tag: u32, n: u64) {
        if n != 0 {
            self.key(tag, 0);
            self.varint(n);
        }
    }
    fn boolean(&mut self, tag: u32, b: bool) {
        self.uint(tag, u64::from(b));
    }
    fn double(&mut self, tag: u32, d: f64) {
        self.key(tag, 1);
        self.0.extend_from_slice(&d.to_le_bytes());
    }
}

fn str_of(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

/// `Any { yaml }`: a value as gnostic carries what it has no field for.
fn any(pb: &mut Pb, tag: u32, v: &Value) {
    pb.message(tag, |a| a.string(2, &v.to_string()));
}

/// The `x-` keys of an object, as `NamedAny`s.
fn extensions(pb: &mut Pb, tag: u32, m: &Map<String, Value>) {
    for (k, v) in m.iter().filter(|(k, _)| k.starts_with("x-")) {
        pb.message(tag, |n| {
            n.string(1, k);
            any(n, 2, v);
        });
    }
}

fn schema(pb: &mut Pb, s: &Value) {
    let Some(m) = s.as_object() else { return };
    let text = |k: &str| m.get(k).map(str_of).unwrap_or("");
    let int = |k: &str| m.get(k).and_then(Value::as_u64).unwrap_or(0);
    pb.string(1, text("$ref"));
    pb.string(2, text("format"));
    pb.string(3, text("title"));
    pb.string(4, text("description"));
    if let Some(d) = m.get("default") {
        any(pb, 5, d);
    }
    for (k, tag) in [("multipleOf", 6), ("maximum", 7), ("minimum", 9)] {
        if let Some(x) = m.get(k).and_then(Value::as_f64) {
            pb.double(tag, x);
        }
    }
    pb.boolean(
        8,
        m.get("exclusiveMaximum").and_then(Value::as_bool) == Some(true),
    );
    pb.boolean(
        10,
        m.get("exclusiveMinimum").and_then(Value::as_bool) == Some(true),
    );
    for (k, tag) in [
        ("maxLength", 11),
        ("minLength", 12),
        ("maxItems", 14),
        ("minItems", 15),
        ("maxProperties", 17),
        ("minProperties", 18),
    ] {
        pb.uint(tag, int(k));
    }
    pb.string(13, text("pattern"));
    pb.boolean(
        16,
        m.get("uniqueItems").and_then(Value::as_bool) == Some(true),
    );
    for r in m
        .get("required")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        pb.string(19, str_of(r));
    }
    for e in m
        .get("enum")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        any(pb, 20, e);
    }
    match m.get("additionalProperties") {
        Some(Value::Bool(b)) => pb.message(21, |a| {
            a.key(2, 0);
            a.varint(u64::from(*b));
        }),
        Some(v @ Value::Object(_)) => pb.message(21, |a| a.message(1, |s| schema(s, v))),
        _ => {}
    }
    if let Some(t) = m.get("type") {
        pb.message(22, |ti| match t {
            Value::Array(ts) => ts.iter().for_each(|t| ti.string(1, str_of(t))),
            t => ti.string(1, str_of(t)),
        });
    }
    if let Some(items) = m.get("items") {
        pb.message(23, |ii| match items {
            Value::Array(xs) => xs.iter().for_each(|x| ii.message(1, |s| schema(s, x))),
            x => ii.message(1, |s| schema(s, x)),
        });
    }
    for a in m
        .get("allOf")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        pb.message(24, |s| schema(s, a));
    }
    if let Some(props) = m.get("properties").and_then(Value::as_object) {
        pb.message(25, |p| {
            for (name, v) in props {
                p.message(1, |n| {
                    n.string(1, name);
                    n.message(2, |s| schema(s, v));
                });
            }
        });
    }
    pb.boolean(27, m.get("readOnly").and_then(Value::as_bool) == Some(true));
    if let Some(e) = m.get("example") {
        any(pb, 30, e);
    }
    extensions(pb, 31, m);
}

fn operation(pb: &mut Pb, op: &Value) {
    let Some(m) = op.as_object() else { return };
    pb.string(5, m.get("operationId").map(str_of).unwrap_or(""));
    for (k, tag) in [("produces", 6), ("consumes", 7)] {
        for t in m.get(k).and_then(Value::as_array).into_iter().flatten() {
            pb.string(tag, str_of(t));
        }
    }
    for p in m
        .get("parameters")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        // ParametersItem.parameter: a body, or a query parameter.
        pb.message(8, |item| {
            item.message(1, |param| {
                if p["in"] == "body" {
                    param.message(1, |b| {
                        b.string(2, str_of(&p["name"]));
                        b.string(3, "body");
                        b.boolean(4, p["required"] == true);
                        b.message(5, |s| schema(s, &p["schema"]));
                    });
                } else {
                    param.message(2, |nb| {
                        nb.message(3, |q| {
                            q.string(2, str_of(&p["in"]));
                            q.string(4, str_of(&p["name"]));
                            q.string(6, str_of(&p["type"]));
                            q.boolean(20, p["uniqueItems"] == true);
                        });
                    });
                }
            });
        });
    }
    if let Some(responses) = m.get("responses").and_then(Value::as_object) {
        pb.message(9, |rs| {
            for (code, r) in responses {
                rs.message(1, |named| {
                    named.string(1, code);
                    named.message(2, |rv| {
                        rv.message(1, |resp| {
                            resp.string(1, str_of(&r["description"]));
                            if let Some(s) = r.get("schema") {
                                resp.message(2, |si| si.message(1, |x| schema(x, s)));
                            }
                        });
                    });
                });
            }
        });
    }
    extensions(pb, 13, m);
}

/// The gnostic `openapi.v2.Document` of a Swagger 2.0 document.
pub fn protobuf(doc: &Value) -> Vec<u8> {
    let mut pb = Pb::default();
    pb.string(1, str_of(&doc["swagger"]));
    pb.message(2, |info| {
        info.string(1, str_of(&doc["info"]["title"]));
        info.string(2, str_of(&doc["info"]["version"]));
    });
    pb.message(8, |paths| {
        for (path, item) in doc["paths"].as_object().into_iter().flatten() {
            paths.message(2, |named| {
                named.string(1, path);
                named.message(2, |pi| {
                    for (method, tag) in [
                        ("get", 2),
                        ("put", 3),
                        ("post", 4),
                        ("delete", 5),
                        ("patch", 8),
                    ] {
                        if let Some(op) = item.get(method) {
                            pi.message(tag, |o| operation(o, op));
                        }
                    }
                });
            });
        }
    });
    pb.message(9, |defs| {
        for (name, s) in doc["definitions"].as_object().into_iter().flatten() {
            defs.message(1, |named| {
                named.string(1, name);
                named.message(2, |x| schema(x, s));
            });
        }
    });
    pb.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_and_fields_are_written_as_protobuf_does() {
        let mut pb = Pb::default();
        pb.uint(1, 300);
        pb.string(2, "hi");
        assert_eq!(pb.0, [0x08, 0xac, 0x02, 0x12, 0x02, b'h', b'i']);
    }

    #[test]
    fn the_document_names_every_kind_with_v2_references() {
        let served = crate::resources::Registry::new().snapshot();
        let doc = document(&served);
        let pod = &doc["definitions"]["io.k8s.api.core.v1.Pod"];
        assert_eq!(
            pod["x-kubernetes-group-version-kind"][0]["kind"], "Pod",
            "{pod}"
        );
        let text = doc.to_string();
        assert!(!text.contains("#/components/schemas/"));
        assert!(text.contains("#/definitions/io.k8s.api.core.v1.PodSpec"));
        let list = &doc["paths"]["/api/v1/namespaces/{namespace}/pods"]["post"];
        assert_eq!(list["x-kubernetes-action"], "post");
        assert_eq!(list["parameters"][1]["in"], "body");
        assert!(!protobuf(&doc).is_empty());
    }
}
