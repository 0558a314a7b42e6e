//! The pod's network: its virtual localhost, the names it resolves, and its socket caps.
//!
//! # How the virtual localhost works
//! Every pod gets its own loopback address (`127.x.y.z`, chosen by the node agent), and
//! the node reaches a pod's ports at `podIP:port`. Inside the pod, `localhost` means that
//! address, on both paths out of a component:
//! - **wasi:http outgoing.** [`PodHooks::send_request`] rewrites a request for
//!   `localhost:P` (or `127.0.0.1:P`) to `podIP:P` before it leaves.
//! - **wasi:sockets TCP and UDP.** [`add_to_linker`] shadows the functions of
//!   wasmtime-wasi's socket host that take an address: `bind` to `0.0.0.0:P` or
//!   `127.0.0.1:P` becomes `podIP:P`; `connect` to `127.0.0.1:P` (and a UDP datagram
//!   sent there) becomes `podIP:P`; and the name `localhost` resolves to `podIP`. The
//!   rest of wasmtime-wasi's socket code (streams, polling, options) runs unchanged.
//!   WASI 0.3's sockets are shadowed the same way (see `p3`), with two more cases: its
//!   `listen` on an unbound socket binds the pod's address rather than the node's
//!   wildcard, and the sockets it accepts are counted on their way to the guest.
//!
//! Behind the shadows, wasmtime-wasi's address check ([`PodNet::allows`]) refuses any
//! address the rewriting would still have changed: a path the shadows missed, in either
//! WASI version, fails with `access-denied` instead of reaching the node's loopback.
//!
//! So two pods on one node can both serve port P, and a component reaches its sibling at
//! `localhost:P` and never another pod.
//!
//! ## Why address rewriting, not a network namespace per pod
//! A namespace per pod gives real isolation of ports, but creating one costs 0.78 ms of
//! `unshare(CLONE_NEWNET)` alone on our 2-core test machine (5.5 ms with `ip netns add` and
//! bringing up its loopback), which is the whole cold-start budget, and needs root; and a
//! socket must be opened from a thread that has entered the namespace, which does not fit
//! an async runtime whose tasks hop threads.
//! Rewriting costs nothing per socket, needs no privilege, and keeps pod start in the
//! microseconds that edge density asks for. Its limit: only IPv4 is virtualised (an IPv6
//! `::1` bind is the node's), which the crate docs state.
//!
//! HTTP goes over loopback TCP rather than being routed in-process through wasmtime's body
//! types because it is one code path for siblings, the node and Services, at a cost of
//! one loopback connection per request.
//!
//! # Names
//! A pod may be given a [`NameResolver`]; the node agent gives each pod one for its
//! namespace, which maps a Service's names (`svc`, `svc.ns`, `svc.ns.svc`,
//! `svc.ns.svc.cluster.local`) and its ClusterIP to the address where the node serves
//! that Service. The pod consults it on the same paths out: the host of a wasi:http
//! request, a wasi:sockets name lookup, and a wasi:sockets `connect` to an address the
//! resolver maps (a ClusterIP). A name it does not map goes to the host's resolver.
//!
//! # Caps
//! Per pod: live sockets (TCP created, connected or accepted, and UDP) are capped at
//! [`NetLimits::max_sockets`] and the guest gets `new-socket-limit` past it (0.3, which
//! has no such code, gets `other`, and a connection accepted past it is closed); concurrent
//! outgoing HTTP requests are capped at [`NetLimits::max_outgoing_requests`]. Per instance,
//! the resource table (every open handle: files, streams, sockets, requests) is capped by
//! [`NetLimits::max_handles`]; a guest past it traps, alone.

use std::collections::HashSet;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use http_body_util::BodyExt;
use wasmtime::component::{Linker, Resource, ResourceType};
use wasmtime_wasi::p2::bindings::sockets::ip_name_lookup::{Host as _, ResolveAddressStream};
use wasmtime_wasi::p2::bindings::sockets::network::{
    ErrorCode, Host as _, IpAddressFamily, IpSocketAddress, Network,
};
use wasmtime_wasi::p2::bindings::sockets::tcp::{HostTcpSocket, TcpSocket};
use wasmtime_wasi::p2::bindings::sockets::tcp_create_socket::Host as _;
use wasmtime_wasi::p2::bindings::sockets::udp::{
    HostOutgoingDatagramStream, HostUdpSocket, OutgoingDatagram, OutgoingDatagramStream, UdpSocket,
};
use wasmtime_wasi::p2::bindings::sockets::udp_create_socket::Host as _;
use wasmtime_wasi::p2::{DynInputStream, DynOutputStream, SocketError};
use wasmtime_wasi::sockets::{SocketAddrUse, WasiSocketsView};
use wasmtime_wasi_http::{
    default_send_request, Error as HttpError, RequestOptions, WasiBody, WasiHttpHooks,
};

