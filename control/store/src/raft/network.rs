//! Raft RPC between members: HTTP(S) POSTs of postcard-encoded openraft messages to the
//! target member's own address (`/raft/append`, `/raft/vote`, `/raft/snapshot`).
//!
//! A connection failure is reported as `Unreachable`, so openraft backs off instead of
//! hammering a dead member; anything else is a `Network` error and is retried.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{
    Fatal, NetworkError, RPCError, RaftError, RemoteError, ReplicationClosed, StreamingError,
    Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::{BasicNode, Snapshot, Vote};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::durable::LogSync;
use super::snapshot::SnapshotBody;
use super::{NodeId, TypeConfig};

/// Makes one [`Network`] per peer; they share the HTTP client's connection pool.
#[derive(Clone, Debug)]
pub(crate) struct NetworkFactory {
    pub(crate) http: crate::tls::Http,
    /// The local log's sync: a commit index leaves only once the log is synced that far.
    pub(crate) log_sync: LogSync,
    /// The latest term in which a member refused this one's vote request for having a
    /// longer log (see [`super::elections`]).
    pub(crate) outlogged: Arc<AtomicU64>,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = Network;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        let route = |path| Route::of(self.http.url(&node.addr, path));
        Network {
            target,
            addr: node.addr.clone(),
            append: route("/raft/append"),
            vote: route("/raft/vote"),
            snapshot: route("/raft/snapshot"),
            http: self.http.clone(),
            log_sync: self.log_sync.clone(),
            outlogged: self.outlogged.clone(),
        }
    }
}

#[derive(Debug)]
pub(crate) struct Network {
    target: NodeId,
    addr: String,
    append: Route,
    vote: Route,
    snapshot: Route,
    http: crate::tls::Http,
    log_sync: LogSync,
    outlogged: Arc<AtomicU64>,
}

/// A peer's RPC address, parsed once: parsing the URL of every message (its host through
/// IDNA) was a sixth of a lone writer's replication CPU.
#[derive(Debug, Clone)]
pub(crate) enum Route {
    Parsed(reqwest::Url),
    /// Not a URL (a malformed member address): each call fails with reqwest's reason.
    Unparsed(String),
}

impl Route {
    pub(crate) fn of(url: String) -> Self {
        match reqwest::Url::parse(&url) {
            Ok(u) => Self::Parsed(u),
            Err(_) => Self::Unparsed(url),
        }
    }
}

/// Failure of one RPC before the peer's answer could be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CallError {
    #[error("cannot reach member at {addr}")]
    Connect {
        addr: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("request to member at {addr} failed")]
    Http {
        addr: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("member at {addr} answered HTTP {status}")]
    Status { addr: String, status: u16 },
    #[error("undecodable message")]
    Codec(#[from] postcard::Error),
}

/// One POST of a postcard `body` to the member at `addr`, its answer decoded: every
/// member-to-member message goes this way.
pub(crate) async fn post<Resp: DeserializeOwned>(
    client: &reqwest::Client,
    addr: &str,
    route: &Route,
    body: reqwest::Body,
    timeout: Duration,
) -> Result<Resp, CallError> {
    let post = match route {
        Route::Parsed(url) => client.post(url.clone()),
        Route::Unparsed(url) => client.post(url.as_str()),
    };
    let resp = post
        .timeout(timeout)
        .header("content-type", "application/octet-stream")
        .body(body)
        .send()
        .await
        .map_err(|source| {
            let addr = addr.to_owned();
            if source.is_connect() {
                CallError::Connect { addr, source }
            } else {
                CallError::Http { addr, source }
            }
        })?;
    let status = resp.status();
    if !status.is_success() {
        return Err(CallError::Status {
            addr: addr.to_owned(),
            status: status.as_u16(),
        });
    }
    let bytes = resp.bytes().await.map_err(|source| CallError::Http {
        addr: addr.to_owned(),
        source,
    })?;
    Ok(postcard::from_bytes(&bytes)?)
}

impl Network {
    async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        route: &Route,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, CallError> {
        let body = postcard::to_stdvec(req)?;
        post(&self.http.client, &self.addr, route, body.into(), timeout).await
    }

    fn rpc_error<E: std::error::Error>(
        &self,
        e: CallError,
    ) -> RPCError<NodeId, BasicNode, RaftError<NodeId, E>> {
        match e {
            CallError::Connect { .. } => RPCError::Unreachable(Unreachable::new(&e)),
            _ => RPCError::Network(NetworkError::new(&e)),
        }
    }
}

