//! The Node authorizer: what a node agent (`system:node:NAME` in `system:nodes`) may do.
//!
//! A node may read what every node needs (Services and EndpointSlices to route, all
//! pods to find its own, Nodes, PersistentVolumes to sweep its local volumes, Ingresses
//! to serve them), but the Secrets, ConfigMaps and PersistentVolumeClaims of a namespace
//! only when a pod bound to it uses them (or, for a Secret, an Ingress's TLS names it), and it may write only its own Node, its own Lease and the status of its
//! own pods. That way a node taken over reveals and spoils only what it runs.
//!
//! A create names its object in the body, not the path: NodeRestriction admission holds a
//! node's Node and Lease creates to its own name.
//!
//! Some answers depend on which pods the node runs, which only the API server knows:
//! [`check`] returns the question ([`Check`]) and the server answers it from the store.

use crate::{Attributes, Decision};

/// What a node's request needs, beyond its verb and resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    Decided(Decision),
    /// Allowed if the pod `namespace/name` is bound to the node.
    PodOnNode {
        namespace: String,
        name: String,
    },
    /// Allowed if a pod bound to the node uses the object (a Secret, ConfigMap or
    /// PersistentVolumeClaim, named by `resource`), or, for a Secret, if an Ingress of
    /// Baton's class names it for TLS: every node serves every such Ingress.
    UsedByPodOnNode {
        resource: String,
        namespace: String,
        name: String,
    },
    /// Allowed if an autoscaler with `minReplicas: 0` targets the object (`resource` in
    /// `group`): a node that holds a request for a workload scaled to zero wakes it
    /// through its scale subresource.
    ScaleToZeroTarget {
        group: String,
        resource: String,
        namespace: String,
        name: String,
    },
    /// A read of a workload (`resource` in `group`): allowed if an autoscaler with
    /// `minReplicas: 0` targets it, for the node that wakes it answers from its pod
    /// template until the pod is up; no opinion otherwise.
    ScaleToZeroTemplate {
        group: String,
        resource: String,
        namespace: String,
        name: String,
    },
}

fn allow(why: &str) -> Check {
    Check::Decided(Decision::Allow(format!("node authorizer: {why}")))
}

fn deny(why: String) -> Check {
    Check::Decided(Decision::Deny(why))
}

const READ: &[&str] = &["get", "list", "watch"];

