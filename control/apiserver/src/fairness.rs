//! API priority and fairness, after kube-apiserver's (KEP-1040): requests are sorted into
//! priority levels that each have their own seats, so that one noisy client cannot starve
//! node heartbeats or the controllers; within a level, requests beyond its seats wait in
//! per-client queues served in turn, and only a full queue answers 429.
//!
//! The levels and what goes to them, in order (the first that applies):
//! - `node-high`: nodes (`system:nodes`), and any write of a Lease in `kube-node-lease`
//!   (a node's heartbeat, whoever sends it);
//! - `exempt`: `system:masters`, not limited, as in Kubernetes;
//! - `leader-election`: Leases in `kube-system` (the control loops' leader election);
//! - `system`: the control plane's own users (`system:kube-controller-manager`,
//!   `system:kube-scheduler`, ServiceAccounts of `kube-system`);
//! - `workload-low`: other ServiceAccounts (operators, controllers in pods);
//! - `global-default`: every other authenticated user;
//! - `catch-all`: the unauthenticated.
//!
//! Seats are shared out of the server's total (`--max-requests-inflight`) by each level's
//! share, as kube-apiserver's nominal concurrency shares do. Watches and connection
//! upgrades are long-running and take no seat.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use baton_auth::UserInfo;
use tokio::sync::oneshot;

/// How long a request may wait in its queue before it is refused with 429.
pub const QUEUE_WAIT: Duration = Duration::from_secs(10);

/// The levels, their shares of the seats, and how many requests each may queue.
const LEVELS: [(&str, usize, usize); 6] = [
    ("node-high", 40, 2000),
    ("leader-election", 10, 200),
    ("system", 30, 1000),
    ("workload-low", 100, 1000),
    ("global-default", 20, 500),
    ("catch-all", 5, 50),
];

/// What a request is, as far as its level is concerned.
#[derive(Debug, Clone, Copy)]
pub struct Asked<'a> {
    pub user: &'a UserInfo,
    /// A get, list or watch (a heartbeat is a write).
    pub reading: bool,
    pub resource: Option<&'a str>,
    pub namespace: Option<&'a str>,
}

/// The levels of one API server.
#[derive(Debug, Clone)]
pub struct Fairness {
    levels: Arc<HashMap<&'static str, Arc<Level>>>,
}

/// Why a request was not admitted.
#[derive(Debug, thiserror::Error)]
#[error("the {level} priority level is full: {why}")]
pub struct Rejected {
    pub level: &'static str,
    pub why: &'static str,
}

impl Fairness {
    /// Levels sharing `total` seats.
    pub fn new(total: usize) -> Self {
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
        }
    }

    /// The level a request goes to; None: exempt.
    pub fn classify(&self, asked: Asked<'_>) -> Option<&'static str> {
        let user = asked.user;
        let in_group = |g: &str| user.groups.iter().any(|x| x == g);
        let lease_in = |ns: &str| asked.resource == Some("leases") && asked.namespace == Some(ns);
        if in_group("system:nodes") || (lease_in("kube-node-lease") && !asked.reading) {
            return Some("node-high");
        }
        if in_group("system:masters") {
            return None;
        }
        if lease_in("kube-system") {
            return Some("leader-election");
        }
        if matches!(
            user.name.as_str(),
            "system:kube-controller-manager" | "system:kube-scheduler"
        ) || user.name.starts_with("system:serviceaccount:kube-system:")
        {
            return Some("system");
        }
        if in_group("system:serviceaccounts") {
            return Some("workload-low");
        }
        if in_group("system:authenticated") {
            return Some("global-default");
        }
        Some("catch-all")
    }

    /// A level by name, for its figures.
    pub fn level(&self, name: &str) -> Option<&Arc<Level>> {
        self.levels.get(name)
    }

    /// Waits for a seat at `level` for the client `flow` (its user); 429 when the level's
    /// queue is full or the wait is over.
    pub async fn admit(&self, level: &str, flow: &str) -> Result<Seat, Rejected> {
        match self.levels.get(level) {
            Some(l) => l.clone().admit(flow, QUEUE_WAIT).await,
            None => Ok(Seat { level: None }),
        }
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
        let f = Fairness::new(400);
        let node = user("system:node:n1", &["system:nodes", "system:authenticated"]);
        let admin = user("admin", &["system:masters", "system:authenticated"]);
        let dev = user("dev", &["system:authenticated"]);
        let sa = user(
            "system:serviceaccount:apps:op",
            &["system:serviceaccounts", "system:authenticated"],
        );
        let anon = user("system:anonymous", &["system:unauthenticated"]);
        assert_eq!(
            f.classify(asked(&node, "get", "pods", "a")),
            Some("node-high")
        );
        assert_eq!(
            f.classify(asked(&admin, "update", "leases", "kube-node-lease")),
            Some("node-high"),
            "a heartbeat is a heartbeat whoever sends it"
        );
        assert_eq!(f.classify(asked(&admin, "list", "pods", "a")), None);
        assert_eq!(
            f.classify(asked(&dev, "update", "leases", "kube-system")),
            Some("leader-election")
        );
        assert_eq!(
            f.classify(asked(&sa, "list", "pods", "a")),
            Some("workload-low")
        );
        assert_eq!(
            f.classify(asked(&dev, "list", "pods", "a")),
            Some("global-default")
        );
        assert_eq!(
            f.classify(asked(&anon, "get", "pods", "a")),
            Some("catch-all")
        );
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
        let f = Fairness::new(400);
        let held: Vec<Seat> = futures::future::join_all(
            (0..f.level("global-default").unwrap().seats())
                .map(|_| f.admit("global-default", "dev")),
        )
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
        assert!(f.admit("node-high", "system:node:n1").await.is_ok());
        drop(held);
    }
}
