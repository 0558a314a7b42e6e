//! The Ingress status controller: an Ingress of Baton's class is served by every Ready
//! node, so its `status.loadBalancer.ingress` lists those nodes' addresses, which
//! `kubectl get ingress` shows as ADDRESS. A TLS Secret it names that does not exist is
//! told in a Warning event: the nodes serve that Secret's hosts over HTTP only until it
//! does.

use std::sync::Arc;
use std::time::Duration;

use baton_kube::events::EventType;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
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

/// The InternalIPs of the Ready nodes, sorted, each once.
fn node_addresses(ctx: &Ctx) -> Vec<String> {
    let mut ips: Vec<String> = ctx
        .nodes
        .state()
        .iter()
        .filter(|n| {
            n.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .filter_map(|n| {
            n.status
                .as_ref()?
                .addresses
                .as_ref()?
                .iter()
                .find(|a| a.type_ == "InternalIP")
                .map(|a| a.address.clone())
        })
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
                )
                .await;
        }
    }
    Ok(if missing {
        Action::requeue(SECRET_RECHECK)
    } else {
        Action::await_change()
    })
}

/// Every Ingress, when a node changes (its address or readiness moves every status).
pub fn all_ingresses(ctx: &Ctx) -> Vec<kube::runtime::reflector::ObjectRef<Ingress>> {
    ctx.ingresses
        .state()
        .iter()
        .map(|i| kube::runtime::reflector::ObjectRef::from_obj(i.as_ref()))
        .collect()
}

/// Every Ingress when the Ready nodes' addresses changed; nothing when a node change left
/// them as they were (most are heartbeats).
pub fn on_node_change(ctx: &Ctx) -> Vec<kube::runtime::reflector::ObjectRef<Ingress>> {
    let now = node_addresses(ctx);
    let mut last = ctx
        .ingress_addresses
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if *last == now {
        return Vec::new();
    }
    *last = now;
    all_ingresses(ctx)
}
