//! An external etcd v3 cluster behind the [`crate::Store`] API.
//!
//! Users who already run etcd give `baton server --store etcd://HOST:2379,...` and Baton
//! keeps its state there instead of in its own Raft members. The store's data model
//! mirrors etcd's v3 API, so each call maps one to one, as kube-apiserver's etcd3 storage
//! does:
//! - a [`Txn`] is an etcd transaction (compares, then success or failure ops), with
//!   `prev_kv` asked for on puts and deletes;
//! - a range is a range whose end is the prefix's end, paged by `limit` and resumed
//!   after the last key;
//! - a watch is an etcd watch from a revision, with `prev_kv`; idle watches ask etcd
//!   for progress, so the API server's bookmarks keep moving;
//! - revisions, compaction and its errors are etcd's own, so a `resourceVersion` is an
//!   etcd revision.
//!
//! The calls that must answer at once (health, status, object counts for metrics) read
//! figures that a background task refreshes every second (counts: every 30 s, as
//! kube-apiserver refreshes `apiserver_storage_objects`). Raft membership calls fail with
//! [`Error::External`]: etcd's members are etcd's to manage.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use etcd_client::{
    Client, Compare as EtcdCompare, CompareOp as EtcdCompareOp, ConnectOptions, DeleteOptions,
    EventType, GetOptions, PutOptions, TxnOp, TxnOpResponse, WatchOptions,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::error::Error;
use crate::store::AutoCompaction;
use crate::types::*;
use crate::watch::Watch;

/// How to reach an external etcd.
#[derive(Clone, Debug)]
pub struct EtcdConfig {
    /// Client URLs (`http://HOST:2379` or `https://HOST:2379`).
    pub endpoints: Vec<String>,
    /// The client TLS settings, for `https` endpoints.
    pub tls: Option<EtcdTls>,
    /// How long one request may take before it fails as unavailable.
    pub request_timeout: Duration,
    /// How often an idle watch asks etcd for progress.
    pub progress_interval: Duration,
    /// Revisions a watcher may leave unread before it is cut off.
    pub watch_buffer: usize,
    /// Compaction of etcd's history, as kube-apiserver does it (`None`: etcd's own
    /// `--auto-compaction-*` settings, or an operator, do it).
    pub auto_compaction: Option<AutoCompaction>,
}

/// The client side of etcd's TLS: its CA and, for `--client-cert-auth`, a certificate.
#[derive(Clone, Debug)]
pub struct EtcdTls {
    pub ca_pem: Vec<u8>,
    /// Certificate and key, PEM.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl EtcdConfig {
    /// Settings for `url`: `etcd://HOST:PORT[,HOST:PORT...]` (HTTPS with `tls`, else
    /// HTTP), or a comma-separated list of `http(s)://` client URLs.
    pub fn from_url(url: &str, tls: Option<EtcdTls>) -> Result<Self, Error> {
        let invalid = |reason: String| Error::InvalidRequest { reason };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let endpoints: Vec<String> = match url.strip_prefix("etcd://") {
            Some(hosts) => hosts
                .split(',')
                .filter(|h| !h.is_empty())
                .map(|h| format!("{scheme}://{h}"))
                .collect(),
            None => url
                .split(',')
                .filter(|h| !h.is_empty())
                .map(str::to_string)
                .collect(),
        };
        if endpoints.is_empty() {
            return Err(invalid(format!("{url:?} names no etcd endpoint")));
        }
        for e in &endpoints {
            let rest = e
                .strip_prefix("https://")
                .or_else(|| e.strip_prefix("http://"))
                .ok_or_else(|| {
                    invalid(format!(
                        "{e:?}: an etcd endpoint is etcd://HOST:PORT, http://HOST:PORT or https://HOST:PORT"
                    ))
                })?;
            if rest.is_empty() || rest.contains('/') || !rest.contains(':') {
                return Err(invalid(format!(
                    "{e:?}: expected HOST:PORT after the scheme"
                )));
            }
            if e.starts_with("https://") != tls.is_some() {
                return Err(invalid(format!(
                    "{e:?}: https endpoints need the etcd CA (and http ones take none)"
                )));
            }
        }
        Ok(Self {
            endpoints,
            tls,
            request_timeout: Duration::from_secs(10),
            progress_interval: Duration::from_secs(5),
            watch_buffer: 4096,
            auto_compaction: Some(AutoCompaction {
                interval: Duration::from_secs(300),
                retain: 1000,
            }),
        })
    }
}

