//! What one pod uses of the node, and the CPU quota that bounds it.
//!
//! Every instance (a wasmtime store) and every guest task of a pod is counted here while
//! it lives, so that "nothing outlives its pod" is a number one can read: after a pod is
//! stopped its instances, tasks and sockets are zero (see [`PodUsage`]).
//!
//! ## CPU
//! Guest CPU time is measured as the time spent inside the polls of the pod's guest
//! futures ([`Metered`]): a guest runs only while its future is polled, and it yields at
//! every epoch tick, so the poll time is the CPU the pod took from the runtime's threads,
//! host calls included.
//!
//! `resources.limits.cpu` becomes a quota per [`CPU_PERIOD`], as CFS bandwidth control
//! enforces it for containers: `limit × period` of CPU time per period, summed over all
//! the pod's instances. At each epoch tick a running guest checks its pod's account; a
//! pod past its quota is parked until the period ends (the store yields with a sleep),
//! which is what CFS throttling does to a cgroup.
//!
//! Pods without a limit share what the limited ones leave by their CPU requests, as
//! cgroup CPU weights do: each period the runtime looks at what every pod used
//! ([`Registry::rebalance`]). While the guests together want more than the guest threads
//! give, each unlimited pod is held for the next period to its weighted max-min fair
//! share (a pod using less than its share keeps what it uses, and the rest is divided
//! among the others by weight); when there is room, nobody is held.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// The CFS period: quotas are enforced per 100 ms, as the kernel's default.
pub const CPU_PERIOD: Duration = Duration::from_millis(100);

/// A snapshot of one pod's use of the node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodUsage {
    /// The pod's key as the node named it (`namespace/name/uid`).
    pub pod: String,
    /// Live wasmtime stores: running CLI components and in-flight HTTP requests.
    pub instances: usize,
    /// Live guest tasks (a CLI process, a request, an HTTP server).
    pub tasks: usize,
    /// Open TCP sockets.
    pub sockets: usize,
    /// CPU time the pod's guests have used, in nanoseconds.
    pub cpu_nanos: u64,
    /// Periods in which the pod hit its CPU quota and was parked.
    pub throttled_periods: u64,
    /// Linear memory its live instances hold, in bytes.
    pub memory_bytes: usize,
    /// The same figures per container, by name: what the container's instances (its
    /// process, its requests, commands exec'd into it) used and hold.
    pub containers: Vec<ContainerUsage>,
}

/// What one container of a pod used and holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ContainerUsage {
    pub name: String,
    /// CPU time its guests have used since the pod started, in nanoseconds.
    pub cpu_nanos: u64,
    /// What its live instances hold, in bytes: linear memory, tables, and each store's own
    /// state on the host (see `host::HOST_STATE_BYTES`).
    pub memory_bytes: usize,
    /// The component it runs, once started.
    pub component: Option<ComponentInfo>,
    /// Its HTTP requests (zero for a CLI component).
    pub http: crate::stats::HttpUsage,
    /// Its guests that stopped other than by completing, by reason.
    pub exits: Vec<(&'static str, u64)>,
}

/// What a container's component is: its kind and the interfaces it exports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ComponentInfo {
    pub kind: crate::ComponentKind,
    pub exports: Arc<[String]>,
}

/// One container's share of its pod's account.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    name: String,
    cpu_nanos: AtomicU64,
    memory: AtomicUsize,
    component: Mutex<Option<ComponentInfo>>,
    pub(crate) http: crate::stats::HttpStats,
    pub(crate) exits: crate::stats::Exits,
}

impl Tally {
    /// A container's account that belongs to no pod: what `baton run` serves.
    pub fn detached(name: &str) -> Arc<Tally> {
        Arc::new(Tally {
            name: name.to_string(),
            ..Tally::default()
        })
    }

    /// Records what the container runs (again when it restarts).
    pub fn describe(&self, info: ComponentInfo) {
        *self.component.lock().unwrap_or_else(|e| e.into_inner()) = Some(info);
    }
}

/// What a guest task is, for `ps`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskKind {
    /// A CLI container's process.
    Process,
    /// An HTTP container's server, which accepts connections and starts requests.
    Server,
    /// One HTTP request, in an instance of its own.
    Request,
    /// A command started by `kubectl exec`.
    Exec,
}

impl TaskKind {
    pub fn name(self) -> &'static str {
        match self {
            TaskKind::Process => "process",
            TaskKind::Server => "server",
            TaskKind::Request => "request",
            TaskKind::Exec => "exec",
        }
    }
}

