//! The Raft log and vote, as openraft stores them.
//!
//! The entries live in [`super::log_file`], files of their own; the vote and how far
//! the log was purged live in RocksDB, written with a sync. Stores made before the log
//! had its own files kept the entries in RocksDB too: the first open moves them.
//!
//! # Durability
//! An append is written at once (so it is readable when `append` returns, as openraft
//! requires) and acknowledged then, before it is synced: see [`super::durable`] for why,
//! and for the places that wait for the sync instead. A flusher thread takes every append
//! that queued up while the previous sync ran and covers them with one sync: group
//! commit, so throughput is not capped at one sync per entry. Votes and truncations are
//! synced before they return, so a member can never vote twice in one term, nor bring
//! back a truncated entry, after a crash.

use std::ops::RangeBounds;
use std::path::Path;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{Entry, ErrorSubject, ErrorVerb, OptionalSend, RaftLogReader, Vote};
use rocksdb::{WriteBatch, WriteOptions, DB};

use super::durable::LogSync;
use super::log_file::LogFile;
use super::{LogId, NodeId, StorageError, TypeConfig};
use crate::db::{CF_LOG, CF_RAFT};

const KEY_VOTE: &[u8] = b"vote";
const KEY_LAST_PURGED: &[u8] = b"last_purged";
/// The log's folder in the data dir.
pub(crate) const LOG_DIR: &str = "raft-log";

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
    log: Arc<LogFile>,
    /// Takes the number of each write to sync.
    flusher: std_mpsc::Sender<u64>,
    sync: LogSync,
    /// Told how much is appended, to pace snapshots by it.
    pace: Arc<super::pace::SnapshotPace>,
}

