//! The node's Ingress controller: every node serves the Ingresses of IngressClass
//! `baton` (the cluster's default class) on its HTTP and HTTPS ports, as k3s's Traefik
//! does, and proxies each request to a ready endpoint of the backend Service.
//!
//! - **Routing** is [`routes`]: hosts exact, wildcard or any; paths Exact, Prefix and
//!   ImplementationSpecific; the default backend; 404 when nothing matches.
//! - **Backends** are Services, looked up in the node's Service table
//!   ([`crate::proxy::Services::endpoints`]): their ready endpoints on any node, pods
//!   shutting down skipped, round-robin. No ready endpoint: 503 with `Retry-After`,
//!   unless the backend's workload is scaled to zero by its autoscaler: then the request
//!   is held while the node wakes it ([`crate::activator`]), and 503 if it does not come
//!   up in time. An
//!   endpoint that is a wasi:http component of this node is called in process
//!   ([`baton_wasm_shim::Runtime::local_http`]), skipping a socket and an HTTP encoding
//!   each way; the others get HTTP/1.1.
//! - **TLS** is [`tls`]: the certificates of the Secrets `spec.tls` names, chosen by SNI
//!   and reread every few seconds, so a renewed Secret is served without a restart.
//! - **As a reverse proxy must:** hop-by-hop headers (RFC 9110 §7.6.1, and any the
//!   `Connection` header names) are dropped both ways; `X-Forwarded-For` (the client's
//!   address only: the Ingress is the edge), `-Proto` and `-Host` are set; the host the
//!   request was routed by goes to the backend as `Host`; HTTP/2's split cookies are
//!   joined. An HTTP/1.1 `Upgrade` (WebSocket) is the exception: `Upgrade` and
//!   `Connection: upgrade` are passed on, and once the backend switches protocols the
//!   two connections are joined byte for byte, closed after [`TUNNEL_IDLE`] without a
//!   byte either way (at most [`MAX_TUNNELS`] at once; a component called in process
//!   cannot switch, so such a request goes to its socket). Clients get HTTP/1.1 with
//!   keep-alive or HTTP/2 (ALPN over TLS, prior knowledge in clear); backends get
//!   HTTP/1.1 over a pool of kept-alive connections, bounded per endpoint.
//! - **Bounds:** a connection cap per listener, a deadline on a client's first bytes and
//!   on request headers, on the TLS handshake, on connecting to a backend and on its
//!   response head; HTTP/2 pings for dead peers; [`CONNECTION_IDLE`] for a connection
//!   that carries nothing and has no request under way (an idle keep-alive, an HTTP/2
//!   peer that only answers pings, a TLS client silent after its handshake); bodies
//!   stream through and are never held whole.

mod routes;
mod tls;

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
use kube::runtime::{reflector, watcher, WatchStreamExt};
use kube::{Api, Client};
use tokio::task::JoinHandle;

pub use routes::{Backend, ServicePort};

use crate::proxy::Services;

/// How long a client has to send a request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a client connection may stay without a byte either way and without a
/// request under way (an idle keep-alive, an HTTP/2 peer that only answers pings, a TLS
/// client that sends nothing after its handshake) before it is closed.
pub const CONNECTION_IDLE: Duration = Duration::from_secs(120);
/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long connecting to a backend may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a backend has to answer with its response head.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);
/// Connections one listener serves at once; more wait in the accept queue.
const MAX_CONNECTIONS: usize = 10_000;
/// Idle kept-alive connections per backend endpoint.
const POOL_IDLE_PER_ENDPOINT: usize = 64;
/// What a client is told to wait before retrying a backend without ready endpoints.
const RETRY_AFTER_SECS: &str = "1";
/// How long an upgraded connection (a WebSocket) may carry nothing either way.
pub const TUNNEL_IDLE: Duration = Duration::from_secs(600);
/// Upgraded connections open at once on a node.
pub const MAX_TUNNELS: usize = 10_000;

