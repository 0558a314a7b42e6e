//! Scale from zero: what Knative's activator does, done by the node that receives the
//! request.
//!
//! A workload may be scaled to zero by an autoscaler with `minReplicas: 0` (see the
//! controller manager's HPA). A request for it then finds its Service without a ready
//! endpoint. Rather than refusing, the node holds the request
//! ([`crate::proxy::Services::hold`]), asks here for one replica of the workload, and
//! forwards the request as soon as an endpoint is ready.
//!
//! - **Which workloads.** Only the targets of autoscalers with `minReplicas: 0` whose
//!   pods the Service selects (the Service's selector is within the target's scale
//!   selector). A workload scaled to zero by hand stays off: waking it would undo what
//!   its owner did. The Node authorizer lets a node scale exactly these targets.
//! - **Once.** The scale is read and written back with its resourceVersion, and only
//!   from zero: concurrent requests on one node wait for the first one's wake, and
//!   other nodes' wakes conflict and find the workload already up. A scale the
//!   autoscaler has raised meanwhile is never lowered.
//! - **Bounds.** A request is held for at most the wake timeout; then the Ingress answers
//!   503 and a Service connection is closed.
//! - **Not waiting for the pod.** The target's pod template is read beside its scale;
//!   when this wake took the target from zero, the held requests may be answered from a
//!   standby of it ([`crate::standby`]) until the pod is up.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::PodTemplateSpec;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, PostParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, ResourceExt};
use tokio::task::JoinHandle;
use tracing::Instrument;

/// How long a request may be held for a workload to come up from zero, by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a workload could not be woken.
#[derive(Debug, thiserror::Error)]
pub enum ActivatorError {
    #[error("finding the resource of {kind} {namespace}/{name}")]
    Discovery {
        kind: String,
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("scaling {kind} {namespace}/{name} up from zero")]
    Scale {
        kind: String,
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
}

/// A workload an autoscaler may scale to zero.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Target {
    namespace: String,
    api_version: String,
    kind: String,
    name: String,
}

/// A wake under way.
#[derive(Debug)]
struct Woken {
    at: Instant,
    /// The target's scale selector: which Services route to its pods.
    scale_selector: String,
    /// Its pod template, if it has one the node could read: what the node may answer
    /// from until the pod is up ([`crate::standby`]).
    template: Option<Arc<PodTemplateSpec>>,
}

/// A workload woken for a Service, with the pod template its pods are made from.
#[derive(Debug, Clone)]
pub struct WokenTemplate {
    /// `namespace/Kind/name`: one standby per workload.
    pub workload: String,
    pub template: Arc<PodTemplateSpec>,
}

/// Wakes workloads scaled to zero.
pub struct Activator {
    client: Client,
    hpas: Store<HorizontalPodAutoscaler>,
    /// Targets woken and not yet seen up: the rest of a burst of requests waits for the
    /// first one's wake instead of asking again. Cleared when a Service of the target has
    /// an endpoint ([`Activator::up`]), so that the next time the target is at zero it is
    /// woken again.
    woken: Mutex<HashMap<Target, Woken>>,
    /// One wake at a time: the burst's later requests find the first one's result.
    waking: tokio::sync::Mutex<()>,
    /// Each target kind's resource, found by discovery once: a wake is on a request's
    /// path.
    resources: Mutex<HashMap<GroupVersionKind, ApiResource>>,
    /// How long a request is held.
    pub timeout: Duration,
}

impl std::fmt::Debug for Activator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Activator")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// The equality terms of a label selector string (`a=b,c==d`); set-based terms are left
/// out, so a match on them is never assumed.
fn equality_terms(selector: &str) -> BTreeMap<&str, &str> {
    selector
        .split(',')
        .filter_map(|t| {
            let (k, v) = t.split_once("==").or_else(|| t.split_once('='))?;
            let k = k.trim();
            (!k.ends_with('!')).then_some((k, v.trim()))
        })
        .collect()
}

/// Whether every pod of a workload whose scale selector is `scale_selector` is one a
/// Service with `service_selector` routes to.
fn selects(service_selector: &BTreeMap<String, String>, scale_selector: &str) -> bool {
    let terms = equality_terms(scale_selector);
    !service_selector.is_empty()
        && service_selector
            .iter()
            .all(|(k, v)| terms.get(k.as_str()) == Some(&v.as_str()))
}

