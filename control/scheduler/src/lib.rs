//! # baton-scheduler: placing pods on nodes
//!
//! kube-scheduler's job, as an ordinary API client. It watches pods that have no node and
//! binds each to a node through the `binding` subresource.
//!
//! ## How a pod is placed
//! 1. **Filter** ([`plugins::filter`]): the node is Ready and schedulable, the pod
//!    tolerates its taints, matches its `nodeSelector` and required node affinity, and the
//!    node has room (CPU and memory requests against allocatable, and the pod count);
//!    the pod's claims are read first ([`volumes`]): a bound volume pinned to a node
//!    keeps the pod there, and a claim waiting for its first pod is told the node picked.
//! 2. **Score** ([`plugins::score`]): least-allocated plus spreading the replicas of one
//!    owner across nodes, plus a preference for nodes that already hold the pod's images
//!    (so that a workload woken from zero starts where its component is cached, in a
//!    millisecond); ties go round-robin. As kube-scheduler does, a big cluster's pod is
//!    scored on a share of its feasible nodes (500 of 5,000), found from where the last
//!    decision stopped, not on all of them.
//! 3. **Assume and bind**: the pod is counted on the node in the [`cache`] before the
//!    binding is sent, so concurrent decisions see it; a failed binding takes it back.
//!
//! A pod that fits nowhere gets `PodScheduled=False` with reason `Unschedulable` and a
//! `FailedScheduling` event naming the reasons per node, and is retried when a node is
//! added or changes in a way that matters to scheduling (and every 30 s).
//!
//! ## Shape
//! The queue of pending pods is a kube-runtime `Controller` over pods with
//! `spec.nodeName=`; [`reconcile`] places one pod. Two watches keep the [`cache`]: nodes,
//! and all pods (to count what each node holds).

pub mod cache;
pub mod metrics;
pub mod plugins;
pub mod volumes;

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use baton_kube::events::{EventType, Recorder};
use baton_kube::pod;
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Node, NodeSelector, Pod};
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use tracing::Instrument;

use crate::cache::{Cache, Owner, Slot};
use crate::plugins::{Demand, Unfit};

/// The scheduler's name; pods naming another in `spec.schedulerName` are left alone.
pub const DEFAULT_SCHEDULER: &str = "default-scheduler";

/// How often a pod that fits nowhere is tried again, besides on node changes.
const UNSCHEDULABLE_RETRY: Duration = Duration::from_secs(30);

/// Why placing a pod failed (it is retried).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("binding {pod} to {node}")]
    Bind {
        pod: String,
        node: String,
        #[source]
        source: kube::Error,
    },
    #[error("reading or writing the claims of {pod}")]
    Claims {
        pod: String,
        #[source]
        source: kube::Error,
    },
    #[error("updating the status of {pod}")]
    Status {
        pod: String,
        #[source]
        source: kube::Error,
    },
}

/// Shared state of the reconciles.
pub struct Context {
    client: Client,
    cache: Arc<Mutex<Cache>>,
    /// Pods bound by us whose binding the pod watch has not shown yet.
    bound: Mutex<HashSet<String>>,
    recorder: Recorder,
    walk: Walk,
}

/// Where decisions are in their walk over the nodes.
#[derive(Debug, Default)]
struct Walk {
    /// Which tie the next decision picks.
    rotation: AtomicUsize,
    /// Where in the cache's node order the next decision starts.
    next_start: AtomicUsize,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a node contributes to scheduling decisions; a change in it retries pending pods.
fn fingerprint(n: &Node) -> String {
    let status = n.status.as_ref();
    json!([
        n.metadata.labels,
        n.spec.as_ref().map(|s| (&s.taints, s.unschedulable)),
        status.map(|s| &s.allocatable),
        status.map(|s| &s.images),
        status
            .and_then(|s| s.conditions.as_ref())
            .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
            .map(|c| &c.status),
    ])
    .to_string()
}

/// Keeps the cache's nodes; sends a trigger whenever the set of nodes or what scheduling
/// reads of them changes.
async fn watch_nodes(
    client: Client,
    cache: Arc<Mutex<Cache>>,
    trigger: futures::channel::mpsc::UnboundedSender<()>,
) {
    let mut seen: std::collections::HashMap<String, String> = Default::default();
    let mut relist: HashSet<String> = HashSet::new();
    let mut events = watcher(Api::<Node>::all(client), watcher::Config::default())
        .default_backoff()
        .boxed();
    while let Some(ev) = events.next().await {
        let changed = match ev {
            Ok(Event::Apply(n)) | Ok(Event::InitApply(n)) => {
                let name = n.name_any();
                relist.insert(name.clone());
                let fp = fingerprint(&n);
                lock(&cache).set_node(Arc::new(n));
                seen.insert(name, fp.clone()) != Some(fp)
            }
            Ok(Event::Delete(n)) => {
                let name = n.name_any();
                lock(&cache).remove_node(&name);
                seen.remove(&name).is_some()
            }
            Ok(Event::Init) => {
                relist.clear();
                false
            }
            Ok(Event::InitDone) => {
                let gone: Vec<String> = seen
                    .keys()
                    .filter(|k| !relist.contains(*k))
                    .cloned()
                    .collect();
                let mut c = lock(&cache);
                for name in &gone {
                    c.remove_node(name);
                    seen.remove(name);
                }
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "node watch failed; retrying");
                false
            }
        };
        if changed {
            let _ = trigger.unbounded_send(());
        }
    }
}

