//! wasi:keyvalue (store, atomics, batch): buckets the pod declares, each backed by a
//! [`Bucket`] the node opens for it.
//!
//! `open(name)` gives a handle on the container's bucket of that name, and only those:
//! a name the pod did not declare is `no-such-store`. What a bucket holds, and how much,
//! is its backend's business ([`MemoryBucket`] here; a durable node-local one and a
//! Redis one in `baton-kv`); a backend's refusal (a bucket over its size cap) reaches
//! the guest as `other` with its reason, and the guest goes on.
//!
//! `increment` keeps a counter as its decimal text, as wasmtime's and Redis' do, so
//! that `get` reads it and another host's `increment` continues it.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use wasmtime::component::{ComponentType, Lift, Linker, Lower, Resource, ResourceType};

use crate::host::Host;

const VERSIONS: &[&str] = &["0.2.0-draft"];

/// The longest key a guest may use.
pub const MAX_KEY_BYTES: usize = 4096;

/// Keys `list-keys` returns per page.
pub const LIST_PAGE: usize = 1000;

/// Keys one batch call may name.
const MAX_BATCH: usize = 1000;

/// Why a bucket refused an operation.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error("access denied")]
    AccessDenied,
    #[error("bucket {bucket} is full: {used} of {cap} bytes used, {asked} more asked")]
    Full {
        bucket: String,
        used: u64,
        cap: u64,
        asked: u64,
    },
    #[error("the value of {key:?} is not a counter (decimal u64)")]
    NotACounter { key: String },
    #[error("incrementing {key:?} overflows")]
    Overflow { key: String },
    #[error("key is {0} bytes; the limit is {MAX_KEY_BYTES}")]
    KeyTooLong(usize),
    #[error("the backend failed: {0}")]
    Backend(String),
}

/// A future a [`Bucket`] returns.
pub type KvFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, KvError>> + Send + 'a>>;

/// One bucket's storage.
pub trait Bucket: Send + Sync + 'static {
    fn get<'a>(&'a self, key: &'a str) -> KvFuture<'a, Option<Vec<u8>>>;
    fn set<'a>(&'a self, key: &'a str, value: Vec<u8>) -> KvFuture<'a, ()>;
    fn delete<'a>(&'a self, key: &'a str) -> KvFuture<'a, ()>;
    fn exists<'a>(&'a self, key: &'a str) -> KvFuture<'a, bool>;
    /// A page of keys from `cursor` (None: the start), and the cursor of the next page.
    fn list_keys(&self, cursor: Option<u64>) -> KvFuture<'_, (Vec<String>, Option<u64>)>;
    /// Adds `delta` to the counter at `key` (absent: 0), atomically, and returns it.
    fn increment<'a>(&'a self, key: &'a str, delta: u64) -> KvFuture<'a, u64>;
}

/// Reads a counter's decimal text.
pub fn counter(key: &str, value: Option<&[u8]>) -> Result<u64, KvError> {
    match value {
        None => Ok(0),
        Some(v) => std::str::from_utf8(v)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| KvError::NotACounter {
                key: key.to_string(),
            }),
    }
}

/// A bucket in memory, capped at a number of bytes (keys and values): for tests, and
/// for buckets that need not outlive their pod.
#[derive(Debug)]
pub struct MemoryBucket {
    name: String,
    cap: u64,
    data: Mutex<BTreeMap<String, Vec<u8>>>,
}

impl MemoryBucket {
    pub fn new(name: impl Into<String>, cap: u64) -> Self {
        Self {
            name: name.into(),
            cap,
            data: Mutex::default(),
        }
    }

    fn put(&self, key: &str, value: Vec<u8>) -> Result<(), KvError> {
        let mut data = self.data.lock().unwrap_or_else(|e| e.into_inner());
        let used: u64 = data.iter().map(|(k, v)| (k.len() + v.len()) as u64).sum();
        let freed = data.get(key).map_or(0, |v| (key.len() + v.len()) as u64);
        let asked = (key.len() + value.len()) as u64;
        if used - freed + asked > self.cap {
            return Err(KvError::Full {
                bucket: self.name.clone(),
                used,
                cap: self.cap,
                asked,
            });
        }
        data.insert(key.to_string(), value);
        Ok(())
    }
}

impl Bucket for MemoryBucket {
    fn get<'a>(&'a self, key: &'a str) -> KvFuture<'a, Option<Vec<u8>>> {
        let data = self.data.lock().unwrap_or_else(|e| e.into_inner());
        let v = data.get(key).cloned();
        Box::pin(std::future::ready(Ok(v)))
    }

    fn set<'a>(&'a self, key: &'a str, value: Vec<u8>) -> KvFuture<'a, ()> {
        Box::pin(std::future::ready(self.put(key, value)))
    }

