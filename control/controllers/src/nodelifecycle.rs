//! The node lifecycle controller: pod address ranges, health from heartbeats, taints and
//! evictions.
//!
//! ## Expected flow
//! - **Ranges.** A node without `spec.podCIDR` gets a free block of `127.128.0.0/9`,
//!   chosen in memory by [`crate::podranges`], as the node IPAM controller hands out
//!   ranges. Blocks are `/20` by default (4,096 pod addresses each, for 2,048 nodes);
//!   `--node-cidr-mask-size` trades addresses per node for nodes (`/22`: 1,024 and
//!   8,192; `/24`: 256 and 32,768). A node that finds no free block gets a
//!   `CIDRNotAvailable` event and is looked at again. Its TTL annotation ([`crate::ttl`])
//!   goes in the same write.
//! - **Health.** A node's heartbeat is its Lease in `kube-node-lease`. A node silent for
//!   longer than the grace period turns `Ready=Unknown` (`NodeStatusUnknown`) and gets the
//!   `node.kubernetes.io/unreachable` taints, `NoSchedule` and `NoExecute`. When it
//!   heartbeats again and reports Ready, the taints go.
//! - **Evictions.** A pod on a node with a `NoExecute` taint is deleted once its
//!   toleration of that taint runs out (`tolerationSeconds` after the taint was added), at
//!   once if it does not tolerate it, never if it tolerates it without a limit. Its
//!   ReplicaSet then replaces it on a healthy node.

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

use crate::podranges::{blocks, POD_RANGES, POD_RANGES_PREFIX};
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
    // The pod range and the TTL annotation, in one write. The range is chosen in memory
    // (see `podranges`), so nodes that join together are not written one at a time.
    let mask = ctx.node_cidr_mask;
    let mut patch = serde_json::Map::new();
    let mut registered = false;
    if node
        .spec
        .as_ref()
        .and_then(|s| s.pod_cidr.as_ref())
        .is_none()
    {
        match ctx.pod_ranges.reserve(&name, mask, || ctx.nodes.state()) {
            Some(cidr) => {
                patch.insert("spec".into(), json!({"podCIDR": cidr, "podCIDRs": [cidr]}));
                registered = true;
            }
            None => {
                ctx.recorder.publish(
                    &kube::Resource::object_ref(node.as_ref(), &()),
                    baton_kube::events::EventType::Normal,
                    "CIDRNotAvailable",
                    &format!(
                        "Node {name} status is now: CIDRNotAvailable (all {} /{mask} \
                             ranges of {POD_RANGES}/{POD_RANGES_PREFIX} are in use; see \
                             --node-cidr-mask-size)",
                        blocks(mask)
                    ),
                );
            }
        }
    } else {
        ctx.pod_ranges.note(&node, mask);
    }
    if let Some(ttl) = crate::ttl::wanted(&node, &ctx) {
        patch.insert(
            "metadata".into(),
            json!({"annotations": {crate::ttl::ANNOTATION: ttl}}),
        );
    }
    if !patch.is_empty() {
        api.patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(serde_json::Value::Object(patch)),
        )
        .await
        .map_err(err("assigning its pod range and TTL"))?;
    }
    if registered {
        ctx.recorder.publish(
            &kube::Resource::object_ref(node.as_ref(), &()),
            baton_kube::events::EventType::Normal,
            "RegisteredNode",
            &format!("Node {name} event: Registered Node {name} in Controller"),
        );
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
            ctx.recorder.publish(
                &kube::Resource::object_ref(node.as_ref(), &()),
                baton_kube::events::EventType::Normal,
                "NodeNotReady",
                &format!("Node {name} status is now: NodeNotReady"),
            );
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
                    ctx.recorder.publish(
                        &kube::Resource::object_ref(p.as_ref(), &()),
                        baton_kube::events::EventType::Normal,
                        "TaintManagerEviction",
                        &format!(
                            "Marking for deletion Pod {}/{}",
                            p.namespace().unwrap_or_default(),
                            p.name_any()
                        ),
                    );
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
            w.node(node(
                &format!("n{i}"),
                crate::podranges::pod_cidr(i, 12).as_deref(),
            ));
        }
        w.node(node("small", Some("127.240.16.0/20")));
        let new = w.node(node("new", None));
        reconcile(new, w.ctx.clone()).await.unwrap();
        let patch = w.api.write_calls().pop().expect("a range was assigned");
        assert_eq!(patch.path, "/api/v1/nodes/new");
        assert_eq!(patch.body["spec"]["podCIDR"], "127.224.0.0/12");
        assert_eq!(w.events().await, ["Normal RegisteredNode"]);

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
            w.events().await,
            ["Normal RegisteredNode", "Normal CIDRNotAvailable"]
        );
    }

    #[tokio::test]
    async fn a_joining_node_gets_its_range_and_its_ttl_in_one_write() {
        let mut w = crate::fake::World::new();
        let mut fresh = node("fresh", None);
        fresh["metadata"]["annotations"] = json!({});
        let fresh = w.node(fresh);
        reconcile(fresh, w.ctx.clone()).await.unwrap();
        let writes = w.api.write_calls();
        let patches: Vec<_> = writes
            .iter()
            .filter(|c| c.path == "/api/v1/nodes/fresh")
            .collect();
        assert_eq!(patches.len(), 1, "{writes:?}");
        assert_eq!(patches[0].body["spec"]["podCIDR"], "127.128.0.0/20");
        assert_eq!(
            patches[0].body["metadata"]["annotations"][crate::ttl::ANNOTATION],
            "0"
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
