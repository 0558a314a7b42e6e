//! Linux container images from a real registry (Debian's docker-registry): pulled for the
//! node's platform from a manifest or an index, verified, cached and unpacked once; and
//! refused, with the reason, when they are for another platform, corrupt or hostile.

#[path = "support/registry.rs"]
mod registry;

use baton_oci::linux::node_platform;
use baton_oci::{Auth, Image, OciConfig, OciError, PullPolicy, Registry};
use registry::{Options, Registry as Server};
use serde_json::json;
use sha2::Digest;

fn sha(data: &[u8]) -> String {
    format!("sha256:{:x}", sha2::Sha256::digest(data))
}

/// A gzip'd tar layer of busybox with `sh` linked to it, as a tiny Linux image has.
fn busybox_layer() -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    let busybox = std::fs::read("/bin/busybox").expect("busybox-static is installed");
    let mut h = tar::Header::new_gnu();
    h.set_size(busybox.len() as u64);
    h.set_mode(0o755);
    h.set_entry_type(tar::EntryType::Regular);
    tar.append_data(&mut h, "bin/busybox", &busybox[..])
        .unwrap();
    let mut l = tar::Header::new_gnu();
    l.set_entry_type(tar::EntryType::Symlink);
    l.set_size(0);
    tar.append_link(&mut l, "bin/sh", "busybox").unwrap();
    gzip(&tar.into_inner().unwrap())
}

fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(data).unwrap();
    gz.finish().unwrap()
}

/// A tar of one file whose name is written raw (the tar crate refuses `..` itself).
fn raw_tar(name: &str, data: &[u8]) -> Vec<u8> {
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

fn config(arch: &str, layers: usize) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "architecture": arch,
        "os": "linux",
        "config": {"Cmd": ["sh"], "Env": ["PATH=/bin"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": vec!["sha256:0"; layers]},
    }))
    .unwrap()
}

