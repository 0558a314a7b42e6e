//! # baton-node: the node agent (Baton's kubelet)
//!
//! The node agent is an API client like the rest of the control loops. It:
//! - registers its Node (capacity, allocatable, addresses, labels) and heartbeats through
//!   a Lease in `kube-node-lease` ([`register`]);
//! - watches the pods bound to it (`spec.nodeName=NAME`) and gives each a worker that walks
//!   it through its stages and reports its status ([`worker`], with the pure part in
//!   [`status`]);
//! - runs the containers through the [`sandbox::Sandbox`] seam: Wasm components in
//!   wasmtime ([`sandbox::WasmSandboxes`]), or scripted ones for tests ([`fake`]);
//! - resolves ConfigMaps, Secrets, the downward API and claimed volumes for the sandbox
//!   ([`config`]), and removes local volumes' data once their volume is gone
//!   ([`volumes`]);
//! - hands each pod a loopback address of its own ([`ipam`]);
//! - probes containers ([`probe`]);
//! - serves container logs to the API server over mutually authenticated TLS ([`server`]);
//! - routes Service traffic and resolves Service names for its pods ([`proxy`]), serves
//!   Ingresses ([`ingress`]), and holds requests for workloads scaled to zero while it
//!   wakes them ([`activator`]), answering them meanwhile from the workload's template
//!   when the component is on the node ([`standby`]).
//!
//! Images ([`images`]) are OCI references, pulled from their registries through
//! `baton_oci` into the node's content-addressed cache, per `imagePullPolicy` and with the
//! pod's `imagePullSecrets`. A path on the node (`/DIR/x.wasm` or `file:///DIR/x.wasm`)
//! is served only from a directory the node was given with `--local-images`, and there is
//! none by default.

pub mod activator;
pub mod budget;
pub mod config;
pub mod dns;
pub mod eviction;
pub mod fake;
pub mod hollow;
pub mod images;
pub mod ingress;
pub mod ipam;
pub mod linux;
pub mod netns;
pub mod platform;
pub mod portforward;
pub mod probe;
pub mod proxy;
pub mod register;
pub mod sandbox;
pub mod server;
pub mod spdy;
pub mod standby;
pub mod stats;
pub mod status;
pub mod streams;
pub mod tunnel;
pub mod volumes;
pub mod worker;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use baton_kube::events::Recorder;
use baton_wasm_shim::{Runtime, RuntimeConfig, ShimError};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, ResourceExt};
use tokio::sync::watch;
use tracing::Instrument;

pub use register::Capacity;
pub use worker::{Resolvers, Settings};

