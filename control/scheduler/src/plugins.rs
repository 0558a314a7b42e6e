//! Filters (may the pod go on this node?) and scores (how good a home is it?), the
//! default plugins of kube-scheduler reduced to what Baton's nodes report.

use std::collections::BTreeMap;

use baton_kube::selector;
use k8s_openapi::api::core::v1::Pod;

use crate::cache::{Images, NodeInfo, Owner, Usage};

/// Why a node cannot take a pod, worded as kube-scheduler words it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Unfit {
    NotReady,
    Unschedulable,
    Selector,
    VolumeNodeAffinity,
    Taint(String),
    Cpu,
    Memory,
    Pods,
}

impl Unfit {
    fn reason(&self) -> String {
        match self {
            Unfit::NotReady => "node(s) were not ready".into(),
            Unfit::Unschedulable => "node(s) were unschedulable".into(),
            Unfit::Selector => "node(s) didn't match Pod's node affinity/selector".into(),
            Unfit::VolumeNodeAffinity => "node(s) had volume node affinity conflict".into(),
            Unfit::Taint(t) => format!("node(s) had untolerated taint {{{t}}}"),
            Unfit::Cpu => "Insufficient cpu".into(),
            Unfit::Memory => "Insufficient memory".into(),
            Unfit::Pods => "Too many pods".into(),
        }
    }
}

/// `0/3 nodes are available: 1 Insufficient cpu, 2 node(s) were not ready.`
pub fn unschedulable_message(total: usize, unfit: &[Unfit]) -> String {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for u in unfit {
        *counts.entry(u.reason()).or_default() += 1;
    }
    let parts: Vec<String> = counts.iter().map(|(r, n)| format!("{n} {r}")).collect();
    if parts.is_empty() {
        return format!("0/{total} nodes are available.");
    }
    format!("0/{total} nodes are available: {}.", parts.join(", "))
}

/// What the filters need to know about the pod, computed once per decision.
#[derive(Debug)]
pub struct Demand<'a> {
    pub pod: &'a Pod,
    pub cpu_millis: u64,
    pub memory: u64,
    pub owner: Option<Owner>,
    /// Where the pod's volumes are (each must match the node).
    pub volume_terms: &'a [k8s_openapi::api::core::v1::NodeSelector],
    /// The pod's images, normalized ([`pod_images`]).
    pub images: Vec<u64>,
}

fn matches_selector_and_affinity(d: &Demand<'_>, info: &NodeInfo) -> bool {
    let Some(spec) = &d.pod.spec else {
        return true;
    };
    // The Node object is read only when the pod asks something of it: most pods do
    // not, and a decision looks at hundreds of nodes.
    let selector_ok = spec.node_selector.as_ref().is_none_or(|wanted| {
        let labels = info.node.metadata.labels.as_ref();
        wanted
            .iter()
            .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
    });
    let required = spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|n| {
            n.required_during_scheduling_ignored_during_execution
                .as_ref()
        });
    // Terms are ORed; a node matching any term passes.
    let affinity_ok = required.is_none_or(|r| {
        r.node_selector_terms
            .iter()
            .any(|t| selector::matches_term(t, &info.node))
    });
    selector_ok && affinity_ok
}

/// Whether the pod may be placed on the node, given what is there already.
pub fn filter(d: &Demand<'_>, info: &NodeInfo, used: &Usage) -> Result<(), Unfit> {
    let tolerations = d
        .pod
        .spec
        .as_ref()
        .and_then(|s| s.tolerations.as_deref())
        .unwrap_or(&[]);
    for taint in &info.taints {
        if !selector::tolerates(tolerations, taint) {
            return Err(Unfit::Taint(format!(
                "{}: {}",
                taint.key,
                taint.value.as_deref().unwrap_or("")
            )));
        }
    }
    if !info.ready {
        return Err(Unfit::NotReady);
    }
    if info.unschedulable {
        return Err(Unfit::Unschedulable);
    }
    let volumes_here = d.volume_terms.iter().all(|sel| {
        sel.node_selector_terms
            .iter()
            .any(|t| selector::matches_term(t, &info.node))
    });
    if !volumes_here {
        return Err(Unfit::VolumeNodeAffinity);
    }
    if !matches_selector_and_affinity(d, info) {
        return Err(Unfit::Selector);
    }
    if used.pods + 1 > info.pods {
        return Err(Unfit::Pods);
    }
    if d.cpu_millis > 0 && used.cpu_millis + d.cpu_millis > info.cpu_millis {
        return Err(Unfit::Cpu);
    }
    if d.memory > 0 && used.memory + d.memory > info.memory {
        return Err(Unfit::Memory);
    }
    Ok(())
}

