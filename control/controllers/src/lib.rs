//! # baton-controllers: the controller manager
//!
//! kube-controller-manager's loops, each an ordinary API client in kube-runtime's shape:
//! a `reconcile(Arc<Object>, Arc<Ctx>) -> Result<Action, Error>` that looks at one object,
//! moves the world one step toward its spec, writes its status and says when to look
//! again. Retries live in an error policy, never in a reconciler.
//!
//! | controller | module |
//! |---|---|
//! | ReplicaSet, ReplicationController | [`replicaset`] |
//! | Deployment | [`deployment`] |
//! | Job (and TTL after finished) | [`job`] |
//! | DaemonSet (a pod per eligible node, rolling update) | [`daemonset`] |
//! | StatefulSet (ordered replicas with stable names and claims) | [`statefulset`] |
//! | PersistentVolume binding, the local provisioner | [`volume`] |
//! | CronJob (Jobs on a schedule, on a settable [`clock`]) | [`cronjob`] |
//! | Node lifecycle (pod ranges, heartbeats, taints, evictions) | [`nodelifecycle`] |
//! | Node TTL annotation (how long nodes keep ConfigMaps and Secrets) | [`ttl`] |
//! | EndpointSlice (a Service's ready pods) | [`endpointslice`] |
//! | Ingress status (the serving nodes' addresses) | [`ingress`] |
//! | HorizontalPodAutoscaler (replicas from CPU and memory) | [`hpa`] |
//! | ServiceAccount (a `default` one per namespace) | [`serviceaccount`] |
//! | ResourceQuota status (what a namespace uses, recounted) | [`resourcequota`] |
//! | PodDisruptionBudget status (what evictions ask) | [`disruption`] |
//! | ClusterRole aggregation (`aggregationRule`) | [`aggregation`] |
//! | garbage collection, namespace deletion | [`gc`] |
//! | pod garbage collection (orphaned, unscheduled and surplus ended pods) | [`podgc`] |
//!
//! ## Shared informers
//! Every kind is watched once for the whole manager: one reflector store per kind
//! ([`Ctx`]), whose watch events are fanned out to the controllers that care (kube-runtime's
//! shared streams). A ReplicaSet controller that needs its pods reads the pod store instead
//! of listing.

pub mod aggregation;
pub mod clock;
pub mod cronjob;
pub mod csr;
pub mod daemonset;
pub mod deployment;
pub mod disruption;
pub mod endpointslice;
pub mod expectations;
#[cfg(test)]
mod fake;
pub mod gc;
pub mod hpa;
pub mod ingress;
pub mod job;
pub mod nodelifecycle;
pub mod owners;
pub mod podgc;
pub mod podranges;
pub mod replicaset;
pub mod resourcequota;
pub mod rootca;
pub mod serviceaccount;
pub mod statefulset;
pub mod ttl;
pub mod volume;

use std::fmt::Debug;
use std::future::Future;
use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;

