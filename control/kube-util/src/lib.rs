//! # baton-kube: what every API client of Baton needs beyond kube-rs
//!
//! The scheduler, the controllers and the node agent are ordinary Kubernetes API clients
//! (kube-rs against Baton's API server). They share a few pieces built on kube-rs and
//! `k8s-openapi`:
//! - [`quantity`]: resource quantities (`100m`, `128Mi`) as exact numbers;
//! - [`selector`]: the placement rules kube-rs has no evaluator for (node selector terms
//!   with `Gt`/`Lt` and `matchFields`, taints and tolerations); label selectors are
//!   kube-core's `Selector`;
//! - [`cron`]: CronJob schedules, parsed once for the API server and the controller;
//! - [`pod`]: pod state questions (ready? terminal? whose?) and condition updates;
//! - [`storage`]: the names the volume pieces (API server, scheduler, provisioner,
//!   node) agree on;
//! - [`events`]: a recorder of core/v1 Events, which `kubectl describe` reads;
//! - [`ingress`]: which Ingresses are Baton's (IngressClass `baton`);
//! - [`client`]: a kube `Client` from an in-memory kubeconfig;
//! - [`balancer`]: a node's client-side load balancer over the API servers;
//! - [`leader`]: leader election on a Lease, for several control-plane members;
//! - [`local_nodes`]: calls from the API server to node agents in its own process;
//! - [`telemetry`]: the control loops' metrics (work queues, the scheduler), in one
//!   registry per process that the API server's `/metrics` serves;
//! - [`trace`]: trace context across HTTP requests and, through an annotation, across
//!   watches, so that one change is one trace from kubectl to the node;
//! - [`error`]: an error shown with its causes, each once.
//!
//! Nothing here talks to wasmtime or the store.

pub mod accept;
pub mod balancer;
pub mod client;
pub mod cron;
pub mod error;
pub mod events;
pub mod ingress;
pub mod leader;
pub mod local_nodes;
pub mod platform;
pub mod pod;
pub mod quantity;
pub mod quota;
pub mod selector;
pub mod storage;
pub mod telemetry;
pub mod trace;

/// What must live as long as a stream a request hands over (a pod's exec, attach or
/// port-forward): the API server counts the session among its long-running requests
/// until this is dropped, and whoever serves the stream (the node agent, or the API
/// server's splice to a node) keeps it in the stream's task.
#[derive(Clone)]
pub struct StreamHold {
    /// Never read: it is here to be dropped with the last clone.
    _held: std::sync::Arc<dyn std::any::Any + Send + Sync>,
}

impl StreamHold {
    pub fn new(held: impl std::any::Any + Send + Sync) -> Self {
        Self {
            _held: std::sync::Arc::new(held),
        }
    }
}

impl std::fmt::Debug for StreamHold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamHold").finish_non_exhaustive()
    }
}

/// How long, in whole seconds, a node may serve a ConfigMap or Secret it read before it
/// reads it again; set on every Node from the cluster's size by the controller manager
/// (Kubernetes' TTL controller), read by the node agent.
pub const NODE_TTL_ANNOTATION: &str = "node.alpha.kubernetes.io/ttl";
