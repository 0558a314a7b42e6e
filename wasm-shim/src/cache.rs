//! The on-disk cache of compiled components, so a node restart does not recompile.
//!
//! A compiled component is valid only for the engine configuration that compiled it, so
//! the key is the component's content digest and the engine's compatibility hash.

// Loading precompiled code is unsafe in wasmtime: the bytes are trusted to be what this
// engine produced. Only this module does it, and only for files it wrote itself.
#![allow(unsafe_code)]

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::component::Component;
use wasmtime::Engine;

use crate::error::{chain, ShimError};

fn key(engine: &Engine, wasm: &[u8]) -> String {
    let digest = Sha256::digest(wasm);
    let mut h = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut h);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("{hex}-{:016x}", h.finish())
}

/// Compiles a component, or loads the compiled form from `cache_dir`.
pub(crate) fn load(
    engine: &Engine,
    wasm: &[u8],
    source: &Path,
    cache_dir: Option<&Path>,
) -> Result<Component, ShimError> {
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
        return Component::from_binary(engine, wasm).map_err(invalid);
    };
    let path: PathBuf = dir.join(format!("{}.cwasm", key(engine, wasm)));
    if path.exists() {
        // SAFETY: the file was written by `serialize` below, for an engine with this
        // compatibility hash (it is in the name), and lives in our private cache dir.
        match unsafe { Component::deserialize_file(engine, &path) } {
            Ok(c) => return Ok(c),
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
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)?;
    Ok(component)
}