impl LogStore {
    /// The log of the member whose data dir is `dir`, with segments of `segment_bytes`.
    /// `fsync`: where the time of each sync of the log is observed.
    pub(crate) fn new(
        db: Arc<DB>,
        dir: &Path,
        segment_bytes: u64,
        fsync: prometheus_client::metrics::histogram::Histogram,
        pace: Arc<super::pace::SnapshotPace>,
    ) -> Result<Self, StorageError> {
        let purged: Option<LogId> = get_meta(&db, KEY_LAST_PURGED)?;
        let log = Arc::new(open_moving_legacy(
            &db,
            &dir.join(LOG_DIR),
            segment_bytes,
            purged,
        )?);
        let (tx, rx) = std_mpsc::channel::<u64>();
        let store = Self {
            db,
            log: log.clone(),
            flusher: tx,
            // Open synced everything the log holds.
            sync: LogSync::new(log.bounds().map(|(_, last)| last)),
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
                    match crate::latency::timed(&fsync, || log.sync()) {
                        Ok(()) => sync.synced(upto),
                        Err(e) => {
                            let why = baton_error_chain::chain(&e);
                            tracing::error!(error = %why, "syncing the raft log failed");
                            sync.failed(why);
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

    fn put_meta_synced<T: serde::Serialize>(&self, key: &[u8], v: &T) -> Result<(), StorageError> {
        let bytes = postcard::to_stdvec(v).map_err(|e| log_err(ErrorVerb::Write, e))?;
        let mut batch = WriteBatch::default();
        batch.put_cf(cf(&self.db, CF_RAFT), key, bytes);
        write_synced(&self.db, batch)
    }

    /// A reader of the log's last entry, for pre-votes (see [`super::elections`]). It
    /// does not keep the sync thread alive as a `LogStore` clone would.
    pub(crate) fn tail(&self) -> LogTail {
        LogTail {
            db: self.db.clone(),
            log: self.log.clone(),
        }
    }

    fn entries(&self, from: u64, to: u64) -> Result<Vec<Entry<TypeConfig>>, StorageError> {
        entries(&self.log, from, to)
    }
}

/// Reads where the log ends.
#[derive(Clone, Debug)]
pub(crate) struct LogTail {
    db: Arc<DB>,
    log: Arc<LogFile>,
}

impl LogTail {
    /// The id of the last entry the log holds, or of the last one purged if none is left.
    pub(crate) fn last_log_id(&self) -> Result<Option<LogId>, StorageError> {
        let last_purged: Option<LogId> = get_meta(&self.db, KEY_LAST_PURGED)?;
        Ok(self.last_entry_log_id()?.or(last_purged))
    }

    /// [`Self::last_log_id`] on a blocking thread, since it reads the file: for callers
    /// on the async runtime.
    pub(crate) async fn read_last_log_id(&self) -> Result<Option<LogId>, StorageError> {
        let tail = self.clone();
        tokio::task::spawn_blocking(move || tail.last_log_id())
            .await
            .map_err(|e| log_err(ErrorVerb::Read, e))?
    }

    fn last_entry_log_id(&self) -> Result<Option<LogId>, StorageError> {
        let Some((_, last)) = self.log.bounds() else {
            return Ok(None);
        };
        let entries = entries(&self.log, last, last + 1)?;
        Ok(entries.last().map(|e| e.log_id))
    }
}

/// The entries from `from` up to `to` (exclusive), decoded.
fn entries(log: &LogFile, from: u64, to: u64) -> Result<Vec<Entry<TypeConfig>>, StorageError> {
    let mut out = Vec::new();
    let mut bad = None;
    log.read(from, to, |_, bytes| match postcard::from_bytes(bytes) {
        Ok(entry) => out.push(entry),
        Err(e) => {
            bad.get_or_insert(e);
        }
    })
    .map_err(|e| log_err(ErrorVerb::Read, e))?;
    match bad {
        Some(e) => Err(log_err(ErrorVerb::Read, e)),
        None => Ok(out),
    }
}

fn cf<'a>(db: &'a DB, name: &str) -> &'a rocksdb::ColumnFamily {
    db.cf_handle(name).expect("column family created at open")
}

/// Writes `batch` and syncs RocksDB's log before returning.
fn write_synced(db: &DB, batch: WriteBatch) -> Result<(), StorageError> {
    let mut opts = WriteOptions::default();
    opts.set_sync(true);
    db.write_opt(batch, &opts)
        .map_err(|e| log_err(ErrorVerb::Write, e))
}

fn get_meta<T: serde::de::DeserializeOwned>(
    db: &DB,
    key: &[u8],
) -> Result<Option<T>, StorageError> {
    let raw = db
        .get_cf(cf(db, CF_RAFT), key)
        .map_err(|e| log_err(ErrorVerb::Read, e))?;
    raw.map(|v| postcard::from_bytes(&v).map_err(|e| log_err(ErrorVerb::Read, e)))
        .transpose()
}

/// Opens the log in `dir`. Entries a store made before the log had files of its own are
/// still in RocksDB: they are written to a new log, synced, and only then removed there.
/// A move a crash cut short leaves them in RocksDB, and starts again.
fn open_moving_legacy(
    db: &DB,
    dir: &Path,
    segment_bytes: u64,
    purged: Option<LogId>,
) -> Result<LogFile, StorageError> {
    let write_err = |e: super::log_file::LogFileError| log_err(ErrorVerb::Write, e);
    let legacy = cf(db, CF_LOG);
    let mut it = db.raw_iterator_cf(legacy);
    it.seek_to_first();
    it.status().map_err(|e| log_err(ErrorVerb::Read, e))?;
    let moving = it.valid();
    if moving && dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| log_err(ErrorVerb::Write, e))?;
    }
    let log = LogFile::open(dir, segment_bytes, purged.map(|p| p.index)).map_err(write_err)?;
    if !moving {
        return Ok(log);
    }
    let mut moved = 0u64;
    let mut batch = Vec::new();
    while let (Some(k), Some(v)) = (it.key(), it.value()) {
        let index = u64::from_be_bytes(k.try_into().unwrap_or([0xff; 8]));
        if purged.is_none_or(|p| index > p.index) {
            batch.push((index, v.to_vec()));
        }
        if batch.len() >= 1024 {
            log.append(&batch).map_err(write_err)?;
            moved += batch.len() as u64;
            batch.clear();
        }
        it.next();
    }
    it.status().map_err(|e| log_err(ErrorVerb::Read, e))?;
    moved += batch.len() as u64;
    log.append(&batch).map_err(write_err)?;
    log.sync().map_err(write_err)?;
    let mut clear = WriteBatch::default();
    clear.delete_range_cf(legacy, 0u64.to_be_bytes(), u64::MAX.to_be_bytes());
    clear.delete_cf(legacy, u64::MAX.to_be_bytes());
    write_synced(db, clear)?;
    tracing::info!(entries = moved, dir = %dir.display(), "moved the raft log out of RocksDB into files of its own");
    Ok(log)
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
        let end = match range.end_bound() {
            Bound::Included(&e) => e.saturating_add(1),
            Bound::Excluded(&e) => e,
            Bound::Unbounded => u64::MAX,
        };
        self.entries(start, end)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged: Option<LogId> = get_meta(&self.db, KEY_LAST_PURGED)?;
        let last = self.tail().last_entry_log_id()?.or(last_purged);
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
        get_meta(&self.db, KEY_VOTE)
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
        let mut batch = Vec::new();
        let mut appended = 0;
        for entry in entries {
            let bytes = postcard::to_stdvec(&entry).map_err(|e| log_err(ErrorVerb::Write, e))?;
            appended += bytes.len() as u64;
            batch.push((entry.log_id.index, bytes));
        }
        let Some(&(last, _)) = batch.last() else {
            callback.log_io_completed(Ok(()));
            return Ok(());
        };
        self.log
            .append(&batch)
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
        self.log
            .truncate(log_id.index)
            .map_err(|e| log_err(ErrorVerb::Delete, e))?;
        // The truncation's sync covers every unsynced append before it, too.
        let seq = self.sync.issue(log_id.index.checked_sub(1));
        self.sync.synced(seq);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // Kept before any segment goes: the log's next open skips what it names.
        self.put_meta_synced(KEY_LAST_PURGED, &log_id)?;
        self.log
            .purge(log_id.index)
            .map_err(|e| log_err(ErrorVerb::Delete, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, EntryPayload};

    fn entry(index: u64) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Blank,
        }
    }

    fn open(db: &Arc<DB>, dir: &Path) -> LogStore {
        let fsync = prometheus_client::metrics::histogram::Histogram::new([1.0]);
        LogStore::new(db.clone(), dir, 4096, fsync, Arc::default()).unwrap()
    }

    #[tokio::test]
    async fn entries_an_older_store_kept_in_rocksdb_move_to_the_files_once() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::db::open(dir.path(), 1).unwrap();
        for i in 1..=5u64 {
            let bytes = postcard::to_stdvec(&entry(i)).unwrap();
            db.put_cf(cf(&db, CF_LOG), i.to_be_bytes(), bytes).unwrap();
        }
        // A move cut short by a crash: its files are dropped and it starts again.
        let cut_short = LogFile::open(&dir.path().join(LOG_DIR), 4096, None).unwrap();
        cut_short
            .append(&[(1, postcard::to_stdvec(&entry(1)).unwrap())])
            .unwrap();
        drop(cut_short);

        let mut store = open(&db, dir.path());
        let got = store.try_get_log_entries(0..).await.unwrap();
        assert_eq!(got, (1..=5).map(entry).collect::<Vec<_>>());
        let mut it = db.raw_iterator_cf(cf(&db, CF_LOG));
        it.seek_to_first();
        assert!(!it.valid(), "nothing is left in RocksDB");
        drop((store, it));

        let mut store = open(&db, dir.path());
        let state = store.get_log_state().await.unwrap();
        assert_eq!(state.last_log_id.map(|l| l.index), Some(5));
        assert_eq!(
            store.try_get_log_entries(2..=3).await.unwrap(),
            vec![entry(2), entry(3)]
        );
    }
}
