//! The REST handlers: get, list, watch, create, update, patch, delete and deletecollection
//! on every served resource, and their subresources (status, scale, binding).

use std::borrow::Cow;
use std::collections::HashMap;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use baton_store::{EventKind, WatchEvent};
use k8s_openapi::chrono::{SecondsFormat, Utc};
use serde_json::{json, Value};
use tracing::Instrument;

use crate::error::{ApiError, ApiResult, FieldError};
use crate::objects::{self, not_found, Objects, ReadAt};
use crate::patch::{self, PatchType};
use std::sync::Arc;

use crate::resources::{self, Resource, Served};
use crate::selectors::{FieldSelector, LabelSelector};
use crate::strategy::{Deletion, SelectorAt};
use crate::table;
use crate::validation;

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 3 * 1024 * 1024;

pub fn now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// How objects are rendered in an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rendering {
    Object,
    /// A `meta.k8s.io/v1` Table, as `kubectl get` asks.
    Table,
    /// `PartialObjectMetadata` (and `...List`): metadata only, as metadata informers ask.
    Metadata,
}

/// A parsed resource request.
#[derive(Debug)]
pub struct Target {
    pub res: Arc<Resource>,
    pub ns: Option<String>,
    pub name: Option<String>,
    pub sub: Option<String>,
}

/// Maps a URL path onto a resource, namespace, name and subresource.
pub fn route(served: &Served, path: &str) -> Option<Target> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return None,
    };
    let find = |plural: &str| served.find(group, version, plural).cloned();
    let t = |res: Arc<Resource>, ns: Option<&str>, name: Option<&str>, sub: Option<&str>| {
        Some(Target {
            res,
            ns: ns.map(String::from),
            name: name.map(String::from),
            sub: sub.map(String::from),
        })
    };
    match rest {
        ["namespaces", ns, plural] if find(plural).is_some_and(|r| r.namespaced) => {
            t(find(plural)?, Some(ns), None, None)
        }
        ["namespaces", ns, plural, name] if find(plural).is_some_and(|r| r.namespaced) => {
            t(find(plural)?, Some(ns), Some(name), None)
        }
        ["namespaces", ns, plural, name, sub] if find(plural).is_some_and(|r| r.namespaced) => {
            t(find(plural)?, Some(ns), Some(name), Some(sub))
        }
        [plural] => t(find(plural)?, None, None, None),
        [plural, name] => t(find(plural)?, None, Some(name), None),
        [plural, name, sub] => t(find(plural)?, None, Some(name), Some(sub)),
        _ => None,
    }
}

/// Everything a handler needs from the request.
#[derive(Debug)]
pub struct Request {
    pub method: Method,
    pub target: Target,
    pub query: HashMap<String, String>,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// Who asks, after impersonation: the escalation check and the reviews need it.
    pub user: baton_auth::UserInfo,
    /// What admission warns the client of, sent as `Warning` headers with the answer.
    pub warnings: std::sync::Arc<Warnings>,
}

/// Warnings gathered while a request is served.
pub type Warnings = std::sync::Mutex<Vec<String>>;

impl Request {
    pub(crate) fn q(&self, k: &str) -> Option<&str> {
        self.query.get(k).map(String::as_str)
    }

    fn flag(&self, k: &str) -> bool {
        matches!(self.q(k), Some("true") | Some("1"))
    }

    pub(crate) fn dry_run(&self) -> bool {
        self.q("dryRun") == Some("All")
    }

    fn accept(&self) -> &str {
        self.headers
            .get("accept")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/json")
    }

    /// How the client wants objects rendered. Accept lists media types in preference
    /// order; the first one served wins (protobuf ones are answered with JSON). None if
    /// nothing listed can be served: 406.
    pub(crate) fn rendering(&self) -> Option<Rendering> {
        for part in self.accept().split(',') {
            let p = part.trim();
            let media = p.split(';').next().unwrap_or("").trim();
            let as_ = p
                .split(';')
                .filter_map(|kv| kv.trim().strip_prefix("as="))
                .next();
            let served = matches!(
                media,
                "application/json"
                    | "application/yaml"
                    | "application/vnd.kubernetes.protobuf"
                    | "application/*"
                    | "*/*"
                    | ""
            );
            if !served {
                continue;
            }
            match as_ {
                None => return Some(Rendering::Object),
                Some("Table") => return Some(Rendering::Table),
                Some("PartialObjectMetadata" | "PartialObjectMetadataList") => {
                    return Some(Rendering::Metadata)
                }
                Some(_) => continue,
            }
        }
        None
    }

    fn content_type(&self) -> &str {
        self.headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/json")
    }

    fn field_validation(&self) -> &str {
        self.q("fieldValidation").unwrap_or("Warn")
    }
}

pub(crate) fn json_response(code: StatusCode, v: &Value, warnings: &[String]) -> Response {
    let mut resp = (
        code,
        [("content-type", "application/json")],
        serde_json::to_vec(v).unwrap_or_default(),
    )
        .into_response();
    for w in warnings {
        if let Ok(h) = HeaderValue::from_str(&format!("299 - {:?}", w)) {
            resp.headers_mut().append("warning", h);
        }
    }
    resp
}

/// One object as the client asked to see it: itself, its metadata, or a Table row.
fn render_one<'a>(req: &Request, rendering: Rendering, obj: &'a Value) -> Cow<'a, Value> {
    match rendering {
        Rendering::Object => Cow::Borrowed(obj),
        Rendering::Metadata => Cow::Owned(table::partial_metadata(obj)),
        Rendering::Table => {
            let full = req.q("includeObject") == Some("Object");
            let rv = obj
                .pointer("/metadata/resourceVersion")
                .cloned()
                .unwrap_or(json!(""));
            Cow::Owned(table::table(
                &req.target.res,
                std::slice::from_ref(obj),
                json!({"resourceVersion": rv}),
                full,
            ))
        }
    }
}

pub(crate) fn object_response(
    req: &Request,
    code: StatusCode,
    obj: &Value,
    warnings: &[String],
) -> Response {
    // A subresource (a Scale, a status) is always itself.
    let rendering = match req.target.sub {
        None => req.rendering().unwrap_or(Rendering::Object),
        Some(_) => Rendering::Object,
    };
    let mut all = warnings.to_vec();
    all.extend(
        req.warnings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..),
    );
    json_response(code, &render_one(req, rendering, obj), &all)
}

/// Runs one resource request.
pub async fn handle(objects: &Objects, req: Request) -> Response {
    // Every request but a watch is one unit of work in a trace, a child of the caller's
    // (a controller, the scheduler, a node: their clients send `traceparent`). A watch
    // lives for minutes and belongs to no one change.
    let span = if req.method == Method::GET && req.flag("watch") {
        tracing::debug_span!(
            "api_request",
            verb = %req.method,
            resource = %req.target.res.plural,
            namespace = req.target.ns.as_deref().unwrap_or(""),
        )
    } else {
        tracing::info_span!(
            target: baton_kube::trace::TARGET,
            "api_request",
            otel.kind = "server",
            verb = %req.method,
            resource = %req.target.res.plural,
            subresource = req.target.sub.as_deref().unwrap_or(""),
            namespace = req.target.ns.as_deref().unwrap_or(""),
            name = req.target.name.as_deref().unwrap_or(""),
            user = %req.user.name,
        )
    };
    baton_kube::trace::set_parent_from_headers(&span, &req.headers);
    let res = async {
        let t = &req.target;
        if req.rendering().is_none() {
            return Err(ApiError::NotAcceptable {
                accept: req.accept().to_string(),
            });
        }
        if t.sub.is_none() {
            let verb = match (&req.method, t.name.is_some()) {
                (&Method::GET, true) => "get",
                (&Method::GET, false) if req.flag("watch") => "watch",
                (&Method::GET, false) => "list",
                (&Method::POST, _) => "create",
                (&Method::PUT, _) => "update",
                (&Method::PATCH, _) => "patch",
                (&Method::DELETE, true) => "delete",
                (&Method::DELETE, false) => "deletecollection",
                _ => "",
            };
            if !t.res.strategy.verbs().contains(&verb) {
                return Err(ApiError::MethodNotAllowed {
                    message: format!("{verb} is not supported on {}", t.res.qualified()),
                });
            }
        }
        match (&req.method, t.name.is_some(), t.sub.as_deref()) {
            (&Method::GET, false, None) if req.flag("watch") => watch(objects, &req).await,
            (&Method::GET, false, None) => list(objects, &req).await,
            (&Method::GET, true, None | Some("status")) => get(objects, &req).await,
            (&Method::GET, true, Some("ephemeralcontainers"))
                if t.res.has_sub("ephemeralcontainers") =>
            {
                get(objects, &req).await
            }
            (&Method::GET, true, Some("scale")) => get_scale(objects, &req).await,
            (&Method::GET, true, Some(metric)) if t.res.strategy.metrics().contains(&metric) => {
                get_metric(objects, &req, metric).await
            }
            (&Method::POST, false, None) => create(objects, &req).await,
            (&Method::POST, true, Some("binding")) if t.res.has_sub("binding") => {
                bind(objects, &req).await
            }
            (&Method::POST, true, Some("eviction")) if t.res.has_sub("eviction") => {
                crate::eviction::evict(objects, &req).await
            }
            (&Method::POST, true, Some("token")) if t.res.has_sub("token") => {
                token_request(objects, &req).await
            }
            (&Method::PUT, true, None | Some("status") | Some("finalize")) => {
                update(objects, &req).await
            }
            (&Method::PUT, true, Some("approval")) if t.res.has_sub("approval") => {
                update(objects, &req).await
            }
            (&Method::PATCH, true, Some("approval")) if t.res.has_sub("approval") => {
                patch(objects, &req).await
            }
            (&Method::PUT, true, Some("ephemeralcontainers"))
                if t.res.has_sub("ephemeralcontainers") =>
            {
                update(objects, &req).await
            }
            (&Method::PATCH, true, Some("ephemeralcontainers"))
                if t.res.has_sub("ephemeralcontainers") =>
            {
                patch(objects, &req).await
            }
            (&Method::PUT, true, Some("scale")) | (&Method::PATCH, true, Some("scale")) => {
                update_scale(objects, &req).await
            }
            (&Method::PATCH, true, None | Some("status")) => patch(objects, &req).await,
            (&Method::DELETE, true, None) => delete(objects, &req).await,
            (&Method::DELETE, false, None) => delete_collection(objects, &req).await,
            (_, true, Some("log")) if t.res.has_sub("log") => Err(ApiError::MethodNotAllowed {
                message: "pods/log is served by GET".into(),
            }),
            (_, _, Some(sub)) if !t.res.has_sub(sub) => Err(ApiError::NoRoute),
            (m, _, _) => Err(ApiError::MethodNotAllowed {
                message: format!("{m} is not supported on this path"),
            }),
        }
    }
    .instrument(span)
    .await;
    res.unwrap_or_else(|e| e.into_response())
}

