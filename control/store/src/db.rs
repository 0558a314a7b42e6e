//! Opening the RocksDB database behind one member, and refusing data dirs that are not ours.
//!
//! A member keeps its state machine, its vote and how far its log was purged in one
//! RocksDB instance, with a column family per kind of data. The Raft log's entries have
//! files of their own (`raft::log_file`); `raft_log` only holds those of stores made
//! before, until their first open moves them. Nothing here is synced per write but the
//! vote and the purge point: the state machine is rebuilt from the log (or restored from
//! a snapshot) after a crash, and a snapshot syncs it before the log behind it goes.
//!
//! A data dir that holds anything but a Baton store, or a store whose files are damaged, is
//! refused with an error that says so. It is never reset: an operator pointing Baton at the
//! wrong folder must not lose that folder.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rocksdb::{ColumnFamilyDescriptor, Options, DB};

/// Name of the file that marks a folder as a Baton store, and its format.
pub(crate) const MARKER_FILE: &str = "BATON_STORE";
const MARKER_CONTENT: &str = "baton-store format 1\n";

pub(crate) const CF_META: &str = "meta";
pub(crate) const CF_KV: &str = "kv";
pub(crate) const CF_REV: &str = "rev";
pub(crate) const CF_LOG: &str = "raft_log";
pub(crate) const CF_RAFT: &str = "raft_state";
const ALL_CFS: [&str; 5] = [CF_META, CF_KV, CF_REV, CF_LOG, CF_RAFT];

/// Key in `meta` holding the member id this data dir belongs to.
pub(crate) const META_MEMBER_ID: &[u8] = b"member_id";

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("data dir {path} is not a Baton store (no {MARKER_FILE} file, but it is not empty); refusing to use it")]
    Foreign { path: PathBuf },
    #[error("data dir {path} holds an unsupported store format {found:?}")]
    UnsupportedFormat { path: PathBuf, found: String },
    #[error("data dir {path} belongs to member {found}, not member {expected}")]
    MemberMismatch {
        path: PathBuf,
        found: u64,
        expected: u64,
    },
    #[error("store in {path} is damaged or unreadable. Nothing was changed. To recover: in a cluster, remove this member's data dir and let it rejoin from its peers; alone, `baton store repair --data-dir DIR` keeps what precedes the damage and drops the rest")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: rocksdb::Error,
    },
    #[error("I/O error on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Opens (or creates, in an empty or missing folder) the database of member `member_id`.
pub(crate) fn open(dir: &Path, member_id: u64) -> Result<Arc<DB>, DbError> {
    let io = |source| DbError::Io {
        path: dir.to_path_buf(),
        source,
    };
    fs::create_dir_all(dir).map_err(io)?;
    let marker = dir.join(MARKER_FILE);
    let fresh = if marker.exists() {
        let found = fs::read_to_string(&marker).map_err(io)?;
        if found != MARKER_CONTENT {
            return Err(DbError::UnsupportedFormat {
                path: dir.to_path_buf(),
                found,
            });
        }
        false
    } else {
        if fs::read_dir(dir).map_err(io)?.next().is_some() {
            return Err(DbError::Foreign {
                path: dir.to_path_buf(),
            });
        }
        true
    };

    let db_path = dir.join("db");
    let mut opts = Options::default();
    // Only a brand-new store may create the database. An existing store whose files vanish
    // must fail loudly instead of coming back empty.
    opts.create_if_missing(fresh);
    opts.create_missing_column_families(fresh);
    opts.set_paranoid_checks(true);
    // A damaged write-ahead log must stop the store, not shorten it: the default
    // (point-in-time recovery) replays up to the first bad record and silently drops
    // every committed write after it. With absolute consistency the open fails and names
    // the damage; `baton store repair` or rejoining from peers recovers (see the README).
    opts.set_wal_recovery_mode(rocksdb::DBRecoveryMode::AbsoluteConsistency);
    opts.set_max_background_jobs(2);
    // Writers waiting for the group-commit leader block instead of spinning: on a
    // two-core machine a spinning writer steals the core the leader needs.
    opts.set_enable_write_thread_adaptive_yield(false);
    // The log appender and the state machine write concurrently; pipelining lets one's
    // memtable insert overlap the other's WAL write.
    opts.set_enable_pipelined_write(true);
    // Nothing needs a sync per write but the few writes that ask for one.
    opts.set_use_fsync(false);
    let db = DB::open_cf_descriptors(&opts, &db_path, column_families()).map_err(|source| {
        DbError::Corrupt {
            path: db_path.clone(),
            source,
        }
    })?;
    let corrupt = |source| DbError::Corrupt {
        path: db_path.clone(),
        source,
    };

    let meta = db
        .cf_handle(CF_META)
        .expect("column family created at open");
    if fresh {
        db.put_cf(meta, META_MEMBER_ID, member_id.to_be_bytes())
            .map_err(corrupt)?;
        db.flush_wal(true).map_err(corrupt)?;
        // The marker goes last: a crash before this point leaves a folder that is refused
        // rather than one that looks like a complete store.
        let mut f = fs::File::create(&marker).map_err(io)?;
        f.write_all(MARKER_CONTENT.as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)?;
        fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
    } else {
        let found = db.get_cf(meta, META_MEMBER_ID).map_err(corrupt)?;
        let found = found.and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok());
        match found {
            Some(bytes) if u64::from_be_bytes(bytes) == member_id => {}
            Some(bytes) => {
                return Err(DbError::MemberMismatch {
                    path: dir.to_path_buf(),
                    found: u64::from_be_bytes(bytes),
                    expected: member_id,
                })
            }
            None => {
                return Err(DbError::UnsupportedFormat {
                    path: dir.to_path_buf(),
                    found: "store without a member id".into(),
                })
            }
        }
    }
    Ok(Arc::new(db))
}