/// Why the node agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Register(#[from] register::RegisterError),
    #[error(transparent)]
    Ipam(#[from] ipam::IpamError),
    #[error("starting the Wasm runtime")]
    Runtime(#[from] ShimError),
    #[error("the node address {0:?} is not an IP address")]
    Address(String),
    #[error(transparent)]
    Server(#[from] server::ServerError),
    #[error("setting up image pulls")]
    Oci(#[from] baton_oci::OciError),
}

/// How a node is set up.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub name: String,
    /// The node's address (its InternalIP and the hostIP of its pods).
    pub address: String,
    /// The loopback range pod addresses come from; None takes the range the control
    /// plane assigns (`spec.podCIDR`).
    pub pod_cidr: Option<String>,
    /// Pod volumes, logs and the compiled-component cache live here.
    pub data_dir: PathBuf,
    pub capacity: Capacity,
    pub labels: BTreeMap<String, String>,
    pub heartbeat: Duration,
    /// Port of the node's HTTPS endpoint (logs); 0 picks a free one.
    pub kubelet_port: u16,
    pub settings: Settings,
    pub runtime: RuntimeConfig,
    /// Registries, their trust, and the image cache.
    pub oci: baton_oci::OciConfig,
    /// The image cache is trimmed to this many bytes of images no pod uses.
    pub image_cache_max_bytes: u64,
    /// Directories from which an image may be a node path (`/dir/x.wasm`); empty (the
    /// default) refuses every image that is a path.
    pub local_images: Vec<PathBuf>,
    /// The memory limit of a container that sets none: what it is charged against the
    /// node's allocatable memory, and what its instances may hold together.
    pub default_memory_limit: u64,
    /// Below this much available memory the node is under memory pressure and evicts
    /// (the kubelet's `memory.available` hard threshold).
    pub eviction_hard_memory: u64,
    /// When the API server runs in this process (`baton up`): where the node offers it a
    /// link to its endpoint that needs no TLS.
    pub local_link: Option<baton_kube::local_nodes::LocalNodes>,
    /// Where the node serves Ingresses over HTTP and HTTPS ([`ingress`]); None serves
    /// none. Port 0 picks a free port, which the node publishes on its Node.
    pub ingress_http: Option<std::net::SocketAddr>,
    pub ingress_https: Option<std::net::SocketAddr>,
    /// How long a request for a workload scaled to zero is held while the node wakes it
    /// ([`activator`]); None refuses such requests at once.
    pub scale_from_zero: Option<Duration>,
}

impl NodeConfig {
    /// What this node reports of itself when it registers or refreshes its Node.
    fn identity(&self, kubelet_port: u16) -> register::Identity<'_> {
        register::Identity {
            name: &self.name,
            address: &self.address,
            labels: &self.labels,
            capacity: &self.capacity,
            kubelet_port,
        }
    }

    /// A node named `name` with its data in `data_dir`, sized from this machine.
    pub fn new(name: &str, data_dir: PathBuf) -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
        let memory = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            })
            .map_or(8 << 30, |kib| kib * 1024);
        let runtime = RuntimeConfig {
            cache_dir: Some(data_dir.join("compiled")),
            // The node's own work (and in `baton up`, the control plane's) goes first.
            guest_nice: 10,
            ..RuntimeConfig::default()
        };
        Self {
            name: name.into(),
            address: "127.0.0.1".into(),
            pod_cidr: None,
            capacity: Capacity {
                cpu_millis: cpus * 1000,
                memory,
                // Wasm pods are light: the node's pod count is bounded by the runtime's
                // instance slots, not by the kubelet's customary 110.
                pods: runtime.max_instances as u64,
            },
            data_dir: data_dir.clone(),
            labels: BTreeMap::new(),
            heartbeat: Duration::from_secs(10),
            kubelet_port: 10250,
            settings: Settings::default(),
            oci: baton_oci::OciConfig::new(data_dir.join("images")),
            image_cache_max_bytes: 10 << 30,
            local_images: Vec::new(),
            default_memory_limit: 64 << 20,
            eviction_hard_memory: 100 << 20,
            local_link: None,
            ingress_http: None,
            ingress_https: None,
            scale_from_zero: Some(activator::DEFAULT_TIMEOUT),
            runtime,
        }
    }
}

/// A running pod worker: its task, and where to send the newest version of its pod.
struct Handle {
    updates: watch::Sender<Option<Arc<Pod>>>,
    task: tokio::task::JoinHandle<()>,
}

/// How often the data of deleted local volumes is looked for.
const VOLUME_SWEEP: Duration = Duration::from_secs(30);

