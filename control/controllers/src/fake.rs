//! An in-memory stand-in for the API server, for the controllers' unit tests.
//!
//! A reconciler reads the world from its reflector stores and changes it through a
//! [`kube::Client`]. The tests fill the stores with objects and give the reconciler a
//! client whose requests never leave the process: [`FakeApi`] records each request and
//! answers it as kube-apiserver would (a created object back, a Status for a delete), or
//! with an error the test asked for. The test then checks the writes the reconciler made.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::BodyExt;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, store::Writer, Store};
use kube::runtime::watcher;
use kube::Client;
use serde_json::{json, Value};

use crate::Ctx;

/// One request the reconciler sent.
#[derive(Clone, Debug)]
pub struct Call {
    pub method: String,
    pub path: String,
    pub query: String,
    pub body: Value,
}

#[derive(Default)]
struct State {
    calls: Vec<Call>,
    /// (method, path suffix, status code): requests that fail.
    failures: Vec<(String, String, u16)>,
    /// (path, items): what a list of that path returns.
    lists: Vec<(String, Vec<Value>)>,
}

#[derive(Clone, Default)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
}

impl FakeApi {
    pub fn client(&self) -> Client {
        let state = self.state.clone();
        let svc = tower::service_fn(move |req: http::Request<kube::client::Body>| {
            let state = state.clone();
            async move {
                let (parts, body) = req.into_parts();
                let bytes = body.collect().await?.to_bytes();
                let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                let call = Call {
                    method: parts.method.to_string(),
                    path: parts.uri.path().to_string(),
                    query: parts.uri.query().unwrap_or_default().to_string(),
                    body,
                };
                let (code, answer) = answer(&mut state.lock().unwrap(), call);
                let resp = http::Response::builder()
                    .status(code)
                    .header("content-type", "application/json")
                    .body(http_body_util::Full::new(bytes::Bytes::from(
                        answer.to_string(),
                    )))
                    .unwrap();
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(resp)
            }
        });
        Client::new(svc, "default")
    }

    /// Every request so far, events included.
    pub fn calls(&self) -> Vec<Call> {
        self.state.lock().unwrap().calls.clone()
    }

    /// The writes so far as "METHOD path", leaving out events, which tests look at
    /// through [`FakeApi::events`].
    pub fn writes(&self) -> Vec<String> {
        self.calls()
            .into_iter()
            .filter(|c| c.method != "GET" && !c.path.contains("/events"))
            .map(|c| format!("{} {}", c.method, c.path))
            .collect()
    }

    /// The events created so far, as "type reason" (a repeat of one is a PATCH of its
    /// count, not listed here).
    pub fn events(&self) -> Vec<String> {
        self.calls()
            .into_iter()
            .filter(|c| c.method == "POST" && c.path.contains("/events"))
            .map(|c| {
                format!(
                    "{} {}",
                    c.body["type"].as_str().unwrap_or(""),
                    c.body["reason"].as_str().unwrap_or("")
                )
            })
            .collect()
    }

    /// Makes requests of `method` to a path ending in `suffix` fail with `code`.
    pub fn fail(&self, method: &str, suffix: &str, code: u16) {
        self.state
            .lock()
            .unwrap()
            .failures
            .push((method.into(), suffix.into(), code));
    }

    /// What a list of `path` returns.
    pub fn list(&self, path: &str, items: Vec<Value>) {
        self.state.lock().unwrap().lists.push((path.into(), items));
    }

    pub fn clear(&self) {
        self.state.lock().unwrap().calls.clear();
    }
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
           "status": if code < 300 { "Success" } else { "Failure" },
           "reason": reason, "message": message, "code": code})
}

fn answer(state: &mut State, call: Call) -> (u16, Value) {
    state.calls.push(call.clone());
    if let Some((_, _, code)) = state
        .failures
        .iter()
        .find(|(m, s, _)| *m == call.method && call.path.ends_with(s.as_str()))
    {
        return (
            *code,
            status(*code, "InternalError", "injected by the test"),
        );
    }
    let name = call.path.rsplit('/').next().unwrap_or_default().to_string();
    match call.method.as_str() {
        "GET" => match state.lists.iter().find(|(p, _)| *p == call.path) {
            Some((_, items)) => (
                200,
                json!({"kind": "List", "apiVersion": "v1", "metadata": {"resourceVersion": "1"}, "items": items}),
            ),
            // Nothing was put there: an empty list.
            None => (
                200,
                json!({"kind": "List", "apiVersion": "v1", "metadata": {"resourceVersion": "1"}, "items": []}),
            ),
        },
        "DELETE" => (200, status(200, "", "")),
        "POST" => {
            let mut obj = call.body;
            obj["metadata"]["uid"] = json!(format!("uid-{}", state.calls.len()));
            obj["metadata"]["resourceVersion"] = json!("1");
            (201, obj)
        }
        // PATCH and PUT: the object as written, under the name in the path (a status
        // subresource's path ends in "status").
        _ => {
            let mut obj = call.body;
            if obj["metadata"]["name"].is_null() {
                let segs: Vec<&str> = call.path.split('/').collect();
                let n = if name == "status" || name == "finalize" {
                    segs[segs.len() - 2]
                } else {
                    name.as_str()
                };
                obj["metadata"]["name"] = json!(n);
            }
            (200, obj)
        }
    }
}

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
        let ctx = Arc::new(Ctx {
            client: client.clone(),
            pods: pods_s,
            replicasets: rs_s,
            deployments: deps_s,
            namespaces: store::<Namespace>().0,
            services: services_s,
            endpointslices: slices_s,
            jobs: jobs_s,
            nodes: store::<Node>().0,
            leases: store::<Lease>().0,
            node_grace: Duration::from_secs(40),
            cidr_lock: Default::default(),
            cidrs_given: Default::default(),
            expectations: Default::default(),
            recorder: baton_kube::events::Recorder::new(client, "test", None),
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
        }
    }

    pub fn pod(&mut self, v: Value) -> Arc<Pod> {
        apply(&mut self.pods, v)
    }
    pub fn service(&mut self, v: Value) -> Arc<Service> {
        apply(&mut self.services, v)
    }
    pub fn endpointslice(&mut self, v: Value) -> Arc<EndpointSlice> {
        apply(&mut self.endpointslices, v)
    }
    pub fn job(&mut self, v: Value) -> Arc<Job> {
        apply(&mut self.jobs, v)
    }
    pub fn replicaset(&mut self, v: Value) -> Arc<ReplicaSet> {
        apply(&mut self.replicasets, v)
    }
    pub fn deployment(&mut self, v: Value) -> Arc<Deployment> {
        apply(&mut self.deployments, v)
    }
    /// Takes a ReplicaSet out of the store, as a watch event of its deletion would.
    pub fn replicaset_gone(&mut self, v: Value) {
        let obj: ReplicaSet = serde_json::from_value(v).expect("a valid object");
        self.replicasets
            .apply_watcher_event(&watcher::Event::Delete(obj));
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