/// Keeps the cache's count of what each node holds.
async fn watch_pods(client: Client, ctx: Arc<Context>) {
    let mut relist: HashSet<String> = HashSet::new();
    let mut known: HashSet<String> = HashSet::new();
    let mut events = watcher(Api::<Pod>::all(client), watcher::Config::default())
        .default_backoff()
        .boxed();
    while let Some(ev) = events.next().await {
        match ev {
            Ok(Event::Apply(p)) | Ok(Event::InitApply(p)) => {
                let uid = p.uid().unwrap_or_default();
                if p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some() {
                    lock(&ctx.bound).remove(&uid);
                }
                lock(&ctx.cache).observe_pod(&p);
                relist.insert(uid.clone());
                known.insert(uid);
            }
            Ok(Event::Delete(p)) => {
                let uid = p.uid().unwrap_or_default();
                lock(&ctx.bound).remove(&uid);
                lock(&ctx.cache).forget_pod(&uid);
                known.remove(&uid);
            }
            Ok(Event::Init) => relist.clear(),
            Ok(Event::InitDone) => {
                let mut c = lock(&ctx.cache);
                known.retain(|uid| {
                    let keep = relist.contains(uid);
                    if !keep {
                        c.forget_pod(uid);
                    }
                    keep
                });
            }
            Err(e) => tracing::warn!(error = %e, "pod watch failed; retrying"),
        }
    }
}

/// The outcome of one decision.
enum Decision {
    Node(String),
    Nowhere(String),
}

/// How many feasible nodes a decision looks for before it scores them, as kube-scheduler's
/// adaptive `percentageOfNodesToScore`: every node of a cluster under 100, then a share
/// falling from half (5,000 nodes: 10%, 500 nodes) to no less than 5%, and never fewer
/// than 100. Each decision starts where the last one stopped, so every node is looked at
/// in turn, and a big cluster costs a decision hundreds of nodes, not all of them.
fn feasible_to_find(nodes: usize) -> usize {
    const MIN_NODES: usize = 100;
    if nodes < MIN_NODES {
        return nodes;
    }
    let percent = 50usize.saturating_sub(nodes / 125).max(5);
    (nodes * percent / 100).max(MIN_NODES)
}

fn decide(cache: &Mutex<Cache>, walk: &Walk, p: &Pod, volume_terms: &[NodeSelector]) -> Decision {
    let (cpu_millis, memory) = pod::requests(p);
    let owner = Owner::of(p);
    let d = Demand {
        pod: p,
        cpu_millis,
        memory,
        owner,
        volume_terms,
        images: plugins::pod_images(p),
    };
    let mut cache = lock(cache);
    let slots = cache.slots();
    let total = slots.len();
    let want = feasible_to_find(total);
    let start = walk.next_start.load(Ordering::Relaxed) % total.max(1);
    let mut unfit: Vec<Unfit> = Vec::new();
    let mut feasible: Vec<&Slot> = Vec::with_capacity(want.min(total));
    let mut looked = 0;
    for slot in slots[start..].iter().chain(&slots[..start]) {
        looked += 1;
        match plugins::filter(&d, &slot.info, &slot.usage) {
            Err(u) => unfit.push(u),
            Ok(()) => {
                feasible.push(slot);
                if feasible.len() >= want {
                    break;
                }
            }
        }
    }
    walk.next_start
        .store((start + looked) % total.max(1), Ordering::Relaxed);
    if feasible.is_empty() {
        return Decision::Nowhere(plugins::unschedulable_message(total, &unfit));
    }
    // Spreading is relative to the busiest node scored, as kube-scheduler normalizes
    // scores over the nodes it scores.
    let most_of_owner = d
        .owner
        .as_ref()
        .and_then(|o| feasible.iter().map(|s| s.usage.of_owner(o)).max())
        .unwrap_or(0);
    let mut best: Vec<&str> = Vec::new();
    let mut top = 0;
    for slot in &feasible {
        let s = plugins::score(&d, &slot.info, &slot.usage, most_of_owner + 1);
        if best.is_empty() || s > top {
            (top, best) = (s, vec![slot.info.name()]);
        } else if s == top {
            best.push(slot.info.name());
        }
    }
    // Ties go round-robin, in the walk's order.
    let pick = walk.rotation.fetch_add(1, Ordering::Relaxed) % best.len();
    let node = best[pick].to_string();
    cache.assume(p, &node);
    Decision::Node(node)
}

