//! An API server over a single-member store, driven through its router in process.
//!
//! With `BATON_TEST_STORE=etcd` the store is an external etcd instead (Debian's
//! etcd-server, one per test), so the same tests prove the API over both backends.

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use baton_apiserver::{ApiServer, Objects, Pki};
use baton_store::{Store, StoreConfig};
use serde_json::Value;
use tower::ServiceExt;

pub struct Env {
    _dir: tempfile::TempDir,
    /// The etcd the store lives in, under `BATON_TEST_STORE=etcd`.
    etcd: Option<baton_testkit::etcd::Etcd>,
    pub store: Store,
    pub api: ApiServer,
    pub token: String,
}

#[allow(dead_code)] // each test crate uses a part
pub async fn env() -> Env {
    env_with_tokens("").await
}

/// An API server whose token file also has `lines` (`TOKEN,USER[,GROUP...]`).
pub async fn env_with_tokens(lines: &str) -> Env {
    env_with(lines, None).await
}

/// An API server that encrypts at rest as the EncryptionConfiguration `encryption` says.
#[allow(dead_code)]
pub async fn env_encrypted(encryption: &str) -> Env {
    env_with("", Some(encryption)).await
}

async fn env_with(lines: &str, encryption: Option<&str>) -> Env {
    let dir = tempfile::tempdir().unwrap();
    if !lines.is_empty() {
        std::fs::create_dir_all(dir.path().join("pki")).unwrap();
        std::fs::write(
            dir.path().join("pki/tokens"),
            format!("admin-token,admin,system:masters\n{lines}"),
        )
        .unwrap();
    }
    let (store, etcd) = open_store(dir.path()).await;
    let pki = Pki::load_or_create(&dir.path().join("pki"), &[]).unwrap();
    let token = pki.admin_token.clone();
    let mut objects = Objects::new(store.clone());
    if let Some(config) = encryption {
        let path = dir.path().join("encryption.yaml");
        std::fs::write(&path, config).unwrap();
        objects =
            objects.with_encryption(baton_apiserver::encryption::Encryption::load(&path).unwrap());
    }
    let api = ApiServer::new(objects, pki);
    api.bootstrap().await.unwrap();
    Env {
        _dir: dir,
        etcd,
        store,
        api,
        token,
    }
}

/// The store the tests run on: the embedded one in `dir/store`, or a new etcd.
async fn open_store(dir: &std::path::Path) -> (Store, Option<baton_testkit::etcd::Etcd>) {
    match std::env::var("BATON_TEST_STORE").as_deref() {
        Ok("etcd") => {
            let etcd = baton_testkit::etcd::Etcd::start().unwrap();
            let mut cfg = baton_store::EtcdConfig::from_url(etcd.url(), None).unwrap();
            cfg.progress_interval = Duration::from_millis(200);
            (Store::open_etcd(cfg).await.unwrap(), Some(etcd))
        }
        Ok("embedded") | Err(_) => {
            let mut cfg = StoreConfig::new(1, dir.join("store"), "127.0.0.1:0");
            cfg.progress_interval = Duration::from_millis(200);
            (Store::open_single(cfg).await.unwrap(), None)
        }
        Ok(other) => panic!("BATON_TEST_STORE={other}: expected embedded or etcd"),
    }
}

#[allow(dead_code)] // each test crate uses a part
impl Env {
    /// Where the store keeps its files: its RocksDB, or etcd's WAL and database.
    pub fn store_files(&self) -> std::path::PathBuf {
        match &self.etcd {
            Some(etcd) => etcd.data_dir(),
            None => self._dir.path().join("store"),
        }
    }

    /// The test's own directory (the store is in `store`).
    pub fn dir(&self) -> &std::path::Path {
        self._dir.path()
    }

    /// Stops the store before the test ends, so no RocksDB work outlives the test.
    pub async fn close(self) {
        self.store.shutdown().await.unwrap();
    }

    pub async fn call(&self, method: &str, uri: &str, body: Option<Value>) -> (StatusCode, Body) {
        self.call_accepting(method, uri, body, "application/json")
            .await
    }

    pub async fn call_accepting(
        &self,
        method: &str,
        uri: &str,
        body: Option<Value>,
        accept: &str,
    ) -> (StatusCode, Body) {
        self.call_with(&self.token, &[], method, uri, body, accept)
            .await
    }

    /// A request with `token` (none if empty) and extra headers.
    pub async fn call_with(
        &self,
        token: &str,
        headers: &[(&str, &str)],
        method: &str,
        uri: &str,
        body: Option<Value>,
        accept: &str,
    ) -> (StatusCode, Body) {
        let mut req = Request::builder().method(method).uri(uri);
        if !token.is_empty() {
            req = req.header("authorization", format!("Bearer {token}"));
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if !headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        {
            req = req.header("content-type", "application/json");
        }
        let req = req
            .header("accept", accept)
            .body(
                body.map(|b| Body::from(b.to_string()))
                    .unwrap_or_else(Body::empty),
            )
            .unwrap();
        let resp = self.api.router().oneshot(req).await.unwrap();
        (resp.status(), resp.into_body())
    }

    /// A JSON merge patch, its answer as JSON.
    pub async fn json_patch(&self, uri: &str, patch: Value) -> (StatusCode, Value) {
        self.patch_as(uri, "application/merge-patch+json", patch)
            .await
    }

    /// A patch of the given media type, its answer as JSON.
    pub async fn patch_as(
        &self,
        uri: &str,
        content_type: &str,
        patch: Value,
    ) -> (StatusCode, Value) {
        let req = Request::builder()
            .method("PATCH")
            .uri(uri)
            .header("authorization", format!("Bearer {}", self.token))
            .header("content-type", content_type)
            .body(Body::from(patch.to_string()))
            .unwrap();
        let resp = self.api.router().oneshot(req).await.unwrap();
        let code = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 24)
            .await
            .unwrap();
        (code, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    /// A JSON request as the user of `token`, its answer as JSON.
    pub async fn json_as(
        &self,
        token: &str,
        method: &str,
        uri: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let (code, body) = self
            .call_with(token, &[], method, uri, body, "application/json")
            .await;
        let bytes = axum::body::to_bytes(body, 1 << 24).await.unwrap();
        (code, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    pub async fn call_get(&self, uri: &str) -> (StatusCode, Body) {
        self.call("GET", uri, None).await
    }

    pub async fn json(&self, method: &str, uri: &str, body: Option<Value>) -> (StatusCode, Value) {
        self.json_with_body(method, uri, body, "application/json")
            .await
    }

    /// A bodiless request with an `Accept` header, its answer as JSON.
    pub async fn json_with(&self, method: &str, uri: &str, accept: &str) -> (StatusCode, Value) {
        self.json_with_body(method, uri, None, accept).await
    }

    async fn json_with_body(
        &self,
        method: &str,
        uri: &str,
        body: Option<Value>,
        accept: &str,
    ) -> (StatusCode, Value) {
        let (code, body) = self.call_accepting(method, uri, body, accept).await;
        let bytes = axum::body::to_bytes(body, 1 << 24).await.unwrap();
        (code, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }
}