/// One guest task of a pod, what a process is to `ps`: its CPU (charged by [`Metered`])
/// and memory (charged by the store's limiter) count for it, for its container and for
/// its pod. It leaves the pod's table when the last holder (the task and its store)
/// drops it, so `ps` never shows what has ended.
#[derive(Debug)]
pub(crate) struct Task {
    pid: u32,
    kind: TaskKind,
    /// Built on demand, so that a request pays for a string only if someone looks.
    command: TaskCommand,
    started: Instant,
    cpu_nanos: AtomicU64,
    memory: AtomicUsize,
    tally: Arc<Tally>,
    pod: Weak<Usage>,
}

#[derive(Debug)]
pub(crate) enum TaskCommand {
    Argv(Vec<String>),
    Request(http::Method, http::Uri),
    Listen(u16),
}

impl std::fmt::Display for TaskCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TaskCommand::Argv(argv) => f.write_str(&argv.join(" ")),
            TaskCommand::Request(m, uri) => write!(f, "{m} {uri}"),
            TaskCommand::Listen(port) => write!(f, "listen :{port}"),
        }
    }
}

/// One row of `ps`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskInfo {
    pub pid: u32,
    pub container: String,
    pub kind: TaskKind,
    pub command: String,
    pub age: Duration,
    pub cpu_nanos: u64,
    pub memory_bytes: usize,
}

impl Task {
    /// The account of the task's container.
    pub(crate) fn tally(&self) -> &Arc<Tally> {
        &self.tally
    }

    pub fn grow_memory(&self, delta: usize) {
        self.memory.fetch_add(delta, Ordering::Relaxed);
        self.tally.memory.fetch_add(delta, Ordering::Relaxed);
    }

    pub fn release_memory(&self, bytes: usize) {
        self.memory.fetch_sub(bytes, Ordering::Relaxed);
        self.tally.memory.fetch_sub(bytes, Ordering::Relaxed);
    }

    fn charge(&self, d: Duration) {
        let ns = d.as_nanos() as u64;
        self.cpu_nanos.fetch_add(ns, Ordering::Relaxed);
        self.tally.cpu_nanos.fetch_add(ns, Ordering::Relaxed);
    }

    fn info(&self) -> TaskInfo {
        TaskInfo {
            pid: self.pid,
            container: self.tally.name.clone(),
            kind: self.kind,
            command: self.command.to_string(),
            age: self.started.elapsed(),
            cpu_nanos: self.cpu_nanos.load(Ordering::Relaxed),
            memory_bytes: self.memory.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        if let Some(pod) = self.pod.upgrade() {
            pod.table
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .live
                .remove(&self.pid);
        }
    }
}

/// The account of one pod, shared by its instances and tasks.
#[derive(Debug, Default)]
pub(crate) struct Usage {
    instances: AtomicUsize,
    tasks: AtomicUsize,
    cpu_nanos: AtomicU64,
    throttled: AtomicU64,
    /// CPU used since the last rebalance, in nanoseconds.
    recent: AtomicU64,
    /// Whether the pod is held to a quota or a share now: the hot paths of a pod that is
    /// not (most of them) touch only atomics.
    held: std::sync::atomic::AtomicBool,
    quota: Mutex<Quota>,
    memory: AtomicUsize,
    /// The pod's memory limit over all its instances; 0 is none.
    memory_limit: AtomicUsize,
    /// Each container's share, by name.
    containers: Mutex<Vec<(String, Arc<Tally>)>>,
    /// The pod's live tasks by pid, for `ps` (see [`Task`]).
    table: Mutex<TaskTable>,
}

#[derive(Debug, Default)]
struct TaskTable {
    next_pid: u32,
    live: std::collections::HashMap<u32, Weak<Task>>,
}

#[derive(Debug, Default)]
struct Quota {
    /// CPU time allowed per period; None is unlimited.
    per_period: Option<Duration>,
    /// For a pod without a limit: its fair share while the node is contended.
    share: Option<Duration>,
    /// The pod's weight among unlimited pods (its CPU request in millicores).
    weight: u64,