use crate::host::Host;

mod p3;

/// The wasi:sockets version wasmtime-wasi 48 registers; guests importing any 0.2.x match it.
const SOCKETS: &str = "0.2.12";

/// Resolves a name a component looks up (a Service, `name.namespace`, or the cluster
/// domain forms) to the address it means in the pod's network.
pub type NameResolver = Arc<dyn Fn(&str) -> Option<IpAddr> + Send + Sync>;

/// Caps on what one pod may hold open.
#[derive(Clone, Copy, Debug)]
pub struct NetLimits {
    /// Live TCP sockets per pod.
    pub max_sockets: usize,
    /// Concurrent outgoing wasi:http requests per pod.
    pub max_outgoing_requests: usize,
    /// Open handles (resource table entries) per component instance.
    pub max_handles: usize,
}

impl Default for NetLimits {
    fn default() -> Self {
        Self {
            max_sockets: 512,
            max_outgoing_requests: 256,
            max_handles: 8192,
        }
    }
}

/// One pod's network, shared by all its components' stores.
pub(crate) struct PodNet {
    pub ip: IpAddr,
    names: Option<NameResolver>,
    limits: NetLimits,
    sockets: AtomicUsize,
    outgoing: Arc<tokio::sync::Semaphore>,
    /// The client of its components' outgoing HTTPS.
    tls: Arc<rustls::ClientConfig>,
    /// What the pod uses of the node (instances, tasks, CPU); it lives with the pod's
    /// network because everything that runs for the pod already holds that.
    pub usage: Arc<crate::usage::Usage>,
    /// Set once, before the pod's first component starts, for a pod that runs OCI
    /// containers too: see [`Routed`].
    routed: std::sync::OnceLock<Routed>,
}

/// The network of a pod with a network namespace of its own (one that runs OCI
/// containers beside its components). Its components' sockets are made inside that
/// namespace, where `localhost` is the namespace's own loopback, shared with the
/// containers, and nothing is rewritten; names map to addresses reachable from inside
/// (a Service's ClusterIP, which the node serves on its side of the pod's link).
pub(crate) struct Routed {
    pub ns: Arc<crate::netns::NetworkNamespace>,
    names: Option<NameResolver>,
}

impl std::fmt::Debug for PodNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodNet")
            .field("ip", &self.ip)
            .field("sockets", &self.sockets.load(Ordering::Relaxed))
            .finish()
    }
}

impl PodNet {
    pub fn new(
        ip: IpAddr,
        names: Option<NameResolver>,
        limits: NetLimits,
        tls: Arc<rustls::ClientConfig>,
    ) -> Arc<Self> {
        Arc::new(Self {
            ip,
            names,
            limits,
            tls,
            sockets: AtomicUsize::new(0),
            outgoing: Arc::new(tokio::sync::Semaphore::new(limits.max_outgoing_requests)),
            usage: Arc::default(),
            routed: Default::default(),
        })
    }

    /// Moves the pod into `ns`: the sockets its components make from now on are made
    /// there, and `names` replaces its resolver. Call before its first component starts:
    /// a socket made earlier stays where it was made. Only the first call counts.
    pub fn route(&self, ns: Arc<crate::netns::NetworkNamespace>, names: Option<NameResolver>) {
        let _ = self.routed.set(Routed { ns, names });
    }

    /// The pod's network namespace, if it has one.
    pub fn netns(&self) -> Option<&Arc<crate::netns::NetworkNamespace>> {
        self.routed.get().map(|r| &r.ns)
    }

    /// Makes a socket with `make`, inside the pod's namespace if it has one. Fails only
    /// if the namespace cannot be entered, which is logged here.
    fn make_socket<T>(&self, make: impl FnOnce() -> T) -> Result<T, ()> {
        match self.netns() {
            Some(ns) => ns.enter(make).map_err(|e| {
                tracing::warn!(error = %e, "entering a pod's network namespace");
            }),
            None => Ok(make()),
        }
    }

