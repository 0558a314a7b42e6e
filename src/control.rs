//! Wiring the control loops into the binary: the scheduler and the controller manager
//! (`baton up`, `baton server --api-listen`), and the node agent (`baton up`, `baton node`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use baton_apiserver::Pki;
use baton_node::NodeConfig;
use clap::Args;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Tells the loops started here to stop, and waits for them.
pub struct Loops {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Loops {
    pub fn new() -> Self {
        Self {
            stop: watch::channel(false).0,
            tasks: Vec::new(),
        }
    }

    /// A future that completes when [`Loops::shutdown`] is called.
    fn stopped(&self) -> impl std::future::Future<Output = ()> + Send + Sync + 'static {
        let mut rx = self.stop.subscribe();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    }

    /// Runs the scheduler and the controllers, each with its own credentials, as clients of
    /// the API server `local` in this process ([`in_process_client`]).
    pub async fn start_control_plane(
        &mut self,
        pki: &Pki,
        local: &LocalApi,
        mut config: baton_controllers::Config,
    ) -> Result<()> {
        config.root_ca.get_or_insert_with(|| pki.ca_pem.clone());
        config
            .signer
            .get_or_insert_with(|| baton_controllers::csr::Signer {
                ca_pem: pki.ca_pem.clone(),
                ca_key_pem: pki.ca_key_pem().to_string(),
            });
        let client = in_process_client(pki, local, "system:kube-controller-manager").await?;
        let scheduler = in_process_client(pki, local, "system:kube-scheduler").await?;
        self.tasks.push(tokio::spawn(baton_scheduler::run(
            scheduler,
            self.stopped(),
        )));
        self.tasks.push(tokio::spawn(baton_controllers::run(
            client,
            config,
            self.stopped(),
        )));
        Ok(())
    }

    /// Runs the scheduler and the controllers on whichever member of a replicated control
    /// plane holds the `kube-system/baton-control-plane` Lease, as clients of this
    /// member's API server `local`.
    pub async fn start_elected_control_plane(
        &mut self,
        pki: &Pki,
        local: &LocalApi,
        identity: String,
        mut config: baton_controllers::Config,
    ) -> Result<()> {
        config.root_ca.get_or_insert_with(|| pki.ca_pem.clone());
        config
            .signer
            .get_or_insert_with(|| baton_controllers::csr::Signer {
                ca_pem: pki.ca_pem.clone(),
                ca_key_pem: pki.ca_key_pem().to_string(),
            });
        let client = in_process_client(pki, local, "system:kube-controller-manager").await?;
        let scheduler = in_process_client(pki, local, "system:kube-scheduler").await?;
        let election =
            baton_kube::leader::Election::new("kube-system", "baton-control-plane", &identity);
        let stopped = self.stopped();
        self.tasks.push(tokio::spawn(baton_kube::leader::run(
            client.clone(),
            election,
            stopped,
            move |lost| {
                let (client, scheduler, config) =
                    (client.clone(), scheduler.clone(), config.clone());
                async move {
                    let until = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
                        let _ = rx.wait_for(|s| *s).await;
                    };
                    tokio::join!(
                        baton_scheduler::run(scheduler, until(lost.clone())),
                        baton_controllers::run(client, config, until(lost)),
                    );
                }
            },
        )));
        Ok(())
    }

    /// Runs a node agent with `client`'s credentials.
    pub fn start_node(&mut self, client: kube::Client, cfg: NodeConfig) {
        let stopped = self.stopped();
        self.tasks.push(tokio::spawn(async move {
            if let Err(e) = baton_node::run(client, cfg, stopped).await {
                tracing::error!(error = %e, "the node agent stopped");
            }
        }));
    }

    /// Stops every loop, waiting a little for them to finish what they are doing.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let all = futures::future::join_all(self.tasks);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), all).await;
    }
}

/// A kube client for one of the cluster's users, from the cluster's own PKI.
pub async fn client_for(pki: &Pki, server: &str, user: &str) -> Result<kube::Client> {
    baton_kube::client::from_yaml(&kubeconfig_for(pki, server, user)?)
        .await
        .with_context(|| format!("failed to build a client for {user}"))
}

/// The kubeconfig of one of the cluster's users, with its token.
fn kubeconfig_for(pki: &Pki, server: &str, user: &str) -> Result<String> {
    let token = pki
        .token_of(user)
        .with_context(|| format!("the cluster has no token for {user}"))?;
    Ok(pki.kubeconfig(server, user, &token))
}

/// An API server in this process: its address, for the kubeconfig, and its routes.
#[derive(Clone, Debug)]
pub struct LocalApi {
    pub server: String,
    pub routes: axum::Router,
}

/// A kube client for one of the cluster's users that hands its requests to the API server
/// in this process rather than connecting to it ([`baton_kube::client::in_process`]).
/// The control loops run where an API server runs, and are its busiest clients; their
/// requests still carry the user's token, and meet authentication, authorisation and
/// priority and fairness as a remote client's do.
pub async fn in_process_client(pki: &Pki, local: &LocalApi, user: &str) -> Result<kube::Client> {
    let kubeconfig = kubeconfig_for(pki, &local.server, user)?;
    baton_kube::client::in_process(&kubeconfig, local.routes.clone())
        .await
        .with_context(|| format!("failed to build a client for {user}"))
}

