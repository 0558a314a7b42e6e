//! The multi-version key-value state machine, stored in RocksDB.
//!
//! # Layout
//! - `kv`: one entry per key per revision that wrote it: `key ++ 0x00 ++ revision (8 bytes,
//!   big-endian)` to a [`Record`]. A delete writes a tombstone. Because 0x00 sorts first and
//!   keys may not contain it, all revisions of one key are adjacent and ordered, and a read of
//!   key `k` at revision `r` is one `seek_for_prev(k ++ 0x00 ++ r)`.
//! - `rev`: revision (8 bytes, big-endian) to the events committed at it. Watchers that start
//!   in the past read it; every revision above the compaction floor has an entry, since only
//!   writes create revisions, so a missing entry can only mean "compacted". An entry names
//!   the keys changed (see [`Kept`]); their values are the versions in `kv` at that
//!   revision and the one before, which is how etcd rebuilds its events too. Keeping the
//!   values here as well wrote each update's value three times (`kv`, the event, the event's
//!   previous value), and at 5,000 nodes RocksDB's compactions of those copies took a
//!   twelfth of the control plane's CPU. The entry at the compaction floor is kept whole,
//!   since the versions before it are gone, and so are entries from earlier versions of
//!   Baton.
//! - `meta`: the current revision and the compaction floor.
//!
//! # Consistency of reads
//! Every read is "at a revision": the reader picks the current revision first and ignores
//! anything newer. A write batch may land while a range is being read, but the range still
//! sees exactly one revision. Ranges also read through a RocksDB snapshot so that a
//! concurrent compaction cannot remove entries under them.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use rocksdb::{Direction, IteratorMode, WriteBatch, WriteOptions, DB};
use serde::{Deserialize, Serialize};

use crate::db::{CF_KV, CF_META, CF_REV};
use crate::dump::{DumpError, DumpReader, DumpWriter, Family, Head};
use crate::types::*;

const META_REVISION: &[u8] = b"revision";
const META_COMPACT: &[u8] = b"compact_revision";
/// How far ahead a dump reads the store (see [`write_dump`]).
const DUMP_READAHEAD: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum MvccError {
    #[error("revision {requested} has been compacted; the oldest readable revision is {compact_revision}")]
    Compacted {
        requested: Revision,
        compact_revision: Revision,
    },
    #[error("revision {requested} is newer than the store's revision {current}")]
    FutureRevision {
        requested: Revision,
        current: Revision,
    },
    #[error("storage engine error")]
    Rocks(#[from] rocksdb::Error),
    #[error("undecodable record in the store")]
    Decode(#[from] postcard::Error),
    #[error("snapshot body")]
    Dump(#[from] DumpError),
}

/// One version of one key, as stored.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Record {
    create_revision: Revision,
    version: i64,
    /// None marks a delete.
    #[serde(with = "serde_bytes")]
    value: Option<Vec<u8>>,
}

/// A [`Record`] read without copying its value: for the passes over the whole `kv`
/// column family that only need to know whether a version is a tombstone.
#[derive(Deserialize)]
struct RecordHead<'a> {
    // Read in their places (postcard's fields are positional), and then not used.
    _create_revision: Revision,
    _version: i64,
    #[serde(borrow)]
    value: Option<&'a [u8]>,
}

fn is_tombstone(raw: &[u8]) -> Result<bool, postcard::Error> {
    Ok(postcard::from_bytes::<RecordHead<'_>>(raw)?.value.is_none())
}

/// The first byte of a `rev` entry that keeps its changes by key. Any other entry is a
/// whole `Vec<Event>`, as every entry was before: a postcard vector starts with its
/// length, and no revision has no events.
const BY_KEY: u8 = 0;

/// One change in a `rev` entry kept by key: the changed key, whose versions in `kv` give
/// the event; or, for a key changed twice in one transaction (whose first change `kv`
/// no longer holds), the whole event. `K` and `E` are borrowed when written, owned when
/// read.
#[derive(Serialize, Deserialize)]
enum Kept<K, E> {
    Key(K),
    Whole(E),
}

/// The `rev` entry of one revision's events, kept by key.
fn keep_by_key(events: &[Event]) -> Result<Vec<u8>, postcard::Error> {
    let mut seen = std::collections::HashSet::with_capacity(events.len());
    let twice: std::collections::HashSet<&[u8]> = events
        .iter()
        .map(|e| e.kv.key.as_slice())
        .filter(|k| !seen.insert(*k))
        .collect();
    let kept: Vec<Kept<&serde_bytes::Bytes, &Event>> = events
        .iter()
        .map(|e| match twice.contains(e.kv.key.as_slice()) {
            true => Kept::Whole(e),
            false => Kept::Key(serde_bytes::Bytes::new(&e.kv.key)),
        })
        .collect();
    postcard::to_extend(&kept, vec![BY_KEY])
}

/// The events of revision `rev` from its `rev` entry, the values of those kept by key
/// read through `kv` (an iterator over the `kv` column family). None when a version
/// they need is gone: a compaction removed it after the entry was read.
fn events_of(
    raw: &[u8],
    rev: Revision,
    kv: &mut rocksdb::DBRawIterator<'_>,
) -> Result<Option<Vec<Event>>, MvccError> {
    let Some(by_key) = raw.strip_prefix(&[BY_KEY]) else {
        return Ok(Some(postcard::from_bytes(raw)?));
    };
    let kept: Vec<Kept<serde_bytes::ByteBuf, Event>> = postcard::from_bytes(by_key)?;
    let mut events = Vec::with_capacity(kept.len());
    for k in kept {
        let key = match k {
            Kept::Whole(event) => {
                events.push(event);
                continue;
            }
            Kept::Key(key) => key.into_vec(),
        };
        // The version this revision wrote (a tombstone for a delete), then the one before.
        kv.seek_for_prev(kv_key(&key, rev));
        let Some(this) = version_of(kv, &key)?.filter(|(r, _)| *r == rev) else {
            kv.status()?;
            return Ok(None);
        };
        kv.prev();
        let prev = version_of(kv, &key)?.and_then(|(r, rec)| rec.to_kv(&key, r));
        kv.status()?;
        let event = match this.1.to_kv(&key, rev) {
            Some(kv) => Event {
                kind: EventKind::Put,
                kv,
                prev_kv: prev,
            },
            // A delete always had something to delete.
            None if prev.is_none() => return Ok(None),
            None => Event {
                kind: EventKind::Delete,
                kv: KeyValue {
                    key,
                    value: Vec::new(),
                    create_revision: 0,
                    mod_revision: rev,
                    version: 0,
                },
                prev_kv: prev,
            },
        };
        events.push(event);
    }
    Ok(Some(events))
}

/// The version of `key` where `it` stands, if it stands on one.
fn version_of(
    it: &rocksdb::DBRawIterator<'_>,
    key: &[u8],
) -> Result<Option<(Revision, Record)>, MvccError> {
    let (Some(raw), Some(val)) = (it.key(), it.value()) else {
        return Ok(None);
    };
    match split_kv_key(raw) {
        Some((k, rev)) if k == key => Ok(Some((rev, postcard::from_bytes(val)?))),
        _ => Ok(None),
    }
}

impl Record {
    fn to_kv(&self, key: &[u8], mod_revision: Revision) -> Option<KeyValue> {
        self.value.as_ref().map(|value| KeyValue {
            key: key.to_vec(),
            value: value.clone(),
            create_revision: self.create_revision,
            mod_revision,
            version: self.version,
        })
    }
}

fn kv_key(key: &[u8], rev: Revision) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 9);
    k.extend_from_slice(key);
    k.push(0);
    k.extend_from_slice(&rev.to_be_bytes());
    k
}

