//! Admission webhooks: MutatingWebhookConfiguration and ValidatingWebhookConfiguration,
//! called as kube-apiserver calls them.
//!
//! A write first passes the built-in mutating plugins, then every mutating webhook that
//! matches it, in the order of their configurations' names and of the webhooks within,
//! each seeing what the ones before it made; then validation, the admission policies, and
//! every validating webhook that matches. A webhook matches by its `rules` (operations,
//! groups, versions, resources with kube's `*`, `*/*`, `pods/*` and `*/status` forms,
//! and scope), `namespaceSelector` (the namespace's labels; a Namespace's own labels),
//! `objectSelector` (the object's or the old object's labels) and `matchConditions`
//! (CEL over `object`, `oldObject` and `request`; an error follows `failurePolicy`).
//!
//! The call is an `admission.k8s.io/v1` AdmissionReview POSTed over HTTPS to
//! `clientConfig.url`, or to a ready endpoint of `clientConfig.service` (verified as
//! `NAME.NAMESPACE.svc`), trusting `caBundle` (else the public web roots). It may take
//! `timeoutSeconds` (10 by default, at most 30), and its answer at most
//! [`MAX_RESPONSE_BYTES`]. A webhook that cannot be reached, times out or answers
//! nonsense refuses the write if its `failurePolicy` is Fail (the default) and is passed
//! over if it is Ignore. A mutating webhook's answer may carry a JSONPatch, which is
//! applied; one that would rename the object or move it is refused. A dry run is refused
//! by a webhook that does not declare `sideEffects: None` or `NoneOnDryRun`.
//!
//! The admissionregistration.k8s.io kinds themselves never go to webhooks, so a broken
//! webhook can always be removed. Not yet: `reinvocationPolicy: IfNeeded`, DELETE and
//! CONNECT operations, and `matchPolicy: Equivalent` across versions (Baton serves one
//! version of each built-in kind).

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

use crate::crd::cel::Expression;
use crate::error::{ApiError, ApiResult};
use crate::objects::{Objects, ReadAt};
use crate::policy::{self, Attempt};
use crate::resources;
use crate::table::s;

/// Most a webhook's answer may hold.
pub const MAX_RESPONSE_BYTES: usize = 3 << 20;
const DEFAULT_TIMEOUT: u64 = 10;
const MAX_TIMEOUT: u64 = 30;

/// Which kind of configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Mutating,
    Validating,
}

impl Phase {
    /// The plural of the configuration kind, as stored.
    pub fn plural(self) -> &'static str {
        match self {
            Phase::Mutating => "mutatingwebhookconfigurations",
            Phase::Validating => "validatingwebhookconfigurations",
        }
    }
}

/// Why one call did not give an answer; it then follows the webhook's failurePolicy.
#[derive(Debug, thiserror::Error)]
enum CallError {
    #[error("{0}")]
    Config(String),
    #[error("failed to call webhook: Post {url:?}: context deadline exceeded")]
    Timeout { url: String },
    #[error("failed to call webhook: Post {url:?}: {why}")]
    Transport { url: String, why: String },
    #[error("received invalid webhook response: {0}")]
    Response(String),
}