/// Places one pending pod.
pub async fn reconcile(p: Arc<Pod>, ctx: Arc<Context>) -> Result<Action, Error> {
    let spec = p.spec.as_ref();
    let mine = spec
        .and_then(|s| s.scheduler_name.as_deref())
        .is_none_or(|n| n == DEFAULT_SCHEDULER);
    let uid = p.uid().unwrap_or_default();
    if !mine
        || spec.and_then(|s| s.node_name.as_ref()).is_some()
        || p.metadata.deletion_timestamp.is_some()
        || lock(&ctx.bound).contains(&uid)
    {
        return Ok(Action::await_change());
    }
    let started = std::time::Instant::now();
    // One scheduling attempt, in the trace of the write that made the pod.
    let span = tracing::info_span!(
        target: baton_kube::trace::TARGET,
        "schedule",
        namespace = p.metadata.namespace.as_deref().unwrap_or(""),
        name = p.metadata.name.as_deref().unwrap_or(""),
    );
    baton_kube::trace::follow(&span, &p.metadata);
    let out = place(&p, &ctx, &uid).instrument(span).await;
    let result = match &out {
        Ok(Placed::Bound) => metrics::Attempt::Scheduled,
        Ok(Placed::Nowhere) => metrics::Attempt::Unschedulable,
        Ok(Placed::Gone) => return Ok(Action::await_change()),
        Err(_) => metrics::Attempt::Error,
    };
    metrics::attempt(result, started.elapsed());
    out.map(|placed| match placed {
        Placed::Nowhere => Action::requeue(UNSCHEDULABLE_RETRY),
        Placed::Bound | Placed::Gone => Action::await_change(),
    })
}

/// How placing a pod ended, when nothing failed.
enum Placed {
    Bound,
    /// No node fits; the pod says why.
    Nowhere,
    /// Deleted, or bound by someone else meanwhile.
    Gone,
}

/// One attempt to place `p`: decide, then bind (or report that no node fits).
async fn place(p: &Pod, ctx: &Context, uid: &str) -> Result<Placed, Error> {
    let ns = p.namespace().unwrap_or_default();
    let name = p.name_any();
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let claims = volumes::claims(&ctx.client, p)
        .await
        .map_err(|source| Error::Claims {
            pod: format!("{ns}/{name}"),
            source,
        })?;
    let decision = match &claims {
        Ok(c) => decide(&ctx.cache, &ctx.walk, p, &c.node_terms),
        Err(message) => Decision::Nowhere(message.clone()),
    };
    match decision {
        Decision::Node(node) => {
            let waiting = claims.map(|c| c.waiting).unwrap_or_default();
            if let Err(source) = volumes::select_node(&ctx.client, &ns, &waiting, &node).await {
                lock(&ctx.cache).forget_pod(uid);
                return Err(Error::Claims {
                    pod: format!("{ns}/{name}"),
                    source,
                });
            }
            let binding = json!({
                "apiVersion": "v1", "kind": "Binding",
                "metadata": {"name": name, "namespace": ns, "uid": uid},
                "target": {"apiVersion": "v1", "kind": "Node", "name": node}
            });
            let body = serde_json::to_vec(&binding).unwrap_or_default();
            let res = api
                .create_subresource::<serde_json::Value>(
                    "binding",
                    &name,
                    &PostParams::default(),
                    body,
                )
                .await;
            match res {
                Ok(_) => {
                    lock(&ctx.bound).insert(uid.to_string());
                    let msg = format!("Successfully assigned {ns}/{name} to {node}");
                    ctx.recorder
                        .publish(&p.object_ref(&()), EventType::Normal, "Scheduled", &msg);
                    Ok(Placed::Bound)
                }
                Err(e) => {
                    lock(&ctx.cache).forget_pod(uid);
                    match &e {
                        // Deleted, or bound by someone else meanwhile: nothing to do.
                        kube::Error::Api(s) if s.code == 404 || s.code == 409 => Ok(Placed::Gone),
                        _ => Err(Error::Bind {
                            pod: format!("{ns}/{name}"),
                            node,
                            source: e,
                        }),
                    }
                }
            }
        }
        Decision::Nowhere(message) => {
            let current = pod::condition(p, "PodScheduled");
            let same = current.is_some_and(|c| {
                c.status == "False" && c.message.as_deref() == Some(message.as_str())
            });
            if !same {
                let patch = json!({"status": {"conditions": [{
                    "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                    "message": message, "lastTransitionTime": pod::now(),
                }]}});
                api.patch_status(&name, &PatchParams::default(), &Patch::Strategic(patch))
                    .await
                    .map_err(|source| Error::Status {
                        pod: format!("{ns}/{name}"),
                        source,
                    })?;
                ctx.recorder.publish(
                    &p.object_ref(&()),
                    EventType::Warning,
                    "FailedScheduling",
                    &message,
                );
            }
            Ok(Placed::Nowhere)
        }
    }
}

