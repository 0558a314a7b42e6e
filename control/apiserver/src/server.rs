//! Serving: TLS (rustls, HTTP/2 and HTTP/1.1), authentication (tokens and client
//! certificates), impersonation and authorization ([`crate::access`]), and routing of
//! non-resource paths (version, discovery, OpenAPI, health) and resource paths.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, Request as HttpRequest, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use base64::Engine;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tracing::Instrument;

use baton_auth::{Attributes, UserInfo};

use crate::access::authn;
use crate::discovery;
use crate::error::ApiError;
use crate::objects::{Objects, ReadAt};
use crate::pki::Pki;
use crate::resources::{self, Served};
use crate::rest::{self, MAX_BODY_BYTES};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("failed to listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Pki(#[from] crate::pki::PkiError),
    #[error("failed to bootstrap the API server (its system namespaces and stored CustomResourceDefinitions)")]
    Bootstrap(#[source] ApiError),
}

/// The API server: the store, the PKI, and the routes.
#[derive(Clone, Debug)]
pub struct ApiServer {
    objects: Objects,
    pki: Pki,
    /// Seats for non-watch requests, `--max-requests-inflight` of them, shared out by
    /// priority level ([`crate::fairness`]): a request beyond its level's seats waits in
    /// its client's queue, and gets 429 when the level's queues are full.
    fairness: crate::fairness::Fairness,
    /// What `/metrics` serves.
    metrics: Arc<crate::telemetry::ApiMetrics>,
    /// The cluster token, if this server lets members join ([`crate::join`]).
    join: Option<Arc<crate::join::Token>>,
    /// The node token derived from it, which this server takes as a bootstrap token.
    node_join: Option<Arc<crate::join::Token>>,
    /// The longest a request that is not long-running may take (`--request-timeout`);
    /// a client's `timeout` parameter may only shorten it.
    request_timeout: Duration,
}

/// kube-apiserver's `--request-timeout` default.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Default cap on concurrent non-watch requests: kube-apiserver's defaults, 400 requests
/// and 200 mutating ones, which its priority and fairness share out together.
pub const MAX_INFLIGHT: usize = 600;

fn json_ok(v: &Value) -> Response {
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        serde_json::to_vec(v).unwrap_or_default(),
    )
        .into_response()
}

fn parse_query(q: Option<&str>) -> HashMap<String, String> {
    form_urlencoded::parse(q.unwrap_or("").as_bytes())
        .into_owned()
        .collect()
}

/// Which aggregated discovery version the Accept header asks for, if any.
fn aggregated_version(accept: &str) -> Option<&'static str> {
    for part in accept.split(',') {
        let p = part.trim();
        if p.contains("as=APIGroupDiscoveryList") {
            if p.contains("v=v2beta1") {
                return Some("v2beta1");
            }
            if p.contains("v=v2") {
                return Some("v2");
            }
        } else if p.starts_with("application/json") || p.starts_with("*/*") {
            return None;
        }
    }
    None
}

fn discovery_response(served: &Served, core: bool, accept: &str) -> Response {
    match aggregated_version(accept) {
        Some(v) => {
            let doc = discovery::aggregated(served, core, &format!("apidiscovery.k8s.io/{v}"));
            let ct =
                format!("application/json;g=apidiscovery.k8s.io;v={v};as=APIGroupDiscoveryList");
            let mut resp = json_ok(&doc);
            resp.headers_mut().insert(
                "content-type",
                HeaderValue::from_str(&ct).expect("valid header"),
            );
            resp
        }
        None if core => json_ok(&discovery::api_versions()),
        None => json_ok(&discovery::api_group_list(served)),
    }
}

impl ApiServer {
    pub fn new(objects: Objects, pki: Pki) -> Self {
        Self::with_max_inflight(objects, pki, MAX_INFLIGHT)
    }

    /// The watch caches this server serves from.
    pub fn watch_caches(&self) -> &crate::watchcache::WatchCaches {
        &self.objects.caches
    }

    pub fn with_max_inflight(mut objects: Objects, pki: Pki, max: usize) -> Self {
        objects.access = objects.access.clone().with_pki(pki.clone());
        match pki.kubelet_client_config() {
            Ok(c) => objects.kubelet_tls = Some(Arc::new(c)),
            Err(e) => {
                tracing::warn!(error = %e, "no client credentials for node agents: logs, exec and metrics will fail")
            }
        }
        let metrics = Arc::new(crate::telemetry::ApiMetrics::default());
        Self {
            objects,
            pki,
            fairness: crate::fairness::Fairness::new(max, metrics.flow.clone()),
            join: None,
            node_join: None,
            metrics,
            request_timeout: REQUEST_TIMEOUT,
        }
    }

