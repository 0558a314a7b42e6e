//! Kubernetes protobuf request bodies, decoded into JSON.
//!
//! kubectl's typed clients (`kubectl create namespace`, `create configmap`, `create secret`,
//! ...) send `application/vnd.kubernetes.protobuf`: the magic `k8s\0`, then a
//! `runtime.Unknown` holding the type and the object's own protobuf bytes. Responses stay
//! JSON, which those clients also accept.
//!
//! The field table (`protobuf_schema.json`) is generated from the k8s-pb crate by
//! `scripts/gen-protobuf-schema.py`: tag, JSON name and type of every field of the served
//! API groups. A few messages have JSON forms of their own (Time, IntOrString, Quantity,
//! RawExtension, FieldsV1) and are mapped here.

use std::collections::HashMap;
use std::sync::OnceLock;

use base64::Engine;
use k8s_openapi::chrono::{DateTime, SecondsFormat};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::error::{ApiError, ApiResult};

pub const CONTENT_TYPE: &str = "application/vnd.kubernetes.protobuf";
const MAGIC: &[u8] = b"k8s\0";

#[derive(Debug, Deserialize)]
struct Field {
    tag: u32,
    json: String,
    kind: String,
    #[serde(default)]
    value: Option<String>,
    #[serde(default)]
    message: Option<String>,
    repeated: bool,
    /// Go embeds the message in its struct (`json:",inline"`): its fields are the
    /// enclosing object's in JSON.
    #[serde(default)]
    inline: bool,
}

fn schema() -> &'static HashMap<String, Vec<Field>> {
    static SCHEMA: OnceLock<HashMap<String, Vec<Field>>> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        serde_json::from_str(include_str!("protobuf_schema.json"))
            .expect("the generated schema parses")
    })
}

fn bad(why: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request(format!("error decoding the protobuf body: {why}"))
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> ApiResult<u64> {
        let mut v: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = *self
                .buf
                .get(self.pos)
                .ok_or_else(|| bad("truncated varint"))?;
            self.pos += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(bad("varint too long"))
    }

    fn bytes(&mut self) -> ApiResult<&'a [u8]> {
        let len = self.varint()? as usize;
        let end = self
            .pos
            .checked_add(len)
            .filter(|e| *e <= self.buf.len())
            .ok_or_else(|| bad("truncated field"))?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn skip(&mut self, wire: u64) -> ApiResult<()> {
        match wire {
            0 => self.varint().map(|_| ()),
            1 => self.advance(8),
            2 => self.bytes().map(|_| ()),
            5 => self.advance(4),
            w => Err(bad(format!("unsupported wire type {w}"))),
        }
    }

    fn advance(&mut self, n: usize) -> ApiResult<()> {
        if self.pos + n > self.buf.len() {
            return Err(bad("truncated fixed-size field"));
        }
        self.pos += n;
        Ok(())
    }

    fn done(&self) -> bool {
        self.pos >= self.buf.len()
    }
}

fn string(b: &[u8]) -> ApiResult<Value> {
    Ok(Value::String(
        std::str::from_utf8(b)
            .map_err(|_| bad("a string is not UTF-8"))?
            .to_string(),
    ))
}

fn scalar(kind: &str, r: &mut Reader<'_>, wire: u64) -> ApiResult<Value> {
    match (kind, wire) {
        ("string", 2) => string(r.bytes()?),
        ("bytes", 2) => Ok(Value::String(
            base64::engine::general_purpose::STANDARD.encode(r.bytes()?),
        )),
        ("bool", 0) => Ok(Value::Bool(r.varint()? != 0)),
        ("int32", 0) => Ok(json!(r.varint()? as i64 as i32)),
        ("int64", 0) => Ok(json!(r.varint()? as i64)),
        (k, w) => Err(bad(format!("field of type {k} arrived as wire type {w}"))),
    }
}

