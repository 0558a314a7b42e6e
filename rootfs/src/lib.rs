//! # baton-rootfs: OCI image layers into a root filesystem
//!
//! A Linux container image is a stack of layers, each a tar archive (plain, gzip or zstd)
//! of the files it adds, changes or deletes. [`unpack_layer`] applies one layer to a
//! directory; [`unpack_image`] applies an image's layers in order into a fresh directory,
//! atomically: the directory appears complete or not at all.
//!
//! ## Layers are untrusted
//! Whoever can push an image can write any tar. The rules:
//! - **Nothing lands outside the root.** Every path is resolved with `openat2` and
//!   `RESOLVE_IN_ROOT`, as if the root were `/`: a symlink in the image that points to
//!   `/etc` or `../../..` leads to the image's own `/etc`, never the node's, whether a
//!   later entry writes through it or a hard link names it. Only the last component of an
//!   entry is created, always with `O_NOFOLLOW`/`O_EXCL` or the `*at` calls that do not
//!   follow, so an entry never writes through a symlink it replaces.
//! - **Entries that name a parent** (`..`) are refused with the layer: no real image has
//!   them, and one that does is an attack.
//! - **Device files** are skipped (a container gets its devices from the runtime);
//!   FIFOs are created.
//! - **Sizes are bounded** ([`Limits`]): the bytes written and the number of entries, so
//!   that a small compressed layer cannot fill the node's disk.
//! - Ownership and modes are kept (the node unpacks as root), setuid bits included.
//!
//! ## Whiteouts
//! As the OCI image spec defines them: `.wh.NAME` deletes `NAME` from the layers below,
//! and `.wh..wh..opq` in a directory hides everything the layers below put there (but not
//! what this layer adds to it, whichever order the tar lists them in).
//!
//! ## Containers' views
//! An unpacked image is shared read-only; each container gets a writable [`View`] of it
//! (overlayfs, else a copy; see [`view`]).

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, Timespec, Timestamps};

pub mod view;
pub use view::{create_view, remove_view, View, ViewKind};

/// How a layer's tar is compressed, from its media type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// The compression of a layer media type (OCI or Docker), or None for a media type
    /// that is not a filesystem layer.
    pub fn of_media_type(media_type: &str) -> Option<Compression> {
        match media_type {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar" => Some(Self::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Some(Self::Gzip),
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => Some(Self::Zstd),
            _ => None,
        }
    }
}

/// Bounds on what one image may write.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Bytes of file content, over all layers.
    pub max_bytes: u64,
    /// Entries (files, directories, links), over all layers.
    pub max_entries: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_bytes: 8 << 30,
            max_entries: 1_000_000,
        }
    }
}

/// What unpacking did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub entries: u64,
    pub bytes: u64,
    pub whiteouts: u64,
    /// Character and block devices, which are not created.
    pub skipped_devices: u64,
}