fn ns_of(req: &Request) -> Option<&str> {
    if req.target.res.namespaced {
        req.target.ns.as_deref()
    } else {
        None
    }
}

async fn get(objects: &Objects, req: &Request) -> ApiResult<Response> {
    let name = req.target.name.as_deref().unwrap_or_default();
    let everything = LabelSelector::default();
    if let Some(measured) =
        req.target
            .res
            .strategy
            .measure(objects, ns_of(req), Some(name), &everything)
    {
        let obj = measured
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| not_found(&req.target.res, name))?;
        return Ok(object_response(req, StatusCode::OK, &obj, &[]));
    }
    let at = ReadAt::parse(req.q("resourceVersion"), None)?;
    // `resourceVersion=0` takes any revision, so a running watch cache answers it, as
    // kube-apiserver's does: the kubelet's periodic re-reads of ConfigMaps and Secrets
    // ask this way. What the cache does not hold is read from the store.
    let cached = match at {
        ReadAt::Any => objects.caches.current(&req.target.res, ns_of(req), name),
        _ => None,
    };
    let obj = match cached {
        Some((obj, _)) => obj,
        None => {
            objects
                .get(&req.target.res, ns_of(req), name, at)
                .await?
                .ok_or_else(|| not_found(&req.target.res, name))?
                .0
        }
    };
    Ok(object_response(req, StatusCode::OK, &obj, &[]))
}

/// A custom metric of the object named, or of those the label selector picks (`*`).
async fn get_metric(objects: &Objects, req: &Request, metric: &str) -> ApiResult<Response> {
    let name = req.target.name.as_deref().unwrap_or_default();
    // kubectl and client-go escape the wildcard in the path.
    let name = if name.eq_ignore_ascii_case("%2A") {
        "*"
    } else {
        name
    };
    let ls = LabelSelector::parse(req.q("labelSelector").unwrap_or(""))?;
    let hook = req
        .target
        .res
        .strategy
        .metric(objects, ns_of(req), name, metric, &ls)
        .ok_or(ApiError::NoRoute)?;
    let list = hook.await?;
    Ok(object_response(req, StatusCode::OK, &list, &[]))
}

fn selectors(req: &Request) -> ApiResult<(LabelSelector, FieldSelector)> {
    let ls = LabelSelector::parse(req.q("labelSelector").unwrap_or(""))?;
    let fs = FieldSelector::parse(req.q("fieldSelector").unwrap_or(""), &req.target.res)?;
    Ok((ls, fs))
}

async fn list(objects: &Objects, req: &Request) -> ApiResult<Response> {
    let res = &*req.target.res;
    let (ls, fs) = selectors(req)?;
    let at = ReadAt::parse(req.q("resourceVersion"), req.q("resourceVersionMatch"))?;
    let limit: usize = req.q("limit").and_then(|l| l.parse().ok()).unwrap_or(0);
    let ns = ns_of(req);
    let cont = req.q("continue").filter(|c| !c.is_empty());
    if let Some(page) = list_cached(objects, req, at, limit, cont, (&ls, &fs)).await? {
        return Ok(page);
    }
    let page = match res.strategy.measure(objects, ns, None, &ls) {
        Some(measured) => crate::objects::Page {
            items: measured.await?,
            revision: Default::default(),
            continue_token: None,
        },
        None => {
            objects
                .list(res, ns, at, limit, cont, |o| ls.matches(o) && fs.matches(o))
                .await?
        }
    };
    let mut meta = json!({"resourceVersion": page.revision.to_string()});
    if let Some(c) = &page.continue_token {
        meta["continue"] = json!(c);
    }
    let rendering = req.rendering().unwrap_or(Rendering::Object);
    Ok(render_list(req, rendering, meta, page.items))
}

/// A list response in the rendering asked.
fn render_list(req: &Request, rendering: Rendering, meta: Value, items: Vec<Value>) -> Response {
    let res = &*req.target.res;
    let page = crate::objects::Page {
        items,
        revision: 0,
        continue_token: None,
    };
    let list = match rendering {
        Rendering::Metadata => json!({
            "kind": "PartialObjectMetadataList",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": meta,
            "items": page.items.iter().map(table::partial_metadata).collect::<Vec<_>>(),
        }),
        Rendering::Table => {
            let full = req.q("includeObject") == Some("Object");
            table::table(res, &page.items, meta, full)
        }
        Rendering::Object => json!({
            "kind": format!("{}List", res.kind),
            "apiVersion": res.api_version(),
            "metadata": meta,
            "items": page.items,
        }),
    };
    json_response(StatusCode::OK, &list, &[])
}

/// A list served from the watch cache, when it can be: no continue token, a revision the
/// cache may answer, and a resource it keeps. The first page's continue token reads the
/// rest from the store at the page's revision.
async fn list_cached(
    objects: &Objects,
    req: &Request,
    at: ReadAt,
    limit: usize,
    cont: Option<&str>,
    (ls, fs): (&LabelSelector, &FieldSelector),
) -> ApiResult<Option<Response>> {
    use crate::watchcache::ListAt;
    let res = &*req.target.res;
    let at = match at {
        _ if cont.is_some() => return Ok(None),
        ReadAt::Exact(_) => return Ok(None),
        ReadAt::Latest => ListAt::Latest,
        ReadAt::Any => ListAt::Any,
        ReadAt::NotOlderThan(r) => ListAt::NotOlderThan(r),
    };
    // A measured kind (metrics) has nothing in the store to cache.
    if res.strategy.measure(objects, None, None, ls).is_some() {
        return Ok(None);
    }
    let Some(cacher) = objects.caches.of(objects, res) else {
        return Ok(None);
    };
    let scope = res.key_prefix_in(ns_of(req));
    let Some(page) = cacher
        .list(at, &scope, limit, |o| ls.matches(o) && fs.matches(o))
        .await?
    else {
        return Ok(None);
    };
    let mut meta = json!({"resourceVersion": page.revision.to_string()});
    if let Some(after) = &page.more_after {
        meta["continue"] = json!(objects::encode_continue(page.revision, after.as_bytes()));
    }
    let rendering = req.rendering().unwrap_or(Rendering::Object);
    if rendering != Rendering::Object {
        let items: Vec<Value> = page
            .items
            .iter()
            .map(|o| match rendering {
                Rendering::Metadata => o.metadata_only(),
                _ => o.value(),
            })
            .collect();
        return Ok(Some(render_list(req, rendering, meta, items)));
    }
    // Each item's JSON is the cached one: a list of 150,000 pods serialises none of them.
    let head = json!({"kind": format!("{}List", res.kind), "apiVersion": res.api_version(), "metadata": meta});
    let mut body = serde_json::to_vec(&head).unwrap_or_default();
    body.pop();
    body.extend_from_slice(b",\"items\":[");
    for (i, item) in page.items.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(item.json());
    }
    body.extend_from_slice(b"]}");
    Ok(Some(
        (StatusCode::OK, [("content-type", "application/json")], body).into_response(),
    ))
}

/// Parses and checks a request body against the resource's type and the URL.
fn decode_body(req: &Request) -> ApiResult<(Value, Vec<String>)> {
    let ct = req
        .content_type()
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_string();
    if ct == crate::protobuf::CONTENT_TYPE {
        if req.body.len() > MAX_BODY_BYTES {
            return Err(ApiError::TooLarge {
                size: req.body.len(),
                limit: MAX_BODY_BYTES,
            });
        }
        return Ok((crate::protobuf::decode(&req.body)?, Vec::new()));
    }
    let yaml = match ct.as_str() {
        "application/json" | "" => false,
        "application/yaml" => true,
        _ => {
            return Err(ApiError::UnsupportedMediaType {
                got: ct.clone(),
                accepted: "application/json, application/yaml, application/vnd.kubernetes.protobuf"
                    .into(),
            })
        }
    };
    if req.body.len() > MAX_BODY_BYTES {
        return Err(ApiError::TooLarge {
            size: req.body.len(),
            limit: MAX_BODY_BYTES,
        });
    }
    let parsed = if yaml {
        validation::parse_yaml_checked(&req.body)
    } else {
        validation::parse_json_checked(&req.body).map_err(Into::into)
    };
    let (v, dups) = parsed
        .map_err(|e| ApiError::bad_request(format!("error decoding the request body: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::bad_request(
            "the request body must be a JSON object",
        ));
    }
    Ok((v, dups))
}

