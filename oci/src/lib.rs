//! # baton-oci: Wasm components from OCI registries
//!
//! Wasm workloads travel as OCI artifacts. This crate pulls them (verifying every digest)
//! into a content-addressed cache on the node ([`cache`]), pushes them, and tells a Wasm
//! component from a Linux container image. It is built on `oci-client`, which speaks the
//! distribution protocol, including the registry token flow.
//!
//! ## What is a Wasm image
//! - The CNCF Wasm artifact: config `application/vnd.wasm.config.v0+json`, one
//!   `application/wasm` layer ([`push`] writes this).
//! - A single-layer image whose layer is a `.wasm` file (`application/wasm`,
//!   `application/vnd.wasm.content.layer.v1+wasm`, or a layer titled `*.wasm`).
//! - An image index: the entry for `wasi`/`wasm` is taken.
//!
//! ## Linux container images
//! An image with tar layers and an OCI or Docker image config is a Linux container image.
//! [`Registry::pull`] (for callers that run only components) refuses one with
//! [`OciError::LinuxImage`] before downloading it; [`Registry::pull_image`] pulls it for the
//! node's platform, and [`Registry::rootfs`] unpacks it (see [`linux`]).
//!
//! ## Guarantees
//! - Manifests and layers are checked against their digests and sizes before they enter
//!   the cache; a mismatch, a truncated download or a layer over the size cap leaves
//!   nothing behind.
//! - Concurrent pulls of one image download it once.