/// Pushes an image manifest (and its blobs) as written here; returns its digest.
async fn push(server: &Server, name: &str, layers: &[(Vec<u8>, &str)], config: Vec<u8>) -> String {
    let oc = oci_client::Client::new(oci_client::client::ClientConfig {
        protocol: oci_client::client::ClientProtocol::Http,
        ..Default::default()
    });
    let r: oci_client::Reference = format!("{}/{name}", server.addr).parse().unwrap();
    oc.auth(
        &r,
        &oci_client::secrets::RegistryAuth::Anonymous,
        oci_client::RegistryOperation::Push,
    )
    .await
    .unwrap();
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

/// Pushes an index over manifests already pushed, each with its platform.
async fn push_index(server: &Server, name: &str, entries: &[(&str, &str)]) {
    let oc = oci_client::Client::new(oci_client::client::ClientConfig {
        protocol: oci_client::client::ClientProtocol::Http,
        ..Default::default()
    });
    let r: oci_client::Reference = format!("{}/{name}", server.addr).parse().unwrap();
    oc.auth(
        &r,
        &oci_client::secrets::RegistryAuth::Anonymous,
        oci_client::RegistryOperation::Push,
    )
    .await
    .unwrap();
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

fn client(server: &Server, cache: &std::path::Path) -> Registry {
    let mut cfg = OciConfig::new(cache.to_path_buf());
    cfg.insecure_registries = vec![server.addr.clone()];
    Registry::new(cfg).unwrap()
}

const GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_linux_image_is_pulled_for_the_node_cached_and_unpacked() {
    let server = Server::start(Options::default());
    let cache = tempfile::tempdir().unwrap();
    let reg = client(&server, cache.path());
    let (_, arch) = node_platform();
    let motd = zstd::encode_all(&raw_tar("etc/motd", b"hello from a layer")[..], 3).unwrap();
    let digest = push(
        &server,
        "library/busybox:1",
        &[(busybox_layer(), GZIP), (motd, ZSTD)],
        config(arch, 2),
    )
    .await;
    // An index whose other platform comes first: the node's is picked.
    push_index(
        &server,
        "library/busybox:multi",
        &[(&digest, "s390x"), (&digest, arch)],
    )
    .await;

    // Refused by a pull for components only, before anything is downloaded.
    let image = format!("{}/library/busybox:1", server.addr);
    let err = reg
        .pull(&image, &Auth::Anonymous, PullPolicy::Always, None)
        .await
        .unwrap_err();
    assert!(matches!(err, OciError::LinuxImage { .. }), "{err}");

    for tag in ["1", "multi"] {
        let image = format!("{}/library/busybox:{tag}", server.addr);
        let Image::Linux(img) = reg
            .pull_image(&image, &Auth::Anonymous, PullPolicy::IfNotPresent, None)
            .await
            .unwrap()
        else {
            panic!("not a Linux image")
        };
        assert_eq!(img.manifest_digest, digest);
        assert_eq!(img.layers.len(), 2);
        let cmd = img.config.config().as_ref().and_then(|c| c.cmd().clone());
        assert_eq!(cmd, Some(vec!["sh".to_string()]));
        let root = reg.rootfs(&img).unwrap();
        assert_eq!(
            std::fs::read_to_string(root.join("etc/motd")).unwrap(),
            "hello from a layer"
        );
        assert!(std::fs::read_link(root.join("bin/sh")).is_ok());
        // Unpacked once: the same directory for the second reference.
        assert_eq!(root, cache.path().join("rootfs").join(&digest[7..]));
    }
    // From the cache now, without the registry.
    drop(server);
    let Image::Linux(img) = reg
        .pull_image(&image, &Auth::Anonymous, PullPolicy::IfNotPresent, None)
        .await
        .unwrap()
    else {
        panic!("not a Linux image")
    };
    assert!(img.cached);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_platforms_corrupt_and_hostile_layers_are_refused() {
    let server = Server::start(Options::default());
    let cache = tempfile::tempdir().unwrap();
    let reg = client(&server, cache.path());
    let (_, arch) = node_platform();
    let other = if arch == "arm64" { "amd64" } else { "arm64" };

    // A single manifest for another architecture, and an index without the node's.
    let digest = push(
        &server,
        "x/other:1",
        &[(busybox_layer(), GZIP)],
        config(other, 1),
    )
    .await;
    push_index(
        &server,
        "x/other:multi",
        &[(&digest, other), (&digest, "s390x")],
    )
    .await;
    for tag in ["1", "multi"] {
        let err = reg
            .pull_image(
                &format!("{}/x/other:{tag}", server.addr),
                &Auth::Anonymous,
                PullPolicy::Always,
                None,
            )
            .await
            .unwrap_err();
        assert!(matches!(err, OciError::WrongPlatform { .. }), "{err}");
        let text = err.to_string();
        assert!(
            text.contains(&format!("linux/{arch}")) && text.contains(other),
            "{text}"
        );
    }

    // A layer that is not gzip: its digest is right, its content is not a tar.
    let garbage = b"this is not a gzip stream at all".to_vec();
    push(&server, "x/corrupt:1", &[(garbage, GZIP)], config(arch, 1)).await;
    let Image::Linux(img) = reg
        .pull_image(
            &format!("{}/x/corrupt:1", server.addr),
            &Auth::Anonymous,
            PullPolicy::Always,
            None,
        )
        .await
        .unwrap()
    else {
        panic!("not a Linux image")
    };
    let err = reg.rootfs(&img).unwrap_err();
    assert!(matches!(err, OciError::Unpack { .. }), "{err}");

    // A layer that writes `../` out of its root filesystem: refused, and nothing written.
    let hostile = gzip(&raw_tar("../../escaped", b"pwned"));
    push(&server, "x/hostile:1", &[(hostile, GZIP)], config(arch, 1)).await;
    let Image::Linux(img) = reg
        .pull_image(
            &format!("{}/x/hostile:1", server.addr),
            &Auth::Anonymous,
            PullPolicy::Always,
            None,
        )
        .await
        .unwrap()
    else {
        panic!("not a Linux image")
    };
    let err = reg.rootfs(&img).unwrap_err();
    let chain = format!("{err}: {}", std::error::Error::source(&err).unwrap());
    assert!(chain.contains("names a parent directory"), "{chain}");
    assert!(!cache.path().join("escaped").exists());
    assert!(!cache.path().join("rootfs/escaped").exists());
    let rootfs: Vec<_> = std::fs::read_dir(cache.path().join("rootfs"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        rootfs.is_empty(),
        "nothing half-unpacked is left: {rootfs:?}"
    );
}
