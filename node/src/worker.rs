//! One pod's life on the node, from bound to gone.
//!
//! Each pod bound to the node gets a worker task that owns its sandbox. The worker walks
//! the pod through explicit steps (the Krustlet lesson: keep the states, keep the generics
//! shallow):
//!
//! 1. **Prepare**: an address from the node's range, the ConfigMap/Secret/downward-API
//!    references resolved (`CreateContainerConfigError` naming the missing object
//!    otherwise, retried), the components loaded (`ErrImagePull`, then `ImagePullBackOff`).
//! 2. **Init**: init containers run one after another to completion.
//! 3. **Run**: every container starts in one sandbox. The worker then waits on exits,
//!    probes, restarts and updates of the pod object:
//!    - an exited container restarts per `restartPolicy`, the first time at once, then
//!      after 10 s, 20 s, 40 s… capped at 5 minutes (`CrashLoopBackOff` meanwhile); a
//!      container that ran 10 minutes starts its backoff over;
//!    - a failed liveness probe restarts the container; readiness decides `ready`;
//!      liveness and readiness wait for the startup probe;
//!    - configMap and secret volumes are rewritten as their objects change.
//! 4. **Terminate**, when the pod is deleted: HTTP components stop taking connections
//!    and finish their requests within the grace period; CLI components are stopped at
//!    once (a Wasm component has no SIGTERM to handle, so it gets the default action).
//!    The worker then reports the final status and completes the deletion.
//!
//! After every step that changes what the API should show, the worker patches the pod's
//! status: phase, conditions, container states with exit codes and reasons, restart
//! counts, podIP and hostIP.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use baton_kube::error::chain;
use baton_kube::events::{EventType, Recorder};
use baton_kube::{pod as podx, quantity};
use baton_wasm_shim::logs::{ContainerLog, LogConfig};
use baton_wasm_shim::{
    CliOutcome, CliSpec, Component, ComponentKind, ContainerSpec, HttpSpec, NameResolver, Runtime,
    ShimError,
};
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Container, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::config::{self, ContainerConfig, PodFacts};
use crate::images::Images;
use crate::ipam::Ipam;
use crate::probe::{self, Prober};

/// How often configMap and secret volumes are re-read.
const VOLUME_REFRESH: Duration = Duration::from_secs(15);
/// How long a terminating pod keeps taking connections after leaving the routing, for
/// its EndpointSlice change to reach every node.
const ENDPOINT_PROPAGATION: Duration = Duration::from_secs(1);
/// A pod's status is written at most once per this interval (the newest state wins).
const STATUS_INTERVAL: Duration = Duration::from_millis(100);
/// A container that ran this long starts its restart backoff over.
const BACKOFF_RESET: Duration = Duration::from_secs(600);

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

/// Gives the name resolver of pods in a namespace (Service names), if the node has one.
pub type Resolvers = Arc<dyn Fn(&str) -> NameResolver + Send + Sync>;