/// Runs the node agent until `shutdown` completes.
pub async fn run(
    client: Client,
    cfg: NodeConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), NodeError> {
    // The logs endpoint first: the Node is registered once, with the port it serves on.
    let logs = Arc::new(server::LogIndex::default());
    let server::Started {
        port: kubelet_port,
        task: kubelet,
        link: link_tls,
    } = server::start(
        &client,
        &cfg.name,
        &cfg.address,
        cfg.kubelet_port,
        logs.clone(),
    )
    .await?;
    let link = Arc::new(tunnel::Link::new(client.clone(), link_tls));
    let _local = cfg
        .local_link
        .as_ref()
        .map(|l| l.register(&cfg.name, server::local_service(logs.clone(), &cfg.name)));
    let registered = register::register(
        &client,
        cfg.identity(kubelet_port),
        &register::Reported::default(),
    )
    .await?;
    let events = Recorder::new(client.clone(), "kubelet", Some(&cfg.name));
    register::tell_started(&events, &cfg.name);
    let pod_cidr = match &cfg.pod_cidr {
        Some(c) => c.clone(),
        None => register::assigned_pod_cidr(&client, &cfg.name).await?,
    };
    let runtime = Runtime::new(cfg.runtime.clone())?;
    let _ = logs.sandbox.set(runtime.clone());
    // Aborted with the agent: the readings are for the pods it runs.
    let sampler = AbortOnDrop(logs.stats.clone().run(runtime.clone()));
    let registry = Arc::new(baton_oci::Registry::new(cfg.oci.clone())?);
    let node_ip: std::net::IpAddr = cfg
        .address
        .parse()
        .map_err(|_| NodeError::Address(cfg.address.clone()))?;
    // OCI containers run where runc is installed and the node can make their network;
    // elsewhere Linux images are refused with the reason.
    let linux = linux_runtime(&cfg, &pod_cidr).await;
    let containers = linux.clone();
    let (activator, _activator_task) = match cfg.scale_from_zero {
        Some(timeout) => {
            let (a, task) = activator::Activator::start(client.clone(), timeout);
            (Some(a), Some(AbortOnDrop(task)))
        }
        None => (None, None),
    };
    let here = proxy::Here {
        name: cfg.name.clone(),
        address: node_ip,
        source: ipam::node_address(&pod_cidr)?.into(),
        link,
    };
    let (services, proxy) =
        proxy::Services::start(client.clone(), here, linux.is_some(), activator);
    let _ = logs.exits.set(services.clone());
    // Serves Ingresses until the agent ends.
    let _ingress = if cfg.ingress_http.is_some() || cfg.ingress_https.is_some() {
        let server = ingress::start(
            client.clone(),
            services.clone(),
            Some(runtime.clone()),
            cfg.ingress_http,
            cfg.ingress_https,
        );
        tracing::info!(http = ?server.http, https = ?server.https, "serving Ingresses");
        let port = |a: Option<std::net::SocketAddr>| a.map(|a| a.port());
        if let Err(e) = register::publish_ingress_ports(
            &client,
            &cfg.name,
            port(server.http),
            port(server.https),
        )
        .await
        {
            tracing::warn!(error = %baton_kube::error::chain(&e), "cannot publish the Ingress ports");
        }
        Some(server)
    } else {
        None
    };
    // Answers the container pods' names, on the bridge; aborted with the agent.
    let _dns = match &linux {
        Some(rt) => {
            let addr = std::net::SocketAddr::from((rt.bridge.gateway(), 53));
            let bridge = rt.clone();
            let clients = Arc::new(move |ip: std::net::IpAddr| match ip {
                std::net::IpAddr::V4(v4) => bridge.bridge.holds(v4),
                std::net::IpAddr::V6(_) => false,
            });
            let names = services.routed_resolver("");
            match dns::serve(addr, names, rt.cluster_domain.clone(), clients).await {
                Ok(task) => Some(AbortOnDrop(task)),
                Err(e) => {
                    tracing::warn!(error = %baton_kube::error::chain(&e), "container pods get no cluster names");
                    None
                }
            }
        }
        None => None,
    };
    let routed_resolvers: Resolvers = {
        let services = services.clone();
        Arc::new(move |ns: &str| services.routed_resolver(ns))
    };
    let resolvers: Resolvers = {
        let services = services.clone();
        Arc::new(move |ns: &str| services.resolver(ns))
    };
    let images = Arc::new(images::Images::new(
        runtime.clone(),
        Some(registry.clone()),
        cfg.local_images.clone(),
    ));
    let wasm = sandbox::WasmSandboxes {
        runtime: runtime.clone(),
        images: images.clone(),
        resolvers: Some(resolvers),
        request_timeout: cfg.settings.request_timeout,
    };
    let sandboxes = sandbox::PodSandboxes {
        wasm,
        linux,
        routed_resolvers: Some(routed_resolvers),
    };
    let shared = Arc::new(worker::Shared {
        client: client.clone(),
        sandboxes,
        ipam: Mutex::new(ipam::Ipam::new(&pod_cidr)?),
        node_name: cfg.name.clone(),
        host_ip: cfg.address.clone(),
        data_dir: cfg.data_dir.clone(),
        events: events.clone(),
        settings: cfg.settings.clone(),
        services: Some(services),
        logs: logs.clone(),
        memory: Arc::new(budget::MemoryBudget::new(
            cfg.capacity.memory,
            cfg.default_memory_limit,
        )),
        evictions: Arc::default(),
        platform: Arc::new(platform::Stores::new(cfg.data_dir.join("keyvalue"))),
        objects: Default::default(),
    });
    shared.objects.follow(&registered);
    // Held requests for a workload woken from zero are answered from its template while
    // its pod comes up. Weak: the standbys live in the Services the shared state holds.
    if let Some(services) = &shared.services {
        services.set_standbys(Arc::new(standby::Standbys::new(Arc::downgrade(&shared))));
    }
    let eviction = tokio::spawn(eviction::run(
        shared.evictions.clone(),
        shared.memory.clone(),
        runtime.clone(),
        cfg.eviction_hard_memory,
    ));
    let lease = register::NodeLease::new(&cfg.name, cfg.heartbeat * 4);
    lease.renew(&client).await?;
    let heartbeat = {
        let (client, cfg) = (client.clone(), cfg.clone());
        let evictions = shared.evictions.clone();
        let events = events.clone();
        let images = images.clone();
        let objects = shared.objects.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(cfg.heartbeat);
            let mut reported_images = Vec::new();
            let mut pressure_tick = tokio::time::interval(eviction::INTERVAL);
            let mut clock = register::StatusClock::new(rand::random());
            let mut reported_pressure = false;
            let mut renewal_failed = false;
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        if let Err(e) = lease.renew(&client).await {
                            tracing::warn!(error = %e, "heartbeat failed");
                            // The report waits for the way to the control plane.
                            renewal_failed = true;
                            continue;
                        }
                    }
                    // A change of memory pressure is reported at once, not at the next
                    // status refresh.
                    _ = pressure_tick.tick() => {
                        if evictions.under_pressure() == reported_pressure {
                            continue;
                        }
                    }
                }
                // The Node's own status is refreshed now and then; the Lease is the pulse.
                let pressure = evictions.under_pressure();
                // A new image is told at once: the scheduler prefers nodes that hold a
                // pod's images, which is what makes a start from zero fast.
                let held = images.node_images();
                let changed =
                    renewal_failed || pressure != reported_pressure || held != reported_images;
                match clock.beat(changed, objects.knows_ttl(), rand::random()) {
                    register::StatusDue::Nothing => {}
                    register::StatusDue::Read => {
                        match register::read_node(&client, &cfg.name).await {
                            Ok(node) => objects.follow(&node),
                            Err(e) => {
                                tracing::warn!(error = %e, "reading the node's own Node failed")
                            }
                        }
                    }
                    register::StatusDue::Report => {
                        let identity = cfg.identity(kubelet_port);
                        match register::refresh(
                            &client,
                            identity,
                            &register::Reported {
                                memory_pressure: pressure,
                                images: &held,
                            },
                        )
                        .await
                        {
                            Ok(node) => {
                                objects.follow(&node);
                                renewal_failed = false;
                                reported_images = held;
                                if pressure != reported_pressure {
                                    let status = if pressure {
                                        "NodeHasInsufficientMemory"
                                    } else {
                                        "NodeHasSufficientMemory"
                                    };
                                    register::tell_status(&events, &cfg.name, status);
                                }
                                reported_pressure = pressure;
                            }
                            Err(e) => tracing::warn!(error = %e, "node status update failed"),
                        }
                    }
                }
            }
        })
    };
    // The image cache is trimmed now and then to its bound, keeping what pods use.
    let image_gc = {
        let max = cfg.image_cache_max_bytes;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tick.tick().await;
                let freed = images.collect(max);
                if freed > 0 {
                    tracing::info!(freed, "image cache trimmed");
                }
            }
        })
    };
    // Local volumes' data goes some time after their PersistentVolume.
    let volume_gc = {
        let client = client.clone();
        let dir = shared.local_volumes();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(VOLUME_SWEEP);
            loop {
                tick.tick().await;
                if let Err(e) = volumes::sweep(&client, &dir).await {
                    tracing::warn!(error = %e, "local volume sweep failed");
                }
            }
        })
    };
    manage_pods(shared, logs, shutdown).await;
    // The pods' workers are gone, and with them the tasks that would remove each
    // container's mounts once it exited: what is left goes now, so no container, and
    // no overlay mount of one, outlives the node.
    if let Some(rt) = containers {
        rt.remove_leftovers().await;
    }
    heartbeat.abort();
    eviction.abort();
    proxy.abort();
    kubelet.abort();
    drop(sampler);
    image_gc.abort();
    volume_gc.abort();
    Ok(())
}