fn split_kv_key(raw: &[u8]) -> Option<(&[u8], Revision)> {
    if raw.len() < 9 || raw[raw.len() - 9] != 0 {
        return None;
    }
    let (key, rest) = raw.split_at(raw.len() - 9);
    let rev = i64::from_be_bytes(rest[1..].try_into().ok()?);
    Some((key, rev))
}

/// The revision-indexed key-value state of one member.
#[derive(Debug)]
pub(crate) struct Mvcc {
    db: Arc<DB>,
    revision: AtomicI64,
    compact: AtomicI64,
    /// Where the newest version of every live key is, as etcd's in-memory key index: the
    /// apply path finds a key's current version with a hash lookup and a point read
    /// instead of a RocksDB iterator seek. Only the (single) applier uses it.
    index: Mutex<HashMap<Vec<u8>, Revision>>,
    /// How long writing an applied batch takes.
    commit_latency: prometheus_client::metrics::histogram::Histogram,
}

/// The consistent state that a snapshot carried, whole, before [`crate::dump`]'s
/// streamed body: the body of snapshot files saved by earlier versions.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Dump {
    pub revision: Revision,
    pub compact_revision: Revision,
    /// Every row of `meta` but the member id, including the Raft position written with
    /// the data, so a snapshot is consistent with the log id it claims.
    pub meta: Vec<(Vec<u8>, Vec<u8>)>,
    pub kv: Vec<(Vec<u8>, Vec<u8>)>,
    pub rev: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Dump {
    /// This state as a streamed body, for a snapshot file saved by an earlier version.
    pub(crate) fn write_body<W: Write>(&self, out: W) -> Result<(W, u64), DumpError> {
        let head = Head {
            revision: self.revision,
            compact_revision: self.compact_revision,
            meta: self.meta.clone(),
        };
        let mut w = DumpWriter::new(out, &head)?;
        for (family, rows) in [(Family::Kv, &self.kv), (Family::Rev, &self.rev)] {
            for (k, v) in rows {
                w.row(family, k, v)?;
            }
        }
        w.finish()
    }
}

impl Mvcc {
    pub(crate) fn open(db: Arc<DB>) -> Result<Self, MvccError> {
        let meta = db.cf_handle(CF_META).expect("meta column family");
        let read = |k| -> Result<Revision, MvccError> {
            Ok(db
                .get_cf(meta, k)?
                .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
                .map(i64::from_be_bytes)
                .unwrap_or(0))
        };
        let revision = read(META_REVISION)?;
        let compact = read(META_COMPACT)?;
        let mvcc = Self {
            db,
            revision: AtomicI64::new(revision),
            compact: AtomicI64::new(compact),
            index: Mutex::new(HashMap::new()),
            commit_latency: crate::Latencies::default().backend_commit,
        };
        mvcc.rebuild_index()?;
        Ok(mvcc)
    }

    /// Rebuilds the key index from the `kv` history (at open, after a snapshot install).
    fn rebuild_index(&self) -> Result<(), MvccError> {
        let cf = self.db.cf_handle(CF_KV).expect("kv column family");
        let mut index = HashMap::new();
        let mut last: Option<(Vec<u8>, Revision, bool)> = None;
        let mut settle = |last: Option<(Vec<u8>, Revision, bool)>| {
            if let Some((key, rev, live)) = last {
                if live {
                    index.insert(key, rev);
                }
            }
        };
        for item in self.db.iterator_cf(cf, IteratorMode::Start) {
            let (raw, val) = item?;
            let Some((key, rev)) = split_kv_key(&raw) else {
                continue;
            };
            let live = !is_tombstone(&val)?;
            if last.as_ref().is_some_and(|(k, _, _)| k.as_slice() != key) {
                settle(last.take());
            }
            last = Some((key.to_vec(), rev, live));
        }
        settle(last);
        *self.index.lock().expect("key index lock") = index;
        Ok(())
    }

    pub(crate) fn revision(&self) -> Revision {
        self.revision.load(Ordering::Acquire)
    }

    pub(crate) fn compact_revision(&self) -> Revision {
        self.compact.load(Ordering::Acquire)
    }

