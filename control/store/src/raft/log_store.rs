//! The Raft log and vote, in RocksDB.
//!
//! # Durability
//! An append is written to RocksDB at once (so it is readable when `append` returns, as
//! openraft requires) and acknowledged then, before it is synced: see [`super::durable`]
//! for why, and for the places that wait for the sync instead. A flusher thread takes
//! every append that queued up while the previous sync ran and covers them with one sync:
//! group commit, so throughput is not capped at one fsync per entry. Votes and
//! truncations are written with a sync before they return, so a member can never vote
//! twice in one term, nor bring back a truncated entry, after a crash.

use std::ops::RangeBounds;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{Entry, ErrorSubject, ErrorVerb, OptionalSend, RaftLogReader, Vote};
use rocksdb::{Direction, IteratorMode, WriteBatch, WriteOptions, DB};

use super::durable::LogSync;
use super::{LogId, NodeId, StorageError, TypeConfig};
use crate::db::{CF_LOG, CF_RAFT};

const KEY_VOTE: &[u8] = b"vote";
const KEY_LAST_PURGED: &[u8] = b"last_purged";

fn idx(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn log_err(verb: ErrorVerb, e: impl std::error::Error + 'static) -> StorageError {
    StorageError::from(openraft::StorageIOError::new(
        ErrorSubject::Logs,
        verb,
        openraft::AnyError::new(&e),
    ))
}

/// The log storage handed to openraft; also its own log reader.
#[derive(Clone, Debug)]
pub(crate) struct LogStore {
    db: Arc<DB>,
    /// Takes the number of each write to sync.
    flusher: std_mpsc::Sender<u64>,
    sync: LogSync,
    /// Told how much is appended, to pace snapshots by it.
    pace: Arc<super::pace::SnapshotPace>,
}

impl LogStore {
    /// `fsync`: where the time of each sync of the log is observed.
    pub(crate) fn new(
        db: Arc<DB>,
        fsync: prometheus_client::metrics::histogram::Histogram,
        pace: Arc<super::pace::SnapshotPace>,
    ) -> Result<Self, StorageError> {
        // What the log holds at open may have been recovered from a WAL that a crashed
        // process wrote but never synced: sync it, so that the mark starts true.
        db.flush_wal(true)
            .map_err(|e| log_err(ErrorVerb::Write, e))?;
        let (tx, rx) = std_mpsc::channel::<u64>();
        let store = Self {
            db: db.clone(),
            flusher: tx,
            sync: LogSync::new(Self::last_entry_in(&db)?.map(|l| l.index)),
            pace,
        };
        let sync = store.sync.clone();
        std::thread::Builder::new()
            .name("raft-log-sync".into())
            .spawn(move || {
                // Ends when openraft drops the last LogStore (member shutdown).
                while let Ok(first) = rx.recv() {
                    #[cfg(test)]
                    let _held = sync.hold.lock().expect("test hold");
                    let upto = rx.try_iter().fold(first, u64::max);
                    match crate::latency::timed(&fsync, || db.flush_wal(true)) {
                        Ok(()) => sync.synced(upto),
                        Err(e) => {
                            tracing::error!(error = %e, "syncing the raft log failed");
                            sync.failed(e.to_string());
                        }
                    }
                }
            })
            .expect("spawning the raft log sync thread");
        Ok(store)
    }

    /// What of the log is on disk, for the exits that wait for it.
    pub(crate) fn sync(&self) -> LogSync {
        self.sync.clone()
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("column family created at open")
    }

    fn get_meta<T: serde::de::DeserializeOwned>(
        &self,
        key: &[u8],
    ) -> Result<Option<T>, StorageError> {
        let raw = self
            .db
            .get_cf(self.cf(CF_RAFT), key)
            .map_err(|e| log_err(ErrorVerb::Read, e))?;
        raw.map(|v| postcard::from_bytes(&v).map_err(|e| log_err(ErrorVerb::Read, e)))
            .transpose()
    }

    fn put_meta_synced<T: serde::Serialize>(&self, key: &[u8], v: &T) -> Result<(), StorageError> {
        let bytes = postcard::to_stdvec(v).map_err(|e| log_err(ErrorVerb::Write, e))?;
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_RAFT), key, bytes);
        self.db
            .write_opt(batch, &opts)
            .map_err(|e| log_err(ErrorVerb::Write, e))
    }

    fn last_entry_log_id(&self) -> Result<Option<LogId>, StorageError> {
        Self::last_entry_in(&self.db)
    }

    fn last_entry_in(db: &DB) -> Result<Option<LogId>, StorageError> {
        let cf = db.cf_handle(CF_LOG).expect("column family created at open");
        let mut it = db.raw_iterator_cf(cf);
        it.seek_to_last();
        match it.value() {
            Some(v) => {
                let entry: Entry<TypeConfig> =
                    postcard::from_bytes(v).map_err(|e| log_err(ErrorVerb::Read, e))?;
                Ok(Some(entry.log_id))
            }
            None => {
                it.status().map_err(|e| log_err(ErrorVerb::Read, e))?;
                Ok(None)
            }
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + std::fmt::Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError> {
        use std::ops::Bound;
        let start = match range.start_bound() {
            Bound::Included(&s) => s,
            Bound::Excluded(&s) => s + 1,
            Bound::Unbounded => 0,
        };
        let mut out = Vec::new();
        let iter = self.db.iterator_cf(
            self.cf(CF_LOG),
            IteratorMode::From(&idx(start), Direction::Forward),
        );
        for item in iter {
            let (k, v) = item.map_err(|e| log_err(ErrorVerb::Read, e))?;
            let index = u64::from_be_bytes(k.as_ref().try_into().unwrap_or([0xff; 8]));
            if !range.contains(&index) {
                break;
            }
            out.push(postcard::from_bytes(&v).map_err(|e| log_err(ErrorVerb::Read, e))?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged: Option<LogId> = self.get_meta(KEY_LAST_PURGED)?;
        let last = self.last_entry_log_id()?.or(last_purged);
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        self.put_meta_synced(KEY_VOTE, vote).map_err(|e| {
            StorageError::from(openraft::StorageIOError::new(
                ErrorSubject::Vote,
                ErrorVerb::Write,
                openraft::AnyError::new(&e),
            ))
        })
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        self.get_meta(KEY_VOTE)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let cf = self.cf(CF_LOG);
        let mut batch = WriteBatch::default();
        let mut last = None;
        let mut appended = 0;
        for entry in entries {
            let bytes = postcard::to_stdvec(&entry).map_err(|e| log_err(ErrorVerb::Write, e))?;
            appended += bytes.len() as u64;
            batch.put_cf(cf, idx(entry.log_id.index), bytes);
            last = Some(entry.log_id.index);
        }
        let Some(last) = last else {
            callback.log_io_completed(Ok(()));
            return Ok(());
        };
        self.db
            .write(batch)
            .map_err(|e| log_err(ErrorVerb::Write, e))?;
        self.pace.appended(appended);
        let seq = self.sync.issue(Some(last));
        self.flusher.send(seq).map_err(|_| {
            log_err(
                ErrorVerb::Write,
                std::io::Error::other("raft log sync thread has stopped"),
            )
        })?;
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // Durable before returning: a later append of a different entry at this index must
        // never be preceded, after a crash, by the stale one.
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(self.cf(CF_LOG), idx(log_id.index), idx(u64::MAX));
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        self.db
            .write_opt(batch, &opts)
            .map_err(|e| log_err(ErrorVerb::Delete, e))?;
        // The synced write covers every unsynced append before it, too.
        let seq = self.sync.issue(log_id.index.checked_sub(1));
        self.sync.synced(seq);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let mut batch = WriteBatch::default();
        let bytes = postcard::to_stdvec(&log_id).map_err(|e| log_err(ErrorVerb::Write, e))?;
        batch.put_cf(self.cf(CF_RAFT), KEY_LAST_PURGED, bytes);
        batch.delete_range_cf(self.cf(CF_LOG), idx(0), idx(log_id.index + 1));
        self.db
            .write(batch)
            .map_err(|e| log_err(ErrorVerb::Delete, e))
    }
}
