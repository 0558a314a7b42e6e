//! The node's content-addressed store of pulled artifacts.
//!
//! ```text
//! CACHE/blobs/sha256/HEX       verified content (manifests, configs and layers)
//! CACHE/refs/ESCAPED-REFERENCE  "MANIFEST-DIGEST LAYER-DIGEST" for a tag or digest pulled
//!                               (a Linux image's config digest stands for its layer)
//! CACHE/rootfs/HEX              a Linux image's unpacked root filesystem, by manifest
//! CACHE/tmp/                    downloads in progress; emptied at open
//! ```
//!
//! Content is written to `tmp/`, checked, synced and renamed into place, so a crash or a
//! bad download never leaves a half-written blob where a reader could find it.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use sha2::{Digest, Sha256};

use crate::OciError;

/// A blob or reference in the cache, as `baton images` lists it.
#[derive(Debug, Clone)]
pub struct Entry {
    pub reference: String,
    pub manifest: String,
    pub layer: String,
    pub size: u64,
}

/// The cache directory.
#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> OciError + '_ {
    move |source| OciError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// `sha256:HEX` split and checked.
fn hex_of(digest: &str) -> Option<&str> {
    let hex = digest.strip_prefix("sha256:")?;
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then_some(hex)
}

pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(data))
}