pub mod cache;
pub mod linux;

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use base64::Engine;
use futures::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::{self as m, OciDescriptor, OciImageManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

pub use cache::{Cache, Entry};
pub use linux::{LinuxImage, LinuxLayer};

/// The CNCF Wasm artifact's config media type.
pub const WASM_CONFIG_V0: &str = "application/vnd.wasm.config.v0+json";
/// The CNCF Wasm artifact's layer media type.
pub const WASM_LAYER: &str = "application/wasm";

/// Everything a pull or push can fail with; messages carry the registry's own words.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference { reference: String, reason: String },
    #[error("{reference}: unauthorized: {message}")]
    Unauthorized { reference: String, message: String },
    #[error("{reference}: not found: {message}")]
    NotFound { reference: String, message: String },
    /// The registry refused, in its own words.
    #[error("{reference}: registry error: {message}")]
    Registry { reference: String, message: String },
    /// The client failed before the registry could say anything (connection, TLS,
    /// protocol).
    #[error("{reference}: pull failed")]
    Client {
        reference: String,
        #[source]
        source: oci_client::errors::OciDistributionError,
    },
    #[error("{reference}: downloading {digest}")]
    Download {
        reference: String,
        digest: String,
        #[source]
        source: std::io::Error,
    },
    #[error("setting up the registry client")]
    ClientSetup(#[source] oci_client::errors::OciDistributionError),
    #[error("digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch { expected: String, actual: String },
    #[error("{digest}: truncated: expected {expected} bytes, got {got}")]
    Truncated {
        digest: String,
        expected: u64,
        got: u64,
    },
    #[error("{digest}: layer of {size} bytes is over the {limit}-byte limit")]
    TooLarge {
        digest: String,
        size: u64,
        limit: u64,
    },
    #[error("{reference} is not a Wasm component: {reason}")]
    NotWasm { reference: String, reason: String },
    #[error("{reference} is a Linux container image; this node runs Wasm components only")]
    LinuxImage { reference: String },
    #[error("{reference} has no image for this node's platform {node} (found: {found})")]
    WrongPlatform {
        reference: String,
        node: String,
        found: String,
    },
    #[error("{reference}: unpacking its layers")]
    Unpack {
        reference: String,
        #[source]
        source: baton_rootfs::RootfsError,
    },
    #[error("{reference}: bad manifest: {reason}")]
    Manifest { reference: String, reason: String },
    #[error("{reference} is not on this node and its pull policy is Never")]
    NeverPull { reference: String },
    #[error("I/O error on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Registry credentials.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Auth {
    #[default]
    Anonymous,
    Basic {
        username: String,
        password: String,
    },
}

impl Auth {
    fn registry_auth(&self) -> RegistryAuth {
        match self {
            Auth::Anonymous => RegistryAuth::Anonymous,
            Auth::Basic { username, password } => {
                RegistryAuth::Basic(username.clone(), password.clone())
            }
        }
    }

    /// The credentials for `registry` in a `.dockerconfigjson` (a
    /// `kubernetes.io/dockerconfigjson` Secret's data), if it has some.
    pub fn from_docker_config(json: &[u8], registry: &str) -> Option<Auth> {
        let v: Value = serde_json::from_slice(json).ok()?;
        let auths = v.get("auths")?.as_object()?;
        let entry = auths.iter().find_map(|(k, e)| {
            let host = k
                .trim_start_matches("https://")
                .trim_start_matches("http://")
                .split('/')
                .next()
                .unwrap_or("");
            (host == registry).then_some(e)
        })?;
        if let (Some(u), Some(p)) = (
            entry.get("username").and_then(Value::as_str),
            entry.get("password").and_then(Value::as_str),
        ) {
            return Some(Auth::Basic {
                username: u.into(),
                password: p.into(),
            });
        }
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(entry.get("auth")?.as_str()?)
            .ok()?;
        let text = String::from_utf8(decoded).ok()?;
        let (u, p) = text.split_once(':')?;
        Some(Auth::Basic {
            username: u.into(),
            password: p.into(),
        })
    }
}

/// `imagePullPolicy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

/// How the node reaches registries and how much it keeps.
#[derive(Clone, Debug)]
pub struct OciConfig {
    pub cache_dir: PathBuf,
    /// Registries (`host:port`) reached over plain HTTP; only these.
    pub insecure_registries: Vec<String>,
    /// Extra CA certificates (PEM) trusted for registries.
    pub extra_ca_pem: Vec<Vec<u8>>,
    /// Largest Wasm layer accepted.
    pub max_layer_bytes: u64,
    /// Largest Linux image accepted, its layers' compressed sizes summed.
    pub max_image_bytes: u64,
    /// Largest root filesystem a Linux image may unpack to.
    pub max_unpacked_bytes: u64,
}

impl OciConfig {
    pub fn new(cache_dir: PathBuf) -> Self {
        Self {
            cache_dir,
            insecure_registries: Vec::new(),
            extra_ca_pem: Vec::new(),
            max_layer_bytes: 256 << 20,
            max_image_bytes: linux::DEFAULT_MAX_IMAGE_BYTES,
            max_unpacked_bytes: 2 * linux::DEFAULT_MAX_IMAGE_BYTES,
        }
    }
}

/// A component in the cache.
#[derive(Clone, Debug)]
pub struct Pulled {
    pub manifest_digest: String,
    pub layer_digest: String,
    pub path: PathBuf,
    pub size: u64,
    /// Whether it was already on the node.
    pub cached: bool,
}

/// What a pull found: a component, or a Linux container image.
#[derive(Clone, Debug)]
pub enum Image {
    Wasm(Pulled),
    Linux(Box<LinuxImage>),
}

/// Progress of a transfer: (bytes so far, total bytes).
pub type Progress<'a> = &'a (dyn Fn(u64, u64) + Send + Sync);

/// Pulls and pushes; one per node. Cheap to share behind an `Arc`.
pub struct Registry {
    cache: Cache,
    cfg: OciConfig,
    /// One lock per image being pulled, so that concurrent pulls of it download once.
    inflight: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("cfg", &self.cfg).finish()
    }
}

