//! Liveness, readiness and startup probes against a pod's address: `httpGet` and
//! `tcpSocket`. (`exec` and `grpc` have no meaning for a Wasm component and fail with a
//! message saying so; an OCI container's `exec` probe is run by its sandbox.)

use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use k8s_openapi::api::core::v1::{Container, HTTPGetAction, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// Which probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Startup,
    Liveness,
    Readiness,
}

/// A probe's schedule and its run of results.
#[derive(Debug, Clone)]
pub struct Prober {
    pub kind: Kind,
    probe: Probe,
    next: Instant,
    successes: i32,
    failures: i32,
    /// The verdict once thresholds are met: None until the first verdict.
    pub passing: Option<bool>,
    pub last_message: String,
}

fn port_of(p: &IntOrString, c: &Container) -> Option<u16> {
    match p {
        IntOrString::Int(i) => u16::try_from(*i).ok(),
        IntOrString::String(name) => c
            .ports
            .iter()
            .flatten()
            .find(|cp| cp.name.as_deref() == Some(name))
            .and_then(|cp| u16::try_from(cp.container_port).ok()),
    }
}

impl Prober {
    pub fn new(kind: Kind, probe: Probe, started: Instant) -> Self {
        let delay = probe.initial_delay_seconds.unwrap_or(0).max(0) as u64;
        Self {
            kind,
            probe,
            next: started + Duration::from_secs(delay),
            successes: 0,
            failures: 0,
            passing: None,
            last_message: String::new(),
        }
    }

    pub fn due(&self, now: Instant) -> bool {
        now >= self.next
    }

    pub fn next_at(&self) -> Instant {
        self.next
    }

    /// The probe this prober runs.
    pub fn probe(&self) -> &Probe {
        &self.probe
    }

    /// Awaits one attempt (within the probe's timeout) and counts its result; returns the
    /// verdict if it changed. The next attempt is due one period from now.
    pub async fn run(
        &mut self,
        attempt: impl Future<Output = Result<(), ProbeError>>,
    ) -> Option<bool> {
        let period = self.probe.period_seconds.unwrap_or(10).max(1) as u64;
        self.next = Instant::now() + Duration::from_secs(period);
        let timeout = Duration::from_secs(self.probe.timeout_seconds.unwrap_or(1).max(1) as u64);
        let result = tokio::time::timeout(timeout, attempt)
            .await
            .unwrap_or(Err(ProbeError::TimedOut(timeout.as_secs())));
        let before = self.passing;
        match result {
            Ok(()) => {
                self.failures = 0;
                self.successes += 1;
                let need = self.probe.success_threshold.unwrap_or(1).max(1);
                if self.successes >= need {
                    self.passing = Some(true);
                }
            }
            Err(err) => {
                self.successes = 0;
                self.failures += 1;
                self.last_message = baton_kube::error::chain(&err);
                let need = self.probe.failure_threshold.unwrap_or(3).max(1);
                if self.failures >= need {
                    self.passing = Some(false);
                }
            }
        }
        (self.passing != before).then_some(self.passing).flatten()
    }
}

/// Why one probe attempt failed; the message is what `kubectl describe` shows.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("probe names port {0:?}, which the container does not declare")]
    NoPort(String),
    #[error("dial tcp {addr}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Get \"{url}\": TLS handshake")]
    Tls {
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Get \"{url}\"")]
    Http {
        url: String,
        #[source]
        source: hyper::Error,
    },
    #[error("invalid probe request for \"{url}\"")]
    Request {
        url: String,
        #[source]
        source: http::Error,
    },
    #[error("HTTP probe failed with statuscode: {0}")]
    Status(u16),
    #[error("timed out after {0}s")]
    TimedOut(u64),
    #[error("only httpGet and tcpSocket probes are supported for Wasm components")]
    Unsupported,
    #[error("command failed: {0}")]
    Exec(String),
    #[error("command exited with code {0}")]
    ExitCode(i32),
}

