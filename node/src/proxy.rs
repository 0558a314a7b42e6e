//! Service routing and service names for the node's pods: kube-proxy's and CoreDNS's jobs.
//!
//! ## Routing
//! Every Service port gets listeners on the node, which balance round-robin over the
//! ready endpoints of the Service's EndpointSlices, on any node:
//! - **TCP**: each connection goes to one endpoint, and bytes are copied both ways. One
//!   L4 path serves HTTP and raw TCP alike.
//! - **UDP**: each client (its address and port) is a flow, which keeps its endpoint for
//!   as long as it talks ([`crate::tunnel::UDP_IDLE`]): the endpoint's replies go back to
//!   the client from the address it sent to, as conntrack does for kube-proxy. A
//!   listener keeps [`MAX_FLOWS`] flows at most; datagrams for a port without a ready
//!   endpoint are dropped.
//! - An endpoint on **another node** is reached through a tunnel to that node
//!   ([`crate::tunnel`]): pod addresses are loopback addresses of their own node.
//! - **ClusterIP**: a ClusterIP `10.96.A.B` is served at the loopback address
//!   `127.96.A.B` on the Service's port. Pods reach it by name or by ClusterIP: the pod's
//!   network (wasm-shim) maps both to that address. On a node that runs OCI containers it
//!   is served at the ClusterIP itself too, which the node's local route for the Service
//!   range makes the node's own: a container pod reaches it through the bridge.
//! - **NodePort**: served on the node's address at the node port, reachable from the host.
//! - **Scaled to zero**: a connection to a Service without a ready endpoint is refused,
//!   as kube-proxy does, unless the Service's workload is one an autoscaler scales to
//!   zero: then the connection is held while the node wakes the workload
//!   ([`crate::activator`]), and forwarded to its first ready endpoint ([`Services::hold`]).
//!
//! Listeners set `SO_REUSEPORT`, so several node agents on one host (a test cluster) can
//! all serve the same Service addresses.
//!
//! ## Names
//! [`Services::resolver`] gives a pod's name resolver: `svc` (in the pod's namespace),
//! `svc.ns`, `svc.ns.svc` and `svc.ns.svc.cluster.local` resolve to the Service's address,
//! and so does its ClusterIP; a headless Service's names resolve to a ready pod's address,
//! and `pod.svc…` (a pod whose hostname is `pod` and subdomain `svc`, as a StatefulSet's
//! are) to that pod's. Other names go to the host's resolver.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use baton_wasm_shim::NameResolver;
use bytes::Bytes;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, ResourceExt};
use tokio::task::JoinHandle;

use crate::tunnel::{Io, Link, Protocol};

const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// One Service port as the node serves it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Port {
    name: String,
    protocol: Protocol,
    port: u16,
    node_port: Option<u16>,
    /// Its `targetPort`: what a standby of its workload must serve
    /// ([`crate::standby`]).
    target: Option<IntOrString>,
}

#[derive(Debug, Default)]
struct Entry {
    cluster_ip: Option<Ipv4Addr>,
    local_ip: Option<Ipv4Addr>,
    ports: Vec<Port>,
    /// Ready endpoints per port name.
    endpoints: HashMap<String, Vec<SocketAddr>>,
    /// Ready endpoint addresses, whatever the ports (a headless Service may have none).
    addresses: Vec<IpAddr>,
    /// Ready endpoints that have a hostname under the Service (a StatefulSet's pods).
    hostnames: HashMap<String, IpAddr>,
    /// The Service's pod selector: which workload a held request wakes.
    selector: BTreeMap<String, String>,
}

/// Requests and connections held at once for workloads coming up from zero, over all
/// Services: beyond it, they are refused at once rather than piling up.
const MAX_HELD: usize = 4096;

#[derive(Debug, Default)]
struct Table {
    services: HashMap<(String, String), Entry>,
    by_cluster_ip: HashMap<Ipv4Addr, Ipv4Addr>,
    /// Ready endpoints' addresses on other nodes, and their node: reached through it.
    remote: HashMap<IpAddr, Arc<str>>,
    /// Ready endpoints on this node, by protocol: what another node may tunnel to.
    exits: HashSet<(Protocol, SocketAddr)>,
    /// Ready endpoints of headless Services on other nodes, by protocol.
    remote_pods: BTreeSet<(Protocol, SocketAddr)>,
}

/// This node's place in the Service network.
#[derive(Debug, Clone)]
pub struct Here {
    /// Its name: endpoints on other nodes are reached through them.
    pub name: String,
    /// Where NodePorts are served.
    pub address: IpAddr,
    /// Where datagrams to a pod leave from: an address of the node (its pod range's
    /// first), not 127.0.0.1, which a pod's reply would take for its own.
    pub source: IpAddr,
    /// Tunnels to other nodes.
    pub link: Arc<Link>,
}