/// A connection to an external etcd, with the figures its background task keeps.
pub(crate) struct Etcd {
    client: Client,
    cfg: EtcdConfig,
    /// The newest revision seen in any answer.
    revision: AtomicI64,
    /// The compaction floor, as far as this process knows it.
    compact_revision: AtomicI64,
    /// The last health check: Ok, or why etcd cannot serve.
    health: Mutex<Result<(), String>>,
    status: Mutex<Status>,
    db_bytes: AtomicU64,
    leader_changes: AtomicU64,
    /// Object counts under the prefixes last asked for.
    counts: Mutex<HashMap<Vec<u8>, u64>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    latencies: crate::Latencies,
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd")
            .field("endpoints", &self.cfg.endpoints)
            .finish()
    }
}

fn etcd(context: &'static str) -> impl FnOnce(etcd_client::Error) -> Error {
    move |source| classify(context, source)
}

/// etcd's answers that mean something to the API server become the store's own errors;
/// the rest keep etcd's error as their source.
fn classify(context: &'static str, source: etcd_client::Error) -> Error {
    match &source {
        etcd_client::Error::GRpcStatus(s) => {
            let msg = s.message();
            if msg.contains("request is too large") {
                Error::RequestTooLarge {
                    size: 0,
                    limit: MAX_TXN_BYTES,
                }
            } else if matches!(s.code() as i32, UNAVAILABLE | DEADLINE_EXCEEDED)
                || msg.contains("leader changed")
                || msg.contains("no leader")
                || msg.contains("timed out")
            {
                Error::Unavailable {
                    reason: format!("etcd: {context}: {msg}"),
                }
            } else {
                Error::Etcd {
                    context,
                    source: Box::new(source),
                }
            }
        }
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => {
            Error::Unavailable {
                reason: format!("etcd: {context}: {}", baton_error_chain::chain(&source)),
            }
        }
        _ => Error::Etcd {
            context,
            source: Box::new(source),
        },
    }
}

// gRPC status codes, by number, so that this crate needs no tonic of its own.
const DEADLINE_EXCEEDED: i32 = 4;
const UNAVAILABLE: i32 = 14;

fn is_compacted(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.message().contains("required revision has been compacted"))
}

fn is_future(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.message().contains("required revision is a future revision"))
}

/// The first key after every key that starts with `prefix` (etcd's `range_end` for a
/// prefix); `\0` (every key) for an empty prefix or one of only `0xff` bytes.
pub(crate) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn kv_of(kv: &etcd_client::KeyValue) -> KeyValue {
    KeyValue {
        key: kv.key().to_vec(),
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        version: kv.version(),
    }
}

fn compare_of(c: &Compare) -> EtcdCompare {
    let op = match c.op {
        CompareOp::Equal => EtcdCompareOp::Equal,
        CompareOp::NotEqual => EtcdCompareOp::NotEqual,
        CompareOp::Less => EtcdCompareOp::Less,
        CompareOp::Greater => EtcdCompareOp::Greater,
    };
    let key = c.key.clone();
    match &c.target {
        CompareTarget::ModRevision(r) => EtcdCompare::mod_revision(key, op, *r),
        CompareTarget::CreateRevision(r) => EtcdCompare::create_revision(key, op, *r),
        CompareTarget::Version(v) => EtcdCompare::version(key, op, *v),
        CompareTarget::Value(v) => EtcdCompare::value(key, op, v.clone()),
    }
}

