//! The seam between a pod's worker and what runs its containers.
//!
//! The worker ([`crate::worker`]) decides *when* a container starts, restarts, is
//! probed or stopped. A [`Sandbox`] decides *how*: it holds one pod's network and
//! resources, gets images, starts containers from them, probes them and stops them. The
//! node makes one sandbox per pod through its [`Sandboxes`], much as the kubelet asks a
//! CRI runtime for a pod sandbox and then for containers in it.
//!
//! Three implementations are meant to sit behind it:
//! - [`WasmSandboxes`], the node's own: components in wasmtime, through
//!   [`baton_wasm_shim`];
//! - a runc sandbox for OCI containers (a later issue), whose containers share the
//!   pod's network namespace;
//! - [`crate::fake::FakeSandboxes`], whose containers are scripted: the worker's unit
//!   tests run on it with a paused clock, and a hollow node can run thousands of pods on
//!   it without running anything.
//!
//! The worker is generic over the implementation (one level deep: `Worker<S>`), so a
//! sandbox's futures need not be boxed.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use baton_wasm_shim::logs::ContainerLog;
use baton_wasm_shim::{
    CliSpec, Component, ComponentKind, ContainerSpec, ExecIo, ExecSpec, Exit, HttpSpec, Mount,
    NameResolver, PodHandle, Runtime, ShimError,
};
use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::{Container, Probe};

use crate::images::{ImageError, Images};
use crate::probe::ProbeError;
use crate::streams::{ExecError, PodStreams};

/// What the node knows of a pod when it makes its sandbox.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// `namespace/name/uid`: names the pod in the runtime's usage figures.
    pub key: String,
    pub namespace: String,
    /// The pod's address; `localhost` inside the pod is this address.
    pub ip: Ipv4Addr,
    /// The pod's CPU limit in millicores, None for no limit.
    pub cpu_limit: Option<u64>,
    /// Its CPU request in millicores: its share among pods without a limit.
    pub cpu_weight: u64,
    /// What the pod's containers may hold together.
    pub memory_limit: usize,
    /// The pod's name: its containers' hostname.
    pub name: String,
    /// `terminationGracePeriodSeconds`: how long a stopped process has after SIGTERM.
    pub grace: Duration,
    pub security: Option<k8s_openapi::api::core::v1::PodSecurityContext>,
    /// Its `dnsPolicy` and `dnsConfig`, for what its OCI containers resolve with.
    pub dns: crate::dns::PodDns,
    /// `shareProcessNamespace`: its OCI containers share one PID namespace. (A pod's
    /// components always see all of the pod's tasks, through `baton:pod/processes`.)
    pub share_process_namespace: bool,
}

/// How a container lives, which decides how its end is reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lifetime {
    /// Serves until it is stopped (an HTTP component); a graceful stop completes it.
    Server,
    /// Runs until it exits (a CLI component, a process); a stop ends it with an error.
    Process,
}

/// An image, ready to start containers from.
#[derive(Debug, Clone)]
pub struct Pulled<I> {
    pub image: I,
    pub lifetime: Lifetime,
    /// The content digest (the container's `imageID`), for an image from a registry.
    pub digest: Option<String>,
    /// Whether it was transferred now rather than found on the node.
    pub pulled: bool,
}

/// One run of a container.
pub struct ContainerRun<I> {
    pub name: String,
    pub image: I,
    /// The port it serves, for a server.
    pub port: Option<u16>,
    /// `command` followed by `args`.
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub mounts: Vec<Mount>,
    /// Its memory limit in bytes.
    pub memory_bytes: usize,
    /// Where its output goes (this run's log file).
    pub log: ContainerLog,
    /// For a server: serve HTTPS with this (the pod's `baton.dev/tls-volume`).
    pub tls: Option<std::sync::Arc<rustls::ServerConfig>>,
    /// It has a standard input that `kubectl attach` writes to (`stdin: true`).
    pub stdin: bool,
    /// Its standard input ends when the first attached client ends its own.
    pub stdin_once: bool,
    /// The platform interfaces its component is granted, and their backing.
    pub platform: baton_wasm_shim::Platform,
    /// For a WASI 0.3 handler: its instances serve several requests each
    /// (`baton.dev/instance-reuse`).
    pub reuse: Option<baton_wasm_shim::InstanceReuse>,
    /// The container as the pod declares it, for what a sandbox reads beyond the above
    /// (an OCI container's working directory and security context).
    pub spec: Container,
}

