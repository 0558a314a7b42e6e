//! One pod's life on the node, from bound to gone.
//!
//! Each pod bound to the node gets a worker task. The worker owns the pod's [`Sandbox`]
//! and walks the pod through the stages of [`Stage`], one way only (the Krustlet lesson:
//! keep the states explicit, keep the generics shallow):
//!
//! ```text
//!   Preparing ──► Initializing ──► Running ──► Finished
//!       │               │             │           │
//!       └───────────────┴─────────────┴───────────┴──► terminate (the pod was deleted)
//! ```
//!
//! What a container does and what the API shows for it are pure ([`crate::status`]): the
//! restart policy and backoff, the phase and conditions, the `PodStatus`. This module is
//! the effects: the sandbox, the API, the node's address pool and memory budget, events.
//! It is generic over the sandbox, so its unit tests run pods on
//! [`crate::fake::FakeSandboxes`] with a paused clock.
//!
//! After every step that changes what the API should show, the worker patches the pod's
//! status, at most once per [`STATUS_INTERVAL`].

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use baton_kube::error::chain;
use baton_kube::events::{EventType, Recorder};
use baton_kube::pod as podx;
use baton_wasm_shim::logs::{ContainerLog, LogConfig};
use baton_wasm_shim::Exit;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::{Pod, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::Instrument;

use crate::config::{self, ContainerConfig, PodFacts};
use crate::ipam::Ipam;
use crate::probe;
use crate::sandbox::{ContainerRun, Sandbox, SandboxConfig, Sandboxes, StartError};
use crate::status::{self, End, Slot};

pub use crate::sandbox::Resolvers;

/// How often a pod's configMap, secret and token volumes are re-read: the kubelet's
/// `--sync-frequency` (one minute), plus up to half again ([`refresh_after`]). Every 15 s,
/// 150,000 pods refreshed 10,000 volumes a second, a fifth of the nodes' CPU.
const VOLUME_REFRESH: Duration = Duration::from_secs(60);

/// How often a pod whose components read wasi:config values is refreshed: those values
/// are read live, and a component is expected to see a changed ConfigMap within seconds,
/// as before the volumes slowed down.
const CONFIG_REFRESH: Duration = Duration::from_secs(15);

/// The wait before a pod's next refresh: [`VOLUME_REFRESH`] ([`CONFIG_REFRESH`] for a pod
/// using wasi:config) and a share of half of it picked by the pod's uid, as the
/// kubelet's pod workers jitter their resyncs, so that pods started together do not
/// refresh together.
fn refresh_after(pod: &Pod) -> Duration {
    use std::hash::{Hash, Hasher};
    let every = if crate::platform::used(pod) {
        CONFIG_REFRESH
    } else {
        VOLUME_REFRESH
    };
    let mut h = std::collections::hash_map::DefaultHasher::new();
    pod.uid().unwrap_or_default().hash(&mut h);
    let share = (h.finish() % 1024) as f64 / 2048.0;
    every + every.mul_f64(share)
}
/// How long a terminating pod keeps taking connections after leaving the routing, for
/// its EndpointSlice change to reach every node.
const ENDPOINT_PROPAGATION: Duration = Duration::from_secs(1);
/// A pod's status is written at most once per this interval (the newest state wins).
pub const STATUS_INTERVAL: Duration = Duration::from_millis(100);
/// The first wait before preparing a pod again after a failure; it doubles up to the
/// backoff cap.
const PREPARE_RETRY: Duration = Duration::from_secs(1);

/// Node settings a worker reads.
#[derive(Debug, Clone)]
pub struct Settings {
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Budget of one HTTP request to a component.
    pub request_timeout: Duration,
    pub log_max_bytes: u64,
    /// Node directories under which hostPath volumes may be mounted; empty (the default)
    /// refuses every hostPath volume.
    pub allowed_host_paths: Vec<PathBuf>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            backoff_base: Duration::from_secs(10),
            backoff_max: Duration::from_secs(300),
            request_timeout: Duration::from_secs(60),
            log_max_bytes: 10 << 20,
            allowed_host_paths: Vec::new(),
        }
    }
}

/// What all the node's workers share.
pub struct Shared<S> {
    pub client: Client,
    /// Makes each pod's sandbox.
    pub sandboxes: S,
    pub ipam: Mutex<Ipam>,
    pub node_name: String,
    pub host_ip: String,
    pub data_dir: PathBuf,
    pub events: Recorder,
    pub settings: Settings,
    pub services: Option<crate::proxy::Services>,
    pub logs: Arc<crate::server::LogIndex>,
    /// What the node has promised its pods' memory.
    pub memory: Arc<crate::budget::MemoryBudget>,
    /// Memory pressure, and the evictions it orders.
    pub evictions: Arc<crate::eviction::Evictions>,
    /// The node's wasi:keyvalue storage.
    pub platform: Arc<crate::platform::Stores>,
    /// ConfigMaps and Secrets as last read for any pod, for the periodic refresh.
    pub objects: Arc<config::ObjectCache>,
}

impl<S> std::fmt::Debug for Shared<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("node", &self.node_name)
            .finish_non_exhaustive()
    }
}

impl<S> Shared<S> {
    /// Where a pod's volumes and logs live on the node.
    pub fn pod_dir(&self, uid: &str) -> PathBuf {
        self.data_dir.join("pods").join(uid)
    }

    /// Where locally provisioned PersistentVolumes keep their data on this node.
    pub fn local_volumes(&self) -> PathBuf {
        self.data_dir.join("local-volumes")
    }

    /// Where this node lets a pod's volumes lead.
    pub fn host_dirs<'a>(&'a self, local_volumes: &'a Path) -> config::HostDirs<'a> {
        config::HostDirs {
            allowed: &self.settings.allowed_host_paths,
            local_volumes,
        }
    }

    /// A container's log file for one run (`0.log`, `1.log`… by restart count).
    pub fn log_config(&self, uid: &str, container: &str, restart: i32) -> LogConfig {
        LogConfig {
            path: self
                .pod_dir(uid)
                .join("logs")
                .join(container)
                .join(format!("{restart}.log")),
            max_bytes: self.settings.log_max_bytes,
            max_files: 1,
        }
    }
}

/// Where a pod is in its life. It only moves forward; a deletion ends it from any stage.
#[derive(Debug, Clone, PartialEq)]
enum Stage {
    /// Getting what the containers need: an address, their configuration (ConfigMaps,
    /// Secrets, the downward API), a sandbox and their images. A failure shows on the
    /// containers (`CreateContainerConfigError`, `ErrImagePull`, `ImagePullBackOff`…) and
    /// is tried again at `retry_at`, the wait doubling up to the backoff cap.
    Preparing { retry_at: Instant, wait: Duration },
    /// Init container `index` runs, or waits for its restart; the next starts once it
    /// has succeeded. With `restartPolicy: Never`, its failure fails the pod.
    Initializing { index: usize },
    /// The app containers run. An exit restarts a container per `restartPolicy` (at
    /// once, then after a backoff: `CrashLoopBackOff`); a failed liveness or startup
    /// probe restarts it; readiness decides `ready`. When every app container has ended
    /// for good, the pod is finished.
    Running,
    /// Nothing runs or will run again: the containers ended for good, or the node ended
    /// the pod itself (`end` says why: refused at admission, evicted, an init container
    /// failed). The sandbox is gone and the address back in the pool; the pod waits to be
    /// deleted.
    Finished { end: Option<End>, initialized: bool },
}

