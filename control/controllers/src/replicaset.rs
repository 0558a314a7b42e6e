//! The ReplicaSet controller: keeps `spec.replicas` pods of the template running. It also
//! runs ReplicationControllers, the ReplicaSet's older form (a plain map as selector), as
//! kube-controller-manager does: both become a [`Set`] and go through one reconcile.
//!
//! ## Expected flow
//! Each reconcile counts the active pods the ReplicaSet controls (by controller owner
//! reference), creates the missing ones or deletes the surplus, and writes the status
//! (`replicas`, `readyReplicas`, `availableReplicas`, `observedGeneration`).
//!
//! ## Guarantees
//! - No double creation: [`Expectations`](crate::expectations::Expectations) hold back a
//!   reconcile until the pods it asked for show up in the store (or 30 s pass).
//! - Surplus pods are deleted worst first: unscheduled, then pending, then not ready,
//!   then the youngest, as kube-controller-manager ranks them.
//! - A pod counts as available once it has been Ready for `minReadySeconds`.

use std::sync::Arc;
use std::time::Duration;

use baton_kube::events::EventType;
use baton_kube::pod;
use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{ReplicaSet, ReplicaSetStatus};
use k8s_openapi::api::core::v1::{ObjectReference, Pod, PodTemplateSpec, ReplicationController};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

use crate::Ctx;

/// Pods created per reconcile at most; the rest come on the next pass.
const BURST: usize = 500;
/// The first batch of a burst; each next batch is twice the last.
const SLOW_START: usize = 1;

/// Why a ReplicaSet could not be reconciled (it is retried).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("creating a pod for {rs}")]
    CreatePod {
        rs: String,
        #[source]
        source: kube::Error,
    },
    #[error("deleting pod {pod}")]
    DeletePod {
        pod: String,
        #[source]
        source: kube::Error,
    },
    #[error("updating the status of {rs}")]
    Status {
        rs: String,
        #[source]
        source: kube::Error,
    },
    #[error("{0} has no namespace or UID")]
    Incomplete(String),
}

const NAME_CHARS: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

/// `NAME-xxxxx`, as the API server's generateName would make it; made here so that the
/// expectation can name the pod before it exists.
pub fn generate_name(base: &str) -> String {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    let suffix: String = (0..5)
        .map(|_| NAME_CHARS[rng.gen_range(0..NAME_CHARS.len())] as char)
        .collect();
    let base = if base.len() > 57 { &base[..57] } else { base };
    format!("{base}-{suffix}")
}

/// The pod a template describes, named `name` and controlled by `owner` (a ReplicaSet or
/// a Job), which blocks the owner's foreground deletion until the pod is gone.
pub fn pod_from_template<K: Resource<DynamicType = ()>>(
    owner: &K,
    template: PodTemplateSpec,
    name: &str,
) -> Pod {
    pod_owned_by(
        owner.controller_owner_ref(&()),
        owner.meta().namespace.clone(),
        template,
        name,
    )
}

fn pod_owned_by(
    owner: Option<OwnerReference>,
    namespace: Option<String>,
    template: PodTemplateSpec,
    name: &str,
) -> Pod {
    let mut meta = template.metadata.unwrap_or_default();
    meta.name = Some(name.to_string());
    meta.namespace = namespace;
    meta.owner_references = owner.map(|mut o| {
        o.block_owner_deletion = Some(true);
        vec![o]
    });
    Pod {
        metadata: meta,
        spec: template.spec,
        status: None,
    }
}

/// Which kind a [`Set`] is, for writing its status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SetKind {
    ReplicaSet,
    ReplicationController,
}

/// What the controller keeps running, whichever kind it came as.
#[derive(Debug)]
pub struct Set {
    kind: SetKind,
    namespace: String,
    name: String,
    uid: String,
    deleting: bool,
    replicas: usize,
    min_ready: Duration,
    template: Option<PodTemplateSpec>,
    generation: Option<i64>,
    owner: Option<OwnerReference>,
    object: ObjectReference,
    status: ReplicaSetStatus,
}

fn min_ready(seconds: Option<i32>) -> Duration {
    Duration::from_secs(seconds.unwrap_or(0).max(0) as u64)
}

