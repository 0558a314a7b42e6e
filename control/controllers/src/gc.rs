//! The garbage collector and the namespace controller.
//!
//! ## Garbage collection
//! Like kube-controller-manager's, this one works on the graph of owner references rather
//! than on one kind. It follows the changes of the shared stores (pods, ReplicaSets,
//! ReplicationControllers, Deployments, Jobs, EndpointSlices; owners may also be
//! Services), keeping which objects name which owner, and looks again only at what a
//! change concerns: a new object or one whose owners changed, the dependents of an
//! object that is gone, an owner being deleted with a finalizer of the collector's and,
//! when one of its dependents goes, that owner again. As Kubernetes' collector, it
//! then
//! - **background**: deletes an object all of whose owners are gone (a missing owner, or
//!   one with another UID under the same name), after reading each owner live, since a
//!   store may not have heard of an owner just created;
//! - **orphan**: for an owner being deleted with the `orphan` finalizer, removes the owner
//!   reference from its dependents, then the finalizer;
//! - **foreground**: for an owner being deleted with `foregroundDeletion`, deletes its
//!   dependents (in the foreground those that have dependents of their own, in the
//!   background the rest, as Kubernetes' collector does) and removes the finalizer once
//!   none is left.
//!
//! Changes are made 16 requests at a time. Behind the changes, a sweep over every object
//! catches what they cannot tell (an owner of a kind not watched here, a change missed
//! while the collector fell behind); the pause between sweeps is 49 times the walk over
//! the objects (not the requests), so the sweep takes a fiftieth of a core however big
//! the cluster. Before changes were followed, the sweep was all there was: at 150,000
//! pods it was a tenth of a core, and the largest cost among the controllers.
//!
//! An owner of a kind not watched here (a custom resource, say) is looked up directly,
//! as kube's collector verifies an absent owner with a live read before deleting; an
//! owner whose kind the server does not serve (its CRD is gone and discovery no longer
//! knows it) is taken to exist, so nothing is collected on a guess.
//!
//! ## Namespaces
//! A namespace being deleted has everything in it deleted, every namespaced kind that
//! discovery lists (custom resources too); once nothing is left, it is finalized and
//! disappears.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Namespace, Pod, ReplicationController, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams,
};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

use crate::Ctx;

/// A map keyed by borrowed names, hashed with foldhash: a pass hashes a key per object.
type Fast<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// An object as the collector sees it: its kind and metadata.
#[derive(Clone, Copy)]
struct Node<'a> {
    kind: &'static str,
    meta: &'a ObjectMeta,
}

/// Adds the objects of one store to the graph.
fn add<'a, K>(nodes: &mut Vec<Node<'a>>, objects: &'a [Arc<K>])
where
    K: k8s_openapi::Resource + Resource<DynamicType = ()>,
{
    nodes.extend(objects.iter().map(|o| Node {
        kind: K::KIND,
        meta: o.meta(),
    }));
}

/// The API resource of a kind the collector deletes or patches.
fn api_resource(kind: &str) -> Option<ApiResource> {
    let (group, version, plural) = match kind {
        "Pod" => ("", "v1", "pods"),
        "Service" => ("", "v1", "services"),
        "ConfigMap" => ("", "v1", "configmaps"),
        "Secret" => ("", "v1", "secrets"),
        "ServiceAccount" => ("", "v1", "serviceaccounts"),
        "Endpoints" => ("", "v1", "endpoints"),
        "Event" => ("", "v1", "events"),
        "ReplicaSet" => ("apps", "v1", "replicasets"),
        "ReplicationController" => ("", "v1", "replicationcontrollers"),
        "Deployment" => ("apps", "v1", "deployments"),
        "Job" => ("batch", "v1", "jobs"),
        "EndpointSlice" => ("discovery.k8s.io", "v1", "endpointslices"),
        "Lease" => ("coordination.k8s.io", "v1", "leases"),
        "PodTemplate" => ("", "v1", "podtemplates"),
        "ControllerRevision" => ("apps", "v1", "controllerrevisions"),
        "HorizontalPodAutoscaler" => ("autoscaling", "v2", "horizontalpodautoscalers"),
        "Ingress" => ("networking.k8s.io", "v1", "ingresses"),
        "NetworkPolicy" => ("networking.k8s.io", "v1", "networkpolicies"),
        "PodDisruptionBudget" => ("policy", "v1", "poddisruptionbudgets"),
        "CronJob" => ("batch", "v1", "cronjobs"),
        "DaemonSet" => ("apps", "v1", "daemonsets"),
        "StatefulSet" => ("apps", "v1", "statefulsets"),
        "PersistentVolumeClaim" => ("", "v1", "persistentvolumeclaims"),
        "ResourceQuota" => ("", "v1", "resourcequotas"),
        "LimitRange" => ("", "v1", "limitranges"),
        "Role" => ("rbac.authorization.k8s.io", "v1", "roles"),
        "RoleBinding" => ("rbac.authorization.k8s.io", "v1", "rolebindings"),
        _ => return None,
    };
    let api_version = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(ApiResource {
        group: group.into(),
        version: version.into(),
        api_version,
        kind: kind.into(),
        plural: plural.into(),
    })
}

/// The kinds whose stores the collector reads.
const WATCHED: &[&str] = &[
    "Pod",
    "ReplicaSet",
    "ReplicationController",
    "Deployment",
    "Job",
    "EndpointSlice",
    "Service",
];

/// Namespaced kinds, in the order a namespace is emptied (owners first).
const NAMESPACED: &[&str] = &[
    "CronJob",
    "DaemonSet",
    "StatefulSet",
    "Deployment",
    "Job",
    "ReplicaSet",
    "ReplicationController",
    "Service",
    "Pod",
    "EndpointSlice",
    "Endpoints",
    "ConfigMap",
    "Secret",
    "ServiceAccount",
    "Lease",
    "HorizontalPodAutoscaler",
    "Ingress",
    "NetworkPolicy",
    "PodDisruptionBudget",
    "PersistentVolumeClaim",
    "ResourceQuota",
    "LimitRange",
    "PodTemplate",
    "ControllerRevision",
    "RoleBinding",
    "Role",
    "Event",
];

fn dyn_api(ctx: &Ctx, kind: &str, ns: &str) -> Option<Api<DynamicObject>> {
    api_resource(kind).map(|ar| Api::namespaced_with(ctx.client.clone(), ns, &ar))
}

