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
    #[error("the value of {key:?} is not a counter (a decimal 64-bit integer)")]
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
    fn increment<'a>(&'a self, key: &'a str, delta: i64) -> KvFuture<'a, i64>;
    /// Writes `value` at `key` if the value there is still `expected` (None: absent),
    /// atomically; false if it was not.
    fn swap_if<'a>(
        &'a self,
        key: &'a str,
        expected: Option<Vec<u8>>,
        value: Vec<u8>,
    ) -> KvFuture<'a, bool>;
}

/// Reads a counter's decimal text.
pub fn counter(key: &str, value: Option<&[u8]>) -> Result<i64, KvError> {
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

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Vec<u8>>> {
        self.data.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes within the cap, on the map its caller holds locked.
    fn put(
        &self,
        data: &mut BTreeMap<String, Vec<u8>>,
        key: &str,
        value: Vec<u8>,
    ) -> Result<(), KvError> {
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
        let data = self.lock();
        let v = data.get(key).cloned();
        Box::pin(std::future::ready(Ok(v)))
    }

    fn set<'a>(&'a self, key: &'a str, value: Vec<u8>) -> KvFuture<'a, ()> {
        Box::pin(std::future::ready(self.put(&mut self.lock(), key, value)))
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

    fn increment<'a>(&'a self, key: &'a str, delta: i64) -> KvFuture<'a, i64> {
        let result = (|| {
            let mut data = self.lock();
            let current = counter(key, data.get(key).map(Vec::as_slice))?;
            let next = current
                .checked_add(delta)
                .ok_or_else(|| KvError::Overflow {
                    key: key.to_string(),
                })?;
            self.put(&mut data, key, next.to_string().into_bytes())?;
            Ok(next)
        })();
        Box::pin(std::future::ready(result))
    }

    fn swap_if<'a>(
        &'a self,
        key: &'a str,
        expected: Option<Vec<u8>>,
        value: Vec<u8>,
    ) -> KvFuture<'a, bool> {
        let result = (|| {
            let mut data = self.lock();
            if data.get(key) != expected.as_ref() {
                return Ok(false);
            }
            self.put(&mut data, key, value).map(|()| true)
        })();
        Box::pin(std::future::ready(result))
    }
}

/// A guest's handle on an open bucket.
pub(crate) struct OpenBucket(pub(super) Arc<dyn Bucket>);

/// A guest's compare-and-swap handle (draft2's `cas`): the value it saw at `key`.
pub(crate) struct OpenCas {
    bucket: Arc<dyn Bucket>,
    key: String,
    seen: Option<Vec<u8>>,
}

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

/// draft's `key-response`: a cursor is a number.
#[derive(ComponentType, Lift, Lower, Clone, Debug)]
#[component(record)]
struct KeyResponse {
    keys: Vec<String>,
    cursor: Option<u64>,
}

/// draft2's `key-response`: a cursor is text.
#[derive(ComponentType, Lift, Lower, Clone, Debug)]
#[component(record)]
struct KeyResponse2 {
    keys: Vec<String>,
    cursor: Option<String>,
}

/// draft2's `cas-error`.
#[derive(ComponentType, Lower)]
#[component(variant)]
enum CasError {
    #[component(name = "store-error")]
    StoreError(GuestError),
    #[component(name = "cas-failed")]
    CasFailed(Resource<OpenCas>),
}

type GuestResult<T> = Result<T, GuestError>;

/// A key and its value.
type Pair = (String, Vec<u8>);

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

/// Runs `op` on the bucket after checking `key`.
async fn on_key<T, F>(
    b: Arc<dyn Bucket>,
    key: &str,
    op: impl FnOnce(Arc<dyn Bucket>) -> F,
) -> GuestResult<T>
where
    F: Future<Output = Result<T, KvError>>,
{
    check_key(key)?;
    op(b).await.map_err(Into::into)
}

