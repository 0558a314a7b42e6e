//! A container's own writable view of an image's shared root filesystem.
//!
//! An image is unpacked once per node and never written again; each container of it gets
//! a view: an overlayfs mount with the image as its read-only lower layer and a directory
//! of the container's own as the upper one, so a container's writes cost only what it
//! writes and vanish with it. Where the kernel refuses overlayfs (in some user namespaces,
//! on some backing filesystems), the view is a full copy of the image instead, which costs
//! the image's size and its copy time per container start. Which one was made is chosen
//! when the view is made, and logged.

use std::path::{Path, PathBuf};

use crate::RootfsError;

/// How a view was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ViewKind {
    Overlay,
    Copy,
}

/// A container's root filesystem. [`View::remove`] takes it down.
#[derive(Debug)]
pub struct View {
    /// The directory to give the container as its root.
    pub root: PathBuf,
    pub kind: ViewKind,
    pub(crate) dir: PathBuf,
}

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> RootfsError + '_ {
    move |source| RootfsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Makes a view of `image` in `dir` (created; it must not hold another view).
pub fn create_view(image: &Path, dir: &Path) -> Result<View, RootfsError> {
    let (upper, work, merged) = (dir.join("upper"), dir.join("work"), dir.join("merged"));
    for d in [&upper, &work, &merged] {
        std::fs::create_dir_all(d).map_err(io_at(d))?;
    }
    match overlay(image, &upper, &work, &merged) {
        Ok(()) => Ok(View {
            root: merged,
            kind: ViewKind::Overlay,
            dir: dir.to_path_buf(),
        }),
        Err(why) => {
            tracing::info!(image = %image.display(), %why, "overlayfs unavailable: copying the image for the container");
            copy_tree(image, &merged, 0)?;
            Ok(View {
                root: merged,
                kind: ViewKind::Copy,
                dir: dir.to_path_buf(),
            })
        }
    }
}

fn overlay(lower: &Path, upper: &Path, work: &Path, merged: &Path) -> Result<(), String> {
    let text = |p: &Path| {
        p.to_str()
            .map(str::to_string)
            .ok_or("a path that is not UTF-8")
    };
    let (l, u, w) = (text(lower)?, text(upper)?, text(work)?);
    // The option string separates with commas and colons; a path holding one would be
    // read as something else.
    if [&l, &u, &w].iter().any(|p| p.contains([',', ':', '\\'])) {
        return Err("a path with a comma, colon or backslash".into());
    }
    let data = std::ffi::CString::new(format!("lowerdir={l},upperdir={u},workdir={w}"))
        .map_err(|e| e.to_string())?;
    rustix::mount::mount(
        "overlay",
        merged,
        "overlay",
        rustix::mount::MountFlags::NODEV,
        Some(data.as_c_str()),
    )
    .map_err(|e| e.to_string())
}

impl View {
    /// Unmounts (an overlay) and deletes the view with everything the container wrote.
    pub fn remove(self) -> Result<(), RootfsError> {
        remove_view(&self.dir)
    }
}

/// Removes what [`create_view`] made in `dir`, even without its [`View`] (after a restart
/// of the node): unmounts an overlay left there, then deletes the directory.
pub fn remove_view(dir: &Path) -> Result<(), RootfsError> {
    let merged = dir.join("merged");
    // Not mounted (a copy, or already gone) is fine: EINVAL.
    let _ = rustix::mount::unmount(&merged, rustix::mount::UnmountFlags::DETACH);
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_at(dir)(e)),
    }
}

#[cfg(test)]
pub(crate) fn copy_tree_pub(from: &Path, to: &Path) -> Result<(), RootfsError> {
    copy_tree(from, to, 0)
}

/// Copies a tree, keeping symlinks as symlinks, owners and modes.
fn copy_tree(from: &Path, to: &Path, depth: usize) -> Result<(), RootfsError> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    if depth > 512 {
        return Err(io_at(from)(std::io::Error::other(
            "directory tree too deep",
        )));
    }
    for entry in std::fs::read_dir(from).map_err(io_at(from))? {
        let entry = entry.map_err(io_at(from))?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        let meta = std::fs::symlink_metadata(&src).map_err(io_at(&src))?;
        let ft = meta.file_type();
        if ft.is_symlink() {
            let target = std::fs::read_link(&src).map_err(io_at(&src))?;
            std::os::unix::fs::symlink(&target, &dst).map_err(io_at(&dst))?;
        } else if ft.is_dir() {
            std::fs::create_dir(&dst).map_err(io_at(&dst))?;
            copy_tree(&src, &dst, depth + 1)?;
        } else if ft.is_file() {
            std::fs::copy(&src, &dst).map_err(io_at(&dst))?;
        } else {
            // FIFOs and sockets are not content; devices are never unpacked.
            continue;
        }
        std::os::unix::fs::lchown(&dst, Some(meta.uid()), Some(meta.gid())).map_err(io_at(&dst))?;
        if !ft.is_symlink() {
            std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(meta.mode() & 0o7777))
                .map_err(io_at(&dst))?;
        }
    }
    Ok(())
}