fn op_of(op: &Op) -> TxnOp {
    match op {
        Op::Put { key, value } => TxnOp::put(
            key.clone(),
            value.clone(),
            Some(PutOptions::new().with_prev_key()),
        ),
        Op::Delete { key } => {
            TxnOp::delete(key.clone(), Some(DeleteOptions::new().with_prev_key()))
        }
        Op::Get { key } => TxnOp::get(key.clone(), None),
    }
}

fn result_of(r: TxnOpResponse) -> OpResult {
    match r {
        TxnOpResponse::Put(p) => OpResult::Put {
            prev: p.prev_key().map(kv_of),
        },
        TxnOpResponse::Delete(d) => OpResult::Delete {
            prev: d.prev_kvs().first().map(kv_of),
        },
        TxnOpResponse::Get(g) => OpResult::Get {
            kv: g.kvs().first().map(kv_of),
        },
        // Baton never nests transactions.
        TxnOpResponse::Txn(_) => OpResult::Get { kv: None },
    }
}

impl Etcd {
    /// Connects, and checks that etcd answers before the store is used.
    pub(crate) async fn connect(cfg: EtcdConfig) -> Result<Arc<Self>, Error> {
        let span = tracing::info_span!("etcd_connect", endpoints = ?cfg.endpoints);
        async move {
            let mut opts = ConnectOptions::new()
                .with_connect_timeout(Duration::from_secs(5))
                // Finds a dead connection under a quiet watch, which TCP alone would not.
                .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
                .with_keep_alive_while_idle(true);
            if let Some(tls) = &cfg.tls {
                // tonic builds its TLS with the process's default crypto provider.
                let _ = rustls::crypto::ring::default_provider().install_default();
                let mut t = etcd_client::TlsOptions::new()
                    .ca_certificate(etcd_client::Certificate::from_pem(&tls.ca_pem));
                if let Some((cert, key)) = &tls.identity {
                    t = t.identity(etcd_client::Identity::from_pem(cert, key));
                }
                opts = opts.with_tls(t);
            }
            let client = Client::connect(&cfg.endpoints, Some(opts))
                .await
                .map_err(etcd("connecting"))?;
            let etcd = Arc::new(Etcd {
                client,
                cfg,
                revision: AtomicI64::new(0),
                compact_revision: AtomicI64::new(0),
                health: Mutex::new(Err("not checked yet".into())),
                status: Mutex::new(Status::default()),
                db_bytes: AtomicU64::new(0),
                leader_changes: AtomicU64::new(0),
                counts: Mutex::new(HashMap::new()),
                tasks: Mutex::new(Vec::new()),
                latencies: crate::Latencies::default(),
            });
            etcd.refresh().await?;
            let mut tasks = vec![tokio::spawn(keep_status(Arc::downgrade(&etcd)))];
            if let Some(ac) = etcd.cfg.auto_compaction.clone() {
                tasks.push(tokio::spawn(auto_compact(Arc::downgrade(&etcd), ac)));
            }
            *etcd.tasks.lock().expect("tasks lock") = tasks;
            Ok(etcd)
        }
        .instrument(span)
        .await
    }

    /// Runs one unary call with the request timeout.
    async fn call<T>(
        &self,
        context: &'static str,
        fut: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, Error> {
        match tokio::time::timeout(self.cfg.request_timeout, fut).await {
            Ok(r) => r.map_err(etcd(context)),
            Err(_) => Err(self.timed_out(context)),
        }
    }

    /// Runs one call made at revision `requested` with the request timeout: a
    /// compacted or future revision becomes the store's own error.
    async fn at_revision<T>(
        &self,
        context: &'static str,
        requested: Revision,
        fut: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, Error> {
        match tokio::time::timeout(self.cfg.request_timeout, fut).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) if is_compacted(&e) => Err(Error::Compacted {
                requested,
                compact_revision: self.compact_floor(requested).await,
            }),
            Ok(Err(e)) if is_future(&e) => Err(Error::FutureRevision {
                requested,
                current: self.local_revision(),
            }),
            Ok(Err(e)) => Err(classify(context, e)),
            Err(_) => Err(self.timed_out(context)),
        }
    }

