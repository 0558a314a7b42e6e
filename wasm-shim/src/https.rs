//! Components' outgoing HTTPS: trusting the cluster CA, and verifying the name the guest
//! asked for.
//!
//! wasmtime-wasi-http's default sender trusts only the public web roots and verifies the
//! host of the URI it connects to. Neither fits a pod: a component that calls the API
//! server (`https://kubernetes.default.svc`, or the `kubernetes` Service's ClusterIP)
//! meets a certificate of the cluster CA, and [`crate::net`] has rewritten the URI's host
//! to the node address where the node serves that Service. So HTTPS requests go through
//! [`send`] instead: TCP to the rewritten address, TLS (rustls, ring) with the public
//! roots plus the node's extra CAs ([`crate::RuntimeConfig::extra_ca_pem`]) and the
//! server name the guest used (SNI and verification), then HTTP/1.1 with the guest's
//! timeouts. Plain HTTP goes through the default sender, except from a pod with a network
//! namespace of its own, whose connections [`send`] makes inside it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use rustls::pki_types::{pem::PemObject, CertificateDer, ServerName};
use wasmtime_wasi_http::{Error as HttpError, RequestOptions, WasiBody};

use crate::error::ShimError;

/// The connection's remaining I/O, which wasmtime drives after the response head.
pub(crate) type IoFuture = Box<dyn Future<Output = Result<(), HttpError>> + Send>;

/// What a guest waits for when it sets no timeout of its own (wasmtime's default too).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// The TLS client of every component of a runtime: the public web roots and `extra_pem`.
pub(crate) fn client_config(extra_pem: &[Vec<u8>]) -> Result<Arc<rustls::ClientConfig>, ShimError> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    for pem in extra_pem {
        let mut any = false;
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| {
                ShimError::Setup(format!("an extra CA for components' HTTPS is not PEM: {e}"))
            })?;
            roots.add(cert).map_err(|e| {
                ShimError::Setup(format!("an extra CA for components' HTTPS is refused: {e}"))
            })?;
            any = true;
        }
        if !any {
            return Err(ShimError::Setup(
                "an extra CA for components' HTTPS holds no certificate".into(),
            ));
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| ShimError::Setup(format!("TLS client: {e}")))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The name to verify for `host` (an IP literal, bracketed or not, or a DNS name).
pub(crate) fn server_name(host: &str) -> Result<ServerName<'static>, HttpError> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<std::net::IpAddr>() {
        return Ok(ServerName::from(ip));
    }
    ServerName::try_from(host.to_string()).map_err(HttpError::InvalidDnsNameError)
}

/// Opens a TCP connection to `host:port`, from inside `netns` if given.
async fn connect(
    host: &str,
    port: u16,
    netns: Option<&crate::netns::NetworkNamespace>,
) -> std::io::Result<tokio::net::TcpStream> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let Some(ns) = netns else {
        return tokio::net::TcpStream::connect((host, port)).await;
    };
    // Names are looked up with the node's resolver (the pod's own names were rewritten
    // to addresses already); the socket is made in the pod's namespace.
    let mut last = None;
    for addr in tokio::net::lookup_host((host, port)).await? {
        match ns.connect(addr).await {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::NotFound, "the name has no address")
    }))
}

