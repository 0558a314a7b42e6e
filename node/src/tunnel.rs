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
//! Each tunnel is a TLS connection of its own: no head-of-line blocking between flows,
//! at the cost of a handshake (about a millisecond here) per connection.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::Node;
use kube::{Api, Client};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::{Framed, LengthDelimitedCodec};

/// Where a node's kubelet endpoint takes tunnels.
pub const PATH: &str = "/tunnel";
/// The `Upgrade` protocol of a tunnel.
const UPGRADE: &str = "baton-tunnel";
/// Reaching the other node and being let through.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a node's address is trusted before it is looked up again.
const PEER_TTL: Duration = Duration::from_secs(30);
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
    /// The node's certificate as a client, and the cluster CA.
    tls: tokio_rustls::TlsConnector,
    /// Node name -> its kubelet endpoint, and when that was looked up.
    peers: Mutex<HashMap<String, (SocketAddr, Instant)>>,
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
        Self {
            client,
            tls: tokio_rustls::TlsConnector::from(tls),
            peers: Mutex::default(),
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
        if opened.is_err() {
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
        let http = |source| TunnelError::Http {
            node: node.to_string(),
            source,
        };
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(http)?;
        tokio::spawn(conn.with_upgrades());
        let req = http::Request::get(format!(
            "{PATH}?protocol={}&target={target}",
            protocol.as_str()
        ))
        .header(http::header::HOST, addr.to_string())
        .header(http::header::CONNECTION, "upgrade")
        .header(http::header::UPGRADE, UPGRADE)
        .body(Empty::<Bytes>::new())
        .expect("a well-formed request");
        let resp = send.send_request(req).await.map_err(http)?;
        if resp.status() != http::StatusCode::SWITCHING_PROTOCOLS {
            return Err(TunnelError::Refused {
                node: node.to_string(),
                status: resp.status(),
            });
        }
        let upgraded = hyper::upgrade::on(resp).await.map_err(http)?;
        Ok(TokioIo::new(upgraded))
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