    fn saw(&self, header: Option<&etcd_client::ResponseHeader>) -> Revision {
        let rev = header.map_or(0, |h| h.revision());
        self.revision.fetch_max(rev, Ordering::Relaxed);
        rev
    }

    pub(crate) fn local_revision(&self) -> Revision {
        self.revision.load(Ordering::Relaxed)
    }

    pub(crate) async fn txn(&self, txn: Txn) -> Result<TxnResponse, Error> {
        let compares: Vec<EtcdCompare> = txn.compares.iter().map(compare_of).collect();
        let success: Vec<TxnOp> = txn.success.iter().map(op_of).collect();
        let failure: Vec<TxnOp> = txn.failure.iter().map(op_of).collect();
        let t = etcd_client::Txn::new()
            .when(compares)
            .and_then(success)
            .or_else(failure);
        let mut client = self.client.clone();
        let resp = self.call("transaction", client.txn(t)).await?;
        let revision = self.saw(resp.header());
        Ok(TxnResponse {
            succeeded: resp.succeeded(),
            revision,
            results: resp.op_responses().into_iter().map(result_of).collect(),
        })
    }

    /// etcd's compaction floor, learned from a watch at `compacted`, which etcd
    /// cancels at once naming its floor (etcd has no call that reports it).
    async fn compact_floor(&self, compacted: Revision) -> Revision {
        let known = self.compact_revision.load(Ordering::Relaxed);
        let probe = async {
            let mut client = self.client.clone();
            let (_w, mut stream) = client
                .watch(
                    vec![0u8],
                    Some(WatchOptions::new().with_start_revision(compacted)),
                )
                .await
                .ok()?;
            while let Ok(Some(msg)) = stream.message().await {
                if msg.compact_revision() > 0 {
                    return Some(msg.compact_revision());
                }
                if msg.canceled() {
                    break;
                }
            }
            None
        };
        let floor = tokio::time::timeout(Duration::from_secs(2), probe)
            .await
            .ok()
            .flatten()
            .unwrap_or(known.max(compacted + 1));
        self.compact_revision.fetch_max(floor, Ordering::Relaxed);
        floor
    }

    pub(crate) async fn get(
        &self,
        key: &[u8],
        opts: ReadOptions,
    ) -> Result<(Option<KeyValue>, Revision), Error> {
        let mut o = GetOptions::new().with_revision(opts.revision);
        if opts.serializable {
            o = o.with_serializable();
        }
        let mut client = self.client.clone();
        let resp = self
            .at_revision("reading", opts.revision, client.get(key, Some(o)))
            .await?;
        let current = self.saw(resp.header());
        let at = if opts.revision > 0 {
            opts.revision
        } else {
            current
        };
        Ok((resp.kvs().first().map(kv_of), at))
    }

    fn timed_out(&self, context: &str) -> Error {
        Error::Unavailable {
            reason: format!(
                "etcd: {context}: no answer within {:?}",
                self.cfg.request_timeout
            ),
        }
    }

    pub(crate) async fn range(&self, req: RangeRequest) -> Result<RangeResponse, Error> {
        let end = prefix_end(&req.prefix);
        let start = match &req.start_after {
            // The first key after `after`.
            Some(after) => {
                let mut k = after.clone();
                k.push(0);
                k
            }
            None if req.prefix.is_empty() => vec![0],
            None => req.prefix.clone(),
        };
        let mut o = GetOptions::new()
            .with_range(end)
            .with_revision(req.revision)
            .with_limit(req.limit as i64);
        if req.serializable {
            o = o.with_serializable();
        }
        let mut client = self.client.clone();
        let resp = self
            .at_revision("listing", req.revision, client.get(start, Some(o)))
            .await?;
        let current = self.saw(resp.header());
        Ok(RangeResponse {
            kvs: resp.kvs().iter().map(kv_of).collect(),
            more: resp.more(),
            revision: if req.revision > 0 {
                req.revision
            } else {
                current
            },
        })
    }

