//! API priority and fairness, after kube-apiserver's (KEP-1040): requests are sorted into
//! priority levels that each have their own seats, so that one noisy client cannot starve
//! node heartbeats or the controllers; within a level, requests beyond its seats wait in
//! per-client queues served in turn, and only a full queue answers 429.
//!
//! What goes where follows kube-apiserver's default FlowSchemas, the first that applies:
//!
//! | flow schema | matches | level |
//! |---|---|---|
//! | `system-node-high` | `system:nodes` on nodes and leases; any write of a Lease in `kube-node-lease` | `node-high` |
//! | `exempt` | `system:masters` | not limited |
//! | `system-nodes` | every other request of `system:nodes` | `system` |
//! | `system-leader-election` | Leases in `kube-system` | `leader-election` |
//! | `kube-controller-manager`, `kube-scheduler`, `kube-system-service-accounts` | the control plane's own users | `workload-high` |
//! | `service-accounts` | other ServiceAccounts | `workload-low` |
//! | `global-default` | every other authenticated user | `global-default` |
//! | `catch-all` | the unauthenticated | `catch-all` |
//!
//! A node's heartbeat (its Lease and its Node status) has a level to itself, apart from
//! the same node's pod status writes, Events and ConfigMap reads: at 5,000 nodes those
//! are three times the heartbeats, and a heartbeat queued behind them was late enough
//! for its Lease to look lost.
//!
//! Seats are shared out of the server's total (`--max-requests-inflight`) by each level's
//! share, as kube-apiserver's nominal concurrency shares do. Watches and connection
//! upgrades are long-running and take no seat. How long requests waited for a seat, and
//! which were refused, are kube-apiserver's `apiserver_flowcontrol_*` metrics.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use baton_auth::UserInfo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::sync::oneshot;

/// How long a request may wait in its queue before it is refused with 429.
pub const QUEUE_WAIT: Duration = Duration::from_secs(10);

/// The levels, their shares of the seats (kube-apiserver's nominal concurrency shares),
/// and how many requests each may queue.
const LEVELS: [(&str, usize, usize); 7] = [
    ("node-high", 40, 2000),
    ("system", 30, 2000),
    ("leader-election", 10, 200),
    ("workload-high", 40, 1000),
    ("workload-low", 100, 1000),
    ("global-default", 20, 500),
    ("catch-all", 5, 50),
];

/// kube-apiserver's buckets for `apiserver_flowcontrol_request_wait_duration_seconds`.
const WAIT_BUCKETS: [f64; 11] = [0.0, 0.005, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0];

/// What a request is, as far as its level is concerned.
#[derive(Debug, Clone, Copy)]
pub struct Asked<'a> {
    pub user: &'a UserInfo,
    /// A get, list or watch (a heartbeat is a write).
    pub reading: bool,
    pub resource: Option<&'a str>,
    pub namespace: Option<&'a str>,
}

/// Where a request went: the flow schema that matched it, and that schema's level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Class {
    pub schema: &'static str,
    pub level: &'static str,
}

impl Class {
    const fn new(schema: &'static str, level: &'static str) -> Self {
        Self { schema, level }
    }

    /// The class of a level whose schema has the level's name (`global-default`,
    /// `catch-all`), or of a level named for a test.
    pub const fn named(level: &'static str) -> Self {
        Self::new(level, level)
    }
}

/// The levels of one API server.
#[derive(Debug, Clone)]
pub struct Fairness {
    levels: Arc<HashMap<&'static str, Arc<Level>>>,
    metrics: FlowMetrics,
}

/// Why a request was not admitted.
#[derive(Debug, thiserror::Error)]
#[error("the {level} priority level is full: {why}")]
pub struct Rejected {
    pub level: &'static str,
    pub why: &'static str,
    /// kube-apiserver's `reason` label: `queue-full` or `time-out`.
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WaitLabels {
    priority_level: &'static str,
    flow_schema: &'static str,
    /// Whether the request went on to be served.
    execute: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RejectLabels {
    priority_level: &'static str,
    flow_schema: &'static str,
    reason: &'static str,
}

/// How long requests waited for their seats, and which were refused, by level and flow
/// schema, under kube-apiserver's names. Cloning shares the series.
#[derive(Clone, Debug)]
pub struct FlowMetrics {
    waits: Family<WaitLabels, Histogram, fn() -> Histogram>,
    rejected: Family<RejectLabels, Counter>,
}

fn wait_histogram() -> Histogram {
    Histogram::new(WAIT_BUCKETS)
}

impl Default for FlowMetrics {
    fn default() -> Self {
        Self {
            waits: Family::new_with_constructor(wait_histogram),
            rejected: Family::default(),
        }
    }
}

impl FlowMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "apiserver_flowcontrol_request_wait_duration_seconds",
            "Length of time a request spent waiting in its queue",
            self.waits.clone(),
        );
        r.register(
            "apiserver_flowcontrol_rejected_requests",
            "Number of requests rejected by API Priority and Fairness subsystem",
            self.rejected.clone(),
        );
    }
}

