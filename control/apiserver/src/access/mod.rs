//! Access control: who a request is ([`authn`]), whether it may do what it asks (this
//! module), and the access reviews that let clients ask the same question
//! ([`reviews`]).
//!
//! Authorization runs after authentication and before any handler, as kube-apiserver's
//! chain `Node,RBAC` with the superuser group in front:
//! 1. `system:masters` may do anything;
//! 2. a node agent goes to the Node authorizer ([`baton_auth::node`]), which may allow or
//!    refuse outright; what it has no opinion on goes on to RBAC;
//! 3. RBAC ([`baton_auth::rbac`]) over every Role, ClusterRole and binding, which a loop
//!    keeps current from the store ([`crate::cache`]). Each API server of an HA control
//!    plane keeps its own, from the shared store.
//!
//! Writes of roles and bindings then pass the escalation check ([`escalation`]), and
//! writes by nodes NodeRestriction admission.

pub mod authn;
pub mod bootstrap;
pub mod escalation;
mod pod_refs;
pub mod reviews;
pub mod signers;
pub mod tokens;

use std::sync::Arc;

use baton_auth::rbac::{Kind, Policy};
use baton_auth::{node, Attributes, Decision, UserInfo};
use serde_json::Value;

use crate::cache::{Cache, Index};
use crate::error::{ApiError, ApiResult};
use crate::objects::{Objects, ReadAt};
use crate::pki::Pki;
use crate::resources;
use crate::selectors::Selectable;
use crate::watchcache::{Cacher, Lookup, NODE_NAME};
use pod_refs::PodRefs;

/// Store prefix of the four RBAC kinds.
const RBAC_PREFIX: &str = "/registry/rbac.authorization.k8s.io/";

/// The RBAC policy, as a [`Cache`] index of the RBAC store prefix.
#[derive(Debug, Default)]
pub struct RbacIndex(Policy);

impl Index for RbacIndex {
    fn apply(&mut self, key: &str, obj: Option<Value>) {
        let Some((kind, ns, name)) = parse_key(key.as_bytes()) else {
            return;
        };
        match obj {
            Some(o) => self.0.apply(kind, &o),
            None => self.0.remove(kind, &ns, &name),
        }
    }
}

/// The authorizer: the RBAC policy as last read from the store, and the key that signs
/// ServiceAccount tokens.
#[derive(Clone, Debug)]
pub struct Access {
    /// Every role and binding, kept current by [`Cache::run`].
    pub rbac: Cache<RbacIndex>,
    pki: Option<Pki>,
}

impl Default for Access {
    fn default() -> Self {
        Self {
            rbac: Cache::new(RBAC_PREFIX),
            pki: None,
        }
    }
}

impl Access {
    /// Authenticates with `pki`'s static tokens, and signs and checks ServiceAccount
    /// tokens with its key.
    pub fn with_pki(mut self, pki: Pki) -> Self {
        self.pki = Some(pki);
        self
    }

    pub fn pki(&self) -> Option<&Pki> {
        self.pki.as_ref()
    }

    /// The token signer; an API server built without a PKI has none.
    pub fn signer(&self) -> ApiResult<Arc<tokens::Signer>> {
        self.pki
            .as_ref()
            .map(Pki::service_account_signer)
            .ok_or_else(|| ApiError::internal("this API server has no service account key"))
    }

    /// Runs `f` over the current policy.
    pub fn with_policy<T>(&self, f: impl FnOnce(&Policy) -> T) -> T {
        self.rbac.read(|i| f(&i.0))
    }

