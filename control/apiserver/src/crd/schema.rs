//! The OpenAPI v3 schemas of CustomResourceDefinitions (`apiextensions.k8s.io/v1`).
//!
//! A CRD version carries a JSON schema (`JSONSchemaProps`, kept here as plain JSON). Four
//! things are done with it, each as kube-apiserver does them, down to the wording of errors,
//! because clients and tests match on those strings:
//!
//! - [`structural_errors`], at CRD create/update: the schema must be *structural* (every node
//!   typed, value validations in `allOf`/`anyOf`/`oneOf`/`not` only restating what the
//!   typed skeleton already declares, root `metadata` restricted to `name`/`generateName`),
//!   must avoid what CRDs forbid (`$ref`, `uniqueItems`, ...), and its `default`s must
//!   validate against, and be pruned by, their own schema.
//! - [`prune`]: drops the fields a schema does not know, unless
//!   `x-kubernetes-preserve-unknown-fields` says to keep them.
//! - [`apply_defaults`]: fills absent fields from `default`s.
//! - [`validate`]: checks an object as go-openapi (kube-openapi's fork) does, then the
//!   embedded-resource and `x-kubernetes-list-type` invariants.
//!
//! Field paths follow Kubernetes: schema nodes are `...properties[spec].items`, object fields
//! `spec.items[2].name`. Messages print values as Go's `field.Error` does: strings quoted,
//! numbers bare, maps and slices in Go's `%#v` form.
//!
//! Left out: CEL (`x-kubernetes-validations`), `labels`/`annotations` checks in embedded
//! metadata, and the isbn/creditcard/ssn/rgbcolor formats (accepted as they come).

use std::collections::HashMap;
use std::fmt::Display;
use std::sync::OnceLock;

use regex::Regex;
use serde_json::{Map, Number, Value};

use crate::error::FieldError;

const PRESERVE: &str = "x-kubernetes-preserve-unknown-fields";
const EMBEDDED: &str = "x-kubernetes-embedded-resource";
const INT_OR_STRING: &str = "x-kubernetes-int-or-string";
const LIST_TYPE: &str = "x-kubernetes-list-type";
const LIST_MAP_KEYS: &str = "x-kubernetes-list-map-keys";
const MAP_TYPE: &str = "x-kubernetes-map-type";
const META_FIELDS: [&str; 3] = ["apiVersion", "kind", "metadata"];
const TYPES: [&str; 6] = ["array", "boolean", "integer", "number", "object", "string"];
/// The formats kube keeps when building the validator; any other `format` is ignored, which is
/// why `int32`, `int64`, `float` and `double` constrain nothing.
const FORMATS: &str = "bsonobjectid uri email hostname ipv4 ipv6 cidr mac uuid uuid3 uuid4 uuid5 \
    isbn isbn10 isbn13 creditcard ssn hexcolor rgbcolor byte password date duration datetime";

// ---- schema access: lenient, since a malformed node is reported elsewhere or ignored ----

fn str_of<'a>(s: &'a Value, k: &str) -> &'a str {
    s.get(k).and_then(Value::as_str).unwrap_or("")
}
fn ty(s: &Value) -> &str {
    str_of(s, "type")
}
fn flag(s: &Value, k: &str) -> bool {
    s.get(k) == Some(&Value::Bool(true))
}
fn present<'a>(s: &'a Value, k: &str) -> Option<&'a Value> {
    s.get(k).filter(|v| !v.is_null())
}
fn props(s: &Value) -> Option<&Map<String, Value>> {
    s.get("properties").and_then(Value::as_object)
}
fn prop<'a>(s: &'a Value, k: &str) -> Option<&'a Value> {
    props(s)?.get(k)
}
fn items(s: &Value) -> Option<&Value> {
    s.get("items").filter(|v| v.is_object())
}
fn additional(s: &Value) -> Option<&Value> {
    present(s, "additionalProperties")
}
fn additional_schema(s: &Value) -> Option<&Value> {
    additional(s).filter(|v| v.is_object())
}
fn list<'a>(s: &'a Value, k: &str) -> &'a [Value] {
    s.get(k)
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}
fn uint(s: &Value, k: &str) -> Option<u64> {
    let v = s.get(k)?;
    v.as_u64()
        .or_else(|| v.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
}
/// Go map iteration is random; sorting keeps our output stable.
fn sorted(m: &Map<String, Value>) -> Vec<(&String, &Value)> {
    let mut v: Vec<_> = m.iter().collect();
    v.sort_by(|a, b| a.0.cmp(b.0));
    v
}

// ---- field paths and errors ----

fn child(p: &str, name: &str) -> String {
    if p.is_empty() {
        name.to_string()
    } else {
        format!("{p}.{name}")
    }
}
fn key(p: &str, k: &str) -> String {
    format!("{p}[{k}]")
}
fn index(p: &str, i: usize) -> String {
    format!("{p}[{i}]")
}

fn fe(field: impl Into<String>, reason: &'static str, message: String) -> FieldError {
    FieldError {
        field: field.into(),
        reason,
        message,
    }
}
fn required(field: impl Into<String>, detail: &str) -> FieldError {
    fe(
        field,
        "FieldValueRequired",
        format!("Required value: {detail}"),
    )
}
fn forbidden(field: impl Into<String>, detail: impl Display) -> FieldError {
    fe(field, "FieldValueForbidden", format!("Forbidden: {detail}"))
}
/// `value` is already rendered (see [`go_value`]).
fn invalid(field: impl Into<String>, value: &str, detail: impl Display) -> FieldError {
    fe(
        field,
        "FieldValueInvalid",
        format!("Invalid value: {value}: {detail}"),
    )
}
fn not_supported(field: impl Into<String>, value: &str, supported: &[String]) -> FieldError {
    let quoted: Vec<String> = supported.iter().map(|s| go_quote(s)).collect();
    let message = format!(
        "Unsupported value: {value}: supported values: {}",
        quoted.join(", ")
    );
    fe(field, "FieldValueNotSupported", message)
}
fn duplicate(field: String, value: &Value) -> FieldError {
    fe(
        field,
        "FieldValueDuplicate",
        format!("Duplicate value: {}", go_value(value)),
    )
}

// ---- Go value rendering ----

/// `strconv.Quote`.
fn go_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{7}' => out.push_str("\\a"),
            '\u{8}' => out.push_str("\\b"),
            '\u{b}' => out.push_str("\\v"),
            '\u{c}' => out.push_str("\\f"),
            c if c.is_control() && (c as u32) < 0x80 => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Go's `%v` of a float64: shortest digits, exponent form below 1e-4 and from 1e6 up.
fn go_float(f: f64) -> String {
    if !f.is_finite() {
        return if f.is_nan() {
            "NaN"
        } else if f > 0.0 {
            "+Inf"
        } else {
            "-Inf"
        }
        .into();
    }
    if f == 0.0 {
        return "0".into();
    }
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if (-4..6).contains(&exp) {
        format!("{f}")
    } else {
        format!(
            "{mantissa}e{}{:02}",
            if exp < 0 { '-' } else { '+' },
            exp.abs()
        )
    }
}

fn go_num(n: &Number) -> String {
    match (n.as_i64(), n.as_u64()) {
        (Some(i), _) => i.to_string(),
        (_, Some(u)) => u.to_string(),
        _ => go_float(n.as_f64().unwrap_or(0.0)),
    }
}

/// A value as `field.Error` prints it: scalars plainly, a nil as `"null"`, compounds as `%#v`.
fn go_value(v: &Value) -> String {
    match v {
        Value::Null => "\"null\"".into(),
        Value::String(s) => go_quote(s),
        _ => go_sharp(v),
    }
}

/// Go's `%#v` of a decoded JSON value (`map[string]interface {}` and friends).
fn go_sharp(v: &Value) -> String {
    match v {
        Value::Null => "interface {}(nil)".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => go_num(n),
        Value::String(s) => go_quote(s),
        Value::Array(a) => {
            let parts: Vec<String> = a.iter().map(go_sharp).collect();
            format!("[]interface {{}}{{{}}}", parts.join(", "))
        }
        Value::Object(m) => {
            let parts: Vec<String> = sorted(m)
                .into_iter()
                .map(|(k, v)| format!("{}:{}", go_quote(k), go_sharp(v)))
                .collect();
            format!("map[string]interface {{}}{{{}}}", parts.join(", "))
        }
    }
}

fn go_strings(v: &[Value]) -> String {
    let parts: Vec<String> = v
        .iter()
        .map(|s| go_quote(s.as_str().unwrap_or("")))
        .collect();
    format!("[]string{{{}}}", parts.join(", "))
}

/// Go's RE2 and the `regex` crate accept nearly the same syntax; only the error text differs.
fn regex_error(pattern: &str) -> Option<String> {
    let err = Regex::new(pattern).err()?;
    let text = err.to_string();
    let last = text.lines().last().unwrap_or("").trim();
    let msg = last.strip_prefix("error: ").unwrap_or(last);
    Some(format!("error parsing regexp: {msg}: `{pattern}`"))
}

// ================= structural checks =================

#[derive(Clone, Copy, PartialEq, Eq)]
enum Level {
    Root,
    Item,
    Field,
}

/// Checks that a version's schema is structural and otherwise allowed, as kube-apiserver does at CRD create/update.
/// `path` is the field path of the schema, e.g. "spec.versions[0].schema.openAPIV3Schema".
pub fn structural_errors(schema: &Value, path: &str) -> Vec<FieldError> {
    let mut out = Vec::new();
    if flag(schema, "nullable") {
        out.push(forbidden(
            child(path, "nullable"),
            "nullable cannot be true at the root",
        ));
    }
    let mut structural = Vec::new();
    invariants(schema, Level::Root, path, &mut structural);
    completeness(schema, schema, path, path, &mut structural);
    if structural.is_empty() {
        // Defaults are only judged against a schema that is itself sound.
        default_errors(schema, path, true, false, &mut out);
    } else {
        // kube sorts these by their printed form.
        structural.sort_by_cached_key(|e| format!("{}: {}", e.field, e.message));
        out.append(&mut structural);
    }
    openapi_errors(schema, path, &Ctx::default(), true, &mut out);
    out
}

fn invariants(s: &Value, lvl: Level, p: &str, out: &mut Vec<FieldError>) {
    if !s.is_object() {
        return;
    }
    let t = ty(s);
    if t == "array" && items(s).is_none() {
        out.push(required(child(p, "items"), "must be specified"));
    }
    if let Some(it) = items(s) {
        invariants(it, Level::Item, &child(p, "items"), out);
    }
    for (k, v) in props(s).map(sorted).unwrap_or_default() {
        invariants(v, Level::Field, &key(&child(p, "properties"), k), out);
    }
    if let Some(ap) = additional(s) {
        if lvl == Level::Root {
            out.push(forbidden(
                child(p, "additionalProperties"),
                "must not be used at the root",
            ));
        }
        if ap.is_object() {
            invariants(ap, Level::Field, &child(p, "additionalProperties"), out);
        }
    }
    let (int_or_string, preserve, embedded) =
        (flag(s, INT_OR_STRING), flag(s, PRESERVE), flag(s, EMBEDDED));
    if int_or_string && preserve {
        out.push(invalid(
            child(p, PRESERVE),
            "true",
            "must be false if x-kubernetes-int-or-string is true",
        ));
    }
    if int_or_string && embedded {
        out.push(invalid(
            child(p, EMBEDDED),
            "true",
            "must be false if x-kubernetes-int-or-string is true",
        ));
    }
    // The two spellings of int-or-string are the only `type`s allowed under junctors.
    let skip_any_of = is_int_or_string_any_of(list(s, "anyOf"));
    let skip_first_all_of = list(s, "allOf")
        .first()
        .is_some_and(|a| is_int_or_string_any_of(list(a, "anyOf")));
    value_validation(s, skip_any_of, skip_first_all_of, lvl, p, out);

    let type_path = child(p, "type");
    if embedded && t != "object" {
        let why = "must be object if x-kubernetes-embedded-resource is true";
        out.push(if t.is_empty() {
            required(type_path, why)
        } else {
            invalid(type_path, &go_quote(t), why)
        });
    } else if t.is_empty() && !int_or_string && !preserve {
        out.push(required(
            type_path,
            match lvl {
                Level::Root => "must not be empty at the root",
                Level::Item => "must not be empty for specified array items",
                Level::Field => "must not be empty for specified object fields",
            },
        ));
    }
    if embedded && additional(s).is_some() {
        out.push(forbidden(
            child(p, "additionalProperties"),
            "must not be used if x-kubernetes-embedded-resource is set",
        ));
    }
    if lvl == Level::Root && !t.is_empty() && t != "object" {
        out.push(invalid(
            child(p, "type"),
            &go_quote(t),
            "must be object at the root",
        ));
    }
    let check_meta = lvl == Level::Root || embedded;
    let props_path = child(p, "properties");
    for f in ["kind", "apiVersion"] {
        match prop(s, f) {
            Some(fs) if check_meta && ty(fs) != "string" => {
                out.push(invalid(
                    child(&key(&props_path, f), "type"),
                    &go_quote(ty(fs)),
                    "must be string",
                ));
            }
            _ => {}
        }
    }
    if let Some(m) = prop(s, "metadata") {
        let mp = key(&props_path, "metadata");
        if check_meta && ty(m) != "object" {
            out.push(invalid(
                child(&mp, "type"),
                &go_quote(ty(m)),
                "must be object",
            ));
        }
        if lvl == Level::Root && metadata_has_extras(m) {
            out.push(forbidden(
                mp,
                "must not specify anything other than name and generateName, but metadata is implicitly specified",
            ));
        }
    }
    if embedded && !preserve && props(s).is_none_or(Map::is_empty) {
        out.push(required(
            props_path,
            "must not be empty if x-kubernetes-embedded-resource is true without x-kubernetes-preserve-unknown-fields",
        ));
    }
}

fn is_int_or_string_any_of(any_of: &[Value]) -> bool {
    any_of.len() == 2
        && any_of[0] == serde_json::json!({"type": "integer"})
        && any_of[1] == serde_json::json!({"type": "string"})
}

/// Root metadata may say only `type`, `default` (forbidden elsewhere) and schemas for
/// `name`/`generateName`: anything else would restrict ObjectMeta behind the server's back.
fn metadata_has_extras(m: &Value) -> bool {
    let Some(o) = m.as_object() else { return false };
    o.iter().any(|(k, v)| match k.as_str() {
        "type" | "default" | "example" => false,
        "properties" => v
            .as_object()
            .is_some_and(|p| p.keys().any(|k| k != "name" && k != "generateName")),
        _ => !is_zero(v),
    })
}

/// Go's zero value: an unset field of a Go struct.
fn is_zero(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(m) => m.is_empty(),
        Value::Number(_) | Value::Bool(true) => false,
    }
}

