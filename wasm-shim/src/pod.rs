//! A pod: several components started together, sharing one virtual localhost (see
//! `net.rs` for how `localhost` is made the pod's own).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use wasmtime::component::Component;

use crate::cli::{CliOutcome, CliSpec};
use crate::error::ShimError;
use crate::exec::{Executions, PodHandle};
use crate::http::{HttpServer, HttpSpec};
use crate::net::{NameResolver, PodNet};
use crate::runtime::{ComponentKind, Runtime};
use crate::usage::{TaskCommand, TaskKind};

/// One container of a pod.
#[derive(Clone)]
pub struct ContainerSpec {
    pub name: String,
    pub component: Component,
    /// For HTTP components: the port they serve (their container port).
    pub port: Option<u16>,
    pub cli: CliSpec,
    pub http: HttpSpec,
}

impl std::fmt::Debug for ContainerSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContainerSpec")
            .field("name", &self.name)
            .field("port", &self.port)
            .finish()
    }
}

/// A pod to start.
#[derive(Clone)]
pub struct PodSpec {
    pub name: String,
    /// The pod's own loopback address; `localhost` inside the pod means this.
    pub ip: IpAddr,
    pub containers: Vec<ContainerSpec>,
    /// Names the pod's components resolve beyond `localhost` (Services); None leaves every
    /// other name to the host's resolver.
    pub names: Option<NameResolver>,
}

impl std::fmt::Debug for PodSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodSpec")
            .field("name", &self.name)
            .field("ip", &self.ip)
            .field("containers", &self.containers)
            .field("names", &self.names.is_some())
            .finish()
    }
}

/// A running pod; its components stop when it is dropped.
#[derive(Debug)]
pub struct Pod {
    pub ip: IpAddr,
    net: Arc<PodNet>,
    servers: Vec<(String, HttpServer)>,
    processes: Vec<Process>,
    execs: Arc<Executions>,
    rt: Runtime,
}

/// A CLI container's task. The pod keeps the right to abort it even after handing out
/// the handle that awaits its exit: the pod, not whoever waits, decides when it stops.
#[derive(Debug)]
struct Process {
    name: String,
    abort: tokio::task::AbortHandle,
    task: Option<JoinHandle<Result<CliOutcome, ShimError>>>,
    gone: Gone,
}

impl Process {
    /// Aborts the process and waits until its future, with the sockets it holds, is gone.
    async fn stop(self) {
        self.abort.abort();
        self.gone.wait().await;
    }
}

/// How long a stop waits for a task's future to be dropped after aborting it: an abort
/// takes effect at the task's next poll, which a guest thread gives within an epoch
/// tick, unless the node is badly overloaded.
pub(crate) const GONE_WAIT: Duration = Duration::from_secs(10);

/// Tells when a task's future has been dropped, whether it finished or was aborted, and
/// with it every socket and listener it held. Aborting a tokio task only schedules its
/// drop, and a guest task may be on the long tier's threads; a stop that must free the
/// pod's ports waits for this.
#[derive(Debug)]
pub(crate) struct Gone(tokio::sync::oneshot::Receiver<()>);

/// Held by the task's future; its drop is the signal.
pub(crate) struct GoneGuard {
    _signal: tokio::sync::oneshot::Sender<()>,
}

impl Gone {
    pub fn new() -> (GoneGuard, Gone) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        (GoneGuard { _signal: tx }, Gone(rx))
    }

    pub async fn wait(self) {
        if tokio::time::timeout(GONE_WAIT, self.0).await.is_err() {
            tracing::warn!("a stopped container's task is still not gone after {GONE_WAIT:?}");
        }
    }
}

impl Pod {
    /// Where the node reaches an HTTP container.
    pub fn http_addr(&self, container: &str) -> Option<SocketAddr> {
        self.servers
            .iter()
            .find(|(n, _)| n == container)
            .map(|(_, s)| s.local_addr())
    }

    /// TCP sockets the pod's components hold open now.
    pub fn open_sockets(&self) -> usize {
        self.net.open_sockets()
    }

    /// Limits the pod's CPU to `millis` millicores, summed over all its instances, per
    /// [`crate::CPU_PERIOD`]; None lifts the limit.
    pub fn set_cpu_limit(&self, millis: Option<u64>) {
        self.net.usage.set_cpu_limit(millis);
    }

    /// The pod's weight among pods without a CPU limit: its CPU request in millicores.
    pub fn set_cpu_weight(&self, request_millis: u64) {
        self.net.usage.set_cpu_weight(request_millis);
    }

    /// Limits the linear memory of all the pod's instances together (None: no limit
    /// beyond each instance's own).
    pub fn set_memory_limit(&self, bytes: Option<usize>) {
        self.net.usage.set_memory_limit(bytes);
    }

    /// Waits for a CLI container to finish.
    pub async fn wait(&mut self, container: &str) -> Option<Result<CliOutcome, ShimError>> {
        let task = self.take_process(container)?;
        Some(
            task.await
                .unwrap_or_else(|e| Err(ShimError::Setup(format!("container task failed: {e}")))),
        )
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        for p in &self.processes {
            p.abort.abort();
        }
        self.execs.abort_all();
    }
}