fn port_or_err(p: &IntOrString, c: &Container) -> Result<u16, ProbeError> {
    port_of(p, c).ok_or_else(|| {
        ProbeError::NoPort(match p {
            IntOrString::Int(i) => i.to_string(),
            IntOrString::String(s) => s.clone(),
        })
    })
}

pub async fn check(p: &Probe, ip: IpAddr, c: &Container) -> Result<(), ProbeError> {
    check_via(p, ip, c, &from_the_node).await
}

/// A connection from the node's own network.
fn from_the_node(
    host: String,
    port: u16,
) -> futures::future::BoxFuture<'static, std::io::Result<tokio::net::TcpStream>> {
    Box::pin(async move { tokio::net::TcpStream::connect((host.as_str(), port)).await })
}

/// Opens the TCP connections a probe makes: from the node's network, or from inside a
/// pod's network namespace.
pub type Dial<'a> = &'a (dyn Fn(
    String,
    u16,
) -> futures::future::BoxFuture<'static, std::io::Result<tokio::net::TcpStream>>
         + Send
         + Sync);

/// [`check`], with connections opened by `dial`.
pub async fn check_via(
    p: &Probe,
    ip: IpAddr,
    c: &Container,
    dial: Dial<'_>,
) -> Result<(), ProbeError> {
    if let Some(h) = &p.http_get {
        return http_get_via(h, ip, port_or_err(&h.port, c)?, dial).await;
    }
    if let Some(t) = &p.tcp_socket {
        let port = port_or_err(&t.port, c)?;
        let host = t.host.clone().unwrap_or_else(|| ip.to_string());
        return dial(host.clone(), port)
            .await
            .map(|_| ())
            .map_err(|source| ProbeError::Connect {
                addr: format!("{host}:{port}"),
                source,
            });
    }
    Err(ProbeError::Unsupported)
}

#[cfg(test)]
async fn http_get(h: &HTTPGetAction, ip: IpAddr, port: u16) -> Result<(), ProbeError> {
    http_get_via(h, ip, port, &from_the_node).await
}

/// An `httpGet` probe, as the kubelet makes it: to the pod's IP (or `host`), with its
/// `httpHeaders` (which may replace Host and User-Agent), over TLS without verifying the
/// certificate when the scheme is HTTPS; any status from 200 to 399 passes. Only the
/// response head is read: the body, however large or slow, does not matter.
async fn http_get_via(
    h: &HTTPGetAction,
    ip: IpAddr,
    port: u16,
    dial: Dial<'_>,
) -> Result<(), ProbeError> {
    let host = h.host.clone().unwrap_or_else(|| ip.to_string());
    let https = h
        .scheme
        .as_deref()
        .is_some_and(|s| s.eq_ignore_ascii_case("https"));
    let mut path = h.path.clone().unwrap_or_default();
    if !path.starts_with('/') {
        path.insert(0, '/');
    }
    let authority = match host.parse::<IpAddr>() {
        Ok(IpAddr::V6(v6)) => format!("[{v6}]:{port}"),
        _ => format!("{host}:{port}"),
    };
    let url = format!(
        "{}://{authority}{path}",
        if https { "https" } else { "http" }
    );
    let mut req = http::Request::get(path.as_str())
        .header(http::header::HOST, &authority)
        .header(http::header::USER_AGENT, "kube-probe/1.33")
        .header(http::header::ACCEPT, "*/*");
    for hdr in h.http_headers.iter().flatten() {
        // A probe's header replaces the default of the same name, as the kubelet's does.
        if let Some(headers) = req.headers_mut() {
            if let Ok(name) = http::HeaderName::from_bytes(hdr.name.as_bytes()) {
                headers.remove(&name);
            }
        }
        req = req.header(hdr.name.as_str(), hdr.value.as_str());
    }
    let req = req
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(|source| ProbeError::Request {
            url: url.clone(),
            source,
        })?;
    let tcp = dial(host.clone(), port)
        .await
        .map_err(|source| ProbeError::Connect {
            addr: authority.clone(),
            source,
        })?;
    let status = if https {
        let name = rustls::pki_types::ServerName::try_from(host.clone())
            .unwrap_or_else(|_| rustls::pki_types::ServerName::IpAddress(ip.into()));
        let tls = tokio_rustls::TlsConnector::from(insecure_tls())
            .connect(name, tcp)
            .await
            .map_err(|source| ProbeError::Tls {
                url: url.clone(),
                source,
            })?;
        send(hyper_util::rt::TokioIo::new(tls), req, &url).await?
    } else {
        send(hyper_util::rt::TokioIo::new(tcp), req, &url).await?
    };
    if (200..400).contains(&status) {
        Ok(())
    } else {
        Err(ProbeError::Status(status))
    }
}