    pub(crate) async fn compact(&self, revision: Revision) -> Result<Revision, Error> {
        let mut client = self.client.clone();
        let physical = etcd_client::CompactionOptions::new().with_physical();
        let resp = self
            .at_revision(
                "compacting",
                revision,
                client.compact(revision, Some(physical)),
            )
            .await?;
        self.saw(resp.header());
        self.compact_revision.fetch_max(revision, Ordering::Relaxed);
        Ok(revision)
    }

    /// A watch of the keys under `prefix` from `from` (0: from now on), fed by an etcd
    /// watch stream of its own.
    pub(crate) fn watch(self: &Arc<Self>, prefix: Vec<u8>, from: Revision) -> Watch {
        let buffer = self.cfg.watch_buffer.max(1);
        // One slot more than the consumer may leave unread, for the error that ends a
        // watch whose consumer stopped reading.
        let (tx, rx) = mpsc::channel(buffer + 1);
        let span =
            tracing::debug_span!("etcd_watch", prefix = %String::from_utf8_lossy(&prefix), from);
        tokio::spawn(run_watch(Arc::downgrade(self), prefix, from, buffer, tx).instrument(span));
        Watch::from_receiver(rx)
    }

    /// Asks etcd for its status (and members), and keeps what it says.
    async fn refresh(&self) -> Result<(), Error> {
        let mut client = self.client.clone();
        let result = async {
            let st = self.call("status", client.status()).await?;
            let members = self.call("listing members", client.member_list()).await?;
            Ok::<_, Error>((st, members))
        }
        .await;
        let (st, members) = match result {
            Ok(r) => r,
            Err(e) => {
                *self.health.lock().expect("health lock") = Err(baton_error_chain::chain(&e));
                return Err(e);
            }
        };
        let revision = self.saw(st.header());
        self.db_bytes
            .store(st.db_size().max(0) as u64, Ordering::Relaxed);
        let mut status = self.status.lock().expect("status lock");
        let leader = (st.leader() != 0).then_some(st.leader());
        if leader.is_some() && leader != status.leader {
            self.leader_changes.fetch_add(1, Ordering::Relaxed);
        }
        *status = Status {
            id: st.header().map_or(0, |h| h.member_id()),
            leader,
            term: st.raft_term(),
            applied_index: st.raft_applied_index(),
            revision,
            compact_revision: self.compact_revision.load(Ordering::Relaxed),
            members: members
                .members()
                .iter()
                .map(|m| MemberInfo {
                    id: m.id(),
                    addr: m.client_urls().join(","),
                    voter: !m.is_learner(),
                })
                .collect(),
        };
        *self.health.lock().expect("health lock") = if !st.errors().is_empty() {
            Err(format!("etcd reports: {}", st.errors().join("; ")))
        } else if leader.is_none() {
            Err("etcd has no leader".into())
        } else {
            Ok(())
        };
        Ok(())
    }

    pub(crate) fn health(&self) -> Result<(), Error> {
        self.health
            .lock()
            .expect("health lock")
            .clone()
            .map_err(|reason| Error::Unavailable { reason })
    }

    pub(crate) fn status(&self) -> Status {
        let mut s = self.status.lock().expect("status lock").clone();
        s.revision = s.revision.max(self.local_revision());
        s.compact_revision = self.compact_revision.load(Ordering::Relaxed);
        s
    }

    pub(crate) fn metrics(&self) -> StoreMetrics {
        StoreMetrics {
            status: self.status(),
            leader_changes: self.leader_changes.load(Ordering::Relaxed),
            db_bytes: self.db_bytes.load(Ordering::Relaxed),
            replication_lag: Vec::new(),
            apply_lag: 0,
            latencies: self.latencies.clone(),
        }
    }

    /// The last counts under `prefixes` (0 before the first refresh); the prefixes are
    /// remembered for the next one.
    pub(crate) fn count_prefixes(&self, prefixes: &[Vec<u8>]) -> Vec<u64> {
        let mut counts = self.counts.lock().expect("counts lock");
        counts.retain(|p, _| prefixes.contains(p));
        prefixes
            .iter()
            .map(|p| *counts.entry(p.clone()).or_insert(0))
            .collect()
    }

