//! A client-side load balancer over the API servers, as k3s's agent keeps one: a node
//! talks to `127.0.0.1:PORT`, and each connection is carried to a member that accepts
//! it, so that the node goes on when the member it used dies.
//!
//! It works at the TCP level: TLS is end to end between the client and the member, whose
//! serving certificate names 127.0.0.1 as every member's does. A connection goes to the
//! member that last accepted one; when that member does not accept within
//! [`CONNECT_TIMEOUT`], the next is tried, and so on round the list.
//!
//! A member that accepts but does not serve (a stopped process still accepts TCP, and so
//! does one whose TLS is broken) is passed over too: the balancer keeps the client's
//! first TLS record (its ClientHello), and a member that does not answer it within
//! [`CONNECT_TIMEOUT`], or answers with a TLS alert, is left for the next, to which the
//! same record is sent again. The list is the one
//! given at start, and [`Balancer::set_servers`] replaces it (a node learns the members
//! from the `kubernetes` EndpointSlice).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tracing::Instrument;

/// How long a member has to accept a connection before the next one is tried.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum BalancerError {
    #[error("a load balancer needs at least one server")]
    NoServers,
    #[error("cannot listen on 127.0.0.1")]
    Listen(#[source] std::io::Error),
}

#[derive(Debug, Default)]
struct Servers {
    /// `host:port` of each member.
    list: Vec<String>,
    /// The one that accepted last.
    current: usize,
}

/// The load balancer; dropping it stops it.
#[derive(Debug)]
pub struct Balancer {
    addr: std::net::SocketAddr,
    servers: Arc<Mutex<Servers>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Balancer {
    /// Listens on a free port of 127.0.0.1 and carries connections to `servers`
    /// (`host:port` each).
    pub async fn start(servers: Vec<String>) -> Result<Self, BalancerError> {
        if servers.is_empty() {
            return Err(BalancerError::NoServers);
        }
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(BalancerError::Listen)?;
        let addr = listener.local_addr().map_err(BalancerError::Listen)?;
        let servers = Arc::new(Mutex::new(Servers {
            list: servers,
            current: 0,
        }));
        let task = tokio::spawn(serve(listener, servers.clone()));
        Ok(Self {
            addr,
            servers,
            task,
        })
    }

    /// Where clients connect.
    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// The members now, as `host:port`.
    pub fn servers(&self) -> Vec<String> {
        self.servers.lock().expect("servers lock").list.clone()
    }

    /// Replaces the members (an empty list is ignored: better a stale list than none).
    /// The one in use stays first choice if it is still listed.
    pub fn set_servers(&self, mut list: Vec<String>) {
        if list.is_empty() {
            return;
        }
        list.sort();
        list.dedup();
        let mut s = self.servers.lock().expect("servers lock");
        if s.list == list {
            return;
        }
        let using = s.list.get(s.current).cloned();
        s.current = using
            .and_then(|u| list.iter().position(|x| *x == u))
            .unwrap_or(0);
        tracing::info!(servers = ?list, "API servers");
        s.list = list;
    }
}

async fn serve(listener: TcpListener, servers: Arc<Mutex<Servers>>) {
    loop {
        let (client, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "balancer: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let servers = servers.clone();
        tokio::spawn(
            async move {
                let mut client = client;
                let _ = client.set_nodelay(true);
                let Some(mut upstream) = carry(&mut client, &servers).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            }
            .instrument(tracing::debug_span!("api_balancer", %peer)),
        );
    }
}

/// The first TLS record type of a handshake, and of an alert.
const TLS_HANDSHAKE: u8 = 0x16;
const TLS_ALERT: u8 = 0x15;
/// The largest TLS record (2^14 bytes of payload, plus expansion and the header).
const MAX_RECORD: usize = (1 << 14) + 2048 + 5;

/// A connection to a member that serves `client`: its first TLS record is sent, and
/// answered by something other than an alert, before the member is kept. A client
/// that does not begin with a TLS record (or waits for the server to speak first) is
/// carried to the first member that accepts.
async fn carry(client: &mut TcpStream, servers: &Mutex<Servers>) -> Option<TcpStream> {
    let (list, start) = {
        let s = servers.lock().expect("servers lock");
        (s.list.clone(), s.current)
    };
    // The client's first record: not known yet, none (not TLS), or the record.
    let mut hello: Option<Option<Vec<u8>>> = None;
    for i in 0..list.len() {
        let at = (start + i) % list.len();
        let server = &list[at];
        let Some(mut upstream) = connect_one(server).await else {
            continue;
        };
        if hello.is_none() {
            let first = tokio::time::timeout(Duration::from_secs(60), async {
                tokio::select! {
                    r = first_record(client) => r.map(Some),
                    // The member speaks first: nothing to check, nothing to keep.
                    r = upstream.readable() => r.map(|()| None),
                }
            })
            .await;
            match first {
                Ok(Ok(Some(record))) => hello = Some(record),
                Ok(Ok(None)) => return Some(upstream),
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "balancer: the client sent nothing usable");
                    return None;
                }
                Err(_) => return None,
            }
        }
        if let Some(Some(record)) = &hello {
            if !answers(&mut upstream, record, client).await {
                tracing::debug!(server = %server, "API server did not answer the TLS handshake");
                continue;
            }
        }
        if i > 0 {
            tracing::info!(server = %server, "API server failover");
            let mut s = servers.lock().expect("servers lock");
            if s.list == list {
                s.current = at;
            }
        }
        return Some(upstream);
    }
    tracing::warn!(servers = ?list, "no API server serves connections");
    None
}