/// Checks kind and apiVersion, and the typed schema; returns the typed form and warnings.
/// A body that leaves out `kind` or `apiVersion` gets them from the URL, as
/// kube-apiserver's decoder defaults them (some clients send bare objects).
pub(crate) fn typecheck(
    req: &Request,
    res: &Resource,
    v: &Value,
    dups: &[String],
) -> ApiResult<(Value, Vec<String>)> {
    let field = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("");
    let filled;
    let v = if field("kind").is_empty() || field("apiVersion").is_empty() {
        let mut c = v.clone();
        if field("kind").is_empty() {
            c["kind"] = json!(res.kind);
        }
        if field("apiVersion").is_empty() {
            c["apiVersion"] = json!(res.api_version());
        }
        filled = c;
        &filled
    } else {
        v
    };
    let api_version = v.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    let kind = v.get("kind").and_then(Value::as_str).unwrap_or("");
    if kind != res.kind || api_version != res.api_version() {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({api_version}) and kind ({kind}) do not match the resource {} ({})",
            res.plural,
            res.api_version()
        )));
    }
    let (typed, unknown) = res
        .decode(v)
        .map_err(|e| ApiError::bad_request(format!("error decoding {kind}: {e}")))?;
    let mut problems: Vec<String> = dups
        .iter()
        .map(|d| format!("duplicate field {d:?}"))
        .collect();
    problems.extend(unknown.into_iter().map(|f| format!("unknown field {f:?}")));
    match req.field_validation() {
        "Strict" if !problems.is_empty() => Err(ApiError::bad_request(format!(
            "strict decoding error: {}",
            problems.join(", ")
        ))),
        "Ignore" => Ok((typed, Vec::new())),
        "Strict" | "Warn" | "" => Ok((typed, problems)),
        other => Err(ApiError::bad_request(format!(
            "fieldValidation must be one of Ignore, Warn or Strict, not {other:?}"
        ))),
    }
}

/// [`typecheck`] of an object a patch made from a stored one, decoding only the top-level
/// fields the patch may have changed (`touched`; None: any). The others are as stored,
/// and were typed when written: a node's status report decodes the pod's status, not its
/// whole spec again. A built-in kind's fields decode independently of one another, so
/// the part decodes exactly as it would within the whole; when it does not decode (it
/// lacks a required field the patch did not touch, or is refused), the whole object is
/// checked, and that answer is the one given. A custom kind's schema may default one
/// field from the presence of another: it is always checked whole.
fn typecheck_patched(
    req: &Request,
    res: &Resource,
    mut target: Value,
    touched: Option<&[String]>,
) -> ApiResult<(Value, Vec<String>)> {
    let part = match (touched, &res.body, target.as_object()) {
        (Some(keys), crate::resources::Body::Typed { .. }, Some(obj)) => {
            let mut part = serde_json::Map::new();
            for k in ["apiVersion", "kind"]
                .into_iter()
                .chain(keys.iter().map(String::as_str))
            {
                if let Some(v) = obj.get(k) {
                    part.insert(k.to_string(), v.clone());
                }
            }
            Some((keys, Value::Object(part)))
        }
        _ => None,
    };
    if let Some((keys, part)) = part {
        if let Ok((Value::Object(mut typed), warnings)) = typecheck(req, res, &part, &[]) {
            if let Some(obj) = target.as_object_mut() {
                for k in keys
                    .iter()
                    .map(String::as_str)
                    .chain(["apiVersion", "kind"])
                {
                    match typed.remove(k) {
                        Some(v) => obj.insert(k.to_string(), v),
                        None => obj.remove(k),
                    };
                }
                return Ok((target, warnings));
            }
        }
    }
    typecheck(req, res, &target, &[])
}

/// Checks an object against its kind's rules; `old` is what an update replaces.
fn validate(res: &Resource, obj: &Value, old: Option<&Value>) -> ApiResult<()> {
    let mut errs = validation::metadata(obj, res.namespaced, res.strategy.name_rule());
    res.strategy.validate_write(obj, old, &mut errs);
    if errs.is_empty() {
        return Ok(());
    }
    Err(ApiError::Invalid {
        group: res.group.clone(),
        kind: res.kind.clone(),
        name: obj
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .into(),
        causes: errs,
    })
}

async fn check_namespace(objects: &Objects, ns: &str) -> ApiResult<()> {
    let nsr = resources::builtin("Namespace");
    // From the watch cache when one runs, as kube-apiserver checks namespaces against its
    // informer cache: every create pays this check (Events most of all). A namespace the
    // cache does not hold yet (made a moment ago) is looked up locally.
    let found = match objects.caches.current(nsr, None, ns) {
        Some(hit) => Some(hit),
        None => objects.get(nsr, None, ns, ReadAt::Any).await?,
    };
    match found {
        None => Err(not_found(nsr, ns)),
        Some((n, _)) if n.pointer("/metadata/deletionTimestamp").is_some() => {
            Err(ApiError::Forbidden {
                message: format!(
                    "unable to create new content in namespace {ns} because it is being terminated"
                ),
            })
        }
        Some(_) => Ok(()),
    }
}

pub(crate) fn random_suffix() -> String {
    use rand::Rng;
    const CHARS: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::thread_rng();
    (0..5)
        .map(|_| CHARS[rng.gen_range(0..CHARS.len())] as char)
        .collect()
}

/// Creates an object from a typed body: shared by POST and by server-side apply.
pub(crate) async fn create_object(
    objects: &Objects,
    req: &Request,
    mut obj: Value,
    manager_op: &str,
) -> ApiResult<Value> {
    let res = &*req.target.res;
    let url_ns = ns_of(req).map(String::from);
    if res.namespaced {
        let body_ns = obj
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .map(String::from);
        match (&url_ns, &body_ns) {
            (Some(u), Some(b)) if u != b && !b.is_empty() => {
                return Err(ApiError::bad_request(format!("the namespace of the provided object does not match the namespace sent on the request ({b} vs {u})")));
            }
            _ => {}
        }
        let ns = url_ns.or(body_ns).unwrap_or_else(|| "default".into());
        obj["metadata"]["namespace"] = json!(ns);
    } else if let Some(m) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("namespace");
    }
    if obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
    {
        if let Some(prefix) = obj
            .pointer("/metadata/generateName")
            .and_then(Value::as_str)
            .filter(|p| !p.is_empty())
        {
            obj["metadata"]["name"] = json!(format!("{prefix}{}", random_suffix()));
        }
    }
    let meta = obj["metadata"]
        .as_object_mut()
        .ok_or_else(|| ApiError::bad_request("metadata must be an object"))?;
    meta.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
    meta.insert("creationTimestamp".into(), json!(now()));
    for k in [
        "resourceVersion",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "selfLink",
    ] {
        meta.remove(k);
    }
    if obj.get("spec").is_some() {
        obj["metadata"]["generation"] = json!(1);
    }
    res.strategy.admit_create(&obj)?;
    // Defaults first, then the rules, as kube-apiserver runs them: a default (a
    // ReplicationController's selector) may be what makes an object valid.
    res.strategy.prepare_create(&mut obj);
    res.strategy.prepare_create_by(&req.user, &mut obj);
    let ns = obj
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .map(String::from);
    if let Some(ns) = &ns {
        check_namespace(objects, ns).await?;
        res.strategy.mutate(objects, &mut obj).await?;
        crate::admission::limit_ranges(objects, res, ns, &mut obj).await?;
        crate::admission::default_storage_class(objects, res, &mut obj).await?;
    }
    let name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let attempt = crate::policy::Attempt {
        res,
        operation: "CREATE",
        namespace: ns.as_deref(),
        name: &name,
        subresource: req.target.sub.as_deref(),
        // Mutation reads the object it is given; the policies below see the result.
        object: &Value::Null,
        old: None,
        user: &req.user,
        dry_run: req.dry_run(),
        warnings: &req.warnings,
    };
    crate::mutating_policy::mutate(objects, &attempt, &mut obj).await?;
    crate::webhook::mutate(objects, &attempt, &mut obj).await?;
    validate(res, &obj, None)?;
    crate::admission::node_restriction(&req.user, res, &obj)?;
    res.strategy.admit(objects, &req.user, &obj, None).await?;
    let attempt = crate::policy::Attempt {
        object: &obj,
        ..attempt
    };
    crate::podsecurity::admit(objects, &attempt).await?;
    crate::policy::validate(objects, &attempt).await?;
    crate::webhook::validate(objects, &attempt).await?;
    if let Some(ns) = &ns {
        crate::admission::charge_quota(objects, res, ns, &obj, req.dry_run()).await?;
    }
    if manager_op == "Update" {
        crate::managed::record_update(
            &mut obj,
            None,
            req.q("fieldManager"),
            &res.api_version(),
            None,
        );
    }
    stamp_trace(req, &mut obj);
    // Values picked from a shared range may be taken by a concurrent create before this
    // one writes: the create's transaction refuses, and another pick is made from the
    // object as it came. A kind that picks nothing is written as it is, with no copy.
    let picks = res.strategy.picks_claims();
    for _ in 0..8 {
        let mut candidate = if picks {
            obj.clone()
        } else {
            std::mem::take(&mut obj)
        };
        let claims = res.strategy.claims(objects, &mut candidate).await?;
        if req.dry_run() {
            if objects
                .get(res, ns.as_deref(), &name, ReadAt::Latest)
                .await?
                .is_some()
            {
                return Err(ApiError::AlreadyExists {
                    group: res.group.clone(),
                    resource: res.plural.clone(),
                    name,
                });
            }
            return Ok(candidate);
        }
        match objects
            .create(res, ns.as_deref(), &name, candidate, &claims)
            .await
        {
            Err(ApiError::Conflict { .. }) if picks => continue,
            other => return other,
        }
    }
    Err(objects::conflict(res, &name))
}

/// `POST serviceaccounts/NAME/token`: a TokenRequest, answered with a signed token.
async fn token_request(objects: &Objects, req: &Request) -> ApiResult<Response> {
    let (body, _) = decode_body(req)?;
    let ns = req.target.ns.as_deref().unwrap_or("default");
    let name = req.target.name.as_deref().unwrap_or_default();
    let node = req.user.as_node();
    let answer = crate::access::tokens::request(objects, ns, name, &body, node).await?;
    Ok(json_response(StatusCode::CREATED, &answer, &[]))
}

async fn create(objects: &Objects, req: &Request) -> ApiResult<Response> {
    let res = &*req.target.res;
    let (body, dups) = decode_body(req)?;
    let (obj, warnings) = typecheck(req, res, &body, &dups)?;
    // A question (an access or token review) is answered, not stored.
    let obj = match res.strategy.answer(objects, &req.user, ns_of(req), obj) {
        Ok(answer) => {
            let answered = answer.await?;
            return Ok(object_response(
                req,
                StatusCode::CREATED,
                &answered,
                &warnings,
            ));
        }
        Err(obj) => obj,
    };
    let created = create_object(objects, req, obj, "Update").await?;
    Ok(object_response(
        req,
        StatusCode::CREATED,
        &created,
        &warnings,
    ))
}

