//! The DaemonSet controller: one pod on every node that may run it.
//!
//! ## Expected flow
//! - A node is eligible when it matches the template's `nodeSelector` and required node
//!   affinity and every NoSchedule/NoExecute taint on it is tolerated. DaemonSet pods
//!   tolerate, as in Kubernetes, a node that is not ready, unreachable, under pressure or
//!   cordoned: a node agent's companion must run where the node is in trouble.
//! - An eligible node without a pod gets one, pinned to it by a required node affinity on
//!   `metadata.name` (the scheduler binds it, as kube-scheduler does for DaemonSets); a
//!   pod on a node that is no longer eligible, a second pod on one node, and a failed
//!   pod are deleted (the failed one is replaced on the next pass).
//! - `RollingUpdate`: pods of an older template (`controller-revision-hash`) are deleted
//!   while no more than `maxUnavailable` of the DaemonSet's pods are unavailable, and
//!   replaced by the loop above; `OnDelete` leaves them until someone deletes them.
//! - Status: desired, current, misscheduled, ready, updated, available and unavailable
//!   counts, and the generation observed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use baton_kube::events::EventType;
use baton_kube::pod;
use baton_kube::selector::{matches_term, tolerates};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{
    Affinity, Node, NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, Pod,
    PodSpec, Toleration,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{DeleteParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

use crate::deployment::template_hash;
use crate::replicaset::{generate_name, pod_from_template};
use crate::Ctx;

/// The label that says which template a DaemonSet's pod was made from.
pub const REVISION_LABEL: &str = "controller-revision-hash";

/// Why a DaemonSet could not be reconciled (it is retried).
#[derive(Debug, thiserror::Error)]
#[error("{action} for daemonset {daemonset}")]
pub struct Error {
    daemonset: String,
    action: &'static str,
    #[source]
    source: kube::Error,
}

/// The tolerations kube-controller-manager adds to every DaemonSet pod.
fn daemon_tolerations() -> Vec<Toleration> {
    let t = |key: &str, effect: &str| Toleration {
        key: Some(key.into()),
        operator: Some("Exists".into()),
        effect: Some(effect.into()),
        ..Default::default()
    };
    vec![
        t("node.kubernetes.io/not-ready", "NoExecute"),
        t("node.kubernetes.io/unreachable", "NoExecute"),
        t("node.kubernetes.io/disk-pressure", "NoSchedule"),
        t("node.kubernetes.io/memory-pressure", "NoSchedule"),
        t("node.kubernetes.io/pid-pressure", "NoSchedule"),
        t("node.kubernetes.io/unschedulable", "NoSchedule"),
    ]
}

fn tolerations_of(spec: &PodSpec) -> Vec<Toleration> {
    let mut all = spec.tolerations.clone().unwrap_or_default();
    for t in daemon_tolerations() {
        if !all.contains(&t) {
            all.push(t);
        }
    }
    all
}

/// Whether a pod of this template belongs on `node`.
pub fn eligible(spec: &PodSpec, node: &Node) -> bool {
    let labels = node.metadata.labels.clone().unwrap_or_default();
    let selected = spec
        .node_selector
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let affinity = spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|a| {
            a.required_during_scheduling_ignored_during_execution
                .as_ref()
        })
        .is_none_or(|sel| {
            sel.node_selector_terms
                .iter()
                .any(|t| matches_term(t, node))
        });
    let tolerations = tolerations_of(spec);
    let tolerated = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .into_iter()
        .flatten()
        .filter(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
        .all(|t| tolerates(&tolerations, t));
    selected && affinity && tolerated
}

/// The node a DaemonSet pod is for: bound, or pinned by its node affinity.
fn node_of(p: &Pod) -> Option<String> {
    let spec = p.spec.as_ref()?;
    if let Some(n) = spec.node_name.clone().filter(|n| !n.is_empty()) {
        return Some(n);
    }
    let terms = &spec
        .affinity
        .as_ref()?
        .node_affinity
        .as_ref()?
        .required_during_scheduling_ignored_during_execution
        .as_ref()?
        .node_selector_terms;
    terms.iter().find_map(|t| {
        t.match_fields.iter().flatten().find_map(|f| {
            (f.key == "metadata.name" && f.operator == "In")
                .then(|| f.values.as_ref()?.first().cloned())
                .flatten()
        })
    })
}

/// The pod for `node`: the template, pinned there, with the revision label.
fn pod_for(ds: &DaemonSet, node: &str, hash: &str) -> Pod {
    let mut template = ds
        .spec
        .as_ref()
        .map(|s| s.template.clone())
        .unwrap_or_default();
    let meta = template.metadata.get_or_insert_with(Default::default);
    let labels = meta.labels.get_or_insert_with(Default::default);
    labels.insert(REVISION_LABEL.into(), hash.into());
    labels.insert(
        "pod-template-generation".into(),
        ds.metadata.generation.unwrap_or(1).to_string(),
    );
    let spec = template.spec.get_or_insert_with(Default::default);
    spec.tolerations = Some(tolerations_of(spec));
    let pin = NodeSelector {
        node_selector_terms: vec![NodeSelectorTerm {
            match_fields: Some(vec![NodeSelectorRequirement {
                key: "metadata.name".into(),
                operator: "In".into(),
                values: Some(vec![node.into()]),
            }]),
            ..Default::default()
        }],
    };
    let affinity = spec.affinity.get_or_insert_with(Affinity::default);
    affinity
        .node_affinity
        .get_or_insert_with(NodeAffinity::default)
        .required_during_scheduling_ignored_during_execution = Some(pin);
    let name = generate_name(&format!("{}-", ds.name_any()));
    pod_from_template(ds, template, &name)
}

/// How many pods may be unavailable during a rolling update.
fn max_unavailable(ds: &DaemonSet, desired: usize) -> usize {
    let v = ds
        .spec
        .as_ref()
        .and_then(|s| s.update_strategy.as_ref())
        .and_then(|u| u.rolling_update.as_ref())
        .and_then(|r| r.max_unavailable.clone())
        .unwrap_or(IntOrString::Int(1));
    let n = match v {
        IntOrString::Int(n) => n.max(0) as usize,
        IntOrString::String(p) => {
            let pct: usize = p.trim_end_matches('%').parse().unwrap_or(0);
            // Rounded up, as Kubernetes rounds maxUnavailable for DaemonSets.
            (desired * pct).div_ceil(100)
        }
    };
    n.max(1)
}

pub async fn reconcile(ds: Arc<DaemonSet>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let ns = ds.namespace().unwrap_or_default();
    let name = ds.name_any();
    let uid = ds.uid().unwrap_or_default();
    let err = |action: &'static str| {
        let daemonset = format!("{ns}/{name}");
        move |source| Error {
            daemonset,
            action,
            source,
        }
    };
    if ds.metadata.deletion_timestamp.is_some() {
        ctx.expectations.forget(&uid);
        return Ok(Action::await_change());
    }
    let Some(spec) = ds.spec.clone() else {
        return Ok(Action::await_change());
    };
    let template_spec = spec.template.spec.clone().unwrap_or_default();
    let hash = template_hash(&spec.template);
    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);

    let owned = crate::owned_pods(&ctx, &ns, &uid);
    let mut by_node: BTreeMap<String, Vec<Arc<Pod>>> = BTreeMap::new();
    for p in &owned {
        if let Some(n) = node_of(p) {
            by_node.entry(n).or_default().push(p.clone());
        }
    }
    let nodes = ctx.nodes.state();
    let mut wanted: Vec<String> = nodes
        .iter()
        .filter(|n| eligible(&template_spec, n))
        .map(|n| n.name_any())
        .collect();
    wanted.sort();

    let mut creates = Vec::new();
    let mut deletes: Vec<(Arc<Pod>, &'static str)> = Vec::new();
    for node in &wanted {
        let mut live: Vec<Arc<Pod>> = by_node
            .get(node)
            .into_iter()
            .flatten()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .cloned()
            .collect();
        // A failed pod is replaced; it goes first, and its successor comes on a later pass.
        for p in live.iter().filter(|p| pod::phase(p) == "Failed") {
            deletes.push((p.clone(), "failed"));
        }
        live.retain(|p| pod::phase(p) != "Failed");
        live.sort_by_key(|p| p.metadata.creation_timestamp.clone().map(|t| t.0));
        match live.len() {
            0 if !by_node
                .get(node)
                .is_some_and(|ps| ps.iter().any(|p| pod::phase(p) == "Failed")) =>
            {
                creates.push(node.clone())
            }
            0 | 1 => {}
            _ => {
                for extra in live.drain(1..) {
                    deletes.push((extra, "more than one on its node"));
                }
            }
        }
    }
    let mut misscheduled = 0;
    for (node, ps) in &by_node {
        if !wanted.contains(node) {
            for p in ps
                .iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
            {
                misscheduled += 1;
                deletes.push((p.clone(), "not eligible for its node"));
            }
        }
    }

    // Rolling update: old pods go while the unavailable stay within the budget.
    let current: Vec<&Arc<Pod>> = wanted
        .iter()
        .filter_map(|n| {
            by_node
                .get(n)?
                .iter()
                .find(|p| p.metadata.deletion_timestamp.is_none())
        })
        .collect();
    let rolling = spec
        .update_strategy
        .as_ref()
        .and_then(|u| u.type_.as_deref())
        .unwrap_or("RollingUpdate")
        == "RollingUpdate";
    if rolling {
        let budget = max_unavailable(&ds, wanted.len());
        let unavailable = wanted.len() - current.iter().filter(|p| pod::is_ready(p)).count();
        let mut room = budget.saturating_sub(unavailable);
        let revision = |p: &Pod| {
            p.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(REVISION_LABEL))
                .cloned()
        };
        let mut old: Vec<&Arc<Pod>> = current
            .iter()
            .copied()
            .filter(|p| revision(p).as_deref() != Some(hash.as_str()))
            .collect();
        // Unready old pods first: deleting them costs no availability.
        old.sort_by_key(|p| pod::is_ready(p));
        for p in old {
            if !pod::is_ready(p) {
                deletes.push((p.clone(), "an old revision"));
            } else if room > 0 {
                room -= 1;
                deletes.push((p.clone(), "an old revision"));
            }
        }
    }

    let present = owned.iter().map(|p| {
        (
            p.metadata.name.as_deref().unwrap_or(""),
            p.metadata.uid.as_deref().unwrap_or(""),
        )
    });
    if ctx.expectations.satisfied(&uid, present) {
        for node in &creates {
            let p = pod_for(&ds, node, &hash);
            let pod_name = p.name_any();
            ctx.expectations.expect_create(&uid, &pod_name);
            let res = pods_api.create(&PostParams::default(), &p).await;
            crate::tell_pod_created(&ctx, &ds.object_ref(&()), &pod_name, &res);
            if let Err(e) = res {
                ctx.expectations.creation_failed(&uid, &pod_name);
                return Err(err("creating a pod")(e));
            }
        }
        for (p, why) in &deletes {
            let pod_uid = p.uid().unwrap_or_default();
            ctx.expectations.expect_delete(&uid, &pod_uid);
            let deleted =
                crate::delete_if_present(&pods_api, &p.name_any(), &DeleteParams::default())
                    .await
                    .map_err(err("deleting a pod"))?;
            if deleted {
                ctx.recorder.publish(
                    &ds.object_ref(&()),
                    EventType::Normal,
                    "SuccessfulDelete",
                    &format!("Deleted pod: {} ({why})", p.name_any()),
                )
            }
        }
    }

    let ready = current.iter().filter(|p| pod::is_ready(p)).count();
    let updated = current
        .iter()
        .filter(|p| {
            p.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(REVISION_LABEL))
                == Some(&hash)
        })
        .count();
    let status = json!({
        "desiredNumberScheduled": wanted.len(),
        "currentNumberScheduled": current.len(),
        "numberMisscheduled": misscheduled,
        "numberReady": ready,
        "numberAvailable": ready,
        "numberUnavailable": wanted.len() - ready,
        "updatedNumberScheduled": updated,
        "observedGeneration": ds.metadata.generation,
    });
    let api: Api<DaemonSet> = Api::namespaced(ctx.client.clone(), &ns);
    if !crate::write_status(&api, &name, &ds.status, status)
        .await
        .map_err(err("writing status"))?
    {
        return Ok(Action::await_change());
    }
    // Readiness is watched through the pods; this is a safety net.
    Ok(Action::requeue(Duration::from_secs(300)))
}

