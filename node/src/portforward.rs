//! `kubectl port-forward`: TCP to a pod's ports, over SPDY (see `spdy.rs`), either
//! tunnelled through a WebSocket (kubectl 1.31+) or on a connection upgraded to SPDY
//! (older kubectl, and the fallback).
//!
//! For every local connection kubectl opens two streams with the same `requestid` and
//! `port`: an error stream and a data stream. The node connects to the pod's port
//! (through the sandbox's [`PodStreams::connect`]) and copies bytes both ways. When the
//! pod's side ends, the node ends the error stream and then the data stream; when the
//! connection fails, it writes why on the error stream first, as the kubelet does (and
//! kubectl, as it does with a kubelet, reports it and gives up its session).
//!
//! Everything a session holds (its connections to the pod, its tasks) is dropped when the
//! client goes away: at the end of the connection, at GOAWAY, or after [`IDLE`] without a
//! frame (kubectl pings every 5 to 10 seconds).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::spdy::{self, Frame, Reader, Writer};
use crate::streams::PodStreams;

/// A client that sends nothing for this long is gone.
const IDLE: Duration = Duration::from_secs(60);
/// How long a connection to the pod may take.
const CONNECT: Duration = Duration::from_secs(10);
/// Bytes read from the pod per data frame: twice what kubectl writes in one, so that a
/// bulk transfer takes half the frames.
const CHUNK: usize = 64 << 10;

/// The WebSocket subprotocol of the tunnel.
pub const TUNNEL_PROTOCOL: &str = "SPDY/3.1+portforward.k8s.io";
/// The stream protocol negotiated on a SPDY upgrade.
pub const PROTOCOL: &str = "portforward.k8s.io";

/// Who the session forwards to, for its error messages.
#[derive(Debug, Clone)]
pub struct Target {
    pub pod: String,
    pub uid: String,
}

/// The two streams of one forwarded connection, as they arrive.
#[derive(Default)]
struct Pair {
    error: Option<u32>,
    data: Option<(u32, mpsc::Receiver<Bytes>)>,
    port: u16,
}

