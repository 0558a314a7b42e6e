//! Volume binding: where a pod's claims let it go (kube-scheduler's VolumeBinding plugin).
//!
//! - A bound claim's volume may be pinned to nodes (a local volume's required node
//!   affinity): the pod goes only there.
//! - A pending claim of a `WaitForFirstConsumer` class waits for its first pod: the pod is
//!   placed freely, and the node chosen is written on the claim
//!   (`volume.kubernetes.io/selected-node`) for the provisioner to make the volume there.
//!   The node agent starts the pod once the claim is bound.
//! - A pending claim of an `Immediate` class, a missing claim, or one being deleted keeps
//!   the pod unschedulable, with kube-scheduler's message.

use baton_kube::storage::SELECTED_NODE;
use k8s_openapi::api::core::v1::{
    NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, PersistentVolume,
    PersistentVolumeClaim, Pod,
};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

/// What a pod's claims ask of its node.
#[derive(Debug, Default)]
pub struct Claims {
    /// Each must be matched by the node (terms within one are ORed).
    pub node_terms: Vec<NodeSelector>,
    /// Claims that wait for this pod's node.
    pub waiting: Vec<String>,
}

fn pinned_to(node: &str) -> NodeSelector {
    NodeSelector {
        node_selector_terms: vec![NodeSelectorTerm {
            match_expressions: Some(vec![NodeSelectorRequirement {
                key: "kubernetes.io/hostname".into(),
                operator: "In".into(),
                values: Some(vec![node.into()]),
            }]),
            ..Default::default()
        }],
    }
}

/// Reads the pod's claims: `Ok(Err(message))` when they keep it unschedulable.
pub async fn claims(client: &Client, pod: &Pod) -> Result<Result<Claims, String>, kube::Error> {
    let mut out = Claims::default();
    let names: Vec<String> = pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|v| v.persistent_volume_claim.as_ref())
        .map(|c| c.claim_name.clone())
        .collect();
    if names.is_empty() {
        return Ok(Ok(out));
    }
    let ns = pod.namespace().unwrap_or_default();
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);
    for name in names {
        let Some(pvc) = pvcs.get_opt(&name).await? else {
            return Ok(Err(format!("persistentvolumeclaim {name:?} not found")));
        };
        if pvc.metadata.deletion_timestamp.is_some() {
            return Ok(Err(format!(
                "persistentvolumeclaim {name:?} is being deleted"
            )));
        }
        let volume = pvc
            .spec
            .as_ref()
            .and_then(|s| s.volume_name.clone())
            .filter(|v| !v.is_empty());
        if let Some(v) = volume {
            let pvs: Api<PersistentVolume> = Api::all(client.clone());
            if let Some(required) = pvs
                .get_opt(&v)
                .await?
                .and_then(|pv| pv.spec?.node_affinity?.required)
            {
                out.node_terms.push(required);
            }
            continue;
        }
        if let Some(node) = pvc
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(SELECTED_NODE))
        {
            out.node_terms.push(pinned_to(node));
            continue;
        }
        let class = pvc
            .spec
            .as_ref()
            .and_then(|s| s.storage_class_name.clone())
            .unwrap_or_default();
        let waits = if class.is_empty() {
            false
        } else {
            let classes: Api<StorageClass> = Api::all(client.clone());
            classes
                .get_opt(&class)
                .await?
                .and_then(|c| c.volume_binding_mode)
                .as_deref()
                == Some("WaitForFirstConsumer")
        };
        if !waits {
            return Ok(Err(
                "pod has unbound immediate PersistentVolumeClaims".into()
            ));
        }
        out.waiting.push(name);
    }
    Ok(Ok(out))
}

/// Writes the chosen node on the claims that wait for it.
pub async fn select_node(
    client: &Client,
    ns: &str,
    waiting: &[String],
    node: &str,
) -> Result<(), kube::Error> {
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    for name in waiting {
        let patch = json!({"metadata": {"annotations": {SELECTED_NODE: node}}});
        pvcs.patch(name, &PatchParams::default(), &Patch::Merge(patch))
            .await?;
    }
    Ok(())
}