/// Why an update of a whole pod may not be stored: it changes its ephemeral containers,
/// which only the `ephemeralcontainers` subresource adds (`kubectl debug`), as
/// kube-apiserver refuses such an update.
fn ephemeral_kept(old: &Value, new: &Value) -> Option<FieldError> {
    let list = |v: &Value| {
        v.pointer("/spec/ephemeralContainers")
            .filter(|l| !l.is_null())
            .cloned()
            .unwrap_or(json!([]))
    };
    (list(old) != list(new)).then(|| {
        FieldError::forbidden(
            "spec.ephemeralContainers",
            "pod updates may not change ephemeral containers; add one with the \
             ephemeralcontainers subresource (kubectl debug)",
        )
    })
}

/// What is wrong with a pod's new list of ephemeral containers: those it had must stay
/// as they were, names are unique among all the pod's containers, and an ephemeral
/// container has an image and none of what only a long-lived container may have.
fn ephemeral_changes(old: &Value, new: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let field = "spec.ephemeralContainers";
    let list = |v: Option<&Value>| v.and_then(Value::as_array).cloned().unwrap_or_default();
    let before = list(old.pointer("/spec/ephemeralContainers"));
    let after = list(Some(new));
    let name_of = |c: &Value| {
        c.get("name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    for c in &before {
        let n = name_of(c);
        match after.iter().find(|x| name_of(x) == n) {
            None => errs.push(FieldError::forbidden(
                field,
                format!("existing ephemeral containers {n:?} may not be removed"),
            )),
            Some(x) if x != c => errs.push(FieldError::forbidden(
                field,
                format!("existing ephemeral containers {n:?} may not be changed"),
            )),
            Some(_) => {}
        }
    }
    let mut names: Vec<String> = ["/spec/containers", "/spec/initContainers"]
        .iter()
        .flat_map(|p| list(old.pointer(p)))
        .map(|c| name_of(&c))
        .collect();
    for (i, c) in after.iter().enumerate() {
        let n = name_of(c);
        let at = format!("{field}[{i}]");
        if n.is_empty() {
            errs.push(FieldError::required(format!("{at}.name")));
        } else if names.contains(&n) {
            errs.push(FieldError {
                field: format!("{at}.name"),
                reason: "FieldValueDuplicate",
                message: format!("Duplicate value: {n:?}"),
            });
        }
        names.push(n);
        if c.get("image")
            .and_then(Value::as_str)
            .unwrap_or("")
            .is_empty()
        {
            errs.push(FieldError::required(format!("{at}.image")));
        }
        if let Some(t) = c.get("targetContainerName").and_then(Value::as_str) {
            let known = ["/spec/containers", "/spec/initContainers"]
                .iter()
                .flat_map(|p| list(old.pointer(p)))
                .any(|x| name_of(&x) == t);
            if !known {
                errs.push(FieldError {
                    field: format!("{at}.targetContainerName"),
                    reason: "FieldValueNotFound",
                    message: format!("Not found: {t:?}"),
                });
            }
        }
        for f in [
            "ports",
            "livenessProbe",
            "readinessProbe",
            "startupProbe",
            "lifecycle",
            "resources",
        ] {
            if c.get(f)
                .is_some_and(|v| !v.is_null() && v != &json!({}) && v != &json!([]))
            {
                errs.push(FieldError::forbidden(
                    format!("{at}.{f}"),
                    "cannot be set for an Ephemeral Container",
                ));
            }
        }
    }
    errs
}

fn spec_changed(old: &Value, new: &Value) -> bool {
    let strip = |v: &Value| {
        let mut v = v.clone();
        if let Some(m) = v.as_object_mut() {
            m.remove("metadata");
            m.remove("status");
        }
        v
    };
    strip(old) != strip(new)
}

/// Turns a desired object into what is stored over `old`: immutable metadata kept,
/// status or spec kept depending on the endpoint, generation bumped on spec changes.
pub(crate) fn prepare_update(
    res: &Resource,
    old: &Value,
    mut new: Value,
    sub: Option<&str>,
) -> ApiResult<Value> {
    let name = old
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if let Some(n) = new.pointer("/metadata/name").and_then(Value::as_str) {
        if n != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({n}) does not match the name on the URL ({name})"
            )));
        }
    }
    if !new.get("metadata").is_some_and(Value::is_object) {
        new["metadata"] = json!({});
    }
    for k in [
        "name",
        "namespace",
        "uid",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
    ] {
        match old.pointer(&format!("/metadata/{k}")) {
            Some(v) => new["metadata"][k] = v.clone(),
            None => {
                if let Some(m) = new["metadata"].as_object_mut() {
                    m.remove(k);
                }
            }
        }
    }
    match sub {
        Some("status") => {
            // Only status changes through /status.
            let status = new.as_object_mut().and_then(|m| m.remove("status"));
            let mut out = old.clone();
            match status {
                Some(s) => out["status"] = s,
                None => {
                    if let Some(m) = out.as_object_mut() {
                        m.remove("status");
                    }
                }
            }
            res.strategy.prepare_status_update(old, &mut out);
            return Ok(out);
        }
        Some("ephemeralcontainers") => {
            // Only ephemeral containers change here, and only by being added.
            let added = new
                .pointer("/spec/ephemeralContainers")
                .cloned()
                .unwrap_or(json!([]));
            let causes = ephemeral_changes(old, &added);
            if !causes.is_empty() {
                return Err(ApiError::Invalid {
                    group: res.group.clone(),
                    kind: res.kind.clone(),
                    name: name.to_string(),
                    causes,
                });
            }
            let mut out = old.clone();
            out["spec"]["ephemeralContainers"] = added;
            return Ok(out);
        }
        Some("approval") => {
            // Only the conditions (Approved, Denied) change through /approval; the
            // certificate is the signer's to write, through /status.
            let mut out = old.clone();
            out["status"]["conditions"] = new
                .pointer("/status/conditions")
                .cloned()
                .unwrap_or(json!([]));
            res.strategy.prepare_approval_update(old, &mut out)?;
            return Ok(out);
        }
        Some("finalize") => {
            let mut out = old.clone();
            out["spec"]["finalizers"] = new
                .pointer("/spec/finalizers")
                .cloned()
                .unwrap_or(json!([]));
            return Ok(out);
        }
        // Where a kind has the subresource, ephemeral containers change through it only.
        _ if res.has_sub("ephemeralcontainers") => {
            if let Some(cause) = ephemeral_kept(old, &new) {
                return Err(ApiError::Invalid {
                    group: res.group.clone(),
                    kind: res.kind.clone(),
                    name: name.to_string(),
                    causes: vec![cause],
                });
            }
        }
        _ => {}
    }
    if res.has_status() {
        match old.get("status") {
            Some(s) => new["status"] = s.clone(),
            None => {
                if let Some(m) = new.as_object_mut() {
                    m.remove("status");
                }
            }
        }
    }
    let gen = old.pointer("/metadata/generation").and_then(Value::as_i64);
    if let Some(g) = gen {
        let g = if spec_changed(old, &new) { g + 1 } else { g };
        new["metadata"]["generation"] = json!(g);
    }
    res.strategy.prepare_update(old, &mut new);
    Ok(new)
}

/// Stores `new` over `old` (at `rev`), finishing a deletion whose finalizers are gone.
pub(crate) async fn store_update(
    objects: &Objects,
    req: &Request,
    old: &Value,
    rev: i64,
    mut new: Value,
) -> ApiResult<Value> {
    let res = &*req.target.res;
    let ns = ns_of(req);
    let name = req.target.name.as_deref().unwrap_or_default();
    let attempt = crate::policy::Attempt {
        res,
        operation: "UPDATE",
        namespace: ns,
        name,
        subresource: req.target.sub.as_deref(),
        // Mutation reads the object it is given; the policies below see the result.
        object: &Value::Null,
        old: Some(old),
        user: &req.user,
        dry_run: req.dry_run(),
        warnings: &req.warnings,
    };
    crate::mutating_policy::mutate(objects, &attempt, &mut new).await?;
    crate::webhook::mutate(objects, &attempt, &mut new).await?;
    validate(res, &new, Some(old))?;
    res.strategy
        .admit(objects, &req.user, &new, Some(old))
        .await?;
    let attempt = crate::policy::Attempt {
        object: &new,
        ..attempt
    };
    crate::podsecurity::admit(objects, &attempt).await?;
    crate::policy::validate(objects, &attempt).await?;
    crate::webhook::validate(objects, &attempt).await?;
    if same_but_bookkeeping(old, &new) {
        // A no-op update writes nothing and keeps the resourceVersion, as Kubernetes does.
        return Ok(old.clone());
    }
    let op = if matches!(
        PatchType::from_content_type(req.content_type()),
        Some(PatchType::Apply)
    ) {
        "Apply"
    } else {
        "Update"
    };
    stamp_trace(req, &mut new);
    if op == "Update" {
        crate::managed::record_update(
            &mut new,
            Some(old),
            req.q("fieldManager"),
            &res.api_version(),
            req.target.sub.as_deref(),
        );
    }
    // As kube-apiserver's `shouldDeleteDuringUpdate`: the update that takes the last
    // finalizer away from an object whose grace period is over removes it. A pod still in
    // its grace period stays (its node's status reports go on) until its node deletes it.
    let finalizers_done = new.pointer("/metadata/deletionTimestamp").is_some()
        && new
            .pointer("/metadata/deletionGracePeriodSeconds")
            .and_then(Value::as_i64)
            .unwrap_or(0)
            == 0
        && new
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .is_none_or(Vec::is_empty)
        && res.strategy.finalized(&new);
    if req.dry_run() {
        return Ok(new);
    }
    if finalizers_done {
        let drev = objects
            .remove(res, ns, name, rev, &res.strategy.held(old))
            .await?;
        objects::set_rv(&mut new, drev);
        return Ok(new);
    }
    objects.replace(res, ns, name, new, rev).await
}

