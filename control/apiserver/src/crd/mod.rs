//! CustomResourceDefinitions (apiextensions.k8s.io/v1): how a CRD is checked, and how
//! it becomes served resources.
//!
//! A CRD is an object like any other: the [`Definitions`] strategy checks it at create
//! and update (its name, its names, its versions, and each version's schema, which must be
//! structural, with rules that compile). The [`controller`] watches CRDs, as
//! kube-apiserver's apiextensions controllers do: it accepts names that conflict with
//! nothing older, marks the CRD `NamesAccepted` and `Established`, and puts one
//! [`Resource`] per served version in the [`Registry`](crate::resources::Registry); from
//! then on the resource goes through the same handlers as the built-in ones, with the
//! [`CustomObjects`] strategy: its schema prunes, defaults and validates bodies
//! ([`schema`]), its `x-kubernetes-validations` rules run on every write ([`cel`]), and its
//! printer columns and scale paths come from the CRD. Deleting a CRD deletes its objects
//! first, under the `customresourcecleanup.apiextensions.k8s.io` finalizer.

pub mod cel;
pub mod controller;
pub mod schema;

use std::borrow::Cow;
use std::sync::Arc;

use serde_json::{json, Value};

use crate::error::{ApiError, ApiResult, FieldError};
use crate::jsonpath::JsonPath;
use crate::resources::{Body, Resource};
use crate::strategy::{name, Cell, Column, ScalePaths, SelectorAt, Strategy, NAME_AGE};
use crate::table::{s, strings};
use crate::validation;

/// The finalizer under which a deleted CRD's objects are deleted.
pub const CLEANUP_FINALIZER: &str = "customresourcecleanup.apiextensions.k8s.io";

/// The strategy of CustomResourceDefinitions themselves.
#[derive(Debug)]
pub struct Definitions;

static CRD_COLUMNS: &[Column] = &[
    Column::new("Name", "string", 0, name),
    Column::new("Created At", "date", 0, |o| {
        json!(s(o, "/metadata/creationTimestamp"))
    }),
];

fn invalid(field: impl Into<String>, value: &Value, why: impl std::fmt::Display) -> FieldError {
    let shown = match value {
        Value::String(s) => format!("{s:?}"),
        other => other.to_string(),
    };
    FieldError {
        field: field.into(),
        reason: "FieldValueInvalid",
        message: format!("Invalid value: {shown}: {why}"),
    }
}

fn unsupported(field: impl Into<String>, value: &str, supported: &[&str]) -> FieldError {
    let list: Vec<String> = supported.iter().map(|s| format!("{s:?}")).collect();
    FieldError {
        field: field.into(),
        reason: "FieldValueNotSupported",
        message: format!(
            "Unsupported value: {value:?}: supported values: {}",
            list.join(", ")
        ),
    }
}

/// Kubernetes' rule for a plural, singular or short name: a DNS-1035 label.
fn dns1035_label(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.starts_with(|c: char| c.is_ascii_lowercase())
        && !s.ends_with('-')
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err("a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')".into())
    }
}

/// A Kind: starts with a letter, letters and digits only (kube checks it is a valid Go
/// identifier-ish name; lists end in `List`).
fn kind_name(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if !s.starts_with(|c: char| c.is_ascii_alphabetic())
        || !s.chars().all(|c| c.is_ascii_alphanumeric())
    {
        return Err("a kind must start with a letter and have only letters and digits".into());
    }
    Ok(())
}

fn check_names(names: &Value, errs: &mut Vec<FieldError>) {
    let path = "spec.names";
    let field = |k: &str| names.get(k).and_then(Value::as_str).unwrap_or("");
    let plural = field("plural");
    if plural.is_empty() {
        errs.push(FieldError::required(format!("{path}.plural")));
    } else if let Err(e) = dns1035_label(plural) {
        errs.push(invalid(format!("{path}.plural"), &json!(plural), e));
    }
    let singular = field("singular");
    if !singular.is_empty() {
        if let Err(e) = dns1035_label(singular) {
            errs.push(invalid(format!("{path}.singular"), &json!(singular), e));
        }
    }
    let kind = field("kind");
    if kind.is_empty() {
        errs.push(FieldError::required(format!("{path}.kind")));
    } else if let Err(e) = kind_name(kind) {
        errs.push(invalid(format!("{path}.kind"), &json!(kind), e));
    }
    let list_kind = field("listKind");
    if !list_kind.is_empty() {
        if let Err(e) = kind_name(list_kind) {
            errs.push(invalid(format!("{path}.listKind"), &json!(list_kind), e));
        } else if list_kind == kind {
            errs.push(invalid(
                format!("{path}.listKind"),
                &json!(list_kind),
                "kind and listKind may not be the same",
            ));
        }
    }
    for (i, short) in strings(names.get("shortNames")).iter().enumerate() {
        if let Err(e) = dns1035_label(short) {
            errs.push(invalid(format!("{path}.shortNames[{i}]"), &json!(short), e));
        }
    }
    for (i, cat) in strings(names.get("categories")).iter().enumerate() {
        if let Err(e) = dns1035_label(cat) {
            errs.push(invalid(format!("{path}.categories[{i}]"), &json!(cat), e));
        }
    }
}

