//! A client-side load balancer over the API servers, as k3s's agent keeps one: a node
//! talks to `127.0.0.1:PORT`, and each connection is carried to a member that accepts
//! it, so that the node goes on when the member it used dies.
//!
//! It works at the TCP level: TLS is end to end between the client and the member, whose
//! serving certificate names 127.0.0.1 as every member's does. A connection goes to the
//! member that last accepted one; when that member does not answer within
//! [`CONNECT_TIMEOUT`], the next is tried, and so on round the list. The list is the one
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
                let Some(mut upstream) = connect(&servers).await else {
                    return;
                };
                let mut client = client;
                let _ = client.set_nodelay(true);
                let _ = upstream.set_nodelay(true);
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            }
            .instrument(tracing::debug_span!("api_balancer", %peer)),
        );
    }
}

/// A connection to the first member that accepts one, starting from the last that did.
async fn connect(servers: &Mutex<Servers>) -> Option<TcpStream> {
    let (list, start) = {
        let s = servers.lock().expect("servers lock");
        (s.list.clone(), s.current)
    };
    for i in 0..list.len() {
        let at = (start + i) % list.len();
        let server = &list[at];
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(server.as_str())).await {
            Ok(Ok(stream)) => {
                if i > 0 {
                    tracing::info!(server = %server, "API server failover");
                    let mut s = servers.lock().expect("servers lock");
                    if s.list == list {
                        s.current = at;
                    }
                }
                return Some(stream);
            }
            Ok(Err(e)) => tracing::debug!(server = %server, error = %e, "API server refused"),
            Err(_) => tracing::debug!(server = %server, "API server did not answer"),
        }
    }
    tracing::warn!(servers = ?list, "no API server accepts connections");
    None
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