    /// Sets the longest a request that is not long-running may take.
    pub fn with_request_timeout(mut self, limit: Duration) -> Self {
        self.request_timeout = limit;
        self
    }

    /// The in-flight limiter (tests saturate it to see the 429).
    pub fn fairness(&self) -> &crate::fairness::Fairness {
        &self.fairness
    }

    pub fn pki(&self) -> &Pki {
        &self.pki
    }

    /// Creates the namespaces every cluster starts with, if they are missing, and starts
    /// serving the stored CustomResourceDefinitions.
    pub async fn bootstrap(&self) -> Result<(), ServeError> {
        let nsr = resources::builtin("Namespace");
        let mut fresh = false;
        for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            if self
                .objects
                .get(nsr, None, ns, ReadAt::Latest)
                .await
                .map_err(ServeError::Bootstrap)?
                .is_some()
            {
                continue;
            }
            fresh |= ns == "default";
            let obj = json!({
                "apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": ns, "uid": uuid::Uuid::new_v4().to_string(), "creationTimestamp": rest::now(),
                             "labels": {"kubernetes.io/metadata.name": ns}},
                "spec": {"finalizers": ["kubernetes"]},
                "status": {"phase": "Active"},
            });
            match self.objects.create(nsr, None, ns, obj, &[]).await {
                Ok(_) | Err(ApiError::AlreadyExists { .. }) => {}
                Err(e) => return Err(ServeError::Bootstrap(e)),
            }
        }
        if fresh {
            self.default_storage_class().await?;
            self.default_ingress_class().await?;
        }
        crate::access::bootstrap::reconcile(&self.objects)
            .await
            .map_err(ServeError::Bootstrap)?;
        // Every role and binding is read before the first request is served, so that no
        // request is refused for a grant that exists.
        let rbac = &self.objects.access.rbac;
        let rev = rbac
            .load(&self.objects)
            .await
            .map_err(ServeError::Bootstrap)?;
        tokio::spawn(rbac.clone().run(self.objects.clone(), rev));
        let policies = &self.objects.policies;
        let rev = policies
            .load(&self.objects)
            .await
            .map_err(ServeError::Bootstrap)?;
        tokio::spawn(policies.clone().run(self.objects.clone(), rev));
        self.serve_custom_resources().await
    }

    /// The `local` StorageClass a new cluster starts with, as k3s starts with
    /// `local-path`: claims that name no class get it, and the controller manager's local
    /// provisioner makes their volumes on the node their first pod goes to. Made once;
    /// an administrator who deletes it keeps it deleted.
    async fn default_storage_class(&self) -> Result<(), ServeError> {
        let scr = resources::builtin("StorageClass");
        let obj = json!({
            "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
            "metadata": {"name": "local", "uid": uuid::Uuid::new_v4().to_string(),
                         "creationTimestamp": rest::now(),
                         "annotations": {baton_kube::storage::DEFAULT_CLASS: "true"}},
            "provisioner": baton_kube::storage::LOCAL_PROVISIONER,
            "reclaimPolicy": "Delete",
            "volumeBindingMode": "WaitForFirstConsumer",
        });
        match self.objects.create(scr, None, "local", obj, &[]).await {
            Ok(_) | Err(ApiError::AlreadyExists { .. }) => Ok(()),
            Err(e) => Err(ServeError::Bootstrap(e)),
        }
    }

    /// The `baton` IngressClass a new cluster starts with, marked default, as k3s starts
    /// with Traefik's: Ingresses that name no class are served by every node. Made once;
    /// an administrator who deletes it keeps it deleted.
    async fn default_ingress_class(&self) -> Result<(), ServeError> {
        let icr = resources::builtin("IngressClass");
        let name = baton_kube::ingress::CLASS;
        let obj = json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "IngressClass",
            "metadata": {"name": name, "uid": uuid::Uuid::new_v4().to_string(),
                         "creationTimestamp": rest::now(),
                         "annotations": {baton_kube::ingress::DEFAULT_CLASS_ANNOTATION: "true"}},
            "spec": {"controller": baton_kube::ingress::CONTROLLER},
        });
        match self.objects.create(icr, None, name, obj, &[]).await {
            Ok(_) | Err(ApiError::AlreadyExists { .. }) => Ok(()),
            Err(e) => Err(ServeError::Bootstrap(e)),
        }
    }

    /// Serves the stored CustomResourceDefinitions, and starts the loop that keeps
    /// serving them as they change (it ends when the store closes).
    pub async fn serve_custom_resources(&self) -> Result<(), ServeError> {
        crate::crd::controller::serve_stored(&self.objects)
            .await
            .map_err(ServeError::Bootstrap)?;
        tokio::spawn(crate::crd::controller::run(self.objects.clone()));
        Ok(())
    }

    /// Lets members that hold `token` join through `/baton/v1/join`.
    pub fn with_join_token(mut self, token: crate::join::Token) -> Self {
        self.node_join = Some(Arc::new(token.node_token()));
        self.join = Some(Arc::new(token));
        self
    }

    /// Keeps the `kubernetes` Service in `default` pointing at this server, reached at
    /// `endpoint` ([`crate::kubernetes_service`]), until the task is dropped.
    pub fn publish_endpoint(&self, endpoint: SocketAddr) -> tokio::task::JoinHandle<()> {
        tokio::spawn(crate::kubernetes_service::run(
            self.objects.clone(),
            endpoint,
        ))
    }

    /// Deletes Events `ttl` after their last write ([`crate::event_ttl`]).
    pub fn expire_events(&self, ttl: std::time::Duration) -> tokio::task::JoinHandle<()> {
        tokio::spawn(crate::event_ttl::run(self.objects.clone(), ttl))
    }

    /// The routes, without TLS (tests and in-process clients use this directly).
    pub fn router(&self) -> Router {
        Router::new()
            .fallback(dispatch)
            .with_state(Arc::new(self.clone()))
    }

    /// Serves HTTPS on a bound listener until the task is dropped.
    pub fn serve_tls(
        &self,
        listener: TcpListener,
    ) -> Result<tokio::task::JoinHandle<()>, ServeError> {
        let tls = tokio_rustls::TlsAcceptor::from(Arc::new(self.pki.server_config()?));
        let router = self.router();
        let acceptor = baton_kube::accept::Acceptor::new(listener);
        Ok(tokio::spawn(async move {
            loop {
                let (tcp, peer, permit) = acceptor.accept().await;
                let _ = tcp.set_nodelay(true);
                let tls = tls.clone();
                let router = router.clone();
                tokio::spawn(
                    async move {
                        // The connection's place is freed when it ends.
                        let _permit = permit;
                        // A client that connects and never finishes its handshake does
                        // not keep its place.
                        let stream = match tokio::time::timeout(HANDSHAKE, tls.accept(tcp)).await {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                tracing::debug!(error = %e, "TLS handshake failed");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!("TLS handshake timed out");
                                return;
                            }
                        };
                        // The client certificate, verified against the CA by the handshake,
                        // names the user of every request on the connection.
                        let cert = stream
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .and_then(|c| crate::access::authn::user_of_certificate(c))
                            .map(crate::access::authn::ClientCertUser);
                        let router = tower::ServiceExt::map_request(
                            router,
                            move |mut req: http::Request<hyper::body::Incoming>| {
                                if let Some(c) = &cert {
                                    req.extensions_mut().insert(c.clone());
                                }
                                req
                            },
                        );
                        let service = hyper_util::service::TowerToHyperService::new(router);
                        let mut builder = auto::Builder::new(TokioExecutor::new());
                        // kube-apiserver's `--http2-max-streams-per-connection`: a client
                        // that multiplexes many watches on one connection (hollow nodes,
                        // informers) is not held at hyper's 200.
                        builder.http2().max_concurrent_streams(1000);
                        // An HTTP/1.1 connection that sends no request for this long is
                        // closed (hyper's header read timeout runs while a kept-alive
                        // connection waits for its next request), so that pools of idle
                        // connections from thousands of clients give their places back.
                        // Clients keep theirs 90 s, and retry a request on a connection
                        // closed before it was sent.
                        builder
                            .http1()
                            .timer(hyper_util::rt::TokioTimer::new())
                            .header_read_timeout(IDLE);
                        if let Err(e) = builder
                            .serve_connection_with_upgrades(TokioIo::new(stream), service)
                            .await
                        {
                            tracing::debug!(error = %e, "connection ended with an error");
                        }
                    }
                    .instrument(tracing::debug_span!("api_conn", %peer)),
                );
            }
        }))
    }
}