fn check_version(v: &Value, path: &str, errs: &mut Vec<FieldError>) {
    let name = v.get("name").and_then(Value::as_str).unwrap_or("");
    if let Err(e) = dns1035_label(name) {
        errs.push(invalid(format!("{path}.name"), &json!(name), e));
    }
    let schema_path = format!("{path}.schema.openAPIV3Schema");
    match v.pointer("/schema/openAPIV3Schema") {
        None => errs.push(FieldError {
            field: schema_path,
            reason: "FieldValueRequired",
            message: "Required value: schemas are required".into(),
        }),
        Some(schema) => {
            let structural = schema::structural_errors(schema, &schema_path);
            let ok = structural.is_empty();
            errs.extend(structural);
            // Rules are compiled against a structural schema only: kube reports the
            // structural problems first.
            if ok {
                if let Err(e) = cel::Rules::compile(schema, &schema_path) {
                    errs.extend(e);
                }
            }
        }
    }
    for (i, col) in v
        .get("additionalPrinterColumns")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let cpath = format!("{path}.additionalPrinterColumns[{i}]");
        let ty = col.get("type").and_then(Value::as_str).unwrap_or("");
        const TYPES: &[&str] = &["integer", "number", "string", "boolean", "date"];
        if !TYPES.contains(&ty) {
            errs.push(unsupported(format!("{cpath}.type"), ty, TYPES));
        }
        let jp = col.get("jsonPath").and_then(Value::as_str).unwrap_or("");
        if jp.is_empty() {
            errs.push(FieldError::required(format!("{cpath}.jsonPath")));
        } else if let Err(e) = JsonPath::parse(jp) {
            errs.push(invalid(format!("{cpath}.jsonPath"), &json!(jp), e));
        }
        if col
            .get("name")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            errs.push(FieldError::required(format!("{cpath}.name")));
        }
    }
    if let Some(scale) = v.pointer("/subresources/scale") {
        let spath = format!("{path}.subresources.scale");
        for (k, prefix, required) in [
            ("specReplicasPath", ".spec.", true),
            ("statusReplicasPath", ".status.", true),
            ("labelSelectorPath", "", false),
        ] {
            match scale.get(k).and_then(Value::as_str) {
                None | Some("") if required => {
                    errs.push(FieldError::required(format!("{spath}.{k}")))
                }
                None | Some("") => {}
                Some(p) => {
                    let allowed = if prefix.is_empty() {
                        p.starts_with(".spec.") || p.starts_with(".status.")
                    } else {
                        p.starts_with(prefix)
                    };
                    if !allowed || JsonPath::parse(p).is_err() {
                        let why = if prefix.is_empty() {
                            "should be a json path under either .spec or .status".to_string()
                        } else {
                            format!(
                                "should be a json path under {}",
                                prefix.trim_end_matches('.')
                            )
                        };
                        errs.push(invalid(format!("{spath}.{k}"), &json!(p), why));
                    }
                }
            }
        }
    }
}