/// Where the node serves a ClusterIP: `10.96.A.B` at `127.96.A.B`.
pub fn local_address(cluster_ip: Ipv4Addr) -> Ipv4Addr {
    let o = cluster_ip.octets();
    Ipv4Addr::new(127, 96, o[2], o[3])
}

/// The node's Services: the routing table, its listeners, and the names they answer to.
#[derive(Clone)]
pub struct Services {
    table: Arc<RwLock<Table>>,
    here: Arc<Here>,
    /// Pods of this node shutting down: no new connections go to them, even before
    /// their EndpointSlices say so.
    draining: Arc<RwLock<HashSet<IpAddr>>>,
    /// Whether Services are served at their ClusterIPs too.
    cluster_ips: bool,
    /// Bumped at every rebuild of the table: what held requests wait on.
    changed: Arc<tokio::sync::watch::Sender<u64>>,
    /// Wakes workloads scaled to zero; None refuses at once, as kube-proxy does.
    activator: Option<Arc<crate::activator::Activator>>,
    /// Permits for held requests ([`MAX_HELD`]).
    held: Arc<tokio::sync::Semaphore>,
    /// Answer held requests until the woken pod is up, once the node has them.
    standbys: Arc<std::sync::OnceLock<Arc<crate::standby::Standbys>>>,
}

impl std::fmt::Debug for Services {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Services").finish_non_exhaustive()
    }
}

/// What `name` means to a pod in `pod_ns`. A `routed` pod (one with a network namespace
/// of its own) reaches a Service at its ClusterIP; the others at its loopback address.
fn resolve(table: &Table, pod_ns: &str, name: &str, routed: bool) -> Option<IpAddr> {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    if let Ok(ip) = name.parse::<Ipv4Addr>() {
        let local = table.by_cluster_ip.get(&ip);
        return local.map(|l| IpAddr::V4(if routed { ip } else { *l }));
    }
    let parts: Vec<&str> = name.split('.').collect();
    let service = match parts.as_slice() {
        [svc] => Some((*svc, pod_ns)),
        [svc, ns] | [svc, ns, "svc"] | [svc, ns, "svc", "cluster", "local"] => Some((*svc, *ns)),
        _ => None,
    };
    if let Some(e) =
        service.and_then(|(svc, ns)| table.services.get(&(ns.to_string(), svc.to_string())))
    {
        let ip = if routed { e.cluster_ip } else { e.local_ip };
        return match ip {
            Some(ip) => Some(IpAddr::V4(ip)),
            // Headless: a ready endpoint's own address; one a pod behind the bridge can
            // reach (a pod of components only has a loopback one).
            None => e
                .addresses
                .iter()
                .find(|a| !routed || !a.is_loopback())
                .copied(),
        };
    }
    // `<host>.<svc>[.<ns>[.svc[.cluster.local]]]`: one pod under a Service.
    let (host, svc, ns) = match parts.as_slice() {
        [host, svc] => (*host, *svc, pod_ns),
        [host, svc, ns] | [host, svc, ns, "svc"] | [host, svc, ns, "svc", "cluster", "local"] => {
            (*host, *svc, *ns)
        }
        _ => return None,
    };
    let e = table.services.get(&(ns.to_string(), svc.to_string()))?;
    e.hostnames.get(host).copied()
}

/// A listener that several node agents on one host (a test cluster) can all hold:
/// Services' and Ingresses' ports alike.
pub(crate) fn listen(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let sock = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }?;
    sock.set_reuseaddr(true)?;
    sock.set_reuseport(true)?;
    sock.bind(addr)?;
    sock.listen(1024)
}

/// A Service listener: its protocol and address.
type Listener = (Protocol, SocketAddr);

/// A UDP socket that several node agents on one host can all hold, as [`listen`].
pub(crate) fn listen_udp(addr: SocketAddr) -> std::io::Result<tokio::net::UdpSocket> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    sock.set_reuse_address(true)?;
    sock.set_reuse_port(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    tokio::net::UdpSocket::from_std(sock.into())
}

/// What a listener forwards to.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Route {
    /// A Service's port (by name): its ready endpoints, round-robin.
    Service { key: (String, String), port: String },
    /// A ready endpoint of a headless Service on a node of another host, served at its
    /// own address (and protocol): the address the Service's name gives this node's pods.
    Pod(Listener),
}