impl Activator {
    /// Starts watching autoscalers.
    pub fn start(client: Client, timeout: Duration) -> (Arc<Self>, JoinHandle<()>) {
        let (store, writer) = reflector::store::<HorizontalPodAutoscaler>();
        let watch = reflector::reflector(
            writer,
            watcher(
                Api::<HorizontalPodAutoscaler>::all(client.clone()),
                watcher::Config::default(),
            )
            .default_backoff(),
        );
        let task = tokio::spawn(async move {
            watch.for_each(|_| async {}).await;
        });
        let activator = Arc::new(Self {
            client,
            hpas: store,
            woken: Mutex::default(),
            waking: tokio::sync::Mutex::new(()),
            resources: Mutex::default(),
            timeout,
        });
        (activator, task)
    }

    /// The targets in `ns` that autoscalers may scale to zero.
    fn targets(&self, ns: &str) -> Vec<Target> {
        let mut out: Vec<Target> = self
            .hpas
            .state()
            .iter()
            .filter(|h| h.namespace().as_deref() == Some(ns))
            .filter_map(|h| {
                let spec = h.spec.as_ref()?;
                if spec.min_replicas != Some(0) {
                    return None;
                }
                let t = &spec.scale_target_ref;
                Some(Target {
                    namespace: ns.to_string(),
                    api_version: t.api_version.clone().unwrap_or_default(),
                    kind: t.kind.clone(),
                    name: t.name.clone(),
                })
            })
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Whether `t` was woken lately, and if so whether its pods are the Service's.
    fn recently_woken(&self, t: &Target, selector: &BTreeMap<String, String>) -> Option<bool> {
        let woken = self.woken.lock().unwrap_or_else(|e| e.into_inner());
        let w = woken.get(t)?;
        (w.at.elapsed() < self.timeout).then(|| selects(selector, &w.scale_selector))
    }

    /// The pod templates of the workloads in `ns` woken for a Service with `selector`
    /// and not yet up.
    pub fn woken_templates(
        &self,
        ns: &str,
        selector: &BTreeMap<String, String>,
    ) -> Vec<WokenTemplate> {
        let woken = self.woken.lock().unwrap_or_else(|e| e.into_inner());
        woken
            .iter()
            .filter(|(t, w)| {
                t.namespace == ns
                    && w.at.elapsed() < self.timeout
                    && selects(selector, &w.scale_selector)
            })
            .filter_map(|(t, w)| {
                Some(WokenTemplate {
                    workload: format!("{}/{}/{}", t.namespace, t.kind, t.name),
                    template: w.template.clone()?,
                })
            })
            .collect()
    }

    /// Asks for one replica of each workload in `ns` scaled to zero whose pods a Service
    /// with `selector` routes to. True if there is such a workload (woken now, or
    /// already on its way up): the caller then waits for an endpoint.
    pub async fn wake(
        &self,
        ns: &str,
        selector: &BTreeMap<String, String>,
    ) -> Result<bool, ActivatorError> {
        let targets = self.targets(ns);
        if targets.is_empty() || selector.is_empty() {
            return Ok(false);
        }
        let _one = self.waking.lock().await;
        let mut found = false;
        for t in targets {
            if let Some(ours) = self.recently_woken(&t, selector) {
                found |= ours;
                continue;
            }
            let span = tracing::info_span!(
                "scale_from_zero",
                namespace = %t.namespace,
                kind = %t.kind,
                name = %t.name,
            );
            if let Some((scale_selector, template)) =
                self.wake_one(&t, selector).instrument(span).await?
            {
                found = true;
                self.woken.lock().unwrap_or_else(|e| e.into_inner()).insert(
                    t,
                    Woken {
                        at: Instant::now(),
                        scale_selector,
                        template: template.map(Arc::new),
                    },
                );
            }
        }
        Ok(found)
    }

    /// A Service in `ns` with `selector` has an endpoint again: the wakes of its targets
    /// are over.
    pub fn up(&self, ns: &str, selector: &BTreeMap<String, String>) {
        self.woken
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|t, w| t.namespace != ns || !selects(selector, &w.scale_selector));
    }

