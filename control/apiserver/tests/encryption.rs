//! Secrets encrypted at rest: a Secret's value is nowhere in the store's files (while a
//! ConfigMap's, written the same way, is: the search can find what is there), reads
//! return it, and keys rotate.

mod support;

use std::path::Path;

use axum::http::StatusCode;
use serde_json::json;
use support::env_encrypted;

fn config(keys: &[(&str, u8)], identity_first: bool) -> String {
    use base64::Engine;
    let keys: Vec<String> = keys
        .iter()
        .map(|(n, b)| {
            format!(
                "      - {{name: {n}, secret: {}}}\n",
                base64::engine::general_purpose::STANDARD.encode([*b; 32])
            )
        })
        .collect();
    let aes = format!("  - aesgcm:\n      keys:\n{}", keys.concat());
    let providers = if identity_first {
        format!("  - identity: {{}}\n{aes}")
    } else {
        format!("{aes}  - identity: {{}}\n")
    };
    format!("apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n- resources: [secrets]\n  providers:\n{providers}")
}

/// Whether `needle` is in any file under `dir`.
fn found_in_files(dir: &Path, needle: &[u8]) -> bool {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(bytes) = std::fs::read(&p) {
                if bytes.windows(needle.len()).any(|w| w == needle) {
                    return true;
                }
            }
        }
    }
    false
}

async fn write_both(e: &support::Env, secret: &str, plain: &str) {
    let (code, got) = e
        .json(
            "POST",
            "/api/v1/namespaces/default/secrets",
            Some(json!({"metadata": {"name": "s"}, "stringData": {"password": secret}})),
        )
        .await;
    assert_eq!(code, StatusCode::CREATED, "{got}");
    let (code, got) = e
        .json(
            "POST",
            "/api/v1/namespaces/default/configmaps",
            Some(json!({"metadata": {"name": "c"}, "data": {"value": plain}})),
        )
        .await;
    assert_eq!(code, StatusCode::CREATED, "{got}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_value_is_not_in_the_store_files() {
    let e = env_encrypted(&config(&[("k1", 1)], false)).await;
    let secret = "correct-horse-battery-staple-71d3";
    let plain = "unencrypted-configmap-value-9f2a";
    write_both(&e, secret, plain).await;
    let (_, got) = e
        .json("GET", "/api/v1/namespaces/default/secrets/s", None)
        .await;
    use base64::Engine;
    assert_eq!(
        got["data"]["password"],
        base64::engine::general_purpose::STANDARD.encode(secret)
    );
    let store = e.store_files();
    e.store.shutdown().await.unwrap();
    assert!(
        found_in_files(&store, plain.as_bytes()),
        "the search finds what is stored in the clear"
    );
    let b64 = base64::engine::general_purpose::STANDARD.encode(secret);
    assert!(!found_in_files(&store, secret.as_bytes()));
    assert!(!found_in_files(&store, b64.as_bytes()));
    assert!(found_in_files(&store, b"k8s:enc:aesgcm:v1:k1:"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_identity_first_the_value_is_stored_in_the_clear() {
    // The same search, against a configuration that does not encrypt, finds the value:
    // the test above can fail.
    let e = env_encrypted(&config(&[("k1", 1)], true)).await;
    let secret = "correct-horse-battery-staple-71d3";
    write_both(&e, secret, "x").await;
    let store = e.store_files();
    e.store.shutdown().await.unwrap();
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(secret);
    assert!(found_in_files(&store, b64.as_bytes()));
}
