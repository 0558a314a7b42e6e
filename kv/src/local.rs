//! Node-local buckets in one RocksDB.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use baton_wasm_shim::platform::keyvalue::{counter, KvFuture, LIST_PAGE};
use baton_wasm_shim::{Bucket, KvError};
use rocksdb::{Direction, IteratorMode, Options, DB};

use crate::StoreError;

/// Every node-local bucket of a node.
pub struct LocalStore {
    db: Arc<DB>,
    /// Each open bucket's accounting, shared by every handle on it.
    open: Mutex<HashMap<Vec<u8>, Arc<Shared>>>,
}

impl std::fmt::Debug for LocalStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalStore").finish_non_exhaustive()
    }
}

/// One bucket's bytes in use. Its lock also makes a write's check-and-put, and an
/// increment's read-and-write, atomic among the bucket's users on this node.
#[derive(Debug)]
struct Shared {
    used: Mutex<u64>,
}

/// A handle on one node-local bucket.
#[derive(Debug)]
pub struct LocalBucket {
    name: String,
    db: Arc<DB>,
    prefix: Vec<u8>,
    cap: u64,
    shared: Arc<Shared>,
}

impl LocalStore {
    /// Opens (creating) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        let db = DB::open(&opts, dir).map_err(|source| StoreError::Open {
            path: dir.to_path_buf(),
            source,
        })?;
        Ok(Self {
            db: Arc::new(db),
            open: Mutex::default(),
        })
    }

    /// The bucket `name` of `namespace`, capped at `cap` bytes. Names are the caller's
    /// to check; neither may contain a NUL, which separates them in the store's keys.
    pub fn bucket(&self, namespace: &str, name: &str, cap: u64) -> Result<LocalBucket, StoreError> {
        assert!(!namespace.contains('\0') && !name.contains('\0'));
        let prefix = [namespace.as_bytes(), b"\0", name.as_bytes(), b"\0"].concat();
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let shared = match open.get(&prefix) {
            Some(s) => s.clone(),
            None => {
                let mut used = 0u64;
                for item in self
                    .db
                    .iterator(IteratorMode::From(&prefix, Direction::Forward))
                {
                    let (k, v) = item.map_err(|source| StoreError::Scan {
                        namespace: namespace.into(),
                        bucket: name.into(),
                        source,
                    })?;
                    if !k.starts_with(&prefix) {
                        break;
                    }
                    used += (k.len() - prefix.len() + v.len()) as u64;
                }
                let s = Arc::new(Shared {
                    used: Mutex::new(used),
                });
                open.insert(prefix.clone(), s.clone());
                s
            }
        };
        Ok(LocalBucket {
            name: format!("{namespace}/{name}"),
            db: self.db.clone(),
            prefix,
            cap,
            shared,
        })
    }
}

fn backend(e: rocksdb::Error) -> KvError {
    KvError::Backend(e.to_string())
}

impl LocalBucket {
    fn key(&self, key: &str) -> Vec<u8> {
        [self.prefix.as_slice(), key.as_bytes()].concat()
    }