use baton_kube::events::Recorder;
use baton_kube::telemetry::WorkQueue;
use futures::{Stream, StreamExt};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{
    ConfigMap, Namespace, Node, PersistentVolume, PersistentVolumeClaim, Pod,
    ReplicationController, ResourceQuota, Service,
};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::ClusterRole;
use k8s_openapi::api::storage::v1::StorageClass;
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::reflector::{self, store::Writer, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tracing::Instrument;

use crate::expectations::Expectations;

/// Pod creations under way at once, over all ReplicaSets (see [`Ctx::pod_creates`]).
pub const POD_CREATES_AT_ONCE: usize = 32;

/// What every reconcile may read: the client, the shared stores, and bookkeeping.
pub struct Ctx {
    pub client: Client,
    pub pods: Store<Pod>,
    /// Pods by their controller's UID.
    pub pods_by_controller: owners::ByController<Pod>,
    /// ReplicaSets by their Deployment's UID.
    pub replicasets_by_controller: owners::ByController<ReplicaSet>,
    pub replicasets: Store<ReplicaSet>,
    pub replicationcontrollers: Store<ReplicationController>,
    pub deployments: Store<Deployment>,
    pub namespaces: Store<Namespace>,
    pub services: Store<Service>,
    pub endpointslices: Store<EndpointSlice>,
    pub jobs: Store<Job>,
    pub cronjobs: Store<CronJob>,
    pub daemonsets: Store<DaemonSet>,
    pub statefulsets: Store<StatefulSet>,
    pub pvcs: Store<PersistentVolumeClaim>,
    pub pvs: Store<PersistentVolume>,
    pub storageclasses: Store<StorageClass>,
    pub nodes: Store<Node>,
    pub leases: Store<Lease>,
    pub pdbs: Store<PodDisruptionBudget>,
    pub quotas: Store<ResourceQuota>,
    pub clusterroles: Store<ClusterRole>,
    pub ingresses: Store<Ingress>,
    pub ingressclasses: Store<IngressClass>,
    /// Each Ready node's InternalIP as last seen, by node name: what Ingress statuses
    /// list, kept so that a node's change is compared with its own last state alone.
    pub ingress_addresses: std::sync::Mutex<std::collections::HashMap<String, String>>,
    pub hpas: Store<HorizontalPodAutoscaler>,
    /// Each autoscaler's recommendations and scale events, for its behavior.
    pub hpa_history: std::sync::Mutex<std::collections::HashMap<String, hpa::behavior::History>>,
    /// How often each autoscaler runs (`--horizontal-pod-autoscaler-sync-period`).
    pub hpa_sync: Duration,
    /// How long a node may be silent before it is marked unknown and tainted.
    pub node_grace: Duration,
    /// The size of the pod range each node gets (`--node-cidr-mask-size`).
    pub node_cidr_mask: u8,
    /// The pod ranges handed out to nodes.
    pub pod_ranges: podranges::PodRanges,
    /// The cluster's current step of [`ttl`], kept for its overlap between steps.
    pub ttl_step: std::sync::Mutex<usize>,
    pub expectations: Expectations,
    /// Seats for pod creations, shared by every ReplicaSet's burst: sixteen workers
    /// bursting at once would otherwise queue thousands of creations in the API server's
    /// `system` priority level, behind which this process's every other write waits (and
    /// past whose end creations are refused with 429). Waiting here instead, a burst
    /// waits alone, as kube-controller-manager's bursts wait in client-go's rate limiter.
    pub pod_creates: tokio::sync::Semaphore,
    pub recorder: Recorder,
    /// The time schedules are read against.
    pub clock: clock::Clock,
    /// The cluster CA (PEM) that [`rootca`] publishes in every namespace.
    pub root_ca: Option<String>,
    /// The cluster CA's certificate and key, which [`csr`] signs approved requests with.
    pub signer: Option<csr::Signer>,
}

impl Debug for Ctx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx").finish_non_exhaustive()
    }
}

/// One kind watched once: its store, and a fan-out of every change to the controllers
/// that subscribe before the watch starts.
///
/// kube-runtime's shared streams (`reflect_shared`) pass on applied objects only, so a
/// ReplicaSet would never hear that its pod is gone; this fan-out passes on deletions too
/// (the deleted object, whose owner references still say whom it concerns). After every
/// (re)list, and if a subscriber falls behind, the whole store is passed on again.
struct Informer<K: Resource<DynamicType = ()> + Clone + 'static> {
    store: Store<K>,
    writer: Writer<K>,
    tx: tokio::sync::broadcast::Sender<Arc<K>>,
    index: Option<owners::ByController<K>>,
}

impl<K> Informer<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Default,
{
    fn new() -> Self {
        let (store, writer) = reflector::store();
        let (tx, _) = tokio::sync::broadcast::channel(1 << 16);
        Self {
            store,
            writer,
            tx,
            index: None,
        }
    }

    /// Also keeps an index of the objects by their controller.
    fn indexed(mut self) -> Self {
        self.index = Some(owners::ByController::default());
        self
    }