    /// The period `used` counts for.
    period: u64,
    used: Duration,
    /// Whether this period has been counted as throttled already.
    throttled: bool,
}

/// Periods are numbered from one process-wide origin, so that every pod's periods line up.
fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

fn period_of(t: Instant) -> u64 {
    (t.saturating_duration_since(origin()).as_nanos() / CPU_PERIOD.as_nanos()) as u64
}

fn period_end(period: u64) -> Instant {
    origin() + Duration::from_nanos(CPU_PERIOD.as_nanos() as u64 * (period + 1))
}

impl Usage {
    fn quota(&self) -> std::sync::MutexGuard<'_, Quota> {
        self.quota.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps the lock-free `held` flag in step with the quota it summarises.
    fn mark_held(&self, q: &Quota) {
        self.held.store(
            q.per_period.is_some() || q.share.is_some(),
            Ordering::Relaxed,
        );
    }

    /// Sets the pod's CPU limit in millicores (None: unlimited).
    pub fn set_cpu_limit(&self, millis: Option<u64>) {
        let mut q = self.quota();
        // A zero limit means no quota, as the kubelet reads `limits.cpu: 0`.
        q.per_period = millis
            .filter(|m| *m > 0)
            .map(|m| Duration::from_nanos(m.saturating_mul(CPU_PERIOD.as_nanos() as u64 / 1000)));
        self.mark_held(&q);
    }

    /// Sets the pod's weight among pods without a CPU limit: its CPU request in
    /// millicores (a pod without one weighs 2, as a BestEffort cgroup does).
    pub fn set_cpu_weight(&self, request_millis: u64) {
        let mut q = self.quota();
        // Bounded so that weighted sums and products cannot overflow.
        q.weight = request_millis.clamp(2, 1 << 32);
    }

    /// Limits the linear memory of all the pod's instances together (None: no limit).
    pub fn set_memory_limit(&self, bytes: Option<usize>) {
        self.memory_limit
            .store(bytes.unwrap_or(0), Ordering::Relaxed);
    }

    /// Takes `delta` more bytes of memory for an instance, if the pod's limit allows.
    pub fn grow_memory(&self, delta: usize) -> bool {
        let limit = self.memory_limit.load(Ordering::Relaxed);
        let mut cur = self.memory.load(Ordering::Relaxed);
        loop {
            if limit != 0 && cur.saturating_add(delta) > limit {
                return false;
            }
            match self.memory.compare_exchange_weak(
                cur,
                cur + delta,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(now) => cur = now,
            }
        }
    }

    /// Gives back memory an instance held.
    pub fn release_memory(&self, bytes: usize) {
        self.memory.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// Adds `d` of CPU time, spent now.
    pub fn charge(&self, d: Duration) {
        self.cpu_nanos
            .fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
        self.recent
            .fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
        if !self.held.load(Ordering::Relaxed) {
            return;
        }
        let mut q = self.quota();
        let p = period_of(Instant::now());
        if p != q.period {
            // Time spent beyond the quota in a period is not carried over: CFS refills
            // the quota at each period, and so the debt of one long poll is forgiven.
            q.period = p;
            q.used = Duration::ZERO;
            q.throttled = false;
        }
        q.used += d;
    }

    /// If the pod has used its quota for this period: when the period ends.
    pub fn throttled_until(&self) -> Option<Instant> {
        if !self.held.load(Ordering::Relaxed) {
            return None;
        }
        let mut q = self.quota();
        let per = q.per_period.or(q.share)?;
        let now = Instant::now();
        let p = period_of(now);
        if p != q.period || q.used < per {
            return None;
        }
        if !q.throttled {
            q.throttled = true;
            self.throttled.fetch_add(1, Ordering::Relaxed);
        }
        Some(period_end(p))
    }

    /// The account of one of the pod's containers.
    pub fn tally(&self, container: &str) -> Arc<Tally> {
        let mut all = self.containers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, t)) = all.iter().find(|(n, _)| n == container) {
            return t.clone();
        }
        let t = Tally::detached(container);
        all.push((container.to_string(), t.clone()));
        t
    }

    /// Registers a task of `container`, listed by [`Usage::tasks`] until it is dropped.
    pub fn task(
        self: &Arc<Self>,
        container: &str,
        kind: TaskKind,
        command: TaskCommand,
    ) -> Arc<Task> {
        let tally = self.tally(container);
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        table.next_pid += 1;
        let task = Arc::new(Task {
            pid: table.next_pid,
            kind,
            command,
            started: Instant::now(),
            cpu_nanos: AtomicU64::new(0),
            memory: AtomicUsize::new(0),
            tally,
            pod: Arc::downgrade(self),
        });
        table.live.insert(task.pid, Arc::downgrade(&task));
        task
    }