    /// Sockets open in the pod now.
    pub fn open_sockets(&self) -> usize {
        self.sockets.load(Ordering::Relaxed)
    }

    fn is_local(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.');
        host.eq_ignore_ascii_case("localhost")
            || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
            || host == "[::1]"
    }

    /// The address a name means inside this pod, if it is not left to the host resolver.
    fn resolve(&self, host: &str) -> Option<IpAddr> {
        if let Some(r) = self.routed.get() {
            // `localhost` is the namespace's own, as the host resolver says.
            if self.is_local(host) {
                return None;
            }
            return r.names.as_ref().and_then(|f| f(host.trim_end_matches('.')));
        }
        if self.is_local(host) {
            return Some(self.ip);
        }
        self.names
            .as_ref()
            .and_then(|f| f(host.trim_end_matches('.')))
    }

    /// A bind inside the pod: the wildcard and loopback mean the pod's address.
    fn bind_addr(&self, addr: SocketAddr) -> SocketAddr {
        if self.routed.get().is_some() {
            return addr;
        }
        match addr {
            SocketAddr::V4(a) if a.ip().is_unspecified() || a.ip().is_loopback() => {
                SocketAddr::new(self.ip, a.port())
            }
            other => other,
        }
    }

    /// A connect inside the pod: loopback means the pod's address, and an address the
    /// resolver maps (a Service's ClusterIP) means where it maps to.
    fn connect_addr(&self, addr: SocketAddr) -> SocketAddr {
        if self.routed.get().is_some() {
            return addr;
        }
        match addr {
            SocketAddr::V4(a) if *a.ip() == Ipv4Addr::LOCALHOST => {
                SocketAddr::new(self.ip, a.port())
            }
            SocketAddr::V4(a) if !a.ip().is_loopback() => {
                match self.names.as_ref().and_then(|f| f(&a.ip().to_string())) {
                    Some(ip) => SocketAddr::new(ip, a.port()),
                    None => addr,
                }
            }
            other => other,
        }
    }

    /// wasmtime-wasi's address check, for both WASI versions: a fence behind the shadows
    /// in [`add_to_linker`]. They rewrite an address before wasmtime-wasi checks it, and
    /// the rewriting is idempotent, so an address it would still change took a path the
    /// shadows missed: it is refused rather than reaching the node's loopback or wildcard.
    pub(crate) fn allows(&self, addr: SocketAddr, used: SocketAddrUse) -> bool {
        if self.routed.get().is_some() {
            return true;
        }
        let ok = match used {
            // The wildcard with port 0 is how wasmtime-wasi checks the implicit bind of a
            // connect, which the kernel makes on the route's interface.
            SocketAddrUse::TcpBind | SocketAddrUse::UdpBind => {
                (addr.ip().is_unspecified() && addr.port() == 0) || self.bind_addr(addr) == addr
            }
            SocketAddrUse::TcpListen => {
                !(addr.is_ipv4() && addr.ip().is_unspecified()) && self.bind_addr(addr) == addr
            }
            SocketAddrUse::TcpConnect | SocketAddrUse::UdpSend => self.connect_addr(addr) == addr,
            SocketAddrUse::TcpAccept | SocketAddrUse::UdpReceive => true,
        };
        if !ok {
            tracing::warn!(%addr, ?used, "refused a socket address not mapped into the pod");
        }
        ok
    }

    fn admit_socket(&self) -> bool {
        let prev = self.sockets.fetch_add(1, Ordering::AcqRel);
        if prev >= self.limits.max_sockets {
            self.sockets.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        true
    }

    fn release_sockets(&self, n: usize) {
        self.sockets.fetch_sub(n, Ordering::AcqRel);
    }
}

/// The address check to give a pod's WASI context: [`PodNet::allows`].
pub(crate) fn addr_check(
    pod: Arc<PodNet>,
) -> impl Fn(SocketAddr, SocketAddrUse) -> Pin<Box<dyn Future<Output = bool> + Send + Sync>>
       + Send
       + Sync
       + 'static {
    move |addr, used| Box::pin(std::future::ready(pod.allows(addr, used)))
}

