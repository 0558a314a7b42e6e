//! Snapshots: the one a member keeps, and the handle openraft passes around.
//!
//! A member keeps its newest snapshot in its data dir, in one of two forms:
//! - **A checkpoint**, `snapshot.ckpt.*/`: what a member builds. It is a RocksDB
//!   checkpoint of the store (`db/`: the memtables flushed and the table files
//!   hard-linked) and the Raft meta read back from it (`meta`), made under a temporary
//!   name and renamed into place once complete. Building one costs a flush, whatever the
//!   store's size.
//! - **A file**, [`FILE`]: what a member received from its leader (or an earlier version
//!   built). It holds the body ([`crate::dump`]), then a trailer of the postcard-encoded
//!   [`Meta`], the meta's length (4 bytes, little-endian) and [`TRAILER_MAGIC`]. The body
//!   comes first because it is streamed into the file, and the meta is only known from
//!   the body's head once it is written. It is written under a temporary name, synced,
//!   and renamed into place.
//!
//! The newest of them is the member's snapshot, and the others are removed once it is in
//! place. A checkpoint becomes a body only when one is needed: to send it to a follower,
//! or to restore it at open. It is then opened read-only and dumped into a temporary file.
//! This is etcd's way, whose snapshot is its bolt file, copied only to be sent: a dump
//! reads and writes the whole store (1.6 GB at 150,000 pods), and a member alone, or
//! whose followers keep up, never needs one.
//!
//! [`SnapshotBody`] is an open file and the length of the body at its start. A body being
//! sent stays readable after a newer snapshot has replaced it, and a received one is the
//! temporary file it was streamed into, which installing it renames. So no snapshot is
//! ever held in memory, at any size.

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use openraft::SnapshotMeta;
use rocksdb::DB;
use tempfile::{TempDir, TempPath};

use super::NodeId;
use crate::dump::Head;
use crate::mvcc::{Dump, MvccError};

pub(crate) type Meta = SnapshotMeta<NodeId, openraft::BasicNode>;

