//! kubectl's streams into a pod: `exec`, served here over WebSocket with the
//! `v5.channel.k8s.io` (and `v4`) subprotocol that kubectl 1.30+ speaks.
//!
//! What a stream reaches is the sandbox's business: a sandbox hands the node a
//! [`PodStreams`] for its pod, and this module only carries bytes and exit codes. For
//! Wasm pods, `exec` starts a new instance of the container's component as a command in
//! the pod (see `baton_wasm_shim::PodHandle::exec`).
//!
//! ## The channel protocol
//! Every WebSocket binary message starts with a channel byte: 0 stdin, 1 stdout, 2 stderr,
//! 3 the error channel (one `Status`, written when the command ends), 4 terminal resize.
//! `v5` adds 255: the client closes one of its channels, which is how `kubectl exec -i`
//! tells the command that stdin ended.
//!
//! ## Lifetime
//! The command lives as long as its client: a client that closes, drops its connection
//! or stops answering pings (no frame for [`IDLE`]) ends the stream, and with it the
//! instance. The node never waits on a client to free what the pod holds.

use std::sync::Arc;
use std::time::Duration;

use baton_wasm_shim::{ExecIo, Exit, Terminal};
use futures::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::sandbox::ExitFuture;
use futures::future::BoxFuture;

/// A pod's streams, as its sandbox provides them.
pub trait PodStreams: Send + Sync + 'static {
    /// What [`exec`](Self::exec) (`command` given) or [`attach`](Self::attach) (None)
    /// would refuse before starting anything. The node asks before it switches
    /// protocols, so a refusal reaches the client as the HTTP answer: once switched, a
    /// client may still be setting up its channels when a quick error arrives on one,
    /// and drop it.
    fn check(&self, container: &str, command: Option<&[String]>) -> Result<(), ExecError>;

    /// Starts `argv` in `container` with the given stdio. The returned future ends with
    /// the command; dropping it stops the command.
    fn exec(&self, container: &str, argv: Vec<String>, io: ExecIo)
        -> Result<ExitFuture, ExecError>;

    /// Connects to a running container's standard streams (`kubectl attach`): what it
    /// writes from now on, and its standard input if it has one. The future ends when
    /// the container's process does; dropping it detaches.
    fn attach(&self, container: &str, io: ExecIo) -> Result<ExitFuture, ExecError>;

    /// Opens a TCP connection to one of the pod's ports, as a process in the pod's
    /// network would (`kubectl port-forward`).
    fn connect(&self, port: u16) -> BoxFuture<'static, std::io::Result<tokio::net::TcpStream>>;
}

/// Why a command could not start.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("container {0:?} is not running")]
    NotRunning(String),
    #[error("no command given: `kubectl exec POD -- COMMAND [ARGS...]`")]
    NoCommand,
    #[error("starting the command in container {container:?}")]
    Start {
        container: String,
        #[source]
        source: baton_wasm_shim::ShimError,
    },
    #[error("starting the command in container {container:?}")]
    Runc {
        container: String,
        #[source]
        source: baton_runc::RuncError,
    },
    #[error("{0}")]
    Unsupported(String),
}

impl ExecError {
    /// The reason a client sees; a component that cannot run commands is the caller's
    /// mistake, not the node's.
    pub(crate) fn status(&self) -> (u16, &'static str) {
        match self {
            ExecError::Start {
                source: baton_wasm_shim::ShimError::NotACommand,
                ..
            }
            | ExecError::NoCommand
            | ExecError::Unsupported(_) => (400, "BadRequest"),
            ExecError::NotRunning(_) => (404, "NotFound"),
            ExecError::Start { .. } | ExecError::Runc { .. } => (500, "InternalError"),
        }
    }
}

/// The channel subprotocols served, most preferred first.
pub const PROTOCOLS: [&str; 2] = ["v5.channel.k8s.io", "v4.channel.k8s.io"];

const STDIN: u8 = 0;
const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const ERROR: u8 = 3;
const RESIZE: u8 = 4;
/// v5: the client closes one of its channels.
const CLOSE: u8 = 255;

/// How often the node pings a quiet client.
const PING: Duration = Duration::from_secs(20);
/// A client that sends nothing, not even a pong, for this long is gone.
pub const IDLE: Duration = Duration::from_secs(60);
/// How long after the command ends its output may take to drain to the client.
const DRAIN: Duration = Duration::from_secs(10);
/// Bytes buffered between the client and the command's stdin, and read per message
/// from its stdout and stderr.
const CHUNK: usize = 32 << 10;