impl<I> ContainerRun<I> {
    /// The same run, from another form of its image.
    pub fn with_image<J>(self, image: J) -> ContainerRun<J> {
        ContainerRun {
            name: self.name,
            image,
            port: self.port,
            args: self.args,
            env: self.env,
            mounts: self.mounts,
            memory_bytes: self.memory_bytes,
            log: self.log,
            tls: self.tls,
            stdin: self.stdin,
            stdin_once: self.stdin_once,
            platform: self.platform,
            reuse: self.reuse,
            spec: self.spec,
        }
    }
}

impl<I> std::fmt::Debug for ContainerRun<I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContainerRun")
            .field("name", &self.name)
            .field("port", &self.port)
            .field("args", &self.args)
            .finish_non_exhaustive()
    }
}

/// How a process ends: resolves once it has exited, or with the exit a stop gives it.
pub type ExitFuture = BoxFuture<'static, Exit>;

/// A started container.
pub struct Started {
    /// For a process: its exit. A server has none; it runs until stopped.
    pub exit: Option<ExitFuture>,
}

impl std::fmt::Debug for Started {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Started")
            .field("process", &self.exit.is_some())
            .finish()
    }
}

/// Why a container did not start; each variant is a waiting reason Kubernetes shows.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Its environment could not be set up (a port taken, a mount gone): `StartError`.
    #[error(transparent)]
    Setup(Box<dyn std::error::Error + Send + Sync>),
    /// It could not be made from its image: `CreateContainerError`.
    #[error(transparent)]
    Create(Box<dyn std::error::Error + Send + Sync>),
}

impl StartError {
    pub fn reason(&self) -> &'static str {
        match self {
            StartError::Setup(_) => "StartError",
            StartError::Create(_) => "CreateContainerError",
        }
    }
}

/// One pod's containers, and everything they share.
pub trait Sandbox: Send + Sync + 'static {
    /// What a container starts from.
    type Image: Clone + Send + Sync + 'static;

    /// Whether `image` is on the node already, so that a pull that may use it will not
    /// transfer it (the kubelet's `Pulling` event is for transfers only).
    fn image_present(&self, image: &str) -> bool;

    /// Gets an image for this pod. The image stays on the node while the sandbox lives.
    fn pull(
        &mut self,
        image: &str,
        auth: &baton_oci::Auth,
        policy: baton_oci::PullPolicy,
    ) -> impl Future<Output = Result<Pulled<Self::Image>, ImageError>> + Send;

    /// Starts a container, replacing a running one of the same name.
    fn start(
        &mut self,
        run: ContainerRun<Self::Image>,
    ) -> impl Future<Output = Result<Started, StartError>> + Send;

    /// Stops a container now. Returns once it is gone, its ports free for its restart.
    fn stop(&mut self, name: &str) -> impl Future<Output = ()> + Send;

    /// Runs one attempt of a container's probe, without a deadline (the caller keeps
    /// the probe's timeout).
    fn probe(
        &self,
        container: &Container,
        probe: &Probe,
    ) -> impl Future<Output = Result<(), ProbeError>> + Send + 'static;

    /// Stops everything: servers finish their requests within `grace`, processes end at
    /// once. Returns once nothing of the pod runs, so its address may go to another pod.
    fn shutdown(self, grace: Duration) -> impl Future<Output = ()> + Send;

    /// What `kubectl exec` reaches the pod's containers through, while the pod runs.
    fn streams(&self) -> Arc<dyn PodStreams>;

    /// The address the pod is reached at, when the sandbox gave it one of its own in
    /// place of the loopback address it was created with (a pod that runs OCI containers
    /// has a routed one). Known once every image is pulled.
    fn address(&self) -> Option<Ipv4Addr> {
        None
    }
}

/// Makes a node's sandboxes.
pub trait Sandboxes: Send + Sync + 'static {
    type Sandbox: Sandbox;
    fn create(&self, config: SandboxConfig) -> Self::Sandbox;
}

/// Gives the name resolver of pods in a namespace (Service names), if the node has one.
pub type Resolvers = Arc<dyn Fn(&str) -> NameResolver + Send + Sync>;