    fn delete<'a>(&'a self, key: &'a str) -> KvFuture<'a, ()> {
        self.data
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
        Box::pin(std::future::ready(Ok(())))
    }

    fn exists<'a>(&'a self, key: &'a str) -> KvFuture<'a, bool> {
        let data = self.data.lock().unwrap_or_else(|e| e.into_inner());
        Box::pin(std::future::ready(Ok(data.contains_key(key))))
    }

    fn list_keys(&self, cursor: Option<u64>) -> KvFuture<'_, (Vec<String>, Option<u64>)> {
        let data = self.data.lock().unwrap_or_else(|e| e.into_inner());
        let from = usize::try_from(cursor.unwrap_or(0)).unwrap_or(usize::MAX);
        let keys: Vec<String> = data.keys().skip(from).take(LIST_PAGE).cloned().collect();
        let next =
            (from.saturating_add(keys.len()) < data.len()).then(|| (from + keys.len()) as u64);
        Box::pin(std::future::ready(Ok((keys, next))))
    }

    fn increment<'a>(&'a self, key: &'a str, delta: u64) -> KvFuture<'a, u64> {
        let result = (|| {
            let current = {
                let data = self.data.lock().unwrap_or_else(|e| e.into_inner());
                counter(key, data.get(key).map(Vec::as_slice))?
            };
            let next = current
                .checked_add(delta)
                .ok_or_else(|| KvError::Overflow {
                    key: key.to_string(),
                })?;
            self.put(key, next.to_string().into_bytes())?;
            Ok(next)
        })();
        Box::pin(std::future::ready(result))
    }
}

/// A guest's handle on an open bucket.
pub(crate) struct OpenBucket(Arc<dyn Bucket>);

/// wasi:keyvalue's `error`.
#[derive(ComponentType, Lift, Lower, Clone, Debug)]
#[component(variant)]
enum GuestError {
    #[component(name = "no-such-store")]
    NoSuchStore,
    #[component(name = "access-denied")]
    AccessDenied,
    #[component(name = "other")]
    Other(String),
}

impl From<KvError> for GuestError {
    fn from(e: KvError) -> Self {
        match e {
            KvError::AccessDenied => GuestError::AccessDenied,
            e => GuestError::Other(e.to_string()),
        }
    }
}

#[derive(ComponentType, Lift, Lower, Clone, Debug)]
#[component(record)]
struct KeyResponse {
    keys: Vec<String>,
    cursor: Option<u64>,
}

type GuestResult<T> = Result<T, GuestError>;

/// The bucket behind a guest's handle, or a trap for a handle that is not one.
fn bucket(host: &Host, handle: &Resource<OpenBucket>) -> wasmtime::Result<Arc<dyn Bucket>> {
    Ok(host.table.get(handle)?.0.clone())
}

fn check_key(key: &str) -> Result<(), GuestError> {
    if key.len() > MAX_KEY_BYTES {
        return Err(KvError::KeyTooLong(key.len()).into());
    }
    Ok(())
}

fn check_batch(n: usize) -> Result<(), GuestError> {
    if n > MAX_BATCH {
        return Err(GuestError::Other(format!(
            "a batch of {n} keys; the limit is {MAX_BATCH}"
        )));
    }
    Ok(())
}

