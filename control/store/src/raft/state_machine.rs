//! The Raft state machine: applies committed entries to the MVCC store, builds and installs
//! snapshots.
//!
//! # Crash safety
//! Applied entries are written without a sync: the synced Raft log can replay them. The one
//! hazard is a snapshot that lets openraft purge log entries the state machine has not made
//! durable. So a snapshot is only reported built after the write-ahead log is synced, and
//! the newest snapshot is kept in a file: at open, a state machine found older than that
//! snapshot (a crash during install, or a power loss) is restored from it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    EntryPayload, ErrorSubject, ErrorVerb, OptionalSend, RaftSnapshotBuilder, SnapshotMeta,
    StoredMembership,
};
use rocksdb::{WriteBatch, WriteOptions, DB};
use serde::{Deserialize, Serialize};

use super::{CompactRejected, LogId, NodeId, Request, Response, StorageError, TypeConfig};
use crate::db::CF_META;
use crate::mvcc::{Dump, Mvcc, MvccError};
use crate::watch::{HubMsg, WatchHub};

type Membership = StoredMembership<NodeId, openraft::BasicNode>;
type Meta = SnapshotMeta<NodeId, openraft::BasicNode>;

const META_APPLIED: &[u8] = b"raft_applied";
const META_MEMBERSHIP: &[u8] = b"raft_membership";
const SNAPSHOT_FILE: &str = "snapshot.bin";

fn sm_err(verb: ErrorVerb, e: impl std::error::Error + 'static) -> StorageError {
    StorageError::from(openraft::StorageIOError::new(
        ErrorSubject::StateMachine,
        verb,
        openraft::AnyError::new(&e),
    ))
}

fn snap_err(verb: ErrorVerb, e: impl std::error::Error + 'static) -> StorageError {
    StorageError::from(openraft::StorageIOError::new(
        ErrorSubject::Snapshot(None),
        verb,
        openraft::AnyError::new(&e),
    ))
}

/// Reads the Raft position recorded inside a dump.
fn dump_position(meta: &[(Vec<u8>, Vec<u8>)]) -> Result<(Option<LogId>, Membership), StorageError> {
    let applied = match Mvcc::dump_meta(meta, META_APPLIED) {
        Some(v) => postcard::from_bytes(v).map_err(|e| snap_err(ErrorVerb::Read, e))?,
        None => None,
    };
    let membership = match Mvcc::dump_meta(meta, META_MEMBERSHIP) {
        Some(v) => postcard::from_bytes(v).map_err(|e| snap_err(ErrorVerb::Read, e))?,
        None => Membership::default(),
    };
    Ok((applied, membership))
}

/// A snapshot as kept on disk.
#[derive(Debug, Serialize, Deserialize)]
struct SnapshotFile {
    meta: Meta,
    data: Vec<u8>,
}

#[derive(Debug, Clone)]
pub(crate) struct StateMachine {
    db: Arc<DB>,
    mvcc: Arc<Mvcc>,
    hub: WatchHub,
    dir: PathBuf,
    applied: Option<LogId>,
    membership: Membership,
}

impl StateMachine {
    pub(crate) fn open(
        db: Arc<DB>,
        mvcc: Arc<Mvcc>,
        hub: WatchHub,
        dir: &Path,
    ) -> Result<Self, StorageError> {
        let meta = db.cf_handle(CF_META).expect("meta column family");
        let read = |k| db.get_cf(meta, k).map_err(|e| sm_err(ErrorVerb::Read, e));
        let applied = match read(META_APPLIED)? {
            Some(v) => postcard::from_bytes(&v).map_err(|e| sm_err(ErrorVerb::Read, e))?,
            None => None,
        };
        let membership = match read(META_MEMBERSHIP)? {
            Some(v) => postcard::from_bytes(&v).map_err(|e| sm_err(ErrorVerb::Read, e))?,
            None => Membership::default(),
        };
        let mut sm = Self {
            db,
            mvcc,
            hub,
            dir: dir.to_path_buf(),
            applied,
            membership,
        };
        if let Some(file) = sm.read_snapshot_file()? {
            if file.meta.last_log_id > sm.applied {
                tracing::warn!(
                    snapshot = ?file.meta.last_log_id,
                    applied = ?sm.applied,
                    "state machine is older than its saved snapshot; restoring the snapshot"
                );
                sm.restore(&file.data)?;
            }
        }
        Ok(sm)
    }