/// Accepts on `listener` and forwards each connection to an endpoint of the route.
async fn serve(listener: tokio::net::TcpListener, services: Services, route: Route) {
    let next = Arc::new(AtomicUsize::new(0));
    let acceptor = baton_kube::accept::Acceptor::new(listener);
    loop {
        let (mut inbound, _, permit) = acceptor.accept().await;
        let endpoints = services.route_endpoints(&route);
        // No ready endpoint: refuse, as kube-proxy's REJECT rule does, unless the
        // Service's workload may be coming up from zero.
        let held = match (endpoints.is_empty(), &services.activator, &route) {
            (false, _, _) => None,
            (true, Some(_), Route::Service { .. }) => {
                match services.held.clone().try_acquire_owned() {
                    Ok(permit) => Some(permit),
                    Err(_) => continue,
                }
            }
            (true, _, _) => continue,
        };
        let (services, route, next) = (services.clone(), route.clone(), next.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let endpoints = match (held, &route) {
                (Some(_permit), Route::Service { key, port }) => {
                    services
                        .hold(key, port, |s| s.port_endpoints(key, port))
                        .await
                }
                _ => endpoints,
            };
            if endpoints.is_empty() {
                return;
            }
            let start = next.fetch_add(1, Ordering::Relaxed);
            let _ = inbound.set_nodelay(true);
            // Try each endpoint once, starting with this connection's turn.
            for i in 0..endpoints.len() {
                let target = endpoints[(start + i) % endpoints.len()];
                match services.connect(target).await {
                    Ok(mut outbound) => {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        return;
                    }
                    Err(e) => tracing::debug!(%target, error = %e, "an endpoint did not answer"),
                }
            }
        });
    }
}

/// Datagram flows (clients) one UDP listener keeps at once; past it, a new client's
/// datagrams are dropped until a flow ends.
const MAX_FLOWS: usize = 4096;
/// Datagrams queued toward one flow's endpoint; past it they are dropped, as a full
/// socket buffer drops them.
const FLOW_QUEUE: usize = 256;

/// Receives on `socket` and relays each client's datagrams to one endpoint of the port,
/// the same for as long as the client keeps talking, so that its replies come back to it
/// from the address it sent to (kube-proxy leaves this to conntrack).
async fn serve_udp(socket: tokio::net::UdpSocket, services: Services, route: Route) {
    use futures::channel::mpsc;
    let socket = Arc::new(socket);
    let mut flows: HashMap<SocketAddr, mpsc::Sender<Bytes>> = HashMap::new();
    let mut next = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let Ok((n, client)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        let mut data = Bytes::copy_from_slice(&buf[..n]);
        if let Some(flow) = flows.get_mut(&client) {
            match flow.try_send(data) {
                Ok(()) => continue,
                Err(e) if e.is_full() => continue,
                Err(e) => {
                    flows.remove(&client);
                    data = e.into_inner();
                }
            }
        }
        if flows.len() >= MAX_FLOWS {
            flows.retain(|_, f| !f.is_closed());
            if flows.len() >= MAX_FLOWS {
                continue;
            }
        }
        // No ready endpoint: dropped, as kube-proxy's rules drop it.
        let endpoints = services.route_endpoints(&route);
        let Some(&target) = endpoints.get(next % endpoints.len().max(1)) else {
            continue;
        };
        next = next.wrapping_add(1);
        // The channel holds its buffer and one more per sender.
        let (mut flow, queued) = mpsc::channel(FLOW_QUEUE - 1);
        let _ = flow.try_send(data);
        flows.insert(client, flow);
        tokio::spawn(udp_flow(
            services.clone(),
            socket.clone(),
            client,
            target,
            queued,
        ));
    }
}

/// One client's flow to `target`, until it is idle for [`UDP_IDLE`].
async fn udp_flow(
    services: Services,
    listener: Arc<tokio::net::UdpSocket>,
    client: SocketAddr,
    target: SocketAddr,
    from_client: futures::channel::mpsc::Receiver<Bytes>,
) {
    let to_client = futures::sink::unfold(listener, move |listener, d: Bytes| async move {
        listener.send_to(&d, client).await?;
        Ok::<_, std::io::Error>(listener)
    });
    let to_client = Box::pin(to_client);
    match services.node_of(target.ip()) {
        Some(node) => {
            let tunnel = match services.here.link.open(&node, Protocol::Udp, target).await {
                Ok(t) => t,
                Err(e) => {
                    tracing::debug!(%target, %node, error = %baton_kube::error::chain(&e), "no tunnel for a UDP flow");
                    return;
                }
            };
            let (to_tunnel, from_tunnel) = crate::tunnel::framed(tunnel);
            crate::tunnel::relay(from_client, to_client, from_tunnel, to_tunnel).await;
        }
        None => {
            let udp = match crate::tunnel::udp_to(services.here.source, target).await {
                Ok(u) => u,
                Err(e) => {
                    tracing::debug!(%target, error = %e, "no socket for a UDP flow");
                    return;
                }
            };
            let (to_endpoint, from_endpoint) = crate::tunnel::socket(udp, target);
            crate::tunnel::relay(from_client, to_client, from_endpoint, to_endpoint).await;
        }
    }
}