/// Runs the mutating webhooks that match the write on `obj`, in order (`a.object` is
/// not read: `obj` is the object, as each webhook leaves it).
pub async fn mutate(objects: &Objects, a: &Attempt<'_>, obj: &mut Value) -> ApiResult<()> {
    let hooks = matching(objects, Phase::Mutating, &Attempt { object: obj, ..*a }).await?;
    for (config, hook) in hooks {
        let attempt = Attempt { object: obj, ..*a };
        if !conditions_hold(&config, &hook, &attempt)? {
            continue;
        }
        let Some(response) = admit(&config, &hook, objects, &attempt).await? else {
            continue;
        };
        let patch = s(&response, "/patch");
        if patch.is_empty() {
            continue;
        }
        let name = s(&hook, "/name").to_string();
        let invalid = |why: String| ApiError::Internal {
            message: format!(
                "failed calling webhook {name:?}: received invalid webhook response: {why}"
            ),
        };
        if !matches!(s(&response, "/patchType"), "JSONPatch" | "") {
            return Err(invalid(format!(
                "unsupported patchType {:?}",
                s(&response, "/patchType")
            )));
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(patch)
            .map_err(|e| invalid(format!("the patch is not base64: {e}")))?;
        let ops: json_patch::Patch = serde_json::from_slice(&bytes)
            .map_err(|e| invalid(format!("the patch is not a JSON patch: {e}")))?;
        let mut patched = obj.clone();
        json_patch::patch(&mut patched, &ops)
            .map_err(|e| invalid(format!("the patch does not apply: {e}")))?;
        if let Some(field) = policy::identity_changed(obj, &patched) {
            return Err(invalid(format!("the patch changes {field}")));
        }
        *obj = patched;
    }
    Ok(())
}

/// Runs the validating webhooks that match the write; the first refusal refuses it.
pub async fn validate(objects: &Objects, a: &Attempt<'_>) -> ApiResult<()> {
    for (config, hook) in matching(objects, Phase::Validating, a).await? {
        if conditions_hold(&config, &hook, a)? {
            admit(&config, &hook, objects, a).await?;
        }
    }
    Ok(())
}

/// The webhooks of `phase` whose rules and selectors take the write, with their
/// configuration's name, in order.
async fn matching(
    objects: &Objects,
    phase: Phase,
    a: &Attempt<'_>,
) -> ApiResult<Vec<(String, Value)>> {
    if a.res.group == "admissionregistration.k8s.io" {
        return Ok(Vec::new());
    }
    let configs = objects.policies.read(|p| p.webhooks(phase));
    let mut candidates = Vec::new();
    for config in configs {
        let name = s(&config, "/metadata/name").to_string();
        for hook in config
            .get("webhooks")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if policy::rules_match(hook.get("rules"), a) {
                candidates.push((name.clone(), hook.clone()));
            }
        }
    }
    if candidates.is_empty() {
        return Ok(candidates);
    }
    // The labels namespaceSelector looks at: the namespace's, or a Namespace's own.
    let ns_labels = if a.res.group.is_empty() && a.res.plural == "namespaces" {
        Some(a.object.pointer("/metadata/labels").cloned())
    } else {
        match a.namespace {
            Some(ns) if a.res.namespaced => Some(
                objects
                    .get(resources::builtin("Namespace"), None, ns, ReadAt::Latest)
                    .await?
                    .and_then(|(v, _)| v.pointer("/metadata/labels").cloned()),
            ),
            _ => None,
        }
    };
    let labels = |o: &Value| o.pointer("/metadata/labels").cloned();
    candidates.retain(|(_, hook)| {
        let ns_ok = match &ns_labels {
            Some(l) => policy::selector_matches(hook.get("namespaceSelector"), l.as_ref()),
            None => true,
        };
        let sel = hook.get("objectSelector");
        let obj_ok = policy::selector_matches(sel, labels(a.object).as_ref())
            || a.old
                .is_some_and(|o| policy::selector_matches(sel, labels(o).as_ref()));
        ns_ok && obj_ok
    });
    Ok(candidates)
}

fn fails_closed(hook: &Value) -> bool {
    s(hook, "/failurePolicy") != "Ignore"
}

/// Whether every matchCondition holds; an expression that fails follows failurePolicy.
fn conditions_hold(config: &str, hook: &Value, a: &Attempt<'_>) -> ApiResult<bool> {
    let name = s(hook, "/name");
    let null = Value::Null;
    let request = policy::request(a);
    let vars = [
        ("object", a.object),
        ("oldObject", a.old.unwrap_or(&null)),
        ("request", &request),
    ];
    for c in hook
        .get("matchConditions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let got = Expression::compile(s(c, "/expression"), &["object", "oldObject", "request"])
            .and_then(|e| e.eval(&vars));
        match got {
            Ok(Value::Bool(true)) => {}
            Ok(Value::Bool(false)) => return Ok(false),
            other => {
                let why = match other {
                    Err(e) => e,
                    Ok(v) => format!("the expression gave {v}, not a bool"),
                };
                if fails_closed(hook) {
                    return Err(ApiError::Forbidden {
                        message: format!(
                            "{} {:?} is forbidden: webhook {name:?} of {config:?}: matchCondition {:?} failed: {why}",
                            a.res.qualified(),
                            a.name,
                            s(c, "/name")
                        ),
                    });
                }
                tracing::warn!(webhook = name, %why, "matchCondition failed; webhook skipped");
                return Ok(false);
            }
        }
    }
    Ok(true)
}

