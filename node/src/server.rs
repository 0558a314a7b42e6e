//! The node agent's own HTTPS endpoint (the kubelet API): container logs for
//! `kubectl logs`, which the API server proxies here.
//!
//! The endpoint is authenticated both ways. Its serving certificate comes from the API
//! server (`POST /baton/v1/nodes/NAME/certificate`, asked with the node's credentials),
//! signed by the cluster CA for the node's address; and it only answers callers with a
//! client certificate signed by the same CA for client authentication, which only the
//! API server has.
//!
//! `GET /containerLogs/NS/POD/CONTAINER` takes the `pods/log` options: `tailLines`,
//! `sinceSeconds`, `sinceTime`, `timestamps`, `limitBytes`, `previous`, `follow`. A
//! followed log streams until its container stops.
//!
//! `GET /metrics` gives, in the Prometheus text format, what each pod still has alive in
//! the sandbox (instances, tasks, sockets) and the CPU it used and was throttled; a pod
//! that was stopped and left nothing behind is absent. The API server proxies it as
//! `/api/v1/nodes/NAME/proxy/metrics`, as for a kubelet.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use baton_wasm_shim::logs::{follow_from, read_logs, LogConfig, LogQuery};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::TokioIo;
use kube::Client;

use crate::streams::PodStreams;
use serde_json::{json, Value};

/// Why the logs endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("asking the API server for the node's certificate")]
    Certificate(#[source] kube::Error),
    #[error("the API server's certificate answer lacks {0}")]
    Answer(&'static str),
    #[error("building the certificate request")]
    Request(#[source] http::Error),
    #[error("the API server's {what} is not valid PEM")]
    Pem {
        what: &'static str,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("TLS setup")]
    Tls(#[source] rustls::Error),
    #[error("the node address {address:?} is not an IP address")]
    Address {
        address: String,
        #[source]
        source: std::net::AddrParseError,
    },
    #[error("TLS setup: the client CA")]
    ClientCa(#[source] rustls::server::VerifierBuilderError),
    #[error("listening on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// What the endpoint knows of the node's pods: where their logs are, and which
/// containers are running (a followed log ends when its container stops).
#[derive(Default)]
pub struct LogIndex {
    /// (namespace, pod name) -> the pod's log directory.
    pub pods: Mutex<HashMap<(String, String), PathBuf>>,
    /// Log files of running containers.
    pub live: Mutex<HashSet<PathBuf>>,
    /// The node's sandbox, once it runs: what `/metrics` reports.
    pub sandbox: std::sync::OnceLock<baton_wasm_shim::Runtime>,
    /// CPU readings for `/stats/summary`.
    pub stats: Arc<crate::stats::Stats>,
    /// (namespace, pod name) -> the pod's uid and its streams, while its sandbox runs.
    streams: Mutex<HashMap<(String, String), PodEntry>>,
    /// How long pods took from the node first seeing them to all their containers
    /// started, as the kubelet's `kubelet_pod_start_duration_seconds`.
    pub pod_starts: PodStarts,
    /// The node's Services, once it routes them: which endpoints a tunnel from another
    /// node may reach ([`crate::tunnel`]).
    pub exits: std::sync::OnceLock<crate::proxy::Services>,
}

/// The kubelet's pod start histogram, with buckets below its first (0.5 s) for starts
/// that take milliseconds.
pub struct PodStarts {
    registry: prometheus_client::registry::Registry,
    seconds: prometheus_client::metrics::histogram::Histogram,
}

impl Default for PodStarts {
    fn default() -> Self {
        let buckets = [
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0,
            20.0, 30.0, 45.0, 60.0, 120.0, 180.0, 240.0, 300.0, 360.0, 480.0, 600.0, 900.0, 1200.0,
            1800.0, 2700.0, 3600.0,
        ];
        let seconds = prometheus_client::metrics::histogram::Histogram::new(buckets);
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register(
            "kubelet_pod_start_duration_seconds",
            "Duration in seconds from kubelet seeing a pod for the first time to the pod starting to run",
            seconds.clone(),
        );
        Self { registry, seconds }
    }
}

impl std::fmt::Debug for PodStarts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodStarts").finish_non_exhaustive()
    }
}

impl PodStarts {
    pub fn observe(&self, took: std::time::Duration) {
        self.seconds.observe(took.as_secs_f64());
    }

    pub(crate) fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// A running pod's uid and its streams.
type PodEntry = (String, Arc<dyn PodStreams>);

impl std::fmt::Debug for LogIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogIndex").finish_non_exhaustive()
    }
}

impl LogIndex {
    /// Marks a container's log file as being written (or no longer).
    pub fn set_live(&self, path: PathBuf, live: bool) {
        let mut set = lock(&self.live);
        if live {
            set.insert(path);
        } else {
            set.remove(&path);
        }
    }
}

impl LogIndex {
    /// Makes a pod's sandbox reachable by `exec`.
    pub fn add_streams(&self, ns: &str, pod: &str, uid: &str, streams: Arc<dyn PodStreams>) {
        lock(&self.streams).insert((ns.into(), pod.into()), (uid.into(), streams));
    }

    /// Forgets a pod's sandbox; a newer pod of the same name keeps its own.
    pub fn remove_streams(&self, ns: &str, pod: &str, uid: &str) {
        let mut m = lock(&self.streams);
        let key = (ns.to_string(), pod.to_string());
        if m.get(&key).is_some_and(|(u, _)| u == uid) {
            m.remove(&key);
        }
    }

    fn streams(&self, ns: &str, pod: &str) -> Option<PodEntry> {
        lock(&self.streams)
            .get(&(ns.to_string(), pod.to_string()))
            .cloned()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Asks the API server for the node's serving certificate: (certificate, key, CA), PEM.
async fn certificate(
    client: &Client,
    node: &str,
    address: &str,
) -> Result<(String, String, String), ServerError> {
    let body = serde_json::to_vec(&json!({"addresses": [address]})).unwrap_or_default();
    let req = http::Request::post(format!("/baton/v1/nodes/{node}/certificate"))
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(body)
        .map_err(ServerError::Request)?;
    let v: Value = client
        .request(req)
        .await
        .map_err(ServerError::Certificate)?;
    let get = |k: &'static str| {
        v.get(k)
            .and_then(Value::as_str)
            .map(String::from)
            .ok_or(ServerError::Answer(k))
    };
    Ok((get("certificate")?, get("key")?, get("ca")?))
}

/// The node's certificate and key, and the cluster CA, as rustls takes them.
struct Identity {
    certs: Vec<rustls::pki_types::CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
    roots: Arc<rustls::RootCertStore>,
}

impl Identity {
    fn from_pem(cert: &str, key: &str, ca: &str) -> Result<Self, ServerError> {
        use rustls::pki_types::pem::PemObject;
        let pem = |what: &'static str| move |source| ServerError::Pem { what, source };
        let certs = rustls::pki_types::CertificateDer::pem_slice_iter(cert.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(pem("certificate"))?;
        let key =
            rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(pem("key"))?;
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls::pki_types::CertificateDer::pem_slice_iter(ca.as_bytes()) {
            roots.add(c.map_err(pem("CA"))?).map_err(ServerError::Tls)?;
        }
        Ok(Self {
            certs,
            key,
            roots: Arc::new(roots),
        })
    }

    /// The endpoint's side: only callers with a certificate from the CA get through.
    fn server_config(&self) -> Result<rustls::ServerConfig, ServerError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            self.roots.clone(),
            provider.clone(),
        )
        .build()
        .map_err(ServerError::ClientCa)?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(ServerError::Tls)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.certs.clone(), self.key.clone_key())
            .map_err(ServerError::Tls)?;
        // HTTP/2 for other nodes' tunnels ([`crate::tunnel`]); the API server offers no
        // ALPN and gets HTTP/1.1, which its upgrades (exec, attach, port-forward) need.
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(config)
    }

    /// The node's side as a client of other nodes' endpoints ([`crate::tunnel`]).
    fn client_config(&self) -> Result<rustls::ClientConfig, ServerError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(ServerError::Tls)?
            .with_root_certificates(self.roots.clone())
            .with_client_auth_cert(self.certs.clone(), self.key.clone_key())
            .map_err(ServerError::Tls)
    }
}

/// The endpoint, once it listens.
#[derive(Debug)]
pub struct Started {
    pub port: u16,
    pub task: tokio::task::JoinHandle<()>,
    /// The node's identity toward other nodes' endpoints.
    pub link: Arc<rustls::ClientConfig>,
}

/// Starts the endpoint on `address:port` (0: any free port).
pub async fn start(
    client: &Client,
    node: &str,
    address: &str,
    port: u16,
    index: Arc<LogIndex>,
) -> Result<Started, ServerError> {
    let (cert, key, ca) = certificate(client, node, address).await?;
    let identity = Identity::from_pem(&cert, &key, &ca)?;
    let link = Arc::new(identity.client_config()?);
    let tls_acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(identity.server_config()?));
    let addr: SocketAddr =
        format!("{address}:{port}")
            .parse()
            .map_err(|source| ServerError::Address {
                address: address.to_string(),
                source,
            })?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Listen { addr, source })?;
    let port = listener
        .local_addr()
        .map_err(|source| ServerError::Listen { addr, source })?
        .port();
    let node: Arc<str> = Arc::from(node);
    let acceptor = baton_kube::accept::Acceptor::new(listener);
    let task = tokio::spawn(async move {
        loop {
            let (tcp, _, permit) = acceptor.accept().await;
            // Tunnels and streams carry small writes both ways (a CONNECT's answer, then
            // the first bytes): with Nagle's algorithm, each waits out the peer's delayed
            // ACK, some 40 ms.
            let _ = tcp.set_nodelay(true);
            let (tls_acceptor, index, node) = (tls_acceptor.clone(), index.clone(), node.clone());
            tokio::spawn(async move {
                let _permit = permit;
                // A caller without a client certificate from the cluster CA fails here,
                // and one that never finishes its handshake gives up its place.
                let Ok(Ok(tls)) =
                    tokio::time::timeout(Duration::from_secs(10), tls_acceptor.accept(tcp)).await
                else {
                    return;
                };
                let session = tls.get_ref().1;
                let caller = session
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map_or(Caller::Other, |c| Caller::of(c));
                let h2 = session.alpn_protocol() == Some(b"h2");
                serve_connection(tls, h2, index, node, caller).await;
            });
        }
    });
    Ok(Started { port, task, link })
}

