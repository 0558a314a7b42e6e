//! From a container's `image` to a loaded component.
//!
//! An image is an OCI reference (pulled through [`baton_oci::Registry`] into the node's
//! content-addressed cache, per `imagePullPolicy` and with `imagePullSecrets`), or a path
//! on the node: an absolute path to a `.wasm` file, or `file:///path`. Loaded components
//! are kept in memory by path and modification time, so a hundred replicas load once.
//!
//! Paths on the node are a development convenience, and a pod spec is untrusted input:
//! a path is served only if it resolves (symlinks followed) to a file under one of the
//! directories the node was told to serve local images from (`--local-images`), and no
//! such directory is set by default. Loading runs on a blocking thread with a timeout,
//! reads a regular file only and at most the size cap, and a failure names the file,
//! never its contents.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use baton_wasm_shim::Component;
use baton_wasm_shim::{Runtime, ShimError};

/// Why an image could not be had; `reason` is the container's waiting reason.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Pull(#[from] baton_oci::OciError),
    #[error("{image}: this node pulls no images")]
    NoRegistry { image: String },
    #[error("image {path}")]
    Missing {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("image {image} refused: {why}")]
    Refused { image: String, why: String },
    #[error("image {image} is a Linux container image, and this node has no runc to run it (install runc)")]
    NoRuntime { image: String },
    #[error("image {image} is not a runnable Wasm component")]
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
            ImageError::Pull(baton_oci::OciError::InvalidReference { .. }) => "InvalidImageName",
            ImageError::Pull(baton_oci::OciError::NeverPull { .. }) => "ErrImageNeverPull",
            ImageError::Pull(_)
            | ImageError::Missing { .. }
            | ImageError::Refused { .. }
            | ImageError::NoRegistry { .. } => "ErrImagePull",
            ImageError::Invalid { .. } | ImageError::NoRuntime { .. } => "CreateContainerError",
        }
    }
}

/// How long reading and compiling one component may take.
const LOAD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// How many images a node's status lists, as the kubelet's `nodeStatusMaxImages`.
pub const MAX_NODE_IMAGES: usize = 50;

/// One image in the node's status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeImage {
    /// The references it was pulled as, in their full form (`registry/repo:tag`).
    pub names: Vec<String>,
    pub size_bytes: u64,
}

/// Components by path, loaded once.
pub struct Images {
    runtime: Runtime,
    registry: Option<Arc<baton_oci::Registry>>,
    /// Directories node paths may name images in; empty refuses every node path.
    local_dirs: Vec<PathBuf>,
    loaded: Mutex<HashMap<PathBuf, (SystemTime, Component)>>,
    /// One load at a time per file: the pods of a Deployment that start together wait
    /// for the first one's compile instead of each compiling the same component.
    loading: Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>,
    /// Layer digests in use, per pod UID: what the cache's collection must keep.
    in_use: Mutex<HashMap<String, Vec<String>>>,
}

/// A loaded component and where it came from.
#[derive(Clone)]
pub struct Image {
    pub component: Component,
    /// The layer digest of a pulled image (for the container's imageID).
    pub digest: Option<String>,
    /// Whether a registry transfer happened.
    pub pulled: bool,
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image")
            .field("digest", &self.digest)
            .field("pulled", &self.pulled)
            .finish_non_exhaustive()
    }
}

/// A component, or a Linux container image ready to run.
#[derive(Debug)]
pub enum AnyImage {
    Wasm(Image),
    Linux {
        image: Arc<crate::linux::LinuxImage>,
        /// Whether a registry transfer happened.
        pulled: bool,
    },
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
    pub fn new(
        runtime: Runtime,
        registry: Option<Arc<baton_oci::Registry>>,
        local_dirs: Vec<PathBuf>,
    ) -> Self {
        Self {
            runtime,
            registry,
            local_dirs,
            loaded: Mutex::default(),
            loading: Mutex::default(),
            in_use: Mutex::default(),
        }
    }

    /// Records that pod `uid` uses a layer, so the cache keeps it.
    pub fn hold(&self, uid: &str, digest: &str) {
        let mut m = self.in_use.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(uid.to_string())
            .or_default()
            .push(digest.to_string());
    }

    /// Pod `uid` is gone: its layers may be collected.
    pub fn release(&self, uid: &str) {
        self.in_use
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(uid);
    }

    /// Trims the image cache to `max_bytes` of layers no pod holds; returns bytes freed.
    pub fn collect(&self, max_bytes: u64) -> u64 {
        let Some(registry) = &self.registry else {
            return 0;
        };
        let keep: std::collections::HashSet<String> = self
            .in_use
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .flatten()
            .cloned()
            .collect();
        registry.cache().gc(max_bytes, &keep)
    }

    /// The images the node holds, as its status reports them (`status.images`): each
    /// pulled component by the references it was pulled as, the biggest first, at most
    /// [`MAX_NODE_IMAGES`] (the kubelet's `nodeStatusMaxImages`). The scheduler prefers
    /// nodes that hold a pod's images.
    pub fn node_images(&self) -> Vec<NodeImage> {
        let Some(registry) = &self.registry else {
            return Vec::new();
        };
        let mut by_layer: HashMap<String, NodeImage> = HashMap::new();
        for e in registry.cache().list() {
            let image = by_layer.entry(e.layer).or_insert_with(|| NodeImage {
                names: Vec::new(),
                size_bytes: e.size,
            });
            image.names.push(e.reference);
        }
        let mut out: Vec<NodeImage> = by_layer.into_values().collect();
        for i in &mut out {
            i.names.sort();
        }
        out.sort_by(|a, b| b.size_bytes.cmp(&a.size_bytes).then(a.names.cmp(&b.names)));
        out.truncate(MAX_NODE_IMAGES);
        out
    }