/// Why a container could not be set up to start.
#[derive(Debug, thiserror::Error)]
enum SetupError {
    #[error("the image of container {0} is not loaded")]
    NotLoaded(String),
    #[error("opening the container log {path}")]
    Log {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Config(#[from] config::ConfigError),
}

/// A process's exit, with the run it ends (its restart count when started), so that the
/// exit of a run that was already stopped and replaced is not taken for the new one's.
type ExitOf = BoxFuture<'static, (usize, i32, Exit)>;

type ImageOf<S> = <<S as Sandboxes>::Sandbox as Sandbox>::Image;

/// A pod and everything the worker holds for it.
struct Worker<S: Sandboxes> {
    shared: Arc<Shared<S>>,
    pod: Arc<Pod>,
    uid: String,
    stage: Stage,
    /// The loopback address the node gave the pod.
    ip: Option<Ipv4Addr>,
    /// The address its sandbox gave it instead, if any (a pod that runs OCI containers
    /// is reached at a routed one).
    routed: Option<Ipv4Addr>,
    sandbox: Option<S::Sandbox>,
    slots: Vec<Slot>,
    /// Per slot: its image once pulled, and its resolved configuration.
    images: Vec<Option<ImageOf<S>>>,
    configs: Vec<ContainerConfig>,
    /// Per slot: the platform interfaces its component is granted, and their backing.
    platforms: Vec<baton_wasm_shim::Platform>,
    /// Per container: its wasi:config values, which refreshes update in place.
    config_vars: HashMap<String, baton_wasm_shim::ConfigVars>,
    /// Why the last refresh of the wasi:config values failed, if it did: reported once.
    config_error: Option<String>,
    exits: FuturesUnordered<ExitOf>,
    logs: HashMap<String, ContainerLog>,
    start_time: Option<Time>,
    reporter: Reporter,
    next_refresh: Instant,
    /// What was last written into the pod's volumes, so that a refresh that changes
    /// nothing touches no file.
    written: config::Written,
    /// When this node first saw the pod (the worker began), and whether its start has
    /// been counted in `kubelet_pod_start_duration_seconds`.
    seen: Instant,
    start_recorded: bool,
    /// The span of the pod's start, in the trace of its binding, until the API has been
    /// told it is Ready (or finished): the node's part of one change's trace.
    starting: Option<tracing::Span>,
}

/// What was last written of the status, and when.
#[derive(Debug, Default)]
struct Reporter {
    last: Option<PodStatus>,
    at: Option<Instant>,
    /// A newer status waits for the interval to end.
    pending: bool,
    /// Grows after failed writes, so that an unreachable API is not hammered.
    backoff: Duration,
}

impl Reporter {
    /// How long after the last write the next may go: the interval, or longer after
    /// failed writes (doubling to 10 s).
    fn interval(&self) -> Duration {
        STATUS_INTERVAL.max(self.backoff)
    }
}

impl<S: Sandboxes> Worker<S> {
    fn new(shared: Arc<Shared<S>>, pod: Arc<Pod>) -> Self {
        let slots = Slot::for_pod(&pod);
        Self {
            start_time: pod
                .status
                .as_ref()
                .and_then(|s| s.start_time.clone())
                .or_else(|| Some(podx::now())),
            uid: pod.uid().unwrap_or_default(),
            stage: Stage::Preparing {
                retry_at: Instant::now(),
                wait: PREPARE_RETRY,
            },
            ip: None,
            routed: None,
            sandbox: None,
            images: slots.iter().map(|_| None).collect(),
            configs: slots.iter().map(|_| ContainerConfig::default()).collect(),
            platforms: slots.iter().map(|_| Default::default()).collect(),
            config_vars: HashMap::new(),
            config_error: None,
            slots,
            exits: FuturesUnordered::new(),
            logs: HashMap::new(),
            reporter: Reporter::default(),
            next_refresh: Instant::now() + refresh_after(&pod),
            written: config::Written::default(),
            seen: Instant::now(),
            start_recorded: false,
            starting: Some(start_span(&pod)),
            shared,
            pod,
        }
    }

    fn api(&self) -> Api<Pod> {
        Api::namespaced(
            self.shared.client.clone(),
            &self.pod.namespace().unwrap_or_default(),
        )
    }

    fn restart_policy(&self) -> String {
        self.pod
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.clone())
            .unwrap_or_else(|| "Always".into())
    }

    fn facts(&self) -> PodFacts {
        PodFacts {
            pod_ip: self.pod_ip().map(|i| i.to_string()).unwrap_or_default(),
            host_ip: self.shared.host_ip.clone(),
            node_name: self.shared.node_name.clone(),
        }
    }

    /// Records an event about the pod; it is sent in the background.
    fn event(&self, type_: EventType, reason: &'static str, message: String) {
        self.shared
            .events
            .publish(&self.pod.object_ref(&()), type_, reason, &message);
    }

    /// Whether the API has been told the pod is Ready, or finished: its start is over.
    fn start_reported(&self) -> bool {
        !self.reporter.pending
            && self.reporter.last.as_ref().is_some_and(|s| {
                matches!(s.phase.as_deref(), Some("Succeeded" | "Failed"))
                    || s.conditions
                        .iter()
                        .flatten()
                        .any(|c| c.type_ == "Ready" && c.status == "True")
            })
    }

    fn initialized(&self) -> bool {
        match &self.stage {
            Stage::Running => true,
            Stage::Finished { initialized, .. } => *initialized,
            _ => false,
        }
    }

    /// Moves the pod as far forward as it can go now.
    async fn advance(&mut self) {
        loop {
            let now = Instant::now();
            match self.stage.clone() {
                Stage::Preparing { retry_at, wait } => {
                    if now < retry_at {
                        return;
                    }
                    if self.prepare().await {
                        self.stage = Stage::Initializing { index: 0 };
                    } else {
                        self.stage = Stage::Preparing {
                            retry_at: Instant::now() + wait,
                            wait: (wait * 2).min(self.shared.settings.backoff_max),
                        };
                        return;
                    }
                }
                Stage::Initializing { index } => {
                    if !self.step_init(index, now).await {
                        return;
                    }
                }
                Stage::Running => {
                    for i in 0..self.slots.len() {
                        if self.slots[i].is_app()
                            && self.slots[i].restart_at.is_some_and(|t| now >= t)
                        {
                            self.slots[i].restarting();
                            self.start(i).await;
                        }
                    }
                    self.start_ephemeral(now).await;
                    self.run_probes().await;
                    if status::phase(&self.slots, true, None).1 {
                        self.finish(None).await;
                    }
                    return;
                }
                Stage::Finished { .. } => return,
            }
        }
    }

    /// One step of init container `index`; true if the stage changed and the pod may go
    /// further now.
    async fn step_init(&mut self, index: usize, now: Instant) -> bool {
        let Some(slot) = self.slots.get(index).filter(|s| s.init) else {
            // Every init container has succeeded: the app containers start together.
            self.stage = Stage::Running;
            for i in 0..self.slots.len() {
                let s = &self.slots[i];
                if s.is_app() && !s.is_running() && s.restart_at.is_none() {
                    self.start(i).await;
                }
            }
            return true;
        };
        if slot.succeeded() {
            self.stage = Stage::Initializing { index: index + 1 };
            return true;
        }
        if slot.is_running() {
            return false;
        }
        if slot.is_done() {
            let name = slot.spec.name.clone();
            self.finish(Some(End {
                reason: "InitFailed".into(),
                message: format!("init container {name} failed"),
            }))
            .await;
            return false;
        }
        match slot.restart_at {
            Some(at) if now < at => return false,
            Some(_) => self.slots[index].restarting(),
            None => {}
        }
        self.start(index).await;
        self.report().await;
        // Started, or failed to start and waiting: look again.
        true
    }

    /// Gets the pod an address, its configuration, a sandbox and its images; on failure
    /// the containers wait with the reason, and the worker tries again later.
    async fn prepare(&mut self) -> bool {
        let Some(ip) = self.address().await else {
            return false;
        };
        if !self.resolve_configs().await {
            return false;
        }
        // The sandbox only once its configuration is known to be whole: a pod refused
        // for its spec runs nothing.
        if self.sandbox.is_none() {
            self.create_sandbox(ip);
        }
        for i in 0..self.slots.len() {
            if self.images[i].is_none() && !self.pull(i).await {
                return false;
            }
        }
        // Its images decided where the pod is reached; the downward API's `status.podIP`
        // then says so too.
        let routed = self.sandbox.as_ref().and_then(|s| s.address());
        if routed != self.routed {
            self.routed = routed;
            return self.resolve_configs().await;
        }
        true
    }

    /// Sets up each container's platform interfaces, or reports why not.
    async fn resolve_platforms(&mut self) -> bool {
        for i in 0..self.slots.len() {
            let name = self.slots[i].spec.name.clone();
            let vars = self.config_vars.entry(name.clone()).or_default().clone();
            vars.set(self.configs[i].wasi_config.clone());
            let platform = self
                .shared
                .platform
                .platform(&self.shared.client, &self.pod, &name, vars)
                .await;
            match platform {
                Ok(p) => self.platforms[i] = p,
                Err(e) => {
                    let msg = chain(&e);
                    self.wait_all("CreateContainerConfigError", &msg);
                    self.event(EventType::Warning, "Failed", format!("Error: {msg}"));
                    return false;
                }
            }
        }
        true
    }

    /// Rereads the wasi:config values of a running pod's containers. If an object they
    /// come from is gone, the last values are kept (as the kubelet keeps a configMap
    /// volume's files), and a Warning says so once.
    async fn refresh_wasi_config(&mut self) {
        let refreshed = config::refresh_wasi_config(
            &self.shared.client,
            &self.shared.objects,
            &self.pod,
            &self.facts(),
        )
        .await;
        match refreshed {
            Ok(all) => {
                for (name, values) in all {
                    if let Some(vars) = self.config_vars.get(&name) {
                        vars.set(values);
                    }
                }
                self.config_error = None;
            }
            Err(e) => {
                let msg = chain(&e);
                if self.config_error.as_ref() != Some(&msg) {
                    self.event(
                        EventType::Warning,
                        "ConfigUnavailable",
                        format!("keeping the last wasi:config values: {msg}"),
                    );
                    self.config_error = Some(msg);
                }
            }
        }
    }

    /// Resolves what each container runs with (env, volumes), or reports why not.
    async fn resolve_configs(&mut self) -> bool {
        let dir = self.shared.pod_dir(&self.uid);
        let local = self.shared.local_volumes();
        let resolved = config::resolve(
            &self.shared.client,
            &self.shared.objects,
            &self.pod,
            &self.facts(),
            &dir,
            self.shared.host_dirs(&local),
            &mut self.written,
        )
        .await;
        match resolved {
            Ok(mut configs) => {
                let api = self.shared.services.as_ref().and_then(|s| s.api_server());
                for (i, s) in self.slots.iter().enumerate() {
                    let mut config = configs.remove(&s.spec.name).unwrap_or_default();
                    if let Some((ip, port)) = api {
                        config::api_server_env(&mut config.env, ip, port);
                    }
                    self.configs[i] = config;
                }
                if crate::platform::used(&self.pod) {
                    return self.resolve_platforms().await;
                }
            }
            Err(e) => {
                let msg = chain(&e);
                self.wait_all("CreateContainerConfigError", &msg);
                self.event(EventType::Warning, "Failed", format!("Error: {msg}"));
                return false;
            }
        }
        true
    }

    /// Makes the pod's sandbox, at its loopback address `ip`.
    fn create_sandbox(&mut self, ip: Ipv4Addr) {
        let ns = self.pod.namespace().unwrap_or_default();
        let config = SandboxConfig {
            key: format!("{ns}/{}/{}", self.pod.name_any(), self.uid),
            namespace: ns,
            ip,
            cpu_limit: status::pod_cpu_limit(&self.pod),
            // Its weight among unlimited pods: its CPU request, as the scheduler
            // counts it.
            cpu_weight: podx::requests(&self.pod).0,
            // The pod's containers together hold at most what it was admitted with.
            memory_limit: self.shared.memory.charge_of(&self.pod) as usize,
            name: self.pod.name_any(),
            grace: Duration::from_secs(
                self.pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.termination_grace_period_seconds)
                    .unwrap_or(30)
                    .max(0) as u64,
            ),
            security: self
                .pod
                .spec
                .as_ref()
                .and_then(|s| s.security_context.clone()),
            dns: crate::dns::PodDns {
                policy: self.pod.spec.as_ref().and_then(|s| s.dns_policy.clone()),
                config: self.pod.spec.as_ref().and_then(|s| s.dns_config.clone()),
            },
            share_process_namespace: self
                .pod
                .spec
                .as_ref()
                .and_then(|s| s.share_process_namespace)
                .unwrap_or(false),
        };
        let sandbox = self.shared.sandboxes.create(config);
        self.shared.logs.add_streams(
            &self.pod.namespace().unwrap_or_default(),
            &self.pod.name_any(),
            &self.uid,
            sandbox.streams(),
        );
        self.sandbox = Some(sandbox);
    }