/// Makes a checkpoint of the store in `path` (which must not exist): the memtables are
/// flushed and the table files hard-linked, so it costs a flush, not a copy of the store.
pub(crate) fn checkpoint(db: &DB, path: &Path) -> Result<(), rocksdb::Error> {
    rocksdb::checkpoint::Checkpoint::new(db)?.create_checkpoint(path)
}

/// Opens a checkpoint made by [`checkpoint`], read-only. With `hold_files`, every table
/// file is opened now and held until the database is dropped, so that what is read from
/// it no longer depends on the folder: it may be removed (a newer snapshot replacing it)
/// while a dump still reads it. Without, files are opened as they are read.
pub(crate) fn open_checkpoint(path: &Path, hold_files: bool) -> Result<DB, rocksdb::Error> {
    let mut opts = Options::default();
    opts.set_max_open_files(if hold_files { -1 } else { 16 });
    DB::open_cf_for_read_only(&opts, path, ALL_CFS, false)
}

/// Bytes of the table files holding the state machine's data (not the Raft log's) in a
/// store or a checkpoint of one.
pub(crate) fn state_bytes(db: &DB) -> Result<u64, rocksdb::Error> {
    Ok(db
        .live_files()?
        .iter()
        .filter(|f| [CF_META, CF_KV, CF_REV].contains(&f.column_family_name.as_str()))
        .map(|f| f.size as u64)
        .sum())
}

/// Every column family of the store, as `open` and `repair` open them.
fn column_families() -> impl Iterator<Item = ColumnFamilyDescriptor> {
    ALL_CFS
        .iter()
        .map(|name| ColumnFamilyDescriptor::new(*name, Options::default()))
}

/// What [`repair`] did.
#[derive(Debug)]
pub struct Repaired {
    /// The database folder repaired.
    pub path: PathBuf,
}

/// Opens a damaged store with point-in-time recovery: its write-ahead log is replayed up
/// to the first damaged record and the rest is dropped, then everything recovered is
/// flushed so that the damaged log is no longer needed. Writes after the damage are lost;
/// this is the explicit, offline step the normal open refuses to take by itself.
pub fn repair(dir: &Path) -> Result<Repaired, DbError> {
    let db_path = dir.join("db");
    if !dir.join(MARKER_FILE).exists() {
        return Err(DbError::Foreign {
            path: dir.to_path_buf(),
        });
    }
    let mut opts = Options::default();
    opts.set_paranoid_checks(true);
    opts.set_wal_recovery_mode(rocksdb::DBRecoveryMode::PointInTime);
    let corrupt = |source| DbError::Corrupt {
        path: db_path.clone(),
        source,
    };
    let db = DB::open_cf_descriptors(&opts, &db_path, column_families()).map_err(corrupt)?;
    for name in ALL_CFS {
        if let Some(cf) = db.cf_handle(name) {
            db.flush_cf(cf).map_err(corrupt)?;
        }
    }
    db.flush_wal(true).map_err(corrupt)?;
    Ok(Repaired { path: db_path })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn foreign_dir_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("precious.txt"), b"data").unwrap();
        let err = open(dir.path(), 1).unwrap_err();
        assert!(matches!(err, DbError::Foreign { .. }), "{err}");
        assert_eq!(fs::read(dir.path().join("precious.txt")).unwrap(), b"data");
        assert!(!dir.path().join("db").exists());
    }

    #[test]
    fn reopen_and_member_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        drop(open(dir.path(), 7).unwrap());
        drop(open(dir.path(), 7).unwrap());
        let err = open(dir.path(), 8).unwrap_err();
        assert!(
            matches!(
                err,
                DbError::MemberMismatch {
                    found: 7,
                    expected: 8,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn damaged_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(open(dir.path(), 1).unwrap());
        let db = dir.path().join("db");
        for entry in fs::read_dir(&db).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            if name.starts_with("MANIFEST") {
                fs::write(&path, b"garbage that is not a manifest").unwrap();
            }
        }
        let err = open(dir.path(), 1).unwrap_err();
        assert!(matches!(err, DbError::Corrupt { .. }), "{err}");
        // Refused, not reset: the damaged file is still there for an operator to inspect.
        assert!(db.exists());
    }

    #[test]
    fn missing_database_is_not_recreated() {
        let dir = tempfile::tempdir().unwrap();
        drop(open(dir.path(), 1).unwrap());
        fs::remove_dir_all(dir.path().join("db")).unwrap();
        let err = open(dir.path(), 1).unwrap_err();
        assert!(matches!(err, DbError::Corrupt { .. }), "{err}");
    }
}
