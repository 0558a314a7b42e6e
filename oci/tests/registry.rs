//! Pull and push against a real registry (Debian's docker-registry on 127.0.0.1): plain,
//! with htpasswd auth, with TLS from a generated CA; and every way a pull can go wrong,
//! each with a clear error and nothing half-written left in the cache.

#[path = "support/registry.rs"]
mod registry;

use baton_oci::{Auth, OciConfig, OciError, PullPolicy, Registry};
use registry::{damage, Options, Registry as Server};

fn guest(name: &str) -> Vec<u8> {
    let p = baton_testkit::crate_dir(env!("CARGO_MANIFEST_DIR"))
        .join("../examples-wasm/dist")
        .join(format!("{name}.wasm"));
    std::fs::read(&p)
        .unwrap_or_else(|_| panic!("{} is missing: run scripts/build-guests.sh", p.display()))
}

fn client(server: &Server, cache: &std::path::Path) -> Registry {
    let mut cfg = OciConfig::new(cache.to_path_buf());
    if server.ca_pem.is_none() {
        cfg.insecure_registries = vec![server.addr.clone()];
    }
    cfg.extra_ca_pem = server.ca_pem.clone().into_iter().collect();
    Registry::new(cfg).unwrap()
}

/// Blobs in the cache (content only; refs and tmp do not count).
fn cached_blobs(cache: &std::path::Path) -> usize {
    std::fs::read_dir(cache.join("blobs/sha256"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_then_pull_by_tag_and_digest_once() {
    let server = Server::start(Options::default());
    let cache = tempfile::tempdir().unwrap();
    let reg = client(&server, cache.path());
    let wasm = guest("http-hello");
    let image = format!("{}/baton/http-hello:1.0", server.addr);
    let digest = reg
        .push(&wasm, "http-hello.wasm", &image, &Auth::Anonymous, None)
        .await
        .unwrap();
    assert!(digest.starts_with("sha256:"), "{digest}");
    // Ten concurrent pulls of one image transfer it once.
    let pulls = (0..10).map(|_| reg.pull(&image, &Auth::Anonymous, PullPolicy::IfNotPresent, None));
    let results = futures::future::join_all(pulls).await;
    let fresh = results
        .iter()
        .filter(|r| !r.as_ref().unwrap().cached)
        .count();
    assert_eq!(fresh, 1);
    let pulled = results[0].as_ref().unwrap();
    assert_eq!(std::fs::read(&pulled.path).unwrap(), wasm);
    assert_eq!(pulled.manifest_digest, digest);
    // By digest, and with Always (the tag is resolved again, the blob is not fetched again).
    let by_digest = format!("{}/baton/http-hello@{digest}", server.addr);
    let p = reg
        .pull(&by_digest, &Auth::Anonymous, PullPolicy::IfNotPresent, None)
        .await
        .unwrap();
    assert_eq!(p.layer_digest, pulled.layer_digest);
    let p = reg
        .pull(&image, &Auth::Anonymous, PullPolicy::Always, None)
        .await
        .unwrap();
    assert!(p.cached);
    assert_eq!(reg.cache().list().len(), 2);
    // Never: only what is here.
    let other = format!("{}/baton/other:1", server.addr);
    let err = reg
        .pull(&other, &Auth::Anonymous, PullPolicy::Never, None)
        .await
        .unwrap_err();
    assert!(matches!(err, OciError::NeverPull { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_and_tls_registries() {
    let user = ("alice".to_string(), "s3cret".to_string());
    let server = Server::start(Options {
        user: Some(user.clone()),
        tls: true,
    });
    let cache = tempfile::tempdir().unwrap();
    let reg = client(&server, cache.path());
    let image = format!("{}/team/hello:2", server.addr);
    let good = Auth::Basic {
        username: user.0.clone(),
        password: user.1.clone(),
    };
    // Without credentials, and with wrong ones: refused, with the registry's reason.
    let err = reg
        .push(
            &guest("hello"),
            "hello.wasm",
            &image,
            &Auth::Anonymous,
            None,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, OciError::Unauthorized { .. }), "{err}");
    reg.push(&guest("hello"), "hello.wasm", &image, &good, None)
        .await
        .unwrap();
    let bad_cache = tempfile::tempdir().unwrap();
    let bad = client(&server, bad_cache.path());
    let wrong = Auth::Basic {
        username: "alice".into(),
        password: "nope".into(),
    };
    let err = bad
        .pull(&image, &wrong, PullPolicy::Always, None)
        .await
        .unwrap_err();
    assert!(matches!(err, OciError::Unauthorized { .. }), "{err}");
    assert_eq!(cached_blobs(bad_cache.path()), 0);
    let p = reg
        .pull(&image, &good, PullPolicy::Always, None)
        .await
        .unwrap();
    assert_eq!(std::fs::read(&p.path).unwrap(), guest("hello"));
    // A client that does not trust the generated CA cannot even connect.
    let untrusting_cache = tempfile::tempdir().unwrap();
    let untrusting = Registry::new(OciConfig::new(untrusting_cache.path().to_path_buf())).unwrap();
    let err = untrusting
        .pull(&image, &good, PullPolicy::Always, None)
        .await
        .unwrap_err();
    assert!(matches!(err, OciError::Client { .. }), "{err}");
    // The cause is kept, typed: the chain says why.
    let chain = baton_error_chain::chain(&err);
    assert!(chain.to_lowercase().contains("certificate"), "{chain}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_pulls_fail_clearly_and_leave_nothing_behind() {
    let server = Server::start(Options::default());
    let cache = tempfile::tempdir().unwrap();
    let reg = client(&server, cache.path());
    let wasm = guest("job");
    let layer = format!("sha256:{:x}", <sha2::Sha256 as sha2::Digest>::digest(&wasm));
    // A missing tag.
    let err = reg
        .pull(
            &format!("{}/nope/nothing:1", server.addr),
            &Auth::Anonymous,
            PullPolicy::Always,
            None,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, OciError::NotFound { .. }), "{err}");
    // A layer over the size cap is refused before it is fetched.
    let image = format!("{}/baton/job:1", server.addr);
    reg.push(&wasm, "job.wasm", &image, &Auth::Anonymous, None)
        .await
        .unwrap();
    let small_cache = tempfile::tempdir().unwrap();
    let mut cfg = OciConfig::new(small_cache.path().to_path_buf());
    cfg.insecure_registries = vec![server.addr.clone()];
    cfg.max_layer_bytes = 1000;
    let small = Registry::new(cfg).unwrap();
    let err = small
        .pull(&image, &Auth::Anonymous, PullPolicy::Always, None)
        .await
        .unwrap_err();
    assert!(matches!(err, OciError::TooLarge { .. }), "{err}");
    assert_eq!(cached_blobs(small_cache.path()), 0);
    // A blob whose bytes do not match its digest.
    damage(&server.blob_file(&layer), false);
    let err = reg
        .pull(&image, &Auth::Anonymous, PullPolicy::Always, None)
        .await
        .unwrap_err();
    assert!(matches!(err, OciError::DigestMismatch { .. }), "{err}");
    assert_eq!(cached_blobs(cache.path()), 0, "nothing half-written stays");
    // A truncated blob.
    damage(&server.blob_file(&layer), true);
    let err = reg
        .pull(&image, &Auth::Anonymous, PullPolicy::Always, None)
        .await
        .unwrap_err();
    assert!(
        matches!(err, OciError::Truncated { .. } | OciError::Download { .. }),
        "{err}"
    );
    assert_eq!(cached_blobs(cache.path()), 0);
    assert!(std::fs::read_dir(cache.path().join("tmp"))
        .unwrap()
        .next()
        .is_none());
    // A manifest whose bytes no longer match the digest the registry names.
    let other = format!("{}/baton/hello:1", server.addr);
    let manifest = reg
        .push(
            &guest("hello"),
            "hello.wasm",
            &other,
            &Auth::Anonymous,
            None,
        )
        .await
        .unwrap();
    damage(&server.blob_file(&manifest), false);
    let err = reg
        .pull(&other, &Auth::Anonymous, PullPolicy::Always, None)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            OciError::DigestMismatch { .. } | OciError::Manifest { .. }
        ),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_images_and_other_artifacts_are_told_apart() {
    use oci_client::client::{Config, ImageLayer};
    use oci_client::manifest as m;
    let server = Server::start(Options::default());
    let cache = tempfile::tempdir().unwrap();
    let reg = client(&server, cache.path());
    let oc = oci_client::Client::new(oci_client::client::ClientConfig {
        protocol: oci_client::client::ClientProtocol::Http,
        ..Default::default()
    });
    let anon = oci_client::secrets::RegistryAuth::Anonymous;
    // A Linux container image: an OCI image config and a tar+gzip layer.
    let linux: oci_client::Reference = format!("{}/library/alpine:3", server.addr).parse().unwrap();
    let layer = ImageLayer::new(
        vec![0x1f, 0x8b, 0, 0],
        m::IMAGE_LAYER_GZIP_MEDIA_TYPE.into(),
        None,
    );
    let config = Config::new(
        br#"{"architecture":"amd64","os":"linux"}"#.to_vec(),
        m::IMAGE_CONFIG_MEDIA_TYPE.into(),
        None,
    );
    oc.push(&linux, &[layer], config, &anon, None)
        .await
        .unwrap();
    let err = reg
        .pull(&linux.whole(), &Auth::Anonymous, PullPolicy::Always, None)
        .await
        .unwrap_err();
    assert!(matches!(err, OciError::LinuxImage { .. }), "{err}");
    assert!(err.to_string().contains("Linux container image"), "{err}");
    // An artifact of some other kind.
    let text: oci_client::Reference = format!("{}/docs/readme:1", server.addr).parse().unwrap();
    let layer = ImageLayer::new(b"hello".to_vec(), "text/plain".into(), None);
    let config = Config::new(
        b"{}".to_vec(),
        "application/vnd.example.config+json".into(),
        None,
    );
    oc.push(&text, &[layer], config, &anon, None).await.unwrap();
    let err = reg
        .pull(&text.whole(), &Auth::Anonymous, PullPolicy::Always, None)
        .await
        .unwrap_err();
    assert!(matches!(err, OciError::NotWasm { .. }), "{err}");
    // A "wasm" layer that is not Wasm.
    let fake: oci_client::Reference = format!("{}/baton/fake:1", server.addr).parse().unwrap();
    let layer = ImageLayer::new(
        b"#!/bin/sh\necho hi\n".to_vec(),
        baton_oci::WASM_LAYER.into(),
        None,
    );
    let config = Config::new(b"{}".to_vec(), baton_oci::WASM_CONFIG_V0.into(), None);
    oc.push(&fake, &[layer], config, &anon, None).await.unwrap();
    let err = reg
        .pull(&fake.whole(), &Auth::Anonymous, PullPolicy::Always, None)
        .await
        .unwrap_err();
    assert!(matches!(err, OciError::NotWasm { .. }), "{err}");
    assert_eq!(cached_blobs(cache.path()), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_index_resolves_to_its_wasm_entry() {
    let server = Server::start(Options::default());
    let cache = tempfile::tempdir().unwrap();
    let reg = client(&server, cache.path());
    let wasm = guest("http-hello");
    let single = format!("{}/baton/multi:wasm", server.addr);
    let digest = reg
        .push(&wasm, "http-hello.wasm", &single, &Auth::Anonymous, None)
        .await
        .unwrap();
    let oc = oci_client::Client::new(oci_client::client::ClientConfig {
        protocol: oci_client::client::ClientProtocol::Http,
        ..Default::default()
    });
    let size = {
        let r: oci_client::Reference = single.parse().unwrap();
        let (raw, _) = oc
            .pull_manifest_raw(
                &r,
                &oci_client::secrets::RegistryAuth::Anonymous,
                &[oci_client::manifest::OCI_IMAGE_MEDIA_TYPE],
            )
            .await
            .unwrap();
        raw.len()
    };
    // An index with a Linux entry first and the Wasm component second.
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": oci_client::manifest::OCI_IMAGE_INDEX_MEDIA_TYPE,
        "manifests": [
            {"mediaType": oci_client::manifest::OCI_IMAGE_MEDIA_TYPE, "digest": digest, "size": size,
             "platform": {"architecture": "amd64", "os": "linux"}},
            {"mediaType": oci_client::manifest::OCI_IMAGE_MEDIA_TYPE, "digest": digest, "size": size,
             "platform": {"architecture": "wasm", "os": "wasip2"}}
        ]
    });
    let index_ref: oci_client::Reference =
        format!("{}/baton/multi:1", server.addr).parse().unwrap();
    oc.push_manifest_raw(
        &index_ref,
        serde_json::to_vec(&index).unwrap(),
        oci_client::manifest::OCI_IMAGE_INDEX_MEDIA_TYPE
            .parse()
            .unwrap(),
    )
    .await
    .unwrap();
    let p = reg
        .pull(
            &index_ref.whole(),
            &Auth::Anonymous,
            PullPolicy::Always,
            None,
        )
        .await
        .unwrap();
    assert_eq!(p.manifest_digest, digest);
    assert_eq!(std::fs::read(&p.path).unwrap(), wasm);
}
