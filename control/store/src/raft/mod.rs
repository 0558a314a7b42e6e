//! Raft glue: the type configuration, log storage, state machine and network that openraft
//! needs. Everything here is wired together by [`crate::Store`].

// openraft's traits return its own (large) StorageError; helpers here return it as well.
#![allow(clippy::result_large_err)]

pub(crate) mod durable;
pub(crate) mod elections;
pub(crate) mod log_file;
pub(crate) mod log_store;
pub(crate) mod network;
pub(crate) mod pace;
pub(crate) mod snapshot;
pub(crate) mod state_machine;

use serde::{Deserialize, Serialize};

use crate::types::{Revision, Txn, TxnResponse};

/// What one Raft log entry asks the state machine to do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Transactions batched by the leader into one entry; each gets its own revision.
    Txns(Vec<Txn>),
    /// Drop history below this revision.
    Compact(Revision),
}

/// Why a compaction was refused; deterministic, so every member refuses alike.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompactRejected {
    AlreadyCompacted { compact_revision: Revision },
    FutureRevision { current: Revision },
}

/// What the state machine answers for one entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    Txns(Vec<TxnResponse>),
    Compact(Result<Revision, CompactRejected>),
    /// Blank and membership entries.
    Empty,
}

openraft::declare_raft_types!(
    /// Baton's Raft types: members are numbered, addressed by their HTTP address, and a
    /// snapshot is a file (see [`snapshot`]).
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = snapshot::SnapshotData,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type NodeId = u64;
pub type Raft = openraft::Raft<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type StorageError = openraft::StorageError<NodeId>;