/// Whether two versions of an object differ in nothing but their `resourceVersion` and
/// `managedFields`: a write that changes nothing else is a no-op. Compared in place, since
/// every update asks (two copies of the object per Lease renewal were a tenth of its
/// cost).
fn same_but_bookkeeping(a: &Value, b: &Value) -> bool {
    const BOOKKEEPING: [&str; 2] = ["resourceVersion", "managedFields"];
    let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
        return a == b;
    };
    let same_meta = |x: &Value, y: &Value| match (x.as_object(), y.as_object()) {
        (Some(x), Some(y)) => {
            let kept = |m: &serde_json::Map<String, Value>| {
                m.keys()
                    .filter(|k| !BOOKKEEPING.contains(&k.as_str()))
                    .count()
            };
            kept(x) == kept(y)
                && x.iter()
                    .filter(|(k, _)| !BOOKKEEPING.contains(&k.as_str()))
                    .all(|(k, v)| y.get(k) == Some(v))
        }
        _ => x == y,
    };
    a.len() == b.len()
        && a.iter().all(|(k, v)| match b.get(k) {
            Some(w) if k == "metadata" => same_meta(v, w),
            Some(w) => v == w,
            None => false,
        })
}

/// Records the current trace context on an object whose desired state this request sets
/// (itself, its scale, its binding; not its status), so that whoever acts on the change
/// after a watch continues the same trace ([`baton_kube::trace`]). Nothing is written when
/// no trace is exported.
fn stamp_trace(req: &Request, obj: &mut Value) {
    if !matches!(
        req.target.sub.as_deref(),
        None | Some("scale") | Some("binding")
    ) {
        return;
    }
    let Some(tp) = baton_kube::trace::current_traceparent() else {
        return;
    };
    let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) else {
        return;
    };
    let annotations = meta.entry("annotations").or_insert_with(|| json!({}));
    if !annotations.is_object() {
        *annotations = json!({});
    }
    if let Some(a) = annotations.as_object_mut() {
        a.insert(baton_kube::trace::ANNOTATION.into(), Value::String(tp));
    }
}

/// What one attempt at changing an existing object decided.
pub(crate) enum Change {
    /// Store this over the object read.
    Write(Value),
    /// Delete the object now (with what it holds from shared ranges).
    Remove,
    /// Store this as is: what the server itself sets, a deletion mark or a binding, is
    /// not a client's update (no validation, no managed fields, no finalizer completion).
    Store(Value),
    /// Nothing to write: the answer is the object as read.
    Keep,
}

/// How long a change keeps starting over when the object changes under it. Every lost
/// race is another writer's win, so the loop always makes progress; like
/// GuaranteedUpdate, it has no attempt limit of its own, only the request's time.
const UPDATE_BUDGET: Duration = Duration::from_secs(30);

/// The one compare-and-swap loop of every change to an existing object (update, patch,
/// scale, apply, delete), as the Kubernetes storage's GuaranteedUpdate: read the object,
/// let `decide` say what to do with it, and write only if the object is still at the
/// revision read; if it is not, start over from a fresh read. An error from `decide` ends
/// the loop: a failed precondition or a bad patch does not get better by retrying.
/// Returns what was stored (or removed, or kept).
///
/// The first attempt starts from the watch cache's copy when a cache of the resource
/// runs already, as kube-apiserver's does: a node's Lease renewal then costs no read of
/// the store, which at 5,000 nodes was half of each renewal's work. It waits a moment
/// for the cache to hold what the member's store has applied
/// ([`crate::watchcache::WatchCaches::current_applied`]), but the copy may still be
/// behind, so only a fresh read may end the loop without a write: an error (from
/// `decide`, admission or validation) or a change that turns out to be no change, on the
/// cached copy, stands if a fresh read finds the same revision, and is decided again on
/// a newer one. A dry run always reads the store, since nothing checks its answer.
pub(crate) async fn guaranteed_update(
    objects: &Objects,
    req: &Request,
    name: &str,
    mut decide: impl FnMut(&Value, i64) -> ApiResult<Change>,
) -> ApiResult<Value> {
    let res = &*req.target.res;
    let ns = ns_of(req);
    let deadline = tokio::time::Instant::now() + UPDATE_BUDGET;
    let mut cached = if req.dry_run() {
        None
    } else {
        objects.caches.current_applied(objects, res, ns, name).await
    };
    // What the cached copy came to when only a fresh read could confirm it, and at which
    // revision: a fresh read of that same revision shows the copy was current, and its
    // outcome stands without being decided again (as kube-apiserver's GuaranteedUpdate
    // returns its cached answer when the revision it reads back is the cached one).
    let mut unconfirmed: Option<(i64, ApiResult<Value>)> = None;
    while tokio::time::Instant::now() < deadline {
        let from_cache = cached.is_some();
        let (old, rev) = match cached.take() {
            Some(hit) => hit,
            None => objects.get_or_404(res, ns, name).await?,
        };
        if let Some((at, outcome)) = unconfirmed.take() {
            if at == rev {
                return outcome;
            }
        }
        let change = match decide(&old, rev) {
            Err(e) if from_cache => {
                unconfirmed = Some((rev, Err(e)));
                continue;
            }
            Ok(Change::Keep) if from_cache => {
                unconfirmed = Some((rev, Ok(old)));
                continue;
            }
            other => other?,
        };
        let written = match change {
            Change::Keep => return Ok(old),
            Change::Write(new) => match store_update(objects, req, &old, rev, new).await {
                // A write that found nothing to change answers with the object as read,
                // which from the cache may be out of date.
                Ok(out) if from_cache && objects::rv_of(&out) == Some(rev) => {
                    unconfirmed = Some((rev, Ok(out)));
                    continue;
                }
                other => other,
            },
            Change::Store(new) if req.dry_run() => return Ok(new),
            Change::Store(new) => objects.replace(res, ns, name, new, rev).await,
            Change::Remove if req.dry_run() => return Ok(old),
            Change::Remove => objects
                .remove(res, ns, name, rev, &res.strategy.held(&old))
                .await
                .map(|drev| {
                    let mut out = old.clone();
                    objects::set_rv(&mut out, drev);
                    out
                }),
        };
        match written {
            // Only the write's own compare fails with a conflict here.
            Err(ApiError::Conflict { .. }) => continue,
            // Admission and validation judged the change against a copy that may be
            // out of date.
            Err(e) if from_cache => unconfirmed = Some((rev, Err(e))),
            other => return other,
        }
    }
    Err(objects::conflict(res, name))
}

/// The `resourceVersion` a body asks to update from, if any: a mismatch is a conflict.
fn check_resource_version(body: &Value, rev: i64, res: &Resource, name: &str) -> ApiResult<()> {
    match body
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
    {
        Some(want) if want != rev.to_string() => Err(objects::conflict(res, name)),
        _ => Ok(()),
    }
}

async fn update(objects: &Objects, req: &Request) -> ApiResult<Response> {
    let res = &*req.target.res;
    let name = req.target.name.as_deref().unwrap_or_default();
    let (body, dups) = decode_body(req)?;
    let (typed, warnings) = typecheck(req, res, &body, &dups)?;
    let stored = guaranteed_update(objects, req, name, |old, rev| {
        check_resource_version(&body, rev, res, name)?;
        let new = prepare_update(res, old, typed.clone(), req.target.sub.as_deref())?;
        Ok(Change::Write(new))
    })
    .await?;
    Ok(object_response(req, StatusCode::OK, &stored, &warnings))
}

async fn patch(objects: &Objects, req: &Request) -> ApiResult<Response> {
    let res = &*req.target.res;
    let name = req.target.name.as_deref().unwrap_or_default().to_string();
    let ty = PatchType::from_content_type(req.content_type())
        .filter(|ty| *ty != PatchType::Strategic || res.strategy.strategic_merge());
    let Some(ty) = ty else {
        let mut accepted = "application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml".to_string();
        if res.strategy.strategic_merge() {
            accepted.push_str(", application/strategic-merge-patch+json");
        }
        return Err(ApiError::UnsupportedMediaType {
            got: req.content_type().to_string(),
            accepted,
        });
    };
    if req.body.len() > MAX_BODY_BYTES {
        return Err(ApiError::TooLarge {
            size: req.body.len(),
            limit: MAX_BODY_BYTES,
        });
    }
    // Apply patches are YAML (kubectl sends JSON, which is YAML); the others are JSON.
    let parsed = if ty == PatchType::Apply {
        validation::parse_yaml_checked(&req.body)
    } else {
        validation::parse_json_checked(&req.body).map_err(Into::into)
    };
    let (patch_body, dups) =
        parsed.map_err(|e| ApiError::bad_request(format!("error decoding the patch: {e}")))?;
    if ty == PatchType::Apply {
        return crate::managed::apply(objects, req, patch_body, dups).await;
    }
    if req.field_validation() == "Strict" && !dups.is_empty() {
        return Err(ApiError::bad_request(format!(
            "strict decoding error: duplicate field {:?}",
            dups[0]
        )));
    }
    let mut warnings = Vec::new();
    let touched = patch::touched_fields(ty, &patch_body);
    let stored = guaranteed_update(objects, req, &name, |old, rev| {
        let mut target = old.clone();
        patch::apply_patch(ty, &mut target, &patch_body)?;
        check_resource_version(&patch_body, rev, res, &name)?;
        let (typed, w) = typecheck_patched(req, res, target, touched.as_deref())?;
        warnings = w;
        Ok(Change::Write(prepare_update(
            res,
            old,
            typed,
            req.target.sub.as_deref(),
        )?))
    })
    .await?;
    Ok(object_response(req, StatusCode::OK, &stored, &warnings))
}