/// The routing table for node `me` from the Services and EndpointSlices it knows.
fn table_of(me: &str, services: &[Arc<Service>], slices: &[Arc<EndpointSlice>]) -> Table {
    let mut table = Table::default();
    for s in services {
        let (Some(ns), name) = (s.namespace(), s.name_any()) else {
            continue;
        };
        let spec = s.spec.clone().unwrap_or_default();
        let local_ip = spec
            .cluster_ip
            .as_deref()
            .and_then(|ip| ip.parse::<Ipv4Addr>().ok())
            .map(|ip| {
                table.by_cluster_ip.insert(ip, local_address(ip));
                local_address(ip)
            });
        let ports = spec
            .ports
            .iter()
            .flatten()
            .filter_map(|p| {
                Some(Port {
                    name: p.name.clone().unwrap_or_default(),
                    protocol: Protocol::parse(p.protocol.as_deref())?,
                    port: u16::try_from(p.port).ok()?,
                    node_port: p.node_port.and_then(|n| u16::try_from(n).ok()),
                    target: p.target_port.clone(),
                })
            })
            .collect();
        table.services.insert(
            (ns, name),
            Entry {
                cluster_ip: spec
                    .cluster_ip
                    .as_deref()
                    .and_then(|ip| ip.parse::<Ipv4Addr>().ok()),
                local_ip,
                ports,
                endpoints: HashMap::new(),
                addresses: Vec::new(),
                hostnames: HashMap::new(),
                selector: spec.selector.clone().unwrap_or_default(),
            },
        );
    }
    for slice in slices {
        let (Some(ns), Some(svc)) = (
            slice.namespace(),
            slice.labels().get(SERVICE_NAME_LABEL).cloned(),
        ) else {
            continue;
        };
        let Some(entry) = table.services.get_mut(&(ns, svc)) else {
            continue;
        };
        // (name, protocol, number); a port of a protocol the node does not route is
        // still a named port of the Service's endpoints.
        let slice_ports: Vec<(String, Option<Protocol>, u16)> = slice
            .ports
            .iter()
            .flatten()
            .filter_map(|p| {
                Some((
                    p.name.clone().unwrap_or_default(),
                    Protocol::parse(p.protocol.as_deref()),
                    u16::try_from(p.port?).ok()?,
                ))
            })
            .collect();
        for (name, _, _) in &slice_ports {
            entry.endpoints.entry(name.clone()).or_default();
        }
        for e in &slice.endpoints {
            if e.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                continue;
            }
            let ips: Vec<IpAddr> = e.addresses.iter().filter_map(|a| a.parse().ok()).collect();
            for (name, _, port) in &slice_ports {
                if let Some(list) = entry.endpoints.get_mut(name) {
                    list.extend(ips.iter().map(|&ip| SocketAddr::new(ip, *port)));
                }
            }
            let Some(&ip) = ips.first() else {
                continue;
            };
            let at_ip = slice_ports
                .iter()
                .filter_map(|&(_, protocol, port)| Some((protocol?, SocketAddr::new(ip, port))));
            match e.node_name.as_deref() {
                Some(n) if n == me => table.exits.extend(at_ip),
                Some(n) => {
                    table.remote.insert(ip, Arc::from(n));
                    if entry.cluster_ip.is_none() {
                        table.remote_pods.extend(at_ip);
                    }
                }
                // An endpoint of no node (a Service without a selector, whose
                // EndpointSlices a user wrote): reached directly from here.
                None => {}
            }
            entry.addresses.push(ip);
            if let Some(h) = &e.hostname {
                entry.hostnames.insert(h.to_ascii_lowercase(), ip);
            }
        }
    }
    table
}

impl Services {
    /// Starts watching Services and EndpointSlices, and serving them on this node.
    /// Starts routing. With `cluster_ips`, each Service is also served at its ClusterIP
    /// itself, for the pods behind the node's bridge: the node has a local route for the
    /// Service range then ([`crate::netns::Bridge::up`]).
    /// With an `activator`, requests for a workload scaled to zero are held while it
    /// wakes.
    pub fn start(
        client: Client,
        here: Here,
        cluster_ips: bool,
        activator: Option<Arc<crate::activator::Activator>>,
    ) -> (Self, JoinHandle<()>) {
        let services = Self {
            table: Arc::default(),
            here: Arc::new(here),
            draining: Arc::default(),
            cluster_ips,
            changed: Arc::new(tokio::sync::watch::channel(0).0),
            activator,
            held: Arc::new(tokio::sync::Semaphore::new(MAX_HELD)),
            standbys: Arc::default(),
        };
        let task = tokio::spawn(services.clone().run(client));
        (services, task)
    }

    /// Connects to `target`, an endpoint of this node or, through its node, of another.
    pub async fn connect(&self, target: SocketAddr) -> std::io::Result<Box<dyn Io>> {
        match self.node_of(target.ip()) {
            Some(node) => {
                let tunnel = self
                    .here
                    .link
                    .open(&node, Protocol::Tcp, target)
                    .await
                    .map_err(std::io::Error::other)?;
                Ok(Box::new(tunnel))
            }
            None => {
                let tcp = tokio::net::TcpStream::connect(target).await?;
                let _ = tcp.set_nodelay(true);
                Ok(Box::new(tcp))
            }
        }
    }