    /// The pod's live tasks, by pid.
    pub fn tasks(&self) -> Vec<TaskInfo> {
        let live: Vec<Arc<Task>> = {
            let table = self.table.lock().unwrap_or_else(|e| e.into_inner());
            table.live.values().filter_map(Weak::upgrade).collect()
        };
        let mut out: Vec<TaskInfo> = live.iter().map(|t| t.info()).collect();
        out.sort_by_key(|t| t.pid);
        out
    }

    pub fn instance(self: &Arc<Self>) -> InstanceGuard {
        self.instances.fetch_add(1, Ordering::Relaxed);
        InstanceGuard(self.clone())
    }

    pub fn snapshot(&self, pod: &str, sockets: usize) -> PodUsage {
        PodUsage {
            pod: pod.to_string(),
            instances: self.instances.load(Ordering::Relaxed),
            tasks: self.tasks.load(Ordering::Relaxed),
            sockets,
            cpu_nanos: self.cpu_nanos.load(Ordering::Relaxed),
            throttled_periods: self.throttled.load(Ordering::Relaxed),
            memory_bytes: self.memory.load(Ordering::Relaxed),
            containers: self
                .containers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .map(|(name, t)| ContainerUsage {
                    name: name.clone(),
                    cpu_nanos: t.cpu_nanos.load(Ordering::Relaxed),
                    memory_bytes: t.memory.load(Ordering::Relaxed),
                    component: t
                        .component
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .clone(),
                    http: t.http.snapshot(),
                    exits: t.exits.snapshot(),
                })
                .collect(),
        }
    }
}

/// Counts one live instance of a pod; held by the instance's store.
#[derive(Debug)]
pub(crate) struct InstanceGuard(Arc<Usage>);

impl Drop for InstanceGuard {
    fn drop(&mut self) {
        self.0.instances.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A guest future that is counted as one of its pod's tasks while it exists, and whose
/// polls are charged to the pod as CPU time.
pub(crate) struct Metered<F> {
    inner: Pin<Box<F>>,
    usage: Arc<Usage>,
    /// The task it runs, if any: its polls are charged there (and to its container) too.
    task: Option<Arc<Task>>,
    /// Time this task has spent in its polls.
    ran: Duration,
    /// Whether its last poll ended because the epoch callback preempted it.
    preempted: bool,
}

impl<F> Metered<F> {
    pub fn new(usage: Arc<Usage>, inner: F) -> Self {
        usage.tasks.fetch_add(1, Ordering::Relaxed);
        Self {
            inner: Box::pin(inner),
            usage,
            task: None,
            ran: Duration::ZERO,
            preempted: false,
        }
    }

    /// Charges the future's CPU to one of its pod's tasks as well.
    pub fn for_task(mut self, task: Option<Arc<Task>>) -> Self {
        self.task = task;
        self
    }

    /// Whether the last poll ended because the runtime preempted the guest (it ran
    /// through a tick, or its pod was over quota) rather than because it waited.
    pub fn preempted(&self) -> bool {
        self.preempted
    }
}

impl<F> Drop for Metered<F> {
    fn drop(&mut self) {
        self.usage.tasks.fetch_sub(1, Ordering::Relaxed);
    }
}

thread_local! {
    /// When the guest poll running on this thread began, and how long its task had run
    /// before this poll.
    static POLL: std::cell::Cell<Option<(Instant, Duration)>> = const { std::cell::Cell::new(None) };
    /// Set by the epoch callback when it preempts the guest poll running on this thread.
    static PREEMPTED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Preemptions so far, in the whole process: what the epoch ticker paces itself by.
static PREEMPTIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Records that the guest poll running on this thread is being preempted.
pub(crate) fn mark_preempted() {
    PREEMPTED.with(|p| p.set(true));
    PREEMPTIONS.fetch_add(1, Ordering::Relaxed);
}

/// How many guest polls have been preempted in this process so far.
pub(crate) fn preemptions() -> u64 {
    PREEMPTIONS.load(Ordering::Relaxed)
}

/// How long the guest poll running on this thread has lasted, and how long its task has
/// run in all: what the epoch callback asks before yielding. A task that has run little
/// so far (a request, a process starting) runs on; one that has run a while (a spinner)
/// yields at every tick, so that the short ones do not wait behind it.
pub(crate) fn running_for() -> Option<(Duration, Duration)> {
    POLL.with(|s| s.get()).map(|(t, before)| {
        let now = t.elapsed();
        (now, before + now)
    })
}

impl<F: Future> Future for Metered<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let t = Instant::now();
        let outer = POLL.with(|s| s.replace(Some((t, self.ran))));
        let outer_preempted = PREEMPTED.with(|p| p.replace(false));
        let out = self.inner.as_mut().poll(cx);
        self.preempted = PREEMPTED.with(|p| p.replace(outer_preempted));
        POLL.with(|s| s.set(outer));
        let d = t.elapsed();
        self.ran += d;
        self.usage.charge(d);
        if let Some(t) = &self.task {
            t.charge(d);
        }
        out
    }
}

/// Every pod the runtime has made, by key, while anything of it lives.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    pods: Mutex<Vec<(String, Weak<crate::net::PodNet>)>>,
}