/// The member's snapshot when it is a file, in its data dir.
pub(crate) const FILE: &str = "snapshot.v2";
/// Where earlier versions kept it: the postcard encoding of the meta and a whole [`Dump`].
const LEGACY_FILE: &str = "snapshot.bin";
/// The member's snapshot when it is a checkpoint: this prefix and a random suffix.
const CHECKPOINT_PREFIX: &str = "snapshot.ckpt.";
/// In a checkpoint's folder: the store's checkpoint, and the meta read from it with the
/// bytes of the state's table files (postcard).
const CHECKPOINT_DB: &str = "db";
const CHECKPOINT_META: &str = "meta";
/// Snapshots being built or received; what a crash leaves of them is removed at open.
const TEMP_PREFIX: &str = "snapshot.tmp.";
const TRAILER_MAGIC: &[u8; 4] = b"BSF2";
/// The largest meta a trailer may claim (a membership of a few members is far less).
const MAX_META_BYTES: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotFileError {
    #[error("snapshot file in {dir}")]
    Io {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("snapshot file {path} is malformed: {what}")]
    Malformed { path: PathBuf, what: &'static str },
    #[error("snapshot file {path} has an undecodable part")]
    Codec {
        path: PathBuf,
        #[source]
        source: postcard::Error,
    },
    #[error("converting the snapshot file of an earlier version")]
    Legacy(#[source] crate::dump::DumpError),
    #[error("the store's checkpoint in {path}")]
    Checkpoint {
        path: PathBuf,
        #[source]
        source: rocksdb::Error,
    },
    #[error("reading the store's checkpoint in {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: MvccError,
    },
}

/// A snapshot as openraft passes it around: a body, or a checkpoint that is dumped into
/// one when it is needed as one ([`SnapshotData::into_body`]).
#[derive(Debug)]
pub struct SnapshotData(Form);

#[derive(Debug)]
enum Form {
    Body(SnapshotBody),
    Checkpoint {
        /// The checkpoint's folder (`snapshot.ckpt.*`).
        path: PathBuf,
        /// Bytes of the state's table files in it.
        size: u64,
        files: SnapshotFiles,
        /// Set when the checkpoint was built but found older than the snapshot in place:
        /// its folder is then a temporary one, removed when this is dropped.
        _temp: Option<TempDir>,
    },
}

impl From<SnapshotBody> for SnapshotData {
    fn from(body: SnapshotBody) -> Self {
        Self(Form::Body(body))
    }
}

impl SnapshotData {
    /// Its size on disk: a body's length, or the bytes of a checkpoint's state.
    pub(crate) fn size(&self) -> u64 {
        match &self.0 {
            Form::Body(b) => b.len(),
            Form::Checkpoint { size, .. } => *size,
        }
    }

    /// The snapshot as a body. A checkpoint is dumped into a temporary file, removed when
    /// the body is dropped. Blocking: it reads the whole store.
    pub(crate) fn into_body(self) -> Result<SnapshotBody, SnapshotFileError> {
        // A superseded checkpoint's folder lives as long as this is read.
        let (path, files, _temp) = match self.0 {
            Form::Body(b) => return Ok(b),
            Form::Checkpoint {
                path, files, _temp, ..
            } => (path, files, _temp),
        };
        let db_path = path.join(CHECKPOINT_DB);
        let db = {
            // Not while a newer snapshot removes this one; once open, it holds its files.
            let _one = files.lock();
            still_there(&path)?;
            crate::db::open_checkpoint(&db_path, true).map_err(|source| {
                SnapshotFileError::Checkpoint {
                    path: db_path.clone(),
                    source,
                }
            })?
        };
        let mut draft = files.draft()?;
        let (_, _, len) = crate::mvcc::write_dump(&db, draft.writer()).map_err(|source| {
            SnapshotFileError::Read {
                path: db_path,
                source,
            }
        })?;
        draft.into_body(len, &files)
    }

    #[cfg(test)]
    pub(crate) fn is_checkpoint(&self) -> bool {
        matches!(self.0, Form::Checkpoint { .. })
    }
}

/// Whether a checkpoint's folder is still there (a newer snapshot may have replaced it).
/// Asked before opening it: RocksDB's read-only open of a missing folder makes the
/// folder again before it fails, leaving one that nothing removes (the replacement test
/// saw it).
fn still_there(path: &Path) -> Result<(), SnapshotFileError> {
    std::fs::metadata(path.join(CHECKPOINT_META))
        .map(drop)
        .map_err(|source| SnapshotFileError::Io {
            dir: path.to_path_buf(),
            source,
        })
}

/// A snapshot's body: an open file and the body's length at its start.
#[derive(Debug)]
pub struct SnapshotBody {
    file: Arc<File>,
    len: u64,
    /// Set while the file is a temporary one: it is removed when this is dropped, unless
    /// [`SnapshotFiles::keep`] has made it the member's snapshot.
    temp: Option<TempPath>,
}

impl SnapshotBody {
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// The body from its start. Reads go by offset, so handles never share a position.
    pub(crate) fn body(&self) -> impl Read + '_ {
        io::BufReader::with_capacity(
            1 << 20,
            At {
                file: &self.file,
                pos: 0,
                end: self.len,
            },
        )
    }

    /// Up to `max` bytes of the body from `pos`; empty at its end. Blocking.
    pub(crate) fn read_chunk(file: &File, pos: u64, end: u64, max: usize) -> io::Result<Vec<u8>> {
        let n = (end.saturating_sub(pos)).min(max as u64) as usize;
        let mut buf = vec![0; n];
        file.read_exact_at(&mut buf, pos)?;
        Ok(buf)
    }

    /// The file, for reading the body off the async threads.
    pub(crate) fn shared_file(&self) -> Arc<File> {
        self.file.clone()
    }

    /// An empty body in a temporary file of `dir`, for a snapshot being received.
    pub(crate) fn receiving(dir: &Path) -> Result<Self, SnapshotFileError> {
        let (file, temp) = temp_file(dir)?;
        Ok(Self {
            file: Arc::new(file),
            len: 0,
            temp: Some(temp),
        })
    }

    /// Appends to the body of a snapshot being received. Blocking.
    pub(crate) fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.file.write_all_at(bytes, self.len)?;
        self.len += bytes.len() as u64;
        Ok(())
    }
}

/// A reader of a file's range by offset.
struct At<'f> {
    file: &'f File,
    pos: u64,
    end: u64,
}

impl Read for At<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = (self.end - self.pos).min(buf.len() as u64) as usize;
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.pos += n as u64;
        Ok(n)
    }
}

fn temp_file(dir: &Path) -> Result<(File, TempPath), SnapshotFileError> {
    let f = tempfile::Builder::new()
        .prefix(TEMP_PREFIX)
        .tempfile_in(dir)
        .map_err(|source| SnapshotFileError::Io {
            dir: dir.to_path_buf(),
            source,
        })?;
    Ok(f.into_parts())
}

/// A body being written: through [`Draft::writer`].
pub(crate) struct Draft {
    out: BufWriter<File>,
    temp: TempPath,
}

impl Draft {
    pub(crate) fn writer(&mut self) -> &mut BufWriter<File> {
        &mut self.out
    }