/// An owner reference, as the collector looks it up: apiVersion, kind, namespace, name.
type OwnerKey = (String, String, String, String);

/// How long a live read of an owner is trusted. Short, so that a deleted custom owner's
/// dependents go within seconds; long enough that a sweep a second does not read every
/// custom owner every second.
const OWNER_TTL: Duration = Duration::from_secs(3);

/// The collector's state between sweeps: deletions it asked for recently, so it does not
/// ask again while the first is in flight, and owners of unwatched kinds it read.
#[derive(Default)]
pub struct Collector {
    asked: HashMap<String, Instant>,
    /// The uid found (None: not found), and when.
    owners: HashMap<OwnerKey, (Option<String>, Instant)>,
    graph: Graph,
    /// What changes concerned since the collector last acted.
    dirty: HashSet<Key>,
    /// Owner UIDs a live read found gone: a UID never comes back, so what is here
    /// spares the next dependent of the same owner its read.
    absent: std::sync::Mutex<HashSet<String>>,
}

impl std::fmt::Debug for Collector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Collector").finish_non_exhaustive()
    }
}

impl Collector {
    /// Whether a step was not asked for in the last 10 s (and now it is).
    fn once(&mut self, key: String) -> bool {
        match self.asked.entry(key) {
            std::collections::hash_map::Entry::Occupied(_) => false,
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(Instant::now());
                true
            }
        }
    }

    fn forget_old_asks(&mut self) {
        let now = Instant::now();
        self.asked
            .retain(|_, t| now.duration_since(*t) < Duration::from_secs(10));
    }

    /// Reads owners of kinds not watched here; what is found is kept for [`OWNER_TTL`].
    async fn look_up_owners(&mut self, ctx: &Ctx, wanted: Vec<OwnerKey>) {
        let now = Instant::now();
        self.owners
            .retain(|_, (_, at)| now.duration_since(*at) < OWNER_TTL);
        for key in wanted {
            if self.owners.contains_key(&key) {
                continue;
            }
            let (api_version, kind, ns, name) = &key;
            let (group, version) = match api_version.split_once('/') {
                Some((g, v)) => (g, v),
                None => ("", api_version.as_str()),
            };
            let gvk = kube::api::GroupVersionKind::gvk(group, version, kind);
            let found = match kube::discovery::oneshot::pinned_kind(&ctx.client, &gvk).await {
                Ok((ar, caps)) => {
                    let api: Api<DynamicObject> = match caps.scope {
                        kube::discovery::Scope::Namespaced => {
                            Api::namespaced_with(ctx.client.clone(), ns, &ar)
                        }
                        kube::discovery::Scope::Cluster => Api::all_with(ctx.client.clone(), &ar),
                    };
                    match api.get_opt(name).await {
                        Ok(o) => o.map(|o| o.metadata.uid.unwrap_or_default()),
                        Err(e) => {
                            tracing::debug!(%kind, %name, error = %e, "owner lookup failed");
                            continue;
                        }
                    }
                }
                // Not served (or discovery failed): taken to exist, never collected on a guess.
                Err(_) => continue,
            };
            self.owners.insert(key, (found, now));
        }
    }

    /// One pass over the graph.
    /// One pass: reads what it must, walks every object, then makes the changes the walk
    /// found, a few requests at a time. Returns how long the walk took, by which the
    /// caller paces passes: the requests are waiting, not work.
    pub async fn sweep(&mut self, ctx: &Arc<Ctx>) -> Duration {
        let walk = Instant::now();
        let pods = ctx.pods.state();
        let rss = ctx.replicasets.state();
        let rcs = ctx.replicationcontrollers.state();
        let deps = ctx.deployments.state();
        let jobs = ctx.jobs.state();
        let slices = ctx.endpointslices.state();
        let svcs = ctx.services.state();
        let mut nodes: Vec<Node<'_>> = Vec::new();
        add(&mut nodes, &pods);
        add(&mut nodes, &rss);
        add(&mut nodes, &rcs);
        add(&mut nodes, &deps);
        add(&mut nodes, &jobs);
        add(&mut nodes, &slices);
        add(&mut nodes, &svcs);
        let unwatched: Vec<OwnerKey> = {
            let mut out = HashSet::new();
            for n in &nodes {
                for o in n.meta.owner_references.iter().flatten() {
                    if !WATCHED.contains(&o.kind.as_str()) {
                        out.insert((
                            o.api_version.clone(),
                            o.kind.clone(),
                            n.meta.namespace.clone().unwrap_or_default(),
                            o.name.clone(),
                        ));
                    }
                }
            }
            out.into_iter().collect()
        };
        // The live reads wait on the network, not on this core: not part of the walk.
        let before_reads = walk.elapsed();
        self.look_up_owners(ctx, unwatched).await;
        let walk = Instant::now();
        // (kind, namespace, name) -> uid, of the kinds that own something here: most
        // objects are pods, which own nothing, and at 150,000 pods indexing them all was
        // most of a pass.
        let owner_kinds: HashSet<&str> = nodes
            .iter()
            .flat_map(|n| n.meta.owner_references.iter().flatten())
            .map(|o| o.kind.as_str())
            .collect();
        let mut uids: Fast<(&str, &str, &str), &str> = Fast::default();
        for n in nodes.iter().filter(|n| owner_kinds.contains(n.kind)) {
            if let (Some(ns), Some(name), Some(uid)) =
                (&n.meta.namespace, &n.meta.name, &n.meta.uid)
            {
                uids.insert((n.kind, ns, name), uid);
            }
        }
        // An owner of a kind not watched here exists unless a live read found it gone (or
        // replaced by another object of the same name); one not read is taken to exist.
        let looked_up = &self.owners;
        let exists = |ns: &str, o: &OwnerReference| -> bool {
            if WATCHED.contains(&o.kind.as_str()) {
                return uids.get(&(o.kind.as_str(), ns, o.name.as_str())) == Some(&o.uid.as_str());
            }
            let key = (
                o.api_version.clone(),
                o.kind.clone(),
                ns.to_string(),
                o.name.clone(),
            );
            match looked_up.get(&key) {
                Some((found, _)) => found.as_deref() == Some(o.uid.as_str()),
                None => true,
            }
        };
        let mut actions: Vec<Step> = Vec::new();
        // Dependents per owner UID: needed only while an owner is being deleted with a
        // finalizer of the collector's.
        let finalizing = nodes
            .iter()
            .any(|n| n.meta.deletion_timestamp.is_some() && collector_finalizer(n.meta));
        let mut dependents: Fast<&str, Vec<Node<'_>>> = Fast::default();
        if finalizing {
            for n in &nodes {
                for o in n.meta.owner_references.iter().flatten() {
                    dependents.entry(o.uid.as_str()).or_default().push(*n);
                }
            }
        }
        for n in &nodes {
            let uid = n.meta.uid.as_deref().unwrap_or("");
            let mine = dependents.get(uid).map(Vec::as_slice).unwrap_or(&[]);
            steps_for(
                n,
                exists,
                mine,
                |u| dependents.contains_key(u),
                &mut actions,
            );
        }
        drop(nodes);
        let walked = before_reads + walk.elapsed();
        self.forget_old_asks();
        self.make(ctx, actions).await;
        walked
    }

    /// Makes the steps not asked for in the last 10 s, a few at a time.
    async fn make(&mut self, ctx: &Ctx, steps: Vec<Step>) {
        let steps: Vec<_> = steps
            .into_iter()
            .filter(|(kind, ns, name, action)| self.once(format!("{kind}/{ns}/{name}/{action:?}")))
            .collect();
        let absent = &self.absent;
        // A deleted Deployment of hundreds of pods is hundreds of requests: made one at
        // a time they held a pass for minutes.
        futures::StreamExt::for_each_concurrent(
            futures::stream::iter(steps),
            STEPS_AT_ONCE,
            |step| step_once(ctx, absent, step),
        )
        .await;
    }

    /// Takes in one change of a watched object (an applied object, or a deleted one as it
    /// was last seen): keeps the graph, and marks what the change concerns.
    pub fn observe(&mut self, ctx: &Ctx, obj: Watched) {
        let kind = obj.kind();
        let meta = obj.meta();
        let (Some(ns), Some(name), Some(uid)) = (&meta.namespace, &meta.name, &meta.uid) else {
            return;
        };
        let key: Key = (kind, ns.clone(), name.clone());
        // The informer applies a change to its store before passing it on, so an object
        // its store no longer holds (or holds under another UID) is gone.
        let present = holds(ctx, kind, ns, name, uid);
        if !present {
            self.graph.forget(&key, uid);
            // Its dependents may have lost their last owner, and an owner waiting for
            // its dependents to go may have lost its last one.
            if let Some(deps) = self.graph.dependents.get(uid.as_str()) {
                self.dirty.extend(deps.iter().cloned());
            }
            for o in meta.owner_references.iter().flatten() {
                if let Some(k) = watched_kind(&o.kind) {
                    self.dirty.insert((k, ns.clone(), o.name.clone()));
                }
            }
            return;
        }
        let owners: Vec<OwnerLink> = meta
            .owner_references
            .iter()
            .flatten()
            .map(|o| (o.uid.clone(), watched_kind(&o.kind), o.name.clone()))
            .collect();
        if let Some(dropped) = self.graph.set(&key, uid, owners) {
            if meta.owner_references.is_some() {
                self.dirty.insert(key.clone());
            }
            // An owner it no longer names may be waiting for it to let go (orphaning).
            for (_, kind, name) in dropped {
                if let Some(kind) = kind {
                    self.dirty.insert((kind, ns.clone(), name));
                }
            }
        }
        if meta.deletion_timestamp.is_some() && collector_finalizer(meta) {
            self.dirty.insert(key);
        }
    }

    /// Looks at every object a change concerned, and makes the steps found.
    pub async fn act(&mut self, ctx: &Ctx) {
        let mut steps: Vec<Step> = Vec::new();
        let dirty = std::mem::take(&mut self.dirty);
        let exists = |ns: &str, o: &OwnerReference| -> bool {
            match watched_kind(&o.kind) {
                Some(k) => holds(ctx, k, ns, &o.name, &o.uid),
                // Left to the sweep, which reads such owners live.
                None => true,
            }
        };
        for (kind, ns, name) in dirty {
            let Some(obj) = current(ctx, kind, &ns, &name) else {
                continue;
            };
            let meta = obj.meta();
            let uid = meta.uid.as_deref().unwrap_or("");
            // An owner being finalized: its dependents as the stores hold them now,
            // those that still name it.
            let held: Vec<Watched> =
                if meta.deletion_timestamp.is_some() && collector_finalizer(meta) {
                    self.graph
                        .dependents
                        .get(uid)
                        .into_iter()
                        .flatten()
                        .filter_map(|(k, dns, dname)| current(ctx, k, dns, dname))
                        .filter(|d| {
                            d.meta()
                                .owner_references
                                .iter()
                                .flatten()
                                .any(|o| o.uid == uid)
                        })
                        .collect()
                } else {
                    Vec::new()
                };
            let mine: Vec<Node<'_>> = held
                .iter()
                .map(|d| Node {
                    kind: d.kind(),
                    meta: d.meta(),
                })
                .collect();
            // The graph keeps no empty set of dependents.
            let graph = &self.graph;
            steps_for(
                &Node { kind, meta },
                exists,
                &mine,
                |u| graph.dependents.contains_key(u),
                &mut steps,
            );
        }
        self.forget_old_asks();
        self.make(ctx, steps).await;
    }
}