fn value_validation(
    s: &Value,
    skip_any_of: bool,
    skip_first_all_of: bool,
    lvl: Level,
    p: &str,
    out: &mut Vec<FieldError>,
) {
    if !skip_any_of {
        for (i, v) in list(s, "anyOf").iter().enumerate() {
            nested(v, false, lvl, &index(&child(p, "anyOf"), i), out);
        }
    }
    for (i, v) in list(s, "allOf").iter().enumerate() {
        nested(
            v,
            skip_first_all_of && i == 0,
            lvl,
            &index(&child(p, "allOf"), i),
            out,
        );
    }
    for (i, v) in list(s, "oneOf").iter().enumerate() {
        nested(v, false, lvl, &index(&child(p, "oneOf"), i), out);
    }
    if let Some(n) = present(s, "not") {
        nested(n, false, lvl, &child(p, "not"), out);
    }
    let pattern = str_of(s, "pattern");
    if let Some(e) = regex_error(pattern) {
        out.push(invalid(
            child(p, "pattern"),
            &go_quote(pattern),
            format!("must be a valid regular expression, but isn't: {e}"),
        ));
    }
}

/// A schema under a junctor may only validate values, never declare structure.
fn nested(v: &Value, skip_any_of: bool, lvl: Level, p: &str, out: &mut Vec<FieldError>) {
    if !v.is_object() {
        return;
    }
    value_validation(v, skip_any_of, false, lvl, p, out);
    if let Some(it) = items(v) {
        nested(it, false, lvl, &child(p, "items"), out);
    }
    for (k, pv) in props(v).map(sorted).unwrap_or_default() {
        nested(
            pv,
            false,
            Level::Field,
            &key(&child(p, "properties"), k),
            out,
        );
    }
    let must =
        |k: &str, what: &str| forbidden(child(p, k), format!("must be {what} to be structural"));
    if !ty(v).is_empty() {
        out.push(must("type", "empty"));
    }
    if additional(v).is_some() {
        out.push(must("additionalProperties", "undefined"));
    }
    if present(v, "default").is_some() {
        out.push(must("default", "undefined"));
    }
    for k in ["title", "description"] {
        if !str_of(v, k).is_empty() {
            out.push(must(k, "empty"));
        }
    }
    if flag(v, "nullable") {
        out.push(must("nullable", "false"));
    }
    if present(v, "externalDocs").is_some() {
        out.push(must("externalDocs", "undefined"));
    }
    for k in [PRESERVE, EMBEDDED, INT_OR_STRING] {
        if flag(v, k) {
            out.push(must(k, "false"));
        }
    }
    if !list(v, LIST_MAP_KEYS).is_empty() {
        out.push(must(LIST_MAP_KEYS, "empty"));
    }
    for k in [LIST_TYPE, MAP_TYPE] {
        if present(v, k).is_some() {
            out.push(must(k, "undefined"));
        }
    }
    if !list(v, "x-kubernetes-validations").is_empty() {
        out.push(must("x-kubernetes-validations", "empty"));
    }
    if prop(v, "metadata").is_some() {
        out.push(forbidden(
            key(&child(p, "properties"), "metadata"),
            "must not be specified in a nested context",
        ));
    }
}

/// Whatever a junctor names must also exist in the typed skeleton. Like kube, this starts from
/// the root's junctors only.
fn completeness(v: &Value, s: &Value, sp: &str, vp: &str, out: &mut Vec<FieldError>) {
    if let Some(n) = present(v, "not") {
        complete_nested(n, Some(s), sp, &child(vp, "not"), out);
    }
    for j in ["allOf", "anyOf", "oneOf"] {
        for (i, n) in list(v, j).iter().enumerate() {
            complete_nested(n, Some(s), sp, &index(&child(vp, j), i), out);
        }
    }
}

fn complete_nested(v: &Value, s: Option<&Value>, sp: &str, vp: &str, out: &mut Vec<FieldError>) {
    if !v.is_object() {
        return;
    }
    let Some(s) = s else {
        out.push(required(sp, &format!("because it is defined in {vp}")));
        return;
    };
    completeness(v, s, sp, vp, out);
    if let Some(vi) = items(v) {
        complete_nested(vi, items(s), &child(sp, "items"), &child(vp, "items"), out);
    }
    for (k, vf) in props(v).map(sorted).unwrap_or_default() {
        let (spk, vpk) = (
            key(&child(sp, "properties"), k),
            key(&child(vp, "properties"), k),
        );
        match prop(s, k) {
            Some(sf) => complete_nested(vf, Some(sf), &spk, &vpk, out),
            None => out.push(required(spk, &format!("because it is defined in {vpk}"))),
        }
    }
}

/// Defaults must validate and survive pruning; kube checks this only along the typed skeleton.
fn default_errors(s: &Value, p: &str, root: bool, inside_meta: bool, out: &mut Vec<FieldError>) {
    if !s.is_object() {
        return;
    }
    let embedded = root || flag(s, EMBEDDED);
    let inside_meta = inside_meta && !embedded;
    if let Some(d) = present(s, "default") {
        let dp = child(p, "default");
        if !inside_meta {
            let mut pruned = d.clone();
            prune_value(&mut pruned, Some(s), embedded, "", &mut Vec::new());
            if &pruned != d {
                out.push(invalid(&dp, &go_value(d), "must not have unknown fields"));
            }
        }
        let mut meta = Vec::new();
        embedded_meta(s, d, &dp, embedded, &mut meta);
        if meta.is_empty() {
            Validator::new(&dp).check(s, d, "", false, out);
        } else {
            out.append(&mut meta);
        }
    }
    if let Some(it) = items(s) {
        default_errors(it, &child(p, "items"), false, inside_meta, out);
    }
    for (k, v) in props(s).map(sorted).unwrap_or_default() {
        let meta = inside_meta || (embedded && META_FIELDS.contains(&k.as_str()));
        default_errors(v, &key(&child(p, "properties"), k), false, meta, out);
    }
}

#[derive(Clone, Default)]
struct Ctx {
    /// Why defaults are forbidden here, if they are.
    no_defaults: Option<String>,
    inside_meta: bool,
}

impl Ctx {
    fn without_defaults(&self, why: String) -> Ctx {
        Ctx {
            no_defaults: Some(why),
            ..self.clone()
        }
    }
}

