//! Memory-pressure eviction, as the kubelet's eviction manager does it for memory.
//!
//! Every [`INTERVAL`] the node reads the machine's available memory (`MemAvailable`). Below
//! the hard threshold (`--eviction-hard-memory`, 100Mi by default, as the kubelet's
//! `memory.available<100Mi`) the node is under memory pressure: it reports the Node's
//! `MemoryPressure` condition True, refuses new BestEffort pods, and evicts one pod per
//! round, ranked as the kubelet ranks them:
//! 1. pods using more memory than they requested (every BestEffort pod that uses any),
//!    by how much more; then the other Burstable pods; Guaranteed pods last;
//! 2. within a rank, the pod using the most memory first; a pod using none is never
//!    evicted, since that frees nothing.
//!
//! An evicted pod is stopped and left in the API as `Failed` with reason `Evicted`, so its
//! controller replaces it, exactly as on Kubernetes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::budget::Admitted;

/// How often memory is checked.
pub const INTERVAL: Duration = Duration::from_secs(1);
/// After an eviction, the node waits this long for memory to be given back before the
/// next one, as the kubelet waits for a pod's resources to be reclaimed.
pub const SETTLE: Duration = Duration::from_secs(5);

/// The node's memory-pressure state and the evictions it has ordered.
#[derive(Debug)]
pub struct Evictions {
    pressure: AtomicBool,
    /// Pods to evict, by UID, with the message their status will carry.
    ordered: Mutex<HashMap<String, String>>,
    /// Bumped at every order: each worker watches it (a watch never loses a change, even
    /// one made while the worker was busy) and then looks for its own UID.
    wake: tokio::sync::watch::Sender<u64>,
}

impl Default for Evictions {
    fn default() -> Self {
        Self {
            pressure: AtomicBool::new(false),
            ordered: Mutex::default(),
            wake: tokio::sync::watch::channel(0).0,
        }
    }
}

impl Evictions {
    pub fn under_pressure(&self) -> bool {
        self.pressure.load(Ordering::Relaxed)
    }

    pub fn set_pressure(&self, on: bool) {
        self.pressure.store(on, Ordering::Relaxed);
    }

    /// Orders the eviction of pod `uid`.
    pub fn order(&self, uid: &str, message: String) {
        self.ordered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(uid.to_string(), message);
        self.wake.send_modify(|n| *n += 1);
    }

    /// What a worker watches to learn that an eviction was ordered.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.wake.subscribe()
    }

    /// Whether pod `uid`'s eviction was ordered and not yet carried out.
    pub fn pending(&self, uid: &str) -> bool {
        self.ordered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(uid)
    }

    /// The eviction ordered for pod `uid`, if any (taken: it is acted on once).
    pub fn take(&self, uid: &str) -> Option<String> {
        self.ordered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(uid)
    }
}

/// The machine's available memory, from `/proc/meminfo`.
pub fn memory_available() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kib| kib * 1024)
}

/// The pod to evict first: `pods` are the admitted pods by UID, `usage` their memory in
/// use by UID.
pub fn victim(pods: &HashMap<String, Admitted>, usage: &HashMap<String, u64>) -> Option<String> {
    // The kubelet's order: pods using more than they requested first (a BestEffort pod
    // requests nothing), Guaranteed ones last, and by how far over their request.
    let rank = |a: &Admitted, used: u64| -> (u8, i128) {
        let over = used as i128 - a.request as i128;
        match a.qos {
            _ if over > 0 && a.qos != "Guaranteed" => (0, over),
            "Guaranteed" => (2, used as i128),
            _ => (1, used as i128),
        }
    };
    pods.iter()
        .filter(|(uid, _)| usage.get(*uid).is_some_and(|u| *u > 0))
        .map(|(uid, a)| {
            let used = usage.get(uid).copied().unwrap_or(0);
            let (class, amount) = rank(a, used);
            // Lowest class first; within it, the largest amount.
            ((class, -amount, uid.clone()), uid)
        })
        .min_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, uid)| uid.clone())
}

/// Watches memory and orders evictions until the task is dropped.
pub async fn run(
    evictions: Arc<Evictions>,
    budget: Arc<crate::budget::MemoryBudget>,
    runtime: baton_wasm_shim::Runtime,
    threshold: u64,
) {
    let mut tick = tokio::time::interval(INTERVAL);
    let mut settle_until = tokio::time::Instant::now();
    loop {
        tick.tick().await;
        let Some(available) = memory_available() else {
            continue;
        };
        let pressure = available < threshold;
        if pressure != evictions.under_pressure() {
            tracing::warn!(available, threshold, pressure, "memory pressure changed");
        }
        evictions.set_pressure(pressure);
        if !pressure || tokio::time::Instant::now() < settle_until {
            continue;
        }
        let usage: HashMap<String, u64> = runtime
            .usage()
            .into_iter()
            .filter_map(|u| {
                let uid = u.pod.rsplit('/').next()?.to_string();
                Some((uid, u.memory_bytes as u64))
            })
            .collect();
        // A pod whose eviction is under way is not picked again; its worker gives its
        // charge back when it has stopped it.
        let mut candidates = budget.admitted();
        candidates.retain(|uid, _| !evictions.pending(uid));
        let Some(uid) = victim(&candidates, &usage) else {
            continue;
        };
        let message = format!(
            "The node was low on resource: memory. Threshold quantity: {threshold}, available: {available}. "
        );
        tracing::warn!(pod = %uid, "evicting a pod under memory pressure");
        evictions.order(&uid, message);
        settle_until = tokio::time::Instant::now() + SETTLE;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(qos: &'static str, request: u64) -> Admitted {
        Admitted {
            charge: 0,
            qos,
            request,
        }
    }

    #[test]
    fn best_effort_first_then_burstable_over_request_then_the_rest() {
        let mut pods = HashMap::from([
            ("g".to_string(), pod("Guaranteed", 100)),
            ("b-under".to_string(), pod("Burstable", 100)),
            ("b-over".to_string(), pod("Burstable", 10)),
        ]);
        let usage = HashMap::from([
            ("g".to_string(), 500),
            ("b-under".to_string(), 50),
            ("b-over".to_string(), 20),
            ("be".to_string(), 1),
        ]);
        assert_eq!(victim(&pods, &usage).as_deref(), Some("b-over"));
        // A BestEffort pod over its (zero) request ranks with the others over theirs, by
        // how much: 1 byte over is evicted after 10 over.
        pods.insert("be".into(), pod("BestEffort", 0));
        assert_eq!(victim(&pods, &usage).as_deref(), Some("b-over"));
        pods.remove("b-over");
        assert_eq!(victim(&pods, &usage).as_deref(), Some("be"));
        pods.remove("be");
        assert_eq!(victim(&pods, &usage).as_deref(), Some("b-under"));
        pods.remove("b-under");
        assert_eq!(victim(&pods, &usage).as_deref(), Some("g"));
        // A pod using nothing frees nothing.
        let idle = HashMap::from([("g".to_string(), 0)]);
        assert_eq!(victim(&pods, &idle), None);
        assert_eq!(victim(&HashMap::new(), &usage), None);
    }
}