/// The largest message taken from a client: stdin arrives in chunks far smaller.
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(1 << 20))
        .max_frame_size(Some(1 << 20))
}

/// A connection a client asked to upgrade, and what must live as long as the stream on
/// it: the API server's count of the session ([`baton_kube::StreamHold`]).
#[derive(Debug)]
pub struct Upgrade {
    on: hyper::upgrade::OnUpgrade,
    hold: Option<baton_kube::StreamHold>,
}

impl Upgrade {
    /// Takes the upgrade, and its hold if the request has one, out of a request.
    pub fn take<B>(req: &mut http::Request<B>) -> Option<Self> {
        let on = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>()?;
        let hold = req.extensions_mut().remove::<baton_kube::StreamHold>();
        Some(Self { on, hold })
    }
}

/// Picks the subprotocol from the client's `Sec-WebSocket-Protocol` list.
pub fn negotiate(offered: &str) -> Option<&'static str> {
    let offered: Vec<&str> = offered.split(',').map(str::trim).collect();
    PROTOCOLS.into_iter().find(|p| offered.contains(p))
}

/// What the client asked for in the exec query.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecOptions {
    /// Attach to the container's process rather than start a command.
    pub attach: bool,
    pub argv: Vec<String>,
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub tty: bool,
}

impl ExecOptions {
    /// Reads kubectl's query: `command` repeated, and the stdio flags.
    pub fn from_query(query: &str) -> Self {
        let mut o = ExecOptions::default();
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            let on = matches!(&*v, "true" | "1");
            match &*k {
                "command" => o.argv.push(v.into_owned()),
                "stdin" => o.stdin = on,
                "stdout" => o.stdout = on,
                "stderr" => o.stderr = on,
                "tty" => o.tty = on,
                _ => {}
            }
        }
        o
    }
}

/// The `Status` written on the error channel when a command ends.
pub fn exit_status(exit: &Exit, argv: &[String]) -> Value {
    if exit.code == 0 {
        return json!({"metadata": {}, "status": "Success"});
    }
    json!({
        "metadata": {},
        "status": "Failure",
        "message": format!(
            "command terminated with non-zero exit code: error executing command {argv:?}, exit code {}{}",
            exit.code,
            if exit.message.is_empty() { String::new() } else { format!(": {}", exit.message) },
        ),
        "reason": "NonZeroExitCode",
        "details": {"causes": [{"reason": "ExitCode", "message": exit.code.to_string()}]},
    })
}

fn error_status(e: &ExecError) -> Value {
    let (code, reason) = e.status();
    json!({
        "metadata": {},
        "status": "Failure",
        "message": baton_kube::error::chain(e),
        "reason": reason,
        "code": code,
    })
}

fn frame(channel: u8, data: &[u8]) -> Message {
    let mut m = Vec::with_capacity(data.len() + 1);
    m.push(channel);
    m.extend_from_slice(data);
    Message::Binary(m.into())
}

/// Copies one of the command's outputs to the client, a chunk per message (`frame` makes
/// it; None drops the chunk, for a channel the client did not open).
async fn pump<T>(
    mut from: impl AsyncRead + Unpin,
    out: mpsc::Sender<T>,
    frame: impl Fn(&[u8]) -> Option<T>,
) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if let Some(m) = frame(&buf[..n]) {
                    if out.send(m).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

/// The size a terminal is given when the client does not say.
const DEFAULT_TERMINAL: Terminal = Terminal {
    columns: 80,
    rows: 24,
};

/// How long a session with a terminal waits for the client's first resize message.
const SIZE_WAIT: Duration = Duration::from_secs(1);

/// A terminal size as clients send it: `{"Width":W,"Height":H}`.
fn terminal_size(json: &[u8]) -> Terminal {
    let size: Value = serde_json::from_slice(json).unwrap_or_default();
    let dim = |k: &str| size[k].as_u64().filter(|&n| n > 0 && n <= 10_000);
    match (dim("Width"), dim("Height")) {
        (Some(w), Some(h)) => Terminal {
            columns: w as u16,
            rows: h as u16,
        },
        _ => DEFAULT_TERMINAL,
    }
}

/// Reads the client's first terminal size (`{"Width":W,"Height":H}` on the resize
/// channel), keeping in `early` whatever came before it. A client that sends none within
/// [`SIZE_WAIT`] gets [`DEFAULT_TERMINAL`].
async fn first_size<St>(incoming: &mut St, early: &mut Vec<Message>) -> Terminal
where
    St: futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    let deadline = tokio::time::Instant::now() + SIZE_WAIT;
    // Bounded: a client that streams stdin first cannot make the node hold it all.
    while early.len() < 64 {
        match tokio::time::timeout_at(deadline, incoming.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) if b.first() == Some(&RESIZE) => {
                return terminal_size(&b[1..]);
            }
            Ok(Some(Ok(m))) => early.push(m),
            Ok(Some(Err(_))) | Ok(None) | Err(_) => break,
        }
    }
    DEFAULT_TERMINAL
}