    /// Resolves "0 = latest" and checks the revision is readable.
    fn read_revision(&self, requested: Revision) -> Result<Revision, MvccError> {
        let current = self.revision();
        if requested == 0 {
            return Ok(current);
        }
        if requested > current {
            return Err(MvccError::FutureRevision { requested, current });
        }
        let compact_revision = self.compact_revision();
        if requested < compact_revision {
            return Err(MvccError::Compacted {
                requested,
                compact_revision,
            });
        }
        Ok(requested)
    }

    fn latest(&self, key: &[u8], at: Revision) -> Result<Option<(Revision, Record)>, MvccError> {
        let cf = self.db.cf_handle(CF_KV).expect("kv column family");
        let mut it = self.db.raw_iterator_cf(cf);
        it.seek_for_prev(kv_key(key, at));
        if let (Some(raw), Some(val)) = (it.key(), it.value()) {
            if let Some((k, rev)) = split_kv_key(raw) {
                if k == key {
                    return Ok(Some((rev, postcard::from_bytes(val)?)));
                }
            }
        }
        it.status()?;
        Ok(None)
    }

    /// Reads one key at a revision (0 = latest).
    pub(crate) fn get(
        &self,
        key: &[u8],
        revision: Revision,
    ) -> Result<(Option<KeyValue>, Revision), MvccError> {
        let at = self.read_revision(revision)?;
        let kv = self
            .latest(key, at)?
            .and_then(|(rev, rec)| rec.to_kv(key, rev));
        Ok((kv, at))
    }

    /// Reads the keys under a prefix at a revision, one page at a time.
    pub(crate) fn range(&self, req: &RangeRequest) -> Result<RangeResponse, MvccError> {
        let at = self.read_revision(req.revision)?;
        let snap = self.db.snapshot();
        let cf = self.db.cf_handle(CF_KV).expect("kv column family");
        let start = match &req.start_after {
            // Every entry of `after` sorts before `after ++ 0x01`, so seeking there skips it.
            Some(after) if after.as_slice() >= req.prefix.as_slice() => {
                let mut s = after.clone();
                s.push(1);
                s
            }
            _ => req.prefix.clone(),
        };
        let mut kvs = Vec::new();
        let mut more = false;
        // The newest version at or below `at` of the key being scanned.
        let mut pending: Option<(Vec<u8>, Revision, Record)> = None;
        let flush =
            |pending: &mut Option<(Vec<u8>, Revision, Record)>, kvs: &mut Vec<KeyValue>| -> bool {
                if let Some((key, rev, rec)) = pending.take() {
                    if let Some(kv) = rec.to_kv(&key, rev) {
                        if req.limit > 0 && kvs.len() == req.limit {
                            return true;
                        }
                        kvs.push(kv);
                    }
                }
                false
            };
        let iter = snap.iterator_cf(cf, IteratorMode::From(&start, Direction::Forward));
        for item in iter {
            let (raw, val) = item?;
            if !raw.starts_with(&req.prefix) {
                break;
            }
            let Some((key, rev)) = split_kv_key(&raw) else {
                continue;
            };
            let same_key = pending
                .as_ref()
                .is_some_and(|(k, _, _)| k.as_slice() == key);
            if !same_key && flush(&mut pending, &mut kvs) {
                more = true;
                break;
            }
            if rev <= at {
                pending = Some((key.to_vec(), rev, postcard::from_bytes(&val)?));
            } else if !same_key {
                // The key's first version is newer than `at`; remember the key only so
                // that its later versions are recognised as the same key.
                pending = Some((
                    key.to_vec(),
                    rev,
                    Record {
                        create_revision: 0,
                        version: 0,
                        value: None,
                    },
                ));
            }
        }
        if !more && flush(&mut pending, &mut kvs) {
            more = true;
        }
        Ok(RangeResponse {
            kvs,
            more,
            revision: at,
        })
    }

    /// Reads committed events from `from` on, at most `max` revisions.
    pub(crate) fn events_since(
        &self,
        from: Revision,
        max: usize,
    ) -> Result<Vec<RevisionEvents>, MvccError> {
        let from = from.max(1);
        let compact_revision = self.compact_revision();
        if from < compact_revision {
            return Err(MvccError::Compacted {
                requested: from,
                compact_revision,
            });
        }
        let upto = self.revision();
        let cf = self.db.cf_handle(CF_REV).expect("rev column family");
        let kv_cf = self.db.cf_handle(CF_KV).expect("kv column family");
        // The entries and the versions they name, as of one moment: a compaction that
        // lands meanwhile is seen whole or not at all.
        let snap = self.db.snapshot();
        let mut at_snap = rocksdb::ReadOptions::default();
        at_snap.set_snapshot(&snap);
        let mut kv = self.db.raw_iterator_cf_opt(kv_cf, at_snap);
        let start = from.to_be_bytes();
        let mut out = Vec::new();
        let iter = snap.iterator_cf(cf, IteratorMode::From(&start, Direction::Forward));
        let compacted = |expected| MvccError::Compacted {
            requested: expected,
            compact_revision: self.compact_revision(),
        };
        for (item, expected) in iter.zip(from..) {
            let (raw, val) = item?;
            let rev = i64::from_be_bytes(raw.as_ref().try_into().unwrap_or([0; 8]));
            if rev > upto || out.len() >= max {
                break;
            }
            if rev != expected {
                // Only compaction removes revisions, so a hole means one raced this read.
                return Err(compacted(expected));
            }
            let events = events_of(&val, rev, &mut kv)?.ok_or_else(|| compacted(rev))?;
            out.push(RevisionEvents {
                revision: rev,
                events,
            });
        }
        if out.is_empty() && from <= upto {
            return Err(MvccError::Compacted {
                requested: from,
                compact_revision: self.compact_revision(),
            });
        }
        Ok(out)
    }