/// Gives each pod bound to the node a worker, and tells it of the pod's changes, until
/// `shutdown` completes; the workers are aborted then. The same loop runs a real node and
/// a hollow one ([`hollow`]): only the sandboxes differ.
pub async fn manage_pods<S: sandbox::Sandboxes>(
    shared: Arc<worker::Shared<S>>,
    logs: Arc<server::LogIndex>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let client = shared.client.clone();
    let node = shared.node_name.clone();
    let pods: Api<Pod> = Api::all(client);
    let wc = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let mut events = watcher(pods, wc).default_backoff().boxed();
    let mut workers: HashMap<String, Handle> = HashMap::new();
    let mut relist: HashSet<String> = HashSet::new();
    tokio::pin!(shutdown);
    loop {
        let ev = tokio::select! {
            _ = &mut shutdown => break,
            ev = events.next() => match ev { Some(ev) => ev, None => break },
        };
        workers.retain(|_, h| !h.task.is_finished());
        match ev {
            Ok(Event::Apply(p)) | Ok(Event::InitApply(p)) => {
                let uid = p.uid().unwrap_or_default();
                relist.insert(uid.clone());
                let p = Arc::new(p);
                if let Some(h) = workers.get(&uid) {
                    let _ = h.updates.send(Some(p));
                    continue;
                }
                // A pod that finished before this agent started stays finished.
                if baton_kube::pod::is_terminal(&p) && p.metadata.deletion_timestamp.is_none() {
                    continue;
                }
                logs.pods.lock().unwrap_or_else(|e| e.into_inner()).insert(
                    (p.namespace().unwrap_or_default(), p.name_any()),
                    shared.pod_dir(&uid).join("logs"),
                );
                let (tx, rx) = watch::channel(Some(p.clone()));
                let span = tracing::info_span!("pod", pod = %format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any()));
                let task = tokio::spawn(worker::run(shared.clone(), rx).instrument(span));
                workers.insert(uid, Handle { updates: tx, task });
            }
            Ok(Event::Delete(p)) => {
                logs.pods
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&(p.namespace().unwrap_or_default(), p.name_any()));
                if let Some(h) = workers.remove(&p.uid().unwrap_or_default()) {
                    let _ = h.updates.send(None);
                }
            }
            Ok(Event::Init) => relist.clear(),
            Ok(Event::InitDone) => {
                workers.retain(|uid, h| {
                    let keep = relist.contains(uid);
                    if !keep {
                        let _ = h.updates.send(None);
                    }
                    keep
                });
            }
            Err(e) => tracing::warn!(error = %e, "pod watch failed; retrying"),
        }
    }
    let stopping: Vec<_> = workers
        .drain()
        .map(|(_, h)| {
            h.task.abort();
            h.task
        })
        .collect();
    // Dropped, not merely told to stop: each worker's sandbox is released (its
    // namespaces removed) before this returns.
    futures::future::join_all(stopping).await;
}

