//! Events go an hour after they were last written, as kube-apiserver's `--event-ttl`
//! has them.
//!
//! kube-apiserver attaches each Event it writes to an etcd lease of that length, and
//! etcd deletes the Event when the lease runs out. Without that, a cluster keeps every
//! Event ever written: a 5,000-node run writes 800,000 in a quarter of an hour. Baton's
//! store has no leases, so each API server keeps a queue of the Events in the order they
//! were last written: the store's Events once at start, aged by their own timestamps,
//! then every write seen through a watch of their prefix. When the oldest are due, it
//! deletes them, many in one store transaction, each only if it was not written again
//! since (its mod revision is still the one queued; a later write queued it again).
//!
//! Every API server follows, but only the one beside the store's Raft leader deletes
//! (over etcd, each does: the revisions keep a second deletion from doing anything).
//! The others keep what is due a minute longer, so that a member that comes to lead
//! deletes what the old leader left.

use std::collections::VecDeque;
use std::time::Duration;

use baton_store::{
    Compare, CompareOp, EventKind, Op, OpResult, RangeRequest, Store, Txn, WatchEvent,
};
use k8s_openapi::chrono::{DateTime, Utc};
use tokio::time::Instant;

use crate::objects::Objects;
use crate::resources;

/// kube-apiserver's default `--event-ttl`.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);

/// Deletions per store transaction.
const BATCH: usize = 256;

/// The least time between two rounds of deletions: Events due within it go together.
const ROUND: Duration = Duration::from_secs(1);

/// How long a member that does not lead keeps an Event past its time, for the case
/// where it comes to lead before the leader deleted it.
const FOLLOWER_GRACE: Duration = Duration::from_secs(60);

