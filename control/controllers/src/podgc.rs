//! Pod garbage collection, as kube-controller-manager's PodGC does it, once every
//! [`CHECK_PERIOD`].
//!
//! A pod on a node is finished by its node alone: a deletion marks it and gives it its
//! grace period, and its node removes it once its containers have stopped. A pod whose
//! node is gone for good (the Node deleted) would wait for ever, Running or Terminating,
//! holding its name and its place behind a controller. The collector ends such pods:
//!
//! - **Orphaned pods**, bound to a node the node store has not held for [`QUARANTINE`]
//!   (a node that re-registers in the meantime keeps its pods), and which a live read
//!   confirms is gone. Each is marked Failed with a `DisruptionTarget` condition
//!   (reason `DeletionByPodGC`), so that a Job counts it as disrupted rather than
//!   failed by its own code, then deleted with a grace period of 0.
//! - **Unscheduled pods being deleted**, which finalizers kept past their deletion: no
//!   node will ever finish them.
//! - **Ended pods beyond [`TERMINATED_THRESHOLD`]** (kube-controller-manager's
//!   `--terminated-pod-gc-threshold`): the oldest go, so that the pods of finished Jobs
//!   whose owners keep them do not pile up without end.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use kube::{Api, ResourceExt};
use serde_json::json;
use tokio::time::Instant;
use tracing::Instrument;

use crate::Ctx;

/// How often the collector looks (kube-controller-manager's `gcCheckPeriod`).
pub const CHECK_PERIOD: Duration = Duration::from_secs(20);

/// How long a node must be missing before its pods count as orphaned: a node deleted
/// and registered again at once keeps them.
pub const QUARANTINE: Duration = Duration::from_secs(40);

/// Ended pods kept before the oldest are deleted.
pub const TERMINATED_THRESHOLD: usize = 12_500;

/// Why a pod is collected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Why {
    /// Its node is gone.
    Orphaned,
    /// It is being deleted and no node runs it.
    Unscheduled,
    /// It ended, and more ended pods than the threshold are kept.
    Terminated,
}

/// What the collector remembers between passes: since when each node its pods name has
/// been missing from the node store.
#[derive(Debug, Default)]
pub struct PodGc {
    missing_since: HashMap<String, Instant>,
}

impl PodGc {
    /// The pods to collect now, and why, from the stores as they are; `threshold` is the
    /// number of ended pods kept. Orphans are named with their node, which the caller
    /// confirms gone with a live read before touching them.
    pub fn plan(&mut self, ctx: &Ctx, now: Instant, threshold: usize) -> Vec<(Arc<Pod>, Why)> {
        let pods = ctx.pods.state();
        let mut out = Vec::new();
        let mut missing = HashMap::new();
        let mut ended = Vec::new();
        for pod in &pods {
            let node = pod
                .spec
                .as_ref()
                .and_then(|s| s.node_name.as_deref())
                .unwrap_or("");
            let deleting = pod.metadata.deletion_timestamp.is_some();
            if node.is_empty() {
                if deleting {
                    out.push((pod.clone(), Why::Unscheduled));
                }
                continue;
            }
            let gone = ctx
                .nodes
                .get(&kube::runtime::reflector::ObjectRef::<Node>::new(node))
                .is_none();
            if gone {
                let since = *missing
                    .entry(node.to_string())
                    .or_insert_with(|| self.missing_since.get(node).copied().unwrap_or(now));
                if now.duration_since(since) >= QUARANTINE {
                    out.push((pod.clone(), Why::Orphaned));
                }
                continue;
            }
            if !deleting && baton_kube::pod::is_terminal(pod) {
                ended.push(pod.clone());
            }
        }
        // Nodes back, or no longer named by any pod, are forgotten.
        self.missing_since = missing;
        if ended.len() > threshold {
            ended.sort_by(|a, b| {
                a.metadata
                    .creation_timestamp
                    .cmp(&b.metadata.creation_timestamp)
                    .then_with(|| a.name_any().cmp(&b.name_any()))
            });
            let excess = ended.len() - threshold;
            out.extend(ended.into_iter().take(excess).map(|p| (p, Why::Terminated)));
        }
        out
    }
}

