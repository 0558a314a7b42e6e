//! The controllers' unit tests: stores a test fills, and a context whose client is a
//! [`FakeApi`] (see `baton_testkit::fake_api`).

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, ReplicationController, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, store::Writer, Store};
use kube::runtime::watcher;
use serde_json::Value;

pub use baton_testkit::fake_api::FakeApi;

use crate::Ctx;

/// The cluster CA the context publishes (`rootca`).
pub const FAKE_CA: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

/// The stores a test fills, and the context that reads them.
pub struct World {
    pub api: FakeApi,
    pub ctx: Arc<Ctx>,
    pods: Writer<Pod>,
    services: Writer<Service>,
    endpointslices: Writer<EndpointSlice>,
    jobs: Writer<Job>,
    replicasets: Writer<ReplicaSet>,
    deployments: Writer<Deployment>,
    nodes: Writer<Node>,
    pvs: Writer<k8s_openapi::api::core::v1::PersistentVolume>,
    classes: Writer<k8s_openapi::api::storage::v1::StorageClass>,
    ingresses: Writer<k8s_openapi::api::networking::v1::Ingress>,
}

fn store<K>() -> (Store<K>, Writer<K>)
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    reflector::store()
}

impl World {
    pub fn new() -> Self {
        let api = FakeApi::default();
        let client = api.client();
        let (pods_s, pods) = store::<Pod>();
        let (services_s, services) = store::<Service>();
        let (slices_s, endpointslices) = store::<EndpointSlice>();
        let (jobs_s, jobs) = store::<Job>();
        let (rs_s, replicasets) = store::<ReplicaSet>();
        let (deps_s, deployments) = store::<Deployment>();
        let (nodes_s, nodes) = store::<Node>();
        let (pvs_s, pvs) = store::<k8s_openapi::api::core::v1::PersistentVolume>();
        let (classes_s, classes) = store::<k8s_openapi::api::storage::v1::StorageClass>();
        let (ingresses_s, ingresses) = store::<k8s_openapi::api::networking::v1::Ingress>();
        let ctx = Arc::new(Ctx {
            client: client.clone(),
            pods: pods_s,
            pods_by_controller: Default::default(),
            replicasets: rs_s,
            replicasets_by_controller: Default::default(),
            replicationcontrollers: store::<ReplicationController>().0,
            deployments: deps_s,
            namespaces: store::<Namespace>().0,
            services: services_s,
            endpointslices: slices_s,
            jobs: jobs_s,
            cronjobs: store::<k8s_openapi::api::batch::v1::CronJob>().0,
            daemonsets: store::<k8s_openapi::api::apps::v1::DaemonSet>().0,
            statefulsets: store::<k8s_openapi::api::apps::v1::StatefulSet>().0,
            pvcs: store::<k8s_openapi::api::core::v1::PersistentVolumeClaim>().0,
            pvs: pvs_s,
            storageclasses: classes_s,
            nodes: nodes_s,
            leases: store::<Lease>().0,
            pdbs: store::<k8s_openapi::api::policy::v1::PodDisruptionBudget>().0,
            quotas: store::<k8s_openapi::api::core::v1::ResourceQuota>().0,
            clusterroles: store::<k8s_openapi::api::rbac::v1::ClusterRole>().0,
            ingresses: ingresses_s,
            ingressclasses: store::<k8s_openapi::api::networking::v1::IngressClass>().0,
            ingress_addresses: Default::default(),
            hpas: store::<k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler>().0,
            hpa_history: Default::default(),
            hpa_sync: Duration::from_secs(15),
            node_grace: Duration::from_secs(40),
            node_cidr_mask: 20,
            pod_ranges: Default::default(),
            ttl_step: Default::default(),
            expectations: Default::default(),
            pod_creates: tokio::sync::Semaphore::new(crate::POD_CREATES_AT_ONCE),
            recorder: baton_kube::events::Recorder::new(client, "test", None),
            clock: crate::clock::Clock::system(),
            root_ca: Some(FAKE_CA.into()),
            signer: None,
        });
        Self {
            api,
            ctx,
            pods,
            services,
            endpointslices,
            jobs,
            replicasets,
            deployments,
            nodes,
            pvs,
            classes,
            ingresses,
        }
    }

    /// The events recorded so far (see [`FakeApi::events`]), once the recorder has written
    /// all it was given.
    pub async fn events(&self) -> Vec<String> {
        self.ctx.recorder.flushed().await;
        self.api.events()
    }

    pub fn ingress(&mut self, v: Value) -> Arc<k8s_openapi::api::networking::v1::Ingress> {
        apply(&mut self.ingresses, v)
    }

    /// Takes a pod out of the store, as a watch event of its deletion would.
    pub fn pod_gone(&mut self, v: Value) {
        let obj: Pod = serde_json::from_value(v).expect("a valid object");
        let gone = watcher::Event::Delete(obj);
        self.ctx.pods_by_controller.apply(&gone);
        self.pods.apply_watcher_event(&gone);
    }

    /// Takes a node out of the store, as a watch event of its deletion would.
    pub fn node_gone(&mut self, v: Value) {
        let obj: Node = serde_json::from_value(v).expect("a valid object");
        self.nodes.apply_watcher_event(&watcher::Event::Delete(obj));
    }

    pub fn pod(&mut self, v: Value) -> Arc<Pod> {
        let pod = apply(&mut self.pods, v);
        self.ctx
            .pods_by_controller
            .apply(&watcher::Event::Apply((*pod).clone()));
        pod
    }
    pub fn service(&mut self, v: Value) -> Arc<Service> {
        apply(&mut self.services, v)
    }
    pub fn endpointslice(&mut self, v: Value) -> Arc<EndpointSlice> {
        apply(&mut self.endpointslices, v)
    }
    pub fn node(&mut self, v: Value) -> Arc<Node> {
        apply(&mut self.nodes, v)
    }
    pub fn volume(&mut self, v: Value) -> Arc<k8s_openapi::api::core::v1::PersistentVolume> {
        apply(&mut self.pvs, v)
    }
    pub fn storageclass(&mut self, v: Value) -> Arc<k8s_openapi::api::storage::v1::StorageClass> {
        apply(&mut self.classes, v)
    }
    pub fn job(&mut self, v: Value) -> Arc<Job> {
        apply(&mut self.jobs, v)
    }
    pub fn replicaset(&mut self, v: Value) -> Arc<ReplicaSet> {
        let rs = apply(&mut self.replicasets, v);
        self.ctx
            .replicasets_by_controller
            .apply(&watcher::Event::Apply((*rs).clone()));
        rs
    }
    pub fn deployment(&mut self, v: Value) -> Arc<Deployment> {
        apply(&mut self.deployments, v)
    }
    /// Runs the controllers on `clock` from now on.
    pub fn set_clock(&mut self, clock: crate::clock::Clock) {
        Arc::get_mut(&mut self.ctx)
            .expect("the clock is set before the context is shared")
            .clock = clock;
    }
    /// Takes a ReplicaSet out of the store, as a watch event of its deletion would.
    pub fn replicaset_gone(&mut self, v: Value) {
        let obj: ReplicaSet = serde_json::from_value(v).expect("a valid object");
        let gone = watcher::Event::Delete(obj);
        self.ctx.replicasets_by_controller.apply(&gone);
        self.replicasets.apply_watcher_event(&gone);
    }
}

fn apply<K>(w: &mut Writer<K>, v: Value) -> Arc<K>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + 'static,
{
    let obj: K = serde_json::from_value(v).expect("a valid object");
    w.apply_watcher_event(&watcher::Event::Apply(obj.clone()));
    Arc::new(obj)
}
