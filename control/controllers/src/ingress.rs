//! The Ingress status controller: an Ingress of Baton's class is served by every Ready
//! node, so its `status.loadBalancer.ingress` lists those nodes' addresses, which
//! `kubectl get ingress` shows as ADDRESS. A TLS Secret it names that does not exist is
//! told in a Warning event: the nodes serve that Secret's hosts over HTTP only until it
//! does.

use std::sync::Arc;
use std::time::Duration;

use baton_kube::events::EventType;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

use crate::Ctx;

/// How often a missing TLS Secret is looked for again.
const SECRET_RECHECK: Duration = Duration::from_secs(30);

/// Why an Ingress could not be reconciled (it is retried).
#[derive(Debug, thiserror::Error)]
#[error("{action} for ingress {ingress}")]
pub struct Error {
    ingress: String,
    action: &'static str,
    #[source]
    source: kube::Error,
}

/// A node's InternalIP, if the node is Ready: what an Ingress lists for it.
fn ready_address(n: &Node) -> Option<String> {
    let status = n.status.as_ref()?;
    let ready = status
        .conditions
        .as_ref()
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    if !ready {
        return None;
    }
    status
        .addresses
        .as_ref()?
        .iter()
        .find(|a| a.type_ == "InternalIP")
        .map(|a| a.address.clone())
}

/// The InternalIPs of the Ready nodes, sorted, each once.
fn node_addresses(ctx: &Ctx) -> Vec<String> {
    let mut ips: Vec<String> = ctx
        .nodes
        .state()
        .iter()
        .filter_map(|n| ready_address(n))
        .collect();
    ips.sort();
    ips.dedup();
    ips
}

pub async fn reconcile(ing: Arc<Ingress>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let classes: Vec<IngressClass> = ctx
        .ingressclasses
        .state()
        .iter()
        .map(|c| (**c).clone())
        .collect();
    if !baton_kube::ingress::is_ours(&ing, &classes) || ing.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let ns = ing.namespace().unwrap_or_default();
    let name = ing.name_any();
    let err = |action: &'static str| {
        let ingress = format!("{ns}/{name}");
        move |source| Error {
            ingress,
            action,
            source,
        }
    };
    let want: Vec<serde_json::Value> = node_addresses(&ctx)
        .into_iter()
        .map(|ip| json!({"ip": ip}))
        .collect();
    let have = ing
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .map(|list| serde_json::to_value(list).unwrap_or_default())
        .unwrap_or_else(|| json!([]));
    if have != json!(want) {
        let api: Api<Ingress> = Api::namespaced(ctx.client.clone(), &ns);
        let patch = json!({"status": {"loadBalancer": {"ingress": want}}});
        match api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(patch))
            .await
        {
            Ok(_) | Err(kube::Error::Api(kube::core::ErrorResponse { code: 404, .. })) => {}
            Err(e) => return Err(err("writing its status")(e)),
        }
    }
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let mut missing = false;
    for t in ing.spec.iter().flat_map(|s| s.tls.iter().flatten()) {
        let Some(secret) = &t.secret_name else {
            continue;
        };
        if secrets
            .get_metadata_opt(secret)
            .await
            .map_err(err("reading a TLS secret"))?
            .is_none()
        {
            missing = true;
            let hosts = t.hosts.clone().unwrap_or_default().join(", ");
            ctx.recorder
                .publish(
                    &ing.object_ref(&()),
                    EventType::Warning,
                    "TLSSecretNotFound",
                    &format!(
                        "Secret {ns}/{secret} named in spec.tls does not exist: {hosts} served over HTTP only"
                    ),
                );
        }
    }
    Ok(if missing {
        Action::requeue(SECRET_RECHECK)
    } else {
        Action::await_change()
    })
}

/// Every Ingress, when a node changes (its address or readiness moves every status).
pub fn all_ingresses(ctx: &Ctx) -> Vec<ObjectRef<Ingress>> {
    ctx.ingresses
        .state()
        .iter()
        .map(|i| ObjectRef::from_obj(i.as_ref()))
        .collect()
}

/// Every Ingress when a node's part in their addresses changed: it became Ready or not,
/// changed its InternalIP, or is gone. Nothing when a node change left that as it was,
/// as most node changes (status heartbeats) do. Only the changed node is looked at: at
/// 5,000 nodes, listing them all on each of their status updates was the control
/// plane's largest cost.
pub fn on_node_change(ctx: &Ctx, node: &Node) -> Vec<ObjectRef<Ingress>> {
    let name = node.name_any();
    let gone = ctx.nodes.get(&ObjectRef::new(&name)).is_none();
    let now = if gone { None } else { ready_address(node) };
    let changed = {
        let mut known = ctx
            .ingress_addresses
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match now {
            Some(ip) => known.insert(name, ip.clone()).as_ref() != Some(&ip),
            None => known.remove(&name).is_some(),
        }
    };
    if changed {
        all_ingresses(ctx)
    } else {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(name: &str, ip: &str, ready: bool) -> serde_json::Value {
        json!({
            "apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
            "status": {
                "addresses": [{"type": "InternalIP", "address": ip}],
                "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]
            }
        })
    }

    #[tokio::test]
    async fn only_a_change_in_a_nodes_address_or_readiness_moves_the_ingresses() {
        let mut w = crate::fake::World::new();
        w.ingress(json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
            "metadata": {"name": "web", "namespace": "default"}
        }));
        let change = |w: &mut crate::fake::World, v: serde_json::Value| {
            let n = w.node(v);
            on_node_change(&w.ctx, &n).len()
        };
        assert_eq!(
            change(&mut w, node("a", "10.0.0.1", true)),
            1,
            "a new Ready node"
        );
        assert_eq!(
            change(&mut w, node("a", "10.0.0.1", true)),
            0,
            "a heartbeat"
        );
        assert_eq!(change(&mut w, node("b", "10.0.0.2", false)), 0, "not Ready");
        assert_eq!(change(&mut w, node("b", "10.0.0.2", true)), 1, "Ready now");
        assert_eq!(
            change(&mut w, node("a", "10.0.0.9", true)),
            1,
            "a new address"
        );
        assert_eq!(
            change(&mut w, node("a", "10.0.0.9", false)),
            1,
            "no longer Ready"
        );
        assert_eq!(node_addresses(&w.ctx), ["10.0.0.2"]);
        w.node_gone(node("b", "10.0.0.2", true));
        let gone: Node = serde_json::from_value(node("b", "10.0.0.2", true)).unwrap();
        assert_eq!(on_node_change(&w.ctx, &gone).len(), 1, "deleted");
        assert!(w.ctx.ingress_addresses.lock().unwrap().is_empty());
    }
}