impl RaftNetwork<TypeConfig> for Network {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        // The leader may have counted its own copy before syncing it (see
        // `super::durable`); no other member learns of the commit before the sync.
        if let Some(commit) = rpc.leader_commit {
            self.log_sync
                .index(commit.index)
                .await
                .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        }
        let res: Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>> = self
            .call(&self.append, &rpc, option.hard_ttl())
            .await
            .map_err(|e| self.rpc_error(e))?;
        res.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        let res: Result<VoteResponse<NodeId>, RaftError<NodeId>> = self
            .call(&self.vote, &rpc, option.hard_ttl())
            .await
            .map_err(|e| self.rpc_error(e))?;
        if let Ok(resp) = &res {
            if !resp.vote_granted && resp.last_log_id > rpc.last_log_id {
                self.outlogged
                    .fetch_max(rpc.vote.leader_id().term, Ordering::Relaxed);
            }
        }
        res.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote<NodeId>,
        snapshot: Snapshot<TypeConfig>,
        cancel: impl Future<Output = ReplicationClosed> + openraft::OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<NodeId>, StreamingError<TypeConfig, Fatal<NodeId>>> {
        let Snapshot { meta, snapshot } = snapshot;
        // A checkpoint is dumped here, only now that a follower needs it. If that fails
        // (the checkpoint replaced by a newer one meanwhile, or a full disk), the follower
        // is treated as unreachable: openraft backs off and sends the newest snapshot.
        let data = tokio::task::spawn_blocking(move || snapshot.into_body())
            .await
            .map_err(|e| StreamingError::Unreachable(Unreachable::new(&e)))?
            .map_err(|e| {
                tracing::warn!(error = %baton_error_chain::chain(&e), "could not read the snapshot to send");
                StreamingError::Unreachable(Unreachable::new(&e))
            })?;
        let len = data.len();
        let header = postcard::to_stdvec(&(vote, &meta))
            .map_err(|e| StreamingError::Network(NetworkError::new(&CallError::Codec(e))))?;
        let body = snapshot_body(header, data);
        // A snapshot can be large: give it far longer than a heartbeat-sized TTL (two
        // minutes, and a second per 4 MiB), but let openraft cancel it when replication
        // to this peer stops.
        let timeout = Duration::from_secs(120 + len / (4 << 20));
        let call = post::<Result<SnapshotResponse<NodeId>, Fatal<NodeId>>>(
            &self.http.client,
            &self.addr,
            &self.snapshot,
            reqwest::Body::wrap_stream(body),
            timeout,
        );
        let res = tokio::select! {
            closed = cancel => return Err(StreamingError::Closed(closed)),
            res = call => res,
        };
        match res {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(fatal)) => Err(StreamingError::RemoteError(RemoteError::new(
                self.target,
                fatal,
            ))),
            Err(e @ CallError::Connect { .. }) => {
                Err(StreamingError::Unreachable(Unreachable::new(&e)))
            }
            Err(e) => Err(StreamingError::Network(NetworkError::new(&e))),
        }
    }
}

/// How much of a snapshot is read and sent at a time.
const SNAPSHOT_CHUNK: usize = 1 << 20;

/// A snapshot request's body: the length of the postcard-encoded vote and meta (4 bytes,
/// little-endian), them, then the snapshot's body read from its file a chunk at a time.
fn snapshot_body(
    header: Vec<u8>,
    data: SnapshotBody,
) -> impl futures::Stream<Item = std::io::Result<Vec<u8>>> + Send + 'static {
    let mut first = (header.len() as u32).to_le_bytes().to_vec();
    first.extend_from_slice(&header);
    let end = data.len();
    // The body (and a dumped checkpoint's temporary file) lives as long as the stream.
    let rest = futures::stream::try_unfold(0u64, move |pos| {
        let file = data.shared_file();
        async move {
            if pos >= end {
                return Ok(None);
            }
            let chunk = tokio::task::spawn_blocking(move || {
                SnapshotBody::read_chunk(&file, pos, end, SNAPSHOT_CHUNK)
            })
            .await
            .map_err(std::io::Error::other)??;
            let next = pos + chunk.len() as u64;
            Ok(Some((chunk, next)))
        }
    });
    futures::StreamExt::chain(futures::stream::once(async { Ok(first) }), rest)
}