/// One change the collector makes: kind, namespace, name, and what.
type Step = (&'static str, String, String, Action);

/// A watched object by kind, namespace and name.
type Key = (&'static str, String, String);

/// An owner as a dependent names it: its UID, its kind if watched here, and its name.
type OwnerLink = (String, Option<&'static str>, String);

/// Which watched objects name which owners, as the collector has seen them.
#[derive(Default)]
struct Graph {
    /// Each object's UID and its owners, for the objects that have any.
    owners_of: HashMap<Key, (String, Vec<OwnerLink>)>,
    /// The objects that name each owner UID.
    dependents: HashMap<String, HashSet<Key>>,
}

impl Graph {
    /// Records an object's owners. Returns None when that is no news, else the owners
    /// it named before and names no longer.
    fn set(&mut self, key: &Key, uid: &str, owners: Vec<OwnerLink>) -> Option<Vec<OwnerLink>> {
        match self.owners_of.get(key) {
            Some((known, was)) if known == uid && *was == owners => return None,
            // Only objects with owners are kept: most others own something instead.
            None if owners.is_empty() => return None,
            _ => {}
        }
        let mut dropped = Vec::new();
        if let Some((_, was)) = self.owners_of.remove(key) {
            self.unlink(key, &was);
            dropped = was.into_iter().filter(|o| !owners.contains(o)).collect();
        }
        for (o, _, _) in &owners {
            self.dependents
                .entry(o.clone())
                .or_default()
                .insert(key.clone());
        }
        if !owners.is_empty() {
            self.owners_of
                .insert(key.clone(), (uid.to_string(), owners));
        }
        Some(dropped)
    }

    /// Forgets an object that is gone, if the one recorded under its name is that one.
    fn forget(&mut self, key: &Key, uid: &str) {
        if self
            .owners_of
            .get(key)
            .is_some_and(|(known, _)| known == uid)
        {
            if let Some((_, was)) = self.owners_of.remove(key) {
                self.unlink(key, &was);
            }
        }
    }

    fn unlink(&mut self, key: &Key, owners: &[OwnerLink]) {
        for (o, _, _) in owners {
            if let Some(set) = self.dependents.get_mut(o) {
                set.remove(key);
                if set.is_empty() {
                    self.dependents.remove(o);
                }
            }
        }
    }
}

/// Whether an object carries a finalizer the collector acts on.
fn collector_finalizer(meta: &ObjectMeta) -> bool {
    meta.finalizers
        .iter()
        .flatten()
        .any(|f| f == "orphan" || f == "foregroundDeletion")
}

/// The steps one object calls for: collecting it if every owner is gone and, while it is
/// being deleted with a finalizer of the collector's, acting on its dependents (`mine`)
/// and dropping the finalizer once none is left. `has_own` tells whether an object (by
/// UID) has dependents of its own.
fn steps_for(
    n: &Node<'_>,
    exists: impl Fn(&str, &OwnerReference) -> bool,
    mine: &[Node<'_>],
    has_own: impl Fn(&str) -> bool,
    out: &mut Vec<Step>,
) {
    let (Some(ns), Some(name)) = (&n.meta.namespace, &n.meta.name) else {
        return;
    };
    let owners = n.meta.owner_references.as_deref().unwrap_or(&[]);
    if !owners.is_empty()
        && n.meta.deletion_timestamp.is_none()
        && owners.iter().all(|o| !exists(ns, o))
    {
        out.push((
            n.kind,
            ns.clone(),
            name.clone(),
            Action::Collect(owners.to_vec()),
        ));
    }
    if n.meta.deletion_timestamp.is_none() {
        return;
    }
    let finalizers = n.meta.finalizers.as_deref().unwrap_or(&[]);
    let uid = n.meta.uid.as_deref().unwrap_or("");
    if finalizers.iter().any(|f| f == "orphan") {
        for d in mine {
            if let (Some(dns), Some(dname)) = (&d.meta.namespace, &d.meta.name) {
                let keep: Vec<&OwnerReference> = d
                    .meta
                    .owner_references
                    .iter()
                    .flatten()
                    .filter(|o| o.uid != uid)
                    .collect();
                out.push((
                    d.kind,
                    dns.clone(),
                    dname.clone(),
                    Action::SetOwners(json!(keep)),
                ));
            }
        }
        if mine.is_empty() {
            out.push((
                n.kind,
                ns.clone(),
                name.clone(),
                Action::DropFinalizer(without(finalizers, "orphan")),
            ));
        }
    } else if finalizers.iter().any(|f| f == "foregroundDeletion") {
        for d in mine {
            if let (Some(dns), Some(dname)) = (&d.meta.namespace, &d.meta.name) {
                if d.meta.deletion_timestamp.is_none() {
                    // As Kubernetes' collector: in the foreground only what has
                    // dependents of its own to wait for; a leaf (a pod) goes in the
                    // background, with no finalizer to drop afterwards.
                    let own = d.meta.uid.as_deref().is_some_and(&has_own);
                    let policy = if own { "Foreground" } else { "Background" };
                    out.push((d.kind, dns.clone(), dname.clone(), Action::Delete(policy)));
                }
            }
        }
        if mine.is_empty() {
            out.push((
                n.kind,
                ns.clone(),
                name.clone(),
                Action::DropFinalizer(without(finalizers, "foregroundDeletion")),
            ));
        }
    }
}

/// A watched object as the informers pass it on: their own copy, not a second one.
#[derive(Clone, Debug)]
pub enum Watched {
    Pod(Arc<Pod>),
    ReplicaSet(Arc<ReplicaSet>),
    ReplicationController(Arc<ReplicationController>),
    Deployment(Arc<Deployment>),
    Job(Arc<Job>),
    EndpointSlice(Arc<EndpointSlice>),
    Service(Arc<Service>),
}

impl Watched {
    fn kind(&self) -> &'static str {
        match self {
            Self::Pod(_) => "Pod",
            Self::ReplicaSet(_) => "ReplicaSet",
            Self::ReplicationController(_) => "ReplicationController",
            Self::Deployment(_) => "Deployment",
            Self::Job(_) => "Job",
            Self::EndpointSlice(_) => "EndpointSlice",
            Self::Service(_) => "Service",
        }
    }

    fn meta(&self) -> &ObjectMeta {
        match self {
            Self::Pod(o) => o.meta(),
            Self::ReplicaSet(o) => o.meta(),
            Self::ReplicationController(o) => o.meta(),
            Self::Deployment(o) => o.meta(),
            Self::Job(o) => o.meta(),
            Self::EndpointSlice(o) => o.meta(),
            Self::Service(o) => o.meta(),
        }
    }
}

/// The watched kind named `kind`, as the collector's own `&'static str`.
fn watched_kind(kind: &str) -> Option<&'static str> {
    WATCHED.iter().copied().find(|k| *k == kind)
}

/// The object its store holds now under a watched kind, namespace and name.
fn current(ctx: &Ctx, kind: &str, ns: &str, name: &str) -> Option<Watched> {
    use kube::runtime::reflector::ObjectRef;
    fn get<K>(store: &kube::runtime::reflector::Store<K>, ns: &str, name: &str) -> Option<Arc<K>>
    where
        K: Resource<DynamicType = ()> + Clone + 'static,
    {
        store.get(&ObjectRef::new(name).within(ns))
    }
    Some(match kind {
        "Pod" => Watched::Pod(get(&ctx.pods, ns, name)?),
        "ReplicaSet" => Watched::ReplicaSet(get(&ctx.replicasets, ns, name)?),
        "ReplicationController" => {
            Watched::ReplicationController(get(&ctx.replicationcontrollers, ns, name)?)
        }
        "Deployment" => Watched::Deployment(get(&ctx.deployments, ns, name)?),
        "Job" => Watched::Job(get(&ctx.jobs, ns, name)?),
        "EndpointSlice" => Watched::EndpointSlice(get(&ctx.endpointslices, ns, name)?),
        "Service" => Watched::Service(get(&ctx.services, ns, name)?),
        _ => return None,
    })
}

/// Whether the store of a watched kind holds the object with `uid` under that name now.
fn holds(ctx: &Ctx, kind: &str, ns: &str, name: &str, uid: &str) -> bool {
    current(ctx, kind, ns, name).is_some_and(|now| now.meta().uid.as_deref() == Some(uid))
}

/// How many of a pass's requests are in flight at once.
const STEPS_AT_ONCE: usize = 16;

/// Most owner UIDs remembered as gone; past it the memory starts again.
const ABSENT_KEPT: usize = 100_000;

/// Whether every owner of a watched kind is gone by a live read, as Kubernetes'
/// collector reads an owner before it deletes a dependent: the stores are read one kind
/// at a time, so a pod may be seen before its new ReplicaSet is. Owners of kinds not
/// watched here were read live already.
async fn owners_gone(
    ctx: &Ctx,
    absent: &std::sync::Mutex<HashSet<String>>,
    ns: &str,
    owners: &[OwnerReference],
) -> bool {
    for o in owners {
        if watched_kind(&o.kind).is_none() || absent.lock().unwrap().contains(&o.uid) {
            continue;
        }
        let Some(api) = dyn_api(ctx, &o.kind, ns) else {
            continue;
        };
        match api.get_opt(&o.name).await {
            Ok(Some(now)) if now.metadata.uid.as_deref() == Some(o.uid.as_str()) => return false,
            Ok(_) => {
                let mut absent = absent.lock().unwrap();
                if absent.len() >= ABSENT_KEPT {
                    absent.clear();
                }
                absent.insert(o.uid.clone());
            }
            Err(e) => {
                tracing::debug!(kind = %o.kind, name = %o.name, error = %e, "owner read failed; not collecting");
                return false;
            }
        }
    }
    true
}

/// Makes one change the collector found.
async fn step_once(
    ctx: &Ctx,
    absent: &std::sync::Mutex<HashSet<String>>,
    (kind, ns, name, action): Step,
) {
    tracing::debug!(%kind, %ns, %name, ?action, "garbage collection step");
    let Some(api) = dyn_api(ctx, kind, &ns) else {
        return;
    };
    let result = match &action {
        Action::Collect(owners) => {
            if !owners_gone(ctx, absent, &ns, owners).await {
                return;
            }
            api.delete(&name, &DeleteParams::background())
                .await
                .map(|_| ())
        }
        Action::Delete(policy) => {
            let dp = if *policy == "Foreground" {
                DeleteParams::foreground()
            } else {
                DeleteParams::background()
            };
            api.delete(&name, &dp).await.map(|_| ())
        }
        Action::SetOwners(owners) => api
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"ownerReferences": owners}})),
            )
            .await
            .map(|_| ()),
        Action::DropFinalizer(keep) => api
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"finalizers": keep}})),
            )
            .await
            .map(|_| ()),
    };
    match result {
        Ok(())
        | Err(kube::Error::Api(kube::core::ErrorResponse {
            code: 404 | 409, ..
        })) => {}
        Err(e) => {
            tracing::warn!(%kind, %ns, %name, error = %e, "garbage collection step failed")
        }
    }
}