/// Every DaemonSet: a node's change may make any of them place or remove a pod.
pub fn all_daemonsets(ctx: &Ctx) -> Vec<ObjectRef<DaemonSet>> {
    ctx.daemonsets
        .state()
        .iter()
        .map(|d| ObjectRef::from_obj(d.as_ref()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::World;

    const PODS: &str = "/api/v1/namespaces/default/pods";

    fn ds() -> DaemonSet {
        serde_json::from_value(json!({
            "apiVersion": "apps/v1", "kind": "DaemonSet",
            "metadata": {"name": "agent", "namespace": "default", "uid": "ds-uid", "generation": 1},
            "spec": {"selector": {"matchLabels": {"app": "agent"}},
                     "template": {"metadata": {"labels": {"app": "agent"}},
                                  "spec": {"nodeSelector": {"role": "edge"},
                                           "containers": [{"name": "c", "image": "r/agent:1"}]}}}
        }))
        .unwrap()
    }

    fn node(name: &str, role: &str, taint: Option<&str>) -> serde_json::Value {
        let taints = taint
            .map(|t| json!([{"key": t, "effect": "NoSchedule"}]))
            .unwrap_or(json!([]));
        json!({"metadata": {"name": name, "labels": {"role": role}},
               "spec": {"taints": taints}})
    }

    fn owned_pod(name: &str, node: &str, hash: &str, ready: bool) -> serde_json::Value {
        json!({
            "metadata": {"name": name, "namespace": "default", "uid": format!("{name}-uid"),
                "labels": {"app": "agent", REVISION_LABEL: hash},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet",
                    "name": "agent", "uid": "ds-uid", "controller": true}]},
            "spec": {"nodeName": node, "containers": [{"name": "c"}]},
            "status": {"phase": "Running",
                "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}
        })
    }

    #[tokio::test]
    async fn one_pod_lands_on_each_eligible_node_pinned_there() {
        let mut w = World::new();
        w.node(node("a", "edge", None));
        w.node(node("b", "edge", Some("node.kubernetes.io/unschedulable")));
        w.node(node("c", "core", None));
        w.node(node("d", "edge", Some("dedicated")));
        reconcile(Arc::new(ds()), w.ctx.clone()).await.unwrap();
        let calls = w.api.write_calls();
        let pinned: Vec<&serde_json::Value> = calls
            .iter()
            .filter(|c| c.method == "POST")
            .map(|c| {
                &c.body["spec"]["affinity"]["nodeAffinity"]
                    ["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]
                    ["matchFields"][0]["values"][0]
            })
            .collect();
        // A cordoned node still runs it; another node role or an untolerated taint not.
        assert_eq!(pinned, [&json!("a"), &json!("b")]);
        let pod = &calls[0].body;
        assert_eq!(pod["metadata"]["ownerReferences"][0]["uid"], "ds-uid");
        assert!(pod["metadata"]["labels"][REVISION_LABEL].is_string());
        assert!(pod["spec"]["tolerations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["key"] == "node.kubernetes.io/unreachable"));
        let status = &calls.last().unwrap().body["status"];
        assert_eq!(status["desiredNumberScheduled"], 2);
    }

    #[tokio::test]
    async fn pods_off_eligible_nodes_and_doubles_go() {
        let mut w = World::new();
        w.node(node("a", "edge", None));
        w.node(node("c", "core", None));
        let hash = template_hash(&ds().spec.unwrap().template);
        w.pod(owned_pod("p1", "a", &hash, true));
        w.pod(owned_pod("p2", "a", &hash, true));
        w.pod(owned_pod("p3", "c", &hash, true));
        reconcile(Arc::new(ds()), w.ctx.clone()).await.unwrap();
        let mut deletes: Vec<String> = w
            .api
            .writes()
            .into_iter()
            .filter(|w| w.starts_with("DELETE"))
            .collect();
        deletes.sort();
        assert_eq!(deletes.len(), 2, "{deletes:?}");
        assert!(deletes.contains(&format!("DELETE {PODS}/p3")));
        let calls = w.api.write_calls();
        let status = &calls.last().unwrap().body["status"];
        assert_eq!(status["numberMisscheduled"], 1);
    }

    #[tokio::test]
    async fn a_rolling_update_replaces_one_ready_pod_at_a_time() {
        let mut w = World::new();
        for n in ["a", "b", "c"] {
            w.node(node(n, "edge", None));
            w.pod(owned_pod(&format!("old-{n}"), n, "old", true));
        }
        reconcile(Arc::new(ds()), w.ctx.clone()).await.unwrap();
        let deletes: Vec<String> = w
            .api
            .writes()
            .into_iter()
            .filter(|w| w.starts_with("DELETE"))
            .collect();
        assert_eq!(deletes.len(), 1, "{deletes:?}");
        assert!(!w.api.writes().iter().any(|w| w.starts_with("POST")));
    }
}