/// Decodes one message of type `name` into its JSON form.
fn message(name: &str, buf: &[u8]) -> ApiResult<Value> {
    let short = name.rsplit('/').next().unwrap_or(name);
    let pkg = name.rsplit_once('/').map_or("", |(p, _)| p);
    // Messages whose JSON is not an object of their fields.
    match (pkg, short) {
        ("apimachinery/pkg/apis/meta/v1", "Time" | "MicroTime") => {
            let fields = message_fields(name, buf)?;
            let secs = fields.get("seconds").and_then(Value::as_i64).unwrap_or(0);
            let nanos = fields.get("nanos").and_then(Value::as_i64).unwrap_or(0) as u32;
            let t =
                DateTime::from_timestamp(secs, nanos).ok_or_else(|| bad("time out of range"))?;
            let format = if short == "Time" {
                SecondsFormat::Secs
            } else {
                SecondsFormat::Micros
            };
            return Ok(Value::String(t.to_rfc3339_opts(format, true)));
        }
        ("apimachinery/pkg/util/intstr", "IntOrString") => {
            let f = message_fields(name, buf)?;
            return Ok(if f.get("type").and_then(Value::as_i64).unwrap_or(0) == 0 {
                f.get("intVal").cloned().unwrap_or(json!(0))
            } else {
                f.get("strVal").cloned().unwrap_or(json!(""))
            });
        }
        // A user's extra values: a list of strings in JSON, a message in protobuf.
        (_, "ExtraValue") => {
            let mut f = message_fields(name, buf)?;
            return Ok(f.remove("items").unwrap_or(json!([])));
        }
        ("apimachinery/pkg/api/resource", "Quantity") => {
            let f = message_fields(name, buf)?;
            return Ok(f.get("string").cloned().unwrap_or(json!("0")));
        }
        ("apimachinery/pkg/runtime", "RawExtension")
        | ("apimachinery/pkg/apis/meta/v1", "FieldsV1") => {
            let mut r = Reader { buf, pos: 0 };
            while !r.done() {
                let key = r.varint()?;
                if key >> 3 == 1 && key & 7 == 2 {
                    let raw = r.bytes()?;
                    return serde_json::from_slice(raw)
                        .map_err(|e| bad(format!("embedded JSON: {e}")));
                }
                r.skip(key & 7)?;
            }
            return Ok(Value::Null);
        }
        _ => {}
    }
    Ok(Value::Object(message_fields(name, buf)?))
}

fn message_fields(name: &str, buf: &[u8]) -> ApiResult<Map<String, Value>> {
    let fields = schema()
        .get(name)
        .ok_or_else(|| bad(format!("no schema for message {name}")))?;
    let mut out = Map::new();
    let mut r = Reader { buf, pos: 0 };
    while !r.done() {
        let key = r.varint()?;
        let (tag, wire) = ((key >> 3) as u32, key & 7);
        let Some(f) = fields.iter().find(|f| f.tag == tag) else {
            r.skip(wire)?;
            continue;
        };
        match f.kind.as_str() {
            "map" => {
                let entry = r.bytes()?;
                let mut er = Reader { buf: entry, pos: 0 };
                let (mut k, mut v) = (String::new(), Value::Null);
                while !er.done() {
                    let ekey = er.varint()?;
                    match (ekey >> 3, ekey & 7) {
                        (1, 2) => {
                            k = std::str::from_utf8(er.bytes()?)
                                .map_err(|_| bad("map key is not UTF-8"))?
                                .to_string()
                        }
                        (2, w) => {
                            v = match f.value.as_deref() {
                                Some("message") => {
                                    message(f.message.as_deref().unwrap_or(""), er.bytes()?)?
                                }
                                Some(kind) => scalar(kind, &mut er, w)?,
                                None => return Err(bad("map without a value type")),
                            }
                        }
                        (_, w) => er.skip(w)?,
                    }
                }
                let m = out.entry(f.json.clone()).or_insert_with(|| json!({}));
                if let Some(m) = m.as_object_mut() {
                    m.insert(k, v);
                }
            }
            kind => {
                let values: Vec<Value> = if kind == "message" {
                    vec![message(f.message.as_deref().unwrap_or(""), r.bytes()?)?]
                } else if wire == 2 && f.repeated && kind != "string" && kind != "bytes" {
                    // Packed scalars.
                    let packed = r.bytes()?;
                    let mut pr = Reader {
                        buf: packed,
                        pos: 0,
                    };
                    let mut vs = Vec::new();
                    while !pr.done() {
                        vs.push(scalar(kind, &mut pr, 0)?);
                    }
                    vs
                } else {
                    vec![scalar(kind, &mut r, wire)?]
                };
                if f.inline {
                    for v in values {
                        if let Value::Object(fields) = v {
                            out.extend(fields);
                        }
                    }
                } else if f.repeated {
                    let arr = out.entry(f.json.clone()).or_insert_with(|| json!([]));
                    if let Some(a) = arr.as_array_mut() {
                        a.extend(values);
                    }
                } else if let Some(v) = values.into_iter().next() {
                    // Go's protobuf encoding writes zero values that its JSON encoding
                    // omits; dropping them makes both decode to the same object (and lets
                    // defaulting see "unset").
                    let zero = matches!(&v, Value::String(s) if s.is_empty())
                        || v.as_i64() == Some(0)
                        || v == Value::Bool(false);
                    if kind == "message" || !zero {
                        out.insert(f.json.clone(), v);
                    }
                }
            }
        }
    }
    Ok(out)
}

fn package_of(api_version: &str) -> Option<&'static str> {
    Some(match api_version {
        "v1" => "api/core/v1",
        "apps/v1" => "api/apps/v1",
        "batch/v1" => "api/batch/v1",
        "discovery.k8s.io/v1" => "api/discovery/v1",
        "coordination.k8s.io/v1" => "api/coordination/v1",
        "autoscaling/v1" => "api/autoscaling/v1",
        "policy/v1" => "api/policy/v1",
        "rbac.authorization.k8s.io/v1" => "api/rbac/v1",
        "authentication.k8s.io/v1" => "api/authentication/v1",
        "authorization.k8s.io/v1" => "api/authorization/v1",
        "certificates.k8s.io/v1" => "api/certificates/v1",
        "meta.k8s.io/v1" => "apimachinery/pkg/apis/meta/v1",
        _ => return None,
    })
}