fn without(finalizers: &[String], f: &str) -> Vec<String> {
    finalizers.iter().filter(|x| *x != f).cloned().collect()
}

#[derive(Debug)]
enum Action {
    /// Deletes, in the background, an object whose owners (these) all seem gone, once a
    /// live read agrees.
    Collect(Vec<OwnerReference>),
    Delete(&'static str),
    SetOwners(serde_json::Value),
    /// The finalizers to keep.
    DropFinalizer(Vec<String>),
}

/// The namespaced resources a namespace is emptied of: the kinds known here first
/// (owners before what they own), then every other namespaced resource discovery lists
/// that can be listed and deleted, custom resources included.
async fn namespaced_resources(ctx: &Ctx) -> Vec<ApiResource> {
    let mut out: Vec<ApiResource> = NAMESPACED.iter().filter_map(|k| api_resource(k)).collect();
    match kube::discovery::Discovery::new(ctx.client.clone())
        .run()
        .await
    {
        Ok(discovery) => {
            for group in discovery.groups() {
                for (ar, caps) in group.recommended_resources() {
                    let usable = caps.scope == kube::discovery::Scope::Namespaced
                        && caps.supports_operation(kube::discovery::verbs::LIST)
                        && caps.supports_operation(kube::discovery::verbs::DELETE);
                    if usable
                        && !out
                            .iter()
                            .any(|k| k.group == ar.group && k.plural == ar.plural)
                    {
                        out.push(ar);
                    }
                }
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "discovery failed; emptying the namespace of the built-in kinds only")
        }
    }
    out
}

/// Empties a terminating namespace and finalizes it once empty. Returns whether it is done.
pub async fn finish_namespace(ctx: &Ctx, ns: &Namespace) -> bool {
    let name = ns.name_any();
    let mut left = 0usize;
    for ar in namespaced_resources(ctx).await {
        let kind = ar.kind.clone();
        let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), &name, &ar);
        let list = match api.list(&ListParams::default()).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(namespace = %name, %kind, error = %e, "listing a terminating namespace failed");
                left += 1;
                continue;
            }
        };
        let live: Vec<&DynamicObject> = list
            .items
            .iter()
            .filter(|o| o.metadata.deletion_timestamp.is_none())
            .collect();
        left += list.items.len();
        for o in live {
            match api.delete(&o.name_any(), &DeleteParams::background()).await {
                Ok(_) | Err(kube::Error::Api(kube::core::ErrorResponse { code: 404, .. })) => {}
                Err(e) => {
                    tracing::warn!(namespace = %name, %kind, error = %e, "deleting in a terminating namespace failed")
                }
            }
        }
    }
    if left > 0 {
        return false;
    }
    let api: Api<Namespace> = Api::all(ctx.client.clone());
    let mut finalized = ns.clone();
    if let Some(spec) = finalized.spec.as_mut() {
        spec.finalizers = Some(Vec::new());
    }
    let body = serde_json::to_vec(&finalized).unwrap_or_default();
    match api
        .replace_subresource("finalize", &name, &PostParams::default(), body)
        .await
    {
        Ok(_) | Err(kube::Error::Api(kube::core::ErrorResponse { code: 404, .. })) => true,
        Err(e) => {
            tracing::warn!(namespace = %name, error = %e, "finalizing a namespace failed");
            false
        }
    }
}