/// The client's first TLS record, whole; None if it does not begin with one.
async fn first_record(client: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    use tokio::io::AsyncReadExt;
    let mut head = [0u8; 5];
    let peeked = client.peek(&mut head).await?;
    if peeked == 0 || head[0] != TLS_HANDSHAKE {
        return Ok(None);
    }
    client.read_exact(&mut head).await?;
    let len = 5 + usize::from(u16::from_be_bytes([head[3], head[4]]));
    if len > MAX_RECORD {
        return Err(std::io::Error::other("oversized TLS record"));
    }
    let mut record = vec![0u8; len];
    record[..5].copy_from_slice(&head);
    client.read_exact(&mut record[5..]).await?;
    Ok(Some(record))
}

/// Sends `hello` to `upstream` and waits for its first bytes; true (and those bytes
/// passed on to `client`) unless it stays silent for [`CONNECT_TIMEOUT`], closes, or
/// answers with an alert.
async fn answers(upstream: &mut TcpStream, hello: &[u8], client: &mut TcpStream) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        upstream.write_all(hello).await?;
        let mut buf = vec![0u8; 16 * 1024];
        let n = upstream.read(&mut buf).await?;
        Ok::<_, std::io::Error>(buf[..n].to_vec())
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, exchange).await {
        Ok(Ok(first)) if !first.is_empty() && first[0] != TLS_ALERT => {
            client.write_all(&first).await.is_ok()
        }
        _ => false,
    }
}

/// A connection to `server`, if it accepts one within [`CONNECT_TIMEOUT`].
async fn connect_one(server: &str) -> Option<TcpStream> {
    match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(server)).await {
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            Some(stream)
        }
        Ok(Err(e)) => {
            tracing::debug!(server = %server, error = %e, "API server refused");
            None
        }
        Err(_) => {
            tracing::debug!(server = %server, "API server did not answer");
            None
        }
    }
}

/// `host:port` of an `https://host:port[/...]` URL (port 443 if none).
pub fn host_port(url: &str) -> Option<String> {
    let rest = url.strip_prefix("https://")?;
    let authority = rest.split('/').next()?;
    if authority.is_empty() {
        return None;
    }
    let has_port = match authority.rsplit_once(':') {
        Some((h, p)) => !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && !h.ends_with('['),
        None => false,
    } && !authority.ends_with(']');
    Some(if has_port {
        authority.to_string()
    } else {
        format!("{authority}:443")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A server that answers each connection with its name.
    async fn named(name: &'static str) -> (String, tokio::task::JoinHandle<()>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let task = tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                let _ = s.write_all(name.as_bytes()).await;
            }
        });
        (addr, task)
    }

    async fn ask(b: &Balancer) -> String {
        let mut s = TcpStream::connect(b.local_addr()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn connections_fail_over_to_a_member_that_accepts() {
        let (a, a_task) = named("a").await;
        let (b, _b_task) = named("b").await;
        let bal = Balancer::start(vec![a.clone(), b.clone()]).await.unwrap();
        assert_eq!(ask(&bal).await, "a");
        a_task.abort();
        // Let the abort close the listener.
        let _ = a_task.await;
        assert_eq!(ask(&bal).await, "b");
        // It stays with the member that answered.
        assert_eq!(ask(&bal).await, "b");
        bal.set_servers(vec![b.clone()]);
        assert_eq!(bal.servers(), vec![b]);
        assert_eq!(ask(&bal).await, "b");
    }

    /// A server that answers a TLS-like record with `name` and the record's length.
    async fn tls_like(name: &'static str) -> String {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut head = [0u8; 5];
                    if s.read_exact(&mut head).await.is_err() {
                        return;
                    }
                    let len = u16::from_be_bytes([head[3], head[4]]) as usize;
                    let mut body = vec![0u8; len];
                    let _ = s.read_exact(&mut body).await;
                    let _ = s.write_all(format!("{name}:{len}").as_bytes()).await;
                });
            }
        });
        addr
    }

    /// A server that accepts and never answers (a stopped process, as the kernel accepts
    /// for it), or answers with a TLS alert (a broken TLS setup).
    async fn silent(alert: bool) -> (String, tokio::task::JoinHandle<()>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                if alert {
                    let _ = s.write_all(&[TLS_ALERT, 3, 3, 0, 2, 2, 40]).await;
                }
                held.push(s);
            }
        });
        (addr, task)
    }

    async fn hello(b: &Balancer) -> String {
        let mut s = TcpStream::connect(b.local_addr()).await.unwrap();
        s.write_all(&[TLS_HANDSHAKE, 3, 1, 0, 3, b'h', b'i', b'!'])
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn members_that_accept_but_do_not_serve_are_passed_over() {
        let (hung, _h) = silent(false).await;
        let (broken, _b) = silent(true).await;
        let good = tls_like("good").await;
        let bal = Balancer::start(vec![hung.clone(), broken.clone(), good.clone()])
            .await
            .unwrap();
        // Sorted by set_servers only; start() keeps the order given: hung first.
        let started = std::time::Instant::now();
        assert_eq!(
            hello(&bal).await,
            "good:3",
            "the whole record reached the member"
        );
        assert!(started.elapsed() < CONNECT_TIMEOUT * 3);
        // The member that served stays first choice.
        let again = std::time::Instant::now();
        assert_eq!(hello(&bal).await, "good:3");
        assert!(again.elapsed() < CONNECT_TIMEOUT);
    }

    #[test]
    fn urls_give_host_and_port() {
        assert_eq!(host_port("https://10.0.0.1:6443").unwrap(), "10.0.0.1:6443");
        assert_eq!(
            host_port("https://api.example/").unwrap(),
            "api.example:443"
        );
        assert_eq!(host_port("https://[::1]:6443").unwrap(), "[::1]:6443");
        assert_eq!(host_port("https://[::1]").unwrap(), "[::1]:443");
        assert!(host_port("http://x:1").is_none());
    }
}
