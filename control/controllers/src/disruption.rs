//! The disruption controller: keeps each PodDisruptionBudget's status true to its pods,
//! as kube-controller-manager's does, so that the API server's eviction subresource can
//! decide from it.
//!
//! For a budget it counts the pods its selector picks in its namespace:
//! - `expectedPods`: the pods that should exist. With a plain `minAvailable` number it is
//!   the pods found; with a percentage or `maxUnavailable`, the replicas their
//!   controllers (ReplicaSets, ReplicationControllers, Jobs' parallelism) ask for, as
//!   Kubernetes takes the scale from the owners.
//! - `currentHealthy`: Ready pods that are not being deleted and were not just evicted.
//! - `desiredHealthy`: `minAvailable` (a percentage rounded up), or expected minus
//!   `maxUnavailable` (rounded up too, so a budget errs on the side of availability).
//! - `disruptionsAllowed`: current minus desired, never below zero.
//!
//! `disruptedPods` holds the pods evicted but not yet gone: they count as unhealthy
//! until they disappear, or for two minutes, after which the eviction is taken to have
//! failed (kube's DeletionTimeout).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::chrono::{DateTime, Utc};
use kube::api::{Api, Patch, PatchParams};
use kube::core::SelectorExt;
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::ResourceExt;
use serde_json::json;

use crate::Ctx;

/// Why a budget's status could not be written (it is retried).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("updating the status of PodDisruptionBudget {name}")]
    Status {
        name: String,
        #[source]
        source: kube::Error,
    },
}

/// How long an evicted pod counts as disrupted while it is still there.
const DELETION_TIMEOUT: Duration = Duration::from_secs(120);

/// The budgets whose selector picks `pod`: what a pod's change wakes.
pub fn budgets_of_pod(ctx: &Ctx, pod: &Pod) -> Vec<ObjectRef<PodDisruptionBudget>> {
    let ns = pod.namespace().unwrap_or_default();
    ctx.pdbs
        .state()
        .iter()
        .filter(|b| b.namespace().as_deref() == Some(ns.as_str()) && selects(b, pod))
        .map(|b| ObjectRef::from_obj(b.as_ref()))
        .collect()
}

fn selects(b: &PodDisruptionBudget, pod: &Pod) -> bool {
    let Some(sel) = b.spec.as_ref().and_then(|s| s.selector.clone()) else {
        return false;
    };
    let Ok(sel) = kube::core::Selector::try_from(sel) else {
        return false;
    };
    let empty = BTreeMap::new();
    sel.matches(pod.metadata.labels.as_ref().unwrap_or(&empty))
}

/// `n` or `p%` of `total`, rounded up.
fn scaled(v: &IntOrString, total: i32) -> i32 {
    match v {
        IntOrString::Int(n) => *n,
        IntOrString::String(p) => {
            let pct: i64 = p.trim_end_matches('%').parse().unwrap_or(0);
            ((pct * i64::from(total) + 99) / 100) as i32
        }
    }
}

/// The replicas the pods' controllers ask for, each controller counted once; a pod
/// without a known controller counts as itself.
fn expected_from_owners(ctx: &Ctx, pods: &[Arc<Pod>]) -> i32 {
    let mut seen = Vec::new();
    let mut total = 0;
    for p in pods {
        let owner = p
            .owner_references()
            .iter()
            .find(|o| o.controller == Some(true))
            .cloned();
        let Some(o) = owner else {
            total += 1;
            continue;
        };
        if seen.contains(&o.uid) {
            continue;
        }
        seen.push(o.uid.clone());
        let replicas = match o.kind.as_str() {
            "ReplicaSet" => ctx
                .replicasets
                .state()
                .iter()
                .find(|r| r.uid().as_deref() == Some(o.uid.as_str()))
                .and_then(|r| r.spec.as_ref().and_then(|s| s.replicas)),
            "ReplicationController" => ctx
                .replicationcontrollers
                .state()
                .iter()
                .find(|r| r.uid().as_deref() == Some(o.uid.as_str()))
                .and_then(|r| r.spec.as_ref().and_then(|s| s.replicas)),
            "Job" => ctx
                .jobs
                .state()
                .iter()
                .find(|j| j.uid().as_deref() == Some(o.uid.as_str()))
                .and_then(|j| j.spec.as_ref().and_then(|s| s.parallelism)),
            _ => None,
        };
        total += replicas.unwrap_or(1);
    }
    total
}

fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    s.parse().ok()
}