    fn subscribe(&self) -> impl Stream<Item = Arc<K>> + Send + 'static {
        let rx = self.tx.subscribe();
        let store = self.store.clone();
        futures::stream::unfold((rx, store), |(mut rx, store)| async move {
            use tokio::sync::broadcast::error::RecvError;
            let batch = match rx.recv().await {
                Ok(obj) => vec![obj],
                Err(RecvError::Lagged(n)) => {
                    tracing::warn!(kind = %K::kind(&()), missed = n, "a controller fell behind; resyncing it");
                    store.state()
                }
                Err(RecvError::Closed) => return None,
            };
            Some((futures::stream::iter(batch), (rx, store)))
        })
        .flatten()
    }

    /// Starts the watch that feeds the store and every subscriber.
    fn start(self, api: Api<K>) -> tokio::task::JoinHandle<()> {
        let Self {
            store,
            mut writer,
            tx,
            index,
        } = self;
        // managedFields are dropped as they arrive, as kube-controller-manager's informers
        // trim them: no control loop reads them, and at 150,000 pods they were a large
        // part of every cached pod.
        let mut events = watcher(api, watcher::Config::default())
            .default_backoff()
            .modify(|o: &mut K| o.meta_mut().managed_fields = None)
            .boxed();
        tokio::spawn(async move {
            while let Some(ev) = events.next().await {
                let ev = match ev {
                    Ok(ev) => ev,
                    Err(e) => {
                        tracing::warn!(error = %e, kind = %K::kind(&()), "watch failed; retrying");
                        continue;
                    }
                };
                if let Some(index) = &index {
                    index.apply(&ev);
                }
                writer.apply_watcher_event(&ev);
                match ev {
                    // Subscribers get the store's own copy, not a second one.
                    watcher::Event::Apply(o) => {
                        let kept = store.get(&reflector::ObjectRef::from_obj(&o));
                        let _ = tx.send(kept.unwrap_or_else(|| Arc::new(o)));
                    }
                    watcher::Event::Delete(o) => {
                        let _ = tx.send(Arc::new(o));
                    }
                    watcher::Event::InitDone => {
                        for o in store.state() {
                            let _ = tx.send(o);
                        }
                    }
                    watcher::Event::Init | watcher::Event::InitApply(_) => {}
                }
            }
        })
    }
}

/// Tells of a pod an owner created, or failed to create, as kube-controller-manager's
/// controllers word it (`SuccessfulCreate`, `FailedCreate`).
pub(crate) fn tell_pod_created<T>(
    ctx: &Ctx,
    owner: &k8s_openapi::api::core::v1::ObjectReference,
    pod_name: &str,
    res: &Result<T, kube::Error>,
) {
    use baton_kube::events::EventType;
    match res {
        Ok(_) => ctx.recorder.publish(
            owner,
            EventType::Normal,
            "SuccessfulCreate",
            &format!("Created pod: {pod_name}"),
        ),
        Err(e) => ctx.recorder.publish(
            owner,
            EventType::Warning,
            "FailedCreate",
            &format!("Error creating: {e}"),
        ),
    }
}

/// The pods of namespace `ns` whose controller is the object with `uid`.
pub(crate) fn owned_pods(ctx: &Ctx, ns: &str, uid: &str) -> Vec<Arc<Pod>> {
    ctx.pods_by_controller.owned(&ctx.pods, ns, uid)
}

