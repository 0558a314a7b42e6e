//! PersistentVolume binding and the local provisioner.
//!
//! kube-controller-manager binds claims to volumes; a provisioner makes volumes for
//! claims of its StorageClass. Baton has both here, with one built-in provisioner,
//! `baton.dev/local` (k3s's local-path, in the controller manager): a volume is a
//! directory in the local volume directory of one node.
//!
//! ## Expected flow
//! - A pending claim that names a volume, or that an Available volume fits (same class,
//!   enough capacity, the access modes asked), is bound to it: the volume's `claimRef`
//!   and phase `Bound`, then the claim's `volumeName`, phase, capacity and access modes.
//! - A pending claim of a `baton.dev/local` class gets a new volume `pvc-<claim uid>`
//!   with the path `/baton-local/pvc-<claim uid>` and a required node affinity on the
//!   node: with `WaitForFirstConsumer` (the `local` class), the node the scheduler picked
//!   for the claim's first pod (`volume.kubernetes.io/selected-node`); with `Immediate`,
//!   the first Ready node.
//! - A claim being deleted keeps its `kubernetes.io/pvc-protection` finalizer while a pod
//!   that has not finished uses it, so its volume is never taken from a running pod.
//! - A bound volume whose claim is gone is deleted under the `Delete` reclaim policy (its
//!   directory stays on the node until the node cleans it), or marked `Released` under
//!   `Retain`.

use std::sync::Arc;
use std::time::Duration;

use baton_kube::events::EventType;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

use baton_kube::storage::{
    CLAIM_PROTECTION, LOCAL_PROVISIONER, LOCAL_VOLUME_PREFIX, SELECTED_NODE,
};

use crate::Ctx;

/// Why a claim or a volume could not be reconciled (it is retried).
#[derive(Debug, thiserror::Error)]
#[error("{action} for {object}")]
pub struct Error {
    object: String,
    action: &'static str,
    #[source]
    source: kube::Error,
}

fn storage(q: Option<&Quantity>) -> u128 {
    q.and_then(|q| baton_kube::quantity::nanos(&q.0).ok())
        .unwrap_or(0)
}

fn class_of_claim(c: &PersistentVolumeClaim) -> String {
    c.spec
        .as_ref()
        .and_then(|s| s.storage_class_name.clone())
        .unwrap_or_default()
}

fn request_of(c: &PersistentVolumeClaim) -> Option<Quantity> {
    c.spec
        .as_ref()?
        .resources
        .as_ref()?
        .requests
        .as_ref()?
        .get("storage")
        .cloned()
}

/// Whether volume `v` can serve claim `c`.
fn fits(v: &PersistentVolume, c: &PersistentVolumeClaim) -> bool {
    let vs = v.spec.clone().unwrap_or_default();
    let free = v.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Available")
        && vs.claim_ref.is_none();
    let class = vs.storage_class_name.unwrap_or_default() == class_of_claim(c);
    let size = storage(vs.capacity.as_ref().and_then(|c| c.get("storage")))
        >= storage(request_of(c).as_ref());
    let modes = c
        .spec
        .as_ref()
        .and_then(|s| s.access_modes.clone())
        .unwrap_or_default()
        .iter()
        .all(|m| vs.access_modes.iter().flatten().any(|x| x == m));
    free && class && size && modes
}