/// Why the Ingress controller could not start.
#[derive(Debug, thiserror::Error)]
pub enum IngressError {
    #[error("cannot listen for Ingress {scheme} on {addr}")]
    Listen {
        scheme: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = UnsyncBoxBody<Bytes, BoxError>;

/// The running Ingress controller: where it listens. Its tasks stop when it is dropped.
#[derive(Debug)]
pub struct IngressServer {
    pub http: Option<SocketAddr>,
    pub https: Option<SocketAddr>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for IngressServer {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Connects the proxy to a backend endpoint, on this node or through its own
/// ([`Services::connect`]): an endpoint's address is a loopback address of its node.
#[derive(Clone)]
struct Connector {
    services: Services,
}

impl tower_service::Service<http::Uri> for Connector {
    type Response = Upstream;
    type Error = std::io::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = std::io::Result<Upstream>> + Send + 'static>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let services = self.services.clone();
        Box::pin(async move {
            let target: SocketAddr = uri
                .authority()
                .and_then(|a| a.as_str().parse().ok())
                .ok_or_else(|| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        format!("not an endpoint: {uri}"),
                    )
                })?;
            let io = tokio::time::timeout(CONNECT_TIMEOUT, services.connect(target))
                .await
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
            Ok(Upstream(TokioIo::new(io)))
        })
    }
}

/// A connection to a backend endpoint, as the proxy's HTTP client takes it.
struct Upstream(TokioIo<Box<dyn crate::tunnel::Io>>);

impl hyper_util::client::legacy::connect::Connection for Upstream {
    fn connected(&self) -> hyper_util::client::legacy::connect::Connected {
        hyper_util::client::legacy::connect::Connected::new()
    }
}

impl hyper::rt::Read for Upstream {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Upstream {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

struct Shared {
    routes: RwLock<Arc<routes::Routes>>,
    certs: tls::Certs,
    services: Services,
    upstream: hyper_util::client::legacy::Client<Connector, Incoming>,
    /// The node's Wasm runtime: a backend it serves is called in process.
    local: Option<baton_wasm_shim::Runtime>,
    next: AtomicUsize,
    /// Permits for upgraded connections ([`MAX_TUNNELS`]).
    tunnels: Arc<tokio::sync::Semaphore>,
}

fn listen(scheme: &'static str, addr: SocketAddr) -> Result<tokio::net::TcpListener, IngressError> {
    crate::proxy::listen(addr).map_err(|source| IngressError::Listen {
        scheme,
        addr,
        source,
    })
}

/// Binds an Ingress listener, or says why not: a port taken by another server leaves
/// the node without that listener, not without its pods.
fn bind(scheme: &'static str, addr: Option<SocketAddr>) -> Option<tokio::net::TcpListener> {
    match listen(scheme, addr?) {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::warn!(error = %baton_kube::error::chain(&e), "Ingresses are not served there");
            None
        }
    }
}

/// Starts serving Ingresses on `http` and `https` (either may be absent).
pub fn start(
    client: Client,
    services: Services,
    local: Option<baton_wasm_shim::Runtime>,
    http: Option<SocketAddr>,
    https: Option<SocketAddr>,
) -> IngressServer {
    let http_listener = bind("HTTP", http);
    let https_listener = bind("HTTPS", https);
    let upstream = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(POOL_IDLE_PER_ENDPOINT)
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_timer(TokioTimer::new())
        .build(Connector {
            services: services.clone(),
        });
    let shared = Arc::new(Shared {
        routes: RwLock::default(),
        certs: tls::Certs::default(),
        services,
        upstream,
        local,
        next: AtomicUsize::new(0),
        tunnels: Arc::new(tokio::sync::Semaphore::new(MAX_TUNNELS)),
    });
    let mut server = IngressServer {
        http: None,
        https: None,
        tasks: vec![tokio::spawn(watch(client.clone(), shared.clone()))],
    };
    server
        .tasks
        .push(tokio::spawn(tls::refresh(client, shared.clone())));
    // Client connections are served where the node's components answer requests in
    // process, so that a request and its instance share a thread (measured: a quarter of
    // the Ingress's time went to switching threads when they did not).
    let plane = shared.local.as_ref().and_then(|rt| rt.data_plane());
    if let Some(l) = http_listener {
        server.http = l.local_addr().ok();
        server
            .tasks
            .extend(spawn_serve(plane.as_ref(), l, shared.clone(), None));
    }
    if let Some(l) = https_listener {
        server.https = l.local_addr().ok();
        let acceptor = tls::acceptor(shared.clone());
        server.tasks.extend(spawn_serve(
            plane.as_ref(),
            l,
            shared.clone(),
            Some(acceptor),
        ));
    }
    server
}

/// Starts [`serve`] on `plane` (the listener moved to its reactor), else on the caller's
/// runtime.
fn spawn_serve(
    plane: Option<&tokio::runtime::Handle>,
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> Option<JoinHandle<()>> {
    let Some(plane) = plane else {
        return Some(tokio::spawn(serve(listener, shared, tls)));
    };
    let moved = {
        let _on = plane.enter();
        listener
            .into_std()
            .and_then(tokio::net::TcpListener::from_std)
    };
    match moved {
        Ok(listener) => Some(plane.spawn(serve(listener, shared, tls))),
        Err(e) => {
            tracing::warn!(error = %e, "the Ingress listener could not move to the guest threads");
            None
        }
    }
}

/// Keeps the routing table in step with the Ingresses and IngressClasses.
async fn watch(client: Client, shared: Arc<Shared>) {
    let (ingresses, ing_writer) = reflector::store::<Ingress>();
    let (classes, class_writer) = reflector::store::<IngressClass>();
    let ing_events = reflector::reflector(
        ing_writer,
        watcher(
            Api::<Ingress>::all(client.clone()),
            watcher::Config::default(),
        ),
    )
    .default_backoff()
    .map(|_| ());
    let class_events = reflector::reflector(
        class_writer,
        watcher(Api::<IngressClass>::all(client), watcher::Config::default()),
    )
    .default_backoff()
    .map(|_| ());
    let mut events = std::pin::pin!(futures::stream::select(ing_events, class_events));
    while events.next().await.is_some() {
        let classes: Vec<IngressClass> = classes.state().iter().map(|c| (**c).clone()).collect();
        let all = ingresses.state();
        let ours: Vec<&Ingress> = all
            .iter()
            .map(AsRef::as_ref)
            .filter(|i| baton_kube::ingress::is_ours(i, &classes))
            .collect();
        let table = Arc::new(routes::Routes::build(&ours));
        let tls_changed = shared.routes().tls != table.tls;
        *shared.routes.write().unwrap_or_else(|e| e.into_inner()) = table;
        if tls_changed {
            shared.certs.wake();
        }
    }
}

impl Shared {
    fn routes(&self) -> Arc<routes::Routes> {
        self.routes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Accepts connections and serves each (over TLS when there is an acceptor).
async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    let acceptor = baton_kube::accept::Acceptor::with_limit(listener, MAX_CONNECTIONS);
    loop {
        let (stream, peer, permit) = acceptor.accept().await;
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match tls {
                Some(acceptor) => {
                    let Ok(Ok(stream)) =
                        tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await
                    else {
                        return;
                    };
                    connection(TokioIo::new(stream), shared, peer, true).await;
                }
                None => {
                    // Nothing is read before the protocol is known: a client that sends
                    // nothing is let go after the header deadline.
                    if !matches!(
                        tokio::time::timeout(HEADER_TIMEOUT, stream.readable()).await,
                        Ok(Ok(()))
                    ) {
                        return;
                    }
                    connection(TokioIo::new(stream), shared, peer, false).await
                }
            }
        });
    }
}

/// Serves one client connection, HTTP/1.1 or HTTP/2.
async fn connection<I>(io: I, shared: Arc<Shared>, peer: SocketAddr, https: bool)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let activity = Activity::new();
    let service = {
        let activity = activity.clone();
        hyper::service::service_fn(move |req| {
            let shared = shared.clone();
            let busy = activity.busy();
            async move {
                let resp = handle(&shared, req, peer.ip(), https).await;
                drop(busy);
                Ok::<_, Infallible>(resp)
            }
        })
    };
    let io = Watched {
        inner: io,
        activity: activity.clone(),
    };
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .keep_alive(true);
    // Dead HTTP/2 peers are found by pings and let go.
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(10));
    // Boxed as a plain future: hyper's connection type trips the compiler's
    // higher-ranked inference when passed on generically.
    let conn: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> =
        Box::pin(async move {
            let _ = builder.serve_connection_with_upgrades(io, service).await;
        });
    until_idle(conn, &activity, CONNECTION_IDLE).await;
}