/// Aborts a background task when the agent stops.
/// The node's container runtime: where runc is installed and the pods' bridge could be
/// made; None, with the reason logged, elsewhere.
async fn linux_runtime(cfg: &NodeConfig, pod_cidr: &str) -> Option<Arc<linux::LinuxRuntime>> {
    let runc = match baton_runc::Runc::new(None, cfg.data_dir.join("runc")) {
        Ok(runc) => runc,
        Err(e) => {
            tracing::info!(reason = %e, "this node runs Wasm components only");
            return None;
        }
    };
    let bridge = match netns::Bridge::for_range(pod_cidr) {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(reason = %e, "this node runs Wasm components only");
            return None;
        }
    };
    if let Err(e) = bridge.up(&cfg.data_dir.join("bridges")).await {
        tracing::warn!(
            reason = %baton_kube::error::chain(&e),
            "this node runs Wasm components only: its pods' bridge cannot be made"
        );
        return None;
    }
    tracing::info!(
        runc = %runc.binary().display(),
        bridge = bridge.name(),
        gateway = %bridge.gateway(),
        "OCI containers run with runc"
    );
    let rt = linux::LinuxRuntime {
        runc,
        dir: cfg.data_dir.join("containers"),
        bridge,
        cluster_domain: "cluster.local".into(),
    };
    rt.remove_leftovers().await;
    Some(Arc::new(rt))
}

/// A task that ends with its owner.
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
