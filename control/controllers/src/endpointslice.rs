//! The EndpointSlice controller: for each Service with a selector, one EndpointSlice
//! (named after the Service, labelled `kubernetes.io/service-name`) listing the pods it
//! selects that have an address, with their readiness. Node agents route Service traffic
//! from these slices.
//!
//! Ports: each Service port's `targetPort`, a number or the name of a container port of
//! the selected pods (looked up in the first pod that has it).

use std::collections::BTreeMap;
use std::sync::Arc;

use baton_kube::pod;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Patch, PatchParams};
use kube::core::SelectorExt;
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource, ResourceExt};
use serde_json::{json, Value};

use crate::Ctx;

pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
const MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
const MANAGER: &str = "endpointslice-controller.k8s.io";

/// Why a Service's endpoints could not be written (it is retried).
#[derive(Debug, thiserror::Error)]
#[error("writing the EndpointSlice of {service}")]
pub struct Error {
    service: String,
    #[source]
    source: kube::Error,
}

fn target_port(p: &IntOrString, pods: &[&Arc<Pod>], port: i32) -> Option<i32> {
    match p {
        IntOrString::Int(i) => Some(*i),
        IntOrString::String(name) => pods.iter().find_map(|pod| {
            pod.spec.as_ref()?.containers.iter().find_map(|c| {
                c.ports
                    .iter()
                    .flatten()
                    .find(|cp| cp.name.as_deref() == Some(name))
                    .map(|cp| cp.container_port)
            })
        }),
    }
    .or(Some(port))
}

/// The services a pod change may concern: those of its namespace.
pub fn services_of_pod(ctx: &Ctx, p: &Pod) -> Vec<ObjectRef<Service>> {
    let ns = p.namespace().unwrap_or_default();
    ctx.services
        .state()
        .iter()
        .filter(|s| s.namespace().as_deref() == Some(ns.as_str()))
        .map(|s| ObjectRef::from_obj(s.as_ref()))
        .collect()
}