fn scale_of(res: &Resource, obj: &Value) -> Value {
    let paths = res.strategy.scale_paths();
    let selector = match &paths.selector {
        SelectorAt::Spec => {
            // A label selector's matchLabels, or a ReplicationController's plain map.
            let selector = match obj.pointer("/spec/selector") {
                Some(s)
                    if s.get("matchLabels").is_some() || s.get("matchExpressions").is_some() =>
                {
                    s.get("matchLabels")
                }
                plain => plain,
            };
            selector
                .and_then(Value::as_object)
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default()
        }
        SelectorAt::String(ptr) => obj
            .pointer(ptr)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        SelectorAt::None => String::new(),
    };
    let meta = obj.get("metadata").cloned().unwrap_or(json!({}));
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": meta.get("name"), "namespace": meta.get("namespace"), "uid": meta.get("uid"),
            "resourceVersion": meta.get("resourceVersion"), "creationTimestamp": meta.get("creationTimestamp"),
        },
        "spec": {"replicas": obj.pointer(&paths.spec_replicas).and_then(Value::as_i64).unwrap_or(1)},
        "status": {"replicas": obj.pointer(&paths.status_replicas).and_then(Value::as_i64).unwrap_or(0), "selector": selector},
    })
}

async fn get_scale(objects: &Objects, req: &Request) -> ApiResult<Response> {
    let res = &*req.target.res;
    let name = req.target.name.as_deref().unwrap_or_default();
    let (obj, _) = objects.get_or_404(res, ns_of(req), name).await?;
    Ok(json_response(StatusCode::OK, &scale_of(res, &obj), &[]))
}

async fn update_scale(objects: &Objects, req: &Request) -> ApiResult<Response> {
    let res = &*req.target.res;
    let name = req.target.name.as_deref().unwrap_or_default().to_string();
    let (body, _) = validation::parse_json_checked(&req.body)
        .map_err(|e| ApiError::bad_request(format!("error decoding the request body: {e}")))?;
    let stored = guaranteed_update(objects, req, &name, |old, rev| {
        let mut scale = scale_of(res, old);
        if req.method == Method::PATCH {
            let ty = PatchType::from_content_type(req.content_type()).ok_or_else(|| {
                ApiError::UnsupportedMediaType {
                    got: req.content_type().to_string(),
                    accepted: "application/merge-patch+json".into(),
                }
            })?;
            patch::apply_patch(ty, &mut scale, &body)?;
        } else {
            scale = body.clone();
            check_resource_version(&body, rev, res, &name)?;
        }
        let invalid = |cause| ApiError::Invalid {
            group: "autoscaling".into(),
            kind: "Scale".into(),
            name: name.clone(),
            causes: vec![cause],
        };
        let replicas = scale
            .pointer("/spec/replicas")
            .and_then(Value::as_i64)
            .ok_or_else(|| invalid(FieldError::required("spec.replicas")))?;
        if replicas < 0 {
            return Err(invalid(FieldError::invalid(
                "spec.replicas",
                &replicas.to_string(),
                "must be greater than or equal to 0",
            )));
        }
        let mut new = old.clone();
        set_pointer(
            &mut new,
            &res.strategy.scale_paths().spec_replicas,
            json!(replicas),
        );
        if spec_changed(old, &new) {
            let g = old
                .pointer("/metadata/generation")
                .and_then(Value::as_i64)
                .unwrap_or(0);
            new["metadata"]["generation"] = json!(g + 1);
        }
        Ok(Change::Write(new))
    })
    .await?;
    Ok(json_response(StatusCode::OK, &scale_of(res, &stored), &[]))
}

/// Writes `v` at a JSON pointer, making the objects on the way.
fn set_pointer(obj: &mut Value, ptr: &str, v: Value) {
    let mut cur = obj;
    for seg in ptr.trim_start_matches('/').split('/') {
        if !cur.is_object() {
            *cur = json!({});
        }
        cur = cur
            .as_object_mut()
            .expect("made an object above")
            .entry(seg.to_string())
            .or_insert(Value::Null);
    }
    *cur = v;
}

/// POST pods/{name}/binding: the scheduler's way of assigning a node.
async fn bind(objects: &Objects, req: &Request) -> ApiResult<Response> {
    let name = req.target.name.as_deref().unwrap_or_default().to_string();
    let (body, _) = validation::parse_json_checked(&req.body)
        .map_err(|e| ApiError::bad_request(format!("error decoding the binding: {e}")))?;
    let node = body
        .pointer("/target/name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ApiError::Invalid {
            group: String::new(),
            kind: "Binding".into(),
            name: name.clone(),
            causes: vec![FieldError::required("target.name")],
        })?;
    let node = node.to_string();
    guaranteed_update(objects, req, &name, |pod, _| {
        if let Some(current) = pod
            .pointer("/spec/nodeName")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
        {
            return Err(ApiError::Conflict {
                group: String::new(),
                resource: "pods".into(),
                name: name.clone(),
                message: format!("Operation cannot be fulfilled on pods/binding {name:?}: pod {name} is already assigned to node {current:?}"),
            });
        }
        let mut pod = pod.clone();
        pod["spec"]["nodeName"] = json!(node);
        stamp_trace(req, &mut pod);
        let cond = json!({"type": "PodScheduled", "status": "True", "lastProbeTime": null, "lastTransitionTime": now()});
        let conds = pod["status"]
            .as_object_mut()
            .map(|s| s.entry("conditions").or_insert(json!([])));
        if let Some(Value::Array(list)) = conds {
            list.retain(|c| c.get("type").and_then(Value::as_str) != Some("PodScheduled"));
            list.push(cond);
        }
        Ok(Change::Store(pod))
    })
    .await?;
    Ok(json_response(
        StatusCode::CREATED,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
        &[],
    ))
}

#[derive(Debug, Default)]
pub(crate) struct DeleteOptions {
    grace: Option<i64>,
    propagation: Option<String>,
    uid: Option<String>,
    rv: Option<String>,
}

fn delete_options(req: &Request) -> ApiResult<DeleteOptions> {
    let body = if req.body.is_empty() {
        None
    } else if req
        .content_type()
        .starts_with(crate::protobuf::CONTENT_TYPE)
    {
        Some(crate::protobuf::decode(&req.body)?)
    } else {
        Some(
            serde_json::from_slice(&req.body)
                .map_err(|e| ApiError::bad_request(format!("error decoding DeleteOptions: {e}")))?,
        )
    };
    delete_options_from(req, body.as_ref())
}

/// DeleteOptions from a body (a DELETE's, or an Eviction's `deleteOptions`), with the
/// query's parameters over it.
pub(crate) fn delete_options_from(req: &Request, v: Option<&Value>) -> ApiResult<DeleteOptions> {
    let mut o = DeleteOptions::default();
    if let Some(v) = v {
        o.grace = v.get("gracePeriodSeconds").and_then(Value::as_i64);
        o.propagation = v
            .get("propagationPolicy")
            .and_then(Value::as_str)
            .map(String::from);
        if v.get("orphanDependents").and_then(Value::as_bool) == Some(true) {
            o.propagation = Some("Orphan".into());
        }
        o.uid = v
            .pointer("/preconditions/uid")
            .and_then(Value::as_str)
            .map(String::from);
        o.rv = v
            .pointer("/preconditions/resourceVersion")
            .and_then(Value::as_str)
            .map(String::from);
    }
    if let Some(g) = req.q("gracePeriodSeconds").and_then(|g| g.parse().ok()) {
        o.grace = Some(g);
    }
    if let Some(p) = req.q("propagationPolicy") {
        o.propagation = Some(p.to_string());
    }
    if let Some(p) = &o.propagation {
        if !matches!(p.as_str(), "Orphan" | "Background" | "Foreground") {
            return Err(ApiError::bad_request(format!(
                "propagationPolicy must be Orphan, Background or Foreground, not {p:?}"
            )));
        }
    }
    Ok(o)
}

/// Whether a deletion removed the object or marked it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Deleted {
    Removed,
    Marked,
}

/// Deletes one object: at once, or by marking it when finalizers (or a pod's grace period)
/// must run first.
pub(crate) async fn delete_one(
    objects: &Objects,
    req: &Request,
    name: &str,
    opts: &DeleteOptions,
) -> ApiResult<(Value, Deleted)> {
    let res = &*req.target.res;
    let mut outcome = Deleted::Marked;
    let obj = guaranteed_update(objects, req, name, |obj, rev| {
        outcome = Deleted::Marked;
        if let Some(uid) = &opts.uid {
            let have = obj
                .pointer("/metadata/uid")
                .and_then(Value::as_str)
                .unwrap_or("");
            if uid != have {
                return Err(ApiError::Conflict {
                    group: res.group.clone(),
                    resource: res.plural.clone(),
                    name: name.into(),
                    message: format!("Precondition failed: UID in precondition: {uid}, UID in object meta: {have}"),
                });
            }
        }
        if let Some(want) = &opts.rv {
            if *want != rev.to_string() {
                return Err(ApiError::Conflict {
                    group: res.group.clone(),
                    resource: res.plural.clone(),
                    name: name.into(),
                    message: format!("Precondition failed: ResourceVersion in precondition: {want}, ResourceVersion in object meta: {rev}"),
                });
            }
        }
        let mut finalizers: Vec<Value> = obj
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let add = match opts.propagation.as_deref() {
            Some("Foreground") => Some("foregroundDeletion"),
            Some("Orphan") => Some("orphan"),
            _ => None,
        };
        if let Some(f) = add {
            if !finalizers.iter().any(|x| x == f) {
                finalizers.push(json!(f));
            }
        }
        let deletion = res.strategy.deletion(obj, opts.grace);
        if finalizers.is_empty() && deletion == Deletion::Immediate {
            outcome = Deleted::Removed;
            return Ok(Change::Remove);
        }
        let grace = match deletion {
            Deletion::Graceful(grace) => grace,
            Deletion::Immediate | Deletion::Terminating => 0,
        };
        let shortened = obj
            .pointer("/metadata/deletionGracePeriodSeconds")
            .and_then(Value::as_i64)
            .is_some_and(|had| grace < had);
        let mut marked = obj.clone();
        if obj.pointer("/metadata/deletionTimestamp").is_some() {
            if shortened {
                // A shorter grace period (a pod force-deleted while it still has
                // finalizers) moves the deadline closer, as kube-apiserver's does.
                let at = Utc::now() + k8s_openapi::chrono::Duration::seconds(grace);
                marked["metadata"]["deletionTimestamp"] =
                    json!(at.to_rfc3339_opts(SecondsFormat::Secs, true));
                marked["metadata"]["deletionGracePeriodSeconds"] = json!(grace);
            } else if add.is_none() {
                return Ok(Change::Keep);
            }
        }
        if finalizers.is_empty() {
            if let Some(m) = marked["metadata"].as_object_mut() {
                m.remove("finalizers");
            }
        } else {
            marked["metadata"]["finalizers"] = Value::Array(finalizers);
        }
        if marked.pointer("/metadata/deletionTimestamp").is_none() {
            let at = Utc::now() + k8s_openapi::chrono::Duration::seconds(grace);
            marked["metadata"]["deletionTimestamp"] =
                json!(at.to_rfc3339_opts(SecondsFormat::Secs, true));
            marked["metadata"]["deletionGracePeriodSeconds"] = json!(grace);
        }
        if deletion == Deletion::Terminating {
            marked["status"]["phase"] = json!("Terminating");
        }
        Ok(Change::Store(marked))
    })
    .await?;
    Ok((obj, outcome))
}