    async fn refresh_counts(&self) {
        let prefixes: Vec<Vec<u8>> = self
            .counts
            .lock()
            .expect("counts lock")
            .keys()
            .cloned()
            .collect();
        for p in prefixes {
            let mut client = self.client.clone();
            let o = GetOptions::new()
                .with_range(prefix_end(&p))
                .with_count_only()
                .with_serializable();
            let start = if p.is_empty() { vec![0] } else { p.clone() };
            if let Ok(resp) = self.call("counting", client.get(start, Some(o))).await {
                if let Some(c) = self.counts.lock().expect("counts lock").get_mut(&p) {
                    *c = resp.count().max(0) as u64;
                }
            }
        }
    }

    pub(crate) fn shutdown(&self) {
        for t in self.tasks.lock().expect("tasks lock").drain(..) {
            t.abort();
        }
    }
}

async fn keep_status(etcd: Weak<Etcd>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut n = 0u64;
    loop {
        tick.tick().await;
        let Some(etcd) = etcd.upgrade() else { return };
        if let Err(e) = etcd.refresh().await {
            tracing::debug!(error = %baton_error_chain::chain(&e), "etcd status");
        }
        if n % 30 == 0 {
            etcd.refresh_counts().await;
        }
        n += 1;
    }
}

async fn auto_compact(etcd: Weak<Etcd>, ac: AutoCompaction) {
    let mut tick = tokio::time::interval(ac.interval);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(etcd) = etcd.upgrade() else { return };
        let target = etcd.local_revision() - ac.retain;
        if target <= etcd.compact_revision.load(Ordering::Relaxed) {
            continue;
        }
        match etcd.compact(target).await {
            Ok(_) => tracing::info!(revision = target, "compacted etcd's history"),
            // Another API server sharing the etcd compacted first.
            Err(Error::Compacted { .. }) => {}
            Err(e) => {
                tracing::warn!(error = %baton_error_chain::chain(&e), "compacting etcd's history failed")
            }
        }
    }
}

/// Splits one etcd watch answer into events per revision, in order.
fn revisions_of(resp: &etcd_client::WatchResponse) -> Vec<RevisionEvents> {
    let mut out: Vec<RevisionEvents> = Vec::new();
    for e in resp.events() {
        let Some(kv) = e.kv() else { continue };
        let event = Event {
            kind: match e.event_type() {
                EventType::Put => EventKind::Put,
                EventType::Delete => EventKind::Delete,
            },
            kv: kv_of(kv),
            prev_kv: e.prev_kv().map(kv_of),
        };
        let rev = kv.mod_revision();
        match out.last_mut() {
            Some(last) if last.revision == rev => last.events.push(event),
            _ => out.push(RevisionEvents {
                revision: rev,
                events: vec![event],
            }),
        }
    }
    out
}

