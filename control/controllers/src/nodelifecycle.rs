//! The node lifecycle controller: pod address ranges, health from heartbeats, taints and
//! evictions.
//!
//! ## Expected flow
//! - **Ranges.** A node without `spec.podCIDR` gets the next free block of `127.128.0.0/9`,
//!   as the node IPAM controller hands out ranges. Blocks are `/20` by default (4,096 pod
//!   addresses each, for 2,048 nodes); `--node-cidr-mask-size` trades addresses per node
//!   for nodes (`/22`: 1,024 and 8,192; `/24`: 256 and 32,768). A node that finds no free
//!   block gets a `CIDRNotAvailable` event and is looked at again.
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

/// Where every pod range lies.
const POD_RANGES: Ipv4Addr = Ipv4Addr::new(127, 128, 0, 0);
const POD_RANGES_PREFIX: u8 = 9;
/// The per-node mask sizes allowed: a node needs some addresses, and the pool some nodes.
pub const NODE_MASKS: std::ops::RangeInclusive<u8> = 12..=28;

/// How many blocks of `/mask` the pod ranges hold.
fn blocks(mask: u8) -> u32 {
    1 << (mask - POD_RANGES_PREFIX)
}

/// The `/mask` block number `i` of `127.128.0.0/9`.
pub fn pod_cidr(i: u32, mask: u8) -> Option<String> {
    if i >= blocks(mask) {
        return None;
    }
    let base = u32::from(POD_RANGES) + (i << (32 - mask));
    Some(format!("{}/{mask}", Ipv4Addr::from(base)))
}

/// The `/mask` blocks a node's range covers, whatever size it was given (the mask size
/// may have changed since), so that no new range overlaps it.
fn blocks_of(cidr: &str, mask: u8) -> std::ops::Range<u32> {
    let parse = || -> Option<std::ops::Range<u32>> {
        let (ip, prefix) = cidr.split_once('/')?;
        let ip: Ipv4Addr = ip.parse().ok()?;
        let prefix: u8 = prefix.parse().ok().filter(|p| *p <= 32)?;
        let start = u32::from(ip).checked_sub(u32::from(POD_RANGES))?;
        let size = 1u64 << (32 - prefix);
        let end = (u64::from(start) + size - 1).min(u64::from(u32::MAX >> POD_RANGES_PREFIX));
        let shift = 32 - mask;
        Some((start >> shift)..((end as u32) >> shift) + 1)
    };
    parse().unwrap_or(0..0)
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

fn unreachable_taint(node: &Node) -> bool {
    node.spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key == UNREACHABLE))
}