/// How long a TLS handshake may take.
const HANDSHAKE: std::time::Duration = std::time::Duration::from_secs(10);

/// How long an HTTP/1.1 connection may wait for its next request.
const IDLE: std::time::Duration = std::time::Duration::from_secs(30);

/// Requests that need no credentials: what kube-apiserver's system:public-info-viewer
/// allows, and the OIDC documents that let others verify ServiceAccount tokens.
fn public(path: &str) -> bool {
    matches!(
        path,
        "/version"
            | "/healthz"
            | "/readyz"
            | "/livez"
            | "/.well-known/openid-configuration"
            | "/openid/v1/jwks"
            // The CA is public; a joiner checks it against its token's hash.
            | "/cacerts"
            // Checks the cluster token itself, which is no user's credential.
            | "/baton/v1/join"
    )
}

/// `/baton/v1/join`: the sealed bundle and the store members, for a joiner that
/// presents the cluster token's secret as its bearer token.
async fn join_answer(api: &ApiServer, headers: &http::HeaderMap) -> Response {
    let Some(token) = &api.join else {
        return ApiError::NoRoute.into_response();
    };
    if !authn::bearer(headers).is_some_and(|p| token.admits(p)) {
        tracing::warn!("a join was refused: wrong or missing cluster token");
        return ApiError::Unauthorized.into_response();
    }
    let unavailable = |message: String| ApiError::Unavailable { message }.into_response();
    let key = crate::join::BUNDLE_KEY.as_bytes();
    let sealed = match api.objects.store.get(key, Default::default()).await {
        Ok(Some(kv)) => kv.value,
        Ok(None) => {
            return unavailable("the cluster's shared keys are not stored yet; try again".into())
        }
        Err(e) => return unavailable(format!("the store cannot be read: {e}")),
    };
    let members = api
        .objects
        .store
        .status()
        .members
        .into_iter()
        .map(|m| m.addr)
        .collect();
    let answer = crate::join::JoinAnswer {
        bundle: base64::engine::general_purpose::STANDARD.encode(&sealed),
        members,
    };
    match serde_json::to_value(&answer) {
        Ok(v) => json_ok(&v),
        Err(e) => ApiError::Internal {
            message: e.to_string(),
        }
        .into_response(),
    }
}

