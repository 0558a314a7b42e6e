//! In-memory indexes over a store prefix, kept current by a watch: what the API server
//! consults on every request and cannot afford to read from the store each time (the
//! RBAC policy, the admission policies).
//!
//! [`Cache::load`] reads the prefix once (before the server takes requests, so that no
//! request is judged by an empty index); [`Cache::run`] then applies every change as it
//! is committed, and reads the prefix again after a lost watch. Each API server of an HA
//! control plane keeps its own, from the shared store; a change is seen by every member
//! within a watch round-trip.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use baton_store::{EventKind, RangeRequest, Revision, WatchEvent};
use serde_json::Value;

use crate::error::ApiResult;
use crate::objects::Objects;

/// What a cache keeps: objects applied by store key.
pub trait Index: Default + Send + Sync + 'static {
    /// Puts the object at `key`, or removes it (`None`).
    fn apply(&mut self, key: &str, obj: Option<Value>);
}

/// An index of the objects under one store prefix.
#[derive(Debug)]
pub struct Cache<I> {
    prefix: &'static str,
    index: Arc<RwLock<I>>,
}

impl<I> Clone for Cache<I> {
    fn clone(&self) -> Self {
        Self {
            prefix: self.prefix,
            index: self.index.clone(),
        }
    }
}

impl<I: Index> Cache<I> {
    pub fn new(prefix: &'static str) -> Self {
        Self {
            prefix,
            index: Arc::new(RwLock::new(I::default())),
        }
    }

    /// Runs `f` over the index as it is now.
    pub fn read<T>(&self, f: impl FnOnce(&I) -> T) -> T {
        f(&self.index.read().unwrap_or_else(|p| p.into_inner()))
    }

    fn write(&self, f: impl FnOnce(&mut I)) {
        f(&mut self.index.write().unwrap_or_else(|p| p.into_inner()));
    }

    /// Reads every object under the prefix into a fresh index; returns the revision read at.
    pub async fn load(&self, objects: &Objects) -> ApiResult<Revision> {
        let mut index = I::default();
        let mut start_after = None;
        loop {
            let page = objects
                .store
                .range(RangeRequest {
                    prefix: self.prefix.as_bytes().to_vec(),
                    start_after: start_after.take(),
                    limit: 1000,
                    revision: 0,
                    serializable: false,
                })
                .await?;
            for kv in &page.kvs {
                let key = String::from_utf8_lossy(&kv.key);
                index.apply(&key, Some(objects.decode(kv)?));
            }
            if !page.more {
                self.write(|i| *i = index);
                return Ok(page.revision);
            }
            start_after = page.kvs.last().map(|kv| kv.key.clone());
        }
    }

    /// Keeps the index current from `from` on, until the store closes.
    pub async fn run(self, objects: Objects, mut from: Revision) {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.follow(&objects, from).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(error = %e, prefix = self.prefix, "following the store failed; reading it again");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    match self.load(&objects).await {
                        Ok(rev) => {
                            from = rev;
                            backoff = Duration::from_millis(100);
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, prefix = self.prefix, "reading the store failed")
                        }
                    }
                }
            }
        }
    }

    /// Applies changes after `from` as they come; Ok when the store closes.
    async fn follow(&self, objects: &Objects, from: Revision) -> ApiResult<()> {
        let mut watch = match objects.store.watch(self.prefix, from + 1) {
            Ok(w) => w,
            Err(baton_store::Error::Closed) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        while let Some(ev) = watch.next().await {
            match ev {
                Ok(WatchEvent::Events(revs)) => {
                    for e in revs.events {
                        let key = String::from_utf8_lossy(&e.kv.key).into_owned();
                        let obj = match e.kind {
                            EventKind::Put => Some(objects.decode(&e.kv)?),
                            EventKind::Delete => None,
                        };
                        self.write(|i| i.apply(&key, obj));
                    }
                }
                Ok(WatchEvent::Progress(_)) => {}
                Err(baton_store::Error::Closed) => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}
