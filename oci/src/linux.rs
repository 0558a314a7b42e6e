//! Linux container images: which one of an index the node runs, what a pulled one holds,
//! and its root filesystem.
//!
//! An image is pulled for the node's own platform (`linux` and its architecture, as Go
//! names it), from an OCI image index or a Docker manifest list, or as a single manifest
//! whose config says the same; any other platform is refused with the platforms found.
//! Its layers are verified blobs in the cache like a component's. Its root filesystem is
//! unpacked once per image, by `baton-rootfs`, into `CACHE/rootfs/HEX` (the manifest's
//! digest), and shared read-only by every container of the image: each container writes
//! to a layer of its own, which is the runtime's job.

use std::path::PathBuf;

use oci_spec::image::ImageConfiguration;
use serde_json::Value;

use crate::{OciError, Registry};

/// The node's platform as image indexes name it: (`os`, `architecture`).
pub fn node_platform() -> (&'static str, &'static str) {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        "loongarch64" => "loong64",
        other => other,
    };
    ("linux", arch)
}

/// Layers of a Linux image over this many bytes in all (compressed) are refused.
pub const DEFAULT_MAX_IMAGE_BYTES: u64 = 4 << 30;
/// An image config is a small JSON document.
pub(crate) const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// A pulled Linux container image.
#[derive(Clone, Debug)]
pub struct LinuxImage {
    pub manifest_digest: String,
    pub config_digest: String,
    pub config: ImageConfiguration,
    /// Bottom first.
    pub layers: Vec<LinuxLayer>,
    /// Whether it was already on the node.
    pub cached: bool,
}

/// One verified layer blob in the cache.
#[derive(Clone, Debug)]
pub struct LinuxLayer {
    pub digest: String,
    pub compression: baton_rootfs::Compression,
    pub path: PathBuf,
}

impl LinuxImage {
    /// Every blob it is made of, for the cache's collector to keep.
    pub fn digests(&self) -> Vec<String> {
        let mut out = vec![self.manifest_digest.clone(), self.config_digest.clone()];
        out.extend(self.layers.iter().map(|l| l.digest.clone()));
        out
    }
}

/// `os/architecture[/variant]` of an index entry.
fn platform_of(entry: &Value) -> String {
    let field = |k: &str| {
        entry
            .pointer(&format!("/platform/{k}"))
            .and_then(Value::as_str)
    };
    let mut p = format!(
        "{}/{}",
        field("os").unwrap_or("?"),
        field("architecture").unwrap_or("?")
    );
    if let Some(v) = field("variant") {
        p = format!("{p}/{v}");
    }
    p
}

/// Which entry of an image index the node pulls: a Wasm one first, else the Linux one for
/// its platform. Returns its digest, or why there is none.
pub(crate) fn pick_from_index(
    reference: &str,
    entries: &[Value],
    linux: bool,
) -> Result<String, OciError> {
    let digest = |e: &Value| e.get("digest").and_then(Value::as_str).map(str::to_string);
    fn os(e: &Value) -> &str {
        e.pointer("/platform/os")
            .and_then(Value::as_str)
            .unwrap_or("")
    }
    fn arch(e: &Value) -> &str {
        e.pointer("/platform/architecture")
            .and_then(Value::as_str)
            .unwrap_or("")
    }
    if let Some(d) = entries
        .iter()
        .find(|e| os(e).starts_with("wasi") || arch(e) == "wasm")
        .and_then(digest)
    {
        return Ok(d);
    }
    let linux_entries: Vec<&Value> = entries.iter().filter(|e| os(e) == "linux").collect();
    if linux_entries.is_empty() {
        return Err(OciError::NotWasm {
            reference: reference.into(),
            reason: "the image index has no wasi/wasm entry".into(),
        });
    }
    if !linux {
        return Err(OciError::LinuxImage {
            reference: reference.into(),
        });
    }
    let (_, node_arch) = node_platform();
    linux_entries
        .iter()
        .find(|e| arch(e) == node_arch)
        .and_then(|e| digest(e))
        .ok_or_else(|| OciError::WrongPlatform {
            reference: reference.into(),
            node: format!("linux/{node_arch}"),
            found: linux_entries
                .iter()
                .map(|e| platform_of(e))
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// Checks that an image config is for the node's platform.
pub(crate) fn check_platform(reference: &str, config: &ImageConfiguration) -> Result<(), OciError> {
    let (node_os, node_arch) = node_platform();
    let (os, arch) = (config.os().to_string(), config.architecture().to_string());
    if os != node_os || arch != node_arch {
        return Err(OciError::WrongPlatform {
            reference: reference.into(),
            node: format!("{node_os}/{node_arch}"),
            found: format!("{os}/{arch}"),
        });
    }
    Ok(())
}

impl Registry {
    /// The image's root filesystem, unpacked on first use and shared read-only after.
    /// Blocking (it may write gigabytes): call it off the async threads.
    pub fn rootfs(&self, image: &LinuxImage) -> Result<PathBuf, OciError> {
        let hex = image
            .manifest_digest
            .strip_prefix("sha256:")
            .unwrap_or(&image.manifest_digest);
        let dest = self.cache.root().join("rootfs").join(hex);
        if dest.is_dir() {
            return Ok(dest);
        }
        // Each layer must unpack to the content its config names.
        let diff_ids = image.config.rootfs().diff_ids();
        if diff_ids.len() != image.layers.len() {
            return Err(OciError::Unpack {
                reference: image.manifest_digest.clone(),
                source: baton_rootfs::RootfsError::DiffId {
                    layer: diff_ids.len().min(image.layers.len()),
                    expected: format!("{} layers (rootfs.diff_ids)", diff_ids.len()),
                    found: format!("{} layers in the manifest", image.layers.len()),
                },
            });
        }
        let mut readers = Vec::with_capacity(image.layers.len());
        for (l, diff_id) in image.layers.iter().zip(diff_ids) {
            let f = std::fs::File::open(&l.path).map_err(|source| OciError::Io {
                path: l.path.clone(),
                source,
            })?;
            readers.push((
                std::io::BufReader::new(f),
                l.compression,
                Some(diff_id.clone()),
            ));
        }
        let limits = baton_rootfs::Limits {
            max_bytes: self.cfg.max_unpacked_bytes,
            ..Default::default()
        };
        let started = std::time::Instant::now();
        match baton_rootfs::unpack_image_verified(&dest, readers, limits) {
            Ok(stats) => {
                tracing::info!(
                    image = %image.manifest_digest,
                    entries = stats.entries,
                    bytes = stats.bytes,
                    skipped_devices = stats.skipped_devices,
                    took_ms = started.elapsed().as_millis() as u64,
                    "unpacked a root filesystem"
                );
                Ok(dest)
            }
            // Another pull of the same image unpacked it first.
            Err(_) if dest.is_dir() => Ok(dest),
            Err(source) => Err(OciError::Unpack {
                reference: image.manifest_digest.clone(),
                source,
            }),
        }
    }
}
