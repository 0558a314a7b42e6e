//! [`StoreClient`]: the store's API over HTTP, for processes that are not members (tests,
//! benchmarks, the `baton` CLI).
//!
//! Requests go to one member at a time; when that member cannot be reached or has no
//! leader, the client moves on to the next one. Members forward writes to their leader, so
//! any member will do. A member that did not answer (down, or cut off) is passed over
//! for a few seconds, as etcd's client balancer does, so that a partitioned member does
//! not cost every request a timeout.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::error::{Error, WireError};
use crate::types::*;
use crate::watch::Watch;

/// A client of one store cluster.
#[derive(Clone, Debug)]
pub struct StoreClient {
    endpoints: Arc<Vec<String>>,
    current: Arc<AtomicUsize>,
    /// Per endpoint, until when it is passed over: it did not answer.
    suspect: Arc<Mutex<Vec<Option<Instant>>>>,
    http: crate::tls::Http,
    timeout: Duration,
}

impl StoreClient {
    /// A client of the members at these `host:port` addresses.
    pub fn new(endpoints: impl IntoIterator<Item = impl Into<String>>) -> Self {
        let endpoints: Vec<String> = endpoints.into_iter().map(Into::into).collect();
        assert!(
            !endpoints.is_empty(),
            "a store client needs at least one endpoint"
        );
        let http = crate::tls::Http::new(None, tune_client)
            .expect("building an HTTP client without TLS cannot fail");
        Self {
            suspect: Arc::new(Mutex::new(vec![None; endpoints.len()])),
            endpoints: Arc::new(endpoints),
            current: Arc::new(AtomicUsize::new(0)),
            http,
            timeout: Duration::from_secs(10),
        }
    }

    /// Talks to the members over HTTPS as `tls` (a store client's or a member's
    /// identity from the store CA), as members that serve TLS require.
    pub fn with_tls(mut self, tls: &crate::tls::StoreTls) -> Result<Self, Error> {
        self.http = crate::tls::Http::new(Some(tls), tune_client)?;
        Ok(self)
    }

    /// Per-request timeout (default 10 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// A client that only ever talks to one member (for per-member checks in tests).
    pub fn pinned(&self, endpoint: &str) -> Self {
        Self {
            endpoints: Arc::new(vec![endpoint.to_string()]),
            current: Arc::new(AtomicUsize::new(0)),
            suspect: Arc::new(Mutex::new(vec![None])),
            http: self.http.clone(),
            timeout: self.timeout,
        }
    }