/// Awaits `fut`, whose first poll makes a socket: only that poll runs inside `ns`, the
/// pod's namespace, if it has one. None if the namespace cannot be entered.
async fn made_inside<F: Future>(
    ns: Option<Arc<crate::netns::NetworkNamespace>>,
    fut: F,
) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    let mut first = ns;
    std::future::poll_fn(|cx| match first.take() {
        Some(ns) => match ns.enter(|| fut.as_mut().poll(cx)) {
            Ok(polled) => polled.map(Some),
            Err(e) => {
                tracing::warn!(error = %e, "entering a pod's network namespace");
                std::task::Poll::Ready(None)
            }
        },
        None => fut.as_mut().poll(cx).map(Some),
    })
    .await
}

/// One store's share of its pod's network: which sockets it counted against the pod cap,
/// so that dropping the store gives them back even if the guest never closed them.
#[derive(Debug)]
pub(crate) struct StoreNet {
    pub pod: Arc<PodNet>,
    live: HashSet<u32>,
}

impl StoreNet {
    pub fn new(pod: Arc<PodNet>) -> Self {
        Self {
            pod,
            live: HashSet::new(),
        }
    }

    pub fn hooks(&self) -> PodHooks {
        PodHooks {
            net: self.pod.clone(),
            trace: None,
        }
    }
}

impl StoreNet {
    /// A socket is gone: if it was counted against the pod's cap, its place is free.
    fn forget(&mut self, rep: u32) {
        if self.live.remove(&rep) {
            self.pod.release_sockets(1);
        }
    }
}

impl Drop for StoreNet {
    fn drop(&mut self) {
        self.pod.release_sockets(self.live.len());
    }
}

/// The wasi:http hooks of a pod's components: `localhost` means the pod.
#[derive(Clone, Debug)]
pub(crate) struct PodHooks {
    net: Arc<PodNet>,
    /// The W3C trace context (`traceparent`, and `tracestate` if any) of the request
    /// this instance serves: its outgoing requests carry it on, so that a trace
    /// continues through a component that knows nothing of tracing.
    pub(crate) trace: Option<TraceContext>,
}

/// A request's W3C trace context headers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TraceContext {
    parent: http::HeaderValue,
    state: Option<http::HeaderValue>,
}

impl PodHooks {
    /// The hooks of a request made outside an instance's store (one for a reused
    /// instance, read before a worker takes it).
    pub(crate) fn of(net: Arc<PodNet>) -> Self {
        Self { net, trace: None }
    }
}

impl TraceContext {
    /// Its `traceparent`.
    pub(crate) fn parent(&self) -> &http::HeaderValue {
        &self.parent
    }

    /// The trace context of a request, if it has a `traceparent`.
    pub(crate) fn of(headers: &http::HeaderMap) -> Option<TraceContext> {
        Some(TraceContext {
            parent: headers.get("traceparent")?.clone(),
            state: headers.get("tracestate").cloned(),
        })
    }

    /// Adds the context to an outgoing request that has none of its own: a component
    /// that traces itself sets its own `traceparent`, and that one wins.
    fn pass_to(&self, headers: &mut http::HeaderMap) {
        if headers.contains_key("traceparent") {
            return;
        }
        headers.insert("traceparent", self.parent.clone());
        if let Some(state) = &self.state {
            headers.insert("tracestate", state.clone());
        }
    }
}

/// Points a request for `localhost:P` (or a resolved name) at the address it means in the
/// pod, keeping the port.
pub(crate) fn rewrite_uri(uri: &http::Uri, net: &PodNet) -> Option<http::Uri> {
    let auth = uri.authority()?;
    let ip = net.resolve(auth.host())?;
    if auth.host().parse::<IpAddr>().ok() == Some(ip) {
        return None;
    }
    let default_port = if uri.scheme_str() == Some("https") {
        443
    } else {
        80
    };
    let port = auth.port_u16().unwrap_or(default_port);
    let mut parts = uri.clone().into_parts();
    parts.authority = Some(SocketAddr::new(ip, port).to_string().parse().ok()?);
    http::Uri::from_parts(parts).ok()
}

use crate::https::IoFuture;