/// The checks of `ValidateCustomResourceDefinitionOpenAPISchema`, over every node incl. junctors.
fn openapi_errors(s: &Value, p: &str, ctx: &Ctx, root: bool, out: &mut Vec<FieldError>) {
    if !s.is_object() {
        return;
    }
    let t = ty(s);
    let embedded = flag(s, EMBEDDED);
    if !t.is_empty() && !TYPES.contains(&t) {
        out.push(not_supported(
            child(p, "type"),
            &go_quote(t),
            &TYPES.map(String::from),
        ));
    }
    if let (Some(_), Some(why)) = (present(s, "default"), &ctx.no_defaults) {
        out.push(forbidden(
            child(p, "default"),
            format!("must not be set {why}"),
        ));
    }
    if !str_of(s, "id").is_empty() {
        out.push(forbidden(child(p, "id"), "id is not supported"));
    }
    for k in [
        "additionalItems",
        "patternProperties",
        "definitions",
        "dependencies",
        "$ref",
    ] {
        let set = match s.get(k) {
            Some(Value::Object(m)) => {
                !m.is_empty() || k == "additionalItems" || k == "dependencies"
            }
            Some(v) => !v.is_null(),
            None => false,
        };
        if set {
            out.push(forbidden(child(p, k), format!("{k} is not supported")));
        }
    }
    if t == "null" {
        out.push(forbidden(
            child(p, "type"),
            "type cannot be set to null, use nullable as an alternative",
        ));
    }
    let item_list = s.get("items").and_then(Value::as_array);
    if item_list.is_some_and(|a| !a.is_empty()) {
        out.push(forbidden(
            child(p, "items"),
            "items must be a schema object and not an array",
        ));
    }
    if ctx.inside_meta && embedded {
        out.push(forbidden(
            child(p, EMBEDDED),
            "must not be used inside of resource meta",
        ));
    }
    if flag(s, "uniqueItems") {
        out.push(forbidden(
            child(p, "uniqueItems"),
            "uniqueItems cannot be set to true since the runtime complexity becomes quadratic",
        ));
    }
    let has_props = props(s).is_some_and(|m| !m.is_empty());
    if let Some(ap) = additional(s) {
        if has_props && (ap == &Value::Bool(false) || ap.is_object()) {
            out.push(forbidden(
                child(p, "additionalProperties"),
                "additionalProperties and properties are mutual exclusive",
            ));
        }
        let sub = if ctx.inside_meta {
            // Pruning can't know which metadata keys a defaulted map would own.
            ctx.without_defaults("inside additionalProperties applying to object metadata".into())
        } else {
            ctx.clone()
        };
        openapi_errors(ap, &child(p, "additionalProperties"), &sub, false, out);
    }
    for (k, v) in props(s).map(sorted).unwrap_or_default() {
        let mut sub = ctx.clone();
        if (root || embedded) && META_FIELDS.contains(&k.as_str()) {
            sub.inside_meta = true;
            if root {
                sub = sub.without_defaults(format!("in top-level {k}"));
            }
        }
        openapi_errors(v, &key(&child(p, "properties"), k), &sub, false, out);
    }
    if let Some(n) = present(s, "not") {
        openapi_errors(n, &child(p, "not"), ctx, false, out);
    }
    for j in ["allOf", "oneOf", "anyOf"] {
        for (i, v) in list(s, j).iter().enumerate() {
            openapi_errors(v, &index(&child(p, j), i), ctx, false, out);
        }
    }
    for j in ["definitions", "dependencies"] {
        for (k, v) in s
            .get(j)
            .and_then(Value::as_object)
            .map(sorted)
            .unwrap_or_default()
        {
            openapi_errors(v, &key(&child(p, j), k), ctx, false, out);
        }
    }
    if let Some(it) = items(s) {
        openapi_errors(it, &child(p, "items"), ctx, false, out);
    }
    for (i, v) in item_list
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        openapi_errors(v, &index(&child(p, "items"), i), ctx, false, out);
    }
    if s.get(PRESERVE) == Some(&Value::Bool(false)) {
        out.push(invalid(
            child(p, PRESERVE),
            "false",
            "must be true or undefined",
        ));
    }
    list_schema_errors(s, p, out);
}

/// The `x-kubernetes-map-type`/`list-type`/`list-map-keys` rules.
fn list_schema_errors(s: &Value, p: &str, out: &mut Vec<FieldError>) {
    let t = ty(s);
    let type_err = |what: &str| {
        let why = format!("must be {what}");
        if t.is_empty() {
            required(child(p, "type"), &why)
        } else {
            invalid(child(p, "type"), &go_quote(t), why)
        }
    };
    if let Some(mt) = present(s, MAP_TYPE) {
        if t != "object" {
            out.push(type_err("object if x-kubernetes-map-type is specified"));
        }
        let mt = mt.as_str().unwrap_or("");
        if mt != "atomic" && mt != "granular" {
            out.push(not_supported(
                child(p, MAP_TYPE),
                &go_quote(mt),
                &["atomic".into(), "granular".into()],
            ));
        }
    }
    let list_type = present(s, LIST_TYPE).map(|v| v.as_str().unwrap_or(""));
    let it = items(s);
    let items_path = child(p, "items");
    if list_type.is_some() && t != "array" {
        out.push(type_err("array if x-kubernetes-list-type is specified"));
    } else if let (Some("set"), Some(it)) = (list_type, it) {
        let why = "must be atomic as item of a list with x-kubernetes-list-type=set";
        let item_list_type = present(it, LIST_TYPE).map_or("\"null\"".to_string(), go_value);
        match ty(it) {
            "array" if present(it, LIST_TYPE).is_some_and(|v| v != "atomic") => {
                out.push(invalid(child(&items_path, LIST_TYPE), &item_list_type, why));
            }
            "object" if str_of(it, MAP_TYPE) != "atomic" => {
                out.push(invalid(child(&items_path, MAP_TYPE), &item_list_type, why));
            }
            _ => {}
        }
    }
    if let Some(lt) = list_type.filter(|lt| !["atomic", "set", "map"].contains(lt)) {
        out.push(not_supported(
            child(p, LIST_TYPE),
            &go_quote(lt),
            &["atomic".into(), "set".into(), "map".into()],
        ));
    }
    let keys = list(s, LIST_MAP_KEYS);
    if !keys.is_empty() {
        let why = "must be map if x-kubernetes-list-map-keys is non-empty";
        match list_type {
            None => out.push(required(child(p, LIST_TYPE), why)),
            Some(lt) if lt != "map" => out.push(invalid(child(p, LIST_TYPE), &go_quote(lt), why)),
            _ => {}
        }
    }
    if list_type == Some("map") {
        if keys.is_empty() {
            out.push(required(
                child(p, LIST_MAP_KEYS),
                "must not be empty if x-kubernetes-list-type is map",
            ));
        }
        match it {
            None if s.get("items").and_then(Value::as_array).is_some() => out.push(invalid(
                &items_path,
                &go_sharp(&s["items"]),
                "must only have a single schema if x-kubernetes-list-type is map",
            )),
            None => out.push(required(
                &items_path,
                "must have a schema if x-kubernetes-list-type is map",
            )),
            Some(it) if ty(it) != "object" => out.push(invalid(
                child(&items_path, "type"),
                &go_quote(ty(it)),
                "must be object if parent array's x-kubernetes-list-type is map",
            )),
            Some(it) => {
                let mut seen = Vec::new();
                for k in keys.iter().map(|k| k.as_str().unwrap_or("")) {
                    match prop(it, k) {
                        Some(ks) if ty(ks) == "array" || ty(ks) == "object" => out.push(invalid(
                            child(&key(&child(&items_path, "properties"), k), "type"),
                            // kube prints the items' type here, not the key's.
                            "\"object\"",
                            "must be a scalar type if parent array's x-kubernetes-list-type is map",
                        )),
                        Some(_) => {}
                        None => out.push(invalid(
                            child(p, LIST_MAP_KEYS),
                            &go_strings(keys),
                            "entries must all be names of item properties",
                        )),
                    }
                    if seen.contains(&k) {
                        out.push(invalid(
                            child(p, LIST_MAP_KEYS),
                            &go_strings(keys),
                            "must not contain duplicate entries",
                        ));
                    }
                    seen.push(k);
                }
            }
        }
    }
    // Set and map elements are identified by value, so they can't be null; map keys must always exist.
    if let (Some(lt @ ("set" | "map")), Some(it)) = (list_type, it) {
        if flag(it, "nullable") {
            out.push(forbidden(
                child(&items_path, "nullable"),
                format!("cannot be nullable when x-kubernetes-list-type is {lt}"),
            ));
        }
        if lt == "map" {
            let req = list(it, "required");
            for k in keys.iter().filter_map(Value::as_str) {
                let Some(ks) = prop(it, k) else { continue };
                let kp = key(&child(&items_path, "properties"), k);
                if !req.iter().any(|r| r == k) && present(ks, "default").is_none() {
                    out.push(required(
                        child(&kp, "default"),
                        "this property is in x-kubernetes-list-map-keys, so it must have a default or be a required property",
                    ));
                }
                if flag(ks, "nullable") {
                    out.push(forbidden(
                        child(&kp, "nullable"),
                        "this property is in x-kubernetes-list-map-keys, so it cannot be nullable",
                    ));
                }
            }
        }
    }
}

// ================= pruning =================

/// Removes fields the schema does not know (unless x-kubernetes-preserve-unknown-fields), as Kubernetes prunes.
/// At the root, apiVersion, kind and metadata are always kept; in embedded resources (x-kubernetes-embedded-resource) too.
/// Returns the paths removed, as Kubernetes reports unknown fields: `.spec.foo` style (e.g. "spec.foo", "spec.items[0].bar").
pub fn prune(schema: &Value, obj: &mut Value) -> Vec<String> {
    let mut pruned = Vec::new();
    prune_value(obj, Some(schema), true, "", &mut pruned);
    pruned
}

/// `s == None` means "no schema": every object field below is unknown.
fn prune_value(x: &mut Value, s: Option<&Value>, root: bool, path: &str, out: &mut Vec<String>) {
    let embedded = root || s.is_some_and(|s| flag(s, EMBEDDED));
    if let Some(s) = s.filter(|s| flag(s, PRESERVE)) {
        return keep_unknown(x, s, embedded, path, out);
    }
    match x {
        Value::Object(m) => {
            let mut keys: Vec<String> = m.keys().cloned().collect();
            keys.sort();
            let mut drop = Vec::new();
            for k in keys {
                let kp = child(path, &k);
                match s {
                    _ if embedded && META_FIELDS.contains(&k.as_str()) => {}
                    Some(s) if prop(s, &k).is_some() => {
                        prune_value(&mut m[&k], prop(s, &k), false, &kp, out)
                    }
                    // `additionalProperties: true` has no schema, so its values are emptied (as kube does).
                    Some(s) if additional(s).is_some() => {
                        prune_value(&mut m[&k], additional_schema(s), false, &kp, out)
                    }
                    _ => {
                        out.push(kp);
                        drop.push(k);
                    }
                }
            }
            m.retain(|k, _| !drop.contains(k));
        }
        Value::Array(a) => {
            for (i, v) in a.iter_mut().enumerate() {
                prune_value(v, s.and_then(items), false, &index(path, i), out);
            }
        }
        _ => {}
    }
}

/// Under `x-kubernetes-preserve-unknown-fields`, unknown fields stay but known ones are still pruned.
fn keep_unknown(x: &mut Value, s: &Value, embedded: bool, path: &str, out: &mut Vec<String>) {
    match x {
        Value::Object(m) => {
            let mut keys: Vec<String> = m.keys().cloned().collect();
            keys.sort();
            for k in keys {
                let kp = child(path, &k);
                if embedded && META_FIELDS.contains(&k.as_str()) {
                    continue;
                }
                if let Some(ps) = prop(s, &k) {
                    prune_value(&mut m[&k], Some(ps), false, &kp, out);
                } else if additional(s).is_some() {
                    prune_value(&mut m[&k], additional_schema(s), false, &kp, out);
                }
            }
        }
        Value::Array(a) => {
            if let Some(it) = items(s) {
                for (i, v) in a.iter_mut().enumerate() {
                    keep_unknown(v, it, flag(it, EMBEDDED), &index(path, i), out);
                }
            }
        }
        _ => {}
    }
}

// ================= defaulting =================