    pub fn registry(&self) -> Option<&Arc<baton_oci::Registry>> {
        self.registry.as_ref()
    }

    /// Whether an image is on the node already: a node path, or in the pull cache.
    pub fn present(&self, image: &str) -> bool {
        local_path(image).is_some() || self.registry.as_ref().is_some_and(|r| r.has(image))
    }

    /// The component an image names: a node path, or pulled from its registry.
    pub async fn get(
        &self,
        image: &str,
        auth: &baton_oci::Auth,
        policy: baton_oci::PullPolicy,
    ) -> Result<Image, ImageError> {
        if let Some(path) = local_path(image) {
            let path = self.local_file(image, &path)?;
            return Ok(Image {
                component: self.load(image, path).await?,
                digest: None,
                pulled: false,
            });
        }
        let pulled = self
            .registry_for(image)?
            .pull(image, auth, policy, None)
            .await?;
        self.pulled_component(image, pulled).await
    }

    /// The node's registry client, or why an image cannot be pulled.
    fn registry_for(&self, image: &str) -> Result<&Arc<baton_oci::Registry>, ImageError> {
        self.registry
            .as_ref()
            .ok_or_else(|| ImageError::NoRegistry {
                image: image.into(),
            })
    }

    /// A pulled component, loaded.
    async fn pulled_component(
        &self,
        image: &str,
        pulled: baton_oci::Pulled,
    ) -> Result<Image, ImageError> {
        Ok(Image {
            component: self.load(image, pulled.path.clone()).await?,
            digest: Some(pulled.layer_digest),
            pulled: !pulled.cached,
        })
    }

    /// What an image names, component or Linux container image (pulled, verified and
    /// unpacked). For nodes that run OCI containers; [`Images::get`] takes components only.
    pub async fn get_any(
        &self,
        image: &str,
        auth: &baton_oci::Auth,
        policy: baton_oci::PullPolicy,
    ) -> Result<AnyImage, ImageError> {
        if local_path(image).is_some() {
            return self.get(image, auth, policy).await.map(AnyImage::Wasm);
        }
        let registry = self.registry_for(image)?;
        match registry.pull_image(image, auth, policy, None).await? {
            baton_oci::Image::Wasm(pulled) => self
                .pulled_component(image, pulled)
                .await
                .map(AnyImage::Wasm),
            baton_oci::Image::Linux(linux) => {
                let (reg, img) = (registry.clone(), linux.clone());
                let rootfs = tokio::task::spawn_blocking(move || reg.rootfs(&img))
                    .await
                    .map_err(|e| ImageError::Refused {
                        image: image.into(),
                        why: format!("unpacking stopped: {e}"),
                    })??;
                Ok(AnyImage::Linux {
                    pulled: !linux.cached,
                    image: Arc::new(crate::linux::LinuxImage {
                        image: linux,
                        rootfs,
                    }),
                })
            }
        }
    }

    /// The file a node-path image names, if it is one the node serves.
    fn local_file(&self, image: &str, path: &Path) -> Result<PathBuf, ImageError> {
        let refused = |why: &str| ImageError::Refused {
            image: image.into(),
            why: why.into(),
        };
        if self.local_dirs.is_empty() {
            return Err(refused(
                "this node serves no images from its own files (see `--local-images`); use an OCI reference",
            ));
        }
        let real = path.canonicalize().map_err(|source| ImageError::Missing {
            path: path.to_path_buf(),
            source,
        })?;
        let inside = self
            .local_dirs
            .iter()
            .any(|d| d.canonicalize().is_ok_and(|d| real.starts_with(d)));
        if !inside {
            return Err(refused(
                "it is not in a directory this node serves local images from",
            ));
        }
        Ok(real)
    }

    /// Loads a component from a node file, off the async workers and within
    /// [`LOAD_TIMEOUT`]; the same file with the same modification time loads once.
    async fn load(&self, image: &str, path: PathBuf) -> Result<Component, ImageError> {
        let mtime = std::fs::symlink_metadata(&path)
            .and_then(|m| m.modified())
            .map_err(|source| ImageError::Missing {
                path: path.clone(),
                source,
            })?;
        let gate = self
            .loading
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(path.clone())
            .or_default()
            .clone();
        let _one_at_a_time = gate.lock().await;
        {
            let loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((t, c)) = loaded.get(&path) {
                if *t == mtime {
                    return Ok(c.clone());
                }
            }
        }
        let invalid = |source| ImageError::Invalid {
            image: image.to_string(),
            source,
        };
        let runtime = self.runtime.clone();
        let p = path.clone();
        let task = tokio::task::spawn_blocking(move || runtime.load_file(&p));
        let c = match tokio::time::timeout(LOAD_TIMEOUT, task).await {
            Ok(Ok(r)) => r.map_err(invalid)?,
            Ok(Err(e)) => return Err(invalid(ShimError::Setup(format!("loading failed: {e}")))),
            Err(_) => {
                return Err(invalid(ShimError::Setup(format!(
                    "loading took longer than {}s",
                    LOAD_TIMEOUT.as_secs()
                ))))
            }
        };
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        loaded.insert(path, (mtime, c.clone()));
        Ok(c)
    }
}