impl Strategy for Definitions {
    fn validate(&self, crd: &Value, errs: &mut Vec<FieldError>) {
        let name = s(crd, "/metadata/name");
        let group = s(crd, "/spec/group");
        let plural = s(crd, "/spec/names/plural");
        if name != format!("{plural}.{group}") {
            errs.push(invalid(
                "metadata.name",
                &json!(name),
                "must be spec.names.plural+\".\"+spec.group",
            ));
        }
        if group.is_empty() {
            errs.push(FieldError::required("spec.group"));
        } else if !group.contains('.') {
            errs.push(invalid(
                "spec.group",
                &json!(group),
                "should be a domain with at least one dot",
            ));
        } else if let Err(e) = validation::dns1123_subdomain(group) {
            errs.push(invalid("spec.group", &json!(group), e));
        }
        let scope = s(crd, "/spec/scope");
        if !matches!(scope, "Namespaced" | "Cluster") {
            errs.push(unsupported("spec.scope", scope, &["Cluster", "Namespaced"]));
        }
        check_names(crd.pointer("/spec/names").unwrap_or(&Value::Null), errs);
        let versions = crd
            .pointer("/spec/versions")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        if versions.is_empty() {
            errs.push(FieldError {
                field: "spec.versions".into(),
                reason: "FieldValueInvalid",
                message: "Invalid value: \"null\": must have exactly one version marked as storage version".into(),
            });
        }
        let storage = versions
            .iter()
            .filter(|v| v.get("storage").and_then(Value::as_bool) == Some(true))
            .count();
        if !versions.is_empty() && storage != 1 {
            errs.push(invalid(
                "spec.versions",
                &json!(versions
                    .iter()
                    .map(|v| s(v, "/name"))
                    .collect::<Vec<_>>()
                    .join(",")),
                "must have exactly one version marked as storage version",
            ));
        }
        if !versions
            .iter()
            .any(|v| v.get("served").and_then(Value::as_bool) == Some(true))
            && !versions.is_empty()
        {
            errs.push(invalid(
                "spec.versions",
                &json!(versions
                    .iter()
                    .map(|v| s(v, "/name"))
                    .collect::<Vec<_>>()
                    .join(",")),
                "must have at least one version marked as served",
            ));
        }
        let mut seen = Vec::new();
        for (i, v) in versions.iter().enumerate() {
            let vn = s(v, "/name");
            if seen.contains(&vn) {
                errs.push(FieldError {
                    field: format!("spec.versions[{i}].name"),
                    reason: "FieldValueDuplicate",
                    message: format!("Duplicate value: {vn:?}"),
                });
            }
            seen.push(vn);
            check_version(v, &format!("spec.versions[{i}]"), errs);
        }
        match crd.pointer("/spec/conversion/strategy").and_then(Value::as_str) {
            None | Some("None") => {}
            Some(other) => errs.push(FieldError {
                field: "spec.conversion.strategy".into(),
                reason: "FieldValueNotSupported",
                message: format!("Unsupported value: {other:?}: supported values: \"None\" (Baton converts versions by their apiVersion only; conversion webhooks are not supported)"),
            }),
        }
    }

    fn validate_update(&self, old: &Value, new: &Value, errs: &mut Vec<FieldError>) {
        for (field, ptr) in [("spec.scope", "/spec/scope"), ("spec.group", "/spec/group")] {
            let (o, n) = (s(old, ptr), s(new, ptr));
            if o != n {
                errs.push(invalid(field, &json!(n), "field is immutable"));
            }
        }
    }

    fn prepare_create(&self, crd: &mut Value) {
        let mut finalizers = strings(crd.pointer("/metadata/finalizers"));
        if !finalizers.iter().any(|f| f == CLEANUP_FINALIZER) {
            finalizers.push(CLEANUP_FINALIZER.into());
        }
        crd["metadata"]["finalizers"] = json!(finalizers);
        if crd.pointer("/spec/conversion").is_none() {
            crd["spec"]["conversion"] = json!({"strategy": "None"});
        }
        let storage: Vec<String> = crd
            .pointer("/spec/versions")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|v| v.get("storage").and_then(Value::as_bool) == Some(true))
            .map(|v| s(v, "/name").to_string())
            .collect();
        crd["status"] = json!({
            "conditions": [],
            "acceptedNames": {"plural": "", "kind": ""},
            "storedVersions": storage,
        });
    }

    fn prepare_update(&self, old: &Value, new: &mut Value) {
        // Every storage version ever used stays listed: objects may still be stored so.
        let mut stored = strings(old.pointer("/status/storedVersions"));
        for v in new
            .pointer("/spec/versions")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|v| v.get("storage").and_then(Value::as_bool) == Some(true))
        {
            let name = s(v, "/name").to_string();
            if !stored.contains(&name) {
                stored.push(name);
            }
        }
        if new.get("status").is_some_and(Value::is_object) {
            new["status"]["storedVersions"] = json!(stored);
        }
    }

    fn columns(&self) -> &[Column] {
        CRD_COLUMNS
    }
}

/// The strategy of one version of a custom resource.
#[derive(Debug)]
pub struct CustomObjects {
    schema: Arc<Value>,
    rules: cel::Rules,
    columns: Vec<Column>,
    status: bool,
    scale: Option<ScalePaths>,
    /// The CRD is being deleted: its objects may be read and deleted, not created.
    terminating: bool,
    qualified: String,
}

impl Strategy for CustomObjects {
    fn validate_write(&self, obj: &Value, old: Option<&Value>, errs: &mut Vec<FieldError>) {
        errs.extend(schema::validate(&self.schema, obj));
        // With the old object, transition rules run and unchanged values ratchet.
        errs.extend(self.rules.check(obj, old));
    }

    fn admit_create(&self, _obj: &Value) -> ApiResult<()> {
        if self.terminating {
            return Err(ApiError::MethodNotAllowed {
                message: format!(
                    "create not allowed while custom resource definition {} is terminating",
                    self.qualified
                ),
            });
        }
        Ok(())
    }

    fn prepare_create(&self, obj: &mut Value) {
        // With a status subresource, status is the controller's: a create cannot set it.
        if self.status {
            if let Some(m) = obj.as_object_mut() {
                m.remove("status");
            }
        }
        if obj.pointer("/metadata/generation").is_none() {
            obj["metadata"]["generation"] = json!(1);
        }
    }

