//! What a pod's containers are doing, and the status the API shows for it: the pure part
//! of the worker. Nothing here waits or talks to anything; the worker feeds it events
//! and the clock, and writes out what [`pod_status`] builds.

use std::net::Ipv4Addr;
use std::time::Duration;

use baton_kube::{pod as podx, quantity};
use k8s_openapi::api::core::v1::{
    Container, ContainerState, ContainerStateRunning, ContainerStateTerminated,
    ContainerStateWaiting, ContainerStatus, HostIP, Pod, PodIP, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use tokio::time::Instant;

use crate::probe::{self, Prober};
use crate::sandbox::Lifetime;

/// Whether a probe runs now, given whether the container has started: the startup probe
/// only before, the others only after.
fn runs_now(p: &Prober, started: bool) -> bool {
    (p.kind == probe::Kind::Startup) != started
}

/// A container that stopped.
#[derive(Debug, Clone, PartialEq)]
pub struct Terminated {
    pub exit_code: i32,
    pub reason: String,
    pub message: String,
    pub started_at: Option<Time>,
    pub finished_at: Time,
}

/// Where one container is.
#[derive(Debug, Clone, PartialEq)]
pub enum State {
    /// Not running: not started yet, or waiting for its next start (`reason` says why).
    Waiting {
        reason: String,
        message: String,
    },
    Running {
        started_at: Time,
    },
    Terminated(Terminated),
}

impl State {
    fn waiting(reason: &str, message: &str) -> Self {
        State::Waiting {
            reason: reason.into(),
            message: message.into(),
        }
    }

    fn to_api(&self, container_id: &str) -> ContainerState {
        match self {
            State::Waiting { reason, message } => ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some(reason.clone()),
                    message: (!message.is_empty()).then(|| message.clone()),
                }),
                ..Default::default()
            },
            State::Running { started_at } => ContainerState {
                running: Some(ContainerStateRunning {
                    started_at: Some(started_at.clone()),
                }),
                ..Default::default()
            },
            State::Terminated(t) => ContainerState {
                terminated: Some(ContainerStateTerminated {
                    exit_code: t.exit_code,
                    reason: Some(t.reason.clone()),
                    message: (!t.message.is_empty()).then(|| t.message.clone()),
                    started_at: t.started_at.clone(),
                    finished_at: Some(t.finished_at.clone()),
                    container_id: Some(container_id.to_string()),
                    ..Default::default()
                }),
                ..Default::default()
            },
        }
    }
}

/// Whether a container that exited with `code` runs again, per the pod's
/// `restartPolicy`. An init container that succeeded is done whatever the policy.
pub fn restarts(policy: &str, init: bool, code: i32) -> bool {
    match policy {
        "Never" => false,
        "OnFailure" => code != 0,
        _ => !init || code != 0,
    }
}

/// The wait before a container's next restart: none the first time, then `base`,
/// doubling up to `max`; a run of [`Backoff::RESET_AFTER`] starts it over.
#[derive(Debug, Clone, Default)]
pub struct Backoff {
    next: Duration,
}

impl Backoff {
    /// A container that ran this long starts its restart backoff over.
    pub const RESET_AFTER: Duration = Duration::from_secs(600);

    /// The wait before this restart, given how long the container ran.
    pub fn wait(&mut self, ran: Duration, base: Duration, max: Duration) -> Duration {
        if ran >= Self::RESET_AFTER {
            self.next = Duration::ZERO;
        }
        let wait = self.next;
        self.next = if wait.is_zero() {
            base
        } else {
            (wait * 2).min(max)
        };
        wait
    }
}

