//! `kubectl port-forward` and the clients' port-forwards: TCP to a pod's ports.
//!
//! A session takes one of three forms, as the client asks:
//! - SPDY (see `spdy.rs`) tunnelled through a WebSocket (kubectl 1.31+), or on a
//!   connection upgraded to SPDY (older kubectl, and the fallback). For every local
//!   connection kubectl opens two streams with the same `requestid` and `port`: an error
//!   stream and a data stream. The node connects to the pod's port (through the sandbox's
//!   [`PodStreams::connect`]) and copies bytes both ways. When the pod's side ends, the
//!   node ends the error stream and then the data stream; when the connection fails, it
//!   writes why on the error stream first, as the kubelet does (and kubectl, as it does
//!   with a kubelet, reports it and gives up its session).
//! - WebSocket channels ([`serve_channels`]: kube-rs, the Python and JavaScript clients):
//!   the ports are in the query, one connection each, made when the session starts.
//!
//! Everything a session holds (its connections to the pod, its tasks) is dropped when the
//! client goes away: at the end of the connection, at GOAWAY or a close, or after [`IDLE`]
//! without a frame (kubectl pings every 5 to 10 seconds).

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
    let (out, writer) = spdy::spawn_writer(w);
    serve_frames(r, out, writer, streams, target).await;
}

/// Serves one port-forward session whose SPDY frames come from `r` and go to `out`,
/// which `writer` drains; `writer` is waited for at the end.
pub async fn serve_frames<R>(
    r: R,
    out: mpsc::Sender<Vec<u8>>,
    writer: tokio::task::JoinHandle<()>,
    streams: Arc<dyn PodStreams>,
    target: Target,
) where
    R: AsyncRead + Unpin,
{
    let mut reader = Reader::new(r);
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
                        Ends::Spdy { error, data },
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

/// How a forwarded connection's bytes and ends are framed for the client.
#[derive(Debug, Clone, Copy)]
enum Ends {
    /// A SPDY session: a data stream and an error stream per connection, each ended with
    /// a FIN.
    Spdy { error: u32, data: u32 },
    /// A channel session (WebSocket, v4 channels): a data channel and the error channel
    /// after it. A channel is never ended; the session ends with its last connection.
    Channels { data: u8 },
}

impl Ends {
    fn data(self, bytes: &[u8]) -> Vec<u8> {
        match self {
            Ends::Spdy { data, .. } => Writer::data(data, bytes, false),
            Ends::Channels { data } => channel_message(data, bytes),
        }
    }

    /// What tells the client that the connection failed, with why.
    fn failed(self, why: &str) -> Vec<Vec<u8>> {
        match self {
            Ends::Spdy { error, data } => vec![
                Writer::data(error, why.as_bytes(), true),
                Writer::data(data, b"", true),
            ],
            Ends::Channels { data } => vec![channel_message(data + 1, why.as_bytes())],
        }
    }

    /// What tells the client that the pod closed the connection.
    fn closed(self) -> Vec<Vec<u8>> {
        match self {
            Ends::Spdy { error, data } => vec![
                Writer::data(error, b"", true),
                Writer::data(data, b"", true),
            ],
            Ends::Channels { .. } => Vec::new(),
        }
    }
}

/// A channel message as it goes out in binary: the channel's number, then the bytes.
fn channel_message(channel: u8, bytes: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(bytes.len() + 1);
    m.push(channel);
    m.extend_from_slice(bytes);
    m
}

/// One forwarded connection: the pod's port, bridged to the client's data stream or
/// channel.
async fn forward(
    streams: Arc<dyn PodStreams>,
    target: Target,
    port: u16,
    ends: Ends,
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
            for m in ends.failed(&msg) {
                let _ = out.send(m).await;
            }
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
                if out.send(ends.data(&buf[..n])).await.is_err() {
                    break;
                }
            }
        }
    }
    up.abort();
    for m in ends.closed() {
        let _ = out.send(m).await;
    }
}

/// The WebSocket subprotocols of the channel port-forward that kube-rs and the Python
/// and JavaScript clients speak, and whether each carries base64 text.
pub const CHANNEL_PROTOCOLS: [(&str, bool); 4] = [
    ("v4.channel.k8s.io", false),
    ("v4.base64.channel.k8s.io", true),
    ("channel.k8s.io", false),
    ("base64.channel.k8s.io", true),
];