    fn columns(&self) -> &[Column] {
        &self.columns
    }

    fn scale_paths(&self) -> ScalePaths {
        self.scale.clone().unwrap_or_default()
    }

    fn strategic_merge(&self) -> bool {
        false
    }
}

/// `.spec.replicas` as a JSON pointer.
fn pointer_of(path: &str) -> String {
    path.trim_start_matches('.')
        .split('.')
        .fold(String::new(), |acc, seg| format!("{acc}/{seg}"))
}

fn columns_of(version: &Value) -> Vec<Column> {
    let defined: Vec<&Value> = version
        .get("additionalPrinterColumns")
        .and_then(Value::as_array)
        .map(|a| a.iter().collect())
        .unwrap_or_default();
    if defined.is_empty() {
        return NAME_AGE.to_vec();
    }
    let mut out = vec![Column::new("Name", "string", 0, name)];
    for c in defined {
        let Ok(path) = JsonPath::parse(s(c, "/jsonPath")) else {
            continue;
        };
        out.push(Column {
            name: Cow::Owned(s(c, "/name").to_string()),
            type_: Cow::Owned(s(c, "/type").to_string()),
            format: Cow::Owned(s(c, "/format").to_string()),
            description: Cow::Owned(s(c, "/description").to_string()),
            priority: c.get("priority").and_then(Value::as_i64).unwrap_or(0) as i32,
            cell: Cell::Path(path),
        });
    }
    out
}

/// The resources a CRD serves, one per served version; an error if its schema or rules
/// no longer compile (a CRD stored by an older, more lenient server).
pub fn resources_of(crd: &Value, terminating: bool) -> Result<Vec<Arc<Resource>>, String> {
    let spec = crd.get("spec").cloned().unwrap_or(Value::Null);
    let group = s(&spec, "/group").to_string();
    let names = spec.get("names").cloned().unwrap_or(Value::Null);
    let plural = s(&names, "/plural").to_string();
    let kind = s(&names, "/kind").to_string();
    let singular = match s(&names, "/singular") {
        "" => kind.to_lowercase(),
        x => x.to_string(),
    };
    let versions = spec
        .get("versions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let storage = versions
        .iter()
        .find(|v| v.get("storage").and_then(Value::as_bool) == Some(true))
        .map(|v| s(v, "/name").to_string())
        .ok_or("no storage version")?;
    let definition_id = format!(
        "{}/{}",
        s(crd, "/metadata/uid"),
        crd.pointer("/metadata/generation")
            .and_then(Value::as_i64)
            .unwrap_or(0)
    );
    let mut out = Vec::new();
    for (i, v) in versions.iter().enumerate() {
        if v.get("served").and_then(Value::as_bool) != Some(true) {
            continue;
        }
        let schema = v
            .pointer("/schema/openAPIV3Schema")
            .cloned()
            .unwrap_or_else(
                || json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}),
            );
        let rules = cel::Rules::compile(
            &schema,
            &format!("spec.versions[{i}].schema.openAPIV3Schema"),
        )
        .map_err(|errs| {
            errs.iter()
                .map(|e| format!("{}: {}", e.field, e.message))
                .collect::<Vec<_>>()
                .join("; ")
        })?;
        let status = v.pointer("/subresources/status").is_some();
        let scale = v.pointer("/subresources/scale").map(|sc| ScalePaths {
            spec_replicas: Cow::Owned(pointer_of(s(sc, "/specReplicasPath"))),
            status_replicas: Cow::Owned(pointer_of(s(sc, "/statusReplicasPath"))),
            selector: match s(sc, "/labelSelectorPath") {
                "" => SelectorAt::None,
                p => SelectorAt::String(pointer_of(p)),
            },
        });
        let mut subresources = Vec::new();
        if status {
            subresources.push("status".to_string());
        }
        if scale.is_some() {
            subresources.push("scale".to_string());
        }
        let schema = Arc::new(schema);
        out.push(Arc::new(Resource {
            group: group.clone(),
            version: s(v, "/name").to_string(),
            kind: kind.clone(),
            plural: plural.clone(),
            singular: singular.clone(),
            namespaced: s(&spec, "/scope") == "Namespaced",
            short_names: strings(names.get("shortNames")),
            categories: strings(names.get("categories")),
            subresources,
            storage_version: storage.clone(),
            storage_group: group.clone(),
            definition_id: definition_id.clone(),
            body: Body::Schema(schema.clone()),
            strategy: Arc::new(CustomObjects {
                schema,
                rules,
                columns: columns_of(v),
                status,
                scale,
                terminating,
                qualified: format!("{plural}.{group}"),
            }),
        }));
    }
    Ok(out)
}