/// Why following or expiring Events stopped; the task starts over after a pause.
#[derive(Debug, thiserror::Error)]
pub enum EventTtlError {
    #[error("cannot read the Events")]
    Read(#[source] baton_store::Error),
    #[error("the watch of the Events failed")]
    Watch(#[source] baton_store::Error),
    #[error("the watch of the Events ended")]
    WatchEnded,
    #[error("cannot delete expired Events")]
    Delete(#[source] baton_store::Error),
}

/// Expires Events `ttl` after their last write, until the task is dropped.
pub async fn run(objects: Objects, ttl: Duration) {
    loop {
        if let Err(e) = follow(&objects.store, ttl).await {
            tracing::warn!(error = %baton_kube::error::chain(&e), "expiring Events paused");
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

/// An Event's key and the revision it was last written at, due at `due`.
#[derive(Debug)]
struct Due {
    due: Instant,
    key: Vec<u8>,
    revision: i64,
}

fn prefix() -> Vec<u8> {
    resources::builtin("Event").key_prefix().into_bytes()
}

/// When an Event was last written, by its own account: the latest of its timestamps.
fn written_at(value: &[u8]) -> Option<DateTime<Utc>> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Stamps {
        metadata: Option<Meta>,
        last_timestamp: Option<String>,
        event_time: Option<String>,
        series: Option<Series>,
    }
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Meta {
        creation_timestamp: Option<String>,
    }
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Series {
        last_observed_time: Option<String>,
    }
    let s: Stamps = serde_json::from_slice(value).ok()?;
    [
        s.metadata.and_then(|m| m.creation_timestamp),
        s.last_timestamp,
        s.event_time,
        s.series.and_then(|s| s.last_observed_time),
    ]
    .into_iter()
    .flatten()
    .filter_map(|t| t.parse::<DateTime<Utc>>().ok())
    .max()
}

/// Reads the store's Events into the queue, then follows their writes and deletes what
/// is due, until the watch fails.
async fn follow(store: &Store, ttl: Duration) -> Result<(), EventTtlError> {
    let prefix = prefix();
    let mut queue = VecDeque::new();
    let revision = read_all(store, &prefix, ttl, &mut queue).await?;
    let mut watch = store
        .watch(prefix, revision + 1)
        .map_err(EventTtlError::Watch)?;
    let mut next_round = Instant::now();
    loop {
        let due = queue
            .front()
            .map(|d: &Due| d.due.max(next_round))
            .unwrap_or_else(|| Instant::now() + ttl);
        tokio::select! {
            event = watch.next() => match event {
                Some(Ok(WatchEvent::Events(rev))) => {
                    for e in rev.events {
                        if matches!(e.kind, EventKind::Put) {
                            queue.push_back(Due {
                                due: Instant::now() + ttl,
                                key: e.kv.key,
                                revision: e.kv.mod_revision,
                            });
                        }
                    }
                }
                Some(Ok(WatchEvent::Progress(_))) => {}
                Some(Err(e)) => return Err(EventTtlError::Watch(e)),
                None => return Err(EventTtlError::WatchEnded),
            },
            _ = tokio::time::sleep_until(due) => {
                next_round = Instant::now() + ROUND;
                if store.is_external() || store.is_leader() {
                    // What could not be deleted stays first in the queue, for the next
                    // round.
                    if let Err(e) = expire(store, &mut queue).await {
                        tracing::warn!(error = %baton_kube::error::chain(&e), "expired Events not deleted yet");
                    }
                } else {
                    // The leader's to delete; kept a while in case this member leads
                    // before it did.
                    let now = Instant::now();
                    while queue.front().is_some_and(|d| d.due + FOLLOWER_GRACE <= now) {
                        queue.pop_front();
                    }
                }
            }
        }
    }
}

/// Queues every Event the store holds, due a TTL after its latest timestamp (a TTL from
/// now if none parses); returns the revision read at.
#[tracing::instrument(skip_all)]
async fn read_all(
    store: &Store,
    prefix: &[u8],
    ttl: Duration,
    queue: &mut VecDeque<Due>,
) -> Result<i64, EventTtlError> {
    let (now, at) = (Utc::now(), Instant::now());
    let mut req = RangeRequest::prefix(prefix.to_vec());
    req.limit = 1000;
    let mut found = Vec::new();
    loop {
        let page = store
            .range(req.clone())
            .await
            .map_err(EventTtlError::Read)?;
        req.revision = page.revision;
        req.start_after = page.kvs.last().map(|kv| kv.key.clone());
        for kv in page.kvs {
            let age = written_at(&kv.value)
                .and_then(|t| (now - t).to_std().ok())
                .unwrap_or_default();
            found.push(Due {
                due: at + ttl.saturating_sub(age),
                key: kv.key,
                revision: kv.mod_revision,
            });
        }
        if !page.more {
            break;
        }
    }
    found.sort_by_key(|d| d.due);
    queue.extend(found);
    Ok(req.revision)
}

/// Deletes the Events due by now, in batches; one written again since it was queued
/// stays (a later entry holds its new revision).
#[tracing::instrument(skip_all)]
async fn expire(store: &Store, queue: &mut VecDeque<Due>) -> Result<(), EventTtlError> {
    let now = Instant::now();
    while queue.front().is_some_and(|d| d.due <= now) {
        let n = queue
            .iter()
            .take(BATCH)
            .take_while(|d| d.due <= now)
            .count();
        let batch: Vec<Due> = queue.drain(..n).collect();
        match delete_unchanged(store, &batch).await {
            Ok(gone) => tracing::debug!(due = batch.len(), gone, "expired Events deleted"),
            Err(e) => {
                // Tried again at the next round.
                for d in batch.into_iter().rev() {
                    queue.push_front(d);
                }
                return Err(e);
            }
        }
    }
    Ok(())
}

/// Deletes each key of `batch` that still has its queued revision; returns how many went.
async fn delete_unchanged(store: &Store, batch: &[Due]) -> Result<usize, EventTtlError> {
    let mut left: Vec<&Due> = batch.iter().collect();
    // The first try assumes every Event is as queued; when one is not, the answer says
    // which are, and the second takes those. A third try would only meet Events written
    // in the moment between: they are queued again anyway.
    for _ in 0..2 {
        if left.is_empty() {
            return Ok(0);
        }
        let txn = Txn::new()
            .when(
                left.iter()
                    .map(|d| Compare::mod_revision(d.key.clone(), CompareOp::Equal, d.revision)),
            )
            .and_then(left.iter().map(|d| Op::delete(d.key.clone())))
            .or_else(left.iter().map(|d| Op::get(d.key.clone())));
        let resp = store.txn(txn).await.map_err(EventTtlError::Delete)?;
        if resp.succeeded {
            return Ok(left.len());
        }
        left = left
            .into_iter()
            .zip(resp.results)
            .filter_map(|(d, r)| match r {
                OpResult::Get { kv: Some(kv) } if kv.mod_revision == d.revision => Some(d),
                _ => None,
            })
            .collect();
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_was_written_at_its_latest_timestamp() {
        let t = |v: serde_json::Value| written_at(v.to_string().as_bytes()).map(|t| t.to_rfc3339());
        assert_eq!(
            t(
                serde_json::json!({"metadata": {"creationTimestamp": "2026-01-01T00:00:00Z"},
                "lastTimestamp": "2026-01-01T01:00:00Z",
                "series": {"lastObservedTime": "2026-01-01T00:30:00.000000Z"}})
            ),
            Some("2026-01-01T01:00:00+00:00".to_string())
        );
        assert_eq!(
            t(serde_json::json!({"eventTime": "2026-01-01T02:00:00.123456Z"})),
            Some("2026-01-01T02:00:00.123456+00:00".to_string())
        );
        assert_eq!(t(serde_json::json!({"lastTimestamp": "yesterday"})), None);
        assert_eq!(written_at(b"not json"), None);
    }

    #[tokio::test]
    async fn a_batch_deletes_only_what_was_not_written_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_embedded(dir.path()).await.unwrap();
        let key = |k: &str| format!("{}default/{k}", String::from_utf8(prefix()).unwrap());
        let a = store.put(key("a"), b"{}".to_vec()).await.unwrap();
        let b = store.put(key("b"), b"{}".to_vec()).await.unwrap();
        store.put(key("b"), b"{}".to_vec()).await.unwrap();
        let c = store.put(key("c"), b"{}".to_vec()).await.unwrap();
        store.delete(key("c")).await.unwrap();
        let due = |k: &str, revision| Due {
            due: Instant::now(),
            key: key(k).into_bytes(),
            revision,
        };
        let gone = delete_unchanged(&store, &[due("a", a), due("b", b), due("c", c)])
            .await
            .unwrap();
        assert_eq!(gone, 1);
        let held = |k: &str| {
            let store = store.clone();
            let k = key(k);
            async move {
                store
                    .get(k.as_bytes(), Default::default())
                    .await
                    .unwrap()
                    .is_some()
            }
        };
        assert!(!held("a").await);
        assert!(held("b").await, "written again after it was queued");
        store.shutdown().await.unwrap();
    }
}