/// Sends `request` to its URI's authority: over TLS verifying the name given with `tls`,
/// else in plain HTTP/1.1; from inside `netns` if given.
pub(crate) async fn send(
    mut request: http::Request<WasiBody>,
    options: Option<RequestOptions>,
    tls: Option<(ServerName<'static>, Arc<rustls::ClientConfig>)>,
    netns: Option<Arc<crate::netns::NetworkNamespace>>,
) -> Result<(http::Response<WasiBody>, IoFuture), HttpError> {
    let opt = |f: fn(&RequestOptions) -> Option<Duration>| {
        options.as_ref().and_then(f).unwrap_or(DEFAULT_TIMEOUT)
    };
    let connect_timeout = opt(|o| o.connect_timeout);
    let first_byte_timeout = opt(|o| o.first_byte_timeout);
    // A zero wait would make every frame late; the shortest real one stands in.
    let between_bytes = opt(|o| o.between_bytes_timeout).max(Duration::from_nanos(1));

    let authority = request
        .uri()
        .authority()
        .ok_or(HttpError::HttpRequestUriInvalid)?;
    let default_port = if tls.is_some() { 443 } else { 80 };
    let (host, port) = (
        authority.host().to_string(),
        authority.port_u16().unwrap_or(default_port),
    );
    let tcp = tokio::time::timeout(connect_timeout, connect(&host, port, netns.as_deref()))
        .await
        .map_err(|_| HttpError::ConnectionTimeout)?
        .map_err(HttpError::Connect)?;
    let _ = tcp.set_nodelay(true);
    let stream: Box<dyn Io> = match tls {
        Some((name, tls)) => Box::new(
            tokio::time::timeout(
                connect_timeout,
                tokio_rustls::TlsConnector::from(tls).connect(name, tcp),
            )
            .await
            .map_err(|_| HttpError::ConnectionTimeout)?
            .map_err(HttpError::Tls)?,
        ),
        None => Box::new(tcp),
    };
    let (mut sender, conn) = tokio::time::timeout(
        connect_timeout,
        hyper::client::conn::http1::handshake(TokioIo::new(stream)),
    )
    .await
    .map_err(|_| HttpError::ConnectionTimeout)??;

    // The request line carries the path only; the guest's Host header names the server.
    let path = request
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    *request.uri_mut() = http::Uri::builder()
        .path_and_query(path)
        .build()
        .map_err(|_| HttpError::HttpRequestUriInvalid)?;

    // The connection must be driven while the response head is awaited.
    let mut conn = Box::pin(conn);
    let mut conn_done = false;
    let response = async {
        tokio::time::timeout(first_byte_timeout, sender.send_request(request))
            .await
            .map_err(|_| HttpError::ConnectionReadTimeout)?
            .map_err(HttpError::from)
    };
    tokio::pin!(response);
    let response = loop {
        tokio::select! {
            r = &mut response => break r?,
            c = &mut conn, if !conn_done => {
                conn_done = true;
                c.map_err(HttpError::from)?;
            }
        }
    };
    let io = async move {
        if !conn_done {
            conn.await.map_err(|e| {
                if e.is_timeout() {
                    HttpError::HttpResponseTimeout
                } else {
                    HttpError::from(e)
                }
            })?;
        }
        Ok(())
    };
    let response = response.map(|incoming| {
        Paced {
            incoming,
            between: between_bytes,
            deadline: Box::pin(tokio::time::sleep(between_bytes)),
        }
        .boxed_unsync()
    });
    Ok((response, Box::new(io)))
}

/// A connection to send a request over: plain TCP, or TLS on it.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static> Io for T {}

/// A response body that fails when the server pauses longer than the guest allows
/// between two frames.
struct Paced {
    incoming: hyper::body::Incoming,
    between: Duration,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl hyper::body::Body for Paced {
    type Data = Bytes;
    type Error = HttpError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, HttpError>>> {
        match Pin::new(&mut self.incoming).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let next = tokio::time::Instant::now() + self.between;
                self.deadline.as_mut().reset(next);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(if e.is_timeout() {
                HttpError::HttpResponseTimeout
            } else {
                HttpError::from(e)
            }))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => match self.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(HttpError::ConnectionReadTimeout))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.incoming.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.incoming.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_name_verified_is_the_one_the_guest_used() {
        assert_eq!(
            server_name("10.96.0.1").unwrap(),
            ServerName::from(std::net::IpAddr::from([10, 96, 0, 1]))
        );
        assert_eq!(
            server_name("[::1]").unwrap(),
            ServerName::from(std::net::Ipv6Addr::LOCALHOST)
        );
        assert_eq!(
            server_name("kubernetes.default.svc").unwrap(),
            ServerName::try_from("kubernetes.default.svc").unwrap()
        );
        assert!(server_name("bad name").is_err());
    }

    #[test]
    fn an_extra_ca_that_is_not_pem_is_refused() {
        assert!(client_config(&[]).is_ok());
        assert!(client_config(&[b"not a certificate".to_vec()]).is_err());
    }
}