/// Why a request is a browser's request from another site, if it is one.
///
/// The dashboard lets users import their client certificate into the browser, which then
/// presents it on any page's requests to this server: another site could open an exec
/// WebSocket or send a simple POST as that user. Browsers say where a request comes from
/// (`Sec-Fetch-Site`, `Origin`); such a request from elsewhere is refused. Clients that
/// are not browsers (kubectl, client libraries) send neither header and are unaffected.
fn cross_site(parts: &http::request::Parts) -> Option<String> {
    let site = parts
        .headers
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok());
    if let Some(site @ ("cross-site" | "same-site")) = site {
        return Some(format!("Sec-Fetch-Site: {site}"));
    }
    let origin = parts.headers.get(http::header::ORIGIN)?;
    let host = parts
        .headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| parts.uri.authority().map(|a| a.as_str()));
    let same = origin
        .to_str()
        .ok()
        .and_then(|o| o.split_once("://"))
        .is_some_and(|(_, o)| Some(o) == host);
    (!same).then(|| format!("Origin: {}", String::from_utf8_lossy(origin.as_bytes())))
}

/// The node certificate endpoint decides itself who may ask (a node for itself).
fn checks_its_own_access(path: &str) -> bool {
    path.starts_with("/baton/v1/nodes/") && path.ends_with("/certificate")
}

/// Who the request is and whether it may do what it asks: the user it acts as, or the
/// 401 or 403 to answer.
async fn admit(
    api: &ApiServer,
    parts: &http::request::Parts,
    path: &str,
) -> Result<UserInfo, Response> {
    let cert = parts.extensions.get::<authn::ClientCertUser>();
    // The node token (derived from the cluster token) is a bootstrap token too, so that a
    // node joins with one token made with the cluster, as k3s's agents do. The cluster
    // token itself is no user: it opens the cluster's keys, and only servers hold it.
    let node_token = api
        .node_join
        .as_ref()
        .zip(authn::bearer(&parts.headers))
        .is_some_and(|(t, b)| t.admits(b));
    let user = if node_token {
        UserInfo::new("system:bootstrap:node-token", &[authn::BOOTSTRAPPERS]).authenticated()
    } else {
        match authn::authenticate(&api.objects, &parts.headers, cert).await {
            Ok(Some(u)) => u,
            Ok(None) => return Err(ApiError::Unauthorized.into_response()),
            Err(e) => return Err(e.into_response()),
        }
    };
    let user = authn::impersonate(&api.objects.access, &api.objects, user, &parts.headers)
        .await
        .map_err(IntoResponse::into_response)?;
    if !checks_its_own_access(path) {
        let attrs =
            Attributes::from_request(user.clone(), parts.method.as_str(), path, parts.uri.query());
        api.objects
            .access
            .require(&api.objects, &attrs)
            .await
            .map_err(IntoResponse::into_response)?;
    }
    Ok(user)
}