impl Cache {
    pub fn open(root: &Path) -> Result<Self, OciError> {
        for d in ["blobs/sha256", "refs", "tmp"] {
            let p = root.join(d);
            std::fs::create_dir_all(&p).map_err(io(&p))?;
        }
        // Leftovers of interrupted downloads.
        let tmp = root.join("tmp");
        for e in std::fs::read_dir(&tmp).map_err(io(&tmp))?.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    /// The cache's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a blob lives once verified.
    pub fn blob_path(&self, digest: &str) -> Option<PathBuf> {
        hex_of(digest).map(|h| self.root.join("blobs/sha256").join(h))
    }

    pub fn has_blob(&self, digest: &str) -> bool {
        self.blob_path(digest).is_some_and(|p| p.exists())
    }

    /// A file to download into, removed unless [`Cache::commit`] takes it.
    pub fn temp_file(&self) -> Result<(PathBuf, std::fs::File), OciError> {
        let name = format!(
            "{}-{}",
            std::process::id(),
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos()
        );
        let p = self.root.join("tmp").join(name);
        let f = std::fs::File::create(&p).map_err(io(&p))?;
        Ok((p, f))
    }

    /// Moves a checked download into place under its digest.
    pub fn commit(&self, tmp: &Path, digest: &str) -> Result<PathBuf, OciError> {
        let dest = self.blob_path(digest).ok_or_else(|| OciError::Manifest {
            reference: digest.into(),
            reason: "not a sha256 digest".into(),
        })?;
        std::fs::rename(tmp, &dest).map_err(io(&dest))?;
        Ok(dest)
    }

    /// Stores small content (a manifest) under its digest, verifying it.
    pub fn put_blob(&self, digest: &str, data: &[u8]) -> Result<PathBuf, OciError> {
        let actual = sha256(data);
        if actual != digest {
            return Err(OciError::DigestMismatch {
                expected: digest.into(),
                actual,
            });
        }
        if let Some(p) = self.blob_path(digest).filter(|p| p.exists()) {
            return Ok(p);
        }
        let (tmp, mut f) = self.temp_file()?;
        f.write_all(data)
            .and_then(|_| f.sync_all())
            .map_err(io(&tmp))?;
        self.commit(&tmp, digest)
    }

    fn ref_path(&self, reference: &str) -> PathBuf {
        let escaped: String = reference
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        self.root.join("refs").join(format!(
            "{escaped}-{}",
            &sha256(reference.as_bytes())[7..19]
        ))
    }

    /// Remembers what a reference resolved to.
    pub fn set_ref(&self, reference: &str, manifest: &str, layer: &str) -> Result<(), OciError> {
        let p = self.ref_path(reference);
        let (tmp, mut f) = self.temp_file()?;
        f.write_all(format!("{manifest} {layer} {reference}\n").as_bytes())
            .and_then(|_| f.sync_all())
            .map_err(io(&tmp))?;
        std::fs::rename(&tmp, &p).map_err(io(&p))
    }

    /// What a reference resolved to last, if its layer is still here.
    pub fn get_ref(&self, reference: &str) -> Option<(String, String)> {
        let text = std::fs::read_to_string(self.ref_path(reference)).ok()?;
        let mut f = text.split_whitespace();
        let (m, l) = (f.next()?.to_string(), f.next()?.to_string());
        self.has_blob(&l).then_some((m, l))
    }

    /// Every reference pulled, with its layer's size.
    pub fn list(&self) -> Vec<Entry> {
        let mut out: Vec<Entry> = std::fs::read_dir(self.root.join("refs"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let text = std::fs::read_to_string(e.path()).ok()?;
                let mut f = text.split_whitespace();
                let (manifest, layer, reference) = (f.next()?, f.next()?, f.next()?);
                let size = self.blob_path(layer)?.metadata().ok()?.len();
                Some(Entry {
                    reference: reference.into(),
                    manifest: manifest.into(),
                    layer: layer.into(),
                    size,
                })
            })
            .collect();
        out.sort_by(|a, b| a.reference.cmp(&b.reference));
        out
    }

    /// Removes blobs nobody references (`keep`: digests in use) oldest first until the
    /// cache is under `max_bytes`; references to removed blobs go too. Returns the bytes
    /// freed.
    pub fn gc(&self, max_bytes: u64, keep: &HashSet<String>) -> u64 {
        let dir = self.root.join("blobs/sha256");
        let mut blobs: Vec<(SystemTime, u64, String, PathBuf)> = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let m = e.metadata().ok()?;
                let name = e.file_name().to_str()?.to_string();
                Some((
                    m.modified().ok()?,
                    m.len(),
                    format!("sha256:{name}"),
                    e.path(),
                ))
            })
            .collect();
        let mut total: u64 = blobs.iter().map(|b| b.1).sum();
        blobs.sort();
        let mut freed = 0;
        for (_, size, digest, path) in blobs {
            if total <= max_bytes {
                break;
            }
            if keep.contains(&digest) {
                continue;
            }
            if std::fs::remove_file(&path).is_ok() {
                total -= size;
                freed += size;
            }
        }
        for e in std::fs::read_dir(self.root.join("refs"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            let layer = text.split_whitespace().nth(1).unwrap_or("");
            if !self.has_blob(layer) {
                let _ = std::fs::remove_file(e.path());
            }
        }
        // An unpacked root filesystem goes with its image's manifest: while a pod uses the
        // image, the node keeps the manifest (and so the tree its containers' views stand
        // on).
        for e in std::fs::read_dir(self.root.join("rootfs"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with('.') || self.has_blob(&format!("sha256:{name}")) {
                continue;
            }
            if std::fs::remove_dir_all(e.path()).is_ok() {
                tracing::info!(image = %name, "removed an unpacked image whose manifest is gone");
            }
        }
        freed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_are_checked_and_collected() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let data = b"\0asm component";
        let d = sha256(data);
        assert!(matches!(
            cache.put_blob(&sha256(b"other"), data),
            Err(OciError::DigestMismatch { .. })
        ));
        assert!(!cache.has_blob(&sha256(b"other")));
        cache.put_blob(&d, data).unwrap();
        cache.set_ref("r.io/a:1", "sha256:m", &d).unwrap();
        assert_eq!(cache.get_ref("r.io/a:1").unwrap().1, d);
        assert_eq!(cache.list().len(), 1);
        // Referenced: kept even over the bound; unreferenced: collected.
        assert_eq!(cache.gc(0, &HashSet::from([d.clone()])), 0);
        assert_eq!(cache.gc(0, &HashSet::new()), data.len() as u64);
        assert!(cache.get_ref("r.io/a:1").is_none());
        assert!(cache.list().is_empty());
    }

    #[test]
    fn an_unpacked_image_goes_with_its_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let manifest = br#"{"schemaVersion":2}"#;
        let d = sha256(manifest);
        cache.put_blob(&d, manifest).unwrap();
        let rootfs = dir.path().join("rootfs").join(&d[7..]);
        std::fs::create_dir_all(rootfs.join("bin")).unwrap();
        // In use: kept.
        cache.gc(0, &HashSet::from([d.clone()]));
        assert!(rootfs.exists());
        // Unused: the manifest goes, and the tree with it.
        cache.gc(0, &HashSet::new());
        assert!(!rootfs.exists());
    }
}