/// Wasm components in wasmtime, through [`baton_wasm_shim`].
#[derive(Clone)]
pub struct WasmSandboxes {
    pub runtime: Runtime,
    pub images: Arc<Images>,
    pub resolvers: Option<Resolvers>,
    /// Budget of one HTTP request to a component.
    pub request_timeout: Duration,
}

impl std::fmt::Debug for WasmSandboxes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmSandboxes").finish_non_exhaustive()
    }
}

impl Sandboxes for WasmSandboxes {
    type Sandbox = WasmSandbox;

    fn create(&self, config: SandboxConfig) -> WasmSandbox {
        let names = self.resolvers.as_ref().map(|r| r(&config.namespace));
        let pod = self
            .runtime
            .new_pod(&config.key, IpAddr::V4(config.ip), names);
        pod.set_cpu_limit(config.cpu_limit);
        pod.set_cpu_weight(config.cpu_weight);
        pod.set_memory_limit(Some(config.memory_limit));
        WasmSandbox {
            runtime: self.runtime.clone(),
            images: self.images.clone(),
            key: config.key,
            ip: IpAddr::V4(config.ip),
            request_timeout: self.request_timeout,
            streams: Arc::new(WasmStreams {
                pod: pod.handle(),
                containers: Default::default(),
            }),
            pod: Some(pod),
        }
    }
}

/// One pod's components, sharing its address as their localhost.
pub struct WasmSandbox {
    runtime: Runtime,
    images: Arc<Images>,
    key: String,
    ip: IpAddr,
    request_timeout: Duration,
    streams: Arc<WasmStreams>,
    /// Taken by the shutdown.
    pod: Option<baton_wasm_shim::Pod>,
}

/// `kubectl exec` into a Wasm pod: a new instance of the container's component, as a
/// command, with what the container runs with (its env, mounts and memory limit).
struct WasmStreams {
    pod: PodHandle,
    /// The running containers, by name.
    containers: std::sync::Mutex<std::collections::HashMap<String, ExecTarget>>,
}

#[derive(Clone)]
struct ExecTarget {
    component: Component,
    env: Vec<(String, String)>,
    mounts: Vec<Mount>,
    memory_bytes: usize,
    platform: baton_wasm_shim::Platform,
    /// What the running container writes, for `kubectl attach`.
    log: ContainerLog,
    /// The writing end of its standard input, if it has one; None inside once closed.
    stdin: Option<Arc<tokio::sync::Mutex<Option<tokio::io::DuplexStream>>>>,
    stdin_once: bool,
    /// Becomes true when the container's process ends.
    ended: tokio::sync::watch::Receiver<bool>,
}