    /// The other node that runs the ready endpoint at `ip`; None if it is this node's
    /// (or no endpoint's).
    fn node_of(&self, ip: IpAddr) -> Option<Arc<str>> {
        let table = self.table.read().unwrap_or_else(|e| e.into_inner());
        table.remote.get(&ip).cloned()
    }

    /// Whether another node may tunnel to `target` over `protocol`: a ready endpoint of
    /// a Service, on this node.
    pub fn exit_allowed(&self, protocol: Protocol, target: SocketAddr) -> bool {
        let table = self.table.read().unwrap_or_else(|e| e.into_inner());
        table.exits.contains(&(protocol, target))
    }

    /// This node's tunnels to other nodes.
    pub fn link(&self) -> &Link {
        &self.here.link
    }

    /// Where datagrams to this node's pods leave from.
    pub fn source(&self) -> IpAddr {
        self.here.source
    }

    /// Stops routing new connections to a pod of this node (it is shutting down), or
    /// resumes (its address is free again).
    pub fn set_draining(&self, ip: IpAddr, draining: bool) {
        let mut d = self.draining.write().unwrap_or_else(|e| e.into_inner());
        if draining {
            d.insert(ip);
        } else {
            d.remove(&ip);
        }
    }

    /// The `kubernetes` Service's ClusterIP and HTTPS port, which pods are told in
    /// `KUBERNETES_SERVICE_HOST` and `KUBERNETES_SERVICE_PORT`.
    pub fn api_server(&self) -> Option<(Ipv4Addr, u16)> {
        let table = self.table.read().unwrap_or_else(|e| e.into_inner());
        let e = table
            .services
            .get(&("default".to_string(), "kubernetes".to_string()))?;
        let port = e
            .ports
            .iter()
            .find(|p| p.name == "https")
            .or(e.ports.first())?;
        Some((e.cluster_ip?, port.port))
    }

    /// Where a listener for `route` may forward now.
    fn route_endpoints(&self, route: &Route) -> Vec<SocketAddr> {
        match route {
            Route::Service { key, port } => self.port_endpoints(key, port),
            Route::Pod(pod) => {
                let table = self.table.read().unwrap_or_else(|e| e.into_inner());
                if table.remote_pods.contains(pod) {
                    vec![pod.1]
                } else {
                    Vec::new()
                }
            }
        }
    }

    /// The ready endpoints of the Service port named `port`, less the pods of this node
    /// shutting down.
    fn port_endpoints(&self, key: &(String, String), port: &str) -> Vec<SocketAddr> {
        let table = self.table.read().unwrap_or_else(|e| e.into_inner());
        let Some(list) = table.services.get(key).and_then(|e| e.endpoints.get(port)) else {
            return Vec::new();
        };
        self.not_draining(list)
    }

    /// `list` less the pods of this node shutting down.
    fn not_draining(&self, list: &[SocketAddr]) -> Vec<SocketAddr> {
        let draining = self.draining.read().unwrap_or_else(|e| e.into_inner());
        list.iter()
            .filter(|a| !draining.contains(&a.ip()))
            .copied()
            .collect()
    }

    /// Lets held requests be answered from standbys ([`crate::standby`]).
    pub fn set_standbys(&self, standbys: Arc<crate::standby::Standbys>) {
        let _ = self.standbys.set(standbys);
    }

    /// Holds a request for port `port` (by name) of Service `key`, which has no ready
    /// endpoint: if its workload is scaled to zero by an autoscaler, wakes it and waits
    /// (for the activator's timeout at most) until `endpoints` finds one, or a standby
    /// of the workload answers meanwhile. Empty if there is nothing to wake or it did
    /// not come up in time.
    pub async fn hold(
        &self,
        key: &(String, String),
        port: &str,
        endpoints: impl Fn(&Services) -> Vec<SocketAddr>,
    ) -> Vec<SocketAddr> {
        let Some(activator) = &self.activator else {
            return Vec::new();
        };
        let selector = {
            let table = self.table.read().unwrap_or_else(|e| e.into_inner());
            match table.services.get(key) {
                Some(e) => e.selector.clone(),
                None => return Vec::new(),
            }
        };
        // Subscribed before waking, so that no rebuild in between is missed.
        let mut changed = self.changed.subscribe();
        match activator.wake(&key.0, &selector).await {
            Ok(true) => {}
            Ok(false) => return Vec::new(),
            Err(e) => {
                tracing::warn!(service = %format!("{}/{}", key.0, key.1), error = %baton_kube::error::chain(&e), "cannot wake the workload of a Service");
                return Vec::new();
            }
        }
        let deadline = tokio::time::Instant::now() + activator.timeout;
        let mut standby_tried = false;
        loop {
            let found = endpoints(self);
            if !found.is_empty() {
                activator.up(&key.0, &selector);
                return found;
            }
            if !standby_tried {
                standby_tried = true;
                if let Some(addr) = self.standby(activator, key, port, &selector).await {
                    return vec![addr];
                }
            }
            match tokio::time::timeout_at(deadline, changed.changed()).await {
                Ok(Ok(())) => {}
                _ => return Vec::new(),
            }
        }
    }

