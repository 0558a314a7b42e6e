//! The store's data model: keys, revisions, transactions and watch events.
//!
//! These are plain values with no I/O, shared by the embedded store, the HTTP client and
//! the Raft log (they are what a log entry carries). They mirror etcd's v3 API, because
//! the API server's optimistic concurrency and watch semantics are built on exactly it.

use serde::{Deserialize, Serialize};

/// A store revision: one global counter, bumped once by every committed write.
///
/// Revision 0 means "no revision" (an absent key's mod_revision, or "read the latest").
pub type Revision = i64;

/// Largest value the store accepts, as etcd's default request limit.
pub const MAX_VALUE_BYTES: usize = 1536 * 1024;
/// Largest key the store accepts.
pub const MAX_KEY_BYTES: usize = 8 * 1024;
/// Largest total size of one transaction's keys and values.
pub const MAX_TXN_BYTES: usize = MAX_VALUE_BYTES + 64 * 1024;

/// One key at one revision.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyValue {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
    /// Revision of the write that created this incarnation of the key.
    pub create_revision: Revision,
    /// Revision of the last write to the key.
    pub mod_revision: Revision,
    /// Number of writes since creation; 1 after the first put.
    pub version: i64,
}

/// What happened to a key at one revision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    Put,
    Delete,
}

/// A change to one key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub kind: EventKind,
    /// The key after the change. For a delete: the key, an empty value and the revision
    /// of the delete as `mod_revision` (create_revision and version are 0, as in etcd).
    pub kv: KeyValue,
    /// The key before the change, if it existed. Deletes always carry it, so a watcher
    /// sees the final state of a deleted object.
    pub prev_kv: Option<KeyValue>,
}

/// All the events committed at one revision. A revision's events are never split.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevisionEvents {
    pub revision: Revision,
    pub events: Vec<Event>,
}

/// What a compare looks at.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompareTarget {
    /// The key's mod_revision; 0 when the key is absent.
    ModRevision(Revision),
    /// The key's create_revision; 0 when the key is absent (so `== 0` means "absent").
    CreateRevision(Revision),
    /// The key's version; 0 when the key is absent.
    Version(i64),
    /// The key's value; an absent key never compares equal.
    Value(#[serde(with = "serde_bytes")] Vec<u8>),
}

/// How a compare relates the key's field to the target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompareOp {
    Equal,
    NotEqual,
    Less,
    Greater,
}

impl CompareOp {
    /// Whether the key's field, ordered against the target as `ordering`, passes.
    pub(crate) fn holds(self, ordering: std::cmp::Ordering) -> bool {
        match self {
            CompareOp::Equal => ordering.is_eq(),
            CompareOp::NotEqual => ordering.is_ne(),
            CompareOp::Less => ordering.is_lt(),
            CompareOp::Greater => ordering.is_gt(),
        }
    }
}

/// A guard of a transaction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compare {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    pub op: CompareOp,
    pub target: CompareTarget,
}

impl Compare {
    /// The key's mod_revision equals `rev` (0 means absent).
    pub fn mod_revision(key: impl Into<Vec<u8>>, op: CompareOp, rev: Revision) -> Self {
        Self {
            key: key.into(),
            op,
            target: CompareTarget::ModRevision(rev),
        }
    }

    /// The key does not exist.
    pub fn absent(key: impl Into<Vec<u8>>) -> Self {
        Self {
            key: key.into(),
            op: CompareOp::Equal,
            target: CompareTarget::CreateRevision(0),
        }
    }