async fn delete(objects: &Objects, req: &Request) -> ApiResult<Response> {
    let opts = delete_options(req)?;
    let name = req.target.name.as_deref().unwrap_or_default();
    let (obj, outcome) = delete_one(objects, req, name, &opts).await?;
    // 200 for an object gone now (a pod's node completing its deletion too), 202 for one
    // that waits for its finalizers or its grace period.
    let code = match outcome {
        Deleted::Removed => StatusCode::OK,
        Deleted::Marked => StatusCode::ACCEPTED,
    };
    Ok(object_response(req, code, &obj, &[]))
}

async fn delete_collection(objects: &Objects, req: &Request) -> ApiResult<Response> {
    let res = &*req.target.res;
    let opts = delete_options(req)?;
    let (ls, fs) = selectors(req)?;
    let page = objects
        .list(res, ns_of(req), ReadAt::Latest, 0, None, |o| {
            ls.matches(o) && fs.matches(o)
        })
        .await?;
    let mut deleted = Vec::new();
    for obj in page.items {
        let name = obj
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        match delete_one(objects, req, &name, &opts).await {
            Ok((o, _)) => deleted.push(o),
            Err(ApiError::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    let list = json!({
        "kind": format!("{}List", res.kind),
        "apiVersion": res.api_version(),
        "metadata": {"resourceVersion": objects.store.local_revision().to_string()},
        "items": deleted,
    });
    Ok(json_response(StatusCode::OK, &list, &[]))
}

/// How often a watch that asked for bookmarks gets one, as kube-apiserver's cacher
/// paces them (its `bookmarkFrequency`): a client needs one now and then to resume from a
/// recent revision. One every five seconds per watch was, at 5,000 nodes, a thousand a
/// second, twice the nodes' Lease renewals, each framed, encrypted and parsed.
const BOOKMARK_EVERY: Duration = Duration::from_secs(60);
/// A watch's last bookmark comes this long before its time runs out, so that its client
/// resumes from a recent revision (kube-apiserver's).
const BOOKMARK_BEFORE_END: Duration = Duration::from_secs(2);

/// When a watch that asked for bookmarks sends its next one.
#[derive(Debug)]
struct BookmarkPace {
    next: Option<tokio::time::Instant>,
    end: tokio::time::Instant,
}

impl BookmarkPace {
    fn new(asked: bool, now: tokio::time::Instant, timeout: Duration) -> Self {
        let mut pace = Self {
            next: None,
            end: now + timeout,
        };
        if asked {
            pace.schedule(now);
        }
        pace
    }

    /// The next bookmark after one sent (or the watch started) at `now`: a minute on, or
    /// just before the end if that is sooner, or none once that has passed.
    fn schedule(&mut self, now: tokio::time::Instant) {
        let before_end = self.end.checked_sub(BOOKMARK_BEFORE_END).unwrap_or(now);
        let next = (now + BOOKMARK_EVERY).min(before_end);
        self.next = (next > now).then_some(next);
    }

    /// Waits until the next bookmark is due (forever if none is).
    async fn due(&self) {
        match self.next {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    }
}

/// A BOOKMARK line: everything up to `rev` has been sent.
fn bookmark_line(req: &Request, rev: i64) -> Bytes {
    let res = &req.target.res;
    let mark = json!({"kind": res.kind, "apiVersion": res.api_version(), "metadata": {"resourceVersion": rev.to_string()}});
    event_line("BOOKMARK", &mark, req, Rendering::Object)
}

/// One watch event line; `rendering` is the request's, read once for the whole watch.
fn event_line(kind: &str, obj: &Value, req: &Request, rendering: Rendering) -> Bytes {
    // Bookmarks and errors are never rendered: they are not objects of the resource.
    let rendering = match kind {
        "BOOKMARK" | "ERROR" => Rendering::Object,
        _ => rendering,
    };
    let object = render_one(req, rendering, obj);
    let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

async fn watch(objects: &Objects, req: &Request) -> ApiResult<Response> {
    let res = req.target.res.clone();
    let rendering = req.rendering().unwrap_or(Rendering::Object);
    let (ls, fs) = selectors(req)?;
    let ns = ns_of(req).map(String::from);
    let at = ReadAt::parse(req.q("resourceVersion"), None)?;
    let timeout = req
        .q("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(1800));
    let bookmarks = req.flag("allowWatchBookmarks");
    let prefix = res.key_prefix_in(ns.as_deref());
    let req_view = Request {
        method: req.method.clone(),
        target: Target {
            res: res.clone(),
            ns: ns.clone(),
            name: None,
            sub: None,
        },
        query: req.query.clone(),
        headers: req.headers.clone(),
        body: Bytes::new(),
        user: req.user.clone(),
        warnings: req.warnings.clone(),
    };
    if let Some(cacher) = objects.caches.of(objects, &res) {
        use crate::watchcache::Start;
        let start = match at {
            ReadAt::Latest => Start::Now { consistent: true },
            ReadAt::Any => Start::Now { consistent: false },
            ReadAt::NotOlderThan(r) | ReadAt::Exact(r) => Start::After(r),
        };
        // Indexed by the field the selector pins, or else by namespace, so that a change
        // reaches only the watchers that may match it.
        let pin = fs
            .pinned()
            .map(|(f, v)| (f.to_string(), v.to_string()))
            .or_else(|| {
                ns.clone()
                    .filter(|_| res.namespaced)
                    .map(|n| ("metadata.namespace".to_string(), n))
            });
        if let Some(sub) = cacher.subscribe(start, &prefix, pin).await? {
            let watcher = CachedWatcher {
                req: req_view,
                rendering,
                ls,
                fs,
                scope: prefix,
                bookmarks,
            };
            let span = tracing::debug_span!("api_watch", resource = %res.plural, cached = true);
            let (tx, rx) = tokio::sync::mpsc::channel(256);
            tokio::spawn(watcher.run(sub, tx, timeout).instrument(span));
            return Ok(watch_response(rx));
        }
    }
    // "Start at most recent" and "any" begin with the current state as ADDED events.
    let (initial, from) = match at {
        ReadAt::Latest | ReadAt::Any => {
            let page = objects
                .list(&res, ns.as_deref(), at, 0, None, |o| {
                    ls.matches(o) && fs.matches(o)
                })
                .await?;
            (page.items, page.revision + 1)
        }
        ReadAt::NotOlderThan(r) | ReadAt::Exact(r) => (Vec::new(), r + 1),
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(256);
    let mut store_watch = match objects.store.watch(prefix.clone(), from) {
        Ok(w) => Some(w),
        Err(baton_store::Error::Compacted {
            requested,
            compact_revision,
        }) => {
            let status = ApiError::Expired {
                requested: requested - 1,
                oldest: compact_revision,
            }
            .status();
            let _ = tx.try_send(Ok(event_line("ERROR", &status, &req_view, rendering)));
            None
        }
        Err(e) => return Err(e.into()),
    };
    let span = tracing::debug_span!("api_watch", resource = %res.plural);
    let objects = objects.clone();
    tokio::spawn(
        async move {
            for obj in &initial {
                if tx
                    .send(Ok(event_line("ADDED", obj, &req_view, rendering)))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            let Some(w) = store_watch.as_mut() else {
                return;
            };
            let deadline = tokio::time::sleep(timeout);
            tokio::pin!(deadline);
            let mut pace = BookmarkPace::new(bookmarks, tokio::time::Instant::now(), timeout);
            // Everything up to here has been sent.
            let mut known = from - 1;
            loop {
                let item = tokio::select! {
                    _ = &mut deadline => return,
                    _ = tx.closed() => return,
                    () = pace.due() => {
                        pace.schedule(tokio::time::Instant::now());
                        if tx.send(Ok(bookmark_line(&req_view, known))).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    item = w.next() => item,
                };
                let lines: Vec<Bytes> = match item {
                    None => return,
                    Some(Err(baton_store::Error::Compacted {
                        requested,
                        compact_revision,
                    })) => {
                        let status = ApiError::Expired {
                            requested,
                            oldest: compact_revision,
                        }
                        .status();
                        let _ = tx
                            .send(Ok(event_line("ERROR", &status, &req_view, rendering)))
                            .await;
                        return;
                    }
                    Some(Err(e)) => {
                        let status = ApiError::Internal {
                            message: e.to_string(),
                        }
                        .status();
                        let _ = tx
                            .send(Ok(event_line("ERROR", &status, &req_view, rendering)))
                            .await;
                        return;
                    }
                    Some(Ok(WatchEvent::Progress(rev))) => {
                        known = known.max(rev);
                        continue;
                    }
                    Some(Ok(WatchEvent::Events(re))) => {
                        known = known.max(re.revision);
                        let mut out = Vec::new();
                        for ev in &re.events {
                            let matches = |o: &Value| ls.matches(o) && fs.matches(o);
                            let prev = ev
                                .prev_kv
                                .as_ref()
                                .and_then(|kv| objects.decode_as(kv, &res).ok());
                            match ev.kind {
                                EventKind::Put => {
                                    let Ok(cur) = objects.decode_as(&ev.kv, &res) else {
                                        continue;
                                    };
                                    let now_in = matches(&cur);
                                    let was_in = prev.as_ref().is_some_and(matches);
                                    let ty = match (was_in, now_in) {
                                        (false, true) => "ADDED",
                                        (true, true) => "MODIFIED",
                                        (true, false) => "DELETED",
                                        (false, false) => continue,
                                    };
                                    out.push(event_line(ty, &cur, &req_view, rendering));
                                }
                                EventKind::Delete => {
                                    let Some(mut last) = prev else { continue };
                                    if !matches(&last) {
                                        continue;
                                    }
                                    objects::set_rv(&mut last, re.revision);
                                    out.push(event_line("DELETED", &last, &req_view, rendering));
                                }
                            }
                        }
                        out
                    }
                };
                for line in lines {
                    if tx.send(Ok(line)).await.is_err() {
                        return;
                    }
                }
            }
        }
        .instrument(span),
    );
    Ok(watch_response(rx))
}

/// The streamed answer of a watch, its lines read from `rx`.
fn watch_response(rx: tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>) -> Response {
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    let mut resp = Response::new(Body::from_stream(stream));
    resp.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    resp.headers_mut().insert(
        "cache-control",
        HeaderValue::from_static("no-cache, private"),
    );
    resp
}

/// One watch served from the watch cache: its filter and how it renders.
struct CachedWatcher {
    req: Request,
    rendering: Rendering,
    ls: LabelSelector,
    fs: FieldSelector,
    /// The keys it may see (a namespace's, or the whole resource's).
    scope: String,
    bookmarks: bool,
}

impl CachedWatcher {
    fn matches(&self, obj: &crate::watchcache::Cached) -> bool {
        self.ls.matches(obj) && self.fs.matches(obj)
    }

    /// The line for a version of an object. The whole object is the cached JSON, so each
    /// version is serialised once whatever the number of watchers.
    fn line(&self, kind: &str, obj: &crate::watchcache::Cached) -> Bytes {
        if self.rendering != Rendering::Object {
            let obj = match self.rendering {
                Rendering::Metadata => obj.metadata_only(),
                _ => obj.value(),
            };
            return event_line(kind, &obj, &self.req, self.rendering);
        }
        let json = obj.json();
        let mut line = Vec::with_capacity(json.len() + 40);
        line.extend_from_slice(b"{\"type\":\"");
        line.extend_from_slice(kind.as_bytes());
        line.extend_from_slice(b"\",\"object\":");
        line.extend_from_slice(json);
        line.extend_from_slice(b"}\n");
        Bytes::from(line)
    }

    /// The line a change makes for this watcher, if any: ADDED or DELETED as the object
    /// enters or leaves its selection, MODIFIED while it stays in.
    fn change(&self, c: &crate::watchcache::Change) -> Option<Bytes> {
        if !c.key.starts_with(&self.scope) {
            return None;
        }
        let was_in = c.prev.as_deref().is_some_and(|o| self.matches(o));
        match (&c.cur, &c.gone) {
            (Some(cur), _) => {
                let kind = match (was_in, self.matches(cur)) {
                    (false, true) => "ADDED",
                    (true, true) => "MODIFIED",
                    (true, false) => "DELETED",
                    (false, false) => return None,
                };
                Some(self.line(kind, cur))
            }
            (None, Some(gone)) if was_in => Some(self.line("DELETED", gone)),
            (None, _) => None,
        }
    }

    async fn run(
        self,
        mut sub: crate::watchcache::Subscription,
        tx: tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
        timeout: Duration,
    ) {
        use crate::watchcache::Message;
        let initial = sub.initial.iter().filter(|o| self.matches(o));
        for obj in initial {
            if tx.send(Ok(self.line("ADDED", obj))).await.is_err() {
                return;
            }
        }
        for c in &sub.replay {
            if let Some(line) = self.change(c) {
                if tx.send(Ok(line)).await.is_err() {
                    return;
                }
            }
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut pace = BookmarkPace::new(self.bookmarks, tokio::time::Instant::now(), timeout);
        // Everything up to here has been sent: what a bookmark may say.
        let mut known = sub.revision;
        loop {
            let msg = tokio::select! {
                _ = &mut deadline => return,
                _ = tx.closed() => return,
                () = pace.due() => {
                    pace.schedule(tokio::time::Instant::now());
                    // The cache's latest when the watcher is drained: a client that
                    // resumes from a bookmark a few seconds old may find the ring has
                    // moved past it, and must relist.
                    known = known.max(sub.drained_revision().unwrap_or(known));
                    if tx.send(Ok(bookmark_line(&self.req, known))).await.is_err() {
                        return;
                    }
                    continue;
                }
                msg = sub.rx.recv() => msg,
            };
            let line = match msg {
                // Closed by the cache: slow, or the cache reloaded. The client resumes
                // from the last revision it saw.
                None => return,
                Some(Message::Change(c)) => {
                    known = known.max(c.revision);
                    self.change(&c)
                }
                Some(Message::Progress(rev)) => {
                    known = known.max(rev);
                    None
                }
            };
            if let Some(line) = line {
                if tx.send(Ok(line)).await.is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod_with(ephemeral: Value) -> Value {
        json!({"spec": {
            "containers": [{"name": "app", "image": "a"}],
            "ephemeralContainers": ephemeral,
        }})
    }

    #[test]
    fn bookmarks_come_once_a_minute_and_just_before_the_end() {
        let t0 = tokio::time::Instant::now();
        let secs = Duration::from_secs;
        // Not asked for: none.
        assert_eq!(BookmarkPace::new(false, t0, secs(1800)).next, None);
        // A long watch: every minute, and the last one two seconds before its end.
        let mut pace = BookmarkPace::new(true, t0, secs(150));
        let mut sent = Vec::new();
        while let Some(at) = pace.next {
            sent.push(at - t0);
            pace.schedule(at);
        }
        assert_eq!(sent, [secs(60), secs(120), secs(148)]);
        // A short one gets only the last; one too short for it, none.
        assert_eq!(
            BookmarkPace::new(true, t0, secs(3)).next,
            Some(t0 + secs(1))
        );
        assert_eq!(BookmarkPace::new(true, t0, secs(1)).next, None);
    }

    #[test]
    fn only_the_resource_version_and_managed_fields_are_bookkeeping() {
        let old = json!({"metadata": {"name": "a", "resourceVersion": "1",
            "managedFields": [{"manager": "x"}]}, "spec": {"n": 1}});
        let same = json!({"metadata": {"name": "a", "resourceVersion": "2"}, "spec": {"n": 1}});
        assert!(same_but_bookkeeping(&old, &same));
        for differs in [
            json!({"metadata": {"name": "a", "resourceVersion": "1"}, "spec": {"n": 2}}),
            json!({"metadata": {"name": "a", "labels": {}}, "spec": {"n": 1}}),
            json!({"metadata": {"name": "a"}, "spec": {"n": 1}, "status": {}}),
            json!({"metadata": {"name": "b", "resourceVersion": "1"}, "spec": {"n": 1}}),
            json!({"spec": {"n": 1}}),
        ] {
            assert!(!same_but_bookkeeping(&old, &differs), "{differs}");
            assert!(!same_but_bookkeeping(&differs, &old), "{differs}");
        }
    }

    #[test]
    fn a_whole_pod_update_keeps_its_ephemeral_containers() {
        let debugger = json!({"name": "debugger", "image": "toolbox"});
        let old = pod_with(json!([debugger]));
        assert!(ephemeral_kept(&old, &old).is_none());
        // An empty list and none at all are the same.
        assert!(ephemeral_kept(&pod_with(json!([])), &json!({"spec": {}})).is_none());
        for new in [
            pod_with(json!([])),
            json!({"spec": {}}),
            pod_with(json!([debugger, debugger])),
        ] {
            let e = ephemeral_kept(&old, &new).expect("refused");
            assert_eq!(
                (e.field.as_str(), e.reason),
                ("spec.ephemeralContainers", "FieldValueForbidden")
            );
        }
    }

    #[test]
    fn ephemeral_containers_are_only_ever_added() {
        let debugger = json!({"name": "debugger", "image": "toolbox"});
        let old = pod_with(json!([debugger]));
        // Adding one is fine.
        let added = json!([debugger, {"name": "second", "image": "toolbox"}]);
        assert!(ephemeral_changes(&old, &added).is_empty());
        // Removing, changing, reusing a name, leaving out the image, or giving what only
        // long-lived containers have are not.
        let fields = |new: Value| -> Vec<String> {
            ephemeral_changes(&old, &new)
                .into_iter()
                .map(|e| format!("{} {}", e.field, e.reason))
                .collect()
        };
        assert_eq!(
            fields(json!([])),
            ["spec.ephemeralContainers FieldValueForbidden"]
        );
        assert_eq!(
            fields(json!([{"name": "debugger", "image": "other"}])),
            ["spec.ephemeralContainers FieldValueForbidden"]
        );
        assert_eq!(
            fields(json!([debugger, {"name": "app", "image": "t"}])),
            ["spec.ephemeralContainers[1].name FieldValueDuplicate"]
        );
        assert_eq!(
            fields(json!([debugger, {"name": "x"}])),
            ["spec.ephemeralContainers[1].image FieldValueRequired"]
        );
        assert_eq!(
            fields(
                json!([debugger, {"name": "x", "image": "t", "ports": [{"containerPort": 80}]}])
            ),
            ["spec.ephemeralContainers[1].ports FieldValueForbidden"]
        );
        assert_eq!(
            fields(json!([debugger, {"name": "x", "image": "t", "targetContainerName": "nope"}])),
            ["spec.ephemeralContainers[1].targetContainerName FieldValueNotFound"]
        );
    }
}