    /// Where a standby of the workload woken for Service `key` serves, started now if
    /// need be; None if no standby may answer for it. A standby started now is retired
    /// once the Service's port has a ready endpoint, or at the wake's timeout.
    async fn standby(
        &self,
        activator: &crate::activator::Activator,
        key: &(String, String),
        port: &str,
        selector: &BTreeMap<String, String>,
    ) -> Option<SocketAddr> {
        let standbys = self.standbys.get()?.clone();
        let (target, number) = {
            let table = self.table.read().unwrap_or_else(|e| e.into_inner());
            let p = table
                .services
                .get(key)?
                .ports
                .iter()
                .find(|p| p.name == port)?;
            (p.target.clone(), p.port)
        };
        for w in activator.woken_templates(&key.0, selector) {
            let started = standbys
                .address(&w.workload, &w.template, target.as_ref(), number)
                .await;
            let (addr, fresh) = match started {
                Ok(got) => got,
                Err(e) => {
                    tracing::debug!(workload = %w.workload, reason = %baton_kube::error::chain(&e), "no standby");
                    continue;
                }
            };
            if fresh {
                let (services, key, port) = (self.clone(), key.clone(), port.to_string());
                let selector = selector.clone();
                let mut changed = self.changed.subscribe();
                let deadline = tokio::time::Instant::now() + activator.timeout;
                tokio::spawn(async move {
                    loop {
                        if !services.port_endpoints(&key, &port).is_empty() {
                            // The wake is over: held requests no longer come here to
                            // see it end, so the next time at zero wakes it again.
                            if let Some(a) = &services.activator {
                                a.up(&key.0, &selector);
                            }
                            break;
                        }
                        match tokio::time::timeout_at(deadline, changed.changed()).await {
                            Ok(Ok(())) => {}
                            _ => break,
                        }
                    }
                    standbys.retire(&w.workload).await;
                });
            }
            return Some(addr);
        }
        None
    }

    /// [`Services::endpoints`], or if there are none, those of the workload woken from
    /// zero ([`Services::hold`]). None if there is no such Service or port.
    pub async fn endpoints_or_hold(
        &self,
        ns: &str,
        name: &str,
        port: &crate::ingress::ServicePort,
    ) -> Option<Vec<SocketAddr>> {
        let found = self.endpoints(ns, name, port)?;
        if !found.is_empty() || self.activator.is_none() {
            return Some(found);
        }
        let Ok(_permit) = self.held.clone().try_acquire_owned() else {
            return Some(found);
        };
        let key = (ns.to_string(), name.to_string());
        let port_name = self.port_name(&key, port)?;
        Some(
            self.hold(&key, &port_name, |s| {
                s.endpoints(ns, name, port).unwrap_or_default()
            })
            .await,
        )
    }

    /// The name of a Service port given by number or name.
    fn port_name(
        &self,
        key: &(String, String),
        port: &crate::ingress::ServicePort,
    ) -> Option<String> {
        let table = self.table.read().unwrap_or_else(|e| e.into_inner());
        table
            .services
            .get(key)?
            .ports
            .iter()
            .find(|p| port.is(p.port, &p.name))
            .map(|p| p.name.clone())
    }

    /// The ready endpoints of a Service port (by number or name), less the pods of this
    /// node shutting down: where an Ingress sends a request. None if there is no such
    /// Service or port.
    pub fn endpoints(
        &self,
        ns: &str,
        name: &str,
        port: &crate::ingress::ServicePort,
    ) -> Option<Vec<SocketAddr>> {
        let table = self.table.read().unwrap_or_else(|e| e.into_inner());
        let e = table.services.get(&(ns.to_string(), name.to_string()))?;
        let p = e.ports.iter().find(|p| port.is(p.port, &p.name))?;
        Some(
            e.endpoints
                .get(&p.name)
                .map(|list| self.not_draining(list))
                .unwrap_or_default(),
        )
    }

    /// The name resolver of pods in namespace `ns`.
    pub fn resolver(&self, ns: &str) -> NameResolver {
        self.resolver_of(ns, false)
    }

    /// The name resolver of pods in namespace `ns` that have a network namespace of their
    /// own (they run OCI containers), and of the node's DNS responder: Services at their
    /// ClusterIPs, which the node serves to such pods ([`Services::start`]).
    pub fn routed_resolver(&self, ns: &str) -> NameResolver {
        self.resolver_of(ns, true)
    }