impl Registry {
    pub fn add(&self, key: String, pod: &Arc<crate::net::PodNet>) {
        let mut pods = self.pods.lock().unwrap_or_else(|e| e.into_inner());
        pods.retain(|(_, w)| w.strong_count() > 0);
        pods.push((key, Arc::downgrade(pod)));
    }

    /// Divides the guest threads' time among the pods without a CPU limit for the next
    /// period, by weight, if the last period was contended (see the module docs).
    /// `capacity` is the guest threads' CPU time per period.
    pub fn rebalance(&self, capacity: Duration) {
        let pods: Vec<Arc<crate::net::PodNet>> = {
            let pods = self.pods.lock().unwrap_or_else(|e| e.into_inner());
            pods.iter().filter_map(|(_, w)| w.upgrade()).collect()
        };
        // (pod, used last period, weight) of the unlimited pods; what the limited used.
        let mut free = Vec::new();
        let mut limited = Duration::ZERO;
        for p in &pods {
            let q = p.usage.quota();
            let used = Duration::from_nanos(p.usage.recent.swap(0, Ordering::Relaxed));
            if q.per_period.is_some() {
                limited += used;
            } else {
                free.push((p.usage.clone(), used, q.weight.max(2), q.share));
            }
        }
        let wanted: Duration = limited + free.iter().map(|(_, u, ..)| *u).sum::<Duration>();
        let contended = wanted >= capacity * 9 / 10;
        for (u, share) in fair_shares(capacity.saturating_sub(limited), &free, contended) {
            let mut q = u.quota();
            q.share = share;
            u.mark_held(&q);
        }
    }

    /// The usage of every pod of which anything is still alive: a pod that was stopped
    /// and left nothing behind is not listed.
    pub fn snapshot(&self) -> Vec<PodUsage> {
        let mut pods = self.pods.lock().unwrap_or_else(|e| e.into_inner());
        pods.retain(|(_, w)| w.strong_count() > 0);
        pods.iter()
            .filter_map(|(k, w)| w.upgrade().map(|p| p.usage.snapshot(k, p.open_sockets())))
            .collect()
    }
}

/// Weighted max-min fair shares of `room` among pods, from what each used last period
/// and the share it was held to (if any). Demand is estimated from use: a pod held to
/// its share and using all of it may want any amount; any other pod is taken to want a
/// quarter more than it used, so that a pod crowded by others grows period by period
/// until the shares settle. A pod wanting less than its share is not held; the others
/// divide what is left by weight. Without contention, nobody is held.
fn fair_shares<P: Clone>(
    room: Duration,
    pods: &[(P, Duration, u64, Option<Duration>)],
    contended: bool,
) -> Vec<(P, Option<Duration>)> {
    if !contended {
        return pods.iter().map(|(p, ..)| (p.clone(), None)).collect();
    }
    let demand: Vec<u128> = pods
        .iter()
        .map(|(_, used, _, held)| match held {
            Some(q) if *used >= *q * 19 / 20 => u64::MAX as u128,
            _ => (used.as_nanos() * 5 / 4) + 1_000_000,
        })
        .collect();
    let mut order: Vec<usize> = (0..pods.len()).collect();
    // Smallest demand per weight first (d_a / w_a < d_b / w_b, without division): those
    // are the ones that may fit under their share.
    order.sort_by(|&a, &b| (demand[a] * pods[b].2 as u128).cmp(&(demand[b] * pods[a].2 as u128)));
    let mut left = room.as_nanos();
    let mut weight: u128 = pods.iter().map(|(_, _, w, _)| *w as u128).sum();
    let mut out = Vec::with_capacity(pods.len());
    for i in order {
        let (p, _, w, _) = &pods[i];
        let share = left * *w as u128 / weight.max(1);
        if demand[i] < share {
            out.push((p.clone(), None));
            left -= demand[i];
        } else {
            // At least a tick's worth, so a held pod still makes progress.
            let q = Duration::from_nanos(share as u64).max(Duration::from_millis(1));
            out.push((p.clone(), Some(q)));
            left -= share;
        }
        weight -= *w as u128;
    }
    out
}

