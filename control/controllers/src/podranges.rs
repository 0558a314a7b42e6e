//! Pod address ranges for nodes, handed out from memory as kube-controller-manager's
//! range allocator does.
//!
//! Every node gets one block of `127.128.0.0/9`, `/20` by default. The block is chosen
//! under a short lock and written to the Node afterwards, so that nodes joining together
//! get theirs with their writes in parallel. (Holding a lock across the write made
//! 5,000 joining nodes wait for one another: minutes went by before most had a range,
//! and their TTL annotation, written in the same pass, with it.)
//!
//! What is taken is a bitmap of blocks. It is built from the node cache at the first
//! allocation; after that, each node seen with a range marks its blocks, and each block
//! handed out stays reserved for its node, so a retried write gets the same one. Blocks
//! of deleted nodes are not tracked one by one: when no block is free, the bitmap is
//! built again from the nodes that still exist, which frees them.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::Node;
use kube::ResourceExt;

/// Where every pod range lies.
pub const POD_RANGES: Ipv4Addr = Ipv4Addr::new(127, 128, 0, 0);
pub const POD_RANGES_PREFIX: u8 = 9;
/// The per-node mask sizes allowed: a node needs some addresses, and the pool some nodes.
pub const NODE_MASKS: std::ops::RangeInclusive<u8> = 12..=28;

/// How many blocks of `/mask` the pod ranges hold.
pub fn blocks(mask: u8) -> u32 {
    1 << (mask - POD_RANGES_PREFIX)
}

/// The `/mask` block number `i` of `127.128.0.0/9`.
pub fn pod_cidr(i: u32, mask: u8) -> Option<String> {
    if i >= blocks(mask) {
        return None;
    }
    let base = u32::from(POD_RANGES) + (i << (32 - mask));
    Some(format!("{}/{mask}", Ipv4Addr::from(base)))
}

/// The `/mask` blocks a node's range covers, whatever size it was given (the mask size
/// may have changed since), so that no new range overlaps it.
fn blocks_of(cidr: &str, mask: u8) -> std::ops::Range<u32> {
    let parse = || -> Option<std::ops::Range<u32>> {
        let (ip, prefix) = cidr.split_once('/')?;
        let ip: Ipv4Addr = ip.parse().ok()?;
        let prefix: u8 = prefix.parse().ok().filter(|p| *p <= 32)?;
        let start = u32::from(ip).checked_sub(u32::from(POD_RANGES))?;
        let size = 1u64 << (32 - prefix);
        let end = (u64::from(start) + size - 1).min(u64::from(u32::MAX >> POD_RANGES_PREFIX));
        let shift = 32 - mask;
        Some((start >> shift)..((end as u32) >> shift) + 1)
    };
    parse().unwrap_or(0..0)
}

fn range_of(node: &Node) -> Option<&str> {
    node.spec.as_ref()?.pod_cidr.as_deref()
}

/// The ranges handed out, shared by the node lifecycle controller's reconciles.
#[derive(Debug, Default)]
pub struct PodRanges {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// The mask the bitmap is for; none before the first allocation.
    mask: Option<u8>,
    taken: Vec<bool>,
    /// Blocks handed out to nodes whose Node may not show them yet.
    given: HashMap<String, u32>,
    /// Where the search for a free block starts: the block after the last one given.
    next: u32,
}

impl State {
    fn mark(&mut self, cidr: &str, mask: u8) {
        for b in blocks_of(cidr, mask) {
            if let Some(t) = self.taken.get_mut(b as usize) {
                *t = true;
            }
        }
    }

    /// The bitmap from the nodes that exist now, and the reservations of those among
    /// them that do not show their range yet.
    fn rebuild(&mut self, mask: u8, nodes: &[Arc<Node>]) {
        self.mask = Some(mask);
        self.taken = vec![false; blocks(mask) as usize];
        let mut given = std::mem::take(&mut self.given);
        for n in nodes {
            match range_of(n) {
                Some(cidr) => self.mark(cidr, mask),
                None => {
                    if let Some(b) = given.remove(&n.name_any()) {
                        self.taken[b as usize] = true;
                        self.given.insert(n.name_any(), b);
                    }
                }
            }
        }
    }

    fn free_block(&self) -> Option<u32> {
        let n = self.taken.len() as u32;
        (0..n)
            .map(|i| (self.next + i) % n)
            .find(|&b| !self.taken[b as usize])
    }
}

