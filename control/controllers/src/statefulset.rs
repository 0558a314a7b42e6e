//! The StatefulSet controller: pods with stable names and their own volumes.
//!
//! ## Expected flow
//! - Replica `i` is the pod `<set>-<i>` (from `spec.ordinals.start`), with the hostname
//!   `<set>-<i>` and the subdomain `spec.serviceName`, so a headless Service of that name
//!   gives it the DNS name `<set>-<i>.<service>.<ns>.svc.cluster.local`.
//! - Each `volumeClaimTemplates` entry gives replica `i` the claim
//!   `<template>-<set>-<i>`, made before its pod and kept when the pod goes (and, with
//!   the default `Retain` policy, when the set scales down or is deleted), so a pod that
//!   comes back under the same name finds its data.
//! - `OrderedReady` (the default): replicas are made one at a time in order, each once all
//!   before it are Running and Ready, and removed one at a time from the highest. With
//!   `Parallel`, all are made and removed at once.
//! - A failed pod is deleted and made again under its name.
//! - `RollingUpdate`: pods of an older template (`controller-revision-hash`) at or above
//!   `partition` are deleted one at a time, highest first, while every replica is
//!   ready; `OnDelete` leaves them.
//! - Status: replicas, ready, available, current and updated counts, the revisions and the
//!   generation observed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use baton_kube::events::EventType;
use baton_kube::pod;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{
    PersistentVolumeClaim, PersistentVolumeClaimVolumeSource, Pod, Volume,
};
use kube::api::{DeleteParams, PostParams};
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

use crate::deployment::template_hash;
use crate::replicaset::pod_from_template;
use crate::Ctx;

/// The label that says which template a StatefulSet's pod was made from.
pub const REVISION_LABEL: &str = "controller-revision-hash";
/// The label with a replica's pod name, for a Service per replica.
pub const POD_NAME_LABEL: &str = "statefulset.kubernetes.io/pod-name";
/// The label with a replica's ordinal.
pub const POD_INDEX_LABEL: &str = "apps.kubernetes.io/pod-index";

/// Why a StatefulSet could not be reconciled (it is retried).
#[derive(Debug, thiserror::Error)]
#[error("{action} for statefulset {statefulset}")]
pub struct Error {
    statefulset: String,
    action: &'static str,
    #[source]
    source: kube::Error,
}

/// The claim replica `ordinal` of `set` gets from the template named `template`.
pub fn claim_name(template: &str, set: &str, ordinal: i32) -> String {
    format!("{template}-{set}-{ordinal}")
}

fn ordinal_of(set: &str, pod_name: &str) -> Option<i32> {
    pod_name.strip_prefix(set)?.strip_prefix('-')?.parse().ok()
}

fn revision(p: &Pod) -> Option<&str> {
    p.metadata
        .labels
        .as_ref()?
        .get(REVISION_LABEL)
        .map(String::as_str)
}

fn running_and_ready(p: &Pod) -> bool {
    pod::phase(p) == "Running" && pod::is_ready(p) && p.metadata.deletion_timestamp.is_none()
}

/// Replica `ordinal`'s pod: the template, named, labelled, with its claims as volumes.
fn pod_for(set: &StatefulSet, ordinal: i32, hash: &str) -> Pod {
    let spec = set.spec.clone().unwrap_or_default();
    let set_name = set.name_any();
    let name = format!("{set_name}-{ordinal}");
    let mut template = spec.template.clone();
    let meta = template.metadata.get_or_insert_with(Default::default);
    let labels = meta.labels.get_or_insert_with(Default::default);
    labels.insert(REVISION_LABEL.into(), hash.into());
    labels.insert(POD_NAME_LABEL.into(), name.clone());
    labels.insert(POD_INDEX_LABEL.into(), ordinal.to_string());
    let pspec = template.spec.get_or_insert_with(Default::default);
    pspec.hostname = Some(name.clone());
    if let Some(svc) = spec.service_name.clone().filter(|s| !s.is_empty()) {
        pspec.subdomain = Some(svc);
    }
    let volumes = pspec.volumes.get_or_insert_with(Vec::new);
    for t in spec.volume_claim_templates.iter().flatten() {
        let tname = t.metadata.name.clone().unwrap_or_default();
        volumes.retain(|v| v.name != tname);
        volumes.push(Volume {
            name: tname.clone(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim_name(&tname, &set_name, ordinal),
                read_only: None,
            }),
            ..Default::default()
        });
    }
    pod_from_template(set, template, &name)
}

