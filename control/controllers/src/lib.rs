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
//! | EndpointSlice (a Service's ready pods) | [`endpointslice`] |
//! | ServiceAccount (a `default` one per namespace) | [`serviceaccount`] |
//! | ResourceQuota status (what a namespace uses, recounted) | [`resourcequota`] |
//! | PodDisruptionBudget status (what evictions ask) | [`disruption`] |
//! | ClusterRole aggregation (`aggregationRule`) | [`aggregation`] |
//! | garbage collection, namespace deletion | [`gc`] |
//!
//! ## Shared informers
//! Every kind is watched once for the whole manager: one reflector store per kind
//! ([`Ctx`]), whose watch events are fanned out to the controllers that care (kube-runtime's
//! shared streams). A ReplicaSet controller that needs its pods reads the pod store instead
//! of listing.

pub mod aggregation;
pub mod clock;
pub mod cronjob;
pub mod daemonset;
pub mod deployment;
pub mod disruption;
pub mod endpointslice;
pub mod expectations;
#[cfg(test)]
mod fake;
pub mod gc;
pub mod job;
pub mod nodelifecycle;
pub mod replicaset;
pub mod resourcequota;
pub mod rootca;
pub mod serviceaccount;
pub mod statefulset;
pub mod volume;

use std::fmt::Debug;
use std::future::Future;
use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;

use baton_kube::events::Recorder;
use baton_kube::telemetry::timed;
use futures::{Stream, StreamExt};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{
    ConfigMap, Namespace, Node, PersistentVolume, PersistentVolumeClaim, Pod,
    ReplicationController, ResourceQuota, Service,
};
use k8s_openapi::api::discovery::v1::EndpointSlice;
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

/// What every reconcile may read: the client, the shared stores, and bookkeeping.
pub struct Ctx {
    pub client: Client,
    pub pods: Store<Pod>,
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
    /// How long a node may be silent before it is marked unknown and tainted.
    pub node_grace: Duration,
    pub cidr_lock: tokio::sync::Mutex<()>,
    /// Pod ranges handed out and maybe not yet seen in the node store.
    pub cidrs_given: std::sync::Mutex<std::collections::BTreeSet<u32>>,
    pub expectations: Expectations,
    pub recorder: Recorder,
    /// The time schedules are read against.
    pub clock: clock::Clock,
    /// The cluster CA (PEM) that [`rootca`] publishes in every namespace.
    pub root_ca: Option<String>,
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
}