pub async fn reconcile(svc: Arc<Service>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let ns = svc.namespace().unwrap_or_default();
    let name = svc.name_any();
    let spec = svc.spec.clone().unwrap_or_default();
    // Without a selector, endpoints are the user's to manage.
    let Some(sel) = spec.selector.clone().filter(|s| !s.is_empty()) else {
        return Ok(Action::await_change());
    };
    if svc.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let selector: kube::core::Selector = sel.into_iter().collect();
    let empty = BTreeMap::new();
    let mut pods: Vec<Arc<Pod>> = ctx
        .pods
        .state()
        .into_iter()
        .filter(|p| {
            p.namespace().as_deref() == Some(ns.as_str())
                && selector.matches(p.metadata.labels.as_ref().unwrap_or(&empty))
                && !pod::is_terminal(p)
                && p.status.as_ref().and_then(|s| s.pod_ip.as_ref()).is_some()
        })
        .collect();
    pods.sort_by_key(|p| p.name_any());
    let refs: Vec<&Arc<Pod>> = pods.iter().collect();
    let ports: Vec<Value> = spec
        .ports
        .iter()
        .flatten()
        .map(|p| {
            let target = p
                .target_port
                .as_ref()
                .and_then(|t| target_port(t, &refs, p.port))
                .unwrap_or(p.port);
            json!({"name": p.name.clone().unwrap_or_default(), "port": target,
                   "protocol": p.protocol.clone().unwrap_or_else(|| "TCP".into())})
        })
        .collect();
    let endpoints: Vec<Value> = pods
        .iter()
        .map(|p| {
            let terminating = p.metadata.deletion_timestamp.is_some();
            let ready = pod::is_ready(p) && !terminating;
            let mut e = json!({
                "addresses": [p.status.as_ref().and_then(|s| s.pod_ip.clone())],
                "conditions": {"ready": ready, "serving": pod::is_ready(p), "terminating": terminating},
                "nodeName": p.spec.as_ref().and_then(|s| s.node_name.clone()),
                "targetRef": {"kind": "Pod", "namespace": ns, "name": p.name_any(), "uid": p.uid()},
            });
            // A pod whose subdomain is this Service is named under it
            // (`<hostname>.<service>.<ns>.svc.cluster.local`), as a StatefulSet's are.
            let spec = p.spec.as_ref();
            if let (Some(host), Some(sub)) = (
                spec.and_then(|s| s.hostname.as_deref()),
                spec.and_then(|s| s.subdomain.as_deref()),
            ) {
                if sub == name {
                    e["hostname"] = json!(host);
                }
            }
            e
        })
        .collect();
    let desired = json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": {SERVICE_NAME_LABEL: name, MANAGED_BY: MANAGER},
            "ownerReferences": [svc.controller_owner_ref(&())],
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": ports,
    });
    let current = ctx
        .endpointslices
        .get(&ObjectRef::new(&name).within(&ns))
        .map(|s| serde_json::to_value(s.as_ref()).unwrap_or_default());
    let same = current.as_ref().is_some_and(|c| {
        c.get("endpoints").cloned().unwrap_or(json!([])) == desired["endpoints"]
            && c.get("ports").cloned().unwrap_or(json!([])) == desired["ports"]
    });
    if !same {
        let api: Api<EndpointSlice> = Api::namespaced(ctx.client.clone(), &ns);
        let pp = PatchParams::apply("endpointslice-controller").force();
        api.patch(&name, &pp, &Patch::Apply(&desired))
            .await
            .map_err(|source| Error {
                service: format!("{ns}/{name}"),
                source,
            })?;
    }
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::World;

    const SLICE: &str = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices/web";

    fn web() -> Value {
        json!({
            "metadata": {"name": "web", "namespace": "default", "uid": "svc-uid"},
            "spec": {"selector": {"app": "web"},
                     "ports": [{"name": "http", "port": 80, "targetPort": "http"},
                               {"name": "admin", "port": 9000, "targetPort": 9001}]}
        })
    }

    fn pod(name: &str, ns: &str, app: &str, ip: Option<&str>, phase: &str, ready: bool) -> Value {
        json!({
            "metadata": {"name": name, "namespace": ns, "uid": format!("{name}-uid"),
                         "labels": {"app": app}},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "i",
                     "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"phase": phase, "podIP": ip,
                       "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]}
        })
    }

    #[tokio::test]
    async fn a_service_lists_the_pods_it_selects_with_their_readiness() {
        let mut w = World::new();
        let svc = w.service(web());
        w.pod(pod(
            "web-1",
            "default",
            "web",
            Some("10.0.0.1"),
            "Running",
            true,
        ));
        w.pod(pod(
            "web-2",
            "default",
            "web",
            Some("10.0.0.2"),
            "Running",
            false,
        ));
        // Not listed: no address yet, finished, another namespace, other labels.
        w.pod(pod("web-3", "default", "web", None, "Pending", false));
        w.pod(pod(
            "web-4",
            "default",
            "web",
            Some("10.0.0.4"),
            "Succeeded",
            false,
        ));
        w.pod(pod(
            "web-5",
            "other",
            "web",
            Some("10.0.0.5"),
            "Running",
            true,
        ));
        w.pod(pod(
            "db-1",
            "default",
            "db",
            Some("10.0.0.6"),
            "Running",
            true,
        ));
        // Going away: still serving, no longer ready.
        let mut leaving = pod("web-7", "default", "web", Some("10.0.0.7"), "Running", true);
        leaving["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        w.pod(leaving);

        reconcile(svc, w.ctx.clone()).await.unwrap();

        assert_eq!(w.api.writes(), [format!("PATCH {SLICE}")]);
        let call = &w.api.calls()[0];
        assert!(call.query.contains("fieldManager=endpointslice-controller"));
        assert!(call.query.contains("force=true"));
        let slice = &call.body;
        assert_eq!(slice["metadata"]["labels"][SERVICE_NAME_LABEL], "web");
        assert_eq!(slice["metadata"]["ownerReferences"][0]["uid"], "svc-uid");
        // A named target port is looked up in the pods; a number is kept.
        assert_eq!(
            slice["ports"],
            json!([{"name": "http", "port": 8080, "protocol": "TCP"},
                   {"name": "admin", "port": 9001, "protocol": "TCP"}])
        );
        let seen: Vec<(String, bool, bool, bool)> = slice["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let c = &e["conditions"];
                (
                    e["addresses"][0].as_str().unwrap().to_string(),
                    c["ready"].as_bool().unwrap(),
                    c["serving"].as_bool().unwrap(),
                    c["terminating"].as_bool().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            seen,
            [
                ("10.0.0.1".into(), true, true, false),
                ("10.0.0.2".into(), false, false, false),
                ("10.0.0.7".into(), false, true, true),
            ]
        );
    }

    #[tokio::test]
    async fn a_slice_that_is_already_right_is_not_written_again() {
        let mut w = World::new();
        let svc = w.service(web());
        w.pod(pod(
            "web-1",
            "default",
            "web",
            Some("10.0.0.1"),
            "Running",
            true,
        ));
        reconcile(svc.clone(), w.ctx.clone()).await.unwrap();
        let written = w.api.calls()[0].body.clone();
        w.endpointslice(written);
        w.api.clear();
        reconcile(svc.clone(), w.ctx.clone()).await.unwrap();
        assert!(w.api.writes().is_empty(), "{:?}", w.api.writes());
        // A pod turning unready changes the slice again.
        w.pod(pod(
            "web-1",
            "default",
            "web",
            Some("10.0.0.1"),
            "Running",
            false,
        ));
        reconcile(svc, w.ctx.clone()).await.unwrap();
        assert_eq!(w.api.writes(), [format!("PATCH {SLICE}")]);
    }

    #[tokio::test]
    async fn services_without_a_selector_or_going_away_are_left_alone() {
        let mut w = World::new();
        let mut manual = web();
        manual["spec"]["selector"] = json!(null);
        reconcile(w.service(manual), w.ctx.clone()).await.unwrap();
        let mut going = web();
        going["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        reconcile(w.service(going), w.ctx.clone()).await.unwrap();
        assert!(w.api.calls().is_empty());
    }

    #[tokio::test]
    async fn a_failed_write_names_the_service_and_keeps_the_cause() {
        let mut w = World::new();
        w.api.fail("PATCH", "/endpointslices/web", 500);
        let err = reconcile(w.service(web()), w.ctx.clone())
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "writing the EndpointSlice of default/web");
        let source = std::error::Error::source(&err).expect("a cause");
        assert!(
            matches!(source.downcast_ref::<kube::Error>(), Some(kube::Error::Api(s)) if s.code == 500),
            "{source:?}"
        );
    }
}