pub(super) fn add_to_linker(linker: &mut Linker<Host>) -> wasmtime::Result<()> {
    for version in VERSIONS {
        let mut store = linker.instance(&format!("wasi:keyvalue/store@{version}"))?;
        store.resource(
            "bucket",
            ResourceType::host::<OpenBucket>(),
            |mut store, rep| {
                store
                    .data_mut()
                    .table
                    .delete(Resource::<OpenBucket>::new_own(rep))?;
                Ok(())
            },
        )?;
        store.func_wrap("open", |mut store, (name,): (String,)| {
            let host = store.data_mut();
            let Some(b) = host.platform.bucket(&name) else {
                return Ok((Err(GuestError::NoSuchStore),));
            };
            let handle = host.table.push(OpenBucket(b))?;
            Ok((Ok::<_, GuestError>(handle),))
        })?;
        store.func_wrap_async(
            "[method]bucket.get",
            |store, (this, key): (Resource<OpenBucket>, String)| {
                Box::new(async move {
                    let b = bucket(store.data(), &this)?;
                    let r: GuestResult<Option<Vec<u8>>> = match check_key(&key) {
                        Ok(()) => b.get(&key).await.map_err(Into::into),
                        Err(e) => Err(e),
                    };
                    Ok((r,))
                })
            },
        )?;
        store.func_wrap_async(
            "[method]bucket.set",
            |store, (this, key, value): (Resource<OpenBucket>, String, Vec<u8>)| {
                Box::new(async move {
                    let b = bucket(store.data(), &this)?;
                    let r: GuestResult<()> = match check_key(&key) {
                        Ok(()) => b.set(&key, value).await.map_err(Into::into),
                        Err(e) => Err(e),
                    };
                    Ok((r,))
                })
            },
        )?;
        store.func_wrap_async(
            "[method]bucket.delete",
            |store, (this, key): (Resource<OpenBucket>, String)| {
                Box::new(async move {
                    let b = bucket(store.data(), &this)?;
                    let r: GuestResult<()> = match check_key(&key) {
                        Ok(()) => b.delete(&key).await.map_err(Into::into),
                        Err(e) => Err(e),
                    };
                    Ok((r,))
                })
            },
        )?;
        store.func_wrap_async(
            "[method]bucket.exists",
            |store, (this, key): (Resource<OpenBucket>, String)| {
                Box::new(async move {
                    let b = bucket(store.data(), &this)?;
                    let r: GuestResult<bool> = match check_key(&key) {
                        Ok(()) => b.exists(&key).await.map_err(Into::into),
                        Err(e) => Err(e),
                    };
                    Ok((r,))
                })
            },
        )?;
        store.func_wrap_async(
            "[method]bucket.list-keys",
            |store, (this, cursor): (Resource<OpenBucket>, Option<u64>)| {
                Box::new(async move {
                    let b = bucket(store.data(), &this)?;
                    let r: GuestResult<KeyResponse> = b
                        .list_keys(cursor)
                        .await
                        .map(|(keys, cursor)| KeyResponse { keys, cursor })
                        .map_err(Into::into);
                    Ok((r,))
                })
            },
        )?;

        let mut atomics = linker.instance(&format!("wasi:keyvalue/atomics@{version}"))?;
        atomics.func_wrap_async(
            "increment",
            |store, (this, key, delta): (Resource<OpenBucket>, String, u64)| {
                Box::new(async move {
                    let b = bucket(store.data(), &this)?;
                    let r: GuestResult<u64> = match check_key(&key) {
                        Ok(()) => b.increment(&key, delta).await.map_err(Into::into),
                        Err(e) => Err(e),
                    };
                    Ok((r,))
                })
            },
        )?;

        let mut batch = linker.instance(&format!("wasi:keyvalue/batch@{version}"))?;
        batch.func_wrap_async(
            "get-many",
            |store, (this, keys): (Resource<OpenBucket>, Vec<String>)| {
                Box::new(async move {
                    let b = bucket(store.data(), &this)?;
                    let r: GuestResult<Vec<Option<(String, Vec<u8>)>>> = async {
                        check_batch(keys.len())?;
                        let mut out = Vec::with_capacity(keys.len());
                        for key in keys {
                            check_key(&key)?;
                            let v = b.get(&key).await?;
                            out.push(v.map(|v| (key, v)));
                        }
                        Ok(out)
                    }
                    .await;
                    Ok((r,))
                })
            },
        )?;
        batch.func_wrap_async(
            "set-many",
            |store, (this, pairs): (Resource<OpenBucket>, Vec<(String, Vec<u8>)>)| {
                Box::new(async move {
                    let b = bucket(store.data(), &this)?;
                    let r: GuestResult<()> = async {
                        check_batch(pairs.len())?;
                        for (key, value) in pairs {
                            check_key(&key)?;
                            b.set(&key, value).await?;
                        }
                        Ok(())
                    }
                    .await;
                    Ok((r,))
                })
            },
        )?;
        batch.func_wrap_async(
            "delete-many",
            |store, (this, keys): (Resource<OpenBucket>, Vec<String>)| {
                Box::new(async move {
                    let b = bucket(store.data(), &this)?;
                    let r: GuestResult<()> = async {
                        check_batch(keys.len())?;
                        for key in keys {
                            check_key(&key)?;
                            b.delete(&key).await?;
                        }
                        Ok(())
                    }
                    .await;
                    Ok((r,))
                })
            },
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_memory_bucket_counts_and_keeps_to_its_cap() {
        let b = MemoryBucket::new("b", 64);
        assert_eq!(b.increment("n", 2).await.unwrap(), 2);
        assert_eq!(b.increment("n", 3).await.unwrap(), 5);
        assert_eq!(b.get("n").await.unwrap().as_deref(), Some(&b"5"[..]));
        let full = b.set("big", vec![0; 100]).await.unwrap_err();
        assert!(matches!(full, KvError::Full { cap: 64, .. }), "{full}");
        // What was there is intact, and a rewrite within the cap still works.
        assert_eq!(b.increment("n", 1).await.unwrap(), 6);
        b.set("text", b"x".to_vec()).await.unwrap();
        assert!(matches!(
            b.increment("text", 1).await,
            Err(KvError::NotACounter { .. })
        ));
        let (keys, next) = b.list_keys(None).await.unwrap();
        assert_eq!(
            (keys, next),
            (vec!["n".to_string(), "text".to_string()], None)
        );
    }
}