impl<K> Informer<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Default,
{
    fn new() -> Self {
        let (store, writer) = reflector::store();
        let (tx, _) = tokio::sync::broadcast::channel(1 << 16);
        Self { store, writer, tx }
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
        } = self;
        let mut events = watcher(api, watcher::Config::default())
            .default_backoff()
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
                writer.apply_watcher_event(&ev);
                match ev {
                    watcher::Event::Apply(o) | watcher::Event::Delete(o) => {
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

/// The pods of namespace `ns` whose controller is the object with `uid`.
pub(crate) fn owned_pods(ctx: &Ctx, ns: &str, uid: &str) -> Vec<Arc<Pod>> {
    ctx.pods
        .state()
        .into_iter()
        .filter(|p| {
            p.metadata.namespace.as_deref() == Some(ns)
                && baton_kube::pod::controller_of(&p.metadata).is_some_and(|o| o.uid == uid)
        })
        .collect()
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

async fn drain<S, T, E>(name: &'static str, s: S)
where
    S: Stream<Item = Result<T, E>>,
    E: std::fmt::Display,
{
    s.for_each(|r| {
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
}

impl Default for Config {
    fn default() -> Self {
        Self {
            node_monitor_grace: Duration::from_secs(40),
            clock: clock::Clock::system(),
            root_ca: None,
        }
    }
}

/// Runs every controller until `shutdown` completes.
pub async fn run(
    client: Client,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let pods = Informer::<Pod>::new();
    let replicasets = Informer::<ReplicaSet>::new();
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
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        pods: pods.store.clone(),
        replicasets: replicasets.store.clone(),
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
        node_grace: config.node_monitor_grace,
        cidr_lock: tokio::sync::Mutex::new(()),
        cidrs_given: Default::default(),
        expectations: Expectations::default(),
        recorder: Recorder::new(client.clone(), "controller-manager", None),
        clock: config.clock.clone(),
        root_ca: config.root_ca.clone(),
    });
    let cfg = controller::Config::default().concurrency(16);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stop = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let rs_controller =
        Controller::for_shared_stream(replicasets.subscribe(), replicasets.store.clone())
            .owns_shared_stream(pods.subscribe())
            .with_config(cfg.clone())
            .graceful_shutdown_on(stop())
            .run(
                timed("replicaset", replicaset::reconcile),
                error_policy,
                ctx.clone(),
            );
    let rc_controller = Controller::for_shared_stream(
        replicationcontrollers.subscribe(),
        replicationcontrollers.store.clone(),
    )
    .owns_shared_stream(pods.subscribe())
    .with_config(cfg.clone())
    .graceful_shutdown_on(stop())
    .run(
        timed(
            "replicationcontroller",
            replicaset::reconcile_replication_controller,
        ),
        error_policy,
        ctx.clone(),
    );
    let deploy_controller =
        Controller::for_shared_stream(deployments.subscribe(), deployments.store.clone())
            .owns_shared_stream(replicasets.subscribe())
            .with_config(cfg.clone())
            .graceful_shutdown_on(stop())
            .run(
                timed("deployment", deployment::reconcile),
                error_policy,
                ctx.clone(),
            );
    let sa_controller =
        Controller::for_shared_stream(namespaces.subscribe(), namespaces.store.clone())
            .with_config(cfg.clone())
            .graceful_shutdown_on(stop())
            .run(
                timed("serviceaccount", serviceaccount::reconcile),
                error_policy,
                ctx.clone(),
            );
    let rootca_controller =
        Controller::for_shared_stream(namespaces.subscribe(), namespaces.store.clone())
            .watches(
                Api::<ConfigMap>::all(client.clone()),
                watcher::Config::default().fields(&format!("metadata.name={}", rootca::NAME)),
                |cm: ConfigMap| {
                    cm.metadata
                        .namespace
                        .map(|ns| kube::runtime::reflector::ObjectRef::new(&ns))
                },
            )
            .with_config(cfg.clone())
            .graceful_shutdown_on(stop())
            .run(
                timed("root-ca-cert-publisher", rootca::reconcile),
                error_policy,
                ctx.clone(),
            );
    let ctx2 = ctx.clone();
    let eps_controller =
        Controller::for_shared_stream(services.subscribe(), services.store.clone())
            .owns_shared_stream(endpointslices.subscribe())
            .watches_shared_stream(pods.subscribe(), move |p| {
                endpointslice::services_of_pod(&ctx2, &p)
            })
            .with_config(cfg.clone())
            .graceful_shutdown_on(stop())
            .run(
                timed("endpointslice", endpointslice::reconcile),
                error_policy,
                ctx.clone(),
            );
    let job_controller = Controller::for_shared_stream(jobs.subscribe(), jobs.store.clone())
        .owns_shared_stream(pods.subscribe())
        .with_config(cfg.clone())
        .graceful_shutdown_on(stop())
        .run(timed("job", job::reconcile), error_policy, ctx.clone());
    let cronjob_controller =
        Controller::for_shared_stream(cronjobs.subscribe(), cronjobs.store.clone())
            .watches_shared_stream(jobs.subscribe(), |j| cronjob::cronjob_of_job(&j))
            .with_config(cfg.clone())
            .graceful_shutdown_on(stop())
            .run(
                timed("cronjob", cronjob::reconcile),
                error_policy,
                ctx.clone(),
            );
    let ctx4 = ctx.clone();
    let daemonset_controller =
        Controller::for_shared_stream(daemonsets.subscribe(), daemonsets.store.clone())
            .owns_shared_stream(pods.subscribe())
            .watches_shared_stream(nodes.subscribe(), move |_n: Arc<Node>| {
                daemonset::all_daemonsets(&ctx4)
            })
            .with_config(cfg.clone())
            .graceful_shutdown_on(stop())
            .run(
                timed("daemonset", daemonset::reconcile),
                error_policy,
                ctx.clone(),
            );
    let statefulset_controller =
        Controller::for_shared_stream(statefulsets.subscribe(), statefulsets.store.clone())
            .owns_shared_stream(pods.subscribe())
            .with_config(cfg.clone())
            .graceful_shutdown_on(stop())
            .run(
                timed("statefulset", statefulset::reconcile),
                error_policy,
                ctx.clone(),
            );
    let claim_controller = Controller::for_shared_stream(pvcs.subscribe(), pvcs.store.clone())
        .watches_shared_stream(pvs.subscribe(), |v| volume::claim_of_volume(&v))
        .watches_shared_stream(pods.subscribe(), |p| volume::claims_of_pod(&p))
        .with_config(cfg.clone())
        .graceful_shutdown_on(stop())
        .run(
            timed("persistentvolumeclaim", volume::reconcile_claim),
            error_policy,
            ctx.clone(),
        );
    let volume_controller = Controller::for_shared_stream(pvs.subscribe(), pvs.store.clone())
        .watches_shared_stream(pvcs.subscribe(), |c| volume::volume_of_claim(&c))
        .with_config(cfg.clone())
        .graceful_shutdown_on(stop())
        .run(
            timed("persistentvolume", volume::reconcile_volume),
            error_policy,
            ctx.clone(),
        );
    let node_controller = Controller::for_shared_stream(nodes.subscribe(), nodes.store.clone())
        .watches_shared_stream(leases.subscribe(), |l: Arc<Lease>| {
            (l.metadata.namespace.as_deref() == Some("kube-node-lease")).then(|| {
                kube::runtime::reflector::ObjectRef::new(l.metadata.name.as_deref().unwrap_or(""))
            })
        })
        .with_config(cfg.clone())
        .graceful_shutdown_on(stop())
        .run(
            timed("nodelifecycle", nodelifecycle::reconcile),
            error_policy,
            ctx.clone(),
        );
    let ctx3 = ctx.clone();
    let pdb_controller = Controller::for_shared_stream(pdbs.subscribe(), pdbs.store.clone())
        .watches_shared_stream(pods.subscribe(), move |p| {
            disruption::budgets_of_pod(&ctx3, &p)
        })
        .with_config(cfg.clone())
        .graceful_shutdown_on(stop())
        .run(
            timed("disruption", disruption::reconcile),
            error_policy,
            ctx.clone(),
        );
    let ctx5 = ctx.clone();
    let quota_controller = Controller::for_shared_stream(quotas.subscribe(), quotas.store.clone())
        .watches_shared_stream(pods.subscribe(), move |p| {
            resourcequota::quotas_of_pod(&ctx5, &p)
        })
        .with_config(cfg.clone())
        .graceful_shutdown_on(stop())
        .run(
            timed("resourcequota", resourcequota::reconcile),
            error_policy,
            ctx.clone(),
        );
    let ctx6 = ctx.clone();
    let aggregation_controller =
        Controller::for_shared_stream(clusterroles.subscribe(), clusterroles.store.clone())
            .watches_shared_stream(clusterroles.subscribe(), move |_r: Arc<ClusterRole>| {
                aggregation::aggregating(&ctx6)
            })
            .with_config(cfg.clone())
            .graceful_shutdown_on(stop())
            .run(
                timed("clusterrole-aggregation", aggregation::reconcile),
                error_policy,
                ctx.clone(),
            );
    let watches = [
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
    let gc = tokio::spawn(gc::run(ctx.clone()));
    tokio::join!(
        drain("replicaset", rs_controller),
        drain("replicationcontroller", rc_controller),
        drain("deployment", deploy_controller),
        drain("serviceaccount", sa_controller),
        drain("root-ca-cert-publisher", rootca_controller),
        drain("endpointslice", eps_controller),
        drain("job", job_controller),
        drain("cronjob", cronjob_controller),
        drain("daemonset", daemonset_controller),
        drain("statefulset", statefulset_controller),
        drain("persistentvolumeclaim", claim_controller),
        drain("persistentvolume", volume_controller),
        drain("nodelifecycle", node_controller),
        drain("disruption", pdb_controller),
        drain("resourcequota", quota_controller),
        drain("clusterrole-aggregation", aggregation_controller),
    );
    gc.abort();
    for w in watches {
        w.abort();
    }
}