/// Why a layer could not be applied. The entry is named as the tar names it.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("layer entry {entry:?} names a parent directory (..): refused")]
    Escape { entry: PathBuf },
    #[error("layer entry {entry:?} is of a type Baton does not unpack ({kind})")]
    Unsupported { entry: PathBuf, kind: String },
    #[error("the image is over {limit} bytes unpacked")]
    TooLarge { limit: u64 },
    #[error("the image has over {limit} entries")]
    TooManyEntries { limit: u64 },
    /// The tar or its compression is broken (a truncated or corrupt layer).
    #[error("the layer is not a readable tar archive")]
    Corrupt(#[source] io::Error),
    /// The layer's uncompressed content is not the one the image's config names.
    #[error("layer {layer} unpacks to {found}, but the image config says {expected}")]
    DiffId {
        layer: usize,
        expected: String,
        found: String,
    },
    #[error("unpacking {entry:?}")]
    Entry {
        entry: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("I/O error on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Unpacks `layers` (each a reader and its compression), bottom first, into `dest`, which
/// must not exist yet. The layers go into a temporary directory beside it, renamed to
/// `dest` once all are applied; on failure nothing is left.
pub fn unpack_image<R: Read>(
    dest: &Path,
    layers: impl IntoIterator<Item = (R, Compression)>,
    limits: Limits,
) -> Result<Stats, RootfsError> {
    unpack_image_verified(dest, layers.into_iter().map(|(r, c)| (r, c, None)), limits)
}

/// [`unpack_image`], checking each layer whose expected `diff_id` is given (the digest
/// of its uncompressed tar, `sha256:HEX`, from the image config's `rootfs.diff_ids`): a
/// layer that unpacks to anything else fails the whole image.
pub fn unpack_image_verified<R: Read>(
    dest: &Path,
    layers: impl IntoIterator<Item = (R, Compression, Option<String>)>,
    limits: Limits,
) -> Result<Stats, RootfsError> {
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| RootfsError::Io { path, source }
    };
    let parent = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io_err(parent))?;
    let tmp = tempdir_in(parent).map_err(io_err(parent))?;
    let result = (|| {
        let root = open_root(&tmp).map_err(io_err(&tmp))?;
        let mut total = Stats::default();
        for (n, (reader, compression, diff_id)) in layers.into_iter().enumerate() {
            let found = apply(&root, reader, compression, limits, &mut total)?;
            if let Some(expected) = diff_id {
                if !expected.starts_with("sha256:") {
                    return Err(RootfsError::DiffId {
                        layer: n,
                        expected: format!("{expected} (only sha256 diff_ids are checked)"),
                        found,
                    });
                }
                if !expected.eq_ignore_ascii_case(&found) {
                    return Err(RootfsError::DiffId {
                        layer: n,
                        expected,
                        found,
                    });
                }
            }
        }
        Ok(total)
    })();
    match result {
        Ok(stats) => match std::fs::rename(&tmp, dest) {
            Ok(()) => Ok(stats),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                Err(io_err(dest)(e))
            }
        },
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

/// Applies one layer to the root filesystem at `root`.
pub fn unpack_layer(
    root: &Path,
    layer: impl Read,
    compression: Compression,
    limits: Limits,
) -> Result<Stats, RootfsError> {
    let fd = open_root(root).map_err(|source| RootfsError::Io {
        path: root.to_path_buf(),
        source,
    })?;
    let mut stats = Stats::default();
    apply(&fd, layer, compression, limits, &mut stats)?;
    Ok(stats)
}

fn tempdir_in(parent: &Path) -> io::Result<PathBuf> {
    for n in 0u32.. {
        let p = parent.join(format!(".unpacking-{}-{n}", std::process::id()));
        match std::fs::create_dir(&p) {
            Ok(()) => return Ok(p),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    unreachable!("u32 ran out of temporary names")
}

fn open_root(root: &Path) -> io::Result<OwnedFd> {
    Ok(rustix::fs::open(
        root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// What a layer's uncompressed stream is read through: its digest, its diff_id.
struct Hashing<R> {
    inner: R,
    hasher: sha2::Sha256,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use sha2::Digest;
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Applies one layer, and returns the digest of its uncompressed tar (`sha256:HEX`).
fn apply(
    root: &OwnedFd,
    layer: impl Read,
    compression: Compression,
    limits: Limits,
    stats: &mut Stats,
) -> Result<String, RootfsError> {
    let reader: Box<dyn Read> = match compression {
        Compression::None => Box::new(layer),
        Compression::Gzip => Box::new(flate2::read::GzDecoder::new(layer)),
        Compression::Zstd => Box::new(zstd::Decoder::new(layer).map_err(RootfsError::Corrupt)?),
    };
    let reader = Hashing {
        inner: reader,
        hasher: Default::default(),
    };
    let mut archive = tar::Archive::new(reader);
    let mut layer = Layer {
        root,
        created: HashSet::new(),
        opaque: Vec::new(),
    };
    for entry in archive.entries().map_err(RootfsError::Corrupt)? {
        let mut entry = entry.map_err(RootfsError::Corrupt)?;
        stats.entries += 1;
        if stats.entries > limits.max_entries {
            return Err(RootfsError::TooManyEntries {
                limit: limits.max_entries,
            });
        }
        let raw = entry.path().map_err(RootfsError::Corrupt)?.into_owned();
        let Some(rel) = clean(&raw)? else {
            continue;
        };
        let name = rel.file_name().unwrap_or_default().to_os_string();
        let name_bytes = name.as_bytes();
        if name_bytes == b".wh..wh..opq" {
            stats.whiteouts += 1;
            layer
                .opaque
                .push(rel.parent().unwrap_or(Path::new("")).to_path_buf());
            continue;
        }
        if let Some(hidden) = name_bytes.strip_prefix(b".wh.") {
            stats.whiteouts += 1;
            let target = rel.with_file_name(OsStr::from_bytes(hidden));
            layer.remove(&target).map_err(|source| RootfsError::Entry {
                entry: raw.clone(),
                source,
            })?;
            continue;
        }
        let size = entry.header().size().map_err(RootfsError::Corrupt)?;
        if stats.bytes + size > limits.max_bytes {
            return Err(RootfsError::TooLarge {
                limit: limits.max_bytes,
            });
        }
        let created = layer.create(&rel, &mut entry, stats).map_err(|e| match e {
            Create::Io(source) => RootfsError::Entry {
                entry: raw.clone(),
                source,
            },
            Create::Fail(e) => e,
        })?;
        if created {
            layer.created.insert(rel);
        }
    }
    // Opaque directories are emptied of the lower layers' entries last, when all of this
    // layer's entries are known.
    for dir in std::mem::take(&mut layer.opaque) {
        layer
            .make_opaque(&dir)
            .map_err(|source| RootfsError::Entry {
                entry: dir.join(".wh..wh..opq"),
                source,
            })?;
    }
    // The diff_id covers the whole stream, with the padding after the tar's end; that is
    // read too, within the size limit (a compressed run of zeros could be endless).
    let mut rest = archive.into_inner();
    let budget = limits.max_bytes.saturating_sub(stats.bytes);
    let trailer = io::copy(&mut (&mut rest).take(budget + 1), &mut io::sink())
        .map_err(RootfsError::Corrupt)?;
    if trailer > budget {
        return Err(RootfsError::TooLarge {
            limit: limits.max_bytes,
        });
    }
    use sha2::Digest;
    let digest = rest.hasher.finalize();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("sha256:{hex}"))
}

/// An entry's path relative to the root, without `.` and leading `/`; None for the root
/// itself. A `..` refuses the layer.
fn clean(raw: &Path) -> Result<Option<PathBuf>, RootfsError> {
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(part) => out.push(part),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(RootfsError::Escape {
                    entry: raw.to_path_buf(),
                })
            }
        }
    }
    Ok((!out.as_os_str().is_empty()).then_some(out))
}

enum Create {
    Io(io::Error),
    Fail(RootfsError),
}

impl From<io::Error> for Create {
    fn from(e: io::Error) -> Self {
        Create::Io(e)
    }
}

impl From<rustix::io::Errno> for Create {
    fn from(e: rustix::io::Errno) -> Self {
        Create::Io(e.into())
    }
}

/// One layer being applied.
struct Layer<'a> {
    root: &'a OwnedFd,
    /// What this layer has created, which its opaque markers do not hide.
    created: HashSet<PathBuf>,
    opaque: Vec<PathBuf>,
}

/// The flags every resolution inside the root uses: `/` and `..` stop at the root, and
/// /proc's magic links are not followed.
fn in_root() -> ResolveFlags {
    ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS
}

impl Layer<'_> {
    /// Opens directory `rel` inside the root (following symlinks, within the root), for
    /// the `*at` calls on its entries. With `create`, makes the missing directories.
    fn dir(&self, rel: &Path, create: bool) -> io::Result<OwnedFd> {
        let path: &Path = if rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            rel
        };
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
        match rustix::fs::openat2(self.root, path, flags, Mode::empty(), in_root()) {
            Ok(fd) => Ok(fd),
            Err(rustix::io::Errno::NOENT) if create => self.make_dirs(rel),
            Err(e) => Err(e.into()),
        }
    }

    /// Walks `rel` from the root one name at a time, as `RESOLVE_IN_ROOT` would (`..` and
    /// absolute symlinks stop at the root), making each directory that is missing, where
    /// the path leads (through a symlink whose target does not exist yet, the target is
    /// made, as container runtimes do).
    fn make_dirs(&self, rel: &Path) -> io::Result<OwnedFd> {
        let root = || {
            rustix::fs::openat(
                self.root,
                ".",
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
        };
        let mut stack: Vec<OwnedFd> = vec![root()?];
        let mut todo: std::collections::VecDeque<OsString> =
            rel.iter().map(OsStr::to_os_string).collect();
        let mut links = 0;
        while let Some(name) = todo.pop_front() {
            let cur = stack.last().expect("the root is never popped");
            match name.as_bytes() {
                b"" | b"." | b"/" => continue,
                b".." => {
                    if stack.len() > 1 {
                        stack.pop();
                    }
                    continue;
                }
                _ => {}
            }
            let open = |d: &OwnedFd| {
                rustix::fs::openat(
                    d,
                    &name,
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
            };
            match rustix::fs::statat(cur, &name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Symlink => {
                    links += 1;
                    if links > 40 {
                        return Err(rustix::io::Errno::LOOP.into());
                    }
                    let target = rustix::fs::readlinkat(cur, &name, Vec::new())?;
                    let target = PathBuf::from(OsStr::from_bytes(target.as_bytes()));
                    if target.is_absolute() {
                        stack.truncate(1);
                    }
                    for part in target.iter().rev() {
                        todo.push_front(part.to_os_string());
                    }
                }
                Ok(_) => {
                    let fd = open(cur)?;
                    stack.push(fd);
                }
                Err(rustix::io::Errno::NOENT) => {
                    match rustix::fs::mkdirat(cur, &name, Mode::from_raw_mode(0o755)) {
                        Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                        Err(e) => return Err(e.into()),
                    }
                    let fd = open(cur)?;
                    stack.push(fd);
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(stack.pop().expect("the root is never popped"))
    }

    /// The directory holding `rel`, and `rel`'s own name in it.
    fn parent_of(&self, rel: &Path, create: bool) -> io::Result<(OwnedFd, OsString)> {
        let dir = self.dir(rel.parent().unwrap_or(Path::new("")), create)?;
        Ok((dir, rel.file_name().unwrap_or_default().to_os_string()))
    }

    /// Deletes `rel` (a whiteout), whatever it is; a missing one is fine.
    fn remove(&self, rel: &Path) -> io::Result<()> {
        let (dir, name) = match self.parent_of(rel, false) {
            Ok(p) => p,
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::NOENT.raw_os_error()) => {
                return Ok(())
            }
            Err(e) => return Err(e),
        };
        remove_all(&dir, &name, 0)
    }

    /// Empties `dir` of what the layers below put there.
    fn make_opaque(&self, dir: &Path) -> io::Result<()> {
        let fd = match self.dir(dir, false) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::NOENT.raw_os_error()) => {
                return Ok(())
            }
            Err(e) => return Err(e),
        };
        for name in children(&fd)? {
            if !self.created.contains(&dir.join(&name)) {
                remove_all(&fd, &name, 0)?;
            }
        }
        Ok(())
    }

    /// Creates one entry. Returns whether something was created (a skipped device is not).
    fn create<R: Read>(
        &self,
        rel: &Path,
        entry: &mut tar::Entry<'_, R>,
        stats: &mut Stats,
    ) -> Result<bool, Create> {
        let header = entry.header();
        let kind = header.entry_type();
        // Blank numeric fields read as zero, as Go's archive/tar (which wrote most images)
        // reads them.
        let mode = Mode::from_raw_mode(header.mode().unwrap_or(0o644) & 0o7777);
        let uid = header.uid().unwrap_or(0);
        let gid = header.gid().unwrap_or(0);
        let mtime = header.mtime().unwrap_or(0);
        let owner = (
            Some(rustix::fs::Uid::from_raw(uid as u32)),
            Some(rustix::fs::Gid::from_raw(gid as u32)),
        );
        let times = Timestamps {
            last_access: Timespec {
                tv_sec: mtime as i64,
                tv_nsec: 0,
            },
            last_modification: Timespec {
                tv_sec: mtime as i64,
                tv_nsec: 0,
            },
        };
        let (dir, name) = self.parent_of(rel, true)?;
        let existing = rustix::fs::statat(&dir, &name, AtFlags::SYMLINK_NOFOLLOW).ok();
        let is_dir =
            |st: &rustix::fs::Stat| FileType::from_raw_mode(st.st_mode) == FileType::Directory;
        match kind {
            tar::EntryType::Directory => {
                if !existing.as_ref().is_some_and(is_dir) {
                    if existing.is_some() {
                        remove_all(&dir, &name, 0)?;
                    }
                    rustix::fs::mkdirat(&dir, &name, Mode::from_raw_mode(0o700))?;
                }
                let fd = rustix::fs::openat(
                    &dir,
                    &name,
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )?;
                set_attrs(&fd, owner, mode, &times)?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                if existing.is_some() {
                    remove_all(&dir, &name, 0)?;
                }
                let fd = rustix::fs::openat(
                    &dir,
                    &name,
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )?;
                let mut file = std::fs::File::from(fd);
                let n = io::copy(entry, &mut file)?;
                stats.bytes += n;
                set_attrs(&file, owner, mode, &times)?;
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(Create::Io)?
                    .ok_or_else(|| io::Error::other("a symlink without a target"))?
                    .into_owned();
                if existing.is_some() {
                    remove_all(&dir, &name, 0)?;
                }
                // The target is stored as written: resolving it is for whoever follows
                // it later, and this crate's own resolutions stay inside the root.
                rustix::fs::symlinkat(&target, &dir, &name)?;
                rustix::fs::chownat(&dir, &name, owner.0, owner.1, AtFlags::SYMLINK_NOFOLLOW)?;
                rustix::fs::utimensat(&dir, &name, &times, AtFlags::SYMLINK_NOFOLLOW)?;
            }
            tar::EntryType::Link => {
                let raw = entry
                    .link_name()
                    .map_err(Create::Io)?
                    .ok_or_else(|| io::Error::other("a hard link without a target"))?
                    .into_owned();
                let Some(target) = clean(&raw).map_err(Create::Fail)? else {
                    return Err(io::Error::other("a hard link to the root").into());
                };
                let (tdir, tname) = self.parent_of(&target, false)?;
                if existing.is_some() {
                    remove_all(&dir, &name, 0)?;
                }
                // Without AT_SYMLINK_FOLLOW: a link to a symlink links the symlink itself.
                rustix::fs::linkat(&tdir, &tname, &dir, &name, AtFlags::empty())?;
            }
            tar::EntryType::Fifo => {
                if existing.is_some() {
                    remove_all(&dir, &name, 0)?;
                }
                rustix::fs::mknodat(&dir, &name, FileType::Fifo, mode, 0)?;
                rustix::fs::chownat(&dir, &name, owner.0, owner.1, AtFlags::SYMLINK_NOFOLLOW)?;
            }
            tar::EntryType::Char | tar::EntryType::Block => {
                stats.skipped_devices += 1;
                return Ok(false);
            }
            // Metadata entries the tar crate has already folded into the next entry.
            tar::EntryType::XGlobalHeader
            | tar::EntryType::XHeader
            | tar::EntryType::GNULongName
            | tar::EntryType::GNULongLink => return Ok(false),
            other => {
                return Err(Create::Fail(RootfsError::Unsupported {
                    entry: rel.to_path_buf(),
                    kind: format!("{other:?}"),
                }))
            }
        }
        Ok(true)
    }
}

/// Owner first: a chown clears setuid and setgid bits, which the mode then sets again.
fn set_attrs(
    fd: impl AsFd,
    owner: (Option<rustix::fs::Uid>, Option<rustix::fs::Gid>),
    mode: Mode,
    times: &Timestamps,
) -> io::Result<()> {
    rustix::fs::fchown(&fd, owner.0, owner.1)?;
    rustix::fs::fchmod(&fd, mode)?;
    rustix::fs::futimens(&fd, times)?;
    Ok(())
}

/// The names in a directory, without `.` and `..`.
fn children(dir: &OwnedFd) -> io::Result<Vec<OsString>> {
    let mut out = Vec::new();
    for entry in rustix::fs::Dir::read_from(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            out.push(OsStr::from_bytes(name).to_os_string());
        }
    }
    Ok(out)
}

/// Trees deeper than this are refused rather than recursed into.
const MAX_DEPTH: usize = 512;

/// Removes `name` from `dir`, and everything under it if it is a directory, never
/// following a symlink.
fn remove_all(dir: &OwnedFd, name: &OsStr, depth: usize) -> io::Result<()> {
    let st = match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(rustix::io::Errno::NOENT) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
        return Ok(rustix::fs::unlinkat(dir, name, AtFlags::empty())?);
    }
    if depth >= MAX_DEPTH {
        return Err(io::Error::other("directory tree too deep to remove"));
    }
    let sub = rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    for child in children(&sub)? {
        remove_all(&sub, &child, depth + 1)?;
    }
    Ok(rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR)?)
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod view_tests;