    fn snapshot_path(&self) -> PathBuf {
        self.dir.join(SNAPSHOT_FILE)
    }

    fn read_snapshot_file(&self) -> Result<Option<SnapshotFile>, StorageError> {
        let mut bytes = match std::fs::read(self.snapshot_path()) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(snap_err(ErrorVerb::Read, e)),
        };
        // The data is the file's tail: it is kept in place (the header moved out of the
        // way) rather than copied, since it is as large as the store.
        let read = |e| snap_err(ErrorVerb::Read, e);
        let (meta, rest) = postcard::take_from_bytes::<Meta>(&bytes).map_err(read)?;
        let (len, data) = postcard::take_from_bytes::<usize>(rest).map_err(read)?;
        if data.len() != len {
            return Err(read(postcard::Error::DeserializeUnexpectedEnd));
        }
        let header = bytes.len() - len;
        bytes.drain(..header);
        Ok(Some(SnapshotFile { meta, data: bytes }))
    }

    /// Saves a snapshot durably: temp file, sync, rename, sync the folder. The file is the
    /// postcard encoding of [`SnapshotFile`], written in parts so that the data is not
    /// copied into a second buffer.
    fn write_snapshot_file(&self, file: &SnapshotFile) -> Result<(), StorageError> {
        let mut header =
            postcard::to_stdvec(&file.meta).map_err(|e| snap_err(ErrorVerb::Write, e))?;
        crate::mvcc::postcard_varint(&mut header, file.data.len() as u64);
        let tmp = self.dir.join(format!("{SNAPSHOT_FILE}.tmp"));
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&header)?;
            f.write_all(&file.data)?;
            f.sync_all()?;
            std::fs::rename(&tmp, self.snapshot_path())?;
            std::fs::File::open(&self.dir)?.sync_all()
        };
        write().map_err(|e| snap_err(ErrorVerb::Write, e))
    }

    fn meta_batch(&self, batch: &mut WriteBatch) -> Result<(), StorageError> {
        let meta = self.db.cf_handle(CF_META).expect("meta column family");
        let applied =
            postcard::to_stdvec(&self.applied).map_err(|e| sm_err(ErrorVerb::Write, e))?;
        let membership =
            postcard::to_stdvec(&self.membership).map_err(|e| sm_err(ErrorVerb::Write, e))?;
        batch.put_cf(meta, META_APPLIED, applied);
        batch.put_cf(meta, META_MEMBERSHIP, membership);
        Ok(())
    }

    /// Replaces the whole state with a snapshot body, durably, and tells the watchers.
    fn restore(&mut self, data: &[u8]) -> Result<(), StorageError> {
        let dump: Dump = postcard::from_bytes(data).map_err(|e| snap_err(ErrorVerb::Read, e))?;
        let (applied, membership) = dump_position(&dump.meta)?;
        let mut batch = WriteBatch::default();
        self.mvcc.restore_into(&dump, &mut batch);
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        self.db
            .write_opt(batch, &opts)
            .map_err(|e| snap_err(ErrorVerb::Write, e))?;
        self.applied = applied;
        self.membership = membership;
        self.mvcc
            .restored(&dump)
            .map_err(|e| snap_err(ErrorVerb::Read, e))?;
        self.hub.publish(HubMsg::Reset);
        Ok(())
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        // Make every applied write durable before the log behind it can be purged.
        self.db
            .flush_wal(true)
            .map_err(|e| snap_err(ErrorVerb::Write, e))?;
        // The builder may run beside apply, so the position comes from the same RocksDB
        // snapshot as the data, never from this (possibly stale) copy of the fields.
        let dump = self
            .mvcc
            .encode_dump()
            .map_err(|e| snap_err(ErrorVerb::Read, e))?;
        let (applied, membership) = dump_position(&dump.meta)?;
        let data = dump.bytes;
        let snapshot_id = match applied {
            Some(l) => format!("{}-{}-{}", l.leader_id.term, l.index, dump.revision),
            None => format!("empty-{}", dump.revision),
        };
        let meta = Meta {
            last_log_id: applied,
            last_membership: membership,
            snapshot_id,
        };
        let file = SnapshotFile {
            meta: meta.clone(),
            data,
        };
        self.write_snapshot_file(&file)?;
        tracing::info!(snapshot = %meta.snapshot_id, bytes = file.data.len(), "built snapshot");
        Ok(Snapshot {
            meta,
            snapshot: Box::new(file.data),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, Membership), StorageError> {
        Ok((self.applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = openraft::Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mvcc = self.mvcc.clone();
        let mut batch = mvcc.begin();
        let mut responses = Vec::new();
        let fail = |e: MvccError| sm_err(ErrorVerb::Write, e);
        for entry in entries {
            self.applied = Some(entry.log_id);
            let resp = match entry.payload {
                EntryPayload::Blank => Response::Empty,
                EntryPayload::Normal(Request::Txns(txns)) => {
                    let mut out = Vec::with_capacity(txns.len());
                    for txn in &txns {
                        out.push(batch.txn(txn).map_err(fail)?);
                    }
                    Response::Txns(out)
                }
                EntryPayload::Normal(Request::Compact(at)) => {
                    match batch.compact(at).map_err(fail)? {
                        Ok(()) => Response::Compact(Ok(at)),
                        Err(MvccError::Compacted {
                            compact_revision, ..
                        }) => Response::Compact(Err(CompactRejected::AlreadyCompacted {
                            compact_revision,
                        })),
                        Err(MvccError::FutureRevision { current, .. }) => {
                            Response::Compact(Err(CompactRejected::FutureRevision { current }))
                        }
                        Err(e) => return Err(fail(e)),
                    }
                }
                EntryPayload::Membership(m) => {
                    self.membership = StoredMembership::new(Some(entry.log_id), m);
                    Response::Empty
                }
            };
            responses.push(resp);
        }
        self.meta_batch(batch.write_batch())?;
        let events = mvcc.commit(batch).map_err(fail)?;
        if !events.is_empty() {
            self.hub.publish(HubMsg::Events(Arc::new(events)));
        }
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Vec<u8>>, StorageError> {
        Ok(Box::default())
    }

    async fn install_snapshot(
        &mut self,
        meta: &Meta,
        snapshot: Box<Vec<u8>>,
    ) -> Result<(), StorageError> {
        tracing::info!(snapshot = %meta.snapshot_id, bytes = snapshot.len(), "installing snapshot");
        // Saved first, so that a crash mid-install is repaired from the file at next open.
        let file = SnapshotFile {
            meta: meta.clone(),
            data: *snapshot,
        };
        self.write_snapshot_file(&file)?;
        self.restore(&file.data)
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        Ok(self.read_snapshot_file()?.map(|f| Snapshot {
            meta: f.meta,
            snapshot: Box::new(f.data),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{Op, Txn};

    fn machine(dir: &Path) -> StateMachine {
        let db = crate::db::open(dir, 1).unwrap();
        let mvcc = Arc::new(Mvcc::open(db.clone()).unwrap());
        StateMachine::open(db, mvcc, WatchHub::new(16), dir).unwrap()
    }

    #[tokio::test]
    async fn a_built_snapshot_is_saved_in_the_file_format_and_restores_the_state() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = machine(dir.path());
        for i in 0..50 {
            let mut b = sm.mvcc.begin();
            b.txn(&Txn::new().and_then([Op::put(format!("k{i}"), "v".repeat(i * 30))]))
                .unwrap();
            sm.mvcc.commit(b).unwrap();
        }
        let built = sm.build_snapshot().await.unwrap();
        // The file is the postcard encoding of the whole SnapshotFile, as before it was
        // written in parts.
        let on_disk = std::fs::read(sm.snapshot_path()).unwrap();
        let whole = SnapshotFile {
            meta: built.meta.clone(),
            data: (*built.snapshot).clone(),
        };
        assert_eq!(on_disk, postcard::to_stdvec(&whole).unwrap());
        let read = sm.read_snapshot_file().unwrap().unwrap();
        assert_eq!(read.data, *built.snapshot);
        assert_eq!(read.meta.snapshot_id, built.meta.snapshot_id);
        // A file cut short is an error, not a shorter store.
        std::fs::write(sm.snapshot_path(), &on_disk[..on_disk.len() - 1]).unwrap();
        assert!(sm.read_snapshot_file().is_err());

        let other = tempfile::tempdir().unwrap();
        let mut fresh = machine(other.path());
        fresh
            .install_snapshot(&built.meta, built.snapshot)
            .await
            .unwrap();
        let (kv, rev) = fresh.mvcc.get(b"k49", 0).unwrap();
        assert_eq!(kv.unwrap().value, "v".repeat(49 * 30).into_bytes());
        assert_eq!(rev, 50);
    }
}