/// What a request asks for, read once: the metrics label it and the handler serves it.
struct Asked {
    /// One snapshot per request: a CRD coming or going mid-request changes nothing here.
    served: Served,
    query: HashMap<String, String>,
    /// The resource the path names, if it names one.
    target: Option<rest::Target>,
}

/// How long a request may take: None for the long-running ones (watches, logs, exec,
/// attach, port-forward, proxies and other upgrades), as kube-apiserver tells them
/// apart; otherwise the server's limit, or the client's `timeout` if shorter. A
/// `timeout` that does not parse is refused, as kube-apiserver refuses it.
fn time_limit(
    req: &HttpRequest<Body>,
    query: &HashMap<String, String>,
    server: Duration,
) -> Result<Option<Duration>, ApiError> {
    let watch = watching(query);
    let streams = pod_stream(req.uri().path()).is_some();
    let segs: Vec<&str> = req.uri().path().trim_matches('/').split('/').collect();
    let proxied = segs
        .windows(3)
        .any(|w| matches!(w, ["pods" | "services" | "nodes", _, "proxy"]));
    let upgrade = req.headers().contains_key(http::header::UPGRADE);
    if watch || streams || proxied || upgrade {
        return Ok(None);
    }
    let asked = match query.get("timeout").filter(|t| !t.is_empty()) {
        None => None,
        Some(t) => Some(go_duration(t).ok_or_else(|| {
            ApiError::bad_request(format!(
                "invalid timeout specified in the request URL: {t:?}"
            ))
        })?),
    };
    Ok(Some(match asked {
        Some(d) if !d.is_zero() => d.min(server),
        _ => server,
    }))
}

/// Which of a pod's streams the path names (`exec`, `attach`, `portforward`, `log`): a
/// pod's subresource, not an object that happens to have such a name.
fn pod_stream(path: &str) -> Option<&str> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    match segs.as_slice() {
        [.., "pods", _, sub @ ("exec" | "attach" | "portforward" | "log")] => Some(sub),
        _ => None,
    }
}

/// Whether the request hands its connection over to a pod's node (exec, attach,
/// port-forward), to go on after the response.
fn hands_over(path: &str) -> bool {
    matches!(pod_stream(path), Some("exec" | "attach" | "portforward"))
}

/// Whether the request asks for a watch (`?watch=true`).
fn watching(query: &HashMap<String, String>) -> bool {
    matches!(query.get("watch").map(String::as_str), Some("true" | "1"))
}

/// A Go duration (`30s`, `1m0s`, `1.5h`, `250ms`), as clients send `timeout`.
fn go_duration(s: &str) -> Option<Duration> {
    if s == "0" {
        return Some(Duration::ZERO);
    }
    if s.is_empty() {
        return None;
    }
    let mut rest = s;
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .filter(|&n| n > 0)?;
        let value: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += value * seconds;
    }
    Duration::try_from_secs_f64(total).ok()
}