impl Pod {
    /// Starts one container in the pod, replacing (and stopping) a running one of the same
    /// name: HTTP components listen on `podIP:port`, CLI components run as processes
    /// whose exit [`Pod::take_process`] hands out.
    pub async fn start_container(
        &mut self,
        rt: &Runtime,
        c: ContainerSpec,
    ) -> Result<(), ShimError> {
        self.stop_container(&c.name).await;
        let info = rt.describe(&c.component)?;
        let kind = info.kind;
        self.net.usage.tally(&c.name).describe(info);
        match kind {
            ComponentKind::Http => {
                let port = c.port.ok_or_else(|| {
                    ShimError::Setup(format!("HTTP container {} has no port", c.name))
                })?;
                let listener = match self.net.netns() {
                    // Every address inside, as a container's server would listen.
                    Some(ns) => ns.listen(port).map_err(|e| {
                        ShimError::Setup(format!(
                            "container {} cannot listen on port {port} in the pod's network \
                             namespace: {e}",
                            c.name
                        ))
                    })?,
                    None => {
                        let addr = SocketAddr::new(self.ip, port);
                        tokio::net::TcpListener::bind(addr).await.map_err(|e| {
                            ShimError::Setup(format!(
                                "container {} cannot listen on {addr}: {e}",
                                c.name
                            ))
                        })?
                    }
                };
                let server = rt.serve_http_with(
                    &c.component,
                    c.http.clone(),
                    listener,
                    self.net.clone(),
                    Some(&c.name),
                )?;
                self.servers.push((c.name, server));
            }
            ComponentKind::Cli => {
                // Refused here, before its process starts, so that the refusal is the
                // start's error rather than the process's exit.
                c.cli.platform.admit(&rt.imports(&c.component))?;
                rt.check_links(&c.component)?;
                let rt2 = rt.clone();
                let name = c.name.clone();
                let net = self.net.clone();
                let usage = net.usage.clone();
                let mut argv = vec![c.name.clone()];
                argv.extend(c.cli.args.iter().cloned());
                let task = usage.task(&c.name, TaskKind::Process, TaskCommand::Argv(argv));
                let store_task = task.clone();
                let (task, gone) = rt.spawn_guest_tracked(&usage, Some(task), async move {
                    rt2.run_cli_with(&c.component, &c.name, &c.cli, net, Some(store_task))
                        .await
                });
                self.processes.push(Process {
                    name,
                    abort: task.abort_handle(),
                    task: Some(task),
                    gone,
                });
            }
        }
        Ok(())
    }

    /// Stops every container: HTTP servers stop taking connections and finish their
    /// requests within `grace`; processes are stopped at once (a component has no signal
    /// to catch, so it gets what SIGTERM's default action gives a process). Returns once
    /// everything the pod ran is gone, so that its address can be given to another pod.
    pub async fn shutdown(mut self, grace: Duration) {
        type Stop = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;
        // The processes end now, while the servers finish their requests.
        let processes = self
            .processes
            .drain(..)
            .map(|p| -> Stop { Box::pin(p.stop()) });
        let servers = self
            .servers
            .drain(..)
            .map(|(_, s)| -> Stop { Box::pin(s.shutdown(grace)) });
        futures_join(processes.chain(servers)).await;
        self.execs.close().await;
    }

    /// Gives the pod the network namespace `ns` (its OCI containers'), with `names` as
    /// its resolver there: the components started from now on make their sockets inside
    /// it, and `localhost` is the namespace's. Call before the first component starts.
    pub fn join_network_namespace(
        &self,
        ns: Arc<crate::netns::NetworkNamespace>,
        names: Option<NameResolver>,
    ) {
        self.net.route(ns, names);
    }

    /// A handle that starts executions in the pod (`kubectl exec`) while its owner keeps
    /// the pod; the pod's shutdown stops them.
    pub fn handle(&self) -> PodHandle {
        PodHandle {
            rt: self.rt.clone(),
            net: self.net.clone(),
            execs: self.execs.clone(),
        }
    }

    /// Stops a container now: its HTTP listener closes, its process is aborted. Returns
    /// once they are gone, so that a restart can bind the same ports.
    pub async fn stop_container(&mut self, name: &str) {
        let (servers, keep): (Vec<_>, Vec<_>) =
            self.servers.drain(..).partition(|(n, _)| n == name);
        self.servers = keep;
        let (processes, keep): (Vec<_>, Vec<_>) =
            self.processes.drain(..).partition(|p| p.name == name);
        self.processes = keep;
        for (_, server) in servers {
            server.shutdown(Duration::ZERO).await;
        }
        for p in processes {
            p.stop().await;
        }
    }

    /// The task of a CLI container, to await its exit. The pod still stops it (when the
    /// container is stopped or the pod is dropped); the awaiting side then sees it
    /// cancelled.
    pub fn take_process(
        &mut self,
        name: &str,
    ) -> Option<JoinHandle<Result<CliOutcome, ShimError>>> {
        self.processes
            .iter_mut()
            .find(|p| p.name == name)
            .and_then(|p| p.task.take())
    }
}

impl Runtime {
    /// An empty pod: its network, no containers yet. `key` names it in
    /// [`Runtime::usage`] (the node uses `namespace/name/uid`).
    pub fn new_pod(&self, key: &str, ip: IpAddr, names: Option<NameResolver>) -> Pod {
        let net = PodNet::new(ip, names, self.config().net_limits, self.tls.clone());
        self.pods.add(key.to_string(), &net);
        Pod {
            ip,
            net,
            servers: Vec::new(),
            processes: Vec::new(),
            execs: Arc::new(Executions::new()),
            rt: self.clone(),
        }
    }

    /// Starts every container of a pod.
    pub async fn start_pod(&self, spec: PodSpec) -> Result<Pod, ShimError> {
        let mut pod = self.new_pod(&spec.name, spec.ip, spec.names);
        for c in spec.containers {
            pod.start_container(self, c).await?;
        }
        Ok(pod)
    }
}

/// Awaits all the futures (a small join, to keep this crate free of a futures dependency).
async fn futures_join<F: std::future::Future<Output = ()> + Send + 'static>(
    futs: impl Iterator<Item = F>,
) {
    let tasks: Vec<_> = futs.map(tokio::spawn).collect();
    for t in tasks {
        let _ = t.await;
    }
}