/// Calls one webhook: Some(its response) if it allowed the write, an error if it
/// refused it or failed closed, None if it failed open.
async fn admit(
    config: &str,
    hook: &Value,
    objects: &Objects,
    a: &Attempt<'_>,
) -> ApiResult<Option<Value>> {
    let name = s(hook, "/name");
    if a.dry_run && !matches!(s(hook, "/sideEffects"), "None" | "NoneOnDryRun") {
        return Err(ApiError::BadRequest {
            message: format!("admission webhook {name:?} does not support dry run"),
        });
    }
    let uid = uuid::Uuid::new_v4().to_string();
    let mut request = policy::request(a);
    request["uid"] = json!(uid);
    request["requestKind"] = request["kind"].clone();
    request["requestResource"] = request["resource"].clone();
    if let Some(sub) = a.subresource {
        request["subResource"] = json!(sub);
        request["requestSubResource"] = json!(sub);
    }
    request["object"] = a.object.clone();
    request["oldObject"] = a.old.cloned().unwrap_or(Value::Null);
    let review =
        json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request});
    let span = tracing::info_span!("webhook", webhook = name, configuration = config);
    let answer = tracing::Instrument::instrument(call(objects, hook, &review), span).await;
    let failed = |e: CallError| -> ApiResult<Option<Value>> {
        if fails_closed(hook) {
            Err(ApiError::Internal {
                message: format!("failed calling webhook {name:?}: {e}"),
            })
        } else {
            tracing::warn!(webhook = name, error = %e, "webhook failed; failurePolicy Ignore");
            Ok(None)
        }
    };
    let review = match answer {
        Ok(v) => v,
        Err(e) => return failed(e),
    };
    let Some(response) = review.get("response").filter(|r| r.is_object()) else {
        return failed(CallError::Response("no response".into()));
    };
    if s(response, "/uid") != uid {
        return failed(CallError::Response(format!(
            "expected response.uid={uid:?}, got {:?}",
            s(response, "/uid")
        )));
    }
    if response.get("allowed").and_then(Value::as_bool) == Some(true) {
        return Ok(Some(response.clone()));
    }
    let message = s(response, "/status/message");
    let message = if message.is_empty() {
        format!("admission webhook {name:?} denied the request without explanation")
    } else {
        format!("admission webhook {name:?} denied the request: {message}")
    };
    Err(
        match response.pointer("/status/code").and_then(Value::as_u64) {
            Some(403) => ApiError::Forbidden { message },
            _ => ApiError::BadRequest { message },
        },
    )
}

/// Where a webhook is: the address to connect to, the name to verify, the URL for
/// messages, and the request path.
struct Target {
    connect: String,
    server_name: String,
    url: String,
    path: String,
}