pub async fn reconcile(pdb: Arc<PodDisruptionBudget>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let ns = pdb.namespace().unwrap_or_default();
    let name = pdb.name_any();
    if pdb.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let spec = pdb.spec.clone().unwrap_or_default();
    let pods: Vec<Arc<Pod>> = ctx
        .pods
        .state()
        .into_iter()
        .filter(|p| p.namespace().as_deref() == Some(ns.as_str()) && selects(&pdb, p))
        .filter(|p| !baton_kube::pod::is_terminal(p))
        .collect();
    let now = Utc::now();
    // Evictions still in flight: the pod is there, and the eviction is recent.
    let disrupted: BTreeMap<String, String> = pdb
        .status
        .as_ref()
        .and_then(|s| s.disrupted_pods.clone())
        .unwrap_or_default()
        .into_iter()
        .filter(|(pod, at)| {
            let recent = (now - at.0).to_std().unwrap_or_default() < DELETION_TIMEOUT;
            recent
                && pods
                    .iter()
                    .any(|p| p.name_any() == *pod && p.metadata.deletion_timestamp.is_none())
        })
        .map(|(pod, at)| (pod, at.0.to_rfc3339()))
        .collect();
    let healthy = pods
        .iter()
        .filter(|p| {
            p.metadata.deletion_timestamp.is_none()
                && !disrupted.contains_key(&p.name_any())
                && baton_kube::pod::is_ready(p)
        })
        .count() as i32;
    let (expected, desired) = match (&spec.min_available, &spec.max_unavailable) {
        (Some(IntOrString::Int(n)), _) => (pods.len() as i32, *n),
        (Some(pct), _) => {
            let expected = expected_from_owners(&ctx, &pods);
            (expected, scaled(pct, expected))
        }
        (None, Some(max)) => {
            let expected = expected_from_owners(&ctx, &pods);
            (expected, (expected - scaled(max, expected)).max(0))
        }
        // Neither: kube defaults to minAvailable 1.
        (None, None) => (pods.len() as i32, 1),
    };
    let allowed = (healthy - desired).max(0);
    let generation = pdb.metadata.generation.unwrap_or(0);
    let (reason, status, message) = if allowed > 0 {
        ("SufficientPods", "True", "")
    } else {
        ("InsufficientPods", "False", "")
    };
    let old_cond = pdb
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "DisruptionAllowed"))
        .cloned();
    let since = match &old_cond {
        Some(c) if c.status == status => c.last_transition_time.0.to_rfc3339(),
        _ => now.to_rfc3339(),
    };
    let new_status = json!({
        "observedGeneration": generation,
        "expectedPods": expected,
        "currentHealthy": healthy,
        "desiredHealthy": desired,
        "disruptionsAllowed": allowed,
        "disruptedPods": disrupted,
        "conditions": [{
            "type": "DisruptionAllowed", "status": status, "reason": reason, "message": message,
            "observedGeneration": generation, "lastTransitionTime": since,
        }],
    });
    let current = pdb
        .status
        .as_ref()
        .map(|s| serde_json::to_value(s).unwrap_or_default());
    let differs = current.as_ref().is_none_or(|c| {
        [
            "observedGeneration",
            "expectedPods",
            "currentHealthy",
            "desiredHealthy",
            "disruptionsAllowed",
        ]
        .iter()
        .any(|k| c.get(*k) != new_status.get(*k))
            || c.get("disruptedPods").cloned().unwrap_or(json!({})) != new_status["disruptedPods"]
            || old_cond.as_ref().map(|c| c.status.as_str()) != Some(status)
    });
    if differs {
        // A merge patch keeps map keys it does not name: gone evictions are nulled out.
        let mut patch = new_status.clone();
        if let Some(old) = current
            .as_ref()
            .and_then(|c| c.get("disruptedPods"))
            .and_then(|d| d.as_object())
        {
            for pod in old.keys() {
                if !disrupted.contains_key(pod) {
                    patch["disruptedPods"][pod] = serde_json::Value::Null;
                }
            }
        }
        let api: Api<PodDisruptionBudget> = Api::namespaced(ctx.client.clone(), &ns);
        api.patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": patch})),
        )
        .await
        .map_err(|source| Error::Status {
            name: name.clone(),
            source,
        })?;
    }
    // An in-flight eviction expires on its own: look again when the first one would.
    let next = disrupted
        .values()
        .filter_map(|at| parse_time(at))
        .map(|at| DELETION_TIMEOUT.saturating_sub((now - at).to_std().unwrap_or_default()))
        .min()
        .unwrap_or(Duration::from_secs(300));
    Ok(Action::requeue(next.max(Duration::from_secs(1))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentages_round_up_as_kubernetes_does() {
        assert_eq!(scaled(&IntOrString::String("50%".into()), 3), 2);
        assert_eq!(scaled(&IntOrString::String("100%".into()), 3), 3);
        assert_eq!(scaled(&IntOrString::String("0%".into()), 3), 0);
        assert_eq!(scaled(&IntOrString::Int(2), 3), 2);
    }
}
