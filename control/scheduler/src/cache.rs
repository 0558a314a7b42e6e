//! The scheduler's view of the cluster: nodes, what is placed on each, and the pods it
//! assumed placed before the API server confirmed them.
//!
//! A pod is counted once, by UID, whether it came from the watch or was assumed at
//! binding time, so a bind followed by its watch event does not count it twice; and the
//! decision for a pod is made under one lock with its assumption, so concurrent
//! reconciles cannot both fill the last slot of a node.
//!
//! A decision walks hundreds of nodes (see `decide`), so a node's facts are read once,
//! when its object changes, and kept beside what is placed on it: the walk itself hashes
//! no name and reads no condition list.

use std::collections::HashMap;
use std::sync::Arc;

use baton_kube::{pod, quantity};
use k8s_openapi::api::core::v1::{Node, Pod};

/// A fixed, fast hash of a string: the same in every decision and for every node.
fn hash_of(s: &str) -> u64 {
    use std::hash::BuildHasher;
    foldhash::fast::FixedState::default().hash_one(s)
}

/// A controlling owner's UID with its hash, made once per pod: comparing owners on a node
/// compares the hashes first, not 36-byte strings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    hash: u64,
    uid: String,
}

impl Owner {
    pub fn new(uid: impl Into<String>) -> Self {
        let uid = uid.into();
        Self {
            hash: hash_of(&uid),
            uid,
        }
    }

    /// The pod's controlling owner.
    pub fn of(p: &Pod) -> Option<Self> {
        pod::controller_of(&p.metadata).map(|o| Self::new(o.uid.as_str()))
    }
}

/// What is placed on one node.
#[derive(Debug, Default, Clone)]
pub struct Usage {
    pub cpu_millis: u64,
    pub memory: u64,
    pub pods: u64,
    /// Pods per controlling owner, for spreading replicas. A node holds a few owners'
    /// pods, so a scan is cheaper than a map lookup for every node scored.
    pub by_owner: Vec<(Owner, u64)>,
}

impl Usage {
    /// How many of `owner`'s pods are here.
    pub fn of_owner(&self, owner: &Owner) -> u64 {
        self.by_owner
            .iter()
            .find(|(o, _)| o == owner)
            .map_or(0, |(_, n)| *n)
    }

    fn add(&mut self, placed: &Placed) {
        self.cpu_millis += placed.cpu_millis;
        self.memory += placed.memory;
        self.pods += 1;
        if let Some(o) = &placed.owner {
            match self.by_owner.iter_mut().find(|(k, _)| k == o) {
                Some((_, n)) => *n += 1,
                None => self.by_owner.push((o.clone(), 1)),
            }
        }
    }

    fn remove(&mut self, placed: &Placed) {
        self.cpu_millis = self.cpu_millis.saturating_sub(placed.cpu_millis);
        self.memory = self.memory.saturating_sub(placed.memory);
        self.pods = self.pods.saturating_sub(1);
        if let Some(o) = &placed.owner {
            if let Some(i) = self.by_owner.iter().position(|(k, _)| k == o) {
                let n = &mut self.by_owner[i].1;
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.by_owner.swap_remove(i);
                }
            }
        }
    }
}

/// The images a node holds, as the sorted hashes of their names: scoring asks every node
/// it scores whether it holds the pod's images, and a search among a few numbers is
/// cheaper than hashing and comparing names there. Two names sharing a 64-bit hash could
/// only tip a preference (image locality weighs less than spreading), never a filter.
#[derive(Debug, Clone, Default)]
pub struct Images(Vec<u64>);

impl Images {
    /// An image name's hash, the same for the node's names and the pod's.
    pub fn key(name: &str) -> u64 {
        hash_of(name)
    }

    pub fn contains(&self, key: u64) -> bool {
        self.0.binary_search(&key).is_ok()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<'a> FromIterator<&'a String> for Images {
    fn from_iter<I: IntoIterator<Item = &'a String>>(names: I) -> Self {
        let mut keys: Vec<u64> = names.into_iter().map(|n| Self::key(n)).collect();
        keys.sort_unstable();
        keys.dedup();
        Self(keys)
    }
}

/// A node and its capacity as the scheduler reads it.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub node: Arc<Node>,
    pub cpu_millis: u64,
    pub memory: u64,
    pub pods: u64,
    /// Its Ready condition is True.
    pub ready: bool,
    /// `spec.unschedulable` (cordoned).
    pub unschedulable: bool,
    /// Taints other than PreferNoSchedule, which the filter checks.
    pub taints: Vec<k8s_openapi::api::core::v1::Taint>,
    /// The images the node reports holding (`status.images`), by every name.
    pub images: Images,
}