/// Applies `default`s from the schema to absent fields (recursively, also inside array items and additionalProperties maps), as Kubernetes defaulting does (a default of an absent object property is set, then recursed into; nullable null values are left alone).
pub fn apply_defaults(schema: &Value, obj: &mut Value) {
    let fill = |s: &Value, v: &mut Value| match present(s, "default") {
        Some(d) if v.is_null() && !flag(s, "nullable") => {
            *v = d.clone();
            true
        }
        _ => false,
    };
    match obj {
        Value::Object(m) => {
            for (k, ps) in props(schema).map(sorted).unwrap_or_default() {
                if let Some(d) = present(ps, "default") {
                    match m.get_mut(k.as_str()) {
                        None => {
                            m.insert(k.clone(), d.clone());
                        }
                        Some(v) => {
                            fill(ps, v);
                        }
                    }
                }
            }
            for (k, v) in m.iter_mut() {
                if let Some(ps) = prop(schema, k) {
                    apply_defaults(ps, v);
                } else if let Some(ap) = additional_schema(schema) {
                    // kube doesn't walk into a value it just defaulted here.
                    if !fill(ap, v) {
                        apply_defaults(ap, v);
                    }
                }
            }
        }
        Value::Array(a) => {
            if let Some(it) = items(schema) {
                for v in a.iter_mut() {
                    if !fill(it, v) {
                        apply_defaults(it, v);
                    }
                }
            }
        }
        _ => {}
    }
}

// ================= object validation =================

/// Validates an object against the schema, every problem found (not just the first). Field paths start at the object root: "spec.replicas", "spec.items[2].name", "metadata.name" is NOT checked here (metadata is validated elsewhere), skip the root `metadata` property except its name/generateName if the schema constrains them.
pub fn validate(schema: &Value, obj: &Value) -> Vec<FieldError> {
    let mut out = Vec::new();
    Validator::new("").check(schema, obj, "", true, &mut out);
    embedded_meta(schema, obj, "", false, &mut out);
    list_type_errors(schema, obj, "", &mut out);
    out
}

fn json_type(x: &Value) -> &'static str {
    match x {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_f64() => "number",
        Value::Number(_) => "integer",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// `swag.IsFloat64AJSONInteger`.
fn is_json_integer(f: f64) -> bool {
    f.is_finite() && f.abs() <= 9_007_199_254_740_992.0 && (f - f.round()).abs() < 1e-9
}

/// go-openapi's comparison: numbers by value, whatever their JSON spelling.
fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(i), Some(j)) => i == j,
            _ => x.as_f64() == y.as_f64(),
        },
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| json_eq(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_eq(v, w)))
        }
        _ => a == b,
    }
}

/// go-openapi's `SchemaValidator`: `name` is its dotted path (`spec.items[0].x`), which both
/// ends up in messages ("<name> in body ...") and, under `base`, in the field path.
struct Validator<'a> {
    base: &'a str,
    regexes: HashMap<String, Result<Regex, String>>,
}

impl<'a> Validator<'a> {
    fn new(base: &'a str) -> Self {
        Validator {
            base,
            regexes: HashMap::new(),
        }
    }

    fn field(&self, name: &str) -> String {
        let name = name.strip_prefix('.').unwrap_or(name);
        match (self.base.is_empty(), name.is_empty()) {
            // A nil *field.Path prints as "<nil>"; kube really answers that for root-level errors.
            (true, true) => "<nil>".into(),
            (true, false) => name.into(),
            (false, true) => self.base.into(),
            (false, false) => format!("{}.{name}", self.base),
        }
    }

    fn in_body(&self, name: &str, value: &str, what: impl Display) -> FieldError {
        invalid(self.field(name), value, format!("{name} in body {what}"))
    }

    fn type_invalid(&self, name: &str, expected: &str, got: &str) -> FieldError {
        let q = go_quote(got);
        let message = format!("Invalid value: {q}: {name} in body must be of type {expected}: {q}");
        fe(self.field(name), "FieldValueTypeInvalid", message)
    }

    /// Junctor failures are plain errors in go-openapi; kube files them under the root path.
    fn composite(&self, msg: String) -> FieldError {
        invalid(self.field(""), "\"\"", msg)
    }

    fn check(&mut self, s: &Value, x: &Value, name: &str, root: bool, out: &mut Vec<FieldError>) {
        if !s.is_object() {
            return;
        }
        let types: Vec<&str> = match ty(s) {
            _ if flag(s, INT_OR_STRING) => vec!["integer", "string"],
            "" => vec![],
            t => vec![t],
        };
        let nullable = flag(s, "nullable");
        let format = Some(str_of(s, "format"))
            .filter(|f| FORMATS.split_whitespace().any(|k| k == f.replace('-', "")));
        if x.is_null() {
            if !types.is_empty() && !nullable {
                out.push(self.type_invalid(name, &types.join(","), "null"));
            }
            if !nullable {
                self.check_enum(s, x, name, out);
            }
            return;
        }
        let got = json_type(x);
        let float_int = got == "number"
            && x.as_f64().is_some_and(is_json_integer)
            && types.contains(&"integer");
        let type_ok =
            types.contains(&got) || float_int || (got == "integer" && types.contains(&"number"));
        let stringish = x.is_string() || x.is_array();
        let numeric_type = types.iter().any(|t| *t == "number" || *t == "integer");
        // A string format on a string-ish value leaves the type unchecked, as go-openapi does.
        let applies = !types.is_empty() || format.is_some();
        let format_only = format.is_some() && !numeric_type && stringish;
        if let Some(f) = format.filter(|_| !stringish && !type_ok) {
            let data_format = match got {
                "integer" => "int64",
                "number" => "float64",
                _ => "",
            };
            out.push(self.type_invalid(name, f, data_format));
        } else if applies && !type_ok && !format_only {
            out.push(self.type_invalid(name, &types.join(","), got));
        }
        self.check_junctors(s, x, name, out);
        match x {
            Value::String(v) => self.check_string(s, v, format, name, out),
            Value::Number(n) => self.check_number(s, n, name, out),
            Value::Array(a) => {
                if let Some(it) = items(s) {
                    for (i, v) in a.iter().enumerate() {
                        self.check(it, v, &index(name, i), false, out);
                    }
                }
                let len = a.len() as u64;
                if let Some(min) = uint(s, "minItems").filter(|m| len < *m) {
                    out.push(self.in_body(
                        name,
                        &len.to_string(),
                        format!("should have at least {min} items"),
                    ));
                }
                if let Some(max) = uint(s, "maxItems").filter(|m| len > *m) {
                    out.push(too_many(self.field(name), len, max));
                }
            }
            _ => {}
        }
        self.check_enum(s, x, name, out);
        if let Value::Object(m) = x {
            self.check_object(s, m, name, root, out);
        }
    }

    fn check_junctors(&mut self, s: &Value, x: &Value, name: &str, out: &mut Vec<FieldError>) {
        let run = |v: &mut Self, sub: &Value| {
            let mut r = Vec::new();
            v.check(sub, x, name, false, &mut r);
            r
        };
        // go-openapi reports the alternative that got furthest; fewest errors approximates that.
        let any_of = list(s, "anyOf");
        if !any_of.is_empty() {
            let mut best: Option<Vec<FieldError>> = None;
            let mut ok = false;
            for sub in any_of {
                let r = run(self, sub);
                if r.is_empty() {
                    (ok, best) = (true, None);
                    break;
                }
                if best.as_ref().is_none_or(|b| r.len() < b.len()) {
                    best = Some(r);
                }
            }
            if !ok {
                out.push(self.composite(format!(
                    "{} must validate at least one schema (anyOf)",
                    go_quote(name)
                )));
            }
            out.extend(best.unwrap_or_default());
        }
        let one_of = list(s, "oneOf");
        if !one_of.is_empty() {
            let (mut best, mut valid): (Option<Vec<FieldError>>, usize) = (None, 0);
            for sub in one_of {
                let r = run(self, sub);
                if r.is_empty() {
                    (valid, best) = (valid + 1, None);
                } else if valid == 0 && best.as_ref().is_none_or(|b| r.len() < b.len()) {
                    best = Some(r);
                }
            }
            if valid != 1 {
                let found = if valid == 0 {
                    "Found none valid".to_string()
                } else {
                    format!("Found {valid} valid alternatives")
                };
                out.push(self.composite(format!(
                    "{} must validate one and only one schema (oneOf). {found}",
                    go_quote(name)
                )));
                out.extend(best.unwrap_or_default());
            }
        }
        let all_of = list(s, "allOf");
        if !all_of.is_empty() {
            let mut valid = 0;
            for sub in all_of {
                let r = run(self, sub);
                valid += usize::from(r.is_empty());
                out.extend(r);
            }
            if valid != all_of.len() {
                let none = if valid == 0 { ". None validated" } else { "" };
                out.push(self.composite(format!(
                    "{} must validate all the schemas (allOf){none}",
                    go_quote(name)
                )));
            }
        }
        if present(s, "not").is_some_and(|n| n.is_object() && run(self, n).is_empty()) {
            let msg = format!("{} must not validate the schema (not)", go_quote(name));
            out.push(self.composite(msg));
        }
    }

    fn check_string(
        &mut self,
        s: &Value,
        v: &str,
        format: Option<&str>,
        name: &str,
        out: &mut Vec<FieldError>,
    ) {
        // Lengths count characters, though kube 1.33 words the error in bytes.
        let len = v.chars().count() as u64;
        if let Some(max) = uint(s, "maxLength").filter(|m| len > *m) {
            let unit = if max == 1 { "byte" } else { "bytes" };
            out.push(fe(
                self.field(name),
                "FieldValueTooLong",
                format!("Too long: may not be more than {max} {unit}"),
            ));
        }
        if let Some(min) = uint(s, "minLength").filter(|m| len < *m) {
            out.push(self.in_body(
                name,
                &go_quote(v),
                format!("should be at least {min} chars long"),
            ));
        }
        let pattern = str_of(s, "pattern");
        if !pattern.is_empty() {
            let compiled = self.regexes.entry(pattern.to_string()).or_insert_with(|| {
                Regex::new(pattern).map_err(|_| regex_error(pattern).unwrap_or_default())
            });
            match compiled
                .as_ref()
                .map(|re| re.is_match(v))
                .map_err(String::clone)
            {
                Ok(true) => {}
                Ok(false) => {
                    out.push(self.in_body(name, &go_quote(v), format!("should match '{pattern}'")))
                }
                Err(e) => {
                    let why = format!("should match '{pattern}, but pattern is invalid: {e}'");
                    out.push(self.in_body(name, &go_quote(v), why));
                }
            }
        }
        if let Some(f) = format.filter(|f| !format_ok(&f.replace('-', ""), v)) {
            out.push(self.type_invalid(name, f, v));
        }
    }

