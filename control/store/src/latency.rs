//! How long the store's durable steps take, under etcd's metric names: syncing the Raft
//! log (`etcd_disk_wal_fsync_duration_seconds`), writing an applied batch to RocksDB
//! (`etcd_disk_backend_commit_duration_seconds`), and a proposal from the leader's
//! batcher to its commit and apply (`baton_store_proposal_duration_seconds`).
//!
//! The histograms are `prometheus-client`'s, shared by handle: the store's threads
//! observe into them and the API server's `/metrics` encodes them (see
//! [`crate::StoreMetrics`]).

use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};

/// The store's latency histograms. Cloning shares them.
#[derive(Clone, Debug)]
pub struct Latencies {
    pub wal_fsync: Histogram,
    pub backend_commit: Histogram,
    pub proposal: Histogram,
}

impl Default for Latencies {
    fn default() -> Self {
        // etcd's buckets: 1 ms doubling to 8 s.
        let buckets = || Histogram::new(exponential_buckets(0.001, 2.0, 14));
        Self {
            wal_fsync: buckets(),
            backend_commit: buckets(),
            proposal: buckets(),
        }
    }
}

/// Runs `f` and observes how long it took.
pub(crate) fn timed<T>(h: &Histogram, f: impl FnOnce() -> T) -> T {
    let started = std::time::Instant::now();
    let out = f();
    h.observe(started.elapsed().as_secs_f64());
    out
}