impl NodeInfo {
    pub fn new(node: Arc<Node>) -> Self {
        let status = node.status.as_ref();
        let alloc = status.and_then(|s| s.allocatable.as_ref());
        let get = |k: &str, f: fn(&str) -> Result<u64, quantity::QuantityError>| {
            alloc
                .and_then(|a| a.get(k))
                .and_then(|q| f(&q.0).ok())
                .unwrap_or(0)
        };
        let ready = status
            .and_then(|s| s.conditions.as_ref())
            .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
            .is_some_and(|c| c.status == "True");
        Self {
            cpu_millis: get("cpu", quantity::millicores),
            memory: get("memory", quantity::whole),
            pods: get("pods", quantity::whole),
            ready,
            unschedulable: node.spec.as_ref().and_then(|s| s.unschedulable) == Some(true),
            taints: node
                .spec
                .iter()
                .flat_map(|s| s.taints.iter().flatten())
                .filter(|t| t.effect != "PreferNoSchedule")
                .cloned()
                .collect(),
            images: status
                .iter()
                .flat_map(|s| s.images.iter().flatten())
                .flat_map(|i| i.names.iter().flatten())
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
    owner: Option<Owner>,
}

/// A known node and what is placed on it.
#[derive(Debug, Clone)]
pub struct Slot {
    pub info: NodeInfo,
    pub usage: Usage,
}

/// Nodes and placements, kept by the watch loops and read by the decisions.
#[derive(Debug, Default)]
pub struct Cache {
    /// Every known node, in the order decisions walk them (see `decide`).
    slots: Vec<Slot>,
    /// A node's name → its place in `slots`.
    index: HashMap<String, usize>,
    /// What is placed on nodes not known (yet, or any more): a pod bound to a node is
    /// counted whether or not its Node has been seen, and a Node seen again finds its
    /// pods counted.
    elsewhere: HashMap<String, Usage>,
    placed: HashMap<String, Placed>,
}

impl Cache {
    pub fn set_node(&mut self, node: Arc<Node>) {
        let info = NodeInfo::new(node);
        if let Some(&i) = self.index.get(info.name()) {
            self.slots[i].info = info;
            return;
        }
        let name = info.name().to_string();
        let usage = self.elsewhere.remove(&name).unwrap_or_default();
        self.index.insert(name, self.slots.len());
        self.slots.push(Slot { info, usage });
    }

    pub fn remove_node(&mut self, name: &str) {
        let Some(i) = self.index.remove(name) else {
            return;
        };
        // The last node takes the gap: the walk's order changes, which only moves where
        // the next decisions look first.
        let gone = self.slots.swap_remove(i);
        if let Some(moved) = self.slots.get(i) {
            self.index.insert(moved.info.name().to_string(), i);
        }
        if gone.usage.pods > 0 {
            self.elsewhere.insert(name.to_string(), gone.usage);
        }
    }

    /// Every known node, in a fixed order: a decision starts where the last one stopped.
    pub fn slots(&self) -> &[Slot] {
        &self.slots
    }

    /// What is placed on `node`, known or not.
    pub fn usage(&self, node: &str) -> Option<&Usage> {
        match self.index.get(node) {
            Some(&i) => Some(&self.slots[i].usage),
            None => self.elsewhere.get(node),
        }
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
        let owner = Owner::of(p);
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
        match self.index.get(&placed.node) {
            Some(&i) => self.slots[i].usage.add(&placed),
            None => self
                .elsewhere
                .entry(placed.node.clone())
                .or_default()
                .add(&placed),
        }
        self.placed.insert(uid, placed);
    }

    pub fn forget_pod(&mut self, uid: &str) {
        let Some(old) = self.placed.remove(uid) else {
            return;
        };
        match self.index.get(&old.node) {
            Some(&i) => self.slots[i].usage.remove(&old),
            None => {
                if let Some(u) = self.elsewhere.get_mut(&old.node) {
                    u.remove(&old);
                    if u.pods == 0 {
                        self.elsewhere.remove(&old.node);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(name: &str) -> Arc<Node> {
        Arc::new(serde_json::from_value(json!({"metadata": {"name": name}})).unwrap())
    }

    fn pod(uid: &str, node: &str, owner: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": uid, "uid": uid, "ownerReferences": [{"apiVersion": "apps/v1",
                "kind": "ReplicaSet", "name": owner, "uid": owner, "controller": true}]},
            "spec": {"nodeName": node, "containers": [{"name": "c",
                "resources": {"requests": {"cpu": "100m"}}}]}
        }))
        .unwrap()
    }

    #[test]
    fn pods_are_counted_on_their_node_whether_it_is_known_before_after_or_no_more() {
        let mut c = Cache::default();
        // A pod of a node not seen yet; then the node.
        c.observe_pod(&pod("p1", "b", "rs"));
        for n in ["a", "b", "c"] {
            c.set_node(node(n));
        }
        assert_eq!(c.usage("b").map(|u| (u.pods, u.cpu_millis)), Some((1, 100)));
        c.observe_pod(&pod("p2", "b", "rs"));
        assert_eq!(c.usage("b").unwrap().of_owner(&Owner::new("rs")), 2);
        // Removing a node moves the last one into its place; both keep their counts.
        c.observe_pod(&pod("p3", "c", "other"));
        c.remove_node("a");
        let names: Vec<&str> = c.slots().iter().map(|s| s.info.name()).collect();
        assert_eq!(names, ["c", "b"]);
        assert_eq!(c.usage("c").unwrap().of_owner(&Owner::new("other")), 1);
        c.remove_node("b");
        assert_eq!(c.usage("b").unwrap().pods, 2, "kept while its pods are");
        c.set_node(node("b"));
        assert_eq!(c.slots()[1].usage.pods, 2);
        // Forgetting a pod uncounts it, and an owner with none left is dropped.
        c.forget_pod("p3");
        assert!(c.usage("c").unwrap().by_owner.is_empty());
        c.remove_node("b");
        c.forget_pod("p1");
        c.forget_pod("p2");
        assert!(
            c.usage("b").is_none(),
            "nothing kept for a gone node with no pods"
        );
    }
}
