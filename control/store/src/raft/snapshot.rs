//! Snapshots as files: the one a member keeps, and the handle openraft passes around.
//!
//! A member keeps its newest snapshot in [`FILE`] in its data dir: the body
//! ([`crate::dump`]), then a trailer of the postcard-encoded [`Meta`], the meta's length
//! (4 bytes, little-endian) and [`TRAILER_MAGIC`]. The body comes first because it is
//! streamed into the file, and the meta is only known from the body's head once it is
//! written. A file is written under a temporary name, synced, and renamed into place.
//!
//! [`SnapshotData`] is an open file and the length of the body at its start. A snapshot
//! being sent stays readable after a newer one has replaced it under the same name, and a
//! received one is the temporary file it was streamed into, which installing it renames.
//! So no snapshot is ever held in memory, at any size.

use std::fs::File;
use std::io::{self, BufWriter, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use openraft::SnapshotMeta;
use tempfile::TempPath;

use super::NodeId;
use crate::mvcc::Dump;

pub(crate) type Meta = SnapshotMeta<NodeId, openraft::BasicNode>;

/// The member's snapshot, in its data dir.
pub(crate) const FILE: &str = "snapshot.v2";
/// Where earlier versions kept it: the postcard encoding of the meta and a whole [`Dump`].
const LEGACY_FILE: &str = "snapshot.bin";
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
}

/// A snapshot's body: an open file and the body's length at its start.
#[derive(Debug)]
pub struct SnapshotData {
    file: Arc<File>,
    len: u64,
    /// Set while the file is a temporary one: it is removed when this is dropped, unless
    /// [`SnapshotFiles::keep`] has made it the member's snapshot.
    temp: Option<TempPath>,
}

impl SnapshotData {
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

/// A snapshot being built: its body is written through [`Draft::writer`].
pub(crate) struct Draft {
    out: BufWriter<File>,
    temp: TempPath,
}

impl Draft {
    pub(crate) fn writer(&mut self) -> &mut BufWriter<File> {
        &mut self.out
    }
}

/// The member's snapshot file, in its data dir.
#[derive(Clone, Debug)]
pub(crate) struct SnapshotFiles {
    dir: PathBuf,
    /// Held while a snapshot replaces the file, so that a build finishing late cannot
    /// put an older snapshot over one just installed.
    replacing: Arc<Mutex<()>>,
}

impl SnapshotFiles {
    /// The snapshot files of `dir`; removes what a crash left of temporary ones.
    pub(crate) fn open(dir: &Path) -> Self {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Self {
            dir: dir.to_path_buf(),
            replacing: Arc::default(),
        }
    }

    fn path(&self) -> PathBuf {
        self.dir.join(FILE)
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    fn io(&self, source: io::Error) -> SnapshotFileError {
        SnapshotFileError::Io {
            dir: self.dir.clone(),
            source,
        }
    }

    /// The member's snapshot, if it has one.
    pub(crate) fn current(&self) -> Result<Option<(Meta, SnapshotData)>, SnapshotFileError> {
        let path = self.path();
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.io(e)),
        };
        let (meta, len) = read_trailer(&file, &path)?;
        let data = SnapshotData {
            file: Arc::new(file),
            len,
            temp: None,
        };
        Ok(Some((meta, data)))
    }

    /// Starts a snapshot in a temporary file.
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
    ) -> Result<SnapshotData, SnapshotFileError> {
        let file = draft
            .out
            .into_inner()
            .map_err(|e| self.io(e.into_error()))?;
        let mut data = SnapshotData {
            file: Arc::new(file),
            len,
            temp: Some(draft.temp),
        };
        self.keep(meta, &mut data)?;
        Ok(data)
    }

    /// Makes a snapshot the member's, durably: its trailer is written after the body,
    /// the file synced and renamed into place, and the folder synced. A snapshot that is
    /// not in a temporary file of its own is copied into one first. Nothing is replaced
    /// by a snapshot older than the one in place.
    pub(crate) fn keep(
        &self,
        meta: &Meta,
        data: &mut SnapshotData,
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
        let _one = self.replacing.lock().unwrap_or_else(|e| e.into_inner());
        if let Ok(Some((current, _))) = self.current() {
            if current.last_log_id > meta.last_log_id {
                // The temporary file goes when `data` does; openraft may still send it.
                return Ok(());
            }
        }
        let temp = data.temp.take().expect("a temporary file");
        temp.persist(self.path()).map_err(|e| self.io(e.error))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| self.io(e))
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
