//! The node-to-node network: how Service traffic reaches a ready endpoint on another node.
//!
//! A pod's address is a loopback address of its node (each node has its own `/20` of
//! `127.128.0.0/9`), which no other host can route to. So a node that has a connection or
//! a datagram for an endpoint on another node carries it through a tunnel: an HTTP/1.1
//! upgrade on the other node's kubelet endpoint, `GET /tunnel?protocol=TCP&target=IP:PORT`,
//! over mutual TLS.
//! - The caller presents its node certificate (`system:node:NAME` in `system:nodes`,
//!   from the cluster CA) and checks the other node's against the CA and the address
//!   its Node publishes.
//! - The other node answers only nodes ([`crate::server`]), and opens only what its
//!   Services publish: a ready endpoint of a Service, on that node, with that protocol
//!   and port ([`crate::proxy::Services::exit_allowed`]). The node's own ports and a
//!   pod's unpublished ones stay out of reach, as they are from a NodePort.
//!
//! A TCP tunnel carries one connection's bytes. A UDP tunnel carries one flow's
//! datagrams (one client of a Service, for the reply path), each framed by its length
//! in two bytes, both ways; it ends after [`UDP_IDLE`] without a datagram, as a
//! conntrack entry would.
//!
//! A node's tunnels to one other node share a connection: HTTP/2, with each tunnel an
//! extended CONNECT stream (RFC 8441, `:protocol` `baton-tunnel`) on the same path, as
//! Istio's ztunnel carries its HBONE tunnels. So a new connection to a remote endpoint
//! costs a stream, not a TCP and TLS handshake, and flows do not each hold a socket on
//! both nodes. A peer that does not offer `h2` gets the HTTP/1.1 upgrade, a connection
//! per tunnel. The connection is pinged while it is open, so a peer that vanished is
//! noticed and dialled afresh; one that carried no new tunnel for [`POOL_IDLE`] is let
//! go once its tunnels end.
//!
//! The exit also checks that its caller is still a registered Node: a node's
//! certificate outlives the Node object it was issued for, and a deleted node must not
//! keep reaching pods (looked up as peers are, so a deletion is seen within
//! [`PEER_TTL`]).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use k8s_openapi::api::core::v1::Node;
use kube::{Api, Client};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::{Framed, LengthDelimitedCodec};

/// Where a node's kubelet endpoint takes tunnels.
pub const PATH: &str = "/tunnel";
/// The `Upgrade` protocol of a tunnel (HTTP/1.1), and its `:protocol` (HTTP/2).
pub const UPGRADE: &str = "baton-tunnel";
/// Reaching the other node and being let through.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a node's address (and that it is registered) is trusted before it is looked
/// up again.
const PEER_TTL: Duration = Duration::from_secs(30);
/// A pooled connection that carried no new tunnel for this long is let go.
const POOL_IDLE: Duration = Duration::from_secs(90);
/// A tunnels' connection is pinged this often, by both nodes, and given up when a ping
/// is not answered within [`KEEPALIVE_TIMEOUT`]: so a vanished peer is dialled afresh,
/// not waited on, and its tunnels end on the other side too.
pub const KEEPALIVE: Duration = Duration::from_secs(10);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Tunnels one connection carries at once; more wait for one to end.
pub const STREAMS_PER_CONNECTION: u32 = 4096;
/// A UDP flow without a datagram either way for this long ends (kube-proxy leaves it to
/// conntrack, whose UDP stream timeout is 120 s and single-datagram one 30 s).
pub const UDP_IDLE: Duration = Duration::from_secs(60);

/// A Service port's protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// As a Service spells it; None for one the node does not route (SCTP).
    pub fn parse(s: Option<&str>) -> Option<Self> {
        match s.unwrap_or("TCP") {
            "TCP" => Some(Self::Tcp),
            "UDP" => Some(Self::Udp),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
        }
    }
}

/// A byte stream, whichever way it goes: a local socket or a tunnel.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// An open tunnel.
pub type Tunnel = TokioIo<hyper::upgrade::Upgraded>;

/// Why a tunnel could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("looking up node {node:?}")]
    Lookup {
        node: String,
        #[source]
        source: Box<kube::Error>,
    },
    #[error("node {0:?} publishes no InternalIP and kubelet port")]
    NoAddress(String),
    #[error("connecting to node {node:?} at {addr}")]
    Connect {
        node: String,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the tunnel request to node {node:?}")]
    Http {
        node: String,
        #[source]
        source: hyper::Error,
    },
    #[error("node {node:?} refused the tunnel with {status}")]
    Refused {
        node: String,
        status: http::StatusCode,
    },
    #[error("node {0:?} did not answer within {CONNECT_TIMEOUT:?}")]
    Timeout(String),
}