/// The group of node identities.
const NODES_GROUP: &str = "system:nodes";

/// Who called the endpoint, by its verified client certificate. Every client of the API
/// has a certificate from the cluster CA (users through CSRs too), so the CA alone
/// does not say it is the API server.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Caller {
    /// `system:apiserver`: logs, exec, port-forward, metrics.
    ApiServer,
    /// `system:node:NAME` in `system:nodes`: tunnels only.
    Node(String),
    Other,
}

impl Caller {
    fn of(der: &[u8]) -> Self {
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
            return Self::Other;
        };
        let subject = cert.subject();
        let cn = subject
            .iter_common_name()
            .next()
            .and_then(|c| c.as_str().ok())
            .unwrap_or_default()
            .to_string();
        let in_nodes = subject
            .iter_organization()
            .any(|o| o.as_str() == Ok(NODES_GROUP));
        match cn.strip_prefix("system:node:") {
            Some(name) if in_nodes && !name.is_empty() => Self::Node(name.to_string()),
            _ if cn == "system:apiserver" => Self::ApiServer,
            _ => Self::Other,
        }
    }
}

/// Serves the endpoint's requests on one connection: HTTP/2 (`h2`) for other nodes'
/// tunnels, each an extended CONNECT stream; HTTP/1.1 with upgrades otherwise.
async fn serve_connection<S>(io: S, h2: bool, index: Arc<LogIndex>, node: Arc<str>, caller: Caller)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let caller = Arc::new(caller);
    let svc = hyper::service::service_fn(move |req| {
        let (index, node, caller) = (index.clone(), node.clone(), caller.clone());
        async move { Ok::<_, Infallible>(handle(index, &node, &caller, req).await) }
    });
    if h2 {
        let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .enable_connect_protocol()
            .max_concurrent_streams(crate::tunnel::STREAMS_PER_CONNECTION)
            // Sized to the link by hyper's estimate, and bounded by it (16 MiB a
            // connection): what a peer or a pod that stops reading can hold here.
            .adaptive_window(true)
            // A peer that stops answering pings is let go, with its tunnels.
            .keep_alive_interval(Some(crate::tunnel::KEEPALIVE))
            .keep_alive_timeout(crate::tunnel::KEEPALIVE_TIMEOUT)
            .serve_connection(TokioIo::new(io), svc)
            .await;
    } else {
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(io), svc)
            .with_upgrades()
            .await;
    }
}