    /// Ends the draft, whose body is `len` bytes, as a temporary body.
    fn into_body(self, len: u64, files: &SnapshotFiles) -> Result<SnapshotBody, SnapshotFileError> {
        let file = self
            .out
            .into_inner()
            .map_err(|e| files.io(e.into_error()))?;
        Ok(SnapshotBody {
            file: Arc::new(file),
            len,
            temp: Some(self.temp),
        })
    }
}

/// A checkpoint being built: the store's checkpoint is made, its meta not yet written.
pub(crate) struct CheckpointDraft {
    dir: TempDir,
    db: DB,
}

impl CheckpointDraft {
    /// The head of the checkpoint's state, from which its Raft position is read.
    pub(crate) fn head(&self) -> Result<Head, SnapshotFileError> {
        crate::mvcc::read_head(&self.db).map_err(|source| SnapshotFileError::Read {
            path: self.dir.path().join(CHECKPOINT_DB),
            source,
        })
    }
}

/// One of the snapshots in a data dir, as [`SnapshotFiles`] finds them.
enum Found {
    File(Meta, SnapshotBody),
    /// Its meta, folder, and the bytes of its state.
    Checkpoint(Meta, PathBuf, u64),
}

impl Found {
    fn meta(&self) -> &Meta {
        match self {
            Found::File(m, _) | Found::Checkpoint(m, ..) => m,
        }
    }

    fn path(&self, files: &SnapshotFiles) -> PathBuf {
        match self {
            Found::File(..) => files.path(),
            Found::Checkpoint(_, p, _) => p.clone(),
        }
    }
}

/// The member's snapshot, in its data dir.
#[derive(Clone, Debug)]
pub(crate) struct SnapshotFiles {
    dir: PathBuf,
    /// Held while a snapshot replaces another, so that a build finishing late cannot put
    /// an older snapshot over one just installed, and while a checkpoint is opened to be
    /// read, so that it is not removed under the opening.
    replacing: Arc<Mutex<()>>,
}