/// One container as the worker tracks it.
#[derive(Debug)]
pub struct Slot {
    pub spec: Container,
    pub init: bool,
    pub lifetime: Option<Lifetime>,
    pub state: State,
    pub last: Option<Terminated>,
    pub restarts: i32,
    pub ready: bool,
    pub started: bool,
    pub started_instant: Option<Instant>,
    pub backoff: Backoff,
    /// When it starts again, if it is waiting to.
    pub restart_at: Option<Instant>,
    pub probers: Vec<Prober>,
    /// The digest of its image, when it came from a registry.
    pub image_id: Option<String>,
    /// An ephemeral container (`kubectl debug`): runs once, is never restarted, and
    /// counts for neither the pod's phase nor its readiness.
    pub ephemeral: bool,
    /// For an ephemeral container: the container it debugs, whose view (volumes,
    /// environment) it shares.
    pub target: Option<String>,
    /// Its last try could not create it: the next try is no restart, since it never ran.
    pub never_ran: bool,
}

impl Slot {
    pub fn new(spec: Container, init: bool) -> Self {
        Self {
            spec,
            init,
            lifetime: None,
            state: State::waiting("ContainerCreating", ""),
            last: None,
            restarts: 0,
            ready: false,
            started: false,
            started_instant: None,
            backoff: Backoff::default(),
            restart_at: None,
            probers: Vec::new(),
            image_id: None,
            ephemeral: false,
            target: None,
            never_ran: false,
        }
    }

    /// An ephemeral container, added to a running pod.
    pub fn ephemeral(spec: Container, target: Option<String>) -> Self {
        Self {
            ephemeral: true,
            target,
            ..Self::new(spec, false)
        }
    }

    /// An app container: neither init nor ephemeral.
    pub fn is_app(&self) -> bool {
        !self.init && !self.ephemeral
    }

    /// Every slot of a pod: init containers first, in order.
    pub fn for_pod(pod: &Pod) -> Vec<Slot> {
        let Some(spec) = &pod.spec else {
            return Vec::new();
        };
        spec.init_containers
            .iter()
            .flatten()
            .map(|c| Slot::new(c.clone(), true))
            .chain(spec.containers.iter().map(|c| Slot::new(c.clone(), false)))
            .collect()
    }

    pub fn is_running(&self) -> bool {
        matches!(self.state, State::Running { .. })
    }