/// Options of a node agent.
#[derive(Args, Debug, Clone)]
pub struct NodeArgs {
    /// The node's name.
    #[arg(long = "node-name", default_value = "local")]
    pub name: String,
    /// The node's address: its InternalIP, where NodePorts listen.
    #[arg(long = "node-address", default_value = "127.0.0.1")]
    pub address: String,
    /// The loopback range the node's pods get addresses from; by default the range the
    /// control plane assigns the node.
    #[arg(long = "pod-cidr")]
    pub pod_cidr: Option<String>,
    /// Port of the node's HTTPS endpoint (container logs, for the API server); 0 picks a
    /// free one, which the node publishes in its status.
    #[arg(long = "kubelet-port", default_value_t = 0)]
    pub kubelet_port: u16,
    /// Serve images that are paths on this node (`/DIR/x.wasm`, `file:///DIR/x.wasm`)
    /// from this directory; repeatable. Without it, an image must be an OCI reference:
    /// a pod spec cannot name the node's files.
    #[arg(long = "local-images", value_name = "DIR")]
    pub local_images: Vec<PathBuf>,
    /// Allow hostPath volumes under this node directory; repeatable. Without it, every
    /// hostPath volume is refused.
    #[arg(long = "allow-host-path", value_name = "DIR")]
    pub allow_host_path: Vec<PathBuf>,
    /// The memory limit of a container that sets none (bytes, or a quantity such as
    /// 64Mi): charged against the node's memory, and enforced.
    #[arg(long = "default-memory-limit", default_value = "64Mi")]
    pub default_memory_limit: String,
    /// Below this much available memory on the machine, the node is under memory
    /// pressure and evicts pods (BestEffort first), as the kubelet's
    /// `--eviction-hard=memory.available<100Mi`.
    #[arg(long = "eviction-hard-memory", default_value = "100Mi")]
    pub eviction_hard_memory: String,
    /// Seconds the node's Lease is valid for, as the kubelet's `nodeLeaseDurationSeconds`;
    /// the node renews it every quarter of that. The control plane's
    /// `--node-monitor-grace` should be at least this long, or a live node looks lost
    /// between two renewals.
    #[arg(long = "node-lease-duration", default_value_t = 40, value_parser = clap::value_parser!(u64).range(1..))]
    pub node_lease_duration: u64,
    /// Port the node serves Ingresses on over HTTP, at its address; 0 picks a free one
    /// (published in the Node's `baton.dev/ingress-http-port` annotation).
    #[arg(long = "ingress-http-port", default_value_t = 80)]
    pub ingress_http_port: u16,
    /// Port the node serves Ingresses on over HTTPS; 0 picks a free one
    /// (`baton.dev/ingress-https-port`).
    #[arg(long = "ingress-https-port", default_value_t = 443)]
    pub ingress_https_port: u16,
    /// Serve no Ingresses on this node (as k3s's `--disable traefik`).
    #[arg(long = "disable-ingress")]
    pub disable_ingress: bool,
    /// Seconds a request for a workload scaled to zero (by an autoscaler with
    /// `minReplicas: 0`) is held while the node wakes it; 0 refuses such requests at once.
    #[arg(long = "scale-from-zero-timeout", default_value_t = 30)]
    pub scale_from_zero_timeout: u64,
    #[command(flatten)]
    pub registry: crate::oci_cli::RegistryArgs,
}

impl NodeArgs {
    pub fn config(&self, data_dir: PathBuf) -> Result<NodeConfig> {
        let mut cfg = NodeConfig::new(&self.name, data_dir.clone());
        cfg.oci = self.registry.oci_config(data_dir.join("images"))?;
        cfg.address = self.address.clone();
        cfg.pod_cidr = self.pod_cidr.clone();
        cfg.kubelet_port = self.kubelet_port;
        cfg.heartbeat = Duration::from_secs(self.node_lease_duration) / 4;
        cfg.local_images = self.local_images.clone();
        cfg.runtime.guest_spans = crate::otel::guest_spans();
        if !self.disable_ingress {
            let ip: std::net::IpAddr = self.address.parse().map_err(|_| {
                anyhow::anyhow!("--node-address {:?} is not an IP address", self.address)
            })?;
            cfg.ingress_http = Some(std::net::SocketAddr::new(ip, self.ingress_http_port));
            cfg.ingress_https = Some(std::net::SocketAddr::new(ip, self.ingress_https_port));
        }
        cfg.scale_from_zero = (self.scale_from_zero_timeout > 0)
            .then(|| Duration::from_secs(self.scale_from_zero_timeout));
        cfg.settings.allowed_host_paths = self.allow_host_path.clone();
        cfg.default_memory_limit = baton_kube::quantity::whole(&self.default_memory_limit)
            .map_err(|e| anyhow::anyhow!("--default-memory-limit: {e}"))?;
        cfg.eviction_hard_memory = baton_kube::quantity::whole(&self.eviction_hard_memory)
            .map_err(|e| anyhow::anyhow!("--eviction-hard-memory: {e}"))?;
        Ok(cfg)
    }
}