    fn check_number(&self, s: &Value, n: &Number, name: &str, out: &mut Vec<FieldError>) {
        let value = go_num(n);
        let f = n.as_f64().unwrap_or(0.0);
        // go-openapi compares integers against integer-truncated limits, and says so.
        let int = n.as_i64();
        if let Some(m) = s.get("multipleOf").and_then(Value::as_f64) {
            let (bad, shown) = match int {
                Some(i) if m.fract() == 0.0 && m >= 1.0 => {
                    (i % (m as i64) != 0, (m as i64).to_string())
                }
                _ => (
                    !is_json_integer(if m < 1.0 { (1.0 / m) * f } else { f / m }),
                    go_float(m),
                ),
            };
            if bad {
                out.push(self.in_body(name, &value, format!("should be a multiple of {shown}")));
            }
        }
        let limits = [
            ("minimum", "exclusiveMinimum", "greater than"),
            ("maximum", "exclusiveMaximum", "less than"),
        ];
        for (k, excl_key, word) in limits {
            let Some(limit) = s.get(k).and_then(Value::as_f64) else {
                continue;
            };
            let excl = flag(s, excl_key);
            let (ord, shown) = match int {
                Some(i) => (i.cmp(&(limit as i64)), (limit as i64).to_string()),
                None => (
                    f.partial_cmp(&limit).unwrap_or(std::cmp::Ordering::Equal),
                    go_float(limit),
                ),
            };
            let beyond = if k == "minimum" {
                ord.is_lt()
            } else {
                ord.is_gt()
            };
            if beyond || (excl && ord.is_eq()) {
                let how = if excl {
                    format!("should be {word} {shown}")
                } else {
                    format!("should be {word} or equal to {shown}")
                };
                out.push(self.in_body(name, &value, how));
            }
        }
    }

    fn check_enum(&self, s: &Value, x: &Value, name: &str, out: &mut Vec<FieldError>) {
        let values = list(s, "enum");
        if values.is_empty() || (!x.is_null() && values.iter().any(|v| json_eq(v, x))) {
            return;
        }
        let supported: Vec<String> = values
            .iter()
            .map(|v| {
                v.as_str().map_or_else(
                    || serde_json::to_string(v).unwrap_or_default(),
                    String::from,
                )
            })
            .collect();
        out.push(not_supported(self.field(name), &go_value(x), &supported));
    }

    fn check_object(
        &mut self,
        s: &Value,
        m: &Map<String, Value>,
        name: &str,
        root: bool,
        out: &mut Vec<FieldError>,
    ) {
        let n = m.len() as u64;
        // go-openapi stops at a property count violation.
        if let Some(min) = uint(s, "minProperties").filter(|min| n < *min) {
            out.push(self.in_body(
                name,
                &n.to_string(),
                format!("should have at least {min} properties"),
            ));
            return;
        }
        if let Some(max) = uint(s, "maxProperties").filter(|max| n > *max) {
            out.push(too_many(self.field(name), n, max));
            return;
        }
        let known = |k: &str| prop(s, k).is_some();
        match additional(s) {
            Some(Value::Bool(false)) => {
                for (k, _) in sorted(m).into_iter().filter(|(k, _)| !known(k)) {
                    let why = format!("{name}.{k} in body is a forbidden property");
                    out.push(invalid(self.field(name), &go_quote(k), why));
                }
            }
            Some(ap @ Value::Object(_)) => {
                for (k, v) in sorted(m).into_iter().filter(|(k, _)| !known(k)) {
                    self.check(ap, v, &format!("{name}.{k}"), false, out);
                }
            }
            _ => {}
        }
        for (k, ps) in props(s).map(sorted).unwrap_or_default() {
            let Some(v) = m.get(k) else { continue };
            if root && k == "metadata" {
                // ObjectMeta is validated elsewhere; the schema may only constrain these two.
                for sub in ["name", "generateName"] {
                    if let (Some(ss), Some(sv)) = (prop(ps, sub), v.get(sub)) {
                        self.check(ss, sv, &format!("metadata.{sub}"), false, out);
                    }
                }
            } else {
                self.check(ps, v, &child(name, k), false, out);
            }
        }
        for r in list(s, "required").iter().filter_map(Value::as_str) {
            if !m.contains_key(r) {
                out.push(FieldError::required(self.field(&format!("{name}.{r}"))));
            }
        }
    }
}

fn too_many(field: String, actual: u64, max: u64) -> FieldError {
    fe(
        field,
        "FieldValueTooMany",
        format!("Too many: {actual}: must have at most {max} items"),
    )
}

fn rx(cell: &'static OnceLock<Regex>, pattern: &str) -> &'static Regex {
    cell.get_or_init(|| Regex::new(pattern).expect("built-in pattern"))
}

/// kube-openapi's `strfmt` checks, `name` without dashes (`date-time` is `datetime`).
fn format_ok(name: &str, v: &str) -> bool {
    static HOST: OnceLock<Regex> = OnceLock::new();
    static UUID: OnceLock<Regex> = OnceLock::new();
    static UUID3: OnceLock<Regex> = OnceLock::new();
    static UUID4: OnceLock<Regex> = OnceLock::new();
    static UUID5: OnceLock<Regex> = OnceLock::new();
    static EMAIL: OnceLock<Regex> = OnceLock::new();
    static B64: OnceLock<Regex> = OnceLock::new();
    static TIME: OnceLock<Regex> = OnceLock::new();
    static HEX: OnceLock<Regex> = OnceLock::new();
    const L: &str = r"[a-zA-Z0-9\p{S}\p{L}]";
    match name {
        "hostname" => {
            let re = format!(
                r"^({L}((-?{L}{{0,62}})?)|({L}(([a-zA-Z0-9\-\p{{S}}\p{{L}}]{{0,61}}{L})?)(\.)){{1,}}({L})(-?{L}){{1,62}})$"
            );
            rx(&HOST, &re).is_match(v) && v.len() <= 255 && v.split('.').all(|p| p.len() <= 63)
        }
        "uuid" => rx(
            &UUID,
            r"(?i)^[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}$",
        )
        .is_match(v),
        "uuid3" => rx(
            &UUID3,
            r"(?i)^[0-9a-f]{8}-?[0-9a-f]{4}-?3[0-9a-f]{3}-?[0-9a-f]{4}-?[0-9a-f]{12}$",
        )
        .is_match(v),
        "uuid4" => rx(
            &UUID4,
            r"(?i)^[0-9a-f]{8}-?[0-9a-f]{4}-?4[0-9a-f]{3}-?[89ab][0-9a-f]{3}-?[0-9a-f]{12}$",
        )
        .is_match(v),
        "uuid5" => rx(
            &UUID5,
            r"(?i)^[0-9a-f]{8}-?[0-9a-f]{4}-?5[0-9a-f]{3}-?[89ab][0-9a-f]{3}-?[0-9a-f]{12}$",
        )
        .is_match(v),
        "email" => {
            // net/mail also takes `Name <addr>`.
            let addr = v
                .rsplit_once('<')
                .and_then(|(_, a)| a.strip_suffix('>'))
                .unwrap_or(v);
            let atom = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+";
            rx(&EMAIL, &format!(r"^{atom}(\.{atom})*@{atom}(\.{atom})*$")).is_match(addr)
        }
        "byte" => rx(
            &B64,
            r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=|[A-Za-z0-9+/]{4})$",
        )
        .is_match(v),
        "ipv4" => v.parse::<std::net::IpAddr>().is_ok() && v.contains('.'),
        "ipv6" => v.parse::<std::net::IpAddr>().is_ok() && v.contains(':'),
        "cidr" => v.split_once('/').is_some_and(|(ip, bits)| {
            let max = match ip.parse::<std::net::IpAddr>() {
                Ok(std::net::IpAddr::V4(_)) => 32,
                Ok(std::net::IpAddr::V6(_)) => 128,
                Err(_) => return false,
            };
            !bits.is_empty()
                && bits.bytes().all(|b| b.is_ascii_digit())
                && bits.parse::<u32>().is_ok_and(|b| b <= max)
        }),
        "mac" => is_mac(v),
        "bsonobjectid" => v.len() == 24 && v.bytes().all(|b| b.is_ascii_hexdigit()),
        "hexcolor" => rx(&HEX, r"^#?([0-9a-fA-F]{3}|[0-9a-fA-F]{6})$").is_match(v),
        "date" => is_date(v),
        "datetime" => {
            let lower = v.to_lowercase();
            let parts: Vec<&str> = lower.split('t').collect();
            let re = rx(
                &TIME,
                r"^([0-9]{2}):([0-9]{2}):([0-9]{2})(.[0-9]+)?(z|([+-][0-9]{2}:[0-9]{2}))$",
            );
            v.len() >= 4
                && parts.len() >= 2
                && is_date(parts[0])
                && re
                    .captures(parts[1])
                    .is_some_and(|c| &c[1] <= "23" && &c[2] <= "59" && &c[3] <= "59")
        }
        "duration" => is_duration(v),
        "uri" => is_request_uri(v),
        _ => true,
    }
}

/// `time.Parse("2006-01-02", v)`.
fn is_date(v: &str) -> bool {
    let b = v.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return false;
    }
    let num = |a: usize, b: usize| {
        let part = &v[a..b];
        part.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| part.parse::<u32>().ok())
            .flatten()
    };
    let (Some(y), Some(m), Some(d)) = (num(0, 4), num(5, 7), num(8, 10)) else {
        return false;
    };
    let leap = y % 4 == 0 && (y % 100 != 0 || y % 400 == 0);
    let days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    (1..=12).contains(&m) && d >= 1 && d <= days[m as usize - 1]
}

/// strfmt's duration: Go's syntax or any "<n> <unit>" run, units from ns to weeks.
fn is_duration(v: &str) -> bool {
    static RUN: OnceLock<Regex> = OnceLock::new();
    const UNITS: [&[&str]; 8] = [
        &["ns", "nano"],
        &["us", "µs", "micro"],
        &["ms", "milli"],
        &["s", "sec"],
        &["m", "min"],
        &["h", "hr", "hour"],
        &["d", "day"],
        &["w", "wk", "week"],
    ];
    if matches!(v, "0" | "+0" | "-0") {
        return true;
    }
    rx(&RUN, r"(\d+)\s*([A-Za-zµ]+)").captures_iter(v).any(|c| {
        let unit = c[2].to_lowercase();
        UNITS.iter().any(|vs| {
            vs.iter()
                .enumerate()
                .any(|(i, u)| *u == unit || (i == vs.len() - 1 && unit.starts_with(u)))
        })
    })
}

/// `net.ParseMAC`: 6, 8 or 20 octets as `xx:xx` / `xx-xx` or `xxxx.xxxx`.
fn is_mac(v: &str) -> bool {
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    let groups = |sep: char, width: usize, counts: [usize; 3]| {
        let parts: Vec<&str> = v.split(sep).collect();
        counts.contains(&parts.len()) && parts.iter().all(|p| hex(p, width))
    };
    groups(':', 2, [6, 8, 20]) || groups('-', 2, [6, 8, 20]) || groups('.', 4, [3, 4, 10])
}