/// Runs the collector until the task is dropped. It waits for the first lists of pods
/// and nodes: before them, every pod would look orphaned.
pub async fn run(ctx: Arc<Ctx>) {
    let _ = ctx.pods.wait_until_ready().await;
    let _ = ctx.nodes.wait_until_ready().await;
    let mut gc = PodGc::default();
    let mut tick = tokio::time::interval(CHECK_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let plan = gc.plan(&ctx, Instant::now(), TERMINATED_THRESHOLD);
        if plan.is_empty() {
            continue;
        }
        collect(&ctx, plan)
            .instrument(tracing::info_span!("podgc"))
            .await;
    }
}

/// Collects the pods planned: orphans once their node is confirmed gone.
pub async fn collect(ctx: &Ctx, plan: Vec<(Arc<Pod>, Why)>) {
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    // One live read per missing node, whatever the number of its pods.
    let mut confirmed: HashMap<String, bool> = HashMap::new();
    for (pod, why) in plan {
        if why == Why::Orphaned {
            let node = pod
                .spec
                .as_ref()
                .and_then(|s| s.node_name.clone())
                .unwrap_or_default();
            let gone = match confirmed.get(&node) {
                Some(g) => *g,
                None => {
                    let g = matches!(nodes.get_opt(&node).await, Ok(None));
                    confirmed.insert(node.clone(), g);
                    g
                }
            };
            if !gone {
                continue;
            }
        }
        if let Err(e) = collect_one(ctx, &pod, why).await {
            tracing::warn!(pod = %format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any()),
                error = %e, "collecting a pod failed");
        }
    }
}

