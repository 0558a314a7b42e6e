//! The platform interfaces a pod's components are granted, and what backs them, from the
//! pod's annotations (see `baton_wasm_shim::platform`):
//!
//! - `baton.dev/capabilities: config,keyvalue,logging` grants interfaces to every
//!   container of the pod; `baton.dev/capabilities.<container>` grants them to one
//!   container instead. A component that imports an interface not granted does not start
//!   (CreateContainerError, naming the interface).
//! - `baton.dev/config-from: settings,secret:api-keys` names ConfigMaps (and, with
//!   `secret:`, Secrets) whose keys are wasi:config values. The container's environment
//!   (`env` and `envFrom`, resolved as for any container) is added over them. The node
//!   rereads them now and then, and a running component sees the new values; if one is
//!   deleted, the last values are kept.
//! - `baton.dev/keyvalue-buckets: counters,shared=redis:kv-redis` declares the pod's
//!   wasi:keyvalue buckets: a bare name is node-local and durable (kept under the node's
//!   data directory, by namespace and name); `name=redis:SECRET` is the Redis database
//!   whose URL is the `url` key of Secret SECRET.
//! - `baton.dev/keyvalue-bucket-bytes: 1048576` caps each bucket (a local bucket's keys
//!   and values; a Redis bucket's values, one by one). The default is 64 MiB.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use baton_kv::{LocalStore, RedisBucket};
use baton_wasm_shim::{Bucket, Capabilities, ConfigVars, Platform};
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::{Api, Client, ResourceExt};

pub use baton_kube::platform::{BUCKETS, BUCKET_BYTES, CAPABILITIES, CONFIG_FROM};

const DEFAULT_BUCKET_BYTES: u64 = 64 << 20;

/// Why a container's platform could not be set up; the node reports it as
/// CreateContainerConfigError.
#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    #[error("annotation {annotation}: {message}")]
    Annotation { annotation: String, message: String },
    #[error("keyvalue bucket {bucket}: Secret {secret} not found")]
    NoSecret { bucket: String, secret: String },
    #[error("keyvalue bucket {bucket}: Secret {secret} has no key \"url\"")]
    NoUrl { bucket: String, secret: String },
    #[error("reading Secret {secret}")]
    Api {
        secret: String,
        #[source]
        source: Box<kube::Error>,
    },
    #[error("opening keyvalue bucket {bucket}")]
    Store {
        bucket: String,
        #[source]
        source: baton_kv::StoreError,
    },
}

fn annotation(pod: &Pod, key: &str) -> Option<String> {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .cloned()
}

/// For a WASI 0.3 handler: `baton.dev/instance-reuse: "128"` lets one instance serve
/// that many requests, `baton.dev/instance-concurrency` (16 by default) of them at once,
/// as `wasmtime serve` does. Off (a fresh instance per request) unless set above 1, since
/// what a request leaves in the instance, the next one can see.
pub fn instance_reuse(pod: &Pod) -> Option<baton_wasm_shim::InstanceReuse> {
    let number = |key: &str| annotation(pod, key).and_then(|v| v.trim().parse::<u32>().ok());
    let requests = number("baton.dev/instance-reuse").filter(|n| *n > 1)?;
    Some(baton_wasm_shim::InstanceReuse {
        requests,
        concurrent: number("baton.dev/instance-concurrency")
            .unwrap_or(16)
            .max(1),
    })
}

/// Whether the pod uses platform interfaces at all.
pub fn used(pod: &Pod) -> bool {
    pod.metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.keys().any(|k| k.starts_with(CAPABILITIES)))
}

/// The interfaces granted to `container`.
pub fn granted(pod: &Pod, container: &str) -> Result<Capabilities, PlatformError> {
    let own = format!("{CAPABILITIES}.{container}");
    let (key, list) = match annotation(pod, &own) {
        Some(list) => (own, list),
        None => (
            CAPABILITIES.to_string(),
            annotation(pod, CAPABILITIES).unwrap_or_default(),
        ),
    };
    Capabilities::parse(&list).map_err(|message| PlatformError::Annotation {
        annotation: key,
        message,
    })
}

/// An object named by `baton.dev/config-from`: (kind, name), kind "configmap" or "secret".
pub fn config_sources(pod: &Pod) -> Vec<(&'static str, String)> {
    pod.metadata
        .annotations
        .as_ref()
        .map(baton_kube::platform::config_sources)
        .unwrap_or_default()
}

/// A declared bucket's backend.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Backend {
    Local,
    Redis { secret: String },
}

/// The pod's buckets and their cap.
fn buckets(pod: &Pod) -> Result<(Vec<(String, Backend)>, u64), PlatformError> {
    let bad = |annotation: &str, message: String| PlatformError::Annotation {
        annotation: annotation.to_string(),
        message,
    };
    let cap = match annotation(pod, BUCKET_BYTES) {
        Some(v) => v
            .trim()
            .parse::<u64>()
            .map_err(|e| bad(BUCKET_BYTES, format!("{v:?} is not a number of bytes: {e}")))?,
        None => DEFAULT_BUCKET_BYTES,
    };
    let declared = pod
        .metadata
        .annotations
        .as_ref()
        .map(baton_kube::platform::buckets)
        .unwrap_or(Ok(Vec::new()))
        .map_err(|m| bad(BUCKETS, m))?;
    let out = declared
        .into_iter()
        .map(|(name, secret)| match secret {
            Some(secret) => (name, Backend::Redis { secret }),
            None => (name, Backend::Local),
        })
        .collect();
    Ok((out, cap))
}