    /// Bytes in use now.
    pub fn used(&self) -> u64 {
        *self.shared.used.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes `value` at `key` if the bucket stays within its cap, with the bucket's
    /// lock held by the caller.
    fn put(&self, used: &mut u64, key: &str, value: &[u8]) -> Result<(), KvError> {
        let full = self.key(key);
        let old = self.db.get(&full).map_err(backend)?;
        let freed = old.map_or(0, |v| (key.len() + v.len()) as u64);
        let asked = (key.len() + value.len()) as u64;
        let after = *used - freed + asked;
        if after > self.cap {
            return Err(KvError::Full {
                bucket: self.name.clone(),
                used: *used,
                cap: self.cap,
                asked,
            });
        }
        self.db.put(&full, value).map_err(backend)?;
        *used = after;
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, u64> {
        self.shared.used.lock().unwrap_or_else(|e| e.into_inner())
    }
}

// RocksDB answers from memory or a local disk in microseconds: the calls run inline
// rather than on a blocking thread.
impl Bucket for LocalBucket {
    fn get<'a>(&'a self, key: &'a str) -> KvFuture<'a, Option<Vec<u8>>> {
        let r = self.db.get(self.key(key)).map_err(backend);
        Box::pin(std::future::ready(r))
    }

    fn set<'a>(&'a self, key: &'a str, value: Vec<u8>) -> KvFuture<'a, ()> {
        let mut used = self.lock();
        let r = self.put(&mut used, key, &value);
        Box::pin(std::future::ready(r))
    }

    fn delete<'a>(&'a self, key: &'a str) -> KvFuture<'a, ()> {
        let r = (|| {
            let mut used = self.lock();
            let full = self.key(key);
            if let Some(v) = self.db.get(&full).map_err(backend)? {
                self.db.delete(&full).map_err(backend)?;
                *used -= (key.len() + v.len()) as u64;
            }
            Ok(())
        })();
        Box::pin(std::future::ready(r))
    }

    fn exists<'a>(&'a self, key: &'a str) -> KvFuture<'a, bool> {
        let r = self
            .db
            .get_pinned(self.key(key))
            .map(|v| v.is_some())
            .map_err(backend);
        Box::pin(std::future::ready(r))
    }

    fn list_keys(&self, cursor: Option<u64>) -> KvFuture<'_, (Vec<String>, Option<u64>)> {
        let r = (|| {
            let skip = usize::try_from(cursor.unwrap_or(0)).unwrap_or(usize::MAX);
            let mut keys = Vec::new();
            let mut more = false;
            let iter = self
                .db
                .iterator(IteratorMode::From(&self.prefix, Direction::Forward));
            for (i, item) in iter.enumerate() {
                let (k, _) = item.map_err(backend)?;
                if !k.starts_with(&self.prefix) {
                    break;
                }
                if i < skip {
                    continue;
                }
                if keys.len() == LIST_PAGE {
                    more = true;
                    break;
                }
                keys.push(String::from_utf8_lossy(&k[self.prefix.len()..]).into_owned());
            }
            let next = more.then(|| (skip + keys.len()) as u64);
            Ok((keys, next))
        })();
        Box::pin(std::future::ready(r))
    }

    fn increment<'a>(&'a self, key: &'a str, delta: i64) -> KvFuture<'a, i64> {
        let r = (|| {
            let mut used = self.lock();
            let old = self.db.get(self.key(key)).map_err(backend)?;
            let next = counter(key, old.as_deref())?
                .checked_add(delta)
                .ok_or_else(|| KvError::Overflow {
                    key: key.to_string(),
                })?;
            self.put(&mut used, key, next.to_string().as_bytes())?;
            Ok(next)
        })();
        Box::pin(std::future::ready(r))
    }

    fn swap_if<'a>(
        &'a self,
        key: &'a str,
        expected: Option<Vec<u8>>,
        value: Vec<u8>,
    ) -> KvFuture<'a, bool> {
        let r = (|| {
            let mut used = self.lock();
            if self.db.get(self.key(key)).map_err(backend)? != expected {
                return Ok(false);
            }
            self.put(&mut used, key, &value).map(|()| true)
        })();
        Box::pin(std::future::ready(r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_local_bucket_is_durable_capped_and_separate_from_its_neighbours() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = LocalStore::open(dir.path()).unwrap();
            let b = store.bucket("default", "counters", 64).unwrap();
            assert_eq!(b.increment("hits", 1).await.unwrap(), 1);
            assert_eq!(b.increment("hits", 1).await.unwrap(), 2);
            // Another namespace's bucket of the same name is another bucket.
            let other = store.bucket("team-b", "counters", 64).unwrap();
            assert_eq!(other.get("hits").await.unwrap(), None);
            // Past the cap: refused, and nothing changes.
            let full = b.set("big", vec![7; 100]).await.unwrap_err();
            assert!(matches!(full, KvError::Full { cap: 64, .. }), "{full}");
            assert_eq!(b.get("big").await.unwrap(), None);
            assert_eq!(b.used(), 5);
        }
        // The store reopened (the node restarted): the counter and the accounting hold.
        let store = LocalStore::open(dir.path()).unwrap();
        let b = store.bucket("default", "counters", 64).unwrap();
        assert_eq!(b.used(), 5);
        assert_eq!(b.increment("hits", 1).await.unwrap(), 3);
        assert!(!b
            .swap_if("hits", Some(b"2".to_vec()), b"9".to_vec())
            .await
            .unwrap());
        assert!(b.swap_if("k2", None, b"w".to_vec()).await.unwrap());
        b.set("k2", b"v".to_vec()).await.unwrap();
        let (keys, next) = b.list_keys(None).await.unwrap();
        assert_eq!(keys, ["hits", "k2"]);
        assert_eq!(next, None);
        b.delete("k2").await.unwrap();
        assert!(!b.exists("k2").await.unwrap());
        assert_eq!(b.used(), 5);
    }
}