fn error_policy(_p: Arc<Pod>, e: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(error = %e, "scheduling failed; retrying");
    Action::requeue(Duration::from_secs(1))
}

/// Runs the scheduler until `shutdown` completes.
pub async fn run(
    client: Client,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let ctx = Arc::new(Context {
        client: client.clone(),
        cache: Arc::default(),
        bound: Mutex::default(),
        // A few writers: at a thousand bindings a second, one writer's round trips
        // would fill the queue.
        recorder: Recorder::with_queue(client.clone(), DEFAULT_SCHEDULER, None, 1000, 4),
        walk: Walk::default(),
    });
    let (tx, rx) = futures::channel::mpsc::unbounded();
    let nodes = tokio::spawn(watch_nodes(client.clone(), ctx.cache.clone(), tx));
    let pods = tokio::spawn(watch_pods(client.clone(), ctx.clone()));
    let pending: Api<Pod> = Api::all(client);
    let trigger: std::pin::Pin<Box<dyn Stream<Item = ()> + Send + Sync>> = Box::pin(rx);
    let controller = Controller::new(pending, watcher::Config::default().fields("spec.nodeName="));
    let tracked = metrics::track_pending(controller.store());
    controller
        .with_config(controller::Config::default().concurrency(64))
        .reconcile_all_on(trigger)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|r| {
            if let Err(e) = r {
                tracing::debug!(error = %e, "scheduler queue");
            }
            futures::future::ready(())
        })
        .instrument(tracing::info_span!("scheduler"))
        .await;
    metrics::untrack_pending(tracked);
    nodes.abort();
    pods.abort();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(nodes: usize, ready: bool) -> Mutex<Cache> {
        let mut cache = Cache::default();
        for i in 0..nodes {
            let node: Node = serde_json::from_value(json!({
                "metadata": {"name": format!("node-{i:05}")},
                "status": {
                    "allocatable": {"cpu": "8", "memory": "16Gi", "pods": "110"},
                    "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]
                }
            }))
            .unwrap();
            cache.set_node(Arc::new(node));
        }
        Mutex::new(cache)
    }

    fn replica(i: usize) -> Pod {
        serde_json::from_value(json!({
            "metadata": {
                "name": format!("web-{i}"), "namespace": "default", "uid": format!("uid-{i}"),
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                    "name": "web", "uid": "rs-1", "controller": true}]
            },
            "spec": {"containers": [{"name": "c", "image": "hello"}]}
        }))
        .unwrap()
    }

    #[test]
    fn a_big_cluster_scores_a_share_of_its_nodes_as_kube_scheduler_does() {
        assert_eq!(feasible_to_find(3), 3);
        assert_eq!(feasible_to_find(99), 99);
        assert_eq!(feasible_to_find(100), 100);
        assert_eq!(feasible_to_find(1_000), 420);
        assert_eq!(feasible_to_find(5_000), 500);
        assert_eq!(feasible_to_find(20_000), 1_000);
    }

    #[test]
    fn decisions_walk_on_from_where_the_last_stopped_and_still_spread_replicas() {
        let cache = cluster(1_000, true);
        let walk = Walk::default();
        let Decision::Node(_) = decide(&cache, &walk, &replica(0), &[]) else {
            panic!("a node fits");
        };
        // The first decision looked at 420 nodes and no more; the next starts after them.
        assert_eq!(walk.next_start.load(Ordering::Relaxed), 420);
        for i in 1..1_000 {
            let Decision::Node(_) = decide(&cache, &walk, &replica(i), &[]) else {
                panic!("a node fits");
            };
        }
        let cache = lock(&cache);
        let per_node: Vec<u64> = cache
            .slots()
            .iter()
            .map(|s| s.usage.pods)
            .filter(|&n| n > 0)
            .collect();
        let most = per_node.iter().copied().max().unwrap();
        assert!(most <= 2, "replicas spread: at most {most} on a node");
        assert!(per_node.len() >= 900, "{} nodes used", per_node.len());
    }

    #[test]
    fn a_pod_that_fits_nowhere_was_checked_against_every_node() {
        let cache = cluster(1_000, false);
        let Decision::Nowhere(why) = decide(&cache, &Walk::default(), &replica(0), &[]) else {
            panic!("no node is ready");
        };
        assert_eq!(
            why,
            "0/1000 nodes are available: 1000 node(s) were not ready."
        );
    }
}
