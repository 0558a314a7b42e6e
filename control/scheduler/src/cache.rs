//! The scheduler's view of the cluster: nodes, what is placed on each, and the pods it
//! assumed placed before the API server confirmed them.
//!
//! A pod is counted once, by UID, whether it came from the watch or was assumed at
//! binding time, so a bind followed by its watch event does not count it twice; and the
//! decision for a pod is made under one lock with its assumption, so concurrent
//! reconciles cannot both fill the last slot of a node.

use std::collections::HashMap;
use std::sync::Arc;

use baton_kube::{pod, quantity};
use k8s_openapi::api::core::v1::{Node, Pod};

/// What is placed on one node.
#[derive(Debug, Default, Clone)]
pub struct Usage {
    pub cpu_millis: u64,
    pub memory: u64,
    pub pods: u64,
    /// Pods per controlling owner (by UID), for spreading replicas.
    pub by_owner: HashMap<String, u64>,
}

/// A node and its capacity as the scheduler reads it.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub node: Arc<Node>,
    pub cpu_millis: u64,
    pub memory: u64,
    pub pods: u64,
    /// The images the node reports holding (`status.images`), by every name.
    pub images: std::collections::HashSet<String>,
}

impl NodeInfo {
    pub fn new(node: Arc<Node>) -> Self {
        let alloc = node.status.as_ref().and_then(|s| s.allocatable.as_ref());
        let get = |k: &str, f: fn(&str) -> Result<u64, quantity::QuantityError>| {
            alloc
                .and_then(|a| a.get(k))
                .and_then(|q| f(&q.0).ok())
                .unwrap_or(0)
        };
        Self {
            cpu_millis: get("cpu", quantity::millicores),
            memory: get("memory", quantity::whole),
            pods: get("pods", quantity::whole),
            images: node
                .status
                .iter()
                .flat_map(|s| s.images.iter().flatten())
                .flat_map(|i| i.names.iter().flatten())
                .cloned()
                .collect(),
            node,
        }
    }

    pub fn name(&self) -> &str {
        self.node.metadata.name.as_deref().unwrap_or("")
    }
}

#[derive(Debug, Clone)]
struct Placed {
    node: String,
    cpu_millis: u64,
    memory: u64,
    owner: Option<String>,
}

/// Nodes and placements, kept by the watch loops and read by the decisions.
#[derive(Debug, Default)]
pub struct Cache {
    pub nodes: HashMap<String, NodeInfo>,
    pub usage: HashMap<String, Usage>,
    placed: HashMap<String, Placed>,
    /// Every node's name, in the order decisions walk them (see `decide`).
    order: Vec<String>,
}

impl Cache {
    pub fn set_node(&mut self, node: Arc<Node>) {
        let info = NodeInfo::new(node);
        let name = info.name().to_string();
        if self.nodes.insert(name.clone(), info).is_none() {
            self.order.push(name);
        }
    }

    pub fn remove_node(&mut self, name: &str) {
        if self.nodes.remove(name).is_some() {
            self.order.retain(|n| n != name);
        }
    }

    /// Every node's name, in a fixed order: a decision starts where the last one stopped.
    pub fn order(&self) -> &[String] {
        &self.order
    }

    /// Takes in a pod from the watch: counted if bound and not finished, else forgotten.
    pub fn observe_pod(&mut self, p: &Pod) {
        let Some(uid) = p.metadata.uid.clone() else {
            return;
        };
        let node = p.spec.as_ref().and_then(|s| s.node_name.clone());
        match node {
            Some(node) if !pod::is_terminal(p) => self.assume(p, &node),
            _ => self.forget_pod(&uid),
        }
    }

    /// Counts a pod on `node` before the API server confirms the binding.
    pub fn assume(&mut self, p: &Pod, node: &str) {
        let Some(uid) = p.metadata.uid.clone() else {
            return;
        };
        let (cpu_millis, memory) = pod::requests(p);
        let owner = pod::controller_of(&p.metadata).map(|o| o.uid.clone());
        self.place(
            uid,
            Placed {
                node: node.to_string(),
                cpu_millis,
                memory,
                owner,
            },
        );
    }

    fn place(&mut self, uid: String, placed: Placed) {
        self.forget_pod(&uid);
        let u = self.usage.entry(placed.node.clone()).or_default();
        u.cpu_millis += placed.cpu_millis;
        u.memory += placed.memory;
        u.pods += 1;
        if let Some(o) = &placed.owner {
            *u.by_owner.entry(o.clone()).or_default() += 1;
        }
        self.placed.insert(uid, placed);
    }

    pub fn forget_pod(&mut self, uid: &str) {
        let Some(old) = self.placed.remove(uid) else {
            return;
        };
        if let Some(u) = self.usage.get_mut(&old.node) {
            u.cpu_millis = u.cpu_millis.saturating_sub(old.cpu_millis);
            u.memory = u.memory.saturating_sub(old.memory);
            u.pods = u.pods.saturating_sub(1);
            if let Some(o) = &old.owner {
                if let Some(n) = u.by_owner.get_mut(o) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        u.by_owner.remove(o);
                    }
                }
            }
        }
    }
}
