//! The ResourceQuota controller: recounts what a namespace uses.
//!
//! Admission charges each create to the quota's `status.used`, so a quota is never
//! overrun; it cannot give anything back. This controller does: it counts the objects
//! the quota's `spec.hard` names (with the same evaluators, `baton_kube::quota`) and
//! writes `status.hard` and `status.used`, replacing the object with its resourceVersion
//! so that a charge made meanwhile is never overwritten (the write conflicts, and the
//! next pass counts again). Pods changing requeue their namespace's quotas; every quota
//! is recounted each minute regardless.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use baton_kube::quota;
use k8s_openapi::api::core::v1::{Pod, ResourceQuota};
use kube::api::{ApiResource, DynamicObject, ListParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};
use serde_json::{json, Value};

use crate::Ctx;

/// Why a quota could not be recounted (it is retried).
#[derive(Debug, thiserror::Error)]
#[error("{action} for resourcequota {quota}")]
pub struct Error {
    quota: String,
    action: &'static str,
    #[source]
    source: kube::Error,
}

/// The resource (group, version, plural) whose objects a quota key counts.
fn counted_by(key: &str) -> Option<(String, String, String)> {
    let core = |plural: &str| Some((String::new(), "v1".to_string(), plural.to_string()));
    if let Some(rest) = key.strip_prefix("count/") {
        return match rest.split_once('.') {
            None => core(rest),
            // The group's preferred version is looked up by the caller.
            Some((plural, group)) => Some((group.to_string(), String::new(), plural.to_string())),
        };
    }
    match key {
        "pods" | "cpu" | "memory" | "ephemeral-storage" => core("pods"),
        k if k.starts_with("requests.") && k != "requests.storage" => core("pods"),
        k if k.starts_with("limits.") => core("pods"),
        "services" | "services.nodeports" | "services.loadbalancers" => core("services"),
        "persistentvolumeclaims" | "requests.storage" => core("persistentvolumeclaims"),
        "configmaps" | "secrets" | "replicationcontrollers" | "resourcequotas" => core(key),
        _ => None,
    }
}

async fn list(
    ctx: &Ctx,
    ns: &str,
    group: &str,
    version: &str,
    plural: &str,
) -> Result<Vec<Value>, kube::Error> {
    let version = if version.is_empty() {
        // A group's objects are the same in every version; any served one will do.
        let groups = ctx.client.list_api_groups().await?;
        groups
            .groups
            .iter()
            .find(|g| g.name == group)
            .and_then(|g| g.preferred_version.as_ref().map(|v| v.version.clone()))
            .unwrap_or_else(|| "v1".into())
    } else {
        version.to_string()
    };
    let ar = ApiResource {
        group: group.into(),
        version: version.clone(),
        api_version: if group.is_empty() {
            version
        } else {
            format!("{group}/{version}")
        },
        kind: String::new(),
        plural: plural.into(),
    };
    let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), ns, &ar);
    let objs = api.list(&ListParams::default()).await?;
    Ok(objs
        .items
        .into_iter()
        .filter_map(|o| serde_json::to_value(o).ok())
        .collect())
}

pub async fn reconcile(rq: Arc<ResourceQuota>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let ns = rq.namespace().unwrap_or_default();
    let name = rq.name_any();
    let err = |action: &'static str| {
        let quota = format!("{ns}/{name}");
        move |source| Error {
            quota,
            action,
            source,
        }
    };
    if rq.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let hard: BTreeMap<String, Value> = rq
        .spec
        .as_ref()
        .and_then(|s| s.hard.as_ref())
        .map(|h| h.iter().map(|(k, v)| (k.clone(), json!(v.0))).collect())
        .unwrap_or_default();
    let resources: BTreeSet<(String, String, String)> =
        hard.keys().filter_map(|k| counted_by(k)).collect();
    let mut used: BTreeMap<String, u128> = hard.keys().map(|k| (k.clone(), 0)).collect();
    for (group, version, plural) in resources {
        let objects = match list(&ctx, &ns, &group, &version, &plural).await {
            Ok(o) => o,
            // A kind nobody serves uses nothing.
            Err(kube::Error::Api(e)) if e.code == 404 => Vec::new(),
            Err(e) => return Err(err("counting objects")(e)),
        };
        for o in &objects {
            for (k, n) in quota::usage(&group, &plural, o) {
                if let Some(total) = used.get_mut(&k) {
                    *total += n;
                }
            }
        }
    }
    let used: BTreeMap<String, String> = used
        .into_iter()
        .map(|(k, n)| {
            let v = quota::format(&k, n);
            (k, v)
        })
        .collect();
    let current = rq.status.as_ref();
    let same = current.and_then(|s| s.used.as_ref()).map(|u| {
        u.iter()
            .map(|(k, v)| (k.clone(), v.0.clone()))
            .collect::<BTreeMap<_, _>>()
    }) == Some(used.clone())
        && current.and_then(|s| s.hard.as_ref()).map(|h| {
            h.iter()
                .map(|(k, v)| (k.clone(), json!(v.0)))
                .collect::<BTreeMap<_, _>>()
        }) == Some(hard.clone());
    if !same {
        let mut next = (*rq).clone();
        let status =
            serde_json::from_value(json!({"hard": hard, "used": used})).unwrap_or_default();
        next.status = Some(status);
        let api: Api<ResourceQuota> = Api::namespaced(ctx.client.clone(), &ns);
        match api
            .replace_status(
                &name,
                &PostParams::default(),
                serde_json::to_vec(&next).unwrap_or_default(),
            )
            .await
        {
            Ok(_) => {}
            // Charged or changed meanwhile: count again.
            Err(kube::Error::Api(e)) if e.code == 409 => {
                return Ok(Action::requeue(Duration::from_millis(200)))
            }
            Err(kube::Error::Api(e)) if e.code == 404 => return Ok(Action::await_change()),
            Err(e) => return Err(err("writing status")(e)),
        }
    }
    Ok(Action::requeue(Duration::from_secs(60)))
}

/// The quotas of a pod's namespace: a pod that comes or goes changes their use.
pub fn quotas_of_pod(ctx: &Ctx, pod: &Pod) -> Vec<ObjectRef<ResourceQuota>> {
    let ns = pod.namespace().unwrap_or_default();
    ctx.quotas
        .state()
        .iter()
        .filter(|q| q.namespace().as_deref() == Some(ns.as_str()))
        .map(|q| ObjectRef::from_obj(q.as_ref()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_keys_name_the_objects_they_count() {
        let core = |p: &str| Some((String::new(), "v1".to_string(), p.to_string()));
        assert_eq!(counted_by("requests.cpu"), core("pods"));
        assert_eq!(counted_by("memory"), core("pods"));
        assert_eq!(
            counted_by("requests.storage"),
            core("persistentvolumeclaims")
        );
        assert_eq!(counted_by("services.nodeports"), core("services"));
        assert_eq!(counted_by("count/secrets"), core("secrets"));
        assert_eq!(
            counted_by("count/deployments.apps"),
            Some(("apps".into(), String::new(), "deployments".into()))
        );
        assert_eq!(counted_by("something.else"), None);
    }
}