    /// The pod's address: the one it had (a restarted node agent keeps it) if free.
    async fn address(&mut self) -> Option<Ipv4Addr> {
        if self.ip.is_some() {
            return self.ip;
        }
        let want = self
            .pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.as_deref())
            .and_then(|ip| ip.parse::<Ipv4Addr>().ok())
            // A pod with a namespace reported its routed address; its loopback twin is
            // what the address manager gives out.
            .map(|ip| match ip.octets()[0] {
                10 => crate::netns::loopback_of(ip),
                _ => ip,
            });
        let got = self
            .shared
            .ipam
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .allocate(want);
        match got {
            Ok(ip) => {
                self.ip = Some(ip);
                if let Some(asked) = self.host_namespaces() {
                    // Said once, where `kubectl describe` shows it, rather than ignored
                    // without a word.
                    let msg = format!(
                        "{asked} asked: this pod keeps its own address {ip}, process table and IPC; a Baton node does not share its own with a pod"
                    );
                    self.event(EventType::Warning, "HostNamespacesNotShared", msg);
                }
                Some(ip)
            }
            Err(e) => {
                let msg = chain(&e);
                self.wait_all("ContainerCreating", &msg);
                self.event(EventType::Warning, "FailedCreatePodSandBox", msg);
                None
            }
        }
    }

    /// The node's namespaces the pod asks to share (`hostNetwork`, `hostPID`, `hostIPC`),
    /// named as in the spec; None if it asks for none.
    fn host_namespaces(&self) -> Option<String> {
        let spec = self.pod.spec.as_ref()?;
        let asked: Vec<&str> = [
            ("hostNetwork", spec.host_network),
            ("hostPID", spec.host_pid),
            ("hostIPC", spec.host_ipc),
        ]
        .into_iter()
        .filter(|(_, on)| *on == Some(true))
        .map(|(name, _)| name)
        .collect();
        (!asked.is_empty()).then(|| asked.join(", "))
    }

    /// Pulls container `i`'s image into the sandbox.
    async fn pull(&mut self, i: usize) -> bool {
        let image = self.slots[i].spec.image.clone().unwrap_or_default();
        let policy = match self.slots[i].spec.image_pull_policy.as_deref() {
            Some("Always") => baton_oci::PullPolicy::Always,
            Some("Never") => baton_oci::PullPolicy::Never,
            _ => baton_oci::PullPolicy::IfNotPresent,
        };
        let auth = config::pull_auth(&self.shared.client, &self.pod, &image).await;
        let Some(sandbox) = self.sandbox.as_ref() else {
            return false;
        };
        // As the kubelet tells it: `Pulling` before a transfer, `Pulled` after it, or that
        // the image was found on the node.
        let transfers = policy == baton_oci::PullPolicy::Always
            || (policy == baton_oci::PullPolicy::IfNotPresent && !sandbox.image_present(&image));
        if transfers {
            self.event(
                EventType::Normal,
                "Pulling",
                format!("Pulling image \"{image}\""),
            );
        }
        let Some(sandbox) = self.sandbox.as_mut() else {
            return false;
        };
        let started = Instant::now();
        let span =
            tracing::info_span!(target: baton_kube::trace::TARGET, "pull_image", image = %image);
        match sandbox.pull(&image, &auth, policy).instrument(span).await {
            Ok(pulled) => {
                let msg = if pulled.pulled {
                    format!(
                        "Successfully pulled image \"{image}\" in {:.3}s",
                        started.elapsed().as_secs_f64()
                    )
                } else {
                    format!("Container image \"{image}\" already present on machine")
                };
                self.event(EventType::Normal, "Pulled", msg);
                let slot = &mut self.slots[i];
                slot.image_id = pulled.digest;
                slot.lifetime = Some(pulled.lifetime);
                self.images[i] = Some(pulled.image);
                true
            }
            Err(e) => {
                // The first failure says ErrImagePull; repeated ones, ImagePullBackOff.
                let reason = match &self.slots[i].state {
                    status::State::Waiting { reason, .. }
                        if reason == "ErrImagePull" || reason == "ImagePullBackOff" =>
                    {
                        "ImagePullBackOff"
                    }
                    _ => e.reason(),
                };
                let msg = chain(&e);
                self.slots[i].set_waiting(reason, &msg);
                // What Kubernetes says: a pull that failed, a back-off between pulls, or
                // an image that is there but cannot run.
                let (type_, event_reason, text) = match reason {
                    "ImagePullBackOff" => (
                        EventType::Normal,
                        "BackOff",
                        format!("Back-off pulling image \"{image}\": {msg}"),
                    ),
                    "ErrImagePull" | "ErrImageNeverPull" | "InvalidImageName" => (
                        EventType::Warning,
                        "Failed",
                        format!("Failed to pull image \"{image}\": {msg}"),
                    ),
                    _ => (EventType::Warning, "Failed", format!("Error: {msg}")),
                };
                self.event(type_, event_reason, text);
                false
            }
        }
    }

    /// Every container not yet started waits with `reason`.
    fn wait_all(&mut self, reason: &str, message: &str) {
        for s in &mut self.slots {
            if matches!(s.state, status::State::Waiting { .. }) {
                s.set_waiting(reason, message);
            }
        }
    }

    /// This run of container `i`, as the sandbox takes it.
    fn container_run(&self, i: usize) -> Result<ContainerRun<ImageOf<S>>, SetupError> {
        let s = &self.slots[i];
        let c = &s.spec;
        let image = self.images[i]
            .clone()
            .ok_or_else(|| SetupError::NotLoaded(c.name.clone()))?;
        let config = &self.configs[i];
        // A volume's files may have been swapped since they were resolved.
        config::recheck_mounts(&config.mounts)?;
        let log_config = self.shared.log_config(&self.uid, &c.name, s.restarts);
        let path = log_config.path.clone();
        let log =
            ContainerLog::open(log_config).map_err(|source| SetupError::Log { path, source })?;
        let port = c
            .ports
            .iter()
            .flatten()
            .next()
            .and_then(|p| u16::try_from(p.container_port).ok())
            .or(Some(8080));
        // A component's entry point is fixed (wasi:cli/run); `command` and `args` are
        // both its arguments.
        let args = c
            .command
            .iter()
            .flatten()
            .chain(c.args.iter().flatten())
            .cloned()
            .collect();
        Ok(ContainerRun {
            name: c.name.clone(),
            image,
            port,
            args,
            env: config.env.clone(),
            mounts: config.mounts.clone(),
            memory_bytes: self.shared.memory.container_limit(c) as usize,
            log,
            tls: config::serving_tls(&self.pod, &self.shared.pod_dir(&self.uid))?,
            stdin: c.stdin.unwrap_or(false),
            stdin_once: c.stdin_once.unwrap_or(false),
            platform: self.platforms[i].clone(),
            reuse: crate::platform::instance_reuse(&self.pod),
            spec: c.clone(),
        })
    }

    /// Once every app container has started for the first time: how long the pod took
    /// from the node seeing it.
    fn record_start(&mut self) {
        let all_started = self
            .slots
            .iter()
            .filter(|s| !s.init && !s.ephemeral)
            .all(|s| s.started_instant.is_some());
        if self.start_recorded || !all_started {
            return;
        }
        self.start_recorded = true;
        self.shared.logs.pod_starts.observe(self.seen.elapsed());
    }

    /// Starts container `i` in the sandbox.
    async fn start(&mut self, i: usize) {
        let run = match self.container_run(i) {
            Ok(run) => run,
            Err(e) => {
                let msg = chain(&e);
                self.create_failed(i, "CreateContainerError", &msg);
                self.event(EventType::Warning, "Failed", format!("Error: {msg}"));
                return;
            }
        };
        let name = run.name.clone();
        self.logs.insert(name.clone(), run.log.clone());
        let Some(sandbox) = self.sandbox.as_mut() else {
            return;
        };
        let span = tracing::info_span!(target: baton_kube::trace::TARGET, "start_container", container = %name);
        match sandbox.start(run).instrument(span).await {
            Ok(started) => {
                let run_of = self.slots[i].restarts;
                if let Some(exit) = started.exit {
                    self.exits.push(exit.map(move |e| (i, run_of, e)).boxed());
                }
                let log_path = self.shared.log_config(&self.uid, &name, run_of).path;
                self.shared.logs.set_live(log_path, true);
                self.slots[i].mark_started(Instant::now());
                self.record_start();
                let image = self.slots[i].spec.image.clone().unwrap_or_default();
                // The sandbox creates and starts in one step; both are told, in
                // Kubernetes' words, for `kubectl describe` and alerts that look for them.
                self.event(
                    EventType::Normal,
                    "Created",
                    format!("Created container: {name}"),
                );
                self.event(
                    EventType::Normal,
                    "Started",
                    format!("Started container {name} ({image})"),
                );
            }
            Err(e) => {
                let msg = chain(&e);
                match e {
                    StartError::Create(_) => self.create_failed(i, e.reason(), &msg),
                    StartError::Setup(_) => self.exited(i, 128, e.reason(), &msg),
                }
                self.event(EventType::Warning, "Failed", format!("Error: {msg}"));
            }
        }
    }

    /// Records that container `i` could not be created; it is tried again later.
    fn create_failed(&mut self, i: usize, reason: &str, message: &str) {
        let backoff = (
            self.shared.settings.backoff_base,
            self.shared.settings.backoff_max,
        );
        self.slots[i].create_failed(reason, message, backoff, Instant::now());
    }

    /// Adds the ephemeral containers the pod's spec gained (`kubectl debug`); the
    /// running stage starts them.
    fn add_ephemeral(&mut self) {
        let Some(spec) = self.pod.spec.as_ref() else {
            return;
        };
        for e in spec.ephemeral_containers.iter().flatten() {
            if self.slots.iter().any(|s| s.spec.name == e.name) {
                continue;
            }
            // The same fields as a container's, bar the target.
            let mut v = serde_json::to_value(e).unwrap_or_default();
            if let Some(m) = v.as_object_mut() {
                m.remove("targetContainerName");
            }
            let Ok(container) = serde_json::from_value(v) else {
                continue;
            };
            self.slots
                .push(Slot::ephemeral(container, e.target_container_name.clone()));
            self.images.push(None);
            self.configs.push(ContainerConfig::default());
            // A debugging container gets no platform interfaces.
            self.platforms.push(Default::default());
        }
    }

    /// Starts the ephemeral containers that have not run yet. An ephemeral container
    /// sees what its target sees (volumes, environment); its image is pulled again after
    /// a backoff if it failed; once it ran, it is not started again.
    async fn start_ephemeral(&mut self, now: Instant) {
        for i in 0..self.slots.len() {
            let s = &self.slots[i];
            let fresh = matches!(s.state, status::State::Waiting { .. }) && s.last.is_none();
            if !s.ephemeral || !fresh || s.restart_at.is_some_and(|t| now < t) {
                continue;
            }
            let target = s.target.as_ref().and_then(|t| {
                self.slots
                    .iter()
                    .position(|x| &x.spec.name == t && !x.ephemeral)
            });
            let mut config = target.map(|t| self.configs[t].clone()).unwrap_or_default();
            if target.is_none() {
                if let Some((ip, port)) = self.shared.services.as_ref().and_then(|s| s.api_server())
                {
                    config::api_server_env(&mut config.env, ip, port);
                }
            }
            self.configs[i] = config;
            if self.images[i].is_none() && !self.pull(i).await {
                let (base, max) = (
                    self.shared.settings.backoff_base,
                    self.shared.settings.backoff_max,
                );
                let wait = self.slots[i].backoff.wait(Duration::ZERO, base, max);
                self.slots[i].restart_at = Some(now + wait.max(base));
                continue;
            }
            self.slots[i].restart_at = None;
            self.start(i).await;
        }
    }

    /// Records that container `i` stopped, and when (if ever) it restarts.
    fn exited(&mut self, i: usize, code: i32, reason: &str, message: &str) {
        self.log_stopped(i);
        let policy = if self.slots[i].ephemeral {
            "Never".to_string()
        } else {
            self.restart_policy()
        };
        let backoff = (
            self.shared.settings.backoff_base,
            self.shared.settings.backoff_max,
        );
        let pod = format!(
            "{}_{}({})",
            self.pod.name_any(),
            self.pod.namespace().unwrap_or_default(),
            self.uid
        );
        self.slots[i].exited(
            code,
            reason,
            message,
            &policy,
            backoff,
            Instant::now(),
            &pod,
        );
        // Each back-off before a restart, as the kubelet tells a crash loop.
        if matches!(&self.slots[i].state, status::State::Waiting { reason, .. } if reason == "CrashLoopBackOff")
        {
            let name = self.slots[i].spec.name.clone();
            self.event(
                EventType::Warning,
                "BackOff",
                format!("Back-off restarting failed container {name} in pod {pod}"),
            );
        }
    }

    /// The container's current log is complete: flushed, and no longer followed.
    fn log_stopped(&self, i: usize) {
        let name = &self.slots[i].spec.name;
        if let Some(log) = self.logs.get(name) {
            let _ = log.flush();
        }
        let path = self
            .shared
            .log_config(&self.uid, name, self.slots[i].restarts)
            .path;
        self.shared.logs.set_live(path, false);
    }

    /// A process ended by itself.
    fn on_exit(&mut self, i: usize, run: i32, exit: Exit) {
        let slot = &self.slots[i];
        if slot.restarts != run || !slot.is_running() {
            return;
        }
        self.exited(i, exit.code, exit.reason, &exit.message);
    }

    /// Runs the probes that are due, and restarts a container whose liveness or startup
    /// probe failed.
    async fn run_probes(&mut self) {
        let now = Instant::now();
        for i in 0..self.slots.len() {
            if !self.slots[i].is_running() {
                continue;
            }
            let Some(sandbox) = &self.sandbox else {
                return;
            };
            let spec = self.slots[i].spec.clone();
            let mut kill: Option<String> = None;
            let mut unhealthy: Vec<String> = Vec::new();
            for p in self.slots[i].active_probers() {
                if !p.due(now) {
                    continue;
                }
                let attempt = sandbox.probe(&spec, p.probe());
                let changed = p.run(attempt).await;
                if p.passing == Some(false) || changed == Some(false) {
                    unhealthy.push(format!("{:?} probe failed: {}", p.kind, p.last_message));
                }
                let which = match p.kind {
                    probe::Kind::Startup => "startup",
                    probe::Kind::Liveness => "liveness",
                    probe::Kind::Readiness => continue,
                };
                if changed == Some(false) {
                    kill = Some(format!(
                        "Container {} failed {which} probe, will be restarted",
                        spec.name
                    ));
                }
            }
            self.slots[i].update_from_probes();
            for message in unhealthy {
                self.event(EventType::Warning, "Unhealthy", message);
            }
            if let Some(message) = kill {
                self.event(EventType::Normal, "Killing", message.clone());
                if let Some(sandbox) = &mut self.sandbox {
                    sandbox.stop(&spec.name).await;
                }
                self.exited(i, 137, "Error", &message);
            }
        }
    }

    /// Takes the sandbox to stop it: from now on no stream reaches the pod.
    fn take_sandbox(&mut self) -> Option<S::Sandbox> {
        self.shared.logs.remove_streams(
            &self.pod.namespace().unwrap_or_default(),
            &self.pod.name_any(),
            &self.uid,
        );
        self.sandbox.take()
    }

    /// The pod will run nothing again: everything it ran is gone before its address can
    /// go to another pod.
    async fn finish(&mut self, end: Option<End>) {
        if let Some(sandbox) = self.take_sandbox() {
            sandbox.shutdown(Duration::ZERO).await;
        }
        self.release_ip();
        self.shared.memory.release(&self.uid);
        self.stage = Stage::Finished {
            initialized: self.initialized(),
            end,
        };
    }

    fn status(&self) -> PodStatus {
        let end = match &self.stage {
            Stage::Finished { end, .. } => end.as_ref(),
            _ => None,
        };
        status::pod_status(&status::View {
            pod: &self.pod,
            uid: &self.uid,
            slots: &self.slots,
            initialized: self.initialized(),
            end,
            host_ip: &self.shared.host_ip,
            pod_ip: self.pod_ip(),
            start_time: self.start_time.clone(),
        })
    }

    /// Sends the status if it differs from the last one sent, at most once per
    /// [`STATUS_INTERVAL`]: a change within the interval of the last write is held, and
    /// the newest state is written when the interval ends (the worker wakes for it). A
    /// pod whose containers exit in a storm costs one write per interval, not one each.
    async fn report(&mut self) {
        let r = &self.reporter;
        if r.at.is_some_and(|t| t.elapsed() < r.interval()) {
            self.reporter.pending = self.reporter.last.as_ref() != Some(&self.status());
            return;
        }
        self.report_now().await;
    }

    /// Sends the status now if it differs from the last one sent.
    async fn report_now(&mut self) {
        self.reporter.pending = false;
        let status = self.status();
        if self.reporter.last.as_ref() == Some(&status) {
            return;
        }
        self.reporter.at = Some(Instant::now());
        let patch = json!({ "status": status });
        // The answer (the whole pod) is not read: decoding it was a fifth of a report.
        let ns = self.pod.namespace().unwrap_or_default();
        let url = <Pod as kube::Resource>::url_path(&(), Some(&ns));
        let written = match kube::core::Request::new(url).patch_subresource(
            "status",
            &self.pod.name_any(),
            &PatchParams::default(),
            &Patch::Merge(patch),
        ) {
            Ok(req) => self.shared.client.request_text(req).await.map(drop),
            Err(e) => Err(kube::Error::BuildRequest(e)),
        };
        match written {
            Ok(_) => {
                // The node owns the pod's status: what it wrote is the status now (the
                // conditions keep their transition times from it).
                let mut pod = (*self.pod).clone();
                pod.status = Some(status.clone());
                self.pod = Arc::new(pod);
                self.reporter.last = Some(status);
                self.reporter.backoff = Duration::ZERO;
            }
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => {
                self.reporter.backoff = (self.reporter.backoff * 2)
                    .max(STATUS_INTERVAL * 2)
                    .min(Duration::from_secs(10));
                self.reporter.pending = true;
                tracing::warn!(error = %e, "status update failed; will retry");
            }
        }
    }

    /// When the worker must next wake without an event.
    fn next_wake(&self) -> Instant {
        let mut at = Instant::now() + Duration::from_secs(60);
        if let Stage::Preparing { retry_at, .. } = &self.stage {
            at = at.min(*retry_at);
        }
        for s in &self.slots {
            // Only probes that run count: a liveness probe waiting for its startup probe,
            // or a startup probe that has passed, would wake the worker for nothing.
            for t in [s.restart_at, s.next_probe_at()].into_iter().flatten() {
                at = at.min(t);
            }
        }
        if let (true, Some(t)) = (self.reporter.pending, self.reporter.at) {
            at = at.min(t + self.reporter.interval());
        }
        // Only a live pod's volumes are refreshed: a pod still preparing, or finished,
        // would otherwise wake the worker at once, again and again.
        if self.refreshes_volumes() {
            at = at.min(self.next_refresh);
        }
        at
    }

    /// Whether the pod's volumes are refreshed now and then: it is live, and has some
    /// that come from objects.
    fn refreshes_volumes(&self) -> bool {
        matches!(self.stage, Stage::Initializing { .. } | Stage::Running)
            && (self.has_projected_volumes() || crate::platform::used(&self.pod))
    }

    fn has_projected_volumes(&self) -> bool {
        self.pod
            .spec
            .as_ref()
            .and_then(|s| s.volumes.as_ref())
            .is_some_and(|v| {
                v.iter()
                    .any(|v| v.config_map.is_some() || v.secret.is_some() || v.projected.is_some())
            })
    }

    /// Rewrites configMap, secret and projected volumes from their objects (and renews
    /// tokens near their end), now and then.
    async fn refresh_volumes(&mut self) {
        let now = Instant::now();
        if !self.refreshes_volumes() || now < self.next_refresh {
            return;
        }
        self.next_refresh = now + refresh_after(&self.pod);
        if crate::platform::used(&self.pod) {
            self.refresh_wasi_config().await;
        }
        if !self.has_projected_volumes() {
            return;
        }
        let dir = self.shared.pod_dir(&self.uid);
        let local = self.shared.local_volumes();
        let refreshed = config::refresh_volumes(
            &self.shared.client,
            &self.shared.objects,
            &self.pod,
            &self.facts(),
            &dir,
            self.shared.host_dirs(&local),
            &mut self.written,
        )
        .await;
        if let Err(e) = refreshed {
            tracing::debug!(error = %e, "volume refresh failed");
        }
    }

    /// Stops everything and completes the pod's deletion.
    async fn terminate(&mut self, api_gone: bool) {
        let grace = self
            .pod
            .metadata
            .deletion_grace_period_seconds
            .unwrap_or(30)
            .max(0) as u64;
        if let Some(sandbox) = self.take_sandbox() {
            // Out of this node's routing at once; still serving for a moment, while the
            // other nodes learn from the EndpointSlice that the pod is going, so that no
            // connection already on its way finds the door shut.
            if let (Some(services), Some(ip)) = (&self.shared.services, self.pod_ip()) {
                services.set_draining(IpAddr::V4(ip), true);
            }
            let grace = Duration::from_secs(grace);
            let linger = ENDPOINT_PROPAGATION.min(grace);
            tokio::time::sleep(linger).await;
            sandbox.shutdown(grace - linger).await;
        }
        for i in 0..self.slots.len() {
            if self.slots[i].is_running() {
                self.log_stopped(i);
            }
            self.slots[i].stopped_with_pod();
        }
        for log in self.logs.values() {
            let _ = log.flush();
        }
        self.release_ip();
        if !api_gone {
            self.report_now().await;
            let dp = DeleteParams {
                grace_period_seconds: Some(0),
                preconditions: Some(Preconditions {
                    uid: Some(self.uid.clone()),
                    resource_version: None,
                }),
                ..Default::default()
            };
            match self.api().delete(&self.pod.name_any(), &dp).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
                Err(e) => tracing::warn!(error = %e, "completing the pod's deletion failed"),
            }
        }
        let _ = std::fs::remove_dir_all(self.shared.pod_dir(&self.uid));
        self.shared.memory.release(&self.uid);
    }

    /// Stops the pod for memory pressure: its containers end now, and it stays in the API
    /// as Failed/Evicted for its controller to replace, as a kubelet eviction leaves it.
    async fn evict(&mut self, message: String) {
        if let Some(sandbox) = self.take_sandbox() {
            sandbox.shutdown(Duration::ZERO).await;
        }
        for i in 0..self.slots.len() {
            if self.slots[i].is_running() {
                self.exited(i, 137, "Error", "evicted");
            }
            self.slots[i].evicted();
        }
        self.event(EventType::Warning, "Evicted", message.clone());
        self.finish(Some(End {
            reason: "Evicted".into(),
            message,
        }))
        .await;
    }

    /// Admission, as the kubelet's: a pod whose memory does not fit is refused for good,
    /// and so is a BestEffort pod while the node is under memory pressure.
    async fn admit(&mut self) {
        let admitted = crate::budget::Admitted {
            charge: self.shared.memory.charge_of(&self.pod),
            qos: status::qos_class(&self.pod),
            request: podx::requests(&self.pod).1,
        };
        let refused = if admitted.qos == "BestEffort" && self.shared.evictions.under_pressure() {
            let message = "Pod was rejected: The node had condition: [MemoryPressure]. ";
            Some(("Evicted", message.to_string()))
        } else {
            match self.shared.memory.admit_as(&self.uid, admitted) {
                Ok(()) => None,
                Err(e) => Some(("OutOfmemory", e.to_string())),
            }
        };
        if let Some((reason, message)) = refused {
            self.event(EventType::Warning, reason, message.clone());
            self.finish(Some(End {
                reason: reason.into(),
                message,
            }))
            .await;
        }
    }

    /// The address the pod is reached at.
    fn pod_ip(&self) -> Option<Ipv4Addr> {
        self.routed.or(self.ip)
    }

    fn release_ip(&mut self) {
        if let (Some(services), Some(ip)) = (&self.shared.services, self.pod_ip()) {
            services.set_draining(IpAddr::V4(ip), false);
        }
        self.routed = None;
        if let Some(ip) = self.ip.take() {
            self.shared
                .ipam
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .release(ip);
        }
    }
}