    async fn call_once<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        addr: &str,
        path: &str,
        req: &Req,
    ) -> Result<Resp, Error> {
        post(&self.http, addr, path, req, self.timeout, false).await
    }

    /// Calls one member after another until one answers with something other than
    /// "unreachable" or "no leader". Writes are not blindly retried after a timeout: the
    /// caller cannot know whether they committed, and gets the error.
    async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        path: &str,
        req: &Req,
    ) -> Result<Resp, Error> {
        self.call_with(path, req, false).await
    }

    /// Reads may also move on after an unknown outcome; writes may not, since the first
    /// attempt may have committed.
    async fn call_with<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        path: &str,
        req: &Req,
        read_only: bool,
    ) -> Result<Resp, Error> {
        let n = self.endpoints.len();
        let start = self.current.load(Ordering::Relaxed);
        let mut order: Vec<usize> = (0..n).map(|k| (start + k) % n).collect();
        // Members that answer first, in turn; the suspects last.
        order.sort_by_cached_key(|i| self.is_suspect(*i));
        let mut last = None;
        // Once a member has answered that it has no leader, a suspect one (likely the
        // lost leader itself) would only spend the rest of the call: the caller retries.
        let mut answered = false;
        for i in order {
            if answered && self.is_suspect(i) {
                continue;
            }
            let addr = &self.endpoints[i];
            let result = self.call_once(addr, path, req).await;
            self.suspect.lock().expect("suspect lock")[i] = match &result {
                Err(Error::Transport { .. }) => Some(Instant::now() + SUSPECT_FOR),
                _ => None,
            };
            match result {
                Err(e) if retry_elsewhere(&e, read_only) => {
                    answered |= matches!(e, Error::NoLeader { .. });
                    last = Some(e);
                }
                Err(e) if e.is_retryable() => {
                    // The outcome is unknown, so the caller gets the error; but the
                    // member that did not answer (partitioned, or cut off from the
                    // leader) is not the one the next call tries first.
                    self.current.store((i + 1) % n, Ordering::Relaxed);
                    return Err(e);
                }
                other => {
                    self.current.store(i, Ordering::Relaxed);
                    return other;
                }
            }
        }
        Err(last.expect("at least one endpoint was tried"))
    }

    /// Whether member `i` did not answer lately.
    fn is_suspect(&self, i: usize) -> bool {
        let suspect = self.suspect.lock().expect("suspect lock");
        suspect[i].is_some_and(|until| until > Instant::now())
    }

    pub async fn txn(&self, txn: &Txn) -> Result<TxnResponse, Error> {
        self.call("/store/v1/txn", txn).await
    }

    pub async fn get(&self, key: &[u8], opts: ReadOptions) -> Result<Option<KeyValue>, Error> {
        let (kv, _rev): (Option<KeyValue>, Revision) =
            self.call_with("/store/v1/get", &(key, opts), true).await?;
        Ok(kv)
    }

    pub async fn range(&self, req: &RangeRequest) -> Result<RangeResponse, Error> {
        self.call_with("/store/v1/range", req, true).await
    }

    pub async fn put(
        &self,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
    ) -> Result<Revision, Error> {
        Ok(self
            .txn(&Txn::new().and_then([Op::put(key, value)]))
            .await?
            .revision)
    }

    pub async fn compact(&self, revision: Revision) -> Result<Revision, Error> {
        self.call("/store/v1/compact", &revision).await
    }

    pub async fn add_learner(&self, id: u64, addr: &str) -> Result<(), Error> {
        self.call("/store/v1/members/learner", &(id, addr.to_string()))
            .await
    }

    pub async fn set_voters(&self, voters: BTreeSet<u64>) -> Result<(), Error> {
        self.call("/store/v1/members/voters", &voters).await
    }

    /// Makes a learner a voter, leaving the other members as they are.
    pub async fn add_voter(&self, id: u64) -> Result<(), Error> {
        self.call("/store/v1/members/voter", &id).await
    }

    pub async fn remove_member(&self, id: u64) -> Result<(), Error> {
        self.call("/store/v1/members/remove", &id).await
    }

    /// The status of the first reachable member.
    pub async fn status(&self) -> Result<Status, Error> {
        let n = self.endpoints.len();
        let mut last = None;
        for attempt in 0..n {
            let addr = &self.endpoints[(self.current.load(Ordering::Relaxed) + attempt) % n];
            let res = self
                .http
                .client
                .get(self.http.url(addr, "/store/v1/status"))
                .timeout(self.timeout)
                .send()
                .await
                .map_err(|source| Error::Transport {
                    addr: addr.clone(),
                    source,
                });
            match res {
                Ok(resp) => {
                    let status = resp.status();
                    let bytes = resp.bytes().await.map_err(|source| Error::Transport {
                        addr: addr.clone(),
                        source,
                    })?;
                    if !status.is_success() {
                        return Err(Error::Remote {
                            addr: addr.clone(),
                            status: status.as_u16(),
                            body: String::from_utf8_lossy(&bytes).into_owned(),
                        });
                    }
                    return Ok(postcard::from_bytes(&bytes)?);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("at least one endpoint was tried"))
    }

    /// Watches a prefix from a revision on the current member.
    pub async fn watch(&self, prefix: impl Into<Vec<u8>>, from: Revision) -> Result<Watch, Error> {
        let prefix = prefix.into();
        let n = self.endpoints.len();
        let mut last = None;
        for attempt in 0..n {
            let addr = self.endpoints[(self.current.load(Ordering::Relaxed) + attempt) % n].clone();
            let body = postcard::to_stdvec(&(prefix.clone(), from))?;
            let resp = self
                .http
                .client
                .post(self.http.url(&addr, "/store/v1/watch"))
                .body(body)
                .send()
                .await;
            let resp = match resp {
                Ok(r) => r,
                Err(source) => {
                    last = Some(Error::Transport { addr, source });
                    continue;
                }
            };
            let (tx, rx) = mpsc::channel(1024);
            let mut stream = resp.bytes_stream();
            tokio::spawn(async move {
                let mut buf: Vec<u8> = Vec::new();
                loop {
                    // Deliver every complete frame in the buffer.
                    while buf.len() >= 4 {
                        let len =
                            u32::from_le_bytes(buf[..4].try_into().expect("4 bytes")) as usize;
                        if buf.len() < 4 + len {
                            break;
                        }
                        let msg: Result<Result<WatchEvent, WireError>, _> =
                            postcard::from_bytes(&buf[4..4 + len]);
                        buf.drain(..4 + len);
                        let item = match msg {
                            Ok(m) => m.map_err(|e| e.into_error(&addr)),
                            Err(e) => Err(Error::Codec(e)),
                        };
                        if tx.send(item).await.is_err() {
                            return;
                        }
                    }
                    match stream.next().await {
                        Some(Ok(chunk)) => buf.extend_from_slice(&chunk),
                        Some(Err(source)) => {
                            let _ = tx
                                .send(Err(Error::Transport {
                                    addr: addr.clone(),
                                    source,
                                }))
                                .await;
                            return;
                        }
                        None => {
                            let _ = tx.send(Err(Error::Closed)).await;
                            return;
                        }
                    }
                }
            });
            return Ok(Watch::from_receiver(rx));
        }
        Err(last.expect("at least one endpoint was tried"))
    }
}

/// One request to one member: a postcard body in, a postcard `Result` out. `forwarded`
/// marks a member relaying a request to its leader, which must not relay it again.
pub(crate) async fn post<Req: Serialize, Resp: DeserializeOwned>(
    http: &crate::tls::Http,
    addr: &str,
    path: &str,
    req: &Req,
    timeout: Duration,
    forwarded: bool,
) -> Result<Resp, Error> {
    let body = postcard::to_stdvec(req)?;
    let mut request = http
        .client
        .post(http.url(addr, path))
        .timeout(timeout)
        .body(body);
    if forwarded {
        request = request.header(crate::store::FORWARDED_HEADER, "1");
    }
    request = request.header(
        crate::store::TIMEOUT_HEADER,
        timeout.as_millis().to_string(),
    );
    let transport = |source| Error::Transport {
        addr: addr.to_string(),
        source,
    };
    let resp = request.send().await.map_err(transport)?;
    let status = resp.status();
    let bytes = resp.bytes().await.map_err(transport)?;
    if !status.is_success() {
        let body = String::from_utf8_lossy(&bytes).into_owned();
        return Err(Error::Remote {
            addr: addr.to_string(),
            status: status.as_u16(),
            body,
        });
    }
    let res: Result<Resp, WireError> = postcard::from_bytes(&bytes)?;
    res.map_err(|e| e.into_error(addr))
}

/// How long a member that did not answer is passed over.
const SUSPECT_FOR: Duration = Duration::from_secs(3);

fn tune_client(b: reqwest::ClientBuilder) -> reqwest::ClientBuilder {
    b.pool_max_idle_per_host(256)
}

/// Whether another member may succeed where this one failed, without risking a write twice.
fn retry_elsewhere(e: &Error, read_only: bool) -> bool {
    match e {
        Error::Transport { source, .. } => source.is_connect() || read_only,
        Error::NoLeader { .. } => true,
        Error::Unavailable { .. } => read_only,
        _ => false,
    }
}