impl Fairness {
    /// Levels sharing `total` seats, their figures kept in `metrics`.
    pub fn new(total: usize, metrics: FlowMetrics) -> Self {
        let shares: usize = LEVELS.iter().map(|l| l.1).sum();
        let levels = LEVELS
            .iter()
            .map(|&(name, share, queue)| {
                let seats = (total * share).div_ceil(shares).max(1);
                (name, Arc::new(Level::new(name, seats, queue)))
            })
            .collect();
        Self {
            levels: Arc::new(levels),
            metrics,
        }
    }

    /// The flow schema and level a request goes to; None: exempt.
    pub fn classify(&self, asked: Asked<'_>) -> Option<Class> {
        let user = asked.user;
        let in_group = |g: &str| user.groups.iter().any(|x| x == g);
        let lease_in = |ns: &str| asked.resource == Some("leases") && asked.namespace == Some(ns);
        let node = in_group("system:nodes");
        if (node && matches!(asked.resource, Some("nodes" | "leases")))
            || (lease_in("kube-node-lease") && !asked.reading)
        {
            return Some(Class::new("system-node-high", "node-high"));
        }
        if in_group("system:masters") {
            return None;
        }
        if node {
            return Some(Class::new("system-nodes", "system"));
        }
        if lease_in("kube-system") {
            return Some(Class::new("system-leader-election", "leader-election"));
        }
        match user.name.as_str() {
            "system:kube-controller-manager" => {
                return Some(Class::new("kube-controller-manager", "workload-high"))
            }
            "system:kube-scheduler" => return Some(Class::new("kube-scheduler", "workload-high")),
            n if n.starts_with("system:serviceaccount:kube-system:") => {
                return Some(Class::new("kube-system-service-accounts", "workload-high"))
            }
            _ => {}
        }
        if in_group("system:serviceaccounts") {
            return Some(Class::new("service-accounts", "workload-low"));
        }
        if in_group("system:authenticated") {
            return Some(Class::named("global-default"));
        }
        Some(Class::named("catch-all"))
    }

    /// A level by name, for its figures.
    pub fn level(&self, name: &str) -> Option<&Arc<Level>> {
        self.levels.get(name)
    }

    /// Waits for a seat at the class's level for the client `flow` (its user); 429 when
    /// the level's queue is full or the wait is over.
    pub async fn admit(&self, class: Class, flow: &str) -> Result<Seat, Rejected> {
        let Some(level) = self.levels.get(class.level) else {
            return Ok(Seat { level: None });
        };
        let start = Instant::now();
        let admitted = level.clone().admit(flow, QUEUE_WAIT).await;
        self.metrics
            .waits
            .get_or_create(&WaitLabels {
                priority_level: class.level,
                flow_schema: class.schema,
                execute: if admitted.is_ok() { "true" } else { "false" },
            })
            .observe(start.elapsed().as_secs_f64());
        if let Err(e) = &admitted {
            self.metrics
                .rejected
                .get_or_create(&RejectLabels {
                    priority_level: class.level,
                    flow_schema: class.schema,
                    reason: e.reason,
                })
                .inc();
        }
        admitted
    }
}
/// One priority level: its seats and its queues, one per client.
#[derive(Debug)]
pub struct Level {
    name: &'static str,
    seats: usize,
    queue_limit: usize,
    state: Mutex<LevelState>,
}

#[derive(Debug, Default)]
struct LevelState {
    in_use: usize,
    queued: usize,
    queues: HashMap<String, VecDeque<oneshot::Sender<()>>>,
    /// Clients with queued requests, in the order they are served.
    turn: VecDeque<String>,
}

/// A seat, given back when dropped (and handed to the next queued request).
#[derive(Debug)]
pub struct Seat {
    level: Option<Arc<Level>>,
}

impl Drop for Seat {
    fn drop(&mut self) {
        if let Some(level) = self.level.take() {
            level.release();
        }
    }
}

