//! The member's HTTP surface: Raft RPC between members, and the client API that other
//! processes (and members forwarding to the leader) use.
//!
//! A member with a TLS identity serves HTTPS only, and requires a certificate from the
//! store CA of every client at the handshake ([`crate::tls`]); Raft's routes also
//! require that it be a member's.
//!
//! Bodies are postcard; every answer is a `Result<T, WireError>` with HTTP 200, so that an
//! error keeps its exact kind across the wire. Watches stream length-prefixed frames.

use std::collections::BTreeSet;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use openraft::raft::{AppendEntriesRequest, VoteRequest};
use openraft::{BasicNode, Snapshot, SnapshotMeta, Vote};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tracing::Instrument;

use crate::error::{Error, WireError};
use crate::raft::snapshot::{SnapshotBody, SnapshotData};
use crate::raft::{NodeId, TypeConfig};
use crate::store::{Store, FORWARDED_HEADER};
use crate::types::*;

/// Largest batch of log entries (each entry a batch of transactions) a member accepts.
const MAX_APPEND_BYTES: usize = 1 << 30;
/// Largest snapshot a member accepts. It is streamed to disk, never held in memory; the
/// bound is twice etcd's largest recommended quota (8 GiB), with room for history.
const MAX_SNAPSHOT_BYTES: u64 = 16 << 30;
/// Largest vote and meta in front of a snapshot.
const MAX_SNAPSHOT_HEADER_BYTES: usize = 1 << 20;
/// Largest transaction request: one whole transaction, with room for its encoding.
const MAX_TXN_REQUEST_BYTES: usize = MAX_TXN_BYTES + 64 * 1024;
/// Largest request of the other routes, which carry keys and numbers only.
const MAX_SMALL_REQUEST_BYTES: usize = 64 * 1024;

impl Store {
    /// The routes of this member's HTTP server. Serve them on `advertise_addr`.
    pub fn router(&self) -> Router {
        // Every body is bounded by what its route can carry: a client cannot make a
        // member buffer a gigabyte to ask for one key.
        let bulk = DefaultBodyLimit::max(MAX_APPEND_BYTES);
        let txn_limit = DefaultBodyLimit::max(MAX_TXN_REQUEST_BYTES);
        let small = DefaultBodyLimit::max(MAX_SMALL_REQUEST_BYTES);
        let raft = Router::new()
            .route("/raft/append", post(raft_append).layer(bulk))
            .route("/raft/vote", post(raft_vote).layer(small))
            .route("/raft/pre-vote", post(raft_pre_vote).layer(small))
            // Bounded by the handler as it streams to disk.
            .route(
                "/raft/snapshot",
                post(raft_snapshot).layer(DefaultBodyLimit::disable()),
            )
            .route_layer(axum::middleware::from_fn(members_only));
        Router::new()
            .merge(raft)
            .route("/store/v1/txn", post(txn).layer(txn_limit))
            .route("/store/v1/get", post(get_key).layer(small))
            .route("/store/v1/range", post(range).layer(small))
            .route("/store/v1/read-index", post(read_index).layer(small))
            .route("/store/v1/compact", post(compact).layer(small))
            .route("/store/v1/watch", post(watch).layer(small))
            .route("/store/v1/status", get(status))
            .route("/store/v1/members/learner", post(add_learner).layer(small))
            .route("/store/v1/members/voters", post(set_voters).layer(small))
            .route("/store/v1/members/voter", post(add_voter).layer(small))
            .route("/store/v1/members/remove", post(remove_member).layer(small))
            .with_state(self.clone())
    }