impl SnapshotFiles {
    /// The snapshots of `dir`. Removes what a crash left: temporary files and folders,
    /// and snapshots older than the newest.
    pub(crate) fn open(dir: &Path) -> Self {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
                    let _ = remove(&e.path());
                }
            }
        }
        let files = Self {
            dir: dir.to_path_buf(),
            replacing: Arc::default(),
        };
        // A snapshot that cannot be read is left in place: `current` says why.
        if let Ok(found) = files.found() {
            if let Some(newest) = found.iter().max_by_key(|f| f.meta().last_log_id) {
                let keep = newest.path(&files);
                files.remove_all_but(&found, &keep);
            }
        }
        files
    }

    fn path(&self) -> PathBuf {
        self.dir.join(FILE)
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.replacing.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn io(&self, source: io::Error) -> SnapshotFileError {
        SnapshotFileError::Io {
            dir: self.dir.clone(),
            source,
        }
    }

    /// Every snapshot in the data dir.
    fn found(&self) -> Result<Vec<Found>, SnapshotFileError> {
        let mut found = Vec::new();
        let path = self.path();
        match File::open(&path) {
            Ok(file) => {
                let (meta, len) = read_trailer(&file, &path)?;
                let body = SnapshotBody {
                    file: Arc::new(file),
                    len,
                    temp: None,
                };
                found.push(Found::File(meta, body));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(self.io(e)),
        }
        for e in std::fs::read_dir(&self.dir).map_err(|e| self.io(e))? {
            let e = e.map_err(|e| self.io(e))?;
            if !e
                .file_name()
                .to_string_lossy()
                .starts_with(CHECKPOINT_PREFIX)
            {
                continue;
            }
            let meta_path = e.path().join(CHECKPOINT_META);
            let bytes = match std::fs::read(&meta_path) {
                Ok(b) => b,
                // Removed by a newer snapshot since the folder was listed.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(self.io(e)),
            };
            let (meta, size) =
                postcard::from_bytes(&bytes).map_err(|source| SnapshotFileError::Codec {
                    path: meta_path,
                    source,
                })?;
            found.push(Found::Checkpoint(meta, e.path(), size));
        }
        Ok(found)
    }

    /// Takes the lock for replacing snapshots, and lists those in place, unless one of
    /// them is newer than `meta` (built or received meanwhile): then nothing is to be
    /// replaced, and the list is `None`.
    fn replaceable(
        &self,
        meta: &Meta,
    ) -> Result<(std::sync::MutexGuard<'_, ()>, Option<Vec<Found>>), SnapshotFileError> {
        let one = self.lock();
        let found = self.found()?;
        let newer = found
            .iter()
            .any(|f| f.meta().last_log_id > meta.last_log_id);
        Ok((one, (!newer).then_some(found)))
    }

    /// Removes every snapshot of `found` but the one at `keep`.
    fn remove_all_but(&self, found: &[Found], keep: &Path) {
        for f in found {
            let path = f.path(self);
            if path != keep {
                if let Err(e) = remove(&path) {
                    tracing::warn!(path = %path.display(), error = %e, "could not remove an older snapshot");
                }
            }
        }
    }

    /// The member's snapshot, if it has one: the newest in its data dir.
    pub(crate) fn current(&self) -> Result<Option<(Meta, SnapshotData)>, SnapshotFileError> {
        let newest = self
            .found()?
            .into_iter()
            .max_by_key(|f| f.meta().last_log_id);
        Ok(newest.map(|f| self.handle(f)))
    }

    fn handle(&self, found: Found) -> (Meta, SnapshotData) {
        match found {
            Found::File(meta, body) => (meta, body.into()),
            Found::Checkpoint(meta, path, size) => {
                let data = SnapshotData(Form::Checkpoint {
                    path,
                    size,
                    files: self.clone(),
                    _temp: None,
                });
                (meta, data)
            }
        }
    }

    /// Starts a body in a temporary file.
    pub(crate) fn draft(&self) -> Result<Draft, SnapshotFileError> {
        let (file, temp) = temp_file(&self.dir)?;
        Ok(Draft {
            out: BufWriter::with_capacity(1 << 20, file),
            temp,
        })
    }

    /// Ends a draft whose body is `len` bytes, and keeps it as the member's snapshot.
    pub(crate) fn finish(
        &self,
        draft: Draft,
        meta: &Meta,
        len: u64,
    ) -> Result<SnapshotBody, SnapshotFileError> {
        let mut body = draft.into_body(len, self)?;
        self.keep(meta, &mut body)?;
        Ok(body)
    }

    /// Starts a checkpoint of the store `db` in a temporary folder.
    pub(crate) fn checkpoint(&self, db: &DB) -> Result<CheckpointDraft, SnapshotFileError> {
        let dir = tempfile::Builder::new()
            .prefix(TEMP_PREFIX)
            .tempdir_in(&self.dir)
            .map_err(|e| self.io(e))?;
        let db_path = dir.path().join(CHECKPOINT_DB);
        let failed = |source| SnapshotFileError::Checkpoint {
            path: db_path.clone(),
            source,
        };
        crate::db::checkpoint(db, &db_path).map_err(failed)?;
        let db = crate::db::open_checkpoint(&db_path, false).map_err(failed)?;
        Ok(CheckpointDraft { dir, db })
    }

    /// Ends a checkpoint whose state is at `meta`, and keeps it as the member's snapshot:
    /// its meta is written and synced, and the folder renamed into place and the data
    /// dir synced. A checkpoint older than the snapshot in place is dropped instead.
    pub(crate) fn finish_checkpoint(
        &self,
        draft: CheckpointDraft,
        meta: &Meta,
    ) -> Result<SnapshotData, SnapshotFileError> {
        let CheckpointDraft { dir, db } = draft;
        let size = crate::db::state_bytes(&db).map_err(|source| SnapshotFileError::Checkpoint {
            path: dir.path().join(CHECKPOINT_DB),
            source,
        })?;
        drop(db);
        let encoded =
            postcard::to_stdvec(&(meta, size)).map_err(|source| SnapshotFileError::Codec {
                path: dir.path().join(CHECKPOINT_META),
                source,
            })?;
        let write = || -> io::Result<()> {
            let mut f = File::create(dir.path().join(CHECKPOINT_META))?;
            f.write_all(&encoded)?;
            f.sync_all()?;
            File::open(dir.path())?.sync_all()
        };
        write().map_err(|e| self.io(e))?;
        let (_one, found) = self.replaceable(meta)?;
        let Some(found) = found else {
            // Installed while this was built. openraft ignores a built snapshot older
            // than its own; the folder goes when the handle does.
            return Ok(SnapshotData(Form::Checkpoint {
                path: dir.path().to_path_buf(),
                size,
                files: self.clone(),
                _temp: Some(dir),
            }));
        };
        let suffix = dir
            .path()
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix(TEMP_PREFIX))
            .unwrap_or("0")
            .to_string();
        let path = self.dir.join(format!("{CHECKPOINT_PREFIX}{suffix}"));
        let temp = dir.keep();
        std::fs::rename(&temp, &path)
            .and_then(|()| File::open(&self.dir)?.sync_all())
            .map_err(|e| {
                let _ = remove(&temp);
                self.io(e)
            })?;
        self.remove_all_but(&found, &path);
        Ok(SnapshotData(Form::Checkpoint {
            path,
            size,
            files: self.clone(),
            _temp: None,
        }))
    }

    /// Makes a body the member's snapshot, durably: its trailer is written after the
    /// body, the file synced and renamed into place, and the folder synced; the older
    /// snapshots are then removed. A body that is not in a temporary file of its own is
    /// copied into one first. Nothing is replaced by a snapshot older than the one in
    /// place.
    pub(crate) fn keep(
        &self,
        meta: &Meta,
        data: &mut SnapshotBody,
    ) -> Result<(), SnapshotFileError> {
        if data.temp.is_none() {
            let mut draft = self.draft()?;
            io::copy(&mut data.body(), draft.writer()).map_err(|e| self.io(e))?;
            *data = self.finish(draft, meta, data.len)?;
            return Ok(());
        }
        let mut trailer = postcard::to_stdvec(meta).map_err(|source| SnapshotFileError::Codec {
            path: self.path(),
            source,
        })?;
        trailer.extend_from_slice(&(trailer.len() as u32).to_le_bytes());
        trailer.extend_from_slice(TRAILER_MAGIC);
        let write = || -> io::Result<()> {
            data.file.write_all_at(&trailer, data.len)?;
            data.file.set_len(data.len + trailer.len() as u64)?;
            data.file.sync_all()
        };
        write().map_err(|e| self.io(e))?;
        let (_one, found) = self.replaceable(meta)?;
        let Some(found) = found else {
            // The temporary file goes when `data` does; openraft may still send it.
            return Ok(());
        };
        let temp = data.temp.take().expect("a temporary file");
        temp.persist(self.path()).map_err(|e| self.io(e.error))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| self.io(e))?;
        self.remove_all_but(&found, &self.path());
        Ok(())
    }

    /// Converts the snapshot file of an earlier version into this one's, if there is
    /// one, and removes it. Its body is read whole, once.
    pub(crate) fn convert_legacy(&self) -> Result<(), SnapshotFileError> {
        let path = self.dir.join(LEGACY_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(self.io(e)),
        };
        let codec = |source| SnapshotFileError::Codec {
            path: path.clone(),
            source,
        };
        let (meta, rest) = postcard::take_from_bytes::<Meta>(&bytes).map_err(codec)?;
        let (len, body) = postcard::take_from_bytes::<usize>(rest).map_err(codec)?;
        if body.len() != len {
            return Err(SnapshotFileError::Malformed {
                path,
                what: "its data is cut short",
            });
        }
        let dump: Dump = postcard::from_bytes(body).map_err(codec)?;
        drop(bytes);
        let mut draft = self.draft()?;
        let (_, len) = dump
            .write_body(draft.writer())
            .map_err(SnapshotFileError::Legacy)?;
        drop(dump);
        self.finish(draft, &meta, len)?;
        std::fs::remove_file(&path).map_err(|e| self.io(e))?;
        tracing::info!(snapshot = %meta.snapshot_id, "converted the snapshot file of an earlier version");
        Ok(())
    }
}

