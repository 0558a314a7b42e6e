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
//! share, as kube-apiserver's nominal concurrency shares do, and a level whose seats are
//! all taken borrows the idle lendable seats of others, with kube-apiserver's lendable
//! percents (see [`Seats`]). Watches and connection upgrades are long-running and take
//! no seat. How long requests waited for a seat, and
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

/// The levels, their shares of the seats and the percentage of those they lend while
/// idle (kube-apiserver's nominal concurrency shares and lendable percents), and how many
/// requests each may queue.
const LEVELS: [(&str, usize, usize, usize); 7] = [
    ("node-high", 40, 25, 2000),
    ("system", 30, 33, 2000),
    ("leader-election", 10, 0, 200),
    ("workload-high", 40, 50, 1000),
    ("workload-low", 100, 90, 1000),
    ("global-default", 20, 50, 500),
    ("catch-all", 5, 0, 50),
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
    seats: Arc<Seats>,
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
        Self::with_levels(&LEVELS, total, metrics)
    }

    /// Levels given as (name, share, lendable percent, queue limit).
    fn with_levels(
        levels: &[(&'static str, usize, usize, usize)],
        total: usize,
        metrics: FlowMetrics,
    ) -> Self {
        let shares: usize = levels.iter().map(|l| l.1).sum::<usize>().max(1);
        let limits: Vec<Limits> = levels
            .iter()
            .map(|&(name, share, lendable, queue_limit)| {
                let nominal = (total * share).div_ceil(shares).max(1);
                Limits {
                    name,
                    nominal,
                    // kube-apiserver's LendableCL: round(NominalCL * lendablePercent / 100).
                    lendable: (nominal * lendable + 50) / 100,
                    queue_limit,
                }
            })
            .collect();
        let state = State {
            levels: limits.iter().map(|_| LevelState::default()).collect(),
            next_borrower: 0,
        };
        Self {
            seats: Arc::new(Seats {
                limits,
                state: Mutex::new(state),
            }),
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

    /// A level's figures, by name.
    pub fn level(&self, name: &str) -> Option<LevelFigures> {
        let at = self.seats.index(name)?;
        Some(self.seats.figures(&self.seats.lock(), at))
    }

    /// The most requests of `name` that may run at once: its seats, and every other
    /// level's lendable ones.
    pub fn most_at_once(&self, name: &str) -> Option<usize> {
        let at = self.seats.index(name)?;
        Some(
            self.seats
                .limits
                .iter()
                .enumerate()
                .map(|(j, l)| if j == at { l.nominal } else { l.lendable })
                .sum(),
        )
    }

    /// Waits for a seat at the class's level for the client `flow` (its user); 429 when
    /// the level's queue is full or the wait is over.
    pub async fn admit(&self, class: Class, flow: &str) -> Result<Seat, Rejected> {
        self.admit_within(class, flow, QUEUE_WAIT).await
    }

    async fn admit_within(
        &self,
        class: Class,
        flow: &str,
        wait: Duration,
    ) -> Result<Seat, Rejected> {
        let Some(level) = self.seats.index(class.level) else {
            return Ok(Seat { held: None });
        };
        let start = Instant::now();
        let admitted = self.seats.clone().admit(level, flow, wait).await;
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

/// What a level holds now, against its limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LevelFigures {
    /// Its share of the server's seats (kube-apiserver's NominalCL).
    pub nominal: usize,
    /// How many of those other levels may borrow when it does not use them (LendableCL).
    pub lendable: usize,
    /// Its requests being served, on its seats or on borrowed ones.
    pub executing: usize,
    /// Of those, on seats borrowed from other levels.
    pub borrowed: usize,
    /// Its seats serving other levels' requests.
    pub lent: usize,
    /// Its requests waiting for a seat.
    pub queued: usize,
}

/// The fixed limits of one level.
#[derive(Debug)]
struct Limits {
    name: &'static str,
    nominal: usize,
    lendable: usize,
    queue_limit: usize,
}

/// Every level's seats, under one lock since a seat may go from one level to another.
///
/// kube-apiserver lets a level use seats that other levels leave idle (KEP-1040's
/// borrowing): every level keeps its nominal seats less its lendable ones for itself,
/// and lends the lendable ones while it does not use them. kube-apiserver moves the
/// levels' limits every 10 s from their recent demand; here a seat is lent the moment a
/// level's own are taken and another's lendable one is idle, and comes back when that
/// request ends. Either way no level ever has fewer than its nominal seats less its
/// lendable ones, and the server never runs more requests than its total. Without it,
/// the nodes' requests waited up to a second for one of the `system` level's 74 seats at
/// 1,000 nodes while 221 seats of `workload-low` stood idle.
#[derive(Debug)]
struct Seats {
    limits: Vec<Limits>,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    levels: Vec<LevelState>,
    /// Where the next search for a level waiting to borrow starts, so that levels with
    /// queued requests borrow in turn.
    next_borrower: usize,
}

#[derive(Debug, Default)]
struct LevelState {
    /// This level's requests on its own seats.
    own: usize,
    /// This level's requests on seats borrowed from other levels.
    borrowed: usize,
    /// This level's seats lent to other levels' requests.
    lent: usize,
    queued: usize,
    /// A waiter is sent the index of the level whose seat it got.
    queues: HashMap<String, VecDeque<oneshot::Sender<usize>>>,
    /// Clients with queued requests, in the order they are served.
    turn: VecDeque<String>,
}

impl LevelState {
    /// The next waiter in the clients' turn, if any (one that gave up is still
    /// returned: its sender fails).
    fn pop(&mut self) -> Option<oneshot::Sender<usize>> {
        while let Some(flow) = self.turn.pop_front() {
            let Some(queue) = self.queues.get_mut(&flow) else {
                continue;
            };
            let next = queue.pop_front();
            if queue.is_empty() {
                self.queues.remove(&flow);
            } else {
                self.turn.push_back(flow);
            }
            if let Some(tx) = next {
                self.queued -= 1;
                return Some(tx);
            }
        }
        None
    }
}

/// A seat, given back when dropped (and handed to the next queued request).
#[derive(Debug)]
pub struct Seat {
    /// The seats, the requesting level, and the level whose seat it is.
    held: Option<(Arc<Seats>, usize, usize)>,
}

impl Drop for Seat {
    fn drop(&mut self) {
        if let Some((seats, level, lender)) = self.held.take() {
            seats.release(level, lender);
        }
    }
}

impl Seats {
    fn index(&self, name: &str) -> Option<usize> {
        self.limits.iter().position(|l| l.name == name)
    }

    fn figures(&self, s: &State, at: usize) -> LevelFigures {
        let l = &s.levels[at];
        LevelFigures {
            nominal: self.limits[at].nominal,
            lendable: self.limits[at].lendable,
            executing: l.own + l.borrowed,
            borrowed: l.borrowed,
            lent: l.lent,
            queued: l.queued,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `at` has a seat free for its own requests.
    fn own_free(&self, s: &State, at: usize) -> bool {
        let l = &s.levels[at];
        l.own + l.lent < self.limits[at].nominal
    }

    /// Whether `at` may lend a seat now: one is free, it is lendable, and no request of
    /// `at`'s own waits for it.
    fn can_lend(&self, s: &State, at: usize) -> bool {
        let l = &s.levels[at];
        l.queued == 0 && l.lent < self.limits[at].lendable && self.own_free(s, at)
    }

    /// The level `borrower` borrows from now: of those able to lend, the one with the
    /// most seats free.
    fn lender_for(&self, s: &State, borrower: usize) -> Option<usize> {
        (0..self.limits.len())
            .filter(|&j| j != borrower && self.can_lend(s, j))
            .max_by_key(|&j| {
                let l = &s.levels[j];
                self.limits[j].nominal - l.own - l.lent
            })
    }

    /// Counts a request of `level` on a seat of `lender`.
    fn take(s: &mut State, level: usize, lender: usize) {
        if level == lender {
            s.levels[level].own += 1;
        } else {
            s.levels[lender].lent += 1;
            s.levels[level].borrowed += 1;
        }
    }

    async fn admit(
        self: Arc<Self>,
        level: usize,
        flow: &str,
        wait: Duration,
    ) -> Result<Seat, Rejected> {
        let name = self.limits[level].name;
        let mut rx = {
            let mut s = self.lock();
            // Requests already waiting at this level go first.
            let free = if s.levels[level].queued > 0 {
                None
            } else if self.own_free(&s, level) {
                Some(level)
            } else {
                self.lender_for(&s, level)
            };
            if let Some(lender) = free {
                Self::take(&mut s, level, lender);
                drop(s);
                return Ok(Seat {
                    held: Some((self, level, lender)),
                });
            }
            let l = &mut s.levels[level];
            if l.queued >= self.limits[level].queue_limit {
                return Err(Rejected {
                    level: name,
                    why: "its queues are full",
                    reason: "queue-full",
                });
            }
            let (tx, rx) = oneshot::channel();
            let queue = l.queues.entry(flow.to_string()).or_default();
            queue.push_back(tx);
            if queue.len() == 1 {
                l.turn.push_back(flow.to_string());
            }
            l.queued += 1;
            rx
        };
        match tokio::time::timeout(wait, &mut rx).await {
            Ok(Ok(lender)) => Ok(Seat {
                held: Some((self, level, lender)),
            }),
            _ => {
                // A seat handed over at the last moment is ours, and goes back.
                rx.close();
                if let Ok(lender) = rx.try_recv() {
                    drop(Seat {
                        held: Some((self, level, lender)),
                    });
                }
                Err(Rejected {
                    level: name,
                    why: "the request waited too long",
                    reason: "time-out",
                })
            }
        }
    }

    /// Gives back a seat of `lender` that served a request of `level`, and hands the
    /// lender's free seats on: to its own waiting requests first, then, as far as it
    /// lends, to other levels' in turn.
    fn release(&self, level: usize, lender: usize) {
        let mut s = self.lock();
        if level == lender {
            s.levels[level].own -= 1;
        } else {
            s.levels[lender].lent -= 1;
            s.levels[level].borrowed -= 1;
        }
        let n = self.limits.len();
        loop {
            if !self.own_free(&s, lender) {
                return;
            }
            let (taker, tx) = if s.levels[lender].queued > 0 {
                match s.levels[lender].pop() {
                    Some(tx) => (lender, tx),
                    None => continue,
                }
            } else if s.levels[lender].lent < self.limits[lender].lendable {
                let start = s.next_borrower;
                let Some(k) = (0..n)
                    .map(|i| (start + i) % n)
                    .find(|&k| k != lender && s.levels[k].queued > 0)
                else {
                    return;
                };
                s.next_borrower = (k + 1) % n;
                match s.levels[k].pop() {
                    Some(tx) => (k, tx),
                    None => continue,
                }
            } else {
                return;
            };
            // A waiter that gave up is skipped.
            if tx.send(lender).is_ok() {
                Self::take(&mut s, taker, lender);
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
        // catch-all lends nothing and borrows nothing here: every other level's seats
        // are taken first, so that its own are all it has.
        let mut held = Vec::new();
        for (name, ..) in LEVELS {
            let c = Class::named(name);
            for _ in 0..f.level(name).unwrap().nominal {
                held.push(f.admit(c, "filler").await.unwrap());
            }
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
        queued(&f, "catch-all", 50).await;
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
        let seats = f.level("catch-all").unwrap().nominal;
        assert!(served.ends_with(&format!(" {}", seats + 50)), "{served}");
    }

    /// Lets spawned requests run until `n` are queued at `level`.
    async fn queued(f: &Fairness, level: &str, n: usize) {
        for _ in 0..1000 {
            if f.level(level).unwrap().queued == n {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("{n} requests never queued: {:?}", f.level(level));
    }

    /// A server of one level, `test`, with `seats` seats that lends none.
    fn lone(seats: usize, queue: usize) -> Fairness {
        Fairness::with_levels(&[("test", 1, 0, queue)], seats, FlowMetrics::default())
    }

    #[tokio::test]
    async fn a_noisy_client_waits_its_turn_and_other_levels_keep_their_seats() {
        let level = lone(2, 10);
        let test = Class::named("test");
        let a1 = level.admit(test, "noisy").await.unwrap();
        let _a2 = level.admit(test, "noisy").await.unwrap();
        // The noisy client queues five more; a quiet one queues one after them.
        let mut noisy = Vec::new();
        for _ in 0..5 {
            let l = level.clone();
            noisy.push(tokio::spawn(async move { l.admit(test, "noisy").await }));
        }
        queued(&level, "test", 5).await;
        let quiet = {
            let l = level.clone();
            tokio::spawn(async move { l.admit(test, "quiet").await })
        };
        queued(&level, "test", 6).await;
        let figures = level.level("test").unwrap();
        assert_eq!((figures.executing, figures.queued), (2, 6));
        // One seat frees: the noisy client's first waiter gets it, then the quiet one is
        // next in turn, ahead of the noisy client's other four.
        drop(a1);
        let first = noisy.remove(0).await.unwrap().unwrap();
        drop(first);
        let q = quiet
            .await
            .unwrap()
            .expect("the quiet client is served in its turn");
        let figures = level.level("test").unwrap();
        assert_eq!((figures.executing, figures.queued), (2, 4));
        drop(q);
        // Past the queue limit: 429 at once.
        let full = lone(1, 0);
        let _held = full.admit(test, "x").await.unwrap();
        assert!(full.admit(test, "y").await.is_err());
        // A request that waits too long gets 429, and its place is freed.
        let waited = lone(1, 5);
        let only = waited.admit(test, "x").await.unwrap();
        let err = waited
            .admit_within(test, "y", Duration::from_millis(50))
            .await
            .unwrap_err();
        assert_eq!(err.why, "the request waited too long");
        drop(only);
        let figures = waited.level("test").unwrap();
        assert_eq!((figures.executing, figures.queued), (0, 0));
        // The other levels of a server are untouched by this one's load.
        let f = Fairness::new(400, FlowMetrics::default());
        let dev = Class::named("global-default");
        let mut held = Vec::new();
        for _ in 0..f.most_at_once("global-default").unwrap() {
            held.push(f.admit(dev, "dev").await.unwrap());
        }
        let next = {
            let f = f.clone();
            tokio::spawn(async move { f.admit(dev, "dev").await.map(drop) })
        };
        queued(&f, "global-default", 1).await;
        let dev = f.level("global-default").unwrap();
        assert!(dev.borrowed > 0, "idle levels lent it seats: {dev:?}");
        let high = f.level("node-high").unwrap();
        assert_eq!(high.lent, high.lendable, "node-high lent what it lends");
        for _ in 0..high.nominal - high.lendable {
            let heartbeat = Class::new("system-node-high", "node-high");
            held.push(f.admit(heartbeat, "system:node:n1").await.unwrap());
        }
        drop(held);
        next.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn idle_seats_are_lent_and_come_back_to_their_level_first() {
        // `busy` has 2 seats and lends none; `idle` has 8 and lends half.
        let f = Fairness::with_levels(
            &[("busy", 20, 0, 100), ("idle", 80, 50, 100)],
            10,
            FlowMetrics::default(),
        );
        let (busy, idle) = (Class::named("busy"), Class::named("idle"));
        let figures = |name| f.level(name).unwrap();
        assert_eq!((figures("busy").nominal, figures("idle").lendable), (2, 4));
        // `busy` uses its own 2 seats, then borrows `idle`'s 4 lendable ones, no more.
        let mut mine = Vec::new();
        for _ in 0..6 {
            mine.push(f.admit(busy, "a").await.unwrap());
        }
        assert_eq!(figures("busy").borrowed, 4);
        assert_eq!(figures("idle").lent, 4);
        let waiting = {
            let f = f.clone();
            tokio::spawn(async move { f.admit(busy, "a").await })
        };
        queued(&f, "busy", 1).await;
        // `idle` keeps the seats it does not lend: 4 of its own requests go at once.
        let mut theirs = Vec::new();
        for _ in 0..4 {
            theirs.push(f.admit(idle, "b").await.unwrap());
        }
        let late = {
            let f = f.clone();
            tokio::spawn(async move { f.admit(idle, "b").await })
        };
        queued(&f, "idle", 1).await;
        // A lent seat that comes back serves its own level's waiting request before the
        // borrower's.
        drop(mine.pop());
        let got = late.await.unwrap().unwrap();
        assert_eq!(figures("idle").lent, 3);
        assert_eq!(figures("busy").queued, 1);
        // Once `idle` has nobody waiting, its freed seat is lent again.
        drop(got);
        let lent_again = waiting.await.unwrap().unwrap();
        assert_eq!(figures("idle").lent, 4);
        drop((mine, theirs, lent_again));
        for name in ["busy", "idle"] {
            let f = figures(name);
            assert_eq!((f.executing, f.lent, f.queued), (0, 0, 0), "{name}");
        }
    }
}