/// Aborts a task when dropped: what a pod owns stops when the pod lets go of it.
#[derive(Debug)]
pub(crate) struct AbortOnDrop<T>(Option<tokio::task::JoinHandle<T>>);

impl<T> AbortOnDrop<T> {
    pub fn new(task: tokio::task::JoinHandle<T>) -> Self {
        Self(Some(task))
    }

    /// Lets the task run to its end on its own.
    pub fn detach(mut self) {
        self.0.take();
    }

    /// Waits for the task's end.
    pub async fn join(&mut self) -> Result<T, tokio::task::JoinError> {
        match self.0.as_mut() {
            Some(t) => t.await,
            None => std::future::pending().await,
        }
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        if let Some(t) = &self.0 {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_throttles_within_a_period_and_refills_at_the_next() {
        let u = Usage::default();
        u.set_cpu_limit(Some(100)); // 10 ms per 100 ms period
        assert!(u.throttled_until().is_none());
        u.charge(Duration::from_millis(4));
        assert!(u.throttled_until().is_none());
        u.charge(Duration::from_millis(7));
        let until = u.throttled_until();
        // The charge may have straddled a period boundary; if so, the next one throttles.
        if until.is_none() {
            u.charge(Duration::from_millis(11));
        }
        let until = u.throttled_until().expect("over quota");
        assert!(until > Instant::now());
        assert!(until <= Instant::now() + CPU_PERIOD);
        std::thread::sleep(until.saturating_duration_since(Instant::now()));
        assert!(u.throttled_until().is_none(), "a new period starts fresh");
        assert!(u.snapshot("p", 0).throttled_periods >= 1);
    }

    #[test]
    fn memory_is_limited_over_all_instances() {
        let u = Usage::default();
        u.set_memory_limit(Some(100));
        assert!(u.grow_memory(60));
        assert!(
            !u.grow_memory(60),
            "two instances together are over the limit"
        );
        u.release_memory(60);
        assert!(u.grow_memory(60));
        assert_eq!(u.snapshot("p", 0).memory_bytes, 60);
    }

    #[test]
    fn contended_unlimited_pods_converge_to_shares_by_weight() {
        let ms = Duration::from_millis;
        // Two spinners weighing 1000m and 250m and a light pod using 5 ms, on 200 ms of
        // guest time per period. A held spinner uses its share; the unheld ones split
        // what is left equally (as the runtime's queue would).
        let mut held: [Option<Duration>; 2] = [None, None];
        let mut used = [ms(0); 2];
        for _ in 0..30 {
            let mut left = ms(195);
            for i in 0..2 {
                if let Some(q) = held[i] {
                    used[i] = q.min(left);
                    left -= used[i];
                }
            }
            let unheld = held.iter().filter(|h| h.is_none()).count() as u32;
            for i in 0..2 {
                if held[i].is_none() {
                    used[i] = left / unheld;
                }
            }
            let pods = [
                (0, used[0], 1000, held[0]),
                (1, used[1], 250, held[1]),
                (2, ms(5), 250, None),
            ];
            let shares = fair_shares(ms(200), &pods, true);
            for (p, s) in shares {
                match p {
                    2 => assert_eq!(s, None, "the light pod is never held"),
                    i => held[i] = s,
                }
            }
        }
        let heavy = used[0].as_secs_f64() * 1000.0;
        let small = used[1].as_secs_f64() * 1000.0;
        assert!(
            (heavy - 156.0).abs() < 3.0 && (small - 39.0).abs() < 3.0,
            "{heavy} {small}"
        );
        let free = fair_shares(ms(200), &[(0, ms(50), 2, None)], false);
        assert_eq!(free[0].1, None, "no contention, no hold");
    }

    #[test]
    fn unlimited_pods_are_never_throttled() {
        let u = Usage::default();
        u.charge(Duration::from_secs(5));
        assert!(u.throttled_until().is_none());
        assert_eq!(u.snapshot("p", 0).cpu_nanos, 5_000_000_000);
    }

    #[test]
    fn period_end_is_after_now_and_within_a_period() {
        let _ = origin();
        let now = Instant::now();
        let end = period_end(period_of(now));
        assert!(end > now, "{end:?} {now:?}");
        assert!(end <= now + CPU_PERIOD);
    }
}