/// Runs one pod until it is deleted. `updates` carries the newest object; None (or a
/// closed channel) means the API no longer has it.
/// The span of a pod's start on this node, continuing the trace of the write that bound it.
fn start_span(pod: &Pod) -> tracing::Span {
    let span = tracing::info_span!(
        target: baton_kube::trace::TARGET,
        "start_pod",
        namespace = pod.metadata.namespace.as_deref().unwrap_or(""),
        name = pod.metadata.name.as_deref().unwrap_or(""),
    );
    baton_kube::trace::follow(&span, &pod.metadata);
    span
}

pub async fn run<S: Sandboxes>(
    shared: Arc<Shared<S>>,
    mut updates: watch::Receiver<Option<Arc<Pod>>>,
) {
    let Some(pod) = updates.borrow_and_update().clone() else {
        return;
    };
    let mut w = Worker::new(shared, pod);
    if w.pod.metadata.deletion_timestamp.is_some() {
        w.terminate(false).await;
        return;
    }
    let mut evictions = w.shared.evictions.subscribe();
    let span = w.starting.clone().unwrap_or_else(tracing::Span::none);
    w.admit().instrument(span).await;
    loop {
        let span = w.starting.clone().unwrap_or_else(tracing::Span::none);
        async {
            if let Some(message) = w.shared.evictions.take(&w.uid) {
                w.evict(message).await;
            }
            w.advance().await;
            w.refresh_volumes().await;
            w.report().await;
        }
        .instrument(span)
        .await;
        if w.starting.is_some() && w.start_reported() {
            w.starting = None;
        }
        let wake = w.next_wake();
        tokio::select! {
            changed = updates.changed() => {
                let latest = if changed.is_ok() { updates.borrow_and_update().clone() } else { None };
                match latest {
                    None => {
                        w.terminate(true).await;
                        return;
                    }
                    Some(p) => {
                        let deleting = p.metadata.deletion_timestamp.is_some();
                        w.pod = p;
                        w.add_ephemeral();
                        if deleting {
                            w.terminate(false).await;
                            return;
                        }
                    }
                }
            }
            Some((i, run, exit)) = w.exits.next(), if !w.exits.is_empty() => {
                w.on_exit(i, run, exit);
            }
            _ = evictions.changed() => {}
            _ = tokio::time::sleep_until(wake) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    //! The worker on scripted sandboxes and a fake API, with a paused clock: minutes of
    //! restarts and backoff pass in milliseconds, and every wait is on a condition.

    use std::time::Duration;

    use baton_testkit::fake_api::FakeApi;
    use serde_json::{json, Value};
    use tokio::task::JoinHandle;

    use super::*;
    use crate::fake::{FakeSandboxes, Script};

    struct Node {
        api: FakeApi,
        fake: FakeSandboxes,
        shared: Arc<Shared<FakeSandboxes>>,
        _dir: tempfile::TempDir,
    }

    /// A pod's worker under test.
    struct Running {
        updates: watch::Sender<Option<Arc<Pod>>>,
        task: JoinHandle<()>,
        pod: Pod,
    }

    fn node() -> Node {
        let api = FakeApi::default();
        let fake = FakeSandboxes::default();
        fake.image("serve", Script::Serve).image("run", Script::Run);
        let dir = tempfile::tempdir().unwrap();
        let client = api.client();
        let shared = Arc::new(Shared {
            events: Recorder::with_queue(client.clone(), "kubelet", Some("n1"), 256, 1),
            client,
            sandboxes: fake.clone(),
            ipam: Mutex::new(Ipam::new("127.1.0.0/28").unwrap()),
            node_name: "n1".into(),
            host_ip: "10.0.0.1".into(),
            data_dir: dir.path().to_path_buf(),
            settings: Settings::default(),
            services: None,
            logs: Arc::default(),
            memory: Arc::new(crate::budget::MemoryBudget::new(8 << 30, 64 << 20)),
            evictions: Arc::default(),
            platform: Arc::new(crate::platform::Stores::new(dir.path().join("keyvalue"))),
            objects: Default::default(),
        });
        Node {
            api,
            fake,
            shared,
            _dir: dir,
        }
    }

    fn pod(spec: Value) -> Pod {
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "namespace": "default", "uid": "u1"},
            "spec": spec,
        }))
        .unwrap()
    }

    impl Node {
        fn run(&self, pod: Pod) -> Running {
            let (updates, rx) = watch::channel(Some(Arc::new(pod.clone())));
            let task = tokio::spawn(run(self.shared.clone(), rx));
            Running { updates, task, pod }
        }

        /// The last status written.
        fn status(&self) -> Value {
            self.api
                .calls()
                .into_iter()
                .rev()
                .find(|c| c.method == "PATCH" && c.path.ends_with("/pods/p/status"))
                .map(|c| c.body["status"].clone())
                .unwrap_or(Value::Null)
        }

        /// Waits (on the paused clock) until the written status passes `f`.
        async fn until(&self, what: &str, f: impl Fn(&Value) -> bool) -> Value {
            let deadline = Instant::now() + Duration::from_secs(3600);
            loop {
                let s = self.status();
                if f(&s) {
                    return s;
                }
                assert!(
                    Instant::now() < deadline,
                    "never saw {what}; last status: {s:#}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }

        fn addresses_free(&self) -> usize {
            let mut ipam = self.shared.ipam.lock().unwrap();
            let mut n = 0;
            let mut got = Vec::new();
            while let Ok(ip) = ipam.allocate(None) {
                got.push(ip);
                n += 1;
            }
            for ip in got {
                ipam.release(ip);
            }
            n
        }
    }

    fn container<'a>(status: &'a Value, name: &str) -> &'a Value {
        ["containerStatuses", "initContainerStatuses"]
            .iter()
            .filter_map(|k| status[*k].as_array())
            .flatten()
            .find(|c| c["name"] == name)
            .unwrap_or(&Value::Null)
    }

    fn condition(status: &Value, type_: &str) -> String {
        status["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["type"] == type_)
            .map(|c| c["status"].as_str().unwrap_or("").to_string())
            .unwrap_or_default()
    }

    #[tokio::test(start_paused = true)]
    async fn a_server_runs_and_its_pod_becomes_ready() {
        let n = node();
        let _p = n.run(pod(
            json!({"containers": [{"name": "web", "image": "serve"}]}),
        ));
        let s = n
            .until("Running and Ready", |s| {
                s["phase"] == "Running" && condition(s, "Ready") == "True"
            })
            .await;
        assert!(container(&s, "web")["state"]["running"]["startedAt"].is_string());
        assert_eq!(container(&s, "web")["imageID"], "sha256:serve");
        assert_eq!(s["podIP"], "127.1.0.2");
        assert_eq!(s["qosClass"], "BestEffort");
        assert_eq!(condition(&s, "Initialized"), "True");
        assert_eq!(n.fake.running(), ["web"]);
        n.shared.events.flushed().await;
        assert!(n.api.events().contains(&"Normal Started".to_string()));
    }

    /// The kubelet's events so far, as "reason: message", once there are `n` of them.
    async fn events_of(api: &FakeApi, n: usize) -> Vec<String> {
        let seen = || -> Vec<String> {
            api.calls()
                .into_iter()
                .filter(|c| c.method == "POST" && c.path.contains("/events"))
                .map(|c| {
                    let text = |k: &str| c.body[k].as_str().unwrap_or("").to_string();
                    format!("{}: {}", text("reason"), text("message"))
                })
                .collect()
        };
        for _ in 0..1000 {
            if seen().len() >= n {
                return seen();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("fewer than {n} events: {:?}", seen());
    }

    #[tokio::test(start_paused = true)]
    async fn the_start_is_told_pulling_pulled_created_started_and_a_present_image_is_not_pulled() {
        let n = node();
        let first = n.run(pod(
            json!({"containers": [{"name": "web", "image": "serve"}]}),
        ));
        let told = events_of(&n.api, 4).await;
        assert_eq!(told[0], "Pulling: Pulling image \"serve\"", "{told:?}");
        assert!(
            told[1].starts_with("Pulled: Successfully pulled image"),
            "{told:?}"
        );
        assert_eq!(
            told[2..4],
            [
                "Created: Created container: web",
                "Started: Started container web (serve)"
            ],
            "{told:?}"
        );
        // Another pod of the same image finds it on the node.
        let mut second = pod(json!({"containers": [{"name": "api", "image": "serve"}]}));
        second.metadata.name = Some("q".into());
        second.metadata.uid = Some("u2".into());
        let _second = n.run(second);
        let told = events_of(&n.api, 7).await;
        assert_eq!(
            told[4..7],
            [
                "Pulled: Container image \"serve\" already present on machine",
                "Created: Created container: api",
                "Started: Started container api (serve)",
            ],
            "{told:?}"
        );
        assert_eq!(n.fake.pulls("serve"), 2);
        drop(first);
    }

    #[tokio::test(start_paused = true)]
    async fn an_ephemeral_container_runs_once_beside_the_app_and_leaves_the_phase_alone() {
        let n = node();
        let spec = json!({"containers": [{"name": "web", "image": "serve"}]});
        let p = n.run(pod(spec.clone()));
        n.until("Running", |s| s["phase"] == "Running").await;
        // kubectl debug adds one to the running pod.
        let mut with_debugger = spec;
        with_debugger["ephemeralContainers"] =
            json!([{"name": "debugger", "image": "run", "targetContainerName": "web"}]);
        let mut updated = pod(with_debugger);
        updated.status = p.pod.status.clone();
        p.updates.send(Some(Arc::new(updated))).unwrap();
        let eph = |s: &Value| s["ephemeralContainerStatuses"][0].clone();
        n.until("the debugger running", |s| {
            eph(s)["state"]["running"].is_object()
        })
        .await;
        assert!(
            container(&n.status(), "debugger").is_null(),
            "not an app container"
        );
        // It ends, and stays ended: no restart, and the pod runs on.
        n.fake.exit("debugger", 1);
        let s = n
            .until("the debugger terminated", |s| {
                eph(s)["state"]["terminated"]["exitCode"] == 1
            })
            .await;
        assert_eq!(s["phase"], "Running");
        assert_eq!(eph(&s)["restartCount"], 0);
        tokio::time::sleep(Duration::from_secs(600)).await;
        let s = n.status();
        assert!(eph(&s)["state"]["terminated"].is_object(), "{s:#}");
        assert_eq!(n.fake.starts("debugger"), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_crashing_process_restarts_at_once_then_after_10s_and_20s() {
        let n = node();
        let crash = Script::Exit {
            after: Duration::from_secs(1),
            code: 1,
        };
        n.fake.image("crash", crash);
        let t0 = Instant::now();
        let _p = n.run(pod(
            json!({"containers": [{"name": "c", "image": "crash"}]}),
        ));
        let mut started_at = Vec::new();
        while started_at.len() < 4 {
            let k = n.fake.starts("c");
            if k > started_at.len() {
                started_at.push((Instant::now() - t0).as_secs());
            }
            assert!(t0.elapsed() < Duration::from_secs(600), "{started_at:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Runs of 1 s each: restarted at once, then after 10 s, then after 20 s.
        assert_eq!(started_at, [0, 1, 12, 33]);
        let s = n
            .until("CrashLoopBackOff", |s| {
                container(s, "c")["state"]["waiting"]["reason"] == "CrashLoopBackOff"
            })
            .await;
        let c = container(&s, "c");
        assert_eq!(c["restartCount"], 3);
        assert_eq!(c["lastState"]["terminated"]["exitCode"], 1);
        let msg = c["state"]["waiting"]["message"].as_str().unwrap();
        assert!(
            msg.starts_with("back-off 40s restarting failed container=c pod=p_default(u1)"),
            "{msg}"
        );
        assert_eq!(s["phase"], "Running");
        assert_eq!(condition(&s, "Ready"), "False");
        // Each back-off was told (the first restart was at once), aggregated as repeats.
        let want = "BackOff: Back-off restarting failed container c in pod p_default(u1)";
        let mut told = Vec::new();
        for _ in 0..1000 {
            told = events_of(&n.api, 0).await;
            if told.iter().any(|e| e == want) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(told.iter().any(|e| e == want), "{told:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_pod_whose_processes_succeed_finishes_and_gives_everything_back() {
        let n = node();
        let free = n.addresses_free();
        n.fake.image(
            "job",
            Script::Exit {
                after: Duration::from_secs(5),
                code: 0,
            },
        );
        let p = n.run(pod(json!({"restartPolicy": "OnFailure",
            "containers": [{"name": "a", "image": "job"}, {"name": "b", "image": "job"}]})));
        let s = n.until("Succeeded", |s| s["phase"] == "Succeeded").await;
        assert_eq!(
            container(&s, "a")["state"]["terminated"]["reason"],
            "Completed"
        );
        assert_eq!(condition(&s, "Ready"), "False");
        assert_eq!(n.fake.live(), 0, "the sandbox is gone");
        assert_eq!(n.addresses_free(), free, "the address is back in the pool");
        assert!(!p.task.is_finished(), "a finished pod waits to be deleted");
        assert_eq!(n.fake.starts("a"), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn init_containers_run_one_after_another_before_the_app() {
        let n = node();
        let init = Script::Exit {
            after: Duration::from_secs(2),
            code: 0,
        };
        n.fake.image("init", init);
        let _p = n.run(pod(json!({
            "initContainers": [{"name": "i1", "image": "init"}, {"name": "i2", "image": "init"}],
            "containers": [{"name": "web", "image": "serve"}],
        })));
        let s = n
            .until("Pending while i1 runs", |s| {
                container(s, "i1")["state"]["running"].is_object()
            })
            .await;
        assert_eq!(s["phase"], "Pending");
        assert_eq!(condition(&s, "Initialized"), "False");
        assert_eq!((n.fake.starts("i2"), n.fake.starts("web")), (0, 0));
        n.until("i2 running", |s| {
            container(s, "i2")["state"]["running"].is_object()
        })
        .await;
        assert_eq!(
            n.fake.starts("web"),
            0,
            "the app waits for every init container"
        );
        let s = n.until("Ready", |s| condition(s, "Ready") == "True").await;
        assert_eq!(condition(&s, "Initialized"), "True");
        for i in ["i1", "i2"] {
            assert_eq!(
                container(&s, i)["state"]["terminated"]["reason"],
                "Completed"
            );
        }
        assert_eq!((n.fake.starts("i1"), n.fake.starts("i2")), (1, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_init_container_fails_a_pod_that_never_restarts() {
        let n = node();
        n.fake.image(
            "bad-init",
            Script::Exit {
                after: Duration::from_secs(1),
                code: 2,
            },
        );
        let _p = n.run(pod(json!({"restartPolicy": "Never",
            "initContainers": [{"name": "i", "image": "bad-init"}],
            "containers": [{"name": "web", "image": "serve"}]})));
        let s = n.until("Failed", |s| s["phase"] == "Failed").await;
        assert_eq!(s["reason"], "InitFailed");
        assert_eq!(container(&s, "i")["state"]["terminated"]["exitCode"], 2);
        assert_eq!(n.fake.starts("web"), 0);
        assert_eq!(n.fake.live(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_init_container_is_retried_with_backoff_under_always() {
        let n = node();
        n.fake.image(
            "bad-init",
            Script::Exit {
                after: Duration::from_secs(1),
                code: 2,
            },
        );
        let _p = n.run(pod(json!({
            "initContainers": [{"name": "i", "image": "bad-init"}],
            "containers": [{"name": "web", "image": "serve"}]})));
        let s = n
            .until("init in CrashLoopBackOff", |s| {
                container(s, "i")["state"]["waiting"]["reason"] == "CrashLoopBackOff"
            })
            .await;
        assert_eq!(s["phase"], "Pending");
        assert!(n.fake.starts("i") >= 2);
        assert_eq!(n.fake.starts("web"), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_liveness_probe_restarts_the_container_and_only_that_run() {
        let n = node();
        let _p = n.run(pod(json!({"containers": [{"name": "c", "image": "run",
            "livenessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1, "failureThreshold": 2}}]})));
        n.until("Running", |s| s["phase"] == "Running").await;
        n.fake.fail_probes("c", true);
        let s = n
            .until("a restart", |s| container(s, "c")["restartCount"] == 1)
            .await;
        n.fake.fail_probes("c", false);
        let last = &container(&s, "c")["lastState"]["terminated"];
        assert_eq!(last["exitCode"], 137);
        assert!(
            last["message"]
                .as_str()
                .unwrap()
                .contains("failed liveness probe"),
            "{last}"
        );
        n.shared.events.flushed().await;
        let events = n.api.events();
        assert!(
            events.contains(&"Warning Unhealthy".to_string()),
            "{events:?}"
        );
        assert!(events.contains(&"Normal Killing".to_string()), "{events:?}");
        // The killed run's exit (143, from the stop) arrives after its restart, and must not
        // be taken for the new run's.
        tokio::time::sleep(Duration::from_secs(30)).await;
        let s = n.status();
        assert_eq!(container(&s, "c")["restartCount"], 1, "{s:#}");
        assert!(container(&s, "c")["state"]["running"].is_object(), "{s:#}");
        assert_eq!(n.fake.starts("c"), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_pods_start_is_timed_once_when_every_app_container_has_started() {
        let n = node();
        let _p = n.run(pod(json!({"containers": [
            {"name": "a", "image": "serve"}, {"name": "b", "image": "serve"}]})));
        n.until("Running", |s| s["phase"] == "Running").await;
        let text = n.shared.logs.pod_starts.encode();
        assert!(
            text.lines()
                .any(|l| l == "kubelet_pod_start_duration_seconds_count 1"),
            "{text}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn host_namespaces_asked_for_are_named_in_a_warning() {
        let n = node();
        let _p = n.run(pod(json!({"hostNetwork": true, "hostPID": true,
            "containers": [{"name": "c", "image": "serve"}]})));
        n.until("Running", |s| s["phase"] == "Running").await;
        n.shared.events.flushed().await;
        let events = n.api.events();
        assert!(
            events.contains(&"Warning HostNamespacesNotShared".to_string()),
            "{events:?}"
        );
        // A pod that asks for none is not warned.
        let n = node();
        let _p = n.run(pod(
            json!({"containers": [{"name": "c", "image": "serve"}]}),
        ));
        n.until("Running", |s| s["phase"] == "Running").await;
        n.shared.events.flushed().await;
        let events = n.api.events();
        assert!(
            !events.iter().any(|e| e.contains("HostNamespaces")),
            "{events:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn readiness_decides_ready_and_startup_holds_back_liveness() {
        let n = node();
        let _p = n.run(pod(json!({"containers": [{"name": "c", "image": "serve",
            "startupProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1, "failureThreshold": 30},
            "livenessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1, "failureThreshold": 1},
            "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1, "failureThreshold": 1}}]})));
        let s = n.until("Ready", |s| condition(s, "Ready") == "True").await;
        assert_eq!(container(&s, "c")["started"], true);
        // A failing probe now fails readiness and liveness: not ready, and restarted.
        n.fake.fail_probes("c", true);
        let s = n
            .until("not ready", |s| condition(s, "Ready") == "False")
            .await;
        assert_eq!(container(&s, "c")["ready"], false);
        n.until("a restart", |s| container(s, "c")["restartCount"] == 1)
            .await;
        // While the startup probe fails, liveness waits: no more restarts, however long.
        let restarts = n.fake.starts("c");
        tokio::time::sleep(Duration::from_secs(20)).await;
        assert_eq!(n.fake.starts("c"), restarts);
        assert_eq!(container(&n.status(), "c")["started"], false);
    }

    #[tokio::test(start_paused = true)]
    async fn an_image_that_cannot_be_pulled_backs_off() {
        let n = node();
        let _p = n.run(pod(
            json!({"containers": [{"name": "c", "image": "missing"}]}),
        ));
        let s = n
            .until("ErrImagePull", |s| {
                container(s, "c")["state"]["waiting"]["reason"] == "ErrImagePull"
            })
            .await;
        let msg = container(&s, "c")["state"]["waiting"]["message"].clone();
        assert!(msg.as_str().unwrap().contains("no such image"), "{msg}");
        n.until("ImagePullBackOff", |s| {
            container(s, "c")["state"]["waiting"]["reason"] == "ImagePullBackOff"
        })
        .await;
        // Retries double from 1 s: about 6 pulls in the first minute, not one per wake.
        tokio::time::sleep(Duration::from_secs(60)).await;
        let pulls = n.fake.pulls("missing");
        assert!((4..=8).contains(&pulls), "{pulls} pulls");
        assert_eq!(n.fake.image("missing", Script::Serve).starts("c"), 0);
        n.until("running once the image is there", |s| {
            s["phase"] == "Running"
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_pod_whose_configuration_is_missing_waits_without_a_sandbox() {
        let n = node();
        n.api.fail("GET", "/configmaps/cfg", 404);
        let _p = n.run(pod(json!({"containers": [{"name": "c", "image": "serve",
            "env": [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "k"}}}]}]})));
        let s = n
            .until("CreateContainerConfigError", |s| {
                container(s, "c")["state"]["waiting"]["reason"] == "CreateContainerConfigError"
            })
            .await;
        let msg = container(&s, "c")["state"]["waiting"]["message"].to_string();
        assert!(msg.contains("cfg"), "{msg}");
        assert_eq!(n.fake.live(), 0, "a pod refused for its spec runs nothing");
        assert_eq!(n.fake.pulls("serve"), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_container_that_cannot_start_waits_and_retries() {
        let n = node();
        n.fake.image("broken", Script::FailStart);
        let _p = n.run(pod(
            json!({"containers": [{"name": "c", "image": "broken"}]}),
        ));
        let s = n
            .until("CrashLoopBackOff", |s| {
                container(s, "c")["state"]["waiting"]["reason"] == "CrashLoopBackOff"
            })
            .await;
        assert_eq!(
            container(&s, "c")["lastState"]["terminated"]["reason"],
            "StartError"
        );
        // As the kubelet counts it: a container waiting after a run is stopped, not
        // pending, and under `Always` the pod is Running.
        assert_eq!(s["phase"], "Running");
    }

    #[tokio::test(start_paused = true)]
    async fn a_deleted_pod_stops_and_its_deletion_is_completed() {
        let n = node();
        let free = n.addresses_free();
        let p = n.run(pod(json!({"containers": [
            {"name": "web", "image": "serve"}, {"name": "worker", "image": "run"}]})));
        n.until("Running", |s| s["phase"] == "Running").await;
        let mut deleting = p.pod.clone();
        deleting.metadata.deletion_timestamp = Some(podx::now());
        deleting.metadata.deletion_grace_period_seconds = Some(5);
        p.updates.send(Some(Arc::new(deleting))).unwrap();
        p.task.await.unwrap();
        let s = n.status();
        assert_eq!(container(&s, "web")["state"]["terminated"]["exitCode"], 0);
        assert_eq!(
            container(&s, "worker")["state"]["terminated"]["exitCode"],
            143
        );
        assert_eq!(n.fake.live(), 0);
        assert!(n.fake.running().is_empty());
        assert_eq!(n.addresses_free(), free);
        assert!(n
            .api
            .writes()
            .contains(&"DELETE /api/v1/namespaces/default/pods/p".to_string()));
        assert!(!n.shared.pod_dir("u1").exists());
    }

    #[tokio::test(start_paused = true)]
    async fn a_pod_gone_from_the_api_while_it_prepares_stops_too() {
        let n = node();
        let p = n.run(pod(
            json!({"containers": [{"name": "c", "image": "missing"}]}),
        ));
        n.until("ErrImagePull", |s| {
            container(s, "c")["state"]["waiting"]["reason"] == "ErrImagePull"
        })
        .await;
        p.updates.send(None).unwrap();
        p.task.await.unwrap();
        assert_eq!(n.fake.live(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn an_evicted_pod_fails_and_stays_down() {
        let n = node();
        let _p = n.run(pod(json!({"containers": [{"name": "c", "image": "run"}]})));
        n.until("Running", |s| s["phase"] == "Running").await;
        n.shared
            .evictions
            .order("u1", "The node was low on resource: memory.".into());
        let s = n.until("Failed", |s| s["phase"] == "Failed").await;
        assert_eq!(s["reason"], "Evicted");
        assert_eq!(container(&s, "c")["state"]["terminated"]["exitCode"], 137);
        assert_eq!(n.fake.live(), 0);
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(n.fake.starts("c"), 1, "an evicted pod does not come back");
    }

    #[tokio::test(start_paused = true)]
    async fn a_pod_that_does_not_fit_is_refused() {
        let n = node();
        let _p = n.run(pod(json!({"containers": [{"name": "c", "image": "serve",
            "resources": {"limits": {"memory": "16Gi"}}}]})));
        let s = n.until("Failed", |s| s["phase"] == "Failed").await;
        assert_eq!(s["reason"], "OutOfmemory");
        assert_eq!(n.fake.starts("c"), 0);
        assert_eq!(n.fake.live(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_status_the_api_refuses_is_written_again_later() {
        let n = node();
        n.api.fail("PATCH", "/pods/p/status", 500);
        let _p = n.run(pod(
            json!({"containers": [{"name": "c", "image": "serve"}]}),
        ));
        tokio::time::sleep(Duration::from_secs(30)).await;
        let tries = n
            .api
            .calls()
            .iter()
            .filter(|c| c.method == "PATCH" && c.path.ends_with("/status"))
            .count();
        // Backing off to one write per 10 s: a handful of tries, not one per wake.
        assert!((3..=12).contains(&tries), "{tries} writes in 30 s");
    }
}