/// Deletes `name` through `api`; `Ok(false)` when it was already gone, which is what the
/// deletion wanted.
pub(crate) async fn delete_if_present<K>(
    api: &Api<K>,
    name: &str,
    params: &kube::api::DeleteParams,
) -> Result<bool, kube::Error>
where
    K: Clone + DeserializeOwned + Debug,
{
    match api.delete(name, params).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Writes `status` to the status subresource of `name` as a merge patch, unless every
/// field already has that value (an absent count is 0). `Ok(false)`: the object is gone.
pub(crate) async fn write_status<K>(
    api: &Api<K>,
    name: &str,
    current: &impl serde::Serialize,
    status: serde_json::Value,
) -> Result<bool, kube::Error>
where
    K: Clone + DeserializeOwned + Debug,
{
    let old = serde_json::to_value(current).unwrap_or_default();
    let zero = serde_json::json!(0);
    let changed = status
        .as_object()
        .into_iter()
        .flatten()
        .any(|(k, v)| old.get(k).unwrap_or(&zero) != v);
    if !changed {
        return Ok(true);
    }
    let patch = serde_json::json!({ "status": status });
    match api
        .patch_status(
            name,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(patch),
        )
        .await
    {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(false),
        Err(e) => Err(e),
    }
}

fn error_policy<K, E: std::fmt::Display>(_obj: Arc<K>, e: &E, _ctx: Arc<Ctx>) -> Action {
    tracing::warn!(error = %e, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(1))
}

async fn drain<S, T, E1, E2>(queue: WorkQueue, s: S)
where
    S: Stream<Item = Result<T, controller::Error<E1, E2>>>,
    E1: std::error::Error + 'static,
    E2: std::error::Error + 'static,
{
    let name = queue.name();
    s.for_each(|r| {
        queue.observe(&r);
        if let Err(e) = r {
            tracing::debug!(controller = name, error = %e, "controller queue");
        }
        futures::future::ready(())
    })
    .instrument(tracing::info_span!("controller", name))
    .await
}

/// Settings of the controller manager.
#[derive(Debug, Clone)]
pub struct Config {
    /// How long a node may miss heartbeats before it is marked unknown (Kubernetes'
    /// `--node-monitor-grace-period`).
    pub node_monitor_grace: Duration,
    /// The time CronJobs are scheduled by: the system's, unless a test sets one.
    pub clock: clock::Clock,
    /// The cluster CA (PEM) published as `kube-root-ca.crt` in every namespace; None
    /// publishes nothing.
    pub root_ca: Option<String>,
    /// How often each HorizontalPodAutoscaler runs (kube-controller-manager's
    /// `--horizontal-pod-autoscaler-sync-period`, 15 s).
    pub hpa_sync: Duration,
    /// The cluster CA that signs approved CertificateSigningRequests; None signs none
    /// (they are still approved).
    pub signer: Option<csr::Signer>,
    /// The prefix length of each node's pod range (kube-controller-manager's
    /// `--node-cidr-mask-size`), within [`podranges::NODE_MASKS`].
    pub node_cidr_mask: u8,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            node_monitor_grace: Duration::from_secs(40),
            clock: clock::Clock::system(),
            root_ca: None,
            hpa_sync: Duration::from_secs(15),
            signer: None,
            node_cidr_mask: 20,
        }
    }
}