    /// The key's value equals `value`.
    pub fn value(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Self {
        Self {
            key: key.into(),
            op: CompareOp::Equal,
            target: CompareTarget::Value(value.into()),
        }
    }
}

/// One operation of a transaction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    Put {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
    },
    Delete {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    Get {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
}

impl Op {
    pub fn put(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Self {
        Op::Put {
            key: key.into(),
            value: value.into(),
        }
    }

    pub fn delete(key: impl Into<Vec<u8>>) -> Self {
        Op::Delete { key: key.into() }
    }

    pub fn get(key: impl Into<Vec<u8>>) -> Self {
        Op::Get { key: key.into() }
    }

    pub(crate) fn key(&self) -> &[u8] {
        match self {
            Op::Put { key, .. } | Op::Delete { key } | Op::Get { key } => key,
        }
    }
}

/// A multi-key transaction: if every compare holds, run `success`, else `failure`.
/// Either branch commits in one revision (or none, if it writes nothing).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Txn {
    pub compares: Vec<Compare>,
    pub success: Vec<Op>,
    pub failure: Vec<Op>,
}

impl Txn {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn when(mut self, compares: impl IntoIterator<Item = Compare>) -> Self {
        self.compares.extend(compares);
        self
    }

    pub fn and_then(mut self, ops: impl IntoIterator<Item = Op>) -> Self {
        self.success.extend(ops);
        self
    }

    pub fn or_else(mut self, ops: impl IntoIterator<Item = Op>) -> Self {
        self.failure.extend(ops);
        self
    }

    /// Bytes of keys and values the transaction carries, for the request size limit.
    pub fn payload_bytes(&self) -> usize {
        let cmp: usize = self
            .compares
            .iter()
            .map(|c| {
                c.key.len()
                    + match &c.target {
                        CompareTarget::Value(v) => v.len(),
                        _ => 8,
                    }
            })
            .sum();
        let ops = |ops: &[Op]| -> usize {
            ops.iter()
                .map(|op| match op {
                    Op::Put { key, value } => key.len() + value.len(),
                    Op::Delete { key } | Op::Get { key } => key.len(),
                })
                .sum()
        };
        cmp + ops(&self.success) + ops(&self.failure)
    }
}

/// The result of one operation, in the order of the branch that ran.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpResult {
    Put { prev: Option<KeyValue> },
    Delete { prev: Option<KeyValue> },
    Get { kv: Option<KeyValue> },
}

/// The outcome of a transaction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnResponse {
    /// Whether every compare held (so `success` ran).
    pub succeeded: bool,
    /// The store revision after the transaction: its own revision if it wrote.
    pub revision: Revision,
    pub results: Vec<OpResult>,
}

/// A read of every key under a prefix.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeRequest {
    #[serde(with = "serde_bytes")]
    pub prefix: Vec<u8>,
    /// Continue after this key (exclusive): the `next_key` of a previous page.
    #[serde(with = "serde_bytes")]
    pub start_after: Option<Vec<u8>>,
    /// Maximum number of keys; 0 means no limit.
    pub limit: usize,
    /// Read at this revision; 0 means the latest.
    pub revision: Revision,
    /// Read from the local member without a read-index round (may be stale).
    pub serializable: bool,
}

impl RangeRequest {
    pub fn prefix(prefix: impl Into<Vec<u8>>) -> Self {
        Self {
            prefix: prefix.into(),
            ..Self::default()
        }
    }
}

/// A page of keys.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeResponse {
    pub kvs: Vec<KeyValue>,
    /// Whether more keys follow; continue with `start_after = last key`.
    pub more: bool,
    /// The revision the range was read at.
    pub revision: Revision,
}

/// How to read a single key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadOptions {
    /// Read at this revision; 0 means the latest.
    pub revision: Revision,
    /// Read from the local member without a read-index round (may be stale).
    pub serializable: bool,
}

/// A condition for a single-key write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Precondition {
    /// The key must not exist.
    Absent,
    /// The key's mod_revision must equal this.
    ModRevision(Revision),
}

/// What a watch stream yields.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WatchEvent {
    /// The events of one revision that touch the watched prefix.
    Events(RevisionEvents),
    /// Everything up to and including this revision has been delivered.
    Progress(Revision),
}

/// One member of the Raft group, as reported by [`crate::Store::status`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    pub id: u64,
    pub addr: String,
    /// Voters take part in elections and commit; learners only replicate.
    pub voter: bool,
}

/// One member's figures, for its metrics (see `Store::metrics`): its status, and what
/// only the metrics ask for.
#[derive(Debug, Clone, Default)]
pub struct StoreMetrics {
    pub status: Status,
    /// Leader changes seen since the member started.
    pub leader_changes: u64,
    /// RocksDB's files and memtables.
    pub db_bytes: u64,
    /// On the leader: each member's id and how many log entries it has yet to match.
    pub replication_lag: Vec<(u64, u64)>,
    /// Log entries this member holds but has not applied yet.
    pub apply_lag: u64,
    /// Log syncs, batch writes and proposals, timed.
    pub latencies: crate::Latencies,
}

/// The state of one member, as it sees itself.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub id: u64,
    pub leader: Option<u64>,
    pub term: u64,
    /// Last log index applied to the local state machine.
    pub applied_index: u64,
    /// The store revision of the local state machine.
    pub revision: Revision,
    /// The compaction floor: reads below it fail.
    pub compact_revision: Revision,
    pub members: Vec<MemberInfo>,
}