/// `url.ParseRequestURI`, the parts of it that reject input.
fn is_request_uri(v: &str) -> bool {
    if v.is_empty() || v.bytes().any(|b| b < 0x20 || b == 0x7f) {
        return false;
    }
    if v == "*" {
        return true;
    }
    let scheme_end = v.find(|c: char| !(c.is_ascii_alphanumeric() || "+-.".contains(c)));
    let (scheme, rest) = match scheme_end {
        Some(0) if v.starts_with(':') => return false,
        Some(i) if v[i..].starts_with(':') && v.as_bytes()[0].is_ascii_alphabetic() => {
            (&v[..i], &v[i + 1..])
        }
        _ => ("", v),
    };
    let rest = rest.split_once('?').map_or(rest, |(p, _)| p);
    if !rest.starts_with('/') {
        return !scheme.is_empty();
    }
    let path = match rest.strip_prefix("//").filter(|_| !scheme.is_empty()) {
        Some(auth) => {
            let (host, path) = auth.split_once('/').map_or((auth, ""), |(h, p)| (h, p));
            let host = host.rsplit_once('@').map_or(host, |(_, h)| h);
            let port = if host.starts_with('[') {
                host.split_once(']').map(|(_, p)| p)
            } else {
                host.rsplit_once(':').map(|(_, p)| p)
            };
            if port.is_some_and(|p| {
                !p.trim_start_matches(':')
                    .bytes()
                    .all(|b| b.is_ascii_digit())
            }) {
                return false;
            }
            path
        }
        None => rest,
    };
    // Every escape must be `%` and two hex digits.
    path.split('%')
        .skip(1)
        .all(|s| s.len() >= 2 && s.as_bytes()[..2].iter().all(u8::is_ascii_hexdigit))
}

// ---- embedded resources and list types, checked after the schema ----

/// `x-kubernetes-embedded-resource` objects need apiVersion and kind, and sane metadata.
fn embedded_meta(s: &Value, x: &Value, p: &str, force: bool, out: &mut Vec<FieldError>) {
    match x {
        Value::Object(m) => {
            if force || flag(s, EMBEDDED) {
                embedded_resource(m, p, out);
            }
            for (k, v) in sorted(m) {
                if let Some(ps) = prop(s, k) {
                    embedded_meta(ps, v, &child(p, k), false, out);
                } else if let Some(ap) = additional_schema(s) {
                    embedded_meta(ap, v, &key(p, k), false, out);
                }
            }
        }
        Value::Array(a) => {
            if let Some(it) = items(s) {
                for (i, v) in a.iter().enumerate() {
                    embedded_meta(it, v, &index(p, i), false, out);
                }
            }
        }
        _ => {}
    }
}

const DNS1035_MSG: &str = "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')";
const DNS1123_MSG: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";

fn label_errors(v: &str, first_alpha: bool, msg: &str) -> Vec<String> {
    let mut errs = Vec::new();
    if v.len() > 63 {
        errs.push("must be no more than 63 characters".to_string());
    }
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
    let first_ok = v.chars().next().is_some_and(|c| {
        if first_alpha {
            c.is_ascii_lowercase()
        } else {
            ok_char(c) && c != '-'
        }
    });
    if !(first_ok && v.chars().all(ok_char) && !v.ends_with('-')) {
        errs.push(msg.to_string());
    }
    errs
}

fn embedded_resource(m: &Map<String, Value>, p: &str, out: &mut Vec<FieldError>) {
    let (av, kd) = (child(p, "apiVersion"), child(p, "kind"));
    match m.get("apiVersion") {
        None => out.push(FieldError::required(&av)),
        Some(Value::String(v)) if v.is_empty() => out.push(FieldError::required(&av)),
        Some(Value::String(v)) if v != "/" && v.matches('/').count() > 1 => {
            out.push(invalid(
                &av,
                &go_quote(v),
                format!("unexpected GroupVersion string: {v}"),
            ));
        }
        Some(Value::String(_)) => {}
        Some(v) => out.push(invalid(&av, &go_value(v), "must be a string")),
    }
    match m.get("kind") {
        None => out.push(FieldError::required(&kd)),
        Some(Value::String(v)) if v.is_empty() => out.push(FieldError::required(&kd)),
        Some(Value::String(v)) => {
            let errs = label_errors(&v.to_lowercase(), true, DNS1035_MSG);
            if !errs.is_empty() {
                out.push(invalid(
                    &kd,
                    &go_quote(v),
                    format!(
                        "may have mixed case, but should otherwise match: {}",
                        errs.join(",")
                    ),
                ));
            }
        }
        Some(v) => out.push(invalid(&kd, &go_value(v), "must be a string")),
    }
    let Some(meta) = m.get("metadata") else {
        return;
    };
    let mp = child(p, "metadata");
    let Some(meta) = meta.as_object() else {
        return out.push(invalid(&mp, &go_value(meta), "must be an object"));
    };
    for (k, prefix) in [("generateName", true), ("name", false)] {
        let Some(v) = meta
            .get(k)
            .and_then(Value::as_str)
            .filter(|v| !v.is_empty())
        else {
            continue;
        };
        let mut why = Vec::new();
        if !prefix && (v == "." || v == "..") {
            why.push(format!("may not be '{v}'"));
        }
        why.extend(
            ['/', '%']
                .iter()
                .filter(|c| v.contains(**c))
                .map(|c| format!("may not contain '{c}'")),
        );
        out.extend(
            why.into_iter()
                .map(|w| invalid(child(&mp, k), &go_quote(v), w)),
        );
    }
    if let Some(ns) = meta
        .get("namespace")
        .and_then(Value::as_str)
        .filter(|v| !v.is_empty())
    {
        let errs = label_errors(ns, false, DNS1123_MSG);
        out.extend(
            errs.into_iter()
                .map(|w| invalid(child(&mp, "namespace"), &go_quote(ns), w)),
        );
    }
}

/// Indices of second appearances, as kube reports them (a third copy is not reported again).
fn second_appearances(values: &[Value]) -> Vec<usize> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut dups = Vec::new();
    for (i, v) in values.iter().enumerate() {
        // Scalars compare with their Go type (1 and 1.0 differ), compounds as sorted JSON.
        let identity = match v {
            Value::Array(_) | Value::Object(_) => go_sharp(v),
            _ => format!("{}:{}", json_type(v), go_sharp(v)),
        };
        let n = seen.entry(identity).or_insert(0);
        *n += 1;
        if *n == 2 {
            dups.push(i);
        }
    }
    dups
}

