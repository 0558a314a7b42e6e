//! The Raft state machine: applies committed entries to the MVCC store, builds and installs
//! snapshots.
//!
//! # Crash safety
//! Applied entries are written without a sync: the synced Raft log can replay them. The one
//! hazard is a snapshot that lets openraft purge log entries the state machine has not made
//! durable. So a snapshot is only reported built after the write-ahead log is synced, and
//! the newest snapshot is kept in the data dir (a checkpoint of the store, or a received
//! file: see [`super::snapshot`]): at open, a state machine found older than that
//! snapshot (a crash during install) is restored from it. An install drops the applied position first and writes the new one
//! last, so that an install cut short is found at open the same way.

use std::path::Path;
use std::sync::Arc;

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    EntryPayload, ErrorSubject, ErrorVerb, OptionalSend, RaftSnapshotBuilder, StoredMembership,
};
use rocksdb::{WriteBatch, DB};

use super::durable::LogSync;
use super::pace::SnapshotPace;
use super::snapshot::{Meta, SnapshotBody, SnapshotData, SnapshotFiles};
use super::{CompactRejected, LogId, NodeId, Request, Response, StorageError, TypeConfig};
use crate::db::CF_META;
use crate::dump::Head;
use crate::mvcc::{Mvcc, MvccError};
use crate::watch::{HubMsg, WatchHub};

type Membership = StoredMembership<NodeId, openraft::BasicNode>;

const META_APPLIED: &[u8] = b"raft_applied";
const META_MEMBERSHIP: &[u8] = b"raft_membership";

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

/// Reads the Raft position recorded in a snapshot body's head.
fn dump_position(head: &Head) -> Result<(Option<LogId>, Membership), StorageError> {
    let applied = match head.meta(META_APPLIED) {
        Some(v) => postcard::from_bytes(v).map_err(|e| snap_err(ErrorVerb::Read, e))?,
        None => None,
    };
    let membership = match head.meta(META_MEMBERSHIP) {
        Some(v) => postcard::from_bytes(v).map_err(|e| snap_err(ErrorVerb::Read, e))?,
        None => Membership::default(),
    };
    Ok((applied, membership))
}

#[derive(Debug, Clone)]
pub(crate) struct StateMachine {
    db: Arc<DB>,
    mvcc: Arc<Mvcc>,
    hub: WatchHub,
    files: SnapshotFiles,
    applied: Option<LogId>,
    membership: Membership,
    /// The local log's sync, which an entry waits for before it is applied (see
    /// [`super::durable`]); none where the log is synced before it is acknowledged.
    log_sync: Option<LogSync>,
    /// Told of each snapshot, to pace the next one ([`super::pace`]).
    pace: Arc<SnapshotPace>,
}

impl StateMachine {
    /// Applies an entry only once the local log has synced it.
    pub(crate) fn waiting_for(mut self, log_sync: LogSync) -> Self {
        self.log_sync = Some(log_sync);
        self
    }