/// Replica `ordinal`'s claims, as the templates describe them.
fn claims_for(set: &StatefulSet, ordinal: i32) -> Vec<PersistentVolumeClaim> {
    let spec = set.spec.clone().unwrap_or_default();
    let selector_labels = spec.selector.match_labels.clone().unwrap_or_default();
    spec.volume_claim_templates
        .into_iter()
        .flatten()
        .map(|mut t| {
            let tname = t.metadata.name.clone().unwrap_or_default();
            t.metadata.name = Some(claim_name(&tname, &set.name_any(), ordinal));
            t.metadata.namespace = set.namespace();
            let labels = t.metadata.labels.get_or_insert_with(Default::default);
            for (k, v) in &selector_labels {
                labels.insert(k.clone(), v.clone());
            }
            t.status = None;
            t
        })
        .collect()
}

pub async fn reconcile(set: Arc<StatefulSet>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let ns = set.namespace().unwrap_or_default();
    let name = set.name_any();
    let uid = set.uid().unwrap_or_default();
    let err = |action: &'static str| {
        let statefulset = format!("{ns}/{name}");
        move |source| Error {
            statefulset,
            action,
            source,
        }
    };
    if set.metadata.deletion_timestamp.is_some() {
        ctx.expectations.forget(&uid);
        return Ok(Action::await_change());
    }
    let Some(spec) = set.spec.clone() else {
        return Ok(Action::await_change());
    };
    let start = spec.ordinals.as_ref().and_then(|o| o.start).unwrap_or(0);
    let replicas = spec.replicas.unwrap_or(1).max(0);
    let wanted = start..start + replicas;
    let parallel = spec.pod_management_policy.as_deref() == Some("Parallel");
    let hash = template_hash(&spec.template);
    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let claims_api: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);

    let owned = crate::owned_pods(&ctx, &ns, &uid);
    let mut by_ordinal: BTreeMap<i32, Arc<Pod>> = BTreeMap::new();
    let mut strays = Vec::new();
    for p in &owned {
        match ordinal_of(&name, &p.name_any()) {
            Some(i) => {
                by_ordinal.insert(i, p.clone());
            }
            None => strays.push(p.clone()),
        }
    }
    let present = owned.iter().map(|p| {
        (
            p.metadata.name.as_deref().unwrap_or(""),
            p.metadata.uid.as_deref().unwrap_or(""),
        )
    });
    let satisfied = ctx.expectations.satisfied(&uid, present);

    let publish = |reason: &'static str, message: String| {
        let ctx = ctx.clone();
        let obj = set.object_ref(&());
        async move {
            ctx.recorder
                .publish(&obj, EventType::Normal, reason, &message)
        }
    };
    // Deletes a replica's pod, and says so when it went.
    let delete = |p: Arc<Pod>| {
        let api = pods_api.clone();
        let ctx = ctx.clone();
        let uid = uid.clone();
        let publish = &publish;
        let name = &name;
        async move {
            ctx.expectations
                .expect_delete(&uid, p.metadata.uid.as_deref().unwrap_or(""));
            if crate::delete_if_present(&api, &p.name_any(), &DeleteParams::default()).await? {
                publish(
                    "SuccessfulDelete",
                    format!(
                        "delete Pod {} in StatefulSet {name} successful",
                        p.name_any()
                    ),
                )
                .await;
            }
            Ok::<(), kube::Error>(())
        }
    };

    if satisfied {
        // Failed replicas go first; they come back under their names on a later pass.
        for p in by_ordinal
            .values()
            .filter(|p| pod::phase(p) == "Failed" && p.metadata.deletion_timestamp.is_none())
        {
            delete(p.clone())
                .await
                .map_err(err("deleting a failed pod"))?;
        }
        // Creation, in order.
        for i in wanted.clone() {
            if by_ordinal.contains_key(&i) {
                if !parallel && !by_ordinal.get(&i).is_some_and(|p| running_and_ready(p)) {
                    break;
                }
                continue;
            }
            for claim in claims_for(&set, i) {
                match claims_api.create(&PostParams::default(), &claim).await {
                    Ok(c) => {
                        publish(
                            "SuccessfulCreate",
                            format!(
                                "create Claim {} Pod {name}-{i} in StatefulSet {name} success",
                                c.name_any()
                            ),
                        )
                        .await
                    }
                    // Kept from an earlier pod of this ordinal: its data is reused.
                    Err(kube::Error::Api(e)) if e.code == 409 => {}
                    Err(e) => return Err(err("creating a claim")(e)),
                }
            }
            let p = pod_for(&set, i, &hash);
            ctx.expectations.expect_create(&uid, &p.name_any());
            match pods_api.create(&PostParams::default(), &p).await {
                Ok(_) => {
                    publish(
                        "SuccessfulCreate",
                        format!("create Pod {name}-{i} in StatefulSet {name} successful"),
                    )
                    .await
                }
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    ctx.expectations.creation_failed(&uid, &p.name_any());
                }
                Err(e) => {
                    ctx.expectations.creation_failed(&uid, &p.name_any());
                    return Err(err("creating a pod")(e));
                }
            }
            if !parallel {
                break;
            }
        }
        // Removal of replicas beyond the count (and of pods not named as replicas),
        // highest first.
        let all_ready = by_ordinal
            .iter()
            .filter(|(i, _)| wanted.contains(i))
            .all(|(_, p)| running_and_ready(p));
        let mut extra: Vec<Arc<Pod>> = by_ordinal
            .iter()
            .rev()
            .filter(|(i, p)| !wanted.contains(i) && p.metadata.deletion_timestamp.is_none())
            .map(|(_, p)| p.clone())
            .collect();
        extra.extend(strays.iter().cloned());
        let terminating = by_ordinal
            .values()
            .any(|p| p.metadata.deletion_timestamp.is_some());
        if parallel {
            for p in extra {
                delete(p.clone()).await.map_err(err("scaling down"))?;
            }
        } else if let Some(p) = extra.first().filter(|_| all_ready && !terminating) {
            delete(p.clone()).await.map_err(err("scaling down"))?;
        }
        // Rolling update: one old replica at a time, highest first, above the partition.
        let strategy = spec.update_strategy.clone().unwrap_or_default();
        if strategy.type_.as_deref().unwrap_or("RollingUpdate") == "RollingUpdate" {
            let partition = strategy
                .rolling_update
                .and_then(|r| r.partition)
                .unwrap_or(0);
            let all_present_ready = wanted
                .clone()
                .all(|i| by_ordinal.get(&i).is_some_and(|p| running_and_ready(p)));
            let old = wanted
                .clone()
                .rev()
                .filter(|i| *i >= partition)
                .filter_map(|i| by_ordinal.get(&i))
                .find(|p| revision(p) != Some(hash.as_str()));
            if let Some(p) = old.filter(|_| all_present_ready && !terminating) {
                delete(p.clone()).await.map_err(err("updating a pod"))?;
            }
        }
    }

    let in_set: Vec<&Arc<Pod>> = by_ordinal
        .iter()
        .filter(|(i, p)| wanted.contains(i) && p.metadata.deletion_timestamp.is_none())
        .map(|(_, p)| p)
        .collect();
    let ready = in_set.iter().filter(|p| pod::is_ready(p)).count();
    let updated = in_set
        .iter()
        .filter(|p| revision(p) == Some(hash.as_str()))
        .count();
    let status = json!({
        "replicas": in_set.len(),
        "readyReplicas": ready,
        "availableReplicas": ready,
        "currentReplicas": updated,
        "updatedReplicas": updated,
        "currentRevision": hash,
        "updateRevision": hash,
        "observedGeneration": set.metadata.generation,
    });
    let api: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), &ns);
    if !crate::write_status(&api, &name, &set.status, status)
        .await
        .map_err(err("writing status"))?
    {
        return Ok(Action::await_change());
    }
    Ok(Action::requeue(Duration::from_secs(300)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::World;

    const PODS: &str = "/api/v1/namespaces/default/pods";
    const CLAIMS: &str = "/api/v1/namespaces/default/persistentvolumeclaims";

    fn set(replicas: i32, extra: serde_json::Value) -> StatefulSet {
        let mut v = json!({
            "apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": {"name": "db", "namespace": "default", "uid": "sts-uid", "generation": 1},
            "spec": {"replicas": replicas, "serviceName": "db",
                     "selector": {"matchLabels": {"app": "db"}},
                     "template": {"metadata": {"labels": {"app": "db"}},
                                  "spec": {"containers": [{"name": "c", "image": "r/db:1"}]}},
                     "volumeClaimTemplates": [{"metadata": {"name": "data"},
                         "spec": {"accessModes": ["ReadWriteOnce"],
                                  "resources": {"requests": {"storage": "1Gi"}}}}]}
        });
        if let (Some(spec), Some(extra)) = (v["spec"].as_object_mut(), extra.as_object()) {
            for (k, x) in extra {
                spec.insert(k.clone(), x.clone());
            }
        }
        serde_json::from_value(v).unwrap()
    }

    fn replica(ordinal: i32, hash: &str, ready: bool) -> serde_json::Value {
        let name = format!("db-{ordinal}");
        json!({
            "metadata": {"name": name, "namespace": "default", "uid": format!("{name}-uid"),
                "labels": {"app": "db", REVISION_LABEL: hash},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet",
                    "name": "db", "uid": "sts-uid", "controller": true}]},
            "spec": {"containers": [{"name": "c"}]},
            "status": {"phase": "Running",
                "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}
        })
    }

    fn hash_of(s: &StatefulSet) -> String {
        template_hash(&s.spec.clone().unwrap().template)
    }

    #[tokio::test]
    async fn replicas_are_made_one_at_a_time_in_order_with_their_claims() {
        let mut w = World::new();
        let s = set(3, json!({}));
        reconcile(Arc::new(s.clone()), w.ctx.clone()).await.unwrap();
        let writes = w.api.writes();
        assert_eq!(writes[0], format!("POST {CLAIMS}"));
        assert_eq!(writes[1], format!("POST {PODS}"));
        assert!(
            !writes[2..].iter().any(|w| w.starts_with("POST")),
            "{writes:?}"
        );
        let calls = w.api.write_calls();
        assert_eq!(calls[0].body["metadata"]["name"], "data-db-0");
        let pod = &calls[1].body;
        assert_eq!(pod["metadata"]["name"], "db-0");
        assert_eq!(pod["spec"]["hostname"], "db-0");
        assert_eq!(pod["spec"]["subdomain"], "db");
        assert_eq!(
            pod["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"],
            "data-db-0"
        );

        // db-0 exists but is not ready: nothing more.
        w.pod(replica(0, &hash_of(&s), false));
        w.api.clear();
        reconcile(Arc::new(s.clone()), w.ctx.clone()).await.unwrap();
        assert!(!w.api.writes().iter().any(|w| w.starts_with("POST")));

        // Ready: db-1 comes.
        w.pod(replica(0, &hash_of(&s), true));
        w.api.clear();
        reconcile(Arc::new(s), w.ctx.clone()).await.unwrap();
        let calls = w.api.write_calls();
        assert_eq!(calls[1].body["metadata"]["name"], "db-1");
    }

    #[tokio::test]
    async fn scale_down_removes_the_highest_first_one_at_a_time() {
        let mut w = World::new();
        let s = set(1, json!({}));
        for i in 0..3 {
            w.pod(replica(i, &hash_of(&s), true));
        }
        reconcile(Arc::new(s), w.ctx.clone()).await.unwrap();
        let deletes: Vec<String> = w
            .api
            .writes()
            .into_iter()
            .filter(|w| w.starts_with("DELETE"))
            .collect();
        assert_eq!(deletes, [format!("DELETE {PODS}/db-2")]);
    }

    #[tokio::test]
    async fn parallel_makes_all_and_a_rolling_update_starts_at_the_top() {
        let w = World::new();
        let s = set(3, json!({"podManagementPolicy": "Parallel"}));
        reconcile(Arc::new(s), w.ctx.clone()).await.unwrap();
        let pods = w
            .api
            .writes()
            .iter()
            .filter(|x| **x == format!("POST {PODS}"))
            .count();
        assert_eq!(pods, 3);

        let mut w = World::new();
        let s = set(3, json!({}));
        for i in 0..3 {
            w.pod(replica(i, "old", true));
        }
        reconcile(Arc::new(s), w.ctx.clone()).await.unwrap();
        let deletes: Vec<String> = w
            .api
            .writes()
            .into_iter()
            .filter(|w| w.starts_with("DELETE"))
            .collect();
        assert_eq!(deletes, [format!("DELETE {PODS}/db-2")]);
    }
}