async fn collect_one(ctx: &Ctx, pod: &Pod, why: Why) -> Result<(), kube::Error> {
    let (ns, name) = (pod.namespace().unwrap_or_default(), pod.name_any());
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    tracing::info!(pod = %format!("{ns}/{name}"), ?why, "collecting a pod");
    if why == Why::Orphaned {
        let mut status = json!({"conditions": [{
            "type": "DisruptionTarget",
            "status": "True",
            "reason": "DeletionByPodGC",
            "message": "PodGC: node no longer exists",
            "lastTransitionTime": baton_kube::pod::now(),
        }]});
        if !baton_kube::pod::is_terminal(pod) {
            status["phase"] = json!("Failed");
        }
        match api
            .patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Strategic(json!({"status": status})),
            )
            .await
        {
            Ok(_) | Err(kube::Error::Api(kube::core::ErrorResponse { code: 404, .. })) => {}
            Err(e) => return Err(e),
        }
    }
    let dp = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions {
            uid: pod.metadata.uid.clone(),
            resource_version: None,
        }),
        ..Default::default()
    };
    // A 409: the name now belongs to another pod (the UID precondition failed).
    match crate::delete_if_present(&api, &name, &dp).await {
        Ok(_) | Err(kube::Error::Api(kube::core::ErrorResponse { code: 409, .. })) => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn pod(name: &str, node: Option<&str>, phase: &str, created: &str) -> Value {
        let mut p = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "ns", "uid": format!("u-{name}"),
                "creationTimestamp": created},
            "spec": {"containers": [{"name": "c", "image": "x"}]},
            "status": {"phase": phase}});
        if let Some(n) = node {
            p["spec"]["nodeName"] = json!(n);
        }
        p
    }

    fn node(name: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}})
    }

    fn names(plan: &[(Arc<Pod>, Why)]) -> Vec<(String, Why)> {
        plan.iter().map(|(p, w)| (p.name_any(), *w)).collect()
    }

    #[tokio::test]
    async fn the_pods_of_a_node_gone_past_the_quarantine_are_failed_and_deleted() {
        let mut w = crate::fake::World::new();
        w.node(node("here"));
        w.pod(pod(
            "stays",
            Some("here"),
            "Running",
            "2026-01-01T00:00:00Z",
        ));
        w.pod(pod(
            "orphan",
            Some("gone"),
            "Running",
            "2026-01-01T00:00:00Z",
        ));
        let mut gc = PodGc::default();
        let t0 = Instant::now();
        assert!(gc.plan(&w.ctx, t0, 10).is_empty(), "quarantined first");
        // The node comes back within the quarantine: its pod is forgotten.
        w.node(node("gone"));
        assert!(gc.plan(&w.ctx, t0 + QUARANTINE / 2, 10).is_empty());
        w.node_gone(node("gone"));
        let t1 = t0 + QUARANTINE;
        assert!(gc.plan(&w.ctx, t1, 10).is_empty(), "a new quarantine");
        let plan = gc.plan(&w.ctx, t1 + QUARANTINE, 10);
        assert_eq!(names(&plan), [("orphan".to_string(), Why::Orphaned)]);

        w.api.fail("GET", "/api/v1/nodes/gone", 404);
        collect(&w.ctx, plan).await;
        let writes = w.api.write_calls();
        assert_eq!(
            writes
                .iter()
                .map(|c| format!("{} {}", c.method, c.path))
                .collect::<Vec<_>>(),
            [
                "PATCH /api/v1/namespaces/ns/pods/orphan/status",
                "DELETE /api/v1/namespaces/ns/pods/orphan"
            ]
        );
        let status = &writes[0].body["status"];
        assert_eq!(status["phase"], "Failed");
        assert_eq!(status["conditions"][0]["reason"], "DeletionByPodGC");
        assert_eq!(writes[1].body["gracePeriodSeconds"], 0);
        assert_eq!(writes[1].body["preconditions"]["uid"], "u-orphan");
    }

    #[tokio::test]
    async fn a_node_the_live_read_still_finds_keeps_its_pods() {
        let mut w = crate::fake::World::new();
        w.pod(pod("p", Some("lagging"), "Running", "2026-01-01T00:00:00Z"));
        let mut gc = PodGc::default();
        let t0 = Instant::now();
        gc.plan(&w.ctx, t0, 10);
        let plan = gc.plan(&w.ctx, t0 + QUARANTINE, 10);
        assert_eq!(plan.len(), 1);
        // The store is behind: the API server still has the node.
        w.api.object("/api/v1/nodes/lagging", node("lagging"));
        collect(&w.ctx, plan).await;
        assert!(w.api.write_calls().is_empty(), "{:?}", w.api.writes());
    }

    #[tokio::test]
    async fn unscheduled_pods_being_deleted_and_the_oldest_ended_pods_go() {
        let mut w = crate::fake::World::new();
        w.node(node("n"));
        let mut held = pod("held", None, "Pending", "2026-01-01T00:00:00Z");
        held["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:01:00Z");
        held["metadata"]["finalizers"] = json!(["example.com/hold"]);
        w.pod(held);
        w.pod(pod("pending", None, "Pending", "2026-01-01T00:00:00Z"));
        for (i, phase) in ["Succeeded", "Failed", "Succeeded"].iter().enumerate() {
            w.pod(pod(
                &format!("ended-{i}"),
                Some("n"),
                phase,
                &format!("2026-01-01T00:0{}:00Z", 3 - i),
            ));
        }
        w.pod(pod("running", Some("n"), "Running", "2026-01-01T00:00:00Z"));
        let mut gc = PodGc::default();
        let mut plan = names(&gc.plan(&w.ctx, Instant::now(), 1));
        plan.sort();
        assert_eq!(
            plan,
            [
                ("ended-1".to_string(), Why::Terminated),
                ("ended-2".to_string(), Why::Terminated),
                ("held".to_string(), Why::Unscheduled),
            ],
            "the two oldest of three ended pods, over a threshold of one"
        );
        assert_eq!(gc.plan(&w.ctx, Instant::now(), 3).len(), 1);
    }
}