pub async fn reconcile_claim(
    claim: Arc<PersistentVolumeClaim>,
    ctx: Arc<Ctx>,
) -> Result<Action, Error> {
    let ns = claim.namespace().unwrap_or_default();
    let name = claim.name_any();
    let err = |action: &'static str| {
        let object = format!("persistentvolumeclaim {ns}/{name}");
        move |source| Error {
            object,
            action,
            source,
        }
    };
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
    if claim.metadata.deletion_timestamp.is_some() {
        let protected = claim
            .metadata
            .finalizers
            .iter()
            .flatten()
            .any(|f| f == CLAIM_PROTECTION);
        if protected && !in_use(&ctx, &ns, &name) {
            let rest: Vec<&String> = claim
                .metadata
                .finalizers
                .iter()
                .flatten()
                .filter(|f| *f != CLAIM_PROTECTION)
                .collect();
            let patch = json!({"metadata": {"finalizers": rest,
                "resourceVersion": claim.metadata.resource_version}});
            match claims
                .patch(&name, &PatchParams::default(), &Patch::Merge(patch))
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
                Err(e) => return Err(err("lifting its protection")(e)),
            }
        }
        return Ok(Action::await_change());
    }
    let phase = claim.status.as_ref().and_then(|s| s.phase.as_deref());
    if phase == Some("Bound") {
        return Ok(Action::await_change());
    }
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    let uid = claim.uid().unwrap_or_default();
    let named = claim
        .spec
        .as_ref()
        .and_then(|s| s.volume_name.clone())
        .filter(|n| !n.is_empty());
    let volumes = ctx.pvs.state();
    let mine = |v: &PersistentVolume| {
        v.spec
            .as_ref()
            .and_then(|s| s.claim_ref.as_ref())
            .is_some_and(|r| r.uid.as_deref() == Some(uid.as_str()))
    };
    // A volume already ours (made or bound on an earlier pass), named, or one that fits.
    let mut volume = volumes
        .iter()
        .find(|v| mine(v))
        .or_else(|| match &named {
            Some(n) => volumes.iter().find(|v| v.name_any() == *n),
            None => {
                let mut fitting: Vec<&Arc<PersistentVolume>> =
                    volumes.iter().filter(|v| fits(v, &claim)).collect();
                fitting.sort_by_key(|v| {
                    storage(
                        v.spec
                            .as_ref()
                            .and_then(|s| s.capacity.as_ref()?.get("storage")),
                    )
                });
                fitting.first().copied()
            }
        })
        .map(|v| (**v).clone());

    if volume.is_none() && named.is_none() {
        let class_name = class_of_claim(&claim);
        let Some(class) = ctx
            .storageclasses
            .state()
            .into_iter()
            .find(|c| c.name_any() == class_name)
        else {
            return Ok(Action::await_change());
        };
        if class.provisioner != LOCAL_PROVISIONER {
            return Ok(Action::await_change());
        }
        let waits = class.volume_binding_mode.as_deref() == Some("WaitForFirstConsumer");
        let selected = claim
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(SELECTED_NODE))
            .cloned();
        let node = match selected {
            Some(n) => n,
            None if waits => {
                ctx.recorder.publish(
                    &claim.object_ref(&()),
                    EventType::Normal,
                    "WaitForFirstConsumer",
                    "waiting for first consumer to be created before binding",
                );
                return Ok(Action::await_change());
            }
            None => {
                let mut ready: Vec<String> = ctx
                    .nodes
                    .state()
                    .iter()
                    .filter(|n| {
                        n.status
                            .as_ref()
                            .and_then(|s| s.conditions.as_ref())
                            .is_some_and(|c| {
                                c.iter().any(|c| c.type_ == "Ready" && c.status == "True")
                            })
                    })
                    .map(|n| n.name_any())
                    .collect();
                ready.sort();
                match ready.into_iter().next() {
                    Some(n) => n,
                    None => return Ok(Action::requeue(Duration::from_secs(5))),
                }
            }
        };
        let pv_name = format!("pvc-{uid}");
        let pv: PersistentVolume = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": pv_name,
                "annotations": {"pv.kubernetes.io/provisioned-by": LOCAL_PROVISIONER}},
            "spec": {
                "capacity": {"storage": request_of(&claim).map(|q| q.0).unwrap_or_else(|| "0".into())},
                "accessModes": claim.spec.as_ref().and_then(|s| s.access_modes.clone()),
                "persistentVolumeReclaimPolicy": class.reclaim_policy.clone().unwrap_or_else(|| "Delete".into()),
                "storageClassName": class_name,
                "volumeMode": "Filesystem",
                "local": {"path": format!("{LOCAL_VOLUME_PREFIX}{pv_name}")},
                "claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                             "namespace": ns, "name": name, "uid": uid},
                "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                    {"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}]}]}}
            }
        }))
        .unwrap_or_default();
        let made = match pvs.create(&PostParams::default(), &pv).await {
            Ok(v) => v,
            Err(kube::Error::Api(e)) if e.code == 409 => {
                pvs.get(&pv_name).await.map_err(err("reading its volume"))?
            }
            Err(e) => return Err(err("provisioning a volume")(e)),
        };
        ctx.recorder.publish(
            &claim.object_ref(&()),
            EventType::Normal,
            "ProvisioningSucceeded",
            &format!("Successfully provisioned volume {pv_name} on node {node}"),
        );
        volume = Some(made);
    }
    let Some(volume) = volume else {
        return Ok(Action::await_change());
    };
    let pv_name = volume.name_any();
    // The volume first: a claim is never bound to a volume that does not name it.
    if !mine(&volume) {
        let patch = json!({"spec": {"claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "namespace": ns, "name": name, "uid": uid}}});
        pvs.patch(&pv_name, &PatchParams::default(), &Patch::Merge(patch))
            .await
            .map_err(err("binding its volume"))?;
    }
    if volume.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Bound") {
        pvs.patch_status(
            &pv_name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Bound"}})),
        )
        .await
        .map_err(err("marking its volume bound"))?;
    }
    if named.as_deref() != Some(pv_name.as_str()) {
        claims
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({
                    "metadata": {"annotations": {"pv.kubernetes.io/bind-completed": "yes"}},
                    "spec": {"volumeName": pv_name}})),
            )
            .await
            .map_err(err("naming its volume"))?;
    }
    let vs = volume.spec.unwrap_or_default();
    claims
        .patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Bound",
                "capacity": vs.capacity, "accessModes": vs.access_modes}})),
        )
        .await
        .map_err(err("marking it bound"))?;
    Ok(Action::await_change())
}