/// The node a renewal of `lease` should wake: only one this controller has to put right
/// (not Ready, or tainted unreachable), or one it has not seen yet. A healthy node's
/// renewal changes nothing here (silence is found by the requeue within the grace
/// period, as kube-controller-manager's monitor finds it on its period), and at 5,000
/// nodes renewals are 500 events a second: waking a reconcile for each was most of the
/// controller manager's idle cost.
pub fn woken_by_lease(ctx: &Ctx, lease: &Lease) -> Option<ObjectRef<Node>> {
    if lease.metadata.namespace.as_deref() != Some("kube-node-lease") {
        return None;
    }
    let node = ObjectRef::new(lease.metadata.name.as_deref()?);
    match ctx.nodes.get(&node) {
        Some(n) if ready_status(&n) == Some("True") && !unreachable_taint(&n) => None,
        _ => Some(node),
    }
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
        let mask = ctx.node_cidr_mask;
        let used: BTreeSet<u32> = ctx
            .nodes
            .state()
            .iter()
            .filter_map(|n| n.spec.as_ref()?.pod_cidr.clone())
            .flat_map(|c| blocks_of(&c, mask))
            .chain(
                ctx.cidrs_given
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                    .copied(),
            )
            .collect();
        let free = (0..blocks(mask))
            .find(|i| !used.contains(i))
            .and_then(|i| pod_cidr(i, mask).map(|c| (i, c)));
        if let Some((i, cidr)) = free {
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
        } else {
            ctx.recorder
                .publish(
                    &kube::Resource::object_ref(node.as_ref(), &()),
                    baton_kube::events::EventType::Normal,
                    "CIDRNotAvailable",
                    &format!(
                        "Node {name} status is now: CIDRNotAvailable (all {} /{mask} ranges \
                         of {POD_RANGES}/{POD_RANGES_PREFIX} are in use; see \
                         --node-cidr-mask-size)",
                        blocks(mask)
                    ),
                )
                .await;
        }
    }
    crate::ttl::reconcile(&node, &ctx)
        .await
        .map_err(err("setting its TTL annotation"))?;
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
    let tainted = unreachable_taint(&node);
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
        assert_eq!(pod_cidr(0, 20).unwrap(), "127.128.0.0/20");
        assert_eq!(pod_cidr(1, 20).unwrap(), "127.128.16.0/20");
        assert_eq!(pod_cidr(2047, 20).unwrap(), "127.255.240.0/20");
        assert!(pod_cidr(2048, 20).is_none());
        assert_eq!(blocks_of("127.128.16.0/20", 20), 1..2);
        // 5,000 nodes fit at /22, with 1,024 addresses each.
        assert_eq!(blocks(22), 8192);
        assert_eq!(pod_cidr(4999, 22).unwrap(), "127.206.28.0/22");
        assert_eq!(pod_cidr(8191, 22).unwrap(), "127.255.252.0/22");
        assert!(pod_cidr(8192, 22).is_none());
        // A range of another size covers every block it overlaps.
        assert_eq!(blocks_of("127.128.16.0/20", 22), 4..8);
        assert_eq!(blocks_of("127.128.20.0/22", 20), 1..2);
        assert_eq!(blocks_of("127.128.0.0/9", 20), 0..2048);
        // Ranges elsewhere, and nonsense, cover nothing.
        assert!(blocks_of("10.0.0.0/24", 20).is_empty());
        assert!(blocks_of("127.128.0.0/99", 20).is_empty());
        assert!(blocks_of("garbage", 20).is_empty());
    }

    fn node(name: &str, cidr: Option<&str>) -> serde_json::Value {
        let mut n = json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "uid": format!("uid-{name}"),
                         "creationTimestamp": pod::now().0.to_rfc3339(),
                         "annotations": {crate::ttl::ANNOTATION: "0"}},
            "spec": {},
        });
        if let Some(c) = cidr {
            n["spec"]["podCIDR"] = json!(c);
        }
        n
    }

    #[tokio::test]
    async fn a_new_node_gets_a_free_block_and_an_event_when_none_is_left() {
        let mut w = crate::fake::World::new();
        // /12 blocks: eight of them. Six are taken, and one more by a smaller range
        // given under another mask size.
        Arc::get_mut(&mut w.ctx).unwrap().node_cidr_mask = 12;
        for i in 0..6 {
            w.node(node(&format!("n{i}"), pod_cidr(i, 12).as_deref()));
        }
        w.node(node("small", Some("127.240.16.0/20")));
        let new = w.node(node("new", None));
        reconcile(new, w.ctx.clone()).await.unwrap();
        let patch = w.api.write_calls().pop().expect("a range was assigned");
        assert_eq!(patch.path, "/api/v1/nodes/new");
        assert_eq!(patch.body["spec"]["podCIDR"], "127.224.0.0/12");
        assert_eq!(w.api.events(), ["Normal RegisteredNode"]);

        w.node(node("new", Some("127.224.0.0/12")));
        let last = w.node(node("last", None));
        let writes = w.api.write_calls().len();
        reconcile(last, w.ctx.clone()).await.unwrap();
        assert_eq!(
            w.api.write_calls().len(),
            writes,
            "no range is left to give"
        );
        assert_eq!(
            w.api.events(),
            ["Normal RegisteredNode", "Normal CIDRNotAvailable"]
        );
    }

    #[tokio::test]
    async fn only_a_node_to_put_right_is_woken_by_its_lease() {
        let mut w = crate::fake::World::new();
        let lease = |name: &str, ns: &str| -> Lease {
            serde_json::from_value(json!({"metadata": {"name": name, "namespace": ns}})).unwrap()
        };
        let ready = |name: &str, taint: bool| {
            let mut n = node(name, Some("127.128.0.0/20"));
            n["status"] = json!({"conditions": [{"type": "Ready", "status": "True"}]});
            if taint {
                n["spec"]["taints"] = json!([{"key": UNREACHABLE, "effect": "NoExecute"}]);
            }
            n
        };
        w.node(ready("healthy", false));
        w.node(ready("tainted", true));
        let mut unknown = ready("unknown", false);
        unknown["status"]["conditions"][0]["status"] = json!("Unknown");
        w.node(unknown);
        let woken = |name: &str| woken_by_lease(&w.ctx, &lease(name, "kube-node-lease"));
        assert_eq!(
            woken("healthy"),
            None,
            "a healthy node's renewal is not an event"
        );
        assert_eq!(woken("tainted"), Some(ObjectRef::new("tainted")));
        assert_eq!(woken("unknown"), Some(ObjectRef::new("unknown")));
        assert_eq!(woken("unseen"), Some(ObjectRef::new("unseen")));
        assert_eq!(
            woken_by_lease(&w.ctx, &lease("unknown", "default")),
            None,
            "only node leases are heartbeats"
        );
    }
}