    /// Starts a batch of writes, applied together and made visible at once by [`Self::commit`].
    pub(crate) fn begin(&self) -> ApplyBatch<'_> {
        ApplyBatch {
            mvcc: self,
            index: self.index.lock().expect("key index lock"),
            batch: WriteBatch::default(),
            revision: self.revision(),
            compact: self.compact_revision(),
            overlay: HashMap::new(),
            events: Vec::new(),
        }
    }

    /// How many live keys start with each of `prefixes`, in one pass over the key index.
    /// The prefixes end with `/` at the same depth (`/registry/GROUP/RESOURCE/`), so a
    /// key is matched by one lookup of its own prefix of that depth.
    pub(crate) fn count_prefixes(&self, prefixes: &[Vec<u8>]) -> Vec<u64> {
        let slashes = |p: &[u8]| p.iter().filter(|b| **b == b'/').count();
        let mut counts = vec![0; prefixes.len()];
        let mut at: HashMap<&[u8], usize> = HashMap::new();
        let mut depths: Vec<usize> = Vec::new();
        for (i, p) in prefixes.iter().enumerate() {
            at.insert(p.as_slice(), i);
            let d = slashes(p);
            if !depths.contains(&d) {
                depths.push(d);
            }
        }
        let index = self.index.lock().expect("key index lock");
        for key in index.keys() {
            for depth in &depths {
                // The key up to and with its `depth`-th slash.
                let end = key
                    .iter()
                    .enumerate()
                    .filter(|(_, b)| **b == b'/')
                    .nth(depth - 1)
                    .map(|(i, _)| i + 1);
                if let Some(i) = end.and_then(|e| at.get(&key[..e])) {
                    counts[*i] += 1;
                    break;
                }
            }
        }
        counts
    }

    /// Observes batch writes into `h` (the store's shared histogram).
    pub(crate) fn with_commit_latency(
        mut self,
        h: prometheus_client::metrics::histogram::Histogram,
    ) -> Self {
        self.commit_latency = h;
        self
    }

    /// Writes the batch (without sync: the Raft log is the durable record) and publishes its
    /// revision. Returns the events it committed, in revision order.
    pub(crate) fn commit(&self, mut ab: ApplyBatch<'_>) -> Result<Vec<RevisionEvents>, MvccError> {
        let meta = self.db.cf_handle(CF_META).expect("meta column family");
        ab.batch
            .put_cf(meta, META_REVISION, ab.revision.to_be_bytes());
        ab.batch
            .put_cf(meta, META_COMPACT, ab.compact.to_be_bytes());
        crate::latency::timed(&self.commit_latency, || self.db.write(ab.batch))?;
        for (key, (rev, rec)) in ab.overlay {
            if rec.value.is_some() {
                ab.index.insert(key, rev);
            } else {
                ab.index.remove(&key);
            }
        }
        self.compact.store(ab.compact, Ordering::Release);
        self.revision.store(ab.revision, Ordering::Release);
        Ok(ab.events)
    }

    /// A consistent copy of the whole state, for a Raft snapshot.
    #[cfg(test)]
    pub(crate) fn dump(&self) -> Result<Dump, MvccError> {
        let snap = self.db.snapshot();
        let meta = self.db.cf_handle(CF_META).expect("meta column family");
        let read = |k| -> Result<Revision, MvccError> {
            Ok(snap
                .get_cf(meta, k)?
                .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
                .map(i64::from_be_bytes)
                .unwrap_or(0))
        };
        let mut dump = Dump {
            revision: read(META_REVISION)?,
            compact_revision: read(META_COMPACT)?,
            meta: Vec::new(),
            kv: Vec::new(),
            rev: Vec::new(),
        };
        for item in snap.iterator_cf(meta, IteratorMode::Start) {
            let (k, v) = item?;
            if k.as_ref() != crate::db::META_MEMBER_ID {
                dump.meta.push((k.to_vec(), v.to_vec()));
            }
        }
        for (cf, out) in [(CF_KV, &mut dump.kv), (CF_REV, &mut dump.rev)] {
            let cf = self.db.cf_handle(cf).expect("column family");
            for item in snap.iterator_cf(cf, IteratorMode::Start) {
                let (k, v) = item?;
                out.push((k.to_vec(), v.to_vec()));
            }
        }
        Ok(dump)
    }

    /// Writes the whole state, as a snapshot carries it: see [`write_dump`].
    #[cfg(test)]
    pub(crate) fn write_dump<W: Write>(&self, out: W) -> Result<(Head, W, u64), MvccError> {
        write_dump(&self.db, out)
    }

    /// Replaces the whole state with a snapshot body's, read from `body` row by row and
    /// written in batches of about [`RESTORE_BATCH_BYTES`], so that the store is never
    /// held in memory. The first batch clears the data and applies `first`, with which
    /// the caller marks the state as incomplete (the Raft state machine drops its applied
    /// position); the last one, written only once the body's checksum held, carries the
    /// body's `meta` rows and is synced. A failure or crash in between leaves a state the
    /// caller knows to restore again. Returns the body's head.
    pub(crate) fn restore_from<R: Read>(
        &self,
        body: R,
        first: impl FnOnce(&mut WriteBatch),
    ) -> Result<Head, MvccError> {
        let (mut reader, head) = DumpReader::new(body)?;
        let meta = self.db.cf_handle(CF_META).expect("meta column family");
        let kv = self.db.cf_handle(CF_KV).expect("kv column family");
        let rev = self.db.cf_handle(CF_REV).expect("rev column family");
        let mut sync = WriteOptions::default();
        sync.set_sync(true);
        let mut batch = WriteBatch::default();
        clear_cf(&self.db, kv, &mut batch);
        clear_cf(&self.db, rev, &mut batch);
        first(&mut batch);
        self.db.write_opt(std::mem::take(&mut batch), &sync)?;
        while let Some((family, k, v)) = reader.next_row()? {
            let cf = match family {
                Family::Kv => kv,
                Family::Rev => rev,
            };
            batch.put_cf(cf, k, v);
            if batch.size_in_bytes() >= RESTORE_BATCH_BYTES {
                self.db.write(std::mem::take(&mut batch))?;
            }
        }
        for (k, v) in &head.meta {
            batch.put_cf(meta, k, v);
        }
        batch.put_cf(meta, META_REVISION, head.revision.to_be_bytes());
        batch.put_cf(meta, META_COMPACT, head.compact_revision.to_be_bytes());
        self.db.write_opt(batch, &sync)?;
        self.compact.store(head.compact_revision, Ordering::Release);
        self.revision.store(head.revision, Ordering::Release);
        self.rebuild_index()?;
        Ok(head)
    }
}

