//! The store's public error type, and its wire form for the HTTP API.

use serde::{Deserialize, Serialize};

use crate::db::DbError;
use crate::mvcc::MvccError;
use crate::types::Revision;

/// Everything a store operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A conditional write found the key in another state than required.
    #[error("conflict on key {key:?}: its mod_revision is {current_revision} (0 = absent); store revision {store_revision}")]
    Conflict {
        key: String,
        current_revision: Revision,
        store_revision: Revision,
    },
    /// The requested revision is below the compaction floor.
    #[error("revision {requested} has been compacted; the oldest readable revision is {compact_revision}")]
    Compacted {
        requested: Revision,
        compact_revision: Revision,
    },
    #[error("revision {requested} is newer than the store's revision {current}")]
    FutureRevision {
        requested: Revision,
        current: Revision,
    },
    #[error("value of {size} bytes exceeds the limit of {limit} bytes")]
    ValueTooLarge { size: usize, limit: usize },
    #[error("request of {size} bytes exceeds the limit of {limit} bytes")]
    RequestTooLarge { size: usize, limit: usize },
    #[error("invalid key: {reason}")]
    InvalidKey { reason: String },
    #[error("invalid request: {reason}")]
    InvalidRequest { reason: String },
    /// A watcher fell so far behind that events would have had to be dropped.
    #[error("watcher fell behind by more than {buffer} revisions and was cancelled; re-list and watch again")]
    SlowWatcher { buffer: usize },
    /// No leader could take the request, so nothing was written: safe to retry.
    #[error("no leader available, nothing was written: {reason}")]
    NoLeader { reason: String },
    /// The leader could not confirm the request in time (it may lose its quorum, or a
    /// member died mid-request): a write's outcome is unknown.
    #[error("store unavailable: {reason}")]
    Unavailable { reason: String },
    /// The disk under the store is (nearly) full: the write was refused before it could
    /// reach the log, so nothing was written, and writes resume once space is freed.
    #[error("the disk holding the store in {path} is full ({free} bytes free, {reserve} kept in reserve): writes are refused until space is freed; nothing was written")]
    NoSpace {
        path: std::path::PathBuf,
        free: u64,
        reserve: u64,
    },
    /// The store (or this watch) was shut down.
    #[error("store is shut down")]
    Closed,
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("storage engine error")]
    Storage(#[source] MvccError),
    #[error("raft: {context}")]
    Raft {
        context: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The state machine answered a request with a response of another kind: a bug.
    #[error("raft: {0}")]
    Unexpected(String),
    #[error("request to {addr} failed")]
    Transport {
        addr: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("malformed message")]
    Codec(#[from] postcard::Error),
    #[error("member {addr} answered with HTTP {status}: {body}")]
    Remote {
        addr: String,
        status: u16,
        body: String,
    },
    /// An external etcd refused a request or could not be reached.
    #[error("etcd: {context}")]
    Etcd {
        context: &'static str,
        #[source]
        source: Box<etcd_client::Error>,
    },
    /// A Raft membership call made of a store that is an external etcd, whose members
    /// etcd's own tools manage.
    #[error(
        "{what} is not possible: the store is an external etcd, whose membership etcd manages"
    )]
    External { what: &'static str },
    #[error("I/O error on {path}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl From<MvccError> for Error {
    fn from(e: MvccError) -> Self {
        match e {
            MvccError::Compacted {
                requested,
                compact_revision,
            } => Error::Compacted {
                requested,
                compact_revision,
            },
            MvccError::FutureRevision { requested, current } => {
                Error::FutureRevision { requested, current }
            }
            other => Error::Storage(other),
        }
    }
}

impl Error {
    /// Whether retrying the same request (possibly on another member) may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::NoLeader { .. } | Error::Unavailable { .. } | Error::Transport { .. }
        )
    }
}

