//! # baton-store: the cluster store
//!
//! Baton keeps all cluster state (every Pod, Deployment, Node, ...) in this store, which
//! plays etcd's role in Kubernetes. Only the API server talks to it.
//!
//! It is an **MVCC key-value store**: one global revision counts every committed write, each
//! key remembers the revisions that created and last modified it, old revisions stay
//! readable until compacted, and watches stream every change in order. The Kubernetes
//! `resourceVersion` is exactly the store revision, and optimistic concurrency (a stale
//! update gets 409) is a compare-and-swap on a key's `mod_revision`.
//!
//! It is **replicated by Raft** ([openraft] 0.9.25): the Raft log in files of its own, the
//! state in **RocksDB**. A write is
//! acknowledged only after a quorum has committed it and synced it to disk. Reads are
//! linearizable by default (a read index confirmed by a quorum); a serializable read of the
//! local member is an explicit option.
//!
//! ## Pieces
//! - [`types`]: keys, revisions, transactions, events: the data model, no I/O.
//! - `mvcc`: the revision-indexed state machine in RocksDB.
//! - `raft`: openraft's log storage (`raft::log_file`), state machine, HTTP network, and
//!   the clock by which a member stands for election (`raft::elections`).
//! - `watch`: the watch fan-out with its ordering guarantees.
//! - [`Store`]: one member, and the API (`txn`, `get`, `range`, `watch`, `compact`,
//!   membership). [`Store::router`] serves its Raft RPC and client API over HTTP.
//! - [`StoreClient`]: the same API from another process.
//! - [`tls`]: the store's own CA, and the mutual TLS that members and clients speak.
//! - [`etcd`]: an external etcd v3 cluster behind the same API, for users who run one
//!   ([`Store::open_etcd`]).
//!
//! ## Example: the embedded single-member store
//! ```no_run
//! # async fn demo() -> Result<(), baton_store::Error> {
//! use baton_store::{Precondition, ReadOptions, Store};
//! let store = Store::open_embedded("/tmp/baton-data").await?;
//! let rev = store.put_if("/registry/pods/default/web", "{}", Precondition::Absent).await?;
//! let kv = store.get(b"/registry/pods/default/web", ReadOptions::default()).await?;
//! assert_eq!(kv.unwrap().mod_revision, rev);
//! let mut watch = store.watch("/registry/pods/", rev + 1)?;
//! # let _ = watch.next().await;
//! # Ok(()) }
//! ```
//!
//! ## A cluster
//! Start each member with [`Store::open`] and serve [`Store::router`] on its address.
//! Bootstrap the first with [`Store::initialize`]; then, on the leader,
//! [`Store::add_learner`] each new member and [`Store::change_membership`] to make it a
//! voter. Any member accepts any request and forwards writes to the leader.
//!
//! [openraft]: https://docs.rs/openraft/0.9.25

mod client;
mod db;
mod dump;
mod error;
pub mod etcd;
mod latency;
mod mvcc;
mod raft;
mod server;
mod store;
pub mod tls;
pub mod types;
mod watch;

pub use client::StoreClient;
pub use db::{repair, DbError, Repaired};
pub use error::Error;
pub use etcd::{EtcdConfig, EtcdTls};
pub use latency::Latencies;
pub use mvcc::MvccError;
pub use raft::NodeId;
pub use store::{with_deadline, AutoCompaction, Store, StoreConfig};
pub use tls::{StoreCa, StoreTls, TlsError};
pub use types::*;
pub use watch::Watch;