/// This node's side of the node-to-node network: opens tunnels to other nodes.
pub struct Link {
    client: Client,
    /// The node's certificate as a client, and the cluster CA; offers `h2`.
    tls: tokio_rustls::TlsConnector,
    /// Node name -> its kubelet endpoint, and when that was looked up.
    peers: Mutex<HashMap<String, (SocketAddr, Instant)>>,
    /// Node name -> the connection its tunnels share, once dialled. The async lock is
    /// held while dialling, so that tunnels opened together share one connection.
    pool: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<Pooled>>>>>,
}

/// A pooled HTTP/2 connection to another node's endpoint.
struct Pooled {
    send: hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    addr: SocketAddr,
    /// When a tunnel was last opened on it.
    used: Instant,
}

/// A connection to another node's endpoint, by what the two agreed to speak.
enum Dialled {
    H2(Pooled),
    /// A peer without `h2`: one tunnel on this connection.
    Http1(
        Box<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
        SocketAddr,
    ),
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link").finish_non_exhaustive()
    }
}

impl Link {
    /// A link that presents the node's identity `tls` (its kubelet endpoint's
    /// certificate, [`crate::server::Started::link`]).
    pub fn new(client: Client, tls: Arc<rustls::ClientConfig>) -> Self {
        let mut tls = (*tls).clone();
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Self {
            client,
            tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
            peers: Mutex::default(),
            pool: Mutex::default(),
        }
    }

    /// Where `node` takes tunnels: its InternalIP and kubelet port.
    async fn peer(&self, node: &str) -> Result<SocketAddr, TunnelError> {
        if let Some((addr, at)) = lock(&self.peers).get(node) {
            if at.elapsed() < PEER_TTL {
                return Ok(*addr);
            }
        }
        let n = Api::<Node>::all(self.client.clone())
            .get(node)
            .await
            .map_err(|source| TunnelError::Lookup {
                node: node.to_string(),
                source: Box::new(source),
            })?;
        let status = n.status.unwrap_or_default();
        let ip = status
            .addresses
            .iter()
            .flatten()
            .find(|a| a.type_ == "InternalIP")
            .and_then(|a| a.address.parse::<IpAddr>().ok());
        let port = status
            .daemon_endpoints
            .and_then(|d| d.kubelet_endpoint)
            .and_then(|k| u16::try_from(k.port).ok());
        let (Some(ip), Some(port)) = (ip, port) else {
            return Err(TunnelError::NoAddress(node.to_string()));
        };
        let addr = SocketAddr::new(ip, port);
        lock(&self.peers).insert(node.to_string(), (addr, Instant::now()));
        Ok(addr)
    }