/// The functions both drafts share: `open`, the bucket's get/set/delete/exists, and
/// batch's set-many and delete-many.
fn add_common(linker: &mut Linker<Host>, version: &str) -> wasmtime::Result<()> {
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
                let r = on_key(bucket(store.data(), &this)?, &key, async |b| {
                    b.get(&key).await
                })
                .await;
                Ok((r,))
            })
        },
    )?;
    store.func_wrap_async(
        "[method]bucket.set",
        |store, (this, key, value): (Resource<OpenBucket>, String, Vec<u8>)| {
            Box::new(async move {
                let r = on_key(bucket(store.data(), &this)?, &key, async |b| {
                    b.set(&key, value).await
                })
                .await;
                Ok((r,))
            })
        },
    )?;
    store.func_wrap_async(
        "[method]bucket.delete",
        |store, (this, key): (Resource<OpenBucket>, String)| {
            Box::new(async move {
                let r = on_key(bucket(store.data(), &this)?, &key, async |b| {
                    b.delete(&key).await
                })
                .await;
                Ok((r,))
            })
        },
    )?;
    store.func_wrap_async(
        "[method]bucket.exists",
        |store, (this, key): (Resource<OpenBucket>, String)| {
            Box::new(async move {
                let r = on_key(bucket(store.data(), &this)?, &key, async |b| {
                    b.exists(&key).await
                })
                .await;
                Ok((r,))
            })
        },
    )?;
    let mut batch = linker.instance(&format!("wasi:keyvalue/batch@{version}"))?;
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
    Ok(())
}

/// Reads every key named, as (key, value if any), in order.
async fn get_many(
    b: &Arc<dyn Bucket>,
    keys: Vec<String>,
) -> GuestResult<Vec<(String, Option<Vec<u8>>)>> {
    check_batch(keys.len())?;
    let mut out = Vec::with_capacity(keys.len());
    for key in keys {
        check_key(&key)?;
        let v = b.get(&key).await?;
        out.push((key, v));
    }
    Ok(out)
}

/// `wasi:keyvalue@0.2.0-draft`, as wasmtime-wasi-keyvalue serves it.
fn add_draft(linker: &mut Linker<Host>) -> wasmtime::Result<()> {
    const V: &str = "0.2.0-draft";
    add_common(linker, V)?;
    let mut store = linker.instance(&format!("wasi:keyvalue/store@{V}"))?;
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
    let mut atomics = linker.instance(&format!("wasi:keyvalue/atomics@{V}"))?;
    atomics.func_wrap_async(
        "increment",
        |store, (this, key, delta): (Resource<OpenBucket>, String, u64)| {
            Box::new(async move {
                let r = on_key(bucket(store.data(), &this)?, &key, async |b| {
                    let delta =
                        i64::try_from(delta).map_err(|_| KvError::Overflow { key: key.clone() })?;
                    let n = b.increment(&key, delta).await?;
                    // This draft's counters are unsigned.
                    u64::try_from(n).map_err(|_| KvError::NotACounter { key: key.clone() })
                })
                .await;
                Ok((r,))
            })
        },
    )?;
    let mut batch = linker.instance(&format!("wasi:keyvalue/batch@{V}"))?;
    batch.func_wrap_async(
        "get-many",
        |store, (this, keys): (Resource<OpenBucket>, Vec<String>)| {
            Box::new(async move {
                let b = bucket(store.data(), &this)?;
                let r: GuestResult<Vec<Option<Pair>>> = get_many(&b, keys)
                    .await
                    .map(|all| all.into_iter().map(|(k, v)| v.map(|v| (k, v))).collect());
                Ok((r,))
            })
        },
    )?;
    Ok(())
}

