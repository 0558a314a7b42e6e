//! Linux container images from a real registry (Debian's docker-registry): pulled for the
//! node's platform from a manifest or an index, verified, cached and unpacked once; and
//! refused, with the reason, when they are for another platform, corrupt or hostile.

#[path = "support/images.rs"]
mod images;
#[path = "support/registry.rs"]
mod registry;

use baton_oci::linux::node_platform;
use baton_oci::{Auth, Image, OciConfig, OciError, PullPolicy, Registry};
use images::{busybox_layer, config, gzip, raw_tar, GZIP, ZSTD};
use registry::{Options, Registry as Server};

fn client(server: &Server, cache: &std::path::Path) -> Registry {
    let mut cfg = OciConfig::new(cache.to_path_buf());
    cfg.insecure_registries = vec![server.addr.clone()];
    Registry::new(cfg).unwrap()
}

/// Pulls `image`, which must be a Linux image.
async fn pull_linux(reg: &Registry, image: &str) -> Box<baton_oci::LinuxImage> {
    match reg
        .pull_image(image, &Auth::Anonymous, PullPolicy::Always, None)
        .await
        .unwrap()
    {
        Image::Linux(img) => img,
        Image::Wasm(_) => panic!("{image} is not a Linux image"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_linux_image_is_pulled_for_the_node_cached_and_unpacked() {
    let server = Server::start(Options::default());
    let cache = tempfile::tempdir().unwrap();
    let reg = client(&server, cache.path());
    let (_, arch) = node_platform();
    let motd = zstd::encode_all(&raw_tar("etc/motd", b"hello from a layer")[..], 3).unwrap();
    let layers = [(busybox_layer(), GZIP), (motd, ZSTD)];
    let digest = images::push(
        &server.addr,
        "library/busybox:1",
        &layers,
        config(arch, &layers),
    )
    .await;
    // An index whose other platform comes first: the node's is picked.
    images::push_index(
        &server.addr,
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
    let layers = [(busybox_layer(), GZIP)];
    let digest = images::push(&server.addr, "x/other:1", &layers, config(other, &layers)).await;
    images::push_index(
        &server.addr,
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
    let garbage = [(b"this is not a gzip stream at all".to_vec(), GZIP)];
    images::push(
        &server.addr,
        "x/corrupt:1",
        &garbage,
        config(arch, &garbage),
    )
    .await;
    let img = pull_linux(&reg, &format!("{}/x/corrupt:1", server.addr)).await;
    let err = reg.rootfs(&img).unwrap_err();
    assert!(matches!(err, OciError::Unpack { .. }), "{err}");

    // A layer whose content is not the one its config names (its blob digest is right):
    // refused with both digests.
    let layers = [(busybox_layer(), GZIP)];
    let wrong = images::sha(b"some other tar");
    images::push(
        &server.addr,
        "x/swapped:1",
        &layers,
        images::config_with_diff_ids(arch, std::slice::from_ref(&wrong)),
    )
    .await;
    let img = pull_linux(&reg, &format!("{}/x/swapped:1", server.addr)).await;
    let err = reg.rootfs(&img).unwrap_err();
    let chain = format!("{err}: {}", std::error::Error::source(&err).unwrap());
    assert!(
        chain.contains(&wrong) && chain.contains("unpacks to sha256:"),
        "{chain}"
    );
    // And a config with fewer diff_ids than the manifest has layers.
    images::push(
        &server.addr,
        "x/short:1",
        &layers,
        images::config_with_diff_ids(arch, &[]),
    )
    .await;
    let img = pull_linux(&reg, &format!("{}/x/short:1", server.addr)).await;
    assert!(reg.rootfs(&img).is_err());

    // A layer that writes `../` out of its root filesystem: refused, and nothing written.
    let hostile = [(gzip(&raw_tar("../../escaped", b"pwned")), GZIP)];
    images::push(
        &server.addr,
        "x/hostile:1",
        &hostile,
        config(arch, &hostile),
    )
    .await;
    let img = pull_linux(&reg, &format!("{}/x/hostile:1", server.addr)).await;
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