/// Whether every store the collector reads has had its first list: before that, an
/// empty store would make every object look orphaned.
fn stores_ready(ctx: &Ctx) -> Result<(), &'static str> {
    use futures::FutureExt;
    let ready = |f: Option<Result<(), _>>| matches!(f, Some(Ok(())));
    let checks: [(&'static str, bool); 7] = [
        ("pods", ready(ctx.pods.wait_until_ready().now_or_never())),
        (
            "replicasets",
            ready(ctx.replicasets.wait_until_ready().now_or_never()),
        ),
        (
            "deployments",
            ready(ctx.deployments.wait_until_ready().now_or_never()),
        ),
        ("jobs", ready(ctx.jobs.wait_until_ready().now_or_never())),
        (
            "endpointslices",
            ready(ctx.endpointslices.wait_until_ready().now_or_never()),
        ),
        (
            "services",
            ready(ctx.services.wait_until_ready().now_or_never()),
        ),
        (
            "namespaces",
            ready(ctx.namespaces.wait_until_ready().now_or_never()),
        ),
    ];
    match checks.iter().find(|(_, ok)| !ok) {
        Some((kind, _)) => Err(kind),
        None => Ok(()),
    }
}

/// How many times its walk the collector rests between sweeps: a fiftieth of a core.
const SWEEP_PAUSE: u32 = 49;