/// Removes a snapshot file or folder.
fn remove(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Reads a snapshot file's trailer: its meta and the length of the body before it.
fn read_trailer(file: &File, path: &Path) -> Result<(Meta, u64), SnapshotFileError> {
    let malformed = |what| SnapshotFileError::Malformed {
        path: path.to_path_buf(),
        what,
    };
    let io = |source| SnapshotFileError::Io {
        dir: path.parent().unwrap_or(path).to_path_buf(),
        source,
    };
    let size = file.metadata().map_err(io)?.len();
    if size < 8 {
        return Err(malformed("it is too short for a trailer"));
    }
    let mut tail = [0u8; 8];
    file.read_exact_at(&mut tail, size - 8).map_err(io)?;
    if &tail[4..] != TRAILER_MAGIC {
        return Err(malformed("it does not end with the trailer's magic"));
    }
    let meta_len = u64::from(u32::from_le_bytes(tail[..4].try_into().expect("4 bytes")));
    if meta_len > MAX_META_BYTES || meta_len + 8 > size {
        return Err(malformed("its trailer claims more than the file holds"));
    }
    let mut meta = vec![0u8; meta_len as usize];
    file.read_exact_at(&mut meta, size - 8 - meta_len)
        .map_err(io)?;
    let meta = postcard::from_bytes(&meta).map_err(|source| SnapshotFileError::Codec {
        path: path.to_path_buf(),
        source,
    })?;
    Ok((meta, size - 8 - meta_len))
}