pub async fn reconcile_volume(pv: Arc<PersistentVolume>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let name = pv.name_any();
    let err = |action: &'static str| {
        let object = format!("persistentvolume {name}");
        move |source| Error {
            object,
            action,
            source,
        }
    };
    if pv.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    let spec = pv.spec.clone().unwrap_or_default();
    let phase = pv.status.as_ref().and_then(|s| s.phase.clone());
    let Some(claim_ref) = spec.claim_ref.clone() else {
        if phase.as_deref() != Some("Available") {
            pvs.patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"phase": "Available"}})),
            )
            .await
            .map_err(err("marking it available"))?;
        }
        return Ok(Action::await_change());
    };
    let ns = claim_ref.namespace.clone().unwrap_or_default();
    let claim_name = claim_ref.name.clone().unwrap_or_default();
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
    // Read live: a claim just made may not be in the store yet, and deleting a volume on
    // a stale read would lose its data.
    let claim = claims
        .get_opt(&claim_name)
        .await
        .map_err(err("reading its claim"))?;
    let gone = match &claim {
        None => true,
        Some(c) => claim_ref.uid.is_some() && c.metadata.uid != claim_ref.uid,
    };
    if !gone {
        return Ok(Action::await_change());
    }
    match spec.persistent_volume_reclaim_policy.as_deref() {
        Some("Delete") => {
            crate::delete_if_present(&pvs, &name, &DeleteParams::background())
                .await
                .map_err(err("deleting a released volume"))?;
        }
        _ if phase.as_deref() != Some("Released") => {
            pvs.patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"phase": "Released"}})),
            )
            .await
            .map_err(err("marking it released"))?;
        }
        _ => {}
    }
    Ok(Action::await_change())
}

/// Whether a pod that has not finished uses claim `name` of `ns`.
fn in_use(ctx: &Ctx, ns: &str, name: &str) -> bool {
    ctx.pods.state().iter().any(|p| {
        p.metadata.namespace.as_deref() == Some(ns)
            && !baton_kube::pod::is_terminal(p)
            && claims_of(p).any(|c| c == name)
    })
}

fn claims_of(p: &Pod) -> impl Iterator<Item = &str> {
    p.spec
        .as_ref()
        .and_then(|s| s.volumes.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|v| v.persistent_volume_claim.as_ref())
        .map(|c| c.claim_name.as_str())
}

/// The claims a pod uses: a pod that goes may free a claim being deleted.
pub fn claims_of_pod(p: &Pod) -> Vec<ObjectRef<PersistentVolumeClaim>> {
    let ns = p.metadata.namespace.clone().unwrap_or_default();
    claims_of(p)
        .map(|c| ObjectRef::new(c).within(&ns))
        .collect()
}

/// The volume of a claim that changed (a deleted claim releases its volume).
pub fn volume_of_claim(c: &PersistentVolumeClaim) -> Option<ObjectRef<PersistentVolume>> {
    let name = c.spec.as_ref()?.volume_name.clone()?;
    Some(ObjectRef::new(&name))
}