/// What image locality weighs at most: less than spreading weighs for a second replica
/// (half of 100), so that holding the image never stacks one owner's first replicas on
/// one node, but enough to pick, among nodes alike, the one where a pod starts at once.
pub const IMAGE_LOCALITY_WEIGHT: u64 = 30;

/// An image reference as nodes report it: `registry/repository:tag`, with Docker Hub's
/// `docker.io/library/` and the `latest` tag filled in; as written if it does not parse.
pub fn normalize_image(image: &str) -> String {
    image
        .parse::<oci_spec::distribution::Reference>()
        .map(|r| r.whole())
        .unwrap_or_else(|_| image.to_string())
}

/// The images of the pod's containers, normalized as nodes report theirs and hashed as
/// [`Images`] keeps them: read once per decision, not once per node.
pub fn pod_images(pod: &Pod) -> Vec<u64> {
    let Some(spec) = &pod.spec else {
        return Vec::new();
    };
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .filter_map(|c| c.image.as_deref())
        .map(|i| Images::key(&normalize_image(i)))
        .collect()
}

/// ImageLocality: the share of the pod's container images the node holds, out of
/// [`IMAGE_LOCALITY_WEIGHT`].
fn image_locality(images: &[u64], info: &NodeInfo) -> u64 {
    if info.images.is_empty() || images.is_empty() {
        return 0;
    }
    let held = images.iter().filter(|&&i| info.images.contains(i)).count() as u64;
    held * IMAGE_LOCALITY_WEIGHT / images.len() as u64
}