/// The `meta` rows of a store as `snap` sees them (but the member id, which is the
/// member's own), with the revisions they record: the head of a dump of it.
fn head_of(db: &DB, snap: &rocksdb::Snapshot<'_>) -> Result<Head, MvccError> {
    let meta_cf = db.cf_handle(CF_META).expect("meta column family");
    let mut meta = Vec::new();
    for item in snap.iterator_cf(meta_cf, IteratorMode::Start) {
        let (k, v) = item?;
        if k.as_ref() != crate::db::META_MEMBER_ID {
            meta.push((k.to_vec(), v.to_vec()));
        }
    }
    let mut head = Head {
        meta,
        ..Head::default()
    };
    let revision_of = |k: &[u8]| {
        head.meta(k)
            .and_then(|v| <[u8; 8]>::try_from(v).ok())
            .map(i64::from_be_bytes)
            .unwrap_or(0)
    };
    (head.revision, head.compact_revision) =
        (revision_of(META_REVISION), revision_of(META_COMPACT));
    Ok(head)
}

/// The head a dump of `db` would start with: its `meta` rows, which record the Raft
/// position the data is at, and its revisions.
pub(crate) fn read_head(db: &DB) -> Result<Head, MvccError> {
    head_of(db, &db.snapshot())
}

/// Writes the whole state of `db` (the live store, or a checkpoint of it), as a snapshot
/// carries it (see [`crate::dump`]), from one RocksDB snapshot into `out`, row by row:
/// nothing but the `meta` rows is held in memory. Returns the head, from which the caller
/// reads the Raft position consistent with the data, the writer, and the body's length.
pub(crate) fn write_dump<W: Write>(db: &DB, out: W) -> Result<(Head, W, u64), MvccError> {
    let snap = db.snapshot();
    let head = head_of(db, &snap)?;
    let mut w = DumpWriter::new(out, &head)?;
    for (name, family) in [(CF_KV, Family::Kv), (CF_REV, Family::Rev)] {
        let cf = db.cf_handle(name).expect("column family");
        // A dump reads the whole store once, in order: its blocks would push the
        // writes' working set out of the block cache, and read ahead in large steps
        // they cost a fraction of the reads one block at a time.
        let mut once = rocksdb::ReadOptions::default();
        once.fill_cache(false);
        once.set_readahead_size(DUMP_READAHEAD);
        for item in snap.iterator_cf_opt(cf, once, IteratorMode::Start) {
            let (k, v) = item?;
            w.row(family, &k, &v)?;
        }
    }
    let (out, len) = w.finish()?;
    Ok((head, out, len))
}

/// How much a snapshot restore writes to RocksDB at a time.
const RESTORE_BATCH_BYTES: usize = 8 << 20;

/// Deletes every key of a column family within a batch.
pub(crate) fn clear_cf(db: &DB, cf: &rocksdb::ColumnFamily, batch: &mut WriteBatch) {
    // Keys of every column family are bounded by the largest key present; a range delete
    // up to one byte past it covers all of them.
    let mut it = db.raw_iterator_cf(cf);
    it.seek_to_first();
    let Some(first) = it.key().map(<[u8]>::to_vec) else {
        return;
    };
    it.seek_to_last();
    let mut last = it
        .key()
        .map(<[u8]>::to_vec)
        .unwrap_or_else(|| first.clone());
    last.push(0);
    batch.delete_range_cf(cf, first, last);
}

/// Writes being applied: later transactions of the batch see the earlier ones.
pub(crate) struct ApplyBatch<'a> {
    mvcc: &'a Mvcc,
    index: MutexGuard<'a, HashMap<Vec<u8>, Revision>>,
    batch: WriteBatch,
    revision: Revision,
    compact: Revision,
    /// The newest version of every key written in this batch, not yet in RocksDB.
    overlay: HashMap<Vec<u8>, (Revision, Record)>,
    events: Vec<RevisionEvents>,
}

impl std::fmt::Debug for ApplyBatch<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApplyBatch")
            .field("revision", &self.revision)
            .field("keys", &self.overlay.len())
            .finish()
    }
}

