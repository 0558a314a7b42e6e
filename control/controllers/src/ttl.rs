//! How long a node may serve a ConfigMap or Secret it read before reading it again: the
//! `node.alpha.kubernetes.io/ttl` annotation, set on every node from the cluster's size,
//! as kube-controller-manager's TTL controller sets it.
//!
//! A node refreshes its pods' ConfigMap and Secret volumes by reading the objects again.
//! At 5,000 nodes, each reading each of its namespaces' `kube-root-ca.crt` every 10 s
//! made those GETs the API server's largest load (806,000 in an eleven-minute run, more
//! than the Lease renewals). The bigger the cluster, the longer the TTL, with the same
//! steps as Kubernetes and the same overlap between them, so that a cluster whose size
//! hovers at a step does not flap.

use k8s_openapi::api::core::v1::Node;
use kube::ResourceExt;

use crate::Ctx;

pub use baton_kube::NODE_TTL_ANNOTATION as ANNOTATION;

/// (fewest nodes, most nodes, TTL in seconds) per step. The ranges overlap: a cluster
/// moves up a step past its most, and down one below its fewest.
const STEPS: [(usize, usize, u64); 6] = [
    (0, 100, 0),
    (90, 500, 15),
    (450, 1000, 30),
    (900, 2000, 60),
    (1800, 10_000, 300),
    (9000, usize::MAX, 600),
];

/// The step for `nodes`, moving at most as far as the size requires from `step`.
pub fn step_for(mut step: usize, nodes: usize) -> usize {
    step = step.min(STEPS.len() - 1);
    while nodes > STEPS[step].1 && step + 1 < STEPS.len() {
        step += 1;
    }
    while nodes < STEPS[step].0 && step > 0 {
        step -= 1;
    }
    step
}

/// The TTL the cluster's size asks for now, in seconds; the step is kept in `ctx`.
fn cluster_ttl(ctx: &Ctx) -> u64 {
    let nodes = ctx.nodes.len();
    let mut step = ctx.ttl_step.lock().unwrap_or_else(|e| e.into_inner());
    *step = step_for(*step, nodes);
    STEPS[*step].2
}

/// The annotation `node` should have, if it says otherwise: the cluster's TTL now.
pub fn wanted(node: &Node, ctx: &Ctx) -> Option<String> {
    let ttl = cluster_ttl(ctx).to_string();
    (node.annotations().get(ANNOTATION) != Some(&ttl)).then_some(ttl)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ttl_grows_with_the_cluster_and_does_not_flap_at_a_step() {
        let ttl = |step: usize| STEPS[step].2;
        assert_eq!(ttl(step_for(0, 3)), 0);
        assert_eq!(ttl(step_for(0, 100)), 0);
        assert_eq!(ttl(step_for(0, 101)), 15);
        assert_eq!(ttl(step_for(0, 5000)), 300, "a jump crosses every step");
        assert_eq!(ttl(step_for(0, 20_000)), 600);
        // Down from 5,000 to 1,900: still within the 300 s step.
        assert_eq!(ttl(step_for(4, 1900)), 300);
        assert_eq!(ttl(step_for(4, 1799)), 60);
        // Hovering at 100: 95 keeps 15 s, 89 drops to 0.
        assert_eq!(ttl(step_for(1, 95)), 15);
        assert_eq!(ttl(step_for(1, 89)), 0);
        assert_eq!(ttl(step_for(5, 0)), 0);
    }

    fn node(name: &str, ttl: Option<&str>) -> serde_json::Value {
        let mut n =
            serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}});
        if let Some(t) = ttl {
            n["metadata"]["annotations"] = serde_json::json!({ANNOTATION: t});
        }
        n
    }

    #[tokio::test]
    async fn a_node_needs_the_annotation_only_when_it_says_otherwise() {
        let mut w = crate::fake::World::new();
        let fresh = w.node(node("fresh", None));
        assert_eq!(wanted(&fresh, &w.ctx).as_deref(), Some("0"));
        let set = w.node(node("set", Some("0")));
        assert_eq!(wanted(&set, &w.ctx), None, "nothing to change");
        for i in 0..200 {
            w.node(node(&format!("n{i}"), Some("0")));
        }
        assert_eq!(wanted(&set, &w.ctx).as_deref(), Some("15"));
    }
}