    /// Scales `t` from zero to one if a Service with `selector` routes to its pods.
    /// Returns its scale selector if it does (whatever its scale was), with its pod
    /// template if this wake scaled it from zero and the node may read it; None if the
    /// target is not there or not the Service's.
    async fn wake_one(
        &self,
        t: &Target,
        selector: &BTreeMap<String, String>,
    ) -> Result<Option<(String, Option<PodTemplateSpec>)>, ActivatorError> {
        let (group, version) = match t.api_version.split_once('/') {
            Some((g, v)) => (g, v),
            None => ("", t.api_version.as_str()),
        };
        let gvk = GroupVersionKind::gvk(group, version, &t.kind);
        let known = self
            .resources
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&gvk)
            .cloned();
        let ar = match known {
            Some(ar) => ar,
            None => {
                let (ar, _) = kube::discovery::pinned_kind(&self.client, &gvk)
                    .await
                    .map_err(|source| ActivatorError::Discovery {
                        kind: t.kind.clone(),
                        namespace: t.namespace.clone(),
                        name: t.name.clone(),
                        source,
                    })?;
                self.resources
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(gvk, ar.clone());
                ar
            }
        };
        let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), &t.namespace, &ar);
        let failed = |source| ActivatorError::Scale {
            kind: t.kind.clone(),
            namespace: t.namespace.clone(),
            name: t.name.clone(),
            source,
        };
        // The template is read beside the scale, so that it costs the wake no time. A
        // target without one (a custom resource's scale), or one the node may not read,
        // is woken all the same.
        let (template, first_scale) = tokio::join!(api.get(&t.name), api.get_scale(&t.name));
        let template: Option<PodTemplateSpec> = template
            .ok()
            .and_then(|o| serde_json::from_value(o.data.pointer("/spec/template")?.clone()).ok());
        let mut first_scale = Some(first_scale);
        // A few times at most: a conflict means someone else wrote the scale, which is then
        // read again and is usually up already.
        for _ in 0..3 {
            let got = match first_scale.take() {
                Some(got) => got,
                None => api.get_scale(&t.name).await,
            };
            let mut scale = match got {
                Ok(s) => s,
                Err(kube::Error::Api(e)) if e.code == 404 => return Ok(None),
                Err(e) => return Err(failed(e)),
            };
            let scale_selector = scale
                .status
                .as_ref()
                .and_then(|s| s.selector.clone())
                .unwrap_or_default();
            if !selects(selector, &scale_selector) {
                return Ok(None);
            }
            let replicas = scale.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0);
            if replicas > 0 {
                // Up already, or on its way: its pods, not a standby, answer. (A
                // workload that cannot be scheduled is not served from standbys forever.)
                return Ok(Some((scale_selector, None)));
            }
            scale.spec.get_or_insert_with(Default::default).replicas = Some(1);
            scale.status = None;
            let body = serde_json::to_vec(&scale).expect("a Scale serializes");
            match api
                .replace_scale(&t.name, &PostParams::default(), body)
                .await
            {
                Ok(_) => {
                    tracing::info!("woke a workload scaled to zero for a request");
                    return Ok(Some((scale_selector, template)));
                }
                Err(kube::Error::Api(e)) if e.code == 409 => continue,
                Err(e) => return Err(failed(e)),
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_service_wakes_only_workloads_whose_pods_it_selects() {
        let svc = labels(&[("app", "hello")]);
        assert!(selects(&svc, "app=hello"));
        assert!(selects(&svc, "app==hello,tier=web"));
        assert!(!selects(&svc, "app=other"));
        assert!(
            !selects(&svc, "tier=web"),
            "a label the workload does not fix"
        );
        assert!(
            !selects(&svc, "app!=hello"),
            "a set-based or negated term is never taken for a match"
        );
        assert!(!selects(&svc, "app in (hello)"));
        assert!(
            !selects(&BTreeMap::new(), "app=hello"),
            "a Service without a selector routes to no workload"
        );
        let two = labels(&[("app", "hello"), ("tier", "web")]);
        assert!(selects(&two, "app=hello,tier=web"));
        assert!(!selects(&two, "app=hello"));
    }
}