async fn send<IO>(
    io: IO,
    req: http::Request<http_body_util::Empty<bytes::Bytes>>,
    url: &str,
) -> Result<u16, ProbeError>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let http = |source| ProbeError::Http {
        url: url.to_string(),
        source,
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(http)?;
    // The connection is driven here, beside the request, and dropped with it: the
    // response's body is never read.
    let conn = async move {
        let _ = conn.await;
        std::future::pending::<()>().await
    };
    tokio::select! {
        resp = sender.send_request(req) => Ok(resp.map_err(http)?.status().as_u16()),
        () = conn => unreachable!("pending"),
    }
}

/// The kubelet's HTTPS probes skip certificate verification (a pod's certificate names
/// its Service, not its IP); the handshake's signatures are still checked. A joining
/// node or member uses it too, for the one request whose answer (the cluster CA) it
/// checks against its token.
pub fn insecure_tls() -> Arc<rustls::ClientConfig> {
    static CONFIG: std::sync::OnceLock<Arc<rustls::ClientConfig>> = std::sync::OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .expect("ring supports the default protocol versions")
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
                .with_no_client_auth();
            Arc::new(config)
        })
        .clone()
}

#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The probers a container asks for.
pub fn for_container(c: &Container, started: Instant) -> Vec<Prober> {
    [
        (Kind::Startup, &c.startup_probe),
        (Kind::Liveness, &c.liveness_probe),
        (Kind::Readiness, &c.readiness_probe),
    ]
    .into_iter()
    .filter_map(|(k, p)| p.clone().map(|p| Prober::new(k, p, started)))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::HTTPHeader;
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

    /// Reads a request head (bounded), answers `response` one byte per write, and
    /// returns the head it got.
    async fn answer<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, response: &[u8]) -> String {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
            if s.read(&mut byte).await.unwrap_or(0) == 0 {
                break;
            }
            head.push(byte[0]);
        }
        for b in response {
            if s.write_all(&[*b]).await.is_err() {
                break;
            }
            let _ = s.flush().await;
        }
        String::from_utf8_lossy(&head).into_owned()
    }

    /// A server for one request; returns its port and the request head it will see.
    async fn serve_once(response: &'static str) -> (u16, tokio::task::JoinHandle<String>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            answer(s, response.as_bytes()).await
        });
        (port, task)
    }

    fn get(port: u16) -> HTTPGetAction {
        HTTPGetAction {
            port: IntOrString::Int(port.into()),
            path: Some("/healthz".into()),
            ..Default::default()
        }
    }

    const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    #[tokio::test]
    async fn a_response_in_one_byte_pieces_passes() {
        let (port, head) = serve_once("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
        http_get(&get(port), LOCAL, port).await.unwrap();
        let head = head.await.unwrap();
        assert!(head.starts_with("GET /healthz HTTP/1.1\r\n"), "{head}");
        assert!(head.contains("user-agent: kube-probe/"), "{head}");
    }

    #[tokio::test]
    async fn statuses_from_200_to_399_pass_and_others_fail() {
        for (resp, ok) in [
            ("HTTP/1.1 204 No Content\r\n\r\n", true),
            (
                "HTTP/1.1 302 Found\r\nlocation: /x\r\ncontent-length: 0\r\n\r\n",
                true,
            ),
            ("HTTP/1.1 399 Whatever\r\ncontent-length: 0\r\n\r\n", true),
            (
                "HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n",
                false,
            ),
            (
                "HTTP/1.1 503 Unavailable\r\ncontent-length: 0\r\n\r\n",
                false,
            ),
        ] {
            let (port, _) = serve_once(resp).await;
            let got = http_get(&get(port), LOCAL, port).await;
            assert_eq!(got.is_ok(), ok, "{resp:?}: {got:?}");
            if !ok {
                assert!(matches!(got, Err(ProbeError::Status(_))), "{got:?}");
            }
        }
        // Garbage is an HTTP error, not a pass and not a panic.
        let (port, _) = serve_once("SSH-2.0-OpenSSH\r\n\r\n").await;
        let got = http_get(&get(port), LOCAL, port).await;
        assert!(matches!(got, Err(ProbeError::Http { .. })), "{got:?}");
    }

    #[tokio::test]
    async fn probe_headers_are_sent_and_replace_the_defaults() {
        let (port, head) = serve_once("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await;
        let mut h = get(port);
        h.http_headers = Some(vec![
            HTTPHeader {
                name: "X-Probe".into(),
                value: "yes".into(),
            },
            HTTPHeader {
                name: "Host".into(),
                value: "web.example".into(),
            },
        ]);
        http_get(&h, LOCAL, port).await.unwrap();
        let head = head.await.unwrap().to_ascii_lowercase();
        assert!(head.contains("x-probe: yes\r\n"), "{head}");
        assert!(head.contains("host: web.example\r\n"), "{head}");
        assert_eq!(head.matches("host:").count(), 1, "{head}");
    }

    #[tokio::test]
    async fn https_probes_skip_verification_of_a_self_signed_certificate() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["web.example".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let tls = acceptor.accept(s).await.unwrap();
            answer(tls, b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await
        });
        let mut h = get(port);
        h.scheme = Some("HTTPS".into());
        http_get(&h, LOCAL, port).await.unwrap();
        assert!(server.await.unwrap().starts_with("GET /healthz"));
        // A plain HTTP server is no TLS server.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                .await;
        });
        let mut h = get(port);
        h.scheme = Some("HTTPS".into());
        let got = http_get(&h, LOCAL, port).await;
        assert!(matches!(got, Err(ProbeError::Tls { .. })), "{got:?}");
    }

    #[tokio::test]
    async fn a_server_that_never_answers_times_out_with_the_probe_timeout() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let _hold = tokio::spawn(async move {
            let (_s, _) = l.accept().await.unwrap();
            std::future::pending::<()>().await
        });
        let probe = Probe {
            http_get: Some(get(port)),
            timeout_seconds: Some(1),
            failure_threshold: Some(1),
            ..Default::default()
        };
        let mut p = Prober::new(Kind::Liveness, probe.clone(), Instant::now());
        let t0 = Instant::now();
        let c = Container::default();
        assert_eq!(p.run(check(&probe, LOCAL, &c)).await, Some(false));
        assert_eq!(p.last_message, "timed out after 1s");
        assert!(t0.elapsed() < Duration::from_secs(3));
    }

    #[tokio::test]
    async fn a_named_port_must_be_declared() {
        let probe = Probe {
            tcp_socket: Some(k8s_openapi::api::core::v1::TCPSocketAction {
                port: IntOrString::String("http".into()),
                ..Default::default()
            }),
            failure_threshold: Some(1),
            ..Default::default()
        };
        let mut p = Prober::new(Kind::Readiness, probe.clone(), Instant::now());
        let c = Container::default();
        assert_eq!(p.run(check(&probe, LOCAL, &c)).await, Some(false));
        assert!(p.last_message.contains("\"http\""), "{}", p.last_message);
    }
}