    /// Whether `node`, a caller with a node certificate, is a node of the network now:
    /// a registered Node that publishes where it takes tunnels. An error is a lookup
    /// that did not answer either way.
    pub async fn is_member(&self, node: &str) -> Result<bool, TunnelError> {
        match self.peer(node).await {
            Ok(_) => Ok(true),
            Err(TunnelError::NoAddress(_)) => Ok(false),
            Err(TunnelError::Lookup { source, .. }) if matches!(&*source, kube::Error::Api(s) if s.code == 404) => {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Opens a tunnel through `node` to `target` (one of its pods' endpoints).
    pub async fn open(
        &self,
        node: &str,
        protocol: Protocol,
        target: SocketAddr,
    ) -> Result<Tunnel, TunnelError> {
        let opened = tokio::time::timeout(CONNECT_TIMEOUT, self.dial(node, protocol, target))
            .await
            .unwrap_or_else(|_| Err(TunnelError::Timeout(node.to_string())));
        if let Err(
            TunnelError::Connect { .. } | TunnelError::Http { .. } | TunnelError::Timeout(_),
        ) = &opened
        {
            // The node may have moved: look it up afresh next time.
            lock(&self.peers).remove(node);
        }
        opened
    }

    async fn dial(
        &self,
        node: &str,
        protocol: Protocol,
        target: SocketAddr,
    ) -> Result<Tunnel, TunnelError> {
        let slot = self.slot(node);
        // A pooled connection may end between the check and the request: then it is
        // dropped from the pool, and the tunnel asked for once more on a new one.
        for last_try in [false, true] {
            let (send, addr) = {
                let mut pooled = slot.lock().await;
                match pooled.as_mut() {
                    Some(p) if !p.send.is_closed() => {
                        p.used = Instant::now();
                        (p.send.clone(), p.addr)
                    }
                    _ => match self.connect(node).await? {
                        Dialled::H2(p) => {
                            let r = (p.send.clone(), p.addr);
                            *pooled = Some(p);
                            r
                        }
                        Dialled::Http1(tls, addr) => {
                            drop(pooled);
                            return upgrade_http1(tls, node, addr, protocol, target).await;
                        }
                    },
                }
            };
            match connect_stream(send, node, addr, protocol, target).await {
                Err(TunnelError::Http { .. }) if !last_try => *slot.lock().await = None,
                done => return done,
            }
        }
        unreachable!("the last try returns")
    }

    /// `node`'s place in the pool; places whose connection carried no new tunnel for
    /// [`POOL_IDLE`] are dropped on the way (their connections end with their tunnels).
    fn slot(&self, node: &str) -> Arc<tokio::sync::Mutex<Option<Pooled>>> {
        let mut pool = lock(&self.pool);
        pool.retain(|name, slot| {
            name == node
                || slot.try_lock().map_or(true, |p| {
                    p.as_ref()
                        .is_some_and(|p| !p.send.is_closed() && p.used.elapsed() < POOL_IDLE)
                })
        });
        pool.entry(node.to_string()).or_default().clone()
    }

    /// A TLS connection to `node`'s endpoint, and HTTP/2 on it if the node offers it.
    async fn connect(&self, node: &str) -> Result<Dialled, TunnelError> {
        let addr = self.peer(node).await?;
        let connect = |source| TunnelError::Connect {
            node: node.to_string(),
            addr,
            source,
        };
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(connect)?;
        let _ = tcp.set_nodelay(true);
        let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
        let tls = self.tls.connect(name, tcp).await.map_err(connect)?;
        if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
            return Ok(Dialled::Http1(Box::new(tls), addr));
        }
        let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(KEEPALIVE)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .adaptive_window(true)
            .handshake(TokioIo::new(tls))
            .await
            .map_err(http_error(node))?;
        tokio::spawn(conn);
        Ok(Dialled::H2(Pooled {
            send,
            addr,
            used: Instant::now(),
        }))
    }
}

/// The query of a tunnel request to `target`.
fn tunnel_path(protocol: Protocol, target: SocketAddr) -> String {
    format!("{PATH}?protocol={}&target={target}", protocol.as_str())
}

/// A tunnel as a stream of a shared HTTP/2 connection: an extended CONNECT, answered
/// 200 by the exit once it reached the endpoint.
async fn connect_stream(
    mut send: hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    node: &str,
    addr: SocketAddr,
    protocol: Protocol,
    target: SocketAddr,
) -> Result<Tunnel, TunnelError> {
    let http = http_error(node);
    let mut req =
        http::Request::connect(format!("https://{addr}{}", tunnel_path(protocol, target)))
            .body(Empty::<Bytes>::new())
            .expect("a well-formed request");
    req.extensions_mut()
        .insert(hyper::ext::Protocol::from_static(UPGRADE));
    // Waits while the connection has as many tunnels as the peer allows at once.
    send.ready().await.map_err(http)?;
    let resp = send.send_request(req).await.map_err(http)?;
    opened(node, resp, http::StatusCode::OK).await
}

/// A tunnel as an HTTP/1.1 upgrade of a connection of its own, for a peer without `h2`.
async fn upgrade_http1(
    tls: Box<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
    node: &str,
    addr: SocketAddr,
    protocol: Protocol,
    target: SocketAddr,
) -> Result<Tunnel, TunnelError> {
    let http = http_error(node);
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(http)?;
    tokio::spawn(conn.with_upgrades());
    let req = http::Request::get(tunnel_path(protocol, target))
        .header(http::header::HOST, addr.to_string())
        .header(http::header::CONNECTION, "upgrade")
        .header(http::header::UPGRADE, UPGRADE)
        .body(Empty::<Bytes>::new())
        .expect("a well-formed request");
    let resp = send.send_request(req).await.map_err(http)?;
    opened(node, resp, http::StatusCode::SWITCHING_PROTOCOLS).await
}

/// The tunnel `resp` opened, if it has the status that opens one (`open`); otherwise the
/// exit's refusal.
async fn opened(
    node: &str,
    resp: http::Response<hyper::body::Incoming>,
    open: http::StatusCode,
) -> Result<Tunnel, TunnelError> {
    if resp.status() != open {
        return Err(TunnelError::Refused {
            node: node.to_string(),
            status: resp.status(),
        });
    }
    let upgraded = hyper::upgrade::on(resp).await.map_err(http_error(node))?;
    Ok(TokioIo::new(upgraded))
}

/// A hyper error on the way to `node`, as a tunnel's error.
fn http_error(node: &str) -> impl Fn(hyper::Error) -> TunnelError + Copy + '_ {
    move |source| TunnelError::Http {
        node: node.to_string(),
        source,
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Datagrams framed on a stream: two bytes of length, then the datagram.
fn datagrams<S: AsyncRead + AsyncWrite>(io: S) -> Framed<S, LengthDelimitedCodec> {
    LengthDelimitedCodec::builder()
        .length_field_length(2)
        .max_frame_length(usize::from(u16::MAX))
        .new_framed(io)
}

/// A tunnel's stream as datagrams out and in ([`datagrams`]).
pub fn framed<S: Io>(
    io: S,
) -> (
    impl futures::Sink<Bytes, Error = std::io::Error> + Unpin,
    impl futures::Stream<Item = Bytes> + Unpin,
) {
    let (sink, stream) = datagrams(io).split();
    let stream = stream.filter_map(|d| std::future::ready(d.ok().map(bytes::BytesMut::freeze)));
    (sink, stream)
}

/// What a tunnel request asks for: its protocol and target.
pub fn parse_request(query: Option<&str>) -> Option<(Protocol, SocketAddr)> {
    let mut protocol = None;
    let mut target = None;
    for (k, v) in form_urlencoded::parse(query?.as_bytes()) {
        match &*k {
            "protocol" => protocol = Protocol::parse(Some(&v)),
            "target" => target = v.parse::<SocketAddr>().ok(),
            _ => {}
        }
    }
    Some((protocol?, target?))
}

/// The exit of a tunnel on the node that runs the endpoint: connects to the endpoint, then
/// carries the tunnel's traffic to it and back. The connection (TCP) or socket (UDP) is
/// made before the caller is told the tunnel is open, so that a dead endpoint is an
/// error to the caller, not a stream that closes.
#[derive(Debug)]
pub enum Exit {
    Tcp(tokio::net::TcpStream),
    /// A socket connected to its endpoint, and the endpoint.
    Udp(tokio::net::UdpSocket, SocketAddr),
}

impl Exit {
    /// Reaches `target`; UDP datagrams leave from `source`, an address of this node that
    /// a pod's reply reaches unchanged (not 127.0.0.1, which in a pod means the pod).
    pub async fn connect(
        protocol: Protocol,
        target: SocketAddr,
        source: IpAddr,
    ) -> std::io::Result<Self> {
        match protocol {
            Protocol::Tcp => {
                let tcp =
                    tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(target))
                        .await
                        .map_err(|_| std::io::ErrorKind::TimedOut)??;
                let _ = tcp.set_nodelay(true);
                Ok(Self::Tcp(tcp))
            }
            Protocol::Udp => Ok(Self::Udp(udp_to(source, target).await?, target)),
        }
    }

    /// Carries `tunnel` to the endpoint and back until either side ends.
    pub async fn run<T: Io>(self, mut tunnel: T) {
        match self {
            Self::Tcp(mut tcp) => {
                let _ = tokio::io::copy_bidirectional(&mut tunnel, &mut tcp).await;
            }
            Self::Udp(udp, target) => {
                let (to_tunnel, from_tunnel) = framed(tunnel);
                let (to_endpoint, from_endpoint) = socket(udp, target);
                relay(from_tunnel, to_tunnel, from_endpoint, to_endpoint).await;
            }
        }
    }
}

/// A UDP socket from `source` (any port) connected to `target`.
pub async fn udp_to(source: IpAddr, target: SocketAddr) -> std::io::Result<tokio::net::UdpSocket> {
    let udp = tokio::net::UdpSocket::bind(SocketAddr::new(source, 0)).await?;
    udp.connect(target).await?;
    Ok(udp)
}

/// A UDP socket connected to `peer` ([`udp_to`]) as datagrams out and in. A receive
/// error (an ICMP unreachable after a send) is passed over: the endpoint may come back
/// within the flow.
pub fn socket(
    udp: tokio::net::UdpSocket,
    peer: SocketAddr,
) -> (
    impl futures::Sink<Bytes, Error = std::io::Error> + Unpin,
    impl futures::Stream<Item = Bytes> + Unpin,
) {
    let (sink, stream) =
        tokio_util::udp::UdpFramed::new(udp, tokio_util::codec::BytesCodec::new()).split();
    let sink = sink.with(move |d: Bytes| std::future::ready(Ok::<_, std::io::Error>((d, peer))));
    let stream = stream.filter_map(|got| std::future::ready(got.ok().map(|(d, _)| d.freeze())));
    (sink, stream)
}

/// Relays datagrams between two sides, `a` and `b`, until one ends or neither has sent
/// anything for [`UDP_IDLE`].
pub async fn relay<AIn, AOut, BIn, BOut>(
    mut a_in: AIn,
    mut a_out: AOut,
    mut b_in: BIn,
    mut b_out: BOut,
) where
    AIn: futures::Stream<Item = Bytes> + Unpin,
    AOut: futures::Sink<Bytes> + Unpin,
    BIn: futures::Stream<Item = Bytes> + Unpin,
    BOut: futures::Sink<Bytes> + Unpin,
{
    loop {
        tokio::select! {
            d = a_in.next() => {
                let Some(d) = d else { break };
                if b_out.send(d).await.is_err() {
                    break;
                }
            }
            d = b_in.next() => {
                let Some(d) = d else { break };
                if a_out.send(d).await.is_err() {
                    break;
                }
            }
            _ = tokio::time::sleep(UDP_IDLE) => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_name_a_protocol_and_a_target() {
        let t: SocketAddr = "127.128.16.5:53".parse().unwrap();
        assert_eq!(
            parse_request(Some("protocol=UDP&target=127.128.16.5:53")),
            Some((Protocol::Udp, t))
        );
        assert_eq!(
            parse_request(Some("target=127.128.16.5%3A53&protocol=TCP")),
            Some((Protocol::Tcp, t))
        );
        assert_eq!(
            parse_request(Some("protocol=SCTP&target=127.0.0.1:1")),
            None
        );
        assert_eq!(parse_request(Some("protocol=TCP&target=host:1")), None);
        assert_eq!(parse_request(Some("protocol=TCP")), None);
        assert_eq!(parse_request(None), None);
    }

    /// rustls configs for a peer endpoint at 127.0.0.1 that offers `alpn`, and for a
    /// node calling it, both from one CA.
    fn tls_pair(alpn: &[&[u8]]) -> (rustls::ServerConfig, rustls::ClientConfig) {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::from_ca_cert_pem(&ca.pem(), ca_key).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.der().clone()).unwrap();
        let roots = Arc::new(roots);
        let issue = |san: Option<SanType>| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.subject_alt_names.extend(san);
            let cert = params.signed_by(&key, &issuer).unwrap();
            let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
            (vec![CertificateDer::from(cert.der().to_vec())], key)
        };
        let (certs, key) = issue(Some(SanType::IpAddress([127, 0, 0, 1].into())));
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.clone(),
            provider.clone(),
        )
        .build()
        .unwrap();
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)
            .unwrap();
        server.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let (certs, key) = issue(None);
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)
            .unwrap();
        (server, client)
    }