impl WasiHttpHooks for PodHooks {
    fn send_request(
        &mut self,
        mut request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        fut: IoFuture,
    ) -> Box<
        dyn Future<Output = wasmtime_wasi_http::Result<(http::Response<WasiBody>, IoFuture)>>
            + Send,
    > {
        // HTTPS verifies the name the guest asked for, wherever the request is sent.
        let tls = (request.uri().scheme() == Some(&http::uri::Scheme::HTTPS)).then(|| {
            let host = request.uri().host().unwrap_or_default();
            (crate::https::server_name(host), self.net.tls.clone())
        });
        if let Some(uri) = rewrite_uri(request.uri(), &self.net) {
            *request.uri_mut() = uri;
        }
        if let Some(trace) = &self.trace {
            trace.pass_to(request.headers_mut());
        }
        let request = hold_unsent_body(request);
        drop(fut);
        let permit = self.net.outgoing.clone().try_acquire_owned();
        let netns = self.net.netns().cloned();
        Box::new(async move {
            // The permit lives as long as the connection's I/O, so the cap counts
            // connections in use, not just requests being sent.
            let permit = permit.map_err(|_| HttpError::ConnectionLimitReached)?;
            let tls = match tls {
                Some((name, tls)) => Some((name?, tls)),
                None => None,
            };
            let (res, io): (_, IoFuture) = match (tls, netns) {
                // The default sender connects from the node's namespace; these connect
                // from wherever the pod's sockets are made.
                (tls @ Some(_), netns) | (tls @ None, netns @ Some(_)) => {
                    crate::https::send(request, options, tls, netns).await?
                }
                (None, None) => {
                    let (res, io) = default_send_request(request, options).await?;
                    (res.map(BodyExt::boxed_unsync), Box::new(io))
                }
            };
            let io = async move {
                let r = Box::into_pin(io).await;
                drop(permit);
                r
            };
            Ok((res, Box::new(io) as IoFuture))
        })
    }
}

/// The most of an unsent request body [`hold_unsent_body`] reads and discards, and for
/// how long: a guest writes such a body, empty, right after handing the request over.
const UNSENT_BODY_BYTES: usize = 64 << 10;
const UNSENT_BODY_TIME: std::time::Duration = std::time::Duration::from_secs(30);

/// hyper sends a GET, HEAD or CONNECT request that declares no length without a body, and
/// drops the body at once. A wasi:http guest writes its body (empty, for these methods)
/// after `handle` has handed the request over, so it raced hyper: when hyper had written
/// the head first, the guest's write failed as if the connection had been reset, though
/// the request went out and its answer was coming. Such a body is kept here instead and
/// read until the guest finishes it (or drops it with its instance), so that the guest's
/// writes succeed and it sees the answer. What it might write is not sent, as before.
fn hold_unsent_body(request: http::Request<WasiBody>) -> http::Request<WasiBody> {
    use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
    use http::Method;
    let bodiless = matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::CONNECT
    ) && !request.headers().contains_key(CONTENT_LENGTH)
        && !request.headers().contains_key(TRANSFER_ENCODING);
    if !bodiless || hyper::body::Body::is_end_stream(request.body()) {
        return request;
    }
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return request;
    };
    let (parts, body) = request.into_parts();
    rt.spawn(crate::http::drain(
        body,
        UNSENT_BODY_BYTES,
        UNSENT_BODY_TIME,
    ));
    let empty = http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed_unsync();
    http::Request::from_parts(parts, empty)
}

fn socket_error(host: &mut Host, e: SocketError) -> wasmtime::Result<ErrorCode> {
    host.sockets().convert_error_code(e)
}