    /// Serves [`Store::router`] on a bound listener until the task is dropped: HTTPS
    /// with client certificates if the member has a TLS identity, plain HTTP otherwise.
    pub fn serve(&self, listener: tokio::net::TcpListener) -> tokio::task::JoinHandle<()> {
        let router = self.router();
        let Some(tls) = self.acceptor().cloned() else {
            return tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, router).await {
                    tracing::error!(error = %e, "store HTTP server stopped");
                }
            });
        };
        let handshakes = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(x) => x,
                    Err(e) => {
                        // Out of descriptors, most likely: give the ones in use a moment.
                        tracing::warn!(error = %e, "store: accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                // Members keep their connections; a flood of new ones that never finish
                // a handshake is closed at once rather than held.
                let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                    tracing::debug!(%peer, "store: too many handshakes at once; closed");
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let (tls, router) = (tls.clone(), router.clone());
                tokio::spawn(
                    async move { serve_tls_connection(tcp, tls, router, permit).await }
                        .instrument(tracing::debug_span!("store_conn", %peer)),
                );
            }
        })
    }
}

/// How long a client has to finish its TLS handshake: one that opens a connection and
/// sends nothing must not hold a task and a descriptor for ever.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Handshakes under way at once, past which new connections are closed.
const MAX_HANDSHAKES: usize = 256;

/// Who is on the other end of a TLS connection, as its verified certificate says.
#[derive(Clone, Copy, Debug)]
struct Peer {
    member: bool,
}

async fn serve_tls_connection(
    tcp: tokio::net::TcpStream,
    tls: tokio_rustls::TlsAcceptor,
    router: Router,
    handshake: tokio::sync::OwnedSemaphorePermit,
) {
    let accepted = tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(tcp)).await;
    drop(handshake);
    let stream = match accepted {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::info!(error = %e, "store: TLS handshake refused");
            return;
        }
        Err(_) => {
            tracing::debug!("store: TLS handshake timed out");
            return;
        }
    };
    // The handshake required a certificate from the store CA; whether it is a
    // member's decides what the connection may ask.
    let member = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .is_some_and(|c| crate::tls::is_member(c));
    let router = tower::ServiceExt::map_request(
        router,
        move |mut req: axum::http::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(Peer { member });
            req
        },
    );
    let service = hyper_util::service::TowerToHyperService::new(router);
    let builder =
        hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    if let Err(e) = builder
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
        .await
    {
        tracing::debug!(error = %e, "store: connection ended with an error");
    }
}

/// Raft messages are taken from members only. Over plain HTTP (in-process tests) there
/// is no certificate to tell by, and nothing is checked.
async fn members_only(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    if req.extensions().get::<Peer>().is_some_and(|p| !p.member) {
        return (
            StatusCode::FORBIDDEN,
            "Raft messages are taken from members only: this certificate is a store client's",
        )
            .into_response();
    }
    next.run(req).await
}

// The error is the ready HTTP response; boxing it would only add an allocation.
#[allow(clippy::result_large_err)]
fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, Response> {
    postcard::from_bytes(body)
        .map_err(|e| (StatusCode::BAD_REQUEST, format!("undecodable request: {e}")).into_response())
}