impl ApplyBatch<'_> {
    /// The underlying RocksDB batch, for the Raft metadata written with it.
    pub(crate) fn write_batch(&mut self) -> &mut WriteBatch {
        &mut self.batch
    }

    fn current(&self, key: &[u8]) -> Result<Option<(Revision, Record)>, MvccError> {
        if let Some((rev, rec)) = self.overlay.get(key) {
            return Ok(Some((*rev, rec.clone())));
        }
        let Some(&rev) = self.index.get(key) else {
            return Ok(None);
        };
        let cf = self.mvcc.db.cf_handle(CF_KV).expect("kv column family");
        match self.mvcc.db.get_pinned_cf(cf, kv_key(key, rev))? {
            Some(val) => Ok(Some((rev, postcard::from_bytes(&val)?))),
            None => Ok(None),
        }
    }

    fn current_kv(&self, key: &[u8]) -> Result<Option<KeyValue>, MvccError> {
        Ok(self
            .current(key)?
            .and_then(|(rev, rec)| rec.to_kv(key, rev)))
    }

    /// The revision of the key's live version, from the batch or the index: no read.
    fn current_revision(&self, key: &[u8]) -> Option<Revision> {
        match self.overlay.get(key) {
            Some((rev, rec)) => rec.value.is_some().then_some(*rev),
            None => self.index.get(key).copied(),
        }
    }

    fn holds(&self, c: &Compare) -> Result<bool, MvccError> {
        let ord = |have: i64, want: i64| have.cmp(&want);
        // The compares of an update (its mod revision) and of a create (that the key is
        // absent) are answered by the index; the put that follows reads the version once.
        let live = self.current_revision(&c.key);
        let ordering = match (&c.target, live) {
            (CompareTarget::ModRevision(r), _) => ord(live.unwrap_or(0), *r),
            (CompareTarget::CreateRevision(r) | CompareTarget::Version(r), None) => ord(0, *r),
            _ => return self.holds_on_value(c),
        };
        Ok(c.op.holds(ordering))
    }

    fn holds_on_value(&self, c: &Compare) -> Result<bool, MvccError> {
        let kv = self.current_kv(&c.key)?;
        let ord = |have: i64, want: i64| have.cmp(&want);
        let ordering = match &c.target {
            CompareTarget::ModRevision(r) => ord(kv.as_ref().map_or(0, |kv| kv.mod_revision), *r),
            CompareTarget::CreateRevision(r) => {
                ord(kv.as_ref().map_or(0, |kv| kv.create_revision), *r)
            }
            CompareTarget::Version(v) => ord(kv.as_ref().map_or(0, |kv| kv.version), *v),
            CompareTarget::Value(v) => match &kv {
                // An absent key has no value: every value compare on it fails.
                None => return Ok(false),
                Some(kv) => kv.value.as_slice().cmp(v.as_slice()),
            },
        };
        Ok(c.op.holds(ordering))
    }

    /// Applies one (validated) transaction at the next revision.
    pub(crate) fn txn(&mut self, txn: &Txn) -> Result<TxnResponse, MvccError> {
        let mut succeeded = true;
        for c in &txn.compares {
            if !self.holds(c)? {
                succeeded = false;
                break;
            }
        }
        let ops = if succeeded {
            &txn.success
        } else {
            &txn.failure
        };
        let rev = self.revision + 1;
        let kv_cf = self.mvcc.db.cf_handle(CF_KV).expect("kv column family");
        let mut events = Vec::new();
        let mut results = Vec::with_capacity(ops.len());
        for op in ops {
            match op {
                Op::Get { key } => results.push(OpResult::Get {
                    kv: self.current_kv(key)?,
                }),
                Op::Put { key, value } => {
                    let prev = self.current_kv(key)?;
                    let rec = Record {
                        create_revision: prev.as_ref().map_or(rev, |p| p.create_revision),
                        version: prev.as_ref().map_or(1, |p| p.version + 1),
                        value: Some(value.clone()),
                    };
                    self.batch
                        .put_cf(kv_cf, kv_key(key, rev), postcard::to_stdvec(&rec)?);
                    let kv = rec.to_kv(key, rev).expect("put record has a value");
                    self.overlay.insert(key.clone(), (rev, rec));
                    events.push(Event {
                        kind: EventKind::Put,
                        kv,
                        prev_kv: prev.clone(),
                    });
                    results.push(OpResult::Put { prev });
                }
                Op::Delete { key } => {
                    let prev = self.current_kv(key)?;
                    if prev.is_some() {
                        let rec = Record {
                            create_revision: 0,
                            version: 0,
                            value: None,
                        };
                        self.batch
                            .put_cf(kv_cf, kv_key(key, rev), postcard::to_stdvec(&rec)?);
                        self.overlay.insert(key.clone(), (rev, rec));
                        let kv = KeyValue {
                            key: key.clone(),
                            value: Vec::new(),
                            create_revision: 0,
                            mod_revision: rev,
                            version: 0,
                        };
                        events.push(Event {
                            kind: EventKind::Delete,
                            kv,
                            prev_kv: prev.clone(),
                        });
                    }
                    results.push(OpResult::Delete { prev });
                }
            }
        }
        if !events.is_empty() {
            self.revision = rev;
            let rev_cf = self.mvcc.db.cf_handle(CF_REV).expect("rev column family");
            self.batch
                .put_cf(rev_cf, rev.to_be_bytes(), keep_by_key(&events)?);
            self.events.push(RevisionEvents {
                revision: rev,
                events,
            });
        }
        Ok(TxnResponse {
            succeeded,
            revision: self.revision,
            results,
        })
    }

    /// Drops history below `at`: every key keeps its newest version at or below `at`.
    pub(crate) fn compact(&mut self, at: Revision) -> Result<Result<(), MvccError>, MvccError> {
        if at <= self.compact {
            return Ok(Err(MvccError::Compacted {
                requested: at,
                compact_revision: self.compact,
            }));
        }
        if at > self.revision {
            return Ok(Err(MvccError::FutureRevision {
                requested: at,
                current: self.revision,
            }));
        }
        let db = &self.mvcc.db;
        let kv_cf = db.cf_handle(CF_KV).expect("kv column family");
        let rev_cf = db.cf_handle(CF_REV).expect("rev column family");
        // The floor's events are kept whole: the versions before them, which their
        // previous values are, go now. A revision of this batch is not in RocksDB yet.
        let floor = match self.events.iter().find(|re| re.revision == at) {
            Some(re) => Some(re.events.clone()),
            None => match db.get_pinned_cf(rev_cf, at.to_be_bytes())? {
                Some(raw) if raw.first() == Some(&BY_KEY) => {
                    events_of(&raw, at, &mut db.raw_iterator_cf(kv_cf))?
                }
                _ => None,
            },
        };
        if let Some(events) = floor {
            self.batch
                .put_cf(rev_cf, at.to_be_bytes(), postcard::to_stdvec(&events)?);
        }
        // Versions at or below `at` of the key being scanned, oldest first.
        let mut group: Vec<(Vec<u8>, bool)> = Vec::new();
        let mut group_key: Vec<u8> = Vec::new();
        let finish = |group: &mut Vec<(Vec<u8>, bool)>, batch: &mut WriteBatch| {
            if let Some((last_raw, last_is_tombstone)) = group.pop() {
                for (raw, _) in group.drain(..) {
                    batch.delete_cf(kv_cf, raw);
                }
                if last_is_tombstone {
                    batch.delete_cf(kv_cf, last_raw);
                }
            }
        };
        for item in db.iterator_cf(kv_cf, IteratorMode::Start) {
            let (raw, val) = item?;
            let Some((key, rev)) = split_kv_key(&raw) else {
                continue;
            };
            if key != group_key.as_slice() {
                finish(&mut group, &mut self.batch);
                group_key = key.to_vec();
            }
            if rev <= at {
                group.push((raw.to_vec(), is_tombstone(&val)?));
            }
        }
        finish(&mut group, &mut self.batch);
        self.batch
            .delete_range_cf(rev_cf, 0i64.to_be_bytes(), at.to_be_bytes());
        self.compact = at;
        Ok(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mvcc() -> (tempfile::TempDir, Mvcc) {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::db::open(dir.path(), 1).unwrap();
        (dir, Mvcc::open(db).unwrap())
    }

    fn apply(m: &Mvcc, txn: Txn) -> TxnResponse {
        let mut b = m.begin();
        let r = b.txn(&txn).unwrap();
        m.commit(b).unwrap();
        r
    }

    #[test]
    fn key_encoding_groups_versions() {
        let a = kv_key(b"a", 5);
        let ab = kv_key(b"a/b", 1);
        assert!(a < ab);
        assert_eq!(split_kv_key(&a), Some((&b"a"[..], 5)));
    }

    #[test]
    fn a_written_dump_restores_the_same_state_elsewhere() {
        let (_d, m) = mvcc();
        // Enough rows to span restore batches, values of every length class, a deleted
        // key and a compacted history.
        let big = "x".repeat(64 << 10);
        for i in 0..300u32 {
            let value = if i % 50 == 0 {
                big.clone()
            } else {
                "v".repeat((i as usize * 7) % 200)
            };
            apply(
                &m,
                Txn::new().and_then([Op::put(format!("k{i:04}"), value)]),
            );
        }
        apply(&m, Txn::new().and_then([Op::put("k0001", "again")]));
        apply(&m, Txn::new().and_then([Op::delete("k0002")]));
        let mut b = m.begin();
        b.compact(100).unwrap().unwrap();
        m.commit(b).unwrap();
        let (head, body, len) = m.write_dump(Vec::new()).unwrap();
        assert_eq!(len, body.len() as u64);
        let dump = m.dump().unwrap();
        assert_eq!(
            (head.revision, head.compact_revision, &head.meta),
            (dump.revision, dump.compact_revision, &dump.meta)
        );
        // An earlier version's whole Dump converts to the same body.
        assert_eq!(dump.write_body(Vec::new()).unwrap().0, body);

        // Restored over a store holding other keys, which go.
        let (_d2, other) = mvcc();
        apply(&other, Txn::new().and_then([Op::put("stale", "gone")]));
        let mut marked = false;
        other.restore_from(&body[..], |_| marked = true).unwrap();
        assert!(marked);
        let again = other.dump().unwrap();
        assert_eq!((again.kv, again.rev), (dump.kv, dump.rev));
        assert_eq!(other.revision(), m.revision());
        assert!(other.get(b"stale", 0).unwrap().0.is_none());
        assert_eq!(other.get(b"k0001", 0).unwrap().0.unwrap().value, b"again");
        assert!(matches!(
            other.get(b"k0003", 50),
            Err(MvccError::Compacted { .. })
        ));

        // A body cut short fails before its meta rows (the position) are written.
        let (_d3, third) = mvcc();
        let err = third
            .restore_from(&body[..body.len() - 1], |_| {})
            .unwrap_err();
        assert!(
            matches!(err, MvccError::Dump(DumpError::Malformed(_))),
            "{err}"
        );
    }

    #[test]
    fn revisions_versions_and_history() {
        let (_d, m) = mvcc();
        let r1 = apply(&m, Txn::new().and_then([Op::put("a", "1")]));
        assert_eq!(r1.revision, 1);
        apply(
            &m,
            Txn::new().and_then([Op::put("a", "2"), Op::put("b", "x")]),
        );
        let (kv, at) = m.get(b"a", 0).unwrap();
        let kv = kv.unwrap();
        assert_eq!(
            (
                kv.value.as_slice(),
                kv.create_revision,
                kv.mod_revision,
                kv.version
            ),
            (&b"2"[..], 1, 2, 2)
        );
        assert_eq!(at, 2);
        assert_eq!(m.get(b"a", 1).unwrap().0.unwrap().value, b"1");
        assert!(m.get(b"b", 1).unwrap().0.is_none());
        // A delete that deletes nothing writes nothing and takes no revision.
        let r = apply(&m, Txn::new().and_then([Op::delete("zzz")]));
        assert_eq!(r.revision, 2);
        apply(&m, Txn::new().and_then([Op::delete("a")]));
        assert!(m.get(b"a", 0).unwrap().0.is_none());
        assert_eq!(m.get(b"a", 2).unwrap().0.unwrap().value, b"2");
        // Recreated keys start a new incarnation.
        apply(&m, Txn::new().and_then([Op::put("a", "3")]));
        let kv = m.get(b"a", 0).unwrap().0.unwrap();
        assert_eq!((kv.create_revision, kv.version), (4, 1));
    }

    #[test]
    fn range_pages_and_past_revisions() {
        let (_d, m) = mvcc();
        for i in 0..10 {
            apply(
                &m,
                Txn::new().and_then([Op::put(format!("p/{i}"), format!("v{i}"))]),
            );
        }
        apply(
            &m,
            Txn::new().and_then([Op::put("p", "not under p/"), Op::put("q/1", "x")]),
        );
        apply(&m, Txn::new().and_then([Op::delete("p/3")]));
        let all = m.range(&RangeRequest::prefix("p/")).unwrap();
        assert_eq!(all.kvs.len(), 9);
        assert!(!all.more);
        let old = m
            .range(&RangeRequest {
                revision: 5,
                ..RangeRequest::prefix("p/")
            })
            .unwrap();
        assert_eq!(old.kvs.len(), 5);
        assert_eq!(old.revision, 5);
        let mut req = RangeRequest {
            limit: 4,
            ..RangeRequest::prefix("p/")
        };
        let mut seen = Vec::new();
        loop {
            let page = m.range(&req).unwrap();
            seen.extend(
                page.kvs
                    .iter()
                    .map(|kv| String::from_utf8(kv.key.clone()).unwrap()),
            );
            if !page.more {
                break;
            }
            req.start_after = Some(page.kvs.last().unwrap().key.clone());
            req.revision = page.revision;
        }
        assert_eq!(seen.len(), 9);
        assert!(!seen.contains(&"p/3".to_string()));
    }

    #[test]
    fn history_is_rebuilt_from_the_keys_and_the_versions_kv_holds() {
        let (_d, m) = mvcc();
        // Each revision's events as the apply gave them to the live watchers.
        let mut applied = Vec::new();
        let mut run = |ops: Vec<Op>| {
            let mut b = m.begin();
            b.txn(&Txn::new().and_then(ops)).unwrap();
            applied.extend(m.commit(b).unwrap());
        };
        let big = "v".repeat(10_000);
        run(vec![Op::put("a", "1")]);
        run(vec![Op::put("a", "2"), Op::put("b", "x")]);
        run(vec![Op::delete("a")]);
        run(vec![Op::put("a", "3")]);
        // A key changed twice at one revision: `kv` keeps only the second change.
        run(vec![Op::put("c", "4"), Op::put("c", "5")]);
        run(vec![Op::put("d", "y"), Op::delete("d")]);
        run(vec![Op::put("e", big.as_str()), Op::put("b", big.as_str())]);
        assert_eq!(m.events_since(1, 100).unwrap(), applied);

        // The entries name the keys; the values are only in `kv`.
        let rev_cf = m.db.cf_handle(CF_REV).unwrap();
        let row = |rev: Revision| m.db.get_cf(rev_cf, rev.to_be_bytes()).unwrap().unwrap();
        assert!(row(7).len() < 32, "{} bytes", row(7).len());

        // An entry written whole, as earlier versions wrote them all, reads the same.
        m.db.put_cf(
            rev_cf,
            4i64.to_be_bytes(),
            postcard::to_stdvec(&applied[3].events).unwrap(),
        )
        .unwrap();
        assert_eq!(m.events_since(1, 100).unwrap(), applied);

        // Compacting at 2 removes a's first version, the previous value of an event at 2,
        // and at 3 a's second, the value of the delete at 3: the floor's events are kept
        // whole, and read as they were applied.
        for floor in [2, 3] {
            let mut b = m.begin();
            b.compact(floor).unwrap().unwrap();
            m.commit(b).unwrap();
            assert_ne!(row(floor).first(), Some(&BY_KEY));
            assert_eq!(
                m.events_since(floor, 100).unwrap(),
                applied[floor as usize - 1..]
            );
        }
        assert!(m.get(b"a", 0).unwrap().0.is_some());
    }

    #[test]
    fn compares_answered_from_the_index_agree_with_the_stored_versions() {
        let (_d, m) = mvcc();
        apply(&m, Txn::new().and_then([Op::put("live", "1")]));
        apply(&m, Txn::new().and_then([Op::put("live", "2")]));
        apply(&m, Txn::new().and_then([Op::put("gone", "x")]));
        apply(&m, Txn::new().and_then([Op::delete("gone")]));
        let mut b = m.begin();
        // Keys changed earlier in the same batch, not yet in RocksDB.
        b.txn(&Txn::new().and_then([Op::put("new", "y"), Op::delete("live")]))
            .unwrap();
        b.txn(&Txn::new().and_then([Op::put("live", "3")])).unwrap();
        let ops = [
            CompareOp::Equal,
            CompareOp::NotEqual,
            CompareOp::Less,
            CompareOp::Greater,
        ];
        for key in ["live", "gone", "new", "never"] {
            for rev in 0..8 {
                for target in [
                    CompareTarget::ModRevision(rev),
                    CompareTarget::CreateRevision(rev),
                    CompareTarget::Version(rev),
                ] {
                    for op in ops {
                        let c = Compare {
                            key: key.into(),
                            op,
                            target: target.clone(),
                        };
                        assert_eq!(b.holds(&c).unwrap(), b.holds_on_value(&c).unwrap(), "{c:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn compaction_keeps_the_visible_state() {
        let (_d, m) = mvcc();
        for i in 0..5 {
            apply(&m, Txn::new().and_then([Op::put("k", format!("{i}"))]));
        }
        apply(&m, Txn::new().and_then([Op::put("gone", "x")]));
        apply(&m, Txn::new().and_then([Op::delete("gone")]));
        let mut b = m.begin();
        b.compact(6).unwrap().unwrap();
        m.commit(b).unwrap();
        assert!(matches!(
            m.get(b"k", 4),
            Err(MvccError::Compacted {
                compact_revision: 6,
                ..
            })
        ));
        assert_eq!(m.get(b"k", 6).unwrap().0.unwrap().value, b"4");
        assert!(m.get(b"gone", 0).unwrap().0.is_none());
        assert!(matches!(
            m.events_since(3, 10),
            Err(MvccError::Compacted { .. })
        ));
        let evs = m.events_since(6, 10).unwrap();
        assert_eq!(
            evs.iter().map(|e| e.revision).collect::<Vec<_>>(),
            vec![6, 7]
        );
        let mut b = m.begin();
        assert!(matches!(
            b.compact(6).unwrap(),
            Err(MvccError::Compacted { .. })
        ));
        assert!(matches!(
            b.compact(100).unwrap(),
            Err(MvccError::FutureRevision { .. })
        ));
    }
}