/// Serves one exec session on an upgraded connection: starts the command, carries its
/// stdio, reports its end on the error channel and closes.
pub async fn serve_exec<S>(
    io: S,
    protocol: &'static str,
    streams: Arc<dyn PodStreams>,
    container: String,
    opts: ExecOptions,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(ws_config())).await;
    let (sink, mut incoming) = ws.split();
    // One writer: the pumps, the pings and the final status all go through it.
    let (out_tx, writer) = spawn_message_writer(sink, 16, |m: Message| m);

    let (stdin_w, stdin_r) = if opts.stdin {
        let (r, w) = tokio::io::duplex(CHUNK);
        (Some(w), Some(r))
    } else {
        (None, None)
    };
    let (stdout_r, stdout_w) = tokio::io::duplex(CHUNK);
    let (stderr_r, stderr_w) = tokio::io::duplex(CHUNK);
    // With a terminal, kubectl sends its size first thing; the command starts with it.
    // What arrives before it is kept for the command.
    let mut early = Vec::new();
    let terminal = match opts.tty && !opts.attach {
        true => Some(first_size(&mut incoming, &mut early).await),
        false => None,
    };
    let mut incoming = futures::stream::iter(early.into_iter().map(Ok)).chain(incoming);
    let stdio = ExecIo {
        stdin: stdin_r.map(|r| Box::new(r) as _),
        stdout: Box::new(stdout_w),
        stderr: Box::new(stderr_w),
        terminal,
    };
    let argv = opts.argv.clone();
    let started = if opts.attach {
        streams.attach(&container, stdio)
    } else {
        streams.exec(&container, opts.argv, stdio)
    };
    let mut exit = match started {
        Ok(f) => f,
        Err(e) => {
            tracing::info!(error = %baton_kube::error::chain(&e), "exec refused");
            let _ = out_tx
                .send(frame(ERROR, error_status(&e).to_string().as_bytes()))
                .await;
            drop(out_tx);
            let _ = writer.await;
            return;
        }
    };
    // With a terminal there is one output stream, as a terminal has.
    let err_channel = if opts.tty { STDOUT } else { STDERR };
    let pumps = [
        tokio::spawn(pump(stdout_r, out_tx.clone(), |b| Some(frame(STDOUT, b)))),
        tokio::spawn(pump(stderr_r, out_tx.clone(), move |b| {
            Some(frame(err_channel, b))
        })),
    ];
    let mut stdin = stdin_w;
    let mut ping = tokio::time::interval(PING);
    ping.tick().await;
    let idle = tokio::time::sleep(IDLE);
    tokio::pin!(idle);
    let ended = loop {
        tokio::select! {
            e = &mut exit => break Some(e),
            m = incoming.next() => {
                idle.as_mut().reset(tokio::time::Instant::now() + IDLE);
                match m {
                    Some(Ok(Message::Binary(b))) => match (b.first(), b.get(1)) {
                        (Some(&STDIN), _) => {
                            if let Some(w) = stdin.as_mut() {
                                if w.write_all(&b[1..]).await.is_err() {
                                    stdin = None;
                                }
                            }
                        }
                        (Some(&CLOSE), Some(&STDIN)) if protocol.starts_with("v5") => {
                            // End of input: the command reads end-of-file.
                            if let Some(mut w) = stdin.take() {
                                let _ = w.shutdown().await;
                            }
                        }
                        // WASI 0.2 has no way to tell a running guest its terminal's
                        // new size (see `first_size`).
                        (Some(&RESIZE), _) | (Some(&CLOSE), _) => {}
                        _ => {}
                    },
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break None,
                    Some(Ok(_)) => {}
                }
            }
            _ = ping.tick() => {
                if out_tx.send(Message::Ping(Vec::new().into())).await.is_err() {
                    break None;
                }
            }
            _ = &mut idle => break None,
        }
    };
    drop(stdin);
    match ended {
        Some(code) => {
            // The instance is gone and with it the writing ends of its outputs: the
            // pumps reach end-of-file once the client has taken what is left.
            for p in pumps {
                let _ = tokio::time::timeout(DRAIN, p).await;
            }
            let status = exit_status(&code, &argv);
            let _ = out_tx
                .send(frame(ERROR, status.to_string().as_bytes()))
                .await;
            drop(out_tx);
            let _ = tokio::time::timeout(DRAIN, writer).await;
        }
        None => {
            // The client is gone: stop the command now.
            drop(exit);
            for p in pumps {
                p.abort();
            }
            writer.abort();
        }
    }
}