/// What all the node's workers share.
pub struct Shared {
    pub client: Client,
    pub runtime: Runtime,
    pub images: Images,
    pub ipam: Mutex<Ipam>,
    pub node_name: String,
    pub host_ip: String,
    pub data_dir: PathBuf,
    pub recorder: Recorder,
    pub settings: Settings,
    pub resolvers: Option<Resolvers>,
    pub services: Option<crate::proxy::Services>,
    pub logs: Arc<crate::server::LogIndex>,
    /// What the node has promised its pods' memory.
    pub memory: Arc<crate::budget::MemoryBudget>,
    /// Memory pressure, and the evictions it orders.
    pub evictions: Arc<crate::eviction::Evictions>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("node", &self.node_name)
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// Where a pod's volumes and logs live on the node.
    pub fn pod_dir(&self, uid: &str) -> PathBuf {
        self.data_dir.join("pods").join(uid)
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

#[derive(Debug, Clone)]
struct Terminated {
    exit_code: i32,
    reason: String,
    message: String,
    started_at: Option<Time>,
    finished_at: Time,
}

#[derive(Debug, Clone)]
enum State {
    Waiting { reason: String, message: String },
    Running { started_at: Time },
    Terminated(Terminated),
}

/// One container as the worker tracks it.
struct Slot {
    spec: Container,
    init: bool,
    component: Option<Component>,
    kind: Option<ComponentKind>,
    config: ContainerConfig,
    state: State,
    last: Option<Terminated>,
    restarts: i32,
    ready: bool,
    started: bool,
    started_instant: Option<Instant>,
    backoff: Duration,
    restart_at: Option<Instant>,
    probers: Vec<Prober>,
    /// The digest of the pulled image, when it came from a registry.
    image_id: Option<String>,
}

impl Slot {
    fn new(spec: Container, init: bool) -> Self {
        Self {
            spec,
            init,
            component: None,
            kind: None,
            config: ContainerConfig::default(),
            state: State::Waiting {
                reason: "ContainerCreating".into(),
                message: String::new(),
            },
            last: None,
            restarts: 0,
            ready: false,
            started: false,
            started_instant: None,
            backoff: Duration::ZERO,
            restart_at: None,
            probers: Vec::new(),
            image_id: None,
        }
    }

    fn status(&self, uid: &str) -> Value {
        let state = |s: &State| match s {
            State::Waiting { reason, message } => {
                json!({"waiting": {"reason": reason, "message": (!message.is_empty()).then_some(message)}})
            }
            State::Running { started_at } => json!({"running": {"startedAt": started_at}}),
            State::Terminated(t) => json!({"terminated": {
                "exitCode": t.exit_code, "reason": t.reason,
                "message": (!t.message.is_empty()).then_some(&t.message),
                "startedAt": t.started_at, "finishedAt": t.finished_at,
                "containerID": format!("wasm://{uid}/{}", self.spec.name),
            }}),
        };
        let running = matches!(self.state, State::Running { .. });
        json!({
            "name": self.spec.name,
            "image": self.spec.image.clone().unwrap_or_default(),
            "imageID": self.image_id.clone().unwrap_or_else(|| self.spec.image.clone().unwrap_or_default()),
            "containerID": format!("wasm://{uid}/{}", self.spec.name),
            "ready": self.ready,
            "started": running && self.started,
            "restartCount": self.restarts,
            "state": state(&self.state),
            "lastState": self.last.clone().map(|t| state(&State::Terminated(t))).unwrap_or(json!({})),
        })
    }
}

type Exit = (String, Result<CliOutcome, String>);
/// Sync as well as Send, because the worker is borrowed across awaits.
type ExitFuture = std::pin::Pin<Box<dyn std::future::Future<Output = Exit> + Send + Sync>>;

/// A pod and everything the worker holds for it.
struct Worker {
    shared: Arc<Shared>,
    pod: Arc<Pod>,
    uid: String,
    ip: Option<Ipv4Addr>,
    sandbox: Option<baton_wasm_shim::Pod>,
    slots: Vec<Slot>,
    exits: FuturesUnordered<ExitFuture>,
    logs: HashMap<String, ContainerLog>,
    initialized: bool,
    prepared: bool,
    start_time: Option<Time>,
    last_status: Value,
    /// When the status was last written, and whether a newer one waits for its turn.
    last_report: Option<Instant>,
    report_pending: bool,
    report_backoff: Duration,
    phase_override: Option<(&'static str, String, String)>,
    next_refresh: Instant,
    prepare_retry: Option<Instant>,
    prepare_backoff: Duration,
}

impl Worker {
    fn api(&self) -> Api<Pod> {
        Api::namespaced(
            self.shared.client.clone(),
            &self.pod.namespace().unwrap_or_default(),
        )
    }

    fn restart_policy(&self) -> &str {
        self.pod
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.as_deref())
            .unwrap_or("Always")
    }

    fn facts(&self) -> PodFacts {
        PodFacts {
            pod_ip: self.ip.map(|i| i.to_string()).unwrap_or_default(),
            host_ip: self.shared.host_ip.clone(),
            node_name: self.shared.node_name.clone(),
        }
    }

    async fn event(&self, type_: EventType, reason: &str, message: &str) {
        self.shared
            .recorder
            .publish(&self.pod.object_ref(&()), type_, reason, message)
            .await;
    }

    /// Resolves configuration and loads components; on failure the containers wait with
    /// the reason, and the worker tries again later.
    async fn prepare(&mut self) -> bool {
        if self.ip.is_none() {
            let want = self
                .pod
                .status
                .as_ref()
                .and_then(|s| s.pod_ip.as_deref())
                .and_then(|ip| ip.parse().ok());
            let got = self
                .shared
                .ipam
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .allocate(want);
            match got {
                Ok(ip) => self.ip = Some(ip),
                Err(e) => {
                    self.fail_waiting("ContainerCreating", &chain(&e));
                    self.event(EventType::Warning, "FailedCreatePodSandBox", &chain(&e))
                        .await;
                    return false;
                }
            }
        }
        let dir = self.shared.pod_dir(&self.uid);
        match config::resolve(
            &self.shared.client,
            &self.pod,
            &self.facts(),
            &dir,
            &self.shared.settings.allowed_host_paths,
        )
        .await
        {
            Ok(mut configs) => {
                for s in &mut self.slots {
                    s.config = configs.remove(&s.spec.name).unwrap_or_default();
                }
            }
            Err(e) => {
                let msg = chain(&e);
                self.fail_waiting("CreateContainerConfigError", &msg);
                self.event(EventType::Warning, "Failed", &format!("Error: {msg}"))
                    .await;
                return false;
            }
        }
        for i in 0..self.slots.len() {
            if self.slots[i].component.is_some() {
                continue;
            }
            let image = self.slots[i].spec.image.clone().unwrap_or_default();
            let policy = match self.slots[i].spec.image_pull_policy.as_deref() {
                Some("Always") => baton_oci::PullPolicy::Always,
                Some("Never") => baton_oci::PullPolicy::Never,
                _ => baton_oci::PullPolicy::IfNotPresent,
            };
            let auth = config::pull_auth(&self.shared.client, &self.pod, &image).await;
            let started = Instant::now();
            let got = self.shared.images.get(&image, &auth, policy).await;
            if let Ok(img) = &got {
                if img.pulled {
                    let msg = format!(
                        "Successfully pulled image \"{image}\" in {:.3}s",
                        started.elapsed().as_secs_f64()
                    );
                    self.event(EventType::Normal, "Pulled", &msg).await;
                }
                if let Some(d) = &img.digest {
                    self.shared.images.hold(&self.uid, d);
                }
                self.slots[i].image_id = img.digest.clone();
            }
            match got.map(|img| img.component) {
                Ok(c) => match self.shared.runtime.kind(&c) {
                    Ok(kind) => {
                        self.slots[i].kind = Some(kind);
                        self.slots[i].component = Some(c);
                    }
                    Err(e) => {
                        let msg = format!("image {image}: {}", chain(&e));
                        self.slots[i].state = State::Waiting {
                            reason: "CreateContainerError".into(),
                            message: msg.clone(),
                        };
                        self.event(EventType::Warning, "Failed", &msg).await;
                        return false;
                    }
                },
                Err(e) => {
                    // The first failure says ErrImagePull; repeated ones, ImagePullBackOff.
                    let reason = match &self.slots[i].state {
                        State::Waiting { reason, .. }
                            if reason == "ErrImagePull" || reason == "ImagePullBackOff" =>
                        {
                            "ImagePullBackOff"
                        }
                        _ => e.reason(),
                    };
                    let msg = chain(&e);
                    self.slots[i].state = State::Waiting {
                        reason: reason.into(),
                        message: msg.clone(),
                    };
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
                    self.event(type_, event_reason, &text).await;
                    return false;
                }
            }
        }
        true
    }

    /// Every container not yet started waits with `reason`.
    fn fail_waiting(&mut self, reason: &str, message: &str) {
        for s in &mut self.slots {
            if matches!(s.state, State::Waiting { .. }) {
                s.state = State::Waiting {
                    reason: reason.into(),
                    message: message.into(),
                };
            }
        }
    }

    fn container_spec(&self, i: usize) -> Result<ContainerSpec, String> {
        let s = &self.slots[i];
        let c = &s.spec;
        let component = s.component.clone().ok_or("component not loaded")?;
        let memory_bytes = self.shared.memory.container_limit(c) as usize;
        let log = ContainerLog::open(self.shared.log_config(&self.uid, &c.name, s.restarts))
            .map_err(|e| format!("opening the container log: {e}"))?;
        let port = c
            .ports
            .iter()
            .flatten()
            .next()
            .and_then(|p| u16::try_from(p.container_port).ok())
            .or(Some(8080));
        // The component's entry point is fixed (wasi:cli/run); `command` and `args` are
        // both its arguments.
        let args: Vec<String> = c
            .command
            .iter()
            .flatten()
            .chain(c.args.iter().flatten())
            .cloned()
            .collect();
        Ok(ContainerSpec {
            name: c.name.clone(),
            component,
            port,
            cli: CliSpec {
                args,
                env: s.config.env.clone(),
                mounts: s.config.mounts.clone(),
                memory_bytes,
                timeout: None,
                network: true,
                output_limit: 0,
                log: Some(log.clone()),
            },
            http: HttpSpec {
                env: s.config.env.clone(),
                memory_bytes,
                request_timeout: Some(self.shared.settings.request_timeout),
                log: Some(log),
            },
        })
    }

    /// Starts container `i` in the sandbox.
    async fn start(&mut self, i: usize) {
        let spec = self.container_spec(i).and_then(|s| {
            config::recheck_mounts(&s.cli.mounts)
                .map(|()| s)
                .map_err(|e| chain(&e))
        });
        let spec = match spec {
            Ok(s) => s,
            Err(msg) => {
                self.slots[i].state = State::Waiting {
                    reason: "CreateContainerError".into(),
                    message: msg,
                };
                return;
            }
        };
        let name = spec.name.clone();
        let ip = self
            .ip
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::from([127, 0, 0, 1]));
        let sandbox = self.sandbox.get_or_insert_with(|| {
            let ns = self.pod.namespace().unwrap_or_default();
            let names = self.shared.resolvers.as_ref().map(|r| r(&ns));
            let key = format!("{ns}/{}/{}", self.pod.name_any(), self.uid);
            let sb = self.shared.runtime.new_pod(&key, ip, names);
            sb.set_cpu_limit(pod_cpu_limit(&self.pod));
            // Its weight among unlimited pods: its CPU request, as the scheduler counts it.
            sb.set_cpu_weight(podx::requests(&self.pod).0);
            // The pod's instances together hold at most what it was admitted with.
            sb.set_memory_limit(Some(self.shared.memory.charge_of(&self.pod) as usize));
            sb
        });
        if let Some(log) = &spec.cli.log {
            self.logs.insert(name.clone(), log.clone());
        }
        match sandbox.start_container(&self.shared.runtime, spec).await {
            Ok(()) => {
                if let Some(task) = sandbox.take_process(&name) {
                    let n = name.clone();
                    self.exits.push(Box::pin(async move {
                        let r = match task.await {
                            Ok(Ok(out)) => Ok(out),
                            Ok(Err(e)) => Err(e.to_string()),
                            Err(e) if e.is_cancelled() => Err("stopped".to_string()),
                            Err(e) => Err(format!("container task failed: {e}")),
                        };
                        (n, r)
                    }));
                }
                let log_path = self
                    .shared
                    .log_config(&self.uid, &name, self.slots[i].restarts)
                    .path;
                self.shared.logs.set_live(log_path, true);
                let now = Instant::now();
                let slot = &mut self.slots[i];
                slot.state = State::Running {
                    started_at: podx::now(),
                };
                slot.started_instant = Some(now);
                slot.probers = if slot.init {
                    Vec::new()
                } else {
                    probe::for_container(&slot.spec, now)
                };
                let has = |k| slot.probers.iter().any(|p| p.kind == k);
                slot.started = !has(probe::Kind::Startup);
                slot.ready = slot.started && !has(probe::Kind::Readiness);
                let image = slot.spec.image.clone().unwrap_or_default();
                self.event(
                    EventType::Normal,
                    "Started",
                    &format!("Started container {name} ({image})"),
                )
                .await;
            }
            Err(e) => {
                let msg = chain(&e);
                let (reason, code) = match e {
                    ShimError::Setup(_) => ("StartError", 128),
                    _ => ("CreateContainerError", 128),
                };
                self.record_exit(i, code, reason, &msg);
                self.event(EventType::Warning, "Failed", &format!("Error: {msg}"))
                    .await;
            }
        }
    }

    /// Records that container `i` stopped, and when (if ever) it restarts.
    fn record_exit(&mut self, i: usize, code: i32, reason: &str, message: &str) {
        self.log_stopped(i);
        let policy = self.restart_policy().to_string();
        let base = self.shared.settings.backoff_base;
        let max = self.shared.settings.backoff_max;
        let slot = &mut self.slots[i];
        let started_at = match &slot.state {
            State::Running { started_at } => Some(started_at.clone()),
            _ => None,
        };
        let ran = slot
            .started_instant
            .map(|t| t.elapsed())
            .unwrap_or_default();
        let t = Terminated {
            exit_code: code,
            reason: reason.into(),
            message: message.into(),
            started_at,
            finished_at: podx::now(),
        };
        slot.ready = false;
        slot.started = false;
        slot.probers.clear();
        let restart = match policy.as_str() {
            "Never" => false,
            "OnFailure" => code != 0,
            _ => !slot.init || code != 0,
        };
        if !restart {
            slot.state = State::Terminated(t);
            slot.restart_at = None;
            return;
        }
        if ran >= BACKOFF_RESET {
            slot.backoff = Duration::ZERO;
        }
        // The first restart is immediate; then 10 s, 20 s, 40 s… up to the cap.
        let wait = slot.backoff;
        slot.backoff = if wait.is_zero() {
            base
        } else {
            (wait * 2).min(max)
        };
        slot.last = Some(t.clone());
        slot.restart_at = Some(Instant::now() + wait);
        slot.state = if wait.is_zero() {
            State::Terminated(t)
        } else {
            State::Waiting {
                reason: "CrashLoopBackOff".into(),
                message: format!(
                    "back-off {}s restarting failed container={} pod={}_{}({})",
                    wait.as_secs(),
                    slot.spec.name,
                    self.pod.name_any(),
                    self.pod.namespace().unwrap_or_default(),
                    self.uid
                ),
            }
        };
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

    async fn restart(&mut self, i: usize) {
        let slot = &mut self.slots[i];
        slot.restart_at = None;
        if let State::Terminated(t) = &slot.state {
            slot.last = Some(t.clone());
        }
        slot.restarts += 1;
        self.start(i).await;
    }

    fn on_exit(&mut self, name: &str, result: Result<CliOutcome, String>) {
        let Some(i) = self.slots.iter().position(|s| s.spec.name == name) else {
            return;
        };
        if !matches!(self.slots[i].state, State::Running { .. }) {
            return;
        }
        match result {
            Ok(out) => self.record_exit(i, out.exit.code, out.exit.reason, &out.exit.message),
            Err(msg) => self.record_exit(i, 128, "Error", &msg),
        }
    }

    async fn run_probes(&mut self) {
        let Some(ip) = self.ip.map(IpAddr::V4) else {
            return;
        };
        let now = Instant::now();
        for i in 0..self.slots.len() {
            if !matches!(self.slots[i].state, State::Running { .. }) {
                continue;
            }
            let mut kill: Option<String> = None;
            let spec = self.slots[i].spec.clone();
            let started = self.slots[i].started;
            let mut events: Vec<String> = Vec::new();
            for p in &mut self.slots[i].probers {
                if !p.due(now) || (p.kind != probe::Kind::Startup && !started) {
                    continue;
                }
                if p.kind == probe::Kind::Startup && started {
                    continue;
                }
                let changed = p.run(ip, &spec).await;
                if p.passing == Some(false) || changed == Some(false) {
                    events.push(format!("{:?} probe failed: {}", p.kind, p.last_message));
                }
                match (p.kind, changed) {
                    (probe::Kind::Startup, Some(true)) => {}
                    (probe::Kind::Startup, Some(false)) | (probe::Kind::Liveness, Some(false)) => {
                        kill = Some(format!(
                            "Container {} failed {} probe, will be restarted",
                            spec.name,
                            if p.kind == probe::Kind::Startup {
                                "startup"
                            } else {
                                "liveness"
                            }
                        ));
                    }
                    _ => {}
                }
            }
            let slot = &mut self.slots[i];
            if !slot.started
                && slot
                    .probers
                    .iter()
                    .any(|p| p.kind == probe::Kind::Startup && p.passing == Some(true))
            {
                slot.started = true;
            }
            let readiness = slot
                .probers
                .iter()
                .find(|p| p.kind == probe::Kind::Readiness);
            slot.ready = slot.started && readiness.is_none_or(|p| p.passing == Some(true));
            for e in events {
                self.event(EventType::Warning, "Unhealthy", &e).await;
            }
            if let Some(msg) = kill {
                self.event(EventType::Normal, "Killing", &msg).await;
                if let Some(sb) = &mut self.sandbox {
                    sb.stop_container(&spec.name).await;
                }
                self.record_exit(i, 137, "Error", &msg);
            }
        }
    }

    fn phase(&self) -> (&'static str, bool) {
        if let Some((phase, _, _)) = &self.phase_override {
            return (phase, true);
        }
        let apps: Vec<&Slot> = self.slots.iter().filter(|s| !s.init).collect();
        let done = |s: &&Slot| matches!(s.state, State::Terminated(_)) && s.restart_at.is_none();
        if !apps.is_empty() && apps.iter().all(done) {
            let ok = apps
                .iter()
                .all(|s| matches!(&s.state, State::Terminated(t) if t.exit_code == 0));
            return (if ok { "Succeeded" } else { "Failed" }, true);
        }
        let any_ran = apps.iter().any(|s| {
            !matches!(s.state, State::Waiting { .. }) || s.restarts > 0 || s.last.is_some()
        });
        (
            if any_ran && self.initialized {
                "Running"
            } else {
                "Pending"
            },
            false,
        )
    }

    fn status(&self) -> Value {
        let (phase, _) = self.phase();
        let apps: Vec<&Slot> = self.slots.iter().filter(|s| !s.init).collect();
        let all_ready = !apps.is_empty() && apps.iter().all(|s| s.ready) && phase == "Running";
        let mut conditions = self
            .pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.clone())
            .unwrap_or_default();
        podx::set_condition(&mut conditions, "PodScheduled", true, None, None);
        podx::set_condition(&mut conditions, "Initialized", self.initialized, None, None);
        let not_ready: Vec<&str> = apps
            .iter()
            .filter(|s| !s.ready)
            .map(|s| s.spec.name.as_str())
            .collect();
        let (reason, message) = if all_ready || phase == "Succeeded" {
            (None, None)
        } else if phase == "Failed" {
            (Some("PodFailed"), None)
        } else {
            (
                Some("ContainersNotReady"),
                Some(format!(
                    "containers with unready status: [{}]",
                    not_ready.join(" ")
                )),
            )
        };
        let reason = if phase == "Succeeded" {
            Some("PodCompleted")
        } else {
            reason
        };
        podx::set_condition(
            &mut conditions,
            "ContainersReady",
            all_ready,
            reason,
            message.as_deref(),
        );
        podx::set_condition(
            &mut conditions,
            "Ready",
            all_ready,
            reason,
            message.as_deref(),
        );
        let statuses: Vec<Value> = apps.iter().map(|s| s.status(&self.uid)).collect();
        let inits: Vec<Value> = self
            .slots
            .iter()
            .filter(|s| s.init)
            .map(|s| s.status(&self.uid))
            .collect();
        let ip = self.ip.map(|i| i.to_string());
        let mut status = json!({
            "phase": phase,
            "conditions": conditions,
            "hostIP": self.shared.host_ip,
            "hostIPs": [{"ip": self.shared.host_ip}],
            "podIP": ip,
            "podIPs": ip.as_ref().map(|i| vec![json!({"ip": i})]).unwrap_or_default(),
            "startTime": self.start_time,
            "containerStatuses": statuses,
            "qosClass": qos_class(&self.pod),
        });
        if !inits.is_empty() {
            status["initContainerStatuses"] = json!(inits);
        }
        if let Some((_, reason, message)) = &self.phase_override {
            status["reason"] = json!(reason);
            status["message"] = json!(message);
        }
        status
    }

    /// Sends the status if it differs from the last one sent, at most once per
    /// [`STATUS_INTERVAL`]: a change within the interval of the last write is held, and
    /// the newest state is written when the interval ends (the worker wakes for it). A
    /// pod whose containers exit in a storm costs one write per interval, not one each.
    async fn report(&mut self) {
        if self
            .last_report
            .is_some_and(|t| t.elapsed() < self.report_interval())
        {
            self.report_pending = self.status() != self.last_status;
            return;
        }
        self.report_now().await;
    }

    /// How long after the last write the next may go: the interval, or longer after
    /// failed writes (doubling to 10 s), so an unreachable API is not hammered.
    fn report_interval(&self) -> Duration {
        STATUS_INTERVAL.max(self.report_backoff)
    }

    /// Sends the status now if it differs from the last one sent.
    async fn report_now(&mut self) {
        self.report_pending = false;
        let status = self.status();
        if status == self.last_status {
            return;
        }
        self.last_report = Some(Instant::now());
        let patch = json!({"status": status});
        match self
            .api()
            .patch_status(
                &self.pod.name_any(),
                &PatchParams::default(),
                &Patch::Merge(patch),
            )
            .await
        {
            Ok(p) => {
                self.last_status = status;
                self.pod = Arc::new(p);
                self.report_backoff = Duration::ZERO;
            }
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => {
                self.report_backoff = (self.report_backoff * 2)
                    .max(STATUS_INTERVAL * 2)
                    .min(Duration::from_secs(10));
                self.report_pending = true;
                tracing::warn!(error = %e, "status update failed; will retry");
            }
        }
    }

    /// When the worker must next wake without an event.
    fn next_wake(&self) -> Instant {
        let mut at = Instant::now() + Duration::from_secs(60);
        for s in &self.slots {
            if let Some(r) = s.restart_at {
                at = at.min(r);
            }
            for p in &s.probers {
                at = at.min(p.next_at());
            }
        }
        if let Some(r) = self.prepare_retry {
            at = at.min(r);
        }
        if let (true, Some(t)) = (self.report_pending, self.last_report) {
            at = at.min(t + self.report_interval());
        }
        if self.has_projected_volumes() {
            at = at.min(self.next_refresh);
        }
        at
    }

    fn has_projected_volumes(&self) -> bool {
        self.pod
            .spec
            .as_ref()
            .and_then(|s| s.volumes.as_ref())
            .is_some_and(|v| {
                v.iter()
                    .any(|v| v.config_map.is_some() || v.secret.is_some())
            })
    }

    /// Runs init containers in order; true once all have succeeded.
    async fn run_inits(&mut self) -> bool {
        for i in 0..self.slots.len() {
            if !self.slots[i].init {
                continue;
            }
            if matches!(&self.slots[i].state, State::Terminated(t) if t.exit_code == 0) {
                continue;
            }
            if let Some(at) = self.slots[i].restart_at {
                if Instant::now() < at {
                    return false;
                }
                self.restart(i).await;
            } else if matches!(self.slots[i].state, State::Waiting { .. }) {
                self.start(i).await;
            }
            self.report().await;
            // Wait for this one to finish before the next starts.
            while matches!(self.slots[i].state, State::Running { .. }) {
                match self.exits.next().await {
                    Some((name, r)) => self.on_exit(&name, r),
                    None => break,
                }
            }
            if let State::Terminated(t) = &self.slots[i].state {
                if t.exit_code != 0 && self.restart_policy() == "Never" {
                    self.phase_override = Some((
                        "Failed",
                        "InitFailed".into(),
                        format!("init container {} failed", self.slots[i].spec.name),
                    ));
                    return false;
                }
            }
            if !matches!(&self.slots[i].state, State::Terminated(t) if t.exit_code == 0) {
                return false;
            }
        }
        true
    }

    /// Stops everything and completes the pod's deletion.
    async fn terminate(&mut self, api_gone: bool) {
        let grace = self
            .pod
            .metadata
            .deletion_grace_period_seconds
            .unwrap_or(30)
            .max(0) as u64;
        if let Some(sb) = self.sandbox.take() {
            // Out of this node's routing at once; still serving for a moment, while the
            // other nodes learn from the EndpointSlice that the pod is going, so that no
            // connection already on its way finds the door shut.
            let ip = self.ip.map(IpAddr::V4);
            if let (Some(services), Some(ip)) = (&self.shared.services, ip) {
                services.set_draining(ip, true);
            }
            let grace = Duration::from_secs(grace);
            let linger = ENDPOINT_PROPAGATION.min(grace);
            tokio::time::sleep(linger).await;
            sb.shutdown(grace - linger).await;
        }
        for i in 0..self.slots.len() {
            if let State::Running { .. } = self.slots[i].state {
                self.log_stopped(i);
                let http = self.slots[i].kind == Some(ComponentKind::Http);
                let (code, reason) = if http {
                    (0, "Completed")
                } else {
                    (143, "Error")
                };
                self.slots[i].restart_at = None;
                let slot = &mut self.slots[i];
                slot.ready = false;
                let started_at = match &slot.state {
                    State::Running { started_at } => Some(started_at.clone()),
                    _ => None,
                };
                slot.state = State::Terminated(Terminated {
                    exit_code: code,
                    reason: reason.into(),
                    message: String::new(),
                    started_at,
                    finished_at: podx::now(),
                });
            }
            self.slots[i].restart_at = None;
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
        self.shared.images.release(&self.uid);
        self.shared.memory.release(&self.uid);
    }

    /// Stops the pod for memory pressure: its containers end now, and it stays in the API
    /// as Failed/Evicted for its controller to replace, as a kubelet eviction leaves it.
    async fn evict(&mut self, message: String) {
        if let Some(sb) = self.sandbox.take() {
            sb.shutdown(Duration::ZERO).await;
        }
        for i in 0..self.slots.len() {
            if matches!(self.slots[i].state, State::Running { .. }) {
                self.record_exit(i, 137, "Error", "evicted");
            }
            let slot = &mut self.slots[i];
            slot.restart_at = None;
            slot.ready = false;
            // An evicted container does not come back: it shows how it ended.
            if let (State::Waiting { .. }, Some(t)) = (&slot.state, &slot.last) {
                slot.state = State::Terminated(t.clone());
            }
        }
        self.phase_override = Some(("Failed", "Evicted".into(), message.clone()));
        self.event(EventType::Warning, "Evicted", &message).await;
    }

    fn release_ip(&mut self) {
        if let Some(ip) = self.ip.take() {
            if let Some(services) = &self.shared.services {
                services.set_draining(IpAddr::V4(ip), false);
            }
            self.shared
                .ipam
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .release(ip);
        }
    }
}

/// The pod's CPU limit in millicores, as the kubelet sizes a pod's cgroup: the sum of its
/// containers' limits (or the largest init container's, if more), and no limit if any
/// container has none.
pub fn pod_cpu_limit(pod: &Pod) -> Option<u64> {
    let spec = pod.spec.as_ref()?;
    let limit = |c: &Container| {
        c.resources
            .as_ref()
            .and_then(|r| r.limits.as_ref())
            .and_then(|l| l.get("cpu"))
            .and_then(|q| quantity::millicores(&q.0).ok())
    };
    let mut sum = 0u64;
    for c in &spec.containers {
        sum += limit(c)?;
    }
    for c in spec.init_containers.iter().flatten() {
        sum = sum.max(limit(c)?);
    }
    Some(sum)
}

fn qos_class(pod: &Pod) -> &'static str {
    let cs = pod
        .spec
        .as_ref()
        .map(|s| s.containers.as_slice())
        .unwrap_or(&[]);
    let has = |f: fn(&k8s_openapi::api::core::v1::ResourceRequirements) -> bool| {
        cs.iter().any(|c| c.resources.as_ref().is_some_and(f))
    };
    let guaranteed = !cs.is_empty()
        && cs.iter().all(|c| {
            let r = c.resources.as_ref();
            let l = r.and_then(|r| r.limits.as_ref());
            l.is_some_and(|l| l.contains_key("cpu") && l.contains_key("memory"))
                && r.and_then(|r| r.requests.as_ref())
                    .is_none_or(|q| q.iter().all(|(k, v)| l.and_then(|l| l.get(k)) == Some(v)))
        });
    if guaranteed {
        "Guaranteed"
    } else if has(|r| {
        r.limits.as_ref().is_some_and(|l| !l.is_empty())
            || r.requests.as_ref().is_some_and(|q| !q.is_empty())
    }) {
        "Burstable"
    } else {
        "BestEffort"
    }
}

/// Runs one pod until it is deleted. `updates` carries the newest object; None (or a
/// closed channel) means the API no longer has it.
pub async fn run(shared: Arc<Shared>, mut updates: watch::Receiver<Option<Arc<Pod>>>) {
    let Some(pod) = updates.borrow_and_update().clone() else {
        return;
    };
    let uid = pod.uid().unwrap_or_default();
    let spec = pod.spec.clone().unwrap_or_default();
    let slots = spec
        .init_containers
        .iter()
        .flatten()
        .map(|c| Slot::new(c.clone(), true))
        .chain(spec.containers.iter().map(|c| Slot::new(c.clone(), false)))
        .collect();
    let mut w = Worker {
        shared,
        start_time: pod
            .status
            .as_ref()
            .and_then(|s| s.start_time.clone())
            .or_else(|| Some(podx::now())),
        pod,
        uid,
        ip: None,
        sandbox: None,
        slots,
        exits: FuturesUnordered::new(),
        logs: HashMap::new(),
        initialized: false,
        prepared: false,
        last_status: Value::Null,
        last_report: None,
        report_pending: false,
        report_backoff: Duration::ZERO,
        phase_override: None,
        next_refresh: Instant::now() + VOLUME_REFRESH,
        prepare_retry: None,
        prepare_backoff: Duration::from_secs(1),
    };
    if w.pod.metadata.deletion_timestamp.is_some() {
        w.terminate(false).await;
        return;
    }
    let mut evictions = w.shared.evictions.subscribe();
    // Admission, as the kubelet's: a pod whose memory does not fit is rejected for good,
    // and so is a BestEffort pod while the node is under memory pressure.
    let admitted = crate::budget::Admitted {
        charge: w.shared.memory.charge_of(&w.pod),
        qos: qos_class(&w.pod),
        request: podx::requests(&w.pod).1,
    };
    if admitted.qos == "BestEffort" && w.shared.evictions.under_pressure() {
        let msg = "Pod was rejected: The node had condition: [MemoryPressure]. ".to_string();
        w.phase_override = Some(("Failed", "Evicted".into(), msg.clone()));
        w.event(EventType::Warning, "Evicted", &msg).await;
    } else if let Err(e) = w.shared.memory.admit_as(&w.uid, admitted) {
        w.phase_override = Some(("Failed", "OutOfmemory".into(), e.to_string()));
        w.event(EventType::Warning, "OutOfmemory", &e.to_string())
            .await;
    }
    loop {
        // Move the pod forward as far as it can go now.
        if !w.prepared
            && w.phase_override.is_none()
            && w.prepare_retry.is_none_or(|t| Instant::now() >= t)
        {
            w.prepared = w.prepare().await;
            if !w.prepared {
                w.prepare_retry = Some(Instant::now() + w.prepare_backoff);
                w.prepare_backoff = (w.prepare_backoff * 2).min(w.shared.settings.backoff_max);
            } else {
                w.prepare_retry = None;
            }
        }
        if w.prepared && !w.initialized && w.phase_override.is_none() {
            w.initialized = w.run_inits().await;
            if w.initialized {
                for i in 0..w.slots.len() {
                    if !w.slots[i].init && matches!(w.slots[i].state, State::Waiting { .. }) {
                        w.start(i).await;
                    }
                }
            }
        }
        let now = Instant::now();
        if w.initialized {
            for i in 0..w.slots.len() {
                if !w.slots[i].init && w.slots[i].restart_at.is_some_and(|t| now >= t) {
                    w.restart(i).await;
                }
            }
            w.run_probes().await;
        }
        if w.has_projected_volumes() && now >= w.next_refresh && w.prepared {
            w.next_refresh = now + VOLUME_REFRESH;
            let dir = w.shared.pod_dir(&w.uid);
            if let Err(e) = config::refresh_volumes(
                &w.shared.client,
                &w.pod,
                &w.facts(),
                &dir,
                &w.shared.settings.allowed_host_paths,
            )
            .await
            {
                tracing::debug!(error = %e, "volume refresh failed");
            }
        }
        if let Some(message) = w.shared.evictions.take(&w.uid) {
            w.evict(message).await;
        }
        let (_, finished) = w.phase();
        if finished {
            // Everything the pod ran is gone before its address can go to another pod.
            if let Some(sb) = w.sandbox.take() {
                sb.shutdown(Duration::ZERO).await;
            }
            w.release_ip();
            w.shared.memory.release(&w.uid);
        }
        w.report().await;
        let wake = tokio::time::Instant::from_std(w.next_wake());
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
                        if deleting {
                            w.terminate(false).await;
                            return;
                        }
                    }
                }
            }
            Some((name, r)) = w.exits.next(), if !w.exits.is_empty() => {
                w.on_exit(&name, r);
            }
            _ = evictions.changed() => {}
            _ = tokio::time::sleep_until(wake) => {}
        }
    }
}