impl Set {
    /// What either kind says, from its metadata and the parts of its spec and status both
    /// have. None if it has no namespace or UID yet.
    fn new<K: Resource<DynamicType = ()>>(
        obj: &K,
        kind: SetKind,
        (replicas, min_ready_seconds, template): (
            Option<i32>,
            Option<i32>,
            Option<&PodTemplateSpec>,
        ),
        status: ReplicaSetStatus,
    ) -> Option<Self> {
        let meta = obj.meta();
        Some(Set {
            kind,
            namespace: meta.namespace.clone()?,
            uid: meta.uid.clone()?,
            name: obj.name_any(),
            deleting: meta.deletion_timestamp.is_some(),
            replicas: replicas.unwrap_or(1).max(0) as usize,
            min_ready: min_ready(min_ready_seconds),
            template: template.cloned(),
            generation: meta.generation,
            owner: obj.controller_owner_ref(&()),
            object: obj.object_ref(&()),
            status,
        })
    }

    fn of_replicaset(rs: &ReplicaSet) -> Option<Self> {
        let spec = rs.spec.as_ref();
        let parts = (
            spec.and_then(|s| s.replicas),
            spec.and_then(|s| s.min_ready_seconds),
            spec.and_then(|s| s.template.as_ref()),
        );
        Set::new(
            rs,
            SetKind::ReplicaSet,
            parts,
            rs.status.clone().unwrap_or_default(),
        )
    }

    fn of_replication_controller(rc: &ReplicationController) -> Option<Self> {
        let spec = rc.spec.as_ref();
        let parts = (
            spec.and_then(|s| s.replicas),
            spec.and_then(|s| s.min_ready_seconds),
            spec.and_then(|s| s.template.as_ref()),
        );
        let status = rc.status.clone().unwrap_or_default();
        // The fields both kinds' statuses have, under the same names.
        let status = ReplicaSetStatus {
            replicas: status.replicas,
            ready_replicas: status.ready_replicas,
            available_replicas: status.available_replicas,
            fully_labeled_replicas: status.fully_labeled_replicas,
            observed_generation: status.observed_generation,
            ..Default::default()
        };
        Set::new(rc, SetKind::ReplicationController, parts, status)
    }

    fn template_labels(&self) -> BTreeMap<String, String> {
        self.template
            .as_ref()
            .and_then(|t| t.metadata.as_ref())
            .and_then(|m| m.labels.clone())
            .unwrap_or_default()
    }
}

/// Lower sorts first: the pods to delete first when scaling down.
fn deletion_rank(p: &Pod) -> (u8, u8, u8, i64, std::cmp::Reverse<Option<i64>>) {
    let assigned = p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some() as u8;
    let phase = match pod::phase(p) {
        "Pending" => 0,
        "Running" => 2,
        _ => 1,
    };
    let ready = pod::is_ready(p) as u8;
    let restarts: i64 = p
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .map(|cs| cs.iter().map(|c| c.restart_count as i64).sum())
        .unwrap_or(0);
    let created = p
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| t.0.timestamp_nanos_opt().unwrap_or_default());
    (
        assigned,
        phase,
        ready,
        -restarts,
        std::cmp::Reverse(created),
    )
}

/// Ready for at least `min_ready` (and when it will be, if not yet).
pub fn available(p: &Pod, min_ready: Duration) -> (bool, Option<Duration>) {
    if !pod::is_ready(p) {
        return (false, None);
    }
    if min_ready.is_zero() {
        return (true, None);
    }
    let since = pod::condition(p, "Ready")
        .and_then(|c| c.last_transition_time.as_ref())
        .map(|t| (pod::now().0 - t.0).to_std().unwrap_or_default())
        .unwrap_or_default();
    if since >= min_ready {
        (true, None)
    } else {
        (false, Some(min_ready - since))
    }
}

pub async fn reconcile(rs: Arc<ReplicaSet>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let set = Set::of_replicaset(&rs).ok_or_else(|| Error::Incomplete(rs.name_any()))?;
    reconcile_set(set, ctx).await
}

pub async fn reconcile_replication_controller(
    rc: Arc<ReplicationController>,
    ctx: Arc<Ctx>,
) -> Result<Action, Error> {
    let set =
        Set::of_replication_controller(&rc).ok_or_else(|| Error::Incomplete(rc.name_any()))?;
    reconcile_set(set, ctx).await
}