/// Serves one port-forward session on a byte stream carrying SPDY.
pub async fn serve<S>(io: S, streams: Arc<dyn PodStreams>, target: Target)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (r, w) = tokio::io::split(io);
    let mut reader = Reader::new(r);
    let (out, writer) = spdy::spawn_writer(w);
    let mut replies = Writer::default();
    let mut pairs: HashMap<String, Pair> = HashMap::new();
    // Data stream id -> where its bytes go (to the forwarder that owns the connection).
    let mut inbound: HashMap<u32, mpsc::Sender<Bytes>> = HashMap::new();
    // Data stream id -> its forwarder, to abort on RST_STREAM.
    let mut running: HashMap<u32, tokio::task::AbortHandle> = HashMap::new();
    let mut forwarders = JoinSet::new();
    let mut last = 0u32;
    loop {
        let frame = match tokio::time::timeout(IDLE, reader.next()).await {
            Ok(Ok(Some(f))) => f,
            Ok(Ok(None)) => break,
            Ok(Err(e)) => {
                tracing::info!(error = %baton_kube::error::chain(&e), "port-forward session ended");
                break;
            }
            Err(_) => {
                tracing::info!("port-forward client idle for {IDLE:?}: closing");
                break;
            }
        };
        // Reap finished forwarders so that a long session does not accumulate them.
        while forwarders.try_join_next().is_some() {}
        match frame {
            Frame::SynStream { id, headers, .. } => {
                last = id;
                let get = |k: &str| {
                    headers
                        .iter()
                        .find(|(n, _)| n == k)
                        .map(|(_, v)| v.as_str())
                };
                let port = get("port")
                    .and_then(|p| p.parse::<u16>().ok())
                    .filter(|p| *p != 0);
                let (Some(port), Some(kind @ ("data" | "error"))) = (port, get("streamtype"))
                else {
                    let _ = out.send(Writer::rst(id, spdy::CANCEL)).await;
                    continue;
                };
                if out.send(replies.syn_reply(id)).await.is_err() {
                    break;
                }
                // Clients before requestid pair the error stream n with the data stream n+2.
                let key = match get("requestid") {
                    Some(r) => r.to_string(),
                    None if kind == "error" => id.to_string(),
                    None => id.saturating_sub(2).to_string(),
                };
                let pair = pairs.entry(key.clone()).or_default();
                pair.port = port;
                if kind == "error" {
                    pair.error = Some(id);
                } else {
                    let (tx, rx) = mpsc::channel(16);
                    inbound.insert(id, tx);
                    pair.data = Some((id, rx));
                }
                if pair.error.is_some() && pair.data.is_some() {
                    let Some(Pair {
                        error: Some(error),
                        data: Some((data, rx)),
                        port,
                    }) = pairs.remove(&key)
                    else {
                        continue;
                    };
                    let task = forwarders.spawn(forward(
                        streams.clone(),
                        target.clone(),
                        port,
                        error,
                        data,
                        rx,
                        out.clone(),
                    ));
                    running.insert(data, task);
                }
            }
            Frame::Data { id, data, fin } => {
                if let Some(tx) = inbound.get(&id) {
                    if !data.is_empty() && tx.send(data).await.is_err() {
                        inbound.remove(&id);
                    }
                }
                if fin {
                    // End of the client's side: the pod's side reads end-of-file.
                    inbound.remove(&id);
                }
            }
            Frame::RstStream { id, .. } => {
                inbound.remove(&id);
                if let Some(task) = running.remove(&id) {
                    task.abort();
                }
            }
            Frame::Ping(id) if spdy::is_client_ping(id) => {
                if out.send(Writer::ping(id)).await.is_err() {
                    break;
                }
            }
            Frame::GoAway => break,
            Frame::Ping(_) | Frame::Ignored => {}
        }
    }
    // The client is gone: every connection to the pod goes with it.
    forwarders.abort_all();
    while forwarders.join_next().await.is_some() {}
    let _ = out.send(Writer::goaway(last)).await;
    drop(out);
    let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
}