    /// The chain's answer for one request.
    pub async fn authorize(&self, objects: &Objects, a: &Attributes) -> Decision {
        if a.user.is_superuser() {
            return Decision::Allow("superuser".into());
        }
        if let Some(node) = a.user.as_node() {
            let decided = match node::check(a, node) {
                node::Check::Decided(d) => d,
                node::Check::PodOnNode { namespace, name } => {
                    match pod_node(objects, &namespace, &name).await {
                        Some(Some(n)) if n == node => {
                            Decision::Allow("node authorizer: its pod".into())
                        }
                        // Gone already: the request goes on to its 404 (a node may
                        // read every pod, so this tells it nothing new).
                        None => Decision::Allow("node authorizer: no such pod".into()),
                        _ => Decision::Deny(format!(
                            "node {node:?} may not change pod \"{namespace}/{name}\", which is not bound to it"
                        )),
                    }
                }
                node::Check::UsedByPodOnNode {
                    resource,
                    namespace,
                    name,
                } => {
                    if used_by_pod_on(objects, node, &resource, &namespace, &name).await {
                        Decision::Allow("node authorizer: used by its pod".into())
                    } else if resource == "secrets" && ingress_tls(objects, &namespace, &name).await
                    {
                        Decision::Allow("node authorizer: the TLS of an Ingress it serves".into())
                    } else {
                        Decision::Deny(format!(
                            "no relationship found between node {node:?} and this object"
                        ))
                    }
                }
                node::Check::ScaleToZeroTarget {
                    group,
                    resource,
                    namespace,
                    name,
                } => {
                    if scales_to_zero(objects, &group, &resource, &namespace, &name).await {
                        Decision::Allow(
                            "node authorizer: wakes a workload its autoscaler scales to zero"
                                .into(),
                        )
                    } else {
                        Decision::Deny(format!(
                            "node {node:?} may only scale workloads whose autoscaler has minReplicas 0"
                        ))
                    }
                }
                node::Check::ScaleToZeroTemplate {
                    group,
                    resource,
                    namespace,
                    name,
                } => {
                    if scales_to_zero(objects, &group, &resource, &namespace, &name).await {
                        Decision::Allow(
                            "node authorizer: reads the template of a workload it wakes from zero"
                                .into(),
                        )
                    } else {
                        Decision::NoOpinion
                    }
                }
            };
            if decided != Decision::NoOpinion {
                return decided;
            }
        }
        self.with_policy(|p| p.authorize(a))
    }

    /// Authorizes, or gives the 403 a client would get.
    pub async fn require(&self, objects: &Objects, a: &Attributes) -> ApiResult<()> {
        match self.authorize(objects, a).await {
            Decision::Allow(_) => Ok(()),
            Decision::NoOpinion => Err(forbidden(a, "")),
            Decision::Deny(why) => Err(forbidden(a, &why)),
        }
    }
}

/// The 403 of a refused request, worded and detailed as kube-apiserver's.
pub fn forbidden(a: &Attributes, reason: &str) -> ApiError {
    ApiError::Forbidden {
        message: a.forbidden_message(reason),
    }
}

/// Attributes for a check the server makes on a user's behalf (impersonate, bind,
/// escalate), rather than for the request itself.
pub fn attributes(
    user: &UserInfo,
    verb: &str,
    group: &str,
    resource: &str,
    namespace: &str,
    name: &str,
) -> Attributes {
    Attributes {
        user: user.clone(),
        verb: verb.into(),
        resource_request: true,
        namespace: namespace.into(),
        api_group: group.into(),
        resource: resource.into(),
        name: name.into(),
        ..Attributes::default()
    }
}

/// `(kind, namespace, name)` of an RBAC store key.
fn parse_key(key: &[u8]) -> Option<(Kind, String, String)> {
    let rest = std::str::from_utf8(key).ok()?.strip_prefix(RBAC_PREFIX)?;
    let parts: Vec<&str> = rest.split('/').collect();
    match parts.as_slice() {
        [plural, ns, name] => Some((Kind::of_plural(plural)?, ns.to_string(), name.to_string())),
        [plural, name] => Some((Kind::of_plural(plural)?, String::new(), name.to_string())),
        _ => None,
    }
}

/// The node a pod is bound to: None if the pod does not exist, Some(None) if it is
/// unbound (or cannot be read). Asked on every pod status write of every node, so it is
/// answered from the pods' watch cache ([`crate::watchcache::WatchCaches::look_up`]), as
/// kube-apiserver's Node authorizer answers from its graph of informers; a pod the cache
/// does not hold, or holds unbound, even once caught up, is read from the store.
async fn pod_node(objects: &Objects, ns: &str, name: &str) -> Option<Option<String>> {
    let pods = resources::builtin("Pod");
    let key = pods.key(Some(ns), name);
    let bound = |cache: &Cacher| {
        let node = cache.cached(&key)?.field(NODE_NAME).into_owned();
        (!node.is_empty()).then_some(node)
    };
    if let Lookup::Found(node) = objects.caches.look_up(objects, pods, bound).await {
        return Some(Some(node));
    }
    match objects.get(pods, Some(ns), name, ReadAt::Latest).await {
        Ok(None) => None,
        Ok(Some((pod, _))) => Some(
            pod.pointer("/spec/nodeName")
                .and_then(Value::as_str)
                .map(String::from),
        ),
        Err(_) => Some(None),
    }
}