    /// Ended and not coming back.
    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Terminated(_)) && self.restart_at.is_none()
    }

    pub fn succeeded(&self) -> bool {
        matches!(&self.state, State::Terminated(t) if t.exit_code == 0)
    }

    pub fn set_waiting(&mut self, reason: &str, message: &str) {
        self.state = State::waiting(reason, message);
    }

    /// It runs now; its probes start counting from `now`.
    pub fn mark_started(&mut self, now: Instant) {
        self.state = State::Running {
            started_at: podx::now(),
        };
        self.started_instant = Some(now);
        self.probers = if self.init {
            Vec::new()
        } else {
            probe::for_container(&self.spec, now)
        };
        let has = |k| self.probers.iter().any(|p| p.kind == k);
        self.started = !has(probe::Kind::Startup);
        self.ready = self.started && !has(probe::Kind::Readiness);
    }

    /// It stopped with `code`: it waits for its restart (in `CrashLoopBackOff` once the
    /// backoff has begun) or, if the policy says it is done, stays terminated. `pod`
    /// names the pod in the backoff message, as the kubelet's does.
    #[allow(clippy::too_many_arguments)]
    pub fn exited(
        &mut self,
        code: i32,
        reason: &str,
        message: &str,
        policy: &str,
        (base, max): (Duration, Duration),
        now: Instant,
        pod: &str,
    ) {
        let started_at = match &self.state {
            State::Running { started_at } => Some(started_at.clone()),
            _ => None,
        };
        let ran = self
            .started_instant
            .map(|t| now.saturating_duration_since(t))
            .unwrap_or_default();
        let t = Terminated {
            exit_code: code,
            reason: reason.into(),
            message: message.into(),
            started_at,
            finished_at: podx::now(),
        };
        self.ready = false;
        self.started = false;
        self.probers.clear();
        if !restarts(policy, self.init, code) {
            self.state = State::Terminated(t);
            self.restart_at = None;
            return;
        }
        let wait = self.backoff.wait(ran, base, max);
        self.last = Some(t.clone());
        self.restart_at = Some(now + wait);
        self.state = if wait.is_zero() {
            State::Terminated(t)
        } else {
            State::waiting(
                "CrashLoopBackOff",
                &format!(
                    "back-off {}s restarting failed container={} pod={pod}",
                    wait.as_secs(),
                    self.spec.name
                ),
            )
        };
    }

    /// It could not be created (`CreateContainerError`: its image cannot run as this
    /// container asks). As the kubelet does, it waits with the reason, never having run,
    /// and is tried again after a back-off whatever the restart policy, since what
    /// refused it (a grant, an object) may change.
    pub fn create_failed(
        &mut self,
        reason: &str,
        message: &str,
        (base, max): (Duration, Duration),
        now: Instant,
    ) {
        self.ready = false;
        self.started = false;
        self.probers.clear();
        self.never_ran = true;
        self.restart_at = Some(now + self.backoff.wait(Duration::ZERO, base, max));
        self.state = State::waiting(reason, message);
    }

    /// It is about to run again: what it ended with becomes its last state.
    pub fn restarting(&mut self) {
        self.restart_at = None;
        if let State::Terminated(t) = &self.state {
            self.last = Some(t.clone());
        }
        if !std::mem::take(&mut self.never_ran) {
            self.restarts += 1;
        }
    }

    /// It was stopped with its pod and will not run again. A server's graceful stop
    /// completes it; a process ends as SIGTERM's default action ends one.
    pub fn stopped_with_pod(&mut self) {
        self.restart_at = None;
        self.ready = false;
        let State::Running { started_at } = &self.state else {
            return;
        };
        let (code, reason) = match self.lifetime {
            Some(Lifetime::Server) => (0, "Completed"),
            _ => (143, "Error"),
        };
        self.state = State::Terminated(Terminated {
            exit_code: code,
            reason: reason.into(),
            message: String::new(),
            started_at: Some(started_at.clone()),
            finished_at: podx::now(),
        });
    }

    /// The pod was evicted: the container does not come back, and shows how it ended.
    pub fn evicted(&mut self) {
        self.restart_at = None;
        self.ready = false;
        if let (State::Waiting { .. }, Some(t)) = (&self.state, &self.last) {
            self.state = State::Terminated(t.clone());
        }
    }

    /// The probes that run now: the startup probe until it passes, then liveness and
    /// readiness (which wait for it).
    pub fn active_probers(&mut self) -> impl Iterator<Item = &mut Prober> {
        let started = self.started;
        self.probers
            .iter_mut()
            .filter(move |p| runs_now(p, started))
    }

    /// When the next active probe is due.
    pub fn next_probe_at(&self) -> Option<Instant> {
        self.probers
            .iter()
            .filter(|p| runs_now(p, self.started))
            .map(|p| p.next_at())
            .min()
    }

    /// Applies the probes' verdicts: started once the startup probe passed, ready once
    /// started and the readiness probe passes.
    pub fn update_from_probes(&mut self) {
        let passing = |k| {
            self.probers
                .iter()
                .find(|p| p.kind == k)
                .map(|p| p.passing == Some(true))
        };
        if !self.started && passing(probe::Kind::Startup) == Some(true) {
            self.started = true;
        }
        self.ready = self.started && passing(probe::Kind::Readiness).unwrap_or(true);
    }

    fn to_api(&self, uid: &str) -> ContainerStatus {
        let id = format!("wasm://{uid}/{}", self.spec.name);
        let image = self.spec.image.clone().unwrap_or_default();
        ContainerStatus {
            name: self.spec.name.clone(),
            image_id: self.image_id.clone().unwrap_or_else(|| image.clone()),
            image,
            container_id: Some(id.clone()),
            ready: self.ready,
            started: Some(self.is_running() && self.started),
            restart_count: self.restarts,
            state: Some(self.state.to_api(&id)),
            last_state: Some(
                self.last
                    .clone()
                    .map(|t| State::Terminated(t).to_api(&id))
                    .unwrap_or_default(),
            ),
            ..Default::default()
        }
    }
}