    /// A peer's endpoint that echoes what a tunnel carries, refuses tunnels to port 1,
    /// and counts the connections it accepted. Its connections' tasks are returned, so a
    /// test can end them.
    async fn echo_peer(
        alpn: &[&[u8]],
    ) -> (
        SocketAddr,
        rustls::ClientConfig,
        Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    ) {
        let (server, client) = tls_pair(alpn);
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conns = Arc::new(Mutex::new(Vec::new()));
        let tasks = conns.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let acceptor = acceptor.clone();
                lock(&tasks).push(tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                    let svc = hyper::service::service_fn(|mut req: http::Request<_>| async move {
                        let (_, target) = parse_request(req.uri().query()).unwrap();
                        let mut resp = http::Response::new(Empty::<Bytes>::new());
                        if target.port() == 1 {
                            *resp.status_mut() = http::StatusCode::FORBIDDEN;
                            return Ok::<_, std::convert::Infallible>(resp);
                        }
                        let up = req
                            .extensions_mut()
                            .remove::<hyper::upgrade::OnUpgrade>()
                            .unwrap();
                        tokio::spawn(async move {
                            let io = TokioIo::new(up.await.unwrap());
                            let (mut r, mut w) = tokio::io::split(io);
                            let _ = tokio::io::copy(&mut r, &mut w).await;
                        });
                        if req.version() != http::Version::HTTP_2 {
                            *resp.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
                            let h = resp.headers_mut();
                            h.insert(http::header::CONNECTION, "upgrade".parse().unwrap());
                            h.insert(http::header::UPGRADE, UPGRADE.parse().unwrap());
                        }
                        Ok(resp)
                    });
                    if h2 {
                        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .enable_connect_protocol()
                            .serve_connection(TokioIo::new(tls), svc)
                            .await;
                    } else {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(tls), svc)
                            .with_upgrades()
                            .await;
                    }
                }));
            }
        });
        (addr, client, conns)
    }

    /// A link whose peer `n2` is at `addr`, with no API server behind it.
    fn link_to(addr: SocketAddr, tls: rustls::ClientConfig) -> Link {
        let no_api = tower::service_fn(|_: http::Request<kube::client::Body>| async {
            Err::<http::Response<Empty<Bytes>>, _>(std::io::Error::other("no API server"))
        });
        let link = Link::new(Client::new(no_api, "default"), Arc::new(tls));
        lock(&link.peers).insert("n2".into(), (addr, Instant::now()));
        link
    }

    /// Opens a TCP tunnel to `n2` and checks it carries `msg` both ways.
    async fn echoes(link: &Link, msg: &str) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let target: SocketAddr = "127.128.16.5:7000".parse().unwrap();
        let mut t = link.open("n2", Protocol::Tcp, target).await.unwrap();
        t.write_all(msg.as_bytes()).await.unwrap();
        let mut got = vec![0; msg.len()];
        t.read_exact(&mut got).await.unwrap();
        assert_eq!(got, msg.as_bytes());
    }

    #[tokio::test]
    async fn tunnels_to_a_node_share_one_connection_and_survive_its_loss() {
        let (addr, tls, conns) = echo_peer(&[b"h2", b"http/1.1"]).await;
        let link = link_to(addr, tls);
        let opened = (0..8).map(|i| {
            let link = &link;
            async move { echoes(link, &format!("hello {i}")).await }
        });
        futures::future::join_all(opened).await;
        assert_eq!(lock(&conns).len(), 1, "one connection carries every tunnel");

        // The exit's answer is the caller's error.
        let refused = link
            .open("n2", Protocol::Tcp, "127.128.16.5:1".parse().unwrap())
            .await;
        assert!(
            matches!(refused, Err(TunnelError::Refused { status, .. }) if status == 403),
            "{refused:?}"
        );

        // The peer drops the connection: the next tunnel gets a new one.
        for t in lock(&conns).drain(..) {
            t.abort();
        }
        echoes(&link, "again").await;
        assert_eq!(lock(&conns).len(), 1, "a new connection");
    }

    #[tokio::test]
    async fn a_peer_without_h2_gets_a_connection_per_tunnel() {
        let (addr, tls, conns) = echo_peer(&[b"http/1.1"]).await;
        let link = link_to(addr, tls);
        echoes(&link, "one").await;
        echoes(&link, "two").await;
        assert_eq!(lock(&conns).len(), 2);
    }

    #[tokio::test]
    async fn a_udp_exit_relays_framed_datagrams_both_ways() {
        let echo = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let target = echo.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            loop {
                let (n, from) = echo.recv_from(&mut buf).await.unwrap();
                let mut reply = b"echo:".to_vec();
                reply.extend_from_slice(&buf[..n]);
                echo.send_to(&reply, from).await.unwrap();
            }
        });
        let exit = Exit::connect(Protocol::Udp, target, IpAddr::from([127, 0, 0, 2]))
            .await
            .unwrap();
        let (near, far) = tokio::io::duplex(1 << 16);
        tokio::spawn(exit.run(far));
        let mut framed = datagrams(near);
        for msg in ["a", "bb", ""] {
            framed.send(Bytes::from(msg)).await.unwrap();
            let got = framed.next().await.unwrap().unwrap();
            assert_eq!(&got[..], format!("echo:{msg}").as_bytes());
        }
    }
}