impl WasmStreams {
    fn containers(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, ExecTarget>> {
        self.containers.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn target(&self, container: &str) -> Result<ExecTarget, ExecError> {
        self.containers()
            .get(container)
            .cloned()
            .ok_or_else(|| ExecError::NotRunning(container.to_string()))
    }
}

impl PodStreams for WasmStreams {
    fn check(&self, container: &str, command: Option<&[String]>) -> Result<(), ExecError> {
        let target = self.target(container)?;
        match command {
            Some([]) => Err(ExecError::NoCommand),
            Some(_) => self
                .pod
                .can_exec(&target.component, &target.platform)
                .map_err(|source| ExecError::Start {
                    container: container.to_string(),
                    source,
                }),
            None if *target.ended.borrow() => Err(ExecError::NotRunning(container.to_string())),
            None => Ok(()),
        }
    }

    fn exec(
        &self,
        container: &str,
        argv: Vec<String>,
        io: ExecIo,
    ) -> Result<ExitFuture, ExecError> {
        if argv.is_empty() {
            return Err(ExecError::NoCommand);
        }
        let target = self.target(container)?;
        let spec = ExecSpec {
            container: container.to_string(),
            argv,
            env: target.env,
            mounts: target.mounts,
            memory_bytes: target.memory_bytes,
            platform: target.platform,
        };
        let mut run = self
            .pod
            .exec(&target.component, spec, io)
            .map_err(|source| ExecError::Start {
                container: container.to_string(),
                source,
            })?;
        Ok(Box::pin(async move { run.wait().await }))
    }

    fn attach(&self, container: &str, io: ExecIo) -> Result<ExitFuture, ExecError> {
        let target = self.target(container)?;
        let mut ended = target.ended.clone();
        if *ended.borrow() {
            return Err(ExecError::NotRunning(container.to_string()));
        }
        let mut output = target.log.subscribe();
        Ok(Box::pin(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            // The container's process was started without a terminal; it stays without.
            let ExecIo {
                stdin,
                mut stdout,
                mut stderr,
                terminal: _,
            } = io;
            let input = async {
                if let (Some(mut from), Some(to)) = (stdin, target.stdin.clone()) {
                    let mut buf = vec![0u8; 16 << 10];
                    loop {
                        let n = from.read(&mut buf).await.unwrap_or(0);
                        let mut pipe = to.lock().await;
                        if n == 0 {
                            // The client's input ended: so does the container's, once.
                            if target.stdin_once {
                                *pipe = None;
                            }
                            break;
                        }
                        let Some(p) = pipe.as_mut() else { break };
                        if p.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
                std::future::pending::<()>().await
            };
            let output = async {
                loop {
                    // Output first: what the process wrote before it ended is queued
                    // before its end, and still goes out.
                    let next = tokio::select! {
                        biased;
                        m = output.recv() => m,
                        _ = ended.wait_for(|e| *e) => return,
                    };
                    let written = match next {
                        Ok((0, b)) => stdout.write_all(&b).await,
                        Ok((_, b)) => stderr.write_all(&b).await,
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => Ok(()),
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    };
                    if written.is_err() {
                        return;
                    }
                }
            };
            tokio::select! {
                _ = output => {}
                _ = input => {}
            }
            Exit {
                code: 0,
                reason: "Completed",
                message: String::new(),
            }
        }))
    }

    fn connect(&self, port: u16) -> BoxFuture<'static, std::io::Result<tokio::net::TcpStream>> {
        // The pod's address is on the node: its listeners are the node's sockets.
        let ip = self.pod.ip();
        Box::pin(tokio::net::TcpStream::connect((ip, port)))
    }
}

impl std::fmt::Debug for WasmSandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmSandbox")
            .field("key", &self.key)
            .field("ip", &self.ip)
            .finish_non_exhaustive()
    }
}

impl Drop for WasmSandbox {
    fn drop(&mut self) {
        self.images.release(&self.key);
    }
}

impl WasmSandbox {
    /// Takes a component got for this pod: holds its layer, and learns its lifetime.
    fn accept(
        &mut self,
        image: &str,
        got: crate::images::Image,
    ) -> Result<Pulled<Component>, ImageError> {
        if let Some(d) = &got.digest {
            self.images.hold(&self.key, d);
        }
        let lifetime = match self.runtime.kind(&got.component) {
            Ok(ComponentKind::Http) => Lifetime::Server,
            Ok(ComponentKind::Cli) => Lifetime::Process,
            Err(source) => {
                return Err(ImageError::Invalid {
                    image: image.into(),
                    source,
                })
            }
        };
        Ok(Pulled {
            image: got.component,
            lifetime,
            digest: got.digest,
            pulled: got.pulled,
        })
    }
}

impl WasmSandbox {
    /// Moves the pod's components into the network namespace `ns` (see
    /// [`baton_wasm_shim::Pod::join_network_namespace`]).
    pub fn join_network_namespace(
        &self,
        ns: Arc<baton_wasm_shim::NetworkNamespace>,
        names: Option<NameResolver>,
    ) {
        if let Some(pod) = &self.pod {
            pod.join_network_namespace(ns, names);
        }
    }
}

impl Sandbox for WasmSandbox {
    type Image = Component;

    fn image_present(&self, image: &str) -> bool {
        self.images.present(image)
    }

    async fn pull(
        &mut self,
        image: &str,
        auth: &baton_oci::Auth,
        policy: baton_oci::PullPolicy,
    ) -> Result<Pulled<Component>, ImageError> {
        let got = self.images.get(image, auth, policy).await?;
        self.accept(image, got)
    }