/// What a client connection is doing: when it last carried a byte, and how many of its
/// requests are under way.
#[derive(Clone)]
struct Activity(Arc<ActivityInner>);

struct ActivityInner {
    start: tokio::time::Instant,
    /// Milliseconds from `start` to the last byte either way.
    last: AtomicU64,
    busy: AtomicUsize,
}

/// A request under way on a connection.
struct Busy(Activity);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0 .0.busy.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

impl Activity {
    fn new() -> Self {
        Activity(Arc::new(ActivityInner {
            start: tokio::time::Instant::now(),
            last: AtomicU64::new(0),
            busy: AtomicUsize::new(0),
        }))
    }

    fn touch(&self) {
        let now = self.0.start.elapsed().as_millis() as u64;
        self.0.last.fetch_max(now, Ordering::Relaxed);
    }

    fn busy(&self) -> Busy {
        self.0.busy.fetch_add(1, Ordering::Relaxed);
        Busy(self.clone())
    }

    /// How long it has been idle: carrying nothing with nothing under way.
    fn idle_for(&self) -> Duration {
        if self.0.busy.load(Ordering::Relaxed) > 0 {
            return Duration::ZERO;
        }
        let now = self.0.start.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.0.last.load(Ordering::Relaxed)))
    }
}

/// Runs a connection until it ends, or until it has been idle for `limit`; then drops
/// it, which closes it.
async fn until_idle<F: std::future::Future>(conn: F, activity: &Activity, limit: Duration) {
    tokio::pin!(conn);
    loop {
        tokio::select! {
            _ = &mut conn => return,
            _ = tokio::time::sleep(limit / 4) => {
                if activity.idle_for() >= limit {
                    return;
                }
            }
        }
    }
}

