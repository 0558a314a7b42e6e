//! The backends of wasi:keyvalue buckets ([`baton_wasm_shim::Bucket`]).
//!
//! - [`LocalStore`]: durable and node-local, one RocksDB under the node's data directory
//!   holding every local bucket of the node. A bucket is named by its namespace and name,
//!   so a pod that comes back on the same node (restarted, or replaced by its
//!   Deployment) finds what its predecessor wrote, as it would in a local volume. Each
//!   bucket is capped in bytes (keys and values); a write past the cap is refused and
//!   changes nothing.
//! - [`RedisBucket`]: a Redis database, shared by every pod that names it, on any node.
//!   Keys are Redis keys as they are; `increment` is `INCRBY`, so counters are shared
//!   atomically. Each value is capped in bytes; the database's own size is Redis's to
//!   bound (`maxmemory`).
//!
//! Both keep a counter as its decimal text, as the shim's [`baton_wasm_shim::MemoryBucket`]
//! does.

mod local;
mod redis_bucket;

pub use local::{LocalBucket, LocalStore};
pub use redis_bucket::RedisBucket;

/// Why a store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("opening the node's keyvalue store at {path}")]
    Open {
        path: std::path::PathBuf,
        #[source]
        source: rocksdb::Error,
    },
    #[error("reading bucket {bucket} of namespace {namespace}")]
    Scan {
        namespace: String,
        bucket: String,
        #[source]
        source: rocksdb::Error,
    },
    #[error("invalid Redis URL")]
    RedisUrl(#[source] redis::RedisError),
}