impl PodRanges {
    /// The range for `node`, which has none yet: the block reserved for it before (its
    /// write is being retried), or a free one, reserved now. None when every block is
    /// taken by a node that exists. `nodes` reads the node cache, which is walked only
    /// at the first allocation and when no block is free.
    pub fn reserve(
        &self,
        node: &str,
        mask: u8,
        nodes: impl Fn() -> Vec<Arc<Node>>,
    ) -> Option<String> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.mask != Some(mask) {
            s.given.clear();
            s.rebuild(mask, &nodes());
        }
        if let Some(&b) = s.given.get(node) {
            return pod_cidr(b, mask);
        }
        let block = match s.free_block() {
            Some(b) => b,
            None => {
                s.rebuild(mask, &nodes());
                s.free_block()?
            }
        };
        s.taken[block as usize] = true;
        s.given.insert(node.to_string(), block);
        s.next = block + 1;
        pod_cidr(block, mask)
    }

    /// `node` has a range: its blocks are taken, and a reservation for it is done.
    pub fn note(&self, node: &Node, mask: u8) {
        let Some(cidr) = range_of(node) else {
            return;
        };
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.mask != Some(mask) {
            // Nothing handed out yet: the first allocation reads every node.
            return;
        }
        s.mark(cidr, mask);
        s.given.remove(&node.name_any());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn pod_ranges_are_disjoint_blocks() {
        assert_eq!(pod_cidr(0, 20).unwrap(), "127.128.0.0/20");
        assert_eq!(pod_cidr(1, 20).unwrap(), "127.128.16.0/20");
        assert_eq!(pod_cidr(2047, 20).unwrap(), "127.255.240.0/20");
        assert!(pod_cidr(2048, 20).is_none());
        assert_eq!(blocks_of("127.128.16.0/20", 20), 1..2);
        // 5,000 nodes fit at /22, with 1,024 addresses each.
        assert_eq!(blocks(22), 8192);
        assert_eq!(pod_cidr(4999, 22).unwrap(), "127.206.28.0/22");
        assert_eq!(pod_cidr(8191, 22).unwrap(), "127.255.252.0/22");
        assert!(pod_cidr(8192, 22).is_none());
        // A range of another size covers every block it overlaps.
        assert_eq!(blocks_of("127.128.16.0/20", 22), 4..8);
        assert_eq!(blocks_of("127.128.20.0/22", 20), 1..2);
        assert_eq!(blocks_of("127.128.0.0/9", 20), 0..2048);
        // Ranges elsewhere, and nonsense, cover nothing.
        assert!(blocks_of("10.0.0.0/24", 20).is_empty());
        assert!(blocks_of("127.128.0.0/99", 20).is_empty());
        assert!(blocks_of("garbage", 20).is_empty());
    }

    fn node(name: &str, cidr: Option<&str>) -> Arc<Node> {
        let mut n = json!({"metadata": {"name": name}, "spec": {}});
        if let Some(c) = cidr {
            n["spec"]["podCIDR"] = json!(c);
        }
        Arc::new(serde_json::from_value(n).unwrap())
    }

    #[test]
    fn nodes_joining_together_get_distinct_blocks_and_a_retry_gets_its_own_again() {
        let ranges = PodRanges::default();
        // /12: eight blocks. Block 1 is on a node, and part of block 3 under another
        // mask size.
        let existing = vec![
            node("old", pod_cidr(1, 12).as_deref()),
            node("small", Some("127.176.16.0/20")),
        ];
        let cache = || existing.clone();
        let a = ranges.reserve("a", 12, cache).unwrap();
        let b = ranges.reserve("b", 12, cache).unwrap();
        let c = ranges.reserve("c", 12, cache).unwrap();
        assert_eq!(
            [a.as_str(), b.as_str(), c.as_str()],
            ["127.128.0.0/12", "127.160.0.0/12", "127.192.0.0/12"]
        );
        assert_eq!(ranges.reserve("b", 12, cache).unwrap(), b, "a retry");
    }

    #[test]
    fn when_no_block_is_free_those_of_deleted_nodes_are_given_again() {
        let ranges = PodRanges::default();
        let mut nodes: Vec<Arc<Node>> = Vec::new();
        for i in 0..8 {
            let name = format!("n{i}");
            let cidr = ranges.reserve(&name, 12, || nodes.clone()).unwrap();
            nodes.push(node(&name, Some(&cidr)));
            ranges.note(nodes.last().unwrap(), 12);
        }
        // Nodes waiting for a range are in the cache, without one.
        nodes.push(node("more", None));
        nodes.push(node("again", None));
        assert_eq!(ranges.reserve("more", 12, || nodes.clone()), None);
        let freed = range_of(&nodes.remove(5)).unwrap().to_string();
        assert_eq!(ranges.reserve("more", 12, || nodes.clone()).unwrap(), freed);
        assert_eq!(
            ranges.reserve("again", 12, || nodes.clone()),
            None,
            "a reservation not written yet holds its block"
        );
        // Deleted before its range was written: its reservation goes with it.
        nodes.retain(|n| n.name_any() != "more");
        assert_eq!(
            ranges.reserve("again", 12, || nodes.clone()).unwrap(),
            freed
        );
    }
}