    async fn start(&mut self, run: ContainerRun<Component>) -> Result<Started, StartError> {
        let pod = self
            .pod
            .as_mut()
            .ok_or_else(|| StartError::Setup("the pod's sandbox is shut down".into()))?;
        let name = run.name.clone();
        let (stdin_pipe, stdin_writer) = if run.stdin {
            let (w, r) = tokio::io::duplex(64 << 10);
            (
                Some(baton_wasm_shim::StdinPipe::new(r)),
                Some(Arc::new(tokio::sync::Mutex::new(Some(w)))),
            )
        } else {
            (None, None)
        };
        let (ended_tx, ended) = tokio::sync::watch::channel(false);
        let target = ExecTarget {
            component: run.image.clone(),
            env: run.env.clone(),
            mounts: run.mounts.clone(),
            memory_bytes: run.memory_bytes,
            platform: run.platform.clone(),
            log: run.log.clone(),
            stdin: stdin_writer,
            stdin_once: run.stdin_once,
            ended,
        };
        let spec = ContainerSpec {
            name: run.name,
            component: run.image,
            port: run.port,
            cli: CliSpec {
                stdin: stdin_pipe,
                args: run.args,
                env: run.env.clone(),
                mounts: run.mounts.clone(),
                memory_bytes: run.memory_bytes,
                timeout: None,
                network: true,
                output_limit: 0,
                log: Some(run.log.clone()),
                platform: run.platform.clone(),
            },
            http: HttpSpec {
                env: run.env,
                mounts: run.mounts,
                tls: run.tls,
                memory_bytes: run.memory_bytes,
                request_timeout: Some(self.request_timeout),
                log: Some(run.log),
                platform: run.platform,
                reuse: run.reuse,
            },
        };
        pod.start_container(&self.runtime, spec)
            .await
            .map_err(|e| match e {
                ShimError::Setup(_) => StartError::Setup(Box::new(e)),
                e => StartError::Create(Box::new(e)),
            })?;
        self.streams.containers().insert(name.clone(), target);
        let exit = pod.take_process(&name).map(|task| -> ExitFuture {
            Box::pin(async move {
                // Attached clients end with the process.
                let _ended = ended_tx;
                match task.await {
                    Ok(Ok(out)) => out.exit,
                    Ok(Err(e)) => Exit {
                        code: 128,
                        reason: "Error",
                        message: baton_kube::error::chain(&e),
                    },
                    // A stopped process ends as SIGTERM's default action ends one.
                    Err(e) if e.is_cancelled() => Exit {
                        code: 143,
                        reason: "Error",
                        message: String::new(),
                    },
                    Err(e) => Exit {
                        code: 128,
                        reason: "Error",
                        message: format!("container task failed: {e}"),
                    },
                }
            })
        });
        Ok(Started { exit })
    }

    async fn stop(&mut self, name: &str) {
        self.streams.containers().remove(name);
        if let Some(pod) = &mut self.pod {
            pod.stop_container(name).await;
        }
    }

    fn probe(
        &self,
        container: &Container,
        probe: &Probe,
    ) -> impl Future<Output = Result<(), ProbeError>> + Send + 'static {
        let (ip, container, probe) = (self.ip, container.clone(), probe.clone());
        async move { crate::probe::check(&probe, ip, &container).await }
    }

    async fn shutdown(mut self, grace: Duration) {
        self.streams.containers().clear();
        if let Some(pod) = self.pod.take() {
            pod.shutdown(grace).await;
        }
    }

    fn streams(&self) -> Arc<dyn PodStreams> {
        self.streams.clone()
    }
}

/// The node's pods: their components in a [`WasmSandbox`] each, and, on a node that runs
/// OCI containers (runc was found), their Linux containers in a
/// [`crate::linux::LinuxPod`]. Which one runs a container is decided by what its image
/// turns out to be.
#[derive(Clone)]
pub struct PodSandboxes {
    pub wasm: WasmSandboxes,
    pub linux: Option<Arc<crate::linux::LinuxRuntime>>,
    /// The name resolvers of pods with a network namespace (Services at ClusterIPs).
    pub routed_resolvers: Option<Resolvers>,
}

impl std::fmt::Debug for PodSandboxes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodSandboxes")
            .field("linux", &self.linux)
            .finish_non_exhaustive()
    }
}

/// A container's image in a pod of both kinds.
#[derive(Clone, Debug)]
pub enum PodImage {
    Wasm(Component),
    Linux(Arc<crate::linux::LinuxImage>),
}