/// A client connection's I/O, noting each byte read or written in its [`Activity`].
struct Watched<I> {
    inner: I,
    activity: Activity,
}

impl<I: hyper::rt::Read + Unpin> hyper::rt::Read for Watched<I> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let out = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if let std::task::Poll::Ready(Ok(())) = out {
            self.activity.touch();
        }
        out
    }
}

impl<I: hyper::rt::Write + Unpin> hyper::rt::Write for Watched<I> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let out = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = out {
            if n > 0 {
                self.activity.touch();
            }
        }
        out
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let out = std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let std::task::Poll::Ready(Ok(n)) = out {
            if n > 0 {
                self.activity.touch();
            }
        }
        out
    }
}

/// The protocol an HTTP/1.1 request asks to switch to (`Upgrade`, named by
/// `Connection`), if any.
fn upgrade_of<B>(req: &Request<B>) -> Option<HeaderValue> {
    if req.version() != http::Version::HTTP_11 {
        return None;
    }
    let asked = req
        .headers()
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    asked
        .then(|| req.headers().get(http::header::UPGRADE).cloned())
        .flatten()
}

/// Copies one way until the reader ends or fails, noting when bytes last went through.
async fn pump<R, W>(r: &mut R, w: &mut W, last: &AtomicU64, start: tokio::time::Instant)
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 << 10];
    while let Ok(n) = r.read(&mut buf).await {
        if n == 0 || w.write_all(&buf[..n]).await.is_err() {
            break;
        }
        last.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    let _ = w.shutdown().await;
}

/// Joins a client's upgraded connection to its backend's, byte for byte, until either
/// side ends or neither sends a byte for `idle`.
async fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    backend: hyper::upgrade::OnUpgrade,
    idle: Duration,
    _permit: tokio::sync::OwnedSemaphorePermit,
) {
    let (Ok(client), Ok(backend)) = tokio::join!(client, backend) else {
        return;
    };
    let start = tokio::time::Instant::now();
    let last = AtomicU64::new(0);
    let (mut cr, mut cw) = tokio::io::split(TokioIo::new(client));
    let (mut br, mut bw) = tokio::io::split(TokioIo::new(backend));
    let both = async {
        tokio::join!(
            pump(&mut cr, &mut bw, &last, start),
            pump(&mut br, &mut cw, &last, start)
        )
    };
    let watchdog = async {
        loop {
            tokio::time::sleep(idle / 4).await;
            let quiet =
                (start.elapsed().as_millis() as u64).saturating_sub(last.load(Ordering::Relaxed));
            if quiet >= idle.as_millis() as u64 {
                return;
            }
        }
    };
    tokio::select! {
        _ = both => {}
        _ = watchdog => {}
    }
}

fn text(code: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from_static(body.as_bytes()))
            .map_err(|never: Infallible| -> BoxError { match never {} })
            .boxed_unsync(),
    );
    *r.status_mut() = code;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// The host a request is for, without its port: HTTP/2's authority, or `Host`.