/// Higher is better: least-allocated (0–100) plus spreading the owner's replicas (0–100)
/// plus image locality (0–[`IMAGE_LOCALITY_WEIGHT`]).
pub fn score(d: &Demand<'_>, info: &NodeInfo, used: &Usage, most_of_owner: u64) -> u64 {
    let free = |used: u64, want: u64, cap: u64| {
        if cap == 0 {
            return 0;
        }
        cap.saturating_sub(used + want) * 100 / cap
    };
    let least_allocated = (free(used.cpu_millis, d.cpu_millis, info.cpu_millis)
        + free(used.memory, d.memory, info.memory)
        + free(used.pods, 1, info.pods))
        / 3;
    let spread = match &d.owner {
        Some(o) if most_of_owner > 0 => {
            let here = used.of_owner(o);
            (most_of_owner - here.min(most_of_owner)) * 100 / most_of_owner
        }
        _ => 100,
    };
    least_allocated + spread + image_locality(&d.images, info)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::sync::Arc;

    fn node(name: &str, extra: serde_json::Value) -> NodeInfo {
        let mut n = json!({
            "metadata": {"name": name, "labels": {"disk": "ssd"}},
            "status": {
                "allocatable": {"cpu": "1", "memory": "1Gi", "pods": "2"},
                "conditions": [{"type": "Ready", "status": "True"}]
            }
        });
        if let Some(spec) = extra.get("spec") {
            n["spec"] = spec.clone();
        }
        NodeInfo::new(Arc::new(serde_json::from_value(n).unwrap()))
    }

    fn pod(spec: serde_json::Value) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": "p", "uid": "u1"}, "spec": spec}))
            .unwrap()
    }

    #[test]
    fn a_node_that_holds_the_pods_image_is_preferred_but_never_over_spreading() {
        let mut holds = node("a", json!({}));
        holds.images = [
            "127.0.0.1:5000/hello:v1".to_string(),
            "docker.io/library/busybox:latest".to_string(),
        ]
        .iter()
        .collect();
        let lacks = node("b", json!({}));
        let p = pod(json!({"containers": [{"name": "c", "image": "127.0.0.1:5000/hello:v1"}]}));
        let d = Demand {
            pod: &p,
            cpu_millis: 0,
            memory: 0,
            owner: Some(Owner::new("rs")),
            volume_terms: &[],
            images: pod_images(&p),
        };
        let none = Usage::default();
        // The first replica: the node with the image.
        assert!(score(&d, &holds, &none, 1) > score(&d, &lacks, &none, 1));
        assert_eq!(
            score(&d, &holds, &none, 1) - score(&d, &lacks, &none, 1),
            IMAGE_LOCALITY_WEIGHT
        );
        // The second: spreading wins over the image.
        let one_here = Usage {
            pods: 1,
            by_owner: vec![(Owner::new("rs"), 1)],
            ..Usage::default()
        };
        assert!(score(&d, &holds, &one_here, 2) < score(&d, &lacks, &none, 2));
        // Docker Hub's short names are matched in their full form.
        let short = pod(json!({"containers": [{"name": "c", "image": "busybox"}]}));
        assert_eq!(
            image_locality(&pod_images(&short), &holds),
            IMAGE_LOCALITY_WEIGHT
        );
        assert_eq!(normalize_image("not a reference!"), "not a reference!");
    }

    #[test]
    fn filters_say_why() {
        let p = pod(json!({"containers": [{"name": "c"}], "nodeSelector": {"disk": "hdd"}}));
        let d = Demand {
            pod: &p,
            cpu_millis: 0,
            memory: 0,
            owner: None,
            volume_terms: &[],
            images: Vec::new(),
        };
        assert_eq!(
            filter(&d, &node("a", json!({})), &Usage::default()),
            Err(Unfit::Selector)
        );
        let p = pod(json!({"containers": [{"name": "c"}]}));
        let d = Demand {
            pod: &p,
            cpu_millis: 1500,
            memory: 0,
            owner: None,
            volume_terms: &[],
            images: Vec::new(),
        };
        assert_eq!(
            filter(&d, &node("a", json!({})), &Usage::default()),
            Err(Unfit::Cpu)
        );
        let tainted = node(
            "b",
            json!({"spec": {"taints": [{"key": "k", "value": "v", "effect": "NoSchedule"}]}}),
        );
        let d = Demand {
            pod: &p,
            cpu_millis: 0,
            memory: 0,
            owner: None,
            volume_terms: &[],
            images: Vec::new(),
        };
        assert_eq!(
            filter(&d, &tainted, &Usage::default()),
            Err(Unfit::Taint("k: v".into()))
        );
        let full = Usage {
            pods: 2,
            ..Default::default()
        };
        assert_eq!(filter(&d, &node("a", json!({})), &full), Err(Unfit::Pods));
        assert_eq!(filter(&d, &node("a", json!({})), &Usage::default()), Ok(()));
        assert_eq!(
            unschedulable_message(3, &[Unfit::Cpu, Unfit::Selector, Unfit::Cpu]),
            "0/3 nodes are available: 2 Insufficient cpu, 1 node(s) didn't match Pod's node affinity/selector."
        );
    }

    #[test]
    fn scores_spread_an_owners_replicas() {
        let p = pod(json!({"containers": [{"name": "c"}]}));
        let d = Demand {
            pod: &p,
            cpu_millis: 0,
            memory: 0,
            owner: Some(Owner::new("rs")),
            volume_terms: &[],
            images: Vec::new(),
        };
        let busy = Usage {
            by_owner: vec![(Owner::new("rs"), 1)],
            ..Usage::default()
        };
        let n = node("a", json!({}));
        assert!(score(&d, &n, &Usage::default(), 1) > score(&d, &n, &busy, 1));
    }
}
