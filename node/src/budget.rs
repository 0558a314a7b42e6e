//! The node's memory budget: what it has promised its pods, bounded by what it has.
//!
//! Every Wasm pod runs inside the node agent's process, so one pod's memory is everyone's
//! memory. Each pod is charged, at admission, the memory its containers may hold: the sum
//! of their `limits.memory`, a container without a limit counting the node's default
//! limit (and the largest init container, if more). The sandbox holds the pod to that
//! charge over all its instances together, so the charges bound what the pods can take.
//! A pod whose charge does not fit in what is left of the node's allocatable memory is
//! rejected as the kubelet rejects it (phase Failed, reason `OutOfmemory`).

use std::collections::HashMap;
use std::sync::Mutex;

use k8s_openapi::api::core::v1::{Container, Pod};

/// Why a pod was not admitted.
#[derive(Debug, thiserror::Error)]
#[error("Pod was rejected: Node didn't have enough resource: memory, requested: {requested}, used: {used}, capacity: {capacity}")]
pub struct OutOfMemory {
    pub requested: u64,
    pub used: u64,
    pub capacity: u64,
}

/// The memory charged to each admitted pod, by UID.
#[derive(Debug)]
pub struct MemoryBudget {
    allocatable: u64,
    /// What a container without `limits.memory` is charged (and limited to).
    pub default_limit: u64,
    charged: Mutex<HashMap<String, Admitted>>,
}

/// What the node knows of an admitted pod, for eviction's ranking.
#[derive(Debug, Clone)]
pub struct Admitted {
    pub charge: u64,
    /// `Guaranteed`, `Burstable` or `BestEffort`.
    pub qos: &'static str,
    /// The pod's memory requests together.
    pub request: u64,
}

impl MemoryBudget {
    pub fn new(allocatable: u64, default_limit: u64) -> Self {
        Self {
            allocatable,
            default_limit,
            charged: Mutex::default(),
        }
    }

    /// A container's memory limit, or the node's default for one without.
    pub fn container_limit(&self, c: &Container) -> u64 {
        c.resources
            .as_ref()
            .and_then(|r| r.limits.as_ref())
            .and_then(|l| l.get("memory"))
            .and_then(|q| baton_kube::quantity::whole(&q.0).ok())
            .unwrap_or(self.default_limit)
    }

    /// What a pod is charged: its containers' limits together, or its largest init
    /// container's, if more (init containers run before, not beside, the others).
    pub fn charge_of(&self, pod: &Pod) -> u64 {
        let Some(spec) = pod.spec.as_ref() else {
            return 0;
        };
        let apps: u64 = spec
            .containers
            .iter()
            .map(|c| self.container_limit(c))
            .sum();
        let inits = spec
            .init_containers
            .iter()
            .flatten()
            .map(|c| self.container_limit(c))
            .max()
            .unwrap_or(0);
        apps.max(inits)
    }

    /// Admits a pod with what eviction needs to know of it.
    pub fn admit_as(&self, uid: &str, pod: Admitted) -> Result<(), OutOfMemory> {
        let mut charged = self.charged.lock().unwrap_or_else(|e| e.into_inner());
        if charged.contains_key(uid) {
            return Ok(());
        }
        let used: u64 = charged.values().map(|a| a.charge).sum();
        if used.saturating_add(pod.charge) > self.allocatable {
            return Err(OutOfMemory {
                requested: pod.charge,
                used,
                capacity: self.allocatable,
            });
        }
        charged.insert(uid.to_string(), pod);
        Ok(())
    }

    /// The admitted pods, by UID.
    pub fn admitted(&self) -> HashMap<String, Admitted> {
        self.charged
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Pod `uid` is gone: its charge is free again.
    pub fn release(&self, uid: &str) {
        self.charged
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(uid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(limits: &[Option<&str>]) -> Pod {
        let containers: Vec<_> = limits
            .iter()
            .enumerate()
            .map(|(i, l)| match l {
                Some(l) => json!({"name": format!("c{i}"), "image": "x",
                    "resources": {"limits": {"memory": l}}}),
                None => json!({"name": format!("c{i}"), "image": "x"}),
            })
            .collect();
        serde_json::from_value(
            json!({"metadata": {"name": "p"}, "spec": {"containers": containers}}),
        )
        .unwrap()
    }

    #[test]
    fn pods_are_charged_their_limits_or_the_default_and_bounded_by_allocatable() {
        let b = MemoryBudget::new(300 << 20, 64 << 20);
        assert_eq!(b.charge_of(&pod(&[Some("100Mi"), None])), 164 << 20);
        let charged = |charge| Admitted {
            charge,
            qos: "Burstable",
            request: 0,
        };
        b.admit_as("a", charged(164 << 20)).unwrap();
        b.admit_as("a", charged(164 << 20)).unwrap();
        let used: u64 = b.admitted().values().map(|a| a.charge).sum();
        assert_eq!(used, 164 << 20);
        let err = b.admit_as("b", charged(200 << 20)).unwrap_err();
        assert_eq!(err.used, 164 << 20);
        assert!(err
            .to_string()
            .contains("Node didn't have enough resource: memory"));
        b.release("a");
        b.admit_as("b", charged(200 << 20)).unwrap();
    }
}