/// `wasi:keyvalue@0.2.0-draft2`, as Spin serves it: text cursors, signed counters,
/// compare-and-swap, and every key named in `get-many`'s answer.
fn add_draft2(linker: &mut Linker<Host>) -> wasmtime::Result<()> {
    const V: &str = "0.2.0-draft2";
    add_common(linker, V)?;
    let mut store = linker.instance(&format!("wasi:keyvalue/store@{V}"))?;
    store.func_wrap_async(
        "[method]bucket.list-keys",
        |store, (this, cursor): (Resource<OpenBucket>, Option<String>)| {
            Box::new(async move {
                let b = bucket(store.data(), &this)?;
                let r: GuestResult<KeyResponse2> = async {
                    let cursor = match cursor {
                        None => None,
                        Some(c) => Some(c.parse::<u64>().map_err(|_| {
                            GuestError::Other(format!("{c:?} is not a cursor this bucket gave"))
                        })?),
                    };
                    let (keys, next) = b.list_keys(cursor).await?;
                    Ok(KeyResponse2 {
                        keys,
                        cursor: next.map(|n| n.to_string()),
                    })
                }
                .await;
                Ok((r,))
            })
        },
    )?;
    let mut atomics = linker.instance(&format!("wasi:keyvalue/atomics@{V}"))?;
    atomics.resource("cas", ResourceType::host::<OpenCas>(), |mut store, rep| {
        store
            .data_mut()
            .table
            .delete(Resource::<OpenCas>::new_own(rep))?;
        Ok(())
    })?;
    atomics.func_wrap_async(
        "increment",
        |store, (this, key, delta): (Resource<OpenBucket>, String, i64)| {
            Box::new(async move {
                let r = on_key(bucket(store.data(), &this)?, &key, async |b| {
                    b.increment(&key, delta).await
                })
                .await;
                Ok((r,))
            })
        },
    )?;
    atomics.func_wrap_async(
        "[static]cas.new",
        |mut store, (this, key): (Resource<OpenBucket>, String)| {
            Box::new(async move {
                let seen = on_key(bucket(store.data(), &this)?, &key, async |b| {
                    b.get(&key).await
                })
                .await;
                let r = match seen {
                    Ok(seen) => {
                        let bucket = bucket(store.data(), &this)?;
                        let cas = OpenCas { bucket, key, seen };
                        Ok(store.data_mut().table.push(cas)?)
                    }
                    Err(e) => Err(e),
                };
                Ok((r,))
            })
        },
    )?;
    atomics.func_wrap(
        "[method]cas.current",
        |store, (this,): (Resource<OpenCas>,)| {
            let cas = store.data().table.get(&this)?;
            Ok((Ok::<_, GuestError>(cas.seen.clone()),))
        },
    )?;
    atomics.func_wrap_async(
        "swap",
        |mut store, (this, value): (Resource<OpenCas>, Vec<u8>)| {
            Box::new(async move {
                let cas = store.data_mut().table.delete(this)?;
                let swapped = cas.bucket.swap_if(&cas.key, cas.seen.clone(), value).await;
                let r = match swapped {
                    Ok(true) => Ok(()),
                    Err(e) => Err(CasError::StoreError(e.into())),
                    // Lost the race: a new handle, on the value there now.
                    Ok(false) => match cas.bucket.get(&cas.key).await {
                        Ok(seen) => {
                            let again = OpenCas { seen, ..cas };
                            Err(CasError::CasFailed(store.data_mut().table.push(again)?))
                        }
                        Err(e) => Err(CasError::StoreError(e.into())),
                    },
                };
                Ok((r,))
            })
        },
    )?;
    let mut batch = linker.instance(&format!("wasi:keyvalue/batch@{V}"))?;
    batch.func_wrap_async(
        "get-many",
        |store, (this, keys): (Resource<OpenBucket>, Vec<String>)| {
            Box::new(async move {
                let b = bucket(store.data(), &this)?;
                Ok((get_many(&b, keys).await,))
            })
        },
    )?;
    Ok(())
}

pub(super) fn add_to_linker(linker: &mut Linker<Host>) -> wasmtime::Result<()> {
    add_draft(linker)?;
    add_draft2(linker)
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
        assert_eq!(b.increment("n", -1).await.unwrap(), 4);
        assert_eq!(b.increment("n", 1).await.unwrap(), 5);
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