    fn resolver_of(&self, ns: &str, routed: bool) -> NameResolver {
        let table = self.table.clone();
        let ns = ns.to_string();
        Arc::new(move |name: &str| {
            resolve(
                &table.read().unwrap_or_else(|e| e.into_inner()),
                &ns,
                name,
                routed,
            )
        })
    }

    async fn run(self, client: Client) {
        let (svc_store, svc_writer) = reflector::store::<Service>();
        let (eps_store, eps_writer) = reflector::store::<EndpointSlice>();
        let svcs = reflector::reflector(
            svc_writer,
            watcher(
                Api::<Service>::all(client.clone()),
                watcher::Config::default(),
            )
            .default_backoff(),
        )
        .map(|_| ());
        let eps = reflector::reflector(
            eps_writer,
            watcher(
                Api::<EndpointSlice>::all(client),
                watcher::Config::default(),
            )
            .default_backoff(),
        )
        .map(|_| ());
        let mut changes = futures::stream::select(svcs, eps).boxed();
        let mut listeners: HashMap<Listener, (Route, JoinHandle<()>)> = HashMap::new();
        while changes.next().await.is_some() {
            // Coalesce a burst of events into one rebuild.
            while let Some(Some(())) = futures::FutureExt::now_or_never(changes.next()) {}
            self.rebuild(&svc_store, &eps_store, &mut listeners);
        }
        for (_, (_, t)) in listeners {
            t.abort();
        }
    }