/// `x-kubernetes-list-type: set` elements and `map` keys must be unique.
fn list_type_errors(s: &Value, x: &Value, p: &str, out: &mut Vec<FieldError>) {
    match x {
        Value::Object(m) => {
            if let Some(ap) = additional_schema(s) {
                for (k, v) in sorted(m) {
                    list_type_errors(ap, v, &key(p, k), out);
                }
            }
            for (k, v) in sorted(m) {
                if let Some(ps) = prop(s, k) {
                    list_type_errors(ps, v, &child(p, k), out);
                }
            }
        }
        Value::Array(a) => {
            match str_of(s, LIST_TYPE) {
                "set" => out.extend(
                    second_appearances(a)
                        .into_iter()
                        .map(|i| duplicate(index(p, i), &a[i])),
                ),
                "map" => {
                    if let Some(i) = a.iter().position(|v| !v.is_null() && !v.is_object()) {
                        out.push(invalid(
                            index(p, i),
                            &go_value(&a[i]),
                            "must be an object for an array of list-type map",
                        ));
                    } else {
                        let keys: Vec<Value> = a
                            .iter()
                            .map(|e| {
                                let mut k = Map::new();
                                for f in list(s, LIST_MAP_KEYS).iter().filter_map(Value::as_str) {
                                    if let Some(v) = e.get(f) {
                                        k.insert(f.to_string(), v.clone());
                                    }
                                }
                                Value::Object(k)
                            })
                            .collect();
                        out.extend(
                            second_appearances(&keys)
                                .into_iter()
                                .map(|i| duplicate(index(p, i), &keys[i])),
                        );
                    }
                }
                _ => {}
            }
            if let Some(it) = items(s) {
                for (i, v) in a.iter().enumerate() {
                    list_type_errors(it, v, &index(p, i), out);
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const P: &str = "spec.versions[0].schema.openAPIV3Schema";

    fn msgs(errs: &[FieldError]) -> Vec<String> {
        errs.iter()
            .map(|e| format!("{}: {}", e.field, e.message))
            .collect()
    }
    fn structural(schema: Value) -> Vec<String> {
        msgs(&structural_errors(&schema, P))
    }
    fn check(schema: Value, obj: Value) -> Vec<String> {
        msgs(&validate(&schema, &obj))
    }
    fn obj(props: Value) -> Value {
        json!({"type": "object", "properties": props})
    }

    // ---- structural ----

    #[test]
    fn missing_types_are_reported_per_level() {
        let got = structural(json!({"properties": {
            "foo": {"properties": {"a": {}}},
            "bar": {"items": {}},
            "json": {"x-kubernetes-preserve-unknown-fields": true},
            "ios": {"x-kubernetes-int-or-string": true}
        }}));
        assert_eq!(
            got,
            [
                format!(
                    "{P}.properties[bar].items.type: Required value: must not be empty for specified array items"
                ),
                format!(
                    "{P}.properties[bar].type: Required value: must not be empty for specified object fields"
                ),
                format!(
                    "{P}.properties[foo].properties[a].type: Required value: must not be empty for specified object fields"
                ),
                format!(
                    "{P}.properties[foo].type: Required value: must not be empty for specified object fields"
                ),
                format!("{P}.type: Required value: must not be empty at the root"),
            ]
        );
    }

    #[test]
    fn root_shape() {
        assert_eq!(
            structural(json!({"type": "integer"})),
            [format!(
                "{P}.type: Invalid value: \"integer\": must be object at the root"
            )]
        );
        assert_eq!(
            structural(json!({"type": "object", "additionalProperties": false})),
            [format!(
                "{P}.additionalProperties: Forbidden: must not be used at the root"
            )]
        );
        assert_eq!(
            structural(json!({"type": "object", "nullable": true})),
            [format!(
                "{P}.nullable: Forbidden: nullable cannot be true at the root"
            )]
        );
        assert_eq!(
            structural(obj(json!({"slice": {"type": "array"}}))),
            [format!(
                "{P}.properties[slice].items: Required value: must be specified"
            )]
        );
        assert!(structural(obj(
            json!({"spec": {"type": "object", "properties": {"a": {"type": "string"}}}})
        ))
        .is_empty());
    }

    #[test]
    fn junctors_only_validate_values() {
        let got = structural(json!({
            "type": "object",
            "properties": {"foo": {"type": "string"}},
            "not": {"type": "string", "title": "t", "nullable": true, "default": "x"},
            "allOf": [{"properties": {"foo": {"description": "d", "additionalProperties": true, "x-kubernetes-list-type": "set"}}}],
            "anyOf": [{"properties": {"metadata": {}}}]
        }));
        assert_eq!(
            got,
            [
                format!(
                    "{P}.allOf[0].properties[foo].additionalProperties: Forbidden: must be undefined to be structural"
                ),
                format!(
                    "{P}.allOf[0].properties[foo].description: Forbidden: must be empty to be structural"
                ),
                format!(
                    "{P}.allOf[0].properties[foo].x-kubernetes-list-type: Forbidden: must be undefined to be structural"
                ),
                format!(
                    "{P}.anyOf[0].properties[metadata]: Forbidden: must not be specified in a nested context"
                ),
                format!("{P}.not.default: Forbidden: must be undefined to be structural"),
                format!("{P}.not.nullable: Forbidden: must be false to be structural"),
                format!("{P}.not.title: Forbidden: must be empty to be structural"),
                format!("{P}.not.type: Forbidden: must be empty to be structural"),
                format!(
                    "{P}.properties[metadata]: Required value: because it is defined in {P}.anyOf[0].properties[metadata]"
                ),
                // The keyword checks walk junctors too.
                format!(
                    "{P}.allOf[0].properties[foo].type: Required value: must be array if x-kubernetes-list-type is specified"
                ),
            ]
        );
    }

    #[test]
    fn int_or_string_spellings() {
        let ios = |extra: Value| {
            let mut p = json!({"x-kubernetes-int-or-string": true});
            p.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            structural(obj(json!({"a": p})))
        };
        assert!(ios(json!({"anyOf": [{"type": "integer"}, {"type": "string"}]})).is_empty());
        assert!(ios(json!({"allOf": [{"anyOf": [{"type": "integer"}, {"type": "string"}]}, {"pattern": "abc"}]})).is_empty());
        assert_eq!(
            ios(json!({"anyOf": [{"type": "string"}, {"type": "integer"}]})),
            [
                format!(
                    "{P}.properties[a].anyOf[0].type: Forbidden: must be empty to be structural"
                ),
                format!(
                    "{P}.properties[a].anyOf[1].type: Forbidden: must be empty to be structural"
                ),
            ]
        );
        assert_eq!(
            ios(json!({"x-kubernetes-preserve-unknown-fields": true})),
            [format!(
                "{P}.properties[a].x-kubernetes-preserve-unknown-fields: Invalid value: true: must be false if x-kubernetes-int-or-string is true"
            )]
        );
    }

    #[test]
    fn root_metadata_may_only_constrain_names() {
        let name = json!({"type": "string", "maxLength": 10});
        assert!(structural(obj(json!({"metadata": {"type": "object", "properties": {"name": name, "generateName": name}}}))).is_empty());
        assert_eq!(
            structural(obj(
                json!({"metadata": {"type": "object", "properties": {"labels": {"type": "object"}}}})
            )),
            [format!(
                "{P}.properties[metadata]: Forbidden: must not specify anything other than name and generateName, but metadata is implicitly specified"
            )]
        );
        assert_eq!(
            structural(obj(
                json!({"metadata": {"type": "string"}, "kind": {"type": "integer"}})
            )),
            [
                format!("{P}.properties[kind].type: Invalid value: \"integer\": must be string"),
                format!("{P}.properties[metadata].type: Invalid value: \"string\": must be object"),
            ]
        );
        assert_eq!(
            structural(obj(json!({"metadata": {"type": "object", "default": {}}}))),
            [format!(
                "{P}.properties[metadata].default: Forbidden: must not be set in top-level metadata"
            )]
        );
    }

    #[test]
    fn embedded_resource_rules() {
        assert_eq!(
            structural(obj(
                json!({"e": {"type": "object", "x-kubernetes-embedded-resource": true}})
            )),
            [format!(
                "{P}.properties[e].properties: Required value: must not be empty if x-kubernetes-embedded-resource is true without x-kubernetes-preserve-unknown-fields"
            )]
        );
        assert_eq!(
            structural(obj(
                json!({"e": {"type": "array", "items": {"type": "string"}, "x-kubernetes-embedded-resource": true, "x-kubernetes-preserve-unknown-fields": true}})
            )),
            [format!(
                "{P}.properties[e].type: Invalid value: \"array\": must be object if x-kubernetes-embedded-resource is true"
            )]
        );
    }

    #[test]
    fn forbidden_keywords() {
        let got = structural(obj(json!({
            "a": {"type": "array", "items": {"type": "string"}, "uniqueItems": true, "additionalItems": false},
            "b": {"type": "string", "$ref": "#/x"},
            "c": {"type": "object", "properties": {"x": {"type": "string"}}, "additionalProperties": {"type": "string"}},
            "d": {"type": "object", "x-kubernetes-preserve-unknown-fields": false},
            "f": {"type": "strin"}
        })));
        assert_eq!(
            got,
            [
                format!(
                    "{P}.properties[a].additionalItems: Forbidden: additionalItems is not supported"
                ),
                format!(
                    "{P}.properties[a].uniqueItems: Forbidden: uniqueItems cannot be set to true since the runtime complexity becomes quadratic"
                ),
                format!("{P}.properties[b].$ref: Forbidden: $ref is not supported"),
                format!(
                    "{P}.properties[c].additionalProperties: Forbidden: additionalProperties and properties are mutual exclusive"
                ),
                format!(
                    "{P}.properties[d].x-kubernetes-preserve-unknown-fields: Invalid value: false: must be true or undefined"
                ),
                format!(
                    "{P}.properties[f].type: Unsupported value: \"strin\": supported values: \"array\", \"boolean\", \"integer\", \"number\", \"object\", \"string\""
                ),
            ]
        );
        // The pattern is a structural error, so it comes alone and first.
        let pattern = structural(obj(json!({"e": {"type": "string", "pattern": "+"}})));
        assert_eq!(pattern.len(), 1);
        assert!(pattern[0].starts_with(&format!("{P}.properties[e].pattern: Invalid value: \"+\": must be a valid regular expression, but isn't: error parsing regexp: ")));
    }

    #[test]
    fn list_and_map_types() {
        let list = |extra: Value| {
            let mut p = json!({"type": "array", "items": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}, "port": {"type": "integer"}, "sub": {"type": "object"}}}});
            p.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            structural(obj(json!({"l": p})))
        };
        assert!(list(
            json!({"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]})
        )
        .is_empty());
        assert_eq!(
            list(json!({"x-kubernetes-list-type": "bag"})),
            [format!(
                "{P}.properties[l].x-kubernetes-list-type: Unsupported value: \"bag\": supported values: \"atomic\", \"set\", \"map\""
            )]
        );
        assert_eq!(
            list(json!({"x-kubernetes-list-type": "map"})),
            [format!(
                "{P}.properties[l].x-kubernetes-list-map-keys: Required value: must not be empty if x-kubernetes-list-type is map"
            )]
        );
        assert_eq!(
            list(
                json!({"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["port", "nope", "sub"]})
            ),
            [
                format!(
                    "{P}.properties[l].x-kubernetes-list-map-keys: Invalid value: []string{{\"port\", \"nope\", \"sub\"}}: entries must all be names of item properties"
                ),
                format!(
                    "{P}.properties[l].items.properties[sub].type: Invalid value: \"object\": must be a scalar type if parent array's x-kubernetes-list-type is map"
                ),
                format!(
                    "{P}.properties[l].items.properties[port].default: Required value: this property is in x-kubernetes-list-map-keys, so it must have a default or be a required property"
                ),
                format!(
                    "{P}.properties[l].items.properties[sub].default: Required value: this property is in x-kubernetes-list-map-keys, so it must have a default or be a required property"
                ),
            ]
        );
        assert_eq!(
            list(json!({"x-kubernetes-list-map-keys": ["name"]})),
            [format!(
                "{P}.properties[l].x-kubernetes-list-type: Required value: must be map if x-kubernetes-list-map-keys is non-empty"
            )]
        );
        assert_eq!(
            structural(obj(
                json!({"m": {"type": "string", "x-kubernetes-map-type": "weird"}})
            )),
            [
                format!(
                    "{P}.properties[m].type: Invalid value: \"string\": must be object if x-kubernetes-map-type is specified"
                ),
                format!(
                    "{P}.properties[m].x-kubernetes-map-type: Unsupported value: \"weird\": supported values: \"atomic\", \"granular\""
                ),
            ]
        );
    }

    #[test]
    fn defaults_must_validate_and_be_pruned() {
        let got = structural(obj(json!({
            "replicas": {"type": "integer", "maximum": 10, "default": 20},
            "spec": {"type": "object", "properties": {"a": {"type": "string"}}, "default": {"a": "x", "b": 1}},
            "kind": {"type": "string", "default": "Foo"}
        })));
        assert_eq!(
            got,
            [
                format!(
                    "{P}.properties[replicas].default: Invalid value: 20:  in body should be less than or equal to 10"
                ),
                format!(
                    "{P}.properties[spec].default: Invalid value: map[string]interface {{}}{{\"a\":\"x\", \"b\":1}}: must not have unknown fields"
                ),
                format!(
                    "{P}.properties[kind].default: Forbidden: must not be set in top-level kind"
                ),
            ]
        );
        assert_eq!(
            structural(obj(
                json!({"s": {"type": "object", "properties": {"n": {"type": "string"}}, "default": {"n": 5}}})
            )),
            [format!(
                "{P}.properties[s].default.n: Invalid value: \"integer\": n in body must be of type string: \"integer\""
            )]
        );
        // Defaults under preserve-unknown-fields are fine, unknown fields included.
        assert!(structural(obj(json!({"p": {"type": "object", "x-kubernetes-preserve-unknown-fields": true, "default": {"any": 1}}}))).is_empty());
    }

    // ---- pruning ----

    #[test]
    fn prune_drops_unknown_fields_and_reports_paths() {
        let schema = obj(json!({
            "spec": {"type": "object", "properties": {
                "items": {"type": "array", "items": {"type": "object", "properties": {"name": {"type": "string"}}}},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "raw": {"type": "object", "x-kubernetes-preserve-unknown-fields": true, "properties": {"known": {"type": "object"}}},
                "pod": {"type": "object", "x-kubernetes-embedded-resource": true, "properties": {"spec": {"type": "object"}}}
            }}
        }));
        let mut o = json!({
            "apiVersion": "v1", "kind": "K", "metadata": {"name": "x", "anything": 1},
            "spec": {
                "foo": 1,
                "items": [{"name": "a", "bar": 2}],
                "labels": {"a": "b"},
                "raw": {"kept": {"deep": 1}, "known": {"gone": 1}},
                "pod": {"apiVersion": "v1", "kind": "Pod", "metadata": {"x": 1}, "spec": {"y": 1}, "status": {}}
            },
            "status": {}
        });
        let pruned = prune(&schema, &mut o);
        assert_eq!(
            pruned,
            [
                "spec.foo",
                "spec.items[0].bar",
                "spec.pod.spec.y",
                "spec.pod.status",
                "spec.raw.known.gone",
                "status"
            ]
        );
        assert_eq!(
            o,
            json!({
                "apiVersion": "v1", "kind": "K", "metadata": {"name": "x", "anything": 1},
                "spec": {
                    "items": [{"name": "a"}],
                    "labels": {"a": "b"},
                    "raw": {"kept": {"deep": 1}, "known": {}},
                    "pod": {"apiVersion": "v1", "kind": "Pod", "metadata": {"x": 1}, "spec": {}}
                }
            })
        );
        let mut keep = json!({"a": {"b": 1}});
        assert!(prune(
            &json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}),
            &mut keep
        )
        .is_empty());
    }

    // ---- defaulting ----

    #[test]
    fn defaults_fill_absent_fields_recursively() {
        let schema = obj(json!({
            "spec": {"type": "object", "default": {}, "properties": {
                "replicas": {"type": "integer", "default": 1},
                "mode": {"type": "string", "nullable": true, "default": "auto"},
                "level": {"type": "string", "default": "info"},
                "ports": {"type": "array", "items": {"type": "object", "properties": {"protocol": {"type": "string", "default": "TCP"}}}},
                "env": {"type": "object", "additionalProperties": {"type": "object", "properties": {"v": {"type": "string", "default": "x"}}}}
            }}
        }));
        let mut o = json!({});
        apply_defaults(&schema, &mut o);
        assert_eq!(
            o,
            json!({"spec": {"replicas": 1, "mode": "auto", "level": "info"}})
        );
        let mut o = json!({"spec": {"mode": null, "level": null, "ports": [{}, {"protocol": "UDP"}], "env": {"A": {}}}});
        apply_defaults(&schema, &mut o);
        assert_eq!(
            o,
            json!({"spec": {"replicas": 1, "mode": null, "level": "info", "ports": [{"protocol": "TCP"}, {"protocol": "UDP"}], "env": {"A": {"v": "x"}}}})
        );
    }

    // ---- validation ----

    #[test]
    fn types_and_nullability() {
        let s = obj(json!({
            "i": {"type": "integer"}, "n": {"type": "number"}, "s": {"type": "string"}, "b": {"type": "boolean"},
            "o": {"type": "object"}, "a": {"type": "array", "items": {"type": "string"}},
            "z": {"type": "string", "nullable": true}, "ios": {"x-kubernetes-int-or-string": true}
        }));
        assert!(check(
            s.clone(),
            json!({"i": 2.0, "n": 1, "s": "", "b": true, "o": {}, "a": [], "z": null, "ios": "50%"})
        )
        .is_empty());
        assert!(check(s.clone(), json!({"ios": 5})).is_empty());
        assert_eq!(
            check(
                s,
                json!({"i": 1.5, "s": null, "o": [], "a": ["x", 1], "ios": true})
            ),
            [
                "a[1]: Invalid value: \"integer\": a[1] in body must be of type string: \"integer\"",
                "i: Invalid value: \"number\": i in body must be of type integer: \"number\"",
                "ios: Invalid value: \"boolean\": ios in body must be of type integer,string: \"boolean\"",
                "o: Invalid value: \"array\": o in body must be of type object: \"array\"",
                "s: Invalid value: \"null\": s in body must be of type string: \"null\"",
            ]
        );
    }

    #[test]
    fn scalar_constraints() {
        let s = obj(
            json!({"spec": {"type": "object", "required": ["name", "replicas"], "properties": {
                "replicas": {"type": "integer", "minimum": 1, "maximum": 10, "multipleOf": 2},
                "ratio": {"type": "number", "exclusiveMaximum": true, "maximum": 1.5},
                "name": {"type": "string", "pattern": "^[a-z]+$", "maxLength": 5, "minLength": 2},
                "mode": {"type": "string", "enum": ["a", "b"]},
                "level": {"type": "integer", "enum": [1, 2]}
            }}}),
        );
        assert_eq!(
            check(
                s.clone(),
                json!({"spec": {"replicas": 20, "ratio": 1.5, "name": "Abcdéf", "mode": "c", "level": 3}})
            ),
            [
                "spec.level: Unsupported value: 3: supported values: \"1\", \"2\"",
                "spec.mode: Unsupported value: \"c\": supported values: \"a\", \"b\"",
                "spec.name: Too long: may not be more than 5 bytes",
                "spec.name: Invalid value: \"Abcdéf\": spec.name in body should match '^[a-z]+$'",
                "spec.ratio: Invalid value: 1.5: spec.ratio in body should be less than 1.5",
                "spec.replicas: Invalid value: 20: spec.replicas in body should be less than or equal to 10",
            ]
        );
        assert_eq!(
            check(s, json!({"spec": {"replicas": 3, "name": "a"}})),
            [
                "spec.name: Invalid value: \"a\": spec.name in body should be at least 2 chars long",
                "spec.replicas: Invalid value: 3: spec.replicas in body should be a multiple of 2",
            ]
        );
        assert_eq!(
            check(
                obj(json!({"spec": {"type": "object", "required": ["x"]}})),
                json!({"spec": {}})
            ),
            ["spec.x: Required value"]
        );
    }

    #[test]
    fn collections() {
        let s = obj(json!({
            "items": {"type": "array", "minItems": 2, "maxItems": 3, "items": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 1}}}},
            "m": {"type": "object", "maxProperties": 1, "additionalProperties": {"type": "integer"}},
            "n": {"type": "object", "minProperties": 2, "additionalProperties": {"type": "integer"}},
            "closed": {"type": "object", "additionalProperties": false}
        }));
        assert_eq!(
            check(
                s.clone(),
                json!({"items": [{"name": "ab"}, {}, {}, {}], "m": {"a": 1, "b": 2}, "n": {"a": "x"}, "closed": {"x": 1}})
            ),
            [
                "closed: Invalid value: \"x\": closed.x in body is a forbidden property",
                "items[0].name: Too long: may not be more than 1 byte",
                "items: Too many: 4: must have at most 3 items",
                "m: Too many: 2: must have at most 1 items",
                "n: Invalid value: 1: n in body should have at least 2 properties",
            ]
        );
        assert_eq!(
            check(s, json!({"items": [{}], "m": {"a": "x"}})),
            [
                "items: Invalid value: 1: items in body should have at least 2 items",
                "m.a: Invalid value: \"string\": m.a in body must be of type integer: \"string\"",
            ]
        );
    }

    #[test]
    fn formats() {
        let f = |format: &str, value: Value| {
            check(
                obj(json!({"f": {"type": "string", "format": format}})),
                json!({"f": value}),
            )
        };
        for (format, good, bad) in [
            ("uuid", "123e4567-e89b-12d3-a456-426614174000", "nope"),
            ("date", "2024-02-29", "2023-02-29"),
            ("date-time", "2024-01-02T03:04:05Z", "2024-01-02 03:04:05"),
            ("byte", "aGVsbG8=", "hello!"),
            ("email", "a.b@example.com", "not-an-email"),
            ("hostname", "my-host.example.com", "-bad-"),
            ("ipv4", "10.0.0.1", "10.0.0"),
            ("ipv6", "::1", "1.2.3.4"),
            ("cidr", "10.0.0.0/8", "10.0.0.0/33"),
            ("uri", "https://example.com/x?y=1", "relative/path"),
            ("duration", "1h30m", "forever"),
            ("mac", "00:1a:2b:3c:4d:5e", "00:1a:2b"),
        ] {
            assert!(f(format, json!(good)).is_empty(), "{format} {good}");
            assert_eq!(
                f(format, json!(bad)),
                [format!(
                    "f: Invalid value: {bad:?}: f in body must be of type {format}: {bad:?}"
                )],
                "{format}"
            );
        }
        // kube strips the numeric and unknown formats; they constrain nothing.
        assert!(f("password", json!("anything")).is_empty());
        assert!(check(
            obj(json!({"n": {"type": "integer", "format": "int32"}})),
            json!({"n": 1_u64 << 40})
        )
        .is_empty());
        assert!(f("something-custom", json!("x")).is_empty());
    }

    #[test]
    fn junctor_validation() {
        let s = obj(json!({
            "delta": {"anyOf": [{"type": "string", "maxLength": 5}, {"type": "number", "minimum": 0}]},
            "one": {"type": "integer", "oneOf": [{"minimum": 0}, {"maximum": 10}]},
            "all": {"type": "string", "allOf": [{"minLength": 2}, {"pattern": "^a"}]},
            "not": {"type": "string", "not": {"enum": ["bad"]}}
        }));
        assert!(check(
            s.clone(),
            json!({"delta": 3, "one": 20, "all": "ab", "not": "ok"})
        )
        .is_empty());
        assert_eq!(
            check(
                s,
                json!({"delta": "foobarbaz", "one": 5, "all": "b", "not": "bad"})
            ),
            [
                "all: Invalid value: \"b\": all in body should be at least 2 chars long",
                "all: Invalid value: \"b\": all in body should match '^a'",
                "<nil>: Invalid value: \"\": \"all\" must validate all the schemas (allOf). None validated",
                "<nil>: Invalid value: \"\": \"delta\" must validate at least one schema (anyOf)",
                "delta: Too long: may not be more than 5 bytes",
                "<nil>: Invalid value: \"\": \"not\" must not validate the schema (not)",
                "<nil>: Invalid value: \"\": \"one\" must validate one and only one schema (oneOf). Found 2 valid alternatives",
            ]
        );
    }

    #[test]
    fn root_metadata_only_name_is_checked() {
        let s = obj(
            json!({"metadata": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 3}}}}),
        );
        assert_eq!(
            check(s, json!({"metadata": {"name": "toolong", "labels": 5}})),
            ["metadata.name: Too long: may not be more than 3 bytes"]
        );
    }

    #[test]
    fn embedded_resources() {
        let s = obj(
            json!({"pods": {"type": "array", "items": {"type": "object", "x-kubernetes-embedded-resource": true, "x-kubernetes-preserve-unknown-fields": true}}}),
        );
        assert!(check(
            s.clone(),
            json!({"pods": [{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}}]})
        )
        .is_empty());
        assert_eq!(
            check(s, json!({"pods": [{"metadata": {"name": "a/b", "namespace": "Bad"}}, {"apiVersion": "a/b/c", "kind": "no_good"}]})),
            [
                "pods[0].apiVersion: Required value",
                "pods[0].kind: Required value",
                "pods[0].metadata.name: Invalid value: \"a/b\": may not contain '/'",
                format!("pods[0].metadata.namespace: Invalid value: \"Bad\": {DNS1123_MSG}").as_str(),
                "pods[1].apiVersion: Invalid value: \"a/b/c\": unexpected GroupVersion string: a/b/c",
                format!("pods[1].kind: Invalid value: \"no_good\": may have mixed case, but should otherwise match: {DNS1035_MSG}").as_str(),
            ]
        );
    }

    #[test]
    fn list_type_uniqueness() {
        let s = obj(json!({
            "tags": {"type": "array", "x-kubernetes-list-type": "set", "items": {"type": "string"}},
            "ports": {"type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"],
                      "items": {"type": "object", "properties": {"name": {"type": "string"}, "port": {"type": "integer"}}}},
            "pairs": {"type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["a", "b"],
                      "items": {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "integer"}}}}
        }));
        assert_eq!(
            check(
                s,
                json!({
                    "tags": ["a", "b", "a", "a"],
                    "ports": [{"name": "a", "port": 1}, {"name": "a", "port": 2}, {"port": 3}, {}],
                    "pairs": [{"a": "x", "b": 1}, {"b": 1, "a": "x"}]
                })
            ),
            [
                "pairs[1]: Duplicate value: map[string]interface {}{\"a\":\"x\", \"b\":1}",
                "ports[1]: Duplicate value: map[string]interface {}{\"name\":\"a\"}",
                "ports[3]: Duplicate value: map[string]interface {}{}",
                "tags[2]: Duplicate value: \"a\"",
            ]
        );
    }

    #[test]
    fn go_rendering() {
        assert_eq!(go_float(10.0), "10");
        assert_eq!(go_float(1.5), "1.5");
        assert_eq!(go_float(1e6), "1e+06");
        assert_eq!(go_float(-1.5e-7), "-1.5e-07");
        assert_eq!(go_float(0.0001), "0.0001");
        assert_eq!(go_quote("a\"b\n"), "\"a\\\"b\\n\"");
        assert_eq!(
            go_value(&json!([1, "x", null])),
            "[]interface {}{1, \"x\", interface {}(nil)}"
        );
    }
}
