//! From a container's `image` to a loaded component.
//!
//! Until registry pulls arrive (the OCI issue), an image is a path on the node: an
//! absolute path to a `.wasm` file, or `file:///path`. Loaded components are kept in
//! memory by path and modification time, so a hundred replicas load once.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use baton_wasm_shim::Component;
use baton_wasm_shim::{Runtime, ShimError};

/// Why an image could not be had; `reason` is the container's waiting reason.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image {0:?} is not a path on the node (file:///… or /…); pulling from registries is not supported yet")]
    NotLocal(String),
    #[error("image {path}: {source}")]
    Missing {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("image {image} is not a runnable Wasm component: {source}")]
    Invalid {
        image: String,
        #[source]
        source: ShimError,
    },
}

impl ImageError {
    /// The container waiting reason Kubernetes shows for this failure.
    pub fn reason(&self) -> &'static str {
        match self {
            ImageError::NotLocal(_) | ImageError::Missing { .. } => "ErrImagePull",
            ImageError::Invalid { .. } => "CreateContainerError",
        }
    }
}

/// Components by path, loaded once.
pub struct Images {
    runtime: Runtime,
    loaded: Mutex<HashMap<PathBuf, (SystemTime, Component)>>,
}

impl std::fmt::Debug for Images {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Images").finish_non_exhaustive()
    }
}

/// The node path an image names, if it names one.
pub fn local_path(image: &str) -> Option<PathBuf> {
    let p = image.strip_prefix("file://").unwrap_or(image);
    Path::new(p).is_absolute().then(|| PathBuf::from(p))
}

impl Images {
    pub fn new(runtime: Runtime) -> Self {
        Self {
            runtime,
            loaded: Mutex::default(),
        }
    }

    pub fn load(&self, image: &str) -> Result<Component, ImageError> {
        let path = local_path(image).ok_or_else(|| ImageError::NotLocal(image.to_string()))?;
        let mtime = std::fs::metadata(&path)
            .and_then(|m| m.modified())
            .map_err(|source| ImageError::Missing {
                path: path.clone(),
                source,
            })?;
        {
            let loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((t, c)) = loaded.get(&path) {
                if *t == mtime {
                    return Ok(c.clone());
                }
            }
        }
        let c = self
            .runtime
            .load_file(&path)
            .map_err(|source| ImageError::Invalid {
                image: image.to_string(),
                source,
            })?;
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        loaded.insert(path, (mtime, c.clone()));
        Ok(c)
    }
}
