//! The on-disk cache of compiled components, so a node restart does not recompile.
//!
//! A compiled component is valid only for the engine configuration that compiled it, so
//! the key is a SHA-256 of the component's bytes and of the engine's compatibility hash:
//! stable across builds of Baton, unlike std's `DefaultHasher`, and changed by any
//! wasmtime upgrade or setting that would make old code unusable.
//!
//! Entries are written to a temporary file and renamed into place, so a reader never sees
//! half a file, and the cache is kept under [`MAX_CACHE_BYTES`] by dropping the entries
//! least recently used (a hit touches its entry's modification time).

// Loading precompiled code is unsafe in wasmtime: the bytes are trusted to be what this
// engine produced. Only this module does it, and only for files it wrote itself.
#![allow(unsafe_code)]

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use sha2::{Digest, Sha256};
use wasmtime::component::Component;
use wasmtime::Engine;

use crate::error::{chain, ShimError};

/// The compiled code of all components together is kept under this size.
pub const MAX_CACHE_BYTES: u64 = 2 << 30;

/// Feeds what `Hash` writes into a SHA-256.
struct ShaHasher(Sha256);

impl Hasher for ShaHasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    fn finish(&self) -> u64 {
        unreachable!("the digest is taken with finalize")
    }
}

fn key(engine: &Engine, wasm: &[u8]) -> String {
    let mut h = ShaHasher(Sha256::new());
    h.0.update(Sha256::digest(wasm));
    engine.precompile_compatibility_hash().hash(&mut h);
    h.0.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Drops the least recently used entries until the cache is under `max` bytes.
fn evict(dir: &Path, max: u64) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut files: Vec<(SystemTime, u64, PathBuf)> = entries
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "cwasm"))
        .filter_map(|e| {
            let m = e.metadata().ok()?;
            Some((m.modified().ok()?, m.len(), e.path()))
        })
        .collect();
    let mut total: u64 = files.iter().map(|f| f.1).sum();
    files.sort();
    for (_, len, path) in files {
        if total <= max {
            break;
        }
        if std::fs::remove_file(&path).is_ok() {
            total -= len;
        }
    }
}

/// Compiles a component, or loads the compiled form from `cache_dir`; says which (true:
/// from the cache).
pub(crate) fn load(
    engine: &Engine,
    wasm: &[u8],
    source: &Path,
    cache_dir: Option<&Path>,
) -> Result<(Component, bool), ShimError> {
    let invalid = |e: wasmtime::Error| ShimError::InvalidComponent {
        path: source.to_path_buf(),
        reason: chain(&e),
    };
    // Only the binary format: wasmtime would otherwise parse text (WAT), and its parse
    // errors quote the offending line, which for a file that is not Wasm at all means
    // echoing the file's contents into an error a pod's reader sees.
    if !wasm.starts_with(b"\0asm") {
        return Err(ShimError::InvalidComponent {
            path: source.to_path_buf(),
            reason: "not a WebAssembly binary (it does not start with the \\0asm magic)".into(),
        });
    }
    let Some(dir) = cache_dir else {
        return Component::from_binary(engine, wasm)
            .map(|c| (c, false))
            .map_err(invalid);
    };
    let path: PathBuf = dir.join(format!("{}.cwasm", key(engine, wasm)));
    if path.exists() {
        // SAFETY: the file was written by `serialize` below, for an engine with this
        // compatibility hash (it is in the name), and lives in our private cache dir.
        match unsafe { Component::deserialize_file(engine, &path) } {
            Ok(c) => {
                // Recently used: the last to be evicted.
                if let Ok(f) = std::fs::File::options().write(true).open(&path) {
                    let _ = f.set_modified(SystemTime::now());
                }
                return Ok((c, true));
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %chain(&e), "discarding an unreadable cache entry")
            }
        }
    }
    let component = Component::from_binary(engine, wasm).map_err(invalid)?;
    let io = |source| ShimError::Io {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let bytes = component
        .serialize()
        .map_err(|e| ShimError::Setup(chain(&e)))?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
    std::io::Write::write_all(&mut tmp, &bytes).map_err(io)?;
    tmp.persist(&path).map_err(|e| io(e.error))?;
    evict(dir, MAX_CACHE_BYTES);
    Ok((component, false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_least_recently_used_entries_go_first() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = SystemTime::now() - std::time::Duration::from_secs(100);
        for (i, name) in ["old", "mid", "new"].iter().enumerate() {
            let p = dir.path().join(format!("{name}.cwasm"));
            std::fs::write(&p, [0u8; 10]).unwrap();
            let f = std::fs::File::options().write(true).open(&p).unwrap();
            f.set_modified(t0 + std::time::Duration::from_secs(i as u64 * 10))
                .unwrap();
        }
        std::fs::write(dir.path().join("other.txt"), [0u8; 100]).unwrap();
        evict(dir.path(), 20);
        let left: std::collections::BTreeSet<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            left,
            ["mid.cwasm", "new.cwasm", "other.txt"]
                .map(String::from)
                .into()
        );
    }

    #[test]
    fn the_key_is_stable_and_depends_on_the_bytes() {
        let engine = Engine::default();
        assert_eq!(key(&engine, b"a"), key(&engine, b"a"));
        assert_ne!(key(&engine, b"a"), key(&engine, b"b"));
        assert_eq!(key(&engine, b"a").len(), 64);
    }
}