/// The serializable form of [`Error`] carried by the HTTP API.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum WireError {
    Conflict {
        key: String,
        current_revision: Revision,
        store_revision: Revision,
    },
    Compacted {
        requested: Revision,
        compact_revision: Revision,
    },
    FutureRevision {
        requested: Revision,
        current: Revision,
    },
    ValueTooLarge {
        size: usize,
        limit: usize,
    },
    RequestTooLarge {
        size: usize,
        limit: usize,
    },
    InvalidKey {
        reason: String,
    },
    InvalidRequest {
        reason: String,
    },
    SlowWatcher {
        buffer: usize,
    },
    NoLeader {
        reason: String,
    },
    Unavailable {
        reason: String,
    },
    Closed,
    Internal {
        message: String,
    },
}

impl From<&Error> for WireError {
    fn from(e: &Error) -> Self {
        match e {
            Error::Conflict {
                key,
                current_revision,
                store_revision,
            } => WireError::Conflict {
                key: key.clone(),
                current_revision: *current_revision,
                store_revision: *store_revision,
            },
            Error::Compacted {
                requested,
                compact_revision,
            } => WireError::Compacted {
                requested: *requested,
                compact_revision: *compact_revision,
            },
            Error::FutureRevision { requested, current } => WireError::FutureRevision {
                requested: *requested,
                current: *current,
            },
            Error::ValueTooLarge { size, limit } => WireError::ValueTooLarge {
                size: *size,
                limit: *limit,
            },
            Error::RequestTooLarge { size, limit } => WireError::RequestTooLarge {
                size: *size,
                limit: *limit,
            },
            Error::InvalidKey { reason } => WireError::InvalidKey {
                reason: reason.clone(),
            },
            Error::InvalidRequest { reason } => WireError::InvalidRequest {
                reason: reason.clone(),
            },
            Error::SlowWatcher { buffer } => WireError::SlowWatcher { buffer: *buffer },
            Error::NoLeader { reason } => WireError::NoLeader {
                reason: reason.clone(),
            },
            Error::Unavailable { reason } => WireError::Unavailable {
                reason: reason.clone(),
            },
            // A transport failure between members means the leader is unreachable from here.
            Error::Transport { .. } => WireError::Unavailable {
                reason: baton_error_chain::chain(e),
            },
            Error::Closed => WireError::Closed,
            other => WireError::Internal {
                message: baton_error_chain::chain(other),
            },
        }
    }
}

impl WireError {
    pub(crate) fn into_error(self, addr: &str) -> Error {
        match self {
            WireError::Conflict {
                key,
                current_revision,
                store_revision,
            } => Error::Conflict {
                key,
                current_revision,
                store_revision,
            },
            WireError::Compacted {
                requested,
                compact_revision,
            } => Error::Compacted {
                requested,
                compact_revision,
            },
            WireError::FutureRevision { requested, current } => {
                Error::FutureRevision { requested, current }
            }
            WireError::ValueTooLarge { size, limit } => Error::ValueTooLarge { size, limit },
            WireError::RequestTooLarge { size, limit } => Error::RequestTooLarge { size, limit },
            WireError::InvalidKey { reason } => Error::InvalidKey { reason },
            WireError::InvalidRequest { reason } => Error::InvalidRequest { reason },
            WireError::SlowWatcher { buffer } => Error::SlowWatcher { buffer },
            WireError::NoLeader { reason } => Error::NoLeader { reason },
            WireError::Unavailable { reason } => Error::Unavailable { reason },
            WireError::Closed => Error::Closed,
            WireError::Internal { message } => Error::Remote {
                addr: addr.to_string(),
                status: 500,
                body: message,
            },
        }
    }
}

/// An error and its causes on one line, for messages that cross the wire.
impl Error {
    /// Wraps an openraft error, keeping it as the typed source.
    pub(crate) fn raft(
        context: &'static str,
    ) -> impl FnOnce(Box<dyn std::error::Error + Send + Sync>) -> Self {
        move |source| Error::Raft { context, source }
    }
}