/// Serves one request, counted and timed in the API server's metrics.
async fn dispatch(State(api): State<Arc<ApiServer>>, req: HttpRequest<Body>) -> Response {
    let started = std::time::Instant::now();
    let served = api.objects.registry.snapshot();
    let asked = Asked {
        query: parse_query(req.uri().query()),
        target: rest::route(&served, req.uri().path()),
        served,
    };
    let labels = crate::telemetry::labels(
        asked.target.as_ref(),
        req.method(),
        &asked.query,
        req.headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or(""),
    );
    let _in_flight = api.metrics.in_flight(req.method());
    let mut req = req;
    let long_running = match api.metrics.long_running(&labels) {
        // A pod's stream goes on after its 101, where it is served: the hold goes with
        // it. A watch, or a proxied answer, lasts as long as its body.
        Some(guard) if hands_over(req.uri().path()) => {
            req.extensions_mut()
                .insert(baton_kube::StreamHold::new(guard));
            None
        }
        other => other,
    };
    let resp = match time_limit(&req, &asked.query, api.request_timeout) {
        Ok(None) => serve(&api, req, asked).await,
        // As kube-apiserver's timeout filter: the client is answered 504 when the time
        // is up. What the request had done by then stands; the rest of it is dropped.
        // The store learns the deadline too, so that a wait for a leader ends before it
        // with "nothing was written" (503), which a client may safely retry.
        Ok(Some(limit)) => match tokio::time::timeout(
            limit,
            baton_store::with_deadline(
                tokio::time::Instant::now() + limit,
                serve(&api, req, asked),
            ),
        )
        .await
        {
            Ok(resp) => resp,
            Err(_) => ApiError::Timeout {
                message: "Timeout: request did not complete within the requested timeout - context deadline exceeded".into(),
            }
            .into_response(),
        },
        Err(e) => e.into_response(),
    };
    api.metrics
        .observe(labels, resp.status().as_u16(), started.elapsed());
    match long_running {
        // A watch (or a proxied answer) goes on after this returns, for as long as its
        // body is read.
        Some(guard) => resp.map(|body| {
            Body::new(http_body_util::BodyExt::map_frame(body, move |frame| {
                let _held = &guard;
                frame
            }))
        }),
        None => resp,
    }
}