/// Shadows the parts of wasmtime-wasi's wasi:sockets host that make `localhost` the pod's
/// and count sockets against the pod's cap. Call after `wasmtime_wasi::p2::add_to_linker_*`.
pub(crate) fn add_to_linker(linker: &mut Linker<Host>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let mut tcp = linker.instance(&format!("wasi:sockets/tcp@{SOCKETS}"))?;
    tcp.func_wrap_async(
        "[method]tcp-socket.start-bind",
        |mut store,
         (this, network, addr): (Resource<TcpSocket>, Resource<Network>, IpSocketAddress)| {
            Box::new(async move {
                let host = store.data_mut();
                let addr: IpSocketAddress = host.net.pod.bind_addr(addr.into()).into();
                match HostTcpSocket::start_bind(&mut host.sockets(), this, network, addr).await {
                    Ok(()) => Ok((Ok(()),)),
                    Err(e) => Ok((Err(socket_error(host, e)?),)),
                }
            })
        },
    )?;
    tcp.func_wrap(
        "[method]tcp-socket.start-connect",
        |mut store,
         (this, network, addr): (Resource<TcpSocket>, Resource<Network>, IpSocketAddress)| {
            let host = store.data_mut();
            let addr: IpSocketAddress = host.net.pod.connect_addr(addr.into()).into();
            match host.sockets().start_connect(this, network, addr) {
                Ok(()) => Ok((Ok(()),)),
                Err(e) => Ok((Err(socket_error(host, e)?),)),
            }
        },
    )?;
    type Accepted = (
        Resource<TcpSocket>,
        Resource<DynInputStream>,
        Resource<DynOutputStream>,
    );
    tcp.func_wrap(
        "[method]tcp-socket.accept",
        |mut store, (this,): (Resource<TcpSocket>,)| {
            let host = store.data_mut();
            if !host.net.pod.admit_socket() {
                return Ok((Err::<Accepted, _>(ErrorCode::NewSocketLimit),));
            }
            match host.sockets().accept(this) {
                Ok(accepted) => {
                    host.net.live.insert(accepted.0.rep());
                    Ok((Ok(accepted),))
                }
                Err(e) => {
                    host.net.pod.release_sockets(1);
                    Ok((Err(socket_error(host, e)?),))
                }
            }
        },
    )?;
    tcp.resource(
        "tcp-socket",
        ResourceType::host::<TcpSocket>(),
        |mut store, rep| {
            let host = store.data_mut();
            host.net.forget(rep);
            HostTcpSocket::drop(&mut host.sockets(), Resource::new_own(rep))
        },
    )?;
    let mut create = linker.instance(&format!("wasi:sockets/tcp-create-socket@{SOCKETS}"))?;
    create.func_wrap(
        "create-tcp-socket",
        |mut store, (family,): (IpAddressFamily,)| {
            let host = store.data_mut();
            if !host.net.pod.admit_socket() {
                return Ok((Err(ErrorCode::NewSocketLimit),));
            }
            let pod = host.net.pod.clone();
            let made = match pod.make_socket(|| host.sockets().create_tcp_socket(family)) {
                Ok(made) => made,
                Err(()) => {
                    pod.release_sockets(1);
                    return Ok((Err(ErrorCode::Unknown),));
                }
            };
            match made {
                Ok(socket) => {
                    host.net.live.insert(socket.rep());
                    Ok((Ok(socket),))
                }
                Err(e) => {
                    host.net.pod.release_sockets(1);
                    Ok((Err(socket_error(host, e)?),))
                }
            }
        },
    )?;
    let mut udp = linker.instance(&format!("wasi:sockets/udp-create-socket@{SOCKETS}"))?;
    udp.func_wrap_async(
        "create-udp-socket",
        |mut store, (family,): (IpAddressFamily,)| {
            Box::new(async move {
                let host = store.data_mut();
                if !host.net.pod.admit_socket() {
                    return Ok((Err(ErrorCode::NewSocketLimit),));
                }
                let ns = host.net.pod.netns().cloned();
                let made = {
                    let mut view = host.sockets();
                    made_inside(ns, view.create_udp_socket(family))
                        .await
                        .unwrap_or_else(|| Err(ErrorCode::Unknown.into()))
                };
                match made {
                    Ok(socket) => {
                        host.net.live.insert(socket.rep());
                        Ok((Ok::<Resource<UdpSocket>, _>(socket),))
                    }
                    Err(e) => {
                        host.net.pod.release_sockets(1);
                        Ok((Err(socket_error(host, e)?),))
                    }
                }
            })
        },
    )?;
    let mut udp_res = linker.instance(&format!("wasi:sockets/udp@{SOCKETS}"))?;
    udp_res.func_wrap_async(
        "[method]udp-socket.start-bind",
        |mut store,
         (this, network, addr): (Resource<UdpSocket>, Resource<Network>, IpSocketAddress)| {
            Box::new(async move {
                let host = store.data_mut();
                let addr: IpSocketAddress = host.net.pod.bind_addr(addr.into()).into();
                match HostUdpSocket::start_bind(&mut host.sockets(), this, network, addr).await {
                    Ok(()) => Ok((Ok(()),)),
                    Err(e) => Ok((Err(socket_error(host, e)?),)),
                }
            })
        },
    )?;
    udp_res.func_wrap_async(
        "[method]udp-socket.stream",
        |mut store, (this, remote): (Resource<UdpSocket>, Option<IpSocketAddress>)| {
            Box::new(async move {
                let host = store.data_mut();
                let remote = remote.map(|a| host.net.pod.connect_addr(a.into()).into());
                match HostUdpSocket::stream(&mut host.sockets(), this, remote).await {
                    Ok(streams) => Ok((Ok(streams),)),
                    Err(e) => Ok((Err(socket_error(host, e)?),)),
                }
            })
        },
    )?;
    udp_res.func_wrap(
        "[method]outgoing-datagram-stream.send",
        |mut store,
         (this, datagrams): (Resource<OutgoingDatagramStream>, Vec<OutgoingDatagram>)| {
            let host = store.data_mut();
            let datagrams = datagrams
                .into_iter()
                .map(|mut d| {
                    d.remote_address = d
                        .remote_address
                        .map(|a| host.net.pod.connect_addr(a.into()).into());
                    d
                })
                .collect();
            match HostOutgoingDatagramStream::send(&mut host.sockets(), this, datagrams) {
                Ok(n) => Ok((Ok(n),)),
                Err(e) => Ok((Err(socket_error(host, e)?),)),
            }
        },
    )?;
    udp_res.resource(
        "udp-socket",
        ResourceType::host::<UdpSocket>(),
        |mut store, rep| {
            let host = store.data_mut();
            host.net.forget(rep);
            HostUdpSocket::drop(&mut host.sockets(), Resource::new_own(rep))
        },
    )?;
    let mut lookup = linker.instance(&format!("wasi:sockets/ip-name-lookup@{SOCKETS}"))?;
    lookup.func_wrap(
        "resolve-addresses",
        |mut store, (network, name): (Resource<Network>, String)| {
            let host = store.data_mut();
            // An address literal resolves to itself in wasmtime-wasi, so a name the pod
            // knows is handed on as its address.
            let name = match host.net.pod.resolve(&name) {
                Some(ip) => ip.to_string(),
                None => name,
            };
            match host.sockets().resolve_addresses(network, name) {
                Ok(stream) => Ok((Ok::<Resource<ResolveAddressStream>, _>(stream),)),
                Err(e) => Ok((Err(socket_error(host, e)?),)),
            }
        },
    )?;
    p3::add_to_linker(linker)?;
    linker.allow_shadowing(false);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net() -> Arc<PodNet> {
        let names: NameResolver = Arc::new(|n: &str| {
            (n == "backend.default.svc.cluster.local").then(|| IpAddr::from([10, 96, 0, 9]))
        });
        PodNet::new(
            IpAddr::from([127, 1, 0, 7]),
            Some(names),
            NetLimits::default(),
            crate::https::client_config(&[]).unwrap(),
        )
    }

    #[test]
    fn localhost_means_the_pod() {
        let net = net();
        let u: http::Uri = "http://localhost:8081/x?y=1".parse().unwrap();
        assert_eq!(
            rewrite_uri(&u, &net).unwrap().to_string(),
            "http://127.1.0.7:8081/x?y=1"
        );
        let u: http::Uri = "http://127.0.0.1/".parse().unwrap();
        assert_eq!(
            rewrite_uri(&u, &net).unwrap().to_string(),
            "http://127.1.0.7:80/"
        );
        let u: http::Uri = "http://backend.default.svc.cluster.local:8080/"
            .parse()
            .unwrap();
        assert_eq!(
            rewrite_uri(&u, &net).unwrap().to_string(),
            "http://10.96.0.9:8080/"
        );
        let u: http::Uri = "http://example.com:8081/".parse().unwrap();
        assert!(rewrite_uri(&u, &net).is_none());
    }

    #[test]
    fn a_trace_context_is_passed_on_unless_the_request_has_its_own() {
        let mut incoming = http::HeaderMap::new();
        assert_eq!(TraceContext::of(&incoming), None);
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        incoming.insert("traceparent", parent.parse().unwrap());
        incoming.insert("tracestate", "vendor=x".parse().unwrap());
        let trace = TraceContext::of(&incoming).unwrap();
        let mut out = http::HeaderMap::new();
        trace.pass_to(&mut out);
        assert_eq!(out["traceparent"], parent);
        assert_eq!(out["tracestate"], "vendor=x");
        let own = "00-11111111111111111111111111111111-2222222222222222-01";
        let mut out = http::HeaderMap::new();
        out.insert("traceparent", own.parse().unwrap());
        trace.pass_to(&mut out);
        assert_eq!(out["traceparent"], own);
        assert!(!out.contains_key("tracestate"));
    }

    #[test]
    fn binds_and_connects_stay_in_the_pod() {
        let net = net();
        let pod: SocketAddr = "127.1.0.7:7000".parse().unwrap();
        assert_eq!(net.bind_addr("0.0.0.0:7000".parse().unwrap()), pod);
        assert_eq!(net.bind_addr("127.0.0.1:7000".parse().unwrap()), pod);
        assert_eq!(net.connect_addr("127.0.0.1:7000".parse().unwrap()), pod);
        let other: SocketAddr = "127.1.0.9:7000".parse().unwrap();
        assert_eq!(net.connect_addr(other), other);
        assert_eq!(net.resolve("localhost"), Some(pod.ip()));
        assert_eq!(net.resolve("example.com"), None);
    }

    /// A GET's body that hyper does not send stays writable until the guest finishes it,
    /// even after the answer came (the guest writes it after handing the request over).
    #[tokio::test]
    async fn a_get_body_written_after_the_answer_does_not_fail() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // A sibling in the pod, listening on the pod's address.
        let server = tokio::net::TcpListener::bind("127.1.0.7:0").await.unwrap();
        let port = server.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut s, _) = server.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let mut got = Vec::new();
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut buf).await.unwrap();
                if n == 0 {
                    return;
                }
                got.extend_from_slice(&buf[..n]);
            }
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await
                .unwrap();
        });
        use bytes::Bytes;
        let (mut body_tx, body) = http_body_util::Channel::<Bytes, HttpError>::new(1);
        let request = http::Request::get(format!("http://localhost:{port}/"))
            .body(body.boxed_unsync())
            .unwrap();
        let mut hooks = StoreNet::new(net()).hooks();
        let sent = hooks.send_request(request, None, Box::new(async { Ok(()) }));
        let (response, io) = Box::into_pin(sent).await.unwrap();
        assert_eq!(response.status(), 200);
        let text = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&text[..], b"ok");
        // The guest gets to its (empty) body only now.
        body_tx
            .send_data(Bytes::new())
            .await
            .expect("the body is still open");
        drop(body_tx);
        Box::into_pin(io).await.unwrap();
    }

    #[test]
    fn the_socket_cap_holds_and_gives_back() {
        let net = PodNet::new(
            IpAddr::from([127, 1, 0, 7]),
            None,
            NetLimits {
                max_sockets: 2,
                ..NetLimits::default()
            },
            crate::https::client_config(&[]).unwrap(),
        );
        assert!(net.admit_socket() && net.admit_socket());
        assert!(!net.admit_socket());
        net.release_sockets(1);
        assert!(net.admit_socket());
        assert_eq!(net.open_sockets(), 2);
    }

    #[test]
    fn the_address_check_refuses_what_was_not_rewritten() {
        use SocketAddrUse::*;
        let names: NameResolver =
            Arc::new(|n: &str| (n == "10.96.0.9").then(|| IpAddr::from([127, 96, 0, 1])));
        let net = PodNet::new(
            IpAddr::from([127, 1, 0, 7]),
            Some(names),
            NetLimits::default(),
            crate::https::client_config(&[]).unwrap(),
        );
        let allows = |a: &str, used| net.allows(a.parse().unwrap(), used);
        // The node's loopback is never reached; the pod's own address and other pods' are.
        assert!(!allows("127.0.0.1:80", TcpConnect));
        assert!(allows("127.1.0.7:80", TcpConnect));
        assert!(allows("127.1.0.9:80", TcpConnect));
        // A ClusterIP the resolver maps must have been mapped.
        assert!(!allows("10.96.0.9:80", TcpConnect));
        assert!(allows("127.96.0.1:80", TcpConnect));
        assert!(allows("10.1.2.3:80", TcpConnect));
        // The implicit bind of a connect, yes; the node's wildcard or loopback on a port, no.
        assert!(allows("0.0.0.0:0", TcpBind));
        assert!(!allows("0.0.0.0:7000", TcpBind));
        assert!(!allows("127.0.0.1:7000", TcpBind));
        assert!(allows("127.1.0.7:7000", TcpBind));
        // 0.3's listen on an unbound socket would serve the node's wildcard.
        assert!(!allows("0.0.0.0:0", TcpListen));
        assert!(allows("127.1.0.7:7000", TcpListen));
        assert!(!allows("127.0.0.1:7000", UdpSend));

        let own = PodNet::new(
            IpAddr::from([127, 0, 0, 1]),
            None,
            NetLimits::default(),
            crate::https::client_config(&[]).unwrap(),
        );
        assert!(own.allows("127.0.0.1:80".parse().unwrap(), TcpConnect));
        assert!(own.allows("127.0.0.1:80".parse().unwrap(), TcpListen));
    }
}
