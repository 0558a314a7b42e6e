//! One localhost for a pod's components and containers.
//!
//! A pod's components listen on the node's loopback, at the pod's address; its OCI
//! containers listen in the pod's network namespace, where the same address is on the
//! namespace's own loopback. [`PodPorts`] joins the two for the ports the pod declares,
//! both ways:
//! - a component's port P gets a listener in the namespace (on every address there, so
//!   `localhost:P` and `POD-IP:P` inside), which carries each connection to the
//!   component;
//! - a container's declared port P gets a listener on the node at `POD-IP:P`, which
//!   carries each connection into the namespace. Components reach it at `localhost:P`
//!   (the sandbox rewrites `localhost` to the pod's address), and so do the node's
//!   Service proxy, port-forward and probes.
//!
//! A port a container uses without declaring it is reachable inside the namespace only.
//! Every connection is one more hop through the node, whose cost `docs/benchmarks.md`
//! reports; pods of components only have no namespace and no joins.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use crate::netns::NetNs;

/// The joins of one pod; dropping it closes every listener and connection they made.
#[derive(Debug)]
pub struct PodPorts {
    ip: Ipv4Addr,
    netns: Option<Arc<NetNs>>,
    /// Components' ports, joined into the namespace once there is one.
    wasm: Vec<u16>,
    joined: JoinSet<()>,
}

impl PodPorts {
    pub fn new(ip: Ipv4Addr) -> Self {
        Self {
            ip,
            netns: None,
            wasm: Vec::new(),
            joined: JoinSet::new(),
        }
    }

    /// A component listens on `port`.
    pub async fn component(&mut self, port: u16) {
        if self.wasm.contains(&port) {
            return;
        }
        self.wasm.push(port);
        if let Some(ns) = self.netns.clone() {
            self.join_into_namespace(&ns, port).await;
        }
    }

    /// The pod has its namespace now: the components' ports are joined into it.
    pub async fn namespace(&mut self, ns: Arc<NetNs>) {
        if self.netns.is_some() {
            return;
        }
        self.netns = Some(ns.clone());
        for port in self.wasm.clone() {
            self.join_into_namespace(&ns, port).await;
        }
    }

    async fn join_into_namespace(&mut self, ns: &NetNs, port: u16) {
        match ns.listen(SocketAddr::from(([0, 0, 0, 0], port))).await {
            Ok(listener) => {
                let to = SocketAddr::from((self.ip, port));
                self.joined
                    .spawn(forward(listener, move || Box::pin(TcpStream::connect(to))));
            }
            Err(e) => {
                tracing::warn!(port, error = %e, "joining a component's port into the pod's namespace")
            }
        }
    }

    /// A container declares `port`: the node's side of the pod reaches it.
    pub async fn container(&mut self, port: u16) {
        let Some(ns) = self.netns.clone() else {
            return;
        };
        match TcpListener::bind(SocketAddr::from((self.ip, port))).await {
            Ok(listener) => {
                let to = SocketAddr::from((ns.ip(), port));
                self.joined.spawn(forward(listener, move || {
                    let ns = ns.clone();
                    Box::pin(async move { ns.connect(to).await })
                }));
            }
            // A port the pod's components already hold, or a restart's: joined already.
            Err(e) => tracing::debug!(port, error = %e, "joining a container's port to the node"),
        }
    }
}

type Dial = std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<TcpStream>> + Send>>;

/// Carries each connection `listener` accepts to what `dial` opens, until dropped.
async fn forward(listener: TcpListener, dial: impl Fn() -> Dial + Send + Sync + 'static) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((mut inbound, _)) = accepted else {
                    // Out of descriptors, say: give the node a moment rather than spin.
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                };
                let out = dial();
                conns.spawn(async move {
                    if let Ok(mut out) = out.await {
                        let _ = inbound.set_nodelay(true);
                        let _ = out.set_nodelay(true);
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}