/// One pod of components and Linux containers.
pub struct PodSandbox {
    wasm: WasmSandbox,
    linux: Option<crate::linux::LinuxPod>,
    /// The loopback address it was created with.
    ip: Ipv4Addr,
    /// Its routed address, once an image turned out to be a Linux one: the pod then has
    /// a network namespace, which its components join before the first of them starts.
    routed: Option<Ipv4Addr>,
    /// What its components resolve names with, inside the namespace.
    routed_names: Option<NameResolver>,
    joined: bool,
    /// Whether a container has started: a pod's network is settled by then.
    started: bool,
    streams: Arc<PodStreamsOfBoth>,
}

impl std::fmt::Debug for PodSandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodSandbox")
            .field("ip", &self.ip)
            .field("routed", &self.routed)
            .field("linux", &self.linux)
            .finish_non_exhaustive()
    }
}

impl Sandboxes for PodSandboxes {
    type Sandbox = PodSandbox;

    fn create(&self, config: SandboxConfig) -> PodSandbox {
        let uid = config.key.rsplit('/').next().unwrap_or("").to_string();
        let linux = self.linux.as_ref().map(|rt| {
            crate::linux::LinuxPod::new(
                rt.clone(),
                crate::linux::PodLinux {
                    uid,
                    name: config.name.clone(),
                    namespace: config.namespace.clone(),
                    ip: rt.bridge.routed(config.ip),
                    dns: config.dns.clone(),
                    share_process_namespace: config.share_process_namespace,
                    grace: config.grace,
                    security: config.security.clone(),
                },
            )
        });
        let routed_names = self
            .routed_resolvers
            .as_ref()
            .filter(|_| linux.is_some())
            .map(|r| r(&config.namespace));
        let ip = config.ip;
        let wasm = self.wasm.create(config);
        let streams = Arc::new(PodStreamsOfBoth {
            wasm: wasm.streams(),
            linux: linux.as_ref().map(|l| l.streams()),
        });
        PodSandbox {
            wasm,
            linux,
            ip,
            routed: None,
            routed_names,
            joined: false,
            started: false,
            streams,
        }
    }
}

impl Sandbox for PodSandbox {
    type Image = PodImage;

    fn image_present(&self, image: &str) -> bool {
        self.wasm.images.present(image)
    }

    async fn pull(
        &mut self,
        image: &str,
        auth: &baton_oci::Auth,
        policy: baton_oci::PullPolicy,
    ) -> Result<Pulled<PodImage>, ImageError> {
        let images = self.wasm.images.clone();
        let got = if self.linux.is_some() {
            images.get_any(image, auth, policy).await?
        } else {
            match images.get(image, auth, policy).await {
                Err(ImageError::Pull(baton_oci::OciError::LinuxImage { .. })) => {
                    return Err(ImageError::NoRuntime {
                        image: image.into(),
                    })
                }
                got => crate::images::AnyImage::Wasm(got?),
            }
        };
        match got {
            crate::images::AnyImage::Wasm(got) => {
                let p = self.wasm.accept(image, got)?;
                Ok(Pulled {
                    image: PodImage::Wasm(p.image),
                    lifetime: p.lifetime,
                    digest: p.digest,
                    pulled: p.pulled,
                })
            }
            crate::images::AnyImage::Linux {
                image: linux,
                pulled,
            } => {
                // A pod's components that run already keep their network: a Linux
                // container cannot join them later (`kubectl debug` with a Linux image
                // on a pod of components).
                if self.started && self.routed.is_none() {
                    return Err(ImageError::Refused {
                        image: image.into(),
                        why: "a Linux container image cannot join a running pod of Wasm \
                              components (its network has no namespace); debug it with a \
                              component image"
                            .into(),
                    });
                }
                if let Some(l) = &self.linux {
                    self.routed = Some(l.ip());
                }
                for d in linux.image.digests() {
                    images.hold(&self.wasm.key, &d);
                }
                Ok(Pulled {
                    digest: Some(linux.image.manifest_digest.clone()),
                    image: PodImage::Linux(linux),
                    lifetime: Lifetime::Process,
                    pulled,
                })
            }
        }
    }