fn reg_error(reference: &str, e: OciDistributionError) -> OciError {
    let reference = reference.to_string();
    match e {
        OciDistributionError::UnauthorizedError { url } => OciError::Unauthorized {
            reference,
            message: format!("{url} answered 401"),
        },
        OciDistributionError::AuthenticationFailure(message) => {
            OciError::Unauthorized { reference, message }
        }
        OciDistributionError::RegistryError { envelope, .. } => {
            let message = envelope
                .errors
                .iter()
                .map(|e| e.message.clone())
                .collect::<Vec<_>>()
                .join("; ");
            let code = envelope.errors.first().map(|e| &e.code);
            match code {
                Some(
                    OciErrorCode::ManifestUnknown
                    | OciErrorCode::BlobUnknown
                    | OciErrorCode::NameUnknown
                    | OciErrorCode::NotFound,
                ) => OciError::NotFound { reference, message },
                Some(OciErrorCode::Unauthorized | OciErrorCode::Denied) => {
                    OciError::Unauthorized { reference, message }
                }
                _ => OciError::Registry { reference, message },
            }
        }
        OciDistributionError::ServerError {
            code: 401 | 403,
            message,
            ..
        } => OciError::Unauthorized { reference, message },
        OciDistributionError::ServerError {
            code: 404, message, ..
        } => OciError::NotFound { reference, message },
        OciDistributionError::DigestError(d) => OciError::DigestMismatch {
            expected: reference,
            actual: d.to_string(),
        },
        other => OciError::Client {
            reference,
            source: other,
        },
    }
}

/// Which layer of an image manifest (its JSON, as a registry serves it) is the component:
/// its digest, or why there is none. The manifest is untrusted input.
pub fn component_layer(reference: &str, manifest_json: &[u8]) -> Result<String, OciError> {
    let manifest: OciImageManifest =
        serde_json::from_slice(manifest_json).map_err(|e| OciError::Manifest {
            reference: reference.into(),
            reason: e.to_string(),
        })?;
    wasm_layer(reference, &manifest).map(|d| d.digest)
}