/// Why the node ended a pod itself (refused, evicted, an init container failed): the
/// status's reason and message, under phase Failed.
#[derive(Debug, Clone, PartialEq)]
pub struct End {
    pub reason: String,
    pub message: String,
}

/// The pod's phase, and whether it is final.
pub fn phase(slots: &[Slot], initialized: bool, end: Option<&End>) -> (&'static str, bool) {
    if end.is_some() {
        return ("Failed", true);
    }
    let apps: Vec<&Slot> = slots.iter().filter(|s| s.is_app()).collect();
    if !apps.is_empty() && apps.iter().all(|s| s.is_done()) {
        let ok = apps.iter().all(|s| s.succeeded());
        return (if ok { "Succeeded" } else { "Failed" }, true);
    }
    let any_ran = apps
        .iter()
        .any(|s| !matches!(s.state, State::Waiting { .. }) || s.restarts > 0 || s.last.is_some());
    let phase = if any_ran && initialized {
        "Running"
    } else {
        "Pending"
    };
    (phase, false)
}

/// What the pod status is built from.
#[derive(Debug)]
pub struct View<'a> {
    pub pod: &'a Pod,
    pub uid: &'a str,
    pub slots: &'a [Slot],
    pub initialized: bool,
    pub end: Option<&'a End>,
    pub host_ip: &'a str,
    pub pod_ip: Option<Ipv4Addr>,
    pub start_time: Option<Time>,
}