impl Level {
    fn new(name: &'static str, seats: usize, queue_limit: usize) -> Self {
        Self {
            name,
            seats,
            queue_limit,
            state: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LevelState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Seats in use and requests waiting now.
    pub fn load(&self) -> (usize, usize) {
        let s = self.lock();
        (s.in_use, s.queued)
    }

    pub fn seats(&self) -> usize {
        self.seats
    }

    async fn admit(self: Arc<Self>, flow: &str, wait: Duration) -> Result<Seat, Rejected> {
        let waiting = {
            let mut s = self.lock();
            if s.in_use < self.seats && s.queued == 0 {
                s.in_use += 1;
                None
            } else if s.queued >= self.queue_limit {
                return Err(Rejected {
                    level: self.name,
                    why: "its queues are full",
                    reason: "queue-full",
                });
            } else {
                let (tx, rx) = oneshot::channel();
                let queue = s.queues.entry(flow.to_string()).or_default();
                queue.push_back(tx);
                if queue.len() == 1 {
                    s.turn.push_back(flow.to_string());
                }
                s.queued += 1;
                Some(rx)
            }
        };
        let Some(mut rx) = waiting else {
            return Ok(Seat { level: Some(self) });
        };
        let seat = Seat {
            level: Some(self.clone()),
        };
        match tokio::time::timeout(wait, &mut rx).await {
            Ok(Ok(())) => Ok(seat),
            _ => {
                // A seat handed over at the last moment is ours, and goes back with it.
                rx.close();
                let handed = rx.try_recv().is_ok();
                let mut seat = seat;
                if !handed {
                    seat.level = None;
                }
                drop(seat);
                Err(Rejected {
                    level: self.name,
                    why: "the request waited too long",
                    reason: "time-out",
                })
            }
        }
    }

    /// Gives a seat back: to the next client in turn with a request waiting, if any.
    fn release(&self) {
        let mut s = self.lock();
        s.in_use -= 1;
        while s.in_use < self.seats {
            let Some(flow) = s.turn.pop_front() else {
                return;
            };
            let Some(queue) = s.queues.get_mut(&flow) else {
                continue;
            };
            let next = queue.pop_front();
            let more = !queue.is_empty();
            if more {
                s.turn.push_back(flow);
            } else {
                s.queues.remove(&flow);
            }
            let Some(tx) = next else { continue };
            s.queued -= 1;
            // A waiter that gave up is skipped.
            if tx.send(()).is_ok() {
                s.in_use += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str, groups: &[&str]) -> UserInfo {
        UserInfo::new(name, groups)
    }

    fn asked<'a>(u: &'a UserInfo, verb: &'a str, res: &'a str, ns: &'a str) -> Asked<'a> {
        Asked {
            user: u,
            reading: matches!(verb, "get" | "list"),
            resource: Some(res),
            namespace: Some(ns),
        }
    }

    #[test]
    fn requests_go_to_their_levels() {
        let f = Fairness::new(400, FlowMetrics::default());
        let node = user("system:node:n1", &["system:nodes", "system:authenticated"]);
        let admin = user("admin", &["system:masters", "system:authenticated"]);
        let dev = user("dev", &["system:authenticated"]);
        let cm = user("system:kube-controller-manager", &["system:authenticated"]);
        let sa = user(
            "system:serviceaccount:apps:op",
            &["system:serviceaccounts", "system:authenticated"],
        );
        let anon = user("system:anonymous", &["system:unauthenticated"]);
        let level = |a: Asked<'_>| f.classify(a).map(|c| c.level);
        assert_eq!(
            level(asked(&node, "update", "leases", "kube-node-lease")),
            Some("node-high")
        );
        assert_eq!(
            f.classify(asked(&node, "patch", "nodes", "")),
            Some(Class::new("system-node-high", "node-high")),
            "a node's status is its heartbeat too"
        );
        assert_eq!(
            f.classify(asked(&node, "patch", "pods", "a")),
            Some(Class::new("system-nodes", "system")),
            "a node's other requests do not queue its heartbeat"
        );
        assert_eq!(
            level(asked(&node, "get", "configmaps", "a")),
            Some("system")
        );
        assert_eq!(
            level(asked(&admin, "update", "leases", "kube-node-lease")),
            Some("node-high"),
            "a heartbeat is a heartbeat whoever sends it"
        );
        assert_eq!(f.classify(asked(&admin, "list", "pods", "a")), None);
        assert_eq!(
            level(asked(&dev, "update", "leases", "kube-system")),
            Some("leader-election")
        );
        assert_eq!(
            f.classify(asked(&cm, "create", "pods", "a")),
            Some(Class::new("kube-controller-manager", "workload-high"))
        );
        assert_eq!(level(asked(&sa, "list", "pods", "a")), Some("workload-low"));
        assert_eq!(
            level(asked(&dev, "list", "pods", "a")),
            Some("global-default")
        );
        assert_eq!(level(asked(&anon, "get", "pods", "a")), Some("catch-all"));
    }

    #[tokio::test]
    async fn waits_and_refusals_are_counted_by_level_and_schema() {
        let metrics = FlowMetrics::default();
        let f = Fairness::new(7, metrics.clone());
        let class = Class::named("catch-all");
        let seats = f.level("catch-all").unwrap().seats();
        let mut held = Vec::new();
        for _ in 0..seats {
            held.push(f.admit(class, "anon").await.unwrap());
        }
        let mut r = Registry::default();
        metrics.register(&mut r);
        let mut text = String::new();
        // catch-all queues 50; a 51st waiting request is refused at once.
        let waiting: Vec<_> = (0..50)
            .map(|_| {
                let f = f.clone();
                tokio::spawn(async move { f.admit(class, "anon").await.map(drop) })
            })
            .collect();
        queued(f.level("catch-all").unwrap(), 50).await;
        let refused = f.admit(class, "anon").await.unwrap_err();
        assert_eq!(refused.reason, "queue-full");
        drop(held);
        for w in waiting {
            w.await.unwrap().unwrap();
        }
        prometheus_client::encoding::text::encode(&mut text, &r).unwrap();
        let line = |prefix: &str| {
            text.lines()
                .find(|l| l.starts_with(prefix))
                .unwrap_or_else(|| panic!("no {prefix} in {text}"))
                .to_string()
        };
        assert!(line(
            "apiserver_flowcontrol_rejected_requests_total{priority_level=\"catch-all\",flow_schema=\"catch-all\",reason=\"queue-full\"}"
        )
        .ends_with(" 1"));
        let served = line(
            "apiserver_flowcontrol_request_wait_duration_seconds_count{priority_level=\"catch-all\",flow_schema=\"catch-all\",execute=\"true\"}",
        );
        assert!(served.ends_with(&format!(" {}", seats + 50)), "{served}");
    }

    /// Lets spawned requests run until `n` are queued.
    async fn queued(level: &Level, n: usize) {
        for _ in 0..1000 {
            if level.load().1 == n {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("{n} requests never queued: {:?}", level.load());
    }

    #[tokio::test]
    async fn a_noisy_client_waits_its_turn_and_other_levels_keep_their_seats() {
        let level = Arc::new(Level::new("test", 2, 10));
        let a1 = level.clone().admit("noisy", QUEUE_WAIT).await.unwrap();
        let _a2 = level.clone().admit("noisy", QUEUE_WAIT).await.unwrap();
        // The noisy client queues five more; a quiet one queues one after them.
        let mut noisy = Vec::new();
        for _ in 0..5 {
            let l = level.clone();
            noisy.push(tokio::spawn(
                async move { l.admit("noisy", QUEUE_WAIT).await },
            ));
        }
        queued(&level, 5).await;
        let quiet = {
            let l = level.clone();
            tokio::spawn(async move { l.admit("quiet", QUEUE_WAIT).await })
        };
        queued(&level, 6).await;
        assert_eq!(level.load(), (2, 6));
        // One seat frees: the noisy client's first waiter gets it, then the quiet one is
        // next in turn, ahead of the noisy client's other four.
        drop(a1);
        let first = noisy.remove(0).await.unwrap().unwrap();
        drop(first);
        let q = quiet
            .await
            .unwrap()
            .expect("the quiet client is served in its turn");
        assert_eq!(level.load(), (2, 4));
        drop(q);
        // Past the queue limit: 429 at once.
        let full = Arc::new(Level::new("full", 1, 0));
        let _held = full.clone().admit("x", QUEUE_WAIT).await.unwrap();
        assert!(full.clone().admit("y", QUEUE_WAIT).await.is_err());
        // A request that waits too long gets 429, and its place is freed.
        let waited = Arc::new(Level::new("slow", 1, 5));
        let _only = waited.clone().admit("x", QUEUE_WAIT).await.unwrap();
        let err = waited
            .clone()
            .admit("y", Duration::from_millis(50))
            .await
            .unwrap_err();
        assert_eq!(err.why, "the request waited too long");
        drop(_only);
        assert_eq!(waited.load(), (0, 0));
        // The other levels of a server are untouched by this one's load.
        let f = Fairness::new(400, FlowMetrics::default());
        let held: Vec<Seat> = futures::future::join_all(
            (0..f.level("global-default").unwrap().seats())
                .map(|_| f.admit(Class::named("global-default"), "dev")),
        )
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
        assert!(f
            .admit(
                Class::new("system-node-high", "node-high"),
                "system:node:n1"
            )
            .await
            .is_ok());
        drop(held);
    }
}