async fn serve(api: &Arc<ApiServer>, req: HttpRequest<Body>, asked: Asked) -> Response {
    let Asked {
        served,
        query,
        target,
    } = asked;
    let (mut parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    // exec, attach and port-forward hand the connection over to the node.
    let upgrade = parts.extensions.remove::<hyper::upgrade::OnUpgrade>();
    let hold = parts.extensions.remove::<baton_kube::StreamHold>();
    if crate::ui::is_ui(&path) && parts.method == http::Method::GET {
        return crate::ui::serve(&path);
    }
    let mut user = UserInfo::new(baton_auth::ANONYMOUS, &["system:unauthenticated"]);
    if !public(&path) {
        if let Some(why) = cross_site(&parts) {
            return ApiError::Forbidden {
                message: format!(
                    "a browser's request from another site is refused ({why}): the dashboard's client certificate must not serve other pages"
                ),
            }
            .into_response();
        }
        match admit(api, &parts, &path).await {
            Ok(u) => user = u,
            Err(resp) => return resp,
        }
    }
    let parts_query = parts.uri.query().map(String::from);
    let is_watch = watching(&query);
    // Long-running requests do not hold a slot, as kube-apiserver's long-running check.
    let streaming = hands_over(&path);
    let _seat = if is_watch || streaming || public(&path) {
        None
    } else {
        let asked = crate::fairness::Asked {
            user: &user,
            reading: parts.method == http::Method::GET,
            resource: target.as_ref().map(|t| t.res.plural.as_ref()),
            namespace: target.as_ref().and_then(|t| t.ns.as_deref()),
        };
        match api.fairness.classify(asked) {
            None => None,
            Some(class) => match api.fairness.admit(class, &user.name).await {
                Ok(seat) => Some(seat),
                Err(e) => {
                    let mut resp = ApiError::TooManyRequests {
                        message: format!("Too many requests, please try again later ({e})."),
                    }
                    .into_response();
                    resp.headers_mut()
                        .insert("retry-after", HeaderValue::from_static("1"));
                    return resp;
                }
            },
        }
    };
    let body = match axum::body::to_bytes(body, MAX_BODY_BYTES).await {
        Ok(b) => b,
        Err(_) => {
            return ApiError::TooLarge {
                size: MAX_BODY_BYTES + 1,
                limit: MAX_BODY_BYTES,
            }
            .into_response()
        }
    };
    let accept = parts
        .headers
        .get("accept")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("")
        .to_string();
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    match segs.as_slice() {
        ["version"] => return json_ok(&discovery::version()),
        [".well-known", "openid-configuration"] => {
            return json_ok(&crate::access::tokens::openid_configuration())
        }
        ["openid", "v1", "jwks"] => {
            return match api.objects.access.signer() {
                Ok(s) => json_ok(&s.jwks()),
                Err(e) => e.into_response(),
            }
        }
        ["healthz"] | ["livez"] => return (StatusCode::OK, "ok").into_response(),
        ["cacerts"] if parts.method == http::Method::GET => {
            return (
                StatusCode::OK,
                [("content-type", "application/x-pem-file")],
                api.pki.ca_pem.clone(),
            )
                .into_response()
        }
        ["baton", "v1", "join"] if parts.method == http::Method::GET => {
            return join_answer(api, &parts.headers).await
        }
        ["metrics"] if parts.method == http::Method::GET => {
            let objects = crate::telemetry::storage_objects(&api.objects, &served);
            return (
                StatusCode::OK,
                [(
                    "content-type",
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                )],
                api.metrics.encode(&api.objects.store.metrics(), &objects),
            )
                .into_response();
        }
        // Ready means the store can take writes: a full disk or a lost leader is
        // reported here, as kube-apiserver's etcd check does.
        ["readyz"] => {
            return match api.objects.store.health() {
                Ok(()) => (StatusCode::OK, "ok").into_response(),
                Err(e) => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("[-]etcd failed: {e}\nreadyz check failed\n"),
                )
                    .into_response(),
            }
        }
        ["api"] => return discovery_response(&served, true, &accept),
        ["apis"] => return discovery_response(&served, false, &accept),
        ["api", v] => {
            return discovery::resource_list(&served, "", v)
                .map(|d| json_ok(&d))
                .unwrap_or_else(|| ApiError::NoRoute.into_response())
        }
        ["apis", g] => {
            return discovery::api_group(&served, g)
                .map(|d| json_ok(&d))
                .unwrap_or_else(|| ApiError::NoRoute.into_response())
        }
        ["apis", g, v] => {
            return discovery::resource_list(&served, g, v)
                .map(|d| json_ok(&d))
                .unwrap_or_else(|| ApiError::NoRoute.into_response())
        }
        ["baton", "v1", "nodes", node, "certificate"] if parts.method == http::Method::POST => {
            return crate::nodelink::issue_certificate(&api.pki, &user, node, &body)
        }
        ["api", "v1", "nodes", node, "proxy", rest @ ..]
            if parts.method == http::Method::GET && !rest.is_empty() =>
        {
            return crate::nodelink::node_proxy(&api.objects, node, &rest.join("/")).await;
        }
        ["openapi", "v2"] => {
            let doc = crate::openapi_v2::cached(&served);
            let accept = parts
                .headers
                .get(http::header::ACCEPT)
                .and_then(|a| a.to_str().ok())
                .unwrap_or("");
            return if accept.contains("protobuf") {
                (
                    StatusCode::OK,
                    [("content-type", crate::openapi_v2::PROTOBUF)],
                    doc.1.clone(),
                )
                    .into_response()
            } else {
                json_ok(&doc.0)
            };
        }
        ["openapi", "v3"] => return json_ok(&discovery::openapi_index(&served)),
        ["openapi", "v3", "api", v] => {
            return discovery::openapi_doc(&served, "", v)
                .map(|d| json_ok(&d))
                .unwrap_or_else(|| ApiError::NoRoute.into_response())
        }
        ["openapi", "v3", "apis", g, v] => {
            return discovery::openapi_doc(&served, g, v)
                .map(|d| json_ok(&d))
                .unwrap_or_else(|| ApiError::NoRoute.into_response())
        }
        _ => {}
    }
    let Some(target) = target else {
        return ApiError::NoRoute.into_response();
    };
    let req = rest::Request {
        method: parts.method,
        target,
        query,
        headers: parts.headers,
        body,
        user,
        warnings: Default::default(),
    };
    if req.target.res.has_sub("log")
        && req.target.sub.as_deref() == Some("log")
        && req.method == http::Method::GET
    {
        return crate::nodelink::pod_logs(&api.objects, req).await;
    }
    if req.target.res.has_sub("exec")
        && matches!(
            req.target.sub.as_deref(),
            Some("exec" | "attach" | "portforward")
        )
    {
        let raw_query = parts_query.clone();
        return crate::nodelink::pod_stream(&api.objects, req, raw_query, upgrade, hold).await;
    }
    rest::handle(&api.objects, req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_pods_own_streams_are_pod_streams() {
        assert_eq!(pod_stream("/api/v1/namespaces/a/pods/p/exec"), Some("exec"));
        assert_eq!(pod_stream("/api/v1/namespaces/a/pods/p/log"), Some("log"));
        for not in [
            "/api/v1/namespaces/a/configmaps/exec",
            "/api/v1/namespaces/a/configmaps/attach",
            "/api/v1/namespaces/a/pods/exec",
            "/api/v1/namespaces/a/pods/p",
        ] {
            assert_eq!(pod_stream(not), None, "{not}");
        }
    }

    #[test]
    fn go_durations_are_read_as_clients_send_them() {
        let d = |s| go_duration(s);
        assert_eq!(d("30s"), Some(Duration::from_secs(30)));
        assert_eq!(d("1m0s"), Some(Duration::from_secs(60)));
        assert_eq!(d("1h2m3.5s"), Some(Duration::from_secs_f64(3723.5)));
        assert_eq!(d("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(d("0"), Some(Duration::ZERO));
        for bad in ["", "5", "s", "5x", "-1s", "1..5s", "5 s"] {
            assert_eq!(d(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn long_running_requests_have_no_time_limit() {
        let limit = |uri: &str, upgrade: bool| {
            let mut req = http::Request::get(uri);
            if upgrade {
                req = req.header("upgrade", "SPDY/3.1");
            }
            let req = req.body(Body::empty()).unwrap();
            time_limit(&req, &parse_query(req.uri().query()), REQUEST_TIMEOUT)
        };
        let minute = Some(REQUEST_TIMEOUT);
        assert_eq!(limit("/api/v1/pods", false).unwrap(), minute);
        assert_eq!(
            limit("/api/v1/pods?timeout=5s", false).unwrap(),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            limit("/api/v1/pods?timeout=10m", false).unwrap(),
            minute,
            "a client may shorten the limit, not lengthen it"
        );
        for long in [
            "/api/v1/pods?watch=true",
            "/api/v1/namespaces/a/pods/p/log?follow=true",
            "/api/v1/namespaces/a/pods/p/exec?command=sh",
            "/api/v1/nodes/n1/proxy/stats/summary",
        ] {
            assert_eq!(limit(long, false).unwrap(), None, "{long}");
        }
        assert_eq!(limit("/api/v1/namespaces/a/pods/p", true).unwrap(), None);
        for named in [
            "/api/v1/namespaces/a/configmaps/log",
            "/api/v1/namespaces/a/configmaps/exec",
            "/api/v1/namespaces/a/configmaps/proxy",
        ] {
            assert_eq!(limit(named, false).unwrap(), minute, "{named}");
        }
        let bad = limit("/api/v1/pods?timeout=soon", false).unwrap_err();
        assert!(bad.to_string().contains("invalid timeout"), "{bad}");
    }

    #[test]
    fn a_browsers_request_from_another_site_is_told_apart() {
        let parts = |headers: &[(&str, &str)]| {
            let mut req = http::Request::get("/api/v1/pods").header("host", "127.0.0.1:6443");
            for (k, v) in headers {
                req = req.header(*k, *v);
            }
            req.body(()).unwrap().into_parts().0
        };
        // kubectl and client libraries send neither header; the dashboard is same-origin.
        assert_eq!(cross_site(&parts(&[])), None);
        assert_eq!(
            cross_site(&parts(&[
                ("origin", "https://127.0.0.1:6443"),
                ("sec-fetch-site", "same-origin")
            ])),
            None
        );
        assert_eq!(cross_site(&parts(&[("sec-fetch-site", "none")])), None);
        for headers in [
            &[("origin", "https://evil.example")][..],
            &[("origin", "null")][..],
            &[("origin", "https://127.0.0.1:6444")][..],
            &[("sec-fetch-site", "cross-site")][..],
            &[("sec-fetch-site", "same-site")][..],
        ] {
            assert!(cross_site(&parts(headers)).is_some(), "{headers:?}");
        }
    }

    #[test]
    fn query_decoding() {
        let q = parse_query(Some(
            "labelSelector=app%3Dweb%2Ctier+in+%28a%29&watch=true&x",
        ));
        assert_eq!(q["labelSelector"], "app=web,tier in (a)");
        assert_eq!(q["watch"], "true");
        assert_eq!(q["x"], "");
        // Malformed escapes and non-ASCII pass through as text, never a panic.
        let q = parse_query(Some("a=%zz%&b=%C3%A9%é"));
        assert_eq!(q["a"], "%zz%");
        assert_eq!(q["b"], "é%é");
    }

    #[test]
    fn accept_picks_discovery_version() {
        let both = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList,application/json";
        assert_eq!(aggregated_version(both), Some("v2"));
        assert_eq!(aggregated_version("application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList,application/json"), Some("v2beta1"));
        assert_eq!(aggregated_version("application/json"), None);
    }
}