/// Which layer of an image manifest is the component, or why there is none.
fn wasm_layer(reference: &str, manifest: &OciImageManifest) -> Result<OciDescriptor, OciError> {
    let is_wasm = |d: &OciDescriptor| {
        d.media_type == WASM_LAYER
            || d.media_type == m::WASM_LAYER_MEDIA_TYPE
            || d.media_type.ends_with("+wasm")
            || d.annotations
                .as_ref()
                .and_then(|a| a.get("org.opencontainers.image.title"))
                .is_some_and(|t| t.ends_with(".wasm"))
    };
    if let Some(l) = manifest.layers.iter().find(|l| is_wasm(l)) {
        return Ok(l.clone());
    }
    let config = manifest.config.media_type.as_str();
    let tar = |t: &str| t.contains(".tar") || t.contains("rootfs.diff");
    if config == m::IMAGE_CONFIG_MEDIA_TYPE
        || config == m::IMAGE_DOCKER_CONFIG_MEDIA_TYPE
        || manifest.layers.iter().any(|l| tar(&l.media_type))
    {
        return Err(OciError::LinuxImage {
            reference: reference.into(),
        });
    }
    Err(OciError::NotWasm {
        reference: reference.into(),
        reason: format!(
            "no Wasm layer (layer types: [{}])",
            manifest
                .layers
                .iter()
                .map(|l| l.media_type.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    })
}

impl Registry {
    pub fn new(cfg: OciConfig) -> Result<Self, OciError> {
        // reqwest under oci-client uses rustls with the process's crypto provider.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let reg = Self {
            cache: Cache::open(&cfg.cache_dir)?,
            cfg,
            inflight: Mutex::default(),
        };
        reg.client()?;
        Ok(reg)
    }

    /// A distribution client. One per operation: oci-client keeps the first credentials
    /// it sees per registry, and a node pulls for pods with different secrets.
    fn client(&self) -> Result<Client, OciError> {
        let protocol = if self.cfg.insecure_registries.is_empty() {
            ClientProtocol::Https
        } else {
            ClientProtocol::HttpsExcept(self.cfg.insecure_registries.clone())
        };
        let client_cfg = ClientConfig {
            protocol,
            extra_root_certificates: self
                .cfg
                .extra_ca_pem
                .iter()
                .map(|pem| oci_client::client::Certificate {
                    encoding: oci_client::client::CertificateEncoding::Pem,
                    data: pem.clone(),
                })
                .collect(),
            ..Default::default()
        };
        Client::try_from(client_cfg).map_err(OciError::ClientSetup)
    }

    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    fn parse(image: &str) -> Result<Reference, OciError> {
        image
            .parse()
            .map_err(|e: oci_client::ParseError| OciError::InvalidReference {
                reference: image.into(),
                reason: e.to_string(),
            })
    }

    /// Whether the cache holds an image by this reference: what a pull with
    /// `IfNotPresent` would find without asking the registry.
    pub fn has(&self, image: &str) -> bool {
        Self::parse(image).is_ok_and(|r| self.cache.get_ref(&r.whole()).is_some())
    }

    /// Pulls a component (or finds it in the cache, per `policy`). A Linux container
    /// image is refused before its layers are downloaded.
    pub async fn pull(
        &self,
        image: &str,
        auth: &Auth,
        policy: PullPolicy,
        progress: Option<Progress<'_>>,
    ) -> Result<Pulled, OciError> {
        match self.fetch(image, auth, policy, progress, false).await? {
            Image::Wasm(p) => Ok(p),
            Image::Linux(_) => Err(OciError::LinuxImage {
                reference: image.into(),
            }),
        }
    }

    /// Pulls a component or a Linux container image for the node's platform.
    pub async fn pull_image(
        &self,
        image: &str,
        auth: &Auth,
        policy: PullPolicy,
        progress: Option<Progress<'_>>,
    ) -> Result<Image, OciError> {
        self.fetch(image, auth, policy, progress, true).await
    }

    async fn fetch(
        &self,
        image: &str,
        auth: &Auth,
        policy: PullPolicy,
        progress: Option<Progress<'_>>,
        linux: bool,
    ) -> Result<Image, OciError> {
        let reference = Self::parse(image)?;
        let key = reference.whole();
        let lock = {
            let mut map = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
            map.entry(key.clone()).or_default().clone()
        };
        let _guard = lock.lock().await;
        if policy != PullPolicy::Always {
            if let Some(found) = self.cached_image(&key, linux)? {
                return Ok(found);
            }
            if policy == PullPolicy::Never {
                return Err(OciError::NeverPull { reference: key });
            }
        }
        let auth = auth.registry_auth();
        let client = self.client()?;
        let accepted = [
            m::OCI_IMAGE_MEDIA_TYPE,
            m::OCI_IMAGE_INDEX_MEDIA_TYPE,
            m::IMAGE_MANIFEST_MEDIA_TYPE,
            m::IMAGE_MANIFEST_LIST_MEDIA_TYPE,
        ];
        let (raw, mut digest) = client
            .pull_manifest_raw(&reference, &auth, &accepted)
            .await
            .map_err(|e| reg_error(&key, e))?;
        let mut raw = raw.to_vec();
        let actual = cache::sha256(&raw);
        if let Some(want) = reference.digest() {
            if actual != want {
                return Err(OciError::DigestMismatch {
                    expected: want.into(),
                    actual,
                });
            }
        }
        let mut doc: Value = serde_json::from_slice(&raw).map_err(|e| OciError::Manifest {
            reference: key.clone(),
            reason: e.to_string(),
        })?;
        // An index: its Wasm entry, or the Linux one for this node.
        if doc.get("manifests").is_some() {
            let entries = doc["manifests"].as_array().cloned().unwrap_or_default();
            let child = linux::pick_from_index(&key, &entries, linux)?;
            let child_ref = reference.clone_with_digest(child.clone());
            let (bytes, _) = client
                .pull_manifest_raw(&child_ref, &auth, &accepted)
                .await
                .map_err(|e| reg_error(&key, e))?;
            raw = bytes.to_vec();
            let actual = cache::sha256(&raw);
            if actual != child {
                return Err(OciError::DigestMismatch {
                    expected: child,
                    actual,
                });
            }
            digest = child;
            doc = serde_json::from_slice(&raw).map_err(|e| OciError::Manifest {
                reference: key.clone(),
                reason: e.to_string(),
            })?;
        }
        if cache::sha256(&raw) != digest {
            return Err(OciError::DigestMismatch {
                expected: digest,
                actual: cache::sha256(&raw),
            });
        }
        let manifest: OciImageManifest =
            serde_json::from_value(doc).map_err(|e| OciError::Manifest {
                reference: key.clone(),
                reason: e.to_string(),
            })?;
        let layer = match wasm_layer(&key, &manifest) {
            Ok(layer) => layer,
            Err(OciError::LinuxImage { .. }) if linux => {
                let image = self
                    .fetch_linux(&client, &reference, &digest, &manifest, progress)
                    .await?;
                self.cache.put_blob(&digest, &raw)?;
                self.cache.set_ref(&key, &digest, &image.config_digest)?;
                return Ok(Image::Linux(Box::new(image)));
            }
            Err(e) => return Err(e),
        };
        let size = u64::try_from(layer.size).unwrap_or(0);
        if size > self.cfg.max_layer_bytes {
            return Err(OciError::TooLarge {
                digest: layer.digest.clone(),
                size,
                limit: self.cfg.max_layer_bytes,
            });
        }
        let was_cached = self.cache.has_blob(&layer.digest);
        if !was_cached {
            self.download(
                &client,
                &reference,
                &layer,
                self.cfg.max_layer_bytes,
                true,
                progress,
            )
            .await?;
        }
        self.cache.put_blob(&digest, &raw)?;
        self.cache.set_ref(&key, &digest, &layer.digest)?;
        self.pulled(digest, layer.digest, was_cached)
            .map(Image::Wasm)
    }

    /// What the cache holds for a reference, if all of it is there.
    fn cached_image(&self, key: &str, linux: bool) -> Result<Option<Image>, OciError> {
        let Some((manifest_digest, second)) = self.cache.get_ref(key) else {
            return Ok(None);
        };
        let manifest: Option<OciImageManifest> = self
            .cache
            .blob_path(&manifest_digest)
            .and_then(|p| std::fs::read(p).ok())
            .and_then(|raw| serde_json::from_slice(&raw).ok());
        // References written before Linux images were pulled name a Wasm layer second,
        // and may predate the manifest being kept: those are components.
        let is_config = manifest.as_ref().is_some_and(|m| {
            m.config.digest == second && !m.layers.iter().any(|l| l.digest == second)
        });
        if !is_config {
            return self
                .pulled(manifest_digest, second, true)
                .map(|p| Some(Image::Wasm(p)));
        }
        if !linux {
            return Err(OciError::LinuxImage {
                reference: key.into(),
            });
        }
        let Some(manifest) = manifest else {
            return Ok(None);
        };
        let config = match self.cached_config(key, &second)? {
            Some(c) => c,
            None => return Ok(None),
        };
        let layers = match self.linux_layers(key, &manifest) {
            Ok(l) if l.iter().all(|l| l.path.exists()) => l,
            _ => return Ok(None),
        };
        Ok(Some(Image::Linux(Box::new(LinuxImage {
            manifest_digest,
            config_digest: second,
            config,
            layers,
            cached: true,
        }))))
    }

    fn cached_config(
        &self,
        key: &str,
        digest: &str,
    ) -> Result<Option<oci_spec::image::ImageConfiguration>, OciError> {
        let Some(raw) = self
            .cache
            .blob_path(digest)
            .and_then(|p| std::fs::read(p).ok())
        else {
            return Ok(None);
        };
        serde_json::from_slice(&raw)
            .map(Some)
            .map_err(|e| OciError::Manifest {
                reference: key.into(),
                reason: format!("image config: {e}"),
            })
    }

    /// A Linux image's layers as cache paths, each with its compression.
    fn linux_layers(
        &self,
        key: &str,
        manifest: &OciImageManifest,
    ) -> Result<Vec<LinuxLayer>, OciError> {
        manifest
            .layers
            .iter()
            .map(|l| {
                let compression = baton_rootfs::Compression::of_media_type(&l.media_type)
                    .ok_or_else(|| OciError::Manifest {
                        reference: key.into(),
                        reason: format!(
                            "layer {} has an unsupported media type {:?}",
                            l.digest, l.media_type
                        ),
                    })?;
                let path = self
                    .cache
                    .blob_path(&l.digest)
                    .ok_or_else(|| OciError::Manifest {
                        reference: key.into(),
                        reason: format!("layer digest {:?} is not sha256", l.digest),
                    })?;
                Ok(LinuxLayer {
                    digest: l.digest.clone(),
                    compression,
                    path,
                })
            })
            .collect()
    }

    /// Downloads a Linux image's config and layers, checking its platform and sizes first.
    async fn fetch_linux(
        &self,
        client: &Client,
        reference: &Reference,
        manifest_digest: &str,
        manifest: &OciImageManifest,
        progress: Option<Progress<'_>>,
    ) -> Result<LinuxImage, OciError> {
        let key = reference.whole();
        let layers = self.linux_layers(&key, manifest)?;
        let total: u64 = manifest
            .layers
            .iter()
            .map(|l| u64::try_from(l.size).unwrap_or(u64::MAX))
            .fold(0, u64::saturating_add);
        if total > self.cfg.max_image_bytes {
            return Err(OciError::TooLarge {
                digest: manifest_digest.into(),
                size: total,
                limit: self.cfg.max_image_bytes,
            });
        }
        let config_desc = &manifest.config;
        if u64::try_from(config_desc.size).unwrap_or(u64::MAX) > linux::MAX_CONFIG_BYTES {
            return Err(OciError::TooLarge {
                digest: config_desc.digest.clone(),
                size: u64::try_from(config_desc.size).unwrap_or(u64::MAX),
                limit: linux::MAX_CONFIG_BYTES,
            });
        }
        if !self.cache.has_blob(&config_desc.digest) {
            self.download(
                client,
                reference,
                config_desc,
                linux::MAX_CONFIG_BYTES,
                false,
                None,
            )
            .await?;
        }
        let config = self
            .cached_config(&key, &config_desc.digest)?
            .ok_or_else(|| OciError::Manifest {
                reference: key.clone(),
                reason: "its image config vanished from the cache".into(),
            })?;
        linux::check_platform(&key, &config)?;
        let mut cached = true;
        for (desc, layer) in manifest.layers.iter().zip(&layers) {
            if !layer.path.exists() {
                cached = false;
                self.download(
                    client,
                    reference,
                    desc,
                    self.cfg.max_image_bytes,
                    false,
                    progress,
                )
                .await?;
            }
        }
        Ok(LinuxImage {
            manifest_digest: manifest_digest.into(),
            config_digest: config_desc.digest.clone(),
            config,
            layers,
            cached,
        })
    }

    fn pulled(&self, manifest: String, layer: String, cached: bool) -> Result<Pulled, OciError> {
        let path = self
            .cache
            .blob_path(&layer)
            .ok_or_else(|| OciError::Manifest {
                reference: layer.clone(),
                reason: "not a sha256 digest".into(),
            })?;
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        Ok(Pulled {
            manifest_digest: manifest,
            layer_digest: layer,
            path,
            size,
            cached,
        })
    }

    /// Streams a blob into the cache, checking its size (against the manifest's and
    /// `max`), its digest and, for a component, that it is Wasm.
    async fn download(
        &self,
        client: &Client,
        reference: &Reference,
        layer: &OciDescriptor,
        max: u64,
        wasm: bool,
        progress: Option<Progress<'_>>,
    ) -> Result<(), OciError> {
        let expected = u64::try_from(layer.size).unwrap_or(0);
        let key = reference.whole();
        let mut stream = client
            .pull_blob_stream(reference, layer)
            .await
            .map_err(|e| reg_error(&key, e))?;
        let (tmp, mut file) = self.cache.temp_file()?;
        let cleanup = |e: OciError| {
            let _ = std::fs::remove_file(&tmp);
            e
        };
        let mut hasher = Sha256::new();
        let mut got: u64 = 0;
        let mut head: Vec<u8> = Vec::new();
        let mut last_report = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                // oci-client checks the digest at the end of the stream itself; ours below
                // says the same with both digests, so only other errors stop here.
                Err(e)
                    if e.get_ref()
                        .is_some_and(|inner| inner.is::<oci_client::errors::DigestError>()) =>
                {
                    break
                }
                Err(e) => {
                    return Err(cleanup(OciError::Download {
                        reference: key.clone(),
                        digest: layer.digest.clone(),
                        source: e,
                    }))
                }
            };
            got += chunk.len() as u64;
            if got > expected || got > max {
                return Err(cleanup(OciError::TooLarge {
                    digest: layer.digest.clone(),
                    size: got,
                    limit: expected.min(max),
                }));
            }
            if head.len() < 8 {
                head.extend_from_slice(&chunk[..chunk.len().min(8 - head.len())]);
            }
            hasher.update(&chunk);
            file.write_all(&chunk).map_err(|source| {
                cleanup(OciError::Io {
                    path: tmp.clone(),
                    source,
                })
            })?;
            if let Some(p) = progress {
                if got - last_report > expected / 20 || got == expected {
                    p(got, expected);
                    last_report = got;
                }
            }
        }
        if got != expected {
            return Err(cleanup(OciError::Truncated {
                digest: layer.digest.clone(),
                expected,
                got,
            }));
        }
        let actual = format!("sha256:{:x}", hasher.finalize());
        if actual != layer.digest {
            return Err(cleanup(OciError::DigestMismatch {
                expected: layer.digest.clone(),
                actual,
            }));
        }
        if wasm && !head.starts_with(b"\0asm") {
            return Err(cleanup(OciError::NotWasm {
                reference: key,
                reason: format!(
                    "layer {} does not start with the Wasm magic bytes",
                    layer.digest
                ),
            }));
        }
        file.sync_all().map_err(|source| {
            cleanup(OciError::Io {
                path: tmp.clone(),
                source,
            })
        })?;
        self.cache.commit(&tmp, &layer.digest).map_err(cleanup)?;
        Ok(())
    }

    /// Pushes a component as a CNCF Wasm artifact; returns the manifest digest. The layer
    /// goes up in 1 MiB chunks, each reported to `progress`.
    pub async fn push(
        &self,
        wasm: &[u8],
        title: &str,
        image: &str,
        auth: &Auth,
        progress: Option<Progress<'_>>,
    ) -> Result<String, OciError> {
        let reference = Self::parse(image)?;
        let key = reference.whole();
        if !wasm.starts_with(b"\0asm") {
            return Err(OciError::NotWasm {
                reference: title.into(),
                reason: "the file does not start with the Wasm magic bytes".into(),
            });
        }
        let layer_digest = cache::sha256(wasm);
        let layer = ImageLayer::new(
            Vec::new(),
            WASM_LAYER.into(),
            Some(BTreeMap::from([(
                "org.opencontainers.image.title".to_string(),
                title.to_string(),
            )])),
        );
        let config = json!({
            "architecture": "wasm",
            "os": "wasip2",
            "layerDigests": [layer_digest],
        });
        let config = Config::new(
            serde_json::to_vec(&config).unwrap_or_default(),
            WASM_CONFIG_V0.into(),
            None,
        );
        let mut manifest = OciImageManifest::build(std::slice::from_ref(&layer), &config, None);
        manifest.media_type = Some(m::OCI_IMAGE_MEDIA_TYPE.into());
        // The manifest was built from an empty placeholder layer; it names the real one.
        if let Some(l) = manifest.layers.first_mut() {
            l.digest = layer_digest.clone();
            l.size = wasm.len() as i64;
        }
        let err = |e| reg_error(&key, e);
        let client = self.client()?;
        client
            .auth(
                &reference,
                &auth.registry_auth(),
                oci_client::RegistryOperation::Push,
            )
            .await
            .map_err(err)?;
        // The layer, streamed, with its progress sent back to this task.
        let total = wasm.len() as u64;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
        let chunks: Vec<bytes::Bytes> = wasm
            .chunks(1 << 20)
            .map(bytes::Bytes::copy_from_slice)
            .collect();
        let mut sent = 0u64;
        let stream = futures::stream::iter(chunks.into_iter().map(move |c| {
            sent += c.len() as u64;
            let _ = tx.send(sent);
            Ok(c)
        }));
        let upload = client.push_blob_stream(&reference, stream, &layer_digest, Some(total));
        tokio::pin!(upload);
        let uploaded = loop {
            tokio::select! {
                r = &mut upload => break r,
                Some(done) = rx.recv() => {
                    if let Some(p) = progress {
                        p(done, total);
                    }
                }
            }
        };
        uploaded.map_err(err)?;
        client
            .push_blob(&reference, config.data.clone(), &manifest.config.digest)
            .await
            .map_err(err)?;
        client
            .push_manifest(&reference, &manifest.into())
            .await
            .map_err(err)?;
        client
            .fetch_manifest_digest(&reference, &auth.registry_auth())
            .await
            .map_err(|e| reg_error(&key, e))
    }
}

