//! The node lifecycle controller: pod address ranges, health from heartbeats, taints and
//! evictions.
//!
//! ## Expected flow
//! - **Ranges.** A node without `spec.podCIDR` gets the next free `/20` of `127.128.0.0/9`
//!   (4,096 pod addresses, 2,048 nodes), as the node IPAM controller hands out ranges.
//! - **Health.** A node's heartbeat is its Lease in `kube-node-lease`. A node silent for
//!   longer than the grace period turns `Ready=Unknown` (`NodeStatusUnknown`) and gets the
//!   `node.kubernetes.io/unreachable` taints, `NoSchedule` and `NoExecute`. When it
//!   heartbeats again and reports Ready, the taints go.
//! - **Evictions.** A pod on a node with a `NoExecute` taint is deleted once its
//!   toleration of that taint runs out (`tolerationSeconds` after the taint was added), at
//!   once if it does not tolerate it, never if it tolerates it without a limit. Its
//!   ReplicaSet then replaces it on a healthy node.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use baton_kube::{pod, selector};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Taint};
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};
use serde_json::json;

use crate::Ctx;

pub const UNREACHABLE: &str = "node.kubernetes.io/unreachable";

/// Why a node could not be reconciled (it is retried).
#[derive(Debug, thiserror::Error)]
#[error("{action} for node {node}")]
pub struct Error {
    node: String,
    action: &'static str,
    #[source]
    source: kube::Error,
}

/// The `/20` block number `i` of `127.128.0.0/9`.
pub fn pod_cidr(i: u32) -> Option<String> {
    if i >= 2048 {
        return None;
    }
    let base = u32::from(Ipv4Addr::new(127, 128, 0, 0)) + (i << 12);
    Some(format!("{}/20", Ipv4Addr::from(base)))
}

fn block_of(cidr: &str) -> Option<u32> {
    let ip: Ipv4Addr = cidr.split_once('/')?.0.parse().ok()?;
    let off = u32::from(ip).checked_sub(u32::from(Ipv4Addr::new(127, 128, 0, 0)))?;
    Some(off >> 12)
}

fn lease_age(ctx: &Ctx, node: &Node) -> Option<Duration> {
    let lease: Arc<Lease> = ctx
        .leases
        .get(&ObjectRef::new(&node.name_any()).within("kube-node-lease"))?;
    let renewed = lease.spec.as_ref()?.renew_time.as_ref()?;
    Some((pod::now().0 - renewed.0).to_std().unwrap_or_default())
}

fn ready_status(node: &Node) -> Option<&str> {
    node.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.status.as_str())
}