/// Runs every controller until `shutdown` completes.
pub async fn run(
    client: Client,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let pods = Informer::<Pod>::new().indexed();
    let replicasets = Informer::<ReplicaSet>::new().indexed();
    let replicationcontrollers = Informer::<ReplicationController>::new();
    let deployments = Informer::<Deployment>::new();
    let namespaces = Informer::<Namespace>::new();
    let services = Informer::<Service>::new();
    let endpointslices = Informer::<EndpointSlice>::new();
    let jobs = Informer::<Job>::new();
    let cronjobs = Informer::<CronJob>::new();
    let daemonsets = Informer::<DaemonSet>::new();
    let statefulsets = Informer::<StatefulSet>::new();
    let pvcs = Informer::<PersistentVolumeClaim>::new();
    let pvs = Informer::<PersistentVolume>::new();
    let storageclasses = Informer::<StorageClass>::new();
    let nodes = Informer::<Node>::new();
    let leases = Informer::<Lease>::new();
    let pdbs = Informer::<PodDisruptionBudget>::new();
    let quotas = Informer::<ResourceQuota>::new();
    let clusterroles = Informer::<ClusterRole>::new();
    let ingresses = Informer::<Ingress>::new();
    let ingressclasses = Informer::<IngressClass>::new();
    let hpas = Informer::<HorizontalPodAutoscaler>::new();
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        pods: pods.store.clone(),
        pods_by_controller: pods.index.clone().unwrap_or_default(),
        replicasets: replicasets.store.clone(),
        replicasets_by_controller: replicasets.index.clone().unwrap_or_default(),
        replicationcontrollers: replicationcontrollers.store.clone(),
        deployments: deployments.store.clone(),
        namespaces: namespaces.store.clone(),
        services: services.store.clone(),
        endpointslices: endpointslices.store.clone(),
        jobs: jobs.store.clone(),
        cronjobs: cronjobs.store.clone(),
        daemonsets: daemonsets.store.clone(),
        statefulsets: statefulsets.store.clone(),
        pvcs: pvcs.store.clone(),
        pvs: pvs.store.clone(),
        storageclasses: storageclasses.store.clone(),
        nodes: nodes.store.clone(),
        leases: leases.store.clone(),
        pdbs: pdbs.store.clone(),
        quotas: quotas.store.clone(),
        clusterroles: clusterroles.store.clone(),
        ingresses: ingresses.store.clone(),
        ingressclasses: ingressclasses.store.clone(),
        ingress_addresses: Default::default(),
        hpas: hpas.store.clone(),
        hpa_history: Default::default(),
        hpa_sync: config.hpa_sync,
        node_grace: config.node_monitor_grace,
        node_cidr_mask: config
            .node_cidr_mask
            .clamp(*podranges::NODE_MASKS.start(), *podranges::NODE_MASKS.end()),
        pod_ranges: Default::default(),
        ttl_step: Default::default(),
        expectations: Expectations::default(),
        pod_creates: tokio::sync::Semaphore::new(POD_CREATES_AT_ONCE),
        // Several writers: the controllers record for many objects at once.
        recorder: Recorder::with_queue(client.clone(), "controller-manager", None, 1000, 4),
        clock: config.clock.clone(),
        root_ca: config.root_ca.clone(),
        signer: config.signer.clone(),
    });
    let cfg = controller::Config::default().concurrency(16);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stop = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let rs_queue = WorkQueue::new("replicaset");
    let rs_controller = Controller::for_shared_stream(
        rs_queue.own(replicasets.subscribe()),
        replicasets.store.clone(),
    )
    .owns_shared_stream(rs_queue.owned::<ReplicaSet, _, _>(pods.subscribe()))
    .with_config(cfg.clone())
    .graceful_shutdown_on(stop())
    .run(
        rs_queue.reconciler(replicaset::reconcile),
        error_policy,
        ctx.clone(),
    );
    let rc_queue = WorkQueue::new("replicationcontroller");
    let rc_controller = Controller::for_shared_stream(
        rc_queue.own(replicationcontrollers.subscribe()),
        replicationcontrollers.store.clone(),
    )
    .owns_shared_stream(rc_queue.owned::<ReplicationController, _, _>(pods.subscribe()))
    .with_config(cfg.clone())
    .graceful_shutdown_on(stop())
    .run(
        rc_queue.reconciler(replicaset::reconcile_replication_controller),
        error_policy,
        ctx.clone(),
    );
    let deploy_queue = WorkQueue::new("deployment");
    let deploy_controller = Controller::for_shared_stream(
        deploy_queue.own(deployments.subscribe()),
        deployments.store.clone(),
    )
    .owns_shared_stream(deploy_queue.owned::<Deployment, _, _>(replicasets.subscribe()))
    .with_config(cfg.clone())
    .graceful_shutdown_on(stop())
    .run(
        deploy_queue.reconciler(deployment::reconcile),
        error_policy,
        ctx.clone(),
    );
    let sa_queue = WorkQueue::new("serviceaccount");
    let sa_controller = Controller::for_shared_stream(
        sa_queue.own(namespaces.subscribe()),
        namespaces.store.clone(),
    )
    .with_config(cfg.clone())
    .graceful_shutdown_on(stop())
    .run(
        sa_queue.reconciler(serviceaccount::reconcile),
        error_policy,
        ctx.clone(),
    );
    let rootca_queue = WorkQueue::new("root-ca-cert-publisher");
    let rootca_controller = Controller::for_shared_stream(
        rootca_queue.own(namespaces.subscribe()),
        namespaces.store.clone(),
    )
    .watches(
        Api::<ConfigMap>::all(client.clone()),
        watcher::Config::default().fields(&format!("metadata.name={}", rootca::NAME)),
        rootca_queue.mapped_values(|cm: ConfigMap| {
            cm.metadata
                .namespace
                .map(|ns| kube::runtime::reflector::ObjectRef::new(&ns))
        }),
    )
    .with_config(cfg.clone())
    .graceful_shutdown_on(stop())
    .run(
        rootca_queue.reconciler(rootca::reconcile),
        error_policy,
        ctx.clone(),
    );
    let ctx2 = ctx.clone();
    let eps_queue = WorkQueue::new("endpointslice");
    let eps_controller =
        Controller::for_shared_stream(eps_queue.own(services.subscribe()), services.store.clone())
            .owns_shared_stream(eps_queue.owned::<Service, _, _>(endpointslices.subscribe()))
            .watches_shared_stream(
                pods.subscribe(),
                eps_queue.mapped(move |p| endpointslice::services_of_pod(&ctx2, &p)),
            )
            .with_config(cfg.clone())
            .graceful_shutdown_on(stop())
            .run(
                eps_queue.reconciler(endpointslice::reconcile),
                error_policy,
                ctx.clone(),
            );
    let job_queue = WorkQueue::new("job");
    let job_controller =
        Controller::for_shared_stream(job_queue.own(jobs.subscribe()), jobs.store.clone())
            .owns_shared_stream(job_queue.owned::<Job, _, _>(pods.subscribe()))
            .with_config(cfg.clone())
            .graceful_shutdown_on(stop())
            .run(
                job_queue.reconciler(job::reconcile),
                error_policy,
                ctx.clone(),
            );
    let cronjob_queue = WorkQueue::new("cronjob");
    let cronjob_controller = Controller::for_shared_stream(
        cronjob_queue.own(cronjobs.subscribe()),
        cronjobs.store.clone(),
    )
    .watches_shared_stream(
        jobs.subscribe(),
        cronjob_queue.mapped(|j| cronjob::cronjob_of_job(&j)),
    )
    .with_config(cfg.clone())
    .graceful_shutdown_on(stop())
    .run(
        cronjob_queue.reconciler(cronjob::reconcile),
        error_policy,
        ctx.clone(),
    );
    let ctx4 = ctx.clone();
    let daemonset_queue = WorkQueue::new("daemonset");
    let daemonset_controller = Controller::for_shared_stream(
        daemonset_queue.own(daemonsets.subscribe()),
        daemonsets.store.clone(),
    )
    .owns_shared_stream(daemonset_queue.owned::<DaemonSet, _, _>(pods.subscribe()))
    .watches_shared_stream(
        nodes.subscribe(),
        daemonset_queue.mapped(move |_n: Arc<Node>| daemonset::all_daemonsets(&ctx4)),
    )
    .with_config(cfg.clone())
    .graceful_shutdown_on(stop())
    .run(
        daemonset_queue.reconciler(daemonset::reconcile),
        error_policy,
        ctx.clone(),
    );
    let statefulset_queue = WorkQueue::new("statefulset");
    let statefulset_controller = Controller::for_shared_stream(
        statefulset_queue.own(statefulsets.subscribe()),
        statefulsets.store.clone(),
    )
    .owns_shared_stream(statefulset_queue.owned::<StatefulSet, _, _>(pods.subscribe()))
    .with_config(cfg.clone())
    .graceful_shutdown_on(stop())
    .run(
        statefulset_queue.reconciler(statefulset::reconcile),
        error_policy,
        ctx.clone(),
    );
    let claim_queue = WorkQueue::new("persistentvolumeclaim");
    let claim_controller =
        Controller::for_shared_stream(claim_queue.own(pvcs.subscribe()), pvcs.store.clone())
            .watches_shared_stream(
                pvs.subscribe(),
                claim_queue.mapped(|v| volume::claim_of_volume(&v)),
            )
            .watches_shared_stream(
                pods.subscribe(),
                claim_queue.mapped(|p| volume::claims_of_pod(&p)),
            )
            .with_config(cfg.clone())
            .graceful_shutdown_on(stop())
            .run(
                claim_queue.reconciler(volume::reconcile_claim),
                error_policy,
                ctx.clone(),
            );
    let volume_queue = WorkQueue::new("persistentvolume");
    let volume_controller =
        Controller::for_shared_stream(volume_queue.own(pvs.subscribe()), pvs.store.clone())
            .watches_shared_stream(
                pvcs.subscribe(),
                volume_queue.mapped(|c| volume::volume_of_claim(&c)),
            )
            .with_config(cfg.clone())
            .graceful_shutdown_on(stop())
            .run(
                volume_queue.reconciler(volume::reconcile_volume),
                error_policy,
                ctx.clone(),
            );
    let node_queue = WorkQueue::new("nodelifecycle");
    let ctx_nodes = ctx.clone();
    let node_controller =
        Controller::for_shared_stream(node_queue.own(nodes.subscribe()), nodes.store.clone())
            .watches_shared_stream(
                leases.subscribe(),
                node_queue
                    .mapped(move |l: Arc<Lease>| nodelifecycle::woken_by_lease(&ctx_nodes, &l)),
            )
            .with_config(cfg.clone())
            .graceful_shutdown_on(stop())
            .run(
                node_queue.reconciler(nodelifecycle::reconcile),
                error_policy,
                ctx.clone(),
            );
    let ctx3 = ctx.clone();
    let pdb_queue = WorkQueue::new("disruption");
    let pdb_controller =
        Controller::for_shared_stream(pdb_queue.own(pdbs.subscribe()), pdbs.store.clone())
            .watches_shared_stream(
                pods.subscribe(),
                pdb_queue.mapped(move |p| disruption::budgets_of_pod(&ctx3, &p)),
            )
            .with_config(cfg.clone())
            .graceful_shutdown_on(stop())
            .run(
                pdb_queue.reconciler(disruption::reconcile),
                error_policy,
                ctx.clone(),
            );
    let ctx5 = ctx.clone();
    let quota_queue = WorkQueue::new("resourcequota");
    let quota_controller =
        Controller::for_shared_stream(quota_queue.own(quotas.subscribe()), quotas.store.clone())
            .watches_shared_stream(
                pods.subscribe(),
                quota_queue.mapped(move |p| resourcequota::quotas_of_pod(&ctx5, &p)),
            )
            .with_config(cfg.clone())
            .graceful_shutdown_on(stop())
            .run(
                quota_queue.reconciler(resourcequota::reconcile),
                error_policy,
                ctx.clone(),
            );
    let ctx6 = ctx.clone();
    let aggregation_queue = WorkQueue::new("clusterrole-aggregation");
    let aggregation_controller = Controller::for_shared_stream(
        aggregation_queue.own(clusterroles.subscribe()),
        clusterroles.store.clone(),
    )
    .watches_shared_stream(
        clusterroles.subscribe(),
        aggregation_queue.mapped(move |_r: Arc<ClusterRole>| aggregation::aggregating(&ctx6)),
    )
    .with_config(cfg.clone())
    .graceful_shutdown_on(stop())
    .run(
        aggregation_queue.reconciler(aggregation::reconcile),
        error_policy,
        ctx.clone(),
    );
    let (ctx7, ctx8) = (ctx.clone(), ctx.clone());
    let ingress_queue = WorkQueue::new("ingress");
    let ingress_controller = Controller::for_shared_stream(
        ingress_queue.own(ingresses.subscribe()),
        ingresses.store.clone(),
    )
    .watches_shared_stream(
        nodes.subscribe(),
        ingress_queue.mapped(move |n: Arc<Node>| ingress::on_node_change(&ctx7, &n)),
    )
    .watches_shared_stream(
        ingressclasses.subscribe(),
        ingress_queue.mapped(move |_c: Arc<IngressClass>| ingress::all_ingresses(&ctx8)),
    )
    .with_config(cfg.clone())
    .graceful_shutdown_on(stop())
    .run(
        ingress_queue.reconciler(ingress::reconcile),
        error_policy,
        ctx.clone(),
    );
    let hpa_queue = WorkQueue::new("horizontalpodautoscaler");
    let hpa_controller =
        Controller::for_shared_stream(hpa_queue.own(hpas.subscribe()), hpas.store.clone())
            .with_config(cfg.clone())
            .graceful_shutdown_on(stop())
            .run(
                hpa_queue.reconciler(hpa::reconcile),
                error_policy,
                ctx.clone(),
            );
    let csr_queue = WorkQueue::new("certificatesigningrequest");
    let csr_controller = Controller::new(
        Api::<k8s_openapi::api::certificates::v1::CertificateSigningRequest>::all(client.clone()),
        watcher::Config::default(),
    )
    .with_config(cfg.clone())
    .graceful_shutdown_on(stop())
    .run(
        csr_queue.reconciler(csr::reconcile),
        error_policy,
        ctx.clone(),
    );
    // The collector follows the changes of the kinds it reads, subscribed before the
    // watches start.
    let gc_changes = futures::stream::select_all([
        pods.subscribe().map(gc::Watched::Pod).boxed(),
        replicasets.subscribe().map(gc::Watched::ReplicaSet).boxed(),
        replicationcontrollers
            .subscribe()
            .map(gc::Watched::ReplicationController)
            .boxed(),
        deployments.subscribe().map(gc::Watched::Deployment).boxed(),
        jobs.subscribe().map(gc::Watched::Job).boxed(),
        endpointslices
            .subscribe()
            .map(gc::Watched::EndpointSlice)
            .boxed(),
        services.subscribe().map(gc::Watched::Service).boxed(),
    ]);
    let watches = [
        hpas.start(Api::all(client.clone())),
        ingresses.start(Api::all(client.clone())),
        ingressclasses.start(Api::all(client.clone())),
        pods.start(Api::all(client.clone())),
        clusterroles.start(Api::all(client.clone())),
        replicasets.start(Api::all(client.clone())),
        replicationcontrollers.start(Api::all(client.clone())),
        deployments.start(Api::all(client.clone())),
        namespaces.start(Api::all(client.clone())),
        services.start(Api::all(client.clone())),
        jobs.start(Api::all(client.clone())),
        cronjobs.start(Api::all(client.clone())),
        daemonsets.start(Api::all(client.clone())),
        statefulsets.start(Api::all(client.clone())),
        pvcs.start(Api::all(client.clone())),
        pvs.start(Api::all(client.clone())),
        storageclasses.start(Api::all(client.clone())),
        nodes.start(Api::all(client.clone())),
        leases.start(Api::all(client.clone())),
        endpointslices.start(Api::all(client.clone())),
        pdbs.start(Api::all(client.clone())),
        quotas.start(Api::all(client.clone())),
    ];
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let gc = tokio::spawn(gc::run(ctx.clone(), gc_changes));
    let podgc = tokio::spawn(podgc::run(ctx.clone()));
    // A task per controller, not one task joining them all: a joined future is polled
    // whole on every wake-up, so each watch event (500 Lease renewals a second at 5,000
    // nodes) made all nineteen controllers poll their queues and streams.
    let mut controllers = tokio::task::JoinSet::new();
    controllers.spawn(drain(rs_queue, rs_controller));
    controllers.spawn(drain(rc_queue, rc_controller));
    controllers.spawn(drain(deploy_queue, deploy_controller));
    controllers.spawn(drain(sa_queue, sa_controller));
    controllers.spawn(drain(rootca_queue, rootca_controller));
    controllers.spawn(drain(eps_queue, eps_controller));
    controllers.spawn(drain(job_queue, job_controller));
    controllers.spawn(drain(cronjob_queue, cronjob_controller));
    controllers.spawn(drain(daemonset_queue, daemonset_controller));
    controllers.spawn(drain(statefulset_queue, statefulset_controller));
    controllers.spawn(drain(claim_queue, claim_controller));
    controllers.spawn(drain(volume_queue, volume_controller));
    controllers.spawn(drain(node_queue, node_controller));
    controllers.spawn(drain(pdb_queue, pdb_controller));
    controllers.spawn(drain(quota_queue, quota_controller));
    controllers.spawn(drain(aggregation_queue, aggregation_controller));
    controllers.spawn(drain(ingress_queue, ingress_controller));
    controllers.spawn(drain(hpa_queue, hpa_controller));
    controllers.spawn(drain(csr_queue, csr_controller));
    while controllers.join_next().await.is_some() {}
    gc.abort();
    podgc.abort();
    for w in watches {
        w.abort();
    }
}