/// A file's name, for the layer title of a pushed component.
pub fn title_of(path: &Path) -> String {
    path.file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("component.wasm")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_config_credentials() {
        let basic = base64::engine::general_purpose::STANDARD.encode("alice:s3cret");
        let cfg = json!({"auths": {"127.0.0.1:5000": {"auth": basic}, "https://r.example": {"username": "bob", "password": "pw"}}});
        let bytes = serde_json::to_vec(&cfg).unwrap();
        assert_eq!(
            Auth::from_docker_config(&bytes, "127.0.0.1:5000"),
            Some(Auth::Basic {
                username: "alice".into(),
                password: "s3cret".into()
            })
        );
        assert_eq!(
            Auth::from_docker_config(&bytes, "r.example"),
            Some(Auth::Basic {
                username: "bob".into(),
                password: "pw".into()
            })
        );
        assert_eq!(Auth::from_docker_config(&bytes, "other:1"), None);
    }

    #[test]
    fn wasm_and_linux_images_are_told_apart() {
        let desc = |t: &str| OciDescriptor {
            media_type: t.into(),
            digest: "sha256:x".into(),
            size: 1,
            ..Default::default()
        };
        let mut man = OciImageManifest {
            config: desc(WASM_CONFIG_V0),
            layers: vec![desc(WASM_LAYER)],
            ..Default::default()
        };
        assert!(wasm_layer("r", &man).is_ok());
        man.config = desc(m::IMAGE_CONFIG_MEDIA_TYPE);
        man.layers = vec![desc(m::IMAGE_LAYER_GZIP_MEDIA_TYPE)];
        assert!(matches!(
            wasm_layer("r", &man),
            Err(OciError::LinuxImage { .. })
        ));
        man.config = desc("application/vnd.example.config+json");
        man.layers = vec![desc("text/plain")];
        assert!(matches!(
            wasm_layer("r", &man),
            Err(OciError::NotWasm { .. })
        ));
    }
}