pub async fn reconcile(node: Arc<Node>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let name = node.name_any();
    let api: Api<Node> = Api::all(ctx.client.clone());
    let err = |action: &'static str| {
        let node = name.clone();
        move |source| Error {
            node,
            action,
            source,
        }
    };
    if node
        .spec
        .as_ref()
        .and_then(|s| s.pod_cidr.as_ref())
        .is_none()
    {
        // Serialised by the controller (one reconcile per node at a time) but not across
        // nodes: the lock makes two new nodes pick different blocks.
        let _guard = ctx.cidr_lock.lock().await;
        let used: BTreeSet<u32> = ctx
            .nodes
            .state()
            .iter()
            .filter_map(|n| n.spec.as_ref()?.pod_cidr.as_deref().and_then(block_of))
            .chain(
                ctx.cidrs_given
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                    .copied(),
            )
            .collect();
        if let Some((i, cidr)) = (0..2048)
            .find(|i| !used.contains(i))
            .and_then(|i| pod_cidr(i).map(|c| (i, c)))
        {
            api.patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"podCIDR": cidr, "podCIDRs": [cidr]}})),
            )
            .await
            .map_err(err("assigning a pod range"))?;
            ctx.cidrs_given
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(i);
            ctx.recorder
                .publish(
                    &kube::Resource::object_ref(node.as_ref(), &()),
                    baton_kube::events::EventType::Normal,
                    "RegisteredNode",
                    &format!("Node {name} event: Registered Node {name} in Controller"),
                )
                .await;
        }
    }
    let grace = ctx.node_grace;
    let silent = lease_age(&ctx, &node).is_none_or(|age| age > grace)
        && node
            .metadata
            .creation_timestamp
            .as_ref()
            .is_none_or(|t| (pod::now().0 - t.0).to_std().unwrap_or_default() > grace);
    let taints: Vec<Taint> = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default();
    let tainted = taints.iter().any(|t| t.key == UNREACHABLE);
    if silent {
        if ready_status(&node) != Some("Unknown") {
            let now = pod::now();
            let mut conditions = node
                .status
                .as_ref()
                .and_then(|s| s.conditions.clone())
                .unwrap_or_default();
            for c in conditions.iter_mut() {
                c.status = "Unknown".into();
                c.reason = Some("NodeStatusUnknown".into());
                c.message = Some("Kubelet stopped posting node status.".into());
                c.last_transition_time = Some(now.clone());
            }
            api.patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"conditions": conditions}})),
            )
            .await
            .map_err(err("marking it unknown"))?;
            ctx.recorder
                .publish(
                    &kube::Resource::object_ref(node.as_ref(), &()),
                    baton_kube::events::EventType::Normal,
                    "NodeNotReady",
                    &format!("Node {name} status is now: NodeNotReady"),
                )
                .await;
        }
        if !tainted {
            let mut new = taints.clone();
            for effect in ["NoSchedule", "NoExecute"] {
                new.push(Taint {
                    key: UNREACHABLE.into(),
                    effect: effect.into(),
                    time_added: Some(pod::now()),
                    value: None,
                });
            }
            api.patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"taints": new}})),
            )
            .await
            .map_err(err("tainting it"))?;
        }
    } else if tainted && ready_status(&node) == Some("True") {
        let kept: Vec<&Taint> = taints.iter().filter(|t| t.key != UNREACHABLE).collect();
        api.patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"taints": kept}})),
        )
        .await
        .map_err(err("removing its taints"))?;
    }
    // Evictions under NoExecute taints.
    let mut next: Option<Duration> = None;
    let no_execute: Vec<&Taint> = taints.iter().filter(|t| t.effect == "NoExecute").collect();
    if !no_execute.is_empty() {
        for p in ctx.pods.state() {
            if p.spec.as_ref().and_then(|s| s.node_name.as_deref()) != Some(name.as_str())
                || p.metadata.deletion_timestamp.is_some()
                || pod::is_terminal(&p)
            {
                continue;
            }
            let tolerations = p
                .spec
                .as_ref()
                .and_then(|s| s.tolerations.clone())
                .unwrap_or_default();
            let mut evict_in: Option<Duration> = Some(Duration::ZERO);
            for t in &no_execute {
                let matching: Vec<_> = tolerations
                    .iter()
                    .filter(|tol| selector::tolerates(std::slice::from_ref(tol), t))
                    .collect();
                if matching.is_empty() {
                    evict_in = Some(Duration::ZERO);
                    break;
                }
                let limit = matching
                    .iter()
                    .filter_map(|tol| tol.toleration_seconds)
                    .min();
                let since = t
                    .time_added
                    .as_ref()
                    .map(|ta| (pod::now().0 - ta.0).to_std().unwrap_or_default())
                    .unwrap_or_default();
                evict_in = match (evict_in, limit) {
                    (_, None) => None,
                    (e, Some(s)) => {
                        let left = Duration::from_secs(s.max(0) as u64).saturating_sub(since);
                        Some(e.map_or(left, |e| e.max(left)))
                    }
                };
            }
            match evict_in {
                Some(d) if d.is_zero() => {
                    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> =
                        Api::namespaced(ctx.client.clone(), &p.namespace().unwrap_or_default());
                    match pods.delete(&p.name_any(), &DeleteParams::default()).await {
                        Ok(_)
                        | Err(kube::Error::Api(kube::core::ErrorResponse { code: 404, .. })) => {}
                        Err(e) => return Err(err("evicting a pod")(e)),
                    }
                    ctx.recorder
                        .publish(
                            &kube::Resource::object_ref(p.as_ref(), &()),
                            baton_kube::events::EventType::Normal,
                            "TaintManagerEviction",
                            &format!(
                                "Marking for deletion Pod {}/{}",
                                p.namespace().unwrap_or_default(),
                                p.name_any()
                            ),
                        )
                        .await;
                }
                Some(d) => next = Some(next.map_or(d, |n| n.min(d))),
                None => {}
            }
        }
    }
    // Heartbeats are not events on the node: look again within the grace period.
    let recheck = (grace / 2).max(Duration::from_millis(500));
    Ok(Action::requeue(next.map_or(recheck, |n| n.min(recheck))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_ranges_are_disjoint_blocks() {
        assert_eq!(pod_cidr(0).unwrap(), "127.128.0.0/20");
        assert_eq!(pod_cidr(1).unwrap(), "127.128.16.0/20");
        assert_eq!(pod_cidr(2047).unwrap(), "127.255.240.0/20");
        assert!(pod_cidr(2048).is_none());
        assert_eq!(block_of("127.128.16.0/20"), Some(1));
    }
}