    /// Opens the state machine of the member in `dir`; `pace` is told of each snapshot,
    /// starting with the one kept from before.
    pub(crate) fn open(
        db: Arc<DB>,
        mvcc: Arc<Mvcc>,
        hub: WatchHub,
        dir: &Path,
        pace: Arc<SnapshotPace>,
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
        let files = SnapshotFiles::open(dir);
        files
            .convert_legacy()
            .map_err(|e| snap_err(ErrorVerb::Read, e))?;
        let mut sm = Self {
            db,
            mvcc,
            hub,
            files,
            applied,
            membership,
            log_sync: None,
            pace,
        };
        let current = sm
            .files
            .current()
            .map_err(|e| snap_err(ErrorVerb::Read, e))?;
        if let Some((meta, data)) = current {
            sm.pace.snapshot(data.size());
            if meta.last_log_id > sm.applied {
                tracing::warn!(
                    snapshot = ?meta.last_log_id,
                    applied = ?sm.applied,
                    "state machine is older than its saved snapshot; restoring the snapshot"
                );
                let body = data.into_body().map_err(|e| snap_err(ErrorVerb::Read, e))?;
                sm.restore(&body)?;
            }
        }
        Ok(sm)
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
    fn restore(&mut self, data: &SnapshotBody) -> Result<(), StorageError> {
        let meta = self.db.cf_handle(CF_META).expect("meta column family");
        let head = self
            .mvcc
            .restore_from(data.body(), |first| first.delete_cf(meta, META_APPLIED))
            .map_err(|e| snap_err(ErrorVerb::Write, e))?;
        (self.applied, self.membership) = dump_position(&head)?;
        self.hub.publish(HubMsg::Reset);
        Ok(())
    }
}

impl StateMachine {
    /// Builds a snapshot: a checkpoint of the store, whose Raft position is read from the
    /// checkpoint itself, since apply goes on beside the build. It flushes the memtables
    /// and links the table files, so it runs on a blocking thread.
    fn build(&self) -> Result<Snapshot<TypeConfig>, StorageError> {
        // Make every applied write durable before the log behind it can be purged.
        self.db
            .flush_wal(true)
            .map_err(|e| snap_err(ErrorVerb::Write, e))?;
        let failed = |e| snap_err(ErrorVerb::Write, e);
        let draft = self.files.checkpoint(&self.db).map_err(failed)?;
        let head = draft.head().map_err(failed)?;
        let (applied, membership) = dump_position(&head)?;
        let snapshot_id = match applied {
            Some(l) => format!("{}-{}-{}", l.leader_id.term, l.index, head.revision),
            None => format!("empty-{}", head.revision),
        };
        let meta = Meta {
            last_log_id: applied,
            last_membership: membership,
            snapshot_id,
        };
        let data = self.files.finish_checkpoint(draft, &meta).map_err(failed)?;
        self.pace.snapshot(data.size());
        tracing::info!(snapshot = %meta.snapshot_id, bytes = data.size(), "built snapshot");
        Ok(Snapshot {
            meta,
            snapshot: Box::new(data),
        })
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let builder = self.clone();
        tokio::task::spawn_blocking(move || builder.build())
            .await
            .map_err(|e| snap_err(ErrorVerb::Write, std::io::Error::other(e)))?
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
        let entries: Vec<_> = entries.into_iter().collect();
        if let (Some(sync), Some(last)) = (&self.log_sync, entries.last()) {
            sync.index(last.log_id.index)
                .await
                .map_err(|e| sm_err(ErrorVerb::Write, e))?;
        }
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

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<SnapshotData>, StorageError> {
        let data =
            SnapshotBody::receiving(self.files.dir()).map_err(|e| snap_err(ErrorVerb::Write, e))?;
        Ok(Box::new(data.into()))
    }

    async fn install_snapshot(
        &mut self,
        meta: &Meta,
        snapshot: Box<SnapshotData>,
    ) -> Result<(), StorageError> {
        tracing::info!(snapshot = %meta.snapshot_id, bytes = snapshot.size(), "installing snapshot");
        // Kept first, so that a crash mid-install is repaired from the file at next open.
        let mut data = snapshot
            .into_body()
            .map_err(|e| snap_err(ErrorVerb::Read, e))?;
        self.files
            .keep(meta, &mut data)
            .map_err(|e| snap_err(ErrorVerb::Write, e))?;
        self.pace.snapshot(data.len());
        self.restore(&data)
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let current = self
            .files
            .current()
            .map_err(|e| snap_err(ErrorVerb::Read, e))?;
        Ok(current.map(|(meta, data)| Snapshot {
            meta,
            snapshot: Box::new(data),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{Op, Txn};
    use openraft::{CommittedLeaderId, Entry};
    use std::io::Read;

    fn machine(dir: &Path) -> StateMachine {
        let db = crate::db::open(dir, 1).unwrap();
        let mvcc = Arc::new(Mvcc::open(db.clone()).unwrap());
        StateMachine::open(db, mvcc, WatchHub::new(16), dir, Arc::default()).unwrap()
    }

    /// Entries `ids` (log index `i + 1` each) through the Raft path, so that the applied
    /// position is recorded: each puts `k{i}` to `value(i)`.
    async fn put_entries(
        sm: &mut StateMachine,
        ids: std::ops::Range<u64>,
        value: impl Fn(u64) -> String,
    ) {
        let entries: Vec<_> = ids
            .map(|i| Entry::<TypeConfig> {
                log_id: LogId::new(CommittedLeaderId::new(1, 1), i + 1),
                payload: EntryPayload::Normal(Request::Txns(vec![
                    Txn::new().and_then([Op::put(format!("k{i}"), value(i))])
                ])),
            })
            .collect();
        sm.apply(entries).await.unwrap();
    }

    /// Fifty entries.
    async fn fill(sm: &mut StateMachine) {
        put_entries(sm, 0..50, |i| "v".repeat(i as usize * 30)).await;
    }

    fn file(dir: &Path) -> std::path::PathBuf {
        dir.join(super::super::snapshot::FILE)
    }

    /// The names of the snapshots and temporary snapshot files in `dir`.
    fn snapshots(dir: &Path) -> Vec<String> {
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with("snapshot"))
            .collect();
        names.sort();
        names
    }

    fn body_of(data: SnapshotData) -> Vec<u8> {
        let mut body = Vec::new();
        data.into_body()
            .unwrap()
            .body()
            .read_to_end(&mut body)
            .unwrap();
        body
    }

    #[tokio::test]
    async fn a_built_snapshot_is_a_checkpoint_that_restores_the_state_elsewhere() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = machine(dir.path());
        fill(&mut sm).await;
        let built = sm.build_snapshot().await.unwrap();
        assert_eq!(built.meta.last_log_id.map(|l| l.index), Some(50));
        assert!(built.snapshot.is_checkpoint(), "a build copies nothing");
        assert!(built.snapshot.size() > 0);
        let current = sm.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(current.meta, built.meta);
        // Dumped when it is needed, the checkpoint holds the state as it was built.
        fill_more(&mut sm).await;
        let body = body_of(*current.snapshot);
        let (_, expected, _) = {
            let fresh = tempfile::tempdir().unwrap();
            let mut other = machine(fresh.path());
            fill(&mut other).await;
            other.mvcc.write_dump(Vec::new()).unwrap()
        };
        assert_eq!(body, expected, "the state at the build, not after");
        assert_eq!(body_of(*built.snapshot), body);

        // A follower receives the body into a file of its own and installs it.
        let other = tempfile::tempdir().unwrap();
        let mut fresh = machine(other.path());
        let mut received = SnapshotBody::receiving(other.path()).unwrap();
        for chunk in body.chunks(1000) {
            received.append(chunk).unwrap();
        }
        fresh
            .install_snapshot(&built.meta, Box::new(received.into()))
            .await
            .unwrap();
        let (kv, rev) = fresh.mvcc.get(b"k49", 0).unwrap();
        assert_eq!(kv.unwrap().value, "v".repeat(49 * 30).into_bytes());
        assert_eq!(rev, 50);
        assert_eq!(fresh.applied, built.meta.last_log_id);
        let kept = fresh.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(kept.meta, built.meta);
        assert!(!kept.snapshot.is_checkpoint());
        // Only the kept file is left of the receiving one.
        assert_eq!(snapshots(other.path()), [super::super::snapshot::FILE]);

        // A file cut short is an error, not a shorter store.
        let on_disk = std::fs::read(file(other.path())).unwrap();
        std::fs::write(file(other.path()), &on_disk[..on_disk.len() - 1]).unwrap();
        assert!(fresh.get_current_snapshot().await.is_err());
        std::fs::write(file(other.path()), &on_disk).unwrap();

        // The follower's own build replaces the received file.
        fill_more(&mut fresh).await;
        let own = fresh.build_snapshot().await.unwrap();
        assert_eq!(own.meta.last_log_id.map(|l| l.index), Some(60));
        let names = snapshots(other.path());
        assert_eq!(names.len(), 1, "{names:?}");
        assert!(names[0].starts_with("snapshot.ckpt."), "{names:?}");
    }

    /// Ten more entries after [`fill`]'s fifty.
    async fn fill_more(sm: &mut StateMachine) {
        put_entries(sm, 50..60, |_| "w".to_string()).await;
    }

    #[tokio::test]
    async fn a_newer_checkpoint_replaces_the_older_and_a_crash_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = machine(dir.path());
        fill(&mut sm).await;
        let first = sm.build_snapshot().await.unwrap();
        let old = snapshots(dir.path());
        assert_eq!(old.len(), 1);
        fill_more(&mut sm).await;
        let second = sm.build_snapshot().await.unwrap();
        let new = snapshots(dir.path());
        assert_eq!(new.len(), 1);
        assert_ne!(new, old);
        // The older handle's checkpoint is gone: reading it is an error, which the
        // sender answers by sending the newest.
        assert!(first.snapshot.into_body().is_err());
        assert_eq!(
            sm.get_current_snapshot().await.unwrap().unwrap().meta,
            second.meta
        );

        // What a crash leaves: a checkpoint half made, and an older one beside the newest.
        let half = dir.path().join("snapshot.tmp.crashed");
        std::fs::create_dir_all(half.join("db")).unwrap();
        std::fs::write(half.join("db").join("000001.sst"), b"partial").unwrap();
        let stale = dir.path().join("snapshot.ckpt.stale");
        copy_dir(&dir.path().join(&new[0]), &stale);
        let meta = (Meta::default(), 1u64);
        std::fs::write(stale.join("meta"), postcard::to_stdvec(&meta).unwrap()).unwrap();
        drop(sm);
        let mut reopened = machine(dir.path());
        assert_eq!(snapshots(dir.path()), new);
        assert_eq!(
            reopened.get_current_snapshot().await.unwrap().unwrap().meta,
            second.meta
        );
    }

    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                copy_dir(&e.path(), &to.join(e.file_name()));
            } else {
                std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
            }
        }
    }