/// Whether a pod bound to `node` in `ns` uses the object: a Secret or ConfigMap through
/// a volume (projected ones included), an environment variable or an image pull secret;
/// a claim through a volume; a ServiceAccount as its account.
///
/// Asked whenever a node reads a ConfigMap or Secret (at 5,000 nodes, hundreds of times
/// a second), so it is answered from the pods' watch cache through its index by node:
/// only the namespace's pods on `node` are looked at
/// ([`crate::watchcache::WatchCaches::look_up`]). When that cache is behind and does not
/// show such a pod, the answer is no, and the node asks again later, as it would of
/// kube-apiserver's graph: reading the store instead decoded every pod of the namespace
/// per ask, and under load, when the cache falls behind, that made the load worse. The
/// store is read only when no cache can answer (caching off, still loading, or over etcd
/// when the cache shows no such pod).
async fn used_by_pod_on(
    objects: &Objects,
    node: &str,
    resource: &str,
    ns: &str,
    name: &str,
) -> bool {
    let pods = resources::builtin("Pod");
    let scope = pods.key_prefix_in(Some(ns));
    let uses = |cache: &Cacher| {
        cache
            .on_node(node, &scope)
            .iter()
            .any(|pod| PodRefs::of_json(pod.json()).is_some_and(|r| r.uses(resource, name)))
            .then_some(())
    };
    match objects.caches.look_up(objects, pods, uses).await {
        Lookup::Found(()) => return true,
        Lookup::Missing | Lookup::Behind => return false,
        Lookup::NoCache => {}
    }
    let Ok(page) = objects
        .list(pods, Some(ns), ReadAt::Latest, 0, None, |p| {
            p.pointer("/spec/nodeName").and_then(Value::as_str) == Some(node)
        })
        .await
    else {
        return false;
    };
    page.items.iter().any(|pod| pod_uses(pod, resource, name))
}

/// Whether an autoscaler in `ns` with `minReplicas: 0` targets `name`, of `resource` in
/// `group`: a workload that every node may wake.
async fn scales_to_zero(
    objects: &Objects,
    group: &str,
    resource: &str,
    ns: &str,
    name: &str,
) -> bool {
    let served = objects.registry.snapshot();
    let hpas = resources::builtin("HorizontalPodAutoscaler");
    let Ok(page) = objects
        .list(hpas, Some(ns), ReadAt::Latest, 0, None, |h| {
            h.pointer("/spec/minReplicas").and_then(Value::as_i64) == Some(0)
                && h.pointer("/spec/scaleTargetRef/name")
                    .and_then(Value::as_str)
                    == Some(name)
        })
        .await
    else {
        return false;
    };
    page.items.iter().any(|h| {
        let target = &h["spec"]["scaleTargetRef"];
        let api_version = target["apiVersion"].as_str().unwrap_or("");
        let target_group = api_version.rsplit_once('/').map_or("", |(g, _)| g);
        let kind = target["kind"].as_str().unwrap_or("");
        target_group == group
            && served
                .all()
                .any(|r| r.group == group && r.kind == kind && r.plural == resource)
    })
}

/// Whether an Ingress of Baton's class in `ns` names Secret `name` for TLS: every node
/// serves such an Ingress, so every node may read its certificate.
async fn ingress_tls(objects: &Objects, ns: &str, name: &str) -> bool {
    use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
    let classes = resources::builtin("IngressClass");
    let Ok(classes) = objects
        .list(classes, None, ReadAt::Latest, 0, None, |_| true)
        .await
    else {
        return false;
    };
    let classes: Vec<IngressClass> = classes
        .items
        .into_iter()
        .filter_map(|c| serde_json::from_value(c).ok())
        .collect();
    let ingresses = resources::builtin("Ingress");
    let Ok(page) = objects
        .list(ingresses, Some(ns), ReadAt::Latest, 0, None, |i| {
            i.pointer("/spec/tls")
                .and_then(Value::as_array)
                .is_some_and(|tls| tls.iter().any(|t| t["secretName"] == name))
        })
        .await
    else {
        return false;
    };
    page.items
        .into_iter()
        .filter_map(|i| serde_json::from_value::<Ingress>(i).ok())
        .any(|i| baton_kube::ingress::is_ours(&i, &classes))
}