/// The claim a volume names (a new volume may be the one it waits for).
pub fn claim_of_volume(v: &PersistentVolume) -> Option<ObjectRef<PersistentVolumeClaim>> {
    let r = v.spec.as_ref()?.claim_ref.as_ref()?;
    Some(ObjectRef::new(r.name.as_deref()?).within(r.namespace.as_deref()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::World;

    fn claim(extra: serde_json::Value) -> PersistentVolumeClaim {
        let mut v = json!({
            "metadata": {"name": "data", "namespace": "default", "uid": "c-uid"},
            "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "local",
                     "resources": {"requests": {"storage": "1Gi"}}},
            "status": {"phase": "Pending"}
        });
        if let (Some(m), Some(e)) = (v["metadata"].as_object_mut(), extra.as_object()) {
            for (k, x) in e {
                m.insert(k.clone(), x.clone());
            }
        }
        serde_json::from_value(v).unwrap()
    }

    #[tokio::test]
    async fn a_waiting_claim_is_provisioned_on_the_selected_node_and_bound() {
        let mut w = World::new();
        w.storageclass(json!({"metadata": {"name": "local"}, "provisioner": LOCAL_PROVISIONER,
                              "volumeBindingMode": "WaitForFirstConsumer", "reclaimPolicy": "Delete"}));
        reconcile_claim(Arc::new(claim(json!({}))), w.ctx.clone())
            .await
            .unwrap();
        assert!(w.api.writes().is_empty(), "{:?}", w.api.writes());
        assert_eq!(w.events().await, ["Normal WaitForFirstConsumer"]);

        let picked = claim(json!({"annotations": {SELECTED_NODE: "n1"}}));
        reconcile_claim(Arc::new(picked), w.ctx.clone())
            .await
            .unwrap();
        let calls = w.api.write_calls();
        let pv = &calls[0].body;
        assert_eq!(calls[0].path, "/api/v1/persistentvolumes");
        assert_eq!(pv["metadata"]["name"], "pvc-c-uid");
        assert_eq!(pv["spec"]["local"]["path"], "/baton-local/pvc-c-uid");
        assert_eq!(pv["spec"]["claimRef"]["uid"], "c-uid");
        assert_eq!(pv["spec"]["persistentVolumeReclaimPolicy"], "Delete");
        assert_eq!(
            pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"][0]["matchExpressions"][0]
                ["values"][0],
            "n1"
        );
        let last = calls.last().unwrap();
        assert_eq!(last.body["status"]["phase"], "Bound");
    }

    #[tokio::test]
    async fn a_claim_binds_the_smallest_available_volume_that_fits() {
        let mut w = World::new();
        for (name, size, mode) in [
            ("big", "10Gi", "ReadWriteOnce"),
            ("small", "2Gi", "ReadWriteOnce"),
            ("tiny", "512Mi", "ReadWriteOnce"),
            ("ro", "1Gi", "ReadOnlyMany"),
        ] {
            w.volume(json!({"metadata": {"name": name},
                "spec": {"capacity": {"storage": size}, "accessModes": [mode],
                         "storageClassName": "local", "hostPath": {"path": "/srv"}},
                "status": {"phase": "Available"}}));
        }
        reconcile_claim(Arc::new(claim(json!({}))), w.ctx.clone())
            .await
            .unwrap();
        let writes = w.api.writes();
        assert_eq!(writes[0], "PATCH /api/v1/persistentvolumes/small");
        assert!(writes
            .contains(&"PATCH /api/v1/namespaces/default/persistentvolumeclaims/data".to_string()));
    }

    #[tokio::test]
    async fn a_claim_in_use_keeps_its_protection_until_its_pod_is_done() {
        let mut w = World::new();
        let deleting = claim(json!({"deletionTimestamp": "2026-12-03T00:00:00Z",
                                    "finalizers": [CLAIM_PROTECTION, "example.com/keep"]}));
        let mut user = json!({"metadata": {"name": "db-0", "namespace": "default", "uid": "p"},
            "spec": {"containers": [{"name": "c"}],
                     "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}]},
            "status": {"phase": "Running"}});
        w.pod(user.clone());
        reconcile_claim(Arc::new(deleting.clone()), w.ctx.clone())
            .await
            .unwrap();
        assert!(w.api.writes().is_empty(), "{:?}", w.api.writes());

        user["status"]["phase"] = json!("Succeeded");
        w.pod(user);
        reconcile_claim(Arc::new(deleting), w.ctx.clone())
            .await
            .unwrap();
        let calls = w.api.write_calls();
        assert_eq!(calls.len(), 1);
        assert_eq!(
            calls[0].body["metadata"]["finalizers"],
            json!(["example.com/keep"])
        );
    }
}