    #[tokio::test]
    async fn a_store_older_than_its_checkpoint_is_restored_from_it_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = machine(dir.path());
        fill(&mut sm).await;
        let built = sm.build_snapshot().await.unwrap();
        let name = snapshots(dir.path()).remove(0);
        // A member whose store has nothing, beside that checkpoint.
        let other = tempfile::tempdir().unwrap();
        drop(machine(other.path()));
        copy_dir(&dir.path().join(&name), &other.path().join(&name));
        let reopened = machine(other.path());
        assert_eq!(reopened.applied, built.meta.last_log_id);
        let (kv, _) = reopened.mvcc.get(b"k49", 0).unwrap();
        assert_eq!(kv.unwrap().value, "v".repeat(49 * 30).into_bytes());
    }

    #[tokio::test]
    async fn an_install_cut_short_is_finished_from_the_kept_file_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = machine(dir.path());
        fill(&mut sm).await;
        let built = sm.build_snapshot().await.unwrap();
        let body = body_of(*built.snapshot);

        let other = tempfile::tempdir().unwrap();
        {
            let fresh = machine(other.path());
            let mut received = SnapshotBody::receiving(other.path()).unwrap();
            received.append(&body).unwrap();
            fresh.files.keep(&built.meta, &mut received).unwrap();
            // The install stops half way: the data is cleared and partly written, and
            // the applied position is gone.
            let meta = fresh.db.cf_handle(CF_META).unwrap();
            let half = &body[..body.len() / 2];
            fresh
                .mvcc
                .restore_from(half, |b| b.delete_cf(meta, META_APPLIED))
                .unwrap_err();
        }
        let reopened = machine(other.path());
        assert_eq!(reopened.applied, built.meta.last_log_id);
        let (kv, _) = reopened.mvcc.get(b"k49", 0).unwrap();
        assert_eq!(kv.unwrap().value, "v".repeat(49 * 30).into_bytes());
    }

    #[tokio::test]
    async fn an_earlier_versions_snapshot_file_is_converted_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = machine(dir.path());
        fill(&mut sm).await;
        let built = sm.build_snapshot().await.unwrap();
        // What earlier versions wrote: postcard of the meta and the whole Dump's encoding.
        #[derive(serde::Serialize)]
        struct Legacy {
            meta: Meta,
            data: Vec<u8>,
        }
        let legacy = postcard::to_stdvec(&Legacy {
            meta: built.meta.clone(),
            data: postcard::to_stdvec(&sm.mvcc.dump().unwrap()).unwrap(),
        })
        .unwrap();
        let other = tempfile::tempdir().unwrap();
        drop(machine(other.path()));
        std::fs::write(other.path().join("snapshot.bin"), legacy).unwrap();
        let mut fresh = machine(other.path());
        assert!(!other.path().join("snapshot.bin").exists());
        // Newer than the empty store, so it was restored as well.
        assert_eq!(fresh.applied, built.meta.last_log_id);
        let current = fresh.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(current.meta, built.meta);
        assert_eq!(body_of(*current.snapshot), body_of(*built.snapshot));
    }
}