async fn run_watch(
    etcd: Weak<Etcd>,
    prefix: Vec<u8>,
    from: Revision,
    buffer: usize,
    tx: mpsc::Sender<Result<WatchEvent, Error>>,
) {
    let Some(e) = etcd.upgrade() else { return };
    let progress_interval = e.cfg.progress_interval;
    let mut client = e.client.clone();
    let start = if prefix.is_empty() {
        vec![0]
    } else {
        prefix.clone()
    };
    let opts = WatchOptions::new()
        .with_range(prefix_end(&prefix))
        .with_start_revision(from)
        .with_prev_key();
    let opened = tokio::time::timeout(e.cfg.request_timeout, client.watch(start, Some(opts))).await;
    let (mut watcher, mut stream) = match opened {
        Ok(Ok(w)) => w,
        Ok(Err(err)) => {
            let _ = tx.send(Err(classify("watching", err))).await;
            return;
        }
        Err(_) => {
            let _ = tx.send(Err(e.timed_out("watching"))).await;
            return;
        }
    };
    drop(e);
    // The next revision owed (0: not known until etcd says where the watch starts).
    let mut next = from;
    let mut idle = tokio::time::interval(progress_interval);
    idle.tick().await;
    let send = |tx: &mpsc::Sender<Result<WatchEvent, Error>>, ev: WatchEvent| {
        if tx.capacity() <= 1 {
            // The consumer stopped reading: end the watch, as the embedded store does.
            let _ = tx.try_send(Err(Error::SlowWatcher { buffer }));
            return false;
        }
        tx.try_send(Ok(ev)).is_ok()
    };
    loop {
        tokio::select! {
            msg = stream.message() => {
                let resp = match msg {
                    Ok(Some(resp)) => resp,
                    Ok(None) => {
                        let _ = tx.try_send(Err(Error::Unavailable { reason: "etcd ended the watch".into() }));
                        return;
                    }
                    Err(err) => {
                        let _ = tx.try_send(Err(classify("watching", err)));
                        return;
                    }
                };
                let rev = resp.header().map_or(0, |h| h.revision());
                if let Some(e) = etcd.upgrade() {
                    e.revision.fetch_max(rev, Ordering::Relaxed);
                }
                if resp.canceled() {
                    let err = if resp.compact_revision() > 0 {
                        if let Some(e) = etcd.upgrade() {
                            e.compact_revision.fetch_max(resp.compact_revision(), Ordering::Relaxed);
                        }
                        Error::Compacted { requested: next, compact_revision: resp.compact_revision() }
                    } else {
                        Error::Unavailable { reason: format!("etcd cancelled the watch: {}", resp.cancel_reason()) }
                    };
                    let _ = tx.try_send(Err(err));
                    return;
                }
                let revisions = revisions_of(&resp);
                if revisions.is_empty() {
                    if next == 0 {
                        // A watch "from now on": etcd-client keeps the answer that
                        // created it to itself, so the first report with no event says
                        // where it stands (every event up to it was sent before it).
                        next = rev + 1;
                    }
                    // A progress report never goes back before a delivered event.
                    if !resp.created() && rev + 1 >= next && !send(&tx, WatchEvent::Progress(rev)) {
                        return;
                    }
                    continue;
                }
                idle.reset();
                for r in revisions {
                    next = r.revision + 1;
                    if !send(&tx, WatchEvent::Events(r)) {
                        return;
                    }
                }
            }
            _ = idle.tick() => {
                if watcher.request_progress().await.is_err() {
                    let _ = tx.try_send(Err(Error::Unavailable { reason: "etcd watch stream closed".into() }));
                    return;
                }
            }
            _ = tx.closed() => {
                let _ = watcher.cancel().await;
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_ends_at_the_next_key_after_all_it_covers() {
        assert_eq!(prefix_end(b"/registry/pods/"), b"/registry/pods0");
        assert_eq!(prefix_end(b"a\xff\xff"), b"b");
        assert_eq!(prefix_end(b"\xff"), vec![0]);
        assert_eq!(prefix_end(b""), vec![0]);
    }

    #[test]
    fn urls_name_endpoints_with_the_scheme_tls_implies() {
        let plain = EtcdConfig::from_url("etcd://a:2379,b:2379", None).unwrap();
        assert_eq!(plain.endpoints, ["http://a:2379", "http://b:2379"]);
        let tls = EtcdTls {
            ca_pem: b"ca".to_vec(),
            identity: None,
        };
        let secure = EtcdConfig::from_url("etcd://a:2379", Some(tls.clone())).unwrap();
        assert_eq!(secure.endpoints, ["https://a:2379"]);
        assert!(EtcdConfig::from_url("https://a:2379,https://b:2379", Some(tls.clone())).is_ok());
        for bad in ["etcd://", "ftp://a:1", "etcd://a", "http://a:1/x", ""] {
            let e = EtcdConfig::from_url(bad, None).unwrap_err();
            assert!(matches!(e, Error::InvalidRequest { .. }), "{bad}: {e}");
        }
        // An https endpoint without the CA, or an http one with it, is a mistake.
        assert!(EtcdConfig::from_url("https://a:2379", None).is_err());
        assert!(EtcdConfig::from_url("http://a:2379", Some(tls)).is_err());
    }
}
