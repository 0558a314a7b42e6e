//! # baton-kube: what every API client of Baton needs beyond kube-rs
//!
//! The scheduler, the controllers and the node agent are ordinary Kubernetes API clients
//! (kube-rs against Baton's API server). They share a few pieces that kube-rs does not
//! give:
//! - [`quantity`]: resource quantities (`100m`, `128Mi`) as numbers;
//! - [`selector`]: label selectors, node selector terms, taints and tolerations;
//! - [`pod`]: pod state questions (ready? terminal? whose?) and condition updates;
//! - [`events`]: a recorder of core/v1 Events, which `kubectl describe` reads;
//! - [`client`]: a kube `Client` from an in-memory kubeconfig;
//! - [`leader`]: leader election on a Lease, for several control-plane members.
//!
//! Nothing here talks to wasmtime or the store.

pub mod client;
pub mod events;
pub mod leader;
pub mod pod;
pub mod quantity;
pub mod selector;