async fn target(objects: &Objects, cc: &Value) -> Result<Target, CallError> {
    let config = |m: &str| CallError::Config(m.to_string());
    if let Some(url) = cc.get("url").and_then(Value::as_str) {
        let uri: http::Uri = url
            .parse()
            .map_err(|_| config("clientConfig.url is not a URL"))?;
        if uri.scheme_str() != Some("https") {
            return Err(config("clientConfig.url must be https"));
        }
        let host = uri
            .host()
            .ok_or_else(|| config("clientConfig.url has no host"))?;
        let port = uri.port_u16().unwrap_or(443);
        return Ok(Target {
            connect: format!("{host}:{port}"),
            server_name: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            url: url.to_string(),
            path: uri.path_and_query().map_or("/", |p| p.as_str()).to_string(),
        });
    }
    let svc = cc
        .get("service")
        .ok_or_else(|| config("clientConfig has neither url nor service"))?;
    let (ns, name) = (s(svc, "/namespace"), s(svc, "/name"));
    let port = svc.get("port").and_then(Value::as_i64).unwrap_or(443);
    let path = match s(svc, "/path") {
        "" => "/".to_string(),
        p => p.to_string(),
    };
    let url = format!("https://{name}.{ns}.svc:{port}{path}");
    let not_found = |what: String| CallError::Transport {
        url: url.clone(),
        why: what,
    };
    let service = objects
        .get(
            resources::builtin("Service"),
            Some(ns),
            name,
            ReadAt::Latest,
        )
        .await
        .map_err(|e| not_found(e.to_string()))?
        .map(|(v, _)| v)
        .ok_or_else(|| not_found(format!("service \"{name}\" not found")))?;
    let port_name = service
        .pointer("/spec/ports")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|p| p.get("port").and_then(Value::as_i64) == Some(port))
        .map(|p| s(p, "/name").to_string())
        .ok_or_else(|| not_found(format!("service {ns}/{name} has no port {port}")))?;
    let slices = objects
        .list(
            resources::builtin("EndpointSlice"),
            Some(ns),
            ReadAt::Latest,
            0,
            None,
            |o| s(o, "/metadata/labels/kubernetes.io~1service-name") == name,
        )
        .await
        .map_err(|e| not_found(e.to_string()))?;
    for slice in &slices.items {
        let Some(target_port) = slice
            .get("ports")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .find(|p| s(p, "/name") == port_name)
            .and_then(|p| p.get("port").and_then(Value::as_i64))
        else {
            continue;
        };
        let ready = slice
            .get("endpoints")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|e| e.pointer("/conditions/ready").and_then(Value::as_bool) != Some(false))
            .find_map(|e| e.pointer("/addresses/0").and_then(Value::as_str));
        if let Some(ip) = ready {
            let ip = if ip.contains(':') {
                format!("[{ip}]")
            } else {
                ip.to_string()
            };
            return Ok(Target {
                connect: format!("{ip}:{target_port}"),
                server_name: format!("{name}.{ns}.svc"),
                url,
                path,
            });
        }
    }
    Err(not_found(format!(
        "no endpoints available for service \"{name}\""
    )))
}

fn tls_config(ca_bundle: &str) -> Result<Arc<rustls::ClientConfig>, CallError> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let config = |m: String| CallError::Config(m);
    let mut roots = rustls::RootCertStore::empty();
    if ca_bundle.is_empty() {
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    } else {
        let pem = base64::engine::general_purpose::STANDARD
            .decode(ca_bundle)
            .map_err(|e| config(format!("clientConfig.caBundle is not base64: {e}")))?;
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| config(format!("clientConfig.caBundle: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| config(format!("clientConfig.caBundle: {e}")))?;
        }
        if roots.is_empty() {
            return Err(config("clientConfig.caBundle holds no certificate".into()));
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| config(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(tls))
}

/// POSTs the review and reads the answer, within the webhook's timeout.
async fn call(objects: &Objects, hook: &Value, review: &Value) -> Result<Value, CallError> {
    let secs = hook
        .get("timeoutSeconds")
        .and_then(Value::as_u64)
        .unwrap_or(DEFAULT_TIMEOUT)
        .clamp(1, MAX_TIMEOUT);
    let cc = hook.get("clientConfig").cloned().unwrap_or(json!({}));
    let t = target(objects, &cc).await?;
    let tls = tls_config(s(&cc, "/caBundle"))?;
    let url = t.url.clone();
    let body = serde_json::to_vec(review).map_err(|e| CallError::Config(e.to_string()))?;
    let exchange = async move {
        let transport = |why: String| CallError::Transport {
            url: t.url.clone(),
            why,
        };
        let name = rustls::pki_types::ServerName::try_from(t.server_name.clone())
            .map_err(|e| transport(e.to_string()))?;
        let tcp = tokio::net::TcpStream::connect(&t.connect)
            .await
            .map_err(|e| transport(e.to_string()))?;
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .map_err(|e| transport(e.to_string()))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| transport(e.to_string()))?;
        // Ended with the exchange, whether it finishes or times out.
        let conn = AbortOnDrop(tokio::spawn(conn));
        let req = http::Request::post(&t.path)
            .header(http::header::HOST, &t.server_name)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::ACCEPT, "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
            .map_err(|e| transport(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| transport(e.to_string()))?;
        let status = resp.status();
        let bytes = http_body_util::Limited::new(resp.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|e| CallError::Response(format!("reading the answer: {e}")))?
            .to_bytes();
        drop(conn);
        if !status.is_success() {
            return Err(CallError::Response(format!(
                "the webhook answered {status}"
            )));
        }
        serde_json::from_slice(&bytes).map_err(|e| CallError::Response(e.to_string()))
    };
    tokio::time::timeout(Duration::from_secs(secs), exchange)
        .await
        .map_err(|_| CallError::Timeout { url })?
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