fn encode<T: Serialize>(v: &T) -> Response {
    match postcard::to_stdvec(v) {
        Ok(bytes) => ([("content-type", "application/octet-stream")], bytes).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

fn reply<T: Serialize>(res: Result<T, Error>) -> Response {
    encode(&res.map_err(|e| WireError::from(&e)))
}

/// What a Raft RPC gets from a process whose store is an external etcd.
fn not_a_member() -> Response {
    (
        axum::http::StatusCode::NOT_FOUND,
        "this process is not a member of an embedded store",
    )
        .into_response()
}

fn forwarded(headers: &HeaderMap) -> bool {
    headers.contains_key(FORWARDED_HEADER)
}

async fn raft_append(State(store): State<Store>, body: Bytes) -> Response {
    let req: AppendEntriesRequest<TypeConfig> = match decode(&body) {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let Some(raft) = store.raft() else {
        return not_a_member();
    };
    store.leader_contact();
    let res = raft.append_entries(req).await;
    // The log was acknowledged before its sync (see `raft::durable`): the leader counts
    // this answer as a durable copy, so it waits for the sync.
    if res.is_ok() {
        if let Some(Err(e)) = store.log_synced().await {
            return (axum::http::StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response();
        }
    }
    encode(&res)
}

async fn raft_vote(State(store): State<Store>, body: Bytes) -> Response {
    let req: VoteRequest<NodeId> = match decode(&body) {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let Some(raft) = store.raft() else {
        return not_a_member();
    };
    encode(&raft.vote(req).await)
}

async fn raft_pre_vote(State(store): State<Store>, body: Bytes) -> Response {
    let req: crate::raft::elections::PreVote = match decode(&body) {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    if store.raft().is_none() {
        return not_a_member();
    }
    match store.answer_pre_vote(&req).await {
        Ok(granted) => encode(&granted),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// Receives a snapshot: the vote and meta in front (see the sender,
/// `raft::network`), then the body, streamed into a temporary file of the data dir and
/// checked whole before openraft is given it. A body cut short or damaged is refused
/// here, so an install never starts from one.
async fn raft_snapshot(State(store): State<Store>, body: Body) -> Response {
    let (Some(raft), Some(dir)) = (store.raft(), store.data_dir()) else {
        return not_a_member();
    };
    let span = tracing::info_span!("receive_snapshot");
    let received = receive_snapshot(dir.to_path_buf(), body)
        .instrument(span)
        .await;
    let (vote, meta, data) = match received {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %baton_error_chain::chain(&e), "refused a snapshot");
            return (StatusCode::BAD_REQUEST, format!("snapshot refused: {e}")).into_response();
        }
    };
    let snapshot = Snapshot::<TypeConfig> {
        meta,
        snapshot: Box::new(SnapshotData::from(data)),
    };
    encode(&raft.install_full_snapshot(vote, snapshot).await)
}

type SnapshotHeader = (Vote<NodeId>, SnapshotMeta<NodeId, BasicNode>);

/// Why a snapshot sent to this member was refused.
#[derive(Debug, thiserror::Error)]
enum ReceiveError {
    #[error("reading the request failed")]
    Request(#[source] axum::Error),
    #[error("{0}")]
    Header(String),
    #[error("its header is undecodable")]
    Codec(#[source] postcard::Error),
    #[error("it is larger than {MAX_SNAPSHOT_BYTES} bytes")]
    TooLarge,
    #[error("it could not be kept on disk")]
    File(#[source] crate::raft::snapshot::SnapshotFileError),
    #[error("writing it to disk failed")]
    Write(#[source] std::io::Error),
    #[error("its body is damaged")]
    Damaged(#[source] crate::dump::DumpError),
    #[error("a blocking task failed")]
    Task(#[source] tokio::task::JoinError),
}

async fn receive_snapshot(
    dir: std::path::PathBuf,
    body: Body,
) -> Result<(Vote<NodeId>, SnapshotMeta<NodeId, BasicNode>, SnapshotBody), ReceiveError> {
    use futures::StreamExt;
    let mut stream = body.into_data_stream();
    let mut pending = bytes::BytesMut::new();
    let mut header: Option<SnapshotHeader> = None;
    let mut data = SnapshotBody::receiving(&dir).map_err(ReceiveError::File)?;
    // Written a megabyte at a time, off the async threads.
    const WRITE_AT: usize = 1 << 20;
    loop {
        let chunk = stream
            .next()
            .await
            .transpose()
            .map_err(ReceiveError::Request)?;
        let done = chunk.is_none();
        if let Some(c) = chunk {
            pending.extend_from_slice(&c);
        }
        if header.is_none() {
            if pending.len() < 4 {
                if done {
                    return Err(ReceiveError::Header(
                        "the request ends before its header".into(),
                    ));
                }
                continue;
            }
            let len = u32::from_le_bytes(pending[..4].try_into().expect("4 bytes")) as usize;
            if len > MAX_SNAPSHOT_HEADER_BYTES {
                return Err(ReceiveError::Header(format!(
                    "its header claims {len} bytes"
                )));
            }
            if pending.len() < 4 + len {
                if done {
                    return Err(ReceiveError::Header(
                        "the request ends inside its header".into(),
                    ));
                }
                continue;
            }
            let h = pending.split_to(4 + len);
            header = Some(postcard::from_bytes(&h[4..]).map_err(ReceiveError::Codec)?);
        }
        if data.len() + pending.len() as u64 > MAX_SNAPSHOT_BYTES {
            return Err(ReceiveError::TooLarge);
        }
        if pending.len() >= WRITE_AT || (done && !pending.is_empty()) {
            let buf = pending.split().freeze();
            data = tokio::task::spawn_blocking(move || data.append(&buf).map(|()| data))
                .await
                .map_err(ReceiveError::Task)?
                .map_err(ReceiveError::Write)?;
        }
        if done {
            break;
        }
    }
    let (vote, meta) = header.expect("read before the body");
    // Checked whole (framing and checksum) before anything is replaced by it.
    let data = tokio::task::spawn_blocking(move || crate::dump::verify(data.body()).map(|_| data))
        .await
        .map_err(ReceiveError::Task)?
        .map_err(ReceiveError::Damaged)?;
    Ok((vote, meta, data))
}

async fn txn(State(store): State<Store>, headers: HeaderMap, body: Bytes) -> Response {
    let req: Txn = match decode(&body) {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let served = store.txn_inner(req, forwarded(&headers));
    match deadline(&headers) {
        Some(d) => reply(crate::store::DEADLINE.scope(d, served).await),
        None => reply(served.await),
    }
}

/// When the client stops waiting, from its timeout header.
fn deadline(headers: &HeaderMap) -> Option<tokio::time::Instant> {
    let ms: u64 = headers
        .get(crate::store::TIMEOUT_HEADER)?
        .to_str()
        .ok()?
        .parse()
        .ok()?;
    Some(tokio::time::Instant::now() + std::time::Duration::from_millis(ms.min(3_600_000)))
}

async fn get_key(State(store): State<Store>, body: Bytes) -> Response {
    let (key, opts): (Vec<u8>, ReadOptions) = match decode(&body) {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    reply(store.get_with_revision(&key, opts).await)
}

async fn range(State(store): State<Store>, body: Bytes) -> Response {
    let req: RangeRequest = match decode(&body) {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    reply(store.range(req).await)
}

async fn read_index(State(store): State<Store>) -> Response {
    reply(store.leader_read_index().await)
}

async fn compact(State(store): State<Store>, headers: HeaderMap, body: Bytes) -> Response {
    let rev: Revision = match decode(&body) {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    reply(store.compact_inner(rev, forwarded(&headers)).await)
}

async fn status(State(store): State<Store>) -> Response {
    encode(&store.status())
}

async fn add_learner(State(store): State<Store>, headers: HeaderMap, body: Bytes) -> Response {
    let (id, addr): (NodeId, String) = match decode(&body) {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    reply(store.add_learner_inner(id, addr, forwarded(&headers)).await)
}

async fn set_voters(State(store): State<Store>, headers: HeaderMap, body: Bytes) -> Response {
    let voters: BTreeSet<NodeId> = match decode(&body) {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    reply(
        store
            .change_membership_inner(voters, forwarded(&headers))
            .await,
    )
}

async fn add_voter(State(store): State<Store>, headers: HeaderMap, body: Bytes) -> Response {
    let id: NodeId = match decode(&body) {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    reply(store.add_voter_inner(id, forwarded(&headers)).await)
}

async fn remove_member(State(store): State<Store>, body: Bytes) -> Response {
    let id: NodeId = match decode(&body) {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    reply(store.remove_member(id).await)
}

/// Encodes one watch frame: a 4-byte little-endian length, then the postcard message.
pub(crate) fn frame(msg: &Result<WatchEvent, WireError>) -> Bytes {
    let body = postcard::to_stdvec(msg).unwrap_or_default();
    let mut out = Vec::with_capacity(body.len() + 4);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    Bytes::from(out)
}

async fn watch(State(store): State<Store>, body: Bytes) -> Response {
    let (prefix, from): (Vec<u8>, Revision) = match decode(&body) {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    match store.watch(prefix, from) {
        Err(e) => {
            let first = frame(&Err(WireError::from(&e)));
            Body::from(first).into_response()
        }
        Ok(w) => {
            use futures::StreamExt;
            let stream = w.map(|item| {
                let msg = item.map_err(|e| WireError::from(&e));
                Ok::<_, std::convert::Infallible>(frame(&msg))
            });
            Body::from_stream(stream).into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dump::{DumpWriter, Family, Head};
    use std::io::Read;

    /// A snapshot request as a member sends it, its body cut to `keep` bytes.
    fn request(rows: usize, keep: Option<usize>) -> Vec<u8> {
        let header = postcard::to_stdvec(&(
            Vote::<NodeId>::new(2, 1),
            SnapshotMeta::<NodeId, BasicNode>::default(),
        ))
        .unwrap();
        let mut w = DumpWriter::new(Vec::new(), &Head::default()).unwrap();
        for i in 0..rows {
            w.row(Family::Kv, format!("k{i}").as_bytes(), &[7; 300])
                .unwrap();
        }
        let (mut body, _) = w.finish().unwrap();
        if let Some(n) = keep {
            body.truncate(n);
        }
        let mut req = (header.len() as u32).to_le_bytes().to_vec();
        req.extend_from_slice(&header);
        req.extend_from_slice(&body);
        req
    }

    /// The request's bytes in small chunks, as a network delivers them.
    fn chunked(bytes: Vec<u8>) -> Body {
        let chunks: Vec<Result<Bytes, std::io::Error>> = bytes
            .chunks(4000)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        Body::from_stream(futures::stream::iter(chunks))
    }

    fn leftovers(dir: &std::path::Path) -> usize {
        std::fs::read_dir(dir).unwrap().count()
    }

    #[tokio::test]
    async fn a_snapshot_is_received_into_a_file_and_a_damaged_one_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let whole = request(5000, None);
        let (vote, _, data) = receive_snapshot(dir.path().into(), chunked(whole.clone()))
            .await
            .unwrap();
        assert_eq!(vote, Vote::new(2, 1));
        let mut body = Vec::new();
        data.body().read_to_end(&mut body).unwrap();
        let header = u32::from_le_bytes(whole[..4].try_into().unwrap()) as usize;
        assert_eq!(body, whole[4 + header..]);
        drop(data);
        assert_eq!(
            leftovers(dir.path()),
            0,
            "an uninstalled snapshot's file goes"
        );

        let cut = request(5000, Some(1_000_000));
        let err = receive_snapshot(dir.path().into(), chunked(cut))
            .await
            .unwrap_err();
        assert!(matches!(err, ReceiveError::Damaged(_)), "{err}");
        let mut flipped = request(100, None);
        let at = flipped.len() - 10;
        flipped[at] ^= 1;
        let err = receive_snapshot(dir.path().into(), chunked(flipped))
            .await
            .unwrap_err();
        assert!(matches!(err, ReceiveError::Damaged(_)), "{err}");
        let mut huge_header = request(1, None);
        huge_header[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        let err = receive_snapshot(dir.path().into(), chunked(huge_header))
            .await
            .unwrap_err();
        assert!(matches!(err, ReceiveError::Header(_)), "{err}");
        let err = receive_snapshot(dir.path().into(), chunked(vec![1, 0]))
            .await
            .unwrap_err();
        assert!(matches!(err, ReceiveError::Header(_)), "{err}");
        assert_eq!(
            leftovers(dir.path()),
            0,
            "a refused snapshot leaves no file"
        );
    }
}