    async fn start(&mut self, run: ContainerRun<PodImage>) -> Result<Started, StartError> {
        // A pod with a Linux container has its namespace before anything of it runs, so
        // that its components' sockets are made in there from the first one on.
        self.started = true;
        if let (Some(linux), Some(_), false) = (self.linux.as_mut(), self.routed, self.joined) {
            let ns = linux.netns().await?;
            self.wasm
                .join_network_namespace(ns.namespace().clone(), self.routed_names.clone());
            self.joined = true;
        }
        match run.image.clone() {
            PodImage::Wasm(c) => self.wasm.start(run.with_image(c)).await,
            PodImage::Linux(l) => {
                let linux = self.linux.as_mut().ok_or_else(|| {
                    StartError::Create(
                        "this node runs no OCI containers (runc was not found)".into(),
                    )
                })?;
                let spec = run.spec.clone();
                let exit = linux.start(run.with_image(l), &spec).await?;
                Ok(Started { exit: Some(exit) })
            }
        }
    }

    async fn stop(&mut self, name: &str) {
        match &mut self.linux {
            Some(linux) if linux.has(name) => linux.stop(name).await,
            _ => self.wasm.stop(name).await,
        }
    }

    fn probe(
        &self,
        container: &Container,
        probe: &Probe,
    ) -> impl Future<Output = Result<(), ProbeError>> + Send + 'static {
        let ip = IpAddr::V4(self.routed.unwrap_or(self.ip));
        let (container, probe) = (container.clone(), probe.clone());
        let linux = self.streams.linux_for(&container.name).cloned();
        async move {
            match linux {
                // A command, run in the container as `kubectl exec` runs one.
                Some(streams) if probe.exec.is_some() => {
                    let argv = probe
                        .exec
                        .as_ref()
                        .and_then(|e| e.command.clone())
                        .unwrap_or_default();
                    let io = ExecIo {
                        stdin: None,
                        stdout: Box::new(tokio::io::sink()),
                        stderr: Box::new(tokio::io::sink()),
                        terminal: None,
                    };
                    let exit = streams
                        .exec(&container.name, argv, io)
                        .map_err(|e| ProbeError::Exec(baton_kube::error::chain(&e)))?
                        .await;
                    match exit.code {
                        0 => Ok(()),
                        code => Err(ProbeError::ExitCode(code)),
                    }
                }
                // At the pod's address: the node reaches a pod behind the bridge too.
                _ => crate::probe::check(&probe, ip, &container).await,
            }
        }
    }

    async fn shutdown(self, grace: Duration) {
        let linux = async {
            if let Some(l) = self.linux {
                l.shutdown(grace).await;
            }
        };
        tokio::join!(self.wasm.shutdown(grace), linux);
    }

    fn streams(&self) -> Arc<dyn PodStreams> {
        self.streams.clone()
    }

    fn address(&self) -> Option<Ipv4Addr> {
        self.routed
    }
}

/// The streams of a pod of both kinds: a command goes to the half that runs its
/// container; a port is reached in the pod's namespace if it has one, else among its
/// components.
struct PodStreamsOfBoth {
    wasm: Arc<dyn PodStreams>,
    linux: Option<crate::linux::LinuxStreams>,
}

impl PodStreamsOfBoth {
    fn linux_for(&self, container: &str) -> Option<&crate::linux::LinuxStreams> {
        self.linux.as_ref().filter(|l| l.has(container))
    }
}

impl std::fmt::Debug for PodStreamsOfBoth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodStreamsOfBoth").finish_non_exhaustive()
    }
}

impl PodStreams for PodStreamsOfBoth {
    fn check(&self, container: &str, command: Option<&[String]>) -> Result<(), ExecError> {
        match self.linux_for(container) {
            Some(l) => l.check(container, command),
            None => self.wasm.check(container, command),
        }
    }

    fn exec(
        &self,
        container: &str,
        argv: Vec<String>,
        io: ExecIo,
    ) -> Result<ExitFuture, ExecError> {
        match self.linux_for(container) {
            Some(l) => l.exec(container, argv, io),
            None => self.wasm.exec(container, argv, io),
        }
    }

    fn attach(&self, container: &str, io: ExecIo) -> Result<ExitFuture, ExecError> {
        match self.linux_for(container) {
            Some(l) => l.attach(container, io),
            None => self.wasm.attach(container, io),
        }
    }

    fn connect(&self, port: u16) -> BoxFuture<'static, std::io::Result<tokio::net::TcpStream>> {
        match self.linux.as_ref().filter(|l| l.has_netns()) {
            // Everything of a pod with a namespace listens in there: its error is the one.
            Some(linux) => linux.connect(port),
            None => self.wasm.connect(port),
        }
    }
}