/// The endpoint for an API server in this process, as a function: no connection and no
/// TLS, since only this process can call it (see [`baton_kube::local_nodes`]).
pub fn local_service(
    index: Arc<LogIndex>,
    node: &str,
) -> impl Fn(http::Request<()>) -> baton_kube::local_nodes::NodeFuture + Send + Sync + 'static {
    let node: Arc<str> = Arc::from(node);
    move |req| {
        let (index, node) = (index.clone(), node.clone());
        Box::pin(async move { handle(index, &node, &Caller::ApiServer, req).await })
    }
}

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn text(status: u16, body: String) -> hyper::Response<Body> {
    let mut r = hyper::Response::new(Full::new(Bytes::from(body)).boxed());
    *r.status_mut() =
        hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    r
}

/// A metric family: name, type, help, and its value for one pod.
type Family = (
    &'static str,
    &'static str,
    &'static str,
    fn(&baton_wasm_shim::PodUsage) -> String,
);

/// A per-container family (cAdvisor's): name, type, help, and its value for one container.
type ContainerFamily = (
    &'static str,
    &'static str,
    &'static str,
    fn(&baton_wasm_shim::ContainerUsage) -> String,
);

/// The node's figures in the Prometheus text format: the kubelet's and cAdvisor's names
/// where Kubernetes has one (running pods and containers, each container's CPU and
/// memory), and the sandbox's own per pod under `baton_`.
fn metrics(index: &LogIndex) -> String {
    let pods = index.sandbox.get().map(|s| s.usage()).unwrap_or_default();
    let runtime = index.sandbox.get().map(|s| s.stats()).unwrap_or_default();
    let running_pods = lock(&index.streams).len();
    let running_containers = lock(&index.live).len();
    let mut text = metrics_text(&pods, running_pods, running_containers);
    text.push_str(&wasm_metrics_text(&pods, &runtime));
    text.push_str(&index.pod_starts.encode());
    text
}

/// Writes one histogram's series (`_bucket`, `_sum`, `_count`) with `labels` on each.
fn histogram(
    out: &mut String,
    name: &str,
    labels: &str,
    latency: &baton_wasm_shim::stats::Latency,
) {
    use std::fmt::Write;
    let sep = if labels.is_empty() { "" } else { "," };
    for (le, n) in latency.cumulative() {
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {n}");
    }
    let braces = if labels.is_empty() {
        String::new()
    } else {
        format!("{{{labels}}}")
    };
    let _ = writeln!(
        out,
        "{name}_sum{braces} {:.9}\n{name}_count{braces} {}",
        latency.sum_nanos as f64 / 1e9,
        latency.count()
    );
}