/// Runs the collector and the namespace cleanup until the task is dropped. `changes` are
/// the watched objects' changes, from informers subscribed before their watches start.
pub async fn run(ctx: Arc<Ctx>, changes: impl Stream<Item = Watched> + Send + Unpin) {
    use futures::FutureExt;
    let mut changes = changes.fuse();
    let mut following = true;
    let mut collector = Collector::default();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let started = Instant::now();
    let mut warned = false;
    let mut next_sweep = tokio::time::Instant::now();
    loop {
        tokio::select! {
            change = changes.next(), if following => {
                let Some(change) = change else {
                    // No more changes (the informers stopped): sweeps alone.
                    following = false;
                    continue;
                };
                collector.observe(&ctx, change);
                // Whatever else has come in is taken before acting, so that a burst is
                // one look at each object it concerns.
                while let Some(Some(change)) = changes.next().now_or_never() {
                    collector.observe(&ctx, change);
                }
            }
            _ = tick.tick() => {}
        }
        if let Err(kind) = stores_ready(&ctx) {
            if !warned && started.elapsed() > Duration::from_secs(10) {
                tracing::warn!(%kind, "garbage collection waits for the first list of {kind}");
                warned = true;
            }
            continue;
        }
        // A hung request must not stop collection: each round is bounded.
        if !collector.dirty.is_empty()
            && tokio::time::timeout(Duration::from_secs(30), collector.act(&ctx))
                .await
                .is_err()
        {
            tracing::warn!("garbage collection of changes took over 30 s; going on");
        }
        if tokio::time::Instant::now() < next_sweep {
            continue;
        }
        let walked =
            match tokio::time::timeout(Duration::from_secs(30), collector.sweep(&ctx)).await {
                Ok(walked) => walked,
                Err(_) => {
                    tracing::warn!("a garbage collection pass took over 30 s; starting over");
                    Duration::from_secs(1)
                }
            };
        // A sweep walks every object, so with hundreds of thousands it takes a while: the
        // pause after it grows with the walk.
        next_sweep = tokio::time::Instant::now() + walked * SWEEP_PAUSE;
        for ns in ctx.namespaces.state() {
            if ns.metadata.deletion_timestamp.is_some() {
                let _ = tokio::time::timeout(Duration::from_secs(30), finish_namespace(&ctx, &ns))
                    .await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::World;
    use serde_json::Value;

    const PODS: &str = "/api/v1/namespaces/default/pods";
    const RSS: &str = "/apis/apps/v1/namespaces/default/replicasets";
    const DEPLOYS: &str = "/apis/apps/v1/namespaces/default/deployments";

    fn owner(kind: &str, name: &str, uid: &str) -> Value {
        let api_version = if kind == "ConfigMap" { "v1" } else { "apps/v1" };
        json!({"apiVersion": api_version, "kind": kind, "name": name, "uid": uid, "controller": true})
    }

    fn meta(name: &str, uid: &str, owners: Vec<Value>) -> Value {
        json!({"name": name, "namespace": "default", "uid": uid, "ownerReferences": owners})
    }

    fn pod(name: &str, owners: Vec<Value>) -> Value {
        json!({"metadata": meta(name, &format!("{name}-uid"), owners),
               "spec": {"containers": []}})
    }

    fn rs(name: &str, uid: &str, owners: Vec<Value>) -> Value {
        json!({"metadata": meta(name, uid, owners),
               "spec": {"selector": {}, "template": {}}})
    }

    fn deleting_deployment(finalizers: &[&str]) -> Value {
        json!({"metadata": {"name": "web", "namespace": "default", "uid": "dep-uid",
                            "deletionTimestamp": "2026-01-01T00:00:00Z",
                            "finalizers": finalizers},
               "spec": {"selector": {}, "template": {}}})
    }

    #[tokio::test]
    async fn objects_whose_owners_are_all_gone_are_collected_once() {
        let mut w = World::new();
        w.replicaset(rs("web-1", "rs-1", vec![]));
        w.pod(pod("kept", vec![owner("ReplicaSet", "web-1", "rs-1")]));
        // The same name with another UID is another owner: this one is gone.
        w.pod(pod("stale", vec![owner("ReplicaSet", "web-1", "old-uid")]));
        w.pod(pod("orphaned", vec![owner("ReplicaSet", "web-0", "rs-0")]));
        // One owner left is enough.
        w.pod(pod(
            "shared",
            vec![
                owner("ReplicaSet", "web-0", "rs-0"),
                owner("ReplicaSet", "web-1", "rs-1"),
            ],
        ));
        // An owner of a kind not watched here is taken to exist.
        w.pod(pod("configured", vec![owner("ConfigMap", "cfg", "cm-1")]));
        let mut going = pod("going", vec![owner("ReplicaSet", "web-0", "rs-0")]);
        going["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        w.pod(going);

        let mut gc = Collector::default();
        gc.sweep(&w.ctx).await;
        let mut writes = w.api.writes();
        writes.sort();
        assert_eq!(
            writes,
            [
                format!("DELETE {PODS}/orphaned"),
                format!("DELETE {PODS}/stale")
            ]
        );
        assert!(w
            .api
            .write_calls()
            .iter()
            .all(|c| c.body["propagationPolicy"] == "Background"));
        // A deletion in flight is not asked for again.
        w.api.clear();
        gc.sweep(&w.ctx).await;
        assert!(w.api.writes().is_empty(), "{:?}", w.api.writes());
    }

    #[tokio::test]
    async fn an_orphaning_delete_frees_the_dependents_then_drops_its_finalizer() {
        let mut w = World::new();
        w.deployment(deleting_deployment(&["orphan", "example.com/keep"]));
        let dependent = rs(
            "web-1",
            "rs-1",
            vec![
                owner("Deployment", "web", "dep-uid"),
                owner("ConfigMap", "cfg", "cm-1"),
            ],
        );
        w.replicaset(dependent);
        let mut gc = Collector::default();
        gc.sweep(&w.ctx).await;
        assert_eq!(w.api.writes(), [format!("PATCH {RSS}/web-1")]);
        let owners = &w.api.write_calls()[0].body["metadata"]["ownerReferences"];
        assert_eq!(owners.as_array().unwrap().len(), 1);
        assert_eq!(owners[0]["uid"], "cm-1");
        // Once no dependent names it, the finalizer goes and the others stay.
        w.replicaset(rs("web-1", "rs-1", vec![owner("ConfigMap", "cfg", "cm-1")]));
        w.api.clear();
        gc.sweep(&w.ctx).await;
        assert_eq!(w.api.writes(), [format!("PATCH {DEPLOYS}/web")]);
        assert_eq!(
            w.api.write_calls()[0].body["metadata"]["finalizers"],
            json!(["example.com/keep"])
        );
    }

    #[tokio::test]
    async fn a_foreground_delete_removes_the_dependents_first() {
        let mut w = World::new();
        w.deployment(deleting_deployment(&["foregroundDeletion"]));
        let dependent = rs("web-1", "rs-1", vec![owner("Deployment", "web", "dep-uid")]);
        w.replicaset(dependent.clone());
        w.pod(pod("web-1-a", vec![owner("ReplicaSet", "web-1", "rs-1")]));
        let mut gc = Collector::default();
        gc.sweep(&w.ctx).await;
        // The ReplicaSet has a pod to wait for: it goes in the foreground.
        assert_eq!(w.api.writes(), [format!("DELETE {RSS}/web-1")]);
        assert_eq!(
            w.api.write_calls()[0].body["propagationPolicy"],
            "Foreground"
        );
        let mut deleting = dependent.clone();
        deleting["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        deleting["metadata"]["finalizers"] = json!(["foregroundDeletion"]);
        w.replicaset(deleting);
        w.api.clear();
        gc.sweep(&w.ctx).await;
        // Its pod has nothing to wait for: it goes in the background, no finalizer added.
        assert_eq!(w.api.writes(), [format!("DELETE {PODS}/web-1-a")]);
        assert_eq!(
            w.api.write_calls()[0].body["propagationPolicy"],
            "Background"
        );
        w.pod_gone(pod("web-1-a", vec![owner("ReplicaSet", "web-1", "rs-1")]));
        w.replicaset_gone(dependent);
        w.api.clear();
        gc.sweep(&w.ctx).await;
        assert_eq!(w.api.writes(), [format!("PATCH {DEPLOYS}/web")]);
        assert_eq!(
            w.api.write_calls()[0].body["metadata"]["finalizers"],
            json!([])
        );
    }

    /// Passes every object of the world's stores to the collector, as the informers pass
    /// on their first list.
    fn observe_all(gc: &mut Collector, w: &World) {
        for p in w.ctx.pods.state() {
            gc.observe(&w.ctx, Watched::Pod(p));
        }
        for r in w.ctx.replicasets.state() {
            gc.observe(&w.ctx, Watched::ReplicaSet(r));
        }
        for d in w.ctx.deployments.state() {
            gc.observe(&w.ctx, Watched::Deployment(d));
        }
    }

    fn deleted<K: serde::de::DeserializeOwned>(v: Value) -> Arc<K> {
        Arc::new(serde_json::from_value(v).unwrap())
    }

    #[tokio::test]
    async fn a_gone_owner_has_its_dependents_collected_from_the_change_alone() {
        let mut w = World::new();
        let set = rs("web-1", "rs-1", vec![]);
        w.replicaset(set.clone());
        for i in 0..40 {
            w.pod(pod(
                &format!("p{i:02}"),
                vec![owner("ReplicaSet", "web-1", "rs-1")],
            ));
        }
        w.pod(pod("other", vec![owner("ReplicaSet", "web-2", "rs-2")]));
        let web2 = w.replicaset(rs("web-2", "rs-2", vec![]));
        let mut gc = Collector::default();
        observe_all(&mut gc, &w);
        gc.act(&w.ctx).await;
        assert!(w.api.writes().is_empty(), "{:?}", w.api.writes());
        // A status change of a pod whose owners are as they were concerns nothing.
        gc.observe(&w.ctx, Watched::ReplicaSet(web2));
        assert!(gc.dirty.is_empty());

        w.replicaset_gone(set.clone());
        gc.observe(&w.ctx, Watched::ReplicaSet(deleted(set)));
        gc.act(&w.ctx).await;
        let mut writes = w.api.writes();
        writes.sort();
        let want: Vec<String> = (0..40).map(|i| format!("DELETE {PODS}/p{i:02}")).collect();
        assert_eq!(writes, want);
        // The owner was read live by the first steps under way, not once per dependent.
        let reads = w
            .api
            .calls()
            .iter()
            .filter(|c| c.method == "GET" && c.path == format!("{RSS}/web-1"))
            .count();
        assert!((1..=STEPS_AT_ONCE).contains(&reads), "{reads} reads");
    }

    #[tokio::test]
    async fn a_dependent_seen_before_its_owner_is_kept_when_the_owner_is_read_live() {
        let mut w = World::new();
        let early = w.pod(pod("early", vec![owner("ReplicaSet", "web-1", "rs-1")]));
        // The ReplicaSets' store has not heard of it yet; the API server has.
        w.api.object(
            &format!("{RSS}/web-1"),
            json!({"apiVersion": "apps/v1", "kind": "ReplicaSet",
                   "metadata": {"name": "web-1", "namespace": "default", "uid": "rs-1"}}),
        );
        let mut gc = Collector::default();
        gc.observe(&w.ctx, Watched::Pod(early.clone()));
        gc.act(&w.ctx).await;
        assert!(w.api.writes().is_empty(), "{:?}", w.api.writes());
        // A read that fails collects nothing either.
        let mut w = World::new();
        w.pod(pod("early", vec![owner("ReplicaSet", "web-1", "rs-1")]));
        w.api.fail("GET", "/replicasets/web-1", 500);
        let mut gc = Collector::default();
        gc.observe(&w.ctx, Watched::Pod(early));
        gc.act(&w.ctx).await;
        assert!(w.api.writes().is_empty(), "{:?}", w.api.writes());
    }

    #[tokio::test]
    async fn a_foreground_delete_is_carried_through_by_changes_alone() {
        let mut w = World::new();
        let dep = deleting_deployment(&["foregroundDeletion"]);
        w.deployment(dep.clone());
        let set = rs("web-1", "rs-1", vec![owner("Deployment", "web", "dep-uid")]);
        w.replicaset(set.clone());
        let leaf = pod("web-1-a", vec![owner("ReplicaSet", "web-1", "rs-1")]);
        w.pod(leaf.clone());
        let mut gc = Collector::default();
        observe_all(&mut gc, &w);
        gc.act(&w.ctx).await;
        assert_eq!(w.api.writes(), [format!("DELETE {RSS}/web-1")]);
        assert_eq!(
            w.api.write_calls()[0].body["propagationPolicy"],
            "Foreground"
        );
        // The API server marks the ReplicaSet: its pod goes, in the background.
        let mut deleting = set.clone();
        deleting["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        deleting["metadata"]["finalizers"] = json!(["foregroundDeletion"]);
        let marked = w.replicaset(deleting.clone());
        w.api.clear();
        gc.observe(&w.ctx, Watched::ReplicaSet(marked));
        gc.act(&w.ctx).await;
        assert_eq!(w.api.writes(), [format!("DELETE {PODS}/web-1-a")]);
        assert_eq!(
            w.api.write_calls()[0].body["propagationPolicy"],
            "Background"
        );
        // The pod's going lets the ReplicaSet drop its finalizer.
        w.pod_gone(leaf.clone());
        w.api.clear();
        gc.observe(&w.ctx, Watched::Pod(deleted(leaf)));
        gc.act(&w.ctx).await;
        assert_eq!(w.api.writes(), [format!("PATCH {RSS}/web-1")]);
        assert_eq!(
            w.api.write_calls()[0].body["metadata"]["finalizers"],
            json!([])
        );
        // And the ReplicaSet's going lets the Deployment drop its own.
        w.replicaset_gone(deleting.clone());
        w.api.clear();
        gc.observe(&w.ctx, Watched::ReplicaSet(deleted(deleting)));
        gc.act(&w.ctx).await;
        assert_eq!(w.api.writes(), [format!("PATCH {DEPLOYS}/web")]);
    }

    #[tokio::test]
    async fn an_orphaning_delete_is_carried_through_by_changes_alone() {
        let mut w = World::new();
        w.deployment(deleting_deployment(&["orphan"]));
        w.replicaset(rs(
            "web-1",
            "rs-1",
            vec![owner("Deployment", "web", "dep-uid")],
        ));
        let mut gc = Collector::default();
        observe_all(&mut gc, &w);
        gc.act(&w.ctx).await;
        assert_eq!(w.api.writes(), [format!("PATCH {RSS}/web-1")]);
        // The ReplicaSet let go: that change lets the Deployment drop its finalizer.
        let freed = w.replicaset(rs("web-1", "rs-1", vec![]));
        w.api.clear();
        gc.observe(&w.ctx, Watched::ReplicaSet(freed));
        gc.act(&w.ctx).await;
        assert_eq!(w.api.writes(), [format!("PATCH {DEPLOYS}/web")]);
        assert_eq!(
            w.api.write_calls()[0].body["metadata"]["finalizers"],
            json!([])
        );
    }

    #[tokio::test]
    async fn a_terminating_namespace_is_emptied_then_finalized() {
        let w = World::new();
        let ns: Namespace = serde_json::from_value(json!({
            "metadata": {"name": "gone", "deletionTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"finalizers": ["kubernetes"]}
        }))
        .unwrap();
        let mut leaving = pod("p", vec![]);
        leaving["metadata"]["namespace"] = json!("gone");
        w.api.list("/api/v1/namespaces/gone/pods", vec![leaving]);
        assert!(!finish_namespace(&w.ctx, &ns).await);
        assert_eq!(w.api.writes(), ["DELETE /api/v1/namespaces/gone/pods/p"]);
        // Every kind was looked at, owners first.
        let listed: Vec<String> = w
            .api
            .calls()
            .into_iter()
            .filter(|c| c.method == "GET" && c.path.contains("/namespaces/gone/"))
            .map(|c| c.path)
            .collect();
        assert_eq!(listed.len(), NAMESPACED.len());
        assert_eq!(listed[0], "/apis/batch/v1/namespaces/gone/cronjobs");

        let w = World::new();
        assert!(finish_namespace(&w.ctx, &ns).await);
        assert_eq!(w.api.writes(), ["PUT /api/v1/namespaces/gone/finalize"]);
        assert_eq!(
            w.api.calls().last().unwrap().body["spec"]["finalizers"],
            json!([])
        );
    }
}
