//! Linux images built by tests: Debian's busybox-static packed into an OCI image, and
//! layers written raw (as an attacker would), pushed as they are to a test registry.
#![allow(dead_code)]

use serde_json::json;
use sha2::Digest;

pub const GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

pub fn sha(data: &[u8]) -> String {
    format!("sha256:{:x}", sha2::Sha256::digest(data))
}

/// The applets the busybox image links, as a tiny Linux image would.
pub const APPLETS: &[&str] = &[
    "sh", "echo", "cat", "sleep", "dd", "id", "ls", "nc", "httpd", "wget", "hostname", "true",
    "grep", "touch", "env", "ip", "nslookup", "tty", "stty", "ps",
];

/// A gzip'd tar layer of busybox with its applets linked to it.
pub fn busybox_layer() -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    let busybox = std::fs::read("/bin/busybox").expect("busybox-static is installed");
    let mut h = tar::Header::new_gnu();
    h.set_size(busybox.len() as u64);
    h.set_mode(0o755);
    h.set_entry_type(tar::EntryType::Regular);
    tar.append_data(&mut h, "bin/busybox", &busybox[..])
        .unwrap();
    for applet in APPLETS {
        let mut l = tar::Header::new_gnu();
        l.set_entry_type(tar::EntryType::Symlink);
        l.set_size(0);
        tar.append_link(&mut l, format!("bin/{applet}"), "busybox")
            .unwrap();
    }
    let mut tmp = tar::Header::new_gnu();
    tmp.set_entry_type(tar::EntryType::Directory);
    tmp.set_mode(0o1777);
    tmp.set_size(0);
    tar.append_data(&mut tmp, "tmp/", &[][..]).unwrap();
    gzip(&tar.into_inner().unwrap())
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(data).unwrap();
    gz.finish().unwrap()
}

/// A tar of one file whose name is written raw (the tar crate refuses `..` itself).
pub fn raw_tar(name: &str, data: &[u8]) -> Vec<u8> {
    let mut h = tar::Header::new_gnu();
    h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    let mut tar = tar::Builder::new(Vec::new());
    tar.append(&h, data).unwrap();
    tar.into_inner().unwrap()
}

/// An image config for `linux/ARCH` with `Cmd: [sh]`, naming the uncompressed digest of
/// each of `layers` (a layer that does not decompress gets its raw digest).
pub fn config(arch: &str, layers: &[(Vec<u8>, &str)]) -> Vec<u8> {
    let diff_ids: Vec<String> = layers
        .iter()
        .map(|(data, media)| {
            let plain = match *media {
                GZIP => {
                    use std::io::Read;
                    let mut out = Vec::new();
                    flate2::read::GzDecoder::new(&data[..])
                        .read_to_end(&mut out)
                        .map(|_| out)
                        .ok()
                }
                ZSTD => zstd::decode_all(&data[..]).ok(),
                _ => None,
            };
            sha(plain.as_deref().unwrap_or(data))
        })
        .collect();
    config_with_diff_ids(arch, &diff_ids)
}

/// An image config for `linux/ARCH` with `Cmd: [sh]` that names `diff_ids`.
pub fn config_with_diff_ids(arch: &str, diff_ids: &[String]) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "architecture": arch,
        "os": "linux",
        "config": {"Cmd": ["sh"], "Env": ["PATH=/bin", "FROM_IMAGE=yes"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap()
}

/// A plain-HTTP client, authorized to push to `REGISTRY/NAME`, and that reference.
async fn pusher(registry: &str, name: &str) -> (oci_client::Client, oci_client::Reference) {
    let oc = oci_client::Client::new(oci_client::client::ClientConfig {
        protocol: oci_client::client::ClientProtocol::Http,
        ..Default::default()
    });
    let r: oci_client::Reference = format!("{registry}/{name}").parse().unwrap();
    oc.auth(
        &r,
        &oci_client::secrets::RegistryAuth::Anonymous,
        oci_client::RegistryOperation::Push,
    )
    .await
    .unwrap();
    (oc, r)
}

/// Pushes an image manifest (and its blobs) as written here to `REGISTRY/NAME`; returns
/// its digest.
pub async fn push(
    registry: &str,
    name: &str,
    layers: &[(Vec<u8>, &str)],
    config: Vec<u8>,
) -> String {
    let (oc, r) = pusher(registry, name).await;
    for (data, _) in layers {
        oc.push_blob(&r, data.clone(), &sha(data)).await.unwrap();
    }
    oc.push_blob(&r, config.clone(), &sha(&config))
        .await
        .unwrap();
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(&config), "size": config.len()},
        "layers": layers.iter().map(|(d, t)| json!({"mediaType": t, "digest": sha(d), "size": d.len()})).collect::<Vec<_>>(),
    });
    let body = serde_json::to_vec(&manifest).unwrap();
    oc.push_manifest_raw(
        &r,
        body.clone(),
        http::HeaderValue::from_static("application/vnd.oci.image.manifest.v1+json"),
    )
    .await
    .unwrap();
    sha(&body)
}

/// Pushes an index over manifests already pushed, each with its architecture.
pub async fn push_index(registry: &str, name: &str, entries: &[(&str, &str)]) {
    let (oc, r) = pusher(registry, name).await;
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": entries.iter().map(|(digest, arch)| json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest,
            "size": 1,
            "platform": {"os": "linux", "architecture": arch},
        })).collect::<Vec<_>>(),
    });
    oc.push_manifest_raw(
        &r,
        serde_json::to_vec(&index).unwrap(),
        http::HeaderValue::from_static("application/vnd.oci.image.index.v1+json"),
    )
    .await
    .unwrap();
}

/// The node's architecture as images name it.
pub fn node_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}