fn host_of(req: &Request<Incoming>) -> String {
    let raw = req
        .uri()
        .authority()
        .map(|a| a.host().to_string())
        .or_else(|| {
            req.headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(|h| match h.rsplit_once(':') {
                    // Not the colons of an IPv6 literal.
                    Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => {
                        host.to_string()
                    }
                    _ => h.to_string(),
                })
        })
        .unwrap_or_default();
    raw.trim_start_matches('[')
        .trim_end_matches(']')
        .to_string()
}

/// Removes the hop-by-hop headers: the fixed ones and any `Connection` names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for n in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ] {
        headers.remove(n);
    }
}

/// Joins the `cookie` fields an HTTP/2 client may split into one, as an HTTP/1.1 backend
/// expects (RFC 9113 §8.2.3).
fn join_cookies(headers: &mut HeaderMap) {
    let parts: Vec<String> = headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok().map(str::to_string))
        .collect();
    if parts.len() > 1 {
        if let Ok(v) = HeaderValue::from_str(&parts.join("; ")) {
            headers.insert(http::header::COOKIE, v);
        }
    }
}

/// Sets the `X-Forwarded-*` headers for the backend. What a client says it forwarded is
/// not believed (the Ingress is the edge): its own claims are replaced, and the other
/// forwarding headers dropped.
fn forwarded(headers: &mut HeaderMap, client: IpAddr, host: &str, https: bool) {
    for n in ["forwarded", "x-real-ip", "x-forwarded-port"] {
        headers.remove(n);
    }
    if let Ok(v) = HeaderValue::from_str(&client.to_string()) {
        headers.insert(HeaderName::from_static("x-forwarded-for"), v);
    }
    headers.insert(
        HeaderName::from_static("x-forwarded-proto"),
        HeaderValue::from_static(if https { "https" } else { "http" }),
    );
    if let Ok(v) = HeaderValue::from_str(host) {
        headers.insert(HeaderName::from_static("x-forwarded-host"), v);
    }
}