/// The Node authorizer's answer for a request of node `node`.
pub fn check(a: &Attributes, node: &str) -> Check {
    if !a.resource_request {
        // Discovery and health: what every authenticated user may read.
        return Check::Decided(Decision::NoOpinion);
    }
    let verb = a.verb.as_str();
    let read = READ.contains(&verb);
    let own = a.name == node;
    match (
        a.api_group.as_str(),
        a.resource.as_str(),
        a.subresource.as_str(),
    ) {
        ("", "nodes", "") if read => allow("nodes are readable"),
        ("", "nodes", "" | "status") if own && matches!(verb, "update" | "patch") => {
            allow("a node writes its own Node")
        }
        // A create names its object in the body: NodeRestriction admission holds the
        // node to its own name there.
        ("", "nodes", "") if verb == "create" => allow("a node registers itself"),
        ("", "nodes", _) => deny(format!("node {node:?} may not {verb} node {:?}", a.name)),
        ("coordination.k8s.io", "leases", "") if a.namespace == "kube-node-lease" => {
            if (own && matches!(verb, "get" | "update" | "patch")) || verb == "create" {
                allow("a node renews its own Lease")
            } else {
                deny(format!("node {node:?} may not {verb} lease {:?}", a.name))
            }
        }
        ("", "pods", "") if read => allow("pods are readable"),
        ("", "pods", "status") | ("", "pods", "")
            if matches!(verb, "update" | "patch" | "delete") =>
        {
            Check::PodOnNode {
                namespace: a.namespace.clone(),
                name: a.name.clone(),
            }
        }
        ("", "pods", "eviction") if verb == "create" => Check::PodOnNode {
            namespace: a.namespace.clone(),
            name: a.name.clone(),
        },
        ("", "secrets" | "configmaps" | "persistentvolumeclaims", "")
            if read && !a.name.is_empty() =>
        {
            Check::UsedByPodOnNode {
                resource: a.resource.clone(),
                namespace: a.namespace.clone(),
                name: a.name.clone(),
            }
        }
        ("", "serviceaccounts", "token") if verb == "create" => Check::UsedByPodOnNode {
            resource: "serviceaccounts".into(),
            namespace: a.namespace.clone(),
            name: a.name.clone(),
        },
        ("", "secrets" | "configmaps" | "persistentvolumeclaims", "") => deny(format!(
            "node {node:?} may only get {} its pods use",
            a.resource
        )),
        ("", "persistentvolumes", "") if read => allow("volumes are readable"),
        ("", "services" | "endpoints", "") | ("discovery.k8s.io", "endpointslices", "") if read => {
            allow("a node routes Services")
        }
        ("", "events", "") | ("events.k8s.io", "events", "")
            if matches!(verb, "create" | "update" | "patch") =>
        {
            allow("a node reports events")
        }
        ("storage.k8s.io", "storageclasses", "") if read => allow("storage classes are readable"),
        ("networking.k8s.io", "ingresses" | "ingressclasses", "") if read => {
            allow("a node serves Ingresses")
        }
        ("autoscaling", "horizontalpodautoscalers", "") if read => {
            allow("a node wakes workloads scaled to zero")
        }
        ("apps", resource @ ("deployments" | "replicasets" | "statefulsets"), "")
            if verb == "get" && !a.name.is_empty() =>
        {
            Check::ScaleToZeroTemplate {
                group: "apps".into(),
                resource: resource.to_string(),
                namespace: a.namespace.clone(),
                name: a.name.clone(),
            }
        }
        (group, resource, "scale") if matches!(verb, "get" | "update" | "patch") => {
            Check::ScaleToZeroTarget {
                group: group.to_string(),
                resource: resource.to_string(),
                namespace: a.namespace.clone(),
                name: a.name.clone(),
            }
        }
        _ => Check::Decided(Decision::NoOpinion),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::UserInfo;

    fn c(method: &str, path: &str) -> Check {
        let (path, query) = match path.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path, None),
        };
        let u = UserInfo::new("system:node:n1", &[crate::NODES]);
        check(&Attributes::from_request(u, method, path, query), "n1")
    }

    #[test]
    fn a_node_writes_only_itself_and_reads_only_what_its_pods_use() {
        assert!(matches!(
            c("PATCH", "/api/v1/nodes/n1/status"),
            Check::Decided(Decision::Allow(_))
        ));
        assert!(matches!(
            c("DELETE", "/api/v1/nodes/n2"),
            Check::Decided(Decision::Deny(_))
        ));
        assert!(matches!(
            c("PATCH", "/api/v1/nodes/n2/status"),
            Check::Decided(Decision::Deny(_))
        ));
        assert!(matches!(
            c("GET", "/api/v1/nodes"),
            Check::Decided(Decision::Allow(_))
        ));
        assert_eq!(
            c("GET", "/api/v1/namespaces/a/secrets/s"),
            Check::UsedByPodOnNode {
                resource: "secrets".into(),
                namespace: "a".into(),
                name: "s".into()
            }
        );
        assert!(matches!(
            c("GET", "/api/v1/namespaces/a/secrets"),
            Check::Decided(Decision::Deny(_))
        ));
        assert!(matches!(
            c("PATCH", "/api/v1/namespaces/a/pods/p/status"),
            Check::PodOnNode { .. }
        ));
        // Every node serves the Ingresses: it reads them, and writes none.
        assert!(matches!(
            c("GET", "/apis/networking.k8s.io/v1/ingresses?watch=true"),
            Check::Decided(Decision::Allow(_))
        ));
        assert!(matches!(
            c("GET", "/apis/networking.k8s.io/v1/ingressclasses"),
            Check::Decided(Decision::Allow(_))
        ));
        assert_eq!(
            c(
                "PATCH",
                "/apis/networking.k8s.io/v1/namespaces/a/ingresses/i"
            ),
            Check::Decided(Decision::NoOpinion)
        );
        assert!(matches!(
            c(
                "PUT",
                "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/n2"
            ),
            Check::Decided(Decision::Deny(_))
        ));
        assert!(matches!(
            c(
                "PUT",
                "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/n1"
            ),
            Check::Decided(Decision::Allow(_))
        ));
        assert_eq!(
            c("POST", "/apis/apps/v1/namespaces/a/deployments"),
            Check::Decided(Decision::NoOpinion)
        );
        // A node wakes workloads scaled to zero: it reads autoscalers, and may write the
        // scale of a target, subject to an autoscaler with minReplicas 0 naming it.
        assert!(matches!(
            c(
                "GET",
                "/apis/autoscaling/v2/horizontalpodautoscalers?watch=true"
            ),
            Check::Decided(Decision::Allow(_))
        ));
        assert_eq!(
            c("PUT", "/apis/apps/v1/namespaces/a/deployments/fn/scale"),
            Check::ScaleToZeroTarget {
                group: "apps".into(),
                resource: "deployments".into(),
                namespace: "a".into(),
                name: "fn".into()
            }
        );
        assert_eq!(
            c("PATCH", "/apis/apps/v1/namespaces/a/deployments/fn"),
            Check::Decided(Decision::NoOpinion),
            "the Deployment itself stays out of reach"
        );
        // It reads the template of such a target, to answer from it until the pod is up.
        assert_eq!(
            c("GET", "/apis/apps/v1/namespaces/a/deployments/fn"),
            Check::ScaleToZeroTemplate {
                group: "apps".into(),
                resource: "deployments".into(),
                namespace: "a".into(),
                name: "fn".into()
            }
        );
        assert_eq!(
            c("GET", "/apis/apps/v1/namespaces/a/deployments"),
            Check::Decided(Decision::NoOpinion),
            "not a list"
        );
        assert_eq!(
            c(
                "DELETE",
                "/apis/autoscaling/v2/namespaces/a/horizontalpodautoscalers/fn"
            ),
            Check::Decided(Decision::NoOpinion)
        );
    }
}