/// The pod's status, as the kubelet reports it.
pub fn pod_status(v: &View<'_>) -> PodStatus {
    let (phase, _) = phase(v.slots, v.initialized, v.end);
    let apps: Vec<&Slot> = v.slots.iter().filter(|s| s.is_app()).collect();
    let all_ready = !apps.is_empty() && apps.iter().all(|s| s.ready) && phase == "Running";
    let mut conditions = v
        .pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default();
    podx::set_condition(&mut conditions, "PodScheduled", true, None, None);
    podx::set_condition(&mut conditions, "Initialized", v.initialized, None, None);
    let not_ready: Vec<&str> = apps
        .iter()
        .filter(|s| !s.ready)
        .map(|s| s.spec.name.as_str())
        .collect();
    let (reason, message) = match phase {
        "Succeeded" => (Some("PodCompleted"), None),
        _ if all_ready => (None, None),
        "Failed" => (Some("PodFailed"), None),
        _ => (
            Some("ContainersNotReady"),
            Some(format!(
                "containers with unready status: [{}]",
                not_ready.join(" ")
            )),
        ),
    };
    for type_ in ["ContainersReady", "Ready"] {
        podx::set_condition(
            &mut conditions,
            type_,
            all_ready,
            reason,
            message.as_deref(),
        );
    }
    let inits: Vec<ContainerStatus> = v
        .slots
        .iter()
        .filter(|s| s.init)
        .map(|s| s.to_api(v.uid))
        .collect();
    // As the kubelet reports them: never ready, no `started`, sorted by name.
    let mut ephemeral: Vec<ContainerStatus> = v
        .slots
        .iter()
        .filter(|s| s.ephemeral)
        .map(|s| ContainerStatus {
            ready: false,
            started: None,
            ..s.to_api(v.uid)
        })
        .collect();
    ephemeral.sort_by(|a, b| a.name.cmp(&b.name));
    let ip = v.pod_ip.map(|i| i.to_string());
    PodStatus {
        ephemeral_container_statuses: (!ephemeral.is_empty()).then_some(ephemeral),
        phase: Some(phase.into()),
        conditions: Some(conditions),
        host_ip: Some(v.host_ip.into()),
        host_ips: Some(vec![HostIP {
            ip: v.host_ip.into(),
        }]),
        pod_ips: ip.clone().map(|ip| vec![PodIP { ip }]),
        pod_ip: ip,
        start_time: v.start_time.clone(),
        container_statuses: Some(apps.iter().map(|s| s.to_api(v.uid)).collect()),
        init_container_statuses: (!inits.is_empty()).then_some(inits),
        qos_class: Some(qos_class(v.pod).into()),
        reason: v.end.map(|e| e.reason.clone()),
        message: v.end.map(|e| e.message.clone()),
        ..Default::default()
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

/// The pod's quality-of-service class, which decides who is evicted first.
pub fn qos_class(pod: &Pod) -> &'static str {
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

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: Duration = Duration::from_secs(10);
    const MAX: Duration = Duration::from_secs(300);

    #[test]
    fn a_container_that_cannot_be_created_waits_and_is_no_restart() {
        let mut slot = Slot::new(Container::default(), false);
        let now = Instant::now();
        slot.create_failed("CreateContainerError", "not granted", (BASE, MAX), now);
        assert!(
            matches!(&slot.state, State::Waiting { reason, .. } if reason == "CreateContainerError")
        );
        assert_eq!(slot.restart_at, Some(now));
        slot.restarting();
        slot.create_failed("CreateContainerError", "not granted", (BASE, MAX), now);
        assert_eq!(slot.restart_at, Some(now + BASE), "backs off");
        slot.restarting();
        assert_eq!(slot.restarts, 0, "it never ran");
        assert!(slot.last.is_none());
    }

    #[test]
    fn restart_policies_decide_who_runs_again() {
        assert!(restarts("Always", false, 0));
        assert!(restarts("Always", false, 1));
        assert!(!restarts("Always", true, 0), "a finished init container");
        assert!(restarts("Always", true, 1));
        assert!(!restarts("OnFailure", false, 0));
        assert!(restarts("OnFailure", false, 2));
        assert!(!restarts("Never", false, 2));
        assert!(!restarts("Never", true, 2));
    }

    #[test]
    fn backoff_is_immediate_then_doubles_to_the_cap_and_resets_after_a_long_run() {
        let mut b = Backoff::default();
        let short = Duration::from_secs(1);
        let waits: Vec<u64> = (0..8).map(|_| b.wait(short, BASE, MAX).as_secs()).collect();
        assert_eq!(waits, [0, 10, 20, 40, 80, 160, 300, 300]);
        assert_eq!(b.wait(Backoff::RESET_AFTER, BASE, MAX), Duration::ZERO);
        assert_eq!(b.wait(short, BASE, MAX), BASE);
    }

    fn exit(slot: &mut Slot, code: i32, policy: &str, now: Instant) {
        slot.exited(code, "Error", "", policy, (BASE, MAX), now, "p_ns(uid)");
    }

    #[tokio::test(start_paused = true)]
    async fn a_crashing_container_waits_in_crash_loop_back_off() {
        let mut s = Slot::new(Container::default(), false);
        let now = Instant::now();
        s.mark_started(now);
        exit(&mut s, 1, "Always", now);
        assert!(
            matches!(s.state, State::Terminated(_)),
            "the first restart is at once"
        );
        assert_eq!(s.restart_at, Some(now));
        s.restarting();
        s.mark_started(now);
        exit(&mut s, 1, "Always", now);
        match &s.state {
            State::Waiting { reason, message } => {
                assert_eq!(reason, "CrashLoopBackOff");
                assert!(message.starts_with("back-off 10s"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(s.restart_at, Some(now + BASE));
        assert_eq!(s.restarts, 1);
        assert_eq!(s.last.as_ref().map(|t| t.exit_code), Some(1));
    }

    #[tokio::test(start_paused = true)]
    async fn phases_follow_the_containers() {
        let now = Instant::now();
        let mut slots = vec![
            Slot::new(Container::default(), true),
            Slot::new(Container::default(), false),
        ];
        assert_eq!(phase(&slots, false, None), ("Pending", false));
        slots[1].mark_started(now);
        assert_eq!(
            phase(&slots, false, None),
            ("Pending", false),
            "not initialized"
        );
        assert_eq!(phase(&slots, true, None), ("Running", false));
        exit(&mut slots[1], 0, "OnFailure", now);
        assert_eq!(phase(&slots, true, None), ("Succeeded", true));
        exit(&mut slots[1], 3, "Never", now);
        assert_eq!(phase(&slots, true, None), ("Failed", true));
        let end = End {
            reason: "Evicted".into(),
            message: "m".into(),
        };
        assert_eq!(phase(&slots, true, Some(&end)), ("Failed", true));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stopped_server_completes_and_a_stopped_process_fails() {
        let now = Instant::now();
        let mut server = Slot::new(Container::default(), false);
        server.lifetime = Some(Lifetime::Server);
        server.mark_started(now);
        server.stopped_with_pod();
        assert!(
            matches!(&server.state, State::Terminated(t) if t.exit_code == 0 && t.reason == "Completed")
        );
        let mut process = Slot::new(Container::default(), false);
        process.lifetime = Some(Lifetime::Process);
        process.mark_started(now);
        process.stopped_with_pod();
        assert!(matches!(&process.state, State::Terminated(t) if t.exit_code == 143));
    }

    /// An initialized pod `u` on a node at 10.0.0.1, with the address 10.244.0.5.
    fn view<'a>(pod: &'a Pod, slots: &'a [Slot], start_time: Option<Time>) -> View<'a> {
        View {
            pod,
            uid: "u",
            slots,
            initialized: true,
            end: None,
            host_ip: "10.0.0.1",
            pod_ip: Some(Ipv4Addr::new(10, 244, 0, 5)),
            start_time,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_status_uses_the_api_types_kubectl_reads() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "uid": "u"},
            "spec": {"containers": [{"name": "a", "image": "img",
                "resources": {"limits": {"cpu": "1", "memory": "1Gi"}}}]}
        }))
        .unwrap();
        let mut slots = Slot::for_pod(&pod);
        slots[0].mark_started(Instant::now());
        let status = pod_status(&view(&pod, &slots, None));
        let v = serde_json::to_value(&status).unwrap();
        assert_eq!(v["phase"], "Running");
        assert_eq!(v["podIP"], "10.244.0.5");
        assert_eq!(v["podIPs"][0]["ip"], "10.244.0.5");
        assert_eq!(v["qosClass"], "Guaranteed");
        assert_eq!(v["containerStatuses"][0]["ready"], true);
        assert_eq!(v["containerStatuses"][0]["containerID"], "wasm://u/a");
        assert!(v["containerStatuses"][0]["state"]["running"]["startedAt"].is_string());
        let ready = status
            .conditions
            .unwrap()
            .into_iter()
            .find(|c| c.type_ == "Ready")
            .unwrap();
        assert_eq!(ready.status, "True");
        assert!(v.get("initContainerStatuses").is_none());
    }

    /// A node compares the status it computes with the one it last sent, and the
    /// status read back through its watch: a time kept finer than the API keeps it would
    /// make them differ, and the node would write again a status that changed nothing.
    #[tokio::test(start_paused = true)]
    async fn a_status_reads_back_from_the_api_unchanged() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "uid": "u"},
            "spec": {"containers": [{"name": "a", "image": "img"}, {"name": "b", "image": "img"}]}
        }))
        .unwrap();
        let mut slots = Slot::for_pod(&pod);
        slots[0].mark_started(Instant::now());
        slots[1].lifetime = Some(Lifetime::Process);
        slots[1].mark_started(Instant::now());
        slots[1].stopped_with_pod();
        let status = pod_status(&view(&pod, &slots, Some(podx::now())));
        let v = serde_json::to_value(&status).unwrap();
        assert!(v["containerStatuses"][1]["state"]["terminated"]["finishedAt"].is_string());
        assert!(v["conditions"][0]["lastTransitionTime"].is_string());
        let read_back: PodStatus = serde_json::from_value(v).unwrap();
        assert_eq!(read_back, status);
    }
}