/// Completes a WebSocket upgrade on a hyper request: the 101 answer's headers, given
/// the client's key and the chosen subprotocol ("" when the client asked for none, and
/// then none is named).
pub fn accept_headers(key: &[u8], protocol: &str) -> Vec<(http::HeaderName, String)> {
    let mut headers = vec![
        (http::header::UPGRADE, "websocket".to_string()),
        (http::header::CONNECTION, "Upgrade".to_string()),
        (
            http::header::SEC_WEBSOCKET_ACCEPT,
            tokio_tungstenite::tungstenite::handshake::derive_accept_key(key),
        ),
    ];
    if !protocol.is_empty() {
        headers.push((http::header::SEC_WEBSOCKET_PROTOCOL, protocol.to_string()));
    }
    headers
}

/// Runs a session once hyper hands over the upgraded connection.
pub fn spawn_exec_session(
    upgrade: Upgrade,
    protocol: &'static str,
    streams: Arc<dyn PodStreams>,
    container: String,
    opts: ExecOptions,
) {
    tokio::spawn(async move {
        let Upgrade { on, hold: _hold } = upgrade;
        match on.await {
            Ok(upgraded) => {
                serve_exec(TokioIo::new(upgraded), protocol, streams, container, opts).await
            }
            Err(e) => tracing::info!(error = %e, "exec upgrade failed"),
        }
    });
}

/// The close a session ends with: normal, which clients take for the end of the stream
/// (a close without a code is an error to them).
fn normal_close() -> Message {
    Message::Close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    }))
}