/// The ports of a channel session, from its query (`ports=80,443`, or `ports` repeated),
/// in order: the first is channels 0 and 1, the next 2 and 3, and so on.
pub fn query_ports(query: &str) -> Result<Vec<u16>, String> {
    let mut ports = Vec::new();
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        if k != "ports" {
            continue;
        }
        for p in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match p.parse::<u16>() {
                Ok(n) if n != 0 => ports.push(n),
                _ => return Err(format!("unable to parse \"{p}\" as a port")),
            }
        }
    }
    if ports.is_empty() {
        return Err("query parameter \"ports\" is required".into());
    }
    // Two channels a port, numbered in one byte.
    if ports.len() > 128 {
        return Err(format!("at most 128 ports, not {}", ports.len()));
    }
    Ok(ports)
}

/// Serves one channel session (the WebSocket port-forward before the SPDY tunnel): one
/// connection to each port in `ports`, made at once. Channel 2i carries port i's bytes
/// both ways and 2i+1 its error; each channel's first message from the node is its port
/// (two bytes, little-endian). The session ends when the client goes, or when every
/// connection has ended, as the kubelet's does.
pub async fn serve_channels<S>(
    ws: tokio_tungstenite::WebSocketStream<S>,
    ports: Vec<u16>,
    base64: bool,
    streams: Arc<dyn PodStreams>,
    target: Target,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    use futures::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let encode = move |m: Vec<u8>| -> Message {
        if base64 {
            use base64::Engine;
            let mut text = String::with_capacity(m.len() * 4 / 3 + 4);
            text.push(char::from(b'0' + m[0]));
            base64::engine::general_purpose::STANDARD.encode_string(&m[1..], &mut text);
            Message::Text(text.into())
        } else {
            Message::Binary(m.into())
        }
    };
    let (sink, mut incoming) = ws.split();
    let (out, writer) = crate::streams::spawn_message_writer(sink, 64, encode);
    let mut inbound = Vec::with_capacity(ports.len());
    let mut forwarders = JoinSet::new();
    for (i, port) in ports.iter().copied().enumerate() {
        let data = (2 * i) as u8;
        for ch in [data, data + 1] {
            let _ = out.send(channel_message(ch, &port.to_le_bytes())).await;
        }
        let (tx, rx) = mpsc::channel(16);
        inbound.push(Some(tx));
        forwarders.spawn(forward(
            streams.clone(),
            target.clone(),
            port,
            Ends::Channels { data },
            rx,
            out.clone(),
        ));
    }
    loop {
        tokio::select! {
            m = tokio::time::timeout(IDLE, incoming.next()) => {
                let m = match m {
                    Ok(Some(Ok(m))) => m,
                    Ok(Some(Err(e))) => {
                        tracing::info!(error = %e, "port-forward session ended");
                        break;
                    }
                    Ok(None) => break,
                    Err(_) => {
                        tracing::info!("port-forward client idle for {IDLE:?}: closing");
                        break;
                    }
                };
                let (channel, bytes) = match m {
                    Message::Binary(mut b) if !b.is_empty() => {
                        let rest = b.split_off(1);
                        (b[0], rest)
                    }
                    Message::Text(t) if base64 && !t.is_empty() => {
                        use base64::Engine;
                        let t = t.as_str();
                        let Some(ch) = t.as_bytes()[0].checked_sub(b'0') else {
                            continue;
                        };
                        match base64::engine::general_purpose::STANDARD.decode(&t[1..]) {
                            Ok(b) => (ch, Bytes::from(b)),
                            Err(_) => continue,
                        }
                    }
                    Message::Close(_) => break,
                    _ => continue,
                };
                // Only a data channel (even) carries bytes to the pod.
                let port = usize::from(channel / 2);
                if channel % 2 != 0 || bytes.is_empty() {
                    continue;
                }
                let Some(Some(tx)) = inbound.get(port) else {
                    continue;
                };
                if tx.send(bytes).await.is_err() {
                    inbound[port] = None;
                }
            }
            done = forwarders.join_next() => {
                if done.is_none() {
                    // Every connection has ended: so does the session.
                    break;
                }
            }
        }
    }
    forwarders.abort_all();
    while forwarders.join_next().await.is_some() {}
    drop(out);
    let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
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

    #[test]
    fn ports_come_from_the_query_in_order() {
        assert_eq!(query_ports("&ports=80%2C1234"), Ok(vec![80, 1234]));
        assert_eq!(query_ports("ports=80&ports=81"), Ok(vec![80, 81]));
        assert!(query_ports("")
            .unwrap_err()
            .contains("\"ports\" is required"));
        assert!(query_ports("ports=0").is_err());
        assert!(query_ports("ports=http").unwrap_err().contains("\"http\""));
        let many = (1..=129)
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(",");
        assert!(query_ports(&format!("ports={many}")).is_err());
    }

    /// A port that was free a moment ago: nothing listens there now.
    fn closed_port() -> u16 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    }

    /// A channel session's client end, and the session's task.
    async fn channel_session(
        ports: Vec<u16>,
        base64: bool,
    ) -> (
        tokio_tungstenite::WebSocketStream<tokio::io::DuplexStream>,
        tokio::task::JoinHandle<()>,
    ) {
        use tokio_tungstenite::tungstenite::protocol::Role;
        let (client, server) = tokio::io::duplex(1 << 20);
        let fake = FakeSandboxes::default();
        let task = tokio::spawn(async move {
            let ws =
                tokio_tungstenite::WebSocketStream::from_raw_socket(server, Role::Server, None)
                    .await;
            let target = Target {
                pod: "p".into(),
                uid: "u".into(),
            };
            serve_channels(ws, ports, base64, fake.any_streams(), target).await;
        });
        let ws =
            tokio_tungstenite::WebSocketStream::from_raw_socket(client, Role::Client, None).await;
        (ws, task)
    }

    async fn next_message(
        ws: &mut tokio_tungstenite::WebSocketStream<tokio::io::DuplexStream>,
    ) -> tokio_tungstenite::tungstenite::Message {
        use futures::StreamExt;
        tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a message in time")
            .expect("the session is open")
            .expect("a well-formed message")
    }

    #[tokio::test]
    async fn channels_announce_their_ports_then_carry_bytes_both_ways() {
        use futures::SinkExt;
        use tokio_tungstenite::tungstenite::Message;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).await.unwrap();
            s.write_all(&buf).await.unwrap();
        });
        let (mut ws, task) = channel_session(vec![port], false).await;
        let p = port.to_le_bytes();
        for ch in [0u8, 1] {
            let m = next_message(&mut ws).await;
            assert_eq!(
                m,
                Message::Binary(vec![ch, p[0], p[1]].into()),
                "channel {ch}"
            );
        }
        ws.send(Message::Binary(b"\x00hello".to_vec().into()))
            .await
            .unwrap();
        let m = next_message(&mut ws).await;
        assert_eq!(m, Message::Binary(b"\x00hello".to_vec().into()));
        // The pod closed its only connection: the session closes.
        assert!(next_message(&mut ws).await.is_close());
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the session ends")
            .unwrap();
    }

    #[tokio::test]
    async fn a_channel_to_a_closed_port_reports_on_its_error_channel_in_base64() {
        let port = closed_port();
        let (mut ws, task) = channel_session(vec![port], true).await;
        use base64::Engine;
        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        let p = port.to_le_bytes();
        assert_eq!(
            next_message(&mut ws).await.into_text().unwrap(),
            format!("0{}", b64(&p))
        );
        assert_eq!(
            next_message(&mut ws).await.into_text().unwrap(),
            format!("1{}", b64(&p))
        );
        let err = next_message(&mut ws).await.into_text().unwrap();
        let why = base64::engine::general_purpose::STANDARD
            .decode(&err.as_str()[1..])
            .unwrap();
        let why = String::from_utf8(why).unwrap();
        assert!(err.starts_with('1'), "{err}");
        assert!(
            why.starts_with(&format!("error forwarding port {port} to pod p, uid u:")),
            "{why}"
        );
        assert!(next_message(&mut ws).await.is_close());
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the session ends")
            .unwrap();
    }

    #[tokio::test]
    async fn a_port_nothing_listens_on_is_reported_on_the_error_stream() {
        let port = closed_port().to_string();
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