fn type_meta(unknown: &Map<String, Value>, field: &str) -> String {
    // TypeMeta is inline: its fields are the Unknown's own.
    unknown
        .get(field)
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string()
}

/// Decodes a `application/vnd.kubernetes.protobuf` body into the object's JSON.
pub fn decode(body: &[u8]) -> ApiResult<Value> {
    let rest = body
        .strip_prefix(MAGIC)
        .ok_or_else(|| bad("missing the k8s protobuf prefix"))?;
    let unknown = message_fields("apimachinery/pkg/runtime/Unknown", rest)?;
    let api_version = type_meta(&unknown, "apiVersion");
    let kind = type_meta(&unknown, "kind");
    let raw_b64 = unknown.get("raw").and_then(Value::as_str).unwrap_or("");
    let raw = base64::engine::general_purpose::STANDARD
        .decode(raw_b64)
        .map_err(bad)?;
    let pkg = package_of(&api_version)
        .ok_or_else(|| bad(format!("unsupported apiVersion {api_version:?}")))?;
    let mut obj = message(&format!("{pkg}/{kind}"), &raw)?;
    if let Some(m) = obj.as_object_mut() {
        m.insert("apiVersion".into(), json!(api_version));
        m.insert("kind".into(), json!(kind));
    }
    Ok(obj)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn varint(mut v: u64, out: &mut Vec<u8>) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }

    fn field(tag: u32, bytes: &[u8], out: &mut Vec<u8>) {
        varint(u64::from(tag) << 3 | 2, out);
        varint(bytes.len() as u64, out);
        out.extend_from_slice(bytes);
    }

    #[test]
    fn decodes_a_configmap_envelope() {
        // ObjectMeta{name: "cfg", labels: {a: b}}
        let mut meta = Vec::new();
        field(1, b"cfg", &mut meta);
        let mut entry = Vec::new();
        field(1, b"a", &mut entry);
        field(2, b"b", &mut entry);
        field(11, &entry, &mut meta);
        let mut cm = Vec::new();
        field(1, &meta, &mut cm);
        let mut data = Vec::new();
        field(1, b"key", &mut data);
        field(2, b"value", &mut data);
        field(2, &data, &mut cm);
        let mut type_meta = Vec::new();
        field(1, b"v1", &mut type_meta);
        field(2, b"ConfigMap", &mut type_meta);
        let mut unknown = Vec::new();
        field(1, &type_meta, &mut unknown);
        field(2, &cm, &mut unknown);
        let mut body = MAGIC.to_vec();
        body.extend(unknown);
        let v = decode(&body).unwrap();
        assert_eq!(
            v,
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg", "labels": {"a": "b"}}, "data": {"key": "value"}})
        );
        assert!(decode(b"nope").is_err());
        assert!(decode(&body[..body.len() - 3]).is_err());
    }

    /// `kubectl debug --copy-to` sends a whole pod: Go's embedded structs (a volume's
    /// source, a probe's handler, a reference's name) are fields of their own in protobuf
    /// and spread into their object in JSON.
    #[test]
    fn embedded_structs_spread_into_their_object() {
        let mut cm_ref = Vec::new();
        field(1, b"settings", &mut cm_ref); // LocalObjectReference.name
        let mut cm_source = Vec::new();
        field(1, &cm_ref, &mut cm_source); // ConfigMapVolumeSource.localObjectReference
        let mut source = Vec::new();
        field(19, &cm_source, &mut source); // VolumeSource.configMap
        let mut volume = Vec::new();
        field(1, b"config", &mut volume);
        field(2, &source, &mut volume); // Volume.volumeSource
        let mut get = Vec::new();
        field(1, b"/ready", &mut get); // HTTPGetAction.path
        let mut handler = Vec::new();
        field(2, &get, &mut handler); // ProbeHandler.httpGet
        let mut probe = Vec::new();
        field(1, &handler, &mut probe); // Probe.handler
        let mut container = Vec::new();
        field(1, b"web", &mut container);
        field(11, &probe, &mut container); // Container.readinessProbe
                                           // A name with an acronym: VolumeSource.downwardAPI, empty.
        let mut downward = Vec::new();
        field(16, b"", &mut downward);
        let mut info = Vec::new();
        field(1, b"info", &mut info);
        field(2, &downward, &mut info);
        let mut spec = Vec::new();
        field(1, &volume, &mut spec);
        field(1, &info, &mut spec);
        field(2, &container, &mut spec);
        let mut pod = Vec::new();
        field(2, &spec, &mut pod);
        let v = message("api/core/v1/Pod", &pod).unwrap();
        assert_eq!(
            v,
            json!({"spec": {
                "volumes": [
                    {"name": "config", "configMap": {"name": "settings"}},
                    {"name": "info", "downwardAPI": {}},
                ],
                "containers": [{"name": "web", "readinessProbe": {"httpGet": {"path": "/ready"}}}],
            }})
        );
    }
}