async fn reconcile_set(set: Set, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let (ns, uid, name) = (set.namespace.clone(), set.uid.clone(), set.name.clone());
    if set.deleting {
        ctx.expectations.forget(&uid);
        return Ok(Action::await_change());
    }
    let owned: Vec<Arc<Pod>> = crate::owned_pods(&ctx, &ns, &uid);
    let active: Vec<&Arc<Pod>> = owned.iter().filter(|p| pod::is_active(p)).collect();
    let present = owned.iter().map(|p| {
        (
            p.metadata.name.as_deref().unwrap_or(""),
            p.metadata.uid.as_deref().unwrap_or(""),
        )
    });
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let want = set.replicas;
    let satisfied = ctx.expectations.satisfied(&uid, present);
    if satisfied {
        if active.len() < want {
            let mut left = (want - active.len()).min(BURST);
            let mut batch = SLOW_START;
            let mut first_err = None;
            // In batches that double, as kube-controller-manager's `slowStartBatch`: a
            // burst that is going to fail (a quota, a template the API refuses) fails on
            // one pod, not 500, and the pods not tried are not expected.
            while left > 0 && first_err.is_none() {
                let size = batch.min(left);
                left -= size;
                batch *= 2;
                let creates = (0..size).map(|_| {
                    let pod_name = generate_name(&name);
                    ctx.expectations.expect_create(&uid, &pod_name);
                    let pod = pod_owned_by(
                        set.owner.clone(),
                        Some(ns.clone()),
                        set.template.clone().unwrap_or_default(),
                        &pod_name,
                    );
                    let (api, ctx) = (api.clone(), &ctx);
                    async move {
                        // The semaphore is never closed.
                        let _seat = ctx.pod_creates.acquire().await.ok();
                        (pod_name, api.create(&PostParams::default(), &pod).await)
                    }
                });
                let created = futures::future::join_all(creates).await;
                // The recorder writes in the background and keeps only client-go's
                // budget of a burst's events (the rest are counted, not written), so
                // telling costs this reconcile nothing.
                for (pod_name, res) in created {
                    crate::tell_pod_created(&ctx, &set.object, &pod_name, &res);
                    if let Err(e) = res {
                        ctx.expectations.creation_failed(&uid, &pod_name);
                        first_err.get_or_insert(e);
                    }
                }
            }
            if let Some(source) = first_err {
                return Err(Error::CreatePod {
                    rs: format!("{ns}/{name}"),
                    source,
                });
            }
        } else if active.len() > want {
            let mut victims = active.clone();
            victims.sort_by_key(|p| deletion_rank(p));
            for p in victims.into_iter().take(active.len() - want) {
                let pod_name = p.name_any();
                ctx.expectations
                    .expect_delete(&uid, p.metadata.uid.as_deref().unwrap_or(""));
                match api.delete(&pod_name, &DeleteParams::default()).await {
                    Ok(_) => ctx.recorder.publish(
                        &set.object,
                        EventType::Normal,
                        "SuccessfulDelete",
                        &format!("Deleted pod: {pod_name}"),
                    ),
                    Err(kube::Error::Api(s)) if s.code == 404 => {}
                    Err(source) => {
                        return Err(Error::DeletePod {
                            pod: format!("{ns}/{pod_name}"),
                            source,
                        })
                    }
                }
            }
        }
    }
    let min_ready = set.min_ready;
    let mut next_check: Option<Duration> = None;
    let mut status = ReplicaSetStatus {
        replicas: active.len() as i32,
        observed_generation: set.generation,
        ..Default::default()
    };
    let template_labels = set.template_labels();
    let (mut labeled, mut ready, mut avail) = (0, 0, 0);
    for p in &active {
        let labels = p.metadata.labels.clone().unwrap_or_default();
        if template_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
        {
            labeled += 1;
        }
        if pod::is_ready(p) {
            ready += 1;
        }
        match available(p, min_ready) {
            (true, _) => avail += 1,
            (false, Some(wait)) => next_check = Some(next_check.map_or(wait, |n| n.min(wait))),
            _ => {}
        }
    }
    status.fully_labeled_replicas = Some(labeled);
    status.ready_replicas = Some(ready);
    status.available_replicas = Some(avail);
    let current = &set.status;
    if current.replicas != status.replicas
        || current.ready_replicas.unwrap_or(0) != ready
        || current.available_replicas.unwrap_or(0) != avail
        || current.fully_labeled_replicas.unwrap_or(0) != labeled
        || current.observed_generation != status.observed_generation
    {
        // Both kinds' statuses have these fields under the same names: one patch serves.
        let patch = Patch::Merge(json!({ "status": status }));
        let params = PatchParams::default();
        let written = match set.kind {
            SetKind::ReplicaSet => Api::<ReplicaSet>::namespaced(ctx.client.clone(), &ns)
                .patch_status(&name, &params, &patch)
                .await
                .map(|_| ()),
            SetKind::ReplicationController => {
                Api::<ReplicationController>::namespaced(ctx.client.clone(), &ns)
                    .patch_status(&name, &params, &patch)
                    .await
                    .map(|_| ())
            }
        };
        match written {
            Ok(_) | Err(kube::Error::Api(kube::core::ErrorResponse { code: 404, .. })) => {}
            Err(source) => {
                return Err(Error::Status {
                    rs: format!("{ns}/{name}"),
                    source,
                })
            }
        }
    }
    // Unmet expectations are met by watch events; look again soon in case one is lost.
    if !satisfied {
        next_check =
            Some(next_check.map_or(Duration::from_secs(1), |n| n.min(Duration::from_secs(1))));
    }
    Ok(match next_check {
        Some(d) => Action::requeue(d + Duration::from_millis(50)),
        None => Action::await_change(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::World;
    use serde_json::json;

    fn replicaset(replicas: usize) -> Arc<ReplicaSet> {
        Arc::new(
            serde_json::from_value(json!({
                "apiVersion": "apps/v1", "kind": "ReplicaSet",
                "metadata": {"name": "web", "namespace": "default", "uid": "rs-uid"},
                "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "web"}},
                         "template": {"metadata": {"labels": {"app": "web"}},
                                      "spec": {"containers": [{"name": "c", "image": "i"}]}}},
            }))
            .unwrap(),
        )
    }

    fn pod_creations(w: &World) -> usize {
        w.api
            .calls()
            .iter()
            .filter(|c| c.method == "POST" && c.path == "/api/v1/namespaces/default/pods")
            .count()
    }

    #[tokio::test]
    async fn a_burst_that_fails_stops_at_its_first_batch() {
        let w = World::new();
        w.api.fail("POST", "/pods", 403);
        let err = reconcile(replicaset(10), w.ctx.clone()).await.unwrap_err();
        assert!(matches!(err, Error::CreatePod { .. }), "{err:?}");
        assert_eq!(pod_creations(&w), 1);
        assert_eq!(w.events().await, ["Warning FailedCreate"]);
        // Nothing is expected of the pods never tried: the next pass tries again.
        w.api.clear();
        w.api.heal();
        reconcile(replicaset(10), w.ctx.clone()).await.unwrap();
        assert_eq!(pod_creations(&w), 10);
    }

    #[tokio::test]
    async fn a_replication_controller_runs_its_pods_as_a_replica_set_would() {
        let w = World::new();
        let rc: ReplicationController = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "ReplicationController",
            "metadata": {"name": "old", "namespace": "default", "uid": "rc-uid", "generation": 1},
            "spec": {"replicas": 2, "selector": {"app": "old"},
                     "template": {"metadata": {"labels": {"app": "old"}},
                                  "spec": {"containers": [{"name": "c", "image": "i"}]}}},
        }))
        .unwrap();
        reconcile_replication_controller(Arc::new(rc), w.ctx.clone())
            .await
            .unwrap();
        let creates: Vec<_> = w
            .api
            .calls()
            .into_iter()
            .filter(|c| c.method == "POST" && c.path == "/api/v1/namespaces/default/pods")
            .collect();
        assert_eq!(creates.len(), 2);
        let owner = &creates[0].body["metadata"]["ownerReferences"][0];
        assert_eq!(owner["kind"], "ReplicationController");
        assert_eq!(owner["apiVersion"], "v1");
        assert_eq!(owner["uid"], "rc-uid");
        assert_eq!(owner["controller"], true);
        assert_eq!(creates[0].body["metadata"]["labels"]["app"], "old");
        // Its status goes to its own kind.
        let status = w
            .api
            .calls()
            .into_iter()
            .find(|c| {
                c.method == "PATCH"
                    && c.path == "/api/v1/namespaces/default/replicationcontrollers/old/status"
            })
            .expect("a status update");
        assert_eq!(status.body["status"]["observedGeneration"], 1);
        assert_eq!(
            w.events().await,
            ["Normal SuccessfulCreate", "Normal SuccessfulCreate"]
        );
    }

    #[test]
    fn the_worst_pods_go_first() {
        let p = |name: &str, node: Option<&str>, phase: &str, ready: bool| -> Pod {
            serde_json::from_value(json!({
                "metadata": {"name": name, "creationTimestamp": "2026-01-01T00:00:00Z"},
                "spec": {"containers": [], "nodeName": node},
                "status": {"phase": phase, "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]}
            }))
            .unwrap()
        };
        let mut pods = [
            p("ready", Some("n"), "Running", true),
            p("unscheduled", None, "Pending", false),
            p("notready", Some("n"), "Running", false),
            p("pending", Some("n"), "Pending", false),
        ];
        pods.sort_by_key(deletion_rank);
        let order: Vec<_> = pods.iter().map(|p| p.name_any()).collect();
        assert_eq!(order, ["unscheduled", "pending", "notready", "ready"]);
        assert!(generate_name("web-abc").starts_with("web-abc-"));
        assert_eq!(generate_name("web").len(), 9);
    }
}