/// Whether `pod` names `name` of `resource` (see [`pod_refs::PodRefs::uses`]).
pub(crate) fn pod_uses(pod: &Value, resource: &str, name: &str) -> bool {
    PodRefs::of_value(pod).is_some_and(|refs| refs.uses(resource, name))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn keys_name_kind_namespace_and_name() {
        let k = |s: &str| parse_key(s.as_bytes());
        assert_eq!(
            k("/registry/rbac.authorization.k8s.io/rolebindings/ns/b"),
            Some((Kind::RoleBinding, "ns".into(), "b".into()))
        );
        assert_eq!(
            k("/registry/rbac.authorization.k8s.io/clusterroles/view"),
            Some((Kind::ClusterRole, "".into(), "view".into()))
        );
        assert_eq!(k("/registry/rbac.authorization.k8s.io/other/x"), None);
    }

    #[test]
    fn a_pod_uses_what_its_platform_annotations_name() {
        let pod = json!({"metadata": {"annotations": {
            "baton.dev/config-from": "settings, secret:api-keys",
            "baton.dev/keyvalue-buckets": "local, shared=redis:kv-redis"
        }}, "spec": {"containers": []}});
        assert!(pod_uses(&pod, "configmaps", "settings"));
        assert!(pod_uses(&pod, "secrets", "api-keys"));
        assert!(pod_uses(&pod, "secrets", "kv-redis"));
        assert!(!pod_uses(&pod, "secrets", "settings"));
        assert!(!pod_uses(&pod, "configmaps", "api-keys"));
        assert!(!pod_uses(&pod, "secrets", "local"));
    }

    #[test]
    fn a_pods_stored_json_reads_as_its_value_does() {
        let pod = json!({
            "metadata": {"name": "p", "labels": {"app": "web"}, "annotations": {
                "kubectl.kubernetes.io/last-applied-configuration": "{\"spec\":{\"x\":\"y\\\"z\"}}",
                "baton.dev/config-from": "settings"
            }},
            "spec": {
                "nodeName": "n1",
                "serviceAccountName": "builder",
                "volumes": [
                    {"name": "token", "projected": {"sources": [
                        {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}},
                        {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}}
                    ]}},
                    {"name": "scratch", "emptyDir": {}}
                ],
                "containers": [{"name": "c", "image": "i", "env": [{"name": "A", "value": "1"}], "envFrom": null,
                                "resources": {"limits": {"memory": "64Mi"}}}]
            },
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}
        });
        let json = serde_json::to_vec(&pod).unwrap();
        let refs = PodRefs::of_json(&json).expect("a pod reads");
        for (r, n, named) in [
            ("configmaps", "kube-root-ca.crt", true),
            ("configmaps", "settings", true),
            ("serviceaccounts", "builder", true),
            ("serviceaccounts", "default", false),
            ("secrets", "kube-root-ca.crt", false),
            ("configmaps", "scratch", false),
        ] {
            assert_eq!(refs.uses(r, n), named, "{r}/{n} from the JSON");
            assert_eq!(pod_uses(&pod, r, n), named, "{r}/{n} from the value");
        }
        // What is not a pod names nothing.
        assert!(PodRefs::of_json(b"[1]").is_none());
        assert!(!pod_uses(
            &json!({"spec": {"volumes": 3}}),
            "configmaps",
            "x"
        ));
    }

    #[test]
    fn a_pod_uses_what_its_spec_names() {
        let pod = json!({"spec": {
            "volumes": [
                {"name": "a", "secret": {"secretName": "vol-secret"}},
                {"name": "b", "projected": {"sources": [{"configMap": {"name": "proj-cm"}}]}},
                {"name": "c", "persistentVolumeClaim": {"claimName": "data"}}
            ],
            "imagePullSecrets": [{"name": "pull"}],
            "containers": [{"name": "x", "env": [{"name": "E", "valueFrom": {"secretKeyRef": {"name": "env-secret", "key": "k"}}}],
                            "envFrom": [{"configMapRef": {"name": "env-cm"}}]}]
        }});
        for (r, n) in [
            ("secrets", "vol-secret"),
            ("secrets", "pull"),
            ("secrets", "env-secret"),
            ("configmaps", "proj-cm"),
            ("configmaps", "env-cm"),
            ("persistentvolumeclaims", "data"),
            ("serviceaccounts", "default"),
        ] {
            assert!(pod_uses(&pod, r, n), "{r}/{n}");
        }
        assert!(!pod_uses(&pod, "secrets", "other"));
        assert!(!pod_uses(&pod, "configmaps", "vol-secret"));
    }
}