/// Routes and proxies one request.
async fn handle(
    shared: &Shared,
    mut req: Request<Incoming>,
    client: IpAddr,
    https: bool,
) -> Response<Body> {
    let host = host_of(&req);
    let upgrade = upgrade_of(&req);
    let routes = shared.routes();
    let Ok(backend) = routes.route(&host, req.uri().path()) else {
        return text(StatusCode::NOT_FOUND, "404 page not found\n");
    };
    // A backend scaled to zero is woken, and the request held until it is up.
    let endpoints = shared
        .services
        .endpoints_or_hold(&backend.namespace, &backend.service, &backend.port)
        .await;
    let Some(&target) = endpoints
        .as_deref()
        .and_then(|e| e.get(shared.next.fetch_add(1, Ordering::Relaxed) % e.len().max(1)))
    else {
        let mut r = text(
            StatusCode::SERVICE_UNAVAILABLE,
            "503 service unavailable: no ready endpoint\n",
        );
        r.headers_mut().insert(
            http::header::RETRY_AFTER,
            HeaderValue::from_static(RETRY_AFTER_SECS),
        );
        return r;
    };
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    // A component this node serves is called in process: the request as its server
    // would have read it, origin form and `Host`.
    let local = shared
        .local
        .as_ref()
        .filter(|_| upgrade.is_none())
        .and_then(|rt| rt.local_http(target));
    let uri = if local.is_some() {
        path.parse::<http::Uri>()
    } else {
        format!("http://{target}{path}").parse::<http::Uri>()
    };
    let Ok(uri) = uri else {
        return text(StatusCode::BAD_REQUEST, "400 bad request\n");
    };
    // The backend's Host is what the request was routed by: the request target's
    // authority (HTTP/2's, or an absolute-form target's), else the Host header.
    let host_header = req
        .uri()
        .authority()
        .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        .or_else(|| req.headers().get(http::header::HOST).cloned());
    *req.uri_mut() = uri;
    *req.version_mut() = http::Version::HTTP_11;
    let headers = req.headers_mut();
    strip_hop_by_hop(headers);
    if let Some(h) = host_header {
        headers.insert(http::header::HOST, h);
    }
    join_cookies(headers);
    forwarded(headers, client, &host, https);
    let upgrading = match &upgrade {
        Some(protocol) => {
            let Ok(permit) = shared.tunnels.clone().try_acquire_owned() else {
                return text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "503 service unavailable: too many upgraded connections\n",
                );
            };
            headers.insert(http::header::UPGRADE, protocol.clone());
            headers.insert(
                http::header::CONNECTION,
                HeaderValue::from_static("upgrade"),
            );
            Some((hyper::upgrade::on(&mut req), permit))
        }
        None => None,
    };
    if let Some(local) = local {
        return match tokio::time::timeout(RESPONSE_TIMEOUT, local.call(req)).await {
            Ok(resp) => {
                let (mut parts, body) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                Response::from_parts(
                    parts,
                    body.map_err(|e| -> BoxError { Box::new(e) }).boxed_unsync(),
                )
            }
            Err(_) => text(StatusCode::GATEWAY_TIMEOUT, "504 gateway timeout\n"),
        };
    }
    match tokio::time::timeout(RESPONSE_TIMEOUT, shared.upstream.request(req)).await {
        Ok(Ok(mut resp)) => {
            let switched = match upgrading {
                Some((client, permit)) if resp.status() == StatusCode::SWITCHING_PROTOCOLS => {
                    let backend = hyper::upgrade::on(&mut resp);
                    tokio::spawn(tunnel(client, backend, TUNNEL_IDLE, permit));
                    resp.headers().get(http::header::UPGRADE).cloned()
                }
                _ => None,
            };
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            if let Some(protocol) = switched {
                parts.headers.insert(http::header::UPGRADE, protocol);
                parts.headers.insert(
                    http::header::CONNECTION,
                    HeaderValue::from_static("upgrade"),
                );
            }
            Response::from_parts(
                parts,
                body.map_err(|e| -> BoxError { Box::new(e) }).boxed_unsync(),
            )
        }
        Ok(Err(e)) => {
            tracing::debug!(%target, error = %baton_kube::error::chain(&e), "ingress backend failed");
            text(StatusCode::BAD_GATEWAY, "502 bad gateway\n")
        }
        Err(_) => text(StatusCode::GATEWAY_TIMEOUT, "504 gateway timeout\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_connection_is_let_go_once_idle_but_never_with_a_request_under_way() {
        let limit = Duration::from_secs(120);
        // Nothing under way and nothing carried: closed after the limit.
        let activity = Activity::new();
        let t0 = tokio::time::Instant::now();
        until_idle(std::future::pending::<()>(), &activity, limit).await;
        assert!(t0.elapsed() >= limit && t0.elapsed() < limit + limit / 2);
        // Bytes keep it open: touched every minute, it outlives the limit.
        let activity = Activity::new();
        let toucher = {
            let a = activity.clone();
            tokio::spawn(async move {
                for _ in 0..5 {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    a.touch();
                }
            })
        };
        let t0 = tokio::time::Instant::now();
        until_idle(std::future::pending::<()>(), &activity, limit).await;
        assert!(
            t0.elapsed() >= Duration::from_secs(300) + limit,
            "{:?}",
            t0.elapsed()
        );
        toucher.await.unwrap();
        // A request under way (a long poll, a slow backend) keeps it open however quiet.
        let activity = Activity::new();
        let busy = activity.busy();
        let long = tokio::time::timeout(
            limit * 10,
            until_idle(std::future::pending::<()>(), &activity, limit),
        )
        .await;
        assert!(long.is_err(), "closed under a request");
        drop(busy);
        let t0 = tokio::time::Instant::now();
        until_idle(std::future::pending::<()>(), &activity, limit).await;
        assert!(t0.elapsed() >= limit, "idle counted from the request's end");
        // A connection that ends by itself ends at once.
        until_idle(async {}, &Activity::new(), limit).await;
    }

    #[test]
    fn hop_by_hop_headers_go_and_the_ones_connection_names_too() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("upgrade", HeaderValue::from_static("h2c"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-kept"]);
    }

    #[test]
    fn forwarded_headers_are_the_ingress_own_and_cookies_are_joined() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        h.insert("forwarded", HeaderValue::from_static("for=10.0.0.1"));
        forwarded(&mut h, "127.0.0.9".parse().unwrap(), "shop.example", true);
        // A client's own claim is not passed on.
        assert_eq!(h["x-forwarded-for"], "127.0.0.9");
        assert!(h.get("forwarded").is_none());
        h.append("cookie", HeaderValue::from_static("a=1"));
        h.append("cookie", HeaderValue::from_static("b=2"));
        join_cookies(&mut h);
        assert_eq!(h.get_all("cookie").iter().count(), 1);
        assert_eq!(h["cookie"], "a=1; b=2");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "shop.example");
    }
}