/// The node's keyvalue storage: its local store (opened at first use), shared by its
/// pods.
pub struct Stores {
    dir: PathBuf,
    local: Mutex<Option<Arc<LocalStore>>>,
}

impl std::fmt::Debug for Stores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stores").field("dir", &self.dir).finish()
    }
}

impl Stores {
    /// Local buckets will live in `dir`.
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            local: Mutex::default(),
        }
    }

    fn local(&self) -> Result<Arc<LocalStore>, baton_kv::StoreError> {
        let mut local = self.local.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = &*local {
            return Ok(s.clone());
        }
        let store = Arc::new(LocalStore::open(&self.dir)?);
        *local = Some(store.clone());
        Ok(store)
    }

    /// The platform of `container`: what it is granted, its config values (`config`,
    /// shared with the node's refreshes), and the pod's buckets, if it may use them.
    pub async fn platform(
        &self,
        client: &Client,
        pod: &Pod,
        container: &str,
        config: ConfigVars,
    ) -> Result<Platform, PlatformError> {
        let granted = granted(pod, container)?;
        let mut platform = Platform::new(granted).with_config(config);
        if !granted.has(baton_wasm_shim::Capability::KeyValue) {
            return Ok(platform);
        }
        let namespace = pod.namespace().unwrap_or_else(|| "default".into());
        let (declared, cap) = buckets(pod)?;
        for (name, backend) in declared {
            let bucket: Arc<dyn Bucket> = match backend {
                Backend::Local => {
                    let opened = self.local().and_then(|s| s.bucket(&namespace, &name, cap));
                    Arc::new(opened.map_err(|source| PlatformError::Store {
                        bucket: name.clone(),
                        source,
                    })?)
                }
                Backend::Redis { secret } => {
                    let url = redis_url(client, &namespace, &name, &secret).await?;
                    Arc::new(RedisBucket::new(&name, &url, cap).map_err(|source| {
                        PlatformError::Store {
                            bucket: name.clone(),
                            source,
                        }
                    })?)
                }
            };
            platform = platform.with_bucket(name, bucket);
        }
        Ok(platform)
    }
}

async fn redis_url(
    client: &Client,
    namespace: &str,
    bucket: &str,
    secret: &str,
) -> Result<String, PlatformError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let found = api
        .get_opt(secret)
        .await
        .map_err(|e| PlatformError::Api {
            secret: secret.to_string(),
            source: Box::new(e),
        })?
        .ok_or_else(|| PlatformError::NoSecret {
            bucket: bucket.to_string(),
            secret: secret.to_string(),
        })?;
    let data: BTreeMap<String, Vec<u8>> = found
        .data
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.0))
        .chain(
            found
                .string_data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.into_bytes())),
        )
        .collect();
    data.get("url")
        .map(|u| String::from_utf8_lossy(u).trim().to_string())
        .ok_or_else(|| PlatformError::NoUrl {
            bucket: bucket.to_string(),
            secret: secret.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(annotations: &[(&str, &str)]) -> Pod {
        let mut p = Pod::default();
        p.metadata.annotations = Some(
            annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        p
    }

    #[test]
    fn instances_are_reused_only_when_asked() {
        assert_eq!(instance_reuse(&pod(&[])), None);
        assert_eq!(
            instance_reuse(&pod(&[("baton.dev/instance-reuse", "1")])),
            None
        );
        assert_eq!(
            instance_reuse(&pod(&[("baton.dev/instance-reuse", "128")])),
            Some(baton_wasm_shim::InstanceReuse {
                requests: 128,
                concurrent: 16
            })
        );
        assert_eq!(
            instance_reuse(&pod(&[
                ("baton.dev/instance-reuse", "8"),
                ("baton.dev/instance-concurrency", "0")
            ])),
            Some(baton_wasm_shim::InstanceReuse {
                requests: 8,
                concurrent: 1
            })
        );
    }

    #[test]
    fn grants_and_buckets_come_from_the_annotations() {
        let p = pod(&[
            (CAPABILITIES, "config, logging"),
            ("baton.dev/capabilities.worker", "keyvalue"),
            (BUCKETS, "counters, shared=redis:kv-redis"),
            (BUCKET_BYTES, "1024"),
            (CONFIG_FROM, "settings, secret:keys, configmap:more"),
        ]);
        use baton_wasm_shim::Capability::*;
        let web = granted(&p, "web").unwrap();
        assert!(web.has(Config) && web.has(Logging) && !web.has(KeyValue));
        let worker = granted(&p, "worker").unwrap();
        assert!(worker.has(KeyValue) && !worker.has(Config));
        let (b, cap) = buckets(&p).unwrap();
        assert_eq!(cap, 1024);
        assert_eq!(
            b,
            [
                ("counters".to_string(), Backend::Local),
                (
                    "shared".to_string(),
                    Backend::Redis {
                        secret: "kv-redis".into()
                    }
                )
            ]
        );
        assert_eq!(
            config_sources(&p),
            [
                ("configmap", "settings".to_string()),
                ("secret", "keys".to_string()),
                ("configmap", "more".to_string())
            ]
        );
        // Bad input is an error naming the annotation.
        for (k, v) in [
            (CAPABILITIES, "config,files"),
            (BUCKETS, "../up"),
            (BUCKETS, "b=postgres:x"),
            (BUCKET_BYTES, "lots"),
        ] {
            let p = pod(&[(CAPABILITIES, "keyvalue"), (k, v)]);
            let err = granted(&p, "c")
                .map(|_| ())
                .and_then(|()| buckets(&p).map(|_| ()))
                .unwrap_err();
            assert!(err.to_string().contains(k), "{k}={v}: {err}");
        }
    }
}