/// The sandbox's Wasm-specific figures: what each container runs, its HTTP requests and
/// their latency, its guests' abnormal exits; and the node's component loads and
/// instance starts (the cold start every request and process pays).
fn wasm_metrics_text(
    pods: &[baton_wasm_shim::PodUsage],
    runtime: &baton_wasm_shim::stats::RuntimeUsage,
) -> String {
    use baton_wasm_shim::ComponentKind;
    use std::fmt::Write;
    let mut out = String::new();
    let containers: Vec<(String, &baton_wasm_shim::ContainerUsage)> = pods
        .iter()
        .flat_map(|u| {
            let (ns, pod, uid) = crate::stats::pod_key(&u.pod).unwrap_or_default();
            u.containers.iter().map(move |c| {
                (
                    format!(
                        "namespace=\"{ns}\",pod=\"{pod}\",uid=\"{uid}\",container=\"{}\"",
                        c.name
                    ),
                    c,
                )
            })
        })
        .collect();
    let http = |c: &baton_wasm_shim::ContainerUsage| {
        c.component
            .as_ref()
            .is_some_and(|i| i.kind == ComponentKind::Http)
    };
    let _ = writeln!(
        out,
        "# HELP baton_component_info The component a container runs: its kind and exports.\n# TYPE baton_component_info gauge"
    );
    for (labels, c) in &containers {
        if let Some(info) = &c.component {
            let kind = match info.kind {
                ComponentKind::Http => "http",
                ComponentKind::Cli => "cli",
            };
            let _ = writeln!(
                out,
                "baton_component_info{{{labels},kind=\"{kind}\",exports=\"{}\"}} 1",
                info.exports.join(",")
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP baton_http_requests_total HTTP requests a container answered, by status class.\n# TYPE baton_http_requests_total counter"
    );
    for (labels, c) in &containers {
        for (i, n) in c.http.by_class.iter().enumerate() {
            // An HTTP container always has its 2xx series, so a rate starts from zero.
            if *n > 0 || (i == 1 && http(c)) {
                let _ = writeln!(
                    out,
                    "baton_http_requests_total{{{labels},code=\"{}xx\"}} {n}",
                    i + 1
                );
            }
        }
    }
    let _ = writeln!(
        out,
        "# HELP baton_http_request_duration_seconds Time from a request's arrival to its response's head.\n# TYPE baton_http_request_duration_seconds histogram"
    );
    for (labels, c) in &containers {
        if http(c) {
            histogram(
                &mut out,
                "baton_http_request_duration_seconds",
                labels,
                &c.http.latency,
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP baton_guest_exits_total Guests that stopped other than by completing: traps and failing exits (Error), limit kills (OOMKilled, DeadlineExceeded).\n# TYPE baton_guest_exits_total counter"
    );
    for (labels, c) in &containers {
        for (reason, n) in &c.exits {
            let _ = writeln!(
                out,
                "baton_guest_exits_total{{{labels},reason=\"{reason}\"}} {n}"
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP baton_component_loads_total Components loaded, from the compiled cache or compiled.\n# TYPE baton_component_loads_total counter\nbaton_component_loads_total{{source=\"cache\"}} {}\nbaton_component_loads_total{{source=\"compiled\"}} {}",
        runtime.cache_hits, runtime.compiled
    );
    let otel = &runtime.otel;
    let _ = writeln!(
        out,
        "# HELP baton_wasi_otel_spans_total Spans components ended through wasi:otel, forwarded to the node's trace exporter or dropped (no exporter, or not a span).\n# TYPE baton_wasi_otel_spans_total counter\nbaton_wasi_otel_spans_total{{outcome=\"forwarded\"}} {}\nbaton_wasi_otel_spans_total{{outcome=\"dropped\"}} {}",
        otel.forwarded_spans, otel.dropped_spans
    );
    let _ = writeln!(
        out,
        "# HELP baton_wasi_otel_metric_exports_dropped_total Metric exports components made through wasi:otel, dropped: the node exports no metrics.\n# TYPE baton_wasi_otel_metric_exports_dropped_total counter\nbaton_wasi_otel_metric_exports_dropped_total {}",
        otel.dropped_metrics
    );
    let _ = writeln!(
        out,
        "# HELP baton_wasi_otel_log_records_total Log records components emitted through wasi:otel, written to their container logs.\n# TYPE baton_wasi_otel_log_records_total counter\nbaton_wasi_otel_log_records_total {}",
        otel.log_records
    );
    let _ = writeln!(
        out,
        "# HELP baton_cold_start_duration_seconds Time from a request's arrival (or a process's start) to its fresh instance being ready.\n# TYPE baton_cold_start_duration_seconds histogram"
    );
    histogram(
        &mut out,
        "baton_cold_start_duration_seconds",
        "",
        &runtime.cold_starts,
    );
    out
}

fn metrics_text(
    pods: &[baton_wasm_shim::PodUsage],
    running_pods: usize,
    running_containers: usize,
) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP kubelet_running_pods Number of pods that have a running pod sandbox\n# TYPE kubelet_running_pods gauge\nkubelet_running_pods {running_pods}"
    );
    let _ = writeln!(
        out,
        "# HELP kubelet_running_containers Number of containers currently running\n# TYPE kubelet_running_containers gauge\nkubelet_running_containers{{container_state=\"running\"}} {running_containers}"
    );
    // cAdvisor's per-container series: CPU in guest code, memory the instances hold.
    let containers = || {
        pods.iter().flat_map(|u| {
            let (ns, pod, _) = crate::stats::pod_key(&u.pod).unwrap_or_default();
            u.containers.iter().map(move |c| (ns, pod, c))
        })
    };
    let per_container: [ContainerFamily; 2] = [
        (
            "container_cpu_usage_seconds_total",
            "counter",
            "Cumulative cpu time consumed in seconds.",
            |c| format!("{:.6}", c.cpu_nanos as f64 / 1e9),
        ),
        (
            "container_memory_working_set_bytes",
            "gauge",
            "Current working set in bytes.",
            |c| c.memory_bytes.to_string(),
        ),
    ];
    for (name, kind, help, value) in per_container {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (ns, pod, c) in containers() {
            let _ = writeln!(
                out,
                "{name}{{container=\"{}\",namespace=\"{ns}\",pod=\"{pod}\"}} {}",
                c.name,
                value(c)
            );
        }
    }
    let families: [Family; 6] = [
        (
            "baton_sandbox_instances",
            "gauge",
            "Live Wasm instances of the pod.",
            |u| u.instances.to_string(),
        ),
        (
            "baton_sandbox_tasks",
            "gauge",
            "Live guest tasks of the pod.",
            |u| u.tasks.to_string(),
        ),
        (
            "baton_sandbox_sockets",
            "gauge",
            "Open TCP sockets of the pod.",
            |u| u.sockets.to_string(),
        ),
        (
            "baton_pod_cpu_seconds_total",
            "counter",
            "CPU time the pod's guests used.",
            |u| format!("{:.6}", u.cpu_nanos as f64 / 1e9),
        ),
        (
            "baton_pod_cpu_throttled_periods_total",
            "counter",
            "CFS periods in which the pod was throttled.",
            |u| u.throttled_periods.to_string(),
        ),
        (
            "baton_pod_memory_bytes",
            "gauge",
            "Linear memory the pod's live instances hold.",
            |u| u.memory_bytes.to_string(),
        ),
    ];
    for (name, kind, help, value) in families {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for u in pods {
            let (ns, pod, uid) = crate::stats::pod_key(&u.pod).unwrap_or_default();
            let _ = writeln!(
                out,
                "{name}{{namespace=\"{ns}\",pod=\"{pod}\",uid=\"{uid}\"}} {}",
                value(u)
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP baton_sandbox_pods Pods with anything alive in the sandbox.\n# TYPE baton_sandbox_pods gauge\nbaton_sandbox_pods {}",
        pods.len()
    );
    out
}

/// The log files of one container, oldest run first (`0.log`, `1.log`, …).
fn runs(dir: &Path) -> Vec<PathBuf> {
    let mut runs: Vec<(u32, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let p = e.path();
            let n: u32 = p
                .file_name()?
                .to_str()?
                .strip_suffix(".log")?
                .parse()
                .ok()?;
            Some((n, p))
        })
        .collect();
    runs.sort();
    runs.into_iter().map(|(_, p)| p).collect()
}

async fn handle<B>(
    index: Arc<LogIndex>,
    node: &str,
    caller: &Caller,
    req: http::Request<B>,
) -> hyper::Response<Body> {
    let path = req.uri().path().to_string();
    match caller {
        Caller::Node(name) if path == crate::tunnel::PATH => {
            return tunnel_exit(&index, name, req).await
        }
        Caller::ApiServer if path != crate::tunnel::PATH => {}
        _ => {
            tracing::warn!(?caller, %path, "refused a caller of the kubelet endpoint");
            return text(403, format!("forbidden: {caller:?} may not call {path}"));
        }
    }
    if path == "/metrics" {
        return text(200, metrics(&index));
    }
    if path == "/stats/summary" {
        let usage = index.sandbox.get().map(|s| s.usage()).unwrap_or_default();
        let mut r = text(200, index.stats.summary(node, &usage).to_string());
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/json"),
        );
        return r;
    }
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    if let [verb @ ("exec" | "attach"), ns, pod, container] = segs.as_slice() {
        return exec(&index, *verb == "attach", ns, pod, container, req);
    }
    if let ["portForward", ns, pod] = segs.as_slice() {
        return port_forward(&index, ns, pod, req);
    }
    let ["containerLogs", ns, pod, container] = segs.as_slice() else {
        return text(404, format!("no such endpoint: {path}"));
    };
    let q: HashMap<String, String> =
        form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    let flag = |k: &str| matches!(q.get(k).map(String::as_str), Some("true" | "1"));
    let Some(dir) = lock(&index.pods)
        .get(&(ns.to_string(), pod.to_string()))
        .cloned()
    else {
        return text(404, format!("pod {ns}/{pod} is not on this node"));
    };
    let all = runs(&dir.join(container));
    let file = if flag("previous") {
        match all.len() {
            n if n >= 2 => all[n - 2].clone(),
            _ => {
                return text(
                    404,
                    format!(
                        "previous terminated container \"{container}\" in pod \"{pod}\" not found"
                    ),
                )
            }
        }
    } else {
        match all.last() {
            Some(f) => f.clone(),
            None => {
                return text(
                    404,
                    format!("container \"{container}\" in pod \"{pod}\" is waiting to start"),
                )
            }
        }
    };
    let since = q
        .get("sinceSeconds")
        .and_then(|s| s.parse::<u64>().ok())
        .map(|s| SystemTime::now() - Duration::from_secs(s))
        .or_else(|| {
            q.get("sinceTime")
                .and_then(|t| k8s_openapi::chrono::DateTime::parse_from_rfc3339(t).ok())
                .map(|t| SystemTime::UNIX_EPOCH + Duration::from_secs(t.timestamp().max(0) as u64))
        });
    let cfg = LogConfig {
        path: file.clone(),
        max_bytes: u64::MAX,
        max_files: 1,
    };
    let query = LogQuery {
        tail_lines: q.get("tailLines").and_then(|t| t.parse().ok()),
        since,
        timestamps: flag("timestamps"),
        limit_bytes: q.get("limitBytes").and_then(|t| t.parse().ok()),
    };
    let offset = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
    let lines = match read_logs(&cfg, &query) {
        Ok(l) => l,
        Err(e) => return text(500, format!("reading the log: {e}")),
    };
    let mut first = lines.join("\n");
    if !first.is_empty() {
        first.push('\n');
    }
    if !flag("follow") || flag("previous") {
        return text(200, first);
    }
    // Follow: what is there, then new lines as they come, until the container stops.
    let timestamps = query.timestamps;
    let stream = futures::stream::unfold((Some(first), offset), move |(first, mut offset)| {
        let (index, file) = (index.clone(), file.clone());
        async move {
            if let Some(f) = first.filter(|f| !f.is_empty()) {
                return Some((
                    Ok::<_, Infallible>(Frame::data(Bytes::from(f))),
                    (None, offset),
                ));
            }
            let cfg = LogConfig {
                path: file.clone(),
                max_bytes: u64::MAX,
                max_files: 1,
            };
            loop {
                // Read before checking liveness, so lines written just before a stop
                // are sent before the stream ends.
                let running = lock(&index.live).contains(&file);
                match follow_from(&cfg, offset, timestamps) {
                    Ok((lines, next)) if !lines.is_empty() => {
                        let mut chunk = lines.join("\n");
                        chunk.push('\n');
                        return Some((Ok(Frame::data(Bytes::from(chunk))), (None, next)));
                    }
                    Ok((_, next)) => offset = next,
                    Err(_) => return None,
                }
                if !running {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    let mut r = hyper::Response::new(StreamBody::new(stream).boxed());
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain"),
    );
    r
}

/// The answer, given before switching protocols, to what the pod's sandbox would refuse
/// to start: the client reads it as the HTTP error of its upgrade.
fn refusal(
    streams: &dyn PodStreams,
    container: &str,
    opts: &crate::streams::ExecOptions,
) -> Option<hyper::Response<Body>> {
    let command = (!opts.attach).then_some(opts.argv.as_slice());
    let e = streams.check(container, command).err()?;
    let message = baton_kube::error::chain(&e);
    tracing::info!(error = %message, "exec refused");
    Some(text(e.status().0, message))
}

/// `/exec/NS/POD/CONTAINER?command=…`: upgrades to a channel WebSocket and runs the
/// command in the container (see `streams.rs`).
fn exec<B>(
    index: &LogIndex,
    attach: bool,
    ns: &str,
    pod: &str,
    container: &str,
    mut req: http::Request<B>,
) -> hyper::Response<Body> {
    let Some((_, streams)) = index.streams(ns, pod) else {
        return text(404, format!("pod {ns}/{pod} is not running on this node"));
    };
    let header = |h: http::header::HeaderName| {
        req.headers()
            .get(h)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let upgrade = header(http::header::UPGRADE).to_ascii_lowercase();
    if upgrade.contains("spdy/3.1") {
        return exec_spdy(streams, attach, container, req);
    }
    if upgrade != "websocket" {
        return text(
            400,
            "exec needs a connection upgrade: WebSocket with the v5.channel.k8s.io or \
             v4.channel.k8s.io subprotocol, or SPDY/3.1"
                .into(),
        );
    }
    let Some(protocol) = crate::streams::negotiate(&header(http::header::SEC_WEBSOCKET_PROTOCOL))
    else {
        return text(
            400,
            format!(
                "none of the offered WebSocket subprotocols is served; this node speaks {}",
                crate::streams::PROTOCOLS.join(", ")
            ),
        );
    };
    let key = header(http::header::SEC_WEBSOCKET_KEY);
    let mut opts = crate::streams::ExecOptions::from_query(req.uri().query().unwrap_or(""));
    opts.attach = attach;
    if let Some(refused) = refusal(&*streams, container, &opts) {
        return refused;
    }
    let Some(upgrade) = crate::streams::Upgrade::take(&mut req) else {
        return text(500, "the connection cannot be upgraded".into());
    };
    crate::streams::spawn_exec_session(upgrade, protocol, streams, container.to_string(), opts);
    let mut r = hyper::Response::new(Full::new(Bytes::new()).boxed());
    *r.status_mut() = hyper::StatusCode::SWITCHING_PROTOCOLS;
    for (k, v) in crate::streams::accept_headers(key.as_bytes(), protocol) {
        if let Ok(v) = http::HeaderValue::from_str(&v) {
            r.headers_mut().insert(k, v);
        }
    }
    r
}

/// `/portForward/NS/POD`: a port-forward session, in whichever of the three forms the
/// client asks for: SPDY tunnelled through a WebSocket (`SPDY/3.1+portforward.k8s.io`,
/// kubectl 1.31+), SPDY on the upgraded connection (older kubectl), or WebSocket channels
/// (`v4.channel.k8s.io` and its base64 twin: kube-rs, the Python and JavaScript clients).
fn port_forward<B>(
    index: &LogIndex,
    ns: &str,
    pod: &str,
    mut req: http::Request<B>,
) -> hyper::Response<Body> {
    use crate::portforward::{Target, CHANNEL_PROTOCOLS, PROTOCOL, TUNNEL_PROTOCOL};
    use crate::streams::ForwardSession;
    let Some((uid, streams)) = index.streams(ns, pod) else {
        return text(404, format!("pod {ns}/{pod} is not running on this node"));
    };
    let values = |h: &str| -> Vec<String> {
        req.headers()
            .get_all(h)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .collect()
    };
    let upgrade = values("upgrade").join(",").to_ascii_lowercase();
    let mut answer: Vec<(http::HeaderName, String)> = Vec::new();
    let session = if upgrade.contains("websocket") {
        let offered = values("sec-websocket-protocol");
        let key = values("sec-websocket-key").join("");
        let channels = CHANNEL_PROTOCOLS
            .iter()
            .find(|(p, _)| offered.iter().any(|o| o == p));
        if offered.iter().any(|p| p == TUNNEL_PROTOCOL) {
            answer.extend(crate::streams::accept_headers(
                key.as_bytes(),
                TUNNEL_PROTOCOL,
            ));
            ForwardSession::Tunnel
        } else if channels.is_some() || offered.is_empty() {
            let ports = match crate::portforward::query_ports(req.uri().query().unwrap_or("")) {
                Ok(p) => p,
                Err(e) => return text(400, e),
            };
            let (protocol, base64) = channels.copied().unwrap_or(("", false));
            answer.extend(crate::streams::accept_headers(key.as_bytes(), protocol));
            ForwardSession::Channels { ports, base64 }
        } else {
            return text(
                400,
                format!(
                    "port-forward over WebSocket is served with the {TUNNEL_PROTOCOL} subprotocol (kubectl 1.31 or newer) or v4.channel.k8s.io; offered: {}",
                    offered.join(", ")
                ),
            );
        }
    } else if upgrade.contains("spdy/3.1") {
        if !values("x-stream-protocol-version")
            .iter()
            .any(|p| p == PROTOCOL)
        {
            let mut r = text(403, format!("port-forward speaks {PROTOCOL} only"));
            r.headers_mut().insert(
                "x-accepted-stream-protocol-versions",
                http::HeaderValue::from_static(PROTOCOL),
            );
            return r;
        }
        answer.extend([
            (http::header::CONNECTION, "Upgrade".to_string()),
            (http::header::UPGRADE, "SPDY/3.1".to_string()),
            (
                http::HeaderName::from_static("x-stream-protocol-version"),
                PROTOCOL.to_string(),
            ),
        ]);
        ForwardSession::Spdy
    } else {
        return text(
            400,
            "port-forward needs a connection upgrade to WebSocket or SPDY/3.1".into(),
        );
    };
    let Some(on_upgrade) = crate::streams::Upgrade::take(&mut req) else {
        return text(500, "the connection cannot be upgraded".into());
    };
    let target = Target {
        pod: pod.to_string(),
        uid,
    };
    crate::streams::spawn_port_forward(on_upgrade, session, streams, target);
    let mut r = hyper::Response::new(Full::new(Bytes::new()).boxed());
    *r.status_mut() = hyper::StatusCode::SWITCHING_PROTOCOLS;
    for (k, v) in answer {
        if let Ok(v) = http::HeaderValue::from_str(&v) {
            r.headers_mut().insert(k, v);
        }
    }
    r
}

/// A tunnel from another node ([`crate::tunnel`]), `caller`: to a ready endpoint of a
/// Service on this node, and nothing else. Over HTTP/2 it is an extended CONNECT
/// answered 200; over HTTP/1.1, an upgrade answered 101.
async fn tunnel_exit<B>(
    index: &LogIndex,
    caller: &str,
    mut req: http::Request<B>,
) -> hyper::Response<Body> {
    let h2 = req.version() == http::Version::HTTP_2;
    if h2 && req.method() != http::Method::CONNECT {
        return text(405, "a tunnel over HTTP/2 is an extended CONNECT".into());
    }
    let Some((protocol, target)) = crate::tunnel::parse_request(req.uri().query()) else {
        return text(
            400,
            "a tunnel names a protocol (TCP or UDP) and a target IP:PORT".into(),
        );
    };
    let Some(services) = index.exits.get() else {
        return text(503, "the node does not route Services yet".into());
    };
    match services.link().is_member(caller).await {
        Ok(true) => {}
        Ok(false) => {
            tracing::warn!(caller, "refused a tunnel to a node that is not registered");
            return text(
                403,
                format!("forbidden: {caller:?} is not a registered Node"),
            );
        }
        Err(e) => return text(503, format!("cannot look up node {caller:?}: {e}")),
    }
    if !services.exit_allowed(protocol, target) {
        return text(
            403,
            format!(
                "{target}/{} is no ready endpoint of a Service on this node",
                protocol.as_str()
            ),
        );
    }
    let exit = match crate::tunnel::Exit::connect(protocol, target, services.source()).await {
        Ok(e) => e,
        Err(e) => return text(502, format!("cannot reach {target}: {e}")),
    };
    let Some(on_upgrade) = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>() else {
        return text(500, "the connection cannot be upgraded".into());
    };
    tokio::spawn(async move {
        if let Ok(upgraded) = on_upgrade.await {
            exit.run(TokioIo::new(upgraded)).await;
        }
    });
    let mut r = hyper::Response::new(Full::new(Bytes::new()).boxed());
    if h2 {
        return r;
    }
    *r.status_mut() = hyper::StatusCode::SWITCHING_PROTOCOLS;
    r.headers_mut().insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("upgrade"),
    );
    r.headers_mut().insert(
        http::header::UPGRADE,
        http::HeaderValue::from_static(crate::tunnel::UPGRADE),
    );
    r
}

/// An exec on a connection upgraded to SPDY/3.1 (kubectl before 1.30, and the fallback).
fn exec_spdy<B>(
    streams: Arc<dyn PodStreams>,
    attach: bool,
    container: &str,
    mut req: http::Request<B>,
) -> hyper::Response<Body> {
    let offered: Vec<String> = req
        .headers()
        .get_all("x-stream-protocol-version")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|v| v.trim().to_string())
        .collect();
    let Some(protocol) = crate::streams::SPDY_PROTOCOLS
        .iter()
        .find(|p| offered.iter().any(|o| o == *p))
    else {
        let mut r = text(
            403,
            format!(
                "none of the offered stream protocols {offered:?} is served; this node speaks {}",
                crate::streams::SPDY_PROTOCOLS.join(", ")
            ),
        );
        r.headers_mut().insert(
            "x-accepted-stream-protocol-versions",
            http::HeaderValue::from_static("v4.channel.k8s.io, v5.channel.k8s.io"),
        );
        return r;
    };
    let mut opts = crate::streams::ExecOptions::from_query(req.uri().query().unwrap_or(""));
    opts.attach = attach;
    if let Some(refused) = refusal(&*streams, container, &opts) {
        return refused;
    }
    let Some(upgrade) = crate::streams::Upgrade::take(&mut req) else {
        return text(500, "the connection cannot be upgraded".into());
    };
    crate::streams::spawn_exec_spdy_session(upgrade, streams, container.to_string(), opts);
    let mut r = hyper::Response::new(Full::new(Bytes::new()).boxed());
    *r.status_mut() = hyper::StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("Upgrade"),
    );
    h.insert(
        http::header::UPGRADE,
        http::HeaderValue::from_static("SPDY/3.1"),
    );
    h.insert(
        "x-stream-protocol-version",
        http::HeaderValue::from_static(protocol),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn certificate(cn: &str, org: Option<&str>) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        if let Some(o) = org {
            params
                .distinguished_name
                .push(rcgen::DnType::OrganizationName, o);
        }
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn callers_are_the_api_server_nodes_or_no_one() {
        assert_eq!(
            Caller::of(&certificate("system:apiserver", None)),
            Caller::ApiServer
        );
        assert_eq!(
            Caller::of(&certificate("system:node:n1", Some("system:nodes"))),
            Caller::Node("n1".into())
        );
        // A node's name outside the nodes' group, an administrator, and garbage.
        assert_eq!(
            Caller::of(&certificate("system:node:n1", Some("system:masters"))),
            Caller::Other
        );
        assert_eq!(
            Caller::of(&certificate("system:node:", Some("system:nodes"))),
            Caller::Other
        );
        assert_eq!(
            Caller::of(&certificate("alice", Some("system:masters"))),
            Caller::Other
        );
        assert_eq!(Caller::of(b"not a certificate"), Caller::Other);
    }

    #[tokio::test]
    async fn only_nodes_get_tunnels_and_only_the_api_server_the_rest() {
        let index = Arc::new(LogIndex::default());
        let get = |path: &str| http::Request::get(path).body(()).unwrap();
        let node = Caller::Node("n2".into());
        // The node's Services are not routed yet: no tunnel, but not forbidden.
        let r = handle(
            index.clone(),
            "n1",
            &node,
            get("/tunnel?protocol=TCP&target=127.128.0.2:80"),
        )
        .await;
        assert_eq!(r.status(), 503);
        let r = handle(index.clone(), "n1", &node, get("/tunnel?protocol=TCP")).await;
        assert_eq!(r.status(), 400);
        for path in ["/metrics", "/containerLogs/ns/p/c", "/exec/ns/p/c"] {
            let r = handle(index.clone(), "n1", &node, get(path)).await;
            assert_eq!(r.status(), 403, "{path}");
            let r = handle(index.clone(), "n1", &Caller::Other, get(path)).await;
            assert_eq!(r.status(), 403, "{path}");
        }
        let r = handle(
            index.clone(),
            "n1",
            &Caller::ApiServer,
            get("/tunnel?protocol=TCP&target=127.128.0.2:80"),
        )
        .await;
        assert_eq!(r.status(), 403);
        let r = handle(index.clone(), "n1", &Caller::ApiServer, get("/metrics")).await;
        assert_eq!(r.status(), 200);
    }

    #[tokio::test]
    async fn a_refused_exec_is_answered_before_switching_protocols() {
        let index = Arc::new(LogIndex::default());
        let fake = crate::fake::FakeSandboxes::default();
        index.add_streams("ns", "p", "u1", fake.any_streams());
        let ask = |query: &str, spdy: bool| {
            let r = http::Request::get(format!("/exec/ns/p/c?{query}"))
                .header(http::header::CONNECTION, "Upgrade");
            let r = match spdy {
                true => r
                    .header(http::header::UPGRADE, "SPDY/3.1")
                    .header("x-stream-protocol-version", "v4.channel.k8s.io"),
                false => r
                    .header(http::header::UPGRADE, "websocket")
                    .header(http::header::SEC_WEBSOCKET_KEY, "dGhlIHNhbXBsZSBub25jZQ==")
                    .header(http::header::SEC_WEBSOCKET_PROTOCOL, "v5.channel.k8s.io"),
            };
            r.body(()).unwrap()
        };
        let answer = |query: &str, spdy: bool| {
            let (index, req) = (index.clone(), ask(query, spdy));
            async move {
                let r = handle(index, "n1", &Caller::ApiServer, req).await;
                let status = r.status();
                let body = r.into_body().collect().await.unwrap().to_bytes();
                (status, String::from_utf8_lossy(&body).into_owned())
            }
        };
        for spdy in [false, true] {
            // No command: refused with the reason, and nothing started.
            let (status, body) = answer("stdout=true", spdy).await;
            assert_eq!(status, 400, "spdy {spdy}");
            assert!(body.contains("no command given"), "{body}");
            assert_eq!(fake.execs(), 0);
            // A command the sandbox takes goes on to the upgrade, which a request made
            // here, outside hyper's connection, cannot have.
            let (_, body) = answer("command=echo&stdout=true", spdy).await;
            assert!(body.contains("cannot be upgraded"), "{body}");
        }
    }

    use baton_wasm_shim::{ContainerUsage, PodUsage};

    #[test]
    fn wasm_metrics_name_the_component_its_requests_and_its_exits() {
        use baton_wasm_shim::stats::{HttpUsage, Latency, RuntimeUsage};
        let mut latency = Latency {
            counts: vec![0; 15],
            sum_nanos: 900_000,
        };
        latency.counts[2] = 3;
        let pods = [PodUsage {
            pod: "shop/web-1/u1".into(),
            containers: vec![
                ContainerUsage {
                    name: "app".into(),
                    component: Some(baton_wasm_shim::ComponentInfo {
                        kind: baton_wasm_shim::ComponentKind::Http,
                        exports: vec!["wasi:http/incoming-handler@0.2.6".to_string()].into(),
                    }),
                    http: HttpUsage {
                        by_class: [0, 2, 0, 0, 1],
                        latency: latency.clone(),
                        in_flight: 0,
                    },
                    exits: vec![("OOMKilled", 1)],
                    ..Default::default()
                },
                ContainerUsage {
                    name: "job".into(),
                    component: Some(baton_wasm_shim::ComponentInfo {
                        kind: baton_wasm_shim::ComponentKind::Cli,
                        exports: vec!["wasi:cli/run@0.2.6".to_string()].into(),
                    }),
                    ..Default::default()
                },
            ],
            ..Default::default()
        }];
        let runtime = RuntimeUsage {
            cache_hits: 4,
            compiled: 1,
            cold_starts: latency,
            otel: baton_wasm_shim::platform::otel::OtelUsage {
                dropped_spans: 2,
                ..Default::default()
            },
        };
        let text = wasm_metrics_text(&pods, &runtime);
        let app = r#"namespace="shop",pod="web-1",uid="u1",container="app""#;
        for line in [
            format!(r#"baton_component_info{{{app},kind="http",exports="wasi:http/incoming-handler@0.2.6"}} 1"#),
            r#"baton_component_info{namespace="shop",pod="web-1",uid="u1",container="job",kind="cli",exports="wasi:cli/run@0.2.6"} 1"#.to_string(),
            format!(r#"baton_http_requests_total{{{app},code="2xx"}} 2"#),
            format!(r#"baton_http_requests_total{{{app},code="5xx"}} 1"#),
            format!(r#"baton_http_request_duration_seconds_bucket{{{app},le="0.0005"}} 3"#),
            format!(r#"baton_http_request_duration_seconds_bucket{{{app},le="+Inf"}} 3"#),
            format!(r#"baton_http_request_duration_seconds_count{{{app}}} 3"#),
            format!(r#"baton_guest_exits_total{{{app},reason="OOMKilled"}} 1"#),
            r#"baton_component_loads_total{source="cache"} 4"#.to_string(),
            r#"baton_wasi_otel_spans_total{outcome="dropped"} 2"#.to_string(),
            r#"baton_cold_start_duration_seconds_bucket{le="0.00025"} 0"#.to_string(),
            "baton_cold_start_duration_seconds_count 3".to_string(),
            "baton_cold_start_duration_seconds_sum 0.000900000".to_string(),
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in:\n{text}");
        }
        // A CLI container has no request series.
        assert!(!text.contains(r#"container="job",code"#), "{text}");
        let types = text.lines().filter(|l| l.starts_with("# TYPE ")).count();
        assert_eq!(types, 9);
    }

    #[test]
    fn metrics_carry_the_kubelets_and_cadvisors_names() {
        let pods = [PodUsage {
            pod: "shop/web-1/u1".into(),
            instances: 2,
            cpu_nanos: 1_500_000_000,
            memory_bytes: 3 << 20,
            containers: vec![ContainerUsage {
                name: "app".into(),
                cpu_nanos: 1_500_000_000,
                memory_bytes: 3 << 20,
                ..Default::default()
            }],
            ..Default::default()
        }];
        let text = metrics_text(&pods, 1, 2);
        for line in [
            "kubelet_running_pods 1",
            r#"kubelet_running_containers{container_state="running"} 2"#,
            r#"container_cpu_usage_seconds_total{container="app",namespace="shop",pod="web-1"} 1.500000"#,
            r#"container_memory_working_set_bytes{container="app",namespace="shop",pod="web-1"} 3145728"#,
            r#"baton_sandbox_instances{namespace="shop",pod="web-1",uid="u1"} 2"#,
            "baton_sandbox_pods 1",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in:\n{text}");
        }
        let starts = PodStarts::default();
        starts.observe(std::time::Duration::from_millis(7));
        let text2 = starts.encode();
        for line in [
            r#"kubelet_pod_start_duration_seconds_bucket{le="0.005"} 0"#,
            r#"kubelet_pod_start_duration_seconds_bucket{le="0.01"} 1"#,
            "kubelet_pod_start_duration_seconds_count 1",
        ] {
            assert!(text2.lines().any(|l| l == line), "no {line:?} in:\n{text2}");
        }
        // Each family is declared once, before its samples.
        let types = text.lines().filter(|l| l.starts_with("# TYPE ")).count();
        let helps = text.lines().filter(|l| l.starts_with("# HELP ")).count();
        assert_eq!(types, helps);
    }
}