/// One forwarded connection: the pod's port, bridged to the data stream.
async fn forward(
    streams: Arc<dyn PodStreams>,
    target: Target,
    port: u16,
    error: u32,
    data: u32,
    mut from_client: mpsc::Receiver<Bytes>,
    out: mpsc::Sender<Vec<u8>>,
) {
    let connected = match tokio::time::timeout(CONNECT, streams.connect(port)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no connection within {CONNECT:?}"),
        )),
    };
    let tcp = match connected {
        Ok(t) => t,
        Err(e) => {
            let msg = format!(
                "error forwarding port {port} to pod {}, uid {}: {e}",
                target.pod, target.uid
            );
            tracing::info!("{msg}");
            let _ = out.send(Writer::data(error, msg.as_bytes(), true)).await;
            let _ = out.send(Writer::data(data, b"", true)).await;
            return;
        }
    };
    let (mut pod_r, mut pod_w) = tcp.into_split();
    let up = tokio::spawn(async move {
        while let Some(b) = from_client.recv().await {
            if pod_w.write_all(&b).await.is_err() {
                return;
            }
        }
        let _ = pod_w.shutdown().await;
    });
    let mut buf = vec![0u8; CHUNK];
    loop {
        match pod_r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if out
                    .send(Writer::data(data, &buf[..n], false))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        }
    }
    up.abort();
    let _ = out.send(Writer::data(error, b"", true)).await;
    let _ = out.send(Writer::data(data, b"", true)).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeSandboxes;

    /// A client end of a session: SYN_STREAMs compressed as spdystream does.
    struct Client {
        z: flate2::Compress,
        io: tokio::io::DuplexStream,
    }

    impl Client {
        async fn syn(&mut self, id: u32, headers: &[(&str, &str)]) {
            let f = crate::spdy::client_syn(&mut self.z, id, headers);
            self.io.write_all(&f).await.unwrap();
        }

        async fn send(&mut self, frame: Vec<u8>) {
            self.io.write_all(&frame).await.unwrap();
        }

        /// The next frame from the server, as (type or data, stream id, payload, fin).
        async fn frame(&mut self) -> (Option<u16>, u32, Vec<u8>, bool) {
            let mut head = [0u8; 8];
            self.io.read_exact(&mut head).await.unwrap();
            let len = u32::from_be_bytes([0, head[5], head[6], head[7]]) as usize;
            let mut body = vec![0u8; len];
            self.io.read_exact(&mut body).await.unwrap();
            let fin = head[4] & 1 == 1;
            if head[0] & 0x80 != 0 {
                let kind = u16::from_be_bytes([head[2], head[3]]);
                let id = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
                (Some(kind), id, body, fin)
            } else {
                let id = u32::from_be_bytes(head[..4].try_into().unwrap());
                (None, id, body, fin)
            }
        }
    }

    fn session() -> Client {
        let (client, server) = tokio::io::duplex(1 << 20);
        let fake = FakeSandboxes::default();
        tokio::spawn(serve(
            server,
            fake.any_streams(),
            Target {
                pod: "p".into(),
                uid: "u".into(),
            },
        ));
        let mut z = flate2::Compress::new(flate2::Compression::best(), true);
        z.set_dictionary(&spdy_dictionary()).unwrap();
        Client { z, io: client }
    }

    fn spdy_dictionary() -> Vec<u8> {
        crate::spdy::dictionary().to_vec()
    }

    #[tokio::test]
    async fn bytes_flow_both_ways_and_the_pods_end_closes_both_streams() {
        // The "pod": an echo server that closes after one exchange.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port().to_string();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).await.unwrap();
            s.write_all(&buf).await.unwrap();
        });
        let mut c = session();
        c.syn(
            1,
            &[("streamtype", "error"), ("port", &port), ("requestid", "0")],
        )
        .await;
        assert_eq!(c.frame().await.0, Some(2), "SYN_REPLY to the error stream");
        c.syn(
            3,
            &[("streamtype", "data"), ("port", &port), ("requestid", "0")],
        )
        .await;
        assert_eq!(c.frame().await.0, Some(2), "SYN_REPLY to the data stream");
        c.send(Writer::data(3, b"hello", false)).await;
        let (kind, id, body, _) = c.frame().await;
        assert_eq!((kind, id, body.as_slice()), (None, 3, &b"hello"[..]));
        // The pod closed: an empty error stream, then the data stream ends.
        let (kind, id, body, fin) = c.frame().await;
        assert_eq!((kind, id, body.is_empty(), fin), (None, 1, true, true));
        let (kind, id, _, fin) = c.frame().await;
        assert_eq!((kind, id, fin), (None, 3, true));
        // Pings from the client are answered.
        c.send(Writer::ping(5)).await;
        assert_eq!(c.frame().await.0, Some(6));
    }

    #[tokio::test]
    async fn a_port_nothing_listens_on_is_reported_on_the_error_stream() {
        // A port that was free a moment ago: nothing listens there now.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port().to_string()
        };
        let mut c = session();
        c.syn(
            1,
            &[("streamtype", "error"), ("port", &port), ("requestid", "0")],
        )
        .await;
        c.frame().await;
        c.syn(
            3,
            &[("streamtype", "data"), ("port", &port), ("requestid", "0")],
        )
        .await;
        c.frame().await;
        let (kind, id, body, fin) = c.frame().await;
        assert_eq!((kind, id, fin), (None, 1, true));
        let msg = String::from_utf8(body).unwrap();
        assert!(
            msg.starts_with(&format!("error forwarding port {port} to pod p, uid u:")),
            "{msg}"
        );
        // The session goes on: a bad stream is refused, the connection stays.
        c.syn(5, &[("streamtype", "bogus"), ("port", &port)]).await;
        let (kind, id, ..) = c.frame().await;
        assert_eq!((kind, id), (None, 3), "the data stream's end first");
        let (kind, id, ..) = c.frame().await;
        assert_eq!((kind, id), (Some(3), 5), "RST_STREAM for the bad stream");
    }
}