    fn rebuild(
        &self,
        svc_store: &Store<Service>,
        eps_store: &Store<EndpointSlice>,
        listeners: &mut HashMap<Listener, (Route, JoinHandle<()>)>,
    ) {
        let table = table_of(&self.here.name, &svc_store.state(), &eps_store.state());
        // The listeners the table wants.
        let mut wanted: BTreeMap<Listener, Route> = BTreeMap::new();
        for (key, e) in &table.services {
            for p in &e.ports {
                let route = Route::Service {
                    key: key.clone(),
                    port: p.name.clone(),
                };
                let cluster_ip = e.cluster_ip.filter(|_| self.cluster_ips);
                for ip in e.local_ip.into_iter().chain(cluster_ip) {
                    wanted.insert(
                        (p.protocol, SocketAddr::new(IpAddr::V4(ip), p.port)),
                        route.clone(),
                    );
                }
                if let Some(np) = p.node_port {
                    wanted.insert(
                        (p.protocol, SocketAddr::new(self.here.address, np)),
                        route.clone(),
                    );
                }
            }
        }
        // A node on a host of its own owns every loopback address there: it stands in
        // for headless Services' pods on other nodes at their addresses. Nodes on
        // loopback addresses share one host (a test cluster), where those addresses are
        // the pods' own.
        if !self.here.address.is_loopback() {
            for &pod in &table.remote_pods {
                wanted.insert(pod, Route::Pod(pod));
            }
        }
        *self.table.write().unwrap_or_else(|e| e.into_inner()) = table;
        self.changed.send_modify(|g| *g += 1);
        listeners.retain(|addr, (route, task)| {
            let keep = wanted.get(addr) == Some(route);
            if !keep {
                task.abort();
            }
            keep
        });
        for ((protocol, addr), route) in wanted {
            if listeners.contains_key(&(protocol, addr)) {
                continue;
            }
            let task = match protocol {
                Protocol::Tcp => {
                    listen(addr).map(|l| tokio::spawn(serve(l, self.clone(), route.clone())))
                }
                Protocol::Udp => listen_udp(addr)
                    .map(|s| tokio::spawn(serve_udp(s, self.clone(), route.clone()))),
            };
            match task {
                Ok(task) => {
                    listeners.insert((protocol, addr), (route, task));
                }
                Err(e) => {
                    tracing::warn!(%addr, protocol = protocol.as_str(), error = %e, "cannot serve a Service port")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_resolve_in_the_pods_namespace_and_fully_qualified() {
        let mut t = Table::default();
        let cip = Ipv4Addr::new(10, 96, 1, 7);
        t.by_cluster_ip.insert(cip, local_address(cip));
        t.services.insert(
            ("shop".into(), "backend".into()),
            Entry {
                cluster_ip: Some(cip),
                local_ip: Some(local_address(cip)),
                ..Default::default()
            },
        );
        // A pod behind the bridge reaches the Service at its ClusterIP.
        let routed = Some(IpAddr::V4(cip));
        assert_eq!(resolve(&t, "shop", "backend", true), routed);
        assert_eq!(resolve(&t, "other", "10.96.1.7", true), routed);
        assert_eq!(resolve(&t, "other", "10.96.1.8", true), None);
        let want = Some(IpAddr::from([127, 96, 1, 7]));
        assert_eq!(resolve(&t, "shop", "backend", false), want);
        assert_eq!(resolve(&t, "other", "backend", false), None);
        assert_eq!(resolve(&t, "other", "backend.shop", false), want);
        assert_eq!(
            resolve(&t, "other", "backend.shop.svc.cluster.local.", false),
            want
        );
        assert_eq!(resolve(&t, "other", "10.96.1.7", false), want);
        assert_eq!(resolve(&t, "other", "example.com", false), None);
    }

    #[test]
    fn a_headless_services_pods_resolve_by_hostname() {
        let mut t = Table::default();
        let db0 = IpAddr::from([127, 128, 0, 5]);
        let db1 = IpAddr::from([127, 128, 0, 6]);
        t.services.insert(
            ("shop".into(), "db".into()),
            Entry {
                addresses: vec![db0, db1],
                hostnames: HashMap::from([("db-0".into(), db0), ("db-1".into(), db1)]),
                ..Default::default()
            },
        );
        assert_eq!(resolve(&t, "shop", "db", false), Some(db0));
        assert_eq!(resolve(&t, "shop", "db-1.db", false), Some(db1));
        assert_eq!(resolve(&t, "other", "db-1.db.shop", false), Some(db1));
        assert_eq!(
            resolve(&t, "other", "DB-0.db.shop.svc.cluster.local.", false),
            Some(db0)
        );
        assert_eq!(resolve(&t, "shop", "db-2.db", false), None);
        assert_eq!(resolve(&t, "shop", "db-0.web", false), None);
    }

    #[test]
    fn endpoints_on_other_nodes_are_reached_through_them_and_only_ready_local_ones_are_exits() {
        let svc: Arc<Service> = Arc::new(
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "dns", "namespace": "default"},
                "spec": {"clusterIP": "10.96.0.53", "ports": [
                    {"name": "udp", "port": 53, "protocol": "UDP"},
                    {"name": "tcp", "port": 53, "protocol": "TCP"},
                    {"name": "sctp", "port": 99, "protocol": "SCTP"},
                ]},
            }))
            .unwrap(),
        );
        let slice: Arc<EndpointSlice> = Arc::new(
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "dns-1", "namespace": "default",
                             "labels": {SERVICE_NAME_LABEL: "dns"}},
                "addressType": "IPv4",
                "ports": [{"name": "udp", "port": 5353, "protocol": "UDP"},
                          {"name": "tcp", "port": 5353, "protocol": "TCP"}],
                "endpoints": [
                    {"addresses": ["127.128.0.2"], "nodeName": "a", "conditions": {"ready": true}},
                    {"addresses": ["127.128.16.2"], "nodeName": "b", "conditions": {"ready": true}},
                    {"addresses": ["127.128.0.3"], "nodeName": "a", "conditions": {"ready": false}},
                ],
            }))
            .unwrap(),
        );
        let t = table_of(
            "a",
            std::slice::from_ref(&svc),
            std::slice::from_ref(&slice),
        );
        let e = &t.services[&("default".to_string(), "dns".to_string())];
        // SCTP is not routed; UDP and TCP on one port number are two ports.
        let protocols: Vec<_> = e.ports.iter().map(|p| p.protocol).collect();
        assert_eq!(protocols, [Protocol::Udp, Protocol::Tcp]);
        assert_eq!(e.endpoints["udp"].len(), 2);
        // B's endpoint is reached through b; A's own are not in `remote`.
        let b_ip: IpAddr = "127.128.16.2".parse().unwrap();
        assert_eq!(t.remote.get(&b_ip).map(|n| &**n), Some("b"));
        assert_eq!(t.remote.len(), 1);
        // Another node may tunnel to A's ready endpoint, by its protocol and port only.
        let a: SocketAddr = "127.128.0.2:5353".parse().unwrap();
        assert!(t.exits.contains(&(Protocol::Udp, a)));
        assert!(t.exits.contains(&(Protocol::Tcp, a)));
        assert!(!t
            .exits
            .contains(&(Protocol::Tcp, "127.128.0.2:53".parse().unwrap())));
        assert!(!t
            .exits
            .contains(&(Protocol::Udp, "127.128.0.3:5353".parse().unwrap())));
        assert!(!t
            .exits
            .contains(&(Protocol::Udp, "127.128.16.2:5353".parse().unwrap())));
        // Not headless: b's pod is reached through the ClusterIP only.
        assert!(t.remote_pods.is_empty());
        let mut headless = (*svc).clone();
        headless.spec.as_mut().unwrap().cluster_ip = Some("None".into());
        let t = table_of("a", &[Arc::new(headless)], &[slice]);
        let b: SocketAddr = "127.128.16.2:5353".parse().unwrap();
        let want = BTreeSet::from([(Protocol::Tcp, b), (Protocol::Udp, b)]);
        assert_eq!(t.remote_pods, want);
        // Seen from b, the roles swap.
        let t = table_of("b", &[], &[]);
        assert!(t.exits.is_empty() && t.remote.is_empty());
    }
}