/// A task that writes what is queued on the returned sender (at most `queue` waiting) to
/// `sink` as messages (`encode` makes each), several to a flush when they queue up, and
/// closes normally once every sender is gone.
pub(crate) fn spawn_message_writer<S, T>(
    mut sink: futures::stream::SplitSink<WebSocketStream<S>, Message>,
    queue: usize,
    encode: impl Fn(T) -> Message + Send + 'static,
) -> (mpsc::Sender<T>, tokio::task::JoinHandle<()>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: Send + 'static,
{
    let (out, mut queued) = mpsc::channel::<T>(queue);
    let writer = tokio::spawn(async move {
        while let Some(m) = queued.recv().await {
            if sink.feed(encode(m)).await.is_err() {
                return;
            }
            while let Ok(more) = queued.try_recv() {
                if sink.feed(encode(more)).await.is_err() {
                    return;
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
        let _ = sink.send(normal_close()).await;
        // And the connection below ends cleanly (TLS's close_notify included).
        let _ = sink.close().await;
    });
    (out, writer)
}

/// Serves a SPDY port-forward session tunnelled through a WebSocket: the binary messages
/// carry the client's frames, split wherever the client wrote them, and each frame the
/// node writes goes out as a message of its own. Reading the messages in place and
/// writing frames straight into messages keeps a bulk transfer from being copied through
/// a pipe between the two.
async fn serve_tunnel<S>(
    ws: WebSocketStream<S>,
    streams: Arc<dyn PodStreams>,
    target: crate::portforward::Target,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use futures::future::ready;
    let (sink, incoming) = ws.split();
    let frames = incoming
        .take_while(|m| ready(!matches!(m, Ok(Message::Close(_)))))
        .filter_map(|m| {
            ready(match m {
                Ok(Message::Binary(b)) => Some(Ok(b)),
                Ok(_) => None,
                Err(e) => Some(Err(std::io::Error::other(e))),
            })
        });
    let reader = tokio_util::io::StreamReader::new(Box::pin(frames));
    let (out, writer) =
        spawn_message_writer(sink, 64, |frame: Vec<u8>| Message::Binary(frame.into()));
    crate::portforward::serve_frames(reader, out, writer, streams, target).await;
}

/// The three forms of a port-forward session (see `portforward.rs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForwardSession {
    /// SPDY carried in the binary messages of a WebSocket.
    Tunnel,
    /// SPDY on the upgraded connection itself.
    Spdy,
    /// WebSocket channels, a pair per port, binary or base64 text.
    Channels { ports: Vec<u16>, base64: bool },
}

/// Runs a port-forward session once hyper hands over the upgraded connection.
pub fn spawn_port_forward(
    upgrade: Upgrade,
    session: ForwardSession,
    streams: Arc<dyn PodStreams>,
    target: crate::portforward::Target,
) {
    tokio::spawn(async move {
        let Upgrade { on, hold: _hold } = upgrade;
        let upgraded = match on.await {
            Ok(u) => TokioIo::new(u),
            Err(e) => {
                tracing::info!(error = %e, "port-forward upgrade failed");
                return;
            }
        };
        let websocket = |io| WebSocketStream::from_raw_socket(io, Role::Server, Some(ws_config()));
        match session {
            ForwardSession::Tunnel => {
                serve_tunnel(websocket(upgraded).await, streams, target).await;
            }
            ForwardSession::Spdy => crate::portforward::serve(upgraded, streams, target).await,
            ForwardSession::Channels { ports, base64 } => {
                let ws = websocket(upgraded).await;
                crate::portforward::serve_channels(ws, ports, base64, streams, target).await;
            }
        }
    });
}

/// The stream protocols served on a SPDY exec upgrade (older kubectl): over SPDY, v5
/// behaves as v4, whose error stream carries a `Status`.
pub const SPDY_PROTOCOLS: [&str; 2] = ["v4.channel.k8s.io", "v5.channel.k8s.io"];

/// Serves one exec session on a connection upgraded to SPDY/3.1, as kubectl before 1.30
/// opens it: one stream per stdio channel (`streamtype` error, stdin, stdout, stderr,
/// resize), all opened before the command starts.
pub async fn serve_exec_spdy<S>(
    io: S,
    streams: Arc<dyn PodStreams>,
    container: String,
    opts: ExecOptions,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    use crate::spdy::{Frame, Reader, Writer};
    let (r, w) = tokio::io::split(io);
    let mut reader = Reader::new(r);
    // Frames are read by a task of their own, so that waiting for one with a deadline
    // cannot cut a frame in half.
    let (frames_tx, mut frames) = mpsc::channel(16);
    let _reading = crate::AbortOnDrop(tokio::spawn(async move {
        loop {
            let f = reader.next().await;
            let end = !matches!(f, Ok(Some(_)));
            if frames_tx.send(f).await.is_err() || end {
                return;
            }
        }
    }));
    let (out, writer) = crate::spdy::spawn_writer(w);
    let mut replies = Writer::default();
    let expected = 1
        + usize::from(opts.stdin)
        + usize::from(opts.stdout)
        + usize::from(opts.stderr && !opts.tty)
        + usize::from(opts.tty);
    let mut ids: std::collections::HashMap<String, u32> = std::collections::HashMap::new();
    let opened = tokio::time::timeout(Duration::from_secs(30), async {
        while ids.len() < expected {
            match frames.recv().await {
                Some(Ok(Some(Frame::SynStream { id, headers, .. }))) => {
                    let kind = headers
                        .iter()
                        .find(|(k, _)| k == "streamtype")
                        .map(|(_, v)| v.clone())
                        .unwrap_or_default();
                    if out.send(replies.syn_reply(id)).await.is_err() {
                        return false;
                    }
                    ids.insert(kind, id);
                }
                Some(Ok(Some(Frame::Ping(id)))) if crate::spdy::is_client_ping(id) => {
                    let _ = out.send(Writer::ping(id)).await;
                }
                Some(Ok(Some(_))) => {}
                Some(Ok(None) | Err(_)) | None => return false,
            }
        }
        true
    })
    .await;
    let Some(&error_id) = ids.get("error").filter(|_| matches!(opened, Ok(true))) else {
        return;
    };
    let stream_of = |k: &str| ids.get(k).copied();
    let (stdin_r, mut stdin_w) = match stream_of("stdin") {
        Some(_) => {
            let (r, w) = tokio::io::duplex(CHUNK);
            (Some(r), Some(w))
        }
        None => (None, None),
    };
    let (stdout_r, stdout_w) = tokio::io::duplex(CHUNK);
    let (stderr_r, stderr_w) = tokio::io::duplex(CHUNK);
    // With a terminal, kubectl sends its size on the resize stream first thing; the
    // command starts with it. What arrives before it is kept for the command.
    let mut early = std::collections::VecDeque::new();
    let terminal = match (opts.tty && !opts.attach, stream_of("resize")) {
        (true, Some(resize)) => {
            let deadline = tokio::time::Instant::now() + SIZE_WAIT;
            let mut size = DEFAULT_TERMINAL;
            // Bounded: a client that streams stdin first cannot make the node hold it all.
            while early.len() < 64 {
                match tokio::time::timeout_at(deadline, frames.recv()).await {
                    Ok(Some(Ok(Some(Frame::Data { id, data, .. })))) if id == resize => {
                        size = terminal_size(&data);
                        break;
                    }
                    Ok(Some(f)) => early.push_back(f),
                    Ok(None) | Err(_) => break,
                }
            }
            Some(size)
        }
        (true, None) => Some(DEFAULT_TERMINAL),
        (false, _) => None,
    };
    let stdio = ExecIo {
        stdin: stdin_r.map(|r| Box::new(r) as _),
        stdout: Box::new(stdout_w),
        stderr: Box::new(stderr_w),
        terminal,
    };
    let argv = opts.argv.clone();
    let finish = |status: Value, outputs: Vec<u32>| {
        let out = out.clone();
        async move {
            let _ = out
                .send(Writer::data(error_id, status.to_string().as_bytes(), true))
                .await;
            for id in outputs {
                let _ = out.send(Writer::data(id, b"", true)).await;
            }
            let _ = out.send(Writer::goaway(0)).await;
        }
    };
    let outputs: Vec<u32> = [stream_of("stdout"), stream_of("stderr")]
        .into_iter()
        .flatten()
        .collect();
    let started = if opts.attach {
        streams.attach(&container, stdio)
    } else {
        streams.exec(&container, opts.argv, stdio)
    };
    let mut exit = match started {
        Ok(f) => f,
        Err(e) => {
            finish(error_status(&e), outputs).await;
            drop(out);
            let _ = writer.await;
            return;
        }
    };
    // A channel the client did not open is read and dropped.
    let pump_to = |from: tokio::io::DuplexStream, id: Option<u32>| {
        tokio::spawn(pump(from, out.clone(), move |b| {
            id.map(|id| Writer::data(id, b, false))
        }))
    };
    let pumps = [
        pump_to(stdout_r, stream_of("stdout")),
        pump_to(
            stderr_r,
            stream_of("stderr").or(stream_of("stdout").filter(|_| opts.tty)),
        ),
    ];
    let stdin_id = stream_of("stdin");
    let ended = loop {
        tokio::select! {
            e = &mut exit => break Some(e),
            f = tokio::time::timeout(IDLE, async {
                match early.pop_front() {
                    Some(f) => Some(f),
                    None => frames.recv().await,
                }
            }) => match f.map(|f| f.unwrap_or(Ok(None))) {
                Ok(Ok(Some(Frame::Data { id, data, fin }))) if Some(id) == stdin_id => {
                    if let Some(w) = stdin_w.as_mut() {
                        if !data.is_empty() && w.write_all(&data).await.is_err() {
                            stdin_w = None;
                        }
                    }
                    if fin {
                        if let Some(mut w) = stdin_w.take() {
                            let _ = w.shutdown().await;
                        }
                    }
                }
                Ok(Ok(Some(Frame::Ping(id)))) if crate::spdy::is_client_ping(id) => {
                    let _ = out.send(Writer::ping(id)).await;
                }
                Ok(Ok(Some(Frame::GoAway))) | Ok(Ok(None)) | Ok(Err(_)) | Err(_) => break None,
                Ok(Ok(Some(Frame::RstStream { id, .. }))) if id == error_id => break None,
                Ok(Ok(Some(_))) => {}
            },
        }
    };
    drop(stdin_w);
    match ended {
        Some(code) => {
            for p in pumps {
                let _ = tokio::time::timeout(DRAIN, p).await;
            }
            finish(exit_status(&code, &argv), outputs).await;
            drop(out);
            let _ = tokio::time::timeout(DRAIN, writer).await;
        }
        None => {
            drop(exit);
            for p in pumps {
                p.abort();
            }
            writer.abort();
        }
    }
}

/// Runs a SPDY exec session once hyper hands over the upgraded connection.
pub fn spawn_exec_spdy_session(
    upgrade: Upgrade,
    streams: Arc<dyn PodStreams>,
    container: String,
    opts: ExecOptions,
) {
    tokio::spawn(async move {
        let Upgrade { on, hold: _hold } = upgrade;
        match on.await {
            Ok(upgraded) => serve_exec_spdy(TokioIo::new(upgraded), streams, container, opts).await,
            Err(e) => tracing::info!(error = %e, "exec upgrade failed"),
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeSandboxes;

    type Client = WebSocketStream<tokio::io::DuplexStream>;

    /// A session on an in-memory connection, and the client's end of it.
    async fn session(fake: &FakeSandboxes, protocol: &'static str, query: &str) -> Client {
        let (client, server) = tokio::io::duplex(1 << 16);
        let opts = ExecOptions::from_query(query);
        tokio::spawn(serve_exec(
            server,
            protocol,
            fake.any_streams(),
            "c".into(),
            opts,
        ));
        WebSocketStream::from_raw_socket(client, Role::Client, None).await
    }

    /// Everything the client receives until the server closes: per channel.
    async fn collect(ws: &mut Client) -> [Vec<u8>; 4] {
        let mut got: [Vec<u8>; 4] = Default::default();
        while let Some(Ok(m)) = ws.next().await {
            if let Message::Binary(b) = m {
                got[b[0] as usize].extend_from_slice(&b[1..]);
            }
        }
        got
    }

    #[tokio::test]
    async fn output_and_success_status() {
        let fake = FakeSandboxes::default();
        let mut ws = session(
            &fake,
            PROTOCOLS[0],
            "command=echo&command=hi&command=there&stdout=true&stderr=true",
        )
        .await;
        let got = collect(&mut ws).await;
        assert_eq!(got[STDOUT as usize], b"hi there\n");
        let status: Value = serde_json::from_slice(&got[ERROR as usize]).unwrap();
        assert_eq!(status["status"], "Success");
    }

    #[tokio::test]
    async fn a_terminal_starts_with_the_clients_size_and_keeps_early_input() {
        let fake = FakeSandboxes::default();
        let mut ws = session(&fake, PROTOCOLS[0], "command=tty&stdout=true&tty=true").await;
        ws.send(frame(RESIZE, br#"{"Width":132,"Height":43}"#))
            .await
            .unwrap();
        assert_eq!(collect(&mut ws).await[STDOUT as usize], b"132x43\n");

        // Input sent before the size is kept for the command.
        let mut ws = session(
            &fake,
            PROTOCOLS[0],
            "command=cat&stdin=true&stdout=true&tty=true",
        )
        .await;
        ws.send(frame(STDIN, b"early ")).await.unwrap();
        ws.send(frame(RESIZE, br#"{"Width":100,"Height":30}"#))
            .await
            .unwrap();
        ws.send(frame(STDIN, b"late")).await.unwrap();
        ws.send(Message::Binary(vec![CLOSE, STDIN].into()))
            .await
            .unwrap();
        assert_eq!(collect(&mut ws).await[STDOUT as usize], b"early late");

        // Without a size, and without a terminal.
        let mut ws = session(&fake, PROTOCOLS[0], "command=tty&stdout=true&tty=true").await;
        ws.send(frame(RESIZE, b"{}")).await.unwrap();
        assert_eq!(collect(&mut ws).await[STDOUT as usize], b"80x24\n");
        let mut ws = session(&fake, PROTOCOLS[0], "command=tty&stdout=true").await;
        let status: Value =
            serde_json::from_slice(&collect(&mut ws).await[ERROR as usize]).unwrap();
        assert_eq!(status["reason"], "NonZeroExitCode");
    }

    #[tokio::test]
    async fn exit_code_is_passed_through() {
        let fake = FakeSandboxes::default();
        let mut ws = session(
            &fake,
            PROTOCOLS[1],
            "command=exit&command=3&stdout=true&stderr=true",
        )
        .await;
        let got = collect(&mut ws).await;
        assert_eq!(got[STDERR as usize], b"bye\n");
        let status: Value = serde_json::from_slice(&got[ERROR as usize]).unwrap();
        assert_eq!(status["reason"], "NonZeroExitCode");
        assert_eq!(status["details"]["causes"][0]["message"], "3");
    }

    #[tokio::test]
    async fn stdin_reaches_the_command_and_v5_close_ends_it() {
        let fake = FakeSandboxes::default();
        let mut ws = session(
            &fake,
            PROTOCOLS[0],
            "command=cat&stdin=true&stdout=true&stderr=true",
        )
        .await;
        ws.send(frame(STDIN, b"hello ")).await.unwrap();
        ws.send(frame(STDIN, b"world")).await.unwrap();
        ws.send(Message::Binary(vec![CLOSE, STDIN].into()))
            .await
            .unwrap();
        let got = collect(&mut ws).await;
        assert_eq!(got[STDOUT as usize], b"hello world");
        let status: Value = serde_json::from_slice(&got[ERROR as usize]).unwrap();
        assert_eq!(status["status"], "Success");
    }

    #[tokio::test]
    async fn an_empty_command_is_refused_on_the_error_channel() {
        let fake = FakeSandboxes::default();
        let mut ws = session(&fake, PROTOCOLS[0], "stdout=true").await;
        let got = collect(&mut ws).await;
        let status: Value = serde_json::from_slice(&got[ERROR as usize]).unwrap();
        assert_eq!(status["status"], "Failure");
        assert_eq!(status["code"], 400);
        assert!(status["message"].as_str().unwrap().contains("no command"));
    }

    #[tokio::test]
    async fn a_client_that_goes_away_stops_the_command() {
        let fake = FakeSandboxes::default();
        let ws = session(&fake, PROTOCOLS[0], "command=sleep&stdout=true").await;
        wait_for(|| fake.execs() == 1).await;
        drop(ws);
        wait_for(|| fake.execs() == 0).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_client_is_dropped_after_the_idle_limit() {
        let fake = FakeSandboxes::default();
        // The client never reads: it answers no ping.
        let (client, server) = tokio::io::duplex(1 << 16);
        tokio::spawn(serve_exec(
            server,
            PROTOCOLS[0],
            fake.any_streams(),
            "c".into(),
            ExecOptions::from_query("command=sleep"),
        ));
        wait_for(|| fake.execs() == 1).await;
        tokio::time::sleep(IDLE + Duration::from_secs(1)).await;
        wait_for(|| fake.execs() == 0).await;
        drop(client);
    }

    /// A SPDY session as kubectl before 1.30 opens one: its streams (ids 1, 3, 5… in
    /// order), then `then`'s frames; what the server writes on each stream until it goes
    /// away.
    async fn spdy_session(
        fake: &FakeSandboxes,
        query: &str,
        streams: &[&str],
        then: &[Vec<u8>],
    ) -> std::collections::HashMap<u32, Vec<u8>> {
        use crate::spdy::{client_syn, Frame, Reader};
        let (client, server) = tokio::io::duplex(1 << 16);
        tokio::spawn(serve_exec_spdy(
            server,
            fake.any_streams(),
            "c".into(),
            ExecOptions::from_query(query),
        ));
        let mut z = flate2::Compress::new(flate2::Compression::best(), true);
        z.set_dictionary(crate::spdy::dictionary()).unwrap();
        let (r, mut w) = tokio::io::split(client);
        for (i, kind) in streams.iter().enumerate() {
            let syn = client_syn(&mut z, 1 + 2 * i as u32, &[("streamtype", kind)]);
            w.write_all(&syn).await.unwrap();
        }
        for f in then {
            w.write_all(f).await.unwrap();
        }
        let mut reader = Reader::new(r);
        let mut got = std::collections::HashMap::<u32, Vec<u8>>::new();
        while let Ok(Some(f)) = reader.next().await {
            match f {
                Frame::Data { id, data, .. } => got.entry(id).or_default().extend(&data[..]),
                Frame::GoAway => break,
                _ => {}
            }
        }
        got
    }

    #[tokio::test]
    async fn a_spdy_terminal_starts_with_the_clients_size_and_keeps_early_input() {
        use crate::spdy::Writer;
        let fake = FakeSandboxes::default();
        let size = |w: u16, h: u16| {
            Writer::data(
                5,
                format!(r#"{{"Width":{w},"Height":{h}}}"#).as_bytes(),
                false,
            )
        };
        let got = spdy_session(
            &fake,
            "command=tty&stdout=true&tty=true",
            &["error", "stdout", "resize"],
            &[size(132, 43)],
        )
        .await;
        assert_eq!(got[&3], b"132x43\n");

        // stdin (3) sent before the size is kept for the command.
        let got = spdy_session(
            &fake,
            "command=cat&stdin=true&stdout=true&tty=true",
            &["error", "stdin", "stdout", "resize"],
            &[
                Writer::data(3, b"early ", false),
                Writer::data(7, br#"{"Width":100,"Height":30}"#, false),
                Writer::data(3, b"late", true),
            ],
        )
        .await;
        assert_eq!(got[&5], b"early late");
    }

    #[test]
    fn negotiation_prefers_v5_and_refuses_the_rest() {
        assert_eq!(
            negotiate("v4.channel.k8s.io, v5.channel.k8s.io"),
            Some("v5.channel.k8s.io")
        );
        assert_eq!(negotiate("v4.channel.k8s.io"), Some("v4.channel.k8s.io"));
        assert_eq!(negotiate("channel.k8s.io,base64.channel.k8s.io"), None);
    }

    async fn wait_for(cond: impl Fn() -> bool) {
        for _ in 0..1000 {
            if cond() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("condition not reached");
    }
}
